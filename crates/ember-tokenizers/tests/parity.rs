//! Parity with Python `transformers` 5: ids, masks, offsets, word ids and decoded text must be
//! exactly what `tests/fixtures/tokenizers/make_fixtures.py` recorded, on real corpora
//! (ChnSentiCorp reviews, CoNLL-2003 sentences from `../shared`) and on edge cases.

use ember_tokenizers::{AutoTokenizer, BatchEncoding, EncodeOptions, Padding, Side, Truncation};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixtures() -> PathBuf {
    workspace().join("tests/fixtures/tokenizers")
}

/// `../shared` beside the checkout (or `EMBER_SHARED`); `None`, with a message, when absent.
fn shared() -> Option<PathBuf> {
    let dir = std::env::var_os("EMBER_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("../shared"));
    if dir.join("data").is_dir() {
        Some(dir)
    } else {
        eprintln!("SKIP: shared data folder {} is absent", dir.display());
        None
    }
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xCBF29CE484222325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001B3);
    }
    h
}

/// One input's outputs, the same fields the fixture script records.
#[derive(Debug, serde::Serialize)]
struct Record {
    tokens: Vec<String>,
    input_ids: Vec<u32>,
    token_type_ids: Vec<u32>,
    attention_mask: Vec<u32>,
    offset_mapping: Vec<(usize, usize)>,
    word_ids: Vec<Option<u32>>,
    decoded: String,
    decoded_skip: String,
}

impl Record {
    fn of(tok: &AutoTokenizer, text: &str) -> Record {
        let batch = tok
            .batch_encode(&[text], &EncodeOptions::default())
            .unwrap();
        let ids = batch.input_ids().remove(0);
        Record {
            tokens: tok.tokenize(text).unwrap(),
            token_type_ids: batch.token_type_ids().remove(0),
            attention_mask: batch.attention_mask().remove(0),
            offset_mapping: batch.offset_mapping().remove(0),
            word_ids: batch.word_ids(0).to_vec(),
            decoded: tok.decode(&ids, false).unwrap(),
            decoded_skip: tok.decode(&ids, true).unwrap(),
            input_ids: ids,
        }
    }

    /// The same canonical string as `canonical()` in the fixture script.
    fn digest(&self) -> String {
        let ints = |xs: &[u32]| xs.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        let parts = [
            ints(&self.input_ids),
            ints(&self.token_type_ids),
            ints(&self.attention_mask),
            offsets(&self.offset_mapping),
            word_ids(&self.word_ids),
            self.tokens.join("\u{1}"),
            self.decoded.clone(),
            self.decoded_skip.clone(),
        ];
        format!("{:016x}", fnv1a64(parts.join("\u{2}").as_bytes()))
    }
}

/// Offsets as the fixture script writes them: `start-end`, comma-separated.
fn offsets(pairs: &[(usize, usize)]) -> String {
    pairs
        .iter()
        .map(|(s, e)| format!("{s}-{e}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Word ids as the fixture script writes them: `N` for none, comma-separated.
fn word_ids(ids: &[Option<u32>]) -> String {
    ids.iter()
        .map(|w| w.map_or("N".to_string(), |w| w.to_string()))
        .collect::<Vec<_>>()
        .join(",")
}

fn check_entry(tok: &AutoTokenizer, what: &str, text: &str, entry: &Value) {
    let got = Record::of(tok, text);
    // Edge cases (our text) are stored in full; corpus rows only as a digest.
    if let Some(full) = entry.get("full").and_then(Value::as_object) {
        assert!(
            full.contains_key("input_ids"),
            "{what}: fixture without ids"
        );
        let got = serde_json::to_value(&got).unwrap();
        for (field, expected) in full {
            assert_eq!(&got[field], expected, "{what}: {field} of {text:?}");
        }
    }
    assert_eq!(
        got.input_ids.len() as u64,
        entry["n_tokens"].as_u64().unwrap(),
        "{what}: token count"
    );
    assert_eq!(
        got.digest(),
        entry["digest"].as_str().unwrap(),
        "{what}: digest of outputs differs"
    );
}

fn chnsenticorp(shared: &Path) -> Vec<String> {
    let path = shared.join("data/chnsenticorp/ChnSentiCorp_htl_all.csv");
    let mut reader = csv::Reader::from_path(&path).unwrap();
    let review = reader
        .headers()
        .unwrap()
        .iter()
        .position(|h| h == "review")
        .unwrap();
    reader
        .records()
        .map(|r| r.unwrap().get(review).unwrap_or("").to_owned())
        .collect()
}

/// CoNLL-2003 sentences, parsed as the fixture script does.
fn conll(shared: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(shared.join("data/ner/conll2003/train.txt")).unwrap();
    let (mut out, mut cur) = (Vec::new(), Vec::<&str>::new());
    for line in text.split('\n') {
        if line.trim().is_empty() {
            if !cur.is_empty() {
                out.push(cur.join(" "));
                cur.clear();
            }
            continue;
        }
        let word = line.split(' ').next().unwrap();
        if word != "-DOCSTART-" {
            cur.push(word);
        }
    }
    if !cur.is_empty() {
        out.push(cur.join(" "));
    }
    out
}

fn options_from_kwargs(kwargs: &Value) -> EncodeOptions {
    let mut o = EncodeOptions::default();
    for (k, v) in kwargs.as_object().unwrap() {
        o = match (k.as_str(), v) {
            ("max_length", v) => o.max_length(v.as_u64().unwrap() as usize),
            ("truncation", Value::Bool(true)) => o.truncation(Truncation::LongestFirst),
            ("truncation", Value::String(s)) => o.truncation(match s.as_str() {
                "longest_first" => Truncation::LongestFirst,
                "only_first" => Truncation::OnlyFirst,
                "only_second" => Truncation::OnlySecond,
                other => panic!("unknown strategy {other}"),
            }),
            ("padding", Value::Bool(true)) => o.padding(Padding::Longest),
            ("padding", Value::String(s)) if s == "longest" => o.padding(Padding::Longest),
            ("padding", Value::String(s)) if s == "max_length" => o.padding(Padding::MaxLength),
            ("padding_side", Value::String(s)) => {
                o.padding_side(if s == "left" { Side::Left } else { Side::Right })
            }
            ("truncation_side", Value::String(s)) => {
                o.truncation_side(if s == "left" { Side::Left } else { Side::Right })
            }
            ("pad_to_multiple_of", v) => o.pad_to_multiple_of(v.as_u64().unwrap() as usize),
            ("add_special_tokens", Value::Bool(b)) => o.add_special_tokens(*b),
            other => panic!("fixture kwarg not mapped: {other:?}"),
        };
    }
    o
}

fn check_batch(tok: &AutoTokenizer, case: &str, expected: &Value, corpora: &[(&str, Vec<String>)]) {
    let text_of = |r: &Value| -> String {
        let (name, i) = (r[0].as_str().unwrap(), r[1].as_u64().unwrap() as usize);
        corpora.iter().find(|(n, _)| *n == name).unwrap().1[i].clone()
    };
    let texts: Vec<String> = expected["batch_inputs"]["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(text_of)
        .collect();
    let pairs: Vec<String> = expected["batch_inputs"]["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(text_of)
        .collect();
    for bc in expected["batch_cases"].as_array().unwrap() {
        let name = bc["name"].as_str().unwrap();
        let opts = options_from_kwargs(&bc["kwargs"]);
        let got = if bc["pairs"].as_bool().unwrap() {
            tok.batch_encode_pairs(&texts, &pairs, &opts)
        } else {
            tok.batch_encode(&texts, &opts)
        };
        if let Some(err) = bc.get("error") {
            assert!(
                got.is_err(),
                "{case}/{name}: Python refused ({err}) but Ember encoded"
            );
            continue;
        }
        let got: BatchEncoding = got.unwrap_or_else(|e| panic!("{case}/{name}: {e}"));
        // Python's outputs on corpus text are stored only as a digest (see `batch_canonical`
        // in the fixture script): each row's ids, type ids, mask, offsets and word ids.
        let lengths: Vec<usize> = serde_json::from_value(bc["lengths"].clone()).unwrap();
        let got_lengths: Vec<usize> = got.input_ids().iter().map(Vec::len).collect();
        assert_eq!(got_lengths, lengths, "{case}/{name}: row lengths");
        let ints = |xs: &[u32]| xs.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        let rows: Vec<String> = (0..texts.len())
            .map(|i| {
                [
                    ints(&got.input_ids()[i]),
                    ints(&got.token_type_ids()[i]),
                    ints(&got.attention_mask()[i]),
                    offsets(&got.offset_mapping()[i]),
                    word_ids(got.word_ids(i)),
                ]
                .join("\u{2}")
            })
            .collect();
        assert_eq!(
            format!("{:016x}", fnv1a64(rows.join("\u{3}").as_bytes())),
            bc["digest"].as_str().unwrap(),
            "{case}/{name}: digest of the batch differs; Ember gave {rows:?}"
        );
    }
}

fn check_case(case: &str, tok: &AutoTokenizer, shared: &Path) {
    let path = fixtures().join(format!("expected-{case}.json"));
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(
        tok.vocab_size() as u64,
        expected["vocab_size"].as_u64().unwrap(),
        "{case}: vocab_size"
    );
    assert_eq!(
        tok.len() as u64,
        expected["len"].as_u64().unwrap(),
        "{case}: len"
    );
    assert_eq!(
        tok.model_max_length().map(|n| n as u64),
        expected["model_max_length"].as_u64(),
        "{case}"
    );
    for (role, token) in expected["special_tokens"].as_object().unwrap() {
        assert_eq!(
            tok.special_tokens().get(role),
            token.as_str(),
            "{case}: {role}"
        );
    }
    for entry in expected["edge_cases"].as_array().unwrap() {
        check_entry(tok, case, entry["text"].as_str().unwrap(), entry);
    }
    let corpora = [
        ("chnsenticorp", chnsenticorp(shared)),
        ("conll2003", conll(shared)),
    ];
    let mut n = 0;
    for (name, texts) in &corpora {
        for entry in expected["corpora"][name].as_array().unwrap() {
            let i = entry["index"].as_u64().unwrap() as usize;
            check_entry(tok, &format!("{case}/{name}[{i}]"), &texts[i], entry);
            n += 1;
        }
    }
    assert!(n >= 1000, "{case}: only {n} corpus sentences checked");
    check_batch(tok, case, &expected, &corpora);

    let conv = &expected["convert"];
    let probe: Vec<String> = serde_json::from_value(conv["tokens"].clone()).unwrap();
    let ids: Vec<u32> = serde_json::from_value(conv["ids"].clone()).unwrap();
    assert_eq!(
        tok.convert_tokens_to_ids(&probe).unwrap(),
        ids,
        "{case}: convert_tokens_to_ids"
    );
    let of: Vec<u32> = serde_json::from_value(conv["ids_to_tokens_of"].clone()).unwrap();
    let toks: Vec<String> = serde_json::from_value(conv["ids_to_tokens"].clone()).unwrap();
    assert_eq!(
        tok.convert_ids_to_tokens(&of, false).unwrap(),
        toks,
        "{case}: convert_ids_to_tokens"
    );
    let pieces: Vec<String> = serde_json::from_value(conv["tokens_to_string_of"].clone()).unwrap();
    assert_eq!(
        tok.convert_tokens_to_string(&pieces).unwrap(),
        conv["tokens_to_string"].as_str().unwrap(),
        "{case}: convert_tokens_to_string"
    );
    eprintln!(
        "{case}: {n} corpus sentences and {} edge cases match Python",
        expected["edge_cases"].as_array().unwrap().len()
    );
}

#[test]
fn minilm_from_tokenizer_json_matches_python() {
    let Some(shared) = shared() else { return };
    let tok = AutoTokenizer::from_pretrained(shared.join("models/all-MiniLM-L6-v2")).unwrap();
    check_case("minilm-tokenizer-json", &tok, &shared);
}

#[test]
fn minilm_from_vocab_txt_alone_matches_python() {
    let Some(shared) = shared() else { return };
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        shared.join("models/all-MiniLM-L6-v2/vocab.txt"),
        dir.path().join("vocab.txt"),
    )
    .unwrap();
    let tok = AutoTokenizer::from_pretrained(dir.path()).unwrap();
    check_case("minilm-vocab-txt", &tok, &shared);
}

#[test]
fn bert_base_chinese_vocab_matches_python() {
    let Some(shared) = shared() else { return };
    let tok =
        AutoTokenizer::from_pretrained(shared.join("models/bert-base-chinese-vocab")).unwrap();
    check_case("bert-base-chinese-vocab", &tok, &shared);
}

#[test]
fn gpt2_byte_level_bpe_matches_python() {
    let Some(shared) = shared() else { return };
    let tok = AutoTokenizer::from_pretrained(fixtures().join("gpt2-bpe")).unwrap();
    check_case("gpt2-bpe", &tok, &shared);
}
