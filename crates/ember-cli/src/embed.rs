//! `ember embed`: sentences on stdin → one JSON line of embeddings per sentence.

use anyhow::{Context, Result};
use ember::burn::tensor::{Int, Tensor, TensorData};
use ember::models::pooling::{l2_normalize, mean_pooling};
use ember::models::{AutoModel, BertModel, EncoderInput, OutputOptions};
use ember::tokenizers::{AutoTokenizer, EncodeOptions, Truncation};
use std::io::{BufRead, BufWriter, Write};
use std::path::PathBuf;

/// Arguments of `ember embed`.
#[derive(clap::Args)]
pub struct EmbedArgs {
    /// Checkpoint folder with the tokenizer files, `config.json` and weights (BERT or RoBERTa,
    /// e.g. all-MiniLM-L6-v2).
    #[arg(long)]
    model: PathBuf,
    /// Truncate each sentence to this many tokens, special tokens included. Default: the
    /// tokenizer's `model_max_length`, at most what the position embeddings allow.
    #[arg(long)]
    max_length: Option<usize>,
    /// peft adapters applied to the encoder (`--adapter DIR[:NAME]`, `--active NAME`).
    #[command(flatten)]
    adapters: crate::peft::AdapterArgs,
    /// Quantize the encoder while loading.
    #[command(flatten)]
    quant: crate::quantize::QuantArgs,
    /// The dtype the weights are kept in.
    #[command(flatten)]
    dtype: crate::dtype::DtypeArgs,
}

/// Reads sentences from stdin, one per line; prints for each, in order, a JSON object with
/// `mean_normalized` (the masked mean of `last_hidden_state`, L2-normalised, as
/// sentence-transformers computes it) and `cls` (the first token's `last_hidden_state`). Each
/// sentence is encoded alone, so an empty line gives the embedding of the special tokens.
pub fn run(args: EmbedArgs) -> Result<()> {
    let device = ember::default_device();
    let tokenizer = AutoTokenizer::from_pretrained(&args.model)?;
    let options = args.dtype.options(
        args.quant
            .options(ember::models::FromPretrainedOptions::default()),
    )?;
    let model: BertModel<ember::Backend> =
        AutoModel::from_pretrained_with(&args.model, &options, &device)?.0;
    let model = args.adapters.apply(model)?;
    let config = model.config();
    // RoBERTa numbers positions after the padding id, so pad + 1 positions are unusable.
    let offset = if config.is_roberta() {
        config.pad_token_id.unwrap_or(0) as usize + 1
    } else {
        0
    };
    let positions = config.max_position_embeddings.saturating_sub(offset);
    let max_length = args.max_length.unwrap_or_else(|| {
        tokenizer
            .model_max_length()
            .unwrap_or(positions)
            .min(positions)
    });
    let options = EncodeOptions::default()
        .max_length(max_length)
        .truncation(Truncation::LongestFirst);

    let mut out = BufWriter::new(std::io::stdout().lock());
    for (n, line) in std::io::stdin().lock().split(b'\n').enumerate() {
        let bytes = line.context("reading stdin")?;
        let mut text = String::from_utf8(bytes)
            .with_context(|| format!("stdin line {} is not UTF-8", n + 1))?;
        if text.ends_with('\r') {
            text.pop();
        }
        let encoding = tokenizer.batch_encode(&[text.as_str()], &options)?;
        let ids: Vec<i64> = encoding.input_ids()[0]
            .iter()
            .map(|&i| i64::from(i))
            .collect();
        let types: Vec<i64> = encoding.token_type_ids()[0]
            .iter()
            .map(|&i| i64::from(i))
            .collect();
        let len = ids.len();
        let ids =
            Tensor::<ember::Backend, 2, Int>::from_data(TensorData::new(ids, [1, len]), &device);
        let types =
            Tensor::<ember::Backend, 2, Int>::from_data(TensorData::new(types, [1, len]), &device);
        let mask = Tensor::<ember::Backend, 2, Int>::ones([1, len], &device);
        let input = EncoderInput::new(ids)
            .with_attention_mask(mask.clone())
            .with_token_type_ids(types);
        let state = model
            .forward(input, OutputOptions::default())
            .with_context(|| format!("embedding stdin line {}", n + 1))?
            .last_hidden_state;
        let cls = state.clone().narrow(1, 0, 1).reshape([1, -1]);
        let mean = l2_normalize(mean_pooling(state, mask));
        let row = |t: Tensor<ember::Backend, 2>| -> Result<Vec<f32>> {
            t.into_data()
                .to_vec::<f32>()
                .map_err(|e| anyhow::anyhow!("reading an embedding: {e:?}"))
        };
        let json = serde_json::json!({ "mean_normalized": row(mean)?, "cls": row(cls)? });
        writeln!(out, "{json}").context("writing stdout")?;
    }
    out.flush().context("writing stdout")?;
    Ok(())
}
