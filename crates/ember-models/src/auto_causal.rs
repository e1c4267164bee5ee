//! `from_pretrained` / `save_pretrained` for the causal LMs, and `AutoModelForCausalLM`, which
//! picks the architecture from `model_type`.

use crate::bloom::{BloomConfig, BloomForCausalLM};
use crate::causal::{CausalLm, CausalLmInput, CausalLmOutput};
use crate::config::read_json;
use crate::dtype::FloatDtype;
use crate::error::{ModelError, Result};
use crate::gpt2::{GPT2Config, GPT2LMHeadModel};
use crate::llama::{LlamaConfig, LlamaForCausalLM};
use crate::params::{NameCollector, NamedParam, StableIds, StateDict, VisitParams};
use crate::pretrained::{
    last_param_name, load_weights_into, save_files, state_dict, FromPretrainedOptions, LoadReport,
    WeightSource,
};
use crate::quantize::default_skips;
use crate::weights::{LinearLayout, Weights};
use burn::tensor::backend::Backend;
use serde_json::Value;
use std::path::Path;

/// Checkpoint keys a causal LM does not report as unused: rotary buffers, attention-mask
/// buffers of old GPT-2 files, and the output matrix of a tied model saved with it.
fn is_ignorable_causal_key(key: &str) -> bool {
    key.ends_with("rotary_emb.inv_freq")
        || key.ends_with(".attn.bias")
        || key.ends_with(".attn.masked_bias")
        || key == "lm_head.weight"
}

/// Reads `config.json` as JSON and applies `set(field, value)` overrides.
fn config_value(dir: &Path, options: &FromPretrainedOptions) -> Result<Value> {
    let path = dir.join("config.json");
    let mut value = read_json(&path)?;
    if let Some(object) = value.as_object_mut() {
        object.extend(options.config_updates.clone());
    }
    Ok(value)
}

macro_rules! causal_pretrained {
    ($model:ident, $config:ident, $base:literal, $class:literal, |$m:ident| $buffers:expr) => {
        impl<B: Backend> $model<B> {
            /// The HF class name.
            pub const CLASS: &'static str = $class;

            /// Loads a checkpoint folder (`config.json` + weights), as HF's `from_pretrained`;
            /// a Hub repository id (`"org/name"`) is fetched into the Hugging Face cache first.
            pub fn from_pretrained(dir: impl AsRef<Path>, device: &B::Device) -> Result<Self> {
                Ok(Self::from_pretrained_with(dir, &FromPretrainedOptions::default(), device)?.0)
            }

            /// Loads a checkpoint folder with config overrides (`set(field, value)`) and
            /// `ignore_mismatched_sizes`; also returns the load report.
            pub fn from_pretrained_with(
                dir: impl AsRef<Path>,
                options: &FromPretrainedOptions,
                device: &B::Device,
            ) -> Result<(Self, LoadReport)> {
                let dir = crate::hub::resolve(dir.as_ref(), options)?;
                let dir: &Path = &dir;
                let path = dir.join("config.json");
                let mut value = config_value(dir, options)?;
                let config = $config::from_json_value(value.clone(), &path)?;
                let plan = options.quant_plan(&value, &path, || {
                    let last = Self::new(&config, device).ok().and_then(last_param_name);
                    default_skips(Some("lm_head"), last.as_deref())
                })?;
                if let (Some(plan), Some(object)) = (&plan, value.as_object_mut()) {
                    object.insert("quantization_config".into(), plan.config.to_json_value());
                }
                let dtype = options.load_dtype(&value, &path)?;
                if let Some(object) = value.as_object_mut() {
                    object.insert("dtype".into(), dtype.as_str().into());
                }
                let config = $config::from_json_value(value, &path)?;
                let weights = Weights::from_dir(dir)?;
                let model = Self::new(&config, device)?;
                let source = WeightSource {
                    weights: &weights,
                    base_prefix: $base,
                    optional: &[],
                    ignorable: is_ignorable_causal_key,
                    quant: plan.as_ref(),
                    dtype,
                    linear_layout: options.linear_layout.unwrap_or(LinearLayout::OutIn),
                };
                load_weights_into(model, &source, options.ignore_mismatched_sizes, $class)
            }

            /// Writes `config.json` and `model.safetensors` (f32, HF keys, the tied output
            /// matrix left out as HF does) into `dir`, each atomically.
            pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
                let mut config = self.config.clone();
                config.architectures = Some(vec![$class.to_owned()]);
                config.extra.insert(
                    "dtype".into(),
                    crate::dtype::model_dtype(self).as_str().into(),
                );
                save_files(self, &config.to_json_string(), dir.as_ref())
            }

            /// The tensors `save_pretrained` writes, by HF key.
            pub fn state_dict(&self) -> Result<StateDict> {
                state_dict(self)
            }

            /// Loads the weights of a `save_pretrained` folder into this model, keeping its
            /// configuration and parameter ids.
            pub fn load_weights(self, dir: impl AsRef<Path>) -> Result<Self> {
                let weights = Weights::from_dir(dir.as_ref())?;
                let source = WeightSource {
                    weights: &weights,
                    base_prefix: $base,
                    optional: &[],
                    ignorable: is_ignorable_causal_key,
                    quant: None,
                    dtype: crate::dtype::model_dtype(&self),
                    // The layout an optimizer step writes (resuming must round as the
                    // uninterrupted run did).
                    linear_layout: LinearLayout::InOut,
                };
                Ok(load_weights_into(self, &source, false, $class)?.0)
            }

            crate::dtype::dtype_methods!();

            /// Gives every parameter an id derived from its HF name (stable across processes).
            pub fn with_stable_param_ids(self) -> Self {
                self.visit("", &mut StableIds)
                    .expect("renaming ids cannot fail")
            }

            /// Bytes of parameters and buffers, as transformers' `get_memory_footprint()`: a
            /// 4-bit weight counts its packed bytes, an int8 one a byte per value, a tied
            /// output matrix once, plus the model's float buffers.
            pub fn get_memory_footprint(&self) -> usize {
                let $m = self;
                crate::params::parameter_bytes(self) + $buffers
            }

            /// Every parameter's HF name and burn id, in module order.
            pub fn named_parameters(&self) -> Vec<NamedParam> {
                let mut names = NameCollector::default();
                self.clone()
                    .visit("", &mut names)
                    .expect("naming parameters cannot fail");
                names.params
            }
        }
    };
}

// Llama's buffers: `inv_freq` and `original_inv_freq`, `head_dim / 2` float32 each.
causal_pretrained!(
    LlamaForCausalLM,
    LlamaConfig,
    "model",
    "LlamaForCausalLM",
    |m| 4 * m.config.head_dim()
);
causal_pretrained!(
    BloomForCausalLM,
    BloomConfig,
    "transformer",
    "BloomForCausalLM",
    |_m| 0
);
causal_pretrained!(
    GPT2LMHeadModel,
    GPT2Config,
    "transformer",
    "GPT2LMHeadModel",
    |_m| 0
);

/// A causal LM of any supported architecture, as `AutoModelForCausalLM` returns it.
#[derive(Debug, Clone)]
pub enum AnyCausalLm<B: Backend> {
    /// `LlamaForCausalLM`.
    Llama(LlamaForCausalLM<B>),
    /// `BloomForCausalLM`.
    Bloom(BloomForCausalLM<B>),
    /// `GPT2LMHeadModel`.
    Gpt2(GPT2LMHeadModel<B>),
}

/// Runs `$body` with `$m` bound to the inner model.
macro_rules! each_model {
    ($self:expr, $m:ident => $body:expr) => {
        match $self {
            AnyCausalLm::Llama($m) => $body,
            AnyCausalLm::Bloom($m) => $body,
            AnyCausalLm::Gpt2($m) => $body,
        }
    };
}

impl<B: Backend> AnyCausalLm<B> {
    /// The HF class name (`LlamaForCausalLM`, ...).
    pub fn class_name(&self) -> &'static str {
        match self {
            Self::Llama(_) => LlamaForCausalLM::<B>::CLASS,
            Self::Bloom(_) => BloomForCausalLM::<B>::CLASS,
            Self::Gpt2(_) => GPT2LMHeadModel::<B>::CLASS,
        }
    }

    /// The model's `config.json` as JSON (for ids such as `eos_token_id`).
    pub fn config_json(&self) -> Value {
        each_model!(self, m => serde_json::to_value(&m.config).expect("a config serializes"))
    }

    /// Writes the model in HF layout (see each model's `save_pretrained`).
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        each_model!(self, m => m.save_pretrained(dir))
    }

    /// The tensors `save_pretrained` writes, by HF key.
    pub fn state_dict(&self) -> Result<StateDict> {
        each_model!(self, m => m.state_dict())
    }

    /// Bytes of parameters and buffers, as transformers' `get_memory_footprint()`.
    pub fn get_memory_footprint(&self) -> usize {
        each_model!(self, m => m.get_memory_footprint())
    }

    /// Every parameter's HF name and burn id.
    pub fn named_parameters(&self) -> Vec<NamedParam> {
        each_model!(self, m => m.named_parameters())
    }

    /// The dtype of the weights (`model.dtype`).
    pub fn dtype(&self) -> FloatDtype {
        each_model!(self, m => m.dtype())
    }

    /// Every float parameter converted to `dtype` (see each model's `to_dtype`).
    pub fn to_dtype(self, dtype: FloatDtype) -> Result<Self> {
        Ok(match self {
            Self::Llama(m) => Self::Llama(m.to_dtype(dtype)?),
            Self::Bloom(m) => Self::Bloom(m.to_dtype(dtype)?),
            Self::Gpt2(m) => Self::Gpt2(m.to_dtype(dtype)?),
        })
    }
}

impl<B: Backend> CausalLm<B> for AnyCausalLm<B> {
    fn forward(&self, input: CausalLmInput<B>) -> Result<CausalLmOutput<B>> {
        each_model!(self, m => m.forward(input))
    }

    fn vocab_size(&self) -> usize {
        each_model!(self, m => CausalLm::vocab_size(m))
    }

    fn max_positions(&self) -> Option<usize> {
        each_model!(self, m => CausalLm::max_positions(m))
    }
}

/// `AutoModelForCausalLM`: loads `llama` checkpoints (also Qwen2-style ones saved as
/// `llama`), `bloom` and `gpt2` ones, choosing the class from `model_type`.
pub struct AutoModelForCausalLM;

/// The `model_type`s `AutoModelForCausalLM` builds.
pub const CAUSAL_MODEL_TYPES: [&str; 3] = ["llama", "bloom", "gpt2"];

impl AutoModelForCausalLM {
    /// Loads the checkpoint in `dir`, or of a Hub repository id (`"org/name"`), fetched into
    /// the Hugging Face cache first.
    pub fn from_pretrained<B: Backend>(
        dir: impl AsRef<Path>,
        device: &B::Device,
    ) -> Result<AnyCausalLm<B>> {
        Ok(Self::from_pretrained_with(dir, &FromPretrainedOptions::default(), device)?.0)
    }

    /// As [`Self::from_pretrained`], with overrides and the load report.
    pub fn from_pretrained_with<B: Backend>(
        dir: impl AsRef<Path>,
        options: &FromPretrainedOptions,
        device: &B::Device,
    ) -> Result<(AnyCausalLm<B>, LoadReport)> {
        let dir = crate::hub::resolve(dir.as_ref(), options)?;
        let dir: &Path = &dir;
        let path = dir.join("config.json");
        let value = read_json(&path)?;
        match model_type(&value, &path)? {
            "llama" => {
                let (m, r) = LlamaForCausalLM::from_pretrained_with(dir, options, device)?;
                Ok((AnyCausalLm::Llama(m), r))
            }
            "bloom" => {
                let (m, r) = BloomForCausalLM::from_pretrained_with(dir, options, device)?;
                Ok((AnyCausalLm::Bloom(m), r))
            }
            "gpt2" => {
                let (m, r) = GPT2LMHeadModel::from_pretrained_with(dir, options, device)?;
                Ok((AnyCausalLm::Gpt2(m), r))
            }
            _ => unreachable!("model_type() accepts only supported types"),
        }
    }

    /// A model with fresh weights from a config (`config.json` contents).
    pub fn from_config<B: Backend>(config: &Value, device: &B::Device) -> Result<AnyCausalLm<B>> {
        let path = Path::new("<config>");
        match model_type(config, path)? {
            "llama" => Ok(AnyCausalLm::Llama(LlamaForCausalLM::new(
                &LlamaConfig::from_json_value(config.clone(), path)?,
                device,
            )?)),
            "bloom" => Ok(AnyCausalLm::Bloom(BloomForCausalLM::new(
                &BloomConfig::from_json_value(config.clone(), path)?,
                device,
            )?)),
            "gpt2" => Ok(AnyCausalLm::Gpt2(GPT2LMHeadModel::new(
                &GPT2Config::from_json_value(config.clone(), path)?,
                device,
            )?)),
            _ => unreachable!("model_type() accepts only supported types"),
        }
    }
}

/// The supported `model_type` of a config, or an `Unsupported` error naming it.
fn model_type<'a>(value: &'a Value, path: &Path) -> Result<&'a str> {
    let kind = value
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if CAUSAL_MODEL_TYPES.contains(&kind) {
        Ok(kind)
    } else {
        Err(ModelError::Unsupported {
            path: path.to_owned(),
            message: format!(
                "AutoModelForCausalLM cannot build model_type `{kind}` (supported: {})",
                CAUSAL_MODEL_TYPES.join(", ")
            ),
        })
    }
}
