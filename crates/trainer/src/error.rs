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
    /// A run config that cannot be used: unparsable TOML, an unknown key, or
    /// a value out of range. `what` names the file or the config.
    #[error("{what}: {msg}")]
    Config {
        /// The file, or the kind of config (`grpo config`, `sft config`).
        what: String,
        /// What is wrong.
        msg: String,
    },
    /// A data line (or Parquet row) that cannot be used.
    #[error("{}:{line}: {msg}", path.display())]
    Data {
        /// The data file.
        path: PathBuf,
        /// The 1-based line (or row).
        line: usize,
        /// What is wrong.
        msg: String,
    },
    /// A data file as a whole cannot be used (not readable as its format, or
    /// no usable example in it).
    #[error("{}: {msg}", path.display())]
    DataFile {
        /// The data file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A reward of the config cannot be built.
    #[error("reward {name:?}: {msg}")]
    Reward {
        /// The reward's name.
        name: String,
        /// What is wrong.
        msg: String,
    },
    /// A checkpoint that cannot be resumed.
    #[error("{}: {msg}", path.display())]
    Checkpoint {
        /// The checkpoint's file or folder.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A data-parallel run could not start or lost a rank (the message
    /// names the rank).
    #[error("data parallel: {0}")]
    Dist(String),
    /// Training stopped: more updates in a row than `max_skipped_steps`
    /// had non-finite losses or gradients (each was skipped, leaving the
    /// weights as they were).
    #[error("{skipped} consecutive updates skipped for non-finite values (last: {last}): aborting")]
    Diverged {
        /// Updates skipped in a row.
        skipped: usize,
        /// The last skipped update and why.
        last: String,
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
