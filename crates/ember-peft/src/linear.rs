//! [`Projection`]: every linear layer of Ember's models (HF `nn.Linear` and GPT-2's `Conv1D`):
//! a dense base plus named adapters, as peft's `LoraLayer` / `IA3Layer` wrap a base layer.
//!
//! With no adapter, or adapters disabled or merged, the forward pass is the base layer's own
//! fused GEMM ([`ember_kernels::linear`]); an unmerged LoRA adds two thin products.

use crate::adapter::{find, kaiming_bound, AdapterState, Named};
use crate::error::Result;
use crate::quantized::{empty_weight, QuantizedBase};
use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, Linear};
use burn::tensor::{backend::Backend, Distribution, Tensor};

/// A LoRA update `x · A · B · scaling` of a linear layer.
#[derive(Module, Debug)]
pub struct LoraLinear<B: Backend> {
    /// `lora_A`, `[d_in, r]` (burn's layout; peft's `lora_A.weight` is `[r, d_in]`).
    pub lora_a: Param<Tensor<B, 2>>,
    /// `lora_B`, `[r, d_out]` (peft's `lora_B.weight` is `[d_out, r]`).
    pub lora_b: Param<Tensor<B, 2>>,
    /// `lora_alpha / r` (or `/ sqrt(r)` with rsLoRA).
    pub scaling: f64,
    /// `lora_dropout`, on the adapter's input only.
    pub dropout: Dropout,
}

/// How LoRA's A and B start (`init_lora_weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraInit {
    /// A Kaiming-uniform, B zeros (`true`): the adapter starts as a no-op.
    Default,
    /// A normal with std `1 / r`, B zeros (`"gaussian"`).
    Gaussian,
    /// Both as `nn.Linear` initialises them (`false`): the adapter changes the output at once.
    Random,
}

impl<B: Backend> LoraLinear<B> {
    /// A rank-`r` update for a `[d_in → d_out]` layer.
    pub fn new(
        d_in: usize,
        d_out: usize,
        r: usize,
        scaling: f64,
        dropout: f64,
        init: LoraInit,
        device: &B::Device,
    ) -> Self {
        let uniform = |fan_in: usize| {
            let b = kaiming_bound(fan_in);
            Distribution::Uniform(-b, b)
        };
        let a = match init {
            LoraInit::Gaussian => Distribution::Normal(0.0, 1.0 / r as f64),
            LoraInit::Default | LoraInit::Random => uniform(d_in),
        };
        let lora_b = match init {
            LoraInit::Random => Tensor::random([r, d_out], uniform(r), device),
            _ => Tensor::zeros([r, d_out], device),
        };
        Self {
            lora_a: Param::from_tensor(Tensor::random([d_in, r], a, device)),
            lora_b: Param::from_tensor(lora_b),
            scaling,
            dropout: DropoutConfig::new(dropout).init(),
        }
    }

    /// The rank.
    pub fn rank(&self) -> usize {
        self.lora_a.lazy_shape().dims::<2>()[1]
    }

    /// `dropout(x) · A · B · scaling` for rows `x: [n, d_in]`.
    pub fn forward_rows(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let x = if self.dropout.prob > 0.0 {
            self.dropout.forward(x)
        } else {
            x
        };
        // Scaling the `[n, r]` intermediate costs r / d_out of scaling the output.
        let h = dense(&x, &self.lora_a.val(), None) * self.scaling;
        dense(&h, &self.lora_b.val(), None)
    }

    /// The update as a weight, `A · B · scaling`, `[d_in, d_out]`.
    pub fn delta_weight(&self) -> Tensor<B, 2> {
        self.lora_a.val().matmul(self.lora_b.val()) * self.scaling
    }
}

/// An IA3 vector: scales the layer's input (feed-forward modules) or its output.
#[derive(Module, Debug)]
pub struct Ia3Vector<B: Backend> {
    /// `ia3_l`: `[d_in]` when `feedforward`, else `[d_out]` (peft stores `[1, d_in]` /
    /// `[d_out, 1]`).
    pub ia3_l: Param<Tensor<B, 1>>,
    /// Whether the input (true) or the output (false) is scaled.
    pub feedforward: bool,
}

/// One named adapter of a [`Projection`]: LoRA, IA3, or a full trained copy of the layer
/// (`modules_to_save`).
#[derive(Module, Debug)]
pub struct ProjectionAdapter<B: Backend> {
    /// The adapter's name (`default`, ...).
    pub name: String,
    /// A LoRA update.
    pub lora: Option<LoraLinear<B>>,
    /// An IA3 vector.
    pub ia3: Option<Ia3Vector<B>>,
    /// A trained copy that replaces the layer while this adapter is active.
    pub copy: Option<Linear<B>>,
}

impl<B: Backend> Named for ProjectionAdapter<B> {
    fn name(&self) -> &str {
        &self.name
    }
}

impl<B: Backend> ProjectionAdapter<B> {
    /// An adapter with nothing in it yet.
    pub fn empty(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            lora: None,
            ia3: None,
            copy: None,
        }
    }
}

/// A linear layer (`y = x · W + b`, `W` stored `[d_in, d_out]`) with named adapters.
#[derive(Module, Debug)]
pub struct Projection<B: Backend> {
    /// The pretrained layer (frozen once adapters are added). A quantized layer keeps only its
    /// bias here, its weight an empty stand-in (see [`Projection::quantized`]).
    pub base: Linear<B>,
    /// The packed weight of a quantized layer (bitsandbytes 4-bit or LLM.int8), which then
    /// replaces `base.weight` in every product: QLoRA when adapters sit beside it.
    #[module(skip)]
    pub quantized: Option<QuantizedBase>,
    /// The adapters, in the order they were added.
    pub adapters: Vec<ProjectionAdapter<B>>,
    /// Which adapters are active, merged, or all disabled.
    pub state: AdapterState,
    /// The checkpoint stores the weight `[d_in, d_out]` (GPT-2's `Conv1D`) rather than
    /// `nn.Linear`'s `[d_out, d_in]`.
    pub conv1d: bool,
}

/// `x · w + b` for rows `x`, through the fused kernel where it applies; in half precision
/// inside an [`ember_kernels::autocast`] region.
pub(crate) fn dense<B: Backend>(
    x: &Tensor<B, 2>,
    w: &Tensor<B, 2>,
    b: Option<&Tensor<B, 1>>,
) -> Tensor<B, 2> {
    if ember_kernels::autocast_dtype().is_some() {
        // torch.autocast: `addmm` in half precision, its three operands rounded to the half
        // dtype, its f32-accumulated result rounded again. In bf16 on a CPU with bf16 dot
        // products, one fused operation does all of that.
        let w32 = ember_kernels::float32(w.clone());
        let b32 = b.map(|b| ember_kernels::float32(b.clone()));
        if let Some(y) = ember_kernels::autocast_linear(x, &w32, b32.as_ref()) {
            return y;
        }
        let round = |t: Tensor<B, 2>| ember_kernels::autocast_round(ember_kernels::float32(t));
        let b = b.map(|b| ember_kernels::autocast_round(ember_kernels::float32(b.clone())));
        let y = dense_f32(&round(x.clone()), &round(w.clone()), b.as_ref());
        return ember_kernels::autocast_round(y);
    }
    dense_f32(x, w, b)
}

/// [`dense`] without autocast.
fn dense_f32<B: Backend>(
    x: &Tensor<B, 2>,
    w: &Tensor<B, 2>,
    b: Option<&Tensor<B, 1>>,
) -> Tensor<B, 2> {
    // A half-precision model's parameters compute in float32: the kernel reads a half weight
    // itself; burn's path below gets it widened.
    let b = b.map(|b| ember_kernels::float32(b.clone()));
    let b = b.as_ref();
    ember_kernels::linear(x, w, b).unwrap_or_else(|| {
        let y = x.clone().matmul(ember_kernels::float32(w.clone()));
        match b {
            Some(b) => y + b.clone().unsqueeze_dim(0),
            None => y,
        }
    })
}

/// `layer(x)` for inputs of any rank (`[..., d_in]`), as one 2-D GEMM over all leading
/// positions (burn's 3-D path broadcasts the weight into a batched GEMM, 1.3-2x slower on the
/// CPU).
pub fn linear_forward<B: Backend, const D: usize>(
    layer: &Linear<B>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    let weight = layer.weight.val();
    let bias = layer.bias.as_ref().map(|b| b.val());
    on_rows(x, weight.dims()[1], |rows| {
        dense(&rows, &weight, bias.as_ref())
    })
}

/// Runs `f` on `x` flattened to rows `[n, d_in]` and gives its `[n, d_out]` result `x`'s
/// leading shape back.
fn on_rows<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    d_out: usize,
    f: impl FnOnce(Tensor<B, 2>) -> Tensor<B, 2>,
) -> Tensor<B, D> {
    let dims = x.dims();
    let d_in = dims[D - 1];
    let rows: usize = dims[..D - 1].iter().product();
    let mut out = dims;
    out[D - 1] = d_out;
    f(x.reshape([rows, d_in])).reshape(out)
}

impl<B: Backend> Projection<B> {
    /// An `nn.Linear`-style layer with no adapters.
    pub fn new(base: Linear<B>) -> Self {
        Self {
            base,
            quantized: None,
            adapters: Vec::new(),
            state: AdapterState::default(),
            conv1d: false,
        }
    }

    /// A GPT-2 `Conv1D` layer (the same product; the checkpoint stores `[d_in, d_out]`).
    pub fn conv1d(base: Linear<B>) -> Self {
        Self {
            conv1d: true,
            ..Self::new(base)
        }
    }

    /// `[d_in, d_out]`.
    pub fn dims(&self) -> [usize; 2] {
        match &self.quantized {
            Some(q) => q.dims(),
            None => self.base.weight.lazy_shape().dims(),
        }
    }

    /// Makes this a quantized layer: `weight` replaces the float weight, which is dropped.
    pub fn set_quantized(&mut self, weight: QuantizedBase) {
        self.base.weight = empty_weight(&self.base.weight);
        self.quantized = Some(weight);
    }

    /// The base layer alone on rows `x: [n, d_in]`: the dense GEMM, or the packed product of a
    /// quantized weight plus the bias.
    fn base_rows(&self, x: &Tensor<B, 2>) -> Tensor<B, 2> {
        let bias = self.base.bias.as_ref().map(|b| b.val());
        match &self.quantized {
            None => dense(x, &self.base.weight.val(), bias.as_ref()),
            Some(q) => {
                let y = q.forward_rows(x);
                match bias {
                    Some(b) => y + ember_kernels::float32(b).unsqueeze_dim(0),
                    None => y,
                }
            }
        }
    }

    /// The base layer alone on inputs of any rank.
    fn base_forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        if self.quantized.is_none() {
            return linear_forward(&self.base, x);
        }
        on_rows(x, self.dims()[1], |rows| self.base_rows(&rows))
    }

    /// The base weight as a float tensor `[d_in, d_out]` (dequantized for a quantized layer).
    pub fn base_weight(&self) -> Tensor<B, 2> {
        match &self.quantized {
            Some(q) => q.weight_tensor(&self.base.weight.lazy_device()),
            None => self.base.weight.val(),
        }
    }

    /// The layer's output for `[..., d_in]` inputs, with the active adapters.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        if self.adapters.is_empty() || self.state.disabled {
            return self.base_forward(x);
        }
        let active: Vec<&ProjectionAdapter<B>> = self
            .adapters
            .iter()
            .filter(|a| self.state.active.contains(&a.name))
            .collect();
        // A `modules_to_save` copy replaces the layer (peft's `ModulesToSaveWrapper`).
        if let Some(copy) = active.iter().find_map(|a| a.copy.as_ref()) {
            return linear_forward(copy, x);
        }
        let unmerged: Vec<&ProjectionAdapter<B>> = active
            .into_iter()
            .filter(|a| !self.state.is_merged(&a.name))
            .collect();
        let [d_in, d_out] = self.dims();
        on_rows(x, d_out, |rows| {
            let mut input = rows.clone();
            for v in unmerged.iter().filter_map(|a| a.ia3.as_ref()) {
                if v.feedforward {
                    input = input * ember_kernels::float32(v.ia3_l.val()).reshape([1, d_in]);
                }
            }
            let mut y = self.base_rows(&input);
            for lora in unmerged.iter().filter_map(|a| a.lora.as_ref()) {
                // Under autocast peft's `result + lora_B(...)` adds two half tensors.
                y = ember_kernels::autocast_round(y + lora.forward_rows(rows.clone()));
            }
            for v in unmerged.iter().filter_map(|a| a.ia3.as_ref()) {
                if !v.feedforward {
                    y = y * ember_kernels::float32(v.ia3_l.val()).reshape([1, d_out]);
                }
            }
            y
        })
    }

    /// The adapter named `name`.
    pub fn adapter(&self, name: &str) -> Option<&ProjectionAdapter<B>> {
        self.adapters.iter().find(|a| a.name == name)
    }

    /// The adapter named `name`, created empty if absent.
    pub fn adapter_mut(&mut self, name: &str) -> &mut ProjectionAdapter<B> {
        if let Some(i) = self.adapters.iter().position(|a| a.name == name) {
            return &mut self.adapters[i];
        }
        self.adapters.push(ProjectionAdapter::empty(name));
        self.adapters.last_mut().expect("just pushed")
    }

    /// Removes the adapter `name` (unmerging it first).
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        let i = find(&self.adapters, name)?;
        if self.state.is_merged(name) {
            self.unmerge_one(i);
        }
        self.adapters.remove(i);
        self.state.active.retain(|a| a != name);
        Ok(())
    }

    /// Adds the updates of the active adapters into the base weight (peft's `merge`).
    pub fn merge(&mut self) {
        let names: Vec<String> = self.state.active.clone();
        for name in names {
            let Some(i) = self.adapters.iter().position(|a| a.name == name) else {
                continue;
            };
            if self.state.is_merged(&name) {
                continue;
            }
            self.merge_one(i);
            self.state.merged.push(name);
        }
    }

    /// Takes every merged update out of the base weight again, newest first.
    pub fn unmerge(&mut self) {
        while let Some(name) = self.state.merged.pop() {
            if let Some(i) = self.adapters.iter().position(|a| a.name == name) {
                self.unmerge_one(i);
            }
        }
    }

    /// The plain layer with the active adapters folded in (`merge_and_unload` for this layer);
    /// the active `modules_to_save` copy replaces it.
    pub fn merged_base(self) -> Linear<B> {
        let layer = self.unloaded();
        match &layer.quantized {
            Some(q) => Linear {
                weight: Param::initialized(
                    layer.base.weight.id,
                    q.weight_tensor(&layer.base.weight.lazy_device()),
                ),
                bias: layer.base.bias,
            },
            None => layer.base,
        }
    }

    /// The layer without adapters, the active ones folded in (`merge_and_unload` for this
    /// layer): a quantized base stays quantized (re-quantized with the update, as peft does),
    /// and the active `modules_to_save` copy replaces the layer.
    pub fn unloaded(mut self) -> Projection<B> {
        let copy = self
            .adapters
            .iter()
            .filter(|a| self.state.active.contains(&a.name))
            .find_map(|a| a.copy.clone());
        let conv1d = self.conv1d;
        let mut layer = match copy {
            Some(copy) => Projection::new(copy),
            None => {
                self.merge();
                Projection {
                    base: self.base,
                    quantized: self.quantized,
                    adapters: Vec::new(),
                    state: AdapterState::default(),
                    conv1d,
                }
            }
        };
        layer.conv1d = conv1d;
        layer
    }

    fn merge_one(&mut self, i: usize) {
        self.apply_update(i, true);
    }

    fn unmerge_one(&mut self, i: usize) {
        self.apply_update(i, false);
    }

    /// W += ΔW (or W -= ΔW); IA3: W scaled by the vector (or divided by it).
    fn apply_update(&mut self, i: usize, add: bool) {
        let a = &self.adapters[i];
        let [d_in, d_out] = self.dims();
        let mut weight = self.base_weight().detach();
        let mut bias = self.base.bias.as_ref().map(|b| b.val().detach());
        if let Some(lora) = &a.lora {
            let delta = lora.delta_weight().detach();
            weight = if add { weight + delta } else { weight - delta };
        }
        if let Some(v) = &a.ia3 {
            let l = v.ia3_l.val().detach();
            // peft divides by `l + 1e-8` when unmerging.
            let l = if add { l } else { (l + 1e-8).recip() };
            if v.feedforward {
                weight = weight * l.reshape([d_in, 1]);
            } else {
                weight = weight * l.clone().reshape([1, d_out]);
                bias = bias.map(|b| b * l);
            }
        }
        match &self.quantized {
            // peft re-quantizes a merged 4-bit / int8 weight in the same format.
            Some(q) => {
                let values = weight
                    .into_data()
                    .into_vec::<f32>()
                    .expect("a float weight reads as f32");
                self.quantized = Some(q.requantize(&values));
            }
            None => self.base.weight = replace_value(&self.base.weight, weight),
        }
        if let (Some(param), Some(b)) = (&self.base.bias, bias) {
            self.base.bias = Some(replace_value(param, b));
        }
    }
}

/// `param` with a new value, keeping its id and whether it takes gradients.
pub(crate) fn replace_value<B: Backend, const D: usize>(
    param: &Param<Tensor<B, D>>,
    value: Tensor<B, D>,
) -> Param<Tensor<B, D>> {
    let grad = param.is_require_grad();
    Param::initialized(param.id, value.set_require_grad(grad))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::LinearConfig;
    type B = burn::backend::Flex;

    fn layer() -> Projection<B> {
        Projection::new(LinearConfig::new(6, 4).init(&Default::default()))
    }

    fn input() -> Tensor<B, 3> {
        Tensor::random(
            [2, 3, 6],
            Distribution::Normal(0.0, 1.0),
            &Default::default(),
        )
    }

    fn close(a: Tensor<B, 3>, b: Tensor<B, 3>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    #[test]
    fn lora_adds_its_update_and_merging_gives_the_same_output() {
        let device = Default::default();
        let mut p = layer();
        let x = input();
        let base = p.forward(x.clone());
        let a = p.adapter_mut("default");
        a.lora = Some(LoraLinear::new(
            6,
            4,
            2,
            2.0,
            0.0,
            LoraInit::Random,
            &device,
        ));
        p.state.active = vec!["default".into()];
        let lora = p.adapters[0].lora.as_ref().unwrap();
        let expected = base.clone()
            + (x.clone()
                .reshape([6, 6])
                .matmul(lora.lora_a.val())
                .matmul(lora.lora_b.val())
                * 2.0)
                .reshape([2, 3, 4]);
        let adapted = p.forward(x.clone());
        assert!(close(adapted.clone(), expected) < 1e-5);
        p.merge();
        assert!(close(p.forward(x.clone()), adapted.clone()) < 1e-5);
        p.unmerge();
        assert!(close(p.forward(x.clone()), adapted) < 1e-5);
        p.state.disabled = true;
        assert!(close(p.forward(x), base) < 1e-5);
    }

    #[test]
    fn ia3_scales_inputs_or_outputs_and_merges() {
        for feedforward in [false, true] {
            let device = Default::default();
            let mut p = layer();
            let n = if feedforward { 6 } else { 4 };
            let l = Tensor::<B, 1>::random([n], Distribution::Uniform(0.5, 1.5), &device);
            p.adapter_mut("default").ia3 = Some(Ia3Vector {
                ia3_l: Param::from_tensor(l.clone()),
                feedforward,
            });
            p.state.active = vec!["default".into()];
            let x = input();
            let expected = if feedforward {
                linear_forward(&p.base, x.clone() * l.reshape([1, 1, 6]))
            } else {
                linear_forward(&p.base, x.clone()) * l.reshape([1, 1, 4])
            };
            let y = p.forward(x.clone());
            assert!(close(y.clone(), expected) < 1e-5);
            p.merge();
            assert!(close(p.forward(x), y) < 1e-5);
        }
    }

    #[test]
    fn unknown_adapters_are_named() {
        let mut p = layer();
        p.adapter_mut("a");
        let err = p.delete_adapter("b").unwrap_err().to_string();
        assert!(err.contains("`b`") && err.contains("\"a\""), "{err}");
    }
}
