//! Running the `ember` binary from the CLI tests.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Runs `ember ARGS` in `cwd` (or the test's directory) with `stdin`; returns whether it
/// succeeded, its stdout and its stderr.
pub fn ember_in(args: &[&str], cwd: Option<&Path>, stdin: &str) -> (bool, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ember"));
    if let Some(dir) = cwd {
        command.current_dir(dir);
    }
    let mut child = command
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A run that fails on its arguments exits without reading stdin; the pipe it closed is
    // then not the test's failure, its exit status and stderr are.
    match child.stdin.take().unwrap().write_all(stdin.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        other => other.unwrap(),
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// Runs `ember ARGS` with `stdin` (see [`ember_in`]).
pub fn ember(args: &[&str], stdin: &str) -> (bool, String, String) {
    ember_in(args, None, stdin)
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

/// The special tokens of [`write_tokenizer`], ids 0..6.
pub const SPECIALS: [&str; 6] = [
    "<pad>",
    "<s>",
    "</s>",
    "<unk>",
    "<|im_start|>",
    "<|im_end|>",
];

/// A ChatML template with a default system turn, as SmolLM2's.
pub const CHATML: &str = "{% for m in messages %}{% if loop.first and m.role != 'system' %}\
    <|im_start|>system\nbe brief.<|im_end|>\n{% endif %}<|im_start|>{{ m.role }}\n\
    {{ m.content }}<|im_end|>\n{% endfor %}\
    {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// A checkpoint folder: the fixture's config and weights, and a character-level tokenizer (48
/// ids: the specials, then lowercase letters, space and a little punctuation) with `eos_token`
/// `</s>` and, when given, a chat template.
pub fn model_folder(dir: &Path, fixture_name: &str, chat_template: Option<&str>) -> PathBuf {
    let out = dir.join(fixture_name);
    std::fs::create_dir_all(&out).unwrap();
    for file in ["config.json", "model.safetensors", "generation_config.json"] {
        std::fs::copy(fixture(fixture_name).join(file), out.join(file)).unwrap();
    }
    let mut vocab = serde_json::Map::new();
    for (i, t) in SPECIALS.iter().enumerate() {
        vocab.insert((*t).into(), i.into());
    }
    for c in " abcdefghijklmnopqrstuvwxyz.,:?!\nHA".chars() {
        let id = vocab.len();
        vocab.insert(c.to_string(), id.into());
    }
    assert!(vocab.len() <= 64, "fits tiny-gpt2's vocabulary");
    let added: Vec<Value> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let pipeline = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    });
    std::fs::write(out.join("tokenizer.json"), pipeline.to_string()).unwrap();
    let mut config = json!({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"
    });
    if let Some(t) = chat_template {
        config["chat_template"] = t.into();
    }
    std::fs::write(out.join("tokenizer_config.json"), config.to_string()).unwrap();
    out
}

/// `rows` alpaca-style rows (some with an `input`), as a JSON list.
pub fn write_alpaca(path: &Path, rows: usize) {
    let facts = [
        ("name a colour.", "", "blue."),
        ("add.", "one two", "three."),
        ("say hello.", "", "hello!"),
        ("opposite of up?", "", "down."),
    ];
    let rows: Vec<Value> = (0..rows)
        .map(|i| {
            let (instruction, input, output) = facts[i % facts.len()];
            json!({"instruction": instruction, "input": input, "output": output})
        })
        .collect();
    std::fs::write(path, serde_json::to_string_pretty(&rows).unwrap()).unwrap();
}

pub fn write_args(path: &Path, extra: Value) {
    let mut args = json!({
        "output_dir": "unused",
        "per_device_train_batch_size": 4,
        "learning_rate": 0.01,
        "logging_steps": 1,
        "save_strategy": "no",
        "disable_tqdm": true,
        "seed": 7,
    });
    args.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    std::fs::write(path, args.to_string()).unwrap();
}

/// Runs `ember train --task causal-lm ... --json`; returns the log lines and the final line.
pub fn train(args: &[&str]) -> (Vec<Value>, Value) {
    let all = [&["train", "--task", "causal-lm", "--json"], args].concat();
    let (ok, stdout, stderr) = ember(&all, "");
    assert!(ok, "{stderr}");
    let mut lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let last = lines.pop().expect("the final metrics line");
    (lines, last)
}

pub fn losses(lines: &[Value]) -> Vec<f64> {
    lines
        .iter()
        .filter_map(|l| l.get("loss").and_then(Value::as_f64))
        .collect()
}

/// A small labelled CSV (`text,label`) in the demo's domain: hotel reviews, good and bad
/// alternating.
pub fn write_reviews_csv(path: &Path, rows: usize) {
    let good = ["was clean", "was lovely", "was excellent", "was perfect"];
    let bad = ["was dirty", "was awful", "was broken", "was terrible"];
    let things = [
        "the room",
        "the bed",
        "the pool",
        "the lobby",
        "dinner",
        "the view",
    ];
    let mut csv = String::from("text,label\n");
    for i in 0..rows {
        let (opinions, label) = if i % 2 == 0 {
            (&good, "good")
        } else {
            (&bad, "bad")
        };
        csv.push_str(&format!(
            "{} {},{label}\n",
            things[i % things.len()],
            opinions[(i / 2) % 4]
        ));
    }
    std::fs::write(path, csv).unwrap();
}
