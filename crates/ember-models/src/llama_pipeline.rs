//! [`LlamaPipelineStage`]: a contiguous range of a [`LlamaForCausalLM`]'s decoder layers as one
//! stage of [`ember_distributed::PipelineParallel`] (GPipe / 1F1B).
//!
//! The layers are split as evenly as possible, the remainder going to the first stages (32
//! layers in 4 stages: 8 each; 10 in 4: 3, 3, 2, 2). The first stage also holds
//! `model.embed_tokens`, the last `model.norm` and `lm_head`. With tied word embeddings the
//! last stage holds a copy of the embedding matrix (the same parameter id) for its output
//! projection, as Megatron-LM does: after each step's backward passes
//! [`LlamaPipelineStage::all_reduce_tied_embeddings`] adds the two stages' gradients of that
//! matrix on both, so both copies take the same optimizer step and stay equal.

use crate::causal::{
    check_ids, default_positions, padding_mask, shifted_cross_entropy, tied_logits,
};
use crate::error::{ModelError, Result};
use crate::llama::{LlamaConfig, LlamaDecoderLayer, LlamaForCausalLM};
use crate::params::apply_rms_norm;
use crate::rope::{self, RopeParameters};
use burn::module::{AutodiffModule, Module};
use burn::nn::RmsNorm;
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use ember_distributed::{DistributedError, PipelineParallel, PipelineStage, StageOutput};
use ember_peft::{Projection, TokenEmbedding};
use std::ops::Range;

/// One micro-batch of causal-LM training data. Every stage is given the same list: the first
/// reads the ids, the last the labels, and all of them the attention mask (each layer masks
/// padding).
#[derive(Debug, Clone)]
pub struct LlamaMicroBatch<B: Backend> {
    /// Token ids `[batch, seq]`.
    pub input_ids: Tensor<B, 2, Int>,
    /// 1 for tokens, 0 for padding, `[batch, seq]`; `None`: no padding.
    pub attention_mask: Option<Tensor<B, 2, Int>>,
    /// Labels `[batch, seq]` (HF shifts them: position `t` predicts `labels[t + 1]`; `-100`
    /// is skipped).
    pub labels: Tensor<B, 2, Int>,
}

/// A stage of a Llama pipeline: decoder layers `layer_range()` of the model, plus the
/// embeddings on the first stage and the final norm and output projection on the last.
///
/// Parameters keep the ids they had in the whole model, so gradients and optimizer states can
/// be matched to HF keys through the whole model's `named_parameters()`.
#[derive(Module, Debug)]
pub struct LlamaPipelineStage<B: Backend> {
    /// `model.embed_tokens`: on the first stage, and on the last of a tied model (its output
    /// projection).
    pub embed_tokens: Option<TokenEmbedding<B>>,
    /// This stage's `model.layers`.
    pub layers: Vec<LlamaDecoderLayer<B>>,
    /// `model.norm`: on the last stage.
    pub norm: Option<RmsNorm<B>>,
    /// `lm_head`: on the last stage of an untied model.
    pub lm_head: Option<Projection<B>>,
    /// This stage (`0..num_stages`).
    #[module(skip)]
    pub stage: usize,
    /// The number of stages.
    #[module(skip)]
    pub num_stages: usize,
    /// The index of `layers[0]` in the whole model.
    #[module(skip)]
    pub first_layer: usize,
    /// The whole model's configuration.
    #[module(skip)]
    pub config: LlamaConfig,
    /// The rotary parameters (every stage computes the same tables for its layers).
    #[module(skip)]
    pub rope: RopeParameters,
}

impl<B: Backend> LlamaPipelineStage<B> {
    /// The layers stage `stage` of `num_stages` holds out of `num_layers`: an even split, the
    /// remainder to the first stages (what every rank must agree on without talking).
    ///
    /// Errors name the values: no stages, a stage out of range, more stages than layers.
    pub fn layer_range(num_layers: usize, stage: usize, num_stages: usize) -> Result<Range<usize>> {
        if num_stages == 0 || stage >= num_stages || num_stages > num_layers {
            return Err(invalid(format!(
                "stage {stage} of {num_stages} over {num_layers} layers: give 1 to {num_layers} stages and a stage below their number"
            )));
        }
        let (per, extra) = (num_layers / num_stages, num_layers % num_stages);
        let start = stage * per + stage.min(extra);
        let len = per + usize::from(stage < extra);
        Ok(start..start + len)
    }

    /// Stage `stage` of `num_stages` cut out of `model`; the rest of the model is dropped, so
    /// each rank keeps only its own layers' weights (load the whole model, then cut). Ranks
    /// that cut clones of one model in memory must clone it after its weights were read once:
    /// burn initialises parameters lazily, and clones of a parameter never read initialise
    /// independently, with different random values.
    pub fn from_model(model: LlamaForCausalLM<B>, stage: usize, num_stages: usize) -> Result<Self> {
        let range = Self::layer_range(model.model.layers.len(), stage, num_stages)?;
        if model.model.embed_tokens.active_prompt().is_some() {
            return Err(ModelError::Input(
                "a model with an active prompt-tuning adapter cannot be cut into pipeline stages (the virtual tokens change the sequence every stage sees)".into(),
            ));
        }
        let (first, last) = (stage == 0, stage + 1 == num_stages);
        let tied = model.lm_head.is_none();
        let LlamaForCausalLM {
            model: inner,
            lm_head,
            config,
            rope,
        } = model;
        let layers = inner
            .layers
            .into_iter()
            .skip(range.start)
            .take(range.len())
            .collect();
        Ok(Self {
            embed_tokens: (first || (last && tied)).then_some(inner.embed_tokens),
            layers,
            norm: last.then_some(inner.norm),
            lm_head: if last { lm_head } else { None },
            stage,
            num_stages,
            first_layer: range.start,
            config,
            rope,
        })
    }

    /// The whole model's indices of this stage's layers.
    pub fn layers_held(&self) -> Range<usize> {
        self.first_layer..self.first_layer + self.layers.len()
    }

    /// Whether the output projection is the embedding matrix, held by the first and the last
    /// stage.
    pub fn is_tied(&self) -> bool {
        self.config.tie_word_embeddings
    }

    fn forward_inner(
        &self,
        input: Option<Tensor<B, 3>>,
        micro_batch: &LlamaMicroBatch<B>,
    ) -> Result<StageOutput<B, 3>> {
        let [batch, seq] = micro_batch.input_ids.dims();
        let c = &self.config;
        let x =
            match (self.stage, input, &self.embed_tokens) {
                (0, None, Some(embedding)) => {
                    check_ids(&micro_batch.input_ids, c.vocab_size)?;
                    embedding.forward(micro_batch.input_ids.clone())
                }
                (0, _, _) => return Err(ModelError::Input(
                    "the first pipeline stage embeds the ids itself: it receives no activations"
                        .into(),
                )),
                (_, Some(x), _) => {
                    if x.dims() != [batch, seq, c.hidden_size] {
                        return Err(ModelError::Input(format!(
                            "stage {} received hidden states {:?}, expected [{batch}, {seq}, {}]",
                            self.stage,
                            x.dims(),
                            c.hidden_size
                        )));
                    }
                    x
                }
                (_, None, _) => {
                    return Err(ModelError::Input(format!(
                        "stage {} received no hidden states",
                        self.stage
                    )))
                }
            };
        if micro_batch.labels.dims() != [batch, seq] {
            return Err(ModelError::Input(format!(
                "labels {:?} do not match input_ids [{batch}, {seq}]",
                micro_batch.labels.dims()
            )));
        }
        if let Some(m) = &micro_batch.attention_mask {
            if m.dims() != [batch, seq] {
                return Err(ModelError::Input(format!(
                    "attention_mask {:?} does not match input_ids [{batch}, {seq}]",
                    m.dims()
                )));
            }
        }
        // The same rotary tables and mask as the whole model's forward (no cache: training).
        let positions = default_positions(batch, 0, seq, &x.device());
        let inv_freq = self.rope.inv_freq(c.head_dim(), seq);
        let (cos, sin) = rope::cos_sin(&inv_freq, positions);
        let mask = padding_mask(micro_batch.attention_mask.as_ref(), seq)?;
        let mut x = x;
        for layer in &self.layers {
            x = layer.forward(x, (&cos, &sin), mask.as_ref(), None)?.0;
        }
        if self.stage + 1 < self.num_stages {
            return Ok(StageOutput::Activations(x));
        }
        let norm = self.norm.as_ref().ok_or_else(|| missing("model.norm"))?;
        let x = apply_rms_norm(norm, x);
        let logits = match (&self.lm_head, &self.embed_tokens) {
            (Some(head), _) => head.forward(x),
            (None, Some(embedding)) => tied_logits(x, embedding),
            (None, None) => return Err(missing("lm_head")),
        };
        Ok(StageOutput::Loss(shifted_cross_entropy(
            logits,
            micro_batch.labels.clone(),
        )))
    }
}

impl<B: AutodiffBackend> LlamaPipelineStage<B> {
    /// Adds the first and the last stage's gradients of the tied embedding matrix, on both
    /// (Megatron-LM's embedding group): the matrix's gradient is that of its use as the input
    /// embedding plus that of its use as the output projection, and both copies must take the
    /// same step. Every stage may call it (the others, and untied or one-stage pipelines,
    /// return `grads` unchanged); the first and last stage must.
    pub fn all_reduce_tied_embeddings(
        &self,
        pipeline: &PipelineParallel,
        mut grads: GradientsParams,
    ) -> Result<GradientsParams> {
        let (first, last) = (self.stage == 0, self.stage + 1 == self.num_stages);
        if !self.is_tied() || self.num_stages == 1 || !(first || last) {
            return Ok(grads);
        }
        let embedding = self
            .embed_tokens
            .as_ref()
            .ok_or_else(|| missing("model.embed_tokens"))?;
        let weight = &embedding.base.weight;
        let shape = weight.shape();
        let own = match grads.remove::<B::InnerBackend, 2>(weight.id) {
            Some(g) => g
                .into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .map_err(|e| DistributedError::Tensor(format!("{e:?}")))?,
            None => vec![0.0; shape.num_elements()],
        };
        let group = pipeline.group();
        let mut other = vec![0.0f32; own.len()];
        // The first stage sends first and the last receives first, so a send that waits for
        // its receive cannot deadlock.
        let peer = if first { self.num_stages - 1 } else { 0 };
        if first {
            group.send(&own, peer)?;
            group.recv(&mut other, peer)?;
        } else {
            group.recv(&mut other, peer)?;
            group.send(&own, peer)?;
        }
        // Summed in stage order on both, so the two copies get the same bits.
        let (a, b) = if first {
            (&own, &other)
        } else {
            (&other, &own)
        };
        let sum: Vec<f32> = a.iter().zip(b).map(|(x, y)| x + y).collect();
        let grad =
            Tensor::<B::InnerBackend, 2>::from_data(TensorData::new(sum, shape), &weight.device());
        grads.register::<B::InnerBackend, 2>(weight.id, grad);
        Ok(grads)
    }
}

impl<B: AutodiffBackend> PipelineStage<B, 3> for LlamaPipelineStage<B>
where
    LlamaPipelineStage<B>: AutodiffModule<B>,
{
    type MicroBatch = LlamaMicroBatch<B>;
    type Error = ModelError;

    fn forward_stage(
        &self,
        input: Option<Tensor<B, 3>>,
        micro_batch: &LlamaMicroBatch<B>,
    ) -> Result<StageOutput<B, 3>> {
        // On one of the kernels' workers, as the whole model's forward runs.
        ember_kernels::on_worker::<B, _>(|| self.forward_inner(input, micro_batch))
    }
}

fn invalid(message: String) -> ModelError {
    ModelError::Distributed(DistributedError::InvalidArgument {
        op: "LlamaPipelineStage",
        message,
    })
}

fn missing(what: &str) -> ModelError {
    ModelError::Input(format!("this pipeline stage does not hold `{what}`"))
}
