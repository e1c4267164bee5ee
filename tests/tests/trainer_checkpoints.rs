//! The random state and the optimizer file of Trainer checkpoints: each rank of a data-parallel
//! run saves its own `rng_state_{rank}.json` and resumes from it; a missing, corrupt or
//! truncated file is an error naming it, never a panic or a silent restart.

mod support;

use ember::datasets::DataCollatorWithPadding;
use ember::distributed::{ProcessGroup, ThreadGroup};
use ember::models::{BertConfig, BertForSequenceClassification};
use ember::prelude::*;
use ember::train::{
    rng_state_file, Control, TrainError, Trainer, TrainerCallback, TrainerState, TrainingArguments,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;

type Model = BertForSequenceClassification<TrainBackend>;
type Weights = std::collections::BTreeMap<String, Vec<f32>>;

fn config(dropout: f64) -> BertConfig {
    BertConfig {
        vocab_size: 30,
        hidden_size: 16,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 32,
        max_position_embeddings: 32,
        hidden_dropout_prob: dropout,
        attention_probs_dropout_prob: dropout,
        ..BertConfig::default()
    }
}

/// The same initial weights for every run of a test: saved once, loaded by each.
fn initial(dir: &Path, dropout: f64) -> Model {
    let init = dir.join("init");
    if !init.exists() {
        Model::new(&config(dropout), &default_device())
            .save_pretrained(&init)
            .unwrap();
    }
    Model::from_pretrained(&init, &default_device()).unwrap()
}

fn args(dir: &Path, batch: usize) -> TrainingArguments {
    let mut args = TrainingArguments::new(dir);
    args.per_device_train_batch_size = batch;
    args.max_steps = 20;
    args.learning_rate = 2e-3;
    args.save_steps = 10.0;
    args.logging_steps = 5.0;
    args.seed = 7;
    args.disable_tqdm = true;
    args
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
    .train_dataset(support::contains_five(11))
}

fn weights(model: &Model) -> Weights {
    model
        .state_dict()
        .unwrap()
        .into_iter()
        .map(|(k, (_, v))| (k, v))
        .collect()
}

fn assert_close(a: &Weights, b: &Weights, bound: f32, what: &str) {
    for (key, values) in a {
        let worst = values
            .iter()
            .zip(&b[key])
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(worst <= bound, "{what}: {key} differs by {worst}");
    }
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

/// Runs `f(rank, group)` on two thread ranks and returns their results in rank order.
fn two_ranks<T: Send>(f: impl Fn(usize, Arc<dyn ProcessGroup>) -> T + Sync) -> Vec<T> {
    ThreadGroup::run(2, |group| {
        let rank = group.rank();
        f(rank, Arc::new(group))
    })
}

#[test]
fn each_rank_saves_and_resumes_its_own_random_state() {
    let _generator = ember_testkit::random_generator_lock();
    let tmp = tempfile::tempdir().unwrap();
    // Dropout off: thread ranks share burn's one generator, so only without dropout are two
    // thread runs comparable (the MPI test of ember-cli checks the masks, with dropout on).
    initial(tmp.path(), 0.0);
    let run = |dir: &str, resume: Option<PathBuf>, stop: Option<usize>| {
        two_ranks(|_, group| {
            let mut a = args(&tmp.path().join(dir), 4);
            a.resume_from_checkpoint = resume.clone();
            let mut t = trainer(a, initial(tmp.path(), 0.0)).data_parallel(group);
            if let Some(step) = stop {
                t = t.callback(StopAt(step));
            }
            t.train().map(|_| weights(&t.model))
        })
    };
    let whole = run("whole", None, None);
    let whole: Vec<Weights> = whole.into_iter().map(Result::unwrap).collect();

    for r in run("cut", None, Some(13)) {
        r.unwrap();
    }
    let checkpoint = tmp.path().join("cut/checkpoint-10");
    assert!(!tmp.path().join("cut/checkpoint-15").exists());
    // Each rank's file, and no single-process file; no temporary folder or file left.
    assert!(!checkpoint.join("rng_state.json").exists());
    for rank in 0..2 {
        let path = checkpoint.join(rng_state_file(rank, 2));
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(state["process_index"], rank, "{state}");
        assert_eq!(state["num_processes"], 2, "{state}");
        assert_eq!(state["seed"], 7, "{state}");
        assert_eq!(state["global_step"], 10, "{state}");
        // 64 rows, 32 per rank, 8 batches of 4 an epoch: step 10 is batch 2 of epoch 1.
        assert_eq!(state["next_batch"], 10, "{state}");
    }
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path().join("cut"))
        .unwrap()
        .chain(std::fs::read_dir(&checkpoint).unwrap())
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains("tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let resumed = run("cut", Some(checkpoint.clone()), None);
    for (rank, r) in resumed.into_iter().enumerate() {
        assert_close(&whole[rank], &r.unwrap(), 1e-6, &format!("rank {rank}"));
    }

    // A corrupt file of rank 1: rank 1 names it, rank 0 names rank 1; neither waits.
    let path = checkpoint.join(rng_state_file(1, 2));
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let failed = run("cut", Some(checkpoint.clone()), None);
    match &failed[1] {
        Err(TrainError::File { path: p, .. }) => assert_eq!(p, &path),
        other => panic!("rank 1: {:?}", other.as_ref().err()),
    }
    let e = failed[0].as_ref().unwrap_err().to_string();
    assert!(e.contains("rank 1 failed"), "{e}");
    // A missing one.
    std::fs::remove_file(&path).unwrap();
    let failed = run("cut", Some(checkpoint), None);
    match &failed[1] {
        Err(TrainError::Io { path: p, .. }) => assert_eq!(p, &path),
        other => panic!("rank 1: {:?}", other.as_ref().err()),
    }
}

#[test]
fn resuming_draws_dropout_from_the_checkpoints_seed() {
    let _generator = ember_testkit::random_generator_lock();
    let tmp = tempfile::tempdir().unwrap();
    initial(tmp.path(), 0.2);
    let run = |dir: &str, seed: u64, resume: Option<PathBuf>, stop: Option<usize>| {
        let mut a = args(&tmp.path().join(dir), 8);
        // The data order stays that of seed 7: only the dropout seed can differ.
        a.data_seed = Some(7);
        a.seed = seed;
        a.resume_from_checkpoint = resume;
        let mut t = trainer(a, initial(tmp.path(), 0.2));
        if let Some(step) = stop {
            t = t.callback(StopAt(step));
        }
        t.train().unwrap();
        weights(&t.model)
    };
    let whole = run("whole", 7, None, None);
    let other_seed = run("other", 8, None, None);
    let moved = whole
        .iter()
        .any(|(k, v)| v.iter().zip(&other_seed[k]).any(|(a, b)| a != b));
    assert!(moved, "dropout with another seed must give other weights");

    run("cut", 7, None, Some(13));
    let checkpoint = tmp.path().join("cut/checkpoint-10");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(checkpoint.join("rng_state.json")).unwrap()).unwrap();
    assert_eq!(
        (state["seed"].as_u64(), state["next_batch"].as_u64()),
        (Some(7), Some(10))
    );
    // Resumed with another `seed`, as HF restores the generator's state whatever the seed:
    // the masks are those of the checkpoint's seed, so the weights the uninterrupted run's.
    let resumed = run("cut", 8, Some(checkpoint), None);
    assert_close(&whole, &resumed, 0.0, "resumed with seed 8");
}

#[test]
fn a_truncated_optimizer_file_is_an_error_naming_it() {
    let _generator = ember_testkit::random_generator_lock();
    let tmp = tempfile::tempdir().unwrap();
    let mut a = args(&tmp.path().join("run"), 8);
    a.max_steps = 10;
    trainer(a.clone(), initial(tmp.path(), 0.0))
        .train()
        .unwrap();
    let checkpoint = tmp.path().join("run/checkpoint-10");
    let path = checkpoint.join("optimizer.bin");
    let bytes = std::fs::read(&path).unwrap();
    a.resume_from_checkpoint = Some(checkpoint.clone());
    for cut in [bytes.len() - 1, bytes.len() / 2, 3, 0] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let mut t = trainer(a.clone(), initial(tmp.path(), 0.0));
        match t.train() {
            Err(TrainError::File { path: p, message }) => {
                assert_eq!(p, path, "{message}");
            }
            other => panic!("cut to {cut} bytes: {other:?}"),
        }
    }
    // Whole again, but without its random state: an error naming that file.
    std::fs::write(&path, &bytes).unwrap();
    std::fs::remove_file(checkpoint.join("rng_state.json")).unwrap();
    let mut t = trainer(a, initial(tmp.path(), 0.0));
    match t.train() {
        Err(TrainError::Io { path: p, .. }) => assert_eq!(p, checkpoint.join("rng_state.json")),
        other => panic!("{other:?}"),
    }
}
