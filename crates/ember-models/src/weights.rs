//! Reading a checkpoint's tensors by HF key: `model.safetensors`, a sharded
//! `model.safetensors.index.json`, or `pytorch_model.bin` (and its sharded index), in f32, f16
//! or bf16. Every tensor is converted to f32 on read.

use crate::error::{ModelError, Result};
use burn::tensor::{backend::Backend, DType, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The weight file names HF looks for in a checkpoint folder, in its order of preference.
pub const WEIGHT_FILES: [&str; 4] = [
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
];

/// One tensor of a checkpoint, as f32 values in row-major order; the packed codes of a
/// bitsandbytes checkpoint (U8, I8) are kept as their bytes instead.
struct Entry {
    shape: Vec<usize>,
    values: Vec<f32>,
    /// The bytes of an integer tensor that is not converted to f32 (`values` is then empty).
    raw: Option<(Dtype, Vec<u8>)>,
    file: PathBuf,
}

/// All tensors of a checkpoint, keyed as in the files. Remembers which keys were read, so that
/// the unused ones can be reported as HF does.
pub struct Weights {
    source: PathBuf,
    entries: BTreeMap<String, Entry>,
    used: RefCell<BTreeSet<String>>,
}

impl Weights {
    /// Finds and reads the weights of a checkpoint folder (see [`WEIGHT_FILES`]).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let Some(file) = WEIGHT_FILES
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.is_file())
        else {
            return Err(ModelError::NoWeights {
                dir: dir.to_owned(),
            });
        };
        Self::open(&file)
    }

    /// Reads one weights file: `.safetensors`, `.bin`, or an `.index.json` naming shards.
    pub fn open(path: &Path) -> Result<Self> {
        let mut entries = BTreeMap::new();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.ends_with(".index.json") {
            let dir = path.parent().unwrap_or(Path::new("."));
            for shard in shard_files(path)? {
                read_file(&dir.join(shard), &mut entries)?;
            }
        } else {
            read_file(path, &mut entries)?;
        }
        Ok(Self {
            source: path.to_owned(),
            entries,
            used: RefCell::default(),
        })
    }

    /// The file (or index) the weights came from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Every key, sorted.
    pub fn keys(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    /// Whether `key` is present.
    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    /// The shape of the tensor at `key`.
    pub fn shape(&self, key: &str) -> Option<&[usize]> {
        self.entries.get(key).map(|e| e.shape.as_slice())
    }

    /// The keys that no `get` has read yet.
    pub fn unused_keys(&self) -> Vec<String> {
        let used = self.used.borrow();
        self.entries
            .keys()
            .filter(|k| !used.contains(*k))
            .cloned()
            .collect()
    }

    /// Marks a key as read without reading it (a tied weight that duplicates another).
    pub fn mark_used(&self, key: &str) {
        if self.entries.contains_key(key) {
            self.used.borrow_mut().insert(key.to_owned());
        }
    }

    /// The entry at `key`, checked against `shape` and marked used.
    fn checked(&self, key: &str, shape: &[usize]) -> Result<&Entry> {
        let entry = self
            .entries
            .get(key)
            .ok_or_else(|| ModelError::MissingTensor {
                key: key.to_owned(),
                path: self.source.clone(),
            })?;
        if entry.shape != shape {
            return Err(ModelError::Shape {
                key: key.to_owned(),
                file: entry.file.clone(),
                found: entry.shape.clone(),
                expected: shape.to_vec(),
            });
        }
        self.used.borrow_mut().insert(key.to_owned());
        Ok(entry)
    }

    /// The f32 values at `key` (row-major), checked against `shape`.
    pub fn values(&self, key: &str, shape: &[usize]) -> Result<&[f32]> {
        let entry = self.checked(key, shape)?;
        if let Some((dtype, _)) = &entry.raw {
            return Err(ModelError::Dtype {
                key: key.to_owned(),
                dtype: format!("{dtype:?}"),
                path: entry.file.clone(),
            });
        }
        Ok(&entry.values)
    }

    /// The tensor at `key` as dtype, shape and little-endian bytes (f32 tensors as f32, packed
    /// codes as they are in the file), for `ember_quant`'s readers; marked used.
    pub fn tensor_ref(&self, key: &str) -> Option<ember_quant::TensorRef<'_>> {
        let entry = self.entries.get(key)?;
        self.used.borrow_mut().insert(key.to_owned());
        Some(match &entry.raw {
            Some((dtype, bytes)) => ember_quant::TensorRef {
                dtype: *dtype,
                shape: entry.shape.clone(),
                data: bytes,
            },
            None => ember_quant::TensorRef {
                dtype: Dtype::F32,
                shape: entry.shape.clone(),
                data: f32_bytes(&entry.values),
            },
        })
    }

    /// The tensor at `key`, checked against `shape`.
    pub fn get<B: Backend, const D: usize>(
        &self,
        key: &str,
        shape: [usize; D],
        device: &B::Device,
    ) -> Result<Tensor<B, D>> {
        let values = self.values(key, &shape)?;
        Ok(Tensor::from_data(
            TensorData::new(values.to_vec(), shape),
            device,
        ))
    }

    /// The 2-D tensor at `key` (stored `[rows, cols]`, checked against `shape`), transposed to
    /// `[cols, rows]` on the host so that the result is contiguous. A transposed view would send
    /// every matmul through another kernel path, which rounds differently from a model that
    /// never went through a file (a resumed run would drift from an uninterrupted one).
    pub fn get_transposed<B: Backend>(
        &self,
        key: &str,
        shape: [usize; 2],
        device: &B::Device,
    ) -> Result<Tensor<B, 2>> {
        let [rows, cols] = shape;
        let values = self.values(key, &shape)?;
        let mut out = vec![0f32; values.len()];
        for (r, row) in values.chunks_exact(cols).enumerate() {
            for (c, v) in row.iter().enumerate() {
                out[c * rows + r] = *v;
            }
        }
        Ok(Tensor::from_data(
            TensorData::new(out, [cols, rows]),
            device,
        ))
    }
}

/// The shard file names an `*.index.json` lists in its `weight_map`.
fn shard_files(index: &Path) -> Result<BTreeSet<String>> {
    let text = std::fs::read_to_string(index).map_err(|source| ModelError::Io {
        path: index.to_owned(),
        source,
    })?;
    let bad = |message: String| ModelError::Weights {
        path: index.to_owned(),
        message,
    };
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    map.iter()
        .map(|(key, file)| {
            file.as_str()
                .map(str::to_owned)
                .ok_or_else(|| bad(format!("`weight_map.{key}` is not a file name")))
        })
        .collect()
}

fn read_file(path: &Path, entries: &mut BTreeMap<String, Entry>) -> Result<()> {
    if path
        .extension()
        .is_some_and(|e| e == "bin" || e == "pt" || e == "pth")
    {
        read_pytorch(path, entries)
    } else {
        read_safetensors(path, entries)
    }
}

fn read_safetensors(path: &Path, entries: &mut BTreeMap<String, Entry>) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_owned(),
        source,
    })?;
    let tensors = SafeTensors::deserialize(&bytes).map_err(|e| ModelError::Weights {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    for (key, view) in tensors.tensors() {
        let data = view.data();
        // The packed codes of a bitsandbytes checkpoint: kept as bytes for `ember_quant`.
        if matches!(view.dtype(), Dtype::U8 | Dtype::I8) {
            entries.insert(
                key,
                Entry {
                    shape: view.shape().to_vec(),
                    values: Vec::new(),
                    raw: Some((view.dtype(), data.to_vec())),
                    file: path.to_owned(),
                },
            );
            continue;
        }
        let values: Vec<f32> = match view.dtype() {
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
            // Integer buffers (`position_ids`) are not parameters; keep them so they can be
            // reported as unused like any other key.
            Dtype::I64 => data
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
                .collect(),
            other => {
                return Err(ModelError::Dtype {
                    key,
                    dtype: format!("{other:?}"),
                    path: path.to_owned(),
                })
            }
        };
        entries.insert(
            key,
            Entry {
                shape: view.shape().to_vec(),
                values,
                raw: None,
                file: path.to_owned(),
            },
        );
    }
    Ok(())
}

fn read_pytorch(path: &Path, entries: &mut BTreeMap<String, Entry>) -> Result<()> {
    let reader =
        burn_store::pytorch::PytorchReader::new(path).map_err(|e| ModelError::Weights {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    for (key, snapshot) in reader.into_tensors() {
        let data = snapshot.to_data().map_err(|e| ModelError::Weights {
            path: path.to_owned(),
            message: format!("tensor `{key}`: {e:?}"),
        })?;
        let shape = data.shape.to_vec();
        let values: Vec<f32> = match data.dtype {
            DType::F32 | DType::F16 | DType::BF16 | DType::F64 | DType::I64 | DType::I32 => data
                .convert::<f32>()
                .into_vec::<f32>()
                .map_err(|e| ModelError::Weights {
                    path: path.to_owned(),
                    message: format!("tensor `{key}`: {e:?}"),
                })?,
            other => {
                return Err(ModelError::Dtype {
                    key,
                    dtype: format!("{other:?}"),
                    path: path.to_owned(),
                })
            }
        };
        entries.insert(
            key,
            Entry {
                shape,
                values,
                raw: None,
                file: path.to_owned(),
            },
        );
    }
    Ok(())
}

/// The bytes of f32 values as safetensors stores them (little-endian).
fn f32_bytes(values: &[f32]) -> &[u8] {
    #[cfg(target_endian = "little")]
    {
        // SAFETY: u8 has no alignment requirement and every byte of an f32 is initialised; the
        // slice covers exactly the values' memory and borrows it for as long as `values`. On a
        // little-endian machine these are the file's bytes.
        unsafe {
            std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values))
        }
    }
    #[cfg(not(target_endian = "little"))]
    compile_error!("Ember reads safetensors files on little-endian machines only");
}
