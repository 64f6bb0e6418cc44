//! The trie-constrained beam search on the GPU (issue 8; docs/kernels/decode.md): the model's
//! cached forward, the beam step (kernels/beam.cu) and the KV-cache reorder all stay on the
//! device; the host queues work and reads the results once per chunk of users, at the end. The
//! same search as [`super::beam::search`] (through [`super::beam::flat_search`], its fixed-slot
//! form), up to the device's f32 ranking keys and the bf16 weights' rounding.
//!
//! Status: compiled, unverified on GPU.
use super::beam::{BeamOptions, FlatBeamState, Recommendation};
use crate::backend::cuda::model::CudaModel;
use crate::backend::cuda::ops::beam::{beam_step, DeviceBeamState, DeviceTrie, MAX_BEAM};
use crate::error::{Error, Result};
use crate::model::Batch;

/// The ranked items of each prompt (as [`super::beam::recommend`]) with `model` on its GPU.
/// Users go in chunks of `max(1, max_rows / beam)`, all of a chunk's beams in one forward per
/// step.
pub fn recommend_cuda(model: &CudaModel, trie: &DeviceTrie, prompts: &[Vec<u32>], opts: &BeamOptions) -> Result<Vec<Vec<Recommendation>>> {
    let c = crate::model::Decoder::config(model);
    if opts.beam > MAX_BEAM {
        return Err(Error::Input(format!("device beam search: beam {} exceeds {MAX_BEAM}", opts.beam)));
    }
    if trie.vocab != c.vocab_size {
        return Err(Error::Input(format!("device beam search: the trie is for {} tokens, the model has {}", trie.vocab, c.vocab_size)));
    }
    if let Some(u) = prompts.iter().position(Vec::is_empty) {
        return Err(Error::Input(format!("beam search: prompt {u} is empty")));
    }
    // The last token of an item is never fed back.
    let extra = trie.max_len.saturating_sub(1);
    let limit = c.max_position_embeddings;
    if let Some((u, p)) = prompts.iter().enumerate().find(|(_, p)| p.len() + extra > limit) {
        return Err(Error::Input(format!(
            "beam search: prompt {u} ({} tokens) + up to {extra} item tokens exceeds the model's max_position_embeddings ({limit})",
            p.len()
        )));
    }
    let users_per_chunk = (opts.max_rows / opts.beam.max(1)).max(1);
    let mut out = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(users_per_chunk) {
        out.extend(search_chunk(model, trie, chunk, opts, extra)?);
    }
    Ok(out)
}

fn search_chunk(model: &CudaModel, trie: &DeviceTrie, prompts: &[Vec<u32>], opts: &BeamOptions, extra: usize) -> Result<Vec<Vec<Recommendation>>> {
    let cuda = model.cuda();
    let users = prompts.len();
    let start = FlatBeamState::new(users, opts)?;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let prefill = Batch::left_padded(prompts, 0)?;
    let mut cache = model.new_cache(users, longest + extra)?;
    let mut logits = model.forward_last_on_device(&prefill, None, &mut cache)?;
    let mut st = DeviceBeamState::upload(cuda, trie, &start)?;
    let slots = users * opts.beam;
    // Shape and mask of a step; the tokens come from the device.
    let step_batch = Batch::new(vec![0; slots], vec![true; slots], slots, 1)?;
    let mut rows_per_user = 1;
    // Every user is finished after max_len steps (no path is longer); users that stop earlier
    // idle on dead slots, so the host never has to ask.
    for step in 0..trie.max_len {
        beam_step(cuda, trie, &mut st, &logits, rows_per_user)?;
        if step + 1 == trie.max_len {
            break;
        }
        cache.reorder_groups(st.parent(), users, opts.beam)?;
        logits = model.forward_last_on_device(&step_batch, Some(st.token()), &mut cache)?;
        rows_per_user = opts.beam;
    }
    if let Some(row) = st.non_finite_row()? {
        return Err(Error::NonFinite(format!("device beam search: logits row {row} (user {}) has a NaN or +inf", row as usize / rows_per_user)));
    }
    Ok(st.download()?.results())
}
