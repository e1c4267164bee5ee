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
/// * [`all_reduce_gradients`](Self::all_reduce_gradients): the mean gradient. Large gradients
///   are summed in place in messages of at most `bucket_cap_mb`; small ones share buckets of
///   that size, so that a model of many small tensors costs a few large messages rather than
///   one per tensor.
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
    ///
    /// Each gradient is taken out of `grads` as its own buffer (without a copy where the
    /// backend allows: Flex hands over a gradient it holds alone) and summed in place: a
    /// gradient of [`IN_PLACE_MIN_VALUES`] values or more is its own message (cut at
    /// `bucket_cap_mb`), smaller ones are copied into one shared bucket so that a model of many
    /// small tensors still costs a few messages. Then every value is divided by the group
    /// size, and the buffers go back into `grads` as tensors, again without a copy.
    pub fn all_reduce_gradients<B: AutodiffBackend, M: AutodiffModule<B>>(
        &self,
        module: &M,
        mut grads: GradientsParams,
    ) -> Result<GradientsParams> {
        if self.group.size() == 1 {
            return Ok(grads);
        }
        let mut take = Take::<B> {
            grads: &mut grads,
            taken: Vec::new(),
            error: None,
            _backend: std::marker::PhantomData,
        };
        module.visit(&mut take);
        if let Some(e) = take.error {
            return Err(e);
        }
        let mut taken = take.taken;
        self.sum_then_scale(&mut taken)?;
        let mut put_back = PutBack::<B, _> {
            grads: &mut grads,
            taken: taken.into_iter(),
            _backend: std::marker::PhantomData,
        };
        module.visit(&mut put_back);
        Ok(grads)
    }

    /// Sums every buffer over the ranks (large ones in place, small ones through a shared
    /// bucket) and divides it by the group size. Every rank passes buffers of the same sizes
    /// in the same order.
    fn sum_then_scale(&self, buffers: &mut [Vec<f32>]) -> Result<()> {
        let scale = 1.0 / self.group.size() as f32;
        let mut bucket: Vec<f32> = Vec::new();
        // The buffers whose values are in the bucket, in order.
        let mut waiting: Vec<usize> = Vec::new();
        let flush = |bucket: &mut Vec<f32>, waiting: &mut Vec<usize>, buffers: &mut [Vec<f32>]| {
            if bucket.is_empty() {
                return Ok(());
            }
            self.group.all_reduce(bucket, ReduceOp::Sum)?;
            let mut offset = 0;
            for &i in waiting.iter() {
                let values = &mut buffers[i];
                for (v, sum) in values.iter_mut().zip(&bucket[offset..]) {
                    *v = sum * scale;
                }
                offset += values.len();
            }
            bucket.clear();
            waiting.clear();
            Ok::<(), DistributedError>(())
        };
        for i in 0..buffers.len() {
            let len = buffers[i].len();
            if len >= IN_PLACE_MIN_VALUES {
                for chunk in buffers[i].chunks_mut(self.bucket_values) {
                    self.group.all_reduce(chunk, ReduceOp::Sum)?;
                }
                buffers[i].iter_mut().for_each(|v| *v *= scale);
                continue;
            }
            if !bucket.is_empty() && bucket.len() + len > self.bucket_values {
                flush(&mut bucket, &mut waiting, buffers)?;
            }
            bucket.extend_from_slice(&buffers[i]);
            waiting.push(i);
        }
        flush(&mut bucket, &mut waiting, buffers)
    }
}

/// Gradients of at least this many values (256 KiB of f32) are all-reduced in place as
/// messages of their own; smaller ones share a bucket. At this size a message's fixed cost
/// (microseconds in shared memory) is small beside moving its bytes, while the copies into
/// and out of a bucket would cost a pass over the bytes each.
pub const IN_PLACE_MIN_VALUES: usize = 64 * 1024;

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

/// Takes each trainable parameter's gradient out of `grads` as f32 values (zeros where there
/// is none), in the module's parameter order.
struct Take<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    taken: Vec<Vec<f32>>,
    error: Option<DistributedError>,
    _backend: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Take<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if !param.is_require_grad() || self.error.is_some() {
            return;
        }
        let values = match self.grads.remove::<B::InnerBackend, D>(param.id) {
            // `into_data` and `into_vec` move the buffer when the tensor holds it alone.
            Some(grad) => match f32_values(grad.into_data(), "a gradient") {
                Ok(values) => values,
                Err(e) => {
                    self.error = Some(e);
                    return;
                }
            },
            None => vec![0.0; param.shape().num_elements()],
        };
        self.taken.push(values);
    }
}

/// Registers each trainable parameter's averaged gradient, visiting the parameters in the
/// order [`Take`] took them, in the parameter's dtype.
struct PutBack<'a, B: AutodiffBackend, I: Iterator<Item = Vec<f32>>> {
    grads: &'a mut GradientsParams,
    taken: I,
    _backend: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend, I: Iterator<Item = Vec<f32>>> ModuleVisitor<B> for PutBack<'_, B, I> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if !param.is_require_grad() {
            return;
        }
        let Some(values) = self.taken.next() else {
            return;
        };
        let value = param.val();
        let grad = Tensor::<B::InnerBackend, D>::from_data(
            TensorData::new(values, param.shape()),
            &value.device(),
        )
        .cast(value.dtype());
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

    /// A gradient large enough to be summed in place (cut into several messages by a small
    /// cap) next to a small one summed through the bucket.
    #[test]
    fn large_gradients_in_place_and_small_ones_in_buckets_average_alike() {
        let device = Default::default();
        let model: Linear<B> = LinearConfig::new(256, 300).init(&device);
        const { assert!(256 * 300 >= IN_PLACE_MIN_VALUES) };
        let x = Tensor::<B, 2>::random([4, 256], Distribution::Normal(0.0, 1.0), &device);
        let whole = loss_grads(&model, x.clone());
        let bias = |g: &GradientsParams| {
            let b = g.get::<Flex, 1>(model.bias.as_ref().unwrap().id).unwrap();
            b.into_data().into_vec::<f32>().unwrap()
        };
        let (whole_w, whole_b) = (grad_values(&model, &whole), bias(&whole));
        let per_rank = ThreadGroup::run(2, |group| {
            let rank = group.rank();
            let ddp = DataParallel::new(Arc::new(group)).bucket_cap_mb(0.1);
            let shard = x.clone().slice([2 * rank..2 * rank + 2, 0..256]);
            let grads = ddp
                .all_reduce_gradients(&model, loss_grads(&model, shard))
                .unwrap();
            (grad_values(&model, &grads), bias(&grads))
        });
        for (w, b) in per_rank {
            for (got, want) in [(w, &whole_w), (b, &whole_b)] {
                assert_eq!(got.len(), want.len());
                for (a, b) in got.iter().zip(want) {
                    assert!((a - b).abs() <= 1e-6, "{a} against {b}");
                }
            }
        }
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
