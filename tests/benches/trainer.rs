//! `ember train`'s loop against HF `Trainer`: one epoch over the first 128 non-empty
//! ChnSentiCorp reviews (bert-base-chinese vocabulary, truncated to 128 tokens, padded per
//! batch), batches of 32, AdamW, a 3-layer, hidden-256 BERT classifier built from config.
//! `cargo xtask bench` runs `xtask/bench/trainer_bench.py` (the same work through
//! `transformers.Trainer`) beside it.

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ember::datasets::{read_csv, DataCollatorWithPadding};
use ember::models::{BertConfig, BertForSequenceClassification};
use ember::prelude::*;
use ember::train::{IntervalStrategy, Trainer, TrainingArguments};
use std::path::PathBuf;

const ROWS: usize = 128;

fn bench(c: &mut Criterion) {
    let shared = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared");
    if !shared.join("data").is_dir() {
        eprintln!("SKIP trainer bench: {} is absent", shared.display());
        return;
    }
    let tok =
        AutoTokenizer::from_pretrained(shared.join("models/bert-base-chinese-vocab")).unwrap();
    let ds = read_csv(shared.join("data/chnsenticorp/ChnSentiCorp_htl_all.csv"))
        .unwrap()
        .filter(|r| !r["review"].is_null())
        .unwrap()
        .slice(0, ROWS)
        .unwrap();
    let opts = EncodeOptions::default()
        .truncation(Truncation::LongestFirst)
        .max_length(128);
    let train = ember::data::tokenize_map(&ds, &tok, "review", &opts, 1000, &["review"]).unwrap();
    let config = BertConfig {
        vocab_size: 21128,
        hidden_size: 256,
        num_hidden_layers: 3,
        num_attention_heads: 4,
        intermediate_size: 1024,
        ..BertConfig::default()
    };
    let model = BertForSequenceClassification::<TrainBackend>::new(&config, &default_device());
    let out = tempfile::tempdir().unwrap();
    let mut args = TrainingArguments::new(out.path());
    args.per_device_train_batch_size = 32;
    args.num_train_epochs = 1.0;
    args.save_strategy = IntervalStrategy::No;
    args.logging_strategy = IntervalStrategy::No;
    args.disable_tqdm = true;
    let pad = i64::from(tok.special_token_id("pad_token").unwrap());

    let mut group = c.benchmark_group("trainer");
    group.sample_size(10);
    group.throughput(Throughput::Elements(ROWS as u64));
    group.bench_function("epoch_chnsenticorp_128_rows", |b| {
        b.iter(|| {
            let mut trainer = Trainer::new(
                args.clone(),
                model.clone(),
                DataCollatorWithPadding::new(pad),
                default_device(),
            )
            .unwrap()
            .train_dataset(train.clone());
            trainer.train().unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
