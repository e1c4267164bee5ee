//! Encoding options (HF `padding=`, `truncation=`, `max_length=` ...) and the batch they produce.

use crate::config::Side;
use crate::error::{Result, TokenizerError};
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use tokenizers::Encoding;

/// HF's `padding=` argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Padding {
    /// `padding=False`: every sequence keeps its own length (HF default).
    #[default]
    DoNotPad,
    /// `padding=True` / `"longest"`: pad to the longest sequence of the batch.
    Longest,
    /// `padding="max_length"`: pad to `max_length` (or `model_max_length`).
    MaxLength,
}

/// HF's `truncation=` argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truncation {
    /// `truncation=False`.
    DoNotTruncate,
    /// `truncation=True` / `"longest_first"`: cut the longer text of a pair first, token by token.
    LongestFirst,
    /// `"only_first"`: cut only the first text.
    OnlyFirst,
    /// `"only_second"`: cut only the second text of a pair.
    OnlySecond,
}

impl Truncation {
    /// The HF spelling (`"longest_first"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Truncation::DoNotTruncate => "do_not_truncate",
            Truncation::LongestFirst => "longest_first",
            Truncation::OnlyFirst => "only_first",
            Truncation::OnlySecond => "only_second",
        }
    }

    pub(crate) fn strategy(self) -> Option<tokenizers::TruncationStrategy> {
        use tokenizers::TruncationStrategy as S;
        match self {
            Truncation::DoNotTruncate => None,
            Truncation::LongestFirst => Some(S::LongestFirst),
            Truncation::OnlyFirst => Some(S::OnlyFirst),
            Truncation::OnlySecond => Some(S::OnlySecond),
        }
    }
}

/// The keyword arguments of HF `tokenizer(text, ...)`, with HF's defaults.
///
/// ```
/// use ember_tokenizers::{EncodeOptions, Padding, Truncation, Side};
/// // tokenizer(texts, padding="max_length", truncation=True, max_length=128, padding_side="left")
/// let opts = EncodeOptions::default()
///     .padding(Padding::MaxLength)
///     .truncation(Truncation::LongestFirst)
///     .max_length(128)
///     .padding_side(Side::Left);
/// assert!(opts.add_special_tokens);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodeOptions {
    /// Add the model's special tokens (`[CLS]` ... `[SEP]`); default true.
    pub add_special_tokens: bool,
    /// How to pad; default no padding.
    pub padding: Padding,
    /// How to truncate. `None` follows HF: truncate `longest_first` when `max_length` is given and
    /// padding is off, else do not truncate.
    pub truncation: Option<Truncation>,
    /// Length limit for truncation and `Padding::MaxLength`; `None` uses `model_max_length`.
    pub max_length: Option<usize>,
    /// Round padded lengths up to a multiple of this.
    pub pad_to_multiple_of: Option<usize>,
    /// Pad on this side instead of the tokenizer's `padding_side`.
    pub padding_side: Option<Side>,
    /// Truncate on this side instead of the tokenizer's `truncation_side`.
    pub truncation_side: Option<Side>,
    /// Offsets in characters (`return_offsets_mapping`, default true); when false, offsets are
    /// byte offsets, which are cheaper to compute.
    pub return_offsets_mapping: bool,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        Self {
            add_special_tokens: true,
            padding: Padding::DoNotPad,
            truncation: None,
            max_length: None,
            pad_to_multiple_of: None,
            padding_side: None,
            truncation_side: None,
            return_offsets_mapping: true,
        }
    }
}

impl EncodeOptions {
    /// Sets `add_special_tokens`.
    pub fn add_special_tokens(mut self, yes: bool) -> Self {
        self.add_special_tokens = yes;
        self
    }
    /// Sets `padding`.
    pub fn padding(mut self, padding: Padding) -> Self {
        self.padding = padding;
        self
    }
    /// Sets `truncation`.
    pub fn truncation(mut self, truncation: Truncation) -> Self {
        self.truncation = Some(truncation);
        self
    }
    /// Sets `max_length`.
    pub fn max_length(mut self, max_length: usize) -> Self {
        self.max_length = Some(max_length);
        self
    }
    /// Sets `pad_to_multiple_of`.
    pub fn pad_to_multiple_of(mut self, multiple: usize) -> Self {
        self.pad_to_multiple_of = Some(multiple);
        self
    }
    /// Sets `padding_side`.
    pub fn padding_side(mut self, side: Side) -> Self {
        self.padding_side = Some(side);
        self
    }
    /// Sets `truncation_side`.
    pub fn truncation_side(mut self, side: Side) -> Self {
        self.truncation_side = Some(side);
        self
    }
    /// Sets `return_offsets_mapping`.
    pub fn return_offsets_mapping(mut self, yes: bool) -> Self {
        self.return_offsets_mapping = yes;
        self
    }

    /// The truncation HF applies for these options.
    pub fn effective_truncation(&self) -> Truncation {
        match self.truncation {
            Some(t) => t,
            None if self.max_length.is_some() && self.padding == Padding::DoNotPad => {
                Truncation::LongestFirst
            }
            None => Truncation::DoNotTruncate,
        }
    }
}

/// The encoded batch: HF's `BatchEncoding` (`input_ids`, `attention_mask`, `token_type_ids`,
/// `offset_mapping`, `word_ids()` ...), one [`Encoding`] per input text.
#[derive(Debug, Clone)]
pub struct BatchEncoding {
    /// One encoding per input, in input order.
    pub encodings: Vec<Encoding>,
}

impl BatchEncoding {
    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.encodings.len()
    }

    /// True when the batch holds no sequence.
    pub fn is_empty(&self) -> bool {
        self.encodings.is_empty()
    }

    fn collect(&self, f: impl Fn(&Encoding) -> &[u32]) -> Vec<Vec<u32>> {
        self.encodings.iter().map(|e| f(e).to_vec()).collect()
    }

    /// `input_ids`, one list per sequence.
    pub fn input_ids(&self) -> Vec<Vec<u32>> {
        self.collect(Encoding::get_ids)
    }

    /// `attention_mask`: 1 for real tokens, 0 for padding.
    pub fn attention_mask(&self) -> Vec<Vec<u32>> {
        self.collect(Encoding::get_attention_mask)
    }

    /// `token_type_ids`: 0 for the first text, 1 for the second of a pair.
    pub fn token_type_ids(&self) -> Vec<Vec<u32>> {
        self.collect(Encoding::get_type_ids)
    }

    /// `special_tokens_mask`: 1 for special and padding tokens.
    pub fn special_tokens_mask(&self) -> Vec<Vec<u32>> {
        self.collect(Encoding::get_special_tokens_mask)
    }

    /// `offset_mapping`: `(start, end)` character offsets of each token in its text; `(0, 0)`
    /// for special and padding tokens.
    pub fn offset_mapping(&self) -> Vec<Vec<(usize, usize)>> {
        self.encodings
            .iter()
            .map(|e| e.get_offsets().to_vec())
            .collect()
    }

    /// The tokens (strings) of sequence `i`.
    pub fn tokens(&self, i: usize) -> &[String] {
        self.encodings[i].get_tokens()
    }

    /// HF's `word_ids(batch_index=i)`: the index of the word each token comes from, `None` for
    /// special and padding tokens. Used to align word-level labels in NER.
    pub fn word_ids(&self, i: usize) -> &[Option<u32>] {
        self.encodings[i].get_word_ids()
    }

    /// HF's `sequence_ids(i)`: 0 or 1 for tokens of the first or second text, `None` for
    /// special and padding tokens.
    pub fn sequence_ids(&self, i: usize) -> Vec<Option<usize>> {
        let e = &self.encodings[i];
        e.get_sequence_ids()
            .into_iter()
            .zip(e.get_special_tokens_mask())
            .map(|(s, &special)| if special == 1 { None } else { s })
            .collect()
    }

    /// The batch as burn `Int` tensors of shape `[batch, seq_len]` on `device`. All sequences
    /// must have one length: encode with padding (or a single text).
    pub fn to_tensors<B: Backend>(&self, device: &B::Device) -> Result<TensorBatch<B>> {
        let batch = self.encodings.len();
        let seq_len = self.encodings.first().map_or(0, Encoding::len);
        if let Some((i, e)) = self
            .encodings
            .iter()
            .enumerate()
            .find(|(_, e)| e.len() != seq_len)
        {
            return Err(TokenizerError::RaggedBatch {
                index: i,
                len: e.len(),
                first: seq_len,
            });
        }
        let tensor = |f: fn(&Encoding) -> &[u32]| {
            let flat: Vec<i64> = self
                .encodings
                .iter()
                .flat_map(|e| f(e).iter().map(|&v| v as i64))
                .collect();
            Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [batch, seq_len]), device)
        };
        Ok(TensorBatch {
            input_ids: tensor(Encoding::get_ids),
            attention_mask: tensor(Encoding::get_attention_mask),
            token_type_ids: tensor(Encoding::get_type_ids),
        })
    }
}

/// A padded batch as burn tensors, what an encoder model takes.
#[derive(Debug, Clone)]
pub struct TensorBatch<B: Backend> {
    /// Token ids, `[batch, seq_len]`.
    pub input_ids: Tensor<B, 2, Int>,
    /// 1 for real tokens, 0 for padding, `[batch, seq_len]`.
    pub attention_mask: Tensor<B, 2, Int>,
    /// Segment ids (0 / 1), `[batch, seq_len]`.
    pub token_type_ids: Tensor<B, 2, Int>,
}
