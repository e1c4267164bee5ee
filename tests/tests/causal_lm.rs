//! A causal LM trains with the same `Trainer` as the encoders: the tiny random Llama fixture
//! learns to count (each id followed by the next) from `DataCollatorForLanguageModeling`
//! batches, its loss falls, and the saved folder generates the learned continuation.

use ember::datasets::{DataCollatorForLanguageModeling, Dataset};
use ember::models::generation::{generate, GenerateOptions, GenerationConfig, Prompt};
use ember::models::{AutoModelForCausalLM, LlamaForCausalLM};
use ember::prelude::*;
use ember::train::{Trainer, TrainingArguments};
use serde_json::json;
use std::path::Path;

/// 48 runs of 6-12 consecutive ids starting anywhere in 3..60.
fn counting() -> Dataset {
    let rows: Vec<_> = (0..48u64)
        .map(|i| {
            let start = 3 + (i * 7) % 57;
            let len = 6 + (i % 7) as usize;
            let ids: Vec<u64> = (0..len as u64).map(|t| start + t).collect();
            json!({"input_ids": ids, "attention_mask": vec![1; len]})
        })
        .collect();
    Dataset::from_json_rows(&rows).unwrap()
}

#[test]
fn a_llama_learns_to_count_with_the_trainer() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/models/tiny-llama-gqa");
    let model =
        LlamaForCausalLM::<TrainBackend>::from_pretrained(&fixture, &default_device()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut args = TrainingArguments::new(dir.path().join("out"));
    args.per_device_train_batch_size = 8;
    args.num_train_epochs = 12.0;
    args.learning_rate = 1e-2;
    args.logging_steps = 6.0;
    args.save_strategy = ember::train::IntervalStrategy::No;
    args.disable_tqdm = true;
    let mut trainer = Trainer::new(
        args,
        model,
        DataCollatorForLanguageModeling::new(0),
        default_device(),
    )
    .unwrap()
    .train_dataset(counting());
    trainer.train().unwrap();
    let losses: Vec<f64> = trainer
        .state
        .log_history
        .iter()
        .filter_map(|e| e.get("loss").and_then(|v| v.as_f64()))
        .collect();
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(last < first / 4.0, "loss {first} -> {last}");

    // The saved folder is a causal LM checkpoint that continues a count.
    let saved = dir.path().join("saved");
    trainer.model.save_pretrained(&saved).unwrap();
    let model =
        AutoModelForCausalLM::from_pretrained::<Backend>(&saved, &default_device()).unwrap();
    let config = GenerationConfig {
        eos_token_id: None,
        ..GenerationConfig::greedy(3)
    };
    let out = generate(
        &model,
        &Prompt::single(vec![20, 21, 22, 23]),
        &config,
        GenerateOptions::default(),
        &default_device(),
    )
    .unwrap();
    assert_eq!(out.new_tokens[0], vec![24, 25, 26], "{out:?}");
}
