//! Dense GEMMs: cuBLAS (`cublasGemmEx`, f32 accumulation) when libcublas can be loaded, else the
//! hand-written tiled kernel of kernels/gemm.cu. The base model's projections are plain GEMMs
//! where cuBLAS is the speed of light a hand-written kernel would chase; the fused kernels of the
//! ILRec issues (LoRA, probe, loss) are ours.
//!
//! Layout: row-major everywhere. `C[m, n] = alpha * op(A) @ op(B) + beta * C`, where `A` is
//! `[m, k]` (`[k, m]` when `trans_a`) and `B` is `[k, n]` (`[n, k]` when `trans_b`: a linear layer's
//! `x @ W^T` with `W` `[out, in]`). A row-major matrix read column-major is its transpose, so the
//! row-major product is computed as the column-major `C^T = op(B)^T op(A)^T` with the operands
//! swapped.
use super::tensor::Elem;
use super::{Arg, Cuda, DeviceTensor, Launch};
use crate::error::{Error, Result};
use cudarc::cublas::{result as cb, sys as cbs};

/// A cuBLAS handle bound to the runtime's stream.
pub struct Blas {
    handle: cbs::cublasHandle_t,
}

// SAFETY: the handle is only used under the runtime's mutex, one thread at a time.
unsafe impl Send for Blas {}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: created by `Blas::new`, destroyed once.
        let _ = unsafe { cb::destroy_handle(self.handle) };
    }
}

impl Blas {
    /// `Ok(None)` when libcublas is not on the library path (the fallback kernel serves then).
    pub(crate) fn new(cuda: &Cuda) -> Result<Option<Blas>> {
        // SAFETY: only probes whether the shared library can be opened.
        if !unsafe { cbs::is_culib_present() } {
            return Ok(None);
        }
        cuda.bind()?;
        super::no_panic("creating the cuBLAS handle", || {
            let handle = cb::create_handle().map_err(|e| Error::Device(format!("cuBLAS init: {e:?}")))?;
            // SAFETY: a fresh handle and the runtime's live stream.
            unsafe { cb::set_stream(handle, cuda.cu_stream()? as _) }
                .map_err(|e| Error::Device(format!("cuBLAS set_stream: {e:?}")))?;
            Ok(Some(Blas { handle }))
        })
    }
}

/// Transposes and scalars of one GEMM: `C = alpha * op(A) @ op(B) + beta * C`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    pub trans_a: bool,
    pub trans_b: bool,
    pub alpha: f32,
    pub beta: f32,
}

impl Gemm {
    /// `C = A @ B`.
    pub const NN: Gemm = Gemm { trans_a: false, trans_b: false, alpha: 1.0, beta: 0.0 };
    /// `C = A @ B^T` (a linear layer: `x @ W^T`).
    pub const NT: Gemm = Gemm { trans_a: false, trans_b: true, alpha: 1.0, beta: 0.0 };
    /// `C = A^T @ B` (a weight gradient: `dY^T @ X`).
    pub const TN: Gemm = Gemm { trans_a: true, trans_b: false, alpha: 1.0, beta: 0.0 };
    /// The same product added into C (`beta = 1`).
    pub fn accumulate(self) -> Gemm {
        Gemm { beta: 1.0, ..self }
    }
    /// The same product scaled by `alpha`.
    pub fn scaled(self, alpha: f32) -> Gemm {
        Gemm { alpha, ..self }
    }
}

/// Which implementation `matmul` used (reported by the self-test and the benches).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmImpl {
    Cublas,
    Fallback,
}

/// Operand dimensions of `op(A) @ op(B)` after the shape checks.
#[derive(Clone, Copy, Debug)]
struct Dims {
    m: usize,
    n: usize,
    k: usize,
}

fn dims(c: &DeviceTensor, a: &DeviceTensor, b: &DeviceTensor, g: Gemm) -> Result<Dims> {
    let (trans_a, trans_b) = (g.trans_a, g.trans_b);
    let shape = || format!("C{:?} A{:?}{} B{:?}{}", c.shape(), a.shape(), if trans_a { "^T" } else { "" }, b.shape(), if trans_b { "^T" } else { "" });
    let bad = |msg: &str| Error::Kernel { kernel: "matmul".into(), shape: shape(), msg: msg.into() };
    let (&[ar, ac], &[br, bc], &[cr, cc]) = (a.shape(), b.shape(), c.shape()) else {
        return Err(bad("operands must be 2-D"));
    };
    let (m, k) = if trans_a { (ac, ar) } else { (ar, ac) };
    let (k2, n) = if trans_b { (bc, br) } else { (br, bc) };
    if k != k2 || cr != m || cc != n {
        return Err(bad("inner or outer dimensions disagree"));
    }
    if a.elem() != b.elem() || !matches!(a.elem(), Elem::F32 | Elem::BF16) || !matches!(c.elem(), Elem::F32 | Elem::BF16) {
        return Err(bad(&format!("unsupported types A {:?} B {:?} C {:?}", a.elem(), b.elem(), c.elem())));
    }
    if a.elem() == Elem::F32 && c.elem() != Elem::F32 {
        return Err(bad("f32 inputs need an f32 output"));
    }
    if [m, n, k].iter().any(|&d| d > i32::MAX as usize) {
        return Err(bad("a dimension exceeds i32"));
    }
    Ok(Dims { m, n, k })
}

/// `C = alpha * op(A) @ op(B) + beta * C` (row-major; see the module comment). A and B are both
/// f32 or both bf16; C is f32, or bf16 for bf16 inputs. Accumulation is f32 (no TF32).
pub fn matmul(cuda: &Cuda, c: &mut DeviceTensor, a: &DeviceTensor, b: &DeviceTensor, g: Gemm) -> Result<GemmImpl> {
    let d = dims(c, a, b, g)?;
    if d.m == 0 || d.n == 0 {
        return Ok(GemmImpl::Fallback);
    }
    let used_blas = cuda.with_blas(|blas| match blas {
        Some(blas) => cublas_gemm(blas, c, a, b, g, d).map(|_| true),
        None => Ok(false),
    })?;
    if used_blas {
        return Ok(GemmImpl::Cublas);
    }
    fallback_gemm(cuda, c, a, b, g)?;
    Ok(GemmImpl::Fallback)
}

/// The hand-written kernel regardless of cuBLAS (the self-test checks both).
pub fn fallback_gemm(cuda: &Cuda, c: &mut DeviceTensor, a: &DeviceTensor, b: &DeviceTensor, g: Gemm) -> Result<()> {
    let d = dims(c, a, b, g)?;
    let Gemm { trans_a, trans_b, alpha, beta } = g;
    if d.m == 0 || d.n == 0 {
        return Ok(());
    }
    if d.m.div_ceil(32) > super::MAX_GRID_YZ {
        return Err(Error::Kernel {
            kernel: "gemm".into(),
            shape: format!("C{:?} A{:?} B{:?}", c.shape(), a.shape(), b.shape()),
            msg: format!("{} rows exceed the fallback GEMM's grid (at most 2,097,120)", d.m),
        });
    }
    let kernel = match (a.elem(), c.elem()) {
        (Elem::F32, _) => "gemm_f32",
        (Elem::BF16, Elem::F32) => "gemm_bf16_f32",
        _ => "gemm_bf16",
    };
    let cfg = Launch {
        grid: (d.n.div_ceil(32) as u32, d.m.div_ceil(32) as u32, 1),
        block: (32, 8, 1),
        shared_bytes: 0,
    };
    let args = [
        Arg::Ptr(c.ptr()),
        Arg::Ptr(a.ptr()),
        Arg::Ptr(b.ptr()),
        Arg::U32(d.m as u32),
        Arg::U32(d.n as u32),
        Arg::U32(d.k as u32),
        Arg::I32(trans_a as i32),
        Arg::I32(trans_b as i32),
        Arg::F32(alpha),
        Arg::F32(beta),
    ];
    let shape = || format!("C{:?} A{:?} B{:?} trans ({trans_a}, {trans_b})", c.shape(), a.shape(), b.shape());
    // SAFETY: `dims` checked that A, B and C hold m*k, k*n and m*n elements of the types the
    // kernel named by their element types reads and writes.
    unsafe { cuda.launch("gemm", kernel, cfg, &args, &shape) }
}

/// The column-major call that computes a row-major product: cuBLAS's `(transa, transb, m, n, k,
/// lda, ldb, ldc)` with its first operand being our B and its second our A. One function, used
/// by the call and by the host test that runs these parameters through a column-major GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ColMajorCall {
    trans_first: bool,
    trans_second: bool,
    m: usize,
    n: usize,
    k: usize,
    ld_first: usize,
    ld_second: usize,
    ldc: usize,
}

fn col_major_call(g: Gemm, d: Dims) -> ColMajorCall {
    // Row-major X[r, c] is column-major X^T: so C^T[n, m] = op(B)^T[n, k] op(A)^T[k, m].
    ColMajorCall {
        trans_first: g.trans_b,
        trans_second: g.trans_a,
        m: d.n,
        n: d.m,
        k: d.k,
        ld_first: if g.trans_b { d.k } else { d.n },
        ld_second: if g.trans_a { d.m } else { d.k },
        ldc: d.n,
    }
}

fn cublas_gemm(blas: &Blas, c: &mut DeviceTensor, a: &DeviceTensor, b: &DeviceTensor, g: Gemm, d: Dims) -> Result<()> {
    let Gemm { trans_a, trans_b, alpha, beta } = g;
    let call = col_major_call(g, d);
    let ty = |e: Elem| match e {
        Elem::BF16 => cbs::cudaDataType::CUDA_R_16BF,
        _ => cbs::cudaDataType::CUDA_R_32F,
    };
    let op = |t: bool| if t { cbs::cublasOperation_t::CUBLAS_OP_T } else { cbs::cublasOperation_t::CUBLAS_OP_N };
    // SAFETY: `dims` checked the element counts and types; alpha/beta are host f32 (the handle is
    // in host pointer mode, the default); the handle runs on the runtime's stream.
    unsafe {
        cb::gemm_ex(
            blas.handle,
            op(call.trans_first),
            op(call.trans_second),
            call.m as i32,
            call.n as i32,
            call.k as i32,
            &alpha as *const f32 as *const _,
            b.ptr() as *const _,
            ty(b.elem()),
            call.ld_first as i32,
            a.ptr() as *const _,
            ty(a.elem()),
            call.ld_second as i32,
            &beta as *const f32 as *const _,
            c.ptr() as *mut _,
            ty(c.elem()),
            call.ldc as i32,
            cbs::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cbs::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| Error::Kernel {
        kernel: "cublasGemmEx".into(),
        shape: format!("C{:?} A{:?}{} B{:?}{}", c.shape(), a.shape(), if trans_a { "^T" } else { "" }, b.shape(), if trans_b { "^T" } else { "" }),
        msg: format!("{e:?}"),
    })
}

#[cfg(test)]
mod tests {
    use super::{col_major_call, Dims, Gemm};
    use crate::backend::cpu::{matmul_nn, matmul_nt, matmul_tn};

    /// BLAS's column-major GEMM by definition: C[i + j*ldc] = alpha * sum_l opA(i, l) opB(l, j) +
    /// beta * C, with opX(r, c) = X[r + c*ld] (N) or X[c + r*ld] (T).
    #[allow(clippy::too_many_arguments)]
    fn blas_gemm(ta: bool, tb: bool, m: usize, n: usize, k: usize, alpha: f32, a: &[f32], lda: usize, b: &[f32], ldb: usize, beta: f32, c: &mut [f32], ldc: usize) {
        let at = |r: usize, col: usize| if ta { a[col + r * lda] } else { a[r + col * lda] };
        let bt = |r: usize, col: usize| if tb { b[col + r * ldb] } else { b[r + col * ldb] };
        for j in 0..n {
            for i in 0..m {
                let s: f32 = (0..k).map(|l| at(i, l) * bt(l, j)).sum();
                // beta == 0: C is not read (BLAS semantics; a NaN-poisoned C stays harmless).
                c[i + j * ldc] = if beta == 0.0 { alpha * s } else { alpha * s + beta * c[i + j * ldc] };
            }
        }
    }

    #[test]
    fn the_cublas_call_computes_the_row_major_product_for_every_transpose() {
        let (m, n, k) = (5usize, 7usize, 3usize);
        let val = |i: usize| ((i * 37 + 11) % 17) as f32 - 8.0;
        for (trans_a, trans_b) in [(false, false), (false, true), (true, false)] {
            // Row-major A is [m, k] ([k, m] when transposed), B is [k, n] ([n, k]).
            let a: Vec<f32> = (0..m * k).map(val).collect();
            let b: Vec<f32> = (0..k * n).map(|i| val(i + 5)).collect();
            let mut want = vec![0.0f32; m * n];
            match (trans_a, trans_b) {
                (false, false) => matmul_nn(&mut want, n, &a, k, &b, n, m, n, k, false),
                (false, true) => matmul_nt(&mut want, n, &a, k, &b, k, m, n, k, false),
                _ => matmul_tn(&mut want, n, &a, m, &b, n, m, n, k, false),
            }
            let g = Gemm { trans_a, trans_b, alpha: 1.0, beta: 0.0 };
            let call = col_major_call(g, Dims { m, n, k });
            let mut got = vec![f32::NAN; m * n];
            // cuBLAS's first operand is our B, its second our A, its C our C.
            blas_gemm(call.trans_first, call.trans_second, call.m, call.n, call.k, 1.0, &b, call.ld_first, &a, call.ld_second, 0.0, &mut got, call.ldc);
            assert_eq!(got, want, "trans_a {trans_a}, trans_b {trans_b}: {call:?}");
        }
    }
}
