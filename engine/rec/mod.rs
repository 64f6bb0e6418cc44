//! Generative recommendation: data sets and splits, item identifiers, the item trie,
//! constrained beam search and ranking metrics.
pub mod beam;
pub mod beam_device;
pub mod data;
pub mod metrics;
pub mod pipeline;
pub mod prompt;
pub mod reward;
pub mod sasrec;
pub mod semantic_id;
pub mod trie;
