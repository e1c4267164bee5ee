//! `ember launch --tp`: `ember train --task causal-lm` on the tiny Llama (4 query heads over 2
//! key / value heads) split over tensor-parallel ranks, alone and with data-parallel replicas,
//! ends with the whole model that one process trains; its checkpoints hold the whole model,
//! one optimizer state per slice and one random state per rank, and resuming from one ends
//! where the uninterrupted run did. Built with the `mpi` feature; skipped without `mpirun`.
#![cfg(feature = "mpi")]

mod common;

use common::{ember_in, model_folder, write_alpaca, write_args, CHATML};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// One `mpirun` at a time: two jobs started together race for OpenMPI's session folder in
/// `/tmp` ("A call to mkdir was unable to create the desired directory").
static MPI_JOBS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// How far a weight trained split may end from the one-process run's. The two runs split
/// their sums differently (over slices, over threads, and in kernels that differ between AVX2
/// and AVX-512 CPUs). AdamW divides each gradient by its own running magnitude, so a weight
/// whose gradient is near zero (a key projection's weight, fed by what all positions share,
/// which softmax ignores) takes a step set by that rounding: up to the learning rate (0.01 in
/// these tests). Seen: 1e-6-2e-6 on an AVX2 CPU, up to 1.6e-5 on an AVX-512 one. 1e-4 is 1 %
/// of one step; the logged losses and gradient norms are compared tightly besides.
const SPLIT_TOLERANCE: f32 = 1e-4;

fn have_mpirun() -> bool {
    if Command::new("mpirun").arg("--version").output().is_err() {
        eprintln!("skipped: no `mpirun` (OpenMPI's openmpi-bin) on this machine");
        return false;
    }
    true
}

/// Every tensor of a `model.safetensors`, by name: its shape and values.
fn tensors(dir: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, t)| {
            let values = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (name, (t.shape().to_vec(), values))
        })
        .collect()
}

/// The largest difference between the models of two folders, which must hold the same tensors
/// of the same shapes.
fn worst_difference(a: &Path, b: &Path) -> Worst {
    worst_difference_except(a, b, |_| false)
}

/// The largest difference between two models, and where it is.
#[derive(Default)]
struct Worst {
    /// |a - b| at its largest.
    difference: f32,
    /// The tensor and index where it is, with both values.
    at: String,
}

impl std::fmt::Display for Worst {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "worst difference {:e} at {}", self.difference, self.at)
    }
}

/// The values of `key` in the JSON log lines of `ember train`'s stdout, in order.
fn logged(stdout: &str, key: &str) -> Vec<f64> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok()?[key].as_f64())
        .collect()
}

/// [`worst_difference`] over the tensors whose name `skip` does not pick.
fn worst_difference_except(a: &Path, b: &Path, skip: impl Fn(&str) -> bool) -> Worst {
    let (a, b) = (tensors(a), tensors(b));
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "the same tensors"
    );
    let mut worst = Worst::default();
    for (name, (shape, values)) in &a {
        let (other_shape, other) = &b[name];
        assert_eq!(shape, other_shape, "{name}: the whole tensor");
        if skip(name) {
            continue;
        }
        for (i, (x, y)) in values.iter().zip(other).enumerate() {
            if (x - y).abs() > worst.difference {
                worst = Worst {
                    difference: (x - y).abs(),
                    at: format!("{name}[{i}]: {x} vs {y}"),
                };
            }
        }
    }
    worst
}

/// `ember train --task causal-lm` with `args`, under `ember launch` with `launch` when given;
/// returns stdout.
fn train(dir: &Path, launch: Option<&[&str]>, args: &[&str]) -> String {
    let _one_job = launch.map(|_| MPI_JOBS.lock().unwrap_or_else(|e| e.into_inner()));
    let mut all: Vec<&str> = Vec::new();
    if let Some(launch) = launch {
        all.extend(["launch", "--timeout", "600"]);
        all.extend(launch);
        all.push("--");
    }
    all.extend(["train", "--task", "causal-lm", "--json"]);
    all.extend(args);
    let (ok, stdout, stderr) = ember_in(&all, Some(dir), "");
    assert!(ok, "{all:?}: {stderr}");
    stdout
}

#[test]
fn two_tensor_parallel_ranks_train_save_and_resume_as_one_process() {
    if !have_mpirun() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let model = model_folder(tmp.path(), "tiny-llama-gqa", Some(CHATML));
    write_alpaca(&tmp.path().join("sft.json"), 8);
    // Clipping on (HF's max_grad_norm of 1.0, which the split model must measure over the
    // whole model), a checkpoint every 2 of the 6 steps.
    write_args(
        &tmp.path().join("args.json"),
        json!({"num_train_epochs": 3, "save_strategy": "steps", "save_steps": 2,
               "max_grad_norm": 1.0}),
    );
    let model = model.to_str().unwrap();
    let common = [
        "--model",
        model,
        "--data",
        "sft.json",
        "--args",
        "args.json",
    ];
    let one_out = train(
        tmp.path(),
        None,
        &[&common[..], &["--output-dir", "one"]].concat(),
    );
    let tp_out = train(
        tmp.path(),
        Some(&["--nproc-per-node", "2", "--tp", "2"]),
        &[&common[..], &["--output-dir", "tp"]].concat(),
    );
    // Clipping acted: the split model must have measured the whole model's norm.
    let norms = logged(&one_out, "grad_norm");
    assert!(norms.iter().any(|&n| n > 1.0), "{norms:?}");
    // World rank 0 alone prints: the lines of one process.
    let lines = |s: &str| s.lines().count();
    assert_eq!(lines(&tp_out), lines(&one_out), "{tp_out}");
    // Step by step the same losses and whole-model gradient norms: a slice's gradient that is
    // missing, doubled or not reduced shows here even where AdamW (whose steps do not depend
    // on a gradient's scale) would hide it in the weights.
    for key in ["loss", "grad_norm"] {
        let (one, tp) = (logged(&one_out, key), logged(&tp_out, key));
        assert_eq!(one.len(), tp.len(), "{key}: {one:?} vs {tp:?}");
        for (a, b) in one.iter().zip(&tp) {
            assert!(
                (a - b).abs() <= 1e-5 * a.abs().max(1.0),
                "{key}: {one:?} vs {tp:?}"
            );
        }
    }
    let worst = worst_difference(&tmp.path().join("one"), &tmp.path().join("tp"));
    eprintln!("tp 2 vs one process: {worst}");
    assert!(worst.difference <= SPLIT_TOLERANCE, "{worst}");
    // The saved folder loads as a whole Llama.
    let reloaded = ember::models::AutoModelForCausalLM::from_pretrained::<ember::Backend>(
        &tmp.path().join("tp"),
        &Default::default(),
    )
    .unwrap();
    assert_eq!(reloaded.class_name(), "LlamaForCausalLM");
    // A checkpoint: the whole model, an optimizer state per slice, a random state per rank.
    let checkpoint = tmp.path().join("tp/checkpoint-2");
    let mut files: Vec<String> = std::fs::read_dir(&checkpoint)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    for file in [
        "optimizer_tp0.bin",
        "optimizer_tp1.bin",
        "rng_state_0.json",
        "rng_state_1.json",
        "model.safetensors",
        "trainer_state.json",
    ] {
        assert!(files.iter().any(|f| f == file), "{file} in {files:?}");
    }
    assert!(!files.iter().any(|f| f == "optimizer.bin"), "{files:?}");
    let at_two = worst_difference(&checkpoint, &tmp.path().join("one/checkpoint-2"));
    assert!(
        at_two.difference <= SPLIT_TOLERANCE,
        "checkpoint-2: {at_two}"
    );
    // The two ranks of the tensor group draw dropout from one seed.
    let seed = |rank: usize| -> Value {
        let text = std::fs::read_to_string(checkpoint.join(format!("rng_state_{rank}.json")));
        serde_json::from_str(&text.unwrap()).unwrap()
    };
    assert_eq!(seed(0)["seed"], seed(1)["seed"]);
    assert_eq!(seed(1)["process_index"], 1);
    // Resumed from step 2 on two ranks: the uninterrupted run's model.
    train(
        tmp.path(),
        Some(&["--nproc-per-node", "2", "--tp", "2"]),
        &[
            &common[..],
            &[
                "--output-dir",
                "resumed",
                "--resume-from-checkpoint",
                checkpoint.to_str().unwrap(),
            ],
        ]
        .concat(),
    );
    let resumed = worst_difference(&tmp.path().join("resumed"), &tmp.path().join("tp"));
    eprintln!("resumed vs uninterrupted: {resumed}");
    assert!(resumed.difference <= 1e-6, "{resumed}");
}

#[test]
fn two_replicas_of_two_slices_train_as_one_process_on_twice_the_batch() {
    if !have_mpirun() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let model = model_folder(tmp.path(), "tiny-llama-gqa", Some(CHATML));
    // Rows of one length: every row then has as many tokens to learn, so the mean of the
    // replicas' mean losses is the mean loss of the whole batch.
    let rows: Vec<Value> = [
        "the cat sat on a mat.",
        "a dog ran up the hill",
        "blue skies, green fie",
        "hello there, how are ",
        "one two three four fi",
        "opposite of up: down.",
        "say hello to the sun!",
        "rain falls on the sea",
    ]
    .iter()
    .map(|t| json!({ "text": t }))
    .collect();
    std::fs::write(tmp.path().join("text.json"), Value::from(rows).to_string()).unwrap();
    for (name, batch) in [("one", 4), ("mesh", 2)] {
        write_args(
            &tmp.path().join(format!("{name}.json")),
            json!({"num_train_epochs": 3, "per_device_train_batch_size": batch}),
        );
    }
    let model = model.to_str().unwrap();
    let args = |name: &'static str| -> Vec<String> {
        [
            "--model",
            model,
            "--data",
            "text.json",
            "--text-column",
            "text",
            "--args",
            &format!("{name}.json"),
            "--output-dir",
            name,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    fn strs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    train(tmp.path(), None, &strs(&args("one")));
    train(
        tmp.path(),
        Some(&["--nproc-per-node", "4", "--tp", "2"]),
        &strs(&args("mesh")),
    );
    let worst = worst_difference(&tmp.path().join("one"), &tmp.path().join("mesh"));
    eprintln!("2 replicas x 2 slices vs one process: {worst}");
    assert!(worst.difference <= SPLIT_TOLERANCE, "{worst}");
}

#[test]
fn tensor_parallel_refuses_what_it_cannot_split() {
    if !have_mpirun() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let model = model_folder(tmp.path(), "tiny-gpt2", None);
    write_alpaca(&tmp.path().join("sft.json"), 4);
    write_args(&tmp.path().join("args.json"), json!({"max_steps": 1}));
    let _one_job = MPI_JOBS.lock().unwrap_or_else(|e| e.into_inner());
    let (ok, _, stderr) = ember_in(
        &[
            "launch",
            "--nproc-per-node",
            "2",
            "--tp",
            "2",
            "--",
            "train",
            "--task",
            "causal-lm",
            "--model",
            model.to_str().unwrap(),
            "--data",
            "sft.json",
            "--args",
            "args.json",
        ],
        Some(tmp.path()),
        "",
    );
    assert!(!ok);
    assert!(
        stderr.contains("--tp splits a LlamaForCausalLM, not a GPT2LMHeadModel"),
        "{stderr}"
    );
}

/// `ember launch --nproc-per-node 2 --tp 2 -- train` (sequence classification): the demo's
/// BERT encoder split over two ranks ends with the model one process trains.
#[test]
fn a_split_bert_classifier_trains_as_one_process() {
    if !have_mpirun() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (ok, _, stderr) = ember_in(&["train"], Some(tmp.path()), "");
    assert!(ok, "{stderr}");
    let config_path = tmp.path().join("ember-demo/config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    // Dropout off: one process draws the attention masks of all heads, a slice those of its own.
    config["hidden_dropout_prob"] = 0.0.into();
    config["attention_probs_dropout_prob"] = 0.0.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let mut csv = String::from("text,label\n");
    for i in 0..32 {
        let (text, label) = match i % 4 {
            0 => ("the room was clean", 1),
            1 => ("the bed was dirty", 0),
            2 => ("dinner was lovely", 1),
            _ => ("the pool was awful", 0),
        };
        csv.push_str(&format!("{text},{label}\n"));
    }
    std::fs::write(tmp.path().join("reviews.csv"), csv).unwrap();
    write_args(
        &tmp.path().join("args.json"),
        json!({"num_train_epochs": 2, "learning_rate": 1e-3}),
    );
    let args = |out: &'static str| {
        vec![
            "train",
            "--model",
            "ember-demo",
            "--data",
            "reviews.csv",
            "--test-size",
            "0.25",
            "--json",
            "--args",
            "args.json",
            "--output-dir",
            out,
        ]
    };
    let (ok, _, stderr) = ember_in(&args("one"), Some(tmp.path()), "");
    assert!(ok, "{stderr}");
    let launched = [
        &["launch", "--nproc-per-node", "2", "--tp", "2", "--"][..],
        &args("tp"),
    ]
    .concat();
    let (ok, _, stderr) = {
        let _one_job = MPI_JOBS.lock().unwrap_or_else(|e| e.into_inner());
        ember_in(&launched, Some(tmp.path()), "")
    };
    assert!(ok, "{stderr}");
    // The attention key bias has a gradient of exactly zero in exact arithmetic (softmax
    // ignores a shift shared by all keys); AdamW turns the rounding noise standing for it,
    // which depends on how sums were split (over heads, over threads), into steps of up to
    // the learning rate (as in the data-parallel launch test of tests/train.rs).
    let key_bias = tensors(&tmp.path().join("one"))
        .keys()
        .filter(|n| n.ends_with("attention.self.key.bias"))
        .count();
    assert!(key_bias > 0, "the key biases are named as expected");
    let worst = worst_difference_except(&tmp.path().join("one"), &tmp.path().join("tp"), |n| {
        n.ends_with("attention.self.key.bias")
    });
    eprintln!("BERT, tp 2 vs one process: {worst}");
    assert!(worst.difference <= SPLIT_TOLERANCE, "{worst}");
}
