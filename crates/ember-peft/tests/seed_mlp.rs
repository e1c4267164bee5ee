//! The seed's "several adapters" experiment on a user's own burn module: a 10 → 10 → 2 MLP
//! (`nn.Sequential(Linear, ReLU, Linear)`), LoRA on `["0"]` saved as loraA, then `["2"]` on the
//! already wrapped net saved as loraB; switching adapters switches the outputs and disabling
//! gives the base's. Expected values come from Python peft
//! (`tests/fixtures/peft/make_fixtures.py`).

use burn::backend::Flex;
use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::{activation::relu, backend::Backend, Tensor, TensorData};
use ember_peft::{
    get_peft_model, AdaptableModel, LayerVisitor, LoraConfig, PeftError, PeftModel, Projection,
    TargetModules,
};
use safetensors::SafeTensors;
use std::path::PathBuf;

type B = Flex;

/// The seed's `nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 2))`.
#[derive(Module, Debug)]
struct Mlp<B: Backend> {
    first: Projection<B>,
    last: Projection<B>,
}

impl<B: Backend> AdaptableModel<B> for Mlp<B> {
    fn visit_layers(&mut self, visitor: &mut dyn LayerVisitor<B>) {
        // `nn.Sequential` names its children by index.
        visitor.projection("0", &mut self.first);
        visitor.projection("2", &mut self.last);
    }
}

impl<B: Backend> Mlp<B> {
    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.last.forward(relu(self.first.forward(x)))
    }
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/peft")
}

/// `(shape, values)` of tensor `key` in a safetensors file.
fn read(file: &str, key: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(fixtures().join(file)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(key).unwrap();
    let values = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (t.shape().to_vec(), values)
}

fn tensor<const D: usize>(file: &str, key: &str) -> Tensor<B, D> {
    let (shape, values) = read(file, key);
    Tensor::from_data(TensorData::new(values, shape), &Default::default())
}

/// An `nn.Linear` from its PyTorch weights (`[out, in]`, transposed to burn's `[in, out]`).
fn linear(prefix: &str) -> Projection<B> {
    let weight: Tensor<B, 2> = tensor("mlp/base.safetensors", &format!("{prefix}.weight"));
    let bias: Tensor<B, 1> = tensor("mlp/base.safetensors", &format!("{prefix}.bias"));
    Projection::new(Linear {
        weight: Param::from_tensor(weight.transpose()),
        bias: Some(Param::from_tensor(bias)),
    })
}

fn net() -> Mlp<B> {
    Mlp {
        first: linear("0"),
        last: linear("2"),
    }
}

fn max_diff(a: Tensor<B, 2>, b: Tensor<B, 2>) -> f32 {
    (a - b).abs().max().into_scalar()
}

fn expected(name: &str) -> Tensor<B, 2> {
    tensor("expected.safetensors", &format!("mlp.{name}"))
}

#[test]
fn python_adapters_load_switch_and_disable() {
    let x = expected("input");
    let mut model =
        PeftModel::from_pretrained(net(), fixtures().join("mlp/loraA"), "loraA", false).unwrap();
    model
        .load_adapter(fixtures().join("mlp/loraB"), "loraB", false)
        .unwrap();
    assert_eq!(model.active_adapter(), "loraA");
    assert!(max_diff(model.model().forward(x.clone()), expected("out_loraA")) < 1e-5);

    model.set_adapter("loraB").unwrap();
    assert_eq!(model.active_adapter(), "loraB");
    assert!(max_diff(model.model().forward(x.clone()), expected("out_loraB")) < 1e-5);

    let base = model.disable_adapter(|m| m.forward(x.clone()));
    assert!(max_diff(base, expected("out_base")) < 1e-5);
    // Enabled again after the scope.
    assert!(max_diff(model.model().forward(x.clone()), expected("out_loraB")) < 1e-5);

    // peft's counts with both adapters loaded for inference: nothing trains.
    assert_eq!(model.get_nb_trainable_parameters(), (0, 388));

    let err = model.set_adapter("loraC").unwrap_err();
    assert!(matches!(err, PeftError::UnknownAdapter { .. }), "{err}");
    assert!(err.to_string().contains("loraC"));
}

#[test]
fn the_seed_s_two_adapters_are_saved_as_peft_saves_them() {
    let tmp = tempfile::tempdir().unwrap();
    let mut model = get_peft_model(net(), LoraConfig::new(TargetModules::names(["0"]))).unwrap();
    // r 8 on a 10 → 10 layer: 80 + 80 trainable of 292.
    assert_eq!(model.get_nb_trainable_parameters(), (160, 292));
    assert_eq!(
        model.trainable_parameters_line(),
        "trainable params: 160 || all params: 292 || trainable%: 54.7945"
    );
    model
        .add_adapter("loraB", LoraConfig::new(TargetModules::names(["2"])))
        .unwrap();
    model.save_pretrained(tmp.path()).unwrap();

    let keys = |dir: PathBuf| -> Vec<String> {
        let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
        let mut k: Vec<String> = SafeTensors::deserialize(&bytes)
            .unwrap()
            .names()
            .into_iter()
            .map(str::to_owned)
            .collect();
        k.sort();
        k
    };
    assert_eq!(
        keys(tmp.path().to_owned()),
        [
            "base_model.model.0.lora_A.weight",
            "base_model.model.0.lora_B.weight"
        ]
    );
    // loraB's file holds only layer 2, under `<dir>/loraB/`, as peft writes it.
    assert_eq!(
        keys(tmp.path().join("loraB")),
        [
            "base_model.model.2.lora_A.weight",
            "base_model.model.2.lora_B.weight"
        ]
    );
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("loraB/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["target_modules"], serde_json::json!(["2"]));
    assert_eq!(config["inference_mode"], true);

    // Fresh LoRA is the identity (B is zero), whichever adapter is active.
    let x = expected("input");
    assert!(max_diff(model.model().forward(x.clone()), expected("out_base")) < 1e-6);

    // Read back: the same tensors.
    let mut back = PeftModel::from_pretrained(net(), tmp.path(), "default", false).unwrap();
    back.load_adapter(tmp.path().join("loraB"), "loraB", false)
        .unwrap();
    assert_eq!(
        back.adapter_state_dict("loraB"),
        model.adapter_state_dict("loraB")
    );
}

#[test]
fn bad_configs_and_files_are_typed_errors() {
    let err = get_peft_model(net(), LoraConfig::new(TargetModules::names(["7"])))
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "Target modules {'7'} not found in the base model. Please check the target modules and try again."
    );
    let mut zero = LoraConfig::new(TargetModules::names(["0"]));
    zero.r = 0;
    assert!(get_peft_model(net(), zero)
        .unwrap_err()
        .to_string()
        .contains("`r` should be a positive integer"));
    let mut save = LoraConfig::new(TargetModules::names(["0"]));
    save.modules_to_save = Some(vec!["head".into()]);
    let err = get_peft_model(net(), save).unwrap_err().to_string();
    assert!(
        err.contains("modules_to_save") && err.contains("`head`"),
        "{err}"
    );

    let tmp = tempfile::tempdir().unwrap();
    let err = PeftModel::from_pretrained(net(), tmp.path(), "default", false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("adapter_config.json"), "{err}");

    // loraA's layer-0 tensors on a net whose first layer is 10 → 4: key and both shapes.
    let mut narrow = net();
    narrow.first = Projection::new(burn::nn::LinearConfig::new(10, 4).init(&Default::default()));
    let err = PeftModel::from_pretrained(narrow, fixtures().join("mlp/loraA"), "a", false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("base_model.model.0.lora_B.weight")
            && err.contains("[10, 8]")
            && err.contains("[4, 8]"),
        "{err}"
    );
}
