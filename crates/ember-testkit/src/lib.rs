//! Test support shared by Ember's crates (not published): where `../shared`, the SmolLM2 folder
//! and the pinned reference Python are. Each finder returns `None` after printing a `SKIP:` line
//! when what it looks for is absent, so that a test skips saying why.

pub mod hub_server;

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

/// Taken by [`random_generator_lock`].
static RANDOM_GENERATOR: Mutex<()> = Mutex::new(());

/// Hold while seeding burn's random generator and drawing from it: building a seeded model and
/// reading every parameter (burn initialises them lazily), or training with dropout.
///
/// burn's CPU backends keep one generator per process (as torch does), and `cargo test` runs a
/// binary's tests on several threads: a test that seeds it while another test draws gets some
/// of the other's numbers, so other weights or dropout masks on each run. A test whose bound
/// was measured on one seeded model failed that way in CI.
pub fn random_generator_lock() -> MutexGuard<'static, ()> {
    // A test that panicked while holding it left the generator as usable as before.
    RANDOM_GENERATOR
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The workspace root (this crate sits in `crates/ember-testkit`).
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `../shared` beside the checkout, or `EMBER_SHARED`.
pub fn shared_dir() -> PathBuf {
    std::env::var_os("EMBER_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("../shared"))
}

/// `relative` inside `../shared` (`models/all-MiniLM-L6-v2`, `data/chnsenticorp`, ...), or
/// `None` with a `SKIP:` line when it is absent.
pub fn shared(relative: &str) -> Option<PathBuf> {
    let path = shared_dir().join(relative);
    if path.exists() {
        Some(path)
    } else {
        eprintln!("SKIP: {} is absent", path.display());
        None
    }
}

/// The real all-MiniLM-L6-v2 folder in `../shared/models`.
pub fn minilm() -> Option<PathBuf> {
    shared("models/all-MiniLM-L6-v2")
}

/// The SmolLM2-135M-Instruct folder `../shared/tools/make-smollm2` builds (`EMBER_SMOLLM2`,
/// else `~/.cache/ember/models/SmolLM2-135M-Instruct`), complete with weights and tokenizer.
pub fn smollm2() -> Option<PathBuf> {
    let dir = std::env::var_os("EMBER_SMOLLM2")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/ember/models/SmolLM2-135M-Instruct"))
        });
    match dir {
        Some(dir)
            if dir.join("model.safetensors").is_file() && dir.join("tokenizer.json").is_file() =>
        {
            Some(dir)
        }
        dir => {
            eprintln!(
                "SKIP: no SmolLM2-135M-Instruct at {} (run ../shared/tools/make-smollm2)",
                dir.unwrap_or_default().display()
            );
            None
        }
    }
}

/// The pinned reference Python: `EMBER_PYTHON`, or the venv `../shared/tools/pyref-venv`
/// makes (`~/.cache/ember/pyref-venv`).
pub fn reference_python() -> Option<PathBuf> {
    let candidate = std::env::var_os("EMBER_PYTHON")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/ember/pyref-venv/bin/python"))
        });
    match candidate {
        Some(p) if p.is_file() => Some(p),
        _ => {
            eprintln!(
                "SKIP: no reference Python (set EMBER_PYTHON or run ../shared/tools/pyref-venv)"
            );
            None
        }
    }
}
