//! Checks of kernels/softmax_ce.cu against engine/train/loss.rs. `ce_row` and `logsumexp` are
//! private there, so the reference goes through `sft_loss` one row at a time: with norm 1 its
//! `ce` is `ce_row`'s loss exactly (a one-term sum divided by 1), with the check's norm its
//! gradient is `ce_row`'s `(softmax - onehot) / norm`. bf16 logits are compared against the CPU
//! run on the same bf16-rounded values, so every output here is an f32 path (TOL_F32).
use super::{Checker, TOL_F32};
use crate::backend::cuda::ops::softmax::{self as gpu, Targets, IGNORE};
use crate::backend::cuda::{DeviceTensor, Elem};
use crate::error::Result;
use crate::train::loss::sft_loss;
use half::bf16;

pub(super) fn check(c: &mut Checker) -> Result<()> {
    for (n, vocab) in [(37usize, 1000usize), (5, 49_152)] {
        for as_bf16 in [false, true] {
            case(c, n, vocab, as_bf16)?;
        }
    }
    Ok(())
}

/// `lse - z[y]` of one row (`ce_row`'s return value) and its gradient scaled by `1 / norm`.
fn cpu_row(z: &[f32], y: u32, norm: f64) -> Result<(f64, Vec<f32>)> {
    let vocab = z.len();
    let (stats, _) = sft_loss(z, vocab, &[y], 1.0)?;
    let (_, d) = sft_loss(z, vocab, &[y], norm)?;
    Ok((stats.ce, d))
}

fn case(c: &mut Checker, n: usize, vocab: usize, as_bf16: bool) -> Result<()> {
    let cuda = c.cuda;
    let raw = c.random(n * vocab, 2.0);
    let (logits, z, ty) = if as_bf16 {
        let z: Vec<f32> = raw.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
        (DeviceTensor::from_f32_as_bf16(cuda, &[n, vocab], &raw, "logits")?, z, "bf16")
    } else {
        (DeviceTensor::from_f32(cuda, &[n, vocab], &raw, "logits")?, raw, "f32")
    };
    let mut targets: Vec<u32> = (0..n).map(|_| c.rng.below(vocab) as u32).collect();
    let ignored = n / 2;
    targets[ignored] = IGNORE;
    // The normaliser counts the rows that carry a target, as sft_loss's callers compute it.
    let norm = (n - 1) as f64;
    let scale = 1.0 / norm;
    let shape = format!("{n} x {vocab} {ty}, row {ignored} ignored");
    let t = Targets::new(cuda, &targets, vocab)?;

    let mut ref_loss = vec![0.0f32; n];
    let mut ref_d = vec![0.0f32; n * vocab];
    let mut kept_z = Vec::with_capacity(n * vocab);
    let mut kept_t = Vec::with_capacity(n);
    for (r, &y) in targets.iter().enumerate() {
        if y == IGNORE {
            continue;
        }
        let zr = &z[r * vocab..(r + 1) * vocab];
        let (loss, d) = cpu_row(zr, y, norm)?;
        ref_loss[r] = loss as f32;
        ref_d[r * vocab..(r + 1) * vocab].copy_from_slice(&d);
        kept_z.extend_from_slice(zr);
        kept_t.push(y);
    }

    // Loss and gradient.
    let kernel = format!("softmax_ce_{ty}");
    let mut loss = DeviceTensor::empty(cuda, &[n], Elem::F64, "loss")?;
    let mut d = DeviceTensor::empty(cuda, &[n, vocab], Elem::F32, "dlogits")?;
    loss.fill_bytes(0xFF)?;
    d.fill_bytes(0xFF)?;
    gpu::softmax_ce(cuda, &mut loss, Some(&mut d), &logits, &t, scale)?;
    let (got_loss, got_d) = (loss.to_f32_vec()?, d.to_f32_vec()?);
    let ms = c.time(5, || gpu::softmax_ce(cuda, &mut loss, Some(&mut d), &logits, &t, scale))?;
    c.record(&kernel, format!("{shape}: loss"), &got_loss, &ref_loss, TOL_F32, ms);
    c.record(&kernel, format!("{shape}: dlogits, scale 1/{norm}"), &got_d, &ref_d, TOL_F32, ms);

    // Loss only (null dlogits).
    let mut loss_only = DeviceTensor::empty(cuda, &[n], Elem::F64, "loss")?;
    loss_only.fill_bytes(0xFF)?;
    gpu::softmax_ce(cuda, &mut loss_only, None, &logits, &t, scale)?;
    let got = loss_only.to_f32_vec()?;
    let ms = c.time(5, || gpu::softmax_ce(cuda, &mut loss_only, None, &logits, &t, scale))?;
    c.record(&kernel, format!("{shape}: loss only"), &got, &ref_loss, TOL_F32, ms);

    // The normalised total, from the first launch's per-row losses (`loss` is unchanged since).
    let mut total = DeviceTensor::empty(cuda, &[1], Elem::F64, "loss total")?;
    total.fill_bytes(0xFF)?;
    gpu::ce_loss_total(cuda, &mut total, &loss, norm)?;
    let got = total.to_f32_vec()?;
    let ms = c.time(5, || gpu::ce_loss_total(cuda, &mut total, &loss, norm))?;
    let (stats, _) = sft_loss(&kept_z, vocab, &kept_t, norm)?;
    c.record("ce_loss_total", format!("{shape}, norm {norm}"), &got, &[stats.ce as f32], TOL_F32, ms);

    // Log-softmax. lse comes from loss.rs too: the loss of target 0 is lse - z[0], exact in f64
    // up to one rounding, far below the f32 rounding of the output.
    let mut ref_ls = vec![0.0f32; n * vocab];
    for r in 0..n {
        let zr = &z[r * vocab..(r + 1) * vocab];
        let (ce0, _) = cpu_row(zr, 0, 1.0)?;
        let lse = ce0 + zr[0] as f64;
        for (o, &v) in ref_ls[r * vocab..(r + 1) * vocab].iter_mut().zip(zr) {
            *o = (v as f64 - lse) as f32;
        }
    }
    let mut ls = DeviceTensor::empty(cuda, &[n, vocab], Elem::F32, "log-softmax")?;
    ls.fill_bytes(0xFF)?;
    gpu::log_softmax(cuda, &mut ls, &logits)?;
    let got = ls.to_f32_vec()?;
    let ms = c.time(5, || gpu::log_softmax(cuda, &mut ls, &logits))?;
    c.record(&format!("log_softmax_{ty}"), shape.clone(), &got, &ref_ls, TOL_F32, ms);

    if as_bf16 {
        return Ok(());
    }
    // Log-softmax backward (f32 only), from the reference forward output. There is no CPU
    // function for it in the engine: this is PyTorch's _log_softmax_backward_data in f64,
    // dz = dy - exp(out) * rowsum(dy), the kernel comment's formula.
    let dy_host = c.random(n * vocab, 1.0);
    let mut ref_dz = vec![0.0f32; n * vocab];
    for r in 0..n {
        let span = r * vocab..(r + 1) * vocab;
        let s: f64 = dy_host[span.clone()].iter().map(|&v| v as f64).sum();
        for ((o, &g), &y) in ref_dz[span.clone()].iter_mut().zip(&dy_host[span.clone()]).zip(&ref_ls[span]) {
            *o = (g as f64 - (y as f64).exp() * s) as f32;
        }
    }
    let out = DeviceTensor::from_f32(cuda, &[n, vocab], &ref_ls, "log-softmax output")?;
    let dy = DeviceTensor::from_f32(cuda, &[n, vocab], &dy_host, "dy")?;
    let mut dz = DeviceTensor::empty(cuda, &[n, vocab], Elem::F32, "dz")?;
    dz.fill_bytes(0xFF)?;
    gpu::log_softmax_backward(cuda, &mut dz, &dy, &out)?;
    let got = dz.to_f32_vec()?;
    let ms = c.time(5, || gpu::log_softmax_backward(cuda, &mut dz, &dy, &out))?;
    c.record("log_softmax_backward_f32", format!("{n} x {vocab}"), &got, &ref_dz, TOL_F32, ms);

    let mut dy_inplace = DeviceTensor::from_f32(cuda, &[n, vocab], &dy_host, "dy")?;
    gpu::log_softmax_backward_inplace(cuda, &mut dy_inplace, &out)?;
    let got = dy_inplace.to_f32_vec()?;
    c.record("log_softmax_backward_f32", format!("{n} x {vocab}, in place (dz = dy)"), &got, &ref_dz, TOL_F32, ms);
    Ok(())
}
