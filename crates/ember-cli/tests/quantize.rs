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

/// QLoRA from the command line: LoRA trained on the NF4 tiny Llama (`ember train
/// --load-in-4bit ... --peft`), only the adapter saved, generation with the quantized base and
/// the adapter; a quantized model without `--peft` is refused, as transformers' Trainer does.
#[test]
fn qlora_trains_an_adapter_on_the_4bit_base() {
    use common::{losses, model_folder, train, write_alpaca, write_args};
    use serde_json::{json, Value};
    let tmp = tempfile::tempdir().unwrap();
    let model = model_folder(tmp.path(), "tiny-llama-gqa", None);
    let data = tmp.path().join("rows.json");
    write_alpaca(&data, 16);
    let args = tmp.path().join("args.json");
    write_args(&args, json!({"num_train_epochs": 3}));
    let peft = tmp.path().join("lora.json");
    std::fs::write(
        &peft,
        json!({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 16,
               "target_modules": ["q_proj", "v_proj", "down_proj"]})
        .to_string(),
    )
    .unwrap();
    let out = tmp.path().join("out");
    let quant = [
        "--load-in-4bit",
        "--bnb-4bit-quant-type",
        "nf4",
        "--bnb-4bit-use-double-quant",
    ];
    let base_args = [
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--args",
        args.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
    ];
    let (lines, _) = train(&[&base_args[..], &quant, &["--peft", peft.to_str().unwrap()]].concat());
    let l = losses(&lines);
    assert!(l.len() >= 10 && l.iter().all(|x| x.is_finite()), "{l:?}");
    assert!(
        l.last().unwrap() < l.first().unwrap(),
        "the adapter learns: {l:?}"
    );
    assert!(out.join("adapter_model.safetensors").is_file());
    assert!(
        !out.join("model.safetensors").exists(),
        "only the adapter is saved"
    );

    let generate = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--max-new-tokens",
            "6",
            "--json",
        ];
        args.extend_from_slice(&quant);
        args.extend_from_slice(extra);
        let (ok, stdout, stderr) = ember(&args, "Human: say hello.\n\nAssistant: ");
        assert!(ok, "{stderr}");
        serde_json::from_str::<Value>(&stdout).unwrap()["generated_ids"].clone()
    };
    assert_ne!(
        generate(&[]),
        generate(&["--adapter", out.to_str().unwrap()]),
        "the trained adapter changes the greedy continuation"
    );

    let mut cmd = vec!["train"];
    cmd.extend_from_slice(&base_args);
    cmd.extend_from_slice(&quant);
    let (ok, _, err) = ember(&cmd, "");
    assert!(!ok);
    assert!(err.contains("--peft"), "{err}");
}
