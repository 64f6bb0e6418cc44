//! Every CUDA kernel, the device forward and the device training micro-batch against the CPU
//! reference (engine/backend/cuda/selftest, with --full). Skips with one
//! line when this machine has no GPU.
use ilrec::backend::cuda::{selftest, Cuda};

#[test]
fn every_kernel_matches_the_cpu_reference() {
    let cuda = match Cuda::new(0) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("skipped: no usable GPU ({e}); the CUDA kernels are compiled, unverified on GPU");
            return;
        }
    };
    let rows = selftest::run(&cuda, 7, true).expect("selftest ran");
    let failed: Vec<_> = rows.iter().filter(|r| !r.pass()).collect();
    assert!(!rows.is_empty(), "no checks ran");
    assert!(failed.is_empty(), "failed checks:\n{}", selftest::table(&rows));
}

#[test]
fn no_gpu_is_an_error_not_a_panic() {
    // On a machine without a GPU, opening one must fail cleanly; with a GPU it must open.
    match Cuda::new(0) {
        Ok(c) => assert!(!c.name().is_empty()),
        Err(e) => assert!(e.to_string().starts_with("device:"), "{e}"),
    }
    // An ordinal past the last GPU is an error everywhere.
    assert!(Cuda::new(1 << 20).is_err());
}
