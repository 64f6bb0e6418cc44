//! The host emulator of the CUDA kernels (kernels/emu/README.md): compiles a `.cu` file with g++
//! into a shared library (cached on disk by content hash) and launches its kernels on the CPU, with
//! device pointers that are plain host pointers.
//!
//! Two users: the kernel tests (tests/*_emu.rs), which call a kernel through a typed function
//! pointer, and the emulated CUDA runtime (`Cuda::emulated`, `--device emu`), which launches by
//! name with the same `Arg` list the driver gets, so the whole CUDA backend (launchers, model,
//! trainer, device beam search) runs on a machine without a GPU. A development tool: it needs
//! g++ (C++20) and the kernel sources (`ILREC_KERNELS_DIR`, default: this crate's kernels/), and it
//! says nothing about speed.
//!
//! ```ignore
//! let k = Emu::compile("attention")?;
//! let f: unsafe extern "C" fn(*mut f32, ...) = k.kernel("attention_fwd_f32");
//! let (po, pq) = (out.as_mut_ptr(), q.as_ptr());
//! unsafe { k.launch([tq, heads, batch], [128, 1, 1], smem, || f(po, pq, ...)) }?;
//! ```
use super::{Arg, Launch};
use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr};
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};

/// g++ flags of every emulator build (the README's command line).
const FLAGS: &[&str] =
    &["-std=c++20", "-O1", "-g", "-shared", "-fPIC", "-fvisibility=hidden", "-pthread", "-ffp-contract=off", "-DILREC_EMU"];

/// Dynamic shared memory a launch may use without the per-function opt-in
/// (`CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`), which `Cuda::launch` does not make.
pub const DEFAULT_SMEM_LIMIT: u32 = 48 * 1024;

type LaunchFn = unsafe extern "C" fn(
    grid: *const u32,
    block: *const u32,
    dyn_smem: u64,
    schedule: u32,
    thunk: unsafe extern "C" fn(*mut c_void),
    ctx: *mut c_void,
    err: *mut c_char,
    err_cap: u64,
) -> i32;
type CallFn = unsafe extern "C" fn(args: *const *mut c_void);
type SigFn = unsafe extern "C" fn() -> *const c_char;
type BoundFn = unsafe extern "C" fn() -> u32;
type GuardedAlloc = unsafe extern "C" fn(bytes: u64) -> *mut c_void;
type GuardedFree = unsafe extern "C" fn(p: *mut c_void, bytes: u64);

/// Order in which the emulator runs a block's ready threads between barriers. Threads run until
/// they block, so the order picks which unsynchronised interleaving of shared-memory accesses a
/// launch sees; running a kernel under two orders exposes a missing barrier either way round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    Ascending,
    Descending,
    /// A pseudo-random order per block from this seed (not 0 or 1).
    Shuffled(u32),
}

impl Schedule {
    fn code(self) -> u32 {
        match self {
            Schedule::Ascending => 0,
            Schedule::Descending => 1,
            Schedule::Shuffled(s) => s.max(2),
        }
    }
}

/// Why a file could not be built for the emulator.
#[derive(Clone, Debug)]
pub enum BuildError {
    /// No usable C++ compiler (callers that can do without the emulator skip).
    NoCompiler(String),
    /// The source did not compile or load: the compiler's messages.
    Failed(String),
}

impl std::fmt::Display for BuildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BuildError::NoCompiler(m) | BuildError::Failed(m) => f.write_str(m),
        }
    }
}

/// One emulated kernel file, loaded. Cheap to clone; the library stays loaded for the process.
#[derive(Clone)]
pub struct Emu {
    lib: Arc<libloading::Library>,
    launch_fn: LaunchFn,
    name: String,
    schedule: Schedule,
}

/// A kernel operand in guarded memory (`Emu::buffer`): its last element is followed by (at most
/// 15 bytes of 0xFF padding and then) an inaccessible page, so a kernel that reads or writes
/// past the end crashes with the emulator's report naming the block and thread, instead of
/// silently using other host data. Derefs to a slice; `as_ptr`/`as_mut_ptr` are the device
/// pointers.
pub struct Buf<T: Copy> {
    ptr: *mut T,
    len: usize,
    free: GuardedFree,
    _lib: Arc<libloading::Library>,
}

impl<T: Copy> Deref for Buf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: ptr holds len initialised T (written in Emu::buffer), 16-byte aligned, and
        // lives until drop.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl<T: Copy> DerefMut for Buf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in deref; &mut self makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl<T: Copy> Drop for Buf<T> {
    fn drop(&mut self) {
        // SAFETY: ptr came from emu_guarded_alloc of exactly this many bytes.
        unsafe { (self.free)(self.ptr as *mut c_void, std::mem::size_of_val::<[T]>(self) as u64) }
    }
}

type Built = Result<Arc<libloading::Library>, BuildError>;

fn cache() -> &'static Mutex<HashMap<PathBuf, Arc<OnceLock<Built>>>> {
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, Arc<OnceLock<Built>>>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

fn compiler() -> String {
    std::env::var("ILREC_EMU_CXX").unwrap_or_else(|_| "g++".to_string())
}

/// The compiler's version line, or None when it cannot be run.
fn compiler_version() -> Option<String> {
    static VERSION: OnceLock<Option<String>> = OnceLock::new();
    VERSION
        .get_or_init(|| {
            let out = Command::new(compiler()).arg("--version").output().ok()?;
            out.status.success().then(|| String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or("").to_string())
        })
        .clone()
}

/// Whether a compiler for the emulator can be run here.
pub fn available() -> bool {
    compiler_version().is_some()
}

/// Where the kernel sources are: `ILREC_KERNELS_DIR`, else this crate's kernels/.
pub fn kernels_dir() -> PathBuf {
    std::env::var_os("ILREC_KERNELS_DIR").map(PathBuf::from).unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels"))
}

/// Where built libraries are cached: `ILREC_EMU_CACHE`, else a per-user folder in the temp dir.
fn cache_dir() -> PathBuf {
    std::env::var_os("ILREC_EMU_CACHE").map(PathBuf::from).unwrap_or_else(|| {
        let user = std::env::var("USER").unwrap_or_else(|_| "user".into());
        std::env::temp_dir().join(format!("ilrec-emu-{user}"))
    })
}

/// FNV-1a: a stable content hash (std's hasher may change between releases).
fn fnv(h: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *h ^= u64::from(b);
        *h = h.wrapping_mul(0x100_0000_01b3);
    }
}

/// Everything a build depends on: the source, every header it could include, the flags and g++.
fn content_hash(src: &Path, include_dirs: &[PathBuf]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    fnv(&mut h, &std::fs::read(src).unwrap_or_default());
    let mut headers = Vec::new();
    for dir in include_dirs.iter().cloned().chain([kernels_dir().join("emu")]) {
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let p = e.path();
                if matches!(p.extension().and_then(|x| x.to_str()), Some("cuh" | "h")) {
                    headers.push(p);
                }
            }
        }
    }
    headers.sort();
    for p in headers {
        fnv(&mut h, p.to_string_lossy().as_bytes());
        fnv(&mut h, &std::fs::read(&p).unwrap_or_default());
    }
    fnv(&mut h, FLAGS.join(" ").as_bytes());
    fnv(&mut h, compiler_version().unwrap_or_default().as_bytes());
    h
}

/// The kernels of a preprocessed source (`-DILREC_EMU_SCAN`, see kernels/emu/emu.h): each name
/// with its `__launch_bounds__` thread limit as a C expression ("0" without one).
fn scan_kernels(pre: &str) -> Vec<(String, String)> {
    const MARK: &str = "ILREC_EMU_KERNEL";
    const BOUNDS: &str = "ILREC_EMU_BOUNDS";
    let mut out = Vec::new();
    for (at, _) in pre.match_indices(MARK) {
        let mut rest = pre[at + MARK.len()..].trim_start();
        let Some(r) = rest.strip_prefix("void") else { continue };
        rest = r.trim_start();
        let mut bound = "0".to_string();
        if let Some(r) = rest.strip_prefix(BOUNDS) {
            let r = r.trim_start();
            let Some(r) = r.strip_prefix('(') else { continue };
            // The first argument (max threads), up to a comma or the closing parenthesis at depth 0.
            let (mut depth, mut end, mut first_end) = (0usize, None, None);
            for (i, ch) in r.char_indices() {
                match ch {
                    '(' => depth += 1,
                    ')' if depth == 0 => {
                        end = Some(i);
                        break;
                    }
                    ')' => depth -= 1,
                    ',' if depth == 0 && first_end.is_none() => first_end = Some(i),
                    _ => {}
                }
            }
            let Some(end) = end else { continue };
            bound = r[..first_end.unwrap_or(end)].trim().to_string();
            rest = r[end + 1..].trim_start();
        }
        let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if !name.is_empty() && rest[name.len()..].trim_start().starts_with('(') {
            out.push((name, bound));
        }
    }
    out
}

fn run(cmd: &mut Command, what: &str) -> Result<Vec<u8>, BuildError> {
    let out = cmd.output().map_err(|e| BuildError::Failed(format!("running {}: {e}", compiler())))?;
    if !out.status.success() {
        return Err(BuildError::Failed(format!("{what} failed:\n{}", String::from_utf8_lossy(&out.stderr))));
    }
    Ok(out.stdout)
}

fn compile(src: &Path) -> Built {
    let kernels = kernels_dir();
    let mut include_dirs = vec![kernels.clone()];
    if let Some(parent) = src.parent() {
        if parent != kernels {
            include_dirs.push(parent.to_path_buf());
        }
    }
    let stem = src.file_stem().and_then(|s| s.to_str()).unwrap_or("kernel");
    let dir = cache_dir();
    std::fs::create_dir_all(&dir).map_err(|e| BuildError::Failed(format!("creating {}: {e}", dir.display())))?;
    let so = dir.join(format!("{stem}-{:016x}.so", content_hash(src, &include_dirs)));
    if !so.exists() {
        let prelude = kernels.join("emu/emu.h");
        // Both passes: the build flags, the prelude and the include path.
        let gxx = || {
            let mut cmd = Command::new(compiler());
            cmd.args(FLAGS).arg("-include").arg(&prelude);
            for d in &include_dirs {
                cmd.arg("-I").arg(d);
            }
            cmd
        };
        // Pass 1: preprocess with markers to find every kernel (macro-made ones too).
        let mut scan = gxx();
        scan.arg("-DILREC_EMU_SCAN").arg("-E").arg("-P").arg("-x").arg("c++").arg(src);
        let pre = run(&mut scan, &format!("preprocessing {}", src.display()))?;
        let kernels_found = scan_kernels(&String::from_utf8_lossy(&pre));
        // Pass 2: the file plus an entry point per kernel for launches by name.
        let pid = std::process::id();
        let wrapper = dir.join(format!("{stem}.{pid}.emu.cpp"));
        let mut text = format!("#include \"{}\"\n", src.display());
        for (name, bound) in &kernels_found {
            text.push_str(&format!("ILREC_EMU_ENTRY({name}, {bound})\n"));
        }
        std::fs::write(&wrapper, text).map_err(|e| BuildError::Failed(format!("writing {}: {e}", wrapper.display())))?;
        let tmp = dir.join(format!("{stem}.{pid}.tmp.so"));
        let mut cmd = gxx();
        cmd.arg("-x").arg("c++").arg(&wrapper).arg("-o").arg(&tmp);
        let built = run(&mut cmd, &format!("emulator build of {}", src.display()));
        let _ = std::fs::remove_file(&wrapper);
        if let Err(e) = built {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        // Atomic: a concurrent process building the same file loads a complete library.
        std::fs::rename(&tmp, &so).map_err(|e| BuildError::Failed(format!("renaming {}: {e}", tmp.display())))?;
    }
    // SAFETY: the library is ours (built above from the repository's sources); its initialisers
    // only set up globals.
    let lib = unsafe { libloading::Library::new(&so) }.map_err(|e| BuildError::Failed(format!("loading {}: {e}", so.display())))?;
    Ok(Arc::new(lib))
}

impl Emu {
    /// `kernels/<stem>.cu` (in [`kernels_dir`]), built for the emulator.
    pub fn compile(stem: &str) -> Result<Emu, BuildError> {
        Self::compile_file(&kernels_dir().join(format!("{stem}.cu")))
    }

    /// Any `.cu` file (e.g. a test kernel); the kernels folder and the file's own folder are on
    /// the include path. Built once per process and cached on disk by content hash.
    pub fn compile_file(src: &Path) -> Result<Emu, BuildError> {
        let name = src.file_name().and_then(|s| s.to_str()).unwrap_or("?").to_string();
        if compiler_version().is_none() {
            return Err(BuildError::NoCompiler(format!("{} not found (set ILREC_EMU_CXX)", compiler())));
        }
        if !src.is_file() {
            return Err(BuildError::Failed(format!("{} does not exist (set ILREC_KERNELS_DIR to the kernel sources)", src.display())));
        }
        let slot = cache().lock().unwrap_or_else(|p| p.into_inner()).entry(src.to_path_buf()).or_default().clone();
        let lib = slot.get_or_init(|| compile(src)).clone()?;
        // SAFETY: emu_launch is defined by kernels/emu/runtime.h with exactly this signature.
        let launch_fn = unsafe { lib.get::<LaunchFn>("emu_launch") }
            .map(|f| *f)
            .map_err(|e| BuildError::Failed(format!("{name}: no emu_launch: {e}")))?;
        Ok(Emu { lib, launch_fn, name, schedule: Schedule::Ascending })
    }

    /// The file name this library was built from.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `data` copied into guarded memory (see [`Buf`]), the way a test passes kernel operands
    /// that must not be over-read. Element types with alignment above 16 are not supported.
    pub fn buffer<T: Copy>(&self, data: &[T]) -> Buf<T> {
        assert!(std::mem::align_of::<T>() <= 16, "Emu::buffer: alignment above 16");
        let (alloc, free) = self.guarded();
        let bytes = std::mem::size_of_val(data) as u64;
        // SAFETY: a fresh mapping of `bytes` writable bytes, 16-byte aligned.
        let ptr = unsafe { alloc(bytes) } as *mut T;
        assert!(!ptr.is_null(), "Emu::buffer: cannot map {bytes} bytes");
        // SAFETY: ptr has room for data.len() elements and does not overlap data.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr, data.len()) };
        Buf { ptr, len: data.len(), free, _lib: self.lib.clone() }
    }

    fn guarded(&self) -> (GuardedAlloc, GuardedFree) {
        // SAFETY: both functions are defined by kernels/emu/runtime.h with these signatures.
        unsafe {
            let alloc = *self.lib.get::<GuardedAlloc>("emu_guarded_alloc").expect("emu_guarded_alloc");
            let free = *self.lib.get::<GuardedFree>("emu_guarded_free").expect("emu_guarded_free");
            (alloc, free)
        }
    }

    /// The same library with another thread order for its launches.
    pub fn with_schedule(&self, schedule: Schedule) -> Emu {
        Emu { schedule, ..self.clone() }
    }

    /// The kernel `name` (an `extern "C"` entry point) as a function pointer of type `F`, which
    /// must be an `unsafe extern "C" fn(...)` matching the kernel's parameters. Panics when absent.
    pub fn kernel<F: Copy>(&self, name: &str) -> F {
        // SAFETY: the caller names the kernel's signature; the library outlives the pointer (it
        // is never unloaded: the process-wide cache holds it).
        unsafe { *self.lib.get::<F>(name).unwrap_or_else(|e| panic!("{}: no kernel {name}: {e}", self.name)) }
    }

    /// Runs `body` once per thread of a `grid` x `block` launch with `smem` bytes of dynamic
    /// shared memory, blocks one after the other; `body` calls the kernel. Returns the
    /// emulator's report on a deadlock, a barrier under divergent control flow, a misused warp
    /// collective, an invalid launch shape, a `__trap()` or a panic in `body`.
    ///
    /// # Safety
    /// `body` is called from the emulated threads (fibers on this OS thread, one at a time); the
    /// kernel it calls reads and writes whatever its pointer arguments point at, so they must
    /// be valid for the whole launch, as for a real kernel launch.
    pub unsafe fn launch<F: Fn()>(&self, grid: [u32; 3], block: [u32; 3], smem: usize, body: F) -> Result<(), String> {
        struct Ctx<'a, F> {
            body: &'a F,
            panic: Mutex<Option<String>>,
        }
        unsafe extern "C" fn thunk<F: Fn()>(ctx: *mut c_void) {
            // SAFETY: ctx is the Ctx below, alive for the whole launch.
            let ctx = unsafe { &*(ctx as *const Ctx<F>) };
            // A panic must not unwind into the C++ scheduler.
            if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (ctx.body)())) {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panic".into());
                ctx.panic.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(msg);
            }
        }
        let ctx = Ctx { body: &body, panic: Mutex::new(None) };
        let mut err = vec![0 as c_char; 4096];
        // SAFETY: emu_launch runs thunk(ctx) on fibers and returns after every one finished or
        // was abandoned; ctx and err outlive the call.
        let rc = unsafe {
            (self.launch_fn)(
                grid.as_ptr(),
                block.as_ptr(),
                smem as u64,
                self.schedule.code(),
                thunk::<F>,
                &ctx as *const Ctx<F> as *mut c_void,
                err.as_mut_ptr(),
                err.len() as u64,
            )
        };
        if let Some(p) = ctx.panic.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(format!("{}: panic in the launch body: {p}", self.name));
        }
        if rc != 0 {
            // SAFETY: emu_launch NUL-terminates the message within err.
            let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
            return Err(format!("{}: {msg}", self.name));
        }
        Ok(())
    }

    /// Launches `kernel` by name with the driver's argument list, after the checks a GPU would
    /// fail (or silently misread) on: the argument count and each argument's kind and width
    /// against the kernel's parameters, the block against its `__launch_bounds__`, and the
    /// dynamic shared memory against the 48 KiB a launch gets without the opt-in.
    ///
    /// # Safety
    /// As [`Emu::launch`]: every pointer argument must address host memory large enough for what
    /// the kernel does with this launch shape.
    pub unsafe fn launch_args(&self, kernel: &str, cfg: &Launch, args: &[Arg]) -> Result<(), String> {
        let sym = |prefix: &str| format!("{prefix}{kernel}");
        // SAFETY: the ILREC_EMU_ENTRY functions have exactly these signatures (kernels/emu/emu.h).
        let (call, sig, bound) = unsafe {
            let call = self.lib.get::<CallFn>(sym("emu_call__").as_str()).map_err(|_| format!("{}: no kernel `{kernel}`", self.name))?;
            let sig = self.lib.get::<SigFn>(sym("emu_sig__").as_str()).map_err(|e| e.to_string())?;
            let bound = self.lib.get::<BoundFn>(sym("emu_bound__").as_str()).map_err(|e| e.to_string())?;
            (*call, CStr::from_ptr((*sig)()).to_string_lossy().into_owned(), (*bound)())
        };
        let kinds: Vec<char> = sig.chars().collect();
        if kinds.len() != args.len() {
            return Err(format!("`{kernel}` takes {} parameters ({sig}), the launch passes {}", kinds.len(), args.len()));
        }
        for (i, (k, a)) in kinds.iter().zip(args).enumerate() {
            let ok = matches!(
                (k, a),
                ('p', Arg::Ptr(_)) | ('i', Arg::U32(_) | Arg::I32(_)) | ('l', Arg::U64(_)) | ('f', Arg::F32(_)) | ('d', Arg::F64(_))
            );
            if !ok {
                let want = match k {
                    'p' => "a pointer",
                    'i' => "a 4-byte integer",
                    'l' => "an 8-byte integer",
                    'f' => "a float",
                    'd' => "a double",
                    _ => "a type the launcher cannot pass",
                };
                return Err(format!("`{kernel}` parameter {i} is {want}; the launch passes {a:?}"));
            }
        }
        let threads = cfg.block.0 * cfg.block.1 * cfg.block.2;
        if bound > 0 && threads > bound {
            return Err(format!("`{kernel}` launched with {threads} threads per block; its __launch_bounds__ allows {bound}"));
        }
        if cfg.shared_bytes > DEFAULT_SMEM_LIMIT {
            return Err(format!(
                "`{kernel}` asks for {} bytes of dynamic shared memory; above {DEFAULT_SMEM_LIMIT} needs the per-function opt-in",
                cfg.shared_bytes
            ));
        }
        let vals: Vec<Arg> = args.to_vec();
        let ptrs: Vec<*mut c_void> = vals.iter().map(Arg::addr).collect();
        let argv = ptrs.as_ptr();
        let grid = [cfg.grid.0, cfg.grid.1, cfg.grid.2];
        let block = [cfg.block.0, cfg.block.1, cfg.block.2];
        // SAFETY: `argv` points at one value per parameter, of the parameter's width (checked
        // above), alive for the launch; the caller vouches for the memory behind the pointers.
        unsafe { self.launch(grid, block, cfg.shared_bytes as usize, || call(argv)) }
    }

    /// `bytes` of guarded memory (see [`Buf`]), for the emulated runtime's allocator. Null when
    /// the mapping fails.
    pub(crate) fn alloc_guarded(&self, bytes: usize) -> *mut u8 {
        // SAFETY: a fresh mapping; the caller frees it with free_guarded and the same size.
        unsafe { (self.guarded().0)(bytes as u64) as *mut u8 }
    }

    /// # Safety
    /// `p` came from `alloc_guarded(bytes)` of a library built from the same runtime (any file:
    /// the allocator is the same code) and is not used afterwards.
    pub(crate) unsafe fn free_guarded(&self, p: *mut u8, bytes: usize) {
        // SAFETY: as the caller vouches.
        unsafe { (self.guarded().1)(p as *mut c_void, bytes as u64) }
    }
}

/// `[n, 1, 1]`
pub fn dim(n: u32) -> [u32; 3] {
    [n, 1, 1]
}

/// f32 -> bf16 bits, round to nearest even (the kernels' `__float2bfloat16_rn`).
pub fn bf16_bits(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// bf16 bits -> f32 (exact).
pub fn bf16_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

#[cfg(test)]
mod tests {
    use super::scan_kernels;

    #[test]
    fn the_scan_finds_kernels_with_and_without_bounds() {
        let pre = r#"extern "C" ILREC_EMU_KERNEL void ILREC_EMU_BOUNDS(256) attention_fwd_f32(float *out, int n) {}
            extern "C" ILREC_EMU_KERNEL void beam_lse_f32(double *lse) {}
            extern "C" ILREC_EMU_KERNEL void ILREC_EMU_BOUNDS((4 * 32), 2)
                flash_attn_fwd_d64(float *o) {}
            static void helper(int);"#;
        let k = scan_kernels(pre);
        let want = [("attention_fwd_f32", "256"), ("beam_lse_f32", "0"), ("flash_attn_fwd_d64", "(4 * 32)")];
        assert_eq!(k.len(), want.len(), "{k:?}");
        for ((n, b), (wn, wb)) in k.iter().zip(want) {
            assert_eq!((n.as_str(), b.as_str()), (wn, wb));
        }
    }
}
