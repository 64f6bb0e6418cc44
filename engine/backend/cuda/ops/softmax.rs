//! Launchers for kernels/softmax_ce.cu.
