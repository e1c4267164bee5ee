//! Row-wise normalisations and elementwise activations, one pass each.

use crate::bridge;
use crate::math;
use burn::tensor::{backend::Backend, Tensor};
use burn_flex::FlexTensor;
use rayon::prelude::*;

/// Below this many values a kernel runs on the calling thread.
pub(crate) const PARALLEL_VALUES: usize = 1 << 15;

/// Rows of `cols` values handed to one task: at least `PARALLEL_VALUES / 4` values per task.
pub(crate) fn rows_per_task(rows: usize, cols: usize) -> usize {
    let total = rows * cols;
    if total < PARALLEL_VALUES {
        rows.max(1)
    } else {
        (PARALLEL_VALUES / 4 / cols.max(1)).clamp(1, rows.max(1))
    }
}

/// A new buffer of `len` values in rows of `cols`, filled by `fill(range, block)` for blocks of
/// whole rows in parallel (`range` is the block's place in the buffer).
fn by_row_blocks(
    len: usize,
    cols: usize,
    fill: impl Fn(std::ops::Range<usize>, &mut [f32]) + Sync,
) -> Vec<f32> {
    let mut out = vec![0.0f32; len];
    let per_task = rows_per_task(len / cols, cols) * cols;
    out.par_chunks_mut(per_task)
        .enumerate()
        .for_each(|(task, chunk)| {
            let at = task * per_task..task * per_task + chunk.len();
            fill(at, chunk)
        });
    out
}

/// `LayerNorm(x + residual)` over the last dimension with weight `gamma` and bias `beta`, as
/// `torch.nn.LayerNorm` computes it (biased variance, `eps` inside the square root).
///
/// HF's BERT-family layers end in `LayerNorm(dropout(dense(h)) + residual)`; this does the add
/// and the normalisation in one pass per row. `None` when the kernel does not apply (see the
/// crate docs) or the shapes disagree.
pub fn layer_norm<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    residual: Option<&Tensor<B, D>>,
    gamma: &Tensor<B, 1>,
    beta: Option<&Tensor<B, 1>>,
    eps: f64,
) -> Option<Tensor<B, D>> {
    #[cfg(feature = "autodiff")]
    if bridge::is_autodiff_flex::<B>() {
        return crate::tracked::layer_norm(x, residual, gamma, beta, eps);
    }
    let xf = bridge::flex(x)?;
    let rf = bridge::optional_rows(residual)?;
    let gf = bridge::flex(gamma)?;
    let bf = bridge::optional_rows(beta)?;
    Some(bridge::wrap(layer_norm_flex(
        &xf,
        rf.as_ref(),
        &gf,
        bf.as_ref(),
        eps,
    )?))
}

/// [`layer_norm`] on Flex tensors; `residual` and `beta` are contiguous.
pub(crate) fn layer_norm_flex(
    xf: &FlexTensor,
    rf: Option<&FlexTensor>,
    gf: &FlexTensor,
    bf: Option<&FlexTensor>,
    eps: f64,
) -> Option<FlexTensor> {
    let xf = bridge::rows(xf);
    let shape: Vec<usize> = xf.layout().shape().to_vec();
    let cols = *shape.last()?;
    let gf = bridge::rows(gf);
    let xs = bridge::contiguous(&xf)?;
    if rf.is_some_and(|r| r.layout().shape().to_vec() != shape) {
        return None;
    }
    let rs = match rf {
        Some(r) => Some(bridge::contiguous(r)?),
        None => None,
    };
    let g = bridge::contiguous(&gf).filter(|g| g.len() == cols)?;
    let b = match bf {
        Some(b) => Some(bridge::contiguous(b).filter(|b| b.len() == cols)?),
        None => None,
    };
    if cols == 0 {
        return None;
    }
    let eps = eps as f32;
    let out = by_row_blocks(xs.len(), cols, |at, chunk| {
        let residual = rs.map(|r| &r[at.clone()]);
        math::layer_norm_rows(&xs[at], residual, g, b, eps, chunk);
    });
    Some(bridge::from_vec(out, &shape))
}

/// RMSNorm over the last dimension, as HF's `LlamaRMSNorm`: `x / sqrt(mean(x²) + eps) · gamma`.
pub fn rms_norm<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    gamma: &Tensor<B, 1>,
    eps: f64,
) -> Option<Tensor<B, D>> {
    #[cfg(feature = "autodiff")]
    if bridge::is_autodiff_flex::<B>() {
        return crate::tracked::rms_norm(x, gamma, eps);
    }
    Some(bridge::wrap(rms_norm_flex(
        &bridge::rows(&bridge::flex(x)?),
        &bridge::rows(&bridge::flex(gamma)?),
        eps,
    )?))
}

/// [`rms_norm`] on contiguous Flex tensors.
pub(crate) fn rms_norm_flex(xf: &FlexTensor, gf: &FlexTensor, eps: f64) -> Option<FlexTensor> {
    let shape: Vec<usize> = xf.layout().shape().to_vec();
    let cols = *shape.last()?;
    let xs = bridge::contiguous(xf)?;
    let g = bridge::contiguous(gf).filter(|g| g.len() == cols && cols > 0)?;
    let eps = eps as f32;
    let out = by_row_blocks(xs.len(), cols, |at, chunk| {
        math::rms_norm_rows(&xs[at], g, eps, chunk)
    });
    Some(bridge::from_vec(out, &shape))
}

/// Applies `f` to every value of `x` into a new tensor of the same shape, in parallel chunks.
fn map<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    f: impl Fn(&[f32], &mut [f32]) + Sync,
) -> Option<Tensor<B, D>> {
    Some(bridge::wrap(zip_map(
        &bridge::flex(x)?,
        None,
        |x, _, o| f(x, o),
    )?))
}

/// Applies `f(a, b, out)` to matching chunks of `a` and `b` (of the same shape; `b` optional)
/// into a new tensor of `a`'s shape, in parallel. `None` when the shapes differ.
pub(crate) fn zip_map(
    a: &FlexTensor,
    b: Option<&FlexTensor>,
    f: impl Fn(&[f32], &[f32], &mut [f32]) + Sync,
) -> Option<FlexTensor> {
    let af = bridge::rows(a);
    let shape: Vec<usize> = af.layout().shape().to_vec();
    let bf = b.map(bridge::rows);
    if bf
        .as_ref()
        .is_some_and(|b| b.layout().shape().to_vec() != shape)
    {
        return None;
    }
    let xs = bridge::contiguous(&af)?;
    let ys = match &bf {
        Some(b) => bridge::contiguous(b)?,
        None => &[],
    };
    let mut out = vec![0.0f32; xs.len()];
    out.par_chunks_mut(PARALLEL_VALUES)
        .enumerate()
        .for_each(|(i, o)| {
            let at = i * PARALLEL_VALUES..i * PARALLEL_VALUES + o.len();
            let y = if ys.is_empty() {
                &[][..]
            } else {
                &ys[at.clone()]
            };
            f(&xs[at], y, o)
        });
    Some(bridge::from_vec(out, &shape))
}

/// The exact (erf) GELU of every value, HF's `"gelu"` activation; within 4e-7 · max(1, |x|)
/// of the f64 definition (`libm`'s scalar `erff` is what Flex calls per element).
pub fn gelu_erf<B: Backend, const D: usize>(x: &Tensor<B, D>) -> Option<Tensor<B, D>> {
    #[cfg(feature = "autodiff")]
    if bridge::is_autodiff_flex::<B>() {
        return crate::tracked::gelu_erf(x);
    }
    map(x, math::gelu_slice)
}

/// SwiGLU's gating, `silu(gate) · up`, for Llama's MLP (`act_fn(gate_proj(x)) * up_proj(x)`).
pub fn silu_mul<B: Backend, const D: usize>(
    gate: &Tensor<B, D>,
    up: &Tensor<B, D>,
) -> Option<Tensor<B, D>> {
    #[cfg(feature = "autodiff")]
    if bridge::is_autodiff_flex::<B>() {
        return crate::tracked::silu_mul(gate, up);
    }
    let (gf, uf) = (bridge::flex(gate)?, bridge::flex(up)?);
    Some(bridge::wrap(zip_map(&gf, Some(&uf), math::silu_mul_slice)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{activation, Distribution, Tolerance};

    fn random<const D: usize>(shape: [usize; D]) -> Tensor<Flex, D> {
        Tensor::random(shape, Distribution::Normal(0.5, 2.0), &Default::default())
    }

    /// Equal within 1e-5 relative, or 5e-6 absolute: the values are of order 1-10, and both
    /// sides round differently (summation order, erf approximation).
    fn close<const D: usize>(got: Tensor<Flex, D>, want: Tensor<Flex, D>) {
        got.into_data()
            .assert_approx_eq::<f32>(&want.into_data(), Tolerance::rel_abs(1e-5, 5e-6));
    }

    #[test]
    fn layer_norm_with_residual_equals_burns_layer_norm() {
        // Large enough to run in parallel tasks, with a row length that is not a multiple of 8.
        for shape in [[2, 3, 20], [4, 300, 771]] {
            let (x, r) = (random(shape), random(shape));
            let g = random([shape[2]]);
            let b = random([shape[2]]);
            let mut ln = burn::nn::LayerNormConfig::new(shape[2])
                .with_epsilon(1e-12)
                .init::<Flex>(&Default::default());
            ln.gamma = burn::module::Param::from_tensor(g.clone());
            ln.beta = Some(burn::module::Param::from_tensor(b.clone()));
            let want = ln.forward(x.clone() + r.clone());
            close(layer_norm(&x, Some(&r), &g, Some(&b), 1e-12).unwrap(), want);
        }
    }

    #[test]
    fn rms_norm_equals_the_definition() {
        let x = random([3, 5, 64]);
        let g = random([64]);
        let inv = (x.clone().powi_scalar(2).mean_dim(2) + 1e-6).sqrt().recip();
        let want = x.clone() * inv * g.clone().unsqueeze::<3>();
        close(rms_norm(&x, &g, 1e-6).unwrap(), want);
    }

    #[test]
    fn activations_equal_burns() {
        let x = random([3, 70_001]);
        close(gelu_erf(&x).unwrap(), activation::gelu(x.clone()));
        let up = random([3, 70_001]);
        close(
            silu_mul(&x, &up).unwrap(),
            activation::silu(x.clone()) * up.clone(),
        );
        // A transposed view is read through a contiguous copy.
        let t = random([40, 30]).transpose();
        close(gelu_erf(&t).unwrap(), activation::gelu(t.clone()));
    }

    #[test]
    fn mismatched_shapes_are_left_to_burn() {
        let x = random([2, 8]);
        assert!(layer_norm(&x, None, &random([7]), None, 1e-5).is_none());
        assert!(layer_norm(&x, Some(&random([2, 7])), &random([8]), None, 1e-5).is_none());
        assert!(rms_norm(&x, &random([3]), 1e-5).is_none());
        assert!(silu_mul(&x, &random([8, 2])).is_none());
    }
}
