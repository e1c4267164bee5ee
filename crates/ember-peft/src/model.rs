//! [`PeftModel`] and [`get_peft_model`]: a model with named adapters, as peft's `PeftModel`
//! (adding, loading, switching, disabling, deleting, merging and saving adapters).

use crate::config::{
    Bias, IA3Config, InitLoraWeights, LoraConfig, PeftConfig, PromptDims, TaskType,
};
use crate::embedding::{LoraEmbedding, TokenEmbedding};
use crate::error::{PeftError, Result};
use crate::io;
use crate::linear::{Ia3Vector, LoraInit, LoraLinear, Projection};
use crate::matching::{Matcher, TargetSelector};
use crate::slots::{embedding_slots, projection_slots, Alias, Slot};
use crate::visit::{AdaptableModel, LayerVisitor, ModuleInfo, ModuleLister};
use burn::module::{Module, Param, ParamId};
use burn::tensor::{backend::Backend, Distribution, Tensor};
use std::collections::{BTreeMap, BTreeSet};
use std::marker::PhantomData;
use std::path::Path;

/// The adapter name peft gives when none is given.
pub const DEFAULT_ADAPTER: &str = "default";

/// The classifier heads peft adds to `modules_to_save` for `SEQ_CLS` / `TOKEN_CLS`.
const CLASSIFIER_HEADS: [&str; 2] = ["classifier", "score"];

/// A model with named adapters (peft's `PeftModel`; `base_model` is the wrapped model).
#[derive(Module, Debug)]
pub struct PeftModel<B: Backend, M: Module<B>> {
    /// The model, its layers carrying the adapters.
    pub base_model: M,
    /// Each adapter's configuration, by name (peft's `peft_config`).
    pub peft_config: BTreeMap<String, PeftConfig>,
    /// The adapter the forward pass applies.
    pub active_adapter: String,
    backend: PhantomData<B>,
}

/// One parameter as peft's `named_parameters()` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeftParam {
    /// e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight`.
    pub name: String,
    /// The burn parameter id (gradients and optimizer state are keyed by it).
    pub id: ParamId,
    /// The shape in burn's layout.
    pub shape: Vec<usize>,
    /// Whether it is trained.
    pub trainable: bool,
}

/// `get_peft_model(model, config)`: `model` with one adapter named `default`, its base
/// weights frozen.
pub fn get_peft_model<B: Backend, M: AdaptableModel<B>>(
    model: M,
    config: impl Into<PeftConfig>,
) -> Result<PeftModel<B, M>> {
    PeftModel::new(model, config, DEFAULT_ADAPTER)
}

impl<B: Backend, M: AdaptableModel<B>> PeftModel<B, M> {
    /// `model` with one new adapter `adapter_name`, active and trainable.
    pub fn new(model: M, config: impl Into<PeftConfig>, adapter_name: &str) -> Result<Self> {
        let mut peft = Self {
            base_model: model,
            peft_config: BTreeMap::new(),
            active_adapter: adapter_name.to_owned(),
            backend: PhantomData,
        };
        peft.add_adapter(adapter_name, config)?;
        Ok(peft)
    }

    /// `PeftModel.from_pretrained(model, dir, adapter_name)`: loads an adapter folder for
    /// inference (frozen; `is_trainable` keeps it trainable).
    pub fn from_pretrained(
        model: M,
        dir: impl AsRef<Path>,
        adapter_name: &str,
        is_trainable: bool,
    ) -> Result<Self> {
        let mut peft = Self {
            base_model: model,
            peft_config: BTreeMap::new(),
            active_adapter: adapter_name.to_owned(),
            backend: PhantomData,
        };
        peft.load_adapter(dir, adapter_name, is_trainable)?;
        Ok(peft)
    }

    /// Reassembles a model from its parts (after the base model was transformed).
    pub fn rebuild(
        base_model: M,
        peft_config: BTreeMap<String, PeftConfig>,
        active_adapter: String,
    ) -> Self {
        Self {
            base_model,
            peft_config,
            active_adapter,
            backend: PhantomData,
        }
    }

    /// The wrapped model.
    pub fn model(&self) -> &M {
        &self.base_model
    }

    /// The names of the adapters, in name order.
    pub fn adapter_names(&self) -> Vec<String> {
        self.peft_config.keys().cloned().collect()
    }

    /// `active_adapter`.
    pub fn active_adapter(&self) -> &str {
        &self.active_adapter
    }

    /// Adds a new adapter (peft's `add_adapter`); it does not become active.
    pub fn add_adapter(&mut self, adapter_name: &str, config: impl Into<PeftConfig>) -> Result<()> {
        self.add_adapter_as(adapter_name, config.into(), false)
    }

    /// [`PeftModel::add_adapter`]; `loading`: the weights come from a file next, so
    /// prompt-learning adapters are built as the table peft's file holds.
    fn add_adapter_as(
        &mut self,
        adapter_name: &str,
        mut config: PeftConfig,
        loading: bool,
    ) -> Result<()> {
        if self.peft_config.contains_key(adapter_name) {
            return Err(PeftError::DuplicateAdapter(adapter_name.to_owned()));
        }
        config.validate()?;
        if let Some(other) = self.peft_config.values().next() {
            if other.is_prompt_learning() != config.is_prompt_learning() {
                return Err(PeftError::Config {
                    field: "peft_type".into(),
                    message: format!(
                        "Cannot combine adapters with different peft types. Found {} and {}.",
                        other.peft_type(),
                        config.peft_type()
                    ),
                });
            }
        }
        let model_type = self.base_model.model_type();
        let dims = if config.is_prompt_learning() {
            let dims = self
                .base_model
                .prompt_dims()
                .ok_or_else(|| PeftError::Config {
                    field: "peft_type".into(),
                    message: format!(
                    "{}: this model has no prompt-learning support (AdaptableModel::prompt_dims)",
                    config.peft_type()
                ),
                })?;
            config.fill_prompt(&dims)?;
            Some(dims)
        } else {
            if config.target_modules().is_none() {
                config.fill_defaults(model_type.as_deref().unwrap_or("unknown"))?;
            }
            None
        };
        if let Some(task) = config.task_type() {
            if matches!(task, TaskType::SeqCls | TaskType::TokenCls) {
                let mut modules = config.modules_to_save().cloned().unwrap_or_default();
                for head in CLASSIFIER_HEADS {
                    if !modules.iter().any(|m| m == head) {
                        modules.push(head.to_owned());
                    }
                }
                config.set_modules_to_save(Some(modules));
            }
        }
        let mut model = self.base_model.clone();
        let mut injector = Injector::new(adapter_name, &config, dims, loading)?;
        model.visit_layers(&mut injector);
        injector.finish(&config)?;
        self.base_model = model;
        self.peft_config.insert(adapter_name.to_owned(), config);
        if self.peft_config.len() == 1 {
            self.active_adapter = adapter_name.to_owned();
        }
        self.refresh();
        Ok(())
    }

    /// Loads an adapter folder under `adapter_name` (peft's `load_adapter`); it does not
    /// become active unless it is the first. Nothing changes when the folder does not fit.
    pub fn load_adapter(
        &mut self,
        dir: impl AsRef<Path>,
        adapter_name: &str,
        is_trainable: bool,
    ) -> Result<()> {
        let dir = dir.as_ref();
        let mut config = PeftConfig::from_pretrained(dir)?;
        config.set_inference_mode(!is_trainable);
        let (file, tensors) = io::read_weights(dir)?;
        let before = (
            self.base_model.clone(),
            self.peft_config.clone(),
            self.active_adapter.clone(),
        );
        let result = self
            .add_adapter_as(adapter_name, config, true)
            .and_then(|()| {
                let mut filler = Filler {
                    walk: self.slot_walk(adapter_name),
                    encoder: None,
                    tensors: &tensors,
                    used: BTreeSet::new(),
                    file: file.clone(),
                    error: None,
                };
                self.base_model.visit_layers(&mut filler);
                if let Some(e) = filler.error {
                    return Err(e);
                }
                if let Some(key) = tensors.keys().find(|k| !filler.used.contains(*k)) {
                    return Err(PeftError::UnexpectedKey {
                        path: file.clone(),
                        key: key.clone(),
                    });
                }
                Ok(())
            });
        if result.is_err() {
            (self.base_model, self.peft_config, self.active_adapter) = before;
        }
        result
    }

    /// Makes `adapter_name` the active adapter (peft's `set_adapter`); only it is trained.
    pub fn set_adapter(&mut self, adapter_name: &str) -> Result<()> {
        if !self.peft_config.contains_key(adapter_name) {
            return Err(PeftError::UnknownAdapter {
                name: adapter_name.to_owned(),
                known: self.adapter_names(),
            });
        }
        self.active_adapter = adapter_name.to_owned();
        self.refresh();
        Ok(())
    }

    /// Runs `f` on the model with every adapter disabled (peft's `with
    /// model.disable_adapter():`), then enables them again. Merged adapters are unmerged
    /// first, as peft does.
    pub fn disable_adapter<R>(&mut self, f: impl FnOnce(&M) -> R) -> R {
        self.unmerge_adapter();
        self.for_each_state(|s| s.disabled = true);
        let out = f(&self.base_model);
        self.for_each_state(|s| s.disabled = false);
        out
    }

    /// Removes an adapter; the active one may not be deleted while others remain unnamed.
    pub fn delete_adapter(&mut self, adapter_name: &str) -> Result<()> {
        if self.peft_config.remove(adapter_name).is_none() {
            return Err(PeftError::UnknownAdapter {
                name: adapter_name.to_owned(),
                known: self.adapter_names(),
            });
        }
        struct Delete<'a>(&'a str);
        impl<B: Backend> LayerVisitor<B> for Delete<'_> {
            fn projection(&mut self, _: &str, layer: &mut Projection<B>) {
                let _ = layer.delete_adapter(self.0);
            }
            fn embedding(&mut self, _: &str, layer: &mut TokenEmbedding<B>) {
                let _ = layer.delete_adapter(self.0);
            }
        }
        self.base_model.visit_layers(&mut Delete(adapter_name));
        if self.active_adapter == adapter_name {
            self.active_adapter = self.peft_config.keys().next().cloned().unwrap_or_default();
        }
        self.refresh();
        Ok(())
    }

    /// Adds the active adapter's update into the base weights (peft's `merge_adapter`): the
    /// forward pass then costs what the base model costs.
    pub fn merge_adapter(&mut self) {
        struct Merge;
        impl<B: Backend> LayerVisitor<B> for Merge {
            fn projection(&mut self, _: &str, layer: &mut Projection<B>) {
                layer.merge();
            }
            fn embedding(&mut self, _: &str, layer: &mut TokenEmbedding<B>) {
                layer.merge();
            }
        }
        self.base_model.visit_layers(&mut Merge);
    }

    /// Takes merged updates out of the base weights again (peft's `unmerge_adapter`).
    pub fn unmerge_adapter(&mut self) {
        struct Unmerge;
        impl<B: Backend> LayerVisitor<B> for Unmerge {
            fn projection(&mut self, _: &str, layer: &mut Projection<B>) {
                layer.unmerge();
            }
            fn embedding(&mut self, _: &str, layer: &mut TokenEmbedding<B>) {
                layer.unmerge();
            }
        }
        self.base_model.visit_layers(&mut Unmerge);
    }

    /// The model with the active adapter folded into its weights and every adapter removed
    /// (peft's `merge_and_unload`); `save_pretrained` of the result is a plain checkpoint.
    pub fn merge_and_unload(self) -> M {
        self.unload_with(true)
    }

    /// The model with every adapter removed and nothing merged (peft's `unload`).
    pub fn unload(self) -> M {
        self.unload_with(false)
    }

    fn unload_with(mut self, merge: bool) -> M {
        if !merge {
            self.unmerge_adapter();
        }
        struct Unload(bool);
        impl<B: Backend> LayerVisitor<B> for Unload {
            fn projection(&mut self, _: &str, layer: &mut Projection<B>) {
                let mut taken = std::mem::replace(layer, placeholder_projection(layer));
                if !self.0 {
                    taken.state.active.clear();
                }
                *layer = taken.unloaded();
            }
            fn embedding(&mut self, _: &str, layer: &mut TokenEmbedding<B>) {
                let mut taken = std::mem::replace(layer, placeholder_embedding(layer));
                if !self.0 {
                    taken.state.active.clear();
                }
                *layer = TokenEmbedding::new(taken.merged_base());
            }
        }
        self.base_model.visit_layers(&mut Unload(merge));
        self.base_model
    }

    /// Writes every adapter: `default` into `dir`, any other under `dir/<name>/` (peft's
    /// `save_pretrained`), each as `adapter_config.json` + `adapter_model.safetensors`.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        for name in self.peft_config.keys() {
            let out = if name == DEFAULT_ADAPTER {
                dir.to_owned()
            } else {
                dir.join(name)
            };
            self.save_adapter(name, &out)?;
        }
        Ok(())
    }

    /// Writes one adapter into `dir`.
    pub fn save_adapter(&self, adapter_name: &str, dir: &Path) -> Result<()> {
        let mut config = self
            .peft_config
            .get(adapter_name)
            .ok_or_else(|| PeftError::UnknownAdapter {
                name: adapter_name.to_owned(),
                known: self.adapter_names(),
            })?
            .clone();
        config.set_inference_mode(true);
        std::fs::create_dir_all(dir).map_err(|source| PeftError::Io {
            path: dir.to_owned(),
            source,
        })?;
        io::write_weights(dir, &self.adapter_state_dict(adapter_name))?;
        let encoder = dir.join(io::PROMPT_ENCODER_NAME);
        match self.prompt_encoder_state(adapter_name) {
            Some(state) => io::write_safetensors(&encoder, &state)?,
            None if encoder.is_file() => {
                std::fs::remove_file(&encoder).map_err(|source| PeftError::Io {
                    path: encoder.clone(),
                    source,
                })?;
            }
            None => {}
        }
        io::write_config(dir, &config.to_value())
    }

    /// The whole prompt encoder of adapter `adapter_name` under PyTorch's names, when it has
    /// more than the table peft's file holds (P-tuning, projected prefix tuning).
    pub fn prompt_encoder_state(&self, adapter_name: &str) -> Option<io::AdapterTensors> {
        struct Find<'a> {
            name: &'a str,
            state: Option<io::AdapterTensors>,
        }
        impl<B: Backend> LayerVisitor<B> for Find<'_> {
            fn projection(&mut self, _: &str, _: &mut Projection<B>) {}
            fn embedding(&mut self, _: &str, layer: &mut TokenEmbedding<B>) {
                if let Some(p) = layer.adapter(self.name).and_then(|a| a.prompt.as_ref()) {
                    if p.kind != crate::prompt::EncoderKind::Table {
                        self.state = Some(p.state_dict());
                    }
                }
            }
        }
        let mut find = Find {
            name: adapter_name,
            state: None,
        };
        self.base_model.clone().visit_layers(&mut find);
        find.state
    }

    /// The tensors of one adapter by file key, in peft's layout (`get_peft_model_state_dict`).
    pub fn adapter_state_dict(&self, adapter_name: &str) -> io::AdapterTensors {
        let mut collector = SlotCollector {
            walk: self.slot_walk(adapter_name),
            tensors: io::AdapterTensors::new(),
        };
        self.base_model.clone().visit_layers(&mut collector);
        collector.tensors
    }

    /// Every parameter with peft's name and whether it is trained.
    pub fn named_parameters(&self) -> Vec<PeftParam> {
        let mut lister = ParamLister {
            prefix: self.key_prefix().to_owned(),
            trainable: self.trainable_ids(),
            params: Vec::new(),
        };
        self.base_model.clone().visit_layers(&mut lister);
        lister.params
    }

    /// The model's leaf modules by HF path, type and shapes (`named_modules()`), before
    /// adapters.
    pub fn named_modules(&self) -> Vec<ModuleInfo> {
        named_modules(&self.base_model)
    }

    /// `(trainable, all)` parameter counts, as peft's `get_nb_trainable_parameters`.
    pub fn get_nb_trainable_parameters(&self) -> (usize, usize) {
        let params = self.named_parameters();
        let count = |p: &PeftParam| p.shape.iter().product::<usize>();
        (
            params.iter().filter(|p| p.trainable).map(count).sum(),
            params.iter().map(count).sum(),
        )
    }

    /// peft's `print_trainable_parameters` line:
    /// `trainable params: 1,234 || all params: 56,789 || trainable%: 2.1730`.
    pub fn trainable_parameters_line(&self) -> String {
        let (trainable, all) = self.get_nb_trainable_parameters();
        format!(
            "trainable params: {} || all params: {} || trainable%: {:.4}",
            thousands(trainable),
            thousands(all),
            100.0 * trainable as f64 / all.max(1) as f64
        )
    }

    /// Prints [`PeftModel::trainable_parameters_line`].
    pub fn print_trainable_parameters(&self) {
        println!("{}", self.trainable_parameters_line());
    }

    /// Reads new values for every adapter from a folder that `save_pretrained` wrote, keeping
    /// parameter ids (the Trainer's resume): `default` from `dir`, others from `dir/<name>/`.
    pub fn load_adapter_weights(&mut self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let mut model = self.base_model.clone();
        for name in self.peft_config.keys() {
            let folder = if name == DEFAULT_ADAPTER {
                dir.to_owned()
            } else {
                dir.join(name)
            };
            let (file, tensors) = io::read_weights(&folder)?;
            let encoder_file = folder.join(io::PROMPT_ENCODER_NAME);
            let encoder = if encoder_file.is_file() {
                Some((io::read_tensors(&encoder_file)?, encoder_file))
            } else {
                None
            };
            let mut filler = Filler {
                walk: self.slot_walk(name),
                encoder,
                tensors: &tensors,
                used: BTreeSet::new(),
                file,
                error: None,
            };
            model.visit_layers(&mut filler);
            if let Some(e) = filler.error {
                return Err(e);
            }
        }
        self.base_model = model;
        Ok(())
    }

    /// Gives every adapter parameter an id derived from its peft name (FNV-1a), the same in
    /// every process, so that saved optimizer state finds its parameters. The base model's
    /// ids are the caller's (see the models' `with_stable_param_ids`).
    pub fn with_stable_adapter_ids(mut self) -> Self {
        struct Ids;
        fn id(name: &str) -> ParamId {
            ParamId::from(name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
            }))
        }
        impl<B: Backend> LayerVisitor<B> for Ids {
            fn projection(&mut self, path: &str, layer: &mut Projection<B>) {
                for a in &mut layer.adapters {
                    let p = format!("{}{path}", io::KEY_PREFIX);
                    let n = a.name.clone();
                    if let Some(l) = &mut a.lora {
                        l.lora_a.id = id(&format!("{p}.lora_A.{n}.weight"));
                        l.lora_b.id = id(&format!("{p}.lora_B.{n}.weight"));
                    }
                    if let Some(v) = &mut a.ia3 {
                        v.ia3_l.id = id(&format!("{p}.ia3_l.{n}"));
                    }
                    if let Some(c) = &mut a.copy {
                        c.weight.id = id(&format!("{p}.modules_to_save.{n}.weight"));
                        if let Some(b) = &mut c.bias {
                            b.id = id(&format!("{p}.modules_to_save.{n}.bias"));
                        }
                    }
                }
            }
            fn embedding(&mut self, path: &str, layer: &mut TokenEmbedding<B>) {
                for a in &mut layer.adapters {
                    let p = format!("{}{path}", io::KEY_PREFIX);
                    let n = a.name.clone();
                    if let Some(l) = &mut a.lora {
                        l.lora_embedding_a.id = id(&format!("{p}.lora_embedding_A.{n}"));
                        l.lora_embedding_b.id = id(&format!("{p}.lora_embedding_B.{n}"));
                    }
                    if let Some(c) = &mut a.copy {
                        c.weight.id = id(&format!("{p}.modules_to_save.{n}.weight"));
                    }
                    if let Some(prompt) = &mut a.prompt {
                        for (name, mut param) in prompt.params_mut() {
                            param.set_id(id(&format!("prompt_encoder.{n}.{name}")));
                        }
                    }
                }
            }
        }
        self.base_model.visit_layers(&mut Ids);
        self
    }

    /// The `bias` setting of an adapter.
    fn bias_of(&self, name: &str) -> Bias {
        match self.peft_config.get(name) {
            Some(PeftConfig::Lora(c)) => c.bias,
            _ => Bias::None,
        }
    }

    fn for_each_state(&mut self, f: impl FnMut(&mut crate::adapter::AdapterState)) {
        struct States<F>(F);
        impl<B: Backend, F: FnMut(&mut crate::adapter::AdapterState)> LayerVisitor<B> for States<F> {
            fn projection(&mut self, _: &str, layer: &mut Projection<B>) {
                (self.0)(&mut layer.state);
            }
            fn embedding(&mut self, _: &str, layer: &mut TokenEmbedding<B>) {
                (self.0)(&mut layer.state);
            }
        }
        self.base_model.visit_layers(&mut States(f));
    }

    /// Sets the active adapter on every layer and which parameters take gradients: the active
    /// adapter's tensors (and the biases its `bias` names) unless it is in inference mode;
    /// nothing of the base model.
    fn refresh(&mut self) {
        let active = self.active_adapter.clone();
        self.for_each_state(|s| s.active = vec![active.clone()]);
        self.base_model = self.base_model.clone().no_grad();
        let Some(config) = self.peft_config.get(&active) else {
            return;
        };
        if config.inference_mode() {
            return;
        }
        let mut trainer = self.trainable_walk();
        self.base_model.visit_layers(&mut trainer);
    }

    fn trainable_walk(&self) -> Trainable {
        Trainable {
            slots: self.slot_walk(&self.active_adapter),
            ids: BTreeSet::new(),
        }
    }

    /// How the tensors of adapter `name` are found and keyed.
    fn slot_walk(&self, name: &str) -> SlotWalk {
        SlotWalk {
            name: name.to_owned(),
            bias: self.bias_of(name),
            prefix: self.key_prefix(),
        }
    }

    /// The prefix of the model's parameter keys in peft's files and names: the tuner's
    /// `base_model.model.`, or for prompt learning (no tuner: `base_model` is the model itself)
    /// `base_model.`.
    fn key_prefix(&self) -> &'static str {
        if self
            .peft_config
            .values()
            .any(PeftConfig::is_prompt_learning)
        {
            io::PROMPT_KEY_PREFIX
        } else {
            io::KEY_PREFIX
        }
    }

    /// The ids of the parameters that train: the active adapter's, unless it was loaded for
    /// inference.
    fn trainable_ids(&self) -> BTreeSet<ParamId> {
        match self.peft_config.get(&self.active_adapter) {
            Some(c) if !c.inference_mode() => {
                let mut t = self.trainable_walk();
                self.base_model.clone().visit_layers(&mut t);
                t.ids
            }
            _ => BTreeSet::new(),
        }
    }
}

/// Formats `1234567` as `1,234,567`.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The leaf modules of any adaptable model by HF path.
pub fn named_modules<B: Backend, M: AdaptableModel<B>>(model: &M) -> Vec<ModuleInfo> {
    let mut lister = ModuleLister {
        modules: Vec::new(),
    };
    model.clone().visit_layers(&mut lister);
    lister.modules
}

fn placeholder_projection<B: Backend>(layer: &Projection<B>) -> Projection<B> {
    let mut p = Projection::new(layer.base.clone());
    p.quantized = layer.quantized.clone();
    p
}

fn placeholder_embedding<B: Backend>(layer: &TokenEmbedding<B>) -> TokenEmbedding<B> {
    TokenEmbedding::new(layer.base.clone())
}

/// The outermost module on `path` (the path itself or an ancestor) that a `modules_to_save`
/// entry names: an exact name or a `.`-suffix, as target lists match.
pub(crate) fn wrapper_of(path: &str, entries: &[String]) -> Option<String> {
    let parts: Vec<&str> = path.split('.').collect();
    (1..=parts.len()).find_map(|n| {
        let prefix = parts[..n].join(".");
        entries
            .iter()
            .any(|e| prefix == *e || prefix.ends_with(&format!(".{e}")))
            .then_some(prefix)
    })
}

/// A copy of `param` under a new id, taking gradients.
fn fresh_copy<B: Backend, const D: usize>(param: &Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
    Param::initialized(ParamId::new(), param.val().detach().require_grad())
}

/// Adds one adapter to every layer its config selects (peft's `inject_adapter`).
struct Injector {
    name: String,
    /// What LoRA / IA3 adapt; `None` for prompt learning.
    selector: Option<TargetSelector>,
    kind: InjectKind,
    modules_to_save: Vec<String>,
    /// Whether some target matched.
    found: bool,
    /// `modules_to_save` entries that matched.
    saved_found: BTreeSet<String>,
    error: Option<PeftError>,
}

enum InjectKind {
    Lora(LoraConfig),
    Ia3 {
        config: IA3Config,
        feedforward: Matcher,
    },
    Prompt(Box<PromptPlan>),
}

/// A prompt-learning adapter to add to the model's word embeddings.
struct PromptPlan {
    config: PeftConfig,
    dims: PromptDims,
    /// The token ids of `prompt_tuning_init_text` (TEXT init).
    init_ids: Option<Vec<usize>>,
    /// Build the table that the file about to be read fills.
    loading: bool,
}

impl Injector {
    fn new(
        name: &str,
        config: &PeftConfig,
        dims: Option<PromptDims>,
        loading: bool,
    ) -> Result<Self> {
        if let Some(dims) = dims {
            let init_ids = if loading {
                None
            } else {
                crate::prompt::init_token_ids(config, &dims)?
            };
            return Ok(Self {
                name: name.to_owned(),
                selector: None,
                kind: InjectKind::Prompt(Box::new(PromptPlan {
                    config: config.clone(),
                    dims,
                    init_ids,
                    loading,
                })),
                modules_to_save: config.modules_to_save().cloned().unwrap_or_default(),
                found: false,
                saved_found: BTreeSet::new(),
                error: None,
            });
        }
        let targets = config
            .target_modules()
            .expect("defaults were filled in")
            .clone();
        let (selector, kind) = match config {
            PeftConfig::Lora(c) => (
                TargetSelector::new(
                    &targets,
                    c.exclude_modules.as_ref(),
                    c.layers_to_transform.as_ref(),
                    c.layers_pattern.as_ref(),
                )?,
                InjectKind::Lora(c.clone()),
            ),
            PeftConfig::Ia3(c) => {
                let ff = c
                    .feedforward_modules
                    .clone()
                    .unwrap_or(crate::config::TargetModules::Names(Vec::new()));
                (
                    TargetSelector::new(&targets, c.exclude_modules.as_ref(), None, None)?,
                    InjectKind::Ia3 {
                        config: c.clone(),
                        feedforward: Matcher::new(&ff, "feedforward_modules")?,
                    },
                )
            }
            PeftConfig::PromptTuning(_) | PeftConfig::PTuning(_) | PeftConfig::PrefixTuning(_) => {
                return Err(PeftError::Config {
                    field: "peft_type".into(),
                    message:
                        "prompt learning needs the model's sizes (AdaptableModel::prompt_dims)"
                            .into(),
                })
            }
        };
        let selector = Some(selector);
        Ok(Self {
            name: name.to_owned(),
            selector,
            kind,
            modules_to_save: config.modules_to_save().cloned().unwrap_or_default(),
            found: false,
            saved_found: BTreeSet::new(),
            error: None,
        })
    }

    fn saved(&mut self, path: &str) -> bool {
        match wrapper_of(path, &self.modules_to_save) {
            Some(w) => {
                for e in &self.modules_to_save {
                    if w == *e || w.ends_with(&format!(".{e}")) {
                        self.saved_found.insert(e.clone());
                    }
                }
                true
            }
            None => false,
        }
    }

    fn selects(&self, path: &str) -> bool {
        self.selector.as_ref().is_some_and(|s| s.selects(path))
    }

    fn finish(self, config: &PeftConfig) -> Result<()> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let auto = matches!(
            config.task_type(),
            Some(TaskType::SeqCls | TaskType::TokenCls)
        );
        if let (false, InjectKind::Prompt(plan)) = (self.found, &self.kind) {
            return Err(PeftError::Config {
                field: "peft_type".into(),
                message: format!(
                    "the model has no word embedding table at `{}` for the prompt",
                    plan.dims.word_embeddings
                ),
            });
        }
        if !self.found {
            let mut message = if auto {
                "No modules were targeted for adaptation. This might be caused by a combination of mismatched target modules and excluded modules. Please check your `target_modules` and `exclude_modules` configuration. You may also have only targeted modules that are marked to be saved (`modules_to_save`).".to_owned()
            } else {
                format!(
                    "Target modules {} not found in the base model. Please check the target modules and try again.",
                    config.target_modules().map(|t| t.display()).unwrap_or_default()
                )
            };
            if let PeftConfig::Lora(c) = config {
                if let Some(l) = &c.layers_to_transform {
                    message.push_str(&format!(
                        " Note: You specified 'layers_to_transform': {:?}.",
                        l.to_vec()
                    ));
                }
                if let Some(p) = &c.layers_pattern {
                    message.push_str(&format!(
                        " You also specified 'layers_pattern': {}.",
                        p.to_vec().join(", ")
                    ));
                }
            }
            return Err(PeftError::TargetsNotFound { message });
        }
        for entry in &self.modules_to_save {
            let automatic = auto && CLASSIFIER_HEADS.contains(&entry.as_str());
            if !automatic && !self.saved_found.contains(entry) {
                return Err(PeftError::Config {
                    field: "modules_to_save".into(),
                    message: format!("`{entry}` names no module of the model"),
                });
            }
        }
        Ok(())
    }
}

impl<B: Backend> LayerVisitor<B> for Injector {
    fn projection(&mut self, path: &str, layer: &mut Projection<B>) {
        if self.saved(path) {
            // A trained copy of a quantized layer is a float layer (peft copies the module; a
            // 4-bit copy could not train).
            let copy = burn::nn::Linear {
                weight: Param::initialized(
                    ParamId::new(),
                    layer.base_weight().detach().require_grad(),
                ),
                bias: layer.base.bias.as_ref().map(fresh_copy),
            };
            layer.adapter_mut(&self.name).copy = Some(copy);
            return;
        }
        if !self.selects(path) {
            return;
        }
        self.found = true;
        let device = layer.base.weight.lazy_device();
        let [d_in, d_out] = layer.dims();
        let name = self.name.clone();
        match &self.kind {
            InjectKind::Lora(c) => {
                let (r, alpha) = c.rank_and_alpha(path);
                let init = match &c.init_lora_weights {
                    InitLoraWeights::Bool(true) => LoraInit::Default,
                    InitLoraWeights::Bool(false) => LoraInit::Random,
                    InitLoraWeights::Named(_) => LoraInit::Gaussian,
                };
                let lora = LoraLinear::new(
                    d_in,
                    d_out,
                    r,
                    c.scaling(r, alpha),
                    c.lora_dropout,
                    init,
                    &device,
                );
                layer.adapter_mut(&name).lora = Some(lora);
            }
            InjectKind::Prompt(_) => {}
            InjectKind::Ia3 {
                config,
                feedforward,
            } => {
                // peft tests `key.endswith(entry)` here, without a dot.
                let ff = feedforward.matches_suffix(path);
                let n = if ff { d_in } else { d_out };
                let l = if config.init_ia3_weights {
                    Tensor::ones([n], &device)
                } else {
                    Tensor::random([n], Distribution::Normal(0.0, 1.0), &device)
                };
                layer.adapter_mut(&name).ia3 = Some(Ia3Vector {
                    ia3_l: Param::from_tensor(l),
                    feedforward: ff,
                });
            }
        }
    }

    fn embedding(&mut self, path: &str, layer: &mut TokenEmbedding<B>) {
        if self.saved(path) {
            let copy = burn::nn::Embedding {
                weight: fresh_copy(&layer.base.weight),
            };
            layer.adapter_mut(&self.name).copy = Some(copy);
            return;
        }
        if let InjectKind::Prompt(plan) = &self.kind {
            if path == plan.dims.word_embeddings {
                self.found = true;
                let table = layer.base.weight.val();
                match crate::prompt::new_encoder(
                    &plan.config,
                    &plan.dims,
                    table,
                    plan.init_ids.as_deref(),
                    plan.loading,
                ) {
                    Ok(encoder) => layer.adapter_mut(&self.name).prompt = Some(encoder),
                    Err(e) => {
                        self.error.get_or_insert(e);
                    }
                }
            }
            return;
        }
        if !self.selects(path) {
            return;
        }
        let device = layer.base.weight.lazy_device();
        let [n, d] = layer.dims();
        match &self.kind {
            InjectKind::Lora(c) => {
                self.found = true;
                let (r, alpha) = c.rank_and_alpha(path);
                let random = c.init_lora_weights == InitLoraWeights::Bool(false);
                let lora = LoraEmbedding::new(n, d, r, c.scaling(r, alpha), random, &device);
                layer.adapter_mut(&self.name).lora = Some(lora);
            }
            InjectKind::Prompt(_) => {}
            InjectKind::Ia3 { .. } => {
                self.error.get_or_insert(PeftError::UnsupportedModule {
                    path: path.to_owned(),
                    kind: "Embedding".into(),
                    message: "IA3 adapts linear layers only".into(),
                });
            }
        }
    }

    fn module(&mut self, path: &str, kind: &str) {
        let targeted = self.selects(path);
        if targeted || wrapper_of(path, &self.modules_to_save).is_some() {
            self.error.get_or_insert(PeftError::UnsupportedModule {
                path: path.to_owned(),
                kind: kind.to_owned(),
                message: if targeted {
                    "Target module is not supported. Currently, only linear layers and embeddings are supported.".into()
                } else {
                    "modules_to_save can copy linear layers and embeddings only".into()
                },
            });
        }
    }
}

/// The slots of one adapter in every layer.
struct SlotWalk {
    name: String,
    bias: Bias,
    prefix: &'static str,
}

impl SlotWalk {
    fn projection<'a, B: Backend>(
        &self,
        path: &str,
        layer: &'a mut Projection<B>,
    ) -> (Vec<Slot<'a, B>>, Vec<Alias>) {
        projection_slots(self.prefix, path, layer, &self.name, self.bias)
    }

    fn embedding<'a, B: Backend>(
        &self,
        path: &str,
        layer: &'a mut TokenEmbedding<B>,
    ) -> Vec<Slot<'a, B>> {
        embedding_slots(self.prefix, path, layer, &self.name)
    }

    /// A bias outside projections, saved with `bias = "all"`.
    fn param<'a, B: Backend>(
        &self,
        key: &str,
        param: &'a mut Param<Tensor<B, 1>>,
    ) -> Option<Slot<'a, B>> {
        (self.bias == Bias::All && key.ends_with("bias")).then(|| Slot::Vector {
            key: format!("{}{key}", self.prefix),
            file_shape: param.lazy_shape().to_vec(),
            param,
        })
    }
}

/// Reads one adapter's tensors.
struct SlotCollector {
    walk: SlotWalk,
    tensors: io::AdapterTensors,
}

impl SlotCollector {
    fn walk(&self) -> &SlotWalk {
        &self.walk
    }

    fn take<B: Backend>(&mut self, slots: Vec<Slot<'_, B>>) {
        for s in slots {
            self.tensors
                .insert(s.key().to_owned(), (s.file_shape(), s.read()));
        }
    }
}

impl<B: Backend> LayerVisitor<B> for SlotCollector {
    fn projection(&mut self, path: &str, layer: &mut Projection<B>) {
        let (slots, aliases) = self.walk().projection(path, layer);
        self.take(slots);
        for a in aliases {
            if let Some(t) = self.tensors.get(&a.of).cloned() {
                self.tensors.insert(a.key, t);
            }
        }
    }
    fn embedding(&mut self, path: &str, layer: &mut TokenEmbedding<B>) {
        if let Some(prompt) = layer
            .adapter(&self.walk.name)
            .and_then(|a| a.prompt.as_ref())
        {
            // peft saves the encoder's output (`get_prompt_embedding_to_save`).
            let out = prompt.output().into_data();
            let shape = out.shape.to_vec();
            let values = out.convert::<f32>().into_vec::<f32>().expect("f32 values");
            self.tensors
                .insert(io::PROMPT_EMBEDDINGS.to_owned(), (shape, values));
        }
        let slots = self.walk.embedding(path, layer);
        self.take(slots);
    }
    fn param(&mut self, key: &str, param: &mut Param<Tensor<B, 1>>) {
        let slot = self.walk.param(key, param);
        self.take(slot.into_iter().collect());
    }
}

/// Writes one adapter's tensors from a file, checking every shape.
struct Filler<'t> {
    walk: SlotWalk,
    /// The whole prompt encoder (Ember's `prompt_encoder.safetensors`) and its path: a
    /// P-tuning or projected prefix encoder is restored as it was rather than replaced by its
    /// output.
    encoder: Option<(io::AdapterTensors, std::path::PathBuf)>,
    tensors: &'t io::AdapterTensors,
    used: BTreeSet<String>,
    file: std::path::PathBuf,
    error: Option<PeftError>,
}

impl Filler<'_> {
    fn walk(&self) -> &SlotWalk {
        &self.walk
    }

    /// Puts peft's `prompt_embeddings` into the prompt adapter of `layer`, as the table it
    /// becomes when peft loads a file.
    fn fill_prompt<B: Backend>(&mut self, layer: &mut TokenEmbedding<B>) {
        let name = self.walk.name.clone();
        let Some(adapter) = layer.adapters.iter_mut().find(|a| a.name == name) else {
            return;
        };
        let Some(mut prompt) = adapter.prompt.take() else {
            return;
        };
        let key = io::PROMPT_EMBEDDINGS.to_owned();
        if let Some((state, file)) = &self.encoder {
            if prompt.kind != crate::prompt::EncoderKind::Table {
                if let Err(e) = prompt.load_state_dict(state, "", file) {
                    self.error.get_or_insert(e);
                }
                adapter.prompt = Some(prompt);
                self.used.insert(key);
                return;
            }
        }
        let expected = prompt.saved_shape();
        let result = match self.tensors.get(&key) {
            None => Err(PeftError::MissingKey {
                path: self.file.clone(),
                key: key.clone(),
            }),
            Some((shape, _)) if *shape != expected => Err(PeftError::ShapeMismatch {
                path: self.file.clone(),
                key: key.clone(),
                found: shape.clone(),
                expected,
            }),
            Some((_, values)) => Ok(values.clone()),
        };
        match result {
            Ok(values) => {
                adapter.prompt = Some(prompt.into_table_of(values));
                self.used.insert(key);
            }
            Err(e) => {
                adapter.prompt = Some(prompt);
                self.error.get_or_insert(e);
            }
        }
    }

    fn fill<B: Backend>(&mut self, slots: Vec<Slot<'_, B>>) {
        for mut s in slots {
            if self.error.is_some() {
                return;
            }
            let key = s.key().to_owned();
            let Some((shape, values)) = self.tensors.get(&key) else {
                self.error = Some(PeftError::MissingKey {
                    path: self.file.clone(),
                    key,
                });
                return;
            };
            let expected = s.file_shape();
            if *shape != expected {
                self.error = Some(PeftError::ShapeMismatch {
                    path: self.file.clone(),
                    key,
                    found: shape.clone(),
                    expected,
                });
                return;
            }
            s.write(values.clone());
            self.used.insert(key);
        }
    }
}

impl<B: Backend> LayerVisitor<B> for Filler<'_> {
    fn projection(&mut self, path: &str, layer: &mut Projection<B>) {
        let (slots, aliases) = self.walk().projection(path, layer);
        self.fill(slots);
        for a in aliases {
            if self.tensors.contains_key(&a.key) {
                self.used.insert(a.key);
            }
        }
    }
    fn embedding(&mut self, path: &str, layer: &mut TokenEmbedding<B>) {
        self.fill_prompt(layer);
        let slots = self.walk.embedding(path, layer);
        self.fill(slots);
    }
    fn param(&mut self, key: &str, param: &mut Param<Tensor<B, 1>>) {
        let slot = self.walk().param(key, param);
        self.fill(slot.into_iter().collect());
    }
}

/// Turns gradients on for one adapter's tensors and records their ids (which parameters
/// are trainable does not depend on the backend tracking gradients).
struct Trainable {
    slots: SlotWalk,
    ids: BTreeSet<ParamId>,
}

impl Trainable {
    fn train<B: Backend>(&mut self, slots: Vec<Slot<'_, B>>) {
        for s in slots {
            match s {
                Slot::Vector { param, .. } => {
                    self.ids.insert(param.id);
                    *param = param.clone().set_require_grad(true);
                }
                Slot::Matrix { param, .. } => {
                    self.ids.insert(param.id);
                    *param = param.clone().set_require_grad(true);
                }
            }
        }
    }
}

impl<B: Backend> LayerVisitor<B> for Trainable {
    fn projection(&mut self, path: &str, layer: &mut Projection<B>) {
        let (slots, _) = self.slots.projection(path, layer);
        // A copied layer's original bias is saved with `bias = "all"` but not trained.
        let slots = slots
            .into_iter()
            .filter(|s| !s.key().ends_with("original_module.bias"))
            .collect();
        self.train(slots);
    }
    fn embedding(&mut self, path: &str, layer: &mut TokenEmbedding<B>) {
        let name = self.slots.name.clone();
        if let Some(prompt) = layer
            .adapters
            .iter_mut()
            .find(|a| a.name == name)
            .and_then(|a| a.prompt.as_mut())
        {
            for (_, mut p) in prompt.params_mut() {
                self.ids.insert(p.id());
                p.train();
            }
        }
        let slots = self.slots.embedding(path, layer);
        self.train(slots);
    }
    fn param(&mut self, key: &str, param: &mut Param<Tensor<B, 1>>) {
        let slot = self.slots.param(key, param);
        self.train(slot.into_iter().collect());
    }
}

/// Lists every parameter with peft's in-memory names.
struct ParamLister {
    prefix: String,
    trainable: BTreeSet<ParamId>,
    params: Vec<PeftParam>,
}

impl ParamLister {
    fn push<B: Backend, const D: usize>(&mut self, name: String, p: &Param<Tensor<B, D>>) {
        self.params.push(PeftParam {
            name,
            id: p.id,
            shape: p.lazy_shape().to_vec(),
            trainable: self.trainable.contains(&p.id),
        });
    }
}

impl<B: Backend> LayerVisitor<B> for ParamLister {
    fn projection(&mut self, path: &str, layer: &mut Projection<B>) {
        let p = format!("{}{path}", self.prefix);
        let wrapped = !layer.adapters.is_empty();
        let base = if wrapped {
            if layer.adapters.iter().any(|a| a.copy.is_some()) {
                format!("{p}.original_module")
            } else {
                format!("{p}.base_layer")
            }
        } else {
            p.clone()
        };
        match &layer.quantized {
            // peft counts a 4-bit parameter as the weights it packs (`Params4bit` numel x 2).
            Some(q) => {
                let [d_in, d_out] = q.dims();
                self.params.push(PeftParam {
                    name: format!("{base}.weight"),
                    id: layer.base.weight.id,
                    shape: vec![d_in, d_out],
                    trainable: false,
                });
            }
            None => self.push(format!("{base}.weight"), &layer.base.weight),
        }
        if let Some(b) = &layer.base.bias {
            self.push(format!("{base}.bias"), b);
        }
        for a in &layer.adapters {
            let n = &a.name;
            if let Some(l) = &a.lora {
                self.push(format!("{p}.lora_A.{n}.weight"), &l.lora_a);
                self.push(format!("{p}.lora_B.{n}.weight"), &l.lora_b);
            }
            if let Some(v) = &a.ia3 {
                self.push(format!("{p}.ia3_l.{n}"), &v.ia3_l);
            }
            if let Some(c) = &a.copy {
                self.push(format!("{p}.modules_to_save.{n}.weight"), &c.weight);
                if let Some(b) = &c.bias {
                    self.push(format!("{p}.modules_to_save.{n}.bias"), b);
                }
            }
        }
    }

    fn embedding(&mut self, path: &str, layer: &mut TokenEmbedding<B>) {
        let p = format!("{}{path}", self.prefix);
        let wrapped = layer
            .adapters
            .iter()
            .any(|a| a.lora.is_some() || a.copy.is_some());
        let base = match (!wrapped, layer.adapters.iter().any(|a| a.copy.is_some())) {
            (true, _) => p.clone(),
            (false, true) => format!("{p}.original_module"),
            (false, false) => format!("{p}.base_layer"),
        };
        self.push(format!("{base}.weight"), &layer.base.weight);
        for a in &layer.adapters {
            let n = &a.name;
            if let Some(l) = &a.lora {
                self.push(format!("{p}.lora_embedding_A.{n}"), &l.lora_embedding_a);
                self.push(format!("{p}.lora_embedding_B.{n}"), &l.lora_embedding_b);
            }
            if let Some(c) = &a.copy {
                self.push(format!("{p}.modules_to_save.{n}.weight"), &c.weight);
            }
        }
        // peft names a prompt encoder `prompt_encoder.<adapter>.<name>`, outside the model.
        for a in &mut layer.adapters {
            let n = a.name.clone();
            if let Some(prompt) = &mut a.prompt {
                for (name, p) in prompt.params_mut() {
                    self.params.push(PeftParam {
                        name: format!("prompt_encoder.{n}.{name}"),
                        id: p.id(),
                        shape: p.shape(),
                        trainable: self.trainable.contains(&p.id()),
                    });
                }
            }
        }
    }

    fn param(&mut self, key: &str, param: &mut Param<Tensor<B, 1>>) {
        self.push(format!("{}{key}", self.prefix), param);
    }
}
