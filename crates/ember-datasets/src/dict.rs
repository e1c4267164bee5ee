//! [`DatasetDict`] (named splits) and `train_test_split`.

use crate::dataset::Dataset;
use crate::error::{DatasetError, Result};
use crate::features::Feature;
use crate::io::{read_json_file, replace_dir_atomically, write_json};
use rand::{seq::SliceRandom, SeedableRng};
use serde_json::json;
use std::path::Path;

/// Named splits (`train`, `test`, ...), in order, as `datasets.DatasetDict`.
#[derive(Debug, Clone, Default)]
pub struct DatasetDict {
    /// The splits, in the order they were added (the order of `dataset_dict.json`).
    pub splits: Vec<(String, Dataset)>,
}

impl DatasetDict {
    /// `dd["train"]`.
    pub fn get(&self, split: &str) -> Option<&Dataset> {
        self.splits.iter().find(|(n, _)| n == split).map(|(_, d)| d)
    }

    /// The split, or an error naming the splits there are.
    pub fn split(&self, split: &str) -> Result<&Dataset> {
        self.get(split).ok_or_else(|| DatasetError::MissingColumn {
            name: split.to_owned(),
            available: self
                .splits
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// Adds or replaces a split.
    pub fn insert(&mut self, name: impl Into<String>, ds: Dataset) {
        let name = name.into();
        match self.splits.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = ds,
            None => self.splits.push((name, ds)),
        }
    }

    /// Applies `f` to every split (`dd.map(...)`, `dd.filter(...)`).
    pub fn try_map(&self, mut f: impl FnMut(&Dataset) -> Result<Dataset>) -> Result<Self> {
        let splits = self
            .splits
            .iter()
            .map(|(n, d)| Ok((n.clone(), f(d)?)))
            .collect::<Result<_>>()?;
        Ok(Self { splits })
    }

    /// `save_to_disk(dir)`: `dataset_dict.json` and one folder per split, atomically.
    pub fn save_to_disk(&self, dir: impl AsRef<Path>) -> Result<()> {
        replace_dir_atomically(dir.as_ref(), |tmp| {
            for (name, ds) in &self.splits {
                ds.write_split_files(&tmp.join(name))?;
            }
            let names: Vec<&str> = self.splits.iter().map(|(n, _)| n.as_str()).collect();
            write_json(&tmp.join("dataset_dict.json"), &json!({"splits": names}))
        })
    }

    /// `load_from_disk(dir)` for a `DatasetDict` saved by Python `datasets` or by Ember.
    pub fn load_from_disk(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let index = dir.join("dataset_dict.json");
        let v = read_json_file(&index)?;
        let names = v["splits"]
            .as_array()
            .ok_or_else(|| DatasetError::Metadata {
                path: index.clone(),
                message: "`splits` is not a list".into(),
            })?;
        let mut dd = DatasetDict::default();
        for n in names {
            let name = n.as_str().ok_or_else(|| DatasetError::Metadata {
                path: index.clone(),
                message: format!("split name {n} is not a string"),
            })?;
            dd.insert(name, Dataset::load_from_disk(dir.join(name))?);
        }
        Ok(dd)
    }
}

/// A size given as a fraction of the rows or as a number of rows (`test_size=0.1` / `=100`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SplitSize {
    /// A fraction in (0, 1).
    Fraction(f64),
    /// A number of rows.
    Count(usize),
}

/// The arguments of `train_test_split`, with HF's defaults (`test_size` 0.25 when neither size
/// is given, `shuffle` true).
#[derive(Debug, Clone, PartialEq)]
pub struct SplitOptions {
    /// `test_size`.
    pub test_size: Option<SplitSize>,
    /// `train_size`.
    pub train_size: Option<SplitSize>,
    /// `shuffle`: shuffle before splitting (default true).
    pub shuffle: bool,
    /// `seed` of the shuffle.
    pub seed: u64,
    /// `stratify_by_column`: a ClassLabel column whose class proportions both splits keep.
    pub stratify_by_column: Option<String>,
}

impl Default for SplitOptions {
    fn default() -> Self {
        Self {
            test_size: None,
            train_size: None,
            shuffle: true,
            seed: 0,
            stratify_by_column: None,
        }
    }
}

impl Dataset {
    /// `train_test_split(test_size, train_size, shuffle, seed, stratify_by_column)`: a
    /// `DatasetDict` with `train` and `test`. Sizes follow HF: `n_test = ceil(test_size * n)`,
    /// `n_train = floor(train_size * n)` (or the rest).
    pub fn train_test_split(&self, opts: &SplitOptions) -> Result<DatasetDict> {
        let n = self.num_rows();
        let (n_train, n_test) = split_sizes(n, opts)?;
        let indices: (Vec<usize>, Vec<usize>) = match &opts.stratify_by_column {
            Some(col) => self.stratified_indices(col, n_train, n_test, opts.seed)?,
            None => {
                let mut idx: Vec<usize> = (0..n).collect();
                if opts.shuffle {
                    idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(opts.seed));
                }
                (
                    idx[n_test..n_test + n_train].to_vec(),
                    idx[..n_test].to_vec(),
                )
            }
        };
        let mut dd = DatasetDict::default();
        dd.insert("train", self.select(&indices.0)?);
        dd.insert("test", self.select(&indices.1)?);
        Ok(dd)
    }

    /// Per class, test and train counts proportional to the class counts (largest remainders get
    /// the leftover rows, like scikit-learn's `_approximate_mode`), rows drawn at random.
    fn stratified_indices(
        &self,
        column: &str,
        n_train: usize,
        n_test: usize,
        seed: u64,
    ) -> Result<(Vec<usize>, Vec<usize>)> {
        let Some(Feature::ClassLabel(names)) = self.features().get(column).cloned() else {
            return Err(DatasetError::ColumnType {
                column: column.to_owned(),
                found: format!("{:?}", self.features().get(column)),
                expected: "a ClassLabel (cast_column or class_encode_column first)".into(),
            });
        };
        let labels = self.int_column(column)?;
        let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); names.len()];
        for (row, l) in labels.iter().enumerate() {
            match l {
                Some(l) if (*l as usize) < names.len() => by_class[*l as usize].push(row),
                other => {
                    return Err(DatasetError::LabelOutOfRange {
                        column: column.to_owned(),
                        row,
                        value: format!("{other:?}"),
                        names: names.clone(),
                    })
                }
            }
        }
        let counts: Vec<usize> = by_class.iter().map(Vec::len).collect();
        let test_counts = approximate_mode(&counts, n_test);
        let rest: Vec<usize> = counts
            .iter()
            .zip(&test_counts)
            .map(|(c, t)| c - t)
            .collect();
        let train_counts = approximate_mode(&rest, n_train);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (mut train, mut test) = (Vec::new(), Vec::new());
        for (k, mut rows) in by_class.into_iter().enumerate() {
            rows.shuffle(&mut rng);
            test.extend_from_slice(&rows[..test_counts[k]]);
            train.extend_from_slice(&rows[test_counts[k]..test_counts[k] + train_counts[k]]);
        }
        train.shuffle(&mut rng);
        test.shuffle(&mut rng);
        Ok((train, test))
    }
}

/// Splits `total` draws over classes in proportion to `counts`: floors first, then one more to
/// the classes with the largest remainders (ties to the lower class index).
fn approximate_mode(counts: &[usize], total: usize) -> Vec<usize> {
    let n: usize = counts.iter().sum();
    if n == 0 {
        return vec![0; counts.len()];
    }
    let exact: Vec<f64> = counts
        .iter()
        .map(|&c| c as f64 * total as f64 / n as f64)
        .collect();
    let mut out: Vec<usize> = exact.iter().map(|e| e.floor() as usize).collect();
    let mut left = total - out.iter().sum::<usize>();
    let mut order: Vec<usize> = (0..counts.len()).collect();
    order.sort_by(|&a, &b| {
        (exact[b] - exact[b].floor())
            .partial_cmp(&(exact[a] - exact[a].floor()))
            .unwrap()
    });
    for k in order {
        if left == 0 {
            break;
        }
        if out[k] < counts[k] {
            out[k] += 1;
            left -= 1;
        }
    }
    out
}

fn invalid(
    name: &'static str,
    value: impl std::fmt::Debug,
    message: impl Into<String>,
) -> DatasetError {
    DatasetError::InvalidArgument {
        name,
        value: format!("{value:?}"),
        message: message.into(),
    }
}

/// HF's sizes: `(n_train, n_test)`, with its validation of `test_size` / `train_size`.
fn split_sizes(n: usize, opts: &SplitOptions) -> Result<(usize, usize)> {
    let check = |name: &'static str, s: SplitSize| -> Result<()> {
        match s {
            SplitSize::Fraction(f) if !(f > 0.0 && f < 1.0) => {
                Err(invalid(name, f, "a fraction must be in (0, 1)"))
            }
            SplitSize::Count(c) if c == 0 || c >= n => Err(invalid(
                name,
                c,
                format!("a count must be in [1, {n}) for {n} rows"),
            )),
            _ => Ok(()),
        }
    };
    let test = match (opts.test_size, opts.train_size) {
        (None, None) => Some(SplitSize::Fraction(0.25)),
        (t, _) => t,
    };
    if let Some(t) = test {
        check("test_size", t)?;
    }
    if let Some(t) = opts.train_size {
        check("train_size", t)?;
    }
    let size = |s: SplitSize, round: fn(f64) -> f64| match s {
        SplitSize::Fraction(f) => round(f * n as f64) as usize,
        SplitSize::Count(c) => c,
    };
    // HF: the test size rounds up, the train size down; a missing one is the rest.
    let (n_train, n_test) = match (opts.train_size, test) {
        (Some(tr), Some(te)) => (size(tr, f64::floor), size(te, f64::ceil)),
        (Some(tr), None) => (size(tr, f64::floor), n - size(tr, f64::floor)),
        (None, Some(te)) => (n - size(te, f64::ceil).min(n), size(te, f64::ceil)),
        (None, None) => unreachable!("test_size defaults to 0.25"),
    };
    if n_train + n_test > n {
        return Err(invalid(
            "train_size",
            n_train,
            format!(
                "train_size + test_size = {} exceeds the {n} rows",
                n_train + n_test
            ),
        ));
    }
    if n_train == 0 {
        return Err(invalid(
            "train_size",
            n_train,
            "the train split would be empty",
        ));
    }
    Ok((n_train, n_test))
}
