//! GGUF: reading llama.cpp model files and importing them as Hugging Face model directories.
//!
//! - [`GgufFile`] parses a GGUF (v2/v3, little-endian): metadata of every value type, the tensor
//!   directory, and tensor data on demand, dequantised to f32 by [`GgufFile::dequantize`]
//!   (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K).
//! - [`import_gguf`] converts a `llama` or `qwen2` GGUF into `model.safetensors` (f32, HF tensor
//!   names and layout), `config.json`, `tokenizer.json` and `tokenizer_config.json`.
//!
//! See `docs/gguf.md` for the layout conversions and the limits.
use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, View};

mod convert;
mod quant;
mod reader;
mod tokenizer;
mod types;

pub use convert::Architecture;
pub use reader::{GgufFile, MetaArray, MetaType, MetaValue, TensorInfo};
pub use types::GgmlType;

use crate::error::{Error, Result};
use convert::{plan_tensors, unpermute_rows, ModelConfig, TensorPlan};

/// What [`import_gguf`] wrote.
#[derive(Clone, Debug)]
pub struct ImportSummary {
    /// The model family of the file.
    pub architecture: Architecture,
    /// Number of tensors written to `model.safetensors`.
    pub n_tensors: usize,
    /// Number of parameters (elements over all written tensors).
    pub n_params: u64,
    /// How many of the file's tensors were stored in each GGML type (`"Q4_1" -> 210`).
    pub dtype_counts: BTreeMap<String, usize>,
    /// Number of tokens in the rebuilt tokenizer's vocabulary.
    pub n_tokens: usize,
    /// The files written, in the order they were written.
    pub files: Vec<PathBuf>,
    /// Things the caller may want to show the user (the library prints nothing).
    pub warnings: Vec<String>,
}

/// Progress of an import, reported once per tensor as it is converted.
#[derive(Clone, Copy, Debug)]
pub struct ImportProgress<'a> {
    /// HF name of the tensor just converted.
    pub tensor: &'a str,
    /// Tensors converted so far, including this one.
    pub done: usize,
    /// Tensors to convert in all.
    pub total: usize,
}

/// Options of [`import_gguf_with`].
#[derive(Clone, Copy, Default)]
pub struct ImportOptions<'a> {
    /// Called after each tensor is converted.
    pub progress: Option<&'a dyn Fn(ImportProgress<'_>)>,
    /// For `tokenizer.ggml.pre == "smollm"`: split text as transformers' GGUF loader does (GPT-2
    /// regex only) rather than as llama.cpp and the original SmolLM2 `tokenizer.json` do (each
    /// digit split off first). The two differ only where a run of two or more whitespace
    /// characters precedes a digit. Default `false` (the model's own tokenizer).
    pub transformers_pretokenizer: bool,
}

/// The tokenizer files [`import_gguf`] writes, built in memory.
#[derive(Clone, Debug)]
pub struct TokenizerFiles {
    /// `tokenizer.json` (Hugging Face `tokenizers` format).
    pub tokenizer_json: String,
    /// `tokenizer_config.json` (special tokens, chat template).
    pub tokenizer_config_json: String,
    /// Number of tokens in the vocabulary.
    pub n_tokens: usize,
    /// Notes for the user (for example an unknown `tokenizer.ggml.pre`).
    pub warnings: Vec<String>,
}

/// Rebuilds the Hugging Face tokenizer described by `file`'s `tokenizer.ggml.*` metadata
/// without writing anything; `tokenizers::Tokenizer::from_bytes(files.tokenizer_json)` loads
/// it. Only byte-level BPE (`tokenizer.ggml.model == "gpt2"`) is supported; other models give
/// [`Error::InvalidField`] naming `tokenizer.ggml.model`. See
/// [`ImportOptions::transformers_pretokenizer`] for `transformers_pretokenizer`.
pub fn build_tokenizer(file: &GgufFile, transformers_pretokenizer: bool) -> Result<TokenizerFiles> {
    let t = tokenizer::build(file, transformers_pretokenizer)?;
    Ok(TokenizerFiles {
        tokenizer_json: t.tokenizer_json,
        tokenizer_config_json: t.tokenizer_config_json,
        n_tokens: t.n_tokens,
        warnings: t.warnings,
    })
}

/// Imports `gguf_path` into `out_dir` (created if needed) with default options.
///
/// Writes `model.safetensors` (f32, Hugging Face names; Llama Q/K rows un-permuted),
/// `config.json`, `tokenizer.json` and `tokenizer_config.json`, each atomically (temporary
/// file in `out_dir`, then rename). Everything is validated before the first file is written:
/// unsupported architectures, tensor types, tokenizer models or shapes fail with a typed
/// error naming the file and the field or tensor.
pub fn import_gguf(gguf_path: &Path, out_dir: &Path) -> Result<ImportSummary> {
    import_gguf_with(gguf_path, out_dir, &ImportOptions::default())
}

/// [`import_gguf`] with options (progress callback, tokenizer compatibility).
pub fn import_gguf_with(
    gguf_path: &Path,
    out_dir: &Path,
    opts: &ImportOptions<'_>,
) -> Result<ImportSummary> {
    let file = GgufFile::open(gguf_path)?;
    let cfg = ModelConfig::from_gguf(&file)?;
    let plans = plan_tensors(&file, &cfg)?;
    let mut dtype_counts = BTreeMap::new();
    for t in file.tensors() {
        if !t.dtype.is_supported() {
            return Err(Error::UnsupportedDtype {
                path: gguf_path.into(),
                tensor: t.name.clone(),
                dtype: t.dtype.name(),
            });
        }
        *dtype_counts.entry(t.dtype.name()).or_insert(0) += 1;
    }
    let tok = build_tokenizer(&file, opts.transformers_pretokenizer)?;
    let config_json = serde_json::to_string_pretty(&cfg.to_hf_json())
        .map_err(|e| Error::Input(format!("serialising config.json: {e}")))?;

    fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let mut files = Vec::new();
    files.push(write_atomic(out_dir, "model.safetensors", |tmp| {
        write_safetensors(&file, &plans, tmp, opts.progress)
    })?);
    for (name, text) in [
        ("config.json", &config_json),
        ("tokenizer.json", &tok.tokenizer_json),
        ("tokenizer_config.json", &tok.tokenizer_config_json),
    ] {
        files.push(write_atomic(out_dir, name, |tmp| {
            fs::write(tmp, text).map_err(|e| Error::io(tmp, e))
        })?);
    }

    Ok(ImportSummary {
        architecture: cfg.arch,
        n_tensors: plans.len(),
        n_params: plans
            .iter()
            .map(|p| p.shape.iter().product::<usize>() as u64)
            .sum(),
        dtype_counts,
        n_tokens: tok.n_tokens,
        files,
        warnings: tok.warnings,
    })
}

/// Writes through `write` to a temporary file in `dir`, flushes it to disk, then renames it
/// to `dir/name`, so readers never see a half-written file.
fn write_atomic(
    dir: &Path,
    name: &str,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let target = dir.join(name);
    let result = write(&tmp).and_then(|()| {
        fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(&tmp, e))?;
        fs::rename(&tmp, &target).map_err(|e| Error::io(&target, e))
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map(|()| target)
}

/// One output tensor, converted only when the safetensors writer asks for its bytes, so that
/// at most one tensor is held in f32 at a time.
struct LazyTensor<'a> {
    file: &'a GgufFile,
    plan: &'a TensorPlan,
    /// First error met; `View::data` cannot return one, so it is kept here and checked after.
    failure: &'a RefCell<Option<Error>>,
    done: &'a Cell<usize>,
    total: usize,
    progress: Option<&'a dyn Fn(ImportProgress<'_>)>,
}

impl LazyTensor<'_> {
    fn convert(&self) -> Result<Vec<f32>> {
        let data = self.file.dequantize(&self.plan.gguf_name)?;
        Ok(match self.plan.unpermute_heads {
            None => data,
            Some(heads) => {
                let rows = self.plan.shape[0];
                let cols = self.plan.shape.iter().skip(1).product();
                unpermute_rows(&data, rows, cols, heads)
            }
        })
    }
}

impl View for LazyTensor<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.plan.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let len = self.data_len();
        if self.failure.borrow().is_some() {
            return Cow::Owned(vec![0; len]);
        }
        let bytes = match self.convert() {
            Ok(v) => f32_le_bytes(&v),
            Err(e) => {
                *self.failure.borrow_mut() = Some(e);
                return Cow::Owned(vec![0; len]);
            }
        };
        self.done.set(self.done.get() + 1);
        if let Some(report) = self.progress {
            report(ImportProgress {
                tensor: &self.plan.hf_name,
                done: self.done.get(),
                total: self.total,
            });
        }
        Cow::Owned(bytes)
    }

    fn data_len(&self) -> usize {
        self.plan.shape.iter().product::<usize>() * 4
    }
}

fn f32_le_bytes(v: &[f32]) -> Vec<u8> {
    #[cfg(target_endian = "little")]
    {
        bytemuck::cast_slice(v).to_vec()
    }
    #[cfg(not(target_endian = "little"))]
    {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }
}

fn write_safetensors(
    file: &GgufFile,
    plans: &[TensorPlan],
    tmp: &Path,
    progress: Option<&dyn Fn(ImportProgress<'_>)>,
) -> Result<()> {
    let failure = RefCell::new(None);
    let done = Cell::new(0);
    let views = plans.iter().map(|plan| {
        (
            plan.hf_name.clone(),
            LazyTensor {
                file,
                plan,
                failure: &failure,
                done: &done,
                total: plans.len(),
                progress,
            },
        )
    });
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    safetensors::serialize_to_file(views, Some(meta), tmp).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(io) => Error::io(tmp, io),
        other => Error::format(tmp, "safetensors", other.to_string()),
    })?;
    match failure.into_inner() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
