//! bitsandbytes-style quantization for burn: the storage formats, bit for bit.
//!
//! This part of the crate is plain Rust on `f32` slices (no burn): it reproduces what
//! bitsandbytes 0.50 computes on the CPU, so that a QLoRA / LLM.int8 checkpoint written by
//! bitsandbytes loads into the same bytes and dequantizes to the same float32 values.
//!
//! - [`code`]: the NF4 and FP4 codes and `create_dynamic_map` (the 8-bit dynamic code).
//! - [`blockwise`]: 4-bit NF4 / FP4 blockwise quantization with optional double quantization
//!   ([`quantize_4bit`] / [`dequantize_4bit`]).
//! - [`blockwise8`]: 8-bit blockwise quantization with the dynamic map ([`quantize_blockwise`] /
//!   [`dequantize_blockwise`]), also the nested absmax of double quantization.
//! - [`int8`]: LLM.int8 row-wise quantization with outlier columns ([`int8_vectorwise_quant`]).
//! - [`serialize`]: the tensors of a bitsandbytes checkpoint (`model.safetensors` as transformers
//!   saves a 4-bit or LLM.int8 model), read and written byte for byte ([`load_4bit`],
//!   [`state_dict_4bit`], [`load_8bit`], [`state_dict_8bit`], [`quantized_layout`]).
//! - [`config`]: transformers' `BitsAndBytesConfig`, the `quantization_config` of `config.json`.
//! - [`matrix`]: [`QuantizedLinear`], a packed weight held in memory with products that
//!   dequantize on the fly (the storage of a quantized model's layers).
//! - [`linear`]: reference products of a float32 input with an int8 or 4-bit weight, matching
//!   `bnb.nn.Linear8bitLt` and `bnb.nn.Linear4bit` on the CPU.
//!
//! Names follow bitsandbytes (`absmax`, `SCB`, `quant_map`, `nested_absmax`, `offset`,
//! `compress_statistics`, ...). `tests/bitsandbytes_parity.rs` checks every format bit for bit
//! against fixtures made by `tests/fixtures/quant/make_quant_fixtures.py`; the module docs say
//! which bitsandbytes kernel each function reproduces and where bitsandbytes' own kernels
//! disagree with each other.

pub mod blockwise;
pub mod blockwise8;
pub mod code;
pub mod config;
mod error;
pub mod int8;
mod kernels;
pub mod linear;
pub mod matrix;
pub mod serialize;
mod torch_sum;

pub use blockwise::{
    dequantize_4bit, quantize_4bit, Absmax, NestedAbsmax, Packed4bit, QuantState4bit, QuantType,
    NESTED_BLOCKSIZE,
};
pub use blockwise8::{dequantize_blockwise, quantize_blockwise, Blockwise8bit};
pub use code::{create_dynamic_map, dynamic_map, FP4_CODE, NF4_CODE};
pub use config::{BitsAndBytesConfig, ConfigError};
pub use error::{QuantError, Result};
pub use int8::{int8_vectorwise_dequant, int8_vectorwise_quant, Int8Quantized, Int8Weight};
pub use linear::{int8_linear, int8_linear_dequantized, linear_4bit};
pub use matrix::{ComputeDtype, QuantizedLinear};
pub use serialize::{
    load_4bit, load_8bit, load_quantized, quantized_layout, safetensors_lookup, saved_lookup,
    state_dict_4bit, state_dict_4bit_with_dtype, state_dict_8bit, CheckpointError, QuantizedKind,
    QuantizedLayout, QuantizedWeight, SavedDtype, SavedTensor, TensorRef,
};
