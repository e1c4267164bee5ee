//! `ember embed` against sentence-transformers' pooling computed with Python `transformers` on
//! the real all-MiniLM-L6-v2 (fixture `tests/fixtures/models/minilm-embed-summary.json`, made by
//! `tests/fixtures/models/make_fixtures.py`).

mod common;

use common::ember;
use serde_json::Value;
use std::path::Path;

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn embed_matches_sentence_transformers_pooling() {
    let model =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/all-MiniLM-L6-v2");
    if !model.is_dir() {
        eprintln!("SKIP: {} is absent", model.display());
        return;
    }
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models/minilm-embed-summary.json");
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();
    let rows = expected["rows"].as_array().unwrap();
    let stdin: String = rows
        .iter()
        .map(|r| format!("{}\n", r["text"].as_str().unwrap()))
        .collect();
    let max_length = expected["max_length"].to_string();
    let (ok, stdout, stderr) = ember(
        &[
            "embed",
            "--model",
            model.to_str().unwrap(),
            "--max-length",
            &max_length,
        ],
        &stdin,
    );
    assert!(ok, "{stderr}");
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines.len(),
        rows.len(),
        "one line out per line in, the empty one included"
    );
    // Python's summary of each vector (every 24th value, L2 norm and sum; the real model's
    // outputs are not stored), recomputed here from Ember's vectors.
    for (got, want) in lines.iter().zip(rows) {
        for field in ["mean_normalized", "cls"] {
            let g = floats(&got[field]);
            assert_eq!(g.len(), 384);
            let w = &want[field];
            let want_norm = w["norm"].as_f64().unwrap();
            let norm = g.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            let sum = g.iter().map(|x| *x as f64).sum::<f64>();
            let text = &want["text"];
            assert!(
                (norm - want_norm).abs() <= 1e-5 * want_norm,
                "{field} norm of {text:?}"
            );
            let want_sum = w["sum"].as_f64().unwrap();
            assert!(
                (sum - want_sum).abs() <= 1e-5 * want_norm,
                "{field} sum of {text:?}"
            );
            let rms = want_norm as f32 / (384f32).sqrt();
            for (a, b) in g.iter().step_by(24).zip(floats(&w["probe"])) {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs().max(rms),
                    "{field} of {text:?}: ember {a} python {b}"
                );
            }
        }
        let norm: f32 = floats(&got["mean_normalized"])
            .iter()
            .map(|x| x * x)
            .sum::<f32>()
            .sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
    }
}

#[test]
fn embed_reports_a_bad_model_folder() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, stdout, stderr) = ember(
        &["embed", "--model", dir.path().to_str().unwrap()],
        "hello\n",
    );
    assert!(!ok && stdout.is_empty());
    assert!(
        stderr.starts_with("error:") && stderr.contains(dir.path().to_str().unwrap()),
        "{stderr}"
    );
}
