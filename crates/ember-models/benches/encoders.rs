//! Encoder workloads with random weights: a BERT-base forward pass (batch 8, seq 128), an
//! all-MiniLM-L6-v2-sized forward pass (batch 32, seq 128), and one training step of a
//! 3-layer, hidden-768, vocab-21,128 sequence classifier (the shape of hfl/rbt3; batch 32,
//! seq 128, AdamW, dropout on). The same with bfloat16: the BERT-base forward pass of a model
//! converted with `bfloat16()`, and the training step under `bf16` mixed precision (torch's
//! autocast). `cargo xtask bench` runs `xtask/bench/models_bench.py` beside it: the same shapes
//! in PyTorch.

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::{DType, Distribution, Int, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ember_models::{
    BertConfig, BertForSequenceClassification, BertModel, EncoderInput, OutputOptions,
    SequenceLabels,
};

type B = Flex;

/// Large blocks on transparent huge pages, as in the `ember` binary.
#[global_allocator]
static ALLOCATOR: ember_kernels::HugePageAlloc = ember_kernels::HugePageAlloc;

fn config(
    vocab: usize,
    hidden: usize,
    layers: usize,
    heads: usize,
    intermediate: usize,
) -> BertConfig {
    BertConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        intermediate_size: intermediate,
        ..BertConfig::default()
    }
}

fn ids<Bk: burn::tensor::backend::Backend>(
    batch: usize,
    seq: usize,
    vocab: usize,
    device: &Bk::Device,
) -> Tensor<Bk, 2, Int> {
    Tensor::<Bk, 2>::random(
        [batch, seq],
        Distribution::Uniform(0.0, vocab as f64),
        device,
    )
    .int()
}

fn forward(c: &mut Criterion, name: &str, config: &BertConfig, batch: usize, bf16: bool) {
    let device = Default::default();
    let model = BertModel::<B>::new(config, true, &device);
    let model = if bf16 {
        model.bfloat16().expect("bfloat16 holds float32's range")
    } else {
        model
    };
    let input = EncoderInput::new(ids::<B>(batch, 128, config.vocab_size, &device))
        .with_attention_mask(Tensor::ones([batch, 128], &device));
    let mut group = c.benchmark_group("encoders");
    group.sample_size(10);
    group.throughput(Throughput::Elements(batch as u64));
    group.bench_function(name, |b| {
        b.iter(|| {
            let out = model
                .forward(input.clone(), OutputOptions::default())
                .unwrap();
            // Wait for the result (backends may run lazily).
            out.last_hidden_state.into_data()
        })
    });
    group.finish();
}

/// One training step; with `autocast`, under that mixed precision (the Trainer's `bf16`).
fn train_step(c: &mut Criterion, name: &str, autocast: Option<DType>) {
    type AB = Autodiff<B>;
    let device = Default::default();
    let config = config(21128, 768, 3, 12, 3072);
    let mut model = Some(BertForSequenceClassification::<AB>::new(&config, &device));
    let mut optimizer = AdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(0.01)
        .init::<AB, BertForSequenceClassification<AB>>();
    let input = EncoderInput::new(ids::<AB>(32, 128, config.vocab_size, &device))
        .with_attention_mask(Tensor::ones([32, 128], &device));
    let labels = Tensor::<AB, 1>::random([32], Distribution::Uniform(0.0, 2.0), &device).int();
    let mut group = c.benchmark_group("encoders");
    group.sample_size(10);
    group.throughput(Throughput::Elements(32));
    group.bench_function(name, |b| {
        b.iter(|| {
            let _autocast = autocast.map(ember_kernels::autocast);
            let m = model.take().expect("the model is put back after each step");
            let loss = m
                .forward(input.clone(), Some(SequenceLabels::Classes(labels.clone())))
                .unwrap()
                .loss
                .unwrap();
            let grads = GradientsParams::from_grads(loss.backward(), &m);
            let m = optimizer.step(2e-5, m, grads);
            // Wait for the update to finish.
            let _ = m.classifier.out_proj.base.weight.val().inner().into_data();
            model = Some(m);
        })
    });
    group.finish();
    let _ = model.map(|m| m.valid());
}

fn bench(c: &mut Criterion) {
    // As the CLI and the Trainer run: freed buffers reused by the next iteration.
    ember_kernels::keep_freed_memory();
    let bert_base = config(30522, 768, 12, 12, 3072);
    forward(c, "bert_base_forward_b8_s128", &bert_base, 8, false);
    forward(c, "bert_base_forward_bf16_b8_s128", &bert_base, 8, true);
    forward(
        c,
        "minilm_l6_forward_b32_s128",
        &config(30522, 384, 6, 12, 1536),
        32,
        false,
    );
    train_step(c, "rbt3_train_step_b32_s128", None);
    train_step(c, "rbt3_train_step_bf16_b32_s128", Some(DType::BF16));
}

criterion_group!(benches, bench);
criterion_main!(benches);
