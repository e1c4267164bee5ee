//! [`MpiGroup`]: ranks that are processes started by `mpirun` (or Slurm's `srun`), on one
//! machine or many, over the system's MPI (OpenMPI through rsmpi).

use crate::error::{DistributedError, Result};
use crate::group::{check_rank, ProcessGroup, ReduceOp};
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::raw::AsRaw;
use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::*;
use mpi::Threading;
use std::sync::{Arc, Mutex, MutexGuard};

/// A rank of an MPI communicator.
///
/// [`MpiGroup::init`] initialises MPI and gives the world group: every process `mpirun`
/// started, rank for rank. A program run without `mpirun` is rank 0 of a group of 1 (MPI's
/// singleton), so the same binary serves one process and many. MPI is finalised when the last
/// group made from it is dropped: keep the world group alive until the end of `main`.
///
/// Faults: a rank that dies makes `mpirun` end the others within about a second, with a
/// non-zero status; a rank that lives but never joins is ended by `mpirun --timeout` (which
/// `ember launch` sets). MPI errors abort the job (MPI's default handler); what Ember can check
/// first (buffer lengths that differ between ranks, a rank out of range, a message longer than
/// the buffer) is a [`DistributedError`] instead.
///
/// Sends are MPI's standard mode: a large message may wait until it is received, so two ranks
/// must not both send to each other first.
pub struct MpiGroup {
    comm: Mutex<Comm>,
    rank: usize,
    size: usize,
    // Dropped after `comm`: MPI is finalised only once no communicator is left.
    universe: Arc<Universe>,
}

impl std::fmt::Debug for MpiGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiGroup")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .finish()
    }
}

/// A communicator moved between threads, with the send buffer its all-reduces reuse.
struct Comm(SimpleCommunicator, Vec<f32>);

// SAFETY: MPI is initialised with at least MPI_THREAD_SERIALIZED (checked in `init`), and the
// communicator is only used under `MpiGroup::comm`'s mutex, so no two threads call MPI on it
// at once.
unsafe impl Send for Comm {}

/// MPI counts are C ints: longer buffers go in pieces of this many values.
const MAX_COUNT: usize = 1 << 30;

impl MpiGroup {
    /// Initialises MPI for this process and returns the world group.
    ///
    /// Errors: [`DistributedError::Mpi`] when MPI was already initialised in this process, or
    /// offers less than `MPI_THREAD_SERIALIZED` (collectives are called from whichever thread
    /// trains).
    pub fn init() -> Result<Self> {
        let (universe, level) =
            mpi::initialize_with_threading(Threading::Serialized).ok_or_else(|| {
                DistributedError::Mpi("MPI is already initialised in this process".into())
            })?;
        if level < Threading::Serialized {
            return Err(DistributedError::Mpi(format!(
                "this MPI offers thread level {level:?}, Ember needs Serialized"
            )));
        }
        let world = universe.world();
        Ok(Self::new(world, Arc::new(universe)))
    }

    fn new(comm: SimpleCommunicator, universe: Arc<Universe>) -> Self {
        let (rank, size) = (comm.rank() as usize, comm.size() as usize);
        MpiGroup {
            comm: Mutex::new(Comm(comm, Vec::new())),
            rank,
            size,
            universe,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Comm> {
        self.comm.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks that every rank passes `len` values (one small all-reduce), so that a mismatch is
    /// an error here rather than MPI's abort.
    fn same_length(&self, comm: &SimpleCommunicator, op: &'static str, len: usize) -> Result<()> {
        let mine = [len as i64, -(len as i64)];
        let mut extremes = [0i64; 2];
        comm.all_reduce_into(&mine[..], &mut extremes[..], SystemOperation::max());
        let (longest, shortest) = (extremes[0], -extremes[1]);
        if longest != shortest {
            return Err(DistributedError::InvalidArgument {
                op,
                message: format!(
                    "ranks passed between {shortest} and {longest} values (rank {} passed {len})",
                    self.rank
                ),
            });
        }
        Ok(())
    }
}

/// MPI_IN_PLACE, which rsmpi does not expose and whose value the MPI standard leaves to each
/// implementation: `(void *) 1` in Open MPI, `(void *) -1` in MPICH and its derivatives, read
/// from the library's version string; `None` (copy the input instead) for any other.
fn in_place() -> Option<*const std::ffi::c_void> {
    static SENTINEL: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let value = *SENTINEL.get_or_init(|| {
        let version = mpi::environment::library_version().ok()?;
        if version.contains("Open MPI") {
            Some(1)
        } else if version.contains("MPICH") {
            Some(usize::MAX)
        } else {
            None
        }
    });
    value.map(|v| v as *const std::ffi::c_void)
}

fn system_op(op: ReduceOp) -> SystemOperation {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => SystemOperation::sum(),
        ReduceOp::Max => SystemOperation::max(),
    }
}

impl ProcessGroup for MpiGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce(&self, values: &mut [f32], op: ReduceOp) -> Result<()> {
        let mut comm = self.lock();
        self.same_length(&comm.0, "all_reduce", values.len())?;
        let Comm(world, send) = &mut *comm;
        for piece in values.chunks_mut(MAX_COUNT) {
            match in_place() {
                // SAFETY: `in_place` is this MPI's own MPI_IN_PLACE; `piece` holds `len` f32
                // values (len ≤ MAX_COUNT fits a C int), read and written by the call alone;
                // the datatype, operation and communicator are valid handles.
                Some(in_place) => unsafe {
                    mpi::ffi::MPI_Allreduce(
                        in_place,
                        piece.as_mut_ptr().cast(),
                        piece.len() as i32,
                        mpi::ffi::RSMPI_FLOAT,
                        system_op(op).as_raw(),
                        world.as_raw(),
                    );
                },
                // Elsewhere the input is copied into a buffer kept from call to call, so that
                // the copy does not fault fresh pages in every time.
                None => {
                    send.clear();
                    send.extend_from_slice(piece);
                    world.all_reduce_into(&send[..], piece, system_op(op));
                }
            }
        }
        op.finish(values, self.size);
        Ok(())
    }

    fn broadcast(&self, values: &mut [f32], root: usize) -> Result<()> {
        check_rank("broadcast", root, self.size)?;
        let comm = self.lock();
        self.same_length(&comm.0, "broadcast", values.len())?;
        let root = comm.0.process_at_rank(root as i32);
        for piece in values.chunks_mut(MAX_COUNT) {
            root.broadcast_into(piece);
        }
        Ok(())
    }

    fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
        check_rank("broadcast_bytes", root, self.size)?;
        let comm = self.lock();
        let root = comm.0.process_at_rank(root as i32);
        let mut len = bytes.len() as u64;
        root.broadcast_into(&mut len);
        bytes.resize(len as usize, 0);
        for piece in bytes.chunks_mut(MAX_COUNT) {
            root.broadcast_into(piece);
        }
        Ok(())
    }

    fn all_gather(&self, values: &[f32]) -> Result<Vec<f32>> {
        let comm = self.lock();
        self.same_length(&comm.0, "all_gather", values.len())?;
        if values.len() * self.size > MAX_COUNT {
            return Err(DistributedError::InvalidArgument {
                op: "all_gather",
                message: format!(
                    "{} values from each of {} ranks exceed MPI's count",
                    values.len(),
                    self.size
                ),
            });
        }
        let mut out = vec![0.0f32; values.len() * self.size];
        comm.0.all_gather_into(values, &mut out[..]);
        Ok(out)
    }

    fn reduce_scatter(&self, values: &[f32], op: ReduceOp) -> Result<Vec<f32>> {
        if !values.len().is_multiple_of(self.size) || values.len() / self.size > MAX_COUNT {
            return Err(DistributedError::InvalidArgument {
                op: "reduce_scatter",
                message: format!(
                    "{} values do not split into {} equal parts of at most {MAX_COUNT}",
                    values.len(),
                    self.size
                ),
            });
        }
        let comm = self.lock();
        self.same_length(&comm.0, "reduce_scatter", values.len())?;
        let mut out = vec![0.0f32; values.len() / self.size];
        comm.0
            .reduce_scatter_block_into(values, &mut out[..], system_op(op));
        op.finish(&mut out, self.size);
        Ok(out)
    }

    fn send(&self, values: &[f32], dst: usize) -> Result<()> {
        check_rank("send", dst, self.size)?;
        if values.len() > MAX_COUNT {
            return Err(DistributedError::InvalidArgument {
                op: "send",
                message: format!("{} values exceed MPI's count", values.len()),
            });
        }
        let comm = self.lock();
        comm.0.process_at_rank(dst as i32).send(values);
        Ok(())
    }

    fn recv(&self, values: &mut [f32], src: usize) -> Result<()> {
        check_rank("recv", src, self.size)?;
        let comm = self.lock();
        let process = comm.0.process_at_rank(src as i32);
        let incoming = process.probe().count(f32::equivalent_datatype()) as usize;
        if incoming != values.len() {
            // Drained into a buffer of its size, so that the next message is the next one.
            let mut discarded = vec![0.0f32; incoming];
            process.receive_into(&mut discarded[..]);
            return Err(DistributedError::InvalidArgument {
                op: "recv",
                message: format!(
                    "rank {src} sent {incoming} values, rank {} expected {}",
                    self.rank,
                    values.len()
                ),
            });
        }
        process.receive_into(values);
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.lock().0.barrier();
        Ok(())
    }

    fn split(&self, color: usize, key: usize) -> Result<Arc<dyn ProcessGroup>> {
        let comm = self.lock();
        let sub = comm
            .0
            .split_by_color_with_key(Color::with_value(color as i32), key as i32)
            .ok_or_else(|| DistributedError::Mpi(format!("split by color {color} failed")))?;
        Ok(Arc::new(MpiGroup::new(sub, Arc::clone(&self.universe))))
    }
}
