//! The model's forward pass on the GPU: the CPU forward (engine/model/forward.rs) op for op,
//! with weights resident on the device in f32 or bf16 and activations in f32. With bf16 weights
//! the GEMM inputs are rounded to bf16 (cast kernels) and accumulate in f32; with f32 weights every
//! op is f32 and the result matches the CPU to f32 rounding.
//!
//! This is the simple end-to-end path the CUDA issue asks for before the fused kernels land: it
//! uses the plain attention kernel, cuBLAS (or the fallback GEMM) for every projection, and the
//! element-wise kernels; LoRA adapters must be merged into the weights first (`Lora::merge_into`).
//!
//! Status: compiled, unverified on GPU (checked by `ilrec selftest --full` against the CPU forward).
use super::ops::{attention, elementwise as ew, embedding, kv, matmul, Gemm};
use super::{Cuda, DeviceTensor, Elem};
use crate::backend::cpu::{self, AttentionShape};
use crate::error::{Error, Result};
use crate::model::{check_forward_inputs, positions, Batch, ForwardOptions, ForwardOutput, LogitsMode, Model};
use crate::tensor::Tensor;

/// A linear layer's device weights.
pub(crate) struct DLinear {
    pub(crate) w: DeviceTensor,
    pub(crate) b: Option<DeviceTensor>,
    pub(crate) out_dim: usize,
}

pub(crate) struct DBlock {
    pub(crate) input_norm: DeviceTensor,
    pub(crate) q: DLinear,
    pub(crate) k: DLinear,
    pub(crate) v: DLinear,
    pub(crate) o: DLinear,
    pub(crate) post_norm: DeviceTensor,
    pub(crate) gate: DLinear,
    pub(crate) up: DLinear,
    pub(crate) down: DLinear,
}

/// An f32 activation and, with bf16 weights, its bf16 copy: the A operand of the projections.
pub(crate) struct GemmIn<'a> {
    /// The activation itself (the LoRA branches read it in f32).
    pub(crate) f32: &'a DeviceTensor,
    cast: Option<DeviceTensor>,
}

impl GemmIn<'_> {
    /// The operand in the weights' type.
    pub(crate) fn get(&self) -> &DeviceTensor {
        self.cast.as_ref().unwrap_or(self.f32)
    }
}

/// A model's weights on the GPU.
pub struct CudaModel {
    cuda: Cuda,
    config: crate::model::ModelConfig,
    /// Element type of the projection weights (f32 or bf16); norms, biases and activations are f32.
    weights: Elem,
    embed: DeviceTensor,
    blocks: Vec<DBlock>,
    norm: DeviceTensor,
    /// The LM head (`[vocab, hidden]`): the embedding again when tied.
    head: Option<DeviceTensor>,
}

/// Keys and values of every token seen so far, on the device (`[batch, kv_heads, cap, d]` f32 per
/// block), with their bookkeeping: the key mask and real-token counts (which decide RoPE
/// positions) live on the device, advanced there by kv_advance, and RoPE tables for positions
/// `0..cap` are built once, so a decode step whose tokens are all real uploads nothing. The host
/// keeps a mirror of mask and counts (it knows every batch mask) to check beam reorders.
pub struct CudaKvCache {
    k: Vec<DeviceTensor>,
    v: Vec<DeviceTensor>,
    mask: Vec<bool>,
    real: Vec<usize>,
    /// `[batch, cap]` u8 and `[batch]` u32: the device copies of `mask` and `real`.
    key_mask: DeviceTensor,
    real_d: DeviceTensor,
    /// `[cap, head_dim / 2]` f32 each.
    cos: DeviceTensor,
    sin: DeviceTensor,
    len: usize,
    cap: usize,
    batch: usize,
}

impl CudaKvCache {
    /// Tokens stored per sequence (padding included).
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Tokens per sequence the cache can hold (fixed at creation).
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Sequences in the cache.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Beam reorder on the device: the cache's rows form `groups` equal groups (one per user);
    /// new row `r` (of `groups * per_group`) is row `parent[r]` of its group (`parent` u32
    /// `[groups * per_group]`, user-local, on the device: the beam step's output, never read
    /// back). The host half of the cache (padding mask, real-token counts) is the same for every
    /// row of a group, which is what lets it follow without knowing the parents: this holds when
    /// each group started as one prompt row, and is checked.
    pub fn reorder_groups(&mut self, parent: &DeviceTensor, groups: usize, per_group: usize) -> Result<()> {
        use super::ops::beam::{kv_reorder, ReorderLayout};
        if groups == 0 || !self.batch.is_multiple_of(groups) {
            return Err(Error::Input(format!("KV reorder: {} cached rows do not form {groups} groups", self.batch)));
        }
        let src_per = self.batch / groups;
        let cap = self.cap;
        for g in 0..groups {
            let first = g * src_per;
            for r in first + 1..first + src_per {
                if self.real[r] != self.real[first] || self.mask[r * cap..(r + 1) * cap] != self.mask[first * cap..(first + 1) * cap] {
                    return Err(Error::Input(format!("KV reorder: rows {first} and {r} of group {g} have different padding")));
                }
            }
        }
        let shape = |t: &DeviceTensor| {
            let s = t.shape();
            (s[1], s[3])
        };
        let (heads, d) = self.k.first().map(shape).unwrap_or((0, 0));
        let layout = ReorderLayout { groups, src_per, dst_per: per_group, heads, cap, len: self.len, d };
        let rows = groups * per_group;
        let cuda = match self.k.first() {
            Some(t) => t.cuda().clone(),
            None => return Err(Error::Input("KV reorder: the cache has no blocks".into())),
        };
        let reorder = |old: &DeviceTensor, what: &str| -> Result<DeviceTensor> {
            let mut t = DeviceTensor::empty(&cuda, &[rows, heads, cap, d], Elem::F32, what)?;
            kv_reorder(&cuda, &mut t, old, parent, layout)?;
            Ok(t)
        };
        let k = self.k.iter().map(|t| reorder(t, "KV cache keys (reordered)")).collect::<Result<Vec<_>>>()?;
        let v = self.v.iter().map(|t| reorder(t, "KV cache values (reordered)")).collect::<Result<Vec<_>>>()?;
        let mut mask = Vec::with_capacity(rows * cap);
        let mut real = Vec::with_capacity(rows);
        for g in 0..groups {
            for _ in 0..per_group {
                mask.extend_from_slice(&self.mask[g * src_per * cap..(g * src_per + 1) * cap]);
                real.push(self.real[g * src_per]);
            }
        }
        // Rows of a group share their bookkeeping, so a reorder within groups of unchanged size
        // leaves the device copies as they are; a new group size (the first step fans each
        // prompt out to its beams) re-uploads them from the mirror.
        if per_group != src_per {
            let key_mask: Vec<u8> = mask.iter().map(|&m| m as u8).collect();
            let counts: Vec<u32> = real.iter().map(|&r| r as u32).collect();
            self.key_mask = DeviceTensor::from_u8(&cuda, &[rows, cap], &key_mask, "key mask")?;
            self.real_d = DeviceTensor::from_u32(&cuda, &[rows], &counts, "real-token counts")?;
        }
        (self.k, self.v, self.mask, self.real, self.batch) = (k, v, mask, real, rows);
        Ok(())
    }
}

fn dlinear(cuda: &Cuda, l: &crate::model::Linear, elem: Elem, what: &str) -> Result<DLinear> {
    Ok(DLinear {
        w: DeviceTensor::from_f32_in(cuda, &[l.out_dim, l.in_dim], &l.w, elem, what)?,
        b: l.b.as_ref().map(|b| DeviceTensor::from_f32(cuda, &[l.out_dim], b, what)).transpose()?,
        out_dim: l.out_dim,
    })
}

impl CudaModel {
    /// Copies `model`'s weights to the GPU; projection weights (and the embedding / LM head) in
    /// `weights` (f32 or bf16).
    pub fn upload(cuda: &Cuda, model: &Model, weights: Elem) -> Result<CudaModel> {
        if !matches!(weights, Elem::F32 | Elem::BF16) {
            return Err(Error::Input(format!("model weights on the GPU are f32 or bf16, not {weights:?}")));
        }
        let c = &model.config;
        let h = c.hidden_size;
        let blocks = model
            .blocks
            .iter()
            .enumerate()
            .map(|(l, b)| {
                let p = format!("model.layers.{l}");
                Ok(DBlock {
                    input_norm: DeviceTensor::from_f32(cuda, &[h], &b.input_norm, &format!("{p}.input_layernorm"))?,
                    q: dlinear(cuda, &b.q, weights, &format!("{p}.self_attn.q_proj"))?,
                    k: dlinear(cuda, &b.k, weights, &format!("{p}.self_attn.k_proj"))?,
                    v: dlinear(cuda, &b.v, weights, &format!("{p}.self_attn.v_proj"))?,
                    o: dlinear(cuda, &b.o, weights, &format!("{p}.self_attn.o_proj"))?,
                    post_norm: DeviceTensor::from_f32(cuda, &[h], &b.post_norm, &format!("{p}.post_attention_layernorm"))?,
                    gate: dlinear(cuda, &b.gate, weights, &format!("{p}.mlp.gate_proj"))?,
                    up: dlinear(cuda, &b.up, weights, &format!("{p}.mlp.up_proj"))?,
                    down: dlinear(cuda, &b.down, weights, &format!("{p}.mlp.down_proj"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let head = model.lm_head.as_ref().map(|l| DeviceTensor::from_f32_in(cuda, &[c.vocab_size, h], &l.w, weights, "lm_head")).transpose()?;
        Ok(CudaModel {
            cuda: cuda.clone(),
            config: c.clone(),
            weights,
            embed: DeviceTensor::from_f32_in(cuda, &[c.vocab_size, h], &model.embed, weights, "model.embed_tokens")?,
            blocks,
            norm: DeviceTensor::from_f32(cuda, &[h], &model.norm, "model.norm")?,
            head,
        })
    }

    /// The LM head (the embedding when tied).
    pub(crate) fn head(&self) -> &DeviceTensor {
        self.head.as_ref().unwrap_or(&self.embed)
    }
    pub(crate) fn embed(&self) -> &DeviceTensor {
        &self.embed
    }
    pub(crate) fn blocks(&self) -> &[DBlock] {
        &self.blocks
    }
    pub(crate) fn final_norm(&self) -> &DeviceTensor {
        &self.norm
    }
    /// Element type of the projection weights.
    pub fn weights(&self) -> Elem {
        self.weights
    }
    pub fn cuda(&self) -> &Cuda {
        &self.cuda
    }

    /// Overwrites the embedding (and untied LM-head) rows of `tokens` (`[tokens, hidden]` each),
    /// after an optimiser step on the trainable token rows.
    pub fn write_token_rows(&mut self, tokens: &[u32], embed_rows: &[f32], head_rows: Option<&[f32]>) -> Result<()> {
        self.embed.write_rows(tokens, embed_rows)?;
        match (&mut self.head, head_rows) {
            (Some(head), Some(rows)) => head.write_rows(tokens, rows),
            (None, None) => Ok(()),
            (Some(_), None) => Err(Error::Input("the model has an untied LM head: its trainable rows are required".into())),
            (None, Some(_)) => Err(Error::Input("the LM head is tied to the embedding: there are no separate head rows".into())),
        }
    }

    /// An empty cache for `batch` sequences of up to `cap` tokens.
    pub fn new_cache(&self, batch: usize, cap: usize) -> Result<CudaKvCache> {
        let c = &self.config;
        let shape = [batch, c.num_kv_heads, cap, c.head_dim];
        let mut k = Vec::with_capacity(c.num_layers);
        let mut v = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            k.push(DeviceTensor::zeros(&self.cuda, &shape, Elem::F32, &format!("KV cache keys, block {}", l + 1))?);
            v.push(DeviceTensor::zeros(&self.cuda, &shape, Elem::F32, &format!("KV cache values, block {}", l + 1))?);
        }
        let key_mask = DeviceTensor::zeros(&self.cuda, &[batch, cap], Elem::U8, "key mask")?;
        let real_d = DeviceTensor::zeros(&self.cuda, &[batch], Elem::U32, "real-token counts")?;
        let (cos, sin) = self.rope_tables(cap)?;
        Ok(CudaKvCache { k, v, mask: vec![false; batch * cap], real: vec![0; batch], key_mask, real_d, cos, sin, len: 0, cap, batch })
    }

    /// RoPE tables (`[positions, head_dim / 2]` f32 cos and sin) for positions `0..positions`, as
    /// the CPU's `rope_tables` computes them.
    pub(crate) fn rope_tables(&self, positions: usize) -> Result<(DeviceTensor, DeviceTensor)> {
        let c = &self.config;
        let pos: Vec<usize> = (0..positions).collect();
        let (cos, sin) = cpu::rope_tables(&pos, c.head_dim, c.rope_theta);
        let half = c.head_dim / 2;
        let cos = DeviceTensor::from_f32(&self.cuda, &[positions, half], &cos, "RoPE cos table")?;
        let sin = DeviceTensor::from_f32(&self.cuda, &[positions, half], &sin, "RoPE sin table")?;
        Ok((cos, sin))
    }

    /// The whole padded batch from scratch.
    pub fn forward(&self, batch: &Batch, opts: &ForwardOptions) -> Result<ForwardOutput> {
        let mut cache = self.new_cache(batch.batch, batch.seq)?;
        self.forward_cached(batch, &mut cache, opts)
    }

    /// A linear layer on activations already in the weights' type (`gemm_in`): `y = x W^T + b`.
    /// Projections that share an input (q, k, v; gate, up) share one rounded copy of it.
    pub(crate) fn linear(&self, y: &mut DeviceTensor, x: &GemmIn<'_>, l: &DLinear) -> Result<()> {
        matmul(&self.cuda, y, x.get(), &l.w, Gemm::NT)?;
        if let Some(b) = &l.b {
            ew::add_bias(&self.cuda, y, b)?;
        }
        debug_assert_eq!(y.shape()[1], l.out_dim);
        Ok(())
    }

    /// f32 activations `x` (`[rows, in]`) ready to multiply the weights: rounded to bf16 once for
    /// bf16 weights, `x` itself for f32 weights.
    pub(crate) fn gemm_in<'a>(&self, x: &'a DeviceTensor, rows: usize) -> Result<GemmIn<'a>> {
        Ok(GemmIn { f32: x, cast: self.gemm_input(x, rows)? })
    }

    /// `x` as the GEMM's A operand: itself with f32 weights, a bf16 copy with bf16 weights.
    pub(crate) fn gemm_input(&self, x: &DeviceTensor, rows: usize) -> Result<Option<DeviceTensor>> {
        if self.weights == Elem::F32 {
            return Ok(None);
        }
        let cols = x.numel() / rows.max(1);
        let mut r = DeviceTensor::empty(&self.cuda, &[rows, cols], Elem::BF16, "bf16 GEMM input")?;
        ew::cast(&self.cuda, &mut r, x)?;
        Ok(Some(r))
    }

    /// `RMSNorm_final(x) rows^T` on the device (`x` `[n, hidden]` f32, `rows` `[m, hidden]`).
    fn project(&self, x: &DeviceTensor, n: usize, rows: &DeviceTensor) -> Result<DeviceTensor> {
        let h = self.config.hidden_size;
        let mut normed = DeviceTensor::empty(&self.cuda, &[n, h], Elem::F32, "final-norm output")?;
        ew::rms_norm(&self.cuda, &mut normed, x, &self.norm, None, self.config.rms_norm_eps)?;
        self.logits_of(&normed, n, rows)
    }

    /// `normed rows^T` (`[n, m]` f32) for already normed f32 rows `normed` (`[n, hidden]`) and
    /// LM-head rows `rows` (`[m, hidden]`, in the weights' type).
    pub(crate) fn logits_of(&self, normed: &DeviceTensor, n: usize, rows: &DeviceTensor) -> Result<DeviceTensor> {
        let m = rows.shape()[0];
        let mut logits = DeviceTensor::empty(&self.cuda, &[n, m], Elem::F32, "logits")?;
        let a = self.gemm_input(normed, n)?;
        matmul(&self.cuda, &mut logits, a.as_ref().unwrap_or(normed), rows, Gemm::NT)?;
        Ok(logits)
    }

    /// The backward of `logits_of` w.r.t. its input: `dlogits rows` (`[n, hidden]` f32).
    pub(crate) fn input_grad_of(&self, dlogits: &DeviceTensor, n: usize, rows: &DeviceTensor) -> Result<DeviceTensor> {
        let h = rows.shape()[1];
        let mut dn = DeviceTensor::empty(&self.cuda, &[n, h], Elem::F32, "normed-row gradients")?;
        let a = self.gemm_input(dlogits, n)?;
        matmul(&self.cuda, &mut dn, a.as_ref().unwrap_or(dlogits), rows, Gemm::NN)?;
        Ok(dn)
    }

    /// Runs `batch` as the continuation of what `cache` holds (see `Model::forward_cached`; same
    /// inputs, same outputs up to rounding).
    pub fn forward_cached(&self, batch: &Batch, cache: &mut CudaKvCache, opts: &ForwardOptions) -> Result<ForwardOutput> {
        self.forward_cached_on(batch, None, cache, opts, false).map(|(out, _)| out)
    }

    /// The last real position's logits (`[batch, vocab]` f32), left on the device: the decode
    /// loop of the device beam search, with no host synchronisation. `tokens` (u32, one per
    /// position of `batch`) replaces `batch.tokens` when given, so a step can feed tokens the
    /// device chose; `batch` still gives the shape and the padding mask. The caller vouches that
    /// device tokens are inside the vocabulary (they are not read back to check).
    pub fn forward_last_on_device(&self, batch: &Batch, tokens: Option<&DeviceTensor>, cache: &mut CudaKvCache) -> Result<DeviceTensor> {
        let fo = ForwardOptions { logits: LogitsMode::Last, ..Default::default() };
        let (_, last) = self.forward_cached_on(batch, tokens, cache, &fo, true)?;
        last.ok_or_else(|| Error::Input("forward_last_on_device: no logits".into()))
    }

    fn forward_cached_on(&self, batch: &Batch, dev_tokens: Option<&DeviceTensor>, cache: &mut CudaKvCache, opts: &ForwardOptions, last_on_device: bool) -> Result<(ForwardOutput, Option<DeviceTensor>)> {
        let c = &self.config;
        let cu = &self.cuda;
        let (bsz, t, h) = (batch.batch, batch.seq, c.hidden_size);
        let n = bsz * t;
        check_forward_inputs(c, batch, cache.batch, opts)?;
        let probe_ids = opts.probe.as_ref().and_then(|p| p.tokens.clone());
        let past = cache.len;
        let cap = cache.cap;
        if past + t > cap {
            return Err(Error::Input(format!("the device KV cache holds {cap} tokens per sequence; {past} stored + {t} new do not fit")));
        }

        // RoPE positions count real tokens only, continuing from the cache (as on the CPU); the
        // device works them out (kv_advance). The cache's length and counts are committed only
        // when the whole forward has been queued, so a failed call (out of memory, say) leaves
        // the cache as it was: the key-mask columns it wrote lie past the committed length.
        let (_, real) = positions(batch, &cache.real);
        let mask_d = match batch.mask.iter().all(|&m| m) {
            true => None,
            false => {
                let m: Vec<u8> = batch.mask.iter().map(|&m| m as u8).collect();
                Some(DeviceTensor::from_u8(cu, &[n], &m, "batch padding mask")?)
            }
        };
        let mut pos = DeviceTensor::empty(cu, &[n], Elem::U32, "RoPE positions")?;
        let mut real_d = DeviceTensor::empty(cu, &[bsz], Elem::U32, "real-token counts")?;
        kv::kv_advance(cu, &mut pos, &mut cache.key_mask, &mut real_d, &cache.real_d, mask_d.as_ref(), past)?;
        let commit = move |cache: &mut CudaKvCache| {
            for b in 0..bsz {
                cache.mask[b * cap + past..b * cap + past + t].copy_from_slice(&batch.mask[b * t..(b + 1) * t]);
            }
            (cache.real, cache.real_d, cache.len) = (real, real_d, past + t);
        };
        let uploaded;
        let tokens = match dev_tokens {
            Some(t) if t.elem() == Elem::U32 && t.numel() == n => t,
            Some(t) => return Err(Error::Input(format!("device token ids {t:?} for a batch of {n} positions (u32 expected)"))),
            None => {
                uploaded = DeviceTensor::from_u32(cu, &[n], &batch.tokens, "token ids")?;
                &uploaded
            }
        };

        let f32t = |shape: &[usize], what: &str| DeviceTensor::empty(cu, shape, Elem::F32, what);
        let mut x = f32t(&[n, h], "residual stream")?;
        embedding::gather(cu, &mut x, &self.embed, tokens)?;
        let probe_rows = match (&opts.probe, &probe_ids) {
            (None, _) => None,
            (Some(_), None) => Some(None),
            (Some(_), Some(ids)) => {
                let ids_d = DeviceTensor::from_u32(cu, &[ids.len()], ids, "probe token ids")?;
                let mut rows = DeviceTensor::empty(cu, &[ids.len(), h], self.weights, "probe LM-head rows")?;
                embedding::gather(cu, &mut rows, self.head(), &ids_d)?;
                Some(Some(rows))
            }
        };

        let shape = AttentionShape { batch: bsz, tq: t, past, cap, n_heads: c.num_heads, n_kv_heads: c.num_kv_heads, head_dim: c.head_dim };
        let flash = attention::use_flash(self.weights, c.head_dim);
        let mut normed = f32t(&[n, h], "normed activations")?;
        let mut q = f32t(&[n, c.q_dim()], "queries")?;
        let mut k = f32t(&[n, c.kv_dim()], "keys")?;
        let mut v = f32t(&[n, c.kv_dim()], "values")?;
        let mut attn = f32t(&[n, c.q_dim()], "attention output")?;
        let mut lse = f32t(&[bsz, c.num_heads, t], "attention log-sum-exp")?;
        let mut gate = f32t(&[n, c.intermediate_size], "MLP gate")?;
        let mut up = f32t(&[n, c.intermediate_size], "MLP up")?;
        let mut proj = f32t(&[n, h], "block output projection")?;
        let mut out = ForwardOutput::default();
        let mut probes = Vec::new();
        for (l, blk) in self.blocks.iter().enumerate() {
            ew::rms_norm(cu, &mut normed, &x, &blk.input_norm, None, c.rms_norm_eps)?;
            let h1 = self.gemm_in(&normed, n)?;
            self.linear(&mut q, &h1, &blk.q)?;
            self.linear(&mut k, &h1, &blk.k)?;
            self.linear(&mut v, &h1, &blk.v)?;
            drop(h1);
            let rope = ew::RopeTables { cos: &cache.cos, sin: &cache.sin, pos: Some(&pos) };
            ew::rope(cu, &mut q, rope, c.num_heads, c.head_dim)?;
            ew::rope(cu, &mut k, rope, c.num_kv_heads, c.head_dim)?;
            let layout = kv::KvLayout { batch: bsz, t, past, cap, heads: c.num_kv_heads, d: c.head_dim };
            kv::kv_scatter(cu, &mut cache.k[l], &k, layout)?;
            kv::kv_scatter(cu, &mut cache.v[l], &v, layout)?;
            attention::forward_f32(cu, &mut attn, &mut lse, &q, &cache.k[l], &cache.v[l], &cache.key_mask, shape, flash)?;
            self.linear(&mut proj, &self.gemm_in(&attn, n)?, &blk.o)?;
            ew::add_inplace(cu, &mut x, &proj)?;

            ew::rms_norm(cu, &mut normed, &x, &blk.post_norm, None, c.rms_norm_eps)?;
            let h2 = self.gemm_in(&normed, n)?;
            self.linear(&mut gate, &h2, &blk.gate)?;
            self.linear(&mut up, &h2, &blk.up)?;
            drop(h2);
            ew::swiglu_inplace(cu, &mut gate, &up)?;
            self.linear(&mut proj, &self.gemm_in(&gate, n)?, &blk.down)?;
            ew::add_inplace(cu, &mut x, &proj)?;

            let block_no = l + 1;
            if opts.taps.contains(&block_no) {
                out.hidden.push((block_no, Tensor::from_f32(&[bsz, t, h], x.to_f32_vec()?)?));
            }
            if let (Some(spec), Some(rows)) = (&opts.probe, &probe_rows) {
                if spec.layers.contains(&block_no) {
                    let rows = rows.as_ref().unwrap_or(self.head());
                    let m = rows.shape()[0];
                    let logits = self.project(&x, n, rows)?;
                    probes.push((block_no, Tensor::from_f32(&[bsz, t, m], logits.to_f32_vec()?)?));
                }
            }
        }
        out.hidden.sort_by_key(|(l, _)| opts.taps.iter().position(|x| x == l));
        if let Some(spec) = &opts.probe {
            for &l in &spec.layers {
                if let Some((_, p)) = probes.iter().find(|(pl, _)| *pl == l) {
                    out.probe.push((l, p.clone()));
                }
            }
        }
        let vocab = c.vocab_size;
        let logits = match opts.logits {
            LogitsMode::None => None,
            LogitsMode::All => Some(Tensor::from_f32(&[bsz, t, vocab], self.project(&x, n, self.head())?.to_f32_vec()?)?),
            LogitsMode::Last => {
                // One new token per sequence (every decode step) is its own last row.
                let logits = if t == 1 {
                    self.project(&x, bsz, self.head())?
                } else {
                    let rows: Vec<u32> = (0..bsz)
                        .map(|b| (b * t + (0..t).rev().find(|&i| batch.mask[b * t + i]).unwrap_or(t - 1)) as u32)
                        .collect();
                    let rows = DeviceTensor::from_u32(cu, &[bsz], &rows, "last-token rows")?;
                    let mut last = f32t(&[bsz, h], "last-token hidden states")?;
                    embedding::gather(cu, &mut last, &x, &rows)?;
                    self.project(&last, bsz, self.head())?
                };
                if last_on_device {
                    commit(cache);
                    return Ok((out, Some(logits)));
                }
                Some(Tensor::from_f32(&[bsz, vocab], logits.to_f32_vec()?)?)
            }
        };
        out.logits = logits;
        commit(cache);
        Ok((out, None))
    }
}

impl crate::model::Decoder for CudaModel {
    type Cache = CudaKvCache;
    fn config(&self) -> &crate::model::ModelConfig {
        &self.config
    }
    fn new_decode_cache(&self, batch: usize, cap: usize) -> Result<CudaKvCache> {
        self.new_cache(batch, cap)
    }
    fn decode(&self, batch: &Batch, cache: &mut CudaKvCache, opts: &ForwardOptions) -> Result<ForwardOutput> {
        self.forward_cached(batch, cache, opts)
    }
}
