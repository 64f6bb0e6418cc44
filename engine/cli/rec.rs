//! `ilrec train --config FILE` and `ilrec eval --config FILE`.
use anyhow::Result;
use ilrec::rec::pipeline::{run_eval, run_train, RunConfig};
use ilrec::train::trainer::StepReport;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct TrainArgs {
    /// TOML run config (every key optional; see docs/recommendation.md).
    #[arg(long)]
    config: PathBuf,
}

#[derive(clap::Args)]
pub struct EvalArgs {
    #[arg(long)]
    config: PathBuf,
    /// valid | test.
    #[arg(long, default_value = "test")]
    split: String,
}

pub fn train(a: TrainArgs) -> Result<()> {
    let cfg = RunConfig::from_file(&a.config)?;
    let t0 = Instant::now();
    let mut log = |m: &str| eprintln!("[{:>7.1}s] {m}", t0.elapsed().as_secs_f64());
    let mut tokens = 0usize;
    let mut on_step = |r: &StepReport| {
        tokens += r.tokens;
        let el = t0.elapsed().as_secs_f64();
        let eta = r.seconds * (r.total_steps - r.step) as f64;
        eprintln!(
            "step {}/{} loss {:.4} (cpo {:.4} cpd {:.4} ce {:.4}) |V_N| {:.1} grad {:.3} lr {:.2e} {:.0} tok/s eta {:.0}s [{el:.0}s]",
            r.step,
            r.total_steps,
            r.stats.loss,
            r.stats.cpo,
            r.stats.cpd,
            r.stats.ce,
            r.stats.mean_negatives(),
            r.grad_norm,
            r.lr,
            r.tokens as f64 / r.seconds,
            eta
        );
    };
    run_train(&cfg, &mut log, &mut on_step)?;
    Ok(())
}

pub fn eval(a: EvalArgs) -> Result<()> {
    let cfg = RunConfig::from_file(&a.config)?;
    let t0 = Instant::now();
    let mut progress = |d: usize, n: usize| eprintln!("eval {d}/{n} users [{:.0}s]", t0.elapsed().as_secs_f64());
    let m = run_eval(&cfg, &a.split, &mut progress)?;
    let json = serde_json::to_string_pretty(&m)?;
    let out = cfg.output_dir.join(format!("metrics_{}.json", a.split));
    ilrec::train::checkpoint::atomic_write(&out, json.as_bytes())?;
    println!("{json}");
    eprintln!("wrote {}", out.display());
    Ok(())
}
