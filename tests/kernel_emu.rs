//! The CUDA kernels run on the host emulator (kernels/emu/) against the CPU reference: their
//! indexing, barriers, masking and warp reductions checked without a GPU. Each launch mirrors the
//! shape its launcher in engine/backend/cuda/ops/ uses. Skips (one line) without g++.
mod common;

use common::emu::{bf16_bits, bf16_f32, dim, Emu, Schedule};
use common::rel_err;
use ilrec::backend::cpu::{attention, attention_backward, AttentionShape};
use ilrec::backend::cuda::selftest::attention::reference_lse;
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
    // Guarded memory: a kernel reading past any operand crashes with a report.
    let (qs, ks, vs) = (k.buffer(&T::store(&q)), k.buffer(&T::store(&kk)), k.buffer(&T::store(&vv)));
    let mask_u8 = k.buffer(&mask_u8);

    // The launcher's shape: 128 threads, 256 above head_dim 128.
    let threads: u32 = if d <= 128 { 128 } else { 256 };
    let scale = 1.0 / (d as f32).sqrt();
    let (tq32, past32, cap32, h32, kvh32, d32) = (tq as u32, past as u32, cap as u32, n_heads as u32, n_kv_heads as u32, d as u32);

    let fwd: AttnFwd<T> = k.kernel(&format!("attention_fwd_{}", T::SUFFIX));
    let mut out = k.buffer(&T::store(&vec![f32::NAN; q.len()]));
    let mut lse = k.buffer(&vec![f32::NAN; batch * n_heads * tq]);
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
    let dout = k.buffer(&random(rng, q.len(), 1.0));
    let (mut dq, mut dk, mut dv) = (k.buffer(&vec![f32::NAN; q.len()]), k.buffer(&vec![f32::NAN; kk.len()]), k.buffer(&vec![f32::NAN; vv.len()]));
    let mut delta = k.buffer(&vec![f32::NAN; lse.len()]);
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
    let Some(k) = common::emu::build("attention") else { return };
    let mut rng = Rng::new(11);
    for case in attn_cases() {
        attention_case::<f32>(&k, &case, &mut rng);
        attention_case::<u16>(&k, &case, &mut rng);
    }
    // Another thread order gives the same results (every shared-memory handoff is behind a barrier).
    let k = k.with_schedule(Schedule::Descending);
    attention_case::<f32>(&k, &attn_cases()[0], &mut rng);
}

// =============================================================================================
// softmax_ce.cu: the reference is train/loss.rs through `sft_loss` one row at a time (`ce_row` is
// private): with norm 1 its `ce` is the row's loss, with `norm` its gradient is ce_row's
// `(softmax - onehot) / norm`.

type SoftmaxCe<T> = unsafe extern "C" fn(*mut f64, *mut f32, *const T, *const u32, u32, f64);
type LogSoftmax<T> = unsafe extern "C" fn(*mut f32, *const T, u32);

fn softmax_ce_case<T: Storage>(k: &Emu, n: usize, vocab: usize, rng: &mut Rng) {
    let label = format!("softmax_ce {} {n} x {vocab}", T::SUFFIX);
    let mut z = T::held(&random(rng, n * vocab, 2.0));
    z[3] = 40.0; // an outlier logit
    let zs = T::store(&z);
    let mut targets: Vec<u32> = (0..n).map(|_| rng.below(vocab) as u32).collect();
    targets[n / 2] = u32::MAX; // ignored row
    let norm = (n - 1) as f64;
    let mut loss = vec![f64::NAN; n];
    let mut d = vec![f32::NAN; n * vocab];
    let f: SoftmaxCe<T> = k.kernel(&format!("softmax_ce_{}", T::SUFFIX));
    let (pl, pd, pz, pt) = (loss.as_mut_ptr(), d.as_mut_ptr(), zs.as_ptr(), targets.as_ptr());
    unsafe { k.launch([n as u32, 1, 1], dim(256), 0, || f(pl, pd, pz, pt, vocab as u32, 1.0 / norm)) }.unwrap_or_else(|e| panic!("{label}: {e}"));
    let (mut want_loss, mut want_d) = (vec![0.0f32; n], vec![0.0f32; n * vocab]);
    for (r, &y) in targets.iter().enumerate() {
        if y == u32::MAX {
            continue;
        }
        let zr = &z[r * vocab..(r + 1) * vocab];
        want_loss[r] = ilrec::train::loss::sft_loss(zr, vocab, &[y], 1.0).unwrap().0.ce as f32;
        want_d[r * vocab..(r + 1) * vocab].copy_from_slice(&ilrec::train::loss::sft_loss(zr, vocab, &[y], norm).unwrap().1);
    }
    let loss32: Vec<f32> = loss.iter().map(|&x| x as f32).collect();
    check(&format!("{label} loss"), &loss32, &want_loss, TOL_F32);
    check(&format!("{label} dlogits"), &d, &want_d, TOL_F32);

    // log_softmax against f64 on the same values.
    let mut out = vec![f32::NAN; n * vocab];
    let f: LogSoftmax<T> = k.kernel(&format!("log_softmax_{}", T::SUFFIX));
    let po = out.as_mut_ptr();
    unsafe { k.launch([n as u32, 1, 1], dim(256), 0, || f(po, pz, vocab as u32)) }.unwrap_or_else(|e| panic!("{label}: {e}"));
    let mut want = vec![0.0f32; n * vocab];
    for r in 0..n {
        let zr = &z[r * vocab..(r + 1) * vocab];
        let mx = zr.iter().map(|&x| f64::from(x)).fold(f64::NEG_INFINITY, f64::max);
        let lse = mx + zr.iter().map(|&x| (f64::from(x) - mx).exp()).sum::<f64>().ln();
        for j in 0..vocab {
            want[r * vocab + j] = (f64::from(zr[j]) - lse) as f32;
        }
    }
    check(&format!("log_softmax {} {n} x {vocab}", T::SUFFIX), &out, &want, TOL_F32);
}

#[test]
fn softmax_ce_matches_cpu() {
    let Some(k) = common::emu::build("softmax_ce") else { return };
    let mut rng = Rng::new(5);
    // 1000 > 256 threads (each thread strides over the row); 37 < 256 (most threads idle).
    for (n, vocab) in [(7usize, 1000usize), (5, 37)] {
        softmax_ce_case::<f32>(&k, n, vocab, &mut rng);
        softmax_ce_case::<u16>(&k, n, vocab, &mut rng);
    }
}

// =============================================================================================
// elementwise.cu: RMSNorm forward (cpu::rms_norm) and backward (cpu::rms_norm_backward for dx, an
// f64 sum for the weight gradient, which the CPU trainer does not compute).

type RmsNorm<T> = unsafe extern "C" fn(*mut T, *const T, *const T, *mut f32, u32, f32);
type RmsNormDx<T> = unsafe extern "C" fn(*mut f32, *const f32, *const T, *const T, *mut f32, u32, f32);
type RmsNormDw<T> = unsafe extern "C" fn(*mut f32, *const f32, *const T, *const f32, u32, u32, u32);
type ColumnSum = unsafe extern "C" fn(*mut f32, *const f32, u32, u32, i32);

fn rms_norm_case<T: Storage>(k: &Emu, rows: usize, h: usize, threads: u32, rng: &mut Rng) {
    let label = format!("rms_norm {} {rows} x {h} block {threads}", T::SUFFIX);
    let eps = 1e-6f32;
    let mut x = random(rng, rows * h, 1.0);
    x[1] = 30.0; // outlier
    let x = T::held(&x);
    let w = T::held(&random(rng, h, 1.0));
    let (xs, ws) = (T::store(&x), T::store(&w));
    let mut y = T::store(&vec![f32::NAN; rows * h]);
    let mut rstd = vec![f32::NAN; rows];
    let f: RmsNorm<T> = k.kernel(&format!("rms_norm_{}", T::SUFFIX));
    let (py, px, pw, pr) = (y.as_mut_ptr(), xs.as_ptr(), ws.as_ptr(), rstd.as_mut_ptr());
    unsafe { k.launch([rows as u32, 1, 1], dim(threads), 0, || f(py, px, pw, pr, h as u32, eps)) }.unwrap_or_else(|e| panic!("{label}: {e}"));
    let mut want = vec![0.0f32; rows * h];
    for r in 0..rows {
        ilrec::backend::cpu::rms_norm(&mut want[r * h..(r + 1) * h], &x[r * h..(r + 1) * h], &w, eps);
    }
    check(&format!("{label} y"), &T::load(&y), &want, T::TOL);

    // dx is added into: start from random values.
    let dy = random(rng, rows * h, 1.0);
    let dx0 = random(rng, rows * h, 1.0);
    let mut dx = dx0.clone();
    let mut rstd2 = vec![f32::NAN; rows];
    let f: RmsNormDx<T> = k.kernel(&format!("rms_norm_backward_dx_{}", T::SUFFIX));
    let (pdx, pdy, pr2) = (dx.as_mut_ptr(), dy.as_ptr(), rstd2.as_mut_ptr());
    unsafe { k.launch([rows as u32, 1, 1], dim(threads), 0, || f(pdx, pdy, px, pw, pr2, h as u32, eps)) }.unwrap_or_else(|e| panic!("{label}: {e}"));
    let mut want = dx0.clone();
    for r in 0..rows {
        let s = r * h..(r + 1) * h;
        ilrec::backend::cpu::rms_norm_backward(&mut want[s.clone()], &dy[s.clone()], &x[s], &w, eps);
    }
    check(&format!("{label} dx"), &dx, &want, TOL_F32);
    let want_rstd: Vec<f32> = (0..rows)
        .map(|r| (1.0 / (x[r * h..(r + 1) * h].iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / h as f64 + f64::from(eps)).sqrt()) as f32)
        .collect();
    check(&format!("{label} rstd"), &rstd2, &want_rstd, TOL_F32);
    check(&format!("{label} forward rstd"), &rstd, &want_rstd, TOL_F32);

    // dw: pass 1 over chunks of 3 rows with the (32, 8) block, pass 2 column_sum_f32.
    let rows_per_chunk = 3usize;
    let chunks = rows.div_ceil(rows_per_chunk);
    let mut partial = vec![f32::NAN; chunks * h];
    let mut dw = vec![f32::NAN; h];
    let f: RmsNormDw<T> = k.kernel(&format!("rms_norm_backward_dw_partial_{}", T::SUFFIX));
    let cs: ColumnSum = k.kernel("column_sum_f32");
    let (pp, pr2c, pdw) = (partial.as_mut_ptr(), rstd2.as_ptr(), dw.as_mut_ptr());
    unsafe { k.launch([h.div_ceil(32) as u32, chunks as u32, 1], [32, 8, 1], 0, || f(pp, pdy, px, pr2c, rows as u32, h as u32, rows_per_chunk as u32)) }
        .unwrap_or_else(|e| panic!("{label} dw: {e}"));
    unsafe { k.launch([h.div_ceil(256) as u32, 1, 1], dim(256), 0, || cs(pdw, pp, chunks as u32, h as u32, 0)) }.unwrap_or_else(|e| panic!("{label} column_sum: {e}"));
    let want_dw: Vec<f32> = (0..h)
        .map(|j| (0..rows).map(|r| f64::from(dy[r * h + j]) * f64::from(x[r * h + j]) * f64::from(rstd2[r])).sum::<f64>() as f32)
        .collect();
    check(&format!("{label} dw"), &dw, &want_dw, TOL_F32);
}

#[test]
fn rms_norm_matches_cpu() {
    let Some(k) = common::emu::build("elementwise") else { return };
    let mut rng = Rng::new(7);
    // h 300 > 256 threads; h 45 < 64 threads (idle threads still reach every barrier); a 1024 block.
    for (rows, h, threads) in [(5usize, 300usize, 256u32), (4, 45, 64), (2, 1100, 1024)] {
        rms_norm_case::<f32>(&k, rows, h, threads, &mut rng);
        rms_norm_case::<u16>(&k, rows, h, threads, &mut rng);
    }
}

// =============================================================================================
// embedding.cu scatter-add: the CPU loop of train/backprop.rs (`grad[slot[tok[i]]] += dx[i]` for
// unmasked positions, ascending), transcribed here; both kernel forms must equal it bitwise.

type ScatterCsr = unsafe extern "C" fn(*mut f32, *const f32, *const u32, *const u32, u32);
type ScatterScan = unsafe extern "C" fn(*mut f32, *const f32, *const u32, *const u8, *const u32, u32, u32);

#[test]
fn embedding_scatter_matches_cpu() {
    let Some(k) = common::emu::build("embedding") else { return };
    let mut rng = Rng::new(3);
    let (n, vocab, h, n_slots) = (53usize, 40usize, 300usize, 6usize);
    let trainable: Vec<u32> = (0..n_slots as u32).map(|s| 3 + 5 * s).collect();
    let mut slot = vec![u32::MAX; vocab];
    for (s, &t) in trainable.iter().enumerate() {
        slot[t as usize] = s as u32;
    }
    // The last slot never occurs (its row must stay untouched).
    let tokens: Vec<u32> =
        (0..n).map(|_| if rng.below(2) == 0 { trainable[rng.below(n_slots - 1)] } else { rng.below(vocab) as u32 }).filter(|&t| t != trainable[n_slots - 1]).collect();
    let n = tokens.len();
    let mask: Vec<u8> = (0..n).map(|_| u8::from(rng.below(5) != 0)).collect();
    let dx = random(&mut rng, n * h, 1.0);
    let grad0 = random(&mut rng, n_slots * h, 1.0);
    let mut want = grad0.clone();
    for i in 0..n {
        let s = slot[tokens[i] as usize];
        if mask[i] != 0 && s != u32::MAX {
            for c in 0..h {
                want[s as usize * h + c] += dx[i * h + c];
            }
        }
    }
    let (mut offsets, mut positions) = (vec![0u32], Vec::new());
    for s in 0..n_slots as u32 {
        positions.extend((0..n as u32).filter(|&i| mask[i as usize] != 0 && slot[tokens[i as usize] as usize] == s));
        offsets.push(positions.len() as u32);
    }
    let grid = [n_slots as u32, h.div_ceil(256) as u32, 1];
    let mut g = grad0.clone();
    let f: ScatterCsr = k.kernel("embedding_scatter_add_csr_f32");
    let (pg, pdx, po, pp) = (g.as_mut_ptr(), dx.as_ptr(), offsets.as_ptr(), positions.as_ptr());
    unsafe { k.launch(grid, dim(256), 0, || f(pg, pdx, po, pp, h as u32)) }.unwrap();
    assert!(g.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "embedding_scatter_add_csr_f32 differs from the CPU loop");
    let mut g = grad0.clone();
    let f: ScatterScan = k.kernel("embedding_scatter_add_scan_f32");
    let (pg, pt, pm, ps) = (g.as_mut_ptr(), tokens.as_ptr(), mask.as_ptr(), slot.as_ptr());
    unsafe { k.launch(grid, dim(256), 0, || f(pg, pdx, pt, pm, ps, n as u32, h as u32)) }.unwrap();
    assert!(g.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "embedding_scatter_add_scan_f32 differs from the CPU loop");
}

// =============================================================================================
// mma.cuh through tests/emu/mma_check.cu: ldmatrix layouts against mma.cuh's text transcribed
// independently here, and bf16 GEMMs (ldmatrix + trans + mma + cp.async) against an f64 matmul.

fn mma_emu() -> Option<Emu> {
    common::emu::build_file(&common::repo().join("tests/emu/mma_check.cu"))
}

/// f64 matmul of bf16 values: a [m, kk] b [kk, n], row-major.
fn matmul_f64(a: &[f32], b: &[f32], m: usize, n: usize, kk: usize) -> Vec<f32> {
    let mut c = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..kk).map(|x| f64::from(a[i * kk + x]) * f64::from(b[x * n + j])).sum::<f64>() as f32;
        }
    }
    c
}

#[test]
fn ldmatrix_layouts() {
    let Some(k) = mma_emu() else { return };
    // Element e of row r holds the bf16 bit pattern r * 8 + e (distinct, so positions are visible).
    let tile: Vec<u16> = (0..256u16).collect();
    let mut out = vec![0u32; 6 * 32 * 4];
    let f: unsafe extern "C" fn(*mut u32, *const u16) = k.kernel("ldmatrix_probe");
    let (po, pt) = (out.as_mut_ptr(), tile.as_ptr());
    unsafe { k.launch([1, 1, 1], dim(32), 0, || f(po, pt)) }.unwrap();
    let at = |m: usize, row: usize, col: usize| u32::from(tile[(8 * m + row) * 8 + col]);
    for (v, (count, trans)) in [(1, false), (2, false), (4, false), (1, true), (2, true), (4, true)].into_iter().enumerate() {
        for lane in 0..32 {
            let (g, t) = (lane / 4, lane % 4);
            for i in 0..4 {
                // mma.cuh: r[i] = matrix i's row g, columns 2t, 2t+1 (low half first); _trans:
                // matrix i's column g, rows 2t, 2t+1.
                let want = if i >= count {
                    0
                } else if trans {
                    at(i, 2 * t, g) | at(i, 2 * t + 1, g) << 16
                } else {
                    at(i, g, 2 * t) | at(i, g, 2 * t + 1) << 16
                };
                assert_eq!(out[(v * 32 + lane) * 4 + i], want, "ldmatrix x{count} trans {trans}: lane {lane} r[{i}]");
            }
        }
    }
}

#[test]
fn mma_gemm_matches_f64() {
    let Some(k) = mma_emu() else { return };
    let mut rng = Rng::new(9);
    // 16 x 16 x 16, one warp, static shared memory.
    let a = round_bf16_vec(&random(&mut rng, 256, 1.0));
    let b = round_bf16_vec(&random(&mut rng, 256, 1.0));
    let (ab, bb) = (to_bf16(&a), to_bf16(&b));
    let mut c = vec![f32::NAN; 256];
    let f: unsafe extern "C" fn(*mut f32, *const u16, *const u16) = k.kernel("mma_tile_16x16");
    let (pc, pa, pb) = (c.as_mut_ptr(), ab.as_ptr(), bb.as_ptr());
    unsafe { k.launch([1, 1, 1], dim(32), 0, || f(pc, pa, pb)) }.unwrap();
    check("mma 16x16x16", &c, &matmul_f64(&a, &b, 16, 16, 16), 1e-5);

    // Tiled GEMM: 64^3 (one block, two K stages), and ragged 100 x 72 x 40 (2 x 2 blocks, rows and
    // columns past the matrix zero-filled, a last K stage of 8).
    let g: unsafe extern "C" fn(*mut f32, *const u16, *const u16, u32, u32, u32) = k.kernel("mma_gemm_bf16");
    for (m, n, kk) in [(64usize, 64usize, 64usize), (100, 72, 40)] {
        let mut a = round_bf16_vec(&random(&mut rng, m * kk, 1.0));
        a[5] = 60.0; // outlier
        let b = round_bf16_vec(&random(&mut rng, kk * n, 1.0));
        // Guarded: the zero-filled ragged edges must not read past A or B.
        let (ab, bb) = (k.buffer(&to_bf16(&a)), k.buffer(&to_bf16(&b)));
        let mut c = k.buffer(&vec![f32::NAN; m * n]);
        let (pc, pa, pb) = (c.as_mut_ptr(), ab.as_ptr(), bb.as_ptr());
        let grid = [n.div_ceil(64) as u32, m.div_ceil(64) as u32, 1];
        let smem = 2 * (64 * 32 + 32 * 64) * 2;
        for schedule in [Schedule::Ascending, Schedule::Shuffled(1234)] {
            c.fill(f32::NAN);
            unsafe { k.with_schedule(schedule).launch(grid, dim(128), smem, || g(pc, pa, pb, m as u32, n as u32, kk as u32)) }.unwrap();
            check(&format!("mma gemm {m}x{n}x{kk} {schedule:?}"), &c, &matmul_f64(&a, &b, m, n, kk), 1e-5);
        }
    }
}

fn round_bf16_vec(v: &[f32]) -> Vec<f32> {
    from_bf16(&to_bf16(v))
}

// =============================================================================================
// The emulator itself (tests/emu/faults.cu): the bugs it exists to catch are reported, and warp
// collectives give CUDA's results.

fn faults() -> Option<Emu> {
    common::emu::build_file(&common::repo().join("tests/emu/faults.cu"))
}

#[track_caller]
fn expect_err(r: Result<(), String>, needles: &[&str]) {
    let e = r.expect_err("the emulator accepted a faulty kernel");
    println!("reported: {e}");
    for n in needles {
        assert!(e.contains(n), "report lacks {n:?}: {e}");
    }
}

#[test]
fn emulator_reports_faults() {
    let Some(k) = faults() else { return };
    let mut out = vec![0.0f32; 64];
    let po = out.as_mut_ptr();
    type F = unsafe extern "C" fn(*mut f32);
    let f: F = k.kernel("early_return_then_sync");
    expect_err(unsafe { k.launch([2, 1, 1], dim(64), 0, || f(po)) }, &["deadlock", "threads 0-31 exited", "threads 32-63 __syncthreads at"]);
    let f: F = k.kernel("divergent_barriers");
    expect_err(unsafe { k.launch([1, 1, 1], dim(64), 0, || f(po)) }, &["__syncthreads divergence", "faults.cu"]);
    let f: F = k.kernel("shuffle_outside_mask");
    expect_err(unsafe { k.launch([1, 1, 1], dim(32), 0, || f(po)) }, &["__shfl_sync", "reads lane 20"]);
    let f: F = k.kernel("traps");
    expect_err(unsafe { k.launch([1, 1, 1], dim(32), 0, || f(po)) }, &["__trap", "thread (5,0,0)"]);
    let f: unsafe extern "C" fn(*mut u32) = k.kernel("ldmatrix_misaligned");
    let mut o32 = vec![0u32; 32];
    let p32 = o32.as_mut_ptr();
    expect_err(unsafe { k.launch([1, 1, 1], dim(32), 0, || f(p32)) }, &["ldmatrix_x1", "16-byte aligned"]);
    // Launch shape limits.
    let f: F = k.kernel("traps");
    expect_err(unsafe { k.launch([1, 1, 1], dim(2048), 0, || f(po)) }, &["exceeds the CUDA limits"]);
    expect_err(unsafe { k.launch([1, 70000, 1], dim(32), 0, || f(po)) }, &["exceeds the CUDA limits"]);
    expect_err(unsafe { k.launch([1, 1, 1], dim(32), 300_000, || f(po)) }, &["exceeds 227 KiB"]);
    // A panic in the launch body comes back as an error, not an abort.
    expect_err(unsafe { k.launch([1, 1, 1], dim(1), 0, || panic!("boom")) }, &["panic in the launch body: boom"]);
    // The library stays usable after failed launches.
    let f: F = k.kernel("divergent_barriers");
    expect_err(unsafe { k.launch([1, 1, 1], dim(64), 0, || f(po)) }, &["divergence"]);
}

#[test]
fn emulator_poisons_shared_memory() {
    let Some(k) = faults() else { return };
    // A missing barrier: under the ascending order thread t reads slot t + 1 before its owner
    // wrote it, and gets the poison; with the barrier every value is right.
    let f: unsafe extern "C" fn(*mut f32, i32) = k.kernel("neighbour_exchange");
    let mut out = vec![0.0f32; 64];
    let po = out.as_mut_ptr();
    unsafe { k.launch([1, 1, 1], dim(64), 0, || f(po, 1)) }.unwrap();
    assert!(out.iter().enumerate().all(|(t, &v)| v == ((t + 1) % 64) as f32));
    unsafe { k.launch([1, 1, 1], dim(64), 0, || f(po, 0)) }.unwrap();
    assert!(out[..63].iter().all(|v| v.is_nan()), "a read before the owner's write must see the poison");
    // Descending order: every owner wrote before its reader ran, except thread 63's read of slot 0.
    unsafe { k.with_schedule(Schedule::Descending).launch([1, 1, 1], dim(64), 0, || f(po, 0)) }.unwrap();
    assert!(out[63].is_nan() && out[..63].iter().all(|v| !v.is_nan()));

    // cp.async lands at cp_async_wait, not at the copy.
    let f: unsafe extern "C" fn(*mut f32, *const f32, i32) = k.kernel("cp_async_early_read");
    let inp: Vec<f32> = (0..32).map(|x| x as f32).collect();
    let mut out = vec![0.0f32; 32];
    let (po, pi) = (out.as_mut_ptr(), inp.as_ptr());
    unsafe { k.launch([1, 1, 1], dim(8), 128, || f(po, pi, 1)) }.unwrap();
    assert!(out.iter().enumerate().all(|(i, &v)| v == i as f32));
    unsafe { k.launch([1, 1, 1], dim(8), 128, || f(po, pi, 0)) }.unwrap();
    assert!(out.iter().all(|v| v.is_nan()), "reading a cp.async tile before the wait must see the poison: {out:?}");
}

#[test]
fn warp_collectives_match_cuda_semantics() {
    let Some(k) = faults() else { return };
    let n = 48usize;
    let mut rng = Rng::new(1);
    let inp: Vec<i32> = (0..n).map(|_| rng.below(50) as i32).collect();
    let mut out = vec![0i32; n * 8];
    let f: unsafe extern "C" fn(*mut i32, *const i32) = k.kernel("warp_collectives");
    let (po, pi) = (out.as_mut_ptr(), inp.as_ptr());
    unsafe { k.launch([1, 1, 1], dim(n as u32), 0, || f(po, pi)) }.unwrap();
    for tid in 0..n {
        let (w0, lane) = (tid / 32 * 32, tid % 32);
        let lanes = (n - w0).min(32);
        let v = |l: usize| inp[w0 + l];
        let o = &out[tid * 8..tid * 8 + 8];
        let src = ((lane ^ 3) & 15) | (lane & 16);
        assert_eq!(o[0], v(src), "idx, thread {tid}");
        assert_eq!(o[1], if lane % 8 >= 1 { v(lane - 1) } else { v(lane) }, "up, thread {tid}");
        assert_eq!(o[2], if lane % 8 + 2 < 8 { v(lane + 2) } else { v(lane) }, "down, thread {tid}");
        assert_eq!(o[3], v(lane ^ 4), "xor, thread {tid}");
        let ballot = (0..lanes).filter(|&l| v(l) & 1 == 1).fold(0u32, |b, l| b | 1 << l);
        assert_eq!(o[4] as u32, ballot, "ballot, thread {tid}");
        assert_eq!(o[5], i32::from((0..lanes).any(|l| v(l) > 40)), "any, thread {tid}");
        assert_eq!(o[6], 1, "all, thread {tid}");
        if lane == 0 || lane == 16 {
            // shfl_down tree with width 16: lane 0 / 16 of each 16-lane segment holds its sum.
            assert_eq!(o[7], (lane..lane + 16).filter(|&l| l < lanes).map(v).sum::<i32>(), "segment sum, thread {tid}");
        }
    }
}

/// A kernel that overflows its fiber's stack, or reads past the end of a guarded buffer, dies
/// with a report naming the block and thread (run in a child process: the crash ends it).
#[test]
fn emulator_reports_crashes() {
    let Some(k) = faults() else { return };
    match std::env::var("ILREC_EMU_CRASH_CHILD").as_deref() {
        Ok("stack") => {
            let f: unsafe extern "C" fn(*mut i32, i32) = k.kernel("overflow_stack");
            let mut out = vec![0i32; 4];
            let po = out.as_mut_ptr();
            let r = unsafe { k.launch([1, 1, 1], dim(4), 0, || f(po, 1000)) };
            panic!("the overflowing launch returned: {r:?}");
        }
        Ok(_) => {
            let f: unsafe extern "C" fn(*mut f32, *const f32, u32) = k.kernel("read_at");
            let inp = k.buffer(&vec![1.0f32; 1000]);
            let mut out = k.buffer(&[0.0f32; 32]);
            let (po, pi) = (out.as_mut_ptr(), inp.as_ptr());
            // In bounds: fine; 32 floats from 990: threads 10.. read past the end.
            unsafe { k.launch([1, 1, 1], dim(32), 0, || f(po, pi, 968)) }.unwrap();
            assert!(out.iter().all(|&v| v == 1.0));
            let r = unsafe { k.launch([1, 1, 1], dim(32), 0, || f(po, pi, 990)) };
            panic!("the over-reading launch returned: {r:?}");
        }
        Err(_) => {}
    }
    for (case, want) in [("stack", "its stack overflowed"), ("overread", "past the end of a guarded buffer")] {
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["emulator_reports_crashes", "--exact", "--nocapture", "--test-threads=1"])
            .env("ILREC_EMU_CRASH_CHILD", case)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&child.stderr);
        assert!(!child.status.success(), "{case}: the child survived: {err}");
        assert!(err.contains("ilrec emu: SIGSEGV") && err.contains("block (0,0,0), thread (") && err.contains(want), "{case}: no report: {err}");
    }
}
