//! `from_pretrained` / `save_pretrained` for every model, and the `Auto*` classes that pick the
//! architecture from `config.json`.

use crate::bert::BertModel;
use crate::config::BertConfig;
use crate::dtype::{DtypeArg, FloatDtype};
use crate::error::{ModelError, Result};
use crate::heads::{
    is_ignorable_key, BertForMaskedLM, BertForQuestionAnswering, BertForSequenceClassification,
    BertForTokenClassification,
};
use crate::params::{
    write_atomic, write_safetensors, Collector, Loader, NameCollector, NamedParam, StableIds,
    StateDict, VisitParams,
};
use crate::quantize::{default_skips, QuantPlan};
use crate::weights::{LinearLayout, Weights};
use burn::tensor::backend::Backend;
use ember_quant::{quantized_layout, BitsAndBytesConfig};
use std::path::Path;

/// The keyword arguments of HF's `from_pretrained` that Ember supports.
#[derive(Debug, Clone, Default)]
pub struct FromPretrainedOptions {
    /// `num_labels=`: a head for this many classes (labels named `LABEL_i`).
    pub num_labels: Option<usize>,
    /// `id2label=`: the label names, in class order (sets `num_labels` and `label2id`).
    pub labels: Option<Vec<String>>,
    /// `problem_type=`.
    pub problem_type: Option<String>,
    /// `output_attentions=`.
    pub output_attentions: Option<bool>,
    /// `output_hidden_states=`.
    pub output_hidden_states: Option<bool>,
    /// `ignore_mismatched_sizes=`: a tensor whose shape differs (a head with another number of
    /// labels) is re-initialised and reported instead of failing.
    pub ignore_mismatched_sizes: bool,
    /// Any other config field, as HF's `from_pretrained(dir, hidden_dropout_prob=0.0)`.
    pub config_updates: serde_json::Map<String, serde_json::Value>,
    /// `quantization_config=`: quantize the linear layers while loading (bitsandbytes int8 or
    /// 4-bit). A folder saved quantized loads quantized without it (its `config.json` says how).
    pub quantization_config: Option<BitsAndBytesConfig>,
    /// `dtype=`: the float dtype to keep the weights in (`"auto"`: the checkpoint's
    /// `config.json` says). Unset, weights load in float32, which is what transformers 4 did;
    /// transformers 5 defaults to `"auto"`.
    pub dtype: Option<DtypeArg>,
    /// `revision=`: the branch, tag or commit of a Hub repository id (default `main`); unused
    /// for a local folder, as in transformers.
    pub revision: Option<String>,
    /// Where the Hub and its cache are, for a repository id. `None` reads huggingface_hub's
    /// environment variables (`HF_HOME`, `HF_HUB_CACHE`, `HF_ENDPOINT`, `HF_HUB_OFFLINE`,
    /// `HF_TOKEN`) when the model is loaded.
    pub hub: Option<ember_hub::HubConfig>,
    /// How the linear weights lie in memory (Ember's own; transformers has no such option).
    /// `None`: [`LinearLayout::OutIn`] for causal LMs, whose work is mostly decoding, and
    /// [`LinearLayout::InOut`] for the encoders.
    pub linear_layout: Option<LinearLayout>,
}

impl FromPretrainedOptions {
    /// Sets `dtype` (a [`FloatDtype`] or [`DtypeArg::Auto`]).
    pub fn dtype(mut self, dtype: impl Into<DtypeArg>) -> Self {
        self.dtype = Some(dtype.into());
        self
    }

    /// The dtype to load in, given `config.json` (read at `path`).
    pub(crate) fn load_dtype(
        &self,
        config_json: &serde_json::Value,
        path: &Path,
    ) -> Result<FloatDtype> {
        match self.dtype {
            None => Ok(FloatDtype::Float32),
            Some(arg) => arg.resolve(config_json, path),
        }
    }

    /// Sets how the linear weights lie in memory.
    pub fn linear_layout(mut self, layout: LinearLayout) -> Self {
        self.linear_layout = Some(layout);
        self
    }

    /// Sets `revision` (a Hub branch, tag or commit).
    pub fn revision(mut self, revision: impl Into<String>) -> Self {
        self.revision = Some(revision.into());
        self
    }

    /// Sets the Hub settings, instead of reading them from the environment.
    pub fn hub(mut self, hub: ember_hub::HubConfig) -> Self {
        self.hub = Some(hub);
        self
    }

    /// Sets `num_labels`.
    pub fn num_labels(mut self, n: usize) -> Self {
        self.num_labels = Some(n);
        self
    }

    /// Sets the label names (`id2label`).
    pub fn labels<S: Into<String>>(mut self, labels: impl IntoIterator<Item = S>) -> Self {
        self.labels = Some(labels.into_iter().map(Into::into).collect());
        self
    }

    /// Sets `problem_type`.
    pub fn problem_type(mut self, kind: impl Into<String>) -> Self {
        self.problem_type = Some(kind.into());
        self
    }

    /// Sets `output_attentions`.
    pub fn output_attentions(mut self, on: bool) -> Self {
        self.output_attentions = Some(on);
        self
    }

    /// Sets `output_hidden_states`.
    pub fn output_hidden_states(mut self, on: bool) -> Self {
        self.output_hidden_states = Some(on);
        self
    }

    /// Sets `ignore_mismatched_sizes`.
    pub fn ignore_mismatched_sizes(mut self, on: bool) -> Self {
        self.ignore_mismatched_sizes = on;
        self
    }

    /// Sets `quantization_config`.
    pub fn quantization_config(mut self, config: BitsAndBytesConfig) -> Self {
        self.quantization_config = Some(config);
        self
    }

    /// The quantization to load with: the option, else the `quantization_config` of
    /// `config.json` (a folder saved quantized), as a plan with transformers' skipped modules.
    pub(crate) fn quant_plan(
        &self,
        config_json: &serde_json::Value,
        path: &Path,
        default_skips: impl FnOnce() -> Vec<String>,
    ) -> Result<Option<QuantPlan>> {
        let config = match &self.quantization_config {
            Some(c) => Some(c.clone()),
            None => BitsAndBytesConfig::from_model_config(config_json).map_err(|e| {
                ModelError::Config {
                    path: path.to_owned(),
                    message: e.to_string(),
                }
            })?,
        };
        match config {
            Some(c) => QuantPlan::new(&c, default_skips(), path),
            None => Ok(None),
        }
    }

    /// Sets any config field (`set("hidden_dropout_prob", 0.0)`).
    pub fn set(mut self, field: &str, value: impl Into<serde_json::Value>) -> Self {
        self.config_updates.insert(field.to_owned(), value.into());
        self
    }

    /// Applies the overrides to a config, then checks it again.
    pub fn apply(&self, config: &mut BertConfig, path: &Path) -> Result<()> {
        if !self.config_updates.is_empty() {
            let mut value = serde_json::to_value(&*config).expect("a config always serializes");
            let object = value.as_object_mut().expect("a config is an object");
            object.extend(self.config_updates.clone());
            *config = BertConfig::from_json_value(value, path)?;
        }
        if let Some(labels) = &self.labels {
            config.set_labels(labels.iter().cloned());
        }
        if let Some(n) = self.num_labels {
            config.set_num_labels(n);
        }
        if let Some(kind) = &self.problem_type {
            config.problem_type = Some(kind.clone());
        }
        if let Some(on) = self.output_attentions {
            config.output_attentions = on;
        }
        if let Some(on) = self.output_hidden_states {
            config.output_hidden_states = on;
        }
        config.validate().map_err(|message| ModelError::Config {
            path: path.to_owned(),
            message,
        })
    }
}

/// What loading a checkpoint into a model found, as HF's loading warnings list it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Parameters the checkpoint lacked: newly initialised (a new head).
    pub missing_keys: Vec<String>,
    /// Checkpoint tensors the model did not use (another head, a pre-training head).
    pub unexpected_keys: Vec<String>,
    /// Tensors re-initialised because their shape differed (`ignore_mismatched_sizes`).
    pub mismatched_keys: Vec<String>,
}

/// Reads `config.json` of a checkpoint folder.
pub fn read_config(dir: &Path) -> Result<BertConfig> {
    let path = dir.join("config.json");
    if !path.is_file() {
        return Err(ModelError::Io {
            path,
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no config.json in the folder",
            ),
        });
    }
    BertConfig::from_file(&path)
}

/// Loads the weights of `dir` into a freshly built model, HF style.
fn load<B: Backend, M: VisitParams<B>>(
    dir: &Path,
    options: &FromPretrainedOptions,
    class: &str,
    is_head: bool,
    build: impl Fn(&BertConfig) -> M,
) -> Result<(M, LoadReport)> {
    let mut config = read_config(dir)?;
    let path = dir.join("config.json");
    options.apply(&mut config, &path)?;
    let weights = Weights::from_dir(dir)?;
    let config_json = serde_json::to_value(&config).expect("a config serializes");
    let plan = options.quant_plan(&config_json, &path, || {
        let last = last_param_name(build(&config));
        default_skips(None, last.as_deref())
    })?;
    if let Some(plan) = &plan {
        config
            .extra
            .insert("quantization_config".into(), plan.config.to_json_value());
    }
    let dtype = options.load_dtype(&config_json, &path)?;
    config.extra.insert("dtype".into(), dtype.as_str().into());
    let model = build(&config);
    let base_prefix = if is_head {
        config.base_model_prefix()
    } else {
        ""
    };
    let source = WeightSource {
        weights: &weights,
        base_prefix,
        optional: &["pooler."],
        ignorable: is_ignorable_key,
        quant: plan.as_ref(),
        dtype,
        linear_layout: options.linear_layout.unwrap_or(LinearLayout::InOut),
    };
    load_weights_into(model, &source, options.ignore_mismatched_sizes, class)
}

/// Where `load_weights_into` reads from, and which of its keys may be left over.
pub(crate) struct WeightSource<'a> {
    /// The checkpoint's tensors.
    pub weights: &'a Weights,
    /// The base model prefix (`bert`, `model`, `transformer`), empty for a bare base model.
    pub base_prefix: &'a str,
    /// Key prefixes (after the base prefix) that may be missing and keep their initialisation.
    pub optional: &'a [&'a str],
    /// Checkpoint keys that are not reported when unused (buffers, tied copies).
    pub ignorable: fn(&str) -> bool,
    /// Quantize while loading, and how packed weights of the checkpoint compute.
    pub quant: Option<&'a QuantPlan>,
    /// The dtype every float parameter is kept in.
    pub dtype: FloatDtype,
    /// How the linear weights read lie in memory.
    pub linear_layout: LinearLayout,
}

/// The HF key of the last parameter `model` visits (transformers skips its module when
/// quantizing).
pub(crate) fn last_param_name<B: Backend, M: VisitParams<B>>(model: M) -> Option<String> {
    let mut names = NameCollector::default();
    model.visit("", &mut names).ok()?;
    names.params.pop().map(|p| p.name)
}

/// Replaces every parameter of `model` with the checkpoint's tensor at its HF key, and reports
/// (and logs, with HF's wording) what was missing, unused or re-initialised.
pub(crate) fn load_weights_into<B: Backend, M: VisitParams<B>>(
    model: M,
    source: &WeightSource<'_>,
    ignore_mismatched_sizes: bool,
    class: &str,
) -> Result<(M, LoadReport)> {
    let weights = source.weights;
    let keys = weights.keys();
    let layout =
        quantized_layout(keys.iter().map(String::as_str)).map_err(|e| ModelError::Weights {
            path: weights.source().to_owned(),
            message: e.to_string(),
        })?;
    let companions: Vec<String> = layout.companions.iter().cloned().collect();
    let mut loader = Loader {
        weights,
        base_prefix: source.base_prefix,
        optional: source.optional.iter().map(|s| s.to_string()).collect(),
        missing: Vec::new(),
        ignore_mismatched_sizes,
        mismatched: Vec::new(),
        quant: source.quant,
        layout,
        dtype: source.dtype,
        linear_layout: source.linear_layout,
    };
    let model = model.visit("", &mut loader)?;
    // Every companion (absmax, quant_map, SCB, ...) belongs to a packed weight just read.
    for key in &companions {
        weights.mark_used(key);
    }
    let report = LoadReport {
        missing_keys: loader.missing,
        unexpected_keys: weights
            .unused_keys()
            .into_iter()
            .filter(|k| !(source.ignorable)(k))
            .collect(),
        mismatched_keys: loader.mismatched,
    };
    let source = weights.source().display();
    if !report.missing_keys.is_empty() {
        tracing::warn!(
            "Some weights of {class} were not initialized from the model checkpoint at {source} and are newly initialized: {:?}. \
             You should probably TRAIN this model on a down-stream task to be able to use it for predictions and inference.",
            report.missing_keys
        );
    }
    if !report.mismatched_keys.is_empty() {
        tracing::warn!("Some weights of {class} were re-initialized because their shapes differ from {source}: {:?}", report.mismatched_keys);
    }
    if !report.unexpected_keys.is_empty() {
        tracing::warn!(
            "Some weights of the model checkpoint at {source} were not used when initializing {class}: {:?}",
            report.unexpected_keys
        );
    }
    Ok((model, report))
}

/// Writes `config.json` (with `architectures` set to `class`) and `model.safetensors` with HF
/// key names and layout, each atomically.
fn save<B: Backend, M: VisitParams<B> + Clone>(
    model: &M,
    config: &BertConfig,
    class: &str,
    dir: &Path,
) -> Result<()> {
    let mut config = config.clone();
    config.architectures = Some(vec![class.to_owned()]);
    config.extra.insert(
        "dtype".into(),
        crate::dtype::model_dtype(model).as_str().into(),
    );
    save_files(model, &config.to_json_string(), dir)
}

/// Writes `model.safetensors` and the given `config.json` text into `dir`, each atomically.
pub(crate) fn save_files<B: Backend, M: VisitParams<B> + Clone>(
    model: &M,
    config_json: &str,
    dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| ModelError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let mut collector = Collector::default();
    model.clone().visit("", &mut collector)?;
    write_safetensors(
        &dir.join("model.safetensors"),
        &collector.tensors,
        &collector.dtypes,
        &collector.packed,
    )?;
    write_atomic(&dir.join("config.json"), config_json.as_bytes())
}

/// The tensors a model would save, by HF key (shape and f32 values).
pub(crate) fn state_dict<B: Backend, M: VisitParams<B> + Clone>(model: &M) -> Result<StateDict> {
    let mut collector = Collector::default();
    model.clone().visit("", &mut collector)?;
    Ok(collector.tensors)
}

macro_rules! pretrained {
    ($model:ident, $suffix:literal, $is_head:literal, |$c:ident, $d:ident| $build:expr) => {
        impl<B: Backend> $model<B> {
            /// Loads a checkpoint folder (`config.json` + weights), as HF's `from_pretrained`;
            /// a Hub repository id (`"org/name"`) is fetched into the Hugging Face cache first.
            pub fn from_pretrained(dir: impl AsRef<Path>, device: &B::Device) -> Result<Self> {
                Ok(Self::from_pretrained_with(dir, &FromPretrainedOptions::default(), device)?.0)
            }

            /// Loads a checkpoint folder with overrides; also returns which keys were newly
            /// initialised or unused (they are logged as warnings too, as HF does).
            pub fn from_pretrained_with(
                dir: impl AsRef<Path>,
                options: &FromPretrainedOptions,
                $d: &B::Device,
            ) -> Result<(Self, LoadReport)> {
                let dir = crate::hub::resolve(dir.as_ref(), options)?;
                let dir: &Path = &dir;
                let class = format!("{}{}", read_config(dir)?.class_prefix(), $suffix);
                load(dir, options, &class, $is_head, |$c: &BertConfig| $build)
            }

            /// The HF class name, e.g. `BertForSequenceClassification`.
            pub fn class_name(&self) -> String {
                format!("{}{}", self.config().class_prefix(), $suffix)
            }

            /// Writes `config.json` and `model.safetensors` into `dir`, each atomically, in
            /// the layout Python `from_pretrained` reads.
            pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
                save(self, self.config(), &self.class_name(), dir.as_ref())
            }

            /// The tensors `save_pretrained` writes, by HF key.
            pub fn state_dict(&self) -> Result<StateDict> {
                state_dict(self)
            }

            /// Loads the weights of a `save_pretrained` folder into this model, keeping its
            /// configuration and parameter ids (so optimizer state still applies): resuming a
            /// checkpoint, or loading the best one at the end of training.
            pub fn load_weights(self, dir: impl AsRef<Path>) -> Result<Self> {
                let weights = Weights::from_dir(dir.as_ref())?;
                let mut loader = Loader {
                    weights: &weights,
                    base_prefix: if $is_head {
                        self.config().base_model_prefix()
                    } else {
                        ""
                    },
                    optional: vec!["pooler.".into()],
                    missing: Vec::new(),
                    ignore_mismatched_sizes: false,
                    mismatched: Vec::new(),
                    quant: None,
                    layout: Default::default(),
                    dtype: crate::dtype::model_dtype(&self),
                    // The layout an optimizer step writes (resuming must round as the
                    // uninterrupted run did).
                    linear_layout: LinearLayout::InOut,
                };
                self.visit("", &mut loader)
            }

            crate::dtype::dtype_methods!();

            /// Gives every parameter an id derived from its HF name, the same in every process,
            /// so that optimizer state saved by one run matches the model of another.
            pub fn with_stable_param_ids(self) -> Self {
                self.visit("", &mut StableIds)
                    .expect("renaming ids cannot fail")
            }

            /// Bytes of parameters and buffers, as transformers' `get_memory_footprint()`: a
            /// 4-bit weight counts its packed bytes, an int8 one a byte per value (their scales
            /// are not parameters in PyTorch either), plus the `position_ids` and
            /// `token_type_ids` buffers (int64).
            pub fn get_memory_footprint(&self) -> usize {
                crate::params::parameter_bytes(self) + 16 * self.config().max_position_embeddings
            }

            /// Every parameter's HF name and burn id, in module order, like PyTorch's
            /// `named_parameters()` (the tied masked-LM decoder appears once, as the word
            /// embeddings).
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

impl<B: Backend> BertModel<B> {
    /// The configuration.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }
}

pretrained!(BertModel, "Model", false, |c, device| BertModel::new(
    c, true, device
));
pretrained!(
    BertForSequenceClassification,
    "ForSequenceClassification",
    true,
    |c, device| { BertForSequenceClassification::new(c, device) }
);
pretrained!(
    BertForTokenClassification,
    "ForTokenClassification",
    true,
    |c, device| BertForTokenClassification::new(c, device)
);
pretrained!(BertForMaskedLM, "ForMaskedLM", true, |c, device| {
    BertForMaskedLM::new(c, device)
});
pretrained!(
    BertForQuestionAnswering,
    "ForQuestionAnswering",
    true,
    |c, device| BertForQuestionAnswering::new(c, device)
);

/// Checks that `config.json` names an architecture an `Auto*` class can build.
fn check_auto(dir: &Path, auto: &str) -> Result<BertConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
        path: path.clone(),
        source,
    })?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let model_type = value
        .get("model_type")
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    if !matches!(model_type, "bert" | "roberta") {
        return Err(ModelError::Unsupported {
            path,
            message: format!(
                "{auto} cannot build model_type `{model_type}` (supported: bert, roberta)"
            ),
        });
    }
    BertConfig::from_file(&path)
}

/// `AutoConfig`: reads `config.json` of any supported architecture.
pub struct AutoConfig;

impl AutoConfig {
    /// The config of a checkpoint folder (`model_type` bert or roberta).
    /// A Hub repository id is fetched into the Hugging Face cache first (its `config.json`).
    pub fn from_pretrained(dir: impl AsRef<Path>) -> Result<BertConfig> {
        let options = FromPretrainedOptions::default();
        check_auto(
            &crate::hub::resolve_config(dir.as_ref(), &options)?,
            "AutoConfig",
        )
    }
}

macro_rules! auto_class {
    ($auto:ident, $model:ident, $doc:literal) => {
        #[doc = $doc]
        pub struct $auto;

        impl $auto {
            /// Loads the checkpoint in `dir`, choosing the architecture from `model_type`.
            pub fn from_pretrained<B: Backend>(
                dir: impl AsRef<Path>,
                device: &B::Device,
            ) -> Result<$model<B>> {
                Ok(Self::from_pretrained_with(dir, &FromPretrainedOptions::default(), device)?.0)
            }

            /// As [`Self::from_pretrained`], with overrides and the load report.
            pub fn from_pretrained_with<B: Backend>(
                dir: impl AsRef<Path>,
                options: &FromPretrainedOptions,
                device: &B::Device,
            ) -> Result<($model<B>, LoadReport)> {
                let dir = crate::hub::resolve(dir.as_ref(), options)?;
                check_auto(&dir, stringify!($auto))?;
                $model::from_pretrained_with(&*dir, options, device)
            }

            /// A model with fresh weights from a config.
            pub fn from_config<B: Backend>(
                config: &BertConfig,
                device: &B::Device,
            ) -> Result<$model<B>> {
                config.validate().map_err(|message| ModelError::Config {
                    path: "<config>".into(),
                    message,
                })?;
                Ok(auto_build!($model, config, device))
            }
        }
    };
}

macro_rules! auto_build {
    (BertModel, $c:expr, $d:expr) => {
        BertModel::new($c, true, $d)
    };
    ($model:ident, $c:expr, $d:expr) => {
        $model::new($c, $d)
    };
}

auto_class!(
    AutoModel,
    BertModel,
    "`AutoModel`: the bare encoder (`BertModel` / `RobertaModel`)."
);
auto_class!(
    AutoModelForSequenceClassification,
    BertForSequenceClassification,
    "`AutoModelForSequenceClassification`: an encoder with a sequence classification head."
);
auto_class!(
    AutoModelForTokenClassification,
    BertForTokenClassification,
    "`AutoModelForTokenClassification`: an encoder with a per-token classification head."
);
auto_class!(
    AutoModelForMaskedLM,
    BertForMaskedLM,
    "`AutoModelForMaskedLM`: an encoder with its tied masked-LM head."
);
auto_class!(
    AutoModelForQuestionAnswering,
    BertForQuestionAnswering,
    "`AutoModelForQuestionAnswering`: an encoder with a span start / end head."
);
