//! `ember tokenize`: the stable interface tokenization is checked through from outside.

mod common;

use common::ember;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn gpt2_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizers/gpt2-bpe")
}

fn minilm() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/all-MiniLM-L6-v2");
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!("SKIP: {} is absent", dir.display());
        None
    }
}

#[test]
fn every_line_gives_one_json_object_in_order_empty_ones_included() {
    let Some(dir) = minilm() else { return };
    let input = "Hello world\n\nA tab\tis text here\n   \nlast line without newline";
    let (ok, out, err) = ember(&["tokenize", "--tokenizer", dir.to_str().unwrap()], input);
    assert!(ok, "{err}");
    let rows = lines(&out);
    assert_eq!(rows.len(), 5);
    assert_eq!(
        rows[0]["input_ids"],
        serde_json::json!([101, 7592, 2088, 102])
    );
    assert_eq!(
        rows[0]["tokens"],
        serde_json::json!(["[CLS]", "hello", "world", "[SEP]"])
    );
    assert_eq!(rows[0]["attention_mask"], serde_json::json!([1, 1, 1, 1]));
    assert_eq!(
        rows[1]["input_ids"],
        serde_json::json!([101, 102]),
        "an empty line"
    );
    // Without --pair a TAB is whitespace inside one text: token_type_ids stay 0.
    assert!(rows[2]["token_type_ids"]
        .as_array()
        .unwrap()
        .iter()
        .all(|v| v == 0));
    assert_eq!(rows[3]["input_ids"], serde_json::json!([101, 102]));
    assert_eq!(rows[4]["tokens"][1], "last");
}

#[test]
fn pair_splits_at_the_tab_and_max_length_truncates() {
    let Some(dir) = minilm() else { return };
    let dir = dir.to_str().unwrap();
    let (ok, out, err) = ember(
        &["tokenize", "--tokenizer", dir, "--pair"],
        "first text\tsecond text\nno tab\n",
    );
    assert!(ok, "{err}");
    let rows = lines(&out);
    assert_eq!(
        rows[0]["input_ids"],
        serde_json::json!([101, 2034, 3793, 102, 2117, 3793, 102])
    );
    assert_eq!(
        rows[0]["token_type_ids"],
        serde_json::json!([0, 0, 0, 0, 1, 1, 1])
    );
    assert_eq!(
        rows[1]["input_ids"],
        serde_json::json!([101, 2053, 21628, 102])
    );

    let long = "word ".repeat(50);
    let (ok, out, _) = ember(
        &["tokenize", "--tokenizer", dir, "--max-length", "8"],
        &long,
    );
    assert!(ok);
    let row = &lines(&out)[0];
    assert_eq!(row["input_ids"].as_array().unwrap().len(), 8);
    assert_eq!(
        row["tokens"][7], "[SEP]",
        "special tokens survive truncation"
    );
}

#[test]
fn byte_level_bpe_fixture_tokenizes_without_shared_data() {
    let (ok, out, err) = ember(
        &["tokenize", "--tokenizer", gpt2_fixture().to_str().unwrap()],
        "The room\n",
    );
    assert!(ok, "{err}");
    let row = &lines(&out)[0];
    assert_eq!(row["tokens"][0], "The");
    assert_eq!(row["tokens"][1], "Ġroom");
}

#[test]
fn errors_are_one_line_and_exit_non_zero() {
    let (ok, out, err) = ember(&["tokenize", "--tokenizer", "/no/such/dir"], "x\n");
    assert!(!ok);
    assert!(out.is_empty());
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("/no/such/dir"), "{err}");

    let (ok, _, err) = ember(&["tokenize", "--max-length", "1"], "some text\n");
    assert!(!ok);
    assert!(err.contains("max_length 1"), "{err}");
}

#[test]
fn demo_runs_offline() {
    let (ok, out, err) = ember(&["tokenize", "--demo"], "");
    assert!(ok, "{err}");
    assert!(out.contains("tokens:"), "{out}");
    assert!(out.contains("burn tensor"), "{out}");
}
