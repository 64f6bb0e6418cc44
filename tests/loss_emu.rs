//! kernels/loss.cu and kernels/probe.cu on the host emulator (kernels/emu/) against the CPU
//! reference: `sft_loss` / `ilrec_loss` (engine/train/loss.rs) on the logits the CPU computes from
//! the same bf16-rounded rows and head, and the CPU probe path (rms_norm, matmul_nt). The loss
//! runs the pipeline of engine/backend/cuda/ops/loss.rs (`LossPlan::run`) with small vocabulary
//! splits and gradient chunks, so several splits, several chunks and ragged last tiles are
//! exercised. Odd sizes, outliers, ignored rows, a row with an empty V_N, every ILRec switch.
//! Skips (one line) without g++.
mod common;

use common::emu::{bf16_bits, bf16_f32, dim, Emu, Schedule};
use common::rel_err;
use ilrec::backend::cuda::ops::loss::{row_flags, row_stats};
use ilrec::backend::cpu::{matmul_nt, rms_norm, rms_norm_backward};
// N(0, scale^2) with 1 in 64 values x30 (outliers), as the self-test draws.
use ilrec::backend::cuda::selftest::{loss, random_outliers as random};
use ilrec::rng::Rng;
use ilrec::train::loss::{CpdDirection, IlrecParams, LossStats, NegSource, NegWeight};
use std::ptr::{null, null_mut};

const NONE: u32 = u32::MAX;

fn to_bf16(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| bf16_bits(x)).collect()
}

fn held(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| bf16_f32(bf16_bits(x))).collect()
}

fn distinct(rng: &mut Rng, n: usize, bound: usize) -> Vec<u32> {
    let mut all: Vec<u32> = (0..bound as u32).collect();
    for i in 0..n {
        let j = i + rng.below(bound - i);
        all.swap(i, j);
    }
    all.truncate(n);
    all
}

#[track_caller]
fn check(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = rel_err(got, want, |_| true);
    println!("{what}: rel err {e:.3e}");
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:e}");
}

// =============================================================================================
// loss.cu

type LseFn = unsafe extern "C" fn(*mut f32, *mut f32, *mut f32, *mut f32, *const u16, *const u16, *const u32, *const u32, u32, u32, u32, u32, u32);
type RowsFn = unsafe extern "C" fn(
    *mut f32,
    *mut f32,
    *mut f32,
    *mut f32,
    *mut f32,
    *mut f32,
    *mut f64,
    *mut u32,
    *const f32,
    *const f32,
    *const f32,
    *const f32,
    *const f32,
    *const f32,
    *const u32,
    *const u32,
    *const u8,
    u32,
    u32,
    u32,
    u32,
    f64,
    f64,
    f64,
    f64,
    f64,
    u32,
);
type DlogitsFn = unsafe extern "C" fn(
    *mut u16,
    *mut f32,
    *const u16,
    *const u16,
    *const u32,
    *const u32,
    *const u32,
    *const f32,
    *const f32,
    *const f32,
    *const f32,
    *const f32,
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    f32,
);
type DhiddenFn = unsafe extern "C" fn(*mut f32, *const u16, *const u16, u32, u32, u32, u32, u32);

/// The self-test's case (shape and switches) with the kernel pipeline's split sizes.
struct Case {
    base: loss::Case,
    /// Vocabulary tiles per split of pass 1 and columns per gradient chunk (small, so both loop).
    tiles_per_split: usize,
    chunk: usize,
}

struct Out {
    stats: LossStats,
    dnormed: Vec<f32>,
    dtrain: Vec<f32>,
    dprobe: Vec<f32>,
}

#[allow(clippy::too_many_arguments)]
fn run_fused(emu: &Emu, cs: &Case, normed: &[f32], head: &[f32], targets: &[u32], item: &[bool], cands: &[u32], trainable: &[u32], probe: &[f32], rewards: &[f32], norm: f64) -> Out {
    let loss::Case { m, h, vocab: v, s, k, ntrain, params: p, .. } = cs.base;
    let a = to_bf16(normed);
    let w = to_bf16(head);
    let mut colmap = vec![NONE; v];
    for (j, &c) in cands.iter().enumerate() {
        colmap[c as usize] = j as u32;
    }
    let mut slotmap = vec![NONE; v];
    for (i, &t) in trainable.iter().enumerate() {
        slotmap[t as usize] = i as u32;
    }
    let tcol: Vec<u32> = targets.iter().map(|&y| if y == NONE { NONE } else { colmap[y as usize] }).collect();
    let item_u8: Vec<u8> = item.iter().map(|&b| b as u8).collect();
    let tiles = v.div_ceil(64);
    let splits = tiles.div_ceil(cs.tiles_per_split);
    let row_tiles = m.div_ceil(64) as u32;

    // Pass 1.
    let mut pmax = vec![f32::NAN; splits * m];
    let mut psum = vec![f32::NAN; splits * m];
    let mut zy = vec![0.0f32; m];
    let mut zc = vec![f32::NAN; m * s];
    let lse: LseFn = emu.kernel("loss_lse_bf16");
    let (pm, ps, pzy, pzc) = (pmax.as_mut_ptr(), psum.as_mut_ptr(), zy.as_mut_ptr(), if s > 0 { zc.as_mut_ptr() } else { null_mut() });
    let (pa, pw, pt, pc) = (a.as_ptr(), w.as_ptr(), targets.as_ptr(), if s > 0 { colmap.as_ptr() } else { null() });
    unsafe { emu.launch([row_tiles, splits as u32, 1], dim(128), 0, || lse(pm, ps, pzy, pzc, pa, pw, pt, pc, m as u32, v as u32, h as u32, s as u32, cs.tiles_per_split as u32)) }.unwrap();

    // Pass 2.
    let mut lse_s = vec![f32::NAN; m];
    let mut lse_z = vec![f32::NAN; m];
    let mut crr_w = vec![f32::NAN; m];
    let mut mult = vec![f32::NAN; m * s];
    let mut qh = vec![f32::NAN; m * s];
    let mut dprobe = vec![f32::NAN; k * m * s];
    let mut rows = vec![f64::NAN; m * 3];
    let mut counts = vec![0u32; m * 2];
    let flags = row_flags(&p);
    let rows_k: RowsFn = emu.kernel("loss_rows");
    let sp = |x: &mut Vec<f32>| if s > 0 { x.as_mut_ptr() } else { null_mut() };
    let (o1, o2, o3, o4, o5) = (lse_s.as_mut_ptr(), lse_z.as_mut_ptr(), crr_w.as_mut_ptr(), sp(&mut mult), sp(&mut qh));
    let o6 = if k > 0 { dprobe.as_mut_ptr() } else { null_mut() };
    let (o7, o8) = (rows.as_mut_ptr(), counts.as_mut_ptr());
    let (i1, i2, i3, i4) = (pmax.as_ptr(), psum.as_ptr(), zy.as_ptr(), if s > 0 { zc.as_ptr() } else { null() });
    let i5 = if k > 0 { probe.as_ptr() } else { null() };
    let i6 = if s > 0 { rewards.as_ptr() } else { null() };
    let (i7, i8, i9) = (targets.as_ptr(), if s > 0 { tcol.as_ptr() } else { null() }, if s > 0 { item_u8.as_ptr() } else { null() });
    let scale = 1.0 / norm;
    unsafe {
        emu.launch([m as u32, 1, 1], dim(256), 0, || {
            rows_k(o1, o2, o3, o4, o5, o6, o7, o8, i1, i2, i3, i4, i5, i6, i7, i8, i9, m as u32, s as u32, k as u32, splits as u32, p.alpha as f64, p.beta as f64, p.lambda as f64, p.mu as f64, scale, flags)
        })
    }
    .unwrap();

    // Pass 3, chunk by chunk.
    let ld_max = cs.chunk.min(v).next_multiple_of(8);
    let mut dz = vec![0u16; m * ld_max];
    let mut dtrain = vec![f32::NAN; m * ntrain];
    let mut dnormed = vec![f32::NAN; m * h];
    let dl: DlogitsFn = emu.kernel("loss_dlogits_bf16");
    let dh: DhiddenFn = emu.kernel("loss_dhidden_bf16");
    let mut c0 = 0;
    while c0 < v {
        let vc = cs.chunk.min(v - c0);
        let ldz = vc.next_multiple_of(8);
        let (pdz, pdt) = (dz.as_mut_ptr(), if ntrain > 0 { dtrain.as_mut_ptr() } else { null_mut() });
        let ps = if ntrain > 0 { slotmap.as_ptr() } else { null() };
        let (l1, l2, l3) = (lse_s.as_ptr(), lse_z.as_ptr(), crr_w.as_ptr());
        let (m1, q1) = (if s > 0 { mult.as_ptr() } else { null() }, if s > 0 { qh.as_ptr() } else { null() });
        unsafe {
            emu.launch([row_tiles, ldz.div_ceil(64) as u32, 1], dim(128), 0, || {
                dl(pdz, pdt, pa, pw, pt, pc, ps, l1, l2, l3, m1, q1, m as u32, v as u32, h as u32, s as u32, ntrain as u32, c0 as u32, vc as u32, ldz as u32, scale as f32)
            })
        }
        .unwrap();
        let (pdn, pdz2) = (dnormed.as_mut_ptr(), dz.as_ptr());
        let pw0 = unsafe { w.as_ptr().add(c0 * h) };
        unsafe { emu.launch([row_tiles, h.div_ceil(64) as u32, 1], dim(128), 0, || dh(pdn, pdz2, pw0, m as u32, h as u32, vc as u32, ldz as u32, (c0 > 0) as u32)) }.unwrap();
        c0 += vc;
    }

    // Statistics as LossPlan::run sums them.
    let st = row_stats(&rows, &counts, targets, item, s > 0, &p, norm);
    Out { stats: st, dnormed, dtrain, dprobe }
}

fn loss_case(emu: &Emu, cs: Case, seed: u64) {
    let loss::Case { m, h, vocab, s, k, .. } = cs.base;
    // Inputs and the CPU reference as the self-test builds them (engine/backend/cuda/selftest/loss.rs).
    let d = loss::make(&mut Rng::new(seed), cs.base).unwrap();
    let got = run_fused(emu, &cs, &d.normed, &d.head, &d.targets, &d.item, &d.candidates, &d.trainable, &d.probe, &d.rewards, d.norm);
    let sv = |s: &LossStats| -> Vec<f32> { [s.loss, s.cpo, s.cpd, s.crr, s.ce].iter().map(|&v| v as f32).collect() };
    let label = format!("m {m} h {h} V {vocab} S {s} k {k}");
    println!("{label}: loss {:.6} (cpu {:.6}), |V_N| {} (cpu {})", got.stats.loss, d.stats.loss, got.stats.negatives, d.stats.negatives);
    // The loss terms are f32/f64 sums of the same bf16 products: held to 1e-4; the normed-row
    // gradient goes through a bf16 rounding of dz: 1e-2.
    check(&format!("{label}: loss terms"), &sv(&got.stats), &sv(&d.stats), 1e-4);
    assert_eq!((got.stats.item_rows, got.stats.negatives), (d.stats.item_rows, d.stats.negatives), "{label}: item rows and |V_N|");
    check(&format!("{label}: d normed"), &got.dnormed, &d.dnormed, 1e-2);
    check(&format!("{label}: d trainable columns"), &got.dtrain, &d.dtrain, 1e-4);
    check(&format!("{label}: d probe logits"), &got.dprobe, &d.dprobe, 1e-4);
}

#[test]
fn fused_loss_matches_the_cpu_loss() {
    let Some(emu) = common::emu::build("loss") else { return };
    let p = IlrecParams::default();
    let b = loss::Case { m: 37, h: 96, vocab: 301, s: 0, k: 0, ntrain: 7, params: p, all_ignored: false };
    let case = |base: loss::Case| Case { base, tiles_per_split: 2, chunk: 128 };
    loss_case(&emu, case(b), 1);
    loss_case(&emu, Case { chunk: 64, ..case(loss::Case { m: 70, h: 80, ntrain: 0, ..b }) }, 2);
    loss_case(&emu, case(loss::Case { s: 52, k: 3, ntrain: 13, ..b }), 3);
    loss_case(&emu, case(loss::Case { m: 29, vocab: 257, s: 40, k: 2, params: IlrecParams { alpha: 0.5, neg_weight: NegWeight::Logit, cpd_direction: CpdDirection::Reverse, ..p }, ..b }), 4);
    let final_neg = loss::Case { m: 23, s: 61, k: 4, params: IlrecParams { negatives: NegSource::Final, mu: 0.0, ..p }, ..b };
    loss_case(&emu, Case { base: final_neg, tiles_per_split: 1, chunk: 300 }, 5);
    loss_case(&emu, case(loss::Case { m: 17, s: 30, k: 3, all_ignored: true, ..b }), 6);
    // Another thread order: every shared-memory handoff must be behind a barrier.
    loss_case(&emu.with_schedule(Schedule::Shuffled(7)), case(loss::Case { m: 21, s: 33, k: 2, ..b }), 7);
}

// =============================================================================================
// probe.cu

type ProjectFn = unsafe extern "C" fn(
    *mut f32,
    *const f32,
    *const f32,
    *const f32,
    *const f32,
    *const f32,
    *const f32,
    *const f32,
    *const f32,
    *const u32,
    *const f32,
    *const u16,
    *const u32,
    u32,
    u32,
    u32,
    u32,
    f32,
);
type NormedFn = unsafe extern "C" fn(*mut f32, *const f32, *const f32, *const f32, *const f32, *const f32, *const f32, *const f32, *const f32, *const u32, *const f32, u32, u32, f32);
type NormBwdFn = unsafe extern "C" fn(
    *mut f32,
    *mut f32,
    *mut f32,
    *mut f32,
    *mut f32,
    *mut f32,
    *mut f32,
    *mut f32,
    *const f32,
    *const f32,
    *const f32,
    *const f32,
    *const f32,
    *const f32,
    *const f32,
    *const f32,
    *const f32,
    *const u32,
    *const f32,
    u32,
    u32,
    f32,
);

#[allow(clippy::too_many_arguments)]
fn probe_case(emu: &Emu, nl: usize, n: usize, m: usize, h: usize, v: usize, s: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    let eps = 1e-5f32;
    let xs: Vec<Vec<f32>> = (0..nl).map(|_| random(&mut rng, n * h, 1.0)).collect();
    let gamma: Vec<f32> = (0..h).map(|_| 0.5 + rng.next_f32()).collect();
    let head = held(&random(&mut rng, v * h, 2.0 / (h as f32).sqrt()));
    let pos: Vec<u32> = (0..m).map(|_| rng.below(n) as u32).collect();
    let cand = distinct(&mut rng, s, v);
    let dn = random(&mut rng, nl * m * h, 1.0);

    let rows_s: Vec<f32> = cand.iter().flat_map(|&t| head[t as usize * h..(t as usize + 1) * h].iter().copied()).collect();
    let mut z_ref = vec![0.0f32; nl * m * s];
    let mut nr_ref = vec![0.0f32; nl * m * h];
    let mut dx_ref = vec![0.0f32; nl * m * h];
    for (l, x) in xs.iter().enumerate() {
        let xr: Vec<f32> = pos.iter().flat_map(|&p| x[p as usize * h..(p as usize + 1) * h].iter().copied()).collect();
        let nr = &mut nr_ref[l * m * h..(l + 1) * m * h];
        rms_norm(nr, &xr, &gamma, eps);
        matmul_nt(&mut z_ref[l * m * s..(l + 1) * m * s], s, nr, h, &rows_s, h, m, s, h, false);
        rms_norm_backward(&mut dx_ref[l * m * h..(l + 1) * m * h], &dn[l * m * h..(l + 1) * m * h], &xr, &gamma, eps);
    }

    let w = to_bf16(&head);
    let xp: Vec<*const f32> = (0..8).map(|i| xs.get(i).map_or(null(), |x| x.as_ptr())).collect();
    let (pp, pg, pw, pc) = (pos.as_ptr(), gamma.as_ptr(), w.as_ptr(), cand.as_ptr());
    let label = format!("{nl} layers, n {n}, m {m}, h {h}, V {v}, S {s}");

    let mut z = vec![f32::NAN; nl * m * s];
    let pz = z.as_mut_ptr();
    let f: ProjectFn = emu.kernel("probe_project_bf16");
    let grid = [s.div_ceil(64) as u32, m.div_ceil(16) as u32, 1];
    unsafe { emu.launch(grid, dim(128), 0, || f(pz, xp[0], xp[1], xp[2], xp[3], xp[4], xp[5], xp[6], xp[7], pp, pg, pw, pc, m as u32, s as u32, h as u32, nl as u32, eps)) }.unwrap();
    check(&format!("probe_project_bf16 {label}"), &z, &z_ref, 1e-2);

    let mut nr = vec![f32::NAN; nl * m * h];
    let pn = nr.as_mut_ptr();
    let f: NormedFn = emu.kernel("probe_normed_f32");
    unsafe { emu.launch([m as u32, nl as u32, 1], dim(128), 0, || f(pn, xp[0], xp[1], xp[2], xp[3], xp[4], xp[5], xp[6], xp[7], pp, pg, m as u32, h as u32, eps)) }.unwrap();
    check(&format!("probe_normed_f32 {label}"), &nr, &nr_ref, 1e-5);

    let mut dx: Vec<Vec<f32>> = (0..nl).map(|_| vec![f32::NAN; m * h]).collect();
    let dp: Vec<*mut f32> = (0..8).map(|i| dx.get_mut(i).map_or(null_mut(), |d| d.as_mut_ptr())).collect();
    let pdn = dn.as_ptr();
    let f: NormBwdFn = emu.kernel("probe_norm_bwd_f32");
    unsafe {
        emu.launch([m as u32, nl as u32, 1], dim(128), 0, || {
            f(dp[0], dp[1], dp[2], dp[3], dp[4], dp[5], dp[6], dp[7], pdn, xp[0], xp[1], xp[2], xp[3], xp[4], xp[5], xp[6], xp[7], pp, pg, m as u32, h as u32, eps)
        })
    }
    .unwrap();
    check(&format!("probe_norm_bwd_f32 {label}"), &dx.concat(), &dx_ref, 1e-5);
}

#[test]
fn probe_kernels_match_the_cpu_probe_path() {
    let Some(emu) = common::emu::build("probe") else { return };
    probe_case(&emu, 3, 50, 37, 96, 1000, 61, 11);
    probe_case(&emu, 8, 40, 17, 80, 257, 52, 12);
    probe_case(&emu.with_schedule(Schedule::Descending), 1, 9, 5, 64, 100, 70, 13);
}
