//! `ember train --task causal-lm`: full fine-tuning of a causal LM (Llama / SmolLM2, Bloom,
//! GPT-2) on alpaca-style instruction rows or, with `--text-column`, plain text.
//!
//! The data is formatted by [`ember::data::causal_lm`] (the chat template when the tokenizer has
//! one, else the seed course's `Human: ... Assistant: ` recipe; the prompt masked with -100),
//! padded per batch by `DataCollatorForTokenClassification` (labels padded with -100, on the
//! right), and trained by the `Trainer` (the model shifts the labels). The final model, the
//! tokenizer and the source folder's `generation_config.json` are saved to the output folder's
//! root; checkpoints go below it as the `Trainer` writes them.

use anyhow::{bail, Context, Result};
use ember::burn::module::AutodiffModule;
use ember::burn::tensor::ElementConversion;
use ember::data::{CausalLmFormatOptions, PromptFormat};
use ember::datasets::{DataCollatorForTokenClassification, DataLoader, Dataset, ExampleDataset};
use ember::models::{AutoModelForCausalLM, FromPretrainedOptions};
use ember::prelude::*;
use ember::train::{IntervalStrategy, TrainableModel, Trainer, TrainingArguments};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The Trainer `ember train --task causal-lm` runs on a model `M`.
type Tr<M> = Trainer<TrainBackend, M, DataCollatorForTokenClassification>;

/// The seed course's `MAX_LENGTH`: the default `--max-length` of `--task causal-lm`.
pub const DEFAULT_MAX_LENGTH: usize = 256;

/// What `ember train --task causal-lm` was asked to do (the relevant `ember train` options).
#[derive(Debug, Clone)]
pub struct CausalLmArgs {
    /// The causal LM folder (`config.json`, weights, tokenizer files).
    pub model: PathBuf,
    /// Training rows: alpaca-style (`instruction`, `input`, `output`) or, with `text_column`,
    /// plain text; .json / .jsonl, .csv or .parquet.
    pub data: PathBuf,
    /// Evaluation rows in the same format: `eval_loss` and `eval_perplexity` at the end (and
    /// during training when `--args` sets an `eval_strategy`).
    pub eval_data: Option<PathBuf>,
    /// Train on this column's whole text instead of instruction rows.
    pub text_column: Option<String>,
    /// `TrainingArguments` as JSON or TOML.
    pub args: Option<PathBuf>,
    /// Overrides `output_dir` of `args`.
    pub output_dir: Option<PathBuf>,
    /// `--resume-from-checkpoint`: a checkpoint folder, or `latest`.
    pub resume_from_checkpoint: Option<PathBuf>,
    /// Truncate each example to this many tokens (also capped at the model's positions).
    pub max_length: usize,
    /// One JSON line per log entry on stdout.
    pub json: bool,
    /// Fresh weights from the folder's `config.json` instead of its checkpoint.
    pub from_scratch: bool,
    /// An `adapter_config.json`-style file: train that adapter only (`--peft`).
    pub peft: Option<PathBuf>,
    /// Quantize the base while loading (with `peft`: QLoRA).
    pub quant: crate::quantize::QuantArgs,
    /// `--bf16` / `--fp16`.
    pub precision: crate::dtype::MixedPrecisionArgs,
}

/// `TrainingArguments` without `--args`: HF's defaults, except that the loss is logged every 10
/// steps (as the seed course does), a checkpoint is saved once per epoch (the last two kept), and
/// nothing is evaluated during training (evaluation keeps every logit, which for a language
/// model's vocabulary is large; the final `eval_loss` is computed without them).
pub fn default_training_arguments() -> TrainingArguments {
    let mut args = TrainingArguments::new("ember-output");
    args.logging_strategy = IntervalStrategy::Steps;
    args.logging_steps = 10.0;
    args.eval_strategy = IntervalStrategy::No;
    args.save_strategy = IntervalStrategy::Epoch;
    args.save_total_limit = Some(2);
    args
}

/// The id padding is written with: `pad_token`, else `eos_token` (GPT-2 has no pad token; the
/// value does not matter since padding is masked and labelled -100), else 0.
pub fn causal_pad_id(tokenizer: &AutoTokenizer) -> i64 {
    tokenizer
        .special_token_id("pad_token")
        .or_else(|| tokenizer.special_token_id("eos_token"))
        .map_or(0, i64::from)
}

/// Reads and formats one data file: instruction rows or `text_column`, truncated to
/// `max_length`. Errors name the file, and the row and field at fault.
pub fn prepare_causal_lm_data(
    path: &Path,
    tokenizer: &AutoTokenizer,
    text_column: Option<&str>,
    max_length: usize,
) -> Result<Dataset> {
    let raw = crate::train::read_data(path)?;
    let columns = raw.column_names();
    let in_file = || format!("`{}`", path.display());
    let ds = match text_column {
        Some(column) => {
            if !columns.iter().any(|c| c == column) {
                bail!(
                    "{}: no column `{column}` (columns: {})",
                    in_file(),
                    columns.join(", ")
                );
            }
            ember::data::tokenize_texts(&raw, tokenizer, column, Some(max_length))
                .with_context(in_file)?
        }
        None => {
            for field in ["instruction", "output"] {
                if !columns.iter().any(|c| c == field) {
                    bail!(
                        "{}: no `{field}` field (columns: {}); causal-LM data is alpaca-style \
                         rows (`instruction`, `input`, `output`), or plain text with \
                         --text-column COLUMN",
                        in_file(),
                        columns.join(", ")
                    );
                }
            }
            let options = CausalLmFormatOptions::default()
                .max_length(max_length)
                .prompt_format(PromptFormat::Auto);
            ember::data::tokenize_instructions(&raw, tokenizer, &options).with_context(in_file)?
        }
    };
    Ok(ds)
}

/// Drops the rows with no token to learn (the prompt alone fills `max_length`), which would
/// only cost time; says how many went.
fn drop_untrainable(ds: Dataset, path: &Path) -> Result<Dataset> {
    let rows = ExampleDataset::new(&ds)?;
    let keep: Vec<usize> = (0..rows.len())
        .filter(|&i| {
            matches!(
                rows.get(i).and_then(|e| e.labels),
                Some(ember::datasets::Label::Tokens(l)) if l.iter().skip(1).any(|&t| t != -100)
            )
        })
        .collect();
    if keep.len() == rows.len() {
        return Ok(ds);
    }
    eprintln!(
        "{}: {} of {} rows dropped: the prompt fills --max-length, nothing is left to learn",
        path.display(),
        rows.len() - keep.len(),
        rows.len()
    );
    if keep.is_empty() {
        bail!(
            "`{}`: no row has a token to learn within --max-length",
            path.display()
        );
    }
    Ok(ds.select(&keep)?)
}

/// The largest token id of a formatted dataset.
fn max_token_id(ds: &Dataset) -> Result<Option<i64>> {
    Ok(ExampleDataset::new(ds)?
        .iter()
        .filter_map(|e| e.input_ids.into_iter().max())
        .max())
}

/// Fine-tunes a causal LM on formatted data (`input_ids`, `attention_mask`, `labels`, as
/// [`ember::data::tokenize_instructions`] writes), logging as `ember train` does, and saves the
/// final model and the tokenizer into `args.output_dir`. With `eval`, also the final `eval_loss`
/// and `eval_perplexity`. Returns the training summary (`train_loss`, `train_runtime`, ...) and
/// those metrics.
///
/// Generic over the model so that any trainable causal LM (an [`ember::models::AnyCausalLm`], one
/// architecture, or one carrying adapters) trains the same way. `attach` sets the trainer up
/// as the process was launched ([`crate::launch::Launched`]).
pub fn fine_tune_causal_lm<M>(
    model: M,
    tokenizer: &AutoTokenizer,
    train: Dataset,
    eval: Option<Dataset>,
    args: TrainingArguments,
    json: bool,
    attach: impl FnOnce(Tr<M>) -> Result<Tr<M>>,
) -> Result<BTreeMap<String, f64>>
where
    M: TrainableModel<TrainBackend> + AutodiffModule<TrainBackend>,
    M::InnerModule: TrainableModel<Backend>,
{
    let output_dir = args.output_dir.clone();
    let eval_batch_size = args.per_device_eval_batch_size;
    let collator = DataCollatorForTokenClassification::new(causal_pad_id(tokenizer));
    let mut trainer = Trainer::new(args, model, collator.clone(), default_device())?
        .train_dataset(train)
        .callback(crate::train::PrintLogs { json });
    if let Some(eval) = &eval {
        trainer = trainer.eval_dataset(eval.clone());
    }
    trainer = attach(trainer)?;
    let mut metrics = trainer.train()?;
    // Every rank takes part in gathering a split model.
    let model = trainer.whole_model()?;
    if !trainer.state.is_world_process_zero {
        // Every rank holds the same weights: rank 0 evaluates, writes them and reports.
        return Ok(metrics);
    }
    if let Some(eval) = &eval {
        let loss = eval_loss(&model.valid(), eval, collator, eval_batch_size)?;
        eprintln!("eval_loss {loss:.4}  perplexity {:.2}", loss.exp());
        metrics.insert("eval_loss".into(), loss);
        metrics.insert("eval_perplexity".into(), loss.exp());
    }
    TrainableModel::save_pretrained(&model, &output_dir).map_err(anyhow::Error::msg)?;
    tokenizer.save_pretrained(&output_dir)?;
    eprintln!(
        "trained {} steps in {:.1} s ({:.1} samples/s); saved to {}",
        trainer.state.global_step,
        metrics["train_runtime"],
        metrics["train_samples_per_second"],
        output_dir.display()
    );
    Ok(metrics)
}

/// The mean loss over `ds` (each batch's mean loss weighted by its examples, as the `Trainer`
/// computes `eval_loss`), without keeping the logits.
fn eval_loss<M: TrainableModel<Backend>>(
    model: &M,
    ds: &Dataset,
    collator: DataCollatorForTokenClassification,
    batch_size: usize,
) -> Result<f64> {
    let loader = DataLoader::new(ds, collator, batch_size)?;
    let (mut sum, mut count) = (0.0f64, 0usize);
    for (i, batch) in loader.iter::<Backend>(0, &default_device()).enumerate() {
        let batch = batch.with_context(|| format!("evaluation batch {i}"))?;
        let n = batch.batch_size();
        let out = model.forward_batch(batch).map_err(anyhow::Error::msg)?;
        sum += out.loss.into_scalar().elem::<f64>() * n as f64;
        count += n;
    }
    Ok(sum / count.max(1) as f64)
}

/// `ember train --task causal-lm`.
pub fn run(a: CausalLmArgs) -> Result<()> {
    let mut args = match &a.args {
        Some(path) => TrainingArguments::from_file(path)?,
        None => default_training_arguments(),
    };
    if let Some(dir) = &a.output_dir {
        args.output_dir = dir.clone();
    }
    crate::train::resume_from(&mut args, a.resume_from_checkpoint.as_deref())?;
    a.precision.apply(&mut args);
    if args.eval_strategy != IntervalStrategy::No && a.eval_data.is_none() {
        bail!(
            "`eval_strategy` is \"{}\" but there is no --eval-data to evaluate on",
            args.eval_strategy.as_str()
        );
    }
    let tokenizer = AutoTokenizer::from_pretrained(&a.model)?;
    let device = default_device();
    crate::train::set_seed(args.seed);
    let model = if a.from_scratch {
        let path = a.model.join("config.json");
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&path)
                .with_context(|| format!("reading `{}`", path.display()))?,
        )
        .with_context(|| format!("parsing `{}`", path.display()))?;
        eprintln!("fresh weights from {}", path.display());
        AutoModelForCausalLM::from_config::<TrainBackend>(&config, &device)?
    } else {
        let (model, report) = AutoModelForCausalLM::from_pretrained_with::<TrainBackend>(
            &a.model,
            &a.quant.options(FromPretrainedOptions::default()),
            &device,
        )?;
        if !report.missing_keys.is_empty() {
            eprintln!(
                "weights not in the checkpoint (freshly initialised): {:?}",
                report.missing_keys
            );
        }
        model
    };
    let mut max_length = a.max_length;
    if let Some(positions) = CausalLm::max_positions(&model) {
        if max_length > positions {
            eprintln!(
                "a max length of {max_length} tokens (--max-length) is more than the model's \
                 {positions} positions: truncating at {positions}"
            );
            max_length = positions;
        }
    }
    let format = if a.text_column.is_some() {
        "plain text"
    } else if tokenizer.chat_template().is_some() {
        "instructions in the tokenizer's chat template"
    } else {
        "instructions as Human: ... Assistant: ..."
    };
    let load = |path: &Path| -> Result<Dataset> {
        let ds = prepare_causal_lm_data(path, &tokenizer, a.text_column.as_deref(), max_length)?;
        let ds = drop_untrainable(ds, path)?;
        let vocab = CausalLm::vocab_size(&model);
        if let Some(id) = max_token_id(&ds)?.filter(|&id| id >= vocab as i64) {
            bail!(
                "`{}`: token id {id} is outside the model's vocabulary ({vocab} entries): the \
                 tokenizer in `{}` does not belong to this model",
                path.display(),
                a.model.display()
            );
        }
        Ok(ds)
    };
    let train = load(&a.data)?;
    let eval = a.eval_data.as_deref().map(load).transpose()?;
    eprintln!(
        "{} training{} examples ({format}), at most {max_length} tokens; {} ({})",
        train.num_rows(),
        eval.as_ref()
            .map(|e| format!(" and {} evaluation", e.num_rows()))
            .unwrap_or_default(),
        model.class_name(),
        a.model.display()
    );
    let output_dir = args.output_dir.clone();
    let launched = crate::launch::launched()?;
    let metrics = match a.peft.as_deref() {
        // `--tp`: a Llama split over the tensor group (other architectures: an error).
        None => fine_tune_causal_lm(
            launched.split(model)?,
            &tokenizer,
            train,
            eval,
            args,
            a.json,
            |t| launched.attach(t),
        )?,
        Some(config) => fine_tune_causal_lm(
            crate::peft::wrap(model, config)?,
            &tokenizer,
            train,
            eval,
            args,
            a.json,
            |t| launched.attach_unsplit(t, "a model with adapters (--peft)"),
        )?,
    };
    // HF's save_pretrained writes the generation config too: keep the source folder's.
    let generation = a.model.join("generation_config.json");
    if generation.is_file() {
        let bytes = std::fs::read(&generation)
            .with_context(|| format!("reading `{}`", generation.display()))?;
        ember::tokenizers::write_atomic(&output_dir.join("generation_config.json"), &bytes)?;
    }
    if crate::launch::is_main_process() {
        println!("{}", serde_json::to_string(&metrics)?);
    }
    Ok(())
}
