//! LoRA adapters on the seven projections of each block, in PEFT's layout and file format.
//!
//! A target linear computes `y = x W^T + b + s (drop(x) A^T) B^T` with `A: [r, in]`,
//! `B: [out, r]` and `s = alpha / r` (PEFT's default scaling; rsLoRA and DoRA are rejected).
use crate::error::{Error, Result};
use crate::model::{Block, Linear, Model};
use crate::rng::Rng;
use crate::weights::SafetensorsSet;
use serde_json::{json, Value};
use std::path::Path;

/// The projections LoRA can adapt, in PEFT's module names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [Target::Q, Target::K, Target::V, Target::O, Target::Gate, Target::Up, Target::Down];

    /// PEFT's module name (`q_proj`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// Path of the module inside a block (`self_attn.q_proj`, `mlp.up_proj`).
    pub fn path(self) -> String {
        match self {
            Target::Q | Target::K | Target::V | Target::O => format!("self_attn.{}", self.name()),
            _ => format!("mlp.{}", self.name()),
        }
    }

    pub fn from_name(s: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == s)
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// The base linear this target adapts, mutably (merging).
    pub fn linear_mut(self, b: &mut Block) -> &mut Linear {
        match self {
            Target::Q => &mut b.q,
            Target::K => &mut b.k,
            Target::V => &mut b.v,
            Target::O => &mut b.o,
            Target::Gate => &mut b.gate,
            Target::Up => &mut b.up,
            Target::Down => &mut b.down,
        }
    }

    /// The base linear this target adapts.
    pub fn linear(self, b: &Block) -> &Linear {
        match self {
            Target::Q => &b.q,
            Target::K => &b.k,
            Target::V => &b.v,
            Target::O => &b.o,
            Target::Gate => &b.gate,
            Target::Up => &b.up,
            Target::Down => &b.down,
        }
    }
}

/// LoRA hyper-parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f32,
    pub dropout: f32,
    pub targets: Vec<Target>,
}

impl Default for LoraConfig {
    /// The authors' recipe (ILREC.md section 8): r 64, alpha 32, dropout 0.05, all projections.
    fn default() -> Self {
        LoraConfig { rank: 64, alpha: 32.0, dropout: 0.05, targets: Target::ALL.to_vec() }
    }
}

impl LoraConfig {
    /// `alpha / rank`.
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }

    fn validate(&self) -> Result<()> {
        if self.rank == 0 || !(self.alpha.is_finite()) || !(0.0..1.0).contains(&self.dropout) || self.targets.is_empty() {
            return Err(Error::Input(format!(
                "LoRA config: need rank > 0, finite alpha, dropout in [0, 1) and at least one target; got {self:?}"
            )));
        }
        Ok(())
    }
}

/// The low-rank pair of one adapted linear.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraPair {
    /// `[rank, in_dim]`.
    pub a: Vec<f32>,
    /// `[out_dim, rank]`.
    pub b: Vec<f32>,
    pub in_dim: usize,
    pub out_dim: usize,
}

/// LoRA adapters for every block: `blocks[l][target.index()]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Lora {
    pub config: LoraConfig,
    pub blocks: Vec<[Option<LoraPair>; 7]>,
}

fn peft_name(block: usize, t: Target, ab: char) -> String {
    format!("base_model.model.model.layers.{block}.{}.lora_{ab}.weight", t.path())
}

impl Lora {
    /// Fresh adapters as PEFT initialises them: `A ~ U(-1/sqrt(in), 1/sqrt(in))` (kaiming-uniform
    /// with a = sqrt(5)), `B = 0`, so the adapted model starts equal to the base model.
    pub fn new(model: &Model, config: LoraConfig, rng: &mut Rng) -> Result<Self> {
        config.validate()?;
        let r = config.rank;
        let blocks = model
            .blocks
            .iter()
            .map(|b| {
                let mut slots: [Option<LoraPair>; 7] = Default::default();
                for &t in &config.targets {
                    let lin = t.linear(b);
                    let bound = 1.0 / (lin.in_dim as f32).sqrt();
                    let a = (0..r * lin.in_dim).map(|_| (rng.next_f32() * 2.0 - 1.0) * bound).collect();
                    slots[t.index()] = Some(LoraPair { a, b: vec![0.0; lin.out_dim * r], in_dim: lin.in_dim, out_dim: lin.out_dim });
                }
                slots
            })
            .collect();
        Ok(Lora { config, blocks })
    }

    /// Every tensor with its PEFT name and shape, in a fixed order.
    pub fn named(&self) -> Vec<(String, Vec<usize>, &[f32])> {
        let r = self.config.rank;
        let mut out = Vec::new();
        for (l, slots) in self.blocks.iter().enumerate() {
            for t in Target::ALL {
                if let Some(p) = &slots[t.index()] {
                    out.push((peft_name(l, t, 'A'), vec![r, p.in_dim], p.a.as_slice()));
                    out.push((peft_name(l, t, 'B'), vec![p.out_dim, r], p.b.as_slice()));
                }
            }
        }
        out
    }

    /// Mutable views of every tensor, in the order of [`Lora::named`].
    pub fn named_mut(&mut self) -> Vec<(String, &mut Vec<f32>)> {
        let mut out = Vec::new();
        for (l, slots) in self.blocks.iter_mut().enumerate() {
            for (t, slot) in Target::ALL.into_iter().zip(slots.iter_mut()) {
                if let Some(p) = slot {
                    out.push((peft_name(l, t, 'A'), &mut p.a));
                    out.push((peft_name(l, t, 'B'), &mut p.b));
                }
            }
        }
        out
    }

    /// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors` in PEFT's format
    /// (each file atomically).
    pub fn save_peft(&self, dir: &Path, base_model: &str) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let c = &self.config;
        let mut targets: Vec<&str> = c.targets.iter().map(|t| t.name()).collect();
        targets.sort_unstable();
        let cfg = json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": c.rank,
            "lora_alpha": c.alpha,
            "lora_dropout": c.dropout,
            "target_modules": targets,
            "bias": "none",
            "fan_in_fan_out": false,
            "use_rslora": false,
            "use_dora": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": null,
            "layers_to_transform": null,
            "rank_pattern": {},
            "alpha_pattern": {}
        });
        let text = serde_json::to_string_pretty(&cfg).map_err(|e| Error::Input(e.to_string()))?;
        crate::train::checkpoint::atomic_write(&dir.join("adapter_config.json"), text.as_bytes())?;
        let named = self.named();
        let bytes = crate::weights::safetensors::serialize_f32(named.iter().map(|(n, s, d)| (n.as_str(), s.as_slice(), *d)))?;
        crate::train::checkpoint::atomic_write(&dir.join("adapter_model.safetensors"), &bytes)
    }

    /// Reads a PEFT LoRA adapter for `model`, checking the config and every tensor's shape.
    pub fn load_peft(dir: &Path, model: &Model) -> Result<Self> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::format(&cfg_path, "JSON", e.to_string()))?;
        let invalid = |field: &str, msg: String| Error::InvalidField { path: cfg_path.clone(), field: field.into(), msg };
        let missing = |field: &str| Error::MissingField { path: cfg_path.clone(), field: field.into() };
        match v.get("peft_type").and_then(Value::as_str) {
            Some("LORA") => {}
            Some(o) => return Err(invalid("peft_type", format!("`{o}` is not LORA"))),
            None => return Err(missing("peft_type")),
        }
        for flag in ["use_rslora", "use_dora", "fan_in_fan_out"] {
            if v.get(flag).and_then(Value::as_bool) == Some(true) {
                return Err(invalid(flag, "is not supported".into()));
            }
        }
        if let Some(b) = v.get("bias").and_then(Value::as_str) {
            if b != "none" {
                return Err(invalid("bias", format!("`{b}` is not supported (none)")));
            }
        }
        for field in ["rank_pattern", "alpha_pattern"] {
            if v.get(field).and_then(Value::as_object).is_some_and(|m| !m.is_empty()) {
                return Err(invalid(field, "per-module ranks or alphas are not supported".into()));
            }
        }
        for field in ["layers_to_transform", "modules_to_save"] {
            if !matches!(v.get(field), None | Some(Value::Null)) {
                return Err(invalid(field, "is not supported".into()));
            }
        }
        let rank = v.get("r").and_then(Value::as_u64).filter(|&r| r > 0).ok_or_else(|| invalid("r", "expected a positive integer".into()))? as usize;
        let alpha = v.get("lora_alpha").and_then(Value::as_f64).ok_or_else(|| missing("lora_alpha"))? as f32;
        let dropout = v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0) as f32;
        let targets = match v.get("target_modules") {
            Some(Value::String(s)) if s == "all-linear" => Target::ALL.to_vec(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|t| t.as_str().and_then(Target::from_name).ok_or_else(|| invalid("target_modules", format!("{t} is not one of q,k,v,o,gate,up,down _proj"))))
                .collect::<Result<Vec<_>>>()?,
            Some(o) => return Err(invalid("target_modules", format!("unsupported value {o}"))),
            None => return Err(missing("target_modules")),
        };
        let config = LoraConfig { rank, alpha, dropout, targets };
        config.validate().map_err(|e| invalid("lora_dropout", e.to_string()))?;
        let st = SafetensorsSet::open_files(&[dir.join("adapter_model.safetensors")])?;
        let mut blocks = Vec::with_capacity(model.blocks.len());
        for (l, b) in model.blocks.iter().enumerate() {
            let mut slots: [Option<LoraPair>; 7] = Default::default();
            for &t in &config.targets {
                let lin = t.linear(b);
                let a = st.get_f32(&peft_name(l, t, 'A'), &[rank, lin.in_dim])?;
                let bm = st.get_f32(&peft_name(l, t, 'B'), &[lin.out_dim, rank])?;
                slots[t.index()] = Some(LoraPair { a, b: bm, in_dim: lin.in_dim, out_dim: lin.out_dim });
            }
            blocks.push(slots);
        }
        let known: std::collections::HashSet<String> = Lora { config: config.clone(), blocks: blocks.clone() }.named().into_iter().map(|(n, _, _)| n).collect();
        if let Some(extra) = st.names().into_iter().find(|n| !known.contains(*n)) {
            return Err(Error::InvalidField {
                path: dir.join("adapter_model.safetensors"),
                field: extra.to_string(),
                msg: "tensor does not belong to the configured adapter (wrong model, targets or layer count)".into(),
            });
        }
        Ok(Lora { config, blocks })
    }
}

impl Lora {
    /// Folds the adapters into the model's weights (`W += s B A`), for inference and
    /// evaluation with the plain forward.
    pub fn merge_into(&self, model: &mut Model) -> Result<()> {
        if self.blocks.len() != model.blocks.len() {
            return Err(Error::Input(format!("adapter has {} blocks, the model {}", self.blocks.len(), model.blocks.len())));
        }
        let (r, s) = (self.config.rank, self.config.scale());
        for (slots, blk) in self.blocks.iter().zip(model.blocks.iter_mut()) {
            for t in Target::ALL {
                let Some(p) = &slots[t.index()] else { continue };
                let lin = t.linear_mut(blk);
                if lin.in_dim != p.in_dim || lin.out_dim != p.out_dim {
                    return Err(Error::Input(format!("adapter for {} is {}x{}, the layer {}x{}", t.name(), p.out_dim, p.in_dim, lin.out_dim, lin.in_dim)));
                }
                let sb: Vec<f32> = p.b.iter().map(|v| v * s).collect();
                crate::backend::cpu::matmul_nn(&mut lin.w, lin.in_dim, &sb, r, &p.a, lin.in_dim, lin.out_dim, lin.in_dim, r, true);
            }
        }
        Ok(())
    }
}
