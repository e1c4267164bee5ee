//! Quantized checkpoints as transformers + bitsandbytes save them, read and written bit for bit,
//! against the fixtures of `tests/fixtures/quant` made by `make_checkpoint_fixtures.py`:
//!
//! - `tiny-llama/`: a tiny float32 Llama; `tiny-llama-{nf4,fp4,int8}/`: the same loaded with a
//!   `BitsAndBytesConfig` and saved with `save_pretrained`.
//! - `checkpoints.json`: per folder the quantized layers with the FNV-1a 64 digest of
//!   bitsandbytes' dequantized float32 weight, `get_memory_footprint()` and the logits kernel;
//!   `expected.safetensors`: two dequantized layers in full and the logits.
//!
//! Every quantized layer loads with our loader and dequantizes to bitsandbytes' bits; writing it
//! back gives Python's tensors (names, dtypes, shapes, bytes, and the quant_state JSON byte for
//! byte); quantizing the float32 weights gives Python's bytes, so that a whole `model.safetensors`
//! rebuilt from the float32 model is byte-identical to transformers' file. (bitsandbytes'
//! AVX-512 `dequantize_4bit` bug of `bitsandbytes_parity.rs` needs a last dimension that is a
//! multiple of 16 but not of the blocksize; these layers have 64 or 128 columns and blocksize 64,
//! so the fixture records `bnb_dequant_is_flat: true` and the comparison is exact everywhere.)
//!
//! Set `EMBER_CHECKPOINT_OUT=DIR` to also write the Rust-made folders to `DIR/tiny-llama-*` for
//! `tests/fixtures/quant/check_ember_checkpoint.py`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use ember_quant::serialize::{quant_state_key, QuantStateJson};
use ember_quant::{
    dequantize_4bit, int8_vectorwise_dequant, load_4bit, load_8bit, load_quantized, quantize_4bit,
    quantized_layout, safetensors_lookup, saved_lookup, state_dict_4bit, state_dict_8bit,
    BitsAndBytesConfig, CheckpointError, Int8Weight, QuantType, QuantizedKind, QuantizedWeight,
    SavedDtype, SavedTensor,
};
use safetensors::SafeTensors;
use serde_json::Value;

const VARIANTS: [&str; 3] = ["nf4", "fp4", "int8"];

fn dir() -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/quant"
    ))
    .to_path_buf()
}

fn read(path: impl AsRef<Path>) -> Vec<u8> {
    let path = dir().join(path);
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn read_json(path: impl AsRef<Path>) -> Value {
    serde_json::from_slice(&read(path)).expect("parse json")
}

fn summary() -> Value {
    read_json("checkpoints.json")
}

fn variant(summary: &Value, name: &str) -> Value {
    summary["variants"][name].clone()
}

fn f32s(data: &[u8]) -> Vec<f32> {
    data.chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// FNV-1a 64 of the float32 little-endian bytes, as `make_checkpoint_fixtures.py` computes it.
fn fnv1a64(values: &[f32]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in values.iter().flat_map(|v| v.to_le_bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Identical bits, with the position of the first difference on failure.
fn assert_bits(what: &str, ours: &[f32], theirs: &[f32]) {
    assert_eq!(ours.len(), theirs.len(), "{what}: length");
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        assert_eq!(
            a.to_bits(),
            b.to_bits(),
            "{what}[{i}]: ours {a:e}, bitsandbytes {b:e}"
        );
    }
}

/// Our state dict of a layer equals Python's tensors: same key set under the layer, same dtypes,
/// shapes and bytes; the quant_state JSON also as a JSON value.
fn assert_same_tensors(st: &SafeTensors<'_>, ours: &[(String, SavedTensor)], layer: &str) {
    let module = layer.strip_suffix("weight").expect("a weight name");
    let theirs: BTreeSet<String> = st
        .names()
        .into_iter()
        .filter(|n| {
            *n == layer
                || n.starts_with(&format!("{layer}."))
                || *n == format!("{module}SCB")
                || *n == format!("{module}weight_format")
        })
        .map(str::to_owned)
        .collect();
    let our_names: BTreeSet<String> = ours.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(our_names, theirs, "{layer}: tensor names");
    for (name, t) in ours {
        let view = st.tensor(name).unwrap();
        assert_eq!(t.dtype, view.dtype(), "{name}: dtype");
        assert_eq!(t.shape, view.shape(), "{name}: shape");
        if name.contains(".quant_state.") {
            let a: Value = serde_json::from_slice(&t.bytes).expect("our JSON");
            let b: Value = serde_json::from_slice(view.data()).expect("their JSON");
            assert_eq!(a, b, "{name}: JSON value");
        }
        assert!(
            t.bytes == view.data(),
            "{name}: bytes differ{}",
            if name.contains(".quant_state.") {
                format!(
                    ": ours {:?}, theirs {:?}",
                    String::from_utf8_lossy(&t.bytes),
                    String::from_utf8_lossy(view.data())
                )
            } else {
                String::new()
            }
        );
    }
}

fn layers(v: &Value) -> &Vec<Value> {
    v["layers"].as_array().expect("layers")
}

#[test]
fn layouts_list_the_quantized_weights() {
    let s = summary();
    for name in VARIANTS {
        let v = variant(&s, name);
        let bytes = read(format!("tiny-llama-{name}/model.safetensors"));
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let layout = quantized_layout(st.names()).unwrap();
        let expected: BTreeSet<&str> = layers(&v)
            .iter()
            .map(|l| l["name"].as_str().unwrap())
            .collect();
        let ours: BTreeSet<&str> = layout.weights.keys().map(String::as_str).collect();
        assert_eq!(ours, expected, "{name}");
        let kind = match name {
            "nf4" => QuantizedKind::Bnb4bit(QuantType::Nf4),
            "fp4" => QuantizedKind::Bnb4bit(QuantType::Fp4),
            _ => QuantizedKind::Bnb8bit,
        };
        assert!(layout.weights.values().all(|k| *k == kind), "{name}");
        // What is left are the plain parameters: embeddings, norms and the unquantized lm_head.
        let plain: BTreeSet<&str> = st
            .names()
            .into_iter()
            .filter(|n| layout.is_plain(n))
            .collect();
        assert!(plain.contains("lm_head.weight") && plain.contains("model.embed_tokens.weight"));
        assert!(plain
            .iter()
            .all(|n| n.ends_with("norm.weight") || !n.starts_with("model.layers.")));
        assert_eq!(
            plain.len() + layout.weights.len() + layout.companions.len(),
            st.len(),
            "{name}: every tensor is plain, quantized or a companion"
        );

        // transformers' get_memory_footprint counts the parameters (the packed / int8 weights,
        // not their absmax, quant maps or SCB) plus the non-persistent rotary buffers, which are
        // not in any file: the same offset as for the float32 model.
        let plain_bytes: usize = st
            .iter()
            .filter(|(n, _)| !layout.companions.contains(*n))
            .map(|(_, t)| t.data().len())
            .sum();
        let base_bytes = read("tiny-llama/model.safetensors");
        let base = SafeTensors::deserialize(&base_bytes).unwrap();
        let base_total: usize = base.iter().map(|(_, t)| t.data().len()).sum();
        let buffers = s["base"]["memory_footprint"].as_u64().unwrap() as usize - base_total;
        assert_eq!(
            plain_bytes + buffers,
            v["memory_footprint"].as_u64().unwrap() as usize,
            "{name}: memory footprint"
        );
    }
}

#[test]
fn quantized_layers_load_dequantize_and_write_back() {
    let s = summary();
    let expected_bytes = read("expected.safetensors");
    let expected = SafeTensors::deserialize(&expected_bytes).unwrap();
    for name in VARIANTS {
        let v = variant(&s, name);
        let bytes = read(format!("tiny-llama-{name}/model.safetensors"));
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let layout = quantized_layout(st.names()).unwrap();
        let mut full = 0;
        for layer in layers(&v) {
            let lname = layer["name"].as_str().unwrap();
            let shape: Vec<usize> = layer["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            let kind = layout.kind(lname).unwrap();
            let (deq, ours) = match load_quantized(lname, kind, safetensors_lookup(&st)).unwrap() {
                QuantizedWeight::FourBit(packed) => {
                    assert_eq!(packed.state.shape, shape, "{lname}");
                    assert_eq!(
                        packed.state.blocksize,
                        layer["blocksize"].as_u64().unwrap() as usize
                    );
                    assert_eq!(
                        matches!(packed.state.absmax, ember_quant::Absmax::Nested(_)),
                        name == "nf4",
                        "{lname}: double quantization"
                    );
                    // See the module docs: no AVX-512 absmax indexing issue for these shapes.
                    assert!(layer["bnb_dequant_is_flat"].as_bool().unwrap(), "{lname}");
                    (
                        dequantize_4bit(&packed).unwrap(),
                        state_dict_4bit(lname, &packed).unwrap(),
                    )
                }
                QuantizedWeight::EightBit(w) => {
                    assert_eq!(vec![w.out_features, w.in_features], shape, "{lname}");
                    (
                        int8_vectorwise_dequant(w.out_features, w.in_features, &w.codes, &w.scb)
                            .unwrap(),
                        state_dict_8bit(lname, &w).unwrap(),
                    )
                }
            };
            assert_eq!(
                fnv1a64(&deq),
                layer["digest"].as_str().unwrap(),
                "{name} {lname}: dequantized weight digest"
            );
            if let Some(key) = v["keys"]["dequant"].get(lname) {
                let t = expected.tensor(key.as_str().unwrap()).unwrap();
                assert_eq!(t.shape(), shape.as_slice());
                assert_bits(&format!("{name} {lname}"), &deq, &f32s(t.data()));
                full += 1;
            }
            assert_same_tensors(&st, &ours, lname);
        }
        assert_eq!(full, 2, "{name}: full dequantized layers checked");
        let logits = expected
            .tensor(v["keys"]["logits"].as_str().unwrap())
            .unwrap();
        assert_eq!(logits.shape(), [1, 8, 128]);
        assert!(f32s(logits.data()).iter().all(|x| x.is_finite()));
        let kernel = v["logits_kernel"].as_str().unwrap();
        assert!(
            [
                "bf16_avx512_cpu_4bit",
                "f32_dequantize_4bit",
                "int8_llm_int8_cpu"
            ]
            .contains(&kernel),
            "{name}: unknown logits kernel {kernel}"
        );
    }
}

/// Quantizes the float32 model like transformers does for each config and rebuilds the whole
/// `model.safetensors`: byte-identical to the file transformers saved.
#[test]
fn quantizing_the_f32_model_rebuilds_the_checkpoint() {
    let base_bytes = read("tiny-llama/model.safetensors");
    let base = SafeTensors::deserialize(&base_bytes).unwrap();
    let out_dir = std::env::var_os("EMBER_CHECKPOINT_OUT").map(PathBuf::from);
    for name in VARIANTS {
        let bytes = read(format!("tiny-llama-{name}/model.safetensors"));
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let layout = quantized_layout(st.names()).unwrap();
        let config_json = read_json(format!("tiny-llama-{name}/config.json"));
        let config = BitsAndBytesConfig::from_model_config(&config_json)
            .unwrap()
            .unwrap();

        let mut tensors: Vec<(String, SavedTensor)> = Vec::new();
        for (tname, view) in base.iter() {
            let values = f32s(view.data());
            let shape = view.shape().to_vec();
            let sd = match layout.kind(tname) {
                None => vec![(
                    tname.to_owned(),
                    SavedTensor {
                        dtype: view.dtype(),
                        shape,
                        bytes: view.data().to_vec(),
                    },
                )],
                Some(QuantizedKind::Bnb4bit(qt)) => {
                    assert_eq!(qt, config.quant_type().unwrap());
                    let q =
                        quantize_4bit(&values, &shape, 64, qt, config.bnb_4bit_use_double_quant)
                            .unwrap();
                    state_dict_4bit(tname, &q).unwrap()
                }
                Some(QuantizedKind::Bnb8bit) => {
                    let w = Int8Weight::quantize(shape[0], shape[1], &values).unwrap();
                    state_dict_8bit(tname, &w).unwrap()
                }
            };
            if layout.kind(tname).is_some() {
                assert_same_tensors(&st, &sd, tname);
            }
            tensors.extend(sd);
        }
        let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
        let ours =
            safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
                .unwrap();
        assert!(
            ours == bytes,
            "{name}: rebuilt model.safetensors differs from transformers'"
        );

        if let Some(out) = &out_dir {
            let folder = out.join(format!("tiny-llama-{name}"));
            std::fs::create_dir_all(&folder).unwrap();
            std::fs::write(folder.join("model.safetensors"), &ours).unwrap();
            let mut cfg = config_json.clone();
            cfg["quantization_config"] = config.to_json_value();
            std::fs::write(
                folder.join("config.json"),
                serde_json::to_string_pretty(&cfg).unwrap(),
            )
            .unwrap();
        }
    }
}

#[test]
fn quantization_configs_round_trip() {
    let s = summary();
    for name in VARIANTS {
        let config_json = read_json(format!("tiny-llama-{name}/config.json"));
        let original = &config_json["quantization_config"];
        let config: BitsAndBytesConfig = serde_json::from_value(original.clone()).unwrap();
        config.validate().unwrap();
        assert_eq!(&config.to_json_value(), original, "{name}");
        assert_eq!(&serde_json::to_value(&config).unwrap(), original, "{name}");
        assert!(config.extra.is_empty());
        let args = &variant(&s, name)["bnb_config"];
        let expected = match name {
            "int8" => BitsAndBytesConfig::new_8bit(),
            _ => BitsAndBytesConfig::new_4bit(
                args["bnb_4bit_quant_type"]
                    .as_str()
                    .unwrap()
                    .parse()
                    .unwrap(),
                args["bnb_4bit_use_double_quant"].as_bool().unwrap(),
                args["bnb_4bit_compute_dtype"].as_str().unwrap(),
            ),
        };
        assert_eq!(config, expected, "{name}");
        assert_eq!(
            config.quantization_method(),
            Some(if name == "int8" { "llm_int8" } else { name })
        );
    }
    let base = read_json("tiny-llama/config.json");
    assert_eq!(BitsAndBytesConfig::from_model_config(&base), Ok(None));
}

// ---------------------------------------------------------------------------------------------
// Bad inputs: typed errors naming the tensor.

const LAYER: &str = "model.layers.0.self_attn.k_proj.weight";
const MODULE8: &str = "model.layers.0.self_attn.k_proj.";

/// The tensors of one layer of a Python-saved folder, to corrupt.
fn layer_tensors(variant: &str) -> Vec<(String, SavedTensor)> {
    let bytes = read(format!("tiny-llama-{variant}/model.safetensors"));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.iter()
        .filter(|(n, _)| n.starts_with(MODULE8))
        .map(|(n, v)| {
            (
                n.to_owned(),
                SavedTensor {
                    dtype: v.dtype(),
                    shape: v.shape().to_vec(),
                    bytes: v.data().to_vec(),
                },
            )
        })
        .collect()
}

fn edit(tensors: &mut [(String, SavedTensor)], name: &str, f: impl FnOnce(&mut SavedTensor)) {
    let t = tensors
        .iter_mut()
        .find(|(n, _)| n == name)
        .map(|(_, t)| t)
        .unwrap_or_else(|| panic!("no {name}"));
    f(t);
}

fn remove(tensors: &mut Vec<(String, SavedTensor)>, name: &str) {
    let before = tensors.len();
    tensors.retain(|(n, _)| n != name);
    assert_eq!(tensors.len(), before - 1, "{name}");
}

fn load4(tensors: &[(String, SavedTensor)]) -> Result<ember_quant::Packed4bit, CheckpointError> {
    load_4bit(LAYER, saved_lookup(tensors))
}

fn set_json(tensors: &mut [(String, SavedTensor)], key: &str, json: &str) {
    edit(tensors, key, |t| {
        t.bytes = json.as_bytes().to_vec();
        t.shape = vec![t.bytes.len()];
    });
}

#[test]
fn corrupted_quant_state_json() {
    let qs = quant_state_key(LAYER, QuantType::Nf4);
    let good = layer_tensors("nf4");
    assert!(load4(&good).is_ok());
    let text =
        String::from_utf8(good.iter().find(|(n, _)| *n == qs).unwrap().1.bytes.clone()).unwrap();

    // Cut in the middle: not JSON.
    let mut t = good.clone();
    set_json(&mut t, &qs, &text[..text.len() / 2]);
    let err = load4(&t).unwrap_err();
    assert!(
        matches!(&err, CheckpointError::MalformedQuantState { tensor, field: None, .. } if *tensor == qs),
        "{err}"
    );
    assert!(err.to_string().contains(&qs), "{err}");

    // A field of the wrong type, a missing field, an unknown field, a wrong quant type.
    for (json, field) in [
        (
            text.replace("\"blocksize\": 64", "\"blocksize\": \"64\""),
            "blocksize",
        ),
        (text.replace("\"shape\": [32, 64], ", ""), "shape"),
        (
            text.replace("\"shape\": [32, 64]", "\"shape\": [32, -64]"),
            "shape",
        ),
        (
            text.replace("\"nested_offset\"", "\"nested_offsett\""),
            "nested_offsett",
        ),
        (
            text.replace("\"dtype\": \"float32\"", "\"dtype\": \"float8\""),
            "dtype",
        ),
        (
            text.replace("\"quant_type\": \"nf4\"", "\"quant_type\": \"fp4\""),
            "quant_type",
        ),
        (
            text.replace("\"quant_type\": \"nf4\"", "\"quant_type\": \"int4\""),
            "quant_type",
        ),
    ] {
        assert_ne!(json, text, "{field}: replacement did not apply");
        let mut t = good.clone();
        set_json(&mut t, &qs, &json);
        let err = load4(&t).unwrap_err();
        assert!(
            matches!(&err, CheckpointError::MalformedQuantState { tensor, field: Some(f), .. }
                if *tensor == qs && f == field),
            "{field}: {err}"
        );
        assert!(err.to_string().contains(field), "{err}");
    }
    // Nested fields without nested_offset, while nested_absmax is there.
    let mut t = good.clone();
    set_json(
        &mut t,
        &qs,
        "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [32, 64]}",
    );
    assert!(matches!(
        load4(&t),
        Err(CheckpointError::MalformedQuantState { field: Some(f), .. }) if f == "nested_offset"
    ));

    // Invalid blocksizes.
    for (from, to, field, bs) in [
        ("\"blocksize\": 64", "\"blocksize\": 48", "blocksize", 48),
        (
            "\"nested_blocksize\": 256",
            "\"nested_blocksize\": 0",
            "nested_blocksize",
            0,
        ),
    ] {
        let mut t = good.clone();
        set_json(&mut t, &qs, &text.replace(from, to));
        let err = load4(&t).unwrap_err();
        assert_eq!(
            err,
            CheckpointError::InvalidBlocksize {
                tensor: qs.clone(),
                field,
                blocksize: bs,
                expected: if bs == 0 {
                    "a positive number"
                } else {
                    "one of 32, 64, 128, 256, 512, 1024, 2048, 4096"
                },
            }
        );
    }
    // A larger valid blocksize makes the absmax too long.
    let mut t = good.clone();
    set_json(
        &mut t,
        &qs,
        &text.replace("\"blocksize\": 64", "\"blocksize\": 128"),
    );
    assert!(matches!(
        load4(&t),
        Err(CheckpointError::WrongLength { tensor, expected: 16, actual: 32, .. }) if tensor == format!("{LAYER}.absmax")
    ));

    // Our JSON of the loaded weight is Python's, byte for byte.
    let ours = QuantStateJson::of(&load4(&good).unwrap(), "float32");
    assert_eq!(ours.to_bytes(), text.as_bytes());
}

#[test]
fn truncated_and_mis_sized_tensors() {
    let good = layer_tensors("nf4");

    // A truncated packed weight.
    let mut t = good.clone();
    edit(&mut t, LAYER, |w| {
        w.bytes.truncate(1000);
        w.shape = vec![1000, 1];
    });
    let err = load4(&t).unwrap_err();
    assert!(
        matches!(&err, CheckpointError::WrongLength { tensor, expected: 1024, actual: 1000, unit: "bytes", .. } if tensor == LAYER),
        "{err}"
    );
    assert!(err.to_string().contains("truncated"), "{err}");

    // Data that does not match its own shape (a hand-made view).
    let mut t = good.clone();
    edit(&mut t, LAYER, |w| w.bytes.truncate(1000));
    assert!(matches!(
        load4(&t),
        Err(CheckpointError::WrongLength { tensor, expected: 1024, actual: 1000, unit: "bytes", .. }) if tensor == LAYER
    ));

    // An absmax with one block too few / a nested absmax too long.
    let absmax = format!("{LAYER}.absmax");
    let mut t = good.clone();
    edit(&mut t, &absmax, |a| {
        a.bytes.pop();
        a.shape = vec![31];
    });
    let err = load4(&t).unwrap_err();
    assert!(
        matches!(&err, CheckpointError::WrongLength { tensor, expected: 32, actual: 31, unit: "elements", .. } if *tensor == absmax),
        "{err}"
    );
    assert!(
        err.to_string().contains(&absmax) && err.to_string().contains("block of 64"),
        "{err}"
    );
    let nested = format!("{LAYER}.nested_absmax");
    let mut t = good.clone();
    edit(&mut t, &nested, |a| {
        a.bytes.extend([0; 4]);
        a.shape = vec![2];
    });
    assert!(matches!(
        load4(&t),
        Err(CheckpointError::WrongLength { tensor, expected: 1, actual: 2, .. }) if tensor == nested
    ));

    // Missing tensors, wrong dtypes.
    for missing in ["nested_quant_map", "nested_absmax", "quant_map", "absmax"] {
        let key = format!("{LAYER}.{missing}");
        let mut t = good.clone();
        remove(&mut t, &key);
        assert_eq!(
            load4(&t).unwrap_err(),
            CheckpointError::MissingTensor { tensor: key },
            "{missing}"
        );
    }
    let mut t = good.clone();
    remove(&mut t, LAYER);
    assert_eq!(
        load4(&t).unwrap_err(),
        CheckpointError::MissingTensor {
            tensor: LAYER.into()
        }
    );
    let mut t = good.clone();
    remove(&mut t, &quant_state_key(LAYER, QuantType::Nf4));
    assert!(
        matches!(load4(&t), Err(CheckpointError::MissingTensor { tensor }) if tensor.contains("quant_state.bitsandbytes__nf4"))
    );
    let mut t = good.clone();
    edit(&mut t, &absmax, |a| {
        a.dtype = SavedDtype::I8;
    });
    assert!(matches!(
        load4(&t),
        Err(CheckpointError::WrongDtype { tensor, actual: SavedDtype::I8, .. }) if tensor == absmax
    ));
    // The plain (fp4) absmax must be F32.
    let mut t = layer_tensors("fp4");
    assert!(load4(&t).is_ok());
    edit(&mut t, &absmax, |a| {
        a.dtype = SavedDtype::U8;
        a.bytes.truncate(32);
    });
    assert!(matches!(
        load4(&t),
        Err(CheckpointError::WrongDtype { tensor, actual: SavedDtype::U8, .. }) if tensor == absmax
    ));
}

#[test]
fn bad_int8_tensors() {
    let good = layer_tensors("int8");
    assert!(load_8bit(LAYER, saved_lookup(&good)).is_ok());
    let scb = format!("{MODULE8}SCB");

    let mut t = good.clone();
    edit(&mut t, &scb, |s| {
        s.bytes.truncate(31 * 4);
        s.shape = vec![31];
    });
    let err = load_8bit(LAYER, saved_lookup(&t)).unwrap_err();
    assert!(
        matches!(&err, CheckpointError::WrongLength { tensor, expected: 32, actual: 31, .. } if *tensor == scb),
        "{err}"
    );

    let mut t = good.clone();
    remove(&mut t, &scb);
    assert_eq!(
        load_8bit(LAYER, saved_lookup(&t)).unwrap_err(),
        CheckpointError::MissingTensor { tensor: scb }
    );

    let mut t = good.clone();
    edit(&mut t, LAYER, |w| w.dtype = SavedDtype::U8);
    assert!(matches!(
        load_8bit(LAYER, saved_lookup(&t)),
        Err(CheckpointError::WrongDtype { tensor, .. }) if tensor == LAYER
    ));

    let mut t = good.clone();
    edit(&mut t, LAYER, |w| w.shape = vec![32 * 64]);
    assert!(matches!(
        load_8bit(LAYER, saved_lookup(&t)),
        Err(CheckpointError::WrongShape { tensor, .. }) if tensor == LAYER
    ));

    let wf = format!("{MODULE8}weight_format");
    let mut t = good.clone();
    edit(&mut t, &wf, |f| f.bytes = vec![2]);
    assert_eq!(
        load_8bit(LAYER, saved_lookup(&t)).unwrap_err(),
        CheckpointError::UnsupportedWeightFormat {
            tensor: wf,
            value: 2
        }
    );
}

/// The dtypes Python stored, spelled out (the module docs' tables).
#[test]
fn stored_dtypes_and_shapes() {
    let expect = |variant: &str, rows: &[(&str, SavedDtype, &[usize])]| {
        let t: BTreeMap<String, SavedTensor> = layer_tensors(variant).into_iter().collect();
        assert_eq!(t.len(), rows.len(), "{variant}: {:?}", t.keys());
        for (suffix, dtype, shape) in rows {
            let name = format!("{MODULE8}{suffix}");
            let tensor = &t[&name];
            assert_eq!(
                (tensor.dtype, tensor.shape.as_slice()),
                (*dtype, *shape),
                "{name}"
            );
        }
    };
    let nf4_json = layer_tensors("nf4")
        .into_iter()
        .find(|(n, _)| n.ends_with("bitsandbytes__nf4"))
        .unwrap()
        .1
        .bytes
        .len();
    expect(
        "nf4",
        &[
            ("weight", SavedDtype::U8, &[1024, 1]),
            ("weight.absmax", SavedDtype::U8, &[32]),
            ("weight.quant_map", SavedDtype::F32, &[16]),
            ("weight.nested_absmax", SavedDtype::F32, &[1]),
            ("weight.nested_quant_map", SavedDtype::F32, &[256]),
            (
                "weight.quant_state.bitsandbytes__nf4",
                SavedDtype::U8,
                &[nf4_json],
            ),
        ],
    );
    expect(
        "fp4",
        &[
            ("weight", SavedDtype::U8, &[1024, 1]),
            ("weight.absmax", SavedDtype::F32, &[32]),
            ("weight.quant_map", SavedDtype::F32, &[16]),
            (
                "weight.quant_state.bitsandbytes__fp4",
                SavedDtype::U8,
                &[77],
            ),
        ],
    );
    expect(
        "int8",
        &[
            ("weight", SavedDtype::I8, &[32, 64]),
            ("SCB", SavedDtype::F32, &[32]),
            ("weight_format", SavedDtype::U8, &[]),
        ],
    );
}
