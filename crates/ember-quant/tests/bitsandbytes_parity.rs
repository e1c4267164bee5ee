//! Bit-for-bit parity with bitsandbytes 0.50 on the CPU, against the fixtures of
//! `tests/fixtures/quant` (made by `make_quant_fixtures.py`; `blockwise-cases.json` indexes them).
//!
//! Quantized bytes, absmax, nested absmax, offset, codes, SCB, outlier columns and dequantized
//! values must be identical bits. Two documented exceptions:
//!
//! - FP4 nibble 8 dequantizes to `-0.0` in bitsandbytes' scalar C kernel and to `+0.0` in its
//!   other kernels (and here), so FP4 dequantized zeros compare by value.
//! - bitsandbytes' AVX-512 `dequantize_4bit` kernel reads the wrong absmax when the last
//!   dimension is a multiple of 16 but not of the blocksize; for those cases (marked
//!   `bnb_dequant_is_flat: false`) we match the flat-block result of its torch kernel
//!   (`dequant_flat`) and check that the AVX-512 output indeed differs.
//!
//! Products go through BLAS in bitsandbytes, so they are compared with a tolerance, except the
//! integer LLM.int8 product without outliers, which is exact.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ember_quant::{
    create_dynamic_map, dequantize_4bit, dequantize_blockwise, dynamic_map, int8_linear,
    int8_linear_dequantized, int8_vectorwise_dequant, int8_vectorwise_quant, linear_4bit,
    quantize_4bit, quantize_blockwise, Absmax, Blockwise8bit, Int8Weight, QuantType,
};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

fn dir() -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/quant"
    ))
    .to_path_buf()
}

struct Fixtures {
    index: Value,
    tensors: HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>,
}

impl Fixtures {
    fn load() -> Self {
        let index: Value = serde_json::from_slice(
            &std::fs::read(dir().join("blockwise-cases.json")).expect("read json"),
        )
        .expect("parse json");
        let mut tensors = HashMap::new();
        for file in ["blockwise.safetensors", "int8.safetensors"] {
            let bytes = std::fs::read(dir().join(file)).expect("read safetensors");
            let st = SafeTensors::deserialize(&bytes).expect("parse safetensors");
            for (name, view) in st.tensors() {
                tensors.insert(
                    name,
                    (view.dtype(), view.shape().to_vec(), view.data().to_vec()),
                );
            }
        }
        Fixtures { index, tensors }
    }

    fn raw(&self, key: &str, dtype: Dtype) -> &(Dtype, Vec<usize>, Vec<u8>) {
        let t = self
            .tensors
            .get(key)
            .unwrap_or_else(|| panic!("missing tensor {key}"));
        assert_eq!(t.0, dtype, "{key}");
        t
    }

    fn f32(&self, key: &str) -> Vec<f32> {
        let (_, _, data) = self.raw(key, Dtype::F32);
        data.chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    fn u8(&self, key: &str) -> Vec<u8> {
        self.raw(key, Dtype::U8).2.clone()
    }

    fn i8(&self, key: &str) -> Vec<i8> {
        self.raw(key, Dtype::I8)
            .2
            .iter()
            .map(|&b| b as i8)
            .collect()
    }

    fn i64(&self, key: &str) -> Vec<i64> {
        let (_, _, data) = self.raw(key, Dtype::I64);
        data.chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    fn shape(&self, key: &str) -> Vec<usize> {
        self.tensors[key].1.clone()
    }

    fn cases(&self, group: &str) -> &Vec<Value> {
        self.index[group]
            .as_array()
            .unwrap_or_else(|| panic!("no group {group}"))
    }
}

fn key<'a>(case: &'a Value, name: &str) -> &'a str {
    case["keys"][name]
        .as_str()
        .unwrap_or_else(|| panic!("{}: no key {name}", case["name"]))
}

fn usize_of(case: &Value, field: &str) -> usize {
    case[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{}: no {field}", case["name"])) as usize
}

/// Identical bits, with the position of the first difference on failure.
fn assert_bits(what: &str, ours: &[f32], theirs: &[f32]) {
    assert_eq!(ours.len(), theirs.len(), "{what}: length");
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        assert_eq!(
            a.to_bits(),
            b.to_bits(),
            "{what}[{i}]: ours {a:e} ({:#010x}), bitsandbytes {b:e} ({:#010x})",
            a.to_bits(),
            b.to_bits()
        );
    }
}

/// Identical bits, except that `+0.0` and `-0.0` are equal (FP4 nibble 8, see the module docs).
fn assert_bits_signless_zero(what: &str, ours: &[f32], theirs: &[f32]) {
    assert_eq!(ours.len(), theirs.len(), "{what}: length");
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        let same = a.to_bits() == b.to_bits() || (*a == 0.0 && *b == 0.0);
        assert!(
            same,
            "{what}[{i}]: ours {a:e} ({:#010x}), bitsandbytes {b:e} ({:#010x})",
            a.to_bits(),
            b.to_bits()
        );
    }
}

/// `|ours - theirs| <= rtol * scale` per output, `scale` being the output row's largest
/// magnitude (at least 1): BLAS and our float64 dot differ in rounding, not in value.
fn assert_close(what: &str, ours: &[f32], theirs: &[f32], cols: usize, rtol: f32) -> f32 {
    assert_eq!(ours.len(), theirs.len(), "{what}: length");
    let mut worst = 0.0f32;
    for (r, (a_row, b_row)) in ours.chunks(cols).zip(theirs.chunks(cols)).enumerate() {
        let scale = b_row.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        for (c, (a, b)) in a_row.iter().zip(b_row).enumerate() {
            let err = (a - b).abs() / scale;
            worst = worst.max(err);
            assert!(
                err <= rtol,
                "{what}[{r}, {c}]: ours {a}, bitsandbytes {b} (error {err:e} of {scale})"
            );
        }
    }
    worst
}

#[test]
fn codes_match() {
    let fx = Fixtures::load();
    for case in fx.cases("dynamic_maps") {
        let signed = case["signed"].as_bool().unwrap();
        let max_exp = case["max_exponent_bits"].as_u64().unwrap() as u32;
        let total = case["total_bits"].as_u64().unwrap() as u32;
        let ours = create_dynamic_map(signed, max_exp, total).unwrap();
        assert_bits(
            case["key"].as_str().unwrap(),
            &ours,
            &fx.f32(case["key"].as_str().unwrap()),
        );
    }
    // The torch quantize_4bit kernel's bucket order and midpoints.
    let order: Vec<u8> = fx.i64("fp4_order").iter().map(|&i| i as u8).collect();
    assert_eq!(order, ember_quant::code::FP4_ASCENDING);
    for (name, code) in [
        ("nf4", &ember_quant::NF4_CODE),
        ("fp4", &ember_quant::FP4_CODE),
    ] {
        let asc: Vec<f32> = if name == "nf4" {
            code.to_vec()
        } else {
            order.iter().map(|&i| code[i as usize]).collect()
        };
        let mids: Vec<f32> = asc.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        assert_bits(name, &mids, &fx.f32(&format!("{name}_bounds")));
    }
}

#[test]
fn blockwise_4bit_matches() {
    let fx = Fixtures::load();
    let mut flat_only = 0;
    for case in fx.cases("blockwise_4bit") {
        let name = case["name"].as_str().unwrap();
        let input = fx.f32(case["input"].as_str().unwrap());
        let shape: Vec<usize> = case["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        let blocksize = usize_of(case, "blocksize");
        let quant_type: QuantType = case["quant_type"].as_str().unwrap().parse().unwrap();
        let dq = case["compress_statistics"].as_bool().unwrap();

        let q = quantize_4bit(&input, &shape, blocksize, quant_type, dq).unwrap();
        assert_eq!(q.packed, fx.u8(key(case, "packed")), "{name}: packed");
        assert_bits(
            &format!("{name}: quant_map"),
            &q.state.code,
            &fx.f32(key(case, "quant_map")),
        );
        match &q.state.absmax {
            Absmax::Plain(absmax) => {
                assert!(!dq, "{name}");
                assert_bits(
                    &format!("{name}: absmax"),
                    absmax,
                    &fx.f32(key(case, "absmax")),
                );
            }
            Absmax::Nested(nested) => {
                assert!(dq, "{name}");
                assert_bits(
                    &format!("{name}: offset"),
                    &[nested.offset],
                    &fx.f32(key(case, "offset")),
                );
                assert_eq!(
                    nested.codes,
                    fx.u8(key(case, "absmax_codes")),
                    "{name}: absmax codes"
                );
                assert_bits(
                    &format!("{name}: nested_absmax"),
                    &nested.nested_absmax,
                    &fx.f32(key(case, "nested_absmax")),
                );
                assert_bits(
                    &format!("{name}: nested_code"),
                    &nested.nested_code[..],
                    &fx.f32(key(case, "nested_code")),
                );
                assert_eq!(nested.nested_blocksize, usize_of(case, "nested_blocksize"));
                assert_bits(
                    &format!("{name}: absmax_dequant"),
                    &q.absmax_f32().unwrap(),
                    &fx.f32(key(case, "absmax_dequant")),
                );
            }
        }

        let ours = dequantize_4bit(&q).unwrap();
        let compare = match quant_type {
            QuantType::Nf4 => assert_bits,
            QuantType::Fp4 => assert_bits_signless_zero,
        };
        let bnb = fx.f32(key(case, "dequant"));
        if case["bnb_dequant_is_flat"].as_bool().unwrap() {
            compare(&format!("{name}: dequant"), &ours, &bnb);
        } else {
            // bitsandbytes' AVX-512 kernel bug: we match its flat (torch) kernel instead.
            flat_only += 1;
            compare(
                &format!("{name}: dequant_flat"),
                &ours,
                &fx.f32(key(case, "dequant_flat")),
            );
            assert!(
                ours.iter().zip(&bnb).any(|(a, b)| a != b),
                "{name}: bitsandbytes now agrees; drop the exception"
            );
        }
    }
    assert!(
        flat_only > 0,
        "the fixtures no longer show the AVX-512 absmax indexing; update the docs"
    );
}

#[test]
fn blockwise_8bit_matches() {
    let fx = Fixtures::load();
    for case in fx.cases("blockwise_8bit") {
        let name = case["name"].as_str().unwrap();
        let input = fx.f32(case["input"].as_str().unwrap());
        let blocksize = usize_of(case, "blocksize");
        let code = fx.f32(key(case, "code"));
        assert_bits(&format!("{name}: code"), dynamic_map(), &code);

        let q = quantize_blockwise(&input, dynamic_map(), blocksize).unwrap();
        assert_eq!(q.codes, fx.u8(key(case, "codes")), "{name}: codes");
        assert_bits(
            &format!("{name}: absmax"),
            &q.absmax,
            &fx.f32(key(case, "absmax")),
        );
        let ours = dequantize_blockwise(&q).unwrap();
        assert_bits(
            &format!("{name}: dequant"),
            &ours,
            &fx.f32(key(case, "dequant")),
        );

        // Dequantizing bitsandbytes' own bytes gives the same values.
        let theirs = Blockwise8bit {
            codes: fx.u8(key(case, "codes")),
            absmax: fx.f32(key(case, "absmax")),
            code: Box::new(*dynamic_map()),
            blocksize,
        };
        assert_bits(
            &format!("{name}: dequant of bnb bytes"),
            &dequantize_blockwise(&theirs).unwrap(),
            &ours,
        );
    }
}

#[test]
fn int8_vectorwise_matches() {
    let fx = Fixtures::load();
    for case in fx.cases("int8_vectorwise") {
        let name = case["name"].as_str().unwrap();
        let (rows, cols) = (usize_of(case, "rows"), usize_of(case, "cols"));
        let threshold = case["threshold"].as_f64().unwrap() as f32;
        let input = fx.f32(key(case, "input"));
        let q = int8_vectorwise_quant(rows, cols, &input, threshold).unwrap();
        assert_eq!(q.codes, fx.i8(key(case, "codes")), "{name}: codes");
        assert_bits(&format!("{name}: SCB"), &q.scb, &fx.f32(key(case, "scb")));
        let expected_cols: Vec<usize> = match case["keys"].get("outlier_cols") {
            Some(k) => fx
                .i64(k.as_str().unwrap())
                .iter()
                .map(|&c| c as usize)
                .collect(),
            None => Vec::new(),
        };
        assert_eq!(q.outlier_cols, expected_cols, "{name}: outlier columns");
        let deq = int8_vectorwise_dequant(rows, cols, &q.codes, &q.scb).unwrap();
        assert_bits(
            &format!("{name}: dequant"),
            &deq,
            &fx.f32(key(case, "dequant")),
        );
    }
}

#[test]
fn linear8bitlt_matches() {
    let fx = Fixtures::load();
    for case in fx.cases("linear8bit") {
        let name = case["name"].as_str().unwrap();
        let (n_in, n_out, rows) = (
            usize_of(case, "in_features"),
            usize_of(case, "out_features"),
            usize_of(case, "batch"),
        );
        let threshold = case["threshold"].as_f64().unwrap() as f32;
        let weight = Int8Weight::quantize(n_out, n_in, &fx.f32(key(case, "weight"))).unwrap();
        assert_eq!(weight.codes, fx.i8(key(case, "cb")), "{name}: CB");
        assert_bits(
            &format!("{name}: SCB"),
            &weight.scb,
            &fx.f32(key(case, "scb")),
        );
        assert_eq!(fx.shape(key(case, "cb")), vec![n_out, n_in]);

        let x = fx.f32(key(case, "x"));
        let bias = fx.f32(key(case, "bias"));
        let eval = int8_linear(&x, rows, &weight, Some(&bias), threshold).unwrap();
        let bnb_eval = fx.f32(key(case, "output_eval"));
        // Does the float16 input have outliers? Then part of the product went through BLAS.
        let has_outliers = threshold > 0.0 && x.iter().any(|v| half_abs(*v) >= threshold);
        if has_outliers {
            let worst = assert_close(&format!("{name}: eval"), &eval, &bnb_eval, n_out, 1e-6);
            eprintln!("{name}: eval worst error {worst:e} of the row scale");
        } else {
            assert_bits(&format!("{name}: eval"), &eval, &bnb_eval);
        }
        let train = int8_linear_dequantized(&x, rows, &weight, Some(&bias)).unwrap();
        let worst = assert_close(
            &format!("{name}: train"),
            &train,
            &fx.f32(key(case, "output_train")),
            n_out,
            1e-6,
        );
        eprintln!("{name}: train worst error {worst:e} of the row scale");
    }
}

/// `|v|` after the float16 rounding Linear8bitLt applies before comparing with the threshold.
fn half_abs(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32().abs()
}

#[test]
fn linear4bit_matches() {
    let fx = Fixtures::load();
    for case in fx.cases("linear4bit") {
        let name = case["name"].as_str().unwrap();
        let (n_in, n_out, rows) = (
            usize_of(case, "in_features"),
            usize_of(case, "out_features"),
            usize_of(case, "batch"),
        );
        let quant_type: QuantType = case["quant_type"].as_str().unwrap().parse().unwrap();
        let dq = case["compress_statistics"].as_bool().unwrap();
        let q = quantize_4bit(
            &fx.f32(key(case, "weight")),
            &[n_out, n_in],
            usize_of(case, "blocksize"),
            quant_type,
            dq,
        )
        .unwrap();
        assert_eq!(q.packed, fx.u8(key(case, "packed")), "{name}: packed");
        match &q.state.absmax {
            Absmax::Plain(a) => {
                assert_bits(&format!("{name}: absmax"), a, &fx.f32(key(case, "absmax")))
            }
            Absmax::Nested(n) => {
                assert_eq!(
                    n.codes,
                    fx.u8(key(case, "absmax_codes")),
                    "{name}: absmax codes"
                );
                assert_bits(
                    &format!("{name}: nested_absmax"),
                    &n.nested_absmax,
                    &fx.f32(key(case, "nested_absmax")),
                );
                assert_bits(
                    &format!("{name}: offset"),
                    &[n.offset],
                    &fx.f32(key(case, "offset")),
                );
            }
        }
        let x = fx.f32(key(case, "x"));
        let bias = fx.f32(key(case, "bias"));
        let y = linear_4bit(&x, rows, &q, Some(&bias)).unwrap();
        let worst = assert_close(
            &format!("{name}: train"),
            &y,
            &fx.f32(key(case, "output")),
            n_out,
            1e-6,
        );
        eprintln!("{name}: worst error {worst:e} of the row scale");
        // Inference mode runs bitsandbytes' bfloat16 CPU kernel: only bfloat16-close.
        if let Some(k) = case["keys"].get("output_eval") {
            let worst = assert_close(
                &format!("{name}: eval (bf16)"),
                &y,
                &fx.f32(k.as_str().unwrap()),
                n_out,
                2e-2,
            );
            eprintln!("{name}: bf16 eval worst error {worst:e} of the row scale");
        }
    }
}
