//! `y = x W^T` for a few rows of `x`: one pass over `W`, rows of `W` split across threads, each
//! row dotted with every row of `x` while it is in L1. Memory-bound by design (decode steps).
use rayon::prelude::*;

/// Most output columns (rows of `W`) per rayon task.
const COLS_PER_TASK: usize = 256;

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0.0f32; L];
    let (ca, cb) = (a.chunks_exact(L), b.chunks_exact(L));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..L {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s = x.mul_add(*y, s);
    }
    s
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn block(out: &mut [f32], j0: usize, x: &[f32], x_rs: usize, w: &[f32], w_rs: usize, m: usize, k: usize) {
    let cols = out.len() / m;
    for jj in 0..cols {
        let wr = &w[(j0 + jj) * w_rs..(j0 + jj) * w_rs + k];
        for i in 0..m {
            out[i * cols + jj] = dot(&x[i * x_rs..i * x_rs + k], wr);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_avx512(out: &mut [f32], j0: usize, x: &[f32], x_rs: usize, w: &[f32], w_rs: usize, m: usize, k: usize) {
    block(out, j0, x, x_rs, w, w_rs, m, k)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_avx2(out: &mut [f32], j0: usize, x: &[f32], x_rs: usize, w: &[f32], w_rs: usize, m: usize, k: usize) {
    block(out, j0, x, x_rs, w, w_rs, m, k)
}

#[allow(clippy::too_many_arguments)]
fn block_dispatch(out: &mut [f32], j0: usize, x: &[f32], x_rs: usize, w: &[f32], w_rs: usize, m: usize, k: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { block_avx512(out, j0, x, x_rs, w, w_rs, m, k) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { block_avx2(out, j0, x, x_rs, w, w_rs, m, k) };
        }
    }
    block(out, j0, x, x_rs, w, w_rs, m, k)
}

/// Same contract as [`super::matmul_nt`]; meant for `m` up to ~8.
#[allow(clippy::too_many_arguments)]
pub fn matmul_nt_few_rows(
    y: &mut [f32],
    y_rs: usize,
    x: &[f32],
    x_rs: usize,
    w: &[f32],
    w_rs: usize,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) {
    assert!(m == 0 || (m - 1) * x_rs + k <= x.len(), "gemv: x too small");
    assert!(n == 0 || (n - 1) * w_rs + k <= w.len(), "gemv: w too small");
    assert!(m == 0 || (m - 1) * y_rs + n <= y.len(), "gemv: y too small");
    // Columns per task: about 4 tasks per thread (load balance for the narrow k/v heads),
    // a multiple of 16, at most COLS_PER_TASK.
    let per = n.div_ceil(4 * rayon::current_num_threads()).next_multiple_of(16).clamp(16, COLS_PER_TASK);
    if m == 1 && !accumulate {
        // One output row: tasks write disjoint chunks of it directly (no tiles to allocate).
        y[..n].par_chunks_mut(per).enumerate().for_each(|(t, out)| block_dispatch(out, t * per, x, x_rs, w, w_rs, 1, k));
        return;
    }
    // Each task fills a [m, cols] tile; tiles are then written into y (keeps tasks disjoint).
    let tiles: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(per))
        .into_par_iter()
        .map(|t| {
            let j0 = t * per;
            let cols = per.min(n - j0);
            let mut out = vec![0.0f32; m * cols];
            block_dispatch(&mut out, j0, x, x_rs, w, w_rs, m, k);
            (j0, out)
        })
        .collect();
    for (j0, out) in tiles {
        let cols = out.len() / m.max(1);
        for i in 0..m {
            let dst = &mut y[i * y_rs + j0..i * y_rs + j0 + cols];
            let src = &out[i * cols..(i + 1) * cols];
            if accumulate {
                dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
            } else {
                dst.copy_from_slice(src);
            }
        }
    }
}
