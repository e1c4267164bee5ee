//! `cargo xtask bench`: Ember's criterion benches and the Python reference on the same inputs,
//! alternated round by round on the same machine, reported as medians and ratios.

use crate::{reference_python, run as run_command};

mod cli_decoding;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One comparison: a criterion bench of ours and the reference script that times the same work.
struct Pair {
    /// Crate holding the criterion bench.
    package: &'static str,
    /// Bench target name.
    bench: &'static str,
    /// Python script under `xtask/bench/` that prints `{"bench", "median_s", "items"}` lines.
    script: &'static str,
    /// Unit of `items` for the throughput column.
    unit: &'static str,
}

const PAIRS: &[Pair] = &[
    Pair {
        package: "ember-tokenizers",
        bench: "batch_encode",
        script: "tokenizer_bench.py",
        unit: "sentences",
    },
    Pair {
        package: "ember-tests",
        bench: "datasets_pipeline",
        script: "datasets_bench.py",
        unit: "rows",
    },
    Pair {
        package: "ember-models",
        bench: "encoders",
        script: "models_bench.py",
        unit: "sequences",
    },
    Pair {
        package: "ember-models",
        bench: "generation",
        script: "generation_bench.py",
        unit: "tokens",
    },
    Pair {
        package: "ember-tests",
        bench: "trainer",
        script: "trainer_bench.py",
        unit: "samples",
    },
    // LoRA training steps beside Python peft; the decoding rows (`*_generate_*`, in tokens)
    // are Ember's alone: base, unmerged and merged adapter.
    Pair {
        package: "ember-models",
        bench: "peft",
        script: "peft_bench.py",
        unit: "sequences",
    },
    // SmolLM2 generation in f32, NF4 and LLM.int8 beside transformers + bitsandbytes; the
    // llama.cpp row (`quant/smollm2_llamacpp_q4_1_*`, the Q4_1 GGUF) is the reference's alone.
    Pair {
        package: "ember-models",
        bench: "quant",
        script: "quant_bench.py",
        unit: "tokens",
    },
];

/// The unit of a row's throughput: its pair's, but tokens for decoding rows.
fn unit_of(name: &str, pair_unit: &'static str) -> &'static str {
    if name.contains("_generate_") {
        "tokens"
    } else {
        pair_unit
    }
}

/// Per bench: Ember's seconds per round, the reference's seconds per round, items, unit.
type Results = BTreeMap<String, (Vec<f64>, Vec<f64>, u64, &'static str)>;

pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let mut rounds = 2;
    let mut only: Option<String> = None;
    let mut rest = args.iter();
    while let Some(flag) = rest.next() {
        match (flag.as_str(), rest.next()) {
            ("--rounds", Some(n)) => rounds = n.parse().context("--rounds takes a number")?,
            ("--only", Some(name)) => only = Some(name.clone()),
            _ => anyhow::bail!(
                "usage: cargo xtask bench [--rounds N] [--only BENCH | memory | distributed | cli]"
            ),
        }
    }
    let pairs: Vec<&Pair> = PAIRS
        .iter()
        .filter(|p| only.as_deref().is_none_or(|o| o == p.bench))
        .collect();
    let with_memory = only.as_deref().is_none_or(|o| o == "memory");
    let with_distributed = only.as_deref().is_none_or(|o| o == "distributed");
    let with_cli = only.as_deref().is_none_or(|o| o == "cli");
    anyhow::ensure!(
        !pairs.is_empty() || with_memory || with_distributed || with_cli,
        "no bench named {} (nor `memory`, `distributed`, `cli`)",
        only.unwrap_or_default()
    );
    let shared = root.join("../shared");
    let python = reference_python(root);
    if python.is_none() {
        eprintln!("no reference Python found: Ember's numbers only");
    }
    eprintln!("CPU: {}", cpu_features());
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut results = Results::new();
    let mut memory = Memory::new();
    for round in 0..rounds {
        if with_memory {
            eprintln!(
                "round {}/{rounds}: peak memory of the training steps and generation",
                round + 1
            );
            measure_memory(root, python.as_deref(), &shared, &mut memory)?;
        }
        if with_distributed {
            eprintln!(
                "round {}/{rounds}: data-parallel training step on {DDP_PROCESSES} processes",
                round + 1
            );
            measure_distributed(root, python.as_deref(), &shared, &mut results)?;
        }
        if with_cli {
            eprintln!(
                "round {}/{rounds}: `ember generate` end to end beside HF generate",
                round + 1
            );
            cli_decoding::measure(root, python.as_deref(), &mut results)?;
        }
        for pair in &pairs {
            eprintln!(
                "round {}/{rounds}: {} {}",
                round + 1,
                pair.package,
                pair.bench
            );
            run_command(
                Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())).args([
                    "bench",
                    "-p",
                    pair.package,
                    "--bench",
                    pair.bench,
                    "--",
                    "--noplot",
                ]),
            )?;
            for (name, secs, items) in criterion_medians(root, pair.bench)? {
                let unit = unit_of(&name, pair.unit);
                let e = results
                    .entry(name)
                    .or_insert((Vec::new(), Vec::new(), items, unit));
                e.0.push(secs);
            }
            if let Some(py) = &python {
                let mut reference = Command::new(py);
                reference
                    .arg(root.join("xtask/bench").join(pair.script))
                    .arg(&shared);
                for v in json_lines(reference, pair.script)? {
                    let name = v["bench"].as_str().unwrap_or_default().to_owned();
                    let unit = unit_of(&name, pair.unit);
                    let e = results
                        .entry(name)
                        .or_insert((Vec::new(), Vec::new(), 0, unit));
                    e.1.push(v["median_s"].as_f64().unwrap_or(f64::NAN));
                    e.2 = v["items"].as_u64().unwrap_or(e.2);
                }
            }
        }
    }
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut report = table(
        &results,
        rounds,
        load_before.trim(),
        load_after.trim(),
        python.is_some(),
    );
    if with_memory {
        report.push_str(&memory_table(&memory));
    }
    println!("{report}");
    let path = root.join("target/bench-report.md");
    std::fs::write(&path, &report)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

/// Processes of the `distributed` row: one thread each, as many as this 2-core machine has.
const DDP_PROCESSES: usize = 2;

/// The `distributed` row: ember-models' `ddp_step` example under mpirun beside
/// `xtask/bench/ddp_bench.py` (PyTorch DDP over gloo), [`DDP_PROCESSES`] processes of one
/// thread each. Skipped, saying why, where OpenMPI's `mpirun` is missing.
fn measure_distributed(
    root: &Path,
    python: Option<&Path>,
    shared: &Path,
    results: &mut Results,
) -> Result<()> {
    let has_mpirun = Command::new("mpirun")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_mpirun {
        eprintln!("no mpirun (OpenMPI): the distributed row is left out");
        return Ok(());
    }
    let release = build_release(
        root,
        &[
            "-p",
            "ember-models",
            "--features",
            "mpi",
            "--example",
            "ddp_step",
        ],
    )?;
    let mut ember = Command::new("mpirun");
    // On one machine: shared memory and loopback only, as `ember launch` runs.
    ember
        .args(["--allow-run-as-root", "--bind-to", "none"])
        .args([
            "--mca",
            "btl",
            "self,vader",
            "--mca",
            "oob_tcp_if_include",
            "lo",
        ])
        .args([
            "-x",
            "RAYON_NUM_THREADS=1",
            "-n",
            &DDP_PROCESSES.to_string(),
        ])
        .arg(release.join("examples/ddp_step"));
    record_rows(ember, "ddp_step", "samples", results, false)?;
    if let Some(py) = python {
        let mut reference = Command::new(py);
        reference
            .arg(root.join("xtask/bench/ddp_bench.py"))
            .arg(shared)
            .args(["--nproc", &DDP_PROCESSES.to_string()]);
        record_rows(reference, "ddp_bench.py", "samples", results, true)?;
    }
    Ok(())
}

/// The target folder: `$CARGO_TARGET_DIR` (relative to `root` when relative), else `target`.
fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), |t| root.join(t))
}

/// `cargo build --release --quiet` with `args` in `root`; returns the release folder.
fn build_release(root: &Path, args: &[&str]) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run_command(
        Command::new(&cargo)
            .current_dir(root)
            .args(["build", "--release", "--quiet"])
            .args(args),
    )?;
    Ok(target_dir(root).join("release"))
}

/// Runs `command` and adds each `{"bench", "median_s", "items"}` line it prints to Ember's or
/// (`reference`) the reference's column of `results`.
fn record_rows(
    command: Command,
    what: &str,
    unit: &'static str,
    results: &mut Results,
    reference: bool,
) -> Result<()> {
    for v in json_lines(command, what)? {
        let name = v["bench"].as_str().unwrap_or_default().to_owned();
        let e = results
            .entry(name)
            .or_insert((Vec::new(), Vec::new(), 0, unit));
        let seconds = v["median_s"].as_f64().unwrap_or(f64::NAN);
        if reference { &mut e.1 } else { &mut e.0 }.push(seconds);
        e.2 = v["items"].as_u64().unwrap_or(e.2);
    }
    Ok(())
}

/// Runs `command` (named `what` in errors), fails with its standard error unless it succeeds,
/// and parses each line of its standard output as one JSON object.
fn json_lines(mut command: Command, what: &str) -> Result<Vec<serde_json::Value>> {
    let out = command
        .output()
        .with_context(|| format!("running {what}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).with_context(|| format!("{what} printed {line:?}")))
        .collect()
}

/// Peak resident memory per workload: Ember's MiB per round, the reference's MiB per round.
type Memory = BTreeMap<String, (Vec<f64>, Vec<f64>)>;

/// Runs the peak-memory probes (`ember-models`' `train_step_memory` example and
/// `xtask/bench/memory_bench.py`), each in a fresh process, for full fine-tuning, LoRA
/// (`--lora`), and SmolLM2 prompt and prefix tuning (`--prompt-tuning`, `--prefix-tuning`);
/// then SmolLM2 generation in f32, bf16, NF4 and int8 (the `generate_memory` example beside
/// `memory_bench.py --generate`, with `--bf16` / `--nf4` / `--int8`); and records their `peak_rss_mib`.
fn measure_memory(
    root: &Path,
    python: Option<&Path>,
    shared: &Path,
    memory: &mut Memory,
) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    for extra in [
        None,
        Some("--lora"),
        Some("--prompt-tuning"),
        Some("--prefix-tuning"),
    ] {
        let ember = memory_example(&cargo, root, "train_step_memory", extra);
        record_memory(ember, "train_step_memory", memory, false)?;
        if let Some(py) = python {
            let mut reference = Command::new(py);
            reference
                .arg(root.join("xtask/bench/memory_bench.py"))
                .arg(shared)
                .args(extra);
            record_memory(reference, "memory_bench.py", memory, true)?;
        }
    }
    for quant in [None, Some("--bf16"), Some("--nf4"), Some("--int8")] {
        let ember = memory_example(&cargo, root, "generate_memory", quant);
        record_memory(ember, "generate_memory", memory, false)?;
        if let Some(py) = python {
            let mut reference = Command::new(py);
            reference
                .arg(root.join("xtask/bench/memory_bench.py"))
                .arg(shared)
                .arg("--generate")
                .args(quant);
            record_memory(reference, "memory_bench.py --generate", memory, true)?;
        }
    }
    Ok(())
}

/// `cargo run --release` of one of ember-models' peak-memory examples, with its flag.
fn memory_example(cargo: &str, root: &Path, example: &str, flag: Option<&str>) -> Command {
    let mut command = Command::new(cargo);
    command.current_dir(root).args([
        "run",
        "--release",
        "--quiet",
        "-p",
        "ember-models",
        "--example",
        example,
    ]);
    if let Some(flag) = flag {
        command.args(["--", flag]);
    }
    command
}

/// Runs one probe and appends each `{"bench", "peak_rss_mib"}` line it prints to Ember's or
/// (`reference`) the reference's column.
fn record_memory(command: Command, what: &str, memory: &mut Memory, reference: bool) -> Result<()> {
    for v in json_lines(command, what)? {
        let name = v["bench"].as_str().unwrap_or_default().to_owned();
        let mib = v["peak_rss_mib"].as_f64().unwrap_or(f64::NAN);
        let (ember, python) = memory.entry(name).or_default();
        if reference { python } else { ember }.push(mib);
    }
    Ok(())
}

/// The peak-memory section of the report.
fn memory_table(memory: &Memory) -> String {
    let mut s = String::from(
        "\n## Peak resident memory (VmHWM of a fresh process, medians)\n\n\
         | workload | Ember | reference | Ember / reference |\n|---|---|---|---|\n",
    );
    for (name, (ember, reference)) in memory {
        let (e, r) = (median(ember), median(reference));
        let mib = |v: f64| {
            if v.is_finite() {
                format!("{v:.0} MiB")
            } else {
                "-".into()
            }
        };
        let _ = writeln!(s, "| {name} | {} | {} | {} |", mib(e), mib(r), ratio(e, r));
    }
    s
}

/// Median time per iteration of every benchmark of a criterion group, from
/// `<target>/criterion/<group>/<id>/new/estimates.json` (`<target>`: `$CARGO_TARGET_DIR`, else
/// `target`), with its throughput element count.
fn criterion_medians(root: &Path, group: &str) -> Result<Vec<(String, f64, u64)>> {
    let dir = target_dir(root).join("criterion").join(group);
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let bench_dir = entry?.path();
        let estimates = bench_dir.join("new/estimates.json");
        let benchmark = bench_dir.join("new/benchmark.json");
        if !estimates.is_file() {
            continue;
        }
        let est: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&estimates)?)?;
        let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&benchmark)?)?;
        let ns = est["median"]["point_estimate"].as_f64().unwrap_or(f64::NAN);
        let items = meta["throughput"]["Elements"].as_u64().unwrap_or(0);
        let id = bench_dir
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        out.push((format!("{group}/{id}"), ns * 1e-9, items));
    }
    Ok(out)
}

fn median(xs: &[f64]) -> f64 {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// The variables that narrow the instruction sets the two sides use below what the CPU
/// exposes: Ember's kernels (`EMBER_NO_AVX512`) and PyTorch's (its ATen kernels, MKL, oneDNN).
const ISA_VARIABLES: [&str; 4] = [
    "EMBER_NO_AVX512",
    "ATEN_CPU_CAPABILITY",
    "MKL_ENABLE_INSTRUCTIONS",
    "ONEDNN_MAX_CPU_ISA",
];

/// The CPU's model name and the vector features the kernels choose between (machines here
/// differ: some expose AVX-512 with BF16 and VNNI, others only AVX2 + FMA), from
/// `/proc/cpuinfo`, "unknown" elsewhere; then those of [`ISA_VARIABLES`] that are set, since
/// a run with them set used less than the CPU exposes.
fn cpu_features() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
    };
    let Some(flags) = field("flags") else {
        return "unknown (no /proc/cpuinfo)".into();
    };
    let flags: Vec<&str> = flags.split_whitespace().collect();
    let shown: Vec<&str> = [
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512_vnni",
        "avx512_bf16",
        "amx_bf16",
    ]
    .into_iter()
    .filter(|f| flags.contains(f))
    .collect();
    let mut line = format!(
        "{}; {}",
        field("model name").unwrap_or_else(|| "unknown model".into()),
        shown.join(" ")
    );
    if let Some(narrowed) = narrowing(|name| std::env::var(name).ok()) {
        line += &format!("; {narrowed}");
    }
    line
}

/// "narrowed by NAME=VALUE ..." for those of [`ISA_VARIABLES`] that `lookup` finds set.
fn narrowing(lookup: impl Fn(&str) -> Option<String>) -> Option<String> {
    let set: Vec<String> = ISA_VARIABLES
        .into_iter()
        .filter_map(|name| lookup(name).map(|value| format!("{name}={value}")))
        .collect();
    (!set.is_empty()).then(|| format!("narrowed by {}", set.join(" ")))
}

fn table(
    results: &Results,
    rounds: usize,
    load_before: &str,
    load_after: &str,
    with_python: bool,
) -> String {
    let mut s = String::new();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let _ = writeln!(
        s,
        "# Ember vs reference: {rounds} alternating rounds, {cpus} CPUs"
    );
    let _ = writeln!(s, "\nCPU: {}", cpu_features());
    let _ = writeln!(
        s,
        "\nload average before: {load_before}; after: {load_after}\n"
    );
    if !with_python {
        let _ = writeln!(s, "No reference Python was found: Ember's numbers only.\n");
    }
    let _ = writeln!(s, "| bench | Ember median | reference median | Ember / reference time | Ember throughput | reference throughput |");
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for (name, (ember, py, items, unit)) in results {
        let (e, p) = (median(ember), median(py));
        let per_s = |t: f64| {
            if t.is_finite() && *items > 0 {
                format!("{:.0} {unit}/s", *items as f64 / t)
            } else {
                "-".into()
            }
        };
        let ratio = ratio(e, p);
        let _ = writeln!(
            s,
            "| {name} | {} | {} | {ratio} | {} | {} |",
            fmt_s(e),
            fmt_s(p),
            per_s(e),
            per_s(p)
        );
    }
    s
}

/// Ember's value over the reference's, to two decimals, or `-` where either is missing.
fn ratio(ember: f64, reference: f64) -> String {
    if ember.is_finite() && reference.is_finite() {
        format!("{:.2}", ember / reference)
    } else {
        "-".into()
    }
}

fn fmt_s(t: f64) -> String {
    if !t.is_finite() {
        "-".into()
    } else if t >= 1.0 {
        format!("{t:.2} s")
    } else {
        format!("{:.1} ms", t * 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_narrowed_to_avx2_says_so_and_a_plain_run_says_nothing() {
        assert_eq!(narrowing(|_| None), None);
        let narrowed = narrowing(|name| {
            matches!(name, "EMBER_NO_AVX512" | "ATEN_CPU_CAPABILITY").then(|| match name {
                "EMBER_NO_AVX512" => "1".to_owned(),
                _ => "avx2".to_owned(),
            })
        });
        assert_eq!(
            narrowed.as_deref(),
            Some("narrowed by EMBER_NO_AVX512=1 ATEN_CPU_CAPABILITY=avx2")
        );
    }
}
