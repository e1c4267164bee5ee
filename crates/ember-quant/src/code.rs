//! The quantization codes (lookup tables) of bitsandbytes, bit for bit.
//!
//! A code maps a small integer (a 4-bit nibble or an 8-bit byte) to a value in `[-1, 1]` that is
//! then scaled by the absmax of its block. bitsandbytes builds some of these tables in float32
//! torch arithmetic, so reproducing them means reproducing that arithmetic, including where its
//! CPU build fuses a multiply and an add (see [`create_dynamic_map`]).

use std::sync::OnceLock;

use crate::error::{QuantError, Result};

/// The NF4 (4-bit NormalFloat) code, in nibble order, as `bitsandbytes.functional.get_4bit_type
/// ("nf4")` returns it (and as `QuantState.code` / `quant_map` stores it).
///
/// These are quantiles of N(0, 1) normalised to `[-1, 1]` (`create_normal_map(0.9677083)`,
/// hardcoded in bitsandbytes to avoid a scipy dependency). The code is sorted, so nibble `i` is
/// also the `i`-th smallest value; 7 is the exact zero.
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// The FP4 code (1 sign, 2 exponent, 1 mantissa bit), in nibble order, as
/// `get_4bit_type("fp4")` returns it: `[0, 0.0625, 8, 12, 4, 6, 2, 3]` and their negatives,
/// divided by 12 in float32.
///
/// Bit 3 is the sign. Nibble 8 ("minus zero") is `+0.0` here, as in `get_4bit_type`, the
/// stored `quant_map`, the AVX-512 kernel and the torch kernel; only bitsandbytes' scalar C
/// kernel (used when the last dimension is even but not a multiple of 16) has `-0.0` there, so
/// its dequantized zeros can differ in sign.
pub const FP4_CODE: [f32; 16] = [
    0.0,
    0.0625 / 12.0,
    8.0 / 12.0,
    1.0, // 12 / 12
    4.0 / 12.0,
    6.0 / 12.0,
    2.0 / 12.0,
    3.0 / 12.0,
    0.0,
    -0.0625 / 12.0,
    -8.0 / 12.0,
    -1.0, // -12 / 12
    -4.0 / 12.0,
    -6.0 / 12.0,
    -2.0 / 12.0,
    -3.0 / 12.0,
];

/// The FP4 nibbles in ascending order of their value: `torch.argsort(FP4_CODE)` as the torch
/// `quantize_4bit` kernel computes it (`_get_4bit_quantize_bounds`).
///
/// The two zeros tie; torch puts nibble 0 first, so a value that scales into `(-h, 0]` (with `h`
/// half the smallest FP4 step) becomes nibble 0 and one in `(0, h]` becomes nibble 8.
pub const FP4_ASCENDING: [u8; 16] = [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3];

/// `torch.linspace(start, end, steps, dtype=torch.float32)` on the CPU, bit for bit.
///
/// torch's kernel computes `start + step * i` for the first half and `end - step * (steps - i -
/// 1)` for the second, with `step` in float32; its x86 build contracts each into one fused
/// multiply-add, which `mul_add` reproduces.
fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    match steps {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (end - start) / (steps - 1) as f32;
            let halfway = steps / 2;
            (0..steps)
                .map(|i| {
                    if i < halfway {
                        step.mul_add(i as f32, start)
                    } else {
                        (-step).mul_add((steps - i - 1) as f32, end)
                    }
                })
                .collect()
        }
    }
}

/// `10 ** exponent` as Python computes it (an int for `exponent >= 0`, else a correctly rounded
/// float), then cast to float32 as torch does when it multiplies a float32 tensor by it.
fn python_pow10_as_f32(exponent: i32) -> f32 {
    // Parsing the decimal literal is correctly rounded, like Python's float pow for these values.
    let value: f64 = format!("1e{exponent}").parse().unwrap_or(f64::NAN);
    value as f32
}

/// `bitsandbytes.functional.create_dynamic_map(signed, max_exponent_bits, total_bits)`, bit for
/// bit: the "dynamic" 8-bit code of blockwise quantization and of the nested absmax of double
/// quantization (the default `(true, 7, 8)` is [`dynamic_map`]).
///
/// Each exponent `10^(i - max_exponent_bits + 1)` gets a linear fraction: the midpoints of a
/// float32 `linspace(0.1, 1, 2^k + 1)`. Add 0 and 1, pad with zeros to 256 and sort.
///
/// # Errors
///
/// [`QuantError::InvalidDynamicMap`] when the parameters do not make exactly `2^total_bits`
/// values (bitsandbytes fails the same assertion), when `total_bits` is not in `1..=8` or when
/// `max_exponent_bits` is 0 (bitsandbytes then raises a `NameError`).
pub fn create_dynamic_map(
    signed: bool,
    max_exponent_bits: u32,
    total_bits: u32,
) -> Result<[f32; 256]> {
    let invalid = |values: usize| QuantError::InvalidDynamicMap {
        signed,
        max_exponent_bits,
        total_bits,
        values,
        expected: 1usize.checked_shl(total_bits).unwrap_or(usize::MAX),
    };
    if !(1..=8).contains(&total_bits) || max_exponent_bits == 0 || max_exponent_bits > 32 {
        return Err(invalid(0));
    }
    let non_sign_bits = total_bits as i32 - 1;
    let max_exp = max_exponent_bits as i32;

    let mut data: Vec<f32> = Vec::with_capacity(256);
    // The fraction midpoints of one exponent, scaled by `10^power` (and negated for the sign).
    let mut push_means = |items: usize, power: i32| {
        let scale = python_pow10_as_f32(power);
        let boundaries = torch_linspace_f32(0.1, 1.0, items);
        let means: Vec<f32> = boundaries.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        data.extend(means.iter().map(|m| scale * m));
        if signed {
            data.extend(means.iter().map(|m| -scale * m));
        }
    };
    for i in 0..max_exp {
        // Python's `int(2 ** k + 1)`: a negative `k` gives a float in (1, 1.5], truncated to 1.
        let k = i + non_sign_bits - max_exp + if signed { 0 } else { 1 };
        let fraction_items = if k >= 0 { (1usize << k) + 1 } else { 1 };
        push_means(fraction_items, -(max_exp - 1) + i);
    }
    // The values with all exponent bits zero and no indicator bit; `i` is the last exponent.
    let additional_exp = non_sign_bits - max_exp;
    if additional_exp >= 1 {
        let additional_items = (1usize << additional_exp) - 1;
        push_means(additional_items + 1, -(max_exp - 1) + (max_exp - 1));
    }
    data.push(0.0);
    data.push(1.0);

    if data.len() != 1usize << total_bits {
        return Err(invalid(data.len()));
    }
    data.resize(256, 0.0);
    data.sort_by(f32::total_cmp);
    let mut out = [0.0f32; 256];
    out.copy_from_slice(&data);
    Ok(out)
}

/// The default dynamic map, `create_dynamic_map(signed=True)`, built once.
///
/// This is the code of `quantize_blockwise` when none is given and of the nested absmax in
/// double quantization. It is sorted; `code[0]` is about -0.993 (not -1) and `code[255]` is 1.
pub fn dynamic_map() -> &'static [f32; 256] {
    static MAP: OnceLock<[f32; 256]> = OnceLock::new();
    MAP.get_or_init(|| match create_dynamic_map(true, 7, 8) {
        Ok(map) => map,
        // (true, 7, 8) makes exactly 256 values; the unit tests check it.
        Err(e) => unreachable!("the default dynamic map is valid: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nf4_is_sorted_with_exact_zero_and_ends() {
        assert!(NF4_CODE.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(NF4_CODE[0], -1.0);
        assert_eq!(NF4_CODE[7].to_bits(), 0);
        assert_eq!(NF4_CODE[15], 1.0);
    }

    #[test]
    fn fp4_ascending_sorts_the_fp4_code() {
        let sorted: Vec<f32> = FP4_ASCENDING
            .iter()
            .map(|&i| FP4_CODE[i as usize])
            .collect();
        assert!(sorted.windows(2).all(|w| w[0] <= w[1]), "{sorted:?}");
        let mut seen = [false; 16];
        FP4_ASCENDING.iter().for_each(|&i| seen[i as usize] = true);
        assert!(seen.iter().all(|&s| s));
        // Sign-magnitude: nibble i + 8 is minus nibble i.
        for i in 0..8 {
            assert_eq!(FP4_CODE[i + 8], -FP4_CODE[i]);
        }
    }

    #[test]
    fn default_dynamic_map_shape() {
        let map = dynamic_map();
        assert!(map.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(map[255], 1.0);
        assert!((map[0] + 0.992_968_75).abs() < 1e-6, "{}", map[0]);
        assert_eq!(map.iter().filter(|v| **v == 0.0).count(), 1);
        // Symmetric apart from the extra 1.0 and the zero.
        for i in 0..127 {
            assert_eq!(map[i], -map[254 - i]);
        }
    }

    #[test]
    fn linspace_halves_meet_the_ends_exactly() {
        let v = torch_linspace_f32(0.1, 1.0, 17);
        assert_eq!(v[0], 0.1);
        assert_eq!(v[16], 1.0);
        assert_eq!(torch_linspace_f32(0.1, 1.0, 1), vec![0.1]);
    }

    #[test]
    fn invalid_dynamic_maps_are_errors() {
        // bitsandbytes accepts unsigned maps only with max_exponent_bits == total_bits - 1.
        assert!(create_dynamic_map(false, 7, 8).is_ok());
        let err = create_dynamic_map(false, 6, 8).unwrap_err();
        assert!(
            matches!(err, QuantError::InvalidDynamicMap { values, expected: 256, .. } if values != 256)
        );
        assert!(create_dynamic_map(true, 0, 8).is_err());
        assert!(create_dynamic_map(true, 7, 9).is_err());
        assert!(create_dynamic_map(true, 3, 4).is_ok());
    }
}
