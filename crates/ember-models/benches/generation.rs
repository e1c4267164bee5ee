//! Generation with the real SmolLM2-135M-Instruct (built by `../shared/tools/make-smollm2`;
//! skipped, saying so, when absent): prefill of a 16-token prompt, and greedy generation of 64
//! new tokens after it, at batch 1 and 8, with the cache. `cargo xtask bench` runs
//! `xtask/bench/generation_bench.py` beside it: HF `generate` on the same ids.
//!
//! `bandwidth_bound_b1` reads as many bytes as the model's f32 weights (what one decoding step
//! at batch 1 must read at least), on every core: its rate in tokens/s is the machine's
//! memory-bandwidth bound for batch-1 decoding.
//!
//! `smollm2_bf16_weights_generate_b1_p16_n64` rounds the weights to bf16 first (kept in f32
//! tensors): a checkpoint published in bf16, as SmolLM2's own is, loaded in f32. The kernels then
//! decode from bf16 copies of the weights (`ember_kernels::linear`), whose bound is
//! `bandwidth_bound_bf16_b1`, half the bytes.
//!
//! `smollm2_bfloat16_generate_b1_p16_n64` is a bfloat16 model (`dtype=torch.bfloat16`): its
//! weights are bfloat16 tensors, read in place by the decoding products; its bound is
//! `bandwidth_bound_bf16_b1` too. The Python row beside it is PyTorch's own bf16 model.

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use burn::backend::Flex;
use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{DType, Int, Tensor, TensorData};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ember_models::generation::{generate, GenerateOptions, GenerationConfig, Prompt};
use ember_models::{CausalLmInput, LlamaForCausalLM};

type B = Flex;

/// Large blocks on transparent huge pages, as in the `ember` binary.
#[global_allocator]
static ALLOCATOR: ember_kernels::HugePageAlloc = ember_kernels::HugePageAlloc;

const PROMPT: usize = 16;
const NEW: usize = 64;

/// `batch` prompts of 16 ids, the same as the Python script builds: ids `100 + 37·(row + 1)·t`
/// modulo 40,000, so rows differ and no padding is needed.
fn prompts(batch: usize) -> Vec<Vec<u32>> {
    (0..batch)
        .map(|r| {
            (0..PROMPT)
                .map(|t| (100 + 37 * (r + 1) * t) as u32 % 40_000)
                .collect()
        })
        .collect()
}

/// A sum with 16 independent accumulators, so that it vectorises and runs at the speed of
/// memory rather than of one add's latency.
fn sum_lanes(values: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let chunks = values.chunks_exact(16);
    let rest: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *lane += v;
        }
    }
    lanes.iter().sum::<f32>() + rest
}

/// Rounds every float parameter to the nearest bf16 value (ties to even), keeping f32 tensors
/// in their memory order (a causal LM's linear weights stay HF's `[out, in]`, as a bf16
/// checkpoint loaded in f32 has them; burn's `cast` would write `[in, out]`).
struct RoundToBf16;

impl ModuleMapper<B> for RoundToBf16 {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let rounded = ember_kernels::float32(ember_kernels::to_half(tensor, DType::BF16));
        Param::from_mapped_value(id, rounded, mapper)
    }
}

/// Reads `values` once on every core; the time is what reading that many bytes costs.
fn read_on_every_core(values: &[f32]) -> f32 {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = values.len().div_ceil(threads);
    std::thread::scope(|s| {
        let parts: Vec<_> = values
            .chunks(chunk)
            .map(|part| s.spawn(move || sum_lanes(part)))
            .collect();
        parts.into_iter().map(|p| p.join().unwrap()).sum::<f32>()
    })
}

fn bench(c: &mut Criterion) {
    // As the CLI and the Trainer run: freed buffers reused by the next iteration.
    ember_kernels::keep_freed_memory();
    let Some(dir) = ember_testkit::smollm2() else {
        return;
    };
    let device = Default::default();
    let model = LlamaForCausalLM::<B>::from_pretrained(&dir, &device).unwrap();
    let weight_values: usize = model
        .state_dict()
        .unwrap()
        .values()
        .map(|(_, v)| v.len())
        .sum();
    let mut group = c.benchmark_group("generation");
    group.sample_size(10);
    for batch in [1, 8] {
        let rows = prompts(batch);
        let ids: Vec<i64> = rows.iter().flatten().map(|&t| t as i64).collect();
        let input = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [batch, PROMPT]), &device);
        group.throughput(Throughput::Elements((batch * PROMPT) as u64));
        group.bench_function(format!("smollm2_prefill_b{batch}_s{PROMPT}"), |b| {
            b.iter(|| {
                let out = model.forward(CausalLmInput::new(input.clone())).unwrap();
                out.logits.into_data()
            })
        });
        // Greedy, EOS ignored, so that every run makes exactly NEW tokens.
        let config = GenerationConfig {
            eos_token_id: None,
            ..GenerationConfig::greedy(NEW)
        };
        let prompt = Prompt::left_padded(rows, 0);
        group.throughput(Throughput::Elements((batch * NEW) as u64));
        group.bench_function(format!("smollm2_generate_b{batch}_p{PROMPT}_n{NEW}"), |b| {
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
        });
    }
    // The same model with bf16 values, decoding at batch 1.
    let rounded = model.map(&mut RoundToBf16);
    let config = GenerationConfig {
        eos_token_id: None,
        ..GenerationConfig::greedy(NEW)
    };
    let prompt = Prompt::left_padded(prompts(1), 0);
    group.throughput(Throughput::Elements(NEW as u64));
    group.bench_function(
        format!("smollm2_bf16_weights_generate_b1_p{PROMPT}_n{NEW}"),
        |b| {
            b.iter(|| {
                generate(
                    &rounded,
                    &prompt,
                    &config,
                    GenerateOptions::default(),
                    &device,
                )
                .unwrap()
            })
        },
    );
    // A bfloat16 model (`dtype=torch.bfloat16`; converting the rounded model is exact): the
    // weights in two bytes, computed in f32.
    let bfloat16 = rounded.clone().bfloat16().unwrap();
    group.bench_function(
        format!("smollm2_bfloat16_generate_b1_p{PROMPT}_n{NEW}"),
        |b| {
            b.iter(|| {
                generate(
                    &bfloat16,
                    &prompt,
                    &config,
                    GenerateOptions::default(),
                    &device,
                )
                .unwrap()
            })
        },
    );
    // The bandwidth bounds: read the weights' bytes once per "token", on every core, in f32
    // and in bf16 (half as many bytes as f32 values).
    let weights = vec![1.0f32; weight_values];
    group.throughput(Throughput::Elements(1));
    group.bench_function("bandwidth_bound_b1", |b| {
        b.iter(|| read_on_every_core(&weights))
    });
    let half = &weights[..weight_values.div_ceil(2)];
    group.bench_function("bandwidth_bound_bf16_b1", |b| {
        b.iter(|| read_on_every_core(half))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
