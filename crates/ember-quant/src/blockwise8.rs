//! 8-bit blockwise quantization with a 256-entry code (the dynamic map by default), as
//! bitsandbytes' native CPU kernel (`csrc/cpu_ops.cpp`) computes it.
//!
//! Blocks are `blocksize` consecutive elements of the flattened tensor (the last may be shorter).
//! The kernel does not search the code for the nearest entry: it scales a value by `1 / absmax`,
//! maps `[-1, 1]` onto 65536 points and reads the entry from a precomputed table. That is the
//! nearest entry except within about 1.5e-5 of a midpoint, and notably 0.0 becomes the smallest
//! positive entry. We reproduce the table, so the bytes are the same.
//!
//! This quantizes bitsandbytes' blockwise 8-bit tensors and the nested absmax of 4-bit double
//! quantization ([`crate::blockwise`]).

use std::sync::OnceLock;

use crate::code::dynamic_map;
use crate::error::{check_len, QuantError, Result};

/// An 8-bit blockwise quantized tensor (`quantize_blockwise`).
#[derive(Debug, Clone, PartialEq)]
pub struct Blockwise8bit {
    /// One code index per element.
    pub codes: Vec<u8>,
    /// One float32 absmax per block.
    pub absmax: Vec<f32>,
    /// The 256-entry code, sorted ascending.
    pub code: Box<[f32; 256]>,
    /// Elements per block.
    pub blocksize: usize,
}

/// The 8-bit CPU kernel takes any positive blocksize (bitsandbytes only rejects `<= 0`).
pub(crate) fn check_blocksize_8bit(op: &'static str, blocksize: usize) -> Result<()> {
    if blocksize == 0 {
        Err(QuantError::InvalidBlocksize {
            op,
            blocksize,
            expected: "a positive number",
        })
    } else {
        Ok(())
    }
}

/// Blocks of `blocksize` needed for `n` elements (the last one may be partial).
pub(crate) fn block_count(n: usize, blocksize: usize) -> usize {
    n.div_ceil(blocksize)
}

/// `code[index] * absmax[i / blocksize]` for every element; lengths checked by the caller.
pub(crate) fn dequantize_blocks(
    indices: &[u8],
    absmax: &[f32],
    code: &[f32],
    blocksize: usize,
) -> Vec<f32> {
    indices
        .chunks(blocksize)
        .zip(absmax)
        .flat_map(|(block, &scale)| block.iter().map(move |&q| code[q as usize] * scale))
        .collect()
}

/// The value -> index table of bitsandbytes' CPU 8-bit quantizer (`build_quantize_lut` in
/// `csrc/cpu_ops.cpp`): entry `i` is the code index for `-1 + 2i / 65535`, the first entry
/// whose upper midpoint is not below it. Assumes `code` is sorted ascending, as bitsandbytes
/// does.
fn build_quantize_lut(code: &[f32; 256]) -> Box<[u8; 65536]> {
    let midpoints: [f32; 255] = std::array::from_fn(|i| (code[i] + code[i + 1]) * 0.5);
    let mut lut = Box::new([0u8; 65536]);
    let mut idx = 0usize;
    for (i, entry) in lut.iter_mut().enumerate() {
        let val = (i as f32 + i as f32) / 65535.0 - 1.0;
        while idx < 255 && midpoints[idx] < val {
            idx += 1;
        }
        *entry = idx as u8;
    }
    lut
}

/// The table of the default [`dynamic_map`], built once; other codes build theirs per call.
fn dynamic_map_lut() -> &'static [u8; 65536] {
    static LUT: OnceLock<Box<[u8; 65536]>> = OnceLock::new();
    LUT.get_or_init(|| build_quantize_lut(dynamic_map()))
}

/// The table index of a value already multiplied by `1 / absmax` (`norm_to_lut_index`):
/// clamp to `[-1, 1]`, map to `[0, 65535]` and truncate. The CPU build fuses `* 65535 + 0.5`
/// into one multiply-add; `mul_add` does the same (unfused arithmetic would give the same index
/// for all but exact ties, since every truncation edge `k - 0.5` is a float32).
fn lut_index(scaled: f32) -> usize {
    // Like std::clamp, f32::clamp lets NaN through.
    let v = scaled.clamp(-1.0, 1.0);
    let t = (v + 1.0) * 0.5;
    let f = t.mul_add(65535.0, 0.5);
    // cvttss2si gives i32::MIN for NaN; the kernel keeps the low 16 bits.
    let i = if f.is_nan() { i32::MIN } else { f as i32 };
    usize::from(i as u16)
}

/// Quantizes `values` blockwise to 8 bits with `code` like bitsandbytes'
/// `quantize_blockwise(A, code, blocksize=blocksize)` on the CPU.
///
/// Per block: `absmax = max(0, max |x|)` (a NaN is skipped, as `std::max` does), an all-zero
/// block gets code index 0, otherwise each value becomes `lut[index(x * (1 / absmax))]` where
/// the table discretises `[-1, 1]` into 65536 steps; this is the nearest code entry except
/// within about 1.5e-5 of a midpoint. Zero itself lands between two table points and becomes
/// the smallest positive entry of the dynamic map (`2.125e-5`), not `0.0`.
///
/// # Errors
///
/// A zero blocksize.
pub fn quantize_blockwise(
    values: &[f32],
    code: &[f32; 256],
    blocksize: usize,
) -> Result<Blockwise8bit> {
    check_blocksize_8bit("quantize_blockwise", blocksize)?;
    let own_lut;
    let lut: &[u8; 65536] = if code == dynamic_map() {
        dynamic_map_lut()
    } else {
        own_lut = build_quantize_lut(code);
        &own_lut
    };
    let mut codes = Vec::with_capacity(values.len());
    let mut absmax = Vec::with_capacity(block_count(values.len(), blocksize));
    for block in values.chunks(blocksize) {
        let max = block
            .iter()
            .fold(0.0f32, |m, v| if m < v.abs() { v.abs() } else { m });
        absmax.push(max);
        if max == 0.0 {
            codes.extend(std::iter::repeat_n(0u8, block.len()));
            continue;
        }
        let inv = 1.0 / max;
        codes.extend(block.iter().map(|v| lut[lut_index(v * inv)]));
    }
    Ok(Blockwise8bit {
        codes,
        absmax,
        code: Box::new(*code),
        blocksize,
    })
}

/// Dequantizes an 8-bit blockwise tensor like bitsandbytes' `dequantize_blockwise`:
/// `code[byte] * absmax[i / blocksize]` in float32.
///
/// # Errors
///
/// A zero blocksize or an absmax that does not have one value per block.
pub fn dequantize_blockwise(q: &Blockwise8bit) -> Result<Vec<f32>> {
    check_blocksize_8bit("dequantize_blockwise", q.blocksize)?;
    check_len(
        "absmax",
        block_count(q.codes.len(), q.blocksize),
        q.absmax.len(),
    )?;
    Ok(dequantize_blocks(
        &q.codes,
        &q.absmax,
        &q.code[..],
        q.blocksize,
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
    fn blockwise_8bit_round_trip() {
        let x = ramp(1000);
        let q = quantize_blockwise(&x, dynamic_map(), 256).unwrap();
        assert_eq!(q.absmax.len(), 4);
        let y = dequantize_blockwise(&q).unwrap();
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() <= 0.01 * 50.0 / 7.0 + 1e-6, "{a} vs {b}");
        }
        // An all-zero block gets index 0 (code[0] * 0 = -0.0, as in bitsandbytes).
        let q = quantize_blockwise(&[0.0; 4], dynamic_map(), 4).unwrap();
        assert_eq!(q.codes, vec![0; 4]);
        assert_eq!(q.absmax, vec![0.0]);
    }

    #[test]
    fn lut_matches_nearest_entry_away_from_midpoints() {
        let code = dynamic_map();
        let q = quantize_blockwise(&[1.0, 0.5, -0.25, 0.0, -1.0], code, 8).unwrap();
        assert_eq!(code[q.codes[0] as usize], 1.0);
        assert_eq!(q.codes[4], 0);
        // The table has no entry at exactly 0 (index 32768 is 1.5e-5), so bitsandbytes' CPU
        // kernel quantizes 0.0 to the smallest positive code (index 131, 2.125e-5), not to 0.0.
        assert_eq!(q.codes[3], 131);
        assert!((code[131] - 2.125e-5).abs() < 1e-10);
        // A custom (linear) code builds its own table.
        let linear: [f32; 256] = std::array::from_fn(|i| -1.0 + 2.0 * i as f32 / 255.0);
        let q = quantize_blockwise(&[1.0, -1.0, 0.0], &linear, 3).unwrap();
        assert_eq!(q.codes[0], 255);
        assert_eq!(q.codes[1], 0);
        assert!(q.codes[2] == 127 || q.codes[2] == 128);
    }

    #[test]
    fn validation() {
        assert!(matches!(
            quantize_blockwise(&[1.0], dynamic_map(), 0),
            Err(QuantError::InvalidBlocksize { blocksize: 0, .. })
        ));
        // Any positive blocksize works on the CPU.
        assert!(quantize_blockwise(&[1.0; 10], dynamic_map(), 3).is_ok());
        let mut q8 = quantize_blockwise(&ramp(600), dynamic_map(), 256).unwrap();
        q8.absmax.pop();
        assert!(matches!(
            dequantize_blockwise(&q8),
            Err(QuantError::LengthMismatch {
                tensor: "absmax",
                ..
            })
        ));
        assert!(quantize_blockwise(&[], dynamic_map(), 256)
            .unwrap()
            .codes
            .is_empty());
    }
}
