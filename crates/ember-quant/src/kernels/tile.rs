//! Products with many rows (prefill, training) and the input gradient: a tile of the weight is
//! dequantized into a per-thread float32 buffer (a few hundred KB, so it stays in L2) and
//! multiplied with the `gemm` crate, which runs near float32 GEMM speed. Dequantizing costs
//! one pass over the tile per call, small against the `rows` multiply-adds per weight.
//!
//! [`dequant_range`] is also `QuantizedLinear::dequantize` for 4-bit weights: it yields exactly
//! `dequantize_4bit`'s values (the same `code * absmax` products).

use std::cell::RefCell;

use gemm::Parallelism;
use rayon::prelude::*;

use super::scales::Weight4;
use super::{round_bf16, Isa, SendPtr, PARALLEL_MIN_WORK};

/// Floats per dequantized tile: 256 KB, well inside the 1-2 MB L2 of current cores next to
/// `gemm`'s own packed panels.
const TILE_FLOATS: usize = 1 << 16;

thread_local! {
    /// Each thread's tile buffer, reused across calls (a fresh 256 KB allocation per tile would
    /// be an `mmap` and page faults every time).
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with a buffer of at least `len` floats (contents unspecified).
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
            f(&mut buf[..len])
        }
        // Re-entered on this thread (a task stolen while waiting): use a buffer of its own.
        Err(_) => f(&mut vec![0.0; len]),
    })
}

/// A weight that can write any run of its flattened `[n_out, n_in]` values as float32.
pub(crate) trait TileSource: Sync {
    /// Rows of the weight.
    fn n_out(&self) -> usize;
    /// Columns of the weight.
    fn n_in(&self) -> usize;
    /// Elements `start..start + dst.len()` of the flattened weight into `dst`.
    fn dequant(&self, start: usize, dst: &mut [f32]);
}

/// A 4-bit weight as a [`TileSource`], optionally rounded to bfloat16.
pub(crate) struct Tiles4<'a> {
    /// The weight.
    pub(crate) w: Weight4<'a>,
    /// The kernels to decode with.
    pub(crate) isa: Isa,
    /// Round each dequantized value to bfloat16.
    pub(crate) bf16: bool,
}

impl TileSource for Tiles4<'_> {
    fn n_out(&self) -> usize {
        self.w.n_out
    }
    fn n_in(&self) -> usize {
        self.w.n_in
    }
    fn dequant(&self, start: usize, dst: &mut [f32]) {
        dequant_range(self.isa, &self.w, start, dst, self.bf16);
    }
}

/// Elements `start..start + dst.len()` of the flattened 4-bit weight, `code[nibble] * absmax`
/// (rounded to bfloat16 when `bf16`). Any start and length: blocks may straddle rows.
pub(crate) fn dequant_range(isa: Isa, w: &Weight4, start: usize, dst: &mut [f32], bf16: bool) {
    let end = start + dst.len();
    assert!(
        end.div_ceil(2) <= w.packed.len(),
        "range outside the weight"
    );
    let bs = w.blocksize;
    let mut i = start;
    while i < end {
        let b = i / bs;
        let seg_end = end.min((b + 1) * bs);
        let lut = w.scaled_code(b, bf16);
        let out = &mut dst[i - start..seg_end - start];
        let mut k = 0;
        if i % 2 == 1 {
            // Starts on a low nibble.
            out[0] = lut[(w.packed[i / 2] & 15) as usize];
            k = 1;
        }
        let pairs = (out.len() - k) / 2;
        let first = (i + k) / 2;
        decode_pairs(
            isa,
            &lut,
            &w.packed[first..first + pairs],
            &mut out[k..k + 2 * pairs],
        );
        if k + 2 * pairs < out.len() {
            // Ends on a high nibble.
            out[k + 2 * pairs] = lut[(w.packed[first + pairs] >> 4) as usize];
        }
        i = seg_end;
    }
}

/// Both nibbles of every byte of `bytes`, looked up in `lut`, into `out` (twice as long).
fn decode_pairs(isa: Isa, lut: &[f32; 16], bytes: &[u8], out: &mut [f32]) {
    assert_eq!(out.len(), 2 * bytes.len());
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx512` is only chosen when the CPU has AVX-512 F / BW / VL; the lengths
        // were checked above.
        Isa::Avx512 => unsafe { decode_pairs_avx512(lut, bytes, out) },
        _ => decode_pairs_scalar(lut, bytes, out),
    }
}

fn decode_pairs_scalar(lut: &[f32; 16], bytes: &[u8], out: &mut [f32]) {
    for (o, &b) in out.chunks_exact_mut(2).zip(bytes) {
        o[0] = lut[(b >> 4) as usize];
        o[1] = lut[(b & 15) as usize];
    }
}

/// 16 bytes -> 32 values per step: each byte is duplicated, shifted by 4 in the even lanes and
/// used as the index of `vpermps` (which reads only the low four bits).
///
/// # Safety
///
/// The CPU must have AVX-512 F / BW / VL; `out.len() == 2 * bytes.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn decode_pairs_avx512(lut: &[f32; 16], bytes: &[u8], out: &mut [f32]) {
    use std::arch::x86_64::*;
    // SAFETY: `lut` is 16 floats.
    let table = unsafe { _mm512_loadu_ps(lut.as_ptr()) };
    let shifts = _mm512_set_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
    let steps = bytes.len() / 16;
    for s in 0..steps {
        // SAFETY: bytes `16s..16s + 16` and values `32s..32s + 32` are in bounds (`s < steps`).
        unsafe {
            let v = _mm_loadu_si128(bytes.as_ptr().add(16 * s).cast());
            let lo = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(v, v)), shifts);
            let hi = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(v, v)), shifts);
            let p = out.as_mut_ptr().add(32 * s);
            _mm512_storeu_ps(p, _mm512_permutexvar_ps(lo, table));
            _mm512_storeu_ps(p.add(16), _mm512_permutexvar_ps(hi, table));
        }
    }
    decode_pairs_scalar(lut, &bytes[16 * steps..], &mut out[32 * steps..]);
}

/// `out[rows, n_out] += x[rows, n_in] · Wᵀ` one tile of weight rows at a time. With
/// `round_out`, each dot product is rounded to bfloat16 before it is added (the weight and `x`
/// are already rounded by the caller / the source).
pub(crate) fn forward<S: TileSource>(
    src: &S,
    x: &[f32],
    rows: usize,
    round_out: bool,
    out: &mut [f32],
) {
    let (n_out, n_in) = (src.n_out(), src.n_in());
    assert_eq!(x.len(), rows * n_in);
    assert_eq!(out.len(), rows * n_out);
    if rows == 0 || n_out == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    // Tiles of whole 16-row groups, small enough for L2, and enough of them for every thread.
    let mut t = (TILE_FLOATS / n_in.max(1)).max(16) / 16 * 16;
    t = t.min(n_out.div_ceil(2 * threads).div_ceil(16) * 16).max(16);
    let tiles = n_out.div_ceil(t);
    let parallel = rows * n_out * n_in >= PARALLEL_MIN_WORK;
    // One tile: let gemm split it; several: one tile per task.
    let inner = if parallel && tiles == 1 {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    let dst = SendPtr(out.as_mut_ptr());
    let run = |ti: usize| {
        let (o0, o1) = (ti * t, n_out.min(ti * t + t));
        let nt = o1 - o0;
        let extra = if round_out { rows * nt } else { 0 };
        with_scratch(nt * n_in + extra, |buf| {
            let (tile, tmp) = buf.split_at_mut(nt * n_in);
            src.dequant(o0 * n_in, tile);
            if round_out {
                // SAFETY: `tmp` is `rows x nt`, `x` is `rows x n_in`, the tile `nt x n_in`
                // (read transposed: column stride `n_in`); the strides describe exactly those.
                unsafe {
                    product(
                        [rows, nt, n_in],
                        (tmp.as_mut_ptr(), nt as isize),
                        false,
                        (x.as_ptr(), n_in as isize),
                        (tile.as_ptr(), n_in as isize, 1),
                        inner,
                    );
                }
                for r in 0..rows {
                    for j in 0..nt {
                        // SAFETY: element `(r, o0 + j)` of `out`, which only this tile writes.
                        unsafe {
                            *dst.get().add(r * n_out + o0 + j) += round_bf16(tmp[r * nt + j])
                        };
                    }
                }
            } else {
                // SAFETY: the destination is columns `o0..o1` of `out` (`rows x n_out`, row
                // stride `n_out`), written by this tile alone; inputs as above.
                unsafe {
                    product(
                        [rows, nt, n_in],
                        (dst.get().add(o0), n_out as isize),
                        true,
                        (x.as_ptr(), n_in as isize),
                        (tile.as_ptr(), n_in as isize, 1),
                        inner,
                    );
                }
            }
        });
    };
    if parallel && tiles > 1 {
        (0..tiles).into_par_iter().for_each(run);
    } else {
        (0..tiles).for_each(run);
    }
}

/// `grad_in[rows, n_in] += grad_out[rows, n_out] · W`, one slab of weight columns at a time:
/// each task owns its columns of `grad_in`, and the slab holds every weight row, so each
/// `gemm` sums over all of `n_out` at once.
pub(crate) fn backward<S: TileSource>(src: &S, grad_out: &[f32], rows: usize, grad_in: &mut [f32]) {
    let (n_out, n_in) = (src.n_out(), src.n_in());
    assert_eq!(grad_out.len(), rows * n_out);
    assert_eq!(grad_in.len(), rows * n_in);
    if rows == 0 || n_in == 0 || n_out == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    let mut cw = (TILE_FLOATS / n_out).max(16) / 16 * 16;
    cw = cw.min(n_in.div_ceil(2 * threads).div_ceil(16) * 16).max(16);
    let slabs = n_in.div_ceil(cw);
    let parallel = rows * n_out * n_in >= PARALLEL_MIN_WORK;
    let inner = if parallel && slabs == 1 {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    let dst = SendPtr(grad_in.as_mut_ptr());
    let run = |si: usize| {
        let (c0, c1) = (si * cw, n_in.min(si * cw + cw));
        let width = c1 - c0;
        with_scratch(n_out * width, |slab| {
            for (o, row) in slab.chunks_exact_mut(width).enumerate() {
                src.dequant(o * n_in + c0, row);
            }
            // SAFETY: the destination is columns `c0..c1` of `grad_in` (`rows x n_in`), written
            // by this slab alone; `grad_out` is `rows x n_out`, the slab `n_out x width`.
            unsafe {
                product(
                    [rows, width, n_out],
                    (dst.get().add(c0), n_in as isize),
                    true,
                    (grad_out.as_ptr(), n_out as isize),
                    (slab.as_ptr(), 1, width as isize),
                    inner,
                );
            }
        });
    };
    if parallel && slabs > 1 {
        (0..slabs).into_par_iter().for_each(run);
    } else {
        (0..slabs).for_each(run);
    }
}

/// The whole 4-bit weight in float32, bit-identical to `dequantize_4bit`, decoded in parallel.
pub(crate) fn dequantize(isa: Isa, w: &Weight4) -> Vec<f32> {
    let n = w.n_out * w.n_in;
    let mut out = vec![0.0f32; n];
    // Even chunk lengths, so that every chunk starts on a whole byte.
    let chunk = (n / (4 * rayon::current_num_threads()))
        .max(1 << 15)
        .div_ceil(2)
        * 2;
    out.par_chunks_mut(chunk)
        .enumerate()
        .for_each(|(i, c)| dequant_range(isa, w, i * chunk, c, false));
    out
}

/// `dst (+)= lhs · rhs` for `lhs: [m, k]` with contiguous rows `lhs.1` apart and `rhs: [k, n]`
/// read through its strides (`rhs.1` between columns, `rhs.2` between rows): one `gemm` call
/// (alpha 1, beta 1; `dst`, rows `dst.1` apart, is read first only when `accumulate`).
///
/// # Safety
///
/// Every element the strides reach lies inside its buffer, and the `m x n` elements of `dst`
/// belong to the calling task alone.
unsafe fn product(
    [m, n, k]: [usize; 3],
    dst: (*mut f32, isize),
    accumulate: bool,
    lhs: (*const f32, isize),
    rhs: (*const f32, isize, isize),
    parallelism: Parallelism,
) {
    // SAFETY: as the caller guarantees; `gemm` does not read `dst` unless `accumulate`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.0,
            1,
            dst.1,
            accumulate,
            lhs.0,
            1,
            lhs.1,
            rhs.0,
            rhs.1,
            rhs.2,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}
