//! The ILRec objective and SFT cross-entropy against an independent PyTorch implementation
//! written from ILREC.md (fixtures: scripts/fixtures/ilrec_loss_fixtures.py).
mod common;
use common::{fixture, rel_err};
use ilrec::train::loss::{ilrec_loss, sft_loss, CpdDirection, IlrecParams, LossRows, NegSource, NegWeight};
use ilrec::weights::SafetensorsSet;

struct Case {
    st: SafetensorsSet,
    meta: serde_json::Value,
}

impl Case {
    fn f32(&self, name: &str) -> Vec<f32> {
        self.st.get_f32(name, &self.st.shape(name).unwrap()).unwrap()
    }
    fn ids(&self, name: &str) -> Vec<i64> {
        self.st.get_i64(name).unwrap().1
    }
    fn scalar(&self, name: &str) -> f64 {
        self.meta["values_f64"][name].as_f64().unwrap()
    }
}

fn cases() -> Vec<Case> {
    let dir = fixture("ilrec-loss");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case { st: SafetensorsSet::open_files(&[dir.join(c["file"].as_str().unwrap())]).unwrap(), meta: c.clone() })
        .collect()
}

fn close(got: f64, want: f64, what: &str) {
    let e = (got - want).abs() / want.abs().max(1e-12);
    assert!(e <= 1e-5, "{what}: got {got}, want {want} (rel err {e:.2e})");
}

#[test]
fn ilrec_loss_matches_pytorch_reference() {
    for case in cases() {
        let file = case.meta["file"].as_str().unwrap().to_string();
        let hp = &case.meta["hyperparameters"];
        let params = IlrecParams {
            alpha: hp["alpha"].as_f64().unwrap() as f32,
            beta: hp["beta"].as_f64().unwrap() as f32,
            lambda: hp["lambda"].as_f64().unwrap() as f32,
            mu: hp["mu"].as_f64().unwrap() as f32,
            neg_weight: if hp["neg_weight"] == "logit" { NegWeight::Logit } else { NegWeight::Prob },
            cpd_direction: if hp["cpd_direction"] == "reverse" { CpdDirection::Reverse } else { CpdDirection::Forward },
            // Fixtures written before the switch existed have no key: the default source.
            negatives: if hp["negatives"] == "final" { NegSource::Final } else { NegSource::Intermediate },
        };
        let norm = hp["norm"].as_f64().unwrap();
        let final_logits = case.f32("final_logits");
        let probe = case.f32("probe_logits");
        let shape = case.st.shape("probe_logits").unwrap();
        let (k, n, s) = (shape[0], shape[1], shape[2]);
        let vocab = final_logits.len() / n;
        let probes: Vec<&[f32]> = probe.chunks(n * s).collect();
        let candidates: Vec<u32> = case.ids("candidates").iter().map(|&x| x as u32).collect();
        let targets: Vec<u32> = case.ids("targets").iter().map(|&x| x as u32).collect();
        let item_mask: Vec<bool> = case.ids("item_mask").iter().map(|&x| x == 1).collect();
        let rewards = case.f32("rewards");
        let rows = LossRows {
            final_logits: &final_logits,
            vocab,
            targets: &targets,
            item_mask: &item_mask,
            probe_logits: &probes,
            candidates: &candidates,
            rewards: Some(&rewards),
        };
        let (st, g) = ilrec_loss(&rows, &params, norm).unwrap();
        close(st.loss, case.scalar("loss"), &format!("{file} loss"));
        close(st.cpo, case.scalar("cpo"), &format!("{file} cpo"));
        close(st.cpd, case.scalar("cpd"), &format!("{file} cpd"));
        close(st.crr, case.scalar("crr"), &format!("{file} crr"));
        if case.scalar("ce") > 0.0 {
            close(st.ce, case.scalar("ce"), &format!("{file} ce"));
        }
        assert_eq!(st.negatives as f64, case.scalar("n_neg"), "{file}: |V_N| total");
        close(st.mean_negatives(), case.scalar("mean_neg"), &format!("{file} mean |V_N|"));
        assert!((st.frac_negatives_below_zero() - case.scalar("frac_neg_logit")).abs() < 1e-12, "{file}: fraction of negatives below zero");
        let e = rel_err(&g.d_final, &case.f32("d_final_logits"), |_| true);
        assert!(e <= 1e-5, "{file}: d final logits rel err {e:.2e}");
        let want = case.f32("d_probe_logits");
        assert_eq!(g.d_probe.len(), k);
        for (l, d) in g.d_probe.iter().enumerate() {
            let e = rel_err(d, &want[l * n * s..(l + 1) * n * s], |_| true);
            assert!(e <= 1e-5, "{file}: d probe logits (layer index {l}) rel err {e:.2e}");
        }
        println!("{file}: loss {:.6} (ref {:.6}), mean |V_N| {:.2}", st.loss, case.scalar("loss"), st.mean_negatives());
    }
}

/// With beta = lambda = mu = 0 the objective is SFT cross-entropy (ILREC.md section 7).
#[test]
fn ilrec_with_zero_weights_is_sft() {
    let case = &cases()[0];
    let final_logits = case.f32("final_logits");
    let probe = case.f32("probe_logits");
    let targets: Vec<u32> = case.ids("targets").iter().map(|&x| x as u32).collect();
    let n = targets.len();
    let vocab = final_logits.len() / n;
    let s = case.st.shape("probe_logits").unwrap()[2];
    let probes: Vec<&[f32]> = probe.chunks(n * s).collect();
    let candidates: Vec<u32> = case.ids("candidates").iter().map(|&x| x as u32).collect();
    let item_mask: Vec<bool> = case.ids("item_mask").iter().map(|&x| x == 1).collect();
    let rows = LossRows { final_logits: &final_logits, vocab, targets: &targets, item_mask: &item_mask, probe_logits: &probes, candidates: &candidates, rewards: None };
    let p = IlrecParams { beta: 0.0, lambda: 0.0, mu: 0.0, ..Default::default() };
    let (st, g) = ilrec_loss(&rows, &p, 13.0).unwrap();
    let (sft, d) = sft_loss(&final_logits, vocab, &targets, 13.0).unwrap();
    assert!((st.loss - sft.loss).abs() < 1e-9, "{} vs {}", st.loss, sft.loss);
    assert!(rel_err(&g.d_final, &d, |_| true) < 1e-6);
    assert!(g.d_probe.iter().all(|d| d.iter().all(|&x| x == 0.0)));
}

#[test]
fn loss_rejects_bad_rows() {
    let logits = vec![0.0f32; 2 * 5];
    assert!(sft_loss(&logits, 5, &[1, 7], 2.0).is_err(), "target outside vocab");
    assert!(sft_loss(&logits, 5, &[1, 2], 0.0).is_err(), "zero normaliser");
    let mut nan = logits.clone();
    nan[3] = f32::NAN;
    let e = sft_loss(&nan, 5, &[1, 2], 2.0).unwrap_err();
    assert!(e.to_string().contains("final logits at element 3"), "{e}");
    let probe = vec![0.0f32; 2 * 2];
    let probes: Vec<&[f32]> = vec![&probe];
    let rows = LossRows { final_logits: &logits, vocab: 5, targets: &[1, 4], item_mask: &[true, true], probe_logits: &probes, candidates: &[1, 2], rewards: None };
    let e = ilrec_loss(&rows, &IlrecParams { mu: 0.0, ..Default::default() }, 2.0).unwrap_err();
    assert!(e.to_string().contains("target 4 is not a candidate"), "{e}");
    let rows = LossRows { targets: &[1, 2], ..rows };
    let e = ilrec_loss(&rows, &IlrecParams::default(), 2.0).unwrap_err();
    assert!(e.to_string().contains("rewards"), "{e}");
}
