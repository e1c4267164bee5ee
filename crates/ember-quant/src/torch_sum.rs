//! torch's float32 `sum` / `mean` on the CPU, in torch's summation order.
//!
//! Double quantization stores `offset = absmax.mean()`, and every nested code depends on it, so a
//! bit-exact offset needs torch's exact order of additions, not a plain left-to-right loop. This
//! mirrors `cascade_sum` of `aten/src/ATen/native/cpu/SumKernel.cpp` for a contiguous 1-D tensor:
//! 8-lane vector accumulators (the AVX2 kernel, which torch also runs on AVX-512 CPUs because the
//! sum kernel is not registered for AVX-512), four interleaved rows per accumulator level and a
//! cascade of four levels that is flushed every 16 rows.
//!
//! Limits: torch splits reductions of more than 32768 elements across threads, so beyond that
//! size this matches single-threaded torch only; other instruction sets (e.g. NEON, 4 lanes)
//! change the order too.

use std::ops::Add;

/// Lanes of torch's `Vectorized<float>` in the kernel that runs (AVX2).
const LANES: usize = 8;
/// `ilp_factor` in `row_sum`: independent partial sums.
const ILP: usize = 4;
/// `num_levels` in `multi_row_sum`.
const LEVELS: usize = 4;

/// An accumulator: a scalar or a vector of lanes added lane by lane.
trait Acc: Copy + Add<Output = Self> {
    const ZERO: Self;
}

impl Acc for f32 {
    const ZERO: Self = 0.0;
}

#[derive(Clone, Copy)]
struct Lanes([f32; LANES]);

impl Add for Lanes {
    type Output = Self;
    fn add(self, rhs: Self) -> Self {
        Lanes(std::array::from_fn(|i| self.0[i] + rhs.0[i]))
    }
}

impl Acc for Lanes {
    const ZERO: Self = Lanes([0.0; LANES]);
}

/// `c10::CeilLog2` (1 for `x <= 2`).
fn ceil_log2(x: usize) -> usize {
    if x <= 2 {
        1
    } else {
        (usize::BITS - (x - 1).leading_zeros()) as usize
    }
}

/// `multi_row_sum`: column sums of a `size x ILP` matrix (`load(row, col)`), with the cascade.
fn multi_row_sum<T: Acc>(load: impl Fn(usize, usize) -> T, size: usize) -> [T; ILP] {
    let level_power = 4.max(ceil_log2(size) / LEVELS);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[T::ZERO; ILP]; LEVELS];
    let mut i = 0;
    while i + level_step <= size {
        for _ in 0..level_step {
            for (k, a) in acc[0].iter_mut().enumerate() {
                *a = *a + load(i, k);
            }
            i += 1;
        }
        // Carry each full level into the next; stop at the first level that is not full yet.
        for j in 1..LEVELS {
            let (lower, upper) = acc.split_at_mut(j);
            for (dst, src) in upper[0].iter_mut().zip(lower[j - 1].iter_mut()) {
                *dst = *dst + *src;
                *src = T::ZERO;
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    for row in i..size {
        for (k, a) in acc[0].iter_mut().enumerate() {
            *a = *a + load(row, k);
        }
    }
    for j in 1..LEVELS {
        let level = acc[j];
        for (a, l) in acc[0].iter_mut().zip(level) {
            *a = *a + l;
        }
    }
    acc[0]
}

/// `row_sum`: `size` values as `ILP` interleaved partial sums, the remainder into the first.
fn row_sum<T: Acc>(load: impl Fn(usize) -> T, size: usize) -> T {
    let rows = size / ILP;
    let mut partial = multi_row_sum(|i, k| load(i * ILP + k), rows);
    for i in rows * ILP..size {
        partial[0] = partial[0] + load(i);
    }
    partial[1..].iter().fold(partial[0], |s, p| s + *p)
}

/// torch's `x.sum()` for a contiguous float32 tensor of `x.len()` elements.
pub(crate) fn sum(x: &[f32]) -> f32 {
    let n = x.len();
    // The output starts at zero and the kernel adds its result to it.
    if n >= LANES {
        // `vectorized_inner_sum`: whole vectors through `row_sum`, the tail scalar, then the lanes.
        let vectors = n / LANES;
        let lanes = row_sum(
            |i| Lanes(std::array::from_fn(|l| x[i * LANES + l])),
            vectors,
        );
        let tail = x[vectors * LANES..].iter().fold(0.0f32, |s, v| s + v);
        0.0 + lanes.0.iter().fold(tail, |s, v| s + v)
    } else {
        0.0 + row_sum(|i| x[i], n)
    }
}

/// torch's `x.mean()` for a contiguous float32 tensor: the sum divided by the count in float32.
pub(crate) fn mean(x: &[f32]) -> f32 {
    sum(x) / x.len() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_on_small_integers() {
        for n in 0..300usize {
            let x: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
            let expected: usize = (0..n).map(|i| i % 7).sum();
            assert_eq!(sum(&x), expected as f32, "n = {n}");
        }
    }

    #[test]
    fn order_differs_from_left_to_right() {
        // 1 + 16 * 2^-24: left to right every tiny term is lost against 1.0; torch sums the tiny
        // terms in other lanes first, so they survive.
        let mut x = vec![2f32.powi(-24); 17];
        x[0] = 1.0;
        let naive = x.iter().fold(0.0f32, |s, v| s + v);
        assert_eq!(naive, 1.0);
        assert!(sum(&x) > 1.0);
    }
}
