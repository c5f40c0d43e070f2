//! Errors of aha-grpo.

/// What can be wrong with the inputs to the advantage or loss math.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A buffer has the wrong length.
    #[error("{op}: {what} has {got} elements, expected {expected}")]
    Length {
        /// The function that checked.
        op: &'static str,
        /// Which buffer.
        what: &'static str,
        /// Its length.
        got: usize,
        /// The length needed.
        expected: usize,
    },
    /// A configuration value out of its range.
    #[error("invalid GRPO configuration: {0}")]
    Config(String),
    /// An input needed by the configuration was not given.
    #[error("{op}: {what} is required by this configuration ({why})")]
    Missing {
        /// The function that checked.
        op: &'static str,
        /// Which input.
        what: &'static str,
        /// Which setting needs it.
        why: &'static str,
    },
    /// The device path failed (no GPU, a launch, a copy).
    #[error("GRPO on the GPU: {0}")]
    Device(#[from] aha_cuda_kernels::Error),
    /// A tensor was on the wrong device or of the wrong type.
    #[error("GRPO loss inputs: {0}")]
    Tensor(#[from] aha_tensor::Error),
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn check_len(op: &'static str, what: &'static str, got: usize, expected: usize) -> Result<()> {
    if got != expected {
        return Err(Error::Length {
            op,
            what,
            got,
            expected,
        });
    }
    Ok(())
}
