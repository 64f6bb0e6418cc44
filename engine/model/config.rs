//! Model hyper-parameters read from an HF `config.json` (Llama and Qwen2 families).
use crate::error::{Error, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Decoder families the engine implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// Llama / Mistral-style decoder (SmolLM2 included); optional `attention_bias`.
    Llama,
    /// Qwen2: Llama layout with biases on the q, k and v projections.
    Qwen2,
}

/// The hyper-parameters of a decoder, validated for consistency.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on q, k, v (Qwen2 always; Llama when `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama `attention_bias`).
    pub o_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

struct Fields<'a> {
    path: &'a Path,
    obj: &'a serde_json::Map<String, Value>,
}

impl Fields<'_> {
    fn invalid(&self, field: &str, msg: impl Into<String>) -> Error {
        Error::InvalidField { path: self.path.to_path_buf(), field: field.into(), msg: msg.into() }
    }
    fn opt_usize(&self, field: &str) -> Result<Option<usize>> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as usize))
                .ok_or_else(|| self.invalid(field, format!("expected a non-negative integer, got {v}"))),
        }
    }
    fn usize(&self, field: &str) -> Result<usize> {
        let v = self.opt_usize(field)?.ok_or_else(|| Error::MissingField {
            path: self.path.to_path_buf(),
            field: field.into(),
        })?;
        if v == 0 {
            return Err(self.invalid(field, "must be positive"));
        }
        Ok(v)
    }
    fn opt_f32(&self, field: &str) -> Result<Option<f32>> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() && x > 0.0 => Ok(Some(x as f32)),
                _ => Err(self.invalid(field, format!("expected a positive number, got {v}"))),
            },
        }
    }
    fn bool(&self, field: &str, default: bool) -> Result<bool> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.invalid(field, format!("expected true or false, got {v}"))),
        }
    }
    fn token_ids(&self, field: &str) -> Result<Vec<u32>> {
        let bad = || self.invalid(field, "expected a token id or a list of token ids");
        // Ids that do not fit u32 are rejected, not wrapped into the vocabulary.
        let id = |v: &Value| v.as_u64().and_then(|x| u32::try_from(x).ok()).ok_or_else(bad);
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(vec![]),
            Some(Value::Array(a)) => a.iter().map(id).collect(),
            Some(v) => Ok(vec![id(v)?]),
        }
    }
    /// An optional string field; present but not a string is an error.
    fn opt_str(&self, field: &str) -> Result<Option<&str>> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.invalid(field, format!("expected a string, got {v}"))),
        }
    }
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(path, "JSON", e.to_string()))?;
        Self::from_json(&value, path)
    }

    /// Validates a parsed `config.json`; `path` is only used in error messages.
    pub fn from_json(value: &Value, path: &Path) -> Result<Self> {
        let obj = value
            .as_object()
            .ok_or_else(|| Error::format(path, "JSON", "config.json is not an object"))?;
        let f = Fields { path, obj };
        let model_type = f.opt_str("model_type")?.ok_or_else(|| Error::MissingField {
            path: path.to_path_buf(),
            field: "model_type".into(),
        })?;
        let family = match model_type {
            "llama" | "mistral" => Family::Llama,
            "qwen2" => Family::Qwen2,
            other => {
                return Err(f.invalid("model_type", format!("`{other}` is not supported (llama, mistral, qwen2)")))
            }
        };
        if let Some(act) = f.opt_str("hidden_act")? {
            if act != "silu" {
                return Err(f.invalid("hidden_act", format!("`{act}` is not supported (silu)")));
            }
        }
        // transformers 5 nests RoPE settings in `rope_parameters`; 4.x has `rope_theta` and
        // `rope_scaling` at the top level.
        let rope_params = match obj.get("rope_parameters") {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => Some(Fields { path, obj: m }),
            Some(v) => return Err(f.invalid("rope_parameters", format!("expected an object, got {v}"))),
        };
        if let Some(rp) = &rope_params {
            let rope_type = rp.opt_str("rope_type").map_err(|_| f.invalid("rope_parameters.rope_type", "expected a string"))?;
            match rope_type {
                None | Some("default") => {}
                Some(other) => {
                    return Err(f.invalid("rope_parameters.rope_type", format!("`{other}` is not supported; only plain RoPE (default)")))
                }
            }
        }
        if !matches!(obj.get("rope_scaling"), None | Some(Value::Null)) {
            return Err(f.invalid("rope_scaling", "RoPE scaling is not supported; only plain RoPE"));
        }
        let rope_theta = match f.opt_f32("rope_theta")? {
            Some(t) => t,
            None => match &rope_params {
                Some(rp) => rp.opt_f32("rope_theta").map_err(|_| f.invalid("rope_parameters.rope_theta", "expected a positive number"))?.unwrap_or(10000.0),
                None => 10000.0,
            },
        };
        if f.bool("use_sliding_window", false)? {
            return Err(f.invalid("use_sliding_window", "sliding-window attention is not supported"));
        }
        if f.bool("mlp_bias", false)? {
            return Err(f.invalid("mlp_bias", "MLP biases are not supported"));
        }
        let hidden_size = f.usize("hidden_size")?;
        let num_heads = f.usize("num_attention_heads")?;
        let num_kv_heads = f.opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(f.invalid(
                "num_key_value_heads",
                format!("{num_kv_heads} does not divide num_attention_heads = {num_heads}"),
            ));
        }
        let head_dim = match f.opt_usize("head_dim")? {
            Some(d) => d,
            None => {
                if hidden_size % num_heads != 0 {
                    return Err(f.invalid(
                        "num_attention_heads",
                        format!("{num_heads} does not divide hidden_size = {hidden_size}"),
                    ));
                }
                hidden_size / num_heads
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(f.invalid("head_dim", format!("{head_dim} must be positive and even (RoPE pairs)")));
        }
        let attention_bias = f.bool("attention_bias", false)?;
        let cfg = ModelConfig {
            family,
            hidden_size,
            intermediate_size: f.usize("intermediate_size")?,
            num_layers: f.usize("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: f.usize("vocab_size")?,
            rms_norm_eps: f.opt_f32("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            max_position_embeddings: f.opt_usize("max_position_embeddings")?.unwrap_or(4096),
            tie_word_embeddings: f.bool("tie_word_embeddings", false)?,
            qkv_bias: family == Family::Qwen2 || attention_bias,
            o_bias: family == Family::Llama && attention_bias,
            bos_token_id: match f.opt_usize("bos_token_id")? {
                Some(x) => Some(u32::try_from(x).map_err(|_| f.invalid("bos_token_id", format!("token id {x} does not fit in u32")))?),
                None => None,
            },
            eos_token_ids: f.token_ids("eos_token_id")?,
        };
        // Products of the dimensions (projection widths, tensor sizes) must not overflow.
        if num_heads.checked_mul(head_dim).is_none() {
            return Err(f.invalid("head_dim", format!("num_attention_heads ({num_heads}) * head_dim ({head_dim}) overflows")));
        }
        if cfg.checked_num_params().is_none() {
            return Err(f.invalid(
                "hidden_size",
                "the parameter count implied by hidden_size, intermediate_size, vocab_size, num_hidden_layers and the heads overflows",
            ));
        }
        for (field, id) in cfg.bos_token_id.iter().map(|&i| ("bos_token_id", i)).chain(cfg.eos_token_ids.iter().map(|&i| ("eos_token_id", i))) {
            if id as usize >= cfg.vocab_size {
                return Err(f.invalid(field, format!("token id {id} >= vocab_size {}", cfg.vocab_size)));
            }
        }
        Ok(cfg)
    }

    /// Width of the query projection output.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Width of each of the key and value projection outputs.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Parameter count, counting tied embeddings once.
    pub fn num_params(&self) -> usize {
        self.checked_num_params().unwrap_or(usize::MAX)
    }

    /// [`Self::num_params`], `None` on overflow (also bounds every tensor's element count).
    fn checked_num_params(&self) -> Option<usize> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let q = self.num_heads.checked_mul(self.head_dim)?;
        let kv = self.num_kv_heads.checked_mul(self.head_dim)?;
        let mul = |a: usize, b: usize| a.checked_mul(b);
        let mut attn = mul(mul(h, q)?, 2)?.checked_add(mul(mul(h, kv)?, 2)?)?;
        if self.qkv_bias {
            attn = attn.checked_add(q.checked_add(mul(kv, 2)?)?)?;
        }
        if self.o_bias {
            attn = attn.checked_add(h)?;
        }
        let block = attn.checked_add(mul(mul(h, i)?, 3)?)?.checked_add(mul(h, 2)?)?;
        let embed = mul(self.vocab_size, h)?;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed.checked_add(mul(self.num_layers, block)?)?.checked_add(h)?.checked_add(head)
    }
}

/// `dir/config.json`.
pub fn config_path(dir: &Path) -> PathBuf {
    dir.join("config.json")
}
