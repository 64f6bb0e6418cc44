//! Training losses on gathered response rows: plain cross-entropy (SFT) and the ILRec objective
//! (ILREC.md sections 3-7), with their gradients w.r.t. the final logits and the probe logits.
//!
//! Rows are the response positions of a micro-batch. Every returned loss, term and gradient is
//! already divided by `norm`, the number of response tokens of the whole accumulated batch
//! (ILREC.md section 7), so micro-batch results simply add up.
use crate::error::{Error, Result};
use rayon::prelude::*;

/// How the weights `w` of the self-hard negatives are computed (ILREC.md section 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum NegWeight {
    /// `w_v = exp(p̂_v) / Σ_{u∈V_N} exp(p̂_u)`, as the paper prints it.
    #[default]
    Prob,
    /// Softmax of the ensemble logits `ẑ` over `V_N` (sharper).
    Logit,
}

/// Direction of the distillation KL (ILREC.md section 5); the teacher is always detached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CpdDirection {
    /// `KL(teacher || student)`.
    #[default]
    Forward,
    /// `KL(student || teacher)`, as the paper prints it.
    Reverse,
}

/// Which distribution picks the self-hard negatives `V_N` and their weights `w`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum NegSource {
    /// The ensemble of the probed intermediate layers (ILRec, ILREC.md section 3).
    #[default]
    Intermediate,
    /// The final layer's logits restricted to the candidates: the paper's "final-layer
    /// negatives" ablation. CPD still distils into the probed layers.
    Final,
}

/// Hyper-parameters of the ILRec objective.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct IlrecParams {
    pub alpha: f32,
    pub beta: f32,
    pub lambda: f32,
    pub mu: f32,
    pub neg_weight: NegWeight,
    pub cpd_direction: CpdDirection,
    pub negatives: NegSource,
}

impl Default for IlrecParams {
    fn default() -> Self {
        IlrecParams {
            alpha: 1.0,
            beta: 0.1,
            lambda: 0.01,
            mu: 0.005,
            neg_weight: NegWeight::Prob,
            cpd_direction: CpdDirection::Forward,
            negatives: NegSource::Intermediate,
        }
    }
}

/// The response rows of a micro-batch.
#[derive(Clone, Copy, Debug)]
pub struct LossRows<'a> {
    /// Final-layer logits `[n, vocab]`.
    pub final_logits: &'a [f32],
    pub vocab: usize,
    /// Ground-truth token of each row, `[n]`.
    pub targets: &'a [u32],
    /// Rows whose ground truth is an item-identifier token: the ILRec terms apply there; the
    /// other rows get plain cross-entropy.
    pub item_mask: &'a [bool],
    /// Probe logits of the `k` blocks in P, each `[n, S]` over `candidates`.
    pub probe_logits: &'a [&'a [f32]],
    /// Vocabulary ids of the candidate sub-vocabulary, `[S]` (all ids in title mode).
    pub candidates: &'a [u32],
    /// Collaborative-filtering rewards `r_v` per row and candidate, `[n, S]`; needed when `mu > 0`.
    pub rewards: Option<&'a [f32]>,
}

/// Loss terms and statistics of one call, each loss already divided by `norm`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LossStats {
    /// The objective: `cpo + lambda * cpd + mu * crr + ce`.
    pub loss: f64,
    /// `L_CPO` summed over item rows.
    pub cpo: f64,
    /// `L_CPD` (unweighted) summed over item rows.
    pub cpd: f64,
    /// `L_CRR` (unweighted) summed over item rows.
    pub crr: f64,
    /// Plain cross-entropy summed over the other rows (all rows for SFT).
    pub ce: f64,
    /// Rows where the ILRec terms applied.
    pub item_rows: usize,
    /// `Σ |V_N|` over item rows.
    pub negatives: usize,
    /// Negatives whose final logit is below zero (the scaling then pushes them *up*).
    pub negatives_below_zero: usize,
}

impl LossStats {
    /// Adds another micro-batch's statistics.
    pub fn accumulate(&mut self, o: &LossStats) {
        self.loss += o.loss;
        self.cpo += o.cpo;
        self.cpd += o.cpd;
        self.crr += o.crr;
        self.ce += o.ce;
        self.item_rows += o.item_rows;
        self.negatives += o.negatives;
        self.negatives_below_zero += o.negatives_below_zero;
    }

    /// Mean `|V_N|` per item row.
    pub fn mean_negatives(&self) -> f64 {
        self.negatives as f64 / self.item_rows.max(1) as f64
    }

    /// Fraction of negatives with a negative final logit.
    pub fn frac_negatives_below_zero(&self) -> f64 {
        self.negatives_below_zero as f64 / self.negatives.max(1) as f64
    }
}

/// Gradients of the loss.
#[derive(Clone, Debug, Default)]
pub struct LossGrads {
    /// `dL/d final_logits`, `[n, vocab]`.
    pub d_final: Vec<f32>,
    /// `dL/d probe_logits[l]`, each `[n, S]`.
    pub d_probe: Vec<Vec<f32>>,
}

/// `log Σ exp(x)` in f64.
fn logsumexp(x: impl Iterator<Item = f64> + Clone) -> f64 {
    let max = x.clone().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return max;
    }
    max + x.map(|v| (v - max).exp()).sum::<f64>().ln()
}

/// Softmax in f64.
fn softmax(x: &[f64]) -> Vec<f64> {
    let lse = logsumexp(x.iter().copied());
    x.iter().map(|v| (v - lse).exp()).collect()
}

fn check_finite(name: &str, x: &[f32]) -> Result<()> {
    match x.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(Error::NonFinite(format!("{name} at element {i}: {}", x[i]))),
        None => Ok(()),
    }
}

/// Cross-entropy of one row: returns the loss and writes `(softmax - onehot) * scale` into `d`.
fn ce_row(z: &[f32], y: usize, scale: f64, d: &mut [f32]) -> f64 {
    let lse = logsumexp(z.iter().map(|&v| v as f64));
    for (g, &v) in d.iter_mut().zip(z) {
        *g = ((v as f64 - lse).exp() * scale) as f32;
    }
    d[y] -= scale as f32;
    lse - z[y] as f64
}

/// Plain SFT cross-entropy over `[n, vocab]` logits; returns statistics and `dL/dlogits`.
pub fn sft_loss(final_logits: &[f32], vocab: usize, targets: &[u32], norm: f64) -> Result<(LossStats, Vec<f32>)> {
    let n = targets.len();
    check_shapes(final_logits.len(), vocab, n, norm)?;
    check_targets(targets, vocab)?;
    check_finite("final logits", final_logits)?;
    let mut d = vec![0.0f32; n * vocab];
    let ce: f64 = d
        .par_chunks_mut(vocab)
        .zip(final_logits.par_chunks(vocab))
        .zip(targets.par_iter())
        .map(|((dr, z), &y)| ce_row(z, y as usize, 1.0 / norm, dr))
        .sum();
    let ce = ce / norm;
    Ok((LossStats { loss: ce, ce, ..Default::default() }, d))
}

fn check_shapes(logits_len: usize, vocab: usize, n: usize, norm: f64) -> Result<()> {
    if vocab == 0 || logits_len != n * vocab {
        return Err(Error::Input(format!("loss: logits hold {logits_len} values, expected {n} rows x {vocab}")));
    }
    if !(norm > 0.0 && norm.is_finite()) {
        return Err(Error::Input(format!("loss: normaliser must be positive, got {norm}")));
    }
    Ok(())
}

fn check_targets(targets: &[u32], vocab: usize) -> Result<()> {
    match targets.iter().position(|&t| t as usize >= vocab) {
        Some(i) => Err(Error::Input(format!("loss: target {} of row {i} is outside the vocabulary ({vocab})", targets[i]))),
        None => Ok(()),
    }
}

/// Per-row result of the ILRec objective.
#[derive(Default)]
struct RowOut {
    cpo: f64,
    cpd: f64,
    crr: f64,
    ce: f64,
    item: bool,
    negatives: usize,
    below_zero: usize,
}

/// The ILRec objective (ILREC.md sections 2-7) on the response rows of a micro-batch.
pub fn ilrec_loss(rows: &LossRows<'_>, p: &IlrecParams, norm: f64) -> Result<(LossStats, LossGrads)> {
    let LossRows { final_logits, vocab, targets, item_mask, probe_logits, candidates, rewards } = *rows;
    let n = targets.len();
    let s = candidates.len();
    let k = probe_logits.len();
    check_shapes(final_logits.len(), vocab, n, norm)?;
    check_targets(targets, vocab)?;
    if item_mask.len() != n {
        return Err(Error::Input(format!("loss: item mask has {} rows, expected {n}", item_mask.len())));
    }
    if k == 0 || s == 0 {
        return Err(Error::Input("ILRec loss: needs at least one probed block and one candidate token".into()));
    }
    if let Some((l, pl)) = probe_logits.iter().enumerate().find(|(_, pl)| pl.len() != n * s) {
        return Err(Error::Input(format!("ILRec loss: probe logits of layer index {l} hold {} values, expected {n} x {s}", pl.len())));
    }
    // Written as negations so that NaN fails every check.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    let bad = !(p.alpha > 0.0) || !(p.beta >= 0.0) || !(p.lambda >= 0.0) || !(p.mu >= 0.0);
    if bad {
        return Err(Error::Input(format!("ILRec loss: need alpha > 0 and beta, lambda, mu >= 0; got {p:?}")));
    }
    let rewards = match rewards {
        Some(r) if r.len() != n * s => return Err(Error::Input(format!("ILRec loss: rewards hold {} values, expected {n} x {s}", r.len()))),
        Some(r) => Some(r),
        None if p.mu > 0.0 => return Err(Error::Input("ILRec loss: mu > 0 needs per-position CF rewards".into())),
        None => None,
    };
    check_finite("final logits", final_logits)?;
    for (l, pl) in probe_logits.iter().enumerate() {
        check_finite(&format!("probe logits of layer index {l}"), pl)?;
    }
    if let Some(r) = rewards {
        check_finite("CF rewards", r)?;
    }
    // Candidate column of each vocabulary id (u32::MAX: not a candidate).
    let mut column = vec![u32::MAX; vocab];
    for (j, &c) in candidates.iter().enumerate() {
        if c as usize >= vocab {
            return Err(Error::Input(format!("ILRec loss: candidate token {c} is outside the vocabulary ({vocab})")));
        }
        if column[c as usize] != u32::MAX {
            return Err(Error::Input(format!("ILRec loss: candidate token {c} is listed twice")));
        }
        column[c as usize] = j as u32;
    }
    if let Some(t) = (0..n).find(|&t| item_mask[t] && column[targets[t] as usize] == u32::MAX) {
        return Err(Error::Input(format!("ILRec loss: row {t} is an item row but its target {} is not a candidate token", targets[t])));
    }

    let scale = 1.0 / norm;
    let mut d_final = vec![0.0f32; n * vocab];
    let mut d_probe_rows = vec![0.0f32; n * k * s]; // row-major [n, k, S]; transposed below
    let outs: Vec<RowOut> = d_final
        .par_chunks_mut(vocab)
        .zip(d_probe_rows.par_chunks_mut(k * s))
        .enumerate()
        .map(|(t, (df, dp))| {
            let z = &final_logits[t * vocab..(t + 1) * vocab];
            let y = targets[t] as usize;
            if !item_mask[t] {
                return RowOut { ce: ce_row(z, y, scale, df), ..Default::default() };
            }
            let jy = column[y] as usize;
            let probes: Vec<&[f32]> = probe_logits.iter().map(|pl| &pl[t * s..(t + 1) * s]).collect();
            item_row(z, y, jy, &probes, candidates, rewards.map(|r| &r[t * s..(t + 1) * s]), p, scale, df, dp)
        })
        .collect();
    let mut d_probe = vec![vec![0.0f32; n * s]; k];
    for t in 0..n {
        for (l, dl) in d_probe.iter_mut().enumerate() {
            dl[t * s..(t + 1) * s].copy_from_slice(&d_probe_rows[(t * k + l) * s..(t * k + l + 1) * s]);
        }
    }
    let mut st = LossStats::default();
    for o in &outs {
        st.cpo += o.cpo;
        st.cpd += o.cpd;
        st.crr += o.crr;
        st.ce += o.ce;
        st.item_rows += o.item as usize;
        st.negatives += o.negatives;
        st.negatives_below_zero += o.below_zero;
    }
    st.cpo *= scale;
    st.cpd *= scale;
    st.crr *= scale;
    st.ce *= scale;
    st.loss = st.cpo + p.lambda as f64 * st.cpd + p.mu as f64 * st.crr + st.ce;
    Ok((st, LossGrads { d_final, d_probe }))
}

/// One item row: CPO + lambda CPD + mu CRR, gradients scaled by `scale` written into `df`
/// (`[vocab]`) and `dp` (`[k, S]`).
#[allow(clippy::too_many_arguments)]
fn item_row(
    z: &[f32],
    y: usize,
    jy: usize,
    probes: &[&[f32]],
    candidates: &[u32],
    rewards: Option<&[f32]>,
    p: &IlrecParams,
    scale: f64,
    df: &mut [f32],
    dp: &mut [f32],
) -> RowOut {
    let s = candidates.len();
    let k = probes.len();
    // Ensemble of the probed layers and its softmax over the candidates (section 2), or the
    // final layer's candidate logits for the final-layer-negatives ablation; a constant either way.
    let zhat: Vec<f64> = match p.negatives {
        NegSource::Intermediate => (0..s).map(|j| probes.iter().map(|pl| pl[j] as f64).sum::<f64>() / k as f64).collect(),
        NegSource::Final => candidates.iter().map(|&c| z[c as usize] as f64).collect(),
    };
    let phat = softmax(&zhat);
    // Self-hard negatives (section 3): candidates the ensemble rates at least alpha times the
    // ground truth.
    let tau = p.alpha as f64 * phat[jy];
    let negs: Vec<usize> = (0..s).filter(|&j| j != jy && phat[j] >= tau).collect();
    // Their weights (section 4), constants.
    let raw: Vec<f64> = match p.neg_weight {
        NegWeight::Prob => negs.iter().map(|&j| phat[j]).collect(),
        NegWeight::Logit => negs.iter().map(|&j| zhat[j]).collect(),
    };
    let w = if raw.is_empty() { vec![] } else { softmax(&raw) };
    // Per-vocabulary-id scale factor of the CPO logits: 1 + beta * w for negatives, else 1.
    let mut mult: Vec<(usize, f64)> = negs.iter().zip(&w).map(|(&j, &wj)| (candidates[j] as usize, 1.0 + p.beta as f64 * wj)).collect();
    mult.sort_unstable_by_key(|m| m.0);
    let below_zero = negs.iter().filter(|&&j| z[candidates[j] as usize] < 0.0).count();

    // CPO: cross-entropy over s_v = z_v * mult_v; dL/dz_v = q_v * mult_v - [v = y].
    let mut sv: Vec<f64> = z.iter().map(|&v| v as f64).collect();
    for &(v, m) in &mult {
        sv[v] *= m;
    }
    let lse_s = logsumexp(sv.iter().copied());
    let cpo = lse_s - sv[y];
    for (g, &x) in df.iter_mut().zip(&sv) {
        *g = ((x - lse_s).exp() * scale) as f32;
    }
    for &(v, m) in &mult {
        df[v] = ((sv[v] - lse_s).exp() * m * scale) as f32;
    }
    df[y] -= scale as f32;

    // CRR (section 6): soft labels over H = V_N ∪ {y} from the CF rewards, on the unscaled
    // logits: L = Σ_H q_v (lse(z) - z_v), dL/dz = softmax(z) - q.
    let mut crr = 0.0;
    if let (Some(r), true) = (rewards, p.mu > 0.0) {
        let mut h: Vec<usize> = negs.clone();
        h.push(jy);
        let q = softmax(&h.iter().map(|&j| r[j] as f64).collect::<Vec<_>>());
        let lse_z = logsumexp(z.iter().map(|&v| v as f64));
        let ms = p.mu as f64 * scale;
        for (g, &v) in df.iter_mut().zip(z) {
            *g += ((v as f64 - lse_z).exp() * ms) as f32;
        }
        for (&j, &qj) in h.iter().zip(&q) {
            let v = candidates[j] as usize;
            crr += qj * (lse_z - z[v] as f64);
            df[v] -= (qj * ms) as f32;
        }
    }

    // CPD (section 5): the final layer restricted to the candidates teaches each probed layer.
    let teacher = softmax(&candidates.iter().map(|&c| z[c as usize] as f64).collect::<Vec<_>>());
    let log_t: Vec<f64> = teacher.iter().map(|t| t.ln()).collect();
    let mut cpd = 0.0;
    let ls = p.lambda as f64 * scale;
    for (l, pl) in probes.iter().enumerate() {
        let zl: Vec<f64> = pl.iter().map(|&v| v as f64).collect();
        let lse_l = logsumexp(zl.iter().copied());
        let log_s: Vec<f64> = zl.iter().map(|v| v - lse_l).collect();
        let g = &mut dp[l * s..(l + 1) * s];
        match p.cpd_direction {
            CpdDirection::Forward => {
                // KL(T || S_l) = Σ T (log T - log S_l); d/dz^l = S_l - T.
                let kl: f64 = (0..s).filter(|&j| teacher[j] > 0.0).map(|j| teacher[j] * (log_t[j] - log_s[j])).sum();
                cpd += kl;
                for j in 0..s {
                    g[j] = ((log_s[j].exp() - teacher[j]) * ls) as f32;
                }
            }
            CpdDirection::Reverse => {
                // KL(S_l || T) = Σ S_l (log S_l - log T); d/dz^l_j = S_l,j (log S_l,j - log T_j - KL).
                let kl: f64 = (0..s).map(|j| log_s[j].exp() * (log_s[j] - log_t[j])).sum();
                cpd += kl;
                for j in 0..s {
                    g[j] = (log_s[j].exp() * (log_s[j] - log_t[j] - kl) * ls) as f32;
                }
            }
        }
    }
    RowOut { cpo, cpd, crr, ce: 0.0, item: true, negatives: negs.len(), below_zero }
}
