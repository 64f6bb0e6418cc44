//! Key/value cache for incremental decoding.
use super::config::ModelConfig;
use crate::error::{Error, Result};

/// Per-block keys and values of every token seen so far, `[batch, kv_heads, cap, head_dim]`,
/// with the padding mask of those tokens and each sequence's count of real tokens (its next
/// RoPE position).
#[derive(Clone, Debug)]
pub struct KvCache {
    pub(crate) k: Vec<Vec<f32>>,
    pub(crate) v: Vec<Vec<f32>>,
    pub(crate) mask: Vec<bool>,
    pub(crate) real: Vec<usize>,
    pub(crate) len: usize,
    pub(crate) cap: usize,
    pub(crate) batch: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl KvCache {
    /// An empty cache for `batch` sequences with room for `cap` tokens each (it grows on demand).
    pub fn new(cfg: &ModelConfig, batch: usize, cap: usize) -> Self {
        let per = batch * cfg.num_kv_heads * cap * cfg.head_dim;
        KvCache {
            k: (0..cfg.num_layers).map(|_| vec![0.0; per]).collect(),
            v: (0..cfg.num_layers).map(|_| vec![0.0; per]).collect(),
            mask: vec![false; batch * cap],
            real: vec![0; batch],
            len: 0,
            cap,
            batch,
            kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
        }
    }

    /// Tokens stored per sequence (padding included).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Bytes held by the key and value buffers.
    pub fn nbytes(&self) -> usize {
        2 * self.k.iter().map(Vec::len).sum::<usize>() * 4
    }

    /// Makes room for `extra` more tokens, doubling the capacity as needed.
    pub(crate) fn reserve(&mut self, extra: usize) {
        let need = self.len + extra;
        if need <= self.cap {
            return;
        }
        let new_cap = need.max(2 * self.cap);
        let (h, d) = (self.kv_heads, self.head_dim);
        let regrow = |buf: &Vec<f32>| {
            let mut out = vec![0.0; self.batch * h * new_cap * d];
            for bh in 0..self.batch * h {
                let src = &buf[bh * self.cap * d..bh * self.cap * d + self.len * d];
                out[bh * new_cap * d..bh * new_cap * d + self.len * d].copy_from_slice(src);
            }
            out
        };
        self.k = self.k.iter().map(regrow).collect();
        self.v = self.v.iter().map(regrow).collect();
        let mut mask = vec![false; self.batch * new_cap];
        for b in 0..self.batch {
            mask[b * new_cap..b * new_cap + self.len].copy_from_slice(&self.mask[b * self.cap..b * self.cap + self.len]);
        }
        self.mask = mask;
        self.cap = new_cap;
    }

    /// Keeps sequence `rows[i]` as the new sequence `i` (beam search reordering; rows may
    /// repeat, and their number may differ from the current batch).
    pub fn reorder(&mut self, rows: &[usize]) -> Result<()> {
        if let Some(&bad) = rows.iter().find(|&&r| r >= self.batch) {
            return Err(Error::Input(format!("cache reorder: row {bad} >= batch {}", self.batch)));
        }
        let stride = self.kv_heads * self.cap * self.head_dim;
        let pick = |buf: &Vec<f32>| {
            let mut out = Vec::with_capacity(rows.len() * stride);
            for &r in rows {
                out.extend_from_slice(&buf[r * stride..(r + 1) * stride]);
            }
            out
        };
        self.k = self.k.iter().map(pick).collect();
        self.v = self.v.iter().map(pick).collect();
        let mut mask = Vec::with_capacity(rows.len() * self.cap);
        for &r in rows {
            mask.extend_from_slice(&self.mask[r * self.cap..(r + 1) * self.cap]);
        }
        self.mask = mask;
        self.real = rows.iter().map(|&r| self.real[r]).collect();
        self.batch = rows.len();
        Ok(())
    }
}
