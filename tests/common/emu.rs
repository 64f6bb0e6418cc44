//! The host emulator of the CUDA kernels (kernels/emu/README.md): compiles a `.cu` file with g++
//! into a shared library (once per process, cached on disk by content hash) and launches its
//! kernels on the CPU, with device pointers that are plain host pointers.
//!
//! ```ignore
//! let Some(k) = emu::Emu::build("attention") else { return };  // prints a skip line without g++
//! let f: unsafe extern "C" fn(*mut f32, ...) = k.kernel("attention_fwd_f32");
//! let (po, pq) = (out.as_mut_ptr(), q.as_ptr());
//! k.launch([tq, heads, batch], [128, 1, 1], smem, || unsafe { f(po, pq, ...) }).unwrap();
//! ```
use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr};
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};

/// g++ flags of every emulator build (the README's command line).
const FLAGS: &[&str] =
    &["-std=c++20", "-O1", "-g", "-shared", "-fPIC", "-fvisibility=hidden", "-pthread", "-ffp-contract=off", "-DILREC_EMU"];

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

/// One emulated kernel file, loaded. Cheap to clone; the library stays loaded for the process.
#[derive(Clone)]
pub struct Emu {
    lib: Arc<libloading::Library>,
    launch_fn: LaunchFn,
    name: String,
    schedule: Schedule,
}

type GuardedAlloc = unsafe extern "C" fn(bytes: u64) -> *mut c_void;
type GuardedFree = unsafe extern "C" fn(p: *mut c_void, bytes: u64);

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

type Built = Result<Arc<libloading::Library>, String>;

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
    for dir in include_dirs.iter().cloned().chain([super::repo().join("kernels/emu")]) {
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

fn compile(src: &Path) -> Built {
    let repo = super::repo();
    let kernels = repo.join("kernels");
    let mut include_dirs = vec![kernels.clone()];
    if let Some(parent) = src.parent() {
        if parent != kernels {
            include_dirs.push(parent.to_path_buf());
        }
    }
    let stem = src.file_stem().and_then(|s| s.to_str()).unwrap_or("kernel");
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("emu");
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let so = dir.join(format!("{stem}-{:016x}.so", content_hash(src, &include_dirs)));
    if !so.exists() {
        let tmp = dir.join(format!("{stem}.{}.tmp.so", std::process::id()));
        let mut cmd = Command::new(compiler());
        cmd.args(FLAGS).arg("-include").arg(repo.join("kernels/emu/emu.h"));
        for d in &include_dirs {
            cmd.arg("-I").arg(d);
        }
        cmd.arg("-x").arg("c++").arg(src).arg("-o").arg(&tmp);
        let out = cmd.output().map_err(|e| format!("running {}: {e}", compiler()))?;
        if !out.status.success() {
            let _ = std::fs::remove_file(&tmp);
            return Err(format!(
                "emulator build of {} failed:\n{}",
                src.display(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        // Atomic: a concurrent test process building the same file loads a complete library.
        std::fs::rename(&tmp, &so).map_err(|e| format!("renaming {}: {e}", tmp.display()))?;
    }
    // SAFETY: the library is ours (built above from the repository's sources); its initialisers
    // only set up globals.
    let lib = unsafe { libloading::Library::new(&so) }.map_err(|e| format!("loading {}: {e}", so.display()))?;
    Ok(Arc::new(lib))
}

impl Emu {
    /// `kernels/<stem>.cu`, built for the emulator. None (after a skip line) when g++ is absent;
    /// panics with the compiler's messages when the file does not compile.
    pub fn build(stem: &str) -> Option<Emu> {
        Self::build_file(&super::repo().join("kernels").join(format!("{stem}.cu")))
    }

    /// Any `.cu` file (e.g. a test kernel under tests/emu/); `kernels/` and the file's own directory
    /// are on the include path.
    pub fn build_file(src: &Path) -> Option<Emu> {
        let name = src.file_name().and_then(|s| s.to_str()).unwrap_or("?").to_string();
        if compiler_version().is_none() {
            super::skip(&format!("emulator build of {name}"), &format!("{} not found (set ILREC_EMU_CXX)", compiler()));
            return None;
        }
        let slot = cache().lock().unwrap().entry(src.to_path_buf()).or_default().clone();
        let lib = match slot.get_or_init(|| compile(src)) {
            Ok(lib) => lib.clone(),
            Err(e) => panic!("{e}"),
        };
        // SAFETY: emu_launch is defined by kernels/emu/runtime.h with exactly this signature.
        let launch_fn = unsafe { *lib.get::<LaunchFn>("emu_launch").unwrap_or_else(|e| panic!("{name}: no emu_launch: {e}")) };
        Some(Emu { lib, launch_fn, name, schedule: Schedule::Ascending })
    }

    /// `data` copied into guarded memory (see [`Buf`]), the way a test passes kernel operands
    /// that must not be over-read. Element types with alignment above 16 are not supported.
    pub fn buffer<T: Copy>(&self, data: &[T]) -> Buf<T> {
        assert!(std::mem::align_of::<T>() <= 16, "Emu::buffer: alignment above 16");
        let bytes = std::mem::size_of_val(data) as u64;
        // SAFETY: both functions are defined by kernels/emu/runtime.h with these signatures.
        let (alloc, free) = unsafe {
            let alloc = *self.lib.get::<GuardedAlloc>("emu_guarded_alloc").expect("emu_guarded_alloc");
            let free = *self.lib.get::<GuardedFree>("emu_guarded_free").expect("emu_guarded_free");
            (alloc, free)
        };
        // SAFETY: a fresh mapping of `bytes` writable bytes, 16-byte aligned.
        let ptr = unsafe { alloc(bytes) } as *mut T;
        assert!(!ptr.is_null(), "Emu::buffer: cannot map {bytes} bytes");
        // SAFETY: ptr has room for data.len() elements and does not overlap data.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr, data.len()) };
        Buf { ptr, len: data.len(), free, _lib: self.lib.clone() }
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
                ctx.panic.lock().unwrap().get_or_insert(msg);
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
        if let Some(p) = ctx.panic.lock().unwrap().take() {
            return Err(format!("{}: panic in the launch body: {p}", self.name));
        }
        if rc != 0 {
            // SAFETY: emu_launch NUL-terminates the message within err.
            let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
            return Err(format!("{}: {msg}", self.name));
        }
        Ok(())
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
