//! The public API end to end: loading errors, batches as tensors, save / reload, training.

use ember_tokenizers::{
    demo, AutoTokenizer, EncodeOptions, Padding, Side, TokenizerError, Truncation,
};
use std::path::{Path, PathBuf};

type B = burn::backend::Flex;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizers")
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

#[test]
fn missing_directory_is_a_typed_error_naming_it() {
    let err = AutoTokenizer::from_pretrained("/no/such/tokenizer").unwrap_err();
    assert!(
        matches!(err, TokenizerError::MissingDirectory(ref p) if p == Path::new("/no/such/tokenizer"))
    );
    assert!(err.to_string().contains("/no/such/tokenizer"));
}

#[test]
fn empty_directory_names_the_expected_files() {
    let dir = tempfile::tempdir().unwrap();
    let err = AutoTokenizer::from_pretrained(dir.path()).unwrap_err();
    assert!(matches!(err, TokenizerError::NoTokenizerFiles(_)), "{err}");
    assert!(err.to_string().contains("vocab.txt"));
}

#[test]
fn malformed_json_names_the_file_and_position() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "tokenizer.json",
        "{\"version\": \"1.0\", \"model\": ",
    );
    let err = AutoTokenizer::from_pretrained(dir.path()).unwrap_err();
    assert!(matches!(err, TokenizerError::Json { .. }), "{err}");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
    assert!(err.to_string().contains("line 1"), "{err}");

    write(
        dir.path(),
        "tokenizer.json",
        "{\"version\": \"1.0\", \"model\": {\"type\": \"Nope\"}}",
    );
    let err = AutoTokenizer::from_pretrained(dir.path()).unwrap_err();
    assert!(
        matches!(err, TokenizerError::InvalidTokenizerFile { .. }),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "vocab.txt",
        "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\n",
    );
    write(
        dir.path(),
        "tokenizer_config.json",
        "{\"do_lower_case\": tru}",
    );
    let err = AutoTokenizer::from_pretrained(dir.path()).unwrap_err();
    assert!(err.to_string().contains("tokenizer_config.json"), "{err}");

    write(
        dir.path(),
        "tokenizer_config.json",
        "{\"padding_side\": \"middle\"}",
    );
    let err = AutoTokenizer::from_pretrained(dir.path()).unwrap_err();
    assert!(
        matches!(err, TokenizerError::InvalidField { ref field, .. } if field == "padding_side"),
        "{err}"
    );
}

#[test]
fn unknown_tokenizer_class_without_tokenizer_json_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "vocab.txt", "[PAD]\n[UNK]\nhello\n");
    write(
        dir.path(),
        "tokenizer_config.json",
        "{\"tokenizer_class\": \"XLNetTokenizer\"}",
    );
    let err = AutoTokenizer::from_pretrained(dir.path()).unwrap_err();
    assert!(
        matches!(err, TokenizerError::UnknownTokenizerClass { ref class, .. } if class == "XLNetTokenizer"),
        "{err}"
    );
}

#[test]
fn vocab_txt_with_config_follows_do_lower_case_and_special_tokens_map() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "vocab.txt",
        "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nHello\nhello\n<extra>\n",
    );
    write(
        dir.path(),
        "tokenizer_config.json",
        "{\"do_lower_case\": false, \"model_max_length\": 8}",
    );
    write(
        dir.path(),
        "special_tokens_map.json",
        "{\"additional_special_tokens\": [\"<extra>\"]}",
    );
    let tok = AutoTokenizer::from_pretrained(dir.path()).unwrap();
    assert_eq!(tok.encode("Hello hello", None, true).unwrap(), [2, 5, 6, 3]);
    assert_eq!(tok.encode("Hello<extra>", None, false).unwrap(), [5, 7]);
    assert_eq!(tok.decode(&[2, 5, 7, 3], true).unwrap(), "Hello");
    assert_eq!(tok.model_max_length(), Some(8));
    // truncation=True without max_length uses model_max_length.
    let opts = EncodeOptions::default().truncation(Truncation::LongestFirst);
    assert_eq!(
        tok.encode_one(&"hello ".repeat(20), None, &opts)
            .unwrap()
            .len(),
        8
    );
}

#[test]
fn max_length_below_the_special_tokens_is_a_typed_error() {
    let tok = demo::demo_tokenizer().unwrap();
    let opts = EncodeOptions::default().max_length(1);
    let err = tok.batch_encode(&["the room"], &opts).unwrap_err();
    assert!(
        matches!(
            err,
            TokenizerError::MaxLengthTooSmall {
                max_length: 1,
                special_tokens: 2,
                ..
            }
        ),
        "{err}"
    );
    let err = tok
        .batch_encode_pairs(&["a"], &["b"], &EncodeOptions::default().max_length(2))
        .unwrap_err();
    assert!(
        matches!(
            err,
            TokenizerError::MaxLengthTooSmall {
                special_tokens: 3,
                kind: "pair",
                ..
            }
        ),
        "{err}"
    );
    let err = tok
        .batch_encode(
            &["a"],
            &EncodeOptions::default()
                .max_length(5)
                .truncation(Truncation::OnlySecond),
        )
        .unwrap_err();
    assert!(matches!(err, TokenizerError::Truncation { .. }), "{err}");
    let err = tok
        .batch_encode_pairs(&["a", "b"], &["c"], &EncodeOptions::default())
        .unwrap_err();
    assert!(
        matches!(
            err,
            TokenizerError::PairCountMismatch { texts: 2, pairs: 1 }
        ),
        "{err}"
    );
}

#[test]
fn gpt2_without_pad_token_refuses_to_pad_until_one_is_set() {
    let mut tok = AutoTokenizer::from_pretrained(fixtures().join("gpt2-bpe")).unwrap();
    let opts = EncodeOptions::default()
        .padding(Padding::Longest)
        .padding_side(Side::Left);
    let err = tok.batch_encode(&["a b c", "a"], &opts).unwrap_err();
    assert!(matches!(err, TokenizerError::NoPadToken), "{err}");
    tok.set_special_token("pad_token", "<|endoftext|>").unwrap();
    let batch = tok
        .batch_encode(&["The room was clean", "The"], &opts)
        .unwrap();
    let pad = tok.special_token_id("pad_token").unwrap();
    assert_eq!(batch.input_ids()[1][0], pad, "left padding puts pads first");
    assert_eq!(batch.attention_mask()[1][0], 0);
}

#[test]
fn padded_batches_become_int_tensors_and_ragged_ones_a_typed_error() {
    let tok = demo::demo_tokenizer().unwrap();
    let device = Default::default();
    let ragged = tok
        .batch_encode(
            &["the room", "the room was clean"],
            &EncodeOptions::default(),
        )
        .unwrap();
    assert!(matches!(
        ragged.to_tensors::<B>(&device),
        Err(TokenizerError::RaggedBatch { index: 1, .. })
    ));
    let opts = EncodeOptions::default()
        .padding(Padding::MaxLength)
        .max_length(16);
    let batch = tok
        .batch_encode(&["the room", "the room was clean"], &opts)
        .unwrap();
    let t = batch.to_tensors::<B>(&device).unwrap();
    assert_eq!(t.input_ids.dims(), [2, 16]);
    let ids: Vec<i64> = t.input_ids.into_data().convert::<i64>().to_vec().unwrap();
    let expected: Vec<i64> = batch
        .input_ids()
        .concat()
        .into_iter()
        .map(i64::from)
        .collect();
    assert_eq!(ids, expected);
    let mask: Vec<i64> = t
        .attention_mask
        .into_data()
        .convert::<i64>()
        .to_vec()
        .unwrap();
    assert_eq!(mask.iter().sum::<i64>(), 4 + 6);
}

#[test]
fn word_ids_align_word_labels_for_ner() {
    let tok = demo::demo_tokenizer().unwrap();
    let batch = tok
        .batch_encode(&["unfamiliar room"], &EncodeOptions::default())
        .unwrap();
    let words = batch.word_ids(0);
    assert_eq!(words.first(), Some(&None), "[CLS]");
    assert_eq!(words.last(), Some(&None), "[SEP]");
    let pieces_of_first = words.iter().filter(|w| **w == Some(0)).count();
    assert!(
        pieces_of_first > 1,
        "an unknown word splits into several pieces: {words:?}"
    );
    assert_eq!(words[words.len() - 2], Some(1));
}

#[test]
fn save_pretrained_round_trips_and_is_atomic() {
    for source in [fixtures().join("gpt2-bpe")] {
        let tok = AutoTokenizer::from_pretrained(&source).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let written = tok.save_pretrained(dir.path()).unwrap();
        assert_eq!(written.len(), 3);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
        let back = AutoTokenizer::from_pretrained(dir.path()).unwrap();
        for text in ["The room was clean.", "房间很干净", "", "emoji 😀"] {
            assert_eq!(
                tok.encode(text, None, true).unwrap(),
                back.encode(text, None, true).unwrap()
            );
        }
        assert_eq!(tok.special_tokens(), back.special_tokens());
    }
}

#[test]
fn train_new_from_iterator_learns_wordpiece_and_bpe() {
    let wordpiece = demo::demo_tokenizer().unwrap();
    assert!(
        wordpiece.len() <= 600 && wordpiece.len() > 100,
        "{}",
        wordpiece.len()
    );
    // Special tokens come first and the post-processor points at their new ids.
    let ids = wordpiece.encode("room", None, true).unwrap();
    assert_eq!(ids[0], wordpiece.special_token_id("cls_token").unwrap());
    assert_eq!(
        *ids.last().unwrap(),
        wordpiece.special_token_id("sep_token").unwrap()
    );
    assert_eq!(wordpiece.tokenize("The room").unwrap(), ["the", "room"]);

    let bpe = AutoTokenizer::from_pretrained(fixtures().join("gpt2-bpe")).unwrap();
    let retrained = bpe
        .train_new_from_iterator(demo::DEMO_CORPUS.iter(), 400)
        .unwrap();
    assert!(retrained.len() <= 400, "{}", retrained.len());
    let text = "The noodles were delicious 好吃 😀";
    let ids = retrained.encode(text, None, false).unwrap();
    assert_eq!(
        retrained.decode(&ids, false).unwrap(),
        text,
        "byte-level BPE is lossless"
    );
    assert_eq!(retrained.special_token_id("eos_token"), Some(0));
}

#[test]
fn saved_folders_load_in_python_with_the_same_ids() {
    let Some(python) = ember_testkit::reference_python() else {
        return;
    };
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared");
    let mut sources: Vec<(String, AutoTokenizer)> = vec![
        (
            "gpt2-bpe".into(),
            AutoTokenizer::from_pretrained(fixtures().join("gpt2-bpe")).unwrap(),
        ),
        ("demo".into(), demo::demo_tokenizer().unwrap()),
    ];
    for m in ["models/all-MiniLM-L6-v2", "models/bert-base-chinese-vocab"] {
        if shared.join(m).is_dir() {
            sources.push((
                m.into(),
                AutoTokenizer::from_pretrained(shared.join(m)).unwrap(),
            ));
        }
    }
    let texts = [
        ("The room was clean, and the staff were friendly!", None),
        ("房间很干净，服务员也很热情。", Some("酒店离地铁站很近")),
        ("café naïve 😀 [MASK] ÉCOLE", None),
        ("", None),
    ];
    let root = tempfile::tempdir().unwrap();
    let mut request = Vec::new();
    for (name, tok) in &sources {
        let dir = root.path().join(name.replace('/', "_"));
        tok.save_pretrained(&dir).unwrap();
        let cases: Vec<_> = texts
            .iter()
            .map(|(t, p)| serde_json::json!({"text": t, "pair": p, "ids": tok.encode(t, *p, true).unwrap()}))
            .collect();
        request.push(serde_json::json!({"dir": dir, "cases": cases}));
    }
    let mut child = std::process::Command::new(python)
        .arg(fixtures().join("check_saved.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(&request).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
