//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong while configuring, running or checkpointing training; every
/// variant names the file, field or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A file or folder could not be read or written.
    #[error("cannot access `{path}`: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// A `TrainingArguments` field has a value Ember (or HF) refuses.
    #[error("invalid training argument `{field}`: {message}")]
    Argument {
        /// The field, by its HF name.
        field: String,
        /// What is wrong with its value.
        message: String,
    },
    /// A file (arguments, trainer state, checkpoint) is malformed.
    #[error("invalid file `{path}`: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong (the field, line and column where known).
        message: String,
    },
    /// Predictions and labels that cannot be compared (lengths differ, a tag is not BIO).
    #[error("invalid metric input: {0}")]
    Metric(String),
    /// The model, the data or the optimizer failed during a step.
    #[error("training failed: {0}")]
    Step(String),
    /// A collective operation of data-parallel training failed (a rank died, timed out, or
    /// the ranks disagree).
    #[error("data parallel: {0}")]
    Distributed(#[from] ember_distributed::DistributedError),
}

/// This crate's result type.
pub type Result<T, E = TrainError> = std::result::Result<T, E>;
