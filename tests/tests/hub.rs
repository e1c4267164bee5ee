//! `from_pretrained("org/name")` for tokenizers and models through a Hub on loopback
//! (`ember_testkit::hub_server`): files land in huggingface_hub's cache, load offline once the
//! server is gone, `revision` picks a commit, and failures are typed errors that leave nothing
//! half-written. Settings travel in `HubConfig`, never through the environment, so these tests
//! run in parallel threads safely.

use ember::hub::{HubConfig, HubError};
use ember::models::generation::GenerationConfig;
use ember::models::{
    AutoModel, AutoModelForCausalLM, FromPretrainedOptions, LlamaForCausalLM, ModelError,
};
use ember::tokenizers::{AutoTokenizer, TokenizerError};
use ember::Backend;
use ember_testkit::hub_server::{HubServer, ServedRepo, ServedRevision};
use std::path::{Path, PathBuf};

const MAIN: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const V2: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

fn fixture(relative: &str) -> PathBuf {
    ember_testkit::workspace()
        .join("tests/fixtures")
        .join(relative)
}

fn repo(id: &str, revisions: &[(&str, &str, &str)]) -> ServedRepo {
    ServedRepo {
        repo_id: id.into(),
        aliases: vec![],
        revisions: revisions
            .iter()
            .map(|(commit, name, dir)| ServedRevision {
                commit: (*commit).into(),
                refs: vec![(*name).into()],
                // Absolute paths (a temporary folder) are served as they are.
                dir: fixture(dir),
            })
            .collect(),
    }
}

/// The Hub of these tests: a tokenizer.json tokenizer, a GPT-2 BPE one (vocab.json +
/// merges.txt), tiny-bert at `main` and its sharded copy at `v2`, a Llama with a generation
/// config, and a repository with a config but no weights.
fn serve() -> HubServer {
    HubServer::start(repos()).unwrap()
}

fn repos() -> Vec<ServedRepo> {
    vec![
        repo("org/chat-tiny", &[(MAIN, "main", "tokenizers/chat-tiny")]),
        repo("org/gpt2-bpe", &[(MAIN, "main", "tokenizers/gpt2-bpe")]),
        repo(
            "org/tiny-bert",
            &[
                (MAIN, "main", "models/tiny-bert"),
                (V2, "v2", "models/tiny-bert-sharded"),
            ],
        ),
        repo("org/tiny-llama", &[(MAIN, "main", "models/tiny-llama-gqa")]),
    ]
}

fn device() -> ember::Device {
    ember::default_device()
}

/// The tensors a load read from the checkpoint (newly initialised ones differ per load).
fn loaded(state: ember::models::StateDict, report: &ember::models::LoadReport) -> Vec<String> {
    let mut out = Vec::new();
    for (key, (shape, values)) in state {
        if !report.missing_keys.contains(&key) {
            out.push(format!("{key} {shape:?} {:x}", checksum(&values)));
        }
    }
    out
}

/// A digest of the exact bits, so that a mismatch prints a line per tensor, not the values.
fn checksum(values: &[f32]) -> u64 {
    values.iter().fold(0xcbf29ce484222325u64, |h, v| {
        (h ^ u64::from(v.to_bits())).wrapping_mul(0x100000001b3)
    })
}

/// Every path under `dir`, relative (links listed, not followed).
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
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
fn tokenizers_load_from_the_hub_then_offline_from_the_cache() {
    let server = serve();
    let cache = tempfile::tempdir().unwrap();
    let online = HubConfig::new(server.endpoint(), cache.path());
    let text = "Hello world, this is Ember.";
    for (id, dir) in [
        ("org/chat-tiny", "tokenizers/chat-tiny"),
        ("org/gpt2-bpe", "tokenizers/gpt2-bpe"),
    ] {
        let local = AutoTokenizer::from_pretrained(fixture(dir)).unwrap();
        let hub = AutoTokenizer::from_pretrained_hub(id, &online, None).unwrap();
        assert_eq!(
            hub.encode(text, None, true).unwrap(),
            local.encode(text, None, true).unwrap(),
            "{id}"
        );
    }
    let snapshot = cache
        .path()
        .join("models--org--chat-tiny/snapshots")
        .join(MAIN);
    assert!(snapshot.join("tokenizer.json").is_symlink());
    assert!(snapshot.join("tokenizer_config.json").is_symlink());
    // The BPE repository has no tokenizer.json: its 404 is remembered, and the legacy files used.
    let bpe = cache.path().join("models--org--gpt2-bpe");
    assert!(bpe
        .join(".no_exist")
        .join(MAIN)
        .join("tokenizer.json")
        .is_file());
    assert!(bpe
        .join("snapshots")
        .join(MAIN)
        .join("merges.txt")
        .is_symlink());

    server.stop();
    let offline = HubConfig::new("http://127.0.0.1:9", cache.path()).offline(true);
    for (id, dir) in [
        ("org/chat-tiny", "tokenizers/chat-tiny"),
        ("org/gpt2-bpe", "tokenizers/gpt2-bpe"),
    ] {
        let local = AutoTokenizer::from_pretrained(fixture(dir)).unwrap();
        let cached = AutoTokenizer::from_pretrained_hub(id, &offline, None).unwrap();
        assert_eq!(
            cached.encode(text, None, true).unwrap(),
            local.encode(text, None, true).unwrap(),
            "{id}"
        );
    }
    let err = AutoTokenizer::from_pretrained_hub("org/never-fetched", &offline, None).unwrap_err();
    let TokenizerError::Hub { name, source } = err else {
        panic!("not a Hub error: {err:?}");
    };
    match *source {
        HubError::LocalEntryNotFound {
            repo_id, filename, ..
        } => {
            assert_eq!(name, "org/never-fetched");
            assert_eq!(
                (repo_id.as_str(), filename.as_str()),
                ("org/never-fetched", "tokenizer.json")
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn models_load_from_the_hub_at_a_revision_then_offline() {
    let server = serve();
    let cache = tempfile::tempdir().unwrap();
    let online =
        FromPretrainedOptions::default().hub(HubConfig::new(server.endpoint(), cache.path()));
    let plain = FromPretrainedOptions::default();
    let bert = |dir: &str, options: &FromPretrainedOptions| {
        let (m, report) = AutoModel::from_pretrained_with::<Backend>(dir, options, &device())
            .unwrap_or_else(|e| panic!("{dir}: {e}"));
        loaded(m.state_dict().unwrap(), &report)
    };
    let tiny = fixture("models/tiny-bert");
    let sharded_dir = fixture("models/tiny-bert-sharded");
    let local = bert(tiny.to_str().unwrap(), &plain);
    let sharded_local = bert(sharded_dir.to_str().unwrap(), &plain);
    assert_ne!(
        local, sharded_local,
        "the two revisions must differ for the test to mean anything"
    );
    assert_eq!(bert("org/tiny-bert", &online), local);
    let storage = cache.path().join("models--org--tiny-bert");
    assert_eq!(
        std::fs::read_to_string(storage.join("refs/main")).unwrap(),
        MAIN
    );
    let link = std::fs::read_link(
        storage
            .join("snapshots")
            .join(MAIN)
            .join("model.safetensors"),
    )
    .unwrap();
    assert!(link.starts_with("../../blobs"), "{link:?}");

    // `v2` is the sharded checkpoint: index and shards are fetched at that commit.
    let v2 = online.clone().revision("v2");
    assert_eq!(bert("org/tiny-bert", &v2), sharded_local);
    assert_eq!(
        std::fs::read_to_string(storage.join("refs/v2")).unwrap(),
        V2
    );
    assert!(storage
        .join("snapshots")
        .join(V2)
        .join("model-00003-of-00003.safetensors")
        .is_symlink());

    let (llama_local, local_report) = LlamaForCausalLM::<Backend>::from_pretrained_with(
        fixture("models/tiny-llama-gqa"),
        &plain,
        &device(),
    )
    .unwrap();
    let (llama, report) =
        AutoModelForCausalLM::from_pretrained_with::<Backend>("org/tiny-llama", &online, &device())
            .unwrap();
    let ember::models::AnyCausalLm::Llama(llama) = llama else {
        panic!("not a Llama")
    };
    assert_eq!(
        loaded(llama.state_dict().unwrap(), &report),
        loaded(llama_local.state_dict().unwrap(), &local_report)
    );
    assert_eq!(
        GenerationConfig::from_pretrained_with("org/tiny-llama", &online).unwrap(),
        GenerationConfig::from_pretrained(fixture("models/tiny-llama-gqa")).unwrap()
    );

    server.stop();
    let offline = FromPretrainedOptions::default()
        .hub(HubConfig::new("http://127.0.0.1:9", cache.path()).offline(true));
    assert_eq!(bert("org/tiny-bert", &offline), local);
    assert_eq!(
        bert("org/tiny-bert", &offline.clone().revision("v2")),
        sharded_local
    );
    assert!(tree(cache.path())
        .iter()
        .all(|p| !p.ends_with(".incomplete")));
}

/// No partial or finished blob of the weights and no snapshot link to them.
fn assert_no_weights_cached(cache: &Path, repo_folder: &str) {
    let all = tree(cache);
    assert!(all.iter().all(|p| !p.ends_with(".incomplete")), "{all:?}");
    assert!(
        all.iter()
            .all(|p| !(p.contains("/snapshots/") && p.ends_with("model.safetensors"))),
        "{all:?}"
    );
    let blobs = cache.join(repo_folder).join("blobs");
    // Only the config's blob (small JSON) may be there.
    for blob in std::fs::read_dir(&blobs).into_iter().flatten().flatten() {
        assert!(
            blob.metadata().unwrap().len() < 4096,
            "a weights blob was left: {:?}",
            blob.path()
        );
    }
}

#[test]
fn a_missing_weights_file_a_missing_repo_and_a_dropped_connection_are_typed_errors() {
    // A repository with config.json but no weights, beside the usual ones.
    let bare = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("models/tiny-bert/config.json"),
        bare.path().join("config.json"),
    )
    .unwrap();
    let mut repos = repos();
    repos.push(repo(
        "org/no-weights",
        &[(MAIN, "main", bare.path().to_str().unwrap())],
    ));
    let server = HubServer::start(repos).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let endpoint = server.endpoint();
    let online =
        FromPretrainedOptions::default().hub(HubConfig::new(endpoint.clone(), cache.path()));

    let err = AutoModel::from_pretrained_with::<Backend>("org/no-weights", &online, &device())
        .unwrap_err();
    let ModelError::Hub { source, .. } = &err else {
        panic!("not a Hub error: {err:?}");
    };
    match source.as_ref() {
        HubError::EntryNotFound { filename, url, .. } => {
            assert_eq!(filename, "model.safetensors");
            // Files after config.json are asked for at the commit `main` resolved to.
            assert_eq!(
                url,
                &format!("{endpoint}/org/no-weights/resolve/{MAIN}/model.safetensors")
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("model.safetensors"), "{err}");
    assert_no_weights_cached(cache.path(), "models--org--no-weights");

    let err =
        AutoModel::from_pretrained_with::<Backend>("org/absent", &online, &device()).unwrap_err();
    assert!(
        matches!(&err, ModelError::Hub { source, .. }
            if matches!(source.as_ref(), HubError::RepositoryNotFound { repo_id, url, .. }
                if repo_id == "org/absent" && url.ends_with("/org/absent/resolve/main/config.json"))),
        "{err:?}"
    );
    assert!(!cache.path().join("models--org--absent/snapshots").exists());

    server.drop_mid_body("model.safetensors");
    let err = AutoModel::from_pretrained_with::<Backend>("org/tiny-bert", &online, &device())
        .unwrap_err();
    assert!(
        matches!(&err, ModelError::Hub { source, .. }
            if matches!(source.as_ref(), HubError::Interrupted { filename, .. } if filename == "model.safetensors")),
        "{err:?}"
    );
    assert_no_weights_cached(cache.path(), "models--org--tiny-bert");

    let err = AutoTokenizer::from_pretrained_hub(
        "org/tiny-bert",
        &HubConfig::new(endpoint, cache.path()),
        None,
    )
    .unwrap_err();
    assert!(
        matches!(&err, TokenizerError::Hub { source, .. }
            if matches!(source.as_ref(), HubError::EntryNotFound { filename, .. } if filename == "tokenizer.json")),
        "{err:?}"
    );
}

#[test]
fn local_folders_and_bad_names_are_unchanged() {
    // A missing absolute path is not a repository id: the old error, no network.
    let err = AutoTokenizer::from_pretrained("/no/such/tokenizer").unwrap_err();
    assert!(
        matches!(err, TokenizerError::MissingDirectory(_)),
        "{err:?}"
    );
    let err = AutoModel::from_pretrained::<Backend>("/no/such/model", &device()).unwrap_err();
    assert!(matches!(err, ModelError::Io { .. }), "{err:?}");
}

#[test]
fn python_finds_the_files_ember_cached() {
    let Some(python) = ember_testkit::reference_python() else {
        return;
    };
    let probe = std::process::Command::new(&python)
        .args(["-c", "import huggingface_hub"])
        .output()
        .unwrap();
    if !probe.status.success() {
        eprintln!("SKIP: the reference Python has no huggingface_hub");
        return;
    }
    let server = serve();
    let home = tempfile::tempdir().unwrap();
    let cache = home.path().join("hub");
    let online = FromPretrainedOptions::default().hub(HubConfig::new(server.endpoint(), &cache));
    AutoModel::from_pretrained_with::<Backend>("org/tiny-bert", &online, &device()).unwrap();
    AutoModel::from_pretrained_with::<Backend>(
        "org/tiny-bert",
        &online.clone().revision("v2"),
        &device(),
    )
    .unwrap();
    AutoTokenizer::from_pretrained_hub(
        "org/gpt2-bpe",
        &HubConfig::new(server.endpoint(), &cache),
        None,
    )
    .unwrap();
    server.stop();
    let script = r#"
import sys
from huggingface_hub import hf_hub_download, try_to_load_from_cache
for repo, name, rev in [("org/tiny-bert", "config.json", "main"), ("org/tiny-bert", "model.safetensors", "main"),
                        ("org/tiny-bert", "model-00002-of-00003.safetensors", "v2"), ("org/gpt2-bpe", "vocab.json", "main")]:
    print(hf_hub_download(repo, name, revision=rev, local_files_only=True))
print("no_exist", try_to_load_from_cache("org/gpt2-bpe", "tokenizer.json") is not None and not isinstance(try_to_load_from_cache("org/gpt2-bpe", "tokenizer.json"), str))
"#;
    let out = std::process::Command::new(&python)
        .args(["-c", script])
        .env("HF_HOME", home.path())
        .env_remove("HF_HUB_CACHE")
        .env_remove("HUGGINGFACE_HUB_CACHE")
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    let storage = cache.join("models--org--tiny-bert/snapshots");
    assert_eq!(
        lines[0],
        storage.join(MAIN).join("config.json").display().to_string()
    );
    assert_eq!(
        lines[1],
        storage
            .join(MAIN)
            .join("model.safetensors")
            .display()
            .to_string()
    );
    assert_eq!(
        lines[2],
        storage
            .join(V2)
            .join("model-00002-of-00003.safetensors")
            .display()
            .to_string()
    );
    assert!(lines[3].ends_with("vocab.json"), "{stdout}");
    // Python reads Ember's `.no_exist` marker as "known to be absent".
    assert_eq!(lines[4], "no_exist True", "{stdout}");
}
