//! `hf_hub_download`: one file of a repository into the cache, as huggingface_hub does it.

use crate::cache::{
    hf_hub_url, is_commit_hash, repo_folder_name, try_to_load_from_cache, validate_filename,
    validate_repo_id, validate_revision, CachedFile,
};
use crate::error::{HubError, Result};
use crate::http::{request, Response};
use crate::{HubConfig, DEFAULT_REVISION};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// How many redirects a request follows before giving up.
const MAX_REDIRECTS: usize = 10;

/// Downloads `filename` of the model repository `repo_id` at `revision` (default `main`) into
/// the cache of `config` and returns its path in the snapshot folder
/// (`models--org--name/snapshots/<commit>/<filename>`), as huggingface_hub's `hf_hub_download`.
///
/// A commit hash whose file is cached is served without the network; offline, the file comes
/// from the cache or the call fails with [`HubError::LocalEntryNotFound`]. A file the Hub does
/// not have fails with [`HubError::EntryNotFound`] and is remembered in `.no_exist`. Bytes are
/// written to `blobs/<etag>.<random>.incomplete` and renamed to `blobs/<etag>` only when
/// complete; any failure removes the partial file and makes no snapshot link.
pub fn hf_hub_download(
    config: &HubConfig,
    repo_id: &str,
    filename: &str,
    revision: Option<&str>,
) -> Result<PathBuf> {
    validate_repo_id(repo_id)?;
    validate_filename(filename)?;
    let revision = revision.unwrap_or(DEFAULT_REVISION);
    validate_revision(revision)?;
    let storage = config.cache_dir.join(repo_folder_name(repo_id));
    let url = hf_hub_url(&config.endpoint, repo_id, filename, revision);
    let entry_not_found = || HubError::EntryNotFound {
        repo_id: repo_id.to_owned(),
        revision: revision.to_owned(),
        filename: filename.to_owned(),
        url: url.clone(),
    };
    if is_commit_hash(revision) {
        let pointer = storage.join("snapshots").join(revision).join(filename);
        if pointer.is_file() {
            return Ok(pointer);
        }
    }
    if config.offline {
        return match try_to_load_from_cache(&config.cache_dir, repo_id, filename, revision)? {
            CachedFile::Found(path) => Ok(path),
            CachedFile::NoExist => Err(entry_not_found()),
            CachedFile::Missing => Err(HubError::LocalEntryNotFound {
                repo_id: repo_id.to_owned(),
                revision: revision.to_owned(),
                filename: filename.to_owned(),
                cache_dir: config.cache_dir.clone(),
                offline: true,
            }),
        };
    }
    let meta = match metadata(config, &url, repo_id, revision, filename) {
        Ok(meta) => meta,
        Err((error, Some(commit))) if error.is_entry_not_found() => {
            // As huggingface_hub: remember the absence, so offline loads can skip the file.
            let marker = storage.join(".no_exist").join(&commit).join(filename);
            if let Some(parent) = marker.parent() {
                if std::fs::create_dir_all(parent).is_ok() {
                    let _ = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&marker);
                }
            }
            write_ref(&storage, revision, &commit)?;
            return Err(error);
        }
        Err((error @ HubError::Connection { .. }, _)) => {
            // huggingface_hub falls back to the cache when the Hub cannot be reached.
            return match try_to_load_from_cache(&config.cache_dir, repo_id, filename, revision)? {
                CachedFile::Found(path) => Ok(path),
                _ => Err(error),
            };
        }
        Err((error, _)) => return Err(error),
    };
    write_ref(&storage, revision, &meta.commit)?;
    let pointer = storage.join("snapshots").join(&meta.commit).join(filename);
    if pointer.is_file() {
        return Ok(pointer);
    }
    let blob = storage.join("blobs").join(&meta.etag);
    if !blob.is_file() {
        fetch(config, &meta, filename, &blob)?;
    }
    link(&blob, &pointer, filename)?;
    Ok(pointer)
}

/// What the HEAD of a resolve URL says of a file.
struct Metadata {
    /// `X-Repo-Commit`.
    commit: String,
    /// `X-Linked-Etag` or `ETag`, normalized: the blob's name.
    etag: String,
    /// `X-Linked-Size`, else `Content-Length` of a non-redirect.
    size: Option<u64>,
    /// Where to GET the bytes (`Location`, else the resolve URL).
    location: String,
}

/// huggingface_hub's `get_hf_file_metadata` + `hf_raise_for_status`; on an error, also the
/// commit the response named (for the `.no_exist` marker).
// The error travels one call up and is taken apart there: boxing it would buy nothing.
#[allow(clippy::result_large_err)]
fn metadata(
    config: &HubConfig,
    url: &str,
    repo_id: &str,
    revision: &str,
    filename: &str,
) -> std::result::Result<Metadata, (HubError, Option<String>)> {
    let mut current = url.to_owned();
    let mut hops = 0;
    let resp = loop {
        let mut headers = base_headers(config, &current);
        // No compression: the size must be the file's.
        headers.push(("Accept-Encoding", "identity".into()));
        let resp =
            request("HEAD", &current, &headers, config.etag_timeout).map_err(|e| (e, None))?;
        // Only relative redirects are followed (a renamed repository); an absolute one points
        // at the file's storage (the CDN) and is where the bytes are fetched from.
        match resp.header("Location") {
            Some(loc) if (300..400).contains(&resp.status) && is_relative(loc) => {
                hops += 1;
                if hops > MAX_REDIRECTS {
                    return Err((too_many_redirects(url), None));
                }
                current = join_url(&current, loc);
            }
            _ => break resp,
        }
    };
    let commit = resp.header("X-Repo-Commit").map(str::to_owned);
    if !(200..400).contains(&resp.status) {
        let error = status_error(&resp, &current, repo_id, revision, filename);
        return Err((error, commit.filter(|c| is_safe_component(c))));
    }
    let bad = |message: String| {
        (
            HubError::BadResponse {
                url: current.clone(),
                message,
            },
            None,
        )
    };
    let commit = commit.ok_or_else(|| {
        bad("no `X-Repo-Commit` header: this is not a Hugging Face Hub endpoint (check HF_ENDPOINT)".into())
    })?;
    if !is_safe_component(&commit) {
        return Err(bad(format!("`X-Repo-Commit: {commit}` is not a commit id")));
    }
    let etag = resp
        .header("X-Linked-Etag")
        .or_else(|| resp.header("ETag"))
        .map(normalize_etag)
        .ok_or_else(|| {
            bad("no `ETag` or `X-Linked-Etag` header: cannot name the file in the cache".into())
        })?;
    if !is_safe_component(&etag) {
        return Err(bad(format!(
            "the ETag `{etag}` cannot name a file in the cache"
        )));
    }
    let redirect = (300..400).contains(&resp.status);
    let size = resp
        .header("X-Linked-Size")
        .or_else(|| (!redirect).then(|| resp.header("Content-Length")).flatten())
        .and_then(|s| s.trim().parse().ok());
    let location = resp
        .header("Location")
        .map(|loc| join_url(&current, loc))
        .unwrap_or_else(|| current.clone());
    Ok(Metadata {
        commit,
        etag,
        size,
        location,
    })
}

/// huggingface_hub's `_normalize_etag`: `etag.lstrip("W/").strip('"')`.
fn normalize_etag(etag: &str) -> String {
    etag.trim_start_matches(['W', '/'])
        .trim_matches('"')
        .to_owned()
}

/// A single path component that is neither empty nor `.` / `..`.
fn is_safe_component(value: &str) -> bool {
    !value.is_empty() && value != "." && value != ".." && !value.contains(['/', '\\', '\0'])
}

/// The typed error for an error status, from `X-Error-Code` as `hf_raise_for_status` reads it.
fn status_error(
    resp: &Response,
    url: &str,
    repo_id: &str,
    revision: &str,
    filename: &str,
) -> HubError {
    let code = resp.header("X-Error-Code").unwrap_or_default();
    let message = resp.header("X-Error-Message").unwrap_or_default();
    match (code, resp.status) {
        ("RevisionNotFound", _) => HubError::RevisionNotFound {
            repo_id: repo_id.to_owned(),
            revision: revision.to_owned(),
            url: url.to_owned(),
        },
        // A 404 without a code is read as a missing file too: a plain mirror sends no codes.
        ("EntryNotFound", _) | ("", 404) => HubError::EntryNotFound {
            repo_id: repo_id.to_owned(),
            revision: revision.to_owned(),
            filename: filename.to_owned(),
            url: url.to_owned(),
        },
        ("GatedRepo", _) => HubError::GatedRepo {
            repo_id: repo_id.to_owned(),
            url: url.to_owned(),
        },
        ("RepoNotFound", status) => HubError::RepositoryNotFound {
            repo_id: repo_id.to_owned(),
            url: url.to_owned(),
            status,
        },
        // The Hub answers 401 for a missing repository as for a private one.
        (_, 401) if message != "Invalid credentials in Authorization header" => {
            HubError::RepositoryNotFound {
                repo_id: repo_id.to_owned(),
                url: url.to_owned(),
                status: 401,
            }
        }
        (_, status) => HubError::Http {
            url: url.to_owned(),
            status,
            message: if message.is_empty() {
                resp.reason.clone()
            } else {
                message.to_owned()
            },
        },
    }
}

/// GETs the bytes at `meta.location` into `blob`, through a temporary file renamed into place
/// only when the whole body (and the announced size) arrived.
fn fetch(config: &HubConfig, meta: &Metadata, filename: &str, blob: &Path) -> Result<()> {
    let mut url = meta.location.clone();
    let mut hops = 0;
    let mut resp = loop {
        let headers = base_headers(config, &url);
        let resp = request("GET", &url, &headers, config.download_timeout)?;
        match resp.header("Location") {
            Some(loc) if (300..400).contains(&resp.status) => {
                hops += 1;
                if hops > MAX_REDIRECTS {
                    return Err(too_many_redirects(&meta.location));
                }
                url = join_url(&url, loc);
            }
            _ => break resp,
        }
    };
    if resp.status != 200 {
        return Err(HubError::Http {
            url,
            status: resp.status,
            message: resp
                .header("X-Error-Message")
                .map_or_else(|| resp.reason.clone(), str::to_owned),
        });
    }
    let dir = blob.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| HubError::io(dir, e))?;
    let name = blob
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Unique per download, as huggingface_hub >= 1.x: two processes never write one file.
    let tmp = dir.join(format!("{name}.{:08x}.incomplete", random_u32()));
    let result = copy_body(&mut resp.body, &tmp, &url, filename, meta.size);
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, blob).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        HubError::io(blob, e)
    })
}

/// Streams the body into a new file at `tmp`, checking the size against `expected`.
fn copy_body(
    body: &mut dyn Read,
    tmp: &Path,
    url: &str,
    filename: &str,
    expected: Option<u64>,
) -> Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tmp)
        .map_err(|e| HubError::io(tmp, e))?;
    let mut received = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    let interrupted = |received, message: String| HubError::Interrupted {
        filename: filename.to_owned(),
        url: url.to_owned(),
        received,
        expected,
        message,
    };
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(interrupted(received, e.to_string())),
        };
        file.write_all(&buf[..n])
            .map_err(|e| HubError::io(tmp, e))?;
        received += n as u64;
    }
    if let Some(size) = expected {
        if received != size {
            return Err(interrupted(
                received,
                format!("the body has {received} bytes but the Hub announced {size}"),
            ));
        }
    }
    file.sync_all().map_err(|e| HubError::io(tmp, e))
}

/// Points `snapshots/<commit>/<filename>` at the blob with a relative link (`../../blobs/<etag>`),
/// made under a temporary name and renamed into place so that the link is never half made.
/// Where links cannot be made, the blob is copied, as huggingface_hub does on such systems.
fn link(blob: &Path, pointer: &Path, filename: &str) -> Result<()> {
    let dir = pointer.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| HubError::io(dir, e))?;
    let tmp = dir.join(format!(".{:08x}.incomplete", random_u32()));
    // From the pointer's folder up to the repository folder: snapshots/<commit>/ plus one
    // level per `/` in the filename.
    let mut target = PathBuf::new();
    for _ in 0..2 + filename.matches('/').count() {
        target.push("..");
    }
    target.push("blobs");
    target.push(blob.file_name().unwrap_or_default());
    #[cfg(unix)]
    let made = std::os::unix::fs::symlink(&target, &tmp);
    #[cfg(not(unix))]
    let made: std::io::Result<()> = Err(std::io::ErrorKind::Unsupported.into());
    if made.is_err() {
        std::fs::copy(blob, &tmp).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            HubError::io(&tmp, e)
        })?;
    }
    std::fs::rename(&tmp, pointer).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        HubError::io(pointer, e)
    })
}

/// Writes `refs/<revision>` = `commit` (no newline, as Python) when the revision is a name.
fn write_ref(storage: &Path, revision: &str, commit: &str) -> Result<()> {
    if revision == commit {
        return Ok(());
    }
    let path = storage.join("refs").join(revision);
    if std::fs::read_to_string(&path).is_ok_and(|c| c.trim() == commit) {
        return Ok(());
    }
    let dir = path.parent().unwrap_or(storage);
    std::fs::create_dir_all(dir).map_err(|e| HubError::io(dir, e))?;
    let tmp = dir.join(format!(".{:08x}.incomplete", random_u32()));
    std::fs::write(&tmp, commit).map_err(|e| HubError::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        HubError::io(&path, e)
    })
}

/// The headers every request sends: a user agent, and the token only to the endpoint's own
/// host (huggingface_hub drops it for the CDN a file redirects to).
fn base_headers(config: &HubConfig, url: &str) -> Vec<(&'static str, String)> {
    let mut headers = vec![(
        "User-Agent",
        format!("ember/{}; hf_hub_compatible", env!("CARGO_PKG_VERSION")),
    )];
    if let Some(token) = &config.token {
        if origin(url) == origin(&config.endpoint) {
            headers.push(("Authorization", format!("Bearer {token}")));
        }
    }
    headers
}

/// `scheme://authority` of a URL.
fn origin(url: &str) -> &str {
    let start = url.find("://").map_or(0, |i| i + 3);
    let end = url[start..].find('/').map_or(url.len(), |i| start + i);
    &url[..end]
}

/// A `Location` without a scheme and host.
fn is_relative(location: &str) -> bool {
    !location.contains("://") && !location.starts_with("//")
}

/// Resolves a `Location` against the URL it came from.
fn join_url(base: &str, location: &str) -> String {
    if location.contains("://") {
        location.to_owned()
    } else if let Some(rest) = location.strip_prefix("//") {
        let scheme = base.split("://").next().unwrap_or("https");
        format!("{scheme}://{rest}")
    } else if location.starts_with('/') {
        format!("{}{location}", origin(base))
    } else {
        let dir = base.rfind('/').map_or(base, |i| &base[..=i]);
        format!("{dir}{location}")
    }
}

fn too_many_redirects(url: &str) -> HubError {
    HubError::BadResponse {
        url: url.to_owned(),
        message: format!("more than {MAX_REDIRECTS} redirects"),
    }
}

/// A random number for temporary names: std's randomly keyed hasher, so no RNG dependency.
fn random_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish() as u32
}

/// A repository at one revision, whose files are fetched from one commit: the first file
/// resolves the revision (`main`) and the rest are asked for at that commit, as transformers
/// passes `_commit_hash` along, so a push in between cannot mix two versions.
#[derive(Debug)]
pub struct HubRepo<'a> {
    config: &'a HubConfig,
    repo_id: String,
    revision: String,
    commit: Option<String>,
    snapshot: Option<PathBuf>,
}

impl<'a> HubRepo<'a> {
    /// The repository `repo_id` at `revision` (default `main`); checks both names.
    pub fn new(config: &'a HubConfig, repo_id: &str, revision: Option<&str>) -> Result<Self> {
        validate_repo_id(repo_id)?;
        let revision = revision.unwrap_or(DEFAULT_REVISION);
        validate_revision(revision)?;
        Ok(Self {
            config,
            repo_id: repo_id.to_owned(),
            revision: revision.to_owned(),
            commit: None,
            snapshot: None,
        })
    }

    /// The repository id.
    pub fn repo_id(&self) -> &str {
        &self.repo_id
    }

    /// Downloads (or finds in the cache) a file the caller needs.
    pub fn get(&mut self, filename: &str) -> Result<PathBuf> {
        let revision = self.commit.as_deref().unwrap_or(&self.revision);
        let path = hf_hub_download(self.config, &self.repo_id, filename, Some(revision))
            .map_err(|e| self.name_revision(e))?;
        if self.commit.is_none() {
            // snapshots/<commit>/<filename>: the commit is the folder under `snapshots`.
            let depth = 1 + filename.matches('/').count();
            let snapshot = path.ancestors().nth(depth).map(Path::to_path_buf);
            self.commit = snapshot
                .as_ref()
                .and_then(|s| s.file_name())
                .map(|c| c.to_string_lossy().into_owned());
            self.snapshot = snapshot;
        }
        Ok(path)
    }

    /// As [`Self::get`] for a file the repository may lack: `None` when the Hub says 404 (or,
    /// offline, when the cache has no trace of it).
    pub fn get_optional(&mut self, filename: &str) -> Result<Option<PathBuf>> {
        match self.get(filename) {
            Ok(path) => Ok(Some(path)),
            Err(e) if e.is_entry_not_found() => Ok(None),
            Err(HubError::LocalEntryNotFound { offline: true, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The snapshot folder (`snapshots/<commit>`), once a file was fetched.
    pub fn snapshot_dir(&self) -> Option<&Path> {
        self.snapshot.as_deref()
    }

    /// Errors say the revision the user asked for, not the commit it was pinned to.
    fn name_revision(&self, error: HubError) -> HubError {
        match error {
            HubError::EntryNotFound {
                repo_id,
                filename,
                url,
                ..
            } => HubError::EntryNotFound {
                repo_id,
                revision: self.revision.clone(),
                filename,
                url,
            },
            HubError::LocalEntryNotFound {
                repo_id,
                filename,
                cache_dir,
                offline,
                ..
            } => HubError::LocalEntryNotFound {
                repo_id,
                revision: self.revision.clone(),
                filename,
                cache_dir,
                offline,
            },
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_urls_and_origins() {
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
        assert_eq!(normalize_etag("\"abc\""), "abc");
        assert_eq!(origin("http://h:1/a/b"), "http://h:1");
        assert_eq!(join_url("http://h:1/a/b", "/c"), "http://h:1/c");
        assert_eq!(join_url("http://h:1/a/b", "c"), "http://h:1/a/c");
        assert_eq!(join_url("https://h/a", "//cdn/x"), "https://cdn/x");
        assert_eq!(join_url("http://h/a", "https://cdn/x"), "https://cdn/x");
        assert!(is_relative("/api/x") && !is_relative("https://cdn/x"));
        assert!(!is_safe_component("..") && !is_safe_component("a/b") && is_safe_component("abc"));
    }

    #[test]
    fn the_token_goes_only_to_the_endpoint_host() {
        let config = HubConfig::new("http://hub:1", "/c").token(Some("t".into()));
        assert!(base_headers(&config, "http://hub:1/x")
            .iter()
            .any(|(n, v)| *n == "Authorization" && v == "Bearer t"));
        assert!(!base_headers(&config, "http://cdn:2/x")
            .iter()
            .any(|(n, _)| *n == "Authorization"));
    }
}
