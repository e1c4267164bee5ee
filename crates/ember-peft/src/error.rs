//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong configuring, loading, saving or switching adapters.
#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    /// A configuration value is out of range or of the wrong type (names the field).
    #[error("{field}: {message}")]
    Config {
        /// The field, e.g. `r` or `target_modules`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// `target_modules` matched no module of the model (peft's message).
    #[error("{message}")]
    TargetsNotFound {
        /// peft's message, naming the targets.
        message: String,
    },
    /// A target or `modules_to_save` entry names a module of a type that cannot hold it.
    #[error("module `{path}` is a {kind}: {message}")]
    UnsupportedModule {
        /// The module's full name.
        path: String,
        /// Its type (`LayerNorm`, ...).
        kind: String,
        /// What is supported instead.
        message: String,
    },
    /// An adapter name that the model does not hold.
    #[error("adapter `{name}` not found; the model holds {known:?}")]
    UnknownAdapter {
        /// The name asked for.
        name: String,
        /// The adapters the model holds.
        known: Vec<String>,
    },
    /// An adapter of that name is already present.
    #[error("adapter `{0}` already exists")]
    DuplicateAdapter(String),
    /// A tensor in an adapter file whose shape does not fit the module it belongs to.
    #[error("{path}: `{key}` has shape {found:?}, the model expects {expected:?}")]
    ShapeMismatch {
        /// The adapter file.
        path: PathBuf,
        /// The tensor's key in the file.
        key: String,
        /// The shape in the file.
        found: Vec<usize>,
        /// The shape the module needs.
        expected: Vec<usize>,
    },
    /// A tensor in an adapter file that belongs to no module of the model.
    #[error("{path}: `{key}` matches no module of the model")]
    UnexpectedKey {
        /// The adapter file.
        path: PathBuf,
        /// The key.
        key: String,
    },
    /// A tensor the adapter's configuration needs is absent from its file.
    #[error("{path}: missing tensor `{key}`")]
    MissingKey {
        /// The adapter file.
        path: PathBuf,
        /// The key.
        key: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file exists but cannot be parsed (JSON, safetensors, pickle).
    #[error("{path}: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// `Result` with [`PeftError`].
pub type Result<T> = std::result::Result<T, PeftError>;

pub(crate) fn config_error(field: &str, message: impl Into<String>) -> PeftError {
    PeftError::Config {
        field: field.to_owned(),
        message: message.into(),
    }
}
