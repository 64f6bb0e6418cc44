//! One training micro-batch on the CPU: a forward that keeps what the backward needs (the
//! tape), the loss on the response rows (SFT or ILRec), and the backward into the LoRA
//! weights and the trainable token rows. The base weights are frozen.
//!
//! The block wiring mirrors `Model::forward_cached` (engine/model/forward.rs) with the LoRA
//! branch added; both are checked against HF transformers (tests/hf_parity.rs, tests/train.rs).
use super::lora::{Lora, LoraPair, Target};
use super::loss::{ilrec_loss, sft_loss, IlrecParams, LossRows, LossStats};
use crate::backend::cpu::{self, AttentionShape};
use crate::error::{Error, Result};
use crate::model::{positions, Batch, Linear, Model};
use crate::rng::Rng;

/// The response rows of a padded batch and what they must predict.
#[derive(Clone, Debug)]
pub struct TrainBatch {
    pub batch: Batch,
    /// Flat indices `b * seq + t` of the positions whose logits predict a response token.
    pub positions: Vec<usize>,
    /// The token each of those positions must predict.
    pub targets: Vec<u32>,
    /// Per loss row: whether its target is an item-identifier token (ILRec terms apply).
    pub item_mask: Vec<bool>,
    /// Per loss row and candidate token: CF rewards `r_v` (ILRec with `mu > 0`), `[rows, S]`.
    pub rewards: Option<Vec<f32>>,
}

/// What the micro-batch optimises.
#[derive(Clone, Debug)]
pub enum Objective {
    /// Cross-entropy on every response row.
    Sft,
    /// The ILRec objective; `layers` are the 1-based probed blocks P, `candidates` the
    /// vocabulary ids the probes project on.
    Ilrec { params: IlrecParams, layers: Vec<usize>, candidates: Vec<u32> },
}

/// Gradients of one micro-batch (already divided by the accumulation normaliser).
#[derive(Clone, Debug)]
pub struct Grads {
    /// Same shapes and names as the adapter.
    pub lora: Lora,
    /// `[tokens, hidden]` gradients of the trainable embedding rows (plus the LM-head rows when
    /// the head is tied to the embedding).
    pub embed_rows: Vec<f32>,
    /// `[tokens, hidden]` gradients of the trainable LM-head rows (empty when tied).
    pub head_rows: Vec<f32>,
}

impl Grads {
    /// Zero gradients shaped like `lora` and `n_tokens` trainable rows.
    pub fn zeros(model: &Model, lora: &Lora, n_tokens: usize) -> Grads {
        let mut g = lora.clone();
        for (_, t) in g.named_mut() {
            t.fill(0.0);
        }
        let h = model.config.hidden_size;
        let head = if model.lm_head.is_some() { n_tokens * h } else { 0 };
        Grads { lora: g, embed_rows: vec![0.0; n_tokens * h], head_rows: vec![0.0; head] }
    }

    /// Every gradient tensor in a fixed order (LoRA in PEFT order, then the token rows).
    pub fn tensors_mut(&mut self) -> Vec<&mut Vec<f32>> {
        let mut v: Vec<&mut Vec<f32>> = self.lora.named_mut().into_iter().map(|(_, t)| t).collect();
        v.push(&mut self.embed_rows);
        v.push(&mut self.head_rows);
        v
    }
}

/// A linear's LoRA intermediates kept for the backward.
#[derive(Default)]
struct LinTape {
    /// `drop(x) A^T`, `[n, r]`.
    u: Vec<f32>,
    /// Dropout multipliers (0 or 1/(1-p)) on the LoRA input, `[n, in]`; empty without dropout.
    drop: Vec<f32>,
}

#[derive(Default)]
struct BlockTape {
    x_in: Vec<f32>,
    h1: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    x_mid: Vec<f32>,
    h2: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    act: Vec<f32>,
    lin: [Option<LinTape>; 7],
}

struct Ctx<'a> {
    lora: &'a Lora,
    scale: f32,
    dropout: f32,
}

fn pair(lora: &Lora, block: usize, t: Target) -> Option<&LoraPair> {
    lora.blocks.get(block).and_then(|s| s[t.index()].as_ref())
}

/// `y = x W^T + b + s (drop(x) A^T) B^T`.
fn lin_fwd(ctx: &Ctx, block: usize, t: Target, base: &Linear, x: &[f32], n: usize, rng: &mut Rng) -> (Vec<f32>, Option<LinTape>) {
    let mut y = base.forward(x, n);
    let Some(p) = pair(ctx.lora, block, t) else { return (y, None) };
    let r = ctx.lora.config.rank;
    let (drop, xd_owned);
    let xd: &[f32] = if ctx.dropout > 0.0 {
        let keep = 1.0 / (1.0 - ctx.dropout);
        drop = (0..x.len()).map(|_| if rng.next_f32() < ctx.dropout { 0.0 } else { keep }).collect::<Vec<f32>>();
        xd_owned = x.iter().zip(&drop).map(|(a, m)| a * m).collect::<Vec<f32>>();
        &xd_owned
    } else {
        drop = Vec::new();
        x
    };
    let mut u = vec![0.0f32; n * r];
    cpu::matmul_nt(&mut u, r, xd, p.in_dim, &p.a, p.in_dim, n, r, p.in_dim, false);
    let us: Vec<f32> = u.iter().map(|v| v * ctx.scale).collect();
    cpu::matmul_nt(&mut y, p.out_dim, &us, r, &p.b, r, n, p.out_dim, r, true);
    (y, Some(LinTape { u, drop }))
}

/// Backward of [`lin_fwd`]: adds `dL/dx` into `dx`, and the LoRA gradients into `g`.
#[allow(clippy::too_many_arguments)]
fn lin_bwd(ctx: &Ctx, block: usize, t: Target, base: &Linear, x: &[f32], tape: &Option<LinTape>, dy: &[f32], n: usize, dx: &mut [f32], g: &mut Lora) {
    cpu::matmul_nn(dx, base.in_dim, dy, base.out_dim, &base.w, base.in_dim, n, base.in_dim, base.out_dim, true);
    let (Some(p), Some(tp)) = (pair(ctx.lora, block, t), tape) else { return };
    let gp = g.blocks[block][t.index()].as_mut().expect("gradient slots mirror the adapter");
    let r = ctx.lora.config.rank;
    let (din, dout) = (p.in_dim, p.out_dim);
    // dB += s dy^T u
    let us: Vec<f32> = tp.u.iter().map(|v| v * ctx.scale).collect();
    cpu::matmul_tn(&mut gp.b, r, dy, dout, &us, r, dout, r, n, true);
    // du = s dy B
    let mut du = vec![0.0f32; n * r];
    cpu::matmul_nn(&mut du, r, dy, dout, &p.b, r, n, r, dout, false);
    du.iter_mut().for_each(|v| *v *= ctx.scale);
    // dA += du^T drop(x)
    let xd_owned;
    let xd: &[f32] = if tp.drop.is_empty() {
        x
    } else {
        xd_owned = x.iter().zip(&tp.drop).map(|(a, m)| a * m).collect::<Vec<f32>>();
        &xd_owned
    };
    cpu::matmul_tn(&mut gp.a, din, &du, r, xd, din, r, din, n, true);
    // dx += drop(du A)
    if tp.drop.is_empty() {
        cpu::matmul_nn(dx, din, &du, r, &p.a, din, n, din, r, true);
    } else {
        let mut dxd = vec![0.0f32; n * din];
        cpu::matmul_nn(&mut dxd, din, &du, r, &p.a, din, n, din, r, false);
        for ((d, v), m) in dx.iter_mut().zip(&dxd).zip(&tp.drop) {
            *d += v * m;
        }
    }
}

/// `[n, heads*d]` rows <-> `[batch, heads, t, d]` (the attention kernels' K/V layout);
/// `to_heads` picks the direction.
fn permute_heads(src: &[f32], bsz: usize, t: usize, heads: usize, d: usize, to_heads: bool) -> Vec<f32> {
    let mut dst = vec![0.0f32; src.len()];
    for b in 0..bsz {
        for i in 0..t {
            for h in 0..heads {
                let rows = ((b * t + i) * heads + h) * d;
                let hmaj = ((b * heads + h) * t + i) * d;
                let (s, o) = if to_heads { (rows, hmaj) } else { (hmaj, rows) };
                dst[o..o + d].copy_from_slice(&src[s..s + d]);
            }
        }
    }
    dst
}

fn gather_rows(x: &[f32], rows: &[usize], h: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * h);
    for &r in rows {
        out.extend_from_slice(&x[r * h..(r + 1) * h]);
    }
    out
}

fn scatter_add_rows(dst: &mut [f32], src: &[f32], rows: &[usize], h: usize) {
    for (i, &r) in rows.iter().enumerate() {
        for (d, s) in dst[r * h..(r + 1) * h].iter_mut().zip(&src[i * h..(i + 1) * h]) {
            *d += s;
        }
    }
}

/// Adds `Σ_m dlogits[m, j] * normed[m]` into the rows of `dst` (`[tokens, hidden]`) of the
/// trainable tokens among `cols` (the vocabulary ids of the logit columns).
fn head_row_grads(dst: &mut [f32], dlogits: &[f32], n_cols: usize, cols: impl Fn(usize) -> u32, normed: &[f32], h: usize, slot: &[u32]) {
    let m = normed.len() / h;
    for j in 0..n_cols {
        let s = slot[cols(j) as usize];
        if s == u32::MAX {
            continue;
        }
        let row = &mut dst[s as usize * h..(s as usize + 1) * h];
        for i in 0..m {
            let g = dlogits[i * n_cols + j];
            if g != 0.0 {
                for (d, v) in row.iter_mut().zip(&normed[i * h..(i + 1) * h]) {
                    *d += g * v;
                }
            }
        }
    }
}

/// Checks a micro-batch against the model, the adapter and the objective, and returns the slot
/// of each vocabulary id in the token-row gradients (`u32::MAX`: not trainable). Shared by the
/// CPU and CUDA training passes.
pub(crate) fn check_micro_batch(model: &Model, lora: &Lora, tb: &TrainBatch, objective: &Objective, trainable_tokens: &[u32]) -> Result<Vec<u32>> {
    let c = &model.config;
    let batch = &tb.batch;
    let (bsz, t) = (batch.batch, batch.seq);
    let n = bsz * t;
    if batch.tokens.len() != n || batch.mask.len() != n || n == 0 {
        return Err(Error::Input(format!("train batch {bsz}x{t} has {} tokens and {} mask entries", batch.tokens.len(), batch.mask.len())));
    }
    if lora.blocks.len() != c.num_layers {
        return Err(Error::Input(format!("adapter has {} blocks, the model {}", lora.blocks.len(), c.num_layers)));
    }
    let m = tb.positions.len();
    if tb.targets.len() != m || tb.item_mask.len() != m {
        return Err(Error::Input(format!("{m} loss positions but {} targets and {} item flags", tb.targets.len(), tb.item_mask.len())));
    }
    if let Some(&p) = tb.positions.iter().find(|&&p| p >= n || !batch.mask[p]) {
        return Err(Error::Input(format!("loss position {p} is padding or outside the {bsz}x{t} batch")));
    }
    if let Some(&tok) = batch.tokens.iter().find(|&&x| x as usize >= c.vocab_size) {
        return Err(Error::Input(format!("token id {tok} is outside the vocabulary ({})", c.vocab_size)));
    }
    let mut slot = vec![u32::MAX; c.vocab_size];
    for (i, &tok) in trainable_tokens.iter().enumerate() {
        if tok as usize >= c.vocab_size {
            return Err(Error::Input(format!("trainable token {tok} is outside the vocabulary ({})", c.vocab_size)));
        }
        slot[tok as usize] = i as u32;
    }
    if let Objective::Ilrec { layers, candidates, .. } = objective {
        if let Some(&l) = layers.iter().find(|&&l| l == 0 || l > c.num_layers) {
            return Err(Error::Input(format!("probe block {l} does not exist: blocks are 1..={}", c.num_layers)));
        }
        // Checked before any head row is gathered (a device gather does not bounds-check).
        if let Some(&tok) = candidates.iter().find(|&&x| x as usize >= c.vocab_size) {
            return Err(Error::Input(format!("ILRec candidate token {tok} is outside the vocabulary ({})", c.vocab_size)));
        }
    }
    Ok(slot)
}

/// Forward, loss and backward of one micro-batch. `trainable_tokens` are vocabulary ids whose
/// embedding (and untied LM-head) rows are trained; `norm` is the number of response tokens of
/// the whole accumulated batch. Dropout draws from `rng` when `train` is set.
#[allow(clippy::too_many_arguments)]
pub fn forward_backward(
    model: &Model,
    lora: &Lora,
    tb: &TrainBatch,
    objective: &Objective,
    trainable_tokens: &[u32],
    norm: f64,
    train: bool,
    rng: &mut Rng,
) -> Result<(LossStats, Grads)> {
    let c = &model.config;
    let batch = &tb.batch;
    let (bsz, t, h) = (batch.batch, batch.seq, c.hidden_size);
    let n = bsz * t;
    let m = tb.positions.len();
    let slot = check_micro_batch(model, lora, tb, objective, trainable_tokens)?;
    let ctx = Ctx { lora, scale: lora.config.scale(), dropout: if train { lora.config.dropout } else { 0.0 } };
    let (pos, _) = positions(batch, &vec![0; bsz]);
    let (cos, sin) = cpu::rope_tables(&pos, c.head_dim, c.rope_theta);
    let neg_sin: Vec<f32> = sin.iter().map(|v| -v).collect();
    let shape = AttentionShape { batch: bsz, tq: t, past: 0, cap: t, n_heads: c.num_heads, n_kv_heads: c.num_kv_heads, head_dim: c.head_dim };
    let eps = c.rms_norm_eps;

    // Forward with the tape.
    let mut x = vec![0.0f32; n * h];
    for (row, &tok) in x.chunks_mut(h).zip(&batch.tokens) {
        row.copy_from_slice(&model.embed[tok as usize * h..(tok as usize + 1) * h]);
    }
    let mut tapes: Vec<BlockTape> = Vec::with_capacity(c.num_layers);
    for (l, blk) in model.blocks.iter().enumerate() {
        let mut tp = BlockTape { x_in: x.clone(), ..Default::default() };
        tp.h1 = vec![0.0; n * h];
        cpu::rms_norm(&mut tp.h1, &x, &blk.input_norm, eps);
        let (mut q, tq) = lin_fwd(&ctx, l, Target::Q, &blk.q, &tp.h1, n, rng);
        let (mut k, tk) = lin_fwd(&ctx, l, Target::K, &blk.k, &tp.h1, n, rng);
        let (v, tv) = lin_fwd(&ctx, l, Target::V, &blk.v, &tp.h1, n, rng);
        cpu::rope_inplace(&mut q, c.num_heads, c.head_dim, &cos, &sin);
        cpu::rope_inplace(&mut k, c.num_kv_heads, c.head_dim, &cos, &sin);
        tp.k = permute_heads(&k, bsz, t, c.num_kv_heads, c.head_dim, true);
        tp.v = permute_heads(&v, bsz, t, c.num_kv_heads, c.head_dim, true);
        tp.attn = vec![0.0; n * c.q_dim()];
        cpu::attention(&mut tp.attn, &q, &tp.k, &tp.v, &batch.mask, shape);
        tp.q = q;
        let (o, to) = lin_fwd(&ctx, l, Target::O, &blk.o, &tp.attn, n, rng);
        cpu::add_inplace(&mut x, &o);
        tp.x_mid = x.clone();
        tp.h2 = vec![0.0; n * h];
        cpu::rms_norm(&mut tp.h2, &x, &blk.post_norm, eps);
        let (gate, tg) = lin_fwd(&ctx, l, Target::Gate, &blk.gate, &tp.h2, n, rng);
        let (up, tu) = lin_fwd(&ctx, l, Target::Up, &blk.up, &tp.h2, n, rng);
        let mut act = gate.clone();
        cpu::silu_mul(&mut act, &up);
        let (down, td) = lin_fwd(&ctx, l, Target::Down, &blk.down, &act, n, rng);
        cpu::add_inplace(&mut x, &down);
        (tp.gate, tp.up, tp.act) = (gate, up, act);
        tp.lin = [tq, tk, tv, to, tg, tu, td];
        tapes.push(tp);
    }
    // Output of block `b` (1-based).
    let block_out = |b: usize| -> &[f32] { if b == c.num_layers { &x } else { &tapes[b].x_in } };

    // Loss on the response rows: final logits, and probes for ILRec.
    let head = model.head_weight();
    let v = c.vocab_size;
    let xl_rows = gather_rows(&x, &tb.positions, h);
    let mut normed = vec![0.0f32; m * h];
    cpu::rms_norm(&mut normed, &xl_rows, &model.norm, eps);
    let mut logits = vec![0.0f32; m * v];
    cpu::matmul_nt(&mut logits, v, &normed, h, head, h, m, v, h, false);
    let mut grads = Grads::zeros(model, lora, trainable_tokens.len());
    let tied = model.lm_head.is_none();
    let mut d_out = vec![0.0f32; n * h]; // gradient w.r.t. the last block's output
    let mut inject: Vec<(usize, Vec<f32>)> = Vec::new(); // (block, [m, h]) probe gradients
    let (stats, d_final) = match objective {
        Objective::Sft => sft_loss(&logits, v, &tb.targets, norm)?,
        Objective::Ilrec { params, layers, candidates } => {
            let (rows_s, s) = model.gather_head_rows(Some(candidates));
            let mut probe_normed = Vec::with_capacity(layers.len());
            let mut probe_logits = Vec::with_capacity(layers.len());
            for &l in layers {
                let xr = gather_rows(block_out(l), &tb.positions, h);
                let mut nr = vec![0.0f32; m * h];
                cpu::rms_norm(&mut nr, &xr, &model.norm, eps);
                let mut z = vec![0.0f32; m * s];
                cpu::matmul_nt(&mut z, s, &nr, h, &rows_s, h, m, s, h, false);
                probe_normed.push((xr, nr));
                probe_logits.push(z);
            }
            let probe_refs: Vec<&[f32]> = probe_logits.iter().map(Vec::as_slice).collect();
            let rows = LossRows {
                final_logits: &logits,
                vocab: v,
                targets: &tb.targets,
                item_mask: &tb.item_mask,
                probe_logits: &probe_refs,
                candidates,
                rewards: tb.rewards.as_deref(),
            };
            let (st, g) = ilrec_loss(&rows, params, norm)?;
            for ((&l, dz), (xr, nr)) in layers.iter().zip(&g.d_probe).zip(&probe_normed) {
                // z^l = norm(h^l) H_S^T: into h^l through the shared final norm.
                let mut dn = vec![0.0f32; m * h];
                cpu::matmul_nn(&mut dn, h, dz, s, &rows_s, h, m, h, s, false);
                let mut dx = vec![0.0f32; m * h];
                cpu::rms_norm_backward(&mut dx, &dn, xr, &model.norm, eps);
                inject.push((l, dx));
                let dst = if tied { &mut grads.embed_rows } else { &mut grads.head_rows };
                head_row_grads(dst, dz, s, |j| candidates[j], nr, h, &slot);
            }
            (st, g.d_final)
        }
    };
    if !stats.loss.is_finite() {
        return Err(Error::NonFinite(format!("loss ({})", stats.loss)));
    }
    {
        let mut dn = vec![0.0f32; m * h];
        cpu::matmul_nn(&mut dn, h, &d_final, v, head, h, m, h, v, false);
        let mut dx = vec![0.0f32; m * h];
        cpu::rms_norm_backward(&mut dx, &dn, &xl_rows, &model.norm, eps);
        scatter_add_rows(&mut d_out, &dx, &tb.positions, h);
        let dst = if tied { &mut grads.embed_rows } else { &mut grads.head_rows };
        head_row_grads(dst, &d_final, v, |j| j as u32, &normed, h, &slot);
    }

    // Backward through the blocks.
    let mut dx = d_out;
    for (l, blk) in model.blocks.iter().enumerate().rev() {
        for (bl, g) in &inject {
            if *bl == l + 1 {
                scatter_add_rows(&mut dx, g, &tb.positions, h);
            }
        }
        let tp = &tapes[l];
        let [tq, tk, tv, to, tg, tu, td] = &tp.lin;
        // MLP: x_out = x_mid + down(silu(gate) * up)
        let mut d_act = vec![0.0f32; n * c.intermediate_size];
        lin_bwd(&ctx, l, Target::Down, &blk.down, &tp.act, td, &dx, n, &mut d_act, &mut grads.lora);
        let mut d_gate = vec![0.0f32; d_act.len()];
        let mut d_up = vec![0.0f32; d_act.len()];
        cpu::silu_mul_backward(&mut d_gate, &mut d_up, &d_act, &tp.gate, &tp.up);
        let mut dh2 = vec![0.0f32; n * h];
        lin_bwd(&ctx, l, Target::Gate, &blk.gate, &tp.h2, tg, &d_gate, n, &mut dh2, &mut grads.lora);
        lin_bwd(&ctx, l, Target::Up, &blk.up, &tp.h2, tu, &d_up, n, &mut dh2, &mut grads.lora);
        cpu::rms_norm_backward(&mut dx, &dh2, &tp.x_mid, &blk.post_norm, eps);
        // Attention: x_mid = x_in + o(attn(q, k, v))
        let mut d_attn = vec![0.0f32; n * c.q_dim()];
        lin_bwd(&ctx, l, Target::O, &blk.o, &tp.attn, to, &dx, n, &mut d_attn, &mut grads.lora);
        let mut dq = vec![0.0f32; n * c.q_dim()];
        let mut dk_h = vec![0.0f32; tp.k.len()];
        let mut dv_h = vec![0.0f32; tp.v.len()];
        cpu::attention_backward(&mut dq, &mut dk_h, &mut dv_h, &d_attn, &tp.q, &tp.k, &tp.v, &batch.mask, shape);
        let mut dk = permute_heads(&dk_h, bsz, t, c.num_kv_heads, c.head_dim, false);
        let dv = permute_heads(&dv_h, bsz, t, c.num_kv_heads, c.head_dim, false);
        // RoPE is a rotation: its backward rotates by the opposite angle.
        cpu::rope_inplace(&mut dq, c.num_heads, c.head_dim, &cos, &neg_sin);
        cpu::rope_inplace(&mut dk, c.num_kv_heads, c.head_dim, &cos, &neg_sin);
        let mut dh1 = vec![0.0f32; n * h];
        lin_bwd(&ctx, l, Target::Q, &blk.q, &tp.h1, tq, &dq, n, &mut dh1, &mut grads.lora);
        lin_bwd(&ctx, l, Target::K, &blk.k, &tp.h1, tk, &dk, n, &mut dh1, &mut grads.lora);
        lin_bwd(&ctx, l, Target::V, &blk.v, &tp.h1, tv, &dv, n, &mut dh1, &mut grads.lora);
        cpu::rms_norm_backward(&mut dx, &dh1, &tp.x_in, &blk.input_norm, eps);
    }
    // Embedding rows of trainable tokens.
    for (i, &tok) in batch.tokens.iter().enumerate() {
        let s = slot[tok as usize];
        if s != u32::MAX && batch.mask[i] {
            for (d, g) in grads.embed_rows[s as usize * h..(s as usize + 1) * h].iter_mut().zip(&dx[i * h..(i + 1) * h]) {
                *d += g;
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
