//! The losses HF heads compute, with PyTorch's reductions (means over the counted elements).

use burn::tensor::{activation, backend::Backend, Int, Tensor};

/// The label value that cross entropy skips (PyTorch's `ignore_index` default).
pub use ember_kernels::IGNORE_INDEX;

/// Mean cross entropy of `logits` `[n, classes]` against class ids `labels` `[n]`, skipping
/// labels equal to `-100`. Returns `[1]`; 0 when every label is skipped (PyTorch gives NaN).
pub fn cross_entropy<B: Backend>(logits: Tensor<B, 2>, labels: Tensor<B, 1, Int>) -> Tensor<B, 1> {
    // On the CPU: one `log Σ exp` per row and a backward pass of its own, instead of a
    // log-probability tensor the size of the logits.
    if let Some(loss) = ember_kernels::cross_entropy(&logits, &labels) {
        return loss;
    }
    let kept = labels.clone().not_equal_elem(IGNORE_INDEX);
    let safe = labels.mask_fill(kept.clone().bool_not(), 0);
    let log_probs = activation::log_softmax(logits, 1);
    let picked = log_probs
        .gather(1, safe.unsqueeze_dim::<2>(1))
        .squeeze_dim::<1>(1);
    let kept = kept.float();
    let count = kept.clone().sum().clamp_min(1.0);
    (picked * kept).sum().neg() / count
}

/// Mean binary cross entropy with logits (multi-label classification), computed in the
/// numerically stable form `max(x, 0) - x·t + log(1 + e^-|x|)`.
pub fn binary_cross_entropy_with_logits<B: Backend, const D: usize>(
    logits: Tensor<B, D>,
    targets: Tensor<B, D>,
) -> Tensor<B, 1> {
    let positive = logits.clone().clamp_min(0.0);
    let soft = logits.clone().abs().neg().exp().log1p();
    (positive - logits * targets + soft).mean()
}

/// Mean squared error (regression).
pub fn mse<B: Backend, const D: usize>(
    predictions: Tensor<B, D>,
    targets: Tensor<B, D>,
) -> Tensor<B, 1> {
    (predictions - targets).powi_scalar(2).mean()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;
    type B = burn::backend::Flex;

    #[test]
    fn cross_entropy_skips_ignored_labels() {
        let device = Default::default();
        let logits = Tensor::<B, 2>::from_data(
            TensorData::from([[2.0f32, 0.0], [0.0, 1.0], [5.0, -5.0]]),
            &device,
        );
        let labels = Tensor::<B, 1, Int>::from_data(TensorData::from([0i64, 1, -100]), &device);
        let loss: f32 = cross_entropy(logits, labels).into_scalar();
        // -(log σ(2) + log σ(1)) / 2, σ the logistic function.
        let want = ((1.0f32 + (-2.0f32).exp()).ln() + (1.0f32 + (-1.0f32).exp()).ln()) / 2.0;
        assert!((loss - want).abs() < 1e-6, "{loss} vs {want}");
    }

    #[test]
    fn bce_and_mse() {
        let device = Default::default();
        let x = Tensor::<B, 2>::from_data(TensorData::from([[0.0f32, 100.0]]), &device);
        let t = Tensor::<B, 2>::from_data(TensorData::from([[1.0f32, 1.0]]), &device);
        let bce: f32 = binary_cross_entropy_with_logits(x.clone(), t.clone()).into_scalar();
        assert!((bce - std::f32::consts::LN_2 / 2.0).abs() < 1e-6, "{bce}");
        let err: f32 = mse(x, t).into_scalar();
        assert!((err - (1.0 + 99.0 * 99.0) / 2.0).abs() < 1e-3, "{err}");
    }
}
