//! Rotary position embeddings (RoPE) with HF's `rope_parameters` / `rope_scaling` variants:
//! `default`, `linear`, `dynamic` (NTK) and `llama3`.
//!
//! The inverse frequencies are computed in f32 on the host as `transformers` does; cosines
//! and sines are computed on the device from the position ids, so a batch never syncs.

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use serde_json::{Map, Value};

/// The scaling variants Ember implements.
pub const SUPPORTED_ROPE_TYPES: [&str; 4] = ["default", "linear", "dynamic", "llama3"];

/// The resolved rotary parameters of a config.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeParameters {
    /// `rope_type`: one of [`SUPPORTED_ROPE_TYPES`].
    pub rope_type: String,
    /// `rope_theta`: the base of the frequencies.
    pub theta: f64,
    /// `factor` of the linear, dynamic and llama3 variants.
    pub factor: f64,
    /// `original_max_position_embeddings` (llama3, dynamic); the model's
    /// `max_position_embeddings` when absent.
    pub original_max_position_embeddings: usize,
    /// `low_freq_factor` (llama3).
    pub low_freq_factor: f64,
    /// `high_freq_factor` (llama3).
    pub high_freq_factor: f64,
}

impl RopeParameters {
    /// Reads transformers 5's `rope_parameters` object, or the older top-level `rope_theta`
    /// plus `rope_scaling` object (`type` or `rope_type`). Errors name the unsupported value.
    pub fn from_config(
        rope_parameters: Option<&Value>,
        rope_scaling: Option<&Value>,
        rope_theta: Option<f64>,
        max_position_embeddings: usize,
    ) -> Result<Self, String> {
        let empty = Map::new();
        let object =
            |v: Option<&Value>, name: &str| -> Result<Option<Map<String, Value>>, String> {
                match v {
                    None | Some(Value::Null) => Ok(None),
                    Some(Value::Object(m)) => Ok(Some(m.clone())),
                    Some(other) => Err(format!("{name} `{other}` is not an object")),
                }
            };
        let params = object(rope_parameters, "rope_parameters")?;
        let scaling = object(rope_scaling, "rope_scaling")?;
        let m = params.as_ref().or(scaling.as_ref()).unwrap_or(&empty);
        let number = |key: &str| m.get(key).and_then(Value::as_f64);
        let rope_type = m
            .get("rope_type")
            .or_else(|| m.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_owned();
        if !SUPPORTED_ROPE_TYPES.contains(&rope_type.as_str()) {
            return Err(format!(
                "rope_scaling type `{rope_type}` is not supported (supported: {})",
                SUPPORTED_ROPE_TYPES.join(", ")
            ));
        }
        let factor = number("factor").unwrap_or(1.0);
        if rope_type != "default" && factor <= 0.0 {
            return Err(format!("rope_scaling factor {factor} must be positive"));
        }
        Ok(Self {
            rope_type,
            theta: number("rope_theta").or(rope_theta).unwrap_or(10_000.0),
            factor,
            original_max_position_embeddings: number("original_max_position_embeddings")
                .map_or(max_position_embeddings, |v| v as usize),
            low_freq_factor: number("low_freq_factor").unwrap_or(1.0),
            high_freq_factor: number("high_freq_factor").unwrap_or(4.0),
        })
    }

    /// The inverse frequencies `[dim / 2]` for sequences up to `seq_len` positions (only the
    /// dynamic variant depends on it).
    pub fn inv_freq(&self, dim: usize, seq_len: usize) -> Vec<f32> {
        let base = |theta: f64| -> Vec<f32> {
            (0..dim)
                .step_by(2)
                .map(|i| 1.0 / (theta as f32).powf(i as f32 / dim as f32))
                .collect()
        };
        match self.rope_type.as_str() {
            "linear" => base(self.theta)
                .into_iter()
                .map(|f| f / self.factor as f32)
                .collect(),
            "dynamic" => {
                let max = self.original_max_position_embeddings;
                if seq_len <= max {
                    return base(self.theta);
                }
                let scale = self.factor * seq_len as f64 / max as f64 - (self.factor - 1.0);
                base(self.theta * scale.powf(dim as f64 / (dim as f64 - 2.0)))
            }
            "llama3" => {
                let old = self.original_max_position_embeddings as f32;
                let (factor, low, high) = (
                    self.factor as f32,
                    self.low_freq_factor as f32,
                    self.high_freq_factor as f32,
                );
                let (low_wavelen, high_wavelen) = (old / low, old / high);
                base(self.theta)
                    .into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
            _ => base(self.theta),
        }
    }
}

/// Cosines and sines `[batch, 1, seq, dim]` for the given positions.
pub(crate) fn cos_sin<B: Backend>(
    inv_freq: &[f32],
    positions: Tensor<B, 2, Int>,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let [batch, seq] = positions.dims();
    let half = inv_freq.len();
    let device = positions.device();
    let inv = Tensor::<B, 1>::from_data(TensorData::new(inv_freq.to_vec(), [half]), &device)
        .reshape([1, 1, half]);
    let freqs = positions.float().reshape([batch, seq, 1]) * inv;
    let emb = Tensor::cat(vec![freqs.clone(), freqs], 2).unsqueeze_dim::<4>(1);
    (emb.clone().cos(), emb.sin())
}

/// `q · cos + rotate_half(q) · sin`, HF's `apply_rotary_pos_emb` for one tensor
/// `[batch, heads, seq, dim]`.
pub(crate) fn apply<B: Backend>(
    x: Tensor<B, 4>,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
) -> Tensor<B, 4> {
    if let Some(rotated) = ember_kernels::rotary(&x, cos, sin) {
        return rotated;
    }
    let [b, h, s, d] = x.dims();
    let x1 = x.clone().slice([0..b, 0..h, 0..s, 0..d / 2]);
    let x2 = x.clone().slice([0..b, 0..h, 0..s, d / 2..d]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.clone() + rotated * sin.clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(v: Value) -> Result<RopeParameters, String> {
        RopeParameters::from_config(Some(&v), None, None, 2048)
    }

    #[test]
    fn reads_both_config_spellings() {
        let new =
            params(json!({"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0})).unwrap();
        let old = RopeParameters::from_config(
            None,
            Some(&json!({"type": "linear", "factor": 2.0})),
            Some(500.0),
            2048,
        )
        .unwrap();
        assert_eq!(new, old);
        assert_eq!(
            new.inv_freq(4, 1),
            vec![1.0 / 2.0, 1.0 / (500f32.sqrt() * 2.0)]
        );
    }

    #[test]
    fn unknown_type_is_named() {
        let e = params(json!({"rope_type": "yarn", "factor": 4.0})).unwrap_err();
        assert!(e.contains("`yarn`"), "{e}");
    }

    #[test]
    fn llama3_keeps_high_and_scales_low_frequencies() {
        let p = params(json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "rope_theta": 500000.0}))
        .unwrap();
        let plain = RopeParameters::from_config(None, None, Some(500000.0), 2048).unwrap();
        let (a, b) = (p.inv_freq(128, 1), plain.inv_freq(128, 1));
        assert_eq!(a[0], b[0]);
        assert_eq!(a[63], b[63] / 8.0);
    }

    #[test]
    fn dynamic_changes_only_beyond_the_original_length() {
        let p = params(json!({"rope_type": "dynamic", "factor": 2.0})).unwrap();
        assert_eq!(p.inv_freq(8, 2048), p.inv_freq(8, 10));
        assert!(p.inv_freq(8, 4096)[1] < p.inv_freq(8, 10)[1]);
    }
}
