//! Bad inputs: broken config.json, safetensors, shard indexes, tokenizers and forward / generate
//! arguments. Each must give the right typed error whose message names the file and the field
//! or tensor at fault, and none may panic.
mod common;
use common::fixture;
use ilrec::model::generate::GenerateOptions;
use ilrec::model::ModelConfig;
use ilrec::weights::{ChatMessage, SafetensorsSet, TextTokenizer};
use ilrec::{Batch, Error, ForwardOptions, LogitsMode, Model, ProbeSpec};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Map, Value};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tempfile::TempDir;

/// Unwraps the error of `$res` (panicking on `Ok` or on a panic inside `$res`), checks it
/// matches `$pat` and that its message contains every needle.
macro_rules! expect_err {
    ($res:expr, $pat:pat $(if $guard:expr)?, [$($needle:expr),* $(,)?]) => {{
        let res = catch_unwind(AssertUnwindSafe(|| $res));
        let err: Error = match res {
            Err(_) => panic!("`{}` panicked instead of returning an error", stringify!($res)),
            Ok(Ok(_)) => panic!("`{}` succeeded; expected an error", stringify!($res)),
            Ok(Err(e)) => e,
        };
        assert!(matches!(&err, $pat $(if $guard)?), "wrong error variant: {err:?}");
        let msg = err.to_string();
        $(
            let needle: String = ($needle).to_string();
            assert!(msg.contains(&needle), "error message `{msg}` does not mention `{needle}`");
        )*
        err
    }};
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// A temporary copy of a fixture directory (its files only).
fn copy_fixture(name: &str) -> TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
        }
    }
    tmp
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn write_json(path: &Path, v: &Value) {
    std::fs::write(path, serde_json::to_string_pretty(v).unwrap()).unwrap();
}

/// Edits `dir/config.json` in place.
fn edit_config(dir: &Path, edit: impl FnOnce(&mut Map<String, Value>)) -> PathBuf {
    let path = dir.join("config.json");
    let mut v = read_json(&path);
    edit(v.as_object_mut().unwrap());
    write_json(&path, &v);
    path
}

/// Writes tiny-llama's config.json edited by `edit` into a fresh directory and parses it.
fn config_with(edit: impl FnOnce(&mut Map<String, Value>)) -> (TempDir, PathBuf, ilrec::Result<ModelConfig>) {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("config.json");
    let mut v = read_json(&fixture("tiny-llama/config.json"));
    edit(v.as_object_mut().unwrap());
    write_json(&path, &v);
    let res = catch_unwind(|| ModelConfig::from_file(&path)).expect("ModelConfig::from_file panicked");
    (tmp, path, res)
}

fn shown(p: &Path) -> String {
    p.display().to_string()
}

/// One tensor of a safetensors file, owned.
#[derive(Clone)]
struct OwnedTensor {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn read_tensors(path: &Path) -> Vec<OwnedTensor> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<OwnedTensor> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| OwnedTensor { name, dtype: v.dtype(), shape: v.shape().to_vec(), data: v.data().to_vec() })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn write_tensors(path: &Path, tensors: &[OwnedTensor]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|t| (t.name.clone(), TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// Rewrites a safetensors file through `edit`.
fn edit_tensors(path: &Path, edit: impl FnOnce(&mut Vec<OwnedTensor>)) {
    let mut t = read_tensors(path);
    edit(&mut t);
    write_tensors(path, &t);
}

fn tensor_mut<'a>(t: &'a mut [OwnedTensor], name: &str) -> &'a mut OwnedTensor {
    t.iter_mut().find(|t| t.name == name).unwrap_or_else(|| panic!("fixture has no tensor {name}"))
}

/// `Model::load`, with a panic turned into a test failure naming the case.
fn load(dir: &Path) -> ilrec::Result<Model> {
    catch_unwind(|| Model::load(dir)).unwrap_or_else(|_| panic!("Model::load({}) panicked", dir.display()))
}

fn tiny_llama() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| Model::load(&fixture("tiny-llama")).unwrap())
}

// ---------------------------------------------------------------------------------------------
// 1. config.json

#[test]
fn config_missing_file() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("config.json");
    expect_err!(ModelConfig::from_file(&path), Error::Io { .. }, [shown(&path)]);
    // Through Model::load too: a directory without config.json.
    expect_err!(Model::load(tmp.path()), Error::Io { .. }, [shown(&path)]);
}

#[test]
fn config_not_json() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("config.json");
    for text in ["", "{", "not json at all", "{\"hidden_size\": 96,}", "\u{feff}garbage"] {
        std::fs::write(&path, text).unwrap();
        expect_err!(ModelConfig::from_file(&path), Error::Format { format: "JSON", .. }, [shown(&path), "JSON"]);
    }
    std::fs::write(&path, [0xffu8, 0xfe, 0x00, 0x80]).unwrap();
    expect_err!(ModelConfig::from_file(&path), Error::Io { .. } | Error::Format { .. }, [shown(&path)]);
    for text in ["[1, 2]", "42", "null", "\"llama\""] {
        std::fs::write(&path, text).unwrap();
        expect_err!(ModelConfig::from_file(&path), Error::Format { .. }, [shown(&path), "object"]);
    }
}

#[test]
fn config_missing_required_fields() {
    for field in ["hidden_size", "num_hidden_layers", "vocab_size", "model_type", "num_attention_heads", "intermediate_size"] {
        let (_t, path, res) = config_with(|c| {
            c.remove(field);
        });
        expect_err!(res, Error::MissingField { field: f, path: p } if f == field && p == &path, [shown(&path), field]);
        // `null` counts as missing.
        let (_t, path, res) = config_with(|c| {
            c.insert(field.into(), Value::Null);
        });
        expect_err!(res, Error::MissingField { field: f, .. } if f == field, [shown(&path), field]);
    }
}

#[test]
fn config_heads_do_not_divide_hidden_size() {
    let (_t, path, res) = config_with(|c| {
        c.remove("head_dim");
        c.insert("num_attention_heads".into(), json!(5));
        c.insert("num_key_value_heads".into(), json!(1));
    });
    expect_err!(
        res,
        Error::InvalidField { field, .. } if field == "num_attention_heads",
        [shown(&path), "num_attention_heads", "hidden_size"]
    );
    // With an explicit head_dim the heads need not divide hidden_size.
    let (_t, _path, res) = config_with(|c| {
        c.insert("num_attention_heads".into(), json!(5));
        c.insert("num_key_value_heads".into(), json!(1));
    });
    let cfg = res.unwrap();
    assert_eq!((cfg.num_heads, cfg.head_dim), (5, 16));
}

#[test]
fn config_kv_heads_do_not_divide_heads() {
    for kv in [4, 5, 7, 12] {
        let (_t, path, res) = config_with(|c| {
            c.insert("num_key_value_heads".into(), json!(kv));
        });
        expect_err!(
            res,
            Error::InvalidField { field, .. } if field == "num_key_value_heads",
            [shown(&path), "num_key_value_heads", kv.to_string()]
        );
    }
}

#[test]
fn config_kv_heads_zero() {
    let (_t, path, res) = config_with(|c| {
        c.insert("num_key_value_heads".into(), json!(0));
    });
    expect_err!(res, Error::InvalidField { field, .. } if field == "num_key_value_heads", [shown(&path), "num_key_value_heads"]);
}

#[test]
fn config_bad_head_dim() {
    for hd in [15, 1, 0] {
        let (_t, path, res) = config_with(|c| {
            c.insert("head_dim".into(), json!(hd));
        });
        expect_err!(res, Error::InvalidField { field, .. } if field == "head_dim", [shown(&path), "head_dim"]);
    }
    // Odd head_dim derived from hidden_size / heads: 90 / 6 = 15.
    let (_t, path, res) = config_with(|c| {
        c.remove("head_dim");
        c.insert("hidden_size".into(), json!(90));
    });
    expect_err!(res, Error::InvalidField { field, .. } if field == "head_dim", [shown(&path), "head_dim", "15"]);
}

#[test]
fn config_zero_dimensions() {
    for field in ["hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads", "intermediate_size"] {
        let (_t, path, res) = config_with(|c| {
            c.insert(field.into(), json!(0));
        });
        expect_err!(res, Error::InvalidField { field: f, .. } if f == field, [shown(&path), field]);
    }
}

#[test]
fn config_unsupported_model_type() {
    for mt in ["gpt2", "LLAMA", "qwen3", ""] {
        let (_t, path, res) = config_with(|c| {
            c.insert("model_type".into(), json!(mt));
        });
        expect_err!(res, Error::InvalidField { field, .. } if field == "model_type", [shown(&path), "model_type", format!("`{mt}`")]);
    }
    // Present but not a string: the field is invalid, not missing.
    let (_t, path, res) = config_with(|c| {
        c.insert("model_type".into(), json!(7));
    });
    expect_err!(res, Error::InvalidField { field, .. } if field == "model_type", [shown(&path), "model_type"]);
}

#[test]
fn config_unsupported_hidden_act() {
    for act in [json!("gelu"), json!("relu"), json!(1), json!(["silu"])] {
        let (_t, path, res) = config_with(|c| {
            c.insert("hidden_act".into(), act.clone());
        });
        expect_err!(res, Error::InvalidField { field, .. } if field == "hidden_act", [shown(&path), "hidden_act"]);
    }
}

#[test]
fn config_rope_scaling_rejected() {
    let (_t, path, res) = config_with(|c| {
        c.insert("rope_scaling".into(), json!({"type": "linear", "factor": 2.0}));
    });
    expect_err!(res, Error::InvalidField { field, .. } if field == "rope_scaling", [shown(&path), "rope_scaling"]);
}

#[test]
fn config_rope_parameters_rejected() {
    let (_t, path, res) = config_with(|c| {
        c.insert(
            "rope_parameters".into(),
            json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
        );
    });
    expect_err!(
        res,
        Error::InvalidField { field, .. } if field == "rope_parameters.rope_type",
        [shown(&path), "rope_parameters.rope_type", "llama3"]
    );
    // rope_type of the wrong type is not silently taken as the default.
    let (_t, path, res) = config_with(|c| {
        c.insert("rope_parameters".into(), json!({"rope_type": 3, "rope_theta": 10000.0}));
    });
    expect_err!(res, Error::InvalidField { field, .. } if field == "rope_parameters.rope_type", [shown(&path), "rope_parameters.rope_type"]);
    let (_t, path, res) = config_with(|c| {
        c.insert("rope_parameters".into(), json!({"rope_type": "default", "rope_theta": -1.0}));
    });
    expect_err!(res, Error::InvalidField { field, .. } if field == "rope_parameters.rope_theta", [shown(&path), "rope_parameters.rope_theta"]);
    let (_t, path, res) = config_with(|c| {
        c.insert("rope_parameters".into(), json!("default"));
    });
    expect_err!(res, Error::InvalidField { field, .. } if field == "rope_parameters", [shown(&path), "rope_parameters"]);
}

#[test]
fn config_wrong_value_types() {
    let int_fields = [
        "hidden_size",
        "num_hidden_layers",
        "vocab_size",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "head_dim",
        "max_position_embeddings",
        "bos_token_id",
        "eos_token_id",
    ];
    let bad = [json!(-96), json!(-1), json!("96"), json!(96.5), json!(16.0), json!(true), json!({"v": 96}), json!(1e300)];
    for field in int_fields {
        for v in &bad {
            let (_t, path, res) = config_with(|c| {
                c.insert(field.into(), v.clone());
            });
            expect_err!(res, Error::InvalidField { field: f, .. } if f == field, [shown(&path), field]);
        }
    }
    for field in ["rms_norm_eps", "rope_theta"] {
        for v in [json!(-1e-5), json!(0.0), json!("1e-5"), json!(true)] {
            let (_t, path, res) = config_with(|c| {
                c.insert(field.into(), v.clone());
            });
            expect_err!(res, Error::InvalidField { field: f, .. } if f == field, [shown(&path), field]);
        }
    }
    for field in ["tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window"] {
        for v in [json!("yes"), json!(1), json!([true])] {
            let (_t, path, res) = config_with(|c| {
                c.insert(field.into(), v.clone());
            });
            expect_err!(res, Error::InvalidField { field: f, .. } if f == field, [shown(&path), field]);
        }
    }
    // A list of eos ids with one bad entry.
    let (_t, path, res) = config_with(|c| {
        c.insert("eos_token_id".into(), json!([2, "3"]));
    });
    expect_err!(res, Error::InvalidField { field, .. } if field == "eos_token_id", [shown(&path), "eos_token_id"]);
}

#[test]
fn config_token_ids_outside_vocab() {
    // vocab_size is 311.
    for (field, v) in [
        ("eos_token_id", json!(311)),
        ("eos_token_id", json!([1, 400])),
        ("bos_token_id", json!(311)),
        // Ids that do not fit u32 must not wrap around into the vocabulary.
        ("eos_token_id", json!(4_294_967_297u64)),
        ("eos_token_id", json!([4_294_967_296u64])),
        ("bos_token_id", json!(4_294_967_298u64)),
    ] {
        let (_t, path, res) = config_with(|c| {
            c.insert(field.into(), v.clone());
        });
        expect_err!(res, Error::InvalidField { field: f, .. } if f == field, [shown(&path), field]);
    }
    let (_t, _p, res) = config_with(|c| {
        c.insert("eos_token_id".into(), json!([0, 310]));
        c.insert("bos_token_id".into(), json!(310));
    });
    let cfg = res.unwrap();
    assert_eq!((cfg.bos_token_id, cfg.eos_token_ids), (Some(310), vec![0, 310]));
}

#[test]
fn config_unsupported_features() {
    for (field, v) in [("use_sliding_window", json!(true)), ("mlp_bias", json!(true))] {
        let (_t, path, res) = config_with(|c| {
            c.insert(field.into(), v);
        });
        expect_err!(res, Error::InvalidField { field: f, .. } if f == field, [shown(&path), field]);
    }
}

#[test]
fn config_overflowing_dimensions_do_not_panic() {
    // Dimensions whose products overflow usize must be rejected by the config, not panic (or
    // wrap) when the model computes its projection widths or parameter count.
    let (_t, path, res) = config_with(|c| {
        c.insert("num_attention_heads".into(), json!(1u64 << 32));
        c.insert("num_key_value_heads".into(), json!(1u64 << 32));
        c.insert("head_dim".into(), json!(1u64 << 40));
    });
    expect_err!(res, Error::InvalidField { .. }, [shown(&path), "head_dim"]);
    let (_t, path, res) = config_with(|c| {
        c.insert("hidden_size".into(), json!(1u64 << 40));
        c.insert("vocab_size".into(), json!(1u64 << 40));
    });
    expect_err!(res, Error::InvalidField { .. }, [shown(&path)]);

    // Large but representable: the loader must report the shape mismatch, not allocate.
    let tmp = copy_fixture("tiny-llama");
    edit_config(tmp.path(), |c| {
        c.insert("vocab_size".into(), json!(1u64 << 30));
    });
    let st = tmp.path().join("model.safetensors");
    expect_err!(
        load(tmp.path()),
        Error::ShapeMismatch { tensor, .. } if tensor == "model.embed_tokens.weight",
        [shown(&st), "model.embed_tokens.weight"]
    );
}

// ---------------------------------------------------------------------------------------------
// 2. safetensors

#[test]
fn safetensors_truncated() {
    let src = std::fs::read(fixture("tiny-llama/model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(src[..8].try_into().unwrap()) as usize;
    let data_start = 8 + header_len;
    let cuts = [
        0,
        1,
        4,
        7, // inside the 8-byte header length
        8,
        9,
        8 + header_len / 2,
        data_start - 1, // inside the JSON header
        data_start,
        data_start + 1,
        data_start + 1000,
        (data_start + src.len()) / 2,
        src.len() - 1, // inside the data
    ];
    let tmp = copy_fixture("tiny-llama");
    let path = tmp.path().join("model.safetensors");
    for cut in cuts {
        std::fs::write(&path, &src[..cut]).unwrap();
        expect_err!(load(tmp.path()), Error::Format { format: "safetensors", .. }, [shown(&path), "safetensors"]);
        expect_err!(SafetensorsSet::open_files(std::slice::from_ref(&path)), Error::Format { .. }, [shown(&path)]);
    }
    // Trailing bytes after the data are also malformed (the offsets do not cover the buffer).
    let mut longer = src.clone();
    longer.extend_from_slice(&[0u8; 3]);
    std::fs::write(&path, &longer).unwrap();
    expect_err!(load(tmp.path()), Error::Format { .. }, [shown(&path)]);
}

#[test]
fn safetensors_garbage_header() {
    let src = std::fs::read(fixture("tiny-llama/model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(src[..8].try_into().unwrap()) as usize;
    let tmp = copy_fixture("tiny-llama");
    let path = tmp.path().join("model.safetensors");
    let mut cases: Vec<Vec<u8>> = Vec::new();
    // JSON header replaced by junk of the same length.
    let mut junk = src.clone();
    junk[8..8 + header_len].fill(b'x');
    cases.push(junk);
    // Header length field absurd, zero, or pointing past the end.
    for len in [u64::MAX, 0, (src.len() as u64) * 2, 1 << 40] {
        let mut b = src.clone();
        b[..8].copy_from_slice(&len.to_le_bytes());
        cases.push(b);
    }
    // Valid JSON, wrong structure.
    for header in [
        "[]".to_string(),
        "{\"w\": 3}".to_string(),
        "{\"w\": {\"dtype\": \"F32\", \"shape\": [2, 2], \"data_offsets\": [0, 999999]}}".to_string(),
        "{\"w\": {\"dtype\": \"F32\", \"shape\": [2, 3], \"data_offsets\": [0, 16]}}".to_string(),
        "{\"w\": {\"dtype\": \"Q9\", \"shape\": [4], \"data_offsets\": [0, 16]}}".to_string(),
        format!("{{\"w\": {{\"dtype\": \"F32\", \"shape\": [{}, {}], \"data_offsets\": [0, 16]}}}}", u64::MAX, u64::MAX),
    ] {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header.as_bytes());
        b.extend_from_slice(&[0u8; 16]);
        cases.push(b);
    }
    cases.push(b"PK\x03\x04 this is a zip, not safetensors".to_vec());
    for bytes in cases {
        std::fs::write(&path, &bytes).unwrap();
        expect_err!(load(tmp.path()), Error::Format { format: "safetensors", .. }, [shown(&path), "safetensors"]);
    }
}

#[test]
fn safetensors_shape_disagrees_with_config() {
    let tmp = copy_fixture("tiny-llama");
    let st = tmp.path().join("model.safetensors");
    edit_config(tmp.path(), |c| {
        c.insert("intermediate_size".into(), json!(208));
    });
    expect_err!(
        load(tmp.path()),
        Error::ShapeMismatch { tensor, expected, got, .. }
            if tensor == "model.layers.0.mlp.gate_proj.weight" && expected == &[208, 96] && got == &[200, 96],
        [shown(&st), "model.layers.0.mlp.gate_proj.weight", "[208, 96]", "[200, 96]"]
    );

    let tmp = copy_fixture("tiny-llama");
    let st = tmp.path().join("model.safetensors");
    edit_config(tmp.path(), |c| {
        c.insert("num_key_value_heads".into(), json!(3));
    });
    expect_err!(
        load(tmp.path()),
        Error::ShapeMismatch { tensor, .. } if tensor == "model.layers.0.self_attn.k_proj.weight",
        [shown(&st), "model.layers.0.self_attn.k_proj.weight"]
    );

    // A tensor stored with the wrong shape (config untouched).
    let tmp = copy_fixture("tiny-llama");
    let st = tmp.path().join("model.safetensors");
    edit_tensors(&st, |t| {
        let n = tensor_mut(t, "model.layers.2.mlp.down_proj.weight");
        n.shape = vec![200, 96];
    });
    expect_err!(
        load(tmp.path()),
        Error::ShapeMismatch { tensor, .. } if tensor == "model.layers.2.mlp.down_proj.weight",
        [shown(&st), "model.layers.2.mlp.down_proj.weight"]
    );

    // Too many layers in the config: the first absent block is named.
    let tmp = copy_fixture("tiny-llama");
    let st = tmp.path().join("model.safetensors");
    edit_config(tmp.path(), |c| {
        c.insert("num_hidden_layers".into(), json!(4));
    });
    expect_err!(
        load(tmp.path()),
        Error::MissingTensor { tensor, .. } if tensor == "model.layers.3.input_layernorm.weight",
        [shown(&st), "model.layers.3.input_layernorm.weight"]
    );
}

#[test]
fn safetensors_missing_tensor() {
    for name in ["model.layers.1.self_attn.k_proj.weight", "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"] {
        let tmp = copy_fixture("tiny-llama");
        let st = tmp.path().join("model.safetensors");
        edit_tensors(&st, |t| t.retain(|t| t.name != name));
        expect_err!(load(tmp.path()), Error::MissingTensor { tensor, .. } if tensor == name, [shown(&st), name]);
    }
    // Untying the head of a tied model needs lm_head.weight, which is absent.
    let tmp = copy_fixture("tiny-qwen2");
    edit_config(tmp.path(), |c| {
        c.insert("tie_word_embeddings".into(), json!(false));
    });
    expect_err!(load(tmp.path()), Error::MissingTensor { tensor, .. } if tensor == "lm_head.weight", ["lm_head.weight", "model-0000"]);
    // A Llama checkpoint declared as Qwen2 lacks the q/k/v biases.
    let tmp = copy_fixture("tiny-llama");
    edit_config(tmp.path(), |c| {
        c.insert("model_type".into(), json!("qwen2"));
    });
    expect_err!(
        load(tmp.path()),
        Error::MissingTensor { tensor, .. } if tensor == "model.layers.0.self_attn.q_proj.bias",
        [shown(&tmp.path().join("model.safetensors")), "model.layers.0.self_attn.q_proj.bias"]
    );
}

#[test]
fn safetensors_unsupported_dtype() {
    for (name, dtype, width) in [
        ("model.layers.0.self_attn.q_proj.weight", Dtype::F64, 8),
        ("model.layers.1.mlp.up_proj.weight", Dtype::I8, 1),
        ("model.norm.weight", Dtype::I32, 4),
        ("model.embed_tokens.weight", Dtype::U8, 1),
    ] {
        let tmp = copy_fixture("tiny-llama");
        let st = tmp.path().join("model.safetensors");
        edit_tensors(&st, |t| {
            let n = tensor_mut(t, name);
            let count: usize = n.shape.iter().product();
            n.dtype = dtype;
            n.data = vec![0u8; count * width];
        });
        expect_err!(
            load(tmp.path()),
            Error::UnsupportedDtype { tensor, dtype: d, .. } if tensor == name && d == &format!("{dtype:?}"),
            [shown(&st), name, format!("{dtype:?}")]
        );
    }
}

/// tiny-llama with one bf16 element of `name` set to `bits`.
fn poisoned_llama(name: &str, elem: usize, bits: u16) -> TempDir {
    let tmp = copy_fixture("tiny-llama");
    edit_tensors(&tmp.path().join("model.safetensors"), |t| {
        let n = tensor_mut(t, name);
        assert_eq!(n.dtype, Dtype::BF16);
        n.data[2 * elem..2 * elem + 2].copy_from_slice(&bits.to_le_bytes());
    });
    tmp
}

const BF16_NAN: u16 = 0x7fc0;
const BF16_INF: u16 = 0x7f80;
const BF16_NEG_INF: u16 = 0xff80;

#[test]
fn safetensors_nan_in_embedding_and_head() {
    for (name, bits) in [("model.embed_tokens.weight", BF16_NAN), ("lm_head.weight", BF16_INF), ("model.norm.weight", BF16_NEG_INF)] {
        let tmp = poisoned_llama(name, 5, bits);
        expect_err!(load(tmp.path()), Error::NonFinite(_), [name, "element 5"]);
    }
}

#[test]
fn safetensors_nan_in_block_weight_names_the_tensor() {
    for name in ["model.layers.0.self_attn.q_proj.weight", "model.layers.2.mlp.down_proj.weight"] {
        let tmp = poisoned_llama(name, 7, BF16_NAN);
        expect_err!(load(tmp.path()), Error::NonFinite(_), [name]);
    }
}

#[test]
fn safetensors_nan_in_norm_or_bias() {
    let tmp = poisoned_llama("model.layers.1.input_layernorm.weight", 3, BF16_NAN);
    expect_err!(load(tmp.path()), Error::NonFinite(_), ["model.layers.1.input_layernorm.weight"]);
    let tmp = poisoned_llama("model.layers.1.post_attention_layernorm.weight", 3, BF16_INF);
    expect_err!(load(tmp.path()), Error::NonFinite(_), ["model.layers.1.post_attention_layernorm.weight"]);
    // Qwen2 (f32 shards): a NaN in a q bias.
    let tmp = copy_fixture("tiny-qwen2");
    let index = read_json(&tmp.path().join("model.safetensors.index.json"));
    let name = "model.layers.0.self_attn.q_proj.bias";
    let shard = tmp.path().join(index["weight_map"][name].as_str().unwrap());
    edit_tensors(&shard, |t| {
        let n = tensor_mut(t, name);
        n.data[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    expect_err!(load(tmp.path()), Error::NonFinite(_), [name]);
}

fn index_path(dir: &Path) -> PathBuf {
    dir.join("model.safetensors.index.json")
}

fn edit_index(dir: &Path, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let path = index_path(dir);
    let mut v = read_json(&path);
    edit(&mut v);
    write_json(&path, &v);
    path
}

const SHARD1: &str = "model-00001-of-00003.safetensors";
const SHARD2: &str = "model-00002-of-00003.safetensors";
const SHARD3: &str = "model-00003-of-00003.safetensors";

#[test]
fn sharded_fixture_loads() {
    // Control: the unmodified copy loads, so the failures below come from the edits.
    let tmp = copy_fixture("tiny-qwen2");
    load(tmp.path()).unwrap();
    let tmp = copy_fixture("tiny-llama");
    load(tmp.path()).unwrap();
}

#[test]
fn sharded_index_names_missing_shard() {
    let tmp = copy_fixture("tiny-qwen2");
    let shard = tmp.path().join(SHARD3);
    std::fs::remove_file(&shard).unwrap();
    expect_err!(load(tmp.path()), Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound, [shown(&shard)]);
    // A shard name the index invents.
    let tmp = copy_fixture("tiny-qwen2");
    edit_index(tmp.path(), |v| {
        v["weight_map"]["model.norm.weight"] = json!("model-00004-of-00003.safetensors");
    });
    expect_err!(load(tmp.path()), Error::Io { .. }, [shown(&tmp.path().join("model-00004-of-00003.safetensors"))]);
}

#[test]
fn sharded_index_path_escape() {
    for bad in [
        format!("../{SHARD1}"),
        format!("sub/{SHARD1}"),
        "..".to_string(),
        format!("..\\{SHARD1}"),
        "/etc/passwd".to_string(),
        ".".to_string(),
        "".to_string(),
    ] {
        let tmp = copy_fixture("tiny-qwen2");
        let index = edit_index(tmp.path(), |v| {
            v["weight_map"]["model.norm.weight"] = json!(bad);
        });
        expect_err!(
            load(tmp.path()),
            Error::InvalidField { field, .. } if field == "weight_map.model.norm.weight",
            [shown(&index), "weight_map.model.norm.weight"]
        );
    }
}

#[test]
fn sharded_index_wrong_shard() {
    let tmp = copy_fixture("tiny-qwen2");
    let name = "model.layers.0.input_layernorm.weight";
    let index = read_json(&index_path(tmp.path()));
    assert_eq!(index["weight_map"][name], json!(SHARD1));
    edit_index(tmp.path(), |v| {
        v["weight_map"][name] = json!(SHARD2);
    });
    expect_err!(load(tmp.path()), Error::MissingTensor { tensor, .. } if tensor == name, [shown(&tmp.path().join(SHARD2)), name]);
}

#[test]
fn sharded_index_malformed() {
    // No weight_map.
    let tmp = copy_fixture("tiny-qwen2");
    let index = edit_index(tmp.path(), |v| {
        v.as_object_mut().unwrap().remove("weight_map");
    });
    expect_err!(load(tmp.path()), Error::MissingField { field, .. } if field == "weight_map", [shown(&index), "weight_map"]);
    // weight_map of the wrong type, or empty.
    for wm in [json!([SHARD1]), json!(SHARD1), json!({})] {
        let tmp = copy_fixture("tiny-qwen2");
        let index = edit_index(tmp.path(), |v| {
            v["weight_map"] = wm.clone();
        });
        expect_err!(load(tmp.path()), Error::InvalidField { field, .. } if field == "weight_map", [shown(&index), "weight_map"]);
    }
    // A non-string shard name.
    let tmp = copy_fixture("tiny-qwen2");
    let index = edit_index(tmp.path(), |v| {
        v["weight_map"]["model.norm.weight"] = json!(3);
    });
    expect_err!(
        load(tmp.path()),
        Error::InvalidField { field, .. } if field == "weight_map.model.norm.weight",
        [shown(&index), "weight_map.model.norm.weight"]
    );
    // Not JSON.
    let tmp = copy_fixture("tiny-qwen2");
    let index = index_path(tmp.path());
    std::fs::write(&index, "{\"weight_map\": {").unwrap();
    expect_err!(load(tmp.path()), Error::Format { format: "JSON", .. }, [shown(&index)]);
}

#[test]
fn sharded_truncated_shard() {
    let tmp = copy_fixture("tiny-qwen2");
    let shard = tmp.path().join(SHARD2);
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 10]).unwrap();
    expect_err!(load(tmp.path()), Error::Format { .. }, [shown(&shard)]);
}

#[test]
fn sharded_tensor_in_two_shards() {
    let tmp = copy_fixture("tiny-qwen2");
    let name = "model.norm.weight";
    let from = tmp.path().join(read_json(&index_path(tmp.path()))["weight_map"][name].as_str().unwrap());
    let other = if from.ends_with(SHARD1) { SHARD3 } else { SHARD1 };
    let dup = read_tensors(&from).into_iter().find(|t| t.name == name).unwrap();
    edit_tensors(&tmp.path().join(other), |t| t.push(dup));
    expect_err!(load(tmp.path()), Error::Format { .. }, [name, SHARD1]);
}

#[test]
fn no_weights_in_dir() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("tiny-llama/config.json"), tmp.path().join("config.json")).unwrap();
    expect_err!(load(tmp.path()), Error::Io { .. }, [shown(&tmp.path().join("model.safetensors")), "model.safetensors.index.json"]);
    expect_err!(SafetensorsSet::open_dir(tmp.path()), Error::Io { .. }, ["model.safetensors"]);
    // A directory where the weight file should be.
    std::fs::create_dir(tmp.path().join("model.safetensors")).unwrap();
    expect_err!(load(tmp.path()), Error::Io { .. } | Error::Format { .. }, [shown(&tmp.path().join("model.safetensors"))]);
}

#[test]
fn get_f32_errors_name_the_tensor() {
    let path = fixture("tiny-llama/model.safetensors");
    let st = SafetensorsSet::open_files(std::slice::from_ref(&path)).unwrap();
    expect_err!(st.get_f32("no.such.tensor", &[1]), Error::MissingTensor { tensor, .. } if tensor == "no.such.tensor", [shown(&path), "no.such.tensor"]);
    expect_err!(
        st.get_f32("model.norm.weight", &[97]),
        Error::ShapeMismatch { tensor, .. } if tensor == "model.norm.weight",
        [shown(&path), "model.norm.weight", "[97]", "[96]"]
    );
    expect_err!(st.get_i64("model.norm.weight"), Error::UnsupportedDtype { tensor, .. } if tensor == "model.norm.weight", [shown(&path), "BF16"]);
    let none = SafetensorsSet::open_files(&[]).unwrap();
    expect_err!(none.get_f32("x", &[1]), Error::MissingTensor { .. }, ["`x`"]);
}

// ---------------------------------------------------------------------------------------------
// 3. tokenizer

/// A small valid word-level tokenizer.json.
fn tokenizer_json() -> String {
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "hello": 1, "world": 2, "<|im_end|>": 3}, "unk_token": "<unk>"}
    })
    .to_string()
}

/// A directory holding a valid tokenizer.json and, when given, a tokenizer_config.json.
fn tokenizer_dir(config: Option<&Value>) -> TempDir {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("tokenizer.json"), tokenizer_json()).unwrap();
    if let Some(c) = config {
        write_json(&tmp.path().join("tokenizer_config.json"), c);
    }
    tmp
}

fn chat() -> Vec<ChatMessage> {
    vec![ChatMessage { role: "user".into(), content: "hello".into() }]
}

fn load_tok(dir: &Path) -> ilrec::Result<TextTokenizer> {
    catch_unwind(|| TextTokenizer::load(dir)).expect("TextTokenizer::load panicked")
}

#[test]
fn tokenizer_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tokenizer.json");
    expect_err!(load_tok(tmp.path()), Error::Tokenizer { path: p, .. } if p == &path, [shown(&path)]);
}

#[test]
fn tokenizer_corrupt() {
    let src = tokenizer_json().into_bytes();
    let tmp = tokenizer_dir(None);
    let path = tmp.path().join("tokenizer.json");
    let cases: Vec<Vec<u8>> = vec![
        Vec::new(),
        b"not json".to_vec(),
        b"{}".to_vec(),
        b"{\"model\": {\"type\": \"BPE\"}}".to_vec(),
        src[..src.len() / 2].to_vec(),
        vec![0xff, 0xfe, 0x00],
    ];
    for bytes in cases {
        std::fs::write(&path, &bytes).unwrap();
        expect_err!(load_tok(tmp.path()), Error::Tokenizer { path: p, .. } if p == &path, [shown(&path)]);
    }
    // A directory named tokenizer.json.
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    expect_err!(load_tok(tmp.path()), Error::Tokenizer { .. } | Error::Io { .. }, [shown(&path)]);
}

#[test]
fn tokenizer_config_not_json() {
    let tmp = tokenizer_dir(None);
    let cfg = tmp.path().join("tokenizer_config.json");
    std::fs::write(&cfg, "{\"chat_template\": ").unwrap();
    expect_err!(load_tok(tmp.path()), Error::Format { format: "JSON", .. }, [shown(&cfg)]);
}

#[test]
fn chat_template_works_when_valid() {
    // Control for the failures below.
    let tmp = tokenizer_dir(Some(&json!({
        "chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        "eos_token": "<|im_end|>",
    })));
    let tok = load_tok(tmp.path()).unwrap();
    let text = tok.apply_chat_template(&chat(), true).unwrap();
    assert_eq!(text, "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n");
}

#[test]
fn chat_template_broken() {
    for template in [
        "{% for m in messages %}{{ m.content }}",        // unclosed block
        "{{ messages[0].content ",                       // unclosed expression
        "{% if %}x{% endif %}",                          // empty condition
        "{{ raise_exception('no system role allowed') }}", // the template's own failure
        "{{ messages | no_such_filter }}",               // unknown filter
        "{{ 1 // 0 }}",                                  // runtime failure
        "{{ messages[0].content.upper().nothing.deeper }}",
    ] {
        let tmp = tokenizer_dir(Some(&json!({ "chat_template": template })));
        let cfg = tmp.path().join("tokenizer_config.json");
        let tok = load_tok(tmp.path()).unwrap();
        expect_err!(
            tok.apply_chat_template(&chat(), true),
            Error::InvalidField { field, path, .. } if field == "chat_template" && path == &cfg,
            [shown(&cfg), "chat_template"]
        );
    }
}

#[test]
fn chat_template_missing() {
    for config in [Some(json!({"eos_token": "<|im_end|>"})), Some(json!({"chat_template": null})), None] {
        let tmp = tokenizer_dir(config.as_ref());
        let cfg = tmp.path().join("tokenizer_config.json");
        let tok = load_tok(tmp.path()).unwrap();
        expect_err!(
            tok.apply_chat_template(&chat(), false),
            Error::MissingField { field, .. } if field == "chat_template",
            [shown(&cfg), "chat_template"]
        );
    }
}

#[test]
fn tokenizer_decode_out_of_vocab_does_not_panic() {
    let tmp = tokenizer_dir(None);
    let tok = load_tok(tmp.path()).unwrap();
    assert_eq!(tok.encode("hello world").unwrap(), [1, 2]);
    let res = catch_unwind(AssertUnwindSafe(|| tok.decode(&[u32::MAX, 5, 1_000_000], false)));
    // Unknown ids are either skipped or an error naming the tokenizer file; never a panic.
    match res.expect("decode panicked") {
        Ok(_) => {}
        Err(e) => {
            assert!(matches!(e, Error::Tokenizer { .. }), "{e:?}");
            assert!(e.to_string().contains("tokenizer.json"));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 4. forward inputs

fn forward(model: &Model, batch: &Batch, opts: &ForwardOptions) -> ilrec::Result<ilrec::ForwardOutput> {
    catch_unwind(AssertUnwindSafe(|| model.forward(batch, opts))).expect("Model::forward panicked")
}

#[test]
fn batch_new_wrong_lengths() {
    expect_err!(Batch::new(vec![1; 5], vec![true; 6], 2, 3), Error::Input(_), ["2x3", "6", "5"]);
    expect_err!(Batch::new(vec![1; 6], vec![true; 5], 2, 3), Error::Input(_), ["2x3", "6", "5"]);
    expect_err!(Batch::new(vec![1; 7], vec![true; 7], 2, 3), Error::Input(_), ["2x3"]);
    // batch * seq overflowing usize is an error, not a panic.
    expect_err!(Batch::new(vec![1; 2], vec![true; 2], usize::MAX, 2), Error::Input(_), ["too large"]);
    // Empty batches are rejected up front (the forward pass cannot run them).
    expect_err!(Batch::new(vec![], vec![], 2, 0), Error::Input(_), ["2x0", "empty"]);
    expect_err!(Batch::new(vec![], vec![], 0, 3), Error::Input(_), ["0x3", "empty"]);
    expect_err!(Batch::left_padded(&[vec![], vec![]], 0), Error::Input(_), ["empty"]);
    expect_err!(Batch::right_padded(&[vec![]], 0), Error::Input(_), ["empty"]);
    expect_err!(Batch::left_padded(&[], 0), Error::Input(_), ["empty"]);
    expect_err!(Batch::right_padded(&[], 0), Error::Input(_), ["empty"]);
}

#[test]
fn forward_rejects_inconsistent_batch_struct() {
    // The fields are public, so forward re-checks them.
    let model = tiny_llama();
    let batch = Batch { tokens: vec![1, 2, 3], mask: vec![true; 2], batch: 1, seq: 3 };
    expect_err!(forward(model, &batch, &ForwardOptions::default()), Error::Input(_), ["1x3"]);
    let batch = Batch { tokens: vec![1, 2, 3], mask: vec![true; 3], batch: 2, seq: 3 };
    expect_err!(forward(model, &batch, &ForwardOptions::default()), Error::Input(_), ["2x3"]);
}

#[test]
fn forward_token_outside_vocab() {
    let model = tiny_llama();
    let v = model.config.vocab_size as u32;
    let batch = Batch::new(vec![1, 2, 3, 4, 5, v], vec![true; 6], 2, 3).unwrap();
    expect_err!(forward(model, &batch, &ForwardOptions::default()), Error::Input(_), ["sequence 1", "position 2", v.to_string(), "311"]);
    // In a padded position too: the embedding lookup must not index out of bounds.
    let batch = Batch::new(vec![u32::MAX, 2, 3], vec![false, true, true], 1, 3).unwrap();
    expect_err!(forward(model, &batch, &ForwardOptions::default()), Error::Input(_), ["sequence 0", "position 0"]);
}

#[test]
fn forward_taps_out_of_range() {
    let model = tiny_llama();
    let batch = Batch::single(&[1, 2, 3]);
    let n = model.config.num_layers;
    for l in [0, n + 1, usize::MAX] {
        let opts = ForwardOptions { taps: vec![1, l], ..Default::default() };
        expect_err!(forward(model, &batch, &opts), Error::Input(_), [format!("block {l}"), format!("1..={n}")]);
        let opts = ForwardOptions { probe: Some(ProbeSpec { layers: vec![l], tokens: None }), ..Default::default() };
        expect_err!(forward(model, &batch, &opts), Error::Input(_), [format!("block {l}")]);
    }
    // The last block itself is valid.
    let opts = ForwardOptions { taps: vec![n], logits: LogitsMode::None, ..Default::default() };
    assert_eq!(forward(model, &batch, &opts).unwrap().hidden.len(), 1);
}

#[test]
fn forward_probe_token_outside_vocab() {
    let model = tiny_llama();
    let batch = Batch::single(&[1, 2, 3]);
    let v = model.config.vocab_size as u32;
    for t in [v, v + 1, u32::MAX] {
        let opts = ForwardOptions { probe: Some(ProbeSpec { layers: vec![1], tokens: Some(vec![0, t]) }), ..Default::default() };
        expect_err!(forward(model, &batch, &opts), Error::Input(_), [format!("probe token id {t}")]);
    }
}

#[test]
fn forward_cache_batch_mismatch() {
    let model = tiny_llama();
    let mut cache = model.new_cache(2, 8);
    let batch = Batch::single(&[1, 2, 3]);
    let res = catch_unwind(AssertUnwindSafe(|| model.forward_cached(&batch, &mut cache, &ForwardOptions::default())));
    expect_err!(res.expect("forward_cached panicked"), Error::Input(_), ["1 sequences", "cache of 2"]);
}

#[test]
fn forward_empty_sequence() {
    let model = tiny_llama();
    // Either a clean error or an empty result: never a panic.
    for (batch, logits) in [
        (Batch::single(&[]), LogitsMode::Last),
        (Batch::single(&[]), LogitsMode::All),
        (Batch { tokens: vec![], mask: vec![], batch: 2, seq: 0 }, LogitsMode::Last),
        (Batch { tokens: vec![], mask: vec![], batch: 0, seq: 3 }, LogitsMode::All),
    ] {
        let opts = ForwardOptions { logits, ..Default::default() };
        let res = catch_unwind(AssertUnwindSafe(|| model.forward(&batch, &opts)));
        assert!(res.is_ok(), "forward of a {}x{} batch panicked", batch.batch, batch.seq);
    }
}

#[test]
fn forward_fully_padded_row_does_not_panic() {
    let model = tiny_llama();
    let batch = Batch::new(vec![1, 2, 3, 0, 0, 0], vec![true, true, true, false, false, false], 2, 3).unwrap();
    let opts = ForwardOptions { logits: LogitsMode::All, ..Default::default() };
    let out = forward(model, &batch, &opts).unwrap();
    let logits = out.logits.unwrap().into_f32_vec();
    let v = model.config.vocab_size;
    // The real row's logits stay finite whatever the padding row computes.
    assert!(logits[..3 * v].iter().all(|x| x.is_finite()));
}

#[test]
fn generate_bad_arguments() {
    let model = tiny_llama();
    let gen = |prompt: &[u32], opts: &GenerateOptions| {
        catch_unwind(AssertUnwindSafe(|| model.generate(prompt, opts, |_| {}))).expect("Model::generate panicked")
    };
    let base = GenerateOptions { max_new_tokens: 2, ..Default::default() };
    expect_err!(gen(&[], &base), Error::Input(_), ["empty prompt"]);
    for top_p in [0.0, -0.5, 1.5, f32::NAN] {
        let o = GenerateOptions { top_p, temperature: 1.0, ..base.clone() };
        expect_err!(gen(&[1, 2], &o), Error::Input(_), ["top_p"]);
    }
    for temperature in [-1.0, -f32::MIN_POSITIVE, f32::NAN, f32::INFINITY] {
        let o = GenerateOptions { temperature, ..base.clone() };
        expect_err!(gen(&[1, 2], &o), Error::Input(_), ["temperature"]);
    }
    let v = model.config.vocab_size as u32;
    expect_err!(gen(&[1, v], &base), Error::Input(_), ["token id 311", "position 1"]);
    // Valid edge cases work.
    assert!(gen(&[1, 2], &GenerateOptions { max_new_tokens: 0, ..base.clone() }).unwrap().is_empty());
    let o = GenerateOptions { temperature: 0.7, top_k: 100_000, top_p: 1e-9, seed: 3, ..base.clone() };
    assert_eq!(gen(&[1, 2], &o).unwrap().len(), 2);
}
