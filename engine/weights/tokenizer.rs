//! The HF tokenizer of a model directory and its chat template.
use crate::error::{Error, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// A tokenizer with the model directory's chat template and special tokens.
pub struct TextTokenizer {
    pub inner: tokenizers::Tokenizer,
    path: PathBuf,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

/// One chat message.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl TextTokenizer {
    /// Loads `dir/tokenizer.json` and, when present, `dir/tokenizer_config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::Tokenizer { path, msg: "file not found (the model directory has no tokenizer)".into() });
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::Tokenizer { path: path.clone(), msg: e.to_string() })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let (mut chat_template, mut bos_token, mut eos_token) = (None, None, None);
        if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
            let v: Value = serde_json::from_str(&text).map_err(|e| Error::format(&cfg_path, "JSON", e.to_string()))?;
            chat_template = v.get("chat_template").and_then(Value::as_str).map(str::to_string);
            bos_token = token_string(v.get("bos_token"));
            eos_token = token_string(v.get("eos_token"));
        }
        Ok(TextTokenizer { inner, path, chat_template, bos_token, eos_token })
    }

    /// Token ids of `text` (no special tokens added; special tokens written in the text are
    /// recognised).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| Error::Tokenizer { path: self.path.clone(), msg: e.to_string() })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens kept when `keep_special`.
    pub fn decode(&self, ids: &[u32], keep_special: bool) -> Result<String> {
        self.inner.decode(ids, !keep_special).map_err(|e| Error::Tokenizer { path: self.path.clone(), msg: e.to_string() })
    }

    /// Id of a token string, if in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The end-of-sequence token's id, from tokenizer_config.json.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_id(t))
    }

    /// Renders the model's chat template (Jinja) for `messages`.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let cfg = self.path.with_file_name("tokenizer_config.json");
        let template = self.chat_template.as_deref().ok_or_else(|| Error::MissingField { path: cfg.clone(), field: "chat_template".into() })?;
        let mut env = minijinja::Environment::new();
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        let bad = |e: minijinja::Error| Error::InvalidField { path: cfg.clone(), field: "chat_template".into(), msg: e.to_string() };
        env.add_template("chat", template).map_err(bad)?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        };
        env.get_template("chat").and_then(|t| t.render(ctx)).map_err(bad)
    }
}
