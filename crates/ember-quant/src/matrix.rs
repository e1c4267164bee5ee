//! [`QuantizedLinear`]: a linear layer's weight kept packed in memory (4-bit NF4 / FP4 or
//! LLM.int8) with the products a model needs, each reading the packed weight directly.
//!
//! This is what a quantized model holds instead of a float32 weight: the packed bytes and
//! scales of [`QuantizedWeight`] and nothing else, so a 4-bit layer costs about half a byte per
//! parameter for as long as it lives. The products dequantize on the fly:
//!
//! - [`QuantizedLinear::forward`]: `out += x · Wᵀ` for rows `x` (decoding, prefill, training);
//! - [`QuantizedLinear::backward_input`]: `grad_in += grad_out · W`, the only gradient of a
//!   frozen quantized base (QLoRA trains adapters beside it, never the weight itself).
//!
//! 4-bit products compute in `bnb_4bit_compute_dtype` ([`ComputeDtype`]); int8 products follow
//! `Linear8bitLt` (LLM.int8 with the outlier threshold).

use crate::error::{QuantError, Result};
use crate::int8::INV_127;
use crate::kernels::{self, Isa};
use crate::serialize::QuantizedWeight;

/// The dtype a 4-bit product computes in (`bnb_4bit_compute_dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ComputeDtype {
    /// float32 inputs and dequantized weights (transformers' default).
    #[default]
    F32,
    /// Inputs and dequantized weights rounded to bfloat16, accumulated in float32, the result
    /// rounded to bfloat16 (as a bfloat16 `matmul` computes).
    Bf16,
}

impl ComputeDtype {
    /// Reads a transformers dtype name (`float32`, `bfloat16`, with or without `torch.`).
    ///
    /// # Errors
    ///
    /// [`QuantError::UnknownComputeDtype`] for any other name (float16 is not supported: its
    /// products on the CPU are not faster, only less exact).
    pub fn parse(name: &str) -> Result<Self> {
        match name.trim_start_matches("torch.") {
            "float32" | "float" | "fp32" => Ok(ComputeDtype::F32),
            "bfloat16" | "bf16" => Ok(ComputeDtype::Bf16),
            other => Err(QuantError::UnknownComputeDtype(other.to_owned())),
        }
    }
}

/// A packed linear weight `[out_features, in_features]` and how its products compute.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedLinear {
    /// The packed weight and its scales, in bitsandbytes' layout.
    pub weight: QuantizedWeight,
    /// The dtype of 4-bit products.
    pub compute_dtype: ComputeDtype,
    /// LLM.int8's outlier threshold (`llm_int8_threshold`); `0` turns the decomposition off.
    pub threshold: f32,
}

impl QuantizedLinear {
    /// Wraps a packed weight, checking that it is a 2-D `[out_features, in_features]` matrix.
    ///
    /// # Errors
    ///
    /// [`QuantError::InvalidShape`] for a 4-bit weight of another rank, or any error of the
    /// weight's own checks (lengths of codes and scales).
    pub fn new(
        weight: QuantizedWeight,
        compute_dtype: ComputeDtype,
        threshold: f32,
    ) -> Result<Self> {
        match &weight {
            QuantizedWeight::FourBit(p) => {
                if p.state.shape.len() != 2 {
                    return Err(QuantError::InvalidShape {
                        tensor: "weight",
                        shape: p.state.shape.clone(),
                        reason: "a linear weight must be 2-D [out_features, in_features]",
                    });
                }
                p.validate()?;
            }
            QuantizedWeight::EightBit(w) => w.validate()?,
        }
        Ok(QuantizedLinear {
            weight,
            compute_dtype,
            threshold,
        })
    }

    /// Rows of the weight (the layer's outputs).
    pub fn out_features(&self) -> usize {
        match &self.weight {
            QuantizedWeight::FourBit(p) => p.state.shape[0],
            QuantizedWeight::EightBit(w) => w.out_features,
        }
    }

    /// Columns of the weight (the layer's inputs).
    pub fn in_features(&self) -> usize {
        match &self.weight {
            QuantizedWeight::FourBit(p) => p.state.shape[1],
            QuantizedWeight::EightBit(w) => w.in_features,
        }
    }

    /// Bytes held in memory: packed codes and every scale.
    pub fn storage_bytes(&self) -> usize {
        match &self.weight {
            QuantizedWeight::FourBit(p) => {
                let scales = match &p.state.absmax {
                    crate::Absmax::Plain(a) => a.len() * 4,
                    crate::Absmax::Nested(n) => {
                        n.codes.len() + n.nested_absmax.len() * 4 + 256 * 4 + 4
                    }
                };
                p.packed.len() + scales + 16 * 4
            }
            QuantizedWeight::EightBit(w) => w.codes.len() + w.scb.len() * 4,
        }
    }

    /// The weight in float32, `[out_features, in_features]` row-major (the fallback on
    /// backends without these kernels, and merging adapters into the base). A 4-bit weight
    /// gives exactly `dequantize_4bit`'s values.
    pub fn dequantize(&self) -> Vec<f32> {
        match &self.weight {
            QuantizedWeight::FourBit(p) => kernels::dequantize_4bit(Isa::detect(), p),
            QuantizedWeight::EightBit(w) => w
                .codes
                .chunks(w.in_features.max(1))
                .zip(&w.scb)
                .flat_map(|(row, &s)| {
                    let scale = s * INV_127;
                    row.iter().map(move |&c| f32::from(c) * scale)
                })
                .collect(),
        }
    }

    /// `out += x · Wᵀ` for `x: [rows, in_features]` and `out: [rows, out_features]`.
    ///
    /// A 4-bit weight is read packed: up to a few rows through a GEMV that dequantizes in
    /// registers, more rows by dequantizing tiles of the weight into a float32 GEMM. An int8
    /// weight computes LLM.int8 bit for bit as [`crate::int8_linear`] (without a bias).
    ///
    /// # Panics
    ///
    /// If the slice lengths do not fit `rows` and the weight's shape (a caller bug).
    pub fn forward(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        let (n_out, n_in) = (self.out_features(), self.in_features());
        assert_eq!(x.len(), rows * n_in, "x must be [rows, in_features]");
        assert_eq!(out.len(), rows * n_out, "out must be [rows, out_features]");
        kernels::forward(Isa::detect(), self, x, rows, out);
    }

    /// `grad_in += grad_out · W` for `grad_out: [rows, out_features]` and
    /// `grad_in: [rows, in_features]`: the input's gradient through the frozen weight (the
    /// float32 dequantized weight, whatever the compute dtype), by tiles of the weight
    /// dequantized into a float32 GEMM.
    ///
    /// # Panics
    ///
    /// If the slice lengths do not fit `rows` and the weight's shape (a caller bug).
    pub fn backward_input(&self, grad_out: &[f32], rows: usize, grad_in: &mut [f32]) {
        let (n_out, n_in) = (self.out_features(), self.in_features());
        assert_eq!(
            grad_out.len(),
            rows * n_out,
            "grad_out must be [rows, out_features]"
        );
        assert_eq!(
            grad_in.len(),
            rows * n_in,
            "grad_in must be [rows, in_features]"
        );
        kernels::backward_input(Isa::detect(), self, grad_out, rows, grad_in);
    }
}

/// Rounds to the nearest bfloat16 (ties to even), kept as float32.
#[inline]
pub(crate) fn round_bf16(v: f32) -> f32 {
    half::bf16::from_f32(v).to_f32()
}
