//! `ilrec info MODEL_DIR`.
use anyhow::Result;
use ilrec::model::ModelConfig;
use ilrec::weights::{SafetensorsSet, TextTokenizer};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// HF model directory (config.json + safetensors).
    model_dir: PathBuf,
}

fn mib(bytes: usize) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

pub fn run(a: Args) -> Result<()> {
    let cfg = ModelConfig::from_file(&a.model_dir.join("config.json"))?;
    let st = SafetensorsSet::open_dir(&a.model_dir)?;
    let params = cfg.num_params();
    println!("model        {}", a.model_dir.display());
    println!("family       {:?}", cfg.family);
    println!("blocks       {}", cfg.num_layers);
    println!("hidden       {} (FFN {})", cfg.hidden_size, cfg.intermediate_size);
    println!("heads        {} query, {} key/value (GQA {}:1), head dim {}", cfg.num_heads, cfg.num_kv_heads, cfg.num_heads / cfg.num_kv_heads, cfg.head_dim);
    println!("vocab        {}{}", cfg.vocab_size, if cfg.tie_word_embeddings { " (LM head tied to embedding)" } else { "" });
    println!("rope theta   {}   rms eps {:e}", cfg.rope_theta, cfg.rms_norm_eps);
    println!("biases       qkv {}  o {}", cfg.qkv_bias, cfg.o_bias);
    println!("parameters   {params} ({:.1} M)", params as f64 / 1e6);
    println!("tensors      {} in the weight files", st.names().len());
    println!("memory       {} as f32 (CPU backend), {} as bf16", mib(params * 4), mib(params * 2));
    let kv_per_token = 2 * cfg.num_layers * cfg.kv_dim() * 4;
    println!("KV cache     {:.1} KiB per token (f32)", kv_per_token as f64 / 1024.0);
    match TextTokenizer::load(&a.model_dir) {
        Ok(t) => println!("tokenizer    {} tokens", t.inner.get_vocab_size(true)),
        Err(e) => println!("tokenizer    none ({e})"),
    }
    Ok(())
}
