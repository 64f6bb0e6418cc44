//! Collaborative-filtering token rewards for CRR (ILREC.md section 6): a CF model's item
//! distribution `R(i)` turned into a next-token distribution under the item trie.
//!
//! For response position `t` with ground-truth prefix `y_<t`, `I_<t` is the set of items whose
//! identifier starts with `y_<t`, and `r_v = Σ_{i ∈ I_<t, token_t(i) = v} R(i) / Σ_{i ∈ I_<t} R(i)`:
//! the mass of the trie child `v` of the node reached by `y_<t`, relative to that node's mass.
use crate::error::{Error, Result};

/// Item identifiers and the candidate columns of the ILRec loss, built once per item set.
#[derive(Clone, Debug)]
pub struct RewardTable {
    /// Per item: its identifier tokens.
    item_tokens: Vec<Vec<u32>>,
    /// Candidate column of each vocabulary id (`u32::MAX`: not a candidate).
    column: Vec<u32>,
    columns: usize,
}

impl RewardTable {
    /// `item_tokens[i]`: item `i`'s identifier tokens; `candidates`: the loss's candidate
    /// vocabulary ids (`[S]`, column order of the rewards). Every identifier token must be a
    /// candidate.
    pub fn new(item_tokens: &[Vec<u32>], candidates: &[u32]) -> Result<Self> {
        let max = candidates.iter().copied().max().unwrap_or(0) as usize;
        let mut column = vec![u32::MAX; max + 1];
        for (j, &c) in candidates.iter().enumerate() {
            column[c as usize] = j as u32;
        }
        for (i, toks) in item_tokens.iter().enumerate() {
            if let Some(&t) = toks.iter().find(|&&t| column.get(t as usize).is_none_or(|&c| c == u32::MAX)) {
                return Err(Error::Input(format!("CF rewards: token {t} of item {i} is not a candidate token")));
            }
        }
        Ok(RewardTable { item_tokens: item_tokens.to_vec(), column, columns: candidates.len() })
    }

    /// Rewards `[rows, S]` for a sample whose target item is `target`: row `t < len(target
    /// identifier)` holds `r_v` over the candidates (zero off the trie node's children), later
    /// rows (EOS) are zero. `probs[i] = R(i)` over all items (non-negative, finite, summing to
    /// about 1). A node whose items all have `R = 0` gets zero rewards.
    pub fn rewards(&self, probs: &[f32], target: usize, rows: usize) -> Result<Vec<f32>> {
        let n = self.item_tokens.len();
        if probs.len() != n {
            return Err(Error::Input(format!("CF rewards: {} item probabilities for {n} items", probs.len())));
        }
        if let Some((i, p)) = probs.iter().enumerate().find(|(_, p)| !(p.is_finite() && **p >= 0.0)) {
            return Err(Error::NonFinite(format!("CF rewards: R(item {i}) = {p}")));
        }
        let y = self.item_tokens.get(target).ok_or_else(|| Error::Input(format!("CF rewards: target item {target} of {n}")))?;
        let s = self.columns;
        let mut out = vec![0.0f32; rows * s];
        // Items still matching the ground-truth prefix; narrowed one level per position.
        let mut live: Vec<usize> = (0..n).collect();
        for (t, &yt) in y.iter().enumerate().take(rows) {
            let mut mass = vec![0.0f64; s];
            let mut total = 0.0f64;
            for &i in &live {
                if let Some(&v) = self.item_tokens[i].get(t) {
                    mass[self.column[v as usize] as usize] += probs[i] as f64;
                    total += probs[i] as f64;
                }
            }
            if total > 0.0 {
                for (o, m) in out[t * s..(t + 1) * s].iter_mut().zip(&mass) {
                    *o = (m / total) as f32;
                }
            }
            live.retain(|&i| self.item_tokens[i].get(t) == Some(&yt));
        }
        Ok(out)
    }
}

/// `softmax(scores)` in f64, returned as f32: the CF model's item distribution `R`.
pub fn item_distribution(scores: &[f32]) -> Vec<f32> {
    let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = scores.iter().map(|&x| (x as f64 - m).exp()).collect();
    let z: f64 = e.iter().sum();
    e.iter().map(|v| (v / z) as f32).collect()
}
