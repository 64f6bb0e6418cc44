//! Item trie, trie-constrained beam search (against exhaustive scoring with the full forward)
//! and ranking metrics.
mod common;

use ilrec::rec::beam::{recommend, search, BeamOptions, Decoder, Recommendation};
use ilrec::rec::metrics::{hit_at_k, ndcg_at_k, Metrics};
use ilrec::rec::trie::ItemTrie;
use ilrec::rng::Rng;
use ilrec::{Batch, Error, ForwardOptions, LogitsMode, Model};
use std::collections::BTreeSet;
use std::time::Instant;

/// Tiny-model vocabulary is 311 tokens; 310 plays EOS (the item terminator).
const TERM: u32 = 310;

fn model() -> Model {
    Model::load(&common::fixture("tiny-llama")).expect("tiny-llama fixture")
}

fn input_err(r: Result<ItemTrie, Error>) -> String {
    match r {
        Err(Error::Input(m)) => m,
        other => panic!("expected Error::Input, got {other:?}"),
    }
}

// ---------------------------------------------------------------- trie

/// Every node's `items_under` equals, as a list, the items whose sequences start with the
/// node's prefix, in sequence order; children are sorted; leaves are exactly the items.
fn check_trie(trie: &ItemTrie, items: &[Vec<u32>]) {
    assert_eq!(trie.num_items(), items.len());
    assert_eq!(trie.max_len(), items.iter().map(Vec::len).max().unwrap());
    let mut by_seq: Vec<u32> = (0..items.len() as u32).collect();
    by_seq.sort_by(|&a, &b| items[a as usize].cmp(&items[b as usize]));
    assert_eq!(trie.items_in_order(), &by_seq[..]);
    let mut leaves = 0;
    for node in 0..trie.num_nodes() as u32 {
        let prefix = trie.prefix(node);
        assert_eq!(prefix.len(), trie.depth(node));
        assert_eq!(trie.walk(&prefix), Some(node));
        let want: Vec<u32> = by_seq.iter().copied().filter(|&i| items[i as usize].starts_with(&prefix)).collect();
        assert_eq!(trie.items_under(node), &want[..], "items under node {node} (prefix {prefix:?})");
        let kids = trie.children(node);
        assert!(kids.windows(2).all(|w| w[0].0 < w[1].0), "children of node {node} not sorted: {kids:?}");
        for &(tok, child) in kids {
            assert_eq!(trie.child(node, tok), Some(child));
            assert_eq!(trie.parent(child), Some(node));
        }
        match trie.item(node) {
            Some(it) => {
                leaves += 1;
                assert!(kids.is_empty());
                assert_eq!(items[it as usize], prefix);
                assert_eq!(trie.leaf(it), Some(node));
            }
            None => assert!(!kids.is_empty(), "inner node {node} without children"),
        }
    }
    assert_eq!(leaves, items.len());
    for (i, seq) in items.iter().enumerate() {
        assert_eq!(trie.sequence(i as u32).as_ref(), Some(seq));
    }
}

#[test]
fn trie_structure_and_ranges() {
    let items = vec![vec![5, 2, 9], vec![1, 7, 9], vec![5, 1, 9], vec![1, 7, 3, 9], vec![5, 2, 4, 9], vec![0, 9]];
    let trie = ItemTrie::new(&items).unwrap();
    check_trie(&trie, &items);
    assert_eq!(trie.children(trie.root()).iter().map(|c| c.0).collect::<Vec<_>>(), vec![0, 1, 5]);
    let n5 = trie.child(trie.root(), 5).unwrap();
    assert_eq!(trie.items_under(n5), &[2, 4, 0]); // [5,1,9] < [5,2,4,9] < [5,2,9]
    assert_eq!(trie.child(n5, 3), None);
    assert_eq!(trie.walk(&[1, 7, 3, 9]).and_then(|n| trie.item(n)), Some(3));
    assert_eq!(trie.item(trie.root()), None);
    assert_eq!(trie.parent(trie.root()), None);
    assert_eq!(trie.max_token(), 9);

    let mut rng = Rng::new(7);
    for _ in 0..5 {
        let items = random_items(&mut rng, 60, true);
        check_trie(&ItemTrie::new(&items).unwrap(), &items);
    }
}

#[test]
fn trie_rejects_bad_item_sets() {
    let m = input_err(ItemTrie::new(&[vec![1, 2, 9], vec![3, 9], vec![1, 2, 9]]));
    assert!(m.contains("items 0 and 2") && m.contains("same"), "{m}");
    let m = input_err(ItemTrie::new(&[vec![4, 4, 4], vec![1, 2, 3], vec![1, 2]]));
    assert!(m.contains("item 2") && m.contains("prefix of item 1"), "{m}");
    let m = input_err(ItemTrie::new(&[vec![1, 2], vec![], vec![3]]));
    assert!(m.contains("item 1") && m.contains("empty"), "{m}");
    let m = input_err(ItemTrie::new(&[]));
    assert!(m.contains("no items"), "{m}");
}

// ---------------------------------------------------------------- exhaustive reference

/// Random distinct item sequences ending with `TERM`: fixed length 3, or 2..=5 when
/// `variable`. The first token is drawn from a skewed distribution (uneven fan-out).
fn random_items(rng: &mut Rng, n: usize, variable: bool) -> Vec<Vec<u32>> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    while out.len() < n {
        let len = if variable { 2 + rng.below(4) } else { 3 };
        let first = [3u32, 3, 3, 3, 3, 3, 40, 40, 40, 77, 120, 250][rng.below(12)];
        let mut seq = vec![first];
        for _ in 1..len - 1 {
            // Second level skewed too: most items share a few codes.
            let t = if rng.below(3) == 0 { 10 + rng.below(3) as u32 } else { rng.below(300) as u32 };
            seq.push(t);
        }
        seq.push(TERM);
        if seen.insert(seq.clone()) {
            out.push(seq);
        }
    }
    out
}

fn random_prompt(rng: &mut Rng, len: usize) -> Vec<u32> {
    (0..len).map(|_| rng.below(300) as u32).collect()
}

/// Each item's sum of log-softmax (computed here in f64) of its tokens after `prompt`, by
/// teacher forcing in one full forward (no cache).
fn exhaustive_scores(model: &Model, prompt: &[u32], items: &[Vec<u32>]) -> Vec<f64> {
    let seqs: Vec<Vec<u32>> = items.iter().map(|it| prompt.iter().chain(it).copied().collect()).collect();
    let batch = Batch::right_padded(&seqs, 0).unwrap();
    let fo = ForwardOptions { logits: LogitsMode::All, ..Default::default() };
    let logits = model.forward(&batch, &fo).unwrap().logits.unwrap().into_f32_vec();
    let (t, v) = (batch.seq, model.config.vocab_size);
    items
        .iter()
        .enumerate()
        .map(|(b, it)| {
            let mut s = 0.0f64;
            for (j, &tok) in it.iter().enumerate() {
                let row = &logits[(b * t + prompt.len() - 1 + j) * v..(b * t + prompt.len() + j) * v];
                let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
                let lse = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
                s += row[tok as usize] as f64 - lse;
            }
            s
        })
        .collect()
}

/// Items by exhaustive score, best first.
fn exhaustive_ranking(scores: &[f64]) -> Vec<u32> {
    let mut r: Vec<u32> = (0..scores.len() as u32).collect();
    r.sort_by(|&a, &b| scores[b as usize].total_cmp(&scores[a as usize]).then(a.cmp(&b)));
    r
}

/// `got` is exactly the first `got.len()` of the exhaustive ranking (positions may only differ
/// between items whose exhaustive scores are within 1e-6: float noise between the cached and
/// full forwards), and every score matches its exhaustive score within 1e-4.
fn assert_exact(got: &[Recommendation], scores: &[f64], k: usize, ctx: &str) {
    let want = exhaustive_ranking(scores);
    assert_eq!(got.len(), k.min(scores.len()), "{ctx}: number of items");
    for (i, r) in got.iter().enumerate() {
        let same = r.item == want[i] || (scores[r.item as usize] - scores[want[i] as usize]).abs() < 1e-6;
        assert!(same, "{ctx}: rank {i}: got item {} ({}), exhaustive {} ({})", r.item, scores[r.item as usize], want[i], scores[want[i] as usize]);
        assert!((r.score as f64 - scores[r.item as usize]).abs() < 1e-4, "{ctx}: item {} score {} vs {}", r.item, r.score, scores[r.item as usize]);
    }
}

/// Valid, distinct, descending, exactly scored.
fn assert_valid(got: &[Recommendation], trie: &ItemTrie, scores: &[f64], k: usize, ctx: &str) {
    assert_eq!(got.len(), k.min(trie.num_items()), "{ctx}: number of items");
    let mut seen = BTreeSet::new();
    for r in got {
        assert!((r.item as usize) < trie.num_items(), "{ctx}: item {} is not in the trie", r.item);
        assert!(trie.leaf(r.item).is_some_and(|l| trie.is_leaf(l)));
        assert!(seen.insert(r.item), "{ctx}: item {} returned twice", r.item);
        assert!((r.score as f64 - scores[r.item as usize]).abs() < 1e-4, "{ctx}: item {} score {} vs {}", r.item, r.score, scores[r.item as usize]);
    }
    assert!(got.windows(2).all(|w| w[0].score >= w[1].score), "{ctx}: not sorted");
}

fn run_case(model: &Model, seed: u64, variable: bool) {
    let mut rng = Rng::new(seed);
    let items = random_items(&mut rng, 40, variable);
    let trie = ItemTrie::new(&items).unwrap();
    let prompts: Vec<Vec<u32>> = [5usize, 9, 2].iter().map(|&l| random_prompt(&mut rng, l)).collect();
    let scores: Vec<Vec<f64>> = prompts.iter().map(|p| exhaustive_scores(model, p, &items)).collect();

    // beam >= items: nothing is pruned, the full ranking comes back.
    let full = recommend(model, &trie, &prompts, &BeamOptions { beam: 40, top_k: 40, max_rows: 256 }).unwrap();
    // beam >= items, top 10 only (variable lengths: early stop once the top 10 are settled).
    let top10 = recommend(model, &trie, &prompts, &BeamOptions { beam: 48, top_k: 10, max_rows: 256 }).unwrap();
    // small beam: valid items, exact scores.
    let small = recommend(model, &trie, &prompts, &BeamOptions { beam: 5, top_k: 5, max_rows: 256 }).unwrap();
    for u in 0..prompts.len() {
        let ctx = format!("seed {seed}, variable {variable}, user {u}");
        assert_exact(&full[u], &scores[u], 40, &format!("{ctx}, beam 40"));
        assert_exact(&top10[u], &scores[u], 10, &format!("{ctx}, beam 48 top 10"));
        assert_valid(&small[u], &trie, &scores[u], 5, &format!("{ctx}, beam 5"));
    }
}

#[test]
fn beam_matches_exhaustive_fixed_length() {
    let model = model();
    for seed in [1, 2] {
        run_case(&model, seed, false);
    }
}

#[test]
fn beam_matches_exhaustive_variable_length() {
    let model = model();
    for seed in [3, 4] {
        run_case(&model, seed, true);
    }
}

#[test]
fn batched_users_equal_one_at_a_time() {
    let model = model();
    let mut rng = Rng::new(11);
    let items = random_items(&mut rng, 40, true);
    let trie = ItemTrie::new(&items).unwrap();
    let prompts: Vec<Vec<u32>> = [1usize, 7, 3, 12, 5].iter().map(|&l| random_prompt(&mut rng, l)).collect();
    let opts = BeamOptions { beam: 6, top_k: 4, max_rows: 256 };
    let batched = recommend(&model, &trie, &prompts, &opts).unwrap();
    // max_rows 12 = two users per chunk.
    let chunked = recommend(&model, &trie, &prompts, &BeamOptions { max_rows: 12, ..opts.clone() }).unwrap();
    assert_eq!(batched.len(), prompts.len());
    for (u, p) in prompts.iter().enumerate() {
        let alone = recommend(&model, &trie, std::slice::from_ref(p), &opts).unwrap().remove(0);
        for (name, other) in [("batched", &batched[u]), ("chunked", &chunked[u])] {
            let got: Vec<u32> = other.iter().map(|r| r.item).collect();
            let want: Vec<u32> = alone.iter().map(|r| r.item).collect();
            assert_eq!(got, want, "user {u}: {name} vs alone");
            for (a, b) in other.iter().zip(&alone) {
                assert!((a.score - b.score).abs() < 1e-4, "user {u}: {name} score {} vs {}", a.score, b.score);
            }
        }
    }
    // Deterministic: the same call gives bit-identical results.
    assert_eq!(recommend(&model, &trie, &prompts, &opts).unwrap(), batched);
}

#[test]
fn beam_rejects_bad_arguments() {
    let model = model();
    let trie = ItemTrie::new(&[vec![1, TERM], vec![2, TERM]]).unwrap();
    let p = vec![vec![4, 5]];
    let bad = |opts: BeamOptions, prompts: &[Vec<u32>], trie: &ItemTrie| matches!(recommend(&model, trie, prompts, &opts), Err(Error::Input(_)));
    assert!(bad(BeamOptions { beam: 2, top_k: 3, max_rows: 8 }, &p, &trie));
    assert!(bad(BeamOptions { beam: 0, top_k: 0, max_rows: 8 }, &p, &trie));
    assert!(bad(BeamOptions::default(), &[vec![4], vec![]], &trie));
    let outside = ItemTrie::new(&[vec![1, 311]]).unwrap();
    assert!(bad(BeamOptions::default(), &p, &outside));
    let long = vec![vec![1u32; 256]]; // + 1 fed item token > 256 positions
    assert!(bad(BeamOptions::default(), &long, &trie));
    // Fewer items than the beam: all of them, nothing invented.
    let r = recommend(&model, &trie, &p, &BeamOptions::default()).unwrap();
    assert_eq!(r[0].iter().map(|r| r.item).collect::<BTreeSet<_>>(), BTreeSet::from([0, 1]));
    assert!(recommend(&model, &trie, &[], &BeamOptions::default()).unwrap().is_empty());
}

// ---------------------------------------------------------------- tie-breaking

/// Uniform logits: every hypothesis ties, so only the tie-break rules decide.
struct Uniform {
    vocab: usize,
}

impl Decoder for Uniform {
    fn vocab_size(&self) -> usize {
        self.vocab
    }
    fn start(&mut self, prompts: &[Vec<u32>]) -> ilrec::Result<Vec<f32>> {
        Ok(vec![0.0; prompts.len() * self.vocab])
    }
    fn advance(&mut self, rows: &[usize], _tokens: &[u32]) -> ilrec::Result<Vec<f32>> {
        Ok(vec![0.0; rows.len() * self.vocab])
    }
}

#[test]
fn ties_prefer_lower_token_then_lower_beam() {
    // Step 1 keeps tokens 2 (beam 0) and 3 (beam 1), not 7. Step 2 ranks (token 0, beam 1) =
    // item 2, then (token 1, beam 0) = item 0, then (token 1, beam 1) = item 1.
    let items = vec![vec![2, 1], vec![3, 1], vec![3, 0], vec![7, 0]];
    let trie = ItemTrie::new(&items).unwrap();
    let opts = BeamOptions { beam: 2, top_k: 2, max_rows: 8 };
    let r = search(&mut Uniform { vocab: 10 }, &trie, &[vec![1], vec![1, 2]], &opts).unwrap();
    let want_score = (-2.0 * 10f64.ln()) as f32;
    for user in &r {
        // Equal scores are listed by item index.
        assert_eq!(user.iter().map(|r| r.item).collect::<Vec<_>>(), vec![0, 2]);
        assert!(user.iter().all(|r| (r.score - want_score).abs() < 1e-6));
    }
}

// ---------------------------------------------------------------- metrics

#[test]
fn metrics_on_hand_made_rankings() {
    let ranked: Vec<u32> = (100..120).collect();
    assert_eq!(hit_at_k(&ranked, 100, 5), 1.0);
    assert_eq!(hit_at_k(&ranked, 104, 5), 1.0);
    assert_eq!(hit_at_k(&ranked, 105, 5), 0.0);
    assert_eq!(hit_at_k(&ranked, 105, 10), 1.0);
    assert_eq!(hit_at_k(&ranked, 7, 10), 0.0);
    assert_eq!(ndcg_at_k(&ranked, 100, 5), 1.0);
    assert!((ndcg_at_k(&ranked, 101, 5) - 1.0 / 3f64.log2()).abs() < 1e-12);
    assert!((ndcg_at_k(&ranked, 109, 10) - 1.0 / 11f64.log2()).abs() < 1e-12);
    assert_eq!(ndcg_at_k(&ranked, 109, 5), 0.0);
    assert_eq!(ndcg_at_k(&ranked[..3], 105, 10), 0.0);

    // Users: target at rank 0, rank 2, rank 7, absent.
    let users: Vec<(Vec<u32>, u32)> = vec![(ranked.clone(), 100), (ranked.clone(), 102), (ranked.clone(), 107), (ranked.clone(), 1)];
    let m = Metrics::from_rankings(users.iter().map(|(r, t)| (&r[..], *t)));
    assert_eq!(m.n, 4);
    assert!((m.hit5 - 0.5).abs() < 1e-12);
    assert!((m.hit10 - 0.75).abs() < 1e-12);
    let (d0, d2, d7) = (1.0, 1.0 / 4f64.log2(), 1.0 / 9f64.log2());
    assert!((m.ndcg5 - (d0 + d2) / 4.0).abs() < 1e-12);
    assert!((m.ndcg10 - (d0 + d2 + d7) / 4.0).abs() < 1e-12);
    // Merging partial means is the mean over all users.
    let mut a = Metrics::from_rankings(users[..1].iter().map(|(r, t)| (&r[..], *t)));
    let b = Metrics::from_rankings(users[1..].iter().map(|(r, t)| (&r[..], *t)));
    a.merge(&b);
    assert!((a.ndcg10 - m.ndcg10).abs() < 1e-12 && a.n == 4);
    let json = serde_json::to_value(m).unwrap();
    assert_eq!(json["n"], 4);
    assert!(json["hit10"].as_f64().is_some());
}

// ---------------------------------------------------------------- timing

/// Beam 20 for 10 users over 4096 semantic-ID-like items (3 code levels of 16 + EOS).
#[test]
fn timing_beam20_ten_users() {
    let model = model();
    let mut items = Vec::new();
    for a in 0..16u32 {
        for b in 0..16u32 {
            for c in 0..16u32 {
                items.push(vec![100 + a, 150 + b, 200 + c, TERM]);
            }
        }
    }
    let trie = ItemTrie::new(&items).unwrap();
    let mut rng = Rng::new(5);
    let prompts: Vec<Vec<u32>> = (0..10).map(|u| random_prompt(&mut rng, 40 + 3 * u)).collect();
    let opts = BeamOptions { beam: 20, top_k: 10, max_rows: 256 };
    let t0 = Instant::now();
    let r = recommend(&model, &trie, &prompts, &opts).unwrap();
    let dt = t0.elapsed();
    println!("beam 20, 10 users, {} items: {:.1} ms", items.len(), dt.as_secs_f64() * 1e3);
    for user in &r {
        assert_eq!(user.len(), 10);
        assert!(user.iter().all(|x| (x.item as usize) < items.len()));
    }
}
