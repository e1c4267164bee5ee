//! The `Trainer` with a LoRA adapter: the first 20 logged losses of HF `Trainer` + peft
//! (`tests/fixtures/peft/make_fixtures.py`), only adapter parameters trained (the base
//! unchanged, no optimizer state for it), checkpoints in peft's files, and resuming step-exactly.

use ember::datasets::{DataCollatorWithPadding, Dataset};
use ember::models::{BertForSequenceClassification, FromPretrainedOptions};
use ember::peft::{PeftModel, DEFAULT_ADAPTER};
use ember::prelude::*;
use ember::train::{
    Control, IntervalStrategy, TrainableModel, Trainer, TrainerCallback, TrainerState,
    TrainingArguments,
};
use std::path::{Path, PathBuf};

type Model = BertForSequenceClassification<TrainBackend>;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn expected() -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("peft/trainer-lora-expected.json")).unwrap(),
    )
    .unwrap()
}

/// tiny-bert with dropout off and the adapter Python started from.
fn model() -> PeftModel<TrainBackend, Model> {
    let options = FromPretrainedOptions::default()
        .set("hidden_dropout_prob", 0.0)
        .set("attention_probs_dropout_prob", 0.0)
        .set("classifier_dropout", 0.0);
    let (model, _) = Model::from_pretrained_with(
        fixtures().join("models/tiny-bert"),
        &options,
        &default_device(),
    )
    .unwrap();
    PeftModel::from_pretrained(
        model,
        fixtures().join("peft/trainer-lora-init"),
        DEFAULT_ADAPTER,
        true,
    )
    .unwrap()
}

fn args(dir: &Path) -> TrainingArguments {
    let mut args: TrainingArguments = serde_json::from_value(expected()["args"].clone()).unwrap();
    args.output_dir = dir.to_owned();
    args.save_strategy = IntervalStrategy::No;
    args.disable_tqdm = true;
    args
}

fn trainer(
    args: TrainingArguments,
    model: PeftModel<TrainBackend, Model>,
) -> Trainer<TrainBackend, PeftModel<TrainBackend, Model>, DataCollatorWithPadding> {
    let rows = expected()["examples"].as_array().unwrap().clone();
    Trainer::new(
        args,
        model,
        DataCollatorWithPadding::new(0),
        default_device(),
    )
    .unwrap()
    .train_dataset(Dataset::from_json_rows(&rows).unwrap())
    .shuffle(false)
}

fn losses(
    t: &Trainer<TrainBackend, PeftModel<TrainBackend, Model>, DataCollatorWithPadding>,
) -> Vec<f64> {
    t.state
        .log_history
        .iter()
        .filter_map(|e| e.get("loss").and_then(|v| v.as_f64()))
        .collect()
}

#[test]
fn first_20_logged_losses_match_hf_trainer_with_peft() {
    let _generator = ember_testkit::random_generator_lock();
    let tmp = tempfile::tempdir().unwrap();
    let model = model();
    // The parameters HF's Trainer optimises, in peft's names.
    let ours: Vec<String> = model
        .trainable_params()
        .into_iter()
        .map(|p| p.name)
        .collect();
    let theirs: Vec<String> = expected()["trainable_parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ours, theirs);
    let base_before = model.model().bert_base_weight();
    let mut trainer = trainer(args(tmp.path()), model);
    trainer.train().unwrap();
    let logs: Vec<&serde_json::Map<String, serde_json::Value>> = trainer
        .state
        .log_history
        .iter()
        .filter(|e| e.contains_key("loss"))
        .take(20)
        .collect();
    let expected = expected();
    let theirs = expected["logs"].as_array().unwrap();
    assert_eq!(logs.len(), 20);
    let mut worst = 0f64;
    for (step, (o, t)) in logs.iter().zip(theirs).enumerate() {
        for key in ["loss", "grad_norm", "learning_rate"] {
            let (a, b) = (o[key].as_f64().unwrap(), t[key].as_f64().unwrap());
            worst = worst.max((a - b).abs() / b.abs().max(1e-3));
            assert!(
                (a - b).abs() <= 1e-4 * b.abs().max(1e-3),
                "step {}: {key} ember {a} hf {b}",
                step + 1
            );
        }
    }
    eprintln!(
        "worst relative difference over 20 steps (loss, grad_norm, learning_rate): {worst:.1e}"
    );
    // The frozen base did not move.
    assert_eq!(trainer.model.model().bert_base_weight(), base_before);
}

/// The query weight of the first layer, as values.
trait BaseWeight {
    fn bert_base_weight(&self) -> Vec<f32>;
}

impl BaseWeight for Model {
    fn bert_base_weight(&self) -> Vec<f32> {
        self.base_model.layers[0]
            .attention_self
            .query
            .base
            .weight
            .val()
            .into_data()
            .convert::<f32>()
            .into_vec()
            .unwrap()
    }
}

/// Stops the run after a given step, without saving.
struct StopAt(usize);

impl TrainerCallback for StopAt {
    fn on_step_end(&mut self, _: &TrainingArguments, state: &TrainerState) -> Control {
        Control {
            should_training_stop: state.global_step >= self.0,
        }
    }
}

#[test]
fn checkpoints_hold_the_adapter_and_resume_step_exactly() {
    let _generator = ember_testkit::random_generator_lock();
    let tmp = tempfile::tempdir().unwrap();
    let mut a = args(&tmp.path().join("full"));
    a.max_steps = 12;
    let mut full = trainer(a, model());
    full.train().unwrap();

    let mut a = args(&tmp.path().join("split"));
    a.max_steps = 12;
    a.save_strategy = IntervalStrategy::Steps;
    a.save_steps = 5.0;
    // Stopped after step 7 as a crash would (checkpoint-5 its last), then resumed.
    trainer(a.clone(), model())
        .callback(StopAt(7))
        .train()
        .unwrap();
    let checkpoint = tmp.path().join("split/checkpoint-5");
    let mut files: Vec<String> = std::fs::read_dir(&checkpoint)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert!(
        files.contains(&"adapter_config.json".to_owned()),
        "{files:?}"
    );
    assert!(
        files.contains(&"adapter_model.safetensors".to_owned()),
        "{files:?}"
    );
    assert!(
        !files.contains(&"model.safetensors".to_owned()),
        "{files:?}"
    );

    a.resume_from_checkpoint = Some(checkpoint.clone());
    let mut resumed = trainer(a, model());
    resumed.train().unwrap();
    let tail = |t: &[f64]| t[t.len() - 7..].to_vec();
    assert_eq!(tail(&losses(&full)), tail(&losses(&resumed)));
    assert_eq!(
        full.model.adapter_state_dict(DEFAULT_ADAPTER),
        resumed.model.adapter_state_dict(DEFAULT_ADAPTER)
    );
}
