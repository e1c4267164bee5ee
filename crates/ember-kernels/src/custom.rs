//! Operations whose values and gradient are computed by the caller.
//!
//! Tensor parallel training needs two operations that burn cannot record from its own
//! operations: Megatron's `f` (the identity in the forward pass, an all-reduce of the gradient
//! in the backward pass) and `g` (an all-reduce in the forward pass, the identity backward).
//! Both are maps of a tensor's values onto a tensor of the same shape, where the forward and
//! the backward maps are the caller's (here: collectives over other ranks). [`map_values`]
//! records such a map as one operation under burn's autodiff on Flex.

use crate::bridge;
use burn::tensor::{backend::Backend, Tensor};
use std::fmt;
use std::sync::Arc;

/// A function that changes f32 values in place.
pub type ValuesFn = dyn Fn(&mut [f32]) + Send + Sync;

/// A map applied in place to a tensor's f32 values (row-major, contiguous): in the backward
/// pass of [`map_values`], to the gradient reaching the result, before it goes on to the input.
#[derive(Clone)]
pub struct GradientMap(pub Arc<ValuesFn>);

impl GradientMap {
    /// The identity (the gradient passes unchanged).
    pub fn identity() -> Self {
        Self(Arc::new(|_| {}))
    }
}

impl fmt::Debug for GradientMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GradientMap")
    }
}

/// `x` with `forward` applied in place to a copy of its f32 values (row-major), recorded so
/// that under autodiff the gradient reaching the result goes through `backward` on its way
/// to `x`.
///
/// Runs where `B` is Flex (no gradient) or Flex under burn's autodiff and `x` is f32; returns
/// `None` elsewhere, where the caller uses burn's own operations (for a map whose backward is
/// not the identity there are none, which the caller reports). An error from `forward` is
/// returned as it is.
pub fn map_values<B: Backend, const D: usize, E>(
    x: &Tensor<B, D>,
    forward: impl FnOnce(&mut [f32]) -> Result<(), E>,
    backward: GradientMap,
) -> Option<Result<Tensor<B, D>, E>> {
    if let Some(f) = bridge::flex(x) {
        return Some(mapped(&f, forward).map(bridge::wrap));
    }
    #[cfg(feature = "autodiff")]
    if let Some(a) = crate::tracked::ad(x) {
        return Some(
            mapped(&a.primitive, forward)
                .map(|out| crate::tracked::wrap(tracked::record(&a, out, backward))),
        );
    }
    let _ = backward;
    None
}

/// A contiguous copy of `t` with `forward` applied to its values.
fn mapped<E>(
    t: &burn_flex::FlexTensor,
    forward: impl FnOnce(&mut [f32]) -> Result<(), E>,
) -> Result<burn_flex::FlexTensor, E> {
    let shape = t.layout().shape().to_vec();
    let rows = bridge::rows(t);
    let mut values = bridge::contiguous(&rows).expect("made contiguous").to_vec();
    forward(&mut values)?;
    Ok(bridge::from_vec(values, &shape))
}

#[cfg(feature = "autodiff")]
mod tracked {
    use super::{mapped, GradientMap};
    use crate::tracked::{give, record as record_op, wanted, AdTensor};
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops};
    use burn_flex::{Flex, FlexTensor};

    /// Records `out` as the map of `x` whose backward pass is `backward`.
    pub(super) fn record(x: &AdTensor, out: FlexTensor, backward: GradientMap) -> AdTensor {
        record_op(MapBackward, [x], backward, out)
    }

    /// The gradient of a [`super::map_values`]: the caller's map of the incoming gradient.
    #[derive(Debug)]
    struct MapBackward;

    impl Backward<Flex, 1> for MapBackward {
        type State = GradientMap;

        fn backward(self, ops: Ops<GradientMap, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let ids = wanted(&ops);
            let dy = grads.consume::<Flex>(&ops.node);
            let map = ops.state;
            give(grads, ids[0], || {
                mapped(&dy, |g| {
                    (map.0)(g);
                    Ok::<(), std::convert::Infallible>(())
                })
                .unwrap_or_else(|never| match never {})
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::TensorData;

    /// The forward map gives the values, the backward map the gradient, on both Flex paths.
    #[test]
    fn forward_and_backward_maps_apply() {
        type Ad = Autodiff<Flex>;
        let device = Default::default();
        let data = TensorData::new(vec![1.0f32, -2.0, 3.0, 4.0, 5.0, 6.0], [2, 3]);
        let x = Tensor::<Ad, 2>::from_data(data.clone(), &device).require_grad();
        let double = |v: &mut [f32]| {
            v.iter_mut().for_each(|v| *v *= 2.0);
            Ok::<(), ()>(())
        };
        let y = map_values(&x, double, GradientMap(Arc::new(|g| g.fill(7.0))))
            .unwrap()
            .unwrap();
        assert_eq!(
            y.clone().inner().into_data().to_vec::<f32>().unwrap(),
            vec![2.0, -4.0, 6.0, 8.0, 10.0, 12.0]
        );
        let grads = (y * 3.0).sum().backward();
        let g = x.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap();
        assert_eq!(g, vec![7.0; 6]);

        let plain = Tensor::<Flex, 2>::from_data(data, &device);
        let y = map_values(&plain, double, GradientMap::identity())
            .unwrap()
            .unwrap();
        assert_eq!(y.into_data().to_vec::<f32>().unwrap()[1], -4.0);
        // The forward map's error comes back as it is.
        let failed = map_values(&plain, |_| Err("down"), GradientMap::identity()).unwrap();
        assert_eq!(failed.unwrap_err(), "down");
    }
}
