//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong while loading, using or saving a tokenizer.
///
/// Every variant names the file, field or value at fault, so that a message shown to a user
/// says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The tokenizer directory does not exist or is not a directory.
    #[error("tokenizer directory `{0}` does not exist or is not a directory")]
    MissingDirectory(PathBuf),
    /// The directory holds none of the files a tokenizer is made from.
    #[error(
        "no tokenizer files in `{0}`: expected `tokenizer.json`, `vocab.txt` (BERT WordPiece) or \
         `vocab.json` + `merges.txt` (GPT-2 byte-level BPE)"
    )]
    NoTokenizerFiles(PathBuf),
    /// A file could not be read or written.
    #[error("cannot access `{path}`: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file did not parse.
    #[error("malformed JSON in `{path}`: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// What the parser said (with line and column).
        #[source]
        source: serde_json::Error,
    },
    /// A file parsed as JSON but the tokenizers library rejected its content.
    #[error("invalid tokenizer file `{path}`: {message}")]
    InvalidTokenizerFile {
        /// The file.
        path: PathBuf,
        /// What the tokenizers library said.
        message: String,
    },
    /// A field of a config file has a value of the wrong kind.
    #[error("`{field}` in `{path}` is invalid: {message}")]
    InvalidField {
        /// The file.
        path: PathBuf,
        /// The field name, as in the file.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// `tokenizer_config.json` names a tokenizer class this crate cannot build without a
    /// `tokenizer.json`.
    #[error(
        "unknown tokenizer class `{class}` in `{path}` and no `tokenizer.json` beside it; \
         supported without tokenizer.json: BertTokenizer(Fast), GPT2Tokenizer(Fast) and their kin"
    )]
    UnknownTokenizerClass {
        /// The config file.
        path: PathBuf,
        /// The class it names.
        class: String,
    },
    /// `max_length` is smaller than the special tokens the tokenizer adds.
    #[error(
        "max_length {max_length} is below the {special_tokens} special tokens this tokenizer adds \
         to a {kind} input"
    )]
    MaxLengthTooSmall {
        /// The requested maximum length.
        max_length: usize,
        /// How many special tokens are added.
        special_tokens: usize,
        /// "single" or "pair".
        kind: &'static str,
    },
    /// Padding was asked for but the tokenizer has no padding token.
    #[error(
        "asked to pad but the tokenizer has no pad_token; set one (for GPT-2 style models the \
         usual choice is the eos_token)"
    )]
    NoPadToken,
    /// A truncation strategy that cannot apply to this input (e.g. `only_second` on one text).
    #[error("truncation `{strategy}` cannot apply: {message}")]
    Truncation {
        /// The strategy name, as in HF (`only_second`, ...).
        strategy: String,
        /// Why.
        message: String,
    },
    /// A batch of text pairs whose two lists differ in length.
    #[error("{texts} texts but {pairs} text pairs")]
    PairCountMismatch {
        /// Number of first texts.
        texts: usize,
        /// Number of second texts.
        pairs: usize,
    },
    /// A batch whose sequences differ in length cannot become one tensor.
    #[error(
        "sequence {index} has {len} tokens but sequence 0 has {first}: pad the batch \
         (Padding::Longest or Padding::MaxLength) before making tensors"
    )]
    RaggedBatch {
        /// The first sequence whose length differs.
        index: usize,
        /// Its length.
        len: usize,
        /// The length of sequence 0.
        first: usize,
    },
    /// An id outside the vocabulary.
    #[error("token id {id} is outside the vocabulary (size {vocab_size})")]
    UnknownId {
        /// The id.
        id: u32,
        /// Vocabulary size including added tokens.
        vocab_size: usize,
    },
    /// A token the vocabulary does not hold and no `unk_token` to fall back on.
    #[error("token `{0}` is not in the vocabulary and the tokenizer has no unk_token")]
    UnknownToken(String),
    /// `apply_chat_template` on a tokenizer without a chat template.
    #[error(
        "cannot use apply_chat_template: this tokenizer has no chat_template (no \
         `chat_template.jinja` and no `chat_template` field in `tokenizer_config.json`) and no \
         template was passed; set one with `set_chat_template` or pass one in \
         `ChatTemplateOptions::chat_template`"
    )]
    NoChatTemplate,
    /// The tokenizer has several named chat templates, none named `default`, and none was
    /// asked for by name.
    #[error(
        "this tokenizer has several chat templates and none named `default`: pass the name of \
         one in `ChatTemplateOptions::chat_template`; available: {names:?}"
    )]
    NoDefaultChatTemplate {
        /// The names of the templates it has.
        names: Vec<String>,
    },
    /// A chat template did not compile or failed while rendering.
    #[error("chat template `{name}` from `{path}` failed{}: {message}", at_line(.line))]
    ChatTemplate {
        /// The file the template came from (`<set_chat_template>` for one set in code).
        path: PathBuf,
        /// The template's name (`default`, or the name of a named template).
        name: String,
        /// The line of the template at fault, where known.
        line: Option<usize>,
        /// What the Jinja engine said.
        message: String,
    },
    /// A chat template called `raise_exception(message)`, e.g. because the roles of the
    /// conversation do not alternate the way the model expects.
    #[error("chat template `{name}` from `{path}` raised an exception{}: {message}", at_line(.line))]
    ChatTemplateRaised {
        /// The file the template came from (`<set_chat_template>` for one set in code).
        path: PathBuf,
        /// The template's name.
        name: String,
        /// The line of the template that raised, where known.
        line: Option<usize>,
        /// The template's message, exactly as it wrote it.
        message: String,
    },
    /// A conversation or options `apply_chat_template` cannot render (an empty conversation,
    /// `continue_final_message` with `add_generation_prompt`, ...).
    #[error("apply_chat_template: {0}")]
    InvalidChat(String),
    /// `from_pretrained(name)` with a name that is not a local folder, and the Hugging Face Hub
    /// (or its cache) could not provide the tokenizer files.
    #[error(
        "`{name}` is not a local folder, and loading it from the Hugging Face Hub failed: {source}"
    )]
    Hub {
        /// The name as given (a repository id).
        name: String,
        /// What the Hub or the cache said (it names the URL, file and revision); boxed, so
        /// that every `Result` of the crate stays small.
        #[source]
        source: Box<ember_hub::HubError>,
    },
    /// An error from the tokenizers library while encoding, decoding or training.
    #[error("tokenizer failed while {action}: {message}")]
    Backend {
        /// What was being done.
        action: &'static str,
        /// What the library said.
        message: String,
    },
}

impl TokenizerError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn backend(action: &'static str, err: impl std::fmt::Display) -> Self {
        Self::Backend {
            action,
            message: err.to_string(),
        }
    }
}

/// ` at line N` where the line is known.
fn at_line(line: &Option<usize>) -> String {
    line.map(|n| format!(" at line {n}")).unwrap_or_default()
}

/// This crate's result type.
pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;
