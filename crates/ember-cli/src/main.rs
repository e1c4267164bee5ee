//! `ember`: the Hugging Face fine-tuning workflow as one command.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod causal_train;
mod demo;
mod dtype;
mod embed;
mod generate;
mod launch;
mod peft;
mod quantize;
mod tokenize;
mod train;

/// Ember: Hugging Face fine-tuning in Rust, on burn.
#[derive(Parser)]
#[command(name = "ember", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Tokenize lines from stdin into JSON lines (input_ids, attention_mask, token_type_ids, tokens).
    Tokenize(tokenize::TokenizeArgs),
    /// Sentence embeddings of lines from stdin as JSON lines (mean_normalized, cls).
    Embed(embed::EmbedArgs),
    /// Continue a prompt from stdin with a causal LM, streaming the text (--json: one JSON object).
    Generate(generate::GenerateArgs),
    /// Fine-tune a sequence classifier on labelled text, a token classifier (--task ner) or a
    /// causal LM (--task causal-lm); no arguments: the embedded demo.
    Train(train::TrainArgs),
    /// Score a fine-tuned classifier on labelled text (accuracy, F1, precision, recall, loss).
    Evaluate(train::EvaluateArgs),
    /// Classify lines from stdin with a fine-tuned classifier: JSON lines with label and score.
    Predict(train::PredictArgs),
    /// List a model's modules by HF path with their types and shapes (with --adapter: the
    /// adapter's parameters and peft's trainable-parameter line).
    Inspect(peft::InspectArgs),
    /// Merge a peft adapter into its base model and save a plain checkpoint (merge_and_unload).
    Merge(peft::MergeArgs),
    /// Quantize a checkpoint with bitsandbytes' int8 or 4-bit formats and save it as
    /// transformers does (`from_pretrained(..., quantization_config)` + `save_pretrained`).
    Quantize(quantize::QuantizeArgs),
    /// Run an ember subcommand on several processes under mpirun (accelerate launch /
    /// torchrun): `ember launch --nproc-per-node 2 -- train ...` trains data parallel.
    Launch(launch::LaunchArgs),
}

/// Large blocks (the weights) on transparent huge pages: decoding reads them all every token.
#[global_allocator]
static ALLOCATOR: ember::HugePageAlloc = ember::HugePageAlloc;

fn main() -> ExitCode {
    // Before any thread allocates: every command reuses its freed buffers.
    ember::keep_freed_memory();
    // RUST_LOG when set; otherwise the Trainer's warnings (an fp16 step skipped by the loss
    // scaler) and every crate's errors.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error,ember_train=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Tokenize(args) => tokenize::run(args),
        Command::Embed(args) => embed::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Train(args) => train::run_train(args),
        Command::Evaluate(args) => train::run_evaluate(args),
        Command::Predict(args) => train::run_predict(args),
        Command::Inspect(args) => peft::run_inspect(args),
        Command::Merge(args) => peft::run_merge(args),
        Command::Quantize(args) => quantize::run(args),
        Command::Launch(args) => launch::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, the whole chain of causes.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
