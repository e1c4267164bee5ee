//! The 4-bit GEMV (`out += x · Wᵀ` for one to a few rows of `x`): the decoding bottleneck.
//!
//! Each block's 16 possible weights are computed once (`code * absmax`, exactly the values
//! `dequantize_4bit` produces, rounded to bfloat16 when computing in bfloat16), so a weight costs
//! one table lookup (`vpermps`: the nibble is the lane index) and one FMA per row of `x`. Only
//! the packed bytes stream from memory.
//!
//! The two nibbles of a byte are elements `2i` and `2i + 1`. Rather than interleave the looked
//! up values (two more shuffles per vector), `x` is rearranged once per call: each chunk of
//! `2 * LANES` elements holds its even elements, then its odd ones ([`arrange_x`]). The even
//! (high) nibbles of `LANES` bytes then meet the first half, the odd (low) ones the second.
//!
//! This path needs rows that are whole blocks (`in_features % blocksize == 0`); other shapes
//! take the tiled path ([`super::tile`]).

use rayon::prelude::*;

use super::scales::Weight4;
use super::{round_bf16, rows_per_task, Isa};

/// `out[rows, n_out] += x[rows, n_in] · Wᵀ` with the GEMV kernels of `isa`; `bf16` rounds `x`
/// and the weights to bfloat16 and each dot product before it is added.
///
/// # Panics
///
/// If the rows of `w` are not whole blocks (callers take the tiled path then).
pub(crate) fn forward(isa: Isa, w: &Weight4, x: &[f32], rows: usize, bf16: bool, out: &mut [f32]) {
    assert!(
        w.rows_align_with_blocks(),
        "the GEMV needs rows of whole blocks"
    );
    let (n_out, n_in) = (w.n_out, w.n_in);
    assert_eq!(x.len(), rows * n_in);
    assert_eq!(out.len(), rows * n_out);
    let xs = arrange_x(isa, x, n_in, bf16);
    // Dot products land here as `[o][row]`, so that parallel tasks own contiguous slices.
    let mut y = vec![0.0f32; n_out * rows];
    let per_task = rows_per_task(n_out, n_out * n_in * rows, 16);
    let run = |(task, y): (usize, &mut [f32])| {
        dots(isa, w, &xs, rows, task * per_task, bf16, y);
    };
    if per_task >= n_out {
        run((0, &mut y));
    } else {
        y.par_chunks_mut(per_task * rows).enumerate().for_each(run);
    }
    for (o, yo) in y.chunks_exact(rows).enumerate() {
        for (r, v) in yo.iter().enumerate() {
            out[r * n_out + o] += v;
        }
    }
}

/// Elements per chunk of the rearranged `x`: two vectors (even, then odd elements).
fn chunk(isa: Isa) -> usize {
    match isa {
        Isa::Scalar => 0,
        Isa::Avx2 => 16,
        Isa::Avx512 => 32,
    }
}

/// `x` rounded to bfloat16 if asked, and for the SIMD kernels rearranged so that each chunk
/// holds its even elements, then its odd ones (see the module docs). `n_in` is a multiple of
/// the chunk (it is one of the blocksize, at least 32).
pub(crate) fn arrange_x(isa: Isa, x: &[f32], n_in: usize, bf16: bool) -> Vec<f32> {
    let round = |v: f32| if bf16 { round_bf16(v) } else { v };
    let c = chunk(isa);
    if c == 0 {
        return x.iter().map(|&v| round(v)).collect();
    }
    debug_assert_eq!(n_in % c, 0);
    let mut out = Vec::with_capacity(x.len());
    for ch in x.chunks_exact(c) {
        out.extend(ch.iter().step_by(2).map(|&v| round(v)));
        out.extend(ch.iter().skip(1).step_by(2).map(|&v| round(v)));
    }
    out
}

/// The dot products of output rows `o0..o0 + y.len() / rows` with every row of `xs`, into `y`
/// as `[o][row]`, each rounded to bfloat16 when `bf16`.
pub(crate) fn dots(
    isa: Isa,
    w: &Weight4,
    xs: &[f32],
    rows: usize,
    o0: usize,
    bf16: bool,
    y: &mut [f32],
) {
    let n = y.len() / rows.max(1);
    // The kernels index the packed bytes and `xs` through raw pointers: check the bounds once.
    assert!(w.rows_align_with_blocks() && w.n_in.is_multiple_of(32));
    assert!((o0 + n) * w.n_in / 2 <= w.packed.len());
    assert_eq!(xs.len(), rows * w.n_in);
    match isa {
        Isa::Scalar => scalar::dots(w, xs, rows, o0, bf16, y),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only chosen when the CPU has AVX2 and FMA (`Isa::available`);
        // the bounds the kernel relies on were checked above.
        Isa::Avx2 => unsafe { avx2::dots(w, xs, rows, o0, bf16, y) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, with AVX-512 F / BW / VL.
        Isa::Avx512 => unsafe { avx512::dots(w, xs, rows, o0, bf16, y) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => scalar::dots(w, xs, rows, o0, bf16, y),
    }
}

/// Portable reference of the kernels, also the path of CPUs without AVX2.
mod scalar {
    use super::{round_bf16, Weight4};

    pub(super) fn dots(w: &Weight4, xs: &[f32], rows: usize, o0: usize, bf16: bool, y: &mut [f32]) {
        let (n_in, bs) = (w.n_in, w.blocksize);
        let blocks = n_in / bs;
        for (oi, yo) in y.chunks_exact_mut(rows).enumerate() {
            let o = o0 + oi;
            let bytes = &w.packed[o * n_in / 2..(o + 1) * n_in / 2];
            for (r, yv) in yo.iter_mut().enumerate() {
                let x = &xs[r * n_in..(r + 1) * n_in];
                // Four partial sums, so that the adds do not wait on each other.
                let mut acc = [0.0f32; 4];
                for kb in 0..blocks {
                    let lut = w.scaled_code(o * blocks + kb, bf16);
                    let xb = &x[kb * bs..(kb + 1) * bs];
                    let bb = &bytes[kb * bs / 2..(kb + 1) * bs / 2];
                    for (xp, b) in xb.chunks_exact(4).zip(bb.chunks_exact(2)) {
                        acc[0] += xp[0] * lut[(b[0] >> 4) as usize];
                        acc[1] += xp[1] * lut[(b[0] & 15) as usize];
                        acc[2] += xp[2] * lut[(b[1] >> 4) as usize];
                        acc[3] += xp[3] * lut[(b[1] & 15) as usize];
                    }
                }
                let dot = (acc[0] + acc[1]) + (acc[2] + acc[3]);
                *yv = if bf16 { round_bf16(dot) } else { dot };
            }
        }
    }
}

/// AVX-512: 32 weights (16 bytes) per step, the code in one register.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{round_bf16, Weight4};

    /// See [`super::dots`]; rows go through in groups of up to four, so that each decoded
    /// weight vector feeds four FMAs from registers.
    ///
    /// # Safety
    ///
    /// The CPU must have AVX-512 F / BW / VL; `super::dots` checked the bounds.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub(super) unsafe fn dots(
        w: &Weight4,
        xs: &[f32],
        rows: usize,
        o0: usize,
        bf16: bool,
        y: &mut [f32],
    ) {
        let mut oi = 0;
        if rows == 1 {
            // Batch 1 (decoding): four weight rows at a time share each load of `x` and give
            // sixteen independent FMA chains.
            let mut scales = Vec::new();
            while oi + 4 <= y.len() {
                // SAFETY: same features; rows `o0 + oi..o0 + oi + 4` are in bounds.
                unsafe {
                    match (bf16, w.blocksize >= 64) {
                        (false, true) => {
                            outs4::<false, true>(w, xs, o0 + oi, &mut scales, &mut y[oi..oi + 4])
                        }
                        (false, false) => {
                            outs4::<false, false>(w, xs, o0 + oi, &mut scales, &mut y[oi..oi + 4])
                        }
                        (true, true) => {
                            outs4::<true, true>(w, xs, o0 + oi, &mut scales, &mut y[oi..oi + 4])
                        }
                        (true, false) => {
                            outs4::<true, false>(w, xs, o0 + oi, &mut scales, &mut y[oi..oi + 4])
                        }
                    }
                }
                oi += 4;
            }
        }
        for (oi, yo) in y.chunks_exact_mut(rows).enumerate().skip(oi) {
            let mut r = 0;
            while r < rows {
                let g = (rows - r).min(4);
                let yg = &mut yo[r..r + g];
                // SAFETY: same features; `xs` holds rows `r..r + g`, the bytes of row `o0 + oi`
                // are in bounds (checked by the caller).
                unsafe {
                    match g {
                        4 => row::<4>(w, xs, r, o0 + oi, bf16, yg),
                        3 => row::<3>(w, xs, r, o0 + oi, bf16, yg),
                        2 => row::<2>(w, xs, r, o0 + oi, bf16, yg),
                        _ => row::<1>(w, xs, r, o0 + oi, bf16, yg),
                    }
                }
                r += g;
            }
        }
    }

    /// The 32 weights of 16 bytes: the even (high-nibble) ones, then the odd (low-nibble) ones.
    ///
    /// # Safety
    ///
    /// `p` must point at 16 readable bytes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    #[inline]
    unsafe fn decode(p: *const u8, lut: __m512) -> (__m512, __m512) {
        // SAFETY: the caller guarantees 16 bytes at `p`; `loadu` has no alignment requirement.
        let v = _mm512_cvtepu8_epi32(unsafe { _mm_loadu_si128(p.cast()) });
        // `vpermps` reads only the low four bits of each index: the low nibble needs no mask.
        let hi = _mm512_srli_epi32::<4>(v);
        (
            _mm512_permutexvar_ps(hi, lut),
            _mm512_permutexvar_ps(v, lut),
        )
    }

    /// Rounds each lane to the nearest bfloat16 (ties to even) as `half::bf16::from_f32`
    /// does, NaN staying a quiet NaN.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    #[inline]
    fn round_bf16_v(v: __m512) -> __m512 {
        let bits = _mm512_castps_si512(v);
        let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
        let up = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
        let quiet = _mm512_or_si512(bits, _mm512_set1_epi32(0x0040_0000));
        let r = _mm512_mask_blend_epi32(nan, up, quiet);
        _mm512_castsi512_ps(_mm512_and_si512(
            r,
            _mm512_set1_epi32(0xffff_0000_u32 as i32),
        ))
    }

    /// The dot products of weight rows `o..o + 4` with the one row `x`, into `y[..4]`. The
    /// absmax of every step (64 weights when `WIDE`, i.e. blocksize >= 64, else 32) is decoded
    /// first into `scales`, a per-call temp, so the hot loop is loads, shuffles and FMAs.
    ///
    /// # Safety
    ///
    /// As [`dots`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    #[inline]
    unsafe fn outs4<const BF16: bool, const WIDE: bool>(
        w: &Weight4,
        x: &[f32],
        o: usize,
        scales: &mut Vec<f32>,
        y: &mut [f32],
    ) {
        let (n_in, bs) = (w.n_in, w.blocksize);
        let steps = n_in / 64;
        let blocks = n_in / bs;
        // The four rows' blocks are consecutive: one pass decodes all their scales.
        scales.resize(4 * blocks, 0.0);
        w.scales.fill(o * blocks, scales);
        // Step `j` (64 weights when WIDE, else 32 = one block) lies in block `j >> shift`.
        let shift = if WIDE { bs.trailing_zeros() - 6 } else { 0 };
        // SAFETY: `w.code` is 16 floats.
        let code = unsafe { _mm512_loadu_ps(w.code.as_ptr()) };
        let lut = |k: usize, j: usize| {
            let l = _mm512_mul_ps(code, _mm512_set1_ps(scales[k * blocks + (j >> shift)]));
            if BF16 {
                round_bf16_v(l)
            } else {
                l
            }
        };
        let bytes: [*const u8; 4] =
            std::array::from_fn(|k| w.packed[(o + k) * n_in / 2..(o + k + 1) * n_in / 2].as_ptr());
        let mut acc = [[_mm512_setzero_ps(); 4]; 4];
        for p in 0..steps {
            let e = 64 * p;
            // SAFETY: elements `e..e + 64` are inside a row (`p < n_in / 64`): `x` has them and
            // each weight row has bytes `e / 2..e / 2 + 32`.
            unsafe {
                let xp = x.as_ptr().add(e);
                let xv = [
                    _mm512_loadu_ps(xp),
                    _mm512_loadu_ps(xp.add(16)),
                    _mm512_loadu_ps(xp.add(32)),
                    _mm512_loadu_ps(xp.add(48)),
                ];
                for k in 0..4 {
                    let (l0, l1) = if WIDE {
                        let l = lut(k, p);
                        (l, l)
                    } else {
                        (lut(k, 2 * p), lut(k, 2 * p + 1))
                    };
                    let (e0, o0) = decode(bytes[k].add(e / 2), l0);
                    let (e1, o1) = decode(bytes[k].add(e / 2 + 16), l1);
                    acc[k][0] = _mm512_fmadd_ps(xv[0], e0, acc[k][0]);
                    acc[k][1] = _mm512_fmadd_ps(xv[1], o0, acc[k][1]);
                    acc[k][2] = _mm512_fmadd_ps(xv[2], e1, acc[k][2]);
                    acc[k][3] = _mm512_fmadd_ps(xv[3], o1, acc[k][3]);
                }
            }
        }
        if n_in % 64 != 0 {
            // One last 32-weight step (blocksize 32 only).
            let e = 64 * steps;
            // SAFETY: elements `e..e + 32` are inside a row.
            unsafe {
                let xp = x.as_ptr().add(e);
                let (x0, x1) = (_mm512_loadu_ps(xp), _mm512_loadu_ps(xp.add(16)));
                for k in 0..4 {
                    let (e0, o0) = decode(bytes[k].add(e / 2), lut(k, 2 * steps));
                    acc[k][0] = _mm512_fmadd_ps(x0, e0, acc[k][0]);
                    acc[k][1] = _mm512_fmadd_ps(x1, o0, acc[k][1]);
                }
            }
        }
        for k in 0..4 {
            let a = &acc[k];
            let sum = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
            let dot = _mm512_reduce_add_ps(sum);
            y[k] = if BF16 { round_bf16(dot) } else { dot };
        }
    }

    /// The dot products of weight row `o` with rows `r0..r0 + R` of `xs`, into `y[..R]`.
    ///
    /// # Safety
    ///
    /// As [`dots`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    #[inline]
    unsafe fn row<const R: usize>(
        w: &Weight4,
        xs: &[f32],
        r0: usize,
        o: usize,
        bf16: bool,
        y: &mut [f32],
    ) {
        let (n_in, bs) = (w.n_in, w.blocksize);
        let blocks = n_in / bs;
        let steps = bs / 32;
        // SAFETY: `w.code` is 16 floats.
        let code = unsafe { _mm512_loadu_ps(w.code.as_ptr()) };
        let bytes = w.packed[o * n_in / 2..(o + 1) * n_in / 2].as_ptr();
        let x: [*const f32; R] = std::array::from_fn(|i| xs[(r0 + i) * n_in..].as_ptr());
        // Four accumulators per row: two per decoded step, two steps per iteration.
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        for kb in 0..blocks {
            let mut lut = _mm512_mul_ps(code, _mm512_set1_ps(w.scales.get(o * blocks + kb)));
            if bf16 {
                lut = round_bf16_v(lut);
            }
            let base = kb * bs;
            let mut s = 0;
            while s + 2 <= steps {
                let e = base + s * 32;
                // SAFETY: elements `e..e + 64` are inside the row (`e + 64 <= base + bs`), so
                // bytes `e / 2..e / 2 + 32` are too, and every `x[i]` holds `n_in` floats.
                unsafe {
                    let (e0, o0) = decode(bytes.add(e / 2), lut);
                    let (e1, o1) = decode(bytes.add(e / 2 + 16), lut);
                    for i in 0..R {
                        let xp = x[i].add(e);
                        acc[i][0] = _mm512_fmadd_ps(_mm512_loadu_ps(xp), e0, acc[i][0]);
                        acc[i][1] = _mm512_fmadd_ps(_mm512_loadu_ps(xp.add(16)), o0, acc[i][1]);
                        acc[i][2] = _mm512_fmadd_ps(_mm512_loadu_ps(xp.add(32)), e1, acc[i][2]);
                        acc[i][3] = _mm512_fmadd_ps(_mm512_loadu_ps(xp.add(48)), o1, acc[i][3]);
                    }
                }
                s += 2;
            }
            if s < steps {
                let e = base + s * 32;
                // SAFETY: elements `e..e + 32` are inside the row (blocksize 32).
                unsafe {
                    let (e0, o0) = decode(bytes.add(e / 2), lut);
                    for i in 0..R {
                        let xp = x[i].add(e);
                        acc[i][0] = _mm512_fmadd_ps(_mm512_loadu_ps(xp), e0, acc[i][0]);
                        acc[i][1] = _mm512_fmadd_ps(_mm512_loadu_ps(xp.add(16)), o0, acc[i][1]);
                    }
                }
            }
        }
        for i in 0..R {
            let a = &acc[i];
            let sum = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
            let dot = _mm512_reduce_add_ps(sum);
            y[i] = if bf16 { round_bf16(dot) } else { dot };
        }
    }
}

/// AVX2: 16 weights (8 bytes) per step; the 16-entry code takes two registers, looked up with
/// two `vpermps` and a blend on bit 3 of the nibble.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{round_bf16, Weight4};

    /// See [`super::dots`]; rows in groups of up to two (16 vector registers).
    ///
    /// # Safety
    ///
    /// The CPU must have AVX2 and FMA; `super::dots` checked the bounds.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dots(
        w: &Weight4,
        xs: &[f32],
        rows: usize,
        o0: usize,
        bf16: bool,
        y: &mut [f32],
    ) {
        for (oi, yo) in y.chunks_exact_mut(rows).enumerate() {
            let mut r = 0;
            while r < rows {
                let g = (rows - r).min(2);
                let yg = &mut yo[r..r + g];
                // SAFETY: same features and bounds as this function's.
                unsafe {
                    if g == 2 {
                        row::<2>(w, xs, r, o0 + oi, bf16, yg);
                    } else {
                        row::<1>(w, xs, r, o0 + oi, bf16, yg);
                    }
                }
                r += g;
            }
        }
    }

    /// The weights of nibbles `idx` (values 0..=15 in the low bits of each lane).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn lookup(idx: __m256i, lo: __m256, hi: __m256) -> __m256 {
        // `vpermps` uses bits 0-2 of the index; bit 3 (moved to the sign bit) picks the half.
        let pick_hi = _mm256_castsi256_ps(_mm256_slli_epi32::<28>(idx));
        _mm256_blendv_ps(
            _mm256_permutevar8x32_ps(lo, idx),
            _mm256_permutevar8x32_ps(hi, idx),
            pick_hi,
        )
    }

    /// Rounds each lane to the nearest bfloat16 (ties to even), NaN staying a quiet NaN.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn round_bf16_v(v: __m256) -> __m256 {
        let bits = _mm256_castps_si256(v);
        let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
        let up = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
        let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
        let quiet = _mm256_or_si256(bits, _mm256_set1_epi32(0x0040_0000));
        let r = _mm256_blendv_epi8(up, quiet, nan);
        _mm256_castsi256_ps(_mm256_and_si256(
            r,
            _mm256_set1_epi32(0xffff_0000_u32 as i32),
        ))
    }

    /// The dot products of weight row `o` with rows `r0..r0 + R` of `xs`.
    ///
    /// # Safety
    ///
    /// As [`dots`].
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn row<const R: usize>(
        w: &Weight4,
        xs: &[f32],
        r0: usize,
        o: usize,
        bf16: bool,
        y: &mut [f32],
    ) {
        let (n_in, bs) = (w.n_in, w.blocksize);
        let blocks = n_in / bs;
        let bytes = w.packed[o * n_in / 2..(o + 1) * n_in / 2].as_ptr();
        let x: [*const f32; R] = std::array::from_fn(|i| xs[(r0 + i) * n_in..].as_ptr());
        // SAFETY: `w.code` is 16 floats.
        let (code_lo, code_hi) = unsafe {
            (
                _mm256_loadu_ps(w.code.as_ptr()),
                _mm256_loadu_ps(w.code.as_ptr().add(8)),
            )
        };
        let mut acc = [[_mm256_setzero_ps(); 4]; R];
        for kb in 0..blocks {
            let a = _mm256_set1_ps(w.scales.get(o * blocks + kb));
            let (mut lo, mut hi) = (_mm256_mul_ps(code_lo, a), _mm256_mul_ps(code_hi, a));
            if bf16 {
                lo = round_bf16_v(lo);
                hi = round_bf16_v(hi);
            }
            // A block is at least 32 elements: whole pairs of 16-element steps.
            for e in (kb * bs..(kb + 1) * bs).step_by(32) {
                // SAFETY: elements `e..e + 32` are inside the row, so bytes `e / 2..e / 2 + 16`
                // are too, and every `x[i]` holds `n_in` floats.
                unsafe {
                    let v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(bytes.add(e / 2).cast()));
                    let v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(bytes.add(e / 2 + 8).cast()));
                    let w0 = lookup(_mm256_srli_epi32::<4>(v0), lo, hi);
                    let w1 = lookup(v0, lo, hi);
                    let w2 = lookup(_mm256_srli_epi32::<4>(v1), lo, hi);
                    let w3 = lookup(v1, lo, hi);
                    for i in 0..R {
                        let xp = x[i].add(e);
                        acc[i][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xp), w0, acc[i][0]);
                        acc[i][1] = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(8)), w1, acc[i][1]);
                        acc[i][2] = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(16)), w2, acc[i][2]);
                        acc[i][3] = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(24)), w3, acc[i][3]);
                    }
                }
            }
        }
        for i in 0..R {
            let a = &acc[i];
            let s = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
            let q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
            let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
            let q = _mm_add_ss(q, _mm_movehdup_ps(q));
            let dot = _mm_cvtss_f32(q);
            y[i] = if bf16 { round_bf16(dot) } else { dot };
        }
    }
}
