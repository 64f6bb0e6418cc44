//! Backward passes of the CPU ops (f32), each the exact derivative of its forward twin.
use super::attention::AttentionShape;
use super::matmul::{matmul_nn, matmul_nt, matmul_tn};
use rayon::prelude::*;

/// Gradient of `y = x / sqrt(mean(x^2) + eps) * w` w.r.t. `x` (the weight is frozen), added
/// into `dx`: with `r = 1/sqrt(mean(x^2)+eps)` and `g = dy * w`,
/// `dx += r g - x r^3 / H * Σ(g x)`.
pub fn rms_norm_backward(dx: &mut [f32], dy: &[f32], x: &[f32], w: &[f32], eps: f32) {
    let h = w.len();
    assert!(dx.len() == x.len() && dy.len() == x.len() && x.len().is_multiple_of(h), "rms_norm_backward: shapes");
    dx.par_chunks_mut(h).zip(dy.par_chunks(h)).zip(x.par_chunks(h)).with_min_len(16).for_each(|((dxr, dyr), xr)| {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / h as f32;
        let r = 1.0 / (ms + eps).sqrt();
        let dot: f32 = dyr.iter().zip(w).zip(xr).map(|((d, g), v)| d * g * v).sum();
        let c = r * r * r / h as f32 * dot;
        for i in 0..h {
            dxr[i] += r * dyr[i] * w[i] - xr[i] * c;
        }
    });
}

/// Gradient of `silu(g) * u`: writes `dg` and `du` from `da`.
pub fn silu_mul_backward(dg: &mut [f32], du: &mut [f32], da: &[f32], g: &[f32], u: &[f32]) {
    assert!(dg.len() == da.len() && du.len() == da.len() && g.len() == da.len() && u.len() == da.len(), "silu_mul_backward: shapes");
    dg.par_iter_mut().zip(du.par_iter_mut()).zip(da.par_iter().zip(g.par_iter().zip(u.par_iter()))).with_min_len(4096).for_each(
        |((dgi, dui), (&d, (&gi, &ui)))| {
            let sig = 1.0 / (1.0 + (-gi).exp());
            *dui = d * gi * sig;
            *dgi = d * ui * sig * (1.0 + gi * (1.0 - sig));
        },
    );
}

/// Gradients of [`super::attention`] for a whole sequence (no earlier cache: `past == 0`,
/// `cap == tq`). Recomputes the probabilities from `q` and `k` rather than storing
/// `batch * heads * T^2` of them. Layouts as the forward: `q`, `dout`, `dq`:
/// `[batch * t, heads * d]`; `k`, `v`, `dk`, `dv`: `[batch, kv_heads, t, d]`. `dq`, `dk`, `dv`
/// are overwritten.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    key_mask: &[bool],
    s: AttentionShape,
) {
    let AttentionShape { batch, tq: t, past, cap, n_heads, n_kv_heads, head_dim: d } = s;
    assert!(past == 0 && cap == t, "attention_backward: training attention has no cache");
    let width = n_heads * d;
    assert!(q.len() == batch * t * width && dout.len() == q.len() && dq.len() == q.len(), "attention_backward: q shapes");
    assert!(k.len() == batch * n_kv_heads * t * d && v.len() == k.len() && dk.len() == k.len() && dv.len() == k.len(), "attention_backward: kv shapes");
    let group = n_heads / n_kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    // One task per (sequence, KV head): it owns that head's dK/dV and its group's dQ columns.
    let results: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..batch * n_kv_heads)
        .into_par_iter()
        .map(|bk| {
            let (b, kvh) = (bk / n_kv_heads, bk % n_kv_heads);
            let kb = &k[bk * t * d..(bk + 1) * t * d];
            let vb = &v[bk * t * d..(bk + 1) * t * d];
            let mask = &key_mask[b * t..(b + 1) * t];
            let mut dkb = vec![0.0f32; t * d];
            let mut dvb = vec![0.0f32; t * d];
            let mut dqg = vec![0.0f32; group * t * d];
            let mut p = vec![0.0f32; t * t];
            let mut dp = vec![0.0f32; t * t];
            for gi in 0..group {
                let h = kvh * group + gi;
                let qb = &q[b * t * width + h * d..];
                let dob = &dout[b * t * width + h * d..];
                matmul_nt(&mut p, t, qb, width, kb, d, t, t, d, false);
                for (i, row) in p.chunks_mut(t).enumerate() {
                    let mut max = f32::NEG_INFINITY;
                    for j in 0..=i {
                        if mask[j] {
                            max = max.max(row[j] * scale);
                        }
                    }
                    if max == f32::NEG_INFINITY {
                        row.fill(0.0);
                        continue;
                    }
                    let mut sum = 0.0;
                    for j in 0..t {
                        let e = if j <= i && mask[j] { (row[j] * scale - max).exp() } else { 0.0 };
                        row[j] = e;
                        sum += e;
                    }
                    row.iter_mut().for_each(|x| *x /= sum);
                }
                // dV += P^T dO ; dP = dO V^T
                matmul_tn(&mut dvb, d, &p, t, dob, width, t, d, t, true);
                matmul_nt(&mut dp, t, dob, width, vb, d, t, t, d, false);
                // dS = P * (dP - rowsum(dP * P)) * scale
                for (prow, dprow) in p.chunks(t).zip(dp.chunks_mut(t)) {
                    let dot: f32 = prow.iter().zip(dprow.iter()).map(|(a, b)| a * b).sum();
                    for (g, &pv) in dprow.iter_mut().zip(prow) {
                        *g = pv * (*g - dot) * scale;
                    }
                }
                // dQ = dS K ; dK += dS^T Q
                matmul_nn(&mut dqg[gi * t * d..(gi + 1) * t * d], d, &dp, t, kb, d, t, d, t, false);
                matmul_tn(&mut dkb, d, &dp, t, qb, width, t, d, t, true);
            }
            (dqg, dkb, dvb)
        })
        .collect();
    for (bk, (dqg, dkb, dvb)) in results.into_iter().enumerate() {
        let (b, kvh) = (bk / n_kv_heads, bk % n_kv_heads);
        dk[bk * t * d..(bk + 1) * t * d].copy_from_slice(&dkb);
        dv[bk * t * d..(bk + 1) * t * d].copy_from_slice(&dvb);
        for gi in 0..group {
            let h = kvh * group + gi;
            for i in 0..t {
                let dst = (b * t + i) * width + h * d;
                dq[dst..dst + d].copy_from_slice(&dqg[(gi * t + i) * d..(gi * t + i + 1) * d]);
            }
        }
    }
}
