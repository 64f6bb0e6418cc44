//! One training micro-batch on the GPU: engine/train/backprop.rs's `forward_backward` step for
//! step (same tape, same LoRA wiring, same dropout draws from the same generator), with the
//! activations, the tape and the gradients on the device. The objective itself (SFT or ILRec)
//! runs on the host on the downloaded response-row logits (`m x vocab` and `m x S`, never the whole
//! batch's), through the same `sft_loss` / `ilrec_loss` the CPU uses, and its logit gradients go
//! back up: the simple correct version the fused loss kernel (the ILRec kernels issue) replaces.
//!
//! Status: compiled, unverified on GPU (checked by `ilrec selftest --full` against the CPU).
use super::model::{CudaModel, DLinear, GemmIn};
use super::ops::lora::{self as lora_ops, DownFactor, Dropout, LowRank};
use super::ops::loss::{Ids, IlrecInputs, LossPlan};
use super::ops::{attention, elementwise as ew, embedding, kv, matmul, optim, probe, Gemm};
use super::{Cuda, DeviceTensor, Elem};
use crate::backend::cpu::AttentionShape;
use crate::error::{Error, Result};
use crate::model::{positions, Model};
use crate::rng::Rng;
use crate::train::backprop::{check_micro_batch, Grads, Objective, TrainBatch};
use crate::train::lora::{Lora, Target};
use crate::train::loss::{ilrec_loss, sft_loss, LossRows, LossStats};

/// A LoRA pair on the device with its gradient buffers.
struct DPair {
    a: DeviceTensor,
    b: DeviceTensor,
    ga: DeviceTensor,
    gb: DeviceTensor,
    rank: usize,
    /// bf16 copies of `a` and `b` for the fused kernels, made at the pair's first fused use; valid
    /// until the parameters change (`ResidentParams::clip_and_step` drops them).
    a16: Option<DeviceTensor>,
    b16: Option<DeviceTensor>,
}

impl DPair {
    fn bf16_copies(&mut self, cu: &Cuda) -> Result<()> {
        if self.a16.is_none() {
            let mut a16 = DeviceTensor::empty(cu, self.a.shape(), Elem::BF16, "LoRA A (bf16)")?;
            ew::cast(cu, &mut a16, &self.a)?;
            let mut b16 = DeviceTensor::empty(cu, self.b.shape(), Elem::BF16, "LoRA B (bf16)")?;
            ew::cast(cu, &mut b16, &self.b)?;
            (self.a16, self.b16) = (Some(a16), Some(b16));
        }
        Ok(())
    }
}

/// What a linear's LoRA branch keeps for the backward.
struct LinTape {
    /// `drop(x) A^T`, `[n, r]` (bf16 on the fused path).
    u: DeviceTensor,
    /// Dropout on the branch input, `[n, in]`: f32 multipliers, or u8 keep flags on the fused path.
    drop: Option<DeviceTensor>,
    /// Fused path (kernels/lora.cu) or the separate GEMMs.
    fused: bool,
    /// Fused path with dropout: `bf16(drop(x))`, the input of `dA`.
    xd: Option<DeviceTensor>,
}

struct BlockTape {
    x_in: DeviceTensor,
    h1: DeviceTensor,
    q: DeviceTensor,
    k_h: DeviceTensor,
    v_h: DeviceTensor,
    attn: DeviceTensor,
    lse: DeviceTensor,
    x_mid: DeviceTensor,
    h2: DeviceTensor,
    gate: DeviceTensor,
    up: DeviceTensor,
    act: DeviceTensor,
    lin: [Option<LinTape>; 7],
}

struct Ctx<'a> {
    dm: &'a CudaModel,
    cu: &'a Cuda,
    pairs: Vec<[Option<DPair>; 7]>,
    scale: f32,
    dropout: f32,
}

fn f32t(cu: &Cuda, shape: &[usize], what: &str) -> Result<DeviceTensor> {
    DeviceTensor::empty(cu, shape, Elem::F32, what)
}

fn zeros(cu: &Cuda, shape: &[usize], what: &str) -> Result<DeviceTensor> {
    DeviceTensor::zeros(cu, shape, Elem::F32, what)
}

impl Ctx<'_> {
    /// `y = x W^T + b + s (drop(x) A^T) B^T` (lin_fwd in backprop.rs).
    fn lin_fwd(&mut self, block: usize, t: Target, base: &DLinear, x_in: &GemmIn<'_>, n: usize, rng: &mut Rng) -> Result<(DeviceTensor, Option<LinTape>)> {
        let cu = self.cu;
        if self.fused_fits(block, t) {
            return self.lin_fwd_fused(block, t, base, x_in, n, rng);
        }
        let mut y = f32t(cu, &[n, base.out_dim], "linear output")?;
        self.dm.linear(&mut y, x_in, base)?;
        let x = x_in.f32;
        let Some(p) = self.pairs[block][t.index()].as_ref() else { return Ok((y, None)) };
        let in_dim = x.numel() / n;
        // The CPU draws the mask element by element from the same generator, in the same order.
        let drop = if self.dropout > 0.0 {
            let keep = 1.0 / (1.0 - self.dropout);
            let m: Vec<f32> = (0..n * in_dim).map(|_| if rng.next_f32() < self.dropout { 0.0 } else { keep }).collect();
            Some(DeviceTensor::from_f32(cu, &[n, in_dim], &m, "LoRA dropout mask")?)
        } else {
            None
        };
        let xd = dropped(cu, x, drop.as_ref())?;
        let mut u = f32t(cu, &[n, p.rank], "LoRA u = drop(x) A^T")?;
        matmul(cu, &mut u, xd.as_ref().unwrap_or(x), &p.a, Gemm::NT)?;
        matmul(cu, &mut y, &u, &p.b, Gemm::NT.scaled(self.scale).accumulate())?;
        Ok((y, Some(LinTape { u, drop, fused: false, xd: None })))
    }

    /// Whether this linear's adapter takes the fused kernels (kernels/lora.cu): bf16 weights (so
    /// bf16 GEMM inputs) and a rank they cover. f32 weights keep the separate f32 GEMMs.
    fn fused_fits(&self, block: usize, t: Target) -> bool {
        self.dm.weights() == Elem::BF16 && self.pairs[block][t.index()].as_ref().is_some_and(|p| p.rank <= lora_ops::MAX_RANK)
    }

    /// `lin_fwd` through the fused kernel: the base GEMM with the low-rank term in its epilogue.
    /// With dropout the down pass reads the f32 input once, applies the mask and writes
    /// `bf16(drop(x))` (kept for `dA`) and `u`; without, `u` comes from the GEMM's main loop or from
    /// that pass, whichever `forward_low_rank` predicts cheaper.
    fn lin_fwd_fused(&mut self, block: usize, t: Target, base: &DLinear, x_in: &GemmIn<'_>, n: usize, rng: &mut Rng) -> Result<(DeviceTensor, Option<LinTape>)> {
        let (cu, scale, dropout) = (self.cu, self.scale, self.dropout);
        let p = self.pairs[block][t.index()].as_mut().ok_or_else(|| Error::Input(format!("no LoRA pair at block {block} {t:?}")))?;
        p.bf16_copies(cu)?;
        let (Some(a16), Some(b16)) = (p.a16.as_ref(), p.b16.as_ref()) else { return Err(missing_copies()) };
        let x = x_in.get();
        let in_dim = x.numel() / n;
        // The CPU's draws, element by element in the same order; a u8 flag per element.
        let keep = 1.0 / (1.0 - dropout);
        let mask = if dropout > 0.0 {
            let m: Vec<u8> = (0..n * in_dim).map(|_| u8::from(rng.next_f32() >= dropout)).collect();
            Some(DeviceTensor::from_u8(cu, &[n, in_dim], &m, "LoRA dropout keep flags")?)
        } else {
            None
        };
        let drop = mask.as_ref().map(|m| Dropout { mask: m, keep });
        let mut y = f32t(cu, &[n, base.out_dim], "linear output")?;
        let mut u = DeviceTensor::empty(cu, &[n, p.rank], Elem::BF16, "LoRA u = drop(x) A^T")?;
        let low = lora_ops::forward_low_rank(p.rank, base.out_dim, drop.is_some());
        let mut xd = None;
        if low == LowRank::Given {
            if drop.is_some() {
                let mut x_dropped = DeviceTensor::empty(cu, &[n, in_dim], Elem::BF16, "LoRA dropped input")?;
                lora_ops::down(cu, &mut u, Some(&mut x_dropped), x_in.f32, drop, a16, DownFactor::RowsAreRank, 1.0)?;
                xd = Some(x_dropped);
            } else {
                lora_ops::down(cu, &mut u, None, x, None, a16, DownFactor::RowsAreRank, 1.0)?;
            }
        }
        lora_ops::forward(cu, low, &mut y, &mut u, x, &base.w, a16, b16, base.b.as_ref(), scale)?;
        Ok((y, Some(LinTape { u, drop: mask, fused: true, xd })))
    }

    /// `lin_bwd` through the fused kernels: one pass over the f32 `dy` makes its bf16 copy and
    /// `du = s dy B`; the input gradient takes `du A` (masked) in its epilogue; `dA`, `dB` are the
    /// skinny products of `weight_grads`.
    #[allow(clippy::too_many_arguments)]
    fn lin_bwd_fused(&mut self, block: usize, t: Target, base: &DLinear, x: &DeviceTensor, tp: &LinTape, dy: &DeviceTensor, n: usize, dx: &mut DeviceTensor) -> Result<()> {
        let (cu, dm, scale) = (self.cu, self.dm, self.scale);
        let keep = 1.0 / (1.0 - self.dropout);
        let p = self.pairs[block][t.index()].as_mut().ok_or_else(|| Error::Input(format!("no LoRA pair at block {block} {t:?}")))?;
        p.bf16_copies(cu)?;
        let DPair { a16: Some(a16), b16: Some(b16), ga, gb, rank, .. } = p else { return Err(missing_copies()) };
        let out_dim = dy.numel() / n;
        let mut dy16 = DeviceTensor::empty(cu, &[n, out_dim], Elem::BF16, "bf16 GEMM input")?;
        let mut du = DeviceTensor::empty(cu, &[n, *rank], Elem::BF16, "LoRA du")?;
        lora_ops::down(cu, &mut du, Some(&mut dy16), dy, None, b16, DownFactor::ColsAreRank, scale)?;
        let drop = tp.drop.as_ref().map(|m| Dropout { mask: m, keep });
        lora_ops::backward_dx(cu, LowRank::Given, dx, &mut du, &dy16, &base.w, a16, b16, drop, scale, true)?;
        let recast;
        let xd = match &tp.xd {
            Some(xd) => xd,
            None => {
                recast = dm.gemm_input(x, n)?.ok_or_else(|| Error::Input("fused LoRA backward needs bf16 weights".into()))?;
                &recast
            }
        };
        lora_ops::weight_grads(cu, ga, gb, &du, xd, &dy16, &tp.u, scale)
    }

    /// Backward of `lin_fwd`: adds `dL/dx` into `dx` and the LoRA gradients into the pair.
    #[allow(clippy::too_many_arguments)]
    fn lin_bwd(&mut self, block: usize, t: Target, base: &DLinear, x: &DeviceTensor, tape: &Option<LinTape>, dy: &DeviceTensor, n: usize, dx: &mut DeviceTensor) -> Result<()> {
        let cu = self.cu;
        if let Some(tp) = tape.as_ref().filter(|tp| tp.fused) {
            return self.lin_bwd_fused(block, t, base, x, tp, dy, n, dx);
        }
        let dy_in = self.dm.gemm_input(dy, n)?;
        matmul(cu, dx, dy_in.as_ref().unwrap_or(dy), &base.w, Gemm::NN.accumulate())?;
        let (Some(p), Some(tp)) = (self.pairs[block][t.index()].as_mut(), tape) else { return Ok(()) };
        // dB += s dy^T u ; du = s dy B ; dA += du^T drop(x) ; dx += drop(du A)
        matmul(cu, &mut p.gb, dy, &tp.u, Gemm::TN.scaled(self.scale).accumulate())?;
        let mut du = f32t(cu, &[n, p.rank], "LoRA du")?;
        matmul(cu, &mut du, dy, &p.b, Gemm::NN.scaled(self.scale))?;
        let xd = dropped(cu, x, tp.drop.as_ref())?;
        matmul(cu, &mut p.ga, &du, xd.as_ref().unwrap_or(x), Gemm::TN.accumulate())?;
        match &tp.drop {
            None => matmul(cu, dx, &du, &p.a, Gemm::NN.accumulate()).map(|_| ()),
            Some(m) => {
                let mut dxd = f32t(cu, dx.shape(), "LoRA input gradient")?;
                matmul(cu, &mut dxd, &du, &p.a, Gemm::NN)?;
                kv::mul_inplace(cu, &mut dxd, m)?;
                ew::add_inplace(cu, dx, &dxd)
            }
        }
    }
}

fn missing_copies() -> Error {
    Error::Device("LoRA pair without its bf16 copies after bf16_copies".into())
}

/// `x * mask` as a new tensor, or `None` (use `x`) without dropout.
fn dropped(cu: &Cuda, x: &DeviceTensor, mask: Option<&DeviceTensor>) -> Result<Option<DeviceTensor>> {
    let Some(m) = mask else { return Ok(None) };
    let mut xd = x.try_clone("LoRA dropped input")?;
    kv::mul_inplace(cu, &mut xd, m)?;
    Ok(Some(xd))
}

/// Scatter lists mapping row `positions[i]` of an `[n, h]` tensor to row `i` of an `[m, h]` one,
/// in the CSR form of `embedding::scatter_add_csr` (every position is one slot).
fn row_scatter_lists(cu: &Cuda, positions: &[usize], n: usize) -> Result<(DeviceTensor, DeviceTensor)> {
    let mut count = vec![0u32; n + 1];
    for &p in positions {
        count[p + 1] += 1;
    }
    for i in 0..n {
        count[i + 1] += count[i];
    }
    let mut fill = count.clone();
    let mut list = vec![0u32; positions.len()];
    for (i, &p) in positions.iter().enumerate() {
        list[fill[p] as usize] = i as u32;
        fill[p] += 1;
    }
    Ok((DeviceTensor::from_u32(cu, &[n + 1], &count, "row scatter offsets")?, DeviceTensor::from_u32(cu, &[list.len()], &list, "row scatter list")?))
}

/// Adds `dlogits^T @ normed` into the host rows of the trainable tokens among the logit columns
/// (`col_token(j)` is column `j`'s vocabulary id): head_row_grads in backprop.rs. Only the
/// trainable columns are multiplied: `dlogits` (host, `[m, cols]`) is cut to them first.
#[allow(clippy::too_many_arguments)]
fn head_row_grads(cu: &Cuda, dst: &mut [f32], dlogits: &[f32], cols: usize, col_token: impl Fn(usize) -> u32, slot: &[u32], normed: &DeviceTensor, h: usize) -> Result<()> {
    let picked: Vec<(usize, u32)> = (0..cols)
        .filter_map(|j| {
            let s = slot[col_token(j) as usize];
            (s != u32::MAX).then_some((j, s))
        })
        .collect();
    if picked.is_empty() {
        return Ok(());
    }
    let m = dlogits.len() / cols.max(1);
    let k = picked.len();
    let sel: Vec<f32> = (0..m).flat_map(|i| picked.iter().map(move |&(j, _)| dlogits[i * cols + j])).collect();
    let sel = DeviceTensor::from_f32(cu, &[m, k], &sel, "trainable logit-column gradients")?;
    let mut g = f32t(cu, &[k, h], "trainable head row gradients")?;
    matmul(cu, &mut g, &sel, normed, Gemm::TN)?;
    let g = g.to_f32_vec()?;
    for (r, &(_, s)) in picked.iter().enumerate() {
        for (d, v) in dst[s as usize * h..(s as usize + 1) * h].iter_mut().zip(&g[r * h..(r + 1) * h]) {
            *d += v;
        }
    }
    Ok(())
}

/// Forward, loss and backward of one micro-batch on the GPU: the same contract, inputs and
/// results as [`crate::train::backprop::forward_backward`]. `dm` must hold `model`'s weights
/// (including the current trainable token rows: `CudaModel::write_token_rows`); `model` supplies
/// the configuration and the shapes of the gradients. The adapter is uploaded for the call and
/// its gradients come back to the host; a training run keeps both on the device instead
/// ([`ResidentParams`], [`forward_backward_resident`]).
#[allow(clippy::too_many_arguments)]
pub fn forward_backward(
    dm: &CudaModel,
    model: &Model,
    lora: &Lora,
    tb: &TrainBatch,
    objective: &Objective,
    trainable_tokens: &[u32],
    norm: f64,
    train: bool,
    rng: &mut Rng,
) -> Result<(LossStats, Grads)> {
    let slot = check_micro_batch(model, lora, tb, objective, trainable_tokens)?;
    let mut ctx = Ctx::new(dm, lora, upload_pairs(dm.cuda(), lora)?, train);
    let (stats, mut grads) = run(&mut ctx, model, lora, tb, objective, trainable_tokens, &slot, norm, rng)?;
    for (l, slots) in ctx.pairs.iter().enumerate() {
        for (i, p) in slots.iter().enumerate() {
            if let (Some(p), Some(gp)) = (p, grads.lora.blocks[l][i].as_mut()) {
                gp.a = p.ga.to_f32_vec()?;
                gp.b = p.gb.to_f32_vec()?;
            }
        }
    }
    for (name, _, g) in grads.lora.named() {
        if let Some(i) = g.iter().position(|x| !x.is_finite()) {
            return Err(Error::NonFinite(format!("gradient of `{name}` at element {i}")));
        }
    }
    Ok((stats, grads))
}

/// [`forward_backward`] on the adapter held in `res`: nothing is uploaded for it, and its
/// gradients are added into `res`'s accumulators on the device (the returned `Grads` carries the
/// token-row gradients only; its adapter part stays zero). `lora` gives the adapter's
/// configuration and shapes (its values are not read). Non-finite adapter gradients are left for
/// the optimiser step to find ([`ResidentParams::first_nonfinite`]).
#[allow(clippy::too_many_arguments)]
pub fn forward_backward_resident(
    dm: &CudaModel,
    model: &Model,
    lora: &Lora,
    res: &mut ResidentParams,
    tb: &TrainBatch,
    objective: &Objective,
    trainable_tokens: &[u32],
    norm: f64,
    rng: &mut Rng,
) -> Result<(LossStats, Grads)> {
    let slot = check_micro_batch(model, lora, tb, objective, trainable_tokens)?;
    let mut ctx = Ctx::new(dm, lora, std::mem::take(&mut res.pairs), true);
    let out = run(&mut ctx, model, lora, tb, objective, trainable_tokens, &slot, norm, rng);
    // The pairs go back whatever happened: they hold the run's parameters (and their bf16
    // copies, valid until the optimiser changes the values).
    res.pairs = std::mem::take(&mut ctx.pairs);
    out
}

/// Every LoRA pair of `lora` on the device, with zero gradient buffers.
fn upload_pairs(cu: &Cuda, lora: &Lora) -> Result<Vec<[Option<DPair>; 7]>> {
    let mut pairs = Vec::with_capacity(lora.blocks.len());
    for (l, blk) in lora.blocks.iter().enumerate() {
        let mut slots: [Option<DPair>; 7] = Default::default();
        for (i, p) in blk.iter().enumerate() {
            if let Some(p) = p {
                let r = lora.config.rank;
                let what = format!("LoRA block {l} target {i}");
                slots[i] = Some(DPair {
                    a: DeviceTensor::from_f32(cu, &[r, p.in_dim], &p.a, &what)?,
                    b: DeviceTensor::from_f32(cu, &[p.out_dim, r], &p.b, &what)?,
                    ga: zeros(cu, &[r, p.in_dim], &what)?,
                    gb: zeros(cu, &[p.out_dim, r], &what)?,
                    rank: r,
                    a16: None,
                    b16: None,
                });
            }
        }
        pairs.push(slots);
    }
    Ok(pairs)
}

impl<'a> Ctx<'a> {
    fn new(dm: &'a CudaModel, lora: &Lora, pairs: Vec<[Option<DPair>; 7]>, train: bool) -> Self {
        Ctx { dm, cu: dm.cuda(), pairs, scale: lora.config.scale(), dropout: if train { lora.config.dropout } else { 0.0 } }
    }
}

/// The body of [`forward_backward`]: forward with the tape, loss, backward. The adapter's
/// gradients are added into `ctx.pairs`; the token rows' come back in `Grads`.
#[allow(clippy::too_many_arguments)]
fn run(
    ctx: &mut Ctx<'_>,
    model: &Model,
    lora: &Lora,
    tb: &TrainBatch,
    objective: &Objective,
    trainable_tokens: &[u32],
    slot: &[u32],
    norm: f64,
    rng: &mut Rng,
) -> Result<(LossStats, Grads)> {
    let dm = ctx.dm;
    let cu = dm.cuda();
    let c = &model.config;
    let batch = &tb.batch;
    let (bsz, t, h) = (batch.batch, batch.seq, c.hidden_size);
    let (n, m) = (bsz * t, tb.positions.len());

    let (pos, _) = positions(batch, &vec![0; bsz]);
    // Positions are below t: one table row per position, indexed per token.
    let (cos, sin) = dm.rope_tables(t)?;
    let pos: Vec<u32> = pos.iter().map(|&p| p as u32).collect();
    let pos = DeviceTensor::from_u32(cu, &[n], &pos, "RoPE positions")?;
    let rope = ew::RopeTables { cos: &cos, sin: &sin, pos: Some(&pos) };
    let key_mask: Vec<u8> = batch.mask.iter().map(|&x| x as u8).collect();
    let key_mask = DeviceTensor::from_u8(cu, &[bsz, t], &key_mask, "key mask")?;
    let tokens = DeviceTensor::from_u32(cu, &[n], &batch.tokens, "token ids")?;
    let shape = AttentionShape { batch: bsz, tq: t, past: 0, cap: t, n_heads: c.num_heads, n_kv_heads: c.num_kv_heads, head_dim: c.head_dim };
    let flash = attention::use_flash(dm.weights(), c.head_dim);
    let layout = kv::KvLayout { batch: bsz, t, past: 0, cap: t, heads: c.num_kv_heads, d: c.head_dim };
    let eps = c.rms_norm_eps;

    // Forward with the tape.
    let mut x = f32t(cu, &[n, h], "residual stream")?;
    embedding::gather(cu, &mut x, dm.embed(), &tokens)?;
    let mut tapes: Vec<BlockTape> = Vec::with_capacity(c.num_layers);
    for (l, blk) in dm.blocks().iter().enumerate() {
        let x_in = x.try_clone("tape: block input")?;
        let mut h1 = f32t(cu, &[n, h], "tape: normed block input")?;
        ew::rms_norm(cu, &mut h1, &x, &blk.input_norm, None, eps)?;
        let h1_in = dm.gemm_in(&h1, n)?;
        let (mut q, tq) = ctx.lin_fwd(l, Target::Q, &blk.q, &h1_in, n, rng)?;
        let (mut k, tk) = ctx.lin_fwd(l, Target::K, &blk.k, &h1_in, n, rng)?;
        let (vv, tv) = ctx.lin_fwd(l, Target::V, &blk.v, &h1_in, n, rng)?;
        drop(h1_in);
        ew::rope(cu, &mut q, rope, c.num_heads, c.head_dim)?;
        ew::rope(cu, &mut k, rope, c.num_kv_heads, c.head_dim)?;
        let mut k_h = f32t(cu, &[bsz, c.num_kv_heads, t, c.head_dim], "tape: keys")?;
        let mut v_h = f32t(cu, &[bsz, c.num_kv_heads, t, c.head_dim], "tape: values")?;
        kv::kv_scatter(cu, &mut k_h, &k, layout)?;
        kv::kv_scatter(cu, &mut v_h, &vv, layout)?;
        let mut attn = f32t(cu, &[n, c.q_dim()], "tape: attention output")?;
        let mut lse = f32t(cu, &[bsz, c.num_heads, t], "tape: attention log-sum-exp")?;
        attention::forward_f32(cu, &mut attn, &mut lse, &q, &k_h, &v_h, &key_mask, shape, flash)?;
        let (o, to) = ctx.lin_fwd(l, Target::O, &blk.o, &dm.gemm_in(&attn, n)?, n, rng)?;
        ew::add_inplace(cu, &mut x, &o)?;
        let x_mid = x.try_clone("tape: mid-block residual")?;
        let mut h2 = f32t(cu, &[n, h], "tape: normed mid-block residual")?;
        ew::rms_norm(cu, &mut h2, &x, &blk.post_norm, None, eps)?;
        let h2_in = dm.gemm_in(&h2, n)?;
        let (gate, tg) = ctx.lin_fwd(l, Target::Gate, &blk.gate, &h2_in, n, rng)?;
        let (up, tu) = ctx.lin_fwd(l, Target::Up, &blk.up, &h2_in, n, rng)?;
        drop(h2_in);
        let mut act = f32t(cu, gate.shape(), "tape: MLP activation")?;
        ew::swiglu(cu, &mut act, &gate, &up)?;
        let (down, td) = ctx.lin_fwd(l, Target::Down, &blk.down, &dm.gemm_in(&act, n)?, n, rng)?;
        ew::add_inplace(cu, &mut x, &down)?;
        tapes.push(BlockTape { x_in, h1, q, k_h, v_h, attn, lse, x_mid, h2, gate, up, act, lin: [tq, tk, tv, to, tg, tu, td] });
    }

    // Loss on the response rows.
    let pos_u32: Vec<u32> = tb.positions.iter().map(|&p| p as u32).collect();
    let pos_d = DeviceTensor::from_u32(cu, &[m], &pos_u32, "loss positions")?;
    let (scatter_offsets, scatter_list) = row_scatter_lists(cu, &tb.positions, n)?;
    let rows_of = |src: &DeviceTensor, what: &str| -> Result<DeviceTensor> {
        let mut r = f32t(cu, &[m, h], what)?;
        embedding::gather(cu, &mut r, src, &pos_d)?;
        Ok(r)
    };
    let xl_rows = rows_of(&x, "final hidden rows")?;
    let mut normed = f32t(cu, &[m, h], "final-norm rows")?;
    ew::rms_norm(cu, &mut normed, &xl_rows, dm.final_norm(), None, eps)?;
    let mut grads = Grads::zeros(model, lora, trainable_tokens.len());
    let mut inject: Vec<(usize, DeviceTensor)> = Vec::new();
    let mut dx = zeros(cu, &[n, h], "residual gradient")?;
    let block_out = |b: usize| -> &DeviceTensor { if b == c.num_layers { &x } else { &tapes[b].x_in } };
    let rows = LossIn { cfg: c, tb, objective, trainable_tokens, slot, norm, pos: &pos_u32, xl_rows: &xl_rows, normed: &normed };
    let stats = if dm.weights() == Elem::BF16 && h % 8 == 0 {
        fused_loss(dm, &rows, &block_out, &mut grads, &mut inject, &mut dx, (&scatter_offsets, &scatter_list))?
    } else {
        host_loss(dm, &rows, &block_out, &mut grads, &mut inject, &mut dx, (&scatter_offsets, &scatter_list))?
    };

    if !stats.loss.is_finite() {
        return Err(Error::NonFinite(format!("loss ({})", stats.loss)));
    }
    // Backward through the blocks.
    for (l, blk) in dm.blocks().iter().enumerate().rev() {
        for (bl, g) in &inject {
            if *bl == l + 1 {
                embedding::scatter_add_csr(cu, &mut dx, g, &scatter_offsets, &scatter_list)?;
            }
        }
        let tp = &tapes[l];
        let [tq, tk, tv, to, tg, tu, td] = &tp.lin;
        let inter = c.intermediate_size;
        let mut d_act = zeros(cu, &[n, inter], "MLP activation gradient")?;
        ctx.lin_bwd(l, Target::Down, &blk.down, &tp.act, td, &dx, n, &mut d_act)?;
        let mut d_gate = f32t(cu, &[n, inter], "MLP gate gradient")?;
        let mut d_up = f32t(cu, &[n, inter], "MLP up gradient")?;
        ew::swiglu_backward(cu, &mut d_gate, &mut d_up, &d_act, &tp.gate, &tp.up)?;
        let mut dh2 = zeros(cu, &[n, h], "post-norm gradient")?;
        ctx.lin_bwd(l, Target::Gate, &blk.gate, &tp.h2, tg, &d_gate, n, &mut dh2)?;
        ctx.lin_bwd(l, Target::Up, &blk.up, &tp.h2, tu, &d_up, n, &mut dh2)?;
        ew::rms_norm_backward_dx(cu, &mut dx, &dh2, &tp.x_mid, &blk.post_norm, None, eps)?;
        let mut d_attn = zeros(cu, &[n, c.q_dim()], "attention output gradient")?;
        ctx.lin_bwd(l, Target::O, &blk.o, &tp.attn, to, &dx, n, &mut d_attn)?;
        let mut dq = f32t(cu, &[n, c.q_dim()], "query gradient")?;
        let mut dk_h = f32t(cu, tp.k_h.shape(), "key gradient")?;
        let mut dv_h = f32t(cu, tp.v_h.shape(), "value gradient")?;
        attention::backward_f32(cu, &mut dq, &mut dk_h, &mut dv_h, &d_attn, &tp.q, &tp.k_h, &tp.v_h, &tp.attn, &tp.lse, &key_mask, shape, flash)?;
        let mut dk = f32t(cu, &[n, c.kv_dim()], "key gradient rows")?;
        let mut dv = f32t(cu, &[n, c.kv_dim()], "value gradient rows")?;
        kv::kv_gather(cu, &mut dk, &dk_h, layout)?;
        kv::kv_gather(cu, &mut dv, &dv_h, layout)?;
        ew::rope_backward(cu, &mut dq, rope, c.num_heads, c.head_dim)?;
        ew::rope_backward(cu, &mut dk, rope, c.num_kv_heads, c.head_dim)?;
        let mut dh1 = zeros(cu, &[n, h], "input-norm gradient")?;
        ctx.lin_bwd(l, Target::Q, &blk.q, &tp.h1, tq, &dq, n, &mut dh1)?;
        ctx.lin_bwd(l, Target::K, &blk.k, &tp.h1, tk, &dk, n, &mut dh1)?;
        ctx.lin_bwd(l, Target::V, &blk.v, &tp.h1, tv, &dv, n, &mut dh1)?;
        ew::rms_norm_backward_dx(cu, &mut dx, &dh1, &tp.x_in, &blk.input_norm, None, eps)?;
    }
    // Embedding rows of trainable tokens (masked positions only, ascending: the CPU's order).
    if !trainable_tokens.is_empty() {
        let (offsets, list) = embedding::csr_positions(&batch.tokens, &batch.mask, slot, trainable_tokens.len())?;
        let offsets = DeviceTensor::from_u32(cu, &[offsets.len()], &offsets, "embedding scatter offsets")?;
        let list = DeviceTensor::from_u32(cu, &[list.len()], &list, "embedding scatter list")?;
        let mut g = DeviceTensor::from_f32(cu, &[trainable_tokens.len(), h], &grads.embed_rows, "embedding row gradients")?;
        embedding::scatter_add_csr(cu, &mut g, &dx, &offsets, &list)?;
        grads.embed_rows = g.to_f32_vec()?;
    }
    Ok((stats, grads))
}

/// The response rows' loss inputs shared by [`fused_loss`] and [`host_loss`].
struct LossIn<'a> {
    cfg: &'a crate::model::ModelConfig,
    tb: &'a TrainBatch,
    objective: &'a Objective,
    trainable_tokens: &'a [u32],
    slot: &'a [u32],
    norm: f64,
    /// Flat row index of each loss row.
    pos: &'a [u32],
    /// Final residual rows `[m, h]` and their final-norm output.
    xl_rows: &'a DeviceTensor,
    normed: &'a DeviceTensor,
}

/// The row-scatter lists of `row_scatter_lists`.
type Scatter<'a> = (&'a DeviceTensor, &'a DeviceTensor);

/// The loss through kernels/loss.cu and kernels/probe.cu (bf16 weights): the logits stream
/// through the GPU and are never stored or downloaded; the probes project onto the candidate head
/// rows for all probed blocks at once. Adds the final rows' gradient into `dx`, the probed
/// blocks' into `inject`, and the trainable head-row gradients into `grads`.
fn fused_loss<'t>(dm: &CudaModel, r: &LossIn<'_>, block_out: &dyn Fn(usize) -> &'t DeviceTensor, grads: &mut Grads, inject: &mut Vec<(usize, DeviceTensor)>, dx: &mut DeviceTensor, (so, sl): Scatter<'_>) -> Result<LossStats> {
    let cu = dm.cuda();
    let c = r.cfg;
    let (h, v, m, n) = (c.hidden_size, c.vocab_size, r.pos.len(), dx.shape()[0]);
    let eps = c.rms_norm_eps;
    let tied = grads.head_rows.is_empty();
    let normed_b = match dm.gemm_input(r.normed, m)? {
        Some(b) => b,
        None => return Err(Error::Input("fused loss: needs bf16 weights".into())),
    };
    let mut probe_state = None;
    let out = match r.objective {
        Objective::Sft => LossPlan::new(cu, v, &r.tb.targets, None, r.trainable_tokens)?.run(cu, &normed_b, dm.head(), None, r.norm)?,
        Objective::Ilrec { params, layers, candidates } => {
            let s = candidates.len();
            let pos = Ids::new(cu, r.pos, n, false, "loss positions")?;
            let cand = Ids::new(cu, candidates, v, false, "ILRec candidates")?;
            let outs: Vec<&DeviceTensor> = layers.iter().map(|&l| block_out(l)).collect();
            let mut z = f32t(cu, &[layers.len(), m, s], "probe logits")?;
            probe::probe_project(cu, &mut z, &outs, &pos, dm.final_norm(), dm.head(), &cand, eps)?;
            let plan = LossPlan::new(cu, v, &r.tb.targets, Some((&r.tb.item_mask, candidates)), r.trainable_tokens)?;
            let rewards = match &r.tb.rewards {
                Some(rw) => Some(DeviceTensor::from_f32(cu, &[m, s], rw, "CF rewards")?),
                None => None,
            };
            let inputs = IlrecInputs { params: *params, probe: &z, rewards: rewards.as_ref() };
            let out = plan.run(cu, &normed_b, dm.head(), Some(&inputs), r.norm)?;
            probe_state = Some((pos, outs, candidates, layers));
            out
        }
    };
    let dst = if tied { &mut grads.embed_rows } else { &mut grads.head_rows };
    // Final rows: through the final norm into the residual stream, and the trainable head rows.
    let mut dxr = zeros(cu, &[m, h], "final hidden-row gradients")?;
    ew::rms_norm_backward_dx(cu, &mut dxr, &out.dnormed, r.xl_rows, dm.final_norm(), None, eps)?;
    embedding::scatter_add_csr(cu, dx, &dxr, so, sl)?;
    if let Some(dt) = &out.dtrain {
        let mut g = f32t(cu, &[r.trainable_tokens.len(), h], "trainable head row gradients")?;
        matmul(cu, &mut g, dt, r.normed, Gemm::TN)?;
        for (d, v) in dst.iter_mut().zip(g.to_f32_vec()?) {
            *d += v;
        }
    }
    // Probes: dz^l through the candidate rows (one GEMM for all layers) and the final norm.
    if let (Some((pos, outs, candidates, layers)), Some(dp)) = (probe_state, out.dprobe) {
        let (k, s) = (layers.len(), candidates.len());
        let cand_d = DeviceTensor::from_u32(cu, &[s], candidates, "ILRec candidates")?;
        let mut rows_s = DeviceTensor::empty(cu, &[s, h], dm.weights(), "candidate LM-head rows")?;
        embedding::gather(cu, &mut rows_s, dm.head(), &cand_d)?;
        let dp = dp.reshape(&[k * m, s])?;
        let dn = dm.input_grad_of(&dp, k * m, &rows_s)?.reshape(&[k, m, h])?;
        let mut dxs: Vec<DeviceTensor> = (0..k).map(|_| f32t(cu, &[m, h], "probe hidden-row gradients")).collect::<Result<_>>()?;
        probe::probe_norm_backward(cu, &mut dxs, &dn, &outs, &pos, dm.final_norm(), eps)?;
        inject.extend(layers.iter().copied().zip(dxs));
        let picked: Vec<(usize, u32)> = candidates.iter().enumerate().filter_map(|(j, &t)| (r.slot[t as usize] != u32::MAX).then_some((j, r.slot[t as usize]))).collect();
        if !picked.is_empty() {
            let mut normed_p = f32t(cu, &[k * m, h], "probe normed rows")?;
            probe::probe_normed(cu, &mut normed_p, &outs, &pos, dm.final_norm(), eps)?;
            let mut g = f32t(cu, &[s, h], "candidate head row gradients")?;
            matmul(cu, &mut g, &dp, &normed_p, Gemm::TN)?;
            let g = g.to_f32_vec()?;
            for (j, sl) in picked {
                for (d, v) in dst[sl as usize * h..(sl as usize + 1) * h].iter_mut().zip(&g[j * h..(j + 1) * h]) {
                    *d += v;
                }
            }
        }
    }
    Ok(out.stats)
}

/// The loss on the host from the downloaded response-row logits (`m x V` final, `m x S` probes),
/// through the CPU's `sft_loss` / `ilrec_loss`: the path for f32 weights (the f32 self-test) and
/// hidden sizes the fused kernels do not take. Same outputs as [`fused_loss`].
fn host_loss<'t>(dm: &CudaModel, r: &LossIn<'_>, block_out: &dyn Fn(usize) -> &'t DeviceTensor, grads: &mut Grads, inject: &mut Vec<(usize, DeviceTensor)>, dx: &mut DeviceTensor, (so, sl): Scatter<'_>) -> Result<LossStats> {
    let cu = dm.cuda();
    let c = r.cfg;
    let (h, v, m) = (c.hidden_size, c.vocab_size, r.pos.len());
    let eps = c.rms_norm_eps;
    let tied = grads.head_rows.is_empty();
    let (tb, slot, normed, xl_rows) = (r.tb, r.slot, r.normed, r.xl_rows);
    let pos_d = DeviceTensor::from_u32(cu, &[m], r.pos, "loss positions")?;
    let rows_of = |src: &DeviceTensor, what: &str| -> Result<DeviceTensor> {
        let mut o = f32t(cu, &[m, h], what)?;
        embedding::gather(cu, &mut o, src, &pos_d)?;
        Ok(o)
    };
    let logits = dm.logits_of(normed, m, dm.head())?;
    let host_logits = logits.to_f32_vec()?;
    let (stats, d_final) = match r.objective {
        Objective::Sft => sft_loss(&host_logits, v, &tb.targets, r.norm)?,
        Objective::Ilrec { params, layers, candidates } => {
            let s = candidates.len();
            let cand = DeviceTensor::from_u32(cu, &[s], candidates, "ILRec candidates")?;
            let mut rows_s = DeviceTensor::empty(cu, &[s, h], dm.weights(), "candidate LM-head rows")?;
            embedding::gather(cu, &mut rows_s, dm.head(), &cand)?;
            let mut probe_rows = Vec::with_capacity(layers.len());
            let mut probe_logits = Vec::with_capacity(layers.len());
            for &l in layers {
                let xr = rows_of(block_out(l), "probe hidden rows")?;
                let mut nr = f32t(cu, &[m, h], "probe normed rows")?;
                ew::rms_norm(cu, &mut nr, &xr, dm.final_norm(), None, eps)?;
                probe_logits.push(dm.logits_of(&nr, m, &rows_s)?.to_f32_vec()?);
                probe_rows.push((xr, nr));
            }
            let probe_refs: Vec<&[f32]> = probe_logits.iter().map(Vec::as_slice).collect();
            let rows = LossRows { final_logits: &host_logits, vocab: v, targets: &tb.targets, item_mask: &tb.item_mask, probe_logits: &probe_refs, candidates, rewards: tb.rewards.as_deref() };
            let (st, g) = ilrec_loss(&rows, params, r.norm)?;
            for ((&l, dz_host), (xr, nr)) in layers.iter().zip(&g.d_probe).zip(&probe_rows) {
                let dz = DeviceTensor::from_f32(cu, &[m, s], dz_host, "probe logit gradients")?;
                let dn = dm.input_grad_of(&dz, m, &rows_s)?;
                let mut dx = zeros(cu, &[m, h], "probe hidden-row gradients")?;
                ew::rms_norm_backward_dx(cu, &mut dx, &dn, xr, dm.final_norm(), None, eps)?;
                inject.push((l, dx));
                let dst = if tied { &mut grads.embed_rows } else { &mut grads.head_rows };
                head_row_grads(cu, dst, dz_host, s, |j| candidates[j], slot, nr, h)?;
            }
            (st, g.d_final)
        }
    };
    {
        let d_final_d = DeviceTensor::from_f32(cu, &[m, v], &d_final, "final logit gradients")?;
        let dn = dm.input_grad_of(&d_final_d, m, dm.head())?;
        let mut dxr = zeros(cu, &[m, h], "final hidden-row gradients")?;
        ew::rms_norm_backward_dx(cu, &mut dxr, &dn, xl_rows, dm.final_norm(), None, eps)?;
        embedding::scatter_add_csr(cu, dx, &dxr, so, sl)?;
        let dst = if tied { &mut grads.embed_rows } else { &mut grads.head_rows };
        head_row_grads(cu, dst, &d_final, v, |j| j as u32, slot, normed, h)?;
    }
    Ok(stats)
}


/// A training run's trainable parameters kept on the device across steps, so a CUDA step uploads
/// no adapter and downloads no adapter gradient per micro-batch, and the optimiser runs there
/// (kernels/optim.cu: `grad_norm_clip`, `adamw_step`): the LoRA pairs (values, gradient
/// accumulators), the trainable token rows (values, accumulators) and the AdamW moments of every
/// tensor. Tensor order (the trainer's): [`Lora::named`], then the embedding rows, then the head
/// rows (empty when the head is tied).
pub struct ResidentParams {
    pairs: Vec<[Option<DPair>; 7]>,
    /// `(values, gradients)` of the embedding rows and of the head rows, `[tokens, hidden]`.
    rows: [(DeviceTensor, DeviceTensor); 2],
    m: Vec<DeviceTensor>,
    v: Vec<DeviceTensor>,
}

impl ResidentParams {
    /// Uploads the adapter `lora`, the token rows and the moments `(m, v)` of every tensor (in the
    /// order above; each as long as its tensor).
    pub fn upload(cu: &Cuda, lora: &Lora, embed_rows: &[f32], head_rows: &[f32], h: usize, moments: &[(&[f32], &[f32])]) -> Result<Self> {
        let pairs = upload_pairs(cu, lora)?;
        let row_pair = |v: &[f32], what: &str| -> Result<(DeviceTensor, DeviceTensor)> {
            let shape = [v.len() / h.max(1), h];
            Ok((DeviceTensor::from_f32(cu, &shape, v, what)?, zeros(cu, &shape, what)?))
        };
        let rows = [row_pair(embed_rows, "trainable embedding rows")?, row_pair(head_rows, "trainable head rows")?];
        let mut res = ResidentParams { pairs, rows, m: Vec::new(), v: Vec::new() };
        let lens: Vec<usize> = res.values().iter().map(|t| t.numel()).collect();
        if moments.len() != lens.len() {
            return Err(Error::Input(format!("resident parameters: {} moment pairs for {} tensors", moments.len(), lens.len())));
        }
        for (i, ((m, v), n)) in moments.iter().zip(lens).enumerate() {
            if m.len() != n || v.len() != n {
                return Err(Error::Input(format!("resident parameters: tensor {i} has {n} values but moments of {} and {}", m.len(), v.len())));
            }
            res.m.push(DeviceTensor::from_f32(cu, &[n], m, "AdamW exp_avg")?);
            res.v.push(DeviceTensor::from_f32(cu, &[n], v, "AdamW exp_avg_sq")?);
        }
        Ok(res)
    }

    /// Every value tensor, in order.
    fn values(&self) -> Vec<&DeviceTensor> {
        let mut out: Vec<&DeviceTensor> = self.pairs.iter().flatten().flatten().flat_map(|p| [&p.a, &p.b]).collect();
        out.extend(self.rows.iter().map(|r| &r.0));
        out
    }

    /// Every gradient accumulator, in order.
    fn grads(&self) -> Vec<&DeviceTensor> {
        let mut out: Vec<&DeviceTensor> = self.pairs.iter().flatten().flatten().flat_map(|p| [&p.ga, &p.gb]).collect();
        out.extend(self.rows.iter().map(|r| &r.1));
        out
    }

    /// `(value, gradient)` of every tensor, in order, for the optimiser.
    fn params_mut(&mut self) -> Vec<(&mut DeviceTensor, &mut DeviceTensor)> {
        let mut out: Vec<(&mut DeviceTensor, &mut DeviceTensor)> = Vec::new();
        for p in self.pairs.iter_mut().flatten().flatten() {
            out.push((&mut p.a, &mut p.ga));
            out.push((&mut p.b, &mut p.gb));
        }
        for (v, g) in self.rows.iter_mut() {
            out.push((v, g));
        }
        out
    }

    /// Zeroes every gradient accumulator (the start of an optimiser step).
    pub fn zero_grads(&mut self) -> Result<()> {
        self.grads().into_iter().try_for_each(|g| g.fill_bytes(0))
    }

    /// Sets the token rows' gradients (summed on the host over the step's micro-batches: their
    /// head-row parts come from host-side products of the loss).
    pub fn set_row_grads(&mut self, embed: &[f32], head: &[f32]) -> Result<()> {
        let cu = self.rows[0].1.cuda().clone();
        for ((_, g), src) in self.rows.iter_mut().zip([embed, head]) {
            if src.len() != g.numel() {
                return Err(Error::Input(format!("token-row gradients: {} values for {}", src.len(), g.numel())));
            }
            *g = DeviceTensor::from_f32(&cu, g.shape(), src, "token-row gradients")?;
        }
        Ok(())
    }

    /// The first non-finite gradient as (tensor index, element), or `None`. Waits for the GPU
    /// once (one count for all tensors); only when that is non-zero are the gradients read.
    pub fn first_nonfinite(&self) -> Result<Option<(usize, usize)>> {
        let grads = self.grads();
        let Some(first) = grads.first() else { return Ok(None) };
        let cu = first.cuda();
        let mut count = DeviceTensor::zeros(cu, &[1], Elem::U32, "non-finite gradient count")?;
        for g in &grads {
            optim::add_nonfinite_count(cu, &mut count, g)?;
        }
        if count.to_u32_vec()?.first().copied().unwrap_or(0) == 0 {
            return Ok(None);
        }
        for (i, g) in grads.iter().enumerate() {
            if let Some(e) = g.to_f32_vec()?.iter().position(|x| !x.is_finite()) {
                return Ok(Some((i, e)));
            }
        }
        Ok(None)
    }

    /// `clip_grad_norm(max_norm)` then one AdamW update of every tensor with its `scalars` (in
    /// order), both on the device; returns the gradients' total norm. When the norm is not
    /// finite nothing is updated (the caller stops the run, as on the CPU). Waits for the GPU
    /// once, to read the norm.
    pub fn clip_and_step(&mut self, max_norm: f32, scalars: &[optim::AdamWScalars]) -> Result<f32> {
        let n = self.m.len();
        if scalars.len() != n {
            return Err(Error::Input(format!("AdamW step: {} scalar sets for {n} tensors", scalars.len())));
        }
        let Some(cu) = self.m.first().map(|t| t.cuda().clone()) else { return Ok(0.0) };
        let norm = {
            let mut grads: Vec<&mut DeviceTensor> = self.params_mut().into_iter().map(|(_, g)| g).collect();
            optim::grad_norm_clip(&cu, &mut grads, max_norm)?
        };
        let total = norm.to_f32_vec()?.first().copied().unwrap_or(f32::NAN);
        if !total.is_finite() {
            return Ok(total);
        }
        let (mut ms, mut vs) = (std::mem::take(&mut self.m), std::mem::take(&mut self.v));
        let stepped = self.params_mut().into_iter().zip(ms.iter_mut().zip(vs.iter_mut())).zip(scalars).try_for_each(|(((p, g), (m, v)), s)| optim::adamw_step(&cu, p, g, m, v, s));
        (self.m, self.v) = (ms, vs);
        // The adapter's bf16 copies (made by the fused path at first use) are stale now.
        for p in self.pairs.iter_mut().flatten().flatten() {
            (p.a16, p.b16) = (None, None);
        }
        stepped?;
        Ok(total)
    }

    /// Every tensor's values, in order (to the host: checkpoints, evaluation and the CPU model
    /// follow the device after each step).
    pub fn download_values(&self) -> Result<Vec<Vec<f32>>> {
        self.values().into_iter().map(DeviceTensor::to_f32_vec).collect()
    }

    /// Every tensor's AdamW moments `(exp_avg, exp_avg_sq)`, in order.
    pub fn download_moments(&self) -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
        self.m.iter().zip(&self.v).map(|(m, v)| Ok((m.to_f32_vec()?, v.to_f32_vec()?))).collect()
    }
}
