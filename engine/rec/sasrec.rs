//! SASRec (Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018): a causal
//! Transformer over a user's item history that scores every item as the next one
//! (docs/sasrec.md). Pure Rust, CPU only, with a hand-written backward pass.
//!
//! Model, per history of at most `max_len` items (the most recent ones, left-padded):
//! - input `x = E[item] * sqrt(hidden) + P[pos]`, then dropout; `E` is the item embedding table
//!   `[n_items + 1, hidden]` (row 0 = padding, item `i` -> row `i + 1`), `P` the learned
//!   positional table `[max_len, hidden]`; the most recent item always sits at position
//!   `max_len - 1` (left padding);
//! - `layers` pre-LayerNorm blocks: `x += Attn(LN1(x))`, `x += FFN(LN2(x))`; causal multi-head
//!   attention with q/k/v/o projections (weights and biases), dropout on the attention
//!   probabilities; the point-wise FFN is `fc2(dropout(relu(fc1(h))))` followed by dropout,
//!   both `hidden -> hidden`;
//! - a final LayerNorm; the score of item `i` is `z_last · E[i + 1]` (tied embeddings).
//!
//! Padding: positions before the first item are neither attended to nor materialised. Only the
//! real items of each history are packed into the activation matrices, which is exactly a
//! left-padded batch with padding keys masked out and padding outputs zeroed, so a history's
//! scores do not depend on how much padding it carries or on the other histories of a batch.
//!
//! Training: full softmax cross-entropy over all items at every position that has a next item
//! (SASRec trained with CE as in recent work, instead of the original's one sampled negative).
//! See [`SasRecConfig::window_stride`] for how a user's training sequence becomes windows.
//!
//! The forward and backward passes are generic over the float type: training and inference use
//! f32 (large products through the engine's `gemm` matmuls), the finite-difference check of
//! tests/sasrec.rs runs the same code in f64 ([`testing`]).
use std::collections::HashMap;
use std::fmt;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Sub, SubAssign};
use std::path::Path;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::backend::cpu::{matmul_nn, matmul_nt, matmul_tn};
use crate::error::{Error, Result};
use crate::rec::data::Sample;
use crate::rec::metrics::Metrics;
use crate::rng::Rng;
use crate::train::checkpoint::atomic_write;
use crate::train::optim::{clip_grad_norm, AdamW, Optimizer, ParamRef};
use crate::weights::SafetensorsSet;

/// Defines `fn $name<T: Real>(args) -> ret` that runs the `#[inline(always)]` function `$imp`
/// inside a copy compiled for AVX-512 (or AVX2) when the CPU has it, so its loops vectorise over
/// wider registers. The arithmetic and its order are unchanged (no fused multiply-adds are
/// introduced), so results do not depend on the instruction set.
macro_rules! wide {
    ($(#[$m:meta])* fn $name:ident => $imp:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        fn $name<T: Real>($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx512f")]
                fn avx512<T: Real>($($arg: $ty),*) -> $ret {
                    $imp($($arg),*)
                }
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx2")]
                fn avx2<T: Real>($($arg: $ty),*) -> $ret {
                    $imp($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the feature the function is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $imp($($arg),*)
        }
    };
}

/// SASRec hyperparameters. Every field is optional in a config file (defaults below); unknown
/// fields are errors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SasRecConfig {
    /// Width of the item and position embeddings and of every hidden layer (the FFN too).
    /// Default 64.
    pub hidden: usize,
    /// Number of Transformer blocks. Default 2.
    pub layers: usize,
    /// Attention heads per block; must divide `hidden`. Default 1.
    pub heads: usize,
    /// Longest history the model reads: longer histories keep their `max_len` most recent
    /// items. Also the number of learned positions. Default 20 (the data's history cap).
    pub max_len: usize,
    /// Dropout probability on the input embeddings, the attention probabilities, the FFN's
    /// hidden activation and the FFN's output. Default 0.2.
    pub dropout: f32,
    /// AdamW learning rate (constant). Default 1e-3.
    pub lr: f64,
    /// AdamW decoupled weight decay, applied to the matrices (embeddings and projections), not
    /// to biases and LayerNorm parameters. Default 0.
    pub weight_decay: f64,
    /// Adam beta1. Default 0.9.
    pub beta1: f64,
    /// Adam beta2. Default 0.98 (the original SASRec's).
    pub beta2: f64,
    /// Clip the gradient 2-norm of each step to this value; 0 disables clipping. Default 0.
    pub max_grad_norm: f32,
    /// Passes over the training windows. Default 30.
    pub epochs: usize,
    /// Training windows per optimiser step. Default 128.
    pub batch: usize,
    /// Seed of the weight initialisation, the per-epoch shuffling and the dropout masks; a
    /// training run is deterministic given the seed and the data. Default 42.
    pub seed: u64,
    /// How a user's training sequence (its first history item, then every training target)
    /// becomes training windows of at most `max_len` inputs. Windows end at the most recent item
    /// and then every `window_stride` items earlier; each target's loss is taken in exactly one
    /// window, the one where it has the most preceding context, so every target sees at least
    /// `max_len - window_stride + 1` earlier items (or all of them when fewer exist).
    /// Unset (the default): `ceil(max_len / 2)`, 10 for `max_len` 20. `max_len` cuts the
    /// sequence into non-overlapping windows (cheapest; a target at a window's start sees few
    /// items); `1` gives every target its full `max_len` context (like training on every
    /// prefix; about `max_len` times the Transformer work); `0` keeps only the most recent
    /// window per user (the original SASRec, which drops older interactions). Values above
    /// `max_len` act as `max_len`.
    pub window_stride: Option<usize>,
}

impl Default for SasRecConfig {
    fn default() -> Self {
        SasRecConfig {
            hidden: 64,
            layers: 2,
            heads: 1,
            max_len: 20,
            dropout: 0.2,
            lr: 1e-3,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.98,
            max_grad_norm: 0.0,
            epochs: 30,
            batch: 128,
            seed: 42,
            window_stride: None,
        }
    }
}

impl SasRecConfig {
    /// Rejects sizes of zero, heads that do not divide `hidden`, a dropout outside [0, 1) and
    /// optimiser settings AdamW rejects.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, msg: String| Err(Error::Input(format!("SASRec config `{field}`: {msg}")));
        if self.hidden == 0 {
            return bad("hidden", "must be at least 1".into());
        }
        if self.heads == 0 || !self.hidden.is_multiple_of(self.heads) {
            return bad(
                "heads",
                format!("{} does not divide hidden = {}", self.heads, self.hidden),
            );
        }
        if self.layers == 0 {
            return bad("layers", "must be at least 1".into());
        }
        if self.max_len == 0 {
            return bad("max_len", "must be at least 1".into());
        }
        if !(self.dropout.is_finite() && (0.0..1.0).contains(&self.dropout)) {
            return bad("dropout", format!("{} is outside [0, 1)", self.dropout));
        }
        if self.batch == 0 {
            return bad("batch", "must be at least 1".into());
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return bad(
                "max_grad_norm",
                format!("{} is not a non-negative number", self.max_grad_norm),
            );
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", format!("{} is not a positive number", self.lr));
        }
        self.adamw().validate()
    }

    /// The window stride in effect: `window_stride`, or `ceil(max_len / 2)` when unset.
    pub fn stride(&self) -> usize {
        self.window_stride.unwrap_or(self.max_len.div_ceil(2))
    }

    fn adamw(&self) -> AdamW {
        AdamW {
            lr: self.lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: 1e-8,
            weight_decay: self.weight_decay,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Float abstraction (f32 for training and inference, f64 for the gradient check)

/// The arithmetic the model needs, for f32 and f64.
trait Real:
    Copy
    + Default
    + PartialOrd
    + Send
    + Sync
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
{
    const ZERO: Self;
    const ONE: Self;
    fn of(x: f64) -> Self;
    fn to_f64(self) -> f64;
    /// `xs[i] = exp(xs[i] - shift)`; returns the sum of the new values.
    fn exp_shift_sum(xs: &mut [Self], shift: Self) -> Self;
    fn sqrt(self) -> Self;
    /// `y[m, n] (+)= x[m, k] · w[n, k]^T` (contiguous rows).
    fn mm_nt(y: &mut [Self], x: &[Self], w: &[Self], m: usize, n: usize, k: usize, acc: bool);
    /// `y[m, n] (+)= x[m, k] · w[k, n]`.
    fn mm_nn(y: &mut [Self], x: &[Self], w: &[Self], m: usize, n: usize, k: usize, acc: bool);
    /// `y[m, n] (+)= x[k, m]^T · w[k, n]`.
    fn mm_tn(y: &mut [Self], x: &[Self], w: &[Self], m: usize, n: usize, k: usize, acc: bool);
}

impl Real for f32 {
    const ZERO: f32 = 0.0;
    const ONE: f32 = 1.0;
    fn of(x: f64) -> f32 {
        x as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn exp_shift_sum(xs: &mut [f32], shift: f32) -> f32 {
        crate::backend::cpu::exp_shift_sum(xs, shift)
    }
    fn sqrt(self) -> f32 {
        f32::sqrt(self)
    }
    fn mm_nt(y: &mut [f32], x: &[f32], w: &[f32], m: usize, n: usize, k: usize, acc: bool) {
        matmul_nt(y, n, x, k, w, k, m, n, k, acc)
    }
    fn mm_nn(y: &mut [f32], x: &[f32], w: &[f32], m: usize, n: usize, k: usize, acc: bool) {
        matmul_nn(y, n, x, k, w, n, m, n, k, acc)
    }
    fn mm_tn(y: &mut [f32], x: &[f32], w: &[f32], m: usize, n: usize, k: usize, acc: bool) {
        matmul_tn(y, n, x, m, w, n, m, n, k, acc)
    }
}

wide! {
    /// [`xent_row`] of each of `rows` (row `i` of `logits` belongs to packed position `rows[i]`).
    fn ce_rows => ce_rows_impl(logits: &mut [T], rows: &[usize], targets: &[u32], n: usize, inv: T, want: bool) -> f64
}

#[inline(always)]
fn ce_rows_impl<T: Real>(logits: &mut [T], rows: &[usize], targets: &[u32], n: usize, inv: T, want: bool) -> f64 {
    let mut t = 0.0;
    for (row, &r) in logits.chunks_exact_mut(n).zip(rows) {
        t += xent_row(row, targets[r] as usize, inv, want);
    }
    t
}

/// One row of the cross-entropy: `row` holds the logits over all items; returns the loss of
/// target `tgt` and, when `want`, replaces the row by `inv * (softmax - onehot(tgt))`.
#[inline(always)]
fn xent_row<T: Real>(row: &mut [T], tgt: usize, inv: T, want: bool) -> f64 {
    let mx = max(row);
    let at_target = row[tgt];
    let s = T::exp_shift_sum(row, mx);
    if want {
        let k = inv / s;
        row.iter_mut().for_each(|v| *v *= k);
        row[tgt] -= inv;
    }
    mx.to_f64() + s.to_f64().ln() - at_target.to_f64()
}

impl Real for f64 {
    const ZERO: f64 = 0.0;
    const ONE: f64 = 1.0;
    fn of(x: f64) -> f64 {
        x
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn exp_shift_sum(xs: &mut [f64], shift: f64) -> f64 {
        xs.iter_mut().fold(0.0, |t, v| {
            *v = (*v - shift).exp();
            t + *v
        })
    }
    fn sqrt(self) -> f64 {
        f64::sqrt(self)
    }
    // Plain loops: the f64 path only runs the tiny gradient-check models.
    fn mm_nt(y: &mut [f64], x: &[f64], w: &[f64], m: usize, n: usize, k: usize, acc: bool) {
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k).map(|p| x[i * k + p] * w[j * k + p]).sum();
                y[i * n + j] = if acc { y[i * n + j] + s } else { s };
            }
        }
    }
    fn mm_nn(y: &mut [f64], x: &[f64], w: &[f64], m: usize, n: usize, k: usize, acc: bool) {
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k).map(|p| x[i * k + p] * w[p * n + j]).sum();
                y[i * n + j] = if acc { y[i * n + j] + s } else { s };
            }
        }
    }
    fn mm_tn(y: &mut [f64], x: &[f64], w: &[f64], m: usize, n: usize, k: usize, acc: bool) {
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k).map(|p| x[p * m + i] * w[p * n + j]).sum();
                y[i * n + j] = if acc { y[i * n + j] + s } else { s };
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parameters

/// LayerNorm epsilon (the original SASRec's 1e-8).
const LN_EPS: f64 = 1e-8;

/// Tensor indices: the two embedding tables, then `PER_LAYER` tensors per block, then the final
/// LayerNorm's weight and bias.
const EMB: usize = 0;
const POS: usize = 1;
const PER_LAYER: usize = 16;
const LN1_W: usize = 0;
const WQ: usize = 2;
const WK: usize = 4;
const WV: usize = 6;
const WO: usize = 8;
const LN2_W: usize = 10;
const W1: usize = 12;
const W2: usize = 14;
const LAYER_NAMES: [&str; PER_LAYER] = [
    "attn_norm.weight",
    "attn_norm.bias",
    "attn.q.weight",
    "attn.q.bias",
    "attn.k.weight",
    "attn.k.bias",
    "attn.v.weight",
    "attn.v.bias",
    "attn.o.weight",
    "attn.o.bias",
    "ffn_norm.weight",
    "ffn_norm.bias",
    "ffn.fc1.weight",
    "ffn.fc1.bias",
    "ffn.fc2.weight",
    "ffn.fc2.bias",
];

/// Marks a packed position whose next item is not a loss term.
const NO_TARGET: u32 = u32::MAX;

/// Model sizes.
#[derive(Clone, Copy, Debug)]
struct Dims {
    n_items: usize,
    d: usize,
    heads: usize,
    dh: usize,
    len: usize,
    layers: usize,
}

impl Dims {
    fn new(n_items: usize, cfg: &SasRecConfig) -> Result<Dims> {
        cfg.validate()?;
        if n_items == 0 || n_items >= u32::MAX as usize {
            return Err(Error::Input(format!(
                "SASRec needs 1 to {} items, got {n_items}",
                u32::MAX - 1
            )));
        }
        Ok(Dims {
            n_items,
            d: cfg.hidden,
            heads: cfg.heads,
            dh: cfg.hidden / cfg.heads,
            len: cfg.max_len,
            layers: cfg.layers,
        })
    }

    /// Index of tensor `k` (`LN1_W`..) of block `l`.
    fn li(&self, l: usize, k: usize) -> usize {
        2 + l * PER_LAYER + k
    }

    /// Index of the final LayerNorm weight (its bias follows).
    fn lnf(&self) -> usize {
        2 + self.layers * PER_LAYER
    }

    /// (name, shape, weight decay) of every tensor, in index order.
    fn specs(&self) -> Vec<(String, Vec<usize>, bool)> {
        let d = self.d;
        let mut v = vec![
            ("item_emb.weight".to_string(), vec![self.n_items + 1, d], true),
            ("pos_emb.weight".to_string(), vec![self.len, d], true),
        ];
        for l in 0..self.layers {
            for name in LAYER_NAMES {
                let matrix = name.starts_with("attn.") || name.starts_with("ffn.");
                let matrix = matrix && name.ends_with(".weight");
                let shape = if matrix { vec![d, d] } else { vec![d] };
                v.push((format!("layers.{l}.{name}"), shape, matrix));
            }
        }
        v.push(("final_norm.weight".to_string(), vec![d], false));
        v.push(("final_norm.bias".to_string(), vec![d], false));
        v
    }
}

/// Xavier-normal matrices (as the original SASRec), zero biases, unit LayerNorm weights; the
/// padding row of the item table is zero and stays zero (it never receives a gradient).
fn init_params(dm: &Dims, rng: &mut Rng) -> Vec<Vec<f32>> {
    dm.specs()
        .into_iter()
        .map(|(name, shape, _)| {
            let n: usize = shape.iter().product();
            if shape.len() == 2 {
                let std = (2.0 / (shape[0] + shape[1]) as f64).sqrt() as f32;
                let mut v: Vec<f32> = (0..n).map(|_| rng.normal() * std).collect();
                if name == "item_emb.weight" {
                    v[..dm.d].fill(0.0);
                }
                v
            } else if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else {
                vec![0.0; n]
            }
        })
        .collect()
}

/// Mutable views of tensors `i` and `i + 1` (a weight and its bias).
fn pair<T>(g: &mut [Vec<T>], i: usize) -> (&mut [T], &mut [T]) {
    let (a, b) = g[i..].split_at_mut(1);
    (&mut a[0], &mut b[0])
}

// ---------------------------------------------------------------------------------------------
// Training windows and packed batches

/// One training window: up to `max_len` input items and, per input, the next item or
/// [`NO_TARGET`].
#[derive(Clone, Debug)]
struct Window {
    input: Vec<u32>,
    targets: Vec<u32>,
}

/// Rebuilds each user's training sequence from consecutive samples: a sample continues the
/// current sequence when it has the same user, a non-empty history that is a suffix of the
/// sequence, and that history is the whole sequence or at least as long as the previous
/// sample's (a capped history). `leave_one_out` output chains into one sequence per user
/// (`i_1..i_{n-2}`); anything else starts a new sequence `history + target`.
fn user_sequences(train: &[Sample]) -> Vec<Vec<u32>> {
    let mut seqs = Vec::new();
    let mut cur: Vec<u32> = Vec::new();
    let mut cur_user = None;
    let mut prev_h = 0;
    for s in train {
        let h = s.history.len();
        let chains = cur_user == Some(s.user)
            && h >= 1
            && h <= cur.len()
            && cur[cur.len() - h..] == s.history[..]
            && (h == cur.len() || h >= prev_h);
        if !chains {
            if cur.len() >= 2 {
                seqs.push(std::mem::take(&mut cur));
            }
            cur.clear();
            cur.extend_from_slice(&s.history);
            cur_user = Some(s.user);
        }
        cur.push(s.target);
        prev_h = h;
    }
    if cur.len() >= 2 {
        seqs.push(cur);
    }
    seqs
}

/// Cuts one sequence into windows (see [`SasRecConfig::window_stride`]).
fn windows_of(seq: &[u32], len: usize, stride: usize, out: &mut Vec<Window>) {
    let m = seq.len();
    if m < 2 {
        return;
    }
    let stride = stride.min(len);
    // Inputs seq[a..b], targets seq[a + 1..=b].
    let mut b = m - 1;
    loop {
        let a = b.saturating_sub(len);
        let earliest = stride == 0 || b <= stride;
        let lo = if earliest { a + 1 } else { (b + 1 - stride).max(a + 1) };
        let targets = (a + 1..=b).map(|t| if t >= lo { seq[t] } else { NO_TARGET }).collect();
        out.push(Window {
            input: seq[a..b].to_vec(),
            targets,
        });
        if earliest {
            break;
        }
        b -= stride;
    }
}

/// A batch of histories with only their real items materialised: history `s` occupies rows
/// `seqs[s].0 .. seqs[s].0 + seqs[s].1`, oldest first, at positions ending at `max_len - 1`.
struct Packed {
    items: Vec<u32>,
    pos: Vec<u32>,
    targets: Vec<u32>,
    seqs: Vec<(usize, usize)>,
}

impl Packed {
    /// Packs histories (each already at most `len` items, non-empty) with optional targets.
    fn new<'a>(rows: impl Iterator<Item = (&'a [u32], Option<&'a [u32]>)>, len: usize) -> Packed {
        let mut p = Packed {
            items: Vec::new(),
            pos: Vec::new(),
            targets: Vec::new(),
            seqs: Vec::new(),
        };
        for (input, targets) in rows {
            let n = input.len();
            p.seqs.push((p.items.len(), n));
            p.items.extend_from_slice(input);
            p.pos.extend((len - n..len).map(|x| x as u32));
            match targets {
                Some(t) => p.targets.extend_from_slice(t),
                None => p.targets.extend(std::iter::repeat_n(NO_TARGET, n)),
            }
        }
        p
    }

    fn tokens(&self) -> usize {
        self.items.len()
    }
}

// ---------------------------------------------------------------------------------------------
// Forward

struct Dropout<'a> {
    rng: &'a mut Rng,
    p: f32,
}

/// A dropout mask of `n` scale factors (0 or `1 / (1 - p)`), or `None` without dropout.
fn draw_mask<T: Real>(drop: &mut Option<Dropout<'_>>, n: usize) -> Option<Vec<T>> {
    let dr = drop.as_mut()?;
    if dr.p <= 0.0 {
        return None;
    }
    // Four 16-bit uniforms per generator call; an element is dropped when its uniform is below
    // `thr`, so the drop probability is `thr / 2^16` (p to 1e-5) and the kept scale matches it.
    let thr = (dr.p as f64 * 65536.0).round().clamp(1.0, 65535.0) as u64;
    let keep = T::of(65536.0 / (65536 - thr) as f64);
    let pick = |u: u64| if u & 0xFFFF < thr { T::ZERO } else { keep };
    let mut m = vec![T::ZERO; n];
    let mut chunks = m.chunks_exact_mut(4);
    for c in &mut chunks {
        let r = dr.rng.next_u64();
        c[0] = pick(r);
        c[1] = pick(r >> 16);
        c[2] = pick(r >> 32);
        c[3] = pick(r >> 48);
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        let r = dr.rng.next_u64();
        for (k, v) in rest.iter_mut().enumerate() {
            *v = pick(r >> (16 * k));
        }
    }
    Some(m)
}

fn mul_inplace<T: Real>(x: &mut [T], m: &[T]) {
    x.iter_mut().zip(m).for_each(|(a, &b)| *a *= b);
}

fn add_inplace<T: Real>(x: &mut [T], y: &[T]) {
    x.iter_mut().zip(y).for_each(|(a, &b)| *a += b);
}

struct LnCache<T> {
    xhat: Vec<T>,
    rstd: Vec<T>,
    out: Vec<T>,
}

fn ln_forward<T: Real>(x: &[T], w: &[T], b: &[T], d: usize) -> LnCache<T> {
    let rows = x.len() / d;
    let mut c = LnCache {
        xhat: vec![T::ZERO; x.len()],
        rstd: vec![T::ZERO; rows],
        out: vec![T::ZERO; x.len()],
    };
    ln_forward_rows(x, w, b, &mut c.xhat, &mut c.rstd, &mut c.out, d);
    c
}

wide! {
    fn ln_forward_rows => ln_forward_rows_impl(
        x: &[T], w: &[T], b: &[T], xhat: &mut [T], rstd: &mut [T], out: &mut [T], d: usize,
    ) -> ()
}

#[inline(always)]
fn ln_forward_rows_impl<T: Real>(x: &[T], w: &[T], b: &[T], xhat: &mut [T], rstd: &mut [T], out: &mut [T], d: usize) {
    let inv_d = T::of(1.0 / d as f64);
    let eps = T::of(LN_EPS);
    for (r, rs) in rstd.iter_mut().enumerate() {
        let xr = &x[r * d..(r + 1) * d];
        let xh = &mut xhat[r * d..(r + 1) * d];
        let mean = sum(xr) * inv_d;
        xh.iter_mut().zip(xr).for_each(|(h, &v)| *h = v - mean);
        let var = dot(xh, xh) * inv_d;
        let s = T::ONE / (var + eps).sqrt();
        *rs = s;
        let o = &mut out[r * d..(r + 1) * d];
        for j in 0..d {
            xh[j] *= s;
            o[j] = xh[j] * w[j] + b[j];
        }
    }
}

/// `y = x W^T + b` for `d x d` weights.
fn linear<T: Real>(x: &[T], w: &[T], b: &[T], d: usize) -> Vec<T> {
    let rows = x.len() / d;
    let mut y = Vec::with_capacity(x.len());
    (0..rows).for_each(|_| y.extend_from_slice(b));
    T::mm_nt(&mut y, x, w, rows, d, d, true);
    y
}

struct LayerCache<T> {
    ln1: LnCache<T>,
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    /// Softmax probabilities (before dropout), per history and head an `n x n` block (rows =
    /// queries; entries above the diagonal are 0).
    probs: Vec<T>,
    pmask: Option<Vec<T>>,
    /// Concatenated head outputs `[tokens, d]` (the input of the o projection).
    att: Vec<T>,
    ln2: LnCache<T>,
    /// fc1 output before the ReLU.
    f1: Vec<T>,
    /// `relu(f1) * rmask`, the input of fc2.
    r: Vec<T>,
    rmask: Option<Vec<T>>,
    omask: Option<Vec<T>>,
}

struct Cache<T> {
    emask: Option<Vec<T>>,
    /// Start of each history's probability blocks in `LayerCache::probs`.
    prob_off: Vec<usize>,
    layers: Vec<LayerCache<T>>,
    /// Final LayerNorm; `lnf.out` is the output `z` `[tokens, d]`.
    lnf: LnCache<T>,
}

/// Per-history mutable row blocks of `[tokens, d]` buffers and of the probability buffer.
fn split_rows<'a, T>(buf: &'a mut [T], b: &Packed, width: usize) -> Vec<&'a mut [T]> {
    let mut out = Vec::with_capacity(b.seqs.len());
    let mut rest = buf;
    for &(_, n) in &b.seqs {
        let (head, tail) = rest.split_at_mut(n * width);
        out.push(head);
        rest = tail;
    }
    out
}

fn split_probs<'a, T>(buf: &'a mut [T], b: &Packed, heads: usize) -> Vec<&'a mut [T]> {
    let mut out = Vec::with_capacity(b.seqs.len());
    let mut rest = buf;
    for &(_, n) in &b.seqs {
        let (head, tail) = rest.split_at_mut(heads * n * n);
        out.push(head);
        rest = tail;
    }
    out
}

/// Reductions with 8 independent accumulators (the compiler keeps a serial sum serial; eight
/// lanes let it use vector registers). The summation order is fixed.
#[inline(always)]
fn fold_lanes<T: Real>(acc: [T; 8]) -> T {
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

#[inline(always)]
fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::ZERO; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = fold_lanes(acc);
    ra.iter().zip(rb).for_each(|(&x, &y)| s += x * y);
    s
}

#[inline(always)]
fn sum<T: Real>(a: &[T]) -> T {
    let mut acc = [T::ZERO; 8];
    let ca = a.chunks_exact(8);
    let ra = ca.remainder();
    for x in ca {
        for i in 0..8 {
            acc[i] += x[i];
        }
    }
    let mut s = fold_lanes(acc);
    ra.iter().for_each(|&x| s += x);
    s
}

#[inline(always)]
fn max<T: Real>(a: &[T]) -> T {
    let mut acc = [a[0]; 8];
    let ca = a.chunks_exact(8);
    let ra = ca.remainder();
    for x in ca {
        for i in 0..8 {
            acc[i] = if x[i] > acc[i] { x[i] } else { acc[i] };
        }
    }
    let mut m = a[0];
    acc.iter().chain(ra).for_each(|&x| m = if x > m { x } else { m });
    m
}

/// What the per-history attention kernels read: q, k, v `[tokens, d]`, the dropout mask of the
/// probabilities, sizes and the score scale `1 / sqrt(dh)`.
struct AttnCtx<'a, T> {
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    pmask: Option<&'a [T]>,
    d: usize,
    dh: usize,
    heads: usize,
    scale: T,
}

/// Causal attention within each history; returns (head outputs `[tokens, d]`, probabilities).
fn attention_forward<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    b: &Packed,
    dm: &Dims,
    prob_off: &[usize],
    pmask: Option<&[T]>,
) -> (Vec<T>, Vec<T>) {
    let (d, heads) = (dm.d, dm.heads);
    let total: usize = b.seqs.iter().map(|&(_, n)| heads * n * n).sum();
    let mut att = vec![T::ZERO; b.tokens() * d];
    let mut probs = vec![T::ZERO; total];
    let ctx = AttnCtx {
        q,
        k,
        v,
        pmask,
        d,
        dh: dm.dh,
        heads,
        scale: T::of(1.0 / (dm.dh as f64).sqrt()),
    };
    let jobs: Vec<_> = split_rows(&mut att, b, d)
        .into_iter()
        .zip(split_probs(&mut probs, b, heads))
        .zip(b.seqs.iter().zip(prob_off))
        .collect();
    jobs.into_par_iter()
        .for_each(|((out, pr), (&(start, n), &off))| attn_fwd_seq(&ctx, start, n, off, out, pr));
    (att, probs)
}

wide! {
    /// Attention of one history (rows `start..start + n`): writes its head outputs to `out`
    /// (its rows) and its probabilities to `pr` (its blocks, which start at `off` in the mask).
    fn attn_fwd_seq => attn_fwd_seq_impl(
        c: &AttnCtx<'_, T>, start: usize, n: usize, off: usize, out: &mut [T], pr: &mut [T],
    ) -> ()
}

#[inline(always)]
fn attn_fwd_seq_impl<T: Real>(c: &AttnCtx<'_, T>, start: usize, n: usize, off: usize, out: &mut [T], pr: &mut [T]) {
    let (d, dh) = (c.d, c.dh);
    let mut scores = vec![T::ZERO; n];
    for h in 0..c.heads {
        let col = h * dh;
        for i in 0..n {
            let qi = &c.q[(start + i) * d + col..][..dh];
            for (j, s) in scores[..=i].iter_mut().enumerate() {
                *s = dot(qi, &c.k[(start + j) * d + col..][..dh]) * c.scale;
            }
            let mx = max(&scores[..=i]);
            let total = T::exp_shift_sum(&mut scores[..=i], mx);
            let inv = T::ONE / total;
            let row = &mut pr[h * n * n + i * n..][..n];
            let o = &mut out[i * d + col..][..dh];
            for j in 0..=i {
                let p = scores[j] * inv;
                row[j] = p;
                let w = match c.pmask {
                    Some(m) => p * m[off + h * n * n + i * n + j],
                    None => p,
                };
                let vj = &c.v[(start + j) * d + col..][..dh];
                o.iter_mut().zip(vj).for_each(|(a, &x)| *a += w * x);
            }
        }
    }
}

/// The forward pass over a packed batch; dropout when `drop` is given with `p > 0`.
fn forward<T: Real>(p: &[Vec<T>], dm: &Dims, b: &Packed, mut drop: Option<Dropout<'_>>) -> Cache<T> {
    let (d, t) = (dm.d, b.tokens());
    let scale = T::of((d as f64).sqrt());
    let mut x = vec![T::ZERO; t * d];
    for (i, xr) in x.chunks_exact_mut(d).enumerate() {
        let e = &p[EMB][(b.items[i] as usize + 1) * d..][..d];
        let ps = &p[POS][b.pos[i] as usize * d..][..d];
        for j in 0..d {
            xr[j] = e[j] * scale + ps[j];
        }
    }
    let emask = draw_mask(&mut drop, t * d);
    if let Some(m) = &emask {
        mul_inplace(&mut x, m);
    }
    let mut prob_off = Vec::with_capacity(b.seqs.len());
    let mut total = 0;
    for &(_, n) in &b.seqs {
        prob_off.push(total);
        total += dm.heads * n * n;
    }
    let mut layers = Vec::with_capacity(dm.layers);
    for l in 0..dm.layers {
        let w = |k: usize| &p[dm.li(l, k)];
        let ln1 = ln_forward(&x, w(LN1_W), w(LN1_W + 1), d);
        let q = linear(&ln1.out, w(WQ), w(WQ + 1), d);
        let k = linear(&ln1.out, w(WK), w(WK + 1), d);
        let v = linear(&ln1.out, w(WV), w(WV + 1), d);
        let pmask = draw_mask(&mut drop, total);
        let (att, probs) = attention_forward(&q, &k, &v, b, dm, &prob_off, pmask.as_deref());
        let o = linear(&att, w(WO), w(WO + 1), d);
        add_inplace(&mut x, &o);
        let ln2 = ln_forward(&x, w(LN2_W), w(LN2_W + 1), d);
        let f1 = linear(&ln2.out, w(W1), w(W1 + 1), d);
        let rmask = draw_mask(&mut drop, t * d);
        let mut r: Vec<T> = f1.iter().map(|&a| if a > T::ZERO { a } else { T::ZERO }).collect();
        if let Some(m) = &rmask {
            mul_inplace(&mut r, m);
        }
        let mut f2 = linear(&r, w(W2), w(W2 + 1), d);
        let omask = draw_mask(&mut drop, t * d);
        if let Some(m) = &omask {
            mul_inplace(&mut f2, m);
        }
        add_inplace(&mut x, &f2);
        layers.push(LayerCache {
            ln1,
            q,
            k,
            v,
            probs,
            pmask,
            att,
            ln2,
            f1,
            r,
            rmask,
            omask,
        });
    }
    let f = dm.lnf();
    let lnf = ln_forward(&x, &p[f], &p[f + 1], d);
    Cache {
        emask,
        prob_off,
        layers,
        lnf,
    }
}

// ---------------------------------------------------------------------------------------------
// Loss and backward

/// Rows of the logit matrix computed at once (bounds memory at `CE_CHUNK * n_items` floats and
/// keeps the block in cache between the softmax and the two gradient products).
const CE_CHUNK: usize = 256;

/// Softmax cross-entropy over all items at every packed position with a target, given the final
/// hidden states `z`. Returns (sum of the losses, number of loss positions). With `grad =
/// Some((dz, g_emb))`, adds `scale` times the gradient of the summed loss w.r.t. `z` to `dz` and
/// w.r.t. the item table (output side) to `g_emb`.
fn cross_entropy<T: Real>(
    p: &[Vec<T>],
    dm: &Dims,
    b: &Packed,
    z: &[T],
    scale: f64,
    mut grad: Option<(&mut [T], &mut [T])>,
) -> (f64, usize) {
    let (n, d) = (dm.n_items, dm.d);
    let rows: Vec<usize> = (0..b.tokens()).filter(|&i| b.targets[i] != NO_TARGET).collect();
    if rows.is_empty() {
        return (0.0, 0);
    }
    let inv = T::of(scale);
    let e1 = &p[EMB][d..];
    let mut total = 0.0f64;
    let want = grad.is_some();
    let cap = rows.len().min(CE_CHUNK);
    let mut zc = vec![T::ZERO; cap * d];
    let mut dzc = vec![T::ZERO; if want { cap * d } else { 0 }];
    let mut logits = vec![T::ZERO; cap * n];
    for chunk in rows.chunks(CE_CHUNK) {
        let rc = chunk.len();
        let (zc, logits) = (&mut zc[..rc * d], &mut logits[..rc * n]);
        for (dst, &r) in zc.chunks_exact_mut(d).zip(chunk) {
            dst.copy_from_slice(&z[r * d..(r + 1) * d]);
        }
        T::mm_nt(logits, zc, e1, rc, n, d, false);
        total += ce_rows(logits, chunk, &b.targets, n, inv, want);
        if let Some((dz, g_emb)) = grad.as_mut() {
            let dzc = &mut dzc[..rc * d];
            T::mm_nn(dzc, logits, e1, rc, d, n, false);
            for (src, &r) in dzc.chunks_exact(d).zip(chunk) {
                add_inplace(&mut dz[r * d..(r + 1) * d], src);
            }
            T::mm_tn(&mut g_emb[d..], logits, zc, n, d, rc, true);
        }
    }
    (total, rows.len())
}

/// LayerNorm backward: adds to `dx` and to the weight/bias gradients.
fn ln_backward<T: Real>(dy: &[T], c: &LnCache<T>, w: &[T], gw: &mut [T], gb: &mut [T], dx: &mut [T], d: usize) {
    ln_backward_rows(dy, &c.xhat, &c.rstd, w, gw, gb, dx, d);
}

wide! {
    fn ln_backward_rows => ln_backward_rows_impl(
        dy: &[T], xhat: &[T], rstd: &[T], w: &[T], gw: &mut [T], gb: &mut [T], dx: &mut [T], d: usize,
    ) -> ()
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn ln_backward_rows_impl<T: Real>(
    dy: &[T],
    xhat: &[T],
    rstd: &[T],
    w: &[T],
    gw: &mut [T],
    gb: &mut [T],
    dx: &mut [T],
    d: usize,
) {
    let inv_d = T::of(1.0 / d as f64);
    let mut dxhat = vec![T::ZERO; d];
    for (r, &rs) in rstd.iter().enumerate() {
        let dyr = &dy[r * d..(r + 1) * d];
        let xh = &xhat[r * d..(r + 1) * d];
        for j in 0..d {
            gw[j] += dyr[j] * xh[j];
            gb[j] += dyr[j];
            dxhat[j] = dyr[j] * w[j];
        }
        let m1 = sum(&dxhat) * inv_d;
        let m2 = dot(&dxhat, xh) * inv_d;
        let dxr = &mut dx[r * d..(r + 1) * d];
        for j in 0..d {
            dxr[j] += rs * (dxhat[j] - m1 - xh[j] * m2);
        }
    }
}

/// Backward of `y = x W^T + b` (`d x d`): adds `dy^T x` to `gw`, the column sums of `dy` to
/// `gb` and `dy W` to `dx`.
fn linear_backward<T: Real>(dy: &[T], x: &[T], w: &[T], (gw, gb): (&mut [T], &mut [T]), dx: &mut [T], d: usize) {
    let rows = dy.len() / d;
    T::mm_tn(gw, dy, x, d, d, rows, true);
    dy.chunks_exact(d).for_each(|r| add_inplace(gb, r));
    T::mm_nn(dx, dy, w, rows, d, d, true);
}

/// Backward of [`attention_forward`]: returns (dq, dk, dv).
fn attention_backward<T: Real>(
    datt: &[T],
    lc: &LayerCache<T>,
    b: &Packed,
    dm: &Dims,
    prob_off: &[usize],
) -> [Vec<T>; 3] {
    let (d, heads) = (dm.d, dm.heads);
    let t = b.tokens();
    let mut dq = vec![T::ZERO; t * d];
    let mut dk = vec![T::ZERO; t * d];
    let mut dv = vec![T::ZERO; t * d];
    let ctx = AttnCtx {
        q: &lc.q,
        k: &lc.k,
        v: &lc.v,
        pmask: lc.pmask.as_deref(),
        d,
        dh: dm.dh,
        heads,
        scale: T::of(1.0 / (dm.dh as f64).sqrt()),
    };
    let jobs: Vec<_> = split_rows(&mut dq, b, d)
        .into_iter()
        .zip(split_rows(&mut dk, b, d))
        .zip(split_rows(&mut dv, b, d))
        .zip(b.seqs.iter().zip(prob_off))
        .collect();
    jobs.into_par_iter().for_each(|(((gq, gk), gv), (&(start, n), &off))| {
        attn_bwd_seq(&ctx, &lc.probs, datt, start, n, off, gq, gk, gv)
    });
    [dq, dk, dv]
}

wide! {
    /// Backward of [`attn_fwd_seq`] for one history: adds its rows of dq, dk, dv.
    fn attn_bwd_seq => attn_bwd_seq_impl(
        c: &AttnCtx<'_, T>, probs: &[T], datt: &[T], start: usize, n: usize, off: usize,
        gq: &mut [T], gk: &mut [T], gv: &mut [T],
    ) -> ()
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attn_bwd_seq_impl<T: Real>(
    c: &AttnCtx<'_, T>,
    probs: &[T],
    datt: &[T],
    start: usize,
    n: usize,
    off: usize,
    gq: &mut [T],
    gk: &mut [T],
    gv: &mut [T],
) {
    let (d, dh) = (c.d, c.dh);
    let mut dp = vec![T::ZERO; n];
    for h in 0..c.heads {
        let col = h * dh;
        let blk = off + h * n * n;
        for i in 0..n {
            let go = &datt[(start + i) * d + col..][..dh];
            let pr = &probs[blk + i * n..][..n];
            let mut rowsum = T::ZERO;
            for j in 0..=i {
                let m = c.pmask.map_or(T::ONE, |m| m[blk + i * n + j]);
                // out_i = sum_j p_ij m_ij v_j
                let vj = &c.v[(start + j) * d + col..][..dh];
                let wv = pr[j] * m;
                gv[j * d + col..][..dh]
                    .iter_mut()
                    .zip(go)
                    .for_each(|(a, &g)| *a += wv * g);
                let g = dot(go, vj) * m;
                dp[j] = g;
                rowsum += pr[j] * g;
            }
            let qi = &c.q[(start + i) * d + col..][..dh];
            for j in 0..=i {
                let ds = pr[j] * (dp[j] - rowsum) * c.scale;
                let kj = &c.k[(start + j) * d + col..][..dh];
                gq[i * d + col..][..dh]
                    .iter_mut()
                    .zip(kj)
                    .for_each(|(a, &x)| *a += ds * x);
                gk[j * d + col..][..dh]
                    .iter_mut()
                    .zip(qi)
                    .for_each(|(a, &x)| *a += ds * x);
            }
        }
    }
}

/// Backpropagates `dz` (gradient w.r.t. the final hidden states) into `g` (accumulating).
fn backward<T: Real>(p: &[Vec<T>], dm: &Dims, b: &Packed, c: &Cache<T>, dz: &[T], g: &mut [Vec<T>]) {
    let (d, t) = (dm.d, b.tokens());
    let mut dx = vec![T::ZERO; t * d];
    let f = dm.lnf();
    {
        let (gw, gb) = pair(g, f);
        ln_backward(dz, &c.lnf, &p[f], gw, gb, &mut dx, d);
    }
    for l in (0..dm.layers).rev() {
        let lc = &c.layers[l];
        let i = |k: usize| dm.li(l, k);
        // x_out = x_mid + omask * fc2(r)
        let mut df2 = dx.clone();
        if let Some(m) = &lc.omask {
            mul_inplace(&mut df2, m);
        }
        let mut dr = vec![T::ZERO; t * d];
        linear_backward(&df2, &lc.r, &p[i(W2)], pair(g, i(W2)), &mut dr, d);
        // r = relu(f1) * rmask
        for (j, a) in dr.iter_mut().enumerate() {
            let m = lc.rmask.as_ref().map_or(T::ONE, |m| m[j]);
            *a = if lc.f1[j] > T::ZERO { *a * m } else { T::ZERO };
        }
        let mut dh2 = vec![T::ZERO; t * d];
        linear_backward(&dr, &lc.ln2.out, &p[i(W1)], pair(g, i(W1)), &mut dh2, d);
        {
            let (gw, gb) = pair(g, i(LN2_W));
            ln_backward(&dh2, &lc.ln2, &p[i(LN2_W)], gw, gb, &mut dx, d);
        }
        // x_mid = x_in + o(att)
        let mut datt = vec![T::ZERO; t * d];
        linear_backward(&dx, &lc.att, &p[i(WO)], pair(g, i(WO)), &mut datt, d);
        let [dq, dk, dv] = attention_backward(&datt, lc, b, dm, &c.prob_off);
        let mut dh1 = vec![T::ZERO; t * d];
        linear_backward(&dq, &lc.ln1.out, &p[i(WQ)], pair(g, i(WQ)), &mut dh1, d);
        linear_backward(&dk, &lc.ln1.out, &p[i(WK)], pair(g, i(WK)), &mut dh1, d);
        linear_backward(&dv, &lc.ln1.out, &p[i(WV)], pair(g, i(WV)), &mut dh1, d);
        let (gw, gb) = pair(g, i(LN1_W));
        ln_backward(&dh1, &lc.ln1, &p[i(LN1_W)], gw, gb, &mut dx, d);
    }
    if let Some(m) = &c.emask {
        mul_inplace(&mut dx, m);
    }
    let scale = T::of((d as f64).sqrt());
    let (ge, gp) = g.split_at_mut(POS);
    let (ge, gp) = (&mut ge[EMB], &mut gp[0]);
    for (i, dxr) in dx.chunks_exact(d).enumerate() {
        let e = &mut ge[(b.items[i] as usize + 1) * d..][..d];
        e.iter_mut().zip(dxr).for_each(|(a, &v)| *a += v * scale);
        let ps = &mut gp[b.pos[i] as usize * d..][..d];
        add_inplace(ps, dxr);
    }
}

/// A batch is split into this many shards (contiguous, about equal token counts) that run in
/// parallel, each with its own dropout generator and gradient buffers, summed in shard order.
/// Fixed rather than the thread count, so results do not depend on the machine.
const SHARDS: usize = 4;

/// Forward, loss and (with `grads`) backward of one batch of (inputs, targets) windows, with
/// dropout `(generator, p)` when given. Returns (sum of the losses, loss positions); the
/// gradients, added to `grads`, are those of the mean loss.
fn batch_loss<T: Real>(
    p: &[Vec<T>],
    dm: &Dims,
    rows: &[(&[u32], &[u32])],
    mut dropout: Option<(&mut Rng, f32)>,
    mut grads: Option<&mut [Vec<T>]>,
) -> (f64, usize) {
    let count: usize = rows
        .iter()
        .map(|(_, t)| t.iter().filter(|&&x| x != NO_TARGET).count())
        .sum();
    if count == 0 {
        return (0.0, 0);
    }
    let scale = 1.0 / count as f64;
    let tokens: usize = rows.iter().map(|r| r.0.len()).sum();
    let mut shards = Vec::with_capacity(SHARDS);
    let (mut start, mut acc) = (0, 0);
    for (i, r) in rows.iter().enumerate() {
        acc += r.0.len();
        if acc * SHARDS >= tokens * (shards.len() + 1) {
            shards.push(&rows[start..=i]);
            start = i + 1;
        }
    }
    if start < rows.len() {
        shards.push(&rows[start..]);
    }
    let p_drop = dropout.as_ref().map_or(0.0, |d| d.1);
    let seeds: Vec<Option<u64>> = shards
        .iter()
        .map(|_| dropout.as_mut().map(|d| d.0.next_u64()))
        .collect();
    let want = grads.is_some();
    let results: Vec<(f64, Option<Vec<Vec<T>>>)> = shards
        .par_iter()
        .zip(seeds)
        .map(|(rows, seed)| {
            let b = Packed::new(rows.iter().map(|&(i, t)| (i, Some(t))), dm.len);
            let mut rng = seed.map(Rng::new);
            let drop = rng.as_mut().map(|rng| Dropout { rng, p: p_drop });
            let cache = forward(p, dm, &b, drop);
            if !want {
                return (cross_entropy(p, dm, &b, &cache.lnf.out, scale, None).0, None);
            }
            let mut g: Vec<Vec<T>> = p.iter().map(|x| vec![T::ZERO; x.len()]).collect();
            let mut dz = vec![T::ZERO; b.tokens() * dm.d];
            let (sum, _) = cross_entropy(p, dm, &b, &cache.lnf.out, scale, Some((&mut dz, &mut g[EMB])));
            if sum.is_finite() {
                backward(p, dm, &b, &cache, &dz, &mut g);
            }
            (sum, Some(g))
        })
        .collect();
    let mut total = 0.0;
    for (sum, g) in results {
        total += sum;
        if let (Some(dst), Some(g)) = (grads.as_mut(), g) {
            dst.iter_mut().zip(&g).for_each(|(a, b)| add_inplace(a, b));
        }
    }
    (total, count)
}

// ---------------------------------------------------------------------------------------------
// The model

/// A SASRec model: its config, its item count and its weights (f32).
#[derive(Clone)]
pub struct SasRec {
    cfg: SasRecConfig,
    dims: Dims,
    params: Vec<Vec<f32>>,
}

impl fmt::Debug for SasRec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SasRec")
            .field("n_items", &self.dims.n_items)
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// Format tag in the safetensors metadata of a saved model.
const FORMAT: &str = "ilrec.sasrec.v1";
/// Users per forward pass when scoring.
const SCORE_BATCH: usize = 512;

fn check_items(what: &str, items: &[u32], n_items: usize) -> Result<()> {
    if let Some(&bad) = items.iter().find(|&&i| i as usize >= n_items) {
        return Err(Error::Input(format!(
            "{what}: item id {bad} is out of range (the model has {n_items} items, ids 0..{n_items})"
        )));
    }
    Ok(())
}

impl SasRec {
    /// An untrained model with seeded Xavier-normal weights (see the module docs).
    pub fn new(n_items: usize, cfg: &SasRecConfig) -> Result<SasRec> {
        let dims = Dims::new(n_items, cfg)?;
        let mut rng = Rng::new(cfg.seed);
        let params = init_params(&dims, &mut rng);
        Ok(SasRec {
            cfg: cfg.clone(),
            dims,
            params,
        })
    }

    /// Trains a model on the training samples of a leave-one-out split (each user's samples
    /// consecutive, prefixes in ascending order, as `leave_one_out` produces; other sample lists
    /// work too, see `user_sequences` in the source): every user's training sequence is rebuilt,
    /// cut into windows ([`SasRecConfig::window_stride`]), and each epoch shuffles the windows
    /// and takes one AdamW step per `batch` windows on the mean cross-entropy. `progress` gets
    /// (epoch, epochs, mean loss per position) after each epoch (epochs 1-based).
    ///
    /// Errors: an invalid config or item count, an item id `>= n_items`, training data without
    /// a single predictable position (`Error::Input`); a non-finite loss or gradient
    /// (`Error::NonFinite`).
    pub fn train(
        train: &[Sample],
        n_items: usize,
        cfg: &SasRecConfig,
        progress: &mut dyn FnMut(usize, usize, f64),
    ) -> Result<SasRec> {
        let dims = Dims::new(n_items, cfg)?;
        for (i, s) in train.iter().enumerate() {
            check_items(&format!("training sample {i} (user {})", s.user), &s.history, n_items)?;
            check_items(
                &format!("training sample {i} (user {}) target", s.user),
                &[s.target],
                n_items,
            )?;
        }
        let mut windows = Vec::new();
        for seq in user_sequences(train) {
            windows_of(&seq, cfg.max_len, cfg.stride(), &mut windows);
        }
        if windows.is_empty() {
            return Err(Error::Input(format!(
                "SASRec training data has no position to predict ({} samples; a sample needs a \
                 non-empty history)",
                train.len()
            )));
        }
        // One generator: the initialisation, then shuffling and dropout.
        let mut rng = Rng::new(cfg.seed);
        let params = init_params(&dims, &mut rng);
        let mut model = SasRec {
            cfg: cfg.clone(),
            dims,
            params,
        };
        model.fit(&windows, &mut rng, progress)?;
        Ok(model)
    }

    fn fit(&mut self, windows: &[Window], rng: &mut Rng, progress: &mut dyn FnMut(usize, usize, f64)) -> Result<()> {
        let cfg = self.cfg.clone();
        let specs = self.dims.specs();
        let shapes: Vec<(&str, &[usize])> = specs.iter().map(|(n, s, _)| (n.as_str(), s.as_slice())).collect();
        let mut opt = Optimizer::new(cfg.adamw(), &shapes)?;
        let mut grads: Vec<Vec<f32>> = self.params.iter().map(|p| vec![0.0; p.len()]).collect();
        let mut order: Vec<usize> = (0..windows.len()).collect();
        for epoch in 0..cfg.epochs {
            // Fisher-Yates.
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i + 1));
            }
            let (mut sum, mut count) = (0.0f64, 0usize);
            for (step, idx) in order.chunks(cfg.batch).enumerate() {
                let rows: Vec<(&[u32], &[u32])> = idx
                    .iter()
                    .map(|&w| (windows[w].input.as_slice(), windows[w].targets.as_slice()))
                    .collect();
                grads.iter_mut().for_each(|g| g.fill(0.0));
                let drop = Some((&mut *rng, cfg.dropout));
                let (s, c) = batch_loss(&self.params, &self.dims, &rows, drop, Some(&mut grads));
                if !s.is_finite() {
                    return Err(Error::NonFinite(format!(
                        "SASRec training loss (epoch {}, step {step})",
                        epoch + 1
                    )));
                }
                if c == 0 {
                    continue;
                }
                sum += s;
                count += c;
                if cfg.max_grad_norm > 0.0 {
                    let mut gs: Vec<&mut [f32]> = grads.iter_mut().map(|g| g.as_mut_slice()).collect();
                    let norm = clip_grad_norm(&mut gs, cfg.max_grad_norm);
                    if !norm.is_finite() {
                        return Err(Error::NonFinite(format!(
                            "SASRec gradient norm (epoch {}, step {step})",
                            epoch + 1
                        )));
                    }
                }
                let mut refs: Vec<ParamRef<'_>> = specs
                    .iter()
                    .zip(self.params.iter_mut())
                    .zip(&grads)
                    .map(|(((name, _, decay), values), grad)| ParamRef {
                        name,
                        values,
                        grad,
                        decay: *decay,
                    })
                    .collect();
                opt.step(&mut refs, cfg.lr)?;
            }
            progress(epoch + 1, cfg.epochs, if count > 0 { sum / count as f64 } else { 0.0 });
        }
        Ok(())
    }

    /// The config the model was built with.
    pub fn config(&self) -> &SasRecConfig {
        &self.cfg
    }

    /// The number of items it scores (dense ids `0..n_items`).
    pub fn n_items(&self) -> usize {
        self.dims.n_items
    }

    /// The weights as (name, shape, values), in a fixed order (the order of the saved file and
    /// of [`testing`]'s parameter lists).
    pub fn tensors(&self) -> Vec<(String, Vec<usize>, &[f32])> {
        self.dims
            .specs()
            .into_iter()
            .zip(&self.params)
            .map(|((name, shape, _), v)| (name, shape, v.as_slice()))
            .collect()
    }

    /// Scores (logits) of all `n_items` items as the next item after `history` (dense ids,
    /// oldest first; only the `max_len` most recent are read). No dropout. Errors: an empty
    /// history or an item id `>= n_items` (`Error::Input`), non-finite scores
    /// (`Error::NonFinite`).
    pub fn scores(&self, history: &[u32]) -> Result<Vec<f32>> {
        Ok(self.scores_batch(&[history])?.pop().unwrap_or_default())
    }

    /// [`SasRec::scores`] of many histories at once (one packed forward pass per 512
    /// histories); the result for a history does not depend on the others.
    pub fn scores_batch(&self, histories: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        let n = self.dims.n_items;
        let len = self.dims.len;
        for (i, h) in histories.iter().enumerate() {
            if h.is_empty() {
                return Err(Error::Input(format!(
                    "history {i} is empty: SASRec needs at least one item"
                )));
            }
            check_items(&format!("history {i}"), h, n)?;
        }
        let mut out = Vec::with_capacity(histories.len());
        for chunk in histories.chunks(SCORE_BATCH) {
            let packed = Packed::new(chunk.iter().map(|h| (&h[h.len().saturating_sub(len)..], None)), len);
            let cache = forward(&self.params, &self.dims, &packed, None);
            let d = self.dims.d;
            let mut last = vec![0.0f32; chunk.len() * d];
            for (dst, &(start, k)) in last.chunks_exact_mut(d).zip(&packed.seqs) {
                let r = start + k - 1;
                dst.copy_from_slice(&cache.lnf.out[r * d..(r + 1) * d]);
            }
            let mut logits = vec![0.0f32; chunk.len() * n];
            f32::mm_nt(&mut logits, &last, &self.params[EMB][d..], chunk.len(), n, d, false);
            if logits.iter().any(|v| !v.is_finite()) {
                return Err(Error::NonFinite("SASRec scores".into()));
            }
            out.extend(logits.chunks_exact(n).map(<[f32]>::to_vec));
        }
        Ok(out)
    }

    /// The `k` best items of `history`: highest score first, ties broken by the lower item id.
    pub fn top_k(&self, history: &[u32], k: usize) -> Result<Vec<u32>> {
        Ok(top_k(&self.scores(history)?, k))
    }

    /// Full-ranking Hit@5/10 and NDCG@5/10 of the samples' targets given their histories: all
    /// `n_items` items are ranked by score (ties by the lower id), items of the history
    /// included (they are not excluded from the ranking). Errors as [`SasRec::scores`], plus a
    /// target `>= n_items`.
    pub fn evaluate(&self, samples: &[Sample]) -> Result<Metrics> {
        for (i, s) in samples.iter().enumerate() {
            check_items(
                &format!("sample {i} (user {}) target", s.user),
                &[s.target],
                self.dims.n_items,
            )?;
        }
        let mut m = Metrics::default();
        for chunk in samples.chunks(SCORE_BATCH) {
            let hist: Vec<&[u32]> = chunk.iter().map(|s| s.history.as_slice()).collect();
            let scores = self.scores_batch(&hist)?;
            let ranked: Vec<Vec<u32>> = scores.par_iter().map(|s| top_k(s, 10)).collect();
            for (r, s) in ranked.iter().zip(chunk) {
                m.add(r, s.target);
            }
        }
        Ok(m)
    }

    /// Writes the model to one safetensors file (weights as F32; the config as JSON, the item
    /// count and a format tag in the file's metadata), atomically (a temp file renamed over
    /// `path`).
    pub fn save(&self, path: &Path) -> Result<()> {
        let tensors = self.tensors();
        let mut views = Vec::with_capacity(tensors.len());
        for (name, shape, data) in &tensors {
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                shape.clone(),
                bytemuck::cast_slice(data),
            )
            .map_err(|e| Error::Input(format!("tensor `{name}`: {e}")))?;
            views.push((name.clone(), view));
        }
        let cfg = serde_json::to_string(&self.cfg).map_err(|e| Error::Input(format!("SASRec config: {e}")))?;
        let meta = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("config".to_string(), cfg),
            ("n_items".to_string(), self.dims.n_items.to_string()),
        ]);
        let bytes = safetensors::serialize(views, Some(meta))
            .map_err(|e| Error::Input(format!("serialising the SASRec model: {e}")))?;
        atomic_write(path, &bytes)
    }

    /// Reads a model written by [`SasRec::save`]. Errors name the file and the field or tensor
    /// at fault: not a safetensors file, a missing or wrong format tag, config or item count,
    /// a missing, extra, misshapen or non-finite tensor.
    pub fn load(path: &Path) -> Result<SasRec> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| Error::format(path, "safetensors", e.to_string()))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let field = |name: &str| {
            meta.get(name).ok_or_else(|| Error::MissingField {
                path: path.to_path_buf(),
                field: format!("__metadata__.{name}"),
            })
        };
        let invalid = |name: &str, msg: String| Error::InvalidField {
            path: path.to_path_buf(),
            field: format!("__metadata__.{name}"),
            msg,
        };
        let format = field("format")?;
        if format != FORMAT {
            return Err(invalid("format", format!("`{format}` is not `{FORMAT}`")));
        }
        let cfg: SasRecConfig = serde_json::from_str(field("config")?).map_err(|e| invalid("config", e.to_string()))?;
        let n_items: usize = field("n_items")?
            .parse()
            .map_err(|e| invalid("n_items", format!("{e}")))?;
        let dims = Dims::new(n_items, &cfg).map_err(|e| invalid("config", e.to_string()))?;
        drop(bytes);
        let set = SafetensorsSet::open_files(&[path.to_path_buf()])?;
        let specs = dims.specs();
        if let Some(extra) = set.names().into_iter().find(|n| !specs.iter().any(|(s, _, _)| s == n)) {
            return Err(Error::format(
                path,
                "SASRec model",
                format!("unexpected tensor `{extra}` (layers = {})", cfg.layers),
            ));
        }
        let mut params = Vec::with_capacity(specs.len());
        for (name, shape, _) in &specs {
            let v = set.get_f32(name, shape)?;
            if v.iter().any(|x| !x.is_finite()) {
                return Err(Error::NonFinite(format!("{}: tensor `{name}`", path.display())));
            }
            params.push(v);
        }
        Ok(SasRec { cfg, dims, params })
    }
}

/// The `k` highest scores' indices, best first, ties broken by the lower index (NaN ranks
/// last).
fn top_k(scores: &[f32], k: usize) -> Vec<u32> {
    let better =
        |a: (f32, u32), b: (f32, u32)| a.0 > b.0 || (a.0 == b.0 && a.1 < b.1) || (b.0.is_nan() && !a.0.is_nan());
    let mut top: Vec<(f32, u32)> = Vec::with_capacity(k + 1);
    if k == 0 {
        return Vec::new();
    }
    for (i, &s) in scores.iter().enumerate() {
        let e = (s, i as u32);
        if top.len() == k && !better(e, top[k - 1]) {
            continue;
        }
        let at = top.partition_point(|&x| better(x, e));
        top.insert(at, e);
        top.truncate(k);
    }
    top.into_iter().map(|(_, i)| i).collect()
}

// ---------------------------------------------------------------------------------------------
// Hooks for tests/sasrec.rs

/// Loss and gradients of the training objective for the gradient check (not a stable API).
#[doc(hidden)]
pub mod testing {
    use super::*;

    /// (name, shape) of every tensor, in the order the other functions take them.
    pub fn param_specs(n_items: usize, cfg: &SasRecConfig) -> Result<Vec<(String, Vec<usize>)>> {
        Ok(Dims::new(n_items, cfg)?
            .specs()
            .into_iter()
            .map(|(n, s, _)| (n, s))
            .collect())
    }

    fn run<T: Real>(
        n_items: usize,
        cfg: &SasRecConfig,
        params: &[Vec<T>],
        seqs: &[Vec<u32>],
        dropout_seed: u64,
        want_grads: bool,
    ) -> Result<(f64, Vec<Vec<T>>)> {
        let dm = Dims::new(n_items, cfg)?;
        let specs = dm.specs();
        if params.len() != specs.len() {
            return Err(Error::Input(format!(
                "{} tensors, expected {}",
                params.len(),
                specs.len()
            )));
        }
        for ((name, shape, _), p) in specs.iter().zip(params) {
            if p.len() != shape.iter().product::<usize>() {
                return Err(Error::Input(format!(
                    "tensor `{name}` has {} values, shape {shape:?}",
                    p.len()
                )));
            }
        }
        for s in seqs {
            check_items("sequence", s, n_items)?;
        }
        let mut windows = Vec::new();
        for s in seqs {
            windows_of(s, cfg.max_len, cfg.stride(), &mut windows);
        }
        let rows: Vec<(&[u32], &[u32])> = windows
            .iter()
            .map(|w| (w.input.as_slice(), w.targets.as_slice()))
            .collect();
        let mut rng = Rng::new(dropout_seed);
        let mut grads: Vec<Vec<T>> = params.iter().map(|p| vec![T::ZERO; p.len()]).collect();
        let drop = Some((&mut rng, cfg.dropout));
        let (sum, count) = batch_loss(params, &dm, &rows, drop, want_grads.then_some(grads.as_mut_slice()));
        if count == 0 {
            return Err(Error::Input("no position to predict".into()));
        }
        Ok((sum / count as f64, grads))
    }

    /// The mean training loss of the item sequences `seqs` (each cut into windows with
    /// `cfg.stride()`, all windows in one batch), with dropout masks drawn from
    /// `Rng::new(dropout_seed)` (so a fixed seed gives a deterministic function of the
    /// parameters), computed in f64, and its gradient w.r.t. every tensor.
    pub fn loss_and_grads_f64(
        n_items: usize,
        cfg: &SasRecConfig,
        params: &[Vec<f64>],
        seqs: &[Vec<u32>],
        dropout_seed: u64,
    ) -> Result<(f64, Vec<Vec<f64>>)> {
        run(n_items, cfg, params, seqs, dropout_seed, true)
    }

    /// [`loss_and_grads_f64`] without the gradients.
    pub fn loss_f64(
        n_items: usize,
        cfg: &SasRecConfig,
        params: &[Vec<f64>],
        seqs: &[Vec<u32>],
        dropout_seed: u64,
    ) -> Result<f64> {
        Ok(run(n_items, cfg, params, seqs, dropout_seed, false)?.0)
    }

    /// The same computation in f32 (the training code path).
    pub fn loss_and_grads_f32(
        n_items: usize,
        cfg: &SasRecConfig,
        params: &[Vec<f32>],
        seqs: &[Vec<u32>],
        dropout_seed: u64,
    ) -> Result<(f64, Vec<Vec<f32>>)> {
        run(n_items, cfg, params, seqs, dropout_seed, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_every_target_once() {
        let seq: Vec<u32> = (0..13).collect();
        for stride in 0..=5 {
            let mut w = Vec::new();
            windows_of(&seq, 5, stride, &mut w);
            let mut seen = vec![0; seq.len()];
            for win in &w {
                assert!(win.input.len() <= 5 && win.input.len() == win.targets.len());
                for (j, &t) in win.targets.iter().enumerate() {
                    if t != NO_TARGET {
                        seen[t as usize] += 1;
                        assert_eq!(t, win.input[j] + 1);
                    }
                }
            }
            if stride == 0 {
                assert_eq!(w.len(), 1);
                assert_eq!(seen[8..], [1, 1, 1, 1, 1]);
            } else {
                assert_eq!(seen[1..], [1; 12], "stride {stride}");
            }
        }
    }

    #[test]
    fn top_k_breaks_ties_by_lower_id() {
        assert_eq!(top_k(&[1.0, 3.0, 3.0, f32::NAN, 2.0, 3.0], 4), vec![1, 2, 5, 4]);
    }
}
