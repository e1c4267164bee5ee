//! `ember tokenize`: lines on stdin → one JSON object per line on stdout.

use anyhow::{Context, Result};
use ember::tokenizers::{demo, AutoTokenizer, BatchEncoding, EncodeOptions, Truncation};
use serde_json::json;
use std::io::{BufRead, BufWriter, Write};
use std::path::PathBuf;

/// Arguments of `ember tokenize`.
#[derive(clap::Args)]
pub struct TokenizeArgs {
    /// Tokenizer folder (tokenizer.json, vocab.txt or vocab.json + merges.txt). Without it, the
    /// embedded demo tokenizer (WordPiece trained on a small built-in corpus) is used.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Truncate each input to this many tokens, special tokens included (longest_first).
    #[arg(long)]
    max_length: Option<usize>,
    /// Each line is a text pair: the first TAB separates the two texts (a line without one, or
    /// with nothing after it, is a single text, as Python's `tokenizer(text, "")` treats it).
    #[arg(long)]
    pair: bool,
    /// Also print the character offsets of each token (`offset_mapping`) and `word_ids`.
    #[arg(long)]
    offsets: bool,
    /// Ignore stdin: tokenize a few built-in sentences and show tokens, ids and decoded text.
    #[arg(long)]
    demo: bool,
}

/// Lines encoded together (in parallel) before their JSON is written.
const CHUNK: usize = 1024;

pub fn run(args: TokenizeArgs) -> Result<()> {
    let tokenizer = match &args.tokenizer {
        Some(dir) => AutoTokenizer::from_pretrained(dir)?,
        None => demo::demo_tokenizer().context("building the demo tokenizer")?,
    };
    if args.demo {
        return show_demo(&tokenizer);
    }
    let mut options = EncodeOptions::default().return_offsets_mapping(args.offsets);
    if let Some(n) = args.max_length {
        options = options.max_length(n).truncation(Truncation::LongestFirst);
    }
    let stdin = std::io::stdin().lock();
    let mut out = BufWriter::new(std::io::stdout().lock());
    let mut lines = Vec::with_capacity(CHUNK);
    for (n, line) in stdin.split(b'\n').enumerate() {
        let bytes = line.context("reading stdin")?;
        let mut text = String::from_utf8(bytes)
            .with_context(|| format!("stdin line {} is not UTF-8", n + 1))?;
        if text.ends_with('\r') {
            text.pop();
        }
        lines.push(text);
        if lines.len() == CHUNK {
            write_chunk(&tokenizer, &lines, &options, &args, &mut out)?;
            lines.clear();
        }
    }
    write_chunk(&tokenizer, &lines, &options, &args, &mut out)?;
    out.flush().context("writing stdout")?;
    Ok(())
}

fn write_chunk(
    tokenizer: &AutoTokenizer,
    lines: &[String],
    options: &EncodeOptions,
    args: &TokenizeArgs,
    out: &mut impl Write,
) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let batch = if args.pair {
        encode_pair_lines(tokenizer, lines, options)?
    } else {
        tokenizer.batch_encode(lines, options)?
    };
    write_batch(&batch, args.offsets, out)
}

/// Lines with a non-empty text after the first TAB are pairs; the others are single texts, as
/// Python's `tokenizer(text, "")` treats an empty second text. Output keeps the input order.
fn encode_pair_lines(
    tokenizer: &AutoTokenizer,
    lines: &[String],
    options: &EncodeOptions,
) -> Result<BatchEncoding> {
    let split: Vec<(&str, Option<&str>)> = lines
        .iter()
        .map(|l| match l.split_once('\t') {
            Some((a, b)) if !b.is_empty() => (a, Some(b)),
            Some((a, _)) => (a, None),
            None => (l.as_str(), None),
        })
        .collect();
    let (pairs, singles): (Vec<_>, Vec<_>) = split.iter().partition(|(_, b)| b.is_some());
    let firsts: Vec<&str> = pairs.iter().map(|(a, _)| *a).collect();
    let seconds: Vec<&str> = pairs.iter().filter_map(|(_, b)| *b).collect();
    let texts: Vec<&str> = singles.iter().map(|(a, _)| *a).collect();
    let mut paired = tokenizer
        .batch_encode_pairs(&firsts, &seconds, options)?
        .encodings
        .into_iter();
    let mut single = tokenizer
        .batch_encode(&texts, options)?
        .encodings
        .into_iter();
    let encodings = split
        .iter()
        .map(|(_, b)| {
            if b.is_some() {
                paired.next()
            } else {
                single.next()
            }
            .expect("one encoding per line")
        })
        .collect();
    Ok(BatchEncoding { encodings })
}

fn write_batch(batch: &BatchEncoding, offsets: bool, out: &mut impl Write) -> Result<()> {
    for (i, e) in batch.encodings.iter().enumerate() {
        let mut obj = json!({
            "input_ids": e.get_ids(),
            "attention_mask": e.get_attention_mask(),
            "token_type_ids": e.get_type_ids(),
            "tokens": e.get_tokens(),
        });
        if offsets {
            obj["offset_mapping"] = json!(e.get_offsets());
            obj["word_ids"] = json!(batch.word_ids(i));
        }
        serde_json::to_writer(&mut *out, &obj).context("writing stdout")?;
        out.write_all(b"\n").context("writing stdout")?;
    }
    Ok(())
}

fn show_demo(tokenizer: &AutoTokenizer) -> Result<()> {
    let sentences = [
        "The hotel room was clean, and breakfast was delicious!",
        "酒店离地铁站很近，早餐也很好吃。",
        "Tokenizers split unfamiliar words into pieces.",
    ];
    println!(
        "Demo tokenizer: BERT WordPiece trained on {} built-in sentences, {} tokens in its vocabulary.\n",
        demo::DEMO_CORPUS.len(),
        tokenizer.len()
    );
    let batch = tokenizer.batch_encode(
        &sentences,
        &EncodeOptions::default().padding(ember::tokenizers::Padding::Longest),
    )?;
    for (i, text) in sentences.iter().enumerate() {
        println!("text:      {text}");
        println!("tokens:    {}", batch.tokens(i).join(" "));
        println!("input_ids: {:?}", batch.encodings[i].get_ids());
        println!(
            "decoded:   {}\n",
            tokenizer.decode(batch.encodings[i].get_ids(), true)?
        );
    }
    let tensors = batch.to_tensors::<ember::Backend>(&ember::default_device())?;
    println!(
        "as a burn tensor on the {} backend: input_ids {:?}, attention_mask {:?}",
        ember::backend_name(),
        tensors.input_ids.dims(),
        tensors.attention_mask.dims()
    );
    Ok(())
}
