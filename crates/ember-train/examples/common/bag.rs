//! What the two loop examples share: a small model and a generated task, so that they run in
//! seconds and differ only in the loop.

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use ember_datasets::{Batch, BatchLabels, Dataset};

/// Mean of the token embeddings (padding masked out), then a linear layer.
#[derive(Module, Debug)]
pub struct BagOfEmbeddings<B: Backend> {
    embedding: Embedding<B>,
    classifier: Linear<B>,
}

/// The model's output on a batch.
pub struct Output<B: Backend> {
    /// Mean cross entropy, `[1]`.
    pub loss: Tensor<B, 1>,
    /// `[batch, 2]`.
    pub logits: Tensor<B, 2>,
    /// `[batch]`.
    pub labels: Tensor<B, 1, Int>,
}

impl<B: Backend> BagOfEmbeddings<B> {
    /// A model with fresh random weights.
    pub fn new(device: &B::Device) -> Self {
        Self {
            embedding: EmbeddingConfig::new(21, 16).init(device),
            classifier: LinearConfig::new(16, 2).init(device),
        }
    }

    /// Loss and logits of a batch with one label per sequence.
    pub fn forward(&self, batch: Batch<B>) -> Output<B> {
        let Some(BatchLabels::Sequence(labels)) = batch.labels.clone() else {
            panic!("the generated task has one label per sequence");
        };
        let mask = batch.attention_mask.clone().float().unsqueeze_dim::<3>(2);
        let summed = (self.embedding.forward(batch.input_ids) * mask.clone()).sum_dim(1);
        let mean = (summed / mask.sum_dim(1)).squeeze_dim::<2>(1);
        let logits = self.classifier.forward(mean);
        let loss = log_softmax(logits.clone(), 1)
            .gather(1, labels.clone().unsqueeze_dim(1))
            .mean()
            .neg();
        Output {
            loss,
            logits,
            labels,
        }
    }
}

/// 160 training and 41 evaluation sequences (41: not a multiple of the ranks' batches, so
/// `gather_for_metrics` has repeats to drop); label 1 when token 7 occurs.
pub fn datasets() -> Result<(Dataset, Dataset), ember_datasets::DatasetError> {
    let rows: Vec<_> = (0..201u64)
        .map(|i| {
            let ids: Vec<u64> = (0..6).map(|j| (i * 7 + j * 3) % 20 + 1).collect();
            serde_json::json!({"input_ids": ids, "attention_mask": vec![1; 6], "label": u8::from(ids.contains(&7))})
        })
        .collect();
    Ok((
        Dataset::from_json_rows(&rows[..160])?,
        Dataset::from_json_rows(&rows[160..])?,
    ))
}
