//! Launchers for kernels/optim.cu: the fused AdamW step, the deterministic two-pass gradient norm
//! with its clip (kept on the device), scaling, and the non-finite count.
//! CPU reference: engine/train/optim.rs (`Optimizer::step`, `grad_norm`, `clip_grad_norm`).
use super::{bad, describe, expect_elem, expect_len, u32_of};
use crate::backend::cuda::{Arg, Cuda, DeviceTensor, Elem, Launch};
use crate::error::{Error, Result};
use crate::train::optim::AdamW;

const STEM: &str = "optim";

/// optim.rs's `CHUNK` and optim.cu's `GRAD_NORM_CHUNK`: the gradient norm's partial sums cover the
/// same elements on both sides, which is what keeps the two within f64 rounding of each other.
const GRAD_NORM_CHUNK: usize = 1 << 15;

/// Block of `grad_sumsq_partial_f32` (any multiple of 32 up to 1024 is correct; 256 is intended).
const NORM_BLOCK: u32 = 256;

/// The grid dimension limit of `gridDim.x`.
const MAX_GRID_X: usize = i32::MAX as usize;

/// One thread: the sequential passes (`grad_norm_finish`, `grad_norm_total_clip_coef`).
const SINGLE: Launch = Launch { grid: (1, 1, 1), block: (1, 1, 1), shared_bytes: 0 };

/// The f32 scalars of one `adamw_step_f32` launch (see the kernel's comment).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWScalars {
    pub apply_decay: bool,
    /// `1 - lr * weight_decay`; 1 (and unused) when `apply_decay` is false.
    pub decay: f32,
    pub w1: f32,
    pub b2: f32,
    pub w2: f32,
    pub bc2_sqrt: f32,
    pub eps: f32,
    pub neg_step: f32,
}

impl AdamWScalars {
    /// The scalars of the update number `step` (1 for a tensor's first update: the count after
    /// incrementing, as `Optimizer::step` uses it) at learning rate `lr`.
    ///
    /// Mirrors `Optimizer::step` in engine/train/optim.rs (lines 194-203 when written: `let t =
    /// st.step as f64` through `let neg_step = ...`) expression for expression, f64 arithmetic
    /// rounded to f32 at the same points, so the kernel's update is bitwise the CPU's. Keep the
    /// two in step: the self-test (selftest/optim.rs) compares them bit for bit.
    pub fn new(lr: f64, beta1: f64, beta2: f64, eps: f64, weight_decay: f64, step: u64, decayed: bool) -> Self {
        let t = step as f64;
        // torch skips `param.mul_(1 - lr * weight_decay)` when weight_decay == 0; multiplying by
        // an exact 1.0 would be harmless, but skipping is what the CPU does.
        let apply_decay = decayed && weight_decay != 0.0;
        let decay = if apply_decay { (1.0 - lr * weight_decay) as f32 } else { 1.0 };
        let bc1 = 1.0 - beta1.powf(t);
        AdamWScalars {
            apply_decay,
            decay,
            w1: (1.0 - beta1) as f32,
            b2: beta2 as f32,
            w2: (1.0 - beta2) as f32,
            bc2_sqrt: (1.0 - beta2.powf(t)).sqrt() as f32,
            eps: eps as f32,
            neg_step: (-(lr / bc1)) as f32,
        }
    }

    /// [`AdamWScalars::new`] with the betas, eps and weight decay of `config` (its `lr` is the
    /// base rate; `lr` here is the scheduled one, as `Optimizer::step` takes it).
    pub fn from_config(config: &AdamW, lr: f64, step: u64, decayed: bool) -> Self {
        Self::new(lr, config.beta1, config.beta2, config.eps, config.weight_decay, step, decayed)
    }
}

/// One AdamW update of `p` in place from its gradient `g`, updating the moments `m` and `v`
/// (all f32, same element count). Bitwise `Optimizer::step` on the same values.
///
/// Does not look at the gradient: the caller rejects a non-finite one first
/// ([`count_nonfinite`]), as `Optimizer::step` does, since a NaN here poisons `p`, `m` and `v`.
/// Scalars that are not finite, `bc2_sqrt <= 0` (step 0) or a positive `neg_step` (a negative lr)
/// are an error: the first two would write inf or NaN into every parameter, and the CPU refuses
/// the last.
pub fn adamw_step(cuda: &Cuda, p: &mut DeviceTensor, g: &DeviceTensor, m: &mut DeviceTensor, v: &mut DeviceTensor, s: &AdamWScalars) -> Result<()> {
    const K: &str = "adamw_step_f32";
    let all = [("p", &*p), ("g", g), ("m", &*m), ("v", &*v)];
    for (name, t) in all {
        expect_elem(K, name, t, &[Elem::F32], &all)?;
    }
    let n = p.numel();
    for (name, t) in &all[1..] {
        expect_len(K, name, t, n, &all)?;
    }
    let scalars = [s.decay, s.w1, s.b2, s.w2, s.bc2_sqrt, s.eps, s.neg_step];
    // neg_step = -(lr / bc1) with bc1 > 0 from step 1 on: positive exactly when lr < 0, which
    // Optimizer::step rejects.
    if scalars.iter().any(|x| !x.is_finite()) || s.bc2_sqrt <= 0.0 || s.neg_step > 0.0 {
        return Err(bad(K, &all, format!("AdamW scalars {s:?} are not usable (step 0, or a negative or non-finite lr?)")));
    }
    if n == 0 {
        return Ok(());
    }
    let args = [
        Arg::Ptr(p.ptr()),
        Arg::Ptr(g.ptr()),
        Arg::Ptr(m.ptr()),
        Arg::Ptr(v.ptr()),
        Arg::U64(n as u64),
        Arg::I32(s.apply_decay as i32),
        Arg::F32(s.decay),
        Arg::F32(s.w1),
        Arg::F32(s.b2),
        Arg::F32(s.w2),
        Arg::F32(s.bc2_sqrt),
        Arg::F32(s.eps),
        Arg::F32(s.neg_step),
    ];
    // SAFETY: the arguments follow adamw_step_f32's signature (4 pointers, uint64_t n, int, 7
    // floats); p, g, m and v are f32 tensors of n elements each, distinct objects (three are
    // borrowed mutably), so the kernel's __restrict__ holds; the grid-stride loop stays below n.
    unsafe { cuda.launch(STEM, K, Launch::elements(n), &args, &|| describe(&all)) }
}

/// Queues the per-tensor norms of `grads` (`grad_sumsq_partial_f32` + `grad_norm_finish`) into a
/// new f32 tensor of `max(1, grads.len())` elements (element i is tensor i's norm).
fn tensor_norms(cuda: &Cuda, grads: &[&DeviceTensor], kernel: &str) -> Result<DeviceTensor> {
    let names: Vec<String> = (0..grads.len()).map(|i| format!("grads[{i}]")).collect();
    let all: Vec<(&str, &DeviceTensor)> = names.iter().map(String::as_str).zip(grads.iter().copied()).collect();
    for (name, t) in &all {
        expect_elem(kernel, name, t, &[Elem::F32], &all)?;
    }
    u32_of(kernel, "number of tensors", grads.len(), &all)?;
    let mut max_chunks = 0;
    for (name, t) in &all {
        let chunks = t.numel().div_ceil(GRAD_NORM_CHUNK);
        if chunks > MAX_GRID_X {
            return Err(bad(kernel, &[(*name, *t)], format!("{chunks} chunks of {GRAD_NORM_CHUNK} exceed the grid limit")));
        }
        max_chunks = max_chunks.max(chunks);
    }
    // The kernels are handed pointers into these even when they read nothing (no tensors, an
    // empty tensor), so neither is ever a zero-sized request.
    let norms = DeviceTensor::empty(cuda, &[grads.len().max(1)], Elem::F32, "per-tensor gradient norms")?;
    // One scratch for every tensor: each tensor's finish pass is queued before the next tensor's
    // partial pass overwrites it, and the stream runs them in that order.
    let partial = DeviceTensor::empty(cuda, &[max_chunks.max(1)], Elem::F64, "gradient-norm partial sums")?;
    for (i, (name, g)) in all.iter().enumerate() {
        let n = g.numel();
        let chunks = n.div_ceil(GRAD_NORM_CHUNK);
        let ops = [(*name, *g), ("partial", &partial)];
        if chunks > 0 {
            let cfg = Launch { grid: (chunks as u32, 1, 1), block: (NORM_BLOCK, 1, 1), shared_bytes: 0 };
            let args = [Arg::Ptr(partial.ptr()), Arg::Ptr(g.ptr()), Arg::U64(n as u64)];
            // SAFETY: (double*, const float*, uint64_t) as grad_sumsq_partial_f32 takes them; the
            // grid is exactly ceil(n / 32768) blocks (the kernel writes partial[blockIdx.x] and
            // reads g below n), `partial` holds max_chunks >= chunks doubles, g is f32 [n].
            unsafe { cuda.launch(STEM, "grad_sumsq_partial_f32", cfg, &args, &|| describe(&ops))? };
        }
        // An empty tensor still gets its norm (0) written: the finish pass reads no partial.
        let args = [Arg::Ptr(norms.ptr()), Arg::U32(i as u32), Arg::Ptr(partial.ptr()), Arg::U32(chunks as u32)];
        // SAFETY: (float*, uint32_t, const double*, uint32_t) as grad_norm_finish takes them;
        // i < grads.len() <= norms' length (checked to fit u32 above), chunks <= max_chunks <=
        // partial's length and <= i32::MAX.
        unsafe { cuda.launch(STEM, "grad_norm_finish", SINGLE, &args, &|| describe(&ops))? };
    }
    Ok(norms)
}

/// Queues `grad_norm_total_clip_coef` writing the total to `total_ptr` and the coefficient to
/// `coef_ptr` (each one f32 of a live tensor).
fn total_and_coef(cuda: &Cuda, total_ptr: u64, coef_ptr: u64, norms: &DeviceTensor, n_tensors: usize, max_norm: f32) -> Result<()> {
    const K: &str = "grad_norm_total_clip_coef";
    let args = [Arg::Ptr(total_ptr), Arg::Ptr(coef_ptr), Arg::Ptr(norms.ptr()), Arg::U32(n_tensors as u32), Arg::F32(max_norm)];
    // SAFETY: (float*, float*, const float*, uint32_t, float) as the kernel takes them; the callers
    // pass addresses of one f32 each in live tensors, `norms` holds at least n_tensors f32 (built
    // by `tensor_norms`, which checked n_tensors fits u32).
    unsafe { cuda.launch(STEM, K, SINGLE, &args, &|| describe(&[("norms", norms)])) }
}

/// `clip_grad_norm(grads, max_norm)` on the device: the total 2-norm of all the gradients (as
/// one vector) and, when `max_norm / (total + 1e-6) < 1`, every gradient scaled by that
/// coefficient. Returns a new f32 tensor `[total, coef]` (`coef` is 1 when nothing was scaled,
/// including when the total is not finite: the gradients are then left alone, as on the CPU).
/// Queued only: nothing waits for the GPU, and the coefficient never visits the host.
///
/// `max_norm` is not validated, as on the CPU (a NaN clips nothing; a negative value flips the
/// gradients' sign on both).
pub fn grad_norm_clip(cuda: &Cuda, grads: &mut [&mut DeviceTensor], max_norm: f32) -> Result<DeviceTensor> {
    let out = {
        let views: Vec<&DeviceTensor> = grads.iter().map(|g| &**g).collect();
        let norms = tensor_norms(cuda, &views, "grad_norm_clip")?;
        let out = DeviceTensor::empty(cuda, &[2], Elem::F32, "gradient norm and clip coefficient")?;
        total_and_coef(cuda, out.ptr(), out.ptr() + 4, &norms, views.len(), max_norm)?;
        out
    };
    let coef_ptr = out.ptr() + 4;
    for (i, g) in grads.iter_mut().enumerate() {
        let n = g.numel();
        if n == 0 {
            continue;
        }
        let args = [Arg::Ptr(g.ptr()), Arg::U64(n as u64), Arg::Ptr(coef_ptr)];
        let name = format!("grads[{i}]");
        let shape = || describe(&[(name.as_str(), &**g)]);
        // SAFETY: (float*, uint64_t, const float*) as scale_by_coef_f32 takes them; g is f32 [n]
        // (checked by `tensor_norms`), coef_ptr is element 1 of `out`, an f32 [2] alive until
        // this function returns and written by the launch queued before this one.
        unsafe { cuda.launch(STEM, "scale_by_coef_f32", Launch::elements(n), &args, &shape)? };
    }
    Ok(out)
}

/// `grad_norm(grads)` on the device, for logging: a new f32 tensor `[total]`. Queued only.
pub fn grad_norm(cuda: &Cuda, grads: &[&DeviceTensor]) -> Result<DeviceTensor> {
    let norms = tensor_norms(cuda, grads, "grad_norm")?;
    let total = DeviceTensor::empty(cuda, &[1], Elem::F32, "gradient norm")?;
    // The kernel always writes a coefficient; this one is dropped right after queueing, which the
    // stream-ordered allocator allows (alloc.rs). max_norm = inf keeps the arithmetic harmless.
    let coef = DeviceTensor::empty(cuda, &[1], Elem::F32, "unused clip coefficient")?;
    total_and_coef(cuda, total.ptr(), coef.ptr(), &norms, grads.len(), f32::INFINITY)?;
    Ok(total)
}

/// `x *= s` in place (f32; gradient averaging over micro-batches, loss scaling). Each product is
/// one correctly rounded f32 multiply, bitwise the CPU's `*=`.
pub fn scale(cuda: &Cuda, x: &mut DeviceTensor, s: f32) -> Result<()> {
    const K: &str = "scale_f32";
    let all = [("x", &*x)];
    expect_elem(K, "x", x, &[Elem::F32], &all)?;
    let n = x.numel();
    if n == 0 {
        return Ok(());
    }
    let args = [Arg::Ptr(x.ptr()), Arg::U64(n as u64), Arg::F32(s)];
    // SAFETY: (float*, uint64_t, float) as scale_f32 takes them; x is f32 [n].
    unsafe { cuda.launch(STEM, K, Launch::elements(n), &args, &|| describe(&all)) }
}

/// Adds the number of non-finite values (NaN, +-inf) of the f32 tensor `x` into `count`, a u32
/// tensor of one element. Queued only: check several gradients, then read `count` once.
/// Exact while the accumulated count stays below 2^32 (the kernel's integer atomics wrap).
pub fn add_nonfinite_count(cuda: &Cuda, count: &mut DeviceTensor, x: &DeviceTensor) -> Result<()> {
    const K: &str = "count_nonfinite_f32";
    let all = [("count", &*count), ("x", x)];
    expect_elem(K, "count", count, &[Elem::U32], &all)?;
    expect_len(K, "count", count, 1, &all)?;
    expect_elem(K, "x", x, &[Elem::F32], &all)?;
    let n = x.numel();
    // One tensor's count must not wrap to a plausible number.
    u32_of(K, "x's element count", n, &all)?;
    if n == 0 {
        return Ok(());
    }
    let args = [Arg::Ptr(count.ptr()), Arg::Ptr(x.ptr()), Arg::U64(n as u64)];
    // SAFETY: (uint32_t*, const float*, uint64_t) as count_nonfinite_f32 takes them; count is one
    // u32, x is f32 [n]; Launch::elements uses blocks of 256, the multiple of 32 the kernel's warp
    // reduction needs.
    unsafe { cuda.launch(STEM, K, Launch::elements(n), &args, &|| describe(&all)) }
}

/// The number of non-finite values in the f32 tensor `x`. **Synchronises**: it waits for every
/// queued kernel to read the count back (use [`add_nonfinite_count`] to batch several tensors).
pub fn count_nonfinite(cuda: &Cuda, x: &DeviceTensor) -> Result<u32> {
    let mut count = DeviceTensor::zeros(cuda, &[1], Elem::U32, "non-finite count")?;
    add_nonfinite_count(cuda, &mut count, x)?;
    count
        .to_u32_vec()?
        .first()
        .copied()
        .ok_or_else(|| Error::Device("count_nonfinite_f32: the count came back empty".into()))
}
