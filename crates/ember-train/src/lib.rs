//! The Hugging Face `Trainer` for burn.
//!
//! This crate will hold `TrainingArguments`, the `Trainer` (train / evaluate / predict),
//! callbacks, schedulers, metrics and HF-compatible checkpoints. It is filled by a later
//! milestone and exports nothing yet.
