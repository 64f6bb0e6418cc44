//! The CUDA backend: one device context and stream, the kernels of kernels/*.cu loaded from the
//! fatbins build.rs embeds, a caching device allocator, and bf16/f32 device tensors.
//!
//! Nothing here may panic on a machine without a GPU: `Cuda::new` checks for the driver library
//! before any cudarc call (cudarc panics when libcuda is absent) and maps every driver error to a
//! typed `Error`. Out-of-memory errors name the tensor and its size; launch errors name the
//! kernel and the shape it was launched on.
//!
//! `Cuda::emulated()` is the same runtime with the kernels run by the host emulator (emu.rs,
//! kernels/emu/): device memory is guarded host memory and launches are checked against the
//! kernels' signatures, so every launcher above this file runs in `cargo test` without a GPU.
//!
//! Status: compiled, unverified on GPU until `ilrec selftest --device cuda` has run on one
//! (docs/gpu-check.md).
mod alloc;
pub mod blas;
pub mod emu;
pub mod model;
pub mod ops;
pub mod train;
pub mod selftest;
mod tensor;

pub use alloc::{size_class, MemoryStats};
pub use tensor::{DeviceTensor, Elem};

use crate::backend::kernels::KERNELS;
use crate::error::{Error, Result};
use alloc::{AllocError, Pool};
use cudarc::driver::{result, sys, CudaContext, CudaFunction, CudaModule, CudaStream};
use std::collections::{BTreeMap, HashMap};
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

/// A handle on one GPU: cheap to clone, shared by every tensor allocated from it.
#[derive(Clone)]
pub struct Cuda {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    capability: (i32, i32),
    pool: Mutex<Pool>,
    transfers: Mutex<TransferStats>,
    exec: Exec,
}

/// Host/device copies the runtime has queued, counted per direction: what lets a caller see
/// that a loop keeps its data on the device (the beam search's steps copy nothing).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransferStats {
    /// Copies to the device, and their bytes.
    pub htod: u64,
    pub htod_bytes: u64,
    /// Copies to the host (each waits for the queued work), and their bytes.
    pub dtoh: u64,
    pub dtoh_bytes: u64,
}

impl TransferStats {
    /// The copies made between `earlier` and `self`.
    pub fn since(&self, earlier: &TransferStats) -> TransferStats {
        TransferStats {
            htod: self.htod - earlier.htod,
            htod_bytes: self.htod_bytes - earlier.htod_bytes,
            dtoh: self.dtoh - earlier.dtoh,
            dtoh_bytes: self.dtoh_bytes - earlier.dtoh_bytes,
        }
    }
}

/// What runs the kernels.
enum Exec {
    Driver(Driver),
    Emu(EmuRuntime),
}

struct Driver {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
    blas: Mutex<BlasState>,
}

/// The emulated device: one emulator library per kernel file (built on first launch), and the
/// live allocations, against which every copy and every pointer argument is checked.
struct EmuRuntime {
    libs: Mutex<HashMap<&'static str, emu::Emu>>,
    live: Mutex<BTreeMap<u64, usize>>,
    /// Any built library: its guarded allocator serves every tensor.
    alloc: emu::Emu,
}

/// Nominal memory of the emulated device (what `mem_info` reports).
const EMU_TOTAL_BYTES: usize = 80 << 30;

impl EmuRuntime {
    fn lib(&self, stem: &'static str) -> Result<emu::Emu> {
        let mut libs = self.libs.lock().expect("emulator cache poisoned");
        if let Some(l) = libs.get(stem) {
            return Ok(l.clone());
        }
        let l = emu::Emu::compile(stem).map_err(|e| Error::Device(format!("emulator build of kernels/{stem}.cu: {e}")))?;
        libs.insert(stem, l.clone());
        Ok(l)
    }

    /// Whether `[ptr, ptr + bytes)` lies inside one live allocation.
    fn inside(&self, ptr: u64, bytes: usize) -> bool {
        let live = self.live.lock().expect("emulator allocations poisoned");
        live.range(..=ptr).next_back().is_some_and(|(&start, &len)| ptr + bytes as u64 <= start + len as u64)
    }

    fn check(&self, ptr: u64, bytes: usize, what: &dyn Fn() -> String) -> Result<()> {
        if bytes == 0 || self.inside(ptr, bytes) {
            Ok(())
        } else {
            Err(Error::Device(format!("{}: {bytes} bytes at {ptr:#x} are not inside one live device allocation", what())))
        }
    }
}

/// cuBLAS is looked for once: a missing or failing library means the fallback GEMM from then on.
enum BlasState {
    NotTried,
    Absent,
    Ready(blas::Blas),
}

impl Drop for Inner {
    fn drop(&mut self) {
        let Exec::Driver(d) = &self.exec else { return };
        // The cuBLAS handle goes first (it holds a reference to our stream), then the cached blocks
        // after the queued work that may use them; errors here have no one left to report to.
        if let Ok(mut b) = d.blas.lock() {
            *b = BlasState::Absent;
        }
        if d.ctx.bind_to_thread().is_ok() && d.stream.synchronize().is_ok() {
            if let Ok(mut pool) = self.pool.lock() {
                let _ = pool.release_cached();
            }
        }
    }
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cuda({}, sm_{}{})", self.inner.name, self.inner.capability.0, self.inner.capability.1)
    }
}

/// A kernel argument. Pointers are raw device addresses (`DeviceTensor::ptr`); scalars have the
/// width of the kernel's C parameter (`uint32_t` -> U32, `uint64_t` -> U64, `int` -> I32, ...).
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    Ptr(u64),
    U32(u32),
    U64(u64),
    I32(i32),
    F32(f32),
    F64(f64),
}

impl Arg {
    pub(crate) fn addr(&self) -> *mut c_void {
        match self {
            Arg::Ptr(v) | Arg::U64(v) => v as *const u64 as *mut c_void,
            Arg::U32(v) => v as *const u32 as *mut c_void,
            Arg::I32(v) => v as *const i32 as *mut c_void,
            Arg::F32(v) => v as *const f32 as *mut c_void,
            Arg::F64(v) => v as *const f64 as *mut c_void,
        }
    }
}

/// The largest grid.y and grid.z the driver accepts (grid.x goes to 2^31 - 1).
pub const MAX_GRID_YZ: usize = 65_535;

/// Grid, block and dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: u32,
}

impl Launch {
    /// One block of `block` threads per row.
    pub fn rows(rows: usize, block: u32) -> Self {
        Launch { grid: (rows as u32, 1, 1), block: (block, 1, 1), shared_bytes: 0 }
    }
    /// A grid-stride launch over `n` elements: blocks of 256, at most 8 waves' worth of blocks
    /// (the kernels loop over the rest).
    pub fn elements(n: usize) -> Self {
        let blocks = n.div_ceil(256).clamp(1, 132 * 16);
        Launch { grid: (blocks as u32, 1, 1), block: (256, 1, 1), shared_bytes: 0 }
    }
}

fn driver(what: &str, e: result::DriverError) -> Error {
    let name = e.error_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|_| format!("{:?}", e.0));
    Error::Device(format!("{what}: {name}"))
}

/// Runs `f`, turning a cudarc panic (a missing driver symbol, a library that fails to load) into
/// an error instead of unwinding through the caller.
fn no_panic<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic in the CUDA driver bindings".into());
            Err(Error::Device(format!("{what}: {msg}")))
        }
    }
}

impl Cuda {
    /// Opens GPU `ordinal`. Fails with `Error::Device` (never a panic) when there is no driver,
    /// no such GPU, or the kernels cannot be loaded on it.
    pub fn new(ordinal: usize) -> Result<Cuda> {
        if !crate::device::cuda_driver_present() {
            return Err(Error::Device("no CUDA driver (libcuda) found on this machine".into()));
        }
        no_panic("opening the CUDA device", || {
            let count = CudaContext::device_count().map_err(|e| driver("counting CUDA devices", e))?;
            if count <= 0 {
                return Err(Error::Device("the CUDA driver reports no GPU".into()));
            }
            if ordinal >= count as usize {
                return Err(Error::Device(format!("GPU {ordinal} requested but only {count} present")));
            }
            let ctx = CudaContext::new(ordinal).map_err(|e| driver("creating the CUDA context", e))?;
            let name = ctx.name().map_err(|e| driver("reading the GPU name", e))?;
            let capability = ctx.compute_capability().map_err(|e| driver("reading the compute capability", e))?;
            if capability.0 < 8 {
                return Err(Error::Device(format!(
                    "{name} has compute capability {}.{}; the kernels need 8.0 or newer (bf16)",
                    capability.0, capability.1
                )));
            }
            let stream = ctx.default_stream();
            let cuda = Cuda {
                inner: Arc::new(Inner {
                    name,
                    capability,
                    pool: Mutex::new(Pool::default()),
                    transfers: Mutex::new(TransferStats::default()),
                    exec: Exec::Driver(Driver {
                        ctx,
                        stream,
                        modules: Mutex::new(HashMap::new()),
                        functions: Mutex::new(HashMap::new()),
                        blas: Mutex::new(BlasState::NotTried),
                    }),
                }),
            };
            // Load every fatbin now: a module the driver cannot load (a PTX version newer than
            // the driver, a missing architecture) is an error here, not at the first launch.
            for (stem, _) in KERNELS {
                cuda.module(stem)?;
            }
            Ok(cuda)
        })
    }

    /// The CUDA backend on the host emulator (emu.rs): kernels/*.cu built with g++ on first use
    /// (about 10 s per file, cached), run on the CPU, slowly. Device memory is guarded host memory
    /// filled with 0xFF bytes (NaN) when allocated, like a GPU's uninitialised memory; a copy or a
    /// pointer argument outside a live allocation, a kernel argument of the wrong kind or width,
    /// a block above the kernel's `__launch_bounds__` or more than 48 KiB of dynamic shared
    /// memory is an error. cuBLAS is absent, so GEMMs take the hand-written fallback kernel.
    pub fn emulated() -> Result<Cuda> {
        let alloc = emu::Emu::compile("elementwise").map_err(|e| Error::Device(format!("the kernel emulator is unavailable: {e}")))?;
        Ok(Cuda {
            inner: Arc::new(Inner {
                name: "host emulator (kernels/emu)".into(),
                capability: (9, 0),
                pool: Mutex::new(Pool::default()),
                transfers: Mutex::new(TransferStats::default()),
                exec: Exec::Emu(EmuRuntime { libs: Mutex::new(HashMap::new()), live: Mutex::new(BTreeMap::new()), alloc }),
            }),
        })
    }

    /// Whether this runtime is the host emulator.
    pub fn is_emulated(&self) -> bool {
        matches!(self.inner.exec, Exec::Emu(_))
    }

    fn driver_state(&self) -> Result<&Driver> {
        match &self.inner.exec {
            Exec::Driver(d) => Ok(d),
            Exec::Emu(_) => Err(Error::Device("a driver call on the emulated device".into())),
        }
    }

    /// The GPU's name as the driver reports it.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Compute capability (major, minor).
    pub fn capability(&self) -> (i32, i32) {
        self.inner.capability
    }

    /// Whether the build embedded any kernels (false in a CPU-only build without nvcc).
    pub fn has_kernels() -> bool {
        !KERNELS.is_empty()
    }

    pub(crate) fn bind(&self) -> Result<()> {
        match &self.inner.exec {
            Exec::Driver(d) => d.ctx.bind_to_thread().map_err(|e| driver("binding the CUDA context", e)),
            Exec::Emu(_) => Ok(()),
        }
    }

    /// The driver stream (cuBLAS only runs on the driver runtime).
    pub(crate) fn cu_stream(&self) -> Result<sys::CUstream> {
        Ok(self.driver_state()?.stream.cu_stream())
    }

    fn module(&self, stem: &'static str) -> Result<Arc<CudaModule>> {
        let d = self.driver_state()?;
        let mut modules = d.modules.lock().expect("module cache poisoned");
        if let Some(m) = modules.get(stem) {
            return Ok(m.clone());
        }
        let bytes = KERNELS.iter().find(|(s, _)| *s == stem).map(|(_, b)| *b).ok_or_else(|| {
            Error::Device(format!(
                "kernels/{stem}.cu is not in this build (built without nvcc? see kernels/README.md)"
            ))
        })?;
        let m = d
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(bytes.to_vec()))
            .map_err(|e| driver(&format!("loading kernels/{stem}.cu"), e))?;
        modules.insert(stem, m.clone());
        Ok(m)
    }

    fn function(&self, stem: &'static str, kernel: &'static str) -> Result<CudaFunction> {
        let d = self.driver_state()?;
        if let Some(f) = d.functions.lock().expect("function cache poisoned").get(kernel) {
            return Ok(f.clone());
        }
        let f = self
            .module(stem)?
            .load_function(kernel)
            .map_err(|e| driver(&format!("kernel `{kernel}` in kernels/{stem}.cu"), e))?;
        d.functions.lock().expect("function cache poisoned").insert(kernel, f.clone());
        Ok(f)
    }

    /// Queues `kernel` (from kernels/`stem`.cu) on the stream. `shape` describes the operands for
    /// the error message. Launch-configuration errors surface here; faults inside the kernel
    /// surface at the next `sync`.
    ///
    /// # Safety
    /// `args` must match the kernel's C signature in number, order and width, and every pointer
    /// must address device memory large enough for what the kernel reads and writes with this
    /// launch shape (the launchers in `ops` check shapes before calling this).
    pub unsafe fn launch(&self, stem: &'static str, kernel: &'static str, cfg: Launch, args: &[Arg], shape: &dyn Fn() -> String) -> Result<()> {
        if let Exec::Emu(e) = &self.inner.exec {
            let fail = |msg: String| Error::Kernel { kernel: kernel.to_string(), shape: shape(), msg };
            for (i, a) in args.iter().enumerate() {
                if let Arg::Ptr(p) = *a {
                    if p != 0 && !e.inside(p, 0) {
                        return Err(fail(format!("argument {i} ({p:#x}) is not inside a live device allocation")));
                    }
                }
            }
            // SAFETY: the caller vouches for the memory; the emulator checks the signature.
            return unsafe { e.lib(stem)?.launch_args(kernel, &cfg, args) }.map_err(fail);
        }
        let f = self.function(stem, kernel)?;
        self.bind()?;
        let vals: Vec<Arg> = args.to_vec();
        let mut ptrs: Vec<*mut c_void> = vals.iter().map(Arg::addr).collect();
        // SAFETY: `ptrs` point into `vals`, alive until the call returns (the driver copies the
        // argument values at launch); the caller vouches for the signature and the memory.
        let stream = self.cu_stream()?;
        let r = unsafe { result::launch_kernel(f.cu_function(), cfg.grid, cfg.block, cfg.shared_bytes, stream, &mut ptrs) };
        r.map_err(|e| Error::Kernel {
            kernel: kernel.to_string(),
            shape: shape(),
            msg: format!("launch {:?}x{:?}: {}", cfg.grid, cfg.block, driver("", e)),
        })
    }

    /// Waits for every queued kernel and copy; a fault in any of them is reported here.
    pub fn sync(&self) -> Result<()> {
        match &self.inner.exec {
            Exec::Driver(d) => {
                self.bind()?;
                d.stream.synchronize().map_err(|e| driver("synchronising the CUDA stream", e))
            }
            // Emulated launches and copies complete before they return.
            Exec::Emu(_) => Ok(()),
        }
    }

    /// Allocator counters.
    pub fn memory(&self) -> MemoryStats {
        self.inner.pool.lock().expect("allocator poisoned").stats
    }

    /// Host/device copies so far.
    pub fn transfers(&self) -> TransferStats {
        *self.inner.transfers.lock().expect("transfer counters poisoned")
    }

    fn count_transfer(&self, to_device: bool, bytes: usize) {
        let mut t = self.inner.transfers.lock().expect("transfer counters poisoned");
        if to_device {
            (t.htod, t.htod_bytes) = (t.htod + 1, t.htod_bytes + bytes as u64);
        } else {
            (t.dtoh, t.dtoh_bytes) = (t.dtoh + 1, t.dtoh_bytes + bytes as u64);
        }
    }

    /// Restarts the peak counters from the current values (per-phase peaks).
    pub fn reset_peak(&self) {
        let mut p = self.inner.pool.lock().expect("allocator poisoned");
        p.stats.peak_in_use = p.stats.in_use;
        p.stats.peak_reserved = p.stats.reserved;
    }

    /// Returns every cached block to the driver (after waiting for queued work).
    pub fn empty_cache(&self) -> Result<()> {
        self.sync()?;
        if self.is_emulated() {
            return Ok(()); // the emulated allocator caches nothing
        }
        self.inner.pool.lock().expect("allocator poisoned").release_cached().map_err(|e| driver("freeing cached blocks", e))
    }

    /// Free and total device memory as the driver sees it.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        if self.is_emulated() {
            return Ok((EMU_TOTAL_BYTES.saturating_sub(self.memory().in_use), EMU_TOTAL_BYTES));
        }
        self.bind()?;
        result::mem_get_info().map_err(|e| driver("querying device memory", e))
    }

    /// Raw allocation of `bytes` for `what` (named in the out-of-memory error).
    pub(crate) fn alloc_raw(&self, bytes: usize, what: &dyn Fn() -> String) -> Result<(u64, usize)> {
        let d = match &self.inner.exec {
            Exec::Driver(d) => d,
            Exec::Emu(e) => {
                // Exact sizes (an over-read of one byte past a tensor faults), no reuse (a use
                // after free faults), 0xFF fill (an unwritten element reads as NaN).
                let len = bytes.max(1);
                let p = e.alloc.alloc_guarded(len);
                if p.is_null() {
                    return Err(Error::Device(format!("the emulator cannot map {bytes} bytes for {}", what())));
                }
                // SAFETY: p is a fresh writable mapping of len bytes.
                unsafe { std::ptr::write_bytes(p, 0xFF, len) };
                e.live.lock().expect("emulator allocations poisoned").insert(p as u64, len);
                self.inner.pool.lock().expect("allocator poisoned").note_fresh(len);
                return Ok((p as u64, len));
            }
        };
        self.bind()?;
        let class = size_class(bytes);
        let mut pool = self.inner.pool.lock().expect("allocator poisoned");
        let mut got = pool.alloc(class);
        if matches!(got, Err(AllocError::OutOfMemory)) && pool.cached() > 0 {
            // Cached blocks of other classes may be what stands between us and the request: free
            // them once queued work that may still use them is done, then try again.
            d.stream.synchronize().map_err(|e| driver("synchronising before freeing cached blocks", e))?;
            pool.release_cached().map_err(|e| driver("freeing cached blocks", e))?;
            got = pool.alloc(class);
        }
        match got {
            Ok(p) => Ok((p, class)),
            Err(AllocError::OutOfMemory) => {
                let (free, total) = result::mem_get_info().unwrap_or((0, 0));
                Err(Error::OutOfMemory {
                    what: what(),
                    bytes,
                    in_use: pool.stats.in_use,
                    cached: pool.cached(),
                    free,
                    total,
                })
            }
            Err(AllocError::Driver(e)) => Err(driver(&format!("allocating {bytes} bytes for {}", what()), e)),
        }
    }

    pub(crate) fn free_raw(&self, ptr: u64, class: usize) {
        if let Exec::Emu(e) = &self.inner.exec {
            if let Ok(mut live) = e.live.lock() {
                live.remove(&ptr);
            }
            // SAFETY: ptr came from alloc_guarded(class) in alloc_raw and its tensor is gone.
            unsafe { e.alloc.free_guarded(ptr as *mut u8, class) };
            if let Ok(mut pool) = self.inner.pool.lock() {
                pool.stats.in_use -= class;
                pool.stats.reserved -= class;
            }
            return;
        }
        if let Ok(mut pool) = self.inner.pool.lock() {
            pool.free(ptr, class);
        }
    }

    /// Sets `bytes` bytes at `dst` to `byte` (queued on the stream).
    pub(crate) fn memset(&self, dst: u64, byte: u8, bytes: usize, what: &dyn Fn() -> String) -> Result<()> {
        match &self.inner.exec {
            Exec::Driver(d) => {
                self.bind()?;
                // SAFETY: the caller's block holds `bytes` bytes at dst; queued on our stream.
                unsafe { result::memset_d8_async(dst, byte, bytes, d.stream.cu_stream()) }.map_err(|e| driver(&format!("memset of {}", what()), e))
            }
            Exec::Emu(e) => {
                e.check(dst, bytes, what)?;
                // SAFETY: checked to lie inside one live allocation.
                unsafe { std::ptr::write_bytes(dst as *mut u8, byte, bytes) };
                Ok(())
            }
        }
    }

    /// Copies host bytes to `dst` (queued; `src` may be dropped when this returns).
    pub(crate) fn htod(&self, dst: u64, src: &[u8], what: &dyn Fn() -> String) -> Result<()> {
        self.count_transfer(true, src.len());
        match &self.inner.exec {
            Exec::Driver(d) => {
                self.bind()?;
                // SAFETY: the caller's block holds src.len() bytes at dst; a pageable-source async
                // copy has staged `src` when it returns.
                unsafe { result::memcpy_htod_async(dst, src, d.stream.cu_stream()) }.map_err(|e| driver(&format!("copying {} to the device", what()), e))
            }
            Exec::Emu(e) => {
                e.check(dst, src.len(), what)?;
                // SAFETY: checked; host memory of the emulated device never overlaps `src`'s
                // borrowed slice (a tensor's bytes are not handed out as a Rust slice).
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
                Ok(())
            }
        }
    }

    /// Copies `dst.len()` bytes from `src` to the host, waiting for queued work.
    pub(crate) fn dtoh(&self, dst: &mut [u8], src: u64, what: &dyn Fn() -> String) -> Result<()> {
        self.count_transfer(false, dst.len());
        match &self.inner.exec {
            Exec::Driver(d) => {
                self.bind()?;
                // SAFETY: the block holds dst.len() bytes at src; synchronised before dst is read.
                unsafe { result::memcpy_dtoh_async(dst, src, d.stream.cu_stream()) }.map_err(|e| driver(&format!("copying {} to the host", what()), e))?;
                self.sync()
            }
            Exec::Emu(e) => {
                e.check(src, dst.len(), what)?;
                // SAFETY: checked to lie inside one live allocation.
                unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
                Ok(())
            }
        }
    }

    /// Copies `bytes` bytes from `src` to `dst` on the device (queued).
    pub(crate) fn dtod(&self, dst: u64, src: u64, bytes: usize, what: &dyn Fn() -> String) -> Result<()> {
        match &self.inner.exec {
            Exec::Driver(d) => {
                self.bind()?;
                // SAFETY: both blocks hold `bytes` bytes; queued on our stream.
                unsafe { result::memcpy_dtod_async(dst, src, bytes, d.stream.cu_stream()) }.map_err(|e| driver(&format!("copying {}", what()), e))
            }
            Exec::Emu(e) => {
                e.check(src, bytes, what)?;
                e.check(dst, bytes, what)?;
                // SAFETY: both ranges checked; `copy` allows overlap.
                unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
                Ok(())
            }
        }
    }

    /// The cuBLAS handle, created on first use; `None` when libcublas cannot be loaded (the
    /// hand-written fallback GEMM is used then).
    pub(crate) fn with_blas<T>(&self, f: impl FnOnce(Option<&blas::Blas>) -> Result<T>) -> Result<T> {
        let Exec::Driver(d) = &self.inner.exec else { return f(None) };
        self.bind()?;
        let mut guard = d.blas.lock().expect("cuBLAS handle poisoned");
        if matches!(*guard, BlasState::NotTried) {
            *guard = match blas::Blas::new(self) {
                Ok(Some(b)) => BlasState::Ready(b),
                // A library that is absent or fails to initialise: the fallback GEMM serves.
                Ok(None) | Err(_) => BlasState::Absent,
            };
        }
        match &*guard {
            BlasState::Ready(b) => f(Some(b)),
            _ => f(None),
        }
    }

    /// Whether GEMMs go to cuBLAS (`false`: the hand-written fallback kernel).
    pub fn has_cublas(&self) -> bool {
        self.with_blas(|b| Ok(b.is_some())).unwrap_or(false)
    }
}
