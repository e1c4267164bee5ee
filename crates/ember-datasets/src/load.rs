//! `load_dataset(builder, data_files=..., split=...)`: files into a [`DatasetDict`] or, with a
//! split expression (`"train[10:100]"`, `"train[:10%]"`, `"train+test"`), one [`Dataset`].

use crate::dataset::Dataset;
use crate::dict::DatasetDict;
use crate::error::{DatasetError, Result};
use std::path::{Path, PathBuf};

/// The `data_files=` argument: one file, several (one `train` split), or a split map.
#[derive(Debug, Clone)]
pub enum DataFiles {
    /// `data_files="train.csv"`: the `train` split.
    One(PathBuf),
    /// `data_files=["a.csv", "b.csv"]`: concatenated into the `train` split.
    Many(Vec<PathBuf>),
    /// `data_files={"train": [...], "test": [...]}`.
    Splits(Vec<(String, Vec<PathBuf>)>),
}

impl<P: AsRef<Path>> From<P> for DataFiles {
    fn from(p: P) -> Self {
        DataFiles::One(p.as_ref().to_owned())
    }
}

/// The file formats `load_dataset` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builder {
    /// `"csv"`: header row, types inferred.
    Csv,
    /// `"json"`: JSON Lines or a JSON list of objects.
    Json,
    /// `"parquet"`.
    Parquet,
    /// `"conll"`: token / tag files for NER (see [`crate::read_conll`]).
    Conll,
}

impl std::str::FromStr for Builder {
    type Err = DatasetError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "csv" => Ok(Builder::Csv),
            "json" | "jsonl" => Ok(Builder::Json),
            "parquet" => Ok(Builder::Parquet),
            "conll" => Ok(Builder::Conll),
            other => Err(DatasetError::InvalidArgument {
                name: "path",
                value: other.to_owned(),
                message: "supported builders: csv, json, parquet, conll".into(),
            }),
        }
    }
}

fn read_one(builder: Builder, path: &Path) -> Result<Dataset> {
    match builder {
        Builder::Csv => crate::io::read_csv(path),
        Builder::Json => crate::io::read_json(path),
        Builder::Parquet => crate::io::read_parquet(path),
        Builder::Conll => crate::ner::read_conll(path),
    }
}

fn read_many(builder: Builder, paths: &[PathBuf]) -> Result<Dataset> {
    let parts = paths
        .iter()
        .map(|p| read_one(builder, p))
        .collect::<Result<Vec<_>>>()?;
    let mut iter = parts.into_iter().zip(paths);
    let (first, _) = iter.next().ok_or_else(|| DatasetError::InvalidArgument {
        name: "data_files",
        value: "[]".into(),
        message: "no files given".into(),
    })?;
    iter.try_fold(first, |acc, (ds, path)| {
        acc.concatenate(&ds).map_err(|e| DatasetError::Parse {
            path: path.clone(),
            message: format!("cannot be concatenated with the files before it: {e}"),
        })
    })
}

/// `load_dataset(builder, data_files=...)`: every split.
///
/// ```no_run
/// use ember_datasets::{load_dataset, DataFiles};
/// let dd = load_dataset("csv", DataFiles::Splits(vec![
///     ("train".into(), vec!["train.csv".into()]),
///     ("test".into(), vec!["test.csv".into()]),
/// ]))?;
/// # Ok::<(), ember_datasets::DatasetError>(())
/// ```
pub fn load_dataset(builder: &str, data_files: impl Into<DataFiles>) -> Result<DatasetDict> {
    let builder: Builder = builder.parse()?;
    let mut dd = DatasetDict::default();
    match data_files.into() {
        DataFiles::One(p) => dd.insert("train", read_one(builder, &p)?),
        DataFiles::Many(ps) => dd.insert("train", read_many(builder, &ps)?),
        DataFiles::Splits(map) => {
            for (name, ps) in map {
                dd.insert(name, read_many(builder, &ps)?);
            }
        }
    }
    Ok(dd)
}

/// `load_dataset(builder, data_files=..., split="train[:10%]+test")`: one dataset.
pub fn load_dataset_split(
    builder: &str,
    data_files: impl Into<DataFiles>,
    split: &str,
) -> Result<Dataset> {
    let dd = load_dataset(builder, data_files)?;
    dd.select_split(split)
}

impl DatasetDict {
    /// Evaluates a split expression: `+`-joined parts, each `name` or `name[from:to]` with
    /// row numbers or percentages (negative values count from the end), as HF's
    /// `ReadInstruction` with its default `closest` rounding.
    pub fn select_split(&self, expr: &str) -> Result<Dataset> {
        let mut out: Option<Dataset> = None;
        for part in expr.split('+') {
            let part = part.trim();
            let bad = |m: &str| DatasetError::InvalidArgument {
                name: "split",
                value: expr.to_owned(),
                message: format!("`{part}`: {m}"),
            };
            let (name, range) = match part.find('[') {
                Some(i) if part.ends_with(']') => (&part[..i], Some(&part[i + 1..part.len() - 1])),
                Some(_) => return Err(bad("expected `name[from:to]`")),
                None => (part, None),
            };
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_alphanumeric() || c == '_' || c == '-')
            {
                return Err(bad("a split name is letters, digits, `_` or `-`"));
            }
            let ds = self.split(name)?;
            let piece = match range {
                None => ds.clone(),
                Some(r) => {
                    let (from, to) = r.split_once(':').ok_or_else(|| bad("expected `from:to`"))?;
                    let n = ds.num_rows();
                    let start = bound(from, n, 0).map_err(|m| bad(&m))?;
                    let end = bound(to, n, n).map_err(|m| bad(&m))?;
                    ds.slice(start, end.saturating_sub(start))?
                }
            };
            out = Some(match out {
                None => piece,
                Some(acc) => acc.concatenate(&piece)?,
            });
        }
        out.ok_or_else(|| DatasetError::InvalidArgument {
            name: "split",
            value: expr.to_owned(),
            message: "empty split expression".into(),
        })
    }
}

/// One side of `[from:to]`: empty → `default`; `k` or `-k` rows; `p%` of `n` rounded to the
/// closest row (halves to even, as Python's `round`); clamped to `0..=n`.
fn bound(text: &str, n: usize, default: usize) -> std::result::Result<usize, String> {
    let t = text.trim();
    if t.is_empty() {
        return Ok(default);
    }
    let (num, percent) = match t.strip_suffix('%') {
        Some(p) => (p.trim(), true),
        None => (t, false),
    };
    let v: i64 = num
        .parse()
        .map_err(|_| format!("`{t}` is not a whole number or percentage"))?;
    let rows = if percent {
        if !(-100..=100).contains(&v) {
            return Err(format!("percentage {v}% is outside -100%..100%"));
        }
        let exact = v as f64 * n as f64 / 100.0;
        round_half_even(exact) as i64
    } else {
        v
    };
    let abs = if rows < 0 { n as i64 + rows } else { rows };
    Ok(abs.clamp(0, n as i64) as usize)
}

fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}
