//! The `Accelerator` (accelerate's API over a hand-written burn loop): two ranks that are
//! threads equal one process on the combined batch, `gather_for_metrics` returns the dataset's
//! rows exactly once in order, and `save_state` / `load_state` resume training exactly.

mod support;

// `#[derive(Module)]` names the crate `burn`.
use ember::burn;
use ember::burn::module::Module;
use ember::burn::nn::{Dropout, DropoutConfig, Embedding, EmbeddingConfig, Linear, LinearConfig};
use ember::burn::optim::adaptor::OptimizerAdaptor;
use ember::burn::optim::{AdamW, AdamWConfig, Optimizer};
use ember::burn::tensor::activation::log_softmax;
use ember::burn::tensor::{Int, Tensor};
use ember::datasets::{Batch, BatchLabels, DataCollatorWithPadding, DataLoader, Dataset};
use ember::distributed::{ProcessGroup, ThreadGroup};
use ember::prelude::*;
use ember::train::{Accelerator, Reduction, TrainError};
use serde_json::json;
use std::path::Path;
use std::sync::Arc;

type B = TrainBackend;

/// Mean of the token embeddings, dropout, a linear layer.
#[derive(Module, Debug)]
struct Bag<B: BackendTrait> {
    embedding: Embedding<B>,
    dropout: Dropout,
    classifier: Linear<B>,
}

impl<B: BackendTrait> Bag<B> {
    fn new(dropout: f64) -> Self {
        let device = Default::default();
        Self {
            embedding: EmbeddingConfig::new(30, 8).init(&device),
            dropout: DropoutConfig::new(dropout).init(),
            classifier: LinearConfig::new(8, 2).init(&device),
        }
    }

    fn loss(&self, batch: Batch<B>) -> Tensor<B, 1> {
        let Some(BatchLabels::Sequence(labels)) = batch.labels.clone() else {
            panic!("sequence labels expected");
        };
        let mask = batch.attention_mask.float().unsqueeze_dim::<3>(2);
        let summed = (self.embedding.forward(batch.input_ids) * mask.clone()).sum_dim(1);
        let mean = self
            .dropout
            .forward((summed / mask.sum_dim(1)).squeeze_dim::<2>(1));
        log_softmax(self.classifier.forward(mean), 1)
            .gather(1, labels.unsqueeze_dim(1))
            .mean()
            .neg()
    }
}

/// `model` with its parameters drawn: burn draws a parameter's initial values when first read,
/// so clones of an unread model would each draw their own.
fn drawn(model: Bag<B>) -> Bag<B> {
    weights(&model);
    model
}

fn weights(model: &Bag<B>) -> Vec<Vec<f32>> {
    let bias = model.classifier.bias.as_ref().unwrap().val();
    [
        model.embedding.weight.val().flatten::<1>(0, 1),
        model.classifier.weight.val().flatten::<1>(0, 1),
        bias,
    ]
    .into_iter()
    .map(|t| t.into_data().to_vec::<f32>().unwrap())
    .collect()
}

fn loader(batch: usize) -> DataLoader<DataCollatorWithPadding> {
    DataLoader::new(
        &support::contains_five(5),
        DataCollatorWithPadding::new(0),
        batch,
    )
    .unwrap()
    .shuffle(true)
    .seed(42)
}

type Adam = OptimizerAdaptor<AdamW, Bag<B>, B>;

/// Trains `epochs` epochs (from `first_epoch`, the first one starting after `skip` batches)
/// with the accelerator's loop.
fn train(
    accelerator: &mut Accelerator,
    mut model: Bag<B>,
    optimizer: &mut Adam,
    loader: &ember::train::DataLoaderShard<DataCollatorWithPadding>,
    epochs: std::ops::Range<u64>,
    skip: usize,
) -> Bag<B> {
    let device = default_device();
    for epoch in epochs.clone() {
        let skipped = accelerator.skip_first_batches(loader, skip);
        let loader = if epoch == epochs.start {
            &skipped
        } else {
            loader
        };
        for batch in loader.iter::<B>(epoch, &device) {
            let loss = model.loss(batch.unwrap());
            if let Some(grads) = accelerator.backward(loss, &model).unwrap() {
                model = optimizer.step(1e-2, model, grads);
            }
        }
    }
    model
}

/// One process with batch `batch` against two ranks with half of it each, from the same
/// initial weights (rank 1 starts from others, which `prepare_model` must replace).
fn two_ranks_equal_one_process(batch: usize, accumulation: usize) {
    let initial = drawn(Bag::<B>::new(0.0));
    let mut single = Accelerator::single_process().gradient_accumulation_steps(accumulation);
    let shard = single.prepare_data_loader(loader(batch)).unwrap();
    let mut optimizer = AdamWConfig::new().init();
    let expected = weights(&train(
        &mut single,
        initial.clone(),
        &mut optimizer,
        &shard,
        0..3,
        0,
    ));
    let ranks = ThreadGroup::run(2, |group| {
        let rank = group.rank();
        let mut accelerator =
            Accelerator::new(Arc::new(group)).gradient_accumulation_steps(accumulation);
        let own = if rank == 0 {
            initial.clone()
        } else {
            Bag::new(0.0)
        };
        let model = accelerator.prepare_model(own).unwrap();
        let shard = accelerator.prepare_data_loader(loader(batch / 2)).unwrap();
        let mut optimizer = AdamWConfig::new().init();
        weights(&train(
            &mut accelerator,
            model,
            &mut optimizer,
            &shard,
            0..3,
            0,
        ))
    });
    for (rank, got) in ranks.iter().enumerate() {
        for (a, b) in got.iter().flatten().zip(expected.iter().flatten()) {
            assert!((a - b).abs() <= 1e-6, "rank {rank}: {a} against {b}");
        }
    }
}

#[test]
fn two_ranks_on_half_the_batch_train_as_one_process() {
    let _generator = ember_testkit::random_generator_lock();
    two_ranks_equal_one_process(8, 1);
}

#[test]
fn two_ranks_with_gradient_accumulation_train_as_one_process() {
    let _generator = ember_testkit::random_generator_lock();
    // 64 rows in batches of 8 (one process) or 4 (each rank): 8 micro-steps, 4 optimizer steps
    // an epoch; with accumulation 3 the epoch's last, partial accumulation synchronises at the
    // end of the loader, as accelerate's does.
    two_ranks_equal_one_process(8, 2);
    two_ranks_equal_one_process(8, 3);
}

#[test]
fn backward_communicates_only_on_the_synchronising_step() {
    let _generator = ember_testkit::random_generator_lock();
    let flags = ThreadGroup::run(2, |group| {
        let mut accelerator = Accelerator::new(Arc::new(group)).gradient_accumulation_steps(2);
        let model = Bag::<B>::new(0.0);
        let shard = accelerator.prepare_data_loader(loader(4)).unwrap();
        let mut seen = Vec::new();
        for batch in shard.iter::<B>(0, &default_device()).take(4) {
            let grads = accelerator
                .backward(model.loss(batch.unwrap()), &model)
                .unwrap();
            seen.push((grads.is_some(), accelerator.sync_gradients()));
        }
        seen
    });
    for seen in flags {
        assert_eq!(
            seen,
            [(false, false), (true, true), (false, false), (true, true)]
        );
    }
}

/// 11 rows whose label is their index: what `gather_for_metrics` returns tells which rows
/// each step gathered.
fn eleven_rows() -> Dataset {
    let rows: Vec<_> = (0..11)
        .map(|i| json!({"input_ids": [2, 3 + i], "label": i}))
        .collect();
    Dataset::from_json_rows(&rows).unwrap()
}

/// The labels each step gathers, with `gather_for_metrics` (`trim`) or `gather`.
fn gathered_labels(ranks: usize, batch: usize, trim: bool) -> Vec<Vec<Vec<i64>>> {
    ThreadGroup::run(ranks, |group| {
        let accelerator = Accelerator::new(Arc::new(group));
        let eval = DataLoader::new(&eleven_rows(), DataCollatorWithPadding::new(0), batch).unwrap();
        let shard = accelerator.prepare_data_loader(eval).unwrap();
        let device = default_device();
        shard
            .iter::<Backend>(0, &device)
            .map(|batch| {
                let Some(BatchLabels::Sequence(labels)) = batch.unwrap().labels else {
                    panic!("sequence labels expected");
                };
                let labels: Tensor<Backend, 1, Int> = match trim {
                    true => accelerator.gather_for_metrics(labels).unwrap(),
                    false => accelerator.gather(labels).unwrap(),
                };
                labels.into_data().convert::<i64>().to_vec::<i64>().unwrap()
            })
            .collect()
    })
}

#[test]
fn gather_for_metrics_returns_each_row_once_in_order() {
    let _generator = ember_testkit::random_generator_lock();
    // accelerate, 2 processes, batch 2, 11 rows: BatchSamplerShard deals the batches [0, 1],
    // [2, 3], ... alternately and completes the last one, [10], from the start: [10, 0]. The
    // last step gathers [8, 9, 10, 0], and gather_for_metrics keeps its first
    // 11 % (2 · 2) = 3 rows.
    let expected: Vec<Vec<i64>> = vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![8, 9, 10]];
    for rank in gathered_labels(2, 2, true) {
        assert_eq!(rank, expected);
    }
    // gather alone keeps the repeat.
    assert_eq!(gathered_labels(2, 2, false)[1][2], [8, 9, 10, 0]);
    // 3 processes, batch 2: steps of 6 rows; the last one, [6, 7], [8, 9], [10, 0], keeps
    // 11 % 6 = 5.
    let expected: Vec<Vec<i64>> = vec![vec![0, 1, 2, 3, 4, 5], vec![6, 7, 8, 9, 10]];
    for rank in gathered_labels(3, 2, true) {
        assert_eq!(rank, expected);
    }
    // 3 processes, batch 4: one step of 12 rows, the last rank's batch [8, 9, 10, 0].
    let expected: Vec<Vec<i64>> = vec![(0..11).collect()];
    for rank in gathered_labels(3, 4, true) {
        assert_eq!(rank, expected);
    }
}

#[test]
fn reduce_and_gather_object_combine_the_ranks() {
    let _generator = ember_testkit::random_generator_lock();
    let results = ThreadGroup::run(2, |group| {
        let rank = group.rank();
        let accelerator = Accelerator::new(Arc::new(group));
        let t = Tensor::<Backend, 1>::from_floats([rank as f32 + 1.0, 10.0], &default_device());
        let sum = accelerator.reduce(t.clone(), Reduction::Sum).unwrap();
        let mean = accelerator.reduce(t, Reduction::Mean).unwrap();
        let objects = accelerator
            .gather_object(vec![format!("rank {rank}"); rank + 1])
            .unwrap();
        (
            sum.into_data().to_vec::<f32>().unwrap(),
            mean.into_data().to_vec::<f32>().unwrap(),
            objects,
            accelerator.is_main_process(),
        )
    });
    for (rank, (sum, mean, objects, main)) in results.into_iter().enumerate() {
        assert_eq!(sum, [3.0, 20.0]);
        assert_eq!(mean, [1.5, 10.0]);
        assert_eq!(objects, ["rank 0", "rank 1", "rank 1"]);
        assert_eq!(main, rank == 0);
    }
}

/// Trains 2 epochs uninterrupted, and again with a stop after 3 batches of the second epoch:
/// `save_state` there, then a new model (other weights), optimizer and accelerator,
/// `load_state`, and the rest of the epoch. Returns both final weights.
fn resumed_and_uninterrupted(
    accelerator: impl Fn() -> Accelerator,
    dropout: f64,
    dir: &Path,
) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let setup = || {
        let accelerator = accelerator().gradient_accumulation_steps(3);
        accelerator.set_seed(7);
        let model = drawn(accelerator.prepare_model(Bag::<B>::new(dropout)).unwrap());
        let shard = accelerator.prepare_data_loader(loader(4)).unwrap();
        let optimizer: Adam = AdamWConfig::new().init();
        (accelerator, model, shard, optimizer)
    };
    let (mut acc, model, shard, mut opt) = setup();
    let start = model.clone();
    let whole = train(&mut acc, model, &mut opt, &shard, 0..2, 0);

    let (mut acc, _, shard, mut opt) = setup();
    let model = train(&mut acc, start, &mut opt, &shard, 0..1, 0);
    let stopped = accelerator_take(&mut acc, model, &mut opt, &shard, 3);
    acc.save_state(dir, &stopped, &opt).unwrap();

    let (mut acc, other, shard, opt) = setup();
    let (model, mut opt) = acc.load_state(dir, other, opt).unwrap();
    let resumed = train(&mut acc, model, &mut opt, &shard, 1..2, 3);
    (weights(&whole), weights(&resumed))
}

/// The first `batches` batches of epoch 1.
fn accelerator_take(
    accelerator: &mut Accelerator,
    mut model: Bag<B>,
    optimizer: &mut Adam,
    loader: &ember::train::DataLoaderShard<DataCollatorWithPadding>,
    batches: usize,
) -> Bag<B> {
    for batch in loader.iter::<B>(1, &default_device()).take(batches) {
        let loss = model.loss(batch.unwrap());
        if let Some(grads) = accelerator.backward(loss, &model).unwrap() {
            model = optimizer.step(1e-2, model, grads);
        }
    }
    model
}

#[test]
fn save_state_and_load_state_continue_training_exactly() {
    let _generator = ember_testkit::random_generator_lock();
    // One process with dropout: the seed and accelerate's step come back, so the resumed run
    // draws the masks the uninterrupted one did (burn's generator is one per process, so
    // ranks that are threads could not have a reproducible dropout each).
    let tmp = tempfile::tempdir().unwrap();
    let (whole, resumed) = resumed_and_uninterrupted(Accelerator::single_process, 0.3, tmp.path());
    assert_eq!(whole, resumed);
    assert!(tmp.path().join("random_states_0.json").is_file());

    // Two ranks without dropout: every rank writes and reads its own random_states_{i}.
    let tmp = tempfile::tempdir().unwrap();
    let results = ThreadGroup::run(2, |group| {
        let group: Arc<dyn ProcessGroup> = Arc::new(group);
        resumed_and_uninterrupted(|| Accelerator::new(group.clone()), 0.0, tmp.path())
    });
    for (whole, resumed) in results {
        assert_eq!(whole, resumed);
    }
    for file in [
        "model.safetensors",
        "optimizer.bin",
        "random_states_0.json",
        "random_states_1.json",
    ] {
        assert!(tmp.path().join(file).is_file(), "{file}");
    }
    // No temporary file is left behind.
    let names: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 4, "{names:?}");
}

#[test]
fn a_missing_or_corrupt_state_file_is_an_error_naming_it() {
    let _generator = ember_testkit::random_generator_lock();
    let tmp = tempfile::tempdir().unwrap();
    let accelerator = Accelerator::single_process();
    let model = Bag::<B>::new(0.0);
    let optimizer: Adam = AdamWConfig::new().init();
    accelerator
        .save_state(tmp.path(), &model, &optimizer)
        .unwrap();
    let load = |accelerator: &mut Accelerator| {
        accelerator
            .load_state(tmp.path(), Bag::<B>::new(0.0), AdamWConfig::new().init())
            .map(|_: (Bag<B>, Adam)| ())
    };
    let mut accelerator = Accelerator::single_process();
    load(&mut accelerator).unwrap();

    let states = tmp.path().join("random_states_0.json");
    std::fs::remove_file(&states).unwrap();
    match load(&mut accelerator) {
        Err(TrainError::Io { path, .. }) => assert_eq!(path, states),
        other => panic!(
            "expected an I/O error naming {}, got {other:?}",
            states.display()
        ),
    }
    std::fs::write(&states, "{ not json").unwrap();
    match load(&mut accelerator) {
        Err(TrainError::File { path, .. }) => assert_eq!(path, states),
        other => panic!(
            "expected a file error naming {}, got {other:?}",
            states.display()
        ),
    }
    for file in ["model.safetensors", "optimizer.bin"] {
        let path = tmp.path().join(file);
        let good = std::fs::read(&path).unwrap();
        std::fs::write(&path, &good[..good.len() / 2]).unwrap();
        match load(&mut accelerator) {
            Err(e @ TrainError::File { .. }) => {
                assert!(e.to_string().contains(file), "{e}")
            }
            other => panic!("expected a file error naming {file}, got {other:?}"),
        }
        std::fs::write(&path, good).unwrap();
    }
    // A model whose shapes differ from the saved one: the error names the tensor.
    let wider = Bag::<B> {
        embedding: EmbeddingConfig::new(31, 8).init(&default_device()),
        ..Bag::new(0.0)
    };
    let err = accelerator
        .load_state(tmp.path(), wider, AdamWConfig::new().init())
        .map(|_: (Bag<B>, Adam)| ())
        .unwrap_err();
    assert!(err.to_string().contains("embedding.weight"), "{err}");
    // The random states file was rewritten as garbage above and restored: loading works again
    // once it is valid.
    std::fs::write(
        &states,
        json!({"process_index": 0, "seed": null, "step": 0}).to_string(),
    )
    .unwrap();
    load(&mut accelerator).unwrap();
}

#[test]
fn a_prepared_loader_refuses_a_loader_already_sharded() {
    let _generator = ember_testkit::random_generator_lock();
    let accelerator = Accelerator::single_process();
    let sharded = loader(4).distributed(2, 0).unwrap();
    let err = accelerator.prepare_data_loader(sharded).unwrap_err();
    assert!(err.to_string().contains("already sharded"), "{err}");
}
