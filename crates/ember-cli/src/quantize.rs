//! `ember quantize` and the quantization flags every loading command shares: transformers'
//! `BitsAndBytesConfig` as command-line options.

use crate::peft::AnyModel;
use anyhow::{bail, Context, Result};
use ember::models::FromPretrainedOptions;
use ember::quant::BitsAndBytesConfig;
use ember::{default_device, Backend};
use std::path::{Path, PathBuf};

/// `BitsAndBytesConfig` fields as flags: quantize the linear layers while loading.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct QuantArgs {
    /// LLM.int8: int8 weights with row-wise absmax, outlier activation columns in float.
    #[arg(long, conflicts_with = "load_in_4bit")]
    pub load_in_8bit: bool,
    /// 4-bit weights (NF4 or FP4), blockwise absmax (blocksize 64).
    #[arg(long)]
    pub load_in_4bit: bool,
    /// The 4-bit code: nf4 or fp4 (transformers' default: fp4).
    #[arg(long, value_parser = ["nf4", "fp4"], default_value = "fp4", requires = "load_in_4bit")]
    pub bnb_4bit_quant_type: String,
    /// Double quantization: the absmax values themselves in 8 bits (blocks of 256).
    #[arg(long, requires = "load_in_4bit")]
    pub bnb_4bit_use_double_quant: bool,
    /// The dtype 4-bit products compute in: float32 or bfloat16.
    #[arg(long, value_parser = ["float32", "bfloat16"], default_value = "float32", requires = "load_in_4bit")]
    pub bnb_4bit_compute_dtype: String,
    /// LLM.int8's outlier threshold (0: no outlier columns).
    #[arg(long, default_value_t = 6.0, requires = "load_in_8bit")]
    pub llm_int8_threshold: f64,
    /// Modules left in float (transformers' `llm_int8_skip_modules`; repeatable). Default: the
    /// output head.
    #[arg(long = "llm-int8-skip-module")]
    pub llm_int8_skip_modules: Vec<String>,
}

impl QuantArgs {
    /// The config the flags describe, `None` without `--load-in-8bit` / `--load-in-4bit`.
    pub fn config(&self) -> Option<BitsAndBytesConfig> {
        if !(self.load_in_8bit || self.load_in_4bit) {
            return None;
        }
        let mut c = BitsAndBytesConfig {
            load_in_8bit: self.load_in_8bit,
            load_in_4bit: self.load_in_4bit,
            llm_int8_threshold: self.llm_int8_threshold,
            ..BitsAndBytesConfig::default()
        };
        if self.load_in_4bit {
            c.bnb_4bit_quant_type = self.bnb_4bit_quant_type.clone();
            c.bnb_4bit_use_double_quant = self.bnb_4bit_use_double_quant;
            c.bnb_4bit_compute_dtype = self.bnb_4bit_compute_dtype.clone();
        }
        if !self.llm_int8_skip_modules.is_empty() {
            c.llm_int8_skip_modules = Some(self.llm_int8_skip_modules.clone());
        }
        Some(c)
    }

    /// `options` with the flags' `quantization_config` set (unchanged without flags).
    pub fn options(&self, options: FromPretrainedOptions) -> FromPretrainedOptions {
        match self.config() {
            Some(c) => options.quantization_config(c),
            None => options,
        }
    }
}

/// Arguments of `ember quantize`.
#[derive(clap::Args)]
pub struct QuantizeArgs {
    /// The float checkpoint folder (config.json + weights; tokenizer files are copied).
    #[arg(long)]
    model: PathBuf,
    /// Where the quantized checkpoint goes (transformers + bitsandbytes' format).
    #[arg(long)]
    output_dir: PathBuf,
    /// How to quantize.
    #[command(flatten)]
    quant: QuantArgs,
}

/// `ember quantize`: `from_pretrained(model, quantization_config=...)` then
/// `save_pretrained(output_dir)`, with the tokenizer files copied beside it.
pub fn run(a: QuantizeArgs) -> Result<()> {
    if a.quant.config().is_none() {
        bail!("ember quantize needs --load-in-8bit or --load-in-4bit");
    }
    let device = default_device();
    let float = AnyModel::<Backend>::from_config_of(&a.model, &device)?.get_memory_footprint();
    let model = AnyModel::<Backend>::from_pretrained_with(
        &a.model,
        &a.quant.options(FromPretrainedOptions::default()),
        &device,
    )?;
    let quantized = model.get_memory_footprint();
    model
        .save_pretrained(&a.output_dir)
        .with_context(|| format!("saving {}", a.output_dir.display()))?;
    copy_tokenizer_files(&a.model, &a.output_dir)?;
    eprintln!(
        "saved {} ({:.1} MiB of parameters, {:.2}x less than {:.1} MiB in float32)",
        a.output_dir.display(),
        quantized as f64 / 1048576.0,
        float as f64 / quantized.max(1) as f64,
        float as f64 / 1048576.0
    );
    Ok(())
}

/// Copies the tokenizer and generation files of `from` into `to` (those that exist).
pub fn copy_tokenizer_files(from: &Path, to: &Path) -> Result<()> {
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.txt",
        "vocab.json",
        "merges.txt",
        "generation_config.json",
        "chat_template.jinja",
    ] {
        let src = from.join(name);
        if src.is_file() {
            std::fs::copy(&src, to.join(name))
                .with_context(|| format!("copying {} into {}", src.display(), to.display()))?;
        }
    }
    Ok(())
}
