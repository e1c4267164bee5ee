//! Shows the backend compiled in and runs the demo tokenizer into tensors on it.
//!
//! `cargo run -p ember --example backend` (add `--features cuda` for the GPU).

use ember::prelude::*;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("backend: {}", ember::backend_name());
    let tok = ember::tokenizers::demo::demo_tokenizer()?;
    let batch = tok.batch_encode(
        &["a clean room", "房间很干净"],
        &EncodeOptions::default().padding(Padding::Longest),
    )?;
    let t: TensorBatch<Backend> = batch.to_tensors(&default_device())?;
    println!(
        "input_ids {:?} on {:?}",
        t.input_ids.dims(),
        default_device()
    );
    Ok(())
}
