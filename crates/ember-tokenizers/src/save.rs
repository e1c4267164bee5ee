//! `save_pretrained`: writes a folder that Python `AutoTokenizer.from_pretrained` loads.

use crate::auto::AutoTokenizer;
use crate::config::ROLES;
use crate::error::{Result, TokenizerError};
use serde_json::{Map, Value};
use std::io::Write;
use std::path::{Path, PathBuf};

impl AutoTokenizer {
    /// `save_pretrained(dir)`: writes `tokenizer.json`, `tokenizer_config.json` and
    /// `special_tokens_map.json` into `dir` (created if needed) and returns their paths. Chat
    /// templates go where `transformers` 5 saves them: the default one to
    /// `chat_template.jinja`, each named one to `additional_chat_templates/<name>.jinja`.
    ///
    /// Each file is written under a temporary name and renamed into place, so an interrupted
    /// save never leaves a truncated file behind a real name.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<Vec<PathBuf>> {
        let dir = dir.as_ref();
        // Checked before anything is written: a template name must be a plain file name.
        let templates = crate::chat::template_files(&self.parts().0.chat_templates)?;
        std::fs::create_dir_all(dir).map_err(|e| TokenizerError::io(dir, e))?;
        let backend = self.backend_tokenizer();
        let pipeline = backend
            .to_string(true)
            .map_err(|e| TokenizerError::backend("serializing tokenizer.json", e))?;
        let config = self.tokenizer_config_json(&backend);
        let special = self.parts().1.to_json();
        let mut written = Vec::new();
        for (name, text) in [
            ("tokenizer.json", pipeline),
            ("tokenizer_config.json", to_pretty(config)),
            ("special_tokens_map.json", to_pretty(special)),
        ] {
            let path = dir.join(name);
            write_atomic(&path, text.as_bytes())?;
            written.push(path);
        }
        for (name, text) in templates {
            let path = dir.join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| TokenizerError::io(parent, e))?;
            }
            write_atomic(&path, text.as_bytes())?;
            written.push(path);
        }
        Ok(written)
    }

    /// The `tokenizer_config.json` object: every field read, updated with the current settings.
    fn tokenizer_config_json(&self, backend: &tokenizers::Tokenizer) -> Map<String, Value> {
        let (config, special) = self.parts();
        let mut map = config.raw.clone();
        // The templates are saved as `.jinja` files, which HF reads before this field.
        map.remove("chat_template");
        let bert_normalizer = match backend.get_normalizer() {
            Some(tokenizers::NormalizerWrapper::BertNormalizer(n)) => serde_json::to_value(n).ok(),
            _ => None,
        };
        // Python 5 rebuilds a BertTokenizer from these fields, not from tokenizer.json's
        // normalizer: write them so both agree.
        if let Some(n) = &bert_normalizer {
            map.insert("do_lower_case".into(), n["lowercase"].clone());
            map.insert(
                "tokenize_chinese_chars".into(),
                n["handle_chinese_chars"].clone(),
            );
            map.insert("strip_accents".into(), n["strip_accents"].clone());
        }
        if config.tokenizer_class.is_none() {
            let is_wordpiece =
                matches!(backend.get_model(), tokenizers::ModelWrapper::WordPiece(_));
            let class = if is_wordpiece && bert_normalizer.is_some() {
                "BertTokenizer"
            } else {
                // Loads tokenizer.json exactly as written, whatever the pipeline.
                "PreTrainedTokenizerFast"
            };
            map.insert("tokenizer_class".into(), class.into());
        }
        match config.model_max_length {
            Some(n) => map.insert("model_max_length".into(), n.into()),
            None => map.remove("model_max_length"),
        };
        map.insert("padding_side".into(), config.padding_side.as_str().into());
        map.insert(
            "truncation_side".into(),
            config.truncation_side.as_str().into(),
        );
        map.insert(
            "clean_up_tokenization_spaces".into(),
            config.clean_up_tokenization_spaces.into(),
        );
        for role in ROLES {
            match special.get(role) {
                Some(t) => map.insert(role.into(), t.into()),
                None => map.remove(role),
            };
        }
        let mut decoder: Vec<_> = backend.get_added_tokens_decoder().into_iter().collect();
        decoder.sort_by_key(|(id, _)| *id);
        let added: Map<String, Value> = decoder
            .into_iter()
            .map(|(id, t)| {
                let v = serde_json::json!({
                    "content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                    "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special,
                });
                (id.to_string(), v)
            })
            .collect();
        map.insert("added_tokens_decoder".into(), Value::Object(added));
        map
    }
}

fn to_pretty(map: Map<String, Value>) -> String {
    serde_json::to_string_pretty(&Value::Object(map)).expect("a JSON map always serializes")
}

/// Writes `bytes` to a temporary file beside `path`, syncs it, then renames it onto `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        TokenizerError::io(path, e)
    })
}
