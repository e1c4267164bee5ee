//! `train_new_from_iterator`: a tokenizer of the same kind, trained on a new corpus.

use crate::auto::AutoTokenizer;
use crate::error::{Result, TokenizerError};
use serde_json::Value;
use std::collections::HashSet;
use std::path::Path;
use tokenizers::models::bpe::BpeTrainer;
use tokenizers::models::wordpiece::WordPieceTrainer;
use tokenizers::models::TrainerWrapper;
use tokenizers::{AddedToken, Tokenizer};

impl AutoTokenizer {
    /// `train_new_from_iterator(texts, vocab_size)`: keeps this tokenizer's normalizer,
    /// pre-tokenizer, post-processor, decoder and special tokens, and learns a new WordPiece or
    /// BPE vocabulary of at most `vocab_size` entries from `texts`. Special tokens come first
    /// (ids 0, 1, ...), as in HF.
    pub fn train_new_from_iterator<I, S>(&self, texts: I, vocab_size: usize) -> Result<Self>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        let backend = self.backend_tokenizer();
        let mut pipeline = serde_json::to_value(&backend)
            .map_err(|e| TokenizerError::backend("serializing", e))?;
        let specials: Vec<AddedToken> = self
            .special_tokens()
            .all()
            .into_iter()
            .map(|t| AddedToken::from(t, true).normalized(false))
            .collect();
        let model = &mut pipeline["model"];
        let kind = model["type"].as_str().unwrap_or("").to_owned();
        let mut trainer = match kind.as_str() {
            "WordPiece" => {
                model["vocab"] = Value::Object(Default::default());
                let mut b = WordPieceTrainer::builder()
                    .vocab_size(vocab_size)
                    .special_tokens(specials)
                    .show_progress(false);
                if let Some(p) = model["continuing_subword_prefix"].as_str() {
                    b = b.continuing_subword_prefix(p.to_owned());
                }
                TrainerWrapper::WordPieceTrainer(b.build())
            }
            "BPE" => {
                model["vocab"] = Value::Object(Default::default());
                model["merges"] = Value::Array(Vec::new());
                let byte_level = backend.get_pre_tokenizer().is_some_and(|p| {
                    serde_json::to_string(p).is_ok_and(|s| s.contains("\"ByteLevel\""))
                });
                let alphabet: HashSet<char> = if byte_level {
                    tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
                        .into_iter()
                        .collect()
                } else {
                    HashSet::new()
                };
                let mut b = BpeTrainer::builder()
                    .vocab_size(vocab_size)
                    .special_tokens(specials)
                    .initial_alphabet(alphabet)
                    .show_progress(false);
                if let Some(p) = model["continuing_subword_prefix"].as_str() {
                    b = b.continuing_subword_prefix(p.to_owned());
                }
                if let Some(s) = model["end_of_word_suffix"].as_str() {
                    b = b.end_of_word_suffix(s.to_owned());
                }
                TrainerWrapper::BpeTrainer(b.build())
            }
            other => {
                return Err(TokenizerError::Backend {
                    action: "training",
                    message: format!(
                        "training a `{other}` model is not supported (WordPiece and BPE are)"
                    ),
                })
            }
        };
        pipeline["added_tokens"] = Value::Array(Vec::new());
        let mut fresh: Tokenizer = serde_json::from_value(pipeline)
            .map_err(|e| TokenizerError::backend("rebuilding the pipeline", e))?;
        fresh
            .train(&mut trainer, texts)
            .map_err(|e| TokenizerError::backend("training", e))?;
        let mut trained =
            serde_json::to_value(&fresh).map_err(|e| TokenizerError::backend("serializing", e))?;
        let vocab = fresh.get_vocab(true);
        renumber_post_processor(&mut trained["post_processor"], &|t| vocab.get(t).copied());
        self.with_pipeline(trained, Path::new("<trained tokenizer>"))
    }
}

/// Points the special tokens of a post-processor (TemplateProcessing, BertProcessing,
/// RobertaProcessing, or a Sequence of them) at their ids in the new vocabulary.
fn renumber_post_processor(pp: &mut Value, id_of: &dyn Fn(&str) -> Option<u32>) {
    match pp["type"].as_str() {
        Some("TemplateProcessing") => {
            if let Some(map) = pp["special_tokens"].as_object_mut() {
                for entry in map.values_mut() {
                    let ids: Vec<Value> = entry["tokens"]
                        .as_array()
                        .map(|ts| {
                            ts.iter()
                                .map(|t| Value::from(t.as_str().and_then(id_of).unwrap_or(0)))
                                .collect()
                        })
                        .unwrap_or_default();
                    entry["ids"] = Value::Array(ids);
                }
            }
        }
        Some("BertProcessing") | Some("RobertaProcessing") => {
            for key in ["sep", "cls"] {
                if let Some(token) = pp[key][0].as_str().map(str::to_owned) {
                    pp[key][1] = Value::from(id_of(&token).unwrap_or(0));
                }
            }
        }
        Some("Sequence") => {
            if let Some(list) = pp["processors"].as_array_mut() {
                for p in list {
                    renumber_post_processor(p, id_of);
                }
            }
        }
        _ => {}
    }
}
