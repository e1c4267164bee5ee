//! A linear layer as one GEMM that starts from the bias.

use crate::bridge;
use burn::tensor::{backend::Backend, Tensor};
use burn_flex::FlexTensor;

/// Below this many multiply-adds a GEMM runs on the calling thread (Flex's own threshold).
const PARALLEL_WORK: usize = 192 * 192 * 192;

/// `x · weight + bias` for `x: [rows, d_in]` and `weight: [d_in, d_out]` (burn's layout).
///
/// The output buffer is filled with the bias rows and the GEMM accumulates into it, so the bias
/// costs one write instead of Flex's strided broadcast add (about 6x a contiguous add). Any
/// strides are read in place, so a transposed view (a tied output matrix) is not copied.
/// `None` when `B` is not Flex or the tensors are not f32.
pub fn linear<B: Backend>(
    x: &Tensor<B, 2>,
    weight: &Tensor<B, 2>,
    bias: Option<&Tensor<B, 1>>,
) -> Option<Tensor<B, 2>> {
    let xf = bridge::flex(x)?;
    let wf = bridge::flex(weight)?;
    let bf = match bias {
        Some(b) => Some(bridge::rows(&bridge::flex(b)?)),
        None => None,
    };
    let [m, k] = dims2(&xf);
    let [k2, n] = dims2(&wf);
    if k != k2 || bf.as_ref().is_some_and(|b| b.layout().num_elements() != n) {
        return None;
    }
    let mut out = vec![0.0f32; m * n];
    if let Some(b) = &bf {
        let b = bridge::contiguous(b)?;
        for row in out.chunks_exact_mut(n) {
            row.copy_from_slice(b);
        }
    }
    gemm_into(&mut out, &xf, &wf, [m, k, n], bf.is_some());
    Some(bridge::wrap(bridge::from_vec(out, &[m, n])))
}

/// `[rows, cols]` of a 2-D tensor.
fn dims2(t: &FlexTensor) -> [usize; 2] {
    let s = t.layout().shape();
    [s[0], s[1]]
}

/// `out (+)= lhs · rhs` over the tensors' own strides; `accumulate` keeps what `out` holds.
fn gemm_into(out: &mut [f32], lhs: &FlexTensor, rhs: &FlexTensor, [m, k, n]: [usize; 3], accumulate: bool) {
    let (ls, rs) = (lhs.layout().strides(), rhs.layout().strides());
    let lhs_data = lhs.storage::<f32>();
    let rhs_data = rhs.storage::<f32>();
    let parallelism = if m * n * k >= PARALLEL_WORK {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the pointers address the tensors' own buffers at their layouts' start offsets,
    // and every element the strides reach lies inside those buffers (burn checked the layouts
    // when it built the views); `out` holds m · n values written row-major.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs_data.as_ptr().add(lhs.layout().start_offset()),
            ls[1],
            ls[0],
            rhs_data.as_ptr().add(rhs.layout().start_offset()),
            rs[1],
            rs[0],
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{Distribution, Tolerance};

    #[test]
    fn equals_matmul_plus_bias_for_plain_and_transposed_weights() {
        let device = Default::default();
        let x = Tensor::<Flex, 2>::random([37, 50], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<Flex, 2>::random([50, 70], Distribution::Normal(0.0, 1.0), &device);
        let b = Tensor::<Flex, 1>::random([70], Distribution::Normal(0.0, 1.0), &device);
        let want = x.clone().matmul(w.clone()) + b.clone().unsqueeze_dim(0);
        let got = linear(&x, &w, Some(&b)).unwrap();
        got.into_data()
            .assert_approx_eq::<f32>(&want.into_data(), Tolerance::rel_abs(1e-5, 1e-5));
        // A tied output matrix: the embedding `[vocab, d]` read as `[d, vocab]`.
        let table = Tensor::<Flex, 2>::random([70, 50], Distribution::Normal(0.0, 1.0), &device);
        let want = x.clone().matmul(table.clone().transpose());
        let got = linear(&x, &table.transpose(), None).unwrap();
        got.into_data()
            .assert_approx_eq::<f32>(&want.into_data(), Tolerance::rel_abs(1e-5, 1e-5));
    }

    #[test]
    fn large_products_run_in_parallel_with_the_same_result() {
        let device = Default::default();
        let x = Tensor::<Flex, 2>::random([256, 192], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<Flex, 2>::random([192, 256], Distribution::Normal(0.0, 1.0), &device);
        let want = x.clone().matmul(w.clone());
        let got = linear(&x, &w, None).unwrap();
        got.into_data()
            .assert_approx_eq::<f32>(&want.into_data(), Tolerance::rel_abs(1e-5, 1e-5));
    }

    #[test]
    fn mismatched_shapes_are_left_to_burn() {
        let device = Default::default();
        let x = Tensor::<Flex, 2>::zeros([2, 3], &device);
        let w = Tensor::<Flex, 2>::zeros([4, 5], &device);
        assert!(linear(&x, &w, None).is_none());
        let w = Tensor::<Flex, 2>::zeros([3, 5], &device);
        let b = Tensor::<Flex, 1>::zeros([4], &device);
        assert!(linear(&x, &w, Some(&b)).is_none());
    }
}
