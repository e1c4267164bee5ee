//! Mixed-precision training (`bf16` / `fp16`) against HF's Trainer under torch's CPU autocast,
//! on the Trainer parity fixture (tiny BERT classifier, dropout off, examples in order):
//! `tests/fixtures/half/mixed-precision-expected.json`, made by
//! `tests/fixtures/half/make_mixed_precision_fixtures.py`.

use ember::datasets::{DataCollatorWithPadding, Dataset};
use ember::models::{BertForSequenceClassification, FromPretrainedOptions};
use ember::prelude::*;
use ember::train::{GradScalerKwargs, IntervalStrategy, Trainer, TrainingArguments};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

type Model = BertForSequenceClassification<TrainBackend>;

/// The tests share the process's two cores: run one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn expected() -> Value {
    let path = fixtures().join("half/mixed-precision-expected.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn model() -> Model {
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
    model
}

/// The fixture's arguments with one run's precision flags, writing into `dir`.
fn arguments(expected: &Value, dir: &Path, bf16: bool, fp16: bool) -> TrainingArguments {
    let mut args: TrainingArguments = serde_json::from_value(expected["args"].clone()).unwrap();
    args.output_dir = dir.to_owned();
    args.save_strategy = IntervalStrategy::No;
    args.disable_tqdm = true;
    (args.bf16, args.fp16) = (bf16, fp16);
    args
}

fn trainer(args: TrainingArguments) -> Trainer<TrainBackend, Model, DataCollatorWithPadding> {
    // The examples are the Trainer parity fixture's (the generator imports them from there).
    let path = fixtures().join("train/trainer-expected.json");
    let parity: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let rows = parity["examples"].as_array().unwrap().clone();
    Trainer::new(
        args,
        model(),
        DataCollatorWithPadding::new(0),
        default_device(),
    )
    .unwrap()
    .train_dataset(Dataset::from_json_rows(&rows).unwrap())
    .shuffle(false)
}

/// The per-step log entries (`loss`, `grad_norm`, `learning_rate`).
fn step_logs(
    trainer: &Trainer<TrainBackend, Model, DataCollatorWithPadding>,
) -> Vec<Map<String, Value>> {
    trainer
        .state
        .log_history
        .iter()
        .filter(|e| e.contains_key("loss"))
        .cloned()
        .collect()
}

fn losses(steps: &[Value]) -> Vec<f64> {
    steps.iter().map(|s| s["loss"].as_f64().unwrap()).collect()
}

fn max_gap(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
}

/// bf16 and fp16 (torch's default scaler, which never overflows here) follow torch's
/// autocast run: on the initial weights Ember's loss is within a quarter of the distance
/// between torch's half-precision and float32 losses of torch's half-precision loss (Ember
/// rounds where torch rounds, not float32), and over the 24 steps within 1.5 times torch's own
/// half-vs-float32 gap (the tolerance of the half-precision inference tests).
#[test]
fn bf16_and_fp16_losses_follow_torch_autocast() {
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let expected = expected();
    let runs = &expected["runs"];
    let torch_f32 = losses(runs["float32"]["steps"].as_array().unwrap());
    for (run, bf16, fp16) in [("bf16", true, false), ("fp16", false, true)] {
        let tmp = tempfile::tempdir().unwrap();
        let mut trainer = trainer(arguments(&expected, tmp.path(), bf16, fp16));
        trainer.train().unwrap();
        let logs = step_logs(&trainer);
        let ours: Vec<f64> = logs.iter().map(|e| e["loss"].as_f64().unwrap()).collect();
        let theirs = losses(runs[run]["steps"].as_array().unwrap());
        assert_eq!(ours.len(), theirs.len());
        // Steps 1 and 2 run the initial weights (the first step's learning rate is 0): the
        // forward pass alone, where Ember rounds where torch does.
        let first = max_gap(&ours[..2], &theirs[..2]);
        let first_torch = max_gap(&theirs[..2], &torch_f32[..2]);
        // Afterwards each run's updates carry its own rounding noise.
        let to_torch = max_gap(&ours, &theirs);
        let torch_to_f32 = max_gap(&theirs, &torch_f32);
        eprintln!(
            "{run}: initial weights: |ember - torch {run}| {first:.2e}, |torch {run} - torch \
             f32| {first_torch:.2e}; 24 steps: max |ember - torch {run}| {to_torch:.2e}, max \
             |torch {run} - torch f32| {torch_to_f32:.2e}"
        );
        assert!(
            first < 0.25 * first_torch,
            "{run}: on the initial weights ember is {first:.2e} from torch's {run} loss, which \
             is {first_torch:.2e} from float32"
        );
        assert!(
            to_torch < 1.5 * torch_to_f32,
            "{run}: ember is {to_torch:.2e} from torch's {run} run, which is {torch_to_f32:.2e} \
             from float32"
        );
        // The other logged numbers follow too: grad_norm and the schedule.
        for (step, (o, t)) in logs
            .iter()
            .zip(runs[run]["steps"].as_array().unwrap())
            .enumerate()
        {
            let (a, b) = (
                o["grad_norm"].as_f64().unwrap(),
                t["grad_norm"].as_f64().unwrap(),
            );
            assert!(
                (a - b).abs() <= 1e-2 * b,
                "{run} step {}: grad_norm {a} vs {b}",
                step + 1
            );
            let (a, b) = (
                o["learning_rate"].as_f64().unwrap(),
                t["learning_rate"].as_f64().unwrap(),
            );
            assert!(
                (a - b).abs() <= 1e-12,
                "{run} step {}: lr {a} vs {b}",
                step + 1
            );
        }
        assert!(trainer.scaler().is_some() == fp16);
    }
}

/// fp16 with a scale far too large at first (2^24, growth every 3 clean steps): the same steps
/// overflow and are skipped as under torch's GradScaler, the schedule is held on them (HF with
/// torch's AdamW), and the losses in between follow torch's.
#[test]
fn fp16_loss_scale_backs_off_and_recovers_as_torch_grad_scaler() {
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let expected = expected();
    let run = &expected["runs"]["fp16_dynamics_adamw_torch"];
    let kwargs: GradScalerKwargs = serde_json::from_value(run["grad_scaler"].clone()).unwrap();
    assert_eq!(kwargs.init_scale, 16777216.0);
    let tmp = tempfile::tempdir().unwrap();
    let mut trainer = trainer(arguments(&expected, tmp.path(), false, true)).grad_scaler(kwargs);
    trainer.train().unwrap();
    let logs = step_logs(&trainer);
    // A skipped step's gradient norm is inf / NaN, which the log leaves out.
    let skipped: Vec<u64> = logs
        .iter()
        .filter(|e| !e.contains_key("grad_norm"))
        .map(|e| e["step"].as_u64().unwrap())
        .collect();
    let torch_skipped: Vec<u64> = run["skipped_steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_u64().unwrap())
        .collect();
    assert_eq!(skipped, torch_skipped);
    let steps = run["steps"].as_array().unwrap();
    let last = steps.last().unwrap();
    let scaler = trainer.scaler().unwrap();
    assert_eq!(scaler.get_scale(), last["scale_after"].as_f64().unwrap());
    assert_eq!(
        u64::from(scaler.growth_tracker()),
        last["growth_tracker_after"].as_u64().unwrap()
    );
    let ours: Vec<f64> = logs.iter().map(|e| e["loss"].as_f64().unwrap()).collect();
    let gap = max_gap(&ours, &losses(steps));
    eprintln!("fp16 with back-offs: max |ember - torch| loss {gap:.2e}, skipped {skipped:?}");
    assert!(gap < 1e-4, "losses {gap:.2e} from torch's");
    for (o, t) in logs.iter().zip(steps) {
        let (a, b) = (
            o["learning_rate"].as_f64().unwrap(),
            t["learning_rate"].as_f64().unwrap(),
        );
        assert!((a - b).abs() <= 1e-12, "step {}: lr {a} vs {b}", t["step"]);
    }
}

/// Resuming fp16 training from a checkpoint restores the scaler (`scaler.json`, torch's
/// `state_dict` names) and the held schedule: the final weights equal an uninterrupted run's.
#[test]
fn fp16_resume_restores_the_scaler_step_exactly() {
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let expected = expected();
    let kwargs = GradScalerKwargs {
        init_scale: 16777216.0,
        growth_interval: 3,
        ..Default::default()
    };
    let tmp = tempfile::tempdir().unwrap();
    let mut args = arguments(&expected, &tmp.path().join("full"), false, true);
    args.save_strategy = IntervalStrategy::Steps;
    args.save_steps = 10.0;
    let mut full = trainer(args.clone()).grad_scaler(kwargs.clone());
    full.train().unwrap();
    let checkpoint = tmp.path().join("full/checkpoint-10");
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(checkpoint.join("scaler.json")).unwrap())
            .unwrap();
    for key in [
        "scale",
        "growth_factor",
        "backoff_factor",
        "growth_interval",
        "_growth_tracker",
    ] {
        assert!(state.get(key).is_some(), "scaler.json lacks {key}: {state}");
    }
    let scheduler: Value =
        serde_json::from_str(&std::fs::read_to_string(checkpoint.join("scheduler.json")).unwrap())
            .unwrap();
    // Steps 1-6 and 8 overflowed: 3 of the first 10 moved the schedule.
    assert_eq!(scheduler["last_epoch"], 3);

    let mut resumed_args = args;
    resumed_args.output_dir = tmp.path().join("resumed");
    resumed_args.resume_from_checkpoint = Some(checkpoint);
    let mut resumed = trainer(resumed_args).grad_scaler(kwargs);
    resumed.train().unwrap();
    assert_eq!(resumed.scaler(), full.scaler());
    // Every weight, bit for bit: the saved files are equal.
    let saved = |t: &Trainer<TrainBackend, Model, DataCollatorWithPadding>, name: &str| {
        let dir = tmp.path().join(name);
        t.model.save_pretrained(&dir).unwrap();
        std::fs::read(dir.join("model.safetensors")).unwrap()
    };
    assert!(saved(&resumed, "resumed-final") == saved(&full, "full-final"));
}
