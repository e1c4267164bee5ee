//! Prompt learning's trained part: a table of virtual token embeddings and, for P-tuning and
//! projected prefix tuning, the small encoder in front of it (peft's `PromptEmbedding`,
//! `PromptEncoder` and `PrefixEncoder`). A [`PromptEncoder`] lives as a named adapter of the
//! model's word embedding table, the one place every model's forward pass starts from, and
//! hands the model a [`VirtualPrompt`]: embeddings to put before the input's, or a key / value
//! prefix for every attention layer.
//!
//! Parameters keep PyTorch's names and layouts (`mlp_head.0.weight` `[out, in]`,
//! `lstm_head.weight_ih_l0_reverse`), so the full encoder state moves to and from Python as is.

use crate::config::{EncoderReparameterization, PeftConfig, PromptDims, PromptTuningInit};
use crate::error::{config_error, PeftError, Result};
use crate::io::AdapterTensors;
use burn::module::{Module, Param};
use burn::tensor::activation::{relu, sigmoid};
use burn::tensor::{backend::Backend, Distribution, Tensor, TensorData};
use std::path::Path;

/// What the encoder's output feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptTarget {
    /// Virtual token embeddings `[num_virtual_tokens, token_dim]` put before the input's
    /// (prompt tuning, P-tuning).
    Tokens,
    /// Keys and values for every layer, `[num_virtual_tokens, num_layers · 2 · token_dim]`
    /// (prefix tuning).
    Prefix {
        /// Attention layers.
        num_layers: usize,
        /// Key / value heads.
        num_heads: usize,
        /// Width of one head.
        head_dim: usize,
    },
}

/// How the table becomes the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncoderKind {
    /// The table is the output (prompt tuning, direct prefix tuning, and every adapter loaded
    /// from peft's file, which stores the encoder's output).
    Table,
    /// P-tuning's three linear layers with ReLU between them (`mlp_head.0/2/4`).
    Mlp,
    /// P-tuning's bidirectional LSTM (`lstm_head`), then `mlp_head.0`, ReLU, `mlp_head.2`.
    Lstm,
    /// Prefix tuning's projection: `transform.0`, tanh, `transform.2`.
    Projection,
}

/// One direction of one LSTM layer, in PyTorch's layout: gates `i, f, g, o` stacked.
#[derive(Module, Debug)]
pub struct LstmDirection<B: Backend> {
    /// `weight_ih_l{k}`, `[4 · hidden, input]`.
    pub weight_ih: Param<Tensor<B, 2>>,
    /// `weight_hh_l{k}`, `[4 · hidden, hidden]`.
    pub weight_hh: Param<Tensor<B, 2>>,
    /// `bias_ih_l{k}`, `[4 · hidden]`.
    pub bias_ih: Param<Tensor<B, 1>>,
    /// `bias_hh_l{k}`, `[4 · hidden]`.
    pub bias_hh: Param<Tensor<B, 1>>,
}

impl<B: Backend> LstmDirection<B> {
    fn new(input: usize, hidden: usize, device: &B::Device) -> Self {
        // PyTorch draws every LSTM parameter from U(-1/sqrt(hidden), 1/sqrt(hidden)).
        let k = 1.0 / (hidden as f64).sqrt();
        let u = Distribution::Uniform(-k, k);
        Self {
            weight_ih: Param::from_tensor(Tensor::random([4 * hidden, input], u, device)),
            weight_hh: Param::from_tensor(Tensor::random([4 * hidden, hidden], u, device)),
            bias_ih: Param::from_tensor(Tensor::random([4 * hidden], u, device)),
            bias_hh: Param::from_tensor(Tensor::random([4 * hidden], u, device)),
        }
    }

    fn hidden(&self) -> usize {
        self.weight_hh.lazy_shape().dims::<2>()[1]
    }

    /// Runs over `x` `[T, input]` in time order (`reverse`: from the end), returning the
    /// hidden state of every step in the input's order, `[T, hidden]`.
    fn run(&self, x: Tensor<B, 2>, reverse: bool) -> Tensor<B, 2> {
        let [steps, _] = x.dims();
        let hidden = self.hidden();
        let device = x.device();
        let bias = (self.bias_ih.val() + self.bias_hh.val()).unsqueeze_dim(0);
        let inputs = x.matmul(self.weight_ih.val().transpose()) + bias;
        let w_hh = self.weight_hh.val().transpose();
        let mut h = Tensor::<B, 2>::zeros([1, hidden], &device);
        let mut c = Tensor::<B, 2>::zeros([1, hidden], &device);
        let mut outputs = vec![None; steps];
        let order: Vec<usize> = if reverse {
            (0..steps).rev().collect()
        } else {
            (0..steps).collect()
        };
        for t in order {
            let gates = inputs.clone().narrow(0, t, 1) + h.matmul(w_hh.clone());
            let gate = |i: usize| gates.clone().slice([0..1, i * hidden..(i + 1) * hidden]);
            let (i, f, g, o) = (
                sigmoid(gate(0)),
                sigmoid(gate(1)),
                gate(2).tanh(),
                sigmoid(gate(3)),
            );
            c = f * c + i * g;
            h = o * c.clone().tanh();
            outputs[t] = Some(h.clone());
        }
        Tensor::cat(
            outputs
                .into_iter()
                .map(|o| o.expect("every step ran"))
                .collect(),
            0,
        )
    }
}

/// One bidirectional LSTM layer.
#[derive(Module, Debug)]
pub struct LstmLayer<B: Backend> {
    /// The forward direction (`_l{k}`).
    pub forward: LstmDirection<B>,
    /// The backward direction (`_l{k}_reverse`).
    pub backward: LstmDirection<B>,
}

/// The trained part of a prompt-learning adapter (peft's `prompt_encoder[adapter_name]`).
#[derive(Module, Debug)]
pub struct PromptEncoder<B: Backend> {
    /// `embedding.weight`, `[num_virtual_tokens, width]`.
    pub embedding: Param<Tensor<B, 2>>,
    /// `mlp_head` (P-tuning) or `transform` (prefix projection) linear layers, in order, each
    /// `(weight [out, in], bias [out])` as PyTorch stores them.
    pub head: Vec<LinearParams<B>>,
    /// P-tuning's bidirectional LSTM layers.
    pub lstm: Vec<LstmLayer<B>>,
    /// How the table becomes the output.
    #[module(skip)]
    pub kind: EncoderKind,
    /// What the output feeds.
    #[module(skip)]
    pub target: PromptTarget,
    /// Dropout between LSTM layers while training.
    #[module(skip)]
    pub dropout: f64,
}

/// A linear layer's `(weight [out, in], bias [out])`, as PyTorch stores them.
pub type LinearParams<B> = (Param<Tensor<B, 2>>, Param<Tensor<B, 1>>);

/// What a model receives from an active prompt-learning adapter.
#[derive(Debug, Clone)]
pub enum VirtualPrompt<B: Backend> {
    /// Embeddings `[num_virtual_tokens, hidden]` to put before the input's.
    Tokens(Tensor<B, 2>),
    /// Per layer the key and value prefix, each `[1, heads, num_virtual_tokens, head_dim]`
    /// (the layout of a key / value cache entry for one row).
    Prefix(Vec<(Tensor<B, 4>, Tensor<B, 4>)>),
}

impl<B: Backend> VirtualPrompt<B> {
    /// The number of virtual positions.
    pub fn len(&self) -> usize {
        match self {
            Self::Tokens(t) => t.dims()[0],
            Self::Prefix(layers) => layers.first().map_or(0, |(k, _)| k.dims()[2]),
        }
    }

    /// Whether there are no virtual positions.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn linear<B: Backend>(d_in: usize, d_out: usize, device: &B::Device) -> LinearParams<B> {
    // nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias.
    let k = crate::adapter::kaiming_bound(d_in);
    let u = Distribution::Uniform(-k, k);
    (
        Param::from_tensor(Tensor::random([d_out, d_in], u, device)),
        Param::from_tensor(Tensor::random([d_out], u, device)),
    )
}

impl<B: Backend> PromptEncoder<B> {
    /// A plain table (prompt tuning, direct prefix tuning, a loaded adapter).
    pub fn table(table: Tensor<B, 2>, target: PromptTarget) -> Self {
        Self {
            embedding: Param::from_tensor(table),
            head: Vec::new(),
            lstm: Vec::new(),
            kind: EncoderKind::Table,
            target,
            dropout: 0.0,
        }
    }

    /// P-tuning's MLP encoder: `token_dim -> hidden -> hidden -> token_dim`.
    pub fn mlp(tokens: usize, token_dim: usize, hidden: usize, device: &B::Device) -> Self {
        let table = Tensor::random([tokens, token_dim], Distribution::Normal(0.0, 1.0), device);
        Self {
            head: vec![
                linear(token_dim, hidden, device),
                linear(hidden, hidden, device),
                linear(hidden, token_dim, device),
            ],
            kind: EncoderKind::Mlp,
            ..Self::table(table, PromptTarget::Tokens)
        }
    }

    /// P-tuning's LSTM encoder: `layers` bidirectional layers of width `hidden`, then
    /// `2·hidden -> 2·hidden -> token_dim`.
    pub fn lstm(
        tokens: usize,
        token_dim: usize,
        hidden: usize,
        layers: usize,
        dropout: f64,
        device: &B::Device,
    ) -> Self {
        let table = Tensor::random([tokens, token_dim], Distribution::Normal(0.0, 1.0), device);
        let lstm = (0..layers)
            .map(|k| {
                let input = if k == 0 { token_dim } else { 2 * hidden };
                LstmLayer {
                    forward: LstmDirection::new(input, hidden, device),
                    backward: LstmDirection::new(input, hidden, device),
                }
            })
            .collect();
        Self {
            head: vec![
                linear(2 * hidden, 2 * hidden, device),
                linear(2 * hidden, token_dim, device),
            ],
            lstm,
            kind: EncoderKind::Lstm,
            dropout,
            ..Self::table(table, PromptTarget::Tokens)
        }
    }

    /// Prefix tuning's projection: a `token_dim`-wide table through
    /// `token_dim -> hidden -> num_layers · 2 · token_dim` with tanh; `zero` starts the last
    /// layer at zero (`init_weights = "zero"`).
    pub fn projection(
        tokens: usize,
        token_dim: usize,
        hidden: usize,
        target: PromptTarget,
        zero: bool,
        device: &B::Device,
    ) -> Self {
        let table = Tensor::random([tokens, token_dim], Distribution::Normal(0.0, 1.0), device);
        let out = target.width();
        let mut last = linear(hidden, out, device);
        if zero {
            last = (
                Param::from_tensor(Tensor::zeros([out, hidden], device)),
                Param::from_tensor(Tensor::zeros([out], device)),
            );
        }
        Self {
            head: vec![linear(token_dim, hidden, device), last],
            kind: EncoderKind::Projection,
            ..Self::table(table, target)
        }
    }

    /// The number of virtual tokens.
    pub fn num_virtual_tokens(&self) -> usize {
        self.embedding.lazy_shape().dims::<2>()[0]
    }

    /// The shape of the encoder's output, `[num_virtual_tokens, width]`.
    pub fn saved_shape(&self) -> Vec<usize> {
        let [v, table_width] = self.embedding.lazy_shape().dims::<2>();
        let width = match self.head.last() {
            Some((w, _)) => w.lazy_shape().dims::<2>()[0],
            None => table_width,
        };
        vec![v, width]
    }

    /// The encoder's output, `[num_virtual_tokens, width]` (what peft saves as
    /// `prompt_embeddings`).
    pub fn output(&self) -> Tensor<B, 2> {
        let table = self.embedding.val();
        let layer = |i: usize, x: Tensor<B, 2>| {
            let (w, b) = &self.head[i];
            x.matmul(w.val().transpose()) + b.val().unsqueeze_dim(0)
        };
        match self.kind {
            EncoderKind::Table => table,
            EncoderKind::Mlp => {
                let x = relu(layer(0, table));
                let x = relu(layer(1, x));
                layer(2, x)
            }
            EncoderKind::Lstm => {
                let mut x = table;
                for (k, l) in self.lstm.iter().enumerate() {
                    if k > 0 && self.dropout > 0.0 {
                        x = burn::nn::DropoutConfig::new(self.dropout).init().forward(x);
                    }
                    let fwd = l.forward.run(x.clone(), false);
                    let bwd = l.backward.run(x, true);
                    x = Tensor::cat(vec![fwd, bwd], 1);
                }
                layer(1, relu(layer(0, x)))
            }
            EncoderKind::Projection => layer(1, layer(0, table).tanh()),
        }
    }

    /// The output as the model takes it.
    pub fn virtual_prompt(&self) -> VirtualPrompt<B> {
        let out = self.output();
        match self.target {
            PromptTarget::Tokens => VirtualPrompt::Tokens(out),
            PromptTarget::Prefix {
                num_layers,
                num_heads,
                head_dim,
            } => {
                let v = out.dims()[0];
                // peft: view [v, layers·2, heads, head_dim], permute to [layers·2, heads, v,
                // head_dim]; entry 2l is layer l's key, 2l + 1 its value.
                let kv = out
                    .reshape([v, num_layers * 2, num_heads, head_dim])
                    .permute([1, 2, 0, 3]);
                let entry = |i: usize| {
                    kv.clone()
                        .narrow(0, i, 1)
                        .reshape([1, num_heads, v, head_dim])
                };
                VirtualPrompt::Prefix(
                    (0..num_layers)
                        .map(|l| (entry(2 * l), entry(2 * l + 1)))
                        .collect(),
                )
            }
        }
    }

    /// Every parameter under its PyTorch name and in PyTorch's layout (the state dict of
    /// peft's `prompt_encoder[adapter_name]`).
    pub fn state_dict(&self) -> AdapterTensors {
        let mut out = AdapterTensors::new();
        let mut put = |key: String, data: TensorData| {
            let shape = data.shape.to_vec();
            let values = data.convert::<f32>().into_vec::<f32>().expect("f32 values");
            out.insert(key, (shape, values));
        };
        put("embedding.weight".into(), self.embedding.val().into_data());
        let head = self.head_name();
        for (i, (w, b)) in self.head.iter().enumerate() {
            let index = self.head_index(i);
            put(format!("{head}.{index}.weight"), w.val().into_data());
            put(format!("{head}.{index}.bias"), b.val().into_data());
        }
        for (k, l) in self.lstm.iter().enumerate() {
            for (suffix, d) in [("", &l.forward), ("_reverse", &l.backward)] {
                put(
                    format!("lstm_head.weight_ih_l{k}{suffix}"),
                    d.weight_ih.val().into_data(),
                );
                put(
                    format!("lstm_head.weight_hh_l{k}{suffix}"),
                    d.weight_hh.val().into_data(),
                );
                put(
                    format!("lstm_head.bias_ih_l{k}{suffix}"),
                    d.bias_ih.val().into_data(),
                );
                put(
                    format!("lstm_head.bias_hh_l{k}{suffix}"),
                    d.bias_hh.val().into_data(),
                );
            }
        }
        out
    }

    /// Replaces every parameter with the tensor `prefix + name` of `tensors` (a state dict
    /// as [`PromptEncoder::state_dict`] writes it), keeping ids; `file` names the source in
    /// errors.
    pub fn load_state_dict(
        &mut self,
        tensors: &AdapterTensors,
        prefix: &str,
        file: &Path,
    ) -> Result<()> {
        let mut names = vec![(
            String::from("embedding.weight"),
            self.embedding.lazy_shape().to_vec(),
        )];
        let head = self.head_name();
        for (i, (w, b)) in self.head.iter().enumerate() {
            let index = self.head_index(i);
            names.push((format!("{head}.{index}.weight"), w.lazy_shape().to_vec()));
            names.push((format!("{head}.{index}.bias"), b.lazy_shape().to_vec()));
        }
        for (k, l) in self.lstm.iter().enumerate() {
            for (suffix, d) in [("", &l.forward), ("_reverse", &l.backward)] {
                names.push((
                    format!("lstm_head.weight_ih_l{k}{suffix}"),
                    d.weight_ih.lazy_shape().to_vec(),
                ));
                names.push((
                    format!("lstm_head.weight_hh_l{k}{suffix}"),
                    d.weight_hh.lazy_shape().to_vec(),
                ));
                names.push((
                    format!("lstm_head.bias_ih_l{k}{suffix}"),
                    d.bias_ih.lazy_shape().to_vec(),
                ));
                names.push((
                    format!("lstm_head.bias_hh_l{k}{suffix}"),
                    d.bias_hh.lazy_shape().to_vec(),
                ));
            }
        }
        // Check everything before changing anything.
        for (name, expected) in &names {
            let key = format!("{prefix}{name}");
            let (shape, _) = tensors.get(&key).ok_or_else(|| PeftError::MissingKey {
                path: file.to_owned(),
                key: key.clone(),
            })?;
            if shape != expected {
                return Err(PeftError::ShapeMismatch {
                    path: file.to_owned(),
                    key,
                    found: shape.clone(),
                    expected: expected.clone(),
                });
            }
        }
        let get = |name: &str| tensors[&format!("{prefix}{name}")].clone();
        set2(&mut self.embedding, get("embedding.weight"));
        for i in 0..self.head.len() {
            let index = self.head_index(i);
            let (w, b) = &mut self.head[i];
            set2(w, get(&format!("{head}.{index}.weight")));
            set1(b, get(&format!("{head}.{index}.bias")));
        }
        for (k, l) in self.lstm.iter_mut().enumerate() {
            for (suffix, d) in [("", &mut l.forward), ("_reverse", &mut l.backward)] {
                set2(
                    &mut d.weight_ih,
                    get(&format!("lstm_head.weight_ih_l{k}{suffix}")),
                );
                set2(
                    &mut d.weight_hh,
                    get(&format!("lstm_head.weight_hh_l{k}{suffix}")),
                );
                set1(
                    &mut d.bias_ih,
                    get(&format!("lstm_head.bias_ih_l{k}{suffix}")),
                );
                set1(
                    &mut d.bias_hh,
                    get(&format!("lstm_head.bias_hh_l{k}{suffix}")),
                );
            }
        }
        Ok(())
    }

    /// Every parameter with its PyTorch name, for ids, trainability and listings.
    pub(crate) fn params_mut(&mut self) -> Vec<(String, ParamMut<'_, B>)> {
        let head = self.head_name();
        let indices: Vec<usize> = (0..self.head.len()).map(|i| self.head_index(i)).collect();
        let mut out = vec![(
            "embedding.weight".to_owned(),
            ParamMut::Matrix(&mut self.embedding),
        )];
        for ((w, b), index) in self.head.iter_mut().zip(indices) {
            out.push((format!("{head}.{index}.weight"), ParamMut::Matrix(w)));
            out.push((format!("{head}.{index}.bias"), ParamMut::Vector(b)));
        }
        for (k, l) in self.lstm.iter_mut().enumerate() {
            for (suffix, d) in [("", &mut l.forward), ("_reverse", &mut l.backward)] {
                out.push((
                    format!("lstm_head.weight_ih_l{k}{suffix}"),
                    ParamMut::Matrix(&mut d.weight_ih),
                ));
                out.push((
                    format!("lstm_head.weight_hh_l{k}{suffix}"),
                    ParamMut::Matrix(&mut d.weight_hh),
                ));
                out.push((
                    format!("lstm_head.bias_ih_l{k}{suffix}"),
                    ParamMut::Vector(&mut d.bias_ih),
                ));
                out.push((
                    format!("lstm_head.bias_hh_l{k}{suffix}"),
                    ParamMut::Vector(&mut d.bias_hh),
                ));
            }
        }
        out
    }

    /// The encoder as peft loads a saved adapter: its output becomes the table and the
    /// encoder layers go (`values` in the file's `[num_virtual_tokens, width]` layout).
    pub fn into_table_of(self, values: Vec<f32>) -> Self {
        let [v, _] = self.embedding.lazy_shape().dims::<2>();
        let width = self.target.width_or(values.len() / v.max(1));
        let device = self.embedding.lazy_device();
        let t = Tensor::from_data(TensorData::new(values, [v, width]), &device);
        Self::table(t, self.target)
    }

    fn head_name(&self) -> &'static str {
        match self.kind {
            EncoderKind::Projection => "transform",
            _ => "mlp_head",
        }
    }

    /// Linear layers sit at every other index of the `nn.Sequential` (activations between).
    fn head_index(&self, i: usize) -> usize {
        2 * i
    }
}

/// The token ids of `prompt_tuning_init_text` for a TEXT init (peft: `tokenizer(text)
/// ["input_ids"]`, special tokens included), truncated or repeated to the number of virtual
/// tokens; `None` for other inits.
pub(crate) fn init_token_ids(config: &PeftConfig, dims: &PromptDims) -> Result<Option<Vec<usize>>> {
    let PeftConfig::PromptTuning(c) = config else {
        return Ok(None);
    };
    if c.prompt_tuning_init != PromptTuningInit::Text {
        return Ok(None);
    }
    let folder = c.tokenizer_name_or_path.clone().unwrap_or_default();
    let text = c.prompt_tuning_init_text.clone().unwrap_or_default();
    let tokenizer = ember_tokenizers::AutoTokenizer::from_pretrained(&folder)
        .map_err(|e| config_error("tokenizer_name_or_path", format!("{folder}: {e}")))?;
    let ids = tokenizer
        .encode(&text, None, true)
        .map_err(|e| config_error("prompt_tuning_init_text", e.to_string()))?;
    if ids.is_empty() {
        return Err(config_error(
            "prompt_tuning_init_text",
            format!("{text:?} gives no tokens with the tokenizer in {folder}"),
        ));
    }
    if let Some(&id) = ids.iter().find(|&&id| id as usize >= dims.vocab_size) {
        return Err(config_error(
            "tokenizer_name_or_path",
            format!(
                "{folder} gives token id {id} for the init text, outside the model's vocabulary of {}",
                dims.vocab_size
            ),
        ));
    }
    let total = c.prompt.virtual_tokens();
    Ok(Some(
        ids.iter()
            .cycle()
            .take(total)
            .map(|&i| i as usize)
            .collect(),
    ))
}

/// A new encoder for `config` (filled by `PeftConfig::fill_prompt`) on a model whose word
/// embedding table is `table` `[vocab, hidden]`; `loading`: the table a saved file fills.
pub(crate) fn new_encoder<B: Backend>(
    config: &PeftConfig,
    dims: &PromptDims,
    table: Tensor<B, 2>,
    init_ids: Option<&[usize]>,
    loading: bool,
) -> Result<PromptEncoder<B>> {
    let device = table.device();
    let fields = config.prompt_fields().expect("a prompt-learning config");
    let v = fields.virtual_tokens();
    let token_dim = fields.token_dim.unwrap_or(dims.hidden_size);
    let [vocab, hidden] = table.dims();
    let normal = Distribution::Normal(0.0, 1.0);
    let prefix = |c: &crate::config::PrefixTuningConfig| {
        let heads = c
            .prompt
            .num_attention_heads
            .unwrap_or(dims.num_attention_heads);
        PromptTarget::Prefix {
            num_layers: c.prompt.num_layers.unwrap_or(dims.num_layers),
            num_heads: heads,
            head_dim: token_dim / heads,
        }
    };
    if !matches!(config, PeftConfig::PrefixTuning(_)) && token_dim != hidden {
        return Err(config_error(
            "token_dim",
            format!("{token_dim}: the virtual tokens must have the model's hidden size {hidden}"),
        ));
    }
    if let PeftConfig::PrefixTuning(c) = config {
        let PromptTarget::Prefix {
            num_layers,
            num_heads,
            head_dim,
        } = prefix(c)
        else {
            unreachable!("prefix() makes a prefix target")
        };
        let model_heads = dims.num_key_value_heads.unwrap_or(dims.num_attention_heads);
        let model_head_dim = dims.hidden_size / dims.num_attention_heads;
        let fits = [
            ("num_layers", num_layers, dims.num_layers),
            ("num_attention_heads", num_heads, model_heads),
            (
                "token_dim",
                num_heads * head_dim,
                model_heads * model_head_dim,
            ),
        ];
        if let Some((field, ours, model)) = fits.into_iter().find(|(_, a, b)| a != b) {
            return Err(config_error(
                field,
                format!("the prefix has {ours}, the model's attention takes {model}"),
            ));
        }
    }
    Ok(match config {
        PeftConfig::PromptTuning(c) => {
            let rows = match (c.prompt_tuning_init, loading) {
                (_, true) | (PromptTuningInit::Random, _) => {
                    Tensor::random([v, hidden], normal, &device)
                }
                (PromptTuningInit::SampleVocab, false) => {
                    let ids = Tensor::<B, 1, burn::tensor::Int>::random(
                        [v],
                        Distribution::Uniform(0.0, vocab as f64),
                        &device,
                    );
                    table.select(0, ids).detach()
                }
                (PromptTuningInit::Text, false) => {
                    let ids: Vec<i64> = init_ids
                        .unwrap_or_default()
                        .iter()
                        .map(|&i| i as i64)
                        .collect();
                    let ids = Tensor::<B, 1, burn::tensor::Int>::from_data(
                        TensorData::new(ids, [v]),
                        &device,
                    );
                    table.select(0, ids).detach()
                }
            };
            PromptEncoder::table(rows, PromptTarget::Tokens)
        }
        PeftConfig::PTuning(c) => {
            let hidden_size = c.encoder_hidden_size.unwrap_or(token_dim);
            match (loading, c.encoder_reparameterization_type) {
                (true, _) => PromptEncoder::table(
                    Tensor::zeros([v, token_dim], &device),
                    PromptTarget::Tokens,
                ),
                (false, EncoderReparameterization::Mlp) => {
                    PromptEncoder::mlp(v, token_dim, hidden_size, &device)
                }
                (false, EncoderReparameterization::Lstm) => PromptEncoder::lstm(
                    v,
                    token_dim,
                    hidden_size,
                    c.encoder_num_layers,
                    c.encoder_dropout,
                    &device,
                ),
            }
        }
        PeftConfig::PrefixTuning(c) => {
            let target = prefix(c);
            let width = target.width();
            if c.prefix_projection && !loading {
                let hidden_size = c.encoder_hidden_size.unwrap_or(token_dim);
                PromptEncoder::projection(v, token_dim, hidden_size, target, c.zero_init(), &device)
            } else if c.zero_init() || loading {
                PromptEncoder::table(Tensor::zeros([v, width], &device), target)
            } else {
                PromptEncoder::table(Tensor::random([v, width], normal, &device), target)
            }
        }
        PeftConfig::Lora(_) | PeftConfig::Ia3(_) => {
            return Err(config_error("peft_type", "not a prompt-learning method"))
        }
    })
}

/// A parameter of an encoder, borrowed.
pub(crate) enum ParamMut<'a, B: Backend> {
    Vector(&'a mut Param<Tensor<B, 1>>),
    Matrix(&'a mut Param<Tensor<B, 2>>),
}

impl<B: Backend> ParamMut<'_, B> {
    pub fn shape(&self) -> Vec<usize> {
        match self {
            Self::Vector(p) => p.lazy_shape().to_vec(),
            Self::Matrix(p) => p.lazy_shape().to_vec(),
        }
    }

    pub fn id(&self) -> burn::module::ParamId {
        match self {
            Self::Vector(p) => p.id,
            Self::Matrix(p) => p.id,
        }
    }

    pub fn set_id(&mut self, id: burn::module::ParamId) {
        match self {
            Self::Vector(p) => p.id = id,
            Self::Matrix(p) => p.id = id,
        }
    }

    pub fn train(&mut self) {
        match self {
            Self::Vector(p) => **p = p.clone().set_require_grad(true),
            Self::Matrix(p) => **p = p.clone().set_require_grad(true),
        }
    }
}

fn set2<B: Backend>(param: &mut Param<Tensor<B, 2>>, (shape, values): (Vec<usize>, Vec<f32>)) {
    let t = Tensor::from_data(TensorData::new(values, shape), &param.lazy_device());
    *param = crate::linear::replace_value(param, t);
}

fn set1<B: Backend>(param: &mut Param<Tensor<B, 1>>, (shape, values): (Vec<usize>, Vec<f32>)) {
    let t = Tensor::from_data(TensorData::new(values, shape), &param.lazy_device());
    *param = crate::linear::replace_value(param, t);
}

impl PromptTarget {
    /// The width of the encoder's output.
    pub fn width(&self) -> usize {
        match *self {
            Self::Tokens => 0,
            Self::Prefix {
                num_layers,
                num_heads,
                head_dim,
            } => num_layers * 2 * num_heads * head_dim,
        }
    }

    fn width_or(&self, tokens_width: usize) -> usize {
        match self {
            Self::Tokens => tokens_width,
            Self::Prefix { .. } => self.width(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    type B = burn::backend::Flex;

    #[test]
    fn a_prefix_splits_into_layers_as_peft_views_it() {
        let device = Default::default();
        // v = 2 positions, 2 layers, 1 head of width 2: row t holds, per (layer, k/v), 2 values.
        let values: Vec<f32> = (0..16).map(|x| x as f32).collect();
        let t = Tensor::<B, 2>::from_data(TensorData::new(values, [2, 8]), &device);
        let target = PromptTarget::Prefix {
            num_layers: 2,
            num_heads: 1,
            head_dim: 2,
        };
        let VirtualPrompt::Prefix(layers) = PromptEncoder::table(t, target).virtual_prompt() else {
            panic!("a prefix")
        };
        let v = |t: &Tensor<B, 4>| t.clone().into_data().into_vec::<f32>().unwrap();
        // Layer 1's value is entry 3 of each row: values 6, 7 (row 0) and 14, 15 (row 1).
        assert_eq!(v(&layers[1].1), vec![6.0, 7.0, 14.0, 15.0]);
        assert_eq!(v(&layers[0].0), vec![0.0, 1.0, 8.0, 9.0]);
    }

    #[test]
    fn the_state_dict_round_trips_and_refuses_a_wrong_shape() {
        let device = Default::default();
        let a = PromptEncoder::<B>::lstm(3, 4, 2, 2, 0.0, &device);
        let mut b = PromptEncoder::<B>::lstm(3, 4, 2, 2, 0.0, &device);
        let state = a.state_dict();
        assert!(state.contains_key("lstm_head.weight_ih_l1_reverse"));
        assert_eq!(state["lstm_head.weight_ih_l1"].0, vec![8, 4]);
        assert_eq!(state["mlp_head.2.weight"].0, vec![4, 4]);
        b.load_state_dict(&state, "", Path::new("x")).unwrap();
        let out = |e: &PromptEncoder<B>| e.output().into_data().into_vec::<f32>().unwrap();
        assert_eq!(out(&a), out(&b));
        let mut bad = state.clone();
        bad.get_mut("mlp_head.0.bias").unwrap().0 = vec![3];
        let err = b.load_state_dict(&bad, "", Path::new("x")).unwrap_err();
        assert!(err.to_string().contains("mlp_head.0.bias"), "{err}");
    }
}
