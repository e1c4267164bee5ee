//! [`DataParallel`]: torch DDP's two collective steps over a burn module: rank 0's parameters
//! broadcast at the start, gradients averaged over ranks in buckets after each backward pass.

use crate::error::{DistributedError, Result};
use crate::group::{ProcessGroup, ReduceOp};
use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use std::sync::Arc;

/// torch DDP's default `bucket_cap_mb`: gradients are all-reduced in messages of this size.
pub const DEFAULT_BUCKET_CAP_MB: f64 = 25.0;

/// Data parallel over a [`ProcessGroup`], as torch's `DistributedDataParallel` does it: every
/// rank holds the whole model and trains on its own shard of each batch; after the backward
/// pass the gradients are averaged over ranks, so that every rank takes the same optimizer
/// step from the same weights.
///
/// * [`broadcast_parameters`](Self::broadcast_parameters): rank 0's weights everywhere, once,
///   before training (DDP's constructor).
/// * [`all_reduce_gradients`](Self::all_reduce_gradients): the mean gradient, copied into one
///   flat buffer in the module's parameter order and reduced `bucket_cap_mb` at a time, so
///   that a model of many small tensors costs a few large messages rather than one per tensor.
///   A trainable parameter without a gradient on a rank (unused in its forward pass) counts
///   as zeros there, as DDP's `find_unused_parameters` does.
///
/// With gradient accumulation, call it once per optimizer step on the accumulated gradients:
/// the micro-steps in between exchange nothing (DDP's `no_sync`).
#[derive(Clone)]
pub struct DataParallel {
    group: Arc<dyn ProcessGroup>,
    bucket_values: usize,
}

impl std::fmt::Debug for DataParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataParallel")
            .field("rank", &self.group.rank())
            .field("size", &self.group.size())
            .field("bucket_values", &self.bucket_values)
            .finish()
    }
}

impl DataParallel {
    /// Data parallel over `group`, with buckets of [`DEFAULT_BUCKET_CAP_MB`].
    pub fn new(group: Arc<dyn ProcessGroup>) -> Self {
        Self {
            group,
            bucket_values: bucket_values(DEFAULT_BUCKET_CAP_MB),
        }
    }

    /// Sets `bucket_cap_mb` (MiB of f32 gradients per message, at least one value).
    pub fn bucket_cap_mb(mut self, megabytes: f64) -> Self {
        self.bucket_values = bucket_values(megabytes);
        self
    }

    /// The process group.
    pub fn group(&self) -> &Arc<dyn ProcessGroup> {
        &self.group
    }

    /// `module` with rank 0's values in every float parameter (trainable or frozen), each
    /// keeping its dtype and whether it requires a gradient.
    pub fn broadcast_parameters<B: Backend, M: Module<B>>(&self, module: M) -> Result<M> {
        if self.group.size() == 1 {
            return Ok(module);
        }
        let mut mapper = Broadcast {
            group: self.group.as_ref(),
            error: None,
        };
        let module = module.map(&mut mapper);
        match mapper.error {
            Some(e) => Err(e),
            None => Ok(module),
        }
    }

    /// `grads` (of `module`'s trainable parameters) replaced by their mean over ranks.
    pub fn all_reduce_gradients<B: AutodiffBackend, M: AutodiffModule<B>>(
        &self,
        module: &M,
        mut grads: GradientsParams,
    ) -> Result<GradientsParams> {
        if self.group.size() == 1 {
            return Ok(grads);
        }
        let mut flatten = Flatten::<B> {
            grads: &mut grads,
            flat: Vec::with_capacity(module.num_params()),
            error: None,
            _backend: std::marker::PhantomData,
        };
        module.visit(&mut flatten);
        if let Some(e) = flatten.error {
            return Err(e);
        }
        let mut flat = flatten.flat;
        // Summed here and divided by the group size as the buffer is copied back: one pass
        // over the gradients fewer than an average.
        for bucket in flat.chunks_mut(self.bucket_values) {
            self.group.all_reduce(bucket, ReduceOp::Sum)?;
        }
        let mut restore = Restore::<B> {
            grads: &mut grads,
            flat: &flat,
            scale: 1.0 / self.group.size() as f32,
            offset: 0,
            _backend: std::marker::PhantomData,
        };
        module.visit(&mut restore);
        Ok(grads)
    }
}

fn bucket_values(megabytes: f64) -> usize {
    ((megabytes * 1024.0 * 1024.0 / 4.0) as usize).max(1)
}

/// Replaces each float parameter by rank 0's.
struct Broadcast<'a> {
    group: &'a dyn ProcessGroup,
    error: Option<DistributedError>,
}

impl<B: Backend> ModuleMapper<B> for Broadcast<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        if self.error.is_some() {
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let (dtype, device, shape) = (tensor.dtype(), tensor.device(), tensor.shape());
        let require_grad = tensor.is_require_grad();
        let mut values = match f32_values(tensor.clone().into_data(), "a parameter") {
            Ok(v) => v,
            Err(e) => {
                self.error = Some(e);
                return Param::from_mapped_value(id, tensor, mapper);
            }
        };
        if let Err(e) = self.group.broadcast(&mut values, 0) {
            self.error = Some(e);
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let value = Tensor::<B, D>::from_data(TensorData::new(values, shape), &device)
            .cast(dtype)
            .set_require_grad(require_grad);
        Param::from_mapped_value(id, value, mapper)
    }
}

/// Copies the trainable parameters' gradients (zeros where there is none) into one buffer.
struct Flatten<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    flat: Vec<f32>,
    error: Option<DistributedError>,
    _backend: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Flatten<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if !param.is_require_grad() || self.error.is_some() {
            return;
        }
        let start = self.flat.len();
        match self.grads.remove::<B::InnerBackend, D>(param.id) {
            Some(grad) => match f32_values(grad.into_data(), "a gradient") {
                Ok(values) => self.flat.extend_from_slice(&values),
                Err(e) => self.error = Some(e),
            },
            None => self.flat.resize(start + param.shape().num_elements(), 0.0),
        }
    }
}

/// Registers each trainable parameter's averaged gradient from the flat buffer, visiting the
/// parameters in the order [`Flatten`] laid them out.
struct Restore<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    flat: &'a [f32],
    /// `1 / size`: the flat buffer holds sums.
    scale: f32,
    /// Where the next parameter's gradient starts.
    offset: usize,
    _backend: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Restore<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if !param.is_require_grad() {
            return;
        }
        let shape = param.shape();
        let end = self.offset + shape.num_elements();
        let values: Vec<f32> = self.flat[self.offset..end]
            .iter()
            .map(|v| v * self.scale)
            .collect();
        self.offset = end;
        let grad = Tensor::<B::InnerBackend, D>::from_data(
            TensorData::new(values, shape),
            &param.device(),
        );
        self.grads.register::<B::InnerBackend, D>(param.id, grad);
    }
}

/// The values of `data` as f32 (half-precision values widened exactly).
fn f32_values(data: TensorData, what: &str) -> Result<Vec<f32>> {
    data.convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| DistributedError::Tensor(format!("reading {what} as f32: {e:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ThreadGroup;
    use burn::backend::{Autodiff, Flex};
    use burn::nn::{Linear, LinearConfig};
    use burn::tensor::Distribution;

    type B = Autodiff<Flex>;

    fn loss_grads(model: &Linear<B>, x: Tensor<B, 2>) -> GradientsParams {
        let loss = model.forward(x).powi_scalar(2).mean();
        GradientsParams::from_grads(loss.backward(), model)
    }

    fn grad_values(model: &Linear<B>, grads: &GradientsParams) -> Vec<f32> {
        let w = grads.get::<Flex, 2>(model.weight.id).unwrap();
        w.into_data().into_vec::<f32>().unwrap()
    }

    #[test]
    fn averaged_gradients_equal_the_gradient_of_the_combined_batch() {
        let device = Default::default();
        let model: Linear<B> = LinearConfig::new(5, 3).init(&device);
        let x = Tensor::<B, 2>::random([4, 5], Distribution::Normal(0.0, 1.0), &device);
        let whole = grad_values(&model, &loss_grads(&model, x.clone()));
        // Buckets of 7 values: the 15 weights and 3 biases cross bucket boundaries.
        let per_rank = ThreadGroup::run(2, |group| {
            let rank = group.rank();
            let ddp = DataParallel::new(Arc::new(group)).bucket_cap_mb(7.0 * 4.0 / 1048576.0);
            // Each rank starts from its own initial weights; the broadcast makes them rank 0's.
            let own: Linear<B> = if rank == 0 {
                model.clone()
            } else {
                LinearConfig::new(5, 3).init(&device)
            };
            let model = ddp.broadcast_parameters(own).unwrap();
            let shard = x.clone().slice([2 * rank..2 * rank + 2, 0..5]);
            let grads = ddp
                .all_reduce_gradients(&model, loss_grads(&model, shard))
                .unwrap();
            grad_values(&model, &grads)
        });
        for grads in per_rank {
            for (a, b) in grads.iter().zip(&whole) {
                assert!((a - b).abs() <= 1e-6, "{a} against {b}");
            }
        }
    }
}
