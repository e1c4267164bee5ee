//! `BloomForCausalLM`: ALiBi positions (no position embeddings), a LayerNorm on the word
//! embeddings, a fused query / key / value projection, pre-norm blocks with a tanh-GELU MLP,
//! and the output through the word embeddings (tied), as in bigscience's BLOOM and BLOOMZ.
//!
//! One struct per HF sub-module, so that every parameter sits at its HF key
//! (`transformer.h.3.self_attention.query_key_value.weight`).

use crate::causal::{
    append_kv, causal_output, padding_mask, CausalLm, CausalLmInput, CausalLmOutput, ForwardStart,
    LayerKv, ModelShape,
};
use crate::config::config_io;
use crate::decoder_attention::causal_self_attention;
use crate::error::{ModelError, Result};
use crate::params::{
    apply_dropout, init_embedding, init_layer_norm, init_linear, join, ParamVisitor, VisitParams,
};
use crate::Activation;
use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, LayerNorm};
use burn::tensor::{backend::Backend, Bool, Int, Tensor, TensorData};
use ember_peft::{Projection, TokenEmbedding};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::Path;

fn d_model_type() -> String {
    "bloom".into()
}
fn d_vocab() -> usize {
    250880
}
fn d_hidden() -> usize {
    64
}
fn d_layers() -> usize {
    2
}
fn d_heads() -> usize {
    8
}
fn d_eps() -> f64 {
    1e-5
}
fn d_init() -> f64 {
    0.02
}
fn d_bos() -> Option<i64> {
    Some(1)
}
fn d_eos() -> Option<Value> {
    Some(2.into())
}
fn d_tp() -> usize {
    1
}
fn d_true() -> bool {
    true
}

/// Older spellings `BloomConfig` accepts for its fields (HF's `attribute_map`, and `n_embed`
/// of the original bigscience configs), renamed on reading.
const ALIASES: [(&str, &str); 3] = [
    ("n_embed", "hidden_size"),
    ("num_hidden_layers", "n_layer"),
    ("num_attention_heads", "n_head"),
];

/// HF `BloomConfig`, with its field names and defaults (transformers 5.24). Every other field
/// (`use_cache`, `offset_alibi`, ...) is kept in `extra`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BloomConfig {
    /// `model_type`: `bloom`.
    #[serde(default = "d_model_type")]
    pub model_type: String,
    /// `architectures`, e.g. `["BloomForCausalLM"]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    /// `vocab_size` (250880).
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    /// `hidden_size` (64; `n_embed` in old configs).
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    /// `n_layer` (2; `num_hidden_layers` is accepted).
    #[serde(default = "d_layers")]
    pub n_layer: usize,
    /// `n_head` (8; `num_attention_heads` is accepted).
    #[serde(default = "d_heads")]
    pub n_head: usize,
    /// `layer_norm_epsilon` (1e-5).
    #[serde(default = "d_eps")]
    pub layer_norm_epsilon: f64,
    /// `initializer_range` (0.02): the std of fresh weights.
    #[serde(default = "d_init")]
    pub initializer_range: f64,
    /// `bos_token_id` (1).
    #[serde(default = "d_bos")]
    pub bos_token_id: Option<i64>,
    /// `eos_token_id` (2): one id or a list of ids.
    #[serde(default = "d_eos")]
    pub eos_token_id: Option<Value>,
    /// `pad_token_id` (none in transformers 5.24; the released BLOOM checkpoints set 3).
    #[serde(default)]
    pub pad_token_id: Option<i64>,
    /// `apply_residual_connection_post_layernorm` (false): the residual of each sub-block is
    /// its normalised input instead of its input.
    #[serde(default)]
    pub apply_residual_connection_post_layernorm: bool,
    /// `hidden_dropout` (0): dropout on each sub-block's output before the residual.
    #[serde(default)]
    pub hidden_dropout: f64,
    /// `attention_dropout` (0): dropout on the attention probabilities.
    #[serde(default)]
    pub attention_dropout: f64,
    /// `pretraining_tp` (1): Megatron's tensor-parallel degree; it changes only the order of
    /// the sums under `slow_but_exact`, so Ember computes the plain projection either way.
    #[serde(default = "d_tp")]
    pub pretraining_tp: usize,
    /// `slow_but_exact` (false): see `pretraining_tp`.
    #[serde(default)]
    pub slow_but_exact: bool,
    /// `tie_word_embeddings` (true, as every BLOOM checkpoint): the output projection is the
    /// word embedding matrix. When false, `lm_head.weight` is a separate matrix.
    #[serde(default = "d_true")]
    pub tie_word_embeddings: bool,
    /// Every other field of the file, kept as read.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

config_io!(BloomConfig, &ALIASES);

impl BloomConfig {
    /// Checks the values a model cannot be built from.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.model_type != "bloom" {
            return Err(format!(
                "model_type `{}` is not a Bloom model",
                self.model_type
            ));
        }
        if self.n_head == 0 || !self.hidden_size.is_multiple_of(self.n_head) {
            return Err(format!(
                "hidden_size {} is not a multiple of n_head {}",
                self.hidden_size, self.n_head
            ));
        }
        if self.hidden_size == 0 || self.vocab_size == 0 {
            return Err(format!(
                "hidden_size {} and vocab_size {} must be positive",
                self.hidden_size, self.vocab_size
            ));
        }
        for (name, p) in [
            ("hidden_dropout", self.hidden_dropout),
            ("attention_dropout", self.attention_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(format!("{name} {p} is not a probability below 1"));
            }
        }
        Ok(())
    }

    /// The size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.n_head.max(1)
    }

    /// The config as HF writes `config.json`.
    pub fn to_json_string(&self) -> String {
        serde_json::to_string_pretty(self).expect("a config always serializes")
    }
}

/// HF's ALiBi slopes (`_get_alibi_slopes`), in f32 as PyTorch computes them: a geometric
/// sequence for the largest power of two ≤ `heads`, then every other slope of the sequence for
/// twice as many heads for the rest.
pub fn alibi_slopes(heads: usize) -> Vec<f32> {
    if heads == 0 {
        return Vec::new();
    }
    let closest = 1usize << heads.ilog2();
    let base = |n: usize| 2f64.powf(-(2f64.powf(-((n as f64).log2() - 3.0)))) as f32;
    let first = base(closest);
    let mut slopes: Vec<f32> = (1..=closest).map(|p| first.powf(p as f32)).collect();
    if closest != heads {
        let extra = base(2 * closest);
        let remaining = (heads - closest).min(closest);
        slopes.extend((0..remaining).map(|i| extra.powf((2 * i + 1) as f32)));
    }
    slopes
}

/// The ALiBi bias `[batch, heads, seq, total]`: `slope(h) · position(key)`, where a key's
/// position is its index among the real tokens of its row (HF's `build_alibi_tensor`:
/// `(attention_mask.cumsum(-1) - 1) * attention_mask`), or its index when there is no mask.
/// Adding a per-row constant changes no softmax, so the bias depends on the key alone.
pub(crate) fn alibi_bias<B: Backend>(
    attention_mask: Option<&Tensor<B, 2, Int>>,
    heads: usize,
    [batch, seq, total]: [usize; 3],
    device: &B::Device,
) -> Tensor<B, 4> {
    let positions = match attention_mask {
        Some(mask) => ((mask.clone().cumsum(1) - 1) * mask.clone()).float(),
        None => Tensor::<B, 1, Int>::arange(0..total as i64, device)
            .float()
            .reshape([1, total])
            .expand([batch, total]),
    };
    let slopes = Tensor::<B, 1>::from_data(TensorData::new(alibi_slopes(heads), [heads]), device)
        .reshape([1, heads, 1]);
    (slopes * positions.reshape([batch, 1, total]))
        .reshape([batch, heads, 1, total])
        .expand([batch, heads, seq, total])
}

/// `self_attention`: the fused query / key / value projection, ALiBi attention, `dense`.
#[derive(Module, Debug)]
pub struct BloomAttention<B: Backend> {
    /// `query_key_value`: `hidden → 3 · hidden`, laid out per head as `[n_head, 3, head_dim]`
    /// on the output axis (HF's `_reshape`).
    pub query_key_value: Projection<B>,
    /// `dense`.
    pub dense: Projection<B>,
    /// Dropout on the attention probabilities (`attention_dropout`).
    pub attention_dropout: Dropout,
    /// Attention heads.
    pub num_heads: usize,
}

/// `mlp`: `dense_4h_to_h(gelu_tanh(dense_h_to_4h(x)))`.
#[derive(Module, Debug)]
pub struct BloomMlp<B: Backend> {
    /// `dense_h_to_4h`.
    pub dense_h_to_4h: Projection<B>,
    /// `dense_4h_to_h`.
    pub dense_4h_to_h: Projection<B>,
}

/// `transformer.h.N`: pre-norm attention and MLP, each with a residual.
#[derive(Module, Debug)]
pub struct BloomBlock<B: Backend> {
    /// `input_layernorm`.
    pub input_layernorm: LayerNorm<B>,
    /// `self_attention`.
    pub self_attention: BloomAttention<B>,
    /// `post_attention_layernorm`.
    pub post_attention_layernorm: LayerNorm<B>,
    /// `mlp`.
    pub mlp: BloomMlp<B>,
    /// Dropout on each sub-block's output before the residual (`hidden_dropout`).
    pub hidden_dropout: Dropout,
    /// `apply_residual_connection_post_layernorm`.
    pub post_layernorm_residual: bool,
}

/// `BloomModel` (`transformer.`): embeddings and their LayerNorm, blocks, final norm.
#[derive(Module, Debug)]
pub struct BloomModel<B: Backend> {
    /// `word_embeddings`.
    pub word_embeddings: TokenEmbedding<B>,
    /// `word_embeddings_layernorm`.
    pub word_embeddings_layernorm: LayerNorm<B>,
    /// `h`.
    pub h: Vec<BloomBlock<B>>,
    /// `ln_f`.
    pub ln_f: LayerNorm<B>,
}

/// `BloomForCausalLM`: the decoder and the output projection (the word embeddings, tied).
#[derive(Module, Debug)]
pub struct BloomForCausalLM<B: Backend> {
    /// `transformer`.
    pub transformer: BloomModel<B>,
    /// `lm_head`; `None` when tied to `transformer.word_embeddings` (always, in practice).
    pub lm_head: Option<Projection<B>>,
    /// The configuration (written back by `save_pretrained`).
    #[module(skip)]
    pub config: BloomConfig,
}

fn layer_norm<B: Backend>(c: &BloomConfig, device: &B::Device) -> LayerNorm<B> {
    init_layer_norm(c.hidden_size, c.layer_norm_epsilon, device)
}

impl<B: Backend> BloomAttention<B> {
    fn forward(
        &self,
        x: Tensor<B, 3>,
        mask: Option<Tensor<B, 4, Bool>>,
        alibi: Tensor<B, 4>,
        past: Option<LayerKv<B>>,
    ) -> (Tensor<B, 3>, LayerKv<B>) {
        let [batch, seq, hidden] = x.dims();
        let h = self.num_heads;
        let d = hidden / h;
        let fused = self
            .query_key_value
            .forward(x)
            .reshape([batch, seq, h, 3, d]);
        let part = |i: usize| {
            fused
                .clone()
                .narrow(3, i, 1)
                .reshape([batch, seq, h, d])
                .swap_dims(1, 2)
        };
        let (q, k, v) = (part(0), part(1), part(2));
        let kv = append_kv(past, k, v);
        let context = causal_self_attention(
            q,
            kv.key.clone(),
            kv.value.clone(),
            mask,
            Some(alibi),
            1.0 / (d as f64).sqrt(),
            &self.attention_dropout,
        );
        let context = context.swap_dims(1, 2).reshape([batch, seq, hidden]);
        (self.dense.forward(context), kv)
    }
}

impl<B: Backend> BloomBlock<B> {
    fn new(c: &BloomConfig, device: &B::Device) -> Self {
        let (hidden, std) = (c.hidden_size, c.initializer_range);
        Self {
            input_layernorm: layer_norm(c, device),
            self_attention: BloomAttention {
                query_key_value: init_linear(hidden, 3 * hidden, std, device),
                dense: init_linear(hidden, hidden, std, device),
                attention_dropout: DropoutConfig::new(c.attention_dropout).init(),
                num_heads: c.n_head,
            },
            post_attention_layernorm: layer_norm(c, device),
            mlp: BloomMlp {
                dense_h_to_4h: init_linear(hidden, 4 * hidden, std, device),
                dense_4h_to_h: init_linear(4 * hidden, hidden, std, device),
            },
            hidden_dropout: DropoutConfig::new(c.hidden_dropout).init(),
            post_layernorm_residual: c.apply_residual_connection_post_layernorm,
        }
    }

    fn forward(
        &self,
        x: Tensor<B, 3>,
        mask: Option<Tensor<B, 4, Bool>>,
        alibi: Tensor<B, 4>,
        past: Option<LayerKv<B>>,
    ) -> (Tensor<B, 3>, LayerKv<B>) {
        let normed = crate::params::layer_norm_f32(&self.input_layernorm, x.clone());
        let residual = if self.post_layernorm_residual {
            normed.clone()
        } else {
            x
        };
        let (attended, kv) = self.self_attention.forward(normed, mask, alibi, past);
        let x = apply_dropout(&self.hidden_dropout, attended) + residual;
        let normed = crate::params::layer_norm_f32(&self.post_attention_layernorm, x.clone());
        let residual = if self.post_layernorm_residual {
            normed.clone()
        } else {
            x
        };
        let inner = Activation::GeluTanh.forward(self.mlp.dense_h_to_4h.forward(normed));
        let out = self.mlp.dense_4h_to_h.forward(inner);
        (apply_dropout(&self.hidden_dropout, out) + residual, kv)
    }
}

impl<B: Backend> BloomForCausalLM<B> {
    /// A model with fresh weights, initialised as HF does (normal with `initializer_range`,
    /// zero biases, unit LayerNorms).
    pub fn new(config: &BloomConfig, device: &B::Device) -> Result<Self> {
        let c = config;
        c.validate().map_err(|message| ModelError::Config {
            path: "<BloomConfig>".into(),
            message,
        })?;
        Ok(Self {
            transformer: BloomModel {
                word_embeddings: init_embedding(
                    c.vocab_size,
                    c.hidden_size,
                    c.initializer_range,
                    None,
                    device,
                ),
                word_embeddings_layernorm: layer_norm(c, device),
                h: (0..c.n_layer).map(|_| BloomBlock::new(c, device)).collect(),
                ln_f: layer_norm(c, device),
            },
            lm_head: (!c.tie_word_embeddings).then(|| {
                let mut head =
                    init_linear(c.hidden_size, c.vocab_size, c.initializer_range, device);
                head.base.bias = None;
                head
            }),
            config: config.clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &BloomConfig {
        &self.config
    }

    /// One forward pass: logits for every new position, the loss when labels are given, and
    /// the cache extended by the new positions.
    ///
    /// Bloom has no position ids: ALiBi numbers the keys by the attention mask (covering the
    /// cached positions too), so `position_ids` is ignored, as HF ignores it.
    pub fn forward(&self, input: CausalLmInput<B>) -> Result<CausalLmOutput<B>> {
        ember_kernels::on_worker::<B, _>(|| self.forward_inner(input))
    }

    /// [`Self::forward`], on the calling thread.
    fn forward_inner(&self, input: CausalLmInput<B>) -> Result<CausalLmOutput<B>> {
        let c = &self.config;
        let shape = ModelShape {
            layers: c.n_layer,
            kv_heads: c.n_head,
            head_dim: c.head_dim(),
            vocab: c.vocab_size,
            hidden: c.hidden_size,
        };
        let ForwardStart {
            batch,
            seq,
            past_len,
            past,
            x,
            attention_mask,
            // ALiBi numbers the keys by the mask; HF ignores position ids too.
            position_ids: _,
            labels,
            logits_to_keep,
        } = input.start(&shape, &self.transformer.word_embeddings)?;
        let total = past_len + seq;
        let device = x.device();
        let heads = c.n_head;
        let mask = padding_mask(attention_mask.as_ref(), seq)?
            .map(|m| m.expand([batch, heads, seq, total]));
        let alibi = alibi_bias(attention_mask.as_ref(), heads, [batch, seq, total], &device);
        let mut x = crate::params::layer_norm_f32(&self.transformer.word_embeddings_layernorm, x);
        let mut past_layers = past.map(|p| p.layers.into_iter());
        let mut cache = Vec::with_capacity(self.transformer.h.len());
        for block in &self.transformer.h {
            let layer_past = past_layers.as_mut().and_then(Iterator::next);
            let (out, kv) = block.forward(x, mask.clone(), alibi.clone(), layer_past);
            x = out;
            cache.push(kv);
        }
        let x = crate::params::layer_norm_f32(&self.transformer.ln_f, x);
        Ok(causal_output(
            x,
            logits_to_keep,
            (self.lm_head.as_ref(), &self.transformer.word_embeddings),
            labels,
            cache,
        ))
    }
}

impl<B: Backend> CausalLm<B> for BloomForCausalLM<B> {
    fn forward(&self, input: CausalLmInput<B>) -> Result<CausalLmOutput<B>> {
        BloomForCausalLM::forward(self, input)
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn max_positions(&self) -> Option<usize> {
        None
    }
}

impl<B: Backend> VisitParams<B> for BloomAttention<B> {
    fn visit(mut self, p: &str, v: &mut dyn ParamVisitor<B>) -> Result<Self> {
        self.query_key_value = self.query_key_value.visit(&join(p, "query_key_value"), v)?;
        self.dense = self.dense.visit(&join(p, "dense"), v)?;
        Ok(self)
    }
}

impl<B: Backend> VisitParams<B> for BloomBlock<B> {
    fn visit(mut self, p: &str, v: &mut dyn ParamVisitor<B>) -> Result<Self> {
        self.input_layernorm = self.input_layernorm.visit(&join(p, "input_layernorm"), v)?;
        self.self_attention = self.self_attention.visit(&join(p, "self_attention"), v)?;
        self.post_attention_layernorm = self
            .post_attention_layernorm
            .visit(&join(p, "post_attention_layernorm"), v)?;
        let m = join(p, "mlp");
        self.mlp.dense_h_to_4h = self
            .mlp
            .dense_h_to_4h
            .visit(&join(&m, "dense_h_to_4h"), v)?;
        self.mlp.dense_4h_to_h = self
            .mlp
            .dense_4h_to_h
            .visit(&join(&m, "dense_4h_to_h"), v)?;
        Ok(self)
    }
}

impl<B: Backend> VisitParams<B> for BloomModel<B> {
    fn visit(mut self, p: &str, v: &mut dyn ParamVisitor<B>) -> Result<Self> {
        self.word_embeddings = self.word_embeddings.visit(&join(p, "word_embeddings"), v)?;
        self.word_embeddings_layernorm = self
            .word_embeddings_layernorm
            .visit(&join(p, "word_embeddings_layernorm"), v)?;
        let blocks = std::mem::take(&mut self.h);
        for (i, block) in blocks.into_iter().enumerate() {
            self.h.push(block.visit(&join(p, &format!("h.{i}")), v)?);
        }
        self.ln_f = self.ln_f.visit(&join(p, "ln_f"), v)?;
        Ok(self)
    }
}

impl<B: Backend> VisitParams<B> for BloomForCausalLM<B> {
    fn visit(mut self, p: &str, v: &mut dyn ParamVisitor<B>) -> Result<Self> {
        self.transformer = self.transformer.visit(&join(p, "transformer"), v)?;
        if let Some(head) = self.lm_head.take() {
            self.lm_head = Some(head.visit(&join(p, "lm_head"), v)?);
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alibi_slopes_match_hf() {
        // torch: `_get_alibi_slopes(n, "cpu").tolist()`.
        assert_eq!(alibi_slopes(4), [0.25, 0.0625, 0.015625, 0.00390625]);
        assert_eq!(
            alibi_slopes(6),
            [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]
        );
        assert_eq!(alibi_slopes(8)[0], 0.5);
        assert_eq!(
            alibi_slopes(12)[8..],
            [0.707_106_77_f32, 0.353_553_38, 0.176_776_68, 0.088_388_34]
        );
    }

    #[test]
    fn old_field_names_are_read() {
        let c = BloomConfig::from_json_value(
            serde_json::json!({"model_type": "bloom", "n_embed": 48, "num_attention_heads": 4,
                "n_layer": 3, "offset_alibi": 100}),
            Path::new("config.json"),
        )
        .unwrap();
        assert_eq!((c.hidden_size, c.n_head, c.n_layer), (48, 4, 3));
        assert_eq!(c.extra["offset_alibi"], 100);
        assert!(!c.to_json_string().contains("n_embed"));
    }
}
