//! CPU forward throughput (tokens/s): the tiny fixture model and, when imported, SmolLM2-135M
//! (scripts/fetch-smollm2.sh). `cargo bench --bench forward`; results go to docs/perf/cpu.md.
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ilrec::{Batch, ForwardOptions, LogitsMode, Model};
use std::path::Path;
use std::time::Duration;

fn tokens(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 13) % vocab) as u32).collect()
}

fn bench_model(c: &mut Criterion, name: &str, model: &Model, prefill: &[(usize, usize)], decode_ctx: usize) {
    let v = model.config.vocab_size;
    let mut g = c.benchmark_group(name);
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(8));
    for &(b, t) in prefill {
        let batch = Batch::new(tokens(b * t, v), vec![true; b * t], b, t).expect("batch");
        let opts = ForwardOptions { logits: LogitsMode::All, ..Default::default() };
        g.throughput(Throughput::Elements((b * t) as u64));
        g.bench_function(format!("prefill {b}x{t}"), |bench| bench.iter(|| model.forward(&batch, &opts).expect("forward")));
    }
    // One decode step (batch 1) after a `decode_ctx`-token prompt: logits of the new token only.
    let mut cache = model.new_cache(1, decode_ctx + 1);
    let prompt = Batch::single(&tokens(decode_ctx, v));
    let none = ForwardOptions { logits: LogitsMode::None, ..Default::default() };
    model.forward_cached(&prompt, &mut cache, &none).expect("prompt");
    let step = Batch::single(&[7]);
    let last = ForwardOptions { logits: LogitsMode::Last, ..Default::default() };
    g.throughput(Throughput::Elements(1));
    g.bench_function(format!("decode step at {decode_ctx}"), |bench| {
        bench.iter_batched_ref(|| cache.clone(), |c| model.forward_cached(&step, c, &last).expect("step"), BatchSize::LargeInput)
    });
    g.finish();
}

fn forward(c: &mut Criterion) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tiny = Model::load(&root.join("tests/fixtures/tiny-llama")).expect("tiny-llama fixture");
    bench_model(c, "tiny-llama", &tiny, &[(4, 64)], 64);
    let smol = root.join("weights/smollm2-135m");
    if smol.join("model.safetensors").exists() {
        let model = Model::load(&smol).expect("weights/smollm2-135m");
        bench_model(c, "smollm2-135m", &model, &[(8, 128), (1, 512)], 64);
    } else {
        println!("skipped: smollm2-135m benches: weights/smollm2-135m absent (run scripts/fetch-smollm2.sh)");
    }
}

criterion_group!(benches, forward);
criterion_main!(benches);
