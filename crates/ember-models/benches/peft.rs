//! LoRA workloads (`ember_peft::get_peft_model`): training steps that update only the adapters,
//! and decoding through an unmerged or a merged adapter. `cargo xtask bench` runs
//! `xtask/bench/peft_bench.py` beside it: the same training steps with Python `peft` 0.21 +
//! PyTorch on the same shapes (the decoding rows are Ember's alone).
//!
//! - `lora_rbt3_train_step_b32_s128`: the `encoders/rbt3_train_step_b32_s128` classifier (3
//!   layers, hidden 768, vocab 21,128, random weights, dropout on), LoRA r 8, alpha 16 on
//!   `query` / `value`, task `SEQ_CLS` (so the classifier is a trained copy), AdamW, batch 32,
//!   seq 128.
//! - `lora_smollm2_train_step_b8_s256`: SmolLM2-135M-Instruct (from
//!   `../shared/tools/make-smollm2`; skipped, saying so, when absent), LoRA r 8, alpha 16 on
//!   `q_proj` / `v_proj`, task `CAUSAL_LM`, AdamW, batch 8, seq 256, labels = the ids.
//! - `{prompt,prefix}_smollm2_train_step_b8_s256`: the same SmolLM2 step with prompt tuning
//!   (20 virtual tokens, `RANDOM` init, so 276 positions per row) or prefix tuning (20 prefix
//!   positions per layer, no projection) in place of the LoRA: only the prompt table is
//!   trained.
//! - `smollm2_{base,lora_unmerged,lora_merged}_generate_b1_p16_n64`: greedy decoding of 64
//!   tokens after a 16-token prompt at batch 1 (as `generation/smollm2_generate_b1_p16_n64`)
//!   with no adapter, with a LoRA (r 8 on `q_proj` / `v_proj`, `init_lora_weights = false`, so
//!   B is not zero) applied as two thin products per layer, and with the same LoRA merged into
//!   the weights (`merge_adapter`).

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use burn::backend::{Autodiff, Flex};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ember_models::generation::{generate, GenerateOptions, GenerationConfig, Prompt};
use ember_models::{
    BertConfig, BertForSequenceClassification, CausalLmInput, EncoderInput, LlamaForCausalLM,
    SequenceLabels,
};
use ember_peft::{
    get_peft_model, InitLoraWeights, LoraConfig, PeftConfig, PrefixTuningConfig,
    PromptTuningConfig, TargetModules, TaskType,
};

type B = Flex;

/// Large blocks on transparent huge pages, as in the `ember` binary.
#[global_allocator]
static ALLOCATOR: ember_kernels::HugePageAlloc = ember_kernels::HugePageAlloc;
type AB = Autodiff<Flex>;

/// LoRA r 8, alpha 16 on `targets`, for `task`.
fn lora(targets: [&str; 2], task: TaskType, init: bool) -> LoraConfig {
    LoraConfig {
        r: 8,
        lora_alpha: 16.0,
        task_type: Some(task),
        init_lora_weights: InitLoraWeights::Bool(init),
        ..LoraConfig::new(TargetModules::names(targets))
    }
}

fn rbt3_train_step(c: &mut Criterion) {
    let device = Default::default();
    let config = BertConfig {
        vocab_size: 21128,
        hidden_size: 768,
        num_hidden_layers: 3,
        num_attention_heads: 12,
        intermediate_size: 3072,
        ..BertConfig::default()
    };
    let base = BertForSequenceClassification::<AB>::new(&config, &device);
    let peft = get_peft_model(base, lora(["query", "value"], TaskType::SeqCls, true))
        .expect("query / value exist in BERT");
    let mut model = Some(peft);
    let mut optimizer = AdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(0.01)
        .init::<AB, _>();
    let ids =
        Tensor::<AB, 2>::random([32, 128], Distribution::Uniform(0.0, 21128.0), &device).int();
    let input = EncoderInput::new(ids).with_attention_mask(Tensor::ones([32, 128], &device));
    let labels = Tensor::<AB, 1>::random([32], Distribution::Uniform(0.0, 2.0), &device).int();
    let mut group = c.benchmark_group("peft");
    group.sample_size(10);
    group.throughput(Throughput::Elements(32));
    group.bench_function("lora_rbt3_train_step_b32_s128", |b| {
        b.iter(|| {
            let m = model.take().expect("the model is put back after each step");
            let loss = m
                .base_model
                .forward(input.clone(), Some(SequenceLabels::Classes(labels.clone())))
                .unwrap()
                .loss
                .unwrap();
            let grads = GradientsParams::from_grads(loss.backward(), &m);
            let m = optimizer.step(2e-5, m, grads);
            // Wait for the update to finish.
            let _ = m.base_model.classifier.out_proj.adapters[0]
                .copy
                .as_ref()
                .expect("SEQ_CLS trains a copy of the classifier")
                .weight
                .val()
                .inner()
                .into_data();
            model = Some(m);
        })
    });
    group.finish();
}

fn smollm2_train_step(c: &mut Criterion, dir: &std::path::Path, name: &str, config: PeftConfig) {
    let device = Default::default();
    let base = LlamaForCausalLM::<AB>::from_pretrained(dir, &device).unwrap();
    let peft = get_peft_model(base, config).expect("the adapter fits SmolLM2");
    let mut model = Some(peft);
    let mut optimizer = AdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(0.01)
        .init::<AB, _>();
    let (batch, seq) = (8, 256);
    // The same ids as peft_bench.py: `(100 + 37·(row + 1)·t + 11·t²) mod 40,000`.
    let ids: Vec<i64> = (0..batch)
        .flat_map(|r| {
            (0..seq).map(move |t| ((100 + 37 * (r + 1) * t + 11 * t * t) % 40_000) as i64)
        })
        .collect();
    let ids = Tensor::<AB, 2, Int>::from_data(TensorData::new(ids, [batch, seq]), &device);
    let mut group = c.benchmark_group("peft");
    group.sample_size(10);
    group.throughput(Throughput::Elements(batch as u64));
    group.bench_function(name, |b| {
        b.iter(|| {
            let m = model.take().expect("the model is put back after each step");
            let loss = m
                .base_model
                .forward(CausalLmInput::new(ids.clone()).with_labels(ids.clone()))
                .unwrap()
                .loss
                .unwrap();
            let grads = GradientsParams::from_grads(loss.backward(), &m);
            let m = optimizer.step(2e-4, m, grads);
            let _ = wait_for_update(&m);
            model = Some(m);
        })
    });
    group.finish();
}

/// The prompt-learning config of the `{prompt,prefix}_smollm2_train_step_b8_s256` rows.
fn prompt_learning(prefix: bool) -> PeftConfig {
    if prefix {
        let mut config = PrefixTuningConfig::new(20);
        config.prompt.task_type = Some(TaskType::CausalLm);
        config.into()
    } else {
        let mut config = PromptTuningConfig::new(20);
        config.prompt.task_type = Some(TaskType::CausalLm);
        config.into()
    }
}

/// Reads one trained tensor (the last layer's LoRA B, or the prompt table), so that the step
/// has finished.
fn wait_for_update(m: &ember_peft::PeftModel<AB, LlamaForCausalLM<AB>>) -> TensorData {
    let model = &m.base_model.model;
    if let Some(prompt) = model.embed_tokens.active_prompt() {
        return prompt.embedding.val().inner().into_data();
    }
    let layer = model.layers.last().expect("layers");
    layer.self_attn.v_proj.adapters[0]
        .lora
        .as_ref()
        .expect("v_proj has a LoRA")
        .lora_b
        .val()
        .inner()
        .into_data()
}

fn decode_with_adapter(c: &mut Criterion, dir: &std::path::Path) {
    const PROMPT: usize = 16;
    const NEW: usize = 64;
    let device = Default::default();
    let model = LlamaForCausalLM::<B>::from_pretrained(dir, &device).unwrap();
    let config = GenerationConfig {
        eos_token_id: None,
        ..GenerationConfig::greedy(NEW)
    };
    // The prompt of `generation/smollm2_generate_b1_p16_n64`.
    let prompt = Prompt::left_padded(
        vec![(0..PROMPT)
            .map(|t| (100 + 37 * t) as u32 % 40_000)
            .collect()],
        0,
    );
    let mut group = c.benchmark_group("peft");
    group.sample_size(10);
    group.throughput(Throughput::Elements(NEW as u64));
    let run = |m: &LlamaForCausalLM<B>| {
        generate(m, &prompt, &config, GenerateOptions::default(), &device).unwrap()
    };
    group.bench_function(format!("smollm2_base_generate_b1_p{PROMPT}_n{NEW}"), |b| {
        b.iter(|| run(&model))
    });
    let mut peft = get_peft_model(
        model.clone(),
        lora(["q_proj", "v_proj"], TaskType::CausalLm, false),
    )
    .expect("q_proj / v_proj exist in Llama");
    group.bench_function(
        format!("smollm2_lora_unmerged_generate_b1_p{PROMPT}_n{NEW}"),
        |b| b.iter(|| run(peft.model())),
    );
    let unmerged = run(peft.model());
    peft.merge_adapter();
    let merged = run(peft.model());
    if unmerged.sequences != merged.sequences {
        eprintln!("note: the merged adapter's greedy tokens differ from the unmerged ones");
    }
    group.bench_function(
        format!("smollm2_lora_merged_generate_b1_p{PROMPT}_n{NEW}"),
        |b| b.iter(|| run(peft.model())),
    );
    group.finish();
}

fn bench(c: &mut Criterion) {
    // As the CLI and the Trainer run: freed buffers reused by the next iteration.
    ember_kernels::keep_freed_memory();
    rbt3_train_step(c);
    let Some(dir) = ember_testkit::smollm2() else {
        return;
    };
    let lora = lora(["q_proj", "v_proj"], TaskType::CausalLm, true);
    smollm2_train_step(c, &dir, "lora_smollm2_train_step_b8_s256", lora.into());
    for (name, prefix) in [
        ("prompt_smollm2_train_step_b8_s256", false),
        ("prefix_smollm2_train_step_b8_s256", true),
    ] {
        smollm2_train_step(c, &dir, name, prompt_learning(prefix));
    }
    decode_with_adapter(c, &dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
