//! Prompt tuning, P-tuning (MLP and LSTM) and prefix tuning against Python peft 0.21
//! (`tests/fixtures/peft/make_prompt_fixtures.py`) on the tiny Llama, BLOOM, GPT-2 and BERT:
//! adapters Python saved give peft's logits in Ember; one training step's gradients match
//! PyTorch's (the whole encoder restored from the fixture, as a Trainer checkpoint restores
//! it); greedy decoding matches; Ember's saved adapters hold Python's tensors and load back in
//! Python; bad configurations are typed errors.

use ember::burn::optim::GradientsParams;
use ember::burn::tensor::{backend::AutodiffBackend, TensorData};
use ember::models::generation::{generate, GenerateOptions, GenerationConfig, Prompt};
use ember::models::{
    AnyCausalLm, AutoModelForCausalLM, BertForSequenceClassification, BertForTokenClassification,
    CausalLmInput, EncoderInput, FromPretrainedOptions, SequenceLabels,
};
use ember::peft::{PeftConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, DEFAULT_ADAPTER};
use ember::prelude::*;
use safetensors::SafeTensors;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn cases() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("peft/prompt-cases.json")).unwrap();
    serde_json::from_str::<serde_json::Value>(&text).unwrap()["cases"].clone()
}

struct Expected(Vec<u8>);

impl Expected {
    fn load() -> Self {
        Self(std::fs::read(fixtures().join("peft/prompt-expected.safetensors")).unwrap())
    }

    fn raw(&self, key: &str) -> Option<(Vec<usize>, TensorData)> {
        let st = SafeTensors::deserialize(&self.0).unwrap();
        let t = st.tensor(key).ok()?;
        let shape = t.shape().to_vec();
        Some(match t.dtype() {
            safetensors::Dtype::I64 => (
                shape.clone(),
                TensorData::new(
                    t.data()
                        .chunks_exact(8)
                        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                        .collect::<Vec<_>>(),
                    shape,
                ),
            ),
            _ => (
                shape.clone(),
                TensorData::new(
                    t.data()
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                        .collect::<Vec<_>>(),
                    shape,
                ),
            ),
        })
    }

    fn values(&self, key: &str) -> Vec<f32> {
        self.raw(key)
            .unwrap_or_else(|| panic!("no `{key}` in prompt-expected.safetensors"))
            .1
            .convert::<f32>()
            .into_vec()
            .unwrap()
    }

    fn ints<B: BackendTrait, const D: usize>(&self, key: &str) -> Tensor<B, D, Int> {
        Tensor::from_data(self.raw(key).unwrap().1, &Default::default())
    }

    /// Every tensor under `prefix`, keyed by the rest of its name, in the file's layout.
    fn under(&self, prefix: &str) -> ember::peft::io::AdapterTensors {
        let st = SafeTensors::deserialize(&self.0).unwrap();
        st.names()
            .into_iter()
            .filter_map(|k| k.strip_prefix(prefix).map(|rest| (k, rest.to_owned())))
            .map(|(k, rest)| {
                let (shape, data) = self.raw(k).unwrap();
                (rest, (shape, data.convert::<f32>().into_vec().unwrap()))
            })
            .collect()
    }
}

fn flat<B: BackendTrait, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap()
}

fn max_diff(ours: &[f32], theirs: &[f32]) -> f32 {
    assert_eq!(ours.len(), theirs.len());
    ours.iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

fn dropout_off() -> FromPretrainedOptions {
    [
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "classifier_dropout",
        "attention_dropout",
        "hidden_dropout",
        "attn_pdrop",
        "embd_pdrop",
        "resid_pdrop",
        "summary_first_dropout",
    ]
    .into_iter()
    .fold(FromPretrainedOptions::default(), |o, k| o.set(k, 0.0))
}

/// The base model of a case, by its Auto class.
#[allow(clippy::large_enum_variant)] // one value per case, moved once
enum Base<B: BackendTrait> {
    Causal(AnyCausalLm<B>),
    Sequence(BertForSequenceClassification<B>),
    Token(BertForTokenClassification<B>),
}

fn base<B: BackendTrait>(case: &serde_json::Value) -> Base<B> {
    let dir = fixtures().join(case["base"].as_str().unwrap());
    let device = Default::default();
    match case["auto_class"].as_str().unwrap() {
        "AutoModelForCausalLM" => Base::Causal(
            AutoModelForCausalLM::from_pretrained_with(&dir, &dropout_off(), &device)
                .unwrap()
                .0,
        ),
        "AutoModelForSequenceClassification" => Base::Sequence(
            BertForSequenceClassification::from_pretrained_with(&dir, &dropout_off(), &device)
                .unwrap()
                .0,
        ),
        "AutoModelForTokenClassification" => Base::Token(
            BertForTokenClassification::from_pretrained_with(&dir, &dropout_off(), &device)
                .unwrap()
                .0,
        ),
        other => panic!("no Auto class {other}"),
    }
}

/// Runs `$body` with `$m` the case's base model of the matching type, and `$logits` a function
/// from `(model, ids, mask, labels)` to `(logits, loss)`.
macro_rules! with_base {
    ($base:expr, |$m:ident, $run:ident| $body:expr) => {
        match $base {
            Base::Causal($m) => {
                let $run = run_causal;
                $body
            }
            Base::Sequence($m) => {
                let $run = run_sequence;
                $body
            }
            Base::Token($m) => {
                let $run = run_token;
                $body
            }
        }
    };
}

type RunOutput<B> = (Vec<f32>, Option<Tensor<B, 1>>);

fn run_causal<B: BackendTrait>(
    m: &AnyCausalLm<B>,
    ids: Tensor<B, 2, Int>,
    mask: Tensor<B, 2, Int>,
    labels: Option<Tensor<B, 2, Int>>,
) -> RunOutput<B> {
    let mut input = CausalLmInput::new(ids).with_attention_mask(mask);
    if let Some(l) = labels {
        input = input.with_labels(l);
    }
    let out = ember::models::CausalLm::forward(m, input).unwrap();
    (flat(out.logits), out.loss)
}

fn encoder_input<B: BackendTrait>(
    ids: Tensor<B, 2, Int>,
    mask: Tensor<B, 2, Int>,
) -> EncoderInput<B> {
    let types = Tensor::zeros(ids.dims(), &ids.device());
    EncoderInput::new(ids)
        .with_attention_mask(mask)
        .with_token_type_ids(types)
}

fn run_sequence<B: BackendTrait>(
    m: &BertForSequenceClassification<B>,
    ids: Tensor<B, 2, Int>,
    mask: Tensor<B, 2, Int>,
    labels: Option<Tensor<B, 2, Int>>,
) -> RunOutput<B> {
    let labels = labels.map(|l| SequenceLabels::Classes(l.reshape([-1])));
    let out = m.forward(encoder_input(ids, mask), labels).unwrap();
    (flat(out.logits), out.loss)
}

fn run_token<B: BackendTrait>(
    m: &BertForTokenClassification<B>,
    ids: Tensor<B, 2, Int>,
    mask: Tensor<B, 2, Int>,
    labels: Option<Tensor<B, 2, Int>>,
) -> RunOutput<B> {
    let out = m.forward(encoder_input(ids, mask), labels).unwrap();
    (flat(out.logits), out.loss)
}

/// Python's adapters give peft's logits; saved again by Ember they hold the same tensors and
/// config, and load back in Python with Ember's logits.
#[test]
fn every_case_gives_peft_s_logits_and_saves_what_peft_saved() {
    let e = Expected::load();
    let tmp = tempfile::tempdir().unwrap();
    for (name, case) in cases().as_object().unwrap() {
        let dir = fixtures().join("peft/prompt").join(name);
        let ids = e.ints::<Backend, 2>(&format!("{name}.input_ids"));
        let mask = e.ints::<Backend, 2>(&format!("{name}.attention_mask"));
        let theirs = e.values(&format!("{name}.logits"));
        let out = tmp.path().join(name);
        let ours = with_base!(base::<Backend>(case), |m, run| {
            let peft = PeftModel::from_pretrained(m, &dir, DEFAULT_ADAPTER, false).unwrap();
            let (logits, _) = run(peft.model(), ids.clone(), mask.clone(), None);
            assert_eq!(
                peft.get_nb_trainable_parameters().0,
                0,
                "{name}: loaded for inference"
            );
            peft.save_pretrained(&out).unwrap();
            logits
        });
        // Causal LMs: right-padded positions are not compared (transformers numbers them on
        // past the text, Ember from the mask; no loss or generation reads them).
        let keep = kept_positions(case, &e, name);
        let d = max_diff(&keep(&ours), &keep(&theirs));
        assert!(d < 1e-5, "{name}: logits differ by {d}");

        // The saved adapter: peft's keys, shapes and values; the config peft wrote.
        let python = ember::peft::io::read_tensors(&dir.join("adapter_model.safetensors")).unwrap();
        let ember_saved =
            ember::peft::io::read_tensors(&out.join("adapter_model.safetensors")).unwrap();
        assert_eq!(
            python.keys().collect::<Vec<_>>(),
            ember_saved.keys().collect::<Vec<_>>(),
            "{name}: saved keys"
        );
        for (k, (shape, values)) in &python {
            assert_eq!(&ember_saved[k].0, shape, "{name}: {k}");
            assert!(
                max_diff(&ember_saved[k].1, values) < 1e-6,
                "{name}: {k} values"
            );
        }
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            config, case["adapter_config"],
            "{name}: adapter_config.json"
        );
        python_loads(name, case, &out, &e, &ours);
    }
}

/// The logits of the positions a causal case compares: every virtual position and every
/// real token (the mask extended by the virtual tokens when the logits cover them).
fn kept_positions(
    case: &serde_json::Value,
    e: &Expected,
    name: &str,
) -> impl Fn(&[f32]) -> Vec<f32> {
    let causal = case["auto_class"] == "AutoModelForCausalLM";
    let mask = e.values(&format!("{name}.attention_mask"));
    let (shape, _) = e.raw(&format!("{name}.logits")).unwrap();
    let [batch, seq] = [shape[0], mask.len() / shape[0]];
    let positions = if shape.len() == 3 { shape[1] } else { 1 };
    let virtual_len = positions.saturating_sub(seq);
    let keep: Vec<bool> = (0..batch)
        .flat_map(|b| {
            let mask = &mask;
            (0..positions)
                .map(move |p| !causal || p < virtual_len || mask[b * seq + p - virtual_len] > 0.5)
        })
        .collect();
    move |values: &[f32]| {
        let per = values.len() / keep.len();
        values
            .chunks(per)
            .zip(&keep)
            .filter(|(_, k)| **k)
            .flat_map(|(c, _)| c.to_vec())
            .collect()
    }
}

/// Where the reference Python is present, it loads Ember's adapter and gives Ember's logits.
fn python_loads(
    name: &str,
    case: &serde_json::Value,
    adapter: &Path,
    e: &Expected,
    logits: &[f32],
) {
    let Some(python) = ember_testkit::reference_python() else {
        return;
    };
    let i64_bytes = |key: &str| -> (Vec<usize>, Vec<u8>) {
        let (shape, data) = e.raw(&format!("{name}.{key}")).unwrap();
        let bytes = data
            .convert::<i64>()
            .into_vec::<i64>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        (shape, bytes)
    };
    let (ids_shape, ids) = i64_bytes("input_ids");
    let (_, mask) = i64_bytes("attention_mask");
    let logits_shape = e.raw(&format!("{name}.logits")).unwrap().0;
    let lb: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    fn view(
        dtype: safetensors::Dtype,
        shape: Vec<usize>,
        data: &[u8],
    ) -> safetensors::tensor::TensorView<'_> {
        safetensors::tensor::TensorView::new(dtype, shape, data).unwrap()
    }
    let views = vec![
        (
            "input_ids",
            view(safetensors::Dtype::I64, ids_shape.clone(), &ids),
        ),
        (
            "attention_mask",
            view(safetensors::Dtype::I64, ids_shape, &mask),
        ),
        ("logits", view(safetensors::Dtype::F32, logits_shape, &lb)),
    ];
    let inputs = adapter.join("inputs.safetensors");
    std::fs::write(&inputs, safetensors::serialize(views, None).unwrap()).unwrap();
    let mut cmd = std::process::Command::new(python);
    cmd.arg(fixtures().join("peft/check_saved_prompt.py"))
        .arg("--base")
        .arg(fixtures().join(case["base"].as_str().unwrap()))
        .arg("--auto-class")
        .arg(case["auto_class"].as_str().unwrap())
        .arg("--adapter")
        .arg(adapter)
        .arg("--inputs")
        .arg(&inputs);
    if let Some(n) = case["num_labels"].as_u64() {
        cmd.arg("--num-labels").arg(n.to_string());
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{name}: Python peft on Ember's adapter: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One training step per case, the whole encoder (MLP, LSTM, projection) restored from the
/// fixture through the Trainer's resume path: the loss and every trainable gradient within
/// 1e-4 of PyTorch's; the frozen base gets none.
#[test]
fn one_training_step_s_gradients_match_peft() {
    type T = TrainBackend;
    type I = <T as AutodiffBackend>::InnerBackend;
    let e = Expected::load();
    let tmp = tempfile::tempdir().unwrap();
    for (name, case) in cases().as_object().unwrap() {
        let dir = fixtures().join("peft/prompt").join(name);
        // A checkpoint as Ember's Trainer writes it: peft's files plus the whole encoder.
        let ckpt = tmp.path().join(name);
        std::fs::create_dir_all(&ckpt).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(dir.join(f), ckpt.join(f)).unwrap();
        }
        let encoder = e.under(&format!("{name}.encoder."));
        ember::peft::io::write_safetensors(&ckpt.join("prompt_encoder.safetensors"), &encoder)
            .unwrap();
        let mut config = PeftConfig::from_pretrained(&dir).unwrap().to_value();
        config["inference_mode"] = false.into();
        let config = PeftConfig::from_value(config).unwrap();

        let ids = e.ints::<T, 2>(&format!("{name}.input_ids"));
        let mask = e.ints::<T, 2>(&format!("{name}.attention_mask"));
        let labels: Tensor<T, 2, Int> = match e.raw(&format!("{name}.labels")).unwrap().0.len() {
            1 => e.ints::<T, 1>(&format!("{name}.labels")).unsqueeze_dim(1),
            _ => e.ints::<T, 2>(&format!("{name}.labels")),
        };
        with_base!(base::<T>(case), |m, run| {
            let mut peft = PeftModel::new(m, config.clone(), DEFAULT_ADAPTER).unwrap();
            let counts = (
                case["trainable_params"].as_u64().unwrap() as usize,
                case["all_params"].as_u64().unwrap() as usize,
            );
            assert_eq!(
                peft.get_nb_trainable_parameters(),
                counts,
                "{name}: peft's parameter counts"
            );
            peft.load_adapter_weights(&ckpt).unwrap();
            let (_, loss) = run(
                peft.model(),
                ids.clone(),
                mask.clone(),
                Some(labels.clone()),
            );
            let loss = loss.unwrap();
            let d = max_diff(&flat(loss.clone()), &e.values(&format!("{name}.grad.loss")));
            assert!(d < 1e-5, "{name}: loss differs by {d}");
            let grads = GradientsParams::from_grads(loss.backward(), &peft);
            let mut checked = 0;
            for p in peft.named_parameters() {
                let key = format!("{name}.grad.{}", p.name);
                let Some(_) = e.raw(&key) else {
                    assert!(
                        !p.trainable,
                        "{name}: {} trains but PyTorch has no gradient",
                        p.name
                    );
                    continue;
                };
                assert!(p.trainable, "{name}: {} should train", p.name);
                // The encoder keeps PyTorch's layouts; burn's Linear is [in, out].
                let torch_layout = p.name.starts_with("prompt_encoder.");
                let ours = match p.shape.len() {
                    2 => {
                        let g = grads
                            .get::<I, 2>(p.id)
                            .unwrap_or_else(|| panic!("no gradient for {}", p.name));
                        flat(if torch_layout { g } else { g.transpose() })
                    }
                    _ => flat(
                        grads
                            .get::<I, 1>(p.id)
                            .unwrap_or_else(|| panic!("no gradient for {}", p.name)),
                    ),
                };
                let theirs = e.values(&key);
                let scale = theirs.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
                let d = max_diff(&ours, &theirs);
                assert!(
                    d <= 1e-4 * scale,
                    "{name}: {} gradient differs by {d} (scale {scale})",
                    p.name
                );
                checked += 1;
            }
            assert!(checked > 0, "{name}: no gradient compared");
        });
    }
}

/// Greedy decoding with the virtual tokens (or prefix) entered once at prefill and kept in the
/// cache gives the reference's tokens (the full-forward greedy loop of the fixture script:
/// peft 0.21.2's own `generate` mishandles the cache under transformers 5.24).
#[test]
fn greedy_generation_keeps_the_prompt_through_decoding() {
    let e = Expected::load();
    for (name, case) in cases().as_object().unwrap() {
        let Base::Causal(m) = base::<Backend>(case) else {
            continue;
        };
        let dir = fixtures().join("peft/prompt").join(name);
        let peft = PeftModel::from_pretrained(m, &dir, DEFAULT_ADAPTER, false).unwrap();
        let prompt: Vec<u32> = flat(
            e.ints::<Backend, 2>(&format!("{name}.gen_input_ids"))
                .float(),
        )
        .iter()
        .map(|&v| v as u32)
        .collect();
        let expected: Vec<u32> = flat(e.ints::<Backend, 2>(&format!("{name}.generated")).float())
            .iter()
            .map(|&v| v as u32)
            .collect();
        let config = GenerationConfig {
            eos_token_id: None,
            ..GenerationConfig::greedy(expected.len() - prompt.len())
        };
        let out = generate(
            peft.model(),
            &Prompt::single(prompt.clone()),
            &config,
            GenerateOptions::default(),
            &Default::default(),
        )
        .unwrap();
        assert_eq!(
            out.new_tokens[0],
            expected[prompt.len()..].to_vec(),
            "{name}: greedy tokens"
        );
    }
}

fn tiny_llama() -> AnyCausalLm<Backend> {
    AutoModelForCausalLM::from_pretrained(
        fixtures().join("models/tiny-llama-gqa"),
        &Default::default(),
    )
    .unwrap()
}

/// Bad configurations and adapters that do not fit the model are typed errors naming the
/// field or tensor, and leave the model as it was.
#[test]
fn bad_prompt_configs_are_named_errors() {
    let err = |c: PeftConfig| {
        PeftModel::new(tiny_llama(), c, DEFAULT_ADAPTER)
            .unwrap_err()
            .to_string()
    };
    assert!(err(PromptTuningConfig::new(0).into()).contains("num_virtual_tokens"));
    let mut text = PromptTuningConfig::new(4);
    text.prompt_tuning_init = ember::peft::PromptTuningInit::Text;
    assert!(err(text.clone().into()).contains("tokenizer_name_or_path"));
    text.tokenizer_name_or_path = Some(
        fixtures()
            .join("tokenizers/chat-tiny")
            .display()
            .to_string(),
    );
    assert!(err(text.into()).contains("prompt_tuning_init_text"));
    let mut seq = PrefixTuningConfig::new(3);
    seq.prompt.task_type = Some(ember::peft::TaskType::SeqCls);
    assert!(
        err(seq.into()).contains("task_type"),
        "{}",
        err(PrefixTuningConfig::new(3).into())
    );
    let mut wide = PromptTuningConfig::new(3);
    wide.prompt.token_dim = Some(48);
    assert!(err(wide.into()).contains("token_dim"));

    // A prefix made for another model: the tensor and both shapes named.
    let bloom = AutoModelForCausalLM::from_pretrained::<Backend>(
        fixtures().join("models/tiny-bloom"),
        &Default::default(),
    )
    .unwrap();
    let e = PeftModel::from_pretrained(
        bloom.clone(),
        fixtures().join("peft/prompt/llama-prefix"),
        DEFAULT_ADAPTER,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("num_attention_heads") && e.contains("the prefix has 2"),
        "{e}"
    );
    // A file whose tensor does not fit its config: the key and both shapes named.
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures().join("peft/prompt/bloom-prefix");
    std::fs::copy(
        src.join("adapter_config.json"),
        tmp.path().join("adapter_config.json"),
    )
    .unwrap();
    let mut tensors =
        ember::peft::io::read_tensors(&src.join("adapter_model.safetensors")).unwrap();
    tensors.get_mut("prompt_embeddings").unwrap().0 = vec![6, 64];
    ember::peft::io::write_weights(tmp.path(), &tensors).unwrap();
    let e = PeftModel::from_pretrained(bloom, tmp.path(), DEFAULT_ADAPTER, false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("prompt_embeddings") && e.contains("[6, 64]") && e.contains("[3, 128]"),
        "{e}"
    );

    // Prompt learning and LoRA do not mix (peft: different peft types).
    let mut peft =
        PeftModel::new(tiny_llama(), PromptTuningConfig::new(2), DEFAULT_ADAPTER).unwrap();
    let e = peft
        .add_adapter("lora", ember::peft::LoraConfig::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("Cannot combine adapters"), "{e}");
    assert_eq!(peft.adapter_names(), vec![DEFAULT_ADAPTER.to_owned()]);
}

/// TEXT init: the virtual tokens start as the embeddings of the init text's tokens (special
/// tokens included, as `tokenizer(text)` gives them), repeated to the number of virtual
/// tokens; a tokenizer whose ids do not fit the model is a named error.
#[test]
fn text_init_copies_the_text_s_token_embeddings() {
    let tokenizer_dir = fixtures().join("tokenizers/chat-tiny");
    let tokenizer = ember::tokenizers::AutoTokenizer::from_pretrained(&tokenizer_dir).unwrap();
    let text = "hello there";
    let ids = tokenizer.encode(text, None, true).unwrap();
    let config = |v: usize| {
        let mut c = PromptTuningConfig::new(v);
        c.prompt_tuning_init = ember::peft::PromptTuningInit::Text;
        c.prompt_tuning_init_text = Some(text.into());
        c.tokenizer_name_or_path = Some(tokenizer_dir.display().to_string());
        c
    };
    // The tiny model's 96-token vocabulary is smaller than the tokenizer's.
    let e = PeftModel::new(tiny_llama(), config(5), DEFAULT_ADAPTER)
        .unwrap_err()
        .to_string();
    assert!(e.contains("outside the model's vocabulary"), "{e}");

    let mut json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("models/tiny-llama-gqa/config.json")).unwrap(),
    )
    .unwrap();
    json["vocab_size"] = 512.into();
    let model = AutoModelForCausalLM::from_config::<Backend>(&json, &Default::default()).unwrap();
    let AnyCausalLm::Llama(llama) = &model else {
        panic!("a Llama")
    };
    let table = flat(llama.model.embed_tokens.base.weight.val());
    for v in [2, ids.len() + 3] {
        let peft = PeftModel::new(model.clone(), config(v), DEFAULT_ADAPTER).unwrap();
        let saved = peft.adapter_state_dict(DEFAULT_ADAPTER);
        let (shape, values) = &saved["prompt_embeddings"];
        assert_eq!(shape, &vec![v, 32]);
        for (row, id) in ids.iter().cycle().take(v).enumerate() {
            let id = *id as usize;
            assert_eq!(
                values[row * 32..(row + 1) * 32],
                table[id * 32..(id + 1) * 32],
                "row {row}"
            );
        }
    }
}
