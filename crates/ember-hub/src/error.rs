//! The one error type of this crate, with huggingface_hub's error names.

use std::path::PathBuf;

/// Everything that can go wrong while resolving a file of a Hub repository.
///
/// The variants follow huggingface_hub's exceptions (`RepositoryNotFoundError`,
/// `RevisionNotFoundError`, `EntryNotFoundError`, `LocalEntryNotFoundError`, ...); each names
/// the repository, file and URL involved so that a message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// A name that is not a valid repository id (`org/name` or `name`).
    #[error("`{repo_id}` is not a valid Hub repository id: {reason}")]
    InvalidRepoId {
        /// The name as given.
        repo_id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A file name or revision that cannot be a path inside a repository.
    #[error("`{value}` is not a valid {what}: {reason}")]
    InvalidName {
        /// `filename` or `revision`.
        what: &'static str,
        /// The value as given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The Hub answered that the repository does not exist (or is private and no valid token
    /// was sent): `RepositoryNotFoundError`.
    #[error(
        "repository `{repo_id}` not found at {url} (status {status}); check the repo id, and for a \
         private or gated repository set HF_TOKEN"
    )]
    RepositoryNotFound {
        /// The repository.
        repo_id: String,
        /// The URL asked.
        url: String,
        /// The HTTP status (404, or 401 for a missing or private repository).
        status: u16,
    },
    /// The repository exists but not the branch, tag or commit: `RevisionNotFoundError`.
    #[error("revision `{revision}` of repository `{repo_id}` not found at {url}")]
    RevisionNotFound {
        /// The repository.
        repo_id: String,
        /// The revision asked for.
        revision: String,
        /// The URL asked.
        url: String,
    },
    /// The repository and revision exist but not the file: `EntryNotFoundError`.
    #[error(
        "file `{filename}` not found in repository `{repo_id}` at revision `{revision}` ({url})"
    )]
    EntryNotFound {
        /// The repository.
        repo_id: String,
        /// The revision asked for.
        revision: String,
        /// The file.
        filename: String,
        /// The URL asked.
        url: String,
    },
    /// A gated repository whose conditions the token has not accepted: `GatedRepoError`.
    #[error("cannot access gated repository `{repo_id}` at {url}: accept its conditions on the Hub and set HF_TOKEN")]
    GatedRepo {
        /// The repository.
        repo_id: String,
        /// The URL asked.
        url: String,
    },
    /// Any other HTTP error status.
    #[error("HTTP {status} from {url}: {message}")]
    Http {
        /// The URL asked.
        url: String,
        /// The status code.
        status: u16,
        /// The server's `X-Error-Message`, or the reason phrase.
        message: String,
    },
    /// The server could not be reached, or the connection failed before a response.
    #[error("cannot reach {url}: {message}")]
    Connection {
        /// The URL asked.
        url: String,
        /// What failed.
        message: String,
    },
    /// The response was not HTTP this crate can read, or lacks what the Hub always sends.
    #[error("unexpected response from {url}: {message}")]
    BadResponse {
        /// The URL asked.
        url: String,
        /// What is wrong.
        message: String,
    },
    /// The body of a file stopped before its end (a dropped connection, a short body); the
    /// partial download was removed.
    #[error("download of `{filename}` from {url} was interrupted after {received} bytes{}: {message}", expected_of(.expected))]
    Interrupted {
        /// The file.
        filename: String,
        /// The URL being read.
        url: String,
        /// Bytes received before the failure.
        received: u64,
        /// The size the server announced, where known.
        expected: Option<u64>,
        /// What failed.
        message: String,
    },
    /// An `https://` endpoint in a build without the `https` feature.
    #[error(
        "cannot fetch {url}: this build has no TLS; build with the `hub` feature (ember-hub's \
         `https`), point HF_ENDPOINT at an http:// mirror, or use the cache (HF_HUB_OFFLINE=1)"
    )]
    TlsUnavailable {
        /// The URL asked.
        url: String,
    },
    /// Offline (`HF_HUB_OFFLINE=1`) or after a connection failure, and the file is not in the
    /// cache: `LocalEntryNotFoundError`.
    #[error(
        "file `{filename}` of repository `{repo_id}` at revision `{revision}` is not in the cache \
         `{cache_dir}`{}",
        if *.offline { " and HF_HUB_OFFLINE is set" } else { "" }
    )]
    LocalEntryNotFound {
        /// The repository.
        repo_id: String,
        /// The revision asked for.
        revision: String,
        /// The file.
        filename: String,
        /// The hub cache folder searched.
        cache_dir: PathBuf,
        /// Whether offline mode was the reason the network was not asked.
        offline: bool,
    },
    /// A file or folder of the cache could not be read or written.
    #[error("cannot access `{path}`: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
}

/// ` of N` where the size is known.
fn expected_of(expected: &Option<u64>) -> String {
    expected.map(|n| format!(" of {n}")).unwrap_or_default()
}

impl HubError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// Whether the error says the file is absent from the repository (a 404 on the file, or a
    /// cached `.no_exist` marker), as opposed to the repository, network or cache failing:
    /// loaders use it to skip optional files and to fall back to another file name.
    pub fn is_entry_not_found(&self) -> bool {
        matches!(self, Self::EntryNotFound { .. })
    }
}

/// This crate's result type.
pub type Result<T, E = HubError> = std::result::Result<T, E>;
