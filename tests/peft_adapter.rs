//! PEFT adapter files: the engine reads PEFT's own adapters, its forward with the adapter
//! matches PEFT's logits, and what it writes has PEFT's names and config; when the reference
//! venv exists, PEFT itself loads the engine-written adapter and reproduces the logits.
mod common;
use common::{fixture, rel_err, repo, skip};
use ilrec::train::lora::Lora;
use ilrec::weights::SafetensorsSet;
use ilrec::{Batch, ForwardOptions, Model};

fn peft_logits(name: &str) -> (Batch, Vec<f32>, Vec<bool>) {
    let st = SafetensorsSet::open_files(&[fixture(&format!("lora/{name}-sft.safetensors"))]).unwrap();
    let ids: Vec<u32> = st.get_i64("input_ids").unwrap().1.iter().map(|&x| x as u32).collect();
    let mask: Vec<bool> = st.get_i64("attention_mask").unwrap().1.iter().map(|&x| x == 1).collect();
    let shape = st.shape("logits").unwrap();
    let logits = st.get_f32("logits", &shape).unwrap();
    (Batch::new(ids, mask.clone(), shape[0], shape[1]).unwrap(), logits, mask)
}

#[test]
fn merged_adapter_matches_peft_logits() {
    for name in ["tiny-llama", "tiny-qwen2"] {
        let mut model = Model::load(&fixture(name)).unwrap();
        let lora = Lora::load_peft(&fixture(&format!("lora/{name}-adapter")), &model).unwrap();
        lora.merge_into(&mut model).unwrap();
        let (batch, want, mask) = peft_logits(name);
        let got = model.forward(&batch, &ForwardOptions::default()).unwrap().logits.unwrap().into_f32_vec();
        let v = model.config.vocab_size;
        let e = rel_err(&got, &want, |i| mask[i / v]);
        assert!(e <= 1e-4, "{name}: merged LoRA logits vs PEFT rel err {e:.2e}");
    }
}

#[test]
fn written_adapter_has_pefts_layout_and_round_trips() {
    for name in ["tiny-llama", "tiny-qwen2"] {
        let model = Model::load(&fixture(name)).unwrap();
        let peft_dir = fixture(&format!("lora/{name}-adapter"));
        let lora = Lora::load_peft(&peft_dir, &model).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        lora.save_peft(tmp.path(), &format!("tests/fixtures/{name}")).unwrap();
        assert_eq!(Lora::load_peft(tmp.path(), &model).unwrap(), lora, "{name}: save/load changed the adapter");
        let ours = SafetensorsSet::open_files(&[tmp.path().join("adapter_model.safetensors")]).unwrap();
        let theirs = SafetensorsSet::open_files(&[peft_dir.join("adapter_model.safetensors")]).unwrap();
        assert_eq!(ours.names(), theirs.names(), "{name}: tensor names differ from PEFT's");
        let read = |p: &std::path::Path| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(p.join("adapter_config.json")).unwrap()).unwrap() };
        let (a, b) = (read(tmp.path()), read(&peft_dir));
        for key in ["peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "bias", "fan_in_fan_out", "use_rslora", "use_dora"] {
            let norm = |v: &serde_json::Value| if v.is_number() { serde_json::json!(v.as_f64()) } else { v.clone() };
            assert_eq!(norm(&a[key]), norm(&b[key]), "{name}: adapter_config.json `{key}` differs from PEFT's");
        }
    }
}

/// PEFT loads an adapter the engine wrote (a trained-looking one: B nonzero) and its logits
/// equal the engine's merged forward.
#[test]
fn peft_loads_engine_written_adapter() {
    let python = repo().join(".venv-ref/bin/python");
    if !python.exists() {
        return skip("peft_loads_engine_written_adapter", ".venv-ref absent (bash scripts/gen-fixtures.sh creates it)");
    }
    let name = "tiny-qwen2";
    let mut model = Model::load(&fixture(name)).unwrap();
    let mut lora = Lora::load_peft(&fixture(&format!("lora/{name}-adapter")), &model).unwrap();
    for (i, (_, t)) in lora.named_mut().into_iter().enumerate() {
        t.iter_mut().enumerate().for_each(|(j, x)| *x += 0.01 * (((i * 31 + j * 17) % 13) as f32 - 6.0) / 6.0);
    }
    let tmp = tempfile::tempdir().unwrap();
    lora.save_peft(tmp.path(), name).unwrap();
    lora.merge_into(&mut model).unwrap();
    let (batch, _, mask) = peft_logits(name);
    let ours = model.forward(&batch, &ForwardOptions::default()).unwrap().logits.unwrap().into_f32_vec();
    let out = tmp.path().join("peft_logits.safetensors");
    let script = repo().join("scripts/fixtures/_peft_load_check.py");
    let status = std::process::Command::new(&python)
        .arg(&script)
        .arg(fixture(name))
        .arg(tmp.path())
        .arg(fixture(&format!("lora/{name}-sft.safetensors")))
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "{} failed", script.display());
    let st = SafetensorsSet::open_files(&[out]).unwrap();
    let theirs = st.get_f32("logits", &st.shape("logits").unwrap()).unwrap();
    let v = model.config.vocab_size;
    let e = rel_err(&ours, &theirs, |i| mask[i / v]);
    assert!(e <= 1e-4, "PEFT with the engine-written adapter vs the engine: rel err {e:.2e}");
}

/// Inconsistent adapter configs and tensors are typed errors naming the file and field/tensor.
#[test]
fn bad_adapters_are_typed_errors() {
    use ilrec::Error;
    let name = "tiny-llama";
    let model = Model::load(&fixture(name)).unwrap();
    let src = fixture(&format!("lora/{name}-adapter"));
    let copy = || {
        let tmp = tempfile::tempdir().unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
        }
        tmp
    };
    let edit_cfg = |dir: &std::path::Path, f: &dyn Fn(&mut serde_json::Value)| {
        let p = dir.join("adapter_config.json");
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
    };
    // DoRA, a rank that disagrees with the tensors, an unknown target, a non-LoRA type.
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("use_dora", Box::new(|v| v["use_dora"] = true.into())),
        ("lora_B.weight", Box::new(|v| v["r"] = 8.into())),
        ("target_modules", Box::new(|v| v["target_modules"] = serde_json::json!(["q_proj", "lm_head"]))),
        ("peft_type", Box::new(|v| v["peft_type"] = "IA3".into())),
    ];
    for (what, f) in cases {
        let tmp = copy();
        edit_cfg(tmp.path(), &*f);
        let e = Lora::load_peft(tmp.path(), &model).unwrap_err();
        assert!(matches!(e, Error::InvalidField { .. } | Error::ShapeMismatch { .. }), "{what}: {e}");
        assert!(e.to_string().contains(what) || e.to_string().contains("lora_A.weight"), "{what}: {e}");
        assert!(e.to_string().contains(&tmp.path().display().to_string()), "{what}: error does not name the file: {e}");
    }
    // An adapter trained for another model: tiny-qwen2's adapter on tiny-llama.
    let e = Lora::load_peft(&fixture("lora/tiny-qwen2-adapter"), &model).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. } | Error::InvalidField { .. }), "{e}");
    // A missing adapter file.
    let tmp = copy();
    std::fs::remove_file(tmp.path().join("adapter_model.safetensors")).unwrap();
    let e = Lora::load_peft(tmp.path(), &model).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
}
