//! Beam search and the logits processors against HF `generate` (transformers 5.24):
//! `tests/fixtures/generation/expected.json`, written by
//! `tests/fixtures/generation/make_fixtures.py` from the tiny Llama, GPT-2 and Bloom fixtures
//! and (cases `smollm2`, skipped without it) the real SmolLM2-135M-Instruct. Ids are compared
//! exactly, beam scores within 1e-4 relative (1e-3 on SmolLM2); the processor list value by value on fixed scores. Also:
//! the cache gives what recomputing gives under beam search, and bad settings are typed errors.

mod common;

use common::{fixtures, B};
use ember_models::generation::logits::LogitsProcessorList;
use ember_models::generation::{
    generate, GenerateOptions, GenerateOutput, GenerationConfig, Prompt, Streamer,
};
use ember_models::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn expected() -> Value {
    let path = fixtures().join("../generation/expected.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<Vec<u32>> {
    serde_json::from_value(v.clone()).unwrap()
}

/// The model's own generation config with the case's settings on top (HF's kwargs).
fn config_for(dir: &Path, settings: &Value) -> GenerationConfig {
    let mut merged = serde_json::to_value(GenerationConfig::from_pretrained(dir).unwrap()).unwrap();
    for (k, v) in settings.as_object().unwrap() {
        merged[k] = v.clone();
    }
    GenerationConfig::from_json_value(merged, Path::new("case")).unwrap()
}

fn run(model: &AnyCausalLm<B>, prompt: &Prompt, config: &GenerationConfig) -> GenerateOutput {
    generate(
        model,
        prompt,
        config,
        GenerateOptions::default(),
        &Default::default(),
    )
    .unwrap()
}

/// Runs every case of `model_name`; returns the failures (all of them, not just the first).
/// Scores are compared within `tolerance` relative: the summed log probabilities carry the
/// logits' own difference from PyTorch's (1e-4 relative on SmolLM2, far less on the tiny ones).
fn check_cases(model_name: &str, dir: PathBuf, tolerance: f32) -> (usize, Vec<String>) {
    let model = AutoModelForCausalLM::from_pretrained::<B>(&dir, &Default::default()).unwrap();
    let (mut count, mut failures) = (0, Vec::new());
    for case in expected()["generate"].as_array().unwrap() {
        if case["model"] != model_name {
            continue;
        }
        count += 1;
        let name = case["name"].as_str().unwrap();
        let prompt = Prompt {
            input_ids: ids(&case["input_ids"]),
            attention_mask: ids(&case["attention_mask"]),
        };
        let config = config_for(&dir, &case["config"]);
        let out = run(&model, &prompt, &config);
        let len = prompt.input_ids[0].len();
        let got: Vec<Vec<u32>> = out.sequences.iter().map(|s| s[len..].to_vec()).collect();
        let want = ids(&case["new"]);
        if got != want {
            failures.push(format!("{model_name} {name}: ids {got:?}, HF {want:?}"));
            continue;
        }
        match (&case["sequences_scores"], &out.sequences_scores) {
            (Value::Array(want), Some(got)) => {
                let want: Vec<f32> = want.iter().map(|v| v.as_f64().unwrap() as f32).collect();
                let close = got.len() == want.len()
                    && got
                        .iter()
                        .zip(&want)
                        .all(|(g, w)| (g - w).abs() <= tolerance * w.abs().max(1.0));
                if !close {
                    failures.push(format!("{model_name} {name}: scores {got:?}, HF {want:?}"));
                }
            }
            (Value::Null, None) => {}
            (w, g) => failures.push(format!("{model_name} {name}: scores {g:?}, HF {w}")),
        }
    }
    (count, failures)
}

#[test]
fn tiny_models_generate_hfs_ids_and_beam_scores() {
    let mut all = Vec::new();
    for name in ["tiny-llama-gqa", "tiny-gpt2", "tiny-bloom"] {
        let (count, failures) = check_cases(name, fixtures().join(name), 1e-4);
        assert!(count >= 15, "{name}: only {count} cases");
        all.extend(failures);
    }
    assert!(
        all.is_empty(),
        "{} failures:\n{}",
        all.len(),
        all.join("\n")
    );
}

#[test]
fn smollm2_beam_search_gives_hfs_ids() {
    let Some(dir) = ember_testkit::smollm2() else {
        return;
    };
    let (count, failures) = check_cases("smollm2", dir, 1e-3);
    assert_eq!(
        count, 2,
        "the fixture has no SmolLM2 cases: rerun make_fixtures.py"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_processor_list_changes_the_scores_hf_changes() {
    let fixture = expected();
    let p = &fixture["processors"];
    let prompt_len = p["prompt_len"].as_u64().unwrap() as usize;
    let input_ids = ids(&p["input_ids"]);
    let mask = ids(&p["attention_mask"]);
    let scores: Vec<Vec<f32>> = serde_json::from_value(p["scores"].clone()).unwrap();
    let vocab = scores[0].len();
    let mut failures = Vec::new();
    for case in p["cases"].as_array().unwrap() {
        let config =
            GenerationConfig::from_json_value(case["config"].clone(), Path::new("case")).unwrap();
        let list = LogitsProcessorList::new(&config, prompt_len, config.max_length, vocab).unwrap();
        for (row, changed) in case["changed"].as_array().unwrap().iter().enumerate() {
            let mut got = scores[row].clone();
            let ignore = mask[row].iter().position(|&m| m != 0).unwrap_or(0);
            list.process(&input_ids[row], ignore, &mut got);
            let changed = changed.as_object().unwrap();
            for (i, (&g, &before)) in got.iter().zip(&scores[row]).enumerate() {
                let ok = match changed.get(&i.to_string()) {
                    None => g == before,
                    Some(Value::Null) => g == f32::NEG_INFINITY,
                    Some(w) => {
                        let w = w.as_f64().unwrap() as f32;
                        (g - w).abs() <= 1e-5 * w.abs().max(1.0)
                    }
                };
                if !ok {
                    failures.push(format!(
                        "{} row {row} id {i}: {g} (was {before}), HF {:?}",
                        case["config"],
                        changed.get(&i.to_string())
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} differences:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn beam_search_with_the_cache_gives_what_recomputing_gives() {
    let dir = fixtures().join("tiny-llama-gqa");
    let model = AutoModelForCausalLM::from_pretrained::<B>(&dir, &Default::default()).unwrap();
    let prompt = Prompt::left_padded(vec![vec![5, 9, 14, 3], vec![7, 8]], 0);
    let mut config = GenerationConfig {
        num_beams: 3,
        num_return_sequences: 2,
        no_repeat_ngram_size: 2,
        eos_token_id: Some(69.into()),
        ..GenerationConfig::greedy(9)
    };
    let cached = run(&model, &prompt, &config);
    config.use_cache = false;
    assert_eq!(cached, run(&model, &prompt, &config));
    assert_eq!(cached.sequences.len(), 4);
    let scores = cached.sequences_scores.unwrap();
    assert!(
        scores[0] >= scores[1] && scores[2] >= scores[3],
        "{scores:?}"
    );
}

struct Ignore;
impl Streamer for Ignore {
    fn put(&mut self, _: &[usize], _: &[u32]) {}
}

#[test]
fn bad_beam_and_processor_settings_are_typed_errors() {
    let dir = fixtures().join("tiny-gpt2");
    let model = AutoModelForCausalLM::from_pretrained::<B>(&dir, &Default::default()).unwrap();
    let prompt = Prompt::single(vec![5, 9, 14]);
    let device = Default::default();
    let base = GenerationConfig::greedy(4);
    for (config, wanted) in [
        (
            GenerationConfig {
                num_beams: 2,
                num_return_sequences: 3,
                ..base.clone()
            },
            "`num_return_sequences` (3) has to be smaller or equal to `num_beams` (2)",
        ),
        (
            GenerationConfig {
                do_sample: true,
                typical_p: 0.0,
                ..base.clone()
            },
            "`typical_p` has to be a float in (0, 1], but is 0",
        ),
        (
            GenerationConfig {
                do_sample: true,
                epsilon_cutoff: 1.5,
                ..base.clone()
            },
            "but is 1.5",
        ),
        (
            GenerationConfig {
                bad_words_ids: Some(vec![vec![3, 500]]),
                ..base.clone()
            },
            "bad_words_ids names token 500, beyond the vocabulary of 64 ids",
        ),
        (
            GenerationConfig {
                forced_bos_token_id: Some(64),
                ..base.clone()
            },
            "forced_bos_token_id names token 64",
        ),
        (
            GenerationConfig {
                forced_eos_token_id: Some(serde_json::json!([2, 99])),
                num_beams: 2,
                ..base.clone()
            },
            "forced_eos_token_id names token 99",
        ),
        (
            GenerationConfig {
                length_penalty: f64::NAN,
                num_beams: 2,
                ..base.clone()
            },
            "`length_penalty` has to be a finite float, but is NaN",
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
    let mut streamer = Ignore;
    let options = GenerateOptions {
        streamer: Some(&mut streamer),
        ..Default::default()
    };
    let config = GenerationConfig {
        num_beams: 2,
        ..base
    };
    let err = generate(&model, &prompt, &config, options, &device).unwrap_err();
    assert!(err.to_string().contains("streamer"), "{err}");
}
