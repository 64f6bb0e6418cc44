//! The device-shaped beam search on the host: the flat trie against the pointer trie, and
//! `flat_search` (fixed slots, the algorithm of kernels/beam.cu) against the CPU beam search
//! `search` on random uneven tries, beam widths 1..=100, batched users, a random "model" and the
//! tiny Llama fixture. The CPU-equivalence check of issue 8.
mod common;

use ilrec::rec::beam::{flat_search, flat_step, search, BeamOptions, Decoder, FlatBeamState, ModelDecoder, Recommendation};
use ilrec::rec::trie::{FlatTrie, ItemTrie, NO_NODE};
use ilrec::rng::Rng;
use ilrec::{Error, Model};
use std::collections::BTreeSet;

const TERM: u32 = 310;

/// Distinct items ending with `TERM`, lengths 2..=6, skewed fan-out at every level (a few wide
/// nodes, many narrow ones) and one very wide first level.
fn uneven_items(rng: &mut Rng, n: usize) -> Vec<Vec<u32>> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    while out.len() < n {
        let len = 2 + rng.below(5);
        let mut seq = vec![if rng.below(2) == 0 { rng.below(4) as u32 } else { rng.below(300) as u32 }];
        for _ in 1..len - 1 {
            seq.push(if rng.below(3) == 0 { 10 + rng.below(2) as u32 } else { rng.below(300) as u32 });
        }
        seq.push(TERM);
        if seen.insert(seq.clone()) {
            out.push(seq);
        }
    }
    out
}

#[test]
fn flat_trie_equals_the_pointer_trie() {
    let mut rng = Rng::new(21);
    for n in [1usize, 2, 17, 300] {
        let items = uneven_items(&mut rng, n);
        let trie = ItemTrie::new(&items).unwrap();
        let flat = FlatTrie::new(&trie, 311).unwrap();
        assert_eq!(flat.num_nodes(), trie.num_nodes());
        assert_eq!(flat.max_len, trie.max_len());
        let mut fan = 0;
        for node in 0..trie.num_nodes() as u32 {
            let kids = trie.children(node);
            fan = fan.max(kids.len());
            let e = flat.edges(node);
            let got: Vec<(u32, u32)> = e.clone().map(|i| (flat.child_token[i], flat.child_node[i])).collect();
            assert_eq!(got, kids, "node {node}");
            assert_eq!(flat.item(node), trie.item(node));
            for t in 0..311u32 {
                assert_eq!(flat.child(node, t), trie.child(node, t), "node {node} token {t}");
            }
        }
        for t in 0..311u32 {
            assert_eq!(flat.first[t as usize], trie.child(0, t).unwrap_or(NO_NODE));
        }
        assert_eq!(flat.max_fanout, fan);
    }
}

fn input_err<T: std::fmt::Debug>(r: Result<T, Error>) -> String {
    match r {
        Err(Error::Input(m)) => m,
        other => panic!("expected Error::Input, got {other:?}"),
    }
}

#[test]
fn flat_trie_rejects_broken_arrays() {
    let items = vec![vec![5, 2, TERM], vec![1, 7, TERM], vec![5, 1, TERM]];
    let trie = ItemTrie::new(&items).unwrap();
    let m = input_err(FlatTrie::new(&trie, 100));
    assert!(m.contains("310") && m.contains("vocabulary"), "{m}");
    let good = FlatTrie::new(&trie, 311).unwrap();
    let broken = |f: &dyn Fn(&mut FlatTrie)| {
        let mut t = good.clone();
        f(&mut t);
        input_err(t.validate())
    };
    let m = broken(&|t| t.child_token.swap(0, 1));
    assert!(m.contains("not strictly increasing"), "{m}");
    let m = broken(&|t| t.child_node[0] = 0);
    assert!(m.contains("not a later node"), "{m}");
    let m = broken(&|t| t.node_item[1] = 0);
    assert!(m.contains("both children and item"), "{m}");
    let m = broken(&|t| t.first[5] = NO_NODE);
    assert!(m.contains("first-level table") && m.contains("token 5"), "{m}");
    let m = broken(&|t| t.child_start.pop().map(|_| ()).unwrap());
    assert!(m.contains("lengths"), "{m}");
    let m = broken(&|t| {
        let last = t.child_token.len() - 1;
        t.child_token[last] = 400;
    });
    assert!(m.contains("outside the vocabulary"), "{m}");
}

/// Logits that are a pseudo-random function of a row's whole token history (prompt + fed item
/// tokens), as a model's are: equal histories, equal rows, whatever the row order. Scale 3 with 1
/// in 50 entries pushed up by 8 (peaked rows).
struct HashModel {
    vocab: usize,
    hist: Vec<u64>,
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

impl HashModel {
    fn rows(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.hist.len() * self.vocab);
        for &h in &self.hist {
            for v in 0..self.vocab as u64 {
                let r = mix(h ^ v.wrapping_mul(0x9e3779b97f4a7c15));
                let x = ((r >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 6.0;
                out.push(if r.is_multiple_of(50) { x + 8.0 } else { x });
            }
        }
        out
    }
}

impl Decoder for HashModel {
    fn vocab_size(&self) -> usize {
        self.vocab
    }
    fn start(&mut self, prompts: &[Vec<u32>]) -> ilrec::Result<Vec<f32>> {
        self.hist = prompts.iter().map(|p| p.iter().fold(7u64, |h, &t| mix(h ^ t as u64))).collect();
        Ok(self.rows())
    }
    fn advance(&mut self, rows: &[usize], tokens: &[u32]) -> ilrec::Result<Vec<f32>> {
        self.hist = rows.iter().zip(tokens).map(|(&r, &t)| mix(self.hist[r] ^ (t as u64 + 1))).collect();
        Ok(self.rows())
    }
}

/// Valid (trie items, distinct, at most top_k) and identical to the reference, item for item and
/// score for score (both compute the same f64 sums from the same logits).
fn assert_same(got: &[Vec<Recommendation>], want: &[Vec<Recommendation>], n_items: usize, top_k: usize, ctx: &str) {
    assert_eq!(got.len(), want.len(), "{ctx}: users");
    for (u, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.len() <= top_k, "{ctx}: user {u} got {} items", g.len());
        let distinct: BTreeSet<u32> = g.iter().map(|r| r.item).collect();
        assert_eq!(distinct.len(), g.len(), "{ctx}: user {u}: an item twice");
        assert!(g.iter().all(|r| (r.item as usize) < n_items), "{ctx}: user {u}: invalid item");
        assert_eq!(g, w, "{ctx}: user {u}");
    }
}

#[test]
fn flat_search_equals_search_on_random_models() {
    let mut rng = Rng::new(5);
    let mut cases = 0;
    for (n_items, beams) in [(3usize, &[1usize, 2, 5][..]), (60, &[1, 3, 8, 20]), (400, &[1, 7, 20, 64, 100])] {
        for _ in 0..3 {
            let items = uneven_items(&mut rng, n_items);
            let trie = ItemTrie::new(&items).unwrap();
            let flat = FlatTrie::new(&trie, 311).unwrap();
            let users = 1 + rng.below(6);
            let prompts: Vec<Vec<u32>> = (0..users).map(|_| (0..1 + rng.below(6)).map(|_| rng.below(311) as u32).collect()).collect();
            for &beam in beams {
                for top_k in [1, beam.div_ceil(2), beam] {
                    let opts = BeamOptions { beam, top_k, max_rows: 1 << 20 };
                    let want = search(&mut HashModel { vocab: 311, hist: vec![] }, &trie, &prompts, &opts).unwrap();
                    let got = flat_search(&mut HashModel { vocab: 311, hist: vec![] }, &flat, &prompts, &opts).unwrap();
                    assert_same(&got, &want, n_items, top_k, &format!("{n_items} items, {users} users, beam {beam}, top {top_k}"));
                    cases += 1;
                }
            }
        }
    }
    assert!(cases > 50);
}

/// Uniform logits: only the tie-break rules decide (as tests/beam.rs's tie test).
struct Uniform;

impl Decoder for Uniform {
    fn vocab_size(&self) -> usize {
        10
    }
    fn start(&mut self, prompts: &[Vec<u32>]) -> ilrec::Result<Vec<f32>> {
        Ok(vec![0.0; prompts.len() * 10])
    }
    fn advance(&mut self, rows: &[usize], _tokens: &[u32]) -> ilrec::Result<Vec<f32>> {
        Ok(vec![0.0; rows.len() * 10])
    }
}

#[test]
fn flat_search_breaks_ties_as_search() {
    let items = vec![vec![2, 1], vec![3, 1], vec![3, 0], vec![7, 0], vec![7, 1, 4], vec![7, 1, 5]];
    let trie = ItemTrie::new(&items).unwrap();
    let flat = FlatTrie::new(&trie, 10).unwrap();
    for beam in 1..=6 {
        for top_k in 1..=beam {
            let opts = BeamOptions { beam, top_k, max_rows: 64 };
            let prompts = [vec![1], vec![1, 2], vec![3]];
            let want = search(&mut Uniform, &trie, &prompts, &opts).unwrap();
            let got = flat_search(&mut Uniform, &flat, &prompts, &opts).unwrap();
            assert_same(&got, &want, items.len(), top_k, &format!("beam {beam} top {top_k}"));
        }
    }
}

#[test]
fn flat_search_equals_search_on_the_tiny_model() {
    let path = common::fixture("tiny-llama");
    let model = Model::load(&path).expect("tiny-llama fixture");
    let mut rng = Rng::new(9);
    let items = uneven_items(&mut rng, 80);
    let trie = ItemTrie::new(&items).unwrap();
    let flat = FlatTrie::new(&trie, model.config.vocab_size).unwrap();
    let prompts: Vec<Vec<u32>> = [4usize, 9, 1].iter().map(|&l| (0..l).map(|_| rng.below(300) as u32).collect()).collect();
    let extra = trie.max_len() - 1;
    for (beam, top_k) in [(1, 1), (6, 4), (20, 10)] {
        let opts = BeamOptions { beam, top_k, max_rows: 1 << 20 };
        let want = search(&mut ModelDecoder::new(&model, extra), &trie, &prompts, &opts).unwrap();
        let got = flat_search(&mut ModelDecoder::new(&model, extra), &flat, &prompts, &opts).unwrap();
        // The forward runs other batch compositions here (dead slots too): rows agree to f32
        // rounding, so ranks may only swap between near-equal scores.
        for (u, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.len(), w.len(), "beam {beam}, user {u}");
            for (i, (a, b)) in g.iter().zip(w).enumerate() {
                assert!(a.item == b.item || (a.score - b.score).abs() < 1e-5, "beam {beam}, user {u}, rank {i}: {a:?} vs {b:?}");
                assert!((a.score - b.score).abs() < 1e-4, "beam {beam}, user {u}, rank {i}: {a:?} vs {b:?}");
                assert!((a.item as usize) < items.len());
            }
        }
    }
}

#[test]
fn flat_step_rejects_bad_shapes_and_non_finite_logits() {
    let items = vec![vec![1, TERM], vec![2, TERM]];
    let flat = FlatTrie::new(&ItemTrie::new(&items).unwrap(), 311).unwrap();
    let opts = BeamOptions { beam: 2, top_k: 1, max_rows: 8 };
    let mut st = FlatBeamState::new(2, &opts).unwrap();
    let (mut parent, mut token) = (vec![0; 4], vec![0; 4]);
    assert!(matches!(flat_step(&flat, &vec![0.0; 311], 1, &mut st, &mut parent, &mut token), Err(Error::Input(_))));
    let mut logits = vec![0.0; 2 * 311];
    logits[311 + 7] = f32::NAN;
    match flat_step(&flat, &logits, 1, &mut st, &mut parent, &mut token) {
        Err(Error::NonFinite(m)) => assert!(m.contains("user 1") && m.contains("entry 7"), "{m}"),
        other => panic!("expected NonFinite, got {other:?}"),
    }
    // A live slot without a logits row.
    let mut st = FlatBeamState::new(1, &opts).unwrap();
    st.node[1] = 0;
    st.score[1] = 0.0;
    assert!(matches!(flat_step(&flat, &vec![0.0; 311], 1, &mut st, &mut parent[..2], &mut token[..2]), Err(Error::Input(_))));
}
