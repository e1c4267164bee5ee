//! CoNLL-style NER files: `token tag` (CoNLL-2003: `token POS chunk tag`), `char<TAB>tag`
//! (MSRA), `-DOCSTART-` lines, a blank line between sentences; read into `tokens` /
//! `ner_tags` sequence columns with a ClassLabel list, as HF's NER datasets have.

use crate::dataset::Dataset;
use crate::error::{DatasetError, Result};
use crate::features::{Feature, Features};
use arrow::array::{ArrayRef, Int64Builder, ListBuilder, StringBuilder};
use std::path::Path;
use std::sync::Arc;

/// Reads a CoNLL-style file; the tag names come from the file: `O` first, then by entity type,
/// `B-` before `I-` (e.g. `O, B-LOC, I-LOC, B-ORG, I-ORG, B-PER, I-PER`).
pub fn read_conll(path: impl AsRef<Path>) -> Result<Dataset> {
    let sentences = parse(path.as_ref())?;
    let mut names: Vec<String> = Vec::new();
    for (_, tags) in &sentences {
        for t in tags {
            if !names.contains(t) {
                names.push(t.clone());
            }
        }
    }
    names.sort_by_key(|a| tag_key(a));
    build(path.as_ref(), sentences, names)
}

/// Reads a CoNLL-style file with the given tag names (a tag outside them is an error naming the
/// line).
pub fn read_conll_with_labels(path: impl AsRef<Path>, names: &[String]) -> Result<Dataset> {
    build(path.as_ref(), parse(path.as_ref())?, names.to_vec())
}

/// `O` first, then entity type, then prefix (`B` < `I` < others).
fn tag_key(tag: &str) -> (u8, String, String) {
    match tag.split_once('-') {
        _ if tag == "O" => (0, String::new(), String::new()),
        Some((prefix, kind)) => (1, kind.to_owned(), prefix.to_owned()),
        None => (1, tag.to_owned(), String::new()),
    }
}

/// Sentences as (tokens, tags), with the line number of each tag for error messages.
type Sentence = (Vec<String>, Vec<String>);

fn parse(path: &Path) -> Result<Vec<Sentence>> {
    let text = std::fs::read_to_string(path).map_err(|e| DatasetError::io(path, e))?;
    if text.trim().is_empty() {
        return Err(DatasetError::EmptyFile(path.to_owned()));
    }
    let mut out = Vec::new();
    let (mut tokens, mut tags) = (Vec::new(), Vec::new());
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            if !tokens.is_empty() {
                out.push((std::mem::take(&mut tokens), std::mem::take(&mut tags)));
            }
            continue;
        }
        if line.starts_with("-DOCSTART-") {
            continue;
        }
        let fields: Vec<&str> = line.split(['\t', ' ']).filter(|f| !f.is_empty()).collect();
        if fields.len() < 2 {
            return Err(DatasetError::Parse {
                path: path.to_owned(),
                message: format!("line {}: expected `token tag`, found {line:?}", n + 1),
            });
        }
        tokens.push(fields[0].to_owned());
        tags.push(fields[fields.len() - 1].to_owned());
    }
    if !tokens.is_empty() {
        out.push((tokens, tags));
    }
    Ok(out)
}

fn build(path: &Path, sentences: Vec<Sentence>, names: Vec<String>) -> Result<Dataset> {
    let mut tokens = ListBuilder::new(StringBuilder::new());
    let mut tags = ListBuilder::new(Int64Builder::new());
    for (row, (ts, gs)) in sentences.iter().enumerate() {
        for t in ts {
            tokens.values().append_value(t);
        }
        tokens.append(true);
        for g in gs {
            let id =
                names
                    .iter()
                    .position(|n| n == g)
                    .ok_or_else(|| DatasetError::LabelOutOfRange {
                        column: format!("ner_tags (in {})", path.display()),
                        row,
                        value: g.clone(),
                        names: names.clone(),
                    })?;
            tags.values().append_value(id as i64);
        }
        tags.append(true);
    }
    let columns: Vec<(String, ArrayRef)> = vec![
        ("tokens".into(), Arc::new(tokens.finish())),
        ("ner_tags".into(), Arc::new(tags.finish())),
    ];
    let batch = crate::dataset::batch_of(&columns, Some(sentences.len()))?;
    let features = Features(vec![
        (
            "tokens".into(),
            Feature::List(Box::new(Feature::Value("string".into()))),
        ),
        (
            "ner_tags".into(),
            Feature::List(Box::new(Feature::ClassLabel(names))),
        ),
    ]);
    Dataset::from_record_batch(batch, Some(features))
}
