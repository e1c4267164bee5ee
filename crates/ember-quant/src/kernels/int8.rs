//! LLM.int8's product (`int8_linear` without a bias), fast: the activations are quantized
//! exactly as the reference does, the int8 x int8 dot products run in SIMD with exact int32
//! (wrapping) sums, and the float32 epilogue is the reference's, operation for operation, so
//! the results are bit-identical.
//!
//! - AVX-512 VNNI: `vpdpbusd` multiplies unsigned by signed bytes, so `x` goes in as
//!   `x + 128` (0..=255) and `128 * Σ w` comes off again. `Σ w` of each weight row is one more
//!   `vpdpbusd` against ones in the same pass (nothing is cached in the weight). Sums wrap
//!   modulo 2^32 exactly as the reference's `wrapping_add`.
//! - AVX2: both sides sign-extended to 16 bits and multiplied with `vpmaddwd` (pairs of
//!   products, at most 2 * 127 * 128 in magnitude: no saturation, unlike `vpmaddubsw`).

use rayon::prelude::*;

use super::tile::TileSource;
use super::{has_vnni, rows_per_task, Isa};
use crate::int8::{int8_vectorwise_quant, round_f16, Int8Weight, INV_127};
use crate::linear::MM_DEQUANT_SCALE;

/// An int8 weight as a [`TileSource`]: `code * (scb * (1/127))`, as `dequantize` computes it.
pub(crate) struct Tiles8<'a>(pub(crate) &'a Int8Weight);

impl TileSource for Tiles8<'_> {
    fn n_out(&self) -> usize {
        self.0.out_features
    }
    fn n_in(&self) -> usize {
        self.0.in_features
    }
    fn dequant(&self, start: usize, dst: &mut [f32]) {
        let w = self.0;
        let n_in = w.in_features;
        let mut i = start;
        let mut dst = dst;
        while !dst.is_empty() {
            let (o, c) = (i / n_in, i % n_in);
            let len = dst.len().min(n_in - c);
            let scale = w.scb[o] * INV_127;
            let (head, rest) = dst.split_at_mut(len);
            for (d, &q) in head.iter_mut().zip(&w.codes[i..i + len]) {
                *d = f32::from(q) * scale;
            }
            dst = rest;
            i += len;
        }
    }
}

/// `out += int8_linear(x, rows, w, None, threshold)`, bit for bit, with the kernels of `isa`.
///
/// # Panics
///
/// As the reference: if the lengths do not fit, or `in_features` is 0 with rows to quantize.
pub(crate) fn forward(
    isa: Isa,
    w: &Int8Weight,
    x: &[f32],
    rows: usize,
    threshold: f32,
    out: &mut [f32],
) {
    w.validate()
        .expect("the int8 weight's lengths must fit its shape");
    let (n_in, n_out) = (w.in_features, w.out_features);
    assert_eq!(x.len(), rows * n_in);
    assert_eq!(out.len(), rows * n_out);
    if rows == 0 || n_out == 0 {
        return;
    }
    // Steps 1 of the reference: float16 rounding, then row-wise quantization with outliers.
    let x_half: Vec<f32> = x.iter().map(|&v| round_f16(v)).collect();
    let threshold = if threshold > 0.0 {
        round_f16(threshold)
    } else {
        threshold
    };
    let qa =
        int8_vectorwise_quant(rows, n_in, &x_half, threshold).expect("lengths were checked above");

    // Step 2: exact integer dot products, `[o][row]`.
    let mut acc = vec![0i32; n_out * rows];
    let xs = Prepared::new(isa, &qa.codes, rows, n_in);
    let per_task = rows_per_task(n_out, n_out * n_in * rows / 4, 16);
    let run = |(task, acc): (usize, &mut [i32])| xs.dots(w, task * per_task, acc);
    if per_task >= n_out {
        run((0, &mut acc));
    } else {
        acc.par_chunks_mut(per_task * rows)
            .enumerate()
            .for_each(run);
    }

    // The float32 epilogue of the reference, in its order.
    for r in 0..rows {
        let xr = &x[r * n_in..(r + 1) * n_in];
        for o in 0..n_out {
            let mut y = acc[o * rows + r] as f32 * (qa.scb[r] * w.scb[o]) * MM_DEQUANT_SCALE;
            if !qa.outlier_cols.is_empty() {
                let cb = &w.codes[o * n_in..(o + 1) * n_in];
                let dot: f64 = qa
                    .outlier_cols
                    .iter()
                    .map(|&c| f64::from(xr[c]) * f64::from(f32::from(cb[c]) * w.scb[o] * INV_127))
                    .sum();
                y += dot as f32;
            }
            out[r * n_out + o] += y;
        }
    }
}

/// The quantized activations in the layout of one kernel.
enum Prepared<'a> {
    /// The codes as they are.
    Scalar { codes: &'a [i8], n_in: usize },
    /// Sign-extended to 16 bits, rows padded with zeros to a multiple of 16.
    Avx2 {
        x: Vec<i16>,
        stride: usize,
        n_in: usize,
    },
    /// `code + 128` as unsigned bytes, rows padded to a multiple of 64 (the padding meets
    /// masked-off weights, so its value does not matter).
    Vnni {
        x: Vec<u8>,
        stride: usize,
        n_in: usize,
    },
}

impl<'a> Prepared<'a> {
    fn new(isa: Isa, codes: &'a [i8], rows: usize, n_in: usize) -> Self {
        match isa {
            Isa::Avx512 if has_vnni() => {
                let stride = n_in.div_ceil(64) * 64;
                let mut x = vec![128u8; rows * stride];
                for (d, s) in x
                    .chunks_exact_mut(stride)
                    .zip(codes.chunks_exact(n_in.max(1)))
                {
                    for (d, &c) in d.iter_mut().zip(s) {
                        *d = (i16::from(c) + 128) as u8;
                    }
                }
                Prepared::Vnni { x, stride, n_in }
            }
            Isa::Avx2 | Isa::Avx512 => {
                let stride = n_in.div_ceil(16) * 16;
                let mut x = vec![0i16; rows * stride];
                for (d, s) in x
                    .chunks_exact_mut(stride)
                    .zip(codes.chunks_exact(n_in.max(1)))
                {
                    for (d, &c) in d.iter_mut().zip(s) {
                        *d = i16::from(c);
                    }
                }
                Prepared::Avx2 { x, stride, n_in }
            }
            Isa::Scalar => Prepared::Scalar { codes, n_in },
        }
    }

    /// The dot products of weight rows `o0..` (as many as `acc` has room for) with every row
    /// of `x`, into `acc` as `[o][row]`.
    fn dots(&self, w: &Int8Weight, o0: usize, acc: &mut [i32]) {
        match self {
            &Prepared::Scalar { codes, n_in } => {
                let rows = codes.len() / n_in.max(1);
                for (oi, a) in acc.chunks_exact_mut(rows).enumerate() {
                    let cb = &w.codes[(o0 + oi) * n_in..(o0 + oi + 1) * n_in];
                    for (r, a) in a.iter_mut().enumerate() {
                        let ca = &codes[r * n_in..(r + 1) * n_in];
                        *a = ca.iter().zip(cb).fold(0i32, |s, (x, y)| {
                            s.wrapping_add(i32::from(*x) * i32::from(*y))
                        });
                    }
                }
            }
            #[cfg(target_arch = "x86_64")]
            Prepared::Avx2 { x, stride, n_in } => {
                let rows = x.len() / stride;
                assert!((o0 + acc.len() / rows.max(1)) * n_in <= w.codes.len());
                // SAFETY: `Prepared::Avx2` is only built for an ISA with AVX2; the weight rows
                // are in bounds (checked above) and `x` holds `rows` rows of `stride`.
                unsafe { avx2::dots(&w.codes, *n_in, x, *stride, o0, acc) }
            }
            #[cfg(target_arch = "x86_64")]
            Prepared::Vnni { x, stride, n_in } => {
                let rows = x.len() / stride;
                assert!((o0 + acc.len() / rows.max(1)) * n_in <= w.codes.len());
                // SAFETY: `Prepared::Vnni` is only built when the CPU has AVX-512 and VNNI;
                // bounds as above.
                unsafe { vnni::dots(&w.codes, *n_in, x, *stride, o0, acc) }
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("SIMD layouts are only prepared on x86-64"),
        }
    }
}

/// AVX-512 VNNI dot products.
#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    /// See `Prepared::dots`; rows in groups of up to four per weight row.
    ///
    /// # Safety
    ///
    /// The CPU must have AVX-512 F / BW and VNNI; weight rows `o0..o0 + acc.len() / rows` are
    /// in `codes`, and `x` is `rows` rows of `stride >= n_in` (a multiple of 64).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
    pub(super) unsafe fn dots(
        codes: &[i8],
        n_in: usize,
        x: &[u8],
        stride: usize,
        o0: usize,
        acc: &mut [i32],
    ) {
        let rows = x.len() / stride;
        for (oi, a) in acc.chunks_exact_mut(rows).enumerate() {
            let wrow = codes[(o0 + oi) * n_in..(o0 + oi + 1) * n_in].as_ptr();
            let mut r = 0;
            while r < rows {
                let g = (rows - r).min(4);
                let xr = &x[r * stride..(r + g) * stride];
                // SAFETY: as this function's contract.
                unsafe {
                    match g {
                        4 => row::<4>(wrow, n_in, xr, stride, &mut a[r..r + 4]),
                        3 => row::<3>(wrow, n_in, xr, stride, &mut a[r..r + 3]),
                        2 => row::<2>(wrow, n_in, xr, stride, &mut a[r..r + 2]),
                        _ => row::<1>(wrow, n_in, xr, stride, &mut a[r..r + 1]),
                    }
                }
                r += g;
            }
        }
    }

    /// One weight row (`n_in` bytes at `w`) against `R` rows of `x`.
    ///
    /// # Safety
    ///
    /// As [`dots`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
    #[inline]
    unsafe fn row<const R: usize>(
        w: *const i8,
        n_in: usize,
        x: &[u8],
        stride: usize,
        out: &mut [i32],
    ) {
        let ones = _mm512_set1_epi8(1);
        let mut sum_w = _mm512_setzero_si512();
        let mut acc = [_mm512_setzero_si512(); R];
        let full = n_in / 64;
        let step = |k: usize, wv: __m512i, sum_w: &mut __m512i, acc: &mut [__m512i; R]| {
            *sum_w = _mm512_dpbusd_epi32(*sum_w, ones, wv);
            for (i, a) in acc.iter_mut().enumerate() {
                // SAFETY: row `i` of `x` has `stride >= 64 (k + 1)` bytes.
                let xv = unsafe { _mm512_loadu_si512(x.as_ptr().add(i * stride + 64 * k).cast()) };
                *a = _mm512_dpbusd_epi32(*a, xv, wv);
            }
        };
        for k in 0..full {
            // SAFETY: bytes `64k..64k + 64` of the weight row are in bounds (`k < n_in / 64`).
            let wv = unsafe { _mm512_loadu_si512(w.add(64 * k).cast()) };
            step(k, wv, &mut sum_w, &mut acc);
        }
        let rem = n_in - 64 * full;
        if rem > 0 {
            // The tail: a masked load reads only the `rem` bytes of the row (zeros elsewhere).
            let mask = (1u64 << rem) - 1;
            // SAFETY: the masked-off bytes are not accessed.
            let wv = unsafe { _mm512_maskz_loadu_epi8(mask, w.add(64 * full)) };
            step(full, wv, &mut sum_w, &mut acc);
        }
        let bias = _mm512_reduce_add_epi32(sum_w).wrapping_mul(128);
        for i in 0..R {
            out[i] = _mm512_reduce_add_epi32(acc[i]).wrapping_sub(bias);
        }
    }
}

/// AVX2 dot products through 16-bit multiplies.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// See `Prepared::dots`.
    ///
    /// # Safety
    ///
    /// The CPU must have AVX2; weight rows `o0..o0 + acc.len() / rows` are in `codes`, and `x`
    /// is `rows` rows of `stride >= n_in` (a multiple of 16).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dots(
        codes: &[i8],
        n_in: usize,
        x: &[i16],
        stride: usize,
        o0: usize,
        acc: &mut [i32],
    ) {
        let rows = x.len() / stride;
        for (oi, a) in acc.chunks_exact_mut(rows).enumerate() {
            let wrow = &codes[(o0 + oi) * n_in..(o0 + oi + 1) * n_in];
            let mut r = 0;
            while r < rows {
                let g = (rows - r).min(4);
                let xr = &x[r * stride..(r + g) * stride];
                // SAFETY: as this function's contract.
                unsafe {
                    match g {
                        4 => row::<4>(wrow, xr, stride, &mut a[r..r + 4]),
                        3 => row::<3>(wrow, xr, stride, &mut a[r..r + 3]),
                        2 => row::<2>(wrow, xr, stride, &mut a[r..r + 2]),
                        _ => row::<1>(wrow, xr, stride, &mut a[r..r + 1]),
                    }
                }
                r += g;
            }
        }
    }

    /// One weight row against `R` rows of `x`.
    ///
    /// # Safety
    ///
    /// As [`dots`].
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn row<const R: usize>(w: &[i8], x: &[i16], stride: usize, out: &mut [i32]) {
        let n_in = w.len();
        let full = n_in / 16;
        let mut acc = [_mm256_setzero_si256(); R];
        for k in 0..full {
            // SAFETY: weight bytes `16k..16k + 16` and `x` elements `i * stride + 16k..+16` are
            // in bounds (`16 (k + 1) <= n_in <= stride`).
            unsafe {
                let wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(w.as_ptr().add(16 * k).cast()));
                for (i, a) in acc.iter_mut().enumerate() {
                    let xv = _mm256_loadu_si256(x.as_ptr().add(i * stride + 16 * k).cast());
                    *a = _mm256_add_epi32(*a, _mm256_madd_epi16(xv, wv));
                }
            }
        }
        for i in 0..R {
            let q = _mm_add_epi32(
                _mm256_castsi256_si128(acc[i]),
                _mm256_extracti128_si256::<1>(acc[i]),
            );
            let q = _mm_add_epi32(q, _mm_shuffle_epi32::<0b01_00_11_10>(q));
            let q = _mm_add_epi32(q, _mm_shuffle_epi32::<0b10_11_00_01>(q));
            let mut s = _mm_cvtsi128_si32(q);
            for c in 16 * full..n_in {
                s = s.wrapping_add(i32::from(x[i * stride + c]) * i32::from(w[c]));
            }
            out[i] = s;
        }
    }
}
