//! Running the `ember` binary from the CLI tests.
#![allow(dead_code)]

use std::io::Write;
use std::path::Path;
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
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
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
