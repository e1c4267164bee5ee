//! DDP's bucketed gradient all-reduce against one raw MPI all-reduce of the same bytes.
//!
//! ```sh
//! cargo build --release -p ember-distributed --features mpi --example allreduce_rate
//! mpirun -n 2 --bind-to none target/release/examples/allreduce_rate
//! ```
//!
//! The model: 100 linear layers of 512 × 512 (26.3M f32, 105 MB of gradients), as the gradients
//! of one backward pass. Prints the median of 5 timings of each, on rank 0, freed memory kept
//! for reuse as the `Trainer` keeps it.

#[cfg(feature = "mpi")]
fn main() {
    use burn::backend::{Autodiff, Flex};
    use burn::module::Module;
    use burn::nn::{Linear, LinearConfig};
    use burn::optim::GradientsParams;
    use burn::tensor::{Distribution, Tensor};
    use ember_distributed::{DataParallel, MpiGroup, ProcessGroup};
    use mpi::traits::*;
    use std::sync::Arc;
    use std::time::Instant;

    type B = Autodiff<Flex>;

    #[derive(Module, Debug)]
    struct Stack<B: burn::tensor::backend::Backend> {
        layers: Vec<Linear<B>>,
    }

    // As the Trainer runs: freed buffers are reused rather than returned to the system.
    ember_kernels::keep_freed_memory();
    let group = Arc::new(MpiGroup::init().expect("MPI"));
    let device = Default::default();
    let model = Stack::<B> {
        layers: (0..100)
            .map(|_| LinearConfig::new(512, 512).init(&device))
            .collect(),
    };
    let x = Tensor::<B, 2>::random([4, 512], Distribution::Normal(0.0, 1.0), &device);
    let loss = model
        .layers
        .iter()
        .fold(Tensor::<B, 1>::zeros([1], &device), |acc, l| {
            acc + l.forward(x.clone()).sum()
        });
    let mut grads = GradientsParams::from_grads(loss.backward(), &model);
    let values = model.num_params();
    let ddp = DataParallel::new(group.clone() as Arc<dyn ProcessGroup>);
    let median = |mut t: Vec<f64>| {
        t.sort_by(f64::total_cmp);
        t[t.len() / 2]
    };
    let mut bucketed = Vec::new();
    for _ in 0..5 {
        group.barrier().unwrap();
        let start = Instant::now();
        grads = ddp.all_reduce_gradients(&model, grads).unwrap();
        bucketed.push(start.elapsed().as_secs_f64());
    }
    let world = mpi::topology::SimpleCommunicator::world();
    let send = vec![1.0f32; values];
    let mut recv = vec![0.0f32; values];
    let mut raw = Vec::new();
    for _ in 0..5 {
        world.barrier();
        let start = Instant::now();
        world.all_reduce_into(
            &send[..],
            &mut recv[..],
            mpi::collective::SystemOperation::sum(),
        );
        raw.push(start.elapsed().as_secs_f64());
    }
    // One in-place all-reduce of the whole buffer (MpiGroup passes MPI_IN_PLACE).
    let mut whole = Vec::new();
    let mut buffer = vec![1.0f32; values];
    for _ in 0..5 {
        group.barrier().unwrap();
        let start = Instant::now();
        group
            .all_reduce(&mut buffer, ember_distributed::ReduceOp::Sum)
            .unwrap();
        whole.push(start.elapsed().as_secs_f64());
    }
    if group.rank() == 0 {
        let mb = values as f64 * 4.0 / 1e6;
        let rate = |s: f64| format!("{:.1} ms ({:.2} GB/s)", s * 1e3, mb / 1e3 / s);
        let (b, r, w) = (median(bucketed), median(raw), median(whole));
        println!("{} ranks, {values} f32 ({mb:.0} MB):", group.size());
        println!(
            "  MPI_Allreduce, separate send buffer (rsmpi), one call: {}",
            rate(r)
        );
        println!(
            "  MPI_Allreduce in place, one call:                      {}",
            rate(w)
        );
        println!(
            "  DataParallel::all_reduce_gradients (25 MiB buckets):   {}",
            rate(b)
        );
        println!(
            "  bucketed / raw rate: {:.0} % of the in-place call, {:.0} % of rsmpi's",
            100.0 * w / b,
            100.0 * r / b
        );
    }
}

#[cfg(not(feature = "mpi"))]
fn main() {
    eprintln!("build with --features mpi and run under mpirun");
}
