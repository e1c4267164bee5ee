//! Tokenize a few sentences with a tokenizer folder (first argument) or, without one, the
//! embedded demo tokenizer; print tokens, ids, word ids and the decoded text.
//!
//! `cargo run -p ember-tokenizers --example tokenize [-- DIR]`

use ember_tokenizers::{demo, AutoTokenizer, EncodeOptions, Padding};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let tok = match std::env::args().nth(1) {
        Some(dir) => AutoTokenizer::from_pretrained(dir)?,
        None => demo::demo_tokenizer()?,
    };
    let texts = ["The room was clean and quiet.", "房间很干净，早餐也不错。"];
    let batch = tok.batch_encode(&texts, &EncodeOptions::default().padding(Padding::Longest))?;
    for (i, text) in texts.iter().enumerate() {
        println!("{text}");
        println!("  tokens   {:?}", batch.tokens(i));
        println!("  ids      {:?}", batch.input_ids()[i]);
        println!("  word_ids {:?}", batch.word_ids(i));
        println!("  decoded  {:?}", tok.decode(&batch.input_ids()[i], true)?);
    }
    let tensors = batch.to_tensors::<burn::backend::Flex>(&Default::default())?;
    println!("input_ids tensor: {:?}", tensors.input_ids.dims());
    Ok(())
}
