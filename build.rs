//! Compiles every kernels/*.cu into a fatbin (sm_80 and sm_90a machine code plus compute_90 PTX)
//! and embeds them in the crate as `KERNELS: &[(name, bytes)]` in `$OUT_DIR/kernels.rs`.
//!
//! nvcc is looked up in: $NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin, the repo's .cuda/ (installed by
//! scripts/install-cuda-toolchain.sh), PATH, /usr/local/cuda/bin. Without nvcc the crate builds
//! CPU-only with a warning, except under CI=true, where every kernel must compile.
use std::path::{Path, PathBuf};
use std::process::Command;

fn find_nvcc(root: &Path) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("NVCC") {
        candidates.push(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(p) = std::env::var_os(var) {
            candidates.push(PathBuf::from(p).join("bin/nvcc"));
        }
    }
    // Called by its real path: a symlinked nvcc loses its headers.
    candidates.push(root.join(".cuda/nvidia/cu13/bin/nvcc"));
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("nvcc")));
    }
    candidates.push(PathBuf::from("/usr/local/cuda/bin/nvcc"));
    candidates.into_iter().find(|p| p.is_file())
}

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let kdir = root.join("kernels");
    println!("cargo:rerun-if-changed=kernels");
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "CI"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&kdir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "cu")).collect())
        .unwrap_or_default();
    sources.sort();
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    let mut entries = Vec::new();
    if !sources.is_empty() {
        match find_nvcc(&root) {
            None if ci => panic!("CI=true: nvcc not found, but kernels/*.cu must compile (run scripts/install-cuda-toolchain.sh)"),
            None => println!("cargo:warning=nvcc not found: building without CUDA kernels (CPU backend only)"),
            Some(nvcc) => {
                for src in &sources {
                    let stem = src.file_stem().and_then(|s| s.to_str()).unwrap_or("kernel").to_string();
                    let fatbin = out.join(format!("{stem}.fatbin"));
                    let output = Command::new(&nvcc)
                        .args(["--fatbin", "-O3", "-std=c++17", "-Xptxas", "-v", "-I"])
                        .arg(&kdir)
                        .args(["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a", "-gencode", "arch=compute_90,code=compute_90", "-o"])
                        .arg(&fatbin)
                        .arg(src)
                        .output()
                        .unwrap_or_else(|e| panic!("running {}: {e}", nvcc.display()));
                    let report = String::from_utf8_lossy(&output.stderr);
                    if !output.status.success() {
                        panic!("nvcc failed on {}:\n{report}", src.display());
                    }
                    for line in report.lines().filter(|l| l.contains("bytes spill") && !l.contains(" 0 bytes spill stores, 0 bytes spill loads")) {
                        println!("cargo:warning={}: register spill: {}", src.display(), line.trim());
                    }
                    std::fs::write(out.join(format!("{stem}.ptxas.txt")), report.as_bytes()).ok();
                    entries.push((stem, fatbin));
                }
            }
        }
    }
    let body: String = entries.iter().map(|(n, p)| format!("    ({n:?}, include_bytes!({:?})),\n", p.display().to_string())).collect();
    let code = format!("/// Embedded CUDA fatbins, one per kernels/*.cu (empty in a CPU-only build).\npub static KERNELS: &[(&str, &[u8])] = &[\n{body}];\n");
    std::fs::write(out.join("kernels.rs"), code).expect("writing kernels.rs");
}
