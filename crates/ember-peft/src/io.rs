//! peft's files: `adapter_config.json` and `adapter_model.safetensors` (or
//! `adapter_model.bin`), tensors keyed `base_model.model.<module>.<tensor>` with no adapter
//! name, written atomically.

use crate::error::{PeftError, Result};
use burn::tensor::DType;
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::Path;

/// `adapter_config.json`.
pub const CONFIG_NAME: &str = "adapter_config.json";
/// `adapter_model.safetensors`.
pub const WEIGHTS_NAME: &str = "adapter_model.safetensors";
/// `adapter_model.bin` (read only).
pub const BIN_WEIGHTS_NAME: &str = "adapter_model.bin";
/// The prefix of every key: peft's `PeftModel.base_model` (the tuner) and its `.model`.
pub const KEY_PREFIX: &str = "base_model.model.";
/// The prefix of a prompt-learning adapter's model keys (`modules_to_save`): there is no tuner,
/// `PeftModel.base_model` is the model itself.
pub const PROMPT_KEY_PREFIX: &str = "base_model.";
/// The one key of a prompt-learning adapter's own tensor: the prompt encoder's output.
pub const PROMPT_EMBEDDINGS: &str = "prompt_embeddings";
/// Ember's extra file beside a prompt-learning adapter whose encoder has more than a table
/// (P-tuning, projected prefix tuning): the whole encoder under PyTorch's names, so that a
/// Trainer checkpoint resumes exactly (peft's file holds only the encoder's output).
pub const PROMPT_ENCODER_NAME: &str = "prompt_encoder.safetensors";

/// Tensors by key: shape and f32 values in peft's layout.
pub type AdapterTensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Reads an adapter folder's weights: `adapter_model.safetensors`, else `adapter_model.bin`.
pub fn read_weights(dir: &Path) -> Result<(std::path::PathBuf, AdapterTensors)> {
    let st = dir.join(WEIGHTS_NAME);
    if st.is_file() {
        return Ok((st.clone(), read_safetensors(&st)?));
    }
    let bin = dir.join(BIN_WEIGHTS_NAME);
    if bin.is_file() {
        return Ok((bin.clone(), read_pytorch(&bin)?));
    }
    Err(PeftError::Format {
        path: dir.to_owned(),
        message: format!("neither {WEIGHTS_NAME} nor {BIN_WEIGHTS_NAME} in this folder"),
    })
}

fn read_safetensors(path: &Path) -> Result<AdapterTensors> {
    let bytes = std::fs::read(path).map_err(|source| PeftError::Io {
        path: path.to_owned(),
        source,
    })?;
    let bad = |message: String| PeftError::Format {
        path: path.to_owned(),
        message,
    };
    let tensors = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let mut out = AdapterTensors::new();
    for (key, view) in tensors.tensors() {
        let data = view.data();
        let Some(values) = float_values(view.dtype(), data) else {
            let dtype = view.dtype();
            return Err(bad(format!("tensor `{key}` has dtype {dtype:?}")));
        };
        out.insert(key, (view.shape().to_vec(), values));
    }
    Ok(out)
}

fn read_pytorch(path: &Path) -> Result<AdapterTensors> {
    let bad = |message: String| PeftError::Format {
        path: path.to_owned(),
        message,
    };
    let reader = burn_store::pytorch::PytorchReader::new(path).map_err(|e| bad(e.to_string()))?;
    let mut out = AdapterTensors::new();
    for (key, snapshot) in reader.into_tensors() {
        let data = snapshot
            .to_data()
            .map_err(|e| bad(format!("tensor `{key}`: {e:?}")))?;
        if !matches!(
            data.dtype,
            DType::F32 | DType::F16 | DType::BF16 | DType::F64
        ) {
            return Err(bad(format!("tensor `{key}` has dtype {:?}", data.dtype)));
        }
        let shape = data.shape.to_vec();
        let values = data
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| bad(format!("tensor `{key}`: {e:?}")))?;
        out.insert(key, (shape, values));
    }
    Ok(out)
}

/// The f32 values of a float tensor's little-endian bytes (F32, F16 or BF16, as safetensors
/// stores them); `None` for another dtype.
pub fn float_values(dtype: Dtype, data: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

/// Writes `tensors` as `dir/adapter_model.safetensors` (f32, `{"format": "pt"}` metadata).
pub fn write_weights(dir: &Path, tensors: &AdapterTensors) -> Result<()> {
    write_safetensors(&dir.join(WEIGHTS_NAME), tensors)
}

/// Reads a safetensors file of f32 / f16 / bf16 tensors.
pub fn read_tensors(path: &Path) -> Result<AdapterTensors> {
    read_safetensors(path)
}

/// Writes `tensors` as the safetensors file `path` (f32, `{"format": "pt"}` metadata).
pub fn write_safetensors(path: &Path, tensors: &AdapterTensors) -> Result<()> {
    let path = path.to_owned();
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(k, (shape, values))| {
            (
                k.clone(),
                values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                shape.clone(),
            )
        })
        .collect();
    let bad = |message: String| PeftError::Format {
        path: path.clone(),
        message,
    };
    let views = bytes
        .iter()
        .map(|(k, data, shape)| {
            safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), data)
                .map(|v| (k.clone(), v))
                .map_err(|e| bad(format!("tensor `{k}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_owned(),
        "pt".to_owned(),
    )]));
    let out = safetensors::serialize(views, metadata).map_err(|e| bad(e.to_string()))?;
    write_atomic(&path, &out)
}

/// Writes `dir/adapter_config.json`.
pub fn write_config(dir: &Path, config: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(config).expect("JSON values serialize");
    write_atomic(&dir.join(CONFIG_NAME), text.as_bytes())
}

/// Writes a file under a temporary name in the same folder, then renames it into place.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| PeftError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })
}
