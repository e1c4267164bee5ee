//! Tensor parallel (Megatron's split of attention heads and MLP units) for Llama and BERT on
//! ranks that are threads ([`ThreadGroup`]): on 2 and 4 ranks the forward pass, the
//! gradients (read through an SGD step of rate 1, `w - grad`) and three training steps equal
//! the whole model's within 1e-5.

use burn::module::AutodiffModule;
use burn::optim::{GradientsParams, Optimizer, SgdConfig};
use ember::burn;
use ember::distributed::{ProcessGroup, SingleProcess, TensorParallel, ThreadGroup};
use ember::models::{
    BertConfig, BertForSequenceClassification, CausalLmInput, EncoderInput, LlamaConfig,
    LlamaForCausalLM, SequenceLabels, StateDict,
};
use ember::prelude::*;
use std::path::Path;
use std::sync::Arc;

type Llama = LlamaForCausalLM<TrainBackend>;

/// A tiny Llama with biases everywhere (so that the row-parallel biases are exercised),
/// 8 query heads over 4 key / value heads, saved once so that every rank loads the same
/// weights into tensors of its own.
fn save_tiny_llama(dir: &Path) {
    let config: LlamaConfig = serde_json::from_value(serde_json::json!({
        "model_type": "llama",
        "vocab_size": 48,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 4,
        "attention_bias": true,
        "mlp_bias": true,
        "tie_word_embeddings": false,
        "rms_norm_eps": 1e-6,
        "initializer_range": 0.2
    }))
    .unwrap();
    let device = default_device();
    // The other tests of this file build their models at the same time.
    let _generator = ember_testkit::random_generator_lock();
    <Backend as BackendTrait>::seed(&device, 5);
    let model = LlamaForCausalLM::<Backend>::new(&config, &device).unwrap();
    model.save_pretrained(dir).unwrap();
}

/// A batch of ids and its labels (the ids: next-token prediction).
fn batch(step: usize) -> (Tensor<TrainBackend, 2, Int>, Tensor<TrainBackend, 2, Int>) {
    let ids: Vec<i64> = (0..2 * 7)
        .map(|i| ((i * 5 + step * 3) % 47 + 1) as i64)
        .collect();
    let ids = Tensor::<TrainBackend, 1, Int>::from_ints(ids.as_slice(), &default_device())
        .reshape([2, 7]);
    (ids.clone(), ids)
}

/// The losses of `steps` SGD steps (rate `lr`) and the whole model's weights after them, on
/// this rank of `group` (the whole model for a group of one).
fn train_llama(
    dir: &Path,
    group: Arc<dyn ProcessGroup>,
    steps: usize,
    lr: f64,
) -> (Vec<f32>, StateDict) {
    let device = default_device();
    let tp = TensorParallel::new(group);
    let mut model = Llama::from_pretrained(dir, &device)
        .unwrap()
        .tensor_parallel(tp)
        .unwrap();
    let mut optim = SgdConfig::new().init();
    let mut losses = Vec::new();
    for step in 0..steps {
        let (ids, labels) = batch(step);
        let out = model
            .forward(CausalLmInput::new(ids).with_labels(labels))
            .unwrap();
        let loss = out.loss.unwrap();
        losses.push(loss.clone().into_scalar());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(lr, model, grads);
    }
    let whole = model.valid().gather_tensor_parallel().unwrap();
    (losses, whole.state_dict().unwrap())
}

/// Asserts that every tensor of `got` is within `tol` of `want`'s.
fn assert_close(got: &StateDict, want: &StateDict, tol: f32, at: &str) {
    assert_eq!(got.len(), want.len(), "{at}: number of tensors");
    for (key, (shape, values)) in want {
        let (got_shape, got_values) = &got[key];
        assert_eq!(got_shape, shape, "{at}: {key}");
        let diff = values
            .iter()
            .zip(got_values)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(diff <= tol, "{at}: {key} differs by {diff}");
    }
}

/// One SGD step of rate 1 leaves `w - grad`: the split model's gradients, gathered, equal the
/// whole model's, and so does its loss; three steps of rate 0.5 end at the same weights.
#[test]
fn llama_split_over_2_and_4_ranks_equals_the_whole_model() {
    let dir = tempfile::tempdir().unwrap();
    save_tiny_llama(dir.path());
    assert_split_trains_as_whole("Llama", dir.path(), train_llama);
}

/// A training run on one rank of a group (the whole model for a group of one): its losses
/// and the whole model's weights at the end.
type Run = fn(&Path, Arc<dyn ProcessGroup>, usize, f64) -> (Vec<f32>, StateDict);

/// `run` split over 2 and 4 thread ranks equals it on one process: one SGD step of rate 1
/// (so the gradients) and three of rate 0.5, losses and weights within 1e-5.
fn assert_split_trains_as_whole(model: &str, dir: &Path, run: Run) {
    for (steps, lr) in [(1, 1.0), (3, 0.5)] {
        let (losses, whole) = run(dir, Arc::new(SingleProcess), steps, lr);
        for ranks in [2, 4] {
            let runs = ThreadGroup::run(ranks, |group| run(dir, Arc::new(group), steps, lr));
            for (rank, (rank_losses, weights)) in runs.iter().enumerate() {
                let at = format!("{model}, {ranks} ranks, rank {rank}, {steps} steps");
                for (a, b) in rank_losses.iter().zip(&losses) {
                    assert!((a - b).abs() <= 1e-5, "{at}: loss {a} vs {b}");
                }
                assert_close(weights, &whole, 1e-5, &at);
            }
        }
    }
}

/// A group that does not divide the heads is refused, naming the count.
#[test]
fn llama_heads_the_group_does_not_divide_are_an_error() {
    let dir = tempfile::tempdir().unwrap();
    save_tiny_llama(dir.path());
    let errors = ThreadGroup::run(3, |group| {
        Llama::from_pretrained(dir.path(), &default_device())
            .unwrap()
            .tensor_parallel(TensorParallel::new(Arc::new(group)))
            .unwrap_err()
            .to_string()
    });
    assert!(
        errors[0].contains("num_attention_heads: 8 does not divide into 3"),
        "{}",
        errors[0]
    );
}

type Bert = BertForSequenceClassification<TrainBackend>;

/// A tiny BERT classifier without dropout (its ranks would draw different masks), 4 heads.
fn save_tiny_bert(dir: &Path) {
    let config = BertConfig {
        vocab_size: 40,
        hidden_size: 16,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        intermediate_size: 32,
        max_position_embeddings: 16,
        hidden_dropout_prob: 0.0,
        attention_probs_dropout_prob: 0.0,
        initializer_range: 0.2,
        ..BertConfig::default()
    };
    let device = default_device();
    // The other tests of this file build their models at the same time.
    let _generator = ember_testkit::random_generator_lock();
    <Backend as BackendTrait>::seed(&device, 9);
    BertForSequenceClassification::<Backend>::new(&config, &device)
        .save_pretrained(dir)
        .unwrap();
}

/// [`train_llama`] for the BERT classifier, on a padded batch (the masked attention path).
fn train_bert(
    dir: &Path,
    group: Arc<dyn ProcessGroup>,
    steps: usize,
    lr: f64,
) -> (Vec<f32>, StateDict) {
    let device = default_device();
    let mut model = Bert::from_pretrained(dir, &device).unwrap();
    model.base_model = model
        .base_model
        .tensor_parallel(TensorParallel::new(group))
        .unwrap();
    let mut optim = SgdConfig::new().init();
    let mut losses = Vec::new();
    for step in 0..steps {
        let ids: Vec<i64> = (0..3 * 6)
            .map(|i| ((i * 7 + step) % 37 + 2) as i64)
            .collect();
        let ids =
            Tensor::<TrainBackend, 1, Int>::from_ints(ids.as_slice(), &device).reshape([3, 6]);
        let mask = Tensor::<TrainBackend, 1, Int>::from_ints(
            [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0],
            &device,
        )
        .reshape([3, 6]);
        let labels = Tensor::<TrainBackend, 1, Int>::from_ints([0, 1, 1], &device);
        let out = model
            .forward(
                EncoderInput::new(ids).with_attention_mask(mask),
                Some(SequenceLabels::Classes(labels)),
            )
            .unwrap();
        let loss = out.loss.unwrap();
        losses.push(loss.clone().into_scalar());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(lr, model, grads);
    }
    let mut whole = model.valid();
    whole.base_model = whole.base_model.gather_tensor_parallel().unwrap();
    (losses, whole.state_dict().unwrap())
}

/// BERT's heads and intermediate units split over 2 and 4 ranks: the same loss, gradients
/// (an SGD step of rate 1) and weights after three steps as the whole model.
#[test]
fn bert_split_over_2_and_4_ranks_equals_the_whole_model() {
    let dir = tempfile::tempdir().unwrap();
    save_tiny_bert(dir.path());
    assert_split_trains_as_whole("BERT", dir.path(), train_bert);
}
