//! How peft reaches into a model: [`AdaptableModel`] hands every projection, embedding table
//! and other parameter to a [`LayerVisitor`] under its Hugging Face module path, so that
//! target matching, saving and loading work on any model without knowing its code.

use crate::embedding::TokenEmbedding;
use crate::linear::Projection;
use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor};

/// Receives a model's adapter-capable layers (and its remaining parameters) by HF path.
pub trait LayerVisitor<B: Backend> {
    /// A linear layer (HF `nn.Linear` or `Conv1D`) at `path`
    /// (`bert.encoder.layer.0.attention.self.query`).
    fn projection(&mut self, path: &str, layer: &mut Projection<B>);

    /// An embedding table at `path`.
    fn embedding(&mut self, path: &str, layer: &mut TokenEmbedding<B>);

    /// A module that holds no adapters (`LayerNorm`, `RMSNorm`) at `path`, before its
    /// parameters are handed to [`LayerVisitor::param`].
    fn module(&mut self, _path: &str, _kind: &str) {}

    /// A 1-D parameter outside projections and embeddings (a norm's weight or bias, a head's
    /// bias), under its full HF key.
    fn param(&mut self, _key: &str, _param: &mut Param<Tensor<B, 1>>) {}
}

/// A model that adapters can be added to: Ember's models implement it, and so can a user's
/// own burn module (list its [`Projection`] and [`TokenEmbedding`] fields by path).
pub trait AdaptableModel<B: Backend>: Module<B> + burn::module::ModuleDisplay + Clone {
    /// Hands every layer to `visitor`, in module order, under its HF path.
    fn visit_layers(&mut self, visitor: &mut dyn LayerVisitor<B>);

    /// The HF `model_type` (`bert`, `llama`, ...), which picks peft's default targets; `None`
    /// for a model that has no defaults (targets must then be given).
    fn model_type(&self) -> Option<String> {
        None
    }

    /// The sizes prompt learning reads from the model and where its word embeddings are;
    /// `None` for a model without prompt-learning support.
    fn prompt_dims(&self) -> Option<crate::config::PromptDims> {
        None
    }
}

/// One row of `named_modules()`: a module's path, its type and its parameters' shapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleInfo {
    /// The HF path, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    /// `Linear`, `Conv1D`, `Embedding`, `LayerNorm`, `RMSNorm`, `Parameter`.
    pub kind: String,
    /// `(parameter name, shape in HF layout)`.
    pub params: Vec<(String, Vec<usize>)>,
}

impl std::fmt::Display for ModuleInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let params: Vec<String> = self
            .params
            .iter()
            .map(|(n, s)| format!("{n} {s:?}"))
            .collect();
        write!(f, "{} ({}): {}", self.name, self.kind, params.join(", "))
    }
}

/// The base modules of a model, as `named_modules()` lists its leaves.
pub(crate) struct ModuleLister {
    pub modules: Vec<ModuleInfo>,
}

impl<B: Backend> LayerVisitor<B> for ModuleLister {
    fn projection(&mut self, path: &str, layer: &mut Projection<B>) {
        let [d_in, d_out] = layer.dims();
        let weight = if layer.conv1d {
            vec![d_in, d_out]
        } else {
            vec![d_out, d_in]
        };
        let mut params = vec![("weight".to_owned(), weight)];
        if layer.base.bias.is_some() {
            params.push(("bias".to_owned(), vec![d_out]));
        }
        self.modules.push(ModuleInfo {
            name: path.to_owned(),
            kind: if layer.conv1d { "Conv1D" } else { "Linear" }.to_owned(),
            params,
        });
    }

    fn embedding(&mut self, path: &str, layer: &mut TokenEmbedding<B>) {
        self.modules.push(ModuleInfo {
            name: path.to_owned(),
            kind: "Embedding".to_owned(),
            params: vec![("weight".to_owned(), layer.dims().to_vec())],
        });
    }

    fn module(&mut self, path: &str, kind: &str) {
        self.modules.push(ModuleInfo {
            name: path.to_owned(),
            kind: kind.to_owned(),
            params: Vec::new(),
        });
    }

    fn param(&mut self, key: &str, param: &mut Param<Tensor<B, 1>>) {
        let (module, name) = key.rsplit_once('.').unwrap_or(("", key));
        let shape = param.lazy_shape().to_vec();
        match self.modules.last_mut().filter(|m| m.name == module) {
            Some(m) => m.params.push((name.to_owned(), shape)),
            None => self.modules.push(ModuleInfo {
                name: key.to_owned(),
                kind: "Parameter".to_owned(),
                params: vec![(String::new(), shape)],
            }),
        }
    }
}
