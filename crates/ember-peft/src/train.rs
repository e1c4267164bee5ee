//! `ember_train::TrainableModel` for [`PeftModel`] (feature `train`): the Trainer trains only
//! the active adapter (and its `modules_to_save` copies); the base weights are frozen, so they
//! get neither gradient buffers nor optimizer state. Checkpoints hold the adapter files, as
//! HF's Trainer writes them for a peft model.

use crate::model::PeftModel;
use crate::visit::AdaptableModel;
use burn::tensor::backend::Backend;
use ember_datasets::Batch;
use ember_train::{ModelOutput, TrainableModel, TrainableParam};
use std::path::Path;

impl<B, M> TrainableModel<B> for PeftModel<B, M>
where
    B: Backend,
    M: TrainableModel<B> + AdaptableModel<B>,
    PeftModel<B, M>: burn::module::Module<B> + Clone + Send,
{
    fn forward_batch(&self, batch: Batch<B>) -> Result<ModelOutput<B>, String> {
        self.base_model.forward_batch(batch)
    }

    fn trainable_params(&self) -> Vec<TrainableParam> {
        self.named_parameters()
            .into_iter()
            .filter(|p| p.trainable)
            .map(|p| TrainableParam {
                name: p.name,
                id: p.id,
                rank: p.shape.len(),
            })
            .collect()
    }

    fn with_stable_param_ids(self) -> Self {
        let PeftModel {
            base_model,
            peft_config,
            active_adapter,
            ..
        } = self;
        let mut peft = PeftModel::rebuild(
            base_model.with_stable_param_ids(),
            peft_config,
            active_adapter,
        );
        peft = peft.with_stable_adapter_ids();
        peft
    }

    fn save_pretrained(&self, dir: &Path) -> Result<(), String> {
        PeftModel::save_pretrained(self, dir).map_err(|e| e.to_string())
    }

    fn load_weights(mut self, dir: &Path) -> Result<Self, String> {
        self.load_adapter_weights(dir).map_err(|e| e.to_string())?;
        Ok(self)
    }
}
