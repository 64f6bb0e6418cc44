//! Trie-constrained, batched beam search over item identifiers (ILREC.md section 1,
//! "Decoding"; docs/decoding.md).
//!
//! The search itself ([`search`]) only sees next-token logits through [`Decoder`]; [`recommend`]
//! drives it with the model and a KV cache, all users' beams in one forward per step.
use super::trie::ItemTrie;
use crate::error::{Error, Result};
use crate::model::{Batch, ForwardOptions, KvCache, LogitsMode, Model};
use serde::Serialize;
use std::cmp::Ordering;

/// Beam-search settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BeamOptions {
    /// Live hypotheses kept per user (ILREC.md: 20).
    pub beam: usize,
    /// Items returned per user (`1..=beam`).
    pub top_k: usize,
    /// Users are processed in chunks of `max(1, max_rows / beam)`, bounding the rows of each
    /// forward (and the KV cache) to about `max_rows`.
    pub max_rows: usize,
}

impl Default for BeamOptions {
    fn default() -> Self {
        BeamOptions { beam: 20, top_k: 10, max_rows: 256 }
    }
}

/// One recommended item.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Recommendation {
    /// Item index (position in the slice the trie was built from).
    pub item: u32,
    /// Sum of the log-probabilities (full-vocabulary log-softmax) of the item's tokens given
    /// the prompt and the item's earlier tokens.
    pub score: f32,
}

/// A source of next-token logits for a set of sequences (the model with its KV cache, or a
/// stand-in in tests).
pub trait Decoder {
    /// Size of the distribution each logits row spans.
    fn vocab_size(&self) -> usize;
    /// Starts one sequence per prompt; returns `[prompts.len(), vocab]` next-token logits.
    fn start(&mut self, prompts: &[Vec<u32>]) -> Result<Vec<f32>>;
    /// Keeps sequence `rows[i]` as the new sequence `i` (rows may repeat or be dropped), appends
    /// `tokens[i]` to it and returns `[rows.len(), vocab]` next-token logits.
    fn advance(&mut self, rows: &[usize], tokens: &[u32]) -> Result<Vec<f32>>;
}

/// [`Decoder`] over a [`Model`]: left-padded prefill, then one token per sequence per step on
/// a [`KvCache`] reordered with the beams.
pub struct ModelDecoder<'a> {
    model: &'a Model,
    cache: Option<KvCache>,
    /// Tokens each sequence will be extended by at most (cache capacity and position check).
    extra: usize,
}

impl<'a> ModelDecoder<'a> {
    /// A decoder that will extend prompts by at most `extra` tokens.
    pub fn new(model: &'a Model, extra: usize) -> Self {
        ModelDecoder { model, cache: None, extra }
    }
}

impl Decoder for ModelDecoder<'_> {
    fn vocab_size(&self) -> usize {
        self.model.config.vocab_size
    }

    fn start(&mut self, prompts: &[Vec<u32>]) -> Result<Vec<f32>> {
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let limit = self.model.config.max_position_embeddings;
        if let Some((u, p)) = prompts.iter().enumerate().find(|(_, p)| p.len() + self.extra > limit) {
            return Err(Error::Input(format!(
                "beam search: prompt {u} ({} tokens) + up to {} item tokens exceeds the model's max_position_embeddings ({limit})",
                p.len(),
                self.extra
            )));
        }
        let batch = Batch::left_padded(prompts, 0)?;
        let mut cache = self.model.new_cache(prompts.len(), longest + self.extra);
        let logits = forward_last(self.model, &batch, &mut cache)?;
        self.cache = Some(cache);
        Ok(logits)
    }

    fn advance(&mut self, rows: &[usize], tokens: &[u32]) -> Result<Vec<f32>> {
        let cache = self.cache.as_mut().ok_or_else(|| Error::Input("beam search: advance before start".into()))?;
        cache.reorder(rows)?;
        let batch = Batch::new(tokens.to_vec(), vec![true; tokens.len()], tokens.len(), 1)?;
        forward_last(self.model, &batch, cache)
    }
}

fn forward_last(model: &Model, batch: &Batch, cache: &mut KvCache) -> Result<Vec<f32>> {
    let fo = ForwardOptions { logits: LogitsMode::Last, ..Default::default() };
    let out = model.forward_cached(batch, cache, &fo)?;
    Ok(out.logits.map(|t| t.into_f32_vec()).unwrap_or_default())
}

/// The ranked items of each prompt, by trie-constrained beam search with `model`
/// (docs/decoding.md). Prompts must be non-empty; `trie` tokens must be in the vocabulary.
pub fn recommend(model: &Model, trie: &ItemTrie, prompts: &[Vec<u32>], opts: &BeamOptions) -> Result<Vec<Vec<Recommendation>>> {
    check_options(opts)?;
    let users_per_chunk = (opts.max_rows / opts.beam).max(1);
    let mut out = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(users_per_chunk) {
        // The last token of an item is never fed back.
        let mut dec = ModelDecoder::new(model, trie.max_len().saturating_sub(1));
        out.extend(search(&mut dec, trie, chunk, opts)?);
    }
    Ok(out)
}

fn check_options(opts: &BeamOptions) -> Result<()> {
    if opts.beam == 0 || opts.top_k == 0 || opts.top_k > opts.beam || opts.max_rows == 0 {
        return Err(Error::Input(format!(
            "beam search: need beam >= 1, 1 <= top_k <= beam and max_rows >= 1 (got beam {}, top_k {}, max_rows {})",
            opts.beam, opts.top_k, opts.max_rows
        )));
    }
    Ok(())
}

/// A live hypothesis: a trie node, its cumulative log-probability and its decoder row.
#[derive(Clone, Copy, Debug)]
struct Hyp {
    node: u32,
    score: f64,
    row: usize,
}

/// An expansion of live hypothesis `beam` (index in its user's live list) by `token`.
#[derive(Clone, Copy, Debug)]
struct Cand {
    score: f64,
    token: u32,
    beam: usize,
    child: u32,
}

/// Higher score first, then lower token, then lower beam index: a total order, since a
/// user's live hypotheses sit on distinct nodes and a node's children have distinct tokens.
fn cand_order(a: &Cand, b: &Cand) -> Ordering {
    b.score.total_cmp(&a.score).then(a.token.cmp(&b.token)).then(a.beam.cmp(&b.beam))
}

/// Log of the softmax denominator of a logits row, in f64.
fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    max + sum.ln()
}

/// Beam search for every prompt at once through `dec` (one `advance` per step for all users).
/// Each returned list holds at most `opts.top_k` distinct items, best first (score
/// descending, then item index ascending); every item is a trie leaf.
pub fn search<D: Decoder>(dec: &mut D, trie: &ItemTrie, prompts: &[Vec<u32>], opts: &BeamOptions) -> Result<Vec<Vec<Recommendation>>> {
    check_options(opts)?;
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    if let Some(u) = prompts.iter().position(Vec::is_empty) {
        return Err(Error::Input(format!("beam search: prompt {u} is empty")));
    }
    let vocab = dec.vocab_size();
    if trie.max_token() as usize >= vocab {
        return Err(Error::Input(format!("beam search: item token {} is outside the vocabulary ({vocab} tokens)", trie.max_token())));
    }
    let n_users = prompts.len();
    let mut logits = dec.start(prompts)?;
    let mut live: Vec<Vec<Hyp>> = (0..n_users).map(|u| vec![Hyp { node: trie.root(), score: 0.0, row: u }]).collect();
    let mut finished: Vec<Vec<(f64, u32)>> = vec![Vec::new(); n_users];
    let mut step = 0usize;
    loop {
        let n_rows = live.iter().map(Vec::len).sum::<usize>();
        if logits.len() != n_rows * vocab {
            return Err(Error::Input(format!("beam search: decoder returned {} logits for {n_rows} rows of {vocab}", logits.len())));
        }
        let mut rows = Vec::new();
        let mut tokens = Vec::new();
        let mut cands = Vec::new();
        for (u, hyps) in live.iter_mut().enumerate() {
            cands.clear();
            for (b, h) in hyps.iter().enumerate() {
                let row = &logits[h.row * vocab..(h.row + 1) * vocab];
                if let Some(i) = row.iter().position(|x| x.is_nan() || *x == f32::INFINITY) {
                    return Err(Error::NonFinite(format!("logits of user {u}, beam {b} at item token {step} (vocab entry {i})")));
                }
                let lse = log_sum_exp(row);
                for &(token, child) in trie.children(h.node) {
                    cands.push(Cand { score: h.score + (row[token as usize] as f64 - lse), token, beam: b, child });
                }
            }
            cands.sort_unstable_by(cand_order);
            // Finished items count only within the top `beam` ranks; live hypotheses fill up
            // to `beam` from the ranked candidates.
            let mut next = Vec::with_capacity(opts.beam);
            for (rank, c) in cands.iter().enumerate() {
                if let Some(item) = trie.item(c.child) {
                    if rank < opts.beam {
                        finished[u].push((c.score, item));
                    }
                } else if next.len() < opts.beam {
                    next.push(Hyp { node: c.child, score: c.score, row: rows.len() });
                    rows.push(hyps[c.beam].row);
                    tokens.push(c.token);
                } else if rank >= opts.beam {
                    break;
                }
            }
            // Stop this user when no live hypothesis can reach the top_k finished (scores
            // only decrease along a path).
            let done = match next.first() {
                None => true,
                Some(best) => {
                    let f = &mut finished[u];
                    f.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                    f.len() >= opts.top_k && best.score <= f[opts.top_k - 1].0
                }
            };
            if done {
                rows.truncate(rows.len() - next.len());
                tokens.truncate(tokens.len() - next.len());
                next.clear();
            }
            *hyps = next;
        }
        if rows.is_empty() {
            break;
        }
        step += 1;
        logits = dec.advance(&rows, &tokens)?;
    }
    Ok(finished
        .into_iter()
        .map(|mut f| {
            f.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            f.truncate(opts.top_k);
            f.into_iter().map(|(score, item)| Recommendation { item, score: score as f32 }).collect()
        })
        .collect())
}
