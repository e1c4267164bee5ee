//! `from_pretrained("org/name")`: the files of a model repository, fetched into the Hugging Face
//! cache (`ember_hub`) in the order transformers asks for them.

use crate::error::{ModelError, Result};
use crate::pretrained::FromPretrainedOptions;
use ember_hub::{HubConfig, HubError, HubRepo};
use std::borrow::Cow;
use std::path::{Path, PathBuf};

/// The weight files tried in order, as transformers does: a single file, else a sharded index
/// whose shards are fetched next.
const WEIGHT_CANDIDATES: [&str; 4] = [
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
];

/// The folder to load `path` from: `path` itself when it exists or is not a repository id (so
/// local folders and their errors are unchanged), else the snapshot folder of the repository
/// after fetching `config.json`, `generation_config.json` (optional) and the weights. The Hub
/// settings are `options.hub`, else read from the environment here, at the public entry point.
pub(crate) fn resolve<'p>(
    path: &'p Path,
    options: &FromPretrainedOptions,
) -> Result<Cow<'p, Path>> {
    resolve_files(path, options, true)
}

/// The local folder `from_pretrained(path, options)` reads: `path` itself for a folder (or a
/// name that is not a repository id), else the snapshot folder of the Hub repository after its
/// `config.json`, `generation_config.json` and weights are in the Hugging Face cache. For
/// callers that read a checkpoint's files themselves before choosing a class.
pub fn pretrained_dir(path: impl AsRef<Path>, options: &FromPretrainedOptions) -> Result<PathBuf> {
    resolve(path.as_ref(), options).map(Cow::into_owned)
}

/// As [`resolve`] for readers of `config.json` alone (`AutoConfig`, `GenerationConfig`).
pub(crate) fn resolve_config<'p>(
    path: &'p Path,
    options: &FromPretrainedOptions,
) -> Result<Cow<'p, Path>> {
    resolve_files(path, options, false)
}

fn resolve_files<'p>(
    path: &'p Path,
    options: &FromPretrainedOptions,
    weights: bool,
) -> Result<Cow<'p, Path>> {
    if !ember_hub::is_hub_name(path) {
        return Ok(Cow::Borrowed(path));
    }
    let Some(repo_id) = path.to_str() else {
        return Ok(Cow::Borrowed(path));
    };
    let from_env;
    let config = match &options.hub {
        Some(c) => c,
        None => {
            from_env = HubConfig::from_env();
            &from_env
        }
    };
    download(config, repo_id, options.revision.as_deref(), weights).map(Cow::Owned)
}

fn download(
    config: &HubConfig,
    repo_id: &str,
    revision: Option<&str>,
    weights: bool,
) -> Result<PathBuf> {
    let hub = |source| ModelError::Hub {
        name: repo_id.to_owned(),
        source: Box::new(source),
    };
    let mut repo = HubRepo::new(config, repo_id, revision).map_err(hub)?;
    // config.json first: it pins the commit every other file is read at.
    let config_path = repo.get("config.json").map_err(hub)?;
    repo.get_optional("generation_config.json").map_err(hub)?;
    if weights {
        fetch_weights(&mut repo).map_err(hub)?;
    }
    Ok(repo
        .snapshot_dir()
        .map(PathBuf::from)
        .or_else(|| config_path.parent().map(PathBuf::from))
        .unwrap_or(config_path))
}

/// The first weight file the repository has, and the shards of an index.
fn fetch_weights(repo: &mut HubRepo<'_>) -> std::result::Result<(), HubError> {
    let mut first_error = None;
    for name in WEIGHT_CANDIDATES {
        match repo.get(name) {
            Ok(path) => {
                if name.ends_with(".index.json") {
                    for shard in shard_names(&path)? {
                        repo.get(&shard)?;
                    }
                }
                return Ok(());
            }
            Err(e) if e.is_entry_not_found() || is_offline_miss(&e) => {
                first_error.get_or_insert(e);
            }
            Err(e) => return Err(e),
        }
    }
    // None is there: report `model.safetensors`, the file a checkpoint is expected to have.
    Err(first_error.unwrap_or_else(|| HubError::BadResponse {
        url: repo.repo_id().to_owned(),
        message: "no weight file".into(),
    }))
}

/// Offline and not cached: for a file with alternatives, the next one may be.
fn is_offline_miss(e: &HubError) -> bool {
    matches!(e, HubError::LocalEntryNotFound { offline: true, .. })
}

/// The distinct shard files a `*.index.json` names in its `weight_map`, in first-use order.
fn shard_names(index: &Path) -> std::result::Result<Vec<String>, HubError> {
    let bad = |message: String| HubError::BadResponse {
        url: index.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(index).map_err(|e| HubError::Io {
        path: index.to_owned(),
        source: e,
    })?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut names: Vec<String> = Vec::new();
    for (key, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("`weight_map[{key}]` is not a file name")))?;
        if !names.iter().any(|n| n == file) {
            names.push(file.to_owned());
        }
    }
    Ok(names)
}
