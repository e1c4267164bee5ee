//! Quantized loading and saving, as transformers' bitsandbytes integration does it:
//! `from_pretrained(dir, quantization_config=BitsAndBytesConfig(...))` quantizes every linear
//! layer while loading (except the output head and the modules the config skips), a folder that
//! Python saved quantized loads as it is, and `save_pretrained` writes the packed tensors back.

use crate::error::{ModelError, Result};
use ember_peft::QuantizedBase;
use ember_quant::{
    quantize_4bit, BitsAndBytesConfig, ComputeDtype, Int8Weight, QuantizedLinear, QuantizedWeight,
};
use std::path::Path;

/// Blocksize of bitsandbytes' 4-bit weights (transformers does not expose another).
pub const BLOCKSIZE_4BIT: usize = 64;

/// What a load quantizes, and how.
#[derive(Debug, Clone)]
pub(crate) struct QuantPlan {
    /// The config as given (written back into `config.json`).
    pub config: BitsAndBytesConfig,
    /// Module-name patterns left in float32 (`modules_to_not_convert`).
    pub skip: Vec<String>,
    compute: ComputeDtype,
    threshold: f32,
}

impl QuantPlan {
    /// A plan for `config`, or `None` when it quantizes nothing. `default_skips` are the
    /// modules transformers' `get_keys_to_not_convert` finds for this model (its output
    /// embeddings, its last parameter's module); `llm_int8_skip_modules`, when set, replaces them.
    pub fn new(
        config: &BitsAndBytesConfig,
        default_skips: Vec<String>,
        path: &Path,
    ) -> Result<Option<Self>> {
        let bad = |message: String| ModelError::Config {
            path: path.to_owned(),
            message,
        };
        config.validate().map_err(|e| bad(e.to_string()))?;
        if !(config.load_in_4bit || config.load_in_8bit) {
            return Ok(None);
        }
        let compute = ComputeDtype::parse(&config.bnb_4bit_compute_dtype)
            .map_err(|e| bad(format!("quantization_config.bnb_4bit_compute_dtype: {e}")))?;
        let skip = match &config.llm_int8_skip_modules {
            Some(modules) => modules.clone(),
            None => default_skips,
        };
        Ok(Some(QuantPlan {
            config: config.clone(),
            skip,
            compute,
            threshold: config.llm_int8_threshold as f32,
        }))
    }

    /// Whether the linear layer `module` (its full HF name) is quantized: transformers'
    /// `should_convert_module`.
    pub fn converts(&self, module: &str) -> bool {
        should_convert_module(module, &self.skip)
    }

    /// Quantizes a float32 weight `[out, in]` (HF layout) named `key`.
    pub fn quantize(
        &self,
        key: &str,
        hf: &[f32],
        out_features: usize,
        in_features: usize,
    ) -> Result<QuantizedBase> {
        let err =
            |e: ember_quant::QuantError| ModelError::Input(format!("quantizing `{key}`: {e}"));
        let weight = if self.config.load_in_4bit {
            let quant_type = self
                .config
                .quant_type()
                .map_err(|e| ModelError::Input(format!("quantizing `{key}`: {e}")))?;
            QuantizedWeight::FourBit(
                quantize_4bit(
                    hf,
                    &[out_features, in_features],
                    BLOCKSIZE_4BIT,
                    quant_type,
                    self.config.bnb_4bit_use_double_quant,
                )
                .map_err(err)?,
            )
        } else {
            QuantizedWeight::EightBit(
                Int8Weight::quantize(out_features, in_features, hf).map_err(err)?,
            )
        };
        self.wrap(key, weight)
    }

    /// A weight read packed from a checkpoint, with this plan's compute dtype and threshold.
    pub fn wrap(&self, key: &str, weight: QuantizedWeight) -> Result<QuantizedBase> {
        let linear = QuantizedLinear::new(weight, self.compute, self.threshold)
            .map_err(|e| ModelError::Input(format!("quantized weight `{key}`: {e}")))?;
        Ok(QuantizedBase::new(linear))
    }
}

/// transformers' `should_convert_module`: a module stays in float when a pattern matches its
/// name from the start up to a module boundary (`layer.1` matches `layer.1.attn`, not
/// `layer.11.attn`), as a regex with that boundary, or as a suffix.
pub(crate) fn should_convert_module(name: &str, patterns: &[String]) -> bool {
    !patterns.iter().any(|p| {
        if name.ends_with(p.as_str()) {
            return true;
        }
        // `re.match(rf"(?:{key})(?:(?<=\.)|(?=\.|$))", name)`: the regex crate has no
        // look-around, so try every prefix of the name that ends at a boundary.
        let Ok(re) = regex::Regex::new(&format!("^(?:{p})$")) else {
            return false;
        };
        let mut ends: Vec<usize> = name.match_indices('.').map(|(i, _)| i).collect();
        ends.extend(name.match_indices('.').map(|(i, _)| i + 1));
        ends.push(name.len());
        ends.into_iter().any(|end| re.is_match(&name[..end]))
    })
}

/// The modules transformers' `get_keys_to_not_convert` keeps in float for a model: its output
/// embeddings (`lm_head`), and the module of its last parameter when that is a `.weight`.
pub(crate) fn default_skips(
    output_embeddings: Option<&str>,
    last_param: Option<&str>,
) -> Vec<String> {
    let mut skips: Vec<String> = output_embeddings.map(str::to_owned).into_iter().collect();
    if let Some(last) = last_param {
        skips.push(last.strip_suffix(".weight").unwrap_or(last).to_owned());
    }
    skips.sort();
    skips.dedup();
    skips
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_patterns_match_as_transformers_does() {
        let p = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(!should_convert_module("lm_head", &p(&["lm_head"])));
        assert!(!should_convert_module(
            "model.layers.1.mlp",
            &p(&["model.layers.1"])
        ));
        assert!(should_convert_module(
            "model.layers.11.mlp",
            &p(&["model.layers.1"])
        ));
        assert!(!should_convert_module(
            "model.layers.11.mlp",
            &p(&["model.layers.*"])
        ));
        assert!(should_convert_module(
            "model.mlp.gate_proj",
            &p(&["mlp.gate"])
        ));
        assert!(!should_convert_module(
            "model.decoder.layers.23.fc1",
            &p(&["fc1"])
        ));
        assert!(should_convert_module(
            "classifier",
            &p(&["classifier.bias"])
        ));
    }
}
