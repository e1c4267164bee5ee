//! Parameter-efficient fine-tuning for burn, in the Hugging Face `peft` file format.
//!
//! This crate will hold LoRA, IA3, prompt / P- / prefix tuning, multi-adapter models and the
//! `adapter_config.json` + `adapter_model.safetensors` format. It is filled by a later milestone
//! and exports nothing yet.
