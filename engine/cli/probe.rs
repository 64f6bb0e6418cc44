//! `ilrec probe MODEL_DIR --layers ...`: what ILRec's intermediate-layer logits cost.
//!
//! For each probed block it times the logit lens (final RMSNorm + LM-head projection) over the
//! full vocabulary and over a token subset (the item-code tokens in semantic-ID mode), and
//! reports the bytes each one moves, next to the cost of the model's own forward.
use anyhow::{bail, Result};
use ilrec::backend::cuda::{model::CudaModel, ops::probe::probe_cost, Cuda, Elem};
use ilrec::rng::Rng;
use ilrec::train::backprop::{Objective, TrainBatch};
use ilrec::train::lora::{Lora, LoraConfig};
use ilrec::train::loss::IlrecParams;
use ilrec::device::{Device, DeviceRequest};
use ilrec::{Batch, ForwardOptions, LogitsMode, Model, ProbeSpec};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// HF model directory.
    model_dir: PathBuf,
    /// 1-based blocks to probe, comma separated (default: the 4 just below the last, ILREC.md P).
    #[arg(long, value_delimiter = ',')]
    layers: Vec<usize>,
    /// Size of the token subset (default 1024 = 4 levels x 256 semantic-ID codes).
    #[arg(long, default_value_t = 1024)]
    subset: usize,
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value_t = 128)]
    seq: usize,
    /// Timed repetitions (the median is reported) after one warm-up.
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// cpu | cuda | auto | emu (the CUDA path on the host emulator: slow, for development).
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn median_secs(iters: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..iters.max(1))
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

pub fn run(a: Args) -> Result<()> {
    let device = a.device.parse::<DeviceRequest>()?.resolve(|n| eprintln!("{n}"))?;
    let model = Model::load(&a.model_dir)?;
    let c = &model.config;
    let layers = if a.layers.is_empty() {
        let k = 4.min(c.num_layers - 1);
        (c.num_layers - k..c.num_layers).collect()
    } else {
        a.layers.clone()
    };
    if a.subset == 0 || a.subset > c.vocab_size {
        bail!("--subset {} must be in 1..={}", a.subset, c.vocab_size);
    }
    // Evenly spaced ids stand in for the item-code tokens (the cost depends only on the count).
    let subset: Vec<u32> = (0..a.subset).map(|i| (i * c.vocab_size / a.subset) as u32).collect();
    let n = a.batch * a.seq;
    let tokens: Vec<u32> = (0..n).map(|i| ((i * 7919 + 13) % c.vocab_size) as u32).collect();
    let batch = Batch::new(tokens, vec![true; n], a.batch, a.seq)?;
    println!("probe cost on {device}: {} blocks, batch {}x{} = {n} tokens, hidden {}, vocab {}, subset {}", c.num_layers, a.batch, a.seq, c.hidden_size, c.vocab_size, a.subset);

    // On CUDA the forward runs from bf16 weights; its times include copying the logits back.
    let gpu = match &device {
        Device::Cuda(cuda) => Some(CudaModel::upload(cuda, &model, Elem::BF16)?),
        Device::Cpu => None,
    };
    let forward = |opts: &ForwardOptions| match &gpu {
        Some(dm) => dm.forward(&batch, opts),
        None => model.forward(&batch, opts),
    };
    let plain = ForwardOptions { logits: LogitsMode::All, ..Default::default() };
    let t_fwd = median_secs(a.iters, || drop(forward(&plain)));
    let with_probe = ForwardOptions {
        logits: LogitsMode::All,
        taps: layers.clone(),
        probe: Some(ProbeSpec { layers: layers.clone(), tokens: Some(subset.clone()) }),
    };
    let t_fwd_probe = median_secs(a.iters, || drop(forward(&with_probe)));
    if gpu.is_some() {
        println!("forward (final logits)         {:>9.1} ms", t_fwd * 1e3);
        println!("forward + {} subset probes      {:>9.1} ms  (+{:.1}%)", layers.len(), t_fwd_probe * 1e3, 100.0 * (t_fwd_probe - t_fwd) / t_fwd);
        if let (Some(dm), Device::Cuda(cuda)) = (&gpu, &device) {
            cuda_costs(&model, dm, cuda, &batch, &layers, &subset, a.iters, t_fwd)?;
        }
        return Ok(());
    }
    let taps = model.forward(&batch, &ForwardOptions { logits: LogitsMode::None, taps: layers.clone(), probe: None })?;

    let (full_rows, v) = model.gather_head_rows(None);
    let (sub_rows, s) = model.gather_head_rows(Some(&subset));
    let h = c.hidden_size;
    let bytes = |rows: usize| 4 * (rows * h + n * h + n * rows);
    let mut scratch = vec![0.0f32; n * h];
    println!("{:>6} {:>12} {:>10} {:>10} {:>12} {:>10} {:>10}", "block", "full ms", "full GB/s", "full GF/s", "subset ms", "sub GB/s", "sub GF/s");
    let (mut sum_full, mut sum_sub) = (0.0, 0.0);
    for (l, hidden) in &taps.hidden {
        let x = hidden.as_f32().unwrap_or_default();
        let tf = median_secs(a.iters, || drop(model.project(x, n, &full_rows, v, &mut scratch)));
        let ts = median_secs(a.iters, || drop(model.project(x, n, &sub_rows, s, &mut scratch)));
        sum_full += tf;
        sum_sub += ts;
        let gf = |rows: usize, t: f64| 2.0 * (n * h * rows) as f64 / t / 1e9;
        println!(
            "{l:>6} {:>12.2} {:>10.2} {:>10.1} {:>12.3} {:>10.2} {:>10.1}",
            tf * 1e3,
            bytes(v) as f64 / tf / 1e9,
            gf(v, tf),
            ts * 1e3,
            bytes(s) as f64 / ts / 1e9,
            gf(s, ts)
        );
    }
    println!("bytes per probed block: full vocab {:.1} MiB, subset {:.2} MiB (f32 head rows + hidden in + logits out)", bytes(v) as f64 / 1048576.0, bytes(s) as f64 / 1048576.0);
    println!("forward (final logits)         {:>9.1} ms", t_fwd * 1e3);
    println!("forward + {} subset probes      {:>9.1} ms  (+{:.1}%)", layers.len(), t_fwd_probe * 1e3, 100.0 * (t_fwd_probe - t_fwd) / t_fwd);
    println!("sum of {} probes, full vocab    {:>9.1} ms  ({:.1}% of the forward)", layers.len(), sum_full * 1e3, 100.0 * sum_full / t_fwd);
    println!("sum of {} probes, subset        {:>9.2} ms  ({:.2}% of the forward)", layers.len(), sum_sub * 1e3, 100.0 * sum_sub / t_fwd);
    Ok(())
}

/// On CUDA: the fused probe of all blocks at once against the naive per-block logit lens, and
/// what ILRec costs in a training micro-batch (LoRA r 64 on every projection, the fused loss)
/// against SFT on the same batch.
#[allow(clippy::too_many_arguments)]
fn cuda_costs(model: &Model, dm: &CudaModel, cuda: &Cuda, batch: &Batch, layers: &[usize], subset: &[u32], iters: usize, t_fwd: f64) -> Result<()> {
    let c = &model.config;
    let n = batch.batch * batch.seq;
    let taps = dm.forward(batch, &ForwardOptions { logits: LogitsMode::None, taps: layers.to_vec(), probe: None })?;
    let hidden: Vec<Vec<f32>> = taps.hidden.iter().map(|(_, t)| t.as_f32().map(<[f32]>::to_vec).unwrap_or_default()).collect();
    let pc = probe_cost(dm, &hidden, n, subset, c.rms_norm_eps, iters)?;
    let k = layers.len();
    println!("{k} probes fused (one launch, subset)     {:>9.3} ms  ({:.2}% of the forward)", pc.fused_ms, 100.0 * pc.fused_ms / (t_fwd * 1e3));
    println!("{k} probes naive, subset (per block)      {:>9.3} ms", pc.naive_subset_ms);
    println!("{k} probes naive, full vocab (per block)  {:>9.3} ms  ({:.1}x the fused)", pc.naive_full_ms, pc.naive_full_ms / pc.fused_ms);

    // One training micro-batch, SFT against ILRec: the last 5 positions of each sequence are the
    // response; 4 of them item tokens from the subset.
    let mut rng = Rng::new(7);
    let lora = Lora::new(model, LoraConfig::default(), &mut rng)?;
    let resp = 5.min(batch.seq - 1);
    let positions: Vec<usize> = (0..batch.batch).flat_map(|b| (batch.seq - 1 - resp..batch.seq - 1).map(move |t| b * batch.seq + t)).collect();
    let targets: Vec<u32> = (0..positions.len()).map(|i| subset[(i * 37) % subset.len()]).collect();
    let item_mask: Vec<bool> = (0..positions.len()).map(|i| i % resp != resp - 1).collect();
    let tb = TrainBatch { batch: batch.clone(), positions, targets, item_mask, rewards: None };
    let norm = tb.targets.len() as f64;
    let ilrec = Objective::Ilrec { params: IlrecParams { mu: 0.0, ..Default::default() }, layers: layers.to_vec(), candidates: subset.to_vec() };
    let mut step = |obj: &Objective| -> Result<f64> {
        Ok(median_secs(iters, || {
            let r = ilrec::backend::cuda::train::forward_backward(dm, model, &lora, &tb, obj, subset, norm, true, &mut rng);
            if let Err(e) = r.and_then(|x| cuda.sync().map(|_| x)) {
                eprintln!("training micro-batch failed: {e}");
            }
        }))
    };
    let t_sft = step(&Objective::Sft)?;
    let t_ilrec = step(&ilrec)?;
    let toks = n as f64;
    println!("training micro-batch SFT   {:>9.1} ms  {:>9.0} tok/s", t_sft * 1e3, toks / t_sft);
    println!("training micro-batch ILRec {:>9.1} ms  {:>9.0} tok/s  (ILRec/SFT step-time ratio {:.3})", t_ilrec * 1e3, toks / t_ilrec, t_ilrec / t_sft);
    println!("{k} fused probes: {:.2}% of the ILRec micro-batch", 100.0 * pc.fused_ms / (t_ilrec * 1e3));
    Ok(())
}
