//! GGUF reader, dequantisation, Llama/Qwen2 import and tokenizer rebuild.
//!
//! Fixtures come from `scripts/fixtures/gguf_fixtures.py` (the `gguf` PyPI package and
//! transformers); see that script for what each file holds.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ilrec::weights::gguf::{
    build_tokenizer, import_gguf, import_gguf_with, Architecture, GgmlType, GgufFile,
    ImportOptions, MetaArray, MetaValue,
};
use ilrec::Error;
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf")
        .join(name)
}

fn smollm2_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// All tensors of a safetensors file as `(shape, f32 values)`.
fn load_safetensors(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            let data = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (name, (view.shape().to_vec(), data))
        })
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

// ---------------------------------------------------------------------------------------------
// Reader and dequantisation.

#[test]
fn dequantisation_matches_gguf_py_bit_for_bit() {
    let f = GgufFile::open(&fixture("quant.gguf")).unwrap();
    let reference = load_safetensors(&fixture("quant_ref.safetensors"));
    let expected_types = [
        ("t.f32", GgmlType::F32),
        ("t.f16", GgmlType::F16),
        ("t.bf16", GgmlType::BF16),
        ("t.q8_0", GgmlType::Q8_0),
        ("t.q4_0", GgmlType::Q4_0),
        ("t.q4_1", GgmlType::Q4_1),
        ("t.q5_0", GgmlType::Q5_0),
        ("t.q5_1", GgmlType::Q5_1),
        ("t.q4_k", GgmlType::Q4_K),
        ("t.q6_k", GgmlType::Q6_K),
    ];
    assert_eq!(reference.len(), expected_types.len());
    for (name, dtype) in expected_types {
        let info = f.tensor(name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(info.dtype, dtype, "{name}");
        let (shape, want) = &reference[name];
        assert_eq!(&info.shape, shape, "{name}");
        let got = f.dequantize(name).unwrap();
        let mismatches = got
            .iter()
            .zip(want)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(
            mismatches,
            0,
            "{name}: {mismatches} values differ from gguf-py (max abs diff {})",
            max_abs_diff(&got, want)
        );
        assert!(got.iter().any(|&v| v != 0.0), "{name}: all zeros");
    }
    // The 3-D tensor keeps its row-major shape (ggml stores dims innermost first).
    assert_eq!(f.tensor("t.f16").unwrap().ggml_dims(), vec![64, 5, 3]);
}

#[test]
fn metadata_of_every_value_type() {
    let f = GgufFile::open(&fixture("quant.gguf")).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.data_offset() % 64, 0);
    for t in f.tensors() {
        assert_eq!((t.offset - f.data_offset()) % 64, 0, "{}", t.name);
    }
    let get = |k: &str| f.get(k).unwrap_or_else(|| panic!("{k} missing")).clone();
    assert_eq!(get("test.u8"), MetaValue::U8(200));
    assert_eq!(get("test.i8"), MetaValue::I8(-100));
    assert_eq!(get("test.u16"), MetaValue::U16(60000));
    assert_eq!(get("test.i16"), MetaValue::I16(-30000));
    assert_eq!(get("test.u32"), MetaValue::U32(4_000_000_000));
    assert_eq!(get("test.i32"), MetaValue::I32(-2_000_000_000));
    assert_eq!(get("test.f32"), MetaValue::F32(0.15625));
    assert_eq!(get("test.bool"), MetaValue::Bool(true));
    assert_eq!(get("test.string"), MetaValue::String("naïve ✓".into()));
    assert_eq!(get("test.u64"), MetaValue::U64((1 << 63) + 5));
    assert_eq!(get("test.i64"), MetaValue::I64(-(1 << 62)));
    assert_eq!(get("test.f64"), MetaValue::F64(-2.5e-300));
    assert_eq!(
        get("test.array_str"),
        MetaValue::Array(MetaArray::String(vec![
            "a".into(),
            "".into(),
            "日本".into()
        ]))
    );
    assert_eq!(
        get("test.array_u16"),
        MetaValue::Array(MetaArray::U16(vec![1, 2, 65535]))
    );
    assert_eq!(
        get("test.array_f32"),
        MetaValue::Array(MetaArray::F32(vec![1.5, -2.0]))
    );
    assert_eq!(
        get("test.array_nested"),
        MetaValue::Array(MetaArray::Array(vec![
            MetaArray::I32(vec![1, 2]),
            MetaArray::I32(vec![3])
        ]))
    );
    assert_eq!(
        get("test.array_bool"),
        MetaValue::Array(MetaArray::Bool(vec![true, false, true]))
    );
    assert_eq!(f.str_field("general.architecture").unwrap(), "test");
    assert_eq!(f.u64_field("test.u16").unwrap(), 60000);
    assert!(
        matches!(f.u64_field("test.i8"), Err(Error::InvalidField { ref field, .. }) if field == "test.i8")
    );
    assert!(
        matches!(f.str_field("nope"), Err(Error::MissingField { ref field, .. }) if field == "nope")
    );
}

// ---------------------------------------------------------------------------------------------
// Import of tiny models.

#[test]
fn llama_import_undoes_qk_permutation() {
    let gguf = fixture("tiny_llama.gguf");
    let hf = load_safetensors(&fixture("tiny_llama_hf.safetensors"));
    // The fixture really is permuted: the raw Q rows differ from the HF ones.
    let f = GgufFile::open(&gguf).unwrap();
    let raw_q = f.dequantize("blk.0.attn_q.weight").unwrap();
    assert_ne!(raw_q, hf["model.layers.0.self_attn.q_proj.weight"].1);

    let dir = tempfile::tempdir().unwrap();
    let reports = std::cell::Cell::new(0);
    let progress = |p: ilrec::weights::gguf::ImportProgress<'_>| {
        assert!(p.done <= p.total && !p.tensor.is_empty());
        reports.set(reports.get() + 1);
    };
    let opts = ImportOptions {
        progress: Some(&progress),
        ..Default::default()
    };
    let summary = import_gguf_with(&gguf, dir.path(), &opts).unwrap();
    assert_eq!(summary.architecture, Architecture::Llama);
    assert_eq!(summary.n_tensors, hf.len());
    assert_eq!(reports.get(), hf.len());
    assert_eq!(summary.dtype_counts.get("F32"), Some(&hf.len()));
    let n_params: usize = hf.values().map(|(_, v)| v.len()).sum();
    assert_eq!(summary.n_params, n_params as u64);

    let got = load_safetensors(&dir.path().join("model.safetensors"));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        hf.keys().collect::<Vec<_>>()
    );
    for (name, (shape, want)) in &hf {
        let (gshape, gdata) = &got[name];
        assert_eq!(gshape, shape, "{name}");
        assert!(
            gdata == want,
            "{name}: max abs diff {}",
            max_abs_diff(gdata, want)
        );
    }

    let cfg: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    assert_eq!(cfg["model_type"], "llama");
    assert_eq!(cfg["hidden_size"], 32);
    assert_eq!(cfg["intermediate_size"], 48);
    assert_eq!(cfg["num_attention_heads"], 4);
    assert_eq!(cfg["num_key_value_heads"], 2);
    assert_eq!(cfg["num_hidden_layers"], 2);
    assert_eq!(cfg["rms_norm_eps"], 1e-5);
    assert_eq!(cfg["rope_theta"], 100000.0);
    assert_eq!(cfg["max_position_embeddings"], 256);
    assert_eq!(cfg["vocab_size"], hf["model.embed_tokens.weight"].0[0]);
    assert_eq!(cfg["tie_word_embeddings"], false);
    assert_eq!(cfg["bos_token_id"], 1);
    assert_eq!(cfg["eos_token_id"], 2);
    assert_eq!(cfg["torch_dtype"], "float32");
    assert!(cfg.get("head_dim").is_none(), "no key_length in the file");

    let tok = tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
    // Merges of the fixture: "Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r".
    let enc = tok.encode("<|im_start|> the in", true).unwrap();
    let pieces: Vec<&str> = enc.get_tokens().iter().map(String::as_str).collect();
    assert_eq!(pieces, ["<|im_start|>", "Ġthe", "Ġ", "in"]);
    assert_eq!(enc.get_ids()[0], 1);
    let tcfg: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(tcfg["bos_token"], "<|im_start|>");
    assert_eq!(tcfg["eos_token"], "<|im_end|>");
    assert!(tcfg["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));
    // Atomic writes leave no temporary files behind.
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
}

#[test]
fn qwen2_import_keeps_biases_and_ties_embeddings() {
    let gguf = fixture("tiny_qwen2.gguf");
    let hf = load_safetensors(&fixture("tiny_qwen2_hf.safetensors"));
    let dir = tempfile::tempdir().unwrap();
    let summary = import_gguf(&gguf, dir.path()).unwrap();
    assert_eq!(summary.architecture, Architecture::Qwen2);
    let got = load_safetensors(&dir.path().join("model.safetensors"));
    assert!(!got.contains_key("lm_head.weight"));
    assert!(got.contains_key("model.layers.0.self_attn.q_proj.bias"));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        hf.keys().collect::<Vec<_>>()
    );
    for (name, (shape, want)) in &hf {
        assert_eq!(&got[name].0, shape, "{name}");
        assert!(&got[name].1 == want, "{name}");
    }
    let cfg: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "Qwen2ForCausalLM");
    assert_eq!(cfg["model_type"], "qwen2");
    assert_eq!(cfg["tie_word_embeddings"], true);
    assert_eq!(cfg["rope_theta"], 1000000.0);
}

// ---------------------------------------------------------------------------------------------
// Bad input: every failure is a typed error naming the file, never a panic.

/// Writes `bytes` to a temporary file and opens it as GGUF.
fn open_bytes(bytes: &[u8]) -> (tempfile::TempDir, PathBuf, Result<GgufFile, Error>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    std::fs::write(&path, bytes).unwrap();
    let r = GgufFile::open(&path);
    (dir, path, r)
}

fn assert_format_error(r: Result<GgufFile, Error>, path: &Path, needle: &str) {
    match r {
        Err(Error::Format { path: p, msg, .. }) => {
            assert_eq!(p, path);
            assert!(msg.contains(needle), "message {msg:?} lacks {needle:?}");
            let shown = Error::Format {
                path: p,
                format: "GGUF",
                msg,
            }
            .to_string();
            assert!(shown.contains("bad.gguf"), "{shown}");
        }
        Err(e) => panic!("expected a Format error mentioning {needle:?}, got {e}"),
        Ok(_) => panic!("expected a Format error mentioning {needle:?}, got Ok"),
    }
}

/// A minimal GGUF writer for hand-made (and hand-broken) files.
struct Builder {
    version: u32,
    n_kv: u64,
    kv: Vec<u8>,
    n_tensors: u64,
    infos: Vec<u8>,
    data: Vec<u8>,
}

impl Builder {
    fn new() -> Self {
        Builder {
            version: 3,
            n_kv: 0,
            kv: Vec::new(),
            n_tensors: 0,
            infos: Vec::new(),
            data: Vec::new(),
        }
    }
    fn string(buf: &mut Vec<u8>, s: &str) {
        buf.extend((s.len() as u64).to_le_bytes());
        buf.extend(s.as_bytes());
    }
    fn kv_raw(&mut self, key: &str, ty: u32, value: &[u8]) -> &mut Self {
        Self::string(&mut self.kv, key);
        self.kv.extend(ty.to_le_bytes());
        self.kv.extend(value);
        self.n_kv += 1;
        self
    }
    fn kv_str(&mut self, key: &str, v: &str) -> &mut Self {
        let mut b = Vec::new();
        Self::string(&mut b, v);
        self.kv_raw(key, 8, &b)
    }
    /// Appends tensor data (aligned to 32) and its info; `offset` overrides the real offset.
    fn tensor(
        &mut self,
        name: &str,
        ne: &[u64],
        ty: u32,
        data: &[u8],
        offset: Option<u64>,
    ) -> &mut Self {
        let real = self.data.len() as u64;
        self.data.extend(data);
        self.data.resize(self.data.len().next_multiple_of(32), 0);
        Self::string(&mut self.infos, name);
        self.infos.extend((ne.len() as u32).to_le_bytes());
        for d in ne {
            self.infos.extend(d.to_le_bytes());
        }
        self.infos.extend(ty.to_le_bytes());
        self.infos.extend(offset.unwrap_or(real).to_le_bytes());
        self.n_tensors += 1;
        self
    }
    fn build(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend(self.n_tensors.to_le_bytes());
        out.extend(self.n_kv.to_le_bytes());
        out.extend(&self.kv);
        out.extend(&self.infos);
        out.resize(out.len().next_multiple_of(32), 0);
        out.extend(&self.data);
        out
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn hand_made_file_reads_back() {
    let mut b = Builder::new();
    b.kv_str("general.architecture", "x")
        .tensor("a", &[3, 2], 0, &f32_bytes(&[1., 2., 3., 4., 5., 6.]), None)
        .tensor("b", &[2], 1, &[0x00, 0x3c, 0x00, 0xc0], None); // f16 1.0, -2.0
    let (_d, _p, r) = open_bytes(&b.build());
    let f = r.unwrap();
    assert_eq!(f.tensor("a").unwrap().shape, vec![2, 3]);
    assert_eq!(f.dequantize("a").unwrap(), vec![1., 2., 3., 4., 5., 6.]);
    assert_eq!(f.dequantize("b").unwrap(), vec![1.0, -2.0]);
    assert!(
        matches!(f.dequantize("c"), Err(Error::MissingTensor { ref tensor, .. }) if tensor == "c")
    );
}

#[test]
fn truncated_files_are_format_errors() {
    let bytes = std::fs::read(fixture("tiny_llama.gguf")).unwrap();
    let f = GgufFile::open(&fixture("tiny_llama.gguf")).unwrap();
    let data = f.data_offset() as usize;
    let cuts = [
        0,
        3,
        4,
        7,
        8,
        15,
        23,
        24,
        40,
        1000,
        data / 2,
        data - 40,
        data - 1,
        data,
        data + 100,
        bytes.len() - 1000,
        bytes.len() - 1,
    ];
    for cut in cuts {
        let (_d, path, r) = open_bytes(&bytes[..cut]);
        let needle = if cut < 4 { "truncated" } else { "" };
        assert_format_error(r, &path, needle);
        // The importer reports the same error.
        let out = tempfile::tempdir().unwrap();
        assert!(
            matches!(import_gguf(&path, out.path()), Err(Error::Format { ref path, .. }) if path.ends_with("bad.gguf")),
            "cut at {cut}"
        );
    }
}

#[test]
fn bad_headers_are_format_errors() {
    let good = std::fs::read(fixture("tiny_llama.gguf")).unwrap();
    let patched = |at: usize, with: &[u8]| {
        let mut b = good.clone();
        b[at..at + with.len()].copy_from_slice(with);
        b
    };
    let (_d, p, r) = open_bytes(&patched(0, b"GGML"));
    assert_format_error(r, &p, "magic");
    let (_d, p, r) = open_bytes(&patched(4, &1u32.to_le_bytes()));
    assert_format_error(r, &p, "version 1");
    let (_d, p, r) = open_bytes(&patched(4, &3u32.to_be_bytes()));
    assert_format_error(r, &p, "big-endian");
    let (_d, p, r) = open_bytes(&patched(4, &77u32.to_le_bytes()));
    assert_format_error(r, &p, "version 77");
    let (_d, p, r) = open_bytes(&patched(8, &(1u64 << 60).to_le_bytes()));
    assert_format_error(r, &p, "tensor count");
    let (_d, p, r) = open_bytes(&patched(16, &u64::MAX.to_le_bytes()));
    assert_format_error(r, &p, "metadata count");
    // The first key's length.
    let (_d, p, r) = open_bytes(&patched(24, &(1u64 << 62).to_le_bytes()));
    assert_format_error(r, &p, "string length");
}

#[test]
fn corrupt_metadata_and_tensor_infos_are_format_errors() {
    // An array claiming more elements than the file has bytes.
    let mut v = 5u32.to_le_bytes().to_vec();
    v.extend((1u64 << 59).to_le_bytes());
    let mut b = Builder::new();
    b.kv_raw("huge", 9, &v);
    let (_d, p, r) = open_bytes(&b.build());
    assert_format_error(r, &p, "array of 576460752303423488 elements");

    // Unknown metadata value type.
    let mut b = Builder::new();
    b.kv_raw("weird", 13, &[0; 8]);
    let (_d, p, r) = open_bytes(&b.build());
    assert_format_error(r, &p, "unknown value type 13");

    // Arrays nested without end.
    let mut nested = Vec::new();
    for _ in 0..100 {
        nested.extend(9u32.to_le_bytes());
        nested.extend(1u64.to_le_bytes());
    }
    nested.extend([0; 16]);
    let mut b = Builder::new();
    b.kv_raw("deep", 9, &nested);
    let (_d, p, r) = open_bytes(&b.build());
    assert_format_error(r, &p, "nested");

    // Tensor data past the end of the file.
    let mut b = Builder::new();
    b.tensor("w", &[4], 0, &f32_bytes(&[1., 2., 3., 4.]), Some(1 << 20));
    let (_d, p, r) = open_bytes(&b.build());
    assert_format_error(r, &p, "tensor `w`");

    // Data offset overflowing u64.
    let mut b = Builder::new();
    b.tensor(
        "w",
        &[4],
        0,
        &f32_bytes(&[1., 2., 3., 4.]),
        Some(u64::MAX - 31),
    );
    let (_d, p, r) = open_bytes(&b.build());
    assert_format_error(r, &p, "tensor `w`");

    // Dimensions whose byte size cannot be what the file holds.
    let mut b = Builder::new();
    b.tensor("w", &[1 << 40, 1 << 40], 0, &[0; 64], None);
    let (_d, p, r) = open_bytes(&b.build());
    assert_format_error(r, &p, "tensor `w`");
    let mut b = Builder::new();
    b.tensor("w", &[u64::MAX, 3], 0, &[0; 64], None);
    let (_d, p, r) = open_bytes(&b.build());
    assert_format_error(r, &p, "overflow");

    // A Q8_0 row that is not a whole number of 32-element blocks.
    let mut b = Builder::new();
    b.tensor("q", &[33, 2], 8, &[0; 136], None);
    let (_d, p, r) = open_bytes(&b.build());
    assert_format_error(r, &p, "block size 32");

    // Too many dimensions; misaligned offset; duplicate names.
    let mut b = Builder::new();
    b.tensor("w", &[1, 1, 1, 1, 1], 0, &[0; 4], None);
    let (_d, p, r) = open_bytes(&b.build());
    assert_format_error(r, &p, "5 dimensions");
    let mut b = Builder::new();
    b.tensor("w", &[1], 0, &[0; 4], Some(4));
    let (_d, p, r) = open_bytes(&b.build());
    assert_format_error(r, &p, "alignment");
    let mut b = Builder::new();
    b.tensor("w", &[1], 0, &[0; 4], None)
        .tensor("w", &[1], 0, &[0; 4], None);
    let (_d, p, r) = open_bytes(&b.build());
    assert_format_error(r, &p, "duplicate tensor name");

    // An alignment that is not a power of two.
    let mut b = Builder::new();
    b.kv_raw("general.alignment", 4, &3u32.to_le_bytes());
    let (_d, _p, r) = open_bytes(&b.build());
    assert!(
        matches!(r, Err(Error::InvalidField { ref field, .. }) if field == "general.alignment")
    );
}

#[test]
fn unsupported_tensor_types_are_named() {
    let path = fixture("unsupported.gguf");
    let f = GgufFile::open(&path).unwrap();
    match f.dequantize("t.q2_k") {
        Err(Error::UnsupportedDtype {
            path: p,
            tensor,
            dtype,
        }) => {
            assert_eq!(p, path);
            assert_eq!(tensor, "t.q2_k");
            assert_eq!(dtype, "Q2_K");
        }
        other => panic!("expected UnsupportedDtype, got {other:?}"),
    }
    assert_eq!(
        f.dequantize("t.f32").unwrap(),
        (0..8).map(|i| i as f32).collect::<Vec<_>>()
    );

    // A type id no one knows: the file opens, the tensor cannot be read.
    let mut b = Builder::new();
    b.tensor("odd", &[4], 200, &[0; 16], None);
    let (_d, p, r) = open_bytes(&b.build());
    let f = r.unwrap();
    assert_eq!(f.tensor("odd").unwrap().dtype, GgmlType::Unknown(200));
    assert!(matches!(f.dequantize("odd"),
        Err(Error::UnsupportedDtype { ref path, ref tensor, ref dtype }) if path == &p && tensor == "odd" && dtype.contains("200")));

    // The importer refuses before writing anything.
    let mut bytes = std::fs::read(fixture("tiny_llama.gguf")).unwrap();
    let name = b"blk.1.ffn_up.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let ty_at = at + 4 + 8 * n_dims;
    bytes[ty_at..ty_at + 4].copy_from_slice(&200u32.to_le_bytes());
    let (_d, p, _) = open_bytes(&bytes);
    let out = tempfile::tempdir().unwrap();
    match import_gguf(&p, out.path()) {
        Err(Error::UnsupportedDtype { tensor, .. }) => assert_eq!(tensor, "blk.1.ffn_up.weight"),
        other => panic!("expected UnsupportedDtype, got {other:?}"),
    }
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
}

#[test]
fn random_corruption_never_panics() {
    let good = std::fs::read(fixture("tiny_qwen2.gguf")).unwrap();
    let header_len = GgufFile::open(&fixture("tiny_qwen2.gguf"))
        .unwrap()
        .data_offset() as usize;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fuzz.gguf");
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut ok, mut err) = (0, 0);
    for _ in 0..300 {
        let mut b = good.clone();
        for _ in 0..1 + next() % 4 {
            // Mostly hit lengths/counts near the start, sometimes anywhere in the header.
            let at = if next() % 2 == 0 {
                (next() % 64) as usize
            } else {
                (next() as usize) % header_len
            };
            b[at] = next() as u8;
        }
        std::fs::write(&path, &b).unwrap();
        match GgufFile::open(&path) {
            Ok(f) => {
                ok += 1;
                for t in f.tensors() {
                    let _ = f.dequantize(&t.name);
                }
            }
            Err(Error::Format { .. } | Error::InvalidField { .. }) => err += 1,
            Err(e) => panic!("unexpected error kind: {e}"),
        }
    }
    assert!(err > 0 && ok + err == 300);
}

// ---------------------------------------------------------------------------------------------
// The real SmolLM2 file (skipped when absent: scripts/fetch-smollm2.sh fetches it).

fn skip_without_smollm2() -> bool {
    if smollm2_path().exists() {
        return false;
    }
    println!(
        "skipped: {} is absent (run scripts/fetch-smollm2.sh)",
        smollm2_path().display()
    );
    true
}

#[test]
fn smollm2_tokenizer_matches_reference_ids() {
    if skip_without_smollm2() {
        return;
    }
    let fx: Value =
        serde_json::from_slice(&std::fs::read(fixture("smollm2_tokenizer_ids.json")).unwrap())
            .unwrap();
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    let f = GgufFile::open(&smollm2_path()).unwrap();
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    for (transformers_split, key) in [(false, "smollm"), (true, "transformers")] {
        let files = build_tokenizer(&f, transformers_split).unwrap();
        assert!(files.warnings.is_empty(), "{:?}", files.warnings);
        assert_eq!(files.n_tokens, 49152);
        let tok = tokenizers::Tokenizer::from_bytes(files.tokenizer_json.as_bytes()).unwrap();
        for case in cases {
            let text = case["text"].as_str().unwrap();
            let got = tok.encode(text, true).unwrap().get_ids().to_vec();
            assert_eq!(got, ids(&case[key]), "{key} ids of {text:?}");
        }
    }
    // The two reference tokenizers do differ somewhere, so the test above can tell them apart.
    assert!(cases.iter().any(|c| c["smollm"] != c["transformers"]));
    let chat = build_tokenizer(&f, false).unwrap();
    let cfg: Value = serde_json::from_str(&chat.tokenizer_config_json).unwrap();
    assert_eq!(cfg["bos_token"], "<|im_start|>");
    assert_eq!(cfg["eos_token"], "<|im_end|>");
    assert_eq!(cfg["pad_token"], "<|im_end|>");
    assert_eq!(cfg["unk_token"], "<|endoftext|>");
    assert!(cfg["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));
}

#[test]
fn smollm2_import_matches_transformers_weights() {
    if skip_without_smollm2() {
        return;
    }
    let fx: Value =
        serde_json::from_slice(&std::fs::read(fixture("smollm2_reference.json")).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let summary = import_gguf(&smollm2_path(), dir.path()).unwrap();
    assert_eq!(summary.architecture, Architecture::Llama);
    assert_eq!(summary.n_tensors, 272);
    assert_eq!(summary.dtype_counts["Q4_1"], 210);
    assert_eq!(summary.dtype_counts["F32"], 61);
    assert_eq!(summary.dtype_counts["Q8_0"], 1);
    assert_eq!(summary.n_params, 134_515_008);

    let cfg: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap()).unwrap();
    for (k, v) in fx["config"].as_object().unwrap() {
        if k == "rms_norm_eps" {
            let got = cfg[k].as_f64().unwrap();
            assert!((got - v.as_f64().unwrap()).abs() < 1e-12, "{k}");
        } else if v.is_number() {
            assert_eq!(cfg[k].as_f64(), v.as_f64(), "{k}");
        } else {
            assert_eq!(&cfg[k], v, "{k}");
        }
    }
    assert_eq!(cfg["tie_word_embeddings"], true);

    let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(st.tensor("lm_head.weight").is_err());
    for slice in fx["slices"].as_array().unwrap() {
        let name = slice["tensor"].as_str().unwrap();
        let view = st.tensor(name).unwrap();
        let ncols = view.shape()[1];
        let cols = slice["cols"].as_u64().unwrap() as usize;
        for (row, want) in slice["rows"]
            .as_array()
            .unwrap()
            .iter()
            .zip(slice["values"].as_array().unwrap())
        {
            let r = row.as_u64().unwrap() as usize;
            let got: Vec<f32> = view.data()[4 * r * ncols..4 * (r * ncols + cols)]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let want: Vec<f32> = want
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            assert!(
                max_abs_diff(&got, &want) <= 1e-6,
                "{name} row {r}: {got:?} vs {want:?}"
            );
        }
    }
}
