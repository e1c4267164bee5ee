//! The classic hand-written burn training loop, on one process: a `DataLoader`, AdamW,
//! `loss.backward()`, `optimizer.step()`, and an accuracy each epoch. `accelerate_loop.rs` is
//! the same loop made data parallel by an `Accelerator` (the diff is in docs/accelerate.md).
//!
//!     cargo run -p ember-train --example hand_written_loop

#[path = "common/bag.rs"]
mod bag;

use bag::BagOfEmbeddings;
use burn::backend::{Autodiff, Flex};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use ember_datasets::{DataCollatorWithPadding, DataLoader};

type B = Autodiff<Flex>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = Default::default();
    let (train, eval) = bag::datasets()?;
    let mut model = BagOfEmbeddings::<B>::new(&device);
    let mut optimizer = AdamWConfig::new().init();
    let loader = DataLoader::new(&train, DataCollatorWithPadding::new(0), 16)?
        .shuffle(true)
        .seed(42);
    let eval_loader = DataLoader::new(&eval, DataCollatorWithPadding::new(0), 8)?;
    for epoch in 0..5 {
        for batch in loader.iter::<B>(epoch, &device) {
            let loss = model.forward(batch?).loss;
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optimizer.step(5e-2, model, grads);
        }
        let (mut correct, mut total) = (0, 0);
        for batch in eval_loader.iter::<B>(0, &device) {
            let out = model.forward(batch?);
            let predictions = out.logits.argmax(1).flatten::<1>(0, 1);
            let labels = out.labels;
            total += labels.dims()[0];
            correct += predictions.equal(labels).int().sum().into_scalar() as usize;
        }
        println!("epoch {epoch}: accuracy {correct}/{total}");
    }
    Ok(())
}
