//! Compute backends. `cpu` is the reference every other backend is checked against.
pub mod cpu;
pub mod cuda;

/// Kernel fatbins compiled by build.rs from kernels/*.cu.
pub mod kernels {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}
