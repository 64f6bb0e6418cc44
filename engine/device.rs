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
    /// Opens the GPU for commands that run kernels directly (`ilrec selftest`, the benches):
    /// `cpu` gives `None`; `cuda` gives the GPU or the error that prevents it; `auto` gives the GPU
    /// when one opens, else `None` after one line to `notice` saying why.
    pub fn open_cuda(self, notice: impl FnOnce(&str)) -> Result<Option<Cuda>> {
        match self {
            DeviceRequest::Cpu => Ok(None),
            DeviceRequest::Cuda => Cuda::new(0).map(Some),
            DeviceRequest::Auto => match Cuda::new(0) {
                Ok(c) => Ok(Some(c)),
                Err(e) => {
                    notice(&format!("device auto: using the CPU ({e})"));
                    Ok(None)
                }
            },
        }
    }

    /// Resolves the request for the model commands. `notice` receives one line when `auto` falls
    /// back to the CPU.
    pub fn resolve(self, notice: impl FnOnce(&str)) -> Result<Device> {
        // The model's forward, backward and decoding do not run on the CUDA backend yet (only
        // the kernels and their checks do): the CPU is the only executor of whole models.
        let why = if cuda_driver_present() {
            "the model does not run on the CUDA backend yet; `ilrec selftest --device cuda` checks its kernels"
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
