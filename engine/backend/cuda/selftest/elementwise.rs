//! Checks of kernels/elementwise.cu against the CPU reference (engine/backend/cpu), f32 and bf16.
//!
//! bf16 paths: inputs are rounded to bf16 on the host first and the CPU reference runs on the
//! rounded values, so the only difference left is the kernel's final rounding of its output (and
//! reduction order); outputs are widened to f32 for the comparison. Every launch runs once on
//! poisoned (0xFF = NaN) outputs, or on uploaded initial values where the kernel adds into its
//! output, and that first result is the recorded error; the timing reruns come after the read-back,
//! so a launch that is not idempotent only disturbs values already checked.
use super::{round_bf16, Checker, TOL_BF16, TOL_F32};
use crate::backend::cpu;
use crate::backend::cuda::ops::elementwise as ops;
use crate::backend::cuda::{Cuda, DeviceTensor, Elem};
use crate::error::Result;

/// `[rows, h]` of the row kernels: odd widths (not multiples of 32 or 256) and one model-sized
/// shape (SmolLM2-135M's hidden size) with a row count that is not a multiple of the dw chunk.
const ROW_SHAPES: [(usize, usize); 3] = [(37, 1000), (37, 577), (1031, 576)];
/// `(rows, n_heads, head_dim)` of the RoPE checks: a half-width (23) that is no power of two, and
/// the model's 9 heads of 64.
const ROPE_SHAPES: [(usize, usize, usize); 2] = [(37, 7, 46), (1031, 9, 64)];
const EPS: f32 = 1e-5;
const THETA: f32 = 100_000.0;
const TIMING_REPS: usize = 5;

/// Random inputs with outliers, already representable in `e` (rounded for bf16).
fn input(c: &mut Checker, n: usize, scale: f32, e: Elem) -> Vec<f32> {
    let v = c.random(n, scale);
    if e == Elem::BF16 {
        round_bf16(&v)
    } else {
        v
    }
}

/// An output whose every element is NaN until the kernel writes it.
fn poisoned(cuda: &Cuda, shape: &[usize], e: Elem, what: &str) -> Result<DeviceTensor> {
    let t = DeviceTensor::empty(cuda, shape, e, what)?;
    t.fill_bytes(0xFF)?;
    Ok(t)
}

fn suffix(e: Elem) -> &'static str {
    if e == Elem::BF16 {
        "bf16"
    } else {
        "f32"
    }
}

fn tol(e: Elem) -> f64 {
    if e == Elem::BF16 {
        TOL_BF16
    } else {
        TOL_F32
    }
}

/// `1 / sqrt(mean(x[r]^2) + eps)` per row in f64: an independent reference for the saved rstd.
fn rstd_f64(x: &[f32], h: usize, eps: f32) -> Vec<f64> {
    x.chunks(h).map(|r| 1.0 / (r.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / h as f64 + eps as f64).sqrt()).collect()
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

pub(super) fn check(c: &mut Checker) -> Result<()> {
    for e in [Elem::F32, Elem::BF16] {
        for (i, &(rows, h)) in ROW_SHAPES.iter().enumerate() {
            rms_norm(c, e, rows, h)?;
            rms_norm_residual(c, e, rows, h)?;
            rms_norm_backward_dx(c, e, rows, h)?;
            // Both modes of the second pass, on different shapes.
            rms_norm_backward_dw(c, e, rows, h, i % 2 == 1)?;
        }
    }
    for (i, &(rows, cols)) in ROW_SHAPES.iter().enumerate() {
        column_sum(c, rows, cols, i % 2 == 0)?;
    }
    for e in [Elem::F32, Elem::BF16] {
        for &(rows, heads, hd) in &ROPE_SHAPES {
            rope(c, e, rows, heads, hd, false)?;
            rope(c, e, rows, heads, hd, true)?;
        }
    }
    for &(rows, heads, hd) in &ROPE_SHAPES {
        rope_backward(c, rows, heads, hd)?;
    }
    for e in [Elem::F32, Elem::BF16] {
        for &(rows, h) in &ROW_SHAPES {
            // The MLP's intermediate width is larger than the hidden one: 8/3 of it, kept odd.
            let n = rows * (h * 8 / 3 + 1);
            swiglu(c, e, n)?;
            swiglu_backward(c, e, n)?;
            add_bias(c, e, rows, h)?;
            add_inplace(c, e, rows * h)?;
        }
    }
    for &(rows, h) in &ROW_SHAPES {
        cast(c, rows * h)?;
    }
    Ok(())
}

fn rms_norm(c: &mut Checker, e: Elem, rows: usize, h: usize) -> Result<()> {
    let cuda = c.cuda;
    let name = format!("rms_norm_{}", suffix(e));
    let shape = format!("[{rows}, {h}]");
    let x = input(c, rows * h, 1.0, e);
    let w = input(c, h, 1.0, e);
    let mut reference = vec![0.0f32; rows * h];
    cpu::rms_norm(&mut reference, &x, &w, EPS);
    let rstd_ref = f32s(&rstd_f64(&x, h, EPS));

    let dx = DeviceTensor::from_f32_in(cuda, &[rows, h], &x, e, "x")?;
    let dw = DeviceTensor::from_f32_in(cuda, &[h], &w, e, "w")?;
    let mut y = poisoned(cuda, &[rows, h], e, "y")?;
    let mut rstd = poisoned(cuda, &[rows], Elem::F32, "rstd")?;
    ops::rms_norm(cuda, &mut y, &dx, &dw, Some(&mut rstd), EPS)?;
    let out = y.to_f32_vec()?;
    let rs = rstd.to_f32_vec()?;
    // Timed without rstd: the null-pointer path must run cleanly too.
    let ms = c.time(TIMING_REPS, || ops::rms_norm(cuda, &mut y, &dx, &dw, None, EPS))?;
    c.record(&name, shape.clone(), &out, &reference, tol(e), ms);
    c.record(&format!("{name} rstd"), shape, &rs, &rstd_ref, TOL_F32, ms);
    Ok(())
}

fn rms_norm_residual(c: &mut Checker, e: Elem, rows: usize, h: usize) -> Result<()> {
    let cuda = c.cuda;
    let name = format!("rms_norm_residual_{}", suffix(e));
    let shape = format!("[{rows}, {h}]");
    let resid0 = input(c, rows * h, 1.0, e);
    let x = input(c, rows * h, 1.0, e);
    let w = input(c, h, 1.0, e);
    // The unfused pair: add_inplace, the store's rounding, rms_norm of the stored sums.
    let mut resid_ref = resid0.clone();
    cpu::add_inplace(&mut resid_ref, &x);
    if e == Elem::BF16 {
        resid_ref = round_bf16(&resid_ref);
    }
    let mut reference = vec![0.0f32; rows * h];
    cpu::rms_norm(&mut reference, &resid_ref, &w, EPS);
    let rstd_ref = f32s(&rstd_f64(&resid_ref, h, EPS));

    let mut resid = DeviceTensor::from_f32_in(cuda, &[rows, h], &resid0, e, "resid")?;
    let dx = DeviceTensor::from_f32_in(cuda, &[rows, h], &x, e, "x")?;
    let dw = DeviceTensor::from_f32_in(cuda, &[h], &w, e, "w")?;
    let mut y = poisoned(cuda, &[rows, h], e, "y")?;
    let mut rstd = poisoned(cuda, &[rows], Elem::F32, "rstd")?;
    ops::rms_norm_residual(cuda, &mut y, &mut resid, &dx, &dw, Some(&mut rstd), EPS)?;
    let out = y.to_f32_vec()?;
    let resid_out = resid.to_f32_vec()?;
    let rs = rstd.to_f32_vec()?;
    let ms = c.time(TIMING_REPS, || ops::rms_norm_residual(cuda, &mut y, &mut resid, &dx, &dw, Some(&mut rstd), EPS))?;
    c.record(&name, shape.clone(), &out, &reference, tol(e), ms);
    c.record(&format!("{name} resid"), shape.clone(), &resid_out, &resid_ref, tol(e), ms);
    c.record(&format!("{name} rstd"), shape, &rs, &rstd_ref, TOL_F32, ms);
    Ok(())
}

fn rms_norm_backward_dx(c: &mut Checker, e: Elem, rows: usize, h: usize) -> Result<()> {
    let cuda = c.cuda;
    let name = format!("rms_norm_backward_dx_{}", suffix(e));
    let shape = format!("[{rows}, {h}]");
    let x = input(c, rows * h, 1.0, e);
    let w = input(c, h, 1.0, e);
    let dy = c.random(rows * h, 1.0);
    // The kernel adds into dx: start both sides from the same random gradient.
    let dx0 = c.random(rows * h, 1.0);
    let mut reference = dx0.clone();
    cpu::rms_norm_backward(&mut reference, &dy, &x, &w, EPS);
    let rstd_ref = f32s(&rstd_f64(&x, h, EPS));

    let mut dx = DeviceTensor::from_f32(cuda, &[rows, h], &dx0, "dx")?;
    let ddy = DeviceTensor::from_f32(cuda, &[rows, h], &dy, "dy")?;
    let xd = DeviceTensor::from_f32_in(cuda, &[rows, h], &x, e, "x")?;
    let wd = DeviceTensor::from_f32_in(cuda, &[h], &w, e, "w")?;
    let mut rstd = poisoned(cuda, &[rows], Elem::F32, "rstd")?;
    ops::rms_norm_backward_dx(cuda, &mut dx, &ddy, &xd, &wd, Some(&mut rstd), EPS)?;
    let out = dx.to_f32_vec()?;
    let rs = rstd.to_f32_vec()?;
    let ms = c.time(TIMING_REPS, || ops::rms_norm_backward_dx(cuda, &mut dx, &ddy, &xd, &wd, Some(&mut rstd), EPS))?;
    // f32 output from identical (rounded) inputs: the f32 tolerance for both input types.
    c.record(&name, shape.clone(), &out, &reference, TOL_F32, ms);
    c.record(&format!("{name} rstd"), shape, &rs, &rstd_ref, TOL_F32, ms);
    Ok(())
}

fn rms_norm_backward_dw(c: &mut Checker, e: Elem, rows: usize, h: usize, accumulate: bool) -> Result<()> {
    let cuda = c.cuda;
    let name = format!("rms_norm_backward_dw_{}", suffix(e));
    let shape = format!("[{rows}, {h}]{}", if accumulate { " accumulate" } else { "" });
    let x = input(c, rows * h, 1.0, e);
    let dy = c.random(rows * h, 1.0);
    let rstd: Vec<f32> = f32s(&rstd_f64(&x, h, EPS));
    let dw0 = c.random(h, 1.0);
    // No CPU function (the CPU trainer freezes norm weights): an f64 loop with the same rstd.
    let mut acc: Vec<f64> = if accumulate { dw0.iter().map(|&v| v as f64).collect() } else { vec![0.0; h] };
    for r in 0..rows {
        for (j, a) in acc.iter_mut().enumerate() {
            *a += dy[r * h + j] as f64 * x[r * h + j] as f64 * rstd[r] as f64;
        }
    }
    let reference = f32s(&acc);

    let ddy = DeviceTensor::from_f32(cuda, &[rows, h], &dy, "dy")?;
    let xd = DeviceTensor::from_f32_in(cuda, &[rows, h], &x, e, "x")?;
    let rd = DeviceTensor::from_f32(cuda, &[rows], &rstd, "rstd")?;
    let mut dw = if accumulate { DeviceTensor::from_f32(cuda, &[h], &dw0, "dw")? } else { poisoned(cuda, &[h], Elem::F32, "dw")? };
    ops::rms_norm_backward_dw(cuda, &mut dw, &ddy, &xd, &rd, accumulate)?;
    let out = dw.to_f32_vec()?;
    let ms = c.time(TIMING_REPS, || ops::rms_norm_backward_dw(cuda, &mut dw, &ddy, &xd, &rd, accumulate))?;
    c.record(&name, shape, &out, &reference, TOL_F32, ms);
    Ok(())
}

fn column_sum(c: &mut Checker, rows: usize, cols: usize, accumulate: bool) -> Result<()> {
    let cuda = c.cuda;
    let shape = format!("[{rows}, {cols}]{}", if accumulate { " accumulate" } else { "" });
    let input = c.random(rows * cols, 1.0);
    let out0 = c.random(cols, 1.0);
    let mut acc: Vec<f64> = if accumulate { out0.iter().map(|&v| v as f64).collect() } else { vec![0.0; cols] };
    for row in input.chunks(cols) {
        for (a, &v) in acc.iter_mut().zip(row) {
            *a += v as f64;
        }
    }
    let reference = f32s(&acc);

    let din = DeviceTensor::from_f32(cuda, &[rows, cols], &input, "input")?;
    let mut out = if accumulate { DeviceTensor::from_f32(cuda, &[cols], &out0, "out")? } else { poisoned(cuda, &[cols], Elem::F32, "out")? };
    ops::column_sum(cuda, &mut out, &din, accumulate)?;
    let got = out.to_f32_vec()?;
    let ms = c.time(TIMING_REPS, || ops::column_sum(cuda, &mut out, &din, accumulate))?;
    c.record("column_sum_f32", shape, &got, &reference, TOL_F32, ms);
    Ok(())
}

fn tables(rows: usize, head_dim: usize) -> (Vec<f32>, Vec<f32>) {
    let positions: Vec<usize> = (0..rows).collect();
    cpu::rope_tables(&positions, head_dim, THETA)
}

/// RoPE forward with per-row tables, or (`indexed`) with a shared position table and a u32
/// position per row, as the KV cache uses it; then the last row's position is put one past the
/// table, which must turn exactly that row into NaN.
fn rope(c: &mut Checker, e: Elem, rows: usize, n_heads: usize, head_dim: usize, indexed: bool) -> Result<()> {
    let cuda = c.cuda;
    let name = format!("rope_{}{}", suffix(e), if indexed { " (position table)" } else { "" });
    let width = n_heads * head_dim;
    let half = head_dim / 2;
    let shape = format!("[{rows}, {n_heads} x {head_dim}]");
    let x = input(c, rows * width, 1.0, e);
    let table_rows = if indexed { rows / 2 + 3 } else { rows };
    let positions: Vec<usize> = match indexed {
        true => (0..rows).map(|_| c.rng.below(table_rows)).collect(),
        false => (0..rows).collect(),
    };
    let (cos, sin) = cpu::rope_tables(&positions, head_dim, THETA);
    let mut reference = x.clone();
    cpu::rope_inplace(&mut reference, n_heads, head_dim, &cos, &sin);

    let mut xd = DeviceTensor::from_f32_in(cuda, &[rows, width], &x, e, "x")?;
    let (cos, sin) = tables(table_rows, head_dim);
    let cd = DeviceTensor::from_f32(cuda, &[table_rows, half], &cos, "cos")?;
    let sd = DeviceTensor::from_f32(cuda, &[table_rows, half], &sin, "sin")?;
    let mut pos: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
    let pd = DeviceTensor::from_u32(cuda, &[rows], &pos, "pos")?;
    let t = ops::RopeTables { cos: &cd, sin: &sd, pos: indexed.then_some(&pd) };
    ops::rope(cuda, &mut xd, t, n_heads, head_dim)?;
    let out = xd.to_f32_vec()?;
    let ms = c.time(TIMING_REPS, || ops::rope(cuda, &mut xd, t, n_heads, head_dim))?;
    c.record(&name, shape.clone(), &out, &reference, tol(e), ms);
    if indexed && rows > 0 {
        *pos.last_mut().expect("rows > 0") = table_rows as u32;
        let pd = DeviceTensor::from_u32(cuda, &[rows], &pos, "pos")?;
        let mut xd = DeviceTensor::from_f32_in(cuda, &[rows, width], &x, e, "x")?;
        ops::rope(cuda, &mut xd, ops::RopeTables { pos: Some(&pd), ..t }, n_heads, head_dim)?;
        // 1 where the output is NaN: the last row only.
        let nan: Vec<f32> = xd.to_f32_vec()?.iter().map(|v| v.is_nan() as u8 as f32).collect();
        let want: Vec<f32> = (0..rows * width).map(|i| (i >= (rows - 1) * width) as u8 as f32).collect();
        c.record(&format!("rope_{} (position past the table is NaN)", suffix(e)), shape, &nan, &want, 0.0, 0.0);
    }
    Ok(())
}

fn rope_backward(c: &mut Checker, rows: usize, n_heads: usize, head_dim: usize) -> Result<()> {
    let cuda = c.cuda;
    let width = n_heads * head_dim;
    let shape = format!("[{rows}, {n_heads} x {head_dim}]");
    let dx = c.random(rows * width, 1.0);
    let (cos, sin) = tables(rows, head_dim);
    // The CPU backward: the forward rotation with the sines negated (backprop.rs).
    let neg_sin: Vec<f32> = sin.iter().map(|v| -v).collect();
    let mut reference = dx.clone();
    cpu::rope_inplace(&mut reference, n_heads, head_dim, &cos, &neg_sin);

    let mut dd = DeviceTensor::from_f32(cuda, &[rows, width], &dx, "dx")?;
    let cd = DeviceTensor::from_f32(cuda, &[rows, head_dim / 2], &cos, "cos")?;
    let sd = DeviceTensor::from_f32(cuda, &[rows, head_dim / 2], &sin, "sin")?;
    let t = ops::RopeTables { cos: &cd, sin: &sd, pos: None };
    ops::rope_backward(cuda, &mut dd, t, n_heads, head_dim)?;
    let out = dd.to_f32_vec()?;
    let ms = c.time(TIMING_REPS, || ops::rope_backward(cuda, &mut dd, t, n_heads, head_dim))?;
    c.record("rope_backward_f32", shape, &out, &reference, TOL_F32, ms);
    Ok(())
}

fn swiglu(c: &mut Checker, e: Elem, n: usize) -> Result<()> {
    let cuda = c.cuda;
    let name = format!("swiglu_{}", suffix(e));
    let gate = input(c, n, 2.0, e);
    let up = input(c, n, 1.0, e);
    let mut reference = gate.clone();
    cpu::silu_mul(&mut reference, &up);

    let gd = DeviceTensor::from_f32_in(cuda, &[n], &gate, e, "gate")?;
    let ud = DeviceTensor::from_f32_in(cuda, &[n], &up, e, "up")?;
    let mut out = poisoned(cuda, &[n], e, "out")?;
    ops::swiglu(cuda, &mut out, &gd, &ud)?;
    let got = out.to_f32_vec()?;
    let ms = c.time(TIMING_REPS, || ops::swiglu(cuda, &mut out, &gd, &ud))?;
    c.record(&name, format!("[{n}]"), &got, &reference, tol(e), ms);

    // In place on gate (out aliases gate in the kernel).
    let mut g2 = DeviceTensor::from_f32_in(cuda, &[n], &gate, e, "gate")?;
    ops::swiglu_inplace(cuda, &mut g2, &ud)?;
    let got = g2.to_f32_vec()?;
    let ms = c.time(TIMING_REPS, || ops::swiglu_inplace(cuda, &mut g2, &ud))?;
    c.record(&name, format!("[{n}] in place"), &got, &reference, tol(e), ms);
    Ok(())
}

fn swiglu_backward(c: &mut Checker, e: Elem, n: usize) -> Result<()> {
    let cuda = c.cuda;
    let name = format!("swiglu_backward_{}", suffix(e));
    let gate = input(c, n, 2.0, e);
    let up = input(c, n, 1.0, e);
    let da = c.random(n, 1.0);
    let (mut dg_ref, mut du_ref) = (vec![0.0f32; n], vec![0.0f32; n]);
    cpu::silu_mul_backward(&mut dg_ref, &mut du_ref, &da, &gate, &up);

    let gd = DeviceTensor::from_f32_in(cuda, &[n], &gate, e, "gate")?;
    let ud = DeviceTensor::from_f32_in(cuda, &[n], &up, e, "up")?;
    let dad = DeviceTensor::from_f32(cuda, &[n], &da, "da")?;
    let mut dg = poisoned(cuda, &[n], Elem::F32, "dg")?;
    let mut du = poisoned(cuda, &[n], Elem::F32, "du")?;
    ops::swiglu_backward(cuda, &mut dg, &mut du, &dad, &gd, &ud)?;
    let (dg_out, du_out) = (dg.to_f32_vec()?, du.to_f32_vec()?);
    let ms = c.time(TIMING_REPS, || ops::swiglu_backward(cuda, &mut dg, &mut du, &dad, &gd, &ud))?;
    // f32 gradients from identical (rounded) inputs: the f32 tolerance for both input types.
    c.record(&name, format!("[{n}] dg"), &dg_out, &dg_ref, TOL_F32, ms);
    c.record(&name, format!("[{n}] du"), &du_out, &du_ref, TOL_F32, ms);
    Ok(())
}

fn add_bias(c: &mut Checker, e: Elem, rows: usize, cols: usize) -> Result<()> {
    let cuda = c.cuda;
    let name = format!("add_bias_{}", suffix(e));
    let x = input(c, rows * cols, 1.0, e);
    let bias = input(c, cols, 1.0, e);
    let mut reference = x.clone();
    cpu::add_bias(&mut reference, &bias);

    let mut xd = DeviceTensor::from_f32_in(cuda, &[rows, cols], &x, e, "x")?;
    let bd = DeviceTensor::from_f32_in(cuda, &[cols], &bias, e, "bias")?;
    ops::add_bias(cuda, &mut xd, &bd)?;
    let out = xd.to_f32_vec()?;
    let ms = c.time(TIMING_REPS, || ops::add_bias(cuda, &mut xd, &bd))?;
    c.record(&name, format!("[{rows}, {cols}]"), &out, &reference, tol(e), ms);
    Ok(())
}

fn add_inplace(c: &mut Checker, e: Elem, n: usize) -> Result<()> {
    let cuda = c.cuda;
    let name = format!("add_inplace_{}", suffix(e));
    let acc = input(c, n, 1.0, e);
    let x = input(c, n, 1.0, e);
    let mut reference = acc.clone();
    cpu::add_inplace(&mut reference, &x);

    let mut ad = DeviceTensor::from_f32_in(cuda, &[n], &acc, e, "acc")?;
    let xd = DeviceTensor::from_f32_in(cuda, &[n], &x, e, "x")?;
    ops::add_inplace(cuda, &mut ad, &xd)?;
    let out = ad.to_f32_vec()?;
    let ms = c.time(TIMING_REPS, || ops::add_inplace(cuda, &mut ad, &xd))?;
    c.record(&name, format!("[{n}]"), &out, &reference, tol(e), ms);
    Ok(())
}

fn cast(c: &mut Checker, n: usize) -> Result<()> {
    let cuda = c.cuda;
    // f32 -> bf16: the reference is the host's round-to-nearest-even.
    let x = c.random(n, 1.0);
    let reference = round_bf16(&x);
    let xd = DeviceTensor::from_f32(cuda, &[n], &x, "input")?;
    let mut out = poisoned(cuda, &[n], Elem::BF16, "out")?;
    ops::cast(cuda, &mut out, &xd)?;
    let got = out.to_f32_vec()?;
    let ms = c.time(TIMING_REPS, || ops::cast(cuda, &mut out, &xd))?;
    // Both sides round to nearest even: anything but bitwise equality is a bug (truncation would
    // pass a 1e-2 tolerance).
    c.record("cast_f32_to_bf16", format!("[{n}]"), &got, &reference, super::TOL_EXACT, ms);

    // bf16 -> f32 is exact: the reference is the bf16 values themselves.
    let b = round_bf16(&c.random(n, 1.0));
    let bd = DeviceTensor::from_f32_as_bf16(cuda, &[n], &b, "input")?;
    let mut out = poisoned(cuda, &[n], Elem::F32, "out")?;
    ops::cast(cuda, &mut out, &bd)?;
    let got = out.to_f32_vec()?;
    let ms = c.time(TIMING_REPS, || ops::cast(cuda, &mut out, &bd))?;
    c.record("cast_bf16_to_f32", format!("[{n}]"), &got, &b, super::TOL_EXACT, ms);
    Ok(())
}
