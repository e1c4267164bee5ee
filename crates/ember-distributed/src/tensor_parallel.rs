//! Tensor parallel: one layer's parameters split over the ranks of a group, as Megatron-LM
//! splits a transformer's attention heads and MLP.
//!
//! A [`ColumnParallelLinear`] keeps a slice of the output features (attention heads, MLP
//! intermediate units) and a [`RowParallelLinear`] the matching slice of the input features,
//! so that an attention block or an MLP runs on each rank's slice without communication and
//! ends in one all-reduce of the partial outputs:
//!
//! ```text
//!  x (replicated) ─ f ─┬─ column slice 0 ─ (heads / units 0) ─ row slice 0 ─┐
//!                      └─ column slice 1 ─ (heads / units 1) ─ row slice 1 ─┴─ g ─ y (replicated)
//! ```
//!
//! `f` ([`TensorParallel::copy_to_region`]) is the identity forward and an all-reduce of the
//! gradient backward (each slice contributes part of the input's gradient); `g`
//! ([`TensorParallel::reduce_from_region`]) is an all-reduce forward and the identity
//! backward. Everything outside the split (norms, embeddings, the loss) is replicated and
//! sees the same values and the same gradients on every rank, so it needs no communication
//! and every rank's optimizer takes the same step on it.
//!
//! The collectives are recorded operations of burn's autodiff through
//! [`ember_kernels::map_values`], which runs on Flex (the CPU backend), with or without
//! autodiff. Without autodiff (inference) every backend runs; training on another autodiff
//! backend is refused with a typed error rather than silently missing the gradient's
//! all-reduce.

use crate::error::{DistributedError, Result};
use crate::group::{ProcessGroup, ReduceOp};
use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use ember_kernels::GradientMap;
use std::ops::Range;
use std::sync::Arc;

/// The tensor-parallel group of a layer: its ranks each hold one slice of the layer's
/// parameters. Cloning is cheap (the group is shared).
#[derive(Clone)]
pub struct TensorParallel {
    group: Arc<dyn ProcessGroup>,
}

impl std::fmt::Debug for TensorParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorParallel")
            .field("rank", &self.group.rank())
            .field("size", &self.group.size())
            .finish()
    }
}

impl TensorParallel {
    /// Tensor parallel over the ranks of `group` (in a `dp × pp × tp` mesh: the group of the
    /// ranks that share one model replica's stage).
    pub fn new(group: Arc<dyn ProcessGroup>) -> Self {
        Self { group }
    }

    /// This rank's index in the group: the slice it holds.
    pub fn rank(&self) -> usize {
        self.group.rank()
    }

    /// The number of slices.
    pub fn size(&self) -> usize {
        self.group.size()
    }

    /// The process group.
    pub fn group(&self) -> &Arc<dyn ProcessGroup> {
        &self.group
    }

    /// Megatron's `copy_to_tensor_model_parallel_region` (`f`): `x` itself, whose gradient is
    /// summed over the ranks in the backward pass.
    pub fn copy_to_region<B: Backend, const D: usize>(
        &self,
        x: Tensor<B, D>,
    ) -> Result<Tensor<B, D>> {
        if self.size() == 1 || !B::ad_enabled(&x.device()) {
            return Ok(x);
        }
        let group = Arc::clone(&self.group);
        let backward = GradientMap(Arc::new(move |grad: &mut [f32]| {
            // A backward step cannot return an error: a failed rank ends this one too, with
            // the collective's error, and the job ends rather than train on a partial sum.
            if let Err(e) = group.all_reduce(grad, ReduceOp::Sum) {
                panic!("tensor parallel: the gradient's all-reduce failed: {e}");
            }
        }));
        match ember_kernels::map_values(&x, |_| Ok::<(), DistributedError>(()), backward) {
            Some(result) => result,
            None => Err(unsupported_backend::<B>(x.dtype())),
        }
    }

    /// Megatron's `reduce_from_tensor_model_parallel_region` (`g`): the sum of `x` over the
    /// ranks, whose gradient passes to each rank's `x` unchanged.
    pub fn reduce_from_region<B: Backend, const D: usize>(
        &self,
        x: Tensor<B, D>,
    ) -> Result<Tensor<B, D>> {
        if self.size() == 1 {
            return Ok(x);
        }
        let reduce = |values: &mut [f32]| self.group.all_reduce(values, ReduceOp::Sum);
        if let Some(result) = ember_kernels::map_values(&x, reduce, GradientMap::identity()) {
            return result;
        }
        if B::ad_enabled(&x.device()) {
            return Err(unsupported_backend::<B>(x.dtype()));
        }
        // Inference on any other backend: through the host.
        let (dtype, shape, device) = (x.dtype(), x.shape(), x.device());
        let mut values = float_values(x.cast(DType::F32).into_data())?;
        self.group.all_reduce(&mut values, ReduceOp::Sum)?;
        Ok(Tensor::<B, D>::from_data(TensorData::new(values, shape), &device).cast(dtype))
    }

    /// The range of `len` (a dimension of `what`, a parameter's name) that this rank holds:
    /// slice `rank` of `size` equal ones. A length the group does not divide is an error:
    /// Megatron's split is even, so that every rank holds whole heads.
    pub fn shard_range(&self, len: usize, what: &str) -> Result<Range<usize>> {
        let size = self.size();
        if !len.is_multiple_of(size) {
            return Err(DistributedError::InvalidArgument {
                op: "tensor_parallel",
                message: format!(
                    "{what}: {len} does not divide into {size} equal slices (tensor parallel \
                     size {size})"
                ),
            });
        }
        let part = len / size;
        Ok(self.rank() * part..(self.rank() + 1) * part)
    }

    /// This rank's columns (output features) of `linear`, for the first layer of a split
    /// block (query / key / value, an MLP's up and gate projections): every rank passes the
    /// same layer. `what` names it in errors.
    pub fn column_slice<B: Backend>(&self, linear: Linear<B>, what: &str) -> Result<Linear<B>> {
        let [_, d_out] = linear.weight.dims();
        let r = self.shard_range(d_out, &format!("{what}: output features"))?;
        Ok(Linear {
            weight: narrow_param(linear.weight, 1, &r),
            bias: linear.bias.map(|b| narrow_param(b, 0, &r)),
        })
    }

    /// This rank's rows (input features) of `linear`, for the last layer of a split block
    /// (attention's output projection, an MLP's down projection). The bias stays on rank 0
    /// alone: the partial outputs are summed over the ranks, and the bias must be added once.
    pub fn row_slice<B: Backend>(&self, linear: Linear<B>, what: &str) -> Result<Linear<B>> {
        let [d_in, _] = linear.weight.dims();
        let r = self.shard_range(d_in, &format!("{what}: input features"))?;
        Ok(Linear {
            weight: narrow_param(linear.weight, 0, &r),
            bias: linear.bias.filter(|_| self.rank() == 0),
        })
    }

    /// The whole layer of which every rank holds a [`Self::column_slice`].
    pub fn gather_columns<B: Backend>(&self, linear: Linear<B>) -> Result<Linear<B>> {
        Ok(Linear {
            weight: self.gather_param(linear.weight, 1)?,
            bias: match linear.bias {
                Some(b) => Some(self.gather_param(b, 0)?),
                None => None,
            },
        })
    }

    /// The whole layer of which every rank holds a [`Self::row_slice`] (the bias, where there
    /// is one, broadcast from rank 0).
    pub fn gather_rows<B: Backend>(
        &self,
        linear: Linear<B>,
        d_out_bias: bool,
    ) -> Result<Linear<B>> {
        let weight = self.gather(linear.weight.val(), 0)?;
        let bias = if d_out_bias {
            let d_out = weight.dims()[1];
            let device = weight.device();
            let mut values = match &linear.bias {
                Some(b) => float_values(b.val().cast(DType::F32).into_data())?,
                None => vec![0.0; d_out],
            };
            self.group.broadcast(&mut values, 0)?;
            let bias = Tensor::<B, 1>::from_data(TensorData::new(values, [d_out]), &device);
            Some(Param::from_tensor(bias.cast(weight.dtype())))
        } else {
            None
        };
        Ok(Linear {
            weight: Param::from_tensor(weight),
            bias,
        })
    }

    /// [`Self::gather`] of a parameter, which keeps its id and whether it is trained.
    fn gather_param<const D: usize, B: Backend>(
        &self,
        param: Param<Tensor<B, D>>,
        dim: usize,
    ) -> Result<Param<Tensor<B, D>>> {
        let (id, shard, _) = param.consume();
        let trained = shard.is_require_grad();
        let whole = self.gather(shard, dim)?.detach().set_require_grad(trained);
        Ok(Param::initialized(id, whole))
    }

    /// The whole of a tensor of which every rank holds the slice `shard` along `dim`,
    /// gathered in rank order.
    pub fn gather<B: Backend, const D: usize>(
        &self,
        shard: Tensor<B, D>,
        dim: usize,
    ) -> Result<Tensor<B, D>> {
        if self.size() == 1 {
            return Ok(shard);
        }
        let (dtype, device) = (shard.dtype(), shard.device());
        // Moved to the front, each rank's slice is one contiguous block of the whole.
        let moved = shard.swap_dims(0, dim);
        let mut dims = moved.dims();
        let values = float_values(moved.cast(DType::F32).into_data())?;
        let all = self.group.all_gather(&values)?;
        dims[0] *= self.size();
        let whole = Tensor::<B, D>::from_data(TensorData::new(all, dims), &device);
        Ok(whole.swap_dims(0, dim).cast(dtype))
    }
}

/// The slice `range` of `param` along `dim`, as a parameter of its own (a leaf of the
/// autodiff graph, so that it gets a gradient) with the same id and trainability.
fn narrow_param<const D: usize, B: Backend>(
    param: Param<Tensor<B, D>>,
    dim: usize,
    range: &Range<usize>,
) -> Param<Tensor<B, D>> {
    param.map(|t| {
        let trained = t.is_require_grad();
        t.narrow(dim, range.start, range.len())
            .detach()
            .set_require_grad(trained)
    })
}

/// The f32 values of `data`, or the error that names its dtype.
fn float_values(data: TensorData) -> Result<Vec<f32>> {
    let dtype = data.dtype;
    data.to_vec::<f32>()
        .map_err(|e| DistributedError::Tensor(format!("a {dtype:?} tensor: {e:?}")))
}

/// Why a recorded collective cannot run for backend `B`.
fn unsupported_backend<B: Backend>(dtype: DType) -> DistributedError {
    DistributedError::InvalidArgument {
        op: "tensor_parallel",
        message: format!(
            "training tensor parallel needs f32 activations on Flex under autodiff (got \
             {dtype:?} on {}): another backend's autodiff cannot record the gradient's \
             all-reduce",
            B::name(&Default::default())
        ),
    }
}

/// A linear layer whose output features are split over the ranks (Megatron's
/// `ColumnParallelLinear` with `gather_output=False`): each rank computes its slice of the
/// output from the whole (replicated) input.
#[derive(Module, Debug)]
pub struct ColumnParallelLinear<B: Backend> {
    /// This rank's [`TensorParallel::column_slice`] of the layer.
    pub linear: Linear<B>,
    /// The group the output features are split over.
    #[module(skip)]
    pub tp: TensorParallel,
}

impl<B: Backend> ColumnParallelLinear<B> {
    /// This rank's slice of `linear` (every rank passes the same layer).
    pub fn from_linear(linear: Linear<B>, tp: TensorParallel) -> Result<Self> {
        Ok(Self {
            linear: tp.column_slice(linear, "column parallel linear")?,
            tp,
        })
    }

    /// This rank's slice of the output, `[..., d_output / size]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Result<Tensor<B, D>> {
        Ok(self.linear.forward(self.tp.copy_to_region(x)?))
    }

    /// The whole layer, gathered from every rank's slice.
    pub fn into_linear(self) -> Result<Linear<B>> {
        self.tp.gather_columns(self.linear)
    }
}

/// A linear layer whose input features are split over the ranks (Megatron's
/// `RowParallelLinear` with `input_is_parallel=True`): each rank multiplies its slice of the
/// input by its rows of the weight and the partial outputs are summed over the ranks. The
/// bias lives on rank 0, so that it is added once.
#[derive(Module, Debug)]
pub struct RowParallelLinear<B: Backend> {
    /// This rank's [`TensorParallel::row_slice`] of the layer.
    pub linear: Linear<B>,
    /// Whether the whole layer has a bias (rank 0's).
    #[module(skip)]
    pub has_bias: bool,
    /// The group the input features are split over.
    #[module(skip)]
    pub tp: TensorParallel,
}

impl<B: Backend> RowParallelLinear<B> {
    /// This rank's slice of `linear` (every rank passes the same layer).
    pub fn from_linear(linear: Linear<B>, tp: TensorParallel) -> Result<Self> {
        Ok(Self {
            has_bias: linear.bias.is_some(),
            linear: tp.row_slice(linear, "row parallel linear")?,
            tp,
        })
    }

    /// The whole output, `[..., d_output]`, from this rank's slice of the input
    /// `[..., d_input / size]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Result<Tensor<B, D>> {
        self.tp.reduce_from_region(self.linear.forward(x))
    }

    /// The whole layer, gathered from every rank's slice.
    pub fn into_linear(self) -> Result<Linear<B>> {
        self.tp.gather_rows(self.linear, self.has_bias)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ThreadGroup;
    use burn::backend::{Autodiff, Flex};
    use burn::nn::LinearConfig;
    use burn::tensor::{activation, ElementConversion};

    type Ad = Autodiff<Flex>;

    /// The largest absolute difference between two tensors' values.
    fn max_diff<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
        (a - b).abs().max().into_scalar().elem::<f32>()
    }

    /// An MLP block `down(gelu(up(x)))` with biases, and an input: the same on every rank.
    fn block<B: Backend>() -> (Linear<B>, Linear<B>, Tensor<B, 3>) {
        // Values from a formula rather than the backend's generator, which is shared by the
        // ranks' threads (and the other tests).
        let device = Default::default();
        let values = |shape: &[usize], phase: f32| {
            let n = shape.iter().product::<usize>();
            let v = (0..n)
                .map(|i| (i as f32 * 0.37 + phase).sin() * 0.5)
                .collect();
            TensorData::new(v, shape.to_vec())
        };
        let linear = |d_in: usize, d_out: usize, phase: f32| Linear {
            weight: Param::from_tensor(Tensor::from_data(values(&[d_in, d_out], phase), &device)),
            bias: Some(Param::from_tensor(Tensor::from_data(
                values(&[d_out], phase + 1.0),
                &device,
            ))),
        };
        let x = Tensor::from_data(values(&[2, 3, 6], 3.0), &device);
        (linear(6, 8, 0.0), linear(8, 6, 2.0), x)
    }

    /// Loss, input gradient and the whole layers' gradients of the block, run split over
    /// `group` (whole, for a group of one).
    #[allow(clippy::type_complexity)]
    fn run_split(
        group: Arc<dyn ProcessGroup>,
    ) -> (
        f32,
        Tensor<Ad, 3>,
        Vec<Tensor<Flex, 2>>,
        Vec<Tensor<Flex, 1>>,
    ) {
        let (up, down, x) = block::<Ad>();
        let tp = TensorParallel::new(group);
        let up = ColumnParallelLinear::from_linear(up, tp.clone()).unwrap();
        let down = RowParallelLinear::from_linear(down, tp.clone()).unwrap();
        let x = x.require_grad();
        let hidden = activation::gelu(up.forward(x.clone()).unwrap());
        let y = down.forward(hidden).unwrap();
        let loss = (y.clone() * y).sum();
        let grads = loss.backward();
        let grad_of = |p: &Param<Tensor<Ad, 2>>| p.val().grad(&grads).unwrap();
        let bias_grad = |p: &Option<Param<Tensor<Ad, 1>>>| match p {
            Some(p) => p.val().grad(&grads).unwrap(),
            None => Tensor::zeros([6], &Default::default()),
        };
        // The slices' gradients, gathered into whole ones (a row-parallel bias: rank 0's).
        let g_up = tp.gather(grad_of(&up.linear.weight), 1).unwrap();
        let g_up_bias = tp.gather(bias_grad(&up.linear.bias), 0).unwrap();
        let g_down = tp.gather(grad_of(&down.linear.weight), 0).unwrap();
        let mut g_down_bias = bias_grad(&down.linear.bias)
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        tp.group().broadcast(&mut g_down_bias, 0).unwrap();
        let g_down_bias = Tensor::from_data(TensorData::new(g_down_bias, [6]), &Default::default());
        let dx = Tensor::from_inner(x.grad(&grads).unwrap());
        (
            loss.into_scalar().elem::<f32>(),
            dx,
            vec![g_up, g_down],
            vec![g_up_bias, g_down_bias],
        )
    }

    /// Forward and backward of a column → row parallel MLP equal the whole block's on 2 and 4
    /// ranks: the loss, the input's gradient (summed by `f`) and every weight's gradient.
    #[test]
    fn column_then_row_parallel_equals_the_whole_block() {
        let (loss, dx, dw, db) = run_split(Arc::new(crate::SingleProcess));
        for ranks in [2, 4] {
            for (rank, (l, gx, gw, gb)) in ThreadGroup::run(ranks, |g| run_split(Arc::new(g)))
                .into_iter()
                .enumerate()
            {
                let at = format!("{ranks} ranks, rank {rank}");
                assert!(
                    (l - loss).abs() < 1e-5 * loss.abs().max(1.0),
                    "{at}: loss {l} vs {loss}"
                );
                assert!(max_diff(gx, dx.clone()) < 1e-5, "{at}: input gradient");
                for (i, (a, b)) in gw.into_iter().zip(&dw).enumerate() {
                    assert!(max_diff(a, b.clone()) < 1e-5, "{at}: weight {i}");
                }
                for (i, (a, b)) in gb.into_iter().zip(&db).enumerate() {
                    assert!(max_diff(a, b.clone()) < 1e-5, "{at}: bias {i}");
                }
            }
        }
    }

    /// Slicing and gathering back gives the layer itself; without autodiff (inference) the
    /// block runs too.
    #[test]
    fn slices_gather_back_to_the_layer_and_run_without_autodiff() {
        let (up, down, x) = block::<Flex>();
        let whole = down.forward(activation::gelu(up.forward(x)));
        let results = ThreadGroup::run(2, |group| {
            let (up, down, x) = block::<Flex>();
            let tp = TensorParallel::new(Arc::new(group));
            let up = ColumnParallelLinear::from_linear(up, tp.clone()).unwrap();
            let down = RowParallelLinear::from_linear(down, tp.clone()).unwrap();
            let y = down
                .forward(activation::gelu(up.forward(x).unwrap()))
                .unwrap();
            let (up, down) = (up.into_linear().unwrap(), down.into_linear().unwrap());
            (y, up, down)
        });
        for (y, up2, down2) in results {
            assert!(max_diff(y, whole.clone()) < 1e-5);
            assert_eq!(max_diff(up2.weight.val(), up.weight.val()), 0.0);
            assert_eq!(max_diff(down2.weight.val(), down.weight.val()), 0.0);
            let (b, b2) = (down.bias.clone().unwrap(), down2.bias.unwrap());
            assert_eq!(max_diff(b2.val(), b.val()), 0.0);
        }
    }

    /// A width the group does not divide is an error naming the layer and the numbers.
    #[test]
    fn uneven_split_is_an_error_naming_the_layer() {
        let errors = ThreadGroup::run(4, |group| {
            let device = Default::default();
            let layer = LinearConfig::new(6, 6).init::<Flex>(&device);
            ColumnParallelLinear::from_linear(layer, TensorParallel::new(Arc::new(group)))
                .unwrap_err()
                .to_string()
        });
        assert!(
            errors[0].contains("column parallel linear: output features: 6 does not divide into 4"),
            "{}",
            errors[0]
        );
    }
}
