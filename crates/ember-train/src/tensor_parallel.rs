//! The [`Trainer`](crate::Trainer)'s tensor-parallel hook ([`Trainer::tensor_parallel`]
//! (crate::Trainer::tensor_parallel)): what the Trainer needs to know about a model split over
//! a mesh's tensor group, which it cannot work out from the model alone.
//!
//! - How to put the model together (`gather`) and apart again (`split`): checkpoints and the
//!   final model are written whole, so that they load anywhere (one process, another tensor
//!   size, transformers), and resuming loads the whole model and splits it again.
//! - Which parameters are slices: the global gradient norm that clipping uses sums a slice's
//!   squares over the tensor group, and a replicated parameter's once.

use crate::error::{Result, TrainError};
use crate::model::TrainableParam;
use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor};
use ember_distributed::{ProcessGroup, ReduceOp};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// A model transformation that may fail with a message (a gather or a split).
pub(crate) type ModelFn<M> = Arc<dyn Fn(M) -> std::result::Result<M, String> + Send + Sync>;

/// A model split tensor parallel: the groups and the two transformations.
pub(crate) struct TensorParallelHook<M> {
    /// Every rank of the mesh: checkpoints are coordinated over it.
    pub world: Arc<dyn ProcessGroup>,
    /// This rank's tensor group: the ranks holding the other slices of the same replica.
    pub tensor: Arc<dyn ProcessGroup>,
    /// The whole model from every rank's slice (a collective over the tensor group).
    pub gather: ModelFn<M>,
    /// This rank's slice of the whole model.
    pub split: ModelFn<M>,
}

impl<M> Clone for TensorParallelHook<M> {
    fn clone(&self) -> Self {
        Self {
            world: self.world.clone(),
            tensor: self.tensor.clone(),
            gather: self.gather.clone(),
            split: self.split.clone(),
        }
    }
}

impl<M> TensorParallelHook<M> {
    /// `gather(model)`, its message as a [`TrainError::Step`].
    pub fn gather(&self, model: M) -> Result<M> {
        (self.gather)(model).map_err(|e| TrainError::Step(format!("gathering the model: {e}")))
    }

    /// `split(model)`, its message as a [`TrainError::Step`].
    pub fn split(&self, model: M) -> Result<M> {
        (self.split)(model).map_err(|e| TrainError::Step(format!("splitting the model: {e}")))
    }
}

/// The shape of every float parameter of a module, by id.
struct Shapes(HashMap<ParamId, Vec<usize>>);

impl<B: Backend> ModuleVisitor<B> for Shapes {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.0.insert(param.id, param.val().dims().to_vec());
    }
}

/// The ids of the parameters that `slice` holds a part of: those whose shape differs from the
/// same parameter (same id: both models carry the ids derived from the names) in `whole`.
/// A row-parallel layer's bias, which only tensor rank 0 holds, whole, is not a slice.
pub(crate) fn sliced_params<B: Backend, M: Module<B>>(slice: &M, whole: &M) -> HashSet<ParamId> {
    let (mut ours, mut all) = (Shapes(HashMap::new()), Shapes(HashMap::new()));
    slice.visit(&mut ours);
    whole.visit(&mut all);
    ours.0
        .into_iter()
        .filter(|(id, shape)| all.0.get(id) != Some(shape))
        .map(|(id, _)| id)
        .collect()
}

/// `clip_grad_norm` for a model split over `tensor`: the norm is that of the whole model's
/// gradient, the squares of each slice summed over the group and those of a replicated
/// parameter (the same on every rank) counted once, on tensor rank 0; so every rank scales by
/// the same factor, as one process would. Returns the norm before clipping.
pub(crate) fn clip_grad_norm_sliced<B: AutodiffBackend>(
    grads: &mut GradientsParams,
    params: &[TrainableParam],
    sliced: &HashSet<ParamId>,
    tensor: &dyn ProcessGroup,
    max_norm: f64,
) -> Result<f64> {
    let square_sum = |grads: &GradientsParams, p: &TrainableParam| -> f64 {
        macro_rules! by_rank {
            ($($d:literal),*) => {
                match p.rank {
                    $($d => grads
                        .get::<B::InnerBackend, $d>(p.id)
                        .map_or(0.0, |g| g.powi_scalar(2).sum().into_scalar().elem::<f64>()),)*
                    _ => 0.0,
                }
            };
        }
        by_rank!(1, 2, 3, 4)
    };
    let mut squares = 0.0f64;
    for p in params {
        if sliced.contains(&p.id) || tensor.rank() == 0 {
            squares += square_sum(grads, p);
        }
    }
    let mut total = [squares as f32];
    tensor.all_reduce(&mut total, ReduceOp::Sum)?;
    let norm = f64::from(total[0]).sqrt();
    let coef = max_norm / (norm + 1e-6);
    if max_norm > 0.0 && coef < 1.0 {
        for p in params {
            macro_rules! scale {
                ($($d:literal),*) => {
                    match p.rank {
                        $($d => if let Some(g) = grads.remove::<B::InnerBackend, $d>(p.id) {
                            grads.register(p.id, g.mul_scalar(coef))
                        },)*
                        _ => {}
                    }
                };
            }
            scale!(1, 2, 3, 4);
        }
    }
    Ok(norm)
}
