//! BERT and RoBERTa encoders (`BertModel`, `RobertaModel`), one struct per HF sub-module so
//! that each parameter sits at its HF key (`encoder.layer.3.attention.self.query.weight`).
//!
//! RoBERTa is the same network; it differs only in how position ids are made (numbered after
//! `pad_token_id`, skipping padding), in its defaults, and in its key prefix (`roberta.`), all
//! of which follow from `model_type`.

use crate::config::BertConfig;
use crate::error::{ModelError, Result};
use crate::params::{
    apply_dropout, init_embedding, init_layer_norm, init_linear, join, layer_norm, ParamVisitor,
    VisitParams,
};
use crate::tensor_parallel::{gather_projection, heads_per_rank, slice_projection, Split};
use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, LayerNorm};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{activation, backend::Backend, Bool, ElementConversion, Int, Tensor};
use ember_distributed::TensorParallel;
use ember_peft::{Projection, TokenEmbedding, VirtualPrompt};

/// The feed-forward activation named by `hidden_act`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu`: the exact, erf-based GELU.
    Gelu,
    /// `gelu_new` / `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    /// `relu`.
    Relu,
    /// `silu`.
    Silu,
}

impl Activation {
    /// The activation for a `hidden_act` value (checked by [`BertConfig::validate`]).
    pub fn from_hf(name: &str) -> Self {
        match name {
            "gelu_new" | "gelu_pytorch_tanh" => Self::GeluTanh,
            "relu" => Self::Relu,
            "silu" => Self::Silu,
            _ => Self::Gelu,
        }
    }

    /// Applies the activation.
    pub fn forward<B: Backend, const D: usize>(self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Self::Gelu => ember_kernels::gelu_erf(&x).unwrap_or_else(|| activation::gelu(x)),
            Self::GeluTanh => activation::gelu_approximate(x),
            Self::Relu => activation::relu(x),
            Self::Silu => activation::silu(x),
        }
    }
}

/// The inputs of an encoder, as a tokenizer gives them (`[batch, seq]` each).
#[derive(Debug, Clone)]
pub struct EncoderInput<B: Backend> {
    /// Token ids.
    pub input_ids: Tensor<B, 2, Int>,
    /// 1 for real tokens, 0 for padding (on either side); all ones when `None`.
    pub attention_mask: Option<Tensor<B, 2, Int>>,
    /// Segment ids; zeros when `None`.
    pub token_type_ids: Option<Tensor<B, 2, Int>>,
    /// Position ids; `0..seq` (BERT) or numbered after the padding id (RoBERTa) when `None`.
    pub position_ids: Option<Tensor<B, 2, Int>>,
}

impl<B: Backend> EncoderInput<B> {
    /// Input ids alone.
    pub fn new(input_ids: Tensor<B, 2, Int>) -> Self {
        Self {
            input_ids,
            attention_mask: None,
            token_type_ids: None,
            position_ids: None,
        }
    }

    /// With an attention mask.
    pub fn with_attention_mask(mut self, mask: Tensor<B, 2, Int>) -> Self {
        self.attention_mask = Some(mask);
        self
    }

    /// With token type ids.
    pub fn with_token_type_ids(mut self, ids: Tensor<B, 2, Int>) -> Self {
        self.token_type_ids = Some(ids);
        self
    }

    /// With position ids.
    pub fn with_position_ids(mut self, ids: Tensor<B, 2, Int>) -> Self {
        self.position_ids = Some(ids);
        self
    }
}

/// `embeddings`: word + position + token type, then LayerNorm and dropout.
#[derive(Module, Debug)]
pub struct BertEmbeddings<B: Backend> {
    /// `word_embeddings`.
    pub word_embeddings: TokenEmbedding<B>,
    /// `position_embeddings`.
    pub position_embeddings: TokenEmbedding<B>,
    /// `token_type_embeddings`.
    pub token_type_embeddings: TokenEmbedding<B>,
    /// `LayerNorm`.
    pub layer_norm: LayerNorm<B>,
    /// `layer_norm_eps` (burn's `LayerNorm` keeps its own private).
    #[module(skip)]
    pub layer_norm_eps: f64,
    /// Dropout after the LayerNorm (`hidden_dropout_prob`).
    pub dropout: Dropout,
    /// `pad_token_id`: PyTorch's `padding_idx`, whose row gets no gradient.
    pub padding_idx: Option<usize>,
    /// RoBERTa's padding id, after which positions are numbered; `None` for BERT.
    pub roberta_padding_idx: Option<usize>,
}

/// An embedding lookup whose `padding_idx` row receives no gradient, as in `torch.nn.Embedding`.
fn lookup<B: Backend>(
    table: &burn::nn::Embedding<B>,
    ids: Tensor<B, 2, Int>,
    padding_idx: Option<usize>,
) -> Tensor<B, 3> {
    let Some(pad) = padding_idx.filter(|_| B::ad_enabled(&ids.device())) else {
        return table.forward(ids);
    };
    let is_pad = ids.clone().equal_elem(pad as i64).unsqueeze_dim::<3>(2);
    let frozen = burn::tensor::module::embedding(table.weight.val().detach(), ids.clone());
    let [batch, seq, hidden] = frozen.dims();
    table
        .forward(ids)
        .mask_where(is_pad.expand([batch, seq, hidden]), frozen)
}

impl<B: Backend> BertEmbeddings<B> {
    fn new(c: &BertConfig, device: &B::Device) -> Self {
        let std = c.initializer_range;
        let pad = c.pad_token_id.map(|p| p as usize);
        Self {
            word_embeddings: init_embedding(c.vocab_size, c.hidden_size, std, pad, device),
            position_embeddings: init_embedding(
                c.max_position_embeddings,
                c.hidden_size,
                std,
                if c.is_roberta() { pad } else { None },
                device,
            ),
            token_type_embeddings: init_embedding(
                c.type_vocab_size,
                c.hidden_size,
                std,
                None,
                device,
            ),
            layer_norm: init_layer_norm(c.hidden_size, c.layer_norm_eps, device),
            layer_norm_eps: c.layer_norm_eps,
            dropout: DropoutConfig::new(c.hidden_dropout_prob).init(),
            padding_idx: pad,
            roberta_padding_idx: if c.is_roberta() { pad } else { None },
        }
    }

    /// The position ids HF makes when none are given.
    pub fn default_position_ids(&self, input_ids: &Tensor<B, 2, Int>) -> Tensor<B, 2, Int> {
        let [batch, seq] = input_ids.dims();
        match self.roberta_padding_idx {
            // RoBERTa: cumsum(ids != pad) * (ids != pad) + pad.
            Some(pad) => {
                let real = input_ids.clone().not_equal_elem(pad as i64).int();
                (real.clone().cumsum(1) * real).add_scalar(pad as i64)
            }
            None => Tensor::<B, 1, Int>::arange(0..seq as i64, &input_ids.device())
                .unsqueeze::<2>()
                .repeat_dim(0, batch),
        }
    }

    /// The position ids with a prompt-learning adapter active, as HF makes them when peft
    /// calls the model: virtual tokens (`tokens` of them) are embeddings, numbered with the
    /// input from the start (RoBERTa: from `pad + 1`, its numbering of `inputs_embeds`); a
    /// prefix of `past` positions shifts the input's numbers, as a cache does.
    fn prompt_position_ids(
        &self,
        input: &EncoderInput<B>,
        tokens: usize,
        past: usize,
    ) -> Tensor<B, 2, Int> {
        let ids = &input.input_ids;
        let [batch, seq] = ids.dims();
        let device = ids.device();
        match (self.roberta_padding_idx, tokens) {
            (Some(pad), 0) => {
                let real = ids.clone().not_equal_elem(pad as i64).int();
                ((real.clone().cumsum(1) + past as i64) * real).add_scalar(pad as i64)
            }
            (Some(pad), v) => {
                Tensor::<B, 1, Int>::arange((pad + 1) as i64..(pad + 1 + v + seq) as i64, &device)
                    .unsqueeze::<2>()
                    .repeat_dim(0, batch)
            }
            (None, v) => Tensor::<B, 1, Int>::arange(past as i64..(past + v + seq) as i64, &device)
                .unsqueeze::<2>()
                .repeat_dim(0, batch),
        }
    }

    fn forward(&self, input: &EncoderInput<B>, prompt: Option<&EncoderPrompt<B>>) -> Tensor<B, 3> {
        let ids = input.input_ids.clone();
        let [batch, seq] = ids.dims();
        let device = ids.device();
        let (tokens, past) = prompt.map_or((0, 0), |p| (p.tokens_len(), p.prefix_len()));
        let positions = match prompt {
            // peft drops the caller's position ids when a prompt is active.
            Some(_) => self.prompt_position_ids(input, tokens, past),
            None => input
                .position_ids
                .clone()
                .unwrap_or_else(|| self.default_position_ids(&ids)),
        };
        let types = input
            .token_type_ids
            .clone()
            .unwrap_or_else(|| Tensor::zeros([batch, seq], &device));
        let pad = self.padding_idx;
        let rpad = self.roberta_padding_idx;
        let words = self
            .word_embeddings
            .forward_with(ids, |table, ids| lookup(table, ids, pad));
        let (words, types) = match prompt.and_then(EncoderPrompt::tokens) {
            Some(t) => {
                let [v, hidden] = t.dims();
                let t = t.clone().unsqueeze_dim::<3>(0).expand([batch, v, hidden]);
                // peft puts zeros before the caller's token type ids.
                let types = Tensor::cat(vec![Tensor::zeros([batch, v], &device), types], 1);
                (Tensor::cat(vec![t, words], 1), types)
            }
            None => (words, types),
        };
        let x = words
            + self
                .position_embeddings
                .forward_with(positions, |table, ids| lookup(table, ids, rpad))
            + self.token_type_embeddings.forward(types);
        apply_dropout(
            &self.dropout,
            layer_norm(&self.layer_norm, self.layer_norm_eps, x, None),
        )
    }
}

impl<B: Backend> VisitParams<B> for BertEmbeddings<B> {
    fn visit(mut self, p: &str, v: &mut dyn ParamVisitor<B>) -> Result<Self> {
        self.word_embeddings = self.word_embeddings.visit(&join(p, "word_embeddings"), v)?;
        self.position_embeddings = self
            .position_embeddings
            .visit(&join(p, "position_embeddings"), v)?;
        self.token_type_embeddings = self
            .token_type_embeddings
            .visit(&join(p, "token_type_embeddings"), v)?;
        self.layer_norm = self.layer_norm.visit(&join(p, "LayerNorm"), v)?;
        Ok(self)
    }
}

/// `attention.self`: the query / key / value projections and scaled dot-product attention.
#[derive(Module, Debug)]
pub struct BertSelfAttention<B: Backend> {
    /// `query`.
    pub query: Projection<B>,
    /// `key`.
    pub key: Projection<B>,
    /// `value`.
    pub value: Projection<B>,
    /// Dropout on the attention probabilities.
    pub dropout: Dropout,
    /// Number of heads.
    pub num_heads: usize,
}

/// `attention.output` and `output`: projection, dropout, residual, LayerNorm.
#[derive(Module, Debug)]
pub struct BertOutput<B: Backend> {
    /// `dense`.
    pub dense: Projection<B>,
    /// `LayerNorm`.
    pub layer_norm: LayerNorm<B>,
    /// `layer_norm_eps` (burn's `LayerNorm` keeps its own private).
    #[module(skip)]
    pub layer_norm_eps: f64,
    /// Dropout before the residual (`hidden_dropout_prob`).
    pub dropout: Dropout,
}

/// `encoder.layer.N`.
#[derive(Module, Debug)]
pub struct BertLayer<B: Backend> {
    /// `attention.self`.
    pub attention_self: BertSelfAttention<B>,
    /// `attention.output`.
    pub attention_output: BertOutput<B>,
    /// `intermediate.dense`.
    pub intermediate: Projection<B>,
    /// `output`.
    pub output: BertOutput<B>,
    /// `hidden_act`.
    #[module(skip)]
    pub activation: Activation,
    /// The tensor-parallel group this layer's attention heads and intermediate units are
    /// split over (see [`BertModel::tensor_parallel`]); `None`: the whole layer.
    #[module(skip)]
    pub tensor_parallel: Option<TensorParallel>,
}

/// The padding mask of a batch, prepared once for every layer.
#[derive(Debug, Clone)]
struct AttentionMask<B: Backend> {
    /// `[batch, 1, 1, seq_k]`, true where a key is padding.
    padding: Tensor<B, 4, Bool>,
}

/// An active prompt-learning adapter, as an encoder takes it.
pub(crate) enum EncoderPrompt<B: Backend> {
    /// Virtual token embeddings `[v, hidden]` before the input's.
    Tokens(Tensor<B, 2>),
    /// Per layer a key and value prefix `[batch, heads, v, head_dim]`.
    Prefix(Vec<(Tensor<B, 4>, Tensor<B, 4>)>),
}

impl<B: Backend> EncoderPrompt<B> {
    fn tokens(&self) -> Option<&Tensor<B, 2>> {
        match self {
            Self::Tokens(t) => Some(t),
            Self::Prefix(_) => None,
        }
    }

    fn tokens_len(&self) -> usize {
        self.tokens().map_or(0, |t| t.dims()[0])
    }

    fn prefix_len(&self) -> usize {
        match self {
            Self::Prefix(layers) => layers.first().map_or(0, |(k, _)| k.dims()[2]),
            Self::Tokens(_) => 0,
        }
    }
}

impl<B: Backend> BertOutput<B> {
    fn new(d_in: usize, c: &BertConfig, device: &B::Device) -> Self {
        Self {
            dense: init_linear(d_in, c.hidden_size, c.initializer_range, device),
            layer_norm: init_layer_norm(c.hidden_size, c.layer_norm_eps, device),
            layer_norm_eps: c.layer_norm_eps,
            dropout: DropoutConfig::new(c.hidden_dropout_prob).init(),
        }
    }

    /// The block's output from `x`; split tensor parallel, `x` is this rank's slice and the
    /// partial products are summed over the group (Megatron's `g`) before the bias-free rest.
    fn forward(
        &self,
        x: Tensor<B, 3>,
        residual: Tensor<B, 3>,
        tp: Option<&TensorParallel>,
    ) -> Result<Tensor<B, 3>> {
        let x = self.dense.forward(x);
        let x = match tp {
            Some(tp) => tp.reduce_from_region(x)?,
            None => x,
        };
        let x = apply_dropout(&self.dropout, x);
        Ok(layer_norm(
            &self.layer_norm,
            self.layer_norm_eps,
            x,
            Some(residual),
        ))
    }
}

impl<B: Backend> VisitParams<B> for BertOutput<B> {
    fn visit(mut self, p: &str, v: &mut dyn ParamVisitor<B>) -> Result<Self> {
        self.dense = self.dense.visit(&join(p, "dense"), v)?;
        self.layer_norm = self.layer_norm.visit(&join(p, "LayerNorm"), v)?;
        Ok(self)
    }
}

impl<B: Backend> BertLayer<B> {
    fn new(c: &BertConfig, device: &B::Device) -> Self {
        let (h, std) = (c.hidden_size, c.initializer_range);
        Self {
            attention_self: BertSelfAttention {
                query: init_linear(h, h, std, device),
                key: init_linear(h, h, std, device),
                value: init_linear(h, h, std, device),
                dropout: DropoutConfig::new(c.attention_probs_dropout_prob).init(),
                num_heads: c.num_attention_heads,
            },
            attention_output: BertOutput::new(h, c, device),
            intermediate: init_linear(h, c.intermediate_size, std, device),
            output: BertOutput::new(c.intermediate_size, c, device),
            activation: Activation::from_hf(&c.hidden_act),
            tensor_parallel: None,
        }
    }

    /// One layer; returns the attention probabilities too when `want_probs`.
    fn forward(
        &self,
        x: Tensor<B, 3>,
        mask: Option<&AttentionMask<B>>,
        prefix: Option<&(Tensor<B, 4>, Tensor<B, 4>)>,
        want_probs: bool,
    ) -> Result<(Tensor<B, 3>, Option<Tensor<B, 4>>)> {
        let a = &self.attention_self;
        let [batch, seq, _] = x.dims();
        // Split tensor parallel, the input's gradient is summed over the ranks (`f`), and
        // the projections give this rank's heads only.
        let x_heads = match &self.tensor_parallel {
            Some(tp) => tp.copy_to_region(x.clone())?,
            None => x.clone(),
        };
        let heads = a.num_heads;
        // Prefix tuning: learned keys and values before the input's, as a cache would hold.
        let seq_k = seq + prefix.map_or(0, |(k, _)| k.dims()[2]);
        let with_prefix = |t: Tensor<B, 4>, i: usize| match prefix {
            Some(p) => Tensor::cat(vec![if i == 0 { p.0.clone() } else { p.1.clone() }, t], 2),
            None => t,
        };
        let (q, k, v) = (
            a.query.forward(x_heads.clone()),
            a.key.forward(x_heads.clone()),
            a.value.forward(x_heads),
        );
        // The width of this rank's heads (the hidden size, unsplit).
        let width = q.dims()[2];
        let d = width / heads;
        // Heads as contiguous `[batch, heads, seq, d]`: the fused attention runs twice as fast
        // on contiguous inputs as on the permuted view, copy included (reshaping a permuted
        // tensor copies it).
        let split = |t: Tensor<B, 3>| {
            t.reshape([batch, seq, heads, d])
                .swap_dims(1, 2)
                .reshape([batch * heads, seq, d])
                .reshape([batch, heads, seq, d])
        };
        let dropout_active = a.dropout.prob > 0.0 && B::ad_enabled(&x.device());
        // In training, the fused kernel takes the dropout on the weights as a mask.
        // (Drawn only where the kernel runs: with `want_probs`, burn's path below draws its own.)
        let dropout = (dropout_active && !want_probs)
            .then(|| {
                ember_kernels::dropout_mask::<B, 4>(
                    [batch, heads, seq, seq_k],
                    a.dropout.prob,
                    &x.device(),
                )
            })
            .flatten();
        if !want_probs && dropout_active == dropout.is_some() {
            // The fused CPU kernel reads the heads in place and writes them back as rows.
            let heads_view =
                |t: &Tensor<B, 3>| t.clone().reshape([batch, seq, heads, d]).swap_dims(1, 2);
            let padding = mask.map(|m| m.padding.clone().reshape([batch, seq_k]));
            let kernel_mask = ember_kernels::AttentionMask {
                key_padding: padding.as_ref(),
                causal: false,
                dropout: dropout.as_ref(),
            };
            if let Some(context) = ember_kernels::attention(
                &heads_view(&q),
                &with_prefix(heads_view(&k), 0),
                &with_prefix(heads_view(&v), 1),
                kernel_mask,
            ) {
                let context = context.swap_dims(1, 2).reshape([batch, seq, width]);
                return self.finish(context, x, None);
            }
        }
        let (q, k, v) = (split(q), with_prefix(split(k), 0), with_prefix(split(v), 1));
        let (context, probs) = if want_probs || dropout_active {
            let mut scores = q
                .matmul(k.swap_dims(2, 3))
                .mul_scalar(1.0 / (d as f64).sqrt());
            if let Some(m) = mask {
                // HF adds the dtype's minimum where a key is padding.
                scores = scores.mask_fill(
                    m.padding.clone().expand([batch, heads, seq, seq_k]),
                    f32::MIN,
                );
            }
            let probs = activation::softmax(scores, 3);
            let context = apply_dropout(&a.dropout, probs.clone()).matmul(v);
            (context, want_probs.then_some(probs))
        } else {
            let mask = mask.map(|m| m.padding.clone().expand([batch, heads, seq, seq_k]));
            (
                attention(q, k, v, mask, None, AttentionModuleOptions::default()),
                None,
            )
        };
        let context = context.swap_dims(1, 2).reshape([batch, seq, width]);
        self.finish(context, x, probs)
    }

    /// The rest of the layer after attention: output projection, residual and LayerNorm, then
    /// the feed-forward block.
    fn finish(
        &self,
        context: Tensor<B, 3>,
        x: Tensor<B, 3>,
        probs: Option<Tensor<B, 4>>,
    ) -> Result<(Tensor<B, 3>, Option<Tensor<B, 4>>)> {
        let tp = self.tensor_parallel.as_ref();
        let attended = self.attention_output.forward(context, x, tp)?;
        let inner = match tp {
            Some(tp) => tp.copy_to_region(attended.clone())?,
            None => attended.clone(),
        };
        let inner = self.activation.forward(self.intermediate.forward(inner));
        Ok((self.output.forward(inner, attended, tp)?, probs))
    }
}

impl<B: Backend> VisitParams<B> for BertLayer<B> {
    fn visit(mut self, p: &str, v: &mut dyn ParamVisitor<B>) -> Result<Self> {
        let s = join(p, "attention.self");
        self.attention_self.query = self.attention_self.query.visit(&join(&s, "query"), v)?;
        self.attention_self.key = self.attention_self.key.visit(&join(&s, "key"), v)?;
        self.attention_self.value = self.attention_self.value.visit(&join(&s, "value"), v)?;
        self.attention_output = self
            .attention_output
            .visit(&join(p, "attention.output"), v)?;
        self.intermediate = self.intermediate.visit(&join(p, "intermediate.dense"), v)?;
        self.output = self.output.visit(&join(p, "output"), v)?;
        Ok(self)
    }
}

/// `BertModel` / `RobertaModel`: embeddings, encoder and the optional pooler.
#[derive(Module, Debug)]
pub struct BertModel<B: Backend> {
    /// `embeddings`.
    pub embeddings: BertEmbeddings<B>,
    /// `encoder.layer`.
    pub layers: Vec<BertLayer<B>>,
    /// `pooler.dense`: tanh of the first token's projection. Absent in the token
    /// classification, masked-LM and question-answering models, as in HF.
    pub pooler: Option<Projection<B>>,
    /// The configuration the model was built from (written back by `save_pretrained`).
    #[module(skip)]
    pub config: BertConfig,
}

/// `RobertaModel`: [`BertModel`] built from a `roberta` config.
pub type RobertaModel<B> = BertModel<B>;

/// What the encoder returns.
#[derive(Debug, Clone)]
pub struct BaseModelOutput<B: Backend> {
    /// `last_hidden_state`, `[batch, seq, hidden]`.
    pub last_hidden_state: Tensor<B, 3>,
    /// `pooler_output`, `[batch, hidden]`, when the model has a pooler.
    pub pooler_output: Option<Tensor<B, 2>>,
    /// The embeddings' output and every layer's, when asked for (`num_hidden_layers + 1`).
    pub hidden_states: Option<Vec<Tensor<B, 3>>>,
    /// Every layer's attention probabilities `[batch, heads, seq, seq]`, when asked for.
    pub attentions: Option<Vec<Tensor<B, 4>>>,
}

/// Which extra outputs a forward pass returns (HF's `output_attentions` /
/// `output_hidden_states`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutputOptions {
    /// Return every layer's attention probabilities.
    pub attentions: bool,
    /// Return every layer's hidden states.
    pub hidden_states: bool,
}

impl OutputOptions {
    /// The options a config asks for.
    pub fn from_config(c: &BertConfig) -> Self {
        Self {
            attentions: c.output_attentions,
            hidden_states: c.output_hidden_states,
        }
    }
}

impl<B: Backend> BertModel<B> {
    /// A model with fresh weights, initialised as HF does (normal with `initializer_range`,
    /// zero biases, unit LayerNorm).
    pub fn new(config: &BertConfig, add_pooling_layer: bool, device: &B::Device) -> Self {
        let h = config.hidden_size;
        Self {
            embeddings: BertEmbeddings::new(config, device),
            layers: (0..config.num_hidden_layers)
                .map(|_| BertLayer::new(config, device))
                .collect(),
            pooler: add_pooling_layer.then(|| init_linear(h, h, config.initializer_range, device)),
            config: config.clone(),
        }
    }

    /// Checks the inputs against the model: shapes agree, ids are inside the vocabulary and the
    /// sequence fits the position embeddings.
    pub fn check_input(&self, input: &EncoderInput<B>) -> Result<()> {
        let dims = input.input_ids.dims();
        let [batch, seq] = dims;
        if batch == 0 || seq == 0 {
            return Err(ModelError::Input(format!(
                "input_ids has shape {dims:?}; a batch needs at least one token"
            )));
        }
        for (name, t) in [
            ("attention_mask", &input.attention_mask),
            ("token_type_ids", &input.token_type_ids),
            ("position_ids", &input.position_ids),
        ] {
            if let Some(t) = t {
                if t.dims() != dims {
                    return Err(ModelError::Input(format!(
                        "{name} has shape {:?}, input_ids {dims:?}",
                        t.dims()
                    )));
                }
            }
        }
        let positions = input
            .position_ids
            .clone()
            .unwrap_or_else(|| self.embeddings.default_position_ids(&input.input_ids));
        let last_position: i64 = positions.max().into_scalar().elem();
        if last_position >= self.config.max_position_embeddings as i64 {
            return Err(ModelError::Input(format!(
                "a sequence of {seq} tokens needs position {last_position}, beyond max_position_embeddings {}",
                self.config.max_position_embeddings
            )));
        }
        let ids = input.input_ids.clone();
        let (min_id, max_id): (i64, i64) = (
            ids.clone().min().into_scalar().elem(),
            ids.max().into_scalar().elem(),
        );
        if min_id < 0 || max_id >= self.config.vocab_size as i64 {
            let bad = if min_id < 0 { min_id } else { max_id };
            return Err(ModelError::Input(format!(
                "input id {bad} is outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        if let Some(types) = &input.token_type_ids {
            let n = self
                .embeddings
                .token_type_embeddings
                .base
                .weight
                .shape()
                .dims::<2>()[0] as i64;
            let (lo, hi): (i64, i64) = (
                types.clone().min().into_scalar().elem(),
                types.clone().max().into_scalar().elem(),
            );
            if lo < 0 || hi >= n {
                return Err(ModelError::Input(format!(
                    "token_type_id {} is outside type_vocab_size {n}",
                    if lo < 0 { lo } else { hi }
                )));
            }
        }
        Ok(())
    }

    /// The forward pass. Dropout is active only on an autodiff backend (training).
    pub fn forward(
        &self,
        input: EncoderInput<B>,
        options: OutputOptions,
    ) -> Result<BaseModelOutput<B>> {
        if self.is_tensor_parallel() {
            // Not on a pool worker: ranks on threads of one process wait for each other in
            // the collectives, and a worker blocked there would starve the others' loops.
            return self.forward_inner(input, options);
        }
        ember_kernels::on_worker::<B, _>(|| self.forward_inner(input, options))
    }

    /// This rank's slice of the encoder for tensor parallel over `tp` (Megatron's split):
    /// every layer keeps `num_attention_heads / size` heads (`query`, `key`, `value` by
    /// output features, `attention.output.dense` by input features) and
    /// `intermediate_size / size` units (`intermediate.dense` by output features,
    /// `output.dense` by input features). Embeddings, LayerNorms and the pooler stay whole on
    /// every rank. Every rank passes the same model; the forward and backward passes then
    /// equal the whole model's. For a task model, split its encoder:
    /// `model.bert = model.bert.tensor_parallel(tp)?`.
    ///
    /// The group must divide the head count and the intermediate size. Adapters (LoRA,
    /// prompts) and quantized layers are not split. Dropout after the summed outputs is drawn
    /// by each rank: train with `hidden_dropout_prob = 0`, or give the group's ranks one seed.
    pub fn tensor_parallel(mut self, tp: TensorParallel) -> Result<Self> {
        let c = &self.config;
        let heads = heads_per_rank(c.num_attention_heads, &tp, "num_attention_heads")?;
        heads_per_rank(c.intermediate_size, &tp, "intermediate_size")?;
        let layers = std::mem::take(&mut self.layers);
        for (i, mut layer) in layers.into_iter().enumerate() {
            if layer.tensor_parallel.is_some() {
                return Err(ModelError::Input(format!(
                    "encoder.layer.{i} is already split tensor parallel"
                )));
            }
            let key = |name: &str| format!("encoder.layer.{i}.{name}");
            let a = layer.attention_self;
            layer.attention_self = BertSelfAttention {
                query: slice_projection(a.query, &tp, Split::Column, &key("attention.self.query"))?,
                key: slice_projection(a.key, &tp, Split::Column, &key("attention.self.key"))?,
                value: slice_projection(a.value, &tp, Split::Column, &key("attention.self.value"))?,
                dropout: a.dropout,
                num_heads: heads,
            };
            let dense = layer.attention_output.dense;
            layer.attention_output.dense =
                slice_projection(dense, &tp, Split::Row, &key("attention.output.dense"))?;
            let inter = layer.intermediate;
            layer.intermediate =
                slice_projection(inter, &tp, Split::Column, &key("intermediate.dense"))?;
            let dense = layer.output.dense;
            layer.output.dense = slice_projection(dense, &tp, Split::Row, &key("output.dense"))?;
            layer.tensor_parallel = Some(tp.clone());
            self.layers.push(layer);
        }
        Ok(self)
    }

    /// Whether the encoder is a tensor-parallel slice ([`Self::tensor_parallel`]).
    pub fn is_tensor_parallel(&self) -> bool {
        self.layers.iter().any(|l| l.tensor_parallel.is_some())
    }

    /// The whole encoder, gathered from every rank's slice (every rank of the group calls it
    /// and gets the whole model: save it from one rank). A whole encoder is returned as it is.
    pub fn gather_tensor_parallel(mut self) -> Result<Self> {
        let heads = self.config.num_attention_heads;
        let layers = std::mem::take(&mut self.layers);
        for mut layer in layers {
            if let Some(tp) = layer.tensor_parallel.take() {
                let a = layer.attention_self;
                layer.attention_self = BertSelfAttention {
                    query: gather_projection(a.query, &tp, Split::Column, true)?,
                    key: gather_projection(a.key, &tp, Split::Column, true)?,
                    value: gather_projection(a.value, &tp, Split::Column, true)?,
                    dropout: a.dropout,
                    num_heads: heads,
                };
                let o = layer.attention_output.dense;
                layer.attention_output.dense = gather_projection(o, &tp, Split::Row, true)?;
                let inter = layer.intermediate;
                layer.intermediate = gather_projection(inter, &tp, Split::Column, true)?;
                let o = layer.output.dense;
                layer.output.dense = gather_projection(o, &tp, Split::Row, true)?;
            }
            self.layers.push(layer);
        }
        Ok(self)
    }

    /// [`Self::forward`], on the calling thread.
    fn forward_inner(
        &self,
        input: EncoderInput<B>,
        options: OutputOptions,
    ) -> Result<BaseModelOutput<B>> {
        self.check_input(&input)?;
        let prompt = self.prompt(input.input_ids.dims()[0])?;
        let [batch, seq] = input.input_ids.dims();
        let virtual_len = prompt
            .as_ref()
            .map_or(0, |p| p.tokens_len() + p.prefix_len());
        if virtual_len > 0 && seq + virtual_len > self.config.max_position_embeddings {
            return Err(ModelError::Input(format!(
                "{seq} tokens after {virtual_len} virtual ones exceed max_position_embeddings {}",
                self.config.max_position_embeddings
            )));
        }
        // The virtual positions are never padding (peft puts ones before the mask).
        let attention_mask = input.attention_mask.clone().map(|m| match virtual_len {
            0 => m,
            v => Tensor::cat(vec![Tensor::ones([batch, v], &m.device()), m], 1),
        });
        // A batch without padding needs no mask: masked attention costs about twice as much.
        let mask = attention_mask
            .as_ref()
            .map(|m| m.clone().equal_elem(0))
            .filter(|pad| pad.clone().int().sum().into_scalar().elem::<i64>() > 0)
            .map(|pad| AttentionMask {
                padding: pad.unsqueeze_dim::<3>(1).unsqueeze_dim::<4>(1),
            });
        let mut x = self.embeddings.forward(&input, prompt.as_ref());
        let prefix = match &prompt {
            Some(EncoderPrompt::Prefix(layers)) => Some(layers),
            _ => None,
        };
        let mut hidden_states = options.hidden_states.then(|| vec![x.clone()]);
        let mut attentions = options.attentions.then(Vec::new);
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_prefix = prefix.map(|p| &p[i]);
            let (out, probs) = layer.forward(x, mask.as_ref(), layer_prefix, options.attentions)?;
            x = out;
            if let Some(states) = hidden_states.as_mut() {
                states.push(x.clone());
            }
            if let (Some(all), Some(p)) = (attentions.as_mut(), probs) {
                all.push(p);
            }
        }
        let pooler_output = self
            .pooler
            .as_ref()
            .map(|p| p.forward(first_token(x.clone())).tanh());
        Ok(BaseModelOutput {
            last_hidden_state: x,
            pooler_output,
            hidden_states,
            attentions,
        })
    }
}

impl<B: Backend> BertModel<B> {
    /// The active prompt-learning adapter of the word embeddings, checked against the model
    /// (a prefix's keys and values expanded to `batch` rows).
    fn prompt(&self, batch: usize) -> Result<Option<EncoderPrompt<B>>> {
        let c = &self.config;
        Ok(match self.embeddings.word_embeddings.virtual_prompt() {
            None => None,
            Some(VirtualPrompt::Tokens(t)) => {
                if t.dims()[1] != c.hidden_size {
                    return Err(ModelError::Input(format!(
                        "the prompt's virtual tokens have width {}, the model's hidden size is {}",
                        t.dims()[1],
                        c.hidden_size
                    )));
                }
                Some(EncoderPrompt::Tokens(t))
            }
            Some(VirtualPrompt::Prefix(layers)) => {
                let head_dim = c.hidden_size / c.num_attention_heads;
                if layers.len() != c.num_hidden_layers {
                    return Err(ModelError::Input(format!(
                        "the prefix has {} layers, the model {}",
                        layers.len(),
                        c.num_hidden_layers
                    )));
                }
                let mut out = Vec::with_capacity(layers.len());
                for (k, v) in layers {
                    let [_, heads, n, d] = k.dims();
                    if [heads, d] != [c.num_attention_heads, head_dim] {
                        return Err(ModelError::Input(format!(
                            "the prefix has {heads} heads of width {d}, the model {} of width {head_dim}",
                            c.num_attention_heads
                        )));
                    }
                    let dims = [batch, heads, n, d];
                    out.push((k.expand(dims), v.expand(dims)));
                }
                Some(EncoderPrompt::Prefix(out))
            }
        })
    }

    /// Virtual positions an active prompt-tuning or P-tuning adapter puts before the input
    /// (their outputs come first in `last_hidden_state`); 0 without one or for prefix tuning.
    pub fn virtual_tokens(&self) -> usize {
        self.embeddings.word_embeddings.virtual_tokens()
    }
}

/// The first token's hidden state of each sequence: `[batch, seq, h]` → `[batch, h]`.
pub(crate) fn first_token<B: Backend>(x: Tensor<B, 3>) -> Tensor<B, 2> {
    x.narrow(1, 0, 1).squeeze_dim::<2>(1)
}

impl<B: Backend> VisitParams<B> for BertModel<B> {
    fn visit(mut self, p: &str, v: &mut dyn ParamVisitor<B>) -> Result<Self> {
        self.embeddings = self.embeddings.visit(&join(p, "embeddings"), v)?;
        self.layers = std::mem::take(&mut self.layers)
            .into_iter()
            .enumerate()
            .map(|(i, layer)| layer.visit(&join(p, &format!("encoder.layer.{i}")), v))
            .collect::<Result<_>>()?;
        if let Some(pooler) = self.pooler.take() {
            self.pooler = Some(pooler.visit(&join(p, "pooler.dense"), v)?);
        }
        Ok(self)
    }
}
