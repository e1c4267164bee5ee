//! `GPT2LMHeadModel`: learned position embeddings, pre-norm blocks with a fused query / key /
//! value projection, a GELU MLP, and the output through the token embeddings (tied). Covers
//! OpenAI's GPT-2 checkpoints, DistilGPT2 and the many small models saved as `gpt2`.
//!
//! One struct per HF sub-module, so that every parameter sits at its HF key
//! (`transformer.h.3.attn.c_attn.weight`). HF's `Conv1D` stores its weight as `[in, out]`,
//! which is burn's `Linear` layout: those weights are read and written untransposed.

use crate::causal::{
    append_kv, causal_output, default_positions, padding_mask, CausalLm, CausalLmInput,
    CausalLmOutput, ForwardStart, LayerKv, ModelShape,
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
use burn::tensor::{backend::Backend, Bool, ElementConversion, Tensor};
use ember_peft::{Projection, TokenEmbedding};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::Path;

fn d_model_type() -> String {
    "gpt2".into()
}
fn d_vocab() -> usize {
    50257
}
fn d_positions() -> usize {
    1024
}
fn d_embd() -> usize {
    768
}
fn d_layers() -> usize {
    12
}
fn d_heads() -> usize {
    12
}
fn d_act() -> String {
    "gelu_new".into()
}
fn d_pdrop() -> f64 {
    0.1
}
fn d_eps() -> f64 {
    1e-5
}
fn d_init() -> f64 {
    0.02
}
fn d_bos() -> Option<i64> {
    Some(50256)
}
fn d_eos() -> Option<Value> {
    Some(50256.into())
}
fn d_true() -> bool {
    true
}

/// The `activation_function` values Ember implements for GPT-2.
pub const GPT2_ACTIVATIONS: [&str; 7] = [
    "gelu_new",
    "gelu_pytorch_tanh",
    "gelu_fast",
    "gelu",
    "relu",
    "silu",
    "swish",
];

/// The HF names GPT-2 configs may use for its fields (HF's `attribute_map`), renamed on reading.
const ALIASES: [(&str, &str); 4] = [
    ("hidden_size", "n_embd"),
    ("max_position_embeddings", "n_positions"),
    ("num_attention_heads", "n_head"),
    ("num_hidden_layers", "n_layer"),
];

/// HF `GPT2Config`, with its field names and defaults (transformers 5.24). Every other field
/// (`use_cache`, the `summary_*` fields of the double-heads model, `n_ctx`, ...) is kept in
/// `extra`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GPT2Config {
    /// `model_type`: `gpt2`.
    #[serde(default = "d_model_type")]
    pub model_type: String,
    /// `architectures`, e.g. `["GPT2LMHeadModel"]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    /// `vocab_size` (50257).
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    /// `n_positions` (1024): the rows of the position embeddings, the longest sequence.
    #[serde(default = "d_positions")]
    pub n_positions: usize,
    /// `n_embd` (768): the hidden size.
    #[serde(default = "d_embd")]
    pub n_embd: usize,
    /// `n_layer` (12).
    #[serde(default = "d_layers")]
    pub n_layer: usize,
    /// `n_head` (12).
    #[serde(default = "d_heads")]
    pub n_head: usize,
    /// `n_inner`: the MLP width; `4 · n_embd` when null.
    #[serde(default)]
    pub n_inner: Option<usize>,
    /// `activation_function` (`gelu_new`, the tanh approximation); one of
    /// [`GPT2_ACTIVATIONS`].
    #[serde(default = "d_act")]
    pub activation_function: String,
    /// `resid_pdrop` (0.1): dropout on each sub-block's output.
    #[serde(default = "d_pdrop")]
    pub resid_pdrop: f64,
    /// `embd_pdrop` (0.1): dropout on the summed embeddings.
    #[serde(default = "d_pdrop")]
    pub embd_pdrop: f64,
    /// `attn_pdrop` (0.1): dropout on the attention probabilities.
    #[serde(default = "d_pdrop")]
    pub attn_pdrop: f64,
    /// `layer_norm_epsilon` (1e-5).
    #[serde(default = "d_eps")]
    pub layer_norm_epsilon: f64,
    /// `initializer_range` (0.02): the std of fresh weights.
    #[serde(default = "d_init")]
    pub initializer_range: f64,
    /// `scale_attn_weights` (true): divide the attention scores by `sqrt(head_dim)`.
    #[serde(default = "d_true")]
    pub scale_attn_weights: bool,
    /// `bos_token_id` (50256).
    #[serde(default = "d_bos")]
    pub bos_token_id: Option<i64>,
    /// `eos_token_id` (50256): one id or a list of ids.
    #[serde(default = "d_eos")]
    pub eos_token_id: Option<Value>,
    /// `pad_token_id` (none).
    #[serde(default)]
    pub pad_token_id: Option<i64>,
    /// `scale_attn_by_inverse_layer_idx` (false): also divide layer `i`'s scores by `i + 1`.
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    /// `reorder_and_upcast_attn` (false): HF's f32 attention for mixed precision. Ember
    /// computes attention in the model's float type either way, so in f32 it changes nothing.
    #[serde(default)]
    pub reorder_and_upcast_attn: bool,
    /// `add_cross_attention` (false): must be false (no encoder-decoder GPT-2).
    #[serde(default)]
    pub add_cross_attention: bool,
    /// `tie_word_embeddings` (true): the output projection is `wte`. When false,
    /// `lm_head.weight` is a separate matrix.
    #[serde(default = "d_true")]
    pub tie_word_embeddings: bool,
    /// Every other field of the file, kept as read.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

config_io!(GPT2Config, &ALIASES);

impl GPT2Config {
    /// Checks the values a model cannot be built from.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.model_type != "gpt2" {
            return Err(format!(
                "model_type `{}` is not a GPT-2 model",
                self.model_type
            ));
        }
        if self.n_head == 0 || !self.n_embd.is_multiple_of(self.n_head) {
            return Err(format!(
                "n_embd {} is not a multiple of n_head {}",
                self.n_embd, self.n_head
            ));
        }
        if self.n_embd == 0 || self.vocab_size == 0 || self.n_positions == 0 {
            return Err(format!(
                "n_embd {}, vocab_size {} and n_positions {} must be positive",
                self.n_embd, self.vocab_size, self.n_positions
            ));
        }
        if !GPT2_ACTIVATIONS.contains(&self.activation_function.as_str()) {
            return Err(format!(
                "activation_function `{}` is not supported (supported: {})",
                self.activation_function,
                GPT2_ACTIVATIONS.join(", ")
            ));
        }
        if self.add_cross_attention {
            return Err(
                "add_cross_attention: true (GPT-2 as an encoder-decoder's decoder) is not supported"
                    .into(),
            );
        }
        for (name, p) in [
            ("resid_pdrop", self.resid_pdrop),
            ("embd_pdrop", self.embd_pdrop),
            ("attn_pdrop", self.attn_pdrop),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(format!("{name} {p} is not a probability below 1"));
            }
        }
        Ok(())
    }

    /// The size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head.max(1)
    }

    /// The MLP width: `n_inner`, or `4 · n_embd`.
    pub fn inner_dim(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    /// The activation of the MLP.
    pub fn activation(&self) -> Activation {
        match self.activation_function.as_str() {
            "gelu" => Activation::Gelu,
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            _ => Activation::GeluTanh,
        }
    }

    /// The config as HF writes `config.json`.
    pub fn to_json_string(&self) -> String {
        serde_json::to_string_pretty(self).expect("a config always serializes")
    }
}

/// `attn`: the fused query / key / value projection (`Conv1D`), attention, `c_proj`.
#[derive(Module, Debug)]
pub struct GPT2Attention<B: Backend> {
    /// `c_attn`: `n_embd → 3 · n_embd`, queries then keys then values.
    pub c_attn: Projection<B>,
    /// `c_proj`.
    pub c_proj: Projection<B>,
    /// Dropout on the attention probabilities (`attn_pdrop`).
    pub attn_dropout: Dropout,
    /// Dropout on the output (`resid_pdrop`).
    pub resid_dropout: Dropout,
    /// Attention heads.
    pub num_heads: usize,
    /// The factor on the scores: `1 / sqrt(head_dim)` (when `scale_attn_weights`), divided
    /// by `layer + 1` (when `scale_attn_by_inverse_layer_idx`).
    pub scale: f64,
}

/// `mlp`: `c_proj(act(c_fc(x)))`, then dropout.
#[derive(Module, Debug)]
pub struct GPT2Mlp<B: Backend> {
    /// `c_fc`.
    pub c_fc: Projection<B>,
    /// `c_proj`.
    pub c_proj: Projection<B>,
    /// Dropout on the output (`resid_pdrop`).
    pub dropout: Dropout,
    /// `activation_function`.
    #[module(skip)]
    pub activation: Activation,
}

/// `transformer.h.N`: pre-norm attention and MLP, each with a residual.
#[derive(Module, Debug)]
pub struct GPT2Block<B: Backend> {
    /// `ln_1`.
    pub ln_1: LayerNorm<B>,
    /// `attn`.
    pub attn: GPT2Attention<B>,
    /// `ln_2`.
    pub ln_2: LayerNorm<B>,
    /// `mlp`.
    pub mlp: GPT2Mlp<B>,
}

/// `GPT2Model` (`transformer.`): token and position embeddings, blocks, final norm.
#[derive(Module, Debug)]
pub struct GPT2Model<B: Backend> {
    /// `wte`: token embeddings.
    pub wte: TokenEmbedding<B>,
    /// `wpe`: position embeddings, `n_positions` rows.
    pub wpe: TokenEmbedding<B>,
    /// Dropout on the summed embeddings (`embd_pdrop`).
    pub drop: Dropout,
    /// `h`.
    pub h: Vec<GPT2Block<B>>,
    /// `ln_f`.
    pub ln_f: LayerNorm<B>,
}

/// `GPT2LMHeadModel`: the decoder and the output projection (`wte`, tied).
#[derive(Module, Debug)]
pub struct GPT2LMHeadModel<B: Backend> {
    /// `transformer`.
    pub transformer: GPT2Model<B>,
    /// `lm_head`; `None` when tied to `transformer.wte` (the default).
    pub lm_head: Option<Projection<B>>,
    /// The configuration (written back by `save_pretrained`).
    #[module(skip)]
    pub config: GPT2Config,
}

fn layer_norm<B: Backend>(c: &GPT2Config, device: &B::Device) -> LayerNorm<B> {
    init_layer_norm(c.n_embd, c.layer_norm_epsilon, device)
}

fn dropout(p: f64) -> Dropout {
    DropoutConfig::new(p).init()
}

impl<B: Backend> GPT2Attention<B> {
    fn forward(
        &self,
        x: Tensor<B, 3>,
        mask: Option<Tensor<B, 4, Bool>>,
        past: Option<LayerKv<B>>,
    ) -> (Tensor<B, 3>, LayerKv<B>) {
        let [batch, seq, hidden] = x.dims();
        let h = self.num_heads;
        let d = hidden / h;
        let fused = self.c_attn.forward(x);
        let part = |i: usize| {
            fused
                .clone()
                .narrow(2, i * hidden, hidden)
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
            None,
            self.scale,
            &self.attn_dropout,
        );
        let context = context.swap_dims(1, 2).reshape([batch, seq, hidden]);
        let out = apply_dropout(&self.resid_dropout, self.c_proj.forward(context));
        (out, kv)
    }
}

impl<B: Backend> GPT2Block<B> {
    fn new(c: &GPT2Config, layer: usize, device: &B::Device) -> Self {
        let (hidden, inner, std) = (c.n_embd, c.inner_dim(), c.initializer_range);
        // HF's GPT-2 scheme: the projections into the residual stream get a smaller std.
        let proj_std = std / (2.0 * c.n_layer as f64).sqrt();
        let mut scale = if c.scale_attn_weights {
            1.0 / (c.head_dim() as f64).sqrt()
        } else {
            1.0
        };
        if c.scale_attn_by_inverse_layer_idx {
            scale /= (layer + 1) as f64;
        }
        Self {
            ln_1: layer_norm(c, device),
            attn: GPT2Attention {
                c_attn: conv1d(init_linear(hidden, 3 * hidden, std, device)),
                c_proj: conv1d(init_linear(hidden, hidden, proj_std, device)),
                attn_dropout: dropout(c.attn_pdrop),
                resid_dropout: dropout(c.resid_pdrop),
                num_heads: c.n_head,
                scale,
            },
            ln_2: layer_norm(c, device),
            mlp: GPT2Mlp {
                c_fc: conv1d(init_linear(hidden, inner, std, device)),
                c_proj: conv1d(init_linear(inner, hidden, proj_std, device)),
                dropout: dropout(c.resid_pdrop),
                activation: c.activation(),
            },
        }
    }

    fn forward(
        &self,
        x: Tensor<B, 3>,
        mask: Option<Tensor<B, 4, Bool>>,
        past: Option<LayerKv<B>>,
    ) -> (Tensor<B, 3>, LayerKv<B>) {
        let (attended, kv) = self.attn.forward(
            crate::params::layer_norm_f32(&self.ln_1, x.clone()),
            mask,
            past,
        );
        let x = x + attended;
        let m = &self.mlp;
        let inner = m.activation.forward(
            m.c_fc
                .forward(crate::params::layer_norm_f32(&self.ln_2, x.clone())),
        );
        (x + apply_dropout(&m.dropout, m.c_proj.forward(inner)), kv)
    }
}

impl<B: Backend> GPT2LMHeadModel<B> {
    /// A model with fresh weights, initialised as HF does (normal with `initializer_range`,
    /// the `c_proj` weights with `initializer_range / sqrt(2 · n_layer)`, zero biases, unit
    /// LayerNorms).
    pub fn new(config: &GPT2Config, device: &B::Device) -> Result<Self> {
        let c = config;
        c.validate().map_err(|message| ModelError::Config {
            path: "<GPT2Config>".into(),
            message,
        })?;
        let std = c.initializer_range;
        Ok(Self {
            transformer: GPT2Model {
                wte: init_embedding(c.vocab_size, c.n_embd, std, None, device),
                wpe: init_embedding(c.n_positions, c.n_embd, std, None, device),
                drop: dropout(c.embd_pdrop),
                h: (0..c.n_layer)
                    .map(|i| GPT2Block::new(c, i, device))
                    .collect(),
                ln_f: layer_norm(c, device),
            },
            lm_head: (!c.tie_word_embeddings).then(|| {
                let mut head = init_linear(c.n_embd, c.vocab_size, std, device);
                head.base.bias = None;
                head
            }),
            config: config.clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &GPT2Config {
        &self.config
    }

    /// One forward pass: logits for every new position, the loss when labels are given, and
    /// the cache extended by the new positions.
    ///
    /// Positions default to `past .. past + seq`, as in HF's `forward`; for a left-padded
    /// batch give `position_ids` counted from the mask, as HF's `generate` does. A position at
    /// or past `n_positions` is an [`ModelError::Input`] error.
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
            hidden: c.n_embd,
        };
        let ForwardStart {
            batch,
            seq,
            past_len,
            past,
            x,
            attention_mask,
            position_ids,
            labels,
            logits_to_keep,
        } = input.start(&shape, &self.transformer.wte)?;
        let total = past_len + seq;
        let device = x.device();
        let positions = match position_ids {
            Some(p) => {
                let max = p.clone().max().into_scalar().elem::<i64>();
                let min = p.clone().min().into_scalar().elem::<i64>();
                if min < 0 || max >= c.n_positions as i64 {
                    return Err(ModelError::Input(format!(
                        "position id {} is outside the {} position embeddings (n_positions {})",
                        if min < 0 { min } else { max },
                        c.n_positions,
                        c.n_positions
                    )));
                }
                p
            }
            None => {
                if total > c.n_positions {
                    return Err(ModelError::Input(format!(
                        "a sequence of {total} positions ({past_len} cached, {seq} new) is longer than n_positions {}",
                        c.n_positions
                    )));
                }
                default_positions(batch, past_len, seq, &device)
            }
        };
        let heads = c.n_head;
        let mask = padding_mask(attention_mask.as_ref(), seq)?
            .map(|m| m.expand([batch, heads, seq, total]));
        let x = x + self.transformer.wpe.forward(positions);
        let mut x = apply_dropout(&self.transformer.drop, x);
        let mut past_layers = past.map(|p| p.layers.into_iter());
        let mut cache = Vec::with_capacity(self.transformer.h.len());
        for block in &self.transformer.h {
            let layer_past = past_layers.as_mut().and_then(Iterator::next);
            let (out, kv) = block.forward(x, mask.clone(), layer_past);
            x = out;
            cache.push(kv);
        }
        let x = crate::params::layer_norm_f32(&self.transformer.ln_f, x);
        Ok(causal_output(
            x,
            logits_to_keep,
            (self.lm_head.as_ref(), &self.transformer.wte),
            labels,
            cache,
        ))
    }
}

impl<B: Backend> CausalLm<B> for GPT2LMHeadModel<B> {
    fn forward(&self, input: CausalLmInput<B>) -> Result<CausalLmOutput<B>> {
        GPT2LMHeadModel::forward(self, input)
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn max_positions(&self) -> Option<usize> {
        Some(self.config.n_positions)
    }
}

/// Marks a layer as GPT-2's `Conv1D` (its checkpoint weight is `[in, out]`, burn's own layout).
fn conv1d<B: Backend>(mut layer: Projection<B>) -> Projection<B> {
    layer.conv1d = true;
    layer
}

/// Visits a `Conv1D` (`[in, out]` weight, burn's own layout) under `p`.
fn visit_conv1d<B: Backend>(
    layer: Projection<B>,
    p: &str,
    v: &mut dyn ParamVisitor<B>,
) -> Result<Projection<B>> {
    debug_assert!(layer.conv1d, "GPT-2's blocks are built from Conv1D layers");
    layer.visit(p, v)
}

impl<B: Backend> VisitParams<B> for GPT2Block<B> {
    fn visit(mut self, p: &str, v: &mut dyn ParamVisitor<B>) -> Result<Self> {
        self.ln_1 = self.ln_1.visit(&join(p, "ln_1"), v)?;
        let a = join(p, "attn");
        self.attn.c_attn = visit_conv1d(self.attn.c_attn, &join(&a, "c_attn"), v)?;
        self.attn.c_proj = visit_conv1d(self.attn.c_proj, &join(&a, "c_proj"), v)?;
        self.ln_2 = self.ln_2.visit(&join(p, "ln_2"), v)?;
        let m = join(p, "mlp");
        self.mlp.c_fc = visit_conv1d(self.mlp.c_fc, &join(&m, "c_fc"), v)?;
        self.mlp.c_proj = visit_conv1d(self.mlp.c_proj, &join(&m, "c_proj"), v)?;
        Ok(self)
    }
}

impl<B: Backend> VisitParams<B> for GPT2Model<B> {
    fn visit(mut self, p: &str, v: &mut dyn ParamVisitor<B>) -> Result<Self> {
        self.wte = self.wte.visit(&join(p, "wte"), v)?;
        self.wpe = self.wpe.visit(&join(p, "wpe"), v)?;
        let blocks = std::mem::take(&mut self.h);
        for (i, block) in blocks.into_iter().enumerate() {
            self.h.push(block.visit(&join(p, &format!("h.{i}")), v)?);
        }
        self.ln_f = self.ln_f.visit(&join(p, "ln_f"), v)?;
        Ok(self)
    }
}

impl<B: Backend> VisitParams<B> for GPT2LMHeadModel<B> {
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
    fn generic_field_names_and_defaults() {
        let c = GPT2Config::from_json_value(
            serde_json::json!({"model_type": "gpt2", "hidden_size": 64, "num_attention_heads": 4,
                "n_ctx": 1024}),
            Path::new("config.json"),
        )
        .unwrap();
        assert_eq!((c.n_embd, c.n_head, c.n_layer), (64, 4, 12));
        assert_eq!((c.inner_dim(), c.head_dim()), (256, 16));
        assert_eq!(c.extra["n_ctx"], 1024);
        let json = c.to_json_string();
        assert!(json.contains("\"n_inner\": null") && !json.contains("hidden_size"));
    }

    #[test]
    fn unsupported_values_are_named() {
        let err = GPT2Config::from_json_value(
            serde_json::json!({"model_type": "gpt2", "activation_function": "quick_gelu"}),
            Path::new("config.json"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("`quick_gelu`"), "{err}");
    }
}
