//! The CPU backend: every op in f32 math over row-major slices. It is the executable
//! specification of the engine, so each function states its exact formula; hot paths use the
//! `gemm` crate and rayon.
mod attention;
mod backward;
mod elementwise;
mod gemv;
mod matmul;
mod vexp;

pub use attention::{attention, AttentionShape};
pub use backward::{attention_backward, rms_norm_backward, silu_mul_backward};
pub use elementwise::{add_bias, add_inplace, rms_norm, rope_inplace, rope_tables, silu_mul};
pub use matmul::{matmul_nn, matmul_nt, matmul_tn};
pub use vexp::exp_shift_sum;
