//! The prompt-learning configurations (`PromptTuningConfig`, `PromptEncoderConfig`,
//! `PrefixTuningConfig`) with peft 0.21's field names and defaults. The sizes peft infers from
//! the base model (`token_dim`, `num_layers`, ...) are `None` until [`PromptDims`] fills them,
//! as peft's `_prepare_prompt_learning_config` does.

use crate::config::TaskType;
use crate::error::{config_error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The fields every prompt-learning method shares (peft's `PromptLearningConfig`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct PromptLearningFields {
    /// The task: which head the model has (`CAUSAL_LM`, `SEQ_CLS`, `TOKEN_CLS`).
    #[serde(default)]
    pub task_type: Option<TaskType>,
    /// The base model's folder or hub id, recorded for the reader.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Whether the adapter is loaded for inference only.
    #[serde(default)]
    pub inference_mode: bool,
    /// How many virtual tokens (prompt tuning, P-tuning) or prefix positions (prefix tuning).
    #[serde(default)]
    pub num_virtual_tokens: Option<usize>,
    /// The width of a virtual token; `None`: the model's hidden size (for prefix tuning on
    /// grouped-query attention, `head_dim · num_key_value_heads`).
    #[serde(default)]
    pub token_dim: Option<usize>,
    /// 1 for decoder-only and encoder-only models (2 for encoder-decoder ones).
    #[serde(default)]
    pub num_transformer_submodules: Option<usize>,
    /// The attention heads the prefix is split into; `None`: the model's (key / value) heads.
    #[serde(default)]
    pub num_attention_heads: Option<usize>,
    /// The model's layers; `None`: read from the model.
    #[serde(default)]
    pub num_layers: Option<usize>,
    /// Modules trained in full and saved with the adapter (the classifier of `SEQ_CLS` /
    /// `TOKEN_CLS` is added automatically).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
}

/// `prompt_tuning_init`: how the virtual token embeddings start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum PromptTuningInit {
    /// Standard normal, as `nn.Embedding` initialises.
    #[default]
    #[serde(rename = "RANDOM")]
    Random,
    /// The embeddings of `prompt_tuning_init_text`'s tokens, truncated or repeated to
    /// `num_virtual_tokens`.
    #[serde(rename = "TEXT")]
    Text,
    /// The embeddings of tokens drawn uniformly from the vocabulary.
    #[serde(rename = "SAMPLE_VOCAB")]
    SampleVocab,
}

/// peft's `PromptTuningConfig`: learned virtual token embeddings put before the input's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptTuningConfig {
    /// Always `"PROMPT_TUNING"`.
    #[serde(default = "prompt_tuning_type")]
    pub peft_type: String,
    /// The shared prompt-learning fields.
    #[serde(flatten)]
    pub prompt: PromptLearningFields,
    /// How the embeddings start (`RANDOM`).
    #[serde(default)]
    pub prompt_tuning_init: PromptTuningInit,
    /// The text whose token embeddings start the prompt (`TEXT` init).
    #[serde(default)]
    pub prompt_tuning_init_text: Option<String>,
    /// The tokenizer folder the text is tokenized with (`TEXT` init).
    #[serde(default)]
    pub tokenizer_name_or_path: Option<String>,
    /// Every other field of the file (`tokenizer_kwargs`, `peft_version`, ...), written back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `encoder_reparameterization_type` of P-tuning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum EncoderReparameterization {
    /// Three linear layers with ReLU between them.
    #[default]
    #[serde(rename = "MLP")]
    Mlp,
    /// A bidirectional LSTM, then two linear layers with a ReLU.
    #[serde(rename = "LSTM")]
    Lstm,
}

/// peft's `PromptEncoderConfig` (P-tuning): virtual token embeddings passed through a small
/// encoder before they are put in front of the input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptEncoderConfig {
    /// Always `"P_TUNING"`.
    #[serde(default = "p_tuning_type")]
    pub peft_type: String,
    /// The shared prompt-learning fields.
    #[serde(flatten)]
    pub prompt: PromptLearningFields,
    /// MLP or LSTM.
    #[serde(default)]
    pub encoder_reparameterization_type: EncoderReparameterization,
    /// The encoder's hidden width; `None`: `token_dim`.
    #[serde(default)]
    pub encoder_hidden_size: Option<usize>,
    /// LSTM layers (the MLP always has three linear layers) (2).
    #[serde(default = "two")]
    pub encoder_num_layers: usize,
    /// Dropout between LSTM layers during training (0).
    #[serde(default)]
    pub encoder_dropout: f64,
    /// Every other field of the file, written back unchanged.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// peft's `PrefixTuningConfig`: learned keys and values that every attention layer sees
/// before the input's, as if they were cached positions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefixTuningConfig {
    /// Always `"PREFIX_TUNING"`.
    #[serde(default = "prefix_tuning_type")]
    pub peft_type: String,
    /// The shared prompt-learning fields.
    #[serde(flatten)]
    pub prompt: PromptLearningFields,
    /// The projection's hidden width; `None`: `token_dim`.
    #[serde(default)]
    pub encoder_hidden_size: Option<usize>,
    /// false: the keys and values are learned directly (P-tuning v2); true: they come from a
    /// `token_dim`-wide embedding through a two-layer MLP with tanh.
    #[serde(default)]
    pub prefix_projection: bool,
    /// Every other field of the file (`init_weights`, ...), written back unchanged.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn prompt_tuning_type() -> String {
    "PROMPT_TUNING".into()
}
fn p_tuning_type() -> String {
    "P_TUNING".into()
}
fn prefix_tuning_type() -> String {
    "PREFIX_TUNING".into()
}
fn two() -> usize {
    2
}

impl PromptTuningConfig {
    /// Random init with `num_virtual_tokens` virtual tokens.
    pub fn new(num_virtual_tokens: usize) -> Self {
        Self {
            peft_type: prompt_tuning_type(),
            prompt: PromptLearningFields::with_tokens(num_virtual_tokens),
            prompt_tuning_init: PromptTuningInit::Random,
            prompt_tuning_init_text: None,
            tokenizer_name_or_path: None,
            extra: Map::new(),
        }
    }

    /// peft's checks: TEXT init needs the text and the tokenizer.
    pub fn validate(&self) -> Result<()> {
        self.prompt.validate()?;
        if self.prompt_tuning_init == PromptTuningInit::Text {
            if self
                .tokenizer_name_or_path
                .as_deref()
                .unwrap_or("")
                .is_empty()
            {
                return Err(config_error(
                    "tokenizer_name_or_path",
                    format!(
                        "When prompt_tuning_init='TEXT', tokenizer_name_or_path can't be {:?}.",
                        self.tokenizer_name_or_path
                    ),
                ));
            }
            if self.prompt_tuning_init_text.is_none() {
                return Err(config_error(
                    "prompt_tuning_init_text",
                    "When prompt_tuning_init='TEXT', prompt_tuning_init_text can't be None.",
                ));
            }
        }
        if self
            .extra
            .get("tokenizer_kwargs")
            .is_some_and(|v| !v.is_null())
            && self.prompt_tuning_init != PromptTuningInit::Text
        {
            return Err(config_error(
                "tokenizer_kwargs",
                "tokenizer_kwargs only valid when using prompt_tuning_init='TEXT'.",
            ));
        }
        Ok(())
    }
}

impl PromptEncoderConfig {
    /// An MLP encoder with `num_virtual_tokens` virtual tokens.
    pub fn new(num_virtual_tokens: usize) -> Self {
        Self {
            peft_type: p_tuning_type(),
            prompt: PromptLearningFields::with_tokens(num_virtual_tokens),
            encoder_reparameterization_type: EncoderReparameterization::Mlp,
            encoder_hidden_size: None,
            encoder_num_layers: 2,
            encoder_dropout: 0.0,
            extra: Map::new(),
        }
    }

    /// Checks the values.
    pub fn validate(&self) -> Result<()> {
        self.prompt.validate()?;
        if self.encoder_hidden_size == Some(0) {
            return Err(config_error("encoder_hidden_size", "must be positive"));
        }
        if self.encoder_reparameterization_type == EncoderReparameterization::Lstm
            && self.encoder_num_layers == 0
        {
            return Err(config_error(
                "encoder_num_layers",
                "an LSTM encoder needs at least one layer",
            ));
        }
        if !(0.0..1.0).contains(&self.encoder_dropout) {
            return Err(config_error(
                "encoder_dropout",
                format!("{} is not a probability below 1", self.encoder_dropout),
            ));
        }
        Ok(())
    }
}

impl PrefixTuningConfig {
    /// A directly learned prefix of `num_virtual_tokens` positions.
    pub fn new(num_virtual_tokens: usize) -> Self {
        Self {
            peft_type: prefix_tuning_type(),
            prompt: PromptLearningFields::with_tokens(num_virtual_tokens),
            encoder_hidden_size: None,
            prefix_projection: false,
            extra: Map::new(),
        }
    }

    /// Checks the values.
    pub fn validate(&self) -> Result<()> {
        self.prompt.validate()?;
        if self.encoder_hidden_size == Some(0) {
            return Err(config_error("encoder_hidden_size", "must be positive"));
        }
        if let Some(v) = self.extra.get("init_weights").filter(|v| !v.is_null()) {
            if v != "zero" {
                return Err(config_error(
                    "init_weights",
                    format!("{v}: peft knows null or \"zero\""),
                ));
            }
        }
        Ok(())
    }

    /// `init_weights = "zero"`: the prefix (or the projection's last layer) starts at zero.
    pub fn zero_init(&self) -> bool {
        self.extra.get("init_weights").is_some_and(|v| v == "zero")
    }
}

impl PromptLearningFields {
    fn with_tokens(num_virtual_tokens: usize) -> Self {
        Self {
            num_virtual_tokens: Some(num_virtual_tokens),
            ..Self::default()
        }
    }

    fn validate(&self) -> Result<()> {
        match self.num_virtual_tokens {
            None => Err(config_error(
                "num_virtual_tokens",
                "missing: prompt learning needs the number of virtual tokens",
            )),
            Some(0) => Err(config_error(
                "num_virtual_tokens",
                "0 virtual tokens: give at least one",
            )),
            Some(_) => {
                if self.num_transformer_submodules.is_some_and(|n| n != 1) {
                    return Err(config_error(
                        "num_transformer_submodules",
                        "Ember's models are decoder-only or encoder-only: 1",
                    ));
                }
                for (field, value) in [
                    ("token_dim", self.token_dim),
                    ("num_attention_heads", self.num_attention_heads),
                    ("num_layers", self.num_layers),
                ] {
                    if value == Some(0) {
                        return Err(config_error(field, "must be positive"));
                    }
                }
                Ok(())
            }
        }
    }

    /// The number of virtual tokens (checked to be set by `validate`).
    pub fn virtual_tokens(&self) -> usize {
        self.num_virtual_tokens.unwrap_or(0)
    }
}

/// What prompt learning needs to know of a model: its sizes (peft reads them from the
/// model's config) and where its word embeddings are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptDims {
    /// The HF path of the input word embedding table (`model.embed_tokens`).
    pub word_embeddings: String,
    /// Decoder / encoder layers.
    pub num_layers: usize,
    /// The hidden size.
    pub hidden_size: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Key / value heads (grouped-query attention), when the config names them.
    pub num_key_value_heads: Option<usize>,
    /// The vocabulary size.
    pub vocab_size: usize,
    /// The task types the model's head serves (`CAUSAL_LM` for a causal LM, ...).
    pub task_types: Vec<TaskType>,
}

impl PromptLearningFields {
    /// Fills the sizes peft infers (`_prepare_prompt_learning_config`): `num_layers`,
    /// `token_dim`, `num_attention_heads` and `num_transformer_submodules`; for prefix tuning
    /// on grouped-query attention the prefix has the key / value heads' width.
    pub(crate) fn fill(&mut self, dims: &PromptDims, prefix: bool) {
        self.num_layers.get_or_insert(dims.num_layers);
        self.token_dim.get_or_insert(dims.hidden_size);
        self.num_attention_heads
            .get_or_insert(dims.num_attention_heads);
        self.num_transformer_submodules.get_or_insert(1);
        if prefix {
            if let Some(kv) = dims.num_key_value_heads {
                let heads = self.num_attention_heads.unwrap_or(dims.num_attention_heads);
                self.token_dim = Some(self.token_dim.unwrap_or(dims.hidden_size) / heads * kv);
                self.num_attention_heads = Some(kv);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PeftConfig;

    #[test]
    fn peft_s_file_reads_and_writes_back() {
        let text = r#"{"auto_mapping": null, "base_model_name_or_path": null, "inference_mode": true,
            "modules_to_save": null, "num_attention_heads": 4, "num_layers": 2,
            "num_transformer_submodules": 1, "num_virtual_tokens": 5, "peft_type": "PROMPT_TUNING",
            "peft_version": "0.21.2", "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": null,
            "revision": null, "task_type": "SEQ_CLS", "token_dim": 32, "tokenizer_kwargs": null,
            "tokenizer_name_or_path": null}"#;
        let value: Value = serde_json::from_str(text).unwrap();
        let c = PeftConfig::from_value(value.clone()).unwrap();
        let PeftConfig::PromptTuning(p) = &c else {
            panic!("{c:?}")
        };
        assert_eq!(p.prompt.num_virtual_tokens, Some(5));
        assert_eq!(p.prompt.token_dim, Some(32));
        assert_eq!(p.prompt.task_type, Some(TaskType::SeqCls));
        assert!(!p.extra.contains_key("num_layers"), "{:?}", p.extra);
        assert_eq!(c.to_value(), value);
    }

    #[test]
    fn defaults_are_peft_s() {
        let c: PromptEncoderConfig =
            serde_json::from_str(r#"{"peft_type": "P_TUNING", "num_virtual_tokens": 3}"#).unwrap();
        assert_eq!(
            c.encoder_reparameterization_type,
            EncoderReparameterization::Mlp
        );
        assert_eq!((c.encoder_num_layers, c.encoder_dropout), (2, 0.0));
        assert_eq!(c, PromptEncoderConfig::new(3));
        let p: PrefixTuningConfig =
            serde_json::from_str(r#"{"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3}"#)
                .unwrap();
        assert_eq!(p, PrefixTuningConfig::new(3));
    }

    #[test]
    fn bad_values_name_the_field() {
        let err = |text: &str| {
            PeftConfig::from_value(serde_json::from_str(text).unwrap())
                .unwrap_err()
                .to_string()
        };
        assert!(
            err(r#"{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 0}"#)
                .contains("num_virtual_tokens")
        );
        assert!(err(r#"{"peft_type": "PREFIX_TUNING"}"#).contains("num_virtual_tokens: missing"));
        assert!(err(
            r#"{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2, "prompt_tuning_init": "TEXT"}"#
        )
        .contains("tokenizer_name_or_path"));
        assert!(err(
            r#"{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2, "prompt_tuning_init": "TEXT", "tokenizer_name_or_path": "t"}"#
        )
        .contains("prompt_tuning_init_text"));
        assert!(err(
            r#"{"peft_type": "P_TUNING", "num_virtual_tokens": 2, "encoder_reparameterization_type": "GRU"}"#
        )
        .contains("GRU"));
    }

    #[test]
    fn prefix_on_grouped_query_attention_takes_the_key_value_width() {
        let dims = PromptDims {
            word_embeddings: "model.embed_tokens".into(),
            num_layers: 2,
            hidden_size: 32,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            vocab_size: 96,
            task_types: vec![TaskType::CausalLm],
        };
        let mut f = PromptLearningFields::with_tokens(3);
        f.fill(&dims, true);
        assert_eq!(
            (f.token_dim, f.num_attention_heads, f.num_layers),
            (Some(16), Some(2), Some(2))
        );
        let mut f = PromptLearningFields::with_tokens(3);
        f.fill(&dims, false);
        assert_eq!((f.token_dim, f.num_attention_heads), (Some(32), Some(4)));
    }
}
