//! Launchers for kernels/elementwise.cu: RMSNorm (plain, fused with the residual add, backward
//! w.r.t. x and w), column sums, RoPE and its backward, SwiGLU and its backward, bias and residual
//! adds, f32 <-> bf16 casts.
//!
//! Activations are f32 or bf16 (the launcher picks the `_f32` / `_bf16` entry point from the
//! element type); gradients, statistics (`rstd`) and RoPE tables are f32. Shapes are read from
//! element counts, not from `shape()`: a `[batch, seq, h]` activation and its `[batch * seq, h]`
//! view are the same operand to a row kernel. Empty operands return `Ok` without a launch, except
//! where the result is still defined (a column sum over zero rows is zeros).
use super::{bad, expect_elem, expect_len, launch, u32_of, Ops};
use crate::backend::cuda::{Arg, Cuda, DeviceTensor, Elem, Launch, MAX_GRID_YZ};
use crate::error::Result;

const STEM: &str = "elementwise";

/// Block size of the one-block-per-row kernels: the launch their comments intend. Each thread
/// strides over the row, so any width works; 256 keeps 8 warps in the reductions.
const ROW_BLOCK: u32 = 256;

/// Rows per chunk of the RMSNorm weight-gradient pass 1. Each (32 x 8) block then sums 8 rows per
/// thread, enough work to amortise the block's start and its shared-memory combine, while a
/// training batch (thousands of token rows) still yields tens of chunks per column tile to fill
/// the GPU, and pass 2 (a sequential column sum over the chunks) stays short.
const DW_ROWS_PER_CHUNK: usize = 64;



/// The `_f32` or `_bf16` entry point for operand `name`'s element type.
fn entry(family: &str, f32_kernel: &'static str, bf16_kernel: &'static str, name: &str, t: &DeviceTensor, all: &[(&str, &DeviceTensor)]) -> Result<&'static str> {
    match t.elem() {
        Elem::F32 => Ok(f32_kernel),
        Elem::BF16 => Ok(bf16_kernel),
        e => Err(bad(family, all, format!("`{name}` must be F32 or BF16, is {e:?}"))),
    }
}

/// Rows of a `[rows, width]` operand given as a flat element count.
fn rows_of(kernel: &str, name: &str, t: &DeviceTensor, width: usize, all: &[(&str, &DeviceTensor)]) -> Result<usize> {
    if width == 0 {
        return if t.numel() == 0 { Ok(0) } else { Err(bad(kernel, all, format!("`{name}` has elements but the row width is 0"))) };
    }
    if !t.numel().is_multiple_of(width) {
        return Err(bad(kernel, all, format!("`{name}` holds {} elements, not a multiple of the row width {width}", t.numel())));
    }
    Ok(t.numel() / width)
}

/// Checks an optional `rstd [rows]` f32 output and returns its address (0: the kernel skips it).
fn rstd_ptr(kernel: &str, rstd: Option<&DeviceTensor>, rows: usize, all: &[(&str, &DeviceTensor)]) -> Result<u64> {
    match rstd {
        None => Ok(0),
        Some(r) => {
            expect_elem(kernel, "rstd", r, &[Elem::F32], all)?;
            expect_len(kernel, "rstd", r, rows, all)?;
            Ok(r.ptr())
        }
    }
}


/// `y[r] = w * x[r] / sqrt(mean(x[r]^2) + eps)` per row of width `h = w.numel()`; x, y, w share
/// the element type (f32 or bf16). `rstd [rows]` f32, when given, receives each row's
/// `1 / sqrt(mean + eps)` for the weight gradient.
pub fn rms_norm(cuda: &Cuda, y: &mut DeviceTensor, x: &DeviceTensor, w: &DeviceTensor, rstd: Option<&mut DeviceTensor>, eps: f32) -> Result<()> {
    let rstd = rstd.map(|r| &*r);
    let mut all: Ops = vec![("y", &*y), ("x", x), ("w", w)];
    all.extend(rstd.map(|r| ("rstd", r)));
    let kernel = entry("rms_norm", "rms_norm_f32", "rms_norm_bf16", "x", x, &all)?;
    expect_elem(kernel, "y", y, &[x.elem()], &all)?;
    expect_elem(kernel, "w", w, &[x.elem()], &all)?;
    expect_len(kernel, "y", y, x.numel(), &all)?;
    let h = w.numel();
    let rows = rows_of(kernel, "x", x, h, &all)?;
    let rstd = rstd_ptr(kernel, rstd, rows, &all)?;
    if rows == 0 {
        return Ok(());
    }
    u32_of(kernel, "rows", rows, &all)?;
    let h = u32_of(kernel, "h", h, &all)?;
    let args = [Arg::Ptr(y.ptr()), Arg::Ptr(x.ptr()), Arg::Ptr(w.ptr()), Arg::Ptr(rstd), Arg::U32(h), Arg::F32(eps)];
    // SAFETY: x and y hold rows * h elements and w holds h, all of the entry point's type; rstd is
    // null or rows f32. One block per row touches only its row.
    unsafe { launch(cuda, STEM, kernel, Launch::rows(rows, ROW_BLOCK), &args, &all) }
}

/// Fused residual add and RMSNorm: `resid = T(resid + x)`, then `y = rms_norm(resid)` from the
/// rounded sums, as `add_inplace` followed by `rms_norm`. resid, x, y `[rows, h]`, w `[h]`, one
/// element type; `rstd` as in [`rms_norm`].
pub fn rms_norm_residual(
    cuda: &Cuda,
    y: &mut DeviceTensor,
    resid: &mut DeviceTensor,
    x: &DeviceTensor,
    w: &DeviceTensor,
    rstd: Option<&mut DeviceTensor>,
    eps: f32,
) -> Result<()> {
    let rstd = rstd.map(|r| &*r);
    let mut all: Ops = vec![("y", &*y), ("resid", &*resid), ("x", x), ("w", w)];
    all.extend(rstd.map(|r| ("rstd", r)));
    let kernel = entry("rms_norm_residual", "rms_norm_residual_f32", "rms_norm_residual_bf16", "x", x, &all)?;
    for (name, t) in [("y", &*y), ("resid", &*resid), ("w", w)] {
        expect_elem(kernel, name, t, &[x.elem()], &all)?;
    }
    expect_len(kernel, "y", y, x.numel(), &all)?;
    expect_len(kernel, "resid", resid, x.numel(), &all)?;
    let h = w.numel();
    let rows = rows_of(kernel, "x", x, h, &all)?;
    let rstd = rstd_ptr(kernel, rstd, rows, &all)?;
    if rows == 0 {
        return Ok(());
    }
    u32_of(kernel, "rows", rows, &all)?;
    let h = u32_of(kernel, "h", h, &all)?;
    let args = [Arg::Ptr(y.ptr()), Arg::Ptr(resid.ptr()), Arg::Ptr(x.ptr()), Arg::Ptr(w.ptr()), Arg::Ptr(rstd), Arg::U32(h), Arg::F32(eps)];
    // SAFETY: y, resid and x hold rows * h elements and w holds h, all of one type; y and resid
    // are distinct tensors (two `&mut`), as the kernel requires; rstd is null or rows f32.
    unsafe { launch(cuda, STEM, kernel, Launch::rows(rows, ROW_BLOCK), &args, &all) }
}

/// RMSNorm backward w.r.t. x, ADDED into `dx` (the CPU's `rms_norm_backward`). dx, dy `[rows, h]`
/// f32; x `[rows, h]` and w `[h]` f32 or bf16 (one type). `rstd [rows]` f32, when given,
/// receives the recomputed statistics for [`rms_norm_backward_dw`].
pub fn rms_norm_backward_dx(
    cuda: &Cuda,
    dx: &mut DeviceTensor,
    dy: &DeviceTensor,
    x: &DeviceTensor,
    w: &DeviceTensor,
    rstd: Option<&mut DeviceTensor>,
    eps: f32,
) -> Result<()> {
    let rstd = rstd.map(|r| &*r);
    let mut all: Ops = vec![("dx", &*dx), ("dy", dy), ("x", x), ("w", w)];
    all.extend(rstd.map(|r| ("rstd", r)));
    let kernel = entry("rms_norm_backward_dx", "rms_norm_backward_dx_f32", "rms_norm_backward_dx_bf16", "x", x, &all)?;
    expect_elem(kernel, "w", w, &[x.elem()], &all)?;
    expect_elem(kernel, "dx", dx, &[Elem::F32], &all)?;
    expect_elem(kernel, "dy", dy, &[Elem::F32], &all)?;
    expect_len(kernel, "dx", dx, x.numel(), &all)?;
    expect_len(kernel, "dy", dy, x.numel(), &all)?;
    let h = w.numel();
    let rows = rows_of(kernel, "x", x, h, &all)?;
    let rstd = rstd_ptr(kernel, rstd, rows, &all)?;
    if rows == 0 {
        return Ok(());
    }
    u32_of(kernel, "rows", rows, &all)?;
    let h = u32_of(kernel, "h", h, &all)?;
    let args = [Arg::Ptr(dx.ptr()), Arg::Ptr(dy.ptr()), Arg::Ptr(x.ptr()), Arg::Ptr(w.ptr()), Arg::Ptr(rstd), Arg::U32(h), Arg::F32(eps)];
    // SAFETY: dx, dy (f32) and x hold rows * h elements, w holds h of x's type; rstd is null or
    // rows f32. One block per row.
    unsafe { launch(cuda, STEM, kernel, Launch::rows(rows, ROW_BLOCK), &args, &all) }
}

/// RMSNorm backward w.r.t. the weight: `dw[j] (+)= sum_r dy[r, j] * x[r, j] * rstd[r]`. dw `[h]`
/// f32 (added into when `accumulate`), dy `[rows, h]` f32, x `[rows, h]` f32 or bf16, rstd
/// `[rows]` f32 (from [`rms_norm`] or [`rms_norm_backward_dx`]). Two deterministic passes: per-chunk
/// partial sums into a temporary `[chunks, h]`, then a column sum over the chunks.
pub fn rms_norm_backward_dw(cuda: &Cuda, dw: &mut DeviceTensor, dy: &DeviceTensor, x: &DeviceTensor, rstd: &DeviceTensor, accumulate: bool) -> Result<()> {
    let all: Ops = vec![("dw", &*dw), ("dy", dy), ("x", x), ("rstd", rstd)];
    let kernel = entry("rms_norm_backward_dw_partial", "rms_norm_backward_dw_partial_f32", "rms_norm_backward_dw_partial_bf16", "x", x, &all)?;
    expect_elem(kernel, "dw", dw, &[Elem::F32], &all)?;
    expect_elem(kernel, "dy", dy, &[Elem::F32], &all)?;
    expect_elem(kernel, "rstd", rstd, &[Elem::F32], &all)?;
    expect_len(kernel, "dy", dy, x.numel(), &all)?;
    let h = dw.numel();
    let rows = rows_of(kernel, "x", x, h, &all)?;
    expect_len(kernel, "rstd", rstd, rows, &all)?;
    if h == 0 {
        return Ok(());
    }
    if rows == 0 {
        // A sum over no rows: zeros, or dw unchanged.
        return if accumulate { Ok(()) } else { dw.fill_bytes(0) };
    }
    let rows32 = u32_of(kernel, "rows", rows, &all)?;
    let h32 = u32_of(kernel, "h", h, &all)?;
    // Past 64 * 65535 rows the chunks grow instead of overflowing grid.y.
    let rows_per_chunk = DW_ROWS_PER_CHUNK.max(rows.div_ceil(MAX_GRID_YZ));
    let chunks = rows.div_ceil(rows_per_chunk);
    let partial = DeviceTensor::empty(cuda, &[chunks, h], Elem::F32, "rms_norm_backward_dw partial sums")?;
    let cfg = Launch { grid: (h.div_ceil(32) as u32, chunks as u32, 1), block: (32, 8, 1), shared_bytes: 0 };
    let args = [
        Arg::Ptr(partial.ptr()),
        Arg::Ptr(dy.ptr()),
        Arg::Ptr(x.ptr()),
        Arg::Ptr(rstd.ptr()),
        Arg::U32(rows32),
        Arg::U32(h32),
        Arg::U32(rows_per_chunk as u32),
    ];
    // SAFETY: dy and x hold rows * h elements, rstd rows; partial holds chunks * h f32, and the
    // grid is exactly (ceil(h/32), chunks) with the (32, 8) block the kernel is written for, so
    // every partial[chunk, j] is written before pass 2 reads it (stream order).
    unsafe { launch(cuda, STEM, kernel, cfg, &args, &all)? };
    // `partial` is freed when this returns, while pass 2 may still be queued: the allocator only
    // hands the block out again to work queued later on the same stream.
    column_sum(cuda, dw, &partial, accumulate)
}

/// Column sums in row order: `out[j] = (accumulate ? out[j] : 0) + sum_r input[r, j]`. out
/// `[cols]` f32, input `[rows, cols]` f32 (rows may be 0: out becomes zeros or stays). Also the
/// gradient of a bias (the sum of dy over rows).
pub fn column_sum(cuda: &Cuda, out: &mut DeviceTensor, input: &DeviceTensor, accumulate: bool) -> Result<()> {
    let kernel = "column_sum_f32";
    let all: Ops = vec![("out", &*out), ("input", input)];
    expect_elem(kernel, "out", out, &[Elem::F32], &all)?;
    expect_elem(kernel, "input", input, &[Elem::F32], &all)?;
    let cols = out.numel();
    let rows = rows_of(kernel, "input", input, cols, &all)?;
    if cols == 0 {
        return Ok(());
    }
    let rows = u32_of(kernel, "rows", rows, &all)?;
    let cols32 = u32_of(kernel, "cols", cols, &all)?;
    // Not grid-stride: one thread per column, so the grid must cover every column.
    let cfg = Launch { grid: (cols.div_ceil(256) as u32, 1, 1), block: (256, 1, 1), shared_bytes: 0 };
    let args = [Arg::Ptr(out.ptr()), Arg::Ptr(input.ptr()), Arg::U32(rows), Arg::U32(cols32), Arg::I32(accumulate as i32)];
    // SAFETY: input holds rows * cols f32 and out cols f32 (distinct tensors, as the kernel's
    // __restrict__ needs); threads past `cols` return at once.
    unsafe { launch(cuda, STEM, kernel, cfg, &args, &all) }
}

/// RoPE tables and the optional row-to-table-row indirection of one rotation.
#[derive(Clone, Copy)]
pub struct RopeTables<'a> {
    /// `[table_rows, head_dim / 2]` f32 each (`rope_tables` of some positions).
    pub cos: &'a DeviceTensor,
    pub sin: &'a DeviceTensor,
    /// `[rows]` u32: x's row r uses table row `pos[r]`; `None`: row r (the tables have x's rows).
    /// A position past the table turns its row into NaN (it is on the device, so it cannot be
    /// checked here).
    pub pos: Option<&'a DeviceTensor>,
}

/// Launches `kernel` (a RoPE entry point already matched to x's type) after checking x
/// `[rows, n_heads * head_dim]` against the tables.
fn rope_launch(cuda: &Cuda, kernel: &'static str, x: &DeviceTensor, t: RopeTables<'_>, n_heads: usize, head_dim: usize) -> Result<()> {
    let mut all: Ops = vec![("x", x), ("cos", t.cos), ("sin", t.sin)];
    all.extend(t.pos.map(|p| ("pos", p)));
    if head_dim == 0 || !head_dim.is_multiple_of(2) || n_heads == 0 {
        return Err(bad(kernel, &all, format!("needs n_heads > 0 and an even head_dim > 0, got n_heads {n_heads}, head_dim {head_dim}")));
    }
    expect_elem(kernel, "cos", t.cos, &[Elem::F32], &all)?;
    expect_elem(kernel, "sin", t.sin, &[Elem::F32], &all)?;
    let width = n_heads.checked_mul(head_dim).ok_or_else(|| bad(kernel, &all, "n_heads * head_dim overflows"))?;
    let rows = rows_of(kernel, "x", x, width, &all)?;
    let half = head_dim / 2;
    let table_rows = match t.pos {
        None => rows,
        Some(p) => {
            expect_elem(kernel, "pos", p, &[Elem::U32], &all)?;
            expect_len(kernel, "pos", p, rows, &all)?;
            rows_of(kernel, "cos", t.cos, half, &all)?
        }
    };
    expect_len(kernel, "cos", t.cos, table_rows * half, &all)?;
    expect_len(kernel, "sin", t.sin, table_rows * half, &all)?;
    if rows == 0 {
        return Ok(());
    }
    let args = [
        Arg::Ptr(x.ptr()),
        Arg::Ptr(t.cos.ptr()),
        Arg::Ptr(t.sin.ptr()),
        Arg::Ptr(t.pos.map_or(0, DeviceTensor::ptr)),
        Arg::U32(u32_of(kernel, "rows", rows, &all)?),
        Arg::U32(u32_of(kernel, "table_rows", table_rows, &all)?),
        Arg::U32(u32_of(kernel, "n_heads", n_heads, &all)?),
        Arg::U32(u32_of(kernel, "head_dim", head_dim, &all)?),
    ];
    // SAFETY: x holds rows * n_heads * head_dim elements of the entry point's type, cos and sin
    // table_rows * head_dim/2 f32, pos (when given) rows u32; the kernel reads a table row only
    // below table_rows, and the grid-stride loop visits exactly the rows * n_heads * half pairs.
    unsafe { launch(cuda, STEM, kernel, Launch::elements(rows * n_heads * half), &args, &all) }
}

/// Rotary embedding in place, HF `rotate_half` layout: x `[rows, n_heads * head_dim]` f32 or
/// bf16, rotated by `tables` (see [`RopeTables`]). head_dim must be even.
pub fn rope(cuda: &Cuda, x: &mut DeviceTensor, tables: RopeTables<'_>, n_heads: usize, head_dim: usize) -> Result<()> {
    let all: Ops = vec![("x", &*x), ("cos", tables.cos), ("sin", tables.sin)];
    let kernel = entry("rope", "rope_f32", "rope_bf16", "x", x, &all)?;
    rope_launch(cuda, kernel, x, tables, n_heads, head_dim)
}

/// RoPE backward in place on the f32 gradient `dx` (the rotation by the opposite angle); the
/// same tables as the forward.
pub fn rope_backward(cuda: &Cuda, dx: &mut DeviceTensor, tables: RopeTables<'_>, n_heads: usize, head_dim: usize) -> Result<()> {
    let kernel = "rope_backward_f32";
    let all: Ops = vec![("dx", &*dx), ("cos", tables.cos), ("sin", tables.sin)];
    expect_elem(kernel, "dx", dx, &[Elem::F32], &all)?;
    rope_launch(cuda, kernel, dx, tables, n_heads, head_dim)
}

fn swiglu_launch(cuda: &Cuda, out: &DeviceTensor, gate: &DeviceTensor, up: &DeviceTensor, all: &[(&str, &DeviceTensor)]) -> Result<()> {
    let kernel = entry("swiglu", "swiglu_f32", "swiglu_bf16", "gate", gate, all)?;
    expect_elem(kernel, "out", out, &[gate.elem()], all)?;
    expect_elem(kernel, "up", up, &[gate.elem()], all)?;
    expect_len(kernel, "out", out, gate.numel(), all)?;
    expect_len(kernel, "up", up, gate.numel(), all)?;
    let n = gate.numel();
    if n == 0 {
        return Ok(());
    }
    let args = [Arg::Ptr(out.ptr()), Arg::Ptr(gate.ptr()), Arg::Ptr(up.ptr()), Arg::U64(n as u64)];
    // SAFETY: out, gate and up hold n elements of one type; out may be gate (each element is read
    // before it is written, by the same thread).
    unsafe { launch(cuda, STEM, kernel, Launch::elements(n), &args, all) }
}

/// SwiGLU: `out = silu(gate) * up` (the CPU's Cephes exp, bitwise its result); all `[n]` of one
/// type.
pub fn swiglu(cuda: &Cuda, out: &mut DeviceTensor, gate: &DeviceTensor, up: &DeviceTensor) -> Result<()> {
    let all: Ops = vec![("out", &*out), ("gate", gate), ("up", up)];
    swiglu_launch(cuda, out, gate, up, &all)
}

/// SwiGLU in place on `gate` (the CPU's `silu_mul`), saving the activation buffer.
pub fn swiglu_inplace(cuda: &Cuda, gate: &mut DeviceTensor, up: &DeviceTensor) -> Result<()> {
    let gate: &DeviceTensor = gate;
    let all: Ops = vec![("gate", gate), ("up", up)];
    swiglu_launch(cuda, gate, gate, up, &all)
}

/// SwiGLU backward, overwriting `dg` and `du` from `da` (all f32 `[n]`); gate, up `[n]` f32 or
/// bf16 (the forward's inputs).
pub fn swiglu_backward(cuda: &Cuda, dg: &mut DeviceTensor, du: &mut DeviceTensor, da: &DeviceTensor, gate: &DeviceTensor, up: &DeviceTensor) -> Result<()> {
    let all: Ops = vec![("dg", &*dg), ("du", &*du), ("da", da), ("gate", gate), ("up", up)];
    let kernel = entry("swiglu_backward", "swiglu_backward_f32", "swiglu_backward_bf16", "gate", gate, &all)?;
    expect_elem(kernel, "up", up, &[gate.elem()], &all)?;
    let n = gate.numel();
    for (name, t) in [("dg", &*dg), ("du", &*du), ("da", da)] {
        expect_elem(kernel, name, t, &[Elem::F32], &all)?;
        expect_len(kernel, name, t, n, &all)?;
    }
    expect_len(kernel, "up", up, n, &all)?;
    if n == 0 {
        return Ok(());
    }
    let args = [Arg::Ptr(dg.ptr()), Arg::Ptr(du.ptr()), Arg::Ptr(da.ptr()), Arg::Ptr(gate.ptr()), Arg::Ptr(up.ptr()), Arg::U64(n as u64)];
    // SAFETY: dg, du, da hold n f32 and gate, up n elements of the entry point's type.
    unsafe { launch(cuda, STEM, kernel, Launch::elements(n), &args, &all) }
}

/// `x[r, :] += bias` for every row: x `[rows, cols]`, bias `[cols]`, one type.
pub fn add_bias(cuda: &Cuda, x: &mut DeviceTensor, bias: &DeviceTensor) -> Result<()> {
    let all: Ops = vec![("x", &*x), ("bias", bias)];
    let kernel = entry("add_bias", "add_bias_f32", "add_bias_bf16", "x", x, &all)?;
    expect_elem(kernel, "bias", bias, &[x.elem()], &all)?;
    let cols = bias.numel();
    let rows = rows_of(kernel, "x", x, cols, &all)?;
    if rows == 0 {
        return Ok(());
    }
    let args = [Arg::Ptr(x.ptr()), Arg::Ptr(bias.ptr()), Arg::U32(u32_of(kernel, "rows", rows, &all)?), Arg::U32(u32_of(kernel, "cols", cols, &all)?)];
    // SAFETY: x holds rows * cols elements and bias cols, of one type.
    unsafe { launch(cuda, STEM, kernel, Launch::elements(x.numel()), &args, &all) }
}

/// Residual add `acc += x`, both `[n]` of one type (bf16 sums are rounded, as a store would).
pub fn add_inplace(cuda: &Cuda, acc: &mut DeviceTensor, x: &DeviceTensor) -> Result<()> {
    let all: Ops = vec![("acc", &*acc), ("x", x)];
    let kernel = entry("add_inplace", "add_inplace_f32", "add_inplace_bf16", "acc", acc, &all)?;
    expect_elem(kernel, "x", x, &[acc.elem()], &all)?;
    expect_len(kernel, "x", x, acc.numel(), &all)?;
    let n = acc.numel();
    if n == 0 {
        return Ok(());
    }
    let args = [Arg::Ptr(acc.ptr()), Arg::Ptr(x.ptr()), Arg::U64(n as u64)];
    // SAFETY: acc and x hold n elements of one type.
    unsafe { launch(cuda, STEM, kernel, Launch::elements(n), &args, &all) }
}

/// Element type conversion: f32 -> bf16 (round to nearest even) or bf16 -> f32 (exact); same
/// element count.
pub fn cast(cuda: &Cuda, out: &mut DeviceTensor, input: &DeviceTensor) -> Result<()> {
    let all: Ops = vec![("out", &*out), ("input", input)];
    let kernel = match (input.elem(), out.elem()) {
        (Elem::F32, Elem::BF16) => "cast_f32_to_bf16",
        (Elem::BF16, Elem::F32) => "cast_bf16_to_f32",
        (i, o) => return Err(bad("cast", &all, format!("casts are F32 -> BF16 or BF16 -> F32, not {i:?} -> {o:?}"))),
    };
    expect_len(kernel, "out", out, input.numel(), &all)?;
    let n = input.numel();
    if n == 0 {
        return Ok(());
    }
    let args = [Arg::Ptr(out.ptr()), Arg::Ptr(input.ptr()), Arg::U64(n as u64)];
    // SAFETY: out and input hold n elements of the types the entry point names, in distinct
    // tensors (the kernel's __restrict__).
    unsafe { launch(cuda, STEM, kernel, Launch::elements(n), &args, &all) }
}
