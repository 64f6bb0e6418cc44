//! Launchers for kernels/attention.cu: the simple, correct causal grouped-query attention (forward
//! over a KV cache with a key padding mask, and the training backward), semantics of
//! `crate::backend::cpu::attention` / `attention_backward`. The shape is the CPU's
//! [`AttentionShape`]; see the kernel file for the layouts and launch shapes.
//!
//! Status: compiled, unverified on GPU until `ilrec selftest --device cuda` has run on one.
use super::{bad, describe, expect_elem, expect_len, u32_of};
use crate::backend::cpu::AttentionShape;
use crate::backend::cuda::{Arg, Cuda, DeviceTensor, Elem, Launch, MAX_GRID_YZ};
use crate::error::Result;

const STEM: &str = "attention";

/// Largest supported head dimension (one thread per dimension, blocks of at most 256 threads).
pub const MAX_HEAD_DIM: usize = 256;

/// Threads per block: 128, or 256 for head dimensions above 128 (always >= head_dim).
fn block_threads(d: usize) -> u32 {
    if d <= 128 {
        128
    } else {
        256
    }
}

/// The shape's sizes as kernel arguments, after the checks every attention kernel needs.
struct Sizes {
    batch: u32,
    tq: u32,
    past: u32,
    cap: u32,
    n_heads: u32,
    n_kv_heads: u32,
    d: u32,
    scale: f32,
    block: u32,
}

fn sizes(kernel: &str, s: AttentionShape, all: &[(&str, &DeviceTensor)]) -> Result<Sizes> {
    let AttentionShape { batch, tq, past, cap, n_heads, n_kv_heads, head_dim } = s;
    if n_kv_heads == 0 || n_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) {
        return Err(bad(kernel, all, format!("n_heads {n_heads} must be a positive multiple of n_kv_heads {n_kv_heads}")));
    }
    if head_dim == 0 || head_dim > MAX_HEAD_DIM {
        return Err(bad(kernel, all, format!("head_dim {head_dim} must be in 1..={MAX_HEAD_DIM}")));
    }
    if past.checked_add(tq).is_none_or(|tk| tk > cap) {
        return Err(bad(kernel, all, format!("past {past} + tq {tq} exceeds the cache capacity {cap}")));
    }
    // Grid (rows, heads, batch).
    if batch > MAX_GRID_YZ || n_heads > MAX_GRID_YZ {
        return Err(bad(kernel, all, format!("batch {batch} and n_heads {n_heads} must be at most {MAX_GRID_YZ} (grid)")));
    }
    if cap > i32::MAX as usize {
        return Err(bad(kernel, all, format!("cap {cap} exceeds i32 (grid)")));
    }
    Ok(Sizes {
        batch: u32_of(kernel, "batch", batch, all)?,
        tq: u32_of(kernel, "tq", tq, all)?,
        past: u32_of(kernel, "past", past, all)?,
        cap: u32_of(kernel, "cap", cap, all)?,
        n_heads: u32_of(kernel, "n_heads", n_heads, all)?,
        n_kv_heads: u32_of(kernel, "n_kv_heads", n_kv_heads, all)?,
        d: u32_of(kernel, "head_dim", head_dim, all)?,
        // The CPU reference's scale, computed the same way.
        scale: 1.0 / (head_dim as f32).sqrt(),
        block: block_threads(head_dim),
    })
}

/// `dims` multiplied, or an error when the product overflows usize.
fn numel(kernel: &str, dims: &[usize], all: &[(&str, &DeviceTensor)]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &x| acc.checked_mul(x))
        .ok_or_else(|| bad(kernel, all, format!("element count of {dims:?} overflows")))
}

/// Fails unless every tensor named in `names` has the element type of the first one, which must
/// be f32 or bf16; returns that type.
fn same_float_elem(kernel: &str, names: &[(&str, &DeviceTensor)], all: &[(&str, &DeviceTensor)]) -> Result<Elem> {
    let (first, t0) = names[0];
    expect_elem(kernel, first, t0, &[Elem::F32, Elem::BF16], all)?;
    for (name, t) in &names[1..] {
        if t.elem() != t0.elem() {
            return Err(bad(kernel, all, format!("`{name}` must have the element type of `{first}` ({:?}), is {:?}", t0.elem(), t.elem())));
        }
    }
    Ok(t0.elem())
}

/// `out = softmax(q k^T / sqrt(d) + causal/padding mask) v` per sequence and head, and the rows'
/// log-sum-exp (`-inf` for a query that sees no key; its output row is zeros), as
/// [`crate::backend::cpu::attention`]. Query `i` of sequence `b` sees key `j` iff
/// `j <= past + i` and `key_mask[b * cap + j] != 0`; query head `h` reads KV head
/// `h / (n_heads / n_kv_heads)`.
///
/// Layouts: `q`, `out` `[batch * tq, n_heads * head_dim]` (f32, or bf16 for all of q, k, v, out);
/// `k`, `v` `[batch, n_kv_heads, cap, head_dim]`; `key_mask` `[batch, cap]` u8; `lse`
/// `[batch, n_heads, tq]` f32. Rows of k and v at or beyond `past + tq` are not read.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    cuda: &Cuda,
    out: &mut DeviceTensor,
    lse: &mut DeviceTensor,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    key_mask: &DeviceTensor,
    s: AttentionShape,
) -> Result<()> {
    let name = "attention_fwd";
    let all = [("out", &*out), ("lse", &*lse), ("q", q), ("k", k), ("v", v), ("key_mask", key_mask)];
    let z = sizes(name, s, &all)?;
    let elem = same_float_elem(name, &[("q", q), ("k", k), ("v", v), ("out", &*out)], &all)?;
    expect_elem(name, "lse", lse, &[Elem::F32], &all)?;
    expect_elem(name, "key_mask", key_mask, &[Elem::U8], &all)?;
    let AttentionShape { batch, tq, cap, n_heads, n_kv_heads, head_dim: d, .. } = s;
    let q_len = numel(name, &[batch, tq, n_heads, d], &all)?;
    let kv_len = numel(name, &[batch, n_kv_heads, cap, d], &all)?;
    expect_len(name, "q", q, q_len, &all)?;
    expect_len(name, "out", out, q_len, &all)?;
    expect_len(name, "k", k, kv_len, &all)?;
    expect_len(name, "v", v, kv_len, &all)?;
    expect_len(name, "key_mask", key_mask, numel(name, &[batch, cap], &all)?, &all)?;
    expect_len(name, "lse", lse, numel(name, &[batch, n_heads, tq], &all)?, &all)?;
    if batch == 0 || tq == 0 {
        return Ok(());
    }
    let kernel = match elem {
        Elem::BF16 => "attention_fwd_bf16",
        _ => "attention_fwd_f32",
    };
    let cfg = Launch {
        grid: (z.tq, z.n_heads, z.batch),
        block: (z.block, 1, 1),
        shared_bytes: (z.d + z.block) * 4,
    };
    let args = [
        Arg::Ptr(out.ptr()),
        Arg::Ptr(lse.ptr()),
        Arg::Ptr(q.ptr()),
        Arg::Ptr(k.ptr()),
        Arg::Ptr(v.ptr()),
        Arg::Ptr(key_mask.ptr()),
        Arg::U32(z.tq),
        Arg::U32(z.past),
        Arg::U32(z.cap),
        Arg::U32(z.n_heads),
        Arg::U32(z.n_kv_heads),
        Arg::U32(z.d),
        Arg::F32(z.scale),
    ];
    let shape = || format!("{s:?}: {}", describe(&all));
    // SAFETY: the arguments follow attention_fwd_T's C signature (6 pointers of the checked
    // element types, 6 u32, 1 f32); every tensor holds exactly the element count its layout
    // needs for this shape (checked above), past + tq <= cap bounds every key index the kernel
    // reads, n_heads is a positive multiple of n_kv_heads, and blockDim >= head_dim as the kernel
    // requires, with the dynamic shared memory it indexes.
    unsafe { cuda.launch(STEM, kernel, cfg, &args, &shape) }
}

/// Gradients of [`attention_forward`] for a whole sequence (training: `past == 0`, `cap == tq`),
/// as [`crate::backend::cpu::attention_backward`]: `dq`, `dk`, `dv` (f32) are overwritten from
/// `dout` (f32) and the forward's `q`, `k`, `v`, `out` (all f32 or all bf16) and `lse`. The
/// probabilities are recomputed from `q`, `k` and `lse`; `delta = rowsum(dp * p)` goes into a
/// temporary written by the first kernel and read by the second. For f32 storage it is computed
/// as `rowsum(dout * out)` (equal: `out = p v`); for bf16 `out` is only validated, not read: its
/// rounding would cost dk up to ~1e-2 relative, so the kernel sums `p * dp` as the CPU does.
///
/// Layouts: `q`, `out`, `dout`, `dq` `[batch * tq, n_heads * head_dim]`; `k`, `v`, `dk`, `dv`
/// `[batch, n_kv_heads, tq, head_dim]`; `lse` `[batch, n_heads, tq]` f32; `key_mask`
/// `[batch, tq]` u8.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    cuda: &Cuda,
    dq: &mut DeviceTensor,
    dk: &mut DeviceTensor,
    dv: &mut DeviceTensor,
    dout: &DeviceTensor,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    out: &DeviceTensor,
    lse: &DeviceTensor,
    key_mask: &DeviceTensor,
    s: AttentionShape,
) -> Result<()> {
    let name = "attention_bwd";
    let all = [
        ("dq", &*dq),
        ("dk", &*dk),
        ("dv", &*dv),
        ("dout", dout),
        ("q", q),
        ("k", k),
        ("v", v),
        ("out", out),
        ("lse", lse),
        ("key_mask", key_mask),
    ];
    let z = sizes(name, s, &all)?;
    if s.past != 0 || s.cap != s.tq {
        return Err(bad(name, &all, format!("the backward needs past == 0 and cap == tq (past {}, cap {}, tq {})", s.past, s.cap, s.tq)));
    }
    let elem = same_float_elem(name, &[("q", q), ("k", k), ("v", v), ("out", out)], &all)?;
    for (n, t) in [("dq", &*dq), ("dk", &*dk), ("dv", &*dv), ("dout", dout), ("lse", lse)] {
        expect_elem(name, n, t, &[Elem::F32], &all)?;
    }
    expect_elem(name, "key_mask", key_mask, &[Elem::U8], &all)?;
    let AttentionShape { batch, tq: t, n_heads, n_kv_heads, head_dim: d, .. } = s;
    let q_len = numel(name, &[batch, t, n_heads, d], &all)?;
    let kv_len = numel(name, &[batch, n_kv_heads, t, d], &all)?;
    let stat_len = numel(name, &[batch, n_heads, t], &all)?;
    for (n, x) in [("dq", &*dq), ("dout", dout), ("q", q), ("out", out)] {
        expect_len(name, n, x, q_len, &all)?;
    }
    for (n, x) in [("dk", &*dk), ("dv", &*dv), ("k", k), ("v", v)] {
        expect_len(name, n, x, kv_len, &all)?;
    }
    expect_len(name, "lse", lse, stat_len, &all)?;
    expect_len(name, "key_mask", key_mask, numel(name, &[batch, t], &all)?, &all)?;
    if batch == 0 || t == 0 {
        return Ok(());
    }
    let delta = DeviceTensor::empty(cuda, &[batch, n_heads, t], Elem::F32, "attention backward delta")?;
    let (k_dq, k_dkdv) = match elem {
        Elem::BF16 => ("attention_bwd_dq_bf16", "attention_bwd_dkdv_bf16"),
        _ => ("attention_bwd_dq_f32", "attention_bwd_dkdv_f32"),
    };
    let shape = || format!("{s:?}: {}", describe(&all));

    let cfg = Launch {
        grid: (z.tq, z.n_heads, z.batch),
        block: (z.block, 1, 1),
        shared_bytes: (2 * z.d + z.block) * 4,
    };
    let args = [
        Arg::Ptr(dq.ptr()),
        Arg::Ptr(delta.ptr()),
        Arg::Ptr(dout.ptr()),
        Arg::Ptr(q.ptr()),
        Arg::Ptr(k.ptr()),
        Arg::Ptr(v.ptr()),
        // `out` feeds delta = rowsum(dout * out) for f32 storage; for bf16 the kernel sums
        // delta = rowsum(p * dp) itself (null `out`), as the CPU does, because the bf16
        // rounding of `out` would cost dk up to ~1e-2 relative.
        Arg::Ptr(if elem == Elem::F32 { out.ptr() } else { 0 }),
        Arg::Ptr(lse.ptr()),
        Arg::Ptr(key_mask.ptr()),
        Arg::U32(z.tq),
        Arg::U32(z.n_heads),
        Arg::U32(z.n_kv_heads),
        Arg::U32(z.d),
        Arg::F32(z.scale),
    ];
    // SAFETY: the arguments follow attention_bwd_dq_T's C signature (9 pointers, 4 u32, 1 f32;
    // `out` may be null, which the kernel checks before reading it); every tensor holds exactly the element count its layout needs for this shape with
    // cap == tq (checked above), `delta` was just allocated with [batch, n_heads, tq] f32
    // elements, n_heads is a positive multiple of n_kv_heads, and blockDim >= head_dim with the
    // dynamic shared memory the kernel indexes.
    unsafe { cuda.launch(STEM, k_dq, cfg, &args, &shape)? };

    let cfg = Launch {
        grid: (z.tq, z.n_kv_heads, z.batch),
        block: (z.block, 1, 1),
        shared_bytes: 2 * (z.d + z.block) * 4,
    };
    let args = [
        Arg::Ptr(dk.ptr()),
        Arg::Ptr(dv.ptr()),
        Arg::Ptr(dout.ptr()),
        Arg::Ptr(q.ptr()),
        Arg::Ptr(k.ptr()),
        Arg::Ptr(v.ptr()),
        Arg::Ptr(lse.ptr()),
        Arg::Ptr(delta.ptr()),
        Arg::Ptr(key_mask.ptr()),
        Arg::U32(z.tq),
        Arg::U32(z.n_heads),
        Arg::U32(z.n_kv_heads),
        Arg::U32(z.d),
        Arg::F32(z.scale),
    ];
    // SAFETY: as above for attention_bwd_dkdv_T's signature (9 pointers, 4 u32, 1 f32); it reads
    // `delta`, which the dq kernel queued before it on the same stream writes in full. `delta` is
    // dropped (returned to the allocator) after both launches are queued, which the allocator
    // allows: later work on the stream runs after these kernels.
    unsafe { cuda.launch(STEM, k_dkdv, cfg, &args, &shape) }
}
