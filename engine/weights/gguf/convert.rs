//! From llama.cpp's model layout to Hugging Face's: hyper-parameters, tensor names, and the
//! row order of the attention Q/K projections.
use std::collections::BTreeSet;

use serde_json::{json, Value};

use super::reader::{GgufFile, MetaValue, FORMAT};
use crate::error::{Error, Result};

/// A model family this importer can convert.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// `general.architecture == "llama"` (Llama, SmolLM, Mistral-style dense models).
    Llama,
    /// `general.architecture == "qwen2"` (Qwen2 / Qwen2.5: Q/K/V biases, no Q/K permutation).
    Qwen2,
}

impl Architecture {
    /// The GGUF architecture name, also the HF `model_type`.
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
        }
    }

    fn hf_class(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

/// Hyper-parameters read from the GGUF metadata.
#[derive(Clone, Debug)]
pub(crate) struct ModelConfig {
    pub arch: Architecture,
    pub hidden: usize,
    pub intermediate: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub n_layers: usize,
    pub head_dim: usize,
    /// Whether the file states the head size (`attention.key_length`).
    pub head_dim_given: bool,
    pub rms_eps: f64,
    pub rope_theta: f64,
    pub vocab_size: usize,
    pub max_positions: usize,
    pub tied: bool,
    pub attention_bias: bool,
    pub bos: Option<u64>,
    pub eos: Option<u64>,
    pub pad: Option<u64>,
}

/// An f32 metadata number as the shortest decimal that round-trips through f32, so that
/// `1e-5` stored as f32 is written as `1e-5`, not `9.999999747378752e-6`.
fn clean_float(v: &MetaValue) -> Option<f64> {
    match *v {
        MetaValue::F32(x) => format!("{x}").parse().ok(),
        _ => v.as_f64(),
    }
}

fn to_usize(f: &GgufFile, key: &str, v: u64) -> Result<usize> {
    usize::try_from(v).map_err(|_| Error::InvalidField {
        path: f.path().into(),
        field: key.into(),
        msg: format!("{v} is too large"),
    })
}

fn invalid(f: &GgufFile, field: &str, msg: impl Into<String>) -> Error {
    Error::InvalidField {
        path: f.path().into(),
        field: field.into(),
        msg: msg.into(),
    }
}

impl ModelConfig {
    /// Reads and cross-checks the hyper-parameters of a `llama` or `qwen2` GGUF.
    pub fn from_gguf(f: &GgufFile) -> Result<ModelConfig> {
        let arch_name = f.str_field("general.architecture")?;
        let arch = match arch_name {
            "llama" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            other => {
                return Err(invalid(
                    f,
                    "general.architecture",
                    format!("architecture `{other}` is not supported (only `llama` and `qwen2`)"),
                ))
            }
        };
        let a = arch.name();
        let req = |k: &str| -> Result<usize> {
            let key = format!("{a}.{k}");
            let v = f.u64_field(&key)?;
            to_usize(f, &key, v)
        };
        let opt = |k: &str| -> Result<Option<usize>> {
            let key = format!("{a}.{k}");
            f.opt_u64(&key)?.map(|v| to_usize(f, &key, v)).transpose()
        };
        let float = |k: &str| -> Result<Option<f64>> {
            let key = format!("{a}.{k}");
            match f.get(&key) {
                None => Ok(None),
                Some(v) => clean_float(v).map(Some).ok_or_else(|| {
                    invalid(
                        f,
                        &key,
                        format!("expected a number, found {}", v.type_name()),
                    )
                }),
            }
        };

        let hidden = req("embedding_length")?;
        let intermediate = req("feed_forward_length")?;
        let n_heads = req("attention.head_count")?;
        let n_kv_heads = opt("attention.head_count_kv")?.unwrap_or(n_heads);
        let n_layers = req("block_count")?;
        let max_positions = req("context_length")?;
        let rms_eps =
            float("attention.layer_norm_rms_epsilon")?.ok_or_else(|| Error::MissingField {
                path: f.path().into(),
                field: format!("{a}.attention.layer_norm_rms_epsilon"),
            })?;
        let rope_theta = float("rope.freq_base")?.unwrap_or(match arch {
            Architecture::Llama => 10_000.0,
            Architecture::Qwen2 => 1_000_000.0,
        });
        if n_heads == 0 || n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
            return Err(invalid(
                f,
                &format!("{a}.attention.head_count_kv"),
                format!("{n_kv_heads} KV heads do not divide {n_heads} query heads"),
            ));
        }
        let key_length = opt("attention.key_length")?;
        let head_dim = match key_length {
            Some(d) => d,
            None if hidden % n_heads == 0 => hidden / n_heads,
            None => {
                return Err(invalid(
                    f,
                    &format!("{a}.attention.head_count"),
                    format!("{n_heads} heads do not divide the hidden size {hidden}"),
                ))
            }
        };
        if let Some(v) = opt("attention.value_length")? {
            if v != head_dim {
                return Err(invalid(
                    f,
                    &format!("{a}.attention.value_length"),
                    format!("{v} differs from the key length {head_dim}"),
                ));
            }
        }
        if let Some(r) = opt("rope.dimension_count")? {
            if r != head_dim {
                return Err(invalid(
                    f,
                    &format!("{a}.rope.dimension_count"),
                    format!("partial rotary embedding ({r} of {head_dim} dims) is not supported"),
                ));
            }
        }
        if let Some(kind) = f.opt_str(&format!("{a}.rope.scaling.type"))? {
            if kind != "none" {
                return Err(invalid(
                    f,
                    &format!("{a}.rope.scaling.type"),
                    format!("RoPE scaling `{kind}` is not supported"),
                ));
            }
        }
        if head_dim % 2 != 0 {
            return Err(invalid(
                f,
                &format!("{a}.attention.key_length"),
                format!("head size {head_dim} is odd"),
            ));
        }

        let embed = f
            .tensor("token_embd.weight")
            .ok_or_else(|| Error::MissingTensor {
                path: f.path().into(),
                tensor: "token_embd.weight".into(),
            })?;
        let vocab_size = match opt("vocab_size")? {
            Some(v) => v,
            None => embed.shape.first().copied().unwrap_or(0),
        };
        let tok_id = |k: &str| f.opt_u64(&format!("tokenizer.ggml.{k}"));
        Ok(ModelConfig {
            arch,
            hidden,
            intermediate,
            n_heads,
            n_kv_heads,
            n_layers,
            head_dim,
            head_dim_given: key_length.is_some(),
            rms_eps,
            rope_theta,
            vocab_size,
            max_positions,
            tied: f.tensor("output.weight").is_none(),
            attention_bias: f.tensor("blk.0.attn_q.bias").is_some(),
            bos: tok_id("bos_token_id")?,
            eos: tok_id("eos_token_id")?,
            pad: tok_id("padding_token_id")?,
        })
    }

    /// `config.json` in Hugging Face's format.
    pub fn to_hf_json(&self) -> Value {
        let mut c = json!({
            "architectures": [self.arch.hf_class()],
            "model_type": self.arch.name(),
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "num_hidden_layers": self.n_layers,
            "rms_norm_eps": self.rms_eps,
            "rope_theta": self.rope_theta,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_positions,
            "tie_word_embeddings": self.tied,
            "bos_token_id": self.bos,
            "eos_token_id": self.eos,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        });
        let m = c.as_object_mut().expect("json! object");
        if self.head_dim_given {
            m.insert("head_dim".into(), json!(self.head_dim));
        }
        if let Some(p) = self.pad {
            m.insert("pad_token_id".into(), json!(p));
        }
        match self.arch {
            Architecture::Llama => {
                m.insert("attention_bias".into(), json!(self.attention_bias));
                m.insert("mlp_bias".into(), json!(false));
            }
            Architecture::Qwen2 => {
                m.insert("use_sliding_window".into(), json!(false));
            }
        }
        c
    }
}

/// How a GGUF tensor becomes a Hugging Face tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TensorPlan {
    pub gguf_name: String,
    pub hf_name: String,
    /// Row-major shape (same in both layouts).
    pub shape: Vec<usize>,
    /// `Some(heads)`: undo llama.cpp's RoPE row permutation with this many heads.
    pub unpermute_heads: Option<usize>,
}

/// Maps every tensor of the file to its Hugging Face name and checks shapes against `cfg`.
/// Fails on tensors without an HF equivalent, on missing required tensors and on shape
/// mismatches.
pub(crate) fn plan_tensors(f: &GgufFile, cfg: &ModelConfig) -> Result<Vec<TensorPlan>> {
    let (h, hd, inter) = (cfg.hidden, cfg.head_dim, cfg.intermediate);
    let q_rows = cfg.n_heads * hd;
    let kv_rows = cfg.n_kv_heads * hd;
    let permute = cfg.arch == Architecture::Llama;
    let mut plans = Vec::with_capacity(f.tensors().len());
    for t in f.tensors() {
        let unknown = || {
            Error::format(
                f.path(),
                FORMAT,
                format!(
                    "tensor `{}` has no Hugging Face {} equivalent",
                    t.name,
                    cfg.arch.hf_class()
                ),
            )
        };
        let (hf_name, expected, unpermute_heads): (String, Vec<usize>, Option<usize>) =
            match t.name.as_str() {
                "token_embd.weight" => ("model.embed_tokens.weight".into(), vec![cfg.vocab_size, h], None),
                "output_norm.weight" => ("model.norm.weight".into(), vec![h], None),
                "output.weight" => ("lm_head.weight".into(), vec![cfg.vocab_size, h], None),
                "rope_freqs.weight" => {
                    return Err(Error::format(
                        f.path(),
                        FORMAT,
                        "tensor `rope_freqs.weight` (Llama-3-style RoPE frequency scaling) is not supported",
                    ))
                }
                name => {
                    let rest = name.strip_prefix("blk.").ok_or_else(unknown)?;
                    let (idx, part) = rest.split_once('.').ok_or_else(unknown)?;
                    let layer: usize = idx.parse().map_err(|_| unknown())?;
                    if layer >= cfg.n_layers || idx != layer.to_string() {
                        return Err(unknown());
                    }
                    let p = format!("model.layers.{layer}");
                    let qk = |heads| if permute { Some(heads) } else { None };
                    match part {
                        "attn_norm.weight" => (format!("{p}.input_layernorm.weight"), vec![h], None),
                        "ffn_norm.weight" => (format!("{p}.post_attention_layernorm.weight"), vec![h], None),
                        "attn_q.weight" => (format!("{p}.self_attn.q_proj.weight"), vec![q_rows, h], qk(cfg.n_heads)),
                        "attn_k.weight" => (format!("{p}.self_attn.k_proj.weight"), vec![kv_rows, h], qk(cfg.n_kv_heads)),
                        "attn_v.weight" => (format!("{p}.self_attn.v_proj.weight"), vec![kv_rows, h], None),
                        "attn_output.weight" => (format!("{p}.self_attn.o_proj.weight"), vec![h, q_rows], None),
                        "attn_q.bias" => (format!("{p}.self_attn.q_proj.bias"), vec![q_rows], qk(cfg.n_heads)),
                        "attn_k.bias" => (format!("{p}.self_attn.k_proj.bias"), vec![kv_rows], qk(cfg.n_kv_heads)),
                        "attn_v.bias" => (format!("{p}.self_attn.v_proj.bias"), vec![kv_rows], None),
                        "ffn_gate.weight" => (format!("{p}.mlp.gate_proj.weight"), vec![inter, h], None),
                        "ffn_up.weight" => (format!("{p}.mlp.up_proj.weight"), vec![inter, h], None),
                        "ffn_down.weight" => (format!("{p}.mlp.down_proj.weight"), vec![h, inter], None),
                        _ => return Err(unknown()),
                    }
                }
            };
        if t.shape != expected {
            return Err(Error::ShapeMismatch {
                path: f.path().into(),
                tensor: t.name.clone(),
                expected,
                got: t.shape.clone(),
            });
        }
        plans.push(TensorPlan {
            gguf_name: t.name.clone(),
            hf_name,
            shape: t.shape.clone(),
            unpermute_heads,
        });
    }

    let present: BTreeSet<&str> = plans.iter().map(|p| p.hf_name.as_str()).collect();
    let mut required = vec![
        (
            "token_embd.weight".to_string(),
            "model.embed_tokens.weight".to_string(),
        ),
        ("output_norm.weight".into(), "model.norm.weight".into()),
    ];
    let mut per_layer = vec![
        ("attn_norm.weight", "input_layernorm.weight"),
        ("ffn_norm.weight", "post_attention_layernorm.weight"),
        ("attn_q.weight", "self_attn.q_proj.weight"),
        ("attn_k.weight", "self_attn.k_proj.weight"),
        ("attn_v.weight", "self_attn.v_proj.weight"),
        ("attn_output.weight", "self_attn.o_proj.weight"),
        ("ffn_gate.weight", "mlp.gate_proj.weight"),
        ("ffn_up.weight", "mlp.up_proj.weight"),
        ("ffn_down.weight", "mlp.down_proj.weight"),
    ];
    if cfg.arch == Architecture::Qwen2 || cfg.attention_bias {
        per_layer.extend([
            ("attn_q.bias", "self_attn.q_proj.bias"),
            ("attn_k.bias", "self_attn.k_proj.bias"),
            ("attn_v.bias", "self_attn.v_proj.bias"),
        ]);
    }
    for i in 0..cfg.n_layers {
        for (g, hf) in &per_layer {
            required.push((format!("blk.{i}.{g}"), format!("model.layers.{i}.{hf}")));
        }
    }
    for (g, hf) in required {
        if !present.contains(hf.as_str()) {
            return Err(Error::MissingTensor {
                path: f.path().into(),
                tensor: g,
            });
        }
    }
    Ok(plans)
}

/// Undoes llama.cpp's Q/K row permutation in place.
///
/// `convert_hf_to_gguf.py` reorders the rows of each head from HF's "rotate half" layout
/// (first half of the head's rows are the real parts, second half the imaginary parts) to
/// interleaved pairs: GGUF row `h*hd + 2*i + j` holds HF row `h*hd + j*hd/2 + i`
/// (`i < hd/2`, `j` in {0, 1}). This applies the inverse. `data` is row-major with `rows`
/// rows of `cols` values (`cols == 1` for a bias); `rows` must be a multiple of `2 * heads`.
pub(crate) fn unpermute_rows(data: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    debug_assert_eq!(data.len(), rows * cols);
    debug_assert_eq!(rows % (2 * heads), 0);
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let src = h * hd + 2 * i + j;
                let dst = h * hd + j * half + i;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}
