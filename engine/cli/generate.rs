//! `ilrec generate MODEL_DIR --prompt ...`.
use anyhow::{Context, Result};
use ilrec::backend::cuda::{model::CudaModel, Elem};
use ilrec::device::{Device, DeviceRequest};
use ilrec::model::generate::{generate, GenerateOptions};
use ilrec::weights::{ChatMessage, TextTokenizer};
use ilrec::Model;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// HF model directory with tokenizer.json.
    model_dir: PathBuf,
    /// Text to continue (or the user message with --chat).
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Sample among the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// cpu | cuda | auto | emu (the CUDA path on the host emulator: slow, for development).
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn run(a: Args) -> Result<()> {
    let device = a.device.parse::<DeviceRequest>()?.resolve(|n| eprintln!("{n}"))?;
    let t0 = Instant::now();
    let model = Model::load(&a.model_dir)?;
    let tok = TextTokenizer::load(&a.model_dir)?;
    let text = if a.chat {
        let msg = ChatMessage { role: "user".into(), content: a.prompt.clone() };
        tok.apply_chat_template(&[msg], true)?
    } else {
        a.prompt.clone()
    };
    let prompt = tok.encode(&text)?;
    if prompt.is_empty() {
        anyhow::bail!("the prompt encodes to no tokens");
    }
    let mut stop = model.config.eos_token_ids.clone();
    stop.extend(tok.eos_id());
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
        stop_tokens: stop,
    };
    eprintln!("loaded in {:.2} s on {device}; prompt {} tokens", t0.elapsed().as_secs_f64(), prompt.len());
    let start = Instant::now();
    let mut first: Option<f64> = None;
    let mut ids = Vec::new();
    let mut shown = 0;
    let mut out = std::io::stdout().lock();
    let on_token = |t| {
        first.get_or_insert(start.elapsed().as_secs_f64());
        ids.push(t);
        // Decode the whole continuation so multi-token characters print once complete.
        if let Ok(s) = tok.decode(&ids, false) {
            if s.len() > shown && s.is_char_boundary(shown) {
                let _ = write!(out, "{}", &s[shown..]);
                let _ = out.flush();
                shown = s.len();
            }
        }
    };
    let new = match &device {
        Device::Cpu => generate(&model, &prompt, &opts, on_token),
        // bf16 weights, f32 activations: the CUDA backend's inference precision.
        Device::Cuda(cuda) => generate(&CudaModel::upload(cuda, &model, Elem::BF16)?, &prompt, &opts, on_token),
    }
    .context("generation failed")?;
    writeln!(out)?;
    let total = start.elapsed().as_secs_f64();
    let ttft = first.unwrap_or(total);
    let decode_tps = if new.len() > 1 { (new.len() - 1) as f64 / (total - ttft) } else { 0.0 };
    eprintln!(
        "{} new tokens; prefill {} tokens in {:.3} s ({:.0} tok/s); decode {:.1} tok/s",
        new.len(),
        prompt.len(),
        ttft,
        prompt.len() as f64 / ttft,
        decode_tps
    );
    Ok(())
}
