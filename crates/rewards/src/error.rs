//! Errors of aha-rewards.

/// What can go wrong outside of scoring itself: bad configuration or a bad
/// example. Scoring never fails: a completion that cannot be judged gets a
/// [`crate::Status`], not an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value out of its range.
    #[error("invalid reward configuration: {0}")]
    Config(String),
    /// An example lacks a field the reward needs, or has it with the wrong type.
    #[error("example field `{field}`: {why}")]
    Field {
        /// The field's name.
        field: String,
        /// What is wrong with it.
        why: String,
    },
    /// An operating-system call of the sandbox failed.
    #[error("sandbox: {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn field(field: &str, why: impl Into<String>) -> Self {
        Error::Field {
            field: field.to_string(),
            why: why.into(),
        }
    }

    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}
