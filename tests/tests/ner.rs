//! NER label alignment against HF's `tokenize_and_align_labels` (fixture
//! `tests/fixtures/train/ner-expected.json`, made by `make_ner_fixtures.py` with transformers
//! 5.24): ids and aligned labels must be equal, on English words with sub-word splits and
//! punctuation (all-MiniLM-L6-v2) and on Chinese characters (bert-base-chinese).

use ember::datasets::Dataset;
use ember::prelude::*;
use serde_json::{json, Value};
use std::path::PathBuf;

#[test]
fn aligned_labels_equal_hf() {
    let shared = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/models");
    if !shared.is_dir() {
        eprintln!("SKIP: {} is absent", shared.display());
        return;
    }
    let fixture =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/train/ner-expected.json");
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();
    for (key, folder) in [
        ("minilm", "all-MiniLM-L6-v2"),
        ("bert_chinese", "bert-base-chinese-vocab"),
    ] {
        let case = &expected[key];
        let tokenizer = AutoTokenizer::from_pretrained(shared.join(folder)).unwrap();
        let rows: Vec<Value> = case["words"]
            .as_array()
            .unwrap()
            .iter()
            .zip(case["tags"].as_array().unwrap())
            .map(|(w, t)| json!({"tokens": w, "ner_tags": t}))
            .collect();
        let options = EncodeOptions::default()
            .truncation(Truncation::LongestFirst)
            .max_length(case["max_length"].as_u64().unwrap() as usize);
        let ds = ember::data::tokenize_and_align_labels(
            &Dataset::from_json_rows(&rows).unwrap(),
            &tokenizer,
            &options,
            4,
        )
        .unwrap();
        for (column, want) in [
            ("input_ids", &case["input_ids"]),
            ("labels", &case["labels"]),
        ] {
            let got: Vec<Value> = ds.column_values(column).unwrap();
            assert_eq!(&Value::Array(got), want, "{key}: {column}");
        }
    }
}
