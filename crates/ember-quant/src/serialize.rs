//! The on-disk format of bitsandbytes checkpoints, as transformers 5 + bitsandbytes 0.50 write
//! them with `save_pretrained` (`model.safetensors`), both directions.
//!
//! # 4-bit (`Linear4bit`, `Params4bit`)
//!
//! For a weight `W` (e.g. `model.layers.0.mlp.down_proj.weight`) of `n` elements, quantized with
//! `blocksize` into `blocks = ceil(n / blocksize)` blocks, `Linear4bit._save_to_state_dict` writes
//! the packed weight and `QuantState.as_dict(packed=True)` under `W.`:
//!
//! | key | dtype | shape | content |
//! |---|---|---|---|
//! | `W` | U8 | `[ceil(n/2), 1]` | two nibbles per byte, element `2i` in the high nibble |
//! | `W.absmax` | F32, or U8 with double quant | `[blocks]` | per-block absmax, or its 8-bit codes |
//! | `W.quant_map` | F32 | `[16]` | the NF4 / FP4 code |
//! | `W.nested_absmax` | F32 | `[ceil(blocks/256)]` | double quant only |
//! | `W.nested_quant_map` | F32 | `[256]` | double quant only: the dynamic map |
//! | `W.quant_state.bitsandbytes__nf4` (or `__fp4`) | U8 | `[len]` | UTF-8 JSON, below |
//!
//! The JSON is Python's `json.dumps` of the non-tensor fields, in this order (the nested ones only
//! with double quantization):
//!
//! ```json
//! {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [32, 64], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.052208006381988525}
//! ```
//!
//! `dtype` is the dtype of the tensor that was quantized (what `dequantize_4bit` returns),
//! `nested_offset` the float32 mean of the absmax printed as a Python float (shortest repr of the
//! float64 value). [`state_dict_4bit`] writes the same bytes (keys, dtypes, shapes, data, and the
//! JSON byte for byte); [`load_4bit`] reads them back into a [`Packed4bit`]. With
//! `bnb_4bit_quant_storage` other than `uint8` the packed bytes are stored as another dtype
//! (`[ceil(n/2) / itemsize, 1]`); [`load_4bit`] reads those bytes as they are.
//!
//! # 8-bit (`Linear8bitLt`, `Int8Params`)
//!
//! For a weight `M.weight` of `out x in`, `Linear8bitLt._save_to_state_dict` writes:
//!
//! | key | dtype | shape | content |
//! |---|---|---|---|
//! | `M.weight` | I8 | `[out, in]` | `CB`, row-major |
//! | `M.SCB` | F32 | `[out]` | the row absmax |
//! | `M.weight_format` | U8 | `[]` | `0` ("row", the only layout bitsandbytes 0.45+ loads) |
//!
//! (Note `M.SCB`, not `M.weight.SCB`.) [`state_dict_8bit`] / [`load_8bit`] write and read them.
//!
//! # Dispatch
//!
//! [`quantized_layout`] looks at the tensor names of a whole file and says which weights are
//! 4-bit or 8-bit and which names are their companion tensors, so that a model loader can load
//! those with [`load_quantized`] and everything else as plain tensors.
//!
//! Every error names the checkpoint tensor at fault ([`CheckpointError`]).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use safetensors::tensor::TensorView;
use safetensors::{SafeTensors, View};
use serde_json::{Map, Value};

use crate::blockwise::{
    check_blocksize_4bit, Absmax, NestedAbsmax, Packed4bit, QuantState4bit, QuantType,
};
use crate::blockwise8::block_count;
use crate::error::{numel, QuantError};
use crate::int8::Int8Weight;

/// The element type of a saved tensor: safetensors' dtype (`U8`, `I8`, `F32`, ...).
pub type SavedDtype = safetensors::Dtype;

/// The dtype names [`QuantStateJson`] accepts for `dtype` / `nested_dtype`: the float dtypes
/// bitsandbytes quantizes (written as `str(torch.float32).strip("torch.")`).
pub const QUANT_STATE_DTYPES: [&str; 3] = ["float32", "float16", "bfloat16"];

/// What [`state_dict_4bit`] writes as the quant_state `dtype`: Ember dequantizes to float32.
pub const DEFAULT_DTYPE: &str = "float32";

/// A tensor to save: dtype, shape and little-endian bytes, as safetensors stores it.
///
/// Implements [`safetensors::View`], so a state dict serializes with `safetensors::serialize`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedTensor {
    /// The element type.
    pub dtype: SavedDtype,
    /// The shape (`[]` for a scalar).
    pub shape: Vec<usize>,
    /// The data, little endian, row-major; `numel * itemsize` bytes.
    pub bytes: Vec<u8>,
}

impl SavedTensor {
    /// A `U8` tensor.
    pub fn from_u8(shape: Vec<usize>, bytes: Vec<u8>) -> Self {
        SavedTensor {
            dtype: SavedDtype::U8,
            shape,
            bytes,
        }
    }

    /// An `I8` tensor.
    pub fn from_i8(shape: Vec<usize>, values: &[i8]) -> Self {
        SavedTensor {
            dtype: SavedDtype::I8,
            shape,
            bytes: values.iter().map(|&v| v as u8).collect(),
        }
    }

    /// An `F32` tensor.
    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Self {
        SavedTensor {
            dtype: SavedDtype::F32,
            shape,
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// A borrowed view, e.g. to load it back with [`load_4bit`].
    pub fn view(&self) -> TensorRef<'_> {
        TensorRef {
            dtype: self.dtype,
            shape: self.shape.clone(),
            data: &self.bytes,
        }
    }
}

impl View for SavedTensor {
    fn dtype(&self) -> SavedDtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// So that a borrowed state dict serializes without copying its tensors.
impl View for &SavedTensor {
    fn dtype(&self) -> SavedDtype {
        (**self).dtype()
    }
    fn shape(&self) -> &[usize] {
        (**self).shape()
    }
    fn data(&self) -> Cow<'_, [u8]> {
        (**self).data()
    }
    fn data_len(&self) -> usize {
        (**self).data_len()
    }
}

/// A tensor to load: what the loaders ask their lookup function for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorRef<'a> {
    /// The element type.
    pub dtype: SavedDtype,
    /// The shape.
    pub shape: Vec<usize>,
    /// The little-endian bytes.
    pub data: &'a [u8],
}

impl<'a> From<TensorView<'a>> for TensorRef<'a> {
    fn from(view: TensorView<'a>) -> Self {
        TensorRef {
            dtype: view.dtype(),
            shape: view.shape().to_vec(),
            data: view.data(),
        }
    }
}

/// The lookup function of a safetensors file, for [`load_4bit`] / [`load_8bit`].
pub fn safetensors_lookup<'a, 'data: 'a>(
    st: &'a SafeTensors<'data>,
) -> impl Fn(&str) -> Option<TensorRef<'data>> + 'a {
    move |name| st.tensor(name).ok().map(TensorRef::from)
}

/// The lookup function of a state dict made by [`state_dict_4bit`] / [`state_dict_8bit`].
pub fn saved_lookup<'a>(
    tensors: &'a [(String, SavedTensor)],
) -> impl Fn(&str) -> Option<TensorRef<'a>> + 'a {
    move |name| {
        tensors
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.view())
    }
}

/// A checkpoint tensor that cannot be read as a bitsandbytes quantized weight.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CheckpointError {
    /// A tensor the weight needs is not in the checkpoint.
    #[error("missing tensor `{tensor}`")]
    MissingTensor {
        /// The full key.
        tensor: String,
    },

    /// A tensor of the wrong element type.
    #[error("`{tensor}` has dtype {actual}, expected {expected}")]
    WrongDtype {
        /// The full key.
        tensor: String,
        /// The accepted dtype(s), in words.
        expected: &'static str,
        /// The dtype it has.
        actual: SavedDtype,
    },

    /// A tensor whose size does not fit the shape, blocksize or dtype the others imply (a
    /// truncated packed weight, an absmax with the wrong number of blocks, ...).
    #[error("`{tensor}` has {actual} {unit}, expected {expected} ({reason})")]
    WrongLength {
        /// The full key.
        tensor: String,
        /// The size the other tensors and the quant_state imply.
        expected: usize,
        /// The size it has.
        actual: usize,
        /// `elements` or `bytes`.
        unit: &'static str,
        /// Where the expected size comes from.
        reason: String,
    },

    /// A tensor of the wrong rank.
    #[error("`{tensor}` has shape {shape:?}: {reason}")]
    WrongShape {
        /// The full key.
        tensor: String,
        /// Its shape.
        shape: Vec<usize>,
        /// What is expected.
        reason: &'static str,
    },

    /// The JSON of `W.quant_state.bitsandbytes__*` is not what bitsandbytes writes.
    #[error("`{tensor}`: malformed quant_state JSON{}: {reason}", field_suffix(.field))]
    MalformedQuantState {
        /// The full key of the quant_state tensor.
        tensor: String,
        /// The JSON field at fault, `None` when the document itself is broken.
        field: Option<String>,
        /// What is wrong.
        reason: String,
    },

    /// A blocksize bitsandbytes does not accept.
    #[error("`{tensor}`: {field} {blocksize} is not supported (expected {expected})")]
    InvalidBlocksize {
        /// The full key of the quant_state tensor.
        tensor: String,
        /// `blocksize` or `nested_blocksize`.
        field: &'static str,
        /// The value.
        blocksize: usize,
        /// The accepted values, in words.
        expected: &'static str,
    },

    /// A `weight_format` other than 0 ("row"), which bitsandbytes no longer loads.
    #[error("`{tensor}`: weight_format {value} is not supported (only 0, \"row\")")]
    UnsupportedWeightFormat {
        /// The full key.
        tensor: String,
        /// The stored value.
        value: i64,
    },

    /// A weight with the markers of two formats (both `__nf4` and `__fp4`, or 4-bit and 8-bit).
    #[error("`{weight}` has the tensors of more than one quantization: {keys:?}")]
    AmbiguousQuantization {
        /// The weight.
        weight: String,
        /// The conflicting keys.
        keys: Vec<String>,
    },

    /// An 8-bit weight name that does not end in `weight` (its `SCB` would have no key).
    #[error("`{name}` is not a weight name (expected `<module>.weight`)")]
    NotAWeightName {
        /// The name given.
        name: String,
    },

    /// A weight whose tensors are individually fine but do not form a valid quantized tensor.
    #[error("`{tensor}`: {source}")]
    Invalid {
        /// The full key of the weight.
        tensor: String,
        /// What [`Packed4bit::validate`] or [`Int8Weight::new`] found.
        #[source]
        source: QuantError,
    },
}

fn field_suffix(field: &Option<String>) -> String {
    field
        .as_ref()
        .map_or_else(String::new, |f| format!(", field `{f}`"))
}

type CkResult<T> = std::result::Result<T, CheckpointError>;

/// The key of a weight's companion tensor: `W.absmax`, ...
fn key(weight_name: &str, suffix: &str) -> String {
    format!("{weight_name}.{suffix}")
}

/// The key of the packed quant_state JSON of a 4-bit weight.
pub fn quant_state_key(weight_name: &str, quant_type: QuantType) -> String {
    format!(
        "{weight_name}.quant_state.bitsandbytes__{}",
        quant_type.as_str()
    )
}

/// `M.` for `M.weight` (`""` for a bare `weight`): where `SCB` / `weight_format` go.
fn module_prefix(weight_name: &str) -> CkResult<&str> {
    if weight_name == "weight" {
        Ok("")
    } else {
        weight_name
            .strip_suffix("weight")
            .filter(|p| p.ends_with('.'))
            .ok_or_else(|| CheckpointError::NotAWeightName {
                name: weight_name.to_owned(),
            })
    }
}

fn fetch<'a>(name: &str, get: &impl Fn(&str) -> Option<TensorRef<'a>>) -> CkResult<TensorRef<'a>> {
    let t = get(name).ok_or_else(|| CheckpointError::MissingTensor {
        tensor: name.to_owned(),
    })?;
    check_data_len(name, &t)?;
    Ok(t)
}

/// The data must hold exactly `numel * itemsize` bytes (a safetensors file guarantees it, a
/// hand-made [`TensorRef`] may not).
fn check_data_len(name: &str, t: &TensorRef<'_>) -> CkResult<usize> {
    let n = shape_numel(name, &t.shape)?;
    let bytes = n
        .checked_mul(t.dtype.bitsize())
        .map(|bits| bits.div_ceil(8))
        .unwrap_or(usize::MAX);
    if bytes != t.data.len() {
        return Err(CheckpointError::WrongLength {
            tensor: name.to_owned(),
            expected: bytes,
            actual: t.data.len(),
            unit: "bytes",
            reason: format!("shape {:?} of {}", t.shape, t.dtype),
        });
    }
    Ok(n)
}

fn shape_numel(name: &str, shape: &[usize]) -> CkResult<usize> {
    numel("shape", shape).map_err(|_| CheckpointError::WrongShape {
        tensor: name.to_owned(),
        shape: shape.to_vec(),
        reason: "the number of elements overflows usize",
    })
}

fn expect_dtype(
    name: &str,
    t: &TensorRef<'_>,
    dtype: SavedDtype,
    words: &'static str,
) -> CkResult<()> {
    if t.dtype == dtype {
        Ok(())
    } else {
        Err(CheckpointError::WrongDtype {
            tensor: name.to_owned(),
            expected: words,
            actual: t.dtype,
        })
    }
}

fn expect_len(
    name: &str,
    actual: usize,
    expected: usize,
    reason: impl FnOnce() -> String,
) -> CkResult<()> {
    if actual == expected {
        Ok(())
    } else {
        Err(CheckpointError::WrongLength {
            tensor: name.to_owned(),
            expected,
            actual,
            unit: "elements",
            reason: reason(),
        })
    }
}

fn f32s(data: &[u8]) -> Vec<f32> {
    data.chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The quant_state JSON.

/// The nested fields of [`QuantStateJson`] (double quantization).
#[derive(Debug, Clone, PartialEq)]
pub struct NestedStateJson {
    /// `nested_blocksize`: absmax codes per nested block (256).
    pub blocksize: usize,
    /// `nested_dtype`: the dtype of the absmax before its quantization (`float32`).
    pub dtype: String,
    /// `nested_offset`: the mean subtracted from the absmax.
    pub offset: f32,
}

/// The non-tensor fields of a bitsandbytes `QuantState`, stored as JSON in
/// `W.quant_state.bitsandbytes__<quant_type>`.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantStateJson {
    /// `quant_type`.
    pub quant_type: QuantType,
    /// `blocksize`.
    pub blocksize: usize,
    /// `dtype`: the dtype of the quantized tensor (`float32`, `bfloat16`, `float16`).
    pub dtype: String,
    /// `shape`: the shape of the quantized tensor.
    pub shape: Vec<usize>,
    /// The `nested_*` fields, with double quantization.
    pub nested: Option<NestedStateJson>,
}

/// The keys bitsandbytes' `QuantState.from_dict` accepts (anything else fails its assert).
const QUANT_STATE_FIELDS: [&str; 7] = [
    "quant_type",
    "blocksize",
    "dtype",
    "shape",
    "nested_blocksize",
    "nested_dtype",
    "nested_offset",
];

/// A malformed field: `(field, reason)`.
type FieldError = (Option<String>, String);

fn field_err(field: &str, reason: impl Into<String>) -> FieldError {
    (Some(field.to_owned()), reason.into())
}

impl QuantStateJson {
    /// The fields of a [`Packed4bit`], with `dtype` as the quantized tensor's dtype.
    pub fn of(packed: &Packed4bit, dtype: &str) -> Self {
        let state = &packed.state;
        QuantStateJson {
            quant_type: state.quant_type,
            blocksize: state.blocksize,
            dtype: dtype.to_owned(),
            shape: state.shape.clone(),
            nested: match &state.absmax {
                Absmax::Plain(_) => None,
                Absmax::Nested(n) => Some(NestedStateJson {
                    blocksize: n.nested_blocksize,
                    dtype: DEFAULT_DTYPE.to_owned(),
                    offset: n.offset,
                }),
            },
        }
    }

    /// The bytes bitsandbytes stores: Python's `json.dumps` of the fields (`", "` and `": "`
    /// separators, `nested_offset` as Python's `repr` of the float).
    pub fn to_bytes(&self) -> Vec<u8> {
        let s = |v: &str| Value::String(v.to_owned()).to_string();
        let shape: Vec<String> = self.shape.iter().map(usize::to_string).collect();
        let mut out = format!(
            "{{\"quant_type\": {}, \"blocksize\": {}, \"dtype\": {}, \"shape\": [{}]",
            s(self.quant_type.as_str()),
            self.blocksize,
            s(&self.dtype),
            shape.join(", ")
        );
        if let Some(n) = &self.nested {
            out.push_str(&format!(
                ", \"nested_blocksize\": {}, \"nested_dtype\": {}, \"nested_offset\": {}",
                n.blocksize,
                s(&n.dtype),
                python_float_repr(f64::from(n.offset))
            ));
        }
        out.push('}');
        out.into_bytes()
    }

    /// Parses the stored bytes (UTF-8 JSON). Field order does not matter; unknown fields are
    /// rejected, as bitsandbytes' `from_dict` does.
    fn parse(bytes: &[u8]) -> std::result::Result<Self, FieldError> {
        let text = std::str::from_utf8(bytes).map_err(|e| (None, format!("not UTF-8: {e}")))?;
        let value: Value =
            serde_json::from_str(text).map_err(|e| (None, format!("not JSON: {e}")))?;
        let obj = value
            .as_object()
            .ok_or_else(|| (None, format!("not a JSON object: {value}")))?;
        if let Some(k) = obj
            .keys()
            .find(|k| !QUANT_STATE_FIELDS.contains(&k.as_str()))
        {
            return Err(field_err(
                k,
                "unknown field (bitsandbytes' from_dict rejects it)",
            ));
        }
        let quant_type = get_str(obj, "quant_type")?;
        let quant_type: QuantType = quant_type.parse().map_err(|_| {
            field_err(
                "quant_type",
                format!("{quant_type:?} is not \"nf4\" or \"fp4\""),
            )
        })?;
        let blocksize = get_usize(obj, "blocksize")?;
        let dtype = get_dtype(obj, "dtype")?;
        let shape = match obj.get("shape") {
            None => return Err(field_err("shape", "missing")),
            Some(Value::Array(dims)) => dims
                .iter()
                .map(|d| {
                    d.as_u64()
                        .and_then(|d| usize::try_from(d).ok())
                        .ok_or_else(|| {
                            field_err(
                                "shape",
                                format!(
                                    "{value} has a dimension that is not a size",
                                    value = obj["shape"]
                                ),
                            )
                        })
                })
                .collect::<std::result::Result<Vec<_>, _>>()?,
            Some(v) => {
                return Err(field_err(
                    "shape",
                    format!("expected a list of sizes, found {v}"),
                ))
            }
        };
        let nested_keys = ["nested_blocksize", "nested_dtype", "nested_offset"];
        let nested = if nested_keys.iter().any(|k| obj.contains_key(*k)) {
            let offset = match obj.get("nested_offset") {
                None => return Err(field_err("nested_offset", "missing")),
                Some(v) => v.as_f64().ok_or_else(|| {
                    field_err("nested_offset", format!("expected a number, found {v}"))
                })?,
            };
            Some(NestedStateJson {
                blocksize: get_usize(obj, "nested_blocksize")?,
                dtype: get_dtype(obj, "nested_dtype")?,
                // `torch.tensor(float(offset))`: the float64 rounded to float32.
                offset: offset as f32,
            })
        } else {
            None
        };
        Ok(QuantStateJson {
            quant_type,
            blocksize,
            dtype,
            shape,
            nested,
        })
    }
}

fn get_str<'v>(
    obj: &'v Map<String, Value>,
    field: &str,
) -> std::result::Result<&'v str, FieldError> {
    match obj.get(field) {
        None => Err(field_err(field, "missing")),
        Some(Value::String(s)) => Ok(s),
        Some(v) => Err(field_err(field, format!("expected a string, found {v}"))),
    }
}

fn get_usize(obj: &Map<String, Value>, field: &str) -> std::result::Result<usize, FieldError> {
    match obj.get(field) {
        None => Err(field_err(field, "missing")),
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| field_err(field, format!("expected a non-negative integer, found {v}"))),
    }
}

fn get_dtype(obj: &Map<String, Value>, field: &str) -> std::result::Result<String, FieldError> {
    let s = get_str(obj, field)?;
    if QUANT_STATE_DTYPES.contains(&s) {
        Ok(s.to_owned())
    } else {
        Err(field_err(
            field,
            format!("{s:?} is not one of \"float32\", \"float16\", \"bfloat16\""),
        ))
    }
}

/// Python's `repr(float)` (what `json.dumps` writes): the shortest digits that round-trip, in
/// positional notation for decimal exponents in `-4..16`, else as `1.5e-05` / `1e+16`.
pub(crate) fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    // Rust's `{:e}` gives the same shortest round-trip digits: `d.ddde-X`.
    let sci = format!("{:e}", x.abs());
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("{:e} exponent is an integer");
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let sign = if x < 0.0 { "-" } else { "" };
    // Python's decpt: the value is 0.DIGITS * 10^decpt.
    let decpt = exp + 1;
    let body = if !(-4 < decpt && decpt <= 16) {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{first}{frac}e{esign}{:02}", exp.abs())
    } else if decpt <= 0 {
        format!("0.{}{digits}", "0".repeat(decpt.unsigned_abs() as usize))
    } else {
        let decpt = decpt as usize;
        if decpt >= digits.len() {
            format!("{digits}{}.0", "0".repeat(decpt - digits.len()))
        } else {
            format!("{}.{}", &digits[..decpt], &digits[decpt..])
        }
    };
    format!("{sign}{body}")
}

// ---------------------------------------------------------------------------------------------
// 4-bit.

/// The tensors `Linear4bit` saves for a 4-bit weight `weight_name`, with quant_state `dtype`
/// `"float32"` (see [`state_dict_4bit_with_dtype`]). Keys, dtypes, shapes and bytes are those
/// of bitsandbytes, in its order: `W`, `W.absmax`, `W.quant_map`, [`W.nested_absmax`,
/// `W.nested_quant_map`,] `W.quant_state.bitsandbytes__<type>`.
///
/// # Errors
///
/// [`CheckpointError::Invalid`] if `packed` does not fit its own shape / blocksize.
pub fn state_dict_4bit(
    weight_name: &str,
    packed: &Packed4bit,
) -> CkResult<Vec<(String, SavedTensor)>> {
    state_dict_4bit_with_dtype(weight_name, packed, DEFAULT_DTYPE)
}

/// [`state_dict_4bit`] with the quant_state `dtype` given: the dtype of the weight before
/// quantization (`"float32"`, `"bfloat16"` or `"float16"`), which bitsandbytes dequantizes to.
///
/// # Errors
///
/// [`CheckpointError::Invalid`] if `packed` does not fit its own shape / blocksize,
/// [`CheckpointError::MalformedQuantState`] for an unknown `dtype`.
pub fn state_dict_4bit_with_dtype(
    weight_name: &str,
    packed: &Packed4bit,
    dtype: &str,
) -> CkResult<Vec<(String, SavedTensor)>> {
    let state = &packed.state;
    let qs_key = quant_state_key(weight_name, state.quant_type);
    if !QUANT_STATE_DTYPES.contains(&dtype) {
        return Err(CheckpointError::MalformedQuantState {
            tensor: qs_key,
            field: Some("dtype".into()),
            reason: format!("{dtype:?} is not one of \"float32\", \"float16\", \"bfloat16\""),
        });
    }
    packed
        .validate()
        .map_err(|source| CheckpointError::Invalid {
            tensor: weight_name.to_owned(),
            source,
        })?;
    let mut out = vec![(
        weight_name.to_owned(),
        SavedTensor::from_u8(vec![packed.packed.len(), 1], packed.packed.clone()),
    )];
    match &state.absmax {
        Absmax::Plain(absmax) => {
            out.push((
                key(weight_name, "absmax"),
                SavedTensor::from_f32(vec![absmax.len()], absmax),
            ));
            out.push((
                key(weight_name, "quant_map"),
                SavedTensor::from_f32(vec![16], &state.code),
            ));
        }
        Absmax::Nested(n) => {
            out.push((
                key(weight_name, "absmax"),
                SavedTensor::from_u8(vec![n.codes.len()], n.codes.clone()),
            ));
            out.push((
                key(weight_name, "quant_map"),
                SavedTensor::from_f32(vec![16], &state.code),
            ));
            out.push((
                key(weight_name, "nested_absmax"),
                SavedTensor::from_f32(vec![n.nested_absmax.len()], &n.nested_absmax),
            ));
            out.push((
                key(weight_name, "nested_quant_map"),
                SavedTensor::from_f32(vec![256], &n.nested_code[..]),
            ));
        }
    }
    let json = QuantStateJson::of(packed, dtype).to_bytes();
    out.push((qs_key, SavedTensor::from_u8(vec![json.len()], json)));
    Ok(out)
}

/// Finds and parses the quant_state JSON of a 4-bit weight: `(key, fields)`.
///
/// # Errors
///
/// [`CheckpointError::MissingTensor`] if neither `__nf4` nor `__fp4` is there,
/// [`CheckpointError::AmbiguousQuantization`] if both are,
/// [`CheckpointError::MalformedQuantState`] naming the field that is wrong (the `quant_type`
/// must agree with the key), [`CheckpointError::InvalidBlocksize`].
pub fn read_quant_state_4bit<'a>(
    weight_name: &str,
    get: impl Fn(&str) -> Option<TensorRef<'a>>,
) -> CkResult<(String, QuantStateJson)> {
    let candidates: Vec<(String, QuantType, TensorRef<'a>)> = [QuantType::Nf4, QuantType::Fp4]
        .into_iter()
        .filter_map(|qt| {
            let k = quant_state_key(weight_name, qt);
            get(&k).map(|t| (k, qt, t))
        })
        .collect();
    let (qs_key, key_type, t) = match candidates.len() {
        0 => {
            return Err(CheckpointError::MissingTensor {
                tensor: format!("{weight_name}.quant_state.bitsandbytes__nf4 (or __fp4)"),
            })
        }
        1 => candidates.into_iter().next().expect("one candidate"),
        _ => {
            return Err(CheckpointError::AmbiguousQuantization {
                weight: weight_name.to_owned(),
                keys: candidates.into_iter().map(|c| c.0).collect(),
            })
        }
    };
    check_data_len(&qs_key, &t)?;
    expect_dtype(&qs_key, &t, SavedDtype::U8, "U8 (UTF-8 JSON bytes)")?;
    let malformed = |(field, reason): FieldError| CheckpointError::MalformedQuantState {
        tensor: qs_key.clone(),
        field,
        reason,
    };
    let meta = QuantStateJson::parse(t.data).map_err(malformed)?;
    if meta.quant_type != key_type {
        return Err(malformed(field_err(
            "quant_type",
            format!(
                "{:?} disagrees with the key suffix bitsandbytes__{}",
                meta.quant_type.as_str(),
                key_type.as_str()
            ),
        )));
    }
    let invalid_blocksize = |field, blocksize, expected| CheckpointError::InvalidBlocksize {
        tensor: qs_key.clone(),
        field,
        blocksize,
        expected,
    };
    if let Err(QuantError::InvalidBlocksize { expected, .. }) =
        check_blocksize_4bit("load_4bit", meta.blocksize)
    {
        return Err(invalid_blocksize("blocksize", meta.blocksize, expected));
    }
    if let Some(n) = &meta.nested {
        if n.blocksize == 0 {
            return Err(invalid_blocksize(
                "nested_blocksize",
                0,
                "a positive number",
            ));
        }
    }
    numel("shape", &meta.shape).map_err(|_| {
        malformed(field_err(
            "shape",
            format!("{:?}: the number of elements overflows usize", meta.shape),
        ))
    })?;
    Ok((qs_key, meta))
}

/// Reads a 4-bit weight saved by bitsandbytes (see the module docs for the tensors).
///
/// `get` looks a tensor up by its full key ([`safetensors_lookup`], [`saved_lookup`], or any
/// closure). The result dequantizes with [`crate::dequantize_4bit`] to what bitsandbytes'
/// `dequantize_4bit` returns for the loaded `Params4bit`.
///
/// # Errors
///
/// A [`CheckpointError`] naming the tensor: missing, of the wrong dtype, of the wrong length for
/// the quant_state's shape and blocksize (a truncated weight, an absmax that does not have one
/// value per block), or a malformed quant_state (see [`read_quant_state_4bit`]).
pub fn load_4bit<'a>(
    weight_name: &str,
    get: impl Fn(&str) -> Option<TensorRef<'a>>,
) -> CkResult<Packed4bit> {
    let (qs_key, meta) = read_quant_state_4bit(weight_name, &get)?;
    let n = numel("shape", &meta.shape).expect("checked by read_quant_state_4bit");
    let blocks = block_count(n, meta.blocksize);
    let block_reason = || {
        format!(
            "one per block of {} of shape {:?}, from `{qs_key}`",
            meta.blocksize, meta.shape
        )
    };

    // The packed weight: ceil(n / 2) bytes, whatever dtype `bnb_4bit_quant_storage` chose.
    let weight = fetch(weight_name, &get)?;
    if !matches!(
        weight.dtype,
        SavedDtype::U8
            | SavedDtype::I8
            | SavedDtype::F16
            | SavedDtype::BF16
            | SavedDtype::F32
            | SavedDtype::F64
    ) {
        return Err(CheckpointError::WrongDtype {
            tensor: weight_name.to_owned(),
            expected: "U8 (or the bnb_4bit_quant_storage dtype: I8, F16, BF16, F32, F64)",
            actual: weight.dtype,
        });
    }
    if weight.data.len() != n.div_ceil(2) {
        let why = if weight.data.len() < n.div_ceil(2) {
            "truncated: "
        } else {
            ""
        };
        return Err(CheckpointError::WrongLength {
            tensor: weight_name.to_owned(),
            expected: n.div_ceil(2),
            actual: weight.data.len(),
            unit: "bytes",
            reason: format!(
                "{why}two 4-bit values per byte of shape {:?} from `{qs_key}`",
                meta.shape
            ),
        });
    }

    let quant_map_key = key(weight_name, "quant_map");
    let quant_map = fetch(&quant_map_key, &get)?;
    expect_dtype(&quant_map_key, &quant_map, SavedDtype::F32, "F32")?;
    expect_len(&quant_map_key, quant_map.data.len() / 4, 16, || {
        "the 16 entries of the 4-bit code".into()
    })?;
    let code: [f32; 16] = f32s(quant_map.data).try_into().expect("16 entries");

    let absmax_key = key(weight_name, "absmax");
    let nested_absmax_key = key(weight_name, "nested_absmax");
    let absmax_t = fetch(&absmax_key, &get)?;
    let absmax = match (&meta.nested, get(&nested_absmax_key)) {
        (None, None) => {
            expect_dtype(
                &absmax_key,
                &absmax_t,
                SavedDtype::F32,
                "F32 (no double quantization)",
            )?;
            let absmax = f32s(absmax_t.data);
            expect_len(&absmax_key, absmax.len(), blocks, block_reason)?;
            Absmax::Plain(absmax)
        }
        (None, Some(_)) => {
            return Err(CheckpointError::MalformedQuantState {
                tensor: qs_key.clone(),
                field: Some("nested_offset".into()),
                reason: format!(
                    "missing, but `{nested_absmax_key}` is there (double quantization)"
                ),
            })
        }
        (Some(_), None) => {
            return Err(CheckpointError::MissingTensor {
                tensor: nested_absmax_key,
            })
        }
        (Some(nested), Some(nested_absmax_t)) => {
            check_data_len(&nested_absmax_key, &nested_absmax_t)?;
            expect_dtype(
                &absmax_key,
                &absmax_t,
                SavedDtype::U8,
                "U8 (double quantization codes)",
            )?;
            expect_len(&absmax_key, absmax_t.data.len(), blocks, block_reason)?;
            expect_dtype(&nested_absmax_key, &nested_absmax_t, SavedDtype::F32, "F32")?;
            let nested_absmax = f32s(nested_absmax_t.data);
            expect_len(
                &nested_absmax_key,
                nested_absmax.len(),
                block_count(blocks, nested.blocksize),
                || {
                    format!(
                        "one per {} of the {blocks} absmax codes, nested_blocksize from `{qs_key}`",
                        nested.blocksize
                    )
                },
            )?;
            let nested_map_key = key(weight_name, "nested_quant_map");
            let nested_map = fetch(&nested_map_key, &get)?;
            expect_dtype(&nested_map_key, &nested_map, SavedDtype::F32, "F32")?;
            expect_len(&nested_map_key, nested_map.data.len() / 4, 256, || {
                "the 256 entries of the 8-bit code".into()
            })?;
            let nested_code: [f32; 256] = f32s(nested_map.data).try_into().expect("256 entries");
            Absmax::Nested(NestedAbsmax {
                codes: absmax_t.data.to_vec(),
                nested_absmax,
                offset: nested.offset,
                nested_code: Box::new(nested_code),
                nested_blocksize: nested.blocksize,
            })
        }
    };

    let packed = Packed4bit {
        packed: weight.data.to_vec(),
        state: QuantState4bit {
            absmax,
            blocksize: meta.blocksize,
            shape: meta.shape,
            quant_type: meta.quant_type,
            code,
        },
    };
    packed
        .validate()
        .map_err(|source| CheckpointError::Invalid {
            tensor: weight_name.to_owned(),
            source,
        })?;
    Ok(packed)
}

// ---------------------------------------------------------------------------------------------
// 8-bit.

/// The tensors `Linear8bitLt` saves for an int8 weight `M.weight`: `M.weight` (I8 `[out, in]`),
/// `M.SCB` (F32 `[out]`) and `M.weight_format` (U8 scalar 0, "row").
///
/// # Errors
///
/// [`CheckpointError::NotAWeightName`] unless the name is `weight` or ends in `.weight`,
/// [`CheckpointError::Invalid`] if the codes or SCB do not fit the shape.
pub fn state_dict_8bit(
    weight_name: &str,
    weight: &Int8Weight,
) -> CkResult<Vec<(String, SavedTensor)>> {
    let prefix = module_prefix(weight_name)?;
    weight
        .validate()
        .map_err(|source| CheckpointError::Invalid {
            tensor: weight_name.to_owned(),
            source,
        })?;
    Ok(vec![
        (
            weight_name.to_owned(),
            SavedTensor::from_i8(vec![weight.out_features, weight.in_features], &weight.codes),
        ),
        (
            format!("{prefix}SCB"),
            SavedTensor::from_f32(vec![weight.out_features], &weight.scb),
        ),
        (
            format!("{prefix}weight_format"),
            SavedTensor::from_u8(vec![], vec![0]),
        ),
    ])
}

/// Reads an int8 weight saved by `Linear8bitLt` (`M.weight`, `M.SCB`, optional
/// `M.weight_format`, which bitsandbytes defaults to "row").
///
/// # Errors
///
/// A [`CheckpointError`] naming the tensor: missing, of the wrong dtype or rank, an `SCB` that
/// does not have one value per row, or a `weight_format` other than 0 ("row").
pub fn load_8bit<'a>(
    weight_name: &str,
    get: impl Fn(&str) -> Option<TensorRef<'a>>,
) -> CkResult<Int8Weight> {
    let prefix = module_prefix(weight_name)?;
    let weight = fetch(weight_name, &get)?;
    expect_dtype(weight_name, &weight, SavedDtype::I8, "I8")?;
    let &[out_features, in_features] = weight.shape.as_slice() else {
        return Err(CheckpointError::WrongShape {
            tensor: weight_name.to_owned(),
            shape: weight.shape.clone(),
            reason: "an int8 weight is [out_features, in_features]",
        });
    };
    let scb_key = format!("{prefix}SCB");
    let scb = fetch(&scb_key, &get)?;
    expect_dtype(&scb_key, &scb, SavedDtype::F32, "F32")?;
    let scb = f32s(scb.data);
    expect_len(&scb_key, scb.len(), out_features, || {
        format!("one per row of `{weight_name}` {:?}", weight.shape)
    })?;
    let format_key = format!("{prefix}weight_format");
    if let Some(t) = get(&format_key) {
        let n = check_data_len(&format_key, &t)?;
        let value = match (t.dtype, n) {
            (SavedDtype::U8, 1) => i64::from(t.data[0]),
            (SavedDtype::I8, 1) => i64::from(t.data[0] as i8),
            (SavedDtype::I32, 1) => {
                i64::from(i32::from_le_bytes(t.data.try_into().expect("4 bytes")))
            }
            (SavedDtype::I64, 1) => i64::from_le_bytes(t.data.try_into().expect("8 bytes")),
            (SavedDtype::U8 | SavedDtype::I8 | SavedDtype::I32 | SavedDtype::I64, _) => {
                return Err(CheckpointError::WrongLength {
                    tensor: format_key,
                    expected: 1,
                    actual: n,
                    unit: "elements",
                    reason: "a scalar format id".into(),
                })
            }
            (actual, _) => {
                return Err(CheckpointError::WrongDtype {
                    tensor: format_key,
                    expected: "U8 (or another integer type)",
                    actual,
                })
            }
        };
        if value != 0 {
            return Err(CheckpointError::UnsupportedWeightFormat {
                tensor: format_key,
                value,
            });
        }
    }
    let codes = weight.data.iter().map(|&b| b as i8).collect();
    Int8Weight::new(out_features, in_features, codes, scb).map_err(|source| {
        CheckpointError::Invalid {
            tensor: weight_name.to_owned(),
            source,
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Dispatch.

/// How a weight of a checkpoint is quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantizedKind {
    /// bitsandbytes 4-bit (`Linear4bit`), NF4 or FP4.
    Bnb4bit(QuantType),
    /// bitsandbytes LLM.int8 (`Linear8bitLt`).
    Bnb8bit,
}

/// A loaded quantized weight.
#[derive(Debug, Clone, PartialEq)]
pub enum QuantizedWeight {
    /// A 4-bit weight.
    FourBit(Packed4bit),
    /// An int8 weight.
    EightBit(Int8Weight),
}

/// Which weights of a checkpoint are quantized, from its tensor names ([`quantized_layout`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QuantizedLayout {
    /// Every quantized weight (full key, e.g. `model.layers.0.mlp.down_proj.weight`) and its kind.
    pub weights: BTreeMap<String, QuantizedKind>,
    /// The other tensors that belong to those weights (`W.absmax`, `W.quant_state.*`, `M.SCB`,
    /// `M.weight_format`, ...): not parameters of the model.
    pub companions: BTreeSet<String>,
}

impl QuantizedLayout {
    /// How `name` is quantized, `None` for a plain tensor (or a companion).
    pub fn kind(&self, name: &str) -> Option<QuantizedKind> {
        self.weights.get(name).copied()
    }

    /// Whether `name` is neither a quantized weight nor one of their companion tensors, i.e. a
    /// tensor to load as it is.
    pub fn is_plain(&self, name: &str) -> bool {
        !self.weights.contains_key(name) && !self.companions.contains(name)
    }

    /// Whether the checkpoint has any quantized weight.
    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }
}

/// The 4-bit companion suffixes (`W.<suffix>`), besides `quant_state.bitsandbytes__*`.
const COMPANIONS_4BIT: [&str; 4] = ["absmax", "quant_map", "nested_absmax", "nested_quant_map"];

/// Lists the quantized weights of a checkpoint from its tensor names: a 4-bit weight `W` is
/// marked by `W.quant_state.bitsandbytes__nf4|fp4`, an 8-bit weight `M.weight` by `M.SCB`.
///
/// A weight is listed even if the weight tensor itself is missing, so that loading it fails
/// with [`CheckpointError::MissingTensor`] instead of silently treating it as plain.
///
/// # Errors
///
/// [`CheckpointError::AmbiguousQuantization`] for a weight with the markers of two formats.
pub fn quantized_layout<'a>(names: impl IntoIterator<Item = &'a str>) -> CkResult<QuantizedLayout> {
    let names: BTreeSet<&str> = names.into_iter().collect();
    let mut layout = QuantizedLayout::default();
    let mut markers: BTreeMap<String, Vec<(String, QuantizedKind)>> = BTreeMap::new();
    for &name in &names {
        if let Some((weight, suffix)) = name.rsplit_once(".quant_state.bitsandbytes__") {
            let kind = match suffix {
                "nf4" => QuantizedKind::Bnb4bit(QuantType::Nf4),
                "fp4" => QuantizedKind::Bnb4bit(QuantType::Fp4),
                _ => continue,
            };
            markers
                .entry(weight.to_owned())
                .or_default()
                .push((name.to_owned(), kind));
        } else if name == "SCB" || name.ends_with(".SCB") {
            let weight = format!("{}weight", &name[..name.len() - 3]);
            markers
                .entry(weight)
                .or_default()
                .push((name.to_owned(), QuantizedKind::Bnb8bit));
        }
    }
    for (weight, marks) in markers {
        if marks.len() > 1 {
            return Err(CheckpointError::AmbiguousQuantization {
                weight,
                keys: marks.into_iter().map(|m| m.0).collect(),
            });
        }
        let (marker, kind) = marks.into_iter().next().expect("one marker");
        layout.companions.insert(marker);
        match kind {
            QuantizedKind::Bnb4bit(_) => {
                for suffix in COMPANIONS_4BIT {
                    let k = key(&weight, suffix);
                    if names.contains(k.as_str()) {
                        layout.companions.insert(k);
                    }
                }
            }
            QuantizedKind::Bnb8bit => {
                let k = format!("{}weight_format", &weight[..weight.len() - 6]);
                if names.contains(k.as_str()) {
                    layout.companions.insert(k);
                }
            }
        }
        layout.weights.insert(weight, kind);
    }
    Ok(layout)
}

/// Loads a weight listed by [`quantized_layout`] with [`load_4bit`] or [`load_8bit`].
///
/// # Errors
///
/// See those functions.
pub fn load_quantized<'a>(
    weight_name: &str,
    kind: QuantizedKind,
    get: impl Fn(&str) -> Option<TensorRef<'a>>,
) -> CkResult<QuantizedWeight> {
    match kind {
        QuantizedKind::Bnb4bit(qt) => {
            let packed = load_4bit(weight_name, get)?;
            if packed.state.quant_type != qt {
                return Err(CheckpointError::AmbiguousQuantization {
                    weight: weight_name.to_owned(),
                    keys: vec![quant_state_key(weight_name, qt)],
                });
            }
            Ok(QuantizedWeight::FourBit(packed))
        }
        QuantizedKind::Bnb8bit => load_8bit(weight_name, get).map(QuantizedWeight::EightBit),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockwise::{dequantize_4bit, quantize_4bit};

    fn ramp(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 70.0)
            .collect()
    }

    #[test]
    fn python_repr() {
        for (x, s) in [
            (0.052208006381988525, "0.052208006381988525"),
            (1e-4, "0.0001"),
            (1e-5, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (-2.5e-5, "-2.5e-05"),
            (1e16, "1e+16"),
            (1.2345e17, "1.2345e+17"),
            (1e15, "1000000000000000.0"),
            (123.0, "123.0"),
            (0.5, "0.5"),
            (-0.0, "-0.0"),
            (0.0, "0.0"),
            (6.0, "6.0"),
            (12.375, "12.375"),
            (f64::from(0.1f32), "0.10000000149011612"),
        ] {
            assert_eq!(python_float_repr(x), s, "{x:e}");
            assert_eq!(s.parse::<f64>().unwrap().to_bits(), x.to_bits());
        }
    }

    #[test]
    fn round_trip_4bit() {
        for (qt, dq) in [(QuantType::Nf4, true), (QuantType::Fp4, false)] {
            let q = quantize_4bit(&ramp(64 * 5 + 10), &[5, 66], 64, qt, dq).unwrap();
            let sd = state_dict_4bit("m.w.weight", &q).unwrap();
            let names: Vec<&str> = sd.iter().map(|(n, _)| n.as_str()).collect();
            let expected: &[&str] = if dq {
                &[
                    "m.w.weight",
                    "m.w.weight.absmax",
                    "m.w.weight.quant_map",
                    "m.w.weight.nested_absmax",
                    "m.w.weight.nested_quant_map",
                    "m.w.weight.quant_state.bitsandbytes__nf4",
                ]
            } else {
                &[
                    "m.w.weight",
                    "m.w.weight.absmax",
                    "m.w.weight.quant_map",
                    "m.w.weight.quant_state.bitsandbytes__fp4",
                ]
            };
            assert_eq!(names, expected);
            assert_eq!(sd[0].1.shape, vec![(5 * 66usize).div_ceil(2), 1]);
            let back = load_4bit("m.w.weight", saved_lookup(&sd)).unwrap();
            assert_eq!(back, q);
            assert_eq!(
                dequantize_4bit(&back).unwrap(),
                dequantize_4bit(&q).unwrap()
            );
            let layout = quantized_layout(names.iter().copied()).unwrap();
            assert_eq!(layout.kind("m.w.weight"), Some(QuantizedKind::Bnb4bit(qt)));
            assert!(names[1..].iter().all(|n| !layout.is_plain(n)));
        }
    }

    #[test]
    fn json_format() {
        let q = quantize_4bit(&ramp(3000), &[3000], 4096, QuantType::Fp4, true).unwrap();
        let json = QuantStateJson::of(&q, "bfloat16").to_bytes();
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(text.starts_with(
            "{\"quant_type\": \"fp4\", \"blocksize\": 4096, \"dtype\": \"bfloat16\", \"shape\": [3000], \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": "
        ), "{text}");
        let parsed = QuantStateJson::parse(&json).unwrap();
        assert_eq!(parsed, QuantStateJson::of(&q, "bfloat16"));
    }

    #[test]
    fn round_trip_8bit() {
        let w = Int8Weight::quantize(3, 4, &ramp(12)).unwrap();
        let sd = state_dict_8bit("a.b.weight", &w).unwrap();
        let names: Vec<&str> = sd.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a.b.weight", "a.b.SCB", "a.b.weight_format"]);
        assert_eq!(sd[2].1.shape, Vec::<usize>::new());
        assert_eq!(load_8bit("a.b.weight", saved_lookup(&sd)).unwrap(), w);
        let sd = state_dict_8bit("weight", &w).unwrap();
        assert_eq!(sd[1].0, "SCB");
        assert_eq!(load_8bit("weight", saved_lookup(&sd)).unwrap(), w);
        assert!(matches!(
            state_dict_8bit("a.b.bias", &w),
            Err(CheckpointError::NotAWeightName { .. })
        ));
        assert!(matches!(
            state_dict_8bit("a.bweight", &w),
            Err(CheckpointError::NotAWeightName { .. })
        ));
        let layout = quantized_layout(names.iter().copied()).unwrap();
        assert_eq!(layout.kind("a.b.weight"), Some(QuantizedKind::Bnb8bit));
        assert!(!layout.is_plain("a.b.SCB") && !layout.is_plain("a.b.weight_format"));
        assert!(layout.is_plain("a.b.bias"));
    }

    #[test]
    fn weight_format_checks() {
        let w = Int8Weight::quantize(2, 2, &[1.0, 2.0, 3.0, 4.0]).unwrap();
        let mut sd = state_dict_8bit("l.weight", &w).unwrap();
        sd.pop(); // weight_format is optional
        assert!(load_8bit("l.weight", saved_lookup(&sd)).is_ok());
        sd.push((
            "l.weight_format".into(),
            SavedTensor::from_u8(vec![], vec![1]),
        ));
        assert_eq!(
            load_8bit("l.weight", saved_lookup(&sd)),
            Err(CheckpointError::UnsupportedWeightFormat {
                tensor: "l.weight_format".into(),
                value: 1
            })
        );
    }

    #[test]
    fn ambiguous_markers() {
        let err = quantized_layout([
            "x.weight",
            "x.weight.quant_state.bitsandbytes__nf4",
            "x.weight.quant_state.bitsandbytes__fp4",
        ])
        .unwrap_err();
        assert!(
            matches!(err, CheckpointError::AmbiguousQuantization { ref weight, .. } if weight == "x.weight")
        );
        let layout = quantized_layout(["x.weight", "x.bias", "y.weight"]).unwrap();
        assert!(layout.is_empty());
    }
}
