//! ember-models against Python `transformers` 5.24 (fixtures made by
//! `tests/fixtures/models/make_fixtures.py` with the pinned reference venv):
//!
//! - the real all-MiniLM-L6-v2: `last_hidden_state` and `pooler_output` of a padded batch,
//!   compared through Python's summary of them (probes, norms, sums; see `assert_summary`);
//! - tiny random BERT and RoBERTa checkpoints: every head's logits and loss, attentions and
//!   hidden states, with padding on the right and on the left;
//! - the same BERT weights as `pytorch_model.bin`, f16 safetensors and bf16 shards;
//! - one training step (loss, every gradient, AdamW update) of a sequence classifier.
//!
//! Forward values are compared within 1e-5 relative, the training step within 1e-4.

mod common;

use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::{Int, Tensor};
use common::{assert_close, assert_close_floor, assert_summary, fixtures, Expected, B};
use ember_models::*;
use std::path::{Path, PathBuf};

type AB = Autodiff<B>;

fn input(e: &Expected, kind: &str) -> EncoderInput<B> {
    EncoderInput::new(e.int(&format!("{kind}.input_ids")))
        .with_attention_mask(e.int(&format!("{kind}.attention_mask")))
        .with_token_type_ids(e.int(&format!("{kind}.token_type_ids")))
}

#[test]
fn minilm_matches_python_transformers() {
    let Some(dir) = ember_testkit::minilm() else {
        return;
    };
    let device = Default::default();
    let model = BertModel::<B>::from_pretrained(&dir, &device).unwrap();
    let e = Expected::open("minilm-summary.safetensors");
    let input = EncoderInput::new(e.int("input_ids"))
        .with_attention_mask(e.int("attention_mask"))
        .with_token_type_ids(e.int("token_type_ids"));
    let out = model.forward(input, OutputOptions::default()).unwrap();
    let hidden: Vec<f32> = out.last_hidden_state.into_data().to_vec().unwrap();
    assert_summary(&hidden, 384, &e, "last_hidden_state", 1e-5);
    let pooled: Vec<f32> = out.pooler_output.unwrap().into_data().to_vec().unwrap();
    assert_summary(&pooled, 384, &e, "pooler_output", 1e-5);
}

fn check_every_head(kind: &str) {
    let device = Default::default();
    let dir = fixtures().join(format!("tiny-{kind}"));
    let e = Expected::open("tiny-expected.safetensors");
    let k = |name: &str| format!("{kind}.{name}");

    let options = FromPretrainedOptions::default()
        .output_attentions(true)
        .output_hidden_states(true);
    let (base, report) = AutoModel::from_pretrained_with::<B>(&dir, &options, &device).unwrap();
    // The folder also holds every head's weights: HF reports them as unused.
    assert!(
        report
            .unexpected_keys
            .iter()
            .any(|k| k.starts_with("classifier")),
        "{report:?}"
    );
    let out = base
        .forward(
            input(&e, kind),
            OutputOptions {
                attentions: true,
                hidden_states: true,
            },
        )
        .unwrap();
    assert_close(
        out.last_hidden_state,
        &e.flat(&k("base.last_hidden_state")),
        1e-5,
        &k("last_hidden_state"),
    );
    if kind == "bert" {
        assert!(report.missing_keys.is_empty(), "{report:?}");
        assert_close(
            out.pooler_output.unwrap(),
            &e.flat(&k("base.pooler_output")),
            1e-5,
            &k("pooler_output"),
        );
    } else {
        // No RoBERTa head has a pooler, so the folder has none: HF initialises it afresh (and
        // its output is random in Python too).
        assert_eq!(
            report.missing_keys,
            ["pooler.dense.weight", "pooler.dense.bias"]
        );
    }
    let attentions = out.attentions.unwrap();
    assert_eq!(attentions.len(), 2);
    assert_close(
        attentions[1].clone(),
        &e.flat(&k("base.attentions.1")),
        1e-5,
        &k("attentions[1]"),
    );
    let states = out.hidden_states.unwrap();
    assert_eq!(states.len(), 3);
    assert_close(
        states[0].clone(),
        &e.flat(&k("base.hidden_states.0")),
        1e-5,
        &k("hidden_states[0]"),
    );
    assert_close(
        states[2].clone(),
        &e.flat(&k("base.hidden_states.2")),
        1e-5,
        &k("hidden_states[2]"),
    );

    let seq = AutoModelForSequenceClassification::from_pretrained::<B>(&dir, &device).unwrap();
    assert_eq!(seq.config().num_labels(), 3);
    let out = seq
        .forward(
            input(&e, kind),
            Some(SequenceLabels::Classes(e.int(&k("seq.labels")))),
        )
        .unwrap();
    assert_close(
        out.logits,
        &e.flat(&k("seq.logits")),
        1e-5,
        &k("seq logits"),
    );
    assert_close(
        out.loss.unwrap(),
        &e.flat(&k("seq.loss")),
        1e-5,
        &k("seq loss (cross entropy)"),
    );
    for (problem, name) in [
        ("multi_label_classification", "seq_multi"),
        ("regression", "seq_regression"),
    ] {
        let options = FromPretrainedOptions::default().problem_type(problem);
        let (seq, _) =
            AutoModelForSequenceClassification::from_pretrained_with::<B>(&dir, &options, &device)
                .unwrap();
        let labels = SequenceLabels::Scores(e.float(&k(&format!("{name}.labels"))));
        let out = seq.forward(input(&e, kind), Some(labels)).unwrap();
        assert_close(
            out.loss.unwrap(),
            &e.flat(&k(&format!("{name}.loss"))),
            1e-5,
            &k(problem),
        );
    }

    let token = AutoModelForTokenClassification::from_pretrained::<B>(&dir, &device).unwrap();
    let out = token
        .forward(input(&e, kind), Some(e.int(&k("token.labels"))))
        .unwrap();
    assert_close(
        out.logits,
        &e.flat(&k("token.logits")),
        1e-5,
        &k("token logits"),
    );
    assert_close(
        out.loss.unwrap(),
        &e.flat(&k("token.loss")),
        1e-5,
        &k("token loss"),
    );

    let mlm = AutoModelForMaskedLM::from_pretrained::<B>(&dir, &device).unwrap();
    let out = mlm
        .forward(input(&e, kind), Some(e.int(&k("mlm.labels"))))
        .unwrap();
    assert_close(
        out.logits,
        &e.flat(&k("mlm.logits")),
        1e-5,
        &k("mlm logits"),
    );
    assert_close(
        out.loss.unwrap(),
        &e.flat(&k("mlm.loss")),
        1e-5,
        &k("mlm loss"),
    );

    let qa = AutoModelForQuestionAnswering::from_pretrained::<B>(&dir, &device).unwrap();
    let out = qa
        .forward(
            input(&e, kind),
            Some((e.int(&k("qa.start")), e.int(&k("qa.end")))),
        )
        .unwrap();
    assert_close(
        out.start_logits,
        &e.flat(&k("qa.start_logits")),
        1e-5,
        &k("qa start"),
    );
    assert_close(
        out.end_logits,
        &e.flat(&k("qa.end_logits")),
        1e-5,
        &k("qa end"),
    );
    assert_close(
        out.loss.unwrap(),
        &e.flat(&k("qa.loss")),
        1e-5,
        &k("qa loss"),
    );
}

#[test]
fn bert_heads_match_python() {
    check_every_head("bert");
}

#[test]
fn roberta_heads_match_python() {
    check_every_head("roberta");
}

#[test]
fn pytorch_bin_f16_and_sharded_bf16_load() {
    let device = Default::default();
    let e = Expected::open("tiny-expected.safetensors");
    let reference = AutoModel::from_pretrained::<B>(fixtures().join("tiny-bert"), &device).unwrap();
    let reference = reference
        .forward(input(&e, "bert"), OutputOptions::default())
        .unwrap()
        .last_hidden_state;
    for name in ["tiny-bert-bin", "tiny-bert-f16", "tiny-bert-sharded"] {
        let model = AutoModel::from_pretrained::<B>(fixtures().join(name), &device).unwrap();
        let out = model
            .forward(input(&e, "bert"), OutputOptions::default())
            .unwrap()
            .last_hidden_state;
        assert_close(
            out.clone(),
            &e.flat(&format!("{name}.last_hidden_state")),
            1e-5,
            name,
        );
        if name == "tiny-bert-bin" {
            // Same f32 weights as the safetensors folder: the same numbers exactly.
            assert_eq!(out.into_data(), reference.clone().into_data());
        }
    }
}

#[test]
fn one_training_step_matches_pytorch() {
    let device = Default::default();
    let e = Expected::open("tiny-expected.safetensors");
    let step = Expected::open("train-step.safetensors");
    let options = FromPretrainedOptions::default()
        .set("hidden_dropout_prob", 0.0)
        .set("attention_probs_dropout_prob", 0.0)
        .set("classifier_dropout", 0.0);
    let (model, _) = AutoModelForSequenceClassification::from_pretrained_with::<AB>(
        fixtures().join("tiny-bert"),
        &options,
        &device,
    )
    .unwrap();
    let input = {
        let i = input(&e, "bert");
        EncoderInput::new(Tensor::from_inner(i.input_ids))
            .with_attention_mask(Tensor::from_inner(i.attention_mask.unwrap()))
            .with_token_type_ids(Tensor::from_inner(i.token_type_ids.unwrap()))
    };
    let labels = SequenceLabels::Classes(Tensor::from_inner(e.int("bert.seq.labels")));
    let loss = model.forward(input, Some(labels)).unwrap().loss.unwrap();
    assert_close(
        loss.clone().inner(),
        &step.flat("loss"),
        1e-4,
        "training loss",
    );
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let params = model.named_parameters();
    assert_eq!(
        params.len(),
        41,
        "BertForSequenceClassification has 41 parameters in PyTorch"
    );
    for p in &params {
        let want = step.flat(&format!("grad.{}", p.name));
        match p.shape.len() {
            1 => assert_close(
                grads.get::<B, 1>(p.id).unwrap(),
                &want,
                1e-4,
                &format!("grad {}", p.name),
            ),
            _ => {
                let g = grads.get::<B, 2>(p.id).unwrap();
                assert_close(
                    if p.transposed { g.transpose() } else { g },
                    &want,
                    1e-4,
                    &format!("grad {}", p.name),
                );
            }
        }
    }
    let mut optimizer = AdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(0.01)
        .init::<AB, BertForSequenceClassification<AB>>();
    let model = optimizer.step(1e-3, model, grads).valid();
    let mut ill_conditioned = 0;
    for (name, (_, values)) in model.state_dict().unwrap() {
        // Adam's first step is lr * g / (|g| + eps): where |g| is within ten eps
        // (1e-8), it amplifies the last bits of the gradient (which differ between any two GEMM
        // implementations) into a visible part of the step. Those elements are left out; every
        // other one is judged on the scale of the learning rate.
        let grad = step.flat(&format!("grad.{name}"));
        let want = step.flat(&format!("after.{name}"));
        let (got, want): (Vec<f32>, Vec<f32>) = values
            .iter()
            .zip(&want)
            .zip(&grad)
            .filter(|(_, g)| {
                let keep = **g == 0.0 || g.abs() >= 1e-7;
                ill_conditioned += usize::from(!keep);
                keep
            })
            .map(|((a, b), _)| (*a, *b))
            .unzip();
        let after = Tensor::<B, 1>::from_floats(got.as_slice(), &device);
        assert_close_floor(after, &want, 1e-4, 1e-3, &format!("after AdamW {name}"));
    }
    eprintln!("after AdamW: {ill_conditioned} elements with 0 < |grad| < 1e-7 left out");
}

#[test]
fn saved_folder_reloads_with_identical_logits_and_hf_keys() {
    let device = Default::default();
    let e = Expected::open("tiny-expected.safetensors");
    for kind in ["bert", "roberta"] {
        let dir = fixtures().join(format!("tiny-{kind}"));
        let model =
            AutoModelForSequenceClassification::from_pretrained::<B>(&dir, &device).unwrap();
        let tmp = tempdir(&format!("saved-{kind}"));
        model.save_pretrained(&tmp).unwrap();
        let saved = Weights::open(&tmp.join("model.safetensors")).unwrap();
        let original = Weights::open(&dir.join("model.safetensors")).unwrap();
        for key in saved.keys() {
            assert_eq!(
                saved.shape(&key),
                original.shape(&key),
                "{key} is saved under its HF name and layout"
            );
        }
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(tmp.join("config.json")).unwrap())
                .unwrap();
        let class = if kind == "bert" {
            "BertForSequenceClassification"
        } else {
            "RobertaForSequenceClassification"
        };
        assert_eq!(config["architectures"][0], class);
        assert_eq!(config["id2label"]["2"], "POS");
        let again =
            AutoModelForSequenceClassification::from_pretrained::<B>(&tmp, &device).unwrap();
        let a = model
            .forward(input(&e, kind), None)
            .unwrap()
            .logits
            .into_data();
        let b = again
            .forward(input(&e, kind), None)
            .unwrap()
            .logits
            .into_data();
        assert_eq!(a, b);
        let leftovers: Vec<_> = std::fs::read_dir(&tmp)
            .unwrap()
            .map(|f| f.unwrap().file_name())
            .collect();
        assert_eq!(
            leftovers.len(),
            2,
            "only config.json and model.safetensors, no temporary files: {leftovers:?}"
        );
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ember-models-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn new_heads_are_reported_like_hf() {
    let device = Default::default();
    let dir = fixtures().join("tiny-bert");
    // Five labels where the checkpoint's head has three: an error naming the tensor, unless
    // `ignore_mismatched_sizes`.
    let options = FromPretrainedOptions::default().num_labels(5);
    let err =
        AutoModelForSequenceClassification::from_pretrained_with::<B>(&dir, &options, &device)
            .unwrap_err();
    assert!(
        matches!(&err, ModelError::Shape { key, .. } if key == "classifier.weight"),
        "{err}"
    );
    let (model, report) = AutoModelForSequenceClassification::from_pretrained_with::<B>(
        &dir,
        &options.ignore_mismatched_sizes(true),
        &device,
    )
    .unwrap();
    assert_eq!(
        report.mismatched_keys,
        ["classifier.weight", "classifier.bias"]
    );
    assert_eq!(model.config().id2label.as_ref().unwrap()[&4], "LABEL_4");

    // A bare encoder checkpoint (MiniLM has no `bert.` prefix) under a new head.
    let Some(minilm) = ember_testkit::minilm() else {
        return;
    };
    let options = FromPretrainedOptions::default().labels(["neg", "pos"]);
    let (model, report) =
        AutoModelForTokenClassification::from_pretrained_with::<B>(&minilm, &options, &device)
            .unwrap();
    assert_eq!(
        report.missing_keys,
        ["classifier.weight", "classifier.bias"]
    );
    assert_eq!(
        report.unexpected_keys,
        ["pooler.dense.bias", "pooler.dense.weight"]
    );
    assert_eq!(model.class_name(), "BertForTokenClassification");
}

#[test]
fn bad_inputs_and_files_are_typed_errors() {
    let device = Default::default();
    let tiny = fixtures().join("tiny-bert");
    let model = AutoModel::from_pretrained::<B>(&tiny, &device).unwrap();
    let ids = |v: Vec<i64>| {
        Tensor::<B, 2, Int>::from_data(
            burn::tensor::TensorData::new(v.clone(), [1, v.len()]),
            &device,
        )
    };
    let err = model
        .forward(
            EncoderInput::new(ids(vec![2, 64, 3])),
            OutputOptions::default(),
        )
        .unwrap_err();
    assert!(
        matches!(&err, ModelError::Input(m) if m.contains("64")),
        "{err}"
    );
    let err = model
        .forward(
            EncoderInput::new(ids(vec![2; 17])),
            OutputOptions::default(),
        )
        .unwrap_err();
    assert!(
        matches!(&err, ModelError::Input(m) if m.contains("max_position_embeddings 16")),
        "{err}"
    );
    let err = model
        .forward(
            EncoderInput::new(ids(vec![2, 3])).with_attention_mask(ids(vec![1, 1, 1])),
            OutputOptions::default(),
        )
        .unwrap_err();
    assert!(
        matches!(&err, ModelError::Input(m) if m.contains("attention_mask")),
        "{err}"
    );

    let tmp = tempdir("bad");
    let copy = |name: &str| std::fs::copy(tiny.join(name), tmp.join(name)).unwrap();
    // No config.
    let err = AutoModel::from_pretrained::<B>(&tmp, &device).unwrap_err();
    assert!(
        matches!(&err, ModelError::Io { path, .. } if path.ends_with("config.json")),
        "{err}"
    );
    // No weights.
    copy("config.json");
    let err = AutoModel::from_pretrained::<B>(&tmp, &device).unwrap_err();
    assert!(matches!(err, ModelError::NoWeights { .. }), "{err}");
    // Truncated safetensors.
    let bytes = std::fs::read(tiny.join("model.safetensors")).unwrap();
    std::fs::write(tmp.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let err = AutoModel::from_pretrained::<B>(&tmp, &device).unwrap_err();
    assert!(
        matches!(&err, ModelError::Weights { path, .. } if path.ends_with("model.safetensors")),
        "{err}"
    );
    // A config that disagrees with the weights: the tensor is named with both shapes.
    copy("model.safetensors");
    let config = std::fs::read_to_string(tiny.join("config.json"))
        .unwrap()
        .replace("\"intermediate_size\": 48", "\"intermediate_size\": 50");
    std::fs::write(tmp.join("config.json"), config).unwrap();
    let err = AutoModel::from_pretrained::<B>(&tmp, &device).unwrap_err();
    assert!(
        matches!(&err, ModelError::Shape { key, found, expected, .. }
        if key == "bert.encoder.layer.0.intermediate.dense.weight" && found == &[48, 32] && expected == &[50, 32]),
        "{err}"
    );
    // A missing encoder tensor.
    copy("config.json");
    let mut tensors = safetensors::SafeTensors::deserialize(&bytes)
        .unwrap()
        .tensors();
    tensors.retain(|(k, _)| k != "bert.encoder.layer.1.output.dense.bias");
    std::fs::write(
        tmp.join("model.safetensors"),
        safetensors::serialize(tensors, None).unwrap(),
    )
    .unwrap();
    let err = AutoModel::from_pretrained::<B>(&tmp, &device).unwrap_err();
    assert!(
        matches!(&err, ModelError::MissingTensor { key, .. } if key == "encoder.layer.1.output.dense.bias"),
        "{err}"
    );
    // An unsupported architecture.
    std::fs::write(tmp.join("config.json"), r#"{"model_type": "t5"}"#).unwrap();
    let err = AutoModelForMaskedLM::from_pretrained::<B>(&tmp, &device).unwrap_err();
    assert!(
        matches!(&err, ModelError::Unsupported { message, .. } if message.contains("t5")),
        "{err}"
    );
    // A field of the wrong type is named.
    std::fs::write(
        tmp.join("config.json"),
        r#"{"model_type": "bert", "num_hidden_layers": "two"}"#,
    )
    .unwrap();
    let err = AutoModel::from_pretrained::<B>(&tmp, &device).unwrap_err();
    assert!(err.to_string().contains("num_hidden_layers"), "{err}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// Saves a model into a folder.
type SaveFn = Box<dyn Fn(&Path)>;

#[test]
fn ember_saved_folders_load_in_python() {
    let device = Default::default();
    let e = Expected::open("tiny-expected.safetensors");
    let mut dirs = Vec::new();
    for kind in ["bert", "roberta"] {
        // Fresh weights (not a copy of the fixture), saved by Ember, with the logits Ember
        // computes for the fixture's inputs.
        let config = AutoConfig::from_pretrained(fixtures().join(format!("tiny-{kind}"))).unwrap();
        let input = input(&e, kind);
        let logits: Vec<(&str, Tensor<B, 3>, SaveFn)> = vec![
            {
                let m =
                    AutoModelForSequenceClassification::from_config::<B>(&config, &device).unwrap();
                let l = m.forward(input.clone(), None).unwrap().logits.unsqueeze();
                (
                    "seq",
                    l,
                    Box::new(move |d: &Path| m.save_pretrained(d).unwrap()),
                )
            },
            {
                let m =
                    AutoModelForTokenClassification::from_config::<B>(&config, &device).unwrap();
                let l = m.forward(input.clone(), None).unwrap().logits;
                (
                    "token",
                    l,
                    Box::new(move |d: &Path| m.save_pretrained(d).unwrap()),
                )
            },
            {
                let m = AutoModelForMaskedLM::from_config::<B>(&config, &device).unwrap();
                let l = m.forward(input.clone(), None).unwrap().logits;
                (
                    "mlm",
                    l,
                    Box::new(move |d: &Path| m.save_pretrained(d).unwrap()),
                )
            },
        ];
        for (head, logits, save) in logits {
            let dir = tempdir(&format!("to-python-{kind}-{head}"));
            save(&dir);
            let logits = if head == "seq" {
                logits.squeeze_dim::<2>(0).into_data()
            } else {
                logits.into_data()
            };
            let int = |t: Option<Tensor<B, 2, Int>>| t.unwrap().into_data().convert::<i64>();
            let tensors = [
                (
                    "input_ids",
                    input.input_ids.clone().into_data().convert::<i64>(),
                ),
                ("attention_mask", int(input.attention_mask.clone())),
                ("token_type_ids", int(input.token_type_ids.clone())),
                ("logits", logits),
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
                dir.join("ember-logits.safetensors"),
                safetensors::serialize(views, None).unwrap(),
            )
            .unwrap();
            dirs.push(dir);
        }
    }
    let Some(python) = ember_testkit::reference_python() else {
        return;
    };
    let status = std::process::Command::new(python)
        .arg(fixtures().join("check_saved.py"))
        .args(&dirs)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "Python transformers disagrees with Ember on a folder Ember saved"
    );
    for dir in dirs {
        std::fs::remove_dir_all(dir).unwrap();
    }
}
