//! Products with a weight that is not a burn tensor: a frozen base held in a format of its own
//! (a packed 4-bit or int8 weight), read by its owner's kernels.
//!
//! burn cannot hold a 4-bit weight in a tensor (its quantized tensors store a byte per value
//! on the CPU and have no NF4 code book), so a quantized layer keeps its bytes itself and hands
//! this module the two products a model needs: `x · W` forward and `dy · Wᵀ` backward. On Flex
//! the product runs on the tensors' f32 buffers; under autodiff it is one recorded operation
//! whose backward pass gives only the input's gradient (the weight is frozen: QLoRA trains
//! adapters beside it). Other backends get `None` and dequantize the weight into a tensor.

use crate::bridge;
use burn::tensor::{backend::Backend, Tensor};
use burn_flex::FlexTensor;
use std::fmt::Debug;
use std::sync::Arc;

/// A frozen `[d_in, d_out]` weight that computes its own products on f32 rows.
pub trait FrozenWeight: Debug + Send + Sync {
    /// `[d_in, d_out]`: the layer's input and output widths.
    fn dims(&self) -> [usize; 2];

    /// `out += x · W` for `x: [rows, d_in]` and `out: [rows, d_out]`, row-major.
    fn forward_rows(&self, x: &[f32], rows: usize, out: &mut [f32]);

    /// `grad_in += grad_out · Wᵀ` for `grad_out: [rows, d_out]` and `grad_in: [rows, d_in]`.
    fn backward_rows(&self, grad_out: &[f32], rows: usize, grad_in: &mut [f32]);
}

/// `x · W` for `x: [rows, d_in]` and a frozen weight, on Flex (also under autodiff, where the
/// backward pass gives `x` its gradient). `None` on other backends, for other dtypes, or when
/// `x`'s width is not the weight's `d_in`.
pub fn frozen_linear<B: Backend>(
    x: &Tensor<B, 2>,
    weight: &Arc<dyn FrozenWeight>,
) -> Option<Tensor<B, 2>> {
    #[cfg(feature = "autodiff")]
    if bridge::is_autodiff_flex::<B>() {
        return tracked::frozen_linear(x, weight);
    }
    let xf = bridge::flex(x)?;
    Some(bridge::wrap(forward_flex(&xf, weight.as_ref())?))
}

/// The forward product on a Flex tensor; `None` when the width does not fit.
fn forward_flex(x: &FlexTensor, weight: &dyn FrozenWeight) -> Option<FlexTensor> {
    let [d_in, d_out] = weight.dims();
    let shape = x.layout().shape();
    let (rows, width) = (shape[0], shape[1]);
    if width != d_in {
        return None;
    }
    let x = bridge::rows(x);
    let mut out = vec![0.0f32; rows * d_out];
    weight.forward_rows(bridge::contiguous(&x)?, rows, &mut out);
    Some(bridge::from_vec(out, &[rows, d_out]))
}

#[cfg(feature = "autodiff")]
mod tracked {
    use super::{forward_flex, FrozenWeight};
    use crate::bridge;
    use crate::tracked::{ad, record, wrap};
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops};
    use burn::tensor::{backend::Backend, Tensor};
    use burn_flex::Flex;
    use std::sync::Arc;

    /// [`super::frozen_linear`] under autodiff: one recorded operation with `x` as its only
    /// parent.
    pub(super) fn frozen_linear<B: Backend>(
        x: &Tensor<B, 2>,
        weight: &Arc<dyn FrozenWeight>,
    ) -> Option<Tensor<B, 2>> {
        let xa = ad(x)?;
        let out = forward_flex(&xa.primitive, weight.as_ref())?;
        Some(wrap(record(FrozenBackward, [&xa], Arc::clone(weight), out)))
    }

    /// Backward pass of `y = x · W` with `W` frozen: `dx = dy · Wᵀ`.
    #[derive(Debug)]
    struct FrozenBackward;

    impl Backward<Flex, 1> for FrozenBackward {
        type State = Arc<dyn FrozenWeight>;

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let dy = grads.consume::<Flex>(&ops.node);
            let Some(id) = ops.parents[0].as_ref().map(|n| n.id) else {
                return;
            };
            let weight = ops.state;
            let [d_in, d_out] = weight.dims();
            let dy = bridge::rows(&dy);
            let dy = bridge::contiguous(&dy).expect("made contiguous");
            let rows = dy.len() / d_out.max(1);
            let mut dx = vec![0.0f32; rows * d_in];
            weight.backward_rows(dy, rows, &mut dx);
            grads.register::<Flex>(id, bridge::from_vec(dx, &[rows, d_in]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{Distribution, TensorData};

    /// A dense weight behind the trait, to check the plumbing against burn's matmul.
    #[derive(Debug)]
    struct Dense {
        w: Vec<f32>,
        dims: [usize; 2],
    }

    impl FrozenWeight for Dense {
        fn dims(&self) -> [usize; 2] {
            self.dims
        }

        fn forward_rows(&self, x: &[f32], rows: usize, out: &mut [f32]) {
            let [k, n] = self.dims;
            for r in 0..rows {
                for j in 0..n {
                    out[r * n + j] += (0..k)
                        .map(|i| x[r * k + i] * self.w[i * n + j])
                        .sum::<f32>();
                }
            }
        }

        fn backward_rows(&self, dy: &[f32], rows: usize, dx: &mut [f32]) {
            let [k, n] = self.dims;
            for r in 0..rows {
                for i in 0..k {
                    dx[r * k + i] += (0..n)
                        .map(|j| dy[r * n + j] * self.w[i * n + j])
                        .sum::<f32>();
                }
            }
        }
    }

    #[test]
    fn forward_and_input_gradient_equal_burns() {
        let device = Default::default();
        let w = Tensor::<Flex, 2>::random([5, 3], Distribution::Normal(0.0, 1.0), &device);
        let values = w.to_data().to_vec::<f32>().unwrap();
        let frozen: Arc<dyn FrozenWeight> = Arc::new(Dense {
            w: values,
            dims: [5, 3],
        });
        let x = Tensor::<Flex, 2>::random([4, 5], Distribution::Normal(0.0, 1.0), &device);
        let got = frozen_linear(&x, &frozen).unwrap();
        let want = x.clone().matmul(w.clone());
        got.to_data()
            .assert_approx_eq::<f32>(&want.to_data(), burn::tensor::Tolerance::default());

        type A = Autodiff<Flex>;
        let xa = Tensor::<A, 2>::from_data(x.to_data(), &device).require_grad();
        let y = frozen_linear(&xa, &frozen).unwrap();
        let grads = (y * Tensor::<A, 2>::from_data(
            TensorData::new((0..12).map(|i| i as f32).collect::<Vec<_>>(), [4, 3]),
            &device,
        ))
        .sum()
        .backward();
        let got = xa.grad(&grads).unwrap();
        let xb = Tensor::<A, 2>::from_data(x.to_data(), &device).require_grad();
        let wb = Tensor::<A, 2>::from_data(w.to_data(), &device);
        let grads = (xb.clone().matmul(wb)
            * Tensor::<A, 2>::from_data(
                TensorData::new((0..12).map(|i| i as f32).collect::<Vec<_>>(), [4, 3]),
                &device,
            ))
        .sum()
        .backward();
        let want = xb.grad(&grads).unwrap();
        got.to_data()
            .assert_approx_eq::<f32>(&want.to_data(), burn::tensor::Tolerance::default());
    }
}
