//! Llama / Qwen2 decoders: weights, batched forward with layer taps and probe logits, KV cache.
mod batch;
mod cache;
pub mod config;
mod forward;
pub mod generate;

pub use batch::Batch;
pub(crate) use batch::positions;
pub(crate) use forward::check_forward_inputs;
pub use cache::KvCache;
pub use config::{Family, ModelConfig};
pub use forward::{ForwardOptions, ForwardOutput, LogitsMode, ProbeSpec};
pub use generate::Decoder;

use crate::backend::cpu;
use crate::error::{Error, Result};
use crate::weights::SafetensorsSet;
use std::path::Path;

/// A linear layer `y = x W^T + b` with PyTorch's `[out, in]` weight layout.
#[derive(Clone, Debug)]
pub struct Linear {
    pub w: Vec<f32>,
    pub b: Option<Vec<f32>>,
    pub out_dim: usize,
    pub in_dim: usize,
}

impl Linear {
    fn load(st: &SafetensorsSet, name: &str, out_dim: usize, in_dim: usize, bias: bool) -> Result<Self> {
        let w = st.get_f32(&format!("{name}.weight"), &[out_dim, in_dim])?;
        let b = if bias { Some(st.get_f32(&format!("{name}.bias"), &[out_dim])?) } else { None };
        Ok(Linear { w, b, out_dim, in_dim })
    }

    /// `x` is `[rows, in_dim]`; returns `[rows, out_dim]`.
    pub fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let mut y = vec![0.0; rows * self.out_dim];
        self.forward_into(x, rows, &mut y);
        y
    }

    /// [`Linear::forward`] into a caller-owned buffer: `y[..rows * out_dim]` is overwritten
    /// (reusing activation buffers avoids the page faults of fresh allocations).
    pub fn forward_into(&self, x: &[f32], rows: usize, y: &mut [f32]) {
        let y = &mut y[..rows * self.out_dim];
        cpu::matmul_nt(y, self.out_dim, x, self.in_dim, &self.w, self.in_dim, rows, self.out_dim, self.in_dim, false);
        if let Some(b) = &self.b {
            cpu::add_bias(y, b);
        }
    }

    fn nbytes(&self) -> usize {
        4 * (self.w.len() + self.b.as_ref().map_or(0, Vec::len))
    }
}

/// One transformer block: pre-norm attention and pre-norm SwiGLU MLP, each with a residual.
#[derive(Clone, Debug)]
pub struct Block {
    pub input_norm: Vec<f32>,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub post_norm: Vec<f32>,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

/// A decoder-only language model with f32 weights on the host.
#[derive(Clone, Debug)]
pub struct Model {
    pub config: ModelConfig,
    /// `[vocab, hidden]`.
    pub embed: Vec<f32>,
    pub blocks: Vec<Block>,
    pub norm: Vec<f32>,
    /// `None` when the LM head is tied to the embedding.
    pub lm_head: Option<Linear>,
}

impl Model {
    /// Loads `dir/config.json` and the safetensors weights (single file or sharded).
    pub fn load(dir: &Path) -> Result<Self> {
        let config = ModelConfig::from_file(&config::config_path(dir))?;
        let st = SafetensorsSet::open_dir(dir)?;
        Self::from_safetensors(config, &st)
    }

    /// Builds the model from HF-named tensors, checking every shape against the config.
    pub fn from_safetensors(config: ModelConfig, st: &SafetensorsSet) -> Result<Self> {
        let c = &config;
        let (h, i, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let embed = st.get_f32("model.embed_tokens.weight", &[v, h])?;
        let blocks = (0..c.num_layers)
            .map(|l| {
                let p = format!("model.layers.{l}");
                Ok(Block {
                    input_norm: st.get_f32(&format!("{p}.input_layernorm.weight"), &[h])?,
                    q: Linear::load(st, &format!("{p}.self_attn.q_proj"), c.q_dim(), h, c.qkv_bias)?,
                    k: Linear::load(st, &format!("{p}.self_attn.k_proj"), c.kv_dim(), h, c.qkv_bias)?,
                    v: Linear::load(st, &format!("{p}.self_attn.v_proj"), c.kv_dim(), h, c.qkv_bias)?,
                    o: Linear::load(st, &format!("{p}.self_attn.o_proj"), h, c.q_dim(), c.o_bias)?,
                    post_norm: st.get_f32(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                    gate: Linear::load(st, &format!("{p}.mlp.gate_proj"), i, h, false)?,
                    up: Linear::load(st, &format!("{p}.mlp.up_proj"), i, h, false)?,
                    down: Linear::load(st, &format!("{p}.mlp.down_proj"), h, i, false)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = st.get_f32("model.norm.weight", &[h])?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(Linear::load(st, "lm_head", v, h, false)?)
        };
        let model = Model { config, embed, blocks, norm, lm_head };
        model.check_finite()?;
        Ok(model)
    }

    /// Every weight with its HF tensor name, in file order (tied heads listed once).
    pub fn named_weights(&self) -> Vec<(String, &[f32])> {
        let mut named: Vec<(String, &[f32])> = vec![("model.embed_tokens.weight".into(), &self.embed)];
        for (l, b) in self.blocks.iter().enumerate() {
            let p = format!("model.layers.{l}");
            named.push((format!("{p}.input_layernorm.weight"), &b.input_norm));
            named.push((format!("{p}.post_attention_layernorm.weight"), &b.post_norm));
            let linears = [("self_attn.q_proj", &b.q), ("self_attn.k_proj", &b.k), ("self_attn.v_proj", &b.v), ("self_attn.o_proj", &b.o), ("mlp.gate_proj", &b.gate), ("mlp.up_proj", &b.up), ("mlp.down_proj", &b.down)];
            for (n, lin) in linears {
                named.push((format!("{p}.{n}.weight"), &lin.w));
                if let Some(bias) = &lin.b {
                    named.push((format!("{p}.{n}.bias"), bias));
                }
            }
        }
        named.push(("model.norm.weight".into(), &self.norm));
        if let Some(head) = &self.lm_head {
            named.push(("lm_head.weight".into(), &head.w));
        }
        named
    }

    fn check_finite(&self) -> Result<()> {
        for (name, w) in self.named_weights() {
            if let Some(pos) = w.iter().position(|x| !x.is_finite()) {
                return Err(Error::NonFinite(format!("weight `{name}` at element {pos}: {}", w[pos])));
            }
        }
        Ok(())
    }

    /// The LM head as a `[vocab, hidden]` matrix (the embedding when tied).
    pub fn head_weight(&self) -> &[f32] {
        self.lm_head.as_ref().map_or(&self.embed, |l| &l.w)
    }

    /// Bytes of all weights as held in memory (f32; tied matrices counted once).
    pub fn weight_bytes(&self) -> usize {
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| {
                4 * (b.input_norm.len() + b.post_norm.len())
                    + [&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down].iter().map(|l| l.nbytes()).sum::<usize>()
            })
            .sum();
        4 * (self.embed.len() + self.norm.len()) + blocks + self.lm_head.as_ref().map_or(0, Linear::nbytes)
    }

    /// An empty KV cache for `batch` sequences.
    pub fn new_cache(&self, batch: usize, cap: usize) -> KvCache {
        KvCache::new(&self.config, batch, cap)
    }

    /// Keeps only the first `n` transformer blocks (the final norm and LM head stay): a
    /// layer-truncated model, the cheap "small model" of CPU-scale runs. Its logits are the
    /// logit lens of block `n` of the full model.
    pub fn keep_blocks(&mut self, n: usize) -> Result<()> {
        if n == 0 || n > self.blocks.len() {
            return Err(Error::Input(format!("cannot keep {n} blocks: the model has {} (need 1..={})", self.blocks.len(), self.blocks.len())));
        }
        self.blocks.truncate(n);
        self.config.num_layers = n;
        Ok(())
    }
}

/// New vocabulary rows (item-code tokens of semantic IDs, docs/semantic_ids.md).
impl Model {
    /// Scale of the noise added to new token rows, relative to each dimension's standard
    /// deviation over the existing rows.
    pub const NEW_TOKEN_NOISE: f64 = 0.1;

    /// Lifts the LM-head rows of the new tokens `new` (already added) so that each one's mean
    /// logit over the given prediction positions equals the mean log-sum-exp of the existing
    /// vocabulary there: the new tokens start as likely as all old tokens together, so a
    /// fine-tune begins near a uniform choice among them instead of spending its first steps
    /// lifting fresh rows past a pretrained vocabulary (60 nats below it for SmolLM2's first
    /// blocks). Each row moves along the mean normalised hidden state `h̄` only; with a tied
    /// head this moves the embedding rows too. `seqs[i]` is a token sequence and `positions[i]`
    /// its prediction positions (e.g. a training example's response positions). Returns the
    /// matched logit.
    pub fn match_new_token_logits(&mut self, new: std::ops::Range<u32>, seqs: &[Vec<u32>], positions: &[Vec<usize>]) -> Result<f32> {
        let h = self.config.hidden_size;
        let old = new.start as usize;
        if seqs.len() != positions.len() || seqs.is_empty() || new.is_empty() || new.end as usize > self.config.vocab_size {
            return Err(Error::Input(format!(
                "matching new token logits: {} sequences, {} position lists, tokens {new:?} of {}",
                seqs.len(),
                positions.len(),
                self.config.vocab_size
            )));
        }
        let last = self.config.num_layers;
        let mut hs: Vec<f32> = Vec::new();
        for (chunk, pos) in seqs.chunks(16).zip(positions.chunks(16)) {
            let batch = Batch::right_padded(chunk, 0)?;
            let out = self.forward(&batch, &ForwardOptions { logits: LogitsMode::None, taps: vec![last], probe: None })?;
            let x = out.hidden[0].1.as_f32().ok_or_else(|| Error::Input("f32 hidden states expected".into()))?;
            for (b, ps) in pos.iter().enumerate() {
                for &p in ps {
                    if p >= chunk[b].len() {
                        return Err(Error::Input(format!("prediction position {p} is past a sequence of {} tokens", chunk[b].len())));
                    }
                    let r = (b * batch.seq + p) * h;
                    let mut y = vec![0.0f32; h];
                    cpu::rms_norm(&mut y, &x[r..r + h], &self.norm, self.config.rms_norm_eps);
                    hs.extend_from_slice(&y);
                }
            }
        }
        let n = hs.len() / h;
        if n == 0 {
            return Err(Error::Input("matching new token logits: no prediction positions".into()));
        }
        let mut logits = vec![0.0f32; n * old];
        cpu::matmul_nt(&mut logits, old, &hs, h, self.head_weight(), h, n, old, h, false);
        let target = logits
            .chunks(old)
            .map(|z| {
                let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                m + z.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln()
            })
            .sum::<f64>()
            / n as f64;
        let mut mean = vec![0.0f64; h];
        for row in hs.chunks(h) {
            mean.iter_mut().zip(row).for_each(|(m, &v)| *m += v as f64 / n as f64);
        }
        let norm2: f64 = mean.iter().map(|v| v * v).sum();
        if !(norm2 > 0.0 && target.is_finite()) {
            return Err(Error::NonFinite(format!("matching new token logits: |h̄|² = {norm2}, target logit {target}")));
        }
        let rows = match self.lm_head.as_mut() {
            Some(l) => &mut l.w,
            None => &mut self.embed,
        };
        for t in new {
            let w = &mut rows[t as usize * h..(t as usize + 1) * h];
            let cur: f64 = w.iter().zip(&mean).map(|(&a, &b)| a as f64 * b).sum();
            let c = (target - cur) / norm2;
            w.iter_mut().zip(&mean).for_each(|(a, &b)| *a += (c * b) as f32);
        }
        Ok(target as f32)
    }

    /// Initial rows for `n` new tokens: per dimension `d`, the mean of the existing rows plus
    /// seeded noise `N(0, (NEW_TOKEN_NOISE * std_d)^2)`, `std_d` the standard deviation of
    /// column `d` over the existing rows (population, computed in f64). The embedding rows
    /// come from the embedding's statistics and, when the head is untied, the head rows from
    /// the head's (second return value; `None` when tied). A mean row gives a new token the
    /// average token's logit, so the pretrained distribution barely moves; the noise makes
    /// the new tokens distinguishable from the first step.
    pub fn new_token_rows(&self, n: usize, seed: u64) -> (Vec<f32>, Option<Vec<f32>>) {
        let h = self.config.hidden_size;
        let mut rng = crate::rng::Rng::new(seed);
        let embed = Self::mean_plus_noise_rows(&self.embed, h, n, &mut rng);
        let head = self.lm_head.as_ref().map(|l| Self::mean_plus_noise_rows(&l.w, h, n, &mut rng));
        (embed, head)
    }

    fn mean_plus_noise_rows(w: &[f32], h: usize, n: usize, rng: &mut crate::rng::Rng) -> Vec<f32> {
        let (mean, var) = crate::tensor::column_moments(w, h);
        let std: Vec<f64> = var.iter().map(|v| v.sqrt()).collect();
        let mut out = Vec::with_capacity(n * h);
        for _ in 0..n {
            for d in 0..h {
                out.push((mean[d] + Self::NEW_TOKEN_NOISE * std[d] * rng.normal() as f64) as f32);
            }
        }
        out
    }

    /// Appends `embed_rows.len() / hidden` tokens to the vocabulary with these embedding rows
    /// (`[n, hidden]`) and, for an untied head, `head_rows` (`None`: the embedding rows are
    /// copied). Returns the new token ids; `config.vocab_size` grows by `n`.
    pub fn add_tokens(&mut self, embed_rows: &[f32], head_rows: Option<&[f32]>) -> Result<std::ops::Range<u32>> {
        let first = self.config.vocab_size as u32;
        self.write_token_rows(first, embed_rows, head_rows)
    }

    /// Writes the rows of tokens `first..first + n` (`n = embed_rows.len() / hidden`),
    /// overwriting existing rows and appending beyond the vocabulary (which then grows);
    /// `first` must not exceed the vocabulary size. `head_rows` as in [`Model::add_tokens`]
    /// (an error when the head is tied). Returns the token ids written.
    pub fn write_token_rows(&mut self, first: u32, embed_rows: &[f32], head_rows: Option<&[f32]>) -> Result<std::ops::Range<u32>> {
        let h = self.config.hidden_size;
        let v = self.config.vocab_size;
        if embed_rows.is_empty() || !embed_rows.len().is_multiple_of(h) {
            return Err(Error::Input(format!("new token rows: {} values are not a positive multiple of hidden size {h}", embed_rows.len())));
        }
        let n = embed_rows.len() / h;
        if first as usize > v {
            return Err(Error::Input(format!("new token rows start at id {first}, beyond the vocabulary ({v} tokens)")));
        }
        let end = first as usize + n;
        if end > u32::MAX as usize {
            return Err(Error::Input(format!("new token rows: vocabulary of {end} tokens exceeds u32 ids")));
        }
        match (&self.lm_head, head_rows) {
            (None, Some(_)) => return Err(Error::Input("new token rows: head rows given but the LM head is tied to the embedding".into())),
            (_, Some(r)) if r.len() != embed_rows.len() => {
                return Err(Error::Input(format!("new token rows: {} head values for {} embedding values", r.len(), embed_rows.len())));
            }
            _ => {}
        }
        for (what, rows) in [("embedding", Some(embed_rows)), ("LM-head", head_rows)] {
            if let Some(pos) = rows.and_then(|r| r.iter().position(|x| !x.is_finite())) {
                return Err(Error::NonFinite(format!("new {what} row {} (token {}), dimension {}", pos / h, first as usize + pos / h, pos % h)));
            }
        }
        let new_v = v.max(end);
        let write = |w: &mut Vec<f32>, rows: &[f32]| {
            w.resize(new_v * h, 0.0);
            w[first as usize * h..end * h].copy_from_slice(rows);
        };
        write(&mut self.embed, embed_rows);
        if let Some(head) = &mut self.lm_head {
            write(&mut head.w, head_rows.unwrap_or(embed_rows));
            if let Some(b) = &mut head.b {
                b.resize(new_v, 0.0);
            }
            head.out_dim = new_v;
        }
        self.config.vocab_size = new_v;
        Ok(first..end as u32)
    }
}
