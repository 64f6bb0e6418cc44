//! Helpers shared by the integration tests.
#![allow(dead_code)]
use std::path::PathBuf;

pub mod emu;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures").join(name)
}

/// `max |a - b| / max |b|` over the entries where `keep` is true: the error relative to the
/// reference's scale, so near-zero reference entries do not dominate.
pub fn rel_err(a: &[f32], b: &[f32], keep: impl Fn(usize) -> bool) -> f64 {
    assert_eq!(a.len(), b.len(), "compared tensors differ in length");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for i in 0..a.len() {
        if !keep(i) {
            continue;
        }
        if a[i].is_nan() || b[i].is_nan() {
            return f64::INFINITY;
        }
        num = num.max((a[i] as f64 - b[i] as f64).abs());
        den = den.max((b[i] as f64).abs());
    }
    num / den.max(1e-30)
}

/// Prints a uniform skip line (tests that need absent large files return early after it).
pub fn skip(test: &str, why: &str) {
    println!("skipped: {test}: {why}");
}
