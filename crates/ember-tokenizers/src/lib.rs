//! Hugging Face `AutoTokenizer` for Rust, with batches as burn tensors.
//!
//! Loads what real checkpoints ship: `tokenizer.json` (any model), `vocab.txt` +
//! `tokenizer_config.json` (BERT WordPiece, as many Chinese checkpoints ship), or
//! `vocab.json` + `merges.txt` (GPT-2 byte-level BPE), with `special_tokens_map.json`,
//! `added_tokens.json` and `model_max_length`. The API follows `transformers`: `tokenize`,
//! `encode`, `decode`, batch encoding with HF padding and truncation, offsets and `word_ids()`,
//! `save_pretrained`, `train_new_from_iterator`, and chat templates (`apply_chat_template`,
//! rendered as `transformers` renders them). Ids are exactly Python's: the parity tests compare
//! with `transformers` 5 on real corpora.
//!
//! ```
//! use ember_tokenizers::{demo, EncodeOptions, Padding};
//! let tok = demo::demo_tokenizer()?;
//! let batch = tok.batch_encode(&["The room was clean.", "房间很干净"], &EncodeOptions::default().padding(Padding::Longest))?;
//! let tensors = batch.to_tensors::<burn::backend::Flex>(&Default::default())?;
//! assert_eq!(tensors.input_ids.dims()[0], 2);
//! assert_eq!(tok.decode(&batch.input_ids()[0], true)?, "the room was clean.");
//! # Ok::<(), ember_tokenizers::TokenizerError>(())
//! ```

mod auto;
mod chat;
mod config;
pub mod demo;
mod encode;
mod error;
mod hub;
pub mod legacy;
mod save;
mod train;

pub use auto::{clean_up_tokenization, AutoTokenizer};
pub use chat::{
    ChatMessage, ChatTemplate, ChatTemplateOptions, ChatTemplates, CHAT_TEMPLATE_DIR,
    CHAT_TEMPLATE_FILE, DEFAULT_TEMPLATE_NAME, SET_IN_CODE,
};
pub use config::{PaddingSide, Side, SpecialTokens, TokenizerConfig};
/// The Hugging Face Hub cache `from_pretrained("org/name")` reads and fills.
pub use ember_hub;
pub use encode::{BatchEncoding, EncodeOptions, Padding, TensorBatch, Truncation};
pub use error::{Result, TokenizerError};
pub use save::write_atomic;
/// The `tokenizers` crate this one is built on (its `Encoding`, `AddedToken`, ...).
pub use tokenizers;
