//! `generate` against HF `generate` (greedy ids of SmolLM2-135M-Instruct, one prompt at a time
//! and as a left-padded batch; fixture from `tests/fixtures/models/make_llama_fixtures.py`), the
//! cache against recomputing the whole sequence, streaming, and HF's input checks.

mod common;

use common::{fixtures, B};
use ember_models::generation::{
    generate, GenerateOptions, GenerateOutput, GenerationConfig, Prompt, StopStrings, Streamer,
};
use ember_models::*;
use ember_testkit::smollm2;

fn tiny() -> LlamaForCausalLM<B> {
    LlamaForCausalLM::from_pretrained(fixtures().join("tiny-llama-gqa"), &Default::default())
        .unwrap()
}

fn run(
    model: &impl CausalLm<B>,
    prompt: &Prompt,
    config: &GenerationConfig,
    seed: u64,
) -> GenerateOutput {
    let options = GenerateOptions {
        seed: Some(seed),
        ..Default::default()
    };
    generate(model, prompt, config, options, &Default::default()).unwrap()
}

#[test]
fn smollm2_greedy_ids_equal_hf_generate() {
    let Some(dir) = smollm2() else { return };
    let model = LlamaForCausalLM::<B>::from_pretrained(&dir, &Default::default()).unwrap();
    let mut config = GenerationConfig::from_pretrained(&dir).unwrap();
    config.max_new_tokens = Some(32);
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("smollm2-expected.json")).unwrap(),
    )
    .unwrap();
    for (i, p) in expected["prompts"].as_array().unwrap().iter().enumerate() {
        let ids: Vec<u32> = serde_json::from_value(p["input_ids"].clone()).unwrap();
        let want: Vec<u32> = serde_json::from_value(p["greedy_32"].clone()).unwrap();
        let got = run(&model, &Prompt::single(ids), &config, 0);
        assert_eq!(got.new_tokens[0], want, "prompt {i}");
    }
    let b = &expected["batch"];
    let prompt = Prompt {
        input_ids: serde_json::from_value(b["input_ids"].clone()).unwrap(),
        attention_mask: serde_json::from_value(b["attention_mask"].clone()).unwrap(),
    };
    let want: Vec<Vec<u32>> = serde_json::from_value(b["greedy_32"].clone()).unwrap();
    let got = run(&model, &prompt, &config, 0);
    let len = prompt.input_ids[0].len();
    let got_new: Vec<Vec<u32>> = got.sequences.iter().map(|s| s[len..].to_vec()).collect();
    assert_eq!(got_new, want, "left-padded batch");
}

#[test]
fn the_cache_gives_what_recomputing_gives() {
    let model = tiny();
    let prompt = Prompt::left_padded(vec![vec![5, 9, 14, 3], vec![7, 8]], 0);
    for do_sample in [false, true] {
        let mut config = GenerationConfig {
            max_new_tokens: Some(12),
            do_sample,
            top_k: 20,
            top_p: 0.9,
            temperature: 0.8,
            repetition_penalty: 1.3,
            ..Default::default()
        };
        let cached = run(&model, &prompt, &config, 11);
        config.use_cache = false;
        let recomputed = run(&model, &prompt, &config, 11);
        assert_eq!(cached, recomputed, "do_sample {do_sample}");
        assert_eq!(cached.new_tokens[0].len(), 12);
    }
}

#[test]
fn smollm2_cache_equals_recompute() {
    let Some(dir) = smollm2() else { return };
    let model = LlamaForCausalLM::<B>::from_pretrained(&dir, &Default::default()).unwrap();
    let prompt = Prompt::single(vec![504, 1470, 3658, 314]);
    let mut config = GenerationConfig::greedy(12);
    let cached = run(&model, &prompt, &config, 0);
    config.use_cache = false;
    assert_eq!(cached, run(&model, &prompt, &config, 0));
}

#[derive(Default)]
struct Collect {
    steps: Vec<(Vec<usize>, Vec<u32>)>,
    ended: bool,
}

impl Streamer for Collect {
    fn put(&mut self, rows: &[usize], tokens: &[u32]) {
        self.steps.push((rows.to_vec(), tokens.to_vec()));
    }
    fn end(&mut self) {
        self.ended = true;
    }
}

#[test]
fn streaming_eos_and_stop_conditions() {
    let model = tiny();
    let prompt = Prompt::single(vec![5, 9, 14]);
    let free = run(&model, &prompt, &GenerationConfig::greedy(10), 0).new_tokens[0].clone();
    // The streamer sees every token in order.
    let mut streamer = Collect::default();
    let options = GenerateOptions {
        streamer: Some(&mut streamer),
        ..Default::default()
    };
    let out = generate(
        &model,
        &prompt,
        &GenerationConfig::greedy(10),
        options,
        &Default::default(),
    )
    .unwrap();
    let streamed: Vec<u32> = streamer.steps.iter().map(|(_, t)| t[0]).collect();
    assert_eq!(streamed, out.new_tokens[0]);
    assert!(streamer.ended);
    // An EOS id ends the row on that token.
    let config = GenerationConfig {
        eos_token_id: Some(free[3].into()),
        ..GenerationConfig::greedy(10)
    };
    let stop_at = free.iter().position(|&t| t == free[3]).unwrap();
    assert_eq!(
        run(&model, &prompt, &config, 0).new_tokens[0],
        free[..=stop_at]
    );
    // A stop criterion (here: a "string" made of ids) ends it too.
    let target = format!("<{}>", free[2]);
    let mut stop = StopStrings::new(vec![target], |ids: &[u32]| {
        ids.iter().map(|t| format!("<{t}>")).collect::<String>()
    });
    let options = GenerateOptions {
        stopping: vec![&mut stop],
        ..Default::default()
    };
    let out = generate(
        &model,
        &prompt,
        &GenerationConfig::greedy(10),
        options,
        &Default::default(),
    )
    .unwrap();
    let first = free.iter().position(|&t| t == free[2]).unwrap();
    assert_eq!(out.new_tokens[0], free[..=first]);
}

#[test]
fn bad_generation_input_is_a_typed_error() {
    let model = tiny();
    let device = Default::default();
    let prompt = Prompt::single(vec![5, 9]);
    for (config, wanted) in [
        (GenerationConfig::greedy(0), "max_new_tokens"),
        (
            GenerationConfig {
                do_sample: true,
                top_p: 0.0,
                ..GenerationConfig::greedy(4)
            },
            "top_p",
        ),
        (
            GenerationConfig {
                top_p: 1.01,
                ..GenerationConfig::greedy(4)
            },
            "top_p",
        ),
        (
            GenerationConfig {
                max_length: 2,
                ..Default::default()
            },
            "max_length",
        ),
    ] {
        let err = generate(
            &model,
            &prompt,
            &config,
            GenerateOptions::default(),
            &device,
        )
        .unwrap_err();
        assert!(matches!(err, ModelError::Input(_)), "{err}");
        assert!(err.to_string().contains(wanted), "{wanted}: {err}");
    }
    // An empty prompt starts from BOS, as HF does; without a BOS id it is an error.
    let empty = Prompt::single(vec![]);
    let config = GenerationConfig {
        bos_token_id: Some(1),
        ..GenerationConfig::greedy(3)
    };
    let out = generate(&model, &empty, &config, GenerateOptions::default(), &device).unwrap();
    assert_eq!(out.sequences[0][0], 1);
    let err = generate(
        &model,
        &empty,
        &GenerationConfig::greedy(3),
        GenerateOptions::default(),
        &device,
    )
    .unwrap_err();
    assert!(err.to_string().contains("bos_token_id"), "{err}");
    // A token id beyond the vocabulary.
    let err = generate(
        &model,
        &Prompt::single(vec![500]),
        &GenerationConfig::greedy(3),
        GenerateOptions::default(),
        &device,
    )
    .unwrap_err();
    assert!(err.to_string().contains("500"), "{err}");
}
