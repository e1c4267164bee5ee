//! `ember_train::TrainableModel` for the encoder heads and the causal LMs (feature `train`), so
//! that the `Trainer` fine-tunes them: a collated batch in, HF's loss and the logits out. Also
//! for [`AnyCausalLm`], with the burn `Module` impl the `Trainer` needs of it.

use crate::auto_causal::AnyCausalLm;
use crate::bert::EncoderInput;
use crate::bloom::BloomForCausalLM;
use crate::causal::{CausalLmInput, CausalLmOutput};
use crate::gpt2::GPT2LMHeadModel;
use crate::heads::{
    BertForMaskedLM, BertForSequenceClassification, BertForTokenClassification, SequenceLabels,
    TokenLogitsOutput,
};
use crate::llama::LlamaForCausalLM;
use burn::module::{AutodiffModule, Module};
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

// ---- AnyCausalLm -------------------------------------------------------------------------------
//
// `AnyCausalLm` is a plain enum in `auto_causal.rs`; the `Trainer` needs a burn `Module`, so the
// `Module` / `AutodiffModule` impls (what `#[derive(Module)]` writes for an enum, except that
// visiting is transparent: parameter paths are the inner model's) live here with its
// `TrainableModel`. Every method delegates to the variant.

/// The record of an [`AnyCausalLm`]: the record of the variant it holds.
#[derive(burn::record::Record)]
pub enum AnyCausalLmRecord<B: Backend> {
    /// A `LlamaForCausalLM`'s record.
    Llama(<LlamaForCausalLM<B> as Module<B>>::Record),
    /// A `BloomForCausalLM`'s record.
    Bloom(<BloomForCausalLM<B> as Module<B>>::Record),
    /// A `GPT2LMHeadModel`'s record.
    Gpt2(<GPT2LMHeadModel<B> as Module<B>>::Record),
}

/// Runs `$body` with `$m` bound to the inner model; with `wrap`, rebuilds the same variant
/// around the result.
macro_rules! any_causal {
    ($self:expr, $m:ident => $body:expr) => {
        match $self {
            AnyCausalLm::Llama($m) => $body,
            AnyCausalLm::Bloom($m) => $body,
            AnyCausalLm::Gpt2($m) => $body,
        }
    };
    (wrap $self:expr, $m:ident => $body:expr) => {
        match $self {
            AnyCausalLm::Llama($m) => AnyCausalLm::Llama($body),
            AnyCausalLm::Bloom($m) => AnyCausalLm::Bloom($body),
            AnyCausalLm::Gpt2($m) => AnyCausalLm::Gpt2($body),
        }
    };
}

impl<B: Backend> Module<B> for AnyCausalLm<B> {
    type Record = AnyCausalLmRecord<B>;

    fn collect_devices(&self, devices: burn::module::Devices<B>) -> burn::module::Devices<B> {
        any_causal!(self, m => m.collect_devices(devices))
    }

    fn fork(self, device: &B::Device) -> Self {
        any_causal!(wrap self, m => m.fork(device))
    }

    fn to_device(self, device: &B::Device) -> Self {
        any_causal!(wrap self, m => m.to_device(device))
    }

    fn num_params(&self) -> usize {
        any_causal!(self, m => Module::num_params(m))
    }

    fn visit<V: burn::module::ModuleVisitor<B>>(&self, visitor: &mut V) {
        any_causal!(self, m => m.visit(visitor))
    }

    fn map<M: burn::module::ModuleMapper<B>>(self, mapper: &mut M) -> Self {
        any_causal!(wrap self, m => m.map(mapper))
    }

    /// Loads the record of the same architecture.
    ///
    /// # Panics
    ///
    /// When the record holds another architecture than `self` (as `#[derive(Module)]` does for
    /// enums: a record always comes from a module of the same type).
    fn load_record(self, record: Self::Record) -> Self {
        match (self, record) {
            (AnyCausalLm::Llama(m), AnyCausalLmRecord::Llama(r)) => {
                AnyCausalLm::Llama(m.load_record(r))
            }
            (AnyCausalLm::Bloom(m), AnyCausalLmRecord::Bloom(r)) => {
                AnyCausalLm::Bloom(m.load_record(r))
            }
            (AnyCausalLm::Gpt2(m), AnyCausalLmRecord::Gpt2(r)) => {
                AnyCausalLm::Gpt2(m.load_record(r))
            }
            (m, _) => panic!(
                "cannot load a record of another architecture into a {}",
                m.class_name()
            ),
        }
    }

    fn into_record(self) -> Self::Record {
        match self {
            AnyCausalLm::Llama(m) => AnyCausalLmRecord::Llama(m.into_record()),
            AnyCausalLm::Bloom(m) => AnyCausalLmRecord::Bloom(m.into_record()),
            AnyCausalLm::Gpt2(m) => AnyCausalLmRecord::Gpt2(m.into_record()),
        }
    }
}

impl<B: burn::tensor::backend::AutodiffBackend> AutodiffModule<B> for AnyCausalLm<B> {
    type InnerModule = AnyCausalLm<B::InnerBackend>;

    fn valid(&self) -> Self::InnerModule {
        any_causal!(wrap self, m => m.valid())
    }

    fn from_inner(module: Self::InnerModule) -> Self {
        match module {
            AnyCausalLm::Llama(m) => AnyCausalLm::Llama(LlamaForCausalLM::from_inner(m)),
            AnyCausalLm::Bloom(m) => AnyCausalLm::Bloom(BloomForCausalLM::from_inner(m)),
            AnyCausalLm::Gpt2(m) => AnyCausalLm::Gpt2(GPT2LMHeadModel::from_inner(m)),
        }
    }
}

impl<B: burn::tensor::backend::AutodiffBackend> burn::module::HasAutodiffModule<B>
    for AnyCausalLm<B::InnerBackend>
{
    type TrainModule = AnyCausalLm<B>;
}

/// The `Trainer` trains whichever architecture `AutoModelForCausalLM` loaded: each method is
/// the variant's own `TrainableModel` method.
impl<B: Backend> TrainableModel<B> for AnyCausalLm<B> {
    fn forward_batch(&self, batch: Batch<B>) -> Result<ModelOutput<B>, String> {
        any_causal!(self, m => m.forward_batch(batch))
    }

    fn trainable_params(&self) -> Vec<TrainableParam> {
        any_causal!(self, m => m.trainable_params())
    }

    fn with_stable_param_ids(self) -> Self {
        any_causal!(wrap self, m => TrainableModel::with_stable_param_ids(m))
    }

    fn save_pretrained(&self, dir: &Path) -> Result<(), String> {
        any_causal!(self, m => TrainableModel::save_pretrained(m, dir))
    }

    fn load_weights(self, dir: &Path) -> Result<Self, String> {
        Ok(any_causal!(wrap self, m => TrainableModel::load_weights(m, dir)?))
    }
}
