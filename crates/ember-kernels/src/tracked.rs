//! The kernels under burn's autodiff (training on Flex), each with its own backward pass.
//!
//! burn-autodiff records every tensor operation and its backward step. A linear layer becomes a
//! matmul, a broadcast bias add and their backward reductions; LayerNorm half a dozen recorded
//! operations; the erf GELU a chain of elementwise ones. Here each kernel is one recorded
//! operation ([`Backward`]) that keeps what its backward pass needs and computes the gradients
//! with the same fused loops and direct GEMMs as the forward pass.

use crate::attention::{self, AttentionMask, Masks};
use crate::linear as dense;
use crate::rotary::{self as rope, Table};
use crate::{bridge, loss, math, norm};
use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::NoCheckpointing};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::Autodiff;
use burn::tensor::{backend::Backend, DType, Tensor};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

/// The autodiff tensor of `Autodiff<Flex>`: a Flex primitive and its node in the graph.
pub(crate) type AdTensor = burn::tensor::ops::FloatTensor<Autodiff<Flex>>;

/// The autodiff tensor behind `t`, when `B` is `Autodiff<Flex>` and the values are f32.
pub(crate) fn ad<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Option<AdTensor> {
    if !bridge::is_autodiff_flex::<B>() {
        return None;
    }
    let a = bridge::float_primitive::<B, D, AdTensor>(t)?;
    (a.primitive.dtype() == DType::F32).then_some(a)
}

/// [`ad`] for an optional operand: `None` when the kernel does not apply, `Some(None)` when
/// there is no operand.
fn optional_ad<B: Backend, const D: usize>(t: Option<&Tensor<B, D>>) -> Option<Option<AdTensor>> {
    match t {
        Some(t) => Some(Some(ad(t)?)),
        None => Some(None),
    }
}

/// Wraps an autodiff tensor as a tensor of backend `B` (which the caller checked is
/// `Autodiff<Flex>`).
pub(crate) fn wrap<B: Backend, const D: usize>(t: AdTensor) -> Tensor<B, D> {
    bridge::wrap_primitive(t)
}

/// Records `output` as the result of `op` applied to `parents`, with `state` for its backward
/// pass (dropped when no parent needs a gradient).
pub(crate) fn record<Op, const N: usize>(
    op: Op,
    parents: [&AdTensor; N],
    state: Op::State,
    output: FlexTensor,
) -> AdTensor
where
    Op: Backward<Flex, N>,
{
    match op
        .prepare::<NoCheckpointing>(parents.map(|p| p.node.clone()))
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(state, output),
        OpsKind::UnTracked(prep) => prep.finish(output),
    }
}

/// The ids of the parents that need a gradient, in the order they were recorded.
pub(crate) fn wanted<S, const N: usize>(ops: &Ops<S, N>) -> [Option<NodeId>; N] {
    ops.parents.each_ref().map(|p| p.as_ref().map(|n| n.id))
}

/// Adds `grad` to the gradient of the parent `id`, when it needs one.
pub(crate) fn give(grads: &mut Gradients, id: Option<NodeId>, grad: impl FnOnce() -> FlexTensor) {
    if let Some(id) = id {
        grads.register::<Flex>(id, grad());
    }
}

/// `[rows, cols]` of a 2-D tensor.
fn dims2(t: &FlexTensor) -> [usize; 2] {
    let s = t.layout().shape();
    [s[0], s[1]]
}

/// Fills `out` in parallel blocks of whole rows of `cols` values with `fill(range, block,
/// sums)`, where each block also adds its rows' shares into `K` per-column sums of its own;
/// those are then added in block order, so that every run gives the same sums.
fn rows_with_column_sums<const K: usize>(
    out: &mut [f32],
    cols: usize,
    fill: impl Fn(std::ops::Range<usize>, &mut [f32], &mut [Vec<f32>; K]) + Sync,
) -> [Vec<f32>; K] {
    let zeros = || std::array::from_fn(|_| vec![0.0f32; cols]);
    let per_task = norm::rows_per_task(out.len() / cols, cols) * cols;
    out.par_chunks_mut(per_task)
        .enumerate()
        .map(|(task, chunk)| {
            let mut sums = zeros();
            fill(
                task * per_task..task * per_task + chunk.len(),
                chunk,
                &mut sums,
            );
            sums
        })
        .collect::<Vec<_>>()
        .into_iter()
        .reduce(|mut acc, sums| {
            for (a, s) in acc.iter_mut().zip(&sums) {
                math::add_rows(a, s);
            }
            acc
        })
        .unwrap_or_else(zeros)
}

// --- linear ---------------------------------------------------------------------------------

/// [`crate::linear`] under autodiff.
pub(crate) fn linear<B: Backend>(
    x: &Tensor<B, 2>,
    weight: &Tensor<B, 2>,
    bias: Option<&Tensor<B, 1>>,
) -> Option<Tensor<B, 2>> {
    let (xa, wa, ba) = (ad(x)?, ad(weight)?, optional_ad(bias)?);
    let bias_rows = ba.as_ref().map(|b| bridge::rows(&b.primitive));
    // Products in bf16 inside a bf16 autocast region, in the backward pass too (torch runs
    // a bf16 op's backward in bf16 whether or not autocast is still on).
    let products = dense::Products::of_autocast();
    let out = dense::linear_flex(
        &xa.primitive,
        &wa.primitive,
        bias_rows.as_ref(),
        dense::Weights::AsTheyAre,
        products,
    )?;
    let state = (xa.primitive.clone(), wa.primitive.clone(), products);
    Some(wrap(match &ba {
        Some(b) => record(LinearBackward, [&xa, &wa, b], state, out),
        None => record(LinearBackward, [&xa, &wa], state, out),
    }))
}

/// Backward pass of `y = x · W (+ b)`: `dx = dy · Wᵀ`, `dW = xᵀ · dy`, `db = Σ_rows dy`, each
/// one GEMM (or one reduction) that reads the transposes through their strides.
#[derive(Debug)]
struct LinearBackward;

impl<const N: usize> Backward<Flex, N> for LinearBackward {
    /// The input `x`, the weight `W` and the precision of the forward products.
    type State = (FlexTensor, FlexTensor, dense::Products);

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let ids = wanted(&ops);
        let dy = grads.consume::<Flex>(&ops.node);
        let (x, w, products) = ops.state;
        give(grads, ids[0], || {
            dense::matmul_flex(&dy, &w.transpose(0, 1), products)
        });
        give(grads, ids[1], || {
            dense::matmul_flex(&x.transpose(0, 1), &dy, products)
        });
        if N > 2 {
            give(grads, ids[N - 1], || {
                let dy = bridge::rows(&dy);
                let cols = dims2(&dy)[1];
                let sums =
                    dense::column_sums(bridge::contiguous(&dy).expect("made contiguous"), cols);
                bridge::from_vec(sums, &[cols])
            });
        }
    }
}

/// [`crate::autocast_linear`] under autodiff: `round(x · W + b)` with bf16 products, the
/// gradients rounded as torch's bf16 `addmm` gives them.
pub(crate) fn autocast_linear<B: Backend>(
    x: &Tensor<B, 2>,
    weight: &Tensor<B, 2>,
    bias: Option<&Tensor<B, 1>>,
) -> Option<Tensor<B, 2>> {
    let (xa, wa, ba) = (ad(x)?, ad(weight)?, optional_ad(bias)?);
    let bias_rows = ba
        .as_ref()
        .map(|b| crate::autocast::round_flex(&bridge::rows(&b.primitive), DType::BF16));
    let out = dense::rounded_linear_flex(&xa.primitive, &wa.primitive, bias_rows.as_ref())?;
    let state = (xa.primitive.clone(), wa.primitive.clone());
    Some(wrap(match &ba {
        Some(b) => record(AutocastLinearBackward, [&xa, &wa, b], state, out),
        None => record(AutocastLinearBackward, [&xa, &wa], state, out),
    }))
}

/// Backward pass of an autocast linear layer: `dx = round(dy · Wᵀ)`, `dW = round(xᵀ · dy)`
/// with bf16 products (which round `dy`, `x` and `W` as they are packed), and
/// `db = round(Σ_rows round(dy))`: the gradient of the rounded output, then each rounded
/// operand's, as torch's `.to(bfloat16)` before and after a bf16 `addmm` gives them.
#[derive(Debug)]
struct AutocastLinearBackward;

impl<const N: usize> Backward<Flex, N> for AutocastLinearBackward {
    /// The input `x` and the weight `W`, as they were given (f32).
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let ids = wanted(&ops);
        let dy = grads.consume::<Flex>(&ops.node);
        let (x, w) = ops.state;
        let product = |lhs: &FlexTensor, rhs: &FlexTensor| {
            dense::rounded_linear_flex(lhs, rhs, None).expect("the shapes agree")
        };
        give(grads, ids[0], || product(&dy, &w.transpose(0, 1)));
        give(grads, ids[1], || product(&x.transpose(0, 1), &dy));
        if N > 2 {
            give(grads, ids[N - 1], || {
                let dy = crate::autocast::round_flex(&dy, DType::BF16);
                let cols = dims2(&dy)[1];
                let mut sums =
                    dense::column_sums(bridge::contiguous(&dy).expect("contiguous"), cols);
                dense::round_in_place(&mut sums);
                bridge::from_vec(sums, &[cols])
            });
        }
    }
}

// --- GELU ------------------------------------------------------------------------------------

/// [`crate::gelu_erf`] under autodiff.
pub(crate) fn gelu_erf<B: Backend, const D: usize>(x: &Tensor<B, D>) -> Option<Tensor<B, D>> {
    let xa = ad(x)?;
    let xs = bridge::rows(&xa.primitive);
    let out = norm::zip_map(&xs, None, |x, _, o| math::gelu_slice(x, o))?;
    Some(wrap(record(GeluBackward, [&xa], xs, out)))
}

/// Backward pass of the exact GELU: `dx = dy · (Φ(x) + x · φ(x))`.
#[derive(Debug)]
struct GeluBackward;

impl Backward<Flex, 1> for GeluBackward {
    /// The input, contiguous.
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let ids = wanted(&ops);
        let dy = grads.consume::<Flex>(&ops.node);
        let x = ops.state;
        give(grads, ids[0], || {
            norm::zip_map(&x, Some(&dy), math::gelu_backward_slice)
                .expect("the gradient has the input's shape")
        });
    }
}

// --- LayerNorm -------------------------------------------------------------------------------

/// [`crate::layer_norm`] under autodiff: the sum `x + residual` is formed once and kept for
/// the backward pass, which recomputes each row's mean and deviation from it.
pub(crate) fn layer_norm<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    residual: Option<&Tensor<B, D>>,
    gamma: &Tensor<B, 1>,
    beta: Option<&Tensor<B, 1>>,
    eps: f64,
) -> Option<Tensor<B, D>> {
    let (xa, ra, ga, ba) = (
        ad(x)?,
        optional_ad(residual)?,
        ad(gamma)?,
        optional_ad(beta)?,
    );
    let sum = match &ra {
        Some(r) => norm::zip_map(&xa.primitive, Some(&r.primitive), math::add_slices)?,
        None => bridge::rows(&xa.primitive),
    };
    let gamma_rows = bridge::rows(&ga.primitive);
    let beta_rows = ba.as_ref().map(|b| bridge::rows(&b.primitive));
    let out = norm::layer_norm_flex(&sum, None, &gamma_rows, beta_rows.as_ref(), eps)?;
    let op = LayerNormBackward {
        eps: eps as f32,
        residual: ra.is_some(),
        beta: ba.is_some(),
    };
    let state = (sum, gamma_rows);
    Some(wrap(match (&ra, &ba) {
        (Some(r), Some(b)) => record(op, [&xa, r, &ga, b], state, out),
        (Some(r), None) => record(op, [&xa, r, &ga], state, out),
        (None, Some(b)) => record(op, [&xa, &ga, b], state, out),
        (None, None) => record(op, [&xa, &ga], state, out),
    }))
}

/// Backward pass of `y = LayerNorm(x + residual) · gamma + beta`. The parents are recorded as
/// `x`, then `residual` and `beta` where present, with `gamma` before `beta`.
#[derive(Debug)]
struct LayerNormBackward {
    eps: f32,
    residual: bool,
    beta: bool,
}

impl<const N: usize> Backward<Flex, N> for LayerNormBackward {
    /// `x + residual` and `gamma`, contiguous.
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let ids = wanted(&ops);
        let dy = bridge::rows(&grads.consume::<Flex>(&ops.node));
        let (sum, gamma) = ops.state;
        let shape: Vec<usize> = sum.layout().shape().to_vec();
        let (s, g) = (
            bridge::contiguous(&sum).expect("kept contiguous"),
            bridge::contiguous(&gamma).expect("kept contiguous"),
        );
        let dys = bridge::contiguous(&dy).expect("made contiguous");
        let cols = g.len();
        let mut ds = vec![0.0f32; s.len()];
        let [dgamma, dbeta] = rows_with_column_sums(&mut ds, cols, |at, chunk, [dg, db]| {
            math::layer_norm_backward_rows(&s[at.clone()], &dys[at], g, self.eps, chunk, dg, db)
        });
        let ds = bridge::from_vec(ds, &shape);
        let gamma_at = 1 + usize::from(self.residual);
        if self.residual {
            give(grads, ids[1], || ds.clone());
        }
        give(grads, ids[0], || ds);
        give(grads, ids[gamma_at], || bridge::from_vec(dgamma, &[cols]));
        if self.beta {
            give(grads, ids[gamma_at + 1], || {
                bridge::from_vec(dbeta, &[cols])
            });
        }
    }
}

// --- attention -------------------------------------------------------------------------------

/// [`crate::attention`] under autodiff: the attention weights are kept for the backward pass
/// (`[batch, heads, seq_q, seq_k]`, as PyTorch's eager attention keeps them).
pub(crate) fn attention<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    mask: AttentionMask<'_, B>,
) -> Option<Tensor<B, 4>> {
    let (qa, ka, va) = (ad(q)?, ad(k)?, ad(v)?);
    let padding = match mask.key_padding {
        Some(m) => attention::key_padding(&bridge::flex_bool(m)?)?,
        None => Vec::new(),
    };
    let dropout = match mask.dropout {
        Some(m) => Some(bridge::rows(&ad(m)?.primitive)),
        None => None,
    };
    let masks = Masks {
        padding,
        causal: mask.causal,
        dropout,
    };
    // The weights are kept only when a backward pass will read them.
    let keep = [&qa, &ka, &va].iter().any(|t| t.is_tracked());
    let (out, probs) =
        attention::attention_flex(&qa.primitive, &ka.primitive, &va.primitive, &masks, keep)?;
    let state = AttentionState {
        q: qa.primitive.clone(),
        k: ka.primitive.clone(),
        v: va.primitive.clone(),
        masks,
        probs,
    };
    Some(wrap(record(AttentionBackward, [&qa, &ka, &va], state, out)))
}

/// What the attention's backward pass reads.
#[derive(Debug, Clone)]
struct AttentionState {
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    masks: Masks,
    /// The attention weights before dropout, kept when a parent needs a gradient.
    probs: Option<FlexTensor>,
}

/// Backward pass of the attention, per batch row and key / value head
/// ([`attention::attention_backward`]).
#[derive(Debug)]
struct AttentionBackward;

impl Backward<Flex, 3> for AttentionBackward {
    type State = AttentionState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let ids = wanted(&ops);
        let d_out = grads.consume::<Flex>(&ops.node);
        let s = ops.state;
        let probs = s.probs.expect("kept: a parent needs a gradient");
        let (dq, dk, dv) =
            attention::attention_backward(&s.q, &s.k, &s.v, &s.masks, &probs, &d_out);
        give(grads, ids[0], || dq);
        give(grads, ids[1], || dk);
        give(grads, ids[2], || dv);
    }
}

// --- RMSNorm -------------------------------------------------------------------------------

/// [`crate::rms_norm`] under autodiff: the input is kept for the backward pass, which
/// recomputes each row's scale from it.
pub(crate) fn rms_norm<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    gamma: &Tensor<B, 1>,
    eps: f64,
) -> Option<Tensor<B, D>> {
    let (xa, ga) = (ad(x)?, ad(gamma)?);
    let xs = bridge::rows(&xa.primitive);
    let gs = bridge::rows(&ga.primitive);
    let out = norm::rms_norm_flex(&xs, &gs, eps)?;
    let op = RmsNormBackward { eps: eps as f32 };
    Some(wrap(record(op, [&xa, &ga], (xs, gs), out)))
}

/// Backward pass of `y = x / sqrt(mean(x²) + eps) · gamma` ([`math::rms_norm_backward_rows`]).
#[derive(Debug)]
struct RmsNormBackward {
    eps: f32,
}

impl Backward<Flex, 2> for RmsNormBackward {
    /// `x` and `gamma`, contiguous.
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let ids = wanted(&ops);
        let dy = bridge::rows(&grads.consume::<Flex>(&ops.node));
        let (x, gamma) = ops.state;
        let shape: Vec<usize> = x.layout().shape().to_vec();
        let xs = bridge::contiguous(&x).expect("kept contiguous");
        let g = bridge::contiguous(&gamma).expect("kept contiguous");
        let dys = bridge::contiguous(&dy).expect("made contiguous");
        let cols = g.len();
        let mut dx = vec![0.0f32; xs.len()];
        let [dgamma] = rows_with_column_sums(&mut dx, cols, |at, chunk, [dg]| {
            math::rms_norm_backward_rows(&xs[at.clone()], &dys[at], g, self.eps, chunk, dg)
        });
        give(grads, ids[0], || bridge::from_vec(dx, &shape));
        give(grads, ids[1], || bridge::from_vec(dgamma, &[cols]));
    }
}

// --- SwiGLU ----------------------------------------------------------------------------------

/// [`crate::silu_mul`] under autodiff: both inputs are kept for the backward pass.
pub(crate) fn silu_mul<B: Backend, const D: usize>(
    gate: &Tensor<B, D>,
    up: &Tensor<B, D>,
) -> Option<Tensor<B, D>> {
    let (ga, ua) = (ad(gate)?, ad(up)?);
    let (gs, us) = (bridge::rows(&ga.primitive), bridge::rows(&ua.primitive));
    let out = norm::zip_map(&gs, Some(&us), math::silu_mul_slice)?;
    Some(wrap(record(SiluMulBackward, [&ga, &ua], (gs, us), out)))
}

/// Backward pass of `y = silu(gate) · up` ([`math::silu_mul_backward_slice`]).
#[derive(Debug)]
struct SiluMulBackward;

impl Backward<Flex, 2> for SiluMulBackward {
    /// `gate` and `up`, contiguous.
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let ids = wanted(&ops);
        let dy = bridge::rows(&grads.consume::<Flex>(&ops.node));
        let (gate, up) = ops.state;
        let shape: Vec<usize> = gate.layout().shape().to_vec();
        let (g, u) = (
            bridge::contiguous(&gate).expect("kept contiguous"),
            bridge::contiguous(&up).expect("kept contiguous"),
        );
        let dys = bridge::contiguous(&dy).expect("made contiguous");
        let (mut d_gate, mut d_up) = (vec![0.0f32; g.len()], vec![0.0f32; g.len()]);
        let chunk = norm::PARALLEL_VALUES;
        d_gate
            .par_chunks_mut(chunk)
            .zip(d_up.par_chunks_mut(chunk))
            .enumerate()
            .for_each(|(i, (dg, du))| {
                let at = i * chunk..i * chunk + dg.len();
                math::silu_mul_backward_slice(&g[at.clone()], &u[at.clone()], &dys[at], dg, du);
            });
        give(grads, ids[0], || bridge::from_vec(d_gate, &shape));
        give(grads, ids[1], || bridge::from_vec(d_up, &shape));
    }
}

// --- cross entropy ---------------------------------------------------------------------------

/// [`crate::cross_entropy`] under autodiff: the logits and each row's `log Σ exp` are kept
/// for the backward pass.
pub(crate) fn cross_entropy<B: Backend, const D: usize>(
    logits: &Tensor<B, D>,
    targets: Vec<i64>,
) -> Option<Tensor<B, 1>> {
    let la = ad(logits)?;
    let rows = bridge::rows(&la.primitive);
    let summary = loss::Summary::of(&rows, &targets)?;
    let out = bridge::from_vec(vec![summary.loss], &[1]);
    let state = CrossEntropyState {
        logits: rows,
        targets,
        summary,
    };
    Some(wrap(record(CrossEntropyBackward, [&la], state, out)))
}

/// What the cross entropy's backward pass reads.
#[derive(Debug, Clone)]
struct CrossEntropyState {
    logits: FlexTensor,
    targets: Vec<i64>,
    summary: loss::Summary,
}

/// Backward pass of the mean cross entropy ([`loss::Summary::backward`]).
#[derive(Debug)]
struct CrossEntropyBackward;

impl Backward<Flex, 1> for CrossEntropyBackward {
    type State = CrossEntropyState;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let ids = wanted(&ops);
        let d_loss = bridge::rows(&grads.consume::<Flex>(&ops.node));
        let g = bridge::contiguous(&d_loss).expect("made contiguous")[0];
        let s = ops.state;
        give(grads, ids[0], || {
            s.summary.backward(s.logits, &s.targets, g)
        });
    }
}

// --- rotary positions -----------------------------------------------------------------------

/// [`crate::rotary`] under autodiff: the table is kept for the backward pass (the cosines and
/// sines get no gradient: they come from the positions).
pub(crate) fn rotary<B: Backend>(
    x: &Tensor<B, 4>,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
) -> Option<Tensor<B, 4>> {
    let xa = ad(x)?;
    let table = Table::new(&ad(cos)?.primitive, &ad(sin)?.primitive)?;
    let out = rope::rotate(&xa.primitive, &table, false)?;
    Some(wrap(record(RotaryBackward, [&xa], table, out)))
}

/// Backward pass of the rotation: the transposed rotation of the output's gradient.
#[derive(Debug)]
struct RotaryBackward;

impl Backward<Flex, 1> for RotaryBackward {
    type State = Table;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let ids = wanted(&ops);
        let dy = grads.consume::<Flex>(&ops.node);
        give(grads, ids[0], || {
            // The gradient is read in place through its strides (a head view of the
            // attention's `[batch, seq, heads, dim]` rows) unless its rows are not contiguous.
            rope::rotate(&dy, &ops.state, true)
                .or_else(|| rope::rotate(&bridge::rows(&dy), &ops.state, true))
                .expect("the gradient has the input's shape")
        });
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{activation, Distribution, Tensor, Tolerance};

    type B = Autodiff<Flex>;

    fn random<const D: usize>(shape: [usize; D]) -> Tensor<B, D> {
        Tensor::random(shape, Distribution::Normal(0.5, 2.0), &Default::default()).require_grad()
    }

    /// Equal within 1e-4 relative or absolute: gradients sum hundreds of products, in another
    /// order on each side.
    fn close<const D: usize>(got: Tensor<Flex, D>, want: Tensor<Flex, D>) {
        got.into_data()
            .assert_approx_eq::<f32>(&want.into_data(), Tolerance::rel_abs(1e-4, 1e-4));
    }

    #[test]
    fn linear_gradients_equal_burns() {
        for (rows, d_in, d_out) in [(37, 50, 70), (300, 192, 256)] {
            let (x, w, b) = (random([rows, d_in]), random([d_in, d_out]), random([d_out]));
            let r = random([rows, d_out]).detach();
            let got = crate::linear(&x, &w, Some(&b)).unwrap();
            let want = x.clone().matmul(w.clone()) + b.clone().unsqueeze_dim(0);
            close(got.clone().inner(), want.clone().inner());
            let g_got = (got * r.clone()).sum().backward();
            let g_want = (want * r.clone()).sum().backward();
            close(x.grad(&g_got).unwrap(), x.grad(&g_want).unwrap());
            close(w.grad(&g_got).unwrap(), w.grad(&g_want).unwrap());
            close(b.grad(&g_got).unwrap(), b.grad(&g_want).unwrap());
            // Without a bias, and with a weight that needs no gradient.
            let frozen: Tensor<B, 2> =
                Tensor::random([d_in, d_out], Distribution::Default, &Default::default());
            let got = crate::linear(&x, &frozen, None).unwrap();
            let g_got = (got * r.clone()).sum().backward();
            let g_want = (x.clone().matmul(frozen.clone()) * r).sum().backward();
            close(x.grad(&g_got).unwrap(), x.grad(&g_want).unwrap());
            assert!(frozen.grad(&g_got).is_none());
        }
    }

    /// Under bf16 autocast the forward and both backward GEMMs take bf16 products (the bf16
    /// GEMM where the CPU has it): the same values as f32 GEMMs over the rounded operands,
    /// including the rounded output gradient, even when the backward pass runs after the
    /// region has ended.
    #[test]
    fn linear_under_bf16_autocast_multiplies_the_rounded_operands() {
        use burn::tensor::DType;
        let bf16 = |t: Tensor<B, 2>| crate::round_to(t, DType::BF16).detach().require_grad();
        for (rows, d_in, d_out) in [(37, 50, 70), (300, 192, 256)] {
            let (x, w) = (bf16(random([rows, d_in])), bf16(random([d_in, d_out])));
            let r_raw = random([rows, d_out]).detach();
            let r = crate::round_to(r_raw.clone(), DType::BF16);
            // The bf16 GEMM rounds the output gradient itself (the models round it before).
            let r_in = if crate::bf16_gemm::available() {
                r_raw
            } else {
                r.clone()
            };
            let got = {
                let _region = crate::autocast(DType::BF16);
                crate::linear(&x, &w, None).unwrap()
            };
            let want = x.clone().matmul(w.clone());
            close(got.clone().inner(), want.clone().inner());
            let g_got = (got * r_in).sum().backward();
            let g_want = (want * r).sum().backward();
            close(x.grad(&g_got).unwrap(), x.grad(&g_want).unwrap());
            close(w.grad(&g_got).unwrap(), w.grad(&g_want).unwrap());
        }
    }

    /// The fused autocast layer gives the bits of the rounding ops composed around
    /// [`crate::linear`] (which the models run where the CPU has no bf16 dot products),
    /// forward and backward, with and without a bias.
    #[test]
    fn autocast_linear_equals_the_rounding_ops_around_linear() {
        use burn::tensor::DType;
        if !crate::bf16_gemm::available() {
            eprintln!("skipped: this CPU has no AVX512_BF16");
            return;
        }
        let bits = |t: Tensor<Flex, 2>| t.into_data().to_vec::<f32>().unwrap();
        // Separate leaves for each side, so that the two graphs share no node.
        let twin = |t: &Tensor<B, 2>| t.clone().detach().require_grad();
        // Many rows, and few (which the bf16 product rounds all the same); with and without a
        // bias.
        for (rows, with_bias) in [(70, true), (70, false), (3, true)] {
            let (x, w, r) = (
                random([rows, 50]),
                random([50, 90]),
                random([rows, 90]).detach(),
            );
            let (x2, w2) = (twin(&x), twin(&w));
            let b = random([90]);
            let b2 = b.clone().detach().require_grad();
            let _region = crate::autocast(DType::BF16);
            let fused = crate::autocast_linear(&x, &w, with_bias.then_some(&b)).unwrap();
            let round = crate::autocast_round::<B, 2>;
            let composed = round(
                crate::linear(
                    &round(x2.clone()),
                    &round(w2.clone()),
                    with_bias
                        .then(|| crate::autocast_round(b2.clone()))
                        .as_ref(),
                )
                .unwrap(),
            );
            assert_eq!(bits(fused.clone().inner()), bits(composed.clone().inner()));
            let g_fused = (fused * r.clone()).sum().backward();
            let g_composed = (composed * r).sum().backward();
            let grad = |t: &Tensor<B, 2>, g| bits(t.grad(g).unwrap());
            assert_eq!(grad(&x, &g_fused), grad(&x2, &g_composed), "{rows} rows");
            assert_eq!(grad(&w, &g_fused), grad(&w2, &g_composed), "{rows} rows");
            if with_bias {
                let grad = |t: &Tensor<B, 1>, g| t.grad(g).unwrap().into_data().to_vec::<f32>();
                assert_eq!(grad(&b, &g_fused).unwrap(), grad(&b2, &g_composed).unwrap());
            }
        }
        // Outside a bf16 region it does not apply.
        assert!(crate::autocast_linear(&random([3, 50]), &random([50, 90]), None).is_none());
    }

    #[test]
    fn layer_norm_gradients_equal_burns() {
        for shape in [[2, 3, 20], [4, 300, 771]] {
            let cols = shape[2];
            let (x, res, g, b) = (random(shape), random(shape), random([cols]), random([cols]));
            let r = random(shape).detach();
            let reference = |x: Tensor<B, 3>, g: &Tensor<B, 1>, b: Option<&Tensor<B, 1>>| {
                let mean = x.clone().mean_dim(2);
                let centred = x - mean;
                let var = centred.clone().powi_scalar(2).mean_dim(2);
                let y = centred / (var + 1e-12).sqrt() * g.clone().unsqueeze::<3>();
                match b {
                    Some(b) => y + b.clone().unsqueeze::<3>(),
                    None => y,
                }
            };
            let got = crate::layer_norm(&x, Some(&res), &g, Some(&b), 1e-12).unwrap();
            let want = reference(x.clone() + res.clone(), &g, Some(&b));
            close(got.clone().inner(), want.clone().inner());
            let g_got = (got * r.clone()).sum().backward();
            let g_want = (want * r.clone()).sum().backward();
            for t in [&x, &res] {
                close(t.grad(&g_got).unwrap(), t.grad(&g_want).unwrap());
            }
            close(g.grad(&g_got).unwrap(), g.grad(&g_want).unwrap());
            close(b.grad(&g_got).unwrap(), b.grad(&g_want).unwrap());
            // The parallel reductions give the same bits on every run.
            let again = crate::layer_norm(&x, Some(&res), &g, Some(&b), 1e-12).unwrap();
            let g_again = (again * r.clone()).sum().backward();
            for t in [&g, &b] {
                assert_eq!(
                    t.grad(&g_got).unwrap().into_data().to_vec::<f32>().unwrap(),
                    t.grad(&g_again)
                        .unwrap()
                        .into_data()
                        .to_vec::<f32>()
                        .unwrap()
                );
            }
            // No residual, no beta.
            let got = crate::layer_norm(&x, None, &g, None, 1e-12).unwrap();
            let g_got = (got * r.clone()).sum().backward();
            let g_want = (reference(x.clone(), &g, None) * r).sum().backward();
            close(x.grad(&g_got).unwrap(), x.grad(&g_want).unwrap());
            close(g.grad(&g_got).unwrap(), g.grad(&g_want).unwrap());
        }
    }

    #[test]
    fn gelu_gradient_equals_burns() {
        let x = random([3, 70_001]);
        let r = random([3, 70_001]).detach();
        let got = crate::gelu_erf(&x).unwrap();
        let want = activation::gelu(x.clone());
        close(got.clone().inner(), want.clone().inner());
        let g_got = (got * r.clone()).sum().backward();
        let g_want = (want * r).sum().backward();
        close(x.grad(&g_got).unwrap(), x.grad(&g_want).unwrap());
    }

    #[test]
    fn rms_norm_and_silu_mul_gradients_equal_burns() {
        for shape in [[2, 3, 20], [4, 300, 771]] {
            let cols = shape[2];
            let (x, g) = (random(shape), random([cols]));
            let r = random(shape).detach();
            let got = crate::rms_norm(&x, &g, 1e-6).unwrap();
            let inv = (x.clone().powi_scalar(2).mean_dim(2) + 1e-6).sqrt().recip();
            let want = x.clone() * inv * g.clone().unsqueeze::<3>();
            close(got.clone().inner(), want.clone().inner());
            let g_got = (got * r.clone()).sum().backward();
            let g_want = (want * r.clone()).sum().backward();
            close(x.grad(&g_got).unwrap(), x.grad(&g_want).unwrap());
            close(g.grad(&g_got).unwrap(), g.grad(&g_want).unwrap());

            let (gate, up) = (random(shape), random(shape));
            let got = crate::silu_mul(&gate, &up).unwrap();
            let want = activation::silu(gate.clone()) * up.clone();
            close(got.clone().inner(), want.clone().inner());
            let g_got = (got * r.clone()).sum().backward();
            let g_want = (want * r).sum().backward();
            close(gate.grad(&g_got).unwrap(), gate.grad(&g_want).unwrap());
            close(up.grad(&g_got).unwrap(), up.grad(&g_want).unwrap());
        }
    }

    #[test]
    fn cross_entropy_gradient_equals_burns() {
        let device = Default::default();
        let logits = random([3, 11, 517]);
        let ids: Vec<i64> = (0..33)
            .map(|i| if i % 4 == 3 { -100 } else { i * 31 % 517 })
            .collect();
        let targets = Tensor::<B, 1, burn::tensor::Int>::from_data(
            burn::tensor::TensorData::from(ids.as_slice()),
            &device,
        );
        // Logits whose buffer only the loss holds at backward time (a product's output: the
        // gradient is written over it), then a view of a leaf that the test keeps (copied).
        for owned in [true, false] {
            // Views of their own: a backward pass consumes the graph steps it walks.
            let rows = logits.clone().reshape([33, 517]);
            let input = if owned { rows * 1.0 } else { rows };
            let got = crate::cross_entropy(&input, &targets).unwrap();
            drop(input);
            let rows = logits.clone().reshape([33, 517]);
            let kept = targets.clone().not_equal_elem(-100);
            let safe = targets.clone().mask_fill(kept.clone().bool_not(), 0);
            let picked = activation::log_softmax(rows, 1)
                .gather(1, safe.unsqueeze_dim::<2>(1))
                .squeeze_dim::<1>(1);
            let kept = kept.float();
            let want = (picked * kept.clone()).sum().neg() / kept.sum();
            close(got.clone().inner(), want.clone().inner());
            let (g_got, g_want) = ((got * 3.0).backward(), (want * 3.0).backward());
            close(logits.grad(&g_got).unwrap(), logits.grad(&g_want).unwrap());
        }
    }

    #[test]
    fn rotary_gradient_equals_burns() {
        let device = Default::default();
        let rows = random([2, 5, 3 * 8]);
        let heads = || rows.clone().reshape([2, 5, 3, 8]).swap_dims(1, 2);
        let cos = Tensor::<B, 4>::random([1, 1, 5, 8], Distribution::Default, &device);
        let sin = Tensor::<B, 4>::random([1, 1, 5, 8], Distribution::Default, &device);
        let got = crate::rotary(&heads(), &cos, &sin).unwrap();
        let want = crate::rotary::tests::reference(heads(), &cos, &sin);
        close(got.clone().inner(), want.clone().inner());
        let r = random([2, 3, 5, 8]).detach();
        let g_got = (got * r.clone()).sum().backward();
        let g_want = (want * r).sum().backward();
        close(rows.grad(&g_got).unwrap(), rows.grad(&g_want).unwrap());
    }

    /// Attention through burn's operations: `softmax(q · kᵀ / √d + mask) · factor · v`, with
    /// the key / value heads repeated for grouped queries.
    fn reference_attention(
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        padding: Option<&Tensor<B, 2, burn::tensor::Bool>>,
        causal: bool,
        factor: Option<&Tensor<B, 4>>,
    ) -> Tensor<B, 4> {
        let [b, h, sq, d] = q.dims();
        let [_, kvh, sk, _] = k.dims();
        let repeat = |t: Tensor<B, 4>| {
            let [_, _, s, dim] = t.dims();
            t.unsqueeze_dim::<5>(2)
                .expand([b, kvh, h / kvh, s, dim])
                .reshape([b, h, s, dim])
        };
        let mut scores = q.matmul(repeat(k).swap_dims(2, 3)) / (d as f64).sqrt();
        if let Some(p) = padding {
            let m = p.clone().unsqueeze_dim::<3>(1).unsqueeze_dim::<4>(1);
            scores = scores.mask_fill(m.expand([b, h, sq, sk]), f32::MIN);
        }
        if causal {
            let rows = Tensor::<B, 1, burn::tensor::Int>::arange(0..sq as i64, &Default::default());
            let cols = Tensor::<B, 1, burn::tensor::Int>::arange(0..sk as i64, &Default::default());
            let hidden = cols
                .unsqueeze_dim::<2>(0)
                .greater(rows.unsqueeze_dim::<2>(1) + (sk - sq) as i64);
            scores = scores.mask_fill(hidden.unsqueeze::<4>().expand([b, h, sq, sk]), f32::MIN);
        }
        let mut probs = activation::softmax(scores, 3);
        if let Some(f) = factor {
            probs = probs * f.clone();
        }
        probs.matmul(repeat(v))
    }

    #[test]
    fn attention_gradients_equal_burns() {
        let device = Default::default();
        // (batch, heads, kv_heads, seq_q, seq_k, d, padding, causal, dropout)
        let cases = [
            (2, 3, 3, 7, 7, 8, false, false, false),
            (2, 4, 2, 5, 9, 16, true, true, false),
            (3, 2, 2, 6, 6, 8, true, false, true),
            // Causal without padding over 128 queries or more: blocks of queries against the
            // keys they see (the last block shorter; cached keys before the queries).
            (1, 4, 2, 150, 150, 8, false, true, false),
            (2, 2, 1, 130, 140, 8, false, true, true),
        ];
        for (b, h, kvh, sq, sk, d, padded, causal, dropped) in cases {
            // Heads viewed out of `[batch, seq, heads · d]` rows, as the models produce them.
            let rows = [
                random([b, sq, h * d]),
                random([b, sk, kvh * d]),
                random([b, sk, kvh * d]),
            ];
            let heads = |t: &Tensor<B, 3>, n: usize| {
                let [_, s, _] = t.dims();
                t.clone().reshape([b, s, n, d]).swap_dims(1, 2)
            };
            let (q, k, v) = (
                heads(&rows[0], h),
                heads(&rows[1], kvh),
                heads(&rows[2], kvh),
            );
            let padding = padded.then(|| {
                let flags: Vec<bool> = (0..b * sk).map(|i| i % sk >= sk - 1 - i / sk).collect();
                Tensor::<B, 2, burn::tensor::Bool>::from_data(
                    burn::tensor::TensorData::new(flags, [b, sk]),
                    &device,
                )
            });
            let factor =
                dropped.then(|| crate::dropout_mask::<B, 4>([b, h, sq, sk], 0.3, &device).unwrap());
            let mask = crate::AttentionMask {
                key_padding: padding.as_ref(),
                causal,
                dropout: factor.as_ref(),
            };
            let got = crate::attention(&q, &k, &v, mask).unwrap();
            // Views of their own: a backward pass consumes the graph steps it walks.
            let want = reference_attention(
                heads(&rows[0], h),
                heads(&rows[1], kvh),
                heads(&rows[2], kvh),
                padding.as_ref(),
                causal,
                factor.as_ref(),
            );
            close(got.clone().inner(), want.clone().inner());
            let r = random([b, h, sq, d]).detach();
            let g_got = (got * r.clone()).sum().backward();
            let g_want = (want * r).sum().backward();
            for t in &rows {
                close(t.grad(&g_got).unwrap(), t.grad(&g_want).unwrap());
            }
        }
    }
}
