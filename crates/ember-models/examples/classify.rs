//! Loads an encoder checkpoint under a new sequence classification head (as
//! `AutoModelForSequenceClassification.from_pretrained(dir, num_labels=2)` does in Python),
//! prints what HF would warn about, runs a padded batch, and saves the model so Python can load
//! it.
//!
//!     cargo run -p ember-models --example classify [CHECKPOINT_DIR] [OUT_DIR]
//!
//! Without arguments it uses the tiny random BERT the parity fixtures ship.

use burn::tensor::{activation::softmax, Int, Tensor, TensorData};
use ember_models::{
    AutoModelForSequenceClassification, EncoderInput, FromPretrainedOptions, SequenceLabels,
};
use std::path::PathBuf;

type B = burn::backend::Flex;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/tiny-bert")
    });
    let out = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("ember-classify-example"));
    let device = Default::default();

    let options = FromPretrainedOptions::default()
        .labels(["negative", "positive"])
        .ignore_mismatched_sizes(true);
    let (model, report) =
        AutoModelForSequenceClassification::from_pretrained_with::<B>(&dir, &options, &device)?;
    println!("{} from {}", model.class_name(), dir.display());
    println!("  newly initialised: {:?}", report.missing_keys);
    println!(
        "  re-initialised (shape differs): {:?}",
        report.mismatched_keys
    );
    println!("  unused: {} tensors", report.unexpected_keys.len());

    // Two sequences, the second padded on the right (pad id 0, attention mask 0).
    let ids = Tensor::<B, 2, Int>::from_data(
        TensorData::new(vec![2i64, 10, 11, 12, 3, 2, 20, 3, 0, 0], [2, 5]),
        &device,
    );
    let mask = Tensor::<B, 2, Int>::from_data(
        TensorData::new(vec![1i64, 1, 1, 1, 1, 1, 1, 1, 0, 0], [2, 5]),
        &device,
    );
    let labels = Tensor::<B, 1, Int>::from_data(TensorData::new(vec![1i64, 0], [2]), &device);
    let output = model.forward(
        EncoderInput::new(ids).with_attention_mask(mask),
        Some(SequenceLabels::Classes(labels)),
    )?;
    println!("probabilities: {}", softmax(output.logits, 1));
    println!(
        "loss: {}",
        output.loss.expect("labels were given").into_scalar()
    );

    model.save_pretrained(&out)?;
    println!(
        "saved to {} (config.json + model.safetensors)",
        out.display()
    );
    Ok(())
}
