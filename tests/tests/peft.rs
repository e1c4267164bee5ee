//! LoRA and IA3 against Python peft 0.21 (`tests/fixtures/peft/make_fixtures.py`): adapters
//! Python saved, loaded on Ember's tiny models of each architecture, give peft's logits;
//! merged equals unmerged; disabled gives the base model's; one training step's gradients
//! match; Ember's saved adapters hold Python's tensors and load back in Python.

use ember::burn::optim::GradientsParams;
use ember::burn::tensor::{backend::AutodiffBackend, TensorData};
use ember::models::{
    BertForSequenceClassification, BertForTokenClassification, BloomForCausalLM, CausalLmInput,
    EncoderInput, FromPretrainedOptions, GPT2LMHeadModel, LlamaForCausalLM, SequenceLabels,
};
use ember::peft::{AdaptableModel, PeftModel, DEFAULT_ADAPTER};
use ember::prelude::*;
use safetensors::SafeTensors;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

struct Expected {
    bytes: Vec<u8>,
}

impl Expected {
    fn load() -> Self {
        Self {
            bytes: std::fs::read(fixtures().join("peft/expected.safetensors")).unwrap(),
        }
    }

    fn raw(&self, key: &str) -> (Vec<usize>, TensorData) {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st
            .tensor(key)
            .unwrap_or_else(|_| panic!("no `{key}` in expected.safetensors"));
        let shape = t.shape().to_vec();
        let data = match t.dtype() {
            safetensors::Dtype::I64 => TensorData::new(
                t.data()
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                    .collect::<Vec<_>>(),
                shape.clone(),
            ),
            _ => TensorData::new(
                t.data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect::<Vec<_>>(),
                shape.clone(),
            ),
        };
        (shape, data)
    }

    fn values(&self, key: &str) -> Vec<f32> {
        self.raw(key).1.convert::<f32>().into_vec().unwrap()
    }

    fn ids<B: BackendTrait>(&self, key: &str) -> Tensor<B, 2, Int> {
        Tensor::from_data(self.raw(key).1, &default_device_of::<B>())
    }
}

fn default_device_of<B: BackendTrait>() -> B::Device {
    Default::default()
}

fn dropout_off() -> FromPretrainedOptions {
    FromPretrainedOptions::default()
        .set("hidden_dropout_prob", 0.0)
        .set("attention_probs_dropout_prob", 0.0)
        .set("classifier_dropout", 0.0)
}

fn max_diff(ours: &[f32], theirs: &[f32]) -> f32 {
    assert_eq!(ours.len(), theirs.len());
    ours.iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

fn flat<B: BackendTrait, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap()
}

fn causal_case(case: &str) -> bool {
    ["llama", "bloom", "gpt2"]
        .iter()
        .any(|p| case.starts_with(p))
}

/// One case: the base model built by `load`, the logits by `logits`.
fn check_case<M: AdaptableModel<Backend>>(
    case: &str,
    model: M,
    logits: impl Fn(&M, Tensor<Backend, 2, Int>, Tensor<Backend, 2, Int>) -> Vec<f32>,
) {
    let e = Expected::load();
    let ids = e.ids::<Backend>(&format!("{case}.input_ids"));
    let mask = e.ids::<Backend>(&format!("{case}.attention_mask"));
    // Causal LMs: positions of right padding are not compared (transformers numbers them on
    // past the text, Ember from the mask; no loss or generation reads them).
    let keep: Vec<bool> = flat(mask.clone().float())
        .iter()
        .map(|m| *m > 0.5 || !causal_case(case))
        .collect();
    let select = move |values: Vec<f32>| -> Vec<f32> {
        if !causal_case(case) {
            return values;
        }
        let per = values.len() / keep.len();
        values
            .chunks(per)
            .zip(&keep)
            .filter(|(_, k)| **k)
            .flat_map(|(c, _)| c.to_vec())
            .collect()
    };
    let run = |m: &M| select(logits(m, ids.clone(), mask.clone()));
    let expected = |key: &str| select(e.values(&format!("{case}.{key}")));
    let dir = fixtures().join("peft").join(case);
    let mut peft = PeftModel::from_pretrained(model, &dir, DEFAULT_ADAPTER, false).unwrap();

    let adapted = run(peft.model());
    let d = max_diff(&adapted, &expected("logits"));
    assert!(d < 1e-5, "{case}: logits differ from peft's by {d}");

    let base = peft.disable_adapter(|m| run(m));
    let d = max_diff(&base, &expected("base_logits"));
    assert!(
        d < 1e-5,
        "{case}: disabled logits differ from peft's by {d}"
    );

    peft.merge_adapter();
    let merged = run(peft.model());
    peft.unmerge_adapter();
    let d = max_diff(&merged, &adapted);
    assert!(d < 1e-5, "{case}: merged differs from unmerged by {d}");
    let d = max_diff(&run(peft.model()), &adapted);
    assert!(d < 1e-5, "{case}: unmerged again differs by {d}");

    // The counts peft prints, for the adapter loaded trainable.
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("peft/cases.json")).unwrap())
            .unwrap();
    let c = &cases["cases"][case];
    let base_model = peft.clone().unload();
    let trainable = PeftModel::from_pretrained(base_model, &dir, DEFAULT_ADAPTER, true).unwrap();
    let counts = trainable.get_nb_trainable_parameters();
    let theirs = (
        c["trainable_params"].as_u64().unwrap() as usize,
        c["all_params"].as_u64().unwrap() as usize,
    );
    assert_eq!(counts, theirs, "{case}: (trainable, all) parameters");

    // Saving writes exactly the tensors Python saved.
    let tmp = tempfile::tempdir().unwrap();
    peft.save_pretrained(tmp.path()).unwrap();
    let ours = std::fs::read(tmp.path().join("adapter_model.safetensors")).unwrap();
    let theirs = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let (ours, theirs) = (
        SafeTensors::deserialize(&ours).unwrap(),
        SafeTensors::deserialize(&theirs).unwrap(),
    );
    let mut our_keys: Vec<_> = ours.names().into_iter().map(str::to_owned).collect();
    let mut their_keys: Vec<_> = theirs.names().into_iter().map(str::to_owned).collect();
    our_keys.sort();
    their_keys.sort();
    assert_eq!(our_keys, their_keys, "{case}: saved keys");
    for k in &our_keys {
        let (a, b) = (ours.tensor(k).unwrap(), theirs.tensor(k).unwrap());
        assert_eq!(a.shape(), b.shape(), "{case}: shape of {k}");
        assert_eq!(a.data(), b.data(), "{case}: values of {k}");
    }
    // Python loads Ember's file (bitwise Python's, checked above) and must reproduce peft's own
    // logits; at real positions those equal Ember's (checked first).
    let (shape, _) = e.raw(&format!("{case}.logits"));
    let reference = e.values(&format!("{case}.logits"));
    python_loads(case, c, tmp.path(), (&ids, &mask), (&reference, shape));
}

/// Python peft loads Ember's adapter and gives the same logits (where the reference Python is).
fn python_loads(
    case: &str,
    c: &serde_json::Value,
    adapter: &Path,
    (ids, mask): (&Tensor<Backend, 2, Int>, &Tensor<Backend, 2, Int>),
    (logits, logits_shape): (&[f32], Vec<usize>),
) {
    let Some(python) = ember_testkit::reference_python() else {
        return;
    };
    let to_i64 = |t: &Tensor<Backend, 2, Int>| -> Vec<u8> {
        t.clone()
            .into_data()
            .convert::<i64>()
            .into_vec::<i64>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect()
    };
    let (ib, mb) = (to_i64(ids), to_i64(mask));
    let lb: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    let shape = ids.dims().to_vec();
    let views = vec![
        (
            "input_ids",
            safetensors::tensor::TensorView::new(safetensors::Dtype::I64, shape.clone(), &ib)
                .unwrap(),
        ),
        (
            "attention_mask",
            safetensors::tensor::TensorView::new(safetensors::Dtype::I64, shape.clone(), &mb)
                .unwrap(),
        ),
        (
            "logits",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, logits_shape, &lb)
                .unwrap(),
        ),
    ];
    let inputs = adapter.join("inputs.safetensors");
    std::fs::write(&inputs, safetensors::serialize(views, None).unwrap()).unwrap();
    let mut cmd = std::process::Command::new(python);
    cmd.arg(fixtures().join("peft/check_saved.py"))
        .arg("--base")
        .arg(fixtures().join(c["base"].as_str().unwrap()))
        .arg("--auto-class")
        .arg(c["auto_class"].as_str().unwrap())
        .arg("--adapter")
        .arg(adapter)
        .arg("--inputs")
        .arg(&inputs);
    if let Some(n) = c["num_labels"].as_u64() {
        cmd.arg("--num-labels").arg(n.to_string());
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{case}: Python peft on Ember's adapter: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn encoder_input<B: BackendTrait>(
    ids: Tensor<B, 2, Int>,
    mask: Tensor<B, 2, Int>,
) -> EncoderInput<B> {
    EncoderInput::new(ids).with_attention_mask(mask)
}

fn seq_cls(case: &str) {
    let (model, _) = BertForSequenceClassification::<Backend>::from_pretrained_with(
        fixtures().join("models/tiny-bert"),
        &dropout_off(),
        &default_device(),
    )
    .unwrap();
    check_case(case, model, |m, ids, mask| {
        flat(m.forward(encoder_input(ids, mask), None).unwrap().logits)
    });
}

fn causal<M: AdaptableModel<Backend>>(
    case: &str,
    model: M,
    forward: impl Fn(&M, CausalLmInput<Backend>) -> Tensor<Backend, 3>,
) {
    check_case(case, model, |m, ids, mask| {
        flat(forward(
            m,
            CausalLmInput::new(ids).with_attention_mask(mask),
        ))
    });
}

fn fixture_model(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

#[test]
fn bert_sequence_classifier_lora_with_its_classifier_copy() {
    seq_cls("bert-seqcls-lora");
}

#[test]
fn bert_lora_with_rslora_patterns_layers_exclusions_and_all_biases() {
    seq_cls("bert-seqcls-lora-options");
}

#[test]
fn bert_sequence_classifier_ia3() {
    seq_cls("bert-seqcls-ia3");
}

#[test]
fn roberta_token_classifier_lora_on_word_embeddings() {
    let (model, _) = BertForTokenClassification::<Backend>::from_pretrained_with(
        fixture_model("tiny-roberta"),
        &dropout_off(),
        &default_device(),
    )
    .unwrap();
    check_case("roberta-tokcls-lora-embedding", model, |m, ids, mask| {
        flat(m.forward(encoder_input(ids, mask), None).unwrap().logits)
    });
}

#[test]
fn llama_lora_with_peft_s_default_targets() {
    let m = LlamaForCausalLM::<Backend>::from_pretrained(
        fixture_model("tiny-llama-gqa"),
        &default_device(),
    )
    .unwrap();
    causal("llama-lora-default", m, |m, i| m.forward(i).unwrap().logits);
}

#[test]
fn llama_ia3() {
    let m = LlamaForCausalLM::<Backend>::from_pretrained(
        fixture_model("tiny-llama-gqa"),
        &default_device(),
    )
    .unwrap();
    causal("llama-ia3", m, |m, i| m.forward(i).unwrap().logits);
}

#[test]
fn bloom_lora_with_a_regex_target() {
    let m = BloomForCausalLM::<Backend>::from_pretrained(
        fixture_model("tiny-bloom"),
        &default_device(),
    )
    .unwrap();
    causal("bloom-lora-regex", m, |m, i| m.forward(i).unwrap().logits);
}

#[test]
fn gpt2_lora_on_conv1d() {
    let m =
        GPT2LMHeadModel::<Backend>::from_pretrained(fixture_model("tiny-gpt2"), &default_device())
            .unwrap();
    causal("gpt2-lora-conv1d", m, |m, i| m.forward(i).unwrap().logits);
}

/// One training step: the loss and every adapter gradient (LoRA A / B and the classifier
/// copy) within 1e-4 of PyTorch's.
#[test]
fn one_training_step_s_gradients_match_peft() {
    type T = TrainBackend;
    let case = "bert-seqcls-lora";
    let e = Expected::load();
    let (model, _) = BertForSequenceClassification::<T>::from_pretrained_with(
        fixture_model("tiny-bert"),
        &dropout_off(),
        &default_device(),
    )
    .unwrap();
    let peft = PeftModel::from_pretrained(
        model,
        fixtures().join("peft").join(case),
        DEFAULT_ADAPTER,
        true,
    )
    .unwrap();
    let ids = e.ids::<T>(&format!("{case}.input_ids"));
    let mask = e.ids::<T>(&format!("{case}.attention_mask"));
    let labels: Tensor<T, 1, Int> =
        Tensor::from_data(e.raw(&format!("{case}.labels")).1, &default_device());
    let out = peft
        .model()
        .forward(
            encoder_input(ids, mask),
            Some(SequenceLabels::Classes(labels)),
        )
        .unwrap();
    let loss = out.loss.unwrap();
    let d = max_diff(&flat(loss.clone()), &e.values(&format!("{case}.grad.loss")));
    assert!(d < 1e-5, "loss differs by {d}");
    let grads = GradientsParams::from_grads(loss.backward(), &peft);
    let mut checked = 0;
    for p in peft.named_parameters().into_iter().filter(|p| p.trainable) {
        // In-memory name → file key: adapter name and `modules_to_save.` dropped.
        let key = p
            .name
            .replace(".modules_to_save.default", "")
            .replace(".default", "");
        let theirs = e.values(&format!("{case}.grad.{key}"));
        let ours: Vec<f32> = match p.shape.len() {
            2 => flat(
                grads
                    .get::<<T as AutodiffBackend>::InnerBackend, 2>(p.id)
                    .unwrap_or_else(|| panic!("no gradient for {}", p.name))
                    .transpose(),
            ),
            _ => flat(
                grads
                    .get::<<T as AutodiffBackend>::InnerBackend, 1>(p.id)
                    .unwrap_or_else(|| panic!("no gradient for {}", p.name)),
            ),
        };
        let scale = theirs.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        let d = max_diff(&ours, &theirs);
        assert!(
            d <= 1e-4 * scale,
            "{key}: gradient differs by {d} (scale {scale})"
        );
        checked += 1;
    }
    assert_eq!(
        checked, 10,
        "4 LoRA pairs and the classifier copy's weight and bias"
    );
    // The frozen base gets no gradient buffer at all.
    for p in peft.named_parameters().into_iter().filter(|p| !p.trainable) {
        let none = match p.shape.len() {
            2 => grads
                .get::<<T as AutodiffBackend>::InnerBackend, 2>(p.id)
                .is_none(),
            _ => grads
                .get::<<T as AutodiffBackend>::InnerBackend, 1>(p.id)
                .is_none(),
        };
        assert!(none, "frozen {} has a gradient", p.name);
    }
}

/// `adapter_model.bin` (what older peft versions write) reads as the safetensors file does:
/// Python converts a fixture adapter with `torch.save` (where the reference Python is).
#[test]
fn adapter_model_bin_is_read_too() {
    let Some(python) = ember_testkit::reference_python() else {
        return;
    };
    let case = "bert-seqcls-lora";
    let src = fixtures().join("peft").join(case);
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        src.join("adapter_config.json"),
        tmp.path().join("adapter_config.json"),
    )
    .unwrap();
    let script = format!(
        "import torch; from safetensors.torch import load_file; torch.save(load_file({:?}), {:?})",
        src.join("adapter_model.safetensors").to_str().unwrap(),
        tmp.path().join("adapter_model.bin").to_str().unwrap()
    );
    let out = std::process::Command::new(python)
        .arg("-c")
        .arg(script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (model, _) = BertForSequenceClassification::<Backend>::from_pretrained_with(
        fixture_model("tiny-bert"),
        &dropout_off(),
        &default_device(),
    )
    .unwrap();
    let peft = PeftModel::from_pretrained(model, tmp.path(), DEFAULT_ADAPTER, false).unwrap();
    let e = Expected::load();
    let ids = e.ids::<Backend>(&format!("{case}.input_ids"));
    let mask = e.ids::<Backend>(&format!("{case}.attention_mask"));
    let logits = flat(
        peft.model()
            .forward(encoder_input(ids, mask), None)
            .unwrap()
            .logits,
    );
    let d = max_diff(&logits, &e.values(&format!("{case}.logits")));
    assert!(d < 1e-5, "logits from adapter_model.bin differ by {d}");
}
