//! [`AutoTokenizer`]: loads any Hugging Face tokenizer folder and runs the `transformers`
//! tokenizer API on it.

use crate::config::{read_json_object, Side, SpecialTokens, TokenizerConfig, TokenizerFiles};
use crate::encode::{BatchEncoding, EncodeOptions, Padding, Truncation};
use crate::error::{Result, TokenizerError};
use crate::legacy::{self, BertOptions};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::path::Path;
use tokenizers::utils::parallelism::MaybeParallelIterator;
use tokenizers::{
    AddedToken, Encoding, PaddingDirection, PaddingParams, PaddingStrategy, PostProcessor,
    PostProcessorWrapper, Tokenizer, TruncationDirection, TruncationParams,
};

/// Tokenizer classes that `vocab.txt` (BERT WordPiece) builds.
const WORDPIECE_CLASSES: &[&str] = &[
    "BertTokenizer",
    "BertTokenizerFast",
    "DistilBertTokenizer",
    "DistilBertTokenizerFast",
    "ElectraTokenizer",
    "ElectraTokenizerFast",
];

/// Tokenizer classes that `vocab.json` + `merges.txt` (GPT-2 byte-level BPE) builds.
const BPE_CLASSES: &[&str] = &["GPT2Tokenizer", "GPT2TokenizerFast"];

/// A Hugging Face tokenizer: the `tokenizers` pipeline plus the `transformers` layer around it
/// (special-token roles, `model_max_length`, padding side, `save_pretrained`).
///
/// ```no_run
/// use ember_tokenizers::{AutoTokenizer, EncodeOptions, Padding};
/// let tok = AutoTokenizer::from_pretrained("models/bert-base-chinese")?;
/// let batch = tok.batch_encode(&["今天天气很好", "酒店不错"], &EncodeOptions::default().padding(Padding::Longest))?;
/// println!("{:?}", batch.input_ids());
/// # Ok::<(), ember_tokenizers::TokenizerError>(())
/// ```
#[derive(Debug, Clone)]
pub struct AutoTokenizer {
    /// The pipeline without post-processor, truncation or padding: those are applied per call.
    inner: Tokenizer,
    /// The post-processor of the pipeline (adds `[CLS]` / `[SEP]` ...).
    post_processor: Option<PostProcessorWrapper>,
    /// Truncation and padding stored in `tokenizer.json`; written back on save, not applied
    /// (HF applies only what each call asks for).
    stored_truncation: Option<TruncationParams>,
    stored_padding: Option<PaddingParams>,
    config: TokenizerConfig,
    special: SpecialTokens,
}

impl AutoTokenizer {
    /// Loads the tokenizer of a checkpoint folder, as `AutoTokenizer.from_pretrained(dir)`.
    ///
    /// Reads `tokenizer.json` where present; otherwise `vocab.txt` (BERT WordPiece, options from
    /// `tokenizer_config.json`, `BertTokenizer` defaults without one) or `vocab.json` +
    /// `merges.txt` (GPT-2 byte-level BPE). `tokenizer_config.json` and
    /// `special_tokens_map.json` set special tokens, `model_max_length` and padding side.
    ///
    /// A name that is not a local folder but a Hub repository id (`"org/name"`) is fetched
    /// into the Hugging Face cache first (`HF_HOME`, `HF_HUB_CACHE`, `HF_ENDPOINT`,
    /// `HF_HUB_OFFLINE`, `HF_TOKEN` as huggingface_hub reads them), at revision `main`; see
    /// [`Self::from_pretrained_hub`]. A local folder is always read as it is.
    pub fn from_pretrained(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_pretrained_hub(path, &ember_hub::HubConfig::from_env(), None)
    }

    /// As [`Self::from_pretrained`] with the Hub settings given rather than read from the
    /// environment, and a `revision` (branch, tag or commit; default `main`) for a repository
    /// id. `revision` is ignored for a local folder, as in transformers.
    pub fn from_pretrained_hub(
        path: impl AsRef<Path>,
        hub: &ember_hub::HubConfig,
        revision: Option<&str>,
    ) -> Result<Self> {
        let path = path.as_ref();
        if ember_hub::is_hub_name(path) {
            if let Some(name) = path.to_str() {
                let dir = crate::hub::download(hub, name, revision)?;
                return Self::from_dir(&dir);
            }
        }
        Self::from_dir(path)
    }

    fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(TokenizerError::MissingDirectory(dir.to_owned()));
        }
        let files = TokenizerFiles {
            dir: dir.to_owned(),
        };
        let mut config = match files.file("tokenizer_config.json") {
            Some(p) => TokenizerConfig::from_file(&p)?,
            None => TokenizerConfig::default(),
        };
        // As in HF, template files take priority over the config's `chat_template` field.
        let template_files = crate::chat::templates_from_files(dir)?;
        if !template_files.is_empty() {
            config.chat_templates = template_files;
        }
        let config_path = dir.join("tokenizer_config.json");
        let class = config.tokenizer_class.clone();
        let class_is = |list: &[&str]| class.as_deref().is_none_or(|c| list.contains(&c));

        let (mut special, pipeline_json, source) = if let Some(p) = files.file("tokenizer.json") {
            let text = std::fs::read_to_string(&p).map_err(|e| TokenizerError::io(&p, e))?;
            let value: Value =
                serde_json::from_str(&text).map_err(|source| TokenizerError::Json {
                    path: p.clone(),
                    source,
                })?;
            (SpecialTokens::default(), value, p)
        } else if let Some(p) = files
            .file("vocab.txt")
            .filter(|_| class_is(WORDPIECE_CLASSES))
        {
            let mut special = SpecialTokens::bert();
            special.merge_from(&config_path, &config.raw)?;
            merge_special_tokens_map(&files, &mut special)?;
            let options = BertOptions {
                do_lower_case: config.get_bool("do_lower_case").unwrap_or(true),
                tokenize_chinese_chars: config.get_bool("tokenize_chinese_chars").unwrap_or(true),
                strip_accents: config.get_bool("strip_accents"),
            };
            let vocab = legacy::read_vocab_txt(&p)?;
            let role = |r: &str, d: &str| special.get(r).unwrap_or(d).to_owned();
            let json = legacy::bert_wordpiece_json(
                vocab,
                &options,
                &role("unk_token", "[UNK]"),
                &role("cls_token", "[CLS]"),
                &role("sep_token", "[SEP]"),
                &special.all(),
            );
            (special, json, p)
        } else if let (Some(v), Some(m)) = (files.file("vocab.json"), files.file("merges.txt")) {
            if !class_is(BPE_CLASSES) {
                return Err(unknown_class(&config_path, class));
            }
            let mut special = SpecialTokens::gpt2();
            special.merge_from(&config_path, &config.raw)?;
            merge_special_tokens_map(&files, &mut special)?;
            let (vocab, merges) = legacy::read_bpe_files(&v, &m)?;
            let json = legacy::gpt2_bpe_json(
                vocab,
                merges,
                config.get_bool("add_prefix_space").unwrap_or(false),
                special.bos_token.as_deref(),
                config.get_bool("add_bos_token").unwrap_or(false),
                &special.all(),
            );
            (special, json, v)
        } else if files.file("vocab.txt").is_some() {
            return Err(unknown_class(&config_path, class));
        } else {
            return Err(TokenizerError::NoTokenizerFiles(dir.to_owned()));
        };

        if files.file("tokenizer.json").is_some() {
            special.merge_from(&config_path, &config.raw)?;
            merge_special_tokens_map(&files, &mut special)?;
        }
        let mut tok = Self::from_pipeline_json(pipeline_json, &source, config, special)?;
        if let Some(p) = files.file("added_tokens.json") {
            tok.read_added_tokens_json(&p)?;
        }
        Ok(tok)
    }

    /// Builds a tokenizer from a `tokenizer.json` document and the `transformers` settings.
    /// `source` names the file in error messages.
    pub fn from_pipeline_json(
        pipeline: Value,
        source: &Path,
        config: TokenizerConfig,
        mut special: SpecialTokens,
    ) -> Result<Self> {
        let mut inner: Tokenizer =
            serde_json::from_value(pipeline).map_err(|e| TokenizerError::InvalidTokenizerFile {
                path: source.to_owned(),
                message: e.to_string(),
            })?;
        let stored_truncation = inner.get_truncation().cloned();
        let stored_padding = inner.get_padding().cloned();
        let post_processor = inner.get_post_processor().cloned();
        inner
            .with_truncation(None)
            .map_err(|e| TokenizerError::backend("removing truncation", e))?;
        inner.with_padding(None);
        inner.with_post_processor(None::<PostProcessorWrapper>);
        // HF takes a pad token from the padding stored in tokenizer.json when none is named.
        if special.pad_token.is_none() {
            special.pad_token = stored_padding.as_ref().map(|p| p.pad_token.clone());
        }
        // HF registers every special token as a special added token (never split, skipped on
        // `decode(skip_special_tokens=True)`).
        let known: Vec<String> = inner
            .get_added_tokens_decoder()
            .values()
            .filter(|t| t.special)
            .map(|t| t.content.clone())
            .collect();
        let missing: Vec<AddedToken> = special
            .all()
            .into_iter()
            .filter(|t| !known.contains(t))
            .map(|t| AddedToken::from(t, true).normalized(false))
            .collect();
        if !missing.is_empty() {
            inner
                .add_special_tokens(missing)
                .map_err(|e| TokenizerError::backend("adding special tokens", e))?;
        }
        Ok(Self {
            inner,
            post_processor,
            stored_truncation,
            stored_padding,
            config,
            special,
        })
    }

    fn read_added_tokens_json(&mut self, path: &Path) -> Result<()> {
        let map = read_json_object(path)?;
        let mut tokens: Vec<(u64, String)> = Vec::new();
        for (token, id) in map {
            let id = id.as_u64().ok_or_else(|| TokenizerError::InvalidField {
                path: path.to_owned(),
                field: token.clone(),
                message: "expected an integer id".into(),
            })?;
            tokens.push((id, token));
        }
        tokens.sort();
        let new: Vec<AddedToken> = tokens
            .into_iter()
            .filter(|(_, t)| self.inner.token_to_id(t).is_none())
            .map(|(_, t)| AddedToken::from(t, false))
            .collect();
        self.add_tokens(new)?;
        Ok(())
    }

    // ---- introspection ------------------------------------------------------------------

    /// The special-token roles (`pad_token`, `cls_token`, ...).
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// The id of the token in a role (`"pad_token"` → 0 for BERT), `None` when the role is
    /// unset or the token unknown.
    pub fn special_token_id(&self, role: &str) -> Option<u32> {
        self.special
            .get(role)
            .and_then(|t| self.inner.token_to_id(t))
    }

    /// The settings read from `tokenizer_config.json`.
    pub fn config(&self) -> &TokenizerConfig {
        &self.config
    }

    /// `model_max_length`: the longest input the model takes, `None` when unbounded.
    pub fn model_max_length(&self) -> Option<usize> {
        self.config.model_max_length
    }

    /// Sets `model_max_length` (saved with the tokenizer).
    pub fn set_model_max_length(&mut self, max: Option<usize>) {
        self.config.model_max_length = max;
    }

    /// `padding_side`.
    pub fn padding_side(&self) -> Side {
        self.config.padding_side
    }

    /// Sets `padding_side` (saved with the tokenizer).
    pub fn set_padding_side(&mut self, side: Side) {
        self.config.padding_side = side;
    }

    /// Sets the token of a role (`"pad_token"`, ...), adding it as a special token when new;
    /// e.g. `set_special_token("pad_token", "<|endoftext|>")` for GPT-2 batches.
    pub fn set_special_token(&mut self, role: &str, token: &str) -> Result<()> {
        let mut map = Map::new();
        map.insert(role.into(), Value::String(token.into()));
        self.special
            .merge_from(Path::new("<set_special_token>"), &map)?;
        if !self
            .inner
            .get_added_tokens_decoder()
            .values()
            .any(|t| t.content == token)
        {
            self.add_special_tokens(vec![token.to_string()])?;
        }
        Ok(())
    }

    /// `get_vocab()`: every token with its id, added tokens included.
    pub fn vocab(&self) -> HashMap<String, u32> {
        self.inner.get_vocab(true)
    }

    /// `vocab_size`: the size of the base vocabulary, added tokens excluded.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(false)
    }

    /// `len(tokenizer)`: the size of the vocabulary with added tokens.
    pub fn len(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// True when the vocabulary is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `num_special_tokens_to_add(pair)`: how many special tokens `encode` adds.
    pub fn num_special_tokens_to_add(&self, pair: bool) -> usize {
        self.post_processor
            .as_ref()
            .map_or(0, |p| p.added_tokens(pair))
    }

    /// The whole `tokenizers` pipeline, post-processor and stored truncation / padding included,
    /// as it is saved to `tokenizer.json`.
    pub fn backend_tokenizer(&self) -> Tokenizer {
        let mut full = self.inner.clone();
        full.with_post_processor(self.post_processor.clone());
        // The stored settings came out of a valid tokenizer.json: restoring them cannot fail.
        let _ = full.with_truncation(self.stored_truncation.clone());
        full.with_padding(self.stored_padding.clone());
        full
    }

    // ---- vocabulary edits ---------------------------------------------------------------

    /// `add_tokens`: adds ordinary tokens that are never split; returns how many were new.
    pub fn add_tokens(&mut self, tokens: Vec<AddedToken>) -> Result<usize> {
        self.inner
            .add_tokens(tokens)
            .map_err(|e| TokenizerError::backend("adding tokens", e))
    }

    /// `add_special_tokens({"additional_special_tokens": [...]})`.
    pub fn add_special_tokens(&mut self, tokens: Vec<String>) -> Result<usize> {
        for t in &tokens {
            if self.special.get_role_of(t).is_none()
                && !self.special.additional_special_tokens.contains(t)
            {
                self.special.additional_special_tokens.push(t.clone());
            }
        }
        let added = tokens
            .into_iter()
            .map(|t| AddedToken::from(t, true).normalized(false));
        self.inner
            .add_special_tokens(added)
            .map_err(|e| TokenizerError::backend("adding special tokens", e))
    }

    // ---- encoding -------------------------------------------------------------------------

    /// `tokenize(text)`: the tokens of `text`, without special tokens.
    pub fn tokenize(&self, text: &str) -> Result<Vec<String>> {
        let enc = self.encode_sequence(text, false)?;
        Ok(enc.get_tokens().to_vec())
    }

    /// `encode(text, text_pair, add_special_tokens)`: the ids of one text (or pair), no
    /// truncation or padding.
    pub fn encode(
        &self,
        text: &str,
        pair: Option<&str>,
        add_special_tokens: bool,
    ) -> Result<Vec<u32>> {
        let opts = EncodeOptions::default()
            .add_special_tokens(add_special_tokens)
            .return_offsets_mapping(false);
        Ok(self.encode_one(text, pair, &opts)?.get_ids().to_vec())
    }

    /// `tokenizer(text, text_pair, **options)` for one input.
    pub fn encode_one(
        &self,
        text: &str,
        pair: Option<&str>,
        opts: &EncodeOptions,
    ) -> Result<Encoding> {
        let batch = match pair {
            Some(p) => self.batch_encode_pairs(&[text], &[p], opts)?,
            None => self.batch_encode(&[text], opts)?,
        };
        Ok(batch
            .encodings
            .into_iter()
            .next()
            .expect("one input gives one encoding"))
    }

    /// `tokenizer(texts, **options)`: encodes a batch (in parallel), with HF padding and
    /// truncation semantics.
    pub fn batch_encode<S: AsRef<str> + Sync>(
        &self,
        texts: &[S],
        opts: &EncodeOptions,
    ) -> Result<BatchEncoding> {
        self.encode_batch_inner(texts, None::<&[S]>, opts)
    }

    /// `tokenizer(texts, text_pairs, **options)`: encodes a batch of text pairs.
    pub fn batch_encode_pairs<S: AsRef<str> + Sync>(
        &self,
        texts: &[S],
        pairs: &[S],
        opts: &EncodeOptions,
    ) -> Result<BatchEncoding> {
        if texts.len() != pairs.len() {
            return Err(TokenizerError::PairCountMismatch {
                texts: texts.len(),
                pairs: pairs.len(),
            });
        }
        self.encode_batch_inner(texts, Some(pairs), opts)
    }

    fn encode_sequence(&self, text: &str, offsets: bool) -> Result<Encoding> {
        let r = if offsets {
            self.inner.encode_char_offsets(text, false)
        } else {
            self.inner.encode(text, false)
        };
        r.map_err(|e| TokenizerError::backend("encoding", e))
    }

    /// `tokenizer(words, is_split_into_words=True)`: each input is a list of words (a
    /// CoNLL sentence); `word_ids()` of the result index those words, so labels can be aligned
    /// to the first sub-token of each word.
    pub fn batch_encode_words<S: AsRef<str> + Sync>(
        &self,
        words: &[Vec<S>],
        opts: &EncodeOptions,
    ) -> Result<BatchEncoding> {
        let offsets = opts.return_offsets_mapping;
        self.encode_batch_with(words.len(), false, opts, |i| {
            let sentence: Vec<&str> = words[i].iter().map(AsRef::as_ref).collect();
            let r = if offsets {
                self.inner.encode_char_offsets(sentence, false)
            } else {
                self.inner.encode(sentence, false)
            };
            Ok((r.map_err(|e| TokenizerError::backend("encoding", e))?, None))
        })
    }

    fn encode_batch_inner<S: AsRef<str> + Sync>(
        &self,
        texts: &[S],
        pairs: Option<&[S]>,
        opts: &EncodeOptions,
    ) -> Result<BatchEncoding> {
        let offsets = opts.return_offsets_mapping;
        self.encode_batch_with(texts.len(), pairs.is_some(), opts, |i| {
            let a = self.encode_sequence(texts[i].as_ref(), offsets)?;
            let b = match pairs {
                Some(p) => Some(self.encode_sequence(p[i].as_ref(), offsets)?),
                None => None,
            };
            Ok((a, b))
        })
    }

    /// Encodes `n` inputs (`encode(i)` gives the raw encodings of input `i`), then truncates,
    /// post-processes and pads them with HF's semantics.
    fn encode_batch_with<F>(
        &self,
        n: usize,
        is_pair: bool,
        opts: &EncodeOptions,
        encode: F,
    ) -> Result<BatchEncoding>
    where
        F: Fn(usize) -> Result<(Encoding, Option<Encoding>)> + Sync + Send,
    {
        let truncation = self.truncation_params(opts, is_pair)?;
        let padding = self.padding_params(opts)?;

        // Encode, truncate and add special tokens per input in parallel (rayon, as
        // `tokenizers`' own `encode_batch` does); padding needs the whole batch.
        let mut encodings = (0..n)
            .into_maybe_par_iter()
            .map(|i| {
                let (a, b) = encode(i)?;
                let (a, b) = match &truncation {
                    Some(params) => tokenizers::utils::truncation::truncate_encodings(a, b, params)
                        .map_err(|e| TokenizerError::Truncation {
                            strategy: opts.effective_truncation().as_str().into(),
                            message: e.to_string(),
                        })?,
                    None => (a, b),
                };
                self.post_process(a, b, opts.add_special_tokens)
            })
            .collect::<Result<Vec<_>>>()?;
        if let Some(params) = padding {
            tokenizers::utils::padding::pad_encodings(&mut encodings, &params)
                .map_err(|e| TokenizerError::backend("padding", e))?;
        }
        Ok(BatchEncoding { encodings })
    }

    fn post_process(
        &self,
        a: Encoding,
        b: Option<Encoding>,
        add_special_tokens: bool,
    ) -> Result<Encoding> {
        let r = match &self.post_processor {
            Some(p) => p.process(a, b, add_special_tokens),
            None => {
                let mut merged = a;
                if let Some(b) = b {
                    merged.set_sequence_id(0);
                    let mut b = b;
                    b.set_sequence_id(1);
                    merged.merge_with(b, false);
                }
                Ok(merged)
            }
        };
        r.map_err(|e| TokenizerError::backend("adding special tokens", e))
    }

    fn truncation_params(
        &self,
        opts: &EncodeOptions,
        is_pair: bool,
    ) -> Result<Option<TruncationParams>> {
        let truncation = opts.effective_truncation();
        let Some(strategy) = truncation.strategy() else {
            return Ok(None);
        };
        let Some(max_length) = opts.max_length.or(self.config.model_max_length) else {
            return Ok(None);
        };
        if truncation == Truncation::OnlySecond && !is_pair {
            return Err(TokenizerError::Truncation {
                strategy: truncation.as_str().into(),
                message: "only_second needs text pairs".into(),
            });
        }
        let special = if opts.add_special_tokens {
            self.num_special_tokens_to_add(is_pair)
        } else {
            0
        };
        if max_length < special {
            return Err(TokenizerError::MaxLengthTooSmall {
                max_length,
                special_tokens: special,
                kind: if is_pair { "pair" } else { "single" },
            });
        }
        let side = opts.truncation_side.unwrap_or(self.config.truncation_side);
        Ok(Some(TruncationParams {
            direction: match side {
                Side::Right => TruncationDirection::Right,
                Side::Left => TruncationDirection::Left,
            },
            max_length: max_length - special,
            strategy,
            stride: 0,
        }))
    }

    fn padding_params(&self, opts: &EncodeOptions) -> Result<Option<PaddingParams>> {
        let strategy = match opts.padding {
            Padding::DoNotPad => return Ok(None),
            Padding::Longest => PaddingStrategy::BatchLongest,
            Padding::MaxLength => match opts.max_length.or(self.config.model_max_length) {
                Some(n) => PaddingStrategy::Fixed(n),
                None => PaddingStrategy::BatchLongest,
            },
        };
        let pad_token = self
            .special
            .pad_token
            .clone()
            .ok_or(TokenizerError::NoPadToken)?;
        let pad_id = self
            .inner
            .token_to_id(&pad_token)
            .ok_or_else(|| TokenizerError::UnknownToken(pad_token.clone()))?;
        let side = opts.padding_side.unwrap_or(self.config.padding_side);
        Ok(Some(PaddingParams {
            strategy,
            direction: match side {
                Side::Right => PaddingDirection::Right,
                Side::Left => PaddingDirection::Left,
            },
            pad_to_multiple_of: opts.pad_to_multiple_of,
            pad_id,
            pad_type_id: self
                .config
                .raw
                .get("pad_token_type_id")
                .and_then(Value::as_u64)
                .unwrap_or(0) as u32,
            pad_token,
        }))
    }

    // ---- decoding -------------------------------------------------------------------------

    /// `decode(ids, skip_special_tokens)`, with `clean_up_tokenization_spaces` from the config
    /// (never applied to BPE models, as HF 5 does).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let text = self
            .inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::backend("decoding", e))?;
        let is_bpe = matches!(self.inner.get_model(), tokenizers::ModelWrapper::BPE(_));
        Ok(if self.config.clean_up_tokenization_spaces && !is_bpe {
            clean_up_tokenization(&text)
        } else {
            text
        })
    }

    /// `batch_decode(sequences, skip_special_tokens)`.
    pub fn batch_decode(
        &self,
        sequences: &[Vec<u32>],
        skip_special_tokens: bool,
    ) -> Result<Vec<String>> {
        sequences
            .iter()
            .map(|ids| self.decode(ids, skip_special_tokens))
            .collect()
    }

    /// `convert_tokens_to_ids`: unknown tokens map to `unk_token`'s id.
    pub fn convert_tokens_to_ids<S: AsRef<str>>(&self, tokens: &[S]) -> Result<Vec<u32>> {
        let unk = self.special_token_id("unk_token");
        tokens
            .iter()
            .map(|t| {
                self.inner
                    .token_to_id(t.as_ref())
                    .or(unk)
                    .ok_or_else(|| TokenizerError::UnknownToken(t.as_ref().to_owned()))
            })
            .collect()
    }

    /// `convert_ids_to_tokens(ids, skip_special_tokens)`.
    pub fn convert_ids_to_tokens(
        &self,
        ids: &[u32],
        skip_special_tokens: bool,
    ) -> Result<Vec<String>> {
        let special: Vec<u32> = if skip_special_tokens {
            self.special
                .all()
                .iter()
                .filter_map(|t| self.inner.token_to_id(t))
                .collect()
        } else {
            Vec::new()
        };
        ids.iter()
            .filter(|id| !special.contains(id))
            .map(|&id| {
                self.inner.id_to_token(id).ok_or(TokenizerError::UnknownId {
                    id,
                    vocab_size: self.len(),
                })
            })
            .collect()
    }

    /// `convert_tokens_to_string`: joins tokens through the pipeline's decoder (`##` pieces
    /// glued, byte-level bytes restored).
    pub fn convert_tokens_to_string<S: AsRef<str>>(&self, tokens: &[S]) -> Result<String> {
        let tokens: Vec<String> = tokens.iter().map(|t| t.as_ref().to_owned()).collect();
        match self.inner.get_decoder() {
            Some(d) => tokenizers::Decoder::decode(d, tokens)
                .map_err(|e| TokenizerError::backend("decoding", e)),
            None => Ok(tokens.join(" ")),
        }
    }

    // ---- internals shared with save / train ----------------------------------------------

    pub(crate) fn parts(&self) -> (&TokenizerConfig, &SpecialTokens) {
        (&self.config, &self.special)
    }

    pub(crate) fn config_mut(&mut self) -> &mut TokenizerConfig {
        &mut self.config
    }

    pub(crate) fn with_pipeline(&self, pipeline: Value, source: &Path) -> Result<Self> {
        Self::from_pipeline_json(pipeline, source, self.config.clone(), self.special.clone())
    }
}

fn merge_special_tokens_map(files: &TokenizerFiles, special: &mut SpecialTokens) -> Result<()> {
    if let Some(p) = files.file("special_tokens_map.json") {
        let map = read_json_object(&p)?;
        special.merge_from(&p, &map)?;
    }
    Ok(())
}

fn unknown_class(config_path: &Path, class: Option<String>) -> TokenizerError {
    TokenizerError::UnknownTokenizerClass {
        path: config_path.to_path_buf(),
        class: class.unwrap_or_default(),
    }
}

/// HF's `clean_up_tokenization`: removes spaces before punctuation and English contractions.
pub fn clean_up_tokenization(text: &str) -> String {
    text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}
