//! Checks of kernels/lora.cu (ops/lora.rs) against the CPU: the formulas of `lin_fwd` / `lin_bwd`
//! (engine/train/backprop.rs) through the CPU backend's GEMMs in f32 on the bf16-rounded inputs
//! the device sees, and `y` / `dx` once more against an independent f64 host loop. Ranks 4 to 64,
//! shapes that are and are not multiples of the tiles and of 8 (the cp.async and the element-load
//! paths), with and without dropout and bias, both ways of getting the low-rank product. The
//! rounded copies the kernels write (`bf16(x * mask)`, `bf16(dy)`) must be bitwise the host's.
use super::{random_outliers, round_bf16, Checker, TOL_BF16, TOL_EXACT};
use crate::backend::cpu::{matmul_nn, matmul_nt, matmul_tn};
use crate::backend::cuda::ops::lora::{self, DownFactor, Dropout, LowRank};
use crate::backend::cuda::{DeviceTensor, Elem};
use crate::error::Result;
use crate::rng::Rng;

/// One linear: rows m, in k, out n, rank r, dropout p, bias.
#[derive(Clone, Copy, Debug)]
pub struct Case {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub r: usize,
    pub p: f32,
    pub bias: bool,
}

pub const CASES: [Case; 6] = [
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

/// The inputs of one case (f32, before any bf16 rounding) and the dropout draw.
pub struct Inputs {
    pub x: Vec<f32>,
    pub w: Vec<f32>,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub bias: Vec<f32>,
    pub dy: Vec<f32>,
    /// Initial values of the accumulated outputs dx, dA, dB.
    pub dx0: Vec<f32>,
    pub ga0: Vec<f32>,
    pub gb0: Vec<f32>,
    /// u8 keep flags (all 1 without dropout), the f32 multiplier of a kept element, and `s`.
    pub kept: Vec<u8>,
    pub keep: f32,
    pub scale: f32,
}

impl Inputs {
    /// Random inputs with outliers; `alpha = 2r`, so the low-rank term is as large as the base one
    /// and an error in it cannot hide under the tolerance.
    pub fn new(cs: Case, rng: &mut Rng) -> Inputs {
        let Case { m, k, n, r, p, bias } = cs;
        let mut rnd = |len: usize, scale: f32| random_outliers(rng, len, scale);
        let x = rnd(m * k, 1.0);
        let w = rnd(n * k, 1.0 / (k as f32).sqrt());
        let a = rnd(r * k, 1.0 / (k as f32).sqrt());
        let b = rnd(n * r, 1.0 / (r as f32).sqrt());
        let bias = if bias { rnd(n, 1.0) } else { Vec::new() };
        let dy = rnd(m * n, 1.0);
        let dx0 = rnd(m * k, 1.0);
        let ga0 = rnd(r * k, 1.0);
        let gb0 = rnd(n * r, 1.0);
        // The CPU's draw: an element is dropped when the uniform falls below p.
        let kept = (0..m * k).map(|_| if p > 0.0 && rng.next_f32() < p { 0 } else { 1 }).collect();
        Inputs { x, w, a, b, bias, dy, dx0, ga0, gb0, kept, keep: 1.0 / (1.0 - p), scale: 2.0 / r as f32 }
    }
}

/// What every kernel output should be: `lin_fwd` / `lin_bwd`'s formulas through the CPU
/// backend's GEMMs on the bf16-rounded values the device holds, plus `y` and `dx` from f64 loops.
pub struct Reference {
    pub u: Vec<f32>,
    pub y: Vec<f32>,
    pub du: Vec<f32>,
    pub dx: Vec<f32>,
    pub ga: Vec<f32>,
    pub gb: Vec<f32>,
    /// `bf16(x * mask)` (`bf16(x)` without dropout) and `bf16(dy)`: the down pass's copies.
    pub xd: Vec<f32>,
    pub dy: Vec<f32>,
    pub y64: Vec<f32>,
    pub dx64: Vec<f32>,
}

impl Reference {
    pub fn new(cs: Case, d: &Inputs) -> Reference {
        let Case { m, k, n, r, p, bias } = cs;
        let s = d.scale;
        let mult: Vec<f32> = d.kept.iter().map(|&q| if p > 0.0 { if q == 1 { d.keep } else { 0.0 } } else { 1.0 }).collect();
        let (xr, wr, ar, br, dyr) = (round_bf16(&d.x), round_bf16(&d.w), round_bf16(&d.a), round_bf16(&d.b), round_bf16(&d.dy));
        let xd: Vec<f32> = if p > 0.0 { d.x.iter().zip(&mult).map(|(v, q)| v * q).collect() } else { d.x.clone() };
        let xdr = round_bf16(&xd);
        let mut u = vec![0.0f32; m * r];
        matmul_nt(&mut u, r, &xdr, k, &ar, k, m, r, k, false);
        let us: Vec<f32> = u.iter().map(|v| v * s).collect();
        let mut y = vec![0.0f32; m * n];
        matmul_nt(&mut y, n, &xr, k, &wr, k, m, n, k, false);
        if bias {
            y.chunks_mut(n).for_each(|row| row.iter_mut().zip(&d.bias).for_each(|(y, b)| *y += b));
        }
        matmul_nt(&mut y, n, &us, r, &br, r, m, n, r, true);
        let mut du = vec![0.0f32; m * r];
        matmul_nn(&mut du, r, &dyr, n, &br, r, m, r, n, false);
        du.iter_mut().for_each(|v| *v *= s);
        let mut dx = d.dx0.clone();
        matmul_nn(&mut dx, k, &dyr, n, &wr, k, m, k, n, true);
        let mut dxd = vec![0.0f32; m * k];
        matmul_nn(&mut dxd, k, &du, r, &ar, k, m, k, r, false);
        dx.iter_mut().zip(&dxd).zip(&mult).for_each(|((d, v), q)| *d += v * q);
        let mut ga = d.ga0.clone();
        matmul_tn(&mut ga, k, &du, r, &xdr, k, r, k, m, true);
        let mut gb = d.gb0.clone();
        matmul_tn(&mut gb, r, &dyr, n, &us, r, n, r, m, true);

        let f = |v: &[f32], i: usize| v[i] as f64;
        let u64_ = f64_product(m, r, k, |i, l| f(&xdr, i * k + l), |l, j| f(&ar, j * k + l));
        let base = f64_product(m, n, k, |i, l| f(&xr, i * k + l), |l, j| f(&wr, j * k + l));
        let low = f64_product(m, n, r, |i, l| u64_[i * r + l], |l, j| f(&br, j * r + l));
        let y64: Vec<f64> = (0..m * n).map(|i| base[i] + s as f64 * low[i] + if bias { d.bias[i % n] as f64 } else { 0.0 }).collect();
        let du64: Vec<f64> = f64_product(m, r, n, |i, l| f(&dyr, i * n + l), |l, j| f(&br, l * r + j)).iter().map(|v| v * s as f64).collect();
        let dbase = f64_product(m, k, n, |i, l| f(&dyr, i * n + l), |l, j| f(&wr, l * k + j));
        let dlow = f64_product(m, k, r, |i, l| du64[i * r + l], |l, j| f(&ar, l * k + j));
        let dx64: Vec<f64> = (0..m * k).map(|i| d.dx0[i] as f64 + dbase[i] + dlow[i] * mult[i] as f64).collect();
        Reference { u, y, du, dx, ga, gb, xd: xdr, dy: dyr, y64: as_f32(&y64), dx64: as_f32(&dx64) }
    }
}

fn run_case(c: &mut Checker, cs: Case) -> Result<()> {
    let cuda = c.cuda;
    let Case { m, k, n, r, p, bias } = cs;
    let d = Inputs::new(cs, &mut c.rng);
    let rf = Reference::new(cs, &d);
    let (s, keep) = (d.scale, d.keep);
    let (x, w, a, b, bias_v, dy, kept) = (&d.x, &d.w, &d.a, &d.b, &d.bias, &d.dy, &d.kept);

    // Device operands.
    let x16 = DeviceTensor::from_f32_as_bf16(cuda, &[m, k], x, "LoRA x (bf16)")?;
    let x32 = DeviceTensor::from_f32(cuda, &[m, k], x, "LoRA x (f32)")?;
    let w16 = DeviceTensor::from_f32_as_bf16(cuda, &[n, k], w, "LoRA W")?;
    let a16 = DeviceTensor::from_f32_as_bf16(cuda, &[r, k], a, "LoRA A")?;
    let b16 = DeviceTensor::from_f32_as_bf16(cuda, &[n, r], b, "LoRA B")?;
    let bias_d = if bias { Some(DeviceTensor::from_f32(cuda, &[n], bias_v, "LoRA bias")?) } else { None };
    let mask_d = DeviceTensor::from_u8(cuda, &[m, k], kept, "LoRA dropout mask")?;
    let drop = (p > 0.0).then_some(Dropout { mask: &mask_d, keep });
    let dy32 = DeviceTensor::from_f32(cuda, &[m, n], dy, "LoRA dy (f32)")?;
    let dy16 = DeviceTensor::from_f32_as_bf16(cuda, &[m, n], dy, "LoRA dy (bf16)")?;
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
        c.record(kernel, format!("{label}: u"), &got, &rf.u, TOL_BF16, ms);
        if p > 0.0 {
            c.record("lora_down (x f32, dropout)", format!("{label}: bf16(x * mask)"), &xd16.to_f32_vec()?, &rf.xd, TOL_EXACT, 0.0);
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
        c.record(&kernel, format!("{label}: y"), &got_y, &rf.y, TOL_BF16, ms);
        c.record(&kernel, format!("{label}: y vs f64"), &got_y, &rf.y64, TOL_BF16, 0.0);
        if low == LowRank::InLoop {
            c.record(&kernel, format!("{label}: u"), &got_u, &rf.u, TOL_BF16, 0.0);
        }
    }

    // Backward: du from the cast pass over the f32 dy (the trainer's path), or in the loop.
    let mut du_given = poisoned(&[m, r], Elem::BF16, "LoRA du")?;
    let mut dy16_out = poisoned(&[m, n], Elem::BF16, "LoRA bf16 dy")?;
    lora::down(cuda, &mut du_given, Some(&mut dy16_out), &dy32, None, &b16, DownFactor::ColsAreRank, s)?;
    let got = du_given.to_f32_vec()?;
    let ms = c.time(5, || lora::down(cuda, &mut du_given, Some(&mut dy16_out), &dy32, None, &b16, DownFactor::ColsAreRank, s))?;
    c.record("lora_down (dy f32, cast)", format!("{label}: du"), &got, &rf.du, TOL_BF16, ms);
    c.record("lora_down (dy f32, cast)", format!("{label}: bf16(dy)"), &dy16_out.to_f32_vec()?, &rf.dy, TOL_EXACT, 0.0);
    for low in [LowRank::Given, LowRank::InLoop] {
        let mut dx = DeviceTensor::from_f32(cuda, &[m, k], &d.dx0, "LoRA dx")?;
        let mut du_loop = poisoned(&[m, r], Elem::BF16, "LoRA du (in loop)")?;
        let du = if low == LowRank::Given { &mut du_given } else { &mut du_loop };
        lora::backward_dx(cuda, low, &mut dx, du, &dy16, &w16, &a16, &b16, drop, s, true)?;
        let got_dx = dx.to_f32_vec()?;
        let got_du = du.to_f32_vec()?;
        // Timed without accumulation (the result was read above).
        let mut scratch = DeviceTensor::empty(cuda, &[m, k], Elem::F32, "LoRA dx (timing)")?;
        let ms = c.time(5, || lora::backward_dx(cuda, low, &mut scratch, du, &dy16, &w16, &a16, &b16, drop, s, false))?;
        let kernel = format!("lora_gemm_bwd ({low:?})");
        c.record(&kernel, format!("{label}: dx"), &got_dx, &rf.dx, TOL_BF16, ms);
        c.record(&kernel, format!("{label}: dx vs f64"), &got_dx, &rf.dx64, TOL_BF16, 0.0);
        if low == LowRank::InLoop {
            c.record(&kernel, format!("{label}: du"), &got_du, &rf.du, TOL_BF16, 0.0);
        }
    }

    // Weight gradients from the kernels' own bf16 u, du and dropped input.
    let mut ga = DeviceTensor::from_f32(cuda, &[r, k], &d.ga0, "LoRA dA")?;
    let mut gb = DeviceTensor::from_f32(cuda, &[n, r], &d.gb0, "LoRA dB")?;
    let xd_dev = if p > 0.0 { &xd16 } else { &x16 };
    lora::weight_grads(cuda, &mut ga, &mut gb, &du_given, xd_dev, &dy16_out, &u_given, s)?;
    let (got_a, got_b) = (ga.to_f32_vec()?, gb.to_f32_vec()?);
    let ms = c.time(5, || lora::weight_grads(cuda, &mut ga, &mut gb, &du_given, xd_dev, &dy16_out, &u_given, s))?;
    c.record("lora weight_grads (matmul)", format!("{label}: dA"), &got_a, &rf.ga, TOL_BF16, ms);
    c.record("lora weight_grads (matmul)", format!("{label}: dB"), &got_b, &rf.gb, TOL_BF16, 0.0);
    Ok(())
}
