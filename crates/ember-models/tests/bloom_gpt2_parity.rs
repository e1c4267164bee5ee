//! `BloomForCausalLM` and `GPT2LMHeadModel` against Python `transformers` 5.24 (fixtures made
//! by `tests/fixtures/models/make_bloom_gpt2_fixtures.py` with the pinned reference venv):
//!
//! - tiny random Bloom (4 heads; 6 heads with `apply_residual_connection_post_layernorm`) and
//!   GPT-2 checkpoints: logits with padding on either side, the shifted loss, a cached decoding
//!   step, and a learned key / value prefix; GPT-2 also with position ids from the mask and
//!   with `scale_attn_by_inverse_layer_idx`;
//! - `AutoModelForCausalLM`, `save_pretrained` round trips, old checkpoints (no `transformer.`
//!   prefix, attention-mask buffers) and typed errors;
//! - Ember-saved folders loading in Python (when the reference Python exists).
//!
//! Logits are compared within 1e-4 relative, at real (unpadded) positions only: a padding
//! query attends to nothing real, and what it returns is arbitrary (HF spreads it over every
//! key, Ember lets it see itself).

mod common;

use burn::backend::Autodiff;
use burn::tensor::{Int, Tensor, TensorData};
use common::{assert_close, fixtures, Expected, B};
use ember_models::*;
use std::path::Path;

/// Fixture folder, prefix in the expected file.
const MODELS: [(&str, &str); 3] = [
    ("tiny-bloom", "bloom"),
    ("tiny-bloom-6h", "bloom6"),
    ("tiny-gpt2", "gpt2"),
];

fn expected() -> Expected {
    Expected::open("bloom-gpt2-expected.safetensors")
}

fn load(folder: &str) -> AnyCausalLm<B> {
    AutoModelForCausalLM::from_pretrained::<B>(fixtures().join(folder), &Default::default())
        .unwrap()
}

fn flat<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().to_vec().unwrap()
}

/// [`assert_close`] on the positions where `mask` is 1 (`logits` `[batch, seq, vocab]`).
fn assert_close_real(
    got: Tensor<B, 3>,
    want: &[f32],
    mask: Tensor<B, 2, Int>,
    tolerance: f32,
    what: &str,
) {
    let [batch, seq, vocab] = got.dims();
    assert_eq!(mask.dims(), [batch, seq], "{what}: mask shape");
    let mask: Vec<i64> = mask.into_data().convert::<i64>().to_vec().unwrap();
    let got = flat(got);
    let (mut g, mut w) = (Vec::new(), Vec::new());
    for (position, real) in mask.iter().enumerate() {
        if *real == 1 {
            let span = position * vocab..(position + 1) * vocab;
            g.extend_from_slice(&got[span.clone()]);
            w.extend_from_slice(&want[span]);
        }
    }
    let n = g.len();
    assert_close(
        Tensor::<B, 1>::from_data(TensorData::new(g, [n]), &Default::default()),
        &w,
        tolerance,
        what,
    );
}

fn batch(e: &Expected, prefix: &str) -> (Tensor<B, 2, Int>, Tensor<B, 2, Int>) {
    (
        e.int(&format!("{prefix}.input_ids")),
        e.int(&format!("{prefix}.attention_mask")),
    )
}

#[test]
fn logits_and_loss_match_python_with_padding_on_either_side() {
    let e = expected();
    for (folder, prefix) in MODELS {
        let model = load(folder);
        let (ids, mask) = batch(&e, prefix);
        // -100 on padding and on the first token after left padding (see the fixture script).
        let labels = e.int(&format!("{prefix}.labels"));
        let out = model
            .forward(
                CausalLmInput::new(ids)
                    .with_attention_mask(mask.clone())
                    .with_labels(labels),
            )
            .unwrap();
        assert_close_real(
            out.logits,
            &e.flat(&format!("{prefix}.logits")),
            mask,
            1e-4,
            &format!("{prefix} logits"),
        );
        assert_close(
            out.loss.unwrap(),
            &e.flat(&format!("{prefix}.loss")),
            1e-5,
            &format!("{prefix} loss"),
        );
    }
}

#[test]
fn cached_decoding_equals_the_full_run_and_python() {
    let e = expected();
    for (folder, prefix) in MODELS {
        let model = load(folder);
        let (ids, mask) = batch(&e, prefix);
        let [rows, seq] = ids.dims();
        let full = model
            .forward(CausalLmInput::new(ids.clone()).with_attention_mask(mask.clone()))
            .unwrap()
            .logits;
        let vocab = full.dims()[2];
        let mut out = model
            .forward(
                CausalLmInput::new(ids.clone().slice([0..rows, 0..5]))
                    .with_attention_mask(mask.clone().slice([0..rows, 0..5])),
            )
            .unwrap();
        let mut steps = vec![out.logits.clone()];
        for t in 5..seq {
            let cache = out.past_key_values;
            assert_eq!(cache.seq_len(), t);
            out = model
                .forward(
                    CausalLmInput::new(ids.clone().slice([0..rows, t..t + 1]))
                        .with_attention_mask(mask.clone().slice([0..rows, 0..t + 1]))
                        .with_past_key_values(cache),
                )
                .unwrap();
            if t == 5 {
                // Position 5 is a real token in every row.
                assert_close(
                    out.logits.clone(),
                    &e.flat(&format!("{prefix}.step_logits")),
                    1e-4,
                    &format!("{prefix} cached step vs python"),
                );
            }
            steps.push(out.logits.clone());
        }
        let key = &out.past_key_values.layers[0].key;
        assert_eq!(key.dims()[0..3], [rows, key.dims()[1], seq]);
        let incremental = Tensor::cat(steps, 1);
        assert_eq!(incremental.dims(), [rows, seq, vocab]);
        assert_close_real(
            incremental,
            &flat(full),
            mask,
            1e-4,
            &format!("{prefix} cached decoding vs full run"),
        );
    }
}

#[test]
fn a_learned_prefix_cache_matches_python() {
    let e = expected();
    for (folder, prefix) in MODELS {
        let model = load(folder);
        let (ids, mask) = batch(&e, prefix);
        let layers = (0..)
            .map_while(|i| {
                let key = format!("{prefix}.prefix.key.{i}");
                e.0.contains(&key).then(|| {
                    LayerKv::new(
                        e.float(&key),
                        e.float(&format!("{prefix}.prefix.value.{i}")),
                    )
                })
            })
            .collect();
        let out = model
            .forward(
                CausalLmInput::new(ids)
                    .with_attention_mask(e.int(&format!("{prefix}.prefix_mask")))
                    .with_past_key_values(KvCache { layers }),
            )
            .unwrap();
        assert_eq!(out.past_key_values.seq_len(), 2 + 8);
        assert_close_real(
            out.logits,
            &e.flat(&format!("{prefix}.prefix_logits")),
            mask,
            1e-4,
            &format!("{prefix} learned prefix"),
        );
    }
}

#[test]
fn gpt2_position_ids_and_attention_scaling_match_python() {
    let e = expected();
    let (ids, mask) = batch(&e, "gpt2");
    let model = load("tiny-gpt2");
    let logits = model
        .forward(
            CausalLmInput::new(ids.clone())
                .with_attention_mask(mask.clone())
                .with_position_ids(e.int("gpt2.position_ids")),
        )
        .unwrap()
        .logits;
    assert_close_real(
        logits,
        &e.flat("gpt2.positions_logits"),
        mask.clone(),
        1e-4,
        "gpt2 position_ids from the mask",
    );
    let options = FromPretrainedOptions::default()
        .set("scale_attn_by_inverse_layer_idx", true)
        .set("reorder_and_upcast_attn", true);
    let (scaled, report) = AutoModelForCausalLM::from_pretrained_with::<B>(
        fixtures().join("tiny-gpt2"),
        &options,
        &Default::default(),
    )
    .unwrap();
    assert_eq!(report, LoadReport::default());
    let logits = scaled
        .forward(CausalLmInput::new(ids).with_attention_mask(mask.clone()))
        .unwrap()
        .logits;
    assert_close_real(
        logits,
        &e.flat("gpt2.scaled_logits"),
        mask,
        1e-4,
        "gpt2 scale_attn_by_inverse_layer_idx",
    );
}

#[test]
fn inputs_embeds_and_a_missing_mask_give_the_same_logits() {
    let e = expected();
    let device = Default::default();
    let bloom =
        BloomForCausalLM::<B>::from_pretrained(fixtures().join("tiny-bloom"), &device).unwrap();
    let gpt2 =
        GPT2LMHeadModel::<B>::from_pretrained(fixtures().join("tiny-gpt2"), &device).unwrap();
    for (prefix, embed) in [
        ("bloom", &bloom.transformer.word_embeddings),
        ("gpt2", &gpt2.transformer.wte),
    ] {
        let model: &dyn CausalLm<B> = if prefix == "bloom" { &bloom } else { &gpt2 };
        // Row 0 has no padding: no mask is the same as a mask of ones.
        let ids: Tensor<B, 2, Int> = e
            .int::<2>(&format!("{prefix}.input_ids"))
            .slice([0..1, 0..8]);
        let want = flat(
            model
                .forward(
                    CausalLmInput::new(ids.clone())
                        .with_attention_mask(Tensor::ones([1, 8], &device)),
                )
                .unwrap()
                .logits,
        );
        let plain = model.forward(CausalLmInput::new(ids.clone())).unwrap();
        assert_close(plain.logits, &want, 1e-6, &format!("{prefix} without mask"));
        let embeds = embed.forward(ids.clone());
        let logits = model
            .forward(CausalLmInput::from_embeds(embeds))
            .unwrap()
            .logits;
        assert_close(logits, &want, 1e-6, &format!("{prefix} inputs_embeds"));
        // Without a mask, with a cache: 5 tokens, then the last 3 at once.
        let prefill = model
            .forward(CausalLmInput::new(ids.clone().slice([0..1, 0..5])))
            .unwrap();
        let rest = model
            .forward(
                CausalLmInput::new(ids.slice([0..1, 5..8]))
                    .with_past_key_values(prefill.past_key_values),
            )
            .unwrap();
        let vocab = rest.logits.dims()[2];
        assert_close(
            rest.logits,
            &want[5 * vocab..],
            1e-5,
            &format!("{prefix} cached without mask"),
        );
    }
}

#[test]
fn auto_model_dispatches_saves_and_reloads_identically() {
    assert!(CAUSAL_MODEL_TYPES.contains(&"bloom") && CAUSAL_MODEL_TYPES.contains(&"gpt2"));
    let e = expected();
    let dir = tempfile::tempdir().unwrap();
    for (folder, prefix) in MODELS {
        let model = load(folder);
        let class = if prefix == "gpt2" {
            "GPT2LMHeadModel"
        } else {
            "BloomForCausalLM"
        };
        assert_eq!(model.class_name(), class);
        assert_eq!(
            model.config_json()["model_type"],
            if prefix == "gpt2" { "gpt2" } else { "bloom" }
        );
        assert_eq!(
            CausalLm::max_positions(&model),
            (prefix == "gpt2").then_some(64)
        );
        let out = dir.path().join(folder);
        model.save_pretrained(&out).unwrap();
        let python = Weights::from_dir(&fixtures().join(folder)).unwrap();
        let saved = Weights::from_dir(&out).unwrap();
        assert_eq!(saved.keys(), python.keys(), "{folder}: saved keys");
        for key in saved.keys() {
            assert_eq!(saved.shape(&key), python.shape(&key), "{folder}: {key}");
        }
        let mut files: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .map(|f| f.unwrap().file_name().into_string().unwrap())
            .collect();
        files.sort();
        assert_eq!(files, ["config.json", "model.safetensors"]);
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["architectures"][0], class);
        let reloaded =
            AutoModelForCausalLM::from_pretrained::<B>(&out, &Default::default()).unwrap();
        let (ids, mask) = batch(&e, prefix);
        let input = || CausalLmInput::new(ids.clone()).with_attention_mask(mask.clone());
        assert_eq!(
            flat(model.forward(input()).unwrap().logits),
            flat(reloaded.forward(input()).unwrap().logits),
            "{folder}: reloaded logits"
        );
    }

    // A fresh model from a config, tied or not.
    let device = Default::default();
    let untied = AutoModelForCausalLM::from_config::<B>(
        &serde_json::json!({"model_type": "gpt2", "n_embd": 16, "n_layer": 1, "n_head": 2,
            "vocab_size": 40, "n_positions": 12, "tie_word_embeddings": false}),
        &device,
    )
    .unwrap();
    let state = untied.state_dict().unwrap();
    assert_eq!(state["lm_head.weight"].0, [40, 16]);
    assert_eq!(state["transformer.h.0.attn.c_attn.weight"].0, [16, 48]);
    let bloom = AutoModelForCausalLM::from_config::<B>(
        &serde_json::json!({"model_type": "bloom", "hidden_size": 16, "n_layer": 1, "n_head": 2,
            "vocab_size": 40}),
        &device,
    )
    .unwrap();
    assert_eq!(bloom.class_name(), "BloomForCausalLM");
    assert!(!bloom.state_dict().unwrap().contains_key("lm_head.weight"));
    // Loading a tied checkpoint into an untied model: a new, reported output matrix.
    let (_, report) = AutoModelForCausalLM::from_pretrained_with::<B>(
        fixtures().join("tiny-gpt2"),
        &FromPretrainedOptions::default().set("tie_word_embeddings", false),
        &device,
    )
    .unwrap();
    assert_eq!(report.missing_keys, ["lm_head.weight"]);
}

/// Rewrites a fixture's weights: every key through `rename`, plus `extra` tensors.
fn rewrite(
    folder: &str,
    out: &Path,
    rename: impl Fn(&str) -> String,
    extra: Vec<(String, Vec<usize>)>,
) {
    std::fs::create_dir_all(out).unwrap();
    std::fs::copy(
        fixtures().join(folder).join("config.json"),
        out.join("config.json"),
    )
    .unwrap();
    let bytes = std::fs::read(fixtures().join(folder).join("model.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let zeros: Vec<(String, Vec<usize>, Vec<u8>)> = extra
        .into_iter()
        .map(|(k, shape)| {
            let n: usize = shape.iter().product();
            (k, shape, vec![0u8; 4 * n])
        })
        .collect();
    let mut views: Vec<(String, safetensors::tensor::TensorView<'_>)> = file
        .tensors()
        .into_iter()
        .map(|(k, v)| (rename(&k), v))
        .collect();
    for (k, shape, data) in &zeros {
        views.push((
            k.clone(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                .unwrap(),
        ));
    }
    std::fs::write(
        out.join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
}

#[test]
fn old_checkpoints_without_prefix_and_with_buffers_load() {
    let e = expected();
    let dir = tempfile::tempdir().unwrap();
    let device = Default::default();
    // GPT-2 as OpenAI's checkpoints on the Hub: no `transformer.` prefix, the causal-mask
    // buffers `attn.bias` / `attn.masked_bias` in every block.
    let old = dir.path().join("old-gpt2");
    let buffers = (0..2)
        .flat_map(|i| {
            [
                (format!("h.{i}.attn.bias"), vec![1, 1, 64, 64]),
                (format!("h.{i}.attn.masked_bias"), vec![]),
            ]
        })
        .collect();
    rewrite(
        "tiny-gpt2",
        &old,
        |k| k.trim_start_matches("transformer.").to_owned(),
        buffers,
    );
    // Bloom saved with its tied output matrix.
    let tied = dir.path().join("tied-bloom");
    rewrite(
        "tiny-bloom",
        &tied,
        str::to_owned,
        vec![("lm_head.weight".into(), vec![64, 32])],
    );
    for (path, prefix) in [(old, "gpt2"), (tied, "bloom")] {
        let (model, report) = AutoModelForCausalLM::from_pretrained_with::<B>(
            &path,
            &FromPretrainedOptions::default(),
            &device,
        )
        .unwrap();
        assert_eq!(report, LoadReport::default(), "{prefix}");
        let (ids, mask) = batch(&e, prefix);
        let logits = model
            .forward(CausalLmInput::new(ids).with_attention_mask(mask.clone()))
            .unwrap()
            .logits;
        assert_close_real(
            logits,
            &e.flat(&format!("{prefix}.logits")),
            mask,
            1e-4,
            &format!("{prefix} old checkpoint"),
        );
    }
}

#[test]
fn a_training_step_has_gradients() {
    type AB = Autodiff<B>;
    let e = expected();
    let device = Default::default();
    for (folder, prefix) in [("tiny-gpt2", "gpt2"), ("tiny-bloom", "bloom")] {
        // Dropout is active on an autodiff backend (GPT-2's defaults are 0.1): the explicit
        // attention path.
        let model =
            AutoModelForCausalLM::from_pretrained::<AB>(fixtures().join(folder), &device).unwrap();
        let ids = Tensor::<AB, 2, Int>::from_data(
            e.int::<2>(&format!("{prefix}.input_ids")).into_data(),
            &device,
        );
        let loss = model
            .forward(CausalLmInput::new(ids.clone()).with_labels(ids))
            .unwrap()
            .loss
            .unwrap();
        let grads = loss.backward();
        let weight = match &model {
            AnyCausalLm::Gpt2(m) => &m.transformer.h[0].attn.c_attn.base.weight,
            AnyCausalLm::Bloom(m) => {
                &m.transformer.h[0]
                    .self_attention
                    .query_key_value
                    .base
                    .weight
            }
            _ => unreachable!("a GPT-2 or Bloom folder"),
        };
        let g = weight.grad(&grads).unwrap();
        assert!(g.abs().sum().into_scalar() > 0.0, "{prefix}");
    }
}

#[test]
fn bad_input_and_configs_are_typed_errors() {
    let device = Default::default();
    let gpt2 = load("tiny-gpt2");
    let ids = |n: usize| Tensor::<B, 2, Int>::ones([1, n], &device);
    let err = gpt2.forward(CausalLmInput::new(ids(65))).unwrap_err();
    assert!(
        matches!(&err, ModelError::Input(m) if m.contains("65 positions") && m.contains("n_positions 64")),
        "{err}"
    );
    let cached = gpt2.forward(CausalLmInput::new(ids(60))).unwrap();
    let err = gpt2
        .forward(CausalLmInput::new(ids(5)).with_past_key_values(cached.past_key_values))
        .unwrap_err();
    assert!(
        matches!(&err, ModelError::Input(m) if m.contains("65 positions (60 cached, 5 new)")),
        "{err}"
    );
    let err = gpt2
        .forward(
            CausalLmInput::new(ids(2))
                .with_position_ids(Tensor::from_data(TensorData::from([[3i64, 64]]), &device)),
        )
        .unwrap_err();
    assert!(
        matches!(&err, ModelError::Input(m) if m.contains("position id 64")),
        "{err}"
    );
    let bloom = load("tiny-bloom");
    let err = bloom
        .forward(CausalLmInput::new(Tensor::from_data(
            TensorData::from([[5i64, 64]]),
            &device,
        )))
        .unwrap_err();
    assert!(err.to_string().contains("token id 64"), "{err}");
    let err = bloom
        .forward(CausalLmInput::new(ids(2)).with_attention_mask(ids(3)))
        .unwrap_err();
    assert!(err.to_string().contains("attention_mask [1, 3]"), "{err}");
    // A cache of another model (6 heads) is named, not a panic.
    let other = load("tiny-bloom-6h")
        .forward(CausalLmInput::new(ids(2)))
        .unwrap();
    let err = bloom
        .forward(CausalLmInput::new(ids(1)).with_past_key_values(other.past_key_values))
        .unwrap_err();
    assert!(err.to_string().contains("past_key_values"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    for (folder, field, value, wanted) in [
        ("tiny-gpt2", "n_layer", serde_json::json!("two"), "n_layer"),
        (
            "tiny-bloom",
            "layer_norm_epsilon",
            serde_json::json!([1e-5]),
            "layer_norm_epsilon",
        ),
        ("tiny-bloom", "n_head", serde_json::json!(5), "n_head 5"),
        (
            "tiny-gpt2",
            "activation_function",
            serde_json::json!("gelu_10"),
            "`gelu_10`",
        ),
        (
            "tiny-gpt2",
            "add_cross_attention",
            serde_json::json!(true),
            "add_cross_attention",
        ),
    ] {
        let out = dir.path().join(format!("{folder}-{field}"));
        std::fs::create_dir_all(&out).unwrap();
        let mut config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join(folder).join("config.json")).unwrap(),
        )
        .unwrap();
        config[field] = value;
        std::fs::write(out.join("config.json"), config.to_string()).unwrap();
        std::fs::copy(
            fixtures().join(folder).join("model.safetensors"),
            out.join("model.safetensors"),
        )
        .unwrap();
        let err = AutoModelForCausalLM::from_pretrained::<B>(&out, &device).unwrap_err();
        assert!(
            matches!(&err, ModelError::Config { path, .. } if path.ends_with("config.json")),
            "{field}: {err}"
        );
        assert!(err.to_string().contains(wanted), "{field}: {err}");
    }
    // A config that disagrees with the weights names the tensor and both shapes.
    let out = dir.path().join("inner");
    std::fs::create_dir_all(&out).unwrap();
    let config = std::fs::read_to_string(fixtures().join("tiny-gpt2/config.json"))
        .unwrap()
        .replace("\"n_inner\": 64", "\"n_inner\": 48");
    std::fs::write(out.join("config.json"), config).unwrap();
    std::fs::copy(
        fixtures().join("tiny-gpt2/model.safetensors"),
        out.join("model.safetensors"),
    )
    .unwrap();
    let err = AutoModelForCausalLM::from_pretrained::<B>(&out, &device).unwrap_err();
    assert!(
        matches!(&err, ModelError::Shape { key, found, expected, .. }
            if key == "transformer.h.0.mlp.c_fc.weight" && found == &[32, 64] && expected == &[32, 48]),
        "{err}"
    );
    let err = AutoModelForCausalLM::from_config::<B>(
        &serde_json::json!({"model_type": "gpt_neox"}),
        &device,
    )
    .unwrap_err();
    assert!(
        matches!(&err, ModelError::Unsupported { message, .. } if message.contains("gpt_neox") && message.contains("bloom, gpt2")),
        "{err}"
    );
}

#[test]
fn ember_saved_folders_load_in_python() {
    let e = expected();
    let device = Default::default();
    let dir = tempfile::tempdir().unwrap();
    let mut folders = Vec::new();
    for (folder, prefix) in MODELS {
        // Fresh weights (not the fixture's), saved by Ember with the logits Ember computes.
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join(folder).join("config.json")).unwrap(),
        )
        .unwrap();
        let model = AutoModelForCausalLM::from_config::<B>(&config, &device).unwrap();
        let (ids, mask) = batch(&e, prefix);
        let logits = model
            .forward(CausalLmInput::new(ids.clone()).with_attention_mask(mask.clone()))
            .unwrap()
            .logits;
        let out = dir.path().join(folder);
        model.save_pretrained(&out).unwrap();
        let tensors = [
            ("input_ids", ids.into_data().convert::<i64>()),
            ("attention_mask", mask.into_data().convert::<i64>()),
            ("logits", logits.into_data()),
        ];
        let views: Vec<(&str, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .map(|(k, d)| {
                let dtype = if d.dtype == burn::tensor::DType::I64 {
                    safetensors::Dtype::I64
                } else {
                    safetensors::Dtype::F32
                };
                (
                    *k,
                    safetensors::tensor::TensorView::new(dtype, d.shape.to_vec(), d.as_bytes())
                        .unwrap(),
                )
            })
            .collect();
        std::fs::write(
            out.join("ember-logits.safetensors"),
            safetensors::serialize(views, None).unwrap(),
        )
        .unwrap();
        folders.push(out);
    }
    let Some(python) = ember_testkit::reference_python() else {
        return;
    };
    let status = std::process::Command::new(python)
        .arg(fixtures().join("check_saved_causal.py"))
        .args(&folders)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "Python transformers disagrees with Ember on a folder Ember saved"
    );
}
