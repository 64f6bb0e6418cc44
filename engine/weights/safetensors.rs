//! Reading tensors from safetensors files: one file, or the shards of an HF index.
use crate::error::{Error, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// A set of memory-mapped safetensors files with a name -> file map.
pub struct SafetensorsSet {
    files: Vec<(PathBuf, Mmap)>,
    owner: HashMap<String, usize>,
}

fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only; a concurrent writer truncating the file is outside what
    // any reader of a weight file can defend against (it would fault, as with any mmap).
    unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes).map_err(|e| Error::format(path, "safetensors", e.to_string()))
}

impl SafetensorsSet {
    /// Opens `dir/model.safetensors`, or the shards listed in `dir/model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if single.exists() {
            Self::open_files(&[single])
        } else if index.exists() {
            Self::open_index(&index)
        } else {
            Err(Error::io(
                &single,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors and no model.safetensors.index.json in the model directory",
                ),
            ))
        }
    }

    /// Opens the shards named by an HF `model.safetensors.index.json`; every tensor must be in
    /// the shard the index names.
    pub fn open_index(index: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::format(index, "JSON", e.to_string()))?;
        let invalid_map = |msg: &str| Error::InvalidField { path: index.to_path_buf(), field: "weight_map".into(), msg: msg.into() };
        let map = match v.get("weight_map") {
            None | Some(Value::Null) => {
                return Err(Error::MissingField { path: index.to_path_buf(), field: "weight_map".into() })
            }
            Some(Value::Object(m)) if m.is_empty() => return Err(invalid_map("lists no tensors")),
            Some(Value::Object(m)) => m,
            Some(_) => return Err(invalid_map("expected an object mapping tensor names to shard files")),
        };
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut shard_names: Vec<&str> = Vec::new();
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| Error::InvalidField {
                path: index.to_path_buf(),
                field: format!("weight_map.{tensor}"),
                msg: "expected a file name".into(),
            })?;
            if file.is_empty() || file == "." || file == ".." || file.contains('/') || file.contains('\\') {
                return Err(Error::InvalidField {
                    path: index.to_path_buf(),
                    field: format!("weight_map.{tensor}"),
                    msg: format!("shard `{file}` is not a plain file name in the model directory"),
                });
            }
            if !shard_names.contains(&file) {
                shard_names.push(file);
            }
        }
        let paths: Vec<PathBuf> = shard_names.iter().map(|f| dir.join(f)).collect();
        let set = Self::open_files(&paths)?;
        for (tensor, file) in map {
            let file = file.as_str().unwrap_or_default();
            match set.owner.get(tensor) {
                Some(&i) if set.files[i].0 == dir.join(file) => {}
                _ => {
                    return Err(Error::MissingTensor { path: dir.join(file), tensor: tensor.clone() });
                }
            }
        }
        Ok(set)
    }

    /// Opens and validates the given files; a tensor name in two files is an error.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut owner = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let mmap = map_file(path)?;
            for name in parse(path, &mmap)?.names() {
                if let Some(prev) = owner.insert(name.to_string(), i) {
                    let prev: &PathBuf = &paths[prev];
                    return Err(Error::format(
                        path,
                        "safetensors",
                        format!("tensor `{name}` is also in {}", prev.display()),
                    ));
                }
            }
            files.push((path.clone(), mmap));
        }
        Ok(SafetensorsSet { files, owner })
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.owner.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    pub fn contains(&self, name: &str) -> bool {
        self.owner.contains_key(name)
    }

    /// The file holding `name`, or the first file (for error messages about absent tensors).
    pub fn path_of(&self, name: &str) -> &Path {
        let i = self.owner.get(name).copied().unwrap_or(0);
        self.files.get(i).map(|f| f.0.as_path()).unwrap_or(Path::new("<no files>"))
    }

    /// Reads `name` as f32 (F32, BF16 and F16 are converted), checking its shape is `expected`.
    pub fn get_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let &i = self.owner.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.path_of(name).to_path_buf(),
            tensor: name.into(),
        })?;
        let (path, mmap) = &self.files[i];
        let st = parse(path, mmap)?;
        let view = st.tensor(name).map_err(|e| Error::format(path, "safetensors", e.to_string()))?;
        if view.shape() != expected {
            return Err(Error::ShapeMismatch {
                path: path.clone(),
                tensor: name.into(),
                expected: expected.to_vec(),
                got: view.shape().to_vec(),
            });
        }
        let bytes = view.data();
        Ok(match view.dtype() {
            Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::BF16 => bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::F16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            other => {
                return Err(Error::UnsupportedDtype {
                    path: path.clone(),
                    tensor: name.into(),
                    dtype: format!("{other:?}"),
                })
            }
        })
    }

    /// Reads an integer tensor (I64, I32, U32) as i64 values, with its shape (for fixtures and
    /// token-id tensors).
    pub fn get_i64(&self, name: &str) -> Result<(Vec<usize>, Vec<i64>)> {
        let &i = self.owner.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.path_of(name).to_path_buf(),
            tensor: name.into(),
        })?;
        let (path, mmap) = &self.files[i];
        let st = parse(path, mmap)?;
        let view = st.tensor(name).map_err(|e| Error::format(path, "safetensors", e.to_string()))?;
        let b = view.data();
        let vals = match view.dtype() {
            Dtype::I64 => b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect(),
            Dtype::I32 => b.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64).collect(),
            Dtype::U32 => b.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64).collect(),
            other => {
                return Err(Error::UnsupportedDtype { path: path.clone(), tensor: name.into(), dtype: format!("{other:?}") })
            }
        };
        Ok((view.shape().to_vec(), vals))
    }

    /// The shape of `name`, if present.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let &i = self.owner.get(name)?;
        let (path, mmap) = &self.files[i];
        parse(path, mmap).ok()?.tensor(name).ok().map(|t| t.shape().to_vec())
    }
}

/// Serialises named f32 tensors to safetensors bytes (`(name, shape, data)`; each `data` must
/// hold the product of its shape).
pub fn serialize_f32<'a>(tensors: impl IntoIterator<Item = (&'a str, &'a [usize], &'a [f32])>) -> Result<Vec<u8>> {
    let mut views = Vec::new();
    for (name, shape, data) in tensors {
        if shape.iter().product::<usize>() != data.len() {
            return Err(Error::Input(format!("tensor `{name}`: shape {shape:?} does not match {} values", data.len())));
        }
        let view = safetensors::tensor::TensorView::new(Dtype::F32, shape.to_vec(), bytemuck::cast_slice(data))
            .map_err(|e| Error::Input(format!("tensor `{name}`: {e}")))?;
        views.push((name.to_string(), view));
    }
    safetensors::serialize(views, None).map_err(|e| Error::Input(format!("serialising safetensors: {e}")))
}
