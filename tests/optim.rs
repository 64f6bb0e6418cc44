//! AdamW, gradient clipping and LR schedules against PyTorch / transformers fixtures
//! (scripts/fixtures/optim_fixtures.py), and training checkpoints: exact round trip, exact
//! resume, corruption, crash leftovers, pruning.
mod common;

use std::fs;
use std::path::{Path, PathBuf};

use ilrec::rng::Rng;
use ilrec::train::checkpoint::{
    atomic_write, list_checkpoints, load, load_latest, remove_stale_temp, save_checkpoint, Checkpoint,
};
use ilrec::train::optim::{clip_grad_norm, AdamW, NamedTensor, Optimizer, ParamRef, Schedule};
use ilrec::Error;
use safetensors::SafeTensors;
use serde_json::Value;

// ------------------------------------------------------------------ fixture

struct Fixture {
    meta: Value,
    bytes: Vec<u8>,
}

impl Fixture {
    fn open() -> Self {
        let dir = common::fixture("optim");
        let meta = serde_json::from_slice(&fs::read(dir.join("optim.json")).unwrap()).unwrap();
        let bytes = fs::read(dir.join("optim.safetensors")).unwrap();
        Fixture { meta, bytes }
    }
    fn tensor(&self, name: &str) -> Vec<f32> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(name).unwrap_or_else(|_| panic!("fixture tensor {name}"));
        t.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }
    /// (name, shape, decay)
    fn params(&self) -> Vec<(String, Vec<usize>, bool)> {
        self.meta["params"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                let shape = p["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
                (p["name"].as_str().unwrap().to_string(), shape, p["decay"].as_bool().unwrap())
            })
            .collect()
    }
    fn f64s(&self, key: &str) -> Vec<f64> {
        self.meta[key].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
    }
    fn adamw(&self) -> AdamW {
        let a = &self.meta["adamw"];
        AdamW {
            lr: a["lr"].as_f64().unwrap(),
            beta1: a["beta1"].as_f64().unwrap(),
            beta2: a["beta2"].as_f64().unwrap(),
            eps: a["eps"].as_f64().unwrap(),
            weight_decay: a["weight_decay"].as_f64().unwrap(),
        }
    }
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-30)
}

struct Replay {
    /// Worst relative error of the parameters (max |diff| / max |ref| per tensor), over steps.
    param_err: f64,
    /// Worst relative error of the per-step updates `p_k - p_{k-1}`.
    update_err: f64,
    norm_err: f64,
    lr_err: f64,
    state_err: f64,
}

/// Replays the fixture's run; `decay_override` forces every tensor's decay flag (negative control).
fn replay(fx: &Fixture, decay_override: Option<bool>) -> Replay {
    let params = fx.params();
    let steps = fx.meta["steps"].as_u64().unwrap() as usize;
    let max_norm = fx.meta["max_norm"].as_f64().unwrap() as f32;
    let s = &fx.meta["schedule"];
    let schedule = Schedule::warmup_cosine(s["warmup_steps"].as_u64().unwrap(), s["total_steps"].as_u64().unwrap());
    let cfg = fx.adamw();
    let shapes: Vec<(&str, &[usize])> = params.iter().map(|(n, s, _)| (n.as_str(), s.as_slice())).collect();
    let mut opt = Optimizer::new(cfg, &shapes).unwrap();
    let mut values: Vec<Vec<f32>> = params.iter().map(|(n, _, _)| fx.tensor(&format!("init.{n}"))).collect();
    let (want_lrs, want_norms) = (fx.f64s("lrs"), fx.f64s("grad_norms"));
    let mut r = Replay { param_err: 0.0, update_err: 0.0, norm_err: 0.0, lr_err: 0.0, state_err: 0.0 };
    for k in 0..steps {
        let mut grads: Vec<Vec<f32>> = params.iter().map(|(n, _, _)| fx.tensor(&format!("grad.{k}.{n}"))).collect();
        let norm = {
            let mut refs: Vec<&mut [f32]> = grads.iter_mut().map(|g| g.as_mut_slice()).collect();
            clip_grad_norm(&mut refs, max_norm)
        };
        r.norm_err = r.norm_err.max(rel(norm as f64, want_norms[k]));
        let lr = schedule.lr_at(cfg.lr, k as u64);
        r.lr_err = r.lr_err.max(if want_lrs[k] == 0.0 { lr.abs() } else { rel(lr, want_lrs[k]) });
        let before = values.clone();
        let mut refs: Vec<ParamRef> = params
            .iter()
            .zip(values.iter_mut())
            .zip(&grads)
            .map(|(((name, _, decay), v), g)| ParamRef {
                name,
                values: v,
                grad: g,
                decay: decay_override.unwrap_or(*decay),
            })
            .collect();
        opt.step(&mut refs, lr).unwrap();
        for (i, (name, _, _)) in params.iter().enumerate() {
            let want = fx.tensor(&format!("param.{k}.{name}"));
            r.param_err = r.param_err.max(common::rel_err(&values[i], &want, |_| true));
            let got_d: Vec<f32> = values[i].iter().zip(&before[i]).map(|(a, b)| a - b).collect();
            let want_d: Vec<f32> = want.iter().zip(&before[i]).map(|(a, b)| a - b).collect();
            if want_d.iter().any(|&d| d != 0.0) {
                r.update_err = r.update_err.max(common::rel_err(&got_d, &want_d, |_| true));
            } else {
                // lr 0 (the first warmup step): the parameters must not move at all.
                assert!(got_d.iter().all(|&d| d == 0.0), "step {k}: {name} moved at lr 0");
            }
        }
    }
    for (name, _, _) in &params {
        let st = opt.state(name).unwrap();
        assert_eq!(st.step, steps as u64);
        r.state_err = r.state_err.max(common::rel_err(&st.m, &fx.tensor(&format!("exp_avg.{name}")), |_| true));
        r.state_err = r.state_err.max(common::rel_err(&st.v, &fx.tensor(&format!("exp_avg_sq.{name}")), |_| true));
    }
    r
}

#[test]
fn adamw_clip_schedule_replay_torch() {
    let fx = Fixture::open();
    let r = replay(&fx, None);
    println!(
        "params {:.2e}, updates {:.2e}, grad norms {:.2e}, lrs {:.2e}, final m/v {:.2e} (relative)",
        r.param_err, r.update_err, r.norm_err, r.lr_err, r.state_err
    );
    assert!(r.param_err <= 1e-5, "parameters differ from torch: {:e}", r.param_err);
    assert!(r.update_err <= 1e-4, "updates differ from torch: {:e}", r.update_err);
    assert!(r.norm_err <= 1e-6, "grad norms differ from torch: {:e}", r.norm_err);
    assert!(r.lr_err <= 1e-12, "lrs differ from transformers: {:e}", r.lr_err);
    assert!(r.state_err <= 1e-5, "exp_avg / exp_avg_sq differ from torch: {:e}", r.state_err);
    // The fixture really exercises both branches of clipping.
    let clipped: Vec<bool> = fx.meta["clipped"].as_array().unwrap().iter().map(|c| c.as_bool().unwrap()).collect();
    assert!(clipped.iter().any(|&c| c) && clipped.iter().any(|&c| !c));
}

#[test]
fn replay_detects_wrong_weight_decay() {
    // Negative control: decaying the no-decay tensor too must break the match.
    let r = replay(&Fixture::open(), Some(true));
    assert!(r.param_err > 1e-4, "fixture does not discriminate decay flags ({:e})", r.param_err);
}

#[test]
fn schedules_match_transformers() {
    let fx = Fixture::open();
    let s = &fx.meta["schedules"];
    let base = s["base_lr"].as_f64().unwrap();
    let curve = |k: &str| -> Vec<f64> { s[k]["lrs"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect() };
    let u = |k: &str, f: &str| s[k][f].as_u64().unwrap();
    let cases = [
        ("warmup_cosine", Schedule::warmup_cosine(u("warmup_cosine", "warmup_steps"), u("warmup_cosine", "total_steps"))),
        (
            "warmup_cosine_min",
            Schedule::WarmupCosine {
                warmup_steps: u("warmup_cosine_min", "warmup_steps"),
                total_steps: u("warmup_cosine_min", "total_steps"),
                min_lr_ratio: s["warmup_cosine_min"]["min_lr_ratio"].as_f64().unwrap(),
            },
        ),
        ("linear_warmup", Schedule::LinearWarmup { warmup_steps: u("linear_warmup", "warmup_steps") }),
    ];
    for (key, sched) in cases {
        let want = curve(key);
        assert!(want.len() > 10);
        for (step, &w) in want.iter().enumerate() {
            let got = sched.lr_at(base, step as u64);
            let err = if w == 0.0 { got.abs() } else { rel(got, w) };
            assert!(err <= 1e-12, "{key} step {step}: {got} vs transformers {w}");
        }
    }
    assert_eq!(Schedule::Constant.lr_at(0.25, 7), 0.25);
}

#[test]
fn cosine_holds_minimum_past_total() {
    let s = Schedule::WarmupCosine { warmup_steps: 2, total_steps: 10, min_lr_ratio: 0.1 };
    assert!((s.factor(10) - 0.1).abs() < 1e-15);
    for step in [11, 15, 19, 1000] {
        assert_eq!(s.factor(step), s.factor(10), "step {step}");
    }
    // Warmup only: 0, 1/2, then the cosine from 1.
    assert_eq!(s.factor(0), 0.0);
    assert_eq!(s.factor(1), 0.5);
    assert_eq!(s.factor(2), 1.0);
    assert!(Schedule::WarmupCosine { warmup_steps: 5, total_steps: 3, min_lr_ratio: 0.0 }.validate().is_err());
}

#[test]
fn clip_non_finite_norm_leaves_grads_alone() {
    for bad in [f32::NAN, f32::INFINITY] {
        let mut a = vec![1.0f32, 2.0, 3.0];
        let mut b = vec![bad, 0.5];
        let (a0, b0) = (a.clone(), b.clone());
        let norm = clip_grad_norm(&mut [a.as_mut_slice(), b.as_mut_slice()], 0.3);
        assert!(!norm.is_finite());
        assert_eq!(a, a0);
        assert_eq!(b.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), b0.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
    }
    // Below the maximum nothing changes, bit for bit; above it the norm becomes max_norm.
    let mut g = vec![0.1f32, -0.2, 0.05];
    let g0 = g.clone();
    let n = clip_grad_norm(&mut [g.as_mut_slice()], 1.0);
    assert_eq!(g, g0);
    assert!((n as f64 - (0.01f64 + 0.04 + 0.0025).sqrt()).abs() < 1e-7);
    let mut big: Vec<f32> = (0..100_001).map(|i| ((i % 7) as f32 - 3.0) * 0.5).collect();
    let n = clip_grad_norm(&mut [big.as_mut_slice()], 2.0);
    let after = big.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    assert!(n > 2.0 && (after - 2.0).abs() < 1e-5, "norm {n} -> {after}");
}

#[test]
fn optimizer_rejects_bad_input_without_touching_state() {
    let mut opt = Optimizer::new(AdamW::default(), &[("a", &[2]), ("b", &[3])]).unwrap();
    let mut a = vec![1.0f32, 2.0];
    let mut b = vec![1.0f32, 2.0, 3.0];
    let before = opt.clone();
    let err = opt
        .step(
            &mut [
                ParamRef { name: "a", values: &mut a, grad: &[0.1, 0.2], decay: true },
                ParamRef { name: "b", values: &mut b, grad: &[0.1, f32::NAN, 0.0], decay: false },
            ],
            1e-3,
        )
        .unwrap_err();
    assert!(matches!(err, Error::NonFinite(ref m) if m.contains("`b`")), "{err}");
    assert_eq!(opt, before);
    assert_eq!(a, vec![1.0, 2.0]);
    let err = opt
        .step(&mut [ParamRef { name: "zz", values: &mut a, grad: &[0.1, 0.2], decay: true }], 1e-3)
        .unwrap_err();
    assert!(matches!(err, Error::Input(_)), "{err}");
    let err = opt
        .step(&mut [ParamRef { name: "b", values: &mut a, grad: &[0.1, 0.2], decay: true }], 1e-3)
        .unwrap_err();
    assert!(matches!(err, Error::Input(_)), "{err}");
    assert!(Optimizer::new(AdamW { beta2: 1.0, ..AdamW::default() }, &[]).is_err());
}

// ------------------------------------------------------------------ checkpoints

/// A tiny "training run": three tensors, gradients drawn from the run's RNG, clipping, schedule.
struct Run {
    names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    values: Vec<Vec<f32>>,
    opt: Optimizer,
    rng: Rng,
    schedule: Schedule,
    step: u64,
}

impl Run {
    fn new() -> Self {
        let names: Vec<String> = ["lora_a", "lora_b", "new_rows"].iter().map(|s| s.to_string()).collect();
        let shapes = vec![vec![4, 9], vec![9, 4], vec![3, 5]];
        let mut init = Rng::new(99);
        let values = shapes.iter().map(|s| (0..s.iter().product()).map(|_| init.normal() * 0.1).collect()).collect();
        let cfg = AdamW { lr: 3e-2, weight_decay: 0.05, ..AdamW::default() };
        let params: Vec<(&str, &[usize])> = names.iter().map(|n| n.as_str()).zip(shapes.iter().map(|s| s.as_slice())).collect();
        let opt = Optimizer::new(cfg, &params).unwrap();
        Run { names, shapes, values, opt, rng: Rng::new(1234), schedule: Schedule::warmup_cosine(2, 10), step: 0 }
    }
    fn train(&mut self, steps: u64) {
        for _ in 0..steps {
            let mut grads: Vec<Vec<f32>> = self.values.iter().map(|v| v.iter().map(|_| self.rng.normal()).collect()).collect();
            let mut refs: Vec<&mut [f32]> = grads.iter_mut().map(|g| g.as_mut_slice()).collect();
            clip_grad_norm(&mut refs, 0.5);
            let lr = self.schedule.lr_at(self.opt.config.lr, self.step);
            let mut params: Vec<ParamRef> = self
                .names
                .iter()
                .zip(self.values.iter_mut())
                .zip(&grads)
                .enumerate()
                .map(|(i, ((n, v), g))| ParamRef { name: n, values: v, grad: g, decay: i != 2 })
                .collect();
            self.opt.step(&mut params, lr).unwrap();
            self.step += 1;
        }
    }
    fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            step: self.step,
            micro_step: self.step * 4,
            epoch: 1,
            data_cursor: 17 + self.step,
            rng: self.rng.state(),
            schedule: self.schedule,
            optimizer: self.opt.config,
            config: serde_json::json!({"model": "tiny", "lora": {"r": 4, "alpha": 8.0}, "seed": 1234}),
            trainable: self
                .names
                .iter()
                .zip(&self.shapes)
                .zip(&self.values)
                .map(|((n, s), v)| (n.clone(), s.clone(), v.clone()))
                .collect(),
            optimizer_state: self.opt.state_tensors(),
        }
    }
    fn resume(ck: &Checkpoint, file: &Path) -> Self {
        let mut run = Run::new();
        run.opt.config = ck.optimizer;
        run.opt.load_state(file, &ck.optimizer_state).unwrap();
        run.rng = Rng::from_state(ck.rng);
        run.schedule = ck.schedule;
        run.step = ck.step;
        for (i, (name, shape, data)) in ck.trainable.iter().enumerate() {
            assert_eq!((name, shape), (&run.names[i], &run.shapes[i]));
            run.values[i] = data.clone();
        }
        run
    }
}

fn bits(v: &[Vec<f32>]) -> Vec<Vec<u32>> {
    v.iter().map(|t| t.iter().map(|x| x.to_bits()).collect()).collect()
}

fn tmpdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn checkpoint_round_trip_is_exact() {
    let tmp = tmpdir();
    let mut run = Run::new();
    run.train(3);
    let mut ck = run.checkpoint();
    // Awkward values survive exactly: u64 RNG words above 2^53, floats with 17 digits.
    ck.rng[0] = u64::MAX - 12345;
    ck.optimizer.lr = 0.1 + 0.2;
    ck.optimizer.eps = 1e-8 / 3.0;
    ck.schedule = Schedule::WarmupCosine { warmup_steps: 2, total_steps: 10, min_lr_ratio: 1.0 / 3.0 };
    let path = save_checkpoint(tmp.path(), &ck, 0).unwrap();
    assert_eq!(path, tmp.path().join("step-3"));
    assert_eq!(fs::read_to_string(tmp.path().join("latest")).unwrap(), "step-3\n");
    assert_eq!(dir_names(tmp.path()), ["latest", "step-3"], "no temp files left");
    let back = load(&path).unwrap();
    assert_eq!(back, ck);
    assert_eq!(load_latest(tmp.path()).unwrap().unwrap(), ck);
    // Saving the same step again replaces it.
    ck.data_cursor += 1;
    save_checkpoint(tmp.path(), &ck, 0).unwrap();
    assert_eq!(load(&path).unwrap(), ck);
    assert_eq!(dir_names(tmp.path()), ["latest", "step-3"]);
    // An empty root has no checkpoint.
    assert!(load_latest(&tmp.path().join("nothing-here")).unwrap().is_none());
}

#[test]
fn resume_reproduces_the_run_bit_for_bit() {
    let tmp = tmpdir();
    let mut straight = Run::new();
    straight.train(9);

    let mut first = Run::new();
    first.train(4);
    save_checkpoint(tmp.path(), &first.checkpoint(), 2).unwrap();
    first.train(2); // progress after the checkpoint is lost in the "crash"
    drop(first);
    let ck = load_latest(tmp.path()).unwrap().unwrap();
    let mut resumed = Run::resume(&ck, &tmp.path().join("step-4/optimizer.safetensors"));
    resumed.train(5);

    assert_eq!(bits(&resumed.values), bits(&straight.values));
    assert_eq!(resumed.rng, straight.rng);
    assert_eq!(resumed.opt, straight.opt);
    // And the check can fail: a resume that forgets the optimizer state diverges.
    let mut amnesiac = Run::resume(&ck, Path::new("unused"));
    amnesiac.opt = Run::new().opt;
    amnesiac.train(5);
    assert_ne!(bits(&amnesiac.values), bits(&straight.values));
}

#[test]
fn optimizer_state_load_checks_names_and_shapes() {
    let file = PathBuf::from("/ckpt/step-9/optimizer.safetensors");
    let mut run = Run::new();
    run.train(2);
    let state = run.opt.state_tensors();
    let mut fresh = Run::new().opt;
    fresh.load_state(&file, &state).unwrap();
    assert_eq!(fresh, run.opt);

    let mut missing: Vec<NamedTensor> = state.clone();
    missing.retain(|(n, _, _)| n != "lora_b.exp_avg_sq");
    let err = Run::new().opt.load_state(&file, &missing).unwrap_err();
    assert!(
        matches!(&err, Error::MissingTensor { path, tensor } if path == &file && tensor == "lora_b.exp_avg_sq"),
        "{err}"
    );
    let mut reshaped = state.clone();
    reshaped[0].1 = vec![9, 4];
    let err = Run::new().opt.load_state(&file, &reshaped).unwrap_err();
    assert!(
        matches!(&err, Error::ShapeMismatch { path, tensor, expected, got }
            if path == &file && tensor == "lora_a.exp_avg" && expected == &vec![4, 9] && got == &vec![9, 4]),
        "{err}"
    );
    let mut extra = state.clone();
    extra.push(("ghost.exp_avg".into(), vec![1], vec![0.0]));
    assert!(matches!(Run::new().opt.load_state(&file, &extra).unwrap_err(), Error::Format { .. }));
    let mut bad_step = state;
    bad_step[2].2[0] = 2.5;
    let err = Run::new().opt.load_state(&file, &bad_step).unwrap_err();
    assert!(matches!(&err, Error::InvalidField { field, .. } if field == "lora_a.step"), "{err}");
}

fn saved_run(root: &Path) -> PathBuf {
    let mut run = Run::new();
    run.train(2);
    save_checkpoint(root, &run.checkpoint(), 0).unwrap()
}

fn names_file(err: &Error, file: &str) -> bool {
    let p = match err {
        Error::Io { path, .. }
        | Error::Format { path, .. }
        | Error::MissingField { path, .. }
        | Error::InvalidField { path, .. }
        | Error::MissingTensor { path, .. }
        | Error::ShapeMismatch { path, .. } => path,
        _ => return false,
    };
    p.file_name().is_some_and(|n| n == file) && err.to_string().contains(file)
}

#[test]
fn corrupt_checkpoint_files_give_typed_errors_naming_the_file() {
    let tmp = tmpdir();
    let dir = saved_run(tmp.path());
    let pristine: Vec<(String, Vec<u8>)> = ["trainable.safetensors", "optimizer.safetensors", "state.json"]
        .iter()
        .map(|f| (f.to_string(), fs::read(dir.join(f)).unwrap()))
        .collect();
    let restore = || {
        for (f, b) in &pristine {
            fs::write(dir.join(f), b).unwrap();
        }
        load(&dir).unwrap();
    };
    let bytes = |f: &str| pristine.iter().find(|(n, _)| n == f).unwrap().1.clone();

    // Truncated safetensors.
    let t = bytes("trainable.safetensors");
    fs::write(dir.join("trainable.safetensors"), &t[..t.len() - 10]).unwrap();
    let err = load(&dir).unwrap_err();
    assert!(matches!(err, Error::Format { .. }) && names_file(&err, "trainable.safetensors"), "{err}");
    restore();

    // One flipped bit inside the optimizer's data (size unchanged): the checksum catches it.
    let mut o = bytes("optimizer.safetensors");
    let last = o.len() - 3;
    o[last] ^= 0x10;
    fs::write(dir.join("optimizer.safetensors"), &o).unwrap();
    let err = load(&dir).unwrap_err();
    assert!(matches!(err, Error::Format { .. }) && names_file(&err, "optimizer.safetensors"), "{err}");
    restore();

    // A truncated safetensors whose size and checksum state.json agrees with (a consistent but
    // broken pair): the safetensors parser itself rejects it, still naming the file.
    let short = &t[..t.len() - 8];
    let mut state: Value = serde_json::from_slice(&bytes("state.json")).unwrap();
    state["files"]["trainable.safetensors"]["bytes"] = short.len().into();
    state["files"]["trainable.safetensors"]["fnv1a64"] = format!("{:016x}", ilrec::train::checkpoint::fnv1a64(short)).into();
    fs::write(dir.join("trainable.safetensors"), short).unwrap();
    fs::write(dir.join("state.json"), serde_json::to_vec(&state).unwrap()).unwrap();
    let err = load(&dir).unwrap_err();
    assert!(matches!(err, Error::Format { .. }) && names_file(&err, "trainable.safetensors"), "{err}");
    restore();

    // Truncated state.json.
    let s = bytes("state.json");
    fs::write(dir.join("state.json"), &s[..s.len() / 2]).unwrap();
    let err = load(&dir).unwrap_err();
    assert!(matches!(err, Error::Format { .. }) && names_file(&err, "state.json"), "{err}");
    restore();

    // Missing and invalid fields.
    for (field, edit) in [
        ("rng", None),
        ("schedule.total_steps", None),
        ("optimizer.beta2", Some(Value::from("1.5"))),
        ("step", Some(Value::from(7))),
        ("format_version", Some(Value::from(99))),
    ] {
        let mut state: Value = serde_json::from_slice(&bytes("state.json")).unwrap();
        let (parent, key) = field.rsplit_once('.').map_or((None, field), |(p, k)| (Some(p), k));
        let obj = match parent {
            Some(p) => state[p].as_object_mut().unwrap(),
            None => state.as_object_mut().unwrap(),
        };
        match &edit {
            None => {
                obj.remove(key).unwrap();
            }
            Some(v) => {
                obj.insert(key.to_string(), v.clone());
            }
        }
        fs::write(dir.join("state.json"), serde_json::to_vec(&state).unwrap()).unwrap();
        let err = load(&dir).unwrap_err();
        let ok = match (&edit, &err) {
            (None, Error::MissingField { field: f, .. }) => f == field,
            (Some(_), Error::InvalidField { field: f, .. }) => f == field || field.starts_with(&format!("{f}.")),
            _ => false,
        };
        assert!(ok && names_file(&err, "state.json"), "{field}: {err}");
        restore();
    }

    // A missing tensor file.
    fs::remove_file(dir.join("optimizer.safetensors")).unwrap();
    let err = load(&dir).unwrap_err();
    assert!(matches!(err, Error::Io { .. }) && names_file(&err, "optimizer.safetensors"), "{err}");
    restore();

    // A tensor renamed inside a consistent file: MissingTensor naming file and tensor.
    let mut ck = load(&dir).unwrap();
    ck.trainable[1].0 = "lora_c".into();
    let other = tmp.path().join("other");
    let p = save_checkpoint(&other, &ck, 0).unwrap();
    let mut state: Value = serde_json::from_slice(&fs::read(p.join("state.json")).unwrap()).unwrap();
    state["trainable"][1] = "lora_b".into();
    fs::write(p.join("state.json"), serde_json::to_vec(&state).unwrap()).unwrap();
    let err = load(&p).unwrap_err();
    assert!(
        matches!(&err, Error::MissingTensor { tensor, .. } if tensor == "lora_b") && names_file(&err, "trainable.safetensors"),
        "{err}"
    );
    // A corrupt pointer.
    fs::write(other.join("latest"), "../../etc\n").unwrap();
    let err = load_latest(&other).unwrap_err();
    assert!(matches!(err, Error::Format { .. }) && names_file(&err, "latest"), "{err}");
}

#[test]
fn crash_leftovers_are_ignored_and_cleaned() {
    let tmp = tmpdir();
    let root = tmp.path();
    let mut run = Run::new();
    run.train(3);
    save_checkpoint(root, &run.checkpoint(), 0).unwrap();
    run.train(1);
    save_checkpoint(root, &run.checkpoint(), 0).unwrap();
    let want = run.checkpoint();
    // A save of step 5 that died half-way, and an interrupted pointer update.
    let partial = root.join("step-5.tmp-123");
    fs::create_dir(&partial).unwrap();
    fs::write(partial.join("trainable.safetensors"), b"\x10\x00\x00").unwrap();
    fs::write(root.join(".latest.tmp-123-0"), b"step-").unwrap();
    fs::create_dir(root.join("step-2.del-77")).unwrap();
    assert_eq!(load_latest(root).unwrap().unwrap(), want);
    // Without the pointer, the scan ignores the leftovers too.
    fs::remove_file(root.join("latest")).unwrap();
    assert_eq!(load_latest(root).unwrap().unwrap(), want);
    // A dangling pointer (written, then its directory lost) falls back to the scan.
    fs::write(root.join("latest"), "step-8\n").unwrap();
    assert_eq!(load_latest(root).unwrap().unwrap(), want);
    let steps: Vec<u64> = list_checkpoints(root).unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, [3, 4]);
    let removed = remove_stale_temp(root).unwrap();
    assert_eq!(removed.len(), 3, "{removed:?}");
    assert_eq!(dir_names(root), ["latest", "step-3", "step-4"]);
}

#[test]
fn pruning_keeps_the_last_k() {
    let tmp = tmpdir();
    let root = tmp.path();
    let mut run = Run::new();
    for _ in 0..6 {
        run.train(1);
        save_checkpoint(root, &run.checkpoint(), 2).unwrap();
    }
    assert_eq!(dir_names(root), ["latest", "step-5", "step-6"]);
    assert_eq!(load_latest(root).unwrap().unwrap().step, 6);
    // keep 0 keeps everything.
    run.train(1);
    save_checkpoint(root, &run.checkpoint(), 0).unwrap();
    assert_eq!(dir_names(root), ["latest", "step-5", "step-6", "step-7"]);
    // Saving an earlier step (a restarted run) prunes below it, never the later directories.
    let mut early = Run::new();
    early.train(2);
    save_checkpoint(root, &early.checkpoint(), 1).unwrap();
    assert_eq!(dir_names(root), ["latest", "step-2", "step-5", "step-6", "step-7"]);
    assert_eq!(load_latest(root).unwrap().unwrap().step, 2, "the pointer, not the highest number, wins");
}

#[test]
fn atomic_write_replaces_whole_files() {
    let tmp = tmpdir();
    let p = tmp.path().join("f.json");
    atomic_write(&p, b"first version, longer").unwrap();
    atomic_write(&p, b"second").unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"second");
    assert_eq!(dir_names(tmp.path()), ["f.json"]);
    let err = atomic_write(&tmp.path().join("no-such-dir/x"), b"1").unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert_eq!(dir_names(tmp.path()), ["f.json"]);
}

#[test]
fn save_refuses_non_finite_tensors() {
    let tmp = tmpdir();
    let mut ck = Run::new().checkpoint();
    ck.trainable[0].2[3] = f32::NAN;
    let err = save_checkpoint(tmp.path(), &ck, 1).unwrap_err();
    assert!(matches!(err, Error::NonFinite(_)), "{err}");
    assert!(list_checkpoints(tmp.path()).unwrap().is_empty());
}
