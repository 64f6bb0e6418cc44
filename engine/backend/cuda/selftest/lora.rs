//! Checks of kernels/lora.cu (ops/lora.rs) against the CPU: the formulas of `lin_fwd` / `lin_bwd`
//! (engine/train/backprop.rs) through the CPU backend's GEMMs in f32 on the bf16-rounded inputs
//! the device sees, and `y` / `dx` once more against an independent f64 host loop. Ranks 4 to 64,
//! shapes that are and are not multiples of the tiles and of 8 (the cp.async and the element-load
//! paths), with and without dropout and bias, both ways of getting the low-rank product. The
//! rounded copies the kernels write (`bf16(x * mask)`, `bf16(dy)`) must be bitwise the host's.
use super::{round_bf16, Checker, TOL_BF16, TOL_EXACT};
use crate::backend::cpu::{matmul_nn, matmul_nt, matmul_tn};
use crate::backend::cuda::ops::lora::{self, DownFactor, Dropout, LowRank};
use crate::backend::cuda::{DeviceTensor, Elem};
use crate::error::Result;

/// One linear: rows m, in k, out n, rank r, dropout p, bias.
#[derive(Clone, Copy, Debug)]
struct Case {
    m: usize,
    k: usize,
    n: usize,
    r: usize,
    p: f32,
    bias: bool,
}

const CASES: [Case; 6] = [
    // SmolLM2 q projection with a (Qwen2-style) bias: every dimension a multiple of 8, M odd.
    Case { m: 129, k: 576, n: 576, r: 16, p: 0.0, bias: true },
    // k/v projection, rank 8, dropout.
    Case { m: 129, k: 576, n: 192, r: 8, p: 0.1, bias: false },
    // gate/up at the authors' rank 64 with their dropout 0.05.
    Case { m: 200, k: 576, n: 1536, r: 64, p: 0.05, bias: false },
    // down projection, rank 32.
    Case { m: 77, k: 1536, n: 576, r: 32, p: 0.0, bias: false },
    // Nothing a multiple of 8 (element loads), rank 12, dropout and bias.
    Case { m: 37, k: 131, n: 93, r: 12, p: 0.1, bias: true },
    // One row, rank 4 (the model check's adapter).
    Case { m: 1, k: 64, n: 40, r: 4, p: 0.0, bias: false },
];

pub(super) fn check(c: &mut Checker) -> Result<()> {
    for case in CASES {
        run_case(c, case)?;
    }
    Ok(())
}

/// `y[m, n] = sum_l a(i, l) b(l, j)` in f64 with accessors (the independent reference).
fn f64_product(m: usize, n: usize, k: usize, a: impl Fn(usize, usize) -> f64, b: impl Fn(usize, usize) -> f64) -> Vec<f64> {
    let mut y = vec![0.0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            y[i * n + j] = (0..k).map(|l| a(i, l) * b(l, j)).sum();
        }
    }
    y
}

fn as_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

fn run_case(c: &mut Checker, cs: Case) -> Result<()> {
    let cuda = c.cuda;
    let Case { m, k, n, r, p, bias } = cs;
    let s = 2.0 / r as f32; // alpha = 2r: the low-rank term is as large as the base one
    let x = c.random(m * k, 1.0);
    let w = c.random(n * k, 1.0 / (k as f32).sqrt());
    let a = c.random(r * k, 1.0 / (k as f32).sqrt());
    let b = c.random(n * r, 1.0 / (r as f32).sqrt());
    let bias_v = if bias { c.random(n, 1.0) } else { Vec::new() };
    let dy = c.random(m * n, 1.0);
    let dx0 = c.random(m * k, 1.0);
    let ga0 = c.random(r * k, 1.0);
    let gb0 = c.random(n * r, 1.0);
    let keep = 1.0 / (1.0 - p);
    // The CPU's draw: an element is dropped when the uniform falls below p.
    let kept: Vec<u8> = (0..m * k).map(|_| if p > 0.0 && c.rng.next_f32() < p { 0 } else { 1 }).collect();
    let mult: Vec<f32> = kept.iter().map(|&q| if p > 0.0 { if q == 1 { keep } else { 0.0 } } else { 1.0 }).collect();

    // Host reference on what the device holds.
    let (xr, wr, ar, br, dyr) = (round_bf16(&x), round_bf16(&w), round_bf16(&a), round_bf16(&b), round_bf16(&dy));
    let xd: Vec<f32> = if p > 0.0 { x.iter().zip(&mult).map(|(v, q)| v * q).collect() } else { x.clone() };
    let xdr = round_bf16(&xd);
    let mut u_ref = vec![0.0f32; m * r];
    matmul_nt(&mut u_ref, r, &xdr, k, &ar, k, m, r, k, false);
    let us: Vec<f32> = u_ref.iter().map(|v| v * s).collect();
    let mut y_ref = vec![0.0f32; m * n];
    matmul_nt(&mut y_ref, n, &xr, k, &wr, k, m, n, k, false);
    if bias {
        y_ref.chunks_mut(n).for_each(|row| row.iter_mut().zip(&bias_v).for_each(|(y, b)| *y += b));
    }
    matmul_nt(&mut y_ref, n, &us, r, &br, r, m, n, r, true);
    let mut du_ref = vec![0.0f32; m * r];
    matmul_nn(&mut du_ref, r, &dyr, n, &br, r, m, r, n, false);
    du_ref.iter_mut().for_each(|v| *v *= s);
    let mut dx_ref = dx0.clone();
    matmul_nn(&mut dx_ref, k, &dyr, n, &wr, k, m, k, n, true);
    let mut dxd = vec![0.0f32; m * k];
    matmul_nn(&mut dxd, k, &du_ref, r, &ar, k, m, k, r, false);
    dx_ref.iter_mut().zip(&dxd).zip(&mult).for_each(|((d, v), q)| *d += v * q);
    let mut ga_ref = ga0.clone();
    matmul_tn(&mut ga_ref, k, &du_ref, r, &xdr, k, r, k, m, true);
    let mut gb_ref = gb0.clone();
    matmul_tn(&mut gb_ref, r, &dyr, n, &us, r, n, r, m, true);

    // Independent f64 loops for the two outputs the trainer consumes.
    let f = |v: &[f32], i: usize| v[i] as f64;
    let u64_ = f64_product(m, r, k, |i, l| f(&xdr, i * k + l), |l, j| f(&ar, j * k + l));
    let base = f64_product(m, n, k, |i, l| f(&xr, i * k + l), |l, j| f(&wr, j * k + l));
    let low = f64_product(m, n, r, |i, l| u64_[i * r + l], |l, j| f(&br, j * r + l));
    let y64: Vec<f64> = (0..m * n).map(|i| base[i] + s as f64 * low[i] + if bias { bias_v[i % n] as f64 } else { 0.0 }).collect();
    let du64: Vec<f64> = f64_product(m, r, n, |i, l| f(&dyr, i * n + l), |l, j| f(&br, l * r + j)).iter().map(|v| v * s as f64).collect();
    let dbase = f64_product(m, k, n, |i, l| f(&dyr, i * n + l), |l, j| f(&wr, l * k + j));
    let dlow = f64_product(m, k, r, |i, l| du64[i * r + l], |l, j| f(&ar, l * k + j));
    let dx64: Vec<f64> = (0..m * k).map(|i| dx0[i] as f64 + dbase[i] + dlow[i] * mult[i] as f64).collect();

    // Device operands.
    let x16 = DeviceTensor::from_f32_as_bf16(cuda, &[m, k], &x, "LoRA x (bf16)")?;
    let x32 = DeviceTensor::from_f32(cuda, &[m, k], &x, "LoRA x (f32)")?;
    let w16 = DeviceTensor::from_f32_as_bf16(cuda, &[n, k], &w, "LoRA W")?;
    let a16 = DeviceTensor::from_f32_as_bf16(cuda, &[r, k], &a, "LoRA A")?;
    let b16 = DeviceTensor::from_f32_as_bf16(cuda, &[n, r], &b, "LoRA B")?;
    let bias_d = if bias { Some(DeviceTensor::from_f32(cuda, &[n], &bias_v, "LoRA bias")?) } else { None };
    let mask_d = DeviceTensor::from_u8(cuda, &[m, k], &kept, "LoRA dropout mask")?;
    let drop = (p > 0.0).then_some(Dropout { mask: &mask_d, keep });
    let dy32 = DeviceTensor::from_f32(cuda, &[m, n], &dy, "LoRA dy (f32)")?;
    let dy16 = DeviceTensor::from_f32_as_bf16(cuda, &[m, n], &dy, "LoRA dy (bf16)")?;
    let poisoned = |shape: &[usize], elem: Elem, what: &str| -> Result<DeviceTensor> {
        let t = DeviceTensor::empty(cuda, shape, elem, what)?;
        t.fill_bytes(0xFF)?;
        Ok(t)
    };
    let label = format!("m{m} k{k} n{n} r{r} p{p}{}", if bias { " bias" } else { "" });

    // Forward, both ways of getting u.
    let mut xd16 = poisoned(&[m, k], Elem::BF16, "LoRA dropped x")?;
    let mut u_given = poisoned(&[m, r], Elem::BF16, "LoRA u")?;
    {
        let (src, xo) = if p > 0.0 { (&x32, Some(&mut xd16)) } else { (&x16, None) };
        lora::down(cuda, &mut u_given, xo, src, drop, &a16, DownFactor::RowsAreRank, 1.0)?;
        let got = u_given.to_f32_vec()?;
        let ms = c.time(5, || lora::down(cuda, &mut u_given, None, src, drop, &a16, DownFactor::RowsAreRank, 1.0))?;
        let kernel = if p > 0.0 { "lora_down (x f32, dropout)" } else { "lora_down (x bf16)" };
        c.record(kernel, format!("{label}: u"), &got, &u_ref, TOL_BF16, ms);
        if p > 0.0 {
            c.record("lora_down (x f32, dropout)", format!("{label}: bf16(x * mask)"), &xd16.to_f32_vec()?, &xdr, TOL_EXACT, 0.0);
        }
    }
    let lows: &[LowRank] = if p > 0.0 { &[LowRank::Given] } else { &[LowRank::InLoop, LowRank::Given] };
    for &low in lows {
        let mut y = poisoned(&[m, n], Elem::F32, "LoRA y")?;
        let mut u_loop = poisoned(&[m, r], Elem::BF16, "LoRA u (in loop)")?;
        let u = if low == LowRank::Given { &mut u_given } else { &mut u_loop };
        lora::forward(cuda, low, &mut y, u, &x16, &w16, &a16, &b16, bias_d.as_ref(), s)?;
        let got_y = y.to_f32_vec()?;
        let got_u = u.to_f32_vec()?;
        let ms = c.time(5, || lora::forward(cuda, low, &mut y, u, &x16, &w16, &a16, &b16, bias_d.as_ref(), s))?;
        let kernel = format!("lora_gemm_fwd ({low:?})");
        c.record(&kernel, format!("{label}: y"), &got_y, &y_ref, TOL_BF16, ms);
        c.record(&kernel, format!("{label}: y vs f64"), &got_y, &as_f32(&y64), TOL_BF16, 0.0);
        if low == LowRank::InLoop {
            c.record(&kernel, format!("{label}: u"), &got_u, &u_ref, TOL_BF16, 0.0);
        }
    }

    // Backward: du from the cast pass over the f32 dy (the trainer's path), or in the loop.
    let mut du_given = poisoned(&[m, r], Elem::BF16, "LoRA du")?;
    let mut dy16_out = poisoned(&[m, n], Elem::BF16, "LoRA bf16 dy")?;
    lora::down(cuda, &mut du_given, Some(&mut dy16_out), &dy32, None, &b16, DownFactor::ColsAreRank, s)?;
    let got = du_given.to_f32_vec()?;
    let ms = c.time(5, || lora::down(cuda, &mut du_given, Some(&mut dy16_out), &dy32, None, &b16, DownFactor::ColsAreRank, s))?;
    c.record("lora_down (dy f32, cast)", format!("{label}: du"), &got, &du_ref, TOL_BF16, ms);
    c.record("lora_down (dy f32, cast)", format!("{label}: bf16(dy)"), &dy16_out.to_f32_vec()?, &dyr, TOL_EXACT, 0.0);
    for low in [LowRank::Given, LowRank::InLoop] {
        let mut dx = DeviceTensor::from_f32(cuda, &[m, k], &dx0, "LoRA dx")?;
        let mut du_loop = poisoned(&[m, r], Elem::BF16, "LoRA du (in loop)")?;
        let du = if low == LowRank::Given { &mut du_given } else { &mut du_loop };
        lora::backward_dx(cuda, low, &mut dx, du, &dy16, &w16, &a16, &b16, drop, s, true)?;
        let got_dx = dx.to_f32_vec()?;
        let got_du = du.to_f32_vec()?;
        // Timed without accumulation (the result was read above).
        let mut scratch = DeviceTensor::empty(cuda, &[m, k], Elem::F32, "LoRA dx (timing)")?;
        let ms = c.time(5, || lora::backward_dx(cuda, low, &mut scratch, du, &dy16, &w16, &a16, &b16, drop, s, false))?;
        let kernel = format!("lora_gemm_bwd ({low:?})");
        c.record(&kernel, format!("{label}: dx"), &got_dx, &dx_ref, TOL_BF16, ms);
        c.record(&kernel, format!("{label}: dx vs f64"), &got_dx, &as_f32(&dx64), TOL_BF16, 0.0);
        if low == LowRank::InLoop {
            c.record(&kernel, format!("{label}: du"), &got_du, &du_ref, TOL_BF16, 0.0);
        }
    }

    // Weight gradients from the kernels' own bf16 u, du and dropped input.
    let mut ga = DeviceTensor::from_f32(cuda, &[r, k], &ga0, "LoRA dA")?;
    let mut gb = DeviceTensor::from_f32(cuda, &[n, r], &gb0, "LoRA dB")?;
    let xd_dev = if p > 0.0 { &xd16 } else { &x16 };
    lora::weight_grads(cuda, &mut ga, &mut gb, &du_given, xd_dev, &dy16_out, &u_given, s)?;
    let (got_a, got_b) = (ga.to_f32_vec()?, gb.to_f32_vec()?);
    let ms = c.time(5, || lora::weight_grads(cuda, &mut ga, &mut gb, &du_given, xd_dev, &dy16_out, &u_given, s))?;
    c.record("lora weight_grads (matmul)", format!("{label}: dA"), &got_a, &ga_ref, TOL_BF16, ms);
    c.record("lora weight_grads (matmul)", format!("{label}: dB"), &got_b, &gb_ref, TOL_BF16, 0.0);
    Ok(())
}
