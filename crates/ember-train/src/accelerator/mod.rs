//! [`Accelerator`]: Hugging Face accelerate's `Accelerator` for a hand-written burn training
//! loop. A few added lines make the loop data parallel over a [`ProcessGroup`] (threads or MPI
//! processes): the model starts from rank 0's weights, each rank reads its shard of every epoch
//! ([`DataLoaderShard`], accelerate's `BatchSamplerShard`), gradients are averaged once per
//! optimizer step, and `gather_for_metrics` rebuilds the evaluation set from the ranks' shards.
//!
//! The module: the [`Accelerator`] here, the data loader shards in `shard`, `save_state` /
//! `load_state` in `state`.

use crate::error::{Result, TrainError};
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{BasicOps, Tensor, TensorData, TensorKind};
use ember_datasets::{Collator, DataLoader};
use ember_distributed::{DataParallel, ProcessGroup, ReduceOp, SingleProcess};
use serde::{de::DeserializeOwned, Serialize};
use std::sync::{Arc, Mutex};

mod shard;
mod state;

pub(crate) use shard::shard_batches;
pub use shard::{DataLoaderShard, DataLoaderShardIter};
pub(crate) use state::write_atomic;
pub use state::{random_states_file, MODEL_FILE, OPTIMIZER_FILE};

/// How [`Accelerator::reduce`] combines the ranks' values (accelerate's `reduction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduction {
    /// `"sum"`: the sum over ranks.
    Sum,
    /// `"mean"`: the sum divided by the number of processes.
    Mean,
}

/// What the data loaders of an accelerator and the accelerator share (accelerate's
/// `GradientState` and the seed of `set_seed`).
#[derive(Debug, Default)]
struct Shared {
    /// The active loader has yielded its last batch of the epoch.
    end_of_dataloader: bool,
    /// `len(dataset) % total_batch_size` of the active loader; `None` with `drop_last`
    /// (accelerate's `-1`).
    remainder: Option<usize>,
    /// The seed of [`Accelerator::set_seed`].
    seed: Option<u64>,
}

/// Hugging Face accelerate's `Accelerator` for a hand-written burn training loop.
///
/// ```text
/// let mut accelerator = Accelerator::new(group).gradient_accumulation_steps(2);
/// let mut model = accelerator.prepare_model(model)?;
/// let loader = accelerator.prepare_data_loader(loader)?;
/// for epoch in 0..epochs {
///     for batch in loader.iter::<B>(epoch, &device) {
///         let loss = model.forward(batch?).loss;
///         if let Some(grads) = accelerator.backward(loss, &model)? {   // not loss.backward()
///             model = optimizer.step(lr, model, grads);
///         }
///     }
/// }
/// ```
///
/// * [`prepare_model`](Self::prepare_model): rank 0's weights on every rank (DDP).
/// * [`prepare_data_loader`](Self::prepare_data_loader): this rank's batches, as accelerate's
///   `BatchSamplerShard` deals them (batch `k` of the loader to rank `k % num_processes`, the
///   last ones completed from the start of the epoch so that every rank gets as many full
///   batches).
/// * [`backward`](Self::backward): the loss divided by `gradient_accumulation_steps`, its
///   gradients accumulated, and on the step that synchronises ([`sync_gradients`]) averaged
///   over ranks in buckets and returned; the other micro-steps exchange nothing (`no_sync`).
/// * [`gather`](Self::gather) / [`gather_for_metrics`](Self::gather_for_metrics) /
///   [`reduce`](Self::reduce), [`save_state`](Self::save_state) /
///   [`load_state`](Self::load_state), [`wait_for_everyone`](Self::wait_for_everyone),
///   [`print`](Self::print).
///
/// With one process every collective is the identity: the same loop runs unlaunched.
///
/// [`sync_gradients`]: Self::sync_gradients
pub struct Accelerator {
    group: Arc<dyn ProcessGroup>,
    ddp: DataParallel,
    gradient_accumulation_steps: usize,
    local_process_index: usize,
    shared: Arc<Mutex<Shared>>,
    /// accelerate's `step`: micro-steps since the last synchronisation point.
    step: usize,
    sync_gradients: bool,
    accumulated: Option<GradientsParams>,
}

impl std::fmt::Debug for Accelerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accelerator")
            .field("process_index", &self.process_index())
            .field("num_processes", &self.num_processes())
            .field(
                "gradient_accumulation_steps",
                &self.gradient_accumulation_steps,
            )
            .field("step", &self.step)
            .finish()
    }
}

impl Accelerator {
    /// An accelerator over `group` (every rank of the group builds one), with
    /// `gradient_accumulation_steps` 1 as accelerate's default.
    pub fn new(group: Arc<dyn ProcessGroup>) -> Self {
        let local_process_index = group.rank();
        Self {
            ddp: DataParallel::new(group.clone()),
            group,
            gradient_accumulation_steps: 1,
            local_process_index,
            shared: Arc::default(),
            step: 0,
            sync_gradients: true,
            accumulated: None,
        }
    }

    /// The accelerator of one process: every collective returns its input.
    pub fn single_process() -> Self {
        Self::new(Arc::new(SingleProcess))
    }

    /// The accelerator of the job this process was launched into (`ember launch`, `mpirun`,
    /// `srun`: the launcher's `OMPI_COMM_WORLD_*` / `PMI_*` variables), or of one process when
    /// it was not launched. Call it once: it initialises MPI.
    ///
    /// Errors: [`TrainError::Distributed`] when MPI cannot start, or when this build lacks the
    /// `mpi` feature but the process was launched as one of several.
    pub fn from_env() -> Result<Self> {
        let var = |name: &str| std::env::var(name).ok()?.parse::<usize>().ok();
        let launched = [
            ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
            ("PMIX_RANK", "PMI_SIZE"),
            ("PMI_RANK", "PMI_SIZE"),
        ]
        .iter()
        .find_map(|(rank, size)| Some((var(rank)?, var(size)?)));
        let Some((_, size)) = launched.filter(|(_, size)| *size > 1) else {
            return Ok(Self::single_process());
        };
        let local = [
            "OMPI_COMM_WORLD_LOCAL_RANK",
            "MPI_LOCALRANKID",
            "SLURM_LOCALID",
        ]
        .iter()
        .find_map(|name| var(name));
        let mut accelerator = Self::new(launched_group(size)?);
        if let Some(local) = local {
            accelerator.local_process_index = local;
        }
        Ok(accelerator)
    }

    /// Sets `gradient_accumulation_steps` (accelerate's
    /// `Accelerator(gradient_accumulation_steps=N)`); 0 counts as 1.
    pub fn gradient_accumulation_steps(mut self, steps: usize) -> Self {
        self.gradient_accumulation_steps = steps.max(1);
        self
    }

    /// accelerate's `set_seed(seed, device_specific=True)`: before each batch of a prepared
    /// loader the backend's generator is seeded from `seed`, this rank, the epoch and the
    /// batch's index, so dropout differs between ranks and batches yet a resumed run draws the
    /// masks an uninterrupted one does.
    pub fn set_seed(&self, seed: u64) {
        self.lock().seed = Some(seed);
    }

    /// The process group.
    pub fn group(&self) -> &Arc<dyn ProcessGroup> {
        &self.group
    }

    /// This process's rank, `0..num_processes()`.
    pub fn process_index(&self) -> usize {
        self.group.rank()
    }

    /// This process's rank on its machine (the launcher's local rank; the rank for threads).
    pub fn local_process_index(&self) -> usize {
        self.local_process_index
    }

    /// The number of processes.
    pub fn num_processes(&self) -> usize {
        self.group.size()
    }

    /// Whether this is rank 0 (which alone should log and write files).
    pub fn is_main_process(&self) -> bool {
        self.process_index() == 0
    }

    /// Whether this is the first rank of its machine.
    pub fn is_local_main_process(&self) -> bool {
        self.local_process_index == 0
    }

    /// Whether the last [`backward`](Self::backward) synchronised the gradients (the step on
    /// which the optimizer steps); true before any.
    pub fn sync_gradients(&self) -> bool {
        self.sync_gradients
    }

    /// accelerate's `step`: micro-steps since the last synchronisation point.
    pub fn step(&self) -> usize {
        self.step
    }

    /// Returns once every rank has called it.
    pub fn wait_for_everyone(&self) -> Result<()> {
        Ok(self.group.barrier()?)
    }

    /// Prints `message` on the local main process only, as accelerate's `print`.
    pub fn print(&self, message: impl std::fmt::Display) {
        if self.is_local_main_process() {
            println!("{message}");
        }
    }

    /// `model` with rank 0's weights on every rank (DDP's broadcast at construction).
    pub fn prepare_model<B: Backend, M: Module<B>>(&self, model: M) -> Result<M> {
        Ok(self.ddp.broadcast_parameters(model)?)
    }

    /// This rank's shard of `loader`'s epochs, as accelerate's `prepare_data_loader` makes it
    /// (see [`DataLoaderShard`]). The loader's shuffle, seed, batch size and `drop_last` are
    /// kept; its `num_workers` are not used (the shard collates on the calling thread).
    ///
    /// Errors: [`TrainError::Argument`] when `loader` is already sharded with
    /// `DataLoader::distributed` (the rows would be split twice).
    pub fn prepare_data_loader<C: Collator + 'static>(
        &self,
        loader: DataLoader<C>,
    ) -> Result<DataLoaderShard<C>> {
        DataLoaderShard::new(
            loader,
            self.num_processes(),
            self.process_index(),
            self.shared.clone(),
        )
    }

    /// accelerate's `skip_first_batches(dataloader, num_batches)`: a copy of `loader` whose
    /// epochs start after their first `num_batches` batches (resuming mid-epoch).
    pub fn skip_first_batches<C: Collator + Clone + 'static>(
        &self,
        loader: &DataLoaderShard<C>,
        num_batches: usize,
    ) -> DataLoaderShard<C> {
        let mut loader = loader.clone();
        loader.skip_batches = num_batches;
        loader
    }

    /// accelerate's `backward(loss)` with its `accumulate` context: divides `loss` by
    /// `gradient_accumulation_steps`, adds its gradients to those accumulated since the last
    /// optimizer step, and on a synchronising micro-step (every
    /// `gradient_accumulation_steps`-th, and the last batch of a prepared loader's epoch)
    /// returns them averaged over ranks ([`DataParallel::all_reduce_gradients`]: one bucketed
    /// all-reduce). Other micro-steps exchange nothing and return `None`: step the optimizer
    /// only on `Some`.
    pub fn backward<B: AutodiffBackend, M: AutodiffModule<B>>(
        &mut self,
        loss: Tensor<B, 1>,
        model: &M,
    ) -> Result<Option<GradientsParams>> {
        // accelerate's `_do_sync`: the end of the loader always synchronises and restarts the
        // count, so that an epoch's last partial accumulation is not carried into the next.
        if self.lock().end_of_dataloader {
            self.step = 0;
            self.sync_gradients = true;
        } else {
            self.step += 1;
            self.sync_gradients = self.step.is_multiple_of(self.gradient_accumulation_steps);
        }
        let loss = if self.gradient_accumulation_steps > 1 {
            loss.div_scalar(self.gradient_accumulation_steps as f64)
        } else {
            loss
        };
        let grads = GradientsParams::from_grads(loss.backward(), model);
        let grads = match self.accumulated.take() {
            None => grads,
            Some(mut acc) => {
                let mut add = Accumulate::<B> {
                    acc: &mut acc,
                    new: grads,
                    _backend: std::marker::PhantomData,
                };
                model.visit(&mut add);
                acc
            }
        };
        if !self.sync_gradients {
            self.accumulated = Some(grads);
            return Ok(None);
        }
        Ok(Some(self.ddp.all_reduce_gradients(model, grads)?))
    }

    /// Every rank's `tensor`, concatenated along the first dimension in rank order
    /// (accelerate's `gather`). The other dimensions must agree; values travel as f32, so
    /// integers are exact up to 2^24.
    ///
    /// Errors: [`TrainError::Argument`] naming the shapes when ranks' tensors differ beyond
    /// the first dimension or in it.
    pub fn gather<B: Backend, const D: usize, K>(
        &self,
        tensor: Tensor<B, D, K>,
    ) -> Result<Tensor<B, D, K>>
    where
        K: TensorKind<B> + BasicOps<B>,
    {
        if self.num_processes() == 1 {
            return Ok(tensor);
        }
        let dims = tensor.dims();
        let shape: Vec<f32> = dims.iter().map(|&d| d as f32).collect();
        let shapes = self.group.all_gather(&shape)?;
        if shapes.chunks(D).any(|s| s != shape.as_slice()) {
            let shapes: Vec<Vec<usize>> = shapes
                .chunks(D)
                .map(|s| s.iter().map(|&d| d as usize).collect())
                .collect();
            return Err(TrainError::Argument {
                field: "gather".into(),
                message: format!(
                    "the ranks' tensors have shapes {shapes:?} (rank order); gather needs one \
                     shape on every rank"
                ),
            });
        }
        let device = tensor.device();
        let values: Vec<f32> = tensor
            .into_data()
            .convert::<f32>()
            .into_vec()
            .map_err(|e| TrainError::Step(format!("gather: reading the tensor: {e:?}")))?;
        let gathered = self.group.all_gather(&values)?;
        let mut out = dims;
        out[0] *= self.num_processes();
        let data = TensorData::new(gathered, out.to_vec());
        Ok(Tensor::<B, D, K>::from_data(data, &device))
    }

    /// [`gather`](Self::gather), then, on the last batch of a prepared loader's epoch, only
    /// the first `len(dataset) % total_batch_size` rows: the rest are the samples that
    /// [`DataLoaderShard`] repeated from the start of the epoch to give every rank a full
    /// batch. Concatenated over an evaluation epoch, the results are the dataset's rows, each
    /// once, in the loader's order (accelerate's `gather_for_metrics`).
    pub fn gather_for_metrics<B: Backend, const D: usize, K>(
        &self,
        tensor: Tensor<B, D, K>,
    ) -> Result<Tensor<B, D, K>>
    where
        K: TensorKind<B> + BasicOps<B>,
    {
        let data = self.gather(tensor)?;
        let (end, remainder) = {
            let shared = self.lock();
            (shared.end_of_dataloader, shared.remainder)
        };
        match remainder {
            Some(remainder) if end && remainder > 0 && remainder < data.dims()[0] => {
                Ok(data.narrow(0, 0, remainder))
            }
            _ => Ok(data),
        }
    }

    /// accelerate's `gather_object`: every rank's `objects`, concatenated in rank order
    /// (serialized as JSON; any length on each rank).
    pub fn gather_object<T: Serialize + DeserializeOwned>(
        &self,
        objects: Vec<T>,
    ) -> Result<Vec<T>> {
        if self.num_processes() == 1 {
            return Ok(objects);
        }
        let bytes = serde_json::to_vec(&objects)
            .map_err(|e| TrainError::Step(format!("gather_object: serializing: {e}")))?;
        let mut out = Vec::new();
        for part in gather_bytes(self.group.as_ref(), bytes)? {
            let part: Vec<T> = serde_json::from_slice(&part)
                .map_err(|e| TrainError::Step(format!("gather_object: reading: {e}")))?;
            out.extend(part);
        }
        Ok(out)
    }

    /// accelerate's `reduce(tensor, reduction)`: the sum or the mean over ranks, on every rank.
    pub fn reduce<B: Backend, const D: usize>(
        &self,
        tensor: Tensor<B, D>,
        reduction: Reduction,
    ) -> Result<Tensor<B, D>> {
        if self.num_processes() == 1 {
            return Ok(tensor);
        }
        let (device, dims, dtype) = (tensor.device(), tensor.dims(), tensor.dtype());
        let mut values: Vec<f32> = tensor
            .into_data()
            .convert::<f32>()
            .into_vec()
            .map_err(|e| TrainError::Step(format!("reduce: reading the tensor: {e:?}")))?;
        let op = match reduction {
            Reduction::Sum => ReduceOp::Sum,
            Reduction::Mean => ReduceOp::Avg,
        };
        self.group.all_reduce(&mut values, op)?;
        Ok(Tensor::<B, D>::from_data(TensorData::new(values, dims.to_vec()), &device).cast(dtype))
    }

    /// Exchanges whether each rank's part of a collective file operation succeeded (`ok`), so
    /// that every rank leaves it together: an error naming the rank that failed when this one
    /// succeeded but another did not (a rank that failed reports its own error).
    fn agree(&self, op: &str, ok: bool) -> Result<()> {
        if self.num_processes() == 1 {
            return Ok(());
        }
        let flags = self.group.all_gather(&[f32::from(u8::from(!ok))])?;
        match flags.iter().position(|f| *f != 0.0) {
            Some(rank) if ok => Err(TrainError::Step(format!(
                "{op}: rank {rank} failed (see its error)"
            ))),
            _ => Ok(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        // The state holds plain flags: a rank that panicked while holding it left them whole.
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(feature = "mpi")]
fn launched_group(_size: usize) -> Result<Arc<dyn ProcessGroup>> {
    Ok(Arc::new(ember_distributed::MpiGroup::init()?))
}

#[cfg(not(feature = "mpi"))]
fn launched_group(size: usize) -> Result<Arc<dyn ProcessGroup>> {
    Err(TrainError::Distributed(
        ember_distributed::DistributedError::Mpi(format!(
            "launched as one of {size} processes, but ember-train was built without its `mpi` \
         feature (`ember/mpi`)"
        )),
    ))
}

/// Every rank's `bytes`, in rank order: one broadcast from each rank in turn, since ranks'
/// lengths may differ.
pub(crate) fn gather_bytes(group: &dyn ProcessGroup, bytes: Vec<u8>) -> Result<Vec<Vec<u8>>> {
    let mut own = Some(bytes);
    let mut out = Vec::with_capacity(group.size());
    for root in 0..group.size() {
        let mut buffer = if root == group.rank() {
            own.take().unwrap_or_default()
        } else {
            Vec::new()
        };
        group.broadcast_bytes(&mut buffer, root)?;
        out.push(buffer);
    }
    Ok(out)
}

/// Adds `new`'s gradients into `acc`, parameter by parameter.
struct Accumulate<'a, B: AutodiffBackend> {
    acc: &'a mut GradientsParams,
    new: GradientsParams,
    _backend: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Accumulate<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let Some(grad) = self.new.remove::<B::InnerBackend, D>(param.id) else {
            return;
        };
        let sum = match self.acc.remove::<B::InnerBackend, D>(param.id) {
            Some(acc) => acc.add(grad),
            None => grad,
        };
        self.acc.register::<B::InnerBackend, D>(param.id, sum);
    }
}
