//! Launchers for kernels/optim.cu.
