//! Tokenizers for checkpoints that ship no `tokenizer.json`: BERT WordPiece from `vocab.txt`, and
//! GPT-2 byte-level BPE from `vocab.json` + `merges.txt`.
//!
//! Each builder writes the same `tokenizer.json` document that Python `transformers` 5 builds in
//! `BertTokenizer.__init__` / `GPT2Tokenizer.__init__`, so that the pipeline (and a later
//! `save_pretrained`) is exactly Python's.

use crate::error::{Result, TokenizerError};
use serde_json::{json, Map, Value};
use std::path::Path;

/// The options `BertTokenizer` reads from `tokenizer_config.json`, with its defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BertOptions {
    /// Lower-case the input (`do_lower_case`, default true).
    pub do_lower_case: bool,
    /// Put spaces around CJK characters so each is its own word (`tokenize_chinese_chars`,
    /// default true).
    pub tokenize_chinese_chars: bool,
    /// Strip accents (`strip_accents`); `None` follows `do_lower_case`, as in original BERT.
    pub strip_accents: Option<bool>,
}

impl Default for BertOptions {
    fn default() -> Self {
        Self {
            do_lower_case: true,
            tokenize_chinese_chars: true,
            strip_accents: None,
        }
    }
}

/// Reads `vocab.txt` the way Python's `load_vocab` does: one token per line (universal
/// newlines), the line number is the id, a repeated token keeps its last id.
pub fn read_vocab_txt(path: &Path) -> Result<Map<String, Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| TokenizerError::io(path, e))?;
    let text = text.replace("\r\n", "\n").replace('\r', "\n");
    let mut vocab = Map::new();
    let body = text.strip_suffix('\n').unwrap_or(&text);
    if body.is_empty() {
        return Err(TokenizerError::InvalidTokenizerFile {
            path: path.to_owned(),
            message: "the vocabulary is empty".into(),
        });
    }
    for (id, token) in body.split('\n').enumerate() {
        vocab.insert(token.to_owned(), Value::from(id));
    }
    Ok(vocab)
}

/// The `tokenizer.json` document of a BERT WordPiece tokenizer over `vocab`, as
/// `BertTokenizer(vocab, ...)` builds it. `special` must hold the five BERT roles.
pub fn bert_wordpiece_json(
    vocab: Map<String, Value>,
    options: &BertOptions,
    unk: &str,
    cls: &str,
    sep: &str,
    specials: &[String],
) -> Value {
    let id_of = |t: &str| vocab.get(t).and_then(Value::as_u64);
    let cls_id = id_of(cls).unwrap_or(2);
    let sep_id = id_of(sep).unwrap_or(3);
    let added = added_tokens_json(&vocab, specials);
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {
            "type": "BertNormalizer",
            "clean_text": true,
            "handle_chinese_chars": options.tokenize_chinese_chars,
            "strip_accents": options.strip_accents,
            "lowercase": options.do_lower_case,
        },
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": bert_template(cls, cls_id, sep, sep_id),
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {
            "type": "WordPiece",
            "unk_token": unk,
            "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 100,
            "vocab": vocab,
        },
    })
}

/// `[CLS] $A [SEP]` / `[CLS] $A [SEP] $B:1 [SEP]:1`, BERT's template.
pub(crate) fn bert_template(cls: &str, cls_id: u64, sep: &str, sep_id: u64) -> Value {
    let special = |t: &str, type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
    let seq = |s: &str, type_id: u32| json!({"Sequence": {"id": s, "type_id": type_id}});
    json!({
        "type": "TemplateProcessing",
        "single": [special(cls, 0), seq("A", 0), special(sep, 0)],
        "pair": [special(cls, 0), seq("A", 0), special(sep, 0), seq("B", 1), special(sep, 1)],
        "special_tokens": {
            cls: {"id": cls, "ids": [cls_id], "tokens": [cls]},
            sep: {"id": sep, "ids": [sep_id], "tokens": [sep]},
        },
    })
}

/// Reads `vocab.json` (an object token → id) and `merges.txt` (one `a b` pair per line, an
/// optional `#version` header).
pub fn read_bpe_files(
    vocab_path: &Path,
    merges_path: &Path,
) -> Result<(Map<String, Value>, Vec<Value>)> {
    let vocab = crate::config::read_json_object(vocab_path)?;
    if let Some((token, _)) = vocab.iter().find(|(_, id)| id.as_u64().is_none()) {
        return Err(TokenizerError::InvalidField {
            path: vocab_path.to_owned(),
            field: token.clone(),
            message: "token id is not a non-negative integer".into(),
        });
    }
    let text =
        std::fs::read_to_string(merges_path).map_err(|e| TokenizerError::io(merges_path, e))?;
    let mut merges = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if (n == 0 && line.starts_with("#version")) || line.trim().is_empty() {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
                merges.push(json!([a, b]));
            }
            _ => {
                return Err(TokenizerError::InvalidTokenizerFile {
                    path: merges_path.to_owned(),
                    message: format!(
                        "line {}: expected two tokens separated by one space: {line:?}",
                        n + 1
                    ),
                })
            }
        }
    }
    Ok((vocab, merges))
}

/// The `tokenizer.json` document of a GPT-2 byte-level BPE tokenizer, as `GPT2Tokenizer` builds
/// it (no special tokens added around the text unless `add_bos_token` is set).
pub fn gpt2_bpe_json(
    vocab: Map<String, Value>,
    merges: Vec<Value>,
    add_prefix_space: bool,
    bos: Option<&str>,
    add_bos_token: bool,
    specials: &[String],
) -> Value {
    let added = added_tokens_json(&vocab, specials);
    let mut special_tokens = Map::new();
    let (single, pair) = match bos.filter(|_| add_bos_token) {
        Some(bos) => {
            let id = vocab.get(bos).and_then(Value::as_u64).unwrap_or(0);
            special_tokens.insert(bos.into(), json!({"id": bos, "ids": [id], "tokens": [bos]}));
            let st = |t: u32| json!({"SpecialToken": {"id": bos, "type_id": t}});
            let seq = |s: &str, t: u32| json!({"Sequence": {"id": s, "type_id": t}});
            (
                json!([st(0), seq("A", 0)]),
                json!([st(0), seq("A", 0), st(1), seq("B", 1)]),
            )
        }
        None => (
            json!([{"Sequence": {"id": "A", "type_id": 0}}]),
            json!([{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}]),
        ),
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {
            "type": "ByteLevel",
            "add_prefix_space": add_prefix_space,
            "trim_offsets": true,
            "use_regex": true,
        },
        "post_processor": {
            "type": "TemplateProcessing",
            "single": single,
            "pair": pair,
            "special_tokens": special_tokens,
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    })
}

/// Special tokens registered as added tokens (special, not normalized), as
/// `TokenizersBackend` does; a token missing from the vocabulary gets the next free id.
fn added_tokens_json(vocab: &Map<String, Value>, specials: &[String]) -> Vec<Value> {
    let mut next = vocab
        .values()
        .filter_map(Value::as_u64)
        .max()
        .map_or(0, |m| m + 1);
    let mut added: Vec<Value> = specials
        .iter()
        .map(|t| {
            let id = vocab.get(t).and_then(Value::as_u64).unwrap_or_else(|| {
                next += 1;
                next - 1
            });
            json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    added.sort_by_key(|v| v["id"].as_u64());
    added
}
