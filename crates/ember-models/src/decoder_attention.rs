//! Causal self-attention over cached and new keys, shared by Bloom and GPT-2: burn's fused
//! `attention` (causal, with the padding mask and an additive bias such as ALiBi), or, while
//! attention dropout is active (training on an autodiff backend), the same computation with
//! the probabilities materialised so that they can be dropped out as HF drops them.

use burn::nn::Dropout;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{activation, backend::Backend, Bool, Tensor};

/// `softmax(q·kᵀ · scale + bias, masked) · v` for `q` `[batch, heads, seq, head_dim]` and keys /
/// values `[batch, heads, past + seq, head_dim]`. The mask (true = masked) and the bias are
/// `[batch, heads, seq, past + seq]`; query `i` sees keys up to `past + i`.
pub(crate) fn causal_self_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<Tensor<B, 4, Bool>>,
    bias: Option<Tensor<B, 4>>,
    scale: f64,
    dropout: &Dropout,
) -> Tensor<B, 4> {
    let device = q.device();
    if dropout.prob == 0.0 || !B::ad_enabled(&device) {
        return attention(
            q,
            k,
            v,
            mask,
            bias,
            AttentionModuleOptions {
                scale: Some(scale),
                is_causal: true,
                ..Default::default()
            },
        );
    }
    let [batch, heads, seq, _] = q.dims();
    let total = k.dims()[2];
    let mut scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale);
    if let Some(bias) = bias {
        scores = scores + bias;
    }
    let future = Tensor::<B, 2, Bool>::tril_mask([seq, total], (total - seq) as i64, &device)
        .reshape([1, 1, seq, total])
        .expand([batch, heads, seq, total]);
    let masked = match mask {
        Some(m) => m.bool_or(future),
        None => future,
    };
    // HF adds the dtype's minimum where a key is masked.
    let probs = activation::softmax(scores.mask_fill(masked, f32::MIN), 3);
    crate::params::apply_dropout(dropout, probs).matmul(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Autodiff;
    use burn::nn::DropoutConfig;
    use burn::tensor::{Distribution, TensorData};

    type B = burn::backend::Flex;

    /// With dropout 0 the explicit path equals the fused one, padding, bias and a cache
    /// included (the explicit path is only taken while dropout is active).
    #[test]
    fn explicit_path_matches_fused_attention() {
        type AB = Autodiff<B>;
        let device = Default::default();
        let r = |shape: [usize; 4]| {
            Tensor::<AB, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device)
        };
        let (q, k, v, bias) = (
            r([2, 3, 4, 5]),
            r([2, 3, 6, 5]),
            r([2, 3, 6, 5]),
            r([2, 3, 4, 6]),
        );
        // Padding among the cached keys; every query still sees key 2 (past = 2).
        let pad = [
            true, true, false, false, false, false, false, true, false, false, false, false,
        ];
        let mask =
            Tensor::<AB, 4, Bool>::from_data(TensorData::new(pad.to_vec(), [2, 1, 1, 6]), &device)
                .expand([2, 3, 4, 6]);
        let fused = causal_self_attention(
            q.clone(),
            k.clone(),
            v.clone(),
            Some(mask.clone()),
            Some(bias.clone()),
            0.4,
            &DropoutConfig::new(0.0).init(),
        );
        // A dropout that is active but never fires still takes the explicit path.
        let explicit = causal_self_attention(
            q,
            k,
            v,
            Some(mask),
            Some(bias),
            0.4,
            &DropoutConfig::new(1e-30).init(),
        );
        let diff = (fused - explicit).abs().max().into_scalar();
        assert!(diff < 1e-5, "{diff}");
    }
}
