//! Errors of the CUDA layer, each with the context needed to act on it.

/// Everything that can go wrong between us and the GPU.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No CUDA driver library or no device: the caller should use the CPU.
    #[error("no GPU: {reason}")]
    NoGpu {
        /// Why no device could be used.
        reason: String,
    },
    /// The NVRTC library could not be found or loaded.
    #[error(
        "NVRTC not found (searched: {searched}); install CUDA or `pip install nvidia-cuda-nvrtc==13.0.*` \
         and set AHA_CUDA_ROOT to the folder holding lib/libnvrtc.so.13"
    )]
    NvrtcMissing {
        /// The places that were tried, in order.
        searched: String,
    },
    /// A kernel source failed to compile; `log` is NVRTC's own message.
    #[error("NVRTC failed to compile kernels/{file} for {arch}: {log}")]
    Compile {
        /// The source file under `kernels/`.
        file: &'static str,
        /// The target architecture, such as `sm_90`.
        arch: String,
        /// NVRTC's program log.
        log: String,
    },
    /// A call into the CUDA driver failed.
    #[error("CUDA driver error in {op}: {source}")]
    Driver {
        /// What we were doing.
        op: &'static str,
        /// The driver's error.
        source: cudarc::driver::DriverError,
    },
    /// A kernel failed while it ran (an illegal address, a trap), found by
    /// the synchronize that `AHA_CUDA_SYNC=1` adds after every launch.
    #[error("CUDA error in {op}, found by the synchronize after it (AHA_CUDA_SYNC=1): {source}")]
    KernelFault {
        /// The launch (`launch <kernel>`).
        op: &'static str,
        /// The driver's error.
        source: cudarc::driver::DriverError,
    },
    /// A cuBLAS call failed.
    #[error("cuBLAS error in {op}: {msg}")]
    Blas {
        /// The call.
        op: &'static str,
        /// cuBLAS's status.
        msg: String,
    },
    /// Arguments that do not fit the kernel's contract.
    #[error("{op}: {msg}")]
    InvalidArgument {
        /// The launcher that refused them.
        op: &'static str,
        /// What is wrong.
        msg: String,
    },
    /// NCCL could not be loaded or a collective failed (the message names
    /// the rank and the operation; a dead peer shows up here).
    #[error("NCCL: {op}: {msg}")]
    Nccl {
        /// The call, with its rank.
        op: String,
        /// NCCL's message.
        msg: String,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Adds the operation's name to a driver error. Every launcher passes its
/// launch's result through here as `ctx("launch <kernel>")`; with
/// `AHA_CUDA_SYNC=1` such a result is followed by a synchronize of the
/// current context, so that a kernel's fault is reported with its own name
/// rather than by a later, unrelated call.
pub(crate) trait DriverContext<T> {
    fn ctx(self, op: &'static str) -> Result<T>;
}

impl<T> DriverContext<T> for std::result::Result<T, cudarc::driver::DriverError> {
    fn ctx(self, op: &'static str) -> Result<T> {
        with_context(self, op, op.starts_with("launch ") && sync_after_launch())
    }
}

/// A driver call's result with `op` named in its error; with `sync`, a
/// success is followed by a synchronize of the thread's current context (a
/// launch binds its stream's context), whose failure becomes
/// [`Error::KernelFault`] naming `op`.
pub fn with_context<T>(
    result: std::result::Result<T, cudarc::driver::DriverError>,
    op: &'static str,
    sync: bool,
) -> Result<T> {
    let value = result.map_err(|source| Error::Driver { op, source })?;
    // A launch being captured into a CUDA graph has not run, and a capture
    // forbids synchronising: its faults show at the replay's next
    // synchronise instead.
    if sync && !crate::graph::capturing() {
        cudarc::driver::result::ctx::synchronize().map_err(|source| Error::KernelFault { op, source })?;
    }
    Ok(value)
}

/// Whether every launch is followed by a synchronize (`AHA_CUDA_SYNC=1`),
/// read once per process.
pub fn sync_after_launch() -> bool {
    static SYNC: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SYNC.get_or_init(|| std::env::var("AHA_CUDA_SYNC").is_ok_and(|v| v == "1"))
}
