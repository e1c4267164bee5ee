//! huggingface_hub's `hf_hub_download` from the command line: fetches one file of a model
//! repository into the shared Hugging Face cache and prints its path in the snapshot.
//!
//! ```sh
//! cargo run -p ember-hub --features https --example hf_hub_download -- \
//!     sentence-transformers/all-MiniLM-L6-v2 config.json
//! HF_HUB_OFFLINE=1 cargo run -p ember-hub --example hf_hub_download -- \
//!     sentence-transformers/all-MiniLM-L6-v2 config.json        # from the cache only
//! ```
//!
//! `HF_HOME`, `HF_HUB_CACHE`, `HF_ENDPOINT`, `HF_HUB_OFFLINE` and `HF_TOKEN` are read as
//! huggingface_hub reads them; a third argument names the revision (default `main`).

use ember_hub::{hf_hub_download, HubConfig};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [repo_id, filename, rest @ ..] = args.as_slice() else {
        eprintln!("usage: hf_hub_download REPO_ID FILENAME [REVISION]");
        std::process::exit(2);
    };
    let config = HubConfig::from_env();
    match hf_hub_download(&config, repo_id, filename, rest.first().map(String::as_str)) {
        Ok(path) => println!("{}", path.display()),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
