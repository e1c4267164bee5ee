//! Cross entropy over rows of logits in two passes per row, without a `log_softmax` tensor.
//!
//! burn's `log_softmax` + `gather` materialises a log-probability tensor the size of the logits
//! and records half a dozen operations on it; a causal LM's logits are `tokens × vocabulary`
//! (2,048 × 49,152 floats, 400 MB, for SmolLM2 at batch 8 × 256), so each extra pass costs
//! more than the loss is worth. Here the forward pass keeps one `log Σ exp` per row, and the
//! backward pass writes `softmax - onehot` straight into the gradient.

use crate::{bridge, math, norm};
use burn::tensor::{backend::Backend, Int, Tensor};
use burn_flex::FlexTensor;
use rayon::prelude::*;

/// The class id that cross entropy skips (PyTorch's `ignore_index` default).
pub const IGNORE_INDEX: i64 = -100;

/// Mean cross entropy of the rows of `logits` (`[..., classes]`, read as rows of the last
/// dimension) against one class id per row in `targets`, skipping rows whose id is
/// [`IGNORE_INDEX`]: PyTorch's `cross_entropy(reduction="mean", ignore_index=-100)`. Returns
/// `[1]`; 0 when every row is skipped (PyTorch gives NaN).
///
/// `None` when the kernel does not apply (see the crate docs), when `targets` does not hold
/// one id per row, or when an id lies outside `0..classes`.
pub fn cross_entropy<B: Backend, const D: usize>(
    logits: &Tensor<B, D>,
    targets: &Tensor<B, 1, Int>,
) -> Option<Tensor<B, 1>> {
    if !(bridge::is_flex::<B>() || bridge::is_autodiff_flex::<B>()) {
        return None;
    }
    let targets: Vec<i64> = targets
        .clone()
        .into_data()
        .convert::<i64>()
        .into_vec()
        .ok()?;
    #[cfg(feature = "autodiff")]
    if bridge::is_autodiff_flex::<B>() {
        return crate::tracked::cross_entropy(logits, targets);
    }
    let rows = bridge::rows(&bridge::flex(logits)?);
    let summary = Summary::of(&rows, &targets)?;
    Some(bridge::wrap(bridge::from_vec(vec![summary.loss], &[1])))
}

/// What the forward pass finds: the mean loss, each row's `log Σ exp` and the rows counted.
#[derive(Debug, Clone)]
pub(crate) struct Summary {
    /// The mean over counted rows (0 when none is counted).
    pub(crate) loss: f32,
    /// `log Σ exp` of each row.
    pub(crate) lse: Vec<f32>,
    /// Rows whose target is not [`IGNORE_INDEX`].
    pub(crate) counted: usize,
}

impl Summary {
    /// The loss of contiguous `logits` against `targets`; `None` when they do not fit.
    pub(crate) fn of(logits: &FlexTensor, targets: &[i64]) -> Option<Self> {
        let classes = *logits.layout().shape().last()?;
        let xs = bridge::contiguous(logits)?;
        let rows = targets.len();
        let fits = |&t: &i64| t == IGNORE_INDEX || (0..classes as i64).contains(&t);
        if classes == 0 || xs.len() != rows * classes || !targets.iter().all(fits) {
            return None;
        }
        let mut lse = vec![0.0f32; rows];
        let per_task = norm::rows_per_task(rows, classes);
        lse.par_chunks_mut(per_task)
            .enumerate()
            .for_each(|(task, out)| {
                let first = task * per_task * classes;
                let values = &xs[first..first + out.len() * classes];
                math::log_sum_exp_rows(values, classes, out);
            });
        // Summed in row order in f64: the same bits on every run.
        let (mut total, mut counted) = (0.0f64, 0usize);
        for (row, (&t, &l)) in targets.iter().zip(&lse).enumerate() {
            if t != IGNORE_INDEX {
                total += f64::from(l - xs[row * classes + t as usize]);
                counted += 1;
            }
        }
        let loss = if counted == 0 {
            0.0
        } else {
            (total / counted as f64) as f32
        };
        Some(Self { loss, lse, counted })
    }

    /// The gradient with respect to `logits` (contiguous, as given to [`Self::of`]) when the
    /// loss's gradient is `grad`: `grad / counted · (softmax - onehot)` on counted rows, 0 on
    /// skipped ones. Written over the logits' own buffer when nothing else holds it (the
    /// logits are not needed after this), so no second buffer of their size is allocated.
    #[cfg_attr(not(feature = "autodiff"), allow(dead_code))]
    pub(crate) fn backward(
        &self,
        mut logits: FlexTensor,
        targets: &[i64],
        grad: f32,
    ) -> FlexTensor {
        let shape: Vec<usize> = logits.layout().shape().to_vec();
        let classes = *shape.last().expect("checked by `of`");
        let scale = grad / self.counted.max(1) as f32;
        let row = |(d, (&t, &lse)): (&mut [f32], (&i64, &f32))| {
            if t == IGNORE_INDEX {
                d.fill(0.0);
            } else {
                math::cross_entropy_backward_in_place(d, lse, t as usize, scale);
            }
        };
        let whole = logits.layout().start_offset() == 0 && logits.layout().is_contiguous();
        if whole {
            if let Some(values) = logits.try_storage_mut::<f32>() {
                values[..targets.len() * classes]
                    .par_chunks_mut(classes)
                    .zip(targets.par_iter().zip(&self.lse))
                    .for_each(row);
                return logits;
            }
        }
        let mut dx = bridge::contiguous(&logits)
            .expect("checked by `of`")
            .to_vec();
        dx.par_chunks_mut(classes)
            .zip(targets.par_iter().zip(&self.lse))
            .for_each(row);
        bridge::from_vec(dx, &shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{activation, Distribution, TensorData};

    /// burn's `log_softmax` + `gather`, the models' previous path.
    fn reference(logits: Tensor<Flex, 2>, targets: &[i64]) -> f32 {
        let log_probs = activation::log_softmax(logits, 1);
        let (mut total, mut n) = (0.0f32, 0);
        let lp = log_probs.into_data().to_vec::<f32>().unwrap();
        let classes = lp.len() / targets.len();
        for (row, &t) in targets.iter().enumerate() {
            if t != IGNORE_INDEX {
                total -= lp[row * classes + t as usize];
                n += 1;
            }
        }
        total / n as f32
    }

    #[test]
    fn cross_entropy_equals_log_softmax_and_gather() {
        let device = Default::default();
        let logits = Tensor::<Flex, 2>::random([37, 1001], Distribution::Normal(0.0, 4.0), &device);
        let targets: Vec<i64> = (0..37)
            .map(|i| {
                if i % 5 == 0 {
                    IGNORE_INDEX
                } else {
                    i * 27 % 1001
                }
            })
            .collect();
        let t = Tensor::<Flex, 1, Int>::from_data(TensorData::from(targets.as_slice()), &device);
        let got: f32 = cross_entropy(&logits, &t).unwrap().into_scalar();
        let want = reference(logits, &targets);
        assert!(
            (got - want).abs() < 1e-5 * want.abs().max(1.0),
            "{got} vs {want}"
        );
    }

    #[test]
    fn ids_that_do_not_fit_are_left_to_burn() {
        let device = Default::default();
        let logits = Tensor::<Flex, 2>::zeros([2, 3], &device);
        let ids = |v: [i64; 2]| Tensor::<Flex, 1, Int>::from_data(TensorData::from(v), &device);
        assert!(cross_entropy(&logits, &ids([0, 3])).is_none());
        assert!(cross_entropy(&logits, &ids([0, -1])).is_none());
        let all_skipped: f32 = cross_entropy(&logits, &ids([-100, -100]))
            .unwrap()
            .into_scalar();
        assert_eq!(all_skipped, 0.0);
    }
}
