//! 4-bit blockwise quantization: NF4 / FP4, with optional double quantization.
//!
//! The values are split into blocks of `blocksize` consecutive elements of the flattened tensor
//! (the last block may be shorter); each block is scaled by its absolute maximum (`absmax`) into
//! `[-1, 1]` and every value is replaced by the nibble of a code entry.
//!
//! This reproduces bitsandbytes 0.50 on the CPU bit for bit:
//!
//! - [`quantize_4bit`] is the torch ("default") kernel, the only one bitsandbytes has on the CPU:
//!   full blocks multiply by `1 / max(absmax, 1e-38)`, the tail block divides by
//!   `max(absmax, 1e-38)` (and stores that clamped absmax), values are clamped to `[-1, 1]` and
//!   bucketed against the midpoints of the sorted code, a value exactly on a midpoint going to
//!   the lower entry. Element `2i` is the high nibble of byte `i`, element `2i + 1` the low one;
//!   an odd count pads a zero.
//! - Double quantization (`compress_statistics`) stores `absmax - mean(absmax)` as 8-bit
//!   dynamic-map codes in blocks of 256 ([`crate::blockwise8`]).
//! - Dequantization is `code[nibble] * absmax[block]`, in float32. For double quantization the
//!   absmax is `nested_code[byte] * nested_absmax[block / 256] + offset` first.
//!
//! bitsandbytes' AVX-512 `dequantize_4bit` kernel indexes the absmax per row, which is wrong when
//! the last dimension is a multiple of 16 but not of the blocksize; [`dequantize_4bit`] always
//! uses the flat blocks (what the quantizer wrote and what bitsandbytes' other kernels read).

use std::str::FromStr;
use std::sync::OnceLock;

use crate::blockwise8::{block_count, check_blocksize_8bit, dequantize_blocks, quantize_blockwise};
use crate::code::{dynamic_map, FP4_ASCENDING, FP4_CODE, NF4_CODE};
use crate::error::{check_len, numel, QuantError, Result};
use crate::torch_sum;

/// The blocksize of the nested absmax quantization in double quantization (fixed in
/// bitsandbytes' `quantize_4bit`).
pub const NESTED_BLOCKSIZE: usize = 256;

/// The floor torch's `quantize_4bit` kernel clamps an absmax to before it divides by it
/// (`absmax.clamp(min=1e-38)`, a float32 subnormal).
const ABSMAX_FLOOR: f32 = 1e-38;

/// The 4-bit data type: which 16-entry code the nibbles index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantType {
    /// 4-bit NormalFloat ([`NF4_CODE`]), QLoRA's default.
    Nf4,
    /// 4-bit float ([`FP4_CODE`]), bitsandbytes' default.
    Fp4,
}

impl QuantType {
    /// The code the nibbles index (what bitsandbytes stores as `quant_map`).
    pub fn code(self) -> &'static [f32; 16] {
        match self {
            QuantType::Nf4 => &NF4_CODE,
            QuantType::Fp4 => &FP4_CODE,
        }
    }

    /// bitsandbytes' name: `"nf4"` or `"fp4"`.
    pub fn as_str(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }

    /// The bucket boundaries and bucket -> nibble map of torch's `quantize_4bit` kernel.
    fn quantize_table(self) -> &'static ([f32; 15], [u8; 16]) {
        static NF4: OnceLock<([f32; 15], [u8; 16])> = OnceLock::new();
        static FP4: OnceLock<([f32; 15], [u8; 16])> = OnceLock::new();
        let build = |code: &[f32; 16], ascending: [u8; 16]| {
            let sorted = ascending.map(|i| code[i as usize]);
            (
                std::array::from_fn(|i| (sorted[i] + sorted[i + 1]) / 2.0),
                ascending,
            )
        };
        match self {
            // NF4 is sorted already: bucket i is nibble i.
            QuantType::Nf4 => {
                NF4.get_or_init(|| build(&NF4_CODE, std::array::from_fn(|i| i as u8)))
            }
            QuantType::Fp4 => FP4.get_or_init(|| build(&FP4_CODE, FP4_ASCENDING)),
        }
    }

    /// The nibble of a value already scaled into `[-1, 1]`: the number of midpoints strictly
    /// below it (`torch.bucketize(right=False)`), mapped back to nibble order.
    fn nibble(self, scaled: f32) -> u8 {
        let (bounds, ascending) = self.quantize_table();
        ascending[bounds.partition_point(|b| *b < scaled)]
    }
}

impl FromStr for QuantType {
    type Err = QuantError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "nf4" => Ok(QuantType::Nf4),
            "fp4" => Ok(QuantType::Fp4),
            other => Err(QuantError::UnknownQuantType(other.to_owned())),
        }
    }
}

/// The absmax of a double-quantized 4-bit tensor: itself quantized to 8 bits, blockwise.
#[derive(Debug, Clone, PartialEq)]
pub struct NestedAbsmax {
    /// One dynamic-map byte per 4-bit block: the code of `absmax - offset` (`QuantState.absmax`).
    pub codes: Vec<u8>,
    /// One float32 scale per `nested_blocksize` codes (`state2.absmax`, `nested_absmax`).
    pub nested_absmax: Vec<f32>,
    /// The mean of the original absmax, subtracted before quantizing (`nested_offset`).
    pub offset: f32,
    /// The 8-bit code of `codes` (`state2.code`, `nested_quant_map`), normally [`dynamic_map`].
    pub nested_code: Box<[f32; 256]>,
    /// Codes per nested block (`nested_blocksize`), 256 in bitsandbytes.
    pub nested_blocksize: usize,
}

/// The per-block scales of a 4-bit tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    /// One float32 absmax per block (`compress_statistics=False`).
    Plain(Vec<f32>),
    /// Double quantization (`compress_statistics=True`).
    Nested(NestedAbsmax),
}

/// What bitsandbytes' `QuantState` holds for a 4-bit tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantState4bit {
    /// The per-block scales.
    pub absmax: Absmax,
    /// Elements per block: a power of two in `32..=4096`.
    pub blocksize: usize,
    /// The shape of the original tensor (`[out_features, in_features]` for a linear weight).
    pub shape: Vec<usize>,
    /// NF4 or FP4.
    pub quant_type: QuantType,
    /// The 16-entry code (`quant_map`); dequantization reads this table.
    pub code: [f32; 16],
}

/// A 4-bit quantized tensor: packed nibbles plus their [`QuantState4bit`].
#[derive(Debug, Clone, PartialEq)]
pub struct Packed4bit {
    /// Two nibbles per byte, element `2i` in the high nibble; `ceil(n / 2)` bytes.
    pub packed: Vec<u8>,
    /// How to turn the nibbles back into values.
    pub state: QuantState4bit,
}

/// [`QuantError::InvalidBlocksize`] unless `blocksize` is one that bitsandbytes' 4-bit
/// functions accept: a power of two in `32..=4096`.
pub fn check_blocksize_4bit(op: &'static str, blocksize: usize) -> Result<()> {
    if blocksize.is_power_of_two() && (32..=4096).contains(&blocksize) {
        Ok(())
    } else {
        Err(QuantError::InvalidBlocksize {
            op,
            blocksize,
            expected: "one of 32, 64, 128, 256, 512, 1024, 2048, 4096",
        })
    }
}

/// Quantizes `values` (a tensor of `shape`, row-major) to 4 bits like bitsandbytes'
/// `quantize_4bit(A, blocksize, compress_statistics, quant_type)`.
///
/// With `compress_statistics` the absmax is double-quantized: `offset = absmax.mean()` (in
/// torch's summation order) and `absmax - offset` goes through [`quantize_blockwise`] with the
/// [`dynamic_map`] and blocks of [`NESTED_BLOCKSIZE`].
///
/// # Errors
///
/// An invalid blocksize, a `shape` that does not hold `values.len()` elements, or an empty
/// input with `compress_statistics` (the mean of no absmax).
pub fn quantize_4bit(
    values: &[f32],
    shape: &[usize],
    blocksize: usize,
    quant_type: QuantType,
    compress_statistics: bool,
) -> Result<Packed4bit> {
    check_blocksize_4bit("quantize_4bit", blocksize)?;
    check_len("values", numel("shape", shape)?, values.len())?;
    let n = values.len();
    let full = n - n % blocksize;

    let mut absmax = Vec::with_capacity(block_count(n, blocksize));
    let mut nibbles = Vec::with_capacity(n + 1);
    for block in values[..full].chunks(blocksize) {
        let max = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        // Full blocks multiply by the reciprocal of the clamped absmax but store it unclamped.
        let inv = 1.0 / max.max(ABSMAX_FLOOR);
        nibbles.extend(
            block
                .iter()
                .map(|v| quant_type.nibble((v * inv).clamp(-1.0, 1.0))),
        );
        absmax.push(max);
    }
    if full < n {
        // The tail block divides by its clamped absmax and stores the clamped value.
        let tail = &values[full..];
        let max = tail
            .iter()
            .fold(0.0f32, |m, v| m.max(v.abs()))
            .max(ABSMAX_FLOOR);
        nibbles.extend(
            tail.iter()
                .map(|v| quant_type.nibble((v / max).clamp(-1.0, 1.0))),
        );
        absmax.push(max);
    }
    if nibbles.len() % 2 == 1 {
        nibbles.push(quant_type.nibble(0.0));
    }
    let packed = nibbles
        .chunks_exact(2)
        .map(|p| (p[0] << 4) | p[1])
        .collect();

    let absmax = if compress_statistics {
        if absmax.is_empty() {
            return Err(QuantError::Empty {
                tensor: "values",
                op: "quantize_4bit with compress_statistics",
            });
        }
        let offset = torch_sum::mean(&absmax);
        let centered: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
        let nested = quantize_blockwise(&centered, dynamic_map(), NESTED_BLOCKSIZE)?;
        Absmax::Nested(NestedAbsmax {
            codes: nested.codes,
            nested_absmax: nested.absmax,
            offset,
            nested_code: nested.code,
            nested_blocksize: NESTED_BLOCKSIZE,
        })
    } else {
        Absmax::Plain(absmax)
    };
    let state = QuantState4bit {
        absmax,
        blocksize,
        shape: shape.to_vec(),
        quant_type,
        code: *quant_type.code(),
    };
    Ok(Packed4bit { packed, state })
}

impl Packed4bit {
    /// The number of elements of the original tensor.
    ///
    /// # Errors
    ///
    /// [`QuantError::InvalidShape`] if the shape's size overflows.
    pub fn numel(&self) -> Result<usize> {
        numel("state.shape", &self.state.shape)
    }

    /// Checks that the packed bytes, the absmax and the nested fields fit the shape and the
    /// blocksizes, so that dequantization cannot index out of bounds.
    ///
    /// # Errors
    ///
    /// The first field that does not fit.
    pub fn validate(&self) -> Result<()> {
        let state = &self.state;
        check_blocksize_4bit("dequantize_4bit", state.blocksize)?;
        let n = self.numel()?;
        check_len("packed", n.div_ceil(2), self.packed.len())?;
        let blocks = block_count(n, state.blocksize);
        match &state.absmax {
            Absmax::Plain(absmax) => check_len("absmax", blocks, absmax.len()),
            Absmax::Nested(nested) => {
                check_blocksize_8bit("dequantize_4bit nested absmax", nested.nested_blocksize)?;
                check_len("absmax codes", blocks, nested.codes.len())?;
                check_len(
                    "nested_absmax",
                    block_count(blocks, nested.nested_blocksize),
                    nested.nested_absmax.len(),
                )
            }
        }
    }

    /// The float32 absmax of every block: the plain absmax, or for double quantization
    /// `nested_code[code] * nested_absmax[i / nested_blocksize] + offset` as bitsandbytes
    /// computes it (a float32 multiply, then a float32 add).
    ///
    /// # Errors
    ///
    /// See [`Packed4bit::validate`].
    pub fn absmax_f32(&self) -> Result<Vec<f32>> {
        self.validate()?;
        Ok(match &self.state.absmax {
            Absmax::Plain(absmax) => absmax.clone(),
            Absmax::Nested(nested) => dequantize_blocks(
                &nested.codes,
                &nested.nested_absmax,
                &nested.nested_code[..],
                nested.nested_blocksize,
            )
            .into_iter()
            .map(|a| a + nested.offset)
            .collect(),
        })
    }
}

/// Dequantizes a 4-bit tensor like bitsandbytes' `dequantize_4bit`, into float32 values in the
/// original (row-major) layout.
///
/// # Errors
///
/// See [`Packed4bit::validate`].
pub fn dequantize_4bit(packed: &Packed4bit) -> Result<Vec<f32>> {
    let absmax = packed.absmax_f32()?;
    let n = packed.numel()?;
    let mut nibbles: Vec<u8> = packed
        .packed
        .iter()
        .flat_map(|b| [b >> 4, b & 0x0f])
        .collect();
    nibbles.truncate(n);
    Ok(dequantize_blocks(
        &nibbles,
        &absmax,
        &packed.state.code,
        packed.state.blocksize,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect()
    }

    #[test]
    fn nibble_order_and_padding() {
        // Two values per byte, the first in the high nibble; an odd count pads a zero nibble.
        let q = quantize_4bit(&[1.0, -1.0, 0.0], &[3], 64, QuantType::Nf4, false).unwrap();
        assert_eq!(q.packed, vec![0xF0, 0x77]);
        assert_eq!(q.state.absmax, Absmax::Plain(vec![1.0]));
        assert_eq!(dequantize_4bit(&q).unwrap(), vec![1.0, -1.0, 0.0]);
        let q = quantize_4bit(&[1.0, -1.0, 0.0], &[3], 64, QuantType::Fp4, false).unwrap();
        // FP4: 1.0 is nibble 3, -1.0 nibble 11; zero and the padding are nibble 0.
        assert_eq!(q.packed, vec![0x3B, 0x00]);
    }

    #[test]
    fn ties_go_to_the_lower_entry() {
        // Exactly between NF4 entries 7 (0.0) and 8: bucketize(right=False) picks 7.
        let mid = (NF4_CODE[7] + NF4_CODE[8]) / 2.0;
        let q = quantize_4bit(&[1.0, mid], &[2], 32, QuantType::Nf4, false).unwrap();
        assert_eq!(q.packed[0] & 0x0f, 7);
        let above = f32::from_bits(mid.to_bits() + 1);
        let q = quantize_4bit(&[1.0, above], &[2], 32, QuantType::Nf4, false).unwrap();
        assert_eq!(q.packed[0] & 0x0f, 8);
    }

    #[test]
    fn fp4_small_values_split_between_the_two_zeros() {
        let tiny = 1e-4f32;
        let q = quantize_4bit(&[1.0, tiny, -tiny, 0.0], &[4], 32, QuantType::Fp4, false).unwrap();
        assert_eq!(q.packed, vec![0x38, 0x00]);
    }

    #[test]
    fn round_trip_error_is_bounded() {
        let x = ramp(1000);
        for qt in [QuantType::Nf4, QuantType::Fp4] {
            for dq in [false, true] {
                let q = quantize_4bit(&x, &[10, 100], 64, qt, dq).unwrap();
                assert_eq!(q.packed.len(), 500);
                let y = dequantize_4bit(&q).unwrap();
                let absmax = q.absmax_f32().unwrap();
                for (i, (a, b)) in x.iter().zip(&y).enumerate() {
                    // Half the widest gap of either code, plus the double-quantized absmax error.
                    assert!(
                        (a - b).abs() <= 0.17 * absmax[i / 64] + 0.02,
                        "{qt:?} {dq} {i}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn zero_blocks() {
        // A zero full block stores absmax 0; a zero tail block stores the 1e-38 floor.
        let x = vec![0.0f32; 40];
        let q = quantize_4bit(&x, &[40], 32, QuantType::Nf4, false).unwrap();
        assert_eq!(q.state.absmax, Absmax::Plain(vec![0.0, ABSMAX_FLOOR]));
        assert!(dequantize_4bit(&q).unwrap().iter().all(|v| *v == 0.0));
    }

    #[test]
    fn double_quant_layout() {
        let x = ramp(64 * 300 + 10);
        let q = quantize_4bit(&x, &[x.len()], 64, QuantType::Nf4, true).unwrap();
        let Absmax::Nested(nested) = &q.state.absmax else {
            panic!("not nested")
        };
        assert_eq!(nested.codes.len(), 301);
        assert_eq!(nested.nested_absmax.len(), 2);
        assert_eq!(nested.nested_blocksize, 256);
        assert_eq!(&*nested.nested_code, dynamic_map());
        let plain = quantize_4bit(&x, &[x.len()], 64, QuantType::Nf4, false).unwrap();
        let Absmax::Plain(exact) = &plain.state.absmax else {
            panic!("not plain")
        };
        for (a, b) in q.absmax_f32().unwrap().iter().zip(exact) {
            assert!((a - b).abs() <= 0.01 * b.abs() + 1e-3, "{a} vs {b}");
        }
    }

    #[test]
    fn blocksize_validation() {
        for bs in [0, 16, 48, 100, 8192] {
            let err = quantize_4bit(&[1.0; 64], &[64], bs, QuantType::Nf4, false).unwrap_err();
            assert!(
                matches!(err, QuantError::InvalidBlocksize { blocksize, .. } if blocksize == bs)
            );
            assert!(err.to_string().contains(&bs.to_string()));
        }
        for bs in [32, 64, 4096] {
            assert!(quantize_4bit(&[1.0; 64], &[64], bs, QuantType::Nf4, false).is_ok());
        }
    }

    #[test]
    fn length_validation() {
        let err = quantize_4bit(&[1.0; 10], &[3, 4], 64, QuantType::Nf4, false).unwrap_err();
        assert_eq!(
            err,
            QuantError::LengthMismatch {
                tensor: "values",
                expected: 12,
                actual: 10
            }
        );
        let err =
            quantize_4bit(&[1.0; 10], &[usize::MAX, 2], 64, QuantType::Nf4, false).unwrap_err();
        assert!(matches!(
            err,
            QuantError::InvalidShape {
                tensor: "shape",
                ..
            }
        ));

        let mut q = quantize_4bit(&ramp(100), &[100], 32, QuantType::Fp4, true).unwrap();
        q.packed.pop();
        assert!(matches!(
            dequantize_4bit(&q),
            Err(QuantError::LengthMismatch {
                tensor: "packed",
                ..
            })
        ));
        q.packed.push(0);
        if let Absmax::Nested(n) = &mut q.state.absmax {
            n.nested_absmax.clear();
        }
        assert!(matches!(
            dequantize_4bit(&q),
            Err(QuantError::LengthMismatch {
                tensor: "nested_absmax",
                ..
            })
        ));
        q.state.blocksize = 33;
        assert!(matches!(
            dequantize_4bit(&q),
            Err(QuantError::InvalidBlocksize { blocksize: 33, .. })
        ));
    }

    #[test]
    fn empty_inputs() {
        let q = quantize_4bit(&[], &[0, 5], 64, QuantType::Nf4, false).unwrap();
        assert!(q.packed.is_empty());
        assert!(dequantize_4bit(&q).unwrap().is_empty());
        let err = quantize_4bit(&[], &[0], 64, QuantType::Nf4, true).unwrap_err();
        assert!(matches!(err, QuantError::Empty { .. }));
    }

    #[test]
    fn quant_type_names() {
        assert_eq!("nf4".parse::<QuantType>().unwrap(), QuantType::Nf4);
        assert_eq!(QuantType::Fp4.as_str(), "fp4");
        assert_eq!(
            "int4".parse::<QuantType>(),
            Err(QuantError::UnknownQuantType("int4".into()))
        );
    }
}
