//! Text generation with the KV cache: greedy or sampled (temperature, top-k, top-p).
use super::{Batch, ForwardOptions, ForwardOutput, KvCache, LogitsMode, Model, ModelConfig};
use crate::error::{Error, Result};
use crate::rng::Rng;

/// How to pick each next token.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 = greedy (argmax, lowest id on ties).
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches `top_p` (1 = all).
    pub top_p: f32,
    pub seed: u64,
    /// Stop after any of these (the token is included in the output).
    pub stop_tokens: Vec<u32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions { max_new_tokens: 32, temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0, stop_tokens: vec![] }
    }
}

/// A model that runs incremental forwards on its own KV cache: the CPU `Model`, or the GPU
/// `backend::cuda::model::CudaModel`. Decoding loops are written once against this.
pub trait Decoder {
    type Cache;
    fn config(&self) -> &ModelConfig;
    /// An empty cache for `batch` sequences of up to `cap` tokens.
    fn new_decode_cache(&self, batch: usize, cap: usize) -> Result<Self::Cache>;
    /// `batch` as the continuation of what `cache` holds (`Model::forward_cached`).
    fn decode(&self, batch: &Batch, cache: &mut Self::Cache, opts: &ForwardOptions) -> Result<ForwardOutput>;
}

impl Decoder for Model {
    type Cache = KvCache;
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn new_decode_cache(&self, batch: usize, cap: usize) -> Result<KvCache> {
        Ok(self.new_cache(batch, cap))
    }
    fn decode(&self, batch: &Batch, cache: &mut KvCache, opts: &ForwardOptions) -> Result<ForwardOutput> {
        self.forward_cached(batch, cache, opts)
    }
}

impl Model {
    /// Continues `prompt` on the CPU; see [`generate`].
    pub fn generate(&self, prompt: &[u32], opts: &GenerateOptions, on_token: impl FnMut(u32)) -> Result<Vec<u32>> {
        generate(self, prompt, opts, on_token)
    }
}

/// Continues `prompt` with `model` (CPU or GPU), calling `on_token` as each token is chosen;
/// returns the new tokens.
pub fn generate<D: Decoder>(model: &D, prompt: &[u32], opts: &GenerateOptions, mut on_token: impl FnMut(u32)) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(Error::Input("generate: empty prompt".into()));
    }
    let valid_temp = opts.temperature >= 0.0 && opts.temperature.is_finite();
    let valid_top_p = opts.top_p > 0.0 && opts.top_p <= 1.0;
    if !valid_temp || !valid_top_p {
        return Err(Error::Input(format!(
            "generate: temperature must be >= 0 (got {}) and top_p in (0, 1] (got {})",
            opts.temperature, opts.top_p
        )));
    }
    let mut rng = Rng::new(opts.seed);
    let limit = model.config().max_position_embeddings;
    let total = prompt.len().saturating_add(opts.max_new_tokens);
    if total > limit {
        return Err(Error::Input(format!(
            "generate: prompt ({}) + max_new_tokens ({}) exceeds the model's max_position_embeddings ({limit})",
            prompt.len(),
            opts.max_new_tokens
        )));
    }
    let mut cache = model.new_decode_cache(1, total)?;
    let fo = ForwardOptions { logits: LogitsMode::Last, ..Default::default() };
    let mut out = Vec::new();
    let mut input = Batch::single(prompt);
    while out.len() < opts.max_new_tokens {
        let res = model.decode(&input, &mut cache, &fo)?;
        let logits = res.logits.map(|t| t.into_f32_vec()).unwrap_or_default();
        if let Some(i) = logits.iter().position(|x| x.is_nan()) {
            return Err(Error::NonFinite(format!("logits of generated token {} (vocab entry {i})", out.len())));
        }
        let tok = pick(&logits, opts, &mut rng);
        out.push(tok);
        on_token(tok);
        if opts.stop_tokens.contains(&tok) {
            break;
        }
        input = Batch::single(&[tok]);
    }
    Ok(out)
}

fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

fn pick(logits: &[f32], opts: &GenerateOptions, rng: &mut Rng) -> u32 {
    if opts.temperature == 0.0 {
        return argmax(logits) as u32;
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if opts.top_k > 0 {
        idx.truncate(opts.top_k);
    }
    let max = logits[idx[0]];
    let mut probs: Vec<f32> = idx.iter().map(|&i| ((logits[i] - max) / opts.temperature).exp()).collect();
    let total: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    let mut keep = probs.len();
    let mut acc = 0.0;
    for (j, p) in probs.iter().enumerate() {
        acc += p;
        if acc >= opts.top_p {
            keep = j + 1;
            break;
        }
    }
    let mass: f32 = probs[..keep].iter().sum();
    let mut r = rng.next_f32() * mass;
    for j in 0..keep {
        r -= probs[j];
        if r <= 0.0 {
            return idx[j] as u32;
        }
    }
    idx[keep - 1] as u32
}
