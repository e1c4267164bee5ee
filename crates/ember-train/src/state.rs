//! `trainer_state.json`: HF's `TrainerState`, with the same fields, so that tools reading a
//! Python checkpoint's state read Ember's too.

use crate::error::{Result, TrainError};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// HF's `TrainerState`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Fractional epoch reached (`1.5` is halfway through the second epoch).
    pub epoch: f64,
    /// Optimizer steps taken.
    pub global_step: usize,
    /// Optimizer steps the run will take.
    pub max_steps: usize,
    /// `logging_steps` resolved to a step count.
    pub logging_steps: usize,
    /// `eval_steps` resolved to a step count.
    pub eval_steps: usize,
    /// `save_steps` resolved to a step count.
    pub save_steps: usize,
    /// Examples per optimizer step on one device.
    pub train_batch_size: usize,
    /// Epochs the run will take.
    pub num_train_epochs: usize,
    /// Every log entry: `loss`, `grad_norm`, `learning_rate`, `epoch`, `step`, `eval_*` ...
    pub log_history: Vec<Map<String, Value>>,
    /// Best value of `metric_for_best_model` so far.
    pub best_metric: Option<f64>,
    /// Step at which it was reached.
    pub best_global_step: Option<usize>,
    /// Checkpoint folder holding the best model.
    pub best_model_checkpoint: Option<PathBuf>,
    /// Always false (no hyper-parameter search).
    pub is_hyper_param_search: bool,
    /// Always true (one process).
    pub is_local_process_zero: bool,
    /// Always true (one process).
    pub is_world_process_zero: bool,
    /// Floating point operations (not counted: 0).
    pub total_flos: f64,
    /// Tokens seen (not counted: 0).
    pub num_input_tokens_seen: u64,
    /// State of callbacks (the early-stopping counter).
    pub stateful_callbacks: Map<String, Value>,
}

impl TrainerState {
    /// Reads `trainer_state.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| TrainError::Io {
            path: path.to_owned(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|e| TrainError::File {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// The state as HF writes it (indented JSON).
    pub fn to_json_string(&self) -> String {
        serde_json::to_string_pretty(self).expect("the state always serializes")
    }
}
