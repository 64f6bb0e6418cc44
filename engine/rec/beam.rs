//! Trie-constrained, batched beam search over item identifiers (ILREC.md section 1,
//! "Decoding"; docs/decoding.md).
//!
//! The search itself ([`search`]) only sees next-token logits through [`Decoder`]; [`recommend`]
//! drives it with the model and a KV cache, all users' beams in one forward per step.
use super::trie::{FlatTrie, ItemTrie, NO_NODE};
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

// ------------------------------------------------------------------------------------------
// The device-shaped search: fixed slots, flat trie, one step function (docs/kernels/decode.md).

/// The state of the device-shaped beam search for `users` users of `beam` slots each: what the
/// device keeps between steps. A slot holds a live hypothesis (a trie node and its f64 score) or
/// is dead ([`NO_NODE`]); live slots of a user are its live list of [`search`], in order. Each user
/// keeps its `top_k` best finished items so far (score descending, item ascending), which is all
/// that [`search`]'s stopping rule and result read of its finished list.
#[derive(Clone, Debug, PartialEq)]
pub struct FlatBeamState {
    pub users: usize,
    pub beam: usize,
    pub top_k: usize,
    /// `[users * beam]` trie node per slot, [`NO_NODE`] for a dead slot.
    pub node: Vec<u32>,
    /// `[users * beam]` cumulative log-probability per slot (`-inf` for a dead slot).
    pub score: Vec<f64>,
    /// `[users]` no live hypothesis can enter the user's top `top_k` any more.
    pub done: Vec<bool>,
    /// `[users * top_k]` best finished (score, item), `fin_count[u]` of them valid.
    pub fin_score: Vec<f64>,
    pub fin_item: Vec<u32>,
    pub fin_count: Vec<u32>,
}

impl FlatBeamState {
    /// Every user at the root in slot 0.
    pub fn new(users: usize, opts: &BeamOptions) -> Result<Self> {
        check_options(opts)?;
        let (beam, top_k) = (opts.beam, opts.top_k);
        let mut node = vec![NO_NODE; users * beam];
        let mut score = vec![f64::NEG_INFINITY; users * beam];
        for u in 0..users {
            node[u * beam] = 0;
            score[u * beam] = 0.0;
        }
        Ok(FlatBeamState {
            users,
            beam,
            top_k,
            node,
            score,
            done: vec![false; users],
            fin_score: vec![f64::NEG_INFINITY; users * top_k],
            fin_item: vec![u32::MAX; users * top_k],
            fin_count: vec![0; users],
        })
    }

    /// The ranked items of each user (the result of [`search`]).
    pub fn results(&self) -> Vec<Vec<Recommendation>> {
        (0..self.users)
            .map(|u| {
                let r = u * self.top_k..u * self.top_k + self.fin_count[u] as usize;
                self.fin_score[r.clone()].iter().zip(&self.fin_item[r]).map(|(&s, &item)| Recommendation { item, score: s as f32 }).collect()
            })
            .collect()
    }
}

/// One step of the device-shaped search on the host: exactly the algorithm of the device step
/// (kernels/beam.cu), with [`search`]'s scoring (f64 full-vocabulary log-softmax), ranking
/// (`cand_order`) and finished/stopping rules. `logits` are `[users * rows_per_user, vocab]`;
/// slot `b` of user `u` reads row `u * rows_per_user + b` (so live slots must lie below
/// `rows_per_user`: 1 after the prompt, `beam` afterwards). Writes, per new slot, the user-local
/// slot it extends (`parent`, for the KV-cache reorder) and the token it appends (`token`); dead
/// new slots get parent 0 and token 0 (any valid row and token: their logits are never read).
pub fn flat_step(trie: &FlatTrie, logits: &[f32], rows_per_user: usize, st: &mut FlatBeamState, parent: &mut [u32], token: &mut [u32]) -> Result<()> {
    let (beam, vocab, slots) = (st.beam, trie.vocab, st.users * st.beam);
    if logits.len() != st.users * rows_per_user * vocab || parent.len() != slots || token.len() != slots || rows_per_user == 0 || rows_per_user > beam {
        return Err(Error::Input(format!(
            "beam step: {} logits for {} users x {rows_per_user} rows of {vocab}, {} parents and {} tokens for {slots} slots",
            logits.len(),
            st.users,
            parent.len(),
            token.len()
        )));
    }
    let mut cands = Vec::new();
    for u in 0..st.users {
        let slot = u * beam..(u + 1) * beam;
        parent[slot.clone()].fill(0);
        token[slot.clone()].fill(0);
        if st.done[u] {
            continue;
        }
        cands.clear();
        for b in 0..beam {
            let node = st.node[u * beam + b];
            if node == NO_NODE {
                continue;
            }
            if b >= rows_per_user {
                return Err(Error::Input(format!("beam step: user {u}'s live slot {b} has no logits row ({rows_per_user} per user)")));
            }
            let r = u * rows_per_user + b;
            let row = &logits[r * vocab..(r + 1) * vocab];
            if let Some(i) = row.iter().position(|x| x.is_nan() || *x == f32::INFINITY) {
                return Err(Error::NonFinite(format!("logits of user {u}, beam {b} (vocab entry {i})")));
            }
            let lse = log_sum_exp(row);
            let h = st.score[u * beam + b];
            for e in trie.edges(node) {
                let t = trie.child_token[e];
                cands.push(Cand { score: h + (row[t as usize] as f64 - lse), token: t, beam: b, child: trie.child_node[e] });
            }
        }
        cands.sort_unstable_by(cand_order);
        // Leaves among the top `beam` ranks finish; the best `beam` inner candidates live on.
        let top = &cands[..cands.len().min(beam)];
        let mut fin: Vec<(f64, u32)> = top.iter().filter_map(|c| trie.item(c.child).map(|it| (c.score, it))).collect();
        let next: Vec<&Cand> = cands.iter().filter(|c| trie.item(c.child).is_none()).take(beam).collect();
        let k = st.top_k;
        let fr = u * k..u * k + st.fin_count[u] as usize;
        fin.extend(st.fin_score[fr.clone()].iter().copied().zip(st.fin_item[fr].iter().copied()));
        fin.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        fin.truncate(k);
        st.fin_count[u] = fin.len() as u32;
        for (j, &(s, it)) in fin.iter().enumerate() {
            st.fin_score[u * k + j] = s;
            st.fin_item[u * k + j] = it;
        }
        st.done[u] = match next.first() {
            None => true,
            Some(best) => fin.len() >= k && best.score <= fin[k - 1].0,
        };
        for j in 0..beam {
            let s = u * beam + j;
            match next.get(j).filter(|_| !st.done[u]) {
                Some(c) => {
                    st.node[s] = c.child;
                    st.score[s] = c.score;
                    parent[s] = c.beam as u32;
                    token[s] = c.token;
                }
                None => {
                    st.node[s] = NO_NODE;
                    st.score[s] = f64::NEG_INFINITY;
                }
            }
        }
    }
    Ok(())
}

/// [`search`] by [`flat_step`]: every step feeds all `users * beam` slots to the decoder (dead
/// ones too, as the device does), so it checks that the fixed-slot formulation gives
/// [`search`]'s results. The reference of the device decode loop.
pub fn flat_search<D: Decoder>(dec: &mut D, trie: &FlatTrie, prompts: &[Vec<u32>], opts: &BeamOptions) -> Result<Vec<Vec<Recommendation>>> {
    check_options(opts)?;
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    if let Some(u) = prompts.iter().position(Vec::is_empty) {
        return Err(Error::Input(format!("beam search: prompt {u} is empty")));
    }
    if dec.vocab_size() != trie.vocab {
        return Err(Error::Input(format!("beam search: the flat trie is for {} tokens, the decoder has {}", trie.vocab, dec.vocab_size())));
    }
    let users = prompts.len();
    let mut st = FlatBeamState::new(users, opts)?;
    let mut parent = vec![0u32; users * opts.beam];
    let mut token = vec![0u32; users * opts.beam];
    let mut logits = dec.start(prompts)?;
    let mut rows_per_user = 1;
    for _ in 0..trie.max_len {
        flat_step(trie, &logits, rows_per_user, &mut st, &mut parent, &mut token)?;
        if st.done.iter().all(|&d| d) {
            break;
        }
        let rows: Vec<usize> = (0..users * opts.beam).map(|s| (s / opts.beam) * rows_per_user + parent[s] as usize).collect();
        logits = dec.advance(&rows, &token)?;
        rows_per_user = opts.beam;
    }
    Ok(st.results())
}
