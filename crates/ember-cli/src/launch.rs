//! `ember launch`: runs an `ember` subcommand on several processes under `mpirun`, as
//! `accelerate launch` / `torchrun` do for a Python script; and how a subcommand finds the
//! process group it was launched into.

use anyhow::{bail, Context, Result};
use clap::Args;
use ember::burn::module::AutodiffModule;
use ember::distributed::{DeviceMesh, ProcessGroup, TensorParallel};
use ember::models::{AnyCausalLm, BertForSequenceClassification};
use ember::prelude::{BackendTrait, TrainBackend};
use ember::train::{TrainableModel, Trainer};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

/// The environment variable that carries `ember launch --tp` to the ranks.
pub const TENSOR_PARALLEL_ENV: &str = "EMBER_TENSOR_PARALLEL";

/// A launch that cannot be arranged as asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaunchError {
    /// `--tp` (or `EMBER_TENSOR_PARALLEL`) does not divide the number of ranks: every replica
    /// needs `tp` ranks.
    TensorParallel {
        /// The ranks of the job.
        ranks: usize,
        /// The tensor-parallel size asked for.
        tp: usize,
    },
    /// `EMBER_TENSOR_PARALLEL` is not a positive whole number.
    TensorParallelValue(String),
}

impl std::fmt::Display for LaunchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TensorParallel { ranks, tp } => write!(
                f,
                "--tp {tp} does not divide the {ranks} ranks (--nproc-per-node x --nnodes): \
                 the ranks form replicas of {tp} tensor-parallel slices each"
            ),
            Self::TensorParallelValue(value) => write!(
                f,
                "{TENSOR_PARALLEL_ENV}={value:?} is not a tensor-parallel size (a whole number \
                 of at least 1)"
            ),
        }
    }
}

impl std::error::Error for LaunchError {}

/// The ranks form replicas of `tp` slices: `tp` must divide them.
fn check_tensor_parallel(ranks: usize, tp: usize) -> Result<(), LaunchError> {
    if tp == 0 || !ranks.is_multiple_of(tp) {
        return Err(LaunchError::TensorParallel { ranks, tp });
    }
    Ok(())
}

/// `ember launch --nproc-per-node N [--nnodes M --hostfile F] [--tp T] [--timeout S] -- <subcommand>`.
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
    /// Tensor-parallel size (Megatron's `--tensor-model-parallel-size`): each model is split
    /// over `T` neighbouring ranks, and the ranks form `ranks / T` data-parallel replicas.
    /// `ember train` (sequence classification of BERT / RoBERTa, `--task causal-lm` of Llama)
    /// splits its model; other subcommands refuse `T > 1`.
    #[arg(long, default_value_t = 1)]
    tp: usize,
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
    check_tensor_parallel(ranks, args.tp)?;
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
    cmd.args(["-x", &format!("{TENSOR_PARALLEL_ENV}={}", args.tp)]);
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
fn launched_group() -> Result<Option<Arc<dyn ProcessGroup>>> {
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

/// The tensor-parallel size `ember launch --tp` gave the ranks (1 when not set).
fn tensor_parallel_size() -> Result<usize, LaunchError> {
    match std::env::var(TENSOR_PARALLEL_ENV) {
        Err(_) => Ok(1),
        Ok(value) => value
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|&tp| tp >= 1)
            .ok_or(LaunchError::TensorParallelValue(value)),
    }
}

/// How this process was launched: alone, as a data-parallel rank, or as a rank of a
/// `data x tensor` mesh (`ember launch --tp T`).
pub(crate) enum Launched {
    /// One process.
    Single,
    /// A rank of a data-parallel job.
    Data(Arc<dyn ProcessGroup>),
    /// A rank of a mesh of `ranks / T` replicas of `T` tensor-parallel slices.
    Tensor(DeviceMesh),
}

/// How this process was launched. Call it once: it initialises MPI (see [`launched_group`]).
/// Under `--tp T` every rank builds the mesh `DeviceMesh::new(world, ranks / T, 1, T)`.
pub(crate) fn launched() -> Result<Launched> {
    let tp = tensor_parallel_size()?;
    let Some(world) = launched_group()? else {
        check_tensor_parallel(1, tp)?;
        return Ok(Launched::Single);
    };
    check_tensor_parallel(world.size(), tp)?;
    if tp == 1 {
        return Ok(Launched::Data(world));
    }
    let data = world.size() / tp;
    Ok(Launched::Tensor(DeviceMesh::new(world, data, 1, tp)?))
}

/// A model `ember train` splits tensor parallel: this rank's slice, and the whole model put
/// back together from every rank's slice.
pub(crate) trait SplitModel: Sized {
    /// This rank's slice over `tp`.
    fn split(self, tp: TensorParallel) -> Result<Self, String>;
    /// The whole model (a collective over the tensor group).
    fn gather(self) -> Result<Self, String>;
}

impl<B: BackendTrait> SplitModel for BertForSequenceClassification<B> {
    fn split(mut self, tp: TensorParallel) -> Result<Self, String> {
        self.base_model = self
            .base_model
            .tensor_parallel(tp)
            .map_err(|e| e.to_string())?;
        Ok(self)
    }

    fn gather(mut self) -> Result<Self, String> {
        self.base_model = self
            .base_model
            .gather_tensor_parallel()
            .map_err(|e| e.to_string())?;
        Ok(self)
    }
}

impl<B: BackendTrait> SplitModel for AnyCausalLm<B> {
    fn split(self, tp: TensorParallel) -> Result<Self, String> {
        match self {
            AnyCausalLm::Llama(m) => m
                .tensor_parallel(tp)
                .map(AnyCausalLm::Llama)
                .map_err(|e| e.to_string()),
            other => Err(format!(
                "--tp splits a LlamaForCausalLM, not a {}: launch without --tp to train it \
                 data parallel",
                other.class_name()
            )),
        }
    }

    fn gather(self) -> Result<Self, String> {
        match self {
            AnyCausalLm::Llama(m) => m
                .gather_tensor_parallel()
                .map(AnyCausalLm::Llama)
                .map_err(|e| e.to_string()),
            // Never split (see `split`): already whole.
            other => Ok(other),
        }
    }
}

type Tr<M, C> = Trainer<TrainBackend, M, C>;

impl Launched {
    /// This rank's slice of `model` under `--tp`; the model itself otherwise.
    pub(crate) fn split<M: SplitModel>(&self, model: M) -> Result<M> {
        match self {
            Self::Tensor(mesh) => model
                .split(TensorParallel::new(mesh.tensor_group().clone()))
                .map_err(anyhow::Error::msg),
            _ => Ok(model),
        }
    }

    /// `trainer` (whose model [`Self::split`] gave) set up as launched: data parallel over
    /// the world, or tensor parallel over the mesh with the model's gather and split.
    pub(crate) fn attach<M, C>(self, trainer: Tr<M, C>) -> Result<Tr<M, C>>
    where
        M: SplitModel + TrainableModel<TrainBackend> + AutodiffModule<TrainBackend> + 'static,
        M::InnerModule: TrainableModel<ember::Backend>,
        C: ember::datasets::Collator + Clone + 'static,
    {
        Ok(match self {
            Self::Single => trainer,
            Self::Data(group) => trainer.data_parallel(group),
            Self::Tensor(mesh) => {
                let tp = TensorParallel::new(mesh.tensor_group().clone());
                trainer.tensor_parallel(&mesh, M::gather, move |m| m.split(tp.clone()))?
            }
        })
    }

    /// `trainer` set up for a model `what` that is not split: data parallel over the world,
    /// or under `--tp` an error naming `what`.
    pub(crate) fn attach_unsplit<M, C>(self, trainer: Tr<M, C>, what: &str) -> Result<Tr<M, C>>
    where
        M: TrainableModel<TrainBackend> + AutodiffModule<TrainBackend>,
        M::InnerModule: TrainableModel<ember::Backend>,
        C: ember::datasets::Collator + Clone + 'static,
    {
        Ok(match self {
            Self::Single => trainer,
            Self::Data(group) => trainer.data_parallel(group),
            Self::Tensor(mesh) => bail!(
                "--tp {}: {what} is not split tensor parallel; launch without --tp to train it \
                 data parallel",
                mesh.shape().tensor
            ),
        })
    }
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

    #[test]
    fn tensor_parallel_must_divide_the_ranks_and_reaches_them() {
        let e = command(&["--nproc-per-node", "3", "--tp", "2", "--", "train"]).unwrap_err();
        assert_eq!(
            e.downcast_ref::<LaunchError>(),
            Some(&LaunchError::TensorParallel { ranks: 3, tp: 2 }),
            "{e}"
        );
        assert!(
            e.to_string().contains("--tp 2 does not divide the 3 ranks"),
            "{e}"
        );
        let e = command(&["--nproc-per-node", "2", "--tp", "0", "--", "train"]).unwrap_err();
        assert!(e.to_string().contains("--tp 0"), "{e}");
        let line = command(&[
            "--nnodes",
            "2",
            "--nproc-per-node",
            "2",
            "--hostfile",
            "hosts",
            "--tp",
            "4",
            "--",
            "train",
        ])
        .unwrap()
        .join(" ");
        assert!(line.contains("-n 4"), "{line}");
        assert!(line.contains("-x EMBER_TENSOR_PARALLEL=4"), "{line}");
        let line = command(&["--nproc-per-node", "2", "--", "train"])
            .unwrap()
            .join(" ");
        assert!(line.contains("-x EMBER_TENSOR_PARALLEL=1"), "{line}");
    }

    #[test]
    fn a_tensor_parallel_size_that_is_no_number_is_named() {
        let e = LaunchError::TensorParallelValue("two".into()).to_string();
        assert!(e.contains("EMBER_TENSOR_PARALLEL=\"two\""), "{e}");
        assert_eq!(check_tensor_parallel(4, 2), Ok(()));
        assert_eq!(
            check_tensor_parallel(1, 2),
            Err(LaunchError::TensorParallel { ranks: 1, tp: 2 })
        );
    }
}
