//! `ember-gpu-check`: the parts of the GPU check that the `ember` CLI cannot time or run.
//!
//! The CLI embeds and generates one sequence at a time and prints no timings, and its `train`
//! shuffles the examples; the checks need batches of 64, a timed training step and the
//! Trainer run of `tests/fixtures/train` with the examples in order. Each subcommand prints
//! one JSON line on stdout; `xtask/gpu/check.sh` collects them into the report.
//!
//! ```text
//! ember-gpu-check trainer-parity --fixture F.json --model DIR [--steps 10]
//! ember-gpu-check bert-forward   --shape base|tiny --batch B --seq S --dtype f32|bf16 [--iters N]
//! ember-gpu-check bert-train-step --shape base|tiny --batch B --seq S [--bf16] [--iters N]
//! ember-gpu-check decode --model DIR --batch B --prompt P --new N --dtype f32|bf16 [--iters N]
//! ```
//!
//! Timings: `--warmup` untimed runs first (default 2: the first one compiles the CUDA kernels
//! through NVRTC), then `--iters` timed runs, each ending in a read back to the host so that
//! the GPU's queue is drained inside the measured time.

use anyhow::{bail, ensure, Context, Result};
use ember::burn::module::{AutodiffModule, Module};
use ember::burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use ember::burn::tensor::{DType, Distribution, Int, Tensor};
use ember::datasets::{DataCollatorWithPadding, Dataset};
use ember::models::generation::{generate, GenerateOptions, GenerationConfig, Prompt};
use ember::models::{
    BertConfig, BertForSequenceClassification, BertModel, EncoderInput, FromPretrainedOptions,
    LlamaForCausalLM, OutputOptions, SequenceLabels,
};
use ember::train::{IntervalStrategy, Trainer, TrainingArguments};
use ember::{Backend, TrainBackend};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

fn main() {
    ember::keep_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = run(&args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// `--flag value` pairs after the subcommand; a flag without a value (`--bf16`) maps to "".
fn flags(args: &[String]) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut rest = args.iter().peekable();
    while let Some(flag) = rest.next() {
        let Some(name) = flag.strip_prefix("--") else {
            bail!("expected a --flag, got `{flag}`");
        };
        let value = match rest.peek() {
            Some(v) if !v.starts_with("--") => rest.next().unwrap().clone(),
            _ => String::new(),
        };
        out.insert(name.to_owned(), value);
    }
    Ok(out)
}

fn get<T: std::str::FromStr>(
    f: &BTreeMap<String, String>,
    name: &str,
    default: Option<T>,
) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    match (f.get(name), default) {
        (Some(v), _) => v
            .parse()
            .map_err(|e| anyhow::anyhow!("--{name} `{v}`: {e}")),
        (None, Some(d)) => Ok(d),
        (None, None) => bail!("--{name} is required"),
    }
}

fn run(args: &[String]) -> Result<()> {
    let Some(command) = args.first() else {
        bail!("usage: ember-gpu-check <trainer-parity | bert-forward | bert-train-step | decode> --flags (see the source's header)");
    };
    let f = flags(&args[1..])?;
    let line = match command.as_str() {
        "trainer-parity" => trainer_parity(&f)?,
        "bert-forward" => bert_forward(&f)?,
        "bert-train-step" => bert_train_step(&f)?,
        "decode" => decode(&f)?,
        other => bail!("unknown subcommand `{other}`"),
    };
    println!("{line}");
    Ok(())
}

/// Runs `work` `warmup` times untimed, then `iters` times timed; the JSON timing fields.
fn time(warmup: usize, iters: usize, mut work: impl FnMut() -> Result<()>) -> Result<Value> {
    ensure!(iters > 0, "--iters must be at least 1");
    let mut warm = Vec::new();
    for _ in 0..warmup {
        let start = Instant::now();
        work()?;
        warm.push(start.elapsed().as_secs_f64());
    }
    let mut times = Vec::new();
    for _ in 0..iters {
        let start = Instant::now();
        work()?;
        times.push(start.elapsed().as_secs_f64());
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = if sorted.len() % 2 == 1 {
        sorted[sorted.len() / 2]
    } else {
        (sorted[sorted.len() / 2 - 1] + sorted[sorted.len() / 2]) / 2.0
    };
    Ok(json!({ "median_s": median, "min_s": sorted[0], "times_s": times, "warmup_s": warm }))
}

/// The BERT shapes of the speed rows: bert-base-uncased, or a tiny one for CPU self-tests.
/// `xtask/gpu/torch_reference.py` builds the same two.
fn bert_config(shape: &str) -> Result<BertConfig> {
    let (vocab, hidden, layers, heads, intermediate) = match shape {
        "base" => (30522, 768, 12, 12, 3072),
        "tiny" => (1000, 64, 2, 4, 128),
        other => bail!("--shape `{other}`: base or tiny"),
    };
    Ok(BertConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        intermediate_size: intermediate,
        ..BertConfig::default()
    })
}

fn random_ids<B: ember::burn::tensor::backend::Backend>(
    batch: usize,
    seq: usize,
    vocab: usize,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    Tensor::<B, 2>::random(
        [batch, seq],
        Distribution::Uniform(0.0, vocab as f64),
        device,
    )
    .int()
}

/// BERT forward (`BertModel` with its pooler), random weights, attention mask of ones: the
/// shape of the CPU bench's `encoders/bert_base_forward_*` rows. `--dtype bf16` keeps the
/// weights in bfloat16 (`.bfloat16()`, as the CPU row and PyTorch's `.bfloat16()`).
fn bert_forward(f: &BTreeMap<String, String>) -> Result<Value> {
    let shape: String = get(f, "shape", Some("base".into()))?;
    let batch: usize = get(f, "batch", None)?;
    let seq: usize = get(f, "seq", None)?;
    let dtype: String = get(f, "dtype", Some("f32".into()))?;
    let config = bert_config(&shape)?;
    let device = ember::default_device();
    let model = BertModel::<Backend>::new(&config, true, &device);
    let model = match dtype.as_str() {
        "f32" => model,
        "bf16" => model
            .bfloat16()
            .context("converting the model to bfloat16")?,
        other => bail!("--dtype `{other}`: f32 or bf16"),
    };
    let input = EncoderInput::new(random_ids::<Backend>(
        batch,
        seq,
        config.vocab_size,
        &device,
    ))
    .with_attention_mask(Tensor::ones([batch, seq], &device));
    let timing = time(
        get(f, "warmup", Some(2))?,
        get(f, "iters", Some(10))?,
        || {
            let out = model.forward(input.clone(), OutputOptions::default())?;
            // One value back to the host: waits for the whole forward pass.
            let _ = out.last_hidden_state.sum().into_data();
            Ok(())
        },
    )?;
    Ok(json!({
        "check": format!("bert_{shape}_forward_{dtype}_b{batch}_s{seq}"),
        "side": "ember",
        "params": model.num_params(),
        "timing": timing,
    }))
}

/// One training step of `BertForSequenceClassification` (2 labels, dropout on as configured),
/// AdamW (lr 2e-5, weight decay 0.01), random ids: forward, backward, optimizer step; `--bf16`
/// inside an `ember_kernels::autocast(BF16)` region as the CPU bench's bf16 row.
fn bert_train_step(f: &BTreeMap<String, String>) -> Result<Value> {
    type AB = TrainBackend;
    let shape: String = get(f, "shape", Some("base".into()))?;
    let batch: usize = get(f, "batch", None)?;
    let seq: usize = get(f, "seq", None)?;
    let bf16 = f.contains_key("bf16");
    let config = bert_config(&shape)?;
    let device = ember::default_device();
    let mut model = Some(BertForSequenceClassification::<AB>::new(&config, &device));
    let params = model.as_ref().map_or(0, |m| m.num_params());
    let mut optimizer = AdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(0.01)
        .init::<AB, BertForSequenceClassification<AB>>();
    let input = EncoderInput::new(random_ids::<AB>(batch, seq, config.vocab_size, &device))
        .with_attention_mask(Tensor::ones([batch, seq], &device));
    let labels = Tensor::<AB, 1>::random([batch], Distribution::Uniform(0.0, 2.0), &device).int();
    let timing = time(
        get(f, "warmup", Some(2))?,
        get(f, "iters", Some(10))?,
        || {
            let _autocast = bf16.then(|| ember_kernels::autocast(DType::BF16));
            let m = model
                .take()
                .context("the model is put back after each step")?;
            let loss = m
                .forward(input.clone(), Some(SequenceLabels::Classes(labels.clone())))?
                .loss
                .context("a loss with labels given")?;
            let grads = GradientsParams::from_grads(loss.backward(), &m);
            let m = optimizer.step(2e-5, m, grads);
            // A parameter back to the host: waits for the optimizer step.
            let _ = m.classifier.out_proj.base.weight.val().inner().into_data();
            model = Some(m);
            Ok(())
        },
    )?;
    let _ = model.map(|m| m.valid());
    let precision = if bf16 { "bf16" } else { "f32" };
    Ok(json!({
        "check": format!("bert_{shape}_train_step_{precision}_b{batch}_s{seq}"),
        "side": "ember",
        "params": params,
        "tokens": batch * seq,
        "timing": timing,
    }))
}

/// Greedy decoding of `--new` tokens after `--prompt`-token prompts (the CPU bench's prompts:
/// deterministic ids, no EOS stop), `--batch` rows; `--dtype bf16` keeps the weights in
/// bfloat16. The time includes the prompt's forward pass, as PyTorch's `generate` does.
fn decode(f: &BTreeMap<String, String>) -> Result<Value> {
    let dir: PathBuf = get(f, "model", None)?;
    let batch: usize = get(f, "batch", None)?;
    let prompt_len: usize = get(f, "prompt", Some(16))?;
    let new: usize = get(f, "new", Some(64))?;
    let dtype: String = get(f, "dtype", Some("f32".into()))?;
    let device = ember::default_device();
    let model = LlamaForCausalLM::<Backend>::from_pretrained(&dir, &device)
        .with_context(|| format!("loading {}", dir.display()))?;
    let vocab = model.config().vocab_size;
    let model = match dtype.as_str() {
        "f32" => model,
        "bf16" => model
            .bfloat16()
            .context("converting the model to bfloat16")?,
        other => bail!("--dtype `{other}`: f32 or bf16"),
    };
    let rows: Vec<Vec<u32>> = (0..batch)
        .map(|r| {
            (0..prompt_len)
                .map(|t| ((100 + 37 * (r + 1) * t) % vocab.min(40_000)) as u32)
                .collect()
        })
        .collect();
    let prompt = Prompt::left_padded(rows, 0);
    let config = GenerationConfig {
        eos_token_id: None,
        ..GenerationConfig::greedy(new)
    };
    let timing = time(
        get(f, "warmup", Some(1))?,
        get(f, "iters", Some(3))?,
        || {
            let out = generate(
                &model,
                &prompt,
                &config,
                GenerateOptions::default(),
                &device,
            )?;
            ensure!(
                out.new_tokens.iter().all(|t| t.len() == new),
                "generation stopped before {new} tokens"
            );
            Ok(())
        },
    )?;
    Ok(json!({
        "check": format!("smollm2_decode_{dtype}_b{batch}_p{prompt_len}_n{new}"),
        "side": "ember",
        "tokens": batch * new,
        "timing": timing,
    }))
}

/// The Trainer run of `tests/fixtures/train/make_trainer_fixtures.py` (HF `Trainer` on the
/// tiny BERT fixture, dropout off, examples in order, a loss logged every step), as the CPU
/// test `first_20_logged_losses_match_hf_trainer` runs it, here on this build's backend; its
/// first `--steps` losses against the fixture's.
fn trainer_parity(f: &BTreeMap<String, String>) -> Result<Value> {
    let fixture: PathBuf = get(f, "fixture", None)?;
    let dir: PathBuf = get(f, "model", None)?;
    let steps: usize = get(f, "steps", Some(10))?;
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(&fixture)
            .with_context(|| format!("reading {}", fixture.display()))?,
    )
    .with_context(|| format!("parsing {}", fixture.display()))?;
    let rows = expected["examples"]
        .as_array()
        .context("the fixture's `examples`")?
        .clone();
    let options = FromPretrainedOptions::default()
        .set("hidden_dropout_prob", 0.0)
        .set("attention_probs_dropout_prob", 0.0)
        .set("classifier_dropout", 0.0);
    let device = ember::default_device();
    let (model, _) = BertForSequenceClassification::<TrainBackend>::from_pretrained_with(
        &dir, &options, &device,
    )
    .with_context(|| format!("loading {}", dir.display()))?;
    let out_dir = std::env::temp_dir().join(format!("ember-gpu-check-{}", std::process::id()));
    let mut args: TrainingArguments = serde_json::from_value(expected["args"].clone())
        .context("the fixture's `args` as TrainingArguments")?;
    args.output_dir = out_dir.clone();
    args.save_strategy = IntervalStrategy::No;
    args.disable_tqdm = true;
    let start = Instant::now();
    let mut trainer = Trainer::new(args, model, DataCollatorWithPadding::new(0), device)?
        .train_dataset(Dataset::from_json_rows(&rows)?)
        .shuffle(false);
    trainer.train()?;
    let seconds = start.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&out_dir);
    let ours: Vec<f64> = trainer
        .state
        .log_history
        .iter()
        .filter_map(|e| e.get("loss").and_then(Value::as_f64))
        .take(steps)
        .collect();
    let theirs: Vec<f64> = expected["logs"]
        .as_array()
        .context("the fixture's `logs`")?
        .iter()
        .filter_map(|e| e.get("loss").and_then(Value::as_f64))
        .take(steps)
        .collect();
    ensure!(
        ours.len() == steps && theirs.len() == steps,
        "{} losses logged, {} in the fixture; {steps} wanted",
        ours.len(),
        theirs.len()
    );
    let max_abs = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    Ok(json!({
        "check": "trainer_parity",
        "side": "ember",
        "steps": steps,
        "losses": ours,
        "expected": theirs,
        "max_abs_diff": max_abs,
        "tolerance": 1e-4,
        "pass": max_abs <= 1e-4,
        "train_seconds": seconds,
    }))
}
