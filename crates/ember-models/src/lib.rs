//! Hugging Face `transformers` models on burn.
//!
//! This crate will hold the configs (`config.json` with HF field names), the shared linear and
//! embedding layers, BERT / RoBERTa, Llama, Bloom and GPT-2, the task heads, `Auto*` loading,
//! generation and checkpoint IO. It is filled by a later milestone and exports nothing yet.
