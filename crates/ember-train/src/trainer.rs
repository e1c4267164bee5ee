//! HF's `Trainer`: the training loop with gradient accumulation, clipping, AdamW groups, the
//! learning-rate schedule, logging, evaluation, checkpoints (with rotation and resuming) and
//! callbacks; `evaluate` and `predict`.

use crate::args::{IntervalStrategy, TrainingArguments};
use crate::error::{Result, TrainError};
use crate::model::{ModelOutput, TrainableModel};
use crate::optim::{clip_grad_norm, GroupedAdamW};
use crate::rng_state::{dropout_seed, rng_state_file, RngState};
use crate::scaler::{GradScaler, GradScalerKwargs};
use crate::schedule::LrSchedule;
use crate::state::TrainerState;
use crate::tensor_parallel::{clip_grad_norm_sliced, sliced_params, TensorParallelHook};
use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ElementConversion;
use ember_datasets::{Batch, BatchLabels, Collator, DataLoader, Dataset};
use ember_distributed::{DataParallel, DeviceMesh, ProcessGroup, ReduceOp};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Predictions and labels of an evaluation, as `compute_metrics` receives them (HF's
/// `EvalPrediction`), one entry per example.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EvalPrediction {
    /// The logits of each example, `[positions, classes]` flattened (one position for a
    /// sequence classifier, one per token otherwise).
    pub logits: Vec<Vec<f32>>,
    /// The number of classes.
    pub num_classes: usize,
    /// The arg-max class of each position of each example.
    pub predictions: Vec<Vec<usize>>,
    /// The label of each position (`-100` where a position is ignored).
    pub label_ids: Vec<Vec<i64>>,
}

impl EvalPrediction {
    /// Sequence classification: one prediction and one label per example.
    pub fn sequence_classes(&self) -> (Vec<usize>, Vec<usize>) {
        let pairs = self
            .predictions
            .iter()
            .zip(&self.label_ids)
            .filter_map(|(p, l)| {
                let (p, l) = (*p.first()?, *l.first()?);
                (l >= 0).then_some((p, l as usize))
            });
        pairs.unzip()
    }

    /// Token classification: per example, the predicted and true classes of the positions whose
    /// label is not `-100` (the first sub-token of each word), ready for seqeval.
    pub fn token_classes(&self) -> (Vec<Vec<usize>>, Vec<Vec<usize>>) {
        self.predictions
            .iter()
            .zip(&self.label_ids)
            .map(|(p, l)| {
                p.iter()
                    .zip(l)
                    .filter(|(_, l)| **l >= 0)
                    .map(|(p, l)| (*p, *l as usize))
                    .unzip()
            })
            .unzip()
    }
}

/// What `predict` returns (HF's `PredictionOutput`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PredictionOutput {
    /// Logits, predictions and labels per example.
    pub predictions: EvalPrediction,
    /// `test_loss`, the metrics (prefixed `test_`), runtime and speed.
    pub metrics: BTreeMap<String, f64>,
}

/// The metrics function: HF's `compute_metrics(eval_pred) -> dict`.
pub type ComputeMetrics = Box<dyn Fn(&EvalPrediction) -> Result<BTreeMap<String, f64>> + Send>;

/// What a callback may ask of the loop.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Control {
    /// Stop training after this step.
    pub should_training_stop: bool,
}

/// HF's `TrainerCallback`: hooks called by the loop.
pub trait TrainerCallback: Send {
    /// After each evaluation, with its metrics (`eval_*`).
    fn on_evaluate(
        &mut self,
        _args: &TrainingArguments,
        _state: &TrainerState,
        _metrics: &BTreeMap<String, f64>,
    ) -> Control {
        Control::default()
    }

    /// After each optimizer step.
    fn on_step_end(&mut self, _args: &TrainingArguments, _state: &TrainerState) -> Control {
        Control::default()
    }

    /// After each log entry.
    fn on_log(
        &mut self,
        _args: &TrainingArguments,
        _state: &TrainerState,
        _logs: &Map<String, Value>,
    ) {
    }
}

/// HF's `EarlyStoppingCallback`: stops when `metric_for_best_model` has not improved by more
/// than `threshold` for `patience` evaluations.
#[derive(Debug, Clone)]
pub struct EarlyStoppingCallback {
    /// Evaluations without improvement before stopping.
    pub patience: usize,
    /// Smallest change that counts as an improvement.
    pub threshold: f64,
    bad_evaluations: usize,
}

impl EarlyStoppingCallback {
    /// `early_stopping_patience`, `early_stopping_threshold`.
    pub fn new(patience: usize, threshold: f64) -> Self {
        Self {
            patience,
            threshold,
            bad_evaluations: 0,
        }
    }
}

impl TrainerCallback for EarlyStoppingCallback {
    fn on_evaluate(
        &mut self,
        args: &TrainingArguments,
        state: &TrainerState,
        metrics: &BTreeMap<String, f64>,
    ) -> Control {
        let Some(name) = args.metric_for_best_model_resolved() else {
            return Control::default();
        };
        let Some(&value) = metrics.get(&name) else {
            return Control::default();
        };
        let better = match state.best_metric {
            None => true,
            Some(best) if args.greater_is_better_resolved() => {
                value > best && (value - best).abs() > self.threshold
            }
            Some(best) => value < best && (value - best).abs() > self.threshold,
        };
        self.bad_evaluations = if better { 0 } else { self.bad_evaluations + 1 };
        Control {
            should_training_stop: self.bad_evaluations >= self.patience,
        }
    }
}

/// HF's `Trainer` for a model `M` trained on the autodiff backend `B`, with batches made by the
/// collator `C`.
pub struct Trainer<B, M, C>
where
    B: AutodiffBackend,
    M: TrainableModel<B> + AutodiffModule<B>,
    M::InnerModule: TrainableModel<B::InnerBackend>,
    C: Collator + Clone + 'static,
{
    /// The arguments.
    pub args: TrainingArguments,
    /// The model (after `train`, the trained one; the best one with `load_best_model_at_end`).
    pub model: M,
    /// The state, as written to `trainer_state.json`.
    pub state: TrainerState,
    collator: C,
    device: B::Device,
    train_dataset: Option<Dataset>,
    eval_dataset: Option<Dataset>,
    compute_metrics: Option<ComputeMetrics>,
    callbacks: Vec<Box<dyn TrainerCallback>>,
    shuffle: bool,
    grad_scaler: GradScalerKwargs,
    scaler: Option<GradScaler>,
    data_parallel: Option<DataParallel>,
    tensor_parallel: Option<TensorParallelHook<M>>,
}

impl<B, M, C> Trainer<B, M, C>
where
    B: AutodiffBackend,
    M: TrainableModel<B> + AutodiffModule<B>,
    M::InnerModule: TrainableModel<B::InnerBackend>,
    C: Collator + Clone + 'static,
{
    /// A trainer; the arguments are validated first.
    pub fn new(args: TrainingArguments, model: M, collator: C, device: B::Device) -> Result<Self> {
        args.validate()?;
        Ok(Self {
            args,
            model: model.with_stable_param_ids(),
            state: TrainerState::default(),
            collator,
            device,
            train_dataset: None,
            eval_dataset: None,
            compute_metrics: None,
            callbacks: Vec::new(),
            shuffle: true,
            grad_scaler: GradScalerKwargs::default(),
            scaler: None,
            data_parallel: None,
            tensor_parallel: None,
        })
    }

    /// Trains data parallel over `group`, as HF's Trainer under `torchrun` / accelerate (DDP):
    /// this rank reads its shard of each epoch ([`DataLoader::distributed`]: the same
    /// permutation on every rank, padded as torch's `DistributedSampler`), starts from rank
    /// 0's weights, and averages the gradients over ranks once per optimizer step (none on
    /// the micro-steps of gradient accumulation), in buckets ([`DataParallel`]). So every rank
    /// takes the same steps, as one process on `size` times the per-device batch would. The
    /// logged loss is the mean over ranks; rank 0 writes checkpoints, to which every rank adds
    /// its own random state (`rng_state_{rank}.json`, restored on resuming); each rank draws
    /// its own dropout masks. Evaluation (`evaluate`, `predict`, and during training) deals
    /// the evaluation batches over the ranks as accelerate does and
    /// gathers the results without the shards' repeated rows, so every rank reports exactly
    /// the metrics of one process.
    pub fn data_parallel(mut self, group: std::sync::Arc<dyn ProcessGroup>) -> Self {
        self.data_parallel = (group.size() > 1).then(|| DataParallel::new(group));
        self
    }

    /// `(rank, world size)` of the data-parallel group: `(0, 1)` unless training is
    /// [`data_parallel`](Self::data_parallel). Under [`tensor_parallel`](Self::tensor_parallel)
    /// this is the replica's index (the mesh's data coordinate), which the ranks of one tensor
    /// group share; [`world_process_index`](Self::world_process_index) tells them apart.
    pub fn process_index(&self) -> (usize, usize) {
        self.data_parallel
            .as_ref()
            .map_or((0, 1), |dp| (dp.group().rank(), dp.group().size()))
    }

    /// Trains a model split tensor parallel over `mesh`'s tensor group (Megatron's
    /// `dp × tp`), data parallel over its data group (this calls
    /// [`data_parallel`](Self::data_parallel) with it). The model given to [`Trainer::new`] is
    /// this rank's slice; `gather` puts the whole model together from every rank's slice (a
    /// collective over the tensor group: every rank calls it and gets the whole model) and
    /// `split` takes this rank's slice of a whole model, e.g. for a Llama
    /// `|m| m.gather_tensor_parallel()` and `|m| m.tensor_parallel(tp.clone())`.
    ///
    /// With them the Trainer:
    /// - writes checkpoints of the whole model: every rank gathers, world rank 0 alone writes
    ///   the model and the shared files, each tensor slice's first replica its optimizer state
    ///   (`optimizer_tp{t}.bin`: the moments of slice `t`), every rank its random state
    ///   (`rng_state_{world rank}.json`), and every rank returns once the folder is in place;
    /// - resumes from one (and `load_best_model_at_end`) by loading the whole model and
    ///   splitting it again; the optimizer state needs the same tensor size;
    /// - seeds dropout by the replica, not the world rank: the ranks of a tensor group hold
    ///   the same replicated activations, so they must drop the same units;
    /// - clips by the whole model's gradient norm (a slice's squares summed over the group);
    /// - reports `is_world_process_zero` on world rank 0 alone, which logs.
    ///
    /// Errors: a mesh with pipeline stages ([`TrainError::Argument`] naming its shape): the
    /// Trainer does not run pipeline schedules.
    pub fn tensor_parallel(
        mut self,
        mesh: &DeviceMesh,
        gather: impl Fn(M) -> std::result::Result<M, String> + Send + Sync + 'static,
        split: impl Fn(M) -> std::result::Result<M, String> + Send + Sync + 'static,
    ) -> Result<Self> {
        let shape = mesh.shape();
        if shape.pipeline > 1 {
            return Err(TrainError::Argument {
                field: "mesh".into(),
                message: format!(
                    "a {} x {} x {} (data x pipeline x tensor) mesh has {} pipeline stages:                      the Trainer trains tensor and data parallel, not pipeline parallel",
                    shape.data, shape.pipeline, shape.tensor, shape.pipeline
                ),
            });
        }
        self = self.data_parallel(mesh.data_group().clone());
        self.tensor_parallel = (shape.tensor > 1).then(|| TensorParallelHook {
            world: mesh.world().clone(),
            tensor: mesh.tensor_group().clone(),
            gather: Arc::new(gather),
            split: Arc::new(split),
        });
        Ok(self)
    }

    /// `(rank, size)` of every process of the job: the mesh's world under
    /// [`tensor_parallel`](Self::tensor_parallel), else [`process_index`](Self::process_index).
    pub fn world_process_index(&self) -> (usize, usize) {
        match self.world_group() {
            Some(group) => (group.rank(), group.size()),
            None => (0, 1),
        }
    }

    /// The group over which the ranks agree on checkpoints and resuming: the world under
    /// tensor parallel, else the data-parallel group; `None` for one process.
    fn world_group(&self) -> Option<Arc<dyn ProcessGroup>> {
        match (&self.tensor_parallel, &self.data_parallel) {
            (Some(tp), _) => Some(tp.world.clone()),
            (None, Some(dp)) => Some(dp.group().clone()),
            (None, None) => None,
        }
    }

    /// The whole model: under [`tensor_parallel`](Self::tensor_parallel) gathered from every
    /// rank's slice (a collective: every rank calls it), else [`Self::model`] itself.
    pub fn whole_model(&self) -> Result<M> {
        match &self.tensor_parallel {
            Some(tp) => tp.gather(self.model.clone()),
            None => Ok(self.model.clone()),
        }
    }

    /// HF's `trainer.save_model(dir)`: writes the whole model ([`Self::whole_model`]) with
    /// `save_pretrained` from world rank 0 alone. On several ranks every rank calls it and
    /// returns once the model is written, with an error on every rank when it failed.
    pub fn save_model(&self, dir: &Path) -> Result<()> {
        let whole = self.whole_model();
        let written = whole.and_then(|model| match self.world_process_index().0 {
            0 => model.save_pretrained(dir).map_err(TrainError::Step),
            _ => Ok(()),
        });
        match self.world_group() {
            Some(group) => agree(group.as_ref(), "saving the model", written),
            None => written,
        }
    }

    /// The weights of the `save_pretrained` folder `dir` (a checkpoint) in place of the
    /// model's: under tensor parallel the folder holds the whole model, which is loaded into
    /// the gathered model and split again (every rank calls it).
    fn load_checkpoint_weights(&mut self, dir: &Path) -> Result<()> {
        self.model = match self.tensor_parallel.clone() {
            Some(tp) => {
                let whole = tp
                    .gather(self.model.clone())?
                    .load_weights(dir)
                    .map_err(TrainError::Step)?;
                // The split keeps the names, from which the ids the optimizer state is keyed
                // by are derived.
                tp.split(whole)?.with_stable_param_ids()
            }
            None => self
                .model
                .clone()
                .load_weights(dir)
                .map_err(TrainError::Step)?,
        };
        Ok(())
    }

    /// The name of this rank's optimizer-state file in a checkpoint: `optimizer.bin`, or
    /// under tensor parallel `optimizer_tp{t}.bin` for tensor slice `t` (each slice's moments
    /// are its own; the replicas of a slice hold the same ones).
    fn optimizer_file(&self) -> String {
        match &self.tensor_parallel {
            Some(tp) => format!("optimizer_tp{}.bin", tp.tensor.rank()),
            None => "optimizer.bin".into(),
        }
    }

    /// The tokenized training set (`train_dataset=`).
    pub fn train_dataset(mut self, dataset: Dataset) -> Self {
        self.train_dataset = Some(dataset);
        self
    }

    /// The tokenized evaluation set (`eval_dataset=`).
    pub fn eval_dataset(mut self, dataset: Dataset) -> Self {
        self.eval_dataset = Some(dataset);
        self
    }

    /// The metrics function (`compute_metrics=`).
    pub fn compute_metrics(
        mut self,
        f: impl Fn(&EvalPrediction) -> Result<BTreeMap<String, f64>> + Send + 'static,
    ) -> Self {
        self.compute_metrics = Some(Box::new(f));
        self
    }

    /// Adds a callback (`callbacks=[...]`).
    pub fn callback(mut self, callback: impl TrainerCallback + 'static) -> Self {
        self.callbacks.push(Box::new(callback));
        self
    }

    /// Whether the training set is shuffled each epoch (HF always shuffles; turning it off
    /// makes runs comparable with a sequential sampler).
    pub fn shuffle(mut self, shuffle: bool) -> Self {
        self.shuffle = shuffle;
        self
    }

    /// The loss scaler's settings for `fp16` training (accelerate's `GradScalerKwargs`;
    /// torch's defaults otherwise).
    pub fn grad_scaler(mut self, kwargs: GradScalerKwargs) -> Self {
        self.grad_scaler = kwargs;
        self
    }

    /// The loss scaler as the last `fp16` training left it (`None` without `fp16`).
    pub fn scaler(&self) -> Option<&GradScaler> {
        self.scaler.as_ref()
    }

    fn loader(&self, dataset: &Dataset, batch_size: usize, shuffle: bool) -> Result<DataLoader<C>> {
        let seed = self.args.data_seed.unwrap_or(self.args.seed);
        Ok(DataLoader::new(dataset, self.collator.clone(), batch_size)
            .map_err(|e| TrainError::Step(format!("building the data loader: {e}")))?
            .shuffle(shuffle)
            .seed(seed)
            .num_workers(self.args.dataloader_num_workers))
    }

    /// Trains (resuming from `args.resume_from_checkpoint` when set) and returns the final log
    /// entry (`train_loss`, `train_runtime`, `train_samples_per_second`, ...).
    ///
    /// Training keeps freed memory in the process for the next step
    /// ([`ember_kernels::keep_freed_memory`]).
    ///
    /// With `bf16` / `fp16` the forward and backward passes run under
    /// [`ember_kernels::autocast`]; with `fp16` the loss is scaled by a [`GradScaler`], and a
    /// step whose gradients overflow is skipped (logged at warning level) without advancing
    /// the learning-rate schedule, as HF's Trainer with torch's AdamW does.
    pub fn train(&mut self) -> Result<BTreeMap<String, f64>> {
        ember_kernels::keep_freed_memory();
        let _autocast = self
            .args
            .mixed_precision_dtype()
            .map(ember_kernels::autocast);
        let dataset = self
            .train_dataset
            .clone()
            .ok_or_else(|| TrainError::Step("no train_dataset".into()))?;
        let args = self.args.clone();
        // The replica's index shards the data and seeds dropout; the world rank says who writes.
        let (rank, world) = self.process_index();
        let world_rank = self.world_process_index().0;
        let mut loader = self.loader(&dataset, args.per_device_train_batch_size, self.shuffle)?;
        if let Some(dp) = &self.data_parallel {
            loader = loader
                .distributed(world, rank)
                .map_err(|e| TrainError::Step(format!("sharding the training set: {e}")))?;
            self.model = dp.broadcast_parameters(self.model.clone())?;
        }
        let batches_per_epoch = loader.len();
        if batches_per_epoch == 0 {
            return Err(TrainError::Step("the training set is empty".into()));
        }
        let ga = args.gradient_accumulation_steps;
        let steps_per_epoch = batches_per_epoch.div_ceil(ga).max(1);
        let max_steps = if args.max_steps > 0 {
            args.max_steps as usize
        } else {
            (args.num_train_epochs * steps_per_epoch as f64).ceil() as usize
        };
        let num_epochs = max_steps.div_ceil(steps_per_epoch);
        let schedule = LrSchedule {
            kind: args.lr_scheduler_type,
            base_lr: args.learning_rate,
            warmup_steps: args.warmup_steps_for(max_steps),
            total_steps: max_steps,
        };
        let params = self.model.trainable_params();
        let mut optimizer = GroupedAdamW::<M, B>::new(
            &params,
            args.adam_beta1,
            args.adam_beta2,
            args.adam_epsilon,
            args.weight_decay,
        );
        self.state = TrainerState {
            max_steps,
            logging_steps: args.steps_from(args.logging_steps, max_steps),
            eval_steps: args.steps_from(args.eval_steps_resolved(), max_steps),
            save_steps: args.steps_from(args.save_steps, max_steps),
            train_batch_size: args.train_batch_size(),
            num_train_epochs: num_epochs,
            is_local_process_zero: world_rank == 0,
            is_world_process_zero: world_rank == 0,
            ..TrainerState::default()
        };
        let mut scaler = match args.fp16 {
            true => Some(GradScaler::new(&self.grad_scaler)?),
            false => None,
        };
        // Optimizer steps taken, which the schedule counts: a skipped step does not advance it.
        let mut scheduler_steps = 0;
        // The seed of the dropout masks: `args.seed`, or on resuming the checkpoint's own.
        let mut rng_seed = args.seed;
        let mut saved_next_batch = None;
        if let Some(checkpoint) = args.resume_from_checkpoint.clone() {
            let resumed = self.resume(&checkpoint, optimizer, scaler.as_mut());
            // Every rank leaves together: one that cannot resume (its random state missing)
            // would otherwise leave the others waiting in the first gradient exchange.
            let resumed = match self.world_group() {
                Some(group) => agree(group.as_ref(), "resuming", resumed)?,
                None => resumed?,
            };
            let rng;
            (optimizer, scheduler_steps, rng) = resumed;
            (rng_seed, saved_next_batch) = (rng.seed, rng.next_batch);
        }
        let start = Instant::now();
        let start_step = self.state.global_step;
        let (first_epoch, skip_batches) = (
            start_step / steps_per_epoch,
            (start_step % steps_per_epoch) * ga,
        );
        // The position in the run of the next batch, which the random state records.
        let mut next_batch = first_epoch * batches_per_epoch + skip_batches;
        if let Some(saved) = saved_next_batch.filter(|&saved| saved != next_batch) {
            tracing::warn!(
                "the checkpoint's random state continues at batch {saved} of the run, this run \
                 at batch {next_batch} (the batch size, the number of processes or the \
                 gradient accumulation changed): dropout will not repeat the interrupted run's"
            );
        }
        // Under tensor parallel, the parameters this rank holds a slice of: clipping sums their
        // squares over the tensor group (found once: the split does not change).
        let sliced = match &self.tensor_parallel {
            Some(tp) => {
                let whole = tp.gather(self.model.clone())?.with_stable_param_ids();
                Some((tp.tensor.clone(), sliced_params(&self.model, &whole)))
            }
            None => None,
        };
        let progress = self.progress_bar(max_steps, start_step);
        let (mut loss_since_log, mut steps_since_log, mut loss_total) = (0.0f64, 0usize, 0.0f64);
        let mut stop = self.state.global_step >= max_steps;
        for epoch in first_epoch..num_epochs {
            if stop {
                break;
            }
            let mut accumulator = GradientsAccumulator::<M>::new();
            let (mut micro, mut step_loss) = (0usize, 0.0f64);
            let skip = if epoch == first_epoch {
                skip_batches
            } else {
                0
            };
            for (index, batch) in loader
                .iter::<B>(epoch as u64, &self.device)
                .enumerate()
                .skip(skip)
            {
                let batch = batch
                    .map_err(|e| TrainError::Step(format!("epoch {epoch}, batch {index}: {e}")))?;
                // Dropout masks depend only on the seed and the position in the run, so that a
                // resumed run draws the same ones as an uninterrupted run.
                let position = epoch * batches_per_epoch + index;
                B::seed(&self.device, dropout_seed(rng_seed, position, rank));
                next_batch = position + 1;
                let ModelOutput { loss, .. } =
                    self.model.forward_batch(batch).map_err(TrainError::Step)?;
                let loss = if ga > 1 {
                    loss.div_scalar(ga as f64)
                } else {
                    loss
                };
                let value: f64 = loss.clone().into_scalar().elem();
                // In float16 an overflow is the scaler's business: the step is skipped.
                if !value.is_finite() && scaler.is_none() {
                    return Err(TrainError::Step(format!(
                        "the loss is {value} at step {}",
                        self.state.global_step + 1
                    )));
                }
                step_loss += value;
                let loss = match &scaler {
                    Some(scaler) => scaler.scale(loss),
                    None => loss,
                };
                accumulator.accumulate(
                    &self.model,
                    GradientsParams::from_grads(loss.backward(), &self.model),
                );
                micro += 1;
                if !micro.is_multiple_of(ga) && index + 1 != batches_per_epoch {
                    continue;
                }
                let mut grads = accumulator.grads();
                if let Some(dp) = &self.data_parallel {
                    grads = dp.all_reduce_gradients(&self.model, grads)?;
                    let mut mean = [step_loss as f32];
                    dp.group().all_reduce(&mut mean, ReduceOp::Avg)?;
                    step_loss = f64::from(mean[0]);
                }
                let mut found_inf = scaler
                    .as_ref()
                    .is_some_and(|s| s.unscale::<B>(&mut grads, &params));
                let grad_norm = match &sliced {
                    Some((tensor, sliced)) => {
                        // An overflow in one slice skips the step on every slice.
                        if scaler.is_some() {
                            let mut flag = [f32::from(u8::from(found_inf))];
                            tensor.all_reduce(&mut flag, ReduceOp::Max)?;
                            found_inf = flag[0] > 0.0;
                        }
                        clip_grad_norm_sliced::<B>(
                            &mut grads,
                            &params,
                            sliced,
                            tensor.as_ref(),
                            args.max_grad_norm,
                        )?
                    }
                    None => clip_grad_norm::<B>(&mut grads, &params, args.max_grad_norm),
                };
                let lr = schedule.lr(scheduler_steps);
                if let Some(scaler) = scaler.as_mut() {
                    let used = scaler.get_scale();
                    scaler.update(found_inf);
                    if found_inf {
                        tracing::warn!(
                            "step {}: inf / NaN gradients at loss scale {used}: optimizer step \
                             skipped, scale now {}",
                            self.state.global_step + 1,
                            scaler.get_scale()
                        );
                    }
                }
                if !found_inf {
                    self.model = optimizer.step(lr, self.model.clone(), grads, &params);
                    scheduler_steps += 1;
                }
                self.state.global_step += 1;
                self.state.epoch = epoch as f64 + (index + 1) as f64 / batches_per_epoch as f64;
                loss_since_log += step_loss;
                loss_total += step_loss;
                steps_since_log += 1;
                step_loss = 0.0;
                progress.set_position(self.state.global_step as u64);
                let step = self.state.global_step;
                let log_now = args.logging_strategy == IntervalStrategy::Steps
                    && (step.is_multiple_of(self.state.logging_steps)
                        || (step == 1 && args.logging_first_step));
                if log_now {
                    // HF logs the learning rate that the step just taken used.
                    let entry =
                        self.log_train(loss_since_log / steps_since_log as f64, grad_norm, lr);
                    progress.set_message(format!("loss {:.4} lr {lr:.2e}", entry["loss"]));
                    (loss_since_log, steps_since_log) = (0.0, 0);
                }
                let mut control = Control::default();
                for callback in &mut self.callbacks {
                    control.should_training_stop |= callback
                        .on_step_end(&self.args, &self.state)
                        .should_training_stop;
                }
                if args.eval_strategy == IntervalStrategy::Steps
                    && step.is_multiple_of(self.state.eval_steps)
                {
                    control.should_training_stop |=
                        self.evaluate_during_training()?.should_training_stop;
                }
                if args.save_strategy == IntervalStrategy::Steps
                    && step.is_multiple_of(self.state.save_steps)
                {
                    let rng = self.rng_state(rng_seed, next_batch);
                    self.save_checkpoint(&optimizer, scheduler_steps, scaler.as_ref(), &rng)?;
                }
                stop = control.should_training_stop || step >= max_steps;
                if stop {
                    break;
                }
            }
            if args.logging_strategy == IntervalStrategy::Epoch && steps_since_log > 0 {
                self.log_train(
                    loss_since_log / steps_since_log as f64,
                    f64::NAN,
                    schedule.lr(scheduler_steps),
                );
                (loss_since_log, steps_since_log) = (0.0, 0);
            }
            if args.eval_strategy == IntervalStrategy::Epoch {
                stop |= self.evaluate_during_training()?.should_training_stop;
            }
            if args.save_strategy == IntervalStrategy::Epoch {
                let rng = self.rng_state(rng_seed, next_batch);
                self.save_checkpoint(&optimizer, scheduler_steps, scaler.as_ref(), &rng)?;
            }
        }
        progress.finish_and_clear();
        self.scaler = scaler;
        if args.load_best_model_at_end {
            if let Some(best) = self.state.best_model_checkpoint.clone() {
                tracing::info!(
                    "loading the best model from {} (score {:?})",
                    best.display(),
                    self.state.best_metric
                );
                self.load_checkpoint_weights(&best)?;
            }
        }
        let runtime = start.elapsed().as_secs_f64();
        let steps_run = (self.state.global_step - start_step).max(1);
        let samples = (steps_run * args.train_batch_size() * ga) as f64;
        let mut summary: BTreeMap<String, f64> = BTreeMap::new();
        summary.insert("train_runtime".into(), runtime);
        summary.insert("train_samples_per_second".into(), samples / runtime);
        summary.insert("train_steps_per_second".into(), steps_run as f64 / runtime);
        summary.insert("train_loss".into(), loss_total / steps_run as f64);
        summary.insert("epoch".into(), self.state.epoch);
        self.push_log(
            summary
                .iter()
                .map(|(k, v)| (k.clone(), Value::from(*v)))
                .collect(),
        );
        Ok(summary)
    }

    fn progress_bar(&self, max_steps: usize, position: usize) -> indicatif::ProgressBar {
        if self.args.disable_tqdm || self.world_process_index().0 != 0 {
            return indicatif::ProgressBar::hidden();
        }
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(max_steps as u64),
            indicatif::ProgressDrawTarget::stderr(),
        );
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} [{elapsed}<{eta}, {per_sec}] {msg}",
            )
            .expect("a valid template"),
        );
        bar.set_position(position as u64);
        bar
    }

    fn log_train(&mut self, loss: f64, grad_norm: f64, learning_rate: f64) -> Map<String, Value> {
        let mut entry = Map::new();
        entry.insert("loss".into(), loss.into());
        if grad_norm.is_finite() {
            entry.insert("grad_norm".into(), grad_norm.into());
        }
        entry.insert("learning_rate".into(), learning_rate.into());
        self.push_log(entry.clone());
        entry
    }

    fn push_log(&mut self, mut entry: Map<String, Value>) {
        entry.insert("epoch".into(), self.state.epoch.into());
        entry.insert("step".into(), self.state.global_step.into());
        // Every rank holds the same log; one writes it.
        if self.world_process_index().0 == 0 {
            tracing::info!("{}", serde_json::Value::Object(entry.clone()));
        }
        for callback in &mut self.callbacks {
            callback.on_log(&self.args, &self.state, &entry);
        }
        self.state.log_history.push(entry);
    }

    fn evaluate_during_training(&mut self) -> Result<Control> {
        let Some(dataset) = self.eval_dataset.clone() else {
            return Err(TrainError::Argument {
                field: "eval_strategy".into(),
                message: "evaluation during training needs an eval_dataset".into(),
            });
        };
        let metrics = self.evaluate(&dataset)?;
        let mut control = Control::default();
        for callback in &mut self.callbacks {
            control.should_training_stop |= callback
                .on_evaluate(&self.args, &self.state, &metrics)
                .should_training_stop;
        }
        if let Some(name) = self.args.metric_for_best_model_resolved() {
            let value = *metrics.get(&name).ok_or_else(|| TrainError::Argument {
                field: "metric_for_best_model".into(),
                message: format!(
                    "`{name}` is not among the evaluation metrics {:?}",
                    metrics.keys().collect::<Vec<_>>()
                ),
            })?;
            let better = match self.state.best_metric {
                None => true,
                Some(best) if self.args.greater_is_better_resolved() => value > best,
                Some(best) => value < best,
            };
            if better {
                self.state.best_metric = Some(value);
                self.state.best_global_step = Some(self.state.global_step);
                self.state.best_model_checkpoint =
                    Some(self.checkpoint_dir(self.state.global_step));
            }
        }
        Ok(control)
    }

    /// Evaluates on `dataset`: `eval_loss`, the metrics of `compute_metrics` (prefixed `eval_`),
    /// runtime and speed; also appended to `log_history`.
    pub fn evaluate(&mut self, dataset: &Dataset) -> Result<BTreeMap<String, f64>> {
        let (_, metrics) = self.run_prediction(dataset, "eval")?;
        let entry: Map<String, Value> = metrics
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(*v)))
            .collect();
        self.push_log(entry);
        Ok(metrics)
    }

    /// Predicts on `dataset`: logits, arg-max predictions and labels, with `test_*` metrics
    /// when the dataset has labels.
    pub fn predict(&mut self, dataset: &Dataset) -> Result<PredictionOutput> {
        let (predictions, metrics) = self.run_prediction(dataset, "test")?;
        Ok(PredictionOutput {
            predictions,
            metrics,
        })
    }

    fn run_prediction(
        &self,
        dataset: &Dataset,
        prefix: &str,
    ) -> Result<(EvalPrediction, BTreeMap<String, f64>)> {
        let start = Instant::now();
        // HF evaluates under the same autocast as it trains.
        let _autocast = self
            .args
            .mixed_precision_dtype()
            .map(ember_kernels::autocast);
        let model = self.model.valid();
        let loader = self.loader(dataset, self.args.per_device_eval_batch_size, false)?;
        let device = self.device.clone();
        let evaluate_batch = |batch: Batch<B::InnerBackend>| -> Result<EvalBatch> {
            let size = batch.batch_size();
            let labels = batch.labels.clone();
            let ModelOutput { loss, logits } =
                model.forward_batch(batch).map_err(TrainError::Step)?;
            let mut part = EvalPrediction::default();
            collect(&mut part, logits, labels)?;
            Ok(EvalBatch::new(loss.into_scalar().elem(), size, part))
        };
        let mut results = Vec::new();
        match &self.data_parallel {
            None => {
                for batch in loader.iter::<B::InnerBackend>(0, &device) {
                    let batch = batch.map_err(|e| {
                        TrainError::Step(format!("evaluation batch {}: {e}", results.len()))
                    })?;
                    results.push(evaluate_batch(batch)?);
                }
            }
            Some(dp) => {
                results =
                    gathered_evaluation(dp.group().as_ref(), &loader, &device, evaluate_batch)?
            }
        }
        let mut out = EvalPrediction::default();
        let (mut loss_sum, mut counted, batches) = (0.0f64, 0usize, results.len());
        // Summed in the order of one process's batches: every rank, and one process, add the
        // same f64 terms in the same order, so the metrics agree to the last bit.
        for result in results {
            loss_sum += f64::from_bits(result.loss) * result.size as f64;
            counted += result.size;
            result.append_to(&mut out);
        }
        let runtime = start.elapsed().as_secs_f64();
        let mut metrics = BTreeMap::new();
        if counted > 0 {
            metrics.insert(format!("{prefix}_loss"), loss_sum / counted as f64);
        }
        if let Some(f) = &self.compute_metrics {
            for (name, value) in f(&out)? {
                let name = if name.starts_with(&format!("{prefix}_")) {
                    name
                } else {
                    format!("{prefix}_{name}")
                };
                metrics.insert(name, value);
            }
        }
        metrics.insert(format!("{prefix}_runtime"), runtime);
        metrics.insert(
            format!("{prefix}_samples_per_second"),
            counted as f64 / runtime,
        );
        metrics.insert(
            format!("{prefix}_steps_per_second"),
            batches as f64 / runtime,
        );
        Ok((out, metrics))
    }

    /// `output_dir/checkpoint-{step}`.
    pub fn checkpoint_dir(&self, step: usize) -> PathBuf {
        self.args.output_dir.join(format!("checkpoint-{step}"))
    }

    /// This rank's random state, to be saved with a checkpoint: the dropout seed and the
    /// position of the next batch.
    ///
    /// The file is per world rank (`rng_state_{world rank}.json`), though under tensor
    /// parallel the ranks of one tensor group hold the same state: each rank then writes and
    /// reads a file of its own, and no two processes write one file.
    fn rng_state(&self, seed: u64, next_batch: usize) -> RngState {
        let (process_index, num_processes) = self.world_process_index();
        RngState {
            seed,
            global_step: self.state.global_step,
            process_index,
            num_processes,
            next_batch: Some(next_batch),
        }
    }

    /// Writes `output_dir/checkpoint-{global_step}/`: the model (`config.json`,
    /// `model.safetensors`), `trainer_state.json`, `training_args.json`, `optimizer.bin`,
    /// `scheduler.json` (`last_epoch`: the schedule's step count), the random state and, in
    /// `fp16`, `scaler.json` (the [`GradScaler`]'s `state_dict`). The folder is written under a
    /// temporary name and renamed into place, so a crash mid-save leaves the previous
    /// checkpoints untouched and no half checkpoint.
    ///
    /// The random state is `rng_state.json` for one process. In data-parallel training rank 0
    /// writes every other file (every rank holds the same weights and optimizer state), then
    /// each rank writes its own `rng_state_{rank}.json` into the temporary folder (itself
    /// under a temporary name, then renamed), and rank 0 renames the folder into place once
    /// all have: every rank returns after that, with an error on every rank when any failed.
    ///
    /// Under [`tensor_parallel`](Self::tensor_parallel) every rank first gathers the whole
    /// model, which world rank 0 writes; the optimizer state is one file per tensor slice
    /// (`optimizer_tp{t}.bin`), written by the slice's first replica; the random state one
    /// per world rank; the agreement runs over the world.
    fn save_checkpoint(
        &mut self,
        optimizer: &GroupedAdamW<M, B>,
        scheduler_steps: usize,
        scaler: Option<&GradScaler>,
        rng: &RngState,
    ) -> Result<()> {
        let step = self.state.global_step;
        let Some(group) = self.world_group() else {
            let tmp = self
                .args
                .output_dir
                .join(format!(".checkpoint-{step}.tmp-{}", std::process::id()));
            self.write_checkpoint_files(&tmp, &self.model, scheduler_steps, scaler)?;
            let path = tmp.join(self.optimizer_file());
            std::fs::write(&path, optimizer.to_bytes()?)
                .map_err(|source| TrainError::Io { path, source })?;
            let path = tmp.join(rng_state_file(0, 1));
            std::fs::write(&path, rng.to_json())
                .map_err(|source| TrainError::Io { path, source })?;
            return self.publish_checkpoint(&tmp);
        };
        let group = group.as_ref();
        let (rank, world) = (group.rank(), group.size());
        // Every rank must find the folder: its name is fixed rather than rank 0's process id.
        let tmp = self.args.output_dir.join(format!(".checkpoint-{step}.tmp"));
        let what = format!("saving checkpoint-{step}");
        // Every rank takes part in gathering a split model, though rank 0 alone writes it.
        let whole = agree(group, &what, self.whole_model())?;
        let shared = match rank {
            0 => self.write_checkpoint_files(&tmp, &whole, scheduler_steps, scaler),
            _ => Ok(()),
        };
        drop(whole);
        agree(group, &what, shared)?;
        // The optimizer state: rank 0's under data parallel (every rank holds the same), each
        // slice's first replica's under tensor parallel (the mesh numbers a slice's first
        // replica as the slice's index, below the tensor size).
        let writes_optimizer = match &self.tensor_parallel {
            Some(tp) => rank < tp.tensor.size(),
            None => rank == 0,
        };
        let own = optimizer
            .to_bytes()
            .and_then(|bytes| match writes_optimizer {
                true => {
                    crate::accelerator::write_atomic(&tmp.join(self.optimizer_file()), &bytes, rank)
                }
                false => Ok(()),
            })
            .and_then(|()| {
                crate::accelerator::write_atomic(
                    &tmp.join(rng_state_file(rank, world)),
                    &rng.to_json(),
                    rank,
                )
            });
        agree(group, &what, own)?;
        let published = match rank {
            0 => self.publish_checkpoint(&tmp),
            _ => Ok(()),
        };
        agree(group, &what, published)
    }

    /// Writes a checkpoint's files but the optimizer and random states into the fresh folder
    /// `tmp`, with `model` (the whole model) as its weights.
    fn write_checkpoint_files(
        &self,
        tmp: &Path,
        model: &M,
        scheduler_steps: usize,
        scaler: Option<&GradScaler>,
    ) -> Result<()> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| TrainError::Io { path, source }
        };
        // A folder left by a crash in the middle of an earlier save of this step.
        let _ = std::fs::remove_dir_all(tmp);
        std::fs::create_dir_all(tmp).map_err(io(tmp))?;
        model.save_pretrained(tmp).map_err(TrainError::Step)?;
        let write = |name: &str, bytes: &[u8]| {
            std::fs::write(tmp.join(name), bytes).map_err(io(&tmp.join(name)))
        };
        write("trainer_state.json", self.state.to_json_string().as_bytes())?;
        write("training_args.json", self.args.to_json_string().as_bytes())?;
        write(
            "scheduler.json",
            serde_json::json!({ "last_epoch": scheduler_steps })
                .to_string()
                .as_bytes(),
        )?;
        if let Some(scaler) = scaler {
            write("scaler.json", scaler.state_dict().to_string().as_bytes())?;
        }
        Ok(())
    }

    /// Renames the complete folder `tmp` to `checkpoint-{global_step}` and rotates.
    fn publish_checkpoint(&self, tmp: &Path) -> Result<()> {
        let dir = self.checkpoint_dir(self.state.global_step);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|source| TrainError::Io {
                path: dir.clone(),
                source,
            })?;
        }
        std::fs::rename(tmp, &dir).map_err(|source| TrainError::Io { path: dir, source })?;
        self.rotate_checkpoints()
    }

    /// `save_total_limit`: deletes the oldest checkpoints beyond the limit, never the best.
    fn rotate_checkpoints(&self) -> Result<()> {
        let Some(limit) = self.args.save_total_limit else {
            return Ok(());
        };
        let mut steps: Vec<usize> = std::fs::read_dir(&self.args.output_dir)
            .map_err(|source| TrainError::Io {
                path: self.args.output_dir.clone(),
                source,
            })?
            .filter_map(|e| {
                e.ok()?
                    .file_name()
                    .to_str()?
                    .strip_prefix("checkpoint-")?
                    .parse()
                    .ok()
            })
            .collect();
        steps.sort_unstable();
        let best = self.state.best_global_step;
        // HF keeps one more when the best is not the newest and the limit is 1.
        let limit = if limit == 1 && best.is_some_and(|b| Some(&b) != steps.last()) {
            2
        } else {
            limit
        };
        let mut excess = steps.len().saturating_sub(limit);
        for step in steps {
            if excess == 0 {
                break;
            }
            if Some(step) == best {
                continue;
            }
            let dir = self.checkpoint_dir(step);
            std::fs::remove_dir_all(&dir).map_err(|source| TrainError::Io { path: dir, source })?;
            excess -= 1;
        }
        Ok(())
    }

    /// Restores the model, the optimizer, the trainer state, (with `fp16`) the scaler and this
    /// rank's random state from `checkpoint`; returns the optimizer, the schedule's step count
    /// and the random state.
    ///
    /// Errors name the file at fault: [`TrainError::Io`] for a missing one (the random state
    /// of this rank included), [`TrainError::File`] for a corrupt or truncated one.
    fn resume(
        &mut self,
        checkpoint: &Path,
        optimizer: GroupedAdamW<M, B>,
        scaler: Option<&mut GradScaler>,
    ) -> Result<(GroupedAdamW<M, B>, usize, RngState)> {
        let state = TrainerState::load(&checkpoint.join("trainer_state.json"))?;
        self.load_checkpoint_weights(checkpoint)?;
        let path = checkpoint.join(self.optimizer_file());
        let bytes = std::fs::read(&path).map_err(|source| TrainError::Io {
            path: path.clone(),
            source,
        })?;
        let optimizer =
            optimizer
                .load_bytes(bytes, &self.device)
                .map_err(|e| TrainError::File {
                    path,
                    message: e.to_string(),
                })?;
        let (rank, world) = self.world_process_index();
        let rng = RngState::read(checkpoint, rank, world)?;
        let read_json = |name: &str| -> Result<Option<Value>> {
            let path = checkpoint.join(name);
            if !path.exists() {
                return Ok(None);
            }
            let text = std::fs::read_to_string(&path).map_err(|source| TrainError::Io {
                path: path.clone(),
                source,
            })?;
            serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| TrainError::File {
                    path,
                    message: e.to_string(),
                })
        };
        // A checkpoint without scheduler.json (older Ember) counted every step.
        let scheduler_steps = match read_json("scheduler.json")? {
            Some(value) => value["last_epoch"]
                .as_u64()
                .ok_or_else(|| TrainError::File {
                    path: checkpoint.join("scheduler.json"),
                    message: "`last_epoch` is not a step count".into(),
                })? as usize,
            None => state.global_step,
        };
        if let Some(scaler) = scaler {
            let path = checkpoint.join("scaler.json");
            let value = read_json("scaler.json")?.ok_or_else(|| TrainError::File {
                path: path.clone(),
                message: "fp16 training resumes the loss scaler, but the checkpoint has none \
                          (it was not saved by an fp16 run)"
                    .into(),
            })?;
            scaler.load_state_dict(&value, &path)?;
        }
        if self.world_process_index().0 == 0 {
            tracing::info!(
                "resuming from {} at step {}",
                checkpoint.display(),
                state.global_step
            );
        }
        self.state.global_step = state.global_step;
        self.state.epoch = state.epoch;
        self.state.log_history = state.log_history;
        self.state.best_metric = state.best_metric;
        self.state.best_global_step = state.best_global_step;
        self.state.best_model_checkpoint = state.best_model_checkpoint;
        Ok((optimizer, scheduler_steps, rng))
    }
}

/// HF's `get_last_checkpoint(folder)`: the `checkpoint-{step}` folder of `output_dir` with the
/// highest step, or `None` when there is none. Folders still under a temporary name (a save
/// that a crash interrupted) are not checkpoints.
///
/// Errors: [`TrainError::Io`] naming `output_dir` when it cannot be listed.
pub fn get_last_checkpoint(output_dir: &Path) -> Result<Option<PathBuf>> {
    let entries = std::fs::read_dir(output_dir).map_err(|source| TrainError::Io {
        path: output_dir.to_owned(),
        source,
    })?;
    let newest = entries
        .filter_map(|e| {
            let e = e.ok()?;
            let step: usize = e
                .file_name()
                .to_str()?
                .strip_prefix("checkpoint-")?
                .parse()
                .ok()?;
            e.path().is_dir().then_some((step, e.path()))
        })
        .max_by_key(|(step, _)| *step);
    Ok(newest.map(|(_, path)| path))
}

/// `result` on every rank of `group` when it is `Ok` on all: a rank's own error, or on the
/// others an error naming the rank that failed `what`. A collective: every rank calls it, so a
/// failure on one rank ends the operation on all rather than leaving them waiting.
fn agree<T>(group: &dyn ProcessGroup, what: &str, result: Result<T>) -> Result<T> {
    let flags = group.all_gather(&[f32::from(u8::from(result.is_err()))])?;
    let value = result?;
    match flags.iter().position(|f| *f != 0.0) {
        Some(rank) => Err(TrainError::Step(format!(
            "{what}: rank {rank} failed (see its error)"
        ))),
        None => Ok(value),
    }
}

/// Appends one evaluation batch's logits, arg-max predictions and labels.
fn collect<B: Backend>(
    out: &mut EvalPrediction,
    logits: burn::tensor::Tensor<B, 3>,
    labels: Option<BatchLabels<B>>,
) -> Result<()> {
    let [batch, positions, classes] = logits.dims();
    out.num_classes = classes;
    let values: Vec<f32> = logits
        .into_data()
        .convert::<f32>()
        .to_vec()
        .map_err(|e| TrainError::Step(format!("reading logits: {e:?}")))?;
    let labels: Vec<i64> = match labels {
        Some(BatchLabels::Sequence(t)) => {
            t.into_data().convert::<i64>().to_vec().unwrap_or_default()
        }
        Some(BatchLabels::Tokens(t)) => t.into_data().convert::<i64>().to_vec().unwrap_or_default(),
        None => Vec::new(),
    };
    let per_example = labels.len() / batch.max(1);
    for (i, example) in values.chunks(positions * classes).enumerate() {
        out.predictions
            .push(example.chunks(classes).map(argmax).collect());
        out.logits.push(example.to_vec());
        out.label_ids.push(
            labels
                .get(i * per_example..(i + 1) * per_example)
                .map(<[i64]>::to_vec)
                .unwrap_or_default(),
        );
    }
    Ok(())
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold(0, |best, (i, v)| if *v > row[best] { i } else { best })
}

/// Runs one forward pass of `model` on `batch`: used by implementations of
/// [`TrainableModel::forward_batch`] to check the batch carries labels.
pub fn require_labels<B: Backend>(
    batch: &Batch<B>,
) -> std::result::Result<&BatchLabels<B>, String> {
    batch.labels.as_ref().ok_or_else(|| {
        "the batch has no labels (the dataset needs a `labels` / `label` column)".to_owned()
    })
}

/// One evaluation batch's results, as ranks exchange them: floats as their bits, so that the
/// gathered values are exactly those computed.
#[derive(serde::Serialize, serde::Deserialize)]
struct EvalBatch {
    /// The batch's mean loss (`f64` bits).
    loss: u64,
    /// The rows of the batch.
    size: usize,
    num_classes: usize,
    /// Each row's logits (`f32` bits).
    logits: Vec<Vec<u32>>,
    predictions: Vec<Vec<usize>>,
    label_ids: Vec<Vec<i64>>,
}

impl EvalBatch {
    fn new(loss: f64, size: usize, part: EvalPrediction) -> Self {
        Self {
            loss: loss.to_bits(),
            size,
            num_classes: part.num_classes,
            logits: part
                .logits
                .into_iter()
                .map(|row| row.into_iter().map(f32::to_bits).collect())
                .collect(),
            predictions: part.predictions,
            label_ids: part.label_ids,
        }
    }

    fn append_to(self, out: &mut EvalPrediction) {
        out.num_classes = self.num_classes;
        out.logits.extend(
            self.logits
                .into_iter()
                .map(|row| row.into_iter().map(f32::from_bits).collect()),
        );
        out.predictions.extend(self.predictions);
        out.label_ids.extend(self.label_ids);
    }
}

/// Data-parallel evaluation, as HF's Trainer does it through accelerate: the evaluation set's
/// batches are dealt over the ranks (accelerate's `BatchSamplerShard`), each rank evaluates
/// its own, and the results are gathered and put back in the order of one process's batches,
/// without the rows the shards repeat to give every rank as many batches
/// (`gather_for_metrics`). The repeats are left out before the forward pass rather than after
/// the gather: each batch then holds the rows of one process's batch (padded alike), so the
/// loss and the logits are one process's exactly, where HF's `eval_loss` would also average in
/// the repeated rows of the last batch.
fn gathered_evaluation<B: Backend, C: Collator + 'static>(
    group: &dyn ProcessGroup,
    loader: &DataLoader<C>,
    device: &B::Device,
    evaluate_batch: impl Fn(Batch<B>) -> Result<EvalBatch>,
) -> Result<Vec<EvalBatch>> {
    let (rank, world) = (group.rank(), group.size());
    let shard = crate::accelerator::shard_batches(
        &loader.batch_indices(0),
        loader.batch_size(),
        world,
        rank,
        false,
    );
    let mut own = Vec::with_capacity(shard.len());
    let mut failure = None;
    for (step, slots) in shard.iter().enumerate() {
        let rows: Vec<usize> = slots.iter().filter(|s| !s.padding).map(|s| s.row).collect();
        if rows.is_empty() {
            own.push(None);
            continue;
        }
        let batch = loader
            .examples()
            .examples(&rows)
            .and_then(|rows| loader.collator().collate::<B>(&rows, device))
            .map_err(|e| {
                TrainError::Step(format!("evaluation batch {}: {e}", step * world + rank))
            });
        match batch.and_then(&evaluate_batch) {
            Ok(result) => own.push(Some(result)),
            Err(e) => {
                // Still join the gather below, so that the other ranks fail rather than wait.
                failure = Some(e);
                break;
            }
        }
    }
    let bytes = match &failure {
        Some(_) => Vec::new(),
        None => serde_json::to_vec(&own)
            .map_err(|e| TrainError::Step(format!("sending evaluation results: {e}")))?,
    };
    let parts = crate::accelerator::gather_bytes(group, bytes)?;
    if let Some(e) = failure {
        return Err(e);
    }
    let mut per_rank = Vec::with_capacity(world);
    for (r, part) in parts.iter().enumerate() {
        if part.is_empty() {
            return Err(TrainError::Step(format!("evaluation failed on rank {r}")));
        }
        let batches: Vec<Option<EvalBatch>> = serde_json::from_slice(part)
            .map_err(|e| TrainError::Step(format!("reading rank {r}'s evaluation results: {e}")))?;
        per_rank.push(batches.into_iter());
    }
    // Rank r's batch s is batch s · world + r of one process.
    let mut ordered = Vec::new();
    for _ in 0..shard.len() {
        for batches in per_rank.iter_mut() {
            if let Some(Some(result)) = batches.next() {
                ordered.push(result);
            }
        }
    }
    Ok(ordered)
}
