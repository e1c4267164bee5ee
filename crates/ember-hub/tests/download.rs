//! `hf_hub_download` against a Hub on loopback: the cache layout huggingface_hub writes, offline
//! reads, revisions, redirects, tokens, and typed errors that leave no partial file behind.

use ember_hub::{hf_hub_download, HubConfig, HubError};
use ember_testkit::hub_server::{fake_hash, HubServer, ServedRepo, ServedRevision};
use std::path::{Path, PathBuf};

const MAIN: &str = "1111111111111111111111111111111111111111";
const V1: &str = "2222222222222222222222222222222222222222";

struct Fixture {
    _files: tempfile::TempDir,
    cache: tempfile::TempDir,
    server: HubServer,
}

/// `org/name` with `main` (config.json, weights, nested file) and tag `v1` (another config).
fn start() -> Fixture {
    let files = tempfile::tempdir().unwrap();
    let main = files.path().join("main");
    let v1 = files.path().join("v1");
    std::fs::create_dir_all(main.join("sub")).unwrap();
    std::fs::create_dir_all(&v1).unwrap();
    std::fs::write(main.join("config.json"), br#"{"rev": "main"}"#).unwrap();
    std::fs::write(main.join("model.safetensors"), vec![7u8; 300_000]).unwrap();
    std::fs::write(main.join("sub/nested.txt"), b"nested").unwrap();
    std::fs::write(v1.join("config.json"), br#"{"rev": "v1"}"#).unwrap();
    let server = HubServer::start(vec![ServedRepo {
        repo_id: "org/name".into(),
        aliases: vec!["old-org/name".into()],
        revisions: vec![
            ServedRevision {
                commit: MAIN.into(),
                refs: vec!["main".into()],
                dir: main,
            },
            ServedRevision {
                commit: V1.into(),
                refs: vec!["v1".into()],
                dir: v1,
            },
        ],
    }])
    .unwrap();
    Fixture {
        _files: files,
        cache: tempfile::tempdir().unwrap(),
        server,
    }
}

impl Fixture {
    fn config(&self) -> HubConfig {
        HubConfig::new(self.server.endpoint(), self.cache.path())
    }

    fn storage(&self) -> PathBuf {
        self.cache.path().join("models--org--name")
    }
}

/// Every path under `dir`, relative, sorted (links listed, not followed).
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            out.push(p.strip_prefix(dir).unwrap().display().to_string());
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn files_land_in_huggingface_hubs_cache_layout() {
    let f = start();
    let config = f.config();
    let path = hf_hub_download(&config, "org/name", "config.json", None).unwrap();
    let weights = hf_hub_download(&config, "org/name", "model.safetensors", None).unwrap();
    let nested = hf_hub_download(&config, "org/name", "sub/nested.txt", Some("main")).unwrap();
    let storage = f.storage();
    assert_eq!(
        path,
        storage.join("snapshots").join(MAIN).join("config.json")
    );
    assert_eq!(
        std::fs::read_to_string(storage.join("refs/main")).unwrap(),
        MAIN
    );
    let config_etag = fake_hash(br#"{"rev": "main"}"#, 40);
    // LFS files are named by the linked etag (the sha256), not the redirect's own ETag.
    let weights_etag = fake_hash(&vec![7u8; 300_000], 64);
    for (pointer, etag, up) in [
        (&path, &config_etag, "../../"),
        (&weights, &weights_etag, "../../"),
        (&nested, &fake_hash(b"nested", 40), "../../../"),
    ] {
        let target = std::fs::read_link(pointer).unwrap();
        assert_eq!(
            target,
            Path::new(&format!("{up}blobs/{etag}")),
            "{pointer:?}"
        );
        assert!(storage.join("blobs").join(etag).is_file());
    }
    assert_eq!(std::fs::read(&weights).unwrap(), vec![7u8; 300_000]);
    assert!(
        tree(f.cache.path())
            .iter()
            .all(|p| !p.ends_with(".incomplete")),
        "{:?}",
        tree(f.cache.path())
    );
    let requests = f.server.requests();
    assert!(
        requests.iter().any(|r| r.starts_with("GET /cdn/")),
        "{requests:?}"
    );
    // A second call finds the snapshot: one HEAD, no GET.
    let before = f.server.requests().len();
    hf_hub_download(&config, "org/name", "model.safetensors", None).unwrap();
    let after = f.server.requests();
    assert_eq!(after.len(), before + 1);
    assert!(after.last().unwrap().starts_with("HEAD "), "{after:?}");
}

#[test]
fn offline_and_unreachable_loads_read_only_the_cache() {
    let f = start();
    let online = f.config();
    hf_hub_download(&online, "org/name", "config.json", None).unwrap();
    let endpoint = f.server.endpoint();
    let Fixture {
        server,
        cache,
        _files,
    } = f;
    server.stop();
    let offline = HubConfig::new(endpoint.clone(), cache.path()).offline(true);
    let path = hf_hub_download(&offline, "org/name", "config.json", None).unwrap();
    assert_eq!(std::fs::read_to_string(path).unwrap(), r#"{"rev": "main"}"#);
    let err = hf_hub_download(&offline, "org/name", "model.safetensors", None).unwrap_err();
    match &err {
        HubError::LocalEntryNotFound {
            repo_id,
            filename,
            offline: true,
            ..
        } => assert_eq!(
            (repo_id.as_str(), filename.as_str()),
            ("org/name", "model.safetensors")
        ),
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("HF_HUB_OFFLINE"), "{err}");
    // Online but the server is gone: a cached file is served, as huggingface_hub falls back;
    // an uncached one is a connection error naming the URL.
    let online = HubConfig::new(endpoint.clone(), cache.path());
    hf_hub_download(&online, "org/name", "config.json", None).unwrap();
    let err = hf_hub_download(&online, "org/name", "model.safetensors", None).unwrap_err();
    assert!(
        matches!(&err, HubError::Connection { url, .. } if url == &format!("{endpoint}/org/name/resolve/main/model.safetensors")),
        "{err:?}"
    );
}

#[test]
fn a_revision_selects_another_commit_and_a_commit_hash_needs_no_network() {
    let f = start();
    let config = f.config();
    let path = hf_hub_download(&config, "org/name", "config.json", Some("v1")).unwrap();
    assert_eq!(
        path,
        f.storage().join("snapshots").join(V1).join("config.json")
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), r#"{"rev": "v1"}"#);
    assert_eq!(
        std::fs::read_to_string(f.storage().join("refs/v1")).unwrap(),
        V1
    );
    let before = f.server.requests().len();
    let again = hf_hub_download(&config, "org/name", "config.json", Some(V1)).unwrap();
    assert_eq!(again, path);
    assert_eq!(
        f.server.requests().len(),
        before,
        "a cached commit is not asked for"
    );
}

#[test]
fn a_renamed_repository_follows_the_relative_redirect() {
    let f = start();
    let path = hf_hub_download(&f.config(), "old-org/name", "config.json", None).unwrap();
    // Stored under the id asked for, as huggingface_hub does.
    assert!(path.starts_with(f.cache.path().join("models--old-org--name")));
    assert_eq!(std::fs::read_to_string(path).unwrap(), r#"{"rev": "main"}"#);
}

#[test]
fn the_token_is_sent_to_the_hub_but_not_to_another_host() {
    let f = start();
    // `localhost` for the Hub, `127.0.0.1` for the CDN the server redirects to.
    let port = f.server.endpoint().rsplit(':').next().unwrap().to_owned();
    let config = HubConfig::new(format!("http://localhost:{port}"), f.cache.path())
        .token(Some("hf_secret".into()));
    hf_hub_download(&config, "org/name", "model.safetensors", None).unwrap();
    let requests = f.server.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with("HEAD /org/name/") && r.ends_with("auth=Bearer hf_secret")),
        "{requests:?}"
    );
    let cdn: Vec<_> = requests
        .iter()
        .filter(|r| r.starts_with("GET /cdn/"))
        .collect();
    assert!(
        !cdn.is_empty() && cdn.iter().all(|r| !r.contains("auth=")),
        "{requests:?}"
    );
}

/// No blob, no partial file and no snapshot link for `filename`.
fn assert_nothing_cached(f: &Fixture, filename: &str) {
    let all = tree(f.cache.path());
    assert!(all.iter().all(|p| !p.ends_with(".incomplete")), "{all:?}");
    assert!(all.iter().all(|p| !p.contains("/blobs/")), "{all:?}");
    assert!(
        all.iter()
            .all(|p| !(p.contains("/snapshots/") && p.ends_with(filename))),
        "{all:?}"
    );
}

#[test]
fn missing_files_repos_and_revisions_are_typed_errors_that_cache_nothing() {
    let f = start();
    let config = f.config();
    let endpoint = f.server.endpoint();
    let err = hf_hub_download(&config, "org/name", "nope.json", None).unwrap_err();
    match &err {
        HubError::EntryNotFound {
            filename,
            url,
            revision,
            ..
        } => {
            assert_eq!(filename, "nope.json");
            assert_eq!(revision, "main");
            assert_eq!(url, &format!("{endpoint}/org/name/resolve/main/nope.json"));
        }
        other => panic!("{other:?}"),
    }
    assert!(err.is_entry_not_found());
    // Remembered as huggingface_hub remembers it, so offline loads skip it.
    assert!(f
        .storage()
        .join(".no_exist")
        .join(MAIN)
        .join("nope.json")
        .is_file());
    assert_nothing_cached(&f, "nope.json");

    let err = hf_hub_download(&config, "org/missing", "config.json", None).unwrap_err();
    assert!(
        matches!(&err, HubError::RepositoryNotFound { repo_id, status: 401, url } if repo_id == "org/missing" && url.contains("/org/missing/resolve/main/config.json")),
        "{err:?}"
    );
    let err = hf_hub_download(&config, "org/name", "config.json", Some("v9")).unwrap_err();
    assert!(
        matches!(&err, HubError::RevisionNotFound { revision, .. } if revision == "v9"),
        "{err:?}"
    );
    assert!(!f
        .cache
        .path()
        .join("models--org--missing/snapshots")
        .exists());
    let err = hf_hub_download(&config, "not a repo", "config.json", None).unwrap_err();
    assert!(matches!(err, HubError::InvalidRepoId { .. }), "{err:?}");
    let err = hf_hub_download(&config, "org/name", "../escape", None).unwrap_err();
    assert!(
        matches!(
            err,
            HubError::InvalidName {
                what: "filename",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn a_connection_dropped_mid_body_leaves_no_partial_file() {
    let f = start();
    let config = f.config();
    f.server.drop_mid_body("model.safetensors");
    f.server.drop_mid_body("config.json");
    for file in ["model.safetensors", "config.json"] {
        let err = hf_hub_download(&config, "org/name", file, None).unwrap_err();
        match &err {
            HubError::Interrupted {
                filename,
                url,
                received,
                ..
            } => {
                assert_eq!(filename, file);
                assert!(!url.is_empty());
                assert!(*received > 0, "half the body arrived: {err}");
            }
            other => panic!("{file}: {other:?}"),
        }
        assert_nothing_cached(&f, file);
    }
}

#[test]
fn https_without_tls_is_a_typed_error() {
    if cfg!(feature = "https") {
        eprintln!("SKIP: built with TLS");
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let config = HubConfig::new("https://huggingface.co", cache.path());
    let err = hf_hub_download(&config, "org/name", "config.json", None).unwrap_err();
    assert!(
        matches!(&err, HubError::TlsUnavailable { url } if url == "https://huggingface.co/org/name/resolve/main/config.json"),
        "{err:?}"
    );
}
