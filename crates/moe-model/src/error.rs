//! Errors of aha-moe-model, each naming the file, key or tensor at fault.

use std::path::PathBuf;

/// What can go wrong loading, running or saving a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// `config.json` is malformed or asks for something not implemented.
    #[error("{path}: {msg}")]
    Config {
        /// The config file (or `<memory>`).
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A checkpoint does not match the config.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint {
        /// The safetensors file or folder.
        path: PathBuf,
        /// What is wrong (missing, unexpected, mis-shaped tensors).
        msg: String,
    },
    /// Bad inputs to a forward or backward (token ids, shapes).
    #[error("{op}: {msg}")]
    Input {
        /// The call that checked.
        op: &'static str,
        /// What is wrong.
        msg: String,
    },
    /// A kernel refused its arguments.
    #[error(transparent)]
    Tensor(#[from] aha_tensor::Error),
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn input_err(op: &'static str, msg: impl Into<String>) -> Error {
    Error::Input { op, msg: msg.into() }
}
