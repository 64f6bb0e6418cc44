//! The training loop: overfitting a handful of samples (SFT and ILRec), exact resume from a
//! checkpoint, resume after the process is killed mid-run, and stopping on NaN.
mod common;
use common::{fixture, train_samples as samples};
use ilrec::train::backprop::Objective;
use ilrec::train::loss::IlrecParams;
use ilrec::train::trainer::{train, TrainConfig, Trainer};
use ilrec::{Error, Model};
use std::path::Path;
use std::time::{Duration, Instant};

fn small_cfg(steps_per_epoch_examples: f64) -> TrainConfig {
    TrainConfig {
        lora_rank: 8,
        lora_alpha: 16.0,
        lora_dropout: 0.0,
        lr: 5e-3,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        warmup_ratio: 0.0,
        epochs: steps_per_epoch_examples,
        micro_batch: 2,
        grad_accum: 2,
        seed: 7,
        ..Default::default()
    }
}

fn ilrec_objective(items: &[u32]) -> Objective {
    Objective::Ilrec { params: IlrecParams { mu: 0.0, ..Default::default() }, layers: vec![1, 2], candidates: items.to_vec() }
}

#[test]
fn sft_and_ilrec_overfit_a_handful_of_samples() {
    let (data, items) = samples();
    for (name, obj) in [("sft", Objective::Sft), ("ilrec", ilrec_objective(&items))] {
        let mut model = Model::load(&fixture("tiny-llama")).unwrap();
        let mut losses = Vec::new();
        // With the final RMSNorm bounding the hidden state, frozen random head rows cap the
        // logit margins of this tiny model; the response tokens' rows are trainable, as new
        // item tokens' rows are in semantic-ID mode.
        let trainable: Vec<u32> = items.iter().copied().chain([2]).collect();
        train(&mut model, &data, small_cfg(150.0), &obj, trainable, None, |r| losses.push(r.stats.loss)).unwrap();
        let (first, last) = (losses[0], *losses.last().unwrap());
        println!("{name}: loss {first:.4} -> {last:.5} in {} steps; curve {:?}", losses.len(), losses.iter().step_by(10).map(|l| (l * 1e4).round() / 1e4).collect::<Vec<_>>());
        assert!(last < 0.02, "{name}: final loss {last} (first {first})");
    }
}

fn run_losses(dir: Option<&Path>, epochs: f64, dropout: f32, stop_after: Option<u64>) -> Vec<(u64, f64)> {
    let (data, items) = samples();
    let mut model = Model::load(&fixture("tiny-llama")).unwrap();
    let mut cfg = small_cfg(epochs);
    cfg.lora_dropout = dropout;
    cfg.warmup_ratio = 0.2;
    cfg.checkpoint_every = 1;
    cfg.keep_checkpoints = 3;
    let obj = ilrec_objective(&items);
    // Two item tokens get trainable rows, as new semantic-ID tokens would.
    let mut tr = Trainer::new(&model, cfg, data.len(), vec![204, 205]).unwrap();
    if let Some(d) = dir {
        tr.resume(&mut model, d).unwrap();
    }
    let mut out = Vec::new();
    while !tr.is_done() && stop_after.is_none_or(|s| tr.step_count() < s) {
        let r = tr.train_step(&mut model, &data, &obj).unwrap();
        out.push((r.step, r.stats.loss));
        if let Some(d) = dir {
            tr.save(d).unwrap();
        }
    }
    out
}

#[test]
fn resume_reproduces_the_uninterrupted_run() {
    let full = run_losses(None, 10.0, 0.1, None);
    let tmp = tempfile::tempdir().unwrap();
    let first = run_losses(Some(tmp.path()), 10.0, 0.1, Some(4));
    let rest = run_losses(Some(tmp.path()), 10.0, 0.1, None);
    assert_eq!(first.len(), 4);
    let joined: Vec<(u64, f64)> = first.into_iter().chain(rest).collect();
    assert_eq!(joined, full, "resumed run's losses differ from the uninterrupted run's");
}

const CHILD_ENV: &str = "ILREC_TRAINER_CHILD_DIR";

/// Not a test on its own: the body of the process that `killed_run_resumes_exactly` kills.
#[test]
fn child_training_process() {
    let Ok(dir) = std::env::var(CHILD_ENV) else { return };
    let (data, items) = samples();
    let mut model = Model::load(&fixture("tiny-llama")).unwrap();
    let mut cfg = small_cfg(10.0);
    cfg.lora_dropout = 0.1;
    cfg.warmup_ratio = 0.2;
    cfg.checkpoint_every = 1;
    cfg.keep_checkpoints = 3;
    train(&mut model, &data, cfg, &ilrec_objective(&items), vec![204, 205], Some(Path::new(&dir)), |_| {
        std::thread::sleep(Duration::from_millis(150))
    })
    .unwrap();
}

#[test]
fn killed_run_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_training_process", "--test-threads", "1"])
        .env(CHILD_ENV, tmp.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !tmp.path().join("step-4").exists() {
        assert!(t0.elapsed() < Duration::from_secs(120), "the child never reached step 4");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let resumed = run_losses(Some(tmp.path()), 10.0, 0.1, None);
    let full = run_losses(None, 10.0, 0.1, None);
    let done = full.len() - resumed.len();
    assert!(done >= 4, "resumed from step {done}");
    assert_eq!(resumed, full[done..].to_vec(), "after the kill, the resumed losses differ");
}

#[test]
fn nan_stops_training_and_keeps_the_last_checkpoint() {
    let (data, _) = samples();
    let mut model = Model::load(&fixture("tiny-llama")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = small_cfg(10.0);
    cfg.checkpoint_every = 1;
    let mut tr = Trainer::new(&model, cfg, data.len(), vec![]).unwrap();
    for _ in 0..2 {
        tr.train_step(&mut model, &data, &Objective::Sft).unwrap();
        tr.save(tmp.path()).unwrap();
    }
    model.blocks[1].up.w[5] = f32::NAN;
    let err = tr.train_step(&mut model, &data, &Objective::Sft).unwrap_err();
    assert!(matches!(err, Error::NonFinite(_)), "{err}");
    assert!(err.to_string().contains("step 3"), "{err}");
    let ck = ilrec::train::checkpoint::load_latest(tmp.path()).unwrap().unwrap();
    assert_eq!(ck.step, 2);
}

/// `time_against_sft` measures on the run's next micro-batch without consuming it: the steps
/// after it are bitwise those of a run that never measured.
#[test]
fn timing_against_sft_leaves_the_run_untouched() {
    let (data, items) = samples();
    let obj = ilrec_objective(&items);
    let trainable: Vec<u32> = items.iter().copied().chain([2]).collect();
    let mut cfg = small_cfg(4.0);
    cfg.lora_dropout = 0.1; // the run's random state must not be drawn from either
    let losses = |measure: bool| {
        let mut model = Model::load(&fixture("tiny-llama")).unwrap();
        let mut tr = Trainer::new(&model, cfg.clone(), data.len(), trainable.clone()).unwrap();
        let mut out = Vec::new();
        while !tr.is_done() {
            if measure {
                let c = tr.time_against_sft(&model, &data, &obj, 1).unwrap();
                assert!(c.objective_s > 0.0 && c.sft_s > 0.0 && c.ratio().is_finite() && c.tokens > 0, "{c:?}");
            }
            out.push(tr.train_step(&mut model, &data, &obj).unwrap().stats.loss);
        }
        out
    };
    assert_eq!(losses(true), losses(false));
}
