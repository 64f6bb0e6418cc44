//! Parsing a GGUF file (versions 2 and 3, little-endian): header, metadata, tensor infos.
//!
//! Only the header is read at open time; tensor data is read on demand. Every length and count
//! read from the file is checked against the bytes that remain before anything is allocated
//! for it, so a corrupt file gives an error, never an absurd allocation or a panic.
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::quant;
use super::types::GgmlType;
use crate::error::{Error, Result};

pub(crate) const FORMAT: &str = "GGUF";
const MAGIC: [u8; 4] = *b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most 4 dimensions.
const MAX_DIMS: u32 = 4;
/// Arrays of arrays are legal; deeper nesting than this only comes from a corrupt file, and
/// refusing it keeps a crafted file from overflowing the stack.
const MAX_ARRAY_DEPTH: u32 = 8;
/// Initial capacity ceiling for vectors whose final length comes from the file: memory then
/// grows only as real elements are read.
const MAX_PREALLOC: u64 = 1 << 16;

/// A metadata value type id (`gguf_type` in llama.cpp).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum MetaType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl MetaType {
    fn from_id(id: u32) -> Option<MetaType> {
        Some(match id {
            0 => MetaType::U8,
            1 => MetaType::I8,
            2 => MetaType::U16,
            3 => MetaType::I16,
            4 => MetaType::U32,
            5 => MetaType::I32,
            6 => MetaType::F32,
            7 => MetaType::Bool,
            8 => MetaType::String,
            9 => MetaType::Array,
            10 => MetaType::U64,
            11 => MetaType::I64,
            12 => MetaType::F64,
            _ => return None,
        })
    }

    /// The fewest bytes one value of this type occupies in the file.
    fn min_encoded_size(self) -> u64 {
        match self {
            MetaType::U8 | MetaType::I8 | MetaType::Bool => 1,
            MetaType::U16 | MetaType::I16 => 2,
            MetaType::U32 | MetaType::I32 | MetaType::F32 => 4,
            MetaType::U64 | MetaType::I64 | MetaType::F64 => 8,
            MetaType::String => 8,
            MetaType::Array => 12,
        }
    }
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
#[allow(missing_docs)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(MetaArray),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A metadata array, stored compactly by element type.
#[derive(Clone, Debug, PartialEq)]
#[allow(missing_docs)]
pub enum MetaArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<MetaArray>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl MetaValue {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is a float or an integer.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The value as a string slice, if it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool, if it is a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The value as an array, if it is one.
    pub fn as_array(&self) -> Option<&MetaArray> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// A short name of the value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            MetaValue::U8(_) => "u8",
            MetaValue::I8(_) => "i8",
            MetaValue::U16(_) => "u16",
            MetaValue::I16(_) => "i16",
            MetaValue::U32(_) => "u32",
            MetaValue::I32(_) => "i32",
            MetaValue::F32(_) => "f32",
            MetaValue::Bool(_) => "bool",
            MetaValue::String(_) => "string",
            MetaValue::Array(_) => "array",
            MetaValue::U64(_) => "u64",
            MetaValue::I64(_) => "i64",
            MetaValue::F64(_) => "f64",
        }
    }
}

impl MetaArray {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            MetaArray::U8(v) => v.len(),
            MetaArray::I8(v) => v.len(),
            MetaArray::U16(v) => v.len(),
            MetaArray::I16(v) => v.len(),
            MetaArray::U32(v) => v.len(),
            MetaArray::I32(v) => v.len(),
            MetaArray::F32(v) => v.len(),
            MetaArray::Bool(v) => v.len(),
            MetaArray::String(v) => v.len(),
            MetaArray::Array(v) => v.len(),
            MetaArray::U64(v) => v.len(),
            MetaArray::I64(v) => v.len(),
            MetaArray::F64(v) => v.len(),
        }
    }

    /// Whether the array has no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements, if this is an array of strings.
    pub fn as_strings(&self) -> Option<&[String]> {
        match self {
            MetaArray::String(v) => Some(v),
            _ => None,
        }
    }

    /// The elements widened to i64, if this is an array of integers of any width (u64 values
    /// past `i64::MAX` give `None`).
    pub fn to_i64s(&self) -> Option<Vec<i64>> {
        Some(match self {
            MetaArray::U8(v) => v.iter().map(|&x| x.into()).collect(),
            MetaArray::I8(v) => v.iter().map(|&x| x.into()).collect(),
            MetaArray::U16(v) => v.iter().map(|&x| x.into()).collect(),
            MetaArray::I16(v) => v.iter().map(|&x| x.into()).collect(),
            MetaArray::U32(v) => v.iter().map(|&x| x.into()).collect(),
            MetaArray::I32(v) => v.iter().map(|&x| x.into()).collect(),
            MetaArray::I64(v) => v.clone(),
            MetaArray::U64(v) => v
                .iter()
                .map(|&x| i64::try_from(x).ok())
                .collect::<Option<_>>()?,
            _ => return None,
        })
    }

    /// The elements widened to f64, if this is an array of floats or integers.
    pub fn to_f64s(&self) -> Option<Vec<f64>> {
        Some(match self {
            MetaArray::F32(v) => v.iter().map(|&x| x.into()).collect(),
            MetaArray::F64(v) => v.clone(),
            MetaArray::U64(v) => v.iter().map(|&x| x as f64).collect(),
            _ => self.to_i64s()?.into_iter().map(|x| x as f64).collect(),
        })
    }
}

/// Where one tensor lives in a GGUF file and what it holds.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    /// The tensor's name in the GGUF (`blk.0.attn_q.weight`).
    pub name: String,
    /// Row-major shape, outermost dimension first (the reverse of ggml's `ne` order), so a
    /// linear layer's weight is `[out_features, in_features]` as in PyTorch.
    pub shape: Vec<usize>,
    /// Element type.
    pub dtype: GgmlType,
    /// Absolute byte offset of the tensor data in the file.
    pub offset: u64,
    /// Bytes of tensor data; `None` when the type is unknown to this crate.
    pub n_bytes: Option<u64>,
}

impl TensorInfo {
    /// Number of elements.
    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// ggml's `ne` order: innermost (contiguous) dimension first.
    pub fn ggml_dims(&self) -> Vec<usize> {
        self.shape.iter().rev().copied().collect()
    }
}

/// An open GGUF file: its metadata and tensor directory, with tensor data read on demand.
///
/// ```no_run
/// use ilrec::weights::gguf::GgufFile;
/// let f = GgufFile::open(std::path::Path::new("model.gguf"))?;
/// let arch = f.str_field("general.architecture")?;
/// let info = f.tensor("token_embd.weight").expect("present");
/// let values: Vec<f32> = f.dequantize("token_embd.weight")?;
/// assert_eq!(values.len(), info.n_elements());
/// # Ok::<(), ilrec::Error>(())
/// ```
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    version: u32,
    file_len: u64,
    alignment: u64,
    data_offset: u64,
    metadata: Vec<(String, MetaValue)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

/// A bounds-checked little-endian reader over the header part of the file.
struct HeaderReader<'a, R> {
    r: R,
    pos: u64,
    len: u64,
    path: &'a Path,
}

impl<R: Read> HeaderReader<'_, R> {
    fn corrupt(&self, msg: impl Into<String>) -> Error {
        Error::format(self.path, FORMAT, msg)
    }

    fn remaining(&self) -> u64 {
        self.len - self.pos
    }

    /// Reserves `n` bytes of the file for `what`, failing if the file ends before.
    fn claim(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<()> {
        if n > self.remaining() {
            return Err(self.corrupt(format!(
                "truncated: {} needs {n} bytes at offset {}, but the file has {} bytes",
                what(),
                self.pos,
                self.len
            )));
        }
        Ok(())
    }

    fn read_into(&mut self, buf: &mut [u8], what: &dyn Fn() -> String) -> Result<()> {
        self.claim(buf.len() as u64, what)?;
        self.r.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::format(
                    self.path,
                    FORMAT,
                    format!("truncated while reading {}", what()),
                )
            } else {
                Error::io(self.path, e)
            }
        })?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn bytes(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<Vec<u8>> {
        self.claim(n, what)?;
        let mut buf = vec![0u8; n as usize];
        self.read_into(&mut buf, what)?;
        Ok(buf)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let mut buf = [0u8; N];
        self.read_into(&mut buf, what)?;
        Ok(buf)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let n = self.u64(what)?;
        if n > self.remaining() {
            return Err(self.corrupt(format!(
                "{}: string length {n} at offset {} exceeds the {} bytes left in the file",
                what(),
                self.pos - 8,
                self.remaining()
            )));
        }
        let bytes = self.bytes(n, what)?;
        String::from_utf8(bytes)
            .map_err(|_| self.corrupt(format!("{}: string is not valid UTF-8", what())))
    }

    fn value(&mut self, ty: MetaType, key: &str, depth: u32) -> Result<MetaValue> {
        let what = || format!("value of metadata key `{key}`");
        Ok(match ty {
            MetaType::U8 => MetaValue::U8(self.array::<1>(&what)?[0]),
            MetaType::I8 => MetaValue::I8(self.array::<1>(&what)?[0] as i8),
            MetaType::U16 => MetaValue::U16(u16::from_le_bytes(self.array(&what)?)),
            MetaType::I16 => MetaValue::I16(i16::from_le_bytes(self.array(&what)?)),
            MetaType::U32 => MetaValue::U32(u32::from_le_bytes(self.array(&what)?)),
            MetaType::I32 => MetaValue::I32(i32::from_le_bytes(self.array(&what)?)),
            MetaType::F32 => MetaValue::F32(f32::from_le_bytes(self.array(&what)?)),
            MetaType::U64 => MetaValue::U64(u64::from_le_bytes(self.array(&what)?)),
            MetaType::I64 => MetaValue::I64(i64::from_le_bytes(self.array(&what)?)),
            MetaType::F64 => MetaValue::F64(f64::from_le_bytes(self.array(&what)?)),
            MetaType::Bool => MetaValue::Bool(self.array::<1>(&what)?[0] != 0),
            MetaType::String => MetaValue::String(self.string(&what)?),
            MetaType::Array => MetaValue::Array(self.meta_array(key, depth + 1)?),
        })
    }

    fn meta_array(&mut self, key: &str, depth: u32) -> Result<MetaArray> {
        let what = || format!("array of metadata key `{key}`");
        if depth > MAX_ARRAY_DEPTH {
            return Err(self.corrupt(format!(
                "metadata key `{key}`: arrays nested deeper than {MAX_ARRAY_DEPTH} levels"
            )));
        }
        let elem_id = self.u32(&what)?;
        let elem = MetaType::from_id(elem_id).ok_or_else(|| {
            self.corrupt(format!(
                "metadata key `{key}`: unknown array element type {elem_id}"
            ))
        })?;
        let n = self.u64(&what)?;
        let min = elem.min_encoded_size();
        if n.checked_mul(min).is_none_or(|b| b > self.remaining()) {
            return Err(self.corrupt(format!(
                "metadata key `{key}`: array of {n} elements cannot fit in the {} bytes left in the file",
                self.remaining()
            )));
        }
        // Fixed-width arrays: the byte count was just checked, so read them in one go.
        macro_rules! fixed {
            ($variant:ident, $t:ty) => {{
                let bytes = self.bytes(n * min, &what)?;
                MetaArray::$variant(
                    bytes
                        .chunks_exact(std::mem::size_of::<$t>())
                        .map(|c| {
                            <$t>::from_le_bytes(c.try_into().expect("chunk of the element size"))
                        })
                        .collect(),
                )
            }};
        }
        Ok(match elem {
            MetaType::U8 => MetaArray::U8(self.bytes(n, &what)?),
            MetaType::I8 => {
                MetaArray::I8(self.bytes(n, &what)?.into_iter().map(|b| b as i8).collect())
            }
            MetaType::Bool => {
                MetaArray::Bool(self.bytes(n, &what)?.into_iter().map(|b| b != 0).collect())
            }
            MetaType::U16 => fixed!(U16, u16),
            MetaType::I16 => fixed!(I16, i16),
            MetaType::U32 => fixed!(U32, u32),
            MetaType::I32 => fixed!(I32, i32),
            MetaType::F32 => fixed!(F32, f32),
            MetaType::U64 => fixed!(U64, u64),
            MetaType::I64 => fixed!(I64, i64),
            MetaType::F64 => fixed!(F64, f64),
            MetaType::String => {
                let mut v = Vec::with_capacity(n.min(MAX_PREALLOC) as usize);
                for i in 0..n {
                    v.push(self.string(&|| format!("element {i} of metadata key `{key}`"))?);
                }
                MetaArray::String(v)
            }
            MetaType::Array => {
                let mut v = Vec::with_capacity(n.min(MAX_PREALLOC) as usize);
                for _ in 0..n {
                    v.push(self.meta_array(key, depth + 1)?);
                }
                MetaArray::Array(v)
            }
        })
    }
}

impl GgufFile {
    /// Opens `path` and parses its header, metadata and tensor directory. Tensor data is not
    /// read. Fails with [`Error::Format`] on a malformed, truncated or unsupported-version file
    /// and with [`Error::Io`] when the file cannot be read.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut h = HeaderReader {
            r: BufReader::with_capacity(1 << 20, file),
            pos: 0,
            len: file_len,
            path,
        };

        let magic: [u8; 4] = h.array(&|| "magic".into())?;
        if magic != MAGIC {
            return Err(h.corrupt(format!("bad magic {magic:02x?}: not a GGUF file")));
        }
        let version = h.u32(&|| "version".into())?;
        match version {
            2 | 3 => {}
            1 => return Err(h.corrupt("GGUF version 1 is not supported (re-convert the model)")),
            v if v.swap_bytes() <= 3 => {
                return Err(h.corrupt("big-endian GGUF files are not supported"));
            }
            v => return Err(h.corrupt(format!("unsupported GGUF version {v}"))),
        }
        let n_tensors = h.u64(&|| "tensor count".into())?;
        let n_kv = h.u64(&|| "metadata count".into())?;
        // A key/value pair takes at least 13 bytes (key length, type, one byte of value) and a
        // tensor info at least 24 (name length, n_dims, type, offset).
        if n_kv.checked_mul(13).is_none_or(|b| b > h.remaining()) {
            return Err(h.corrupt(format!(
                "metadata count {n_kv} cannot fit in a file of {file_len} bytes"
            )));
        }
        if n_tensors.checked_mul(24).is_none_or(|b| b > h.remaining()) {
            return Err(h.corrupt(format!(
                "tensor count {n_tensors} cannot fit in a file of {file_len} bytes"
            )));
        }

        let mut metadata = Vec::with_capacity(n_kv.min(MAX_PREALLOC) as usize);
        let mut meta_index = HashMap::with_capacity(n_kv.min(MAX_PREALLOC) as usize);
        for i in 0..n_kv {
            let key = h.string(&|| format!("key of metadata entry {i}"))?;
            let ty_id = h.u32(&|| format!("type of metadata key `{key}`"))?;
            let ty = MetaType::from_id(ty_id).ok_or_else(|| {
                h.corrupt(format!(
                    "metadata key `{key}` has unknown value type {ty_id}"
                ))
            })?;
            let value = h.value(ty, &key, 0)?;
            if meta_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(h.corrupt(format!("duplicate metadata key `{key}`")));
            }
            metadata.push((key, value));
        }

        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some((_, v)) => match v.as_u64() {
                Some(a) if a.is_power_of_two() => a,
                _ => {
                    return Err(Error::InvalidField {
                        path: path.into(),
                        field: "general.alignment".into(),
                        msg: format!("{v:?} is not a power of two"),
                    })
                }
            },
        };

        let mut raw = Vec::with_capacity(n_tensors.min(MAX_PREALLOC) as usize);
        let mut tensor_index = HashMap::with_capacity(n_tensors.min(MAX_PREALLOC) as usize);
        for i in 0..n_tensors {
            let name = h.string(&|| format!("name of tensor {i}"))?;
            let what = || format!("info of tensor `{name}`");
            let n_dims = h.u32(&what)?;
            if n_dims > MAX_DIMS {
                return Err(h.corrupt(format!(
                    "tensor `{name}` has {n_dims} dimensions (at most {MAX_DIMS})"
                )));
            }
            let mut ne = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                ne.push(h.u64(&what)?);
            }
            let dtype = GgmlType::from_id(h.u32(&what)?);
            let rel_offset = h.u64(&what)?;
            if tensor_index.insert(name.clone(), raw.len()).is_some() {
                return Err(h.corrupt(format!("duplicate tensor name `{name}`")));
            }
            raw.push((name, ne, dtype, rel_offset));
        }
        let data_offset = h.pos.next_multiple_of(alignment);

        let mut tensors = Vec::with_capacity(raw.len());
        for (name, ne, dtype, rel_offset) in raw {
            let bad = |msg: String| Error::format(path, FORMAT, format!("tensor `{name}`: {msg}"));
            let n_elements = ne
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| bad(format!("dimensions {ne:?} overflow")))?;
            if rel_offset % alignment != 0 {
                return Err(bad(format!(
                    "data offset {rel_offset} is not a multiple of the alignment {alignment}"
                )));
            }
            let offset = data_offset
                .checked_add(rel_offset)
                .ok_or_else(|| bad(format!("data offset {rel_offset} overflows")))?;
            let n_bytes = match dtype.block_layout() {
                None => None,
                Some((block, size)) => {
                    let row = ne.first().copied().unwrap_or(1);
                    if row % block != 0 {
                        return Err(bad(format!(
                            "row length {row} is not a multiple of the {dtype} block size {block}"
                        )));
                    }
                    Some(
                        (n_elements / block)
                            .checked_mul(size)
                            .ok_or_else(|| bad(format!("dimensions {ne:?} overflow")))?,
                    )
                }
            };
            if let Some(n) = n_bytes {
                let end = offset.checked_add(n);
                if end.is_none_or(|e| e > file_len) {
                    return Err(bad(format!(
                        "{n} bytes of {dtype} data at offset {offset} run past the end of the file ({file_len} bytes)"
                    )));
                }
            }
            // Every dimension now fits in the file, so in usize too on 64-bit hosts; a 32-bit
            // host could still be handed a tensor it cannot address.
            let shape = ne
                .iter()
                .rev()
                .map(|&d| usize::try_from(d))
                .collect::<Result<Vec<usize>, _>>()
                .map_err(|_| bad(format!("dimensions {ne:?} do not fit this machine's usize")))?;
            tensors.push(TensorInfo {
                name,
                shape,
                dtype,
                offset,
                n_bytes,
            });
        }

        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            file_len,
            alignment,
            data_offset,
            metadata,
            meta_index,
            tensors,
            tensor_index,
        })
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Alignment of tensor data (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute offset of the tensor data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Size of the file in bytes.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// All metadata entries in file order.
    pub fn metadata(&self) -> &[(String, MetaValue)] {
        &self.metadata
    }

    /// The metadata value under `key`, if present.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    fn missing(&self, key: &str) -> Error {
        Error::MissingField {
            path: self.path.clone(),
            field: key.into(),
        }
    }

    fn wrong_type(&self, key: &str, want: &str, got: &MetaValue) -> Error {
        Error::InvalidField {
            path: self.path.clone(),
            field: key.into(),
            msg: format!("expected {want}, found {}", got.type_name()),
        }
    }

    /// The string under `key`; [`Error::MissingField`] if absent, [`Error::InvalidField`] if
    /// it is not a string.
    pub fn str_field(&self, key: &str) -> Result<&str> {
        self.opt_str(key)?.ok_or_else(|| self.missing(key))
    }

    /// The non-negative integer under `key`; errors as [`GgufFile::str_field`].
    pub fn u64_field(&self, key: &str) -> Result<u64> {
        self.opt_u64(key)?.ok_or_else(|| self.missing(key))
    }

    /// The number under `key`; errors as [`GgufFile::str_field`].
    pub fn f64_field(&self, key: &str) -> Result<f64> {
        self.opt_f64(key)?.ok_or_else(|| self.missing(key))
    }

    /// The string under `key` if present; [`Error::InvalidField`] if it is not a string.
    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        self.get(key)
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| self.wrong_type(key, "a string", v))
            })
            .transpose()
    }

    /// The non-negative integer under `key` if present.
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .ok_or_else(|| self.wrong_type(key, "a non-negative integer", v))
            })
            .transpose()
    }

    /// The number under `key` if present.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| self.wrong_type(key, "a number", v))
            })
            .transpose()
    }

    /// The bool under `key` if present.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| v.as_bool().ok_or_else(|| self.wrong_type(key, "a bool", v)))
            .transpose()
    }

    /// The array under `key` if present.
    pub fn opt_array(&self, key: &str) -> Result<Option<&MetaArray>> {
        self.get(key)
            .map(|v| {
                v.as_array()
                    .ok_or_else(|| self.wrong_type(key, "an array", v))
            })
            .transpose()
    }

    /// All tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The info of the tensor called `name`, if present.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    fn tensor_or_err(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            tensor: name.into(),
        })
    }

    fn unsupported(&self, info: &TensorInfo) -> Error {
        Error::UnsupportedDtype {
            path: self.path.clone(),
            tensor: info.name.clone(),
            dtype: info.dtype.name(),
        }
    }

    /// The raw (still quantised) bytes of tensor `name`.
    pub fn read_raw(&self, name: &str) -> Result<Vec<u8>> {
        let info = self.tensor_or_err(name)?;
        let n = info.n_bytes.ok_or_else(|| self.unsupported(info))?;
        let mut f = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        f.seek(SeekFrom::Start(info.offset))
            .map_err(|e| Error::io(&self.path, e))?;
        // `open` checked the range against the file length; a shorter read now means the file
        // changed under us.
        let mut buf = vec![0u8; n as usize];
        f.read_exact(&mut buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::format(
                    &self.path,
                    FORMAT,
                    format!("tensor `{name}`: file ended inside the tensor data (was it truncated after opening?)"),
                )
            } else {
                Error::io(&self.path, e)
            }
        })?;
        Ok(buf)
    }

    /// Tensor `name` converted to f32, in row-major order of [`TensorInfo::shape`].
    /// [`Error::UnsupportedDtype`] names the tensor and type when the type cannot be
    /// dequantised (see [`GgmlType::is_supported`]).
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>> {
        let info = self.tensor_or_err(name)?;
        if !info.dtype.is_supported() {
            return Err(self.unsupported(info));
        }
        let raw = self.read_raw(name)?;
        let mut out = vec![0f32; info.n_elements()];
        if !quant::dequantize_into(info.dtype, &raw, &mut out) {
            return Err(self.unsupported(info));
        }
        Ok(out)
    }
}
