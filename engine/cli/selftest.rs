//! `ilrec selftest`: every CUDA kernel checked against the CPU reference, as a table.
use anyhow::{bail, Context, Result};
use ilrec::backend::cuda::selftest;
use ilrec::device::{Device, DeviceRequest};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// cuda, auto (the GPU when one opens; otherwise nothing is checked and the reason is
    /// printed), or emu (the kernels on the host emulator: slow, for development without a GPU).
    #[arg(long, default_value = "auto")]
    device: String,
    /// Add the end-to-end checks (forward and backward of tiny models against the CPU backend).
    #[arg(long)]
    full: bool,
    /// Only these sections, comma separated (elementwise, embedding, optim, softmax, gemm,
    /// attention, beam, probe, loss, lora, model, decode).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Also write the table (markdown, with the GPU and the date) to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    let req: DeviceRequest = a.device.parse()?;
    if req == DeviceRequest::Cpu {
        bail!("selftest checks the CUDA kernels against the CPU; --device cpu has nothing to check");
    }
    let Device::Cuda(cuda) = req.resolve(|n| eprintln!("{n}"))? else {
        println!("selftest: skipped, no GPU: the CUDA kernels are compiled, unverified on GPU");
        return Ok(());
    };
    let (free, total) = cuda.mem_info()?;
    let t0 = std::time::Instant::now();
    let rows = if a.only.is_empty() {
        selftest::run(&cuda, a.seed, a.full)?
    } else {
        selftest::run_sections(&cuda, a.seed, &a.only.iter().map(String::as_str).collect::<Vec<_>>())?
    };
    let mem = cuda.memory();
    let failed = rows.iter().filter(|r| !r.pass()).count();
    let header = format!(
        "GPU: {} (sm_{}{}), {:.1} of {:.1} GiB free; seed {}; {} checks, {} failed; {:.1} s; allocator peak {:.1} MiB ({} driver allocations, {} reuses)\n\n",
        cuda.name(),
        cuda.capability().0,
        cuda.capability().1,
        free as f64 / (1u64 << 30) as f64,
        total as f64 / (1u64 << 30) as f64,
        a.seed,
        rows.len(),
        failed,
        t0.elapsed().as_secs_f64(),
        mem.peak_in_use as f64 / (1u64 << 20) as f64,
        mem.driver_allocs,
        mem.reuses,
    );
    let table = selftest::table(&rows);
    print!("{header}{table}");
    if let Some(path) = &a.out {
        let body = format!("# ilrec selftest\n\nilrec {}\n\n{header}{table}", env!("CARGO_PKG_VERSION"));
        std::fs::write(path, body).with_context(|| format!("writing {}", path.display()))?;
    }
    if failed > 0 {
        bail!("{failed} of {} kernel checks failed", rows.len());
    }
    Ok(())
}
