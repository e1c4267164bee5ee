//! Every kernel path the CPU has (scalar, AVX2, AVX-512) against the slow reference products,
//! on awkward shapes: rows that are not whole blocks, blocks straddling rows, odd sizes, one
//! output, 1..70 rows, NF4 and FP4, plain and nested absmax, float32 and bfloat16.

use super::*;
use crate::blockwise::{dequantize_4bit, quantize_4bit, QuantType};
use crate::int8::Int8Weight;
use crate::linear::int8_linear;

/// Deterministic values in about [-2, 2] with a few larger ones.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = ((s >> 40) as f32) / (1u64 << 24) as f32 * 2.0 - 1.0;
            if (s >> 20).is_multiple_of(97) {
                u * 8.0
            } else {
                u * 2.0
            }
        })
        .collect()
}

fn layer4(
    n_out: usize,
    n_in: usize,
    bs: usize,
    qt: QuantType,
    nested: bool,
    dtype: ComputeDtype,
) -> QuantizedLinear {
    let w = values(n_out * n_in, (n_out * 31 + n_in * 7 + bs) as u64);
    let p = quantize_4bit(&w, &[n_out, n_in], bs, qt, nested).unwrap();
    QuantizedLinear::new(QuantizedWeight::FourBit(p), dtype, 0.0).unwrap()
}

/// The original slow `forward`: dequantize, round, f32 dot products.
fn reference_forward(l: &QuantizedLinear, x: &[f32], rows: usize, out: &mut [f32]) {
    let (n_out, n_in) = (l.out_features(), l.in_features());
    if let QuantizedWeight::EightBit(w) = &l.weight {
        let y = int8_linear(x, rows, w, None, l.threshold).unwrap();
        out.iter_mut().zip(y).for_each(|(o, v)| *o += v);
        return;
    }
    let QuantizedWeight::FourBit(p) = &l.weight else {
        unreachable!()
    };
    let bf16 = l.compute_dtype == ComputeDtype::Bf16;
    let round = |v: f32| if bf16 { round_bf16(v) } else { v };
    let w: Vec<f32> = dequantize_4bit(p).unwrap().into_iter().map(round).collect();
    for r in 0..rows {
        for o in 0..n_out {
            let dot: f64 = (0..n_in)
                .map(|i| f64::from(round(x[r * n_in + i])) * f64::from(w[o * n_in + i]))
                .sum();
            out[r * n_out + o] += round(dot as f32);
        }
    }
}

/// The original slow `backward_input`.
fn reference_backward(
    w: &[f32],
    n_out: usize,
    n_in: usize,
    g: &[f32],
    rows: usize,
    gin: &mut [f32],
) {
    for r in 0..rows {
        for i in 0..n_in {
            let s: f64 = (0..n_out)
                .map(|o| f64::from(g[r * n_out + o]) * f64::from(w[o * n_in + i]))
                .sum();
            gin[r * n_in + i] += s as f32;
        }
    }
}

/// `got` within `tol` of the largest `|want|` (the output scale), plus one bfloat16 step of
/// each value when the outputs are rounded to bfloat16 (an accumulation order may flip it).
fn assert_close(got: &[f32], want: &[f32], bf16: bool, what: &str) {
    let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        let bf_step = if bf16 { b.abs() * 2f32.powi(-7) } else { 0.0 };
        assert!(
            (a - b).abs() <= 1e-5 * scale + bf_step,
            "{what}: element {i}: {a} vs {b} (scale {scale})"
        );
    }
}

#[test]
fn four_bit_forward_matches_the_reference_on_every_path() {
    let shapes = [
        // (n_out, n_in, blocksize): aligned and straddling blocks, odd sizes, one output.
        (7, 64, 64),
        (5, 128, 32),
        (3, 4096, 4096),
        (33, 192, 64),
        (1, 256, 128),
        (9, 100, 64),
        (4, 33, 32),
        (3, 1000, 256),
        (2, 2048, 1024),
        (17, 77, 32),
        (40, 576, 64),
        (6, 96, 32),
    ];
    let mut cases = 0;
    for &(n_out, n_in, bs) in &shapes {
        for (qt, nested, dtype) in [
            (QuantType::Nf4, true, ComputeDtype::F32),
            (QuantType::Fp4, false, ComputeDtype::F32),
            (QuantType::Nf4, false, ComputeDtype::Bf16),
            (QuantType::Fp4, true, ComputeDtype::Bf16),
        ] {
            let l = layer4(n_out, n_in, bs, qt, nested, dtype);
            for rows in [1, 2, 3, 5, 8, 9, 16, 17, 70] {
                let x = values(rows * n_in, rows as u64 + 3);
                let init = values(rows * n_out, 99);
                let mut want = init.clone();
                reference_forward(&l, &x, rows, &mut want);
                for isa in Isa::available() {
                    let mut got = init.clone();
                    forward(isa, &l, &x, rows, &mut got);
                    let what = format!(
                        "{isa:?} {n_out}x{n_in} bs {bs} {qt:?} {nested} {dtype:?} rows {rows}"
                    );
                    assert_close(&got, &want, dtype == ComputeDtype::Bf16, &what);
                    cases += 1;
                }
            }
        }
    }
    assert!(cases > 0);
}

#[test]
fn gemv_paths_agree_with_each_other() {
    // The SIMD GEMVs sum in another order than the scalar one: equal up to rounding.
    let l = layer4(300, 1536, 64, QuantType::Nf4, true, ComputeDtype::F32);
    let x = values(3 * 1536, 5);
    let mut first: Option<Vec<f32>> = None;
    for isa in Isa::available() {
        let mut y = vec![0.0; 3 * 300];
        forward(isa, &l, &x, 3, &mut y);
        match &first {
            None => first = Some(y),
            Some(f) => assert_close(&y, f, false, &format!("{isa:?}")),
        }
    }
}

#[test]
fn dequantize_is_bit_identical() {
    for &(n_out, n_in, bs) in &[
        (7, 64, 64),
        (9, 100, 64),
        (3, 1001, 32),
        (64, 576, 64),
        (2, 4096, 4096),
    ] {
        for nested in [false, true] {
            let l = layer4(n_out, n_in, bs, QuantType::Fp4, nested, ComputeDtype::F32);
            let QuantizedWeight::FourBit(p) = &l.weight else {
                unreachable!()
            };
            let want = dequantize_4bit(p).unwrap();
            for isa in Isa::available() {
                let got = dequantize_4bit_with(isa, p);
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{isa:?} {n_out}x{n_in} bs {bs} nested {nested}"
                );
                // Odd starts and lengths of the tile decoder.
                let w = Weight4::new(p);
                for (start, len) in [(1, 63), (3, 200), (n_out * n_in - 5, 5), (0, 1)] {
                    if start + len <= want.len() {
                        let mut d = vec![0.0; len];
                        tile::dequant_range(isa, &w, start, &mut d, false);
                        assert_eq!(d, want[start..start + len], "{isa:?} range {start}+{len}");
                    }
                }
            }
        }
    }
}

fn dequantize_4bit_with(isa: Isa, p: &Packed4bit) -> Vec<f32> {
    dequantize_4bit_isa(isa, p)
}

fn dequantize_4bit_isa(isa: Isa, p: &Packed4bit) -> Vec<f32> {
    super::dequantize_4bit(isa, p)
}

#[test]
fn backward_input_matches_the_reference() {
    for &(n_out, n_in, bs) in &[
        (7, 64, 64),
        (9, 100, 64),
        (40, 576, 64),
        (1, 33, 32),
        (130, 70, 32),
    ] {
        for nested in [false, true] {
            let l = layer4(n_out, n_in, bs, QuantType::Nf4, nested, ComputeDtype::Bf16);
            let w = l.dequantize();
            for rows in [1, 4, 37] {
                let g = values(rows * n_out, 11);
                let init = values(rows * n_in, 12);
                let mut want = init.clone();
                reference_backward(&w, n_out, n_in, &g, rows, &mut want);
                for isa in Isa::available() {
                    let mut got = init.clone();
                    backward_input(isa, &l, &g, rows, &mut got);
                    assert_close(
                        &got,
                        &want,
                        false,
                        &format!("{isa:?} {n_out}x{n_in} rows {rows}"),
                    );
                }
            }
        }
    }
    // int8: against the dequantized weight.
    let (n_out, n_in) = (21, 150);
    let q = Int8Weight::quantize(n_out, n_in, &values(n_out * n_in, 4)).unwrap();
    let l = QuantizedLinear::new(QuantizedWeight::EightBit(q), ComputeDtype::F32, 6.0).unwrap();
    let w = l.dequantize();
    let g = values(5 * n_out, 8);
    let mut want = vec![0.5; 5 * n_in];
    reference_backward(&w, n_out, n_in, &g, 5, &mut want);
    for isa in Isa::available() {
        let mut got = vec![0.5; 5 * n_in];
        backward_input(isa, &l, &g, 5, &mut got);
        assert_close(&got, &want, false, &format!("int8 {isa:?}"));
    }
}

#[test]
fn int8_forward_is_bit_exact() {
    for &(n_out, n_in) in &[(1, 1), (5, 64), (7, 100), (33, 577), (64, 1536), (3, 130)] {
        let q = Int8Weight::quantize(n_out, n_in, &values(n_out * n_in, n_in as u64)).unwrap();
        // Codes of -128 cannot come from quantization, but a loaded weight may hold them.
        let mut q2 = q.clone();
        q2.codes[0] = -128;
        for weight in [q, q2] {
            for threshold in [0.0, 6.0, 1.5] {
                let l = QuantizedLinear::new(
                    QuantizedWeight::EightBit(weight.clone()),
                    ComputeDtype::F32,
                    threshold,
                )
                .unwrap();
                for rows in [1, 2, 5, 9] {
                    let x = values(rows * n_in, rows as u64 * 7);
                    let init = values(rows * n_out, 1);
                    let mut want = init.clone();
                    reference_forward(&l, &x, rows, &mut want);
                    for isa in Isa::available() {
                        let mut got = init.clone();
                        forward(isa, &l, &x, rows, &mut got);
                        assert!(
                            got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{isa:?} {n_out}x{n_in} threshold {threshold} rows {rows}: {got:?} vs {want:?}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn vector_bf16_rounding_matches_half() {
    // The SIMD tables round with integer arithmetic: check ties, overflow, NaN and subnormals.
    let special = [
        1.0 + 2f32.powi(-8),
        1.0 + 3.0 * 2f32.powi(-8),
        f32::MAX,
        f32::MIN_POSITIVE / 3.0,
        -0.0,
        f32::INFINITY,
    ];
    for &v in &special {
        let p = quantize_4bit(&[v.min(1e30), 1.0], &[1, 2], 32, QuantType::Nf4, false).unwrap();
        let _ = p;
    }
    for isa in Isa::available() {
        for &a in &special {
            let mut p = quantize_4bit(&values(64, 1), &[1, 64], 64, QuantType::Fp4, false).unwrap();
            p.state.absmax = crate::Absmax::Plain(vec![a]);
            let l =
                QuantizedLinear::new(QuantizedWeight::FourBit(p), ComputeDtype::Bf16, 0.0).unwrap();
            let x = vec![1.0; 64];
            let (mut got, mut want) = (vec![0.0], vec![0.0]);
            forward(isa, &l, &x, 1, &mut got);
            reference_forward(&l, &x, 1, &mut want);
            assert!(
                got[0] == want[0]
                    || (got[0].is_nan() && want[0].is_nan())
                    || (got[0] - want[0]).abs() <= want[0].abs() * 2f32.powi(-7),
                "{isa:?} absmax {a}: {} vs {}",
                got[0],
                want[0]
            );
        }
    }
}

#[test]
fn scales_fill_equals_get_across_nested_groups() {
    // 600 blocks of 32: the nested groups (256 blocks) end inside the ranges below.
    let w = values(600 * 32, 11);
    for nested in [false, true] {
        let p = quantize_4bit(&w, &[600, 32], 32, QuantType::Nf4, nested).unwrap();
        let w4 = Weight4::new(&p);
        for (b0, len) in [(0, 600), (250, 10), (255, 258), (511, 1), (100, 0)] {
            let mut got = vec![f32::NAN; len];
            w4.scales.fill(b0, &mut got);
            let want: Vec<f32> = (b0..b0 + len).map(|b| w4.scales.get(b)).collect();
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "nested {nested}, blocks {b0}..{}",
                b0 + len
            );
        }
    }
}
