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

/// Four short "histories -> item" samples on the tiny Llama; item tokens are 200..=207.
pub fn train_samples() -> (Vec<ilrec::train::trainer::Example>, Vec<u32>) {
    let items: Vec<u32> = (200..208).collect();
    let prompts: [&[u32]; 4] = [&[11, 12, 13, 14], &[21, 22, 23], &[31, 32, 33, 34, 35], &[41, 42]];
    let responses: [&[u32]; 4] = [&[200, 204, 2], &[201, 205, 2], &[202, 206, 2], &[203, 207, 2]];
    let data = prompts
        .iter()
        .zip(responses)
        .map(|(p, r)| {
            let mut ex = ilrec::train::trainer::Example::prompt_response(p, r);
            ex.item_mask = r.iter().map(|t| items.contains(t)).collect();
            ex
        })
        .collect();
    (data, items)
}
