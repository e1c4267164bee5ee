//! `BertConfig` / `RobertaConfig`: `config.json` of BERT-family checkpoints, with HF field names
//! and defaults. Unknown fields are kept and written back.

use crate::error::{ModelError, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::Path;

fn d_vocab() -> usize {
    30522
}
fn d_hidden() -> usize {
    768
}
fn d_layers() -> usize {
    12
}
fn d_heads() -> usize {
    12
}
fn d_intermediate() -> usize {
    3072
}
fn d_act() -> String {
    "gelu".into()
}
fn d_dropout() -> f64 {
    0.1
}
fn d_positions() -> usize {
    512
}
fn d_type_vocab() -> usize {
    2
}
fn d_init() -> f64 {
    0.02
}
fn d_eps() -> f64 {
    1e-12
}
fn d_position_type() -> String {
    "absolute".into()
}
fn d_model_type() -> String {
    "bert".into()
}
fn d_pad() -> Option<i64> {
    Some(0)
}

/// The activations `hidden_act` may name.
pub const SUPPORTED_ACTIVATIONS: [&str; 5] =
    ["gelu", "relu", "gelu_new", "gelu_pytorch_tanh", "silu"];

/// HF `BertConfig` (and `RobertaConfig`: the same fields, told apart by `model_type`).
///
/// Field names and defaults are those of `transformers`; `num_labels` is derived from
/// `id2label` as HF does. Every other field of the file is kept in `extra`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    /// `model_type`: `bert` or `roberta`.
    #[serde(default = "d_model_type")]
    pub model_type: String,
    /// `architectures`, e.g. `["BertForSequenceClassification"]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    /// Size of the token vocabulary (BERT 30522, RoBERTa 50265).
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    /// Width of the hidden states.
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    /// Number of encoder layers.
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    #[serde(default = "d_intermediate")]
    pub intermediate_size: usize,
    /// Activation of the feed-forward layer (`gelu` is the exact, erf-based GELU).
    #[serde(default = "d_act")]
    pub hidden_act: String,
    /// Dropout on hidden states (training only).
    #[serde(default = "d_dropout")]
    pub hidden_dropout_prob: f64,
    /// Dropout on attention probabilities (training only).
    #[serde(default = "d_dropout")]
    pub attention_probs_dropout_prob: f64,
    /// Dropout before a classification head; `None` means `hidden_dropout_prob`.
    #[serde(default)]
    pub classifier_dropout: Option<f64>,
    /// Longest sequence the position embeddings cover (RoBERTa: 2 more than usable).
    #[serde(default = "d_positions")]
    pub max_position_embeddings: usize,
    /// Number of segment (token type) ids.
    #[serde(default = "d_type_vocab")]
    pub type_vocab_size: usize,
    /// Standard deviation of the normal initialisation.
    #[serde(default = "d_init")]
    pub initializer_range: f64,
    /// LayerNorm epsilon (BERT: 1e-12).
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    /// Padding token id (BERT 0, RoBERTa 1); RoBERTa numbers positions after it.
    #[serde(default = "d_pad")]
    pub pad_token_id: Option<i64>,
    /// Position embedding type; only `absolute` is supported.
    #[serde(default = "d_position_type")]
    pub position_embedding_type: String,
    /// Label names by class index; its length is `num_labels`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id2label: Option<BTreeMap<usize, String>>,
    /// Class index by label name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label2id: Option<BTreeMap<String, usize>>,
    /// `regression`, `single_label_classification` or `multi_label_classification`; `None`
    /// lets the sequence classifier choose from `num_labels` and the labels' type, as HF does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem_type: Option<String>,
    /// Return every layer's attention probabilities.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub output_attentions: bool,
    /// Return the embeddings' and every layer's hidden states.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub output_hidden_states: bool,
    /// Every other field of the file, kept as read.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `RobertaConfig` is [`BertConfig`] with `model_type: "roberta"` (see [`BertConfig::roberta`]).
pub type RobertaConfig = BertConfig;

impl Default for BertConfig {
    fn default() -> Self {
        serde_json::from_value(Value::Object(Map::new())).expect("every field has a default")
    }
}

impl BertConfig {
    /// HF's `RobertaConfig()` defaults: vocabulary 50265, `pad_token_id` 1, `bos` 0, `eos` 2.
    pub fn roberta() -> Self {
        Self::from_json_value(
            Value::Object(Map::from_iter([("model_type".into(), "roberta".into())])),
            Path::new("<RobertaConfig>"),
        )
        .expect("defaults are valid")
    }

    /// Reads and checks `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_json_value(read_json(path)?, path)
    }

    /// Builds a config from parsed JSON; `path` names the source in errors.
    pub fn from_json_value(mut value: Value, path: &Path) -> Result<Self> {
        let bad = |message: String| ModelError::Config {
            path: path.to_owned(),
            message,
        };
        let object = value
            .as_object_mut()
            .ok_or_else(|| bad("the config is not a JSON object".into()))?;
        if object.get("model_type").and_then(Value::as_str) == Some("roberta") {
            for (field, default) in [
                ("vocab_size", 50265),
                ("pad_token_id", 1),
                ("bos_token_id", 0),
                ("eos_token_id", 2),
            ] {
                object.entry(field).or_insert(default.into());
            }
        }
        let mut config: Self = serde_json::from_value(value.clone())
            .map_err(|e| bad(name_bad_field::<Self>(&value, e)))?;
        if config.id2label.is_none() {
            // Old configs carry `num_labels` instead of the label maps.
            if let Some(n) = config.extra.remove("num_labels") {
                let n = n
                    .as_u64()
                    .ok_or_else(|| bad(format!("num_labels `{n}` is not a count")))?;
                config.set_num_labels(n as usize);
            }
        }
        config.validate().map_err(bad)?;
        Ok(config)
    }

    /// Checks the values a model cannot be built from.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !matches!(self.model_type.as_str(), "bert" | "roberta") {
            return Err(format!(
                "model_type `{}` is not a BERT-family model (bert, roberta)",
                self.model_type
            ));
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ] {
            if value == 0 {
                return Err(format!("{field} is 0"));
            }
        }
        if self.position_embedding_type != "absolute" {
            return Err(format!(
                "position_embedding_type `{}` is not supported (absolute is)",
                self.position_embedding_type
            ));
        }
        if !SUPPORTED_ACTIVATIONS.contains(&self.hidden_act.as_str()) {
            return Err(format!(
                "hidden_act `{}` is not supported ({})",
                self.hidden_act,
                SUPPORTED_ACTIVATIONS.join(", ")
            ));
        }
        for (field, p) in [
            ("hidden_dropout_prob", Some(self.hidden_dropout_prob)),
            (
                "attention_probs_dropout_prob",
                Some(self.attention_probs_dropout_prob),
            ),
            ("classifier_dropout", self.classifier_dropout),
        ] {
            if let Some(p) = p {
                if !(0.0..1.0).contains(&p) {
                    return Err(format!("{field} {p} is outside [0, 1)"));
                }
            }
        }
        if let Some(kind) = &self.problem_type {
            if !matches!(
                kind.as_str(),
                "regression" | "single_label_classification" | "multi_label_classification"
            ) {
                return Err(format!(
                    "problem_type `{kind}` is not regression, single_label_classification or multi_label_classification"
                ));
            }
        }
        if let Some(map) = &self.id2label {
            if map.keys().copied().ne(0..map.len()) {
                return Err("id2label keys are not 0..num_labels".into());
            }
        }
        if let Some(pad) = self.pad_token_id {
            if pad < 0 || pad as usize >= self.vocab_size {
                return Err(format!(
                    "pad_token_id {pad} is outside the vocabulary of {}",
                    self.vocab_size
                ));
            }
        }
        if self.model_type == "roberta" && self.pad_token_id.is_none() {
            return Err(
                "a roberta config needs pad_token_id (positions are numbered after it)".into(),
            );
        }
        Ok(())
    }

    /// Number of labels of a classification head: `len(id2label)`, 2 when absent (HF's default).
    pub fn num_labels(&self) -> usize {
        self.id2label.as_ref().map_or(2, BTreeMap::len)
    }

    /// Sets `num_labels` as HF's `num_labels=` keyword does: generic `LABEL_i` names, unless the
    /// current labels already number `n`.
    pub fn set_num_labels(&mut self, n: usize) {
        if self.id2label.as_ref().is_some_and(|m| m.len() == n) {
            return;
        }
        let id2label: BTreeMap<usize, String> = (0..n).map(|i| (i, format!("LABEL_{i}"))).collect();
        self.label2id = Some(id2label.iter().map(|(i, l)| (l.clone(), *i)).collect());
        self.id2label = Some(id2label);
    }

    /// Sets the label names (and `label2id` to match).
    pub fn set_labels<S: Into<String>>(&mut self, labels: impl IntoIterator<Item = S>) {
        let id2label: BTreeMap<usize, String> = labels
            .into_iter()
            .enumerate()
            .map(|(i, l)| (i, l.into()))
            .collect();
        self.label2id = Some(id2label.iter().map(|(i, l)| (l.clone(), *i)).collect());
        self.id2label = Some(id2label);
    }

    /// Dropout before a classification head (`classifier_dropout`, else `hidden_dropout_prob`).
    pub fn classifier_dropout_prob(&self) -> f64 {
        self.classifier_dropout.unwrap_or(self.hidden_dropout_prob)
    }

    /// Whether this is a RoBERTa config (positions numbered after the padding id).
    pub fn is_roberta(&self) -> bool {
        self.model_type == "roberta"
    }

    /// The key prefix of the base model inside a head model: `bert` or `roberta`.
    pub fn base_model_prefix(&self) -> &'static str {
        if self.is_roberta() {
            "roberta"
        } else {
            "bert"
        }
    }

    /// Class name prefix for `architectures`: `Bert` or `Roberta`.
    pub fn class_prefix(&self) -> &'static str {
        if self.is_roberta() {
            "Roberta"
        } else {
            "Bert"
        }
    }

    /// The config as HF writes `config.json`.
    pub fn to_json_string(&self) -> String {
        serde_json::to_string_pretty(self).expect("a config always serializes")
    }
}

/// Reads a JSON file (`config.json`, `generation_config.json`).
pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| ModelError::Config {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// `Default` (every field at HF's default), `from_file` and `from_json_value` for a causal LM
/// config whose `validate` method checks it; `$aliases` maps other spellings of fields to
/// this config's names.
macro_rules! config_io {
    ($config:ident, $aliases:expr) => {
        impl Default for $config {
            fn default() -> Self {
                serde_json::from_value(Value::Object(Map::new()))
                    .expect("every field has a default")
            }
        }

        impl $config {
            /// Reads and checks `config.json`.
            pub fn from_file(path: &Path) -> Result<Self> {
                Self::from_json_value(crate::config::read_json(path)?, path)
            }

            /// Builds a config from parsed JSON, reading other spellings of fields (see
            /// the aliases above the struct); `path` names the source in errors.
            pub fn from_json_value(value: Value, path: &Path) -> Result<Self> {
                crate::config::parse_config(value, path, $aliases, Self::validate)
            }
        }
    };
}
pub(crate) use config_io;

/// Parses a config object: renames the `aliases` (old name → field), deserializes with the
/// failing field named, and checks it with `validate`; every error names `path`.
pub(crate) fn parse_config<T: serde::de::DeserializeOwned>(
    mut value: Value,
    path: &Path,
    aliases: &[(&str, &str)],
    validate: impl Fn(&T) -> std::result::Result<(), String>,
) -> Result<T> {
    let bad = |message: String| ModelError::Config {
        path: path.to_owned(),
        message,
    };
    let Some(object) = value.as_object_mut() else {
        return Err(bad("the config is not a JSON object".into()));
    };
    for (alias, field) in aliases {
        if let Some(v) = object.remove(*alias) {
            object.insert((*field).to_owned(), v);
        }
    }
    let config: T =
        serde_json::from_value(value.clone()).map_err(|e| bad(name_bad_field::<T>(&value, e)))?;
    validate(&config).map_err(bad)?;
    Ok(config)
}

/// serde's message for a flattened struct does not name the field; find it by reading each
/// field alone.
pub(crate) fn name_bad_field<T: serde::de::DeserializeOwned>(
    value: &Value,
    error: serde_json::Error,
) -> String {
    let fields = value.as_object().into_iter().flatten();
    for (key, field) in fields {
        let alone = Value::Object(Map::from_iter([(key.clone(), field.clone())]));
        if let Err(e) = serde_json::from_value::<T>(alone) {
            return format!("field `{key}`: {e}");
        }
    }
    error.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_hf_defaults() {
        let bert = BertConfig::default();
        assert_eq!(
            (
                bert.vocab_size,
                bert.hidden_size,
                bert.layer_norm_eps,
                bert.pad_token_id
            ),
            (30522, 768, 1e-12, Some(0))
        );
        assert_eq!(bert.num_labels(), 2);
        let roberta = BertConfig::roberta();
        assert_eq!((roberta.vocab_size, roberta.pad_token_id), (50265, Some(1)));
        assert_eq!(roberta.extra["eos_token_id"], 2);
    }

    #[test]
    fn labels_unknown_fields_and_errors() {
        let path = Path::new("config.json");
        let json = serde_json::json!({"id2label": {"0": "NEG", "1": "POS", "2": "MIX"}, "custom_field": [1, 2]});
        let c = BertConfig::from_json_value(json, path).unwrap();
        assert_eq!(c.num_labels(), 3);
        assert_eq!(c.extra["custom_field"], serde_json::json!([1, 2]));
        let back: Value = serde_json::from_str(&c.to_json_string()).unwrap();
        assert_eq!(back["id2label"]["2"], "MIX");
        assert_eq!(back["custom_field"], serde_json::json!([1, 2]));

        let c = BertConfig::from_json_value(serde_json::json!({"num_labels": 4}), path).unwrap();
        assert_eq!(c.id2label.unwrap()[&3], "LABEL_3");

        for (json, needle) in [
            (
                serde_json::json!({"hidden_size": 100}),
                "num_attention_heads",
            ),
            (serde_json::json!({"hidden_act": "mish"}), "mish"),
            (serde_json::json!({"model_type": "llama"}), "llama"),
            (serde_json::json!({"problem_type": "ranking"}), "ranking"),
            (serde_json::json!({"vocab_size": "big"}), "vocab_size"),
        ] {
            let err = BertConfig::from_json_value(json, path)
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle) && err.contains("config.json"), "{err}");
        }
    }
}
