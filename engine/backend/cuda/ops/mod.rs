//! One launcher per kernel of kernels/*.cu. Each checks its operands' shapes and element types
//! and returns `Error::Kernel` naming the kernel and the shapes when they do not fit, so an unsafe
//! launch only ever sees operands the kernel's layout comment allows. Launchers queue work on the
//! runtime's stream and return without waiting.
pub mod attention;
pub mod beam;
pub mod elementwise;
pub mod embedding;
pub mod kv;
pub mod loss;
pub mod lora;
pub mod optim;
pub mod probe;
pub mod softmax;

pub use super::blas::{fallback_gemm, matmul, Gemm, GemmImpl};

use super::tensor::Elem;
use super::{Arg, Cuda, DeviceTensor, Launch};
use crate::error::{Error, Result};

/// Named operands of one launch, for checks and error messages.
pub(crate) type Ops<'a> = Vec<(&'static str, &'a DeviceTensor)>;

/// Queues `kernel` of kernels/`stem`.cu with the operands `all` as the error message's shape.
///
/// # Safety
/// As `Cuda::launch`: `args` match the C signature of `kernel` and every pointer covers what the
/// kernel touches with `cfg`.
pub(crate) unsafe fn launch(cuda: &Cuda, stem: &'static str, kernel: &'static str, cfg: Launch, args: &[Arg], all: &[(&str, &DeviceTensor)]) -> Result<()> {
    // SAFETY: forwarded from this function's contract.
    unsafe { cuda.launch(stem, kernel, cfg, args, &|| describe(all)) }
}

/// `Error::Kernel` for `kernel`, with the shapes of `operands` as the shape.
pub(crate) fn bad(kernel: &str, operands: &[(&str, &DeviceTensor)], msg: impl Into<String>) -> Error {
    Error::Kernel { kernel: kernel.to_string(), shape: describe(operands), msg: msg.into() }
}

/// "x [4, 576] BF16, w [576] BF16" for error messages.
pub(crate) fn describe(operands: &[(&str, &DeviceTensor)]) -> String {
    operands
        .iter()
        .map(|(n, t)| format!("{n} {:?} {:?}", t.shape(), t.elem()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Fails unless `t` has exactly `numel` elements.
pub(crate) fn expect_len(kernel: &str, name: &str, t: &DeviceTensor, numel: usize, all: &[(&str, &DeviceTensor)]) -> Result<()> {
    if t.numel() != numel {
        return Err(bad(kernel, all, format!("`{name}` must hold {numel} elements, has {}", t.numel())));
    }
    Ok(())
}

/// Fails unless `t`'s element type is one of `allowed`.
pub(crate) fn expect_elem(kernel: &str, name: &str, t: &DeviceTensor, allowed: &[Elem], all: &[(&str, &DeviceTensor)]) -> Result<()> {
    if !allowed.contains(&t.elem()) {
        return Err(bad(kernel, all, format!("`{name}` must be one of {allowed:?}, is {:?}", t.elem())));
    }
    Ok(())
}

/// Fails when a size does not fit the kernel's `uint32_t` parameter.
pub(crate) fn u32_of(kernel: &str, name: &str, v: usize, all: &[(&str, &DeviceTensor)]) -> Result<u32> {
    u32::try_from(v).map_err(|_| bad(kernel, all, format!("`{name}` = {v} exceeds u32")))
}
