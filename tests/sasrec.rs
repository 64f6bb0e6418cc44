//! Tests of the SASRec recommender (engine/rec/sasrec.rs, docs/sasrec.md).
//!
//! 1. Gradients: central finite differences in f64 of the whole training loss (embeddings,
//!    every block, final LayerNorm, tied output, padding, windows, dropout with a fixed mask)
//!    against the analytic backward pass run in f64; the same comparison rejects a flipped
//!    sign, a 1% scaling and a missing tensor gradient; the f32 training path agrees with the
//!    f64 one on a larger model (gemm matmuls, chunked cross-entropy).
//! 2. Learning: on sequences where the next item is always `(x + 1) mod n`, a trained model
//!    ranks the true next item first for held-out users' test samples; an untrained one is at
//!    chance level.
//! 3. Padding and batching: a history's scores do not depend on the other histories of a batch
//!    (different lengths, so different amounts of padding) or on items beyond `max_len`.
//! 4. Bad input: typed errors, no panics.
//! 5. ML-100K (skipped when `data/ml-100k/ml-100k.inter` is absent): a short run prints
//!    valid/test metrics and time per epoch; the full default run is `#[ignore]`d
//!    (`cargo test --release --test sasrec -- --ignored --nocapture`).
use std::path::Path;
use std::time::Instant;

use ilrec::rec::data::{leave_one_out, load_recbole, Dataset, Item, Sample};
use ilrec::rec::sasrec::{testing, SasRec, SasRecConfig};
use ilrec::rng::Rng;
use ilrec::Error;

// ---------------------------------------------------------------------------------------------
// 1. Gradient check

const N_TINY: usize = 7;

fn tiny_cfg(dropout: f32, window_stride: usize) -> SasRecConfig {
    SasRecConfig {
        hidden: 8,
        heads: 2,
        layers: 2,
        max_len: 5,
        dropout,
        window_stride: Some(window_stride),
        ..SasRecConfig::default()
    }
}

/// Sequences of 2..9 items over 7 items: inputs of 1..5 items, so most windows are padded, and
/// the 9-item one spans two windows.
fn tiny_seqs() -> Vec<Vec<u32>> {
    vec![
        vec![1, 2],
        vec![3, 0, 5, 6],
        vec![6, 5, 4, 3, 2, 1],
        vec![0, 1, 2, 3, 4, 5, 6, 0, 1],
        vec![2, 2, 4],
    ]
}

/// Random parameters (every tensor non-trivial: LayerNorm weights around 1, non-zero biases,
/// a random padding row that must get no gradient).
fn random_params(specs: &[(String, Vec<usize>)], seed: u64) -> Vec<Vec<f64>> {
    let mut rng = Rng::new(seed);
    specs
        .iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            (0..n)
                .map(|_| {
                    let r = rng.normal() as f64;
                    if name.ends_with("norm.weight") {
                        1.0 + 0.3 * r
                    } else {
                        0.5 * r
                    }
                })
                .collect()
        })
        .collect()
}

/// Entries of a tensor to difference: its largest-magnitude gradient, the padding row of the
/// item table, and `extra` random others (all when the tensor is small).
fn picks(name: &str, grad: &[f64], d: usize, extra: usize, rng: &mut Rng) -> Vec<usize> {
    if grad.len() <= extra {
        return (0..grad.len()).collect();
    }
    let mut v = vec![(0..grad.len())
        .max_by(|&a, &b| grad[a].abs().total_cmp(&grad[b].abs()))
        .unwrap()];
    if name == "item_emb.weight" {
        v.extend(0..d.min(3));
    }
    for _ in 0..extra {
        v.push(rng.below(grad.len()));
    }
    v.sort_unstable();
    v.dedup();
    v
}

/// Compares `grads` with central differences of `loss` (step `h`, in f64) on [`picks`] of the
/// tensors listed in `which`. Passes when `|fd - an| <= rtol * scale + atol` for every checked
/// entry, `scale` being the tensor's largest `|an|`. Returns the worst `|fd - an| / scale`.
#[allow(clippy::too_many_arguments)]
fn check_grads(
    loss: &dyn Fn(&[Vec<f64>]) -> f64,
    specs: &[(String, Vec<usize>)],
    params: &[Vec<f64>],
    grads: &[Vec<f64>],
    which: &[usize],
    d: usize,
    h: f64,
    rtol: f64,
) -> Result<f64, String> {
    let atol = 1e-10;
    let mut rng = Rng::new(7);
    let mut worst = 0.0f64;
    let mut p = params.to_vec();
    for &t in which {
        let (name, _) = &specs[t];
        let scale = grads[t].iter().fold(0.0f64, |m, g| m.max(g.abs()));
        for i in picks(name, &grads[t], d, 12, &mut rng) {
            let orig = p[t][i];
            p[t][i] = orig + h;
            let up = loss(&p);
            p[t][i] = orig - h;
            let down = loss(&p);
            p[t][i] = orig;
            let fd = (up - down) / (2.0 * h);
            let an = grads[t][i];
            let err = (fd - an).abs();
            let ok = err <= rtol * scale + atol; // false for NaN
            if !ok {
                return Err(format!(
                    "`{name}`[{i}]: finite difference {fd:.9e}, analytic {an:.9e} (tensor scale {scale:.3e})"
                ));
            }
            // (Tensors whose gradient is zero up to rounding, the key bias, pass through `atol`.)
            if scale > 1e-8 {
                worst = worst.max(err / scale);
            }
        }
    }
    Ok(worst)
}

/// The key projection's bias: its gradient is identically zero (softmax is shift-invariant).
fn key_bias(name: &str) -> bool {
    name.ends_with("attn.k.bias")
}

fn grad_check_case(cfg: &SasRecConfig, seed: u64) -> f64 {
    let specs = testing::param_specs(N_TINY, cfg).unwrap();
    let params = random_params(&specs, seed);
    let seqs = tiny_seqs();
    let (l0, grads) = testing::loss_and_grads_f64(N_TINY, cfg, &params, &seqs, 99).unwrap();
    assert!(l0.is_finite() && l0 > 0.0);
    let loss = |p: &[Vec<f64>]| testing::loss_f64(N_TINY, cfg, p, &seqs, 99).unwrap();
    assert_eq!(
        loss(&params),
        l0,
        "loss and loss_and_grads disagree (non-deterministic dropout?)"
    );
    // The padding row of the item table is never read.
    assert!(grads[0][..cfg.hidden].iter().all(|&g| g == 0.0));
    let global = grads.iter().flatten().fold(0.0f64, |m, g| m.max(g.abs()));
    for (t, g) in grads.iter().enumerate() {
        let scale = g.iter().fold(0.0f64, |m, g| m.max(g.abs()));
        if key_bias(&specs[t].0) {
            // Adding the same b·q_i to all of query i's scores leaves its softmax unchanged.
            assert!(scale <= 1e-12 * global, "`{}`: {scale:e}", specs[t].0);
        } else {
            assert!(scale >= 1e-6 * global, "tensor `{}` got no gradient", specs[t].0);
        }
    }
    let all: Vec<usize> = (0..specs.len()).collect();
    let worst = check_grads(&loss, &specs, &params, &grads, &all, cfg.hidden, 1e-5, 1e-6)
        .unwrap_or_else(|e| panic!("gradient check failed: {e}"));
    println!(
        "grad check (dropout {}, stride {}): worst |fd - an| / scale = {worst:.2e}",
        cfg.dropout,
        cfg.stride()
    );
    worst
}

#[test]
fn gradients_match_finite_differences() {
    grad_check_case(&tiny_cfg(0.0, 5), 1);
}

#[test]
fn gradients_match_with_overlapping_windows_and_dropout() {
    // Windows every 2 items (positions without a loss term) and dropout with a fixed mask.
    grad_check_case(&tiny_cfg(0.3, 2), 2);
    // Only the most recent window per sequence (the 9-item one is truncated).
    grad_check_case(&tiny_cfg(0.0, 0), 3);
}

#[test]
fn dropout_masks_change_the_loss() {
    let cfg = tiny_cfg(0.3, 5);
    let specs = testing::param_specs(N_TINY, &cfg).unwrap();
    let params = random_params(&specs, 4);
    let a = testing::loss_f64(N_TINY, &cfg, &params, &tiny_seqs(), 1).unwrap();
    let b = testing::loss_f64(N_TINY, &cfg, &params, &tiny_seqs(), 2).unwrap();
    let none = testing::loss_f64(N_TINY, &tiny_cfg(0.0, 5), &params, &tiny_seqs(), 1).unwrap();
    assert!(a != b && a != none && b != none, "{a} {b} {none}");
}

#[test]
fn wrong_gradients_are_rejected() {
    let cfg = tiny_cfg(0.0, 5);
    let specs = testing::param_specs(N_TINY, &cfg).unwrap();
    let params = random_params(&specs, 5);
    let seqs = tiny_seqs();
    let (_, grads) = testing::loss_and_grads_f64(N_TINY, &cfg, &params, &seqs, 0).unwrap();
    let loss = |p: &[Vec<f64>]| testing::loss_f64(N_TINY, &cfg, p, &seqs, 0).unwrap();
    for t in 0..specs.len() {
        if key_bias(&specs[t].0) {
            continue;
        }
        let argmax = (0..grads[t].len())
            .max_by(|&a, &b| grads[t][a].abs().total_cmp(&grads[t][b].abs()))
            .unwrap();
        let mut flipped = grads.clone();
        flipped[t][argmax] = -flipped[t][argmax];
        let mut scaled = grads.clone();
        scaled[t].iter_mut().for_each(|g| *g *= 1.01);
        let mut missing = grads.clone();
        missing[t].fill(0.0);
        for (what, g) in [("sign flip", &flipped), ("1% scaling", &scaled), ("zeroed", &missing)] {
            assert!(
                check_grads(&loss, &specs, &params, g, &[t], cfg.hidden, 1e-5, 1e-6).is_err(),
                "{what} of `{}` was accepted",
                specs[t].0
            );
        }
    }
}

/// The f32 path (engine gemm matmuls, chunked cross-entropy over > 512 positions, parallel
/// attention) computes the same loss and gradients as the f64 path checked above.
#[test]
fn f32_path_matches_f64_path() {
    let n_items = 300;
    let cfg = SasRecConfig {
        hidden: 32,
        heads: 4,
        layers: 2,
        max_len: 12,
        dropout: 0.2,
        window_stride: Some(7),
        ..SasRecConfig::default()
    };
    let specs = testing::param_specs(n_items, &cfg).unwrap();
    let p64: Vec<Vec<f64>> = random_params(&specs, 6)
        .into_iter()
        .map(|v| v.into_iter().map(|x| (x as f32) as f64).collect())
        .collect();
    let p32: Vec<Vec<f32>> = p64.iter().map(|v| v.iter().map(|&x| x as f32).collect()).collect();
    let mut rng = Rng::new(8);
    let seqs: Vec<Vec<u32>> = (0..60)
        .map(|_| {
            let len = 2 + rng.below(35);
            (0..len).map(|_| rng.below(n_items) as u32).collect()
        })
        .collect();
    let positions: usize = seqs.iter().map(|s| s.len() - 1).sum();
    assert!(positions > 512, "{positions}");
    let (l64, g64) = testing::loss_and_grads_f64(n_items, &cfg, &p64, &seqs, 3).unwrap();
    let (l32, g32) = testing::loss_and_grads_f32(n_items, &cfg, &p32, &seqs, 3).unwrap();
    assert!((l64 - l32).abs() <= 1e-5 * l64.abs(), "loss f64 {l64} vs f32 {l32}");
    let mut worst = 0.0f64;
    let global = g64.iter().flatten().fold(0.0f64, |m, g| m.max(g.abs()));
    for (t, (a, b)) in g64.iter().zip(&g32).enumerate() {
        // Tensors with (near-)zero gradients (the key bias) are compared at the global scale.
        let scale = a.iter().fold(0.0f64, |m, g| m.max(g.abs())).max(1e-3 * global);
        let err = a.iter().zip(b).fold(0.0f64, |m, (&x, &y)| m.max((x - y as f64).abs()));
        assert!(
            scale > 0.0 && err <= 1e-3 * scale,
            "`{}`: f32 vs f64 error {err:.3e}, scale {scale:.3e}",
            specs[t].0
        );
        worst = worst.max(err / scale);
    }
    println!("f32 vs f64 gradients: worst error / scale = {worst:.2e}");
}

// ---------------------------------------------------------------------------------------------
// 2. Learning

fn dataset(n_items: usize, sequences: Vec<Vec<u32>>) -> Dataset {
    Dataset {
        name: "synthetic".into(),
        items: (0..n_items)
            .map(|i| Item {
                raw_id: i.to_string(),
                title: i.to_string(),
                text: i.to_string(),
            })
            .collect(),
        users: (0..sequences.len()).map(|u| u.to_string()).collect(),
        sequences,
        semantic_ids: None,
        warnings: Vec::new(),
    }
}

/// 50 users; user u starts at a random item and walks `x -> (x + 1) mod n` for 6..17 steps.
fn successor_data(n_items: usize) -> Dataset {
    let mut rng = Rng::new(11);
    let seqs = (0..50)
        .map(|u| {
            let start = rng.below(n_items);
            (0..6 + u % 12).map(|k| ((start + k) % n_items) as u32).collect()
        })
        .collect();
    dataset(n_items, seqs)
}

fn learning_cfg() -> SasRecConfig {
    SasRecConfig {
        hidden: 32,
        heads: 2,
        layers: 2,
        dropout: 0.1,
        lr: 5e-3,
        epochs: 40,
        batch: 16,
        ..SasRecConfig::default()
    }
}

/// Fraction of samples whose target is the top-1 item.
fn hit1(model: &SasRec, samples: &[Sample]) -> f64 {
    let hits = samples
        .iter()
        .filter(|s| model.top_k(&s.history, 1).unwrap() == [s.target])
        .count();
    hits as f64 / samples.len() as f64
}

#[test]
fn learns_a_deterministic_successor() {
    let n = 40;
    let split = leave_one_out(&successor_data(n), 20);
    // Every test target really is the successor of the last history item.
    assert!(split
        .test
        .iter()
        .all(|s| s.target as usize == (*s.history.last().unwrap() as usize + 1) % n));
    let cfg = learning_cfg();

    let untrained = SasRec::new(n, &cfg).unwrap();
    let m0 = untrained.evaluate(&split.test).unwrap();
    let h0 = hit1(&untrained, &split.test);
    // Chance: Hit@1 = 1/40, Hit@10 = 10/40.
    assert!(
        h0 <= 0.15 && m0.hit10 <= 0.5,
        "untrained model: Hit@1 {h0}, Hit@10 {}",
        m0.hit10
    );

    let mut losses = Vec::new();
    let model = SasRec::train(&split.train, n, &cfg, &mut |e, total, loss| {
        assert_eq!(total, 40);
        assert_eq!(e, losses.len() + 1);
        losses.push(loss);
    })
    .unwrap();
    assert_eq!(losses.len(), 40);
    assert!(losses[39] < 0.5 * losses[0], "loss did not fall: {losses:?}");
    let m = model.evaluate(&split.test).unwrap();
    let h = hit1(&model, &split.test);
    println!(
        "successor task: untrained Hit@1 {h0:.3} Hit@10 {:.3}; trained Hit@1 {h:.3} Hit@10 {:.3} NDCG@10 {:.3}; loss {:.3} -> {:.3}",
        m0.hit10, m.hit10, m.ndcg10, losses[0], losses[39]
    );
    assert_eq!(m.n, 50);
    assert!(
        h >= 0.9 && m.hit10 >= 0.98,
        "trained model: Hit@1 {h}, Hit@10 {}",
        m.hit10
    );
    // The validation samples (one step earlier) too.
    assert!(hit1(&model, &split.valid) >= 0.9);
}

#[test]
fn training_is_deterministic_given_the_seed() {
    let n = 40;
    let split = leave_one_out(&successor_data(n), 20);
    let cfg = SasRecConfig {
        epochs: 2,
        ..learning_cfg()
    };
    let a = SasRec::train(&split.train, n, &cfg, &mut |_, _, _| {}).unwrap();
    let b = SasRec::train(&split.train, n, &cfg, &mut |_, _, _| {}).unwrap();
    let c = SasRec::train(&split.train, n, &SasRecConfig { seed: 43, ..cfg }, &mut |_, _, _| {}).unwrap();
    let (ta, tb, tc) = (a.tensors(), b.tensors(), c.tensors());
    assert!(ta.iter().zip(&tb).all(|(x, y)| x.2 == y.2));
    assert!(ta.iter().zip(&tc).any(|(x, y)| x.2 != y.2));
}

// ---------------------------------------------------------------------------------------------
// 3. Padding and batching

fn max_rel_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f64, |m, &x| m.max(x.abs() as f64));
    let err = a
        .iter()
        .zip(b)
        .fold(0.0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    err / scale
}

#[test]
fn scores_do_not_depend_on_padding_or_the_batch() {
    let n = 40;
    let split = leave_one_out(&successor_data(n), 20);
    let cfg = SasRecConfig {
        epochs: 3,
        ..learning_cfg()
    };
    let model = SasRec::train(&split.train, n, &cfg, &mut |_, _, _| {}).unwrap();
    let mut rng = Rng::new(12);
    let mut hist = |len: usize| -> Vec<u32> { (0..len).map(|_| rng.below(n) as u32).collect() };
    let short = hist(2);
    let one = hist(1);
    let mid = hist(9);
    let full = hist(20);
    let long = hist(27);
    let alone: Vec<Vec<f32>> = [&short, &one, &mid, &full]
        .iter()
        .map(|h| model.scores(h).unwrap())
        .collect();
    assert!(alone.iter().all(|s| s.len() == n));
    let batch: Vec<&[u32]> = vec![&long, &short, &full, &one, &mid, &short];
    let together = model.scores_batch(&batch).unwrap();
    assert_eq!(together.len(), 6);
    for (got, want) in [(1, 0), (5, 0), (3, 1), (4, 2), (2, 3)] {
        let e = max_rel_diff(&together[got], &alone[want]);
        assert!(e <= 1e-5, "batch entry {got}: relative difference {e:.2e}");
    }
    // Only the max_len (20) most recent items are read.
    let tail = model.scores(&long[7..]).unwrap();
    assert!(max_rel_diff(&together[0], &tail) <= 1e-5);
    let mut prefixed = vec![3u32, 4];
    prefixed.extend_from_slice(&full);
    assert!(max_rel_diff(&model.scores(&prefixed).unwrap(), &alone[3]) <= 1e-5);
    // ... but every one of those matters (the model is not ignoring its input).
    let mut changed = full.clone();
    changed[0] = (changed[0] + 1) % n as u32;
    assert!(max_rel_diff(&model.scores(&changed).unwrap(), &alone[3]) > 1e-4);
}

#[test]
fn save_and_load_round_trip() {
    let n = 40;
    let split = leave_one_out(&successor_data(n), 20);
    let cfg = SasRecConfig {
        epochs: 1,
        heads: 4,
        ..learning_cfg()
    };
    let model = SasRec::train(&split.train, n, &cfg, &mut |_, _, _| {}).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sasrec.safetensors");
    model.save(&path).unwrap();
    let back = SasRec::load(&path).unwrap();
    assert_eq!(back.config(), model.config());
    assert_eq!(back.n_items(), n);
    for (a, b) in model.tensors().iter().zip(back.tensors()) {
        assert_eq!((&a.0, &a.1, a.2), (&b.0, &b.1, b.2));
    }
    assert_eq!(model.scores(&[1, 2, 3]).unwrap(), back.scores(&[1, 2, 3]).unwrap());
    // Only the final file is left (the write went through a temp file).
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("sasrec.safetensors")]);

    // Damaged files are errors.
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    assert!(SasRec::load(&cut).is_err());
    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"not a model").unwrap();
    assert!(matches!(SasRec::load(&garbage), Err(Error::Format { .. })));
    assert!(matches!(
        SasRec::load(&dir.path().join("absent")),
        Err(Error::Io { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// 4. Bad input

#[test]
fn bad_input_is_a_typed_error() {
    let n = 10;
    let cfg = SasRecConfig {
        hidden: 8,
        epochs: 1,
        ..SasRecConfig::default()
    };
    let model = SasRec::new(n, &cfg).unwrap();
    assert!(matches!(model.scores(&[1, 10]), Err(Error::Input(_))));
    assert!(matches!(model.scores(&[]), Err(Error::Input(_))));
    assert!(matches!(model.scores_batch(&[&[1], &[u32::MAX]]), Err(Error::Input(_))));
    let bad_target = Sample {
        user: 0,
        history: vec![1, 2],
        target: 10,
    };
    assert!(matches!(
        model.evaluate(std::slice::from_ref(&bad_target)),
        Err(Error::Input(_))
    ));

    let mut quiet = |_: usize, _: usize, _: f64| {};
    assert!(matches!(SasRec::train(&[], n, &cfg, &mut quiet), Err(Error::Input(_))));
    assert!(matches!(
        SasRec::train(&[bad_target], n, &cfg, &mut quiet),
        Err(Error::Input(_))
    ));
    let bad_history = Sample {
        user: 0,
        history: vec![11],
        target: 1,
    };
    assert!(matches!(
        SasRec::train(&[bad_history], n, &cfg, &mut quiet),
        Err(Error::Input(_))
    ));
    let no_history = Sample {
        user: 0,
        history: vec![],
        target: 1,
    };
    assert!(matches!(
        SasRec::train(&[no_history], n, &cfg, &mut quiet),
        Err(Error::Input(_))
    ));
    assert!(matches!(SasRec::new(0, &cfg), Err(Error::Input(_))));
    for bad in [
        SasRecConfig {
            heads: 3,
            ..cfg.clone()
        },
        SasRecConfig {
            hidden: 0,
            ..cfg.clone()
        },
        SasRecConfig {
            max_len: 0,
            ..cfg.clone()
        },
        SasRecConfig {
            dropout: 1.0,
            ..cfg.clone()
        },
        SasRecConfig {
            lr: f64::NAN,
            ..cfg.clone()
        },
        SasRecConfig {
            batch: 0,
            ..cfg.clone()
        },
    ] {
        assert!(matches!(SasRec::new(n, &bad), Err(Error::Input(_))), "{bad:?}");
    }

    // A diverging run stops with NonFinite instead of producing NaN weights.
    let split = leave_one_out(&successor_data(n), 20);
    let blow_up = SasRecConfig {
        lr: 1e38,
        epochs: 3,
        ..cfg.clone()
    };
    assert!(matches!(
        SasRec::train(&split.train, n, &blow_up, &mut quiet),
        Err(Error::NonFinite(_))
    ));
}

#[test]
fn config_files_use_defaults_and_reject_unknown_keys() {
    let c: SasRecConfig = toml::from_str("hidden = 32\nheads = 2").unwrap();
    assert_eq!(
        (c.hidden, c.heads, c.layers, c.max_len, c.epochs, c.batch),
        (32, 2, 2, 20, 30, 128)
    );
    assert_eq!(
        (c.dropout, c.lr, c.seed, c.window_stride, c.stride()),
        (0.2, 1e-3, 42, None, 10)
    );
    let c: SasRecConfig = toml::from_str("max_len = 7\nwindow_stride = 0").unwrap();
    assert_eq!(
        (
            c.stride(),
            SasRecConfig {
                window_stride: None,
                ..c
            }
            .stride()
        ),
        (0, 4)
    );
    assert!(toml::from_str::<SasRecConfig>("hiden = 32").is_err());
}

// ---------------------------------------------------------------------------------------------
// 5. ML-100K

fn ml100k() -> Option<ilrec::rec::data::Split> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/ml-100k");
    if !dir.join("ml-100k.inter").exists() {
        println!(
            "skipped: {} is absent (scripts/fetch-ml100k.sh)",
            dir.join("ml-100k.inter").display()
        );
        return None;
    }
    let ds = load_recbole(&dir, "ml-100k").unwrap();
    Some(leave_one_out(&ds, 20))
}

fn run_ml100k(cfg: &SasRecConfig) -> Option<(ilrec::rec::metrics::Metrics, ilrec::rec::metrics::Metrics, f64)> {
    let split = ml100k()?;
    let n_items = 1 + split
        .train
        .iter()
        .chain(&split.valid)
        .chain(&split.test)
        .flat_map(|s| s.history.iter().copied().chain([s.target]))
        .max()
        .unwrap() as usize;
    let start = Instant::now();
    let mut last = Instant::now();
    let mut times = Vec::new();
    let model = SasRec::train(&split.train, n_items, cfg, &mut |e, total, loss| {
        times.push(last.elapsed().as_secs_f64());
        last = Instant::now();
        println!("epoch {e}/{total}: loss {loss:.4} ({:.2} s)", times[times.len() - 1]);
    })
    .unwrap();
    let train_s = start.elapsed().as_secs_f64();
    let t = Instant::now();
    let valid = model.evaluate(&split.valid).unwrap();
    let test = model.evaluate(&split.test).unwrap();
    // Later epochs only (the first includes building the windows).
    let per_epoch = times.iter().skip(1).sum::<f64>() / (times.len() - 1).max(1) as f64;
    println!(
        "ML-100K SASRec {cfg:?}\n  {} items, {} users, {} training samples; train {train_s:.1} s, {per_epoch:.2} s/epoch; eval {:.2} s\n  valid Hit@10 {:.4} NDCG@10 {:.4} Hit@5 {:.4} NDCG@5 {:.4}\n  test  Hit@10 {:.4} NDCG@10 {:.4} Hit@5 {:.4} NDCG@5 {:.4}",
        n_items,
        split.test.len(),
        split.train.len(),
        t.elapsed().as_secs_f64() / 2.0,
        valid.hit10,
        valid.ndcg10,
        valid.hit5,
        valid.ndcg5,
        test.hit10,
        test.ndcg10,
        test.hit5,
        test.ndcg5
    );
    Some((valid, test, per_epoch))
}

/// A few epochs of the default config: well above chance (10 / 1682 = 0.006) already.
#[test]
fn ml100k_short_run() {
    let cfg = SasRecConfig {
        epochs: 3,
        ..SasRecConfig::default()
    };
    let Some((valid, test, _)) = run_ml100k(&cfg) else {
        return;
    };
    assert!(valid.hit10 > 0.03 && test.hit10 > 0.03, "{valid:?} {test:?}");
}

/// The default config (30 epochs), for docs/sasrec.md. `SASREC_EPOCHS` and
/// `SASREC_WINDOW_STRIDE` override the config for experiments.
#[test]
#[ignore = "trains the full default config on ML-100K (1.5-2.5 min on 2 cores)"]
fn ml100k_default_config() {
    let mut cfg = SasRecConfig::default();
    if let Some(e) = std::env::var("SASREC_EPOCHS").ok().and_then(|v| v.parse().ok()) {
        cfg.epochs = e;
    }
    if let Some(s) = std::env::var("SASREC_WINDOW_STRIDE").ok().and_then(|v| v.parse().ok()) {
        cfg.window_stride = Some(s);
    }
    let Some((valid, test, _)) = run_ml100k(&cfg) else {
        return;
    };
    assert!(valid.hit10 > 0.05 && test.hit10 > 0.05, "{valid:?} {test:?}");
}
