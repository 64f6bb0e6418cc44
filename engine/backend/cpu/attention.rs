//! Causal grouped-query attention over a key/value cache with a key padding mask.
use super::matmul::{matmul_nn_serial, matmul_nt_serial};
use super::vexp::exp_shift_sum;
use rayon::prelude::*;
use std::cell::RefCell;

/// Sizes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub batch: usize,
    /// New query tokens per sequence.
    pub tq: usize,
    /// Cached tokens before the new ones; query `i` sits at absolute index `past + i`.
    pub past: usize,
    /// Row capacity of the cache buffers (>= past + tq).
    pub cap: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// `out = softmax(q k^T / sqrt(d) + mask) v` per sequence and head, where query head `h` reads
/// KV head `h / (n_heads / n_kv_heads)`, and query `i` sees key `j` iff `j <= past + i` and
/// `key_mask[b * cap + j]`. A query that sees no key (a left-padding slot) gets zeros.
///
/// Layouts: `q`, `out`: `[batch * tq, n_heads * head_dim]`; `k`, `v`: `[batch, n_kv_heads, cap,
/// head_dim]`; `key_mask`: `[batch, cap]`.
pub fn attention(
    out: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    key_mask: &[bool],
    s: AttentionShape,
) {
    let AttentionShape { batch, tq, past, cap, n_heads, n_kv_heads, head_dim: d } = s;
    let tk = past + tq;
    let width = n_heads * d;
    assert!(tk <= cap, "attention: past + tq exceeds the cache capacity");
    assert_eq!(q.len(), batch * tq * width, "attention: q shape");
    assert_eq!(out.len(), q.len(), "attention: out shape");
    assert_eq!(k.len(), batch * n_kv_heads * cap * d, "attention: k shape");
    assert_eq!(v.len(), k.len(), "attention: v shape");
    assert_eq!(key_mask.len(), batch * cap, "attention: mask shape");
    assert!(n_kv_heads > 0 && n_heads % n_kv_heads == 0, "attention: heads not a multiple of kv heads");
    let group = n_heads / n_kv_heads;
    let scale = 1.0 / (d as f32).sqrt();

    if tq == 0 || batch == 0 {
        return;
    }
    // One task per (sequence, block of query rows): its rows of `out` are contiguous, and it
    // needs keys `0..past + last row + 1` only (the causal upper triangle beyond is skipped).
    // Inside, the `group` query heads that share a KV head are stacked into one product.
    let blk = ROWS_PER_TASK.min(tq);
    let mut tasks: Vec<(usize, usize, &mut [f32])> = Vec::with_capacity(batch * tq.div_ceil(blk));
    for (b, ob) in out.chunks_mut(tq * width).enumerate() {
        for (ib, o) in ob.chunks_mut(blk * width).enumerate() {
            tasks.push((b, ib * blk, o));
        }
    }
    let run = |(b, i0, o): (usize, usize, &mut [f32])| {
        let r = o.len() / width;
        let tkb = past + i0 + r;
        let gr = group * r;
        let mask = &key_mask[b * cap..b * cap + tkb];
        SCRATCH.with(|cell| {
            let mut buf = cell.borrow_mut();
            let need = 2 * gr * d + gr * tkb;
            if buf.len() < need {
                buf.resize(need, 0.0);
            }
            let (qs, rest) = buf.split_at_mut(gr * d);
            let (os, rest) = rest.split_at_mut(gr * d);
            let p = &mut rest[..gr * tkb];
            for g in 0..n_kv_heads {
                let kv = (b * n_kv_heads + g) * cap * d;
                let kb = &k[kv..kv + tkb * d];
                let vb = &v[kv..kv + tkb * d];
                for hh in 0..group {
                    let h = g * group + hh;
                    for i in 0..r {
                        let src = (b * tq + i0 + i) * width + h * d;
                        qs[(hh * r + i) * d..(hh * r + i + 1) * d].copy_from_slice(&q[src..src + d]);
                    }
                }
                matmul_nt_serial(p, tkb, qs, d, kb, d, gr, tkb, d, false);
                for (rr, row) in p.chunks_mut(tkb).enumerate() {
                    softmax_row(row, past + i0 + rr % r + 1, mask, scale);
                }
                matmul_nn_serial(os, d, p, tkb, vb, d, gr, d, tkb, false);
                for hh in 0..group {
                    let h = g * group + hh;
                    for i in 0..r {
                        o[i * width + h * d..i * width + (h + 1) * d].copy_from_slice(&os[(hh * r + i) * d..(hh * r + i + 1) * d]);
                    }
                }
            }
        });
    };
    if tasks.len() == 1 {
        tasks.into_iter().for_each(run);
    } else {
        tasks.into_par_iter().with_max_len(1).for_each(run);
    }
}

/// Query rows per attention task.
const ROWS_PER_TASK: usize = 32;

thread_local! {
    /// Per-thread scores and head-group buffers, reused across calls (no page faults). Only
    /// borrowed by code that does not re-enter rayon, so a task never finds it borrowed.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Softmax of `row[..visible] * scale` over the keys `mask` allows; zeros elsewhere, and a
/// row of zeros when no key is visible (a left-padding query).
fn softmax_row(row: &mut [f32], visible: usize, mask: &[bool], scale: f32) {
    let (live, dead) = row.split_at_mut(visible);
    dead.fill(0.0);
    let mut max = f32::NEG_INFINITY;
    for (x, &m) in live.iter_mut().zip(mask) {
        *x = if m { *x * scale } else { f32::NEG_INFINITY };
        max = max.max(*x);
    }
    if max == f32::NEG_INFINITY {
        live.fill(0.0);
        return;
    }
    // exp(-inf - max) = 0 for the masked keys.
    let sum = exp_shift_sum(live, max);
    let inv = 1.0 / sum;
    live.iter_mut().for_each(|x| *x *= inv);
}
