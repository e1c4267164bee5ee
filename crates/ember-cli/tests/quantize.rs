//! `ember quantize` and the quantization flags: the tiny Llama that transformers + bitsandbytes
//! saved in NF4, FP4 and LLM.int8 (`tests/fixtures/quant/make_checkpoint_fixtures.py`) is
//! rebuilt byte for byte from its float32 folder, and bad flags are one-line errors.

mod common;

use common::ember;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/quant")
}

#[test]
fn quantize_writes_transformers_files() {
    let base = fixtures().join("tiny-llama");
    let cases: [(&str, &[&str]); 3] = [
        (
            "nf4",
            &[
                "--load-in-4bit",
                "--bnb-4bit-quant-type",
                "nf4",
                "--bnb-4bit-use-double-quant",
            ],
        ),
        ("fp4", &["--load-in-4bit"]),
        ("int8", &["--load-in-8bit"]),
    ];
    for (name, flags) in cases {
        let out = tempfile::tempdir().unwrap();
        let args = [
            &[
                "quantize",
                "--model",
                base.to_str().unwrap(),
                "--output-dir",
                out.path().to_str().unwrap(),
            ][..],
            flags,
        ]
        .concat();
        let (ok, _, err) = ember(&args, "");
        assert!(ok, "{name}: {err}");
        assert!(err.contains("less than"), "{name}: {err}");
        let ours = std::fs::read(out.path().join("model.safetensors")).unwrap();
        let theirs =
            std::fs::read(fixtures().join(format!("tiny-llama-{name}/model.safetensors"))).unwrap();
        assert!(
            ours == theirs,
            "{name}: model.safetensors differs from transformers'"
        );
        assert!(out.path().join("generation_config.json").is_file());
    }
}

#[test]
fn quantize_needs_a_format() {
    let out = tempfile::tempdir().unwrap();
    let base = fixtures().join("tiny-llama");
    let (ok, _, err) = ember(
        &[
            "quantize",
            "--model",
            base.to_str().unwrap(),
            "--output-dir",
            out.path().to_str().unwrap(),
        ],
        "",
    );
    assert!(!ok);
    assert!(err.contains("--load-in-8bit or --load-in-4bit"), "{err}");
    let (ok, _, err) = ember(
        &[
            "quantize",
            "--model",
            base.to_str().unwrap(),
            "--output-dir",
            out.path().to_str().unwrap(),
            "--bnb-4bit-quant-type",
            "nf4",
        ],
        "",
    );
    assert!(!ok);
    assert!(err.contains("--load-in-4bit"), "{err}");
}
