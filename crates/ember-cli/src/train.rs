//! `ember train`, `ember evaluate`, `ember predict`: fine-tune a sequence classifier from a
//! labelled text file and a checkpoint folder, score it, and use it. With no arguments,
//! `ember train` runs the embedded demo (see [`crate::demo`]). `--task ner` trains a token
//! classifier, `--task causal-lm` a causal LM (see [`crate::causal_train`]).

use anyhow::{bail, Context, Result};
use ember::burn::tensor::activation::softmax;
use ember::datasets::Feature;
use ember::datasets::{
    load_dataset_split, DataCollatorWithPadding, Dataset, SplitOptions, SplitSize,
};
use ember::models::{
    AutoModelForSequenceClassification, BertForSequenceClassification, FromPretrainedOptions,
};
use ember::prelude::*;
use ember::train::{metrics, Trainer, TrainingArguments};
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

/// Arguments of `ember train`.
#[derive(clap::Args)]
pub struct TrainArgs {
    /// Checkpoint folder (config.json, weights, tokenizer files) to fine-tune. Without it and
    /// without --data, the embedded demo runs.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Labelled examples: .csv, .json / .jsonl or .parquet (with --task causal-lm:
    /// alpaca-style rows with `instruction`, `input`, `output`, or text with --text-column).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Column holding the text [default: text]. With --task causal-lm: train on this column's
    /// whole text instead of instruction rows.
    #[arg(long)]
    text_column: Option<String>,
    /// Column holding the label (class names or integers).
    #[arg(long, default_value = "label")]
    label_column: String,
    /// Separate evaluation examples (same columns); otherwise --test-size of --data is held out
    /// (with --task causal-lm nothing is held out: only this file is evaluated).
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// Fraction of --data held out for evaluation (stratified by label), when no --eval-data
    /// (--task sequence and ner).
    #[arg(long, default_value_t = 0.1)]
    test_size: f64,
    /// TrainingArguments as JSON or TOML, with HF field names. Without it: HF's defaults, with
    /// logging, evaluation and a checkpoint (the last two kept) once per epoch.
    #[arg(long)]
    args: Option<PathBuf>,
    /// Where checkpoints and the final model go (overrides `output_dir` of --args).
    #[arg(long)]
    output_dir: Option<PathBuf>,
    /// Resume from a checkpoint folder (`output_dir/checkpoint-N`), or from the newest one in
    /// the output folder with `latest` (HF's `resume_from_checkpoint=True`). Overrides
    /// `resume_from_checkpoint` of --args.
    #[arg(long, value_name = "CHECKPOINT|latest")]
    resume_from_checkpoint: Option<PathBuf>,
    /// Truncate each text to this many tokens [default: 128; 256 with --task causal-lm].
    #[arg(long)]
    max_length: Option<usize>,
    /// Print one JSON line per log entry (loss, eval metrics) on stdout.
    #[arg(long)]
    json: bool,
    /// Start from fresh weights built from --model's config.json (HF's `from_config`) instead
    /// of its checkpoint: training from scratch with that folder's tokenizer.
    #[arg(long)]
    from_scratch: bool,
    /// PEFT: an `adapter_config.json`-style file (JSON, or TOML with the same fields: LoRA or
    /// IA3). The base weights stay frozen, only the adapter trains, and the final adapter
    /// (adapter_config.json + adapter_model.safetensors) goes to the output folder.
    #[arg(long)]
    peft: Option<PathBuf>,
    /// `sequence` (a label per text), `ner` (CoNLL-style files: a tag per word) or `causal-lm`
    /// (fine-tuning a causal LM on instruction rows or plain text).
    #[arg(long, default_value = "sequence", value_parser = ["sequence", "ner", "causal-lm"])]
    task: String,
    /// Quantize the base while loading (`--load-in-4bit --peft lora.json`: QLoRA).
    #[command(flatten)]
    pub(crate) quant: crate::quantize::QuantArgs,
    /// Mixed-precision training.
    #[command(flatten)]
    pub(crate) precision: crate::dtype::MixedPrecisionArgs,
}

/// Arguments of `ember evaluate`.
#[derive(clap::Args)]
pub struct EvaluateArgs {
    /// A fine-tuned classifier folder (what `ember train` saves).
    #[arg(long)]
    model: PathBuf,
    /// Labelled examples: .csv, .json / .jsonl or .parquet.
    #[arg(long)]
    data: PathBuf,
    /// Column holding the text.
    #[arg(long, default_value = "text")]
    text_column: String,
    /// Column holding the label (names as in the model's id2label, or class ids).
    #[arg(long, default_value = "label")]
    label_column: String,
    /// Truncate each text to this many tokens.
    #[arg(long, default_value_t = 128)]
    max_length: usize,
    /// Examples per batch.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// peft adapters applied to the model (`--adapter DIR[:NAME]`, `--active NAME`).
    #[command(flatten)]
    adapters: crate::peft::AdapterArgs,
    /// `sequence` (a label per text) or `ner` (a CoNLL-style file: seqeval metrics).
    #[arg(long, default_value = "sequence", value_parser = ["sequence", "ner"])]
    task: String,
    /// Quantize the model while loading.
    #[command(flatten)]
    quant: crate::quantize::QuantArgs,
    /// The dtype the weights are kept in.
    #[command(flatten)]
    dtype: crate::dtype::DtypeArgs,
}

/// Arguments of `ember predict`.
#[derive(clap::Args)]
pub struct PredictArgs {
    /// A fine-tuned classifier folder (what `ember train` saves).
    #[arg(long)]
    model: PathBuf,
    /// peft adapters applied to the model (`--adapter DIR[:NAME]`, `--active NAME`).
    #[command(flatten)]
    adapters: crate::peft::AdapterArgs,
    /// Truncate each text to this many tokens.
    #[arg(long, default_value_t = 128)]
    max_length: usize,
    /// Quantize the model while loading.
    #[command(flatten)]
    quant: crate::quantize::QuantArgs,
    /// The dtype the weights are kept in.
    #[command(flatten)]
    dtype: crate::dtype::DtypeArgs,
}

/// HF's `set_seed(args.seed)` before the model is built, as HF's example scripts call it: a
/// new head, fresh weights and new adapters start alike in every run with the same seed.
pub(crate) fn set_seed(seed: u64) {
    use ember::burn::tensor::backend::Backend;
    TrainBackend::seed(&default_device(), seed);
}

/// Reads a data file with the builder its extension names.
pub fn read_data(path: &Path) -> Result<Dataset> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_lowercase();
    let builder = match ext.as_str() {
        "csv" | "tsv" => "csv",
        "json" | "jsonl" => "json",
        "parquet" => "parquet",
        _ => bail!(
            "`{}`: unsupported data file (use .csv, .json, .jsonl or .parquet)",
            path.display()
        ),
    };
    Ok(load_dataset_split(builder, path.to_path_buf(), "train")?)
}

/// Drops rows without text, and encodes the label column as class ids with names.
fn prepare(
    ds: &Dataset,
    text: &str,
    label: &str,
    names: Option<&[String]>,
) -> Result<(Dataset, Vec<String>)> {
    for column in [text, label] {
        if !ds.column_names().iter().any(|c| c == column) {
            bail!(
                "the data has no column `{column}` (columns: {})",
                ds.column_names().join(", ")
            );
        }
    }
    let ds = ds.filter(|row| !row[text].is_null() && !row[label].is_null())?;
    let Some(names) = names else {
        let ds = ds.class_encode_column(label)?;
        let Some(Feature::ClassLabel(names)) = ds.features().get(label).cloned() else {
            bail!("column `{label}` could not be encoded as classes");
        };
        return Ok((ds, names));
    };
    // Known classes (evaluating a trained model): map names, or accept class ids.
    let index: BTreeMap<&str, usize> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();
    let rows: Vec<serde_json::Value> = (0..ds.num_rows())
        .map(|i| {
            let row = ds.row(i)?;
            let value = &row[label];
            let name = value
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| value.to_string());
            let id = index
                .get(name.as_str())
                .copied()
                .or_else(|| {
                    value
                        .as_u64()
                        .map(|v| v as usize)
                        .filter(|v| *v < names.len())
                })
                .with_context(|| {
                    format!("row {i}: label `{name}` is not one of the model's labels {names:?}")
                })?;
            Ok(serde_json::json!({ text: row[text], label: id }))
        })
        .collect::<Result<_>>()?;
    Ok((Dataset::from_json_rows(&rows)?, names.to_vec()))
}

fn tokenize(
    ds: &Dataset,
    tokenizer: &AutoTokenizer,
    text: &str,
    max_length: usize,
) -> Result<Dataset> {
    let options = EncodeOptions::default()
        .truncation(Truncation::LongestFirst)
        .max_length(max_length);
    Ok(ember::data::tokenize_map(
        ds,
        tokenizer,
        text,
        &options,
        1000,
        &[text],
    )?)
}

fn pad_id(tokenizer: &AutoTokenizer) -> i64 {
    tokenizer.special_token_id("pad_token").map_or(0, i64::from)
}

/// accuracy, F1, precision and recall (binary for two classes, macro otherwise).
pub fn compute_metrics(
    p: &ember::train::EvalPrediction,
) -> ember::train::Result<BTreeMap<String, f64>> {
    let (predictions, labels) = p.sequence_classes();
    metrics::classification_metrics(&predictions, &labels)
}

/// Fine-tunes a sequence classifier on the prepared splits and saves the final model and
/// tokenizer into `output_dir`; returns the final evaluation metrics.
pub fn fine_tune(
    model: BertForSequenceClassification<TrainBackend>,
    tokenizer: &AutoTokenizer,
    train: Dataset,
    eval: Dataset,
    args: TrainingArguments,
    json: bool,
) -> Result<BTreeMap<String, f64>> {
    let collator = DataCollatorWithPadding::new(pad_id(tokenizer));
    let launched = crate::launch::launched()?;
    let model = launched.split(model)?;
    run_trainer(
        model,
        tokenizer,
        collator,
        (train, eval),
        args,
        json,
        compute_metrics,
        |t| launched.attach(t),
    )
}

/// Trains any model with the given collator and metrics, evaluates, and saves the model and
/// tokenizer into `output_dir`. `attach` sets the trainer up as the process was launched
/// ([`crate::launch::Launched`]: data or tensor parallel).
#[allow(clippy::too_many_arguments)]
fn run_trainer<M, C>(
    model: M,
    tokenizer: &AutoTokenizer,
    collator: C,
    (train, eval): (Dataset, Dataset),
    args: TrainingArguments,
    json: bool,
    metrics_fn: impl Fn(&ember::train::EvalPrediction) -> ember::train::Result<BTreeMap<String, f64>>
        + Send
        + 'static,
    attach: impl FnOnce(Trainer<TrainBackend, M, C>) -> Result<Trainer<TrainBackend, M, C>>,
) -> Result<BTreeMap<String, f64>>
where
    M: ember::train::TrainableModel<TrainBackend>
        + ember::burn::module::AutodiffModule<TrainBackend>,
    M::InnerModule: ember::train::TrainableModel<Backend>,
    C: ember::datasets::Collator + Clone + 'static,
{
    let output_dir = args.output_dir.clone();
    let mut trainer = Trainer::new(args, model, collator, default_device())?
        .train_dataset(train)
        .eval_dataset(eval.clone())
        .compute_metrics(metrics_fn)
        .callback(PrintLogs { json });
    trainer = attach(trainer)?;
    let summary = trainer.train()?;
    let metrics = trainer.evaluate(&eval)?;
    // Every rank takes part (a split model is gathered first); world rank 0 writes.
    trainer.save_model(&output_dir)?;
    if !trainer.state.is_world_process_zero {
        return Ok(metrics);
    }
    tokenizer.save_pretrained(&output_dir)?;
    eprintln!(
        "trained {} steps in {:.1} s ({:.1} samples/s); saved to {}",
        trainer.state.global_step,
        summary["train_runtime"],
        summary["train_samples_per_second"],
        output_dir.display()
    );
    Ok(metrics)
}

/// `ember train --task ner`: a token classifier on CoNLL-style files, labels aligned to the
/// first sub-token of each word, scored with seqeval.
fn train_ner(
    a: &TrainArgs,
    model_dir: &Path,
    data: &Path,
    args: TrainingArguments,
    max_length: usize,
) -> Result<()> {
    let tokenizer = AutoTokenizer::from_pretrained(model_dir)?;
    let train = ember::datasets::read_conll(data)?;
    let Some(Feature::List(inner)) = train.features().get("ner_tags").cloned() else {
        bail!("`{}`: no ner_tags column", data.display());
    };
    let Feature::ClassLabel(names) = *inner else {
        bail!("`{}`: ner_tags are not class labels", data.display())
    };
    let (train, eval) = match &a.eval_data {
        Some(path) => (
            train,
            ember::datasets::read_conll_with_labels(path, &names)?,
        ),
        None => {
            let split = train.train_test_split(&SplitOptions {
                test_size: Some(SplitSize::Fraction(a.test_size)),
                seed: args.seed,
                ..Default::default()
            })?;
            (split.split("train")?.clone(), split.split("test")?.clone())
        }
    };
    eprintln!(
        "{} training and {} evaluation sentences, tags {names:?}",
        train.num_rows(),
        eval.num_rows()
    );
    let options = EncodeOptions::default()
        .truncation(Truncation::LongestFirst)
        .max_length(max_length);
    let train = ember::data::tokenize_and_align_labels(&train, &tokenizer, &options, 1000)?;
    let eval = ember::data::tokenize_and_align_labels(&eval, &tokenizer, &options, 1000)?;
    let options = a.quant.options(
        FromPretrainedOptions::default()
            .labels(names.clone())
            .ignore_mismatched_sizes(true),
    );
    set_seed(args.seed);
    let (model, report) = ember::models::AutoModelForTokenClassification::from_pretrained_with::<
        TrainBackend,
    >(model_dir, &options, &default_device())?;
    if !report.missing_keys.is_empty() {
        eprintln!("new head (freshly initialised): {:?}", report.missing_keys);
    }
    let collator = ember::datasets::DataCollatorForTokenClassification::new(pad_id(&tokenizer));
    let launched = crate::launch::launched()?;
    let metrics = crate::peft::maybe_peft!(model, a.peft.as_deref(), |m| run_trainer(
        m,
        &tokenizer,
        collator,
        (train, eval),
        args,
        a.json,
        ner_metrics(names),
        |t| launched.attach_unsplit(t, "a token classifier (--task ner)"),
    )?);
    if crate::launch::is_main_process() {
        println!("{}", serde_json::to_string(&metrics)?);
    }
    Ok(())
}

/// seqeval's entity-level precision, recall and F1 (and token accuracy) over the positions
/// that carry a label, with the tag names of `names`.
fn ner_metrics(
    names: Vec<String>,
) -> impl Fn(&ember::train::EvalPrediction) -> ember::train::Result<BTreeMap<String, f64>> + Send + 'static
{
    move |p| {
        let (predicted, labels) = p.token_classes();
        let tags = |rows: Vec<Vec<usize>>| -> Vec<Vec<String>> {
            rows.into_iter()
                .map(|r| {
                    r.into_iter()
                        .map(|i| names.get(i).cloned().unwrap_or_else(|| "O".into()))
                        .collect()
                })
                .collect()
        };
        let report = metrics::seqeval(&tags(predicted), &tags(labels))?;
        Ok(BTreeMap::from([
            ("precision".to_owned(), report.precision),
            ("recall".to_owned(), report.recall),
            ("f1".to_owned(), report.f1),
            ("accuracy".to_owned(), report.accuracy),
        ]))
    }
}

/// `ember evaluate --task ner`: seqeval metrics of a token classifier on a CoNLL-style file.
fn evaluate_ner(a: &EvaluateArgs) -> Result<()> {
    let tokenizer = AutoTokenizer::from_pretrained(&a.model)?;
    let model =
        ember::models::AutoModelForTokenClassification::from_pretrained_with::<TrainBackend>(
            &a.model,
            &a.dtype
                .options(a.quant.options(FromPretrainedOptions::default()))?,
            &default_device(),
        )?
        .0;
    let model = a.adapters.apply(model)?;
    let names: Vec<String> = model
        .config()
        .id2label
        .clone()
        .unwrap_or_default()
        .into_values()
        .collect();
    let ds = ember::datasets::read_conll_with_labels(&a.data, &names)?;
    let options = EncodeOptions::default()
        .truncation(Truncation::LongestFirst)
        .max_length(a.max_length);
    let ds = ember::data::tokenize_and_align_labels(&ds, &tokenizer, &options, 1000)?;
    let scratch = tempfile::tempdir()?;
    let args = TrainingArguments {
        output_dir: scratch.path().to_owned(),
        per_device_eval_batch_size: a.batch_size,
        disable_tqdm: true,
        ..TrainingArguments::default()
    };
    let collator = ember::datasets::DataCollatorForTokenClassification::new(pad_id(&tokenizer));
    let mut trainer =
        Trainer::new(args, model, collator, default_device())?.compute_metrics(ner_metrics(names));
    let metrics = trainer.evaluate(&ds)?;
    println!("{}", serde_json::to_string(&metrics)?);
    Ok(())
}

/// Prints each log entry: JSON lines on stdout with `--json`, a short line on stderr otherwise.
pub(crate) struct PrintLogs {
    /// JSON lines on stdout.
    pub(crate) json: bool,
}

impl ember::train::TrainerCallback for PrintLogs {
    fn on_log(
        &mut self,
        _: &TrainingArguments,
        state: &ember::train::TrainerState,
        logs: &serde_json::Map<String, serde_json::Value>,
    ) {
        if !state.is_world_process_zero {
            return;
        }
        if self.json {
            println!("{}", serde_json::Value::Object(logs.clone()));
            return;
        }
        let get = |k: &str| logs.get(k).and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
        if logs.contains_key("loss") {
            // HF prints every training log entry too, progress bar or not.
            eprintln!(
                "step {} (epoch {:.2}): loss {:.4}  learning_rate {:.3e}  grad_norm {:.3}",
                state.global_step,
                get("epoch"),
                get("loss"),
                get("learning_rate"),
                get("grad_norm")
            );
        }
        if logs.contains_key("eval_loss") {
            // The metrics this task has (a causal LM has no accuracy).
            let mut line = format!(
                "epoch {:.2}: eval_loss {:.4}",
                get("epoch"),
                get("eval_loss")
            );
            for name in ["accuracy", "f1"] {
                if let Some(v) = logs.get(&format!("eval_{name}")).and_then(|v| v.as_f64()) {
                    line.push_str(&format!("  {name} {v:.4}"));
                }
            }
            eprintln!("{line}");
        }
    }
}

pub fn run_train(a: TrainArgs) -> Result<()> {
    if a.quant.config().is_some() && a.peft.is_none() {
        // transformers' Trainer refuses the same: a packed weight has no gradient.
        bail!(
            "a quantized model cannot be fine-tuned on its own: add --peft with a LoRA config \
             (QLoRA), which trains adapters beside the frozen quantized weights"
        );
    }
    let Some(data) = &a.data else {
        if a.model.is_some() {
            bail!("--model needs --data (the labelled examples to fine-tune on)");
        }
        if a.task != "sequence" {
            bail!("--task {} needs --model and --data", a.task);
        }
        return crate::demo::run(
            a.output_dir.unwrap_or_else(|| PathBuf::from("ember-demo")),
            a.json,
        );
    };
    let model_dir = a
        .model
        .as_ref()
        .context("--data needs --model (the checkpoint folder to fine-tune)")?;
    if a.task == "causal-lm" {
        return crate::causal_train::run(crate::causal_train::CausalLmArgs {
            model: model_dir.clone(),
            data: data.clone(),
            eval_data: a.eval_data.clone(),
            text_column: a.text_column.clone(),
            args: a.args.clone(),
            output_dir: a.output_dir.clone(),
            resume_from_checkpoint: a.resume_from_checkpoint.clone(),
            max_length: a
                .max_length
                .unwrap_or(crate::causal_train::DEFAULT_MAX_LENGTH),
            json: a.json,
            from_scratch: a.from_scratch,
            peft: a.peft.clone(),
            quant: a.quant.clone(),
            precision: a.precision.clone(),
        });
    }
    let text_column = a.text_column.as_deref().unwrap_or("text");
    let max_length = a.max_length.unwrap_or(128);
    let mut args = match &a.args {
        Some(path) => TrainingArguments::from_file(path)?,
        None => {
            // Without --args: HF's defaults, except that the loss is logged, the model
            // evaluated and a checkpoint saved once per epoch (the last two kept).
            let mut args = TrainingArguments::new("ember-output");
            args.logging_strategy = ember::train::IntervalStrategy::Epoch;
            args.eval_strategy = ember::train::IntervalStrategy::Epoch;
            args.save_strategy = ember::train::IntervalStrategy::Epoch;
            args.save_total_limit = Some(2);
            args
        }
    };
    if let Some(dir) = &a.output_dir {
        args.output_dir = dir.clone();
    }
    resume_from(&mut args, a.resume_from_checkpoint.as_deref())?;
    a.precision.apply(&mut args);
    if a.task == "ner" {
        return train_ner(&a, model_dir, data, args, max_length);
    }
    let tokenizer = AutoTokenizer::from_pretrained(model_dir)?;
    let (train, names) = prepare(&read_data(data)?, text_column, &a.label_column, None)?;
    let (train, eval) = match &a.eval_data {
        Some(path) => {
            let (eval, _) = prepare(
                &read_data(path)?,
                text_column,
                &a.label_column,
                Some(&names),
            )?;
            (train, eval)
        }
        None => {
            let split = train.train_test_split(&SplitOptions {
                test_size: Some(SplitSize::Fraction(a.test_size)),
                stratify_by_column: Some(a.label_column.clone()),
                seed: args.seed,
                ..Default::default()
            })?;
            (split.split("train")?.clone(), split.split("test")?.clone())
        }
    };
    eprintln!(
        "{} training and {} evaluation examples, labels {names:?}",
        train.num_rows(),
        eval.num_rows()
    );
    let train = tokenize(&train, &tokenizer, text_column, max_length)?;
    let eval = tokenize(&eval, &tokenizer, text_column, max_length)?;
    set_seed(args.seed);
    let model = if a.from_scratch {
        let mut config = ember::models::read_config(model_dir)?;
        config.set_labels(names);
        eprintln!(
            "fresh weights from {}",
            model_dir.join("config.json").display()
        );
        AutoModelForSequenceClassification::from_config::<TrainBackend>(&config, &default_device())?
    } else {
        let options = a.quant.options(
            FromPretrainedOptions::default()
                .labels(names)
                .ignore_mismatched_sizes(true),
        );
        let (model, report) = AutoModelForSequenceClassification::from_pretrained_with::<
            TrainBackend,
        >(model_dir, &options, &default_device())?;
        if !report.missing_keys.is_empty() {
            eprintln!("new head (freshly initialised): {:?}", report.missing_keys);
        }
        model
    };
    let launched = crate::launch::launched()?;
    let collator = DataCollatorWithPadding::new(pad_id(&tokenizer));
    let metrics = match a.peft.as_deref() {
        // `--tp`: the encoder (`base_model`) split over the tensor group.
        None => run_trainer(
            launched.split(model)?,
            &tokenizer,
            collator,
            (train, eval),
            args,
            a.json,
            compute_metrics,
            |t| launched.attach(t),
        )?,
        Some(config) => run_trainer(
            crate::peft::wrap(model, config)?,
            &tokenizer,
            collator,
            (train, eval),
            args,
            a.json,
            compute_metrics,
            |t| launched.attach_unsplit(t, "a model with adapters (--peft)"),
        )?,
    };
    if crate::launch::is_main_process() {
        println!("{}", serde_json::to_string(&metrics)?);
    }
    Ok(())
}

/// `--resume-from-checkpoint`: a checkpoint folder, or `latest` for the newest one of
/// `output_dir` (an error when there is none, as HF's `resume_from_checkpoint=True`).
pub(crate) fn resume_from(args: &mut TrainingArguments, checkpoint: Option<&Path>) -> Result<()> {
    let Some(checkpoint) = checkpoint else {
        return Ok(());
    };
    if checkpoint != Path::new("latest") {
        if !checkpoint.is_dir() {
            bail!(
                "--resume-from-checkpoint `{}` is not a checkpoint folder",
                checkpoint.display()
            );
        }
        args.resume_from_checkpoint = Some(checkpoint.to_owned());
        return Ok(());
    }
    let newest = ember::train::get_last_checkpoint(&args.output_dir)?.with_context(|| {
        format!(
            "--resume-from-checkpoint latest: no checkpoint-N folder in `{}`",
            args.output_dir.display()
        )
    })?;
    eprintln!("resuming from {}", newest.display());
    args.resume_from_checkpoint = Some(newest);
    Ok(())
}

fn load_classifier(
    dir: &Path,
    adapters: &crate::peft::AdapterArgs,
    quant: &crate::quantize::QuantArgs,
    dtype: &crate::dtype::DtypeArgs,
) -> Result<(
    AutoTokenizer,
    BertForSequenceClassification<Backend>,
    Vec<String>,
)> {
    let tokenizer = AutoTokenizer::from_pretrained(dir)?;
    let model = AutoModelForSequenceClassification::from_pretrained_with::<Backend>(
        dir,
        &dtype.options(quant.options(FromPretrainedOptions::default()))?,
        &default_device(),
    )?
    .0;
    let model = adapters.apply(model)?;
    let names: Vec<String> = model
        .config()
        .id2label
        .clone()
        .unwrap_or_default()
        .into_values()
        .collect();
    Ok((tokenizer, model, names))
}

pub fn run_evaluate(a: EvaluateArgs) -> Result<()> {
    if a.task == "ner" {
        return evaluate_ner(&a);
    }
    let (tokenizer, model, names) = load_classifier(&a.model, &a.adapters, &a.quant, &a.dtype)?;
    let (ds, _) = prepare(
        &read_data(&a.data)?,
        &a.text_column,
        &a.label_column,
        Some(&names),
    )?;
    let ds = tokenize(&ds, &tokenizer, &a.text_column, a.max_length)?;
    let loader = ember::datasets::DataLoader::new(
        &ds,
        DataCollatorWithPadding::new(pad_id(&tokenizer)),
        a.batch_size,
    )?;
    let (mut predictions, mut labels, mut loss_sum) = (Vec::new(), Vec::new(), 0.0);
    for batch in loader.iter::<Backend>(0, &default_device()) {
        let out = ember::train::TrainableModel::forward_batch(&model, batch?)
            .map_err(anyhow::Error::msg)?;
        let [n, _, classes] = out.logits.dims();
        loss_sum += out.loss.into_scalar() as f64 * n as f64;
        let logits: Vec<f32> = out
            .logits
            .into_data()
            .to_vec()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        predictions.extend(metrics::argmax_rows(&logits, classes));
    }
    for row in 0..ds.num_rows() {
        labels.push(ds.row(row)?["label"].as_u64().unwrap_or_default() as usize);
    }
    let mut result = metrics::classification_metrics(&predictions, &labels)?;
    result.insert("loss".into(), loss_sum / labels.len().max(1) as f64);
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

pub fn run_predict(a: PredictArgs) -> Result<()> {
    let (tokenizer, model, names) = load_classifier(&a.model, &a.adapters, &a.quant, &a.dtype)?;
    let options = EncodeOptions::default()
        .truncation(Truncation::LongestFirst)
        .max_length(a.max_length);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for (n, line) in std::io::stdin().lock().lines().enumerate() {
        let text = line.with_context(|| format!("reading stdin line {}", n + 1))?;
        let batch = tokenizer
            .batch_encode(&[text.as_str()], &options)?
            .to_tensors::<Backend>(&default_device())?;
        let logits = model
            .forward(ember::data::encoder_input(batch), None)?
            .logits;
        let probs: Vec<f32> = softmax(logits, 1)
            .into_data()
            .to_vec()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let best = metrics::argmax_rows(&probs, probs.len())[0];
        let label = names.get(best).cloned().unwrap_or_else(|| best.to_string());
        writeln!(
            out,
            "{}",
            serde_json::json!({ "label": label, "score": probs[best] })
        )?;
    }
    out.flush()?;
    Ok(())
}
