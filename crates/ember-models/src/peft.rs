//! `ember_peft::AdaptableModel` for every model: the layer walk by HF path that
//! `get_peft_model`, adapter files and `named_modules()` read.

use crate::bert::BertModel;
use crate::bloom::BloomForCausalLM;
use crate::gpt2::GPT2LMHeadModel;
use crate::heads::{
    BertForMaskedLM, BertForQuestionAnswering, BertForSequenceClassification,
    BertForTokenClassification,
};
use crate::llama::LlamaForCausalLM;
use crate::params::adaptable;
use burn::tensor::backend::Backend;

adaptable!(BertModel, |m| m.config.model_type.clone());
adaptable!(BertForSequenceClassification, |m| m
    .config()
    .model_type
    .clone());
adaptable!(BertForTokenClassification, |m| m
    .config()
    .model_type
    .clone());
adaptable!(BertForMaskedLM, |m| m.config().model_type.clone());
adaptable!(BertForQuestionAnswering, |m| m.config().model_type.clone());
adaptable!(LlamaForCausalLM, |m| m.config.model_type.clone());
adaptable!(BloomForCausalLM, |m| m.config.model_type.clone());
adaptable!(GPT2LMHeadModel, |m| m.config.model_type.clone());

/// Every causal architecture behind one type (feature `train`, where `AnyCausalLm` is a burn
/// module): the walk of the model inside.
#[cfg(feature = "train")]
mod any_causal {
    use crate::auto_causal::AnyCausalLm;
    use burn::module::{Content, ModuleDisplay, ModuleDisplayDefault};
    use burn::tensor::backend::Backend;
    use ember_peft::{AdaptableModel, LayerVisitor};

    impl<B: Backend> ModuleDisplayDefault for AnyCausalLm<B> {
        fn content(&self, content: Content) -> Option<Content> {
            match self {
                Self::Llama(m) => m.content(content),
                Self::Bloom(m) => m.content(content),
                Self::Gpt2(m) => m.content(content),
            }
        }
    }

    impl<B: Backend> ModuleDisplay for AnyCausalLm<B> {}

    impl<B: Backend> AdaptableModel<B> for AnyCausalLm<B> {
        fn visit_layers(&mut self, visitor: &mut dyn LayerVisitor<B>) {
            match self {
                Self::Llama(m) => m.visit_layers(visitor),
                Self::Bloom(m) => m.visit_layers(visitor),
                Self::Gpt2(m) => m.visit_layers(visitor),
            }
        }

        fn model_type(&self) -> Option<String> {
            match self {
                Self::Llama(m) => m.model_type(),
                Self::Bloom(m) => m.model_type(),
                Self::Gpt2(m) => m.model_type(),
            }
        }
    }
}
