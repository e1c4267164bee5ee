//! Data collators: HF `DataCollatorWithPadding` and `DataCollatorForTokenClassification` (the
//! language-modeling one is in `language_modeling.rs`), the [`Example`] rows they take (read from
//! a tokenized [`Dataset`] by [`ExampleDataset`]) and the padded [`Batch`] of burn tensors they
//! make.

use crate::dataset::Dataset;
use crate::error::{DatasetError, Result};
use crate::language_modeling::DataCollatorForLanguageModeling;
use arrow::array::{Array, AsArray, Int64Array, ListArray};
use arrow::compute;
use arrow::datatypes::{DataType, Field, Int64Type};
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use std::sync::Arc;

/// The label HF ignores in the loss (`CrossEntropyLoss(ignore_index=-100)`): the default
/// `label_pad_token_id` of `DataCollatorForTokenClassification` and the label of padding in
/// `DataCollatorForLanguageModeling`.
pub const IGNORE_INDEX: i64 = -100;

/// The label of one [`Example`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Label {
    /// One class id for the whole sequence (sequence classification: an integer `label` column).
    Sequence(i64),
    /// One class id per token (token classification: a list `labels` column; -100 = ignored).
    Tokens(Vec<i64>),
}

/// One tokenized row, what a collator takes: HF's feature dict (`input_ids`, `attention_mask`,
/// `token_type_ids`, `labels`).
///
/// ```
/// use ember_datasets::{Example, Label};
/// let ex = Example::new(vec![101, 7592, 102]).with_label(1);
/// assert_eq!(ex.labels, Some(Label::Sequence(1)));
/// assert!(ex.attention_mask.is_none());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Example {
    /// Token ids.
    pub input_ids: Vec<i64>,
    /// 1 for tokens to attend to, 0 for padding; `None` means all ones (the collator builds it).
    pub attention_mask: Option<Vec<i64>>,
    /// Segment ids (0 / 1), as long as `input_ids`.
    pub token_type_ids: Option<Vec<i64>>,
    /// The label(s), if any.
    pub labels: Option<Label>,
    /// 1 for special tokens (`[CLS]`, `[SEP]`, ...), 0 for the others, as long as `input_ids`:
    /// what the tokenizer writes with `return_special_tokens_mask=True`. Only the masked-LM
    /// collator reads it (positions with 1 are never masked); the others ignore it.
    pub special_tokens_mask: Option<Vec<i64>>,
}

impl Example {
    /// An example with only `input_ids`.
    pub fn new(input_ids: Vec<i64>) -> Self {
        Self {
            input_ids,
            ..Self::default()
        }
    }

    /// Sets `attention_mask`.
    pub fn with_attention_mask(mut self, attention_mask: Vec<i64>) -> Self {
        self.attention_mask = Some(attention_mask);
        self
    }

    /// Sets `token_type_ids`.
    pub fn with_token_type_ids(mut self, token_type_ids: Vec<i64>) -> Self {
        self.token_type_ids = Some(token_type_ids);
        self
    }

    /// Sets one label for the sequence ([`Label::Sequence`]).
    pub fn with_label(mut self, label: i64) -> Self {
        self.labels = Some(Label::Sequence(label));
        self
    }

    /// Sets one label per token ([`Label::Tokens`]).
    pub fn with_token_labels(mut self, labels: Vec<i64>) -> Self {
        self.labels = Some(Label::Tokens(labels));
        self
    }

    /// Sets `special_tokens_mask`.
    pub fn with_special_tokens_mask(mut self, special_tokens_mask: Vec<i64>) -> Self {
        self.special_tokens_mask = Some(special_tokens_mask);
        self
    }
}

/// The label column of an [`ExampleDataset`].
#[derive(Debug, Clone)]
enum LabelColumn {
    Sequence(Int64Array),
    Tokens(ListArray),
}

/// The rows of a tokenized [`Dataset`] as [`Example`]s, read straight from its Arrow columns
/// (no copy of the table): what `torch.utils.data.Dataset.__getitem__` returns for a HF dataset
/// after `set_format("torch")`.
///
/// Columns read: `input_ids` (list of integers, required), `attention_mask`, `token_type_ids`
/// and `special_tokens_mask` (lists of integers, optional), and the first of `labels`, `label`, `label_ids` that exists
/// (HF collators rename `label` and `label_ids` to `labels`): an integer column gives
/// [`Label::Sequence`], a list column [`Label::Tokens`]. Other columns (`text`, ...) are ignored.
/// Lists may hold any integer type (Int32, Int64, ...) and be `List`, `LargeList` or
/// `FixedSizeList`.
///
/// Every row is checked once in [`ExampleDataset::new`], so [`ExampleDataset::get`] cannot fail
/// on a row in range. A null `attention_mask`, `token_type_ids`, `special_tokens_mask` or label in
/// a row means that row has none.
///
/// ```
/// use ember_datasets::{Dataset, ExampleDataset, Example};
/// use serde_json::json;
/// let ds = Dataset::from_json_rows(&[json!({"input_ids": [101, 102], "label": 0})])?;
/// let rows = ExampleDataset::new(&ds)?;
/// assert_eq!(rows.get(0), Some(Example::new(vec![101, 102]).with_label(0)));
/// # Ok::<(), ember_datasets::DatasetError>(())
/// ```
#[derive(Debug, Clone)]
pub struct ExampleDataset {
    input_ids: ListArray,
    attention_mask: Option<ListArray>,
    token_type_ids: Option<ListArray>,
    special_tokens_mask: Option<ListArray>,
    labels: Option<(String, LabelColumn)>,
}

/// The label columns looked for, in this order.
const LABEL_COLUMNS: [&str; 3] = ["labels", "label", "label_ids"];

impl ExampleDataset {
    /// Reads and checks the columns of `dataset`.
    ///
    /// Errors: [`DatasetError::MissingColumn`] without `input_ids`; [`DatasetError::ColumnType`]
    /// when a column is not a list of integers (or, for the label, an integer); and
    /// [`DatasetError::Shape`] for a null `input_ids` row, a null inside a list, or an
    /// `attention_mask` / `token_type_ids` / `special_tokens_mask` of another length than its
    /// `input_ids`.
    pub fn new(dataset: &Dataset) -> Result<Self> {
        let input_ids = int_lists(dataset, "input_ids")?;
        let names = dataset.column_names();
        let optional = |name: &str| -> Result<Option<ListArray>> {
            if names.iter().any(|n| n == name) {
                int_lists(dataset, name).map(Some)
            } else {
                Ok(None)
            }
        };
        let attention_mask = optional("attention_mask")?;
        let token_type_ids = optional("token_type_ids")?;
        let special_tokens_mask = optional("special_tokens_mask")?;
        let labels = match LABEL_COLUMNS.iter().find(|c| names.iter().any(|n| n == *c)) {
            None => None,
            Some(&name) => Some((name.to_owned(), label_column(dataset, name)?)),
        };

        for row in 0..input_ids.len() {
            if input_ids.is_null(row) {
                return Err(DatasetError::Shape(format!(
                    "row {row}: `input_ids` is null"
                )));
            }
            check_no_null_values(&input_ids, "input_ids", row)?;
            let len = list_len(&input_ids, row);
            for (name, column) in [
                ("attention_mask", &attention_mask),
                ("token_type_ids", &token_type_ids),
                ("special_tokens_mask", &special_tokens_mask),
            ] {
                let Some(column) = column else { continue };
                if column.is_null(row) {
                    continue;
                }
                check_no_null_values(column, name, row)?;
                let other = list_len(column, row);
                if other != len {
                    return Err(DatasetError::Shape(format!(
                        "row {row}: `{name}` has {other} values but `input_ids` has {len}"
                    )));
                }
            }
            if let Some((name, LabelColumn::Tokens(column))) = &labels {
                if column.is_valid(row) {
                    check_no_null_values(column, name, row)?;
                }
            }
        }
        Ok(Self {
            input_ids,
            attention_mask,
            token_type_ids,
            special_tokens_mask,
            labels,
        })
    }

    /// The number of rows.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// True when there is no row.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The column the labels come from (`labels`, `label` or `label_ids`), if any.
    pub fn label_column(&self) -> Option<&str> {
        self.labels.as_ref().map(|(n, _)| n.as_str())
    }

    /// Row `index` as an [`Example`]; `None` past the end (the contract of burn's
    /// `Dataset::get`).
    pub fn get(&self, index: usize) -> Option<Example> {
        if index >= self.len() {
            return None;
        }
        let optional = |column: &Option<ListArray>| {
            column
                .as_ref()
                .filter(|c| c.is_valid(index))
                .map(|c| list_values(c, index))
        };
        let labels = match &self.labels {
            None => None,
            Some((_, LabelColumn::Sequence(a))) => {
                a.is_valid(index).then(|| Label::Sequence(a.value(index)))
            }
            Some((_, LabelColumn::Tokens(l))) => l
                .is_valid(index)
                .then(|| Label::Tokens(list_values(l, index))),
        };
        Some(Example {
            input_ids: list_values(&self.input_ids, index),
            attention_mask: optional(&self.attention_mask),
            token_type_ids: optional(&self.token_type_ids),
            labels,
            special_tokens_mask: optional(&self.special_tokens_mask),
        })
    }

    /// Row `index` as an [`Example`]; [`DatasetError::IndexOutOfRange`] past the end.
    pub fn example(&self, index: usize) -> Result<Example> {
        self.get(index).ok_or(DatasetError::IndexOutOfRange {
            index,
            len: self.len(),
        })
    }

    /// The examples at `indices`, in that order.
    pub fn examples(&self, indices: &[usize]) -> Result<Vec<Example>> {
        indices.iter().map(|&i| self.example(i)).collect()
    }

    /// Every row, in order.
    pub fn iter(&self) -> impl Iterator<Item = Example> + '_ {
        (0..self.len()).filter_map(|i| self.get(i))
    }
}

/// The Arrow type every integer-list column is cast to.
fn list_of_i64() -> DataType {
    DataType::List(Arc::new(Field::new_list_field(DataType::Int64, true)))
}

/// A column of lists of integers, cast to `List(Int64)`.
fn int_lists(dataset: &Dataset, name: &str) -> Result<ListArray> {
    let column = dataset.column(name)?;
    let inner_ok = match column.data_type() {
        DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => {
            f.data_type().is_integer() || f.data_type() == &DataType::Null
        }
        _ => false,
    };
    if !inner_ok {
        return Err(DatasetError::ColumnType {
            column: name.to_owned(),
            found: column.data_type().to_string(),
            expected: "a list of integers".into(),
        });
    }
    let cast = compute::cast(&column, &list_of_i64())?;
    Ok(cast.as_list::<i32>().clone())
}

/// A label column: integers (one per sequence) or lists of integers (one per token).
fn label_column(dataset: &Dataset, name: &str) -> Result<LabelColumn> {
    let column = dataset.column(name)?;
    if column.data_type().is_integer() {
        let cast = compute::cast(&column, &DataType::Int64)?;
        return Ok(LabelColumn::Sequence(
            cast.as_primitive::<Int64Type>().clone(),
        ));
    }
    int_lists(dataset, name)
        .map(LabelColumn::Tokens)
        .map_err(|e| match e {
            DatasetError::ColumnType { column, found, .. } => DatasetError::ColumnType {
                column,
                found,
                expected: "an integer or a list of integers".into(),
            },
            other => other,
        })
}

fn list_range(list: &ListArray, row: usize) -> (usize, usize) {
    let offsets = list.value_offsets();
    (offsets[row] as usize, offsets[row + 1] as usize)
}

fn list_len(list: &ListArray, row: usize) -> usize {
    let (start, end) = list_range(list, row);
    end - start
}

fn list_values(list: &ListArray, row: usize) -> Vec<i64> {
    let (start, end) = list_range(list, row);
    list.values().as_primitive::<Int64Type>().values()[start..end].to_vec()
}

fn check_no_null_values(list: &ListArray, name: &str, row: usize) -> Result<()> {
    let values = list.values();
    if values.null_count() == 0 {
        return Ok(());
    }
    let (start, end) = list_range(list, row);
    if values.slice(start, end - start).null_count() > 0 {
        return Err(DatasetError::Shape(format!(
            "row {row}: `{name}` holds a null"
        )));
    }
    Ok(())
}

/// Which side padding goes on: HF's `padding_side`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PaddingSide {
    /// `"right"`: padding after the tokens (HF default; encoders).
    #[default]
    Right,
    /// `"left"`: padding before the tokens (decoders generating after the prompt).
    Left,
}

/// The labels of a [`PaddedBatch`], row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PaddedLabels {
    /// One label per sequence, `batch_size` values.
    Sequence(Vec<i64>),
    /// One label per token, `batch_size * seq_len` values.
    Tokens(Vec<i64>),
}

/// A padded batch as plain row-major vectors, before it becomes burn tensors
/// ([`PaddedBatch::to_tensors`]). Every sequence field holds `batch_size * seq_len` values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaddedBatch {
    /// Number of examples.
    pub batch_size: usize,
    /// Padded sequence length.
    pub seq_len: usize,
    /// Token ids, padding = `pad_token_id`.
    pub input_ids: Vec<i64>,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Vec<i64>,
    /// Segment ids padded with 0, when the examples have them.
    pub token_type_ids: Option<Vec<i64>>,
    /// The labels, when the examples have them (or the collator makes them).
    pub labels: Option<PaddedLabels>,
}

impl PaddedBatch {
    /// The batch as burn `Int` tensors on `device`.
    pub fn to_tensors<B: Backend>(&self, device: &B::Device) -> Batch<B> {
        let shape = [self.batch_size, self.seq_len];
        let matrix = |values: &[i64]| {
            Tensor::<B, 2, Int>::from_data(TensorData::new(values.to_vec(), shape), device)
        };
        Batch {
            input_ids: matrix(&self.input_ids),
            attention_mask: matrix(&self.attention_mask),
            token_type_ids: self.token_type_ids.as_deref().map(matrix),
            labels: self.labels.as_ref().map(|l| match l {
                PaddedLabels::Sequence(v) => BatchLabels::Sequence(Tensor::<B, 1, Int>::from_data(
                    TensorData::new(v.clone(), [self.batch_size]),
                    device,
                )),
                PaddedLabels::Tokens(v) => BatchLabels::Tokens(matrix(v)),
            }),
        }
    }
}

/// The labels of a [`Batch`].
#[derive(Debug, Clone)]
pub enum BatchLabels<B: Backend> {
    /// One class id per sequence, `[batch]` (sequence classification).
    Sequence(Tensor<B, 1, Int>),
    /// One class id per token, `[batch, seq_len]`, -100 where ignored (token classification,
    /// language modeling).
    Tokens(Tensor<B, 2, Int>),
}

/// A collated batch as burn tensors: HF's `BatchEncoding` with `return_tensors="pt"`, what a
/// model's forward takes.
#[derive(Debug, Clone)]
pub struct Batch<B: Backend> {
    /// Token ids, `[batch, seq_len]`.
    pub input_ids: Tensor<B, 2, Int>,
    /// 1 for real tokens, 0 for padding, `[batch, seq_len]`.
    pub attention_mask: Tensor<B, 2, Int>,
    /// Segment ids, `[batch, seq_len]`, when the examples have them.
    pub token_type_ids: Option<Tensor<B, 2, Int>>,
    /// The labels: `[batch]` for sequence labels, `[batch, seq_len]` for token labels.
    pub labels: Option<BatchLabels<B>>,
}

impl<B: Backend> Batch<B> {
    /// The number of examples.
    pub fn batch_size(&self) -> usize {
        self.input_ids.dims()[0]
    }

    /// The padded sequence length.
    pub fn seq_len(&self) -> usize {
        self.input_ids.dims()[1]
    }
}

/// Makes one batch of examples: HF's `data_collator` argument of the `Trainer` and
/// `collate_fn` of the torch `DataLoader`.
///
/// Implementors write [`Collator::pad`]; [`Collator::collate`] turns its output into tensors.
pub trait Collator: Send + Sync {
    /// Pads `rows` into one batch of plain vectors.
    fn pad(&self, rows: &[Example]) -> Result<PaddedBatch>;

    /// Pads `rows` into one batch of burn tensors on `device`.
    fn collate<B: Backend>(&self, rows: &[Example], device: &B::Device) -> Result<Batch<B>>
    where
        Self: Sized,
    {
        Ok(self.pad(rows)?.to_tensors(device))
    }
}

impl<C: Collator + ?Sized> Collator for Box<C> {
    fn pad(&self, rows: &[Example]) -> Result<PaddedBatch> {
        (**self).pad(rows)
    }
}

impl<C: Collator + ?Sized> Collator for Arc<C> {
    fn pad(&self, rows: &[Example]) -> Result<PaddedBatch> {
        (**self).pad(rows)
    }
}

/// Pads `values` to `len` with `pad` on `side`.
pub(crate) fn pad_to(values: &[i64], len: usize, pad: i64, side: PaddingSide, out: &mut Vec<i64>) {
    let fill = len.saturating_sub(values.len());
    match side {
        PaddingSide::Right => {
            out.extend_from_slice(values);
            out.extend(std::iter::repeat_n(pad, fill));
        }
        PaddingSide::Left => {
            out.extend(std::iter::repeat_n(pad, fill));
            out.extend_from_slice(values);
        }
    }
}

/// HF `tokenizer.pad(features, padding="longest", pad_to_multiple_of=...)`: the inputs of a
/// batch padded to its longest sequence, without labels.
pub(crate) fn pad_inputs(
    rows: &[Example],
    pad_token_id: i64,
    side: PaddingSide,
    pad_to_multiple_of: Option<usize>,
) -> Result<PaddedBatch> {
    if rows.is_empty() {
        return Err(DatasetError::InvalidArgument {
            name: "features",
            value: "[]".into(),
            message: "a batch needs at least one example".into(),
        });
    }
    let mut seq_len = rows.iter().map(|r| r.input_ids.len()).max().unwrap_or(0);
    match pad_to_multiple_of {
        Some(0) => {
            return Err(DatasetError::InvalidArgument {
                name: "pad_to_multiple_of",
                value: "0".into(),
                message: "must be at least 1".into(),
            })
        }
        Some(m) if seq_len % m != 0 => seq_len = (seq_len / m + 1) * m,
        _ => {}
    }
    let with_types = rows[0].token_type_ids.is_some();
    let size = rows.len() * seq_len;
    let mut input_ids = Vec::with_capacity(size);
    let mut attention_mask = Vec::with_capacity(size);
    let mut token_type_ids = Vec::with_capacity(if with_types { size } else { 0 });
    for (i, row) in rows.iter().enumerate() {
        let len = row.input_ids.len();
        pad_to(&row.input_ids, seq_len, pad_token_id, side, &mut input_ids);
        match &row.attention_mask {
            Some(mask) if mask.len() != len => {
                return Err(mismatch(i, "attention_mask", mask.len(), len))
            }
            Some(mask) => pad_to(mask, seq_len, 0, side, &mut attention_mask),
            None => pad_to(&vec![1; len], seq_len, 0, side, &mut attention_mask),
        }
        match (&row.token_type_ids, with_types) {
            (Some(t), true) if t.len() != len => {
                return Err(mismatch(i, "token_type_ids", t.len(), len))
            }
            (Some(t), true) => pad_to(t, seq_len, 0, side, &mut token_type_ids),
            (None, false) => {}
            _ => {
                return Err(DatasetError::Shape(format!(
                    "example {i} of the batch {} `token_type_ids` but example 0 {}",
                    if with_types { "has no" } else { "has" },
                    if with_types { "has them" } else { "has none" },
                )))
            }
        }
    }
    Ok(PaddedBatch {
        batch_size: rows.len(),
        seq_len,
        input_ids,
        attention_mask,
        token_type_ids: with_types.then_some(token_type_ids),
        labels: None,
    })
}

fn mismatch(row: usize, name: &str, found: usize, len: usize) -> DatasetError {
    DatasetError::Shape(format!(
        "example {row} of the batch: `{name}` has {found} values but `input_ids` has {len}"
    ))
}

/// The labels of every row, or of none; an error when only some rows have one.
fn all_or_no_labels(rows: &[Example]) -> Result<Option<Vec<&Label>>> {
    let labels: Vec<Option<&Label>> = rows.iter().map(|r| r.labels.as_ref()).collect();
    if labels.iter().all(Option::is_none) {
        return Ok(None);
    }
    if let Some(i) = labels.iter().position(Option::is_none) {
        return Err(DatasetError::Shape(format!(
            "example {i} of the batch has no label but others have one"
        )));
    }
    Ok(Some(labels.into_iter().flatten().collect()))
}

/// HF `DataCollatorWithPadding(tokenizer, padding=True, pad_to_multiple_of=...)`: pads every
/// sequence of the batch to the longest one (rounded up to `pad_to_multiple_of`), builds the
/// `attention_mask` (1 for tokens, 0 for padding) where an example has none, pads
/// `token_type_ids` with 0, and stacks one label per example into `labels` (`[batch]`).
///
/// Examples with per-token labels are refused (HF would fail to make a tensor of them): use
/// [`DataCollatorForTokenClassification`].
///
/// ```
/// use ember_datasets::{Collator, DataCollatorWithPadding, Example, PaddedLabels};
/// let collator = DataCollatorWithPadding::new(0);
/// let batch = collator.pad(&[
///     Example::new(vec![101, 7, 102]).with_label(1),
///     Example::new(vec![101, 102]).with_label(0),
/// ])?;
/// assert_eq!(batch.input_ids, [101, 7, 102, 101, 102, 0]);
/// assert_eq!(batch.attention_mask, [1, 1, 1, 1, 1, 0]);
/// assert_eq!(batch.labels, Some(PaddedLabels::Sequence(vec![1, 0])));
/// # Ok::<(), ember_datasets::DatasetError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataCollatorWithPadding {
    /// The id padding is written with (`tokenizer.pad_token_id`).
    pub pad_token_id: i64,
    /// Which side to pad on (`tokenizer.padding_side`); default right.
    pub padding_side: PaddingSide,
    /// Round the padded length up to a multiple of this (8 or 64 for tensor cores).
    pub pad_to_multiple_of: Option<usize>,
}

impl DataCollatorWithPadding {
    /// A collator padding on the right with `pad_token_id`.
    pub fn new(pad_token_id: i64) -> Self {
        Self {
            pad_token_id,
            padding_side: PaddingSide::Right,
            pad_to_multiple_of: None,
        }
    }
}

impl Collator for DataCollatorWithPadding {
    fn pad(&self, rows: &[Example]) -> Result<PaddedBatch> {
        let mut batch = pad_inputs(
            rows,
            self.pad_token_id,
            self.padding_side,
            self.pad_to_multiple_of,
        )?;
        if let Some(labels) = all_or_no_labels(rows)? {
            let values = labels
                .into_iter()
                .enumerate()
                .map(|(i, l)| match l {
                    Label::Sequence(v) => Ok(*v),
                    Label::Tokens(_) => Err(DatasetError::InvalidArgument {
                        name: "labels",
                        value: format!("a list of labels in example {i} of the batch"),
                        message: "DataCollatorWithPadding takes one label per example; use \
                                  DataCollatorForTokenClassification for per-token labels"
                            .into(),
                    }),
                })
                .collect::<Result<Vec<i64>>>()?;
            batch.labels = Some(PaddedLabels::Sequence(values));
        }
        Ok(batch)
    }
}

/// HF `DataCollatorForTokenClassification(tokenizer, pad_to_multiple_of=...,
/// label_pad_token_id=-100)`: the inputs padded as [`DataCollatorWithPadding`] does, and the
/// per-token labels padded with `label_pad_token_id` on the same side to the same length.
///
/// As in HF, a label list is padded to the batch's padded length, whatever the length of its
/// own `input_ids` (a shorter list is therefore aligned to the start with right padding and to
/// the end with left padding); a list longer than the padded length is an error. Examples with
/// one label per sequence are refused.
///
/// ```
/// use ember_datasets::{Collator, DataCollatorForTokenClassification, Example, PaddedLabels};
/// let collator = DataCollatorForTokenClassification::new(0);
/// let batch = collator.pad(&[
///     Example::new(vec![101, 7, 102]).with_token_labels(vec![-100, 3, -100]),
///     Example::new(vec![101, 102]).with_token_labels(vec![-100, -100]),
/// ])?;
/// assert_eq!(batch.labels, Some(PaddedLabels::Tokens(vec![-100, 3, -100, -100, -100, -100])));
/// # Ok::<(), ember_datasets::DatasetError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataCollatorForTokenClassification {
    /// The id padding is written with (`tokenizer.pad_token_id`).
    pub pad_token_id: i64,
    /// Which side to pad on (`tokenizer.padding_side`); default right.
    pub padding_side: PaddingSide,
    /// Round the padded length up to a multiple of this.
    pub pad_to_multiple_of: Option<usize>,
    /// The label of padding tokens; default -100 ([`IGNORE_INDEX`]), ignored by the loss.
    pub label_pad_token_id: i64,
}

impl DataCollatorForTokenClassification {
    /// A collator padding on the right with `pad_token_id`, labels with -100.
    pub fn new(pad_token_id: i64) -> Self {
        Self {
            pad_token_id,
            padding_side: PaddingSide::Right,
            pad_to_multiple_of: None,
            label_pad_token_id: IGNORE_INDEX,
        }
    }

    /// Sets `label_pad_token_id`.
    pub fn label_pad_token_id(mut self, id: i64) -> Self {
        self.label_pad_token_id = id;
        self
    }
}

impl Collator for DataCollatorForTokenClassification {
    fn pad(&self, rows: &[Example]) -> Result<PaddedBatch> {
        let mut batch = pad_inputs(
            rows,
            self.pad_token_id,
            self.padding_side,
            self.pad_to_multiple_of,
        )?;
        if let Some(labels) = all_or_no_labels(rows)? {
            let mut values = Vec::with_capacity(batch.batch_size * batch.seq_len);
            for (i, label) in labels.into_iter().enumerate() {
                match label {
                    Label::Tokens(l) if l.len() > batch.seq_len => {
                        return Err(DatasetError::Shape(format!(
                            "example {i} of the batch has {} labels, more than the padded \
                             length {}",
                            l.len(),
                            batch.seq_len
                        )))
                    }
                    Label::Tokens(l) => pad_to(
                        l,
                        batch.seq_len,
                        self.label_pad_token_id,
                        self.padding_side,
                        &mut values,
                    ),
                    Label::Sequence(_) => {
                        return Err(DatasetError::InvalidArgument {
                            name: "labels",
                            value: format!("one label for example {i} of the batch"),
                            message: "DataCollatorForTokenClassification takes one label per \
                                      token; use DataCollatorWithPadding for one per sequence"
                                .into(),
                        })
                    }
                }
            }
            batch.labels = Some(PaddedLabels::Tokens(values));
        }
        Ok(batch)
    }
}

/// The builder setters every collator shares (`padding_side`, `pad_to_multiple_of`), as the HF
/// collators share those arguments.
macro_rules! padding_setters {
    ($($collator:ty),*) => {$(
        impl $collator {
            /// Sets `padding_side`.
            pub fn padding_side(mut self, side: PaddingSide) -> Self {
                self.padding_side = side;
                self
            }

            /// Sets `pad_to_multiple_of`.
            pub fn pad_to_multiple_of(mut self, multiple: usize) -> Self {
                self.pad_to_multiple_of = Some(multiple);
                self
            }
        }
    )*};
}

padding_setters!(
    DataCollatorWithPadding,
    DataCollatorForTokenClassification,
    DataCollatorForLanguageModeling
);
