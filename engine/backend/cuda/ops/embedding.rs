//! Launchers for kernels/embedding.cu.
