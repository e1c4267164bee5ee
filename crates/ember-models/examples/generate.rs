//! Greedy generation with any causal LM folder, tokens printed as ids while they are produced.
//!
//! ```sh
//! ../shared/tools/make-smollm2            # prints the folder it builds
//! cargo run --release -p ember-models --example generate -- ~/.cache/ember/models/SmolLM2-135M-Instruct 504 1296 3003
//! ```
//!
//! The prompt is given as token ids, since this crate does not tokenize; `ember generate` in
//! the `ember` CLI takes text.

use ember_models::generation::{generate, GenerateOptions, GenerationConfig, Prompt, Streamer};
use ember_models::AutoModelForCausalLM;

type B = burn::backend::Flex;

/// Prints each new id as soon as it is chosen.
struct PrintIds;

impl Streamer for PrintIds {
    fn put(&mut self, _rows: &[usize], tokens: &[u32]) {
        print!("{} ", tokens[0]);
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }
    fn end(&mut self) {
        println!();
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let Some(dir) = args.next() else {
        eprintln!(
            "usage: generate MODEL_DIR ID [ID ...]  (build one with ../shared/tools/make-smollm2)"
        );
        return Ok(());
    };
    let ids: Vec<u32> = args.map(|a| a.parse()).collect::<Result<_, _>>()?;
    let device = Default::default();
    let model = AutoModelForCausalLM::from_pretrained::<B>(&dir, &device)?;
    let mut config = GenerationConfig::from_pretrained(&dir)?;
    config.max_new_tokens = Some(24);
    let mut printer = PrintIds;
    let options = GenerateOptions {
        streamer: Some(&mut printer),
        ..Default::default()
    };
    let out = generate(&model, &Prompt::single(ids), &config, options, &device)?;
    eprintln!("{} new tokens", out.new_tokens[0].len());
    Ok(())
}
