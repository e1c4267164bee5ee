//! Hugging Face `datasets` for Rust.
//!
//! This crate will hold `Dataset` / `DatasetDict` on Apache Arrow, the CSV / JSON / Parquet
//! loaders, `save_to_disk` / `load_from_disk` in the Python layout, the `DataLoader` and the
//! collators. It is filled by a later milestone and exports nothing yet.
