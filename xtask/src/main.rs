//! `cargo xtask`: the project's tasks.
//!
//! - `cargo xtask ci`: format check, clippy (warnings denied, the CUDA path included) and the
//!   tests: what `.ci/run` runs.
//! - `cargo xtask fixtures`: regenerates the golden fixtures through the reference Python.
//! - `cargo xtask bench [--rounds N] [--only BENCH | memory | distributed | cli]`: criterion
//!   benches, peak memory, data-parallel steps under `mpirun` and the `ember generate` binary
//!   end to end, beside the PyTorch / `transformers` reference, alternated, in one table
//!   (`target/bench-report.md`).
//! - `cargo xtask gpu-check build`: the CUDA build and carry folder of the GPU check
//!   (docs/gpu-check.md).

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

mod bench;
mod gpu_check;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("fixtures") => fixtures(&root),
        Some("bench") => bench::run(&root, &args[1..]),
        Some("gpu-check") => gpu_check::run_command(&root, &args[1..]),
        _ => {
            eprintln!(
                "usage: cargo xtask <ci | fixtures | bench [--rounds N] [--only NAME] | gpu-check build>"
            );
            std::process::exit(2);
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_path_buf()
}

/// Runs a command, echoing it, and fails when it fails.
pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn cargo(args: &[&str]) -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.args(args);
    c
}

/// fmt, clippy and tests. Clippy runs with the `cuda` feature so the GPU path is linted and
/// type-checked; tests run on the default CPU backend. Both use the dev profile.
///
/// Where the system has MPI (`.ci/run` installs OpenMPI), clippy and the tests also turn on
/// `ember-cli/mpi` (and with it `ember-distributed/mpi`), so that the MPI process group and
/// `ember launch` are linted and their multi-process tests
/// run; elsewhere they are left out, and the rest runs with the Rust toolchain alone.
fn ci() -> Result<()> {
    let mpi = has_mpi();
    let clippy_features = match mpi {
        true => "ember/cuda,ember-cli/mpi",
        false => "ember/cuda",
    };
    run(&mut cargo(&["fmt", "--all", "--", "--check"]))?;
    run(&mut cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--features",
        clippy_features,
        "--",
        "-D",
        "warnings",
    ]))?;
    let mut test = cargo(&["test", "--workspace"]);
    if mpi {
        test.args(["--features", "ember-cli/mpi"]);
    }
    run(&mut test)?;
    // Benches once each in test mode: they must build and run, timing is `cargo xtask bench`'s.
    // The same features as the tests, so that nothing is built twice.
    let mut benches = cargo(&["test", "--workspace", "--benches"]);
    if mpi {
        benches.args(["--features", "ember-cli/mpi"]);
    }
    run(&mut benches)?;
    Ok(())
}

/// Whether an MPI implementation is installed (OpenMPI's `mpicc --showme:version`, which the
/// `mpi` crate's build also asks), saying so either way.
fn has_mpi() -> bool {
    let found = Command::new("mpicc")
        .arg("--showme:version")
        .output()
        .is_ok_and(|o| o.status.success());
    match found {
        true => {
            eprintln!("MPI found: building and testing with ember-cli/mpi (ember-distributed/mpi)")
        }
        false => eprintln!(
            "no MPI (mpicc) found: ember-distributed's `mpi` feature and its tests are left out \
             (Debian: apt-get install libopenmpi-dev openmpi-bin libclang-dev pkg-config)"
        ),
    }
    found
}

/// The reference Python: `EMBER_PYTHON`, else the venv `../shared/tools/pyref-venv` makes
/// (created on first use when the tool is present), else `None`.
pub(crate) fn reference_python(root: &Path) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("EMBER_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let tool = root.join("../shared/tools/pyref-venv");
    if tool.is_file() {
        let out = Command::new(&tool).output().ok()?;
        if out.status.success() {
            let path = String::from_utf8(out.stdout).ok()?.trim().to_owned();
            return Some(PathBuf::from(path));
        }
        eprintln!(
            "pyref-venv failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    None
}

/// Every `tests/fixtures/*/make_*fixtures.py`, run with the reference Python.
fn fixtures(root: &Path) -> Result<()> {
    let Some(python) = reference_python(root) else {
        bail!("no reference Python: set EMBER_PYTHON or provide ../shared/tools/pyref-venv");
    };
    let shared = root.join("../shared");
    let mut scripts = Vec::new();
    for dir in std::fs::read_dir(root.join("tests/fixtures"))? {
        let dir = dir?.path();
        if !dir.is_dir() {
            continue;
        }
        for file in std::fs::read_dir(&dir)? {
            let script = file?.path();
            let name = script.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with("make_") && name.ends_with("fixtures.py") {
                scripts.push(script);
            }
        }
    }
    scripts.sort();
    for script in scripts {
        run(Command::new(&python)
            .arg(&script)
            .arg("--shared")
            .arg(&shared))?;
    }
    Ok(())
}
