//! The Hugging Face Hub for Ember: `hf_hub_download` into huggingface_hub's cache layout, so
//! that Python and Rust share one cache.
//!
//! ```text
//! $HF_HUB_CACHE (default $HF_HOME/hub, HF_HOME default ~/.cache/huggingface)
//! └── models--org--name/
//!     ├── blobs/<etag>                       the file's bytes, named by its ETag
//!     ├── refs/main                          the commit hash `main` pointed to
//!     ├── snapshots/<commit>/config.json  -> ../../blobs/<etag>   (relative symlink)
//!     └── .no_exist/<commit>/<file>          empty: the Hub said 404 for this file
//! ```
//!
//! A file is resolved as huggingface_hub resolves it: `HEAD {endpoint}/{repo}/resolve/{rev}/{file}`
//! (following only relative redirects) gives the commit (`X-Repo-Commit`), the blob's name
//! (`X-Linked-Etag`, else `ETag`), its size (`X-Linked-Size`, else `Content-Length`) and where to
//! download it from (`Location`); the bytes go to `blobs/<etag>.<random>.incomplete` and are
//! renamed into place only once complete, then the snapshot link is made. A failed download
//! leaves neither a partial blob nor a link.
//!
//! Environment variables are read only by [`HubConfig::from_env`], called by the public
//! `from_pretrained` entry points; everything below takes a [`HubConfig`], so tests (and
//! threads) never share settings through the environment.
//!
//! Without the `https` feature, only `http://` endpoints (a mirror, a test server) and the cache
//! can be used: the default build needs no TLS library and no network.

mod cache;
mod download;
mod error;
mod http;

pub use cache::{
    hf_hub_url, is_commit_hash, repo_folder_name, try_to_load_from_cache, validate_filename,
    validate_repo_id, validate_revision, CachedFile,
};
pub use download::{hf_hub_download, HubRepo};
pub use error::{HubError, Result};

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The Hub's address when `HF_ENDPOINT` is unset.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// The revision asked for when none is given.
pub const DEFAULT_REVISION: &str = "main";
/// Seconds to wait for the Hub, as huggingface_hub's `HF_HUB_ETAG_TIMEOUT` /
/// `HF_HUB_DOWNLOAD_TIMEOUT` defaults.
pub const DEFAULT_TIMEOUT_SECS: u64 = 10;

/// Where and how to reach the Hub: what huggingface_hub reads from its environment variables.
#[derive(Clone)]
pub struct HubConfig {
    /// `HF_ENDPOINT` without a trailing slash (default [`DEFAULT_ENDPOINT`]).
    pub endpoint: String,
    /// The hub cache folder: `HF_HUB_CACHE`, else `$HF_HOME/hub`.
    pub cache_dir: PathBuf,
    /// `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`): read only the cache.
    pub offline: bool,
    /// `HF_TOKEN`, else the token file `$HF_HOME/token` (`HF_TOKEN_PATH`): sent as
    /// `Authorization: Bearer` to the endpoint's host only.
    pub token: Option<String>,
    /// `HF_HUB_ETAG_TIMEOUT`: the wait for a file's metadata.
    pub etag_timeout: Duration,
    /// `HF_HUB_DOWNLOAD_TIMEOUT`: the wait for each read of a download.
    pub download_timeout: Duration,
}

// By hand, so that the token never reaches a log line.
impl std::fmt::Debug for HubConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubConfig")
            .field("endpoint", &self.endpoint)
            .field("cache_dir", &self.cache_dir)
            .field("offline", &self.offline)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("etag_timeout", &self.etag_timeout)
            .field("download_timeout", &self.download_timeout)
            .finish()
    }
}

impl HubConfig {
    /// An online config for `endpoint` and the hub cache `cache_dir`, without a token, with the
    /// default timeouts. Reads no environment variable.
    pub fn new(endpoint: impl Into<String>, cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            endpoint: endpoint.into().trim_end_matches('/').to_owned(),
            cache_dir: cache_dir.into(),
            offline: false,
            token: None,
            etag_timeout: Duration::from_secs(DEFAULT_TIMEOUT_SECS),
            download_timeout: Duration::from_secs(DEFAULT_TIMEOUT_SECS),
        }
    }

    /// Sets offline mode (`HF_HUB_OFFLINE`).
    pub fn offline(mut self, on: bool) -> Self {
        self.offline = on;
        self
    }

    /// Sets the token (`HF_TOKEN`).
    pub fn token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    /// The config huggingface_hub would use in this process's environment.
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// The config for the environment variables `var` returns: `HF_HOME` (else
    /// `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`), `HF_HUB_CACHE` (else
    /// `HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`), `HF_ENDPOINT`, `HF_HUB_OFFLINE` /
    /// `TRANSFORMERS_OFFLINE` (`1`, `ON`, `YES`, `TRUE`, any case), `HF_TOKEN` / `HF_TOKEN_PATH`,
    /// `HF_HUB_ETAG_TIMEOUT` and `HF_HUB_DOWNLOAD_TIMEOUT` (seconds). `~` is expanded as
    /// huggingface_hub's `expanduser` does.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        // Python's `os.getenv(...) or ...`: an empty value counts as unset.
        let get = |name: &str| var(name).filter(|v| !v.is_empty());
        let home = get("HOME").map(PathBuf::from);
        let expand = |p: String| -> PathBuf {
            match (p.strip_prefix("~/"), &home) {
                (Some(rest), Some(h)) => h.join(rest),
                _ if p == "~" && home.is_some() => home.clone().unwrap_or_default(),
                _ => PathBuf::from(p),
            }
        };
        let hf_home = get("HF_HOME").map(expand).unwrap_or_else(|| {
            get("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| home.as_ref().map(|h| h.join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"))
                .join("huggingface")
        });
        let cache_dir = get("HF_HUB_CACHE")
            .or_else(|| get("HUGGINGFACE_HUB_CACHE"))
            .map(expand)
            .unwrap_or_else(|| hf_home.join("hub"));
        let offline = get("HF_HUB_OFFLINE")
            .or_else(|| get("TRANSFORMERS_OFFLINE"))
            .is_some_and(|v| is_true(&v));
        let token = get("HF_TOKEN")
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .or_else(|| {
                let path = get("HF_TOKEN_PATH")
                    .map(expand)
                    .unwrap_or_else(|| hf_home.join("token"));
                read_token_file(&path)
            });
        let seconds = |name: &str| {
            get(name)
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s > 0.0)
                .map(Duration::from_secs_f64)
                .unwrap_or(Duration::from_secs(DEFAULT_TIMEOUT_SECS))
        };
        Self {
            endpoint: get("HF_ENDPOINT")
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned())
                .trim_end_matches('/')
                .to_owned(),
            cache_dir,
            offline,
            token,
            etag_timeout: seconds("HF_HUB_ETAG_TIMEOUT"),
            download_timeout: seconds("HF_HUB_DOWNLOAD_TIMEOUT"),
        }
    }
}

/// huggingface_hub's `_is_true`: `1`, `ON`, `YES`, `TRUE` in any case.
fn is_true(value: &str) -> bool {
    matches!(
        value.to_ascii_uppercase().as_str(),
        "1" | "ON" | "YES" | "TRUE"
    )
}

/// The stored token, trimmed; `None` when the file is absent, unreadable or blank (as Python,
/// which then sends no token).
fn read_token_file(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let token = text.trim();
    (!token.is_empty()).then(|| token.to_owned())
}

/// Whether `name` should be fetched from the Hub by a `from_pretrained(name)`: it is not an
/// existing folder and it is a valid repository id. As transformers decides, a local folder
/// always wins, so an existing `org/name` folder is read as it is.
pub fn is_hub_name(name: &Path) -> bool {
    !name.exists() && name.to_str().is_some_and(|s| validate_repo_id(s).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> HubConfig {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        HubConfig::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn environment_variables_map_as_in_huggingface_hub() {
        let c = config(&[("HOME", "/home/u")]);
        assert_eq!(c.cache_dir, Path::new("/home/u/.cache/huggingface/hub"));
        assert_eq!(c.endpoint, DEFAULT_ENDPOINT);
        assert!(!c.offline && c.token.is_none());
        let c = config(&[("HOME", "/home/u"), ("XDG_CACHE_HOME", "/xdg")]);
        assert_eq!(c.cache_dir, Path::new("/xdg/huggingface/hub"));
        let c = config(&[
            ("HOME", "/home/u"),
            ("HF_HOME", "~/hf"),
            ("HF_ENDPOINT", "http://mirror:8080/"),
            ("HF_HUB_OFFLINE", "yes"),
            ("HF_TOKEN", " hf_abc \n"),
            ("HF_HUB_ETAG_TIMEOUT", "2.5"),
        ]);
        assert_eq!(c.cache_dir, Path::new("/home/u/hf/hub"));
        assert_eq!(c.endpoint, "http://mirror:8080");
        assert!(c.offline);
        assert_eq!(c.token.as_deref(), Some("hf_abc"));
        assert_eq!(c.etag_timeout, Duration::from_millis(2500));
        assert!(
            !format!("{c:?}").contains("hf_abc"),
            "the token must not be printed"
        );
        let c = config(&[
            ("HF_HOME", "/h"),
            ("HF_HUB_CACHE", "/c"),
            ("HF_HUB_OFFLINE", "0"),
        ]);
        assert_eq!(c.cache_dir, Path::new("/c"));
        assert!(!c.offline);
        let c = config(&[
            ("HF_HOME", "/h"),
            ("HF_HUB_OFFLINE", ""),
            ("TRANSFORMERS_OFFLINE", "1"),
        ]);
        assert!(
            c.offline,
            "an empty HF_HUB_OFFLINE falls through to TRANSFORMERS_OFFLINE"
        );
    }

    #[test]
    fn the_token_file_is_read_when_hf_token_is_unset() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "hf_file\n").unwrap();
        let home = dir.path().to_str().unwrap();
        assert_eq!(
            config(&[("HF_HOME", home)]).token.as_deref(),
            Some("hf_file")
        );
        assert_eq!(
            config(&[("HF_HOME", home), ("HF_TOKEN", "hf_env")])
                .token
                .as_deref(),
            Some("hf_env")
        );
    }
}
