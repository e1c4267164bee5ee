//! Peak resident memory of quantized or half-precision generation: SmolLM2-135M-Instruct
//! (skipped, saying so, when absent) loaded in f32, with `--bf16` (`dtype=torch.bfloat16`),
//! `--nf4` (`BitsAndBytesConfig::new_4bit(Nf4, double quant, "float32")`) or `--int8`
//! (`new_8bit()`, LLM.int8), then 64 greedy new tokens after the 16-token prompt of the
//! `quant/smollm2_*_generate_b1_p16_n64` rows, EOS ignored. Prints one JSON line with the
//! process's peak resident set (`VmHWM` of `/proc/self/status`, Linux only), row
//! `memory/generate_{f32,bf16,nf4,int8}_smollm2_b1_p16_n64`, which `cargo xtask bench` compares
//! with `xtask/bench/memory_bench.py --generate [--bf16 | --nf4 | --int8]` (transformers +
//! bitsandbytes).
//!
//! The new ids and `get_memory_footprint()` go to stderr, so that stdout stays the one line
//! xtask parses.
//!
//! ```sh
//! cargo run --release -p ember-models --example generate_memory [-- --nf4 | --int8 | --bf16]
//! ```

use ember_models::generation::{generate, GenerateOptions, GenerationConfig, Prompt};
use ember_models::{AutoModelForCausalLM, FloatDtype, FromPretrainedOptions};
use ember_quant::{BitsAndBytesConfig, QuantType};

type B = burn::backend::Flex;

const PROMPT: usize = 16;
const NEW: usize = 64;

/// `VmHWM` (peak resident set) of this process in MiB, from `/proc/self/status`.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn main() {
    // As the CLI and the Trainer run.
    ember_kernels::keep_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (kind, quantization) = if args.iter().any(|a| a == "--nf4") {
        (
            "nf4",
            Some(BitsAndBytesConfig::new_4bit(
                QuantType::Nf4,
                true,
                "float32",
            )),
        )
    } else if args.iter().any(|a| a == "--int8") {
        ("int8", Some(BitsAndBytesConfig::new_8bit()))
    } else if args.iter().any(|a| a == "--bf16") {
        ("bf16", None)
    } else {
        ("f32", None)
    };
    let Some(dir) = ember_testkit::smollm2() else {
        return;
    };
    let mut options = FromPretrainedOptions::default();
    if let Some(q) = quantization {
        options = options.quantization_config(q);
    }
    if kind == "bf16" {
        options = options.dtype(FloatDtype::BFloat16);
    }
    let device = Default::default();
    let (model, _report) = AutoModelForCausalLM::from_pretrained_with::<B>(&dir, &options, &device)
        .unwrap_or_else(|e| panic!("SmolLM2 loads as {kind}: {e}"));
    eprintln!(
        "get_memory_footprint() = {} bytes",
        model.get_memory_footprint()
    );
    // The bench rows' prompt: ids `100 + 37·t` modulo 40,000.
    let ids: Vec<u32> = (0..PROMPT)
        .map(|t| (100 + 37 * t) as u32 % 40_000)
        .collect();
    // Greedy, EOS ignored, so that every run makes exactly NEW tokens.
    let config = GenerationConfig {
        eos_token_id: None,
        ..GenerationConfig::greedy(NEW)
    };
    let out = generate(
        &model,
        &Prompt::single(ids),
        &config,
        GenerateOptions::default(),
        &device,
    )
    .expect("SmolLM2 generates");
    eprintln!("new ids: {:?}", out.new_tokens[0]);
    let name = format!("memory/generate_{kind}_smollm2_b1_p{PROMPT}_n{NEW}");
    match peak_rss_mib() {
        Some(mib) => println!("{{\"bench\": \"{name}\", \"peak_rss_mib\": {mib:.1}}}"),
        None => eprintln!("SKIP peak memory: /proc/self/status has no VmHWM on this system"),
    }
}
