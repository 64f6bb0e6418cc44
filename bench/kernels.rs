//! Per-kernel throughput at SmolLM2-135M shapes (hidden 576, FFN 1536, 9 heads / 3 KV heads of 64,
//! vocab 49152; batch 8 x seq 128 = 1024 tokens): every op family on the CPU reference (f32) and,
//! when a GPU opens, on CUDA (bf16 activations, f32 statistics, gradients and optimiser state).
//!
//! Memory-bound ops report bytes/s (`Throughput::Bytes`: each input read once, each output written
//! once, the floor of what must move); GEMMs and attention report FLOP/s as criterion's "elem/s"
//! in the groups named `*_FLOP` (GEMM 2*M*N*K; causal attention forward 4*B*S^2*H*D/2, backward
//! 2.5x that). CUDA timings include `cuda.sync()` in the timed closure: launches are asynchronous.
//!
//! `cargo bench --bench kernels` (a few minutes on 2 cores); scripts/gpu-check.sh runs it on the
//! GPU machine. Without a GPU the CUDA benches are skipped with one line.
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkGroup, Criterion, SamplingMode, Throughput};
use criterion::measurement::WallTime;
use ilrec::backend::cpu::{self, AttentionShape};
use ilrec::backend::cuda::ops::{self, attention, elementwise, embedding, optim, softmax, Gemm};
use ilrec::backend::cuda::{Cuda, DeviceTensor, Elem};
use ilrec::rng::Rng;
use ilrec::train::loss::sft_loss;
use ilrec::train::optim::{AdamW, Optimizer, ParamRef};
use std::time::Duration;

const BATCH: usize = 8;
const SEQ: usize = 128;
const TOKENS: usize = BATCH * SEQ;
const HIDDEN: usize = 576;
const FFN: usize = 1536;
const HEADS: usize = 9;
const KV_HEADS: usize = 3;
const HEAD_DIM: usize = 64;
const VOCAB: usize = 49152;
/// LoRA r = 16 on q, k, v, o, gate, up, down of all 30 blocks: the trainable parameters AdamW updates.
const LORA_PARAMS: usize = 30 * 16 * ((HIDDEN + HIDDEN) * 2 + (HIDDEN + KV_HEADS * HEAD_DIM) * 2 + (HIDDEN + FFN) * 3);
const EPS: f32 = 1e-5;
const ROPE_THETA: f32 = 100_000.0;

/// The dense GEMMs of one training step: (name, m, n, k, transposes). Linear layers are `x @ W^T`.
const GEMMS: [(&str, usize, usize, usize, Gemm); 6] = [
    ("qkv proj NT", TOKENS, HIDDEN + 2 * KV_HEADS * HEAD_DIM, HIDDEN, Gemm::NT),
    ("gate+up proj NT", TOKENS, 2 * FFN, HIDDEN, Gemm::NT),
    ("down proj NT", TOKENS, HIDDEN, FFN, Gemm::NT),
    ("lm head NT", TOKENS, VOCAB, HIDDEN, Gemm::NT),
    ("down dX NN", TOKENS, FFN, HIDDEN, Gemm::NN),
    ("down dW TN", HIDDEN, FFN, TOKENS, Gemm::TN),
];

fn attn_shape() -> AttentionShape {
    AttentionShape { batch: BATCH, tq: SEQ, past: 0, cap: SEQ, n_heads: HEADS, n_kv_heads: KV_HEADS, head_dim: HEAD_DIM }
}

/// Causal attention forward FLOPs: 4*B*S^2*H*D, halved for the causal triangle.
fn attn_fwd_flops() -> u64 {
    (4 * BATCH * SEQ * SEQ * HEADS * HEAD_DIM / 2) as u64
}

/// Random data, never zeros (zeros can run faster than real data and hide unwritten outputs).
fn random(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| (rng.next_f32() * 2.0 - 1.0) * scale).collect()
}

fn tokens(rng: &mut Rng, n: usize) -> Vec<u32> {
    (0..n).map(|_| rng.below(VOCAB) as u32).collect()
}

fn rope_tables() -> (Vec<f32>, Vec<f32>) {
    let positions: Vec<usize> = (0..TOKENS).map(|i| i % SEQ).collect();
    cpu::rope_tables(&positions, HEAD_DIM, ROPE_THETA)
}

fn bytes(n: usize) -> Throughput {
    Throughput::Bytes(n as u64)
}

fn kernels(c: &mut Criterion) {
    println!(
        "H100 SXM peaks for context: 989 TFLOP/s dense bf16 (~800 achievable), 3.35 TB/s HBM; \
         FLOP groups report FLOP/s as elem/s"
    );
    cpu_memory(c);
    cpu_flop(c);
    match open_cuda() {
        Ok(cuda) => {
            cuda_memory(c, &cuda);
            cuda_flop(c, &cuda);
        }
        Err(why) => println!("cuda benches skipped: {why}"),
    }
}

fn open_cuda() -> Result<Cuda, String> {
    if !Cuda::has_kernels() {
        return Err("this build embedded no CUDA kernels (built without nvcc)".into());
    }
    Cuda::new(0).map_err(|e| e.to_string())
}

// ---------------------------------------------------------------- CPU (f32 reference)

fn cpu_memory(c: &mut Criterion) {
    let mut rng = Rng::new(1);
    let mut g = c.benchmark_group("cpu_bytes");
    let f = 4; // bytes per f32

    let x = random(&mut rng, TOKENS * HIDDEN, 2.0);
    let w = random(&mut rng, HIDDEN, 1.0);
    let mut y = vec![0.0f32; TOKENS * HIDDEN];
    g.throughput(bytes((2 * TOKENS * HIDDEN + HIDDEN) * f));
    g.bench_function(format!("rms_norm {TOKENS}x{HIDDEN}"), |b| b.iter(|| cpu::rms_norm(&mut y, &x, &w, EPS)));
    let dy = random(&mut rng, TOKENS * HIDDEN, 1.0);
    g.throughput(bytes((4 * TOKENS * HIDDEN + HIDDEN) * f));
    g.bench_function(format!("rms_norm_backward {TOKENS}x{HIDDEN}"), |b| {
        b.iter(|| cpu::rms_norm_backward(&mut y, &dy, &x, &w, EPS))
    });

    let (cos, sin) = rope_tables();
    let mut q = random(&mut rng, TOKENS * HEADS * HEAD_DIM, 1.0);
    g.throughput(bytes((2 * q.len() + 2 * cos.len()) * f));
    g.bench_function(format!("rope {TOKENS}x{HEADS}x{HEAD_DIM}"), |b| {
        b.iter(|| cpu::rope_inplace(&mut q, HEADS, HEAD_DIM, &cos, &sin))
    });

    let n = TOKENS * FFN;
    let gate0 = random(&mut rng, n, 4.0);
    let up = random(&mut rng, n, 1.0);
    g.throughput(bytes(3 * n * f));
    // In place: a fresh copy of the gate per iteration (made outside the timing).
    g.bench_function(format!("swiglu {TOKENS}x{FFN}"), |b| {
        b.iter_batched_ref(|| gate0.clone(), |gate| cpu::silu_mul(gate, &up), BatchSize::LargeInput)
    });
    let da = random(&mut rng, n, 1.0);
    let (mut dg, mut du) = (vec![0.0f32; n], vec![0.0f32; n]);
    g.throughput(bytes(5 * n * f));
    g.bench_function(format!("swiglu_backward {TOKENS}x{FFN}"), |b| {
        b.iter(|| cpu::silu_mul_backward(&mut dg, &mut du, &da, &gate0, &up))
    });

    let mut p = random(&mut rng, LORA_PARAMS, 0.02);
    let grad = random(&mut rng, LORA_PARAMS, 1e-3);
    let mut opt = Optimizer::new(AdamW::default(), &[("lora", &[LORA_PARAMS])]).expect("optimizer");
    g.throughput(bytes(7 * LORA_PARAMS * f));
    g.bench_function(format!("adamw {LORA_PARAMS} params"), |b| {
        b.iter(|| {
            let mut params = [ParamRef { name: "lora", values: &mut p, grad: &grad, decay: true }];
            opt.step(&mut params, 1e-3).expect("adamw step")
        })
    });
    drop((p, grad, opt));

    let logits = random(&mut rng, TOKENS * VOCAB, 8.0);
    let targets = tokens(&mut rng, TOKENS);
    g.sampling_mode(SamplingMode::Flat);
    g.throughput(bytes(2 * TOKENS * VOCAB * f));
    g.bench_function(format!("softmax_ce {TOKENS}x{VOCAB}"), |b| {
        b.iter(|| sft_loss(&logits, VOCAB, &targets, TOKENS as f64).expect("sft loss"))
    });
    g.finish();
}

fn cpu_flop(c: &mut Criterion) {
    let mut rng = Rng::new(2);
    let mut g = c.benchmark_group("cpu_FLOP");
    g.sampling_mode(SamplingMode::Flat);
    for (name, m, n, k, op) in GEMMS {
        // Operands in the layouts of the transposes: A [m, k] (or [k, m]), B [n, k] (or [k, n]).
        let a = random(&mut rng, m * k, 1.0);
        let w = random(&mut rng, n * k, 0.05);
        let mut y = vec![0.0f32; m * n];
        g.throughput(Throughput::Elements((2 * m * n * k) as u64));
        g.bench_function(format!("gemm {name} {m}x{n}x{k}"), |b| {
            b.iter(|| match (op.trans_a, op.trans_b) {
                (false, true) => cpu::matmul_nt(&mut y, n, &a, k, &w, k, m, n, k, false),
                (false, false) => cpu::matmul_nn(&mut y, n, &a, k, &w, n, m, n, k, false),
                _ => cpu::matmul_tn(&mut y, n, &a, m, &w, n, m, n, k, false),
            })
        });
    }

    let s = attn_shape();
    let q = random(&mut rng, TOKENS * HEADS * HEAD_DIM, 1.0);
    let k = random(&mut rng, BATCH * KV_HEADS * SEQ * HEAD_DIM, 1.0);
    let v = random(&mut rng, k.len(), 1.0);
    let mask = vec![true; BATCH * SEQ];
    let mut out = vec![0.0f32; q.len()];
    let id = format!("attention causal b{BATCH} s{SEQ} h{HEADS}/{KV_HEADS} d{HEAD_DIM}");
    g.throughput(Throughput::Elements(attn_fwd_flops()));
    g.bench_function(format!("{id} fwd"), |b| b.iter(|| cpu::attention(&mut out, &q, &k, &v, &mask, s)));
    let dout = random(&mut rng, q.len(), 1.0);
    let (mut dq, mut dk, mut dv) = (vec![0.0f32; q.len()], vec![0.0f32; k.len()], vec![0.0f32; k.len()]);
    g.throughput(Throughput::Elements(attn_fwd_flops() * 5 / 2));
    g.bench_function(format!("{id} bwd"), |b| {
        b.iter(|| cpu::attention_backward(&mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &mask, s))
    });
    g.finish();
}

// ---------------------------------------------------------------- CUDA (bf16 activations)

/// Benches `launch` (followed by a sync) under `id`, after one checked call; a launcher that
/// fails is reported in one line and skipped, so one broken kernel does not hide the others.
fn cuda_bench(g: &mut BenchmarkGroup<'_, WallTime>, cuda: &Cuda, id: String, mut launch: impl FnMut() -> ilrec::Result<()>) {
    if let Err(e) = launch().and_then(|()| cuda.sync()) {
        println!("cuda bench `{id}` skipped: {e}");
        return;
    }
    g.bench_function(id, |b| {
        b.iter(|| {
            launch().expect("launch");
            cuda.sync().expect("sync")
        })
    });
}

fn cuda_memory(c: &mut Criterion, cuda: &Cuda) {
    if let Err(e) = cuda_memory_benches(c, cuda) {
        println!("cuda memory-bound benches stopped: {e}");
    }
}

fn cuda_memory_benches(c: &mut Criterion, cuda: &Cuda) -> ilrec::Result<()> {
    let mut rng = Rng::new(3);
    let mut g = c.benchmark_group("cuda_bytes");
    let (f, h) = (4, 2); // bytes per f32, per bf16

    let x = DeviceTensor::from_f32_as_bf16(cuda, &[TOKENS, HIDDEN], &random(&mut rng, TOKENS * HIDDEN, 2.0), "x")?;
    let w = DeviceTensor::from_f32_as_bf16(cuda, &[HIDDEN], &random(&mut rng, HIDDEN, 1.0), "w")?;
    let mut y = DeviceTensor::empty(cuda, &[TOKENS, HIDDEN], Elem::BF16, "y")?;
    let mut rstd = DeviceTensor::empty(cuda, &[TOKENS], Elem::F32, "rstd")?;
    g.throughput(bytes(2 * TOKENS * HIDDEN * h + HIDDEN * h + TOKENS * f));
    cuda_bench(&mut g, cuda, format!("rms_norm bf16 {TOKENS}x{HIDDEN}"), || {
        elementwise::rms_norm(cuda, &mut y, &x, &w, Some(&mut rstd), EPS)
    });
    let dy = DeviceTensor::from_f32(cuda, &[TOKENS, HIDDEN], &random(&mut rng, TOKENS * HIDDEN, 1.0), "dy")?;
    let mut dx = DeviceTensor::from_f32(cuda, &[TOKENS, HIDDEN], &random(&mut rng, TOKENS * HIDDEN, 1.0), "dx")?;
    g.throughput(bytes(3 * TOKENS * HIDDEN * f + TOKENS * HIDDEN * h + HIDDEN * h));
    cuda_bench(&mut g, cuda, format!("rms_norm_backward_dx {TOKENS}x{HIDDEN}"), || {
        elementwise::rms_norm_backward_dx(cuda, &mut dx, &dy, &x, &w, None, EPS)
    });
    drop((x, w, y, rstd, dy, dx));

    let (cos, sin) = rope_tables();
    let half = cos.len();
    let cos = DeviceTensor::from_f32(cuda, &[TOKENS, HEAD_DIM / 2], &cos, "cos")?;
    let sin = DeviceTensor::from_f32(cuda, &[TOKENS, HEAD_DIM / 2], &sin, "sin")?;
    let nq = TOKENS * HEADS * HEAD_DIM;
    let mut q = DeviceTensor::from_f32_as_bf16(cuda, &[TOKENS, HEADS * HEAD_DIM], &random(&mut rng, nq, 1.0), "q")?;
    g.throughput(bytes(2 * nq * h + 2 * half * f));
    cuda_bench(&mut g, cuda, format!("rope bf16 {TOKENS}x{HEADS}x{HEAD_DIM}"), || {
        elementwise::rope(cuda, &mut q, elementwise::RopeTables { cos: &cos, sin: &sin, pos: None }, HEADS, HEAD_DIM)
    });
    drop((cos, sin, q));

    let n = TOKENS * FFN;
    let gate = DeviceTensor::from_f32_as_bf16(cuda, &[n], &random(&mut rng, n, 4.0), "gate")?;
    let up = DeviceTensor::from_f32_as_bf16(cuda, &[n], &random(&mut rng, n, 1.0), "up")?;
    let mut act = DeviceTensor::empty(cuda, &[n], Elem::BF16, "act")?;
    g.throughput(bytes(3 * n * h));
    cuda_bench(&mut g, cuda, format!("swiglu bf16 {TOKENS}x{FFN}"), || elementwise::swiglu(cuda, &mut act, &gate, &up));
    let da = DeviceTensor::from_f32(cuda, &[n], &random(&mut rng, n, 1.0), "da")?;
    let mut dg = DeviceTensor::empty(cuda, &[n], Elem::F32, "dg")?;
    let mut du = DeviceTensor::empty(cuda, &[n], Elem::F32, "du")?;
    g.throughput(bytes(3 * n * f + 2 * n * h));
    cuda_bench(&mut g, cuda, format!("swiglu_backward {TOKENS}x{FFN}"), || {
        elementwise::swiglu_backward(cuda, &mut dg, &mut du, &da, &gate, &up)
    });
    drop((gate, up, act, da, dg, du));

    let wide = DeviceTensor::from_f32(cuda, &[n], &random(&mut rng, n, 3.0), "cast f32 in")?;
    let mut narrow = DeviceTensor::empty(cuda, &[n], Elem::BF16, "cast bf16 out")?;
    g.throughput(bytes(n * (f + h)));
    cuda_bench(&mut g, cuda, format!("cast f32->bf16 {n}"), || elementwise::cast(cuda, &mut narrow, &wide));
    let mut back = DeviceTensor::empty(cuda, &[n], Elem::F32, "cast f32 out")?;
    cuda_bench(&mut g, cuda, format!("cast bf16->f32 {n}"), || elementwise::cast(cuda, &mut back, &narrow));
    drop((wide, narrow, back));

    let table = DeviceTensor::from_f32_as_bf16(cuda, &[VOCAB, HIDDEN], &random(&mut rng, VOCAB * HIDDEN, 1.0), "embedding")?;
    let ids = DeviceTensor::from_u32(cuda, &[TOKENS], &tokens(&mut rng, TOKENS), "tokens")?;
    let mut emb = DeviceTensor::empty(cuda, &[TOKENS, HIDDEN], Elem::BF16, "embedded")?;
    g.throughput(bytes(2 * TOKENS * HIDDEN * h + TOKENS * 4));
    cuda_bench(&mut g, cuda, format!("embedding gather bf16 {TOKENS}x{HIDDEN} of {VOCAB}"), || {
        embedding::gather(cuda, &mut emb, &table, &ids)
    });
    drop((table, ids, emb));

    let mut p = DeviceTensor::from_f32(cuda, &[LORA_PARAMS], &random(&mut rng, LORA_PARAMS, 0.02), "params")?;
    let grad = DeviceTensor::from_f32(cuda, &[LORA_PARAMS], &random(&mut rng, LORA_PARAMS, 1e-3), "grads")?;
    let mut m = DeviceTensor::from_f32(cuda, &[LORA_PARAMS], &random(&mut rng, LORA_PARAMS, 1e-4), "exp_avg")?;
    let mut v = DeviceTensor::from_f32(cuda, &[LORA_PARAMS], &random(&mut rng, LORA_PARAMS, 1e-6).iter().map(|x| x.abs()).collect::<Vec<_>>(), "exp_avg_sq")?;
    let s = optim::AdamWScalars::from_config(&AdamW::default(), 1e-3, 10, true);
    g.throughput(bytes(7 * LORA_PARAMS * f));
    cuda_bench(&mut g, cuda, format!("adamw f32 {LORA_PARAMS} params"), || optim::adamw_step(cuda, &mut p, &grad, &mut m, &mut v, &s));
    drop((p, grad, m, v));

    let logits = DeviceTensor::from_f32_as_bf16(cuda, &[TOKENS, VOCAB], &random(&mut rng, TOKENS * VOCAB, 8.0), "logits")?;
    let targets = softmax::Targets::new(cuda, &tokens(&mut rng, TOKENS), VOCAB)?;
    let mut loss = DeviceTensor::empty(cuda, &[TOKENS], Elem::F64, "loss")?;
    let mut dlogits = DeviceTensor::empty(cuda, &[TOKENS, VOCAB], Elem::F32, "dlogits")?;
    g.throughput(bytes(TOKENS * VOCAB * (h + f) + TOKENS * (8 + 4)));
    cuda_bench(&mut g, cuda, format!("softmax_ce bf16->f32 grad {TOKENS}x{VOCAB}"), || {
        softmax::softmax_ce(cuda, &mut loss, Some(&mut dlogits), &logits, &targets, 1.0 / TOKENS as f64)
    });
    g.finish();
    Ok(())
}

fn cuda_flop(c: &mut Criterion, cuda: &Cuda) {
    if let Err(e) = cuda_flop_benches(c, cuda) {
        println!("cuda FLOP benches stopped: {e}");
    }
}

fn cuda_flop_benches(c: &mut Criterion, cuda: &Cuda) -> ilrec::Result<()> {
    let mut rng = Rng::new(4);
    let mut g = c.benchmark_group("cuda_FLOP");
    for (name, m, n, k, op) in GEMMS {
        let a_shape = if op.trans_a { [k, m] } else { [m, k] };
        let b_shape = if op.trans_b { [n, k] } else { [k, n] };
        let a = DeviceTensor::from_f32_as_bf16(cuda, &a_shape, &random(&mut rng, m * k, 1.0), "A")?;
        let b = DeviceTensor::from_f32_as_bf16(cuda, &b_shape, &random(&mut rng, n * k, 0.05), "B")?;
        let mut y = DeviceTensor::empty(cuda, &[m, n], Elem::BF16, "C")?;
        g.throughput(Throughput::Elements((2 * m * n * k) as u64));
        let used = ops::matmul(cuda, &mut y, &a, &b, op).map(|i| format!("{i:?}")).unwrap_or_else(|_| "error".into());
        cuda_bench(&mut g, cuda, format!("gemm bf16 {name} {m}x{n}x{k} ({used})"), || ops::matmul(cuda, &mut y, &a, &b, op).map(|_| ()));
        if used == "Cublas" && matches!(name, "lm head NT" | "gate+up proj NT") {
            cuda_bench(&mut g, cuda, format!("gemm bf16 {name} {m}x{n}x{k} (hand-written fallback)"), || {
                ops::fallback_gemm(cuda, &mut y, &a, &b, op)
            });
        }
    }
    // The ceiling measured in the same run (METHOD: use measured ceilings, not the datasheet).
    let big = 8192;
    let a = DeviceTensor::from_f32_as_bf16(cuda, &[big, big], &random(&mut rng, big * big, 1.0), "A")?;
    let b = DeviceTensor::from_f32_as_bf16(cuda, &[big, big], &random(&mut rng, big * big, 0.05), "B")?;
    let mut y = DeviceTensor::empty(cuda, &[big, big], Elem::BF16, "C")?;
    g.throughput(Throughput::Elements(2 * (big as u64).pow(3)));
    let used = ops::matmul(cuda, &mut y, &a, &b, Gemm::NT).map(|i| format!("{i:?}")).unwrap_or_else(|_| "error".into());
    cuda_bench(&mut g, cuda, format!("gemm bf16 ceiling {big}x{big}x{big} NT ({used})"), || {
        ops::matmul(cuda, &mut y, &a, &b, Gemm::NT).map(|_| ())
    });
    drop((a, b, y));

    let s = attn_shape();
    let nq = TOKENS * HEADS * HEAD_DIM;
    let nkv = BATCH * KV_HEADS * SEQ * HEAD_DIM;
    let q = DeviceTensor::from_f32_as_bf16(cuda, &[TOKENS, HEADS * HEAD_DIM], &random(&mut rng, nq, 1.0), "q")?;
    let k = DeviceTensor::from_f32_as_bf16(cuda, &[BATCH, KV_HEADS, SEQ, HEAD_DIM], &random(&mut rng, nkv, 1.0), "k")?;
    let v = DeviceTensor::from_f32_as_bf16(cuda, &[BATCH, KV_HEADS, SEQ, HEAD_DIM], &random(&mut rng, nkv, 1.0), "v")?;
    let mask = DeviceTensor::from_u8(cuda, &[BATCH, SEQ], &vec![1u8; BATCH * SEQ], "key_mask")?;
    let mut out = DeviceTensor::empty(cuda, &[TOKENS, HEADS * HEAD_DIM], Elem::BF16, "out")?;
    let mut lse = DeviceTensor::empty(cuda, &[BATCH, HEADS, SEQ], Elem::F32, "lse")?;
    let id = format!("attention bf16 causal b{BATCH} s{SEQ} h{HEADS}/{KV_HEADS} d{HEAD_DIM}");
    g.throughput(Throughput::Elements(attn_fwd_flops()));
    cuda_bench(&mut g, cuda, format!("{id} fwd"), || attention::attention_forward(cuda, &mut out, &mut lse, &q, &k, &v, &mask, s));
    let dout = DeviceTensor::from_f32(cuda, &[TOKENS, HEADS * HEAD_DIM], &random(&mut rng, nq, 1.0), "dout")?;
    let mut dq = DeviceTensor::empty(cuda, &[TOKENS, HEADS * HEAD_DIM], Elem::F32, "dq")?;
    let mut dk = DeviceTensor::empty(cuda, &[BATCH, KV_HEADS, SEQ, HEAD_DIM], Elem::F32, "dk")?;
    let mut dv = DeviceTensor::empty(cuda, &[BATCH, KV_HEADS, SEQ, HEAD_DIM], Elem::F32, "dv")?;
    g.throughput(Throughput::Elements(attn_fwd_flops() * 5 / 2));
    cuda_bench(&mut g, cuda, format!("{id} bwd"), || {
        attention::attention_backward(cuda, &mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse, &mask, s)
    });
    g.finish();
    Ok(())
}

criterion_group! {
    name = benches;
    // Short defaults so `cargo bench --bench kernels` takes minutes on 2 cores; command-line
    // flags (--warm-up-time, --measurement-time) override them.
    config = Criterion::default().sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(2));
    targets = kernels, flash_attention, beam_decode, lora_linear, loss_probe
}
criterion_main!(benches);

// ---------------------------------------------------------------- flash attention (issue 6)

/// The fused attention kernels at the shapes: B*S = 16k tokens, S in {512 .. 8192},
/// head dim 64 (32 heads) and 128 (16 heads), causal, no padding, forward and backward, as
/// FLOP/s (elem/s; forward 4*B*S^2*H*D/2, backward 2.5x); and decoding (20 beams, one new token
/// against 512 and 2048 cached, SmolLM2's 9/3 heads of 64) as bytes/s of K/V read.
/// scripts/perf/gpu_attention.py reads these rows beside torch SDPA on the same machine.
/// Ids: `flash_attention/{fwd,bwd} s{S} b{B} h{H} d{D}`, `flash_attention/decode beams20 past{P}`.
fn flash_attention(c: &mut Criterion) {
    let cuda = match open_cuda() {
        Ok(cuda) => cuda,
        Err(why) => {
            println!("flash attention benches skipped: {why}");
            return;
        }
    };
    if let Err(e) = flash_attention_benches(c, &cuda) {
        println!("flash attention benches stopped: {e}");
    }
}

fn flash_attention_benches(c: &mut Criterion, cuda: &Cuda) -> ilrec::Result<()> {
    let mut rng = Rng::new(6);
    let mut g = c.benchmark_group("flash_attention");
    g.sampling_mode(SamplingMode::Flat);
    for d in [64usize, 128] {
        let heads = 2048 / d;
        for seq in [512usize, 1024, 2048, 4096, 8192] {
            let batch = 16384 / seq;
            let s = AttentionShape { batch, tq: seq, past: 0, cap: seq, n_heads: heads, n_kv_heads: heads, head_dim: d };
            let (nq, q_shape, kv_shape) = (batch * seq * heads * d, [batch * seq, heads * d], [batch, heads, seq, d]);
            let q = DeviceTensor::from_f32_as_bf16(cuda, &q_shape, &random(&mut rng, nq, 1.0), "q")?;
            let k = DeviceTensor::from_f32_as_bf16(cuda, &kv_shape, &random(&mut rng, nq, 1.0), "k")?;
            let v = DeviceTensor::from_f32_as_bf16(cuda, &kv_shape, &random(&mut rng, nq, 1.0), "v")?;
            let mask = DeviceTensor::from_u8(cuda, &[batch, seq], &vec![1u8; batch * seq], "key_mask")?;
            let mut out = DeviceTensor::empty(cuda, &q_shape, Elem::F32, "out")?;
            let mut lse = DeviceTensor::empty(cuda, &[batch, heads, seq], Elem::F32, "lse")?;
            let fwd_flops = (4 * batch * seq * seq * heads * d / 2) as u64;
            let id = format!("s{seq} b{batch} h{heads} d{d}");
            g.throughput(Throughput::Elements(fwd_flops));
            cuda_bench(&mut g, cuda, format!("fwd {id}"), || attention::flash_attention_forward(cuda, &mut out, &mut lse, &q, &k, &v, &mask, s));
            let dout = DeviceTensor::from_f32(cuda, &q_shape, &random(&mut rng, nq, 1.0), "dout")?;
            let mut dq = DeviceTensor::empty(cuda, &q_shape, Elem::F32, "dq")?;
            let mut dk = DeviceTensor::empty(cuda, &kv_shape, Elem::F32, "dk")?;
            let mut dv = DeviceTensor::empty(cuda, &kv_shape, Elem::F32, "dv")?;
            g.throughput(Throughput::Elements(fwd_flops * 5 / 2));
            cuda_bench(&mut g, cuda, format!("bwd {id}"), || {
                attention::flash_attention_backward(cuda, &mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse, &mask, s)
            });
        }
    }
    let beams = 20;
    for past in [512usize, 2048] {
        let cap = past + 1;
        let s = AttentionShape { batch: beams, tq: 1, past, cap, n_heads: HEADS, n_kv_heads: KV_HEADS, head_dim: HEAD_DIM };
        let nkv = beams * KV_HEADS * cap * HEAD_DIM;
        let q = DeviceTensor::from_f32_as_bf16(cuda, &[beams, HEADS * HEAD_DIM], &random(&mut rng, beams * HEADS * HEAD_DIM, 1.0), "q")?;
        let k = DeviceTensor::from_f32_as_bf16(cuda, &[beams, KV_HEADS, cap, HEAD_DIM], &random(&mut rng, nkv, 1.0), "k")?;
        let v = DeviceTensor::from_f32_as_bf16(cuda, &[beams, KV_HEADS, cap, HEAD_DIM], &random(&mut rng, nkv, 1.0), "v")?;
        let mask = DeviceTensor::from_u8(cuda, &[beams, cap], &vec![1u8; beams * cap], "key_mask")?;
        let mut out = DeviceTensor::empty(cuda, &[beams, HEADS * HEAD_DIM], Elem::F32, "out")?;
        let mut lse = DeviceTensor::empty(cuda, &[beams, HEADS, 1], Elem::F32, "lse")?;
        g.throughput(bytes(2 * nkv * 2));
        cuda_bench(&mut g, cuda, format!("decode beams{beams} past{past} h{HEADS}/{KV_HEADS} d{HEAD_DIM}"), || {
            attention::flash_attention_forward(cuda, &mut out, &mut lse, &q, &k, &v, &mask, s)
        });
    }
    g.finish();
    Ok(())
}

// ---------------------------------------------------------------- beam decode (issue 8)

/// One trie-constrained beam step (mask to the trie's children, full-vocabulary log-softmax,
/// top-k over beams x children, finished merge) for 16 users x 20 beams over a 49,152-token
/// vocabulary, on synthetic semantic-ID tries of 1.7k, 10k and 100k items: the host step
/// (`flat_step`) and the CUDA step (`beam_lse_f32` + `beam_select`). Bytes: the logits rows read
/// (the step's floor, docs/kernels/decode.md). Each iteration starts from the same full-width
/// state (set up outside the timing).
fn beam_decode(c: &mut Criterion) {
    use ilrec::backend::cuda::ops::beam::{beam_step, DeviceBeamState, DeviceTrie};
    use ilrec::rec::beam::{flat_step, BeamOptions, FlatBeamState};
    use ilrec::rec::trie::{synthetic_semantic_items, FlatTrie, ItemTrie};
    let (users, beam) = (16usize, 20usize);
    let opts = BeamOptions { beam, top_k: 10, max_rows: usize::MAX };
    let mut rng = Rng::new(8);
    let logits = random(&mut rng, users * beam * VOCAB, 4.0);
    let cuda = open_cuda();
    let mut g = c.benchmark_group("beam_step_bytes");
    g.sampling_mode(SamplingMode::Flat);
    g.throughput(bytes(users * beam * VOCAB * 4));
    for items in [1_700usize, 10_000, 100_000] {
        let trie = ItemTrie::new(&synthetic_semantic_items(&mut rng, items, VOCAB)).expect("distinct items");
        let flat = FlatTrie::new(&trie, VOCAB).expect("items in the vocabulary");
        // A full-width state: one step from the root.
        let mut full = FlatBeamState::new(users, &opts).expect("options");
        let (mut parent, mut token) = (vec![0u32; users * beam], vec![0u32; users * beam]);
        flat_step(&flat, &logits[..users * VOCAB], 1, &mut full, &mut parent, &mut token).expect("host step");
        g.bench_function(format!("cpu flat_step {items} items, {users}x{beam}"), |b| {
            b.iter_batched(
                || full.clone(),
                |mut st| flat_step(&flat, &logits, beam, &mut st, &mut parent, &mut token).expect("host step"),
                BatchSize::LargeInput,
            )
        });
        let Ok(cuda) = &cuda else { continue };
        let mut run = || -> ilrec::Result<()> {
            let dtrie = DeviceTrie::new(cuda, &flat)?;
            let d_logits = DeviceTensor::from_f32(cuda, &[users * beam, VOCAB], &logits, "logits")?;
            g.bench_function(format!("cuda beam_step {items} items, {users}x{beam}"), |b| {
                b.iter_batched(
                    || {
                        let st = DeviceBeamState::upload(cuda, &dtrie, &full).expect("upload");
                        cuda.sync().expect("sync");
                        st
                    },
                    |mut st| {
                        beam_step(cuda, &dtrie, &mut st, &d_logits, beam).expect("beam step");
                        cuda.sync().expect("sync");
                        st
                    },
                    BatchSize::PerIteration,
                )
            });
            Ok(())
        };
        if let Err(e) = run() {
            println!("cuda beam_step bench ({items} items) skipped: {e}");
        }
    }
    g.finish();
}

/// LoRA linear fwd+bwd (W frozen) at training shapes: the bare base GEMMs (cuBLAS `x W^T` and
/// `dy W`, the target's denominator), the unfused PEFT-style chain of cuBLAS GEMMs, and the fused
/// kernels of kernels/lora.cu (the trainer's path: the backward's pass over the f32 `dy` included;
/// and with `du` computed in the loop from a bf16 `dy`). Every variant reports the base GEMMs'
/// 4*M*N*K as its "elements", so the time ratio is the ratio the issue's <= 1.05x target reads.
fn lora_linear(c: &mut Criterion) {
    match open_cuda() {
        Ok(cuda) => {
            if let Err(e) = lora_linear_benches(c, &cuda) {
                println!("cuda LoRA benches stopped: {e}");
            }
        }
        Err(why) => println!("cuda LoRA benches skipped: {why}"),
    }
}

fn lora_linear_benches(c: &mut Criterion, cuda: &Cuda) -> ilrec::Result<()> {
    use ops::lora::{self, DownFactor, LowRank};
    let mut rng = Rng::new(7);
    let mut g = c.benchmark_group("cuda_lora_FLOP");
    // (name, tokens, in K, out N): SmolLM2 q and gate at 16 x 512 tokens, a 4096-hidden q.
    let shapes = [("smollm2 q", 8192, HIDDEN, HIDDEN), ("smollm2 gate", 8192, HIDDEN, FFN), ("4096 q", 8192, 4096, 4096)];
    for (name, m, k, n) in shapes {
        let x32 = DeviceTensor::from_f32(cuda, &[m, k], &random(&mut rng, m * k, 1.0), "x")?;
        let x = DeviceTensor::from_f32_as_bf16(cuda, &[m, k], &random(&mut rng, m * k, 1.0), "x bf16")?;
        let w = DeviceTensor::from_f32_as_bf16(cuda, &[n, k], &random(&mut rng, n * k, 0.05), "w")?;
        let dy32 = DeviceTensor::from_f32(cuda, &[m, n], &random(&mut rng, m * n, 1.0), "dy")?;
        let dy = DeviceTensor::from_f32_as_bf16(cuda, &[m, n], &random(&mut rng, m * n, 1.0), "dy bf16")?;
        let mut y = DeviceTensor::empty(cuda, &[m, n], Elem::F32, "y")?;
        let mut dx = DeviceTensor::empty(cuda, &[m, k], Elem::F32, "dx")?;
        let mut dy16 = DeviceTensor::empty(cuda, &[m, n], Elem::BF16, "dy bf16 out")?;
        g.throughput(Throughput::Elements((4 * m * n * k) as u64));
        cuda_bench(&mut g, cuda, format!("{name} {m}x{k}->{n} bare base fwd+bwd (matmul)"), || {
            ops::matmul(cuda, &mut y, &x, &w, Gemm::NT)?;
            ops::matmul(cuda, &mut dx, &dy, &w, Gemm::NN).map(|_| ())
        });
        for r in [16usize, 64] {
            let s = 2.0;
            let a = DeviceTensor::from_f32_as_bf16(cuda, &[r, k], &random(&mut rng, r * k, 0.05), "a")?;
            let b = DeviceTensor::from_f32_as_bf16(cuda, &[n, r], &random(&mut rng, n * r, 0.05), "b")?;
            let mut u = DeviceTensor::empty(cuda, &[m, r], Elem::BF16, "u")?;
            let mut du = DeviceTensor::empty(cuda, &[m, r], Elem::BF16, "du")?;
            let mut ga = DeviceTensor::zeros(cuda, &[r, k], Elem::F32, "dA")?;
            let mut gb = DeviceTensor::zeros(cuda, &[n, r], Elem::F32, "dB")?;
            cuda_bench(&mut g, cuda, format!("{name} r{r} unfused LoRA fwd+bwd (matmul chain)"), || {
                ops::matmul(cuda, &mut y, &x, &w, Gemm::NT)?;
                ops::matmul(cuda, &mut u, &x, &a, Gemm::NT)?;
                ops::matmul(cuda, &mut y, &u, &b, Gemm::NT.scaled(s).accumulate())?;
                ops::matmul(cuda, &mut dx, &dy, &w, Gemm::NN)?;
                ops::matmul(cuda, &mut du, &dy, &b, Gemm::NN.scaled(s))?;
                ops::matmul(cuda, &mut dx, &du, &a, Gemm::NN.accumulate())?;
                lora::weight_grads(cuda, &mut ga, &mut gb, &du, &x, &dy, &u, s)
            });
            let low = lora::forward_low_rank(r, n, false);
            cuda_bench(&mut g, cuda, format!("{name} r{r} fused fwd ({low:?}) + bwd (dy f32 pass, Given)"), || {
                if low == LowRank::Given {
                    lora::down(cuda, &mut u, None, &x, None, &a, DownFactor::RowsAreRank, 1.0)?;
                }
                lora::forward(cuda, low, &mut y, &mut u, &x, &w, &a, &b, None, s)?;
                lora::down(cuda, &mut du, Some(&mut dy16), &dy32, None, &b, DownFactor::ColsAreRank, s)?;
                lora::backward_dx(cuda, LowRank::Given, &mut dx, &mut du, &dy16, &w, &a, &b, None, s, false)?;
                lora::weight_grads(cuda, &mut ga, &mut gb, &du, &x, &dy16, &u, s)
            });
            cuda_bench(&mut g, cuda, format!("{name} r{r} fused fwd+bwd (both InLoop, dy bf16)"), || {
                lora::forward(cuda, LowRank::InLoop, &mut y, &mut u, &x, &w, &a, &b, None, s)?;
                lora::backward_dx(cuda, LowRank::InLoop, &mut dx, &mut du, &dy, &w, &a, &b, None, s, false)?;
                lora::weight_grads(cuda, &mut ga, &mut gb, &du, &x, &dy, &u, s)
            });
            let mask = DeviceTensor::from_u8(cuda, &[m, k], &(0..m * k).map(|_| u8::from(rng.next_f32() >= 0.05)).collect::<Vec<_>>(), "mask")?;
            let drop = Some(lora::Dropout { mask: &mask, keep: 1.0 / 0.95 });
            let mut xd = DeviceTensor::empty(cuda, &[m, k], Elem::BF16, "xd")?;
            cuda_bench(&mut g, cuda, format!("{name} r{r} fused fwd+bwd, dropout 0.05 (trainer path)"), || {
                lora::down(cuda, &mut u, Some(&mut xd), &x32, drop, &a, DownFactor::RowsAreRank, 1.0)?;
                lora::forward(cuda, LowRank::Given, &mut y, &mut u, &x, &w, &a, &b, None, s)?;
                lora::down(cuda, &mut du, Some(&mut dy16), &dy32, None, &b, DownFactor::ColsAreRank, s)?;
                lora::backward_dx(cuda, LowRank::Given, &mut dx, &mut du, &dy16, &w, &a, &b, drop, s, false)?;
                lora::weight_grads(cuda, &mut ga, &mut gb, &du, &xd, &dy16, &u, s)
            });
        }
    }
    g.finish();
    Ok(())
}

// ---------------------------------------------------------------- fused loss and probes (issue 7)

/// Response rows, candidates and probed layers of the loss / probe benches (SmolLM2 sizes above).
const LOSS_ROWS: usize = 1024;
const CANDIDATES: usize = 1024;
const PROBED: usize = 4;

/// The fused loss (kernels/loss.cu: SFT and ILRec, forward + backward) against the unfused device
/// path (logits GEMM, row cross-entropy, d hidden GEMM), and the fused probe of 4 layers against
/// the naive per-layer full-vocabulary projection; FLOP/s as elem/s (loss: the 6 m V h it performs,
/// probe: 2 k m S h). CPU: the reference loss on fewer rows.
fn loss_probe(c: &mut Criterion) {
    let mut rng = Rng::new(9);
    {
        let m = 32;
        let mut g = c.benchmark_group("cpu_loss_FLOP");
        g.sampling_mode(SamplingMode::Flat);
        let x = random(&mut rng, m * HIDDEN, 1.0);
        let w = random(&mut rng, VOCAB * HIDDEN, 0.05);
        let y = tokens(&mut rng, m);
        g.throughput(Throughput::Elements((4 * m * VOCAB * HIDDEN) as u64));
        g.bench_function(format!("sft loss fwd+bwd (logits, sft_loss, d hidden) m{m} V{VOCAB} h{HIDDEN}"), |b| {
            b.iter(|| {
                let mut z = vec![0.0f32; m * VOCAB];
                cpu::matmul_nt(&mut z, VOCAB, &x, HIDDEN, &w, HIDDEN, m, VOCAB, HIDDEN, false);
                let (_, d) = sft_loss(&z, VOCAB, &y, m as f64).expect("sft_loss");
                let mut dx = vec![0.0f32; m * HIDDEN];
                cpu::matmul_nn(&mut dx, HIDDEN, &d, VOCAB, &w, HIDDEN, m, HIDDEN, VOCAB, false);
                dx
            })
        });
        g.finish();
    }
    match open_cuda() {
        Ok(cuda) => {
            if let Err(e) = cuda_loss_probe(c, &cuda, &mut rng) {
                println!("cuda loss/probe benches stopped: {e}");
            }
        }
        Err(why) => println!("cuda loss/probe benches skipped: {why}"),
    }
}

fn cuda_loss_probe(c: &mut Criterion, cuda: &Cuda, rng: &mut Rng) -> ilrec::Result<()> {
    use ilrec::backend::cuda::ops::loss::{Ids, IlrecInputs, LossPlan};
    use ilrec::backend::cuda::ops::probe::probe_project;
    use ilrec::train::loss::IlrecParams;
    let (m, h, v, s, k) = (LOSS_ROWS, HIDDEN, VOCAB, CANDIDATES, PROBED);
    let mut g = c.benchmark_group("cuda_loss_FLOP");
    let normed = DeviceTensor::from_f32_as_bf16(cuda, &[m, h], &random(rng, m * h, 1.0), "normed")?;
    let head = DeviceTensor::from_f32_as_bf16(cuda, &[v, h], &random(rng, v * h, 0.05), "head")?;
    let cands: Vec<u32> = (0..s).map(|i| (v - s + i) as u32).collect();
    let targets: Vec<u32> = (0..m).map(|i| cands[(i * 37) % s]).collect();
    let item: Vec<bool> = (0..m).map(|i| i % 5 != 4).collect();
    let probe = DeviceTensor::from_f32(cuda, &[k, m, s], &random(rng, k * m * s, 2.0), "probe logits")?;
    let rewards = DeviceTensor::from_f32(cuda, &[m, s], &random(rng, m * s, 1.0), "rewards")?;
    g.throughput(Throughput::Elements((6 * m * v * h) as u64));
    let sft = LossPlan::new(cuda, v, &targets, None, &cands)?;
    cuda_bench(&mut g, cuda, format!("fused loss SFT m{m} V{v} h{h}"), || sft.run(cuda, &normed, &head, None, m as f64).map(|_| ()));
    let il = LossPlan::new(cuda, v, &targets, Some((&item, &cands)), &cands)?;
    let inputs = IlrecInputs { params: IlrecParams::default(), probe: &probe, rewards: Some(&rewards) };
    cuda_bench(&mut g, cuda, format!("fused loss ILRec m{m} V{v} h{h} S{s} k{k}"), || il.run(cuda, &normed, &head, Some(&inputs), m as f64).map(|_| ()));
    // Unfused: [m, V] f32 logits, the row cross-entropy kernel, the d hidden GEMM (4 m V h).
    g.throughput(Throughput::Elements((4 * m * v * h) as u64));
    let t = softmax::Targets::new(cuda, &targets, v)?;
    let mut logits = DeviceTensor::empty(cuda, &[m, v], Elem::F32, "logits")?;
    let mut dlogits = DeviceTensor::empty(cuda, &[m, v], Elem::F32, "dlogits")?;
    let mut dl_b = DeviceTensor::empty(cuda, &[m, v], Elem::BF16, "dlogits bf16")?;
    let mut loss = DeviceTensor::empty(cuda, &[m], Elem::F64, "loss")?;
    let mut dx = DeviceTensor::empty(cuda, &[m, h], Elem::F32, "dx")?;
    cuda_bench(&mut g, cuda, format!("unfused SFT loss (logits + softmax_ce + GEMM) m{m} V{v} h{h}"), || {
        ops::matmul(cuda, &mut logits, &normed, &head, Gemm::NT)?;
        softmax::softmax_ce(cuda, &mut loss, Some(&mut dlogits), &logits, &t, 1.0 / m as f64)?;
        elementwise::cast(cuda, &mut dl_b, &dlogits)?;
        ops::matmul(cuda, &mut dx, &dl_b, &head, Gemm::NN).map(|_| ())
    });
    drop((logits, dlogits, dl_b));
    // Probes: the 4 probed blocks' [n, h] outputs at the m response rows.
    let layers: Vec<DeviceTensor> = (0..k).map(|_| DeviceTensor::from_f32(cuda, &[m, h], &random(rng, m * h, 1.0), "block output")).collect::<ilrec::Result<_>>()?;
    let refs: Vec<&DeviceTensor> = layers.iter().collect();
    let gamma = DeviceTensor::from_f32(cuda, &[h], &vec![1.0; h], "final norm")?;
    let pos = Ids::new(cuda, &(0..m as u32).collect::<Vec<_>>(), m, false, "rows")?;
    let cand = Ids::new(cuda, &cands, v, false, "candidates")?;
    let mut z = DeviceTensor::empty(cuda, &[k, m, s], Elem::F32, "probe logits")?;
    g.throughput(Throughput::Elements((2 * k * m * s * h) as u64));
    cuda_bench(&mut g, cuda, format!("fused probe {k} layers m{m} S{s} h{h}"), || probe_project(cuda, &mut z, &refs, &pos, &gamma, &head, &cand, EPS));
    let mut zf = DeviceTensor::empty(cuda, &[m, v], Elem::F32, "full logits")?;
    let mut nb = DeviceTensor::empty(cuda, &[m, h], Elem::BF16, "normed bf16")?;
    let mut nf = DeviceTensor::empty(cuda, &[m, h], Elem::F32, "normed")?;
    g.throughput(Throughput::Elements((2 * k * m * v * h) as u64));
    cuda_bench(&mut g, cuda, format!("naive probe {k} layers, full vocab, m{m} V{v} h{h}"), || {
        for x in &refs {
            elementwise::rms_norm(cuda, &mut nf, x, &gamma, None, EPS)?;
            elementwise::cast(cuda, &mut nb, &nf)?;
            ops::matmul(cuda, &mut zf, &nb, &head, Gemm::NT)?;
        }
        Ok(())
    });
    g.finish();
    Ok(())
}
