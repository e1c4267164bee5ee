//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model; every variant names the
/// file, key, field or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// `from_pretrained(name)` with a name that is not a local folder, and the Hugging Face Hub
    /// (or its cache) could not provide the checkpoint files.
    #[error(
        "`{name}` is not a local folder, and loading it from the Hugging Face Hub failed: {source}"
    )]
    Hub {
        /// The name as given (a repository id).
        name: String,
        /// What the Hub or the cache said (it names the URL, file and revision); boxed, so
        /// that every `Result` of the crate stays small.
        #[source]
        source: Box<ember_hub::HubError>,
    },
    /// A file could not be read.
    #[error("cannot access `{path}`: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is malformed or a field has the wrong type.
    #[error("invalid config `{path}`: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong (serde names the field).
        message: String,
    },
    /// A weights file is truncated or not a safetensors file.
    #[error("invalid weights file `{path}`: {message}")]
    Weights {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A tensor the model needs is not in the weights.
    #[error("missing tensor `{key}` in `{path}`")]
    MissingTensor {
        /// The HF key.
        key: String,
        /// The weights file.
        path: PathBuf,
    },
    /// A checkpoint folder holds none of the weight files HF looks for.
    #[error("no weights in `{dir}`: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin")]
    NoWeights {
        /// The folder.
        dir: PathBuf,
    },
    /// `model_type` names an architecture this crate does not implement, or the one asked for
    /// (an `Auto*` class) does not fit it.
    #[error("unsupported model in `{path}`: {message}")]
    Unsupported {
        /// The config file.
        path: PathBuf,
        /// Which `model_type` / architecture, and what is supported.
        message: String,
    },
    /// A tensor has another shape than the config implies.
    #[error("tensor `{key}` in `{file}` has shape {found:?}, expected {expected:?}")]
    Shape {
        /// The HF key.
        key: String,
        /// The file holding it.
        file: PathBuf,
        /// Its shape in the file.
        found: Vec<usize>,
        /// The shape the config implies.
        expected: Vec<usize>,
    },
    /// A tensor dtype this crate cannot read.
    #[error("tensor `{key}` in `{path}` has unsupported dtype {dtype}")]
    Dtype {
        /// The HF key.
        key: String,
        /// The file holding it.
        path: PathBuf,
        /// The dtype.
        dtype: String,
    },
    /// A weight too large for float16 (it would become infinity).
    #[error("tensor `{key}` holds {value}, beyond float16's largest value 65504: keep this model in bfloat16 or float32")]
    Fp16Overflow {
        /// The HF key.
        key: String,
        /// The largest magnitude found.
        value: f32,
    },
    /// An input the model cannot take (ids beyond the vocabulary, a sequence too long).
    #[error("invalid input: {0}")]
    Input(String),
    /// A collective operation of a tensor-parallel model failed, or the model does not split
    /// over the group (heads the group does not divide).
    #[error(transparent)]
    Distributed(#[from] ember_distributed::DistributedError),
}

/// This crate's result type.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
