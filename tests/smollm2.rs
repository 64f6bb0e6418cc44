//! The engine's import of the real SmolLM2-135M-Instruct GGUF against transformers' own GGUF
//! loading (fixtures from scripts/fixtures/smollm2_reference.py). Runs when the GGUF has been
//! fetched by scripts/fetch-smollm2.sh; prints a skip line otherwise.
mod common;
use common::{fixture, rel_err, repo, skip};
use ilrec::model::generate::GenerateOptions;
use ilrec::weights::{ChatMessage, SafetensorsSet, TextTokenizer};
use ilrec::{Batch, ForwardOptions, Model};
use std::path::PathBuf;
use std::sync::OnceLock;

const GGUF: &str = "weights/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The imported model directory: imported once per test run into a temporary directory, so the
/// test checks this build's importer rather than whatever an earlier build left in weights/.
fn model_dir() -> Option<PathBuf> {
    static DIR: OnceLock<Option<(tempfile::TempDir, PathBuf)>> = OnceLock::new();
    DIR.get_or_init(|| {
        let gguf = repo().join(GGUF);
        if !gguf.exists() {
            return None;
        }
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("smollm2");
        ilrec::weights::gguf::import_gguf(&gguf, &out).unwrap();
        Some((tmp, out))
    })
    .as_ref()
    .map(|(_, p)| p.clone())
}

fn model() -> Option<&'static Model> {
    static M: OnceLock<Option<Model>> = OnceLock::new();
    M.get_or_init(|| model_dir().map(|d| Model::load(&d).unwrap())).as_ref()
}

fn reference() -> SafetensorsSet {
    SafetensorsSet::open_files(&[fixture("smollm2/logits.safetensors")]).unwrap()
}

fn ids(st: &SafetensorsSet, name: &str) -> Vec<u32> {
    st.get_i64(name).unwrap().1.into_iter().map(|x| x as u32).collect()
}

fn f32s(st: &SafetensorsSet, name: &str) -> Vec<f32> {
    st.get_f32(name, &st.shape(name).unwrap()).unwrap()
}

#[test]
fn prompt_logits_match_transformers() {
    let Some(model) = model() else {
        return skip("prompt_logits_match_transformers", &format!("{GGUF} absent (run scripts/fetch-smollm2.sh)"));
    };
    let r = reference();
    let v = model.config.vocab_size;
    for k in 0..3 {
        let prompt = ids(&r, &format!("prompt{k}_ids"));
        let out = model.forward(&Batch::single(&prompt), &ForwardOptions::default()).unwrap();
        let logits = out.logits.unwrap().into_f32_vec();
        let n = prompt.len();
        let last = &logits[(n - 1) * v..n * v];
        let e = rel_err(last, &f32s(&r, &format!("prompt{k}_last_logits")), |_| true);
        println!("prompt {k}: last-position logits rel err {e:.2e}");
        assert!(e <= 1e-4, "prompt {k}: last-position logits rel err {e:.3e}");
        // Every position: the reference's top-20 tokens and their logits.
        let top_ids = ids(&r, &format!("prompt{k}_top20_ids"));
        let top_logits = f32s(&r, &format!("prompt{k}_top20_logits"));
        let ours: Vec<f32> = top_ids.iter().enumerate().map(|(j, &id)| logits[(j / 20) * v + id as usize]).collect();
        let e = rel_err(&ours, &top_logits, |_| true);
        println!("prompt {k}: top-20 logits at every position rel err {e:.2e}");
        assert!(e <= 1e-4, "prompt {k}: top-20 logits rel err {e:.3e}");
    }
}

#[test]
fn chat_greedy_continuation_matches_transformers() {
    let (Some(model), Some(dir)) = (model(), model_dir()) else {
        return skip("chat_greedy_continuation_matches_transformers", &format!("{GGUF} absent (run scripts/fetch-smollm2.sh)"));
    };
    let r = reference();
    let tok = TextTokenizer::load(&dir).unwrap();
    let msg = ChatMessage { role: "user".into(), content: "What is the capital of France?".into() };
    let text = tok.apply_chat_template(&[msg], true).unwrap();
    let prompt = tok.encode(&text).unwrap();
    assert_eq!(prompt, ids(&r, "chat_prompt_ids"), "chat template + tokenizer differ from transformers'");
    let want = ids(&r, "chat_greedy_ids");
    let opts = GenerateOptions { max_new_tokens: 24, stop_tokens: vec![tok.eos_id().unwrap()], ..Default::default() };
    let got = model.generate(&prompt, &opts, |_| {}).unwrap();
    assert_eq!(got, want, "greedy continuation differs: ours {:?}", tok.decode(&got, true));
    assert_eq!(tok.decode(&got, false).unwrap(), "The capital of France is Paris.");
}
