//! transformers' `BitsAndBytesConfig`: the `quantization_config` of a bitsandbytes checkpoint's
//! `config.json`.
//!
//! transformers 5 writes it with `BitsAndBytesConfig.to_dict()` (keys sorted by `config.json`'s
//! `sort_keys=True`):
//!
//! ```json
//! "quantization_config": {
//!   "_load_in_4bit": true,
//!   "_load_in_8bit": false,
//!   "bnb_4bit_compute_dtype": "float32",
//!   "bnb_4bit_quant_storage": "uint8",
//!   "bnb_4bit_quant_type": "nf4",
//!   "bnb_4bit_use_double_quant": true,
//!   "llm_int8_enable_fp32_cpu_offload": false,
//!   "llm_int8_has_fp16_weight": false,
//!   "llm_int8_skip_modules": null,
//!   "llm_int8_threshold": 6.0,
//!   "load_in_4bit": true,
//!   "load_in_8bit": false,
//!   "quant_method": "bitsandbytes"
//! }
//! ```
//!
//! `_load_in_4bit` / `_load_in_8bit` are the Python attributes behind the `load_in_4bit` /
//! `load_in_8bit` properties; `to_dict` writes both spellings with the same value. On reading,
//! transformers passes the dict to `BitsAndBytesConfig(**dict)`, where `load_in_4bit` wins and
//! `_load_in_4bit` is an ignored keyword; we do the same (falling back to `_load_in_4bit` only
//! when `load_in_4bit` is absent). The dtypes are torch dtype names without `torch.`.
//!
//! [`BitsAndBytesConfig::to_json_value`] writes exactly the keys of `to_dict` (plus any unknown
//! keys that were read, kept in [`BitsAndBytesConfig::extra`]), so a dict written by transformers
//! reads and writes back to an equal JSON value.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::blockwise::QuantType;

/// `quant_method` of a bitsandbytes config.
pub const QUANT_METHOD_BITSANDBYTES: &str = "bitsandbytes";

/// The compute dtypes `validate` accepts for `bnb_4bit_compute_dtype`.
pub const COMPUTE_DTYPES: [&str; 3] = ["float32", "bfloat16", "float16"];

/// The storage dtypes transformers accepts for `bnb_4bit_quant_storage`.
pub const QUANT_STORAGE_DTYPES: [&str; 6] =
    ["float16", "float32", "int8", "uint8", "float64", "bfloat16"];

/// A `quantization_config` that cannot be read or is not one bitsandbytes can load.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `load_in_4bit` and `load_in_8bit` are both true (transformers raises the same).
    #[error("quantization_config: load_in_4bit and load_in_8bit are both true, but only one can be used")]
    Both4bitAnd8bit,

    /// A field whose value is not one of the accepted ones.
    #[error("quantization_config.{field} = {value}: expected {expected}")]
    InvalidValue {
        /// The field, e.g. `bnb_4bit_quant_type`.
        field: &'static str,
        /// The value, as JSON.
        value: String,
        /// The accepted values, in words.
        expected: &'static str,
    },

    /// A field of the wrong JSON type (or the whole config not being an object).
    #[error("quantization_config.{field}: expected {expected}, found {value}")]
    WrongType {
        /// The field (`quantization_config` for the config itself).
        field: String,
        /// The JSON type expected.
        expected: &'static str,
        /// The value found, as JSON.
        value: String,
    },
}

/// transformers' `BitsAndBytesConfig` with its defaults (`BitsAndBytesConfig()` in Python).
#[derive(Debug, Clone, PartialEq)]
pub struct BitsAndBytesConfig {
    /// LLM.int8 quantization of the linear layers (`load_in_8bit`, default false).
    pub load_in_8bit: bool,
    /// NF4 / FP4 quantization of the linear layers (`load_in_4bit`, default false).
    pub load_in_4bit: bool,
    /// LLM.int8's outlier threshold (`llm_int8_threshold`, default 6.0).
    pub llm_int8_threshold: f64,
    /// Modules (name parts) that stay unquantized (`llm_int8_skip_modules`, default `None`:
    /// transformers then skips the output head).
    pub llm_int8_skip_modules: Option<Vec<String>>,
    /// Keep CPU-offloaded modules in float32 (`llm_int8_enable_fp32_cpu_offload`, default false).
    pub llm_int8_enable_fp32_cpu_offload: bool,
    /// LLM.int8 with 16-bit main weights (`llm_int8_has_fp16_weight`, default false).
    pub llm_int8_has_fp16_weight: bool,
    /// The dtype 4-bit layers compute in (`bnb_4bit_compute_dtype`, default `"float32"`).
    pub bnb_4bit_compute_dtype: String,
    /// `"nf4"` or `"fp4"` (`bnb_4bit_quant_type`, default `"fp4"`).
    pub bnb_4bit_quant_type: String,
    /// Double quantization of the absmax (`bnb_4bit_use_double_quant`, default false).
    pub bnb_4bit_use_double_quant: bool,
    /// The dtype the packed 4-bit bytes are stored as (`bnb_4bit_quant_storage`, default
    /// `"uint8"`).
    pub bnb_4bit_quant_storage: String,
    /// Always `"bitsandbytes"` (`quant_method`).
    pub quant_method: String,
    /// Keys transformers does not know, kept so that they are written back.
    pub extra: Map<String, Value>,
}

impl Default for BitsAndBytesConfig {
    fn default() -> Self {
        BitsAndBytesConfig {
            load_in_8bit: false,
            load_in_4bit: false,
            llm_int8_threshold: 6.0,
            llm_int8_skip_modules: None,
            llm_int8_enable_fp32_cpu_offload: false,
            llm_int8_has_fp16_weight: false,
            bnb_4bit_compute_dtype: "float32".into(),
            bnb_4bit_quant_type: "fp4".into(),
            bnb_4bit_use_double_quant: false,
            bnb_4bit_quant_storage: "uint8".into(),
            quant_method: QUANT_METHOD_BITSANDBYTES.into(),
            extra: Map::new(),
        }
    }
}

/// The keys `to_dict` writes, in `config.json`'s (sorted) order.
const KNOWN_KEYS: [&str; 13] = [
    "_load_in_4bit",
    "_load_in_8bit",
    "bnb_4bit_compute_dtype",
    "bnb_4bit_quant_storage",
    "bnb_4bit_quant_type",
    "bnb_4bit_use_double_quant",
    "llm_int8_enable_fp32_cpu_offload",
    "llm_int8_has_fp16_weight",
    "llm_int8_skip_modules",
    "llm_int8_threshold",
    "load_in_4bit",
    "load_in_8bit",
    "quant_method",
];

fn wrong_type(field: &str, expected: &'static str, value: &Value) -> ConfigError {
    ConfigError::WrongType {
        field: field.to_owned(),
        expected,
        value: value.to_string(),
    }
}

fn get_bool(obj: &Map<String, Value>, key: &str) -> Result<Option<bool>, ConfigError> {
    match obj.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(wrong_type(key, "a boolean", v)),
    }
}

/// A dtype name, `null` meaning the default (as `BitsAndBytesConfig(x=None)` does).
fn get_dtype(obj: &Map<String, Value>, key: &str) -> Result<Option<String>, ConfigError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(wrong_type(key, "a dtype name (string)", v)),
    }
}

impl BitsAndBytesConfig {
    /// `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=..., bnb_4bit_use_double_quant=...,
    /// bnb_4bit_compute_dtype=...)`, the rest default.
    pub fn new_4bit(quant_type: QuantType, double_quant: bool, compute_dtype: &str) -> Self {
        BitsAndBytesConfig {
            load_in_4bit: true,
            bnb_4bit_quant_type: quant_type.as_str().into(),
            bnb_4bit_use_double_quant: double_quant,
            bnb_4bit_compute_dtype: compute_dtype.into(),
            ..Self::default()
        }
    }

    /// `BitsAndBytesConfig(load_in_8bit=True)`, the rest default.
    pub fn new_8bit() -> Self {
        BitsAndBytesConfig {
            load_in_8bit: true,
            ..Self::default()
        }
    }

    /// Reads a `quantization_config` object as transformers does: missing keys take their
    /// defaults, `null` dtypes mean the default dtype, unknown keys go to [`Self::extra`].
    ///
    /// # Errors
    ///
    /// [`ConfigError::WrongType`] naming the field whose JSON type is wrong. Values are not
    /// checked here; see [`Self::validate`].
    pub fn from_json_value(value: &Value) -> Result<Self, ConfigError> {
        let obj = value
            .as_object()
            .ok_or_else(|| wrong_type("quantization_config", "an object", value))?;
        // `load_in_4bit` is the constructor argument; `_load_in_4bit` an ignored keyword there.
        let load_in_4bit = match get_bool(obj, "load_in_4bit")? {
            Some(b) => b,
            None => get_bool(obj, "_load_in_4bit")?.unwrap_or(false),
        };
        let load_in_8bit = match get_bool(obj, "load_in_8bit")? {
            Some(b) => b,
            None => get_bool(obj, "_load_in_8bit")?.unwrap_or(false),
        };
        let mut config = BitsAndBytesConfig {
            load_in_4bit,
            load_in_8bit,
            ..BitsAndBytesConfig::default()
        };
        // Checked even when the other spelling is present, so that a bad value is not dropped.
        get_bool(obj, "_load_in_4bit")?;
        get_bool(obj, "_load_in_8bit")?;
        if let Some(v) = obj.get("llm_int8_threshold") {
            config.llm_int8_threshold = v
                .as_f64()
                .ok_or_else(|| wrong_type("llm_int8_threshold", "a number", v))?;
        }
        config.llm_int8_skip_modules = match obj.get("llm_int8_skip_modules") {
            None | Some(Value::Null) => None,
            Some(Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|item| {
                        item.as_str().map(str::to_owned).ok_or_else(|| {
                            wrong_type("llm_int8_skip_modules", "a list of strings", item)
                        })
                    })
                    .collect::<Result<_, _>>()?,
            ),
            Some(v) => {
                return Err(wrong_type(
                    "llm_int8_skip_modules",
                    "a list of strings or null",
                    v,
                ))
            }
        };
        if let Some(b) = get_bool(obj, "llm_int8_enable_fp32_cpu_offload")? {
            config.llm_int8_enable_fp32_cpu_offload = b;
        }
        if let Some(b) = get_bool(obj, "llm_int8_has_fp16_weight")? {
            config.llm_int8_has_fp16_weight = b;
        }
        if let Some(s) = get_dtype(obj, "bnb_4bit_compute_dtype")? {
            config.bnb_4bit_compute_dtype = s;
        }
        match obj.get("bnb_4bit_quant_type") {
            None => {}
            Some(Value::String(s)) => config.bnb_4bit_quant_type = s.clone(),
            Some(v) => return Err(wrong_type("bnb_4bit_quant_type", "a string", v)),
        }
        if let Some(b) = get_bool(obj, "bnb_4bit_use_double_quant")? {
            config.bnb_4bit_use_double_quant = b;
        }
        if let Some(s) = get_dtype(obj, "bnb_4bit_quant_storage")? {
            config.bnb_4bit_quant_storage = s;
        }
        match obj.get("quant_method") {
            None => {}
            Some(Value::String(s)) => config.quant_method = s.clone(),
            Some(v) => return Err(wrong_type("quant_method", "a string", v)),
        }
        config.extra = obj
            .iter()
            .filter(|(k, _)| !KNOWN_KEYS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok(config)
    }

    /// The `quantization_config` object as transformers' `to_dict` writes it, keys sorted as in
    /// `config.json` (unknown keys from [`Self::extra`] sorted in with them).
    pub fn to_json_value(&self) -> Value {
        let mut entries: Vec<(String, Value)> = vec![
            ("_load_in_4bit".into(), Value::Bool(self.load_in_4bit)),
            ("_load_in_8bit".into(), Value::Bool(self.load_in_8bit)),
            (
                "bnb_4bit_compute_dtype".into(),
                Value::String(self.bnb_4bit_compute_dtype.clone()),
            ),
            (
                "bnb_4bit_quant_storage".into(),
                Value::String(self.bnb_4bit_quant_storage.clone()),
            ),
            (
                "bnb_4bit_quant_type".into(),
                Value::String(self.bnb_4bit_quant_type.clone()),
            ),
            (
                "bnb_4bit_use_double_quant".into(),
                Value::Bool(self.bnb_4bit_use_double_quant),
            ),
            (
                "llm_int8_enable_fp32_cpu_offload".into(),
                Value::Bool(self.llm_int8_enable_fp32_cpu_offload),
            ),
            (
                "llm_int8_has_fp16_weight".into(),
                Value::Bool(self.llm_int8_has_fp16_weight),
            ),
            (
                "llm_int8_skip_modules".into(),
                match &self.llm_int8_skip_modules {
                    None => Value::Null,
                    Some(m) => Value::Array(m.iter().cloned().map(Value::String).collect()),
                },
            ),
            (
                "llm_int8_threshold".into(),
                serde_json::Number::from_f64(self.llm_int8_threshold)
                    .map_or(Value::Null, Value::Number),
            ),
            ("load_in_4bit".into(), Value::Bool(self.load_in_4bit)),
            ("load_in_8bit".into(), Value::Bool(self.load_in_8bit)),
            (
                "quant_method".into(),
                Value::String(self.quant_method.clone()),
            ),
        ];
        entries.extend(
            self.extra
                .iter()
                .filter(|(k, _)| !KNOWN_KEYS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        Value::Object(entries.into_iter().collect())
    }

    /// Reads `config.json`'s `quantization_config`, if it is a bitsandbytes one.
    ///
    /// `Ok(None)` when the config has no `quantization_config` or another `quant_method`.
    ///
    /// # Errors
    ///
    /// See [`Self::from_json_value`].
    pub fn from_model_config(config_json: &Value) -> Result<Option<Self>, ConfigError> {
        match config_json.get("quantization_config") {
            None | Some(Value::Null) => Ok(None),
            Some(q) if q.get("quant_method").and_then(Value::as_str) == Some("bitsandbytes") => {
                Self::from_json_value(q).map(Some)
            }
            Some(_) => Ok(None),
        }
    }

    /// Checks what transformers and bitsandbytes check: not both 4 and 8 bit, the quant type
    /// `nf4` / `fp4`, the compute dtype `float32` / `bfloat16` / `float16`, a known storage
    /// dtype and `quant_method` `"bitsandbytes"`.
    ///
    /// # Errors
    ///
    /// The first field that is wrong, with its value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.load_in_4bit && self.load_in_8bit {
            return Err(ConfigError::Both4bitAnd8bit);
        }
        let invalid = |field, value: &str, expected| ConfigError::InvalidValue {
            field,
            value: Value::String(value.to_owned()).to_string(),
            expected,
        };
        if self.quant_method != QUANT_METHOD_BITSANDBYTES {
            return Err(invalid(
                "quant_method",
                &self.quant_method,
                "\"bitsandbytes\"",
            ));
        }
        if !["nf4", "fp4"].contains(&self.bnb_4bit_quant_type.as_str()) {
            return Err(invalid(
                "bnb_4bit_quant_type",
                &self.bnb_4bit_quant_type,
                "\"nf4\" or \"fp4\"",
            ));
        }
        if !COMPUTE_DTYPES.contains(&self.bnb_4bit_compute_dtype.as_str()) {
            return Err(invalid(
                "bnb_4bit_compute_dtype",
                &self.bnb_4bit_compute_dtype,
                "one of \"float32\", \"bfloat16\", \"float16\"",
            ));
        }
        if !QUANT_STORAGE_DTYPES.contains(&self.bnb_4bit_quant_storage.as_str()) {
            return Err(invalid(
                "bnb_4bit_quant_storage",
                &self.bnb_4bit_quant_storage,
                "one of \"float16\", \"float32\", \"int8\", \"uint8\", \"float64\", \"bfloat16\"",
            ));
        }
        if !self.llm_int8_threshold.is_finite() {
            return Err(ConfigError::InvalidValue {
                field: "llm_int8_threshold",
                value: self.llm_int8_threshold.to_string(),
                expected: "a finite number",
            });
        }
        Ok(())
    }

    /// transformers' `quantization_method()`: `"llm_int8"`, `"nf4"`, `"fp4"`, or `None` when
    /// neither 4 nor 8 bit is enabled (or the quant type is unknown).
    pub fn quantization_method(&self) -> Option<&'static str> {
        if self.load_in_8bit {
            Some("llm_int8")
        } else if self.load_in_4bit {
            match self.bnb_4bit_quant_type.as_str() {
                "nf4" => Some("nf4"),
                "fp4" => Some("fp4"),
                _ => None,
            }
        } else {
            None
        }
    }

    /// The 4-bit quant type.
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidValue`] for a quant type other than `nf4` / `fp4`.
    pub fn quant_type(&self) -> Result<QuantType, ConfigError> {
        self.bnb_4bit_quant_type
            .parse()
            .map_err(|_| ConfigError::InvalidValue {
                field: "bnb_4bit_quant_type",
                value: Value::String(self.bnb_4bit_quant_type.clone()).to_string(),
                expected: "\"nf4\" or \"fp4\"",
            })
    }
}

impl Serialize for BitsAndBytesConfig {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_json_value().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for BitsAndBytesConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        Self::from_json_value(&value).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn transformers_nf4() -> Value {
        json!({
            "_load_in_4bit": true, "_load_in_8bit": false,
            "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": true,
            "llm_int8_enable_fp32_cpu_offload": false, "llm_int8_has_fp16_weight": false,
            "llm_int8_skip_modules": null, "llm_int8_threshold": 6.0,
            "load_in_4bit": true, "load_in_8bit": false, "quant_method": "bitsandbytes"
        })
    }

    #[test]
    fn round_trip_and_defaults() {
        let v = transformers_nf4();
        let c = BitsAndBytesConfig::from_json_value(&v).unwrap();
        assert_eq!(
            c,
            BitsAndBytesConfig::new_4bit(QuantType::Nf4, true, "bfloat16")
        );
        assert_eq!(c.to_json_value(), v);
        c.validate().unwrap();
        assert_eq!(c.quantization_method(), Some("nf4"));
        // serde goes through the same functions.
        let s = serde_json::to_string(&c).unwrap();
        assert!(s.starts_with("{\"_load_in_4bit\":true,\"_load_in_8bit\":false,"));
        assert_eq!(serde_json::from_str::<BitsAndBytesConfig>(&s).unwrap(), c);

        // Missing keys and null dtypes take transformers' defaults.
        let c = BitsAndBytesConfig::from_json_value(&json!({
            "load_in_8bit": true, "bnb_4bit_compute_dtype": null, "quant_method": "bitsandbytes"
        }))
        .unwrap();
        assert_eq!(c, BitsAndBytesConfig::new_8bit());
        assert_eq!(c.quantization_method(), Some("llm_int8"));
        assert_eq!(c.to_json_value()["bnb_4bit_quant_type"], "fp4");
    }

    #[test]
    fn unknown_keys_are_kept() {
        let mut v = transformers_nf4();
        v["zzz_future"] = json!({"a": [1, 2]});
        v["bnb_4bit_extra"] = json!(3);
        let c = BitsAndBytesConfig::from_json_value(&v).unwrap();
        assert_eq!(c.extra.len(), 2);
        let back = c.to_json_value();
        assert_eq!(back, v);
        let keys: Vec<&String> = back.as_object().unwrap().keys().collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
    }

    #[test]
    fn load_in_wins_over_the_private_attribute() {
        let mut v = transformers_nf4();
        v["_load_in_4bit"] = json!(false);
        assert!(
            BitsAndBytesConfig::from_json_value(&v)
                .unwrap()
                .load_in_4bit
        );
        v.as_object_mut().unwrap().remove("load_in_4bit");
        assert!(
            !BitsAndBytesConfig::from_json_value(&v)
                .unwrap()
                .load_in_4bit
        );
    }

    #[test]
    fn typed_errors() {
        let mut v = transformers_nf4();
        v["load_in_8bit"] = json!(true);
        let c = BitsAndBytesConfig::from_json_value(&v).unwrap();
        assert_eq!(c.validate(), Err(ConfigError::Both4bitAnd8bit));

        let mut c = BitsAndBytesConfig::new_4bit(QuantType::Fp4, false, "float32");
        c.bnb_4bit_quant_type = "int4".into();
        let err = c.validate().unwrap_err();
        assert_eq!(
            err,
            ConfigError::InvalidValue {
                field: "bnb_4bit_quant_type",
                value: "\"int4\"".into(),
                expected: "\"nf4\" or \"fp4\""
            }
        );
        assert!(err.to_string().contains("bnb_4bit_quant_type = \"int4\""));
        assert!(c.quant_type().is_err());

        let mut c = BitsAndBytesConfig::new_4bit(QuantType::Nf4, false, "float64");
        assert!(matches!(
            c.validate(),
            Err(ConfigError::InvalidValue { field: "bnb_4bit_compute_dtype", ref value, .. })
                if value == "\"float64\""
        ));
        c.bnb_4bit_compute_dtype = "float16".into();
        c.bnb_4bit_quant_storage = "int4".into();
        assert!(matches!(
            c.validate(),
            Err(ConfigError::InvalidValue {
                field: "bnb_4bit_quant_storage",
                ..
            })
        ));

        let mut v = transformers_nf4();
        v["bnb_4bit_use_double_quant"] = json!("yes");
        let err = BitsAndBytesConfig::from_json_value(&v).unwrap_err();
        assert!(
            matches!(&err, ConfigError::WrongType { field, .. } if field == "bnb_4bit_use_double_quant")
        );
        let err = serde_json::from_value::<BitsAndBytesConfig>(v).unwrap_err();
        assert!(err.to_string().contains("bnb_4bit_use_double_quant"));
        assert!(BitsAndBytesConfig::from_json_value(&json!([1])).is_err());
        let v = json!({"llm_int8_skip_modules": ["lm_head", 3]});
        assert!(matches!(
            BitsAndBytesConfig::from_json_value(&v),
            Err(ConfigError::WrongType { field, .. }) if field == "llm_int8_skip_modules"
        ));
    }

    #[test]
    fn model_config_lookup() {
        let cfg = json!({"model_type": "llama", "quantization_config": transformers_nf4()});
        assert!(BitsAndBytesConfig::from_model_config(&cfg)
            .unwrap()
            .is_some());
        let other = json!({"quantization_config": {"quant_method": "gptq", "bits": 4}});
        assert_eq!(BitsAndBytesConfig::from_model_config(&other), Ok(None));
        assert_eq!(BitsAndBytesConfig::from_model_config(&json!({})), Ok(None));
    }
}
