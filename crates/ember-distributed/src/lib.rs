//! Distributed training for burn, in torch.distributed's terms.
//!
//! * [`ProcessGroup`]: rank, size and the collective operations (all-reduce, broadcast,
//!   all-gather, reduce-scatter, send / recv, barrier, split) that every strategy is built
//!   from. [`ThreadGroup`] runs one rank per thread of one process (tests, and data parallel
//!   on one machine with the Rust toolchain alone); `MpiGroup` (feature `mpi`) runs one rank
//!   per process under `mpirun` / `srun`; `NcclGroup` (feature `nccl`) one rank per CUDA
//!   device; [`SingleProcess`] is the group of one.
//! * [`DataParallel`]: torch DDP over a burn module: rank 0's weights broadcast, gradients
//!   averaged in buckets.
//! * [`TensorParallel`], [`ColumnParallelLinear`], [`RowParallelLinear`]: Megatron's split of
//!   a layer's parameters over ranks, forward and backward.
//! * [`DeviceMesh`]: the ranks as `data × pipeline × tensor` parallel, a group per axis.
//! * [`PipelineParallel`]: GPipe and 1F1B pipeline parallel: ranks hold consecutive stages of
//!   a model ([`PipelineStage`]), micro-batches' activations and gradients pass between them.
//!
//! A failed or missing rank makes the others' operations return a [`DistributedError`] within
//! the group's timeout: a job never hangs silently.
//!
//! ```
//! use ember_distributed::{ProcessGroup, ReduceOp, ThreadGroup};
//! let gathered = ThreadGroup::run(2, |group| group.all_gather(&[group.rank() as f32]).unwrap());
//! assert_eq!(gathered, vec![vec![0.0, 1.0], vec![0.0, 1.0]]);
//! ```

mod ddp;
mod error;
mod group;
mod mesh;
#[cfg(feature = "mpi")]
mod mpi_group;
#[cfg(feature = "nccl")]
mod nccl_group;
mod pipeline;
mod tensor_parallel;
mod threads;

pub use ddp::{DataParallel, DEFAULT_BUCKET_CAP_MB, IN_PLACE_MIN_VALUES};
pub use error::{DistributedError, Result};
pub use group::{ProcessGroup, ReduceOp, SingleProcess};
pub use mesh::{DeviceMesh, MeshCoords, MeshShape};
#[cfg(feature = "mpi")]
pub use mpi_group::MpiGroup;
#[cfg(feature = "nccl")]
pub use nccl_group::NcclGroup;
pub use pipeline::{
    PipelineParallel, PipelineStage, PipelineStep, PipelineStepOutput, Schedule, StageOutput,
};
pub use tensor_parallel::{ColumnParallelLinear, RowParallelLinear, TensorParallel};
pub use threads::{ThreadGroup, DEFAULT_TIMEOUT};
