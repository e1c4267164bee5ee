//! Causal-LM fine-tuning data: alpaca-style instruction rows (`instruction`, `input`, `output`)
//! or plain text, tokenized into `input_ids`, `attention_mask` and `labels` (-100 where the loss
//! ignores a position) for `DataCollatorForTokenClassification` and a causal LM, which shifts
//! the labels itself (HF semantics).
//!
//! Two prompt formats for instruction rows ([`PromptFormat`]):
//!
//! - **Chat template** ([`format_instruction_chat`]): the user turn is `instruction` (plus `"\n"`
//!   and `input` when `input` is not empty), the assistant turn is `output`. The template renders
//!   the prompt (`[user]`, `add_generation_prompt=true`) and the full conversation (`[user,
//!   assistant]`). The full text is cut where it stops agreeing with the prompt text (normally
//!   the prompt's end: every template tested renders the prompt as a prefix of the
//!   conversation); the part before the cut and the part after it are encoded separately,
//!   without special tokens (the template writes them, as `apply_chat_template` encodes). So the
//!   prompt tokens are exactly the tokens generation starts from, they are a prefix of the
//!   example by construction, and the response is `output` followed by whatever the template
//!   closes the turn with (`<|im_end|>\n` for ChatML, `</s>` for Llama 2): that end-of-turn is
//!   trained, nothing else is appended.
//! - **Human / Assistant** ([`format_instruction_human_assistant`]): the recipe of the seed course
//!   (zyds transformers-code, Bloom on alpaca data), for tokenizers without a chat template.
//!
//! Both mask the prompt with -100 and truncate the joined example to `max_length` (keeping its
//! start). [`tokenize_instructions`] / [`tokenize_texts`] do this over a [`Dataset`].

use ember_datasets::arrow::array::{ArrayRef, Int64Builder, ListBuilder};
use ember_datasets::{Dataset, DatasetError, IGNORE_INDEX};
use ember_tokenizers::{
    AutoTokenizer, ChatMessage, ChatTemplateOptions, EncodeOptions, TokenizerError, Truncation,
};
use std::sync::Arc;

/// What can go wrong while formatting causal-LM data. Row numbers count from 0, as a JSON list or
/// `dataset[i]` does.
#[derive(Debug, thiserror::Error)]
pub enum CausalLmDataError {
    /// A row lacks a required field (`instruction`, `output`, the text column), or holds null.
    #[error("row {row}: `{field}` is missing (or null)")]
    MissingField {
        /// The row.
        row: usize,
        /// The field.
        field: String,
    },
    /// The Human / Assistant recipe appends `eos_token`, which this tokenizer does not have.
    #[error(
        "the tokenizer has no eos_token, which the Human/Assistant prompt format appends to \
         each output (set `eos_token` in tokenizer_config.json)"
    )]
    NoEosToken,
    /// Tokenizing (or rendering the chat template of) a row failed.
    #[error("row {row}: {source}")]
    Tokenizer {
        /// The row (0 for [`format_instruction`] and friends, which see one example).
        row: usize,
        /// What the tokenizer said.
        #[source]
        source: TokenizerError,
    },
    /// Reading the dataset's columns or building the tokenized one failed.
    #[error(transparent)]
    Dataset(#[from] DatasetError),
}

/// This module's result type.
pub type Result<T, E = CausalLmDataError> = std::result::Result<T, E>;

/// One alpaca-style instruction row.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InstructionExample {
    /// The task (`instruction`).
    pub instruction: String,
    /// Optional context for the task (`input`; empty when there is none).
    pub input: String,
    /// The answer to learn (`output`).
    pub output: String,
}

impl InstructionExample {
    /// An example from its three fields.
    pub fn new(
        instruction: impl Into<String>,
        input: impl Into<String>,
        output: impl Into<String>,
    ) -> Self {
        Self {
            instruction: instruction.into(),
            input: input.into(),
            output: output.into(),
        }
    }

    /// The user turn of the chat-template format: `instruction`, then `"\n"` and `input` when
    /// `input` is not empty.
    pub fn user_turn(&self) -> String {
        if self.input.is_empty() {
            self.instruction.clone()
        } else {
            format!("{}\n{}", self.instruction, self.input)
        }
    }
}

/// One tokenized causal-LM example: HF's `{"input_ids", "attention_mask", "labels"}` dict, the
/// three lists of the same length.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CausalLmFeatures {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// 1 for every token (padding comes later, from the collator).
    pub attention_mask: Vec<u32>,
    /// The id to predict at each position (the model shifts them), -100 on the prompt.
    pub labels: Vec<i64>,
}

impl CausalLmFeatures {
    /// The number of tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// True when there is no token.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// How many tokens the loss is computed on: labels other than -100 after the first position
    /// (the first token is never predicted). An example with none teaches nothing, e.g. when
    /// the prompt alone fills `max_length`.
    pub fn num_trained_tokens(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }

    /// Joins a prompt (labels -100) and a response (labels = its ids), then truncates all three
    /// lists to `max_length` (keeping the start), as the seed recipe does.
    fn from_parts(
        prompt: (Vec<u32>, Vec<u32>),
        response: (Vec<u32>, Vec<u32>),
        max_length: Option<usize>,
    ) -> Self {
        let (prompt_ids, prompt_mask) = prompt;
        let (response_ids, response_mask) = response;
        let mut labels = vec![IGNORE_INDEX; prompt_ids.len()];
        labels.extend(response_ids.iter().map(|&id| i64::from(id)));
        let mut input_ids = prompt_ids;
        input_ids.extend(response_ids);
        let mut attention_mask = prompt_mask;
        attention_mask.extend(response_mask);
        let mut features = Self {
            input_ids,
            attention_mask,
            labels,
        };
        if let Some(max) = max_length {
            features.input_ids.truncate(max);
            features.attention_mask.truncate(max);
            features.labels.truncate(max);
        }
        features
    }
}

/// How instruction rows become a prompt and a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PromptFormat {
    /// The chat template when the tokenizer has a default one, else Human / Assistant.
    #[default]
    Auto,
    /// The tokenizer's default chat template ([`format_instruction_chat`]).
    ChatTemplate,
    /// The seed course's `Human: ... \n\nAssistant: ` recipe
    /// ([`format_instruction_human_assistant`]).
    HumanAssistant,
}

impl PromptFormat {
    /// The format `Auto` stands for with `tokenizer`; other formats are returned as they are.
    pub fn resolve(self, tokenizer: &AutoTokenizer) -> Self {
        match self {
            Self::Auto if tokenizer.chat_template().is_some() => Self::ChatTemplate,
            Self::Auto => Self::HumanAssistant,
            other => other,
        }
    }
}

/// Options of [`format_instruction`] and [`tokenize_instructions`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CausalLmFormatOptions {
    /// Truncate each joined example to this many tokens (`None`: no limit).
    pub max_length: Option<usize>,
    /// The prompt format; default [`PromptFormat::Auto`].
    pub prompt_format: PromptFormat,
}

impl CausalLmFormatOptions {
    /// Sets `max_length`.
    pub fn max_length(mut self, max_length: usize) -> Self {
        self.max_length = Some(max_length);
        self
    }

    /// Sets `prompt_format`.
    pub fn prompt_format(mut self, format: PromptFormat) -> Self {
        self.prompt_format = format;
        self
    }
}

/// Python's `str.strip()`: Unicode whitespace and the separators `\x1c`..`\x1f`, both ends.
fn py_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\x1c'..='\x1f').contains(&c))
}

/// `tokenizer(text)` (special tokens added as the tokenizer adds them, no truncation): ids and
/// attention mask.
fn tokenizer_call(tokenizer: &AutoTokenizer, text: &str) -> Result<(Vec<u32>, Vec<u32>)> {
    let options = EncodeOptions::default().return_offsets_mapping(false);
    let encoding = tokenizer
        .encode_one(text, None, &options)
        .map_err(|source| CausalLmDataError::Tokenizer { row: 0, source })?;
    Ok((
        encoding.get_ids().to_vec(),
        encoding.get_attention_mask().to_vec(),
    ))
}

/// Ids of template-rendered text: no special tokens added (the template wrote them), as
/// `apply_chat_template(tokenize=True)` encodes.
fn template_ids(tokenizer: &AutoTokenizer, text: &str) -> Result<(Vec<u32>, Vec<u32>)> {
    let ids = tokenizer
        .encode(text, None, false)
        .map_err(|source| CausalLmDataError::Tokenizer { row: 0, source })?;
    let mask = vec![1; ids.len()];
    Ok((ids, mask))
}

/// The seed course's recipe (zyds transformers-code, Bloom on alpaca data), exactly:
///
/// ```python
/// instruction = tokenizer("\n".join(["Human: " + example["instruction"], example["input"]]).strip() + "\n\nAssistant: ")
/// response = tokenizer(example["output"] + tokenizer.eos_token)
/// input_ids = instruction["input_ids"] + response["input_ids"]
/// attention_mask = instruction["attention_mask"] + response["attention_mask"]
/// labels = [-100] * len(instruction["input_ids"]) + response["input_ids"]
/// if len(input_ids) > MAX_LENGTH: truncate all three to MAX_LENGTH
/// ```
///
/// Both calls add the tokenizer's special tokens as `tokenizer(text)` does (none for Bloom and
/// GPT-2; a tokenizer that adds a BOS adds it to the response too, as in Python).
///
/// ```
/// use ember::data::{format_instruction_human_assistant, InstructionExample};
/// let mut tokenizer = ember::tokenizers::demo::demo_tokenizer()?;
/// tokenizer.set_special_token("eos_token", "[SEP]")?; // a BERT vocabulary has no eos
/// let example = InstructionExample::new("Name a colour.", "", "Blue.");
/// let f = format_instruction_human_assistant(&tokenizer, &example, Some(64))?;
/// assert_eq!(f.len(), f.labels.len());
/// assert_eq!(f.labels[0], -100); // the prompt is not trained on
/// assert_eq!(*f.labels.last().unwrap(), i64::from(f.input_ids[f.len() - 1]));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// Errors: [`CausalLmDataError::NoEosToken`] when the tokenizer has no `eos_token`, and
/// [`CausalLmDataError::Tokenizer`].
pub fn format_instruction_human_assistant(
    tokenizer: &AutoTokenizer,
    example: &InstructionExample,
    max_length: Option<usize>,
) -> Result<CausalLmFeatures> {
    let eos = tokenizer
        .special_tokens()
        .eos_token
        .as_deref()
        .ok_or(CausalLmDataError::NoEosToken)?;
    let joined = format!("Human: {}\n{}", example.instruction, example.input);
    let prompt = format!("{}\n\nAssistant: ", py_strip(&joined));
    let prompt = tokenizer_call(tokenizer, &prompt)?;
    let response = tokenizer_call(tokenizer, &format!("{}{eos}", example.output))?;
    Ok(CausalLmFeatures::from_parts(prompt, response, max_length))
}

/// The longest common prefix of `a` and `b`, in bytes, ending on a character boundary.
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, ca), cb)| ca != cb)
        .map_or_else(|| a.len().min(b.len()), |((i, _), _)| i)
}

/// The chat-template format: the user turn is [`InstructionExample::user_turn`], the assistant
/// turn is `output`; the prompt is the template over `[user]` with `add_generation_prompt=true`,
/// and the labels are the tokens the template renders after it for the full conversation
/// (`output` and the template's end of turn), -100 on the prompt. See the [module
/// documentation](self) for how the two texts are tokenized so that the prompt tokens are a
/// prefix; the joined example is truncated to `max_length`.
///
/// Errors: [`CausalLmDataError::Tokenizer`] when the tokenizer has no chat template or the
/// template fails.
pub fn format_instruction_chat(
    tokenizer: &AutoTokenizer,
    example: &InstructionExample,
    max_length: Option<usize>,
) -> Result<CausalLmFeatures> {
    let user = ChatMessage::user(example.user_turn());
    let render = |messages: &[ChatMessage], generation_prompt: bool| {
        tokenizer
            .apply_chat_template(
                messages,
                &ChatTemplateOptions::default().add_generation_prompt(generation_prompt),
            )
            .map_err(|source| CausalLmDataError::Tokenizer { row: 0, source })
    };
    let prompt = render(std::slice::from_ref(&user), true)?;
    let full = render(&[user, ChatMessage::assistant(&example.output)], false)?;
    // Normally the whole prompt; shorter only for a template that renders the start of the
    // assistant turn differently in the full conversation, whose differing part is then trained.
    let cut = common_prefix_len(&prompt, &full);
    let prompt = template_ids(tokenizer, &full[..cut])?;
    let response = template_ids(tokenizer, &full[cut..])?;
    Ok(CausalLmFeatures::from_parts(prompt, response, max_length))
}

/// One instruction row in the format `options` asks for ([`PromptFormat::Auto`]: the chat
/// template when the tokenizer has one, else the Human / Assistant recipe).
///
/// ```
/// use ember::data::{format_instruction, CausalLmFormatOptions, InstructionExample};
/// let mut tokenizer = ember::tokenizers::demo::demo_tokenizer()?;
/// tokenizer.set_chat_template(Some(
///     "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}\
///      {% if add_generation_prompt %}<|assistant|>{% endif %}",
/// ));
/// let example = InstructionExample::new("Is the room clean?", "", "Yes.");
/// let f = format_instruction(&tokenizer, &example, &CausalLmFormatOptions::default())?;
/// let prompt = tokenizer.apply_chat_template_ids(
///     &[ember::tokenizers::ChatMessage::user("Is the room clean?")],
///     &ember::tokenizers::ChatTemplateOptions::default().add_generation_prompt(true),
/// )?;
/// assert_eq!(&f.input_ids[..prompt.len()], &prompt[..]); // the prompt comes first
/// assert!(f.labels[..prompt.len()].iter().all(|&l| l == -100));
/// assert!(f.labels[prompt.len()..].iter().all(|&l| l != -100));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn format_instruction(
    tokenizer: &AutoTokenizer,
    example: &InstructionExample,
    options: &CausalLmFormatOptions,
) -> Result<CausalLmFeatures> {
    match options.prompt_format.resolve(tokenizer) {
        PromptFormat::ChatTemplate => {
            format_instruction_chat(tokenizer, example, options.max_length)
        }
        _ => format_instruction_human_assistant(tokenizer, example, options.max_length),
    }
}

/// Plain text for causal-LM training: `tokenizer(text, truncation=True, max_length=...)`, the
/// labels a copy of the ids (the whole text is trained on; the collator sets padding to -100).
pub fn format_text(
    tokenizer: &AutoTokenizer,
    text: &str,
    max_length: Option<usize>,
) -> Result<CausalLmFeatures> {
    let mut options = EncodeOptions::default().return_offsets_mapping(false);
    if let Some(max) = max_length {
        options = options.truncation(Truncation::LongestFirst).max_length(max);
    }
    let encoding = tokenizer
        .encode_one(text, None, &options)
        .map_err(|source| CausalLmDataError::Tokenizer { row: 0, source })?;
    let input_ids = encoding.get_ids().to_vec();
    Ok(CausalLmFeatures {
        labels: input_ids.iter().map(|&id| i64::from(id)).collect(),
        attention_mask: encoding.get_attention_mask().to_vec(),
        input_ids,
    })
}

/// A string column, with a [`CausalLmDataError::MissingField`] for the first null row when
/// `required` (an absent column is [`DatasetError::MissingColumn`]).
fn strings(ds: &Dataset, column: &str, required: bool) -> Result<Vec<String>> {
    ds.string_column(column)?
        .into_iter()
        .enumerate()
        .map(|(row, value)| match value {
            Some(v) => Ok(v),
            None if required => Err(CausalLmDataError::MissingField {
                row,
                field: column.to_owned(),
            }),
            None => Ok(String::new()),
        })
        .collect()
}

/// The rows of an alpaca-style dataset: `instruction` and `output` are required in every row
/// (a missing or null one is a [`CausalLmDataError::MissingField`] naming the row and the field;
/// an absent column a [`DatasetError::MissingColumn`]); `input` is optional (an absent column or
/// a null is empty). Other columns are ignored.
///
/// ```
/// use ember::data::instruction_examples;
/// use ember::datasets::Dataset;
/// use serde_json::json;
/// let ds = Dataset::from_json_rows(&[
///     json!({"instruction": "Add.", "input": "1 + 1", "output": "2"}),
///     json!({"instruction": "Say hi.", "output": "Hi!"}),
/// ])?;
/// let rows = instruction_examples(&ds)?;
/// assert_eq!(rows[1].input, "");
/// let ds = Dataset::from_json_rows(&[
///     json!({"instruction": "Add.", "output": "2"}),
///     json!({"instruction": "Say hi."}),
/// ])?;
/// let err = instruction_examples(&ds).unwrap_err().to_string();
/// assert_eq!(err, "row 1: `output` is missing (or null)");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn instruction_examples(ds: &Dataset) -> Result<Vec<InstructionExample>> {
    let instructions = strings(ds, "instruction", true)?;
    let outputs = strings(ds, "output", true)?;
    let inputs = if ds.column_names().iter().any(|c| c == "input") {
        strings(ds, "input", false)?
    } else {
        vec![String::new(); ds.num_rows()]
    };
    Ok(instructions
        .into_iter()
        .zip(inputs)
        .zip(outputs)
        .map(|((instruction, input), output)| InstructionExample {
            instruction,
            input,
            output,
        })
        .collect())
}

/// Puts a row number on the error of formatting one example.
fn at_row(row: usize) -> impl Fn(CausalLmDataError) -> CausalLmDataError {
    move |e| match e {
        CausalLmDataError::Tokenizer { source, .. } => CausalLmDataError::Tokenizer { row, source },
        other => other,
    }
}

/// `ds.map(process_func, remove_columns=ds.column_names)` for alpaca-style rows: a dataset of
/// `input_ids`, `attention_mask` and `labels`, one row per row of `ds` (see
/// [`instruction_examples`] for the columns read and [`format_instruction`] for the format).
pub fn tokenize_instructions(
    ds: &Dataset,
    tokenizer: &AutoTokenizer,
    options: &CausalLmFormatOptions,
) -> Result<Dataset> {
    let options = CausalLmFormatOptions {
        prompt_format: options.prompt_format.resolve(tokenizer),
        ..*options
    };
    let features = instruction_examples(ds)?
        .iter()
        .enumerate()
        .map(|(row, example)| format_instruction(tokenizer, example, &options).map_err(at_row(row)))
        .collect::<Result<Vec<_>>>()?;
    Ok(features_dataset(&features)?)
}

/// Plain text rows for causal-LM training ([`format_text`] on `text_column`): a dataset of
/// `input_ids`, `attention_mask` and `labels`. A null text is a
/// [`CausalLmDataError::MissingField`].
pub fn tokenize_texts(
    ds: &Dataset,
    tokenizer: &AutoTokenizer,
    text_column: &str,
    max_length: Option<usize>,
) -> Result<Dataset> {
    let features = strings(ds, text_column, true)?
        .iter()
        .enumerate()
        .map(|(row, text)| format_text(tokenizer, text, max_length).map_err(at_row(row)))
        .collect::<Result<Vec<_>>>()?;
    Ok(features_dataset(&features)?)
}

/// The examples as a [`Dataset`] with list-of-int64 columns `input_ids`, `attention_mask` and
/// `labels`, the rows a causal LM's collator reads.
pub fn features_dataset(features: &[CausalLmFeatures]) -> Result<Dataset, DatasetError> {
    fn column<T: Copy + Into<i64>>(rows: impl Iterator<Item = Vec<T>>) -> ArrayRef {
        let mut b = ListBuilder::new(Int64Builder::new());
        for row in rows {
            b.values()
                .append_slice(&row.into_iter().map(Into::into).collect::<Vec<i64>>());
            b.append(true);
        }
        Arc::new(b.finish())
    }
    Dataset::from_columns(vec![
        (
            "input_ids",
            column(features.iter().map(|f| f.input_ids.clone())),
        ),
        (
            "attention_mask",
            column(features.iter().map(|f| f.attention_mask.clone())),
        ),
        ("labels", column(features.iter().map(|f| f.labels.clone()))),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SPECIALS: [&str; 6] = [
        "<pad>",
        "<s>",
        "</s>",
        "<|im_start|>",
        "<|im_end|>",
        "<unk>",
    ];

    /// A character-level tokenizer (ids: `<pad>` 0, `<s>` 1, `</s>` 2, ..., `<unk>` 5, then one
    /// id per character), with `eos_token` `</s>` and, when asked, a ChatML-like template.
    fn tokenizer(chat: bool) -> AutoTokenizer {
        build_tokenizer(chat, true)
    }

    fn build_tokenizer(chat: bool, eos: bool) -> AutoTokenizer {
        let dir = tempfile::tempdir().unwrap();
        let chars: Vec<char> = " abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ:.!?\n,"
            .chars()
            .collect();
        let mut vocab = serde_json::Map::new();
        for (i, t) in SPECIALS.iter().enumerate() {
            vocab.insert((*t).into(), i.into());
        }
        for c in chars {
            let id = vocab.len();
            vocab.insert(c.to_string(), id.into());
        }
        let added: Vec<_> = SPECIALS
            .iter()
            .enumerate()
            .map(|(i, t)| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let pipeline = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
            "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
            "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": []}
        });
        std::fs::write(dir.path().join("tokenizer.json"), pipeline.to_string()).unwrap();
        let mut config = json!({"eos_token": "</s>", "pad_token": "<pad>", "bos_token": "<s>",
                                "unk_token": "<unk>"});
        if !eos {
            config.as_object_mut().unwrap().remove("eos_token");
        }
        if chat {
            config["chat_template"] = json!(
                "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n\
                 {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
            );
        }
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        AutoTokenizer::from_pretrained(dir.path()).unwrap()
    }

    fn ids(tok: &AutoTokenizer, text: &str) -> Vec<u32> {
        tok.encode(text, None, true).unwrap()
    }

    #[test]
    fn human_assistant_masks_the_prompt_and_appends_eos() {
        let tok = tokenizer(false);
        let ex = InstructionExample::new("Add.", "one plus one", "Two.");
        let f = format_instruction_human_assistant(&tok, &ex, None).unwrap();
        let prompt = ids(&tok, "Human: Add.\none plus one\n\nAssistant: ");
        let response = ids(&tok, "Two.</s>");
        assert_eq!(*response.last().unwrap(), 2, "eos appended as the token");
        assert_eq!(f.input_ids, [prompt.clone(), response.clone()].concat());
        assert_eq!(f.attention_mask, vec![1; f.len()]);
        let mut labels = vec![-100; prompt.len()];
        labels.extend(response.iter().map(|&i| i64::from(i)));
        assert_eq!(f.labels, labels);
        assert_eq!(f.num_trained_tokens(), response.len());
    }

    #[test]
    fn human_assistant_strips_an_empty_input_as_python_does() {
        let tok = tokenizer(false);
        // "\n".join(["Human: Hi.", ""]).strip() == "Human: Hi."
        let f = format_instruction_human_assistant(
            &tok,
            &InstructionExample::new("  Hi.", "", "Hello."),
            None,
        )
        .unwrap();
        let prompt = ids(&tok, "Human:   Hi.\n\nAssistant: ");
        assert_eq!(&f.input_ids[..prompt.len()], &prompt[..]);
        let f = format_instruction_human_assistant(
            &tok,
            &InstructionExample::new("Hi.", " \n", "Hello."),
            None,
        )
        .unwrap();
        let prompt = ids(&tok, "Human: Hi.\n\nAssistant: ");
        assert_eq!(&f.input_ids[..prompt.len()], &prompt[..]);
        assert_eq!(f.labels[prompt.len() - 1], -100);
        assert_ne!(f.labels[prompt.len()], -100);
    }

    #[test]
    fn truncation_cuts_all_three_lists_at_max_length() {
        let tok = tokenizer(false);
        let ex = InstructionExample::new("Spell.", "", "abcdefghijklmnopqrstuvwxyz");
        let full = format_instruction_human_assistant(&tok, &ex, None).unwrap();
        let cut = format_instruction_human_assistant(&tok, &ex, Some(30)).unwrap();
        assert!(full.len() > 30);
        assert_eq!(
            (
                cut.input_ids.len(),
                cut.attention_mask.len(),
                cut.labels.len()
            ),
            (30, 30, 30)
        );
        assert_eq!(cut.input_ids, full.input_ids[..30]);
        assert_eq!(cut.labels, full.labels[..30]);
        assert_ne!(*cut.labels.last().unwrap(), 2, "the eos went with the tail");
        // A prompt longer than max_length leaves nothing to learn.
        let short = format_instruction_human_assistant(&tok, &ex, Some(5)).unwrap();
        assert_eq!(short.labels, vec![-100; 5]);
        assert_eq!(short.num_trained_tokens(), 0);
        // Shorter examples are left as they are.
        assert_eq!(
            format_instruction_human_assistant(&tok, &ex, Some(1000)).unwrap(),
            full
        );
    }

    #[test]
    fn no_eos_token_is_an_error() {
        let tok = build_tokenizer(false, false);
        assert!(tok.special_tokens().eos_token.is_none());
        let err = format_instruction_human_assistant(&tok, &InstructionExample::default(), None)
            .unwrap_err();
        assert!(matches!(err, CausalLmDataError::NoEosToken), "{err}");
    }

    #[test]
    fn chat_template_prompt_is_the_generation_prompt_and_the_turn_end_is_trained() {
        let tok = tokenizer(true);
        let ex = InstructionExample::new("Add.", "one plus one", "Two.");
        assert_eq!(ex.user_turn(), "Add.\none plus one");
        let f = format_instruction(&tok, &ex, &CausalLmFormatOptions::default()).unwrap();
        let prompt = tok
            .apply_chat_template_ids(
                &[ChatMessage::user("Add.\none plus one")],
                &ChatTemplateOptions::default().add_generation_prompt(true),
            )
            .unwrap();
        let response = tok.encode("Two.<|im_end|>\n", None, false).unwrap();
        assert_eq!(f.input_ids, [prompt.clone(), response.clone()].concat());
        assert!(f.labels[..prompt.len()].iter().all(|&l| l == -100));
        assert_eq!(
            f.labels[prompt.len()..],
            response.iter().map(|&i| i64::from(i)).collect::<Vec<_>>()[..]
        );
        // The same example in the Human / Assistant format when asked for.
        let options = CausalLmFormatOptions::default().prompt_format(PromptFormat::HumanAssistant);
        let seed = format_instruction(&tok, &ex, &options).unwrap();
        assert_eq!(
            seed,
            format_instruction_human_assistant(&tok, &ex, None).unwrap()
        );
    }

    #[test]
    fn chat_template_without_a_template_is_an_error() {
        let tok = tokenizer(false);
        let err = format_instruction_chat(&tok, &InstructionExample::new("a", "", "b"), None)
            .unwrap_err();
        assert!(matches!(err, CausalLmDataError::Tokenizer { .. }), "{err}");
    }

    #[test]
    fn common_prefix_stops_on_a_char_boundary() {
        assert_eq!(common_prefix_len("abc", "abd"), 2);
        assert_eq!(common_prefix_len("ab", "abcd"), 2);
        assert_eq!(common_prefix_len("日本", "日文"), "日".len());
        assert_eq!(common_prefix_len("", "x"), 0);
    }

    #[test]
    fn plain_text_labels_are_the_ids() {
        let tok = tokenizer(false);
        let f = format_text(&tok, "hello there", Some(4)).unwrap();
        assert_eq!(f.input_ids, ids(&tok, "hell"));
        assert_eq!(
            f.labels,
            f.input_ids
                .iter()
                .map(|&i| i64::from(i))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn datasets_name_the_row_and_field_at_fault() {
        let tok = tokenizer(false);
        let ds = Dataset::from_json_rows(&[
            json!({"instruction": "a", "input": "b", "output": "c"}),
            json!({"instruction": "d", "input": null, "output": "e"}),
        ])
        .unwrap();
        let out = tokenize_instructions(&ds, &tok, &CausalLmFormatOptions::default()).unwrap();
        assert_eq!(
            out.column_names(),
            ["input_ids", "attention_mask", "labels"]
        );
        let rows = ember_datasets::ExampleDataset::new(&out).unwrap();
        let second =
            format_instruction_human_assistant(&tok, &InstructionExample::new("d", "", "e"), None)
                .unwrap();
        assert_eq!(
            rows.get(1).unwrap().labels,
            Some(ember_datasets::Label::Tokens(second.labels))
        );

        let missing = Dataset::from_json_rows(&[
            json!({"instruction": "a", "output": "c"}),
            json!({"output": "e"}),
        ])
        .unwrap();
        let err =
            tokenize_instructions(&missing, &tok, &CausalLmFormatOptions::default()).unwrap_err();
        assert_eq!(err.to_string(), "row 1: `instruction` is missing (or null)");
        let no_output = Dataset::from_json_rows(&[json!({"instruction": "a"})]).unwrap();
        let err = instruction_examples(&no_output).unwrap_err();
        assert!(err.to_string().contains("output"), "{err}");

        let texts = Dataset::from_json_rows(&[json!({"t": "ab"}), json!({"t": null})]).unwrap();
        let err = tokenize_texts(&texts, &tok, "t", None).unwrap_err();
        assert_eq!(err.to_string(), "row 1: `t` is missing (or null)");
    }

    /// Real rows of `../shared/data/sft/alpaca_zh_demo.json` (skipped when absent).
    #[test]
    fn real_alpaca_zh_rows_format() {
        let Some(path) = ember_testkit::shared("data/sft/alpaca_zh_demo.json") else {
            return;
        };
        let ds = ember_datasets::load_dataset_split("json", path, "train").unwrap();
        let ds = ds.select(&[0, 1, 2, 3, 4]).unwrap();
        let tok = tokenizer(false);
        let rows = instruction_examples(&ds).unwrap();
        for (row, example) in rows.iter().enumerate() {
            assert!(!example.instruction.is_empty() && !example.output.is_empty());
            let f = format_instruction_human_assistant(&tok, example, Some(256)).unwrap();
            assert!(f.len() <= 256, "row {row}");
            assert_eq!(f.labels[0], -100, "row {row}");
            assert!(f.num_trained_tokens() > 0, "row {row}");
        }
        let chat = tokenizer(true);
        let out =
            tokenize_instructions(&ds, &chat, &CausalLmFormatOptions::default().max_length(64))
                .unwrap();
        assert_eq!(out.num_rows(), 5);
    }
}
