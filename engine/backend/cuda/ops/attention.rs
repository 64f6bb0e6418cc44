//! Launchers for kernels/attention.cu: the simple, correct causal grouped-query attention (forward
//! over a KV cache with a key padding mask, and the training backward), semantics of
//! `crate::backend::cpu::attention` / `attention_backward`. The shape is the CPU's
//! [`AttentionShape`]; see the kernel file for the layouts and launch shapes.
//!
//! Status: compiled, unverified on GPU until `ilrec selftest --device cuda` has run on one.
use super::{bad, describe, expect_elem, expect_len, launch, u32_of};
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

/// The checks every forward launcher shares, on `all` = `[out, lse, q, k, v, key_mask]`: each
/// operand's length for `s`, `lse` f32, `key_mask` u8 (q, k, v and out's element types are the
/// caller's: the plain and flash kernels take different ones).
fn check_forward(name: &str, s: AttentionShape, all: &[(&str, &DeviceTensor); 6]) -> Result<()> {
    let [(_, out), (_, lse), (_, q), (_, k), (_, v), (_, key_mask)] = *all;
    expect_elem(name, "lse", lse, &[Elem::F32], all)?;
    expect_elem(name, "key_mask", key_mask, &[Elem::U8], all)?;
    let AttentionShape { batch, tq, cap, n_heads, n_kv_heads, head_dim: d, .. } = s;
    let q_len = numel(name, &[batch, tq, n_heads, d], all)?;
    let kv_len = numel(name, &[batch, n_kv_heads, cap, d], all)?;
    for (n, x) in [("q", q), ("out", out)] {
        expect_len(name, n, x, q_len, all)?;
    }
    for (n, x) in [("k", k), ("v", v)] {
        expect_len(name, n, x, kv_len, all)?;
    }
    expect_len(name, "key_mask", key_mask, numel(name, &[batch, cap], all)?, all)?;
    expect_len(name, "lse", lse, numel(name, &[batch, n_heads, tq], all)?, all)
}

/// The checks every backward launcher shares, on `all` =
/// `[dq, dk, dv, dout, q, k, v, out, lse, key_mask]`: a whole sequence (`past == 0`,
/// `cap == tq`), each operand's length, the gradients, `dout` and `lse` f32, `key_mask` u8.
fn check_backward(name: &str, s: AttentionShape, all: &[(&str, &DeviceTensor); 10]) -> Result<()> {
    let [(_, dq), (_, dk), (_, dv), (_, dout), (_, q), (_, k), (_, v), (_, out), (_, lse), (_, key_mask)] = *all;
    if s.past != 0 || s.cap != s.tq {
        return Err(bad(name, all, format!("the backward needs past == 0 and cap == tq (past {}, cap {}, tq {})", s.past, s.cap, s.tq)));
    }
    for (n, t) in [("dq", dq), ("dk", dk), ("dv", dv), ("dout", dout), ("lse", lse)] {
        expect_elem(name, n, t, &[Elem::F32], all)?;
    }
    expect_elem(name, "key_mask", key_mask, &[Elem::U8], all)?;
    let AttentionShape { batch, tq: t, n_heads, n_kv_heads, head_dim: d, .. } = s;
    let q_len = numel(name, &[batch, t, n_heads, d], all)?;
    let kv_len = numel(name, &[batch, n_kv_heads, t, d], all)?;
    for (n, x) in [("dq", dq), ("dout", dout), ("q", q), ("out", out)] {
        expect_len(name, n, x, q_len, all)?;
    }
    for (n, x) in [("dk", dk), ("dv", dv), ("k", k), ("v", v)] {
        expect_len(name, n, x, kv_len, all)?;
    }
    expect_len(name, "lse", lse, numel(name, &[batch, n_heads, t], all)?, all)?;
    expect_len(name, "key_mask", key_mask, numel(name, &[batch, t], all)?, all)
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
    check_forward(name, s, &all)?;
    if s.batch == 0 || s.tq == 0 {
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
    let elem = same_float_elem(name, &[("q", q), ("k", k), ("v", v), ("out", out)], &all)?;
    check_backward(name, s, &all)?;
    let AttentionShape { batch, tq: t, n_heads, .. } = s;
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

// =============================================================================================
// Fused (flash) attention: kernels/flash_attn.cu (forward, split-KV decoding, combine) and
// kernels/flash_attn_bwd.cu (deterministic backward). bf16 q, k, v on tensor cores; f32 out, lse
// and gradients. Same semantics as the plain kernels above; see docs/kernels/attention.md.

const FLASH_STEM: &str = "flash_attn";
const FLASH_BWD_STEM: &str = "flash_attn_bwd";

/// Head dimensions the flash kernels are compiled for.
pub const FLASH_HEAD_DIMS: [usize; 3] = [64, 80, 128];
/// Packed query rows (query position x head of a GQA group) per forward block; also the key tile.
const FLASH_TILE: usize = 64;
/// Threads per flash block (4 warps).
const FLASH_THREADS: u32 = 128;
/// Blocks a forward launch should have before splitting the keys is not worth a combine pass:
/// two waves of a 132-SM H100.
const FLASH_TARGET_BLOCKS: usize = 264;
/// Most key splits of one decoding launch (the combine reads every split of every row).
pub const FLASH_MAX_SPLITS: usize = 64;

/// Whether the flash kernels cover this shape's head dimension (the plain kernels cover the rest).
pub fn flash_supported(head_dim: usize) -> bool {
    FLASH_HEAD_DIMS.contains(&head_dim)
}

/// Bytes of one shared-memory row of a bf16 tile (kernels/flash_attn.cuh `Tile<D>::ROW_BYTES`).
fn flash_row_bytes(d: usize) -> usize {
    if d.is_multiple_of(64) {
        2 * d
    } else {
        2 * d + 16
    }
}

/// The backward's inner tile width (`Inner<D>::N` in flash_attn_bwd.cu).
fn flash_inner(d: usize) -> usize {
    if d > 80 {
        32
    } else {
        64
    }
}

/// Checks shared by the flash launchers: the plain kernels' shape checks, a supported head dim,
/// and the kernels' i32 row indices.
fn flash_sizes(kernel: &str, s: AttentionShape, all: &[(&str, &DeviceTensor)]) -> Result<Sizes> {
    let z = sizes(kernel, s, all)?;
    if !flash_supported(s.head_dim) {
        return Err(bad(kernel, all, format!("head_dim {} is not one of the flash kernels' {FLASH_HEAD_DIMS:?}", s.head_dim)));
    }
    let group = s.n_heads / s.n_kv_heads;
    if group.checked_mul(s.tq).is_none_or(|r| r > i32::MAX as usize) {
        return Err(bad(kernel, all, format!("n_heads / n_kv_heads ({group}) x tq ({}) exceeds i32", s.tq)));
    }
    Ok(z)
}

/// How many key splits a forward launch uses. Only decoding shapes split (a GQA group's new
/// query rows fit one 64-row tile): then enough splits to reach `FLASH_TARGET_BLOCKS` blocks, at
/// most one per key tile and [`FLASH_MAX_SPLITS`]. Longer query blocks do not: under the causal
/// mask their early tiles have few keys to split, and the combine pass would cost more traffic.
pub fn flash_default_splits(s: AttentionShape) -> usize {
    let group = s.n_heads / s.n_kv_heads.max(1);
    let m_tiles = (group * s.tq).div_ceil(FLASH_TILE);
    let blocks = m_tiles * s.n_kv_heads * s.batch;
    let kv_tiles = (s.past + s.tq).div_ceil(FLASH_TILE);
    if m_tiles != 1 || blocks == 0 || blocks >= FLASH_TARGET_BLOCKS {
        return 1;
    }
    FLASH_TARGET_BLOCKS.div_ceil(blocks).min(kv_tiles).clamp(1, FLASH_MAX_SPLITS)
}

/// [`attention_forward`] on the fused kernels: the same semantics (causal, key mask, GQA, KV cache
/// with `past`), bf16 `q`, `k`, `v`, f32 `out` and `lse`. Head dims [`FLASH_HEAD_DIMS`]. Decoding
/// shapes split the keys over several blocks ([`flash_default_splits`]) and merge them.
///
/// Layouts: `q` `[batch * tq, n_heads * head_dim]` bf16; `k`, `v` `[batch, n_kv_heads, cap,
/// head_dim]` bf16; `key_mask` `[batch, cap]` u8; `out` `[batch * tq, n_heads * head_dim]` f32;
/// `lse` `[batch, n_heads, tq]` f32.
#[allow(clippy::too_many_arguments)]
pub fn flash_attention_forward(
    cuda: &Cuda,
    out: &mut DeviceTensor,
    lse: &mut DeviceTensor,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    key_mask: &DeviceTensor,
    s: AttentionShape,
) -> Result<()> {
    flash_attention_forward_splits(cuda, out, lse, q, k, v, key_mask, s, flash_default_splits(s))
}

/// [`flash_attention_forward`] with an explicit number of key splits (1..=[`FLASH_MAX_SPLITS`];
/// more than the key tiles is allowed: the extra splits see no key and drop out of the merge).
#[allow(clippy::too_many_arguments)]
pub fn flash_attention_forward_splits(
    cuda: &Cuda,
    out: &mut DeviceTensor,
    lse: &mut DeviceTensor,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    key_mask: &DeviceTensor,
    s: AttentionShape,
    splits: usize,
) -> Result<()> {
    let name = "flash_attn_fwd";
    let all = [("out", &*out), ("lse", &*lse), ("q", q), ("k", k), ("v", v), ("key_mask", key_mask)];
    let z = flash_sizes(name, s, &all)?;
    for (n, t) in [("q", q), ("k", k), ("v", v)] {
        expect_elem(name, n, t, &[Elem::BF16], &all)?;
    }
    expect_elem(name, "out", out, &[Elem::F32], &all)?;
    check_forward(name, s, &all)?;
    let AttentionShape { batch, tq, past, n_heads, n_kv_heads, head_dim: d, .. } = s;
    // Checked: out has the queries' rows, lse their statistics.
    let (q_len, lse_len) = (out.numel(), lse.numel());
    if !(1..=FLASH_MAX_SPLITS).contains(&splits) {
        return Err(bad(name, &all, format!("splits {splits} must be in 1..={FLASH_MAX_SPLITS}")));
    }
    if batch == 0 || tq == 0 {
        return Ok(());
    }
    let kv_tiles = (past + tq).div_ceil(FLASH_TILE);
    let tiles_per_split = kv_tiles.div_ceil(splits);
    let m_tiles = (n_heads / n_kv_heads * tq).div_ceil(FLASH_TILE);
    if batch * splits > MAX_GRID_YZ || m_tiles > i32::MAX as usize {
        return Err(bad(name, &all, format!("grid ({m_tiles}, {n_kv_heads}, {batch} x {splits} splits) exceeds the launch limits")));
    }
    let kernel = match d {
        64 => "flash_attn_fwd_d64",
        80 => "flash_attn_fwd_d80",
        _ => "flash_attn_fwd_d128",
    };
    let cfg = Launch {
        grid: (m_tiles as u32, z.n_kv_heads, u32_of(name, "batch * splits", batch * splits, &all)?),
        block: (FLASH_THREADS, 1, 1),
        shared_bytes: (2 * FLASH_TILE * flash_row_bytes(d)) as u32,
    };
    // With one split the kernel writes out and lse itself; otherwise partial results per split go
    // to a workspace that the combine kernel merges.
    let parts = if splits > 1 {
        let po = DeviceTensor::empty(cuda, &[splits, q_len], Elem::F32, "flash attention partial outputs")?;
        let pl = DeviceTensor::empty(cuda, &[splits, lse_len], Elem::F32, "flash attention partial lse")?;
        Some((po, pl))
    } else {
        None
    };
    let (dst_o, dst_l) = match &parts {
        Some((po, pl)) => (po.ptr(), pl.ptr()),
        None => (out.ptr(), lse.ptr()),
    };
    let args = [
        Arg::Ptr(dst_o),
        Arg::Ptr(dst_l),
        Arg::Ptr(q.ptr()),
        Arg::Ptr(k.ptr()),
        Arg::Ptr(v.ptr()),
        Arg::Ptr(key_mask.ptr()),
        Arg::U32(z.batch),
        Arg::U32(z.tq),
        Arg::U32(z.past),
        Arg::U32(z.cap),
        Arg::U32(z.n_heads),
        Arg::U32(z.n_kv_heads),
        Arg::U32(u32_of(name, "tiles_per_split", tiles_per_split, &all)?),
        Arg::F32(z.scale),
    ];
    // SAFETY: the arguments follow flash_attn_fwd_d{D}'s C signature (6 pointers, 7 u32, 1 f32)
    // for the checked head dim D; q, k, v are bf16 and out, lse f32 with exactly their layouts'
    // element counts (or, with splits, workspaces of `splits` such slices, which grid.z =
    // batch * splits indexes); past + tq <= cap bounds every key row read; group * tq fits i32;
    // the dynamic shared memory is the kernel's two tiles of 64 rows (<= 32 KiB).
    unsafe { launch(cuda, FLASH_STEM, kernel, cfg, &args, &all)? };
    if let Some((po, pl)) = &parts {
        let n = q_len;
        let args = [
            Arg::Ptr(out.ptr()),
            Arg::Ptr(lse.ptr()),
            Arg::Ptr(po.ptr()),
            Arg::Ptr(pl.ptr()),
            Arg::U32(z.batch),
            Arg::U32(z.tq),
            Arg::U32(z.n_heads),
            Arg::U32(z.d),
            Arg::U32(splits as u32),
        ];
        // SAFETY: flash_attn_combine_f32's signature (4 pointers, 5 u32); out and lse hold their
        // layouts' counts, the workspaces `splits` slices of them, all written by the forward
        // queued before on the same stream; a grid-stride loop covers any grid.
        unsafe { launch(cuda, FLASH_STEM, "flash_attn_combine_f32", Launch::elements(n), &args, &all)? };
    }
    Ok(())
}

/// [`attention_backward`] on the fused kernels, deterministic (no atomics): `dq`, `dk`, `dv` (f32)
/// are overwritten from `dout` and `out` (f32: [`flash_attention_forward`]'s output), `q`, `k`, `v`
/// (bf16) and `lse`. Training shapes only (`past == 0`, `cap == tq`). Temporaries: `dout` in bf16
/// and `delta = rowsum(bf16(dout) * out)` (the same rounded `dout` the kernels' `dP` uses).
///
/// Layouts: `q`, `out`, `dout`, `dq` `[batch * tq, n_heads * head_dim]`; `k`, `v`, `dk`, `dv`
/// `[batch, n_kv_heads, tq, head_dim]`; `lse` `[batch, n_heads, tq]` f32; `key_mask` `[batch, tq]`.
#[allow(clippy::too_many_arguments)]
pub fn flash_attention_backward(
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
    let name = "flash_attn_bwd";
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
    let z = flash_sizes(name, s, &all)?;
    for (n, t) in [("q", q), ("k", k), ("v", v)] {
        expect_elem(name, n, t, &[Elem::BF16], &all)?;
    }
    expect_elem(name, "out", out, &[Elem::F32], &all)?;
    check_backward(name, s, &all)?;
    let AttentionShape { batch, tq: t, n_heads, head_dim: d, .. } = s;
    if batch == 0 || t == 0 {
        return Ok(());
    }
    let delta = DeviceTensor::empty(cuda, &[batch, n_heads, t], Elem::F32, "flash backward delta")?;
    let dout_bf16 = DeviceTensor::empty(cuda, &[batch * t, n_heads * d], Elem::BF16, "flash backward dout (bf16)")?;
    let rows = batch * t * n_heads;
    let prep = Launch { grid: (rows.div_ceil(8).clamp(1, 132 * 16) as u32, 1, 1), block: (256, 1, 1), shared_bytes: 0 };
    let args = [
        Arg::Ptr(delta.ptr()),
        Arg::Ptr(dout_bf16.ptr()),
        Arg::Ptr(dout.ptr()),
        Arg::Ptr(out.ptr()),
        Arg::U32(z.batch),
        Arg::U32(z.tq),
        Arg::U32(z.n_heads),
        Arg::U32(z.d),
    ];
    // SAFETY: flash_attn_bwd_prep's signature (4 pointers, 4 u32); dout and out hold
    // batch * t * n_heads rows of d f32, dout_bf16 as many bf16, delta [batch, n_heads, t] f32 (all
    // just checked or allocated); the warp-per-row loop is grid-stride.
    unsafe { launch(cuda, FLASH_BWD_STEM, "flash_attn_bwd_prep", prep, &args, &all)? };

    let (k_dkdv, k_dq) = match d {
        64 => ("flash_attn_bwd_dkdv_d64", "flash_attn_bwd_dq_d64"),
        80 => ("flash_attn_bwd_dkdv_d80", "flash_attn_bwd_dq_d80"),
        _ => ("flash_attn_bwd_dkdv_d128", "flash_attn_bwd_dq_d128"),
    };
    let rb = flash_row_bytes(d);
    let inner = flash_inner(d);
    let tiles = t.div_ceil(FLASH_TILE) as u32;
    let cfg = Launch {
        grid: (tiles, z.n_kv_heads, z.batch),
        block: (FLASH_THREADS, 1, 1),
        shared_bytes: ((2 * FLASH_TILE + 2 * inner) * rb) as u32,
    };
    let args = [
        Arg::Ptr(dk.ptr()),
        Arg::Ptr(dv.ptr()),
        Arg::Ptr(q.ptr()),
        Arg::Ptr(k.ptr()),
        Arg::Ptr(v.ptr()),
        Arg::Ptr(dout_bf16.ptr()),
        Arg::Ptr(lse.ptr()),
        Arg::Ptr(delta.ptr()),
        Arg::Ptr(key_mask.ptr()),
        Arg::U32(z.tq),
        Arg::U32(z.n_heads),
        Arg::U32(z.n_kv_heads),
        Arg::F32(z.scale),
    ];
    // SAFETY: flash_attn_bwd_dkdv_d{D}'s signature (9 pointers, 3 u32, 1 f32); every tensor holds
    // its layout's count with cap == tq (checked above); delta and dout_bf16 were written by the
    // prep kernel queued before on the same stream; shared memory = K, V tiles of 64 rows and Q,
    // dO tiles of the inner width (<= 48 KiB).
    unsafe { launch(cuda, FLASH_BWD_STEM, k_dkdv, cfg, &args, &all)? };

    let cfg = Launch {
        grid: (tiles, z.n_heads, z.batch),
        block: (FLASH_THREADS, 1, 1),
        shared_bytes: ((4 * inner).max(2 * FLASH_TILE) * rb) as u32,
    };
    let args = [
        Arg::Ptr(dq.ptr()),
        Arg::Ptr(q.ptr()),
        Arg::Ptr(k.ptr()),
        Arg::Ptr(v.ptr()),
        Arg::Ptr(dout_bf16.ptr()),
        Arg::Ptr(lse.ptr()),
        Arg::Ptr(delta.ptr()),
        Arg::Ptr(key_mask.ptr()),
        Arg::U32(z.tq),
        Arg::U32(z.n_heads),
        Arg::U32(z.n_kv_heads),
        Arg::F32(z.scale),
    ];
    // SAFETY: flash_attn_bwd_dq_d{D}'s signature (8 pointers, 3 u32, 1 f32), operands as above;
    // shared memory = max(two K/V stages of the inner width, the Q and dO staging tiles of 64 rows).
    // The temporaries are dropped after the launches are queued, which the stream-ordered
    // allocator allows.
    unsafe { launch(cuda, FLASH_BWD_STEM, k_dq, cfg, &args, &all) }
}

/// Whether a model whose projections are stored as `weights` runs attention on the flash kernels:
/// bf16 models (whose path already rounds activations to bf16 for every GEMM) with a head dim the
/// flash kernels are built for. f32 models, and other head dims, keep the plain kernels.
pub fn use_flash(weights: Elem, head_dim: usize) -> bool {
    weights == Elem::BF16 && flash_supported(head_dim)
}

/// bf16 copies of f32 attention operands for the flash kernels: `q` in full, and of `k`, `v`
/// (`[batch, n_kv_heads, cap, head_dim]`) only the rows below `past + tq` that the kernels read.
fn flash_operands(cuda: &Cuda, q: &DeviceTensor, k: &DeviceTensor, v: &DeviceTensor, s: AttentionShape) -> Result<[DeviceTensor; 3]> {
    let name = "flash_attn_cast_kv_bf16";
    let all = [("q", q), ("k", k), ("v", v)];
    for (n, t) in all {
        expect_elem(name, n, t, &[Elem::F32], &all)?;
    }
    let AttentionShape { batch, tq, past, cap, n_kv_heads, head_dim: d, .. } = s;
    let kv_len = numel(name, &[batch, n_kv_heads, cap, d], &all)?;
    expect_len(name, "k", k, kv_len, &all)?;
    expect_len(name, "v", v, kv_len, &all)?;
    let len = past.checked_add(tq).filter(|&l| l <= cap).ok_or_else(|| bad(name, &all, format!("past {past} + tq {tq} exceeds cap {cap}")))?;
    let mut qb = DeviceTensor::empty(cuda, q.shape(), Elem::BF16, "flash attention q (bf16)")?;
    super::elementwise::cast(cuda, &mut qb, q)?;
    let mut kv = Vec::with_capacity(2);
    for (what, src) in [("flash attention k (bf16)", k), ("flash attention v (bf16)", v)] {
        let dst = DeviceTensor::empty(cuda, src.shape(), Elem::BF16, what)?;
        let args = [
            Arg::Ptr(dst.ptr()),
            Arg::Ptr(src.ptr()),
            Arg::U64((batch * n_kv_heads) as u64),
            Arg::U32(u32_of(name, "cap", cap, &all)?),
            Arg::U32(u32_of(name, "past + tq", len, &all)?),
            Arg::U32(u32_of(name, "head_dim", d, &all)?),
        ];
        // SAFETY: flash_attn_cast_kv_bf16's signature (2 pointers, u64, 3 u32); src (f32) and dst
        // (bf16) both hold batch * n_kv_heads * cap * d elements (checked / allocated above) and
        // the kernel touches rows < past + tq <= cap of each slab; grid-stride.
        unsafe { launch(cuda, FLASH_STEM, name, Launch::elements(batch * n_kv_heads * len * d), &args, &all)? };
        kv.push(dst);
    }
    let v_b = kv.pop().expect("two casts");
    let k_b = kv.pop().expect("two casts");
    Ok([qb, k_b, v_b])
}

/// The attention forward of a model with f32 activations: the flash kernels on bf16 copies of
/// `q`, `k`, `v` when `flash` ([`use_flash`]), else [`attention_forward`] on them as they are.
/// Operands as [`attention_forward`] with f32 storage.
#[allow(clippy::too_many_arguments)]
pub fn forward_f32(
    cuda: &Cuda,
    out: &mut DeviceTensor,
    lse: &mut DeviceTensor,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    key_mask: &DeviceTensor,
    s: AttentionShape,
    flash: bool,
) -> Result<()> {
    if !flash {
        return attention_forward(cuda, out, lse, q, k, v, key_mask, s);
    }
    let [qb, kb, vb] = flash_operands(cuda, q, k, v, s)?;
    flash_attention_forward(cuda, out, lse, &qb, &kb, &vb, key_mask, s)
}

/// The attention backward matching [`forward_f32`] with the same `flash` (its `out` and `lse` come
/// from that path). Operands as [`attention_backward`] with f32 storage.
#[allow(clippy::too_many_arguments)]
pub fn backward_f32(
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
    flash: bool,
) -> Result<()> {
    if !flash {
        return attention_backward(cuda, dq, dk, dv, dout, q, k, v, out, lse, key_mask, s);
    }
    let [qb, kb, vb] = flash_operands(cuda, q, k, v, s)?;
    flash_attention_backward(cuda, dq, dk, dv, dout, &qb, &kb, &vb, out, lse, key_mask, s)
}
