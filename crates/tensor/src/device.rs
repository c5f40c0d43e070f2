//! Where a tensor lives.

use std::str::FromStr;

use crate::error::{Error, Result};

/// A compute device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Device {
    /// The host CPU (f32 compute, multithreaded with rayon).
    #[default]
    Cpu,
    /// CUDA device by ordinal.
    Cuda(usize),
}

impl Device {
    /// The first GPU if there is one, else the CPU. Never panics.
    pub fn auto() -> Device {
        if aha_cuda_kernels::device_count() > 0 {
            Device::Cuda(0)
        } else {
            Device::Cpu
        }
    }

    /// True for [`Device::Cuda`].
    pub fn is_cuda(self) -> bool {
        matches!(self, Device::Cuda(_))
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl FromStr for Device {
    type Err = Error;

    /// Parses `cpu`, `cuda`, `cuda:N` or `auto` (the command line's `--device`).
    fn from_str(s: &str) -> Result<Device> {
        let bad = || Error::InvalidArgument {
            op: "Device::from_str",
            msg: format!("unknown device {s:?}: use cpu, cuda, cuda:N or auto"),
        };
        match s {
            "cpu" => Ok(Device::Cpu),
            "auto" => Ok(Device::auto()),
            "cuda" => Ok(Device::Cuda(0)),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => n.parse().map(Device::Cuda).map_err(|_| bad()),
                None => Err(bad()),
            },
        }
    }
}
