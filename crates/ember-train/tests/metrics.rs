//! Parity with scikit-learn 1.9.1 and seqeval 1.2.2: every case that
//! `tests/fixtures/train/make_metrics_fixtures.py` recorded is recomputed here and must agree to
//! 1e-12 (the scores are ratios of integers, so only float rounding may differ), and where the
//! reference raises, Ember must return `TrainError::Metric`.

use std::path::Path;

use ember_train::metrics::{
    accuracy, argmax_rows, classification_metrics, get_entities_with_affix, precision_recall_f1,
    seqeval, Average, TagAffix,
};
use ember_train::TrainError;
use serde_json::Value;

const TOLERANCE: f64 = 1e-12;

fn fixture() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/train/metrics-expected.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()));
    serde_json::from_str(&text).expect("metrics-expected.json is JSON")
}

fn cases<'a>(fixture: &'a Value, section: &str) -> &'a [Value] {
    fixture[section].as_array().expect("a list of cases")
}

fn classes(value: &Value) -> Vec<usize> {
    let list = value.as_array().expect("a list of classes");
    list.iter()
        .map(|v| v.as_u64().expect("a class") as usize)
        .collect()
}

fn sentences(value: &Value) -> Vec<Vec<String>> {
    let list = value.as_array().expect("a list of sentences");
    list.iter().map(strings).collect()
}

fn strings(value: &Value) -> Vec<String> {
    let list = value.as_array().expect("a list of tags");
    list.iter()
        .map(|v| v.as_str().expect("a tag").to_string())
        .collect()
}

fn number(value: &Value) -> f64 {
    value
        .as_f64()
        .unwrap_or_else(|| panic!("a number, not {value}"))
}

fn raises(value: &Value) -> bool {
    value.get("raises").is_some()
}

fn assert_close(case: &str, what: &str, ours: f64, expected: f64) {
    assert!(
        (ours - expected).abs() <= TOLERANCE,
        "{case}: {what} is {ours}, the reference says {expected}"
    );
}

fn assert_metric_error<T: std::fmt::Debug>(case: &str, what: &str, result: ember_train::Result<T>) {
    match result {
        Err(TrainError::Metric(_)) => {}
        other => panic!("{case}: {what} should be TrainError::Metric, got {other:?}"),
    }
}

#[test]
fn classification_matches_sklearn() {
    let fixture = fixture();
    let cases = cases(&fixture, "classification");
    assert!(
        cases.len() >= 12,
        "only {} classification cases",
        cases.len()
    );
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let labels = classes(&case["labels"]);
        let predictions = classes(&case["predictions"]);
        let ours = accuracy(&predictions, &labels).unwrap();
        assert_close(name, "accuracy", ours, number(&case["accuracy"]));
        let averages = [
            ("binary", Average::Binary),
            ("macro", Average::Macro),
            ("micro", Average::Micro),
            ("weighted", Average::Weighted),
        ];
        for (key, average) in averages {
            let expected = &case[key];
            let ours = precision_recall_f1(&predictions, &labels, average);
            if raises(expected) {
                assert_metric_error(name, key, ours);
                continue;
            }
            let ours = ours.unwrap_or_else(|error| panic!("{name}: {key}: {error}"));
            assert_close(
                name,
                &format!("{key} precision"),
                ours.precision,
                number(&expected["precision"]),
            );
            assert_close(
                name,
                &format!("{key} recall"),
                ours.recall,
                number(&expected["recall"]),
            );
            assert_close(name, &format!("{key} f1"), ours.f1, number(&expected["f1"]));
        }
    }
}

#[test]
fn classification_metrics_is_binary_for_zero_one_and_macro_otherwise() {
    let fixture = fixture();
    for case in cases(&fixture, "classification") {
        let name = case["name"].as_str().unwrap();
        let labels = classes(&case["labels"]);
        let predictions = classes(&case["predictions"]);
        let is_zero_one = labels.iter().chain(&predictions).all(|&c| c <= 1);
        let expected = &case[if is_zero_one { "binary" } else { "macro" }];
        let ours = classification_metrics(&predictions, &labels).unwrap();
        let keys: Vec<&str> = ours.keys().map(String::as_str).collect();
        assert_eq!(keys, ["accuracy", "f1", "precision", "recall"], "{name}");
        assert_close(
            name,
            "accuracy",
            ours["accuracy"],
            number(&case["accuracy"]),
        );
        for key in ["precision", "recall", "f1"] {
            assert_close(name, key, ours[key], number(&expected[key]));
        }
    }
}

#[test]
fn get_entities_matches_seqeval() {
    let fixture = fixture();
    let cases = cases(&fixture, "entities");
    assert!(!cases.is_empty());
    for case in cases {
        let tags = strings(&case["tags"]);
        let affix = if case["suffix"].as_bool().unwrap() {
            TagAffix::Suffix
        } else {
            TagAffix::Prefix
        };
        let expected: Vec<(String, usize, usize)> = case["entities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let (first, last) = (e[1].as_u64().unwrap(), e[2].as_u64().unwrap());
                (
                    e[0].as_str().unwrap().to_string(),
                    first as usize,
                    last as usize,
                )
            })
            .collect();
        assert_eq!(
            get_entities_with_affix(&tags, affix),
            expected,
            "{tags:?} {affix:?}"
        );
    }
}

#[test]
fn seqeval_matches_seqeval() {
    let fixture = fixture();
    let cases = cases(&fixture, "seqeval");
    assert!(cases.len() >= 10, "only {} seqeval cases", cases.len());
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let labels = sentences(&case["labels"]);
        let predictions = sentences(&case["predictions"]);
        let ours = seqeval(&predictions, &labels);
        // Ember reports all scores at once, so it refuses input on which any of them is undefined.
        if raises(&case["accuracy"]) || raises(&case["precision"]) {
            assert_metric_error(name, "seqeval", ours);
            continue;
        }
        let ours = ours.unwrap_or_else(|error| panic!("{name}: {error}"));
        for (key, value) in [
            ("precision", ours.precision),
            ("recall", ours.recall),
            ("f1", ours.f1),
            ("accuracy", ours.accuracy),
        ] {
            assert_close(name, key, value, number(&case[key]));
        }
        let expected = case["per_type"].as_object().unwrap();
        let types: Vec<&String> = ours.per_type.keys().collect();
        assert_eq!(
            types,
            expected.keys().collect::<Vec<_>>(),
            "{name}: entity types"
        );
        for (entity_type, row) in expected {
            let scores = &ours.per_type[entity_type];
            let what = |key: &str| format!("{entity_type} {key}");
            assert_close(
                name,
                &what("precision"),
                scores.precision,
                number(&row["precision"]),
            );
            assert_close(name, &what("recall"), scores.recall, number(&row["recall"]));
            assert_close(name, &what("f1"), scores.f1, number(&row["f1"]));
            assert_eq!(
                scores.support as u64,
                row["support"].as_u64().unwrap(),
                "{name}: {entity_type} support"
            );
        }
    }
}

#[test]
fn mismatched_lengths_are_metric_errors() {
    assert_metric_error("accuracy", "lengths", accuracy(&[0, 1], &[0]));
    assert_metric_error(
        "prf",
        "lengths",
        precision_recall_f1(&[0], &[0, 1], Average::Macro),
    );
    assert_metric_error(
        "classification_metrics",
        "lengths",
        classification_metrics(&[1], &[]),
    );
    let sentence = |text: &str| {
        text.split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let predictions = [sentence("O B-PER"), sentence("O")];
    let labels = [sentence("O B-PER"), sentence("O O")];
    match seqeval(&predictions, &labels) {
        Err(TrainError::Metric(message)) => assert!(message.contains("sentence 1"), "{message}"),
        other => panic!("expected a metric error naming sentence 1, got {other:?}"),
    }
    assert_metric_error(
        "seqeval",
        "sentence count",
        seqeval(&predictions[..1], &labels),
    );
}

#[test]
fn empty_and_invalid_input_are_metric_errors() {
    assert_metric_error("accuracy", "empty", accuracy(&[], &[]));
    assert_metric_error(
        "prf",
        "empty",
        precision_recall_f1(&[], &[], Average::Micro),
    );
    assert_metric_error(
        "prf",
        "three classes",
        precision_recall_f1(&[0, 1, 2], &[0, 1, 1], Average::Binary),
    );
    let not_iob = vec![vec!["O".to_string(), "PER".to_string()]];
    let labels = vec![vec!["O".to_string(), "B-PER".to_string()]];
    assert_metric_error("seqeval", "not IOB", seqeval(&not_iob, &labels));
    assert_metric_error("seqeval", "not IOB label", seqeval(&labels, &not_iob));
}

#[test]
fn argmax_rows_is_numpy_argmax() {
    let logits = [0.1, 0.7, 0.2, 2.0, 2.0, -1.0, -3.0, -2.0, -2.5];
    assert_eq!(argmax_rows(&logits, 3), [1, 0, 1]);
    assert_eq!(argmax_rows(&[], 4), Vec::<usize>::new());
}
