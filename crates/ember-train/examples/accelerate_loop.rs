//! `hand_written_loop.rs` made data parallel with an `Accelerator`, in accelerate's manner: a
//! few lines added (marked `// +`) and `loss.backward()` replaced by `accelerator.backward`.
//! It runs on two ranks that are threads, or, built with the `mpi` feature and launched,
//! one rank per process:
//!
//!     cargo run -p ember-train --example accelerate_loop
//!     cargo build --workspace --features ember-cli/mpi --examples
//!     mpirun -n 2 target/debug/examples/accelerate_loop
//!
//! Every rank prints nothing but the main process, which prints the accuracy on the whole
//! evaluation set, gathered from the ranks' shards.

#[path = "common/bag.rs"]
mod bag;

use bag::BagOfEmbeddings;
use burn::backend::{Autodiff, Flex};
use burn::optim::{AdamWConfig, Optimizer};
use ember_datasets::{DataCollatorWithPadding, DataLoader};
use ember_train::Accelerator;

type B = Autodiff<Flex>;

fn train(mut accelerator: Accelerator) -> Result<(), Box<dyn std::error::Error>> {
    let device = Default::default();
    let (train, eval) = bag::datasets()?;
    let mut model = BagOfEmbeddings::<B>::new(&device);
    let mut optimizer = AdamWConfig::new().init();
    let loader = DataLoader::new(&train, DataCollatorWithPadding::new(0), 16)?
        .shuffle(true)
        .seed(42);
    let eval_loader = DataLoader::new(&eval, DataCollatorWithPadding::new(0), 8)?;
    model = accelerator.prepare_model(model)?; // +
    let loader = accelerator.prepare_data_loader(loader)?; // +
    let eval_loader = accelerator.prepare_data_loader(eval_loader)?; // +
    for epoch in 0..5 {
        for batch in loader.iter::<B>(epoch, &device) {
            let loss = model.forward(batch?).loss;
            if let Some(grads) = accelerator.backward(loss, &model)? {
                model = optimizer.step(5e-2, model, grads);
            }
        }
        let (mut correct, mut total) = (0, 0);
        for batch in eval_loader.iter::<B>(0, &device) {
            let out = model.forward(batch?);
            let predictions = out.logits.argmax(1).flatten::<1>(0, 1);
            let predictions = accelerator.gather_for_metrics(predictions)?; // +
            let labels = accelerator.gather_for_metrics(out.labels)?; // +
            total += labels.dims()[0];
            correct += predictions.equal(labels).int().sum().into_scalar() as usize;
        }
        accelerator.print(format!("epoch {epoch}: accuracy {correct}/{total}"));
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Under mpirun / `ember launch` (feature mpi): this process is one rank of the job.
    if cfg!(feature = "mpi") && std::env::var_os("OMPI_COMM_WORLD_SIZE").is_some() {
        return train(Accelerator::from_env()?);
    }
    // Otherwise two ranks that are threads of this process.
    let results = ember_distributed::ThreadGroup::run(2, |group| {
        train(Accelerator::new(std::sync::Arc::new(group))).map_err(|e| e.to_string())
    });
    for result in results {
        result?;
    }
    Ok(())
}
