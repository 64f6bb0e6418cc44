//! The CUDA kernels run on the host emulator (kernels/emu/) against the CPU reference: their
//! indexing, barriers, masking and warp reductions checked without a GPU. Each launch mirrors the
//! shape its launcher in engine/backend/cuda/ops/ uses. Skips (one line) without g++.
mod common;

use common::emu::{bf16_bits, bf16_f32, dim, Emu, Schedule};
use common::rel_err;
use ilrec::backend::cpu::{attention, attention_backward, AttentionShape};
use ilrec::rng::Rng;
use std::ptr::null;

const TOL_F32: f64 = 1e-4;
const TOL_BF16: f64 = 1e-2;

fn random(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.normal() * scale).collect()
}

fn to_bf16(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| bf16_bits(x)).collect()
}

fn from_bf16(v: &[u16]) -> Vec<f32> {
    v.iter().map(|&b| bf16_f32(b)).collect()
}

#[track_caller]
fn check(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = rel_err(got, want, |_| true);
    println!("{what}: rel err {e:.3e}");
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:e}");
}

// =============================================================================================
// attention.cu

type AttnFwd<T> = unsafe extern "C" fn(*mut T, *mut f32, *const T, *const T, *const T, *const u8, u32, u32, u32, u32, u32, u32, f32);
type AttnBwdDq<T> = unsafe extern "C" fn(
    *mut f32, *mut f32, *const f32, *const T, *const T, *const T, *const T, *const f32, *const u8, u32, u32, u32, u32, f32,
);
type AttnBwdDkdv<T> = unsafe extern "C" fn(
    *mut f32, *mut f32, *const f32, *const T, *const T, *const T, *const f32, *const f32, *const u8, u32, u32, u32, u32, f32,
);

/// Storage element of a kernel variant: f32 or bf16 (as u16 bits).
trait Storage: Copy + Default + 'static {
    const SUFFIX: &'static str;
    const TOL: f64;
    fn store(v: &[f32]) -> Vec<Self>;
    fn load(v: &[Self]) -> Vec<f32>;
    /// The values this storage holds for `v` (the reference's inputs).
    fn held(v: &[f32]) -> Vec<f32> {
        Self::load(&Self::store(v))
    }
}
impl Storage for f32 {
    const SUFFIX: &'static str = "f32";
    const TOL: f64 = TOL_F32;
    fn store(v: &[f32]) -> Vec<f32> {
        v.to_vec()
    }
    fn load(v: &[f32]) -> Vec<f32> {
        v.to_vec()
    }
}
impl Storage for u16 {
    const SUFFIX: &'static str = "bf16";
    const TOL: f64 = TOL_BF16;
    fn store(v: &[f32]) -> Vec<u16> {
        to_bf16(v)
    }
    fn load(v: &[u16]) -> Vec<f32> {
        from_bf16(v)
    }
}

struct AttnCase {
    s: AttentionShape,
    /// Masked keys per sequence.
    off: Vec<Vec<usize>>,
}

fn attn_cases() -> Vec<AttnCase> {
    let sh = |batch, tq, past, cap, n_heads, n_kv_heads, head_dim| AttentionShape { batch, tq, past, cap, n_heads, n_kv_heads, head_dim };
    vec![
        // GQA 4/2, d 40 (not a multiple of 32): left padding 3 (queries 0..3 see no key) and a
        // sequence with a masked key in the middle and its first key masked.
        AttnCase { s: sh(2, 9, 0, 9, 4, 2, 40), off: vec![vec![0, 1, 2], vec![0, 5]] },
        // KV cache: 4 cached + 5 new tokens, capacity 12 (rows 9.. NaN), multi-query.
        AttnCase { s: sh(2, 5, 4, 12, 3, 1, 24), off: vec![vec![1], vec![0, 1, 2, 3, 4]] },
        // 133 keys: two 128-key chunks; d 16 < one warp.
        AttnCase { s: sh(1, 133, 0, 133, 2, 2, 16), off: vec![vec![0, 70]] },
        // d 130: the 256-thread block.
        AttnCase { s: sh(1, 6, 0, 6, 2, 1, 130), off: vec![vec![2]] },
    ]
}

/// Log-sum-exp per (sequence, head, query) in f64, -inf where the query sees no key.
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
                    .map(|j| qr.iter().zip(&k[kv + j * d..][..d]).map(|(&a, &x)| f64::from(a) * f64::from(x)).sum::<f64>() * scale)
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

fn attention_case<T: Storage>(k: &Emu, case: &AttnCase, rng: &mut Rng) {
    let s = case.s;
    let AttentionShape { batch, tq, past, cap, n_heads, n_kv_heads, head_dim: d } = s;
    let label = format!("attention {} b{batch} tq{tq} past{past} cap{cap} heads {n_heads}/{n_kv_heads} d{d}", T::SUFFIX);
    let mut mask = vec![true; batch * cap];
    for (b, off) in case.off.iter().enumerate() {
        for &j in off {
            mask[b * cap + j] = false;
        }
    }
    let mask_u8: Vec<u8> = mask.iter().map(|&m| u8::from(m)).collect();
    let q = T::held(&random(rng, batch * tq * n_heads * d, 0.5));
    let mut kk = random(rng, batch * n_kv_heads * cap * d, 0.5);
    let mut vv = random(rng, batch * n_kv_heads * cap * d, 1.0);
    // Cache rows beyond past + tq are no keys: NaN there catches a kernel that reads them.
    for (r, (kr, vr)) in kk.chunks_mut(d).zip(vv.chunks_mut(d)).enumerate() {
        if r % cap >= past + tq {
            kr.fill(f32::NAN);
            vr.fill(f32::NAN);
        }
    }
    let (kk, vv) = (T::held(&kk), T::held(&vv));
    let (qs, ks, vs) = (T::store(&q), T::store(&kk), T::store(&vv));

    // The launcher's shape: 128 threads, 256 above head_dim 128.
    let threads: u32 = if d <= 128 { 128 } else { 256 };
    let scale = 1.0 / (d as f32).sqrt();
    let (tq32, past32, cap32, h32, kvh32, d32) = (tq as u32, past as u32, cap as u32, n_heads as u32, n_kv_heads as u32, d as u32);

    let fwd: AttnFwd<T> = k.kernel(&format!("attention_fwd_{}", T::SUFFIX));
    let mut out = T::store(&vec![f32::NAN; q.len()]);
    let mut lse = vec![f32::NAN; batch * n_heads * tq];
    let (po, pl, pq, pk, pv, pm) = (out.as_mut_ptr(), lse.as_mut_ptr(), qs.as_ptr(), ks.as_ptr(), vs.as_ptr(), mask_u8.as_ptr());
    unsafe {
        k.launch([tq32, h32, batch as u32], dim(threads), (d + threads as usize) * 4, || {
            fwd(po, pl, pq, pk, pv, pm, tq32, past32, cap32, h32, kvh32, d32, scale)
        })
    }
    .unwrap_or_else(|e| panic!("{label}: {e}"));
    let mut want = vec![0.0f32; q.len()];
    attention(&mut want, &q, &kk, &vv, &mask, s);
    check(&format!("{label} out"), &T::load(&out), &want, T::TOL);
    let want_lse = reference_lse(&q, &kk, &mask, s);
    for (i, (&g, &w)) in lse.iter().zip(&want_lse).enumerate() {
        let ok = if w == f32::NEG_INFINITY { g == w } else { ((g - w) / w.abs().max(1.0)).abs() <= 1e-5 };
        assert!(ok, "{label} lse[{i}]: {g} vs reference {w}");
    }

    if past != 0 {
        return;
    }
    // Backward from the emulated forward's out and lse, as in training.
    let dout = random(rng, q.len(), 1.0);
    let (mut dq, mut dk, mut dv) = (vec![f32::NAN; q.len()], vec![f32::NAN; kk.len()], vec![f32::NAN; vv.len()]);
    let mut delta = vec![f32::NAN; lse.len()];
    let dq_k: AttnBwdDq<T> = k.kernel(&format!("attention_bwd_dq_{}", T::SUFFIX));
    let dkdv_k: AttnBwdDkdv<T> = k.kernel(&format!("attention_bwd_dkdv_{}", T::SUFFIX));
    // The launcher passes `out` for f32 storage only (delta = dout . out), null for bf16.
    let pout = if T::SUFFIX == "f32" { out.as_ptr() } else { null() };
    let (pdq, pdk, pdv, pdl, pdo, pl) = (dq.as_mut_ptr(), dk.as_mut_ptr(), dv.as_mut_ptr(), delta.as_mut_ptr(), dout.as_ptr(), lse.as_ptr());
    unsafe {
        k.launch([tq32, h32, batch as u32], dim(threads), (2 * d + threads as usize) * 4, || {
            dq_k(pdq, pdl, pdo, pq, pk, pv, pout, pl, pm, tq32, h32, kvh32, d32, scale)
        })
    }
    .unwrap_or_else(|e| panic!("{label} bwd dq: {e}"));
    unsafe {
        k.launch([tq32, kvh32, batch as u32], dim(threads), 2 * (d + threads as usize) * 4, || {
            dkdv_k(pdk, pdv, pdo, pq, pk, pv, pl, pdl, pm, tq32, h32, kvh32, d32, scale)
        })
    }
    .unwrap_or_else(|e| panic!("{label} bwd dkdv: {e}"));
    let (mut wq, mut wk, mut wv) = (vec![0.0f32; q.len()], vec![0.0f32; kk.len()], vec![0.0f32; vv.len()]);
    attention_backward(&mut wq, &mut wk, &mut wv, &dout, &q, &kk, &vv, &mask, s);
    check(&format!("{label} dq"), &dq, &wq, T::TOL);
    check(&format!("{label} dk"), &dk, &wk, T::TOL);
    check(&format!("{label} dv"), &dv, &wv, T::TOL);
}

#[test]
fn attention_matches_cpu() {
    let Some(k) = Emu::build("attention") else { return };
    let mut rng = Rng::new(11);
    for case in attn_cases() {
        attention_case::<f32>(&k, &case, &mut rng);
        attention_case::<u16>(&k, &case, &mut rng);
    }
    // Another thread order gives the same results (every shared-memory handoff is behind a barrier).
    let k = k.with_schedule(Schedule::Descending);
    attention_case::<f32>(&k, &attn_cases()[0], &mut rng);
}
