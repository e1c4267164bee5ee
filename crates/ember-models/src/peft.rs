//! `ember_peft::AdaptableModel` for every model: the layer walk by HF path that
//! `get_peft_model`, adapter files and `named_modules()` read.

use crate::bert::BertModel;
use crate::bloom::BloomForCausalLM;
use crate::config::BertConfig;
use crate::gpt2::GPT2LMHeadModel;
use crate::heads::{
    BertForMaskedLM, BertForQuestionAnswering, BertForSequenceClassification,
    BertForTokenClassification,
};
use crate::llama::LlamaForCausalLM;
use crate::params::adaptable;
use burn::tensor::backend::Backend;
use ember_peft::{PromptDims, TaskType};

adaptable!(BertModel, |m| m.config.model_type.clone(), |m| {
    encoder_dims(&m.config, "", vec![TaskType::FeatureExtraction])
});
adaptable!(
    BertForSequenceClassification,
    |m| m.config().model_type.clone(),
    |m| encoder_dims(
        m.config(),
        m.config().base_model_prefix(),
        vec![TaskType::SeqCls]
    )
);
adaptable!(
    BertForTokenClassification,
    |m| m.config().model_type.clone(),
    |m| encoder_dims(
        m.config(),
        m.config().base_model_prefix(),
        vec![TaskType::TokenCls]
    )
);
adaptable!(BertForMaskedLM, |m| m.config().model_type.clone(), |m| {
    encoder_dims(m.config(), m.config().base_model_prefix(), Vec::new())
});
adaptable!(
    BertForQuestionAnswering,
    |m| m.config().model_type.clone(),
    |m| encoder_dims(
        m.config(),
        m.config().base_model_prefix(),
        vec![TaskType::QuestionAns]
    )
);
adaptable!(LlamaForCausalLM, |m| m.config.model_type.clone(), |m| {
    let c = &m.config;
    PromptDims {
        word_embeddings: "model.embed_tokens".into(),
        num_layers: c.num_hidden_layers,
        hidden_size: c.hidden_size,
        num_attention_heads: c.num_attention_heads,
        // peft sizes the prefix by `num_key_value_heads` whenever the config names it.
        num_key_value_heads: Some(c.num_key_value_heads()),
        vocab_size: c.vocab_size,
        task_types: vec![TaskType::CausalLm],
    }
});
adaptable!(BloomForCausalLM, |m| m.config.model_type.clone(), |m| {
    let c = &m.config;
    PromptDims {
        word_embeddings: "transformer.word_embeddings".into(),
        num_layers: c.n_layer,
        hidden_size: c.hidden_size,
        num_attention_heads: c.n_head,
        num_key_value_heads: None,
        vocab_size: c.vocab_size,
        task_types: vec![TaskType::CausalLm],
    }
});
adaptable!(GPT2LMHeadModel, |m| m.config.model_type.clone(), |m| {
    let c = &m.config;
    PromptDims {
        word_embeddings: "transformer.wte".into(),
        num_layers: c.n_layer,
        hidden_size: c.n_embd,
        num_attention_heads: c.n_head,
        num_key_value_heads: None,
        vocab_size: c.vocab_size,
        task_types: vec![TaskType::CausalLm],
    }
});

/// The prompt-learning sizes of a BERT-family encoder whose weights sit under `prefix`.
fn encoder_dims(c: &BertConfig, prefix: &str, task_types: Vec<TaskType>) -> PromptDims {
    PromptDims {
        word_embeddings: crate::params::join(prefix, "embeddings.word_embeddings"),
        num_layers: c.num_hidden_layers,
        hidden_size: c.hidden_size,
        num_attention_heads: c.num_attention_heads,
        num_key_value_heads: None,
        vocab_size: c.vocab_size,
        task_types,
    }
}

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

        fn prompt_dims(&self) -> Option<ember_peft::PromptDims> {
            match self {
                Self::Llama(m) => m.prompt_dims(),
                Self::Bloom(m) => m.prompt_dims(),
                Self::Gpt2(m) => m.prompt_dims(),
            }
        }
    }
}
