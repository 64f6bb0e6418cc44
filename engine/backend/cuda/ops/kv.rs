//! Launchers for kernels/kv.cu: KV-cache layout copies and the dropout multiply.
use super::{bad, expect_elem, expect_len, u32_of};
use crate::backend::cuda::{Arg, Cuda, DeviceTensor, Elem, Launch};
use crate::error::Result;

/// Sizes of a copy between token-major rows `[batch * t, heads * d]` and the cache layout
/// `[batch, heads, cap, d]` at rows `past .. past + t`.
#[derive(Clone, Copy, Debug)]
pub struct KvLayout {
    pub batch: usize,
    pub t: usize,
    pub past: usize,
    pub cap: usize,
    pub heads: usize,
    pub d: usize,
}

/// Copies the new tokens' projections `rows` into the cache `cache` (kv_scatter).
pub fn kv_scatter(cuda: &Cuda, cache: &mut DeviceTensor, rows: &DeviceTensor, s: KvLayout) -> Result<()> {
    let (dst, src) = (cache.ptr(), rows.ptr());
    copy(cuda, "kv_scatter", dst, src, &*cache, rows, s)
}

/// Copies cache rows `past .. past + t` back to token-major `rows` (kv_gather).
pub fn kv_gather(cuda: &Cuda, rows: &mut DeviceTensor, cache: &DeviceTensor, s: KvLayout) -> Result<()> {
    let (dst, src) = (rows.ptr(), cache.ptr());
    copy(cuda, "kv_gather", dst, src, cache, &*rows, s)
}

fn copy(cuda: &Cuda, family: &str, dst: u64, src: u64, cache: &DeviceTensor, rows: &DeviceTensor, s: KvLayout) -> Result<()> {
    let all = [("cache", cache), ("rows", rows)];
    let kernel: &'static str = match (family, rows.elem()) {
        ("kv_scatter", Elem::F32) => "kv_scatter_f32",
        ("kv_scatter", _) => "kv_scatter_bf16",
        (_, Elem::F32) => "kv_gather_f32",
        _ => "kv_gather_bf16",
    };
    expect_elem(kernel, "rows", rows, &[Elem::F32, Elem::BF16], &all)?;
    if cache.elem() != rows.elem() {
        return Err(bad(kernel, &all, "cache and rows element types differ"));
    }
    let KvLayout { batch, t, past, cap, heads, d } = s;
    if rows.numel() != batch * t * heads * d || cache.numel() != batch * heads * cap * d || past + t > cap {
        return Err(bad(kernel, &all, format!("{s:?} does not fit")));
    }
    if rows.numel() == 0 {
        return Ok(());
    }
    let args = [
        Arg::Ptr(dst),
        Arg::Ptr(src),
        Arg::U32(u32_of(kernel, "batch", batch, &all)?),
        Arg::U32(u32_of(kernel, "t", t, &all)?),
        Arg::U32(u32_of(kernel, "past", past, &all)?),
        Arg::U32(u32_of(kernel, "cap", cap, &all)?),
        Arg::U32(u32_of(kernel, "heads", heads, &all)?),
        Arg::U32(u32_of(kernel, "d", d, &all)?),
    ];
    let shape = || format!("{s:?}: {}", super::describe(&all));
    // SAFETY: both tensors hold exactly the element counts of their layouts for these sizes, of
    // the kernel's element type; past + t <= cap keeps every cache index inside the cache.
    unsafe { cuda.launch("kv", kernel, Launch::elements(rows.numel()), &args, &shape) }
}

/// `x *= m` element-wise (f32; dropout masks).
pub fn mul_inplace(cuda: &Cuda, x: &mut DeviceTensor, m: &DeviceTensor) -> Result<()> {
    let kernel = "mul_inplace_f32";
    let all = [("x", &*x), ("m", m)];
    expect_elem(kernel, "x", x, &[Elem::F32], &all)?;
    expect_elem(kernel, "m", m, &[Elem::F32], &all)?;
    expect_len(kernel, "m", m, x.numel(), &all)?;
    if x.numel() == 0 {
        return Ok(());
    }
    let args = [Arg::Ptr(x.ptr()), Arg::Ptr(m.ptr()), Arg::U64(x.numel() as u64)];
    let shape = || super::describe(&all);
    // SAFETY: x and m are f32 tensors of the same element count n, as the kernel reads/writes.
    unsafe { cuda.launch("kv", kernel, Launch::elements(x.numel()), &args, &shape) }
}

/// The device half of a KV cache's bookkeeping for `t` new tokens per sequence (kv_advance):
/// writes their RoPE positions `pos [batch * t]` u32, their key-mask columns `past .. past + t`
/// of `key_mask [batch, cap]` u8 and the new real-token counts `real_out [batch]` u32 from
/// `real_in`. `mask [batch * t]` u8 (1 = real) or `None` when every new token is real, so a
/// decode step needs no upload.
pub fn kv_advance(cuda: &Cuda, pos: &mut DeviceTensor, key_mask: &mut DeviceTensor, real_out: &mut DeviceTensor, real_in: &DeviceTensor, mask: Option<&DeviceTensor>, past: usize) -> Result<()> {
    let kernel = "kv_advance";
    let mut all = vec![("pos", &*pos), ("key_mask", &*key_mask), ("real_out", &*real_out), ("real_in", real_in)];
    all.extend(mask.map(|m| ("mask", m)));
    for (name, t) in [("pos", &*pos), ("real_out", &*real_out), ("real_in", real_in)] {
        expect_elem(kernel, name, t, &[Elem::U32], &all)?;
    }
    expect_elem(kernel, "key_mask", key_mask, &[Elem::U8], &all)?;
    let batch = real_in.numel();
    expect_len(kernel, "real_out", real_out, batch, &all)?;
    let (t, cap) = match (key_mask.shape(), batch) {
        (&[b, cap], _) if b == batch => (pos.numel().checked_div(batch).unwrap_or(0), cap),
        _ => return Err(bad(kernel, &all, format!("key_mask must be [{batch}, cap]"))),
    };
    expect_len(kernel, "pos", pos, batch * t, &all)?;
    if let Some(m) = mask {
        expect_elem(kernel, "mask", m, &[Elem::U8], &all)?;
        expect_len(kernel, "mask", m, batch * t, &all)?;
    }
    if past + t > cap {
        return Err(bad(kernel, &all, format!("{past} stored + {t} new tokens exceed the cache's {cap}")));
    }
    if batch == 0 {
        return Ok(());
    }
    let args = [
        Arg::Ptr(pos.ptr()),
        Arg::Ptr(key_mask.ptr()),
        Arg::Ptr(real_out.ptr()),
        Arg::Ptr(real_in.ptr()),
        Arg::Ptr(mask.map_or(0, DeviceTensor::ptr)),
        Arg::U32(u32_of(kernel, "batch", batch, &all)?),
        Arg::U32(u32_of(kernel, "t", t, &all)?),
        Arg::U32(u32_of(kernel, "past", past, &all)?),
        Arg::U32(u32_of(kernel, "cap", cap, &all)?),
    ];
    let shape = || super::describe(&all);
    // SAFETY: pos (and mask, when given) hold batch * t elements, real_in/real_out batch, and
    // key_mask batch * cap with past + t <= cap: every index the kernel forms is inside them.
    unsafe { cuda.launch("kv", kernel, Launch::elements(batch), &args, &shape) }
}
