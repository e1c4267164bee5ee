//! [`Accelerator::save_state`] / [`Accelerator::load_state`]: the model's weights as
//! safetensors, the optimizer's record and each rank's random state, written atomically.

use super::Accelerator;
use crate::error::{Result, TrainError};
use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::Optimizer;
use burn::record::{FullPrecisionSettings, NamedMpkBytesRecorder, Recorder};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// accelerate's `SAFE_WEIGHTS_NAME`: the model's weights in a [`Accelerator::save_state`] folder.
pub const MODEL_FILE: &str = "model.safetensors";
/// accelerate's `OPTIMIZER_NAME`: the optimizer's state (burn's binary record).
pub const OPTIMIZER_FILE: &str = "optimizer.bin";
/// The safetensors metadata key holding each tensor's burn parameter id, so that a model
/// loaded in another process matches the optimizer state (keyed by parameter id).
const PARAM_IDS_KEY: &str = "ember.param_ids";

/// The name of rank `process_index`'s generator state in a [`Accelerator::save_state`] folder
/// (accelerate's `random_states_{i}.pkl`, here JSON).
pub fn random_states_file(process_index: usize) -> String {
    format!("random_states_{process_index}.json")
}

/// One rank's generator state as [`Accelerator::save_state`] writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RandomStates {
    /// The rank that wrote it.
    process_index: usize,
    /// The seed of [`Accelerator::set_seed`] (`None`: the backend's own entropy).
    seed: Option<u64>,
    /// accelerate's `step`: micro-steps counted for gradient accumulation.
    step: usize,
}

impl Accelerator {
    /// accelerate's `save_state(output_dir)`: rank 0 writes the model's weights
    /// ([`MODEL_FILE`], safetensors, keys the modules' field paths) and the optimizer's state
    /// ([`OPTIMIZER_FILE`]); every rank writes its own [`random_states_file`] (its seed and
    /// accelerate's `step`). Each file is written under a temporary name and renamed into
    /// place, so a crash mid-save never leaves a torn file. All ranks return once every rank
    /// has written, with an error on every rank when any failed.
    pub fn save_state<B, M, O>(&self, dir: impl AsRef<Path>, model: &M, optimizer: &O) -> Result<()>
    where
        B: AutodiffBackend,
        M: AutodiffModule<B>,
        O: Optimizer<M, B>,
    {
        let dir = dir.as_ref();
        let written = self.write_state(dir, model, optimizer);
        self.agree("save_state", written.is_ok())?;
        written
    }

    fn write_state<B, M, O>(&self, dir: &Path, model: &M, optimizer: &O) -> Result<()>
    where
        B: AutodiffBackend,
        M: AutodiffModule<B>,
        O: Optimizer<M, B>,
    {
        std::fs::create_dir_all(dir).map_err(|source| TrainError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let rank = self.process_index();
        if rank == 0 {
            write_atomic(&dir.join(MODEL_FILE), &model_safetensors(model)?, rank)?;
            let recorder = NamedMpkBytesRecorder::<FullPrecisionSettings>::default();
            let bytes = Recorder::<B>::record(&recorder, optimizer.to_record(), ())
                .map_err(|e| TrainError::Step(format!("saving the optimizer state: {e}")))?;
            write_atomic(&dir.join(OPTIMIZER_FILE), &bytes, rank)?;
        }
        let states = RandomStates {
            process_index: rank,
            seed: self.lock().seed,
            step: self.step,
        };
        let json = serde_json::to_vec_pretty(&states).expect("the random states serialize");
        write_atomic(&dir.join(random_states_file(rank)), &json, rank)
    }

    /// accelerate's `load_state(input_dir)`: `model` and `optimizer` with the state
    /// [`save_state`](Self::save_state) wrote (the parameters keep the ids they were saved
    /// with, so the optimizer state applies to them), and this rank's seed and `step`
    /// restored. Every rank reads; all fail when any does.
    ///
    /// Errors: [`TrainError::Io`] naming a missing file, [`TrainError::File`] naming a corrupt
    /// one or the tensor that is missing or has another shape.
    pub fn load_state<B, M, O>(
        &mut self,
        dir: impl AsRef<Path>,
        model: M,
        optimizer: O,
    ) -> Result<(M, O)>
    where
        B: AutodiffBackend,
        M: AutodiffModule<B>,
        O: Optimizer<M, B>,
    {
        let dir = dir.as_ref();
        let loaded = self.read_state(dir, model, optimizer);
        self.agree("load_state", loaded.is_ok())?;
        let (model, optimizer, states) = loaded?;
        self.step = states.step;
        self.lock().seed = states.seed;
        self.accumulated = None;
        Ok((model, optimizer))
    }

    #[allow(clippy::type_complexity)]
    fn read_state<B, M, O>(
        &self,
        dir: &Path,
        model: M,
        optimizer: O,
    ) -> Result<(M, O, RandomStates)>
    where
        B: AutodiffBackend,
        M: AutodiffModule<B>,
        O: Optimizer<M, B>,
    {
        let read =
            |path: PathBuf| std::fs::read(&path).map_err(|source| TrainError::Io { path, source });
        let model_path = dir.join(MODEL_FILE);
        let model = load_model_safetensors(model, &read(model_path.clone())?, &model_path)?;
        let device = model.devices().into_iter().next().unwrap_or_default();
        let optimizer_path = dir.join(OPTIMIZER_FILE);
        let recorder = NamedMpkBytesRecorder::<FullPrecisionSettings>::default();
        let record: O::Record =
            Recorder::<B>::load(&recorder, read(optimizer_path.clone())?, &device).map_err(
                |e| TrainError::File {
                    path: optimizer_path,
                    message: format!("not an optimizer state of this model: {e}"),
                },
            )?;
        let optimizer = optimizer.load_record(record);
        let states_path = dir.join(random_states_file(self.process_index()));
        let states: RandomStates =
            serde_json::from_slice(&read(states_path.clone())?).map_err(|e| TrainError::File {
                path: states_path,
                message: e.to_string(),
            })?;
        Ok((model, optimizer, states))
    }
}

/// Collects every float parameter under its field path (`encoder.0.weight`).
struct Collect {
    path: Vec<String>,
    tensors: Vec<(String, Vec<usize>, Vec<u8>, ParamId)>,
    error: Option<String>,
}

impl<B: Backend> ModuleVisitor<B> for Collect {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_owned());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let tensor = param.val();
        let shape = tensor.dims().to_vec();
        match tensor.into_data().convert::<f32>().into_vec::<f32>() {
            Ok(values) => self.tensors.push((
                self.path.join("."),
                shape,
                values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                param.id,
            )),
            Err(e) => self.error = Some(format!("{}: {e:?}", self.path.join("."))),
        }
    }
}

/// `model`'s float parameters as a safetensors file (f32; the parameter ids in the metadata).
fn model_safetensors<B: Backend, M: Module<B>>(model: &M) -> Result<Vec<u8>> {
    let mut collect = Collect {
        path: Vec::new(),
        tensors: Vec::new(),
        error: None,
    };
    model.visit(&mut collect);
    if let Some(e) = collect.error {
        return Err(TrainError::Step(format!("saving the model: {e}")));
    }
    let ids: HashMap<&str, u64> = collect
        .tensors
        .iter()
        .map(|(name, _, _, id)| (name.as_str(), id.val()))
        .collect();
    let metadata = HashMap::from([(
        PARAM_IDS_KEY.to_owned(),
        serde_json::to_string(&ids).expect("ids serialize"),
    )]);
    let views = collect
        .tensors
        .iter()
        .map(|(name, shape, bytes, _)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|view| (name.clone(), view))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| TrainError::Step(format!("saving the model: {e}")))?;
    safetensors::serialize(views, Some(metadata))
        .map_err(|e| TrainError::Step(format!("saving the model: {e}")))
}

/// Replaces every float parameter by the file's tensor of the same path.
struct Load<'a> {
    path: Vec<String>,
    file: &'a safetensors::SafeTensors<'a>,
    ids: HashMap<String, u64>,
    error: Option<String>,
}

impl<B: Backend> ModuleMapper<B> for Load<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_owned());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        if self.error.is_some() {
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let name = self.path.join(".");
        let view = match self.file.tensor(&name) {
            Ok(view) => view,
            Err(_) => {
                self.error = Some(format!("the model's tensor `{name}` is missing"));
                return Param::from_mapped_value(id, tensor, mapper);
            }
        };
        let shape = tensor.dims().to_vec();
        if view.dtype() != safetensors::Dtype::F32 || view.shape() != shape.as_slice() {
            self.error = Some(format!(
                "`{name}` is {:?} {:?}, the model's is F32 {shape:?}",
                view.dtype(),
                view.shape()
            ));
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let value = Tensor::<B, D>::from_data(TensorData::new(values, shape), &tensor.device())
            .cast(tensor.dtype())
            .set_require_grad(tensor.is_require_grad());
        let id = self
            .ids
            .get(&name)
            .map_or(id, |&saved| ParamId::from(saved));
        Param::from_mapped_value(id, value, mapper)
    }
}

fn load_model_safetensors<B: Backend, M: Module<B>>(
    model: M,
    bytes: &[u8],
    path: &Path,
) -> Result<M> {
    let invalid = |message: String| TrainError::File {
        path: path.to_owned(),
        message,
    };
    let (_, metadata) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| invalid(format!("not a safetensors file: {e}")))?;
    let ids: HashMap<String, u64> = match metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get(PARAM_IDS_KEY))
    {
        Some(json) => serde_json::from_str(json)
            .map_err(|e| invalid(format!("`{PARAM_IDS_KEY}` metadata: {e}")))?,
        None => HashMap::new(),
    };
    let file = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| invalid(format!("not a safetensors file: {e}")))?;
    let mut load = Load {
        path: Vec::new(),
        file: &file,
        ids,
        error: None,
    };
    let model = model.map(&mut load);
    match load.error {
        Some(message) => Err(invalid(message)),
        None => Ok(model),
    }
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], rank: usize) -> Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("state");
    let tmp = path.with_file_name(format!(".{name}.tmp-{}-{rank}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|source| TrainError::Io {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, path).map_err(|source| TrainError::Io {
        path: path.to_owned(),
        source,
    })
}
