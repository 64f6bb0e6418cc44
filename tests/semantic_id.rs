//! Semantic IDs (engine/rec/semantic_id.rs, docs/semantic_ids.md): k-means and residual
//! k-means, disambiguation, LC-Rec index parsing, the saved mapping, item embeddings on the tiny
//! fixture model, and new vocabulary rows in the model and tokenizer.
mod common;

use ilrec::model::{Batch, ForwardOptions, LogitsMode, Model};
use ilrec::rec::semantic_id::{
    add_item_tokens, assign_semantic_ids, collision_groups, item_embeddings, kmeans, normalize, parse_token, residual_kmeans, residual_kmeans_full,
    Normalization, SemanticIdConfig, SemanticIds, SEMANTIC_IDS_FILE,
};
use ilrec::rng::Rng;
use ilrec::weights::TextTokenizer;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// `blobs` well-separated Gaussian blobs of `per` points in `dim` dimensions (centres
/// N(0, 10^2) per coordinate, spread 0.1), points interleaved; returns points and true labels.
fn blobs(blobs: usize, per: usize, dim: usize, seed: u64) -> (Vec<f32>, Vec<usize>) {
    let mut rng = Rng::new(seed);
    let centres: Vec<f32> = (0..blobs * dim).map(|_| 10.0 * rng.normal()).collect();
    let (mut x, mut labels) = (Vec::new(), Vec::new());
    for i in 0..blobs * per {
        let b = (i * 7 + i / blobs) % blobs;
        labels.push(b);
        x.extend((0..dim).map(|d| centres[b * dim + d] + 0.1 * rng.normal()));
    }
    (x, labels)
}

fn random_points(n: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n * dim).map(|_| rng.normal()).collect()
}

/// Purity: the fraction of points whose cluster's majority label is their own label, and
/// the number of distinct clusters per true label must be one.
fn purity(assign: &[u32], labels: &[usize]) -> f64 {
    let mut counts: HashMap<u32, HashMap<usize, usize>> = HashMap::new();
    for (&a, &l) in assign.iter().zip(labels) {
        *counts.entry(a).or_default().entry(l).or_default() += 1;
    }
    let majority: usize = counts.values().map(|m| *m.values().max().unwrap()).sum();
    majority as f64 / assign.len() as f64
}

#[test]
fn kmeans_recovers_separated_blobs() {
    for seed in [1u64, 2, 3] {
        let (x, labels) = blobs(8, 30, 16, 100 + seed);
        let km = kmeans(&x, 16, 8, 50, &mut Rng::new(seed)).unwrap();
        assert_eq!(km.k, 8);
        assert_eq!(purity(&km.assign, &labels), 1.0, "seed {seed}");
        // One cluster per blob (purity 1.0 with exactly 8 clusters used).
        assert_eq!(km.assign.iter().collect::<HashSet<_>>().len(), 8, "seed {seed}");
        // Each centroid sits at its blob's mean (spread 0.1, 30 points).
        assert!(km.inertia / (x.len() as f64) < 0.02, "seed {seed}: inertia {}", km.inertia);
    }
    // Residual k-means: level 1 is the same clustering.
    let (x, labels) = blobs(8, 30, 16, 7);
    let codes = residual_kmeans(&x, 16, 2, 8, 50, 5).unwrap();
    let first: Vec<u32> = codes.iter().map(|c| c[0] as u32).collect();
    assert_eq!(purity(&first, &labels), 1.0);
}

#[test]
fn residual_levels_reduce_reconstruction_error() {
    let dim = 8;
    let x = random_points(400, dim, 11);
    let rk = residual_kmeans_full(&x, dim, 4, 16, 30, 3).unwrap();
    assert_eq!(rk.errors.len(), 5);
    for w in rk.errors.windows(2) {
        assert!(w[1] < w[0], "errors not decreasing: {:?}", rk.errors);
    }
    // The reported errors are those of the reconstruction sum of the chosen centroids.
    let n = 400;
    for levels in 1..=4 {
        let mut err = 0.0f64;
        for i in 0..n {
            for d in 0..dim {
                let rec: f32 = (0..levels).map(|l| rk.centroids[l][rk.codes[i][l] as usize * dim + d]).sum();
                err += ((x[i * dim + d] - rec) as f64).powi(2);
            }
        }
        let err = err / n as f64;
        assert!((err - rk.errors[levels]).abs() <= 1e-4 * rk.errors[levels], "level {levels}: {err} vs {}", rk.errors[levels]);
    }
    println!("residual errors: {:?}", rk.errors);
}

#[test]
fn residual_kmeans_is_deterministic_per_seed() {
    let x = random_points(300, 6, 5);
    let a = residual_kmeans(&x, 6, 3, 12, 20, 9).unwrap();
    let b = residual_kmeans(&x, 6, 3, 12, 20, 9).unwrap();
    assert_eq!(a, b);
    let c = residual_kmeans(&x, 6, 3, 12, 20, 10).unwrap();
    assert_ne!(a, c, "a different seed gave the same codes");
    let cfg = SemanticIdConfig { levels: 2, codes: 10, iters: 20, seed: 4, normalization: Normalization::Standardize };
    assert_eq!(assign_semantic_ids(&x, 6, &cfg).unwrap(), assign_semantic_ids(&x, 6, &cfg).unwrap());
}

#[test]
fn fewer_items_than_codes_and_bad_input() {
    let x = random_points(5, 4, 1);
    let rk = residual_kmeans_full(&x, 4, 2, 256, 10, 1).unwrap();
    // Five distinct points in five clusters: every level-1 code distinct, no residual left,
    // so level 2 (all residuals zero, one distinct point) forms a single cluster.
    assert_eq!(rk.sizes, vec![5, 1]);
    assert_eq!(rk.codes.iter().map(|c| c[0]).collect::<HashSet<_>>().len(), 5);
    assert!(rk.errors[1] < 1e-12);
    assert!(residual_kmeans(&x, 3, 2, 4, 10, 1).is_err(), "20 values with dimension 3");
    assert!(residual_kmeans(&x, 4, 2, 0, 10, 1).is_err());
    assert!(residual_kmeans(&x, 4, 2, 70000, 10, 1).is_err());
    let mut bad = x.clone();
    bad[7] = f32::NAN;
    let e = residual_kmeans(&bad, 4, 2, 4, 10, 1).unwrap_err().to_string();
    assert!(e.contains("point 1 dimension 3"), "{e}");
}

#[test]
fn disambiguation_makes_duplicates_unique() {
    // 40 distinct points, item i repeats point i % 40 with a multiplicity up to 4 (forced
    // collisions: identical embeddings always share every k-means code).
    let dim = 6;
    let base = random_points(40, dim, 21);
    let mut x = Vec::new();
    let mut src = Vec::new();
    for i in 0..100 {
        let p = (i * 13) % 40;
        src.push(p);
        x.extend_from_slice(&base[p * dim..(p + 1) * dim]);
    }
    let max_mult = {
        let mut m: HashMap<usize, usize> = HashMap::new();
        src.iter().for_each(|&p| *m.entry(p).or_default() += 1);
        *m.values().max().unwrap()
    };
    assert!(max_mult >= 2);
    let cfg = SemanticIdConfig { levels: 2, codes: 8, iters: 20, seed: 1, normalization: Normalization::L2 };
    let ids = assign_semantic_ids(&x, dim, &cfg).unwrap();
    assert_eq!(ids.num_items(), 100);
    assert_eq!(ids.num_levels(), 3);
    let tuples: HashSet<&Vec<u16>> = ids.codes.iter().collect();
    assert_eq!(tuples.len(), 100, "tuples not unique");
    // 8 x 8 = 64 prefixes for 100 items: collisions beyond duplicates too. The last level
    // numbers each prefix group 0, 1, 2, ... in item order, and its size is the largest group.
    let mut groups: HashMap<&[u16], Vec<usize>> = HashMap::new();
    for (i, c) in ids.codes.iter().enumerate() {
        groups.entry(&c[..2]).or_default().push(i);
    }
    let largest = groups.values().map(Vec::len).max().unwrap();
    assert!(largest >= max_mult);
    assert_eq!(ids.levels[2], largest);
    for g in groups.values() {
        for (k, &i) in g.iter().enumerate() {
            assert_eq!(ids.codes[i][2] as usize, k);
        }
    }
    // Duplicated embeddings share their first two codes.
    for i in 0..100 {
        for j in 0..i {
            if src[i] == src[j] {
                assert_eq!(ids.codes[i][..2], ids.codes[j][..2]);
            }
        }
    }
    assert!(collision_groups(&ids.codes).is_empty());
}

#[test]
fn normalization_modes() {
    let mut x = vec![1.0, 100.0, 5.0, 3.0, 300.0, 5.0];
    normalize(&mut x, 3, Normalization::Standardize);
    assert_eq!(x, vec![-1.0, -1.0, 0.0, 1.0, 1.0, 0.0]);
    let mut y = vec![3.0, 4.0, 0.0, 0.0];
    normalize(&mut y, 2, Normalization::L2);
    assert_eq!(y, vec![0.6, 0.8, 0.0, 0.0]);
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|t| t.to_string()).collect()
}

#[test]
fn token_strings_ids_and_file_round_trip() {
    let ids = SemanticIds::new(vec![3, 2, 4], vec![vec![0, 1, 3], vec![2, 0, 0], vec![2, 1, 0]]).unwrap();
    assert_eq!(ids.token_strings(0), s(&["<a_0>", "<b_1>", "<c_3>"]));
    assert_eq!(ids.id_string(1), "<a_2><b_0><c_0>");
    let all = ids.all_tokens();
    assert_eq!(all, s(&["<a_0>", "<a_1>", "<a_2>", "<b_0>", "<b_1>", "<c_0>", "<c_1>", "<c_2>", "<c_3>"]));
    for item in 0..3 {
        let tids = ids.token_ids(item, 100);
        let strs: Vec<String> = tids.iter().map(|&t| all[(t - 100) as usize].clone()).collect();
        assert_eq!(strs, ids.token_strings(item));
        assert_eq!(ids.all_token_ids(100)[item], tids);
    }
    assert_eq!(parse_token("<c_200>"), Some((2, 200)));
    for bad in ["<a_x>", "<a_>", "<a_01>", "<a_-1>", "<a_70000>", "a_1", "<A_1>", "<ab_1>", "<a_1"] {
        assert_eq!(parse_token(bad), None, "{bad}");
    }

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(SEMANTIC_IDS_FILE);
    ids.save(&path).unwrap();
    assert_eq!(SemanticIds::load(&path).unwrap(), ids);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 1, "temporary files left: {leftovers:?}");

    // Invalid mappings are rejected when built and when loaded.
    assert!(SemanticIds::new(vec![3, 2], vec![vec![0, 2]]).unwrap_err().to_string().contains("item 0 has code 2 at level 1"));
    let e = SemanticIds::new(vec![3, 2], vec![vec![0, 1], vec![1, 1], vec![0, 1]]).unwrap_err().to_string();
    assert!(e.contains("items 0 and 2 share the ID <a_0><b_1>"), "{e}");
    std::fs::write(&path, r#"{"format":"ilrec-semantic-ids","version":1,"levels":[2],"codes":[[0],[5]]}"#).unwrap();
    let e = SemanticIds::load(&path).unwrap_err().to_string();
    assert!(e.contains("semantic_ids.json") && e.contains("codes") && e.contains("item 1"), "{e}");
    std::fs::write(&path, r#"{"format":"other","version":1,"levels":[2],"codes":[[0]]}"#).unwrap();
    assert!(SemanticIds::load(&path).unwrap_err().to_string().contains("format"));
    std::fs::write(&path, "{").unwrap();
    assert!(SemanticIds::load(&path).is_err());
}

#[test]
fn lcrec_index_parsing() {
    let good = vec![s(&["<a_12>", "<b_3>", "<c_200>", "<d_7>"]), s(&["<a_0>", "<b_3>", "<c_200>", "<d_7>"])];
    let ids = SemanticIds::from_lcrec_index(good.clone()).unwrap();
    assert_eq!(ids.levels, vec![13, 4, 201, 8]);
    assert_eq!(ids.codes, vec![vec![12, 3, 200, 7], vec![0, 3, 200, 7]]);
    assert_eq!(ids.token_strings(0), good[0]);

    let err = |map: Vec<Vec<String>>| SemanticIds::from_lcrec_index(map).unwrap_err().to_string();
    let e = err(vec![good[0].clone(), s(&["<a_x>", "<b_3>", "<c_2>", "<d_7>"])]);
    assert!(e.contains("item 1") && e.contains("\"<a_x>\""), "{e}");
    let e = err(vec![s(&["<q_1>", "<b_3>"])]);
    assert!(e.contains("item 0") && e.contains("\"<q_1>\"") && e.contains("<a_N>"), "{e}");
    let e = err(vec![good[0].clone(), s(&["<a_1>", "<c_3>", "<b_2>", "<d_7>"])]);
    assert!(e.contains("item 1") && e.contains("\"<c_3>\"") && e.contains("position 1"), "{e}");
    let e = err(vec![good[0].clone(), s(&["<a_1>", "<b_3>", "<c_2>"])]);
    assert!(e.contains("item 1 has 3 tokens"), "{e}");
    let e = err(vec![good[0].clone(), s(&["<a_1>", "<b_3>", "<c_2>", "<d_07>"])]);
    assert!(e.contains("\"<d_07>\""), "{e}");
    // Shared tuples: an error as is, an appended level when asked.
    let dup = vec![good[0].clone(), good[1].clone(), good[0].clone()];
    let e = err(dup.clone());
    assert!(e.contains("items 0 and 2 share the ID <a_12><b_3><c_200><d_7>"), "{e}");
    let ids = SemanticIds::from_lcrec_index_disambiguated(dup).unwrap();
    assert_eq!(ids.levels, vec![13, 4, 201, 8, 2]);
    assert_eq!(ids.token_strings(2), s(&["<a_12>", "<b_3>", "<c_200>", "<d_7>", "<e_1>"]));
    assert_eq!(ids.codes[1][4], 0);
    // Without collisions, the disambiguated form is the index as is.
    assert_eq!(SemanticIds::from_lcrec_index_disambiguated(good.clone()).unwrap(), SemanticIds::from_lcrec_index(good).unwrap());
}

fn recdata() -> PathBuf {
    common::repo().join("../shared/recdata")
}

#[test]
fn lcrec_microlens_index() {
    let path = recdata().join("Microlens_LCRec/Microlens.index.json");
    if !path.exists() {
        return common::skip("lcrec_microlens_index", &format!("{} absent", path.display()));
    }
    let raw: HashMap<String, Vec<String>> = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let n = raw.len();
    assert_eq!(n, 5312);
    let map: Vec<Vec<String>> = (0..n).map(|i| raw[&i.to_string()].clone()).collect();
    // The published index is not collision-free: 151 items share 59 of its tuples (items 96,
    // 908 and 4165 all have <a_28><b_126><c_151><d_110>, for instance).
    let e = SemanticIds::from_lcrec_index(map.clone()).unwrap_err().to_string();
    assert!(e.contains("items 96 and 908 share the ID <a_28><b_126><c_151><d_110>") && e.contains("59 IDs are shared by 151 items"), "{e}");
    let ids = SemanticIds::from_lcrec_index_disambiguated(map.clone()).unwrap();
    assert_eq!(ids.num_items(), 5312);
    assert_eq!(ids.levels.len(), 5);
    assert_eq!(ids.levels[4], 6, "largest group");
    assert_eq!(ids.codes.iter().collect::<HashSet<_>>().len(), 5312);
    for (i, toks) in map.iter().enumerate() {
        assert_eq!(&ids.token_strings(i)[..4], &toks[..], "item {i}");
    }
    assert_eq!(ids.token_strings(4165)[4], "<e_2>");
    println!("Microlens index: levels {:?}, {} tokens", ids.levels, ids.num_tokens());
}

fn tiny(name: &str) -> Model {
    Model::load(&common::fixture(name)).unwrap()
}

fn texts(vocab: u32) -> Vec<Vec<u32>> {
    let mut rng = Rng::new(77);
    [5usize, 9, 3, 7, 1].iter().map(|&len| (0..len).map(|_| rng.below(vocab as usize) as u32).collect()).collect()
}

#[test]
fn item_embeddings_match_manual_mean_and_ignore_batching() {
    let model = tiny("tiny-llama");
    let (h, layers) = (model.config.hidden_size, model.config.num_layers);
    let t = texts(model.config.vocab_size as u32);
    let mut calls = Vec::new();
    let mut cb = |done: usize, total: usize| calls.push((done, total));
    let e1 = item_embeddings(&model, &t, 1, 64, Some(&mut cb)).unwrap();
    assert_eq!(calls.last(), Some(&(5, 5)));
    assert_eq!(calls.len(), 5);
    assert_eq!(e1.len(), 5 * h);
    // Item 1 (9 tokens) by hand: mean of the last block's tap over its tokens.
    let opts = ForwardOptions { logits: LogitsMode::None, taps: vec![layers], probe: None };
    let out = model.forward(&Batch::single(&t[1]), &opts).unwrap();
    let tap = out.hidden[0].1.to_f32_vec();
    let manual: Vec<f32> = (0..h).map(|d| (0..9).map(|p| tap[p * h + d]).sum::<f32>() / 9.0).collect();
    let err = common::rel_err(&e1[h..2 * h], &manual, |_| true);
    assert!(err < 1e-5, "manual mean: rel err {err}");
    // Batch sizes 2, 3 and 8 pad the shorter texts on the right.
    for b in [2, 3, 8] {
        let eb = item_embeddings(&model, &t, b, 64, None).unwrap();
        let err = common::rel_err(&eb, &e1, |_| true);
        assert!(err < 1e-5, "batch {b}: rel err {err}");
    }
    // Truncation to max_len keeps the first tokens.
    let e4 = item_embeddings(&model, &t, 3, 4, None).unwrap();
    let first4 = item_embeddings(&model, &[t[1][..4].to_vec()], 1, 64, None).unwrap();
    assert!(common::rel_err(&e4[h..2 * h], &first4, |_| true) < 1e-5);
    assert!(common::rel_err(&e4[2 * h..3 * h], &e1[2 * h..3 * h], |_| true) < 1e-5, "3-token item unaffected by max_len 4");
    // An empty text is named.
    let e = item_embeddings(&model, &[vec![1], vec![]], 2, 64, None).unwrap_err().to_string();
    assert!(e.contains("item 1 has no tokens"), "{e}");
    // End to end: IDs from these embeddings.
    let cfg = SemanticIdConfig { levels: 2, codes: 2, iters: 10, seed: 1, ..Default::default() };
    let ids = assign_semantic_ids(&e1, h, &cfg).unwrap();
    assert_eq!(ids.num_items(), 5);
    assert_eq!(ids.num_levels(), 3);
}

fn col_stats(rows: &[f32], h: usize) -> (Vec<f64>, Vec<f64>) {
    let n = (rows.len() / h) as f64;
    let mean: Vec<f64> = (0..h).map(|d| rows.chunks(h).map(|r| r[d] as f64).sum::<f64>() / n).collect();
    let std = (0..h).map(|d| (rows.chunks(h).map(|r| (r[d] as f64 - mean[d]).powi(2)).sum::<f64>() / n).sqrt()).collect();
    (mean, std)
}

fn logits(model: &Model, tokens: &[u32]) -> Vec<f32> {
    model.forward(&Batch::single(tokens), &ForwardOptions::default()).unwrap().logits.unwrap().to_f32_vec()
}

#[test]
fn add_tokens_keeps_old_logits_and_initialises_rows() {
    for (name, tied) in [("tiny-llama", false), ("tiny-qwen2", true)] {
        let mut model = tiny(name);
        assert_eq!(model.lm_head.is_none(), tied);
        let (h, v) = (model.config.hidden_size, model.config.vocab_size);
        let prompt: Vec<u32> = (0..6).map(|i| (i * 37 % v) as u32).collect();
        let before = logits(&model, &prompt);
        let old_embed = model.embed.clone();
        let old_head = model.head_weight().to_vec();

        let n = 512;
        let (embed_rows, head_rows) = model.new_token_rows(n, 5);
        assert_eq!(model.new_token_rows(n, 5), (embed_rows.clone(), head_rows.clone()), "{name}: not deterministic");
        assert_eq!(head_rows.is_none(), tied);
        let range = model.add_tokens(&embed_rows, head_rows.as_deref()).unwrap();
        assert_eq!(range, v as u32..(v + n) as u32);
        assert_eq!(model.config.vocab_size, v + n);
        assert_eq!(model.embed.len(), (v + n) * h);
        assert_eq!(model.head_weight().len(), (v + n) * h);
        assert_eq!(model.embed[..v * h], old_embed[..]);
        assert_eq!(model.embed[v * h..], embed_rows[..]);
        // New rows: per dimension, the old rows' mean plus N(0, (0.1 std)^2).
        for (what, old, new) in [("embedding", &old_embed, &model.embed[v * h..]), ("head", &old_head, &model.head_weight()[v * h..])] {
            let (om, os) = col_stats(old, h);
            let (nm, ns) = col_stats(new, h);
            let ratio: f64 = (0..h).map(|d| ns[d] / os[d]).sum::<f64>() / h as f64;
            assert!((ratio - Model::NEW_TOKEN_NOISE).abs() < 0.01, "{name} {what}: noise ratio {ratio}");
            for d in 0..h {
                assert!((nm[d] - om[d]).abs() < 4.0 * 0.1 * os[d] / (n as f64).sqrt() + 1e-7, "{name} {what}: mean of dimension {d}");
            }
        }
        // Old tokens' logits unchanged; the new tokens' logits exist and are finite.
        let after = logits(&model, &prompt);
        assert_eq!(after.len(), prompt.len() * (v + n));
        for p in 0..prompt.len() {
            let old = &before[p * v..(p + 1) * v];
            let new = &after[p * (v + n)..p * (v + n) + v];
            let err = common::rel_err(new, old, |_| true);
            assert!(err < 1e-6, "{name} position {p}: rel err {err}");
            assert!(after[p * (v + n) + v..(p + 1) * (v + n)].iter().all(|x| x.is_finite()));
        }
        // Forward with the new ids.
        let with_new = [prompt[0], v as u32, (v + n - 1) as u32, prompt[1]];
        let l = logits(&model, &with_new);
        assert_eq!(l.len(), 4 * (v + n));
        assert!(l.iter().all(|x| x.is_finite()));
        // Bad rows.
        assert!(model.add_tokens(&embed_rows[..h - 1], None).is_err());
        assert!(model.write_token_rows((v + n + 1) as u32, &embed_rows[..h], None).is_err());
        let mut nan = embed_rows[..h].to_vec();
        nan[3] = f32::NAN;
        assert!(model.add_tokens(&nan, None).unwrap_err().to_string().contains("dimension 3"));
        if tied {
            assert!(model.add_tokens(&embed_rows[..h], Some(&embed_rows[..h])).is_err());
        }
        assert_eq!(model.config.vocab_size, v + n, "{name}: failed calls changed the model");
    }
}

fn word_tokenizer(dir: &Path) -> TextTokenizer {
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "hello": 1, "world": 2, "<|im_end|>": 3}, "unk_token": "<unk>"}
    });
    std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
    TextTokenizer::load(dir).unwrap()
}

#[test]
fn tokenizer_add_tokens_and_item_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let mut tok = word_tokenizer(dir.path());
    assert_eq!(tok.vocab_size(), 4);
    let ids = tok.add_tokens(&s(&["<a_0>", "<a_1>", "<b_0>"])).unwrap();
    assert_eq!(ids, vec![4, 5, 6]);
    assert_eq!(tok.vocab_size(), 7);
    assert_eq!(tok.encode("<a_1><b_0>").unwrap(), vec![5, 6]);
    // Matched literally, before the lowercase normaliser: `<A_1>` is not `<a_1>` (and splits
    // into three unknown words).
    assert_eq!(tok.encode("hello <A_1> <a_1>world").unwrap(), vec![1, 0, 0, 0, 5, 2]);
    // (No decoder in this tokenizer: tokens are joined with spaces.)
    assert_eq!(tok.decode(&[5, 6], true).unwrap(), "<a_1> <b_0>");
    assert_eq!(tok.decode(&[1, 5, 6], false).unwrap(), "hello", "special tokens dropped");
    for bad in [s(&["hello"]), s(&["<a_0>"]), s(&["<c_0>", "<c_0>"]), s(&[""])] {
        assert!(tok.add_tokens(&bad).is_err(), "{bad:?}");
    }
    assert_eq!(tok.vocab_size(), 7, "failed calls changed the tokenizer");

    // Item tokens into a tokenizer smaller than the model (a padded embedding matrix): the new
    // tokens take the rows from the tokenizer's size on.
    let mut tok = word_tokenizer(dir.path());
    let mut model = tiny("tiny-llama");
    let (h, v) = (model.config.hidden_size, model.config.vocab_size);
    let sids = SemanticIds::new(vec![3, 2, 2], vec![vec![0, 1, 0], vec![2, 0, 1], vec![2, 0, 0]]).unwrap();
    let first = add_item_tokens(&mut model, &mut tok, &sids, 1).unwrap();
    assert_eq!(first, 4);
    assert_eq!(model.config.vocab_size, v, "rows reused inside the model's vocabulary");
    let (rows, _) = tiny("tiny-llama").new_token_rows(7, 1);
    assert_eq!(model.embed[4 * h..11 * h], rows[..]);
    for item in 0..3 {
        let text: String = sids.token_strings(item).concat();
        assert_eq!(tok.encode(&text).unwrap(), sids.token_ids(item, first), "item {item}");
    }
    // A tokenizer larger than the model is refused.
    let mut small = tiny("tiny-llama");
    small.config.vocab_size = 3;
    small.embed.truncate(3 * h);
    let mut tok = word_tokenizer(dir.path());
    assert!(add_item_tokens(&mut small, &mut tok, &sids, 1).is_err());
    assert_eq!(tok.vocab_size(), 4);
}

#[test]
fn smollm2_tokenizer_item_tokens() {
    let dir = common::repo().join("weights/smollm2-135m");
    if !dir.join("tokenizer.json").exists() {
        return common::skip("smollm2_tokenizer_item_tokens", "weights/smollm2-135m/tokenizer.json absent");
    }
    let mut tok = TextTokenizer::load(&dir).unwrap();
    let v = tok.vocab_size() as u32;
    let sids = SemanticIds::new(vec![256, 256, 256, 4], vec![vec![12, 3, 200, 0], vec![1, 2, 3, 3]]).unwrap();
    let ids = tok.add_tokens(&sids.all_tokens()).unwrap();
    assert_eq!(ids, (v..v + 772).collect::<Vec<_>>());
    let text = format!("items {}, {} in order", sids.id_string(0), sids.id_string(1));
    let enc = tok.encode(&text).unwrap();
    let want0 = sids.token_ids(0, v);
    let want1 = sids.token_ids(1, v);
    assert!(enc.windows(4).any(|w| w == want0) && enc.windows(4).any(|w| w == want1), "{enc:?}");
    assert_eq!(tok.decode(&want0, true).unwrap(), "<a_12><b_3><c_200><d_0>");
}

/// Scale check (not run by default): Microlens-sized input, 5312 items x 576 dimensions
/// (SmolLM2-135M's hidden size), 3 levels x 256 codes, 20 Lloyd iterations.
#[test]
#[ignore]
fn scale_microlens_sized() {
    let x = random_points(5312, 576, 1);
    let t = std::time::Instant::now();
    let ids = assign_semantic_ids(&x, 576, &SemanticIdConfig { iters: 20, ..Default::default() }).unwrap();
    println!("5312 x 576: {:?} in {:.1} s", ids.levels, t.elapsed().as_secs_f64());
}
