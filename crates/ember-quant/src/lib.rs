//! bitsandbytes-style quantization for burn.
//!
//! This crate will hold int8 (absmax, LLM.int8), NF4 / FP4 with double quantization and the
//! quantized linear storage that QLoRA builds on. It is filled by a later milestone and exports
//! nothing yet.
