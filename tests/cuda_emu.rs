//! The CUDA backend end to end on the host emulator (`Cuda::emulated`, kernels/emu/README.md):
//! the same launchers, device model, training micro-batch and device beam search a GPU runs,
//! with every kernel executed from its source on the CPU and every launch checked against the
//! kernel's signature, launch bounds and the live allocations. Compared with the CPU backend by
//! the selftest's own end-to-end sections (engine/backend/cuda/selftest/), so a GPU run of
//! `ilrec selftest --full` starts from host code that has already run.
//!
//! Skips with one line when no C++ compiler is installed.
mod common;

use ilrec::backend::cuda::{selftest, Cuda};

fn emulated(test: &str) -> Option<Cuda> {
    if !ilrec::backend::cuda::emu::available() {
        common::skip(test, "no C++ compiler for the kernel emulator (set ILREC_EMU_CXX)");
        return None;
    }
    Some(Cuda::emulated().expect("opening the emulated CUDA device"))
}

fn assert_all_pass(rows: &[selftest::CheckRow]) {
    let failed: Vec<String> = rows.iter().filter(|r| !r.pass()).map(|r| format!("{} [{}]: {:.3e} > {:.0e}", r.kernel, r.shape, r.err, r.tol)).collect();
    assert!(!rows.is_empty(), "no checks ran");
    assert!(failed.is_empty(), "{} of {} checks failed:\n{}", failed.len(), rows.len(), failed.join("\n"));
}

/// Tiny Llama (GQA), Qwen2 (biases, untied head) and a head-dim-64 Llama (the flash-attention
/// path) on the emulated GPU against the CPU: forward logits, taps, probes, cached decoding, and
/// one LoRA training micro-batch under SFT and ILRec (loss and every gradient), f32 and bf16.
#[test]
fn model_forward_backward_and_decoding_match_the_cpu() {
    let Some(cuda) = emulated("model_forward_backward_and_decoding_match_the_cpu") else { return };
    let rows = selftest::run_sections(&cuda, 1, &["model"]).unwrap();
    assert_all_pass(&rows);
    // The device's memory is all returned once the models are dropped.
    assert_eq!(cuda.memory().in_use, 0, "device memory still in use after the checks");
}

/// The device beam search loop (prefill, masked top-k steps, KV reorders, one download) against
/// the CPU's flat search: same items in the same order, beams 1, 20 and 64.
#[test]
fn device_beam_search_matches_the_cpu() {
    let Some(cuda) = emulated("device_beam_search_matches_the_cpu") else { return };
    let rows = selftest::run_sections(&cuda, 2, &["decode"]).unwrap();
    assert_all_pass(&rows);
}

/// A launch the GPU would reject or misread is an error on the emulator too: a wrong argument
/// width, a pointer outside any allocation, a block above the kernel's launch bounds.
#[test]
fn launches_are_checked_against_the_kernels_signature() {
    use ilrec::backend::cuda::{Arg, DeviceTensor, Elem, Launch};
    let Some(cuda) = emulated("launches_are_checked_against_the_kernels_signature") else { return };
    let x = DeviceTensor::zeros(&cuda, &[64], Elem::F32, "x").unwrap();
    let y = DeviceTensor::zeros(&cuda, &[64], Elem::F32, "y").unwrap();
    let shape = || "[64]".to_string();
    // add_inplace_f32(float *acc, const float *x, uint64_t n)
    let run = |args: &[Arg], cfg: Launch| unsafe { cuda.launch("elementwise", "add_inplace_f32", cfg, args, &shape) };
    let ok = [Arg::Ptr(x.ptr()), Arg::Ptr(y.ptr()), Arg::U64(64)];
    run(&ok, Launch::elements(64)).expect("a correct launch");
    let msg = |r: ilrec::error::Result<()>| r.expect_err("must be rejected").to_string();
    let m = msg(run(&[Arg::Ptr(x.ptr()), Arg::Ptr(y.ptr()), Arg::U32(64)], Launch::elements(64)));
    assert!(m.contains("parameter 2") && m.contains("8-byte"), "{m}");
    let m = msg(run(&ok[..2], Launch::elements(64)));
    assert!(m.contains("takes 3 parameters"), "{m}");
    let m = msg(run(&[Arg::Ptr(x.ptr() + (1 << 40)), Arg::Ptr(y.ptr()), Arg::U64(64)], Launch::elements(64)));
    assert!(m.contains("not inside a live device allocation"), "{m}");
    // rms_norm_backward_dw_partial_f32(float *, const float *, const float *, const float *,
    // uint32_t rows, uint32_t h, uint32_t rows_per_chunk) has __launch_bounds__(256).
    let over = Launch { grid: (1, 1, 1), block: (512, 1, 1), shared_bytes: 0 };
    let p = Arg::Ptr(x.ptr());
    let args = [p, p, p, p, Arg::U32(1), Arg::U32(1), Arg::U32(1)];
    let m = msg(unsafe { cuda.launch("elementwise", "rms_norm_backward_dw_partial_f32", over, &args, &shape) });
    assert!(m.contains("__launch_bounds__ allows 256"), "{m}");
}

/// Every attention launcher (plain and flash, forward and backward) checks its operands before
/// launching: a wrong length, element type or cache layout is an error naming the kernel and
/// the operand, and correct operands of the same shapes pass.
#[test]
fn attention_launchers_check_their_operands() {
    use ilrec::backend::cpu::AttentionShape;
    use ilrec::backend::cuda::ops::attention as att;
    use ilrec::backend::cuda::{DeviceTensor, Elem};
    let Some(cuda) = emulated("attention_launchers_check_their_operands") else { return };
    let s = AttentionShape { batch: 2, tq: 3, past: 0, cap: 3, n_heads: 4, n_kv_heads: 2, head_dim: 64 };
    let t = |shape: &[usize], e: Elem| DeviceTensor::zeros(&cuda, shape, e, "operand").unwrap();
    let q_shape = [s.batch * s.tq, s.n_heads * s.head_dim];
    let kv_shape = [s.batch, s.n_kv_heads, s.cap, s.head_dim];
    let lse_shape = [s.batch, s.n_heads, s.tq];
    let mask = t(&[s.batch, s.cap], Elem::U8);
    let err = |r: ilrec::error::Result<()>| r.expect_err("must be rejected").to_string();
    for (e, flash) in [(Elem::F32, false), (Elem::BF16, false), (Elem::BF16, true)] {
        let (q, k, v) = (t(&q_shape, e), t(&kv_shape, e), t(&kv_shape, e));
        let out_elem = if flash { Elem::F32 } else { e };
        let (mut out, mut lse) = (t(&q_shape, out_elem), t(&lse_shape, Elem::F32));
        let fwd = |out: &mut DeviceTensor, lse: &mut DeviceTensor, k: &DeviceTensor, mask: &DeviceTensor, s: AttentionShape| match flash {
            true => att::flash_attention_forward(&cuda, out, lse, &q, k, &v, mask, s),
            false => att::attention_forward(&cuda, out, lse, &q, k, &v, mask, s),
        };
        fwd(&mut out, &mut lse, &k, &mask, s).expect("correct operands");
        let kernel = if flash { "flash_attn_fwd" } else { "attention_fwd" };
        let m = err(fwd(&mut out, &mut lse, &t(&[s.batch, s.n_kv_heads, s.cap + 1, s.head_dim], e), &mask, s));
        assert!(m.contains(kernel) && m.contains("`k`"), "{m}");
        let m = err(fwd(&mut out, &mut lse, &k, &t(&[s.batch, s.cap], Elem::F32), s));
        assert!(m.contains(kernel) && m.contains("key_mask"), "{m}");
        let m = err(fwd(&mut out, &mut t(&[s.batch, s.n_heads, s.tq + 1], Elem::F32), &k, &mask, s));
        assert!(m.contains(kernel) && m.contains("lse"), "{m}");

        let (mut dq, mut dk, dout) = (t(&q_shape, Elem::F32), t(&kv_shape, Elem::F32), t(&q_shape, Elem::F32));
        let bwd = |dq: &mut DeviceTensor, dk: &mut DeviceTensor, dout: &DeviceTensor, s: AttentionShape| match flash {
            true => att::flash_attention_backward(&cuda, dq, dk, &mut t(&kv_shape, Elem::F32), dout, &q, &k, &v, &out, &lse, &mask, s),
            false => att::attention_backward(&cuda, dq, dk, &mut t(&kv_shape, Elem::F32), dout, &q, &k, &v, &out, &lse, &mask, s),
        };
        bwd(&mut dq, &mut dk, &dout, s).expect("correct operands");
        let kernel = if flash { "flash_attn_bwd" } else { "attention_bwd" };
        let m = err(bwd(&mut dq, &mut dk, &t(&q_shape, Elem::BF16), s));
        assert!(m.contains(kernel) && m.contains("dout"), "{m}");
        let m = err(bwd(&mut dq, &mut t(&[1], Elem::F32), &dout, s));
        assert!(m.contains(kernel) && m.contains("dk"), "{m}");
        let m = err(bwd(&mut dq, &mut dk, &dout, AttentionShape { past: 1, cap: 4, ..s }));
        assert!(m.contains(kernel) && m.contains("past == 0"), "{m}");
    }
}

/// Steps of a training run with everything on the (emulated) GPU: micro-batches, gradient
/// clipping and AdamW on parameters resident on the device. Against the CPU trainer on the same
/// run (f32 weights, ILRec, two micro-batches per step, trainable token rows): the same losses
/// and parameters, to f32 rounding. Then exact resume: a run checkpointed after step 2 (its
/// moments read back from the device) and resumed in a fresh trainer reaches the uninterrupted
/// run's step-3 parameters bit for bit. Timing the step against SFT in between (on its own
/// device copy) changes nothing.
#[test]
fn device_training_steps_match_the_cpu_trainer_and_resume_exactly() {
    use ilrec::backend::cuda::Elem;
    use ilrec::train::backprop::Objective;
    use ilrec::train::loss::IlrecParams;
    use ilrec::train::trainer::{TrainConfig, Trainer};
    use ilrec::Model;
    let Some(cuda) = emulated("device_training_steps_match_the_cpu_trainer_and_resume_exactly") else { return };
    let (data, items) = common::train_samples();
    let cfg = TrainConfig {
        lora_rank: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.0,
        lr: 5e-3,
        weight_decay: 0.01,
        max_grad_norm: 0.5,
        warmup_ratio: 0.0,
        epochs: 10.0,
        micro_batch: 2,
        grad_accum: 2,
        seed: 11,
        ..Default::default()
    };
    let obj = Objective::Ilrec { params: IlrecParams { mu: 0.0, ..Default::default() }, layers: vec![1, 2], candidates: items.clone() };
    let trainable = vec![204, 205, 2];
    let params = |tr: &Trainer| -> Vec<f32> { tr.lora.named().into_iter().flat_map(|(_, _, d)| d.to_vec()).collect() };
    // `None`: the CPU trainer; else the device trainer with weights of that type.
    let start = |weights: Option<Elem>| {
        let model = Model::load(&common::fixture("tiny-llama")).unwrap();
        let mut tr = Trainer::new(&model, cfg.clone(), data.len(), trainable.clone()).unwrap();
        if let Some(e) = weights {
            tr.use_cuda(&cuda, &model, e).unwrap();
        }
        (model, tr)
    };
    let (mut cpu_model, mut cpu) = start(None);
    let (mut gpu_model, mut gpu) = start(Some(Elem::F32));
    let tmp = tempfile::tempdir().unwrap();
    for step in 1..=3 {
        let want = cpu.train_step(&mut cpu_model, &data, &obj).unwrap();
        let got = gpu.train_step(&mut gpu_model, &data, &obj).unwrap();
        let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-12);
        assert!(rel(got.stats.loss, want.stats.loss) < 1e-5, "step {step}: loss {} vs CPU {}", got.stats.loss, want.stats.loss);
        assert!(rel(got.grad_norm as f64, want.grad_norm as f64) < 1e-4, "step {step}: grad norm {} vs CPU {}", got.grad_norm, want.grad_norm);
        let e = common::rel_err(&params(&gpu), &params(&cpu), |_| true);
        assert!(e < 1e-4, "step {step}: LoRA parameters differ from the CPU trainer's by {e:.3e}");
        let rows = |m: &Model| -> Vec<f32> {
            let h = m.config.hidden_size;
            trainable.iter().flat_map(|&t| m.embed[t as usize * h..][..h].to_vec()).collect()
        };
        let e = common::rel_err(&rows(&gpu_model), &rows(&cpu_model), |_| true);
        assert!(e < 1e-4, "step {step}: trainable embedding rows differ from the CPU trainer's by {e:.3e}");
        if step == 2 {
            gpu.save(tmp.path()).unwrap();
            // Timing against SFT runs on its own device copy: the run goes on as if untouched
            // (step 3 must still match the CPU and the resumed run).
            let before = params(&gpu);
            let cost = gpu.time_against_sft(&gpu_model, &data, &obj, 1).unwrap();
            assert!(cost.objective_s > 0.0 && cost.sft_s > 0.0 && cost.tokens > 0, "{cost:?}");
            assert_eq!(params(&gpu), before, "timing changed the run's parameters");
        }
    }
    let resume_step3 = |weights: Elem, dir: &std::path::Path| {
        let (mut model, mut resumed) = start(Some(weights));
        assert!(resumed.resume(&mut model, dir).unwrap(), "no checkpoint to resume from");
        assert_eq!(resumed.step_count(), 2);
        resumed.train_step(&mut model, &data, &obj).unwrap();
        params(&resumed)
    };
    assert_eq!(resume_step3(Elem::F32, tmp.path()), params(&gpu), "the resumed device run's step-3 parameters differ from the uninterrupted run's");

    // bf16 weights: the fused kernels, which keep the adapter's bf16 copies across a step's
    // micro-batches; a resumed run starts from fresh copies, so stale ones would show here.
    let (mut model, mut run) = start(Some(Elem::BF16));
    let tmp16 = tempfile::tempdir().unwrap();
    for step in 1..=3 {
        run.train_step(&mut model, &data, &obj).unwrap();
        if step == 2 {
            run.save(tmp16.path()).unwrap();
        }
    }
    assert_eq!(resume_step3(Elem::BF16, tmp16.path()), params(&run), "bf16 weights: the resumed device run's step-3 parameters differ from the uninterrupted run's");
}
