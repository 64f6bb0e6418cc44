//! The `ilrec` command line.
mod generate;
mod info;
mod probe;
mod rec;
mod selftest;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "ilrec", version, about = "ILRec fine-tuning and trie-constrained decoding engine")]
struct Cli {
    /// Worker threads for the CPU backend (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Architecture, parameter count and memory of a model directory.
    Info(info::Args),
    /// Continue a prompt (greedy or sampled) with the KV cache.
    Generate(generate::Args),
    /// Measure the cost of intermediate-layer probe logits (ILRec's logit lens) per layer.
    Probe(probe::Args),
    /// Fine-tune for recommendation (SFT or ILRec) per a TOML run config.
    Train(rec::TrainArgs),
    /// Evaluate a trained run: full-ranking Hit@K / NDCG@K by trie-constrained beam search.
    Eval(rec::EvalArgs),
    /// Train (when absent) and evaluate the run's SASRec, the collaborative-filtering baseline
    /// and CRR reward model.
    Sasrec(rec::EvalArgs),
    /// The MostPop sanity baseline (most interacted training items) on the run's evaluation users.
    Popularity(rec::EvalArgs),
    /// Recommend items for one history (or a data set user) with a trained run.
    Recommend(rec::RecommendArgs),
    /// Time trie-constrained beam search (recommendations/s) on given items and prompts, CPU or
    /// CUDA: our side of scripts/perf/gpu_decode.py.
    DecodeBench(rec::DecodeBenchArgs),
    /// Check every CUDA kernel against the CPU reference and print a table (kernel, shape, error,
    /// pass/fail, time).
    Selftest(selftest::Args),
    /// Convert a GGUF file into an HF model directory (safetensors, config, tokenizer).
    ImportGguf {
        /// The .gguf file.
        gguf: PathBuf,
        /// Output directory (created if needed).
        out_dir: PathBuf,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        if let Err(e) = rayon::ThreadPoolBuilder::new().num_threads(n).build_global() {
            eprintln!("error: --threads {n}: {e}");
            std::process::exit(2);
        }
    }
    let res: Result<()> = match cli.cmd {
        Cmd::Info(a) => info::run(a),
        Cmd::Generate(a) => generate::run(a),
        Cmd::Probe(a) => probe::run(a),
        Cmd::Train(a) => rec::train(a),
        Cmd::Eval(a) => rec::eval(a),
        Cmd::Sasrec(a) => rec::sasrec(a),
        Cmd::Popularity(a) => rec::popularity(a),
        Cmd::Recommend(a) => rec::recommend(a),
        Cmd::DecodeBench(a) => rec::decode_bench(a),
        Cmd::Selftest(a) => selftest::run(a),
        Cmd::ImportGguf { gguf, out_dir } => import_gguf(&gguf, &out_dir),
    };
    if let Err(e) = res {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn import_gguf(gguf: &std::path::Path, out_dir: &std::path::Path) -> Result<()> {
    use ilrec::weights::gguf::{import_gguf_with, ImportOptions, ImportProgress};
    use std::io::{IsTerminal, Write};
    let t0 = std::time::Instant::now();
    let tty = std::io::stderr().is_terminal();
    // A live line on a terminal; in logs, one line per quarter of the work.
    let progress = |p: ImportProgress<'_>| {
        if tty {
            eprint!("\rimport: {}/{} tensors ({})\x1b[K", p.done, p.total, p.tensor);
            let _ = std::io::stderr().flush();
        } else if p.done * 4 / p.total != (p.done - 1) * 4 / p.total {
            eprintln!("import: {}/{} tensors", p.done, p.total);
        }
    };
    let opts = ImportOptions { progress: Some(&progress), ..Default::default() };
    let s = import_gguf_with(gguf, out_dir, &opts)?;
    if tty {
        eprintln!();
    }
    for w in &s.warnings {
        eprintln!("warning: {w}");
    }
    let types: Vec<String> = s.dtype_counts.iter().map(|(k, v)| format!("{k} x{v}")).collect();
    println!(
        "imported {} ({:?}): {} tensors, {} parameters, {} tokens; source types: {}; {:.1} s",
        gguf.display(),
        s.architecture,
        s.n_tensors,
        s.n_params,
        s.n_tokens,
        types.join(", "),
        t0.elapsed().as_secs_f64()
    );
    for f in &s.files {
        println!("  wrote {}", f.display());
    }
    Ok(())
}
