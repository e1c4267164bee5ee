//! The `cli` row: `ember generate` run as a user runs it (a fresh process that loads SmolLM2,
//! tokenizes the prompt from stdin, decodes greedily and streams text to stdout), timed at two
//! lengths so that the difference is the decoding loop alone, with the CLI's own per-token work
//! (streamed detokenization, writes to a pipe) in it and loading, prefill and exit out of it.
//! Beside it `xtask/bench/cli_generate_bench.py` times `transformers`' `generate` with a
//! `TextStreamer`, in fresh Python processes, the same way.

use super::{build_release, median, record_rows, Results};
use anyhow::{Context, Result};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// New tokens of the short and the long run; their difference is the row's item count.
const LENGTHS: [usize; 2] = [16, 144];
/// Processes per length and round; the median of each length is used.
const REPEATS: usize = 3;
/// The prompt, the same text on both sides (about 20 tokens with SmolLM2's tokenizer).
const PROMPT: &str =
    "Write a short story about a lighthouse keeper who finds a message in a bottle.";

/// The row's name: batch 1, float32 weights, `LENGTHS[1] - LENGTHS[0]` tokens.
fn row_name() -> String {
    format!("cli/smollm2_generate_b1_n{}", LENGTHS[1] - LENGTHS[0])
}

/// Builds the release CLI, times it at both lengths, and (with a reference Python) runs the
/// Python side. Skipped, saying why, where SmolLM2 has not been built.
pub(crate) fn measure(root: &Path, python: Option<&Path>, results: &mut Results) -> Result<()> {
    let Some(model) = smollm2() else {
        eprintln!(
            "no SmolLM2 (run ../shared/tools/make-smollm2 or set EMBER_SMOLLM2): \
             the cli row is left out"
        );
        return Ok(());
    };
    let ember = build_release(root, &["-p", "ember-cli"])?.join("ember");
    let mut times: [Vec<f64>; 2] = Default::default();
    // Lengths alternate so that a slow spell of the machine hits both.
    for _ in 0..REPEATS {
        for (slot, &new_tokens) in LENGTHS.iter().enumerate() {
            times[slot].push(time_generate(&ember, &model, new_tokens)?);
        }
    }
    let seconds = median(&times[1]) - median(&times[0]);
    let entry = results
        .entry(row_name())
        .or_insert((Vec::new(), Vec::new(), 0, "tokens"));
    entry.0.push(seconds);
    entry.2 = (LENGTHS[1] - LENGTHS[0]) as u64;
    if let Some(py) = python {
        let mut reference = Command::new(py);
        reference
            .arg(root.join("xtask/bench/cli_generate_bench.py"))
            .args(["--smollm2".as_ref(), model.as_os_str()])
            .args(["--repeats", &REPEATS.to_string()])
            .args(["--prompt", PROMPT])
            .args(["--short", &LENGTHS[0].to_string()])
            .args(["--long", &LENGTHS[1].to_string()]);
        record_rows(reference, "cli_generate_bench.py", "tokens", results, true)?;
    }
    Ok(())
}

/// Wall time of one `ember generate` process producing exactly `new_tokens` (EOS held back by
/// `--min-new-tokens`), its text read from a pipe as a user's shell would.
fn time_generate(ember: &Path, model: &Path, new_tokens: usize) -> Result<f64> {
    let n = new_tokens.to_string();
    let start = Instant::now();
    let mut child = Command::new(ember)
        .arg("generate")
        .arg("--model")
        .arg(model)
        .args(["--greedy", "--dtype", "float32"])
        .args(["--max-new-tokens", &n, "--min-new-tokens", &n])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", ember.display()))?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(PROMPT.as_bytes())?;
    let out = child.wait_with_output()?;
    let seconds = start.elapsed().as_secs_f64();
    anyhow::ensure!(
        out.status.success(),
        "ember generate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    anyhow::ensure!(
        !out.stdout.is_empty(),
        "ember generate printed no text for {new_tokens} new tokens"
    );
    Ok(seconds)
}

/// The SmolLM2 folder `../shared/tools/make-smollm2` builds (`EMBER_SMOLLM2`, else its default
/// place), where its weights are.
fn smollm2() -> Option<PathBuf> {
    let dir = std::env::var_os("EMBER_SMOLLM2")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/ember/models/SmolLM2-135M-Instruct"))
        })?;
    dir.join("model.safetensors").is_file().then_some(dir)
}
