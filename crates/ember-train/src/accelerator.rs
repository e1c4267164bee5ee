//! [`Accelerator`]: Hugging Face accelerate's `Accelerator` for a hand-written burn training
//! loop. A few added lines make the loop data parallel over a [`ProcessGroup`] (threads or MPI
//! processes): the model starts from rank 0's weights, each rank reads its shard of every epoch
//! ([`DataLoaderShard`], accelerate's `BatchSamplerShard`), gradients are averaged once per
//! optimizer step, and `gather_for_metrics` rebuilds the evaluation set from the ranks' shards.

use crate::error::{Result, TrainError};
use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::{GradientsParams, Optimizer};
use burn::record::{FullPrecisionSettings, NamedMpkBytesRecorder, Recorder};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{BasicOps, Tensor, TensorData, TensorKind};
use ember_datasets::{Batch, Collator, DataLoader, DatasetError};
use ember_distributed::{DataParallel, ProcessGroup, ReduceOp, SingleProcess};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// accelerate's `SAFE_WEIGHTS_NAME`: the model's weights in a [`Accelerator::save_state`] folder.
pub const MODEL_FILE: &str = "model.safetensors";
/// accelerate's `OPTIMIZER_NAME`: the optimizer's state (burn's binary record).
pub const OPTIMIZER_FILE: &str = "optimizer.bin";
/// The safetensors metadata key holding each tensor's burn parameter id, so that a model
/// loaded in another process matches the optimizer state (keyed by parameter id).
const PARAM_IDS_KEY: &str = "ember.param_ids";

/// The name of rank `process_index`'s generator state in a [`Accelerator::save_state`] folder
/// (accelerate's `random_states_{i}.pkl`, here JSON).
pub fn random_states_file(process_index: usize) -> String {
    format!("random_states_{process_index}.json")
}

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

/// One rank's generator state as [`Accelerator::save_state`] writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RandomStates {
    /// The rank that wrote it.
    process_index: usize,
    /// The seed of [`Accelerator::set_seed`] (`None`: the backend's own entropy).
    seed: Option<u64>,
    /// accelerate's `step`: micro-steps counted for gradient accumulation.
    step: usize,
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

    /// accelerate's `save_state(output_dir)`: rank 0 writes the model's weights
    /// ([`MODEL_FILE`], safetensors, keys the modules' field paths) and the optimizer's state
    /// ([`OPTIMIZER_FILE`]); every rank writes its own [`random_states_file`] (its seed and
    /// accelerate's `step`). Each file is written under a temporary name and renamed into
    /// place, so a crash mid-save never leaves a torn file. All ranks return once every rank
    /// has written, with an error on every rank when any failed.
    pub fn save_state<B, M, O>(&self, dir: impl AsRef<Path>, model: &M, optimizer: &O) -> Result<()>
    where
        B: AutodiffBackend,
        M: AutodiffModule<B>,
        O: Optimizer<M, B>,
    {
        let dir = dir.as_ref();
        let written = self.write_state(dir, model, optimizer);
        self.agree("save_state", written.is_ok())?;
        written
    }

    fn write_state<B, M, O>(&self, dir: &Path, model: &M, optimizer: &O) -> Result<()>
    where
        B: AutodiffBackend,
        M: AutodiffModule<B>,
        O: Optimizer<M, B>,
    {
        std::fs::create_dir_all(dir).map_err(|source| TrainError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let rank = self.process_index();
        if rank == 0 {
            write_atomic(&dir.join(MODEL_FILE), &model_safetensors(model)?, rank)?;
            let recorder = NamedMpkBytesRecorder::<FullPrecisionSettings>::default();
            let bytes = Recorder::<B>::record(&recorder, optimizer.to_record(), ())
                .map_err(|e| TrainError::Step(format!("saving the optimizer state: {e}")))?;
            write_atomic(&dir.join(OPTIMIZER_FILE), &bytes, rank)?;
        }
        let states = RandomStates {
            process_index: rank,
            seed: self.lock().seed,
            step: self.step,
        };
        let json = serde_json::to_vec_pretty(&states).expect("the random states serialize");
        write_atomic(&dir.join(random_states_file(rank)), &json, rank)
    }

    /// accelerate's `load_state(input_dir)`: `model` and `optimizer` with the state
    /// [`save_state`](Self::save_state) wrote (the parameters keep the ids they were saved
    /// with, so the optimizer state applies to them), and this rank's seed and `step`
    /// restored. Every rank reads; all fail when any does.
    ///
    /// Errors: [`TrainError::Io`] naming a missing file, [`TrainError::File`] naming a corrupt
    /// one or the tensor that is missing or has another shape.
    pub fn load_state<B, M, O>(
        &mut self,
        dir: impl AsRef<Path>,
        model: M,
        optimizer: O,
    ) -> Result<(M, O)>
    where
        B: AutodiffBackend,
        M: AutodiffModule<B>,
        O: Optimizer<M, B>,
    {
        let dir = dir.as_ref();
        let loaded = self.read_state(dir, model, optimizer);
        self.agree("load_state", loaded.is_ok())?;
        let (model, optimizer, states) = loaded?;
        self.step = states.step;
        self.lock().seed = states.seed;
        self.accumulated = None;
        Ok((model, optimizer))
    }

    #[allow(clippy::type_complexity)]
    fn read_state<B, M, O>(
        &self,
        dir: &Path,
        model: M,
        optimizer: O,
    ) -> Result<(M, O, RandomStates)>
    where
        B: AutodiffBackend,
        M: AutodiffModule<B>,
        O: Optimizer<M, B>,
    {
        let read =
            |path: PathBuf| std::fs::read(&path).map_err(|source| TrainError::Io { path, source });
        let model_path = dir.join(MODEL_FILE);
        let model = load_model_safetensors(model, &read(model_path.clone())?, &model_path)?;
        let device = model.devices().into_iter().next().unwrap_or_default();
        let optimizer_path = dir.join(OPTIMIZER_FILE);
        let recorder = NamedMpkBytesRecorder::<FullPrecisionSettings>::default();
        let record: O::Record =
            Recorder::<B>::load(&recorder, read(optimizer_path.clone())?, &device).map_err(
                |e| TrainError::File {
                    path: optimizer_path,
                    message: format!("not an optimizer state of this model: {e}"),
                },
            )?;
        let optimizer = optimizer.load_record(record);
        let states_path = dir.join(random_states_file(self.process_index()));
        let states: RandomStates =
            serde_json::from_slice(&read(states_path.clone())?).map_err(|e| TrainError::File {
                path: states_path,
                message: e.to_string(),
            })?;
        Ok((model, optimizer, states))
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

/// One row position of a rank's shard: the row of the dataset, and whether it is a repeat
/// that only pads the last batches (accelerate's `even_batches`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slot {
    pub(crate) row: usize,
    pub(crate) padding: bool,
}

/// accelerate's `BatchSamplerShard` (`split_batches=False`, `even_batches=True`) over the
/// batches of one process: rank `rank` of `replicas` gets batches `rank, rank + replicas, ...`.
/// Without `drop_last` the epoch's rows are first repeated cyclically from its start to a
/// multiple of `replicas · batch_size`, so that every rank gets as many batches, all full;
/// with it, the batches that cannot give every rank one are dropped.
pub(crate) fn shard_batches(
    batches: &[Vec<usize>],
    batch_size: usize,
    replicas: usize,
    rank: usize,
    drop_last: bool,
) -> Vec<Vec<Slot>> {
    let real = |rows: &Vec<usize>| {
        rows.iter()
            .map(|&row| Slot {
                row,
                padding: false,
            })
            .collect::<Vec<_>>()
    };
    if drop_last {
        let groups = batches.len() / replicas;
        return batches[..groups * replicas]
            .iter()
            .skip(rank)
            .step_by(replicas)
            .map(real)
            .collect();
    }
    let order: Vec<usize> = batches.iter().flatten().copied().collect();
    if order.is_empty() {
        return Vec::new();
    }
    let total_batch = replicas * batch_size;
    let total = order.len().div_ceil(total_batch) * total_batch;
    let slots: Vec<Slot> = order
        .iter()
        .cycle()
        .take(total)
        .enumerate()
        .map(|(position, &row)| Slot {
            row,
            padding: position >= order.len(),
        })
        .collect();
    slots
        .chunks(batch_size)
        .skip(rank)
        .step_by(replicas)
        .map(<[Slot]>::to_vec)
        .collect()
}

/// accelerate's `DataLoaderShard`: rank `process_index`'s batches of a [`DataLoader`]'s epochs.
///
/// The loader's epoch (the same permutation on every rank: it is seeded with `seed + epoch`)
/// is cut into batches of its batch size; batch `k` goes to rank `k % num_processes`. Without
/// `drop_last`, the last batches are completed with rows from the start of the epoch so that
/// every rank gets the same number of full batches (`even_batches`); so the ranks' batches `s`
/// together are batch `s` of one process with `num_processes` times the batch size.
/// [`Accelerator::gather_for_metrics`] drops the repeats again.
#[derive(Clone)]
pub struct DataLoaderShard<C> {
    loader: DataLoader<C>,
    num_processes: usize,
    process_index: usize,
    drop_last: bool,
    skip_batches: usize,
    shared: Arc<Mutex<Shared>>,
}

impl<C> std::fmt::Debug for DataLoaderShard<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataLoaderShard")
            .field("num_processes", &self.num_processes)
            .field("process_index", &self.process_index)
            .field("drop_last", &self.drop_last)
            .field("skip_batches", &self.skip_batches)
            .finish()
    }
}

impl<C: Collator + 'static> DataLoaderShard<C> {
    fn new(
        loader: DataLoader<C>,
        num_processes: usize,
        process_index: usize,
        shared: Arc<Mutex<Shared>>,
    ) -> Result<Self> {
        let rows = loader.examples().len();
        let batch_size = loader.batch_size();
        // The loader's own DistributedSampler would split the rows a second time: its epoch no
        // longer holds every row (nor, with padding, only the rows).
        let epoch_rows: usize = loader.batch_indices(0).iter().map(Vec::len).sum();
        // With `drop_last` an epoch reads the full batches only (the loader does not say
        // whether it drops: when every batch is full both read the same rows).
        let full = rows / batch_size * batch_size;
        let drop_last = epoch_rows == full && full != rows;
        if epoch_rows != rows && !drop_last {
            return Err(TrainError::Argument {
                field: "dataloader".into(),
                message: format!(
                    "the loader reads {epoch_rows} of {rows} rows per epoch: it is already \
                     sharded (DataLoader::distributed); prepare the unsharded loader"
                ),
            });
        }
        Ok(Self {
            loader,
            num_processes,
            process_index,
            drop_last,
            skip_batches: 0,
            shared,
        })
    }

    /// The number of batches this rank reads per epoch (`len(dataloader)`).
    pub fn len(&self) -> usize {
        let batches = self.loader.len();
        let per_rank = batches / self.num_processes;
        if batches.is_multiple_of(self.num_processes) || self.drop_last {
            per_rank
        } else {
            per_rank + 1
        }
    }

    /// True when an epoch has no batch.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// accelerate's `total_batch_size`: the batch size times the number of processes.
    pub fn total_batch_size(&self) -> usize {
        self.loader.batch_size() * self.num_processes
    }

    /// accelerate's `total_dataset_length`: the rows of the whole dataset.
    pub fn total_dataset_length(&self) -> usize {
        self.loader.examples().len()
    }

    /// The loader this shard was made from.
    pub fn base_loader(&self) -> &DataLoader<C> {
        &self.loader
    }

    /// This rank's row indices of each batch of `epoch`, in order (repeats included).
    pub fn batch_indices(&self, epoch: u64) -> Vec<Vec<usize>> {
        self.slots(epoch)
            .into_iter()
            .map(|batch| batch.into_iter().map(|s| s.row).collect())
            .collect()
    }

    pub(crate) fn slots(&self, epoch: u64) -> Vec<Vec<Slot>> {
        shard_batches(
            &self.loader.batch_indices(epoch),
            self.loader.batch_size(),
            self.num_processes,
            self.process_index,
            self.drop_last,
        )
    }

    /// This rank's batches of `epoch` (0, 1, ...) on `device`, in order, after the first
    /// [`Accelerator::skip_first_batches`]. Each batch is collated when asked for. While the
    /// last one is out, [`Accelerator::gather_for_metrics`] trims the repeats and
    /// [`Accelerator::backward`] synchronises.
    pub fn iter<B: Backend>(
        &self,
        epoch: u64,
        device: &B::Device,
    ) -> DataLoaderShardIter<'_, B, C> {
        let batches = self.batch_indices(epoch);
        {
            let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            shared.end_of_dataloader = false;
            shared.remainder =
                (!self.drop_last).then(|| self.total_dataset_length() % self.total_batch_size());
        }
        DataLoaderShardIter {
            shard: self,
            batches,
            next: self.skip_batches,
            epoch,
            device: device.clone(),
        }
    }
}

/// The batches of one epoch of a [`DataLoaderShard`].
pub struct DataLoaderShardIter<'a, B: Backend, C> {
    shard: &'a DataLoaderShard<C>,
    batches: Vec<Vec<usize>>,
    next: usize,
    epoch: u64,
    device: B::Device,
}

impl<B: Backend, C> std::fmt::Debug for DataLoaderShardIter<'_, B, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataLoaderShardIter")
            .field("epoch", &self.epoch)
            .field("next", &self.next)
            .field("batches", &self.batches.len())
            .finish()
    }
}

impl<B: Backend, C: Collator + 'static> Iterator for DataLoaderShardIter<'_, B, C> {
    type Item = std::result::Result<Batch<B>, DatasetError>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut shared = self.shard.shared.lock().unwrap_or_else(|e| e.into_inner());
        let Some(rows) = self.batches.get(self.next) else {
            shared.end_of_dataloader = false;
            return None;
        };
        let index = self.next;
        self.next += 1;
        shared.end_of_dataloader = self.next == self.batches.len();
        if let Some(seed) = shared.seed {
            // The batch's place in the run, not a running count: a resumed run (which skips
            // the batches already seen) seeds each batch as an uninterrupted one did.
            let rank = self.shard.process_index as u64;
            B::seed(
                &self.device,
                seed.wrapping_mul(1_000_003)
                    .wrapping_add(self.epoch.wrapping_mul(1 << 20))
                    .wrapping_add(index as u64)
                    .wrapping_add(rank << 40),
            );
        }
        drop(shared);
        let loader = &self.shard.loader;
        Some(
            loader
                .examples()
                .examples(rows)
                .and_then(|rows| loader.collator().collate::<B>(&rows, &self.device)),
        )
    }
}

impl<B: Backend, C> Drop for DataLoaderShardIter<'_, B, C> {
    fn drop(&mut self) {
        // Leaving the loop early leaves no stale end-of-loader flag for the next loader.
        let mut shared = self.shard.shared.lock().unwrap_or_else(|e| e.into_inner());
        shared.end_of_dataloader = false;
    }
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

/// Collects every float parameter under its field path (`encoder.0.weight`).
struct Collect {
    path: Vec<String>,
    tensors: Vec<(String, Vec<usize>, Vec<u8>, ParamId)>,
    error: Option<String>,
}

impl<B: Backend> ModuleVisitor<B> for Collect {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_owned());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let tensor = param.val();
        let shape = tensor.dims().to_vec();
        match tensor.into_data().convert::<f32>().into_vec::<f32>() {
            Ok(values) => self.tensors.push((
                self.path.join("."),
                shape,
                values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                param.id,
            )),
            Err(e) => self.error = Some(format!("{}: {e:?}", self.path.join("."))),
        }
    }
}

/// `model`'s float parameters as a safetensors file (f32; the parameter ids in the metadata).
fn model_safetensors<B: Backend, M: Module<B>>(model: &M) -> Result<Vec<u8>> {
    let mut collect = Collect {
        path: Vec::new(),
        tensors: Vec::new(),
        error: None,
    };
    model.visit(&mut collect);
    if let Some(e) = collect.error {
        return Err(TrainError::Step(format!("saving the model: {e}")));
    }
    let ids: HashMap<&str, u64> = collect
        .tensors
        .iter()
        .map(|(name, _, _, id)| (name.as_str(), id.val()))
        .collect();
    let metadata = HashMap::from([(
        PARAM_IDS_KEY.to_owned(),
        serde_json::to_string(&ids).expect("ids serialize"),
    )]);
    let views = collect
        .tensors
        .iter()
        .map(|(name, shape, bytes, _)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|view| (name.clone(), view))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| TrainError::Step(format!("saving the model: {e}")))?;
    safetensors::serialize(views, Some(metadata))
        .map_err(|e| TrainError::Step(format!("saving the model: {e}")))
}

/// Replaces every float parameter by the file's tensor of the same path.
struct Load<'a> {
    path: Vec<String>,
    file: &'a safetensors::SafeTensors<'a>,
    ids: HashMap<String, u64>,
    error: Option<String>,
}

impl<B: Backend> ModuleMapper<B> for Load<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_owned());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        if self.error.is_some() {
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let name = self.path.join(".");
        let view = match self.file.tensor(&name) {
            Ok(view) => view,
            Err(_) => {
                self.error = Some(format!("the model's tensor `{name}` is missing"));
                return Param::from_mapped_value(id, tensor, mapper);
            }
        };
        let shape = tensor.dims().to_vec();
        if view.dtype() != safetensors::Dtype::F32 || view.shape() != shape.as_slice() {
            self.error = Some(format!(
                "`{name}` is {:?} {:?}, the model's is F32 {shape:?}",
                view.dtype(),
                view.shape()
            ));
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let value = Tensor::<B, D>::from_data(TensorData::new(values, shape), &tensor.device())
            .cast(tensor.dtype())
            .set_require_grad(tensor.is_require_grad());
        let id = self
            .ids
            .get(&name)
            .map_or(id, |&saved| ParamId::from(saved));
        Param::from_mapped_value(id, value, mapper)
    }
}

fn load_model_safetensors<B: Backend, M: Module<B>>(
    model: M,
    bytes: &[u8],
    path: &Path,
) -> Result<M> {
    let invalid = |message: String| TrainError::File {
        path: path.to_owned(),
        message,
    };
    let (_, metadata) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| invalid(format!("not a safetensors file: {e}")))?;
    let ids: HashMap<String, u64> = match metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get(PARAM_IDS_KEY))
    {
        Some(json) => serde_json::from_str(json)
            .map_err(|e| invalid(format!("`{PARAM_IDS_KEY}` metadata: {e}")))?,
        None => HashMap::new(),
    };
    let file = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| invalid(format!("not a safetensors file: {e}")))?;
    let mut load = Load {
        path: Vec::new(),
        file: &file,
        ids,
        error: None,
    };
    let model = model.map(&mut load);
    match load.error {
        Some(message) => Err(invalid(message)),
        None => Ok(model),
    }
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename.
fn write_atomic(path: &Path, bytes: &[u8], rank: usize) -> Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("state");
    let tmp = path.with_file_name(format!(".{name}.tmp-{}-{rank}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|source| TrainError::Io {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, path).map_err(|source| TrainError::Io {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::{shard_batches, Slot};

    fn rows(shard: &[Vec<Slot>]) -> Vec<Vec<usize>> {
        shard
            .iter()
            .map(|b| b.iter().map(|s| s.row).collect())
            .collect()
    }

    /// accelerate's own `BatchSamplerShard` lists (tests/test_data_loader.py,
    /// `test_batch_sampler_shards_with_no_splits`): 2 processes, batch size 3.
    #[test]
    fn shards_deal_batches_as_accelerate() {
        let batches = |n: usize| -> Vec<Vec<usize>> {
            (0..n)
                .collect::<Vec<_>>()
                .chunks(3)
                .map(<[usize]>::to_vec)
                .collect()
        };
        // 24 rows: a round multiple of the total batch size.
        assert_eq!(
            rows(&shard_batches(&batches(24), 3, 2, 0, false)),
            [[0, 1, 2], [6, 7, 8], [12, 13, 14], [18, 19, 20]]
        );
        // 21 rows: a whole number of batches, not of total batches: the last rank loops.
        assert_eq!(
            rows(&shard_batches(&batches(21), 3, 2, 1, false)),
            [[3, 4, 5], [9, 10, 11], [15, 16, 17], [0, 1, 2]]
        );
        // 22 rows: the last batch is incomplete and completed from the start.
        assert_eq!(
            rows(&shard_batches(&batches(22), 3, 2, 1, false)),
            [[3, 4, 5], [9, 10, 11], [15, 16, 17], [21, 0, 1]]
        );
        // 20 rows: rank 0 ends on an incomplete batch, rank 1 on a looped one.
        assert_eq!(
            rows(&shard_batches(&batches(20), 3, 2, 0, false)),
            [[0, 1, 2], [6, 7, 8], [12, 13, 14], [18, 19, 0]]
        );
        assert_eq!(
            rows(&shard_batches(&batches(20), 3, 2, 1, false)),
            [[3, 4, 5], [9, 10, 11], [15, 16, 17], [1, 2, 3]]
        );
        // 2 rows: fewer than the processes need: repeated until every rank has a batch.
        assert_eq!(
            rows(&shard_batches(&batches(2), 3, 2, 0, false)),
            [[0, 1, 0]]
        );
        assert_eq!(
            rows(&shard_batches(&batches(2), 3, 2, 1, false)),
            [[1, 0, 1]]
        );
        // drop_last: only the batches every rank gets.
        assert_eq!(
            rows(&shard_batches(&batches(21), 3, 2, 0, true)),
            [[0, 1, 2], [6, 7, 8], [12, 13, 14]]
        );
    }
}
