//! The float dtype a model's weights are kept in: transformers' `dtype=` (formerly
//! `torch_dtype=`) of `from_pretrained`, `model.half()` / `.bfloat16()` / `.float()`, and the
//! `dtype` field `save_pretrained` writes into `config.json`.
//!
//! Half-precision weights are stored as half-precision tensors (two bytes per value, never an
//! f32 copy). Converting to float16 refuses a value beyond float16's range rather than turning
//! it into infinity silently.

use std::fmt;
use std::str::FromStr;

use burn::module::Param;
use burn::tensor::{backend::Backend, DType, ElementConversion, Tensor};

use crate::error::{ModelError, Result};
use crate::params::{visit_projection, ParamVisitor};

/// The largest finite float16 value: a weight beyond it would become infinity.
pub const F16_MAX: f32 = 65504.0;

/// A float dtype of model weights, by transformers' name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum FloatDtype {
    /// `torch.float32` (transformers' default without `"auto"`).
    #[default]
    Float32,
    /// `torch.bfloat16`: float32's range, 8 bits of precision.
    BFloat16,
    /// `torch.float16`: 11 bits of precision, largest value 65504.
    Float16,
}

impl FloatDtype {
    /// transformers' spelling, as written into `config.json`: `float32`, `bfloat16`, `float16`.
    pub fn as_str(self) -> &'static str {
        match self {
            FloatDtype::Float32 => "float32",
            FloatDtype::BFloat16 => "bfloat16",
            FloatDtype::Float16 => "float16",
        }
    }

    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            FloatDtype::Float32 => 4,
            FloatDtype::BFloat16 | FloatDtype::Float16 => 2,
        }
    }

    /// The burn dtype tensors of this dtype carry.
    pub fn burn(self) -> DType {
        match self {
            FloatDtype::Float32 => DType::F32,
            FloatDtype::BFloat16 => DType::BF16,
            FloatDtype::Float16 => DType::F16,
        }
    }

    /// The dtype of a burn float tensor, `None` for one this crate does not keep weights in
    /// (f64, quantized).
    pub fn of(dtype: DType) -> Option<FloatDtype> {
        match dtype {
            DType::F32 => Some(FloatDtype::Float32),
            DType::BF16 => Some(FloatDtype::BFloat16),
            DType::F16 => Some(FloatDtype::Float16),
            _ => None,
        }
    }
}

impl fmt::Display for FloatDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FloatDtype {
    type Err = ModelError;

    /// The names torch and transformers accept: `float32` / `float` / `fp32`, `bfloat16` /
    /// `bf16`, `float16` / `half` / `fp16`, each also with a `torch.` prefix.
    fn from_str(name: &str) -> Result<Self> {
        match name.strip_prefix("torch.").unwrap_or(name) {
            "float32" | "float" | "fp32" => Ok(FloatDtype::Float32),
            "bfloat16" | "bf16" => Ok(FloatDtype::BFloat16),
            "float16" | "half" | "fp16" => Ok(FloatDtype::Float16),
            _ => Err(ModelError::Input(format!(
                "unknown dtype `{name}`: expected float32, bfloat16, float16 or auto"
            ))),
        }
    }
}

/// `from_pretrained(..., dtype=)`: a fixed dtype, or `"auto"` (the checkpoint's `dtype` /
/// `torch_dtype` in `config.json`, float32 when it has neither).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DtypeArg {
    /// Read `config.json`.
    Auto,
    /// This dtype, whatever the checkpoint holds.
    Fixed(FloatDtype),
}

impl FromStr for DtypeArg {
    type Err = ModelError;

    fn from_str(name: &str) -> Result<Self> {
        if name == "auto" {
            Ok(DtypeArg::Auto)
        } else {
            name.parse().map(DtypeArg::Fixed)
        }
    }
}

impl From<FloatDtype> for DtypeArg {
    fn from(dtype: FloatDtype) -> Self {
        DtypeArg::Fixed(dtype)
    }
}

impl DtypeArg {
    /// The dtype to load in: `config` is `config.json` (read at `path`, named in errors).
    pub fn resolve(self, config: &serde_json::Value, path: &std::path::Path) -> Result<FloatDtype> {
        match self {
            DtypeArg::Fixed(d) => Ok(d),
            DtypeArg::Auto => match config_dtype(config) {
                // transformers reads `dtype`, then the older `torch_dtype`.
                Some(name) => name.parse().map_err(|_| ModelError::Config {
                    path: path.to_owned(),
                    message: format!(
                        "field `dtype` is `{name}`: expected float32, bfloat16 or float16"
                    ),
                }),
                None => Ok(FloatDtype::Float32),
            },
        }
    }
}

/// `config.json`'s `dtype`, else its `torch_dtype`.
fn config_dtype(config: &serde_json::Value) -> Option<&str> {
    ["dtype", "torch_dtype"]
        .iter()
        .find_map(|k| config.get(k).and_then(|v| v.as_str()))
}

/// `t` converted to `dtype` (rounding to nearest even, as torch's `.to()`); `key` names the
/// tensor when a value does not fit float16.
pub(crate) fn cast_tensor<B: Backend, const D: usize>(
    t: Tensor<B, D>,
    dtype: FloatDtype,
    key: &str,
) -> Result<Tensor<B, D>> {
    if FloatDtype::of(t.dtype()) == Some(dtype) {
        return Ok(t);
    }
    if dtype == FloatDtype::Float16 {
        // Finite values that would round to infinity; an infinity or NaN already in the
        // weights stays what it is, as in torch.
        let largest: f32 = t
            .clone()
            .abs()
            .mask_fill(t.clone().is_inf(), 0.0)
            .mask_fill(t.clone().is_nan(), 0.0)
            .max()
            .into_scalar()
            .elem();
        // Values up to 65519.99 round down to 65504 (half of the last ulp is 16).
        if largest >= F16_MAX + 16.0 {
            return Err(ModelError::Fp16Overflow {
                key: key.to_owned(),
                value: largest,
            });
        }
    }
    // Through float32 (exact), then rounded to nearest even as torch rounds.
    let t = ember_kernels::float32(t);
    Ok(match dtype {
        FloatDtype::Float32 => t,
        half => ember_kernels::to_half(t, half.burn()),
    })
}

/// `dtype()`, `to_dtype()`, `half()`, `bfloat16()` and `float()` for a model type that
/// implements `VisitParams` (every model class of this crate).
macro_rules! dtype_methods {
    () => {
        /// The dtype of the weights (`model.dtype`).
        pub fn dtype(&self) -> $crate::FloatDtype {
            $crate::dtype::model_dtype(self)
        }

        /// Every float parameter converted to `dtype`, as `model.to(dtype)`; converting to
        /// float16 refuses a weight beyond its range with an error naming it. Quantized
        /// layers keep their packed weights.
        pub fn to_dtype(self, dtype: $crate::FloatDtype) -> $crate::Result<Self> {
            self.visit("", &mut $crate::dtype::Caster { dtype })
        }

        /// `model.half()`: float16 weights.
        pub fn half(self) -> $crate::Result<Self> {
            self.to_dtype($crate::FloatDtype::Float16)
        }

        /// `model.bfloat16()`: bfloat16 weights.
        pub fn bfloat16(self) -> $crate::Result<Self> {
            self.to_dtype($crate::FloatDtype::BFloat16)
        }

        /// `model.float()`: float32 weights.
        pub fn float(self) -> $crate::Result<Self> {
            self.to_dtype($crate::FloatDtype::Float32)
        }
    };
}
pub(crate) use dtype_methods;

/// Converts every float parameter of a model to one dtype (`model.to(dtype)`). Quantized
/// layers keep their packed weights; their other parameters (biases) convert.
pub(crate) struct Caster {
    /// The dtype to convert to.
    pub dtype: FloatDtype,
}

impl<B: Backend> ParamVisitor<B> for Caster {
    fn visit1(&mut self, key: &str, param: Param<Tensor<B, 1>>) -> Result<Param<Tensor<B, 1>>> {
        cast_param(param, self.dtype, key)
    }

    fn visit2(
        &mut self,
        key: &str,
        param: Param<Tensor<B, 2>>,
        _: bool,
    ) -> Result<Param<Tensor<B, 2>>> {
        cast_param(param, self.dtype, key)
    }

    fn projection(
        &mut self,
        key: &str,
        layer: ember_peft::Projection<B>,
    ) -> Result<ember_peft::Projection<B>> {
        visit_projection(self, key, layer)
    }
}

/// A parameter converted to `dtype`, keeping its id and whether it requires a gradient.
fn cast_param<B: Backend, const D: usize>(
    param: Param<Tensor<B, D>>,
    dtype: FloatDtype,
    key: &str,
) -> Result<Param<Tensor<B, D>>> {
    let (id, t, _) = param.consume();
    let grad = t.is_require_grad();
    let t = cast_tensor(t, dtype, key)?;
    Ok(Param::initialized(
        id,
        if grad { t.require_grad() } else { t },
    ))
}

/// Finds the dtype of a model's float parameters (the first one visited).
#[derive(Default)]
pub(crate) struct DtypeProbe {
    /// The dtype found, once a parameter was seen.
    pub found: Option<FloatDtype>,
}

impl<B: Backend> ParamVisitor<B> for DtypeProbe {
    fn visit1(&mut self, _: &str, param: Param<Tensor<B, 1>>) -> Result<Param<Tensor<B, 1>>> {
        self.found = self.found.or_else(|| param_dtype(&param));
        Ok(param)
    }

    fn visit2(
        &mut self,
        _: &str,
        param: Param<Tensor<B, 2>>,
        _: bool,
    ) -> Result<Param<Tensor<B, 2>>> {
        self.found = self.found.or_else(|| param_dtype(&param));
        Ok(param)
    }
}

/// The dtype of a model's float parameters (float32 for a model without any).
pub(crate) fn model_dtype<B: Backend, M: crate::params::VisitParams<B> + Clone>(
    model: &M,
) -> FloatDtype {
    let mut probe = DtypeProbe::default();
    // The probe never fails: it only reads.
    let _ = model.clone().visit("", &mut probe);
    probe.found.unwrap_or_default()
}

/// The dtype of a parameter without initialising a lazy one (those are float32).
pub(crate) fn param_dtype<B: Backend, const D: usize>(
    param: &Param<Tensor<B, D>>,
) -> Option<FloatDtype> {
    if param.is_initialized() {
        FloatDtype::of(param.val().dtype())
    } else {
        Some(FloatDtype::Float32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::TensorData;

    #[test]
    fn names_parse_as_torch_spells_them() {
        for (name, want) in [
            ("float32", FloatDtype::Float32),
            ("torch.float", FloatDtype::Float32),
            ("bf16", FloatDtype::BFloat16),
            ("torch.bfloat16", FloatDtype::BFloat16),
            ("half", FloatDtype::Float16),
            ("float16", FloatDtype::Float16),
        ] {
            assert_eq!(name.parse::<FloatDtype>().unwrap(), want, "{name}");
        }
        let err = "float8".parse::<FloatDtype>().unwrap_err().to_string();
        assert!(err.contains("`float8`"), "{err}");
        assert_eq!("auto".parse::<DtypeArg>().unwrap(), DtypeArg::Auto);
    }

    #[test]
    fn auto_reads_dtype_then_torch_dtype() {
        let p = std::path::Path::new("config.json");
        let auto = DtypeArg::Auto;
        let v = serde_json::json!({"torch_dtype": "bfloat16"});
        assert_eq!(auto.resolve(&v, p).unwrap(), FloatDtype::BFloat16);
        let v = serde_json::json!({"dtype": "float16", "torch_dtype": "bfloat16"});
        assert_eq!(auto.resolve(&v, p).unwrap(), FloatDtype::Float16);
        assert_eq!(
            auto.resolve(&serde_json::json!({}), p).unwrap(),
            FloatDtype::Float32
        );
        let err = auto
            .resolve(&serde_json::json!({"dtype": "int4"}), p)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("config.json") && err.contains("`int4`"),
            "{err}"
        );
    }

    #[test]
    fn float16_refuses_values_that_would_become_infinite() {
        let device = Default::default();
        let t = |v: Vec<f32>| {
            Tensor::<Flex, 1>::from_data(TensorData::new(v.clone(), [v.len()]), &device)
        };
        // 65519 rounds down to 65504: kept; 65520 would round to infinity: refused.
        let ok = cast_tensor(
            t(vec![1.0, -65519.0, f32::INFINITY]),
            FloatDtype::Float16,
            "w",
        )
        .unwrap();
        assert_eq!(ok.dtype(), DType::F16);
        let err = cast_tensor(t(vec![1.0, 70000.0]), FloatDtype::Float16, "layer.w")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`layer.w`") && err.contains("70000"), "{err}");
        // bfloat16 has float32's range.
        let bf = cast_tensor(t(vec![70000.0]), FloatDtype::BFloat16, "w").unwrap();
        assert_eq!(bf.dtype(), DType::BF16);
    }
}
