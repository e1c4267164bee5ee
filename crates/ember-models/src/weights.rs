//! Reading a checkpoint's tensors by HF key: `model.safetensors`, a sharded
//! `model.safetensors.index.json`, or `pytorch_model.bin` (and its sharded index), in f32, f16
//! or bf16. Every tensor is converted to f32 on read.

use crate::error::{ModelError, Result};
use burn::tensor::{backend::Backend, DType, Tensor, TensorData};
use safetensors::Dtype;
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};

/// The weight file names HF looks for in a checkpoint folder, in its order of preference.
pub const WEIGHT_FILES: [&str; 4] = [
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
];

/// How a linear weight read from a checkpoint lies in memory. burn's `Linear` multiplies by
/// `[in, out]`; HF files (and torch's `nn.Linear`) store `[out, in]`.
///
/// The values are the same either way; the order decides which product kernels read them
/// fastest (`docs/performance.md`, issue 19). Weights a model builds itself (from a config)
/// and weights an optimizer step writes are `InOut`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LinearLayout {
    /// Transposed while loading into a contiguous `[in, out]`: the layout an optimizer step
    /// writes, so a run resumed from a checkpoint rounds as the uninterrupted one did.
    #[default]
    InOut,
    /// The checkpoint's `[out, in]` order, which burn sees as `[in, out]` through a
    /// transposed view: each output's weights are contiguous, so decoding (one to eight rows)
    /// reads them as dot products, the faster product here, and loading skips a
    /// transposition. Causal LMs load this way.
    OutIn,
}

/// One tensor of a checkpoint.
struct Entry {
    shape: Vec<usize>,
    data: Data,
    file: PathBuf,
}

/// Where a tensor's values are.
enum Data {
    /// Read and converted to f32 when the file was opened (`pytorch_model.bin`).
    Values(Vec<f32>),
    /// Kept as the file's bytes: the packed codes (U8, I8) and the float scales of a
    /// bitsandbytes checkpoint, which `ember_quant` reads as they are.
    Raw(Dtype, Vec<u8>),
    /// Still in the safetensors file, at this byte range: read (and converted to f32) when a
    /// parameter asks for it, so that loading never holds the whole file and the whole model at
    /// once (nor, when quantizing while loading, every float weight).
    InFile {
        dtype: Dtype,
        start: u64,
        len: usize,
    },
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
    pub fn values(&self, key: &str, shape: &[usize]) -> Result<Cow<'_, [f32]>> {
        let entry = self.checked(key, shape)?;
        match &entry.data {
            Data::Values(values) => Ok(Cow::Borrowed(values)),
            Data::Raw(Dtype::F32, bytes) => {
                Ok(Cow::Owned(to_f32(key, Dtype::F32, bytes, &entry.file)?))
            }
            Data::Raw(dtype, _) => Err(ModelError::Dtype {
                key: key.to_owned(),
                dtype: format!("{dtype:?}"),
                path: entry.file.clone(),
            }),
            // f32 straight into its buffer: no second copy of the largest tensors (an
            // embedding table) at the peak of a load.
            Data::InFile {
                dtype: Dtype::F32,
                start,
                len,
            } => Ok(Cow::Owned(read_f32(&entry.file, *start, *len)?)),
            Data::InFile { dtype, start, len } => {
                let bytes = read_range(&entry.file, *start, *len)?;
                Ok(Cow::Owned(to_f32(key, *dtype, &bytes, &entry.file)?))
            }
        }
    }

    /// The tensor at `key` as dtype, shape and little-endian bytes (f32 tensors as f32, packed
    /// codes as they are in the file), for `ember_quant`'s readers; marked used.
    pub fn tensor_ref(&self, key: &str) -> Option<ember_quant::TensorRef<'_>> {
        let entry = self.entries.get(key)?;
        self.used.borrow_mut().insert(key.to_owned());
        Some(match &entry.data {
            Data::Raw(dtype, bytes) => ember_quant::TensorRef {
                dtype: *dtype,
                shape: entry.shape.clone(),
                data: bytes,
            },
            Data::Values(values) => ember_quant::TensorRef {
                dtype: Dtype::F32,
                shape: entry.shape.clone(),
                data: f32_bytes(values),
            },
            // Not a packed weight nor one of its scales (those are read when the file opens).
            Data::InFile { .. } => return None,
        })
    }

    /// The tensor at `key`, checked against `shape`.
    pub fn get<B: Backend, const D: usize>(
        &self,
        key: &str,
        shape: [usize; D],
        device: &B::Device,
    ) -> Result<Tensor<B, D>> {
        let values = self.values(key, &shape)?.into_owned();
        Ok(Tensor::from_data(TensorData::new(values, shape), device))
    }

    /// The 2-D tensor at `key` (stored `[rows, cols]`, checked against `shape`), transposed to
    /// `[cols, rows]` on the host so that the result is contiguous ([`LinearLayout::InOut`]).
    /// A transposed view sends every matmul through other kernel paths, which round
    /// differently from a model that never went through a file.
    pub fn get_transposed<B: Backend>(
        &self,
        key: &str,
        shape: [usize; 2],
        device: &B::Device,
    ) -> Result<Tensor<B, 2>> {
        let [rows, cols] = shape;
        let values = self.values(key, &shape)?;
        Ok(Tensor::from_data(
            TensorData::new(transposed(&values, rows, cols), [cols, rows]),
            device,
        ))
    }
}

/// `[rows, cols]` row-major values as `[cols, rows]`.
pub(crate) fn transposed(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; values.len()];
    for (r, row) in values.chunks_exact(cols.max(1)).enumerate() {
        for (c, v) in row.iter().enumerate() {
            out[c * rows + r] = *v;
        }
    }
    out
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
    let io = |source| ModelError::Io {
        path: path.to_owned(),
        source,
    };
    let bad = |message: String| ModelError::Weights {
        path: path.to_owned(),
        message,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    // The header: 8 bytes of length, then JSON naming every tensor's dtype, shape and byte
    // range in the data that follows. Only the header is read here.
    let mut n = [0u8; 8];
    file.read_exact(&mut n)
        .map_err(|e| bad(format!("no safetensors header: {e}")))?;
    let n = u64::from_le_bytes(n);
    if n > 100_000_000 || 8 + n > file_len {
        return Err(bad(format!(
            "safetensors header of {n} bytes does not fit the file"
        )));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header).map_err(io)?;
    let header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("safetensors header: {e}")))?;
    let data_start = 8 + n;
    for (key, info) in header {
        if key == "__metadata__" {
            continue;
        }
        let parsed: HeaderEntry = serde_json::from_value(info)
            .map_err(|e| bad(format!("tensor `{key}` in the header: {e}")))?;
        let dtype = parse_dtype(&parsed.dtype).ok_or_else(|| ModelError::Dtype {
            key: key.clone(),
            dtype: parsed.dtype.clone(),
            path: path.to_owned(),
        })?;
        let [begin, end] = parsed.data_offsets;
        let count: usize = parsed.shape.iter().product();
        if end < begin
            || data_start + end > file_len
            || (end - begin) as usize != count * dtype.bitsize() / 8
        {
            return Err(bad(format!(
                "tensor `{key}`: bytes {begin}..{end} do not hold {count} {dtype:?} values in the file"
            )));
        }
        let (start, len) = (data_start + begin, (end - begin) as usize);
        let data = if matches!(dtype, Dtype::U8 | Dtype::I8) || is_quant_scale(&key) {
            // Packed codes and their (small) scales are read now, as `ember_quant` borrows them.
            Data::Raw(dtype, read_range(path, start, len)?)
        } else {
            Data::InFile { dtype, start, len }
        };
        entries.insert(
            key,
            Entry {
                shape: parsed.shape,
                data,
                file: path.to_owned(),
            },
        );
    }
    Ok(())
}

/// One tensor of a safetensors header.
#[derive(serde::Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

/// The dtypes Ember reads (floats, and integer buffers such as `position_ids`).
fn parse_dtype(name: &str) -> Option<Dtype> {
    Some(match name {
        "F32" => Dtype::F32,
        "F16" => Dtype::F16,
        "BF16" => Dtype::BF16,
        "I64" => Dtype::I64,
        "U8" => Dtype::U8,
        "I8" => Dtype::I8,
        _ => return None,
    })
}

/// Whether `key` is one of the float companions of a bitsandbytes weight.
fn is_quant_scale(key: &str) -> bool {
    [
        "absmax",
        "quant_map",
        "nested_absmax",
        "nested_quant_map",
        "SCB",
    ]
    .iter()
    .any(|s| key == *s || key.ends_with(&format!(".{s}")))
}

/// `len` bytes of `path` from byte `start`.
fn read_range(path: &Path, start: u64, len: usize) -> Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let io = |source| ModelError::Io {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut bytes = vec![0u8; len];
    file.read_exact_at(&mut bytes, start).map_err(io)?;
    Ok(bytes)
}

/// `len` bytes of `path` from byte `start` as little-endian f32 values, read into their buffer.
fn read_f32(path: &Path, start: u64, len: usize) -> Result<Vec<f32>> {
    use std::os::unix::fs::FileExt;
    let io = |source| ModelError::Io {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut values = vec![0f32; len / 4];
    // SAFETY: the byte view covers exactly the values' memory (any bytes are a valid f32) and
    // is dropped before `values` is used again; on a little-endian machine (the only kind
    // `f32_bytes` compiles for) the file's bytes are the values.
    let bytes = unsafe {
        std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<u8>(), values.len() * 4)
    };
    file.read_exact_at(bytes, start).map_err(io)?;
    Ok(values)
}

/// The f32 values of a float (or I64 buffer) tensor's little-endian bytes.
fn to_f32(key: &str, dtype: Dtype, data: &[u8], path: &Path) -> Result<Vec<f32>> {
    if let Some(values) = ember_peft::io::float_values(dtype, data) {
        return Ok(values);
    }
    Ok(match dtype {
        // Integer buffers (`position_ids`) are not parameters; they read as floats so that they
        // can be reported as unused like any other key.
        Dtype::I64 => data
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
            .collect(),
        other => {
            return Err(ModelError::Dtype {
                key: key.to_owned(),
                dtype: format!("{other:?}"),
                path: path.to_owned(),
            })
        }
    })
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
                data: Data::Values(values),
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
