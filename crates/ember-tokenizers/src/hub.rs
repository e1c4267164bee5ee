//! Downloads a tokenizer from the Hugging Face Hub into the HF cache (`hub` feature).

use crate::error::{Result, TokenizerError};
use std::path::PathBuf;

/// Fetches the tokenizer files of repository `name` (e.g. `"bert-base-chinese"`) into the HF
/// cache (`HF_HOME`, default `~/.cache/huggingface`) and returns the snapshot folder.
pub(crate) fn download(name: &str) -> Result<PathBuf> {
    let api = hf_hub::api::sync::Api::new()
        .map_err(|e| TokenizerError::backend("opening the Hugging Face Hub", e))?;
    let repo = api.model(name.to_owned());
    // Side files are optional; a repository has one of the three tokenizer formats.
    for optional in [
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "chat_template.jinja",
    ] {
        let _ = repo.get(optional);
    }
    let fetched = repo
        .get("tokenizer.json")
        .or_else(|_| repo.get("vocab.txt"))
        .or_else(|_| repo.get("merges.txt").and_then(|_| repo.get("vocab.json")))
        .map_err(|e| {
            TokenizerError::backend("downloading tokenizer files", format!("{name}: {e}"))
        })?;
    fetched
        .parent()
        .map(PathBuf::from)
        .ok_or_else(|| TokenizerError::MissingDirectory(fetched.clone()))
}
