//! One data-parallel training step of the rbt3-shaped classifier (3 layers, hidden 768, vocab
//! 21,128; batch 16 per process, sequence 128, AdamW, dropout on), on every process of an
//! `mpirun` job: the Ember side of `cargo xtask bench`'s `distributed` row, beside PyTorch DDP
//! (gloo) in `xtask/bench/ddp_bench.py`.
//!
//! ```sh
//! cargo build --release -p ember-models --features mpi --example ddp_step
//! mpirun -n 2 --bind-to none -x RAYON_NUM_THREADS=1 target/release/examples/ddp_step [STEPS]
//! ```
//!
//! Rank 0 prints one JSON line: the median seconds per step, and of that the median seconds
//! spent in the gradient all-reduce (the communication of the cost model in
//! `docs/distributed.md`).

use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::{Distribution, Tensor};
use ember_distributed::{DataParallel, MpiGroup, ProcessGroup};
use ember_models::{BertConfig, BertForSequenceClassification, EncoderInput, SequenceLabels};
use std::sync::Arc;
use std::time::Instant;

type B = Autodiff<Flex>;
const BATCH: usize = 16;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let steps: usize = std::env::args().nth(1).map_or(Ok(5), |s| s.parse())?;
    // As the Trainer runs: freed buffers reused by the next step.
    ember_kernels::keep_freed_memory();
    let group: Arc<dyn ProcessGroup> = Arc::new(MpiGroup::init()?);
    let (rank, size) = (group.rank(), group.size());
    let ddp = DataParallel::new(Arc::clone(&group));
    let device = Default::default();
    let config = BertConfig {
        vocab_size: 21128,
        hidden_size: 768,
        num_hidden_layers: 3,
        num_attention_heads: 12,
        intermediate_size: 3072,
        ..BertConfig::default()
    };
    let model = BertForSequenceClassification::<B>::new(&config, &device);
    let mut model = Some(ddp.broadcast_parameters(model)?);
    let mut optimizer = AdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(0.01)
        .init::<B, BertForSequenceClassification<B>>();
    // Each rank its own batch.
    <Flex as burn::tensor::backend::Backend>::seed(&device, 1 + rank as u64);
    let ids = Tensor::<B, 2>::random(
        [BATCH, 128],
        Distribution::Uniform(0.0, config.vocab_size as f64),
        &device,
    )
    .int();
    let input = EncoderInput::new(ids).with_attention_mask(Tensor::ones([BATCH, 128], &device));
    let labels = Tensor::<B, 1>::random([BATCH], Distribution::Uniform(0.0, 2.0), &device).int();
    let (mut step_s, mut allreduce_s) = (Vec::new(), Vec::new());
    for step in 0..=steps {
        group.barrier()?;
        let start = Instant::now();
        let m = model.take().expect("the model is put back after each step");
        let loss = m
            .forward(input.clone(), Some(SequenceLabels::Classes(labels.clone())))?
            .loss
            .expect("labels were given");
        let grads = GradientsParams::from_grads(loss.backward(), &m);
        let reduce_start = Instant::now();
        let grads = ddp.all_reduce_gradients(&m, grads)?;
        let reduce = reduce_start.elapsed().as_secs_f64();
        let m = optimizer.step(2e-5, m, grads);
        // Wait for the update to finish.
        let _ = m.classifier.out_proj.base.weight.val().inner().into_data();
        model = Some(m);
        // Step 0 warms up (allocations, the first all-reduce's connections).
        if step > 0 {
            step_s.push(start.elapsed().as_secs_f64());
            allreduce_s.push(reduce);
        }
    }
    let _ = model.map(|m| m.valid());
    if rank == 0 {
        let median = |mut t: Vec<f64>| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        };
        println!(
            "{{\"bench\": \"distributed/rbt3_ddp_step_{size}x1_threads_b{BATCH}_s128\", \
             \"median_s\": {}, \"items\": {}, \"allreduce_s\": {}}}",
            median(step_s),
            BATCH * size,
            median(allreduce_s)
        );
    }
    Ok(())
}
