//! `ember generate`: a prompt on stdin → the model's continuation, streamed as it is produced.

use anyhow::{bail, Context, Result};
use ember::models::generation::{
    generate, EarlyStopping, GenerateOptions, GenerationConfig, Prompt, StopStrings, Streamer,
};
use ember::models::AutoModelForCausalLM;
use ember::tokenizers::{AutoTokenizer, ChatMessage, ChatTemplateOptions};
use std::io::{Read, Write};
use std::path::PathBuf;

/// Arguments of `ember generate`.
#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Checkpoint folder of a causal LM (Llama, Bloom, GPT-2) with its tokenizer files.
    #[arg(long)]
    model: PathBuf,
    /// New tokens to generate at most [default: `max_new_tokens` of generation_config.json,
    /// else 128].
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Greedy decoding (the default unless generation_config.json sets `do_sample`).
    #[arg(long, conflicts_with_all = ["temperature", "top_p", "top_k"])]
    greedy: bool,
    /// Sample with this temperature.
    #[arg(long)]
    temperature: Option<f64>,
    /// Sample from the smallest set of tokens whose probability reaches this, in (0, 1].
    #[arg(long)]
    top_p: Option<f64>,
    /// Sample from the k most likely tokens (0: all).
    #[arg(long)]
    top_k: Option<usize>,
    /// HF's repetition penalty (1.0: none).
    #[arg(long)]
    repetition_penalty: Option<f64>,
    /// Beam search with this many beams (1: greedy or sampling). The text is printed at the
    /// end, not streamed.
    #[arg(long)]
    num_beams: Option<usize>,
    /// Sequences to return per prompt (at most --num-beams; with sampling, independent draws).
    #[arg(long)]
    num_return_sequences: Option<usize>,
    /// Beam search: a finished beam's score is divided by (new tokens) ** this.
    #[arg(long, allow_hyphen_values = true)]
    length_penalty: Option<f64>,
    /// Beam search: `true`, `false` or `never` (HF's `early_stopping`).
    #[arg(long)]
    early_stopping: Option<EarlyStopping>,
    /// No n-gram of this size occurs twice.
    #[arg(long)]
    no_repeat_ngram_size: Option<usize>,
    /// No EOS before this many new tokens.
    #[arg(long)]
    min_new_tokens: Option<usize>,
    /// Sampling: typical decoding with this probability mass, in (0, 1].
    #[arg(long)]
    typical_p: Option<f64>,
    /// Sampling: drop tokens less likely than this, in [0, 1).
    #[arg(long)]
    epsilon_cutoff: Option<f64>,
    /// Token ids never generated, comma-separated for a sequence (repeatable: `--bad-words-ids
    /// 5 --bad-words-ids 7,8`).
    #[arg(long)]
    bad_words_ids: Vec<String>,
    /// Stop once the output ends with this text (repeatable).
    #[arg(long = "stop")]
    stop_strings: Vec<String>,
    /// The seed of sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Wrap the prompt as a user message in the tokenizer's chat template, with the generation
    /// prompt added.
    #[arg(long)]
    chat: bool,
    /// With --chat: a system message first.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// peft adapters applied to the model (`--adapter DIR[:NAME]`, `--active NAME`).
    #[command(flatten)]
    adapters: crate::peft::AdapterArgs,
    /// Print one JSON object instead of streaming: the text, the prompt's and the generated
    /// ids, and why generation ended.
    #[arg(long)]
    json: bool,
    /// Quantize the model while loading (a folder saved quantized needs no flag).
    #[command(flatten)]
    quant: crate::quantize::QuantArgs,
    /// The dtype the weights are kept in.
    #[command(flatten)]
    dtype: crate::dtype::DtypeArgs,
}

/// HF's `TextStreamer`: decodes a row's new tokens so far and prints the text that became
/// final since the last call, holding back an incomplete UTF-8 sequence.
struct TextStreamer<'a, W: Write> {
    tokenizer: &'a AutoTokenizer,
    out: W,
    ids: Vec<u32>,
    printed: usize,
    error: Option<std::io::Error>,
}

impl<W: Write> TextStreamer<'_, W> {
    fn flush_text(&mut self, last: bool) {
        let Ok(text) = self.tokenizer.decode(&self.ids, true) else {
            return;
        };
        let mut end = text.len();
        if !last && text.ends_with('\u{FFFD}') {
            // A character split across tokens: wait for its remaining bytes.
            end = text.trim_end_matches('\u{FFFD}').len();
        }
        if end > self.printed && text.is_char_boundary(self.printed) {
            let result = self
                .out
                .write_all(&text.as_bytes()[self.printed..end])
                .and_then(|_| self.out.flush());
            if let Err(e) = result {
                self.error.get_or_insert(e);
            }
            self.printed = end;
        }
    }
}

impl<W: Write> Streamer for TextStreamer<'_, W> {
    fn put(&mut self, _rows: &[usize], tokens: &[u32]) {
        self.ids.extend_from_slice(tokens);
        self.flush_text(false);
    }

    fn end(&mut self) {
        self.flush_text(true);
        if let Err(e) = self.out.write_all(b"\n").and_then(|_| self.out.flush()) {
            self.error.get_or_insert(e);
        }
    }
}

/// Reads the whole of stdin as one prompt and generates its continuation.
pub fn run(a: GenerateArgs) -> Result<()> {
    let device = ember::default_device();
    let tokenizer = AutoTokenizer::from_pretrained(&a.model)?;
    let options = a.dtype.options(
        a.quant
            .options(ember::models::FromPretrainedOptions::default()),
    )?;
    let model =
        AutoModelForCausalLM::from_pretrained_with::<ember::Backend>(&a.model, &options, &device)?
            .0;
    let model = a.adapters.apply(model)?;
    let mut config = GenerationConfig::from_pretrained(&a.model)?;
    config.fill_from_model_config(&model.config_json());
    config.max_new_tokens = a.max_new_tokens.or(config.max_new_tokens).or(Some(128));
    if a.greedy {
        config.do_sample = false;
    }
    if a.temperature.is_some() || a.top_p.is_some() || a.top_k.is_some() {
        config.do_sample = true;
    }
    config.temperature = a.temperature.unwrap_or(config.temperature);
    config.top_p = a.top_p.unwrap_or(config.top_p);
    config.top_k = a.top_k.unwrap_or(config.top_k);
    config.repetition_penalty = a.repetition_penalty.unwrap_or(config.repetition_penalty);
    if a.typical_p.is_some() || a.epsilon_cutoff.is_some() {
        config.do_sample = true;
    }
    config.typical_p = a.typical_p.unwrap_or(config.typical_p);
    config.epsilon_cutoff = a.epsilon_cutoff.unwrap_or(config.epsilon_cutoff);
    config.num_beams = a.num_beams.unwrap_or(config.num_beams);
    config.num_return_sequences = a
        .num_return_sequences
        .unwrap_or(config.num_return_sequences);
    config.length_penalty = a.length_penalty.unwrap_or(config.length_penalty);
    config.early_stopping = a.early_stopping.unwrap_or(config.early_stopping);
    config.no_repeat_ngram_size = a
        .no_repeat_ngram_size
        .unwrap_or(config.no_repeat_ngram_size);
    config.min_new_tokens = a.min_new_tokens.unwrap_or(config.min_new_tokens);
    if !a.bad_words_ids.is_empty() {
        let parse = |seq: &String| -> Result<Vec<u32>> {
            seq.split(',')
                .map(|t| {
                    t.trim().parse::<u32>().with_context(|| {
                        format!("--bad-words-ids `{seq}`: `{t}` is not a token id")
                    })
                })
                .collect()
        };
        config.bad_words_ids = Some(a.bad_words_ids.iter().map(parse).collect::<Result<_>>()?);
    }
    let mut stops = config.stop_string_list().map_err(anyhow::Error::msg)?;
    stops.extend(a.stop_strings.iter().cloned());
    config.validate().map_err(anyhow::Error::msg)?;

    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .context("reading the prompt from stdin")?;
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let ids = if a.chat {
        let mut messages = Vec::new();
        if let Some(system) = &a.system {
            messages.push(ChatMessage::system(system.clone()));
        }
        messages.push(ChatMessage::user(text));
        tokenizer.apply_chat_template_ids(
            &messages,
            &ChatTemplateOptions::default().add_generation_prompt(true),
        )?
    } else {
        tokenizer.encode(text, None, true)?
    };
    if ids.is_empty() && config.bos_token_id.is_none() {
        bail!("the prompt is empty and the model has no bos_token_id to start from");
    }
    let mut stop = StopStrings::new(stops, |generated: &[u32]| {
        tokenizer.decode(generated, false).unwrap_or_default()
    });
    let mut streamer = TextStreamer {
        tokenizer: &tokenizer,
        out: std::io::stdout().lock(),
        ids: Vec::new(),
        printed: 0,
        error: None,
    };
    let eos = config.eos_ids().map_err(anyhow::Error::msg)?;
    // One streamed row only: beam search decides its rows at the end, and several returned
    // sequences would interleave.
    let stream = !a.json && config.num_beams == 1 && config.num_return_sequences == 1;
    let options = GenerateOptions {
        seed: Some(a.seed),
        streamer: stream.then_some(&mut streamer as &mut dyn Streamer),
        stopping: vec![&mut stop],
    };
    let prompt = Prompt::single(ids.clone());
    let out = generate(&model, &prompt, &config, options, &device)?;
    if let Some(e) = streamer.error.take() {
        return Err(e).context("writing to stdout");
    }
    let finish = |new: &[u32]| match new.last() {
        Some(t) if eos.contains(t) => "eos",
        _ if new.len() >= config.max_new_tokens.unwrap_or(usize::MAX) => "length",
        _ => "stop",
    };
    if a.json {
        let new = &out.new_tokens[0];
        let mut value = serde_json::json!({
            "text": tokenizer.decode(new, true)?,
            "prompt_ids": ids,
            "generated_ids": new,
            "finish_reason": finish(new),
        });
        if out.new_tokens.len() > 1 || out.sequences_scores.is_some() {
            // Every returned sequence, best first; the top-level fields are the first one.
            let mut all = Vec::new();
            for (i, new) in out.new_tokens.iter().enumerate() {
                all.push(serde_json::json!({
                    "text": tokenizer.decode(new, true)?,
                    "generated_ids": new,
                    "finish_reason": finish(new),
                    "score": out.sequences_scores.as_ref().map(|s| s[i]),
                }));
            }
            value["sequences"] = all.into();
        }
        println!("{value}");
    } else if !stream {
        let mut stdout = std::io::stdout().lock();
        for new in &out.new_tokens {
            writeln!(stdout, "{}", tokenizer.decode(new, true)?).context("writing to stdout")?;
        }
    }
    Ok(())
}
