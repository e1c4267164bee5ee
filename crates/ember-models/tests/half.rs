//! Half-precision models (bfloat16 / float16) against PyTorch in the same dtype (fixtures made by
//! `tests/fixtures/half/make_half_fixtures.py` with the pinned transformers 5.24 / torch 2.15).
//!
//! Ember keeps a half-precision model's weights in two bytes and computes in float32. The
//! tolerance is derived from PyTorch's own error: Ember's distance to PyTorch's half-precision
//! output may not exceed 1.5x PyTorch's distance between its half-precision and float32 outputs
//! (both relative to the float32 output's largest magnitude, at the real positions).
mod common;

use burn::tensor::{Int, Tensor, TensorData};
use common::B;
use ember_models::{
    AutoModel, AutoModelForCausalLM, CausalLm, CausalLmInput, EncoderInput, FloatDtype,
    FromPretrainedOptions, Weights,
};
use std::path::{Path, PathBuf};

fn half_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/half")
}

fn models() -> PathBuf {
    common::fixtures()
}

/// The fixture tensor `key` as flat f32 values and its shape.
fn fixture(w: &Weights, key: &str) -> (Vec<f32>, Vec<usize>) {
    let shape = w
        .shape(key)
        .unwrap_or_else(|| panic!("no `{key}`"))
        .to_vec();
    let values = w.values(key, &shape).unwrap().into_owned();
    (values, shape)
}

/// `max |a - b|` over the real positions (mask 1) of `[batch, seq, width]` values.
fn max_diff(a: &[f32], b: &[f32], mask: &[f32], width: usize) -> f32 {
    a.chunks(width)
        .zip(b.chunks(width))
        .zip(mask)
        .filter(|(_, &m)| m == 1.0)
        .flat_map(|((x, y), _)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

fn run(name: &str, dtype: FloatDtype, ids: Tensor<B, 2, Int>, mask: Tensor<B, 2, Int>) -> Vec<f32> {
    let device = Default::default();
    let options = FromPretrainedOptions::default().dtype(dtype);
    let dir = models().join(name);
    let out = if matches!(name, "tiny-bert" | "tiny-roberta") {
        let (model, _) = AutoModel::from_pretrained_with::<B>(&dir, &options, &device).unwrap();
        assert_eq!(model.dtype(), dtype);
        model
            .forward(
                EncoderInput::new(ids).with_attention_mask(mask),
                Default::default(),
            )
            .unwrap()
            .last_hidden_state
    } else {
        let (model, _) =
            AutoModelForCausalLM::from_pretrained_with::<B>(&dir, &options, &device).unwrap();
        assert_eq!(model.dtype(), dtype);
        model
            .forward(CausalLmInput::new(ids).with_attention_mask(mask))
            .unwrap()
            .logits
    };
    out.into_data().convert::<f32>().to_vec().unwrap()
}

#[test]
fn half_forward_is_as_close_to_pytorch_half_as_pytorch_is_to_itself() {
    let expected = Weights::open(&half_fixtures().join("half-expected.safetensors")).unwrap();
    let device = Default::default();
    for name in [
        "tiny-bert",
        "tiny-roberta",
        "tiny-llama-gqa",
        "tiny-llama-tied",
        "tiny-llama3-rope",
        "tiny-bloom",
        "tiny-gpt2",
    ] {
        let (ids, shape) = fixture(&expected, &format!("{name}.input_ids"));
        let (mask, _) = fixture(&expected, &format!("{name}.attention_mask"));
        let as_int = |v: &[f32]| {
            Tensor::<B, 2, Int>::from_data(
                TensorData::new(v.iter().map(|&x| x as i64).collect(), [shape[0], shape[1]]),
                &device,
            )
        };
        // BLOOM has no sdpa path in transformers: its eager outputs are the reference.
        let kernel = if name == "tiny-bloom" {
            "eager"
        } else {
            "sdpa"
        };
        let (f32_ref, out_shape) = fixture(&expected, &format!("{name}.float32.{kernel}"));
        let width = out_shape[2];
        let scale = f32_ref.iter().fold(0f32, |m, v| m.max(v.abs()));
        for dtype in [FloatDtype::BFloat16, FloatDtype::Float16] {
            let (half_ref, _) = fixture(&expected, &format!("{name}.{dtype}.{kernel}"));
            let ours = run(name, dtype, as_int(&ids), as_int(&mask));
            let pytorch_own = max_diff(&half_ref, &f32_ref, &mask, width) / scale;
            let ours_vs_half = max_diff(&ours, &half_ref, &mask, width) / scale;
            let ours_vs_f32 = max_diff(&ours, &f32_ref, &mask, width) / scale;
            eprintln!(
                "{name} {dtype}: PyTorch half vs f32 {pytorch_own:.2e}; Ember vs PyTorch half \
                 {ours_vs_half:.2e}, vs f32 {ours_vs_f32:.2e}"
            );
            assert!(
                ours_vs_half <= 1.5 * pytorch_own,
                "{name} {dtype}: Ember is {ours_vs_half:.2e} from PyTorch's {dtype} output, \
                 PyTorch's own {dtype} error is {pytorch_own:.2e}"
            );
        }
    }
}
