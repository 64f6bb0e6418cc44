//! Causal grouped-query attention over a key/value cache with a key padding mask.
use super::matmul::{matmul_nn, matmul_nt};
use rayon::prelude::*;

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

    let heads: Vec<Vec<f32>> = (0..batch * n_heads)
        .into_par_iter()
        .map(|bh| {
            let (b, h) = (bh / n_heads, bh % n_heads);
            let kv = (b * n_kv_heads + h / group) * cap * d;
            let kb = &k[kv..kv + tk * d];
            let vb = &v[kv..kv + tk * d];
            let qb = &q[b * tq * width + h * d..];
            let mask = &key_mask[b * cap..b * cap + tk];
            let mut p = vec![0.0f32; tq * tk];
            matmul_nt(&mut p, tk, qb, width, kb, d, tq, tk, d, false);
            for (i, row) in p.chunks_mut(tk).enumerate() {
                let visible = past + i + 1;
                let mut max = f32::NEG_INFINITY;
                for j in 0..visible {
                    if mask[j] {
                        max = max.max(row[j] * scale);
                    }
                }
                if max == f32::NEG_INFINITY {
                    row.fill(0.0);
                    continue;
                }
                let mut sum = 0.0;
                for j in 0..tk {
                    let e = if j < visible && mask[j] { (row[j] * scale - max).exp() } else { 0.0 };
                    row[j] = e;
                    sum += e;
                }
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|x| *x *= inv);
            }
            let mut o = vec![0.0f32; tq * d];
            matmul_nn(&mut o, d, &p, tk, vb, d, tq, d, tk, false);
            o
        })
        .collect();
    for (bh, o) in heads.iter().enumerate() {
        let (b, h) = (bh / n_heads, bh % n_heads);
        for i in 0..tq {
            let dst = (b * tq + i) * width + h * d;
            out[dst..dst + d].copy_from_slice(&o[i * d..(i + 1) * d]);
        }
    }
}
