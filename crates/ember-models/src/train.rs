//! `ember_train::TrainableModel` for the encoder heads and the causal LMs (feature `train`), so
//! that the `Trainer` fine-tunes them: a collated batch in, HF's loss and the logits out.

use crate::bert::EncoderInput;
use crate::bloom::BloomForCausalLM;
use crate::causal::{CausalLmInput, CausalLmOutput};
use crate::gpt2::GPT2LMHeadModel;
use crate::heads::{
    BertForMaskedLM, BertForSequenceClassification, BertForTokenClassification, SequenceLabels,
    TokenLogitsOutput,
};
use crate::llama::LlamaForCausalLM;
use burn::tensor::backend::Backend;
use ember_datasets::{Batch, BatchLabels};
use ember_train::{require_labels, ModelOutput, TrainableModel, TrainableParam};
use std::path::Path;

fn input<B: Backend>(batch: &Batch<B>) -> EncoderInput<B> {
    let mut input = EncoderInput::new(batch.input_ids.clone())
        .with_attention_mask(batch.attention_mask.clone());
    if let Some(types) = &batch.token_type_ids {
        input = input.with_token_type_ids(types.clone());
    }
    input
}

fn token_labels<B: Backend>(
    batch: &Batch<B>,
) -> Result<burn::tensor::Tensor<B, 2, burn::tensor::Int>, String> {
    match require_labels(batch)? {
        BatchLabels::Tokens(t) => Ok(t.clone()),
        BatchLabels::Sequence(_) => {
            Err("this model needs one label per token; the batch has one per sequence".into())
        }
    }
}

/// The Trainer's view of a per-token head's output (token classifier, masked LM).
fn token_output<B: Backend>(
    out: crate::Result<TokenLogitsOutput<B>>,
) -> Result<ModelOutput<B>, String> {
    let out = out.map_err(|e| e.to_string())?;
    Ok(ModelOutput {
        loss: out.loss.expect("labels were given"),
        logits: out.logits,
    })
}

/// A causal LM's forward pass on a collated batch: ids, mask and the labels that
/// `DataCollatorForLanguageModeling` writes (shifted inside the model).
fn causal_forward<B: Backend>(
    batch: &Batch<B>,
    forward: impl FnOnce(CausalLmInput<B>) -> crate::Result<CausalLmOutput<B>>,
) -> Result<ModelOutput<B>, String> {
    let input = CausalLmInput::new(batch.input_ids.clone())
        .with_attention_mask(batch.attention_mask.clone())
        .with_labels(token_labels(batch)?);
    let out = forward(input).map_err(|e| e.to_string())?;
    Ok(ModelOutput {
        loss: out.loss.expect("labels were given"),
        logits: out.logits,
    })
}

macro_rules! trainable {
    ($model:ident, |$m:ident, $batch:ident| $forward:expr) => {
        impl<B: Backend> TrainableModel<B> for $model<B> {
            fn forward_batch(&self, $batch: Batch<B>) -> Result<ModelOutput<B>, String> {
                let $m = self;
                $forward
            }

            fn trainable_params(&self) -> Vec<TrainableParam> {
                self.named_parameters()
                    .into_iter()
                    .map(|p| TrainableParam {
                        name: p.name,
                        id: p.id,
                        rank: p.shape.len(),
                    })
                    .collect()
            }

            fn with_stable_param_ids(self) -> Self {
                $model::with_stable_param_ids(self)
            }

            fn save_pretrained(&self, dir: &Path) -> Result<(), String> {
                $model::save_pretrained(self, dir).map_err(|e| e.to_string())
            }

            fn load_weights(self, dir: &Path) -> Result<Self, String> {
                $model::load_weights(self, dir).map_err(|e| e.to_string())
            }
        }
    };
}

trainable!(BertForSequenceClassification, |m, batch| {
    let labels =
        match require_labels(&batch)? {
            BatchLabels::Sequence(t) => SequenceLabels::Classes(t.clone()),
            BatchLabels::Tokens(_) => return Err(
                "a sequence classifier needs one label per sequence; the batch has one per token"
                    .into(),
            ),
        };
    let out = m
        .forward(input(&batch), Some(labels))
        .map_err(|e| e.to_string())?;
    Ok(ModelOutput {
        loss: out.loss.expect("labels were given"),
        logits: out.logits.unsqueeze_dim(1),
    })
});

trainable!(BertForTokenClassification, |m, batch| {
    token_output(m.forward(input(&batch), Some(token_labels(&batch)?)))
});

trainable!(BertForMaskedLM, |m, batch| {
    token_output(m.forward(input(&batch), Some(token_labels(&batch)?)))
});

trainable!(LlamaForCausalLM, |m, batch| {
    causal_forward(&batch, |i| m.forward(i))
});

trainable!(BloomForCausalLM, |m, batch| {
    causal_forward(&batch, |i| m.forward(i))
});

trainable!(GPT2LMHeadModel, |m, batch| {
    causal_forward(&batch, |i| m.forward(i))
});
