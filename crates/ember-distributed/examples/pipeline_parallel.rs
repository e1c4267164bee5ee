//! Pipeline parallel by hand: 8 `Linear` + tanh layers cut into 4 stages on 4 thread ranks,
//! each batch cut into 8 micro-batches and run in the 1F1B schedule; every stage takes its own
//! optimizer step on its own layers' gradients.
//!
//! ```sh
//! cargo run --release -p ember-distributed --example pipeline_parallel
//! ```
//!
//! Prints, on the first stage, the mean loss of each step (every rank knows it) and the most
//! micro-batches whose activations were alive at once on each stage (1F1B: `4 - stage`).

use burn::backend::{Autodiff, Flex};
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamConfig, Optimizer};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use ember_distributed::{PipelineParallel, PipelineStage, Schedule, StageOutput, ThreadGroup};
use std::sync::Arc;

type B = Autodiff<Flex>;

const STAGES: usize = 4;
const LAYERS_PER_STAGE: usize = 2;
const MICRO_BATCHES: usize = 8;
const WIDTH: usize = 16;

/// One stage: its layers, and whether it is the last (which turns its output into the loss).
#[derive(Module, Debug)]
struct Stage<B: Backend> {
    layers: Vec<Linear<B>>,
    last: bool,
}

impl PipelineStage<B, 2> for Stage<B> {
    /// Inputs and regression targets `[rows, WIDTH]`.
    type MicroBatch = (Tensor<B, 2>, Tensor<B, 2>);
    type Error = std::convert::Infallible;

    fn forward_stage(
        &self,
        input: Option<Tensor<B, 2>>,
        (x, target): &Self::MicroBatch,
    ) -> Result<StageOutput<B, 2>, Self::Error> {
        // The first stage reads the micro-batch, the others what the previous stage sent.
        let mut h = input.unwrap_or_else(|| x.clone());
        for layer in &self.layers {
            h = layer.forward(h).tanh();
        }
        Ok(if self.last {
            StageOutput::Loss((h - target.clone()).powi_scalar(2).mean())
        } else {
            StageOutput::Activations(h)
        })
    }
}

fn main() {
    let device = Default::default();
    // The same data on every rank: the first stage reads the inputs, the last the targets.
    <Flex as Backend>::seed(&device, 0);
    let teacher: Linear<B> = LinearConfig::new(WIDTH, WIDTH).init(&device);
    let batches: Vec<Vec<(Tensor<B, 2>, Tensor<B, 2>)>> = (0..10)
        .map(|_| {
            (0..MICRO_BATCHES)
                .map(|_| {
                    let x =
                        Tensor::<B, 2>::random([4, WIDTH], Distribution::Normal(0.0, 1.0), &device);
                    let y = teacher.forward(x.clone()).tanh().detach();
                    (x, y)
                })
                .collect()
        })
        .collect();

    ThreadGroup::run(STAGES, |group| {
        let pipeline =
            PipelineParallel::new(Arc::new(group), Schedule::OneFOneB, MICRO_BATCHES).unwrap();
        let device = Default::default();
        let mut stage = Stage::<B> {
            layers: (0..LAYERS_PER_STAGE)
                .map(|_| LinearConfig::new(WIDTH, WIDTH).init(&device))
                .collect(),
            last: pipeline.is_last_stage(),
        };
        let mut optim = AdamConfig::new().init();
        for (step, micro_batches) in batches.iter().enumerate() {
            let out = pipeline.train_step(&stage, micro_batches).unwrap();
            stage = optim.step(1e-2, stage, out.grads);
            let peaks = pipeline
                .group()
                .all_gather(&[out.peak_in_flight as f32])
                .unwrap();
            if pipeline.is_first_stage() {
                println!(
                    "step {step}: loss {:.5}, micro-batches in flight per stage {peaks:?}",
                    out.loss
                );
            }
        }
    });
}
