//! A bfloat16 GEMM on CPUs with AVX512_BF16: `C += A · B` with both operands rounded to
//! bfloat16 and the products summed in float32.
//!
//! This is the product torch computes for a bf16 matmul on such a CPU (oneDNN's `vdpbf16ps`
//! kernels), under `autocast` or in a `.bfloat16()` model. `vdpbf16ps` multiplies 16 pairs
//! of bf16 values with 16 others and adds each pair's two products to an f32 lane, 32
//! multiply-adds per instruction against 16 for an f32 FMA: on the 2-core Zen 4 bench machine
//! an 8 × 32 tile of them runs at 1.7x the rate of f32 FMAs. Products of two bf16 values are
//! exact in f32, so the result differs from an f32 GEMM over the rounded operands only by the
//! order of its sums (and in flushing subnormal inputs to zero, as the instruction does).
//!
//! The operands are packed as GotoBLAS packs them, here into bf16 pairs along `k`: `A` in
//! blocks of [`MR`] rows, each `k` pair of a row one 32-bit word, the block's rows side by
//! side; `B` in blocks of [`NR`] columns, each `k` pair of a column one word. Packing reads
//! any strides (a transposed weight, `xᵀ` for a weight's gradient) and rounds f32 values to
//! nearest even, as torch's `.to(torch.bfloat16)`; values that already are bf16 (autocast's
//! rounded operands, a bf16 model's weights) pass unchanged. The microkernel keeps an
//! `MR × NR` tile of `C` in 16 registers over the whole of `k`; the threads take tiles of
//! [`MC`] × [`NC`] of `C`, whose packed `A` rows and `B` columns stay in the core's L2.

use crate::ptr::SharedMut;
use rayon::prelude::*;

/// Rows of `A` per microkernel tile.
pub(crate) const MR: usize = 8;
/// Columns of `B` per microkernel tile: two registers of 16 f32 lanes.
pub(crate) const NR: usize = 32;
/// Rows of `C` per task: its packed rows of `A` (`MC · k` bf16 values) stay in L2.
const MC: usize = 64;
/// Columns of `C` per task.
const NC: usize = 256;

/// The environment variable that turns the bf16 GEMM off when set to `0`: the products are
/// then f32 GEMMs over the rounded operands, as on a CPU without AVX512_BF16 (for comparing
/// the two, as oneDNN's `ONEDNN_MAX_CPU_ISA` does).
pub const BF16_GEMM_VAR: &str = "EMBER_BF16_GEMM";

/// Whether bf16 products (a bf16 [`crate::autocast`] region's linear layers, forward and
/// backward, and a `.bfloat16()` model's) run on this CPU's bf16 dot-product instructions
/// (AVX512_BF16) in this process, rather than as f32 GEMMs over rounded operands.
pub fn bf16_gemm_available() -> bool {
    available()
}

/// Whether this CPU runs [`gemm`]: AVX-512 with its bf16 instructions (`avx512_bf16` in
/// `/proc/cpuinfo`), unless [`BF16_GEMM_VAR`] is `0` or `EMBER_NO_AVX512` is set (the AVX2
/// build of the other kernels). Read once.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bf16")
                && std::env::var(BF16_GEMM_VAR).map_or(true, |v| v != "0")
                && std::env::var_os("EMBER_NO_AVX512").is_none()
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A value [`gemm`] reads: f32 (rounded to bf16 as it is packed) or bf16 (its bits).
pub(crate) trait Element: Copy + Send + Sync + 'static {
    /// The value's bf16 bits.
    fn bf16_bits(self) -> u16;
}

impl Element for f32 {
    #[inline(always)]
    fn bf16_bits(self) -> u16 {
        round(self)
    }
}

impl Element for u16 {
    #[inline(always)]
    fn bf16_bits(self) -> u16 {
        self
    }
}

/// Two values as one packed word, the first in the low half.
#[inline(always)]
fn pair<T: Element>(lo: T, hi: T) -> u32 {
    u32::from(lo.bf16_bits()) | (u32::from(hi.bf16_bits()) << 16)
}

/// A matrix operand of [`gemm`]: element `(i, j)` lies `i · strides[0] + j · strides[1]`
/// values from `ptr`.
#[derive(Clone, Copy)]
pub(crate) struct Matrix<T> {
    /// The element `(0, 0)`.
    pub(crate) ptr: *const T,
    /// Steps between rows and between columns, in values.
    pub(crate) strides: [isize; 2],
}

// SAFETY: the operands are only read while a GEMM runs (the callers' contract on `gemm`).
unsafe impl<T: Sync> Send for Matrix<T> {}
unsafe impl<T: Sync> Sync for Matrix<T> {}

impl<T: Element> Matrix<T> {
    /// Element `(i, j)`.
    ///
    /// # Safety
    /// `(i, j)` lies within the matrix.
    #[inline(always)]
    unsafe fn at(self, i: usize, j: usize) -> T {
        // SAFETY: the caller's.
        unsafe {
            *self
                .ptr
                .offset(i as isize * self.strides[0] + j as isize * self.strides[1])
        }
    }

    /// The `len` values from `(i, j)` on, which the caller knows are contiguous.
    ///
    /// # Safety
    /// They lie within the matrix, one after another in memory.
    unsafe fn run(self, i: usize, j: usize, len: usize) -> &'static [T] {
        // SAFETY: the caller's; the matrix outlives the GEMM that reads it.
        unsafe {
            std::slice::from_raw_parts(
                self.ptr
                    .offset(i as isize * self.strides[0] + j as isize * self.strides[1]),
                len,
            )
        }
    }

    /// The pair `(i, j)`, `(i, j + 1)` (`along_rows`: `(i + 1, j)`), the second zero where it
    /// would be index `end` along that direction.
    ///
    /// # Safety
    /// `(i, j)` lies within the matrix.
    #[inline(always)]
    unsafe fn pair_at(self, i: usize, j: usize, along_rows: bool, end: usize) -> u32 {
        // SAFETY: the caller's for `(i, j)`; the second value is read only below `end`.
        unsafe {
            let lo = self.at(i, j).bf16_bits();
            let hi = match along_rows {
                true if i + 1 < end => self.at(i + 1, j).bf16_bits(),
                false if j + 1 < end => self.at(i, j + 1).bf16_bits(),
                _ => 0,
            };
            u32::from(lo) | (u32::from(hi) << 16)
        }
    }
}

/// The packed pairs of a contiguous run along `k` into `words` (the last one's second value
/// zero for an odd run).
#[inline(always)]
fn pairs_of<T: Element>(run: &[T], words: &mut [u32]) {
    let mut chunks = run.chunks_exact(2);
    for (w, two) in words.iter_mut().zip(chunks.by_ref()) {
        *w = pair(two[0], two[1]);
    }
    if let [last] = chunks.remainder() {
        words[run.len() / 2] = u32::from(last.bf16_bits());
    }
}

/// `v` rounded to the nearest bf16, ties to even, as torch's `.to(torch.bfloat16)` (and
/// `half::bf16::from_f32`); a NaN stays a (quiet) NaN. Branch-free, so that packing loops
/// vectorise.
#[inline(always)]
pub(crate) fn round(v: f32) -> u16 {
    let bits = v.to_bits();
    let rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16;
    let quiet_nan = (bits >> 16) | 0x40;
    let is_nan = bits & 0x7FFF_FFFF > 0x7F80_0000;
    (if is_nan { quiet_nan } else { rounded }) as u16
}

/// `c += a · b` for `a: [m, k]`, `b: [k, n]` and `c: [m, n]` row-major with rows `ldc`
/// apart, every product of operands rounded to bf16 and summed in f32. Runs on rayon's
/// threads. Only where [`available`].
///
/// # Safety
/// [`available`] is true; `a` and `b` address `[m, k]` and `[k, n]` values at their strides,
/// unwritten while this runs; `c` holds `m` initialised rows of at least `n` values, `ldc`
/// apart, that nothing else touches while this runs.
pub(crate) unsafe fn gemm<A: Element, B: Element>(
    c: SharedMut,
    ldc: usize,
    a: Matrix<A>,
    b: Matrix<B>,
    [m, k, n]: [usize; 3],
) {
    debug_assert!(available());
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let pairs = k.div_ceil(2);
    // SAFETY (both): the caller's bounds.
    let packed_a = unsafe { pack_a(a, m, k) };
    let packed_b = unsafe { pack_b(b, k, n) };
    let (row_tasks, col_tasks) = (m.div_ceil(MC), n.div_ceil(NC));
    (0..row_tasks * col_tasks).into_par_iter().for_each(|task| {
        let (rows, cols) = (task / col_tasks * MC, task % col_tasks * NC);
        for col in (cols..(cols + NC).min(n)).step_by(NR) {
            let b_panel = &packed_b[col / NR * pairs * NR..][..pairs * NR];
            for row in (rows..(rows + MC).min(m)).step_by(MR) {
                let a_panel = &packed_a[row / MR * pairs * MR..][..pairs * MR];
                let (height, width) = (MR.min(m - row), NR.min(n - col));
                // SAFETY: the tile's rows and columns lie within `c`, which this task alone
                // writes there (tasks own disjoint blocks of rows and columns); the panels
                // hold `pairs` words per row / column.
                unsafe {
                    let tile = c.at((row * ldc + col) as isize);
                    if height == MR && width == NR {
                        kernel(pairs, a_panel, b_panel, tile, ldc);
                    } else {
                        let mut full = [0.0f32; MR * NR];
                        kernel(pairs, a_panel, b_panel, full.as_mut_ptr(), NR);
                        for r in 0..height {
                            let dst = std::slice::from_raw_parts_mut(tile.add(r * ldc), width);
                            for (d, s) in dst.iter_mut().zip(&full[r * NR..]) {
                                *d += s;
                            }
                        }
                    }
                }
            }
        }
    });
}

/// `a: [m, k]` in blocks of [`MR`] rows: word `(block · pairs + p) · MR + r` holds row
/// `block · MR + r`'s values `2p` and `2p + 1`; rows beyond `m` and the value beyond an odd
/// `k` are zero.
///
/// # Safety
/// [`available`]; `a` addresses `[m, k]` values.
unsafe fn pack_a<T: Element>(a: Matrix<T>, m: usize, k: usize) -> Vec<u32> {
    let pairs = k.div_ceil(2);
    let mut packed = vec![0u32; m.div_ceil(MR) * MR * pairs];
    packed
        .par_chunks_mut(MR * pairs)
        .enumerate()
        // SAFETY: the caller's.
        .for_each(|(block, dst)| unsafe { pack_a_block(a, [m, k], block, dst) });
    packed
}

/// Block `block` of [`pack_a`] into `dst`, compiled for AVX-512 so that the conversions run
/// 16 values wide.
///
/// # Safety
/// As [`pack_a`]'s.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f,avx512bw"))]
unsafe fn pack_a_block<T: Element>(
    a: Matrix<T>,
    [m, k]: [usize; 2],
    block: usize,
    dst: &mut [u32],
) {
    let pairs = k.div_ceil(2);
    let rows = block * MR..(block * MR + MR).min(m);
    // SAFETY (each read): rows below `m`, columns below `k`, along a stride of 1.
    if a.strides[1] == 1 {
        // Rows along k (an input): each row's pairs, then one word every MR.
        let mut words = vec![0u32; pairs];
        for (r, i) in rows.enumerate() {
            pairs_of(unsafe { a.run(i, 0, k) }, &mut words);
            for (p, &w) in words.iter().enumerate() {
                dst[p * MR + r] = w;
            }
        }
    } else if a.strides[0] == 1 {
        // Columns along m (an input's transpose, for a weight's gradient): two columns make
        // one pair per row.
        let (i0, height) = (rows.start, rows.len());
        for (p, words) in dst.chunks_exact_mut(MR).enumerate() {
            let lo = unsafe { a.run(i0, 2 * p, height) };
            if 2 * p + 1 < k {
                let hi = unsafe { a.run(i0, 2 * p + 1, height) };
                for ((w, &l), &h) in words.iter_mut().zip(lo).zip(hi) {
                    *w = pair(l, h);
                }
            } else {
                for (w, &l) in words.iter_mut().zip(lo) {
                    *w = u32::from(l.bf16_bits());
                }
            }
        }
    } else {
        for (r, i) in rows.enumerate() {
            for p in 0..pairs {
                dst[p * MR + r] = unsafe { a.pair_at(i, 2 * p, false, k) };
            }
        }
    }
}

/// `b: [k, n]` in blocks of [`NR`] columns: word `(block · pairs + p) · NR + c` holds column
/// `block · NR + c`'s values `2p` and `2p + 1`; columns beyond `n` and the value beyond an
/// odd `k` are zero.
///
/// # Safety
/// [`available`]; `b` addresses `[k, n]` values.
unsafe fn pack_b<T: Element>(b: Matrix<T>, k: usize, n: usize) -> Vec<u32> {
    let pairs = k.div_ceil(2);
    let mut packed = vec![0u32; n.div_ceil(NR) * NR * pairs];
    packed
        .par_chunks_mut(NR * pairs)
        .enumerate()
        // SAFETY: the caller's.
        .for_each(|(block, dst)| unsafe { pack_b_block(b, [k, n], block, dst) });
    packed
}

/// Block `block` of [`pack_b`] into `dst`, compiled for AVX-512 as [`pack_a_block`].
///
/// # Safety
/// As [`pack_b`]'s.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f,avx512bw"))]
unsafe fn pack_b_block<T: Element>(
    b: Matrix<T>,
    [k, n]: [usize; 2],
    block: usize,
    dst: &mut [u32],
) {
    let pairs = k.div_ceil(2);
    let cols = block * NR..(block * NR + NR).min(n);
    // SAFETY (each read): rows below `k`, columns below `n`, along a stride of 1.
    if b.strides[1] == 1 {
        // Rows along n (burn's `[d_in, d_out]` weight): two rows make one pair per column.
        let (j0, width) = (cols.start, cols.len());
        for (p, words) in dst.chunks_exact_mut(NR).enumerate() {
            let lo = unsafe { b.run(2 * p, j0, width) };
            if 2 * p + 1 < k {
                let hi = unsafe { b.run(2 * p + 1, j0, width) };
                for ((w, &l), &h) in words.iter_mut().zip(lo).zip(hi) {
                    *w = pair(l, h);
                }
            } else {
                for (w, &l) in words.iter_mut().zip(lo) {
                    *w = u32::from(l.bf16_bits());
                }
            }
        }
    } else if b.strides[0] == 1 {
        // Columns along k (a weight's transpose, for an input's gradient; a tied table):
        // each column's pairs, then one word every NR.
        let mut words = vec![0u32; pairs];
        for (c, j) in cols.enumerate() {
            pairs_of(unsafe { b.run(0, j, k) }, &mut words);
            for (p, &w) in words.iter().enumerate() {
                dst[p * NR + c] = w;
            }
        }
    } else {
        for (c, j) in cols.enumerate() {
            for p in 0..pairs {
                dst[p * NR + c] = unsafe { b.pair_at(2 * p, j, true, k) };
            }
        }
    }
}

/// `c += a · b` for one `MR × NR` tile over `pairs` pairs of `k`: `a` and `b` are a packed
/// row block and column block (see [`pack_a`], [`pack_b`]), `c`'s rows `ldc` apart.
///
/// # Safety
/// [`available`]; `c` holds `MR` rows of `NR` values `ldc` apart; `a` and `b` hold `pairs`
/// words per row / column.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel(pairs: usize, a: &[u32], b: &[u32], c: *mut f32, ldc: usize) {
    use std::arch::x86_64::*;
    debug_assert!(a.len() >= pairs * MR && b.len() >= pairs * NR);
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    let (a, b) = (a.as_ptr(), b.as_ptr());
    for p in 0..pairs {
        // SAFETY: word `p · NR + 16` and the 15 after it are in `b`; `p · MR + r` in `a`;
        // `__m512bh` is 32 bf16 values, the same 64 bytes as `__m512i`.
        unsafe {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR).cast()));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16).cast()));
            for (r, acc) in acc.iter_mut().enumerate() {
                let pair: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*a.add(p * MR + r) as i32));
                acc[0] = _mm512_dpbf16_ps(acc[0], pair, b0);
                acc[1] = _mm512_dpbf16_ps(acc[1], pair, b1);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        // SAFETY: row r of the tile holds NR values.
        unsafe {
            let row = c.add(r * ldc);
            _mm512_storeu_ps(row, _mm512_add_ps(_mm512_loadu_ps(row), acc[0]));
            _mm512_storeu_ps(
                row.add(16),
                _mm512_add_ps(_mm512_loadu_ps(row.add(16)), acc[1]),
            );
        }
    }
}

/// Never called: [`available`] is false off x86-64.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel(_: usize, _: &[u32], _: &[u32], _: *mut f32, _: usize) {
    unreachable!("the bf16 GEMM runs on x86-64 only")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values of order 1, many not bf16.
    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let h = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8;
                (h % 20011) as f32 / 10005.5 - 1.0
            })
            .collect()
    }

    fn matrix<T>(values: &[T], strides: [usize; 2]) -> Matrix<T> {
        Matrix {
            ptr: values.as_ptr(),
            strides: strides.map(|s| s as isize),
        }
    }

    fn widen(bits: u16) -> f32 {
        f32::from_bits(u32::from(bits) << 16)
    }

    #[test]
    fn rounds_as_torch_does() {
        for v in [
            1.0 + 2f32.powi(-8),
            1.0 + 3.0 * 2f32.powi(-8),
            -3.3,
            1e-40,
            f32::MAX,
        ] {
            assert_eq!(round(v), burn::tensor::bf16::from_f32(v).to_bits(), "{v}");
        }
        assert!(widen(round(f32::NAN)).is_nan());
    }

    /// Every layout the models use (row-major, the transposes of a weight's gradient and of
    /// its input's), odd sizes on every side, f32 and bf16 sources: the sums of the rounded
    /// products, added to what `c` held.
    #[test]
    fn equals_the_f32_product_of_the_rounded_operands() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512_BF16");
            return;
        }
        for [m, k, n] in [[1, 1, 1], [37, 51, 70], [130, 300, 257], [8, 64, 32]] {
            let (a, b) = (values(m * k, 1), values(k * n, 2));
            let (ar, br): (Vec<u16>, Vec<u16>) = (
                a.iter().map(|&v| round(v)).collect(),
                b.iter().map(|&v| round(v)).collect(),
            );
            let mut want = values(m * n, 3);
            for i in 0..m {
                for j in 0..n {
                    let dot: f64 = (0..k)
                        .map(|p| f64::from(widen(ar[i * k + p]) * widen(br[p * n + j])))
                        .sum();
                    want[i * n + j] += dot as f32;
                }
            }
            // b transposed in memory: `bt[j][p]`, read through strides.
            let bt: Vec<f32> = (0..n * k).map(|q| b[(q % k) * n + q / k]).collect();
            let at: Vec<f32> = (0..k * m).map(|q| a[(q % m) * k + q / m]).collect();
            let cases = [
                (matrix(&a, [k, 1]), matrix(&b, [n, 1])),
                (matrix(&at, [1, m]), matrix(&bt, [1, k])),
            ];
            let check = |got: &[f32]| {
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                        "[{m}, {k}, {n}]: {g} {w}"
                    );
                }
            };
            // SAFETY (each call): the operands hold [m, k] and [k, n] values at their
            // strides; `got` holds m rows of n.
            for (lhs, rhs) in cases {
                let mut got = values(m * n, 3);
                unsafe { gemm(SharedMut::new(got.as_mut_ptr()), n, lhs, rhs, [m, k, n]) };
                check(&got);
            }
            // bf16 weights, and strides of neither kind (every other value of a wider buffer).
            let mut got = values(m * n, 3);
            let (lhs, rhs) = (matrix(&a, [k, 1]), matrix(&br, [n, 1]));
            unsafe { gemm(SharedMut::new(got.as_mut_ptr()), n, lhs, rhs, [m, k, n]) };
            check(&got);
            let spread: Vec<f32> = a.iter().flat_map(|&v| [v, f32::NAN]).collect();
            let mut got = values(m * n, 3);
            let (lhs, rhs) = (matrix(&spread, [2 * k, 2]), matrix(&bt, [1, k]));
            unsafe { gemm(SharedMut::new(got.as_mut_ptr()), n, lhs, rhs, [m, k, n]) };
            check(&got);
        }
    }
}
