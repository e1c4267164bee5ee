//! A rank of `ember launch --nproc-per-node 2 -- train ...` killed (SIGKILL) once a checkpoint
//! is on disk: the whole job must end within 10 s with a non-zero status and say why on
//! stderr, and `--resume-from-checkpoint latest` must then finish with the weights of an
//! uninterrupted launch. The demo model trains with dropout, so this also checks that each
//! rank's random state (`rng_state_{rank}.json`) is saved and restored.
#![cfg(feature = "mpi")]

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn ember(args: &[String], cwd: &Path) -> (bool, String, String) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    common::ember_in(&args, Some(cwd), "")
}

/// `ember launch --nproc-per-node 2 -- train ... --args NAME.json EXTRA`.
fn launch(name: &str, extra: &[&str]) -> Vec<String> {
    [
        "launch",
        "--nproc-per-node",
        "2",
        "--timeout",
        "600",
        "--",
        "train",
        "--model",
        "ember-demo",
        "--data",
        "reviews.csv",
        "--args",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("{name}.json")])
    .chain(extra.iter().map(|s| s.to_string()))
    .collect()
}

fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`: the command may hold spaces, so read after its `)`.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The process of rank `rank` started under `ancestor` (this test's `ember launch`): the one
/// whose environment holds the launcher's `OMPI_COMM_WORLD_RANK=rank` and whose parents lead
/// to `ancestor`, so that other jobs on the machine are never touched.
fn rank_pid(ancestor: u32, rank: usize) -> Option<u32> {
    let wanted = format!("OMPI_COMM_WORLD_RANK={rank}");
    std::fs::read_dir("/proc").ok()?.find_map(|entry| {
        let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
        let has = environ
            .split(|b| *b == 0)
            .any(|var| var == wanted.as_bytes());
        let mut p = pid;
        let under = has
            && std::iter::from_fn(|| {
                p = parent(p)?;
                Some(p)
            })
            .take(16)
            .any(|p| p == ancestor);
        under.then_some(pid)
    })
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

fn newest_checkpoint(dir: &Path) -> Option<usize> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_prefix("checkpoint-")?
                .parse()
                .ok()
        })
        .max()
}

fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Ends the child on an assertion failure, so that a failing test leaves no job behind.
struct Job(Child);

impl Drop for Job {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn a_killed_rank_ends_the_job_and_the_resumed_run_ends_as_an_uninterrupted_one() {
    if Command::new("mpirun").arg("--version").output().is_err() {
        eprintln!("skipped: no `mpirun` (OpenMPI's openmpi-bin) on this machine");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (ok, _, stderr) = common::ember_in(&["train"], Some(tmp.path()), "");
    assert!(ok, "{stderr}");
    // 400 rows, a tenth held out: 360 to train on, 45 batches of 4 per rank and epoch.
    common::write_reviews_csv(&tmp.path().join("reviews.csv"), 400);
    for name in ["whole", "killed"] {
        let args = serde_json::json!({
            "output_dir": name, "num_train_epochs": 3, "per_device_train_batch_size": 4,
            "learning_rate": 1e-3, "save_steps": 10, "logging_steps": 10,
            "disable_tqdm": true, "seed": 7
        });
        std::fs::write(tmp.path().join(format!("{name}.json")), args.to_string()).unwrap();
    }
    let (ok, _, stderr) = ember(&launch("whole", &[]), tmp.path());
    assert!(ok, "{stderr}");

    // The same job, killed in rank 1 as soon as its first checkpoint is on disk.
    let mut job = Job(Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(launch("killed", &[]))
        .current_dir(tmp.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap());
    let mut pipe = job.0.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    });
    let first = tmp.path().join("killed/checkpoint-10");
    let started = Instant::now();
    while !first.is_dir() {
        assert!(
            job.0.try_wait().unwrap().is_none(),
            "the job ended before its first checkpoint"
        );
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no checkpoint"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let launcher = job.0.id();
    let (rank0, rank1) = (rank_pid(launcher, 0), rank_pid(launcher, 1));
    let (rank0, rank1) = (
        rank0.expect("rank 0's process"),
        rank1.expect("rank 1's process"),
    );
    let status = Command::new("kill")
        .args(["-KILL", &rank1.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let killed = Instant::now();
    let status = loop {
        if let Some(status) = job.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "the job still runs 10 s after rank 1 was killed"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let to_end = killed.elapsed();
    let stderr = reader.join().unwrap();
    eprintln!(
        "the job ended {:.2} s after rank 1 was killed",
        to_end.as_secs_f64()
    );
    assert!(!status.success(), "{stderr}");
    assert!(!alive(rank0), "rank 0 ({rank0}) outlived the job");
    // mpirun names the rank and the signal; ember launch says what to do next.
    assert!(
        stderr.contains("rank 1") && stderr.contains("signal 9"),
        "{stderr}"
    );
    assert!(
        stderr.contains("a rank failed or was killed")
            && stderr.contains("--resume-from-checkpoint"),
        "{stderr}"
    );
    assert!(!tmp.path().join("killed/model.safetensors").exists());

    // Resume from the newest complete checkpoint (a half-written one has a temporary name).
    let newest = newest_checkpoint(&tmp.path().join("killed")).unwrap();
    let checkpoint: PathBuf = tmp.path().join(format!("killed/checkpoint-{newest}"));
    for rank in 0..2 {
        let rng = checkpoint.join(format!("rng_state_{rank}.json"));
        assert!(rng.is_file(), "{}", rng.display());
    }
    let (ok, _, stderr) = ember(
        &launch("killed", &["--resume-from-checkpoint", "latest"]),
        tmp.path(),
    );
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains(&format!("checkpoint-{newest}")),
        "resumed from the newest checkpoint: {stderr}"
    );
    let read = |dir: &str| std::fs::read(tmp.path().join(dir).join("model.safetensors")).unwrap();
    let (a, b) = (read("whole"), read("killed"));
    let (a, b) = (
        safetensors::SafeTensors::deserialize(&a).unwrap(),
        safetensors::SafeTensors::deserialize(&b).unwrap(),
    );
    let mut worst = 0.0f32;
    for (name, tensor) in a.tensors() {
        let other = b.tensor(&name).unwrap();
        let diff = floats(tensor.data())
            .iter()
            .zip(floats(other.data()))
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        worst = worst.max(diff);
        assert!(
            diff <= 1e-6,
            "resumed from checkpoint-{newest}: {name} differs by {diff}"
        );
    }
    eprintln!("resumed from checkpoint-{newest}: largest weight difference {worst:e}");
}
