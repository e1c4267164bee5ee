//! [`ProcessGroup`]: the collective operations every parallel strategy is built from, as
//! torch.distributed names them, over `f32` buffers.

use crate::error::Result;
use std::sync::Arc;

/// How [`ProcessGroup::all_reduce`] and [`ProcessGroup::reduce_scatter`] combine the ranks'
/// values (torch's `ReduceOp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// The sum over ranks.
    Sum,
    /// The mean over ranks (the sum divided by the group size, as DDP averages gradients).
    Avg,
    /// The largest value.
    Max,
}

impl ReduceOp {
    /// Folds `other` into `acc` element by element.
    pub(crate) fn fold(self, acc: &mut [f32], other: &[f32]) {
        match self {
            ReduceOp::Sum | ReduceOp::Avg => acc.iter_mut().zip(other).for_each(|(a, b)| *a += b),
            ReduceOp::Max => acc.iter_mut().zip(other).for_each(|(a, b)| *a = a.max(*b)),
        }
    }

    /// Applies what is left after folding `size` ranks' values (the division of `Avg`).
    pub(crate) fn finish(self, acc: &mut [f32], size: usize) {
        if self == ReduceOp::Avg {
            let inv = 1.0 / size as f32;
            acc.iter_mut().for_each(|a| *a *= inv);
        }
    }
}

/// A group of ranks that run the same program and call the same collective operations in the
/// same order (torch.distributed's process group, MPI's communicator).
///
/// Every rank of the group must call a collective, with buffers of the same length; a rank
/// that fails makes the others' calls return [`DistributedError::RankFailed`] and a rank that
/// never comes makes them return [`DistributedError::Timeout`], never hang.
///
/// The results are the same on every rank and do not depend on the order in which ranks
/// arrive: reductions add the ranks' values in rank order.
///
/// [`DistributedError::RankFailed`]: crate::DistributedError::RankFailed
/// [`DistributedError::Timeout`]: crate::DistributedError::Timeout
pub trait ProcessGroup: Send + Sync {
    /// This process's rank, `0..size()`.
    fn rank(&self) -> usize;

    /// The number of ranks (torch's `world_size` for the global group).
    fn size(&self) -> usize;

    /// Replaces `values` on every rank by their reduction over ranks.
    fn all_reduce(&self, values: &mut [f32], op: ReduceOp) -> Result<()>;

    /// Replaces `values` on every rank by those of rank `root`.
    fn broadcast(&self, values: &mut [f32], root: usize) -> Result<()>;

    /// [`broadcast`](Self::broadcast) of bytes whose length only `root` knows (a serialized
    /// state, a file name): the others' `bytes` are replaced, length included.
    fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()>;

    /// Every rank's `values`, concatenated in rank order (each rank gives the same length).
    fn all_gather(&self, values: &[f32]) -> Result<Vec<f32>>;

    /// The reduction over ranks of `values`, cut in `size()` equal parts: rank `r` gets part
    /// `r`. The length must be a multiple of the group size.
    fn reduce_scatter(&self, values: &[f32], op: ReduceOp) -> Result<Vec<f32>>;

    /// Sends `values` to rank `dst`, which receives them with [`recv`](Self::recv). Messages
    /// between two ranks arrive in the order they were sent.
    fn send(&self, values: &[f32], dst: usize) -> Result<()>;

    /// Receives into `values` the next message from rank `src`, which must be as long.
    fn recv(&self, values: &mut [f32], src: usize) -> Result<()>;

    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;

    /// Splits the group (MPI's `Comm_split`): ranks that pass the same `color` form a new
    /// group, ranked by `key` (ties by their rank here). Every rank must call it.
    fn split(&self, color: usize, key: usize) -> Result<Arc<dyn ProcessGroup>>;
}

/// The group of one process: every collective returns its input. What a program that is not
/// launched in parallel runs with, so that the same code serves one process and many.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl ProcessGroup for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn size(&self) -> usize {
        1
    }

    fn all_reduce(&self, _values: &mut [f32], _op: ReduceOp) -> Result<()> {
        Ok(())
    }

    fn broadcast(&self, _values: &mut [f32], root: usize) -> Result<()> {
        check_rank("broadcast", root, 1)
    }

    fn broadcast_bytes(&self, _bytes: &mut Vec<u8>, root: usize) -> Result<()> {
        check_rank("broadcast_bytes", root, 1)
    }

    fn all_gather(&self, values: &[f32]) -> Result<Vec<f32>> {
        Ok(values.to_vec())
    }

    fn reduce_scatter(&self, values: &[f32], _op: ReduceOp) -> Result<Vec<f32>> {
        Ok(values.to_vec())
    }

    fn send(&self, _values: &[f32], dst: usize) -> Result<()> {
        Err(crate::DistributedError::InvalidArgument {
            op: "send",
            message: format!("rank {dst}: a group of one process has no other rank"),
        })
    }

    fn recv(&self, _values: &mut [f32], src: usize) -> Result<()> {
        Err(crate::DistributedError::InvalidArgument {
            op: "recv",
            message: format!("rank {src}: a group of one process has no other rank"),
        })
    }

    fn barrier(&self) -> Result<()> {
        Ok(())
    }

    fn split(&self, _color: usize, _key: usize) -> Result<Arc<dyn ProcessGroup>> {
        Ok(Arc::new(SingleProcess))
    }
}

/// `Ok` when `rank` is a rank of a group of `size`, else the error naming it.
pub(crate) fn check_rank(op: &'static str, rank: usize, size: usize) -> Result<()> {
    if rank < size {
        Ok(())
    } else {
        Err(crate::DistributedError::InvalidArgument {
            op,
            message: format!("rank {rank} is not in a group of {size}"),
        })
    }
}
