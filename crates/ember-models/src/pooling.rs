//! Sentence embeddings from an encoder's `last_hidden_state`, as sentence-transformers computes
//! them.

use burn::tensor::{backend::Backend, Int, Tensor};

/// The attention-masked mean of `last_hidden_state` `[batch, seq, hidden]` over the sequence:
/// padding tokens (mask 0) are left out. A row with no real token gives zeros.
pub fn mean_pooling<B: Backend>(
    last_hidden_state: Tensor<B, 3>,
    attention_mask: Tensor<B, 2, Int>,
) -> Tensor<B, 2> {
    let mask = attention_mask.float().unsqueeze_dim::<3>(2);
    let summed = (last_hidden_state * mask.clone())
        .sum_dim(1)
        .squeeze_dim::<2>(1);
    // sentence-transformers clamps the token count at 1e-9.
    let counts = mask.sum_dim(1).squeeze_dim::<2>(1).clamp_min(1e-9);
    summed / counts
}

/// Each row divided by its L2 norm (`torch.nn.functional.normalize`, eps 1e-12).
pub fn l2_normalize<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let norm = x.clone().powi_scalar(2).sum_dim(1).sqrt().clamp_min(1e-12);
    x / norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;
    type B = burn::backend::Flex;

    #[test]
    fn padding_is_left_out_and_rows_have_unit_norm() {
        let device = Default::default();
        let h =
            Tensor::<B, 3>::from_data(TensorData::from([[[3.0f32, 4.0], [100.0, 100.0]]]), &device);
        let m = Tensor::<B, 2, Int>::from_data(TensorData::from([[1i64, 0]]), &device);
        let mean = mean_pooling(h, m);
        assert_eq!(
            mean.clone().into_data().to_vec::<f32>().unwrap(),
            [3.0, 4.0]
        );
        assert_eq!(
            l2_normalize(mean).into_data().to_vec::<f32>().unwrap(),
            [0.6, 0.8]
        );
    }
}
