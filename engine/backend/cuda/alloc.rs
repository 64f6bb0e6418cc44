//! The caching device allocator. Freed blocks go back to a free list keyed by their size class
//! and are handed out again without a driver call; the driver is asked for memory only when no
//! cached block of the class is free; on out-of-memory the runtime empties the cache (after the
//! stream's queued work) and retries once before returning the error.
//!
//! Every kernel runs on one stream, so a block freed while queued kernels still use it can be
//! reused at once: whatever is queued next on the stream runs after them (stream order), exactly
//! the argument PyTorch's caching allocator makes for its per-stream pools.
use cudarc::driver::{result, sys};

/// Size classes: requests round up to a multiple of 1/16 of their power of two (at least 512
/// bytes), so above 8 KiB a cached block is less than 12.5% larger than the request it serves, and
/// blocks of nearly equal sizes (sequence lengths that differ by a token) share a class.
pub fn size_class(bytes: usize) -> usize {
    let bytes = bytes.max(1);
    let step = (bytes.next_power_of_two() / 16).max(512);
    bytes.div_ceil(step) * step
}

/// Counters of the allocator, in bytes unless named otherwise.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Bytes in blocks currently held by tensors.
    pub in_use: usize,
    /// The most `in_use` has been since the last `reset_peak`.
    pub peak_in_use: usize,
    /// Bytes obtained from the driver and not yet returned (in use + cached).
    pub reserved: usize,
    /// The most `reserved` has been.
    pub peak_reserved: usize,
    /// Requests served by a driver allocation.
    pub driver_allocs: u64,
    /// Requests served from the cache.
    pub reuses: u64,
}

/// The allocator's state. Owned by the runtime behind a mutex.
#[derive(Default)]
pub(crate) struct Pool {
    free: std::collections::BTreeMap<usize, Vec<sys::CUdeviceptr>>,
    pub(crate) stats: MemoryStats,
}

/// Why an allocation failed.
pub(crate) enum AllocError {
    OutOfMemory,
    Driver(result::DriverError),
}

impl Pool {
    /// A block of exactly `class` bytes (a value of `size_class`).
    pub(crate) fn alloc(&mut self, class: usize) -> Result<sys::CUdeviceptr, AllocError> {
        if let Some(ptr) = self.free.get_mut(&class).and_then(Vec::pop) {
            self.stats.reuses += 1;
            self.note_use(class);
            return Ok(ptr);
        }
        let ptr = driver_alloc(class)?;
        self.note_fresh(class);
        Ok(ptr)
    }

    /// Counts a block of `bytes` newly obtained (from the driver, or the emulator's mapping) and
    /// handed out.
    pub(crate) fn note_fresh(&mut self, bytes: usize) {
        self.stats.driver_allocs += 1;
        self.stats.reserved += bytes;
        self.stats.peak_reserved = self.stats.peak_reserved.max(self.stats.reserved);
        self.note_use(bytes);
    }

    fn note_use(&mut self, class: usize) {
        self.stats.in_use += class;
        self.stats.peak_in_use = self.stats.peak_in_use.max(self.stats.in_use);
    }

    /// Returns a block to the cache.
    pub(crate) fn free(&mut self, ptr: sys::CUdeviceptr, class: usize) {
        self.stats.in_use -= class;
        self.free.entry(class).or_default().push(ptr);
    }

    /// Bytes in cached (free) blocks.
    pub(crate) fn cached(&self) -> usize {
        self.free.iter().map(|(c, v)| c * v.len()).sum()
    }

    /// Hands every cached block back to the driver. The caller must have synchronised the stream
    /// (or be about to allocate, which the driver orders after queued work).
    pub(crate) fn release_cached(&mut self) -> Result<(), result::DriverError> {
        // cuMemFree waits for work using the block to finish, so queued kernels stay safe.
        for (class, ptrs) in std::mem::take(&mut self.free) {
            for ptr in ptrs {
                // SAFETY: `ptr` came from cuMemAlloc in `driver_alloc` and is on the free list,
                // so no tensor refers to it.
                unsafe { result::free_sync(ptr) }?;
                self.stats.reserved -= class;
            }
        }
        Ok(())
    }
}

fn driver_alloc(bytes: usize) -> Result<sys::CUdeviceptr, AllocError> {
    // SAFETY: a plain cuMemAlloc in the current context (bound by the runtime before any call).
    match unsafe { result::malloc_sync(bytes) } {
        Ok(p) => Ok(p),
        Err(result::DriverError(sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY)) => Err(AllocError::OutOfMemory),
        Err(e) => Err(AllocError::Driver(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_bound_the_waste_and_cover_the_request() {
        for bytes in [1usize, 511, 512, 513, 4095, 4096, 4097, 1 << 20, (1 << 20) + 1, 3 << 29, 123_456_789] {
            let c = size_class(bytes);
            assert!(c >= bytes, "{bytes} -> {c}");
            assert!(bytes < 8192 || (c - bytes) * 8 < bytes, "{bytes} -> {c} wastes 1/8 or more");
            assert!(c - bytes < 512.max(bytes.next_power_of_two() / 16), "{bytes} -> {c}");
            assert_eq!(size_class(c), c, "a class is its own class");
        }
    }
}
