//! Host tensors: a shape and a contiguous row-major buffer in f32 or bf16.
//!
//! The CPU backend computes in f32; bf16 is a storage type (weights as shipped, device
//! transfers), upcast on use.
use crate::error::{Error, Result};
use half::bf16;

/// Element type of a tensor's storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 => 2,
        }
    }
}

/// The elements of a tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum Storage {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
}

/// A dense row-major tensor on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Storage,
}

impl Tensor {
    /// Wraps f32 data; fails when `data.len()` is not the product of `shape`.
    pub fn from_f32(shape: &[usize], data: Vec<f32>) -> Result<Self> {
        check_len(shape, data.len())?;
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: Storage::F32(data),
        })
    }

    /// Wraps bf16 data; fails when `data.len()` is not the product of `shape`.
    pub fn from_bf16(shape: &[usize], data: Vec<bf16>) -> Result<Self> {
        check_len(shape, data.len())?;
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: Storage::BF16(data),
        })
    }

    /// An f32 tensor of zeros.
    pub fn zeros(shape: &[usize]) -> Self {
        Tensor {
            shape: shape.to_vec(),
            storage: Storage::F32(vec![0.0; shape.iter().product()]),
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        match self.storage {
            Storage::F32(_) => DType::F32,
            Storage::BF16(_) => DType::BF16,
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes held by the storage.
    pub fn nbytes(&self) -> usize {
        self.numel() * self.dtype().size()
    }

    /// The f32 elements, when stored as f32.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.storage {
            Storage::F32(v) => Some(v),
            Storage::BF16(_) => None,
        }
    }

    /// The bf16 elements, when stored as bf16.
    pub fn as_bf16(&self) -> Option<&[bf16]> {
        match &self.storage {
            Storage::BF16(v) => Some(v),
            Storage::F32(_) => None,
        }
    }

    /// The elements converted to f32 (a copy for bf16 storage).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match &self.storage {
            Storage::F32(v) => v.clone(),
            Storage::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// Consumes the tensor, returning f32 elements (converted from bf16 when needed).
    pub fn into_f32_vec(self) -> Vec<f32> {
        match self.storage {
            Storage::F32(v) => v,
            Storage::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// A copy rounded to bf16 storage.
    pub fn to_bf16(&self) -> Tensor {
        let data = match &self.storage {
            Storage::F32(v) => v.iter().map(|&x| bf16::from_f32(x)).collect(),
            Storage::BF16(v) => v.clone(),
        };
        Tensor {
            shape: self.shape.clone(),
            storage: Storage::BF16(data),
        }
    }

    /// The same elements under another shape with the same element count.
    pub fn reshape(self, shape: &[usize]) -> Result<Self> {
        check_len(shape, self.numel())?;
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: self.storage,
        })
    }
}

fn check_len(shape: &[usize], len: usize) -> Result<()> {
    let n: usize = shape.iter().product();
    if n != len {
        return Err(Error::Input(format!(
            "tensor of shape {shape:?} needs {n} elements, got {len}"
        )));
    }
    Ok(())
}

/// Per-column mean and population variance of a row-major `[rows, dim]` matrix, accumulated in
/// f64 (new-token initialisation, embedding standardisation).
pub(crate) fn column_moments(x: &[f32], dim: usize) -> (Vec<f64>, Vec<f64>) {
    let rows = (x.len() / dim.max(1)).max(1) as f64;
    let (mut mean, mut sq) = (vec![0.0f64; dim], vec![0.0f64; dim]);
    for row in x.chunks_exact(dim.max(1)) {
        for d in 0..dim {
            mean[d] += row[d] as f64;
            sq[d] += row[d] as f64 * row[d] as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= rows);
    let var = (0..dim).map(|d| (sq[d] / rows - mean[d] * mean[d]).max(0.0)).collect();
    (mean, var)
}
