//! The seed's dataset steps end to end on the real ChnSentiCorp file: load the CSV, drop the
//! null review, stratified 90/10 split, batched `map` with the bert-base-chinese tokenizer,
//! save, load, and DataLoader batches with padding as burn tensors.

use ember::datasets::{
    read_csv, DataCollatorWithPadding, DataLoader, Dataset, DatasetDict, SplitOptions, SplitSize,
};
use ember::prelude::*;
use ember::tokenizers::{EncodeOptions, Truncation};
use std::path::PathBuf;

fn shared() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared");
    if dir.join("data").is_dir() {
        Some(dir)
    } else {
        eprintln!("SKIP: shared data folder {} is absent", dir.display());
        None
    }
}

#[test]
fn chnsenticorp_seed_sequence() {
    let Some(shared) = shared() else { return };
    let tok =
        AutoTokenizer::from_pretrained(shared.join("models/bert-base-chinese-vocab")).unwrap();
    let ds = read_csv(shared.join("data/chnsenticorp/ChnSentiCorp_htl_all.csv")).unwrap();
    assert_eq!(ds.num_rows(), 7766);
    let ds = ds.filter(|row| !row["review"].is_null()).unwrap();
    assert_eq!(ds.num_rows(), 7765);
    let ds = ds.class_encode_column("label").unwrap();
    let splits = ds
        .train_test_split(&SplitOptions {
            test_size: Some(SplitSize::Fraction(0.1)),
            stratify_by_column: Some("label".into()),
            seed: 42,
            ..Default::default()
        })
        .unwrap();

    let opts = EncodeOptions::default()
        .truncation(Truncation::LongestFirst)
        .max_length(128);
    let tokenized = splits
        .try_map(|d| ember::data::tokenize_map(d, &tok, "review", &opts, 1000, &["review"]))
        .unwrap();
    let train = tokenized.split("train").unwrap();
    assert_eq!(
        train.column_names(),
        ["label", "input_ids", "token_type_ids", "attention_mask"]
    );
    assert_eq!(
        (
            train.num_rows(),
            tokenized.split("test").unwrap().num_rows()
        ),
        (6988, 777)
    );
    // The map gives exactly the tokenizer's ids for a row.
    let row = train.row(0).unwrap();
    let ids: Vec<u64> = row["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert!(ids.len() <= 128 && ids[0] == 101 && *ids.last().unwrap() == 102);

    let dir = tempfile::tempdir().unwrap();
    tokenized
        .save_to_disk(dir.path().join("tokenized"))
        .unwrap();
    let back = DatasetDict::load_from_disk(dir.path().join("tokenized")).unwrap();
    let test: &Dataset = back.split("test").unwrap();
    assert_eq!(test.num_rows(), 777);

    let pad = tok.special_token_id("pad_token").unwrap() as i64;
    let loader = DataLoader::new(test, DataCollatorWithPadding::new(pad), 32)
        .unwrap()
        .num_workers(2);
    assert_eq!(
        loader.len(),
        25,
        "777 rows in batches of 32, last one partial"
    );
    let device = default_device();
    let mut rows = 0;
    let mut positives = 0;
    for batch in loader.iter::<Backend>(0, &device) {
        let batch = batch.unwrap();
        let [b, s] = batch.input_ids.dims();
        assert!(s <= 128);
        assert_eq!(batch.attention_mask.dims(), [b, s]);
        rows += b;
        if let ember::datasets::BatchLabels::Sequence(labels) = &batch.labels.unwrap() {
            positives += labels
                .clone()
                .into_data()
                .convert::<i64>()
                .to_vec::<i64>()
                .unwrap()
                .iter()
                .sum::<i64>() as usize;
        } else {
            panic!("sequence classification labels expected");
        }
    }
    assert_eq!(rows, 777);
    let share = positives as f64 / 777.0;
    assert!(
        (share - 5322.0 / 7765.0).abs() < 0.01,
        "label-1 share {share} in the test split"
    );
}
