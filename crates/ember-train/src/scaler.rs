//! Dynamic loss scaling for float16 training: torch's `torch.amp.GradScaler`, with its
//! arguments as accelerate's `GradScalerKwargs` and its checkpoint state under torch's
//! `state_dict()` names.
//!
//! float16 holds nothing below about 6e-8 (subnormals) or above 65504, and small gradients
//! vanish in it. The loss is multiplied by a large scale before the backward pass so that the
//! half-precision gradients stay representable, and the gradients are divided by it before the
//! optimizer sees them. A scale that is too large overflows some gradient to infinity: that
//! step is skipped and the scale halved. After `growth_interval` clean steps in a row it is
//! doubled again, so it stays near the largest value that does not overflow.

use crate::error::{Result, TrainError};
use crate::model::TrainableParam;
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The scaler's settings: accelerate's `GradScalerKwargs`, with torch's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GradScalerKwargs {
    /// The scale of the first step. torch default: 2^16.
    pub init_scale: f64,
    /// The factor the scale grows by after `growth_interval` clean steps. torch default: 2.
    pub growth_factor: f64,
    /// The factor the scale shrinks by after a step with inf / NaN gradients. torch
    /// default: 0.5.
    pub backoff_factor: f64,
    /// Clean steps in a row before the scale grows. torch default: 2000.
    pub growth_interval: u32,
    /// Whether to scale at all (false: float16 autocast without loss scaling). torch
    /// default: true.
    pub enabled: bool,
}

impl Default for GradScalerKwargs {
    fn default() -> Self {
        Self {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            enabled: true,
        }
    }
}

/// torch's `GradScaler`: [`scale`](Self::scale) the loss, [`unscale`](Self::unscale) the
/// gradients (which finds inf / NaN), skip the optimizer step when it did, then
/// [`update`](Self::update).
#[derive(Debug, Clone, PartialEq)]
pub struct GradScaler {
    /// The current scale, an f32 as torch keeps it.
    scale: f32,
    growth_factor: f32,
    backoff_factor: f32,
    growth_interval: u32,
    /// Clean steps since the scale last changed.
    growth_tracker: u32,
    enabled: bool,
}

impl GradScaler {
    /// A scaler with `kwargs`; torch's checks: a finite scale > 0, a growth factor > 1 and a
    /// back-off factor in (0, 1), a growth interval ≥ 1.
    pub fn new(kwargs: &GradScalerKwargs) -> Result<Self> {
        let bad = |field: &str, message: String| {
            Err(TrainError::Argument {
                field: format!("GradScalerKwargs.{field}"),
                message,
            })
        };
        let GradScalerKwargs {
            init_scale,
            growth_factor,
            backoff_factor,
            growth_interval,
            enabled,
        } = *kwargs;
        if !(init_scale.is_finite() && init_scale > 0.0) {
            return bad(
                "init_scale",
                format!("must be finite and > 0, found {init_scale}"),
            );
        }
        if !(growth_factor.is_finite() && growth_factor > 1.0) {
            return bad(
                "growth_factor",
                format!("must be > 1, found {growth_factor}"),
            );
        }
        if !(backoff_factor > 0.0 && backoff_factor < 1.0) {
            return bad(
                "backoff_factor",
                format!("must be in (0, 1), found {backoff_factor}"),
            );
        }
        if growth_interval == 0 {
            return bad("growth_interval", "must be at least 1, found 0".into());
        }
        Ok(Self {
            scale: init_scale as f32,
            growth_factor: growth_factor as f32,
            backoff_factor: backoff_factor as f32,
            growth_interval,
            growth_tracker: 0,
            enabled,
        })
    }

    /// The current scale (`get_scale()`; 1 when disabled).
    pub fn get_scale(&self) -> f64 {
        if self.enabled {
            f64::from(self.scale)
        } else {
            1.0
        }
    }

    /// Clean steps since the scale last changed (torch's `_growth_tracker`).
    pub fn growth_tracker(&self) -> u32 {
        self.growth_tracker
    }

    /// `loss · scale`, the tensor to call `backward()` on.
    pub fn scale<B: AutodiffBackend, const D: usize>(&self, loss: Tensor<B, D>) -> Tensor<B, D> {
        if self.enabled {
            loss.mul_scalar(self.scale)
        } else {
            loss
        }
    }

    /// Divides every gradient by the scale (torch multiplies by the f32 reciprocal computed in
    /// f64) and reports whether any gradient holds an inf or a NaN (`found_inf`).
    ///
    /// The check sums each unscaled gradient: an inf or NaN anywhere makes the sum non-finite,
    /// and finite gradients cannot reach f32's overflow (3.4e38) in a sum.
    pub fn unscale<B: AutodiffBackend>(
        &self,
        grads: &mut GradientsParams,
        params: &[TrainableParam],
    ) -> bool {
        if !self.enabled {
            return false;
        }
        let inv_scale = (1.0 / f64::from(self.scale)) as f32;
        let mut sums: Vec<Tensor<B::InnerBackend, 1>> = Vec::new();
        macro_rules! unscale {
            ($($d:literal),*) => {
                for p in params {
                    match p.rank {
                        $($d => if let Some(g) = grads.remove::<B::InnerBackend, $d>(p.id) {
                            let g = g.mul_scalar(inv_scale);
                            sums.push(g.clone().sum());
                            grads.register(p.id, g);
                        },)*
                        _ => {}
                    }
                }
            };
        }
        unscale!(1, 2, 3, 4);
        if sums.is_empty() {
            return false;
        }
        let total: f64 = Tensor::cat(sums, 0).sum().into_scalar().elem();
        !total.is_finite()
    }

    /// After the step: back off when `found_inf`, else count a clean step and grow the scale
    /// after `growth_interval` of them (torch's `_amp_update_scale_`; a growth that would
    /// overflow f32 is not taken).
    pub fn update(&mut self, found_inf: bool) {
        if !self.enabled {
            return;
        }
        if found_inf {
            self.scale *= self.backoff_factor;
            self.growth_tracker = 0;
            return;
        }
        let successful = self.growth_tracker + 1;
        if successful == self.growth_interval {
            let grown = self.scale * self.growth_factor;
            if grown.is_finite() {
                self.scale = grown;
            }
            self.growth_tracker = 0;
        } else {
            self.growth_tracker = successful;
        }
    }

    /// The state under torch's `GradScaler.state_dict()` names (`scale`, `growth_factor`,
    /// `backoff_factor`, `growth_interval`, `_growth_tracker`; empty when disabled, as torch).
    pub fn state_dict(&self) -> Value {
        if !self.enabled {
            return Value::Object(Default::default());
        }
        serde_json::json!({
            "scale": self.scale,
            "growth_factor": self.growth_factor,
            "backoff_factor": self.backoff_factor,
            "growth_interval": self.growth_interval,
            "_growth_tracker": self.growth_tracker,
        })
    }

    /// Restores [`state_dict`](Self::state_dict)'s state; `source` names the file in errors.
    pub fn load_state_dict(&mut self, state: &Value, source: &std::path::Path) -> Result<()> {
        let field = |name: &str| {
            state
                .get(name)
                .and_then(Value::as_f64)
                .ok_or_else(|| TrainError::File {
                    path: source.to_owned(),
                    message: format!("the GradScaler state has no number `{name}`"),
                })
        };
        if !self.enabled {
            return Ok(());
        }
        let restored = Self::new(&GradScalerKwargs {
            init_scale: field("scale")?,
            growth_factor: field("growth_factor")?,
            backoff_factor: field("backoff_factor")?,
            growth_interval: field("growth_interval")? as u32,
            enabled: true,
        })
        .map_err(|e| TrainError::File {
            path: source.to_owned(),
            message: e.to_string(),
        })?;
        *self = Self {
            growth_tracker: field("_growth_tracker")? as u32,
            ..restored
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scaler(init: f64, interval: u32) -> GradScaler {
        GradScaler::new(&GradScalerKwargs {
            init_scale: init,
            growth_interval: interval,
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn backs_off_on_overflow_and_grows_after_the_interval() {
        let mut s = scaler(65536.0, 3);
        s.update(true);
        assert_eq!((s.get_scale(), s.growth_tracker()), (32768.0, 0));
        s.update(false);
        s.update(false);
        assert_eq!((s.get_scale(), s.growth_tracker()), (32768.0, 2));
        s.update(false);
        assert_eq!((s.get_scale(), s.growth_tracker()), (65536.0, 0));
        // An overflow resets the count of clean steps.
        s.update(false);
        s.update(true);
        s.update(false);
        s.update(false);
        assert_eq!((s.get_scale(), s.growth_tracker()), (32768.0, 2));
    }

    #[test]
    fn a_growth_beyond_f32_is_not_taken() {
        let mut s = scaler(f64::from(f32::MAX), 1);
        s.update(false);
        assert_eq!(s.get_scale(), f64::from(f32::MAX));
        assert_eq!(s.growth_tracker(), 0);
    }

    #[test]
    fn bad_settings_name_the_field() {
        for (kwargs, field) in [
            (
                GradScalerKwargs {
                    init_scale: 0.0,
                    ..Default::default()
                },
                "init_scale",
            ),
            (
                GradScalerKwargs {
                    growth_factor: 1.0,
                    ..Default::default()
                },
                "growth_factor",
            ),
            (
                GradScalerKwargs {
                    backoff_factor: 1.5,
                    ..Default::default()
                },
                "backoff_factor",
            ),
            (
                GradScalerKwargs {
                    growth_interval: 0,
                    ..Default::default()
                },
                "growth_interval",
            ),
        ] {
            let message = GradScaler::new(&kwargs).unwrap_err().to_string();
            assert!(message.contains(field), "{message}");
        }
    }

    #[test]
    fn state_round_trips_under_torch_names() {
        let mut s = scaler(1024.0, 5);
        s.update(false);
        s.update(false);
        let state = s.state_dict();
        assert_eq!(state["scale"], 1024.0);
        assert_eq!(state["_growth_tracker"], 2);
        let mut restored = scaler(1.0, 1);
        restored
            .load_state_dict(&state, std::path::Path::new("scaler.json"))
            .unwrap();
        assert_eq!(restored, s);
        let message = restored
            .load_state_dict(
                &serde_json::json!({"scale": 2.0}),
                std::path::Path::new("scaler.json"),
            )
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("scaler.json") && message.contains("growth_factor"),
            "{message}"
        );
    }

    #[test]
    fn unscaling_divides_and_finds_inf_and_nan() {
        use burn::backend::{Autodiff, Flex};
        use burn::module::Param;
        type B = Autodiff<Flex>;
        let device = Default::default();
        let s = scaler(4.0, 10);
        for (value, overflow) in [(8.0f32, false), (f32::INFINITY, true), (f32::NAN, true)] {
            let p = Param::from_tensor(Tensor::<B, 1>::from_floats([1.0, 2.0], &device));
            let loss = (p.val() * Tensor::from_floats([value, 1.0], &device)).sum();
            let loss = s.scale(loss);
            let mut grads = GradientsParams::new();
            let g = p.val().grad(&loss.backward()).unwrap();
            grads.register(p.id, g);
            let params = [TrainableParam {
                id: p.id,
                name: "p".into(),
                rank: 1,
            }];
            assert_eq!(s.unscale::<B>(&mut grads, &params), overflow, "{value}");
            if !overflow {
                let g: Vec<f32> = grads
                    .get::<Flex, 1>(p.id)
                    .unwrap()
                    .into_data()
                    .to_vec()
                    .unwrap();
                assert_eq!(g, vec![8.0, 1.0]);
            }
        }
    }
}
