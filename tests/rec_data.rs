//! Data loaders and the leave-one-out split (engine/rec/data.rs, docs/data.md): small hand-written
//! files for the protocol and every error path, then the real data sets when present
//! (data/ml-100k from scripts/fetch-ml100k.sh; ../shared/recdata), skipped with a message
//! otherwise.
use ilrec::rec::data::{
    leave_one_out, load_lcrec, load_recbole, load_recbole_presplit, Dataset, Sample, DEFAULT_MAX_HISTORY,
};
use ilrec::{Error, Result};
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use tempfile::TempDir;

fn write(dir: &Path, name: &str, content: &str) {
    std::fs::write(dir.join(name), content).unwrap();
}

/// The error of `f` (which must neither succeed nor panic); checks that its message contains
/// every needle.
fn expect_err(f: impl FnOnce() -> Result<Dataset>, needles: &[&str]) -> Error {
    let err = match catch_unwind(AssertUnwindSafe(f)) {
        Err(_) => panic!("loader panicked; expected an error containing {needles:?}"),
        Ok(Ok(_)) => panic!("loader succeeded; expected an error containing {needles:?}"),
        Ok(Err(e)) => e,
    };
    let msg = err.to_string();
    for n in needles {
        assert!(msg.contains(n), "error `{msg}` lacks `{n}`");
    }
    err
}

/// Raw ids of a user's sequence.
fn raw_seq(ds: &Dataset, user: &str) -> Vec<String> {
    let u = ds.users.iter().position(|x| x == user).unwrap();
    ds.sequences[u]
        .iter()
        .map(|&i| ds.items[i as usize].raw_id.clone())
        .collect()
}

fn s(ids: &[&str]) -> Vec<String> {
    ids.iter().map(|x| x.to_string()).collect()
}

const INTER_HEADER: &str = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n";

#[test]
fn recbole_sorts_by_timestamp_with_stable_ties() {
    let dir = TempDir::new().unwrap();
    // Timestamp before item in the header too: columns are found by name.
    let inter = "user_id:token\ttimestamp:float\titem_id:token\trating:float\n\
                 10\t30\t7\t5\n\
                 2\t5\t1\t3\n\
                 10\t10\t8\t4\n\
                 10\t20\t9\t1\n\
                 10\t10\t3\t2\n\
                 2\t5\t7\t1\n\
                 2\t1.5e0\t3\t1\n\
                 \n\
                 10\t10\t1\t2\n";
    write(dir.path(), "toy.inter", inter);
    write(
        dir.path(),
        "toy.item",
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tscore:float\tclass:token_seq\n\
         1\tToy Story\t1995\t0.5\tAnimation Comedy\n\
         3\tHeat\t\t0.1\tAction\n\
         7\tSeven\t1995\t0.2\tThriller\n\
         8\tBabe\t1995\t0.3\t\n\
         9\tCasino\t1995\t0.4\tDrama\n\
         99\tNever rated\t2000\t0.0\tDrama\n",
    );
    let ds = load_recbole(dir.path(), "toy").unwrap();
    assert_eq!(ds.name, "toy");
    // Natural (numeric) order of raw ids, not string order ("10" < "2").
    assert_eq!(ds.users, s(&["2", "10"]));
    let raw: Vec<&str> = ds.items.iter().map(|i| i.raw_id.as_str()).collect();
    assert_eq!(
        raw,
        ["1", "3", "7", "8", "9"],
        "item 99 is only in .item: ignored"
    );
    // ts 10 ties keep file order: 8, 3, 1.
    assert_eq!(raw_seq(&ds, "10"), s(&["8", "3", "1", "9", "7"]));
    assert_eq!(raw_seq(&ds, "2"), s(&["3", "1", "7"]));
    assert_eq!(ds.num_interactions(), 8);
    assert!(ds.semantic_ids.is_none());
    assert!(ds.warnings.is_empty(), "{:?}", ds.warnings);
    let toy = &ds.items[0];
    assert_eq!(toy.title, "Toy Story");
    assert_eq!(
        toy.text, "Toy Story. 1995. Animation Comedy",
        "float column excluded"
    );
    assert_eq!(ds.items[1].text, "Heat. Action", "empty fields skipped");
}

#[test]
fn recbole_without_timestamp_keeps_file_order_and_warns_on_missing_items() {
    let dir = TempDir::new().unwrap();
    write(
        dir.path(),
        "a.inter",
        "user_id:token\titem_id:token\nu\tz\nu\ty\nu\tx\n",
    );
    write(dir.path(), "a.item", "item_id:token\ttitle:token_seq\ny\tWhy\n");
    let ds = load_recbole(dir.path(), "a").unwrap();
    assert_eq!(raw_seq(&ds, "u"), s(&["z", "y", "x"]));
    // Not all numeric: string order.
    let titles: Vec<&str> = ds.items.iter().map(|i| i.title.as_str()).collect();
    assert_eq!(titles, ["x", "Why", "z"]);
    assert_eq!(ds.warnings.len(), 1);
    assert!(
        ds.warnings[0].contains("2 of the 3 items") && ds.warnings[0].contains("a.item"),
        "{:?}",
        ds.warnings
    );

    // No .item at all: one warning, titles are raw ids.
    std::fs::remove_file(dir.path().join("a.item")).unwrap();
    let ds = load_recbole(dir.path(), "a").unwrap();
    assert_eq!(ds.items[2].title, "z");
    assert!(
        ds.warnings.len() == 1 && ds.warnings[0].contains("not found"),
        "{:?}",
        ds.warnings
    );
}

/// A data set from raw sequences (items "0".."n" by index).
fn synthetic(seqs: Vec<Vec<u32>>) -> Dataset {
    let n = seqs.iter().flatten().copied().max().map_or(0, |m| m + 1);
    let dir = TempDir::new().unwrap();
    let mut inter = String::from(INTER_HEADER);
    for (u, seq) in seqs.iter().enumerate() {
        for (t, i) in seq.iter().enumerate() {
            inter.push_str(&format!("{u}\t{i}\t1\t{}\n", 1000 + t));
        }
    }
    write(dir.path(), "syn.inter", &inter);
    let ds = load_recbole(dir.path(), "syn").unwrap();
    assert_eq!(ds.items.len() as u32, n);
    assert_eq!(ds.sequences, seqs);
    ds
}

#[test]
fn leave_one_out_exact_split_drop_and_history_cap() {
    let long: Vec<u32> = (0..25).collect();
    let ds = synthetic(vec![
        vec![0, 1, 2, 3, 4], // user 0: 5 items
        vec![5, 6],          // user 1: dropped (< 3)
        long.clone(),        // user 2: 25 items
        vec![7, 8, 9],       // user 3: exactly 3, no training sample
        vec![9],             // user 4: dropped
    ]);
    let split = leave_one_out(&ds, DEFAULT_MAX_HISTORY);
    assert_eq!(split.dropped_users, 2);
    let smp = |user: u32, history: &[u32], target: u32| Sample {
        user,
        history: history.to_vec(),
        target,
    };

    // User 0: test (0..3) -> 4, valid (0..2) -> 3, train (0) -> 1, (0, 1) -> 2.
    assert_eq!(split.test[0], smp(0, &[0, 1, 2, 3], 4));
    assert_eq!(split.valid[0], smp(0, &[0, 1, 2], 3));
    assert_eq!(split.train[0..2], [smp(0, &[0], 1), smp(0, &[0, 1], 2)]);

    // User 2 (25 items): 22 training samples, histories capped at the 20 most recent items.
    let train2: Vec<&Sample> = split.train.iter().filter(|x| x.user == 2).collect();
    assert_eq!(train2.len(), 22);
    for (k, sm) in train2.iter().enumerate() {
        let target = k + 1; // targets 1..=22
        assert_eq!(sm.target, target as u32);
        let start = target.saturating_sub(20);
        assert_eq!(
            sm.history,
            long[start..target],
            "train sample with target {target}"
        );
    }
    assert_eq!(train2[19].history.len(), 20);
    assert_eq!(train2[20].history, long[1..21]);
    assert_eq!(split.valid[1], smp(2, &long[3..23], 23));
    assert_eq!(split.test[1], smp(2, &long[4..24], 24));

    // User 3: only valid and test.
    assert!(split.train.iter().all(|x| x.user != 3));
    assert_eq!(split.valid[2], smp(3, &[7], 8));
    assert_eq!(split.test[2], smp(3, &[7, 8], 9));

    assert_eq!(
        (split.train.len(), split.valid.len(), split.test.len()),
        (2 + 22, 3, 3)
    );
    // Dropped users give no sample at all.
    assert!(split
        .train
        .iter()
        .chain(&split.valid)
        .chain(&split.test)
        .all(|x| x.user != 1 && x.user != 4));

    // No cap: the whole prefix.
    let full = leave_one_out(&ds, usize::MAX);
    assert_eq!(full.test[1].history, long[..24]);
}

#[test]
fn recbole_malformed_lines_name_file_line_and_field() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    let load = || load_recbole(d, "bad");

    write(d, "bad.inter", &format!("{INTER_HEADER}1\t2\t3\t100\n1\t2\t3\n"));
    let e = expect_err(
        load,
        &["bad.inter", "line 3", "3 tab-separated fields", "header has 4"],
    );
    assert!(matches!(e, Error::Format { .. }));

    write(
        d,
        "bad.inter",
        &format!("{INTER_HEADER}1\t2\t3\t100\n1\t2\t3\tyesterday\n"),
    );
    expect_err(load, &["bad.inter", "line 3", "`timestamp`", "yesterday"]);

    write(d, "bad.inter", &format!("{INTER_HEADER}1\t2\t3\tNaN\n"));
    expect_err(load, &["bad.inter", "line 2", "`timestamp`"]);

    write(d, "bad.inter", "uid:token\titem_id:token\n1\t2\n");
    expect_err(load, &["bad.inter", "line 1", "missing header field `user_id`"]);

    write(d, "bad.inter", "user_id\titem_id:token\n1\t2\n");
    expect_err(load, &["bad.inter", "line 1", "`user_id`", ":type"]);

    write(d, "bad.inter", &format!("{INTER_HEADER}\t2\t3\t100\n"));
    expect_err(load, &["bad.inter", "line 2", "`user_id` is empty"]);

    std::fs::write(d.join("bad.inter"), b"user_id:token\titem_id:token\n1\t\xff\n").unwrap();
    expect_err(load, &["bad.inter", "line 2", "UTF-8"]);

    // The .item file: wrong width, duplicate id.
    write(d, "bad.inter", &format!("{INTER_HEADER}1\t2\t3\t100\n"));
    write(d, "bad.item", "item_id:token\ttitle:token_seq\n2\tTwo\n5\n");
    expect_err(load, &["bad.item", "line 3"]);
    write(
        d,
        "bad.item",
        "item_id:token\ttitle:token_seq\n2\tTwo\n2\tAgain\n",
    );
    expect_err(load, &["bad.item", "line 3", "`2` appears twice", "line 2"]);

    // Missing file: an I/O error naming it.
    let e = expect_err(|| load_recbole(d, "absent"), &["absent.inter"]);
    assert!(matches!(e, Error::Io { .. }));
}

#[test]
fn empty_files_are_clear_errors() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    write(d, "e.inter", "");
    expect_err(|| load_recbole(d, "e"), &["e.inter", "empty file"]);
    write(d, "e.inter", INTER_HEADER);
    expect_err(
        || load_recbole(d, "e"),
        &["e.inter", "no interactions", "empty file"],
    );
    write(d, "e.inter", &format!("{INTER_HEADER}1\t2\t3\t4\n"));
    write(d, "e.item", "");
    expect_err(|| load_recbole(d, "e"), &["e.item", "empty file"]);

    write(d, "j.inter.json", "  \n");
    expect_err(|| load_lcrec(d, "j"), &["j.inter.json", "empty file"]);
    write(d, "j.inter.json", "{}");
    expect_err(|| load_lcrec(d, "j"), &["j.inter.json", "empty object"]);
    write(d, "j.inter.json", r#"{"u": []}"#);
    expect_err(|| load_lcrec(d, "j"), &["j.inter.json", "no interactions"]);

    write_presplit(
        d,
        "p",
        &[("0", "1", "2")],
        &[("0", "1 2", "3")],
        &[("0", "1 2 3", "4")],
    );
    write(
        d,
        "p.valid.inter",
        "user_id:token\titem_id_list:token_seq\titem_id:token\n",
    );
    expect_err(|| load_recbole_presplit(d, "p"), &["p.valid.inter", "no rows"]);
}

// ---------------------------------------------------------------------------------------------
// Pre-split (UniSRec) files

type Rows<'a> = [(&'a str, &'a str, &'a str)];

fn write_presplit(d: &Path, name: &str, train: &Rows, valid: &Rows, test: &Rows) {
    let header = "user_id:token\titem_id_list:token_seq\titem_id:token\n";
    for (split, rows) in [("train", train), ("valid", valid), ("test", test)] {
        let mut t = String::from(header);
        for (u, h, i) in rows {
            t.push_str(&format!("{u}\t{h}\t{i}\n"));
        }
        write(d, &format!("{name}.{split}.inter"), &t);
    }
    let mut text = String::from("item_id:token\ttext:token_seq\n");
    for i in 0..12 {
        text.push_str(&format!("I{i}\tItem {i}. Category. Brand. \n"));
    }
    write(d, &format!("{name}.text"), &text);
    let map: String = (0..12).map(|i| format!("I{i}\t{i}\n")).collect();
    write(d, &format!("{name}.item2index"), &map);
    write(d, &format!("{name}.user2index"), "alice\t0\nbob\t1\n");
}

#[test]
fn presplit_rebuilds_sequences_including_truncated_histories() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    // History cap 3 in the files. alice: 0 1 2 3 4 5 6 (7 items: histories truncated);
    // bob: 8 9 10 (3 items, no train row). Train rows in the order RecBole writes them (longest first).
    write_presplit(
        d,
        "p",
        &[
            ("0", "1 2 3", "4"),
            ("0", "0 1 2", "3"),
            ("0", "0 1", "2"),
            ("0", "0", "1"),
        ],
        &[("0", "2 3 4", "5"), ("1", "8", "9")],
        &[("1", "8 9", "10"), ("0", "3 4 5", "6")],
    );
    let ds = load_recbole_presplit(d, "p").unwrap();
    assert_eq!(ds.users, s(&["alice", "bob"]));
    assert_eq!(ds.items.len(), 10);
    assert_eq!(ds.items[3].raw_id, "I3");
    assert_eq!(
        ds.items[3].title, "Item 3. Category. Brand.",
        "no title column: title = text"
    );
    assert_eq!(ds.sequences, vec![vec![0, 1, 2, 3, 4, 5, 6], vec![7, 8, 9]]);
    assert!(ds.warnings.is_empty());
    let split = leave_one_out(&ds, 3);
    assert_eq!(
        split.test[0],
        Sample {
            user: 0,
            history: vec![3, 4, 5],
            target: 6
        }
    );
    assert_eq!(split.train.len(), 4);

    // A row that is not a prefix of the sequence: error naming it.
    write_presplit(
        d,
        "q",
        &[("0", "0", "1"), ("0", "0 5", "2")],
        &[("0", "0 1 2", "3")],
        &[("0", "0 1 2 3", "4")],
    );
    expect_err(|| load_recbole_presplit(d, "q"), &["cannot rebuild user `0`"]);
    // A user without a test row.
    write_presplit(
        d,
        "r",
        &[],
        &[("0", "0", "1"), ("1", "5", "6")],
        &[("0", "0 1", "2")],
    );
    expect_err(
        || load_recbole_presplit(d, "r"),
        &["r.valid.inter", "user `1`", "no row in r.test.inter"],
    );
}

#[test]
fn presplit_unknown_item_ids() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    // Index 40 is not in .item2index.
    write_presplit(d, "p", &[], &[("0", "0", "1")], &[("0", "0 40", "2")]);
    expect_err(
        || load_recbole_presplit(d, "p"),
        &["p.test.inter", "line 2", "`40`", "p.item2index"],
    );
    // In .item2index but absent from .text.
    write_presplit(d, "p", &[], &[("0", "0", "1")], &[("0", "0 1", "2")]);
    write(d, "p.item2index", "I0\t0\nI1\t1\nGHOST\t2\n");
    expect_err(
        || load_recbole_presplit(d, "p"),
        &["p.test.inter", "line 2", "`GHOST`", "p.text"],
    );
    // Without .item2index the .inter ids are .text ids directly.
    std::fs::remove_file(d.join("p.item2index")).unwrap();
    expect_err(
        || load_recbole_presplit(d, "p"),
        &["p.valid.inter", "line 2", "`0`", "p.text"],
    );
}

// ---------------------------------------------------------------------------------------------
// LC-Rec JSON

fn write_lcrec(d: &Path, index: Option<&str>) {
    write(
        d,
        "m.inter.json",
        r#"{"10": [3, 1, 2, 1], "2": ["2", 3, 4], "7": [4, 1]}"#,
    );
    write(
        d,
        "m.item.json",
        "{\n\"1\": {\"title\": \"One\", \"description\": \"first\", \"brand\": \"\", \"categories\": [\"a\", \"b\"]},\n\
         \"2\": {\"title\": \"Two\", \"description\": \"\"},\n\
         \"3\": {\"title\": \"Three\"},\n\
         \"4\": {\"title\": \"Four\"},\n\
         \"5\": {\"title\": \"Five, unused\"}\n}",
    );
    if let Some(index) = index {
        write(d, "m.index.json", index);
    }
}

#[test]
fn lcrec_loads_sequences_titles_and_semantic_ids() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    write_lcrec(
        d,
        Some(
            r#"{"1": ["<a_1>", "<b_2>"], "2": ["<a_1>", "<b_3>"], "3": ["<a_2>", "<b_2>"],
                "4": ["<a_1>", "<b_2>"], "5": ["<a_9>", "<b_9>"]}"#,
        ),
    );
    let ds = load_lcrec(d, "m").unwrap();
    assert_eq!(ds.users, s(&["2", "7", "10"]));
    assert_eq!(
        raw_seq(&ds, "10"),
        s(&["3", "1", "2", "1"]),
        "time order as listed, repeats kept"
    );
    assert_eq!(ds.items.len(), 4, "item 5 only in item.json: ignored");
    assert_eq!(ds.items[0].title, "One");
    assert_eq!(
        ds.items[0].text, "One. a, b. first",
        "title, then other fields by key"
    );
    let ids = ds.semantic_ids.as_ref().unwrap();
    assert_eq!(ids[2], s(&["<a_2>", "<b_2>"]));
    // Items 1 and 4 share a code: one counted warning.
    assert_eq!(ds.warnings.len(), 1);
    assert!(
        ds.warnings[0].contains("1 semantic IDs are shared") && ds.warnings[0].contains("items 1, 4"),
        "{:?}",
        ds.warnings
    );
    let split = leave_one_out(&ds, DEFAULT_MAX_HISTORY);
    assert_eq!(
        (
            split.train.len(),
            split.valid.len(),
            split.test.len(),
            split.dropped_users
        ),
        (1, 2, 2, 1)
    );

    // No index.json: no semantic ids.
    std::fs::remove_file(d.join("m.index.json")).unwrap();
    assert!(load_lcrec(d, "m").unwrap().semantic_ids.is_none());
}

#[test]
fn lcrec_errors() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    // index.json names an item that exists nowhere.
    write_lcrec(
        d,
        Some("{\n\"1\": [\"<a_1>\"],\n\"2\": [\"<a_2>\"],\n\"3\": [\"<a_3>\"],\n\"4\": [\"<a_4>\"],\n\"77\": [\"<a_5>\"]\n}"),
    );
    expect_err(
        || load_lcrec(d, "m"),
        &["m.index.json", "line 6", "unknown item id `77`"],
    );
    // An item of inter.json without a semantic ID.
    write(
        d,
        "m.index.json",
        "{\"1\": [\"<a_1>\"], \"2\": [\"<a_2>\"], \"3\": [\"<a_3>\"]}",
    );
    expect_err(
        || load_lcrec(d, "m"),
        &["m.index.json", "item `4`", "no semantic ID"],
    );
    write(d, "m.index.json", "{\"1\": [], \"2\": [\"<a_2>\"]}");
    expect_err(
        || load_lcrec(d, "m"),
        &["m.index.json", "item `1`", "non-empty array"],
    );
    // Syntax error: serde's line and column.
    write(d, "m.index.json", "{\"1\": [\"<a_1>\",\n}");
    expect_err(|| load_lcrec(d, "m"), &["m.index.json", "line 2"]);
    // Bad values in inter.json / item.json.
    write(d, "m.inter.json", "{\"1\": [1, 2],\n \"2\": [1, {\"x\": 1}]}");
    expect_err(
        || load_lcrec(d, "m"),
        &["m.inter.json", "line 2", "user `2`", "entry 2"],
    );
    write(d, "m.inter.json", "[1, 2]");
    expect_err(
        || load_lcrec(d, "m"),
        &["m.inter.json", "an array, expected an object"],
    );
    write(d, "m.inter.json", r#"{"1": [1, 2, 3]}"#);
    write(
        d,
        "m.item.json",
        "{\"1\": {\"title\": \"One\"},\n\"2\": {\"name\": \"Two\"}}",
    );
    expect_err(
        || load_lcrec(d, "m"),
        &["m.item.json", "line 2", "item `2`", "`title`"],
    );
    // Item absent from item.json: warning, raw id as title (as for RecBole .item).
    write(
        d,
        "m.item.json",
        "{\"1\": {\"title\": \"One\"}, \"2\": {\"title\": \"Two\"}}",
    );
    std::fs::remove_file(d.join("m.index.json")).unwrap();
    let ds = load_lcrec(d, "m").unwrap();
    assert_eq!(ds.items[2].title, "3");
    assert!(ds.warnings[0].contains("1 of the 3 items"), "{:?}", ds.warnings);
}

// ---------------------------------------------------------------------------------------------
// Real data sets (skipped when absent)

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn recdata(sub: &str) -> Option<PathBuf> {
    let p = manifest().join("../shared/recdata").join(sub);
    if p.is_dir() {
        Some(p)
    } else {
        println!("skipped: {} not found", p.display());
        None
    }
}

fn check_split_shape(ds: &Dataset, max_history: usize) -> (usize, usize, usize) {
    let split = leave_one_out(ds, max_history);
    let kept: Vec<&Vec<u32>> = ds.sequences.iter().filter(|x| x.len() >= 3).collect();
    assert_eq!(split.dropped_users, ds.sequences.len() - kept.len());
    assert_eq!(split.train.len(), kept.iter().map(|x| x.len() - 3).sum::<usize>());
    assert_eq!(split.valid.len(), kept.len());
    assert!(split
        .train
        .iter()
        .chain(&split.valid)
        .chain(&split.test)
        .all(|x| x.history.len() <= max_history));
    (split.train.len(), split.valid.len(), split.test.len())
}

#[test]
fn movielens_100k() {
    let dir = manifest().join("data/ml-100k");
    if !dir.join("ml-100k.inter").is_file() {
        println!(
            "skipped: {} not found (run scripts/fetch-ml100k.sh)",
            dir.display()
        );
        return;
    }
    let ds = load_recbole(&dir, "ml-100k").unwrap();
    assert_eq!(ds.users.len(), 943);
    assert_eq!(ds.items.len(), 1682);
    assert_eq!(ds.num_interactions(), 100_000);
    assert!(ds.warnings.is_empty(), "{:?}", ds.warnings);
    assert_eq!(ds.items[0].raw_id, "1");
    assert_eq!(ds.items[0].title, "Toy Story");
    assert_eq!(ds.items[0].text, "Toy Story. 1995. Animation Children's Comedy");
    assert_eq!(ds.sequences.iter().map(Vec::len).min(), Some(20));
    let counts = check_split_shape(&ds, DEFAULT_MAX_HISTORY);
    assert_eq!(counts, (97_171, 943, 943));
    println!("ml-100k: 943 users, 1682 items, 100000 interactions; train/valid/test {counts:?}");
}

#[test]
fn microlens_lcrec() {
    let Some(dir) = recdata("Microlens_LCRec") else {
        return;
    };
    let ds = load_lcrec(&dir, "Microlens").unwrap();
    // README: 13,210 users, 5,312 items, 78,255 interactions.
    assert_eq!(ds.users.len(), 13_210);
    assert_eq!(ds.items.len(), 5_312);
    assert_eq!(ds.num_interactions(), 78_255);
    let ids = ds.semantic_ids.as_ref().unwrap();
    assert!(ids.iter().all(|c| c.len() == 4));
    assert_eq!(ids[0], s(&["<a_189>", "<b_211>", "<c_45>", "<d_169>"]));
    assert!(ds.items.iter().all(|i| !i.title.is_empty()));
    // The 4-level codes are not unique in this copy (5,220 distinct codes for 5,312 items).
    let distinct: std::collections::HashSet<&Vec<String>> = ids.iter().collect();
    assert_eq!(distinct.len(), 5_220);
    assert_eq!(ds.warnings.len(), 1, "{:?}", ds.warnings);
    assert_eq!(ds.sequences.iter().map(Vec::len).min(), Some(4));
    let counts = check_split_shape(&ds, DEFAULT_MAX_HISTORY);
    assert_eq!(counts, (38_625, 13_210, 13_210));
    println!("Microlens: {counts:?}; {}", ds.warnings[0]);
}

/// Reads a pre-split file's rows as (user token, history tokens, target token).
fn read_rows(path: &Path) -> Vec<(String, Vec<String>, String)> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (
                f[0].to_string(),
                f[1].split(' ').map(String::from).collect(),
                f[2].to_string(),
            )
        })
        .collect()
}

#[test]
fn scientific_presplit() {
    let Some(dir) = recdata("Scientific_UniSRec") else {
        return;
    };
    let ds = load_recbole_presplit(&dir, "Scientific").unwrap();
    assert!(ds.warnings.is_empty(), "{:?}", ds.warnings);
    // README: 8,442 users, 4,385 items, 59,384 interactions.
    assert_eq!(ds.users.len(), 8_442);
    assert_eq!(ds.items.len(), 4_385);
    // Measured: 59,427. The README's 59,384 is the sum of the test rows' history + target, whose
    // histories RecBole truncated to 50 items; 3 users have longer sequences (80, 60, 56 items),
    // rebuilt from their train rows.
    assert_eq!(ds.num_interactions(), 59_427);
    assert_eq!(
        ds.sequences.iter().map(|x| x.len().min(51)).sum::<usize>(),
        59_384
    );
    let mut long: Vec<usize> = ds.sequences.iter().map(Vec::len).filter(|&n| n > 51).collect();
    long.sort();
    assert_eq!(long, [56, 60, 80]);
    assert_eq!(ds.users[0], "ABW8NXS7SV55K", "raw ids from .user2index");
    assert_eq!(
        ds.items[0].raw_id, "B00TNNWMXI",
        "raw ids from .item2index, dense id = index"
    );
    assert_eq!(
        ds.items[0].title, ds.items[0].text,
        "no title column: title = text"
    );
    assert!(
        ds.items[0].text.starts_with("eSUN Bronze filament 1.75mm"),
        "{}",
        ds.items[0].text
    );

    // leave_one_out with the files' cap (50) reproduces the files' split exactly.
    let split = leave_one_out(&ds, 50);
    assert_eq!(split.dropped_users, 0);
    let to_sample = |(u, h, t): (String, Vec<String>, String)| Sample {
        user: u.parse().unwrap(),
        history: h.iter().map(|x| x.parse().unwrap()).collect(),
        target: t.parse().unwrap(),
    };
    let rows = |split: &str| -> Vec<Sample> {
        read_rows(&dir.join(format!("Scientific.{split}.inter")))
            .into_iter()
            .map(to_sample)
            .collect()
    };
    let sorted = |mut v: Vec<Sample>| {
        v.sort_by(|a, b| (a.user, a.history.len(), &a.history).cmp(&(b.user, b.history.len(), &b.history)));
        v
    };
    // Dense user/item ids equal the files' indices (natural order of numeric tokens).
    assert_eq!(sorted(rows("test")), split.test);
    assert_eq!(sorted(rows("valid")), split.valid);
    let mut file_train: HashMap<Sample, usize> = HashMap::new();
    for r in rows("train") {
        *file_train.entry(r).or_default() += 1;
    }
    let mut ours: HashMap<Sample, usize> = HashMap::new();
    for r in &split.train {
        *ours.entry(r.clone()).or_default() += 1;
    }
    assert_eq!(split.train.len(), 34_101);
    assert!(
        file_train == ours,
        "train samples differ from Scientific.train.inter"
    );
    let counts = check_split_shape(&ds, DEFAULT_MAX_HISTORY);
    assert_eq!(counts, (34_101, 8_442, 8_442));
}
