//! `cargo xtask gpu-check build [--no-build] [--minilm DIR] [--smollm2 DIR]`: the CPU-side part
//! of the GPU check (docs/gpu-check.md). Builds the CLI and `xtask/gpu/runner` with burn's CUDA
//! backend into `target/gpu` (release, stripped), and fills the ignored folder `gpu-carry/` with
//! the binaries (gzipped) and the small model files the device script needs; fails when what
//! travels to the device machine (the working tree plus the carry) exceeds its 64 MiB.

use crate::run;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The device tool's limit on the working tree plus carried paths.
const LIMIT: u64 = 64 * 1024 * 1024;
/// Its own target folder: the CUDA feature set would otherwise rebuild burn in the shared
/// `target/` that every other build uses.
const TARGET_DIR: &str = "target/gpu";
const CARRY: &str = "gpu-carry";
/// Symbols and debug information stripped: about half the binary's size, none of its speed.
const STRIP: &str = "profile.release.strip=true";
/// Config and tokenizer files copied from the real model folders: the weights stay behind (87
/// and 514 MB) and the device script writes random weights of the same shapes beside these.
const MINILM_FILES: &[&str] = &[
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
];
const SMOLLM2_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
];

pub fn run_command(root: &Path, args: &[String]) -> Result<()> {
    let usage = "usage: cargo xtask gpu-check build [--no-build] [--minilm DIR] [--smollm2 DIR]";
    let mut build = true;
    let mut minilm = root.join("../shared/models/all-MiniLM-L6-v2");
    let mut smollm2 = home().join(".cache/ember/models/SmolLM2-135M-Instruct");
    let mut rest = args.iter();
    match rest.next().map(String::as_str) {
        Some("build") => {}
        _ => bail!("{usage}"),
    }
    while let Some(flag) = rest.next() {
        match (flag.as_str(), rest.next()) {
            ("--no-build", None) => build = false,
            ("--minilm", Some(dir)) => minilm = dir.into(),
            ("--smollm2", Some(dir)) => smollm2 = dir.into(),
            _ => bail!("{usage}"),
        }
    }
    if build {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let common = [
            "--release",
            "--no-default-features",
            "--features",
            "cuda",
            "--target-dir",
            TARGET_DIR,
            "--config",
            STRIP,
        ];
        run(Command::new(&cargo)
            .args(["build", "-p", "ember-cli"])
            .args(common))?;
        // Same target folder and profile; its own workspace (see its Cargo.toml).
        run(Command::new(&cargo)
            .args(["build", "--manifest-path", "xtask/gpu/runner/Cargo.toml"])
            .args(common))?;
    }
    let carry = root.join(CARRY);
    if carry.exists() {
        std::fs::remove_dir_all(&carry).with_context(|| format!("emptying {}", carry.display()))?;
    }
    std::fs::create_dir_all(&carry)?;
    // Stripped, the two binaries are about 50 MiB each: together over the 64 MiB that travels.
    // gzip (on every Linux image; the device script unpacks them) brings each to about 14.
    let mut raw = 0;
    for bin in ["ember", "ember-gpu-check"] {
        let from = root.join(TARGET_DIR).join("release").join(bin);
        raw += std::fs::metadata(&from)
            .with_context(|| {
                format!(
                    "{} (built by `cargo xtask gpu-check build`)",
                    from.display()
                )
            })?
            .len();
        let to = carry.join(format!("{bin}.gz"));
        let file = std::fs::File::create(&to)?;
        run(Command::new("gzip")
            .args(["-9", "-n", "-c"])
            .arg(&from)
            .stdout(file))?;
    }
    copy_files(&minilm, &carry.join("minilm"), MINILM_FILES)?;
    copy_files(&smollm2, &carry.join("smollm2"), SMOLLM2_FILES)?;

    let carried = dir_size(&carry)?;
    let tree = tree_size(root)?;
    let packed: u64 = ["ember.gz", "ember-gpu-check.gz"]
        .iter()
        .map(|f| std::fs::metadata(carry.join(f)).map_or(0, |m| m.len()))
        .sum();
    eprintln!(
        "the two stripped binaries: {} ({} gzipped)",
        mib(raw),
        mib(packed)
    );
    eprintln!(
        "{CARRY}/ in all: {}; the working tree that travels: {}; together {} of {}",
        mib(carried),
        mib(tree),
        mib(carried + tree),
        mib(LIMIT)
    );
    if carried + tree > LIMIT {
        bail!(
            "{} would travel to the device machine, over its {} limit",
            mib(carried + tree),
            mib(LIMIT)
        );
    }
    eprintln!(
        "ready: run `bash xtask/gpu/check.sh probe`, then `bash xtask/gpu/check.sh full`, on the \
         device machine with carry [\"{CARRY}\"] (docs/gpu-check.md)"
    );
    Ok(())
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn copy_files(from: &Path, to: &Path, names: &[&str]) -> Result<()> {
    std::fs::create_dir_all(to)?;
    let mut copied = 0;
    for name in names {
        let src = from.join(name);
        if src.is_file() {
            std::fs::copy(&src, to.join(name))
                .with_context(|| format!("copying {}", src.display()))?;
            copied += 1;
        }
    }
    if copied == 0 || !from.join("config.json").is_file() {
        bail!(
            "{} has no config.json / tokenizer files (the MiniLM folder is ../shared/models/all-MiniLM-L6-v2; SmolLM2 is made by ../shared/tools/make-smollm2); pass --minilm / --smollm2",
            from.display()
        );
    }
    Ok(())
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

/// The bytes of what travels besides the carry: tracked files and untracked ones git does not
/// ignore (`git ls-files --cached --others --exclude-standard`).
fn tree_size(root: &Path) -> Result<u64> {
    let out = Command::new("git")
        .args([
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ])
        .current_dir(root)
        .output()
        .context("running git ls-files")?;
    if !out.status.success() {
        bail!(
            "git ls-files failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut total = 0;
    for name in out.stdout.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let path = root.join(String::from_utf8_lossy(name).as_ref());
        // A file deleted in the work tree but still in the index travels as nothing.
        total += std::fs::metadata(&path).map_or(0, |m| m.len());
    }
    Ok(total)
}
