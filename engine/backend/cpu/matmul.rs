//! Dense f32 matrix products through the `gemm` crate.
//!
//! All matrices are row-major slices. Work below ~64k multiply-adds runs single-threaded:
//! rayon's fork/join costs more than it saves there (decode-time matrix-vector products of
//! small heads).
use super::gemv;
use gemm::Parallelism;

const PARALLEL_MIN_WORK: usize = 1 << 16;

fn parallelism(m: usize, n: usize, k: usize, serial: bool) -> Parallelism {
    if serial || m * n * k < PARALLEL_MIN_WORK || rayon::current_num_threads() == 1 {
        Parallelism::None
    } else {
        Parallelism::Rayon(0)
    }
}

/// A read-only strided view: element (i, j) at `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl View<'_> {
    fn check(&self, rows: usize, cols: usize, what: &str) {
        if rows == 0 || cols == 0 {
            return;
        }
        let last = (rows - 1) * self.rs + (cols - 1) * self.cs;
        assert!(
            last < self.data.len(),
            "matmul: {what} view of {rows}x{cols} exceeds its buffer of {}",
            self.data.len()
        );
    }
}

/// dst[m, n] (row stride `dst_rs`) = (accumulate ? dst : 0) + lhs · rhs.
#[allow(clippy::too_many_arguments)]
fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    lhs: View,
    rhs: View,
    accumulate: bool,
    serial: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!((m - 1) * dst_rs + n <= dst.len(), "matmul: dst too small");
    lhs.check(m, k, "lhs");
    rhs.check(k, n, "rhs");
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * dst_rs..i * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: every view was bounds-checked above for the extents gemm reads and writes; the
    // destination is borrowed mutably, so it cannot alias the (shared) inputs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism(m, n, k, serial),
        )
    }
}

/// `y[m, n] (+)= x[m, k] · w[n, k]^T`: a linear layer with PyTorch's `[out, in]` weight layout.
/// `x` rows are `x_rs` apart (>= k), `y` rows `y_rs` apart (>= n).
#[allow(clippy::too_many_arguments)]
pub fn matmul_nt(
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
    if m <= GEMV_MAX_ROWS && m * n * k >= PARALLEL_MIN_WORK {
        return gemv::matmul_nt_few_rows(y, y_rs, x, x_rs, w, w_rs, m, n, k, accumulate);
    }
    let lhs = View { data: x, rs: x_rs, cs: 1 };
    let rhs = View { data: w, rs: 1, cs: w_rs };
    gemm_strided(m, n, k, y, y_rs, lhs, rhs, accumulate, false);
}

/// Up to this many rows, `matmul_nt` streams the weight once with dot products (decode steps
/// are memory-bound: the `gemm` crate reaches ~6 GB/s there, the dot kernel ~25 GB/s).
const GEMV_MAX_ROWS: usize = 8;

/// `y[m, n] (+)= x[m, k] · w[k, n]`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_nn(
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
    let lhs = View { data: x, rs: x_rs, cs: 1 };
    let rhs = View { data: w, rs: w_rs, cs: 1 };
    gemm_strided(m, n, k, y, y_rs, lhs, rhs, accumulate, false);
}

/// `y[m, n] (+)= x[k, m]^T · w[k, n]` (weight gradients: `dW = dY^T X`).
#[allow(clippy::too_many_arguments)]
pub fn matmul_tn(
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
    let lhs = View { data: x, rs: 1, cs: x_rs };
    let rhs = View { data: w, rs: w_rs, cs: 1 };
    gemm_strided(m, n, k, y, y_rs, lhs, rhs, accumulate, false);
}

/// [`matmul_nt`] on the calling thread only (for callers that are already inside a parallel
/// loop: no nested fork/join, and thread-local scratch stays safe).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_nt_serial(y: &mut [f32], y_rs: usize, x: &[f32], x_rs: usize, w: &[f32], w_rs: usize, m: usize, n: usize, k: usize, accumulate: bool) {
    let lhs = View { data: x, rs: x_rs, cs: 1 };
    let rhs = View { data: w, rs: 1, cs: w_rs };
    gemm_strided(m, n, k, y, y_rs, lhs, rhs, accumulate, true);
}

/// [`matmul_nn`] on the calling thread only.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_nn_serial(y: &mut [f32], y_rs: usize, x: &[f32], x_rs: usize, w: &[f32], w_rs: usize, m: usize, n: usize, k: usize, accumulate: bool) {
    let lhs = View { data: x, rs: x_rs, cs: 1 };
    let rhs = View { data: w, rs: w_rs, cs: 1 };
    gemm_strided(m, n, k, y, y_rs, lhs, rhs, accumulate, true);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_nt(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut y = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k).map(|p| x[i * k + p] as f64 * w[j * k + p] as f64).sum();
            }
        }
        y
    }

    fn pseudo(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let h = (i as u32).wrapping_mul(2654435761).wrapping_add(seed.wrapping_mul(40503));
                ((h >> 8) as f32 / (1u32 << 24) as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn nt_nn_tn_match_naive() {
        for &(m, n, k) in &[(1, 1, 1), (3, 5, 7), (67, 33, 129), (128, 96, 200), (1, 1000, 77), (5, 300, 333)] {
            let x = pseudo(m * k, 1);
            let w = pseudo(n * k, 2);
            let want = naive_nt(&x, &w, m, n, k);
            let mut y = vec![f32::NAN; m * n];
            matmul_nt(&mut y, n, &x, k, &w, k, m, n, k, false);
            // w^T laid out [k, n] for the nn form.
            let mut wt = vec![0.0; k * n];
            for j in 0..n {
                for p in 0..k {
                    wt[p * n + j] = w[j * k + p];
                }
            }
            let mut y2 = vec![f32::NAN; m * n];
            matmul_nn(&mut y2, n, &x, k, &wt, n, m, n, k, false);
            // x^T laid out [k, m] for the tn form.
            let mut xt = vec![0.0; k * m];
            for i in 0..m {
                for p in 0..k {
                    xt[p * m + i] = x[i * k + p];
                }
            }
            let mut y3 = vec![1.0; m * n];
            matmul_tn(&mut y3, n, &xt, m, &wt, n, m, n, k, true);
            for i in 0..m * n {
                let tol = 1e-4 * (1.0 + want[i].abs());
                assert!((y[i] as f64 - want[i]).abs() < tol, "nt {m}x{n}x{k} at {i}");
                assert!((y2[i] as f64 - want[i]).abs() < tol, "nn {m}x{n}x{k} at {i}");
                assert!((y3[i] as f64 - 1.0 - want[i]).abs() < tol, "tn {m}x{n}x{k} at {i}");
            }
        }
    }
}
