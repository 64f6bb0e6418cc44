//! Device selection: `cpu`, `cuda` or `auto`.
use crate::backend::cuda::Cuda;
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
    /// The CUDA backend on the host emulator of the kernels (`Cuda::emulated`): a development
    /// tool that runs the GPU code paths on the CPU, slowly.
    Emu,
}

/// Where work actually runs.
#[derive(Clone, Debug)]
pub enum Device {
    Cpu,
    /// The first GPU, opened (kernels loaded).
    Cuda(Cuda),
}

impl Device {
    /// The CUDA runtime, when work runs on one.
    pub fn cuda(&self) -> Option<&Cuda> {
        match self {
            Device::Cpu => None,
            Device::Cuda(c) => Some(c),
        }
    }
}

impl FromStr for DeviceRequest {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(DeviceRequest::Cpu),
            "cuda" => Ok(DeviceRequest::Cuda),
            "auto" => Ok(DeviceRequest::Auto),
            "emu" => Ok(DeviceRequest::Emu),
            other => Err(Error::Input(format!("unknown device `{other}` (cpu, cuda, auto, emu)"))),
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
    /// Resolves the request: `cuda` opens the first GPU or fails with the reason; `auto` opens it
    /// when it can and otherwise falls back to the CPU after one line to `notice` saying why.
    pub fn resolve(self, notice: impl FnOnce(&str)) -> Result<Device> {
        match self {
            DeviceRequest::Cpu => Ok(Device::Cpu),
            DeviceRequest::Cuda => Cuda::new(0).map(Device::Cuda),
            DeviceRequest::Emu => Cuda::emulated().map(Device::Cuda),
            DeviceRequest::Auto => match Cuda::new(0) {
                Ok(c) => Ok(Device::Cuda(c)),
                Err(e) => {
                    notice(&format!("device auto: using the CPU ({e})"));
                    Ok(Device::Cpu)
                }
            },
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu ({} threads)", rayon::current_num_threads()),
            Device::Cuda(c) => write!(f, "cuda ({}, sm_{}{})", c.name(), c.capability().0, c.capability().1),
        }
    }
}
