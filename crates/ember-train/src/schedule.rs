//! HF's learning-rate schedules (`transformers.get_scheduler`): the multiplier of the base
//! learning rate at each optimizer step.

use crate::args::SchedulerType;
use std::f64::consts::PI;

/// A schedule over `total_steps` optimizer steps with `warmup_steps` of linear warm-up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    /// Which curve.
    pub kind: SchedulerType,
    /// The base (peak) learning rate.
    pub base_lr: f64,
    /// Steps of linear warm-up from 0.
    pub warmup_steps: usize,
    /// Steps of the whole run.
    pub total_steps: usize,
}

impl LrSchedule {
    /// The learning rate for optimizer step `step` (0-based): what PyTorch's `LambdaLR` gives
    /// after `step` calls of `scheduler.step()`.
    pub fn lr(&self, step: usize) -> f64 {
        self.base_lr * self.factor(step)
    }

    fn factor(&self, step: usize) -> f64 {
        let (s, w, t) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        if self.kind != SchedulerType::Constant && step < self.warmup_steps {
            return s / w.max(1.0);
        }
        match self.kind {
            SchedulerType::Constant | SchedulerType::ConstantWithWarmup => 1.0,
            SchedulerType::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            SchedulerType::Cosine => {
                let progress = (s - w) / (t - w).max(1.0);
                (0.5 * (1.0 + (PI * 0.5 * 2.0 * progress).cos())).max(0.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(kind: SchedulerType) -> LrSchedule {
        LrSchedule {
            kind,
            base_lr: 1.0,
            warmup_steps: 2,
            total_steps: 10,
        }
    }

    #[test]
    fn curves_match_transformers() {
        // Values of transformers 5.24's schedulers (LambdaLR lambdas) at steps 0..=10.
        let linear: Vec<f64> = (0..=10)
            .map(|s| schedule(SchedulerType::Linear).lr(s))
            .collect();
        assert_eq!(
            linear,
            [0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0]
        );
        let cosine = schedule(SchedulerType::Cosine);
        assert!((cosine.lr(6) - 0.5).abs() < 1e-12);
        assert!((cosine.lr(4) - 0.5 * (1.0 + (PI * 0.25).cos())).abs() < 1e-12);
        assert_eq!(schedule(SchedulerType::Constant).lr(0), 1.0);
        assert_eq!(schedule(SchedulerType::ConstantWithWarmup).lr(1), 0.5);
        assert_eq!(schedule(SchedulerType::ConstantWithWarmup).lr(9), 1.0);
    }
}
