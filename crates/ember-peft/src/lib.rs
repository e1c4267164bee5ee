//! Parameter-efficient fine-tuning for burn, in the Hugging Face `peft` file format.
//!
//! Ember's models build every linear layer as a [`Projection`] and every embedding table as a
//! [`TokenEmbedding`]: a base plus named adapters, one of them active, as peft's tuner layers
//! wrap a base layer. So [`get_peft_model`] changes no model code: it walks the model's layers
//! by Hugging Face path ([`AdaptableModel`]), matches `target_modules` ([`matching`]) and adds
//! LoRA (linear layers and embeddings), IA3 vectors, or full trained copies
//! (`modules_to_save`).
//!
//! ```text
//! Python peft                                  ember-peft
//! model = get_peft_model(model, LoraConfig())  let model = get_peft_model(model, LoraConfig::default())?;
//! model.print_trainable_parameters()           model.print_trainable_parameters();
//! model.save_pretrained("out")                 model.save_pretrained("out")?;
//! PeftModel.from_pretrained(base, "out")       PeftModel::from_pretrained(base, "out", "default", false)?;
//! model.load_adapter("b", adapter_name="b")    model.load_adapter("b", "b", false)?;
//! model.set_adapter("b")                       model.set_adapter("b")?;
//! with model.disable_adapter(): ...            model.disable_adapter(|m| ...);
//! model.merge_and_unload()                     model.merge_and_unload();
//! ```
//!
//! Files are peft's: `adapter_config.json` (unknown fields kept) and
//! `adapter_model.safetensors` with keys `base_model.model.<module>.lora_A.weight` `[r, in]`,
//! `lora_B.weight` `[out, r]`, `lora_embedding_A` / `_B`, `ia3_l`; a non-default adapter
//! under `<dir>/<name>/`; `adapter_model.bin` is read too.

mod adapter;
pub mod config;
mod embedding;
mod error;
pub mod io;
mod linear;
pub mod matching;
mod model;
pub mod prompt;
mod prompt_config;
mod quantized;
mod slots;
#[cfg(feature = "train")]
mod train;
mod visit;

pub use adapter::AdapterState;
pub use config::{
    Bias, EncoderReparameterization, IA3Config, InitLoraWeights, LoraConfig, OneOrMany, PeftConfig,
    PrefixTuningConfig, PromptDims, PromptEncoderConfig, PromptLearningFields, PromptTuningConfig,
    PromptTuningInit, TargetModules, TaskType,
};
pub use embedding::{EmbeddingAdapter, LoraEmbedding, TokenEmbedding};
pub use error::{PeftError, Result};
pub use linear::{linear_forward, Ia3Vector, LoraInit, LoraLinear, Projection, ProjectionAdapter};
pub use model::{get_peft_model, named_modules, PeftModel, PeftParam, DEFAULT_ADAPTER};
pub use prompt::{PromptEncoder, VirtualPrompt};
pub use quantized::{prepare_model_for_kbit_training, QuantizedBase};
pub use visit::{AdaptableModel, LayerVisitor, ModuleInfo};
