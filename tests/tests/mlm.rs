//! `DataCollatorForLanguageModeling(mlm=True)`: its masking statistics against HF's on the same
//! batches (`tests/fixtures/datasets/make_mlm_fixtures.py`, 2000 draws each), the structural
//! rules exactly (specials and padding never selected, labels -100 elsewhere, shapes with
//! `pad_to_multiple_of`, one seed one sequence of masks), the argument errors, and a masked-LM
//! training run of `BertForMaskedLM` through the `Trainer` on ChnSentiCorp.

use ember::datasets::{
    read_csv, Collator, DataCollatorForLanguageModeling, DataCollatorWithPadding, DataLoader,
    Dataset, DatasetError, Example, MlmConfig, PaddedBatch, PaddedLabels,
};
use ember::models::{BertConfig, BertForMaskedLM};
use ember::prelude::*;
use ember::tokenizers::{AutoTokenizer, EncodeOptions, Truncation};
use ember::train::{IntervalStrategy, Trainer, TrainingArguments};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn fixture() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/datasets/mlm-expected.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ints(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

fn matrix(v: &Value) -> Vec<Vec<i64>> {
    v.as_array().unwrap().iter().map(ints).collect()
}

/// The HF settings of the fixture as an [`MlmConfig`] (seed set by the caller).
fn config(expected: &Value) -> MlmConfig {
    let tok = &expected["tokenizer"];
    MlmConfig::new(
        tok["mask_token_id"].as_i64(),
        tok["len"].as_u64().unwrap() as usize,
        ints(&tok["all_special_ids"]),
    )
    .mlm_probability(expected["mlm_probability"].as_f64().unwrap())
    .mask_replace_prob(expected["mask_replace_prob"].as_f64().unwrap())
    .random_replace_prob(expected["random_replace_prob"].as_f64().unwrap())
}

fn token_labels(batch: &PaddedBatch) -> &[i64] {
    match &batch.labels {
        Some(PaddedLabels::Tokens(l)) => l,
        other => panic!("expected per-token labels, got {other:?}"),
    }
}

/// What the fixture records of `draws` collations of one batch.
#[derive(Debug, Default)]
struct Stats {
    /// `[row][position]`: how often the position was selected.
    selected_counts: Vec<Vec<i64>>,
    selected: i64,
    to_mask: i64,
    unchanged: i64,
    other: i64,
    other_below_half_vocab: i64,
}

impl Stats {
    fn from_fixture(case: &Value) -> Self {
        let n = |k: &str| case[k].as_i64().unwrap();
        Self {
            selected_counts: matrix(&case["selected_counts"]),
            selected: n("selected"),
            to_mask: n("to_mask"),
            unchanged: n("unchanged"),
            other: n("other"),
            other_below_half_vocab: n("other_below_half_vocab"),
        }
    }
}

/// Collates `rows` `draws` times with `collator`, checking the structural rules on every draw
/// exactly (as the Python script does on HF's), and counts what the fixture counts.
/// `never[row][pos]` is 1 where a position is special or padding.
fn draw(
    collator: &DataCollatorForLanguageModeling,
    rows: &[Vec<i64>],
    never: &[Vec<i64>],
    draws: usize,
    mask_id: i64,
    vocab: i64,
) -> Stats {
    let examples: Vec<Example> = rows.iter().map(|r| Example::new(r.clone())).collect();
    let reference = DataCollatorWithPadding::new(collator.pad_token_id)
        .pad_to_multiple_of(collator.pad_to_multiple_of.unwrap_or(1))
        .pad(&examples)
        .unwrap();
    let (b, l) = (reference.batch_size, reference.seq_len);
    let never: Vec<bool> = never.iter().flatten().map(|&x| x != 0).collect();
    assert_eq!(
        never.len(),
        b * l,
        "the fixture's shape is the padded shape"
    );
    let mut stats = Stats {
        selected_counts: vec![vec![0; l]; b],
        ..Stats::default()
    };
    for _ in 0..draws {
        let batch = collator.pad(&examples).unwrap();
        assert_eq!((batch.batch_size, batch.seq_len), (b, l));
        assert_eq!(batch.attention_mask, reference.attention_mask);
        let labels = token_labels(&batch);
        for i in 0..b * l {
            let (orig, got, label) = (reference.input_ids[i], batch.input_ids[i], labels[i]);
            if label == -100 {
                assert_eq!(got, orig, "an unselected input changed at {i}");
                continue;
            }
            assert!(!never[i], "special or padding position {i} selected");
            assert_eq!(
                label, orig,
                "the label of a selected position is its original id"
            );
            stats.selected_counts[i / l][i % l] += 1;
            stats.selected += 1;
            if got == mask_id {
                stats.to_mask += 1;
            } else if got == orig {
                stats.unchanged += 1;
            } else {
                stats.other += 1;
                stats.other_below_half_vocab += i64::from(got < vocab / 2);
            }
        }
    }
    stats
}

/// `|a/n - b/m| <= k` standard deviations of the difference of two binomial proportions with
/// the pooled rate.
fn close(what: &str, a: i64, n: i64, b: i64, m: i64, k: f64) -> Result<(), String> {
    let (pa, pb) = (a as f64 / n as f64, b as f64 / m as f64);
    let p = (a + b) as f64 / (n + m) as f64;
    let sd = (p * (1.0 - p) * (1.0 / n as f64 + 1.0 / m as f64)).sqrt();
    if (pa - pb).abs() <= k * sd {
        Ok(())
    } else {
        Err(format!(
            "{what}: Ember {pa:.5} vs HF {pb:.5}, {:.1} sd apart (bound {k})",
            (pa - pb).abs() / sd
        ))
    }
}

/// Ember's statistics against HF's: the selection rate per position and over the batch, and
/// what the selected inputs became.
fn compare(ours: &Stats, hf: &Stats, never: &[Vec<i64>], draws: i64) -> Result<(), String> {
    let mut maskable = 0;
    for (r, row) in hf.selected_counts.iter().enumerate() {
        for (t, &h) in row.iter().enumerate() {
            let e = ours.selected_counts[r][t];
            if never[r][t] != 0 {
                // Exact: HF never selects these; `draw` already refused any such selection.
                assert_eq!((e, h), (0, 0), "position ({r}, {t})");
                continue;
            }
            maskable += 1;
            // About 200 positions per case: 5 sd keeps the chance that any one of them strays
            // by luck near 1e-4, where 4 sd would be a few percent.
            close(
                &format!("position ({r}, {t}) selection rate"),
                e,
                draws,
                h,
                draws,
                5.0,
            )?;
        }
    }
    let n = maskable * draws;
    close("selection rate", ours.selected, n, hf.selected, n, 4.0)?;
    close(
        "[MASK] share",
        ours.to_mask,
        ours.selected,
        hf.to_mask,
        hf.selected,
        4.0,
    )?;
    close(
        "unchanged share",
        ours.unchanged,
        ours.selected,
        hf.unchanged,
        hf.selected,
        4.0,
    )?;
    close(
        "random share",
        ours.other,
        ours.selected,
        hf.other,
        hf.selected,
        4.0,
    )?;
    close(
        "random tokens in the lower half of the vocabulary",
        ours.other_below_half_vocab,
        ours.other,
        hf.other_below_half_vocab,
        hf.other,
        4.0,
    )
}

/// Draws the fixture's number of batches of `rows` with `config` and compares with `case`.
fn run_case(
    expected: &Value,
    case: &Value,
    rows: &[Vec<i64>],
    config: MlmConfig,
) -> Result<(), String> {
    let draws = expected["draws"].as_i64().unwrap();
    let tok = &expected["tokenizer"];
    let pad = tok["pad_token_id"].as_i64().unwrap();
    let collator = DataCollatorForLanguageModeling::mlm(pad, config)
        .unwrap()
        .pad_to_multiple_of(expected["pad_to_multiple_of"].as_u64().unwrap() as usize);
    let never = matrix(&case["never_masked"]);
    let ours = draw(
        &collator,
        rows,
        &never,
        draws as usize,
        tok["mask_token_id"].as_i64().unwrap(),
        tok["len"].as_i64().unwrap(),
    );
    let hf = Stats::from_fixture(case);
    let share = |s: &Stats| {
        let n = s.selected as f64;
        (
            s.to_mask as f64 / n,
            s.unchanged as f64 / n,
            s.other as f64 / n,
        )
    };
    eprintln!(
        "selected {} (HF {}); [MASK] / unchanged / random shares {:.4?} (HF {:.4?})",
        ours.selected,
        hf.selected,
        share(&ours),
        share(&hf)
    );
    compare(&ours, &hf, &never, draws)
}

#[test]
fn masking_statistics_match_hf_on_the_synthetic_batch() {
    let expected = fixture();
    let case = &expected["cases"]["synthetic"];
    let rows = matrix(&case["input_ids"]);
    // Another seed than HF's: the draws differ, the statistics must not.
    for seed in [0, 99] {
        run_case(&expected, case, &rows, config(&expected).seed(seed)).unwrap();
    }
}

/// FNV-1a 64 of rows of ids written `1,2,3;4,5`, as the Python script hashes them.
fn ids_digest(rows: &[Vec<i64>]) -> String {
    let text = rows
        .iter()
        .map(|r| r.iter().map(i64::to_string).collect::<Vec<_>>().join(","))
        .collect::<Vec<_>>()
        .join(";");
    let mut h: u64 = 0xcbf29ce484222325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

fn chinese_tokenizer() -> Option<AutoTokenizer> {
    let dir = ember_testkit::shared("models/bert-base-chinese-vocab")?;
    Some(AutoTokenizer::from_pretrained(dir).unwrap())
}

fn chnsenticorp() -> Option<PathBuf> {
    ember_testkit::shared("data/chnsenticorp/ChnSentiCorp_htl_all.csv")
}

#[test]
fn masking_statistics_match_hf_on_chnsenticorp_reviews() {
    let (Some(tok), Some(csv)) = (chinese_tokenizer(), chnsenticorp()) else {
        return;
    };
    let expected = fixture();
    let case = &expected["cases"]["chnsenticorp"];
    let ds = read_csv(csv).unwrap();
    let opts = EncodeOptions::default()
        .truncation(Truncation::LongestFirst)
        .max_length(case["max_length"].as_u64().unwrap() as usize);
    let rows: Vec<Vec<i64>> = ints(&case["row_indices"])
        .into_iter()
        .map(|i| {
            let row = ds.row(i as usize).unwrap();
            let text = row["review"].as_str().unwrap().to_owned();
            let enc = tok.encode_one(&text, None, &opts).unwrap();
            enc.get_ids().iter().map(|&x| i64::from(x)).collect()
        })
        .collect();
    assert_eq!(
        ids_digest(&rows),
        case["ids_digest"].as_str().unwrap(),
        "the same batch as HF's"
    );
    run_case(&expected, case, &rows, config(&expected).seed(7)).unwrap();
}

/// The comparison can fail: a collator with another split (70 / 20 / 10) or another selection
/// rate (0.17) is told apart from HF's 0.15 and 80 / 10 / 10 on the same draws.
#[test]
fn a_wrong_split_or_rate_fails_the_statistics_comparison() {
    let expected = fixture();
    let case = &expected["cases"]["synthetic"];
    let rows = matrix(&case["input_ids"]);
    let split = config(&expected)
        .mask_replace_prob(0.7)
        .random_replace_prob(0.2)
        .seed(0);
    let err = run_case(&expected, case, &rows, split).unwrap_err();
    assert!(err.contains("share"), "{err}");
    let rate = config(&expected).mlm_probability(0.17).seed(0);
    let err = run_case(&expected, case, &rows, rate).unwrap_err();
    assert!(err.contains("selection rate"), "{err}");
}

fn small_config(seed: u64) -> MlmConfig {
    // A 50-token vocabulary: 0 = pad, 1 = cls, 2 = sep, 3 = mask, 4 = unk.
    MlmConfig::new(Some(3), 50, [0, 1, 2, 3, 4]).seed(seed)
}

fn small_rows() -> Vec<Example> {
    vec![
        Example::new(vec![1, 10, 11, 12, 13, 14, 4, 2]),
        Example::new(vec![1, 20, 21, 2]),
        Example::new(vec![1, 30, 31, 32, 33, 34, 35, 36, 37, 38, 2]),
    ]
}

#[test]
fn one_seed_gives_one_sequence_of_masks_and_clones_share_it() {
    let make = |seed| DataCollatorForLanguageModeling::mlm(0, small_config(seed)).unwrap();
    let rows = small_rows();
    let run = |c: &DataCollatorForLanguageModeling| -> Vec<PaddedBatch> {
        (0..20).map(|_| c.pad(&rows).unwrap()).collect()
    };
    let (a, b, other) = (run(&make(5)), run(&make(5)), run(&make(6)));
    assert_eq!(a, b, "the same seed gives the same batches");
    assert_ne!(a, other, "another seed gives other batches");
    assert_ne!(a[0], a[1], "each call draws new masks");
    // A clone continues the same generator (the Trainer clones its collator per data loader;
    // HF's one collator object keeps drawing across epochs).
    let c = make(5);
    let first = c.pad(&rows).unwrap();
    let second = c.clone().pad(&rows).unwrap();
    assert_eq!((first, second), (a[0].clone(), a[1].clone()));
}

#[test]
fn shapes_padding_and_special_tokens_follow_hf() {
    // Everything selectable is selected and turned into [MASK]: the structure is then exact.
    let all = small_config(1)
        .mlm_probability(1.0)
        .mask_replace_prob(1.0)
        .random_replace_prob(0.0);
    let c = DataCollatorForLanguageModeling::mlm(0, all.clone())
        .unwrap()
        .pad_to_multiple_of(8);
    let batch = c.pad(&small_rows()).unwrap();
    assert_eq!((batch.batch_size, batch.seq_len), (3, 16));
    let row = |v: &[i64], r: usize| v[r * 16..(r + 1) * 16].to_vec();
    let (ids, labels) = (&batch.input_ids, token_labels(&batch));
    let mut want_ids = vec![1, 3, 3, 3, 3, 3, 4, 2];
    want_ids.resize(16, 0);
    let mut want_labels = vec![-100, 10, 11, 12, 13, 14, -100, -100];
    want_labels.resize(16, -100);
    assert_eq!((row(ids, 0), row(labels, 0)), (want_ids, want_labels));
    assert_eq!(row(&batch.attention_mask, 1)[..5], [1, 1, 1, 1, 0]);

    // A `special_tokens_mask` column replaces `all_special_ids`: 12 is flagged, [UNK] (4) is
    // not, and the mask is padded with 1 (padding stays unselected even with id 0 unflagged).
    let flagged = vec![
        Example::new(vec![1, 10, 12, 4, 2]).with_special_tokens_mask(vec![1, 0, 1, 0, 1]),
        Example::new(vec![1, 20, 2]).with_special_tokens_mask(vec![1, 0, 1]),
    ];
    let no_specials = MlmConfig {
        all_special_ids: vec![],
        ..all.clone()
    };
    let c = DataCollatorForLanguageModeling::mlm(0, no_specials.clone()).unwrap();
    let batch = c.pad(&flagged).unwrap();
    assert_eq!(batch.input_ids, [1, 3, 12, 3, 2, 1, 3, 2, 0, 0]);
    assert_eq!(
        token_labels(&batch),
        [-100, 10, -100, 4, -100, -100, 20, -100, -100, -100]
    );
    // Without the column and with no special ids, only padding is protected.
    let plain: Vec<Example> = flagged
        .iter()
        .map(|e| Example::new(e.input_ids.clone()))
        .collect();
    let batch = c.pad(&plain).unwrap();
    assert_eq!(batch.input_ids, [3, 3, 3, 3, 3, 3, 3, 3, 0, 0]);

    // Left padding: the padding is at the start and still never selected.
    let left = DataCollatorForLanguageModeling::mlm(0, all)
        .unwrap()
        .padding_side(ember::datasets::PaddingSide::Left);
    let batch = left
        .pad(&[Example::new(vec![1, 7, 2]), Example::new(vec![8])])
        .unwrap();
    assert_eq!(batch.input_ids, [1, 3, 2, 0, 0, 3]);
    assert_eq!(token_labels(&batch), [-100, 7, -100, -100, -100, 8]);

    // A dataset's `special_tokens_mask` column reaches the collator through the loader.
    let ds = Dataset::from_json_rows(&[
        json!({"input_ids": [1, 10, 12, 2], "special_tokens_mask": [1, 0, 1, 1]}),
        json!({"input_ids": [1, 20, 2], "special_tokens_mask": [1, 0, 1]}),
    ])
    .unwrap();
    let c = DataCollatorForLanguageModeling::mlm(0, no_specials).unwrap();
    let loader = DataLoader::new(&ds, c, 2).unwrap().shuffle(false);
    let batch = loader
        .iter::<Backend>(0, &default_device())
        .next()
        .unwrap()
        .unwrap();
    let ids: Vec<i64> = batch
        .input_ids
        .into_data()
        .convert::<i64>()
        .to_vec()
        .unwrap();
    assert_eq!(ids, [1, 3, 12, 2, 1, 3, 2, 0]);
}

#[test]
fn masking_follows_the_probabilities_at_their_limits() {
    let rows = small_rows();
    // mask_replace_prob 0, random_replace_prob 1: every selected input becomes a random token,
    // drawn from the whole vocabulary (special ids included, as in HF).
    let random = small_config(3)
        .mlm_probability(1.0)
        .mask_replace_prob(0.0)
        .random_replace_prob(1.0);
    let c = DataCollatorForLanguageModeling::mlm(0, random).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..200 {
        let batch = c.pad(&rows).unwrap();
        for (&id, &label) in batch.input_ids.iter().zip(token_labels(&batch)) {
            if label != -100 {
                assert!((0..50).contains(&id));
                seen.insert(id);
            }
        }
    }
    assert_eq!(
        seen.len(),
        50,
        "every id of the vocabulary is drawn: {seen:?}"
    );
    // mask_replace_prob 0, random_replace_prob 0: selected inputs stay unchanged.
    let keep = small_config(3)
        .mlm_probability(1.0)
        .mask_replace_prob(0.0)
        .random_replace_prob(0.0);
    let batch = DataCollatorForLanguageModeling::mlm(0, keep)
        .unwrap()
        .pad(&rows)
        .unwrap();
    let plain = DataCollatorWithPadding::new(0).pad(&rows).unwrap();
    assert_eq!(batch.input_ids, plain.input_ids);
    assert_eq!(
        token_labels(&batch).iter().filter(|&&l| l != -100).count(),
        5 + 2 + 9
    );
    // mlm_probability 0: nothing selected.
    let none = small_config(3).mlm_probability(0.0);
    let batch = DataCollatorForLanguageModeling::mlm(0, none)
        .unwrap()
        .pad(&rows)
        .unwrap();
    assert!(token_labels(&batch).iter().all(|&l| l == -100));
    // 0.2 / (1 - 0.8) rounds above 1: still accepted, every non-[MASK] choice is random.
    let edge = small_config(3)
        .mask_replace_prob(0.8)
        .random_replace_prob(0.2);
    DataCollatorForLanguageModeling::mlm(0, edge)
        .unwrap()
        .pad(&rows)
        .unwrap();
}

#[test]
fn bad_arguments_are_refused_naming_the_value() {
    let refused =
        |config: MlmConfig, name: &str, value: &str| match DataCollatorForLanguageModeling::mlm(
            0, config,
        ) {
            Err(DatasetError::InvalidArgument {
                name: n, value: v, ..
            }) => {
                assert_eq!((n, v.as_str()), (name, value))
            }
            other => panic!("expected an InvalidArgument for {name}, got {other:?}"),
        };
    refused(
        small_config(0).mlm_probability(1.5),
        "mlm_probability",
        "1.5",
    );
    refused(
        small_config(0).mlm_probability(-0.1),
        "mlm_probability",
        "-0.1",
    );
    refused(
        small_config(0).mlm_probability(f64::NAN),
        "mlm_probability",
        "NaN",
    );
    refused(
        small_config(0).mask_replace_prob(1.2),
        "mask_replace_prob",
        "1.2",
    );
    refused(
        small_config(0).random_replace_prob(-1.0),
        "random_replace_prob",
        "-1",
    );
    refused(
        small_config(0)
            .mask_replace_prob(0.9)
            .random_replace_prob(0.2),
        "random_replace_prob",
        "0.2",
    );
    refused(MlmConfig::new(None, 50, [0]), "mask_token", "None");
    refused(MlmConfig::new(Some(50), 50, [0]), "mask_token_id", "50");
    refused(MlmConfig::new(Some(-1), 50, [0]), "mask_token_id", "-1");

    let c = DataCollatorForLanguageModeling::mlm(0, small_config(0)).unwrap();
    let short = [Example::new(vec![1, 9, 2]).with_special_tokens_mask(vec![1, 0])];
    assert!(
        matches!(c.pad(&short), Err(DatasetError::Shape(m)) if m.contains("special_tokens_mask"))
    );
    let mixed = [
        Example::new(vec![1, 9, 2]).with_special_tokens_mask(vec![1, 0, 1]),
        Example::new(vec![1, 9, 2]),
    ];
    assert!(matches!(c.pad(&mixed), Err(DatasetError::Shape(m)) if m.contains("example 1")));
    let mut ids = vec![1, 9, 2];
    assert!(c.mask_tokens(&mut ids, &[1, 0]).is_err());
    assert!(DataCollatorForLanguageModeling::new(0)
        .mask_tokens(&mut ids, &[1, 0, 1])
        .is_err());
    let labels = c.mask_tokens(&mut ids, &[1, 0, 1]).unwrap();
    assert_eq!((labels[0], labels[2]), (-100, -100));
}

/// Masked-LM training of a small `BertForMaskedLM` from scratch on ChnSentiCorp reviews through
/// the `Trainer`: the logged loss falls well below its start (uniform guessing over 21128 ids is
/// ln 21128 = 9.96).
#[test]
fn bert_for_masked_lm_trains_on_chnsenticorp_with_the_trainer() {
    let (Some(tok), Some(csv)) = (chinese_tokenizer(), chnsenticorp()) else {
        return;
    };
    let ds = read_csv(csv)
        .unwrap()
        .filter(|r| !r["review"].is_null())
        .unwrap()
        .slice(0, 256)
        .unwrap();
    let opts = EncodeOptions::default()
        .truncation(Truncation::LongestFirst)
        .max_length(64);
    let train =
        ember::data::tokenize_map(&ds, &tok, "review", &opts, 1000, &["review", "label"]).unwrap();
    let id = |role: &str| tok.special_token_id(role).map(i64::from);
    let specials: Vec<i64> = [
        "pad_token",
        "unk_token",
        "cls_token",
        "sep_token",
        "mask_token",
    ]
    .iter()
    .filter_map(|r| id(r))
    .collect();
    let collator = DataCollatorForLanguageModeling::mlm(
        id("pad_token").unwrap(),
        MlmConfig::new(id("mask_token"), tok.len(), specials).seed(42),
    )
    .unwrap();
    let config = BertConfig {
        vocab_size: tok.len(),
        hidden_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 128,
        max_position_embeddings: 64,
        ..BertConfig::default()
    };
    let model = BertForMaskedLM::<TrainBackend>::new(&config, &default_device());
    let dir = tempfile::tempdir().unwrap();
    let mut args = TrainingArguments::new(dir.path());
    args.per_device_train_batch_size = 16;
    args.num_train_epochs = 3.0;
    args.learning_rate = 2e-3;
    args.warmup_steps = 4;
    args.logging_steps = 8.0;
    args.save_strategy = IntervalStrategy::No;
    args.disable_tqdm = true;
    let mut trainer = Trainer::new(args, model, collator, default_device())
        .unwrap()
        .train_dataset(train);
    let end = trainer.train().unwrap();
    let losses: Vec<f64> = trainer
        .state
        .log_history
        .iter()
        .filter_map(|e| e.get("loss")?.as_f64())
        .collect();
    eprintln!("masked-LM losses every 8 steps: {losses:?}; end: {end:?}");
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(
        first > 8.0,
        "an untrained model guesses near ln 21128: {first}"
    );
    assert!(last < first - 2.0, "loss {first} -> {last}");
}
