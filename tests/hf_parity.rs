//! The CPU engine against HF transformers on tiny random Llama and Qwen2 models
//! (fixtures written by scripts/fixtures/hf_fixtures.py).
mod common;
use common::{fixture, rel_err};
use ilrec::model::generate::GenerateOptions;
use ilrec::{Batch, ForwardOptions, LogitsMode, Model, ProbeSpec};
use ilrec::weights::SafetensorsSet;

const TOL: f64 = 1e-4;

struct Reference {
    st: SafetensorsSet,
    json: serde_json::Value,
}

impl Reference {
    fn open(model: &str) -> Self {
        let dir = fixture(model);
        let st = SafetensorsSet::open_files(&[dir.join("reference.safetensors")]).unwrap();
        let json = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
        Reference { st, json }
    }
    fn f32(&self, name: &str) -> Vec<f32> {
        let shape = self.st.shape(name).unwrap_or_else(|| panic!("fixture tensor {name} missing"));
        self.st.get_f32(name, &shape).unwrap()
    }
    fn ids(&self, name: &str) -> Vec<u32> {
        self.st.get_i64(name).unwrap().1.into_iter().map(|x| x as u32).collect()
    }
    fn probe_blocks(&self) -> Vec<usize> {
        self.json["probe"]["blocks"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect()
    }
}

fn check_model(model_name: &str) {
    let model = Model::load(&fixture(model_name)).unwrap();
    let r = Reference::open(model_name);
    let n_blocks = model.config.num_layers;
    let probe_blocks = r.probe_blocks();
    let subset = r.ids("probe_subset");
    for layout in ["right", "left"] {
        let tokens = r.ids(&format!("input_ids_{layout}"));
        let mask: Vec<bool> = r.ids(&format!("attention_mask_{layout}")).iter().map(|&m| m == 1).collect();
        let (b, t) = (3, tokens.len() / 3);
        let batch = Batch::new(tokens, mask.clone(), b, t).unwrap();
        let opts = ForwardOptions {
            logits: LogitsMode::All,
            taps: (1..=n_blocks).collect(),
            probe: Some(ProbeSpec { layers: probe_blocks.clone(), tokens: Some(subset.clone()) }),
        };
        let out = model.forward(&batch, &opts).unwrap();
        let mask = &mask;
        let real = |width: usize| move |i: usize| mask[i / width];
        let logits = out.logits.unwrap().into_f32_vec();
        let v = model.config.vocab_size;
        let e = rel_err(&logits, &r.f32(&format!("logits_{layout}")), real(v));
        println!("{model_name} {layout}: logits rel err {e:.2e}");
        assert!(e <= TOL, "{model_name} {layout}: logits rel err {e:.3e}");
        for (l, hidden) in &out.hidden {
            let e = rel_err(hidden.as_f32().unwrap(), &r.f32(&format!("hidden_{layout}_{l}")), real(model.config.hidden_size));
            println!("{model_name} {layout}: block {l} hidden rel err {e:.2e}");
            assert!(e <= TOL, "{model_name} {layout}: block {l} hidden rel err {e:.3e}");
        }
        assert_eq!(out.probe.len(), probe_blocks.len());
        for (l, probe) in &out.probe {
            let e = rel_err(probe.as_f32().unwrap(), &r.f32(&format!("probe_{layout}_{l}")), real(subset.len()));
            println!("{model_name} {layout}: block {l} probe rel err {e:.2e}");
            assert!(e <= TOL, "{model_name} {layout}: block {l} probe rel err {e:.3e}");
        }
    }
    let prompt = r.ids("greedy_prompt_ids");
    let want = r.ids("greedy_ids");
    let opts = GenerateOptions { max_new_tokens: want.len(), ..Default::default() };
    let got = model.generate(&prompt, &opts, |_| {}).unwrap();
    assert_eq!(got, want, "{model_name}: greedy continuation differs from transformers'");
}

#[test]
fn tiny_llama_matches_transformers() {
    check_model("tiny-llama");
}

#[test]
fn tiny_qwen2_sharded_matches_transformers() {
    check_model("tiny-qwen2");
}

/// Feeding a padded batch in chunks through the KV cache gives the full forward's outputs.
#[test]
fn kv_cache_chunks_match_full_forward() {
    for model_name in ["tiny-llama", "tiny-qwen2"] {
        let model = Model::load(&fixture(model_name)).unwrap();
        let r = Reference::open(model_name);
        let tokens = r.ids("input_ids_left");
        let mask: Vec<bool> = r.ids("attention_mask_left").iter().map(|&m| m == 1).collect();
        let (b, t) = (3, tokens.len() / 3);
        let full = model
            .forward(&Batch::new(tokens.clone(), mask.clone(), b, t).unwrap(), &ForwardOptions::default())
            .unwrap()
            .logits
            .unwrap()
            .into_f32_vec();
        let v = model.config.vocab_size;
        let mut cache = model.new_cache(b, 2); // deliberately small: exercises growth
        let mut start = 0;
        for len in [4, 1, 3, 2, 1] {
            let cols = start..start + len;
            let pick = |x: &[u32]| (0..b).flat_map(|s| cols.clone().map(move |c| s * t + c)).map(|i| x[i]).collect::<Vec<_>>();
            let mask_chunk: Vec<bool> = (0..b).flat_map(|s| cols.clone().map(move |c| s * t + c)).map(|i| mask[i]).collect();
            let chunk = Batch::new(pick(&tokens), mask_chunk.clone(), b, len).unwrap();
            let out = model.forward_cached(&chunk, &mut cache, &ForwardOptions::default()).unwrap();
            let got = out.logits.unwrap().into_f32_vec();
            for s in 0..b {
                for (j, c) in cols.clone().enumerate() {
                    if !mask[s * t + c] {
                        continue;
                    }
                    let a = &got[(s * len + j) * v..(s * len + j + 1) * v];
                    let w = &full[(s * t + c) * v..(s * t + c + 1) * v];
                    let e = rel_err(a, w, |_| true);
                    assert!(e < 1e-5, "{model_name}: seq {s} col {c}: cached vs full rel err {e:.2e}");
                }
            }
            start += len;
        }
        assert_eq!(start, t);
        assert_eq!(cache.len(), t);
    }
}
