//! The one error type shared by ember's library crates.

use thiserror::Error;

/// Errors raised while loading, validating or running a model.
#[derive(Debug, Error)]
pub enum EmberError {
    /// config.json (or another config file) is missing, malformed or unsupported.
    #[error("{0}")]
    Config(String),
    /// A checkpoint tensor is missing, misshaped or of an unusable dtype.
    #[error("{0}")]
    Weights(String),
    /// A file or directory could not be read.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Tokenizer or chat template failure.
    #[error("{0}")]
    Tokenizer(String),
    /// A request the engine cannot serve (bad parameter, prompt too long, ...).
    #[error("{0}")]
    InvalidRequest(String),
    /// A LoRA adapter could not be loaded: unreadable, not an adapter, or not one this model and
    /// these limits can serve (HTTP 412, as Fireworks answers a failed adapter load).
    #[error("{0}")]
    AdapterLoad(String),
    /// The named thing (a LoRA adapter, a model) does not exist (HTTP 404).
    #[error("{0}")]
    NotFound(String),
    /// Too many requests are waiting; the client should retry later (HTTP 429).
    #[error("{0}")]
    Overloaded(String),
    /// The engine has stopped or is shutting down (HTTP 503).
    #[error("{0}")]
    Unavailable(String),
    /// A tensor operation failed inside the model.
    #[error("tensor error: {0}")]
    Tensor(String),
}

/// Result with [`EmberError`].
pub type Result<T> = std::result::Result<T, EmberError>;

impl EmberError {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}
