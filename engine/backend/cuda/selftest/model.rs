//! End-to-end checks (`ilrec selftest --full`): tiny random models (a Llama with GQA and a Qwen2
//! with q/k/v biases and an untied head, odd sizes) run forward on the GPU and on the CPU
//! backend, compared on logits, block taps, probe logits and cached decoding; and one LoRA
//! training micro-batch (SFT and ILRec) compared on the loss and every gradient.
//! With f32 weights the tolerance is the f32 one; with bf16 weights the CPU runs the same
//! bf16-rounded weights and the tolerance is the bf16 one (the GPU also rounds GEMM inputs).
use super::{Checker, TOL_BF16, TOL_BF16_MODEL, TOL_F32};
use crate::backend::cuda::model::CudaModel;
use crate::backend::cuda::train::forward_backward as cuda_forward_backward;
use crate::train::backprop::{forward_backward, Objective, TrainBatch};
use crate::train::lora::{Lora, LoraConfig, Target};
use crate::train::loss::IlrecParams;
use crate::backend::cuda::Elem;
use crate::error::Result;
use crate::model::{Batch, Block, ForwardOptions, Linear, LogitsMode, Model, ModelConfig, ProbeSpec};
use crate::rng::Rng;
use std::path::Path;
use std::time::Instant;

/// A random model of `config.json` text `json`; weights ~ N(0, 0.02^2)·fan-in scaling so
/// activations stay O(1) through the blocks, norms near 1.
pub(super) fn random_model(json: &str, seed: u64) -> Result<Model> {
    let value: serde_json::Value = serde_json::from_str(json).map_err(|e| crate::Error::Input(format!("selftest model config: {e}")))?;
    let config = ModelConfig::from_json(&value, Path::new("<selftest>"))?;
    let mut rng = Rng::new(seed);
    let c = &config;
    let mut mat = |rows: usize, cols: usize| -> Vec<f32> {
        let s = 1.0 / (cols as f32).sqrt();
        (0..rows * cols).map(|_| rng.normal() * s).collect()
    };
    let mut lin = |out_dim: usize, in_dim: usize, bias: bool, rng2: &mut Rng| Linear {
        w: mat(out_dim, in_dim),
        b: bias.then(|| (0..out_dim).map(|_| rng2.normal() * 0.1).collect()),
        out_dim,
        in_dim,
    };
    let mut rng2 = Rng::new(seed ^ 0x9e37);
    let norm = |rng2: &mut Rng, h: usize| -> Vec<f32> { (0..h).map(|_| 1.0 + 0.1 * rng2.normal()).collect() };
    let (h, i, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let mut blocks = Vec::new();
    for _ in 0..c.num_layers {
        blocks.push(Block {
            input_norm: norm(&mut rng2, h),
            q: lin(c.q_dim(), h, c.qkv_bias, &mut rng2),
            k: lin(c.kv_dim(), h, c.qkv_bias, &mut rng2),
            v: lin(c.kv_dim(), h, c.qkv_bias, &mut rng2),
            o: lin(h, c.q_dim(), c.o_bias, &mut rng2),
            post_norm: norm(&mut rng2, h),
            gate: lin(i, h, false, &mut rng2),
            up: lin(i, h, false, &mut rng2),
            down: lin(h, i, false, &mut rng2),
        });
    }
    let embed = (0..v * h).map(|_| rng2.normal()).collect();
    let lm_head = (!c.tie_word_embeddings).then(|| lin(v, h, false, &mut rng2));
    let final_norm = norm(&mut rng2, h);
    Ok(Model { config, embed, blocks, norm: final_norm, lm_head })
}

pub(super) const LLAMA: &str = r#"{"model_type": "llama", "hidden_size": 96, "intermediate_size": 200, "num_hidden_layers": 3,
  "num_attention_heads": 6, "num_key_value_heads": 2, "vocab_size": 301, "rms_norm_eps": 1e-5,
  "rope_theta": 10000.0, "max_position_embeddings": 256, "tie_word_embeddings": true}"#;
const QWEN2: &str = r#"{"model_type": "qwen2", "hidden_size": 80, "intermediate_size": 136, "num_hidden_layers": 2,
  "num_attention_heads": 5, "num_key_value_heads": 1, "vocab_size": 257, "rms_norm_eps": 1e-6,
  "rope_theta": 1000000.0, "max_position_embeddings": 256, "tie_word_embeddings": false}"#;
/// Head dim 64: with bf16 weights the model runs attention on the flash kernels (the two above,
/// head dim 16, stay on the plain ones), so this checks that wiring end to end.
const LLAMA_D64: &str = r#"{"model_type": "llama", "hidden_size": 192, "intermediate_size": 136, "num_hidden_layers": 2,
  "num_attention_heads": 3, "num_key_value_heads": 1, "vocab_size": 263, "rms_norm_eps": 1e-5,
  "rope_theta": 10000.0, "max_position_embeddings": 256, "tie_word_embeddings": true}"#;

/// Every weight rounded to bf16 (the CPU reference of a bf16 upload).
fn rounded(model: &Model) -> Model {
    let r = |v: &mut Vec<f32>| *v = super::round_bf16(v);
    let mut m = model.clone();
    r(&mut m.embed);
    for b in &mut m.blocks {
        for l in [&mut b.q, &mut b.k, &mut b.v, &mut b.o, &mut b.gate, &mut b.up, &mut b.down] {
            r(&mut l.w);
        }
    }
    if let Some(l) = &mut m.lm_head {
        r(&mut l.w);
    }
    m
}

fn tensor_vec(t: &Option<crate::Tensor>) -> Vec<f32> {
    t.as_ref().map(|t| t.to_f32_vec()).unwrap_or_default()
}

pub(super) fn check(c: &mut Checker) -> Result<()> {
    forward(c)?;
    training(c)
}

/// One training micro-batch (LoRA on every projection with random B so every gradient is
/// non-zero, trainable token rows, dropout on) under SFT and ILRec, on the GPU and the CPU:
/// the loss and every gradient tensor compared.
fn training(c: &mut Checker) -> Result<()> {
    for (name, json) in [("llama", LLAMA), ("qwen2", QWEN2), ("llama-d64", LLAMA_D64)] {
        let model = random_model(json, 23)?;
        let vocab = model.config.vocab_size;
        let layers = model.config.num_layers;
        let mut rng = Rng::new(3);
        let config = LoraConfig { rank: 4, alpha: 8.0, dropout: 0.1, targets: Target::ALL.to_vec() };
        let mut lora = Lora::new(&model, config, &mut rng)?;
        for (_, t) in lora.named_mut() {
            t.iter_mut().for_each(|x| *x = rng.normal() * 0.05);
        }
        let seqs: Vec<Vec<u32>> = [19usize, 12].iter().map(|&len| (0..len).map(|_| rng.below(vocab) as u32).collect()).collect();
        let batch = Batch::right_padded(&seqs, 0)?;
        // Loss rows: the last 5 real positions of each sequence, predicting the next token.
        let mut positions = Vec::new();
        let mut targets = Vec::new();
        for (b, s) in seqs.iter().enumerate() {
            for i in s.len() - 6..s.len() - 1 {
                positions.push(b * batch.seq + i);
                targets.push(s[i + 1]);
            }
        }
        let m = positions.len();
        let candidates: Vec<u32> = (0..vocab as u32).step_by(5).collect();
        let item_mask: Vec<bool> = (0..m).map(|i| i % 3 != 0).collect();
        // ILRec needs an item row's target among the candidates (the CPU reference rejects it
        // otherwise): those rows predict a random candidate instead of the next token.
        for (t, _) in targets.iter_mut().zip(&item_mask).filter(|(_, &item)| item) {
            *t = candidates[rng.below(candidates.len())];
        }
        let rewards: Vec<f32> = (0..m * candidates.len()).map(|_| rng.next_f32()).collect();
        let tb = TrainBatch { batch, positions, targets, item_mask, rewards: Some(rewards) };
        let trainable: Vec<u32> = vec![1, 5, 7, (vocab - 1) as u32, seqs[0][3]];
        let objectives = [
            ("SFT", Objective::Sft),
            ("ILRec", Objective::Ilrec { params: IlrecParams::default(), layers: vec![1, layers], candidates }),
        ];
        for (elem, tol) in [(Elem::F32, TOL_F32), (Elem::BF16, TOL_BF16_MODEL)] {
            let reference = if elem == Elem::BF16 { rounded(&model) } else { model.clone() };
            let dm = CudaModel::upload(c.cuda, &model, elem)?;
            for (oname, obj) in &objectives {
                let tag = format!("{name} {oname}, {elem:?} weights");
                let shape = format!("batch 2x19 (padded), {m} loss rows, LoRA r4 all targets, dropout 0.1, {} trainable tokens", trainable.len());
                let (ws, wg) = forward_backward(&reference, &lora, &tb, obj, &trainable, m as f64, true, &mut Rng::new(9))?;
                let start = Instant::now();
                let (gs, gg) = cuda_forward_backward(&dm, &reference, &lora, &tb, obj, &trainable, m as f64, true, &mut Rng::new(9))?;
                let ms = start.elapsed().as_secs_f64() * 1e3;
                c.record(&format!("train loss ({tag})"), shape.clone(), &[gs.loss as f32], &[ws.loss as f32], tol, ms);
                // One row per tensor: a wrong small tensor must not hide behind a large one.
                for ((tname, _, g), (_, _, w)) in gg.lora.named().into_iter().zip(wg.lora.named()) {
                    c.record(&format!("train grad {tname} ({tag})"), shape.clone(), g, w, tol, 0.0);
                }
                c.record(&format!("train embedding-row grads ({tag})"), shape.clone(), &gg.embed_rows, &wg.embed_rows, tol, 0.0);
                if !wg.head_rows.is_empty() {
                    c.record(&format!("train head-row grads ({tag})"), shape, &gg.head_rows, &wg.head_rows, tol, 0.0);
                }
            }
        }
    }
    Ok(())
}

/// Forward outputs and cached decoding against the CPU.
fn forward(c: &mut Checker) -> Result<()> {
    for (name, json) in [("llama", LLAMA), ("qwen2", QWEN2), ("llama-d64", LLAMA_D64)] {
        let model = random_model(json, 11)?;
        let vocab = model.config.vocab_size as u32;
        let layers = model.config.num_layers;
        // Three sequences, right-padded to 23 tokens (lengths 23, 17, 9).
        let mut rng = Rng::new(5);
        let seqs: Vec<Vec<u32>> = [23usize, 17, 9].iter().map(|&len| (0..len).map(|_| rng.below(vocab as usize) as u32).collect()).collect();
        let batch = Batch::right_padded(&seqs, 0)?;
        let probe_ids: Vec<u32> = (0..vocab).step_by(7).collect();
        let opts = ForwardOptions {
            logits: LogitsMode::All,
            taps: vec![1, layers],
            probe: Some(ProbeSpec { layers: vec![1], tokens: Some(probe_ids) }),
        };
        for (elem, tol) in [(Elem::F32, TOL_F32), (Elem::BF16, TOL_BF16)] {
            let reference = if elem == Elem::BF16 { rounded(&model) } else { model.clone() };
            let want = reference.forward(&batch, &opts)?;
            let dm = CudaModel::upload(c.cuda, &model, elem)?;
            let start = Instant::now();
            let got = dm.forward(&batch, &opts)?;
            let ms = start.elapsed().as_secs_f64() * 1e3;
            let tag = format!("{name} {:?} weights", elem);
            let shape = format!("batch 3x23 (padded), {layers} blocks, {tag}");
            c.record(&format!("model forward logits ({tag})"), shape.clone(), &tensor_vec(&got.logits), &tensor_vec(&want.logits), tol, ms);
            for ((l, g), (_, w)) in got.hidden.iter().zip(&want.hidden) {
                c.record(&format!("model forward tap block {l} ({tag})"), shape.clone(), &g.to_f32_vec(), &w.to_f32_vec(), tol, 0.0);
            }
            for ((l, g), (_, w)) in got.probe.iter().zip(&want.probe) {
                c.record(&format!("model probe block {l} ({tag})"), shape.clone(), &g.to_f32_vec(), &w.to_f32_vec(), tol, 0.0);
            }
            if got.hidden.len() != want.hidden.len() || got.probe.len() != want.probe.len() {
                c.record(&format!("model forward outputs ({tag})"), shape.clone(), &[], &[1.0], tol, 0.0);
            }

            // Decoding: left-padded prompts, prefill then one token at a time through the device
            // KV cache, against the same steps through the CPU's cache (last-token logits).
            let prompts: Vec<Vec<u32>> = seqs.iter().map(|s| s[..s.len().min(6)].to_vec()).collect();
            let prompt_batch = Batch::left_padded(&prompts, 0)?;
            let last = ForwardOptions { logits: LogitsMode::Last, ..Default::default() };
            let mut cache = dm.new_cache(3, prompt_batch.seq + 4)?;
            let mut cpu_cache = reference.new_cache(3, prompt_batch.seq + 4);
            let start = Instant::now();
            let mut g = tensor_vec(&dm.forward_cached(&prompt_batch, &mut cache, &last)?.logits);
            let mut w = tensor_vec(&reference.forward_cached(&prompt_batch, &mut cpu_cache, &last)?.logits);
            for step in 0..4u32 {
                let next: Vec<u32> = (0..3).map(|b| (step * 31 + b * 17 + 3) % vocab).collect();
                let step_batch = Batch::new(next, vec![true; 3], 3, 1)?;
                g.extend(tensor_vec(&dm.forward_cached(&step_batch, &mut cache, &last)?.logits));
                w.extend(tensor_vec(&reference.forward_cached(&step_batch, &mut cpu_cache, &last)?.logits));
            }
            let ms = start.elapsed().as_secs_f64() * 1e3;
            c.record(&format!("model cached decoding ({tag})"), format!("3 prompts left-padded to {}, +4 steps", prompt_batch.seq), &g, &w, tol, ms);
        }
    }
    Ok(())
}
