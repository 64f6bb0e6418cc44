//! Rebuilding a Hugging Face `tokenizer.json` from a GGUF's `tokenizer.ggml.*` metadata.
//!
//! Only byte-level BPE (`tokenizer.ggml.model == "gpt2"`) is supported. The vocabulary and
//! merges are copied, tokens the file marks as control become special added tokens (so
//! `<|im_start|>` stays one id), and the pre-tokenizer is chosen from `tokenizer.ggml.pre`,
//! the name llama.cpp gives to the split rules the vocabulary was trained with.
use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Map, Value};

use super::reader::GgufFile;
use crate::error::{Error, Result};

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// Split regexes of llama.cpp pre-tokenizer names, for vocabularies that split text with one
/// regex before byte-level encoding. Names absent here (and not `smollm`) get GPT-2's split.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn split_regex(pre: &str) -> Option<&'static str> {
    match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "smaug-bpe" | "dbrx" => {
            Some(LLAMA3_SPLIT)
        }
        "qwen2" | "deepseek-r1-qwen" | "megrez" => Some(QWEN2_SPLIT),
        _ => None,
    }
}

/// Pre-tokenizer names whose split is exactly GPT-2's regex.
fn is_gpt2_split(pre: &str) -> bool {
    matches!(pre, "default" | "gpt2" | "gpt-2")
}

/// The printable stand-in GPT-2's byte-level BPE uses for each byte: printable Latin-1 bytes
/// stand for themselves, the other 68 are mapped in order to U+0100 and up.
fn byte_alphabet() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut next = 256u32;
    for (b, slot) in map.iter_mut().enumerate() {
        let printable =
            (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
        let code = if printable {
            b as u32
        } else {
            next += 1;
            next - 1
        };
        *slot = char::from_u32(code).expect("code points below 0x200 are chars");
    }
    map
}

/// What the importer writes for the tokenizer.
pub(crate) struct BuiltTokenizer {
    pub tokenizer_json: String,
    pub tokenizer_config_json: String,
    pub n_tokens: usize,
    pub warnings: Vec<String>,
}

fn tok_err(f: &GgufFile, msg: impl Into<String>) -> Error {
    Error::Tokenizer {
        path: f.path().into(),
        msg: msg.into(),
    }
}

fn invalid(f: &GgufFile, field: &str, msg: impl Into<String>) -> Error {
    Error::InvalidField {
        path: f.path().into(),
        field: field.into(),
        msg: msg.into(),
    }
}

/// Builds `tokenizer.json` and `tokenizer_config.json` from the metadata of `f`.
///
/// `transformers_split`: split "smollm" text as transformers' GGUF loader does (GPT-2 regex
/// only) instead of as llama.cpp and the original SmolLM2 tokenizer do (digits first).
pub(crate) fn build(f: &GgufFile, transformers_split: bool) -> Result<BuiltTokenizer> {
    let model = f.str_field("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(invalid(
            f,
            "tokenizer.ggml.model",
            format!("tokenizer model `{model}` is not supported; only `gpt2` (byte-level BPE) is"),
        ));
    }
    let tokens = f
        .opt_array("tokenizer.ggml.tokens")?
        .ok_or_else(|| Error::MissingField {
            path: f.path().into(),
            field: "tokenizer.ggml.tokens".into(),
        })?
        .as_strings()
        .ok_or_else(|| invalid(f, "tokenizer.ggml.tokens", "expected an array of strings"))?;
    let merges = f
        .opt_array("tokenizer.ggml.merges")?
        .ok_or_else(|| Error::MissingField {
            path: f.path().into(),
            field: "tokenizer.ggml.merges".into(),
        })?
        .as_strings()
        .ok_or_else(|| invalid(f, "tokenizer.ggml.merges", "expected an array of strings"))?;
    let token_types = match f.opt_array("tokenizer.ggml.token_type")? {
        None => vec![1; tokens.len()],
        Some(a) => {
            let v = a.to_i64s().ok_or_else(|| {
                invalid(
                    f,
                    "tokenizer.ggml.token_type",
                    "expected an array of integers",
                )
            })?;
            if v.len() != tokens.len() {
                return Err(invalid(
                    f,
                    "tokenizer.ggml.token_type",
                    format!("{} entries for {} tokens", v.len(), tokens.len()),
                ));
            }
            v
        }
    };
    let special_id = |key: &str| -> Result<Option<(usize, &str)>> {
        let field = format!("tokenizer.ggml.{key}");
        match f.opt_u64(&field)? {
            None => Ok(None),
            Some(id) => usize::try_from(id)
                .ok()
                .and_then(|i| tokens.get(i).map(|t| (i, t.as_str())))
                .map(Some)
                .ok_or_else(|| {
                    invalid(
                        f,
                        &field,
                        format!("id {id} is outside the {}-token vocabulary", tokens.len()),
                    )
                }),
        }
    };
    let bos = special_id("bos_token_id")?;
    let eos = special_id("eos_token_id")?;
    let unk = special_id("unknown_token_id")?;
    let pad = special_id("padding_token_id")?;
    let add_bos = f.opt_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
    let add_eos = f.opt_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let mut warnings = Vec::new();

    // Tokens are stored as their byte-level spelling; a token using characters outside that
    // alphabet (a raw space, say) is respelled from its UTF-8 bytes, as transformers does.
    let alphabet = byte_alphabet();
    let in_alphabet: std::collections::HashSet<char> = alphabet.iter().copied().collect();
    let spelled = |t: &str| t.chars().all(|c| in_alphabet.contains(&c));
    let mut vocab = Map::new();
    for (id, t) in tokens.iter().enumerate() {
        let key = if spelled(t) {
            t.clone()
        } else {
            t.bytes().map(|b| alphabet[b as usize]).collect()
        };
        vocab.insert(key, json!(id));
    }
    let mut merge_pairs = Vec::with_capacity(merges.len());
    for (i, m) in merges.iter().enumerate() {
        match m.split(' ').collect::<Vec<_>>()[..] {
            [a, b] => merge_pairs.push(json!([a, b])),
            _ => {
                return Err(invalid(
                    f,
                    "tokenizer.ggml.merges",
                    format!("entry {i} {m:?} is not two tokens separated by one space"),
                ))
            }
        }
    }

    // Added tokens: control tokens (only if spelled in the byte alphabet: others are llama.cpp
    // mislabels), the declared special tokens, and user-defined tokens (matched whole, not
    // special).
    let mut added: BTreeMap<usize, (&str, bool)> = BTreeMap::new();
    for (id, (t, &ty)) in tokens.iter().zip(&token_types).enumerate() {
        if ty == TOKEN_CONTROL && spelled(t) {
            added.insert(id, (t, true));
        } else if ty == TOKEN_USER_DEFINED && vocab.contains_key(t.as_str()) {
            added.insert(id, (t, false));
        }
    }
    for (id, t) in [bos, eos, unk, pad].into_iter().flatten() {
        if spelled(t) {
            added.insert(id, (t, true));
        }
    }
    // When a token string occurs twice in the vocabulary, the vocabulary maps it to the later
    // id; the added token must agree or the tokenizer refuses to load.
    let added_tokens: Vec<Value> = added
        .iter()
        .map(|(&id, &(t, special))| {
            let id = vocab.get(t).and_then(Value::as_u64).unwrap_or(id as u64);
            json!({
                "id": id, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": special,
            })
        })
        .collect();

    let pre = f.opt_str("tokenizer.ggml.pre")?.unwrap_or("default");
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let pre_tokenizer = if pre == "smollm" && !transformers_split {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            byte_level(true),
        ]})
    } else if let Some(re) = split_regex(pre) {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
            byte_level(false),
        ]})
    } else {
        if !is_gpt2_split(pre) && pre != "smollm" {
            warnings.push(format!(
                "tokenizer.ggml.pre `{pre}` is not known here; text is split with GPT-2's regex (as transformers does)"
            ));
        }
        byte_level(true)
    };

    let post_processor = template(bos.filter(|_| add_bos), eos.filter(|_| add_eos));
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": Value::Object(vocab),
            "merges": merge_pairs,
        },
    });
    let tokenizer_json =
        serde_json::to_string(&tokenizer).map_err(|e| tok_err(f, e.to_string()))?;
    // Load it back once so that a vocabulary/merge inconsistency fails the import, not a
    // later run.
    tokenizers::Tokenizer::from_bytes(tokenizer_json.as_bytes())
        .map_err(|e| tok_err(f, format!("the rebuilt tokenizer does not load: {e}")))?;

    let mut cfg = Map::new();
    cfg.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    cfg.insert("add_bos_token".into(), json!(add_bos));
    cfg.insert("add_eos_token".into(), json!(add_eos));
    cfg.insert("clean_up_tokenization_spaces".into(), json!(false));
    for (name, tok) in [
        ("bos_token", bos),
        ("eos_token", eos),
        ("unk_token", unk),
        ("pad_token", pad),
    ] {
        cfg.insert(name.into(), json!(tok.map(|(_, t)| t)));
    }
    if let Some(arch) = f.opt_str("general.architecture")? {
        if let Some(n) = f.opt_u64(&format!("{arch}.context_length"))? {
            cfg.insert("model_max_length".into(), json!(n));
        }
    }
    if let Some(t) = f.opt_str("tokenizer.chat_template")? {
        cfg.insert("chat_template".into(), json!(t));
    }
    let tokenizer_config_json =
        serde_json::to_string_pretty(&Value::Object(cfg)).map_err(|e| tok_err(f, e.to_string()))?;
    Ok(BuiltTokenizer {
        tokenizer_json,
        tokenizer_config_json,
        n_tokens: tokens.len(),
        warnings,
    })
}

/// A `TemplateProcessing` post-processor adding `bos` before and `eos` after each sequence
/// (either may be absent; with neither it adds nothing, as transformers' conversion does).
fn template(bos: Option<(usize, &str)>, eos: Option<(usize, &str)>) -> Value {
    let special = |t: &str, type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
    let seq = |s: &str, type_id: u32| json!({"Sequence": {"id": s, "type_id": type_id}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut specials: HashMap<&str, Value> = HashMap::new();
    for (s, type_id) in [("A", 0), ("B", 1)] {
        let mut part = Vec::new();
        if let Some((_, t)) = bos {
            part.push(special(t, type_id));
        }
        part.push(seq(s, type_id));
        if let Some((_, t)) = eos {
            part.push(special(t, type_id));
        }
        if s == "A" {
            single = part.clone();
        }
        pair.extend(part);
    }
    for (id, t) in [bos, eos].into_iter().flatten() {
        specials.insert(t, json!({"id": t, "ids": [id], "tokens": [t]}));
    }
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
}
