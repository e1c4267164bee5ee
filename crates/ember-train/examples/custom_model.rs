//! The `Trainer` on a model of your own: a bag-of-embeddings classifier implements
//! `TrainableModel` (HF's contract: a batch in, `loss` and `logits` out) and trains on a
//! generated task with evaluation and metrics each epoch.
//!
//!     cargo run -p ember-train --example custom_model

use burn::backend::{Autodiff, Flex};
use burn::module::{Module, Param, ParamId};
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::tensor::backend::Backend;
use ember_datasets::{BatchLabels, DataCollatorWithPadding, Dataset};
use ember_train::{
    metrics, require_labels, IntervalStrategy, ModelOutput, TrainableModel, TrainableParam,
    Trainer, TrainingArguments,
};
use std::path::Path;

/// Mean of the token embeddings (padding masked out), then a linear layer.
#[derive(Module, Debug)]
struct BagOfEmbeddings<B: Backend> {
    embedding: Embedding<B>,
    classifier: Linear<B>,
}

impl<B: Backend> TrainableModel<B> for BagOfEmbeddings<B> {
    fn forward_batch(&self, batch: ember_datasets::Batch<B>) -> Result<ModelOutput<B>, String> {
        let BatchLabels::Sequence(labels) = require_labels(&batch)?.clone() else {
            return Err("one label per sequence expected".into());
        };
        let mask = batch.attention_mask.clone().float().unsqueeze_dim::<3>(2);
        let summed = (self.embedding.forward(batch.input_ids) * mask.clone()).sum_dim(1);
        let mean = (summed / mask.sum_dim(1)).squeeze_dim::<2>(1);
        let logits = self.classifier.forward(mean);
        let loss = ember_train_loss(logits.clone(), labels);
        Ok(ModelOutput {
            loss,
            logits: logits.unsqueeze_dim(1),
        })
    }

    fn trainable_params(&self) -> Vec<TrainableParam> {
        let bias = self
            .classifier
            .bias
            .as_ref()
            .expect("the classifier has a bias");
        vec![
            TrainableParam {
                name: "embedding.weight".into(),
                id: self.embedding.weight.id,
                rank: 2,
            },
            TrainableParam {
                name: "classifier.weight".into(),
                id: self.classifier.weight.id,
                rank: 2,
            },
            TrainableParam {
                name: "classifier.bias".into(),
                id: bias.id,
                rank: 1,
            },
        ]
    }

    fn with_stable_param_ids(mut self) -> Self {
        self.embedding.weight.id = ParamId::from(1);
        self.classifier.weight.id = ParamId::from(2);
        self.classifier.bias = self.classifier.bias.map(|mut b: Param<_>| {
            b.id = ParamId::from(3);
            b
        });
        self
    }

    fn save_pretrained(&self, _dir: &Path) -> Result<(), String> {
        Ok(()) // A real model writes its files here (ember-models writes config.json + safetensors).
    }

    fn load_weights(self, _dir: &Path) -> Result<Self, String> {
        Ok(self)
    }
}

/// Mean cross entropy.
fn ember_train_loss<B: Backend>(
    logits: burn::tensor::Tensor<B, 2>,
    labels: burn::tensor::Tensor<B, 1, burn::tensor::Int>,
) -> burn::tensor::Tensor<B, 1> {
    let log_probs = burn::tensor::activation::log_softmax(logits, 1);
    log_probs.gather(1, labels.unsqueeze_dim(1)).mean().neg()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    type B = Autodiff<Flex>;
    let device = Default::default();
    // Label 1 when token 7 occurs in the sequence.
    let rows: Vec<_> = (0..200u64)
        .map(|i| {
            let ids: Vec<u64> = (0..6).map(|j| (i * 7 + j * 3) % 20 + 1).collect();
            serde_json::json!({"input_ids": ids, "attention_mask": vec![1; 6], "label": u8::from(ids.contains(&7))})
        })
        .collect();
    let (train, eval) = (
        Dataset::from_json_rows(&rows[..160])?,
        Dataset::from_json_rows(&rows[160..])?,
    );
    let model = BagOfEmbeddings::<B> {
        embedding: EmbeddingConfig::new(21, 16).init(&device),
        classifier: LinearConfig::new(16, 2).init(&device),
    };
    let mut args = TrainingArguments::new(std::env::temp_dir().join("ember-custom-model"));
    args.num_train_epochs = 10.0;
    args.learning_rate = 5e-2;
    args.per_device_train_batch_size = 16;
    args.eval_strategy = IntervalStrategy::Epoch;
    args.save_strategy = IntervalStrategy::No;
    args.logging_strategy = IntervalStrategy::Epoch;
    let mut trainer = Trainer::new(args, model, DataCollatorWithPadding::new(0), device)?
        .train_dataset(train)
        .eval_dataset(eval.clone())
        .compute_metrics(|p| {
            let (predictions, labels) = p.sequence_classes();
            metrics::classification_metrics(&predictions, &labels)
        });
    let summary = trainer.train()?;
    println!("train_loss {:.4}", summary["train_loss"]);
    println!("{:?}", trainer.evaluate(&eval)?);
    Ok(())
}
