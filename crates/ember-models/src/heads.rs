//! The task heads on a BERT / RoBERTa encoder, as in `transformers`:
//! `ForSequenceClassification`, `ForTokenClassification`, `ForMaskedLM` and
//! `ForQuestionAnswering`. Each returns logits, a loss when labels are given, and the encoder's
//! hidden states and attentions when asked for.

use crate::bert::{
    first_token, Activation, BaseModelOutput, BertModel, EncoderInput, OutputOptions,
};
use crate::config::BertConfig;
use crate::error::{ModelError, Result};
use crate::loss::{binary_cross_entropy_with_logits, cross_entropy, mse};
use crate::params::{apply_dropout, init_layer_norm, init_linear, ParamVisitor, VisitParams};
use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, LayerNorm};
use burn::tensor::{backend::Backend, Int, Tensor};
use ember_peft::Projection;

/// Labels of a sequence classifier. HF picks the loss from `problem_type`, else from
/// `num_labels` and the labels' type; here the type is the variant.
#[derive(Debug, Clone)]
pub enum SequenceLabels<B: Backend> {
    /// Class ids `[batch]`: cross entropy (`single_label_classification`).
    Classes(Tensor<B, 1, Int>),
    /// Float targets `[batch, num_labels]`: binary cross entropy per label
    /// (`multi_label_classification`), or mean squared error when `num_labels` is 1 or
    /// `problem_type` is `regression`.
    Scores(Tensor<B, 2>),
}

/// Output of a sequence classifier.
#[derive(Debug, Clone)]
pub struct SequenceClassifierOutput<B: Backend> {
    /// `[batch, num_labels]`.
    pub logits: Tensor<B, 2>,
    /// `[1]`, when labels were given.
    pub loss: Option<Tensor<B, 1>>,
    /// See [`BaseModelOutput::hidden_states`].
    pub hidden_states: Option<Vec<Tensor<B, 3>>>,
    /// See [`BaseModelOutput::attentions`].
    pub attentions: Option<Vec<Tensor<B, 4>>>,
}

/// Output of a token classifier or a masked LM.
#[derive(Debug, Clone)]
pub struct TokenLogitsOutput<B: Backend> {
    /// `[batch, seq, num_labels]` (token classes) or `[batch, seq, vocab_size]` (masked LM).
    pub logits: Tensor<B, 3>,
    /// `[1]`, when labels were given (labels `-100` are skipped).
    pub loss: Option<Tensor<B, 1>>,
    /// See [`BaseModelOutput::hidden_states`].
    pub hidden_states: Option<Vec<Tensor<B, 3>>>,
    /// See [`BaseModelOutput::attentions`].
    pub attentions: Option<Vec<Tensor<B, 4>>>,
}

/// Output of an extractive question-answering model.
#[derive(Debug, Clone)]
pub struct QuestionAnsweringOutput<B: Backend> {
    /// `[batch, seq]`: answer start scores.
    pub start_logits: Tensor<B, 2>,
    /// `[batch, seq]`: answer end scores.
    pub end_logits: Tensor<B, 2>,
    /// `[1]`: mean of the start and end cross entropies, when positions were given.
    pub loss: Option<Tensor<B, 1>>,
    /// See [`BaseModelOutput::hidden_states`].
    pub hidden_states: Option<Vec<Tensor<B, 3>>>,
    /// See [`BaseModelOutput::attentions`].
    pub attentions: Option<Vec<Tensor<B, 4>>>,
}

fn dropout(p: f64) -> Dropout {
    DropoutConfig::new(p).init()
}

/// `classifier`: BERT's is one linear layer on the pooled output; RoBERTa's
/// (`RobertaClassificationHead`) is `dense` + tanh + `out_proj` on the first token.
#[derive(Module, Debug)]
pub struct ClassificationHead<B: Backend> {
    /// `classifier.dense` (RoBERTa only).
    pub dense: Option<Projection<B>>,
    /// `classifier` (BERT) or `classifier.out_proj` (RoBERTa).
    pub out_proj: Projection<B>,
    /// Dropout before each projection.
    pub dropout: Dropout,
}

/// `BertForSequenceClassification` / `RobertaForSequenceClassification`.
#[derive(Module, Debug)]
pub struct BertForSequenceClassification<B: Backend> {
    /// The encoder (`bert` / `roberta`); BERT keeps its pooler, RoBERTa has none.
    pub base_model: BertModel<B>,
    /// `classifier`.
    pub classifier: ClassificationHead<B>,
}

/// `BertForTokenClassification` / `RobertaForTokenClassification`.
#[derive(Module, Debug)]
pub struct BertForTokenClassification<B: Backend> {
    /// The encoder, without pooler.
    pub base_model: BertModel<B>,
    /// Dropout before the classifier.
    pub dropout: Dropout,
    /// `classifier`.
    pub classifier: Projection<B>,
}

/// `BertForMaskedLM` / `RobertaForMaskedLM`: the decoder is tied to the word embeddings.
#[derive(Module, Debug)]
pub struct BertForMaskedLM<B: Backend> {
    /// The encoder, without pooler.
    pub base_model: BertModel<B>,
    /// `cls.predictions.transform.dense` / `lm_head.dense`.
    pub transform: Projection<B>,
    /// `cls.predictions.transform.LayerNorm` / `lm_head.layer_norm`.
    pub transform_layer_norm: LayerNorm<B>,
    /// `cls.predictions.bias` / `lm_head.bias`: the decoder's bias.
    pub decoder_bias: Param<Tensor<B, 1>>,
    /// The transform's activation (`hidden_act` for BERT, GELU for RoBERTa).
    #[module(skip)]
    pub activation: Activation,
}

/// `BertForQuestionAnswering` / `RobertaForQuestionAnswering`.
#[derive(Module, Debug)]
pub struct BertForQuestionAnswering<B: Backend> {
    /// The encoder, without pooler.
    pub base_model: BertModel<B>,
    /// `qa_outputs`: start and end scores.
    pub qa_outputs: Projection<B>,
}

/// `RobertaForSequenceClassification`.
pub type RobertaForSequenceClassification<B> = BertForSequenceClassification<B>;
/// `RobertaForTokenClassification`.
pub type RobertaForTokenClassification<B> = BertForTokenClassification<B>;
/// `RobertaForMaskedLM`.
pub type RobertaForMaskedLM<B> = BertForMaskedLM<B>;
/// `RobertaForQuestionAnswering`.
pub type RobertaForQuestionAnswering<B> = BertForQuestionAnswering<B>;

impl<B: Backend> BertForSequenceClassification<B> {
    /// A classifier with fresh weights for `config.num_labels()` classes.
    pub fn new(config: &BertConfig, device: &B::Device) -> Self {
        let (h, std, n) = (
            config.hidden_size,
            config.initializer_range,
            config.num_labels(),
        );
        let roberta = config.is_roberta();
        Self {
            base_model: BertModel::new(config, !roberta, device),
            classifier: ClassificationHead {
                dense: roberta.then(|| init_linear(h, h, std, device)),
                out_proj: init_linear(h, n, std, device),
                dropout: dropout(config.classifier_dropout_prob()),
            },
        }
    }

    /// The configuration (labels, `problem_type`).
    pub fn config(&self) -> &BertConfig {
        &self.base_model.config
    }

    /// Logits, and the loss HF's `problem_type` rules choose when labels are given.
    pub fn forward(
        &self,
        input: EncoderInput<B>,
        labels: Option<SequenceLabels<B>>,
    ) -> Result<SequenceClassifierOutput<B>> {
        let options = OutputOptions::from_config(self.config());
        let BaseModelOutput {
            last_hidden_state,
            pooler_output,
            hidden_states,
            attentions,
        } = self.base_model.forward(input, options)?;
        let head = &self.classifier;
        let logits = match (&head.dense, pooler_output) {
            (Some(dense), _) => {
                let x = apply_dropout(&head.dropout, first_token(last_hidden_state));
                let x = apply_dropout(&head.dropout, dense.forward(x).tanh());
                head.out_proj.forward(x)
            }
            (None, Some(pooled)) => head.out_proj.forward(apply_dropout(&head.dropout, pooled)),
            (None, None) => {
                return Err(ModelError::Input(
                    "a BERT sequence classifier needs its pooler".into(),
                ))
            }
        };
        let loss = labels.map(|l| self.loss(logits.clone(), l)).transpose()?;
        Ok(SequenceClassifierOutput {
            logits,
            loss,
            hidden_states,
            attentions,
        })
    }

    fn loss(&self, logits: Tensor<B, 2>, labels: SequenceLabels<B>) -> Result<Tensor<B, 1>> {
        let [batch, n] = logits.dims();
        let kind = self.config().problem_type.as_deref();
        let bad = |m: String| Err(ModelError::Input(m));
        match labels {
            SequenceLabels::Classes(classes) => {
                if classes.dims() != [batch] {
                    return bad(format!(
                        "labels have shape {:?}, expected [{batch}]",
                        classes.dims()
                    ));
                }
                if matches!(kind, Some("regression" | "multi_label_classification"))
                    || (kind.is_none() && n == 1)
                {
                    return bad(format!(
                        "problem_type {} needs float labels (SequenceLabels::Scores)",
                        kind.unwrap_or("regression")
                    ));
                }
                let (lo, hi): (i64, i64) = (
                    burn::tensor::ElementConversion::elem(classes.clone().min().into_scalar()),
                    burn::tensor::ElementConversion::elem(classes.clone().max().into_scalar()),
                );
                if lo < 0 && lo != crate::loss::IGNORE_INDEX || hi >= n as i64 {
                    return bad(format!(
                        "label {} is not a class id below num_labels {n}",
                        if hi >= n as i64 { hi } else { lo }
                    ));
                }
                Ok(cross_entropy(logits, classes))
            }
            SequenceLabels::Scores(scores) => {
                if scores.dims() != [batch, n] {
                    return bad(format!(
                        "labels have shape {:?}, expected [{batch}, {n}]",
                        scores.dims()
                    ));
                }
                match kind {
                    Some("single_label_classification") => bad(
                        "single_label_classification needs class ids (SequenceLabels::Classes)"
                            .into(),
                    ),
                    Some("regression") => Ok(mse(logits, scores)),
                    None if n == 1 => Ok(mse(logits, scores)),
                    _ => Ok(binary_cross_entropy_with_logits(logits, scores)),
                }
            }
        }
    }
}

impl<B: Backend> VisitParams<B> for BertForSequenceClassification<B> {
    fn visit(mut self, _: &str, v: &mut dyn ParamVisitor<B>) -> Result<Self> {
        let prefix = self.config().base_model_prefix();
        self.base_model = self.base_model.visit(prefix, v)?;
        let head = &mut self.classifier;
        if let Some(dense) = head.dense.take() {
            head.dense = Some(dense.visit("classifier.dense", v)?);
            head.out_proj = head.out_proj.clone().visit("classifier.out_proj", v)?;
        } else {
            head.out_proj = head.out_proj.clone().visit("classifier", v)?;
        }
        Ok(self)
    }
}

impl<B: Backend> BertForTokenClassification<B> {
    /// A token classifier with fresh weights for `config.num_labels()` classes.
    pub fn new(config: &BertConfig, device: &B::Device) -> Self {
        Self {
            base_model: BertModel::new(config, false, device),
            dropout: dropout(config.classifier_dropout_prob()),
            classifier: init_linear(
                config.hidden_size,
                config.num_labels(),
                config.initializer_range,
                device,
            ),
        }
    }

    /// The configuration (labels).
    pub fn config(&self) -> &BertConfig {
        &self.base_model.config
    }

    /// Logits per token; with labels `[batch, seq]` (`-100` skipped), the mean cross entropy.
    pub fn forward(
        &self,
        input: EncoderInput<B>,
        labels: Option<Tensor<B, 2, Int>>,
    ) -> Result<TokenLogitsOutput<B>> {
        let out = self
            .base_model
            .forward(input, OutputOptions::from_config(self.config()))?;
        let logits = self
            .classifier
            .forward(apply_dropout(&self.dropout, out.last_hidden_state));
        // With virtual tokens the logits cover them too (as peft returns them); labels for
        // the input alone get `-100` for the virtual positions.
        let virtual_tokens = self.base_model.virtual_tokens();
        let labels = labels.map(|l| {
            let [batch, n] = l.dims();
            if virtual_tokens > 0 && n + virtual_tokens == logits.dims()[1] {
                let ignore = Tensor::full([batch, virtual_tokens], -100, &l.device());
                Tensor::cat(vec![ignore, l], 1)
            } else {
                l
            }
        });
        let loss = labels.map(|l| token_loss(logits.clone(), l)).transpose()?;
        Ok(TokenLogitsOutput {
            logits,
            loss,
            hidden_states: out.hidden_states,
            attentions: out.attentions,
        })
    }
}

/// Cross entropy over every token, labels `-100` skipped.
fn token_loss<B: Backend>(logits: Tensor<B, 3>, labels: Tensor<B, 2, Int>) -> Result<Tensor<B, 1>> {
    let [batch, seq, n] = logits.dims();
    if labels.dims() != [batch, seq] {
        return Err(ModelError::Input(format!(
            "labels have shape {:?}, expected [{batch}, {seq}]",
            labels.dims()
        )));
    }
    let hi: i64 = burn::tensor::ElementConversion::elem(labels.clone().max().into_scalar());
    if hi >= n as i64 {
        return Err(ModelError::Input(format!(
            "label {hi} is not below the {n} classes"
        )));
    }
    Ok(cross_entropy(
        logits.reshape([batch * seq, n]),
        labels.reshape([batch * seq]),
    ))
}

impl<B: Backend> VisitParams<B> for BertForTokenClassification<B> {
    fn visit(mut self, _: &str, v: &mut dyn ParamVisitor<B>) -> Result<Self> {
        let prefix = self.config().base_model_prefix();
        self.base_model = self.base_model.visit(prefix, v)?;
        self.classifier = self.classifier.visit("classifier", v)?;
        Ok(self)
    }
}

impl<B: Backend> BertForMaskedLM<B> {
    /// A masked LM with fresh weights.
    pub fn new(config: &BertConfig, device: &B::Device) -> Self {
        let h = config.hidden_size;
        Self {
            base_model: BertModel::new(config, false, device),
            transform: init_linear(h, h, config.initializer_range, device),
            transform_layer_norm: init_layer_norm(h, config.layer_norm_eps, device),
            decoder_bias: Param::from_tensor(Tensor::zeros([config.vocab_size], device)),
            activation: if config.is_roberta() {
                Activation::Gelu
            } else {
                Activation::from_hf(&config.hidden_act)
            },
        }
    }

    /// The configuration.
    pub fn config(&self) -> &BertConfig {
        &self.base_model.config
    }

    /// Vocabulary logits per token; with labels `[batch, seq]` (`-100` for unmasked tokens),
    /// the mean cross entropy.
    pub fn forward(
        &self,
        input: EncoderInput<B>,
        labels: Option<Tensor<B, 2, Int>>,
    ) -> Result<TokenLogitsOutput<B>> {
        let out = self
            .base_model
            .forward(input, OutputOptions::from_config(self.config()))?;
        let x = self
            .activation
            .forward(self.transform.forward(out.last_hidden_state));
        let x = crate::params::layer_norm_f32(&self.transform_layer_norm, x);
        // The decoder is the word embedding table, transposed (tied weights).
        let table =
            ember_kernels::float32(self.base_model.embeddings.word_embeddings.base.weight.val());
        let [batch, seq, hidden] = x.dims();
        let vocab = table.dims()[0];
        let logits = (x.reshape([batch * seq, hidden]).matmul(table.transpose())
            + ember_kernels::float32(self.decoder_bias.val()).unsqueeze_dim(0))
        .reshape([batch, seq, vocab]);
        let loss = labels.map(|l| token_loss(logits.clone(), l)).transpose()?;
        Ok(TokenLogitsOutput {
            logits,
            loss,
            hidden_states: out.hidden_states,
            attentions: out.attentions,
        })
    }
}

impl<B: Backend> VisitParams<B> for BertForMaskedLM<B> {
    fn visit(mut self, _: &str, v: &mut dyn ParamVisitor<B>) -> Result<Self> {
        let roberta = self.config().is_roberta();
        let prefix = self.config().base_model_prefix();
        self.base_model = self.base_model.visit(prefix, v)?;
        let (dense, norm, bias) = if roberta {
            ("lm_head.dense", "lm_head.layer_norm", "lm_head.bias")
        } else {
            (
                "cls.predictions.transform.dense",
                "cls.predictions.transform.LayerNorm",
                "cls.predictions.bias",
            )
        };
        self.transform = self.transform.visit(dense, v)?;
        self.transform_layer_norm = self.transform_layer_norm.visit(norm, v)?;
        self.decoder_bias = v.visit1(bias, self.decoder_bias)?;
        Ok(self)
    }
}

impl<B: Backend> BertForQuestionAnswering<B> {
    /// A question-answering model with fresh weights.
    pub fn new(config: &BertConfig, device: &B::Device) -> Self {
        Self {
            base_model: BertModel::new(config, false, device),
            qa_outputs: init_linear(config.hidden_size, 2, config.initializer_range, device),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &BertConfig {
        &self.base_model.config
    }

    /// Start and end scores; with `positions` (start `[batch]`, end `[batch]`), HF's loss:
    /// positions are clamped to `[0, seq]` and `seq` is skipped, then the two cross entropies
    /// are averaged.
    pub fn forward(
        &self,
        input: EncoderInput<B>,
        positions: Option<(Tensor<B, 1, Int>, Tensor<B, 1, Int>)>,
    ) -> Result<QuestionAnsweringOutput<B>> {
        let out = self
            .base_model
            .forward(input, OutputOptions::from_config(self.config()))?;
        let logits = self.qa_outputs.forward(out.last_hidden_state);
        let [batch, seq, _] = logits.dims();
        let start_logits = logits.clone().narrow(2, 0, 1).reshape([batch, seq]);
        let end_logits = logits.narrow(2, 1, 1).reshape([batch, seq]);
        let loss = match positions {
            None => None,
            Some((start, end)) => {
                for t in [&start, &end] {
                    if t.dims() != [batch] {
                        return Err(ModelError::Input(format!(
                            "answer positions have shape {:?}, expected [{batch}]",
                            t.dims()
                        )));
                    }
                }
                let ignore = |p: Tensor<B, 1, Int>| {
                    let p = p.clamp(0, seq as i64);
                    let outside = p.clone().equal_elem(seq as i64);
                    p.mask_fill(outside, crate::loss::IGNORE_INDEX)
                };
                let s = cross_entropy(start_logits.clone(), ignore(start));
                let e = cross_entropy(end_logits.clone(), ignore(end));
                Some((s + e).div_scalar(2.0))
            }
        };
        Ok(QuestionAnsweringOutput {
            start_logits,
            end_logits,
            loss,
            hidden_states: out.hidden_states,
            attentions: out.attentions,
        })
    }
}

impl<B: Backend> VisitParams<B> for BertForQuestionAnswering<B> {
    fn visit(mut self, _: &str, v: &mut dyn ParamVisitor<B>) -> Result<Self> {
        let prefix = self.config().base_model_prefix();
        self.base_model = self.base_model.visit(prefix, v)?;
        self.qa_outputs = self.qa_outputs.visit("qa_outputs", v)?;
        Ok(self)
    }
}

/// Keys a head model's checkpoint may hold that are not parameters of their own: the tied
/// decoder weight (it is the word embedding table) and position id buffers.
pub(crate) fn is_ignorable_key(key: &str) -> bool {
    key.ends_with("position_ids")
        || key.ends_with("predictions.decoder.weight")
        || key.ends_with("lm_head.decoder.weight")
        || key.ends_with("predictions.decoder.bias")
        || key.ends_with("lm_head.decoder.bias")
}
