//! `torch.autocast` for Ember's models: mixed-precision forward and backward passes.
//!
//! Inside an [`autocast`] region the matmul-like operations (linear layers, attention) behave
//! as torch runs them under `torch.autocast(dtype=bfloat16 | float16)`: their operands and
//! their result are rounded to the half-precision dtype while the products accumulate in f32,
//! and in the backward pass the gradient reaching each rounded tensor is rounded too, as a
//! torch half tensor receives a half gradient. Everything else (embeddings, norms, softmax
//! inside attention, losses, the residual stream) stays in f32, as torch keeps it on the CPU.
//! float16 rounding overflows to infinity beyond 65504 exactly as torch's float16 does, so a
//! loss scaler sees the same overflows (see `ember_train::GradScaler`).
//!
//! The rounded values are kept in f32 tensors ([`round_to`]): burn has no type promotion
//! between dtypes, and Flex computes every half-precision operation by way of f32 anyway. In
//! bf16 on a CPU with AVX512_BF16 the linear layers skip those roundings: the bf16 GEMM rounds
//! its operands as it packs them ([`crate::autocast_linear`]), the same values at 1.6-1.8x the
//! f32 GEMM's rate.
//!
//! The region is per thread, as torch's autocast state is: a model's forward pass that
//! [`crate::on_worker`] moves into rayon's pool takes the caller's state along.

use burn::tensor::{backend::Backend, bf16, f16, DType, Tensor};
use burn_flex::FlexTensor;
use std::cell::Cell;
use std::marker::PhantomData;

use crate::bridge;

thread_local! {
    static AUTOCAST: Cell<Option<DType>> = const { Cell::new(None) };
}

/// Enters an autocast region in `dtype` (`DType::BF16` or `DType::F16`; any other dtype turns
/// autocast off) until the returned guard is dropped, which restores the previous state.
///
/// ```
/// use burn::tensor::DType;
/// let guard = ember_kernels::autocast(DType::BF16);
/// assert_eq!(ember_kernels::autocast_dtype(), Some(DType::BF16));
/// drop(guard);
/// assert_eq!(ember_kernels::autocast_dtype(), None);
/// ```
pub fn autocast(dtype: DType) -> AutocastGuard {
    let dtype = matches!(dtype, DType::BF16 | DType::F16).then_some(dtype);
    enter(dtype)
}

/// Sets the state to `dtype` (`None`: off) until the guard is dropped.
pub(crate) fn enter(dtype: Option<DType>) -> AutocastGuard {
    AutocastGuard {
        previous: AUTOCAST.with(|state| state.replace(dtype)),
        not_send: PhantomData,
    }
}

/// The half-precision dtype of the enclosing [`autocast`] region on this thread, if any.
pub fn autocast_dtype() -> Option<DType> {
    AUTOCAST.with(Cell::get)
}

/// Restores the autocast state that [`autocast`] replaced when dropped. It stays on the thread
/// that made it (the state is per thread).
#[must_use = "autocast ends when the guard is dropped"]
pub struct AutocastGuard {
    previous: Option<DType>,
    not_send: PhantomData<*const ()>,
}

impl Drop for AutocastGuard {
    fn drop(&mut self) {
        AUTOCAST.with(|state| state.set(self.previous));
    }
}

/// `t` as an autocast operand or result: rounded to the region's dtype with [`round_to`]
/// inside an [`autocast`] region, unchanged outside one (or when `t` is not f32).
pub fn autocast_round<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    match autocast_dtype() {
        Some(dtype) if t.dtype() == DType::F32 => round_to(t, dtype),
        _ => t,
    }
}

/// The f32 values of `t` rounded to the nearest `dtype` value (bfloat16 or float16, ties to
/// even, float16 overflowing to infinity), still in f32; under autodiff the gradient is
/// rounded the same way on its way back. This is torch's `x.to(half)` followed by the half
/// operation's f32 arithmetic, and `.to(half)`'s backward, in one recorded operation.
pub fn round_to<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if !matches!(dtype, DType::BF16 | DType::F16) || t.dtype() != DType::F32 {
        return t;
    }
    #[cfg(feature = "autodiff")]
    if bridge::is_autodiff_flex::<B>() {
        if let Some(rounded) = tracked::round_to(&t, dtype) {
            return rounded;
        }
    }
    if let Some(f) = bridge::flex(&t) {
        return bridge::wrap(round_flex(&f, dtype));
    }
    // Elsewhere burn's casts: the backward of a cast to f32 casts the gradient back to the
    // half dtype, which is the rounding wanted.
    t.cast(dtype).cast(DType::F32)
}

/// A contiguous f32 Flex tensor of `t`'s values rounded to `dtype`.
pub(crate) fn round_flex(t: &FlexTensor, dtype: DType) -> FlexTensor {
    let t = bridge::rows(t);
    let shape = t.layout().shape().to_vec();
    let values = match dtype {
        DType::BF16 => crate::dtype::map_values(&t, |v: f32| bf16::from_f32(v).to_f32()),
        DType::F16 => crate::dtype::map_values(&t, |v: f32| f16::from_f32(v).to_f32()),
        other => unreachable!("round_flex called for {other:?}"),
    };
    bridge::from_vec(values, &shape)
}

#[cfg(feature = "autodiff")]
mod tracked {
    use super::round_flex;
    use crate::tracked::{ad, give, record, wanted, wrap};
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops};
    use burn::tensor::{backend::Backend, DType, Tensor};
    use burn_flex::Flex;

    /// [`super::round_to`] under autodiff on Flex: one recorded operation.
    pub(super) fn round_to<B: Backend, const D: usize>(
        t: &Tensor<B, D>,
        dtype: DType,
    ) -> Option<Tensor<B, D>> {
        let a = ad(t)?;
        let out = round_flex(&a.primitive, dtype);
        Some(wrap(record(RoundBackward { dtype }, [&a], (), out)))
    }

    /// The gradient of a rounding: the incoming gradient, rounded to the same dtype.
    #[derive(Debug)]
    struct RoundBackward {
        dtype: DType,
    }

    impl Backward<Flex, 1> for RoundBackward {
        type State = ();

        fn backward(self, ops: Ops<(), 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let ids = wanted(&ops);
            let dy = grads.consume::<Flex>(&ops.node);
            give(grads, ids[0], || round_flex(&dy, self.dtype));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::TensorData;

    fn values<B: Backend>(t: Tensor<B, 1>) -> Vec<f32> {
        t.into_data().to_vec().unwrap()
    }

    #[test]
    fn rounds_forward_and_backward_as_torch_half_tensors() {
        type Ad = Autodiff<Flex>;
        let device = Default::default();
        let x = [1.0 + 2f32.powi(-8), -3.3, 7e4, 0.1];
        for dtype in [DType::BF16, DType::F16] {
            let round = |v: f32| match dtype {
                DType::BF16 => bf16::from_f32(v).to_f32(),
                _ => f16::from_f32(v).to_f32(),
            };
            let t = Tensor::<Ad, 1>::from_data(TensorData::new(x.to_vec(), [4]), &device)
                .require_grad();
            let y = round_to(t.clone(), dtype);
            assert_eq!(
                values(y.clone().inner()),
                x.map(round).to_vec(),
                "{dtype:?}"
            );
            // d(sum(y * w)) / dx = round(w): the gradient reaching the rounded tensor is w.
            let w = [0.3f32, 1e5, -2.0 + 2f32.powi(-9), 1.0];
            let wt = Tensor::<Ad, 1>::from_data(TensorData::new(w.to_vec(), [4]), &device);
            let grads = (y * wt).sum().backward();
            let g = values(t.grad(&grads).unwrap());
            assert_eq!(g, w.map(round).to_vec(), "{dtype:?}");
        }
        // float16 overflows to infinity both ways (what a loss scaler detects).
        let t = Tensor::<Ad, 1>::from_data(TensorData::new(vec![7e4f32], [1]), &device);
        assert!(values(round_to(t, DType::F16).inner())[0].is_infinite());
    }

    #[test]
    fn every_backend_path_rounds_alike() {
        let device = Default::default();
        let x: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin() * 1e3).collect();
        for dtype in [DType::BF16, DType::F16] {
            let flex = Tensor::<Flex, 1>::from_data(TensorData::new(x.clone(), [1000]), &device);
            let ad =
                Tensor::<Autodiff<Flex>, 1>::from_data(TensorData::new(x.clone(), [1000]), &device);
            let want = values(crate::float32(crate::to_half(flex.clone(), dtype)));
            assert_eq!(values(round_to(flex, dtype)), want);
            assert_eq!(values(round_to(ad, dtype).inner()), want);
        }
    }

    #[test]
    fn the_region_nests_and_ends_with_its_guard() {
        assert_eq!(autocast_dtype(), None);
        let outer = autocast(DType::F16);
        {
            let _inner = autocast(DType::BF16);
            assert_eq!(autocast_dtype(), Some(DType::BF16));
            let _off = autocast(DType::F32);
            assert_eq!(autocast_dtype(), None);
        }
        assert_eq!(autocast_dtype(), Some(DType::F16));
        let t = Tensor::<Flex, 1>::from_data(
            TensorData::new(vec![1e5f32, 0.1], [2]),
            &Default::default(),
        );
        let r = values(autocast_round(t));
        assert!(r[0].is_infinite());
        assert_eq!(r[1], f16::from_f32(0.1).to_f32());
        drop(outer);
        assert_eq!(autocast_dtype(), None);
        // On a rayon worker through on_worker the caller's state holds.
        let _g = autocast(DType::BF16);
        let seen = crate::on_worker::<Flex, _>(autocast_dtype);
        assert_eq!(seen, Some(DType::BF16));
    }
}
