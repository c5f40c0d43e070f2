//! Errors of aha-trainer.

use std::path::PathBuf;

/// What can go wrong in a training run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model failed.
    #[error(transparent)]
    Model(#[from] aha_moe_model::Error),
    /// The sampler failed.
    #[error(transparent)]
    Sampler(#[from] aha_sampler::Error),
    /// The GRPO math refused its inputs.
    #[error(transparent)]
    Grpo(#[from] aha_grpo::Error),
    /// A reward's configuration or the batch evaluator failed.
    #[error(transparent)]
    Rewards(#[from] aha_rewards::Error),
    /// A kernel failed.
    #[error(transparent)]
    Tensor(#[from] aha_tensor::Error),
    /// A file of the run folder could not be written or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Anything else, with context.
    #[error("{0}")]
    Other(String),
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}
