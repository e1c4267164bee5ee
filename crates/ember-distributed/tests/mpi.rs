//! The MPI process group across real processes: each test runs this test binary again under
//! `mpirun -n N`, filtered to itself, and judges the job by its status and output.
#![cfg(feature = "mpi")]

use ember_distributed::{DistributedError, MpiGroup, ProcessGroup, ReduceOp};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Set in the ranks' environment: the test body runs as a rank instead of launching.
const RANK: &str = "EMBER_MPI_TEST_RANK";

/// `mpirun -n ranks` of this binary's test `name`, on shared memory and loopback only, as root
/// where the tests run as root, ended by MPI after `timeout`.
fn mpirun(ranks: usize, name: &str, timeout: Duration) -> Output {
    Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe"])
        .args([
            "--mca",
            "btl",
            "self,vader",
            "--mca",
            "oob_tcp_if_include",
            "lo",
        ])
        .args(["--timeout", &timeout.as_secs().to_string()])
        .args(["-n", &ranks.to_string()])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads", "1"])
        .env(RANK, "1")
        .output()
        .expect("mpirun (OpenMPI's openmpi-bin) is installed where the `mpi` feature is on")
}

fn is_rank() -> bool {
    std::env::var_os(RANK).is_some()
}

fn values(rank: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| (rank * 100 + i) as f32).collect()
}

#[test]
fn collectives_across_three_processes() {
    if !is_rank() {
        let out = mpirun(
            3,
            "collectives_across_three_processes",
            Duration::from_secs(120),
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for rank in 0..3 {
            assert!(
                stdout.contains(&format!("rank {rank} of 3: ok")),
                "{stdout}"
            );
        }
        return;
    }
    let group = MpiGroup::init().unwrap();
    let (r, size) = (group.rank(), group.size());
    assert_eq!(size, 3);
    let mut sum = values(r, 5);
    group.all_reduce(&mut sum, ReduceOp::Sum).unwrap();
    assert_eq!(
        sum,
        (0..5).map(|i| (300 + 3 * i) as f32).collect::<Vec<_>>()
    );
    let mut avg = values(r, 5);
    group.all_reduce(&mut avg, ReduceOp::Avg).unwrap();
    assert_eq!(avg, (0..5).map(|i| (100 + i) as f32).collect::<Vec<_>>());
    let mut max = values(r, 2);
    group.all_reduce(&mut max, ReduceOp::Max).unwrap();
    assert_eq!(max, values(2, 2));
    let mut b = values(r, 4);
    group.broadcast(&mut b, 1).unwrap();
    assert_eq!(b, values(1, 4));
    let mut bytes = vec![r as u8; 1 + 2 * r];
    group.broadcast_bytes(&mut bytes, 2).unwrap();
    assert_eq!(bytes, vec![2u8; 5]);
    let gathered = group.all_gather(&values(r, 2)).unwrap();
    assert_eq!(
        gathered,
        [values(0, 2), values(1, 2), values(2, 2)].concat()
    );
    let part = group.reduce_scatter(&values(r, 6), ReduceOp::Sum).unwrap();
    assert_eq!(
        part,
        (2 * r..2 * r + 2)
            .map(|i| (300 + 3 * i) as f32)
            .collect::<Vec<_>>()
    );
    // A ring of messages: each rank sends to the next, then receives from the previous.
    group.send(&values(r, 3), (r + 1) % 3).unwrap();
    let mut got = vec![0.0; 3];
    group.recv(&mut got, (r + 2) % 3).unwrap();
    assert_eq!(got, values((r + 2) % 3, 3));
    // A message longer than the buffer is an error, and the next message still arrives.
    if r == 0 {
        group.send(&[1.0; 4], 1).unwrap();
        group.send(&[2.0; 2], 1).unwrap();
    } else if r == 1 {
        let mut short = [0.0; 2];
        let e = group.recv(&mut short, 0).unwrap_err();
        assert!(
            matches!(e, DistributedError::InvalidArgument { op: "recv", .. }),
            "{e}"
        );
        group.recv(&mut short, 0).unwrap();
        assert_eq!(short, [2.0; 2]);
    }
    // Lengths that differ between ranks are an error on every rank, not MPI's abort.
    let mut uneven = vec![0.0; 1 + r];
    let e = group.all_reduce(&mut uneven, ReduceOp::Sum).unwrap_err();
    assert!(e.to_string().contains("between 1 and 3 values"), "{e}");
    // Split by parity, keys reversing the order.
    let sub = group.split(r % 2, 10 - r).unwrap();
    let members = sub.all_gather(&[r as f32]).unwrap();
    let expect: &[f32] = if r % 2 == 0 { &[2.0, 0.0] } else { &[1.0] };
    assert_eq!(members, expect);
    group.barrier().unwrap();
    drop(sub);
    println!("rank {r} of {size}: ok");
}

#[test]
fn a_rank_that_dies_ends_the_job_within_seconds() {
    if !is_rank() {
        let start = Instant::now();
        let out = mpirun(
            2,
            "a_rank_that_dies_ends_the_job_within_seconds",
            Duration::from_secs(60),
        );
        let elapsed = start.elapsed();
        assert!(
            !out.status.success(),
            "the job ended well although a rank died"
        );
        assert!(
            elapsed < Duration::from_secs(10),
            "the job took {elapsed:?} to end"
        );
        return;
    }
    let group = MpiGroup::init().unwrap();
    if group.rank() == 1 {
        // Dies before the all-reduce rank 0 waits in.
        std::process::exit(3);
    }
    let mut v = [1.0f32];
    let _ = group.all_reduce(&mut v, ReduceOp::Sum);
    // Not reached: MPI ends this rank when the other dies.
    std::thread::sleep(Duration::from_secs(60));
}
