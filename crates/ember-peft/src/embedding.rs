//! [`TokenEmbedding`]: every embedding table of Ember's models, with named adapters (LoRA's
//! `lora_embedding_A` / `lora_embedding_B`, or a trained copy for `modules_to_save`).

use crate::adapter::{find, AdapterState, Named};
use crate::error::Result;
use crate::linear::replace_value;
use crate::prompt::{PromptEncoder, VirtualPrompt};
use burn::module::{Module, Param};
use burn::nn::Embedding;
use burn::tensor::{backend::Backend, Distribution, Int, Tensor};

/// A LoRA update of an embedding table: `embed(ids, A) · B · scaling`.
#[derive(Module, Debug)]
pub struct LoraEmbedding<B: Backend> {
    /// `lora_embedding_A`, `[num_embeddings, r]` (peft stores `[r, num_embeddings]`).
    pub lora_embedding_a: Param<Tensor<B, 2>>,
    /// `lora_embedding_B`, `[r, embedding_dim]` (peft stores `[embedding_dim, r]`).
    pub lora_embedding_b: Param<Tensor<B, 2>>,
    /// `lora_alpha / r` (or `/ sqrt(r)`).
    pub scaling: f64,
}

impl<B: Backend> LoraEmbedding<B> {
    /// A rank-`r` update of a `[n, d]` table: A zeros and B standard normal as peft
    /// initialises embeddings (`random`: both standard normal).
    pub fn new(
        n: usize,
        d: usize,
        r: usize,
        scaling: f64,
        random: bool,
        device: &B::Device,
    ) -> Self {
        let normal = Distribution::Normal(0.0, 1.0);
        let a = if random {
            Tensor::random([n, r], normal, device)
        } else {
            Tensor::zeros([n, r], device)
        };
        Self {
            lora_embedding_a: Param::from_tensor(a),
            lora_embedding_b: Param::from_tensor(Tensor::random([r, d], normal, device)),
            scaling,
        }
    }

    /// The rank.
    pub fn rank(&self) -> usize {
        self.lora_embedding_a.lazy_shape().dims::<2>()[1]
    }

    /// The update for `ids`, `[batch, seq, d]`.
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [batch, seq] = ids.dims();
        let after_a = burn::tensor::module::embedding(self.lora_embedding_a.val(), ids);
        let r = self.rank();
        let rows = after_a.reshape([batch * seq, r]) * self.scaling;
        let out = crate::linear::dense(&rows, &self.lora_embedding_b.val(), None);
        let d = out.dims()[1];
        out.reshape([batch, seq, d])
    }

    /// `A · B · scaling`, `[n, d]`.
    pub fn delta_weight(&self) -> Tensor<B, 2> {
        self.lora_embedding_a
            .val()
            .matmul(self.lora_embedding_b.val())
            * self.scaling
    }
}

/// One named adapter of a [`TokenEmbedding`].
#[derive(Module, Debug)]
pub struct EmbeddingAdapter<B: Backend> {
    /// The adapter's name.
    pub name: String,
    /// A LoRA update.
    pub lora: Option<LoraEmbedding<B>>,
    /// A trained copy that replaces the table while this adapter is active.
    pub copy: Option<Embedding<B>>,
    /// A prompt-learning adapter (prompt tuning, P-tuning, prefix tuning): virtual tokens or
    /// a key / value prefix that the model puts before its input while this adapter is active.
    pub prompt: Option<PromptEncoder<B>>,
}

impl<B: Backend> Named for EmbeddingAdapter<B> {
    fn name(&self) -> &str {
        &self.name
    }
}

/// An embedding table with named adapters.
#[derive(Module, Debug)]
pub struct TokenEmbedding<B: Backend> {
    /// The pretrained table, `[num_embeddings, embedding_dim]`.
    pub base: Embedding<B>,
    /// The adapters, in the order they were added.
    pub adapters: Vec<EmbeddingAdapter<B>>,
    /// Which adapters are active, merged, or all disabled.
    pub state: AdapterState,
}

impl<B: Backend> TokenEmbedding<B> {
    /// A table with no adapters.
    pub fn new(base: Embedding<B>) -> Self {
        Self {
            base,
            adapters: Vec::new(),
            state: AdapterState::default(),
        }
    }

    /// `[num_embeddings, embedding_dim]`.
    pub fn dims(&self) -> [usize; 2] {
        self.base.weight.lazy_shape().dims()
    }

    /// The table that lookups read while adapters are as they are now: the active copy of
    /// `modules_to_save`, else the base (tied output heads read it too).
    pub fn table(&self) -> &Embedding<B> {
        if self.state.disabled {
            return &self.base;
        }
        self.adapters
            .iter()
            .filter(|a| self.state.active.contains(&a.name))
            .find_map(|a| a.copy.as_ref())
            .unwrap_or(&self.base)
    }

    /// The lookup with the active adapters.
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.forward_with(ids, |table, ids| table.forward(ids))
    }

    /// The lookup through `lookup` (a model's own, e.g. one that keeps the padding row's
    /// gradient at zero), plus the active LoRA updates.
    pub fn forward_with(
        &self,
        ids: Tensor<B, 2, Int>,
        lookup: impl FnOnce(&Embedding<B>, Tensor<B, 2, Int>) -> Tensor<B, 3>,
    ) -> Tensor<B, 3> {
        // A half-precision table gives its rows in float32 (exact), the dtype models compute in.
        let mut y = ember_kernels::float32(lookup(self.table(), ids.clone()));
        for a in &self.adapters {
            if let Some(lora) = a.lora.as_ref().filter(|_| self.state.applies(&a.name)) {
                y = y + lora.forward(ids.clone());
            }
        }
        y
    }

    /// The active prompt-learning adapter's output, as the model puts it before its input;
    /// `None` with no such adapter active (or adapters disabled).
    pub fn virtual_prompt(&self) -> Option<VirtualPrompt<B>> {
        self.active_prompt().map(PromptEncoder::virtual_prompt)
    }

    /// The active prompt-learning adapter, without running its encoder.
    pub fn active_prompt(&self) -> Option<&PromptEncoder<B>> {
        if self.state.disabled {
            return None;
        }
        self.adapters
            .iter()
            .filter(|a| self.state.active.contains(&a.name))
            .find_map(|a| a.prompt.as_ref())
    }

    /// How many virtual tokens the active prompt-tuning or P-tuning adapter puts before the
    /// input (0 without one, and for prefix tuning, whose prefix is not part of the output).
    pub fn virtual_tokens(&self) -> usize {
        self.active_prompt()
            .filter(|p| p.target == crate::prompt::PromptTarget::Tokens)
            .map_or(0, PromptEncoder::num_virtual_tokens)
    }

    /// The adapter named `name`.
    pub fn adapter(&self, name: &str) -> Option<&EmbeddingAdapter<B>> {
        self.adapters.iter().find(|a| a.name == name)
    }

    /// The adapter named `name`, created empty if absent.
    pub fn adapter_mut(&mut self, name: &str) -> &mut EmbeddingAdapter<B> {
        if let Some(i) = self.adapters.iter().position(|a| a.name == name) {
            return &mut self.adapters[i];
        }
        self.adapters.push(EmbeddingAdapter {
            name: name.to_owned(),
            lora: None,
            copy: None,
            prompt: None,
        });
        self.adapters.last_mut().expect("just pushed")
    }

    /// Removes the adapter `name` (unmerging it first).
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        let i = find(&self.adapters, name)?;
        if self.state.is_merged(name) {
            self.update(i, false);
            self.state.merged.retain(|m| m != name);
        }
        self.adapters.remove(i);
        self.state.active.retain(|a| a != name);
        Ok(())
    }

    /// Adds the active LoRA updates into the base table.
    pub fn merge(&mut self) {
        for name in self.state.active.clone() {
            let Some(i) = self.adapters.iter().position(|a| a.name == name) else {
                continue;
            };
            if !self.state.is_merged(&name) {
                self.update(i, true);
                self.state.merged.push(name);
            }
        }
    }

    /// Takes every merged update out of the base table again.
    pub fn unmerge(&mut self) {
        while let Some(name) = self.state.merged.pop() {
            if let Some(i) = self.adapters.iter().position(|a| a.name == name) {
                self.update(i, false);
            }
        }
    }

    /// The plain table with the active adapters folded in; the active copy replaces it.
    pub fn merged_base(mut self) -> Embedding<B> {
        let copy = self
            .adapters
            .iter()
            .filter(|a| self.state.active.contains(&a.name))
            .find_map(|a| a.copy.clone());
        if let Some(copy) = copy {
            return copy;
        }
        self.merge();
        self.base
    }

    fn update(&mut self, i: usize, add: bool) {
        if let Some(lora) = &self.adapters[i].lora {
            let w = self.base.weight.val().detach();
            let delta = lora.delta_weight().detach();
            let w = if add { w + delta } else { w - delta };
            self.base.weight = replace_value(&self.base.weight, w);
        }
    }
}
