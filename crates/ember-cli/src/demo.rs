//! The `ember train` demo: everything it needs is in the binary. A labelled corpus of short
//! hotel reviews written for Ember (composed from the aspect and opinion phrases below, not
//! taken from any dataset), a WordPiece tokenizer trained on it, a small BERT built from a
//! config, a few epochs of fine-tuning with metrics after each, the saved model, and
//! predictions for new sentences.

use anyhow::Result;
use ember::datasets::Dataset;
use ember::models::{BertConfig, BertForSequenceClassification};
use ember::prelude::*;
use ember::tokenizers::demo::DEMO_CORPUS;
use ember::train::{IntervalStrategy, TrainingArguments};
use std::path::PathBuf;

/// What a review talks about.
const ASPECTS: &[&str] = &[
    "the room",
    "the staff",
    "breakfast",
    "the bed",
    "the location",
    "check-in",
    "the view",
    "the bathroom",
    "the wifi",
    "the price",
    "the pool",
    "the restaurant",
    "the receptionist",
    "the shower",
    "the lobby",
    "dinner",
];

/// Positive opinions.
const GOOD: &[&str] = &[
    "was spotless",
    "was excellent",
    "was friendly and helpful",
    "was quiet and comfortable",
    "was wonderful",
    "was great value",
    "was fast and easy",
    "was lovely",
    "was clean and bright",
    "was perfect",
];

/// Negative opinions.
const BAD: &[&str] = &[
    "was dirty",
    "was terrible",
    "was rude and slow",
    "was noisy all night",
    "was awful",
    "was far too expensive",
    "was slow and confusing",
    "was broken",
    "smelled of smoke",
    "was a disappointment",
];

/// Openers and closers that carry no sentiment of their own.
const OPENERS: &[&str] = &[
    "",
    "honestly, ",
    "overall ",
    "on our second night ",
    "as expected, ",
];
const CLOSERS: &[&str] = &[
    "",
    " and we would come back",
    " and we will not return",
    " this time",
    " again",
];

/// The demo corpus: `(text, label)` with label 1 for positive, 0 for negative. Closers that
/// contradict the opinion are left out, so every label is right.
pub fn corpus() -> Vec<(String, u8)> {
    let mut rows = Vec::new();
    for (a, aspect) in ASPECTS.iter().enumerate() {
        for (o, (good, bad)) in GOOD.iter().zip(BAD).enumerate() {
            let opener = OPENERS[(a + o) % OPENERS.len()];
            let closer = |positive: bool| {
                let c = CLOSERS[(a * 3 + o) % CLOSERS.len()];
                match (positive, c) {
                    (true, " and we will not return") | (false, " and we would come back") => "",
                    _ => c,
                }
            };
            rows.push((format!("{opener}{aspect} {good}{}.", closer(true)), 1));
            rows.push((format!("{opener}{aspect} {bad}{}.", closer(false)), 0));
        }
    }
    rows
}

/// New sentences for the predictions at the end (not in the corpus).
const UNSEEN: &[&str] = &[
    "the pool was wonderful and the staff was helpful.",
    "the shower was broken and the room was dirty.",
    "breakfast was great value.",
    "the lobby smelled of smoke.",
];

/// Runs the demo, writing into `output_dir`.
pub fn run(output_dir: PathBuf, json: bool) -> Result<()> {
    let device = default_device();
    let rows = corpus();
    eprintln!(
        "demo: {} labelled reviews written for Ember; training a tokenizer and a small BERT",
        rows.len()
    );
    // The demo tokenizer's pipeline (BERT normalisation, WordPiece), with a vocabulary learnt
    // from these reviews.
    let base = ember::tokenizers::demo::demo_tokenizer()?;
    let texts = rows
        .iter()
        .map(|(t, _)| t.as_str())
        .chain(DEMO_CORPUS.iter().copied());
    let tokenizer = base.train_new_from_iterator(texts, 400)?;

    // A fifth of the aspect / opinion pairs is held out for evaluation: each opinion is held
    // out with a few aspects and seen in training with the others.
    let held_out = |i: usize| {
        let (aspect, opinion) = (i / 2 / GOOD.len(), i / 2 % GOOD.len());
        (aspect + opinion) % 5 == 0
    };
    let to_rows = |keep: &dyn Fn(usize) -> bool| -> Vec<serde_json::Value> {
        rows.iter()
            .enumerate()
            .filter(|(i, _)| keep(*i))
            .map(|(_, (text, label))| serde_json::json!({"text": text, "label": label}))
            .collect()
    };
    let options = EncodeOptions::default()
        .truncation(Truncation::LongestFirst)
        .max_length(32);
    let encode =
        |ds: Dataset| ember::data::tokenize_map(&ds, &tokenizer, "text", &options, 1000, &["text"]);
    let train = encode(Dataset::from_json_rows(&to_rows(&|i| !held_out(i)))?)?;
    let eval = encode(Dataset::from_json_rows(&to_rows(&held_out))?)?;

    let mut config = BertConfig {
        vocab_size: tokenizer.vocab_size(),
        hidden_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        intermediate_size: 128,
        max_position_embeddings: 64,
        ..BertConfig::default()
    };
    config.set_labels(["negative", "positive"]);
    let model = BertForSequenceClassification::<TrainBackend>::new(&config, &device);

    let mut args = TrainingArguments::new(&output_dir);
    args.num_train_epochs = 8.0;
    args.per_device_train_batch_size = 16;
    args.per_device_eval_batch_size = 64;
    args.learning_rate = 5e-4;
    args.warmup_ratio = 0.1;
    args.weight_decay = 0.01;
    args.logging_steps = 10.0;
    args.eval_strategy = IntervalStrategy::Epoch;
    args.save_strategy = IntervalStrategy::Epoch;
    args.save_total_limit = Some(1);
    let metrics = crate::train::fine_tune(model, &tokenizer, train, eval, args, json)?;
    println!("{}", serde_json::to_string(&metrics)?);

    let classifier = ember::models::AutoModelForSequenceClassification::from_pretrained::<Backend>(
        &output_dir,
        &device,
    )?;
    for text in UNSEEN {
        let batch = tokenizer
            .batch_encode(&[*text], &options)?
            .to_tensors::<Backend>(&device)?;
        let logits = classifier
            .forward(ember::data::encoder_input(batch), None)?
            .logits;
        let probs: Vec<f32> = burn_softmax(logits);
        let best = usize::from(probs[1] > probs[0]);
        let label = if best == 1 { "positive" } else { "negative" };
        println!(
            "{}",
            serde_json::json!({"text": text, "label": label, "score": probs[best]})
        );
    }
    Ok(())
}

fn burn_softmax(logits: Tensor<Backend, 2>) -> Vec<f32> {
    ember::burn::tensor::activation::softmax(logits, 1)
        .into_data()
        .to_vec()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::corpus;

    #[test]
    fn corpus_is_balanced_and_unique() {
        let rows = corpus();
        assert_eq!(rows.len(), 320);
        assert_eq!(rows.iter().filter(|(_, l)| *l == 1).count(), 160);
        let mut texts: Vec<_> = rows.iter().map(|(t, _)| t).collect();
        texts.sort();
        texts.dedup();
        assert_eq!(texts.len(), 320);
    }
}
