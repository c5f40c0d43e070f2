//! Errors of aha-sampler.

use std::path::PathBuf;

/// What can go wrong generating.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model refused its inputs or failed.
    #[error(transparent)]
    Model(#[from] aha_moe_model::Error),
    /// Bad sampling parameters or prompts.
    #[error("{0}")]
    Invalid(String),
    /// A tokenizer file could not be loaded or used.
    #[error("tokenizer {path}: {msg}")]
    Tokenizer {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        msg: String,
    },
    /// A chat template could not be found, loaded, compiled or rendered.
    #[error("chat template {origin}: {msg}")]
    Template {
        /// The template's file (or the name it was given).
        origin: String,
        /// What went wrong, with minijinja's line information.
        msg: String,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
