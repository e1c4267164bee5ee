//! `tokenizer_config.json` and `special_tokens_map.json`: the Hugging Face side files that carry
//! what `tokenizer.json` does not (special-token roles, `model_max_length`, padding side, ...).

use crate::chat::{templates_from_config, ChatTemplates};
use crate::error::{Result, TokenizerError};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// The side a batch is padded or truncated on (`padding_side` / `truncation_side` in HF).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Side {
    /// Pad (or cut) at the end of the sequence: HF's default.
    #[default]
    Right,
    /// Pad (or cut) at the start: what decoder-only models use for batched generation.
    Left,
}

/// Alias that reads well in padding code.
pub type PaddingSide = Side;

impl Side {
    /// The HF spelling, `"right"` or `"left"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Right => "right",
            Side::Left => "left",
        }
    }

    fn parse(path: &Path, field: &str, value: &str) -> Result<Self> {
        match value {
            "right" => Ok(Side::Right),
            "left" => Ok(Side::Left),
            other => Err(TokenizerError::InvalidField {
                path: path.to_owned(),
                field: field.to_owned(),
                message: format!("expected \"right\" or \"left\", found {other:?}"),
            }),
        }
    }
}

/// The named special-token roles of a Hugging Face tokenizer (`bos_token`, `eos_token`, ...).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Beginning-of-sequence token (`bos_token`).
    pub bos_token: Option<String>,
    /// End-of-sequence token (`eos_token`).
    pub eos_token: Option<String>,
    /// Token that stands for any piece outside the vocabulary (`unk_token`).
    pub unk_token: Option<String>,
    /// Separator between the two texts of a pair (`sep_token`).
    pub sep_token: Option<String>,
    /// Padding token (`pad_token`).
    pub pad_token: Option<String>,
    /// Classifier token, first in BERT inputs (`cls_token`).
    pub cls_token: Option<String>,
    /// Mask token for masked language modelling (`mask_token`).
    pub mask_token: Option<String>,
    /// Further special tokens (`additional_special_tokens`).
    pub additional_special_tokens: Vec<String>,
}

/// The role names in HF order, as they appear in the JSON files.
pub(crate) const ROLES: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

impl SpecialTokens {
    /// BERT's defaults (`[UNK]`, `[SEP]`, `[PAD]`, `[CLS]`, `[MASK]`), as `BertTokenizer` sets them.
    pub fn bert() -> Self {
        Self {
            unk_token: Some("[UNK]".into()),
            sep_token: Some("[SEP]".into()),
            pad_token: Some("[PAD]".into()),
            cls_token: Some("[CLS]".into()),
            mask_token: Some("[MASK]".into()),
            ..Self::default()
        }
    }

    /// GPT-2's defaults: `<|endoftext|>` as bos, eos and unk, no pad token.
    pub fn gpt2() -> Self {
        let eot = Some("<|endoftext|>".to_string());
        Self {
            bos_token: eot.clone(),
            eos_token: eot.clone(),
            unk_token: eot,
            ..Self::default()
        }
    }

    /// The token of a role by its HF name (`"pad_token"`, ...).
    pub fn get(&self, role: &str) -> Option<&str> {
        match role {
            "bos_token" => self.bos_token.as_deref(),
            "eos_token" => self.eos_token.as_deref(),
            "unk_token" => self.unk_token.as_deref(),
            "sep_token" => self.sep_token.as_deref(),
            "pad_token" => self.pad_token.as_deref(),
            "cls_token" => self.cls_token.as_deref(),
            "mask_token" => self.mask_token.as_deref(),
            _ => None,
        }
    }

    fn slot(&mut self, role: &str) -> Option<&mut Option<String>> {
        Some(match role {
            "bos_token" => &mut self.bos_token,
            "eos_token" => &mut self.eos_token,
            "unk_token" => &mut self.unk_token,
            "sep_token" => &mut self.sep_token,
            "pad_token" => &mut self.pad_token,
            "cls_token" => &mut self.cls_token,
            "mask_token" => &mut self.mask_token,
            _ => return None,
        })
    }

    /// Every special token, roles first, then the additional ones, without duplicates.
    pub fn all(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let roles = ROLES.iter().filter_map(|r| self.get(r));
        for t in roles.chain(self.additional_special_tokens.iter().map(String::as_str)) {
            if !out.iter().any(|o| o == t) {
                out.push(t.to_owned());
            }
        }
        out
    }

    /// Overrides the roles present in a JSON object (tokenizer_config.json or
    /// special_tokens_map.json). A role set to `null` is cleared, as in HF.
    pub(crate) fn merge_from(&mut self, path: &Path, map: &Map<String, Value>) -> Result<()> {
        for role in ROLES {
            if let Some(value) = map.get(role) {
                let token = token_content(path, role, value)?;
                *self.slot(role).expect("ROLES are all slots") = token;
            }
        }
        if let Some(value) = map.get("additional_special_tokens") {
            let list = value
                .as_array()
                .ok_or_else(|| TokenizerError::InvalidField {
                    path: path.to_owned(),
                    field: "additional_special_tokens".into(),
                    message: "expected a list".into(),
                })?;
            self.additional_special_tokens = list
                .iter()
                .map(|v| token_content(path, "additional_special_tokens", v))
                .collect::<Result<Vec<_>>>()?
                .into_iter()
                .flatten()
                .collect();
        }
        Ok(())
    }

    /// The `special_tokens_map.json` object.
    pub(crate) fn to_json(&self) -> Map<String, Value> {
        let mut map = Map::new();
        for role in ROLES {
            if let Some(t) = self.get(role) {
                map.insert(role.into(), Value::String(t.into()));
            }
        }
        if !self.additional_special_tokens.is_empty() {
            map.insert(
                "additional_special_tokens".into(),
                Value::from(self.additional_special_tokens.clone()),
            );
        }
        map
    }
}

/// A special token is written either as a string or as an `AddedToken` object with `content`.
fn token_content(path: &Path, field: &str, value: &Value) -> Result<Option<String>> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Object(o) => match o.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(TokenizerError::InvalidField {
                path: path.to_owned(),
                field: field.to_owned(),
                message: "token object without a string `content`".into(),
            }),
        },
        other => Err(TokenizerError::InvalidField {
            path: path.to_owned(),
            field: field.to_owned(),
            message: format!("expected a string or a token object, found {other}"),
        }),
    }
}

/// The contents of `tokenizer_config.json`: typed fields Ember uses, and every field kept so
/// that `save_pretrained` writes back what it read.
#[derive(Debug, Clone, Default)]
pub struct TokenizerConfig {
    /// Every field of the file, in file order (unknown ones included).
    pub raw: Map<String, Value>,
    /// `tokenizer_class`, e.g. `"BertTokenizer"`.
    pub tokenizer_class: Option<String>,
    /// `model_max_length`: the longest input the model accepts; `None` when unbounded.
    pub model_max_length: Option<usize>,
    /// `padding_side` (default right).
    pub padding_side: Side,
    /// `truncation_side` (default right).
    pub truncation_side: Side,
    /// `clean_up_tokenization_spaces` (HF 5 default: false).
    pub clean_up_tokenization_spaces: bool,
    /// The chat templates by name (`"default"` for a single one): from `chat_template.jinja`
    /// and `additional_chat_templates/` beside the file where present, else from its
    /// `chat_template` field.
    pub chat_templates: ChatTemplates,
}

/// HF writes `int(1e30)` for "no limit"; anything this large means unbounded.
const UNBOUNDED: f64 = 1e18;

impl TokenizerConfig {
    /// Reads `tokenizer_config.json` from a file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let map = read_json_object(path)?;
        Self::from_map(path, map)
    }

    /// Reads the typed fields out of a parsed object; `path` is only for messages.
    pub fn from_map(path: &Path, raw: Map<String, Value>) -> Result<Self> {
        let invalid = |field: &str, message: &str| TokenizerError::InvalidField {
            path: path.to_owned(),
            field: field.to_owned(),
            message: message.to_owned(),
        };
        let tokenizer_class = match raw.get("tokenizer_class") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(invalid("tokenizer_class", "expected a string")),
        };
        let model_max_length = match raw.get("model_max_length") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => match (n.as_u64(), n.as_f64()) {
                (Some(v), _) if (v as f64) < UNBOUNDED => Some(v as usize),
                (_, Some(f)) if f >= UNBOUNDED => None,
                _ => return Err(invalid("model_max_length", "expected a positive integer")),
            },
            Some(_) => return Err(invalid("model_max_length", "expected a number")),
        };
        let side = |field: &str| -> Result<Side> {
            match raw.get(field) {
                None | Some(Value::Null) => Ok(Side::Right),
                Some(Value::String(s)) => Side::parse(path, field, s),
                Some(_) => Err(invalid(field, "expected \"right\" or \"left\"")),
            }
        };
        let padding_side = side("padding_side")?;
        let truncation_side = side("truncation_side")?;
        let clean_up_tokenization_spaces = match raw.get("clean_up_tokenization_spaces") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(invalid(
                    "clean_up_tokenization_spaces",
                    "expected a boolean",
                ))
            }
        };
        let chat_templates = templates_from_config(path, &raw)?;
        Ok(Self {
            raw,
            tokenizer_class,
            model_max_length,
            padding_side,
            truncation_side,
            clean_up_tokenization_spaces,
            chat_templates,
        })
    }

    /// A boolean option of the file (`do_lower_case`, ...), `None` when absent or null.
    pub fn get_bool(&self, field: &str) -> Option<bool> {
        self.raw.get(field).and_then(Value::as_bool)
    }
}

/// Reads a file that must hold one JSON object.
pub(crate) fn read_json_object(path: &Path) -> Result<Map<String, Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| TokenizerError::io(path, e))?;
    let value: Value = serde_json::from_str(&text).map_err(|source| TokenizerError::Json {
        path: path.to_owned(),
        source,
    })?;
    match value {
        Value::Object(map) => Ok(map),
        other => Err(TokenizerError::InvalidTokenizerFile {
            path: path.to_owned(),
            message: format!("expected a JSON object, found {}", kind_of(&other)),
        }),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Paths of the files a tokenizer directory may hold.
#[derive(Debug, Clone)]
pub(crate) struct TokenizerFiles {
    pub dir: PathBuf,
}

impl TokenizerFiles {
    pub fn file(&self, name: &str) -> Option<PathBuf> {
        let p = self.dir.join(name);
        p.is_file().then_some(p)
    }
}

impl SpecialTokens {
    /// The role that holds `token`, if any.
    pub fn get_role_of(&self, token: &str) -> Option<&'static str> {
        ROLES.into_iter().find(|r| self.get(r) == Some(token))
    }
}
