//! Pipeline parallel (GPipe and 1F1B) for Llama on ranks that are threads ([`ThreadGroup`]):
//! a tiny Llama cut into 2 and 4 stages, a batch of 8 as 4 micro-batches. The mean loss and
//! the gradient of every parameter (by HF key) equal the whole model's on the whole batch
//! within 1e-5, with separate and with tied word embeddings, and three AdamW steps on each
//! stage's gradients end with the weights of single-process training within 1e-4.

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use ember::burn;
use ember::distributed::{PipelineParallel, Schedule, ThreadGroup};
use ember::models::{
    CausalLmInput, LlamaConfig, LlamaForCausalLM, LlamaMicroBatch, LlamaPipelineStage,
};
use ember::prelude::*;
use std::collections::BTreeMap;
use std::sync::Arc;

type Llama = LlamaForCausalLM<TrainBackend>;

const BATCH: usize = 8;
const SEQ: usize = 6;
const MICRO_BATCHES: usize = 4;
const TOLERANCE: f32 = 1e-5;
/// How far a weight after AdamW steps at a learning rate of 1e-2 may end from one process's.
/// AdamW divides each gradient by its own running magnitude, so the rounding in which the
/// stages' sums differ (micro-batches, kernels that differ between AVX2 and AVX-512 CPUs) moves
/// a weight with a near-zero gradient (a tied embedding row of a token seldom predicted) by a
/// visible part of a step: up to 1.1e-5 seen on an AVX-512 CPU. 1e-4 is 1 % of one step; the
/// gradients themselves are compared at [`TOLERANCE`].
const TRAINED_TOLERANCE: f32 = 1e-4;

/// The tiny Llama of the task: 4 layers, hidden 32, 4 heads, vocabulary 64, fixed seed.
fn tiny_llama(tied: bool) -> Llama {
    let config: LlamaConfig = serde_json::from_value(serde_json::json!({
        "model_type": "llama",
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": tied,
        "rms_norm_eps": 1e-6,
        "initializer_range": 0.2
    }))
    .unwrap();
    let device = default_device();
    // The other tests of this file build their models at the same time.
    let _generator = ember_testkit::random_generator_lock();
    <Backend as BackendTrait>::seed(&device, 11);
    let model = Llama::new(&config, &device).unwrap();
    // burn initialises parameters lazily, and a clone of a parameter not yet read initialises
    // on its own, with other random values: every rank's clone must see these weights.
    collect(&model, None);
    model
}

/// Ids (also the labels) `[BATCH, SEQ]`, different for each step.
fn batch(step: usize) -> Tensor<TrainBackend, 2, Int> {
    let ids: Vec<i64> = (0..BATCH * SEQ)
        .map(|i| ((i * 7 + step * 13 + i / SEQ) % 63 + 1) as i64)
        .collect();
    Tensor::<TrainBackend, 1, Int>::from_ints(ids.as_slice(), &default_device())
        .reshape([BATCH, SEQ])
}

fn micro_batches(ids: &Tensor<TrainBackend, 2, Int>) -> Vec<LlamaMicroBatch<TrainBackend>> {
    let rows = BATCH / MICRO_BATCHES;
    (0..MICRO_BATCHES)
        .map(|k| {
            let ids = ids.clone().slice([k * rows..(k + 1) * rows, 0..SEQ]);
            LlamaMicroBatch {
                input_ids: ids.clone(),
                attention_mask: None,
                labels: ids,
            }
        })
        .collect()
}

/// Every parameter's value (`Values`) or gradient (`Grads`) by id, in burn's layout.
struct Collect<'a> {
    grads: Option<&'a GradientsParams>,
    out: BTreeMap<ParamId, Vec<f32>>,
}

impl ModuleVisitor<TrainBackend> for Collect<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<TrainBackend, D>>) {
        let data = match self.grads {
            Some(grads) => match grads.get::<Backend, D>(param.id) {
                Some(g) => g.into_data(),
                None => return,
            },
            None => param.val().into_data(),
        };
        self.out
            .insert(param.id, data.convert::<f32>().into_vec::<f32>().unwrap());
    }
}

fn collect<M: Module<TrainBackend>>(
    module: &M,
    grads: Option<&GradientsParams>,
) -> BTreeMap<ParamId, Vec<f32>> {
    let mut c = Collect {
        grads,
        out: BTreeMap::new(),
    };
    module.visit(&mut c);
    c.out
}

/// `by_id` renamed to HF keys through the whole model's names.
fn by_key(model: &Llama, by_id: &BTreeMap<ParamId, Vec<f32>>) -> BTreeMap<String, Vec<f32>> {
    model
        .named_parameters()
        .into_iter()
        .filter_map(|p| by_id.get(&p.id).map(|v| (p.name, v.clone())))
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The whole model's loss and gradients (by HF key) on the whole batch.
fn reference(
    model: &Llama,
    ids: &Tensor<TrainBackend, 2, Int>,
) -> (f32, BTreeMap<String, Vec<f32>>) {
    let loss = model
        .forward(CausalLmInput::new(ids.clone()).with_labels(ids.clone()))
        .unwrap()
        .loss
        .unwrap();
    let value = loss.clone().into_scalar();
    let grads = GradientsParams::from_grads(loss.backward(), model);
    (value, by_key(model, &collect(model, Some(&grads))))
}

/// Each stage's mean loss and gradients by HF key, on `stages` thread ranks.
fn pipeline_grads(
    model: &Llama,
    stages: usize,
    schedule: Schedule,
    ids: &Tensor<TrainBackend, 2, Int>,
) -> Vec<(f32, BTreeMap<String, Vec<f32>>)> {
    let micro = micro_batches(ids);
    ThreadGroup::run(stages, |group| {
        let pipe = PipelineParallel::new(Arc::new(group), schedule, MICRO_BATCHES).unwrap();
        let stage =
            LlamaPipelineStage::from_model(model.clone(), pipe.stage(), pipe.num_stages()).unwrap();
        let out = pipe.train_step(&stage, &micro).unwrap();
        let grads = stage.all_reduce_tied_embeddings(&pipe, out.grads).unwrap();
        (out.loss, by_key(model, &collect(&stage, Some(&grads))))
    })
}

fn check_gradients(stages: usize, schedule: Schedule, tied: bool) {
    let model = tiny_llama(tied);
    let ids = batch(0);
    let (loss, expected) = reference(&model, &ids);
    let per_stage = pipeline_grads(&model, stages, schedule, &ids);
    let mut covered = std::collections::BTreeSet::new();
    let mut worst = 0.0f32;
    for (s, (stage_loss, grads)) in per_stage.iter().enumerate() {
        assert!(
            (stage_loss - loss).abs() < TOLERANCE,
            "stage {s}: loss {stage_loss}, whole model {loss}"
        );
        for (key, g) in grads {
            let d = max_diff(g, &expected[key]);
            assert!(d < TOLERANCE, "stage {s}: `{key}` differs by {d}");
            worst = worst.max(d);
            covered.insert(key.clone());
        }
    }
    let all: std::collections::BTreeSet<_> = expected.keys().cloned().collect();
    assert_eq!(covered, all, "every parameter on some stage");
    let layers = |s: usize| {
        per_stage[s]
            .1
            .keys()
            .filter(|k| k.ends_with("mlp.down_proj.weight"))
            .count()
    };
    assert_eq!(
        (0..stages).map(layers).sum::<usize>(),
        4,
        "each layer on one stage"
    );
    eprintln!("{stages} stages, {schedule:?}, tied {tied}: loss {loss}, largest gradient difference {worst:e}");
}

#[test]
fn two_stages_gpipe_gradients_equal_the_whole_model() {
    check_gradients(2, Schedule::GPipe, false);
}

#[test]
fn two_stages_1f1b_gradients_equal_the_whole_model() {
    check_gradients(2, Schedule::OneFOneB, false);
}

#[test]
fn four_stages_gpipe_gradients_equal_the_whole_model() {
    check_gradients(4, Schedule::GPipe, false);
}

#[test]
fn four_stages_1f1b_gradients_equal_the_whole_model() {
    check_gradients(4, Schedule::OneFOneB, false);
}

/// The embedding matrix is used by the first stage (input) and the last (output projection):
/// after `all_reduce_tied_embeddings` both hold the whole model's gradient of it.
#[test]
fn tied_embeddings_gradients_equal_the_whole_model() {
    check_gradients(2, Schedule::OneFOneB, true);
    check_gradients(4, Schedule::GPipe, true);
}

const STEPS: usize = 3;

fn adamw() -> AdamWConfig {
    AdamWConfig::new().with_weight_decay(0.01)
}

/// Three AdamW steps on the whole batch in one process: the weights by HF key.
fn single_process_training(model: Llama) -> BTreeMap<String, Vec<f32>> {
    let names = model.clone();
    let mut optim = adamw().init::<TrainBackend, Llama>();
    let mut model = model;
    for step in 0..STEPS {
        let ids = batch(step);
        let loss = model
            .forward(CausalLmInput::new(ids.clone()).with_labels(ids))
            .unwrap()
            .loss
            .unwrap();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-2, model, grads);
    }
    by_key(&names, &collect(&model, None))
}

fn check_training(stages: usize, schedule: Schedule, tied: bool) {
    let model = tiny_llama(tied);
    let expected = single_process_training(model.clone());
    let per_stage = ThreadGroup::run(stages, |group| {
        let pipe = PipelineParallel::new(Arc::new(group), schedule, MICRO_BATCHES).unwrap();
        let mut stage =
            LlamaPipelineStage::from_model(model.clone(), pipe.stage(), pipe.num_stages()).unwrap();
        let mut optim = adamw().init::<TrainBackend, LlamaPipelineStage<TrainBackend>>();
        for step in 0..STEPS {
            let out = pipe
                .train_step(&stage, &micro_batches(&batch(step)))
                .unwrap();
            let grads = stage.all_reduce_tied_embeddings(&pipe, out.grads).unwrap();
            stage = optim.step(1e-2, stage, grads);
        }
        by_key(&model, &collect(&stage, None))
    });
    let mut worst = 0.0f32;
    let mut covered = 0;
    for (s, weights) in per_stage.iter().enumerate() {
        for (key, w) in weights {
            let d = max_diff(w, &expected[key]);
            assert!(
                d < TRAINED_TOLERANCE,
                "stage {s}: `{key}` differs by {d} after {STEPS} steps"
            );
            worst = worst.max(d);
            covered += 1;
        }
    }
    // The tied matrix is held twice.
    assert_eq!(covered, expected.len() + usize::from(tied && stages > 1));
    // The weights moved: a comparison of untouched weights would prove nothing.
    let initial = by_key(&model, &collect(&model, None));
    let moved = initial
        .iter()
        .map(|(k, w)| max_diff(w, &expected[k]))
        .fold(0.0, f32::max);
    assert!(moved > 1e-3, "training moved the weights by {moved}");
    eprintln!("{stages} stages, {schedule:?}, tied {tied}: after {STEPS} AdamW steps largest weight difference {worst:e}");
}

#[test]
fn adamw_steps_on_two_stages_equal_single_process_training() {
    check_training(2, Schedule::OneFOneB, false);
}

#[test]
fn adamw_steps_on_four_stages_equal_single_process_training() {
    check_training(4, Schedule::GPipe, false);
    check_training(4, Schedule::OneFOneB, true);
}

/// Bad stage arguments name the values, never panic.
#[test]
fn bad_stage_arguments_are_typed_errors() {
    let model = tiny_llama(false);
    for (stage, stages) in [(0, 0), (2, 2), (0, 5)] {
        let e = LlamaPipelineStage::from_model(model.clone(), stage, stages).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("stage {stage} of {stages}")),
            "{e}"
        );
    }
    assert_eq!(
        (0..4)
            .map(|s| LlamaPipelineStage::<TrainBackend>::layer_range(10, s, 4).unwrap())
            .collect::<Vec<_>>(),
        vec![0..3, 3..6, 6..8, 8..10]
    );
    // A first-stage micro-batch with ids beyond the vocabulary: the model's error, typed.
    let e = ThreadGroup::run(1, |group| {
        let pipe = PipelineParallel::new(Arc::new(group), Schedule::GPipe, 1).unwrap();
        let stage = LlamaPipelineStage::from_model(model.clone(), 0, 1).unwrap();
        let ids = batch(0).add_scalar(100);
        let micro = vec![LlamaMicroBatch {
            input_ids: ids.clone(),
            attention_mask: None,
            labels: ids,
        }];
        pipe.train_step(&stage, &micro).unwrap_err()
    })
    .remove(0);
    assert!(
        matches!(
            &e,
            ember::distributed::DistributedError::Stage { stage: 0, .. }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("outside the vocabulary"), "{e}");
}
