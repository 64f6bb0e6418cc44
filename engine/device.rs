//! Device selection: `cpu`, `cuda` or `auto`.
use crate::error::{Error, Result};
use std::str::FromStr;

/// What the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceRequest {
    #[default]
    Cpu,
    Cuda,
    /// CUDA when a driver and GPU are present, else the CPU.
    Auto,
}

/// Where work actually runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
}

impl FromStr for DeviceRequest {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(DeviceRequest::Cpu),
            "cuda" => Ok(DeviceRequest::Cuda),
            "auto" => Ok(DeviceRequest::Auto),
            other => Err(Error::Input(format!("unknown device `{other}` (cpu, cuda, auto)"))),
        }
    }
}

/// Whether the CUDA driver library can be loaded on this machine. Checked before any cudarc
/// call, because cudarc panics when libcuda is absent.
pub fn cuda_driver_present() -> bool {
    // SAFETY: only probes whether the shared library can be opened; no CUDA call is made.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

impl DeviceRequest {
    /// Resolves the request. `notice` receives one line when `auto` falls back to the CPU.
    pub fn resolve(self, notice: impl FnOnce(&str)) -> Result<Device> {
        // The CUDA backend is not in this build yet: the CPU is the only executor.
        let why = if cuda_driver_present() {
            "the CUDA backend is not built into this version of ilrec"
        } else {
            "no CUDA driver (libcuda) found on this machine"
        };
        match self {
            DeviceRequest::Cpu => Ok(Device::Cpu),
            DeviceRequest::Auto => {
                notice(&format!("device auto: using the CPU ({why})"));
                Ok(Device::Cpu)
            }
            DeviceRequest::Cuda => Err(Error::Device(format!("cuda requested but {why}"))),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu ({} threads)", rayon::current_num_threads()),
        }
    }
}
