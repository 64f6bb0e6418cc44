//! Row-wise and element-wise ops: RMSNorm, RoPE, SwiGLU, bias and residual adds.
use rayon::prelude::*;

/// Rows per rayon task; below this the ops run serially (decode-sized inputs).
const ROWS_PER_TASK: usize = 16;

/// `y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w` for each row of width `w.len()` (Llama RMSNorm,
/// statistics in f32 as HF computes them).
pub fn rms_norm(y: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    let h = w.len();
    assert_eq!(x.len(), y.len(), "rms_norm: x and y lengths differ");
    assert_eq!(x.len() % h, 0, "rms_norm: length not a multiple of the width");
    let row = |(yr, xr): (&mut [f32], &[f32])| {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / h as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
            *o = g * (v * inv);
        }
    };
    if x.len() / h >= 2 * ROWS_PER_TASK {
        y.par_chunks_mut(h).zip(x.par_chunks(h)).with_min_len(ROWS_PER_TASK).for_each(row);
    } else {
        y.chunks_mut(h).zip(x.chunks(h)).for_each(row);
    }
}

/// Cosine and sine tables for the given positions: `[positions.len(), head_dim / 2]` each, with
/// `inv_freq[i] = theta^(-2i / head_dim)` (HF's default rotary embedding, angles in f32).
pub fn rope_tables(positions: &[usize], head_dim: usize, theta: f32) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let mut cos = Vec::with_capacity(positions.len() * half);
    let mut sin = Vec::with_capacity(positions.len() * half);
    for &p in positions {
        for &f in &inv_freq {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    (cos, sin)
}

/// Rotates every head of every row in place (HF `rotate_half` convention: the pairs are
/// `(i, i + head_dim/2)`). `x` is `[rows, n_heads * head_dim]`; row `r` uses table row `r`.
pub fn rope_inplace(x: &mut [f32], n_heads: usize, head_dim: usize, cos: &[f32], sin: &[f32]) {
    let half = head_dim / 2;
    let width = n_heads * head_dim;
    assert_eq!(x.len() % width, 0, "rope: length not a multiple of heads*head_dim");
    assert_eq!(cos.len(), x.len() / width * half, "rope: table rows != x rows");
    let row = |(r, xr): (usize, &mut [f32])| {
        let c = &cos[r * half..(r + 1) * half];
        let s = &sin[r * half..(r + 1) * half];
        for head in xr.chunks_mut(head_dim) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x1, x2) = (a[i], b[i]);
                a[i] = x1 * c[i] - x2 * s[i];
                b[i] = x2 * c[i] + x1 * s[i];
            }
        }
    };
    if x.len() / width >= 2 * ROWS_PER_TASK {
        x.par_chunks_mut(width).enumerate().with_min_len(ROWS_PER_TASK).for_each(row);
    } else {
        x.chunks_mut(width).enumerate().for_each(row);
    }
}

/// SwiGLU: `gate[i] = silu(gate[i]) * up[i]`, with `silu(g) = g / (1 + e^-g)`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "silu_mul: lengths differ");
    // Vectorised exp (vexp.rs, within 2 ulp of the correctly rounded one).
    const CHUNK: usize = 1 << 14;
    if gate.len() >= 2 * CHUNK {
        gate.par_chunks_mut(CHUNK).zip(up.par_chunks(CHUNK)).for_each(|(g, u)| super::vexp::silu_mul_slice(g, u));
    } else {
        super::vexp::silu_mul_slice(gate, up);
    }
}

/// Adds `bias` to every row of `x` (`x` is `[rows, bias.len()]`).
pub fn add_bias(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}

/// `acc[i] += x[i]` (residual connection).
pub fn add_inplace(acc: &mut [f32], x: &[f32]) {
    assert_eq!(acc.len(), x.len(), "add_inplace: lengths differ");
    acc.iter_mut().zip(x).for_each(|(a, b)| *a += b);
}
