//! `ember launch`: runs an `ember` subcommand on several processes under `mpirun`, as
//! `accelerate launch` / `torchrun` do for a Python script; and how a subcommand finds the
//! process group it was launched into.

use anyhow::{bail, Context, Result};
use clap::Args;
use ember::distributed::ProcessGroup;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

/// `ember launch --nproc-per-node N [--nnodes M --hostfile F] [--timeout S] -- <subcommand>`.
#[derive(Args, Debug)]
pub struct LaunchArgs {
    /// Processes (ranks) per machine (torchrun's `--nproc-per-node`).
    #[arg(long, default_value_t = 1)]
    nproc_per_node: usize,
    /// Machines (torchrun's `--nnodes`); more than one needs `--hostfile`, whose machines MPI
    /// starts the ranks on from this one.
    #[arg(long, default_value_t = 1)]
    nnodes: usize,
    /// MPI's hostfile: one machine per line (`node1 slots=2`).
    #[arg(long)]
    hostfile: Option<PathBuf>,
    /// Seconds after which `mpirun` ends the whole job (a rank that hangs never hangs the job).
    #[arg(long, default_value_t = 24 * 3600)]
    timeout: u64,
    /// The `mpirun` to use.
    #[arg(long, default_value = "mpirun")]
    mpirun: PathBuf,
    /// Print the `mpirun` command instead of running it.
    #[arg(long)]
    dry_run: bool,
    /// The `ember` subcommand and its arguments, after `--`.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// The `mpirun` command line for `args`: `-n` ranks of this `ember`, each with its share of the
/// machine's cores for its threads; on one machine the shared-memory transport and loopback
/// only, so that nothing listens beyond this machine.
fn mpirun_command(args: &LaunchArgs) -> Result<Command> {
    if args.nproc_per_node == 0 || args.nnodes == 0 {
        bail!("--nproc-per-node and --nnodes must be at least 1");
    }
    if args.nnodes > 1 && args.hostfile.is_none() {
        bail!(
            "--nnodes {} needs --hostfile: MPI starts every machine's ranks from this one",
            args.nnodes
        );
    }
    let ranks = args.nproc_per_node * args.nnodes;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / args.nproc_per_node).max(1);
    let exe = std::env::current_exe().context("finding this ember binary")?;
    let mut cmd = Command::new(&args.mpirun);
    if is_root() {
        cmd.arg("--allow-run-as-root");
    }
    cmd.args(["--timeout", &args.timeout.to_string()]);
    cmd.args(["-n", &ranks.to_string()]);
    // Each rank runs its own thread pool: no binding to one core.
    cmd.args(["--bind-to", "none"]);
    match &args.hostfile {
        Some(hostfile) => {
            cmd.arg("--hostfile").arg(hostfile);
            cmd.args(["--npernode", &args.nproc_per_node.to_string()]);
        }
        None => {
            cmd.args(["--oversubscribe"]);
            cmd.args([
                "--mca",
                "btl",
                "self,vader",
                "--mca",
                "oob_tcp_if_include",
                "lo",
            ]);
        }
    }
    cmd.args(["-x", &format!("RAYON_NUM_THREADS={threads}")]);
    cmd.arg(exe).args(&args.command);
    Ok(cmd)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            == Some("0")
    })
}

/// `ember launch`: runs `mpirun` and ends with its status.
pub fn run(args: LaunchArgs) -> Result<()> {
    let mut cmd = mpirun_command(&args)?;
    if args.dry_run {
        let words: Vec<String> = std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|w| w.to_string_lossy().into_owned())
            .collect();
        println!("{}", words.join(" "));
        return Ok(());
    }
    let status = cmd.status().with_context(|| {
        format!(
            "starting {} (OpenMPI's openmpi-bin; Debian: apt-get install openmpi-bin)",
            args.mpirun.display()
        )
    })?;
    match status.code() {
        Some(0) => Ok(()),
        // mpirun has already printed which rank ended how; this line says what to do next.
        Some(code) => bail!(
            "the job ended with status {code} (mpirun): a rank failed or was killed, and mpirun \
             ended the others (see its message above); `ember train --resume-from-checkpoint \
             latest` continues from the last checkpoint"
        ),
        None => bail!("mpirun was killed ({status})"),
    }
}

/// The rank and size the launcher gave this process: OpenMPI's `OMPI_COMM_WORLD_*`, or PMI's
/// (Slurm's `srun --mpi=pmix`, MPICH); `None` when not launched.
fn launched_rank_and_size() -> Option<(usize, usize)> {
    let var = |name: &str| std::env::var(name).ok()?.parse::<usize>().ok();
    [
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("PMIX_RANK", "PMI_SIZE"),
        ("PMI_RANK", "PMI_SIZE"),
    ]
    .iter()
    .find_map(|(rank, size)| Some((var(rank)?, var(size)?)))
}

/// Whether this process prints results and writes the final model: rank 0, or a process that
/// was not launched.
pub(crate) fn is_main_process() -> bool {
    launched_rank_and_size().is_none_or(|(rank, _)| rank == 0)
}

/// The world group this process was launched into (`ember launch`, `mpirun`, `srun`), or
/// `None` for a single process. Call it once: it initialises MPI, which is finalised when the
/// group is dropped.
pub(crate) fn launched_group() -> Result<Option<Arc<dyn ProcessGroup>>> {
    let Some((_, size)) = launched_rank_and_size() else {
        return Ok(None);
    };
    if size < 2 {
        return Ok(None);
    }
    #[cfg(feature = "mpi")]
    {
        let group = ember::distributed::MpiGroup::init()?;
        Ok(Some(Arc::new(group)))
    }
    #[cfg(not(feature = "mpi"))]
    bail!(
        "launched as one of {size} processes, but this ember was built without MPI: build it \
         with `--features mpi` (which needs OpenMPI's libopenmpi-dev)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        launch: LaunchArgs,
    }

    fn command(args: &[&str]) -> Result<Vec<String>> {
        let cli = Cli::try_parse_from([&["ember-launch"], args].concat())?;
        let cmd = mpirun_command(&cli.launch)?;
        Ok(cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect())
    }

    #[test]
    fn one_machine_keeps_to_shared_memory_and_loopback_with_a_timeout() {
        let args = command(&["--nproc-per-node", "2", "--", "train", "--data", "x.csv"]).unwrap();
        let line = args.join(" ");
        assert!(
            line.contains("--timeout 86400 -n 2 --bind-to none"),
            "{line}"
        );
        assert!(
            line.contains("--mca btl self,vader --mca oob_tcp_if_include lo"),
            "{line}"
        );
        assert!(line.ends_with("train --data x.csv"), "{line}");
    }

    #[test]
    fn several_machines_need_a_hostfile_and_leave_the_network_to_it() {
        let e = command(&["--nnodes", "2", "--", "train"]).unwrap_err();
        assert!(e.to_string().contains("needs --hostfile"), "{e}");
        let args = command(&[
            "--nnodes",
            "2",
            "--nproc-per-node",
            "4",
            "--hostfile",
            "hosts",
            "--",
            "train",
        ])
        .unwrap();
        let line = args.join(" ");
        assert!(line.contains("-n 8"), "{line}");
        assert!(line.contains("--hostfile hosts --npernode 4"), "{line}");
        assert!(!line.contains("oob_tcp_if_include"), "{line}");
    }
}
