//! Hugging Face `datasets` for Rust, on Apache Arrow.
//!
//! [`Dataset`] is one Arrow table with HF [`Features`] (`Value`, `ClassLabel`, `List`) and the HF
//! operations: `select`, `filter`, batched `map`, `shuffle`, `train_test_split` (with
//! `stratify_by_column`), `rename_column`, `remove_columns`, `cast_column`,
//! `class_encode_column`, `sort`, `unique`. [`DatasetDict`] holds named splits.
//! [`read_csv`] / [`read_json`] load files as `load_dataset("csv" | "json", ...)` does, and
//! `save_to_disk` / `load_from_disk` use the folder layout of Python `datasets`, so a dataset
//! moves between the two without conversion.
//!
//! ```no_run
//! use ember_datasets::{read_csv, Feature, SplitOptions, SplitSize};
//! let ds = read_csv("ChnSentiCorp_htl_all.csv")?
//!     .filter(|row| !row["review"].is_null())?
//!     .cast_column("label", Feature::ClassLabel(vec!["0".into(), "1".into()]))?;
//! let splits = ds.train_test_split(&SplitOptions {
//!     test_size: Some(SplitSize::Fraction(0.1)),
//!     stratify_by_column: Some("label".into()),
//!     ..Default::default()
//! })?;
//! splits.save_to_disk("chnsenticorp-split")?;
//! # Ok::<(), ember_datasets::DatasetError>(())
//! ```

mod burn_traits;
mod collate;
mod dataset;
mod dict;
mod error;
mod features;
mod io;
mod language_modeling;
mod load;
mod loader;
mod ner;
mod progress;

pub use arrow;
pub use burn_traits::BurnBatcher;
pub use collate::{
    Batch, BatchLabels, Collator, DataCollatorForTokenClassification, DataCollatorWithPadding,
    Example, ExampleDataset, Label, PaddedBatch, PaddedLabels, PaddingSide, IGNORE_INDEX,
};
pub use dataset::Dataset;
pub use dict::{DatasetDict, SplitOptions, SplitSize};
pub use error::{DatasetError, Result};
pub use features::{Feature, Features};
pub use io::{read_csv, read_json, read_parquet, write_atomic};
pub use language_modeling::{DataCollatorForLanguageModeling, MlmConfig};
pub use load::{load_dataset, load_dataset_split, Builder, DataFiles};
pub use loader::{DataLoader, DataLoaderIter};
pub use ner::{read_conll, read_conll_with_labels};
