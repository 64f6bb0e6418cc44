//! Checks of kernels/embedding.cu against the CPU semantics of engine/train/backprop.rs: the row
//! gather at the start of the forward, and the scatter-add of trainable token rows at the end of
//! the backward (`grad[slot[tok[i]]] += dx[i]` for masked positions, in ascending order).
use super::{Checker, TOL_BF16, TOL_F32};
use crate::backend::cuda::ops::embedding::{self as ops, NOT_TRAINABLE};
use crate::backend::cuda::{DeviceTensor, Elem};
use crate::error::Result;
use half::bf16;

/// `(n tokens, vocab, h)`: odd sizes, and one model-width shape with a batch's worth of tokens.
const SHAPES: [(usize, usize, usize); 2] = [(37, 1000, 577), (1031, 4099, 576)];
/// Trainable rows of each scatter check (the item tokens of a small catalogue).
const SLOTS: [usize; 2] = [5, 29];
const TIMING_REPS: usize = 5;

pub(super) fn check(c: &mut Checker) -> Result<()> {
    for &(n, vocab, h) in &SHAPES {
        for (table, out) in [(Elem::F32, Elem::F32), (Elem::BF16, Elem::BF16), (Elem::BF16, Elem::F32)] {
            gather(c, n, vocab, h, table, out)?;
        }
    }
    for (&(n, vocab, h), &n_slots) in SHAPES.iter().zip(&SLOTS) {
        scatter_add(c, n, vocab, h, n_slots)?;
    }
    Ok(())
}

fn gather(c: &mut Checker, n: usize, vocab: usize, h: usize, table_elem: Elem, out_elem: Elem) -> Result<()> {
    let cuda = c.cuda;
    let (kernel, tol) = match (table_elem, out_elem) {
        (Elem::F32, _) => ("embedding_gather_f32", TOL_F32),
        (_, Elem::BF16) => ("embedding_gather_bf16", TOL_BF16),
        _ => ("embedding_gather_bf16_to_f32", TOL_F32),
    };
    let mut table = c.random(vocab * h, 1.0);
    if table_elem == Elem::BF16 {
        table = table.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
    }
    // The first and last rows are where an off-by-one row offset would show.
    let mut tokens: Vec<u32> = (0..n).map(|_| c.rng.below(vocab) as u32).collect();
    tokens[0] = 0;
    tokens[n - 1] = (vocab - 1) as u32;
    let reference: Vec<f32> = tokens.iter().flat_map(|&t| table[t as usize * h..(t as usize + 1) * h].iter().copied()).collect();

    let td = if table_elem == Elem::BF16 {
        DeviceTensor::from_f32_as_bf16(cuda, &[vocab, h], &table, "table")?
    } else {
        DeviceTensor::from_f32(cuda, &[vocab, h], &table, "table")?
    };
    let tokd = DeviceTensor::from_u32(cuda, &[n], &tokens, "tokens")?;
    let mut out = DeviceTensor::empty(cuda, &[n, h], out_elem, "out")?;
    out.fill_bytes(0xFF)?;
    ops::gather(cuda, &mut out, &td, &tokd)?;
    let got = out.to_f32_vec()?;
    let ms = c.time(TIMING_REPS, || ops::gather(cuda, &mut out, &td, &tokd))?;
    c.record(kernel, format!("n {n}, table [{vocab}, {h}]"), &got, &reference, tol, ms);
    Ok(())
}

fn scatter_add(c: &mut Checker, n: usize, vocab: usize, h: usize, n_slots: usize) -> Result<()> {
    let cuda = c.cuda;
    let shape = format!("n {n}, vocab {vocab}, grad [{n_slots}, {h}]");
    // Distinct trainable token ids; the last one never occurs in the batch, so its slot has an
    // empty list (the kernels must leave that row as it was).
    let mut trainable: Vec<u32> = Vec::with_capacity(n_slots);
    while trainable.len() < n_slots {
        let t = c.rng.below(vocab) as u32;
        if !trainable.contains(&t) {
            trainable.push(t);
        }
    }
    let absent = trainable[n_slots - 1];
    let mut slot = vec![NOT_TRAINABLE; vocab];
    for (s, &t) in trainable.iter().enumerate() {
        slot[t as usize] = s as u32;
    }
    // Half the positions hold a trainable token (so rows receive several contributions, in an
    // order that matters in f32), the rest any token; about 1 in 5 positions is masked out.
    let tokens: Vec<u32> = (0..n)
        .map(|_| {
            let t = if c.rng.below(2) == 0 { trainable[c.rng.below(n_slots - 1)] } else { c.rng.below(vocab) as u32 };
            if t == absent {
                (t + 1) % vocab as u32
            } else {
                t
            }
        })
        .collect();
    let mask: Vec<bool> = (0..n).map(|_| c.rng.below(5) != 0).collect();
    let dx = c.random(n * h, 1.0);
    let grad0 = c.random(n_slots * h, 1.0);

    // The CPU loop of backprop.rs.
    let mut reference = grad0.clone();
    for (i, &tok) in tokens.iter().enumerate() {
        let s = slot[tok as usize];
        if s != NOT_TRAINABLE && mask[i] {
            let s = s as usize;
            for (g, &d) in reference[s * h..(s + 1) * h].iter_mut().zip(&dx[i * h..(i + 1) * h]) {
                *g += d;
            }
        }
    }

    let dxd = DeviceTensor::from_f32(cuda, &[n, h], &dx, "dx")?;

    let (offsets, positions) = ops::csr_positions(&tokens, &mask, &slot, n_slots)?;
    let od = DeviceTensor::from_u32(cuda, &[n_slots + 1], &offsets, "offsets")?;
    let pd = DeviceTensor::from_u32(cuda, &[positions.len()], &positions, "positions")?;
    let mut grad = DeviceTensor::from_f32(cuda, &[n_slots, h], &grad0, "grad")?;
    ops::scatter_add_csr(cuda, &mut grad, &dxd, &od, &pd)?;
    let got = grad.to_f32_vec()?;
    let ms = c.time(TIMING_REPS, || ops::scatter_add_csr(cuda, &mut grad, &dxd, &od, &pd))?;
    c.record("embedding_scatter_add_csr_f32", shape.clone(), &got, &reference, TOL_F32, ms);

    let mask8: Vec<u8> = mask.iter().map(|&m| m as u8).collect();
    let tokd = DeviceTensor::from_u32(cuda, &[n], &tokens, "tokens")?;
    let md = DeviceTensor::from_u8(cuda, &[n], &mask8, "mask")?;
    let sd = DeviceTensor::from_u32(cuda, &[vocab], &slot, "slot")?;
    let mut grad = DeviceTensor::from_f32(cuda, &[n_slots, h], &grad0, "grad")?;
    ops::scatter_add_scan(cuda, &mut grad, &dxd, &tokd, &md, &sd)?;
    let got = grad.to_f32_vec()?;
    let ms = c.time(TIMING_REPS, || ops::scatter_add_scan(cuda, &mut grad, &dxd, &tokd, &md, &sd))?;
    c.record("embedding_scatter_add_scan_f32", shape, &got, &reference, TOL_F32, ms);
    Ok(())
}
