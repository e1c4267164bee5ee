//! `--dtype`: the float dtype a model's weights are kept in (transformers' `dtype=`).

use anyhow::Result;
use ember::models::{DtypeArg, FromPretrainedOptions};

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
