//! Training-step throughput and peak memory on the CPU, SFT vs ILRec (docs/perf/cpu.md).
//!
//! cargo run --release --example train_throughput -- MODEL_DIR [sft|ilrec] [BATCH] [SEQ] [STEPS]
//!
//! Synthetic batches: random tokens, the last 8 positions of each sequence supervised, their
//! targets drawn from a 1024-token candidate set (4 x 256 semantic-ID codes); LoRA r 16 on all
//! seven projections; ILRec with k = 4 probed blocks and CF rewards. Run one method per process
//! so the peak RSS (VmHWM) belongs to that method.
use ilrec::rng::Rng;
use ilrec::train::backprop::Objective;
use ilrec::train::loss::IlrecParams;
use ilrec::train::trainer::{Example, TrainConfig, Trainer};
use ilrec::Model;
use std::path::PathBuf;
use std::time::Instant;

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

fn main() -> ilrec::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(args.get(1).map(String::as_str).unwrap_or("tests/fixtures/tiny-llama"));
    let method = args.get(2).map(String::as_str).unwrap_or("sft");
    let num = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (batch, seq, steps) = (num(3, 4), num(4, 128), num(5, 3));
    let mut model = Model::load(&dir)?;
    let c = model.config.clone();
    let s = 1024.min(c.vocab_size);
    let candidates: Vec<u32> = (0..s).map(|i| (i * c.vocab_size / s) as u32).collect();
    let mut rng = Rng::new(1);
    let data: Vec<Example> = (0..batch)
        .map(|_| {
            let mut tokens: Vec<u32> = (0..seq).map(|_| rng.below(c.vocab_size) as u32).collect();
            let resp = 8.min(seq - 1);
            for t in &mut tokens[seq - resp..] {
                *t = candidates[rng.below(s)];
            }
            let loss_positions: Vec<usize> = (seq - resp - 1..seq - 1).collect();
            let targets: Vec<u32> = loss_positions.iter().map(|&p| tokens[p + 1]).collect();
            let rewards = (0..resp * s).map(|_| rng.next_f32()).collect();
            Example { tokens, loss_positions, targets, item_mask: vec![true; resp], rewards: Some(rewards) }
        })
        .collect();
    let objective = match method {
        "sft" => Objective::Sft,
        "ilrec" => {
            let k = 4.min(c.num_layers - 1);
            Objective::Ilrec { params: IlrecParams::default(), layers: (c.num_layers - k..c.num_layers).collect(), candidates }
        }
        other => return Err(ilrec::Error::Input(format!("method `{other}`: sft or ilrec"))),
    };
    let cfg = TrainConfig { lora_rank: 16, lora_alpha: 32.0, micro_batch: batch, epochs: (steps + 1) as f64, warmup_ratio: 0.0, ..Default::default() };
    let mut tr = Trainer::new(&model, cfg, data.len(), vec![])?;
    let r = tr.train_step(&mut model, &data, &objective)?; // warm-up
    eprintln!("warm-up step: loss {} grad norm {} lr {}", r.stats.loss, r.grad_norm, r.lr);
    let t0 = Instant::now();
    let mut tokens = 0;
    for _ in 0..steps {
        tokens += tr.train_step(&mut model, &data, &objective)?.tokens;
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{} {method}: batch {batch}x{seq}, {steps} steps: {:.3} s/step, {:.1} tokens/s, peak RSS {:.0} MiB, {} threads",
        dir.display(),
        secs / steps as f64,
        tokens as f64 / secs,
        peak_rss_mib(),
        rayon::current_num_threads()
    );
    Ok(())
}
