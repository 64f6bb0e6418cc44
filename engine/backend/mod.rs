//! Compute backends. `cpu` is the reference every other backend is checked against.
pub mod cpu;
