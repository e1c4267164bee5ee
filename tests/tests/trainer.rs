//! The `Trainer` on a tiny BERT classifier and a small synthetic task: logging, evaluation,
//! checkpoints with HF's files and rotation, `predict`, and resuming after a run stopped
//! between checkpoints, which must end with the same weights as an uninterrupted run.

mod support;

use ember::datasets::{DataCollatorWithPadding, Dataset};
use ember::models::{BertConfig, BertForSequenceClassification};
use ember::prelude::*;
use ember::train::{
    metrics, Control, IntervalStrategy, Trainer, TrainerCallback, TrainerState, TrainingArguments,
};
use std::path::Path;

fn dataset() -> Dataset {
    support::contains_five(7)
}

fn config() -> BertConfig {
    BertConfig {
        vocab_size: 30,
        hidden_size: 16,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 32,
        max_position_embeddings: 32,
        ..BertConfig::default()
    }
}

fn args(dir: &Path) -> TrainingArguments {
    let mut args = TrainingArguments::new(dir);
    args.per_device_train_batch_size = 8;
    args.per_device_eval_batch_size = 16;
    args.num_train_epochs = 3.0;
    args.learning_rate = 2e-3;
    args.warmup_steps = 3;
    args.logging_steps = 2.0;
    args.eval_strategy = IntervalStrategy::Epoch;
    args.save_steps = 5.0;
    args.disable_tqdm = true;
    args
}

type Model = BertForSequenceClassification<TrainBackend>;

/// The same initial weights for every run: saved once, loaded by each.
fn initial_model(dir: &Path) -> Model {
    let init = dir.join("init");
    if !init.exists() {
        Model::new(&config(), &default_device())
            .save_pretrained(&init)
            .unwrap();
    }
    Model::from_pretrained(&init, &default_device()).unwrap()
}

fn trainer(
    args: TrainingArguments,
    model: Model,
) -> Trainer<TrainBackend, Model, DataCollatorWithPadding> {
    Trainer::new(
        args,
        model,
        DataCollatorWithPadding::new(0),
        default_device(),
    )
    .unwrap()
    .train_dataset(dataset())
    .eval_dataset(dataset())
    .compute_metrics(|p| {
        let (predictions, labels) = p.sequence_classes();
        metrics::classification_metrics(&predictions, &labels)
    })
}

#[test]
fn trains_logs_evaluates_saves_and_predicts() {
    let _generator = ember_testkit::random_generator_lock();
    let tmp = tempfile::tempdir().unwrap();
    let mut args = args(&tmp.path().join("run"));
    args.save_total_limit = Some(2);
    let mut trainer = trainer(args, initial_model(tmp.path()));
    let summary = trainer.train().unwrap();
    // 64 rows / 8 = 8 steps per epoch, 3 epochs.
    assert_eq!(trainer.state.global_step, 24);
    assert_eq!(summary["epoch"], 3.0);
    let history = &trainer.state.log_history;
    let losses: Vec<f64> = history
        .iter()
        .filter_map(|e| e.get("loss")?.as_f64())
        .collect();
    assert_eq!(losses.len(), 12, "a loss every 2 steps");
    assert!(losses.iter().all(|l| l.is_finite()));
    let evals: Vec<&serde_json::Map<_, _>> = history
        .iter()
        .filter(|e| e.contains_key("eval_loss"))
        .collect();
    assert_eq!(evals.len(), 3, "one evaluation per epoch");
    for key in [
        "eval_accuracy",
        "eval_f1",
        "eval_runtime",
        "eval_samples_per_second",
    ] {
        assert!(evals[2].contains_key(key), "{key} in {:?}", evals[2]);
    }
    // Warm-up over 3 steps, then linear decay to 0 at step 24; each entry gives the rate its
    // last step used (the schedule at step - 1), as HF logs it.
    assert_eq!(history[0]["learning_rate"].as_f64().unwrap(), 2e-3 / 3.0);
    assert_eq!(
        history[3]["learning_rate"].as_f64().unwrap(),
        2e-3 * (24.0 - 7.0) / 21.0
    );

    // Checkpoints every 5 steps, only the newest two kept, each with HF's files.
    let mut kept: Vec<String> = std::fs::read_dir(tmp.path().join("run"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    kept.sort();
    assert_eq!(kept, ["checkpoint-15", "checkpoint-20"]);
    let checkpoint = tmp.path().join("run/checkpoint-20");
    for file in [
        "config.json",
        "model.safetensors",
        "trainer_state.json",
        "training_args.json",
        "optimizer.bin",
        "scheduler.json",
        "rng_state.json",
    ] {
        assert!(checkpoint.join(file).is_file(), "{file}");
    }
    let state = TrainerState::load(&checkpoint.join("trainer_state.json")).unwrap();
    assert_eq!(
        (state.global_step, state.max_steps, state.save_steps),
        (20, 24, 5)
    );
    let saved = Model::from_pretrained(&checkpoint, &default_device()).unwrap();
    assert_eq!(saved.config().num_labels(), 2);

    let out = trainer.predict(&dataset()).unwrap();
    assert_eq!(out.predictions.predictions.len(), 64);
    assert!(out.metrics.contains_key("test_loss") && out.metrics.contains_key("test_accuracy"));
}

/// Stops the run after a given step, as a crash would, without saving.
struct StopAt(usize);

impl TrainerCallback for StopAt {
    fn on_step_end(&mut self, _: &TrainingArguments, state: &TrainerState) -> Control {
        Control {
            should_training_stop: state.global_step >= self.0,
        }
    }
}

#[test]
fn resuming_between_checkpoints_gives_the_uninterrupted_weights() {
    let _generator = ember_testkit::random_generator_lock();
    let tmp = tempfile::tempdir().unwrap();
    let mut uninterrupted = trainer(args(&tmp.path().join("a")), initial_model(tmp.path()));
    uninterrupted.train().unwrap();

    // The second run stops at step 13 (checkpoint-10 is its last), then a fresh trainer, with a
    // freshly loaded model, resumes from checkpoint-10 and runs to the end.
    let b_args = args(&tmp.path().join("b"));
    let mut interrupted = trainer(b_args.clone(), initial_model(tmp.path())).callback(StopAt(13));
    interrupted.train().unwrap();
    assert_eq!(interrupted.state.global_step, 13);
    assert!(tmp.path().join("b/checkpoint-10").is_dir());
    assert!(!tmp.path().join("b/checkpoint-15").exists());

    let mut c_args = b_args;
    c_args.resume_from_checkpoint = Some(tmp.path().join("b/checkpoint-10"));
    let mut resumed = trainer(c_args, initial_model(tmp.path()));
    resumed.train().unwrap();
    assert_eq!(resumed.state.global_step, 24);

    // Bit for bit: the same dropout masks, data order, optimizer state and schedule.
    let a = uninterrupted.model.state_dict().unwrap();
    let c = resumed.model.state_dict().unwrap();
    for (key, (_, values)) in &a {
        assert_eq!(values, &c[key].1, "{key} differs after resuming");
    }
    let losses = |t: &Trainer<TrainBackend, Model, DataCollatorWithPadding>| -> Vec<(u64, f64)> {
        t.state
            .log_history
            .iter()
            .filter_map(|e| Some((e.get("step")?.as_u64()?, e.get("loss")?.as_f64()?)))
            .filter(|(s, _)| *s > 10)
            .collect()
    };
    assert_eq!(losses(&uninterrupted), losses(&resumed));
}

/// The reference run of `tests/fixtures/train/make_trainer_fixtures.py`: HF `Trainer` on the
/// tiny BERT fixture, dropout off, examples in order, a log entry every step.
#[test]
fn first_20_logged_losses_match_hf_trainer() {
    let _generator = ember_testkit::random_generator_lock();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("train/trainer-expected.json")).unwrap(),
    )
    .unwrap();
    let rows = expected["examples"].as_array().unwrap().clone();
    let options = ember::models::FromPretrainedOptions::default()
        .set("hidden_dropout_prob", 0.0)
        .set("attention_probs_dropout_prob", 0.0)
        .set("classifier_dropout", 0.0);
    let (model, _) =
        Model::from_pretrained_with(root.join("models/tiny-bert"), &options, &default_device())
            .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut args: TrainingArguments = serde_json::from_value(expected["args"].clone()).unwrap();
    args.output_dir = tmp.path().to_owned();
    args.save_strategy = IntervalStrategy::No;
    args.disable_tqdm = true;
    let mut trainer = Trainer::new(
        args,
        model,
        DataCollatorWithPadding::new(0),
        default_device(),
    )
    .unwrap()
    .train_dataset(Dataset::from_json_rows(&rows).unwrap())
    .shuffle(false);
    trainer.train().unwrap();
    let ours: Vec<&serde_json::Map<String, serde_json::Value>> = trainer
        .state
        .log_history
        .iter()
        .filter(|e| e.contains_key("loss"))
        .take(20)
        .collect();
    let theirs = expected["logs"].as_array().unwrap();
    assert_eq!(ours.len(), 20);
    let mut worst = 0f64;
    for (step, (o, t)) in ours.iter().zip(theirs).enumerate() {
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
}

#[test]
fn best_model_is_kept_reloaded_and_early_stopping_stops() {
    let _generator = ember_testkit::random_generator_lock();
    let tmp = tempfile::tempdir().unwrap();
    let mut a = args(&tmp.path().join("run"));
    a.eval_strategy = IntervalStrategy::Steps;
    a.eval_steps = Some(4.0);
    a.save_steps = 4.0;
    a.save_total_limit = Some(1);
    a.load_best_model_at_end = true;
    a.metric_for_best_model = Some("accuracy".into());
    // Patience 2 with an unreachable threshold: every evaluation after the first counts as no
    // improvement, so the run stops at the third evaluation (step 12 of 24).
    let mut trainer = trainer(a, initial_model(tmp.path()))
        .callback(ember::train::EarlyStoppingCallback::new(2, 1e9));
    trainer.train().unwrap();
    assert_eq!(trainer.state.global_step, 12);
    let best = trainer
        .state
        .best_model_checkpoint
        .clone()
        .expect("a best checkpoint");
    assert!(
        best.is_dir(),
        "rotation never deletes the best checkpoint: {}",
        best.display()
    );
    let newest = tmp.path().join("run/checkpoint-12");
    assert!(newest.is_dir());
    // The model at the end is the best checkpoint's.
    let saved = Model::from_pretrained(&best, &default_device())
        .unwrap()
        .state_dict()
        .unwrap();
    let ours = trainer.model.state_dict().unwrap();
    for (key, (_, values)) in &saved {
        assert_eq!(values, &ours[key].1, "{key}");
    }
}
