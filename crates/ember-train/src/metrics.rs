//! Evaluation metrics, numerically the same as the Python references.
//!
//! - Classification ([`accuracy`], [`precision_recall_f1`], [`classification_metrics`]):
//!   scikit-learn 1.9.1 `accuracy_score` and `precision_recall_fscore_support(y_true, y_pred,
//!   average=..., zero_division=0)`.
//! - Sequence labelling ([`get_entities`], [`seqeval`]): seqeval 1.2.2 in its default (lenient,
//!   conlleval-compatible) mode, not `mode="strict"`.
//!
//! Every function here takes predictions first and labels second (the Trainer's order); the
//! references take `y_true` first. Inputs the references cannot score (different lengths, nothing
//! to score, a class that makes `average="binary"` ambiguous, a tag that is not IOB) are
//! [`TrainError::Metric`] rather than NaN or a warning.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::error::{Result, TrainError};

/// sklearn `accuracy_score(labels, predictions)`: the fraction of positions where the prediction
/// equals the label.
///
/// Errors when the lengths differ or the input is empty (sklearn raises on both).
pub fn accuracy(predictions: &[usize], labels: &[usize]) -> Result<f64> {
    check_classification_input(predictions, labels)?;
    let correct = predictions
        .iter()
        .zip(labels)
        .filter(|(p, l)| p == l)
        .count();
    Ok(correct as f64 / labels.len() as f64)
}

/// How [`precision_recall_f1`] combines the per-class scores (sklearn's `average`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Average {
    /// The scores of class 1 alone (`pos_label=1`). Only for at most two classes, and with two
    /// classes one of them must be 1.
    Binary,
    /// The unweighted mean of the per-class scores.
    Macro,
    /// Scores of the counts summed over all classes (equal to accuracy for precision and recall).
    Micro,
    /// The mean of the per-class scores weighted by each class's number of labels.
    Weighted,
}

/// Precision, recall and F1 of one averaging.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PrecisionRecallF1 {
    /// Correct predictions of a class over all predictions of it.
    pub precision: f64,
    /// Correct predictions of a class over all labels of it.
    pub recall: f64,
    /// The harmonic mean of precision and recall.
    pub f1: f64,
}

/// sklearn `precision_recall_fscore_support(labels, predictions, average=..., zero_division=0)`,
/// without the support.
///
/// The classes are the sorted union of those in `labels` and `predictions` (sklearn's
/// `unique_labels`); a score whose denominator is zero is 0.0.
///
/// Errors when the lengths differ, the input is empty, or `average` is [`Average::Binary`] with
/// more than two classes or with two classes neither of which is 1.
pub fn precision_recall_f1(
    predictions: &[usize],
    labels: &[usize],
    average: Average,
) -> Result<PrecisionRecallF1> {
    check_classification_input(predictions, labels)?;
    let classes: BTreeSet<usize> = labels.iter().chain(predictions).copied().collect();
    let per_class: Vec<Counts> = match average {
        Average::Binary => {
            check_binary(&classes)?;
            vec![Counts::of_class(1, predictions, labels)]
        }
        _ => classes
            .iter()
            .map(|&class| Counts::of_class(class, predictions, labels))
            .collect(),
    };
    Ok(match average {
        Average::Binary => per_class[0].sklearn_scores(),
        Average::Micro => Counts::sum(&per_class).sklearn_scores(),
        Average::Macro => mean_scores(&per_class, |_| 1.0),
        Average::Weighted => mean_scores(&per_class, |counts| counts.actual as f64),
    })
}

/// The metrics a Trainer's `compute_metrics` usually reports for sequence classification:
/// `"accuracy"` ([`accuracy`]) and `"precision"`, `"recall"`, `"f1"` ([`precision_recall_f1`]).
///
/// The average is [`Average::Binary`] (class 1 is positive) when every class in `labels` and
/// `predictions` is 0 or 1, and [`Average::Macro`] otherwise, so that a binary task is scored as
/// binary even when an evaluation batch happens to hold one class only, and any other label set
/// (three classes, or two classes such as {0, 2} where binary would be undefined) never errors.
///
/// Errors when the lengths differ or the input is empty.
pub fn classification_metrics(
    predictions: &[usize],
    labels: &[usize],
) -> Result<BTreeMap<String, f64>> {
    let is_binary = labels.iter().chain(predictions).all(|&class| class <= 1);
    let average = if is_binary {
        Average::Binary
    } else {
        Average::Macro
    };
    let scores = precision_recall_f1(predictions, labels, average)?;
    Ok(BTreeMap::from([
        ("accuracy".to_string(), accuracy(predictions, labels)?),
        ("f1".to_string(), scores.f1),
        ("precision".to_string(), scores.precision),
        ("recall".to_string(), scores.recall),
    ]))
}

/// The index of the largest value of each row of a row-major `[rows, num_labels]` matrix of
/// logits, like `numpy.argmax(logits, axis=-1)`: ties go to the first index, and a NaN counts as
/// the largest value (the first NaN wins).
///
/// # Panics
///
/// When `num_labels` is zero or does not divide `logits.len()` (the shape is then not a matrix).
pub fn argmax_rows(logits: &[f32], num_labels: usize) -> Vec<usize> {
    assert!(num_labels > 0, "argmax_rows: num_labels must be positive");
    assert!(
        logits.len().is_multiple_of(num_labels),
        "argmax_rows: {} logits do not make rows of {num_labels}",
        logits.len()
    );
    logits.chunks_exact(num_labels).map(argmax).collect()
}

/// numpy's argmax of one row: the first maximum, or the first NaN.
fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (index, &value) in row.iter().enumerate() {
        if value.is_nan() {
            return index;
        }
        if value > row[best] {
            best = index;
        }
    }
    best
}

/// The counts one class's precision and recall are made of.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    /// Positions predicted as the class whose label is the class.
    true_positives: usize,
    /// Positions predicted as the class.
    predicted: usize,
    /// Positions labelled as the class (sklearn's support).
    actual: usize,
}

impl Counts {
    fn of_class(class: usize, predictions: &[usize], labels: &[usize]) -> Self {
        let mut counts = Self::default();
        for (&prediction, &label) in predictions.iter().zip(labels) {
            counts.true_positives += usize::from(prediction == class && label == class);
            counts.predicted += usize::from(prediction == class);
            counts.actual += usize::from(label == class);
        }
        counts
    }

    fn sum(all: &[Self]) -> Self {
        all.iter().fold(Self::default(), |total, counts| Self {
            true_positives: total.true_positives + counts.true_positives,
            predicted: total.predicted + counts.predicted,
            actual: total.actual + counts.actual,
        })
    }

    /// sklearn's scores: F1 straight from the counts, `2 tp / (actual + predicted)`.
    fn sklearn_scores(&self) -> PrecisionRecallF1 {
        PrecisionRecallF1 {
            precision: ratio_or_zero(self.true_positives as f64, self.predicted as f64),
            recall: ratio_or_zero(self.true_positives as f64, self.actual as f64),
            f1: ratio_or_zero(
                2.0 * self.true_positives as f64,
                (self.actual + self.predicted) as f64,
            ),
        }
    }
}

/// `numerator / denominator`, or 0.0 where the denominator is zero (`zero_division=0`).
fn ratio_or_zero(numerator: f64, denominator: f64) -> f64 {
    if denominator == 0.0 {
        0.0
    } else {
        numerator / denominator
    }
}

/// The weighted mean of each class's sklearn scores, as `numpy.average(scores, weights=...)`.
fn mean_scores(per_class: &[Counts], weight: impl Fn(&Counts) -> f64) -> PrecisionRecallF1 {
    let total_weight: f64 = per_class.iter().map(&weight).sum();
    let mean = |score: fn(&PrecisionRecallF1) -> f64| {
        let weighted: f64 = per_class
            .iter()
            .map(|counts| score(&counts.sklearn_scores()) * weight(counts))
            .sum();
        weighted / total_weight
    };
    PrecisionRecallF1 {
        precision: mean(|s| s.precision),
        recall: mean(|s| s.recall),
        f1: mean(|s| s.f1),
    }
}

/// sklearn's checks for `average="binary"` with `pos_label=1`.
fn check_binary(classes: &BTreeSet<usize>) -> Result<()> {
    if classes.len() > 2 {
        return Err(TrainError::Metric(format!(
            "average binary needs at most two classes, found {} ({classes:?}); use macro, micro \
             or weighted",
            classes.len()
        )));
    }
    if classes.len() == 2 && !classes.contains(&1) {
        return Err(TrainError::Metric(format!(
            "average binary scores class 1, which is not among the classes {classes:?}"
        )));
    }
    Ok(())
}

fn check_classification_input(predictions: &[usize], labels: &[usize]) -> Result<()> {
    if predictions.len() != labels.len() {
        return Err(TrainError::Metric(format!(
            "{} predictions but {} labels",
            predictions.len(),
            labels.len()
        )));
    }
    if labels.is_empty() {
        return Err(TrainError::Metric(
            "no predictions and labels to score".to_string(),
        ));
    }
    Ok(())
}

/// Where a tag's position letter (B, I, E, S, O) sits: seqeval's `suffix` argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagAffix {
    /// `B-PER`: the letter first, the type after the first `-` (seqeval's default).
    Prefix,
    /// `PER-B`: the letter last, the type before the last `-` (`suffix=True`).
    Suffix,
}

/// seqeval's `get_entities(tags)`: the entities of one tag sequence as `(type, first, last)`,
/// both positions inclusive, in order of their end.
///
/// Lenient like seqeval: an `I-` (or `E-`) starts an entity when none is open, a change of type
/// ends one, and IOB1, IOB2, IOE and IOBES tags are all read. A tag without a type (`B`) has the
/// type `_`. To score several sentences, join them with an `O` between (as [`seqeval`] does).
/// An empty tag, on which seqeval raises `IndexError`, reads as `O`.
pub fn get_entities(tags: &[String]) -> Vec<(String, usize, usize)> {
    get_entities_with_affix(tags, TagAffix::Prefix)
}

/// [`get_entities`] with the position letter where `affix` says (seqeval's `suffix` argument).
pub fn get_entities_with_affix(tags: &[String], affix: TagAffix) -> Vec<(String, usize, usize)> {
    entities_of(tags.iter().map(String::as_str), affix)
}

/// The port of seqeval's loop: one `O` past the end closes the last entity.
fn entities_of<'a>(
    tags: impl Iterator<Item = &'a str>,
    affix: TagAffix,
) -> Vec<(String, usize, usize)> {
    let mut previous = ParsedTag {
        letter: 'O',
        entity_type: "",
    };
    let mut begin = 0;
    let mut entities = Vec::new();
    for (index, tag) in tags.chain(std::iter::once("O")).enumerate() {
        let current = ParsedTag::parse(tag, affix);
        if end_of_chunk(&previous, &current) {
            entities.push((previous.entity_type.to_string(), begin, index - 1));
        }
        if start_of_chunk(&previous, &current) {
            begin = index;
        }
        previous = current;
    }
    entities
}

/// A tag split as seqeval splits it: `B-PER` is the letter `B` and the type `PER`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ParsedTag<'a> {
    letter: char,
    entity_type: &'a str,
}

impl<'a> ParsedTag<'a> {
    /// seqeval: prefix `tag[0]`, `tag[1:].split('-', 1)[-1] or '_'`; suffix `tag[-1]`,
    /// `tag[:-1].rsplit('-', 1)[0] or '_'`.
    fn parse(tag: &'a str, affix: TagAffix) -> Self {
        let mut chars = tag.chars();
        let (letter, entity_type) = match affix {
            TagAffix::Prefix => {
                let letter = chars.next();
                let rest = chars.as_str();
                (letter, rest.split_once('-').map_or(rest, |(_, t)| t))
            }
            TagAffix::Suffix => {
                let letter = chars.next_back();
                let rest = chars.as_str();
                (letter, rest.rsplit_once('-').map_or(rest, |(t, _)| t))
            }
        };
        Self {
            letter: letter.unwrap_or('O'),
            entity_type: if entity_type.is_empty() {
                "_"
            } else {
                entity_type
            },
        }
    }
}

/// seqeval's `end_of_chunk`: whether an entity ended just before `current`.
fn end_of_chunk(previous: &ParsedTag, current: &ParsedTag) -> bool {
    let (prev, cur) = (previous.letter, current.letter);
    matches!(prev, 'E' | 'S')
        || (matches!(prev, 'B' | 'I') && matches!(cur, 'B' | 'S' | 'O'))
        || (prev != 'O' && prev != '.' && previous.entity_type != current.entity_type)
}

/// seqeval's `start_of_chunk`: whether an entity starts at `current`.
fn start_of_chunk(previous: &ParsedTag, current: &ParsedTag) -> bool {
    let (prev, cur) = (previous.letter, current.letter);
    matches!(cur, 'B' | 'S')
        || (matches!(prev, 'E' | 'S' | 'O') && matches!(cur, 'E' | 'I'))
        || (cur != 'O' && cur != '.' && previous.entity_type != current.entity_type)
}

/// One entity type's row of seqeval's `classification_report`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EntityScores {
    /// Predicted entities of the type that are also labelled (same type, first and last
    /// position) over all predicted entities of the type.
    pub precision: f64,
    /// Labelled entities of the type that are also predicted over all labelled ones.
    pub recall: f64,
    /// The harmonic mean of precision and recall.
    pub f1: f64,
    /// Labelled entities of the type.
    pub support: usize,
}

/// seqeval's scores of a set of tagged sentences.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeqevalReport {
    /// seqeval `precision_score`: entity-level, micro-averaged over all types.
    pub precision: f64,
    /// seqeval `recall_score`: entity-level, micro-averaged over all types.
    pub recall: f64,
    /// seqeval `f1_score`: entity-level, micro-averaged over all types.
    pub f1: f64,
    /// seqeval `accuracy_score`: the fraction of tokens whose tag is right (`O` included).
    pub accuracy: f64,
    /// `classification_report`'s row of each entity type found in labels or predictions.
    pub per_type: BTreeMap<String, EntityScores>,
}

/// seqeval 1.2.2's scores (default mode, `zero_division=0`) of predicted against labelled tag
/// sentences: overall entity-level precision, recall and F1 (micro), token accuracy, and the
/// per-type rows of `classification_report`.
///
/// Entities come from [`get_entities`] over all sentences joined with an `O` between, so an entity
/// never spans two sentences; a predicted entity counts only when type, start and end all match.
///
/// Errors when the numbers of sentences differ, a sentence's prediction and label lengths differ
/// (naming the sentence), there is no token at all (seqeval raises on this too), or a tag is not
/// IOB: one of `O`, `B`, `I`, `E`, `S` or starting with `B-`, `I-`, `E-`, `S-` (seqeval only warns
/// "seems not to be NE tag" and scores it anyway).
pub fn seqeval(predictions: &[Vec<String>], labels: &[Vec<String>]) -> Result<SeqevalReport> {
    check_sentences(predictions, labels)?;
    let true_entities = entity_sets(labels);
    let predicted_entities = entity_sets(predictions);
    let types: BTreeSet<&String> = true_entities
        .keys()
        .chain(predicted_entities.keys())
        .collect();
    let empty = BTreeSet::new();
    let per_type_counts: BTreeMap<String, Counts> = types
        .into_iter()
        .map(|entity_type| {
            let actual = true_entities.get(entity_type).unwrap_or(&empty);
            let predicted = predicted_entities.get(entity_type).unwrap_or(&empty);
            let counts = Counts {
                true_positives: actual.intersection(predicted).count(),
                predicted: predicted.len(),
                actual: actual.len(),
            };
            (entity_type.clone(), counts)
        })
        .collect();
    let per_type_counts_list: Vec<Counts> = per_type_counts.values().copied().collect();
    let overall = seqeval_scores(&Counts::sum(&per_type_counts_list));
    Ok(SeqevalReport {
        precision: overall.precision,
        recall: overall.recall,
        f1: overall.f1,
        accuracy: token_accuracy(predictions, labels),
        per_type: per_type_counts
            .into_iter()
            .map(|(entity_type, counts)| (entity_type, seqeval_scores(&counts)))
            .collect(),
    })
}

/// seqeval's scores of one set of counts: unlike sklearn, F1 is computed from the precision and
/// recall floats, `2 p r / (p + r)`.
fn seqeval_scores(counts: &Counts) -> EntityScores {
    let precision = ratio_or_zero(counts.true_positives as f64, counts.predicted as f64);
    let recall = ratio_or_zero(counts.true_positives as f64, counts.actual as f64);
    let denominator = precision + recall;
    let f1 = if denominator == 0.0 {
        0.0
    } else {
        2.0 * precision * recall / denominator
    };
    EntityScores {
        precision,
        recall,
        f1,
        support: counts.actual,
    }
}

/// Each type's entities as (first, last) positions in the sentences joined with `O` between.
fn entity_sets(sentences: &[Vec<String>]) -> BTreeMap<String, BTreeSet<(usize, usize)>> {
    let joined = sentences
        .iter()
        .flat_map(|sentence| sentence.iter().map(String::as_str).chain(["O"]));
    let mut sets: BTreeMap<String, BTreeSet<(usize, usize)>> = BTreeMap::new();
    for (entity_type, first, last) in entities_of(joined, TagAffix::Prefix) {
        sets.entry(entity_type).or_default().insert((first, last));
    }
    sets
}

fn token_accuracy(predictions: &[Vec<String>], labels: &[Vec<String>]) -> f64 {
    let pairs = predictions.iter().flatten().zip(labels.iter().flatten());
    let (correct, total) = pairs.fold((0usize, 0usize), |(correct, total), (p, l)| {
        (correct + usize::from(p == l), total + 1)
    });
    correct as f64 / total as f64
}

fn check_sentences(predictions: &[Vec<String>], labels: &[Vec<String>]) -> Result<()> {
    if predictions.len() != labels.len() {
        return Err(TrainError::Metric(format!(
            "{} predicted sentences but {} labelled ones",
            predictions.len(),
            labels.len()
        )));
    }
    for (index, (predicted, labelled)) in predictions.iter().zip(labels).enumerate() {
        if predicted.len() != labelled.len() {
            return Err(TrainError::Metric(format!(
                "sentence {index}: {} predicted tags but {} labels",
                predicted.len(),
                labelled.len()
            )));
        }
        check_tags(index, "predicted", predicted)?;
        check_tags(index, "label", labelled)?;
    }
    if labels.iter().all(Vec::is_empty) {
        return Err(TrainError::Metric(
            "no tokens to score (seqeval's accuracy divides by zero)".to_string(),
        ));
    }
    Ok(())
}

/// The tags seqeval's `_validate_chunk` accepts without a warning.
fn check_tags(sentence: usize, side: &str, tags: &[String]) -> Result<()> {
    let is_iob = |tag: &str| {
        matches!(tag, "O" | "B" | "I" | "E" | "S")
            || ["B-", "I-", "E-", "S-"]
                .iter()
                .any(|prefix| tag.starts_with(prefix))
    };
    match tags.iter().position(|tag| !is_iob(tag)) {
        Some(position) => Err(TrainError::Metric(format!(
            "sentence {sentence}, token {position}: {side} tag `{}` is not an IOB tag (O, or B-, \
             I-, E-, S- and a type)",
            tags[position]
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(text: &str) -> Vec<String> {
        text.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn get_entities_matches_the_seqeval_docstring() {
        let entities = get_entities(&tags("B-PER I-PER O B-LOC"));
        assert_eq!(
            entities,
            [("PER".to_string(), 0, 1), ("LOC".to_string(), 3, 3)]
        );
    }

    #[test]
    fn an_i_tag_without_b_starts_an_entity() {
        let entities = get_entities(&tags("O I-ORG I-ORG"));
        assert_eq!(entities, [("ORG".to_string(), 1, 2)]);
    }

    #[test]
    fn suffix_tags_carry_the_type_first() {
        let entities = get_entities_with_affix(&tags("PER-B PER-I O LOC-S"), TagAffix::Suffix);
        assert_eq!(
            entities,
            [("PER".to_string(), 0, 1), ("LOC".to_string(), 3, 3)]
        );
    }

    #[test]
    fn argmax_takes_the_first_of_ties_and_of_nans() {
        let logits = [1.0, 3.0, 3.0, f32::NAN, 0.0, f32::NAN, -1.0, -1.0, -2.0];
        assert_eq!(argmax_rows(&logits, 3), [1, 0, 0]);
    }

    #[test]
    fn classification_metrics_uses_macro_beyond_zero_and_one() {
        let metrics = classification_metrics(&[0, 2, 2], &[0, 2, 0]).unwrap();
        let scores = precision_recall_f1(&[0, 2, 2], &[0, 2, 0], Average::Macro).unwrap();
        assert_eq!(metrics["f1"], scores.f1);
        assert!(precision_recall_f1(&[0, 2, 2], &[0, 2, 0], Average::Binary).is_err());
    }

    #[test]
    fn seqeval_rejects_tags_that_are_not_iob() {
        let error = seqeval(&[tags("O PER")], &[tags("O B-PER")]).unwrap_err();
        assert!(error.to_string().contains("sentence 0, token 1"), "{error}");
    }
}
