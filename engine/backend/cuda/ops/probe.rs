//! Launchers for kernels/probe.cu: ILRec's intermediate-layer probes for up to [`MAX_LAYERS`]
//! blocks per launch (more are run in groups), the final RMSNorm fused into the projection onto
//! the candidate LM-head rows, and the two row kernels the backward of L_CPD needs.
//! CPU reference: engine/train/backprop.rs (`gather_rows`, `cpu::rms_norm`, `matmul_nt` onto
//! `Model::gather_head_rows`, `cpu::rms_norm_backward`).
//!
//! Rows and candidates travel as [`Ids`], checked on the host against the table they index, so
//! the kernels' unchecked reads stay inside their tables.
use super::loss::Ids;
use super::{bad, expect_elem, expect_len, launch, u32_of, Ops};
use crate::backend::cuda::{Arg, Cuda, DeviceTensor, Elem, Launch, MAX_GRID_YZ};
use crate::error::Result;

const STEM: &str = "probe";

/// Layers one launch of the probe kernels takes (its pointer arguments).
pub const MAX_LAYERS: usize = 8;

/// Candidate columns and rows per block of `probe_project_bf16`.
const TILE_N: usize = 64;
const TILE_M: usize = 16;

/// `[n, h]` of every layer (all f32, one shape) and `h`, checked for the 16-byte loads.
fn layer_dims(kernel: &str, layers: &[&DeviceTensor], gamma: &DeviceTensor, pos: &Ids, all: &[(&str, &DeviceTensor)]) -> Result<usize> {
    let Some(first) = layers.first() else {
        return Err(bad(kernel, all, "no probed layer given"));
    };
    let (n, h) = match first.shape() {
        [n, h] => (*n, *h),
        s => return Err(bad(kernel, all, format!("layer outputs must be [n, h], got {s:?}"))),
    };
    for (i, l) in layers.iter().enumerate() {
        expect_elem(kernel, "layer output", l, &[Elem::F32], all)?;
        if l.shape() != first.shape() {
            return Err(bad(kernel, all, format!("layer output {i} has shape {:?}, the first {:?}", l.shape(), first.shape())));
        }
    }
    if h == 0 || h % 8 != 0 {
        return Err(bad(kernel, all, format!("hidden size {h} must be a positive multiple of 8 (16-byte row loads)")));
    }
    expect_elem(kernel, "gamma", gamma, &[Elem::F32], all)?;
    expect_len(kernel, "gamma", gamma, h, all)?;
    if pos.bound() != n {
        return Err(bad(kernel, all, format!("row indices were checked against {} rows, the layer outputs have {n}", pos.bound())));
    }
    Ok(h)
}

/// Eight pointer arguments: the given tensors' and null for the rest.
fn ptrs8(ts: &[&DeviceTensor]) -> [Arg; MAX_LAYERS] {
    std::array::from_fn(|i| Arg::Ptr(ts.get(i).map_or(0, |t| t.ptr())))
}

/// `z[l, r, j] = RMSNorm_final(layers[l][pos[r]]) · head[cand[j]]`: `z` `[L, m, S]` f32, each
/// layer `[n, h]` f32 (a probed block's output), `gamma` `[h]` f32 (the final norm), `head`
/// `[V, h]` bf16, `pos` (`m` rows, checked `< n`), `cand` (`S` ids, checked `< V`).
#[allow(clippy::too_many_arguments)]
pub fn probe_project(cuda: &Cuda, z: &mut DeviceTensor, layers: &[&DeviceTensor], pos: &Ids, gamma: &DeviceTensor, head: &DeviceTensor, cand: &Ids, eps: f32) -> Result<()> {
    const K: &str = "probe_project_bf16";
    let mut all: Ops = vec![("z", &*z), ("gamma", gamma), ("head", head), ("pos", pos.tensor()), ("cand", cand.tensor())];
    all.extend(layers.iter().map(|l| ("layer", *l)));
    let h = layer_dims(K, layers, gamma, pos, &all)?;
    expect_elem(K, "head", head, &[Elem::BF16], &all)?;
    if head.shape().len() != 2 || head.shape()[1] != h || head.shape()[0] != cand.bound() {
        return Err(bad(K, &all, format!("head must be [V, {h}] with V = {} (the bound the candidates were checked against)", cand.bound())));
    }
    let (m, s, nl) = (pos.len(), cand.len(), layers.len());
    expect_elem(K, "z", z, &[Elem::F32], &all)?;
    expect_len(K, "z", z, nl * m * s, &all)?;
    if m == 0 || s == 0 {
        return Ok(());
    }
    let gy = m.div_ceil(TILE_M);
    if gy > MAX_GRID_YZ {
        return Err(bad(K, &all, format!("{m} rows need {gy} row tiles, more than grid.y allows ({MAX_GRID_YZ})")));
    }
    let gx = u32_of(K, "candidate tiles", s.div_ceil(TILE_N), &all)?;
    let cfg = Launch { grid: (gx, gy as u32, 1), block: (128, 1, 1), shared_bytes: 0 };
    for (g, group) in layers.chunks(MAX_LAYERS).enumerate() {
        let mut args = vec![Arg::Ptr(z.ptr() + (g * MAX_LAYERS * m * s * 4) as u64)];
        args.extend(ptrs8(group));
        args.extend([
            Arg::Ptr(pos.tensor().ptr()),
            Arg::Ptr(gamma.ptr()),
            Arg::Ptr(head.ptr()),
            Arg::Ptr(cand.tensor().ptr()),
            Arg::U32(m as u32),
            Arg::U32(s as u32),
            Arg::U32(h as u32),
            Arg::U32(group.len() as u32),
            Arg::F32(eps),
        ]);
        // SAFETY: the arguments follow probe_project_bf16's signature; z holds L * m * S f32 and
        // this group writes its layers' [m, S] slices (offset g * 8 * m * S elements); each layer
        // is [n, h] f32 and pos entries are < n, cand entries < V = head rows (checked by `Ids`);
        // h % 8 == 0 keeps the 16-byte loads inside rows.
        unsafe { launch(cuda, STEM, K, cfg, &args, &all)? };
    }
    Ok(())
}

/// `out[l, r] = RMSNorm_final(layers[l][pos[r]])` (`[L, m, h]` f32): the normed probe rows the
/// LM-head row gradients multiply.
pub fn probe_normed(cuda: &Cuda, out: &mut DeviceTensor, layers: &[&DeviceTensor], pos: &Ids, gamma: &DeviceTensor, eps: f32) -> Result<()> {
    const K: &str = "probe_normed_f32";
    let mut all: Ops = vec![("out", &*out), ("gamma", gamma), ("pos", pos.tensor())];
    all.extend(layers.iter().map(|l| ("layer", *l)));
    let h = layer_dims(K, layers, gamma, pos, &all)?;
    let m = pos.len();
    expect_elem(K, "out", out, &[Elem::F32], &all)?;
    expect_len(K, "out", out, layers.len() * m * h, &all)?;
    let rows = u32_of(K, "rows", m, &all)?;
    if m == 0 {
        return Ok(());
    }
    for (g, group) in layers.chunks(MAX_LAYERS).enumerate() {
        let cfg = Launch { grid: (rows, group.len() as u32, 1), block: (128, 1, 1), shared_bytes: 0 };
        let mut args = vec![Arg::Ptr(out.ptr() + (g * MAX_LAYERS * m * h * 4) as u64)];
        args.extend(ptrs8(group));
        args.extend([Arg::Ptr(pos.tensor().ptr()), Arg::Ptr(gamma.ptr()), Arg::U32(rows), Arg::U32(h as u32), Arg::F32(eps)]);
        // SAFETY: probe_normed_f32's signature; block (r, l) reads layer l's row pos[r] (< n,
        // checked) and writes row r of the group's [m, h] slice of out (L * m * h f32).
        unsafe { launch(cuda, STEM, K, cfg, &args, &all)? };
    }
    Ok(())
}

/// The RMSNorm backward of the probe rows: `dx[l]` (`[m, h]` f32, overwritten) = the gradient at
/// `layers[l][pos[r]]` of `dn[l, r]` (`[L, m, h]` f32, the gradient w.r.t. the normed rows).
pub fn probe_norm_backward(cuda: &Cuda, dx: &mut [DeviceTensor], dn: &DeviceTensor, layers: &[&DeviceTensor], pos: &Ids, gamma: &DeviceTensor, eps: f32) -> Result<()> {
    const K: &str = "probe_norm_bwd_f32";
    let mut all: Ops = vec![("dn", dn), ("gamma", gamma), ("pos", pos.tensor())];
    all.extend(layers.iter().map(|l| ("layer", *l)));
    all.extend(dx.iter().map(|d| ("dx", d)));
    let h = layer_dims(K, layers, gamma, pos, &all)?;
    let m = pos.len();
    if dx.len() != layers.len() {
        return Err(bad(K, &all, format!("{} gradient outputs for {} layers", dx.len(), layers.len())));
    }
    for d in dx.iter() {
        expect_elem(K, "dx", d, &[Elem::F32], &all)?;
        expect_len(K, "dx", d, m * h, &all)?;
    }
    expect_elem(K, "dn", dn, &[Elem::F32], &all)?;
    expect_len(K, "dn", dn, layers.len() * m * h, &all)?;
    let rows = u32_of(K, "rows", m, &all)?;
    if m == 0 {
        return Ok(());
    }
    let dx_ptrs: Vec<u64> = dx.iter().map(|d| d.ptr()).collect();
    for (g, group) in layers.chunks(MAX_LAYERS).enumerate() {
        let cfg = Launch { grid: (rows, group.len() as u32, 1), block: (128, 1, 1), shared_bytes: 0 };
        let mut args: Vec<Arg> = (0..MAX_LAYERS).map(|i| Arg::Ptr(dx_ptrs.get(g * MAX_LAYERS + i).copied().filter(|_| i < group.len()).unwrap_or(0))).collect();
        args.push(Arg::Ptr(dn.ptr() + (g * MAX_LAYERS * m * h * 4) as u64));
        args.extend(ptrs8(group));
        args.extend([Arg::Ptr(pos.tensor().ptr()), Arg::Ptr(gamma.ptr()), Arg::U32(rows), Arg::U32(h as u32), Arg::F32(eps)]);
        // SAFETY: probe_norm_bwd_f32's signature; block (r, l) reads row pos[r] (< n) of layer l
        // and row r of the group's slice of dn, and writes row r of dx[l] ([m, h] f32 each).
        unsafe { launch(cuda, STEM, K, cfg, &args, &all)? };
    }
    Ok(())
}

/// Device times (milliseconds, median of `iters` after a warm-up, each followed by a sync) of
/// ILRec's probes over `hidden` (the probed blocks' outputs, `[n, h]` each): the fused kernel for
/// all layers at once onto the `subset` head rows, against the naive logit lens (RMSNorm, then a
/// bf16 GEMM against the LM head, one layer at a time) over the full vocabulary and the subset.
pub struct ProbeCost {
    pub fused_ms: f64,
    pub naive_full_ms: f64,
    pub naive_subset_ms: f64,
}

/// Measures [`ProbeCost`] on `dm` (bf16 weights); `eps` is the model's RMSNorm epsilon.
pub fn probe_cost(dm: &crate::backend::cuda::model::CudaModel, hidden: &[Vec<f32>], n: usize, subset: &[u32], eps: f32, iters: usize) -> Result<ProbeCost> {
    use super::{elementwise as ew, embedding};
    use crate::error::Error;
    let cu = dm.cuda();
    if dm.weights() != Elem::BF16 {
        return Err(Error::Input("probe cost: the fused probe needs bf16 weights".into()));
    }
    let h = dm.final_norm().numel();
    let vocab = dm.head().shape()[0];
    let layers: Vec<DeviceTensor> = hidden.iter().map(|x| DeviceTensor::from_f32(cu, &[n, h], x, "probed block output")).collect::<Result<_>>()?;
    let refs: Vec<&DeviceTensor> = layers.iter().collect();
    let rows: Vec<u32> = (0..n as u32).collect();
    let pos = Ids::new(cu, &rows, n, false, "probe rows")?;
    let cand = Ids::new(cu, subset, vocab, false, "probe subset")?;
    let mut rows_s = DeviceTensor::empty(cu, &[subset.len(), h], Elem::BF16, "subset head rows")?;
    embedding::gather(cu, &mut rows_s, dm.head(), cand.tensor())?;
    let mut z = DeviceTensor::empty(cu, &[layers.len(), n, subset.len()], Elem::F32, "probe logits")?;
    let time = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        f()?;
        cu.sync()?;
        let mut t = Vec::with_capacity(iters.max(1));
        for _ in 0..iters.max(1) {
            let s = std::time::Instant::now();
            f()?;
            cu.sync()?;
            t.push(s.elapsed().as_secs_f64() * 1e3);
        }
        t.sort_by(f64::total_cmp);
        Ok(t[t.len() / 2])
    };
    let fused_ms = time(&mut || probe_project(cu, &mut z, &refs, &pos, dm.final_norm(), dm.head(), &cand, eps))?;
    let naive = |head_rows: &DeviceTensor| -> Result<()> {
        for x in &refs {
            let mut normed = DeviceTensor::empty(cu, &[n, h], Elem::F32, "normed rows")?;
            ew::rms_norm(cu, &mut normed, x, dm.final_norm(), None, eps)?;
            drop(dm.logits_of(&normed, n, head_rows)?);
        }
        Ok(())
    };
    let naive_full_ms = time(&mut || naive(dm.head()))?;
    let naive_subset_ms = time(&mut || naive(&rows_s))?;
    Ok(ProbeCost { fused_ms, naive_full_ms, naive_subset_ms })
}
