//! huggingface_hub's names: repository ids, cache folder names, resolve URLs, and reading a file
//! from the cache without the network (`try_to_load_from_cache`).

use crate::error::{HubError, Result};
use std::path::{Path, PathBuf};

/// The longest repository or organisation name the Hub accepts.
const MAX_NAME: usize = 96;

/// Checks a repository id as huggingface_hub's `validate_repo_id` does: `name` or
/// `namespace/name`, each part of letters, digits, `_`, `-` and `.` (at most 96), starting and
/// ending with a letter, digit or `_`, with no `--` or `..`, not ending in `.git`.
pub fn validate_repo_id(repo_id: &str) -> Result<()> {
    let invalid = |reason: &str| {
        Err(HubError::InvalidRepoId {
            repo_id: repo_id.to_owned(),
            reason: reason.to_owned(),
        })
    };
    let parts: Vec<&str> = repo_id.split('/').collect();
    if parts.len() > 2 {
        return invalid("it has more than one `/` (expected `name` or `namespace/name`)");
    }
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    for part in &parts {
        if part.is_empty() || part.len() > MAX_NAME {
            return invalid("each part must have 1 to 96 characters");
        }
        if !part.chars().all(|c| word(c) || c == '-' || c == '.') {
            return invalid("only letters, digits, `_`, `-` and `.` are allowed");
        }
        if !part.starts_with(word) || !part.ends_with(word) {
            return invalid("each part must start and end with a letter, digit or `_`");
        }
    }
    if repo_id.contains("--") || repo_id.contains("..") {
        return invalid("`--` and `..` are forbidden");
    }
    if repo_id.ends_with(".git") {
        return invalid("it cannot end with `.git`");
    }
    Ok(())
}

/// Checks a file name inside a repository: relative, `/`-separated, with no empty, `.` or `..`
/// component (it becomes a path under the snapshot folder).
pub fn validate_filename(filename: &str) -> Result<()> {
    check_relative("filename", filename)
}

/// Checks a revision (a branch, tag, commit hash or `refs/pr/N`): it becomes a path under
/// `refs/`, so no empty, `.` or `..` component.
pub fn validate_revision(revision: &str) -> Result<()> {
    check_relative("revision", revision)
}

fn check_relative(what: &'static str, value: &str) -> Result<()> {
    let bad = value.is_empty()
        || value.contains('\\')
        || value.contains('\0')
        || value
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        return Err(HubError::InvalidName {
            what,
            value: value.to_owned(),
            reason: "it must be a relative `/`-separated path without empty, `.` or `..` parts"
                .into(),
        });
    }
    Ok(())
}

/// Whether `revision` is a full commit hash (40 lowercase hex digits), which huggingface_hub
/// serves from the cache without asking the network.
pub fn is_commit_hash(revision: &str) -> bool {
    revision.len() == 40
        && revision
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The cache folder of a model repository: `models--{namespace}--{name}`.
pub fn repo_folder_name(repo_id: &str) -> String {
    std::iter::once("models")
        .chain(repo_id.split('/'))
        .collect::<Vec<_>>()
        .join("--")
}

/// The resolve URL of a file: `{endpoint}/{repo_id}/resolve/{revision}/{filename}`, the revision
/// quoted whole (`refs%2Fpr%2F1`) and the filename with its `/` kept, as huggingface_hub's
/// `hf_hub_url`.
pub fn hf_hub_url(endpoint: &str, repo_id: &str, filename: &str, revision: &str) -> String {
    format!(
        "{}/{repo_id}/resolve/{}/{}",
        endpoint.trim_end_matches('/'),
        quote(revision, false),
        quote(filename, true)
    )
}

/// Python's `urllib.parse.quote`: unreserved characters stay, the rest is `%XX` encoded.
fn quote(value: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"_.-~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// What the cache knows of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CachedFile {
    /// The file, in its snapshot folder.
    Found(PathBuf),
    /// The Hub answered 404 for it at this commit (a `.no_exist` marker).
    NoExist,
    /// The cache holds nothing about it.
    Missing,
}

/// The file `filename` of `repo_id` at `revision` (a branch, tag or commit) in the hub cache
/// `cache_dir`, without the network, as huggingface_hub's `try_to_load_from_cache`.
pub fn try_to_load_from_cache(
    cache_dir: &Path,
    repo_id: &str,
    filename: &str,
    revision: &str,
) -> Result<CachedFile> {
    validate_repo_id(repo_id)?;
    validate_filename(filename)?;
    validate_revision(revision)?;
    let storage = cache_dir.join(repo_folder_name(repo_id));
    let ref_path = storage.join("refs").join(revision);
    let commit = match std::fs::read_to_string(&ref_path) {
        Ok(text) => text.trim().to_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => revision.to_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::IsADirectory => revision.to_owned(),
        Err(e) => return Err(HubError::io(ref_path, e)),
    };
    if check_relative("commit", &commit).is_err() || commit.contains('/') {
        return Err(HubError::BadResponse {
            url: ref_path.display().to_string(),
            message: format!("the cached ref holds `{commit}`, not a commit hash"),
        });
    }
    if storage
        .join(".no_exist")
        .join(&commit)
        .join(filename)
        .is_file()
    {
        return Ok(CachedFile::NoExist);
    }
    let pointer = storage.join("snapshots").join(&commit).join(filename);
    // `is_file` follows the link: a snapshot link whose blob is gone counts as missing.
    Ok(if pointer.is_file() {
        CachedFile::Found(pointer)
    } else {
        CachedFile::Missing
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_are_checked_as_huggingface_hub_checks_them() {
        for ok in [
            "gpt2",
            "bert-base-chinese",
            "org/name",
            "HuggingFaceTB/SmolLM2-135M",
            "a_b/c.d",
        ] {
            assert!(validate_repo_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/abs/path",
            "a/b/c",
            "org/",
            "-x",
            "x-",
            "a--b",
            "a/..b",
            "x.git",
            "a b",
            "./dir",
            "../dir",
            "dir\\x",
            "ünï",
        ] {
            let err = validate_repo_id(bad).unwrap_err();
            assert!(err.to_string().contains(&format!("`{bad}`")), "{err}");
        }
    }

    #[test]
    fn names_urls_and_hashes() {
        assert_eq!(repo_folder_name("org/name"), "models--org--name");
        assert_eq!(repo_folder_name("gpt2"), "models--gpt2");
        assert_eq!(
            hf_hub_url(
                "http://h/",
                "org/n",
                "sub dir/model.safetensors",
                "refs/pr/1"
            ),
            "http://h/org/n/resolve/refs%2Fpr%2F1/sub%20dir/model.safetensors"
        );
        assert!(is_commit_hash(&"a".repeat(40)));
        assert!(!is_commit_hash(&"A".repeat(40)) && !is_commit_hash("main"));
        assert!(validate_filename("../x").is_err() && validate_filename("a//b").is_err());
        assert!(validate_revision("refs/pr/1").is_ok() && validate_revision("..").is_err());
    }

    #[test]
    fn the_cache_is_read_through_refs_and_no_exist_markers() {
        let dir = tempfile::tempdir().unwrap();
        let storage = dir.path().join("models--o--n");
        let commit = "c".repeat(40);
        std::fs::create_dir_all(storage.join("refs")).unwrap();
        std::fs::write(storage.join("refs/main"), &commit).unwrap();
        std::fs::create_dir_all(storage.join("snapshots").join(&commit)).unwrap();
        std::fs::write(storage.join("snapshots").join(&commit).join("a.json"), "{}").unwrap();
        std::fs::create_dir_all(storage.join(".no_exist").join(&commit)).unwrap();
        std::fs::write(storage.join(".no_exist").join(&commit).join("b.json"), "").unwrap();
        let look =
            |file: &str, rev: &str| try_to_load_from_cache(dir.path(), "o/n", file, rev).unwrap();
        assert_eq!(
            look("a.json", "main"),
            CachedFile::Found(storage.join("snapshots").join(&commit).join("a.json"))
        );
        assert!(matches!(look("a.json", &commit), CachedFile::Found(_)));
        assert_eq!(look("b.json", "main"), CachedFile::NoExist);
        assert_eq!(look("c.json", "main"), CachedFile::Missing);
        assert_eq!(look("a.json", "v1"), CachedFile::Missing);
    }
}
