//! The Hugging Face `Trainer` for burn.
//!
//! - [`TrainingArguments`]: HF names and defaults, loaded from JSON or TOML.
//! - [`Trainer`]: `train()` with gradient accumulation, global-norm clipping, AdamW with HF's
//!   weight-decay groups, the linear / cosine / constant schedules with warm-up, logging,
//!   evaluation and checkpoints (`checkpoint-{step}/` with rotation, resuming step-exactly,
//!   `load_best_model_at_end`); `evaluate()` and `predict()`; callbacks such as
//!   [`EarlyStoppingCallback`].
//! - Mixed precision (`bf16` / `fp16`): torch's autocast through `ember_kernels::autocast`,
//!   and for float16 dynamic loss scaling with [`GradScaler`].
//! - [`metrics`]: accuracy, precision / recall / F1 and seqeval's entity-level scores.
//! - [`Accelerator`]: accelerate's `Accelerator` for a hand-written burn loop (data parallel,
//!   gradient accumulation, `gather_for_metrics`, `save_state` / `load_state`).
//! - [`TrainableModel`]: what a model provides; `ember-models` implements it (feature `train`).

mod accelerator;
mod args;
mod error;
pub mod metrics;
mod model;
mod optim;
mod rng_state;
mod scaler;
mod schedule;
mod state;
mod tensor_parallel;
mod trainer;

pub use accelerator::{
    random_states_file, Accelerator, DataLoaderShard, DataLoaderShardIter, Reduction, MODEL_FILE,
    OPTIMIZER_FILE,
};
pub use args::{IntervalStrategy, SchedulerType, TrainingArguments};
pub use error::{Result, TrainError};
pub use model::{ModelOutput, TrainableModel, TrainableParam};
pub use optim::{clip_grad_norm, decays, GroupedAdamW};
pub use rng_state::rng_state_file;
pub use scaler::{GradScaler, GradScalerKwargs};
pub use schedule::LrSchedule;
pub use state::TrainerState;
pub use trainer::{
    get_last_checkpoint, require_labels, ComputeMetrics, Control, EarlyStoppingCallback,
    EvalPrediction, PredictionOutput, Trainer, TrainerCallback,
};
