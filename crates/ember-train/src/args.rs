//! HF `transformers.TrainingArguments` (transformers 5.24): the fields the Ember trainer reads,
//! under their Hugging Face names and with their Hugging Face defaults.
//!
//! Arguments load from JSON or TOML. Fields Ember does not use (`report_to`, `optim`, …)
//! are kept in [`TrainingArguments::extra`] and written back unchanged, so a file from a Python
//! run survives a round trip through Ember.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use crate::error::{Result, TrainError};

/// The learning-rate schedule, HF's `lr_scheduler_type` (the subset Ember implements).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerType {
    /// `"linear"`: linear warmup, then linear decay to 0 (HF's default).
    #[default]
    Linear,
    /// `"cosine"`: linear warmup, then half a cosine wave down to 0.
    Cosine,
    /// `"constant"`: the learning rate throughout, warmup ignored.
    Constant,
    /// `"constant_with_warmup"`: linear warmup, then constant.
    ConstantWithWarmup,
}

impl SchedulerType {
    /// The HF spelling: `"linear"`, `"cosine"`, `"constant"`, `"constant_with_warmup"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Linear => "linear",
            Self::Cosine => "cosine",
            Self::Constant => "constant",
            Self::ConstantWithWarmup => "constant_with_warmup",
        }
    }
}

impl fmt::Display for SchedulerType {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// When to log, evaluate or save: HF's `IntervalStrategy` (`"no"`, `"steps"`, `"epoch"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IntervalStrategy {
    /// `"no"`: never.
    No,
    /// `"steps"`: every `*_steps` optimizer steps.
    Steps,
    /// `"epoch"`: at the end of every epoch.
    Epoch,
}

impl IntervalStrategy {
    /// The HF spelling: `"no"`, `"steps"` or `"epoch"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::No => "no",
            Self::Steps => "steps",
            Self::Epoch => "epoch",
        }
    }
}

impl fmt::Display for IntervalStrategy {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// HF `TrainingArguments`: field names and defaults as in transformers 5.24.
///
/// Every field may be left out of a file; it then takes HF's default. A `null` for a field
/// that is not an `Option` also means the default, because HF writes `null` for its
/// `None`-defaulted fields (`output_dir`, `warmup_ratio`, `disable_tqdm`, …).
///
/// Build one with [`TrainingArguments::new`] and set the public fields, or load one with
/// [`from_file`](Self::from_file), [`from_json_str`](Self::from_json_str) or
/// [`from_toml_str`](Self::from_toml_str), which also [`validate`](Self::validate).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainingArguments {
    /// Where checkpoints and the final model go. HF 5 default: `"trainer_output"` (HF 4
    /// required it; an empty path is refused by [`validate`](Self::validate)).
    pub output_dir: PathBuf,
    /// Whether to write into a non-empty `output_dir`. HF default: `false`.
    pub overwrite_output_dir: bool,
    /// Training examples per batch on one device. HF default: 8.
    pub per_device_train_batch_size: usize,
    /// Evaluation examples per batch on one device. HF default: 8.
    pub per_device_eval_batch_size: usize,
    /// Epochs to train; the fractional part is a fraction of the last epoch. HF default: 3.0.
    pub num_train_epochs: f64,
    /// Optimizer steps to train; when > 0 it overrides `num_train_epochs`. HF default: -1.
    pub max_steps: i64,
    /// Peak learning rate of AdamW. HF default: 5e-5.
    pub learning_rate: f64,
    /// AdamW's decoupled weight decay. HF default: 0.0.
    pub weight_decay: f64,
    /// AdamW's beta1. HF default: 0.9.
    pub adam_beta1: f64,
    /// AdamW's beta2. HF default: 0.999.
    pub adam_beta2: f64,
    /// AdamW's epsilon. HF default: 1e-8.
    pub adam_epsilon: f64,
    /// Gradients are clipped to this global L2 norm; 0 means no clipping. HF default: 1.0.
    pub max_grad_norm: f64,
    /// Batches whose gradients are summed before each optimizer step. HF default: 1.
    pub gradient_accumulation_steps: usize,
    /// The learning-rate schedule. HF default: `"linear"`.
    pub lr_scheduler_type: SchedulerType,
    /// Linear-warmup steps; when 0, `warmup_ratio` decides. HF default: 0.
    ///
    /// HF 5 also takes a float in [0, 1) here, meaning a ratio of the total training steps.
    /// The loaders ([`from_json_str`](Self::from_json_str) and friends) move such a ratio into
    /// `warmup_ratio` and leave this field 0, which [`warmup_steps_for`](Self::warmup_steps_for)
    /// resolves to the same number of steps; it is written back as `warmup_ratio`.
    #[serde(deserialize_with = "deserialize_warmup_steps")]
    pub warmup_steps: usize,
    /// Fraction of the total training steps spent warming up, used when `warmup_steps` is 0.
    /// HF default: 0.0 (HF 5 writes `null` and deprecates it in favour of a fractional
    /// `warmup_steps`).
    pub warmup_ratio: f64,
    /// When to log the training loss. HF default: `"steps"`.
    pub logging_strategy: IntervalStrategy,
    /// Log every this many steps; a value < 1 is a ratio of the total training steps.
    /// HF default: 500.
    pub logging_steps: f64,
    /// Whether to also log after the first step. HF default: `false`.
    pub logging_first_step: bool,
    /// When to evaluate. HF default: `"no"`. Also read under its HF 4 name
    /// `evaluation_strategy`; always written as `eval_strategy`.
    #[serde(alias = "evaluation_strategy")]
    pub eval_strategy: IntervalStrategy,
    /// Evaluate every this many steps (a value < 1 is a ratio of the total training steps).
    /// HF default: `None`, meaning `logging_steps`; see
    /// [`eval_steps_resolved`](Self::eval_steps_resolved).
    pub eval_steps: Option<f64>,
    /// When to save a checkpoint. HF default: `"steps"`.
    pub save_strategy: IntervalStrategy,
    /// Save every this many steps; a value < 1 is a ratio of the total training steps.
    /// HF default: 500.
    pub save_steps: f64,
    /// Most checkpoints kept in `output_dir`, oldest deleted first. HF default: `None`
    /// (keep all).
    pub save_total_limit: Option<usize>,
    /// Whether to load the best checkpoint (by `metric_for_best_model`) when training ends.
    /// HF default: `false`.
    pub load_best_model_at_end: bool,
    /// The evaluation metric that picks the best checkpoint. HF default: `None` (`"loss"` when
    /// `load_best_model_at_end`); see
    /// [`metric_for_best_model_resolved`](Self::metric_for_best_model_resolved).
    pub metric_for_best_model: Option<String>,
    /// Whether a larger `metric_for_best_model` is better. HF default: `None` (false for a
    /// metric ending in `loss`, else true); see
    /// [`greater_is_better_resolved`](Self::greater_is_better_resolved).
    pub greater_is_better: Option<bool>,
    /// Seed of model initialisation and of everything random in training. HF default: 42.
    pub seed: u64,
    /// Seed of the data samplers; `None` means `seed`. HF default: `None`.
    pub data_seed: Option<u64>,
    /// Checkpoint folder to resume training from. HF default: `None`.
    pub resume_from_checkpoint: Option<PathBuf>,
    /// Worker threads loading batches; 0 loads in the training thread. HF default: 0.
    pub dataloader_num_workers: usize,
    /// Whether to hide the progress bars. HF default: `None`, i.e. `false` unless logging is
    /// at warning level or quieter.
    pub disable_tqdm: bool,
    /// bfloat16 mixed precision: float32 master weights and optimizer state, the linear
    /// layers and attention of the forward and backward passes in bfloat16 (torch's
    /// `autocast`, see `ember_kernels::autocast`). HF default: `false`.
    pub bf16: bool,
    /// float16 mixed precision: as `bf16` in float16, with dynamic loss scaling
    /// ([`GradScaler`](crate::GradScaler)). HF default: `false`.
    pub fp16: bool,
    /// Every other field of the file (`report_to`, `optim`, …), kept as read and
    /// written back, so that unknown fields are never an error.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The fields read by name (the HF 4 alias included). A `null` for one of them means its
/// default; for any other field it is kept in `extra` as it is.
const KNOWN_FIELDS: &[&str] = &[
    "output_dir",
    "overwrite_output_dir",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "num_train_epochs",
    "max_steps",
    "learning_rate",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "gradient_accumulation_steps",
    "lr_scheduler_type",
    "warmup_steps",
    "warmup_ratio",
    "logging_strategy",
    "logging_steps",
    "logging_first_step",
    "eval_strategy",
    "evaluation_strategy",
    "eval_steps",
    "save_strategy",
    "save_steps",
    "save_total_limit",
    "load_best_model_at_end",
    "metric_for_best_model",
    "greater_is_better",
    "seed",
    "data_seed",
    "resume_from_checkpoint",
    "dataloader_num_workers",
    "disable_tqdm",
    "bf16",
    "fp16",
];

impl Default for TrainingArguments {
    /// HF's defaults, with HF 5's `output_dir` of `"trainer_output"`.
    fn default() -> Self {
        Self::new("trainer_output")
    }
}

impl TrainingArguments {
    /// HF's defaults, writing to `output_dir`.
    pub fn new(output_dir: impl Into<PathBuf>) -> Self {
        Self {
            output_dir: output_dir.into(),
            overwrite_output_dir: false,
            per_device_train_batch_size: 8,
            per_device_eval_batch_size: 8,
            num_train_epochs: 3.0,
            max_steps: -1,
            learning_rate: 5e-5,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            gradient_accumulation_steps: 1,
            lr_scheduler_type: SchedulerType::Linear,
            warmup_steps: 0,
            warmup_ratio: 0.0,
            logging_strategy: IntervalStrategy::Steps,
            logging_steps: 500.0,
            logging_first_step: false,
            eval_strategy: IntervalStrategy::No,
            eval_steps: None,
            save_strategy: IntervalStrategy::Steps,
            save_steps: 500.0,
            save_total_limit: None,
            load_best_model_at_end: false,
            metric_for_best_model: None,
            greater_is_better: None,
            seed: 42,
            data_seed: None,
            resume_from_checkpoint: None,
            dataloader_num_workers: 0,
            disable_tqdm: false,
            bf16: false,
            fp16: false,
            extra: Map::new(),
        }
    }

    /// Reads and validates the arguments in `path`: JSON for a `.json` file, TOML for `.toml`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let extension = path
            .extension()
            .and_then(|extension| extension.to_str())
            .unwrap_or("");
        let is_json = extension.eq_ignore_ascii_case("json");
        if !is_json && !extension.eq_ignore_ascii_case("toml") {
            return Err(TrainError::File {
                path: path.to_path_buf(),
                message: "training arguments must be a `.json` or `.toml` file".to_string(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(|source| TrainError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if is_json {
            Self::from_json_str(&text, path)
        } else {
            Self::from_toml_str(&text, path)
        }
    }

    /// Parses and validates JSON arguments; `source` names the file in errors.
    pub fn from_json_str(text: &str, source: &Path) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|error| TrainError::File {
            path: source.to_path_buf(),
            message: error.to_string(),
        })?;
        Self::from_value(value, source)
    }

    /// Parses and validates TOML arguments (HF names as top-level keys); `source` names the
    /// file in errors.
    pub fn from_toml_str(text: &str, source: &Path) -> Result<Self> {
        // Through serde_json's Value so that unknown keys land in `extra` as they do for JSON.
        let value: Value = toml::from_str(text).map_err(|error| TrainError::File {
            path: source.to_path_buf(),
            // toml's message is a multi-line snippet ending in a newline.
            message: error.to_string().trim_end().to_string(),
        })?;
        Self::from_value(value, source)
    }

    /// The arguments as pretty JSON with HF's field names, `extra` included.
    ///
    /// HF saves its arguments as `training_args.bin`, a pickle Rust cannot write; this is the
    /// JSON of HF's `TrainingArguments.to_json_string()` for the fields Ember knows, and
    /// `TrainingArguments(**json.load(f))` reads it back in Python.
    pub fn to_json_string(&self) -> String {
        serde_json::to_string_pretty(self)
            .expect("TrainingArguments serializes: string keys and plain values only")
    }

    /// Checks every field as HF's `__post_init__` does; the error names the first bad field.
    pub fn validate(&self) -> Result<()> {
        if self.output_dir.as_os_str().is_empty() {
            return Err(invalid("output_dir", "must not be empty"));
        }
        for (field, value) in [
            (
                "per_device_train_batch_size",
                self.per_device_train_batch_size,
            ),
            (
                "per_device_eval_batch_size",
                self.per_device_eval_batch_size,
            ),
            (
                "gradient_accumulation_steps",
                self.gradient_accumulation_steps,
            ),
        ] {
            if value == 0 {
                return Err(invalid(field, "must be at least 1, found 0"));
            }
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(invalid(
                "learning_rate",
                format!("must be a finite number > 0, found {}", self.learning_rate),
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(invalid(
                "weight_decay",
                format!("must be a finite number >= 0, found {}", self.weight_decay),
            ));
        }
        for (field, value) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&value) {
                return Err(invalid(field, format!("must be in [0, 1), found {value}")));
            }
        }
        if !(self.adam_epsilon.is_finite() && self.adam_epsilon > 0.0) {
            return Err(invalid(
                "adam_epsilon",
                format!("must be a finite number > 0, found {}", self.adam_epsilon),
            ));
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return Err(invalid(
                "max_grad_norm",
                format!(
                    "must be a finite number >= 0 (0 disables clipping), found {}",
                    self.max_grad_norm
                ),
            ));
        }
        if self.max_steps <= 0
            && !(self.num_train_epochs.is_finite() && self.num_train_epochs > 0.0)
        {
            return Err(invalid(
                "num_train_epochs",
                format!(
                    "must be a finite number > 0 when max_steps <= 0, found {}",
                    self.num_train_epochs
                ),
            ));
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return Err(invalid(
                "warmup_ratio",
                format!("must be in [0, 1], found {}", self.warmup_ratio),
            ));
        }
        if self.logging_strategy == IntervalStrategy::Steps {
            check_steps("logging_steps", self.logging_steps)?;
        }
        match self.eval_steps {
            Some(eval_steps) => check_steps("eval_steps", eval_steps)?,
            None if self.eval_strategy == IntervalStrategy::Steps
                && check_steps("logging_steps", self.logging_steps).is_err() =>
            {
                return Err(invalid(
                    "eval_steps",
                    format!(
                        "eval_strategy `steps` requires either a valid eval_steps or \
                         logging_steps (which eval_steps defaults to), found logging_steps {}",
                        self.logging_steps
                    ),
                ));
            }
            None => {}
        }
        if self.save_strategy == IntervalStrategy::Steps {
            check_steps("save_steps", self.save_steps)?;
        }
        if self.save_total_limit == Some(0) {
            return Err(invalid(
                "save_total_limit",
                "must be at least 1 (leave it out to keep every checkpoint), found 0",
            ));
        }
        if self.load_best_model_at_end {
            self.check_load_best_model_at_end()?;
        }
        if self.bf16 && self.fp16 {
            return Err(invalid(
                "fp16",
                "at most one of fp16 and bf16 can be true, found both",
            ));
        }
        Ok(())
    }

    /// The half-precision dtype that `bf16` / `fp16` ask the forward and backward passes to
    /// run in, if any.
    pub fn mixed_precision_dtype(&self) -> Option<burn::tensor::DType> {
        match (self.bf16, self.fp16) {
            (true, _) => Some(burn::tensor::DType::BF16),
            (_, true) => Some(burn::tensor::DType::F16),
            _ => None,
        }
    }

    /// The evaluation interval in steps (or a ratio when < 1): `eval_steps`, else
    /// `logging_steps`, as HF resolves it.
    pub fn eval_steps_resolved(&self) -> f64 {
        self.eval_steps.unwrap_or(self.logging_steps)
    }

    /// The key of the metric that picks the best checkpoint, as the HF `Trainer` looks it up in
    /// the evaluation metrics: `metric_for_best_model`, or `"loss"` when
    /// `load_best_model_at_end` names none, prefixed with `eval_` unless it starts with it
    /// (`"eval_loss"`, `"eval_accuracy"`). `None` when there is no metric to track.
    pub fn metric_for_best_model_resolved(&self) -> Option<String> {
        let metric = match (&self.metric_for_best_model, self.load_best_model_at_end) {
            (Some(metric), _) => metric.clone(),
            (None, true) => "loss".to_string(),
            (None, false) => return None,
        };
        if metric.starts_with("eval_") {
            Some(metric)
        } else {
            Some(format!("eval_{metric}"))
        }
    }

    /// Whether a larger best-model metric is better: `greater_is_better`, else HF's rule that a
    /// metric ending in `loss` is minimised and any other maximised; `false` (a loss) when there
    /// is no metric at all.
    pub fn greater_is_better_resolved(&self) -> bool {
        if let Some(greater_is_better) = self.greater_is_better {
            return greater_is_better;
        }
        self.metric_for_best_model_resolved()
            .is_some_and(|metric| !metric.ends_with("loss"))
    }

    /// Warmup steps for a run of `total_steps` optimizer steps, HF's `get_warmup_steps`:
    /// `warmup_steps` when > 0, else `ceil(total_steps * warmup_ratio)`.
    pub fn warmup_steps_for(&self, total_steps: usize) -> usize {
        if self.warmup_steps > 0 {
            self.warmup_steps
        } else {
            ratio_of(self.warmup_ratio, total_steps)
        }
    }

    /// A `logging_steps`, `eval_steps` or `save_steps` value in steps for a run of
    /// `total_steps`: HF reads a value < 1 as a ratio of the total (rounded up), any other as
    /// a whole number of steps.
    pub fn steps_from(&self, value: f64, total_steps: usize) -> usize {
        if value < 1.0 {
            ratio_of(value, total_steps)
        } else {
            value as usize
        }
    }

    /// Examples per training batch: `per_device_train_batch_size`, Ember training on one
    /// device (HF multiplies by the device count).
    pub fn train_batch_size(&self) -> usize {
        self.per_device_train_batch_size
    }

    /// HF's checks on `load_best_model_at_end`: evaluation and saving must happen at the same
    /// points, so that every evaluated model has a checkpoint to load.
    fn check_load_best_model_at_end(&self) -> Result<()> {
        if self.eval_strategy != self.save_strategy {
            return Err(invalid(
                "load_best_model_at_end",
                format!(
                    "--load_best_model_at_end requires the save and eval strategy to match, but \
                     found eval_strategy `{}` and save_strategy `{}`",
                    self.eval_strategy, self.save_strategy
                ),
            ));
        }
        if self.eval_strategy != IntervalStrategy::Steps {
            return Ok(());
        }
        let save_steps = self.save_steps;
        let eval_steps = self.eval_steps_resolved();
        let is_multiple = match (save_steps < 1.0, eval_steps < 1.0) {
            (false, false) => save_steps % eval_steps == 0.0,
            // HF compares ratios scaled up, to dodge floating-point remainders like 0.3 % 0.1.
            (true, true) => {
                let scaled_save = (save_steps * 1e6).round();
                let scaled_eval = (eval_steps * 1e6).round();
                scaled_save % scaled_eval == 0.0
            }
            _ => {
                return Err(invalid(
                    "save_steps",
                    format!(
                        "--load_best_model_at_end requires the saving steps to be a multiple of \
                         the evaluation steps, which cannot be guaranteed when mixing ratio and \
                         absolute steps for save_steps {save_steps} and eval_steps {eval_steps}"
                    ),
                ));
            }
        };
        if !is_multiple {
            return Err(invalid(
                "save_steps",
                format!(
                    "--load_best_model_at_end requires the saving steps to be a multiple of the \
                     evaluation steps, but found {save_steps}, which is not a multiple of \
                     {eval_steps}"
                ),
            ));
        }
        Ok(())
    }

    /// The common end of the loaders: HF's file conventions applied to the parsed `value`,
    /// then deserialization (naming the field at fault) and validation.
    fn from_value(value: Value, source: &Path) -> Result<Self> {
        let file_error = |message: String| TrainError::File {
            path: source.to_path_buf(),
            message,
        };
        let Value::Object(mut fields) = value else {
            return Err(file_error(format!(
                "expected a table of training arguments, found {}",
                value_kind(&value)
            )));
        };
        fields.retain(|key, value| !(value.is_null() && KNOWN_FIELDS.contains(&key.as_str())));
        move_warmup_ratio(&mut fields)?;
        let arguments: Self =
            serde_json::from_value(Value::Object(fields.clone())).map_err(|error| {
                // Flattening `extra` makes serde drop the field name from its errors.
                match first_bad_field(&fields) {
                    Some((field, error)) => file_error(format!("field `{field}`: {error}")),
                    None => file_error(error.to_string()),
                }
            })?;
        arguments.validate()?;
        Ok(arguments)
    }
}

/// An [`TrainError::Argument`] for `field`.
fn invalid(field: &str, message: impl Into<String>) -> TrainError {
    TrainError::Argument {
        field: field.to_string(),
        message: message.into(),
    }
}

/// HF's checks on a `logging_steps` / `eval_steps` / `save_steps` value in use.
fn check_steps(field: &str, value: f64) -> Result<()> {
    if !(value.is_finite() && value > 0.0) {
        return Err(invalid(
            field,
            format!(
                "must be > 0 (a value < 1 is a ratio of the total training steps), found {value}"
            ),
        ));
    }
    if value > 1.0 && value.fract() != 0.0 {
        return Err(invalid(
            field,
            format!("--{field} must be an integer if bigger than 1, found {value}"),
        ));
    }
    Ok(())
}

/// `ceil(total_steps * ratio)`, 0 for a ratio <= 0.
fn ratio_of(ratio: f64, total_steps: usize) -> usize {
    // The float-to-int cast saturates: a negative or NaN product gives 0.
    (total_steps as f64 * ratio).ceil() as usize
}

/// HF 5's fractional `warmup_steps` (a ratio of the total steps) moved into `warmup_ratio`,
/// which Ember stores it in.
fn move_warmup_ratio(fields: &mut Map<String, Value>) -> Result<()> {
    let Some(ratio) = fields
        .get("warmup_steps")
        .and_then(Value::as_f64)
        .filter(|value| *value > 0.0 && *value < 1.0)
    else {
        return Ok(());
    };
    let warmup_ratio = fields.get("warmup_ratio").and_then(Value::as_f64);
    if warmup_ratio.is_some_and(|warmup_ratio| warmup_ratio != 0.0 && warmup_ratio != ratio) {
        return Err(invalid(
            "warmup_steps",
            format!(
                "the ratio {ratio} conflicts with warmup_ratio {}; give only one",
                warmup_ratio.unwrap_or_default()
            ),
        ));
    }
    fields.insert("warmup_steps".to_string(), Value::from(0));
    fields.insert("warmup_ratio".to_string(), Value::from(ratio));
    Ok(())
}

/// The first field (in file order) that does not deserialize on its own, with its error.
fn first_bad_field(fields: &Map<String, Value>) -> Option<(String, serde_json::Error)> {
    fields.iter().find_map(|(key, value)| {
        let alone = Map::from_iter([(key.clone(), value.clone())]);
        serde_json::from_value::<TrainingArguments>(Value::Object(alone))
            .err()
            .map(|error| (key.clone(), error))
    })
}

/// A JSON value's kind, for error messages.
fn value_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `warmup_steps` as a whole number of steps: an integer, or a float with no fractional part
/// (`10.0`). A ratio in (0, 1) is moved to `warmup_ratio` by the loaders before this runs.
fn deserialize_warmup_steps<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<usize, D::Error> {
    let value = Value::deserialize(deserializer)?;
    if let Some(steps) = value.as_u64() {
        return usize::try_from(steps).map_err(serde::de::Error::custom);
    }
    match value.as_f64() {
        Some(steps) if steps >= 1.0 && steps.fract() == 0.0 && steps <= usize::MAX as f64 => {
            Ok(steps as usize)
        }
        _ => Err(serde::de::Error::custom(format!(
            "expected a whole number of steps or a ratio in [0, 1) of the total steps, \
             found {value}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> &'static Path {
        Path::new("args.json")
    }

    fn field_of(error: &TrainError) -> &str {
        match error {
            TrainError::Argument { field, .. } => field,
            other => panic!("expected an Argument error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_hf_defaults() {
        let arguments = TrainingArguments::default();
        assert_eq!(arguments.output_dir, PathBuf::from("trainer_output"));
        assert_eq!(arguments.per_device_train_batch_size, 8);
        assert_eq!(arguments.per_device_eval_batch_size, 8);
        assert_eq!(arguments.num_train_epochs, 3.0);
        assert_eq!(arguments.max_steps, -1);
        assert_eq!(arguments.learning_rate, 5e-5);
        assert_eq!(arguments.adam_beta2, 0.999);
        assert_eq!(arguments.adam_epsilon, 1e-8);
        assert_eq!(arguments.max_grad_norm, 1.0);
        assert_eq!(arguments.lr_scheduler_type, SchedulerType::Linear);
        assert_eq!(arguments.logging_strategy, IntervalStrategy::Steps);
        assert_eq!(arguments.logging_steps, 500.0);
        assert_eq!(arguments.eval_strategy, IntervalStrategy::No);
        assert_eq!(arguments.save_strategy, IntervalStrategy::Steps);
        assert_eq!(arguments.save_steps, 500.0);
        assert_eq!(arguments.seed, 42);
        assert_eq!(arguments.eval_steps, None);
        assert!(arguments.validate().is_ok());
        // An empty file means every default, HF 5's output_dir included.
        assert_eq!(
            TrainingArguments::from_json_str("{}", source()).unwrap(),
            arguments
        );
    }

    #[test]
    fn json_with_old_eval_name_and_unknown_fields_round_trips() {
        let text = r#"{
            "output_dir": "out",
            "evaluation_strategy": "epoch",
            "save_strategy": "epoch",
            "load_best_model_at_end": true,
            "lr_scheduler_type": "constant_with_warmup",
            "warmup_steps": 10,
            "report_to": ["tensorboard"],
            "fp16": true,
            "my_plugin": {"depth": 2}
        }"#;
        let arguments = TrainingArguments::from_json_str(text, source()).unwrap();
        assert_eq!(arguments.output_dir, PathBuf::from("out"));
        assert_eq!(arguments.eval_strategy, IntervalStrategy::Epoch);
        assert_eq!(
            arguments.lr_scheduler_type,
            SchedulerType::ConstantWithWarmup
        );
        assert_eq!(arguments.warmup_steps, 10);
        assert_eq!(
            arguments.extra["report_to"],
            serde_json::json!(["tensorboard"])
        );
        assert!(arguments.fp16 && !arguments.bf16);
        assert_eq!(arguments.extra.len(), 2);

        let written = arguments.to_json_string();
        let json: Value = serde_json::from_str(&written).unwrap();
        assert_eq!(json["eval_strategy"], "epoch");
        assert!(json.get("evaluation_strategy").is_none());
        assert_eq!(json["my_plugin"]["depth"], 2);
        assert_eq!(json["lr_scheduler_type"], "constant_with_warmup");
        let reread = TrainingArguments::from_json_str(&written, source()).unwrap();
        assert_eq!(reread, arguments);
    }

    #[test]
    fn hf_nulls_mean_defaults() {
        let text = r#"{"output_dir": null, "warmup_ratio": null, "disable_tqdm": null,
                       "eval_steps": null, "push_to_hub_token": null}"#;
        let arguments = TrainingArguments::from_json_str(text, source()).unwrap();
        assert_eq!(arguments.output_dir, PathBuf::from("trainer_output"));
        assert_eq!(arguments.warmup_ratio, 0.0);
        assert_eq!(arguments.extra["push_to_hub_token"], Value::Null);
    }

    #[test]
    fn toml_loads_with_extra() {
        let text = r#"
            output_dir = "runs/bert"
            learning_rate = 2e-5
            num_train_epochs = 1
            per_device_train_batch_size = 16
            eval_strategy = "steps"
            eval_steps = 100
            save_steps = 200
            load_best_model_at_end = true
            metric_for_best_model = "accuracy"
            report_to = "none"

            [my_plugin]
            depth = 2
        "#;
        let arguments = TrainingArguments::from_toml_str(text, Path::new("args.toml")).unwrap();
        assert_eq!(arguments.output_dir, PathBuf::from("runs/bert"));
        assert_eq!(arguments.learning_rate, 2e-5);
        assert_eq!(arguments.num_train_epochs, 1.0);
        assert_eq!(arguments.train_batch_size(), 16);
        assert_eq!(arguments.eval_steps, Some(100.0));
        assert_eq!(arguments.extra["report_to"], "none");
        assert_eq!(arguments.extra["my_plugin"]["depth"], 2);
    }

    #[test]
    fn from_file_chooses_by_extension() {
        let folder = tempfile::tempdir().unwrap();
        let json = folder.path().join("args.json");
        std::fs::write(&json, r#"{"seed": 7}"#).unwrap();
        assert_eq!(TrainingArguments::from_file(&json).unwrap().seed, 7);
        let toml = folder.path().join("args.TOML");
        std::fs::write(&toml, "seed = 8\n").unwrap();
        assert_eq!(TrainingArguments::from_file(&toml).unwrap().seed, 8);
        let yaml = folder.path().join("args.yaml");
        std::fs::write(&yaml, "seed: 9\n").unwrap();
        match TrainingArguments::from_file(&yaml).unwrap_err() {
            TrainError::File { path, .. } => assert_eq!(path, yaml),
            other => panic!("expected a File error, got {other:?}"),
        }
        let missing = folder.path().join("missing.json");
        assert!(matches!(
            TrainingArguments::from_file(&missing),
            Err(TrainError::Io { .. })
        ));
    }

    #[test]
    fn parse_errors_give_file_and_line() {
        let error = TrainingArguments::from_json_str("{\n  \"seed\": ,\n}", source()).unwrap_err();
        match &error {
            TrainError::File { path, message } => {
                assert_eq!(path, source());
                assert!(message.contains("line 2"), "{message}");
            }
            other => panic!("expected a File error, got {other:?}"),
        }
        let error = TrainingArguments::from_toml_str("seed = \n", Path::new("a.toml")).unwrap_err();
        assert!(error.to_string().contains("line 1"), "{error}");
        let error = TrainingArguments::from_json_str("[1]", source()).unwrap_err();
        assert!(error.to_string().contains("an array"), "{error}");
    }

    #[test]
    fn mistyped_field_is_named() {
        let text = r#"{"output_dir": "out", "report_to": "none", "learning_rate": "fast"}"#;
        let error = TrainingArguments::from_json_str(text, source()).unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, TrainError::File { .. }));
        assert!(message.contains("`learning_rate`"), "{message}");
        assert!(message.contains("fast"), "{message}");

        let error = TrainingArguments::from_toml_str(
            "per_device_train_batch_size = -2",
            Path::new("a.toml"),
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("`per_device_train_batch_size`"),
            "{error}"
        );
    }

    #[test]
    fn unknown_scheduler_names_field_and_choices() {
        let text = r#"{"lr_scheduler_type": "polynomial"}"#;
        let message = TrainingArguments::from_json_str(text, source())
            .unwrap_err()
            .to_string();
        assert!(message.contains("`lr_scheduler_type`"), "{message}");
        assert!(message.contains("polynomial"), "{message}");
        for choice in ["linear", "cosine", "constant", "constant_with_warmup"] {
            assert!(message.contains(choice), "{message}");
        }
        let message = TrainingArguments::from_json_str(r#"{"save_strategy": "best"}"#, source())
            .unwrap_err()
            .to_string();
        assert!(message.contains("`save_strategy`"), "{message}");
    }

    #[test]
    fn each_validation_error_names_its_field() {
        type Mutation = fn(&mut TrainingArguments);
        let cases: &[(&str, Mutation)] = &[
            ("output_dir", |a| a.output_dir = PathBuf::new()),
            ("per_device_train_batch_size", |a| {
                a.per_device_train_batch_size = 0
            }),
            ("per_device_eval_batch_size", |a| {
                a.per_device_eval_batch_size = 0
            }),
            ("gradient_accumulation_steps", |a| {
                a.gradient_accumulation_steps = 0
            }),
            ("learning_rate", |a| a.learning_rate = 0.0),
            ("learning_rate", |a| a.learning_rate = f64::NAN),
            ("weight_decay", |a| a.weight_decay = -0.1),
            ("adam_beta1", |a| a.adam_beta1 = 1.0),
            ("adam_beta2", |a| a.adam_beta2 = -0.5),
            ("adam_epsilon", |a| a.adam_epsilon = 0.0),
            ("max_grad_norm", |a| a.max_grad_norm = -1.0),
            ("num_train_epochs", |a| a.num_train_epochs = 0.0),
            ("warmup_ratio", |a| a.warmup_ratio = 1.5),
            ("logging_steps", |a| a.logging_steps = 0.0),
            ("logging_steps", |a| a.logging_steps = 10.5),
            ("eval_steps", |a| a.eval_steps = Some(-1.0)),
            ("eval_steps", |a| {
                a.eval_strategy = IntervalStrategy::Steps;
                a.logging_strategy = IntervalStrategy::No;
                a.logging_steps = 0.0;
            }),
            ("save_steps", |a| a.save_steps = 0.0),
            ("save_total_limit", |a| a.save_total_limit = Some(0)),
            ("load_best_model_at_end", |a| {
                a.load_best_model_at_end = true;
                a.eval_strategy = IntervalStrategy::Epoch;
            }),
            ("save_steps", |a| {
                a.load_best_model_at_end = true;
                a.eval_strategy = IntervalStrategy::Steps;
                a.eval_steps = Some(300.0);
            }),
            ("save_steps", |a| {
                a.load_best_model_at_end = true;
                a.eval_strategy = IntervalStrategy::Steps;
                a.eval_steps = Some(0.1);
            }),
            ("fp16", |a| {
                a.fp16 = true;
                a.bf16 = true;
            }),
        ];
        for (expected_field, mutate) in cases {
            let mut arguments = TrainingArguments::new("out");
            mutate(&mut arguments);
            let error = arguments.validate().unwrap_err();
            assert_eq!(field_of(&error), *expected_field, "{error}");
        }
    }

    #[test]
    fn valid_edge_cases_pass() {
        let cases: &[fn(&mut TrainingArguments)] = &[
            |a| a.max_grad_norm = 0.0,
            |a| {
                a.num_train_epochs = 0.0;
                a.max_steps = 100;
            },
            |a| {
                a.logging_strategy = IntervalStrategy::No;
                a.logging_steps = 0.0;
            },
            |a| a.metric_for_best_model = Some("f1".to_string()),
            |a| {
                a.load_best_model_at_end = true;
                a.eval_strategy = IntervalStrategy::Steps;
                a.eval_steps = Some(250.0);
            },
            |a| {
                a.load_best_model_at_end = true;
                a.eval_strategy = IntervalStrategy::Steps;
                a.eval_steps = Some(0.1);
                a.save_steps = 0.3;
            },
        ];
        for mutate in cases {
            let mut arguments = TrainingArguments::new("out");
            mutate(&mut arguments);
            arguments.validate().unwrap();
        }
    }

    #[test]
    fn loaders_validate() {
        let error =
            TrainingArguments::from_json_str(r#"{"learning_rate": -1}"#, source()).unwrap_err();
        assert_eq!(field_of(&error), "learning_rate");
    }

    #[test]
    fn steps_ratios() {
        let arguments = TrainingArguments::default();
        assert_eq!(arguments.steps_from(0.1, 1000), 100);
        assert_eq!(arguments.steps_from(50.0, 1000), 50);
        assert_eq!(arguments.steps_from(0.15, 10), 2);
        assert_eq!(arguments.eval_steps_resolved(), 500.0);
        let arguments = TrainingArguments {
            eval_steps: Some(0.25),
            ..TrainingArguments::default()
        };
        assert_eq!(arguments.eval_steps_resolved(), 0.25);
    }

    #[test]
    fn warmup_steps() {
        let mut arguments = TrainingArguments::default();
        assert_eq!(arguments.warmup_steps_for(1000), 0);
        arguments.warmup_ratio = 0.1;
        assert_eq!(arguments.warmup_steps_for(1000), 100);
        assert_eq!(arguments.warmup_steps_for(15), 2);
        arguments.warmup_steps = 30;
        assert_eq!(arguments.warmup_steps_for(1000), 30);

        // HF 5's fractional warmup_steps is a ratio.
        let arguments =
            TrainingArguments::from_json_str(r#"{"warmup_steps": 0.05}"#, source()).unwrap();
        assert_eq!(arguments.warmup_steps, 0);
        assert_eq!(arguments.warmup_ratio, 0.05);
        assert_eq!(arguments.warmup_steps_for(1000), 50);
        let arguments =
            TrainingArguments::from_toml_str("warmup_steps = 20.0", Path::new("a.toml")).unwrap();
        assert_eq!(arguments.warmup_steps, 20);
        let error =
            TrainingArguments::from_json_str(r#"{"warmup_steps": 2.5}"#, source()).unwrap_err();
        assert!(error.to_string().contains("`warmup_steps`"), "{error}");
        let error = TrainingArguments::from_json_str(
            r#"{"warmup_steps": 0.05, "warmup_ratio": 0.2}"#,
            source(),
        )
        .unwrap_err();
        assert_eq!(field_of(&error), "warmup_steps");
    }

    #[test]
    fn best_metric_resolution() {
        let mut arguments = TrainingArguments::default();
        assert_eq!(arguments.metric_for_best_model_resolved(), None);
        assert!(!arguments.greater_is_better_resolved());

        arguments.load_best_model_at_end = true;
        assert_eq!(
            arguments.metric_for_best_model_resolved().as_deref(),
            Some("eval_loss")
        );
        assert!(!arguments.greater_is_better_resolved());

        arguments.metric_for_best_model = Some("accuracy".to_string());
        assert_eq!(
            arguments.metric_for_best_model_resolved().as_deref(),
            Some("eval_accuracy")
        );
        assert!(arguments.greater_is_better_resolved());

        arguments.metric_for_best_model = Some("eval_loss".to_string());
        assert_eq!(
            arguments.metric_for_best_model_resolved().as_deref(),
            Some("eval_loss")
        );
        assert!(!arguments.greater_is_better_resolved());

        arguments.greater_is_better = Some(true);
        assert!(arguments.greater_is_better_resolved());
    }
}
