//! Reading and writing: CSV / JSON Lines files, and `save_to_disk` / `load_from_disk` in the
//! layout of Python `datasets` (Arrow IPC stream files + `dataset_info.json` + `state.json`).

use crate::dataset::Dataset;
use crate::error::{DatasetError, Result};
use crate::features::Features;
use arrow::array::RecordBatch;
use arrow::compute;
use arrow::datatypes::{DataType, Field, Schema};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{BufReader, Cursor, Seek};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The name of shard `i` of `n`, as `datasets` writes it.
fn shard_name(i: usize, n: usize) -> String {
    format!("data-{i:05}-of-{n:05}.arrow")
}

fn parse_error(path: &Path, e: impl std::fmt::Display) -> DatasetError {
    DatasetError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// Text columns come out of `datasets`' CSV / JSON builders as `large_string`: do the same so
/// features match Python's.
fn widen_strings(batch: RecordBatch) -> Result<RecordBatch> {
    let schema = batch.schema();
    let mut fields = Vec::new();
    let mut columns = Vec::new();
    for (f, c) in schema.fields().iter().zip(batch.columns()) {
        if matches!(f.data_type(), DataType::Utf8 | DataType::Utf8View) {
            fields.push(Field::new(f.name(), DataType::LargeUtf8, true));
            columns.push(compute::cast(c, &DataType::LargeUtf8)?);
        } else {
            fields.push(f.as_ref().clone().with_nullable(true));
            columns.push(c.clone());
        }
    }
    Ok(RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        columns,
    )?)
}

fn concat(path: &Path, schema: Arc<Schema>, batches: &[RecordBatch]) -> Result<RecordBatch> {
    compute::concat_batches(&schema, batches).map_err(|e| parse_error(path, e))
}

/// `load_dataset("csv", data_files=path)`: a CSV file with a header row; column types inferred
/// from all rows; empty fields are nulls.
pub fn read_csv(path: impl AsRef<Path>) -> Result<Dataset> {
    let path = path.as_ref();
    let mut file = std::fs::File::open(path).map_err(|e| DatasetError::io(path, e))?;
    if file
        .metadata()
        .map_err(|e| DatasetError::io(path, e))?
        .len()
        == 0
    {
        return Err(DatasetError::EmptyFile(path.to_owned()));
    }
    let format = arrow::csv::reader::Format::default().with_header(true);
    let (schema, _) = format
        .infer_schema(BufReader::new(&file), None)
        .map_err(|e| parse_error(path, e))?;
    if schema.fields().is_empty() {
        return Err(DatasetError::EmptyFile(path.to_owned()));
    }
    file.rewind().map_err(|e| DatasetError::io(path, e))?;
    let schema = Arc::new(schema);
    let reader = arrow::csv::ReaderBuilder::new(schema.clone())
        .with_format(format)
        .with_batch_size(8192)
        .build(file)
        .map_err(|e| parse_error(path, e))?;
    let batches = reader
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| parse_error(path, e))?;
    let batch = widen_strings(concat(path, schema, &batches)?)?;
    Dataset::from_record_batch(batch, None)
}

/// `load_dataset("json", data_files=path)` for JSON Lines (one object per line) or a JSON
/// list of objects.
pub fn read_json(path: impl AsRef<Path>) -> Result<Dataset> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| DatasetError::io(path, e))?;
    let trimmed = bytes.iter().position(|b| !b.is_ascii_whitespace());
    match trimmed.map(|i| bytes[i]) {
        None => Err(DatasetError::EmptyFile(path.to_owned())),
        Some(b'[') => {
            let rows: Vec<Value> =
                serde_json::from_slice(&bytes).map_err(|e| parse_error(path, e))?;
            let mut lines = Vec::new();
            for r in rows {
                serde_json::to_writer(&mut lines, &r).map_err(|e| parse_error(path, e))?;
                lines.push(b'\n');
            }
            read_json_lines_bytes(&lines, path)
        }
        Some(_) => read_json_lines_bytes(&bytes, path),
    }
}

pub(crate) fn read_json_lines_bytes(bytes: &[u8], path: &Path) -> Result<Dataset> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(DatasetError::EmptyFile(path.to_owned()));
    }
    let (schema, _) = arrow::json::reader::infer_json_schema(Cursor::new(bytes), None)
        .map_err(|e| parse_error(path, e))?;
    let schema = Arc::new(schema);
    let reader = arrow::json::ReaderBuilder::new(schema.clone())
        .build(Cursor::new(bytes))
        .map_err(|e| parse_error(path, e))?;
    let batches = reader
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| parse_error(path, e))?;
    let batch = widen_strings(concat(path, schema, &batches)?)?;
    Dataset::from_record_batch(batch, None)
}

/// The rows as JSON Lines, nulls written as `null`.
pub(crate) fn json_lines_bytes(ds: &Dataset) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let mut w = arrow::json::WriterBuilder::new()
            .with_explicit_nulls(true)
            .build::<_, arrow::json::writer::LineDelimited>(&mut out);
        w.write(ds.record_batch())?;
        w.finish()?;
    }
    Ok(out)
}

impl Dataset {
    /// `to_json(path, lines=True)`: writes the rows as JSON Lines, atomically.
    pub fn to_json_lines(&self, path: impl AsRef<Path>) -> Result<()> {
        write_atomic(path.as_ref(), &json_lines_bytes(self)?)
    }

    /// `to_csv(path)`: writes the rows as CSV with a header, atomically.
    pub fn to_csv(&self, path: impl AsRef<Path>) -> Result<()> {
        let mut out = Vec::new();
        {
            let mut w = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut out);
            w.write(self.record_batch())?;
        }
        write_atomic(path.as_ref(), &out)
    }

    /// `save_to_disk(dir)`: `data-00000-of-00001.arrow` (Arrow IPC stream, schema metadata
    /// `huggingface` with the features), `dataset_info.json` and `state.json`, the layout Python
    /// `datasets.load_from_disk` reads. Written into a temporary folder that replaces `dir`
    /// only when complete.
    pub fn save_to_disk(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        replace_dir_atomically(dir, |tmp| self.write_split_files(tmp))
    }

    pub(crate) fn write_split_files(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| DatasetError::io(dir, e))?;
        let features = self.features().to_json();
        let hf_meta = json!({"info": {"features": features}}).to_string();
        let schema = self.record_batch().schema();
        let metadata: HashMap<String, String> = [("huggingface".to_string(), hf_meta)].into();
        let schema = Arc::new(schema.as_ref().clone().with_metadata(metadata));
        let batch = self.record_batch().clone().with_schema(schema.clone())?;
        let name = shard_name(0, 1);
        let path = dir.join(&name);
        let file = std::fs::File::create(&path).map_err(|e| DatasetError::io(&path, e))?;
        let mut w =
            arrow::ipc::writer::StreamWriter::try_new(std::io::BufWriter::new(file), &schema)?;
        w.write(&batch)?;
        w.finish()?;
        let info = json!({"citation": "", "description": "", "features": features, "homepage": "", "license": ""});
        write_json(&dir.join("dataset_info.json"), &info)?;
        let state = json!({
            "_data_files": [{"filename": name}],
            "_fingerprint": fingerprint(self),
            "_format_columns": null,
            "_format_kwargs": {},
            "_format_type": null,
            "_output_all_columns": false,
            "_split": null,
        });
        write_json(&dir.join("state.json"), &state)
    }

    /// `load_from_disk(dir)` for one dataset saved by Python `datasets` or by Ember.
    pub fn load_from_disk(dir: impl AsRef<Path>) -> Result<Dataset> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(DatasetError::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such folder"),
            ));
        }
        let state_path = dir.join("state.json");
        let state = read_json_file(&state_path)?;
        let files = state["_data_files"]
            .as_array()
            .ok_or_else(|| DatasetError::Metadata {
                path: state_path.clone(),
                message: "`_data_files` is not a list".into(),
            })?;
        let mut batches = Vec::new();
        let mut schema = None;
        for f in files {
            let name = f["filename"]
                .as_str()
                .ok_or_else(|| DatasetError::Metadata {
                    path: state_path.clone(),
                    message: "a `_data_files` entry has no `filename`".into(),
                })?;
            let path = dir.join(name);
            let file = std::fs::File::open(&path).map_err(|e| DatasetError::io(&path, e))?;
            let reader = arrow::ipc::reader::StreamReader::try_new(BufReader::new(file), None)
                .map_err(|e| parse_error(&path, format!("not an Arrow IPC stream: {e}")))?;
            schema.get_or_insert_with(|| reader.schema());
            for b in reader {
                batches
                    .push(b.map_err(|e| parse_error(&path, format!("corrupted Arrow data: {e}")))?);
            }
        }
        let schema = schema.ok_or_else(|| DatasetError::Metadata {
            path: state_path.clone(),
            message: "no data files".into(),
        })?;
        let batch = compute::concat_batches(&schema, &batches)?;
        // The `huggingface` metadata has been read into features; the table keeps none.
        let batch = RecordBatch::try_new(
            Arc::new(Schema::new(schema.fields().clone())),
            batch.columns().to_vec(),
        )?;
        let info_path = dir.join("dataset_info.json");
        let features = if info_path.is_file() {
            let info = read_json_file(&info_path)?;
            Some(Features::from_json(
                &info["features"],
                &info_path.display().to_string(),
            )?)
        } else {
            schema
                .metadata()
                .get("huggingface")
                .and_then(|m| serde_json::from_str::<Value>(m).ok())
                .map(|v| Features::from_json(&v["info"]["features"], "arrow schema metadata"))
                .transpose()?
        };
        Dataset::from_record_batch(batch, features)
    }
}

/// A fingerprint of the content, as `datasets` keeps one per state (any 16 hex digits do).
fn fingerprint(ds: &Dataset) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    ds.num_rows().hash(&mut h);
    ds.column_names().hash(&mut h);
    format!("{:016x}", h.finish())
}

pub(crate) fn read_json_file(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| DatasetError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| DatasetError::Metadata {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

pub(crate) fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialize");
    write_atomic(path, text.as_bytes())
}

/// Writes a file under a temporary name, then renames it into place.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            DatasetError::io(path, e)
        })
}

/// Builds a folder under a temporary name beside `dir` and swaps it in only when `fill`
/// succeeded: an interrupted save leaves the old `dir` intact.
pub(crate) fn replace_dir_atomically(
    dir: &Path,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("dataset")
        .to_owned();
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| DatasetError::io(parent, e))?;
    let tmp: PathBuf = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let old: PathBuf = parent.join(format!(".{name}.old-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(|e| DatasetError::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| DatasetError::io(dir, e))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// `load_dataset("parquet", data_files=path)`.
pub fn read_parquet(path: impl AsRef<Path>) -> Result<Dataset> {
    let path = path.as_ref();
    let file = std::fs::File::open(path).map_err(|e| DatasetError::io(path, e))?;
    let builder = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| parse_error(path, e))?;
    let schema = builder.schema().clone();
    let reader = builder.build().map_err(|e| parse_error(path, e))?;
    let batches = reader
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| parse_error(path, e))?;
    let batch = concat(path, schema.clone(), &batches)?;
    let features = schema
        .metadata()
        .get("huggingface")
        .and_then(|m| serde_json::from_str::<Value>(m).ok())
        .map(|v| Features::from_json(&v["info"]["features"], &path.display().to_string()))
        .transpose()?;
    let plain = RecordBatch::try_new(
        Arc::new(Schema::new(schema.fields().clone())),
        batch.columns().to_vec(),
    )?;
    Dataset::from_record_batch(plain, features)
}

impl Dataset {
    /// `to_parquet(path)`: snappy-compressed Parquet with the features in the schema metadata
    /// (`huggingface`), as `datasets` writes it; atomic.
    pub fn to_parquet(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let hf_meta = json!({"info": {"features": self.features().to_json()}}).to_string();
        let schema = Arc::new(
            self.record_batch()
                .schema()
                .as_ref()
                .clone()
                .with_metadata(HashMap::from([("huggingface".to_string(), hf_meta)])),
        );
        let batch = self.record_batch().clone().with_schema(schema.clone())?;
        let props = parquet::file::properties::WriterProperties::builder()
            .set_compression(parquet::basic::Compression::SNAPPY)
            .build();
        let mut out = Vec::new();
        {
            let mut w = parquet::arrow::ArrowWriter::try_new(&mut out, schema, Some(props))
                .map_err(|e| parse_error(path, e))?;
            w.write(&batch).map_err(|e| parse_error(path, e))?;
            w.close().map_err(|e| parse_error(path, e))?;
        }
        write_atomic(path, &out)
    }

    /// `concatenate_datasets([self, other])`: rows of both; columns and types must agree.
    pub fn concatenate(&self, other: &Dataset) -> Result<Dataset> {
        if self.column_names() != other.column_names() {
            return Err(DatasetError::Shape(format!(
                "columns differ: {:?} vs {:?}",
                self.column_names(),
                other.column_names()
            )));
        }
        let schema = self.record_batch().schema();
        let other_batch =
            RecordBatch::try_new(schema.clone(), other.record_batch().columns().to_vec())
                .map_err(|e| DatasetError::Shape(format!("column types differ: {e}")))?;
        let batch = compute::concat_batches(&schema, [self.record_batch(), &other_batch])?;
        Dataset::from_record_batch(batch, Some(self.features().clone()))
    }
}
