//! Item identifiers as semantic IDs (ILREC.md section 1, docs/semantic_ids.md).
//!
//! Two sources give one [`SemanticIds`]:
//! - built by the engine: [`item_embeddings`] (mean-pooled last-block hidden states of the
//!   loaded LLM over each item's text), [`normalize`] (per-dimension standardisation by
//!   default), [`residual_kmeans`] (default 3 levels x 256 codes) and a final disambiguation
//!   level so every item gets a unique tuple ([`assign_semantic_ids`]);
//! - an LC-Rec `index.json` used as is ([`SemanticIds::from_lcrec_index`]) or, when its tuples
//!   collide, with an appended disambiguation level
//!   ([`SemanticIds::from_lcrec_index_disambiguated`]).
//!
//! Each level has its own tokens `<a_N>`, `<b_N>`, ... ([`SemanticIds::all_tokens`], level-major)
//! which [`add_item_tokens`] adds to the tokenizer and the model (new embedding and LM-head
//! rows, initialised by [`Model::new_token_rows`]). The mapping is saved as
//! `semantic_ids.json` ([`SemanticIds::save`]) beside the adapter so evaluation uses the same
//! one.
use crate::error::{Error, Result};
use crate::model::{Batch, ForwardOptions, LogitsMode, Model};
use crate::rng::Rng;
use crate::weights::TextTokenizer;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// File name of the saved mapping, beside the adapter.
pub const SEMANTIC_IDS_FILE: &str = "semantic_ids.json";
/// `format` field of `semantic_ids.json`.
pub const FORMAT: &str = "ilrec-semantic-ids";
/// Level letters: level `l` uses tokens `<{LEVEL_LETTERS[l]}_N>`.
pub const LEVEL_LETTERS: &[u8; 26] = b"abcdefghijklmnopqrstuvwxyz";
/// Default truncation of item texts for [`item_embeddings`], in tokens.
pub const DEFAULT_MAX_TEXT_TOKENS: usize = 64;

/// Semantic IDs of a set of items: per item one code per level.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SemanticIds {
    /// Number of codes (tokens) of each level.
    pub levels: Vec<usize>,
    /// Per item (dense item id), one code per level, each below that level's size.
    pub codes: Vec<Vec<u16>>,
}

#[derive(Serialize, Deserialize)]
struct SemanticIdsFile {
    format: String,
    version: u32,
    levels: Vec<usize>,
    codes: Vec<Vec<u16>>,
}

/// The token of code `code` at level `level` (0-based), e.g. `<c_200>`.
pub fn token_string(level: usize, code: u16) -> String {
    format!("<{}_{}>", LEVEL_LETTERS[level] as char, code)
}

/// Parses a canonical code token `<x_N>` into `(level, code)`: `x` a lowercase letter, `N` a
/// decimal without sign or leading zeros that fits in u16.
pub fn parse_token(tok: &str) -> Option<(usize, u16)> {
    let inner = tok.strip_prefix('<')?.strip_suffix('>')?;
    let (letter, num) = inner.split_once('_')?;
    let level = match letter.as_bytes() {
        [c @ b'a'..=b'z'] => (c - b'a') as usize,
        _ => return None,
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) || (num.len() > 1 && num.starts_with('0')) {
        return None;
    }
    Some((level, num.parse().ok()?))
}

impl SemanticIds {
    /// Checks the mapping: at most 26 levels, each of 1..=65536 codes; every item has one code
    /// per level below the level's size; no two items share a tuple (errors name the items).
    pub fn new(levels: Vec<usize>, codes: Vec<Vec<u16>>) -> Result<Self> {
        let ids = SemanticIds { levels, codes };
        ids.validate()?;
        Ok(ids)
    }

    fn validate(&self) -> Result<()> {
        let nl = self.levels.len();
        if nl == 0 || nl > LEVEL_LETTERS.len() {
            return Err(Error::Input(format!("semantic IDs: {nl} levels (1..=26 supported)")));
        }
        if let Some((l, &s)) = self.levels.iter().enumerate().find(|(_, &s)| s == 0 || s > 1 << 16) {
            return Err(Error::Input(format!("semantic IDs: level {l} has {s} codes (1..=65536 supported)")));
        }
        if self.codes.is_empty() {
            return Err(Error::Input("semantic IDs: no items".into()));
        }
        for (i, c) in self.codes.iter().enumerate() {
            if c.len() != nl {
                return Err(Error::Input(format!("semantic IDs: item {i} has {} codes, expected {nl} (one per level)", c.len())));
            }
            if let Some(l) = (0..nl).find(|&l| c[l] as usize >= self.levels[l]) {
                return Err(Error::Input(format!("semantic IDs: item {i} has code {} at level {l}, which has {} codes", c[l], self.levels[l])));
            }
        }
        let mut first: HashMap<&[u16], usize> = HashMap::with_capacity(self.codes.len());
        for (i, c) in self.codes.iter().enumerate() {
            if let Some(&j) = first.get(c.as_slice()) {
                return Err(Error::Input(format!("semantic IDs: items {j} and {i} share the ID {}", self.tuple_string(c))));
            }
            first.insert(c, i);
        }
        Ok(())
    }

    fn tuple_string(&self, c: &[u16]) -> String {
        c.iter().enumerate().map(|(l, &x)| token_string(l, x)).collect()
    }

    pub fn num_items(&self) -> usize {
        self.codes.len()
    }

    pub fn num_levels(&self) -> usize {
        self.levels.len()
    }

    /// Number of code tokens over all levels.
    pub fn num_tokens(&self) -> usize {
        self.levels.iter().sum()
    }

    /// The item's tokens, e.g. `["<a_12>", "<b_3>", "<c_200>", "<d_7>"]`.
    pub fn token_strings(&self, item: usize) -> Vec<String> {
        self.codes[item].iter().enumerate().map(|(l, &c)| token_string(l, c)).collect()
    }

    /// The item's identifier as one string, e.g. `<a_12><b_3><c_200><d_7>`.
    pub fn id_string(&self, item: usize) -> String {
        self.tuple_string(&self.codes[item])
    }

    /// Every code token, level-major (`<a_0>..<a_{n0-1}>`, `<b_0>`, ...): the order in which
    /// they are added to the vocabulary.
    pub fn all_tokens(&self) -> Vec<String> {
        let mut out = Vec::with_capacity(self.num_tokens());
        for (l, &n) in self.levels.iter().enumerate() {
            out.extend((0..n).map(|c| token_string(l, c as u16)));
        }
        out
    }

    /// Offset of each level's first token among [`SemanticIds::all_tokens`].
    fn level_offsets(&self) -> Vec<u32> {
        let mut off = Vec::with_capacity(self.levels.len());
        let mut acc = 0u32;
        for &n in &self.levels {
            off.push(acc);
            acc += n as u32;
        }
        off
    }

    /// The item's token ids when `all_tokens()` were added with ids starting at `first_id`.
    pub fn token_ids(&self, item: usize, first_id: u32) -> Vec<u32> {
        let off = self.level_offsets();
        self.codes[item].iter().zip(&off).map(|(&c, &o)| first_id + o + c as u32).collect()
    }

    /// [`SemanticIds::token_ids`] of every item (the item trie's sequences).
    pub fn all_token_ids(&self, first_id: u32) -> Vec<Vec<u32>> {
        let off = self.level_offsets();
        self.codes.iter().map(|c| c.iter().zip(&off).map(|(&x, &o)| first_id + o + x as u32).collect()).collect()
    }

    /// An LC-Rec index (per dense item id its tokens, e.g. `Dataset::semantic_ids`) used as is.
    /// Every token must be canonical `<x_N>` with `x` the letter of its position (`a` first);
    /// errors name the item and the token. Level sizes are the largest code seen plus one.
    /// Tuples shared by several items are an error naming two of them (see
    /// [`SemanticIds::from_lcrec_index_disambiguated`]).
    pub fn from_lcrec_index(map: Vec<Vec<String>>) -> Result<Self> {
        let (levels, codes) = parse_lcrec(&map)?;
        let shared = collision_groups(&codes);
        if let Some(g) = shared.first() {
            let items: usize = shared.iter().map(Vec::len).sum();
            return Err(Error::Input(format!(
                "LC-Rec index: items {} and {} share the ID {} ({} IDs are shared by {items} items; \
                 from_lcrec_index_disambiguated appends a level that separates them)",
                g[0],
                g[1],
                map[g[0]].concat(),
                shared.len()
            )));
        }
        SemanticIds::new(levels, codes)
    }

    /// As [`SemanticIds::from_lcrec_index`], but when tuples collide a level is appended (the
    /// next letter): items sharing a tuple get 0, 1, 2, ... in item order, all others 0; its
    /// size is the largest group. Without collisions this is the index as is.
    pub fn from_lcrec_index_disambiguated(map: Vec<Vec<String>>) -> Result<Self> {
        let (mut levels, codes) = parse_lcrec(&map)?;
        if collision_groups(&codes).is_empty() {
            return SemanticIds::new(levels, codes);
        }
        let (codes, extra) = disambiguate(codes)?;
        levels.push(extra);
        SemanticIds::new(levels, codes)
    }

    /// Writes `semantic_ids.json` (`{"format", "version": 1, "levels", "codes"}`) atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.validate()?;
        let file = SemanticIdsFile { format: FORMAT.into(), version: 1, levels: self.levels.clone(), codes: self.codes.clone() };
        let text = serde_json::to_string(&file).map_err(|e| Error::Input(format!("serialising semantic IDs: {e}")))?;
        crate::train::checkpoint::atomic_write(path, text.as_bytes())
    }

    /// Reads a file written by [`SemanticIds::save`], checking it as [`SemanticIds::new`] does.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let f: SemanticIdsFile = serde_json::from_str(&text).map_err(|e| Error::format(path, "JSON", e.to_string()))?;
        if f.format != FORMAT {
            return Err(Error::InvalidField { path: path.into(), field: "format".into(), msg: format!("{:?}, expected {FORMAT:?}", f.format) });
        }
        if f.version != 1 {
            return Err(Error::InvalidField { path: path.into(), field: "version".into(), msg: format!("{} is not supported (1 is)", f.version) });
        }
        SemanticIds::new(f.levels, f.codes).map_err(|e| Error::InvalidField { path: path.into(), field: "codes".into(), msg: e.to_string() })
    }
}

fn parse_lcrec(map: &[Vec<String>]) -> Result<(Vec<usize>, Vec<Vec<u16>>)> {
    let nl = map.first().map_or(0, Vec::len);
    if map.is_empty() || nl == 0 {
        return Err(Error::Input("LC-Rec index: no items, or item 0 has no tokens".into()));
    }
    if nl > LEVEL_LETTERS.len() {
        return Err(Error::Input(format!("LC-Rec index: item 0 has {nl} tokens (at most 26 levels)")));
    }
    let mut levels = vec![0usize; nl];
    let mut codes = Vec::with_capacity(map.len());
    for (i, toks) in map.iter().enumerate() {
        if toks.len() != nl {
            return Err(Error::Input(format!("LC-Rec index: item {i} has {} tokens, item 0 has {nl}", toks.len())));
        }
        let mut c = Vec::with_capacity(nl);
        for (l, t) in toks.iter().enumerate() {
            let want = LEVEL_LETTERS[l] as char;
            match parse_token(t) {
                Some((pl, code)) if pl == l => {
                    levels[l] = levels[l].max(code as usize + 1);
                    c.push(code);
                }
                Some((pl, _)) => {
                    return Err(Error::Input(format!(
                        "LC-Rec index: item {i}: token {t:?} at position {l} is of level `{}`, expected `<{want}_N>` (levels must be in order a, b, c, ...)",
                        LEVEL_LETTERS[pl] as char
                    )))
                }
                None => return Err(Error::Input(format!("LC-Rec index: item {i}: malformed token {t:?} at position {l}, expected `<{want}_N>` with N in 0..=65535 written without leading zeros"))),
            }
        }
        codes.push(c);
    }
    Ok((levels, codes))
}

/// Groups (item indices, ascending) of items sharing a tuple, ordered by their first item.
pub fn collision_groups(codes: &[Vec<u16>]) -> Vec<Vec<usize>> {
    let mut groups: HashMap<&[u16], Vec<usize>> = HashMap::new();
    for (i, c) in codes.iter().enumerate() {
        groups.entry(c).or_default().push(i);
    }
    let mut shared: Vec<Vec<usize>> = groups.into_values().filter(|g| g.len() > 1).collect();
    shared.sort_unstable_by_key(|g| g[0]);
    shared
}

/// Appends a disambiguation code to every tuple: items sharing a tuple get 0, 1, 2, ... in item
/// order (an item alone gets 0). Returns the new tuples and the level's size, the largest
/// group (1 when nothing collides); an error when a group exceeds 65536 items.
pub fn disambiguate(mut codes: Vec<Vec<u16>>) -> Result<(Vec<Vec<u16>>, usize)> {
    let mut next: HashMap<Vec<u16>, usize> = HashMap::with_capacity(codes.len());
    let mut max = 1usize;
    for c in codes.iter_mut() {
        let k = next.entry(c.clone()).or_insert(0);
        if *k > u16::MAX as usize {
            return Err(Error::Input(format!("semantic IDs: more than 65536 items share the tuple {c:?}")));
        }
        c.push(*k as u16);
        *k += 1;
        max = max.max(*k);
    }
    Ok((codes, max))
}

// ---------------------------------------------------------------------------------------------
// Item embeddings

/// Per item, the mean over its (at most `max_len` first) tokens of the last block's output
/// (the residual stream before the final norm): `[items, hidden]`, row-major. Items run in
/// batches of `batch`, longest first, right-padded; results do not depend on batching.
/// `progress(done, total)` is called after each batch. Errors on an empty text (naming the
/// item), `batch == 0` or `max_len == 0`.
pub fn item_embeddings(
    model: &Model,
    texts: &[Vec<u32>],
    batch: usize,
    max_len: usize,
    mut progress: Option<&mut dyn FnMut(usize, usize)>,
) -> Result<Vec<f32>> {
    if batch == 0 || max_len == 0 {
        return Err(Error::Input(format!("item embeddings: batch ({batch}) and max_len ({max_len}) must be positive")));
    }
    if let Some(i) = texts.iter().position(Vec::is_empty) {
        return Err(Error::Input(format!("item embeddings: item {i} has no tokens")));
    }
    let h = model.config.hidden_size;
    let last = model.config.num_layers;
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(texts[i].len().min(max_len)), i));
    let opts = ForwardOptions { logits: LogitsMode::None, taps: vec![last], probe: None };
    let mut out = vec![0.0f32; texts.len() * h];
    for (done, chunk) in order.chunks(batch).enumerate() {
        let seqs: Vec<Vec<u32>> = chunk.iter().map(|&i| texts[i][..texts[i].len().min(max_len)].to_vec()).collect();
        let b = Batch::right_padded(&seqs, 0)?;
        let fo = model.forward(&b, &opts)?;
        let hidden = fo.hidden.first().map(|(_, t)| t.to_f32_vec()).ok_or_else(|| Error::Input("item embeddings: forward returned no tap".into()))?;
        for (r, &item) in chunk.iter().enumerate() {
            let mut acc = vec![0.0f64; h];
            let len = seqs[r].len();
            for p in 0..len {
                let row = &hidden[(r * b.seq + p) * h..(r * b.seq + p + 1) * h];
                for d in 0..h {
                    acc[d] += row[d] as f64;
                }
            }
            for d in 0..h {
                out[item * h + d] = (acc[d] / len as f64) as f32;
            }
        }
        if let Some(cb) = progress.as_deref_mut() {
            cb((done * batch + chunk.len()).min(texts.len()), texts.len());
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Clustering

/// How embeddings are normalised before clustering.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Normalization {
    /// Used as given.
    None,
    /// Each item's vector scaled to unit L2 norm (cosine geometry).
    L2,
    /// Each dimension centred and divided by its standard deviation over the items (constant
    /// dimensions become 0). The default: LLM hidden states carry a few "massive activation"
    /// dimensions that would otherwise decide every cluster.
    #[default]
    Standardize,
}

/// Normalises `x` (`[n, dim]`) in place.
pub fn normalize(x: &mut [f32], dim: usize, mode: Normalization) {
    if dim == 0 || x.is_empty() {
        return;
    }
    match mode {
        Normalization::None => {}
        Normalization::L2 => {
            for row in x.chunks_exact_mut(dim) {
                let norm = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
                if norm > 0.0 {
                    row.iter_mut().for_each(|v| *v = (*v as f64 / norm) as f32);
                }
            }
        }
        Normalization::Standardize => {
            let (mean, vars) = crate::tensor::column_moments(x, dim);
            let scale: Vec<f64> = (0..dim)
                .map(|d| {
                    let var = vars[d];
                    if var > 1e-24 * (1.0 + mean[d] * mean[d]) {
                        1.0 / var.sqrt()
                    } else {
                        0.0
                    }
                })
                .collect();
            for row in x.chunks_exact_mut(dim) {
                for d in 0..dim {
                    row[d] = ((row[d] as f64 - mean[d]) * scale[d]) as f32;
                }
            }
        }
    }
}

/// Squared Euclidean distance, eight independent lanes (vectorises; deterministic).
fn dist2(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            let d = x[k] - y[k];
            acc[k] += d * d;
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += (x - y) * (x - y);
    }
    s
}

/// One k-means clustering.
#[derive(Clone, Debug)]
pub struct KMeans {
    /// Number of clusters (at most the requested `k`; fewer when there are fewer points or
    /// fewer distinct points).
    pub k: usize,
    /// `[k, dim]`.
    pub centroids: Vec<f32>,
    /// Cluster of each point.
    pub assign: Vec<u32>,
    /// Sum over points of the squared distance to their centroid.
    pub inertia: f64,
    /// Lloyd iterations run (fewer than asked when assignments stopped changing).
    pub iterations: usize,
}

fn check_points(x: &[f32], dim: usize) -> Result<usize> {
    if dim == 0 || x.is_empty() || !x.len().is_multiple_of(dim) {
        return Err(Error::Input(format!("k-means: {} values are not a positive multiple of dimension {dim}", x.len())));
    }
    if let Some(p) = x.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite(format!("k-means input, point {} dimension {}", p / dim, p % dim)));
    }
    Ok(x.len() / dim)
}

/// Nearest centroid of every point (ties: lowest index) and the squared distance to it.
fn nearest(x: &[f32], dim: usize, centroids: &[f32]) -> (Vec<u32>, Vec<f32>) {
    x.par_chunks(dim)
        .map(|p| {
            let (mut best, mut bd) = (0u32, f32::INFINITY);
            for (j, c) in centroids.chunks_exact(dim).enumerate() {
                let d = dist2(p, c);
                if d < bd {
                    bd = d;
                    best = j as u32;
                }
            }
            (best, bd)
        })
        .unzip()
}

/// k-means of `x` (`[n, dim]`): k-means++ seeding drawn from `rng`, then up to `iters` Lloyd
/// iterations (stopping when the assignment is stable). `k` is capped at `n`; seeding stops
/// early when every point already coincides with a centroid. A cluster left empty is re-seeded
/// with the point farthest from its own centroid (among clusters of two or more points).
pub fn kmeans(x: &[f32], dim: usize, k: usize, iters: usize, rng: &mut Rng) -> Result<KMeans> {
    let n = check_points(x, dim)?;
    if k == 0 {
        return Err(Error::Input("k-means: k must be positive".into()));
    }
    let k = k.min(n);
    let point = |i: usize| &x[i * dim..(i + 1) * dim];
    // k-means++.
    let mut centroids = Vec::with_capacity(k * dim);
    centroids.extend_from_slice(point(rng.below(n)));
    let mut d2: Vec<f32> = x.par_chunks(dim).map(|p| dist2(p, &centroids[..dim])).collect();
    while centroids.len() < k * dim {
        let total: f64 = d2.iter().map(|&d| d as f64).sum();
        if total <= 0.0 {
            break;
        }
        let r = ((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64) * total;
        let mut acc = 0.0f64;
        let mut pick = n - 1;
        for (i, &d) in d2.iter().enumerate() {
            acc += d as f64;
            if acc > r && d > 0.0 {
                pick = i;
                break;
            }
        }
        if d2[pick] <= 0.0 {
            pick = d2.iter().rposition(|&d| d > 0.0).unwrap_or(pick);
        }
        let c = point(pick).to_vec();
        d2.par_iter_mut().zip(x.par_chunks(dim)).for_each(|(d, p)| *d = d.min(dist2(p, &c)));
        centroids.extend_from_slice(&c);
    }
    let k = centroids.len() / dim;
    let (mut assign, mut dist) = nearest(x, dim, &centroids);
    let mut iterations = 0;
    for _ in 0..iters {
        iterations += 1;
        // Re-seed empty clusters.
        let mut count = vec![0usize; k];
        for &a in &assign {
            count[a as usize] += 1;
        }
        for j in 0..k {
            if count[j] > 0 {
                continue;
            }
            let far = (0..n).filter(|&i| count[assign[i] as usize] > 1).max_by(|&a, &b| dist[a].total_cmp(&dist[b]).then(b.cmp(&a)));
            if let Some(p) = far.filter(|&p| dist[p] > 0.0) {
                count[assign[p] as usize] -= 1;
                assign[p] = j as u32;
                dist[p] = 0.0;
                count[j] = 1;
            }
        }
        // Update.
        let mut sums = vec![0.0f64; k * dim];
        for (i, &a) in assign.iter().enumerate() {
            for (s, &v) in sums[a as usize * dim..(a as usize + 1) * dim].iter_mut().zip(point(i)) {
                *s += v as f64;
            }
        }
        for j in 0..k {
            if count[j] > 0 {
                for d in 0..dim {
                    centroids[j * dim + d] = (sums[j * dim + d] / count[j] as f64) as f32;
                }
            }
        }
        let (new_assign, new_dist) = nearest(x, dim, &centroids);
        let stable = new_assign == assign;
        assign = new_assign;
        dist = new_dist;
        if stable {
            break;
        }
    }
    let inertia = dist.iter().map(|&d| d as f64).sum();
    Ok(KMeans { k, centroids, assign, inertia, iterations })
}

/// Residual k-means with its codebooks and errors.
#[derive(Clone, Debug)]
pub struct ResidualKMeans {
    /// Per item, one code per level.
    pub codes: Vec<Vec<u16>>,
    /// Per level, the number of clusters.
    pub sizes: Vec<usize>,
    /// Per level, `[sizes[l], dim]` centroids (of the residuals that level clustered).
    pub centroids: Vec<Vec<f32>>,
    /// Mean squared norm of the residual per item: index 0 before any level (of the input
    /// itself), index `l + 1` after level `l`.
    pub errors: Vec<f64>,
}

/// Residual k-means: level 1 clusters `x` (`[n, dim]`), level `l + 1` clusters the residuals
/// left by levels `1..=l` (`x - c1 - c2 - ...`), each into `codes` clusters (capped at `n`,
/// at most 65536). One `Rng::new(seed)` seeds all levels in turn, so the result is a function
/// of the inputs and `seed`.
pub fn residual_kmeans_full(x: &[f32], dim: usize, levels: usize, codes: usize, iters: usize, seed: u64) -> Result<ResidualKMeans> {
    let n = check_points(x, dim)?;
    if levels == 0 || codes == 0 || codes > 1 << 16 {
        return Err(Error::Input(format!("residual k-means: {levels} levels of {codes} codes (levels >= 1, codes in 1..=65536)")));
    }
    let mut rng = Rng::new(seed);
    let mut r = x.to_vec();
    let msq = |r: &[f32]| r.chunks_exact(dim).map(|p| p.iter().map(|&v| v as f64 * v as f64).sum::<f64>()).sum::<f64>() / n as f64;
    let mut out = ResidualKMeans { codes: vec![Vec::with_capacity(levels); n], sizes: vec![], centroids: vec![], errors: vec![msq(&r)] };
    for _ in 0..levels {
        let km = kmeans(&r, dim, codes, iters, &mut rng)?;
        for (i, &a) in km.assign.iter().enumerate() {
            out.codes[i].push(a as u16);
            let c = &km.centroids[a as usize * dim..(a as usize + 1) * dim];
            for (v, &cv) in r[i * dim..(i + 1) * dim].iter_mut().zip(c) {
                *v -= cv;
            }
        }
        out.errors.push(msq(&r));
        out.sizes.push(km.k);
        out.centroids.push(km.centroids);
    }
    Ok(out)
}

/// The codes of [`residual_kmeans_full`]: per item, one code per level.
pub fn residual_kmeans(x: &[f32], dim: usize, levels: usize, codes: usize, iters: usize, seed: u64) -> Result<Vec<Vec<u16>>> {
    Ok(residual_kmeans_full(x, dim, levels, codes, iters, seed)?.codes)
}

/// Settings of [`assign_semantic_ids`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SemanticIdConfig {
    /// Residual k-means levels (before the disambiguation level).
    pub levels: usize,
    /// Codes per level.
    pub codes: usize,
    /// Lloyd iterations per level (at most).
    pub iters: usize,
    pub seed: u64,
    pub normalization: Normalization,
}

impl Default for SemanticIdConfig {
    fn default() -> Self {
        SemanticIdConfig { levels: 3, codes: 256, iters: 50, seed: 42, normalization: Normalization::Standardize }
    }
}

/// Semantic IDs from item embeddings (`[n, dim]`): normalised per `cfg.normalization`,
/// residual k-means of `cfg.levels` levels, then a disambiguation level (items sharing their
/// first `cfg.levels` codes get 0, 1, 2, ... in item order) whose size is the largest such
/// group, so every item's tuple is unique. Level sizes are the clusters actually formed.
pub fn assign_semantic_ids(embeddings: &[f32], dim: usize, cfg: &SemanticIdConfig) -> Result<SemanticIds> {
    check_points(embeddings, dim)?;
    let mut x = embeddings.to_vec();
    normalize(&mut x, dim, cfg.normalization);
    if cfg.levels + 1 > LEVEL_LETTERS.len() {
        return Err(Error::Input(format!("semantic IDs: {} levels plus disambiguation exceed 26", cfg.levels)));
    }
    let rk = residual_kmeans_full(&x, dim, cfg.levels, cfg.codes, cfg.iters, cfg.seed)?;
    let (codes, extra) = disambiguate(rk.codes)?;
    let mut levels = rk.sizes;
    levels.push(extra);
    SemanticIds::new(levels, codes)
}

// ---------------------------------------------------------------------------------------------
// Vocabulary

/// Adds `ids.all_tokens()` to the tokenizer (special added tokens) and the model (rows from
/// [`Model::new_token_rows`] with `seed`) and returns the first new id: item `i`'s tokens are
/// then `ids.token_ids(i, first)`. The tokenizer's new ids start at its `vocab_size()`; when the
/// model's vocabulary is larger (padded embedding matrices, e.g. Qwen2), the new tokens take
/// over the unused rows from there (growing the model as needed). A tokenizer larger than the
/// model is an error (nothing changed).
pub fn add_item_tokens(model: &mut Model, tokenizer: &mut TextTokenizer, ids: &SemanticIds, seed: u64) -> Result<u32> {
    let first = tokenizer.vocab_size();
    if first > model.config.vocab_size {
        return Err(Error::Input(format!(
            "adding item tokens: the tokenizer has {first} ids but the model only {} rows",
            model.config.vocab_size
        )));
    }
    let tokens = ids.all_tokens();
    let (embed, head) = model.new_token_rows(tokens.len(), seed);
    let got = tokenizer.add_tokens(&tokens)?;
    debug_assert_eq!(got.first().copied(), Some(first as u32));
    model.write_token_rows(first as u32, &embed, head.as_deref())?;
    Ok(first as u32)
}
