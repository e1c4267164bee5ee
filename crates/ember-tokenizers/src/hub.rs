//! `from_pretrained("org/name")`: the tokenizer files of a Hub repository, fetched into the
//! Hugging Face cache (`ember_hub`) as transformers fetches them.

use crate::error::{Result, TokenizerError};
use ember_hub::{HubConfig, HubRepo};
use std::path::PathBuf;

/// Side files transformers asks for beside the tokenizer; each may be absent (a 404 is fine).
const OPTIONAL_FILES: [&str; 4] = [
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
];

/// Fetches the tokenizer files of `repo_id` at `revision` into the cache of `config` and returns
/// the snapshot folder: `tokenizer.json`, else `vocab.txt`, else `vocab.json` + `merges.txt`,
/// with the optional side files.
pub(crate) fn download(
    config: &HubConfig,
    repo_id: &str,
    revision: Option<&str>,
) -> Result<PathBuf> {
    let hub = |source| TokenizerError::Hub {
        name: repo_id.to_owned(),
        source: Box::new(source),
    };
    let mut repo = HubRepo::new(config, repo_id, revision).map_err(hub)?;
    // The config first: it pins the commit every other file is read at.
    for file in OPTIONAL_FILES {
        repo.get_optional(file).map_err(hub)?;
    }
    // The three layouts in the order `AutoTokenizer` reads a folder; the error of the first
    // (`tokenizer.json`) is the one reported when none is there.
    let first = match repo.get("tokenizer.json") {
        Ok(_) => None,
        Err(e) if e.is_entry_not_found() || is_offline_miss(&e) => Some(e),
        Err(e) => return Err(hub(e)),
    };
    if let Some(first) = first {
        let found = match repo.get_optional("vocab.txt").map_err(hub)? {
            Some(_) => true,
            None => match repo.get_optional("vocab.json").map_err(hub)? {
                Some(_) => repo.get("merges.txt").map_err(hub).map(|_| true)?,
                None => false,
            },
        };
        if !found {
            return Err(hub(first));
        }
    }
    repo.snapshot_dir()
        .map(PathBuf::from)
        .ok_or_else(|| TokenizerError::NoTokenizerFiles(PathBuf::from(repo_id)))
}

/// Offline and not cached: for a file with alternatives, the next one may be.
fn is_offline_miss(e: &ember_hub::HubError) -> bool {
    matches!(
        e,
        ember_hub::HubError::LocalEntryNotFound { offline: true, .. }
    )
}
