//! `Features`: the column types of a dataset, as `datasets` writes them in
//! `dataset_info.json` (`Value`, `ClassLabel`, `List` / `Sequence`).

use crate::error::{DatasetError, Result};
use arrow::datatypes::{DataType, Field};
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// The type of one column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Feature {
    /// A scalar: `Value(dtype)` with HF's dtype names (`int64`, `string`, `large_string`, ...).
    Value(String),
    /// Integer class ids with names: `ClassLabel(names=[...])`.
    ClassLabel(Vec<String>),
    /// A list of a feature: `List(feature)` (written `Sequence` by older `datasets`).
    List(Box<Feature>),
}

impl Feature {
    /// The feature of an Arrow type (what `datasets` infers).
    pub fn from_arrow(dt: &DataType) -> Feature {
        match dt {
            DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => {
                Feature::List(Box::new(Feature::from_arrow(f.data_type())))
            }
            other => Feature::Value(dtype_name(other)),
        }
    }

    /// The Arrow type that stores this feature.
    pub fn arrow_type(&self) -> Result<DataType> {
        Ok(match self {
            Feature::ClassLabel(_) => DataType::Int64,
            Feature::List(inner) => {
                DataType::List(Arc::new(Field::new("item", inner.arrow_type()?, true)))
            }
            Feature::Value(name) => match name.as_str() {
                "bool" => DataType::Boolean,
                "int8" => DataType::Int8,
                "int16" => DataType::Int16,
                "int32" => DataType::Int32,
                "int64" => DataType::Int64,
                "uint8" => DataType::UInt8,
                "uint16" => DataType::UInt16,
                "uint32" => DataType::UInt32,
                "uint64" => DataType::UInt64,
                "float16" => DataType::Float16,
                "float32" => DataType::Float32,
                "float64" => DataType::Float64,
                "string" => DataType::Utf8,
                "large_string" => DataType::LargeUtf8,
                "null" => DataType::Null,
                other => {
                    return Err(DatasetError::Shape(format!(
                        "unsupported Value dtype `{other}`"
                    )))
                }
            },
        })
    }

    /// The JSON `datasets` writes for this feature.
    pub fn to_json(&self) -> Value {
        match self {
            Feature::Value(d) => json!({"dtype": d, "_type": "Value"}),
            Feature::ClassLabel(names) => json!({"names": names, "_type": "ClassLabel"}),
            Feature::List(inner) => json!({"feature": inner.to_json(), "_type": "List"}),
        }
    }

    /// Reads a feature from `datasets` JSON; `context` names the file and column in errors.
    pub fn from_json(v: &Value, context: &str) -> Result<Feature> {
        let bad = |m: &str| DatasetError::Shape(format!("{context}: {m}"));
        match v.get("_type").and_then(Value::as_str) {
            Some("Value") => Ok(Feature::Value(
                v["dtype"]
                    .as_str()
                    .ok_or_else(|| bad("Value without dtype"))?
                    .to_owned(),
            )),
            Some("ClassLabel") => {
                let names = v["names"]
                    .as_array()
                    .ok_or_else(|| bad("ClassLabel without names"))?;
                Ok(Feature::ClassLabel(
                    names
                        .iter()
                        .map(|n| n.as_str().unwrap_or_default().to_owned())
                        .collect(),
                ))
            }
            Some("List") | Some("Sequence") | Some("LargeList") => Ok(Feature::List(Box::new(
                Feature::from_json(&v["feature"], context)?,
            ))),
            Some(other) => Err(bad(&format!("unsupported feature type `{other}`"))),
            None => Err(bad("feature without `_type`")),
        }
    }
}

/// HF's dtype name of an Arrow type.
fn dtype_name(dt: &DataType) -> String {
    match dt {
        DataType::Boolean => "bool",
        DataType::Int8 => "int8",
        DataType::Int16 => "int16",
        DataType::Int32 => "int32",
        DataType::Int64 => "int64",
        DataType::UInt8 => "uint8",
        DataType::UInt16 => "uint16",
        DataType::UInt32 => "uint32",
        DataType::UInt64 => "uint64",
        DataType::Float16 => "float16",
        DataType::Float32 => "float32",
        DataType::Float64 => "float64",
        DataType::Utf8 | DataType::Utf8View => "string",
        DataType::LargeUtf8 => "large_string",
        DataType::Null => "null",
        other => return other.to_string().to_lowercase(),
    }
    .to_owned()
}

/// The features of every column, in column order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Features(pub Vec<(String, Feature)>);

impl Features {
    /// The feature of a column.
    pub fn get(&self, name: &str) -> Option<&Feature> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, f)| f)
    }

    /// The `features` object of `dataset_info.json`.
    pub fn to_json(&self) -> Value {
        Value::Object(
            self.0
                .iter()
                .map(|(n, f)| (n.clone(), f.to_json()))
                .collect::<Map<_, _>>(),
        )
    }

    /// Reads the `features` object of `dataset_info.json`.
    pub fn from_json(v: &Value, context: &str) -> Result<Features> {
        let map = v
            .as_object()
            .ok_or_else(|| DatasetError::Shape(format!("{context}: features is not an object")))?;
        map.iter()
            .map(|(n, f)| {
                Ok((
                    n.clone(),
                    Feature::from_json(f, &format!("{context}: column `{n}`"))?,
                ))
            })
            .collect::<Result<Vec<_>>>()
            .map(Features)
    }
}
