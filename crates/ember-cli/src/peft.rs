//! Adapters on the command line: `--adapter DIR[:NAME]` (repeatable) with `--active NAME` on
//! the commands that run a model, `ember inspect` (the model's modules by HF path, and peft's
//! trainable-parameter line for an adapter) and `ember merge` (`merge_and_unload`, then
//! `save_pretrained`).

use anyhow::{bail, Context, Result};
use ember::models::{
    AnyCausalLm, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM,
    AutoModelForSequenceClassification, AutoModelForTokenClassification, BertForMaskedLM,
    BertForSequenceClassification, BertForTokenClassification, BertModel, FromPretrainedOptions,
};
use ember::peft::{named_modules, AdaptableModel, PeftModel, DEFAULT_ADAPTER};
use ember::prelude::*;
use ember::tokenizers::AutoTokenizer;
use std::path::{Path, PathBuf};

/// `--adapter` / `--active`, shared by `generate`, `embed`, `predict` and `evaluate`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct AdapterArgs {
    /// A peft adapter folder (adapter_config.json + adapter_model.safetensors) applied to the
    /// model; repeatable as DIR:NAME to load several, with --active choosing one.
    #[arg(long = "adapter", value_name = "DIR[:NAME]")]
    pub adapters: Vec<String>,
    /// The adapter that runs when several are loaded [default: the first].
    #[arg(long, requires = "adapters")]
    pub active: Option<String>,
}

impl AdapterArgs {
    /// `(folder, name)` of each `--adapter`; unnamed ones are `default`, `default_1`, ...
    fn parsed(&self) -> Vec<(PathBuf, String)> {
        self.adapters
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let named = spec.rsplit_once(':').filter(|(dir, name)| {
                    !dir.is_empty() && !name.contains('/') && !name.is_empty()
                });
                match named {
                    Some((dir, name)) => (PathBuf::from(dir), name.to_owned()),
                    None if i == 0 => (PathBuf::from(spec), DEFAULT_ADAPTER.to_owned()),
                    None => (PathBuf::from(spec), format!("{DEFAULT_ADAPTER}_{i}")),
                }
            })
            .collect()
    }

    /// `model` with the adapters loaded (frozen) and the chosen one active; the layers keep
    /// the adapters unmerged, as peft runs a `PeftModel`.
    pub fn apply<B: BackendTrait, M: AdaptableModel<B>>(&self, model: M) -> Result<M> {
        Ok(match self.load(model)? {
            Loaded::Plain(m) => m,
            Loaded::Peft(p) => p.base_model,
        })
    }

    fn load<B: BackendTrait, M: AdaptableModel<B>>(&self, model: M) -> Result<Loaded<B, M>> {
        let specs = self.parsed();
        let Some(((first_dir, first_name), rest)) = specs.split_first() else {
            return Ok(Loaded::Plain(model));
        };
        let mut peft = PeftModel::from_pretrained(model, first_dir, first_name, false)
            .with_context(|| format!("loading the adapter in {}", first_dir.display()))?;
        for (dir, name) in rest {
            peft.load_adapter(dir, name, false)
                .with_context(|| format!("loading the adapter in {}", dir.display()))?;
        }
        if let Some(active) = &self.active {
            peft.set_adapter(active)?;
        }
        Ok(Loaded::Peft(peft))
    }
}

enum Loaded<B: BackendTrait, M: AdaptableModel<B>> {
    Plain(M),
    Peft(PeftModel<B, M>),
}

/// `get_peft_model(model, config)` for `ember train --peft CONFIG`, printing peft's
/// trainable-parameter line.
pub fn wrap<M: AdaptableModel<TrainBackend>>(
    model: M,
    config: &Path,
) -> Result<PeftModel<TrainBackend, M>> {
    let config = ember::peft::PeftConfig::from_file(config)?;
    let peft = ember::peft::PeftModel::new(model, config, DEFAULT_ADAPTER)?;
    eprintln!("{}", peft.trainable_parameters_line());
    Ok(peft)
}

/// Runs `$body` with `$m` bound to `$model`, or to `$model` with the adapter of `--peft`
/// (`Option<&Path>`) added when one is given: one training code path for both.
macro_rules! maybe_peft {
    ($model:expr, $peft:expr, |$m:ident| $body:expr) => {
        match $peft {
            Some(config) => {
                let $m = $crate::peft::wrap($model, config)?;
                $body
            }
            None => {
                let $m = $model;
                $body
            }
        }
    };
}
pub(crate) use maybe_peft;

/// Any model folder Ember loads, by its `config.json`.
pub enum AnyModel<B: BackendTrait> {
    /// A causal LM.
    Causal(AnyCausalLm<B>),
    /// `*ForSequenceClassification`.
    Sequence(BertForSequenceClassification<B>),
    /// `*ForTokenClassification`.
    Token(BertForTokenClassification<B>),
    /// `*ForMaskedLM`.
    Masked(BertForMaskedLM<B>),
    /// A bare encoder.
    Encoder(BertModel<B>),
}

/// Runs `$body` with `$m` bound to the concrete model inside an [`AnyModel`].
macro_rules! each_model {
    ($model:expr, $m:ident => $body:expr) => {
        match $model {
            AnyModel::Causal(AnyCausalLm::Llama($m)) => $body,
            AnyModel::Causal(AnyCausalLm::Bloom($m)) => $body,
            AnyModel::Causal(AnyCausalLm::Gpt2($m)) => $body,
            AnyModel::Sequence($m) => $body,
            AnyModel::Token($m) => $body,
            AnyModel::Masked($m) => $body,
            AnyModel::Encoder($m) => $body,
        }
    };
}

impl<B: BackendTrait> AnyModel<B> {
    /// Loads `dir` with the class its `config.json` names (`architectures`, else
    /// `model_type`).
    pub fn from_pretrained(dir: &Path, device: &B::Device) -> Result<Self> {
        Self::from_pretrained_with(dir, &FromPretrainedOptions::default(), device)
    }

    /// [`Self::from_pretrained`] with `from_pretrained` options (a `quantization_config`).
    pub fn from_pretrained_with(
        dir: &Path,
        options: &FromPretrainedOptions,
        device: &B::Device,
    ) -> Result<Self> {
        // A Hub repository id becomes its snapshot folder, so `config.json` can be read here.
        let dir = &ember::models::pretrained_dir(dir, options)?;
        let config = read_config_json(dir)?;
        let model_type = config["model_type"].as_str().unwrap_or_default();
        if ember::models::CAUSAL_MODEL_TYPES.contains(&model_type) {
            return Ok(Self::Causal(
                AutoModelForCausalLM::from_pretrained_with(dir, options, device)?.0,
            ));
        }
        let arch = config["architectures"][0].as_str().unwrap_or_default();
        Ok(if arch.ends_with("ForSequenceClassification") {
            Self::Sequence(
                AutoModelForSequenceClassification::from_pretrained_with(dir, options, device)?.0,
            )
        } else if arch.ends_with("ForTokenClassification") {
            Self::Token(
                AutoModelForTokenClassification::from_pretrained_with(dir, options, device)?.0,
            )
        } else if arch.ends_with("ForMaskedLM") {
            Self::Masked(AutoModelForMaskedLM::from_pretrained_with(dir, options, device)?.0)
        } else {
            Self::Encoder(AutoModel::from_pretrained_with(dir, options, device)?.0)
        })
    }

    /// The model class of `dir` with fresh, not yet drawn parameters: its shapes without
    /// reading any weight.
    pub fn from_config_of(dir: &Path, device: &B::Device) -> Result<Self> {
        let config = read_config_json(dir)?;
        let model_type = config["model_type"].as_str().unwrap_or_default();
        if ember::models::CAUSAL_MODEL_TYPES.contains(&model_type) {
            return Ok(Self::Causal(AutoModelForCausalLM::from_config(
                &config, device,
            )?));
        }
        let bert = ember::models::read_config(dir)?;
        let arch = config["architectures"][0].as_str().unwrap_or_default();
        Ok(if arch.ends_with("ForSequenceClassification") {
            Self::Sequence(AutoModelForSequenceClassification::from_config(
                &bert, device,
            )?)
        } else if arch.ends_with("ForTokenClassification") {
            Self::Token(AutoModelForTokenClassification::from_config(&bert, device)?)
        } else if arch.ends_with("ForMaskedLM") {
            Self::Masked(AutoModelForMaskedLM::from_config(&bert, device)?)
        } else {
            Self::Encoder(AutoModel::from_config(&bert, device)?)
        })
    }

    /// transformers' `get_memory_footprint()`.
    pub fn get_memory_footprint(&self) -> usize {
        each_model!(self, m => m.get_memory_footprint())
    }

    /// Writes `config.json` and `model.safetensors` (packed weights in bitsandbytes' layout).
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        each_model!(self, m => m.save_pretrained(dir))?;
        Ok(())
    }
}

/// `config.json` of a checkpoint folder as JSON.
fn read_config_json(dir: &Path) -> Result<serde_json::Value> {
    let path = dir.join("config.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Arguments of `ember inspect`.
#[derive(clap::Args)]
pub struct InspectArgs {
    /// A model folder (config.json + weights).
    #[arg(long)]
    model: PathBuf,
    /// A peft adapter folder: adds its modules and peft's trainable-parameter line.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// One JSON object per module instead of text.
    #[arg(long)]
    json: bool,
}

/// `ember inspect`: every leaf module by HF path with its type and parameter shapes (what
/// `model.named_modules()` shows when choosing `target_modules`).
pub fn run_inspect(a: InspectArgs) -> Result<()> {
    let device = default_device();
    let model = AnyModel::<Backend>::from_pretrained(&a.model, &device)?;
    each_model!(model, m => inspect(m, &a))
}

fn inspect<M: AdaptableModel<Backend>>(model: M, a: &InspectArgs) -> Result<()> {
    for m in named_modules(&model) {
        if a.json {
            let params: serde_json::Map<String, serde_json::Value> = m
                .params
                .iter()
                .map(|(n, s)| (n.clone(), serde_json::json!(s)))
                .collect();
            println!(
                "{}",
                serde_json::json!({"name": m.name, "type": m.kind, "params": params})
            );
        } else {
            println!("{m}");
        }
    }
    if let Some(dir) = &a.adapter {
        let peft = PeftModel::from_pretrained(model, dir, DEFAULT_ADAPTER, true)
            .with_context(|| format!("loading the adapter in {}", dir.display()))?;
        for p in peft.named_parameters().iter().filter(|p| p.trainable) {
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({"adapter_param": p.name, "shape": p.shape})
                );
            } else {
                println!("{} {:?}", p.name, p.shape);
            }
        }
        println!("{}", peft.trainable_parameters_line());
    }
    Ok(())
}

/// Arguments of `ember merge`.
#[derive(clap::Args)]
pub struct MergeArgs {
    /// The base model folder the adapter was trained on.
    #[arg(long)]
    model: PathBuf,
    /// The adapter folder.
    #[arg(long)]
    adapter: PathBuf,
    /// Where the merged model goes (config.json, model.safetensors, tokenizer files).
    #[arg(long)]
    output_dir: PathBuf,
}

/// `ember merge`: `PeftModel.from_pretrained(base, adapter).merge_and_unload()`, then
/// `save_pretrained`: the folder loads in Python transformers alone.
pub fn run_merge(a: MergeArgs) -> Result<()> {
    if a.output_dir == a.model {
        bail!("--output-dir must differ from --model (the base checkpoint would be overwritten)");
    }
    let config = ember::peft::PeftConfig::from_pretrained(&a.adapter)
        .with_context(|| format!("reading the adapter in {}", a.adapter.display()))?;
    if config.is_prompt_learning() {
        bail!(
            "{}: a {} adapter has no weights to merge (its virtual tokens or prefix run before the model); use it with --adapter",
            a.adapter.display(),
            config.peft_type()
        );
    }
    let device = default_device();
    let model = AnyModel::<Backend>::from_pretrained(&a.model, &device)?;
    each_model!(model, m => {
        let peft = PeftModel::from_pretrained(m, &a.adapter, DEFAULT_ADAPTER, false)
            .with_context(|| format!("loading the adapter in {}", a.adapter.display()))?;
        peft.merge_and_unload().save_pretrained(&a.output_dir)?;
    });
    if let Ok(tokenizer) = AutoTokenizer::from_pretrained(&a.model) {
        tokenizer.save_pretrained(&a.output_dir)?;
    }
    let generation = a.model.join("generation_config.json");
    if generation.is_file() {
        std::fs::copy(&generation, a.output_dir.join("generation_config.json"))
            .with_context(|| format!("copying {}", generation.display()))?;
    }
    eprintln!(
        "merged {} into {}",
        a.adapter.display(),
        a.output_dir.display()
    );
    Ok(())
}
