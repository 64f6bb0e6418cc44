//! Compiles every kernels/*.cu into a fatbin (sm_80 and sm_90a machine code plus compute_90 PTX)
//! and embeds them in the crate as `KERNELS: &[(name, bytes)]` in `$OUT_DIR/kernels.rs`.
//!
//! nvcc is looked up in: $NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin, the repo's .cuda/ (installed by
//! scripts/install-cuda-toolchain.sh), PATH, /usr/local/cuda/bin. Without nvcc the crate builds
//! CPU-only with a warning, except under CI=true, where every kernel must compile.
//!
//! The .cu files compile in parallel (up to cargo's NUM_JOBS). Each compile runs with
//! `-Xptxas -v`; the report is kept raw in `$OUT_DIR/<file>.ptxas.txt` and parsed into a table of
//! registers, shared memory, stack and spill bytes per kernel function and architecture,
//! `$OUT_DIR/kernel_resources.md` (scripts/kernel-resources.sh copies it to
//! docs/kernels/resources.md). A register spill is a cargo warning, and a build failure under
//! CI=true.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Real architectures compiled to machine code (each gets a ptxas report); compute_90 PTX is
/// embedded as well for newer GPUs to JIT.
const GENCODE: [&str; 6] = [
    "-gencode",
    "arch=compute_80,code=sm_80",
    "-gencode",
    "arch=compute_90a,code=sm_90a",
    "-gencode",
    "arch=compute_90,code=compute_90",
];

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

/// Resource usage of one function for one architecture, from the ptxas report.
#[derive(Clone, Debug, Default)]
struct Usage {
    function: String,
    arch: String,
    /// A kernel (`Compiling entry function`) rather than a non-inlined device function.
    entry: bool,
    registers: Option<u64>,
    smem: u64,
    stack: u64,
    spill_stores: u64,
    spill_loads: u64,
}

/// Leading integer of `s` ("40 bytes stack frame" -> 40).
fn leading_number(s: &str) -> Option<u64> {
    s.split_whitespace().next()?.parse().ok()
}

/// Parses `nvcc -Xptxas -v` output. The report, per architecture, reads:
/// ```text
/// ptxas info    : Compiling entry function 'rms_norm_f32' for 'sm_80'
/// ptxas info    : Function properties for rms_norm_f32
///     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
/// ptxas info    : Used 15 registers, used 1 barriers, 128 bytes smem, 392 bytes cmem[0]
/// ```
/// and non-inlined device functions get a `Function properties` block of their own (no `Used`).
fn parse_ptxas(report: &str) -> Vec<Usage> {
    let mut out: Vec<Usage> = Vec::new();
    let mut arch = String::from("?");
    let mut current: Option<usize> = None;
    for line in report.lines() {
        let info = line.trim().strip_prefix("ptxas info").map(|r| r.trim_start().trim_start_matches(':').trim());
        if let Some(rest) = info.and_then(|i| i.strip_prefix("Compiling entry function '")) {
            let (name, tail) = rest.split_once('\'').unwrap_or((rest, ""));
            if let Some(a) = tail.split('\'').nth(1) {
                arch = a.to_string();
            }
            out.push(Usage { function: name.to_string(), arch: arch.clone(), entry: true, ..Default::default() });
            current = Some(out.len() - 1);
        } else if let Some(name) = info.and_then(|i| i.strip_prefix("Function properties for ")) {
            let name = name.trim();
            current = match out.iter().rposition(|u| u.function == name && u.arch == arch) {
                Some(i) => Some(i),
                None => {
                    out.push(Usage { function: name.to_string(), arch: arch.clone(), ..Default::default() });
                    Some(out.len() - 1)
                }
            };
        } else if let Some(rest) = info.and_then(|i| i.strip_prefix("Used ")) {
            if let Some(u) = current.map(|i| &mut out[i]) {
                u.registers = leading_number(rest);
                for part in rest.split(',').map(str::trim) {
                    if part.ends_with("bytes smem") {
                        u.smem = leading_number(part).unwrap_or(0);
                    }
                }
            }
        } else if line.contains("bytes stack frame") {
            if let Some(u) = current.map(|i| &mut out[i]) {
                for part in line.split(',').map(str::trim) {
                    let n = leading_number(part).unwrap_or(0);
                    if part.ends_with("stack frame") {
                        u.stack = n;
                    } else if part.ends_with("spill stores") {
                        u.spill_stores = n;
                    } else if part.ends_with("spill loads") {
                        u.spill_loads = n;
                    }
                }
            }
        }
    }
    out
}

/// The markdown table of every function of every compiled file, sorted by file, function, arch.
fn resource_table(nvcc_version: &str, rows: &[(String, Usage)]) -> String {
    let mut rows: Vec<&(String, Usage)> = rows.iter().collect();
    rows.sort_by(|a, b| (&a.0, !a.1.entry, &a.1.function, &a.1.arch).cmp(&(&b.0, !b.1.entry, &b.1.function, &b.1.arch)));
    let mut s = String::new();
    s.push_str(&format!("nvcc: {nvcc_version}; flags: `--fatbin -O3 -std=c++17 -Xptxas -v {}`\n\n", GENCODE.join(" ")));
    s.push_str("| file | function | arch | registers | static shared memory (bytes) | stack frame (bytes) | spill stores (bytes) | spill loads (bytes) |\n");
    s.push_str("|---|---|---|---:|---:|---:|---:|---:|\n");
    for r in &rows {
        let (file, u) = (&r.0, &r.1);
        let name = if u.entry { format!("`{}`", u.function) } else { format!("`{}` (device function)", u.function) };
        let regs = u.registers.map_or("-".to_string(), |r| r.to_string());
        s.push_str(&format!(
            "| {file} | {name} | {} | {regs} | {} | {} | {} | {} |\n",
            u.arch, u.smem, u.stack, u.spill_stores, u.spill_loads
        ));
    }
    let kernels: Vec<&Usage> = rows.iter().map(|r| &r.1).filter(|u| u.entry).collect();
    let spilling = rows.iter().filter(|r| r.1.spill_stores > 0 || r.1.spill_loads > 0).count();
    let mut archs: Vec<&str> = kernels.iter().map(|u| u.arch.as_str()).collect();
    archs.sort();
    archs.dedup();
    s.push_str(&format!(
        "\n{} kernels x {} architectures = {} compiled entry points; {spilling} spilling.",
        kernels.len() / archs.len().max(1),
        archs.len(),
        kernels.len()
    ));
    for a in archs {
        let max = kernels.iter().filter(|u| u.arch == a).filter_map(|u| u.registers).max().unwrap_or(0);
        s.push_str(&format!(" Max registers {a}: {max}."));
    }
    s.push('\n');
    s
}

struct Compiled {
    stem: String,
    fatbin: PathBuf,
    report: String,
}

/// Runs nvcc on one .cu; Err(message) on failure.
fn compile(nvcc: &Path, kdir: &Path, out: &Path, src: &Path) -> Result<Compiled, String> {
    let stem = src.file_stem().and_then(|s| s.to_str()).unwrap_or("kernel").to_string();
    let fatbin = out.join(format!("{stem}.fatbin"));
    let output = Command::new(nvcc)
        .args(["--fatbin", "-O3", "-std=c++17", "-Xptxas", "-v", "-I"])
        .arg(kdir)
        .args(GENCODE)
        .arg("-o")
        .arg(&fatbin)
        .arg(src)
        .output()
        .map_err(|e| format!("running {}: {e}", nvcc.display()))?;
    let mut report = String::from_utf8_lossy(&output.stderr).into_owned();
    report.push_str(&String::from_utf8_lossy(&output.stdout));
    std::fs::write(out.join(format!("{stem}.ptxas.txt")), report.as_bytes()).ok();
    if !output.status.success() {
        return Err(format!("nvcc failed on {} ({}):\n{report}", src.display(), output.status));
    }
    Ok(Compiled { stem, fatbin, report })
}

/// Compiles every source on up to `jobs` threads; results in source order.
fn compile_all(nvcc: &Path, kdir: &Path, out: &Path, sources: &[PathBuf], jobs: usize) -> Vec<Result<Compiled, String>> {
    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<Result<Compiled, String>>>> = sources.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..jobs.clamp(1, sources.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(src) = sources.get(i) else { break };
                let r = compile(nvcc, kdir, out, src);
                *results[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
            });
        }
    });
    results
        .into_iter()
        .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()).unwrap_or_else(|| Err("not compiled".into())))
        .collect()
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
    let table_path = out.join("kernel_resources.md");
    let mut entries = Vec::new();
    if sources.is_empty() {
        std::fs::write(&table_path, "No kernels/*.cu to compile.\n").ok();
    } else {
        match find_nvcc(&root) {
            None if ci => panic!("CI=true: nvcc not found, but kernels/*.cu must compile (run scripts/install-cuda-toolchain.sh)"),
            None => {
                println!("cargo:warning=nvcc not found: building without CUDA kernels (CPU backend only)");
                std::fs::write(&table_path, "No kernels compiled: nvcc not found (CPU-only build).\n").ok();
            }
            Some(nvcc) => {
                let version = Command::new(&nvcc)
                    .arg("--version")
                    .output()
                    .ok()
                    .and_then(|o| String::from_utf8(o.stdout).ok())
                    .and_then(|s| s.lines().find(|l| l.contains("release")).map(|l| l.trim().to_string()))
                    .unwrap_or_else(|| "unknown version".to_string());
                let jobs = std::env::var("NUM_JOBS").ok().and_then(|j| j.parse().ok()).unwrap_or(1);
                let results = compile_all(&nvcc, &kdir, &out, &sources, jobs);
                let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
                if !failures.is_empty() {
                    let all: Vec<&str> = failures.iter().map(|s| s.as_str()).collect();
                    panic!("{} of {} kernel files failed to compile (nvcc {}):\n{}", failures.len(), sources.len(), nvcc.display(), all.join("\n"));
                }
                let mut rows: Vec<(String, Usage)> = Vec::new();
                let mut spills: Vec<String> = Vec::new();
                for c in results.into_iter().flatten() {
                    let file = format!("{}.cu", c.stem);
                    for l in c.report.lines().filter(|l| l.contains("warning")) {
                        println!("cargo:warning=kernels/{file}: {}", l.trim());
                    }
                    let usage = parse_ptxas(&c.report);
                    if !usage.iter().any(|u| u.entry && u.registers.is_some()) {
                        let msg = format!("kernels/{file}: no kernel found in the ptxas report (see {})", out.join(format!("{}.ptxas.txt", c.stem)).display());
                        if ci {
                            panic!("CI=true: {msg}");
                        }
                        println!("cargo:warning={msg}");
                    }
                    for u in &usage {
                        if u.spill_stores > 0 || u.spill_loads > 0 {
                            spills.push(format!(
                                "kernels/{file}: {} ({}): register spill: {} bytes stores, {} bytes loads",
                                u.function, u.arch, u.spill_stores, u.spill_loads
                            ));
                        }
                    }
                    rows.extend(usage.into_iter().map(|u| (file.clone(), u)));
                    entries.push((c.stem, c.fatbin));
                }
                std::fs::write(&table_path, resource_table(&version, &rows)).expect("writing kernel_resources.md");
                if !spills.is_empty() {
                    if ci {
                        panic!("CI=true: register spills are build failures:\n{}", spills.join("\n"));
                    }
                    for s in &spills {
                        println!("cargo:warning={s}");
                    }
                }
            }
        }
    }
    let body: String = entries.iter().map(|(n, p)| format!("    ({n:?}, include_bytes!({:?})),\n", p.display().to_string())).collect();
    let code = format!("/// Embedded CUDA fatbins, one per kernels/*.cu (empty in a CPU-only build).\npub static KERNELS: &[(&str, &[u8])] = &[\n{body}];\n");
    std::fs::write(out.join("kernels.rs"), code).expect("writing kernels.rs");
}
