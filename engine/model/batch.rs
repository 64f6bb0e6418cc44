//! Token batches with padding masks.
use crate::error::{Error, Result};

/// A `[batch, seq]` block of token ids with a mask (`true` = real token, `false` = padding).
/// Padding may sit anywhere (left for generation, right for training): positions are counted
/// per sequence over real tokens only, so both layouts give the same outputs on real tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub tokens: Vec<u32>,
    pub mask: Vec<bool>,
    pub batch: usize,
    pub seq: usize,
}

impl Batch {
    /// Checks that `tokens` and `mask` both hold `batch * seq` entries, both non-zero.
    pub fn new(tokens: Vec<u32>, mask: Vec<bool>, batch: usize, seq: usize) -> Result<Self> {
        if batch == 0 || seq == 0 {
            return Err(Error::Input(format!("batch of {batch}x{seq} is empty: batch size and sequence length must be positive")));
        }
        let Some(n) = batch.checked_mul(seq) else {
            return Err(Error::Input(format!("batch of {batch}x{seq} is too large")));
        };
        if tokens.len() != n || mask.len() != n {
            return Err(Error::Input(format!(
                "batch of {batch}x{seq} needs {n} tokens and mask entries, got {} and {}",
                tokens.len(),
                mask.len()
            )));
        }
        Ok(Batch { tokens, mask, batch, seq })
    }

    /// One unpadded sequence.
    pub fn single(tokens: &[u32]) -> Self {
        Batch { tokens: tokens.to_vec(), mask: vec![true; tokens.len()], batch: 1, seq: tokens.len() }
    }

    /// Sequences padded on the right with `pad` to the longest one.
    pub fn right_padded(seqs: &[Vec<u32>], pad: u32) -> Result<Self> {
        Self::padded(seqs, pad, false)
    }

    /// Sequences padded on the left with `pad` to the longest one (generation layout: every
    /// sequence's last real token is in the last column).
    pub fn left_padded(seqs: &[Vec<u32>], pad: u32) -> Result<Self> {
        Self::padded(seqs, pad, true)
    }

    fn padded(seqs: &[Vec<u32>], pad: u32, left: bool) -> Result<Self> {
        if seqs.is_empty() {
            return Err(Error::Input("empty batch".into()));
        }
        let seq = seqs.iter().map(Vec::len).max().unwrap_or(0);
        if seq == 0 {
            return Err(Error::Input(format!("batch of {} sequences, all empty", seqs.len())));
        }
        let mut tokens = Vec::with_capacity(seqs.len() * seq);
        let mut mask = Vec::with_capacity(seqs.len() * seq);
        for s in seqs {
            let n_pad = seq - s.len();
            if left {
                tokens.extend(std::iter::repeat_n(pad, n_pad));
                mask.extend(std::iter::repeat_n(false, n_pad));
            }
            tokens.extend_from_slice(s);
            mask.extend(std::iter::repeat_n(true, s.len()));
            if !left {
                tokens.extend(std::iter::repeat_n(pad, n_pad));
                mask.extend(std::iter::repeat_n(false, n_pad));
            }
        }
        Ok(Batch { tokens, mask, batch: seqs.len(), seq })
    }

    /// Number of real (unmasked) tokens.
    pub fn num_real(&self) -> usize {
        self.mask.iter().filter(|&&m| m).count()
    }
}

/// RoPE positions of a chunk: each real token's index among its sequence's real tokens,
/// continuing from `start[b]` real tokens already seen; padding takes the previous position
/// (its output is never used). Returns the positions and the updated real-token counts.
pub(crate) fn positions(batch: &Batch, start: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let t = batch.seq;
    let mut pos = vec![0usize; batch.batch * t];
    let mut counts = start.to_vec();
    for (b, real) in counts.iter_mut().enumerate() {
        for i in 0..t {
            let m = batch.mask[b * t + i];
            pos[b * t + i] = if m { *real } else { real.saturating_sub(1) };
            *real += m as usize;
        }
    }
    (pos, counts)
}
