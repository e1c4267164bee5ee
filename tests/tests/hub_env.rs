//! The public entry points read huggingface_hub's environment variables. One test in its own
//! binary (its own process): setting variables here cannot leak into tests running in parallel.

use ember::models::AutoModel;
use ember::tokenizers::AutoTokenizer;
use ember::Backend;
use ember_testkit::hub_server::{HubServer, ServedRepo, ServedRevision};

const MAIN: &str = "cccccccccccccccccccccccccccccccccccccccc";

#[test]
fn from_pretrained_reads_hf_home_endpoint_token_and_offline() {
    let fixtures = ember_testkit::workspace().join("tests/fixtures");
    let served = |id: &str, dir: &str| ServedRepo {
        repo_id: id.into(),
        aliases: vec![],
        revisions: vec![ServedRevision {
            commit: MAIN.into(),
            refs: vec!["main".into()],
            dir: fixtures.join(dir),
        }],
    };
    let server = HubServer::start(vec![
        served("org/tok", "tokenizers/chat-tiny"),
        served("org/bert", "models/tiny-bert"),
    ])
    .unwrap();
    let home = tempfile::tempdir().unwrap();
    // SAFETY: this binary runs this one test; no other thread reads the environment meanwhile.
    unsafe {
        for name in [
            "HF_HUB_CACHE",
            "HUGGINGFACE_HUB_CACHE",
            "HF_HUB_OFFLINE",
            "TRANSFORMERS_OFFLINE",
        ] {
            std::env::remove_var(name);
        }
        std::env::set_var("HF_HOME", home.path());
        std::env::set_var("HF_ENDPOINT", server.endpoint());
        std::env::set_var("HF_TOKEN", "hf_from_env");
    }
    let device = ember::default_device();
    let tok = AutoTokenizer::from_pretrained("org/tok").unwrap();
    AutoModel::from_pretrained::<Backend>("org/bert", &device).unwrap();
    let snapshot = home
        .path()
        .join("hub/models--org--tok/snapshots")
        .join(MAIN);
    assert!(snapshot.join("tokenizer.json").is_symlink());
    assert!(home
        .path()
        .join("hub/models--org--bert/snapshots")
        .join(MAIN)
        .join("model.safetensors")
        .is_symlink());
    let requests = server.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with("HEAD /org/tok/") && r.ends_with("auth=Bearer hf_from_env")),
        "{requests:?}"
    );
    server.stop();
    unsafe {
        std::env::set_var("HF_HUB_OFFLINE", "1");
    }
    let again = AutoTokenizer::from_pretrained("org/tok").unwrap();
    assert_eq!(
        again.encode("hello there", None, true).unwrap(),
        tok.encode("hello there", None, true).unwrap()
    );
    AutoModel::from_pretrained::<Backend>("org/bert", &device).unwrap();
    let err = AutoModel::from_pretrained::<Backend>("org/other", &device).unwrap_err();
    assert!(
        err.to_string().contains("HF_HUB_OFFLINE") && err.to_string().contains("org/other"),
        "{err}"
    );
}
