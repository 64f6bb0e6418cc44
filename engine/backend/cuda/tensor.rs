//! Device tensors: a shape, an element type and a block from the caching allocator. Dropping a
//! tensor returns its block to the cache (see alloc.rs for why that is safe with queued work).
use super::Cuda;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};
use half::bf16;

/// A dense row-major tensor in device memory: f32, bf16, or u32/u8 index data (kept as raw
/// bytes with an f32-sized or byte-sized element, see `DeviceTensor::from_u32`).
pub struct DeviceTensor {
    cuda: Cuda,
    ptr: u64,
    class: usize,
    shape: Vec<usize>,
    elem: Elem,
}

/// Element type of a device tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elem {
    F32,
    BF16,
    U32,
    U8,
    F64,
}

impl Elem {
    pub fn size(self) -> usize {
        match self {
            Elem::F32 | Elem::U32 => 4,
            Elem::BF16 => 2,
            Elem::U8 => 1,
            Elem::F64 => 8,
        }
    }
}

impl From<DType> for Elem {
    fn from(d: DType) -> Self {
        match d {
            DType::F32 => Elem::F32,
            DType::BF16 => Elem::BF16,
        }
    }
}

impl std::fmt::Debug for DeviceTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceTensor({:?}, {:?})", self.elem, self.shape)
    }
}

impl Drop for DeviceTensor {
    fn drop(&mut self) {
        self.cuda.free_raw(self.ptr, self.class);
    }
}

impl DeviceTensor {
    /// Uninitialised storage for `shape`; `what` names the tensor in an out-of-memory error.
    pub fn empty(cuda: &Cuda, shape: &[usize], elem: Elem, what: &str) -> Result<Self> {
        let n: usize = shape.iter().product();
        let bytes = n * elem.size();
        let (ptr, class) = cuda.alloc_raw(bytes, &|| format!("{what} {elem:?}{shape:?}"))?;
        Ok(DeviceTensor { cuda: cuda.clone(), ptr, class, shape: shape.to_vec(), elem })
    }

    /// Zero-filled storage.
    pub fn zeros(cuda: &Cuda, shape: &[usize], elem: Elem, what: &str) -> Result<Self> {
        let t = Self::empty(cuda, shape, elem, what)?;
        t.fill_bytes(0)?;
        Ok(t)
    }

    /// Sets every byte to `byte` (0xFF poisons f32/bf16 data with NaNs).
    pub fn fill_bytes(&self, byte: u8) -> Result<()> {
        if self.nbytes() == 0 {
            return Ok(());
        }
        self.cuda.memset(self.ptr, byte, self.nbytes(), &|| format!("{self:?}"))
    }

    /// Copies a host tensor to the device in its own element type.
    pub fn from_host(cuda: &Cuda, t: &Tensor, what: &str) -> Result<Self> {
        match (t.as_f32(), t.as_bf16()) {
            (Some(v), _) => Self::from_slice(cuda, t.shape(), v, Elem::F32, what),
            (_, Some(v)) => Self::from_slice(cuda, t.shape(), v, Elem::BF16, what),
            _ => unreachable!("a tensor is f32 or bf16"),
        }
    }

    /// f32 data, stored as f32.
    pub fn from_f32(cuda: &Cuda, shape: &[usize], v: &[f32], what: &str) -> Result<Self> {
        Self::from_slice(cuda, shape, v, Elem::F32, what)
    }

    /// f32 data rounded to bf16 (round to nearest even) on the host, stored as bf16.
    pub fn from_f32_as_bf16(cuda: &Cuda, shape: &[usize], v: &[f32], what: &str) -> Result<Self> {
        let b: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
        Self::from_slice(cuda, shape, &b, Elem::BF16, what)
    }

    /// f32 data stored as `elem`: f32 as is, bf16 rounded to nearest even on the host.
    pub fn from_f32_in(cuda: &Cuda, shape: &[usize], v: &[f32], elem: Elem, what: &str) -> Result<Self> {
        match elem {
            Elem::F32 => Self::from_f32(cuda, shape, v, what),
            Elem::BF16 => Self::from_f32_as_bf16(cuda, shape, v, what),
            other => Err(Error::Input(format!("{what}: f32 data cannot be stored as {other:?}"))),
        }
    }

    /// u32 data (token ids, targets, offsets).
    pub fn from_u32(cuda: &Cuda, shape: &[usize], v: &[u32], what: &str) -> Result<Self> {
        Self::from_slice(cuda, shape, v, Elem::U32, what)
    }

    /// u8 data (masks).
    pub fn from_u8(cuda: &Cuda, shape: &[usize], v: &[u8], what: &str) -> Result<Self> {
        Self::from_slice(cuda, shape, v, Elem::U8, what)
    }

    /// f64 data (beam scores).
    pub fn from_f64(cuda: &Cuda, shape: &[usize], v: &[f64], what: &str) -> Result<Self> {
        Self::from_slice(cuda, shape, v, Elem::F64, what)
    }

    fn from_slice<T: bytemuck::Pod>(cuda: &Cuda, shape: &[usize], v: &[T], elem: Elem, what: &str) -> Result<Self> {
        let n: usize = shape.iter().product();
        if v.len() != n || std::mem::size_of::<T>() != elem.size() {
            return Err(Error::Input(format!("{what}: shape {shape:?} needs {n} elements, got {}", v.len())));
        }
        let t = Self::empty(cuda, shape, elem, what)?;
        if n > 0 {
            cuda.htod(t.ptr, bytemuck::cast_slice(v), &|| format!("{what} {shape:?}"))?;
        }
        Ok(t)
    }

    fn read<T: bytemuck::Pod + Default + Clone>(&self) -> Result<Vec<T>> {
        let mut out = vec![T::default(); self.numel()];
        if out.is_empty() {
            return Ok(out);
        }
        self.cuda.dtoh(bytemuck::cast_slice_mut(&mut out), self.ptr, &|| format!("{self:?}"))?;
        Ok(out)
    }

    /// The elements as f32 (bf16 widened exactly). Waits for queued work.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        match self.elem {
            Elem::F32 => self.read::<f32>(),
            Elem::BF16 => Ok(self.read::<bf16>()?.iter().map(|x| x.to_f32()).collect()),
            Elem::F64 => Ok(self.read::<f64>()?.iter().map(|&x| x as f32).collect()),
            other => Err(Error::Input(format!("{self:?}: {other:?} is not a float tensor"))),
        }
    }

    /// The elements of an f64 tensor (losses).
    pub fn to_f64_vec(&self) -> Result<Vec<f64>> {
        match self.elem {
            Elem::F64 => self.read::<f64>(),
            _ => Ok(self.to_f32_vec()?.into_iter().map(f64::from).collect()),
        }
    }

    /// The elements of a u32 tensor.
    pub fn to_u32_vec(&self) -> Result<Vec<u32>> {
        match self.elem {
            Elem::U32 => self.read::<u32>(),
            other => Err(Error::Input(format!("{self:?}: {other:?} is not a u32 tensor"))),
        }
    }

    /// A host copy (f32 or bf16 storage).
    pub fn to_host(&self) -> Result<Tensor> {
        match self.elem {
            Elem::BF16 => Tensor::from_bf16(&self.shape, self.read::<bf16>()?),
            _ => Tensor::from_f32(&self.shape, self.to_f32_vec()?),
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn elem(&self) -> Elem {
        self.elem
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn nbytes(&self) -> usize {
        self.numel() * self.elem.size()
    }
    /// The device address, for kernel arguments.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn cuda(&self) -> &Cuda {
        &self.cuda
    }

    /// A copy in fresh device memory (queued on the stream).
    pub fn try_clone(&self, what: &str) -> Result<Self> {
        let t = Self::empty(&self.cuda, &self.shape, self.elem, what)?;
        if self.nbytes() > 0 {
            self.cuda.dtod(t.ptr, self.ptr, self.nbytes(), &|| format!("{self:?} for {what}"))?;
        }
        Ok(t)
    }

    /// Overwrites whole rows of a 2-D f32 or bf16 tensor from host f32 data (`[rows.len(), cols]`;
    /// rounded to bf16 for a bf16 tensor). Fails on a row index outside the tensor.
    pub fn write_rows(&mut self, rows: &[u32], data: &[f32]) -> Result<()> {
        let &[n_rows, cols] = self.shape.as_slice() else {
            return Err(Error::Input(format!("write_rows on {self:?}: not a matrix")));
        };
        if data.len() != rows.len() * cols {
            return Err(Error::Input(format!("write_rows on {self:?}: {} rows need {} values, got {}", rows.len(), rows.len() * cols, data.len())));
        }
        if let Some(&r) = rows.iter().find(|&&r| r as usize >= n_rows) {
            return Err(Error::Input(format!("write_rows on {self:?}: row {r} is outside the tensor")));
        }
        for (i, &r) in rows.iter().enumerate() {
            let src = &data[i * cols..(i + 1) * cols];
            // Row r < n_rows, so the row's bytes lie inside the block.
            let dst = self.ptr + (r as usize * cols * self.elem.size()) as u64;
            let what = || format!("row {r} of {self:?}");
            match self.elem {
                Elem::F32 => self.cuda.htod(dst, bytemuck::cast_slice(src), &what)?,
                Elem::BF16 => {
                    let b: Vec<bf16> = src.iter().map(|&x| bf16::from_f32(x)).collect();
                    self.cuda.htod(dst, bytemuck::cast_slice(&b), &what)?
                }
                other => return Err(Error::Input(format!("write_rows on {self:?}: {other:?} is not a float tensor"))),
            }
        }
        Ok(())
    }

    /// The same storage under another shape with the same element count.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Self> {
        if shape.iter().product::<usize>() != self.numel() {
            return Err(Error::Input(format!("cannot view {self:?} as {shape:?}")));
        }
        self.shape = shape.to_vec();
        Ok(self)
    }
}
