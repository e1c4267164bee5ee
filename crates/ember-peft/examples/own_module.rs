//! LoRA on your own burn module: hold `Projection` layers, list them by name, and
//! `get_peft_model` adds, saves and switches adapters as Python peft does.
//!
//! `cargo run -p ember-peft --example own_module`

use burn::backend::Flex;
use burn::module::Module;
use burn::nn::LinearConfig;
use burn::tensor::{activation::relu, backend::Backend, Distribution, Tensor};
use ember_peft::{
    get_peft_model, AdaptableModel, LayerVisitor, LoraConfig, Projection, TargetModules,
};

/// `nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 2))`.
#[derive(Module, Debug)]
struct Mlp<B: Backend> {
    first: Projection<B>,
    last: Projection<B>,
}

impl<B: Backend> AdaptableModel<B> for Mlp<B> {
    fn visit_layers(&mut self, visitor: &mut dyn LayerVisitor<B>) {
        visitor.projection("0", &mut self.first);
        visitor.projection("2", &mut self.last);
    }
}

impl<B: Backend> Mlp<B> {
    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.last.forward(relu(self.first.forward(x)))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = Default::default();
    let net = Mlp::<Flex> {
        first: Projection::new(LinearConfig::new(10, 10).init(&device)),
        last: Projection::new(LinearConfig::new(10, 2).init(&device)),
    };
    let mut model = get_peft_model(net, LoraConfig::new(TargetModules::names(["0"])))?;
    model.print_trainable_parameters();
    model.add_adapter("loraB", LoraConfig::new(TargetModules::names(["2"])))?;
    let dir = std::env::temp_dir().join("ember-peft-own-module");
    model.save_pretrained(&dir)?;
    println!(
        "saved `default` in {} and `loraB` in {}",
        dir.display(),
        dir.join("loraB").display()
    );

    let x = Tensor::<Flex, 2>::random([4, 10], Distribution::Normal(0.0, 1.0), &device);
    let with_default = model.model().forward(x.clone());
    model.set_adapter("loraB")?;
    let with_b = model.model().forward(x.clone());
    let base = model.disable_adapter(|m| m.forward(x));
    // Fresh LoRA starts as the identity (B = 0): all three agree until trained.
    println!(
        "max |default - base| = {}",
        (with_default - base.clone()).abs().max().into_scalar()
    );
    println!(
        "max |loraB - base|   = {}",
        (with_b - base).abs().max().into_scalar()
    );
    Ok(())
}
