//! The seed's data pipeline on ChnSentiCorp: tokenizing `map` over the 7,765 non-empty reviews
//! (bert-base-chinese, batches of 1,000, truncation to 128), and one DataLoader epoch (batches of
//! 32, padded by DataCollatorWithPadding, as burn tensors). `cargo xtask bench` times the same
//! work in Python `datasets` + `transformers` + torch's DataLoader.

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ember::datasets::{read_csv, DataCollatorWithPadding, DataLoader};
use ember::prelude::*;
use ember::tokenizers::{EncodeOptions, Truncation};
use std::path::PathBuf;

fn bench(c: &mut Criterion) {
    let shared = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared");
    if !shared.join("data").is_dir() {
        eprintln!(
            "SKIP datasets_pipeline bench: {} is absent",
            shared.display()
        );
        return;
    }
    let tok =
        AutoTokenizer::from_pretrained(shared.join("models/bert-base-chinese-vocab")).unwrap();
    let ds = read_csv(shared.join("data/chnsenticorp/ChnSentiCorp_htl_all.csv"))
        .unwrap()
        .filter(|r| !r["review"].is_null())
        .unwrap();
    let opts = EncodeOptions::default()
        .truncation(Truncation::LongestFirst)
        .max_length(128);
    let map = || ember::data::tokenize_map(&ds, &tok, "review", &opts, 1000, &["review"]).unwrap();
    let tokenized = map();
    let pad = tok.special_token_id("pad_token").unwrap() as i64;
    let loader = DataLoader::new(&tokenized, DataCollatorWithPadding::new(pad), 32)
        .unwrap()
        .shuffle(true)
        .num_workers(1);
    let device = default_device();

    let mut group = c.benchmark_group("datasets_pipeline");
    group.sample_size(10);
    group.throughput(Throughput::Elements(ds.num_rows() as u64));
    group.bench_function("tokenize_map_chnsenticorp", |b| b.iter(map));
    group.bench_function("dataloader_epoch_chnsenticorp", |b| {
        b.iter(|| {
            loader
                .iter::<Backend>(0, &device)
                .map(|batch| batch.unwrap().batch_size())
                .sum::<usize>()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
