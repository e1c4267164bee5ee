//! Data parallel by hand, as torch's DDP tutorial does it: every rank holds the model, trains on
//! its own shard of each batch, and averages gradients before each optimizer step, so that the
//! ranks stay equal.
//!
//! ```sh
//! cargo run --release -p ember-distributed --example data_parallel            # 2 threads
//! cargo build --release -p ember-distributed --features mpi --example data_parallel
//! mpirun -n 2 target/release/examples/data_parallel                           # 2 processes
//! ```

use burn::backend::{Autodiff, Flex};
use burn::nn::{Linear, LinearConfig};
use burn::optim::{GradientsParams, Optimizer, SgdConfig};
use burn::tensor::Tensor;
use ember_distributed::{DataParallel, ProcessGroup, ThreadGroup};
use std::sync::Arc;

type B = Autodiff<Flex>;

/// Fits `y = x · w_true` with a linear layer: each rank takes its half of a batch of 16.
fn train(group: Arc<dyn ProcessGroup>) -> f32 {
    let device = Default::default();
    let (rank, size) = (group.rank(), group.size());
    let ddp = DataParallel::new(group);
    // The ranks start from different weights; DDP begins by giving everyone rank 0's.
    let model: Linear<B> = LinearConfig::new(4, 1).init(&device);
    let mut model = ddp.broadcast_parameters(model).expect("broadcast");
    let mut optimizer = SgdConfig::new().init();
    let w_true = Tensor::<B, 2>::from_floats([[1.0], [-2.0], [0.5], [3.0]], &device);
    let mut loss_value = 0.0;
    for step in 0..50 {
        // The same batch of 16 on every rank (as a seeded sampler gives), then this rank's
        // shard of it.
        let per_rank = 16 / size;
        let rows = rank * per_rank..(rank + 1) * per_rank;
        let values: Vec<f32> = rows
            .flat_map(|i| (0..4).map(move |j| ((step * 64 + i * 4 + j) as f32 * 0.7).sin()))
            .collect();
        let x = Tensor::<B, 1>::from_floats(values.as_slice(), &device).reshape([per_rank, 4]);
        let y = x.clone().matmul(w_true.clone());
        let loss = (model.forward(x) - y).powi_scalar(2).mean();
        loss_value = loss.clone().into_scalar();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let grads = ddp.all_reduce_gradients(&model, grads).expect("all-reduce");
        model = optimizer.step(0.1, model, grads);
    }
    println!("rank {rank} of {size}: last loss of its shard {loss_value:.2e}");
    loss_value
}

fn main() {
    #[cfg(feature = "mpi")]
    if std::env::var_os("OMPI_COMM_WORLD_SIZE").is_some() || std::env::var_os("PMI_RANK").is_some()
    {
        let group = ember_distributed::MpiGroup::init().expect("MPI");
        train(Arc::new(group));
        return;
    }
    // No launcher: two ranks as threads of this process.
    let losses = ThreadGroup::run(2, |group| train(Arc::new(group)));
    assert!(
        losses.iter().all(|&l| l < 1e-3),
        "the model did not fit: {losses:?}"
    );
}
