//! Load a CSV (default: ChnSentiCorp from `../shared`), drop null rows of a text column, split it
//! 90/10 stratified by label, save the splits in the Python `datasets` layout and load them back.
//!
//! `cargo run -p ember-datasets --example split [-- FILE.csv TEXT_COLUMN LABEL_COLUMN OUT_DIR]`

use ember_datasets::{read_csv, DatasetDict, SplitOptions, SplitSize};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let default_csv = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/data/chnsenticorp/ChnSentiCorp_htl_all.csv"
    );
    let file = args.first().map(String::as_str).unwrap_or(default_csv);
    let text = args.get(1).map(String::as_str).unwrap_or("review");
    let label = args.get(2).map(String::as_str).unwrap_or("label");
    let out = args.get(3).cloned().unwrap_or_else(|| {
        std::env::temp_dir()
            .join("ember-split")
            .display()
            .to_string()
    });

    let ds = read_csv(file)?;
    println!(
        "{file}: {} rows, columns {:?}",
        ds.num_rows(),
        ds.column_names()
    );
    let ds = ds
        .filter(|row| !row[text].is_null())?
        .class_encode_column(label)?;
    let splits = ds.train_test_split(&SplitOptions {
        test_size: Some(SplitSize::Fraction(0.1)),
        stratify_by_column: Some(label.to_owned()),
        seed: 42,
        ..Default::default()
    })?;
    splits.save_to_disk(&out)?;
    let back = DatasetDict::load_from_disk(&out)?;
    for (name, d) in &back.splits {
        let labels = d.int_column(label)?;
        let ones = labels.iter().filter(|l| **l == Some(1)).count();
        println!(
            "{name}: {} rows, label 1 share {:.3}",
            d.num_rows(),
            ones as f64 / d.num_rows() as f64
        );
    }
    println!("saved to {out} (Python: datasets.load_from_disk({out:?}))");
    Ok(())
}
