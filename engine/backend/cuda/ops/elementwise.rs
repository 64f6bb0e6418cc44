//! Launchers for kernels/elementwise.cu.
