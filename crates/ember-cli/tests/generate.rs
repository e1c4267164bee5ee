//! `ember generate` on the real SmolLM2-135M-Instruct (built by `../shared/tools/make-smollm2`;
//! skipped when absent): the prompt ids and greedy ids equal HF's (fixture
//! `tests/fixtures/models/smollm2-expected.json`), the streamed text is the decoded ids, the chat
//! template wraps the prompt as Python does, and bad options are one-line errors.

mod common;

use common::ember;
use serde_json::Value;
use std::path::Path;

fn expected() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models/smollm2-expected.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn greedy_json_and_streamed_text_match_hf() {
    let Some(dir) = ember_testkit::smollm2() else {
        return;
    };
    let model = dir.to_str().unwrap();
    let want = &expected()["prompts"][0];
    let args = [
        "generate",
        "--model",
        model,
        "--max-new-tokens",
        "32",
        "--greedy",
    ];
    let (ok, out, err) = ember(
        &[&args[..], &["--json"]].concat(),
        "The three primary colours are\n",
    );
    assert!(ok, "{err}");
    let got: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(got["prompt_ids"], want["input_ids"]);
    assert_eq!(got["generated_ids"], want["greedy_32"]);
    // Streaming prints the same text as the JSON's decoded ids, then a newline.
    let (ok, streamed, err) = ember(&args, "The three primary colours are\n");
    assert!(ok, "{err}");
    assert_eq!(streamed, format!("{}\n", got["text"].as_str().unwrap()));
}

#[test]
fn chat_wraps_the_prompt_in_the_template() {
    let Some(dir) = ember_testkit::smollm2() else {
        return;
    };
    let model = dir.to_str().unwrap();
    let want = &expected()["prompts"][2];
    let (ok, out, err) = ember(
        &[
            "generate",
            "--model",
            model,
            "--chat",
            "--max-new-tokens",
            "32",
            "--json",
        ],
        "Name a fruit that is yellow.",
    );
    assert!(ok, "{err}");
    let got: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(got["prompt_ids"], want["input_ids"]);
    assert_eq!(got["generated_ids"], want["greedy_32"]);
    assert_eq!(got["finish_reason"], "eos", "{got}");
}

#[test]
fn bad_options_are_one_line_errors() {
    let Some(dir) = ember_testkit::smollm2() else {
        return;
    };
    let model = dir.to_str().unwrap();
    for (extra, wanted) in [
        (vec!["--top-p", "1.5"], "top_p"),
        (vec!["--top-p", "0"], "top_p"),
        (vec!["--max-new-tokens", "0"], "max_new_tokens"),
        (vec!["--temperature=-1"], "temperature"),
    ] {
        let (ok, out, err) = ember(
            &[&["generate", "--model", model][..], &extra].concat(),
            "hi",
        );
        assert!(!ok && out.is_empty(), "{extra:?}: {out}");
        assert!(
            err.starts_with("error:") && err.contains(wanted),
            "{extra:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    let (ok, _, err) = ember(&["generate", "--model", "/nonexistent"], "hi");
    assert!(!ok && err.contains("/nonexistent"), "{err}");
}

/// `--dtype bfloat16`: the weights in two bytes; greedy ids equal PyTorch's bf16 model's on a
/// prompt where PyTorch's bf16 and float32 runs agree (`tests/fixtures/half/smollm2-half.json`).
#[test]
fn dtype_bfloat16_generates_pytorchs_bf16_ids() {
    let Some(dir) = ember_testkit::smollm2() else {
        return;
    };
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/half/smollm2-half.json");
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let want = &fixture["prompts"][1];
    let (ok, out, err) = ember(
        &[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--chat",
            "--max-new-tokens",
            "24",
            "--dtype",
            "bfloat16",
            "--json",
        ],
        want["text"].as_str().unwrap(),
    );
    assert!(ok, "{err}");
    let got: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(got["prompt_ids"], want["ids"]);
    assert_eq!(got["generated_ids"], want["bfloat16.sdpa"]);
    let (ok, _, err) = ember(
        &[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--dtype",
            "float8",
        ],
        "hi",
    );
    assert!(!ok && err.contains("float8"), "{err}");
}
