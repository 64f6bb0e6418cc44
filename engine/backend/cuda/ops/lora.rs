//! Launchers for kernels/lora.cu: the LoRA linear with its low-rank path fused into the base GEMM,
//! forward and input gradient, the down-projection pass, and the adapter weight gradients.
//! CPU reference: `lin_fwd` / `lin_bwd` in engine/train/backprop.rs. Dossier: docs/kernels/lora.md.
//!
//! Operands (row-major): `x [M, K]` and `dy [M, N]` bf16 GEMM inputs, the frozen `w [N, K]` bf16,
//! `a [r, K]` and `b [N, r]` bf16 copies of the f32 adapter, `u = drop(x) A^T` and
//! `du = s dy B` as bf16 `[M, r]`, outputs `y [M, N]` / `dx [M, K]` f32, `1 <= r <=` [`MAX_RANK`].
use super::{bad, expect_elem, launch, matmul, u32_of, Gemm};
use crate::backend::cuda::{Arg, Cuda, DeviceTensor, Elem, Launch, MAX_GRID_YZ};
use crate::error::Result;

const STEM: &str = "lora";

/// The largest adapter rank the kernels take (their rank capacities are 16, 32 and 64).
pub const MAX_RANK: usize = 64;

/// Tile of the fused GEMM (BM = BN = 128, BK = 32, 256 threads) and of the down pass (64 rows).
const TILE: usize = 128;
const TILE_K: usize = 32;
const DOWN_ROWS: usize = 64;

/// Shared memory a launch may use without the opt-in attribute.
const MAX_SHARED: usize = 48 * 1024;

/// Dropout on the LoRA branch: the u8 mask (`[M, K]`, 1 = kept) and the factor of a kept element
/// (`1 / (1 - p)` as the CPU computes it, so `x * keep` is the CPU's f32 product).
#[derive(Clone, Copy)]
pub struct Dropout<'a> {
    pub mask: &'a DeviceTensor,
    pub keep: f32,
}

/// How the fused GEMM gets the low-rank product `T` (`u` forward, `du` backward).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LowRank {
    /// Computed in the main loop from the input tiles already in shared memory (once per output
    /// column tile: +r/128 of the base FLOPs) and written out.
    InLoop,
    /// Read from memory, made by [`down`] (one extra pass over the input, no extra FLOPs).
    Given,
}

/// Which way the forward should get `u` for an `[M, K] x [N, K]^T` linear of rank `r`: in the
/// loop while its extra FLOPs (r / 128 of the GEMM) cost less than a pass over `x` (about
/// peak / (N x bandwidth) of the GEMM, ~230 / N on an H100: 989 TFLOP/s dense, ~750 reached,
/// 3.35 TB/s). Dropout always takes [`down`]: it has to write the dropped input for `dA` anyway.
/// A prediction, not a measurement (docs/kernels/lora.md): the GPU bench decides.
pub fn forward_low_rank(r: usize, n: usize, dropout: bool) -> LowRank {
    if !dropout && r * n <= 28 * 1024 {
        LowRank::InLoop
    } else {
        LowRank::Given
    }
}

/// Rank capacity (16, 32, 64) of the kernel instance that serves rank `r`.
fn capacity(r: usize) -> usize {
    match r {
        0..=16 => 16,
        17..=32 => 32,
        _ => 64,
    }
}

/// The fused-GEMM entry point for a direction, a way of getting `T` and rank `r`.
pub fn gemm_kernel(backward: bool, low: LowRank, r: usize) -> &'static str {
    match (backward, low, capacity(r)) {
        (false, LowRank::InLoop, 16) => "lora_gemm_fwd_r16",
        (false, LowRank::InLoop, 32) => "lora_gemm_fwd_r32",
        (false, LowRank::InLoop, _) => "lora_gemm_fwd_r64",
        (false, LowRank::Given, 16) => "lora_gemm_fwd_t_r16",
        (false, LowRank::Given, 32) => "lora_gemm_fwd_t_r32",
        (false, LowRank::Given, _) => "lora_gemm_fwd_t_r64",
        (true, LowRank::InLoop, 16) => "lora_gemm_bwd_r16",
        (true, LowRank::InLoop, 32) => "lora_gemm_bwd_r32",
        (true, LowRank::InLoop, _) => "lora_gemm_bwd_r64",
        (true, LowRank::Given, 16) => "lora_gemm_bwd_t_r16",
        (true, LowRank::Given, 32) => "lora_gemm_bwd_t_r32",
        (true, LowRank::Given, _) => "lora_gemm_bwd_t_r64",
    }
}

/// Dynamic shared memory of one fused-GEMM launch: two pipeline stages of the P, Q (and, in the
/// loop, R) tiles, or the epilogue's `T [128, R]` and S tiles, whichever is larger (they reuse
/// the same bytes). kernels/lora.cu lays them out the same way.
pub fn gemm_smem_bytes(r: usize, low: LowRank) -> usize {
    let cap = capacity(r);
    let stage = TILE * TILE_K + TILE * TILE_K + if low == LowRank::InLoop { cap * TILE_K } else { 0 };
    let main = 2 * stage * 2;
    let epi = (TILE * cap + TILE * cap) * 2;
    main.max(epi)
}

/// The [`down`] entry point for a factor layout, an input element type and rank `r` (None: no
/// such kernel).
pub fn down_kernel(layout: DownFactor, input: Elem, r: usize) -> Option<&'static str> {
    Some(match (layout, input, capacity(r)) {
        (DownFactor::RowsAreRank, Elem::F32, 16) => "lora_down_nt_f32_r16",
        (DownFactor::RowsAreRank, Elem::F32, 32) => "lora_down_nt_f32_r32",
        (DownFactor::RowsAreRank, Elem::F32, _) => "lora_down_nt_f32_r64",
        (DownFactor::RowsAreRank, Elem::BF16, 16) => "lora_down_nt_bf16_r16",
        (DownFactor::RowsAreRank, Elem::BF16, 32) => "lora_down_nt_bf16_r32",
        (DownFactor::RowsAreRank, Elem::BF16, _) => "lora_down_nt_bf16_r64",
        (DownFactor::ColsAreRank, Elem::F32, 16) => "lora_down_nn_f32_r16",
        (DownFactor::ColsAreRank, Elem::F32, 32) => "lora_down_nn_f32_r32",
        (DownFactor::ColsAreRank, Elem::F32, _) => "lora_down_nn_f32_r64",
        _ => return None,
    })
}

/// Dynamic shared memory of one [`down`] launch: the `[64, 32]` input tile and the factor's
/// `[R, 32]` (or `[32, R]`) tile, R the rank capacity.
pub fn down_smem_bytes(r: usize) -> usize {
    (DOWN_ROWS * TILE_K + capacity(r) * TILE_K) * 2
}

/// `(rows, cols)` of a 2-D operand.
fn dims2(kernel: &str, name: &str, t: &DeviceTensor, all: &[(&str, &DeviceTensor)]) -> Result<(usize, usize)> {
    match *t.shape() {
        [r, c] => Ok((r, c)),
        _ => Err(bad(kernel, all, format!("`{name}` must be 2-D"))),
    }
}

fn expect_dims(kernel: &str, name: &str, t: &DeviceTensor, want: (usize, usize), all: &[(&str, &DeviceTensor)]) -> Result<()> {
    let got = dims2(kernel, name, t, all)?;
    if got != want {
        return Err(bad(kernel, all, format!("`{name}` must be [{}, {}], is [{}, {}]", want.0, want.1, got.0, got.1)));
    }
    Ok(())
}

fn rank_of(kernel: &str, t: &DeviceTensor, all: &[(&str, &DeviceTensor)]) -> Result<usize> {
    let (_, r) = dims2(kernel, "u", t, all)?;
    if r == 0 || r > MAX_RANK {
        return Err(bad(kernel, all, format!("rank {r} is outside 1..={MAX_RANK}")));
    }
    Ok(r)
}

fn drop_mask(kernel: &str, drop: Option<Dropout<'_>>, shape: (usize, usize), all: &[(&str, &DeviceTensor)]) -> Result<(u64, f32)> {
    match drop {
        None => Ok((0, 1.0)),
        Some(d) => {
            expect_elem(kernel, "mask", d.mask, &[Elem::U8], all)?;
            expect_dims(kernel, "mask", d.mask, shape, all)?;
            if !d.keep.is_finite() {
                return Err(bad(kernel, all, format!("dropout keep factor {} is not finite", d.keep)));
            }
            Ok((d.mask.ptr(), d.keep))
        }
    }
}

/// The operands of one fused-GEMM launch (see kernels/lora.cu): `c [m, nc]` f32 (+)= `p [m, kr]`
/// op(`q`) + `s_epi` (`t` op(`s`)) [x mask] (+ `bias`), `t = s_loop p op(rw)` in the loop.
struct Fused<'a> {
    backward: bool,
    low: LowRank,
    c: &'a DeviceTensor,
    t: &'a DeviceTensor,
    p: &'a DeviceTensor,
    q: &'a DeviceTensor,
    rw: Option<&'a DeviceTensor>,
    s: &'a DeviceTensor,
    bias: Option<&'a DeviceTensor>,
    drop: Option<Dropout<'a>>,
    s_loop: f32,
    s_epi: f32,
    accumulate: bool,
}

fn fused(cuda: &Cuda, f: Fused<'_>) -> Result<()> {
    let mut all: Vec<(&str, &DeviceTensor)> = vec![("out", f.c), ("low-rank", f.t), ("input", f.p), ("w", f.q), ("epilogue factor", f.s)];
    if let Some(rw) = f.rw {
        all.push(("loop factor", rw));
    }
    if let Some(b) = f.bias {
        all.push(("bias", b));
    }
    if let Some(d) = f.drop {
        all.push(("mask", d.mask));
    }
    let r = rank_of("lora_gemm", f.t, &all)?;
    let kernel = gemm_kernel(f.backward, f.low, r);
    for (name, t) in [("input", f.p), ("w", f.q), ("low-rank", f.t), ("epilogue factor", f.s)] {
        expect_elem(kernel, name, t, &[Elem::BF16], &all)?;
    }
    expect_elem(kernel, "out", f.c, &[Elem::F32], &all)?;
    let (m, kr) = dims2(kernel, "input", f.p, &all)?;
    let (_, nc) = dims2(kernel, "out", f.c, &all)?;
    expect_dims(kernel, "out", f.c, (m, nc), &all)?;
    expect_dims(kernel, "low-rank", f.t, (m, r), &all)?;
    // Forward: W [N, K], A [r, K], B [N, r]. Backward: W [N, K] = [Kr, Nc], B [Kr, r], A [r, Nc].
    expect_dims(kernel, "w", f.q, if f.backward { (kr, nc) } else { (nc, kr) }, &all)?;
    expect_dims(kernel, "epilogue factor", f.s, if f.backward { (r, nc) } else { (nc, r) }, &all)?;
    let rw_ptr = match (f.low, f.rw) {
        (LowRank::InLoop, Some(rw)) => {
            expect_elem(kernel, "loop factor", rw, &[Elem::BF16], &all)?;
            expect_dims(kernel, "loop factor", rw, if f.backward { (kr, r) } else { (r, kr) }, &all)?;
            rw.ptr()
        }
        (LowRank::InLoop, None) => return Err(bad(kernel, &all, "the in-loop low-rank product needs its factor")),
        (LowRank::Given, _) => 0,
    };
    let bias_ptr = match f.bias {
        None => 0,
        Some(b) => {
            expect_elem(kernel, "bias", b, &[Elem::F32], &all)?;
            if b.numel() != nc {
                return Err(bad(kernel, &all, format!("`bias` must hold {nc} elements")));
            }
            b.ptr()
        }
    };
    let (mask_ptr, keep) = drop_mask(kernel, f.drop, (m, nc), &all)?;
    if m == 0 || nc == 0 {
        return Ok(());
    }
    if m.div_ceil(TILE) > MAX_GRID_YZ {
        return Err(bad(kernel, &all, format!("{m} rows exceed the grid ({} at most)", MAX_GRID_YZ * TILE)));
    }
    let smem = gemm_smem_bytes(r, f.low);
    debug_assert!(smem <= MAX_SHARED);
    let vec = kr % 8 == 0 && nc % 8 == 0 && r % 8 == 0;
    let cfg = Launch { grid: (nc.div_ceil(TILE) as u32, m.div_ceil(TILE) as u32, 1), block: (256, 1, 1), shared_bytes: smem as u32 };
    let args = [
        Arg::Ptr(f.c.ptr()),
        Arg::Ptr(f.t.ptr()),
        Arg::Ptr(f.p.ptr()),
        Arg::Ptr(f.q.ptr()),
        Arg::Ptr(rw_ptr),
        Arg::Ptr(f.s.ptr()),
        Arg::Ptr(bias_ptr),
        Arg::Ptr(mask_ptr),
        Arg::F32(keep),
        Arg::U32(u32_of(kernel, "rows", m, &all)?),
        Arg::U32(u32_of(kernel, "columns", nc, &all)?),
        Arg::U32(u32_of(kernel, "reduction", kr, &all)?),
        Arg::U32(r as u32),
        Arg::F32(f.s_loop),
        Arg::F32(f.s_epi),
        Arg::I32(f.accumulate as i32),
        Arg::I32((f.low == LowRank::InLoop) as i32),
        Arg::I32(vec as i32),
    ];
    // SAFETY: every operand was checked above to be a 2-D tensor of the element type and the
    // dimensions the kernel indexes for (m, nc, kr, r) in this direction; optional operands are
    // null exactly when the kernel skips them; `vec` is set only when every row length is a
    // multiple of 8 elements (16-byte chunks stay aligned); the shared bytes cover the layout.
    unsafe { launch(cuda, STEM, kernel, cfg, &args, &all) }
}

/// Forward of the LoRA linear: `y = x W^T (+ bias) + scale (u B^T)`. With [`LowRank::InLoop`]
/// the kernel also computes `u = x A^T` and writes it to `u`; with [`LowRank::Given`] `u` is read
/// (made by [`down`]) and `a` is not used.
#[allow(clippy::too_many_arguments)]
pub fn forward(cuda: &Cuda, low: LowRank, y: &mut DeviceTensor, u: &mut DeviceTensor, x: &DeviceTensor, w: &DeviceTensor, a: &DeviceTensor, b: &DeviceTensor, bias: Option<&DeviceTensor>, scale: f32) -> Result<()> {
    let rw = (low == LowRank::InLoop).then_some(a);
    fused(cuda, Fused { backward: false, low, c: y, t: u, p: x, q: w, rw, s: b, bias, drop: None, s_loop: 1.0, s_epi: scale, accumulate: false })
}

/// Input gradient of the LoRA linear: `dx (+)= dy W + drop'(du A)` with `du = scale dy B`,
/// computed in the loop and written to `du` ([`LowRank::InLoop`]), or read from `du` (made by
/// [`down`] from the f32 `dy`, [`LowRank::Given`]; `b` is not used then). `drop` multiplies the
/// low-rank term by the forward's mask (`[M, K]`).
#[allow(clippy::too_many_arguments)]
pub fn backward_dx(cuda: &Cuda, low: LowRank, dx: &mut DeviceTensor, du: &mut DeviceTensor, dy: &DeviceTensor, w: &DeviceTensor, a: &DeviceTensor, b: &DeviceTensor, drop: Option<Dropout<'_>>, scale: f32, accumulate: bool) -> Result<()> {
    let rw = (low == LowRank::InLoop).then_some(b);
    fused(cuda, Fused { backward: true, low, c: dx, t: du, p: dy, q: w, rw, s: a, bias: None, drop, s_loop: scale, s_epi: 1.0, accumulate })
}

/// Layout of the factor of [`down`]: `a [r, K]` (forward, `x A^T`) or `b [K, r]` (backward,
/// `dy B`, K being the linear's output size there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DownFactor {
    RowsAreRank,
    ColsAreRank,
}

/// The down-projection pass: `t = scale bf16(x') F` where `x' = x * mask * keep` (or `x`) and
/// `F = a^T` or `b` (see [`DownFactor`]); with `xo`, also `xo = bf16(x')` (the dropped input the
/// weight gradient needs, or the bf16 `dy` the backward GEMM reads). One read of `x` (f32, or
/// bf16 for `a^T` without `xo`).
#[allow(clippy::too_many_arguments)]
pub fn down(cuda: &Cuda, t: &mut DeviceTensor, xo: Option<&mut DeviceTensor>, x: &DeviceTensor, drop: Option<Dropout<'_>>, factor: &DeviceTensor, layout: DownFactor, scale: f32) -> Result<()> {
    let mut all: Vec<(&str, &DeviceTensor)> = vec![("low-rank", &*t), ("input", x), ("factor", factor)];
    let xo_ref = xo.as_deref();
    if let Some(o) = xo_ref {
        all.push(("rounded input", o));
    }
    if let Some(d) = drop {
        all.push(("mask", d.mask));
    }
    let r = rank_of("lora_down", t, &all)?;
    let Some(kernel) = down_kernel(layout, x.elem(), r) else {
        return Err(bad("lora_down", &all, format!("input must be F32 (or BF16 with the [r, K] factor), is {:?}", x.elem())));
    };
    expect_elem(kernel, "low-rank", t, &[Elem::BF16], &all)?;
    expect_elem(kernel, "factor", factor, &[Elem::BF16], &all)?;
    let (m, k) = dims2(kernel, "input", x, &all)?;
    expect_dims(kernel, "low-rank", t, (m, r), &all)?;
    expect_dims(kernel, "factor", factor, if layout == DownFactor::RowsAreRank { (r, k) } else { (k, r) }, &all)?;
    let xo_ptr = match xo_ref {
        None => 0,
        Some(o) => {
            expect_elem(kernel, "rounded input", o, &[Elem::BF16], &all)?;
            expect_dims(kernel, "rounded input", o, (m, k), &all)?;
            o.ptr()
        }
    };
    let (mask_ptr, keep) = drop_mask(kernel, drop, (m, k), &all)?;
    if m == 0 {
        return Ok(());
    }
    let smem = down_smem_bytes(r);
    let vec = k % 8 == 0 && r % 8 == 0;
    let blocks = u32_of(kernel, "row blocks", m.div_ceil(DOWN_ROWS), &all)?;
    let cfg = Launch { grid: (blocks, 1, 1), block: (128, 1, 1), shared_bytes: smem as u32 };
    let args = [
        Arg::Ptr(t.ptr()),
        Arg::Ptr(xo_ptr),
        Arg::Ptr(x.ptr()),
        Arg::Ptr(mask_ptr),
        Arg::F32(keep),
        Arg::Ptr(factor.ptr()),
        Arg::U32(u32_of(kernel, "rows", m, &all)?),
        Arg::U32(u32_of(kernel, "columns", k, &all)?),
        Arg::U32(r as u32),
        Arg::F32(scale),
        Arg::I32(vec as i32),
    ];
    // SAFETY: x [m, k] of the kernel's input type, factor [r, k] or [k, r] bf16, t [m, r] bf16,
    // the optional xo [m, k] bf16 and mask [m, k] u8 (null when absent) were checked above;
    // `vec` only when row lengths keep 16-byte chunks aligned.
    unsafe { launch(cuda, STEM, kernel, cfg, &args, &all) }
}

/// The adapter's weight gradients, accumulated: `ga += du^T xd` (`[r, K]`) and `gb += scale
/// dy^T u` (`[N, r]`), from the bf16 `du`, `u` (`[M, r]`), `xd` (the dropped input, `[M, K]`) and
/// `dy` (`[M, N]`). Skinny products with a long reduction over the M rows: `matmul` (cuBLAS,
/// deterministic, f32 accumulation) until a split-M kernel of ours beats it (docs/kernels/lora.md).
#[allow(clippy::too_many_arguments)]
pub fn weight_grads(cuda: &Cuda, ga: &mut DeviceTensor, gb: &mut DeviceTensor, du: &DeviceTensor, xd: &DeviceTensor, dy: &DeviceTensor, u: &DeviceTensor, scale: f32) -> Result<()> {
    matmul(cuda, ga, du, xd, Gemm::TN.accumulate())?;
    matmul(cuda, gb, dy, u, Gemm::TN.scaled(scale).accumulate())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_launch_fits_the_default_shared_memory() {
        for r in 1..=MAX_RANK {
            for low in [LowRank::InLoop, LowRank::Given] {
                assert!(gemm_smem_bytes(r, low) <= MAX_SHARED, "r {r} {low:?}");
            }
        }
    }

    #[test]
    fn small_products_stay_in_the_loop_and_dropout_never_does() {
        assert_eq!(forward_low_rank(16, 576, false), LowRank::InLoop);
        assert_eq!(forward_low_rank(64, 4096, false), LowRank::Given);
        assert_eq!(forward_low_rank(8, 576, true), LowRank::Given);
    }
}
