//! `ember generate --num-beams` on the real SmolLM2-135M-Instruct (built by
//! `../shared/tools/make-smollm2`; skipped when absent): the returned sequences equal HF beam
//! search's (fixture `tests/fixtures/generation/expected.json`, case `beam4_return2_ngram3`),
//! the plain output prints one line per sequence, and bad beam settings are one-line errors.

mod common;

use common::ember;
use serde_json::Value;
use std::path::Path;

fn hf_case(name: &str) -> Value {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/generation/expected.json");
    let all: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    all["generate"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["model"] == "smollm2" && c["name"] == name)
        .unwrap_or_else(|| panic!("no smollm2 case {name}: rerun make_fixtures.py"))
        .clone()
}

#[test]
fn num_beams_returns_hfs_beams() {
    let Some(dir) = ember_testkit::smollm2() else {
        return;
    };
    let case = hf_case("beam4_return2_ngram3");
    let args = [
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--max-new-tokens",
        "16",
        "--num-beams",
        "4",
        "--num-return-sequences",
        "2",
        "--no-repeat-ngram-size",
        "3",
    ];
    let (ok, out, err) = ember(
        &[&args[..], &["--json"]].concat(),
        "The three primary colours are\n",
    );
    assert!(ok, "{err}");
    let got: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(got["prompt_ids"], case["input_ids"][0]);
    let sequences = got["sequences"].as_array().unwrap();
    assert_eq!(sequences.len(), 2);
    for (i, seq) in sequences.iter().enumerate() {
        // HF's rows are padded after EOS (id 2); Ember's end at it.
        let want: Vec<u64> = case["new"][i]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        let end = want
            .iter()
            .position(|&t| t == 2)
            .map_or(want.len(), |p| p + 1);
        assert_eq!(
            seq["generated_ids"],
            Value::from(want[..end].to_vec()),
            "row {i}"
        );
        let score = seq["score"].as_f64().unwrap();
        let hf = case["sequences_scores"][i].as_f64().unwrap();
        assert!(
            (score - hf).abs() < 1e-3 * hf.abs().max(1.0),
            "{score} vs {hf}"
        );
    }
    assert_eq!(got["generated_ids"], sequences[0]["generated_ids"]);
    // Without --json: one line of text per sequence, best first.
    let (ok, plain, err) = ember(&args, "The three primary colours are\n");
    assert!(ok, "{err}");
    let lines: Vec<&str> = plain.lines().collect();
    assert_eq!(lines.len(), 2, "{plain}");
    assert_eq!(lines[0], sequences[0]["text"].as_str().unwrap());
}

#[test]
fn bad_beam_options_are_one_line_errors() {
    let Some(dir) = ember_testkit::smollm2() else {
        return;
    };
    let model = dir.to_str().unwrap();
    for (extra, wanted) in [
        (
            vec!["--num-beams", "2", "--num-return-sequences", "3"],
            "`num_return_sequences` (3) has to be smaller or equal to `num_beams` (2)",
        ),
        (vec!["--typical-p", "0"], "typical_p"),
        (vec!["--epsilon-cutoff", "1"], "epsilon_cutoff"),
        (vec!["--early-stopping", "maybe"], "maybe"),
        (vec!["--bad-words-ids", "3,x"], "`x` is not a token id"),
        (vec!["--bad-words-ids", "99999999"], "99999999"),
    ] {
        let (ok, out, err) = ember(
            &[&["generate", "--model", model][..], &extra].concat(),
            "hi",
        );
        assert!(!ok && out.is_empty(), "{extra:?}: {out}");
        assert!(
            err.starts_with("error") && err.contains(wanted),
            "{extra:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}
