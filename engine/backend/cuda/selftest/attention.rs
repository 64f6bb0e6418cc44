//! Checks of kernels/attention.cu against the CPU reference (`backend::cpu::attention` and
//! `attention_backward`), f32 and bf16 storage, on odd shapes: grouped-query heads, head_dim 40
//! (not a multiple of 32), 64, 128 and 200 (the 256-thread path), sequences longer than one
//! 128-key chunk, left padding (queries that see no key), masked keys in the middle, and a KV cache
//! (past > 0) whose unused rows beyond `past + tq` hold NaN (the kernel must not read them). The
//! log-sum-exp the forward writes is checked against an f64 host computation (exactly `-inf` on
//! rows that see no key). The backward runs on the GPU forward's `out` and `lse`, as in training.
use super::{round_bf16, Checker, TOL_BF16, TOL_EXACT, TOL_F32};
use crate::backend::cpu::{attention, attention_backward, AttentionShape};
use crate::backend::cuda::ops::attention::{
    attention_backward as gpu_backward, attention_forward as gpu_forward, flash_attention_backward, flash_attention_forward_splits,
    flash_default_splits,
};
use crate::backend::cuda::{DeviceTensor, Elem};
use crate::error::Result;

/// One shape with its key mask (`[batch, cap]`) and whether the backward applies (past == 0).
struct Case {
    s: AttentionShape,
    mask: Vec<bool>,
    backward: bool,
}

fn shape(batch: usize, tq: usize, past: usize, cap: usize, n_heads: usize, n_kv_heads: usize, head_dim: usize) -> AttentionShape {
    AttentionShape { batch, tq, past, cap, n_heads, n_kv_heads, head_dim }
}

/// All-true mask with `off[b]` listing the masked keys of sequence `b`.
fn mask(batch: usize, cap: usize, off: &[&[usize]]) -> Vec<bool> {
    let mut m = vec![true; batch * cap];
    for (b, keys) in off.iter().enumerate() {
        for &j in keys.iter() {
            m[b * cap + j] = false;
        }
    }
    m
}

fn cases() -> Vec<Case> {
    let left = |n: usize| (0..n).collect::<Vec<_>>();
    let mut v = Vec::new();
    // GQA 6/2, d 40: left padding 5 (queries 0..5 see no key), two masked keys in the middle, and
    // a sequence whose only masked key is the first (query 0 sees nothing, query 1 sees key 1).
    let s = shape(3, 37, 0, 37, 6, 2, 40);
    v.push(Case { s, mask: mask(3, 37, &[&left(5), &[11, 23], &[0]]), backward: true });
    // KV cache: 5 cached tokens, 7 new, capacity 50 (rows 12.. are NaN); a masked cached key and
    // a masked new one; multi-query (one KV head).
    let s = shape(2, 7, 5, 50, 4, 1, 40);
    v.push(Case { s, mask: mask(2, 50, &[&[0, 2], &[7]]), backward: false });
    // The same cache with a sequence whose cached keys and first new key are all padding.
    let s = shape(2, 7, 5, 50, 6, 3, 48);
    v.push(Case { s, mask: mask(2, 50, &[&left(6), &[]]), backward: false });
    // d 64, plain multi-head, 161 tokens (two 128-key chunks), left padding 9.
    let s = shape(2, 161, 0, 161, 4, 4, 64);
    v.push(Case { s, mask: mask(2, 161, &[&left(9), &[130]]), backward: true });
    // d 128, GQA 8/2.
    let s = shape(2, 33, 0, 33, 8, 2, 128);
    v.push(Case { s, mask: mask(2, 33, &[&[0], &[16]]), backward: true });
    // d 200: the 256-thread block.
    let s = shape(1, 20, 0, 20, 2, 1, 200);
    v.push(Case { s, mask: mask(1, 20, &[&[3]]), backward: true });
    v
}

pub(super) fn check(c: &mut Checker) -> Result<()> {
    for elem in [Elem::F32, Elem::BF16] {
        for case in cases() {
            check_case(c, &case, elem)?;
        }
    }
    for case in flash_cases() {
        check_flash(c, &case)?;
    }
    Ok(())
}

/// Log-sum-exp of every (sequence, head, query) row in f64 from the f32 inputs, `-inf` where the
/// query sees no key. Layout `[batch, n_heads, tq]`. The oracle of every lse check (the
/// self-test and tests/attention_emu.rs, tests/kernel_emu.rs).
pub fn reference_lse(q: &[f32], k: &[f32], key_mask: &[bool], s: AttentionShape) -> Vec<f32> {
    let AttentionShape { batch, tq, past, cap, n_heads, n_kv_heads, head_dim: d } = s;
    let group = n_heads / n_kv_heads;
    let scale = f64::from(1.0 / (d as f32).sqrt());
    let mut out = vec![0.0f32; batch * n_heads * tq];
    for b in 0..batch {
        for h in 0..n_heads {
            let kv = (b * n_kv_heads + h / group) * cap * d;
            for i in 0..tq {
                let qr = &q[(b * tq + i) * n_heads * d + h * d..][..d];
                let scores: Vec<f64> = (0..=past + i)
                    .filter(|&j| key_mask[b * cap + j])
                    .map(|j| qr.iter().zip(&k[kv + j * d..kv + (j + 1) * d]).map(|(&a, &x)| f64::from(a) * f64::from(x)).sum::<f64>() * scale)
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                out[(b * n_heads + h) * tq + i] = if scores.is_empty() {
                    f32::NEG_INFINITY
                } else {
                    (max + scores.iter().map(|x| (x - max).exp()).sum::<f64>().ln()) as f32
                };
            }
        }
    }
    out
}

/// The finite entries of `got` and `want` side by side; a row where exactly one of them is
/// `-inf` (or any NaN) turns into a NaN so the check fails.
fn finite_pairs(got: &[f32], want: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (mut g, mut w) = (Vec::new(), Vec::new());
    for (&a, &b) in got.iter().zip(want) {
        if b == f32::NEG_INFINITY && a == f32::NEG_INFINITY {
            continue;
        }
        g.push(if b == f32::NEG_INFINITY { f32::NAN } else { a });
        w.push(b);
    }
    (g, w)
}

fn check_case(c: &mut Checker, case: &Case, elem: Elem) -> Result<()> {
    let s = case.s;
    let AttentionShape { batch, tq, past, cap, n_heads, n_kv_heads, head_dim: d } = s;
    let (sfx, tol) = match elem {
        Elem::BF16 => ("bf16", TOL_BF16),
        _ => ("f32", TOL_F32),
    };
    let label = format!("b{batch} tq{tq} past{past} cap{cap} heads {n_heads}/{n_kv_heads} d{d}");
    let cuda = c.cuda;

    let q_shape = [batch * tq, n_heads * d];
    let kv_shape = [batch, n_kv_heads, cap, d];
    let mut q = c.random(batch * tq * n_heads * d, 0.5);
    let mut k = c.random(batch * n_kv_heads * cap * d, 0.5);
    let mut v = c.random(batch * n_kv_heads * cap * d, 1.0);
    // Cache rows beyond past + tq are never valid keys: NaN there catches a kernel that reads them.
    for (r, (kr, vr)) in k.chunks_mut(d).zip(v.chunks_mut(d)).enumerate() {
        if r % cap >= past + tq {
            kr.fill(f32::NAN);
            vr.fill(f32::NAN);
        }
    }
    if elem == Elem::BF16 {
        q = round_bf16(&q);
        k = round_bf16(&k);
        v = round_bf16(&v);
    }
    let mask_u8: Vec<u8> = case.mask.iter().map(|&m| u8::from(m)).collect();

    // Forward.
    let mut want = vec![0.0f32; q.len()];
    attention(&mut want, &q, &k, &v, &case.mask, s);
    let want_lse = reference_lse(&q, &k, &case.mask, s);
    let q_dev = DeviceTensor::from_f32_in(c.cuda, &q_shape, &q, elem, "attention q")?;
    let k_dev = DeviceTensor::from_f32_in(c.cuda, &kv_shape, &k, elem, "attention k")?;
    let v_dev = DeviceTensor::from_f32_in(c.cuda, &kv_shape, &v, elem, "attention v")?;
    let mask_dev = DeviceTensor::from_u8(cuda, &[batch, cap], &mask_u8, "attention key_mask")?;
    let mut out = DeviceTensor::empty(cuda, &q_shape, elem, "attention out")?;
    let mut lse = DeviceTensor::empty(cuda, &[batch, n_heads, tq], Elem::F32, "attention lse")?;
    out.fill_bytes(0xFF)?;
    lse.fill_bytes(0xFF)?;
    let ms = c.time(3, || gpu_forward(cuda, &mut out, &mut lse, &q_dev, &k_dev, &v_dev, &mask_dev, s))?;
    let kernel = format!("attention_fwd_{sfx}");
    c.record(&kernel, label.clone(), &out.to_f32_vec()?, &want, tol, ms);
    let (got_lse, want_lse) = finite_pairs(&lse.to_f32_vec()?, &want_lse);
    c.record(&format!("{kernel} lse"), label.clone(), &got_lse, &want_lse, TOL_F32, ms);

    if !case.backward {
        return Ok(());
    }
    // Backward, from the GPU forward's out and lse.
    let dout = c.random(q.len(), 1.0);
    let (mut want_dq, mut want_dk, mut want_dv) = (vec![0.0f32; q.len()], vec![0.0f32; k.len()], vec![0.0f32; v.len()]);
    attention_backward(&mut want_dq, &mut want_dk, &mut want_dv, &dout, &q, &k, &v, &case.mask, s);
    let dout_dev = DeviceTensor::from_f32(cuda, &q_shape, &dout, "attention dout")?;
    let mut gq = DeviceTensor::empty(cuda, &q_shape, Elem::F32, "attention dq")?;
    let mut gk = DeviceTensor::empty(cuda, &kv_shape, Elem::F32, "attention dk")?;
    let mut gv = DeviceTensor::empty(cuda, &kv_shape, Elem::F32, "attention dv")?;
    for t in [&gq, &gk, &gv] {
        t.fill_bytes(0xFF)?;
    }
    let ms = c.time(3, || gpu_backward(cuda, &mut gq, &mut gk, &mut gv, &dout_dev, &q_dev, &k_dev, &v_dev, &out, &lse, &mask_dev, s))?;
    let kernel = format!("attention_bwd_{sfx}");
    c.record(&format!("{kernel} dq"), label.clone(), &gq.to_f32_vec()?, &want_dq, tol, ms);
    c.record(&format!("{kernel} dk"), label.clone(), &gk.to_f32_vec()?, &want_dk, tol, ms);
    c.record(&format!("{kernel} dv"), label, &gv.to_f32_vec()?, &want_dv, tol, ms);
    Ok(())
}

// =============================================================================================
// The fused (flash) kernels: bf16 q, k, v, f32 out / lse / gradients, head dims 64, 80, 128.

/// A flash case: the shape, its key mask, whether the backward applies, and the key splits to run
/// the forward with besides the launcher's default.
struct FlashCase {
    s: AttentionShape,
    mask: Vec<bool>,
    backward: bool,
    splits: Vec<usize>,
}

/// The odd lengths (1, 7, 127, 1000, 4097), every head dim, GQA ratios 1, 3, 4 and 8,
/// left padding (queries that see nothing), masked keys mid-sequence, a fully masked sequence,
/// and decoding over a KV cache: 1 and 4 new tokens, many beams with ragged (left-padded)
/// lengths, forced key splits (including more splits than key tiles).
fn flash_cases() -> Vec<FlashCase> {
    let left = |n: usize| (0..n).collect::<Vec<_>>();
    let mut v = Vec::new();
    let train = |batch, t, nh, nkv, d| shape(batch, t, 0, t, nh, nkv, d);
    // Length 1: a single query per sequence; the second sequence's only key is padding.
    v.push(FlashCase { s: train(2, 1, 4, 2, 64), mask: mask(2, 1, &[&[], &[0]]), backward: true, splits: vec![] });
    // Length 7, GQA 9/3 (SmolLM2's ratio), d 80.
    v.push(FlashCase { s: train(3, 7, 9, 3, 80), mask: mask(3, 7, &[&left(2), &[3], &[]]), backward: true, splits: vec![] });
    // Length 127 (one key tile short of two), MHA, d 128; a sequence of only padding.
    v.push(FlashCase { s: train(3, 127, 2, 2, 128), mask: mask(3, 127, &[&left(13), &left(127), &[64, 65, 100]]), backward: true, splits: vec![3] });
    // Length 1000, MQA 8/1, d 64.
    v.push(FlashCase { s: train(1, 1000, 8, 1, 64), mask: mask(1, 1000, &[&[0, 999, 500]]), backward: true, splits: vec![4] });
    // Length 1000, GQA 4, d 128, two sequences with different left padding.
    v.push(FlashCase { s: train(2, 1000, 8, 2, 128), mask: mask(2, 1000, &[&left(37), &[]]), backward: true, splits: vec![] });
    // Length 1000, d 80 backward.
    v.push(FlashCase { s: train(1, 1000, 3, 3, 80), mask: mask(1, 1000, &[&left(100)]), backward: true, splits: vec![] });
    // Length 4097 (one past a power of two), forward only (the CPU backward at this length is
    // the slow part of the self-test), GQA 4/2, d 128 and d 64.
    v.push(FlashCase { s: train(1, 4097, 4, 2, 128), mask: mask(1, 4097, &[&left(3)]), backward: false, splits: vec![7] });
    v.push(FlashCase { s: train(1, 4097, 2, 1, 64), mask: mask(1, 4097, &[&[4096]]), backward: false, splits: vec![] });
    // Decoding: 12 beams, 1 new token after 300 cached (capacity 333, rows beyond NaN), ragged
    // left padding per beam, GQA 9/3, d 64; default and forced splits (40 > the 5 key tiles).
    let ragged: Vec<Vec<usize>> = (0..12).map(|b| left(b * 23)).collect();
    let ragged_refs: Vec<&[usize]> = ragged.iter().map(|x| x.as_slice()).collect();
    v.push(FlashCase { s: shape(12, 1, 300, 333, 9, 3, 64), mask: mask(12, 333, &ragged_refs), backward: false, splits: vec![1, 2, 40] });
    // Decoding 4 tokens after 130, d 128, MQA 8/1, beams 5, the last beam fully padded so far.
    let ragged: Vec<Vec<usize>> = (0..5).map(|b| if b == 4 { left(131) } else { left(b * 9) }).collect();
    let ragged_refs: Vec<&[usize]> = ragged.iter().map(|x| x.as_slice()).collect();
    v.push(FlashCase { s: shape(5, 4, 130, 200, 8, 1, 128), mask: mask(5, 200, &ragged_refs), backward: false, splits: vec![1, 3] });
    // Decoding 1 token after 1999, d 80, GQA 6/2, one beam: a long cache split many ways.
    v.push(FlashCase { s: shape(1, 1, 1999, 2048, 6, 2, 80), mask: mask(1, 2048, &[&[5, 1000]]), backward: false, splits: vec![1, 32] });
    v
}

fn check_flash(c: &mut Checker, case: &FlashCase) -> Result<()> {
    let s = case.s;
    let AttentionShape { batch, tq, past, cap, n_heads, n_kv_heads, head_dim: d } = s;
    let label = format!("b{batch} tq{tq} past{past} cap{cap} heads {n_heads}/{n_kv_heads} d{d}");
    let cuda = c.cuda;
    let q_shape = [batch * tq, n_heads * d];
    let kv_shape = [batch, n_kv_heads, cap, d];
    let q = round_bf16(&c.random(batch * tq * n_heads * d, 0.5));
    let mut k = round_bf16(&c.random(batch * n_kv_heads * cap * d, 0.5));
    let mut v = round_bf16(&c.random(batch * n_kv_heads * cap * d, 1.0));
    for (r, (kr, vr)) in k.chunks_mut(d).zip(v.chunks_mut(d)).enumerate() {
        if r % cap >= past + tq {
            kr.fill(f32::NAN);
            vr.fill(f32::NAN);
        }
    }
    let mask_u8: Vec<u8> = case.mask.iter().map(|&m| u8::from(m)).collect();
    let mut want = vec![0.0f32; q.len()];
    attention(&mut want, &q, &k, &v, &case.mask, s);
    let want_lse = reference_lse(&q, &k, &case.mask, s);
    let q_dev = DeviceTensor::from_f32_in(cuda, &q_shape, &q, Elem::BF16, "flash q")?;
    let k_dev = DeviceTensor::from_f32_in(cuda, &kv_shape, &k, Elem::BF16, "flash k")?;
    let v_dev = DeviceTensor::from_f32_in(cuda, &kv_shape, &v, Elem::BF16, "flash v")?;
    let mask_dev = DeviceTensor::from_u8(cuda, &[batch, cap], &mask_u8, "flash key_mask")?;
    let mut out = DeviceTensor::empty(cuda, &q_shape, Elem::F32, "flash out")?;
    let mut lse = DeviceTensor::empty(cuda, &[batch, n_heads, tq], Elem::F32, "flash lse")?;

    let default = flash_default_splits(s);
    let mut runs = case.splits.clone();
    runs.retain(|&x| x != default);
    runs.push(default); // last: its out and lse feed the backward
    for splits in runs {
        out.fill_bytes(0xFF)?;
        lse.fill_bytes(0xFF)?;
        let ms = c.time(3, || flash_attention_forward_splits(cuda, &mut out, &mut lse, &q_dev, &k_dev, &v_dev, &mask_dev, s, splits))?;
        let kernel = format!("flash_attn_fwd splits {splits}");
        c.record(&kernel, label.clone(), &out.to_f32_vec()?, &want, TOL_BF16, ms);
        let (got_lse, ref_lse) = finite_pairs(&lse.to_f32_vec()?, &want_lse);
        c.record(&format!("{kernel} lse"), label.clone(), &got_lse, &ref_lse, TOL_F32, ms);
    }
    if !case.backward {
        return Ok(());
    }
    let dout = c.random(q.len(), 1.0);
    let (mut want_dq, mut want_dk, mut want_dv) = (vec![0.0f32; q.len()], vec![0.0f32; k.len()], vec![0.0f32; v.len()]);
    attention_backward(&mut want_dq, &mut want_dk, &mut want_dv, &dout, &q, &k, &v, &case.mask, s);
    let dout_dev = DeviceTensor::from_f32(cuda, &q_shape, &dout, "flash dout")?;
    let mut gq = DeviceTensor::empty(cuda, &q_shape, Elem::F32, "flash dq")?;
    let mut gk = DeviceTensor::empty(cuda, &kv_shape, Elem::F32, "flash dk")?;
    let mut gv = DeviceTensor::empty(cuda, &kv_shape, Elem::F32, "flash dv")?;
    for t in [&gq, &gk, &gv] {
        t.fill_bytes(0xFF)?;
    }
    let ms = c.time(3, || flash_attention_backward(cuda, &mut gq, &mut gk, &mut gv, &dout_dev, &q_dev, &k_dev, &v_dev, &out, &lse, &mask_dev, s))?;
    let first = [gq.to_f32_vec()?, gk.to_f32_vec()?, gv.to_f32_vec()?];
    c.record("flash_attn_bwd dq", label.clone(), &first[0], &want_dq, TOL_BF16, ms);
    c.record("flash_attn_bwd dk", label.clone(), &first[1], &want_dk, TOL_BF16, ms);
    c.record("flash_attn_bwd dv", label.clone(), &first[2], &want_dv, TOL_BF16, ms);
    // Deterministic mode: a second run on poisoned outputs must reproduce the first bit for bit.
    for t in [&gq, &gk, &gv] {
        t.fill_bytes(0xFF)?;
    }
    flash_attention_backward(cuda, &mut gq, &mut gk, &mut gv, &dout_dev, &q_dev, &k_dev, &v_dev, &out, &lse, &mask_dev, s)?;
    let again: Vec<f32> = [gq.to_f32_vec()?, gk.to_f32_vec()?, gv.to_f32_vec()?].concat();
    c.record("flash_attn_bwd rerun bitwise", label, &again, &first.concat(), TOL_EXACT, ms);
    Ok(())
}
