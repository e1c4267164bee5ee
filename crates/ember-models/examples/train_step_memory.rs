//! Peak resident memory of the `encoders/rbt3_train_step_b32_s128` workload: a 3-layer,
//! hidden-768, vocab-21,128 BERT classifier (the shape of hfl/rbt3), batch 32, seq 128, AdamW,
//! three training steps. Prints one JSON line with the process's peak resident set (`VmHWM`
//! of `/proc/self/status`, Linux only), which `cargo xtask bench` compares with
//! `xtask/bench/memory_bench.py`, the same steps in PyTorch.
//!
//! With `--lora`, the classifier is wrapped by `ember_peft::get_peft_model` first (LoRA r 8,
//! alpha 16 on `query` / `value`, task `SEQ_CLS`: the `peft/lora_rbt3_train_step_b32_s128`
//! workload), so only the adapters and the classifier's copy are trained; the row is
//! `memory/lora_rbt3_train_step_b32_s128` (Python: `memory_bench.py --lora`).
//!
//! With `--prompt-tuning` or `--prefix-tuning`, the workload is instead three steps of the
//! `peft/{prompt,prefix}_smollm2_train_step_b8_s256` rows: SmolLM2-135M-Instruct (skipped,
//! saying so, when absent) with 20 virtual tokens or 20 prefix positions, batch 8, seq 256;
//! the rows are `memory/{prompt,prefix}_smollm2_train_step_b8_s256`.
//!
//! ```sh
//! cargo run --release -p ember-models --example train_step_memory \
//!     [-- --lora | --prompt-tuning | --prefix-tuning]
//! ```

use burn::backend::{Autodiff, Flex};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::{Distribution, Tensor};
use burn::tensor::{Int, TensorData};
use ember_models::{
    BertConfig, BertForSequenceClassification, CausalLmInput, EncoderInput, LlamaForCausalLM,
    SequenceLabels,
};
use ember_peft::{
    get_peft_model, LoraConfig, PeftConfig, PrefixTuningConfig, PromptTuningConfig, TargetModules,
    TaskType,
};

type B = Autodiff<Flex>;

/// `VmHWM` (peak resident set) of this process in MiB, from `/proc/self/status`.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Three prompt- or prefix-tuning steps of SmolLM2 at batch 8, seq 256; the row's name, or
/// `None` when SmolLM2 is absent.
fn smollm2_prompt_learning(prefix: bool) -> Option<&'static str> {
    let dir = ember_testkit::smollm2()?;
    let device = Default::default();
    let config: PeftConfig = if prefix {
        let mut config = PrefixTuningConfig::new(20);
        config.prompt.task_type = Some(TaskType::CausalLm);
        config.into()
    } else {
        let mut config = PromptTuningConfig::new(20);
        config.prompt.task_type = Some(TaskType::CausalLm);
        config.into()
    };
    let base = LlamaForCausalLM::<B>::from_pretrained(&dir, &device).expect("SmolLM2 loads");
    let mut model = get_peft_model(base, config).expect("the adapter fits SmolLM2");
    let mut optimizer = AdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(0.01)
        .init::<B, _>();
    let (batch, seq) = (8, 256);
    // The ids of the bench rows: `(100 + 37·(row + 1)·t + 11·t²) mod 40,000`.
    let ids: Vec<i64> = (0..batch)
        .flat_map(|r| {
            (0..seq).map(move |t| ((100 + 37 * (r + 1) * t + 11 * t * t) % 40_000) as i64)
        })
        .collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [batch, seq]), &device);
    for _ in 0..3 {
        let loss = model
            .base_model
            .forward(CausalLmInput::new(ids.clone()).with_labels(ids.clone()))
            .expect("the inputs match the model")
            .loss
            .expect("labels were given");
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(2e-4, model, grads);
    }
    let prompt = model.base_model.model.embed_tokens.active_prompt();
    let _ = prompt
        .expect("the adapter is active")
        .embedding
        .val()
        .into_data();
    Some(if prefix {
        "memory/prefix_smollm2_train_step_b8_s256"
    } else {
        "memory/prompt_smollm2_train_step_b8_s256"
    })
}

fn print_peak(name: &str) {
    match peak_rss_mib() {
        Some(mib) => println!("{{\"bench\": \"{name}\", \"peak_rss_mib\": {mib:.1}}}"),
        None => eprintln!("SKIP peak memory: /proc/self/status has no VmHWM on this system"),
    }
}

fn main() {
    // As the CLI and the Trainer run.
    ember_kernels::keep_freed_memory();
    for (flag, prefix) in [("--prompt-tuning", false), ("--prefix-tuning", true)] {
        if std::env::args().any(|a| a == flag) {
            if let Some(name) = smollm2_prompt_learning(prefix) {
                print_peak(name);
            }
            return;
        }
    }
    let device = Default::default();
    let config = BertConfig {
        vocab_size: 21128,
        hidden_size: 768,
        num_hidden_layers: 3,
        num_attention_heads: 12,
        intermediate_size: 3072,
        ..BertConfig::default()
    };
    let ids = Tensor::<B, 2>::random([32, 128], Distribution::Uniform(0.0, 21128.0), &device).int();
    let input = EncoderInput::new(ids).with_attention_mask(Tensor::ones([32, 128], &device));
    let labels = Tensor::<B, 1>::random([32], Distribution::Uniform(0.0, 2.0), &device).int();
    let step = |model: &BertForSequenceClassification<B>| {
        model
            .forward(input.clone(), Some(SequenceLabels::Classes(labels.clone())))
            .expect("the inputs match the model")
            .loss
            .expect("labels were given")
    };
    let model = BertForSequenceClassification::<B>::new(&config, &device);
    let lora = std::env::args().any(|a| a == "--lora");
    if lora {
        let lora = LoraConfig {
            r: 8,
            lora_alpha: 16.0,
            task_type: Some(TaskType::SeqCls),
            ..LoraConfig::new(TargetModules::names(["query", "value"]))
        };
        let mut model = get_peft_model(model, lora).expect("query / value exist in BERT");
        let mut optimizer = AdamWConfig::new()
            .with_epsilon(1e-8)
            .with_weight_decay(0.01)
            .init::<B, _>();
        for _ in 0..3 {
            let loss = step(&model.base_model);
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optimizer.step(2e-5, model, grads);
        }
        let _ = model.base_model.classifier.out_proj.adapters[0]
            .copy
            .as_ref()
            .expect("SEQ_CLS trains a copy of the classifier")
            .weight
            .val()
            .into_data();
    } else {
        let mut model = model;
        let mut optimizer = AdamWConfig::new()
            .with_epsilon(1e-8)
            .with_weight_decay(0.01)
            .init::<B, BertForSequenceClassification<B>>();
        for _ in 0..3 {
            let loss = step(&model);
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optimizer.step(2e-5, model, grads);
        }
        let _ = model.classifier.out_proj.base.weight.val().into_data();
    }
    let name = if lora {
        "memory/lora_rbt3_train_step_b32_s128"
    } else {
        "memory/rbt3_train_step_b32_s128"
    };
    print_peak(name);
}
