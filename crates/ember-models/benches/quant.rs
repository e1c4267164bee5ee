//! Quantized generation with the real SmolLM2-135M-Instruct (built by
//! `../shared/tools/make-smollm2`; skipped, saying so, when absent): greedy generation of 64 new
//! tokens after a 16-token prompt at batch 1, with the cache, of the model loaded in f32, with
//! `BitsAndBytesConfig::new_4bit(Nf4, double quant, "float32")` and with `new_8bit()` (LLM.int8),
//! plus the NF4 model's prefill of the prompt. `cargo xtask bench` runs
//! `xtask/bench/quant_bench.py` beside it: HF `generate` with the same configs in
//! transformers + bitsandbytes on the same ids, and llama.cpp on the Q4_1 GGUF the f32 folder is
//! made from (a reference-only row).
//!
//! The f32 row is `generation/smollm2_generate_b1_p16_n64` again, here so that the quantized rows
//! have their baseline measured in the same run. Each model's `get_memory_footprint()` goes to
//! stderr (transformers' numbers for the same configs are in
//! `tests/fixtures/quant/smollm2-nf4.json`).

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ember_models::generation::{generate, GenerateOptions, GenerationConfig, Prompt};
use ember_models::{AutoModelForCausalLM, CausalLm, CausalLmInput, FromPretrainedOptions};
use ember_quant::{BitsAndBytesConfig, QuantType};

type B = Flex;

/// Large blocks on transparent huge pages, as in the `ember` binary.
#[global_allocator]
static ALLOCATOR: ember_kernels::HugePageAlloc = ember_kernels::HugePageAlloc;

const PROMPT: usize = 16;
const NEW: usize = 64;

/// `batch` prompts of 16 ids, the same as `generation.rs` and the Python scripts build: ids
/// `100 + 37·(row + 1)·t` modulo 40,000, so rows differ and no padding is needed.
fn prompts(batch: usize) -> Vec<Vec<u32>> {
    (0..batch)
        .map(|r| {
            (0..PROMPT)
                .map(|t| (100 + 37 * (r + 1) * t) as u32 % 40_000)
                .collect()
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    // As the CLI and the Trainer run: freed buffers reused by the next iteration.
    ember_kernels::keep_freed_memory();
    let Some(dir) = ember_testkit::smollm2() else {
        return;
    };
    let device = Default::default();
    // Greedy, EOS ignored, so that every run makes exactly NEW tokens.
    let config = GenerationConfig {
        eos_token_id: None,
        ..GenerationConfig::greedy(NEW)
    };
    let prompt = Prompt::left_padded(prompts(1), 0);
    let ids: Vec<i64> = prompts(1).concat().into_iter().map(i64::from).collect();
    let input = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, PROMPT]), &device);
    let mut group = c.benchmark_group("quant");
    group.sample_size(10);
    for (kind, quantization) in [
        ("f32", None),
        (
            "nf4",
            Some(BitsAndBytesConfig::new_4bit(
                QuantType::Nf4,
                true,
                "float32",
            )),
        ),
        ("int8", Some(BitsAndBytesConfig::new_8bit())),
    ] {
        let mut options = FromPretrainedOptions::default();
        if let Some(q) = quantization {
            options = options.quantization_config(q);
        }
        // One model at a time: the previous one is dropped before the next loads, so that
        // neither the resident set nor the caches carry the other variants.
        let (model, _report) =
            AutoModelForCausalLM::from_pretrained_with::<B>(&dir, &options, &device)
                .unwrap_or_else(|e| panic!("SmolLM2 loads as {kind}: {e}"));
        eprintln!(
            "quant/smollm2_{kind}: get_memory_footprint() = {} bytes",
            model.get_memory_footprint()
        );
        if kind == "nf4" {
            group.throughput(Throughput::Elements(PROMPT as u64));
            group.bench_function(format!("smollm2_nf4_prefill_b1_p{PROMPT}"), |b| {
                b.iter(|| {
                    let out = model.forward(CausalLmInput::new(input.clone())).unwrap();
                    out.logits.into_data()
                })
            });
        }
        group.throughput(Throughput::Elements(NEW as u64));
        group.bench_function(
            format!("smollm2_{kind}_generate_b1_p{PROMPT}_n{NEW}"),
            |b| {
                b.iter(|| {
                    generate(
                        &model,
                        &prompt,
                        &config,
                        GenerateOptions::default(),
                        &device,
                    )
                    .unwrap()
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
