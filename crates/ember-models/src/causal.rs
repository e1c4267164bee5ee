//! What every causal language model shares: its input (ids or embeddings, mask, positions,
//! labels, cache), the key / value cache, the output, the causal attention mask and the
//! shifted-label loss.
//!
//! The cache holds, per layer, keys and values shaped `[batch, kv_heads, seq, head_dim]`, the
//! layout of HF's `DynamicCache`. The same type carries a prefix of learned key / value tensors
//! (prefix tuning): a cache the model did not compute itself is attended to the same way.

use crate::error::{ModelError, Result};
use crate::loss;
use burn::tensor::{backend::Backend, Bool, ElementConversion, Int, Tensor};
use ember_peft::{Projection, TokenEmbedding, VirtualPrompt};

/// The inputs of a causal LM's forward pass, as HF's `forward(input_ids=…, …)` takes them.
#[derive(Debug, Clone)]
pub struct CausalLmInput<B: Backend> {
    /// Token ids `[batch, seq]` (or give `inputs_embeds`).
    pub input_ids: Option<Tensor<B, 2, Int>>,
    /// Token embeddings `[batch, seq, hidden]`, used instead of `input_ids` (prompt tuning).
    pub inputs_embeds: Option<Tensor<B, 3>>,
    /// 1 for tokens to attend to, 0 for padding, `[batch, past + seq]`: it covers the cached
    /// positions too, as in HF.
    pub attention_mask: Option<Tensor<B, 2, Int>>,
    /// Positions `[batch, seq]`; by default `past .. past + seq` (HF's `cache_position`).
    pub position_ids: Option<Tensor<B, 2, Int>>,
    /// Labels `[batch, seq]`: the loss predicts `labels[t + 1]` from position `t`, skipping
    /// `-100` (HF shifts them inside the model).
    pub labels: Option<Tensor<B, 2, Int>>,
    /// Keys and values of earlier positions (or a learned prefix).
    pub past_key_values: Option<KvCache<B>>,
    /// HF's `logits_to_keep`: project only the last this many positions to logits (0: all).
    /// Generation keeps 1. Ignored when labels are given, since the loss needs every position.
    pub logits_to_keep: usize,
}

impl<B: Backend> CausalLmInput<B> {
    /// Input from token ids.
    pub fn new(input_ids: Tensor<B, 2, Int>) -> Self {
        Self {
            input_ids: Some(input_ids),
            inputs_embeds: None,
            attention_mask: None,
            position_ids: None,
            labels: None,
            past_key_values: None,
            logits_to_keep: 0,
        }
    }

    /// Input from embeddings instead of ids.
    pub fn from_embeds(inputs_embeds: Tensor<B, 3>) -> Self {
        Self {
            input_ids: None,
            inputs_embeds: Some(inputs_embeds),
            ..Self::new(Tensor::empty([0, 0], &Default::default()))
        }
    }

    /// With an attention mask `[batch, past + seq]`.
    pub fn with_attention_mask(mut self, mask: Tensor<B, 2, Int>) -> Self {
        self.attention_mask = Some(mask);
        self
    }

    /// With explicit position ids.
    pub fn with_position_ids(mut self, ids: Tensor<B, 2, Int>) -> Self {
        self.position_ids = Some(ids);
        self
    }

    /// With labels (usually the input ids, padding set to `-100`).
    pub fn with_labels(mut self, labels: Tensor<B, 2, Int>) -> Self {
        self.labels = Some(labels);
        self
    }

    /// With a cache of earlier keys and values.
    pub fn with_past_key_values(mut self, cache: KvCache<B>) -> Self {
        self.past_key_values = Some(cache);
        self
    }

    /// Logits for the last `n` positions only (0: all), as HF's `logits_to_keep`.
    pub fn with_logits_to_keep(mut self, n: usize) -> Self {
        self.logits_to_keep = n;
        self
    }

    /// `[batch, seq]` of the new tokens.
    pub fn dims(&self) -> Result<[usize; 2]> {
        match (&self.input_ids, &self.inputs_embeds) {
            (Some(_), Some(_)) => Err(ModelError::Input(
                "give either input_ids or inputs_embeds, not both".into(),
            )),
            (Some(ids), None) => Ok(ids.dims()),
            (None, Some(e)) => {
                let [b, s, _] = e.dims();
                Ok([b, s])
            }
            (None, None) => Err(ModelError::Input("give input_ids or inputs_embeds".into())),
        }
    }
}

/// The sizes a causal LM checks its input against.
pub(crate) struct ModelShape {
    /// Decoder layers (entries of the cache).
    pub layers: usize,
    /// Key / value heads.
    pub kv_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Width of the embeddings.
    pub hidden: usize,
}

/// A checked input with its token embeddings: the shared start of every causal LM's forward.
pub(crate) struct ForwardStart<B: Backend> {
    /// Rows.
    pub batch: usize,
    /// New positions.
    pub seq: usize,
    /// Cached positions.
    pub past_len: usize,
    /// The cache, checked against the model.
    pub past: Option<KvCache<B>>,
    /// Token embeddings `[batch, seq, hidden]`.
    pub x: Tensor<B, 3>,
    /// The attention mask, checked to cover `past_len + seq` positions.
    pub attention_mask: Option<Tensor<B, 2, Int>>,
    /// Position ids, checked to be `[batch, seq]`.
    pub position_ids: Option<Tensor<B, 2, Int>>,
    /// Labels.
    pub labels: Option<Tensor<B, 2, Int>>,
    /// Positions to project to logits, counted from the end (0: all).
    pub logits_to_keep: usize,
}

impl<B: Backend> CausalLmInput<B> {
    /// Checks the input against the model and embeds the ids (or takes `inputs_embeds`).
    pub(crate) fn start(
        self,
        shape: &ModelShape,
        embeddings: &TokenEmbedding<B>,
    ) -> Result<ForwardStart<B>> {
        let [batch, seq] = self.dims()?;
        let mut past = self.past_key_values;
        let mut attention_mask = self.attention_mask;
        let mut position_ids = self.position_ids;
        let mut labels = self.labels;
        let mut prompt_tokens = None;
        if let Some(encoder) = embeddings.active_prompt() {
            // As peft's PeftModelForCausalLM: the caller's mask and labels cover its own tokens
            // only; position ids are ignored (positions count the virtual tokens); the virtual
            // tokens or the prefix enter once, with the first call, and stay in the cache (the
            // encoder runs only then, not at every decoding step).
            let v = encoder.num_virtual_tokens();
            let device = embeddings.base.weight.device();
            attention_mask =
                attention_mask.map(|m| Tensor::cat(vec![Tensor::ones([batch, v], &device), m], 1));
            position_ids = None;
            if past.is_none() {
                match encoder.virtual_prompt() {
                    VirtualPrompt::Tokens(t) => {
                        labels = labels.map(|l| {
                            Tensor::cat(
                                vec![Tensor::full([batch, v], loss::IGNORE_INDEX, &device), l],
                                1,
                            )
                        });
                        prompt_tokens = Some(t);
                    }
                    VirtualPrompt::Prefix(layers) => {
                        past = Some(prefix_cache(layers, batch, shape)?);
                    }
                }
            }
        }
        let past_len = past.as_ref().map_or(0, KvCache::seq_len);
        let seq = seq + prompt_tokens.as_ref().map_or(0, |t| t.dims()[0]);
        if let Some(cache) = &past {
            cache.check(shape.layers, shape.kv_heads, shape.head_dim, batch)?;
        }
        if let Some(m) = &attention_mask {
            if m.dims() != [batch, past_len + seq] {
                return Err(ModelError::Input(format!(
                    "attention_mask {:?} must cover the {past_len} cached and {seq} new positions of {batch} rows",
                    m.dims()
                )));
            }
        }
        if let Some(p) = &position_ids {
            if p.dims() != [batch, seq] {
                return Err(ModelError::Input(format!(
                    "position_ids {:?} do not match the input's [{batch}, {seq}]",
                    p.dims()
                )));
            }
        }
        let x = match (self.input_ids, self.inputs_embeds) {
            (Some(ids), _) => {
                check_ids(&ids, shape.vocab)?;
                embeddings.forward(ids)
            }
            (None, Some(e)) => {
                if e.dims()[2] != shape.hidden {
                    return Err(ModelError::Input(format!(
                        "inputs_embeds have width {}, the model's hidden size is {}",
                        e.dims()[2],
                        shape.hidden
                    )));
                }
                e
            }
            (None, None) => unreachable!("checked by dims()"),
        };
        let x = match prompt_tokens {
            Some(t) => {
                let [v, hidden] = t.dims();
                if hidden != shape.hidden {
                    return Err(ModelError::Input(format!(
                        "the prompt's virtual tokens have width {hidden}, the model's hidden size is {}",
                        shape.hidden
                    )));
                }
                let t = t.unsqueeze_dim::<3>(0).expand([batch, v, hidden]);
                Tensor::cat(vec![t, x], 1)
            }
            None => x,
        };
        Ok(ForwardStart {
            batch,
            seq,
            past_len,
            past,
            x,
            attention_mask,
            position_ids,
            logits_to_keep: if labels.is_some() {
                0
            } else {
                self.logits_to_keep
            },
            labels,
        })
    }
}

/// A prefix-tuning prefix as the cache of `batch` rows, checked against the model's layers
/// and key / value heads (a prefix made for another model is named, not a shape panic).
pub(crate) fn prefix_cache<B: Backend>(
    layers: Vec<(Tensor<B, 4>, Tensor<B, 4>)>,
    batch: usize,
    shape: &ModelShape,
) -> Result<KvCache<B>> {
    if layers.len() != shape.layers {
        return Err(ModelError::Input(format!(
            "the prefix has {} layers, the model {}",
            layers.len(),
            shape.layers
        )));
    }
    let mut out = Vec::with_capacity(layers.len());
    for (key, value) in layers {
        let [_, heads, v, head_dim] = key.dims();
        if [heads, head_dim] != [shape.kv_heads, shape.head_dim] {
            return Err(ModelError::Input(format!(
                "the prefix has {heads} heads of width {head_dim}, the model's attention {} of width {}",
                shape.kv_heads, shape.head_dim
            )));
        }
        let dims = [batch, heads, v, head_dim];
        out.push(LayerKv::new(key.expand(dims), value.expand(dims)));
    }
    Ok(KvCache { layers: out })
}

/// Rejects ids outside the vocabulary (an embedding lookup would read out of bounds).
pub(crate) fn check_ids<B: Backend>(ids: &Tensor<B, 2, Int>, vocab: usize) -> Result<()> {
    if ids.dims()[1] == 0 {
        return Err(ModelError::Input("input_ids hold no tokens".into()));
    }
    let max = ids.clone().max().into_scalar().elem::<i64>();
    let min = ids.clone().min().into_scalar().elem::<i64>();
    if min < 0 || max >= vocab as i64 {
        return Err(ModelError::Input(format!(
            "token id {} is outside the vocabulary of {vocab}",
            if min < 0 { min } else { max }
        )));
    }
    Ok(())
}

/// The end of every causal LM's forward pass: the logits of the last `keep` positions (see
/// [`project_logits`]), the shifted loss when labels are given, and the new cache.
pub(crate) fn causal_output<B: Backend>(
    x: Tensor<B, 3>,
    keep: usize,
    (head, embedding): (Option<&Projection<B>>, &TokenEmbedding<B>),
    labels: Option<Tensor<B, 2, Int>>,
    layers: Vec<LayerKv<B>>,
) -> CausalLmOutput<B> {
    let logits = project_logits(x, keep, head, embedding);
    let loss = labels.map(|l| shifted_cross_entropy(logits.clone(), l));
    CausalLmOutput {
        logits,
        loss,
        past_key_values: KvCache { layers },
    }
}

/// The logits of the last `keep` positions (all when 0): through `head`, or through the
/// transposed input embedding matrix when the output embeddings are tied.
pub(crate) fn project_logits<B: Backend>(
    x: Tensor<B, 3>,
    keep: usize,
    head: Option<&Projection<B>>,
    embedding: &TokenEmbedding<B>,
) -> Tensor<B, 3> {
    let [batch, seq, _] = x.dims();
    let x = if keep > 0 && keep < seq {
        x.slice([0..batch, seq - keep..seq])
    } else {
        x
    };
    match head {
        Some(head) => head.forward(x),
        None => tied_logits(x, embedding),
    }
}

/// Logits through the transposed input embedding matrix (tied output embeddings).
pub(crate) fn tied_logits<B: Backend>(
    x: Tensor<B, 3>,
    embedding: &TokenEmbedding<B>,
) -> Tensor<B, 3> {
    let [batch, seq, hidden] = x.dims();
    let weight = embedding.base.weight.val();
    let vocab = weight.dims()[0];
    let mut rows = x.reshape([batch * seq, hidden]);
    // The kernel reads the table's rows in place (a half-precision table too); burn's matmul
    // on the transposed view runs about 2x slower than on a contiguous matrix.
    let mut transposed = weight.transpose();
    if ember_kernels::autocast_dtype().is_some() {
        // torch.autocast: the head's matmul in half precision, on rounded operands.
        let round = |t| ember_kernels::autocast_round(ember_kernels::float32(t));
        (rows, transposed) = (round(rows), round(transposed));
    }
    let logits = ember_kernels::linear(&rows, &transposed, None)
        .unwrap_or_else(|| rows.matmul(ember_kernels::float32(transposed)));
    ember_kernels::autocast_round(logits).reshape([batch, seq, vocab])
}

/// One layer's cached keys and values, `[batch, kv_heads, seq, head_dim]` each.
///
/// Decoding appends one position per step. HF's `DynamicCache` concatenates, which copies the
/// whole cache every step; here, once a step has appended, `key` and `value` are views of the
/// first `seq` positions of buffers with room for more, and the next step writes its position
/// into that room in place (the buffers are copied instead while a clone of the cache holds
/// them, so a kept cache never changes). To change an entry's keys or values, build a new one
/// with [`LayerKv::new`]: the next step appends to the buffers, not to a `key` or `value`
/// assigned in their place.
#[derive(Debug, Clone)]
pub struct LayerKv<B: Backend> {
    /// Keys (after the rotary embedding, where the model has one).
    pub key: Tensor<B, 4>,
    /// Values.
    pub value: Tensor<B, 4>,
    /// The key and value buffers, `[batch, kv_heads, capacity, head_dim]`, that `key` and
    /// `value` are the first positions of; `None` until a step appends.
    room: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
}

impl<B: Backend> LayerKv<B> {
    /// A layer's cache of `key` and `value`, `[batch, kv_heads, seq, head_dim]` each.
    pub fn new(key: Tensor<B, 4>, value: Tensor<B, 4>) -> Self {
        Self {
            key,
            value,
            room: None,
        }
    }
}

/// The key / value cache of every layer (HF's `DynamicCache`).
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    /// One entry per layer, in layer order.
    pub layers: Vec<LayerKv<B>>,
}

impl<B: Backend> KvCache<B> {
    /// How many positions are cached (0 for an empty cache).
    pub fn seq_len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.key.dims()[2])
    }

    /// Keeps only the rows `rows` of the batch (drops finished sequences).
    pub fn select_rows(self, rows: Tensor<B, 1, Int>) -> Self {
        Self {
            layers: self
                .layers
                .into_iter()
                .map(|l| {
                    LayerKv::new(
                        l.key.select(0, rows.clone()),
                        l.value.select(0, rows.clone()),
                    )
                })
                .collect(),
        }
    }

    /// Checks the cache against a model's layers and head shape.
    pub(crate) fn check(
        &self,
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        batch: usize,
    ) -> Result<()> {
        if self.layers.len() != layers {
            return Err(ModelError::Input(format!(
                "past_key_values has {} layers, the model {layers}",
                self.layers.len()
            )));
        }
        for (i, l) in self.layers.iter().enumerate() {
            let [b, h, s, d] = l.key.dims();
            if [b, h, d] != [batch, kv_heads, head_dim] || l.value.dims() != [b, h, s, d] {
                return Err(ModelError::Input(format!(
                    "past_key_values layer {i}: keys {:?} and values {:?}, expected [{batch}, {kv_heads}, seq, {head_dim}]",
                    l.key.dims(),
                    l.value.dims()
                )));
            }
        }
        Ok(())
    }
}

/// Appends new keys and values to a layer's cache entry (or starts it), in place where the
/// entry's buffers have room (see [`LayerKv`]).
pub(crate) fn append_kv<B: Backend>(
    past: Option<LayerKv<B>>,
    key: Tensor<B, 4>,
    value: Tensor<B, 4>,
) -> LayerKv<B> {
    let Some(past) = past else {
        return LayerKv::new(key, value);
    };
    let [batch, heads, len, key_dim] = past.key.dims();
    let value_dim = past.value.dims()[3];
    let end = len + key.dims()[2];
    let (key_buffer, value_buffer) = match past.room {
        Some((k, v)) if k.dims()[2] >= end => {
            // The views go first: the buffers are then their only holders (unless the caller
            // kept a clone of the cache) and are written in place.
            drop((past.key, past.value));
            (k, v)
        }
        _ => {
            // Room for half as many positions again, so that reallocation and its copy come
            // O(log n) times over n steps.
            let capacity = (end + end / 2).max(end + 16);
            let buffer = |old: Tensor<B, 4>, dim: usize| {
                let options = (&old.device(), old.dtype());
                let empty = Tensor::empty([batch, heads, capacity, dim], options);
                ember_kernels::assign_along(empty, 2, 0, old)
            };
            (buffer(past.key, key_dim), buffer(past.value, value_dim))
        }
    };
    let key_buffer = ember_kernels::assign_along(key_buffer, 2, len, key);
    let value_buffer = ember_kernels::assign_along(value_buffer, 2, len, value);
    LayerKv {
        key: key_buffer
            .clone()
            .slice([0..batch, 0..heads, 0..end, 0..key_dim]),
        value: value_buffer
            .clone()
            .slice([0..batch, 0..heads, 0..end, 0..value_dim]),
        room: Some((key_buffer, value_buffer)),
    }
}

/// What a causal LM returns.
#[derive(Debug, Clone)]
pub struct CausalLmOutput<B: Backend> {
    /// Next-token logits `[batch, seq, vocab]`.
    pub logits: Tensor<B, 3>,
    /// The mean shifted cross entropy, when labels were given.
    pub loss: Option<Tensor<B, 1>>,
    /// The cache including this call's positions.
    pub past_key_values: KvCache<B>,
}

/// HF's causal LM loss: logits at `t` predict `labels[t + 1]`; `-100` is skipped.
pub fn shifted_cross_entropy<B: Backend>(
    logits: Tensor<B, 3>,
    labels: Tensor<B, 2, Int>,
) -> Tensor<B, 1> {
    let [batch, seq, vocab] = logits.dims();
    if seq < 2 {
        return Tensor::zeros([1], &logits.device());
    }
    // Every position's row against the next label, the last one skipped: the logits are read
    // in place rather than sliced into a copy.
    let device = logits.device();
    let next = Tensor::cat(
        vec![
            labels.slice([0..batch, 1..seq]),
            Tensor::full([batch, 1], loss::IGNORE_INDEX, &device),
        ],
        1,
    );
    loss::cross_entropy(
        logits.reshape([batch * seq, vocab]),
        next.reshape([batch * seq]),
    )
}

/// The boolean mask (true = masked) for attention over `past + seq` keys from `seq` queries,
/// on top of the causal mask the attention applies itself, or `None` when nothing is padded.
///
/// A padded key is masked, except on a query's own position: a padding query would otherwise
/// see no key at all, which some backends turn into NaN (HF "unmasks" those rows for the same
/// reason). Real tokens never attend to padding.
pub(crate) fn padding_mask<B: Backend>(
    attention_mask: Option<&Tensor<B, 2, Int>>,
    seq: usize,
) -> Result<Option<Tensor<B, 4, Bool>>> {
    let Some(mask) = attention_mask else {
        return Ok(None);
    };
    let [batch, total] = mask.dims();
    if total < seq {
        return Err(ModelError::Input(format!(
            "attention_mask covers {total} positions, fewer than the {seq} new tokens"
        )));
    }
    let device = mask.device();
    let pad = mask.clone().equal_elem(0);
    // Cheap on the host-side shapes we use; skipping the mask keeps the fast causal path.
    if pad.clone().int().sum().into_scalar().elem::<i64>() == 0 {
        return Ok(None);
    }
    let past = total - seq;
    let keys = pad
        .reshape([batch, 1, 1, total])
        .expand([batch, 1, seq, total]);
    let rows = Tensor::<B, 1, Int>::arange(past as i64..total as i64, &device)
        .reshape([1, 1, seq, 1])
        .expand([batch, 1, seq, total]);
    let cols = Tensor::<B, 1, Int>::arange(0..total as i64, &device)
        .reshape([1, 1, 1, total])
        .expand([batch, 1, seq, total]);
    let own = rows.equal(cols);
    Ok(Some(keys.bool_and(own.bool_not())))
}

/// Repeats each key / value head `n_rep` times for grouped-query attention:
/// `[b, kv_heads, s, d]` → `[b, kv_heads · n_rep, s, d]` (HF's `repeat_kv`).
pub(crate) fn repeat_kv<B: Backend>(x: Tensor<B, 4>, n_rep: usize) -> Tensor<B, 4> {
    if n_rep == 1 {
        return x;
    }
    let [b, h, s, d] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, h, n_rep, s, d])
        .reshape([b, h * n_rep, s, d])
}

/// Default position ids `past .. past + seq` for every row.
pub(crate) fn default_positions<B: Backend>(
    batch: usize,
    past: usize,
    seq: usize,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    Tensor::<B, 1, Int>::arange(past as i64..(past + seq) as i64, device)
        .reshape([1, seq])
        .expand([batch, seq])
}

/// The interface generation needs from any causal LM.
pub trait CausalLm<B: Backend> {
    /// One forward pass.
    fn forward(&self, input: CausalLmInput<B>) -> Result<CausalLmOutput<B>>;
    /// The vocabulary size (the logits' last dimension).
    fn vocab_size(&self) -> usize;
    /// The longest sequence the model's positions cover, if it has a limit (learned positions).
    fn max_positions(&self) -> Option<usize>;
}
