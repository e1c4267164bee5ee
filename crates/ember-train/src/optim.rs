//! HF's optimizer setup: AdamW with two parameter groups (weight decay for weights, none for
//! biases and normalisation weights, as `Trainer.get_decay_parameter_names` chooses), and
//! gradient clipping by the global norm over all parameters (`clip_grad_norm_`).

use crate::error::{Result, TrainError};
use crate::model::TrainableParam;
use burn::module::{AutodiffModule, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig, GradientsParams, Optimizer};
use burn::record::{FullPrecisionSettings, NamedMpkBytesRecorder, Recorder};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;
use std::collections::HashSet;

/// Whether HF decays a parameter: not biases, not LayerNorm / RMSNorm / `*norm` weights.
pub fn decays(name: &str) -> bool {
    let lower = name.to_lowercase();
    let norm = lower.split('.').any(|part| {
        part == "norm"
            || part.ends_with("_norm")
            || part.contains("layernorm")
            || part.contains("rmsnorm")
    });
    !(lower.contains("bias") || norm)
}

/// AdamW over two groups, stepped with one learning rate.
#[derive(Clone)]
pub struct GroupedAdamW<M: AutodiffModule<B>, B: AutodiffBackend> {
    decayed: OptimizerAdaptor<AdamW, M, B>,
    plain: OptimizerAdaptor<AdamW, M, B>,
    no_decay: HashSet<ParamId>,
}

impl<M: AutodiffModule<B>, B: AutodiffBackend> GroupedAdamW<M, B> {
    /// PyTorch's AdamW settings: betas, epsilon, and the weight decay of the decayed group.
    pub fn new(
        params: &[TrainableParam],
        beta1: f64,
        beta2: f64,
        epsilon: f64,
        weight_decay: f64,
    ) -> Self {
        let config = |wd: f64| {
            AdamWConfig::new()
                .with_beta_1(beta1 as f32)
                .with_beta_2(beta2 as f32)
                .with_epsilon(epsilon as f32)
                .with_weight_decay(wd as f32)
        };
        Self {
            decayed: config(weight_decay).init(),
            plain: config(0.0).init(),
            no_decay: params
                .iter()
                .filter(|p| !decays(&p.name))
                .map(|p| p.id)
                .collect(),
        }
    }

    /// One update of every parameter that has a gradient.
    pub fn step(
        &mut self,
        lr: f64,
        model: M,
        mut grads: GradientsParams,
        params: &[TrainableParam],
    ) -> M {
        let mut plain = GradientsParams::new();
        for p in params.iter().filter(|p| self.no_decay.contains(&p.id)) {
            move_grad::<B>(&mut grads, &mut plain, p);
        }
        let model = self.decayed.step(lr, model, grads);
        self.plain.step(lr, model, plain)
    }

    /// The state of both groups, as bytes (burn's named MessagePack record, as the
    /// [`Accelerator`](crate::Accelerator)'s `optimizer.bin`).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        // MessagePack rather than burn's bincode record: reading a truncated bincode record
        // panics inside burn, reading a truncated MessagePack one returns an error.
        let recorder = NamedMpkBytesRecorder::<FullPrecisionSettings>::default();
        let record = (self.decayed.to_record(), self.plain.to_record());
        Recorder::<B>::record(&recorder, record, ())
            .map_err(|e| TrainError::Step(format!("saving the optimizer state: {e}")))
    }

    /// Restores the state written by [`Self::to_bytes`].
    ///
    /// Errors: [`TrainError::Step`] when `bytes` are not such a state (truncated, of another
    /// model); never a panic.
    pub fn load_bytes(self, bytes: Vec<u8>, device: &B::Device) -> Result<Self> {
        let recorder = NamedMpkBytesRecorder::<FullPrecisionSettings>::default();
        type Rec<M, B> = <OptimizerAdaptor<AdamW, M, B> as Optimizer<M, B>>::Record;
        let (decayed, plain): (Rec<M, B>, Rec<M, B>) =
            Recorder::<B>::load(&recorder, bytes, device)
                .map_err(|e| TrainError::Step(format!("reading the optimizer state: {e}")))?;
        Ok(Self {
            decayed: self.decayed.load_record(decayed),
            plain: self.plain.load_record(plain),
            no_decay: self.no_decay,
        })
    }
}

fn move_grad<B: AutodiffBackend>(
    from: &mut GradientsParams,
    to: &mut GradientsParams,
    p: &TrainableParam,
) {
    macro_rules! by_rank {
        ($($d:literal),*) => {
            match p.rank {
                $($d => if let Some(g) = from.remove::<B::InnerBackend, $d>(p.id) { to.register(p.id, g) },)*
                _ => {}
            }
        };
    }
    by_rank!(1, 2, 3, 4);
}

/// The global L2 norm of all gradients, then every gradient scaled by
/// `min(1, max_norm / (norm + 1e-6))` as `torch.nn.utils.clip_grad_norm_` does. Returns the norm
/// before clipping (HF logs it as `grad_norm`). `max_norm` 0 measures without clipping.
pub fn clip_grad_norm<B: AutodiffBackend>(
    grads: &mut GradientsParams,
    params: &[TrainableParam],
    max_norm: f64,
) -> f64 {
    let mut squares: Vec<Tensor<B::InnerBackend, 1>> = Vec::new();
    macro_rules! sum_sq {
        ($($d:literal),*) => {
            for p in params {
                match p.rank {
                    $($d => if let Some(g) = grads.get::<B::InnerBackend, $d>(p.id) { squares.push(g.powi_scalar(2).sum()) },)*
                    _ => {}
                }
            }
        };
    }
    sum_sq!(1, 2, 3, 4);
    if squares.is_empty() {
        return 0.0;
    }
    let norm = Tensor::cat(squares, 0).sum().sqrt().into_scalar();
    let norm: f64 = burn::tensor::ElementConversion::elem(norm);
    let coef = max_norm / (norm + 1e-6);
    if max_norm > 0.0 && coef < 1.0 {
        macro_rules! scale {
            ($($d:literal),*) => {
                for p in params {
                    match p.rank {
                        $($d => if let Some(g) = grads.remove::<B::InnerBackend, $d>(p.id) { grads.register(p.id, g.mul_scalar(coef)) },)*
                        _ => {}
                    }
                }
            };
        }
        scale!(1, 2, 3, 4);
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::decays;

    #[test]
    fn weight_decay_groups_follow_hf() {
        for name in [
            "bert.encoder.layer.0.attention.self.query.weight",
            "bert.embeddings.word_embeddings.weight",
            "classifier.weight",
        ] {
            assert!(decays(name), "{name}");
        }
        for name in [
            "bert.encoder.layer.0.attention.self.query.bias",
            "bert.embeddings.LayerNorm.weight",
            "lm_head.layer_norm.weight",
            "model.layers.0.input_layernorm.weight",
            "model.norm.weight",
        ] {
            assert!(!decays(name), "{name}");
        }
    }
}
