//! The seed's picture of 3D parallel training, run as a simulation on one machine: a model of
//! 32 residual MLP blocks on a `2 (data) × 4 (pipeline) × 4 (tensor)` mesh of 32 ranks, so
//! 4 stages of 8 blocks, each block split 4 ways, the whole twice; three SGD steps, then every
//! rank compares its slice with one process training the whole model on the whole batch.
//!
//! ```sh
//! cargo build --release -p ember-distributed --features mpi --example mesh
//! mpirun -n 32 --oversubscribe --bind-to none -x RAYON_NUM_THREADS=1 target/release/examples/mesh
//! mpirun -n 8 ... target/release/examples/mesh 2 2 2       # another shape
//! target/release/examples/mesh 4 1 2                        # threads: no pipeline with tensor
//! ```
//!
//! Tensor and pipeline parallel together need processes: ranks that are threads of one process
//! share burn's autodiff graph registry, whose clean-up after one rank's backward pass waits
//! for the graph of a rank that may be inside its own backward pass, waiting in a
//! tensor-parallel all-reduce for the first (docs/distributed.md).

use burn::backend::{Autodiff, Flex};
use burn::module::{AutodiffModule, Module, Param};
use burn::nn::Linear;
use burn::optim::{GradientsParams, Optimizer, SgdConfig};
use burn::tensor::{activation, backend::Backend, Tensor, TensorData};
use ember_distributed::{
    ColumnParallelLinear, DataParallel, DeviceMesh, DistributedError, PipelineParallel,
    PipelineStage, ProcessGroup, RowParallelLinear, Schedule, SingleProcess, StageOutput,
    TensorParallel, ThreadGroup,
};
use std::sync::Arc;

type Ad = Autodiff<Flex>;
const LAYERS: usize = 32;
const HIDDEN: usize = 16;
const INNER: usize = 32;
const BATCH: usize = 16;
const MICRO_BATCHES: usize = 4;
const STEPS: usize = 3;
const LR: f64 = 0.02;

/// A tensor of `shape` from a formula: every rank builds the same weights and data without a
/// shared random generator.
fn values<B: Backend, const D: usize>(shape: [usize; D], phase: f32, scale: f32) -> Tensor<B, D> {
    let n = shape.iter().product::<usize>();
    let v = (0..n)
        .map(|i| (i as f32 * 0.37 + phase).sin() * scale)
        .collect();
    Tensor::from_data(TensorData::new(v, shape.to_vec()), &Default::default())
}

fn linear<B: Backend>(d_in: usize, d_out: usize, phase: f32) -> Linear<B> {
    Linear {
        weight: Param::from_tensor(values([d_in, d_out], phase, 0.05)),
        bias: Some(Param::from_tensor(values([d_out], phase + 0.5, 0.02))),
    }
}

/// Block `i`: `x + down(gelu(up(x)))`, `up` split by output features, `down` by input features.
#[derive(Module, Debug)]
struct Block<B: Backend> {
    up: ColumnParallelLinear<B>,
    down: RowParallelLinear<B>,
}

impl<B: Backend> Block<B> {
    fn new(i: usize, tp: &TensorParallel) -> Result<Self, DistributedError> {
        Ok(Self {
            up: ColumnParallelLinear::from_linear(linear(HIDDEN, INNER, i as f32), tp.clone())?,
            down: RowParallelLinear::from_linear(
                linear(INNER, HIDDEN, i as f32 + 0.25),
                tp.clone(),
            )?,
        })
    }

    fn forward(&self, x: Tensor<B, 2>) -> Result<Tensor<B, 2>, DistributedError> {
        let inner = activation::gelu(self.up.forward(x.clone())?);
        Ok(x + self.down.forward(inner)?)
    }
}

/// One pipeline stage: a range of blocks; the last stage also takes the squared error.
#[derive(Module, Debug)]
struct Stage<B: Backend> {
    blocks: Vec<Block<B>>,
    last: bool,
}

/// A micro-batch: inputs and targets, `[rows, HIDDEN]` each.
type MicroBatch = (Tensor<Ad, 2>, Tensor<Ad, 2>);

impl PipelineStage<Ad, 2> for Stage<Ad> {
    type MicroBatch = MicroBatch;
    type Error = DistributedError;

    fn forward_stage(
        &self,
        input: Option<Tensor<Ad, 2>>,
        (x, target): &MicroBatch,
    ) -> Result<StageOutput<Ad, 2>, DistributedError> {
        let mut h = input.unwrap_or_else(|| x.clone());
        for block in &self.blocks {
            h = block.forward(h)?;
        }
        Ok(if self.last {
            StageOutput::Loss((h - target.clone()).powi_scalar(2).mean().reshape([1]))
        } else {
            StageOutput::Activations(h)
        })
    }
}

/// The whole batch, the same on every rank.
fn batch() -> (Tensor<Ad, 2>, Tensor<Ad, 2>) {
    (
        values([BATCH, HIDDEN], 7.0, 1.0),
        values([BATCH, HIDDEN], 9.0, 1.0),
    )
}

/// Rows `start..start + len` of both tensors.
fn rows((x, t): &MicroBatch, start: usize, len: usize) -> MicroBatch {
    (
        x.clone().narrow(0, start, len),
        t.clone().narrow(0, start, len),
    )
}

/// One rank of the mesh: three steps of its stage, its slice, then the largest difference
/// between its blocks (gathered over the tensor group) and the whole model's after the same
/// steps on one process, and the losses it saw.
fn rank(
    world: Arc<dyn ProcessGroup>,
    shape: (usize, usize, usize),
) -> Result<(f32, Vec<f32>), DistributedError> {
    let (dp, pp, tp_size) = shape;
    let mesh = DeviceMesh::new(world, dp, pp, tp_size)?;
    let c = mesh.coords();
    let tp = TensorParallel::new(Arc::clone(mesh.tensor_group()));
    let per_stage = LAYERS / pp;
    let layers = c.pipeline * per_stage..(c.pipeline + 1) * per_stage;
    let mut stage = Stage::<Ad> {
        blocks: layers
            .clone()
            .map(|i| Block::new(i, &tp))
            .collect::<Result<_, _>>()?,
        last: c.pipeline + 1 == pp,
    };
    let pipeline = PipelineParallel::new(
        Arc::clone(mesh.pipeline_group()),
        Schedule::OneFOneB,
        MICRO_BATCHES,
    )?;
    let ddp = DataParallel::new(Arc::clone(mesh.data_group()));
    // This replica's share of the batch, cut into micro-batches.
    let replica_rows = BATCH / dp;
    let micro_rows = replica_rows / MICRO_BATCHES;
    let whole = batch();
    let micro: Vec<MicroBatch> = (0..MICRO_BATCHES)
        .map(|m| rows(&whole, c.data * replica_rows + m * micro_rows, micro_rows))
        .collect();
    let mut optim = SgdConfig::new().init::<Ad, Stage<Ad>>();
    let mut losses = Vec::new();
    for _ in 0..STEPS {
        let step = pipeline.train_step(&stage, &micro)?;
        let grads = ddp.all_reduce_gradients(&stage, step.grads)?;
        stage = optim.step(LR, stage, grads);
        // The replicas' mean loss: the whole batch's.
        let mut loss = [step.loss];
        mesh.data_group()
            .all_reduce(&mut loss, ember_distributed::ReduceOp::Avg)?;
        losses.push(loss[0]);
    }
    // One process, the whole model, the whole batch.
    let single = TensorParallel::new(Arc::new(SingleProcess));
    let mut whole_model = Stage::<Ad> {
        blocks: (0..LAYERS)
            .map(|i| Block::new(i, &single))
            .collect::<Result<_, _>>()?,
        last: true,
    };
    let mut optim = SgdConfig::new().init::<Ad, Stage<Ad>>();
    for _ in 0..STEPS {
        let StageOutput::Loss(loss) = whole_model.forward_stage(None, &whole)? else {
            unreachable!("a last stage returns its loss")
        };
        let grads = GradientsParams::from_grads(loss.backward(), &whole_model);
        whole_model = optim.step(LR, whole_model, grads);
    }
    let mut worst = 0.0f32;
    let trained: Stage<Flex> = stage.valid();
    for (block, i) in trained.blocks.into_iter().zip(layers) {
        let (up, down) = (block.up.into_linear()?, block.down.into_linear()?);
        let reference = &whole_model.blocks[i];
        let pairs: [(Tensor<Flex, 2>, Tensor<Flex, 2>); 2] = [
            (up.weight.val(), reference.up.linear.weight.val().inner()),
            (
                down.weight.val(),
                reference.down.linear.weight.val().inner(),
            ),
        ];
        for (a, b) in pairs {
            let d: f32 = (a - b).abs().max().into_scalar();
            // A NaN (a run that diverged) must not read as agreement.
            worst = if d.is_nan() {
                f32::INFINITY
            } else {
                worst.max(d)
            };
        }
    }
    Ok((worst, losses))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dims: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let shape = match dims[..] {
        [] => (2, 4, 4),
        [dp, pp, tp] => (dp, pp, tp),
        _ => return Err("usage: mesh [DATA PIPELINE TENSOR]".into()),
    };
    let size = shape.0 * shape.1 * shape.2;
    let divides = LAYERS.is_multiple_of(shape.1)
        && INNER.is_multiple_of(shape.2)
        && BATCH.is_multiple_of(shape.0 * MICRO_BATCHES);
    if shape.0 == 0 || shape.1 == 0 || shape.2 == 0 || !divides {
        return Err(format!(
            "{shape:?} does not divide {LAYERS} layers, {INNER} units, {BATCH} rows"
        )
        .into());
    }
    #[cfg(feature = "mpi")]
    if std::env::var_os("OMPI_COMM_WORLD_SIZE").is_some() || std::env::var_os("PMI_SIZE").is_some()
    {
        let world: Arc<dyn ProcessGroup> = Arc::new(ember_distributed::MpiGroup::init()?);
        let r = world.rank();
        let (worst, losses) = rank(Arc::clone(&world), shape)?;
        let mut all = [worst];
        world.all_reduce(&mut all, ember_distributed::ReduceOp::Max)?;
        if r == 0 {
            report(shape, size, all[0], &losses);
        }
        return Ok(());
    }
    if shape.1 > 1 && shape.2 > 1 {
        return Err(
            "pipeline and tensor parallel together run as processes: build with \
                    --features mpi and run under mpirun (see the top of this file)"
                .into(),
        );
    }
    let results = ThreadGroup::run(size, |g| rank(Arc::new(g), shape));
    let mut worst = 0.0f32;
    let mut losses = Vec::new();
    for result in results {
        let (w, l) = result?;
        worst = worst.max(w);
        losses = l;
    }
    report(shape, size, worst, &losses);
    Ok(())
}

fn report((dp, pp, tp): (usize, usize, usize), size: usize, worst: f32, losses: &[f32]) {
    println!("{dp} (data) x {pp} (pipeline) x {tp} (tensor) = {size} ranks, {LAYERS} blocks, 1F1B, {MICRO_BATCHES} micro-batches");
    println!("losses: {losses:?}");
    println!("largest weight difference from one process on the whole batch: {worst:.2e}");
}
