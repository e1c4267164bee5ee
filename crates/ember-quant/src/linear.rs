//! Reference (scalar, not yet fast) products of a float32 input with a quantized weight, matching
//! what bitsandbytes' `Linear8bitLt` and `Linear4bit` compute on the CPU.
//!
//! All take `x` as `rows x in_features` (row-major) and return `rows x out_features`.
//! Floating-point dot products accumulate in float64 and round once: they are a reference, so
//! they aim at the exact value; bitsandbytes' BLAS calls round differently, within about 1e-6 of
//! the output scale (see the parity tests).

use crate::blockwise::{dequantize_4bit, Packed4bit};
use crate::error::{check_len, numel, QuantError, Result};
use crate::int8::{int8_vectorwise_quant, round_f16, Int8Weight, INV_127};

/// The constant of bitsandbytes' `int8_mm_dequant`: `6.200124e-05`, a Python float cast to
/// float32. It is close to, but not, `1 / 127^2 = 6.2000124e-05` (1.8e-5 relatively larger),
/// and the products carry that factor.
pub(crate) const MM_DEQUANT_SCALE: f32 = 6.200124e-05_f64 as f32;

/// Checks `x` (`rows x in_features`), `bias` (`out_features`) and the output size.
fn check_io(
    x: &[f32],
    rows: usize,
    in_features: usize,
    out_features: usize,
    bias: Option<&[f32]>,
) -> Result<()> {
    check_len("x", numel("x", &[rows, in_features])?, x.len())?;
    numel("output", &[rows, out_features])?;
    if let Some(bias) = bias {
        check_len("bias", out_features, bias.len())?;
    }
    Ok(())
}

/// `x @ w^T + bias` for a float32 weight `w` (`out_features x in_features`), each dot product
/// accumulated in float64 and rounded once, then the bias added in float32. Lengths are checked
/// by the callers.
fn linear_f32(
    x: &[f32],
    rows: usize,
    w: &[f32],
    (out_features, in_features): (usize, usize),
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * out_features);
    for r in 0..rows {
        let xr = &x[r * in_features..(r + 1) * in_features];
        for o in 0..out_features {
            let wr = &w[o * in_features..(o + 1) * in_features];
            let dot: f64 = xr
                .iter()
                .zip(wr)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum();
            out.push(dot as f32 + bias.map_or(0.0, |b| b[o]));
        }
    }
    out
}

/// The LLM.int8 product of `bnb.nn.Linear8bitLt` in inference mode (`MatMul8bitLt`).
///
/// 1. `x` is rounded to float16 and quantized row-wise with the threshold (also compared in
///    float16): codes `CA`, row absmax `SCA`, outlier columns.
/// 2. `CA @ CB^T` in exact integer arithmetic, then `acc * (SCA[r] * SCB[o]) * 6.200124e-05`
///    (`int8_mm_dequant`) plus the bias, all in float32.
/// 3. With outliers: plus `x[:, cols] @ W'[:, cols]^T`, where `x` is the original float32 input
///    and `W'` the dequantized int8 weight (`CB * SCB * (1/127)`), not the original weight.
///
/// With `threshold <= 0` (no outliers) this is bit-exact with bitsandbytes.
///
/// # Errors
///
/// [`QuantError::LengthMismatch`] if `x`, `bias` or the weight do not fit together.
pub fn int8_linear(
    x: &[f32],
    rows: usize,
    weight: &Int8Weight,
    bias: Option<&[f32]>,
    threshold: f32,
) -> Result<Vec<f32>> {
    weight.validate()?;
    let (n_in, n_out) = (weight.in_features, weight.out_features);
    check_io(x, rows, n_in, n_out, bias)?;

    let x_half: Vec<f32> = x.iter().map(|&v| round_f16(v)).collect();
    let threshold = if threshold > 0.0 {
        round_f16(threshold)
    } else {
        threshold
    };
    let qa = int8_vectorwise_quant(rows, n_in, &x_half, threshold)?;

    let mut out = Vec::with_capacity(rows * n_out);
    for r in 0..rows {
        let ca = &qa.codes[r * n_in..(r + 1) * n_in];
        let xr = &x[r * n_in..(r + 1) * n_in];
        for o in 0..n_out {
            let cb = &weight.codes[o * n_in..(o + 1) * n_in];
            // torch._int_mm accumulates in int32 (wrapping); the sum then converts to float32.
            let acc = ca.iter().zip(cb).fold(0i32, |s, (a, b)| {
                s.wrapping_add(i32::from(*a) * i32::from(*b))
            });
            let mut y = acc as f32 * (qa.scb[r] * weight.scb[o]) * MM_DEQUANT_SCALE;
            if let Some(bias) = bias {
                y += bias[o];
            }
            // `output.addmm(subA, subB)`: the outlier columns in float32 against the dequantized
            // weight columns `(CB * SCB) * (1/127)`.
            if !qa.outlier_cols.is_empty() {
                let dot: f64 = qa
                    .outlier_cols
                    .iter()
                    .map(|&c| {
                        f64::from(xr[c]) * f64::from(f32::from(cb[c]) * weight.scb[o] * INV_127)
                    })
                    .sum();
                y += dot as f32;
            }
            out.push(y);
        }
    }
    Ok(out)
}

/// The product of `bnb.nn.Linear8bitLt` in training mode on the CPU (`MatMul8bitFp`): no
/// activation quantization and no outliers, just the dequantized weight
/// `CB * (SCB * (1/127))` (float32, in that order) in a float32 linear.
///
/// # Errors
///
/// [`QuantError::LengthMismatch`] if `x`, `bias` or the weight do not fit together.
pub fn int8_linear_dequantized(
    x: &[f32],
    rows: usize,
    weight: &Int8Weight,
    bias: Option<&[f32]>,
) -> Result<Vec<f32>> {
    weight.validate()?;
    let (n_in, n_out) = (weight.in_features, weight.out_features);
    check_io(x, rows, n_in, n_out, bias)?;
    let w: Vec<f32> = weight
        .codes
        .chunks(n_in.max(1))
        .zip(&weight.scb)
        .flat_map(|(row, &s)| {
            let scale = s * INV_127;
            row.iter().map(move |&c| f32::from(c) * scale)
        })
        .collect();
    Ok(linear_f32(x, rows, &w, (n_out, n_in), bias))
}

/// The product of `bnb.nn.Linear4bit` with a float32 compute dtype on the CPU in training mode
/// (`gemm_4bit`'s default kernel): [`dequantize_4bit`] the `[out_features, in_features]` weight,
/// then a float32 linear.
///
/// (In inference mode on a CPU with AVX512-BF16, bitsandbytes instead repacks the weight and
/// runs a bfloat16 kernel, which needs `out_features % 32 == 0` and is only bfloat16-accurate.)
///
/// # Errors
///
/// [`QuantError::InvalidShape`] unless the weight is 2-D, or any error of
/// [`dequantize_4bit`] and of the lengths of `x` and `bias`.
pub fn linear_4bit(
    x: &[f32],
    rows: usize,
    weight: &Packed4bit,
    bias: Option<&[f32]>,
) -> Result<Vec<f32>> {
    let &[n_out, n_in] = weight.state.shape.as_slice() else {
        return Err(QuantError::InvalidShape {
            tensor: "weight",
            shape: weight.state.shape.clone(),
            reason: "a linear weight must be 2-D [out_features, in_features]",
        });
    };
    check_io(x, rows, n_in, n_out, bias)?;
    let w = dequantize_4bit(weight)?;
    Ok(linear_f32(x, rows, &w, (n_out, n_in), bias))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockwise::{quantize_4bit, QuantType};

    fn matrix(rows: usize, cols: usize, seed: usize) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| (((i * 7919 + seed * 104729) % 1000) as f32 - 500.0) / 400.0)
            .collect()
    }

    fn reference(x: &[f32], rows: usize, w: &[f32], out: usize, bias: &[f32]) -> Vec<f32> {
        linear_f32(x, rows, w, (out, x.len() / rows), Some(bias))
    }

    #[test]
    fn int8_products_approximate_the_float_product() {
        let (rows, n_in, n_out) = (3, 32, 5);
        let w = matrix(n_out, n_in, 1);
        let bias = matrix(1, n_out, 2);
        let mut x = matrix(rows, n_in, 3);
        x[4] = 9.0; // an outlier in column 4
        let exact = reference(&x, rows, &w, n_out, &bias);
        let q = Int8Weight::quantize(n_out, n_in, &w).unwrap();
        for (threshold, tol) in [(6.0, 0.1), (0.0, 0.3)] {
            let y = int8_linear(&x, rows, &q, Some(&bias), threshold).unwrap();
            for (a, b) in y.iter().zip(&exact) {
                assert!((a - b).abs() < tol, "threshold {threshold}: {a} vs {b}");
            }
        }
        let y = int8_linear_dequantized(&x, rows, &q, Some(&bias)).unwrap();
        for (a, b) in y.iter().zip(&exact) {
            assert!((a - b).abs() < 0.1, "{a} vs {b}");
        }
    }

    #[test]
    fn linear_4bit_approximates_the_float_product() {
        let (rows, n_in, n_out) = (2, 64, 4);
        let w = matrix(n_out, n_in, 5);
        let x = matrix(rows, n_in, 6);
        let bias = vec![0.5; n_out];
        let exact = reference(&x, rows, &w, n_out, &bias);
        let q = quantize_4bit(&w, &[n_out, n_in], 64, QuantType::Nf4, true).unwrap();
        let y = linear_4bit(&x, rows, &q, Some(&bias)).unwrap();
        for (a, b) in y.iter().zip(&exact) {
            assert!((a - b).abs() < 1.5, "{a} vs {b}");
        }
    }

    #[test]
    fn shapes_are_checked() {
        let q = Int8Weight::quantize(2, 3, &[1.0; 6]).unwrap();
        assert!(matches!(
            int8_linear(&[1.0; 5], 2, &q, None, 0.0),
            Err(QuantError::LengthMismatch { tensor: "x", .. })
        ));
        assert!(matches!(
            int8_linear(&[1.0; 6], 2, &q, Some(&[0.0; 3]), 0.0),
            Err(QuantError::LengthMismatch { tensor: "bias", .. })
        ));
        let p = quantize_4bit(&[1.0; 8], &[8], 32, QuantType::Fp4, false).unwrap();
        assert!(matches!(
            linear_4bit(&[1.0; 8], 1, &p, None),
            Err(QuantError::InvalidShape { .. })
        ));
        let mut bad = q.clone();
        bad.scb.pop();
        assert!(matches!(
            int8_linear_dequantized(&[1.0; 3], 1, &bad, None),
            Err(QuantError::LengthMismatch { .. })
        ));
    }
}
