//! Weight formats: safetensors / HF model directories, GGUF import, tokenizers.
pub mod gguf;
pub mod safetensors;
pub mod tokenizer;

pub use self::safetensors::SafetensorsSet;
pub use self::tokenizer::{ChatMessage, TextTokenizer};
