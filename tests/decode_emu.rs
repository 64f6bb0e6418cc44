//! kernels/beam.cu on the host emulator (kernels/emu/) against the host beam step `flat_step`
//! (engine/rec/beam.rs, tested equal to the CPU beam search in tests/beam_flat.rs): whole
//! searches, the emulated step started from the host's state at every step and its whole new
//! state compared; uneven tries, beams 1..64, batched users, all-tie logits, two thread orders.
//! Then the KV reorder against a host gather. Launch shapes as in engine/backend/cuda/ops/beam.rs.
//! Skips (one line) without g++.
mod common;

use common::emu::{dim, Emu, Schedule};
use ilrec::rec::beam::{flat_step, BeamOptions, FlatBeamState};
use ilrec::rec::trie::{FlatTrie, ItemTrie, NO_NODE};
use ilrec::rng::Rng;
use std::collections::BTreeSet;

type Lse = unsafe extern "C" fn(*mut f64, *mut u32, *const f32, *const u32, u32, u32, u32);
#[allow(clippy::type_complexity)]
type Select = unsafe extern "C" fn(
    *mut u32, *mut f64, *mut u32, *mut f64, *mut u32, *mut u32, *mut u32, *mut u32, *mut u64, *mut u32,
    *const f32, *const f64, *const u32, *const u32, *const u32, *const u32, u32, u32, u32, u32, u32,
);
type Reorder = unsafe extern "C" fn(*mut f32, *const f32, *const u32, u32, u32, u32, u32, u32, u32, u32);

/// Distinct items of 2..=5 tokens ending with `vocab - 1`; tokens 0..3 are common at every level
/// (uneven fan-out), the rest spread over the vocabulary.
fn uneven_trie(rng: &mut Rng, n: usize, vocab: usize) -> FlatTrie {
    let mut seen = BTreeSet::new();
    while seen.len() < n {
        let len = 2 + rng.below(4);
        let mut seq: Vec<u32> = (0..len - 1).map(|_| if rng.below(3) == 0 { rng.below(3) as u32 } else { rng.below(vocab - 1) as u32 }).collect();
        seq.push(vocab as u32 - 1);
        seen.insert(seq);
    }
    let items: Vec<Vec<u32>> = seen.into_iter().collect();
    FlatTrie::new(&ItemTrie::new(&items).unwrap(), vocab).unwrap()
}

/// One emulated beam step (beam_lse_f32 then beam_select) on a copy of `st`; returns the new
/// state with its parents and tokens, and the non-finite row cell.
fn emu_step(k: &Emu, trie: &FlatTrie, st: &FlatBeamState, logits: &[f32], rpu: usize) -> (FlatBeamState, Vec<u32>, Vec<u32>, u32) {
    let (users, beam, top_k) = (st.users, st.beam, st.top_k);
    // At least the launcher's bound (the root's fan-out, or beam x the widest node below it).
    let max_cand = beam * trie.max_fanout.max(1);
    let mut s = st.clone();
    let mut done: Vec<u32> = st.done.iter().map(|&d| d as u32).collect();
    let mut parent = vec![0xAAAA_AAAAu32; users * beam];
    let mut token = vec![0xAAAA_AAAAu32; users * beam];
    let mut lse = vec![f64::NAN; users * beam];
    let mut err = vec![u32::MAX];
    let mut keys = vec![u64::MAX; users * max_cand];
    let mut kids = vec![u32::MAX; users * max_cand];
    let lse_k: Lse = k.kernel("beam_lse_f32");
    let sel_k: Select = k.kernel("beam_select");
    let (v, r, b, t, m) = (trie.vocab as u32, rpu as u32, beam as u32, top_k as u32, max_cand as u32);
    let (p_lse, p_err, p_logits, p_node) = (lse.as_mut_ptr(), err.as_mut_ptr(), logits.as_ptr(), s.node.as_mut_ptr());
    // SAFETY: every buffer has the kernel's layout for these sizes (kernels/beam.cu).
    unsafe { k.launch(dim((users * rpu) as u32), dim(256), 0, || lse_k(p_lse, p_err, p_logits, p_node, v, r, b)) }.unwrap();
    let ptrs = (
        s.score.as_mut_ptr(),
        done.as_mut_ptr(),
        s.fin_score.as_mut_ptr(),
        s.fin_item.as_mut_ptr(),
        s.fin_count.as_mut_ptr(),
        parent.as_mut_ptr(),
        token.as_mut_ptr(),
        keys.as_mut_ptr(),
        kids.as_mut_ptr(),
    );
    let trie_ptrs = (trie.child_start.as_ptr(), trie.child_token.as_ptr(), trie.child_node.as_ptr(), trie.node_item.as_ptr());
    // SAFETY: as above; max_cand >= beam * the largest fan-out.
    unsafe {
        k.launch(dim(users as u32), dim(512), 0, || {
            sel_k(p_node, ptrs.0, ptrs.1, ptrs.2, ptrs.3, ptrs.4, ptrs.5, ptrs.6, ptrs.7, ptrs.8, p_logits, p_lse, trie_ptrs.0, trie_ptrs.1, trie_ptrs.2, trie_ptrs.3, v, r, b, t, m)
        })
    }
    .unwrap();
    s.done = done.iter().map(|&d| d != 0).collect();
    (s, parent, token, err[0])
}

/// Whether host rank `j` ties (within 1e-6 relative) with a neighbour: the device ranks by
/// f32-rounded scores and sums exponentials in f32, so such pairs may swap.
fn near_tie(scores: &[f64], j: usize) -> bool {
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * (1.0 + a.abs());
    (j > 0 && close(scores[j], scores[j - 1])) || (j + 1 < scores.len() && close(scores[j], scores[j + 1]))
}

#[track_caller]
fn assert_same_step(h: &FlatBeamState, hp: &[u32], ht: &[u32], d: &FlatBeamState, dp: &[u32], dt: &[u32], ctx: &str) {
    assert_eq!(h.done, d.done, "{ctx}: done");
    assert_eq!(h.fin_count, d.fin_count, "{ctx}: finished counts");
    for u in 0..h.users {
        let live: Vec<f64> = h.score[u * h.beam..(u + 1) * h.beam].to_vec();
        for j in 0..h.beam {
            let s = u * h.beam + j;
            let same = h.node[s] == d.node[s] && (h.node[s] == NO_NODE || (hp[s] == dp[s] && ht[s] == dt[s]));
            assert!(same || near_tie(&live, j), "{ctx}: user {u} slot {j}: host node {} parent {} token {}, emulated {} {} {}", h.node[s], hp[s], ht[s], d.node[s], dp[s], dt[s]);
            if h.node[s] != NO_NODE {
                assert!((h.score[s] - d.score[s]).abs() <= 1e-5 * (1.0 + h.score[s].abs()), "{ctx}: user {u} slot {j} score {} vs {}", h.score[s], d.score[s]);
            } else {
                assert_eq!((dp[s], dt[s]), (0, 0), "{ctx}: dead slot {j} of user {u}");
            }
        }
        let n = h.fin_count[u] as usize;
        let f = u * h.top_k..u * h.top_k + n;
        let fs: Vec<f64> = h.fin_score[f.clone()].to_vec();
        for (j, i) in f.enumerate() {
            assert!(h.fin_item[i] == d.fin_item[i] || near_tie(&fs, j), "{ctx}: user {u} finished {j}: item {} vs {}", h.fin_item[i], d.fin_item[i]);
            assert!((h.fin_score[i] - d.fin_score[i]).abs() <= 1e-5 * (1.0 + h.fin_score[i].abs()), "{ctx}: user {u} finished {j}");
        }
    }
}

/// A whole search: host and emulator side by side, the emulator restarted from the host's state
/// each step, on fresh logits every step (`uniform`: all zeros, so only the tie rules decide).
fn search_case(k: &Emu, rng: &mut Rng, trie: &FlatTrie, (users, beam, top_k): (usize, usize, usize), uniform: bool, ctx: &str) {
    let opts = BeamOptions { beam, top_k, max_rows: usize::MAX };
    let mut st = FlatBeamState::new(users, &opts).unwrap();
    let (mut hp, mut ht) = (vec![0u32; users * beam], vec![0u32; users * beam]);
    for step in 0..trie.max_len {
        let rpu = if step == 0 { 1 } else { beam };
        let n = users * rpu * trie.vocab;
        let logits: Vec<f32> = if uniform { vec![0.0; n] } else { (0..n).map(|_| rng.normal() * 2.0).collect() };
        let (d, dp, dt, err) = emu_step(k, trie, &st, &logits, rpu);
        flat_step(trie, &logits, rpu, &mut st, &mut hp, &mut ht).unwrap();
        assert_eq!(err, u32::MAX, "{ctx}: step {step}: a finite row was flagged");
        assert_same_step(&st, &hp, &ht, &d, &dp, &dt, &format!("{ctx}, step {step}"));
        if st.done.iter().all(|&x| x) {
            break;
        }
    }
}

#[test]
fn beam_step_matches_the_host_step() {
    let Some(k) = common::emu::build("beam") else { return };
    let mut rng = Rng::new(3);
    for (items, vocab, users, beam, top_k) in [(5usize, 40usize, 2usize, 1usize, 1usize), (60, 90, 3, 5, 3), (150, 200, 2, 20, 10), (400, 300, 2, 64, 64), (700, 300, 2, 512, 100)] {
        let trie = uneven_trie(&mut rng, items, vocab);
        search_case(&k, &mut rng, &trie, (users, beam, top_k), false, &format!("{items} items, beam {beam}"));
    }
    // Another thread order: a missing barrier shows up as a different result.
    let shuffled = k.with_schedule(Schedule::Shuffled(11));
    let trie = uneven_trie(&mut rng, 120, 150);
    search_case(&shuffled, &mut rng, &trie, (3, 12, 6), false, "shuffled schedule");
}

#[test]
fn beam_step_ties_and_non_finite_rows() {
    let Some(k) = common::emu::build("beam") else { return };
    let mut rng = Rng::new(4);
    // All-tie logits: f32 and f64 scores tie alike, so the order must be exactly the host's.
    let trie = uneven_trie(&mut rng, 80, 60);
    search_case(&k, &mut rng, &trie, (2, 9, 9), true, "uniform logits");
    // A NaN in user 1's row is flagged with its row.
    let opts = BeamOptions { beam: 4, top_k: 2, max_rows: 64 };
    let st = FlatBeamState::new(2, &opts).unwrap();
    let mut logits = vec![0.5f32; 2 * trie.vocab];
    logits[trie.vocab + 3] = f32::NAN;
    let (_, _, _, err) = emu_step(&k, &trie, &st, &logits, 1);
    assert_eq!(err, 1);
}

#[test]
fn kv_reorder_gathers_parent_rows() {
    let Some(k) = common::emu::build("beam") else { return };
    let f: Reorder = k.kernel("kv_reorder_f32");
    let (groups, src_per, dst_per, heads, cap, len, d) = (3usize, 4usize, 6usize, 2usize, 7usize, 5usize, 9usize);
    let row = heads * cap * d;
    let mut rng = Rng::new(5);
    let src: Vec<f32> = (0..groups * src_per * row).map(|_| rng.normal()).collect();
    // Parents up to src_per + 1: the kernel clamps them into the group.
    let parent: Vec<u32> = (0..groups * dst_per).map(|_| rng.below(src_per + 2) as u32).collect();
    let mut dst = vec![f32::NAN; groups * dst_per * row];
    let n = groups * dst_per * heads * len * d;
    let (pd, ps, pp) = (dst.as_mut_ptr(), src.as_ptr(), parent.as_ptr());
    let g = [groups, src_per, dst_per, heads, cap, len, d].map(|x| x as u32);
    // SAFETY: src, dst and parent have the kernel's layout for these sizes; 3 blocks of 256 over n
    // elements exercise the grid-stride loop.
    unsafe { k.launch(dim(3), dim(256), 0, || f(pd, ps, pp, g[0], g[1], g[2], g[3], g[4], g[5], g[6])) }.unwrap();
    assert!(n > 3 * 256);
    for r in 0..groups * dst_per {
        let sr = (r / dst_per) * src_per + (parent[r] as usize).min(src_per - 1);
        for h in 0..heads {
            for p in 0..cap {
                for j in 0..d {
                    let got = dst[((r * heads + h) * cap + p) * d + j];
                    if p < len {
                        assert_eq!(got.to_bits(), src[((sr * heads + h) * cap + p) * d + j].to_bits(), "row {r} head {h} pos {p}");
                    } else {
                        assert!(got.is_nan(), "row {r} pos {p} >= len written");
                    }
                }
            }
        }
    }
}
