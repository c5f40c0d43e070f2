//! Errors of aha-tensor: every variant names the op and what did not fit.

use crate::{DType, Device};

/// What can go wrong in a tensor op.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A buffer or tensor has the wrong number of elements or the wrong shape.
    #[error("{op}: shape mismatch: expected {expected}, got {got}")]
    ShapeMismatch {
        /// The op that checked.
        op: &'static str,
        /// What the op needed.
        expected: String,
        /// What it was given.
        got: String,
    },
    /// The op does not take this element type.
    #[error("{op}: dtype {got:?} not supported here (expected {expected})")]
    DType {
        /// The op that checked.
        op: &'static str,
        /// What the op accepts.
        expected: &'static str,
        /// What it was given.
        got: DType,
    },
    /// Operands live on different devices.
    #[error("{op}: operands on different devices ({a} and {b})")]
    DeviceMismatch {
        /// The op that checked.
        op: &'static str,
        /// The first operand's device.
        a: Device,
        /// The other operand's device.
        b: Device,
    },
    /// The op has no implementation on this device yet.
    #[error("{op} is not implemented on {device} yet")]
    Unsupported {
        /// The op.
        op: &'static str,
        /// The device it was asked to run on.
        device: Device,
    },
    /// An index (token id, class, expert) outside its range.
    #[error("{op}: index {index} at position {position} is out of range 0..{limit}")]
    IndexOutOfRange {
        /// The op that checked.
        op: &'static str,
        /// The offending value.
        index: i64,
        /// Where in the index buffer it was.
        position: usize,
        /// The exclusive upper bound.
        limit: usize,
    },
    /// A bad scalar argument (k > columns, eps <= 0, ...).
    #[error("{op}: {msg}")]
    InvalidArgument {
        /// The op that checked.
        op: &'static str,
        /// What is wrong.
        msg: String,
    },
    /// The GPU layer failed.
    #[error(transparent)]
    Cuda(#[from] aha_cuda_kernels::Error),
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Checks that every `(name, got, want)` buffer has exactly `want` elements.
pub(crate) fn check_lens(op: &'static str, lens: &[(&str, usize, usize)]) -> Result<()> {
    for &(name, got, want) in lens {
        if got != want {
            return Err(Error::ShapeMismatch {
                op,
                expected: format!("{name} with {want} elements"),
                got: format!("{got}"),
            });
        }
    }
    Ok(())
}
