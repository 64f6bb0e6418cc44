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

/// Added vocabulary (item-code tokens of semantic IDs, docs/semantic_ids.md).
impl TextTokenizer {
    /// One past the largest token id (base vocabulary and added tokens).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab(true).values().max().map_or(0, |&m| m as usize + 1)
    }

    /// Adds `tokens` as special added tokens (matched literally in any text, before
    /// normalisation and pre-tokenisation; `decode(.., keep_special = false)` drops them).
    /// Their ids are `vocab_size()..vocab_size() + n` in the given order: checked, as is that
    /// each encodes to its single id. Rejects empty, repeated or already known tokens. On
    /// error the tokenizer is unchanged.
    pub fn add_tokens(&mut self, tokens: &[String]) -> Result<Vec<u32>> {
        let err = |msg: String| Error::Tokenizer { path: self.path.clone(), msg };
        let mut seen = std::collections::HashSet::new();
        for t in tokens {
            if t.is_empty() {
                return Err(err("cannot add an empty token".into()));
            }
            if !seen.insert(t.as_str()) {
                return Err(err(format!("token {t:?} is listed twice among the tokens to add")));
            }
            if let Some(id) = self.inner.token_to_id(t) {
                return Err(err(format!("token {t:?} to add is already in the vocabulary (id {id})")));
            }
        }
        let first = self.vocab_size() as u32;
        let mut inner = self.inner.clone();
        inner
            .add_special_tokens(tokens.iter().map(|t| tokenizers::AddedToken::from(t.clone(), true)))
            .map_err(|e| err(e.to_string()))?;
        let mut ids = Vec::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            let want = first + i as u32;
            match inner.token_to_id(t) {
                Some(id) if id == want => ids.push(id),
                got => return Err(err(format!("added token {t:?} got id {got:?}, expected {want} (ids must follow the vocabulary contiguously)"))),
            }
            let enc = inner.encode(t.as_str(), false).map_err(|e| err(e.to_string()))?;
            if enc.get_ids() != [want] {
                return Err(err(format!("added token {t:?} encodes to {:?}, not to its single id {want}", enc.get_ids())));
            }
        }
        self.inner = inner;
        Ok(ids)
    }
}
