//! `ember embed` against sentence-transformers' pooling computed with Python `transformers` on
//! the real all-MiniLM-L6-v2 (fixture `tests/fixtures/models/minilm-embed.json`, made by
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
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/minilm-embed.json");
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
    for (got, want) in lines.iter().zip(rows) {
        for field in ["mean_normalized", "cls"] {
            let (g, w) = (floats(&got[field]), floats(&want[field]));
            assert_eq!(g.len(), 384);
            let rms = (w.iter().map(|x| x * x).sum::<f32>() / w.len() as f32).sqrt();
            for (a, b) in g.iter().zip(&w) {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs().max(rms),
                    "{field} of {:?}: ember {a} python {b}",
                    want["text"]
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
