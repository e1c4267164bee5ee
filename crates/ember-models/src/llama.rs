//! `LlamaForCausalLM`: RMSNorm, rotary positions (with HF's scaling variants), grouped-query
//! attention and a SwiGLU MLP, tied or untied output embeddings. Covers Llama 2 / 3, TinyLlama,
//! SmolLM2, and Qwen2-style checkpoints with attention biases.
//!
//! One struct per HF sub-module, so that every parameter sits at its HF key
//! (`model.layers.3.self_attn.q_proj.weight`).

use crate::causal::{
    append_kv, causal_output, default_positions, padding_mask, repeat_kv, CausalLm, CausalLmInput,
    CausalLmOutput, ForwardStart, LayerKv, ModelShape,
};
use crate::config::config_io;
use crate::error::{ModelError, Result};
use crate::params::{apply_rms_norm, init_embedding, init_linear, join, ParamVisitor, VisitParams};
use crate::rope::{self, RopeParameters};
use crate::tensor_parallel::{gather_projection, heads_per_rank, slice_projection, Split};
use crate::Activation;
use burn::module::Module;
use burn::nn::{RmsNorm, RmsNormConfig};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{backend::Backend, Bool, ElementConversion, Tensor};
use ember_distributed::TensorParallel;
use ember_peft::{Projection, TokenEmbedding};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::Path;

fn d_model_type() -> String {
    "llama".into()
}
fn d_vocab() -> usize {
    32000
}
fn d_hidden() -> usize {
    4096
}
fn d_intermediate() -> usize {
    11008
}
fn d_layers() -> usize {
    32
}
fn d_heads() -> usize {
    32
}
fn d_act() -> String {
    "silu".into()
}
fn d_positions() -> usize {
    2048
}
fn d_init() -> f64 {
    0.02
}
fn d_eps() -> f64 {
    1e-6
}
fn d_bos() -> Option<i64> {
    Some(1)
}
fn d_eos() -> Option<Value> {
    Some(2.into())
}

/// HF `LlamaConfig`, with its field names and defaults. Every other field is kept in `extra`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// `model_type`: `llama`.
    #[serde(default = "d_model_type")]
    pub model_type: String,
    /// `architectures`, e.g. `["LlamaForCausalLM"]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    /// `vocab_size` (32000).
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    /// `hidden_size` (4096).
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    /// `intermediate_size` of the MLP (11008).
    #[serde(default = "d_intermediate")]
    pub intermediate_size: usize,
    /// `num_hidden_layers` (32).
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    /// `num_attention_heads` (32).
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    /// `num_key_value_heads`: fewer than the attention heads for grouped-query attention;
    /// `num_attention_heads` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// `head_dim`; `hidden_size / num_attention_heads` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// `hidden_act` of the MLP gate (`silu`).
    #[serde(default = "d_act")]
    pub hidden_act: String,
    /// `max_position_embeddings` (2048).
    #[serde(default = "d_positions")]
    pub max_position_embeddings: usize,
    /// `initializer_range` (0.02): the std of fresh weights.
    #[serde(default = "d_init")]
    pub initializer_range: f64,
    /// `rms_norm_eps` (1e-6).
    #[serde(default = "d_eps")]
    pub rms_norm_eps: f64,
    /// `pad_token_id` (none).
    #[serde(default)]
    pub pad_token_id: Option<i64>,
    /// `bos_token_id` (1).
    #[serde(default = "d_bos")]
    pub bos_token_id: Option<i64>,
    /// `eos_token_id` (2): one id or a list of ids.
    #[serde(default = "d_eos")]
    pub eos_token_id: Option<Value>,
    /// `tie_word_embeddings` (false): the output projection is the input embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// `rope_theta` of transformers 4 configs (in `rope_parameters` in transformers 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// `rope_scaling` of transformers 4 configs: `{"type" / "rope_type", "factor", ...}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<Value>,
    /// `rope_parameters` of transformers 5 configs: `{"rope_type", "rope_theta", ...}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<Value>,
    /// `attention_bias` (false): biases on the q / k / v / o projections.
    #[serde(default)]
    pub attention_bias: bool,
    /// `attention_dropout` (0).
    #[serde(default)]
    pub attention_dropout: f64,
    /// `mlp_bias` (false): biases on the gate / up / down projections.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Every other field of the file, kept as read.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

config_io!(LlamaConfig, &[]);

impl LlamaConfig {
    /// Checks the values a model cannot be built from.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.model_type != "llama" {
            return Err(format!(
                "model_type `{}` is not a Llama model",
                self.model_type
            ));
        }
        let heads = self.num_attention_heads;
        let kv = self.num_key_value_heads();
        if heads == 0 || kv == 0 || !heads.is_multiple_of(kv) {
            return Err(format!(
                "num_attention_heads {heads} must be a positive multiple of num_key_value_heads {kv}"
            ));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(heads) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {heads}",
                self.hidden_size
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!(
                "head_dim {} must be even for rotary positions",
                self.head_dim()
            ));
        }
        if self.hidden_act != "silu" {
            return Err(format!(
                "hidden_act `{}` is not supported for Llama (supported: silu)",
                self.hidden_act
            ));
        }
        self.rope().map(|_| ())
    }

    /// Key / value heads.
    pub fn num_key_value_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// The size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The rotary parameters from `rope_parameters`, or `rope_theta` and `rope_scaling`.
    pub fn rope(&self) -> std::result::Result<RopeParameters, String> {
        RopeParameters::from_config(
            self.rope_parameters.as_ref(),
            self.rope_scaling.as_ref(),
            self.rope_theta,
            self.max_position_embeddings,
        )
    }

    /// The config as HF writes `config.json`.
    pub fn to_json_string(&self) -> String {
        serde_json::to_string_pretty(self).expect("a config always serializes")
    }
}

/// `self_attn`: grouped-query attention with rotary positions.
#[derive(Module, Debug)]
pub struct LlamaAttention<B: Backend> {
    /// `q_proj`.
    pub q_proj: Projection<B>,
    /// `k_proj`.
    pub k_proj: Projection<B>,
    /// `v_proj`.
    pub v_proj: Projection<B>,
    /// `o_proj`.
    pub o_proj: Projection<B>,
    /// Attention heads.
    pub num_heads: usize,
    /// Key / value heads.
    pub num_kv_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
}

/// `mlp`: `down(act(gate(x)) · up(x))`.
#[derive(Module, Debug)]
pub struct LlamaMlp<B: Backend> {
    /// `gate_proj`.
    pub gate_proj: Projection<B>,
    /// `up_proj`.
    pub up_proj: Projection<B>,
    /// `down_proj`.
    pub down_proj: Projection<B>,
}

/// `model.layers.N`: pre-norm attention and MLP, each with a residual.
#[derive(Module, Debug)]
pub struct LlamaDecoderLayer<B: Backend> {
    /// `self_attn`.
    pub self_attn: LlamaAttention<B>,
    /// `mlp`.
    pub mlp: LlamaMlp<B>,
    /// `input_layernorm`.
    pub input_layernorm: RmsNorm<B>,
    /// `post_attention_layernorm`.
    pub post_attention_layernorm: RmsNorm<B>,
    /// The tensor-parallel group this layer's attention heads and MLP units are split over
    /// (see [`LlamaForCausalLM::tensor_parallel`]); `None`: the whole layer.
    #[module(skip)]
    pub tensor_parallel: Option<TensorParallel>,
}

/// `LlamaModel` (`model.`): embeddings, decoder layers, final norm.
#[derive(Module, Debug)]
pub struct LlamaModel<B: Backend> {
    /// `embed_tokens`.
    pub embed_tokens: TokenEmbedding<B>,
    /// `layers`.
    pub layers: Vec<LlamaDecoderLayer<B>>,
    /// `norm`.
    pub norm: RmsNorm<B>,
}

/// `LlamaForCausalLM`: the decoder and the output projection (`lm_head`, or the input
/// embeddings when `tie_word_embeddings`).
#[derive(Module, Debug)]
pub struct LlamaForCausalLM<B: Backend> {
    /// `model`.
    pub model: LlamaModel<B>,
    /// `lm_head`; `None` when tied to `model.embed_tokens`.
    pub lm_head: Option<Projection<B>>,
    /// The configuration (written back by `save_pretrained`).
    #[module(skip)]
    pub config: LlamaConfig,
    /// The rotary parameters resolved from the config.
    #[module(skip)]
    pub rope: RopeParameters,
}

fn linear<B: Backend>(
    d_in: usize,
    d_out: usize,
    bias: bool,
    c: &LlamaConfig,
    device: &B::Device,
) -> Projection<B> {
    let mut l = init_linear(d_in, d_out, c.initializer_range, device);
    if !bias {
        l.base.bias = None;
    }
    l
}

fn rms_norm<B: Backend>(c: &LlamaConfig, device: &B::Device) -> RmsNorm<B> {
    RmsNormConfig::new(c.hidden_size)
        .with_epsilon(c.rms_norm_eps)
        .init(device)
}

impl<B: Backend> LlamaAttention<B> {
    fn new(c: &LlamaConfig, device: &B::Device) -> Self {
        let (h, d, kv) = (c.num_attention_heads, c.head_dim(), c.num_key_value_heads());
        let bias = c.attention_bias;
        Self {
            q_proj: linear(c.hidden_size, h * d, bias, c, device),
            k_proj: linear(c.hidden_size, kv * d, bias, c, device),
            v_proj: linear(c.hidden_size, kv * d, bias, c, device),
            o_proj: linear(h * d, c.hidden_size, bias, c, device),
            num_heads: h,
            num_kv_heads: kv,
            head_dim: d,
        }
    }

    fn forward(
        &self,
        x: Tensor<B, 3>,
        (cos, sin): (&Tensor<B, 4>, &Tensor<B, 4>),
        mask: Option<&Tensor<B, 4, Bool>>,
        past: Option<LayerKv<B>>,
    ) -> (Tensor<B, 3>, LayerKv<B>) {
        let [batch, seq, _] = x.dims();
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = self
            .q_proj
            .forward(x.clone())
            .reshape([batch, seq, h, d])
            .swap_dims(1, 2);
        let k = self
            .k_proj
            .forward(x.clone())
            .reshape([batch, seq, kvh, d])
            .swap_dims(1, 2);
        let v = self
            .v_proj
            .forward(x)
            .reshape([batch, seq, kvh, d])
            .swap_dims(1, 2);
        // Under autocast the rotary products promote to f32, as in transformers, and the
        // attention (sdpa, a half-precision op) rounds its operands again.
        let q = ember_kernels::autocast_round(rope::apply(q, cos, sin));
        let k = ember_kernels::autocast_round(rope::apply(k, cos, sin));
        let kv = append_kv(past, k, v);
        let total = kv.key.dims()[2];
        let n_rep = h / kvh;
        let fused = match mask {
            // The fused CPU kernel reads the grouped key / value heads in place. With padding,
            // burn's path below keeps HF's rule for queries that see no real key.
            None => ember_kernels::attention(
                &q,
                &kv.key,
                &kv.value,
                ember_kernels::AttentionMask {
                    causal: true,
                    ..Default::default()
                },
            ),
            Some(_) => None,
        };
        let context = if let Some(context) = fused {
            context
        } else if seq == 1 && n_rep > 1 {
            // One new token (decoding): the query heads sharing a key / value head become rows
            // of one attention over that head, so the cache is never copied per query head.
            // The single query sees every cached key, so nothing is causally masked.
            let mask = mask.map(|m| m.clone().expand([batch, kvh, n_rep, total]));
            attention(
                q.reshape([batch, kvh, n_rep, d]),
                kv.key.clone(),
                kv.value.clone(),
                mask,
                None,
                AttentionModuleOptions::default(),
            )
            .reshape([batch, h, 1, d])
        } else {
            let mask = mask.map(|m| m.clone().expand([batch, h, seq, total]));
            attention(
                q,
                repeat_kv(kv.key.clone(), n_rep),
                repeat_kv(kv.value.clone(), n_rep),
                mask,
                None,
                AttentionModuleOptions {
                    is_causal: true,
                    ..Default::default()
                },
            )
        };
        let context = context.swap_dims(1, 2).reshape([batch, seq, h * d]);
        (self.o_proj.forward(context), kv)
    }
}

impl<B: Backend> LlamaDecoderLayer<B> {
    fn new(c: &LlamaConfig, device: &B::Device) -> Self {
        let (hidden, inter, bias) = (c.hidden_size, c.intermediate_size, c.mlp_bias);
        Self {
            self_attn: LlamaAttention::new(c, device),
            mlp: LlamaMlp {
                gate_proj: linear(hidden, inter, bias, c, device),
                up_proj: linear(hidden, inter, bias, c, device),
                down_proj: linear(inter, hidden, bias, c, device),
            },
            input_layernorm: rms_norm(c, device),
            post_attention_layernorm: rms_norm(c, device),
            tensor_parallel: None,
        }
    }

    /// The layer on hidden states `x` `[batch, seq, hidden]`, with the rotary tables, the
    /// padding mask and the layer's cache: the new hidden states and the extended cache.
    pub(crate) fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: (&Tensor<B, 4>, &Tensor<B, 4>),
        mask: Option<&Tensor<B, 4, Bool>>,
        past: Option<LayerKv<B>>,
    ) -> Result<(Tensor<B, 3>, LayerKv<B>)> {
        // Split over a group, each block runs on this rank's heads / units between Megatron's
        // `f` (its input's gradient summed over the ranks) and `g` (its output summed).
        let tp = self.tensor_parallel.as_ref();
        let enter = |x: Tensor<B, 3>| match tp {
            Some(tp) => tp.copy_to_region(x),
            None => Ok(x),
        };
        let leave = |x: Tensor<B, 3>| match tp {
            Some(tp) => tp.reduce_from_region(x),
            None => Ok(x),
        };
        let normed = enter(apply_rms_norm(&self.input_layernorm, x.clone()))?;
        let (attended, kv) = self.self_attn.forward(normed, rope, mask, past);
        let x = x + leave(attended)?;
        let normed = enter(apply_rms_norm(&self.post_attention_layernorm, x.clone()))?;
        let m = &self.mlp;
        let gate = m.gate_proj.forward(normed.clone());
        let up = m.up_proj.forward(normed);
        let gated = ember_kernels::silu_mul(&gate, &up)
            .unwrap_or_else(|| Activation::Silu.forward(gate) * up);
        Ok((x + leave(m.down_proj.forward(gated))?, kv))
    }
}

impl<B: Backend> LlamaForCausalLM<B> {
    /// A model with fresh weights, initialised as HF does (normal with `initializer_range`,
    /// zero biases, unit norms).
    pub fn new(config: &LlamaConfig, device: &B::Device) -> Result<Self> {
        let rope = config.rope().map_err(|message| ModelError::Config {
            path: "<LlamaConfig>".into(),
            message,
        })?;
        let c = config;
        Ok(Self {
            model: LlamaModel {
                embed_tokens: init_embedding(
                    c.vocab_size,
                    c.hidden_size,
                    c.initializer_range,
                    c.pad_token_id.map(|p| p as usize),
                    device,
                ),
                layers: (0..c.num_hidden_layers)
                    .map(|_| LlamaDecoderLayer::new(c, device))
                    .collect(),
                norm: rms_norm(c, device),
            },
            lm_head: (!c.tie_word_embeddings)
                .then(|| linear(c.hidden_size, c.vocab_size, false, c, device)),
            config: config.clone(),
            rope,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// One forward pass: logits for every new position, the loss when labels are given, and
    /// the cache extended by the new positions.
    pub fn forward(&self, input: CausalLmInput<B>) -> Result<CausalLmOutput<B>> {
        if self.is_tensor_parallel() {
            // Not on a pool worker: ranks on threads of one process wait for each other in
            // the collectives, and a worker blocked there would starve the others' loops.
            return self.forward_inner(input);
        }
        ember_kernels::on_worker::<B, _>(|| self.forward_inner(input))
    }

    /// This rank's slice of the model for tensor parallel over `tp` (Megatron's split):
    /// every decoder layer keeps `num_attention_heads / size` query heads and
    /// `num_key_value_heads / size` key / value heads (`q_proj`, `k_proj`, `v_proj` by
    /// output features, `o_proj` by input features) and `intermediate_size / size` MLP units
    /// (`gate_proj`, `up_proj` by output features, `down_proj` by input features). The
    /// embeddings, norms and `lm_head` stay whole on every rank. Every rank passes the same
    /// model; the forward and backward passes then equal the whole model's, the replicated
    /// parameters getting the same gradient on every rank.
    ///
    /// The group must divide both head counts and the intermediate size; adapters and
    /// quantized layers are not split (add adapters to the whole model after gathering).
    /// Dropout is not used by Llama, so ranks need no shared random state.
    pub fn tensor_parallel(mut self, tp: TensorParallel) -> Result<Self> {
        let c = &self.config;
        let heads = heads_per_rank(c.num_attention_heads, &tp, "num_attention_heads")?;
        let kv_heads = heads_per_rank(c.num_key_value_heads(), &tp, "num_key_value_heads")?;
        heads_per_rank(c.intermediate_size, &tp, "intermediate_size")?;
        let layers = std::mem::take(&mut self.model.layers);
        for (i, mut layer) in layers.into_iter().enumerate() {
            if layer.tensor_parallel.is_some() {
                return Err(ModelError::Input(format!(
                    "model.layers.{i} is already split tensor parallel"
                )));
            }
            let key = |name: &str| format!("model.layers.{i}.{name}");
            let a = layer.self_attn;
            layer.self_attn = LlamaAttention {
                q_proj: slice_projection(a.q_proj, &tp, Split::Column, &key("self_attn.q_proj"))?,
                k_proj: slice_projection(a.k_proj, &tp, Split::Column, &key("self_attn.k_proj"))?,
                v_proj: slice_projection(a.v_proj, &tp, Split::Column, &key("self_attn.v_proj"))?,
                o_proj: slice_projection(a.o_proj, &tp, Split::Row, &key("self_attn.o_proj"))?,
                num_heads: heads,
                num_kv_heads: kv_heads,
                head_dim: a.head_dim,
            };
            let m = layer.mlp;
            layer.mlp = LlamaMlp {
                gate_proj: slice_projection(
                    m.gate_proj,
                    &tp,
                    Split::Column,
                    &key("mlp.gate_proj"),
                )?,
                up_proj: slice_projection(m.up_proj, &tp, Split::Column, &key("mlp.up_proj"))?,
                down_proj: slice_projection(m.down_proj, &tp, Split::Row, &key("mlp.down_proj"))?,
            };
            layer.tensor_parallel = Some(tp.clone());
            self.model.layers.push(layer);
        }
        Ok(self)
    }

    /// Whether the model is a tensor-parallel slice ([`Self::tensor_parallel`]).
    pub fn is_tensor_parallel(&self) -> bool {
        self.model
            .layers
            .iter()
            .any(|l| l.tensor_parallel.is_some())
    }

    /// The whole model, gathered from every rank's slice (every rank of the group calls it
    /// and gets the whole model: save it from one rank). A whole model is returned as it is.
    pub fn gather_tensor_parallel(mut self) -> Result<Self> {
        let c = &self.config;
        let (bias, mlp_bias) = (c.attention_bias, c.mlp_bias);
        let (heads, kv_heads) = (c.num_attention_heads, c.num_key_value_heads());
        let layers = std::mem::take(&mut self.model.layers);
        for mut layer in layers {
            if let Some(tp) = layer.tensor_parallel.take() {
                let a = layer.self_attn;
                layer.self_attn = LlamaAttention {
                    q_proj: gather_projection(a.q_proj, &tp, Split::Column, bias)?,
                    k_proj: gather_projection(a.k_proj, &tp, Split::Column, bias)?,
                    v_proj: gather_projection(a.v_proj, &tp, Split::Column, bias)?,
                    o_proj: gather_projection(a.o_proj, &tp, Split::Row, bias)?,
                    num_heads: heads,
                    num_kv_heads: kv_heads,
                    head_dim: a.head_dim,
                };
                let m = layer.mlp;
                layer.mlp = LlamaMlp {
                    gate_proj: gather_projection(m.gate_proj, &tp, Split::Column, mlp_bias)?,
                    up_proj: gather_projection(m.up_proj, &tp, Split::Column, mlp_bias)?,
                    down_proj: gather_projection(m.down_proj, &tp, Split::Row, mlp_bias)?,
                };
            }
            self.model.layers.push(layer);
        }
        Ok(self)
    }

    /// [`Self::forward`], on the calling thread.
    fn forward_inner(&self, input: CausalLmInput<B>) -> Result<CausalLmOutput<B>> {
        let c = &self.config;
        let shape = ModelShape {
            layers: c.num_hidden_layers,
            // A tensor-parallel slice caches its own key / value heads.
            kv_heads: self
                .model
                .layers
                .first()
                .map_or(c.num_key_value_heads(), |l| l.self_attn.num_kv_heads),
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
            position_ids,
            labels,
            logits_to_keep,
        } = input.start(&shape, &self.model.embed_tokens)?;
        let positions =
            position_ids.unwrap_or_else(|| default_positions(batch, past_len, seq, &x.device()));
        let longest = if self.rope.rope_type == "dynamic" {
            positions.clone().max().into_scalar().elem::<i64>() as usize + 1
        } else {
            past_len + seq
        };
        let inv_freq = self.rope.inv_freq(c.head_dim(), longest);
        let (cos, sin) = rope::cos_sin(&inv_freq, positions);
        let mask = padding_mask(attention_mask.as_ref(), seq)?;
        let mut past_layers = past.map(|p| p.layers.into_iter());
        let mut cache = Vec::with_capacity(self.model.layers.len());
        let mut x = x;
        for layer in &self.model.layers {
            let layer_past = past_layers.as_mut().and_then(Iterator::next);
            let (out, kv) = layer.forward(x, (&cos, &sin), mask.as_ref(), layer_past)?;
            x = out;
            cache.push(kv);
        }
        let x = apply_rms_norm(&self.model.norm, x);
        Ok(causal_output(
            x,
            logits_to_keep,
            (self.lm_head.as_ref(), &self.model.embed_tokens),
            labels,
            cache,
        ))
    }
}

impl<B: Backend> CausalLm<B> for LlamaForCausalLM<B> {
    fn forward(&self, input: CausalLmInput<B>) -> Result<CausalLmOutput<B>> {
        LlamaForCausalLM::forward(self, input)
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn max_positions(&self) -> Option<usize> {
        None
    }
}

impl<B: Backend> VisitParams<B> for LlamaAttention<B> {
    fn visit(mut self, p: &str, v: &mut dyn ParamVisitor<B>) -> Result<Self> {
        self.q_proj = self.q_proj.visit(&join(p, "q_proj"), v)?;
        self.k_proj = self.k_proj.visit(&join(p, "k_proj"), v)?;
        self.v_proj = self.v_proj.visit(&join(p, "v_proj"), v)?;
        self.o_proj = self.o_proj.visit(&join(p, "o_proj"), v)?;
        Ok(self)
    }
}

impl<B: Backend> VisitParams<B> for LlamaDecoderLayer<B> {
    fn visit(mut self, p: &str, v: &mut dyn ParamVisitor<B>) -> Result<Self> {
        self.self_attn = self.self_attn.visit(&join(p, "self_attn"), v)?;
        let m = join(p, "mlp");
        self.mlp.gate_proj = self.mlp.gate_proj.visit(&join(&m, "gate_proj"), v)?;
        self.mlp.up_proj = self.mlp.up_proj.visit(&join(&m, "up_proj"), v)?;
        self.mlp.down_proj = self.mlp.down_proj.visit(&join(&m, "down_proj"), v)?;
        self.input_layernorm = self.input_layernorm.visit(&join(p, "input_layernorm"), v)?;
        self.post_attention_layernorm = self
            .post_attention_layernorm
            .visit(&join(p, "post_attention_layernorm"), v)?;
        Ok(self)
    }
}

impl<B: Backend> VisitParams<B> for LlamaForCausalLM<B> {
    fn visit(mut self, p: &str, v: &mut dyn ParamVisitor<B>) -> Result<Self> {
        let m = join(p, "model");
        self.model.embed_tokens = self
            .model
            .embed_tokens
            .visit(&join(&m, "embed_tokens"), v)?;
        let layers = std::mem::take(&mut self.model.layers);
        for (i, layer) in layers.into_iter().enumerate() {
            self.model
                .layers
                .push(layer.visit(&join(&m, &format!("layers.{i}")), v)?);
        }
        self.model.norm = self.model.norm.visit(&join(&m, "norm"), v)?;
        if let Some(head) = self.lm_head.take() {
            self.lm_head = Some(head.visit(&join(p, "lm_head"), v)?);
        }
        Ok(self)
    }
}
