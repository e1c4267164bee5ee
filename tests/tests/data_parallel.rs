//! Data-parallel training through the `Trainer` on ranks that are threads
//! ([`ThreadGroup`]): two ranks on half the per-device batch end with the weights of one
//! process on the whole batch, with and without gradient accumulation.

mod support;

use ember::datasets::{DataCollatorWithPadding, Dataset};
use ember::distributed::{ProcessGroup, ThreadGroup};
use ember::models::{BertConfig, BertForSequenceClassification};
use ember::prelude::*;
use ember::train::{Trainer, TrainingArguments};
use std::path::Path;
use std::sync::Arc;

fn dataset() -> Dataset {
    support::contains_five(11)
}

type Model = BertForSequenceClassification<TrainBackend>;

/// A tiny BERT without dropout, so that the ranks' runs are deterministic.
fn model() -> Model {
    let config = BertConfig {
        vocab_size: 30,
        hidden_size: 16,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 32,
        max_position_embeddings: 32,
        hidden_dropout_prob: 0.0,
        attention_probs_dropout_prob: 0.0,
        ..BertConfig::default()
    };
    Model::new(&config, &default_device())
}

fn args(dir: &Path, batch: usize, accumulation: usize) -> TrainingArguments {
    let mut args = TrainingArguments::new(dir);
    args.per_device_train_batch_size = batch;
    args.gradient_accumulation_steps = accumulation;
    args.max_steps = 20;
    args.learning_rate = 2e-3;
    args.warmup_steps = 2;
    args.logging_steps = 1.0;
    args.save_steps = 10.0;
    args.disable_tqdm = true;
    args
}

type Weights = std::collections::BTreeMap<String, Vec<f32>>;

fn weights(model: &Model) -> Weights {
    model
        .state_dict()
        .unwrap()
        .into_iter()
        .map(|(k, (_, v))| (k, v))
        .collect()
}

fn losses(t: &Trainer<TrainBackend, Model, DataCollatorWithPadding>) -> Vec<f64> {
    t.state
        .log_history
        .iter()
        .filter_map(|e| e.get("loss")?.as_f64())
        .collect()
}

/// Trains on one process with `batch`, then on two ranks with half of it, from the same
/// initial weights (saved once; rank 1 starts from other weights, which DDP's broadcast must
/// replace), and compares.
fn two_ranks_equal_one_process(batch: usize, accumulation: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let init = tmp.path().join("init");
    model().save_pretrained(&init).unwrap();
    let initial = || Model::from_pretrained(&init, &default_device()).unwrap();
    let trainer = |args: TrainingArguments, model: Model| {
        Trainer::new(
            args,
            model,
            DataCollatorWithPadding::new(0),
            default_device(),
        )
        .unwrap()
        .train_dataset(dataset())
    };
    let mut single = trainer(
        args(&tmp.path().join("one"), batch, accumulation),
        initial(),
    );
    single.train().unwrap();

    let ranks = ThreadGroup::run(2, |group| {
        let rank = group.rank();
        let start = if rank == 0 { initial() } else { model() };
        let mut t = trainer(
            args(&tmp.path().join("two"), batch / 2, accumulation),
            start,
        )
        .data_parallel(Arc::new(group));
        t.train().unwrap();
        assert_eq!(t.process_index(), (rank, 2));
        assert_eq!(t.state.is_world_process_zero, rank == 0);
        (weights(&t.model), losses(&t))
    });
    let expected = weights(&single.model);
    for (rank, (weights, rank_losses)) in ranks.iter().enumerate() {
        for (key, values) in &expected {
            let worst = values
                .iter()
                .zip(&weights[key])
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(worst <= 1e-6, "rank {rank}: {key} differs by {worst}");
        }
        // The logged loss is the mean over ranks: the single process's, to f32 rounding.
        let single_losses = losses(&single);
        assert_eq!(rank_losses.len(), single_losses.len());
        for (a, b) in rank_losses.iter().zip(&single_losses) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} against {b}");
        }
    }
    // Only rank 0 wrote checkpoints, with the same files as one process.
    assert!(tmp
        .path()
        .join("two/checkpoint-10/model.safetensors")
        .is_file());
    assert!(tmp
        .path()
        .join("two/checkpoint-20/trainer_state.json")
        .is_file());
}

#[test]
fn two_ranks_on_half_the_batch_train_as_one_process() {
    two_ranks_equal_one_process(8, 1);
}

#[test]
fn two_ranks_with_gradient_accumulation_train_as_one_process() {
    two_ranks_equal_one_process(4, 2);
}

/// Evaluation under data parallel: the evaluation set (11 rows, batches of 2: the ranks' last
/// batches are padded with repeats) is sharded over two ranks and gathered, and every rank
/// reports exactly the metrics, predictions and labels of one process.
#[test]
fn two_ranks_evaluate_as_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let init = tmp.path().join("init");
    model().save_pretrained(&init).unwrap();
    let eval = support::contains_five(3)
        .select(&(0..11).collect::<Vec<_>>())
        .unwrap();
    let trainer = |dir: &str, model: Model| {
        let mut args = args(&tmp.path().join(dir), 4, 1);
        args.per_device_eval_batch_size = 2;
        Trainer::new(
            args,
            model,
            DataCollatorWithPadding::new(0),
            default_device(),
        )
        .unwrap()
        .train_dataset(dataset())
        .compute_metrics(|p| {
            let (predictions, labels) = p.sequence_classes();
            ember::train::metrics::classification_metrics(&predictions, &labels)
        })
    };
    let initial = || Model::from_pretrained(&init, &default_device()).unwrap();
    let mut single = trainer("one", initial());
    let expected = single.evaluate(&eval).unwrap();
    let expected_predictions = single.predict(&eval).unwrap().predictions;
    assert_eq!(expected_predictions.label_ids.len(), 11);
    let ranks = ThreadGroup::run(2, |group| {
        let mut t = trainer("two", initial()).data_parallel(Arc::new(group));
        (
            t.evaluate(&eval).unwrap(),
            t.predict(&eval).unwrap().predictions,
        )
    });
    let timing = |name: &String| name.ends_with("_runtime") || name.ends_with("_per_second");
    for (metrics, predictions) in ranks {
        for (name, value) in &expected {
            if !timing(name) {
                assert_eq!(metrics[name], *value, "{name}");
            }
        }
        assert_eq!(metrics.len(), expected.len());
        assert_eq!(predictions, expected_predictions);
    }
}

type Lora = ember::peft::PeftModel<TrainBackend, Model>;

/// `model` with a LoRA adapter on the attention's query and value projections (peft's
/// defaults: r 8, B zeros, A drawn at random, so rank 1's differs until the broadcast).
fn with_lora(model: Model) -> Lora {
    let config = ember::peft::LoraConfig::new(ember::peft::TargetModules::Names(vec![
        "query".into(),
        "value".into(),
    ]));
    ember::peft::get_peft_model(model, config).unwrap()
}

/// LoRA under data parallel: two ranks on half the batch end 20 steps with the adapter of one
/// process on the whole batch, within 1e-6 (rank 1 starts from another base and adapter).
#[test]
fn two_ranks_train_a_lora_adapter_as_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let init = tmp.path().join("init");
    let start = with_lora(model());
    start.model().save_pretrained(&init).unwrap();
    start.save_pretrained(tmp.path().join("adapter")).unwrap();
    let initial = || {
        let base = Model::from_pretrained(&init, &default_device()).unwrap();
        ember::peft::PeftModel::from_pretrained(
            base,
            tmp.path().join("adapter"),
            ember::peft::DEFAULT_ADAPTER,
            true,
        )
        .unwrap()
    };
    let trainer = |dir: &str, batch: usize, model: Lora| {
        Trainer::new(
            args(&tmp.path().join(dir), batch, 1),
            model,
            DataCollatorWithPadding::new(0),
            default_device(),
        )
        .unwrap()
        .train_dataset(dataset())
    };
    let mut single = trainer("one", 8, initial());
    single.train().unwrap();
    let expected = single
        .model
        .adapter_state_dict(ember::peft::DEFAULT_ADAPTER);
    assert!(!expected.is_empty());
    let ranks = ThreadGroup::run(2, |group| {
        let start = if group.rank() == 0 {
            initial()
        } else {
            with_lora(model())
        };
        let mut t = trainer("two", 4, start).data_parallel(Arc::new(group));
        t.train().unwrap();
        t.model.adapter_state_dict(ember::peft::DEFAULT_ADAPTER)
    });
    for (rank, adapter) in ranks.iter().enumerate() {
        for (key, (_, values)) in &expected {
            let worst = values
                .iter()
                .zip(&adapter[key].1)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(worst <= 1e-6, "rank {rank}: {key} differs by {worst}");
        }
    }
    // The adapter moved: B left zero.
    let moved = expected
        .iter()
        .filter(|(k, _)| k.contains("lora_B"))
        .any(|(_, (_, v))| v.iter().any(|x| *x != 0.0));
    assert!(moved, "the adapter did not train");
}

/// bf16 mixed precision under data parallel: the ranks stay identical to each other (every
/// step averages the same gradients), and their losses follow one process's on the whole batch
/// to within bf16's rounding of the differently summed gradients.
#[test]
fn two_ranks_in_bf16_stay_in_step_and_follow_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let init = tmp.path().join("init");
    model().save_pretrained(&init).unwrap();
    let initial = || Model::from_pretrained(&init, &default_device()).unwrap();
    let trainer = |dir: &str, batch: usize| {
        let mut args = args(&tmp.path().join(dir), batch, 1);
        args.bf16 = true;
        Trainer::new(
            args,
            initial(),
            DataCollatorWithPadding::new(0),
            default_device(),
        )
        .unwrap()
        .train_dataset(dataset())
    };
    let mut single = trainer("one", 8);
    single.train().unwrap();
    let ranks = ThreadGroup::run(2, |group| {
        let mut t = trainer("two", 4).data_parallel(Arc::new(group));
        t.train().unwrap();
        (weights(&t.model), losses(&t))
    });
    assert_eq!(ranks[0].0, ranks[1].0, "the ranks' weights diverged");
    let single_losses = losses(&single);
    assert_eq!(ranks[0].1.len(), single_losses.len());
    for (a, b) in ranks[0].1.iter().zip(&single_losses) {
        assert!((a - b).abs() <= 2e-2 * b.abs().max(1.0), "{a} against {b}");
    }
}
