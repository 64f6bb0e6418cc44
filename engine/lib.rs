//! ilrec: an engine that fine-tunes decoder-only LLMs for generative recommendation (ILRec)
//! and serves recommendations by trie-constrained decoding.
//!
//! The CPU backend is the executable specification; see `docs/architecture.md`.
pub mod backend;
pub mod device;
pub mod error;
pub mod model;
pub mod progress;
pub mod rec;
pub mod rng;
pub mod tensor;
pub mod train;
pub mod weights;

pub use error::{Error, Result};
pub use model::{Batch, ForwardOptions, ForwardOutput, KvCache, LogitsMode, Model, ModelConfig, ProbeSpec};
pub use tensor::{DType, Tensor};
