//! Using ilrec as a library, the way a downstream crate does: load a model directory, run a
//! padded batch with block taps, and read probe logits of intermediate layers on a token subset.
//!
//! cargo run --release --example forward_taps -- [MODEL_DIR]   (default: tests/fixtures/tiny-llama)
use ilrec::{Batch, ForwardOptions, LogitsMode, Model, ProbeSpec};
use std::path::PathBuf;

fn main() -> ilrec::Result<()> {
    let dir = std::env::args().nth(1).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("tests/fixtures/tiny-llama"));
    let model = Model::load(&dir)?;
    let c = &model.config;
    println!("{:?} model: {} blocks, hidden {}, vocab {}", c.family, c.num_layers, c.hidden_size, c.vocab_size);

    // Two sequences of different lengths, right-padded with token 0.
    let batch = Batch::right_padded(&[vec![5, 17, 42, 9, 3], vec![8, 1, 99]], 0)?;
    // Probe the blocks just below the last one (ILRec's P) on a 16-token subset of the vocabulary.
    let last = c.num_layers;
    let probe_layers: Vec<usize> = (last.saturating_sub(2).max(1)..last).collect();
    let subset: Vec<u32> = (0..16).map(|i| (i * 7 % c.vocab_size) as u32).collect();
    let opts = ForwardOptions {
        logits: LogitsMode::Last,
        taps: vec![1, last],
        probe: Some(ProbeSpec { layers: probe_layers, tokens: Some(subset.clone()) }),
    };
    let out = model.forward(&batch, &opts)?;

    let logits = out.logits.expect("requested").into_f32_vec();
    for (b, row) in logits.chunks(c.vocab_size).enumerate() {
        let best = row.iter().enumerate().max_by(|x, y| x.1.total_cmp(y.1)).map(|(i, _)| i).unwrap_or(0);
        println!("sequence {b}: next-token argmax {best}");
    }
    for (block, h) in &out.hidden {
        println!("block {block} hidden state: shape {:?}", h.shape());
    }
    for (block, p) in &out.probe {
        let p = p.as_f32().unwrap_or_default();
        // Probe logits of sequence 0's last real token (position 4) over the subset.
        let row = &p[4 * subset.len()..5 * subset.len()];
        let best = row.iter().enumerate().max_by(|x, y| x.1.total_cmp(y.1)).map(|(i, _)| subset[i]).unwrap_or(0);
        println!("block {block} probe: shape {:?}, sequence 0 favours token {best} among the subset", out.probe[0].1.shape());
    }
    Ok(())
}
