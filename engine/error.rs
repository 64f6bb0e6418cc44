//! Typed errors of the library. Every variant names the file and the field, tensor or value at
//! fault, so a user can act on the message without a debugger.
use std::path::PathBuf;

/// Every error the library returns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed at the OS level.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file's bytes do not follow its format (truncated, bad magic, bad header, ...).
    #[error("{path}: malformed {format}: {msg}")]
    Format {
        path: PathBuf,
        format: &'static str,
        msg: String,
    },
    /// A required field is absent from a config or metadata file.
    #[error("{path}: missing field `{field}`")]
    MissingField { path: PathBuf, field: String },
    /// A field is present but its value is wrong or inconsistent with another field.
    #[error("{path}: invalid field `{field}`: {msg}")]
    InvalidField {
        path: PathBuf,
        field: String,
        msg: String,
    },
    /// A tensor the model needs is not in the weight files.
    #[error("{path}: missing tensor `{tensor}`")]
    MissingTensor { path: PathBuf, tensor: String },
    /// A tensor has a shape other than the config implies.
    #[error("{path}: tensor `{tensor}` has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    /// A tensor is stored in a data type this engine cannot read.
    #[error("{path}: tensor `{tensor}` has unsupported type {dtype}")]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    /// The tokenizer could not be loaded or failed on an input.
    #[error("{path}: tokenizer: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    /// A caller passed arguments that cannot be honoured (bad shapes, token ids out of range, ...).
    #[error("invalid input: {0}")]
    Input(String),
    /// A numeric failure: NaN or Inf where a finite value is required.
    #[error("non-finite value in {0}")]
    NonFinite(String),
    /// The requested device cannot be used, or a device call failed.
    #[error("device: {0}")]
    Device(String),
    /// The GPU has no room for a tensor, even after the allocator's cache was emptied.
    #[error("CUDA out of memory allocating {bytes} bytes for {what} ({in_use} bytes in use by tensors, {cached} cached, driver reports {free} free of {total})")]
    OutOfMemory {
        what: String,
        bytes: usize,
        in_use: usize,
        cached: usize,
        free: usize,
        total: usize,
    },
    /// A CUDA kernel failed to launch or was given operands it cannot take.
    #[error("CUDA kernel `{kernel}` on {shape}: {msg}")]
    Kernel { kernel: String, shape: String, msg: String },
}

/// Result alias used across the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    /// A format error for `path`.
    pub fn format(path: impl Into<PathBuf>, format: &'static str, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            format,
            msg: msg.into(),
        }
    }
}
