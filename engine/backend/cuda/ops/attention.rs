//! Launchers for kernels/attention.cu.
