//! Checks of kernels/attention.cu against the CPU reference (`backend::cpu::attention` and
//! `attention_backward`), f32 and bf16 storage, on odd shapes: grouped-query heads, head_dim 40
//! (not a multiple of 32), 64, 128 and 200 (the 256-thread path), sequences longer than one
//! 128-key chunk, left padding (queries that see no key), masked keys in the middle, and a KV cache
//! (past > 0) whose unused rows beyond `past + tq` hold NaN (the kernel must not read them). The
//! log-sum-exp the forward writes is checked against an f64 host computation (exactly `-inf` on
//! rows that see no key). The backward runs on the GPU forward's `out` and `lse`, as in training.
use super::{round_bf16, Checker, TOL_BF16, TOL_F32};
use crate::backend::cpu::{attention, attention_backward, AttentionShape};
use crate::backend::cuda::ops::attention::{attention_backward as gpu_backward, attention_forward as gpu_forward};
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
    Ok(())
}

/// Log-sum-exp of every (sequence, head, query) row in f64 from the f32 inputs, `-inf` where the
/// query sees no key. Layout `[batch, n_heads, tq]`.
fn reference_lse(q: &[f32], k: &[f32], key_mask: &[bool], s: AttentionShape) -> Vec<f32> {
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
