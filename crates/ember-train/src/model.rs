//! What the [`Trainer`](crate::Trainer) needs of a model: HF's `model(**batch)` returning
//! `loss` and `logits`, parameter names (for weight-decay groups), and `save_pretrained`.
//!
//! `ember-train` knows no architecture: `ember-models` implements this trait for its models
//! (feature `train`), and any other burn module can implement it too.

use burn::module::{Module, ParamId};
use burn::tensor::{backend::Backend, Tensor};
use ember_datasets::Batch;
use std::path::Path;

/// A parameter as the trainer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainableParam {
    /// The HF name (`bert.encoder.layer.0.output.LayerNorm.weight`): weight decay skips biases
    /// and normalisation weights by name, as HF does.
    pub name: String,
    /// The burn parameter id (gradients and optimizer state are keyed by it).
    pub id: ParamId,
    /// The tensor's rank.
    pub rank: usize,
}

/// The output of one forward pass on a batch with labels.
#[derive(Debug, Clone)]
pub struct ModelOutput<B: Backend> {
    /// The mean loss, `[1]`.
    pub loss: Tensor<B, 1>,
    /// `[batch, positions, classes]`: one position for a sequence classifier, one per token for
    /// a token classifier.
    pub logits: Tensor<B, 3>,
}

/// A model the [`Trainer`](crate::Trainer) can train and evaluate.
pub trait TrainableModel<B: Backend>: Module<B> + Clone + Send {
    /// Loss and logits for a collated batch that carries labels.
    fn forward_batch(&self, batch: Batch<B>) -> Result<ModelOutput<B>, String>;

    /// Every trainable parameter, in module order.
    fn trainable_params(&self) -> Vec<TrainableParam>;

    /// Gives every parameter an id derived from its name, so that optimizer state saved by one
    /// process matches the parameters of the model another process builds (resuming).
    fn with_stable_param_ids(self) -> Self;

    /// Writes `config.json` and `model.safetensors` into `dir` (HF's `save_pretrained`).
    fn save_pretrained(&self, dir: &Path) -> Result<(), String>;

    /// This model with the weights a `save_pretrained` folder holds, parameter ids unchanged.
    fn load_weights(self, dir: &Path) -> Result<Self, String>;
}
