//! `--dtype`: the float dtype a model's weights are kept in (transformers' `dtype=`);
//! `--bf16` / `--fp16`: mixed-precision training (`TrainingArguments.bf16` / `fp16`).

use anyhow::Result;
use ember::models::{DtypeArg, FromPretrainedOptions};
use ember::train::TrainingArguments;

/// The flag of `ember generate | embed | predict | evaluate`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DtypeArgs {
    /// Keep the weights in this dtype: float32 (the default), bfloat16 or float16 (half the
    /// memory; computation stays float32), or auto (config.json's `dtype` / `torch_dtype`)
    #[arg(long, value_parser = ["float32", "bfloat16", "float16", "auto"])]
    pub dtype: Option<String>,
}

impl DtypeArgs {
    /// `options` with the flag's `dtype` set (unchanged without the flag).
    pub fn options(&self, options: FromPretrainedOptions) -> Result<FromPretrainedOptions> {
        Ok(match &self.dtype {
            Some(name) => options.dtype(name.parse::<DtypeArg>()?),
            None => options,
        })
    }
}

/// The mixed-precision flags of `ember train`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct MixedPrecisionArgs {
    /// bfloat16 mixed precision (`bf16=True`): float32 master weights, linear layers and
    /// attention in bfloat16 (torch's autocast)
    #[arg(long, conflicts_with = "fp16")]
    pub bf16: bool,
    /// float16 mixed precision (`fp16=True`) with dynamic loss scaling (torch's GradScaler)
    #[arg(long)]
    pub fp16: bool,
}

impl MixedPrecisionArgs {
    /// Sets `bf16` / `fp16` in `args` when a flag is given (an --args file's own setting
    /// stands otherwise).
    pub fn apply(&self, args: &mut TrainingArguments) {
        if self.bf16 {
            (args.bf16, args.fp16) = (true, false);
        }
        if self.fp16 {
            (args.bf16, args.fp16) = (false, true);
        }
    }
}
