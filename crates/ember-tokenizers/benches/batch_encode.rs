//! Batch encoding throughput: the MiniLM tokenizer (tokenizer.json) and the bert-base-chinese
//! vocabulary (vocab.txt) over real sentences, in batches of 64 with padding and truncation to
//! 128 tokens, as a fine-tuning `map(tokenize, batched=True)` does. `cargo xtask bench` runs the
//! same work through Python `transformers` and prints the ratio.

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ember_tokenizers::{AutoTokenizer, EncodeOptions, Padding, Truncation};
use std::path::PathBuf;

/// Sentences per corpus; the same numbers are in `xtask/bench/tokenizer_bench.py`.
const N: usize = 2000;
const BATCH: usize = 64;

fn shared() -> Option<PathBuf> {
    let dir = std::env::var_os("EMBER_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"));
    dir.join("data").is_dir().then_some(dir)
}

/// The first N ChnSentiCorp reviews that are not empty.
fn reviews(shared: &std::path::Path) -> Vec<String> {
    let mut reader =
        csv::Reader::from_path(shared.join("data/chnsenticorp/ChnSentiCorp_htl_all.csv")).unwrap();
    reader
        .records()
        .map(|r| r.unwrap().get(1).unwrap_or("").to_owned())
        .filter(|r| !r.is_empty())
        .take(N)
        .collect()
}

/// The first N CoNLL-2003 training sentences, words joined by spaces.
fn conll(shared: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(shared.join("data/ner/conll2003/train.txt")).unwrap();
    let mut out = Vec::new();
    let mut cur: Vec<&str> = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            if !cur.is_empty() {
                out.push(cur.join(" "));
                cur.clear();
            }
        } else if let Some(w) = line.split(' ').next().filter(|w| *w != "-DOCSTART-") {
            cur.push(w);
        }
    }
    out.truncate(N);
    out
}

fn encode_all(tok: &AutoTokenizer, texts: &[String], opts: &EncodeOptions) -> usize {
    texts
        .chunks(BATCH)
        .map(|b| tok.batch_encode(b, opts).unwrap().len())
        .sum()
}

fn bench(c: &mut Criterion) {
    let Some(shared) = shared() else {
        eprintln!("SKIP batch_encode bench: ../shared (real corpora and tokenizers) is absent");
        return;
    };
    let opts = EncodeOptions::default()
        .padding(Padding::Longest)
        .truncation(Truncation::LongestFirst)
        .max_length(128);
    let cases = [
        (
            "minilm_conll2003",
            "models/all-MiniLM-L6-v2",
            conll(&shared),
        ),
        (
            "bert_chinese_chnsenticorp",
            "models/bert-base-chinese-vocab",
            reviews(&shared),
        ),
    ];
    let mut group = c.benchmark_group("batch_encode");
    group.sample_size(10);
    for (name, model, texts) in cases {
        let tok = AutoTokenizer::from_pretrained(shared.join(model)).unwrap();
        group.throughput(Throughput::Elements(texts.len() as u64));
        group.bench_function(name, |b| b.iter(|| encode_all(&tok, &texts, &opts)));
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
