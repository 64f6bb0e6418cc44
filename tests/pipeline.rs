//! The recommendation job end to end on real SmolLM2 weights truncated to 2 blocks and a small
//! synthetic RecBole data set: semantic IDs, SASRec + CRR rewards, ILRec training, resume,
//! evaluation and recommendation. Skips (with a line) when the weights are absent.
mod common;
use common::{repo, skip};
use ilrec::rec::pipeline::{run_eval, run_sasrec, run_train, RunConfig, TrainedRun};
use ilrec::train::trainer::StepReport;
use std::fmt::Write;
use std::path::Path;

/// 24 users over 10 items; user u walks the items from u mod 10 in steps of 1 or 3.
fn write_dataset(dir: &Path) {
    let mut inter = String::from("user_id:token\titem_id:token\trating:float\ttimestamp:float\n");
    for u in 0..24u32 {
        let step = if u % 2 == 0 { 1 } else { 3 };
        for k in 0..8u32 {
            writeln!(inter, "u{u}\ti{}\t4\t{}", (u + k * step) % 10, 1000 + k).unwrap();
        }
    }
    std::fs::write(dir.join("toy.inter"), inter).unwrap();
    let names = ["red apple", "green apple", "blue car", "red car", "old book", "new book", "jazz record", "rock record", "tea cup", "coffee cup"];
    let mut item = String::from("item_id:token\ttitle:token_seq\n");
    for (i, n) in names.iter().enumerate() {
        writeln!(item, "i{i}\t{n}").unwrap();
    }
    std::fs::write(dir.join("toy.item"), item).unwrap();
}

fn config(model: &Path, data: &Path, out: &Path) -> RunConfig {
    let text = format!(
        r#"
model_dir = "{model}"
model_blocks = 2
output_dir = "{out}"
method = "ilrec"
[data]
dir = "{data}"
name = "toy"
max_history = 5
[ids]
levels = 2
codes = 3
kmeans_iters = 5
max_text_tokens = 8
[prompt]
prefix = "Items:"
separator = ""
suffix = "\nNext:"
[train]
lora_rank = 4
lora_alpha = 8.0
lora_dropout = 0.0
lr = 1e-3
token_lr = 1e-2
epochs = 30.0
micro_batch = 16
checkpoint_every = 8
[ilrec]
k = 1
mu = 0.5
[sasrec]
hidden = 16
epochs = 3
batch = 8
[eval]
beam = 8
top_k = 8
"#,
        model = model.display(),
        data = data.display(),
        out = out.display()
    );
    toml::from_str(&text).unwrap()
}

#[test]
fn ilrec_job_end_to_end() {
    let model = repo().join("weights/smollm2-135m");
    if !model.join("config.json").exists() {
        return skip("ilrec_job_end_to_end", "weights/smollm2-135m absent (run scripts/fetch-smollm2.sh)");
    }
    let tmp = tempfile::tempdir().unwrap();
    write_dataset(tmp.path());
    let out = tmp.path().join("run");
    let cfg = config(&model, tmp.path(), &out);
    let mut logs = Vec::new();
    let mut reports: Vec<StepReport> = Vec::new();
    run_train(&cfg, &mut |m| logs.push(m.to_string()), &mut |r| reports.push(r.clone())).unwrap();
    // 24 users x 8 items: 5 training prefixes each (k = 2..=6) -> 120 samples; 6 epochs of 16.
    assert_eq!(reports.len(), 225, "{logs:?}");
    assert!(reports.iter().all(|r| r.stats.crr > 0.0 && r.stats.cpd > 0.0), "CRR and CPD active in every step");
    assert!(out.join("sasrec.safetensors").exists() && out.join("adapter/adapter_config.json").exists());
    assert!(logs.iter().any(|l| l.contains("CRR rewards")), "{logs:?}");

    // A rerun finds the finished checkpoint and trains no further step.
    let mut again = 0;
    run_train(&cfg, &mut |_| {}, &mut |_| again += 1).unwrap();
    assert_eq!(again, 0);

    let m = run_eval(&cfg, "test", &mut |_, _| {}).unwrap();
    assert_eq!(m.n, 24);
    assert!((0.0..=1.0).contains(&m.hit10) && m.hit5 <= m.hit10 && m.ndcg10 <= m.hit10);
    let s = run_sasrec(&cfg, "test", &mut |_| {}).unwrap();
    assert_eq!(s.n, 24);

    let run = TrainedRun::load(&cfg).unwrap();
    // The next item is a function of the last two: after 6 epochs the trained run must rank
    // the training targets first far above chance (1/10), which proves that evaluation sees
    // what training learned (prompts, token rows, adapter merge, trie).
    let train = &run.split.train;
    let hists: Vec<&[u32]> = train.iter().map(|s| s.history.as_slice()).collect();
    let recs = run.recommend(&hists).unwrap();
    let top1 = train.iter().zip(&recs).filter(|(s, r)| r[0].0 == s.target).count() as f64 / train.len() as f64;
    println!("training-sample top-1 accuracy after 6 epochs: {top1:.3}");
    let losses: Vec<String> = reports.iter().step_by(4).map(|r| format!("{:.3}", r.stats.loss)).collect();
    assert!(top1 > 0.5, "top-1 on training samples {top1}; losses {losses:?}");
    let recs = run.recommend(&[&[0, 1, 2], &[7]]).unwrap();
    for r in &recs {
        assert_eq!(r.len(), 8, "beam 8 over 10 items gives 8 distinct items");
        let mut items: Vec<u32> = r.iter().map(|x| x.0).collect();
        assert!(r.windows(2).all(|w| w[0].1 >= w[1].1), "ranked by score");
        items.sort_unstable();
        items.dedup();
        assert_eq!(items.len(), 8);
        assert!(items.iter().all(|&i| i < 10));
    }
    assert!(run.recommend(&[&[10]]).is_err(), "unknown history item");
}

#[test]
fn config_errors_name_the_field() {
    let model = repo().join("weights/smollm2-135m");
    if !model.join("config.json").exists() {
        return skip("config_errors_name_the_field", "weights/smollm2-135m absent (run scripts/fetch-smollm2.sh)");
    }
    let tmp = tempfile::tempdir().unwrap();
    write_dataset(tmp.path());
    for (edit, field) in [
        (Box::new(|c: &mut RunConfig| c.model_blocks = 99) as Box<dyn Fn(&mut RunConfig)>, "model_blocks"),
        (Box::new(|c: &mut RunConfig| c.ilrec.negatives = "middle".into()), "ilrec.negatives"),
        (Box::new(|c: &mut RunConfig| c.ilrec.k = 2), "ilrec.k"),
    ] {
        let mut cfg = config(&model, tmp.path(), &tmp.path().join("bad"));
        edit(&mut cfg);
        let e = run_train(&cfg, &mut |_| {}, &mut |_| {}).unwrap_err().to_string();
        assert!(e.contains(field), "{field}: {e}");
    }
    let e = toml::from_str::<RunConfig>("[train]\ntoken_rate = 1.0\n").unwrap_err().to_string();
    assert!(e.contains("token_rate"), "{e}");
}

#[test]
fn most_popular_counts_training_interactions() {
    let tmp = tempfile::tempdir().unwrap();
    // u0: a b c d (train part: a b); u1: b c a (train part: b); u2: a e (dropped: < 3 items).
    let rows = [("u0", "a", 1), ("u0", "b", 2), ("u0", "c", 3), ("u0", "d", 4), ("u1", "b", 1), ("u1", "c", 2), ("u1", "a", 3), ("u2", "a", 1), ("u2", "e", 2)];
    let mut inter = String::from("user_id:token\titem_id:token\ttimestamp:float\n");
    for (u, i, t) in rows {
        writeln!(inter, "{u}\t{i}\t{t}").unwrap();
    }
    std::fs::write(tmp.path().join("p.inter"), inter).unwrap();
    let ds = ilrec::rec::data::load_recbole(tmp.path(), "p").unwrap();
    let idx = ds.item_index();
    let order: Vec<&str> = ilrec::rec::pipeline::most_popular(&ds).iter().map(|&i| ds.items[i as usize].raw_id.as_str()).collect();
    // b: 2, a: 1, then c, d, e by dense id.
    let mut rest: Vec<&str> = vec!["c", "d", "e"];
    rest.sort_by_key(|r| idx[r]);
    assert_eq!(order, [vec!["b", "a"], rest].concat());
}

#[test]
fn title_mode_end_to_end() {
    let model = repo().join("weights/smollm2-135m");
    if !model.join("config.json").exists() {
        return skip("title_mode_end_to_end", "weights/smollm2-135m absent (run scripts/fetch-smollm2.sh)");
    }
    let tmp = tempfile::tempdir().unwrap();
    write_dataset(tmp.path());
    // Two items share a title and one title prefixes another: the trie still has one leaf each.
    let item = std::fs::read_to_string(tmp.path().join("toy.item")).unwrap().replace("coffee cup", "tea cup").replace("new book", "old book shelf");
    std::fs::write(tmp.path().join("toy.item"), item).unwrap();
    let out = tmp.path().join("run");
    let mut cfg = config(&model, tmp.path(), &out);
    cfg.ids.kind = "title".into();
    cfg.prompt = ilrec::rec::prompt::PromptTemplate { prefix: "Items: ".into(), separator: "; ".into(), suffix: "\nNext: ".into() };
    cfg.train.epochs = 1.0;
    let ds = ilrec::rec::data::load_recbole(tmp.path(), "toy").unwrap();
    let names = ilrec::rec::pipeline::title_identifiers(&ds);
    let idx = ds.item_index();
    assert_eq!(names[idx["i8"] as usize], "tea cup");
    assert_eq!(names[idx["i9"] as usize], "tea cup (2)");
    let mut reports: Vec<StepReport> = Vec::new();
    run_train(&cfg, &mut |_| {}, &mut |r| reports.push(r.clone())).unwrap();
    assert_eq!(reports.len(), 8);
    // Title tokens are item rows (ILRec terms), EOS a plain row.
    assert!(reports.iter().all(|r| r.stats.cpo > 0.0 && r.stats.crr > 0.0 && r.stats.ce > 0.0));
    assert!(!out.join("semantic_ids.json").exists(), "title mode adds no tokens");
    let run = TrainedRun::load(&cfg).unwrap();
    let recs = run.recommend(&[&[0, 1, 2]]).unwrap();
    let mut items: Vec<u32> = recs[0].iter().map(|x| x.0).collect();
    items.sort_unstable();
    items.dedup();
    assert_eq!(items.len(), 8, "8 distinct valid items from beam 8");
    assert!(items.iter().all(|&i| i < 10));
}
