//! Ember: the Hugging Face fine-tuning workflow in Rust, on burn.
//!
//! This facade re-exports the focused crates and picks the burn backend at compile time through
//! Cargo features, so that user code names [`Backend`] / [`TrainBackend`] and switches hardware by
//! changing one feature:
//!
//! | feature | backend | device |
//! |---|---|---|
//! | `flex` (default) | burn's Flex CPU backend (rayon + SIMD) | CPU |
//! | `ndarray` | burn's NdArray backend (rayon + SIMD) | CPU |
//! | `cuda` | burn's CUDA backend, the performance target | NVIDIA GPU |
//! | `wgpu` | burn's wgpu backend | Vulkan / Metal / DX12 GPU |
//!
//! When several are enabled the most capable one wins: `cuda`, then `wgpu`, then `ndarray`, then
//! `flex`. Every library crate is generic over `B: Backend`; only this facade and the CLI name one.
//!
//! ```
//! use ember::prelude::*;
//!
//! let tokenizer = ember::tokenizers::demo::demo_tokenizer()?;
//! let batch = tokenizer
//!     .batch_encode(&["Ember tokenizes text."], &EncodeOptions::default())?
//!     .to_tensors::<ember::Backend>(&ember::default_device())?;
//! assert_eq!(batch.input_ids.dims()[0], 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#[cfg(not(any(
    feature = "flex",
    feature = "ndarray",
    feature = "cuda",
    feature = "wgpu"
)))]
compile_error!("ember needs one backend feature: flex (default), ndarray, cuda or wgpu");

pub use burn;
pub mod data;
pub use ember_datasets as datasets;
pub use ember_distributed as distributed;
/// The Hugging Face Hub cache: `hf_hub_download`, `HubConfig` (what `from_pretrained("org/name")` uses).
pub use ember_hub as hub;
pub use ember_kernels::{keep_freed_memory, HugePageAlloc};
pub use ember_models as models;
pub use ember_peft as peft;
pub use ember_quant as quant;
pub use ember_tokenizers as tokenizers;
pub use ember_train as train;

/// The inference backend chosen by the Cargo features.
#[cfg(feature = "cuda")]
pub type Backend = burn::backend::Cuda;
/// The inference backend chosen by the Cargo features.
#[cfg(all(feature = "wgpu", not(feature = "cuda")))]
pub type Backend = burn::backend::Wgpu;
/// The inference backend chosen by the Cargo features.
#[cfg(all(feature = "ndarray", not(any(feature = "cuda", feature = "wgpu"))))]
pub type Backend = burn::backend::NdArray;
/// The inference backend chosen by the Cargo features.
#[cfg(all(
    feature = "flex",
    not(any(feature = "cuda", feature = "wgpu", feature = "ndarray"))
))]
pub type Backend = burn::backend::Flex;

/// The training backend: [`Backend`] with automatic differentiation.
pub type TrainBackend = burn::backend::Autodiff<Backend>;

/// The device type of [`Backend`].
pub type Device = burn::tensor::Device<Backend>;

/// The default device of [`Backend`] (the CPU, or the first GPU).
pub fn default_device() -> Device {
    Device::default()
}

/// A human-readable name of the backend compiled in, for logs and `--version` output.
pub fn backend_name() -> &'static str {
    if cfg!(feature = "cuda") {
        "cuda"
    } else if cfg!(feature = "wgpu") {
        "wgpu"
    } else if cfg!(feature = "ndarray") {
        "ndarray"
    } else {
        "flex"
    }
}

/// The names most programs need, in one import.
pub mod prelude {
    pub use crate::{default_device, Backend, Device, TrainBackend};
    pub use burn::tensor::{backend::Backend as BackendTrait, Int, Tensor};
    pub use ember_models::generation::{generate, GenerateOptions, GenerationConfig, Prompt};
    pub use ember_models::{
        AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM,
        AutoModelForQuestionAnswering, AutoModelForSequenceClassification,
        AutoModelForTokenClassification, CausalLm, CausalLmInput, EncoderInput,
        FromPretrainedOptions, ModelError, OutputOptions, SequenceLabels,
    };
    pub use ember_tokenizers::{
        AutoTokenizer, BatchEncoding, ChatMessage, ChatTemplateOptions, EncodeOptions, Padding,
        PaddingSide, TensorBatch, TokenizerError, Truncation,
    };
}
