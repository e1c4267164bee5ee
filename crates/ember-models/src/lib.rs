//! Hugging Face `transformers` models on burn, file-compatible with Python.
//!
//! - [`BertConfig`] / [`RobertaConfig`]: `config.json` with HF names and defaults; unknown
//!   fields are kept.
//! - [`BertModel`] / [`RobertaModel`] and the heads [`BertForSequenceClassification`],
//!   [`BertForTokenClassification`], [`BertForMaskedLM`] and [`BertForQuestionAnswering`]
//!   (RoBERTa aliases too), each with `from_pretrained`, `save_pretrained` and a `forward`
//!   that returns logits, the HF loss when labels are given, and on request hidden states and
//!   attentions.
//! - [`AutoConfig`], [`AutoModel`], [`AutoModelForSequenceClassification`],
//!   [`AutoModelForTokenClassification`], [`AutoModelForMaskedLM`] and
//!   [`AutoModelForQuestionAnswering`], with HF's overrides ([`FromPretrainedOptions`]) and its
//!   loading report ([`LoadReport`]).
//! - Weights from `model.safetensors`, a sharded `model.safetensors.index.json` or
//!   `pytorch_model.bin`, in f32, f16 or bf16, keys with or without the `bert.` / `roberta.`
//!   prefix ([`Weights`]).
//!
//! - Causal LMs: [`LlamaForCausalLM`] (RMSNorm, RoPE with HF's scaling variants, grouped-query
//!   attention, tied or untied embeddings), [`BloomForCausalLM`] (ALiBi, fused
//!   `query_key_value`) and [`GPT2LMHeadModel`] (Conv1D layout) through
//!   [`AutoModelForCausalLM`], with a key / value cache ([`KvCache`], also a learned prefix)
//!   and the shifted-label loss ([`causal`]).
//! - [`LlamaPipelineStage`]: a Llama cut into pipeline-parallel stages for
//!   `ember_distributed::PipelineParallel` (GPipe / 1F1B).
//! - [`generation`]: HF's `generate` with a `GenerationConfig` (greedy, sampling with
//!   temperature / top-k / top-p, repetition penalty, EOS ids and stop strings, left-padded
//!   batches, streaming).
//!
//! - [`pooling`]: sentence-transformers' masked mean pooling and L2 normalisation.
//!
//! Every model is generic over the burn backend; dropout is active only on an autodiff
//! backend, so a model used for inference (`model.valid()`) never drops.
//!
//! ```no_run
//! use ember_models::{AutoModelForSequenceClassification, EncoderInput, FromPretrainedOptions};
//! use burn::tensor::{Int, Tensor, TensorData};
//! type B = burn::backend::Flex;
//! let device = Default::default();
//! let options = FromPretrainedOptions::default().labels(["negative", "positive"]);
//! let (model, report) =
//!     AutoModelForSequenceClassification::from_pretrained_with::<B>("all-MiniLM-L6-v2", &options, &device)?;
//! println!("new head: {:?}", report.missing_keys);
//! let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![101i64, 7592, 102], [1, 3]), &device);
//! let logits = model.forward(EncoderInput::new(ids), None)?.logits;
//! model.save_pretrained("my-classifier")?;
//! # Ok::<(), ember_models::ModelError>(())
//! ```

mod auto_causal;
mod bert;
mod bloom;
pub mod causal;
mod config;
mod decoder_attention;
mod dtype;
mod error;
pub mod generation;
mod gpt2;
mod heads;
mod hub;
mod llama;
mod llama_pipeline;
pub mod loss;
mod params;
mod peft;
pub mod pooling;
mod pretrained;
pub mod quantize;
pub mod rope;
mod tensor_parallel;
#[cfg(feature = "train")]
mod train;
mod weights;

pub use auto_causal::{AnyCausalLm, AutoModelForCausalLM, CAUSAL_MODEL_TYPES};
pub use bert::{
    Activation, BaseModelOutput, BertEmbeddings, BertLayer, BertModel, BertOutput,
    BertSelfAttention, EncoderInput, OutputOptions, RobertaModel,
};
pub use bloom::{
    alibi_slopes, BloomAttention, BloomBlock, BloomConfig, BloomForCausalLM, BloomMlp, BloomModel,
};
pub use causal::{CausalLm, CausalLmInput, CausalLmOutput, KvCache, LayerKv};
pub use config::{BertConfig, RobertaConfig, SUPPORTED_ACTIVATIONS};
pub use dtype::{DtypeArg, FloatDtype, F16_MAX};
/// The Hugging Face Hub cache `from_pretrained("org/name")` reads and fills.
pub use ember_hub;
pub use error::{ModelError, Result};
pub use gpt2::{
    GPT2Attention, GPT2Block, GPT2Config, GPT2LMHeadModel, GPT2Mlp, GPT2Model, GPT2_ACTIVATIONS,
};
pub use heads::{
    BertForMaskedLM, BertForQuestionAnswering, BertForSequenceClassification,
    BertForTokenClassification, ClassificationHead, QuestionAnsweringOutput, RobertaForMaskedLM,
    RobertaForQuestionAnswering, RobertaForSequenceClassification, RobertaForTokenClassification,
    SequenceClassifierOutput, SequenceLabels, TokenLogitsOutput,
};
pub use hub::pretrained_dir;
pub use llama::{
    LlamaAttention, LlamaConfig, LlamaDecoderLayer, LlamaForCausalLM, LlamaMlp, LlamaModel,
};
pub use llama_pipeline::{LlamaMicroBatch, LlamaPipelineStage};
pub use params::{NamedParam, StateDict};
pub use pretrained::{
    read_config, AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification, AutoModelForTokenClassification, FromPretrainedOptions,
    LoadReport,
};
pub use weights::{LinearLayout, Weights, WEIGHT_FILES};
