//! `LlamaForCausalLM` against Python `transformers` 5.24 (fixtures made by
//! `tests/fixtures/models/make_llama_fixtures.py` with the pinned reference venv):
//!
//! - three tiny random Llamas (grouped-query and not, tied and untied, biases, linear and llama3
//!   rotary scaling in both config spellings): logits with padding on either side, the shifted
//!   loss, and a cached decoding step;
//! - the real SmolLM2-135M-Instruct (when `../shared/tools/make-smollm2` has built it): logits of
//!   three prompts on 256 fixed vocabulary ids and the top-5 ids at every position.
//!
//! Logits are compared within 1e-4 relative (the issue's tolerance for causal LMs).

mod common;

use burn::tensor::{Int, Tensor, TensorData};
use common::{assert_close, fixtures, Expected, B};
use ember_models::*;
use ember_testkit::smollm2;

const MODELS: [&str; 3] = ["tiny-llama-gqa", "tiny-llama-tied", "tiny-llama3-rope"];

fn load(name: &str) -> LlamaForCausalLM<B> {
    LlamaForCausalLM::from_pretrained(fixtures().join(name), &Default::default()).unwrap()
}

/// Each tiny Llama, with its linear weights in both memory orders: HF's `[out, in]` (the
/// default for causal LMs) and contiguous `[in, out]`.
fn both_layouts() -> impl Iterator<Item = (&'static str, String, LlamaForCausalLM<B>)> {
    MODELS.into_iter().flat_map(|name| {
        [LinearLayout::OutIn, LinearLayout::InOut].map(|layout| {
            let options = FromPretrainedOptions::default().linear_layout(layout);
            let model = LlamaForCausalLM::from_pretrained_with(
                fixtures().join(name),
                &options,
                &Default::default(),
            )
            .unwrap()
            .0;
            (name, format!("{name} ({layout:?})"), model)
        })
    })
}

/// The logits at unpadded positions only, Ember's and Python's. Padding positions' logits are
/// meaningless in both (a padding query sees no real key); Ember lets such a query attend to
/// itself so that no backend produces NaN, where PyTorch's kernels differ among themselves.
fn real_positions(
    e: &Expected,
    mask: &str,
    logits: Tensor<B, 3>,
    key: &str,
) -> (Tensor<B, 1>, Vec<f32>) {
    let [batch, seq, vocab] = logits.dims();
    let mask: Vec<f32> = e.flat(mask);
    let want = e.flat(key);
    let got: Vec<f32> = logits.into_data().to_vec().unwrap();
    let keep = |v: &[f32]| -> Vec<f32> {
        (0..batch * seq)
            .filter(|&p| mask[p] == 1.0)
            .flat_map(|p| v[p * vocab..(p + 1) * vocab].to_vec())
            .collect()
    };
    let (got, want) = (keep(&got), keep(&want));
    assert!(
        got.len() >= vocab * batch * seq / 2,
        "most positions are real"
    );
    let n = got.len();
    (
        Tensor::from_data(TensorData::new(got, [n]), &Default::default()),
        want,
    )
}

#[test]
fn tiny_llamas_match_python_with_padding_on_either_side() {
    let e = Expected::open("llama-expected.safetensors");
    for (name, label, model) in both_layouts() {
        let right = CausalLmInput::new(e.int("right_ids"))
            .with_attention_mask(e.int("right_mask"))
            .with_labels(
                e.int::<2>("right_ids")
                    .mask_fill(e.int::<2>("right_mask").equal_elem(0), -100),
            );
        let out = model.forward(right).unwrap();
        let (got, want) = real_positions(
            &e,
            "right_mask",
            out.logits,
            &format!("{name}.right_logits"),
        );
        assert_close(got, &want, 1e-4, &label);
        assert_close(
            out.loss.unwrap(),
            &e.flat(&format!("{name}.right_loss")),
            1e-5,
            &format!("{label} loss"),
        );
        let left = CausalLmInput::new(e.int("left_ids")).with_attention_mask(e.int("left_mask"));
        let logits = model.forward(left).unwrap().logits;
        // HF's left-padded rows: positions count from the first (padding) column, and only the
        // real tokens' logits are meaningful; the padding rows attend to themselves.
        // Positions count from the first (padding) column, as in HF's forward.
        let (got, want) = real_positions(&e, "left_mask", logits, &format!("{name}.left_logits"));
        assert_close(got, &want, 1e-4, &format!("{label} left"));
    }
}

#[test]
fn a_cached_step_equals_the_full_forward_and_python() {
    let e = Expected::open("llama-expected.safetensors");
    let ids: Tensor<B, 2, Int> = e.int("right_ids");
    let full_ids = ids.slice([0..1, 0..6]);
    for (name, label, model) in both_layouts() {
        let prefill = model
            .forward(CausalLmInput::new(full_ids.clone().slice([0..1, 0..5])))
            .unwrap();
        assert_eq!(prefill.past_key_values.seq_len(), 5);
        let step = model
            .forward(
                CausalLmInput::new(full_ids.clone().slice([0..1, 5..6]))
                    .with_past_key_values(prefill.past_key_values),
            )
            .unwrap();
        assert_eq!(step.past_key_values.seq_len(), 6);
        assert_close(
            step.logits.clone(),
            &e.flat(&format!("{name}.step_logits")),
            1e-4,
            &label,
        );
        let full = model
            .forward(CausalLmInput::new(full_ids.clone()))
            .unwrap()
            .logits;
        let last: Vec<f32> = full.slice([0..1, 5..6]).into_data().to_vec().unwrap();
        assert_close(step.logits, &last, 1e-5, &format!("{label} cache vs full"));
    }
}

#[test]
fn auto_model_loads_saves_and_reloads_identically() {
    let dir = tempfile::tempdir().unwrap();
    let e = Expected::open("llama-expected.safetensors");
    for name in MODELS {
        let model =
            AutoModelForCausalLM::from_pretrained::<B>(fixtures().join(name), &Default::default())
                .unwrap();
        assert_eq!(model.class_name(), "LlamaForCausalLM");
        let out = dir.path().join(name);
        model.save_pretrained(&out).unwrap();
        let python_keys: Vec<String> = Weights::from_dir(&fixtures().join(name)).unwrap().keys();
        let saved_keys: Vec<String> = Weights::from_dir(&out).unwrap().keys();
        assert_eq!(saved_keys, python_keys, "{name}: saved keys");
        let reloaded =
            AutoModelForCausalLM::from_pretrained::<B>(&out, &Default::default()).unwrap();
        let input =
            || CausalLmInput::new(e.int("right_ids")).with_attention_mask(e.int("right_mask"));
        let a: Vec<f32> = model
            .forward(input())
            .unwrap()
            .logits
            .into_data()
            .to_vec()
            .unwrap();
        let b: Vec<f32> = reloaded
            .forward(input())
            .unwrap()
            .logits
            .into_data()
            .to_vec()
            .unwrap();
        assert_eq!(a, b, "{name}: reloaded logits");
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    }
}

#[test]
fn inputs_embeds_equal_input_ids() {
    let e = Expected::open("llama-expected.safetensors");
    let model = load("tiny-llama-gqa");
    let ids: Tensor<B, 2, Int> = e.int("right_ids");
    let embeds = model.model.embed_tokens.forward(ids.clone());
    let a: Vec<f32> = model
        .forward(CausalLmInput::new(ids))
        .unwrap()
        .logits
        .into_data()
        .to_vec()
        .unwrap();
    let b = model
        .forward(CausalLmInput::from_embeds(embeds))
        .unwrap()
        .logits;
    assert_close(b, &a, 1e-6, "inputs_embeds");
}

#[test]
fn bad_input_and_configs_are_typed_errors() {
    let model = load("tiny-llama-gqa");
    let device = Default::default();
    let ids = |v: Vec<i64>| {
        let n = v.len();
        Tensor::<B, 2, Int>::from_data(TensorData::new(v, [1, n]), &device)
    };
    let err = model
        .forward(CausalLmInput::new(ids(vec![5, 96])))
        .unwrap_err();
    assert!(err.to_string().contains("token id 96"), "{err}");
    let err = model.forward(CausalLmInput::new(ids(vec![]))).unwrap_err();
    assert!(err.to_string().contains("no tokens"), "{err}");
    let err = model
        .forward(CausalLmInput::new(ids(vec![5, 6])).with_attention_mask(ids(vec![1, 1, 1])))
        .unwrap_err();
    assert!(err.to_string().contains("attention_mask"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    for (file, (field, value), wanted) in [
        (
            "yarn",
            (
                "rope_scaling",
                serde_json::json!({"type": "yarn", "factor": 4.0}),
            ),
            "`yarn`",
        ),
        (
            "typo",
            ("num_hidden_layers", serde_json::json!("two")),
            "num_hidden_layers",
        ),
        (
            "heads",
            ("num_key_value_heads", serde_json::json!(3)),
            "num_key_value_heads",
        ),
    ] {
        let folder = dir.path().join(file);
        std::fs::create_dir_all(&folder).unwrap();
        let mut config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join("tiny-llama-gqa/config.json")).unwrap(),
        )
        .unwrap();
        if field == "rope_scaling" {
            // The transformers 4 spelling alone (transformers 5 writes rope_parameters).
            config.as_object_mut().unwrap().remove("rope_parameters");
        }
        config[field] = value;
        std::fs::write(folder.join("config.json"), config.to_string()).unwrap();
        std::fs::copy(
            fixtures().join("tiny-llama-gqa/model.safetensors"),
            folder.join("model.safetensors"),
        )
        .unwrap();
        let err = AutoModelForCausalLM::from_pretrained::<B>(&folder, &device).unwrap_err();
        assert!(matches!(err, ModelError::Config { .. }), "{file}: {err}");
        assert!(err.to_string().contains(wanted), "{file}: {err}");
    }
    let folder = dir.path().join("t5");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("config.json"), r#"{"model_type": "t5"}"#).unwrap();
    let err = AutoModelForCausalLM::from_pretrained::<B>(&folder, &device).unwrap_err();
    assert!(matches!(err, ModelError::Unsupported { .. }), "{err}");
}

#[test]
fn smollm2_logits_match_python() {
    let Some(dir) = smollm2() else { return };
    let model = LlamaForCausalLM::<B>::from_pretrained(&dir, &Default::default()).unwrap();
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("smollm2-expected.json")).unwrap(),
    )
    .unwrap();
    let e = Expected::open("smollm2-expected.safetensors");
    let probe: Vec<usize> = serde_json::from_value(expected["probe_ids"].clone()).unwrap();
    for (i, prompt) in expected["prompts"].as_array().unwrap().iter().enumerate() {
        let ids: Vec<i64> = serde_json::from_value(prompt["input_ids"].clone()).unwrap();
        let n = ids.len();
        let input =
            Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, n]), &Default::default());
        let logits = model.forward(CausalLmInput::new(input)).unwrap().logits;
        let vocab = logits.dims()[2];
        let all: Vec<f32> = logits.into_data().to_vec().unwrap();
        let picked: Vec<f32> = (0..n)
            .flat_map(|t| probe.iter().map(move |&v| (t, v)))
            .map(|(t, v)| all[t * vocab + v])
            .collect();
        let got = Tensor::<B, 1>::from_data(
            TensorData::new(picked, [n * probe.len()]),
            &Default::default(),
        );
        assert_close(
            got,
            &e.flat(&format!("prompt{i}.probe_logits")),
            1e-4,
            &format!("prompt {i}"),
        );
        let top5: Vec<Vec<usize>> = serde_json::from_value(prompt["top5"].clone()).unwrap();
        for (t, want) in top5.iter().enumerate() {
            let row = &all[t * vocab..(t + 1) * vocab];
            let mut order: Vec<usize> = (0..vocab).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            assert_eq!(&order[..5], &want[..], "prompt {i} position {t}: top-5 ids");
        }
    }
}

#[test]
fn loading_draws_no_random_numbers() {
    // Fresh weights are created lazily: a loaded model never draws the values it replaces
    // (drawing them cost SmolLM2 several seconds of loading).
    use burn::tensor::{backend::Backend, Distribution};
    let device = Default::default();
    let draw = || {
        let v: Vec<f32> = Tensor::<B, 1>::random([4], Distribution::Default, &device)
            .into_data()
            .to_vec()
            .unwrap();
        v
    };
    let _generator = ember_testkit::random_generator_lock();
    B::seed(&device, 7);
    let untouched = draw();
    B::seed(&device, 7);
    let model = load("tiny-llama-gqa");
    assert_eq!(draw(), untouched, "loading consumed random numbers");
    drop(model);
}

#[test]
fn logits_to_keep_gives_the_last_positions() {
    let e = Expected::open("llama-expected.safetensors");
    let model = load("tiny-llama-tied");
    let ids: Tensor<B, 2, Int> = e.int("right_ids");
    let [batch, seq] = ids.dims();
    let full = model
        .forward(CausalLmInput::new(ids.clone()))
        .unwrap()
        .logits;
    let kept = model
        .forward(CausalLmInput::new(ids).with_logits_to_keep(2))
        .unwrap()
        .logits;
    assert_eq!(kept.dims(), [batch, 2, 96]);
    let want: Vec<f32> = full
        .slice([0..batch, seq - 2..seq])
        .into_data()
        .to_vec()
        .unwrap();
    assert_close(kept, &want, 1e-6, "logits_to_keep");
}
