//! Glue between tokenizers and datasets: the `dataset.map(tokenize, batched=True)` step, and
//! causal-LM fine-tuning data ([`causal_lm`]: instruction rows or plain text with labels).

use ember_datasets::arrow::array::{ArrayRef, Int64Builder, ListBuilder};
use ember_datasets::{Dataset, DatasetError};
use ember_tokenizers::{BatchEncoding, EncodeOptions};
use std::sync::Arc;

pub mod causal_lm;
pub use causal_lm::{
    features_dataset, format_instruction, format_instruction_chat,
    format_instruction_human_assistant, format_text, instruction_examples, tokenize_instructions,
    tokenize_texts, CausalLmDataError, CausalLmFeatures, CausalLmFormatOptions, InstructionExample,
    PromptFormat,
};

/// The columns HF's tokenizer call adds to a batch: `input_ids`, `token_type_ids`,
/// `attention_mask`, as Arrow list-of-int64 columns.
pub fn encoding_columns(batch: &BatchEncoding) -> Vec<(String, ArrayRef)> {
    let column = |rows: Vec<Vec<u32>>| -> ArrayRef {
        let mut b = ListBuilder::new(Int64Builder::new());
        for row in rows {
            b.values()
                .append_slice(&row.into_iter().map(i64::from).collect::<Vec<_>>());
            b.append(true);
        }
        Arc::new(b.finish())
    };
    vec![
        ("input_ids".into(), column(batch.input_ids())),
        ("token_type_ids".into(), column(batch.token_type_ids())),
        ("attention_mask".into(), column(batch.attention_mask())),
    ]
}

/// `ds.map(lambda b: tok(b[text_column], **options), batched=True, batch_size=...)`: adds the
/// tokenizer's columns to every row. A null text is encoded as an empty string (filter nulls
/// first to drop them, as in Python).
pub fn tokenize_map(
    ds: &Dataset,
    tokenizer: &ember_tokenizers::AutoTokenizer,
    text_column: &str,
    options: &EncodeOptions,
    batch_size: usize,
    remove_columns: &[&str],
) -> Result<Dataset, DatasetError> {
    ds.map_batched(batch_size, remove_columns, |batch| {
        let texts: Vec<String> = batch
            .string_column(text_column)?
            .into_iter()
            .map(Option::unwrap_or_default)
            .collect();
        let encoded = tokenizer
            .batch_encode(&texts, options)
            .map_err(|e| DatasetError::Shape(format!("tokenizing column `{text_column}`: {e}")))?;
        Ok(encoding_columns(&encoded))
    })
}

/// A tokenizer's tensors as an encoder's input (`model(**inputs)` in Python): ids, attention
/// mask and token type ids.
pub fn encoder_input<B: burn::tensor::backend::Backend>(
    batch: ember_tokenizers::TensorBatch<B>,
) -> ember_models::EncoderInput<B> {
    ember_models::EncoderInput::new(batch.input_ids)
        .with_attention_mask(batch.attention_mask)
        .with_token_type_ids(batch.token_type_ids)
}

/// HF's `tokenize_and_align_labels` for NER, as a batched map over a CoNLL dataset (`tokens`,
/// `ner_tags`): each sentence is encoded with `is_split_into_words=True`, and `labels` gives
/// each word's tag to its first sub-token and -100 to the other sub-tokens and to the special
/// tokens. Removes `tokens` and `ner_tags`.
pub fn tokenize_and_align_labels(
    ds: &Dataset,
    tokenizer: &ember_tokenizers::AutoTokenizer,
    options: &EncodeOptions,
    batch_size: usize,
) -> Result<Dataset, DatasetError> {
    ds.map_batched(batch_size, &["tokens", "ner_tags"], |batch| {
        let as_list = |v: serde_json::Value, column: &str| match v {
            serde_json::Value::Array(items) => Ok(items),
            other => Err(DatasetError::Shape(format!(
                "column `{column}` holds {other}, not a list"
            ))),
        };
        let words: Vec<Vec<String>> = batch
            .column_values("tokens")?
            .into_iter()
            .map(|v| {
                Ok(as_list(v, "tokens")?
                    .into_iter()
                    .map(|w| w.as_str().unwrap_or_default().to_owned())
                    .collect())
            })
            .collect::<Result<_, DatasetError>>()?;
        let tags: Vec<Vec<i64>> = batch
            .column_values("ner_tags")?
            .into_iter()
            .map(|v| {
                Ok(as_list(v, "ner_tags")?
                    .into_iter()
                    .map(|t| t.as_i64().unwrap_or(-100))
                    .collect())
            })
            .collect::<Result<_, DatasetError>>()?;
        let encoded = tokenizer
            .batch_encode_words(&words, options)
            .map_err(|e| DatasetError::Shape(format!("tokenizing column `tokens`: {e}")))?;
        let mut labels = ListBuilder::new(Int64Builder::new());
        for (i, sentence_tags) in tags.iter().enumerate() {
            let mut previous = None;
            let row: Vec<i64> = encoded
                .word_ids(i)
                .iter()
                .map(|word| {
                    let label = match word {
                        Some(w) if *word != previous => {
                            sentence_tags.get(*w as usize).copied().unwrap_or(-100)
                        }
                        _ => -100,
                    };
                    previous = *word;
                    label
                })
                .collect();
            labels.values().append_slice(&row);
            labels.append(true);
        }
        let mut columns = encoding_columns(&encoded);
        columns.push(("labels".into(), Arc::new(labels.finish()) as ArrayRef));
        Ok(columns)
    })
}
