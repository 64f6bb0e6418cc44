//! The fused (flash) attention kernels (kernels/flash_attn.cu, kernels/flash_attn_bwd.cu) run on
//! the host emulator (kernels/emu/) against the CPU backend: forward (causal, key mask, GQA, KV
//! cache), split-KV decoding with the combine step, the backward (dQ, dK, dV from the saved
//! log-sum-exp), and the bf16 cast of a KV cache's used rows, on small odd shapes with outliers.
//! Each launch mirrors engine/backend/cuda/ops/attention.rs (grid, block 128, shared bytes). This
//! checks indexing, fragment layouts, pipelining and masking, not speed; skips without g++.
mod common;

use common::emu::{bf16_bits, bf16_f32, dim, Emu, Schedule};
use common::rel_err;
use ilrec::backend::cpu::{attention, attention_backward, AttentionShape};
// N(0, scale^2) with 1 in 64 values x30 (outliers), as the self-test draws.
use ilrec::backend::cuda::selftest::random_outliers as random;
use ilrec::backend::cuda::selftest::attention::reference_lse;
use ilrec::rng::Rng;

const TOL_BF16: f64 = 1e-2;
const TOL_F32: f64 = 1e-4;
const TILE: usize = 64;

type Fwd = unsafe extern "C" fn(*mut f32, *mut f32, *const u16, *const u16, *const u16, *const u8, u32, u32, u32, u32, u32, u32, u32, f32);
type Combine = unsafe extern "C" fn(*mut f32, *mut f32, *const f32, *const f32, u32, u32, u32, u32, u32);
type CastKv = unsafe extern "C" fn(*mut u16, *const f32, u64, u32, u32, u32);
type Prep = unsafe extern "C" fn(*mut f32, *mut u16, *const f32, *const f32, u32, u32, u32, u32);
type Dkdv = unsafe extern "C" fn(*mut f32, *mut f32, *const u16, *const u16, *const u16, *const u16, *const f32, *const f32, *const u8, u32, u32, u32, f32);
type Dq = unsafe extern "C" fn(*mut f32, *const u16, *const u16, *const u16, *const u16, *const f32, *const f32, *const u8, u32, u32, u32, f32);

fn held(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| bf16_f32(bf16_bits(x))).collect()
}

fn bits(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| bf16_bits(x)).collect()
}

#[track_caller]
fn check(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = rel_err(got, want, |_| true);
    println!("{what}: rel err {e:.3e}");
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:e}");
}

/// Shared-memory row of a bf16 tile (flash_attn.cuh `Tile<D>::ROW_BYTES`).
fn row_bytes(d: usize) -> usize {
    if d.is_multiple_of(64) {
        2 * d
    } else {
        2 * d + 16
    }
}

/// The backward's inner tile width (`Inner<D>::N`).
fn inner(d: usize) -> usize {
    if d > 80 {
        32
    } else {
        64
    }
}

/// Compares lse rows: both -inf, or both finite within the f32 tolerance.
#[track_caller]
fn check_lse(what: &str, got: &[f32], want: &[f32]) {
    for (r, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g == f32::NEG_INFINITY, w == f32::NEG_INFINITY, "{what}: row {r}: lse {g} vs {w}");
    }
    let (g, w): (Vec<f32>, Vec<f32>) = got.iter().zip(want).filter(|(_, &w)| w.is_finite()).map(|(&g, &w)| (g, w)).unzip();
    check(what, &g, &w, TOL_F32);
}

struct Inputs {
    s: AttentionShape,
    mask: Vec<bool>,
    /// bf16-held values (the reference's inputs); k, v rows at or past `past + tq` are NaN.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

fn inputs(rng: &mut Rng, s: AttentionShape, off: &[Vec<usize>]) -> Inputs {
    let AttentionShape { batch, tq, past, cap, n_heads, n_kv_heads, head_dim: d } = s;
    let mut mask = vec![true; batch * cap];
    for (b, keys) in off.iter().enumerate() {
        for &j in keys {
            mask[b * cap + j] = false;
        }
    }
    let q = held(&random(rng, batch * tq * n_heads * d, 0.5));
    let mut k = held(&random(rng, batch * n_kv_heads * cap * d, 0.5));
    let mut v = held(&random(rng, batch * n_kv_heads * cap * d, 1.0));
    for (r, (kr, vr)) in k.chunks_mut(d).zip(v.chunks_mut(d)).enumerate() {
        if r % cap >= past + tq {
            kr.fill(f32::NAN);
            vr.fill(f32::NAN);
        }
    }
    Inputs { s, mask, q, k, v }
}

/// The forward as the launcher runs it with `splits` key splits; returns (out, lse).
fn forward(fwd: &Emu, x: &Inputs, splits: usize) -> (Vec<f32>, Vec<f32>) {
    let AttentionShape { batch, tq, past, cap, n_heads, n_kv_heads, head_dim: d } = x.s;
    let (qb, kb, vb) = (bits(&x.q), bits(&x.k), bits(&x.v));
    let mask: Vec<u8> = x.mask.iter().map(|&m| u8::from(m)).collect();
    let (nq, nl) = (batch * tq * n_heads * d, batch * n_heads * tq);
    let mut out = vec![f32::NAN; nq];
    let mut lse = vec![f32::NAN; nl];
    let mut part_o = vec![f32::NAN; splits * nq];
    let mut part_l = vec![f32::NAN; splits * nl];
    let kv_tiles = (past + tq).div_ceil(TILE);
    let tps = kv_tiles.div_ceil(splits);
    let m_tiles = (n_heads / n_kv_heads * tq).div_ceil(TILE);
    let f: Fwd = fwd.kernel(&format!("flash_attn_fwd_d{d}"));
    let (po, pl) = if splits > 1 { (part_o.as_mut_ptr(), part_l.as_mut_ptr()) } else { (out.as_mut_ptr(), lse.as_mut_ptr()) };
    let (pq, pk, pv, pm) = (qb.as_ptr(), kb.as_ptr(), vb.as_ptr(), mask.as_ptr());
    let scale = 1.0 / (d as f32).sqrt();
    let grid = [m_tiles as u32, n_kv_heads as u32, (batch * splits) as u32];
    let smem = 2 * TILE * row_bytes(d);
    let (b32, t32, p32, c32, h32, kv32, tps32) = (batch as u32, tq as u32, past as u32, cap as u32, n_heads as u32, n_kv_heads as u32, tps as u32);
    // SAFETY: every buffer holds the element count of its layout for this shape (part_* hold
    // `splits` slices), alive for the launch.
    unsafe { fwd.launch(grid, dim(128), smem, || f(po, pl, pq, pk, pv, pm, b32, t32, p32, c32, h32, kv32, tps32, scale)) }.unwrap();
    if splits > 1 {
        let c: Combine = fwd.kernel("flash_attn_combine_f32");
        let (oo, ol, ppo, ppl) = (out.as_mut_ptr(), lse.as_mut_ptr(), part_o.as_ptr(), part_l.as_ptr());
        // SAFETY: as above; the combine is grid-stride over out.
        unsafe { fwd.launch(dim(3), dim(256), 0, || c(oo, ol, ppo, ppl, b32, t32, h32, d as u32, splits as u32)) }.unwrap();
    }
    (out, lse)
}

fn check_forward(fwd: &Emu, x: &Inputs, splits: usize, label: &str) -> (Vec<f32>, Vec<f32>) {
    let mut want = vec![0.0f32; x.q.len()];
    attention(&mut want, &x.q, &x.k, &x.v, &x.mask, x.s);
    let (out, lse) = forward(fwd, x, splits);
    check(&format!("{label} splits {splits}: out"), &out, &want, TOL_BF16);
    check_lse(&format!("{label} splits {splits}: lse"), &lse, &reference_lse(&x.q, &x.k, &x.mask, x.s));
    (out, lse)
}

fn check_backward(bwd: &Emu, x: &Inputs, out: &[f32], lse: &[f32], rng: &mut Rng, label: &str) {
    let AttentionShape { batch, tq: t, n_heads, n_kv_heads, head_dim: d, .. } = x.s;
    let dout = random(rng, x.q.len(), 1.0);
    let (mut want_dq, mut want_dk, mut want_dv) = (vec![0.0f32; x.q.len()], vec![0.0f32; x.k.len()], vec![0.0f32; x.v.len()]);
    attention_backward(&mut want_dq, &mut want_dk, &mut want_dv, &dout, &x.q, &x.k, &x.v, &x.mask, x.s);

    let (qb, kb, vb) = (bits(&x.q), bits(&x.k), bits(&x.v));
    let mask: Vec<u8> = x.mask.iter().map(|&m| u8::from(m)).collect();
    let mut delta = vec![f32::NAN; batch * n_heads * t];
    let mut dout_b = vec![0xFFFFu16; x.q.len()];
    let (mut dq, mut dk, mut dv) = (vec![f32::NAN; x.q.len()], vec![f32::NAN; x.k.len()], vec![f32::NAN; x.v.len()]);
    let (b32, t32, h32, kv32, d32) = (batch as u32, t as u32, n_heads as u32, n_kv_heads as u32, d as u32);
    let scale = 1.0 / (d as f32).sqrt();

    let prep: Prep = bwd.kernel("flash_attn_bwd_prep");
    let rows = batch * t * n_heads;
    let (pd, pdb, pdo, pout) = (delta.as_mut_ptr(), dout_b.as_mut_ptr(), dout.as_ptr(), out.as_ptr());
    // SAFETY: buffers sized per the kernels' layouts, alive for each launch.
    unsafe { bwd.launch(dim(rows.div_ceil(8) as u32), dim(256), 0, || prep(pd, pdb, pdo, pout, b32, t32, h32, d32)) }.unwrap();

    let rb = row_bytes(d);
    let tiles = t.div_ceil(TILE) as u32;
    let (pq, pk, pv, pdb, pl, pde, pm) = (qb.as_ptr(), kb.as_ptr(), vb.as_ptr(), dout_b.as_ptr(), lse.as_ptr(), delta.as_ptr(), mask.as_ptr());
    let dkdv: Dkdv = bwd.kernel(&format!("flash_attn_bwd_dkdv_d{d}"));
    let (pdk, pdv) = (dk.as_mut_ptr(), dv.as_mut_ptr());
    let smem = (2 * TILE + 2 * inner(d)) * rb;
    // SAFETY: as above.
    unsafe { bwd.launch([tiles, kv32, b32], dim(128), smem, || dkdv(pdk, pdv, pq, pk, pv, pdb, pl, pde, pm, t32, h32, kv32, scale)) }.unwrap();
    let dqk: Dq = bwd.kernel(&format!("flash_attn_bwd_dq_d{d}"));
    let pdq = dq.as_mut_ptr();
    let smem = (4 * inner(d)).max(2 * TILE) * rb;
    // SAFETY: as above.
    unsafe { bwd.launch([tiles, h32, b32], dim(128), smem, || dqk(pdq, pq, pk, pv, pdb, pl, pde, pm, t32, h32, kv32, scale)) }.unwrap();

    check(&format!("{label}: dq"), &dq, &want_dq, TOL_BF16);
    check(&format!("{label}: dk"), &dk, &want_dk, TOL_BF16);
    check(&format!("{label}: dv"), &dv, &want_dv, TOL_BF16);
}

fn shape(batch: usize, tq: usize, past: usize, cap: usize, n_heads: usize, n_kv_heads: usize, head_dim: usize) -> AttentionShape {
    AttentionShape { batch, tq, past, cap, n_heads, n_kv_heads, head_dim }
}

fn left(n: usize) -> Vec<usize> {
    (0..n).collect()
}

/// Training shapes: forward then backward from the emulated forward's out and lse.
#[test]
fn flash_forward_and_backward_match_the_cpu() {
    let (Some(fwd), Some(bwd)) = (common::emu::build("flash_attn"), common::emu::build("flash_attn_bwd")) else { return };
    let mut rng = Rng::new(61);
    let cases = [
        // GQA 6/2, d 64, 37 tokens: left padding 5 (queries that see nothing), masked keys.
        (shape(2, 37, 0, 37, 6, 2, 64), vec![left(5), vec![11, 23]]),
        // MQA 3/1, d 80 (padded tile rows), 7 tokens; the second sequence is all padding.
        (shape(2, 7, 0, 7, 3, 1, 80), vec![vec![3], left(7)]),
        // MHA, d 128, 130 tokens: three key tiles, the last with 2 keys; ragged query tiles.
        (shape(1, 130, 0, 130, 2, 2, 128), vec![vec![0, 64, 129]]),
        // No padding, 200 tokens, GQA 2/1, d 64: tiles wholly below the diagonal take the
        // kernels' unmasked fast path (forward, dK/dV and dQ), the diagonal ones the masked path.
        (shape(1, 200, 0, 200, 2, 1, 64), vec![vec![]]),
        // The same at d 128 with one masked key late (tiles before it stay on the fast path).
        (shape(1, 150, 0, 150, 2, 2, 128), vec![vec![140]]),
    ];
    for (s, off) in cases {
        let label = format!("flash b{} t{} heads {}/{} d{}", s.batch, s.tq, s.n_heads, s.n_kv_heads, s.head_dim);
        let x = inputs(&mut rng, s, &off);
        let (out, lse) = check_forward(&fwd, &x, 1, &label);
        check_backward(&bwd, &x, &out, &lse, &mut rng, &label);
    }
}

/// Decoding over a KV cache (rows past the written part are NaN): beams with ragged left padding,
/// 1 and 3 new tokens, one split and several (partial results merged by the combine kernel),
/// including more splits than key tiles and a beam that sees no key at all.
#[test]
fn flash_decoding_with_split_keys_matches_the_cpu() {
    let Some(fwd) = common::emu::build("flash_attn") else { return };
    let mut rng = Rng::new(62);
    let x = inputs(&mut rng, shape(3, 1, 150, 160, 6, 2, 64), &[left(0), left(20), left(151)]);
    for splits in [1, 2, 3, 5] {
        check_forward(&fwd, &x, splits, "decode b3 tq1 past150 heads 6/2 d64");
    }
    let x = inputs(&mut rng, shape(2, 3, 70, 80, 4, 1, 128), &[left(9), vec![70, 71]]);
    for splits in [1, 2] {
        check_forward(&fwd, &x, splits, "decode b2 tq3 past70 heads 4/1 d128");
    }
    let x = inputs(&mut rng, shape(2, 2, 61, 64, 6, 3, 80), &[vec![], left(30)]);
    check_forward(&fwd, &x, 2, "decode b2 tq2 past61 heads 6/3 d80");
}

/// A missing barrier shows as a different result under another thread order.
#[test]
fn flash_kernels_do_not_depend_on_the_thread_order() {
    let (Some(fwd), Some(bwd)) = (common::emu::build("flash_attn"), common::emu::build("flash_attn_bwd")) else { return };
    let (fwd, bwd) = (fwd.with_schedule(Schedule::Descending), bwd.with_schedule(Schedule::Shuffled(7)));
    let mut rng = Rng::new(63);
    let x = inputs(&mut rng, shape(1, 70, 0, 70, 4, 2, 64), &[vec![1, 65]]);
    let (out, lse) = check_forward(&fwd, &x, 1, "flash descending order");
    check_backward(&bwd, &x, &out, &lse, &mut rng, "flash shuffled order");
    let x = inputs(&mut rng, shape(2, 1, 90, 100, 2, 1, 128), &[vec![], left(10)]);
    check_forward(&fwd, &x, 2, "decode descending order");
}

/// The KV-cache cast writes exactly the used rows, rounded as the cast kernel rounds.
#[test]
fn flash_kv_cast_rounds_the_used_rows_only() {
    let Some(fwd) = common::emu::build("flash_attn") else { return };
    let mut rng = Rng::new(64);
    let (slabs, cap, len, d) = (3usize, 11usize, 7usize, 80usize);
    let src = random(&mut rng, slabs * cap * d, 1.0);
    let mut dst = vec![0xABCDu16; src.len()];
    let f: CastKv = fwd.kernel("flash_attn_cast_kv_bf16");
    let (pd, ps) = (dst.as_mut_ptr(), src.as_ptr());
    // SAFETY: both buffers hold slabs * cap * d elements.
    unsafe { fwd.launch(dim(2), dim(256), 0, || f(pd, ps, slabs as u64, cap as u32, len as u32, d as u32)) }.unwrap();
    for (i, (&got, &x)) in dst.iter().zip(&src).enumerate() {
        let want = if (i / d) % cap < len { bf16_bits(x) } else { 0xABCD };
        assert_eq!(got, want, "element {i}");
    }
}
