//! [`Dataset`]: one Arrow table with `datasets`' features and operations.

use crate::error::{DatasetError, Result};
use crate::features::{Feature, Features};
use arrow::array::{Array, ArrayRef, AsArray, Int64Array, RecordBatch, UInt32Array};
use arrow::compute;
use arrow::datatypes::{DataType, Field, Schema};
use rand::{seq::SliceRandom, SeedableRng};
use serde_json::{Map, Value};
use std::sync::Arc;

/// A table of rows, as `datasets.Dataset`: columnar (Arrow) storage, HF [`Features`], and the
/// HF operations (`select`, `filter`, `map`, `shuffle`, `train_test_split`, ...).
///
/// ```
/// use ember_datasets::Dataset;
/// use serde_json::json;
/// let ds = Dataset::from_json_rows(&[json!({"text": "good", "label": 1}), json!({"text": "bad", "label": 0})])?;
/// assert_eq!(ds.num_rows(), 2);
/// assert_eq!(ds.row(1)?["text"], "bad");
/// # Ok::<(), ember_datasets::DatasetError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Dataset {
    batch: RecordBatch,
    features: Features,
}

impl Dataset {
    /// A dataset over an Arrow batch; features inferred from the Arrow types where not given.
    pub fn from_record_batch(batch: RecordBatch, features: Option<Features>) -> Result<Self> {
        let inferred = Features(
            batch
                .schema()
                .fields()
                .iter()
                .map(|f| (f.name().clone(), Feature::from_arrow(f.data_type())))
                .collect(),
        );
        let features = match features {
            Some(given) => {
                // Keep the given feature where a column has one (ClassLabel), else the inferred.
                Features(
                    inferred
                        .0
                        .into_iter()
                        .map(|(n, f)| {
                            let g = given.get(&n).cloned().unwrap_or(f);
                            (n, g)
                        })
                        .collect(),
                )
            }
            None => inferred,
        };
        Ok(Self { batch, features })
    }

    /// `Dataset.from_dict`: columns given as Arrow arrays of equal length.
    pub fn from_columns<S: Into<String>>(columns: Vec<(S, ArrayRef)>) -> Result<Self> {
        let columns: Vec<(String, ArrayRef)> =
            columns.into_iter().map(|(n, a)| (n.into(), a)).collect();
        let batch = batch_of(&columns, None)?;
        Self::from_record_batch(batch, None)
    }

    /// `Dataset.from_list`: rows given as JSON objects; column types inferred as `datasets` does.
    pub fn from_json_rows(rows: &[Value]) -> Result<Self> {
        let mut text = Vec::new();
        for r in rows {
            serde_json::to_writer(&mut text, r).map_err(|e| DatasetError::Shape(e.to_string()))?;
            text.push(b'\n');
        }
        crate::io::read_json_lines_bytes(&text, std::path::Path::new("<rows>"))
    }

    /// The Arrow batch holding the rows.
    pub fn record_batch(&self) -> &RecordBatch {
        &self.batch
    }

    /// `num_rows`.
    pub fn num_rows(&self) -> usize {
        self.batch.num_rows()
    }

    /// `len(ds)`.
    pub fn len(&self) -> usize {
        self.num_rows()
    }

    /// True when the dataset has no rows.
    pub fn is_empty(&self) -> bool {
        self.num_rows() == 0
    }

    /// `column_names`.
    pub fn column_names(&self) -> Vec<String> {
        self.features.0.iter().map(|(n, _)| n.clone()).collect()
    }

    /// `features`.
    pub fn features(&self) -> &Features {
        &self.features
    }

    fn index_of(&self, name: &str) -> Result<usize> {
        self.batch
            .schema()
            .index_of(name)
            .map_err(|_| DatasetError::MissingColumn {
                name: name.to_owned(),
                available: self.column_names().join(", "),
            })
    }

    /// `ds["label"]`: a column as an Arrow array.
    pub fn column(&self, name: &str) -> Result<ArrayRef> {
        Ok(self.batch.column(self.index_of(name)?).clone())
    }

    /// A column as JSON values (`null` for nulls).
    pub fn column_values(&self, name: &str) -> Result<Vec<Value>> {
        let one = self.select_columns(&[name])?;
        Ok(one
            .to_json_rows()?
            .into_iter()
            .map(|mut r| r.remove(name).unwrap_or(Value::Null))
            .collect())
    }

    /// A string column as `Option<String>` per row (`None` for null).
    pub fn string_column(&self, name: &str) -> Result<Vec<Option<String>>> {
        let col = self.column(name)?;
        let utf8 =
            compute::cast(&col, &DataType::LargeUtf8).map_err(|_| DatasetError::ColumnType {
                column: name.to_owned(),
                found: col.data_type().to_string(),
                expected: "string".into(),
            })?;
        let s = utf8.as_string::<i64>();
        Ok((0..s.len())
            .map(|i| s.is_valid(i).then(|| s.value(i).to_owned()))
            .collect())
    }

    /// An integer column as `Option<i64>` per row.
    pub fn int_column(&self, name: &str) -> Result<Vec<Option<i64>>> {
        let col = self.column(name)?;
        if !col.data_type().is_integer() {
            return Err(DatasetError::ColumnType {
                column: name.to_owned(),
                found: col.data_type().to_string(),
                expected: "an integer type".into(),
            });
        }
        let ints = compute::cast(&col, &DataType::Int64)?;
        let a = ints.as_primitive::<arrow::datatypes::Int64Type>();
        Ok((0..a.len())
            .map(|i| a.is_valid(i).then(|| a.value(i)))
            .collect())
    }

    /// `ds[i]`: one row as a JSON object.
    pub fn row(&self, index: usize) -> Result<Map<String, Value>> {
        if index >= self.num_rows() {
            return Err(DatasetError::IndexOutOfRange {
                index,
                len: self.num_rows(),
            });
        }
        Ok(self.slice(index, 1)?.to_json_rows()?.remove(0))
    }

    /// `ds[a:b]`: rows `start..start + len` (no copy).
    pub fn slice(&self, start: usize, len: usize) -> Result<Self> {
        if start + len > self.num_rows() {
            return Err(DatasetError::IndexOutOfRange {
                index: start + len,
                len: self.num_rows(),
            });
        }
        Ok(Self {
            batch: self.batch.slice(start, len),
            features: self.features.clone(),
        })
    }

    /// Every row as a JSON object (nulls kept as `null`).
    pub fn to_json_rows(&self) -> Result<Vec<Map<String, Value>>> {
        let text = crate::io::json_lines_bytes(self)?;
        text.split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| match serde_json::from_slice(l) {
                Ok(Value::Object(m)) => Ok(m),
                other => Err(DatasetError::Shape(format!(
                    "row is not an object: {other:?}"
                ))),
            })
            .collect()
    }

    /// `select(indices)`: the rows at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> Result<Self> {
        if let Some(&bad) = indices.iter().find(|&&i| i >= self.num_rows()) {
            return Err(DatasetError::IndexOutOfRange {
                index: bad,
                len: self.num_rows(),
            });
        }
        let idx = UInt32Array::from(indices.iter().map(|&i| i as u32).collect::<Vec<_>>());
        let batch = compute::take_record_batch(&self.batch, &idx)?;
        Ok(Self {
            batch,
            features: self.features.clone(),
        })
    }

    /// `filter(function)`: the rows for which `keep(row)` is true.
    pub fn filter(&self, mut keep: impl FnMut(&Map<String, Value>) -> bool) -> Result<Self> {
        let rows = self.to_json_rows()?;
        let mask = arrow::array::BooleanArray::from(rows.iter().map(&mut keep).collect::<Vec<_>>());
        let batch = compute::filter_record_batch(&self.batch, &mask)?;
        Ok(Self {
            batch,
            features: self.features.clone(),
        })
    }

    /// `map(function, batched=True, batch_size, remove_columns)`: calls `f` on consecutive
    /// batches of at most `batch_size` rows; `f` returns columns (new or replacing) with as many
    /// rows as its batch. Columns in `remove_columns` are dropped from the result.
    pub fn map_batched(
        &self,
        batch_size: usize,
        remove_columns: &[&str],
        mut f: impl FnMut(&Dataset) -> Result<Vec<(String, ArrayRef)>>,
    ) -> Result<Self> {
        if batch_size == 0 {
            return Err(DatasetError::InvalidArgument {
                name: "batch_size",
                value: "0".into(),
                message: "must be at least 1".into(),
            });
        }
        for c in remove_columns {
            self.index_of(c)?;
        }
        let progress = crate::progress::bar(self.num_rows() as u64, "Map");
        let mut outputs: Vec<Vec<(String, ArrayRef)>> = Vec::new();
        let mut start = 0;
        while start < self.num_rows() || (start == 0 && outputs.is_empty()) {
            let len = batch_size.min(self.num_rows() - start);
            let chunk = self.slice(start, len)?;
            let cols = f(&chunk)?;
            if let Some((name, a)) = cols.iter().find(|(_, a)| a.len() != len) {
                return Err(DatasetError::Shape(format!(
                    "map function returned {} rows for column `{name}` on a batch of {len}",
                    a.len()
                )));
            }
            outputs.push(cols);
            start += len;
            progress.inc(len as u64);
            if len == 0 {
                break;
            }
        }
        progress.finish_and_clear();
        // Concatenate each returned column across batches.
        let names: Vec<String> = outputs[0].iter().map(|(n, _)| n.clone()).collect();
        let mut new_cols: Vec<(String, ArrayRef)> = Vec::new();
        for (k, name) in names.iter().enumerate() {
            let parts: Vec<&dyn Array> = outputs
                .iter()
                .map(|o| {
                    o.get(k)
                        .filter(|(n, _)| n == name)
                        .map(|(_, a)| a.as_ref())
                        .ok_or_else(|| {
                            DatasetError::Shape(format!(
                                "map function did not return column `{name}` for every batch"
                            ))
                        })
                })
                .collect::<Result<_>>()?;
            new_cols.push((name.clone(), compute::concat(&parts)?));
        }
        let mut columns: Vec<(String, ArrayRef)> = self
            .column_names()
            .into_iter()
            .zip(self.batch.columns().iter().cloned())
            .filter(|(n, _)| !remove_columns.contains(&n.as_str()) && !names.contains(n))
            .collect();
        let mut features: Vec<(String, Feature)> = self
            .features
            .0
            .iter()
            .filter(|(n, _)| columns.iter().any(|(c, _)| c == n))
            .cloned()
            .collect();
        for (name, array) in new_cols {
            features.push((name.clone(), Feature::from_arrow(array.data_type())));
            columns.push((name, array));
        }
        let batch = batch_of(&columns, Some(self.num_rows()))?;
        Ok(Self {
            batch,
            features: Features(features),
        })
    }

    /// `shuffle(seed)`: the rows in a random order fixed by `seed`. (The order is Ember's own,
    /// not numpy's: the same seed gives a different order than Python.)
    pub fn shuffle(&self, seed: u64) -> Result<Self> {
        let mut idx: Vec<usize> = (0..self.num_rows()).collect();
        idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
        self.select(&idx)
    }

    /// `rename_column(old, new)`.
    pub fn rename_column(&self, old: &str, new: &str) -> Result<Self> {
        let i = self.index_of(old)?;
        if old != new && self.index_of(new).is_ok() {
            return Err(DatasetError::DuplicateColumn(new.to_owned()));
        }
        let mut columns = self.named_columns();
        columns[i].0 = new.to_owned();
        let mut features = self.features.clone();
        features.0[i].0 = new.to_owned();
        Ok(Self {
            batch: batch_of(&columns, Some(self.num_rows()))?,
            features,
        })
    }

    /// `remove_columns(names)`.
    pub fn remove_columns(&self, names: &[&str]) -> Result<Self> {
        for n in names {
            self.index_of(n)?;
        }
        let keep: Vec<String> = self
            .column_names()
            .into_iter()
            .filter(|c| !names.contains(&c.as_str()))
            .collect();
        self.select_columns(&keep.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// `select_columns(names)`: only these columns, in this order.
    pub fn select_columns(&self, names: &[&str]) -> Result<Self> {
        let mut columns = Vec::new();
        let mut features = Vec::new();
        for n in names {
            let i = self.index_of(n)?;
            columns.push(((*n).to_owned(), self.batch.column(i).clone()));
            features.push(self.features.0[i].clone());
        }
        Ok(Self {
            batch: batch_of(&columns, Some(self.num_rows()))?,
            features: Features(features),
        })
    }

    /// `add_column(name, column)`.
    pub fn add_column(&self, name: &str, array: ArrayRef) -> Result<Self> {
        if self.index_of(name).is_ok() {
            return Err(DatasetError::DuplicateColumn(name.to_owned()));
        }
        let mut columns = self.named_columns();
        columns.push((name.to_owned(), array.clone()));
        let mut features = self.features.clone();
        features
            .0
            .push((name.to_owned(), Feature::from_arrow(array.data_type())));
        Ok(Self {
            batch: batch_of(&columns, Some(self.num_rows()))?,
            features,
        })
    }

    /// `cast_column(name, ClassLabel(names))` (or another feature). Integer ids are checked
    /// against the names; strings are mapped to their index (`str2int`).
    pub fn cast_column(&self, name: &str, feature: Feature) -> Result<Self> {
        let i = self.index_of(name)?;
        let col = self.batch.column(i).clone();
        let array: ArrayRef = match &feature {
            Feature::ClassLabel(names) => Arc::new(self.class_ids(name, &col, names)?),
            other => compute::cast(&col, &other.arrow_type()?)?,
        };
        let mut columns = self.named_columns();
        columns[i].1 = array;
        let mut features = self.features.clone();
        features.0[i].1 = feature;
        Ok(Self {
            batch: batch_of(&columns, Some(self.num_rows()))?,
            features,
        })
    }

    /// `class_encode_column(name)`: a ClassLabel whose names are the sorted distinct values.
    pub fn class_encode_column(&self, name: &str) -> Result<Self> {
        let mut names: Vec<String> = self
            .column_values(name)?
            .into_iter()
            .filter(|v| !v.is_null())
            .map(|v| match v {
                Value::String(s) => s,
                other => other.to_string(),
            })
            .collect();
        let numeric = self.column(name)?.data_type().is_integer();
        if numeric {
            names.sort_by_key(|s| s.parse::<i64>().unwrap_or(i64::MAX));
        } else {
            names.sort();
        }
        names.dedup();
        if numeric {
            // Integer values become the index of their string in `names`.
            let values = self.int_column(name)?;
            let ids: Int64Array = values
                .iter()
                .map(|v| v.map(|v| names.iter().position(|n| *n == v.to_string()).unwrap() as i64))
                .collect();
            let mut ds = self.clone();
            let i = self.index_of(name)?;
            let mut columns = ds.named_columns();
            columns[i].1 = Arc::new(ids);
            ds.features.0[i].1 = Feature::ClassLabel(names);
            ds.batch = batch_of(&columns, Some(self.num_rows()))?;
            return Ok(ds);
        }
        self.cast_column(name, Feature::ClassLabel(names))
    }

    fn class_ids(&self, name: &str, col: &ArrayRef, names: &[String]) -> Result<Int64Array> {
        let out_of_range = |row: usize, value: String| DatasetError::LabelOutOfRange {
            column: name.to_owned(),
            row,
            value,
            names: names.to_vec(),
        };
        if col.data_type().is_integer() {
            let values = self.int_column(name)?;
            for (row, v) in values.iter().enumerate() {
                if let Some(v) = v {
                    if *v < 0 || *v as usize >= names.len() {
                        return Err(out_of_range(row, v.to_string()));
                    }
                }
            }
            return Ok(values.into_iter().collect());
        }
        let strings = self.string_column(name)?;
        strings
            .into_iter()
            .enumerate()
            .map(|(row, s)| match s {
                None => Ok(None),
                Some(s) => names
                    .iter()
                    .position(|n| *n == s)
                    .map(|p| Some(p as i64))
                    .ok_or_else(|| out_of_range(row, format!("{s:?}"))),
            })
            .collect()
    }

    /// `sort(column)`: rows ordered by a column, ascending (nulls last), stable.
    pub fn sort(&self, column: &str, descending: bool) -> Result<Self> {
        let col = self.column(column)?;
        let options = arrow::compute::SortOptions {
            descending,
            nulls_first: false,
        };
        let idx = compute::sort_to_indices(&col, Some(options), None)?;
        let batch = compute::take_record_batch(&self.batch, &idx)?;
        Ok(Self {
            batch,
            features: self.features.clone(),
        })
    }

    /// `unique(column)`: the distinct values, in first-seen order.
    pub fn unique(&self, column: &str) -> Result<Vec<Value>> {
        let mut seen = Vec::new();
        for v in self.column_values(column)? {
            if !seen.contains(&v) {
                seen.push(v);
            }
        }
        Ok(seen)
    }

    pub(crate) fn named_columns(&self) -> Vec<(String, ArrayRef)> {
        self.column_names()
            .into_iter()
            .zip(self.batch.columns().iter().cloned())
            .collect()
    }
}

/// A record batch of named columns; `rows` gives the row count when there may be no column.
pub(crate) fn batch_of(columns: &[(String, ArrayRef)], rows: Option<usize>) -> Result<RecordBatch> {
    if let Some((name, a)) = columns.iter().find(|(_, a)| a.len() != columns[0].1.len()) {
        return Err(DatasetError::Shape(format!(
            "column `{name}` has {} rows but `{}` has {}",
            a.len(),
            columns[0].0,
            columns[0].1.len()
        )));
    }
    let mut seen = std::collections::HashSet::new();
    if let Some((dup, _)) = columns.iter().find(|(n, _)| !seen.insert(n.clone())) {
        return Err(DatasetError::DuplicateColumn(dup.clone()));
    }
    let fields: Vec<Field> = columns
        .iter()
        .map(|(n, a)| Field::new(n, a.data_type().clone(), true))
        .collect();
    let options = arrow::array::RecordBatchOptions::new()
        .with_row_count(rows.or(columns.first().map(|c| c.1.len())));
    Ok(RecordBatch::try_new_with_options(
        Arc::new(Schema::new(fields)),
        columns.iter().map(|(_, a)| a.clone()).collect(),
        &options,
    )?)
}
