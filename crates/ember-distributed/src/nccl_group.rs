//! [`NcclGroup`]: ranks that each drive one CUDA device, talking through NCCL (feature `nccl`).
//!
//! NCCL moves data between GPU buffers over NVLink, PCIe or InfiniBand without the host, which
//! is what CUDA training wants from a collective: [`NcclGroup::all_reduce_device`] sums a
//! device buffer in place. Its communicator is made the way torch.distributed makes one under
//! `mpirun`: rank 0 draws NCCL's unique id and an already running group (an
//! [`crate::MpiGroup`]) carries it to the other ranks.
//!
//! [`NcclGroup`] is also a [`ProcessGroup`] over host slices (staged through device buffers),
//! so the strategies of this crate run on it unchanged.

use crate::error::{DistributedError, Result};
use crate::group::{check_rank, ProcessGroup, ReduceOp};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::{Comm, Id, ReduceOp as NcclOp};
use std::sync::{Arc, Mutex};

/// One rank of an NCCL communicator, on one CUDA device.
pub struct NcclGroup {
    comm: Mutex<SendComm>,
    stream: Arc<CudaStream>,
    rank: usize,
    size: usize,
}

/// NCCL's communicator handle. NCCL allows it to be used from any thread as long as its calls
/// do not overlap, which the group's mutex ensures.
struct SendComm(Comm);

// SAFETY: see above: every use of the communicator holds `NcclGroup::comm`'s lock.
unsafe impl Send for SendComm {}

impl std::fmt::Debug for NcclGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclGroup")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .finish()
    }
}

/// A CUDA or NCCL failure as this crate's error, naming the operation.
fn cuda_error(op: &'static str, e: impl std::fmt::Debug) -> DistributedError {
    DistributedError::InvalidArgument {
        op,
        message: format!("CUDA / NCCL: {e:?}"),
    }
}

fn nccl_op(op: ReduceOp) -> NcclOp {
    match op {
        ReduceOp::Sum => NcclOp::Sum,
        ReduceOp::Avg => NcclOp::Avg,
        ReduceOp::Max => NcclOp::Max,
    }
}

impl NcclGroup {
    /// This rank's communicator over the ranks of `bootstrap` (same ranks, same order), on
    /// CUDA device `device` (usually the local rank). Every rank of `bootstrap` calls it.
    pub fn init(bootstrap: &dyn ProcessGroup, device: usize) -> Result<Self> {
        let (rank, size) = (bootstrap.rank(), bootstrap.size());
        // NCCL's unique id is 128 bytes that rank 0 draws and every rank must share.
        let mut id_bytes = if rank == 0 {
            let id = Id::new().map_err(|e| cuda_error("nccl_init", e))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            vec![0u8; 128]
        };
        bootstrap.broadcast_bytes(&mut id_bytes, 0)?;
        let internal: [std::ffi::c_char; 128] =
            std::array::from_fn(|i| id_bytes.get(i).copied().unwrap_or(0) as std::ffi::c_char);
        let context = CudaContext::new(device).map_err(|e| cuda_error("nccl_init", e))?;
        let stream = context.default_stream();
        let comm = Comm::from_rank(Arc::clone(&stream), rank, size, Id::uninit(internal))
            .map_err(|e| cuda_error("nccl_init", e))?;
        Ok(Self {
            comm: Mutex::new(SendComm(comm)),
            stream,
            rank,
            size,
        })
    }

    /// The stream the collectives are queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Reduces `buffer` (on this group's device) over the ranks in place, queued on
    /// [`Self::stream`].
    pub fn all_reduce_device(&self, buffer: &mut CudaSlice<f32>, op: ReduceOp) -> Result<()> {
        let comm = self.lock();
        comm.0
            .all_reduce_in_place(buffer, &nccl_op(op))
            .map_err(|e| cuda_error("all_reduce", e))?;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SendComm> {
        // A panic while holding the lock leaves nothing half-written on the host side.
        self.comm.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `values` on the device.
    fn upload(&self, op: &'static str, values: &[f32]) -> Result<CudaSlice<f32>> {
        self.stream
            .clone_htod(values)
            .map_err(|e| cuda_error(op, e))
    }

    /// The device buffer's values, copied into `values` once the stream has run.
    fn download(
        &self,
        op: &'static str,
        buffer: &CudaSlice<f32>,
        values: &mut [f32],
    ) -> Result<()> {
        self.stream
            .memcpy_dtoh(buffer, values)
            .map_err(|e| cuda_error(op, e))?;
        self.stream.synchronize().map_err(|e| cuda_error(op, e))
    }
}

impl ProcessGroup for NcclGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce(&self, values: &mut [f32], op: ReduceOp) -> Result<()> {
        let mut buffer = self.upload("all_reduce", values)?;
        self.all_reduce_device(&mut buffer, op)?;
        self.download("all_reduce", &buffer, values)
    }

    fn broadcast(&self, values: &mut [f32], root: usize) -> Result<()> {
        check_rank("broadcast", root, self.size)?;
        let mut buffer = self.upload("broadcast", values)?;
        self.lock()
            .0
            .broadcast_in_place(&mut buffer, root as i32)
            .map_err(|e| cuda_error("broadcast", e))?;
        self.download("broadcast", &buffer, values)
    }

    fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
        check_rank("broadcast_bytes", root, self.size)?;
        // The length first, so that the other ranks can size their buffers.
        let mut len = [bytes.len() as f32];
        self.broadcast(&mut len, root)?;
        bytes.resize(len[0] as usize, 0);
        let mut buffer = self
            .stream
            .clone_htod(bytes.as_slice())
            .map_err(|e| cuda_error("broadcast_bytes", e))?;
        self.lock()
            .0
            .broadcast_in_place(&mut buffer, root as i32)
            .map_err(|e| cuda_error("broadcast_bytes", e))?;
        self.stream
            .memcpy_dtoh(&buffer, bytes.as_mut_slice())
            .map_err(|e| cuda_error("broadcast_bytes", e))?;
        self.stream
            .synchronize()
            .map_err(|e| cuda_error("broadcast_bytes", e))
    }

    fn all_gather(&self, values: &[f32]) -> Result<Vec<f32>> {
        let send = self.upload("all_gather", values)?;
        let mut recv = self
            .stream
            .alloc_zeros::<f32>(values.len() * self.size)
            .map_err(|e| cuda_error("all_gather", e))?;
        self.lock()
            .0
            .all_gather(&send, &mut recv)
            .map_err(|e| cuda_error("all_gather", e))?;
        let mut out = vec![0.0; values.len() * self.size];
        self.download("all_gather", &recv, &mut out)?;
        Ok(out)
    }

    fn reduce_scatter(&self, values: &[f32], op: ReduceOp) -> Result<Vec<f32>> {
        if !values.len().is_multiple_of(self.size) {
            return Err(DistributedError::InvalidArgument {
                op: "reduce_scatter",
                message: format!(
                    "{} values do not divide into {} equal parts",
                    values.len(),
                    self.size
                ),
            });
        }
        let part = values.len() / self.size;
        let send = self.upload("reduce_scatter", values)?;
        let mut recv = self
            .stream
            .alloc_zeros::<f32>(part)
            .map_err(|e| cuda_error("reduce_scatter", e))?;
        self.lock()
            .0
            .reduce_scatter(&send, &mut recv, &nccl_op(op))
            .map_err(|e| cuda_error("reduce_scatter", e))?;
        let mut out = vec![0.0; part];
        self.download("reduce_scatter", &recv, &mut out)?;
        Ok(out)
    }

    fn send(&self, values: &[f32], dst: usize) -> Result<()> {
        check_rank("send", dst, self.size)?;
        let buffer = self.upload("send", values)?;
        self.lock()
            .0
            .send(&buffer, dst as i32)
            .map_err(|e| cuda_error("send", e))?;
        self.stream.synchronize().map_err(|e| cuda_error("send", e))
    }

    fn recv(&self, values: &mut [f32], src: usize) -> Result<()> {
        check_rank("recv", src, self.size)?;
        let mut buffer = self
            .stream
            .alloc_zeros::<f32>(values.len())
            .map_err(|e| cuda_error("recv", e))?;
        self.lock()
            .0
            .recv(&mut buffer, src as i32)
            .map_err(|e| cuda_error("recv", e))?;
        self.download("recv", &buffer, values)
    }

    fn barrier(&self) -> Result<()> {
        self.all_reduce(&mut [0.0], ReduceOp::Sum)
    }

    fn split(&self, _color: usize, _key: usize) -> Result<Arc<dyn ProcessGroup>> {
        Err(DistributedError::InvalidArgument {
            op: "split",
            message: "split the bootstrap MPI group and make an NcclGroup on each part".into(),
        })
    }
}
