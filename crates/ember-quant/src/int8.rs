//! LLM.int8 row-wise ("vectorwise") int8 quantization, as bitsandbytes 0.50 does it on the CPU.
//!
//! Each row is scaled by its absolute maximum (`SCB`, "statistics of the columns of B" in
//! bitsandbytes' naming) to `[-127, 127]` and rounded half to even. With a `threshold`, every
//! element with `|x| >= threshold` is an outlier: it is left out of the row absmax, quantized as 0,
//! and (when there is more than one row) its whole column is zeroed and reported, so that
//! LLM.int8 can multiply those columns in floating point instead (see [`crate::linear`]).

use crate::error::{check_len, numel, QuantError, Result};

/// `1 / 127` as bitsandbytes writes it (the Python float `7.874015718698502e-3`), which torch
/// casts to float32 before multiplying.
pub(crate) const INV_127: f32 = (1.0f64 / 127.0) as f32;

/// The result of [`int8_vectorwise_quant`].
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Quantized {
    /// `rows x cols` int8 codes, row-major (`CB` for a weight, `CA` for activations).
    pub codes: Vec<i8>,
    /// One float32 absmax per row (`SCB` / `SCA`), computed without the outliers.
    pub scb: Vec<f32>,
    /// The columns holding an outlier, ascending; empty when `threshold <= 0`.
    pub outlier_cols: Vec<usize>,
}

/// torch's float32 -> int8 cast on x86: through int32 (`cvttps2dq`, which yields `i32::MIN` for
/// NaN and out-of-range values) keeping the low byte, so NaN and infinities become 0. This is
/// what an all-zero row (`0 * (127 / 0)` = NaN) quantizes to.
fn torch_cast_i8(v: f32) -> i8 {
    if v.is_finite() && v > -2_147_483_648.5 && v < 2_147_483_648.0 {
        v as i32 as i8
    } else {
        0
    }
}

/// bitsandbytes' `int8_vectorwise_quant(A, threshold)` for a float32 `rows x cols` matrix
/// (`values`, row-major), as its torch kernel computes it:
/// `round_half_even(x * (127.0 / row_absmax))` in float32. torch evaluates `127.0 / tensor` as
/// `tensor.reciprocal() * 127.0` (Python's `Tensor.__rtruediv__`), so the scale is
/// `(1 / row_absmax) * 127` with two roundings, not the correctly rounded quotient: about one
/// code in 40 000 differs by one otherwise.
///
/// For float16 inputs (what `Linear8bitLt` passes), round `values` and `threshold` to float16
/// before calling: torch compares and scales the float16 values exactly as float32 does here.
///
/// # Errors
///
/// [`crate::QuantError::LengthMismatch`] if `values` does not hold `rows * cols` elements.
pub fn int8_vectorwise_quant(
    rows: usize,
    cols: usize,
    values: &[f32],
    threshold: f32,
) -> Result<Int8Quantized> {
    check_len("values", numel("values", &[rows, cols])?, values.len())?;
    if cols == 0 {
        if rows == 0 {
            return Ok(Int8Quantized {
                codes: Vec::new(),
                scb: Vec::new(),
                outlier_cols: Vec::new(),
            });
        }
        // torch cannot take the max of an empty row either.
        return Err(QuantError::InvalidShape {
            tensor: "values",
            shape: vec![rows, cols],
            reason: "rows need at least one column for their absmax",
        });
    }
    let is_outlier = |v: f32| threshold > 0.0 && v.abs() >= threshold;
    let mut outlier_cols = Vec::new();
    if threshold > 0.0 {
        let mut is_col = vec![false; cols];
        for row in values.chunks(cols) {
            for (c, v) in row.iter().enumerate() {
                is_col[c] |= is_outlier(*v);
            }
        }
        outlier_cols = (0..cols).filter(|&c| is_col[c]).collect();
    }
    // Outliers count as zeros for the absmax and the codes.
    let kept = |v: f32| if is_outlier(v) { 0.0 } else { v };

    let mut codes = Vec::with_capacity(values.len());
    let mut scb = Vec::with_capacity(rows);
    for row in values.chunks(cols).take(rows) {
        let absmax = row.iter().fold(0.0f32, |m, v| m.max(kept(*v).abs()));
        // torch's `127.0 / row_stats`: reciprocal, then multiply (see the function docs).
        let scale = (1.0 / absmax) * 127.0;
        codes.extend(
            row.iter()
                .map(|v| torch_cast_i8((kept(*v) * scale).round_ties_even())),
        );
        scb.push(absmax);
    }
    // bitsandbytes zeroes the outlier columns only for more than one row (with one row the
    // outliers are the whole column and already zero).
    if rows > 1 {
        for row in codes.chunks_mut(cols) {
            for &c in &outlier_cols {
                row[c] = 0;
            }
        }
    }
    Ok(Int8Quantized {
        codes,
        scb,
        outlier_cols,
    })
}

/// bitsandbytes' `int8_vectorwise_dequant(A, stats)`: `(code * scb[row]) * (1 / 127)`, two
/// float32 multiplies in that order.
///
/// # Errors
///
/// [`crate::QuantError::LengthMismatch`] if `codes` is not `rows x cols` or `scb` not `rows`.
pub fn int8_vectorwise_dequant(
    rows: usize,
    cols: usize,
    codes: &[i8],
    scb: &[f32],
) -> Result<Vec<f32>> {
    check_len("codes", numel("codes", &[rows, cols])?, codes.len())?;
    check_len("scb", rows, scb.len())?;
    Ok(codes
        .chunks(cols.max(1))
        .zip(scb)
        .flat_map(|(row, &s)| row.iter().map(move |&c| c as f32 * s * INV_127))
        .collect())
}

/// An LLM.int8 weight: `out_features x in_features` int8 codes and their row absmax, as
/// `bnb.nn.Int8Params` holds them (`CB`, `SCB`).
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Weight {
    /// Rows of the weight (outputs).
    pub out_features: usize,
    /// Columns of the weight (inputs).
    pub in_features: usize,
    /// `CB`: the codes, row-major.
    pub codes: Vec<i8>,
    /// `SCB`: the absmax of every row.
    pub scb: Vec<f32>,
}

impl Int8Weight {
    /// Wraps existing codes and scales (e.g. `weight` and `SCB` of a saved Linear8bitLt).
    ///
    /// # Errors
    ///
    /// [`crate::QuantError::LengthMismatch`] if the lengths do not fit the shape.
    pub fn new(
        out_features: usize,
        in_features: usize,
        codes: Vec<i8>,
        scb: Vec<f32>,
    ) -> Result<Self> {
        check_len(
            "weight codes",
            numel("weight", &[out_features, in_features])?,
            codes.len(),
        )?;
        check_len("SCB", out_features, scb.len())?;
        Ok(Int8Weight {
            out_features,
            in_features,
            codes,
            scb,
        })
    }

    /// Quantizes a float32 `out_features x in_features` weight as `Int8Params` does when the
    /// module moves to a device: round to float16, then [`int8_vectorwise_quant`] without a
    /// threshold.
    ///
    /// # Errors
    ///
    /// [`crate::QuantError::LengthMismatch`] if `weight` does not hold `out x in` elements.
    pub fn quantize(out_features: usize, in_features: usize, weight: &[f32]) -> Result<Self> {
        let half: Vec<f32> = weight.iter().map(|&w| round_f16(w)).collect();
        let q = int8_vectorwise_quant(out_features, in_features, &half, 0.0)?;
        Ok(Int8Weight {
            out_features,
            in_features,
            codes: q.codes,
            scb: q.scb,
        })
    }

    /// Checks the lengths of a weight whose fields were set directly.
    pub(crate) fn validate(&self) -> Result<()> {
        check_len(
            "weight codes",
            numel("weight", &[self.out_features, self.in_features])?,
            self.codes.len(),
        )?;
        check_len("SCB", self.out_features, self.scb.len())
    }
}

/// Rounds to the nearest float16 (ties to even, overflow to infinity), as `.to(torch.float16)`.
pub(crate) fn round_f16(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_scale_to_127_with_ties_to_even() {
        let q = int8_vectorwise_quant(2, 3, &[0.0, 0.0, 0.0, 1.0, -2.0, 4.0], 0.0).unwrap();
        // 127 / 4 = 31.75: 1 -> 31.75 -> 32, -2 -> -63.5 -> -64 (even), 4 -> 127.
        assert_eq!(q.codes, vec![0, 0, 0, 32, -64, 127]);
        assert_eq!(q.scb, vec![0.0, 4.0]);
        assert!(q.outlier_cols.is_empty());
        let q = int8_vectorwise_quant(1, 2, &[2.5 / 127.0, 1.0], 0.0).unwrap();
        assert_eq!(q.codes, vec![2, 127]);
        // From the tiny-llama int8 fixture: 127 / absmax rounds to 2978.9092 but torch's
        // reciprocal-then-multiply gives 2978.9089, so x * scale is 51.499996 and rounds to 51
        // (the correctly rounded scale would give exactly 51.5 -> 52).
        let q = int8_vectorwise_quant(1, 2, &[0.042633057, 0.017288208], 0.0).unwrap();
        assert_eq!(q.codes, vec![127, 51]);
    }

    #[test]
    fn outlier_columns_are_zeroed_and_reported() {
        let x = [1.0, 8.0, -7.0, 0.5, 0.25, -6.0, 1.0, 0.5];
        let q = int8_vectorwise_quant(2, 4, &x, 6.0).unwrap();
        assert_eq!(q.outlier_cols, vec![1, 2]);
        assert_eq!(q.scb, vec![1.0, 1.0]);
        assert_eq!(q.codes, vec![127, 0, 0, 64, 32, 0, 0, 64]);
        // One row: the outlier itself is zero, the column is reported.
        let q = int8_vectorwise_quant(1, 3, &[1.0, 7.0, -0.5], 6.0).unwrap();
        assert_eq!(q.outlier_cols, vec![1]);
        assert_eq!(q.codes, vec![127, 0, -64]);
    }

    #[test]
    fn dequant_and_validation() {
        let d = int8_vectorwise_dequant(1, 2, &[127, -64], &[2.0]).unwrap();
        assert_eq!(d, vec![127.0 * 2.0 * INV_127, -128.0 * INV_127]);
        let err = int8_vectorwise_quant(2, 3, &[0.0; 5], 0.0).unwrap_err();
        assert_eq!(
            err,
            QuantError::LengthMismatch {
                tensor: "values",
                expected: 6,
                actual: 5
            }
        );
        assert!(matches!(
            int8_vectorwise_dequant(2, 2, &[0; 4], &[1.0]),
            Err(QuantError::LengthMismatch { tensor: "scb", .. })
        ));
        assert!(Int8Weight::new(2, 2, vec![0; 3], vec![1.0; 2]).is_err());
        assert!(int8_vectorwise_quant(usize::MAX, 2, &[], 0.0).is_err());
        assert!(int8_vectorwise_quant(0, 5, &[], 0.0)
            .unwrap()
            .codes
            .is_empty());
    }

    #[test]
    fn weight_is_rounded_to_f16_first() {
        // 1 + 2^-12 is 1.0 in float16, so the row absmax is exactly 1.
        let w = Int8Weight::quantize(1, 2, &[1.0 + 2f32.powi(-12), 0.5]).unwrap();
        assert_eq!(w.scb, vec![1.0]);
        assert_eq!(w.codes, vec![127, 64]);
    }

    #[test]
    fn non_finite_casts_to_zero() {
        assert_eq!(torch_cast_i8(f32::NAN), 0);
        assert_eq!(torch_cast_i8(f32::INFINITY), 0);
        assert_eq!(torch_cast_i8(-127.0), -127);
    }
}
