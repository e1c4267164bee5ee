//! Quantizes one weight matrix as `load_in_4bit` with `bnb_4bit_quant_type="nf4"` and
//! `bnb_4bit_use_double_quant=True` would, prints the bytes it takes per parameter and the
//! error of the dequantized values, and lists the tensors transformers would save for it.
//!
//! ```sh
//! cargo run -p ember-quant --example nf4
//! ```

use ember_quant::{dequantize_4bit, quantize_4bit, state_dict_4bit, QuantType};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A [576, 1536] weight (SmolLM2's down_proj shape) with a normal-ish spread.
    let (rows, cols) = (576, 1536);
    let weight: Vec<f32> = (0..rows * cols)
        .map(|i| {
            let x = (i as f32 * 0.618_034).fract() * 2.0 - 1.0;
            0.02 * x * x * x.signum() * 3.0
        })
        .collect();
    let packed = quantize_4bit(&weight, &[rows, cols], 64, QuantType::Nf4, true)?;
    let restored = dequantize_4bit(&packed)?;
    let max_err = weight
        .iter()
        .zip(&restored)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    let tensors = state_dict_4bit("model.layers.0.mlp.down_proj.weight", &packed)?;
    let bytes: usize = tensors.iter().map(|(_, t)| t.bytes.len()).sum();
    println!(
        "{} parameters in {bytes} bytes: {:.4} bytes per parameter (f32: 4); max |error| {max_err:.5}",
        weight.len(),
        bytes as f64 / weight.len() as f64
    );
    for (name, t) in &tensors {
        println!("  {name}: {:?} {:?}", t.dtype, t.shape);
    }
    Ok(())
}
