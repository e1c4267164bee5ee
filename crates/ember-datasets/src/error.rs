//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong while loading, transforming or saving a dataset. Every variant
/// names the file, column, row or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// A file or folder could not be read or written.
    #[error("cannot access `{path}`: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// A data file is empty (no header, no rows).
    #[error("`{0}` is empty")]
    EmptyFile(PathBuf),
    /// A data file did not parse.
    #[error("cannot parse `{path}`: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said (with the row where it knows it).
        message: String,
    },
    /// A JSON metadata file (`dataset_info.json`, `state.json`, ...) is malformed.
    #[error("malformed `{path}`: {message}")]
    Metadata {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A column that does not exist.
    #[error("no column `{name}` (columns: {available})")]
    MissingColumn {
        /// The column asked for.
        name: String,
        /// The columns the dataset has, comma separated.
        available: String,
    },
    /// A column that exists already.
    #[error("column `{0}` exists already")]
    DuplicateColumn(String),
    /// A column has the wrong type for the operation.
    #[error("column `{column}` has type {found}, expected {expected}")]
    ColumnType {
        /// The column.
        column: String,
        /// What it holds.
        found: String,
        /// What was needed.
        expected: String,
    },
    /// A value outside a ClassLabel's names.
    #[error("row {row}: value {value} of column `{column}` is not one of the ClassLabel names {names:?}")]
    LabelOutOfRange {
        /// The column.
        column: String,
        /// The row.
        row: usize,
        /// The value.
        value: String,
        /// The names of the ClassLabel.
        names: Vec<String>,
    },
    /// A row index past the end.
    #[error("row {index} is out of range for a dataset of {len} rows")]
    IndexOutOfRange {
        /// The index.
        index: usize,
        /// The number of rows.
        len: usize,
    },
    /// An argument out of its range (`test_size`, ...), named with its value.
    #[error("`{name}` = {value}: {message}")]
    InvalidArgument {
        /// The argument name, as in HF.
        name: &'static str,
        /// Its value.
        value: String,
        /// What is allowed.
        message: String,
    },
    /// Columns of different lengths, or a function that returned the wrong number of rows.
    #[error("{0}")]
    Shape(String),
    /// An error from Arrow.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
}

impl DatasetError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// This crate's result type.
pub type Result<T, E = DatasetError> = std::result::Result<T, E>;
