//! Every kernel checked against the CPU reference (the executable specification) on fresh random
//! inputs: normal values with outliers (1 in 64 elements scaled by 30), odd sizes that are not
//! multiples of any tile, outputs poisoned with NaN (0xFF bytes) before the launch so an element the
//! kernel forgets to write fails the check. The metric is `||out - ref|| / ||ref||` (the absolute
//! norm when the reference is zero); a NaN or an infinity anywhere fails. Tolerances: 1e-4 for f32
//! paths, 1e-2 for bf16 paths (docs/gpu-check.md).
//!
//! `ilrec selftest` prints these rows as a table; tests/cuda_kernels.rs asserts every row passes.
mod attention;
mod beam;
mod elementwise;
mod embedding;
mod gemm;
mod loss;
pub mod lora;
mod model;
mod optim;
mod probe;
mod softmax;

use super::Cuda;
use crate::error::Result;
use crate::rng::Rng;
use std::time::Instant;

/// Tolerance of f32 paths.
pub const TOL_F32: f64 = 1e-4;
/// Tolerance of bf16 paths.
pub const TOL_BF16: f64 = 1e-2;
/// Tolerance of operations that are exact by specification (casts): bitwise equality.
pub const TOL_EXACT: f64 = 0.0;

/// `v` rounded to bf16 and back: the values a bf16 tensor holds (the reference's inputs for bf16
/// paths).
pub fn round_bf16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect()
}

/// One check: a kernel on one shape.
#[derive(Clone, Debug)]
pub struct CheckRow {
    pub kernel: String,
    pub shape: String,
    /// Relative error against the CPU reference (infinite when the output has NaN/inf).
    pub err: f64,
    pub tol: f64,
    /// Median wall time of the launch (plus a stream sync), milliseconds.
    pub ms: f64,
}

impl CheckRow {
    pub fn pass(&self) -> bool {
        self.err.is_finite() && self.err <= self.tol
    }
}

/// `||out - ref|| / ||ref||` in f64; infinite when a length differs or any value is not finite.
pub fn rel_err(out: &[f32], reference: &[f32]) -> f64 {
    if out.len() != reference.len() {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&o, &r) in out.iter().zip(reference) {
        if !o.is_finite() || !r.is_finite() {
            return f64::INFINITY;
        }
        num += (o as f64 - r as f64).powi(2);
        den += (r as f64).powi(2);
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// `n` values ~ N(0, scale^2) with 1 in 64 multiplied by 30 (outliers): the checks' inputs, also
/// for the emulator tests that reuse a check's reference.
pub fn random_outliers(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let v = rng.normal() * scale;
            if rng.below(64) == 0 {
                v * 30.0
            } else {
                v
            }
        })
        .collect()
}

/// Shared state of the checks: the device, the random source, the rows so far.
pub struct Checker<'a> {
    pub cuda: &'a Cuda,
    pub rng: Rng,
    pub rows: Vec<CheckRow>,
}

impl Checker<'_> {
    /// `n` values ~ N(0, scale^2) with 1 in 64 multiplied by 30 (outliers).
    pub fn random(&mut self, n: usize, scale: f32) -> Vec<f32> {
        random_outliers(&mut self.rng, n, scale)
    }

    /// `n` values uniform in [lo, hi).
    pub fn uniform(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| lo + (hi - lo) * self.rng.next_f32()).collect()
    }

    /// Median wall time over `reps` runs of `launch` (each followed by a sync), in milliseconds.
    /// `launch` must be idempotent or its output re-derived by the caller afterwards.
    pub fn time(&self, reps: usize, mut launch: impl FnMut() -> Result<()>) -> Result<f64> {
        let mut t = Vec::with_capacity(reps);
        for _ in 0..reps.max(1) {
            let start = Instant::now();
            launch()?;
            self.cuda.sync()?;
            t.push(start.elapsed().as_secs_f64() * 1e3);
        }
        t.sort_by(f64::total_cmp);
        Ok(t[t.len() / 2])
    }

    /// Records one row.
    pub fn record(&mut self, kernel: &str, shape: String, out: &[f32], reference: &[f32], tol: f64, ms: f64) {
        self.rows.push(CheckRow { kernel: kernel.to_string(), shape, err: rel_err(out, reference), tol, ms });
    }
}

/// Runs every kernel check on `cuda`. `full` adds the end-to-end model checks.
pub fn run(cuda: &Cuda, seed: u64, full: bool) -> Result<Vec<CheckRow>> {
    let mut c = Checker { cuda, rng: Rng::new(seed), rows: Vec::new() };
    elementwise::check(&mut c)?;
    embedding::check(&mut c)?;
    optim::check(&mut c)?;
    softmax::check(&mut c)?;
    gemm::check(&mut c)?;
    attention::check(&mut c)?;
    beam::check(&mut c)?;
    probe::check(&mut c)?;
    loss::check(&mut c)?;
    lora::check(&mut c)?;
    if full {
        model::check(&mut c)?;
        beam::decode(&mut c)?;
    }
    Ok(c.rows)
}

/// The rows as a markdown table.
pub fn table(rows: &[CheckRow]) -> String {
    let mut s = String::from("| kernel | shape | rel. error | tolerance | result | time (ms) |\n|---|---|---|---|---|---|\n");
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {:.2e} | {:.0e} | {} | {:.3} |\n",
            r.kernel,
            r.shape,
            r.err,
            r.tol,
            if r.pass() { "pass" } else { "FAIL" },
            r.ms
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::rel_err;

    #[test]
    fn the_metric_fails_nan_and_infinity_and_scales_by_the_reference() {
        assert_eq!(rel_err(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!(rel_err(&[f32::NAN, 2.0], &[1.0, 2.0]).is_infinite());
        assert!(rel_err(&[f32::INFINITY, 2.0], &[1.0, 2.0]).is_infinite());
        assert!(rel_err(&[1.0], &[1.0, 2.0]).is_infinite());
        assert!((rel_err(&[3.0, 4.0], &[0.0, 0.0]) - 5.0).abs() < 1e-12);
        assert!((rel_err(&[1.1, 0.0], &[1.0, 0.0]) - 0.1).abs() < 1e-6);
    }
}
