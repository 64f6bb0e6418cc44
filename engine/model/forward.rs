//! The batched forward pass with block taps and probe logits (ILREC.md section 2).
use super::{Batch, KvCache, Model, ModelConfig};
use crate::backend::cpu::{self, AttentionShape};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use std::borrow::Cow;

/// Which final-layer logits a forward returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LogitsMode {
    /// `[batch, seq, vocab]`.
    #[default]
    All,
    /// `[batch, vocab]` at each sequence's last real token of this chunk (the last column when
    /// a sequence has no real token in it).
    Last,
    /// No logits (hidden states or probes only).
    None,
}

/// Intermediate-layer logits: the model's final norm and LM head applied to the output of
/// chosen blocks, restricted to a token subset (ILREC.md section 2).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProbeSpec {
    /// 1-based block numbers (block `l` = output of the `l`-th transformer block).
    pub layers: Vec<usize>,
    /// LM-head rows to project on, in this order; `None` = the full vocabulary.
    pub tokens: Option<Vec<u32>>,
}

/// What a forward computes besides the final hidden state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ForwardOptions {
    pub logits: LogitsMode,
    /// 1-based block numbers whose residual-stream output (before the final norm) is returned.
    pub taps: Vec<usize>,
    pub probe: Option<ProbeSpec>,
}

/// Results of a forward.
#[derive(Clone, Debug, Default)]
pub struct ForwardOutput {
    /// Shape per [`LogitsMode`].
    pub logits: Option<Tensor>,
    /// `(block, [batch, seq, hidden])` in the order of `ForwardOptions::taps`.
    pub hidden: Vec<(usize, Tensor)>,
    /// `(block, [batch, seq, n_tokens])` in the order of `ProbeSpec::layers`.
    pub probe: Vec<(usize, Tensor)>,
}

impl Model {
    /// Runs a whole padded batch from scratch.
    pub fn forward(&self, batch: &Batch, opts: &ForwardOptions) -> Result<ForwardOutput> {
        let mut cache = self.new_cache(batch.batch, batch.seq);
        self.forward_cached(batch, &mut cache, opts)
    }

    /// Runs `batch` as the continuation of what `cache` holds, appending its keys and values.
    /// With an empty cache this is the full forward; outputs on real tokens do not depend on
    /// how a sequence is split into chunks.
    pub fn forward_cached(&self, batch: &Batch, cache: &mut KvCache, opts: &ForwardOptions) -> Result<ForwardOutput> {
        check_forward_inputs(&self.config, batch, cache.batch(), opts)?;
        let c = &self.config;
        let (bsz, t, h) = (batch.batch, batch.seq, c.hidden_size);
        let n = bsz * t;
        let past = cache.len;
        cache.reserve(t);
        let cap = cache.cap;

        // RoPE positions count real tokens only, continuing from the cache.
        let mut positions = vec![0usize; n];
        for b in 0..bsz {
            let mut real = cache.real[b];
            for i in 0..t {
                let m = batch.mask[b * t + i];
                positions[b * t + i] = if m { real } else { real.saturating_sub(1) };
                real += m as usize;
                cache.mask[b * cap + past + i] = m;
            }
            cache.real[b] = real;
        }
        let (cos, sin) = cpu::rope_tables(&positions, c.head_dim, c.rope_theta);

        let mut x = vec![0.0f32; n * h];
        for (row, &tok) in x.chunks_mut(h).zip(&batch.tokens) {
            row.copy_from_slice(&self.embed[tok as usize * h..(tok as usize + 1) * h]);
        }

        let probe_rows = opts.probe.as_ref().map(|p| self.gather_head_rows(p.tokens.as_deref()));
        let mut out = ForwardOutput::default();
        let mut probes: Vec<(usize, Tensor)> = Vec::new();
        let mut normed = vec![0.0f32; n * h];
        let mut attn = vec![0.0f32; n * c.q_dim()];
        let shape = AttentionShape { batch: bsz, tq: t, past, cap, n_heads: c.num_heads, n_kv_heads: c.num_kv_heads, head_dim: c.head_dim };
        // Activation buffers, allocated once per call and reused by every block.
        let mut q = vec![0.0f32; n * c.q_dim()];
        let mut k = vec![0.0f32; n * c.kv_dim()];
        let mut v = vec![0.0f32; n * c.kv_dim()];
        let mut gate = vec![0.0f32; n * c.intermediate_size];
        let mut up = vec![0.0f32; n * c.intermediate_size];
        let mut proj = vec![0.0f32; n * h];
        for (l, blk) in self.blocks.iter().enumerate() {
            cpu::rms_norm(&mut normed, &x, &blk.input_norm, c.rms_norm_eps);
            blk.q.forward_into(&normed, n, &mut q);
            blk.k.forward_into(&normed, n, &mut k);
            blk.v.forward_into(&normed, n, &mut v);
            cpu::rope_inplace(&mut q, c.num_heads, c.head_dim, &cos, &sin);
            cpu::rope_inplace(&mut k, c.num_kv_heads, c.head_dim, &cos, &sin);
            scatter_kv(&mut cache.k[l], &k, bsz, t, past, cap, c.num_kv_heads, c.head_dim);
            scatter_kv(&mut cache.v[l], &v, bsz, t, past, cap, c.num_kv_heads, c.head_dim);
            cpu::attention(&mut attn, &q, &cache.k[l], &cache.v[l], &cache.mask, shape);
            blk.o.forward_into(&attn, n, &mut proj);
            cpu::add_inplace(&mut x, &proj);

            cpu::rms_norm(&mut normed, &x, &blk.post_norm, c.rms_norm_eps);
            blk.gate.forward_into(&normed, n, &mut gate);
            blk.up.forward_into(&normed, n, &mut up);
            cpu::silu_mul(&mut gate, &up);
            blk.down.forward_into(&gate, n, &mut proj);
            cpu::add_inplace(&mut x, &proj);

            let block_no = l + 1;
            if opts.taps.contains(&block_no) {
                out.hidden.push((block_no, Tensor::from_f32(&[bsz, t, h], x.clone())?));
            }
            if let (Some(spec), Some((rows, n_rows))) = (&opts.probe, &probe_rows) {
                if spec.layers.contains(&block_no) {
                    let logits = self.project(&x, n, rows, *n_rows, &mut normed);
                    probes.push((block_no, Tensor::from_f32(&[bsz, t, *n_rows], logits)?));
                }
            }
        }
        cache.len = past + t;
        // Return taps and probes in the caller's order.
        out.hidden.sort_by_key(|(l, _)| opts.taps.iter().position(|x| x == l));
        if let Some(spec) = &opts.probe {
            for &l in &spec.layers {
                if let Some((_, p)) = probes.iter().find(|(pl, _)| *pl == l) {
                    out.probe.push((l, p.clone()));
                }
            }
        }

        let v = c.vocab_size;
        out.logits = match opts.logits {
            LogitsMode::None => None,
            LogitsMode::All => {
                let logits = self.project(&x, n, self.head_weight(), v, &mut normed);
                Some(Tensor::from_f32(&[bsz, t, v], logits)?)
            }
            LogitsMode::Last => {
                let mut last = vec![0.0f32; bsz * h];
                for b in 0..bsz {
                    let i = (0..t).rev().find(|&i| batch.mask[b * t + i]).unwrap_or(t.saturating_sub(1));
                    last[b * h..(b + 1) * h].copy_from_slice(&x[(b * t + i) * h..(b * t + i + 1) * h]);
                }
                let mut buf = vec![0.0f32; bsz * h];
                let logits = self.project(&last, bsz, self.head_weight(), v, &mut buf);
                Some(Tensor::from_f32(&[bsz, v], logits)?)
            }
        };
        Ok(out)
    }

    /// `RMSNorm_final(x) · rows^T`: the logit lens of hidden states `x` (`[n, hidden]`) onto
    /// `n_rows` LM-head rows (`rows` is `[n_rows, hidden]`). `scratch` holds `n * hidden`.
    pub fn project(&self, x: &[f32], n: usize, rows: &[f32], n_rows: usize, scratch: &mut [f32]) -> Vec<f32> {
        let h = self.config.hidden_size;
        let normed = &mut scratch[..n * h];
        cpu::rms_norm(normed, &x[..n * h], &self.norm, self.config.rms_norm_eps);
        let mut logits = vec![0.0f32; n * n_rows];
        cpu::matmul_nt(&mut logits, n_rows, normed, h, rows, h, n, n_rows, h, false);
        logits
    }

    /// The LM-head rows of `tokens` as one `[len, hidden]` matrix (all rows when `None`).
    pub fn gather_head_rows(&self, tokens: Option<&[u32]>) -> (Cow<'_, [f32]>, usize) {
        let h = self.config.hidden_size;
        let head = self.head_weight();
        match tokens {
            None => (Cow::Borrowed(head), self.config.vocab_size),
            Some(ids) => {
                let mut rows = Vec::with_capacity(ids.len() * h);
                for &id in ids {
                    rows.extend_from_slice(&head[id as usize * h..(id as usize + 1) * h]);
                }
                (Cow::Owned(rows), ids.len())
            }
        }
    }
}

/// Checks a forward's inputs against the model (`c`) and a cache of `cache_batch` sequences:
/// shared by the CPU and the CUDA forward, so both refuse the same inputs with the same words.
pub(crate) fn check_forward_inputs(c: &ModelConfig, batch: &Batch, cache_batch: usize, opts: &ForwardOptions) -> Result<()> {
    if batch.tokens.len() != batch.batch * batch.seq || batch.mask.len() != batch.tokens.len() {
        return Err(Error::Input(format!("batch {}x{} has {} tokens, {} mask entries", batch.batch, batch.seq, batch.tokens.len(), batch.mask.len())));
    }
    if batch.batch == 0 || batch.seq == 0 {
        return Err(Error::Input(format!("empty batch ({}x{} tokens)", batch.batch, batch.seq)));
    }
    if batch.batch != cache_batch {
        return Err(Error::Input(format!("batch of {} sequences with a cache of {cache_batch}", batch.batch)));
    }
    if let Some((pos, &tok)) = batch.tokens.iter().enumerate().find(|(_, &t)| t as usize >= c.vocab_size) {
        return Err(Error::Input(format!(
            "token id {tok} at sequence {}, position {} is outside the vocabulary ({} tokens)",
            pos / batch.seq.max(1),
            pos % batch.seq.max(1),
            c.vocab_size
        )));
    }
    let probe_layers = opts.probe.iter().flat_map(|p| p.layers.iter());
    for &l in opts.taps.iter().chain(probe_layers) {
        if l == 0 || l > c.num_layers {
            return Err(Error::Input(format!("block {l} does not exist: blocks are numbered 1..={}", c.num_layers)));
        }
    }
    if let Some(&t) = opts.probe.as_ref().and_then(|p| p.tokens.as_ref()).and_then(|t| t.iter().find(|&&t| t as usize >= c.vocab_size)) {
        return Err(Error::Input(format!("probe token id {t} is outside the vocabulary ({} tokens)", c.vocab_size)));
    }
    Ok(())
}

/// Writes `[batch * t, kv_heads * d]` projections into the cache layout `[batch, kv_heads, cap, d]`
/// at rows `past..past + t`.
#[allow(clippy::too_many_arguments)]
fn scatter_kv(dst: &mut [f32], src: &[f32], bsz: usize, t: usize, past: usize, cap: usize, heads: usize, d: usize) {
    for b in 0..bsz {
        for i in 0..t {
            let row = &src[(b * t + i) * heads * d..(b * t + i + 1) * heads * d];
            for hd in 0..heads {
                let at = ((b * heads + hd) * cap + past + i) * d;
                dst[at..at + d].copy_from_slice(&row[hd * d..(hd + 1) * d]);
            }
        }
    }
}
