//! [`PipelineParallel`]: GPipe and 1F1B pipeline parallel over burn autodiff.
//!
//! Each rank of the pipeline group holds one *stage*, a contiguous range of the model's layers
//! (rank `r` is stage `r`). A batch is cut into micro-batches; each micro-batch's activations
//! flow forward stage to stage with [`ProcessGroup::send`] / [`recv`](ProcessGroup::recv), the
//! last stage turns them into a loss, and the gradients of the activations flow back the same
//! way. Every stage accumulates its own parameters' gradients over the micro-batches, so after
//! one [`train_step`](PipelineParallel::train_step) each stage holds the gradient of the mean
//! loss for its layers and can take its optimizer step alone.
//!
//! Two schedules ([`Schedule`]), shown for 4 stages and 4 micro-batches (`F2`: the forward
//! pass of micro-batch 2, `B2` its backward pass; time runs to the right):
//!
//! ```text
//! GPipe
//! stage 0  F0 F1 F2 F3                   B0 B1 B2 B3
//! stage 1     F0 F1 F2 F3             B0 B1 B2 B3
//! stage 2        F0 F1 F2 F3       B0 B1 B2 B3
//! stage 3           F0 F1 F2 F3 B0 B1 B2 B3
//!
//! 1F1B
//! stage 0  F0 F1 F2 F3          B0    B1    B2    B3
//! stage 1     F0 F1 F2       B0 F3 B1    B2    B3
//! stage 2        F0 F1    B0 F2 B1 F3 B2    B3
//! stage 3           F0 B0 F1 B1 F2 B2 F3 B3
//! ```
//!
//! * **GPipe** runs every forward pass, then every backward pass: simple, and each stage
//!   keeps the activations of *all* micro-batches alive until its backward phase.
//! * **1F1B** (PipeDream-Flush, Megatron-LM's default): stage `s` of `S` runs `S - s - 1`
//!   warm-up forward passes, then alternates one forward and one backward, then drains the
//!   remaining backwards. The bubble is the same as GPipe's, but at most `S - s` micro-batches
//!   are in flight on stage `s` whatever their number, so more micro-batches (a smaller bubble)
//!   cost no activation memory.
//!
//! (Each step drawn as one time slot, a backward as long as a forward; both schedules take
//! the same time, with the same idle "bubble" of `num_stages - 1` slots each way, but GPipe's
//! stage 0 holds 4 micro-batches' activations at once where 1F1B's holds them too, and 1F1B's
//! stage 3 holds only 1: with more micro-batches GPipe's grows, 1F1B's stays at `S - s`.)
//!
//! Messages carry a small header (micro-batch, kind, rank and dimensions of the tensor) before
//! the values, so stages need not know each other's shapes, and a stage that receives the
//! wrong thing reports it as a [`DistributedError::InvalidArgument`] rather than computing on
//! garbage. Where both neighbours would send to each other at once (1F1B's steady state), the
//! even stage sends first and the odd one receives first, so the schedule cannot deadlock even
//! on a group whose `send` waits for the matching `recv` (MPI's rendezvous protocol for large
//! messages).

use crate::error::{DistributedError, Result};
use crate::group::ProcessGroup;
use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The order in which a stage runs the forward and backward passes of its micro-batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// GPipe: every forward pass, then every backward pass. Every micro-batch's activations
    /// are alive at once on every stage.
    GPipe,
    /// 1F1B (PipeDream-Flush, Megatron-LM / DeepSpeed's default): warm-up forwards, then one
    /// forward / one backward, then cool-down backwards. At most `num_stages - stage`
    /// micro-batches' activations are alive on a stage.
    OneFOneB,
}

/// One step of a stage's schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipelineStep {
    /// The forward pass of micro-batch `i`.
    Forward(usize),
    /// The backward pass of micro-batch `i`.
    Backward(usize),
}

impl Schedule {
    /// The steps stage `stage` of `num_stages` runs for `micro_batches` micro-batches, in order.
    /// Public so that a schedule can be inspected (and tested) without running it.
    pub fn steps(self, num_stages: usize, stage: usize, micro_batches: usize) -> Vec<PipelineStep> {
        let m = micro_batches;
        match self {
            Schedule::GPipe => (0..m)
                .map(PipelineStep::Forward)
                .chain((0..m).map(PipelineStep::Backward))
                .collect(),
            Schedule::OneFOneB => {
                let warmup = num_stages.saturating_sub(stage + 1).min(m);
                let mut steps: Vec<_> = (0..warmup).map(PipelineStep::Forward).collect();
                for k in 0..m - warmup {
                    steps.push(PipelineStep::Forward(warmup + k));
                    steps.push(PipelineStep::Backward(k));
                }
                steps.extend((m - warmup..m).map(PipelineStep::Backward));
                steps
            }
        }
    }
}

/// What a stage's forward pass hands on.
#[derive(Debug, Clone)]
pub enum StageOutput<B: Backend, const D: usize> {
    /// The activations to send to the next stage (every stage but the last).
    Activations(Tensor<B, D>),
    /// The micro-batch's scalar loss (`[1]`, the last stage only): the engine divides it by
    /// the number of micro-batches before its backward pass.
    Loss(Tensor<B, 1>),
}

/// A burn module that runs one stage of a pipeline: its layers' forward pass on the
/// activations the previous stage sent (or on the micro-batch itself on the first stage).
///
/// Any `#[derive(Module)]` struct can be a stage by implementing [`forward_stage`]: the
/// engine takes the gradients of its parameters with burn's `GradientsParams`, so nothing else
/// is asked of it. `D` is the rank of the activations passed between stages (3 for a
/// transformer's `[batch, seq, hidden]`).
///
/// [`forward_stage`]: PipelineStage::forward_stage
pub trait PipelineStage<B: AutodiffBackend, const D: usize>: AutodiffModule<B> {
    /// One micro-batch. Every stage is given the same list, so that the first stage can read
    /// the inputs, the last the labels, and the ones between anything they need besides the
    /// activations (an attention mask).
    type MicroBatch;
    /// The stage's own error (a model's input error); the engine wraps it in
    /// [`DistributedError::Stage`].
    type Error: std::error::Error + Send + Sync + 'static;

    /// The stage's forward pass: `input` is what the previous stage sent (`None` on the first
    /// stage). Returns [`StageOutput::Activations`] on every stage but the last, which returns
    /// [`StageOutput::Loss`].
    fn forward_stage(
        &self,
        input: Option<Tensor<B, D>>,
        micro_batch: &Self::MicroBatch,
    ) -> std::result::Result<StageOutput<B, D>, Self::Error>;
}

/// What one [`PipelineParallel::train_step`] returns on a stage.
#[derive(Debug)]
pub struct PipelineStepOutput {
    /// This stage's parameters' gradients of the mean loss over the micro-batches (each
    /// micro-batch's loss divided by their number, as Megatron-LM and DeepSpeed scale it), for
    /// this stage's optimizer.
    pub grads: GradientsParams,
    /// The mean of the micro-batches' losses, on every stage (broadcast from the last), so
    /// that every rank can log it.
    pub loss: f32,
    /// The largest number of micro-batches whose activations were alive at once on this
    /// stage: the memory the schedule cost.
    pub peak_in_flight: usize,
}

/// Pipeline parallel over a [`ProcessGroup`] whose rank `r` runs stage `r`.
///
/// Every rank calls [`train_step`](Self::train_step) with its own stage module and the same
/// micro-batches; each gets its own stage's gradients and the mean loss. Combine with data
/// parallel by [`split`](ProcessGroup::split)ting the world into pipeline groups (one per
/// replica) and data-parallel groups (one per stage).
#[derive(Clone)]
pub struct PipelineParallel {
    group: Arc<dyn ProcessGroup>,
    schedule: Schedule,
    micro_batches: usize,
}

impl std::fmt::Debug for PipelineParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipelineParallel")
            .field("stage", &self.stage())
            .field("num_stages", &self.num_stages())
            .field("schedule", &self.schedule)
            .field("micro_batches", &self.micro_batches)
            .finish()
    }
}

/// The most dimensions a tensor sent between stages may have (the header has room for them).
const MAX_DIMS: usize = 8;
/// Header: micro-batch, kind, rank, then `MAX_DIMS` dimensions (unused ones 0).
const HEADER_LEN: usize = 3 + MAX_DIMS;
/// The largest integer every f32 holds exactly: header fields above it would be rounded.
const MAX_EXACT: usize = 1 << 24;

/// What a message between stages carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Activations, to the next stage.
    Activations = 0,
    /// Gradients of the activations, to the previous stage.
    Gradients = 1,
}

/// A micro-batch whose forward pass ran and whose backward pass has not: its graph is alive.
struct InFlight<B: AutodiffBackend, const D: usize> {
    input: Option<Tensor<B, D>>,
    output: StageOutput<B, D>,
}

impl PipelineParallel {
    /// Pipeline parallel over `group` (one stage per rank) with `micro_batches` micro-batches
    /// per step, run in `schedule`'s order.
    ///
    /// Fails with [`DistributedError::InvalidArgument`] for 0 micro-batches, or more than an
    /// f32 header can number.
    pub fn new(
        group: Arc<dyn ProcessGroup>,
        schedule: Schedule,
        micro_batches: usize,
    ) -> Result<Self> {
        if micro_batches == 0 || micro_batches > MAX_EXACT {
            return Err(DistributedError::InvalidArgument {
                op: "PipelineParallel::new",
                message: format!("micro_batches = {micro_batches}: give 1 to {MAX_EXACT}"),
            });
        }
        Ok(Self {
            group,
            schedule,
            micro_batches,
        })
    }

    /// This rank's stage, `0..num_stages()`: which layers it should hold.
    pub fn stage(&self) -> usize {
        self.group.rank()
    }

    /// The number of stages (the pipeline group's size).
    pub fn num_stages(&self) -> usize {
        self.group.size()
    }

    /// Whether this stage reads the micro-batches' inputs (it receives nothing).
    pub fn is_first_stage(&self) -> bool {
        self.stage() == 0
    }

    /// Whether this stage computes the loss (it sends nothing forward).
    pub fn is_last_stage(&self) -> bool {
        self.stage() + 1 == self.num_stages()
    }

    /// The schedule.
    pub fn schedule(&self) -> Schedule {
        self.schedule
    }

    /// Micro-batches per step.
    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    /// The pipeline group, for what a stage exchanges besides activations (tied embeddings
    /// between the first and last stage).
    pub fn group(&self) -> &Arc<dyn ProcessGroup> {
        &self.group
    }

    /// One training step of `stage` (this rank's stage) over `micro_batches` (the same list on
    /// every rank, as long as [`micro_batches`](Self::micro_batches)): every forward and
    /// backward pass in the schedule's order, exchanging activations and their gradients with
    /// the neighbouring stages.
    ///
    /// Errors: a list of the wrong length, a stage that returns a loss where it should return
    /// activations (or the reverse), messages whose header does not match (a rank running
    /// another schedule, a tensor of another rank or shape), a stage's own error
    /// ([`DistributedError::Stage`]), and the group's errors (a rank that failed, a timeout).
    pub fn train_step<B, M, const D: usize>(
        &self,
        stage: &M,
        micro_batches: &[M::MicroBatch],
    ) -> Result<PipelineStepOutput>
    where
        B: AutodiffBackend,
        M: PipelineStage<B, D>,
    {
        let (s, num_stages, m) = (self.stage(), self.num_stages(), self.micro_batches);
        if micro_batches.len() != m {
            return Err(DistributedError::InvalidArgument {
                op: "PipelineParallel::train_step",
                message: format!(
                    "{} micro-batches given, the pipeline was built for {m}",
                    micro_batches.len()
                ),
            });
        }
        if D > MAX_DIMS {
            return Err(DistributedError::InvalidArgument {
                op: "PipelineParallel::train_step",
                message: format!("activations of rank {D}: at most {MAX_DIMS} dimensions"),
            });
        }
        let device = stage.devices().into_iter().next().unwrap_or_default();
        let steps = self.schedule.steps(num_stages, s, m);
        // The neighbours' schedules, to tell which messages cross (see `crosses`).
        let prev_steps = (s > 0).then(|| self.schedule.steps(num_stages, s - 1, m));
        let next_steps = (s + 1 < num_stages).then(|| self.schedule.steps(num_stages, s + 1, m));
        let (first, last) = (self.is_first_stage(), self.is_last_stage());
        let mut accumulator = GradientsAccumulator::<M>::new();
        let mut in_flight: BTreeMap<usize, InFlight<B, D>> = BTreeMap::new();
        let mut peak_in_flight = 0;
        let mut loss_sum = 0.0f64;
        // What the last exchange received ahead of the step that needs it.
        let mut ready_activations: Option<(usize, TensorData)> = None;
        let mut ready_gradients: Option<(usize, TensorData)> = None;
        let scale = 1.0 / m as f32;

        for (k, &step) in steps.iter().enumerate() {
            let next = steps.get(k + 1).copied();
            match step {
                PipelineStep::Forward(i) => {
                    let input = if first {
                        None
                    } else {
                        let data = match ready_activations.take() {
                            Some((j, data)) if j == i => data,
                            _ => self.recv_tensor::<D>(s - 1, i, Kind::Activations)?,
                        };
                        Some(Tensor::<B, D>::from_data(data, &device).require_grad())
                    };
                    let output = stage
                        .forward_stage(input.clone(), &micro_batches[i])
                        .map_err(|e| DistributedError::Stage {
                            stage: s,
                            source: Box::new(e),
                        })?;
                    match (&output, last) {
                        (StageOutput::Loss(loss), true) => {
                            if loss.shape().num_elements() != 1 {
                                return Err(self.wrong_output(format!(
                                    "a loss of shape {:?}, not one value",
                                    loss.dims()
                                )));
                            }
                            loss_sum += f64::from(scalar(loss)?);
                        }
                        (StageOutput::Activations(a), false) => {
                            let values = tensor_values(a.clone().inner().into_data())?;
                            let message = (i, Kind::Activations, a.dims().to_vec(), values);
                            match next {
                                // 1F1B's steady state: the next stage sends this stage a
                                // gradient while this one sends it activations.
                                Some(PipelineStep::Backward(j))
                                    if next_steps.as_deref().is_some_and(|n| {
                                        followed_by(
                                            n,
                                            PipelineStep::Backward(j),
                                            PipelineStep::Forward(i),
                                        )
                                    }) =>
                                {
                                    let data =
                                        self.exchange::<D>(s + 1, message, (j, Kind::Gradients))?;
                                    ready_gradients = Some((j, data));
                                }
                                _ => self.send_tensor(s + 1, message)?,
                            }
                        }
                        (StageOutput::Loss(_), false) => {
                            return Err(self.wrong_output(
                                "a loss, but only the last stage computes one".into(),
                            ))
                        }
                        (StageOutput::Activations(_), true) => {
                            return Err(self.wrong_output(
                                "activations, but the last stage must return the loss".into(),
                            ))
                        }
                    }
                    in_flight.insert(i, InFlight { input, output });
                    peak_in_flight = peak_in_flight.max(in_flight.len());
                }
                PipelineStep::Backward(i) => {
                    let InFlight { input, output } =
                        in_flight
                            .remove(&i)
                            .ok_or_else(|| DistributedError::InvalidArgument {
                                op: "PipelineParallel::train_step",
                                message: format!(
                                    "stage {s}: backward of micro-batch {i} before its forward"
                                ),
                            })?;
                    let grads = match output {
                        StageOutput::Loss(loss) => loss.mul_scalar(scale).backward(),
                        StageOutput::Activations(out) => {
                            let data = match ready_gradients.take() {
                                Some((j, data)) if j == i => data,
                                _ => self.recv_tensor::<D>(s + 1, i, Kind::Gradients)?,
                            };
                            if data.shape != out.shape() {
                                return Err(DistributedError::InvalidArgument {
                                    op: "PipelineParallel::train_step",
                                    message: format!(
                                        "stage {s}: the gradient of micro-batch {i} has shape {:?}, its activations {:?}",
                                        data.shape,
                                        out.dims()
                                    ),
                                });
                            }
                            let grad_out = Tensor::<B, D>::from_data(data, &device);
                            // d(out · g)/dθ = gᵀ ∂out/∂θ: the chain rule through the stages
                            // after this one, with their Jacobian already applied to g.
                            (out * grad_out).sum().backward()
                        }
                    };
                    let input_grad = match &input {
                        Some(x) => Some(match x.grad(&grads) {
                            Some(g) => tensor_values(g.into_data())?,
                            // A stage that ignores its input: the previous stages get zeros.
                            None => vec![0.0; x.shape().num_elements()],
                        }),
                        None => None,
                    };
                    let dims = input.as_ref().map(|x| x.dims().to_vec());
                    accumulator.accumulate::<B>(stage, GradientsParams::from_grads(grads, stage));
                    if let (Some(values), Some(dims)) = (input_grad, dims) {
                        let message = (i, Kind::Gradients, dims, values);
                        match next {
                            // The previous stage sends its next activations meanwhile.
                            Some(PipelineStep::Forward(j))
                                if prev_steps.as_deref().is_some_and(|p| {
                                    followed_by(
                                        p,
                                        PipelineStep::Forward(j),
                                        PipelineStep::Backward(i),
                                    )
                                }) =>
                            {
                                let data =
                                    self.exchange::<D>(s - 1, message, (j, Kind::Activations))?;
                                ready_activations = Some((j, data));
                            }
                            _ => self.send_tensor(s - 1, message)?,
                        }
                    }
                }
            }
        }
        let mut loss = [(loss_sum / m as f64) as f32];
        self.group.broadcast(&mut loss, num_stages - 1)?;
        Ok(PipelineStepOutput {
            grads: accumulator.grads(),
            loss: loss[0],
            peak_in_flight,
        })
    }

    fn wrong_output(&self, what: String) -> DistributedError {
        DistributedError::InvalidArgument {
            op: "PipelineStage::forward_stage",
            message: format!(
                "stage {} of {} returned {what}",
                self.stage(),
                self.num_stages()
            ),
        }
    }

    /// Sends `message` to `peer` and receives the tensor `expected` from it, in the order that
    /// cannot deadlock: the even stage of the pair sends first, the odd one receives first.
    fn exchange<const D: usize>(
        &self,
        peer: usize,
        message: Message,
        expected: (usize, Kind),
    ) -> Result<TensorData> {
        if self.stage().is_multiple_of(2) {
            self.send_tensor(peer, message)?;
            self.recv_tensor::<D>(peer, expected.0, expected.1)
        } else {
            let data = self.recv_tensor::<D>(peer, expected.0, expected.1)?;
            self.send_tensor(peer, message)?;
            Ok(data)
        }
    }

    /// Sends the header, then the values.
    fn send_tensor(&self, peer: usize, (micro, kind, dims, values): Message) -> Result<()> {
        if dims.len() > MAX_DIMS || dims.iter().any(|&d| d > MAX_EXACT) {
            return Err(DistributedError::InvalidArgument {
                op: "pipeline send",
                message: format!(
                    "a tensor of shape {dims:?}: at most {MAX_DIMS} dimensions of at most {MAX_EXACT}"
                ),
            });
        }
        let mut header = [0.0f32; HEADER_LEN];
        header[0] = micro as f32;
        header[1] = kind as usize as f32;
        header[2] = dims.len() as f32;
        for (h, &d) in header[3..].iter_mut().zip(&dims) {
            *h = d as f32;
        }
        self.group.send(&header, peer)?;
        self.group.send(&values, peer)
    }

    /// Receives a header and checks it against what the schedule expects next from `peer`,
    /// then the values.
    fn recv_tensor<const D: usize>(
        &self,
        peer: usize,
        micro: usize,
        kind: Kind,
    ) -> Result<TensorData> {
        let mut header = [0.0f32; HEADER_LEN];
        self.group.recv(&mut header, peer)?;
        let s = self.stage();
        let (got_micro, got_kind, rank) = (header[0] as usize, header[1] as usize, header[2]);
        if got_micro != micro || got_kind != kind as usize {
            let name = |k: usize| if k == 0 { "activations" } else { "gradients" };
            return Err(DistributedError::InvalidArgument {
                op: "pipeline recv",
                message: format!(
                    "stage {s} expected the {} of micro-batch {micro} from stage {peer}, received the {} of micro-batch {got_micro} (do the ranks run the same schedule?)",
                    name(kind as usize),
                    name(got_kind)
                ),
            });
        }
        let rank = rank as usize;
        let dims: Vec<usize> = header[3..3 + rank.min(MAX_DIMS)]
            .iter()
            .map(|&d| d as usize)
            .collect();
        if rank != D {
            return Err(DistributedError::InvalidArgument {
                op: "pipeline recv",
                message: format!(
                    "stage {s} expects tensors of rank {D}, stage {peer} sent shape {dims:?}"
                ),
            });
        }
        let mut values = vec![0.0f32; dims.iter().product()];
        self.group.recv(&mut values, peer)?;
        Ok(TensorData::new(values, dims))
    }
}

/// Whether `a` is immediately followed by `b` in `steps`.
///
/// Two neighbouring stages exchange messages in one crossed send / receive exactly when both
/// see the same pair of steps back to back: the lower stage a forward then a backward, the
/// upper one that backward then that forward (1F1B's steady state). Elsewhere (GPipe's turn
/// from forwards to backwards, 1F1B with fewer micro-batches than stages) the upper stage needs
/// the activations before it can produce the gradient, so each message is sent on its own.
fn followed_by(steps: &[PipelineStep], a: PipelineStep, b: PipelineStep) -> bool {
    steps.windows(2).any(|w| w[0] == a && w[1] == b)
}

/// A message between stages: micro-batch, kind, dimensions, values.
type Message = (usize, Kind, Vec<usize>, Vec<f32>);

/// The values of `data` as f32 (what travels between stages).
fn tensor_values(data: TensorData) -> Result<Vec<f32>> {
    data.convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| DistributedError::Tensor(format!("reading activations as f32: {e:?}")))
}

/// The one value of a loss.
fn scalar<B: AutodiffBackend>(loss: &Tensor<B, 1>) -> Result<f32> {
    Ok(tensor_values(loss.clone().inner().into_data())?[0])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SingleProcess, ThreadGroup};
    use burn::backend::{Autodiff, Flex};
    use burn::module::{Module, ModuleVisitor, Param, ParamId};
    use burn::nn::{Linear, LinearConfig};
    use burn::tensor::Distribution;

    type B = Autodiff<Flex>;

    /// A stack of `Linear` + tanh layers; the last stage's loss is the mean squared error
    /// against the micro-batch's target.
    #[derive(Module, Debug)]
    struct Toy<B: Backend> {
        layers: Vec<Linear<B>>,
        computes_loss: bool,
    }

    /// Inputs and targets `[rows, width]`.
    type Batch = (Tensor<B, 2>, Tensor<B, 2>);

    impl<B: Backend> Toy<B> {
        fn run(&self, mut x: Tensor<B, 2>) -> Tensor<B, 2> {
            for layer in &self.layers {
                x = layer.forward(x).tanh();
            }
            x
        }
    }

    impl PipelineStage<B, 2> for Toy<B> {
        type MicroBatch = Batch;
        type Error = std::convert::Infallible;

        fn forward_stage(
            &self,
            input: Option<Tensor<B, 2>>,
            (x, target): &Batch,
        ) -> std::result::Result<StageOutput<B, 2>, Self::Error> {
            let out = self.run(input.unwrap_or_else(|| x.clone()));
            Ok(if self.computes_loss {
                StageOutput::Loss((out - target.clone()).powi_scalar(2).mean())
            } else {
                StageOutput::Activations(out)
            })
        }
    }

    const WIDTH: usize = 6;
    const LAYERS: usize = 8;

    fn toy() -> Toy<B> {
        let device = Default::default();
        Toy {
            layers: (0..LAYERS)
                .map(|_| LinearConfig::new(WIDTH, WIDTH).init(&device))
                .collect(),
            computes_loss: true,
        }
    }

    /// Layers `stage * L / S ..` of `model` (the same parameter ids).
    fn split(model: &Toy<B>, stage: usize, stages: usize) -> Toy<B> {
        let per = LAYERS / stages;
        Toy {
            layers: model.layers[stage * per..(stage + 1) * per].to_vec(),
            computes_loss: stage + 1 == stages,
        }
    }

    fn batch(rows: usize) -> Batch {
        let device = Default::default();
        (
            Tensor::random([rows, WIDTH], Distribution::Normal(0.0, 1.0), &device),
            Tensor::random([rows, WIDTH], Distribution::Normal(0.0, 0.5), &device),
        )
    }

    fn micro_batches((x, t): &Batch, m: usize) -> Vec<Batch> {
        x.clone()
            .chunk(m, 0)
            .into_iter()
            .zip(t.clone().chunk(m, 0))
            .collect()
    }

    /// Every parameter's gradient, by id.
    struct Collect<'a> {
        grads: &'a GradientsParams,
        out: Vec<(ParamId, Vec<f32>)>,
    }

    impl ModuleVisitor<B> for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.get::<Flex, D>(param.id) {
                self.out
                    .push((param.id, g.into_data().into_vec::<f32>().unwrap()));
            }
        }
    }

    fn grads_of(module: &Toy<B>, grads: &GradientsParams) -> Vec<(ParamId, Vec<f32>)> {
        let mut c = Collect {
            grads,
            out: Vec::new(),
        };
        module.visit(&mut c);
        c.out
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    fn check_against_unsplit(stages: usize, schedule: Schedule, m: usize) {
        let model = toy();
        let whole = batch(4 * m);
        let loss = (model.run(whole.0.clone()) - whole.1.clone())
            .powi_scalar(2)
            .mean();
        let expected_loss = loss.clone().into_scalar();
        let expected = grads_of(
            &model,
            &GradientsParams::from_grads(loss.backward(), &model),
        );
        assert_eq!(expected.len(), 2 * LAYERS);
        let micro = micro_batches(&whole, m);
        let results = ThreadGroup::run(stages, |group| {
            let pipe = PipelineParallel::new(Arc::new(group), schedule, m).unwrap();
            let stage = split(&model, pipe.stage(), pipe.num_stages());
            let out = pipe.train_step(&stage, &micro).unwrap();
            (grads_of(&stage, &out.grads), out.loss, out.peak_in_flight)
        });
        let mut seen = 0;
        for (s, (grads, loss, peak)) in results.iter().enumerate() {
            assert!(
                (loss - expected_loss).abs() < 1e-5,
                "stage {s}: loss {loss} vs {expected_loss}"
            );
            match schedule {
                Schedule::GPipe => assert_eq!(*peak, m, "stage {s}"),
                Schedule::OneFOneB => assert_eq!(*peak, (stages - s).min(m), "stage {s}"),
            }
            assert_eq!(grads.len(), 2 * LAYERS / stages, "stage {s}");
            for (id, g) in grads {
                let (_, e) = expected.iter().find(|(i, _)| i == id).unwrap();
                let d = max_diff(g, e);
                assert!(d < 1e-5, "stage {s}: gradient differs by {d}");
                seen += 1;
            }
        }
        assert_eq!(seen, expected.len());
    }

    #[test]
    fn two_stages_gpipe_equal_the_unsplit_model() {
        check_against_unsplit(2, Schedule::GPipe, 4);
    }

    #[test]
    fn two_stages_1f1b_equal_the_unsplit_model() {
        check_against_unsplit(2, Schedule::OneFOneB, 4);
    }

    #[test]
    fn four_stages_gpipe_equal_the_unsplit_model() {
        check_against_unsplit(4, Schedule::GPipe, 6);
    }

    #[test]
    fn four_stages_1f1b_equal_the_unsplit_model() {
        check_against_unsplit(4, Schedule::OneFOneB, 6);
    }

    #[test]
    fn fewer_micro_batches_than_stages_and_one_stage() {
        check_against_unsplit(4, Schedule::OneFOneB, 2);
        check_against_unsplit(1, Schedule::OneFOneB, 4);
        check_against_unsplit(1, Schedule::GPipe, 4);
    }

    #[test]
    fn one_f_one_b_bounds_the_micro_batches_in_flight() {
        for (stages, m) in [(2, 4), (4, 4), (4, 9), (3, 1)] {
            for s in 0..stages {
                let steps = Schedule::OneFOneB.steps(stages, s, m);
                assert_eq!(steps.len(), 2 * m);
                let (mut alive, mut peak) = (0usize, 0);
                for step in steps {
                    match step {
                        PipelineStep::Forward(_) => alive += 1,
                        PipelineStep::Backward(_) => alive -= 1,
                    }
                    peak = peak.max(alive);
                }
                assert_eq!(peak, (stages - s).min(m), "{stages} stages, stage {s}, {m}");
            }
        }
        let gpipe = Schedule::GPipe.steps(2, 0, 3);
        assert_eq!(gpipe[..3], [0, 1, 2].map(PipelineStep::Forward));
    }

    /// A group whose `send` returns only once the peer has received the message (MPI's
    /// rendezvous protocol): a schedule that relied on buffered sends would time out here.
    struct Rendezvous {
        data: ThreadGroup,
        acks: Arc<dyn ProcessGroup>,
    }

    impl ProcessGroup for Rendezvous {
        fn rank(&self) -> usize {
            self.data.rank()
        }
        fn size(&self) -> usize {
            self.data.size()
        }
        fn all_reduce(&self, v: &mut [f32], op: crate::ReduceOp) -> Result<()> {
            self.data.all_reduce(v, op)
        }
        fn broadcast(&self, v: &mut [f32], root: usize) -> Result<()> {
            self.data.broadcast(v, root)
        }
        fn broadcast_bytes(&self, b: &mut Vec<u8>, root: usize) -> Result<()> {
            self.data.broadcast_bytes(b, root)
        }
        fn all_gather(&self, v: &[f32]) -> Result<Vec<f32>> {
            self.data.all_gather(v)
        }
        fn reduce_scatter(&self, v: &[f32], op: crate::ReduceOp) -> Result<Vec<f32>> {
            self.data.reduce_scatter(v, op)
        }
        fn send(&self, v: &[f32], dst: usize) -> Result<()> {
            self.data.send(v, dst)?;
            self.acks.recv(&mut [0.0], dst)
        }
        fn recv(&self, v: &mut [f32], src: usize) -> Result<()> {
            self.data.recv(v, src)?;
            self.acks.send(&[0.0], src)
        }
        fn barrier(&self) -> Result<()> {
            self.data.barrier()
        }
        fn split(&self, color: usize, key: usize) -> Result<Arc<dyn ProcessGroup>> {
            self.data.split(color, key)
        }
    }

    #[test]
    fn one_f_one_b_does_not_deadlock_on_synchronous_sends() {
        let model = toy();
        for (stages, schedule, m) in [
            (2, Schedule::OneFOneB, 4),
            (4, Schedule::OneFOneB, 4),
            (4, Schedule::OneFOneB, 2),
            (3, Schedule::OneFOneB, 5),
            (4, Schedule::GPipe, 4),
        ] {
            let micro = micro_batches(&batch(4 * m), m);
            let groups = ThreadGroup::with_timeout(stages, std::time::Duration::from_secs(20));
            let results: Vec<f32> = std::thread::scope(|scope| {
                let handles: Vec<_> = groups
                    .into_iter()
                    .map(|data| {
                        let (model, micro) = (&model, &micro);
                        scope.spawn(move || {
                            let acks = data.split(0, data.rank()).unwrap();
                            let group = Rendezvous { data, acks };
                            let pipe = PipelineParallel::new(Arc::new(group), schedule, m).unwrap();
                            let stage = split(model, pipe.stage(), stages);
                            pipe.train_step(&stage, micro).unwrap().loss
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert!(results.iter().all(|l| *l == results[0] && l.is_finite()));
        }
    }

    #[test]
    fn bad_arguments_are_typed_errors() {
        let group: Arc<dyn ProcessGroup> = Arc::new(SingleProcess);
        let e = PipelineParallel::new(group.clone(), Schedule::GPipe, 0).unwrap_err();
        assert!(
            matches!(&e, DistributedError::InvalidArgument { message, .. } if message.contains("micro_batches = 0")),
            "{e}"
        );
        let pipe = PipelineParallel::new(group, Schedule::GPipe, 4).unwrap();
        let e = pipe
            .train_step(&split(&toy(), 0, 1), &micro_batches(&batch(6), 3))
            .unwrap_err();
        assert!(
            matches!(&e, DistributedError::InvalidArgument { message, .. } if message.contains("3 micro-batches")),
            "{e}"
        );
        // A last stage that returns activations, a first stage that returns a loss.
        let mut not_last = split(&toy(), 0, 1);
        not_last.computes_loss = false;
        let e = pipe
            .train_step(&not_last, &micro_batches(&batch(8), 4))
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("the last stage must return the loss"),
            "{e}"
        );
        let results = ThreadGroup::run(2, |group| {
            let pipe = PipelineParallel::new(Arc::new(group), Schedule::GPipe, 2).unwrap();
            let mut stage = split(&toy(), pipe.stage(), 2);
            stage.computes_loss = true;
            pipe.train_step(&stage, &micro_batches(&batch(4), 2))
                .err()
                .map(|e| e.to_string())
        });
        assert!(
            results[0]
                .as_deref()
                .unwrap()
                .contains("only the last stage"),
            "{results:?}"
        );
        // Stage 1 then fails (stage 0 is gone), never hangs.
        assert!(results[1].is_some(), "{results:?}");
    }

    /// A first stage that sends rank-2 activations to a stage that expects rank 3: the header
    /// tells, and the error names both shapes.
    #[test]
    fn a_shape_mismatch_between_stages_is_a_typed_error() {
        #[derive(Module, Debug)]
        struct Rank3<B: Backend> {
            unused: Linear<B>,
        }
        impl PipelineStage<B, 3> for Rank3<B> {
            type MicroBatch = Batch;
            type Error = std::convert::Infallible;
            fn forward_stage(
                &self,
                input: Option<Tensor<B, 3>>,
                _: &Batch,
            ) -> std::result::Result<StageOutput<B, 3>, Self::Error> {
                Ok(StageOutput::Loss(input.unwrap().sum()))
            }
        }
        let micro = micro_batches(&batch(4), 2);
        let results = ThreadGroup::run(2, |group| {
            let pipe = PipelineParallel::new(Arc::new(group), Schedule::OneFOneB, 2).unwrap();
            if pipe.stage() == 0 {
                pipe.train_step(&split(&toy(), 0, 2), &micro)
                    .err()
                    .map(|e| e.to_string())
            } else {
                pipe.train_step(
                    &Rank3::<B> {
                        unused: LinearConfig::new(1, 1).init(&Default::default()),
                    },
                    &micro,
                )
                .err()
                .map(|e| e.to_string())
            }
        });
        let e = results[1].as_deref().unwrap();
        assert!(
            e.contains("expects tensors of rank 3") && e.contains("[2, 6]"),
            "{e}"
        );
    }
}
