//! Checks of kernels/optim.cu against engine/train/optim.rs: `Optimizer::step` for the AdamW
//! step, `grad_norm` / `clip_grad_norm` for the norm, the clip coefficient and the clipped
//! gradients. The kernels claim bitwise equality for the element-wise ops (AdamW, the scales);
//! the rows pass on the usual f32 tolerance and name the count of bitwise differences in their
//! shape so a broken claim is visible without failing the run.
use super::{Checker, TOL_F32};
use crate::backend::cuda::ops::optim::{self as gpu, AdamWScalars};
use crate::backend::cuda::{DeviceTensor, Elem};
use crate::error::{Error, Result};
use crate::train::optim::{clip_grad_norm, grad_norm, AdamW, Optimizer, ParamRef};

pub(super) fn check(c: &mut Checker) -> Result<()> {
    adamw(c)?;
    norm_and_clip(c)?;
    non_finite_norm(c)?;
    scale_and_count(c)?;
    Ok(())
}

/// Elements whose bits differ (a length mismatch counts every missing element).
fn bit_diffs(a: &[f32], b: &[f32]) -> usize {
    a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits()).count() + a.len().abs_diff(b.len())
}

/// Three AdamW updates at different learning rates (moments non-zero from the second on), on a
/// decayed tensor of 100_003 elements and an undecayed one of 1_001.
fn adamw(c: &mut Checker) -> Result<()> {
    let cuda = c.cuda;
    let config = AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
    let lrs = [1e-3, 4e-4, 2.5e-3];
    for (name, n, decay) in [("w", 100_003usize, true), ("b", 1_001, false)] {
        let mut opt = Optimizer::new(config, &[(name, &[n])])?;
        let mut host_p = c.random(n, 1.0);
        let grads: Vec<Vec<f32>> = lrs.iter().map(|_| c.random(n, 1e-2)).collect();
        let mut p = DeviceTensor::from_f32(cuda, &[n], &host_p, "adamw p")?;
        // m and v are read by the kernel: they start at the CPU's zeros, not poison.
        let mut m = DeviceTensor::zeros(cuda, &[n], Elem::F32, "adamw m")?;
        let mut v = DeviceTensor::zeros(cuda, &[n], Elem::F32, "adamw v")?;
        let mut last = None;
        for (t, (&lr, g)) in lrs.iter().zip(&grads).enumerate() {
            opt.step(&mut [ParamRef { name, values: &mut host_p, grad: g, decay }], lr)?;
            let gd = DeviceTensor::from_f32(cuda, &[n], g, "adamw g")?;
            let s = AdamWScalars::from_config(&config, lr, t as u64 + 1, decay);
            gpu::adamw_step(cuda, &mut p, &gd, &mut m, &mut v, &s)?;
            last = Some((gd, s));
        }
        let (out_p, out_m, out_v) = (p.to_f32_vec()?, m.to_f32_vec()?, v.to_f32_vec()?);
        let Some((gd, s)) = last else {
            return Err(Error::Input("adamw check: no steps".into()));
        };
        // After the read-back: further steps change the values, not the time.
        let ms = c.time(5, || gpu::adamw_step(cuda, &mut p, &gd, &mut m, &mut v, &s))?;
        let st = opt.state(name).ok_or_else(|| Error::Input(format!("adamw check: `{name}` not registered")))?;
        let what = if decay { "decay 0.1" } else { "no decay" };
        let steps = lrs.len();
        c.record("adamw_step_f32", format!("p [{n}], {what}, {steps} steps; {} differ bitwise", bit_diffs(&out_p, &host_p)), &out_p, &host_p, TOL_F32, ms);
        c.record("adamw_step_f32", format!("m [{n}], {what}, {steps} steps; {} differ bitwise", bit_diffs(&out_m, &st.m)), &out_m, &st.m, TOL_F32, ms);
        c.record("adamw_step_f32", format!("v [{n}], {what}, {steps} steps; {} differ bitwise", bit_diffs(&out_v, &st.v)), &out_v, &st.v, TOL_F32, ms);
    }
    Ok(())
}

/// `clip_grad_norm`'s coefficient as the kernel stores it: 1 when nothing is scaled.
fn expected_coef(total: f32, max_norm: f32) -> f32 {
    // optim.rs: `(1.0f32 / (total + 1e-6f32)) * max_norm`, applied only when finite and < 1.
    let coef = (1.0f32 / (total + 1e-6f32)) * max_norm;
    if total.is_finite() && coef < 1.0 {
        coef
    } else {
        1.0
    }
}

fn upload_all(c: &Checker, host: &[Vec<f32>]) -> Result<Vec<DeviceTensor>> {
    host.iter().map(|h| DeviceTensor::from_f32(c.cuda, &[h.len()], h, "gradient")).collect()
}

fn download_all(dev: &[DeviceTensor]) -> Result<Vec<f32>> {
    let mut out = Vec::new();
    for d in dev {
        out.extend(d.to_f32_vec()?);
    }
    Ok(out)
}

/// Tensors of odd lengths: 100_003 (four chunks of 32768, the last partial), exactly two chunks,
/// one past a chunk, a single element, an empty tensor, and a small one; once clipped (max_norm
/// 1, the total is ~17) and once not (max_norm 1000).
fn norm_and_clip(c: &mut Checker) -> Result<()> {
    let cuda = c.cuda;
    let lens = [100_003usize, 65_536, 32_769, 1, 0, 4_097];
    let host: Vec<Vec<f32>> = lens.iter().map(|&n| c.random(n, 1e-2)).collect();
    let shape = format!("{} tensors {lens:?}", lens.len());

    // Total only.
    let dev = upload_all(c, &host)?;
    let views: Vec<&DeviceTensor> = dev.iter().collect();
    let total_dev = gpu::grad_norm(cuda, &views)?;
    let got = total_dev.to_f32_vec()?;
    let cpu_total = grad_norm(host.iter().map(Vec::as_slice));
    let ms = c.time(5, || gpu::grad_norm(cuda, &views).map(drop))?;
    c.record("grad_norm (partial, finish, total)", shape.clone(), &got, &[cpu_total], TOL_F32, ms);

    for max_norm in [1.0f32, 1000.0] {
        let mut dev = upload_all(c, &host)?;
        let mut refs: Vec<&mut DeviceTensor> = dev.iter_mut().collect();
        let out = gpu::grad_norm_clip(cuda, &mut refs, max_norm)?;
        let got = out.to_f32_vec()?;
        let clipped = download_all(&dev)?;

        let mut cpu = host.clone();
        let mut cpu_refs: Vec<&mut [f32]> = cpu.iter_mut().map(Vec::as_mut_slice).collect();
        let total = clip_grad_norm(&mut cpu_refs, max_norm);
        let coef = expected_coef(total, max_norm);
        let cpu_clipped: Vec<f32> = cpu.concat();

        let mut refs: Vec<&mut DeviceTensor> = dev.iter_mut().collect();
        let ms = c.time(5, || gpu::grad_norm_clip(cuda, &mut refs, max_norm).map(drop))?;
        let (got_total, got_coef) = (got.first().copied().unwrap_or(f32::NAN), got.get(1).copied().unwrap_or(f32::NAN));
        let case = format!("{shape}, max_norm {max_norm}");
        c.record("grad_norm_total_clip_coef (total)", case.clone(), &[got_total], &[total], TOL_F32, ms);
        c.record("grad_norm_total_clip_coef (coef)", format!("{case}: coef {coef}"), &[got_coef], &[coef], TOL_F32, ms);
        let diffs = bit_diffs(&clipped, &cpu_clipped);
        c.record("scale_by_coef_f32", format!("{case}; {diffs} differ bitwise"), &clipped, &cpu_clipped, TOL_F32, ms);
    }
    Ok(())
}

/// Non-finite values as comparable numbers: NaN, +inf and -inf become 7, 8 and 9, so "left
/// alone" is checkable with a metric that fails on any non-finite value.
fn tag_non_finite(v: &[f32]) -> Vec<f32> {
    v.iter()
        .map(|&x| match x {
            x if x.is_nan() => 7.0,
            f32::INFINITY => 8.0,
            f32::NEG_INFINITY => 9.0,
            x => x,
        })
        .collect()
}

/// A NaN and an infinity among the gradients: the total is not finite, the coefficient is 1 and
/// the gradients are left exactly as they were (clip_grad_norm returns early).
fn non_finite_norm(c: &mut Checker) -> Result<()> {
    let cuda = c.cuda;
    let lens = [5_001usize, 777];
    let mut host: Vec<Vec<f32>> = lens.iter().map(|&n| c.random(n, 1.0)).collect();
    let (i, j) = (c.rng.below(lens[0]), c.rng.below(lens[1]));
    host[0][i] = f32::NAN;
    host[1][j] = f32::INFINITY;

    let mut dev = upload_all(c, &host)?;
    let mut refs: Vec<&mut DeviceTensor> = dev.iter_mut().collect();
    let out = gpu::grad_norm_clip(cuda, &mut refs, 1.0)?;
    let got = out.to_f32_vec()?;
    let after = download_all(&dev)?;

    let mut cpu = host.clone();
    let mut cpu_refs: Vec<&mut [f32]> = cpu.iter_mut().map(Vec::as_mut_slice).collect();
    let total = clip_grad_norm(&mut cpu_refs, 1.0);
    let cpu_after = cpu.concat();

    let flag = |x: f32| if x.is_finite() { 0.0 } else { 1.0 };
    let got_flags = [flag(got.first().copied().unwrap_or(0.0)), got.get(1).copied().unwrap_or(f32::NAN)];
    let shape = format!("{lens:?} with a NaN and an inf, max_norm 1");
    c.record("grad_norm_clip (non-finite total, coef)", format!("{shape}: [total not finite, coef]"), &got_flags, &[flag(total), expected_coef(total, 1.0)], TOL_F32, 0.0);
    // Left alone means the very same bits, NaN payload included.
    let diffs = bit_diffs(&after, &cpu_after);
    c.record("scale_by_coef_f32 (skipped)", format!("{shape}; {diffs} differ bitwise"), &tag_non_finite(&after), &tag_non_finite(&cpu_after), TOL_F32, 0.0);
    Ok(())
}

fn scale_and_count(c: &mut Checker) -> Result<()> {
    let cuda = c.cuda;
    let n = 100_003;

    let host = c.random(n, 1.0);
    let s = 0.37f32;
    let mut x = DeviceTensor::from_f32(cuda, &[n], &host, "scale x")?;
    gpu::scale(cuda, &mut x, s)?;
    let got = x.to_f32_vec()?;
    // The CPU's `*=` (clip_grad_norm, gradient averaging).
    let reference: Vec<f32> = host.iter().map(|&v| v * s).collect();
    let ms = c.time(5, || gpu::scale(cuda, &mut x, s))?;
    c.record("scale_f32", format!("[{n}] x {s}; {} differ bitwise", bit_diffs(&got, &reference)), &got, &reference, TOL_F32, ms);

    for plant in [false, true] {
        let mut host = c.random(n, 1.0);
        if plant {
            // Both ends (the grid-stride loop's first and last element) and a few inside.
            host[0] = f32::NAN;
            host[n - 1] = f32::NEG_INFINITY;
            for k in 0..7 {
                let i = c.rng.below(n);
                host[i] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][k % 3];
            }
        }
        let expected = host.iter().filter(|v| !v.is_finite()).count() as f32;
        let x = DeviceTensor::from_f32(cuda, &[n], &host, "count x")?;
        let got = gpu::count_nonfinite(cuda, &x)? as f32;
        let ms = c.time(5, || gpu::count_nonfinite(cuda, &x).map(drop))?;
        c.record("count_nonfinite_f32", format!("[{n}], {expected} non-finite"), &[got], &[expected], TOL_F32, ms);
    }
    Ok(())
}
