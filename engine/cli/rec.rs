//! `ilrec train`, `ilrec eval`, `ilrec sasrec` and `ilrec recommend`, all driven by a TOML run
//! config.
use anyhow::{bail, Context, Result};
use ilrec::progress::Progress;
use ilrec::rec::metrics::Metrics;
use ilrec::device::DeviceRequest;
use ilrec::rec::pipeline::{run_eval_on, run_most_popular, run_sasrec, run_train_on, RunConfig, TrainedRun};
use ilrec::train::trainer::StepReport;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct TrainArgs {
    /// TOML run config (every key optional; see docs/recommendation.md).
    #[arg(long)]
    config: PathBuf,
    /// Where the micro-batches' forward and backward run: cpu | cuda | auto | emu (host emulator).
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(clap::Args)]
pub struct EvalArgs {
    #[arg(long)]
    config: PathBuf,
    /// valid | test.
    #[arg(long, default_value = "test")]
    split: String,
    /// Where `eval`'s beam search runs: cpu | cuda | auto | emu (sasrec and popularity ignore it).
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(clap::Args)]
pub struct RecommendArgs {
    /// The trained run's TOML config.
    #[arg(long)]
    config: PathBuf,
    /// The user's history, oldest first: item ids as in the data set's files, comma-separated.
    #[arg(long, conflicts_with = "user")]
    history: Option<String>,
    /// Or a user id of the data set: recommend the next item after the user's whole sequence.
    #[arg(long)]
    user: Option<String>,
    /// How many items to print.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Where the beam search runs: cpu | cuda | auto | emu (the CUDA path on the host emulator).
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn train(a: TrainArgs) -> Result<()> {
    let cfg = RunConfig::from_file(&a.config)?;
    let t0 = Instant::now();
    let mut log = |m: &str| eprintln!("[{:>7.1}s] {m}", t0.elapsed().as_secs_f64());
    let mut bar: Option<Progress> = None;
    let mut tokens = 0usize;
    let mut on_step = |r: &StepReport| {
        let b = bar.get_or_insert_with(|| Progress::new(r.total_steps, "train steps"));
        tokens += r.tokens;
        let s = &r.stats;
        let terms = if cfg.method == "sft" {
            format!("loss {:.4}", s.loss)
        } else {
            format!("loss {:.4} cpo {:.4} cpd {:.4} crr {:.4} ce {:.4} |V_N| {:.1}", s.loss, s.cpo, s.cpd, s.crr, s.ce, s.mean_negatives())
        };
        b.set(r.step, &format!("{terms} grad {:.3} lr {:.2e} {:.0} tok/s", r.grad_norm, r.lr, r.tokens as f64 / r.seconds));
        if r.step == r.total_steps {
            b.finish();
            eprintln!("trained {} steps, {tokens} tokens in {:.1}s", r.total_steps, t0.elapsed().as_secs_f64());
        }
    };
    let device = a.device.parse::<DeviceRequest>()?.resolve(|n| eprintln!("{n}"))?;
    run_train_on(&cfg, &device, &mut log, &mut on_step)?;
    Ok(())
}

fn write_metrics(cfg: &RunConfig, name: &str, m: &Metrics, seconds: f64) -> Result<()> {
    let mut v = serde_json::to_value(m)?;
    v["seconds"] = serde_json::json!(seconds);
    let json = serde_json::to_string_pretty(&v)?;
    std::fs::create_dir_all(&cfg.output_dir).with_context(|| format!("creating {}", cfg.output_dir.display()))?;
    let out = cfg.output_dir.join(name);
    ilrec::train::checkpoint::atomic_write(&out, json.as_bytes())?;
    println!("{json}");
    eprintln!("wrote {}", out.display());
    Ok(())
}

pub fn eval(a: EvalArgs) -> Result<()> {
    let cfg = RunConfig::from_file(&a.config)?;
    let t0 = Instant::now();
    let mut bar: Option<Progress> = None;
    let mut progress = |d: usize, n: usize| bar.get_or_insert_with(|| Progress::new(n as u64, "eval users")).set(d as u64, "");
    let device = a.device.parse::<DeviceRequest>()?.resolve(|n| eprintln!("{n}"))?;
    let m = run_eval_on(&cfg, &a.split, &device, &mut progress)?;
    write_metrics(&cfg, &format!("metrics_{}.json", a.split), &m, t0.elapsed().as_secs_f64())
}

/// `ilrec sasrec --config FILE`: the SASRec baseline row (trained when absent) on the run's
/// evaluation users.
pub fn sasrec(a: EvalArgs) -> Result<()> {
    let cfg = RunConfig::from_file(&a.config)?;
    let t0 = Instant::now();
    let mut log = |m: &str| eprintln!("[{:>7.1}s] {m}", t0.elapsed().as_secs_f64());
    let m = run_sasrec(&cfg, &a.split, &mut log)?;
    write_metrics(&cfg, &format!("sasrec_metrics_{}.json", a.split), &m, t0.elapsed().as_secs_f64())
}

/// `ilrec popularity --config FILE`: the MostPop sanity row on the run's evaluation users.
pub fn popularity(a: EvalArgs) -> Result<()> {
    let cfg = RunConfig::from_file(&a.config)?;
    let t0 = Instant::now();
    let m = run_most_popular(&cfg, &a.split)?;
    write_metrics(&cfg, &format!("mostpop_metrics_{}.json", a.split), &m, t0.elapsed().as_secs_f64())
}

pub fn recommend(a: RecommendArgs) -> Result<()> {
    let cfg = RunConfig::from_file(&a.config)?;
    let mut run = TrainedRun::load(&cfg)?;
    run.use_device(&a.device.parse::<DeviceRequest>()?.resolve(|n| eprintln!("{n}"))?)?;
    let ds = &run.dataset;
    let history: Vec<u32> = match (&a.history, &a.user) {
        (Some(h), _) => {
            let index = ds.item_index();
            h.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| index.get(s).copied().with_context(|| format!("--history: item `{s}` is not an item of {}", ds.name)))
                .collect::<Result<_>>()?
        }
        (None, Some(u)) => {
            let i = ds.users.iter().position(|x| x == u).with_context(|| format!("--user: `{u}` is not a user of {}", ds.name))?;
            ds.sequences[i].clone()
        }
        (None, None) => bail!("give --history ITEM,ITEM,... or --user ID"),
    };
    if history.is_empty() {
        bail!("--history is empty");
    }
    let keep = history.len().saturating_sub(cfg.data.max_history);
    let history = &history[keep..];
    let recs = run.recommend(&[history])?;
    println!("history ({} items, oldest first):", history.len());
    for &i in history {
        println!("  {:>8}  {}", ds.items[i as usize].raw_id, ds.items[i as usize].title);
    }
    println!("{:>4}  {:>8}  {:>9}  title", "rank", "item", "log-prob");
    for (r, (item, score)) in recs[0].iter().take(a.top).enumerate() {
        let it = &ds.items[*item as usize];
        println!("{:>4}  {:>8}  {score:>9.4}  {}", r + 1, it.raw_id, it.title);
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct DecodeBenchArgs {
    /// Model directory (HF layout: config.json + safetensors).
    #[arg(long)]
    model: PathBuf,
    /// JSON `{"items": [[token, ...], ...], "prompts": [[token, ...], ...]}`.
    #[arg(long)]
    input: PathBuf,
    #[arg(long, default_value_t = 20)]
    beam: usize,
    #[arg(long, default_value_t = 10)]
    top_k: usize,
    /// Beam rows per forward: users go in chunks of max_rows / beam.
    #[arg(long, default_value_t = 4096)]
    max_rows: usize,
    /// cpu | cuda | auto | emu (the CUDA path on the host emulator: slow, for development).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Weights on the GPU: f32 | bf16.
    #[arg(long, default_value = "bf16")]
    weights: String,
    /// Timed runs (after one untimed warm-up run).
    #[arg(long, default_value_t = 3)]
    reps: usize,
}

#[derive(serde::Deserialize)]
struct DecodeInput {
    items: Vec<Vec<u32>>,
    prompts: Vec<Vec<u32>>,
}

/// `ilrec decode-bench`: the median time of one beam search over all prompts (the model uploaded
/// and the trie built beforehand, once per item set, as in serving) and the ranked items, as JSON
/// on stdout. Recommendations/s counts users (one ranked list each) per second.
pub fn decode_bench(a: DecodeBenchArgs) -> Result<()> {
    use ilrec::backend::cuda::model::CudaModel;
    use ilrec::backend::cuda::ops::beam::DeviceTrie;
    use ilrec::backend::cuda::Elem;
    use ilrec::device::Device;
    use ilrec::rec::beam::{recommend, BeamOptions};
    use ilrec::rec::beam_device::recommend_cuda;
    use ilrec::rec::trie::{FlatTrie, ItemTrie};
    let text = std::fs::read_to_string(&a.input).with_context(|| format!("reading {}", a.input.display()))?;
    let input: DecodeInput = serde_json::from_str(&text).with_context(|| format!("parsing {}", a.input.display()))?;
    let model = ilrec::Model::load(&a.model)?;
    let trie = ItemTrie::new(&input.items)?;
    let opts = BeamOptions { beam: a.beam, top_k: a.top_k, max_rows: a.max_rows };
    let device = a.device.parse::<DeviceRequest>()?.resolve(|n| eprintln!("{n}"))?;
    let elem = match a.weights.as_str() {
        "f32" => Elem::F32,
        "bf16" => Elem::BF16,
        o => bail!("--weights {o}: f32 | bf16"),
    };
    let gpu = match &device {
        Device::Cpu => None,
        Device::Cuda(cuda) => Some((CudaModel::upload(cuda, &model, elem)?, DeviceTrie::new(cuda, &FlatTrie::new(&trie, model.config.vocab_size)?)?)),
    };
    let run = || match &gpu {
        None => recommend(&model, &trie, &input.prompts, &opts),
        Some((m, t)) => recommend_cuda(m, t, &input.prompts, &opts),
    };
    // Copies one search makes between host and device: they do not grow with the steps.
    let before = device.cuda().map(|c| c.transfers());
    let results = run()?;
    let copies = device.cuda().zip(before).map(|(c, b)| c.transfers().since(&b));
    let mut times = Vec::new();
    for _ in 0..a.reps.max(1) {
        let t0 = Instant::now();
        run()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let s = times[times.len() / 2];
    let lists: Vec<Vec<u32>> = results.iter().map(|r| r.iter().map(|x| x.item).collect()).collect();
    let scores: Vec<Vec<f32>> = results.iter().map(|r| r.iter().map(|x| x.score).collect()).collect();
    let out = serde_json::json!({
        "device": match &device {
            Device::Cpu => "cpu",
            Device::Cuda(c) if c.is_emulated() => "emu (host emulator: times are not GPU times)",
            Device::Cuda(_) => "cuda",
        },
        "users": input.prompts.len(),
        "items": input.items.len(),
        "beam": a.beam,
        "seconds": s,
        "recs_per_s": input.prompts.len() as f64 / s,
        "copies_per_search": copies.map(|t| serde_json::json!({
            "to_device": t.htod, "to_device_bytes": t.htod_bytes, "to_host": t.dtoh, "to_host_bytes": t.dtoh_bytes,
        })),
        "results": lists,
        "scores": scores,
    });
    println!("{out}");
    Ok(())
}
