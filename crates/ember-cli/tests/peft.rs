//! Adapters from the command line: `ember inspect` (modules by HF path, peft's trainable line),
//! `ember merge` (a plain checkpoint with peft's merged logits), `ember train --task causal-lm
//! --peft CONFIG` (only the adapter is written), `--adapter DIR[:NAME]` / `--active` on
//! `generate`, and typed errors for bad configs and folders.

mod common;

use common::{fixture, losses, model_folder, train, write_alpaca, write_args};
use ember::models::{CausalLmInput, LlamaForCausalLM};
use ember::prelude::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn peft_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/peft")
        .join(name)
}

#[test]
fn inspect_lists_modules_and_peft_s_trainable_line() {
    let model = fixture("tiny-llama-gqa");
    let (ok, out, err) = common::ember(&["inspect", "--model", model.to_str().unwrap()], "");
    assert!(ok, "{err}");
    assert!(
        out.contains("model.layers.0.self_attn.q_proj (Linear): weight [32, 32]"),
        "{out}"
    );
    assert!(
        out.contains("model.layers.1.self_attn.v_proj (Linear): weight [16, 32]"),
        "{out}"
    );
    assert!(out.contains("model.embed_tokens (Embedding)"), "{out}");
    assert!(out.contains("model.norm (RMSNorm): weight [32]"), "{out}");

    let adapter = peft_fixture("llama-lora-default");
    let (ok, out, err) = common::ember(
        &[
            "inspect",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
        ],
        "",
    );
    assert!(ok, "{err}");
    assert!(
        out.contains(
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight [32, 8]"
        ),
        "{out}"
    );
    // Python peft's numbers for the same model and adapter.
    assert!(
        out.trim_end()
            .ends_with("trainable params: 1,792 || all params: 21,920 || trainable%: 8.1752"),
        "{out}"
    );
}

#[test]
fn merge_writes_a_plain_checkpoint_with_peft_s_merged_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("merged");
    let (ok, _, err) = common::ember(
        &[
            "merge",
            "--model",
            fixture("tiny-llama-gqa").to_str().unwrap(),
            "--adapter",
            peft_fixture("llama-lora-default").to_str().unwrap(),
            "--output-dir",
            out_dir.to_str().unwrap(),
        ],
        "",
    );
    assert!(ok, "{err}");
    let model = LlamaForCausalLM::<Backend>::from_pretrained(&out_dir, &default_device()).unwrap();
    let bytes = std::fs::read(peft_fixture("expected.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids: Vec<i64> = st
        .tensor("llama-lora-default.input_ids")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let expected: Vec<f32> = st
        .tensor("llama-lora-default.merged_logits")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    // Row 0 has no padding: all its positions compare.
    let row: Vec<i64> = ids[..8].to_vec();
    let input = Tensor::<Backend, 2, Int>::from_data(
        ember::burn::tensor::TensorData::new(row, [1, 8]),
        &default_device(),
    );
    let logits: Vec<f32> = model
        .forward(CausalLmInput::new(input))
        .unwrap()
        .logits
        .into_data()
        .convert::<f32>()
        .into_vec()
        .unwrap();
    let worst = logits
        .iter()
        .zip(&expected[..logits.len()])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst < 1e-5,
        "merged logits differ from peft's merge_and_unload by {worst}"
    );
    // Python transformers loads the merged folder alone.
    if let Some(python) = ember_testkit::reference_python() {
        let out = std::process::Command::new(python)
            .arg("-c")
            .arg(format!(
                "from transformers import AutoModelForCausalLM as A; m = A.from_pretrained({:?}, output_loading_info=True)[1]; \
                 assert not any(m.values()), m; print('ok')",
                out_dir.to_str().unwrap()
            ))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The files of a LoRA run in `dir`: the tiny Llama folder, 16 alpaca rows, arguments for
/// `epochs` epochs, and a rank-4 LoRA config on `targets`.
fn lora_run_files(dir: &Path, epochs: usize, targets: &[&str]) -> [PathBuf; 4] {
    let model = model_folder(dir, "tiny-llama-gqa", None);
    let data = dir.join("rows.json");
    write_alpaca(&data, 16);
    let args = dir.join("args.json");
    write_args(&args, json!({ "num_train_epochs": epochs }));
    let peft = dir.join("lora.json");
    std::fs::write(
        &peft,
        json!({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 16,
               "target_modules": targets})
        .to_string(),
    )
    .unwrap();
    [model, data, args, peft]
}

#[test]
fn train_with_peft_writes_the_adapter_and_generate_applies_it() {
    let tmp = tempfile::tempdir().unwrap();
    let [model, data, args, peft] =
        lora_run_files(tmp.path(), 3, &["q_proj", "v_proj", "down_proj"]);
    let out = tmp.path().join("out");
    let (lines, _) = train(&[
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--args",
        args.to_str().unwrap(),
        "--peft",
        peft.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
    ]);
    let l = losses(&lines);
    assert!(l.len() >= 10 && l.iter().all(|x| x.is_finite()), "{l:?}");
    assert!(
        l.last().unwrap() < l.first().unwrap(),
        "the adapter learns: {l:?}"
    );
    assert!(out.join("adapter_config.json").is_file());
    assert!(out.join("adapter_model.safetensors").is_file());
    assert!(
        !out.join("model.safetensors").exists(),
        "only the adapter is saved"
    );
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["r"], 4);
    assert_eq!(config["inference_mode"], true);

    let generate = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--max-new-tokens",
            "6",
            "--json",
        ];
        args.extend_from_slice(extra);
        let (ok, stdout, stderr) = common::ember(&args, "Human: say hello.\n\nAssistant: ");
        assert!(ok, "{stderr}");
        serde_json::from_str::<Value>(&stdout).unwrap()["generated_ids"].clone()
    };
    let base = generate(&[]);
    let adapted = generate(&["--adapter", out.to_str().unwrap()]);
    assert_ne!(
        base, adapted,
        "the trained adapter changes the greedy continuation"
    );
    // Two named adapters, the second active; then the first active.
    let spec_a = format!("{}:a", out.display());
    let spec_b = format!("{}:b", peft_fixture("llama-lora-default").display());
    let b = generate(&["--adapter", &spec_a, "--adapter", &spec_b, "--active", "b"]);
    let a = generate(&["--adapter", &spec_a, "--adapter", &spec_b, "--active", "a"]);
    assert_eq!(a, adapted);
    assert_ne!(a, b);
}

/// Prompt tuning and projected prefix tuning from the command line: only the prompt trains,
/// the folder holds peft's two files (and, for the projection, the whole encoder for
/// resuming), `generate --adapter` and `inspect --adapter` read it, and `merge` refuses it
/// with a reason.
#[test]
fn train_prompt_and_prefix_tuning_then_generate_with_them() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_folder(tmp.path(), "tiny-llama-gqa", None);
    let data = tmp.path().join("rows.json");
    write_alpaca(&data, 16);
    let args = tmp.path().join("args.json");
    write_args(&args, json!({"num_train_epochs": 3, "learning_rate": 0.3}));
    let configs = [
        (
            "prompt",
            json!({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 6}),
        ),
        (
            "prefix",
            json!({"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4,
                          "prefix_projection": true, "encoder_hidden_size": 24}),
        ),
    ];
    for (name, config) in configs {
        let peft = tmp.path().join(format!("{name}.json"));
        std::fs::write(&peft, config.to_string()).unwrap();
        let out = tmp.path().join(name);
        let (lines, _) = train(&[
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--args",
            args.to_str().unwrap(),
            "--peft",
            peft.to_str().unwrap(),
            "--output-dir",
            out.to_str().unwrap(),
        ]);
        let l = losses(&lines);
        assert!(
            l.len() >= 10 && l.iter().all(|x| x.is_finite()),
            "{name}: {l:?}"
        );
        // The tiny random model's activations are ~0.02 wide, so a prompt barely moves its
        // loss (gradient norms ~0.002); learning is shown on SmolLM2 in docs/peft.md, and the
        // gradients match PyTorch's in tests/tests/peft_prompt.rs.
        assert!(out.join("adapter_model.safetensors").is_file());
        assert!(
            !out.join("model.safetensors").exists(),
            "only the prompt is saved"
        );
        assert_eq!(
            out.join("prompt_encoder.safetensors").is_file(),
            name == "prefix",
            "{name}: the whole encoder is kept where it is more than a table"
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
            args.extend_from_slice(extra);
            let (ok, stdout, stderr) = common::ember(&args, "Human: say hello.\n\nAssistant: ");
            assert!(ok, "{stderr}");
            serde_json::from_str::<Value>(&stdout).unwrap()["generated_ids"].clone()
        };
        // Decoding runs with the prompt entered once and kept in the cache (the tokens
        // themselves are checked against peft in tests/tests/peft_prompt.rs).
        generate(&["--adapter", out.to_str().unwrap()]);
        let (ok, listing, err) = common::ember(
            &[
                "inspect",
                "--model",
                model.to_str().unwrap(),
                "--adapter",
                out.to_str().unwrap(),
            ],
            "",
        );
        assert!(ok, "{err}");
        let table = if name == "prompt" {
            "[6, 32]"
        } else {
            "[4, 64]"
        };
        assert!(
            listing.contains(&format!("prompt_encoder.default.embedding.weight {table}")),
            "{name}: {listing}"
        );
        let (ok, _, err) = common::ember(
            &[
                "merge",
                "--model",
                model.to_str().unwrap(),
                "--adapter",
                out.to_str().unwrap(),
                "--output-dir",
                tmp.path().join("merged").to_str().unwrap(),
            ],
            "",
        );
        assert!(!ok && err.contains("no weights to merge"), "{name}: {err}");
    }
}

#[test]
fn bad_peft_configs_and_adapter_folders_are_error_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_folder(tmp.path(), "tiny-llama-gqa", None);
    let data = tmp.path().join("rows.json");
    write_alpaca(&data, 4);
    let run = |config: Value| {
        let peft = tmp.path().join("bad.json");
        std::fs::write(&peft, config.to_string()).unwrap();
        let (ok, _, err) = common::ember(
            &[
                "train",
                "--task",
                "causal-lm",
                "--model",
                model.to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
                "--peft",
                peft.to_str().unwrap(),
                "--output-dir",
                tmp.path().join("o").to_str().unwrap(),
            ],
            "",
        );
        assert!(!ok);
        assert!(!err.contains("panicked"), "{err}");
        err
    };
    let err = run(json!({"peft_type": "LORA", "target_modules": ["nope"]}));
    assert!(
        err.contains("Target modules {'nope'} not found in the base model"),
        "{err}"
    );
    let err = run(json!({"peft_type": "LORA", "r": 0}));
    assert!(err.contains("`r` should be a positive integer"), "{err}");
    let err = run(json!({"peft_type": "LORA", "task_type": "SEQ2SEQ"}));
    assert!(err.contains("unknown task type `SEQ2SEQ`"), "{err}");
    let err = run(json!({"peft_type": "ADALORA"}));
    assert!(err.contains("unknown peft type `ADALORA`"), "{err}");

    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let (ok, _, err) = common::ember(
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            empty.to_str().unwrap(),
        ],
        "hi",
    );
    assert!(!ok && err.contains("adapter_config.json"), "{err}");
    // An adapter for another model: the key and both shapes are named.
    let (ok, _, err) = common::ember(
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            peft_fixture("gpt2-lora-conv1d").to_str().unwrap(),
        ],
        "hi",
    );
    assert!(!ok && !err.contains("panicked"), "{err}");
}

/// `ember train --bf16 | --fp16` with a LoRA adapter: the same run as float32 within half
/// precision's rounding (which is really applied: the curves are not identical), the loss
/// falling, and the adapter saved in float32 (mixed precision keeps float32 master weights).
#[test]
fn lora_trains_in_bf16_and_fp16_mixed_precision() {
    let tmp = tempfile::tempdir().unwrap();
    let [model, data, args, peft] = lora_run_files(tmp.path(), 2, &["q_proj", "v_proj"]);
    let run = |flag: Option<&str>| {
        let out = tmp
            .path()
            .join(flag.unwrap_or("--float32").trim_start_matches('-'));
        let mut args = vec![
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--args",
            args.to_str().unwrap(),
            "--peft",
            peft.to_str().unwrap(),
            "--output-dir",
            out.to_str().unwrap(),
        ];
        args.extend(flag);
        let (lines, _) = train(&args);
        (losses(&lines), out)
    };
    let (f32_losses, _) = run(None);
    for (flag, tolerance) in [("--bf16", 1e-3), ("--fp16", 1e-4)] {
        let (l, out) = run(Some(flag));
        assert_eq!(l.len(), f32_losses.len(), "{flag}");
        assert!(
            l.last().unwrap() < l.first().unwrap(),
            "{flag} learns: {l:?}"
        );
        let gap = l
            .iter()
            .zip(&f32_losses)
            .map(|(a, b)| (a - b).abs() / b)
            .fold(0.0, f64::max);
        eprintln!("{flag}: largest relative loss difference from float32 {gap:.2e}");
        assert!(
            gap > 0.0,
            "{flag}: the losses equal float32's: no rounding happened"
        );
        assert!(
            gap < tolerance,
            "{flag}: {gap:.2e} from float32: {l:?} vs {f32_losses:?}"
        );
        let bytes = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in file.tensors() {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{flag}: {name}");
        }
    }
    // Both flags at once are refused by the parser.
    let (ok, _, stderr) = common::ember(&["train", "--bf16", "--fp16"], "");
    assert!(!ok && stderr.contains("--fp16"), "{stderr}");
}
