//! `LoraConfig`, `IA3Config`, the prompt-learning configs and `adapter_config.json`, with
//! peft 0.21's field names and defaults. Fields Ember does not use are kept and written back, so a file from Python
//! survives a round trip through Ember unchanged.

use crate::error::{config_error, PeftError, Result};
pub use crate::prompt_config::{
    EncoderReparameterization, PrefixTuningConfig, PromptDims, PromptEncoderConfig,
    PromptLearningFields, PromptTuningConfig, PromptTuningInit,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// peft's `TaskType`: which head the adapted model has, so which modules peft adds to
/// `modules_to_save` (the classifier of `SEQ_CLS` / `TOKEN_CLS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskType {
    /// Sequence classification.
    #[serde(rename = "SEQ_CLS")]
    SeqCls,
    /// Causal language modelling.
    #[serde(rename = "CAUSAL_LM")]
    CausalLm,
    /// Token classification.
    #[serde(rename = "TOKEN_CLS")]
    TokenCls,
    /// Question answering.
    #[serde(rename = "QUESTION_ANS")]
    QuestionAns,
    /// Sequence-to-sequence language modelling (no Ember model has this head yet).
    #[serde(rename = "SEQ_2_SEQ_LM")]
    Seq2SeqLm,
    /// Hidden states only.
    #[serde(rename = "FEATURE_EXTRACTION")]
    FeatureExtraction,
}

impl TaskType {
    /// Parses peft's spelling (`SEQ_CLS`, ...), naming the value when it is unknown.
    pub fn parse(name: &str) -> Result<Self> {
        serde_json::from_value(Value::String(name.to_owned())).map_err(|_| {
            config_error(
                "task_type",
                format!("unknown task type `{name}` (SEQ_CLS, CAUSAL_LM, TOKEN_CLS, QUESTION_ANS, SEQ_2_SEQ_LM, FEATURE_EXTRACTION)"),
            )
        })
    }
}

/// `target_modules` / `exclude_modules`: a list (an entry matches a module whose full name is
/// the entry or ends with `.` + the entry) or a string (a regular expression that must match
/// the whole name, as Python's `re.fullmatch`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// A regular expression over the full module name.
    Regex(String),
    /// Names or name suffixes.
    Names(Vec<String>),
}

impl TargetModules {
    /// A list of names.
    pub fn names<S: Into<String>>(names: impl IntoIterator<Item = S>) -> Self {
        Self::Names(names.into_iter().map(Into::into).collect())
    }

    /// As peft prints it in its error messages: `{'q_proj', 'v_proj'}` or the pattern.
    pub fn display(&self) -> String {
        match self {
            Self::Regex(r) => r.clone(),
            Self::Names(n) => {
                let quoted: Vec<String> = n.iter().map(|s| format!("'{s}'")).collect();
                format!("{{{}}}", quoted.join(", "))
            }
        }
    }
}

/// `init_lora_weights`: `true` (A Kaiming-uniform, B zeros: the adapter starts as the
/// identity), `"gaussian"` (A normal with std 1/r, B zeros) or `false` (both random: for
/// tests, the adapter changes the outputs from the start).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InitLoraWeights {
    /// `true` or `false`.
    Bool(bool),
    /// A named scheme; Ember knows `"gaussian"`.
    Named(String),
}

impl Default for InitLoraWeights {
    fn default() -> Self {
        Self::Bool(true)
    }
}

/// An integer or a list of integers (`layers_to_transform`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    /// One value.
    One(T),
    /// Several.
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    /// The values as a list.
    pub fn to_vec(&self) -> Vec<T> {
        match self {
            Self::One(v) => vec![v.clone()],
            Self::Many(v) => v.clone(),
        }
    }
}

/// `bias`: which biases are trained and saved with the adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bias {
    /// No bias is trained.
    #[default]
    None,
    /// Every bias of the model (LayerNorm biases included), as peft does.
    All,
    /// The biases of the layers that carry LoRA.
    LoraOnly,
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn lora_type() -> String {
    "LORA".into()
}
fn ia3_type() -> String {
    "IA3".into()
}

/// peft's `LoraConfig` (the fields of its `adapter_config.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Always `"LORA"`.
    #[serde(default = "lora_type")]
    pub peft_type: String,
    /// The task (decides the head added to `modules_to_save`); `None` for a bare module.
    #[serde(default)]
    pub task_type: Option<TaskType>,
    /// The base model's folder or hub id, recorded for the reader.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// The rank (8).
    #[serde(default = "default_r")]
    pub r: usize,
    /// The modules that get LoRA; `None`: peft's default for the architecture.
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// Modules never adapted, matched as `target_modules`.
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    /// The scaling numerator: the update is `alpha / r · B A` (8).
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    /// Dropout on the adapter's input during training (0).
    #[serde(default)]
    pub lora_dropout: f64,
    /// The base weight is stored `[in, out]` (GPT-2's `Conv1D`); only merging reads it.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Which biases are trained (`none`).
    #[serde(default)]
    pub bias: Bias,
    /// Scaling `alpha / sqrt(r)` instead of `alpha / r` (rank-stabilised LoRA).
    #[serde(default)]
    pub use_rslora: bool,
    /// Modules trained in full and saved with the adapter (a copy per adapter).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// How A and B start.
    #[serde(default)]
    pub init_lora_weights: InitLoraWeights,
    /// Only layers with these indices are adapted.
    #[serde(default)]
    pub layers_to_transform: Option<OneOrMany<usize>>,
    /// The name of the layer list (`layers`, `h`, `layer`) whose index `layers_to_transform`
    /// reads; `None`: the number after any `name.`.
    #[serde(default)]
    pub layers_pattern: Option<OneOrMany<String>>,
    /// Ranks other than `r`, by module name pattern.
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Alphas other than `lora_alpha`, by module name pattern.
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Whether the adapter is loaded for inference only (its weights frozen).
    #[serde(default)]
    pub inference_mode: bool,
    /// Every other field of the file, written back unchanged.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            peft_type: lora_type(),
            task_type: None,
            base_model_name_or_path: None,
            r: 8,
            target_modules: None,
            exclude_modules: None,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            fan_in_fan_out: false,
            bias: Bias::None,
            use_rslora: false,
            modules_to_save: None,
            init_lora_weights: InitLoraWeights::Bool(true),
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            inference_mode: false,
            extra: Map::new(),
        }
    }
}

impl LoraConfig {
    /// peft's defaults with these target modules.
    pub fn new(target_modules: TargetModules) -> Self {
        Self {
            target_modules: Some(target_modules),
            ..Self::default()
        }
    }

    /// Checks the values peft checks, and refuses the options Ember does not implement rather
    /// than ignoring them.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(config_error(
                "r",
                "`r` should be a positive integer value but the value passed is 0",
            ));
        }
        if let Some((k, _)) = self.rank_pattern.iter().find(|(_, r)| **r == 0) {
            return Err(config_error(
                "rank_pattern",
                format!("rank 0 for `{k}`: ranks must be positive"),
            ));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(config_error(
                "lora_dropout",
                format!("{} is not a probability below 1", self.lora_dropout),
            ));
        }
        if let InitLoraWeights::Named(name) = &self.init_lora_weights {
            if name != "gaussian" {
                return Err(config_error(
                    "init_lora_weights",
                    format!("`{name}`: Ember initialises with true, false or \"gaussian\""),
                ));
            }
        }
        if self.layers_pattern.is_some() && self.layers_to_transform.is_none() {
            return Err(config_error(
                "layers_pattern",
                "When `layers_pattern` is specified, `layers_to_transform` must also be specified.",
            ));
        }
        if matches!(self.target_modules, Some(TargetModules::Regex(_)))
            && self.layers_to_transform.is_some()
        {
            return Err(config_error(
                "layers_to_transform",
                "`layers_to_transform` cannot be used when `target_modules` is a str.",
            ));
        }
        for field in ["use_dora", "lora_bias"] {
            if self
                .extra
                .get(field)
                .is_some_and(|v| v == &Value::Bool(true))
            {
                return Err(config_error(field, "not supported by Ember"));
            }
        }
        if self
            .extra
            .get("target_parameters")
            .is_some_and(|v| v.as_array().is_some_and(|a| !a.is_empty()))
        {
            return Err(config_error("target_parameters", "not supported by Ember"));
        }
        Ok(())
    }

    /// The rank and alpha of the module `path` (`rank_pattern` / `alpha_pattern` first).
    pub fn rank_and_alpha(&self, path: &str) -> (usize, f64) {
        let r = crate::matching::pattern_value(&self.rank_pattern, path).unwrap_or(self.r);
        let alpha =
            crate::matching::pattern_value(&self.alpha_pattern, path).unwrap_or(self.lora_alpha);
        (r, alpha)
    }

    /// The factor of the update: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scaling(&self, r: usize, alpha: f64) -> f64 {
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }
}

/// peft's `IA3Config`: learned vectors that scale activations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IA3Config {
    /// Always `"IA3"`.
    #[serde(default = "ia3_type")]
    pub peft_type: String,
    /// The task (decides the head added to `modules_to_save`).
    #[serde(default)]
    pub task_type: Option<TaskType>,
    /// The base model's folder or hub id, recorded for the reader.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// The modules that get a vector; `None`: peft's default for the architecture.
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// Modules never adapted.
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    /// Target modules whose *input* is scaled (the second feed-forward layer); the others'
    /// outputs are scaled. `None`: peft's default for the architecture.
    #[serde(default)]
    pub feedforward_modules: Option<TargetModules>,
    /// The base weight is stored `[in, out]` (GPT-2's `Conv1D`).
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Modules trained in full and saved with the adapter.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Vectors start at one (true) or random (false).
    #[serde(default = "yes")]
    pub init_ia3_weights: bool,
    /// Whether the adapter is loaded for inference only.
    #[serde(default)]
    pub inference_mode: bool,
    /// Every other field of the file, written back unchanged.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn yes() -> bool {
    true
}

impl Default for IA3Config {
    fn default() -> Self {
        Self {
            peft_type: ia3_type(),
            task_type: None,
            base_model_name_or_path: None,
            target_modules: None,
            exclude_modules: None,
            feedforward_modules: None,
            fan_in_fan_out: false,
            modules_to_save: None,
            init_ia3_weights: true,
            inference_mode: false,
            extra: Map::new(),
        }
    }
}

/// One adapter's configuration, as `adapter_config.json` holds it.
#[derive(Debug, Clone, PartialEq)]
pub enum PeftConfig {
    /// `peft_type: "LORA"`.
    Lora(LoraConfig),
    /// `peft_type: "IA3"`.
    Ia3(IA3Config),
    /// `peft_type: "PROMPT_TUNING"`.
    PromptTuning(PromptTuningConfig),
    /// `peft_type: "P_TUNING"`.
    PTuning(PromptEncoderConfig),
    /// `peft_type: "PREFIX_TUNING"`.
    PrefixTuning(PrefixTuningConfig),
}

impl From<PromptTuningConfig> for PeftConfig {
    fn from(c: PromptTuningConfig) -> Self {
        Self::PromptTuning(c)
    }
}

impl From<PromptEncoderConfig> for PeftConfig {
    fn from(c: PromptEncoderConfig) -> Self {
        Self::PTuning(c)
    }
}

impl From<PrefixTuningConfig> for PeftConfig {
    fn from(c: PrefixTuningConfig) -> Self {
        Self::PrefixTuning(c)
    }
}

impl From<LoraConfig> for PeftConfig {
    fn from(c: LoraConfig) -> Self {
        Self::Lora(c)
    }
}

impl From<IA3Config> for PeftConfig {
    fn from(c: IA3Config) -> Self {
        Self::Ia3(c)
    }
}

impl PeftConfig {
    /// Parses an `adapter_config.json` value by its `peft_type`.
    pub fn from_value(value: Value) -> Result<Self> {
        let kind = value
            .get("peft_type")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                config_error(
                    "peft_type",
                    "missing (LORA, IA3, PROMPT_TUNING, P_TUNING or PREFIX_TUNING)",
                )
            })?
            .to_owned();
        if let Some(task) = value.get("task_type").and_then(Value::as_str) {
            TaskType::parse(task)?;
        }
        let parse_err = |e: serde_json::Error| config_error(&kind, e.to_string());
        let config = match kind.as_str() {
            "LORA" => Self::Lora(serde_json::from_value(value).map_err(parse_err)?),
            "IA3" => Self::Ia3(serde_json::from_value(value).map_err(parse_err)?),
            "PROMPT_TUNING" => Self::PromptTuning(serde_json::from_value(value).map_err(parse_err)?),
            "P_TUNING" => Self::PTuning(serde_json::from_value(value).map_err(parse_err)?),
            "PREFIX_TUNING" => Self::PrefixTuning(serde_json::from_value(value).map_err(parse_err)?),
            other => {
                return Err(config_error(
                    "peft_type",
                    format!("unknown peft type `{other}`; Ember reads LORA, IA3, PROMPT_TUNING, P_TUNING and PREFIX_TUNING"),
                ))
            }
        };
        config.validate()?;
        Ok(config)
    }

    /// Reads `dir/adapter_config.json` (or a JSON / TOML file with the same fields).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| PeftError::Io {
            path: path.to_owned(),
            source,
        })?;
        let format = |message: String| PeftError::Format {
            path: path.to_owned(),
            message,
        };
        let value: Value = if path.extension().is_some_and(|e| e == "toml") {
            let t: toml_like::Table = toml_like::parse(&text).map_err(format)?;
            t
        } else {
            serde_json::from_str(&text).map_err(|e| format(e.to_string()))?
        };
        Self::from_value(value).map_err(|e| match e {
            PeftError::Config { field, message } => PeftError::Config {
                field: format!("{}: {field}", path.display()),
                message,
            },
            e => e,
        })
    }

    /// Reads the `adapter_config.json` of an adapter folder.
    pub fn from_pretrained(dir: &Path) -> Result<Self> {
        let path = dir.join(crate::io::CONFIG_NAME);
        if !path.is_file() {
            return Err(PeftError::Format {
                path: dir.to_owned(),
                message: format!("no {} in this folder", crate::io::CONFIG_NAME),
            });
        }
        Self::from_file(&path)
    }

    /// The JSON that `adapter_config.json` holds.
    pub fn to_value(&self) -> Value {
        match self {
            Self::Lora(c) => serde_json::to_value(c),
            Self::Ia3(c) => serde_json::to_value(c),
            Self::PromptTuning(c) => serde_json::to_value(c),
            Self::PTuning(c) => serde_json::to_value(c),
            Self::PrefixTuning(c) => serde_json::to_value(c),
        }
        .expect("a config always serializes")
    }

    /// Checks the values.
    pub fn validate(&self) -> Result<()> {
        match self {
            Self::Lora(c) => c.validate(),
            Self::Ia3(_) => Ok(()),
            Self::PromptTuning(c) => c.validate(),
            Self::PTuning(c) => c.validate(),
            Self::PrefixTuning(c) => c.validate(),
        }
    }

    /// `peft_type`.
    pub fn peft_type(&self) -> &str {
        match self {
            Self::Lora(_) => "LORA",
            Self::Ia3(_) => "IA3",
            Self::PromptTuning(_) => "PROMPT_TUNING",
            Self::PTuning(_) => "P_TUNING",
            Self::PrefixTuning(_) => "PREFIX_TUNING",
        }
    }

    /// `task_type`.
    pub fn task_type(&self) -> Option<TaskType> {
        match self {
            Self::Lora(c) => c.task_type,
            Self::Ia3(c) => c.task_type,
            _ => self.prompt_fields().and_then(|p| p.task_type),
        }
    }

    /// `target_modules` as configured.
    pub fn target_modules(&self) -> Option<&TargetModules> {
        match self {
            Self::Lora(c) => c.target_modules.as_ref(),
            Self::Ia3(c) => c.target_modules.as_ref(),
            _ => None,
        }
    }

    /// `exclude_modules`.
    pub fn exclude_modules(&self) -> Option<&TargetModules> {
        match self {
            Self::Lora(c) => c.exclude_modules.as_ref(),
            Self::Ia3(c) => c.exclude_modules.as_ref(),
            _ => None,
        }
    }

    /// `modules_to_save` as configured.
    pub fn modules_to_save(&self) -> Option<&Vec<String>> {
        match self {
            Self::Lora(c) => c.modules_to_save.as_ref(),
            Self::Ia3(c) => c.modules_to_save.as_ref(),
            _ => self
                .prompt_fields()
                .and_then(|p| p.modules_to_save.as_ref()),
        }
    }

    /// `inference_mode`.
    pub fn inference_mode(&self) -> bool {
        match self {
            Self::Lora(c) => c.inference_mode,
            Self::Ia3(c) => c.inference_mode,
            _ => self.prompt_fields().is_some_and(|p| p.inference_mode),
        }
    }

    pub(crate) fn set_inference_mode(&mut self, on: bool) {
        match self {
            Self::Lora(c) => c.inference_mode = on,
            Self::Ia3(c) => c.inference_mode = on,
            _ => {
                if let Some(p) = self.prompt_fields_mut() {
                    p.inference_mode = on;
                }
            }
        }
    }

    pub(crate) fn set_modules_to_save(&mut self, modules: Option<Vec<String>>) {
        match self {
            Self::Lora(c) => c.modules_to_save = modules,
            Self::Ia3(c) => c.modules_to_save = modules,
            _ => {
                if let Some(p) = self.prompt_fields_mut() {
                    p.modules_to_save = modules;
                }
            }
        }
    }

    pub(crate) fn fill_defaults(&mut self, model_type: &str) -> Result<()> {
        let defaults = crate::matching::defaults(model_type);
        let missing = || {
            config_error(
                "target_modules",
                format!("Please specify `target_modules` in `peft_config` (no default for model type `{model_type}`)"),
            )
        };
        match self {
            Self::Lora(c) => {
                if c.target_modules.is_none() {
                    let d = defaults.ok_or_else(missing)?;
                    c.target_modules = Some(TargetModules::names(d.lora.iter().copied()));
                }
            }
            Self::Ia3(c) => {
                if c.target_modules.is_none() {
                    let d = defaults.ok_or_else(missing)?;
                    c.target_modules = Some(TargetModules::names(d.ia3.iter().copied()));
                }
                if c.feedforward_modules.is_none() {
                    let d = defaults.ok_or_else(missing)?;
                    c.feedforward_modules =
                        Some(TargetModules::names(d.ia3_feedforward.iter().copied()));
                }
            }
            Self::PromptTuning(_) | Self::PTuning(_) | Self::PrefixTuning(_) => {}
        }
        Ok(())
    }

    /// Whether this is a prompt-learning method (prompt tuning, P-tuning, prefix tuning):
    /// its parameters sit before the model, not in its layers.
    pub fn is_prompt_learning(&self) -> bool {
        self.prompt_fields().is_some()
    }

    /// The shared prompt-learning fields, for a prompt-learning method.
    pub fn prompt_fields(&self) -> Option<&PromptLearningFields> {
        match self {
            Self::PromptTuning(c) => Some(&c.prompt),
            Self::PTuning(c) => Some(&c.prompt),
            Self::PrefixTuning(c) => Some(&c.prompt),
            Self::Lora(_) | Self::Ia3(_) => None,
        }
    }

    fn prompt_fields_mut(&mut self) -> Option<&mut PromptLearningFields> {
        match self {
            Self::PromptTuning(c) => Some(&mut c.prompt),
            Self::PTuning(c) => Some(&mut c.prompt),
            Self::PrefixTuning(c) => Some(&mut c.prompt),
            Self::Lora(_) | Self::Ia3(_) => None,
        }
    }

    /// Fills what peft infers from the model for prompt learning (the sizes, and
    /// `encoder_hidden_size` = `token_dim`), and checks that the model serves the task.
    pub(crate) fn fill_prompt(&mut self, dims: &PromptDims) -> Result<()> {
        let prefix = matches!(self, Self::PrefixTuning(_));
        let Some(fields) = self.prompt_fields_mut() else {
            return Ok(());
        };
        if let Some(task) = fields.task_type {
            if !dims.task_types.contains(&task) {
                return Err(config_error(
                    "task_type",
                    format!(
                        "{task:?} does not fit this model, whose head serves {:?}",
                        dims.task_types
                    ),
                ));
            }
        }
        fields.fill(dims, prefix);
        let token_dim = fields.token_dim.unwrap_or(dims.hidden_size);
        let heads = fields.num_attention_heads.unwrap_or(1);
        if prefix && token_dim % heads != 0 {
            return Err(config_error(
                "token_dim",
                format!("{token_dim} is not a multiple of num_attention_heads {heads}"),
            ));
        }
        match self {
            Self::PTuning(c) => {
                c.encoder_hidden_size.get_or_insert(token_dim);
            }
            Self::PrefixTuning(c) => {
                c.encoder_hidden_size.get_or_insert(token_dim);
            }
            _ => {}
        }
        Ok(())
    }
}

/// TOML read into JSON values (the same fields as `adapter_config.json`).
mod toml_like {
    pub type Table = serde_json::Value;

    pub fn parse(text: &str) -> Result<Table, String> {
        let value: toml::Value = toml::from_str(text).map_err(|e| e.to_string())?;
        serde_json::to_value(value).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_peft_s() {
        let c: LoraConfig = serde_json::from_str(r#"{"peft_type": "LORA"}"#).unwrap();
        assert_eq!((c.r, c.lora_alpha, c.lora_dropout), (8, 8.0, 0.0));
        assert_eq!(c.bias, Bias::None);
        assert_eq!(c.init_lora_weights, InitLoraWeights::Bool(true));
        assert_eq!(c, LoraConfig::default());
    }

    #[test]
    fn unknown_fields_survive_a_round_trip() {
        let text = r#"{"peft_type": "LORA", "r": 4, "target_modules": ["q", "v"], "megatron_core": "megatron.core", "use_dora": false}"#;
        let c = PeftConfig::from_value(serde_json::from_str(text).unwrap()).unwrap();
        let back = c.to_value();
        assert_eq!(back["megatron_core"], "megatron.core");
        assert_eq!(back["use_dora"], false);
        assert_eq!(back["r"], 4);
    }

    #[test]
    fn bad_values_name_the_field() {
        let err = |text: &str| {
            PeftConfig::from_value(serde_json::from_str(text).unwrap())
                .unwrap_err()
                .to_string()
        };
        assert!(err(r#"{"peft_type": "LORA", "r": 0}"#).contains("`r` should be a positive"));
        assert!(err(r#"{"peft_type": "LOHA"}"#).contains("unknown peft type `LOHA`"));
        assert!(err(r#"{"peft_type": "LORA", "task_type": "SEQCLS"}"#)
            .contains("unknown task type `SEQCLS`"));
        assert!(err(r#"{"peft_type": "LORA", "use_dora": true}"#).contains("use_dora"));
        assert!(err(r#"{"task_type": "SEQ_CLS"}"#).contains("peft_type"));
    }

    #[test]
    fn scaling_follows_rslora() {
        let mut c = LoraConfig::default();
        assert_eq!(c.scaling(4, 8.0), 2.0);
        c.use_rslora = true;
        assert_eq!(c.scaling(4, 8.0), 4.0);
    }
}
