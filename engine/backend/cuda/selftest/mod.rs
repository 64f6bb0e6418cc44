//! Every kernel checked against the CPU reference (the executable specification) on fresh random
//! inputs: normal values with outliers (1 in 64 elements scaled by 30), odd sizes that are not
//! multiples of any tile, outputs poisoned with NaN (0xFF bytes) before the launch so an element the
//! kernel forgets to write fails the check. The metric is `||out - ref|| / ||ref||` (the absolute
//! norm when the reference is zero); a NaN or an infinity anywhere fails. Tolerances: 1e-4 for f32
//! paths, 1e-2 for bf16 paths (docs/gpu-check.md).
//!
//! `ilrec selftest` prints these rows as a table; tests/cuda_kernels.rs asserts every row passes.
pub mod attention;
mod beam;
mod elementwise;
mod embedding;
mod gemm;
pub mod loss;
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
/// Tolerance of the end-to-end training gradients with bf16 weights (`--full`): the GPU rounds
/// every GEMM input (activations and gradients too) to bf16, the CPU reference only the weights,
/// and the differences compound over the blocks forward and back. On the host emulator, whose
/// arithmetic is otherwise the CPU's, the 196 gradient tensors of the three tiny models measure
/// 4.4e-3 to 1.04e-2 (median 6.5e-3): 1e-2 would fail on rounding alone. A wrong gradient
/// is off by O(1), and the same rows with f32 weights hold 1e-4.
pub const TOL_BF16_MODEL: f64 = 2e-2;
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
        // On the emulator a time says nothing; one run keeps the checks affordable.
        let reps = if self.cuda.is_emulated() { 1 } else { reps.max(1) };
        let mut t = Vec::with_capacity(reps);
        for _ in 0..reps {
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

/// One group of checks.
pub struct Section {
    pub name: &'static str,
    /// Part of `--full` only (the end-to-end checks).
    pub full_only: bool,
    run: fn(&mut Checker) -> Result<()>,
}

/// Every section, in the order `run` takes them.
pub const SECTIONS: &[Section] = &[
    Section { name: "elementwise", full_only: false, run: elementwise::check },
    Section { name: "embedding", full_only: false, run: embedding::check },
    Section { name: "optim", full_only: false, run: optim::check },
    Section { name: "softmax", full_only: false, run: softmax::check },
    Section { name: "gemm", full_only: false, run: gemm::check },
    Section { name: "attention", full_only: false, run: attention::check },
    Section { name: "beam", full_only: false, run: beam::check },
    Section { name: "probe", full_only: false, run: probe::check },
    Section { name: "loss", full_only: false, run: loss::check },
    Section { name: "lora", full_only: false, run: lora::check },
    Section { name: "model", full_only: true, run: model::check },
    Section { name: "decode", full_only: true, run: beam::decode },
];

/// Runs every kernel check on `cuda`. `full` adds the end-to-end model checks.
pub fn run(cuda: &Cuda, seed: u64, full: bool) -> Result<Vec<CheckRow>> {
    let names: Vec<&str> = SECTIONS.iter().filter(|s| full || !s.full_only).map(|s| s.name).collect();
    run_sections(cuda, seed, &names)
}

/// Runs the named sections (see [`SECTIONS`]) in their usual order; an unknown name is an error.
pub fn run_sections(cuda: &Cuda, seed: u64, names: &[&str]) -> Result<Vec<CheckRow>> {
    if let Some(bad) = names.iter().find(|n| !SECTIONS.iter().any(|s| s.name == **n)) {
        let known: Vec<&str> = SECTIONS.iter().map(|s| s.name).collect();
        return Err(crate::Error::Input(format!("selftest: no section `{bad}` (sections: {})", known.join(", "))));
    }
    let mut c = Checker { cuda, rng: Rng::new(seed), rows: Vec::new() };
    for s in SECTIONS.iter().filter(|s| names.contains(&s.name)) {
        (s.run)(&mut c)?;
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
