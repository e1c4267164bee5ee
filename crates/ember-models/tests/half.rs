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

/// Runs `check_half_saved.py` on a folder Ember saved; `None` without the reference Python.
fn python_accepts(saved: &Path, reference: &Path, dtype: FloatDtype, class: &str) -> Option<bool> {
    let python = ember_testkit::reference_python()?;
    let status = std::process::Command::new(python)
        .arg(half_fixtures().join("check_half_saved.py"))
        .args([saved, reference])
        .args([dtype.as_str(), class])
        .status()
        .unwrap();
    Some(status.success())
}

#[test]
fn converted_models_save_in_their_dtype_and_load_back_both_ways() {
    let device = Default::default();
    for dtype in [FloatDtype::BFloat16, FloatDtype::Float16] {
        for (name, class) in [
            ("tiny-llama-tied", "causal"),
            ("tiny-gpt2", "causal"),
            ("tiny-bert", "base"),
        ] {
            let dir = models().join(name);
            let tmp = tempfile::tempdir().unwrap();
            let (ids, mask) = {
                let ids: Vec<i64> = (0..7).map(|t| 3 + 7 * t).collect();
                (
                    Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, 7]), &device),
                    Tensor::<B, 2, Int>::ones([1, 7], &device),
                )
            };
            // Converted after loading in float32 (`model.to(dtype)`), saved, then loaded with
            // "auto": the same dtype and the same outputs, bit for bit.
            let (before, after) = if class == "causal" {
                let model = AutoModelForCausalLM::from_pretrained::<B>(&dir, &device)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                model.save_pretrained(tmp.path()).unwrap();
                let options = FromPretrainedOptions::default().dtype(ember_models::DtypeArg::Auto);
                let (back, _) =
                    AutoModelForCausalLM::from_pretrained_with::<B>(tmp.path(), &options, &device)
                        .unwrap();
                assert_eq!(back.dtype(), dtype, "{name}");
                assert_eq!(
                    back.get_memory_footprint() * 2,
                    AutoModelForCausalLM::from_pretrained::<B>(&dir, &device)
                        .unwrap()
                        .get_memory_footprint()
                        + buffers_in_f32(name),
                    "{name}: half the parameter bytes"
                );
                let run = |m: &ember_models::AnyCausalLm<B>| {
                    m.forward(CausalLmInput::new(ids.clone()).with_attention_mask(mask.clone()))
                        .unwrap()
                        .logits
                        .into_data()
                };
                (run(&model), run(&back))
            } else {
                let (model, _) = AutoModel::from_pretrained_with::<B>(
                    &dir,
                    &FromPretrainedOptions::default(),
                    &device,
                )
                .unwrap();
                let model = model.to_dtype(dtype).unwrap();
                model.save_pretrained(tmp.path()).unwrap();
                let options = FromPretrainedOptions::default().dtype(ember_models::DtypeArg::Auto);
                let (back, _) =
                    AutoModel::from_pretrained_with::<B>(tmp.path(), &options, &device).unwrap();
                assert_eq!(back.dtype(), dtype, "{name}");
                let run = |m: &ember_models::BertModel<B>| {
                    m.forward(
                        EncoderInput::new(ids.clone()).with_attention_mask(mask.clone()),
                        Default::default(),
                    )
                    .unwrap()
                    .last_hidden_state
                    .into_data()
                };
                (run(&model), run(&back))
            };
            assert_eq!(before, after, "{name} {dtype}: reloaded outputs differ");
            let config: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(tmp.path().join("config.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(config["dtype"], dtype.as_str());
            if let Some(ok) = python_accepts(tmp.path(), &dir, dtype, class) {
                assert!(
                    ok,
                    "{name} {dtype}: Python refused Ember's folder (see stdout)"
                );
            }
        }
    }
}

/// The float32 buffers `get_memory_footprint` counts beside the parameters (they stay float32
/// in a half-precision model, as in transformers): Llama's two `inv_freq` copies.
fn buffers_in_f32(name: &str) -> usize {
    match name {
        // head_dim 8: two buffers of 4 floats.
        "tiny-llama-tied" => 2 * 4 * 4,
        _ => 0,
    }
}

#[test]
fn float16_conversion_of_a_too_large_weight_is_a_typed_error() {
    let tmp = tempfile::tempdir().unwrap();
    let device = Default::default();
    let model =
        AutoModelForCausalLM::from_pretrained::<B>(models().join("tiny-gpt2"), &device).unwrap();
    model.save_pretrained(tmp.path()).unwrap();
    // Scale one weight beyond float16's range in the saved file.
    let path = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<u8>, Vec<usize>)> = file
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.data().to_vec(), v.shape().to_vec()))
        .collect();
    let (_, data, _) = tensors
        .iter_mut()
        .find(|(k, _, _)| k.ends_with("h.0.mlp.c_fc.weight"))
        .unwrap();
    data[..4].copy_from_slice(&1.0e5f32.to_le_bytes());
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(k, d, s)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                    .unwrap(),
            )
        })
        .collect();
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
    let options = FromPretrainedOptions::default().dtype(FloatDtype::Float16);
    let err = match AutoModelForCausalLM::from_pretrained_with::<B>(tmp.path(), &options, &device) {
        Ok(_) => panic!("float16 cannot hold 1e5"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("h.0.mlp.c_fc.weight") && err.contains("65504"),
        "{err}"
    );
    // bfloat16 holds it.
    let options = FromPretrainedOptions::default().dtype(FloatDtype::BFloat16);
    assert!(AutoModelForCausalLM::from_pretrained_with::<B>(tmp.path(), &options, &device).is_ok());
}

/// The longest common prefix of two id lists.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn id_list(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Greedy SmolLM2-135M-Instruct in bfloat16 and float16 beside PyTorch in the same dtype, on
/// the four prompts of `smollm2-half.json` (skipped without the model). PyTorch's sdpa and
/// eager kernels agree with each other on every token of every prompt in both dtypes; Ember,
/// which computes in float32 from the half-precision weights, is held to agreeing wherever
/// PyTorch's half and float32 runs agree (`agree_<dtype>_f32`), and its agreement beyond that
/// is printed.
#[test]
fn smollm2_half_greedy_agrees_with_pytorch() {
    use ember_models::generation::{generate, GenerateOptions, GenerationConfig, Prompt};
    let Some(dir) = ember_testkit::smollm2() else {
        return;
    };
    let text = std::fs::read_to_string(half_fixtures().join("smollm2-half.json")).unwrap();
    let s: serde_json::Value = serde_json::from_str(&text).unwrap();
    let device = Default::default();
    for dtype in [FloatDtype::BFloat16, FloatDtype::Float16] {
        let options = FromPretrainedOptions::default().dtype(dtype);
        let (model, _) =
            AutoModelForCausalLM::from_pretrained_with::<B>(&dir, &options, &device).unwrap();
        for prompt in s["prompts"].as_array().unwrap() {
            let want = id_list(&prompt[format!("{dtype}.sdpa")]);
            let f32_agrees = prompt[format!("agree_{dtype}_f32")].as_u64().unwrap() as usize;
            let config = GenerationConfig {
                eos_token_id: Some(s["generation"]["eos_token_id"].clone()),
                ..GenerationConfig::greedy(24)
            };
            let out = generate(
                &model,
                &Prompt::single(id_list(&prompt["ids"])),
                &config,
                GenerateOptions::default(),
                &device,
            )
            .unwrap();
            let got = &out.new_tokens[0];
            let agree = common_prefix(got, &want);
            eprintln!(
                "{dtype} {:?}: {agree} of {} tokens equal to PyTorch's (PyTorch's {dtype} and \
                 float32 agree on {f32_agrees})",
                prompt["text"].as_str().unwrap(),
                want.len()
            );
            assert!(
                agree >= f32_agrees,
                "{dtype}: Ember {got:?}, PyTorch {want:?}"
            );
        }
    }
}

/// transformers' recipe for QLoRA, `from_pretrained(dir, quantization_config=nf4,
/// dtype=torch.bfloat16)`: the linear layers in 4 bits, everything else in bfloat16.
/// `get_memory_footprint()` equals transformers' (70,336 bytes for the tiny Llama, measured with
/// the pinned transformers 5.24 + bitsandbytes 0.50.2), and the model runs.
#[test]
fn nf4_with_bfloat16_weights_counts_as_transformers() {
    use ember_quant::{BitsAndBytesConfig, QuantType};
    let device = Default::default();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/quant/tiny-llama");
    let options = FromPretrainedOptions::default()
        .quantization_config(BitsAndBytesConfig::new_4bit(
            QuantType::Nf4,
            true,
            "bfloat16",
        ))
        .dtype(FloatDtype::BFloat16);
    let (model, _) =
        AutoModelForCausalLM::from_pretrained_with::<B>(&dir, &options, &device).unwrap();
    assert_eq!(model.dtype(), FloatDtype::BFloat16);
    assert_eq!(model.get_memory_footprint(), 70_336);
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![1i64, 5, 9, 2], [1, 4]), &device);
    let logits = model.forward(CausalLmInput::new(ids)).unwrap().logits;
    let values: Vec<f32> = logits.into_data().convert::<f32>().to_vec().unwrap();
    assert!(values.iter().all(|v| v.is_finite()));
    // SmolLM2 the same way: 109,777,792 bytes in transformers (skipped without the model).
    if let Some(dir) = ember_testkit::smollm2() {
        let (model, _) =
            AutoModelForCausalLM::from_pretrained_with::<B>(&dir, &options, &device).unwrap();
        assert_eq!(model.get_memory_footprint(), 109_777_792);
    }
}

/// LoRA on a bfloat16 base: the adapter stays float32 (as peft's `autocast_adapter_dtype`
/// keeps it) and the model computes what the float32 model with the same rounded base weights
/// and the same adapter computes.
#[test]
fn lora_on_a_bfloat16_base_keeps_a_float32_adapter() {
    use ember_peft::{get_peft_model, InitLoraWeights, LoraConfig, PeftConfig};
    let device = Default::default();
    let model = ember_models::LlamaForCausalLM::<B>::from_pretrained(
        models().join("tiny-llama-gqa"),
        &device,
    )
    .unwrap();
    let lora = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        init_lora_weights: InitLoraWeights::Bool(false),
        ..LoraConfig::default()
    };
    let f32_model = get_peft_model(model, PeftConfig::Lora(lora)).unwrap();
    let mut half = f32_model.clone();
    half.base_model = half.base_model.to_dtype(FloatDtype::BFloat16).unwrap();
    let mut rounded = f32_model;
    rounded.base_model = rounded
        .base_model
        .to_dtype(FloatDtype::BFloat16)
        .unwrap()
        .to_dtype(FloatDtype::Float32)
        .unwrap();
    assert_eq!(half.base_model.dtype(), FloatDtype::BFloat16);
    let ids =
        Tensor::<B, 2, Int>::from_data(TensorData::new(vec![1i64, 5, 9, 2, 7], [1, 5]), &device);
    let run = |m: &ember_peft::PeftModel<B, ember_models::LlamaForCausalLM<B>>| -> Vec<f32> {
        m.base_model
            .forward(CausalLmInput::new(ids.clone()))
            .unwrap()
            .logits
            .into_data()
            .to_vec()
            .unwrap()
    };
    let (got, want) = (run(&half), run(&rounded));
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-5, "max |bf16 base - rounded f32 base| = {worst}");
}
