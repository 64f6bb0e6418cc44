//! The host emulator for kernel tests: `ilrec::backend::cuda::emu` (kernels/emu/README.md), with
//! builds that print one skip line instead of failing when no C++ compiler is installed.
//!
//! ```ignore
//! let Some(k) = emu::build("attention") else { return };  // prints a skip line without g++
//! let f: unsafe extern "C" fn(*mut f32, ...) = k.kernel("attention_fwd_f32");
//! let (po, pq) = (out.as_mut_ptr(), q.as_ptr());
//! unsafe { k.launch([tq, heads, batch], [128, 1, 1], smem, || f(po, pq, ...)) }.unwrap();
//! ```
#[allow(unused_imports)] // each test binary uses its own part
pub use ilrec::backend::cuda::emu::{bf16_bits, bf16_f32, dim, Buf, BuildError, Emu, Schedule};
use std::path::Path;

/// `kernels/<stem>.cu` built for the emulator; None (after a skip line) when g++ is absent;
/// panics with the compiler's messages when the file does not compile.
pub fn build(stem: &str) -> Option<Emu> {
    build_file(&super::repo().join("kernels").join(format!("{stem}.cu")))
}

/// Any `.cu` file (e.g. a test kernel under tests/emu/), as `build`.
pub fn build_file(src: &Path) -> Option<Emu> {
    match Emu::compile_file(src) {
        Ok(k) => Some(k),
        Err(BuildError::NoCompiler(why)) => {
            let name = src.file_name().and_then(|s| s.to_str()).unwrap_or("?");
            super::skip(&format!("emulator build of {name}"), &why);
            None
        }
        Err(BuildError::Failed(e)) => panic!("{e}"),
    }
}
