//! The CPU training backward (LoRA on all seven projections) against PyTorch + PEFT
//! (fixtures: scripts/fixtures/lora_fixtures.py): loss values and every LoRA gradient, for the
//! SFT loss (two normalisers) and the ILRec objective, on tiny Llama and Qwen2 models.
mod common;
use common::{fixture, rel_err};
use ilrec::rng::Rng;
use ilrec::train::backprop::{forward_backward, Objective, TrainBatch};
use ilrec::train::lora::Lora;
use ilrec::train::loss::{CpdDirection, IlrecParams, NegWeight};
use ilrec::weights::SafetensorsSet;
use ilrec::{Batch, Model};

const TOL: f64 = 1e-4;

struct Fixture {
    model: Model,
    lora: Lora,
    meta: serde_json::Value,
    tb: TrainBatch,
}

fn open(name: &str) -> Fixture {
    let model = Model::load(&fixture(name)).unwrap();
    let lora = Lora::load_peft(&fixture(&format!("lora/{name}-adapter")), &model).unwrap();
    let cases: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("lora/cases.json")).unwrap()).unwrap();
    let meta = cases["models"].as_array().unwrap().iter().find(|m| m["model"] == name).unwrap().clone();
    let b = &meta["batch"];
    let ids: Vec<u32> = b["input_ids"].as_array().unwrap().iter().flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32)).collect();
    let lengths: Vec<usize> = b["lengths"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
    let (bsz, t) = (b["B"].as_u64().unwrap() as usize, b["T"].as_u64().unwrap() as usize);
    let mask: Vec<bool> = (0..bsz * t).map(|i| i % t < lengths[i / t]).collect();
    let list = |k: &str| -> Vec<u64> { b[k].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect() };
    let positions: Vec<usize> = list("loss_positions").iter().map(|&x| x as usize).collect();
    let targets: Vec<u32> = list("loss_targets").iter().map(|&x| x as u32).collect();
    let tb = TrainBatch { batch: Batch::new(ids, mask, bsz, t).unwrap(), item_mask: vec![false; positions.len()], positions, targets, rewards: None };
    Fixture { model, lora, meta, tb }
}

fn check_grads(f: &Fixture, file: &str, grads: &Lora, label: &str) {
    let st = SafetensorsSet::open_files(&[fixture(&format!("lora/{file}"))]).unwrap();
    let mut worst = 0.0f64;
    for (name, shape, g) in grads.named() {
        let want = st.get_f32(&name, &shape).unwrap();
        let e = rel_err(g, &want, |_| true);
        worst = worst.max(e);
        assert!(e <= TOL, "{label}: gradient of {name} rel err {e:.3e}");
    }
    println!("{label}: {} LoRA gradients, worst rel err {worst:.2e}", grads.named().len());
    let _ = f;
}

fn scalar(file: &str, name: &str) -> f64 {
    let st = SafetensorsSet::open_files(&[fixture(&format!("lora/{file}"))]).unwrap();
    st.get_f32(name, &[1]).unwrap()[0] as f64
}

fn sft(name: &str) {
    let f = open(name);
    let m = f.tb.positions.len() as f64;
    for (file, norm) in [(format!("{name}-sft.safetensors"), m), (format!("{name}-sft-norm10.safetensors"), 10.0)] {
        let (stats, grads) = forward_backward(&f.model, &f.lora, &f.tb, &Objective::Sft, &[], norm, false, &mut Rng::new(0)).unwrap();
        let want = scalar(&file, "loss");
        assert!((stats.loss - want).abs() / want <= TOL, "{file}: loss {} vs {want}", stats.loss);
        check_grads(&f, &file, &grads.lora, &file);
    }
}

fn ilrec(name: &str) {
    let mut f = open(name);
    let il = &f.meta["ilrec"];
    let hp = &il["hyperparameters"];
    let file = format!("{name}-ilrec.safetensors");
    let st = SafetensorsSet::open_files(&[fixture(&format!("lora/{file}"))]).unwrap();
    let candidates: Vec<u32> = il["candidates"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    f.tb.item_mask = il["item_mask"].as_array().unwrap().iter().map(|x| x.as_u64() == Some(1)).collect();
    f.tb.rewards = Some(st.get_f32("rewards", &[f.tb.positions.len(), candidates.len()]).unwrap());
    let params = IlrecParams {
        alpha: hp["alpha"].as_f64().unwrap() as f32,
        beta: hp["beta"].as_f64().unwrap() as f32,
        lambda: hp["lambda"].as_f64().unwrap() as f32,
        mu: hp["mu"].as_f64().unwrap() as f32,
        neg_weight: NegWeight::Prob,
        cpd_direction: CpdDirection::Forward,
        ..Default::default()
    };
    let layers: Vec<usize> = il["probe_blocks"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
    let obj = Objective::Ilrec { params, layers, candidates };
    let norm = hp["norm"].as_f64().unwrap();
    let (stats, grads) = forward_backward(&f.model, &f.lora, &f.tb, &obj, &[], norm, false, &mut Rng::new(0)).unwrap();
    let v = &il["values_f64"];
    for (got, key) in [(stats.loss, "loss"), (stats.cpo, "cpo"), (stats.cpd, "cpd"), (stats.crr, "crr"), (stats.ce, "ce")] {
        let want = v[key].as_f64().unwrap();
        assert!((got - want).abs() / want.abs() <= TOL, "{file}: {key} {got} vs {want}");
    }
    assert_eq!(stats.negatives as u64, v["n_neg"].as_u64().unwrap(), "{file}: |V_N|");
    check_grads(&f, &file, &grads.lora, &file);
}

#[test]
fn sft_lora_grads_tiny_llama() {
    sft("tiny-llama");
}

#[test]
fn sft_lora_grads_tiny_qwen2() {
    sft("tiny-qwen2");
}

#[test]
fn ilrec_lora_grads_tiny_llama() {
    ilrec("tiny-llama");
}

#[test]
fn ilrec_lora_grads_tiny_qwen2() {
    ilrec("tiny-qwen2");
}
