//! kernels/lora.cu on the host emulator (kernels/emu/) against the CPU reference of the self-test
//! (engine/backend/cuda/selftest/lora.rs: `lin_fwd` / `lin_bwd`'s formulas on the CPU backend's
//! GEMMs, and f64 loops): the fused GEMM forward and input gradient with the low-rank product in
//! the loop and given, the down pass with and without dropout, on shapes that span two tiles, are
//! not multiples of 8 (element loads) and cover the rank capacities 16, 32 and 64. Launch shapes,
//! entry points and shared-memory sizes come from ops/lora.rs. The weight gradients go through
//! `matmul` (cuBLAS), which the emulator does not run. Skips (one line) without g++.
mod common;

use common::emu::{bf16_bits, bf16_f32, dim, Emu, Schedule};
use ilrec::backend::cuda::ops::lora::{down_kernel, down_smem_bytes, gemm_kernel, gemm_smem_bytes, DownFactor, LowRank};
use ilrec::backend::cuda::selftest::lora::{Case, Inputs, Reference};
use ilrec::backend::cuda::selftest::rel_err;
use ilrec::backend::cuda::Elem;
use ilrec::rng::Rng;
use std::ptr::{null, null_mut};

const TOL_BF16: f64 = 1e-2;

type GemmFn = unsafe extern "C" fn(
    *mut f32, *mut u16, *const u16, *const u16, *const u16, *const u16, *const f32, *const u8, f32, u32, u32, u32, u32, f32, f32, i32, i32, i32,
);
type DownFn<T> = unsafe extern "C" fn(*mut u16, *mut u16, *const T, *const u8, f32, *const u16, u32, u32, u32, f32, i32);

fn bf16(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| bf16_bits(x)).collect()
}

fn unbf16(v: &[u16]) -> Vec<f32> {
    v.iter().map(|&b| bf16_f32(b)).collect()
}

#[track_caller]
fn check(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = rel_err(got, want);
    println!("{what}: rel err {e:.3e}");
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:e}");
}

const CASES: [Case; 5] = [
    // Two row tiles and two column tiles, every length a multiple of 8 (cp.async), bias.
    Case { m: 130, k: 96, n: 136, r: 16, p: 0.0, bias: true },
    // Nothing a multiple of 8 (element loads), rank 12 in the 16 capacity, dropout and bias.
    Case { m: 37, k: 131, n: 93, r: 12, p: 0.1, bias: true },
    // Rank 64 with dropout: two column chunks of T per warp.
    Case { m: 33, k: 64, n: 40, r: 64, p: 0.05, bias: false },
    // Rank 32, K shorter than two k-tiles.
    Case { m: 20, k: 40, n: 24, r: 32, p: 0.0, bias: false },
    // One row, rank 4 (the model check's adapter).
    Case { m: 1, k: 64, n: 40, r: 4, p: 0.0, bias: false },
];

/// Launches `lora_gemm_*` as `ops::lora::fused` does.
#[allow(clippy::too_many_arguments)]
fn gemm(k: &Emu, backward: bool, low: LowRank, c: &mut [f32], t: &mut [u16], p: &[u16], q: &[u16], rw: &[u16], s: &[u16], bias: Option<&[f32]>, mask: Option<&[u8]>, keep: f32, dims: (usize, usize, usize, usize), scales: (f32, f32), accumulate: bool) {
    let (m, nc, kr, r) = dims;
    let name = gemm_kernel(backward, low, r);
    let f: GemmFn = k.kernel(name);
    let vec = kr % 8 == 0 && nc % 8 == 0 && r % 8 == 0;
    let (pc, pt, pp, pq, ps) = (c.as_mut_ptr(), t.as_mut_ptr(), p.as_ptr(), q.as_ptr(), s.as_ptr());
    let prw = if low == LowRank::InLoop { rw.as_ptr() } else { null() };
    let pb = bias.map_or(null(), |b| b.as_ptr());
    let pm = mask.map_or(null(), |m| m.as_ptr());
    let grid = [nc.div_ceil(128) as u32, m.div_ceil(128) as u32, 1];
    let (m32, n32, k32, r32) = (m as u32, nc as u32, kr as u32, r as u32);
    let write_t = (low == LowRank::InLoop) as i32;
    unsafe {
        k.launch(grid, dim(256), gemm_smem_bytes(r, low), || {
            f(pc, pt, pp, pq, prw, ps, pb, pm, keep, m32, n32, k32, r32, scales.0, scales.1, accumulate as i32, write_t, vec as i32)
        })
    }
    .unwrap_or_else(|e| panic!("{name} {dims:?}: {e}"));
}

/// Launches `lora_down_*` as `ops::lora::down` does.
#[allow(clippy::too_many_arguments)]
fn down<T: Copy>(k: &Emu, layout: DownFactor, input: Elem, t: &mut [u16], xo: Option<&mut [u16]>, x: &[T], mask: Option<&[u8]>, keep: f32, factor: &[u16], dims: (usize, usize, usize), scale: f32) {
    let (m, kk, r) = dims;
    let name = down_kernel(layout, input, r).expect("a down kernel for these types");
    let f: DownFn<T> = k.kernel(name);
    let vec = kk % 8 == 0 && r % 8 == 0;
    let (pt, px, pf) = (t.as_mut_ptr(), x.as_ptr(), factor.as_ptr());
    let po = xo.map_or(null_mut(), |o| o.as_mut_ptr());
    let pm = mask.map_or(null(), |m| m.as_ptr());
    let (m32, k32, r32) = (m as u32, kk as u32, r as u32);
    unsafe { k.launch([m.div_ceil(64) as u32, 1, 1], dim(128), down_smem_bytes(r), || f(pt, po, px, pm, keep, pf, m32, k32, r32, scale, vec as i32)) }
        .unwrap_or_else(|e| panic!("{name} {dims:?}: {e}"));
}

fn run(k: &Emu, cs: Case, rng: &mut Rng) {
    let Case { m, k: kd, n, r, p, bias } = cs;
    let label = format!("m{m} k{kd} n{n} r{r} p{p}{}", if bias { " bias" } else { "" });
    let d = Inputs::new(cs, rng);
    let rf = Reference::new(cs, &d);
    let s = d.scale;
    let (x16, w16, a16, b16, dy16) = (bf16(&d.x), bf16(&d.w), bf16(&d.a), bf16(&d.b), bf16(&d.dy));
    let mask = (p > 0.0).then_some(d.kept.as_slice());
    let bias_v = bias.then_some(d.bias.as_slice());
    let poison = |len: usize| vec![0xFFFFu16; len];

    // Forward down pass: from the f32 input with dropout (also writing bf16(x * mask)), else from
    // the bf16 copy.
    let mut u = poison(m * r);
    let mut xd = poison(m * kd);
    if p > 0.0 {
        down(k, DownFactor::RowsAreRank, Elem::F32, &mut u, Some(&mut xd), &d.x, mask, d.keep, &a16, (m, kd, r), 1.0);
        assert_eq!(unbf16(&xd), rf.xd, "{label}: bf16(x * mask) differs from the host's rounding");
    } else {
        down(k, DownFactor::RowsAreRank, Elem::BF16, &mut u, None, &x16, None, 1.0, &a16, (m, kd, r), 1.0);
    }
    check(&format!("{label} down: u"), &unbf16(&u), &rf.u, TOL_BF16);

    let lows: &[LowRank] = if p > 0.0 { &[LowRank::Given] } else { &[LowRank::InLoop, LowRank::Given] };
    for &low in lows {
        let mut y = vec![f32::NAN; m * n];
        let mut u_loop = poison(m * r);
        let t = if low == LowRank::Given { &mut u } else { &mut u_loop };
        gemm(k, false, low, &mut y, t, &x16, &w16, &a16, &b16, bias_v, None, 1.0, (m, n, kd, r), (1.0, s), false);
        check(&format!("{label} fwd {low:?}: y"), &y, &rf.y, TOL_BF16);
        check(&format!("{label} fwd {low:?}: y vs f64"), &y, &rf.y64, TOL_BF16);
        if low == LowRank::InLoop {
            check(&format!("{label} fwd {low:?}: u"), &unbf16(t), &rf.u, TOL_BF16);
        }
    }

    // Backward: du and bf16(dy) from one pass over the f32 dy; dx given du or computing it.
    let mut du = poison(m * r);
    let mut dy_out = poison(m * n);
    down(k, DownFactor::ColsAreRank, Elem::F32, &mut du, Some(&mut dy_out), &d.dy, None, 1.0, &b16, (m, n, r), s);
    assert_eq!(unbf16(&dy_out), rf.dy, "{label}: bf16(dy) differs from the host's rounding");
    check(&format!("{label} down: du"), &unbf16(&du), &rf.du, TOL_BF16);
    for low in [LowRank::Given, LowRank::InLoop] {
        let mut dx = d.dx0.clone();
        let mut du_loop = poison(m * r);
        let t = if low == LowRank::Given { &mut du } else { &mut du_loop };
        gemm(k, true, low, &mut dx, t, &dy16, &w16, &b16, &a16, None, mask, d.keep, (m, kd, n, r), (s, 1.0), true);
        check(&format!("{label} bwd {low:?}: dx"), &dx, &rf.dx, TOL_BF16);
        check(&format!("{label} bwd {low:?}: dx vs f64"), &dx, &rf.dx64, TOL_BF16);
        if low == LowRank::InLoop {
            check(&format!("{label} bwd {low:?}: du"), &unbf16(t), &rf.du, TOL_BF16);
        }
    }
}

#[test]
fn lora_kernels_match_cpu() {
    let Some(k) = common::emu::build("lora") else { return };
    let mut rng = Rng::new(17);
    for cs in CASES {
        run(&k, cs, &mut rng);
    }
    // Every shared-memory handoff is behind a barrier: another thread order, same results.
    run(&k.with_schedule(Schedule::Descending), CASES[1], &mut rng);
    run(&k.with_schedule(Schedule::Shuffled(7)), CASES[2], &mut rng);
}
