//! Text generation for any [`CausalLm`]: HF's `generate` with a [`GenerationConfig`] read from
//! `generation_config.json`: greedy decoding, sampling (temperature, top-k, top-p, typical,
//! epsilon) and beam search ([`beam`]), HF's logits processors ([`logits`]), `max_new_tokens`
//! / `max_length`, EOS ids and stop conditions, left-padded batches, the key / value cache, and
//! streaming of tokens as they are produced.
//!
//! Logits processing runs on the host on the last position's logits, in HF's order (see
//! [`logits`]), so that greedy decoding picks the same ids as PyTorch: the first index of the
//! largest logit.

pub mod beam;
pub mod logits;

use crate::causal::{CausalLm, CausalLmInput, KvCache};
use crate::config::{name_bad_field, read_json};
use crate::error::{ModelError, Result};
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use logits::{argmax, padding_length, LogitsProcessorList};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};
use std::path::Path;

fn d_max_length() -> usize {
    20
}
fn d_one() -> f64 {
    1.0
}
fn d_top_k() -> usize {
    50
}
fn d_num_beams() -> usize {
    1
}
fn d_true() -> bool {
    true
}
fn d_one_usize() -> usize {
    1
}

/// HF's `early_stopping`: when beam search ends (`false`, `true` or `"never"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EarlyStopping {
    /// `false` (HF's default): stop when the best running beam, at its current length, can no
    /// longer beat the worst finished one.
    #[default]
    Heuristic,
    /// `true`: stop as soon as `num_beams` hypotheses have finished.
    True,
    /// `"never"`: stop only when no running beam can beat the finished ones at any length up to
    /// `max_length` (the canonical beam search).
    Never,
}

impl Serialize for EarlyStopping {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Self::Heuristic => s.serialize_bool(false),
            Self::True => s.serialize_bool(true),
            Self::Never => s.serialize_str("never"),
        }
    }
}

impl<'de> Deserialize<'de> for EarlyStopping {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::Bool(false) | Value::Null => Ok(Self::Heuristic),
            Value::Bool(true) => Ok(Self::True),
            Value::String(s) if s == "never" => Ok(Self::Never),
            other => Err(serde::de::Error::custom(format!(
                "`early_stopping` must be a boolean or 'never', but is {other}"
            ))),
        }
    }
}

impl std::str::FromStr for EarlyStopping {
    type Err = String;
    /// `true`, `false` or `never`, as on HF's command lines.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "false" => Ok(Self::Heuristic),
            "true" => Ok(Self::True),
            "never" => Ok(Self::Never),
            other => Err(format!(
                "`early_stopping` must be true, false or never, but is {other}"
            )),
        }
    }
}

/// HF's `GenerationConfig`: the fields Ember implements, with HF's names and defaults. Every
/// other field is kept in `extra`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationConfig {
    /// `max_length` (20): prompt plus new tokens, used when `max_new_tokens` is not set.
    #[serde(default = "d_max_length")]
    pub max_length: usize,
    /// `max_new_tokens`: how many tokens to add (takes precedence over `max_length`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_new_tokens: Option<usize>,
    /// `min_new_tokens` (0 = unset): EOS ids are not chosen before a row has this many new tokens
    /// (HF's `MinNewTokensLengthLogitsProcessor` sets their scores to -inf). Takes precedence
    /// over `min_length`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub min_new_tokens: usize,
    /// `min_length` (0): EOS ids are not chosen before a row, prompt and padding included, is
    /// this long (HF's `MinLengthLogitsProcessor`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub min_length: usize,
    /// `do_sample` (false): sample instead of greedy decoding.
    #[serde(default)]
    pub do_sample: bool,
    /// `temperature` (1.0), when sampling.
    #[serde(default = "d_one")]
    pub temperature: f64,
    /// `top_k` (50), when sampling; 0 disables it.
    #[serde(default = "d_top_k")]
    pub top_k: usize,
    /// `top_p` (1.0 = off), when sampling: keep the smallest set of tokens whose probability
    /// reaches it. Must lie in (0, 1].
    #[serde(default = "d_one")]
    pub top_p: f64,
    /// `typical_p` (1.0 = off), when sampling: keep the tokens whose surprise is closest to the
    /// entropy until their probability reaches it (HF's `TypicalLogitsWarper`). Must lie in
    /// (0, 1].
    #[serde(default = "d_one")]
    pub typical_p: f64,
    /// `epsilon_cutoff` (0.0 = off), when sampling: drop tokens whose probability is below it
    /// (HF's `EpsilonLogitsWarper`). Must lie in [0, 1).
    #[serde(default)]
    pub epsilon_cutoff: f64,
    /// `repetition_penalty` (1.0 = off): divides positive and multiplies negative logits of
    /// tokens already in the sequence (prompt included, left padding not).
    #[serde(default = "d_one")]
    pub repetition_penalty: f64,
    /// `no_repeat_ngram_size` (0 = off): no n-gram of this size occurs twice in a row (prompt
    /// included).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub no_repeat_ngram_size: usize,
    /// `bad_words_ids`: token sequences that are never completed (a single EOS id is ignored,
    /// as in HF).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bad_words_ids: Option<Vec<Vec<u32>>>,
    /// `forced_bos_token_id`: the first new token when the prompt is one token long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forced_bos_token_id: Option<u32>,
    /// `forced_eos_token_id`: one id or a list; the last token before `max_length` is one of
    /// them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forced_eos_token_id: Option<Value>,
    /// `eos_token_id`: one id or a list; generation of a row ends at any of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<Value>,
    /// `pad_token_id`: fills finished rows; the first EOS id when absent (as HF does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<i64>,
    /// `bos_token_id`: the prompt of an empty input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<i64>,
    /// `stop_strings`: text that ends a row once its decoded output ends with it (needs a
    /// decoder; see [`StopStrings`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_strings: Option<Value>,
    /// `num_beams` (1): above 1, beam search keeps this many hypotheses per prompt.
    #[serde(default = "d_num_beams")]
    pub num_beams: usize,
    /// `num_return_sequences` (1): rows returned per prompt (the best beams, or independent
    /// samples); at most `num_beams` with beam search.
    #[serde(default = "d_one_usize")]
    pub num_return_sequences: usize,
    /// `length_penalty` (1.0), beam search: a finished hypothesis scores its summed log
    /// probabilities divided by (new tokens) ** `length_penalty`.
    #[serde(default = "d_one")]
    pub length_penalty: f64,
    /// `early_stopping` (false), beam search: see [`EarlyStopping`].
    #[serde(default)]
    pub early_stopping: EarlyStopping,
    /// `use_cache` (true): reuse keys and values instead of recomputing the whole sequence.
    #[serde(default = "d_true")]
    pub use_cache: bool,
    /// Every other field of the file, kept as read.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        serde_json::from_value(Value::Object(Map::new())).expect("every field has a default")
    }
}

impl GenerationConfig {
    /// Reads `generation_config.json` of a model folder, or, when it is absent, takes the
    /// special token ids from `config.json` (HF's `GenerationConfig.from_model_config`).
    /// A Hub repository id is fetched into the Hugging Face cache first (its `config.json` and
    /// `generation_config.json`).
    pub fn from_pretrained(dir: impl AsRef<Path>) -> Result<Self> {
        Self::from_pretrained_with(dir, &crate::FromPretrainedOptions::default())
    }

    /// As [`Self::from_pretrained`], with the Hub settings and `revision` of `options`.
    pub fn from_pretrained_with(
        dir: impl AsRef<Path>,
        options: &crate::FromPretrainedOptions,
    ) -> Result<Self> {
        let dir = crate::hub::resolve_config(dir.as_ref(), options)?;
        let dir: &Path = &dir;
        let path = dir.join("generation_config.json");
        if path.is_file() {
            return Self::from_json_value(read_json(&path)?, &path);
        }
        let model = read_json(&dir.join("config.json"))?;
        let mut config = Self::default();
        config.fill_from_model_config(&model);
        Ok(config)
    }

    /// Builds a config from parsed JSON; `path` names the source in errors.
    pub fn from_json_value(value: Value, path: &Path) -> Result<Self> {
        let config: Self =
            serde_json::from_value(value.clone()).map_err(|e| ModelError::Config {
                path: path.to_owned(),
                message: name_bad_field::<Self>(&value, e),
            })?;
        config.validate().map_err(|message| ModelError::Config {
            path: path.to_owned(),
            message,
        })?;
        Ok(config)
    }

    /// Takes `eos_token_id`, `pad_token_id` and `bos_token_id` from a model's `config.json`
    /// where this config has none.
    pub fn fill_from_model_config(&mut self, model: &Value) {
        if self.eos_token_id.is_none() {
            self.eos_token_id = model.get("eos_token_id").filter(|v| !v.is_null()).cloned();
        }
        if self.pad_token_id.is_none() {
            self.pad_token_id = model.get("pad_token_id").and_then(Value::as_i64);
        }
        if self.bos_token_id.is_none() {
            self.bos_token_id = model.get("bos_token_id").and_then(Value::as_i64);
        }
    }

    /// Checks the values HF rejects (with HF's conditions), plus beam search.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.max_new_tokens == Some(0) {
            return Err("`max_new_tokens` must be greater than 0, but is 0".into());
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!(
                "`top_p` has to be a float in (0, 1], but is {}",
                self.top_p
            ));
        }
        if self.temperature <= 0.0 || !self.temperature.is_finite() {
            return Err(format!(
                "`temperature` (={}) has to be a strictly positive float",
                self.temperature
            ));
        }
        if self.repetition_penalty <= 0.0 || !self.repetition_penalty.is_finite() {
            return Err(format!(
                "`penalty` has to be a strictly positive float, but is {}",
                self.repetition_penalty
            ));
        }
        if !(self.typical_p > 0.0 && self.typical_p <= 1.0) {
            return Err(format!(
                "`typical_p` has to be a float in (0, 1], but is {}",
                self.typical_p
            ));
        }
        if !(self.epsilon_cutoff >= 0.0 && self.epsilon_cutoff < 1.0) {
            return Err(format!(
                "`epsilon_cutoff` has to be a float in [0, 1), but is {}",
                self.epsilon_cutoff
            ));
        }
        if !self.length_penalty.is_finite() {
            return Err(format!(
                "`length_penalty` has to be a finite float, but is {}",
                self.length_penalty
            ));
        }
        if self.num_beams == 0 {
            return Err("`num_beams` has to be at least 1, but is 0".into());
        }
        if self.num_return_sequences == 0 {
            return Err("`num_return_sequences` has to be at least 1, but is 0".into());
        }
        if self.num_beams == 1 && self.num_return_sequences > 1 && !self.do_sample {
            return Err(format!(
                "Greedy methods (do_sample != True) without beam search do not support \
                 `num_return_sequences` different than 1 (got {})",
                self.num_return_sequences
            ));
        }
        if self.num_beams > 1 && self.num_return_sequences > self.num_beams {
            return Err(format!(
                "`num_return_sequences` ({}) has to be smaller or equal to `num_beams` ({})",
                self.num_return_sequences, self.num_beams
            ));
        }
        if let Some(bad) = &self.bad_words_ids {
            if bad.is_empty() || bad.iter().any(Vec::is_empty) {
                return Err(format!(
                    "`bad_words_ids` has to be a non-empty list of non-empty lists, but is {bad:?}"
                ));
            }
        }
        self.forced_eos_ids()?;
        self.eos_ids()?;
        self.stop_string_list()?;
        Ok(())
    }

    /// The EOS ids (empty when none is set).
    pub fn eos_ids(&self) -> std::result::Result<Vec<u32>, String> {
        id_list("eos_token_id", &self.eos_token_id)
    }

    /// The `forced_eos_token_id` ids (empty when none is set).
    pub fn forced_eos_ids(&self) -> std::result::Result<Vec<u32>, String> {
        id_list("forced_eos_token_id", &self.forced_eos_token_id)
    }

    /// The stop strings (empty when none is set).
    pub fn stop_string_list(&self) -> std::result::Result<Vec<String>, String> {
        match &self.stop_strings {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| format!("stop_strings entry `{v}` is not a string"))
                })
                .collect(),
            Some(other) => Err(format!("stop_strings `{other}` is not a string or a list")),
        }
    }

    /// Greedy decoding of `n` new tokens.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens: Some(max_new_tokens),
            ..Self::default()
        }
    }
}

/// Receives tokens as they are produced (HF's `BaseStreamer`).
pub trait Streamer {
    /// The tokens chosen at one step, one per row still generating (`rows[i]` is the batch row
    /// of `tokens[i]`).
    fn put(&mut self, rows: &[usize], tokens: &[u32]);
    /// Generation has ended.
    fn end(&mut self) {}
}

/// Decides, after each step, whether a row is done (HF's `StoppingCriteria`).
pub trait StoppingCriteria {
    /// `generated` holds the row's new tokens so far.
    fn should_stop(&mut self, row: usize, generated: &[u32]) -> bool;
}

/// HF's `stop_strings`: a row ends once its decoded new text ends with one of the strings.
pub struct StopStrings<F: FnMut(&[u32]) -> String> {
    strings: Vec<String>,
    decode: F,
}

impl<F: FnMut(&[u32]) -> String> StopStrings<F> {
    /// Stop strings checked against the text `decode` gives for a row's new tokens.
    pub fn new(strings: Vec<String>, decode: F) -> Self {
        Self { strings, decode }
    }
}

impl<F: FnMut(&[u32]) -> String> StoppingCriteria for StopStrings<F> {
    fn should_stop(&mut self, _row: usize, generated: &[u32]) -> bool {
        if self.strings.is_empty() {
            return false;
        }
        let text = (self.decode)(generated);
        self.strings.iter().any(|s| text.ends_with(s.as_str()))
    }
}

/// A prompt batch: token ids per row, left-padded to one length, with its attention mask.
#[derive(Debug, Clone)]
pub struct Prompt {
    /// `[batch][seq]` ids, padding on the left.
    pub input_ids: Vec<Vec<u32>>,
    /// `[batch][seq]`, 0 on padding.
    pub attention_mask: Vec<Vec<u32>>,
}

impl Prompt {
    /// One unpadded prompt.
    pub fn single(ids: Vec<u32>) -> Self {
        let mask = vec![1; ids.len()];
        Self {
            input_ids: vec![ids],
            attention_mask: vec![mask],
        }
    }

    /// Several prompts, left-padded with `pad_id` to the longest.
    pub fn left_padded(rows: Vec<Vec<u32>>, pad_id: u32) -> Self {
        let longest = rows.iter().map(Vec::len).max().unwrap_or(0);
        let (mut input_ids, mut attention_mask) = (Vec::new(), Vec::new());
        for row in rows {
            let pad = longest - row.len();
            let mut ids = vec![pad_id; pad];
            ids.extend(row);
            let mut mask = vec![0; pad];
            mask.extend(vec![1; longest - pad]);
            input_ids.push(ids);
            attention_mask.push(mask);
        }
        Self {
            input_ids,
            attention_mask,
        }
    }
}

/// What `generate` returns.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOutput {
    /// Per row, the prompt (with its padding) followed by the new tokens and, after a row
    /// finished, padding up to the longest row (HF's `sequences`). With
    /// `num_return_sequences` k, rows `i * k .. (i + 1) * k` belong to prompt row `i`, best beam
    /// first.
    pub sequences: Vec<Vec<u32>>,
    /// Per row, only the new tokens up to and including the one that ended it.
    pub new_tokens: Vec<Vec<u32>>,
    /// Beam search only: per row, its final score, the summed log probabilities of its new
    /// tokens (after the logits processors) divided by their count ** `length_penalty` (HF's
    /// `sequences_scores`).
    pub sequences_scores: Option<Vec<f32>>,
}

/// The options of one `generate` call beyond the config: a seed for sampling, a streamer, and
/// extra stopping criteria.
#[derive(Default)]
pub struct GenerateOptions<'a> {
    /// The seed of the sampling generator (0 when absent).
    pub seed: Option<u64>,
    /// Receives tokens as they are produced (not with beam search, as in HF).
    pub streamer: Option<&'a mut dyn Streamer>,
    /// Extra stopping criteria (stop strings, ...).
    pub stopping: Vec<&'a mut dyn StoppingCriteria>,
}

/// The checked inputs of one `generate` call, shared by every decoding strategy.
pub(crate) struct Prepared {
    /// The prompt, with an empty one replaced by BOS and rows repeated for
    /// `num_return_sequences` / `num_beams`.
    pub prompt: Prompt,
    pub eos: Vec<u32>,
    pub pad: u32,
    pub max_new: usize,
    pub processors: LogitsProcessorList,
}

/// Validates `config` against the prompt and the model, and repeats each prompt row `expand`
/// times (HF's `_expand_inputs_for_generation`).
pub(crate) fn prepare<B: Backend, M: CausalLm<B>>(
    model: &M,
    prompt: &Prompt,
    config: &GenerationConfig,
    expand: usize,
) -> Result<Prepared> {
    config.validate().map_err(ModelError::Input)?;
    let eos = config.eos_ids().map_err(ModelError::Input)?;
    let pad = config
        .pad_token_id
        .map(|p| p as u32)
        .or_else(|| eos.first().copied())
        .unwrap_or(0);
    let mut prompt = prompt.clone();
    let batch = prompt.input_ids.len();
    if batch == 0 {
        return Err(ModelError::Input(
            "generate needs at least one prompt".into(),
        ));
    }
    if prompt.input_ids.iter().all(Vec::is_empty) {
        // HF starts an empty input from the BOS token.
        let bos = config.bos_token_id.ok_or_else(|| {
            ModelError::Input("the prompt is empty and the model has no bos_token_id".into())
        })? as u32;
        prompt = Prompt::left_padded(vec![vec![bos]; batch], pad);
    }
    let prompt_len = prompt.input_ids[0].len();
    if prompt
        .input_ids
        .iter()
        .chain(&prompt.attention_mask)
        .any(|r| r.len() != prompt_len)
    {
        return Err(ModelError::Input(
            "prompt rows and masks must all have one length (left-pad them)".into(),
        ));
    }
    let max_new = match config.max_new_tokens {
        Some(n) => n,
        None if config.max_length > prompt_len => config.max_length - prompt_len,
        None => {
            return Err(ModelError::Input(format!(
                "the prompt has {prompt_len} tokens, max_length is {}: set max_new_tokens",
                config.max_length
            )))
        }
    };
    if let Some(context) = model.max_positions() {
        if prompt_len + max_new > context {
            return Err(ModelError::Input(format!(
                "{prompt_len} prompt tokens plus {max_new} new ones exceed the model's context of {context} positions"
            )));
        }
    }
    let processors =
        LogitsProcessorList::new(config, prompt_len, prompt_len + max_new, model.vocab_size())?;
    let repeat = |rows: &[Vec<u32>]| -> Vec<Vec<u32>> {
        rows.iter()
            .flat_map(|r| std::iter::repeat_n(r.clone(), expand))
            .collect()
    };
    let prompt = Prompt {
        input_ids: repeat(&prompt.input_ids),
        attention_mask: repeat(&prompt.attention_mask),
    };
    Ok(Prepared {
        prompt,
        eos,
        pad,
        max_new,
        processors,
    })
}

/// HF's positions for generation: the count of real tokens before each one, from `from` on.
fn positions(mask: &[Vec<u32>], from: usize) -> Vec<i64> {
    mask.iter()
        .flat_map(|row| {
            let mut seen = -1i64;
            row.iter()
                .map(|&m| {
                    seen += m as i64;
                    if m == 0 {
                        1
                    } else {
                        seen
                    }
                })
                .collect::<Vec<_>>()
                .split_off(from)
        })
        .collect()
}

/// One forward pass over rows of equal length: the whole rows without a cache, else their
/// last token. Returns the last position's logits, `[rows * vocab]` in float32.
pub(crate) fn next_logits<B: Backend, M: CausalLm<B>>(
    model: &M,
    sequences: &[Vec<u32>],
    mask: &[Vec<u32>],
    cache: &mut Option<KvCache<B>>,
    use_cache: bool,
    device: &B::Device,
) -> Result<Vec<f32>> {
    let rows = sequences.len();
    let total = sequences[0].len();
    let from = if use_cache && cache.is_some() {
        total - 1
    } else {
        0
    };
    let step = total - from;
    let ids: Vec<i64> = sequences
        .iter()
        .flat_map(|r| r[from..].iter().map(|&t| t as i64))
        .collect();
    let flat_mask: Vec<i64> = mask.iter().flatten().map(|&m| m as i64).collect();
    let mut input = CausalLmInput::new(Tensor::<B, 2, Int>::from_data(
        TensorData::new(ids, [rows, step]),
        device,
    ))
    .with_attention_mask(Tensor::from_data(
        TensorData::new(flat_mask, [rows, total]),
        device,
    ))
    .with_position_ids(Tensor::from_data(
        TensorData::new(positions(mask, from), [rows, step]),
        device,
    ))
    .with_logits_to_keep(1);
    if let Some(c) = cache.take() {
        input = input.with_past_key_values(c);
    }
    let out = model.forward(input)?;
    if use_cache {
        *cache = Some(out.past_key_values);
    }
    out.logits
        .reshape([rows, model.vocab_size()])
        .into_data()
        .convert::<f32>()
        .to_vec()
        .map_err(|e| ModelError::Input(format!("reading logits: {e:?}")))
}

/// HF's `generate`: decodes from `prompt` with `model` until every row has produced an EOS id,
/// met a stopping criterion, or reached the length limit. `num_beams` above 1 runs beam search
/// ([`beam::beam_search`]); otherwise greedy decoding or, with `do_sample`, sampling, each
/// prompt row repeated `num_return_sequences` times.
pub fn generate<B: Backend, M: CausalLm<B>>(
    model: &M,
    prompt: &Prompt,
    config: &GenerationConfig,
    mut options: GenerateOptions<'_>,
    device: &B::Device,
) -> Result<GenerateOutput> {
    if config.num_beams > 1 {
        return beam::beam_search(model, prompt, config, options, device);
    }
    let Prepared {
        prompt,
        eos,
        pad,
        max_new,
        processors,
    } = prepare(model, prompt, config, config.num_return_sequences)?;
    let batch = prompt.input_ids.len();
    let vocab = model.vocab_size();
    let mut rng = StdRng::seed_from_u64(options.seed.unwrap_or(0));
    let ignore: Vec<usize> = prompt
        .attention_mask
        .iter()
        .map(|m| padding_length(m))
        .collect();
    let mut sequences = prompt.input_ids.clone();
    let mut mask = prompt.attention_mask.clone();
    let mut new_tokens: Vec<Vec<u32>> = vec![Vec::new(); batch];
    let mut finished = vec![false; batch];
    let mut cache: Option<KvCache<B>> = None;
    for _ in 0..max_new {
        let last = next_logits(
            model,
            &sequences,
            &mask,
            &mut cache,
            config.use_cache,
            device,
        )?;
        let (mut rows, mut chosen) = (Vec::new(), Vec::new());
        for (row, scores) in last.chunks_exact(vocab).enumerate() {
            let token = if finished[row] {
                pad
            } else {
                let mut scores = scores.to_vec();
                processors.process(&sequences[row], ignore[row], &mut scores);
                let token = if processors.samples() {
                    draw(&scores, &mut rng)
                } else {
                    argmax(&scores)
                };
                new_tokens[row].push(token);
                rows.push(row);
                chosen.push(token);
                token
            };
            sequences[row].push(token);
            mask[row].push(1);
        }
        if let Some(s) = options.streamer.as_deref_mut() {
            s.put(&rows, &chosen);
        }
        for &row in &rows {
            let done = eos.contains(new_tokens[row].last().expect("a token was just added"))
                || options
                    .stopping
                    .iter_mut()
                    .any(|c| c.should_stop(row, &new_tokens[row]));
            finished[row] |= done;
        }
        if finished.iter().all(|&f| f) {
            break;
        }
    }
    if let Some(s) = options.streamer.as_deref_mut() {
        s.end();
    }
    Ok(GenerateOutput {
        sequences,
        new_tokens,
        sequences_scores: None,
    })
}

/// One draw from the softmax of the scores the warpers left (the rest are -inf), walking the
/// tokens from the most likely down (ties in index order).
fn draw(scores: &[f32], rng: &mut StdRng) -> u32 {
    let mut kept: Vec<usize> = (0..scores.len())
        .filter(|&i| scores[i] > f32::NEG_INFINITY)
        .collect();
    if kept.is_empty() {
        // Every token removed (only possible with -inf logits): HF's multinomial would fail;
        // the most likely raw index is the closest defined answer.
        return argmax(scores);
    }
    kept.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let max = scores[kept[0]];
    let weights: Vec<f64> = kept
        .iter()
        .map(|&i| ((scores[i] - max) as f64).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut left = rng.random::<f64>() * total;
    for (w, &i) in weights.iter().zip(&kept) {
        if left < *w {
            return i as u32;
        }
        left -= w;
    }
    kept[kept.len() - 1] as u32
}

/// One token id or a list of them (`eos_token_id`, `forced_eos_token_id`).
fn id_list(field: &str, value: &Option<Value>) -> std::result::Result<Vec<u32>, String> {
    let bad = |v: &Value| format!("{field} `{v}` is not a token id or a list of them");
    let id = |v: &Value| {
        v.as_u64()
            .filter(|&i| i <= u32::MAX as u64)
            .map(|i| i as u32)
            .ok_or_else(|| bad(v))
    };
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(id).collect(),
        Some(v @ Value::Number(_)) => Ok(vec![id(v)?]),
        Some(other) => Err(bad(other)),
    }
}

/// Whether a count is zero (so it is left out of a saved config, as HF leaves defaults).
fn is_zero(n: &usize) -> bool {
    *n == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_follows_hf() {
        for (field, value, wanted) in [
            ("max_new_tokens", Value::from(0), "max_new_tokens"),
            ("top_p", Value::from(0.0), "top_p"),
            ("top_p", Value::from(1.5), "top_p"),
            ("temperature", Value::from(0.0), "temperature"),
            ("eos_token_id", Value::from("x"), "eos_token_id"),
            ("num_beams", Value::from(0), "num_beams"),
            ("num_return_sequences", Value::from(5), "(5)"),
            ("num_return_sequences", Value::from(2), "Greedy"),
            (
                "typical_p",
                Value::from(0.0),
                "`typical_p` has to be a float in (0, 1], but is 0",
            ),
            ("typical_p", Value::from(1.5), "1.5"),
            ("epsilon_cutoff", Value::from(1.0), "`epsilon_cutoff`"),
            ("epsilon_cutoff", Value::from(-0.1), "-0.1"),
            ("early_stopping", Value::from("sometimes"), "sometimes"),
            ("bad_words_ids", serde_json::json!([]), "bad_words_ids"),
            (
                "bad_words_ids",
                serde_json::json!([[3], []]),
                "bad_words_ids",
            ),
            ("bad_words_ids", serde_json::json!([[-3]]), "bad_words_ids"),
            (
                "forced_eos_token_id",
                Value::from("x"),
                "forced_eos_token_id",
            ),
        ] {
            let mut v = serde_json::json!({"num_beams": 4});
            if field == "num_return_sequences" && value == 2 {
                v["num_beams"] = 1.into();
            }
            v[field] = value;
            let e = GenerationConfig::from_json_value(v, Path::new("g.json")).unwrap_err();
            assert!(e.to_string().contains(wanted), "{field}: {e}");
            assert!(e.to_string().contains("g.json"), "{e}");
        }
        let c = GenerationConfig::from_json_value(
            serde_json::json!({"eos_token_id": [2, 7], "stop_strings": "\n\n", "foo": 1}),
            Path::new("g.json"),
        )
        .unwrap();
        assert_eq!(c.eos_ids().unwrap(), vec![2, 7]);
        assert_eq!(c.stop_string_list().unwrap(), vec!["\n\n".to_string()]);
        assert_eq!(c.extra["foo"], 1);
        let c = GenerationConfig::from_json_value(
            serde_json::json!({"num_beams": 3, "num_return_sequences": 3, "early_stopping": "never",
                               "forced_eos_token_id": [4, 5]}),
            Path::new("g.json"),
        )
        .unwrap();
        assert_eq!(c.early_stopping, EarlyStopping::Never);
        assert_eq!(c.forced_eos_ids().unwrap(), vec![4, 5]);
        assert_eq!(serde_json::to_value(&c).unwrap()["early_stopping"], "never");
    }

    /// The warpers of `config`, then one draw.
    fn sample(scores: &mut [f32], config: &GenerationConfig, rng: &mut StdRng) -> u32 {
        let list = LogitsProcessorList::new(config, 0, 1, scores.len()).unwrap();
        list.process(&[], 0, scores);
        draw(scores, rng)
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative() {
        let mut s = vec![2.0, -2.0, 1.0];
        logits::repetition_penalty(&mut s, &[0, 1, 1], 2.0);
        assert_eq!(s, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let scores = vec![0.1, 3.0, 2.9, -1.0];
        let mut rng = StdRng::seed_from_u64(7);
        for config in [
            GenerationConfig {
                do_sample: true,
                top_k: 1,
                ..Default::default()
            },
            GenerationConfig {
                do_sample: true,
                top_p: 0.01,
                top_k: 0,
                ..Default::default()
            },
        ] {
            for _ in 0..20 {
                assert_eq!(sample(&mut scores.clone(), &config, &mut rng), 1);
            }
        }
    }

    #[test]
    fn sampling_follows_the_softmax() {
        // Two tokens with probabilities e/(1+e) and 1/(1+e).
        let config = GenerationConfig {
            do_sample: true,
            top_k: 0,
            ..Default::default()
        };
        let mut rng = StdRng::seed_from_u64(1);
        let n = 20_000;
        let ones = (0..n)
            .filter(|_| sample(&mut [1.0, 0.0], &config, &mut rng) == 0)
            .count();
        let p = std::f64::consts::E / (1.0 + std::f64::consts::E);
        assert!((ones as f64 / n as f64 - p).abs() < 0.015, "{ones}");
    }

    #[test]
    fn top_p_keeps_the_smallest_prefix_reaching_it() {
        // Probabilities 0.5, 0.3, 0.2: top_p 0.7 keeps the first two, never the third.
        let logits: Vec<f32> = [0.5f32, 0.3, 0.2].iter().map(|p| p.ln()).collect();
        let config = GenerationConfig {
            do_sample: true,
            top_k: 0,
            top_p: 0.7,
            ..Default::default()
        };
        let mut rng = StdRng::seed_from_u64(3);
        let mut seen = [0; 3];
        for _ in 0..2000 {
            seen[sample(&mut logits.clone(), &config, &mut rng) as usize] += 1;
        }
        assert!(seen[0] > 0 && seen[1] > 0 && seen[2] == 0, "{seen:?}");
    }
}
