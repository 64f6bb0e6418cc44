//! Dequantisation of GGML block formats to f32.
//!
//! Each block type stores `QK` values in `BS` bytes: one or two f16 scales followed by packed
//! integer codes. The formulas follow ggml's reference `dequantize_row_*` routines, written here
//! with the same float operation order (scale times code, then plus the block minimum), so the
//! results match ggml and the `gguf` Python package bit for bit. Blocks are independent, so work is
//! split across rayon threads in chunks of blocks.
use half::{bf16, f16};
use rayon::prelude::*;

use super::types::GgmlType;

/// Values per rayon task: large enough to amortise scheduling, small enough to balance.
const VALUES_PER_TASK: usize = 1 << 16;

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Converts `src` (whole blocks of `dtype`) into `dst`. Returns `false` when `dtype` is not
/// supported. The caller guarantees `src` holds exactly `dst.len()` elements' worth of blocks.
pub(crate) fn dequantize_into(dtype: GgmlType, src: &[u8], dst: &mut [f32]) -> bool {
    match dtype {
        GgmlType::F32 => blocks::<1, 4>(src, dst, |b, y| y[0] = f32::from_le_bytes(*b)),
        GgmlType::F16 => blocks::<1, 2>(src, dst, |b, y| {
            y[0] = f16::from_bits(u16::from_le_bytes(*b)).to_f32()
        }),
        GgmlType::BF16 => blocks::<1, 2>(src, dst, |b, y| {
            y[0] = bf16::from_bits(u16::from_le_bytes(*b)).to_f32()
        }),
        GgmlType::Q8_0 => blocks::<32, 34>(src, dst, q8_0),
        GgmlType::Q4_0 => blocks::<32, 18>(src, dst, q4_0),
        GgmlType::Q4_1 => blocks::<32, 20>(src, dst, q4_1),
        GgmlType::Q5_0 => blocks::<32, 22>(src, dst, q5_0),
        GgmlType::Q5_1 => blocks::<32, 24>(src, dst, q5_1),
        GgmlType::Q4_K => blocks::<256, 144>(src, dst, q4_k),
        GgmlType::Q6_K => blocks::<256, 210>(src, dst, q6_k),
        _ => return false,
    }
    true
}

/// Applies `f` to every `BS`-byte block of `src`, writing `QK` values per block into `dst`.
fn blocks<const QK: usize, const BS: usize>(
    src: &[u8],
    dst: &mut [f32],
    f: impl Fn(&[u8; BS], &mut [f32; QK]) + Sync,
) {
    debug_assert_eq!(src.len() / BS * QK, dst.len());
    let blocks_per_task = (VALUES_PER_TASK / QK).max(1);
    dst.par_chunks_mut(blocks_per_task * QK)
        .zip(src.par_chunks(blocks_per_task * BS))
        .for_each(|(y, x)| {
            for (yb, xb) in y.chunks_exact_mut(QK).zip(x.chunks_exact(BS)) {
                f(
                    xb.try_into().expect("chunks_exact yields BS bytes"),
                    yb.try_into().expect("chunks_exact yields QK values"),
                );
            }
        });
}

/// Q8_0: f16 scale, 32 signed bytes.
fn q8_0(b: &[u8; 34], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    for (yi, &q) in y.iter_mut().zip(&b[2..]) {
        *yi = d * f32::from(q as i8);
    }
}

/// Q4_0: f16 scale, 32 nibbles offset by 8 (low nibbles are elements 0..16, high 16..32).
fn q4_0(b: &[u8; 18], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    for (j, &q) in b[2..].iter().enumerate() {
        y[j] = d * ((q & 0x0f) as i32 - 8) as f32;
        y[j + 16] = d * ((q >> 4) as i32 - 8) as f32;
    }
}

/// Q4_1: f16 scale and minimum, 32 unsigned nibbles.
fn q4_1(b: &[u8; 20], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    for (j, &q) in b[4..].iter().enumerate() {
        y[j] = d * f32::from(q & 0x0f) + m;
        y[j + 16] = d * f32::from(q >> 4) + m;
    }
}

/// The 5-bit codes of a Q5 block: nibbles plus one high bit each from the 32-bit `qh` mask.
#[inline]
fn q5_codes(qh: u32, qs: &[u8]) -> [u8; 32] {
    let mut c = [0u8; 32];
    for (j, &q) in qs.iter().enumerate() {
        let h0 = ((qh >> j) & 1) as u8;
        let h1 = ((qh >> (j + 16)) & 1) as u8;
        c[j] = (q & 0x0f) | (h0 << 4);
        c[j + 16] = (q >> 4) | (h1 << 4);
    }
    c
}

/// Q5_0: f16 scale, high-bit mask, nibbles; codes offset by 16.
fn q5_0(b: &[u8; 22], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for (yi, c) in y.iter_mut().zip(q5_codes(qh, &b[6..])) {
        *yi = d * (c as i32 - 16) as f32;
    }
}

/// Q5_1: f16 scale and minimum, high-bit mask, nibbles.
fn q5_1(b: &[u8; 24], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for (yi, c) in y.iter_mut().zip(q5_codes(qh, &b[8..])) {
        *yi = d * f32::from(c) + m;
    }
}

/// Scale and minimum of sub-block `j` (0..8) of a Q4_K/Q5_K block: 6-bit values packed into
/// 12 bytes (the first four sub-blocks in the low 6 bits of bytes 0..8, the last four split
/// between the nibbles of bytes 8..12 and the top 2 bits of bytes 0..8).
#[inline]
fn k_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Q4_K: 256 values in 8 sub-blocks of 32, each with a 6-bit scale and minimum relative to
/// the block's f16 `d` and `dmin`. Codes for sub-blocks 2k and 2k+1 share 32 bytes (low, high
/// nibbles).
fn q4_k(b: &[u8; 144], y: &mut [f32; 256]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for k in 0..4 {
        let (sc0, m0) = k_scale_min(2 * k, scales);
        let (sc1, m1) = k_scale_min(2 * k + 1, scales);
        let (d0, min0) = (d * f32::from(sc0), dmin * f32::from(m0));
        let (d1, min1) = (d * f32::from(sc1), dmin * f32::from(m1));
        let q = &qs[32 * k..32 * k + 32];
        let out = &mut y[64 * k..64 * k + 64];
        for l in 0..32 {
            out[l] = d0 * f32::from(q[l] & 0x0f) - min0;
            out[l + 32] = d1 * f32::from(q[l] >> 4) - min1;
        }
    }
}

/// Q6_K: 256 values in 16 sub-blocks of 16 with signed 8-bit scales relative to the f16 `d`;
/// 6-bit codes (offset by 32) split into low nibbles `ql` and 2-bit high parts `qh`.
fn q6_k(b: &[u8; 210], y: &mut [f32; 256]) {
    let ql_all = &b[0..128];
    let qh_all = &b[128..192];
    let sc_all = &b[192..208];
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &ql_all[64 * half..64 * half + 64];
        let qh = &qh_all[32 * half..32 * half + 32];
        let sc = &sc_all[8 * half..8 * half + 8];
        let out = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let h = qh[l];
            let q1 = ((ql[l] & 0x0f) | ((h & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0f) | (((h >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((h >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((h >> 6) & 3) << 4)) as i32 - 32;
            let s = |i: usize| d * f32::from(sc[i] as i8);
            out[l] = s(is) * q1 as f32;
            out[l + 32] = s(is + 2) * q2 as f32;
            out[l + 64] = s(is + 4) * q3 as f32;
            out[l + 96] = s(is + 6) * q4 as f32;
        }
    }
}
