//! One walk over a model's parameters by HF key, used both to load a checkpoint and to save
//! one, so that the key names live in one place per module.
//!
//! Each module's `visit` hands every parameter to a [`ParamVisitor`] under its full HF key and
//! gets it back (replaced when loading, unchanged when saving). Parameters are created lazily,
//! so a loaded model never draws the random values it replaces.

use crate::dtype::{cast_tensor, param_dtype, Caster, FloatDtype};
use crate::error::{ModelError, Result};
use crate::quantize::QuantPlan;
use crate::weights::{LinearLayout, Weights};
use burn::module::{Param, ParamId};
use burn::nn::{Embedding, LayerNorm, Linear};
use burn::tensor::{backend::Backend, Distribution, Tensor, TensorData};
use ember_peft::{LayerVisitor, Projection, TokenEmbedding};
use ember_quant::{QuantizedLayout, QuantizedWeight, SavedTensor};
use std::collections::BTreeMap;
use std::path::Path;

/// Tensors by HF key: shape and f32 values in HF layout.
pub type StateDict = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Joins a key prefix and a name with a dot (`""` + `a` is `a`).
pub(crate) fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_owned()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Receives each parameter of a model under its HF key.
pub(crate) trait ParamVisitor<B: Backend> {
    /// A 1-D parameter (bias, LayerNorm weight).
    fn visit1(&mut self, key: &str, param: Param<Tensor<B, 1>>) -> Result<Param<Tensor<B, 1>>>;
    /// A 2-D parameter; `transposed` when burn stores it as `[in, out]` and HF as `[out, in]`.
    fn visit2(
        &mut self,
        key: &str,
        param: Param<Tensor<B, 2>>,
        transposed: bool,
    ) -> Result<Param<Tensor<B, 2>>>;

    /// A linear layer: its base weight (`[out, in]` in HF's file, `[in, out]` for `Conv1D`)
    /// and bias. Adapters are not checkpoint weights: `ember-peft` reads and writes them.
    fn projection(&mut self, key: &str, layer: Projection<B>) -> Result<Projection<B>> {
        visit_projection(self, key, layer)
    }

    /// An embedding table's base weight.
    fn embedding(&mut self, key: &str, mut layer: TokenEmbedding<B>) -> Result<TokenEmbedding<B>> {
        layer.base.weight = self.visit2(&join(key, "weight"), layer.base.weight, false)?;
        Ok(layer)
    }

    /// Called before the parameters of a module without adapters (`LayerNorm`, `RMSNorm`).
    fn enter(&mut self, _key: &str, _kind: &str) {}
}

/// The parameters of a linear layer in turn: its weight (unless it is quantized: the packed
/// weight is no float parameter) and bias.
pub(crate) fn visit_projection<B: Backend, V: ParamVisitor<B> + ?Sized>(
    v: &mut V,
    key: &str,
    mut layer: Projection<B>,
) -> Result<Projection<B>> {
    if layer.quantized.is_none() {
        let transposed = !layer.conv1d;
        layer.base.weight = v.visit2(&join(key, "weight"), layer.base.weight, transposed)?;
    }
    if let Some(bias) = layer.base.bias.take() {
        layer.base.bias = Some(v.visit1(&join(key, "bias"), bias)?);
    }
    Ok(layer)
}

/// A module whose parameters can be walked by HF key.
pub(crate) trait VisitParams<B: Backend>: Sized {
    /// Hands every parameter to `v` under `prefix`, rebuilding the module from what comes back.
    fn visit(self, prefix: &str, v: &mut dyn ParamVisitor<B>) -> Result<Self>;
}

impl<B: Backend> VisitParams<B> for Projection<B> {
    fn visit(self, prefix: &str, v: &mut dyn ParamVisitor<B>) -> Result<Self> {
        v.projection(prefix, self)
    }
}

impl<B: Backend> VisitParams<B> for TokenEmbedding<B> {
    fn visit(self, prefix: &str, v: &mut dyn ParamVisitor<B>) -> Result<Self> {
        v.embedding(prefix, self)
    }
}

impl<B: Backend> VisitParams<B> for LayerNorm<B> {
    fn visit(mut self, prefix: &str, v: &mut dyn ParamVisitor<B>) -> Result<Self> {
        v.enter(prefix, "LayerNorm");
        self.gamma = v.visit1(&join(prefix, "weight"), self.gamma)?;
        if let Some(beta) = self.beta.take() {
            self.beta = Some(v.visit1(&join(prefix, "bias"), beta)?);
        }
        Ok(self)
    }
}

impl<B: Backend> VisitParams<B> for burn::nn::RmsNorm<B> {
    fn visit(mut self, prefix: &str, v: &mut dyn ParamVisitor<B>) -> Result<Self> {
        v.enter(prefix, "RMSNorm");
        self.gamma = v.visit1(&join(prefix, "weight"), self.gamma)?;
        Ok(self)
    }
}

/// `dropout.forward(x)`, with the mask from [`ember_kernels::dropout_mask`] where it applies
/// (training on the CPU): one multiply by a mask drawn with a fast generator instead of burn's
/// per-value ChaCha draws and two multiplies. Without autodiff, dropout is the identity, as in
/// burn and PyTorch's `eval()`.
pub(crate) fn apply_dropout<B: Backend, const D: usize>(
    dropout: &burn::nn::Dropout,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    let device = x.device();
    if dropout.prob > 0.0 && B::ad_enabled(&device) {
        if let Some(mask) = ember_kernels::dropout_mask::<B, D>(x.dims(), dropout.prob, &device) {
            return x * mask;
        }
    }
    dropout.forward(x)
}

/// `LayerNorm(x + residual)` with the layer's `eps`, in one pass per row where the fused
/// kernel applies ([`ember_kernels::layer_norm`]; burn's `LayerNorm` keeps its epsilon private,
/// so the caller passes the config's).
pub(crate) fn layer_norm<B: Backend>(
    ln: &LayerNorm<B>,
    eps: f64,
    x: Tensor<B, 3>,
    residual: Option<Tensor<B, 3>>,
) -> Tensor<B, 3> {
    // Half-precision parameters compute in float32.
    let beta = ln.beta.as_ref().map(|b| ember_kernels::float32(b.val()));
    let gamma = ember_kernels::float32(ln.gamma.val());
    ember_kernels::layer_norm(&x, residual.as_ref(), &gamma, beta.as_ref(), eps).unwrap_or_else(
        || {
            layer_norm_f32(
                ln,
                match residual {
                    Some(r) => x + r,
                    None => x,
                },
            )
        },
    )
}

/// burn's `LayerNorm` forward, its parameters widened to float32 when the model is in half
/// precision (the models compute in float32).
pub(crate) fn layer_norm_f32<B: Backend>(ln: &LayerNorm<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    if ln.gamma.val().dtype() == burn::tensor::DType::F32 {
        return ln.forward(x);
    }
    let mut widened = ln.clone();
    widened.gamma = widen(&ln.gamma);
    widened.beta = ln.beta.as_ref().map(widen);
    widened.forward(x)
}

/// burn's `RmsNorm` forward, its weight widened to float32 in a half-precision model.
fn rms_norm_f32<B: Backend>(norm: &burn::nn::RmsNorm<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    if norm.gamma.val().dtype() == burn::tensor::DType::F32 {
        return norm.forward(x);
    }
    let mut widened = norm.clone();
    widened.gamma = widen(&norm.gamma);
    widened.forward(x)
}

/// A parameter's float32 copy under the same id (itself when it is float32).
fn widen<B: Backend>(p: &Param<Tensor<B, 1>>) -> Param<Tensor<B, 1>> {
    Param::initialized(p.id, ember_kernels::float32(p.val()))
}

/// `RMSNorm(x)` (HF's `LlamaRMSNorm`), in one pass per row where the fused kernel applies.
pub(crate) fn apply_rms_norm<B: Backend>(
    norm: &burn::nn::RmsNorm<B>,
    x: Tensor<B, 3>,
) -> Tensor<B, 3> {
    let gamma = ember_kernels::float32(norm.gamma.val());
    ember_kernels::rms_norm(&x, &gamma, norm.epsilon).unwrap_or_else(|| rms_norm_f32(norm, x))
}

/// HF's initialisation: a `[d_in → d_out]` linear layer with weights from N(0, std) and zero
/// bias (created lazily).
pub(crate) fn init_linear<B: Backend>(
    d_in: usize,
    d_out: usize,
    std: f64,
    device: &B::Device,
) -> Projection<B> {
    let d = device.clone();
    let weight = Param::uninitialized(
        ParamId::new(),
        move |device, grad| {
            let t = Tensor::<B, 2>::random([d_in, d_out], Distribution::Normal(0.0, std), device);
            if grad {
                t.require_grad()
            } else {
                t
            }
        },
        d,
        true,
        [d_in, d_out].into(),
    );
    let bias = Param::from_tensor(Tensor::zeros([d_out], device));
    Projection::new(Linear {
        weight,
        bias: Some(bias),
    })
}

/// An embedding table with rows from N(0, std) and the padding row zeroed, as HF initialises
/// it.
pub(crate) fn init_embedding<B: Backend>(
    n: usize,
    d: usize,
    std: f64,
    padding_idx: Option<usize>,
    device: &B::Device,
) -> TokenEmbedding<B> {
    let weight = Param::uninitialized(
        ParamId::new(),
        move |device, grad| {
            let mut t = Tensor::<B, 2>::random([n, d], Distribution::Normal(0.0, std), device);
            if let Some(p) = padding_idx.filter(|p| *p < n) {
                t = t.slice_assign([p..p + 1, 0..d], Tensor::zeros([1, d], device));
            }
            if grad {
                t.require_grad()
            } else {
                t
            }
        },
        device.clone(),
        true,
        [n, d].into(),
    );
    TokenEmbedding::new(Embedding { weight })
}

/// A LayerNorm with weight 1, bias 0 and HF's epsilon.
pub(crate) fn init_layer_norm<B: Backend>(d: usize, eps: f64, device: &B::Device) -> LayerNorm<B> {
    burn::nn::LayerNormConfig::new(d)
        .with_epsilon(eps)
        .init(device)
}

/// Loads parameters from a checkpoint. Keys are looked up as HF's loader does: as they are,
/// then with the base model prefix removed or added, then with the old `gamma` / `beta` names.
/// A missing key under a `required` prefix is an error; any other missing key keeps its fresh
/// initialisation and is reported.
pub(crate) struct Loader<'a> {
    pub weights: &'a Weights,
    /// The base model prefix (`bert`, `roberta`); empty when loading a bare base model.
    pub base_prefix: &'a str,
    /// Keys (after the base prefix is removed) that may be missing: heads, pooler.
    pub optional: Vec<String>,
    /// Keys that were missing and keep their initialisation.
    pub missing: Vec<String>,
    /// Re-initialise a tensor whose shape differs instead of failing.
    pub ignore_mismatched_sizes: bool,
    /// Keys re-initialised because their shape differed.
    pub mismatched: Vec<String>,
    /// Quantize linear layers while loading (`quantization_config`); also how a checkpoint's
    /// packed weights compute.
    pub quant: Option<&'a QuantPlan>,
    /// The packed weights of a quantized checkpoint.
    pub layout: QuantizedLayout,
    /// The dtype every float parameter is converted to (weights read, and fresh ones).
    pub dtype: FloatDtype,
    /// How the linear weights read lie in memory.
    pub linear_layout: LinearLayout,
}

impl<'a> Loader<'a> {
    fn candidates(&self, key: &str) -> Vec<String> {
        let mut out = vec![key.to_owned()];
        let base = format!("{}.", self.base_prefix);
        if !self.base_prefix.is_empty() {
            if let Some(stripped) = key.strip_prefix(&base) {
                out.push(stripped.to_owned());
            }
        } else {
            for prefix in ["bert.", "roberta."] {
                out.push(format!("{prefix}{key}"));
            }
        }
        // The masked-LM decoder bias is saved as `<head>.bias`, `<head>.decoder.bias` or both.
        for head in ["predictions.bias", "lm_head.bias"] {
            if key.ends_with(head) {
                out.push(format!(
                    "{}decoder.bias",
                    key.strip_suffix("bias").unwrap_or(key)
                ));
            }
        }
        for (new, old) in [(".weight", ".gamma"), (".bias", ".beta")] {
            if key.contains("LayerNorm") || key.contains("layer_norm") {
                let extra: Vec<String> = out
                    .iter()
                    .filter_map(|k| k.strip_suffix(new).map(|s| format!("{s}{old}")))
                    .collect();
                out.extend(extra);
            }
        }
        out
    }

    fn is_optional(&self, key: &str) -> bool {
        let base = format!("{}.", self.base_prefix);
        let inner = if self.base_prefix.is_empty() {
            key
        } else {
            key.strip_prefix(&base).unwrap_or(key)
        };
        let head = !self.base_prefix.is_empty() && !key.starts_with(&base);
        head || self.optional.iter().any(|p| inner.starts_with(p.as_str()))
    }

    /// The file key holding the model key `key`, if any; `None` also for a tensor of another
    /// shape when `ignore_mismatched_sizes` (recorded as mismatched).
    fn find(&mut self, key: &str, shape: &[usize]) -> Option<String> {
        let found = self
            .candidates(key)
            .into_iter()
            .find(|k| self.weights.contains(k))?;
        if self.ignore_mismatched_sizes && self.weights.shape(&found) != Some(shape) {
            self.weights.mark_used(&found);
            self.mismatched.push(key.to_owned());
            return None;
        }
        Some(found)
    }
}

impl<B: Backend> ParamVisitor<B> for Loader<'_> {
    fn projection(&mut self, key: &str, mut layer: Projection<B>) -> Result<Projection<B>> {
        let weight_key = join(key, "weight");
        let packed = self
            .candidates(&weight_key)
            .into_iter()
            .find_map(|k| self.layout.kind(&k).map(|kind| (k, kind)));
        let quantized = if let Some((found, kind)) = packed {
            let plan = self.quant.ok_or_else(|| ModelError::Weights {
                path: self.weights.source().to_owned(),
                message: format!(
                    "`{found}` is a bitsandbytes quantized weight but config.json has no \
                     quantization_config"
                ),
            })?;
            let weight = ember_quant::load_quantized(&found, kind, |n| self.weights.tensor_ref(n))
                .map_err(|e| ModelError::Weights {
                    path: self.weights.source().to_owned(),
                    message: e.to_string(),
                })?;
            let base = plan.wrap(&found, weight)?;
            let [d_in, d_out] = layer.dims();
            if base.dims() != [d_in, d_out] {
                return Err(ModelError::Shape {
                    key: found,
                    file: self.weights.source().to_owned(),
                    found: vec![base.dims()[1], base.dims()[0]],
                    expected: vec![d_out, d_in],
                });
            }
            Some(base)
        } else if let Some(plan) = self.quant.filter(|p| p.converts(key)) {
            let [d_in, d_out] = layer.dims();
            let file_shape = if layer.conv1d {
                [d_in, d_out]
            } else {
                [d_out, d_in]
            };
            match self.find(&weight_key, &file_shape) {
                Some(found) => {
                    let values = self.weights.values(&found, &file_shape)?;
                    // bitsandbytes quantizes `[out, in]`; transformers transposes a `Conv1D`
                    // weight first.
                    let hf = if layer.conv1d {
                        crate::weights::transposed(&values, d_in, d_out)
                    } else {
                        values.into_owned()
                    };
                    Some(plan.quantize(&found, &hf, d_out, d_in)?)
                }
                None => None,
            }
        } else {
            None
        };
        if let Some(base) = quantized {
            layer.set_quantized(base);
        }
        visit_projection(self, key, layer)
    }

    fn visit1(&mut self, key: &str, param: Param<Tensor<B, 1>>) -> Result<Param<Tensor<B, 1>>> {
        let shape: [usize; 1] = param.lazy_shape().dims();
        match self.find(key, &shape) {
            Some(found) => {
                let t = self
                    .weights
                    .get::<B, 1>(&found, shape, &param.lazy_device())?;
                let t = cast_tensor(t, self.dtype, &found)?;
                Ok(Param::initialized(param.id, t.require_grad()))
            }
            None => {
                let param = self.keep(key, param)?;
                Caster { dtype: self.dtype }.visit1(key, param)
            }
        }
    }

    fn visit2(
        &mut self,
        key: &str,
        param: Param<Tensor<B, 2>>,
        transposed: bool,
    ) -> Result<Param<Tensor<B, 2>>> {
        let [a, b]: [usize; 2] = param.lazy_shape().dims();
        let file_shape = if transposed { [b, a] } else { [a, b] };
        match self.find(key, &file_shape) {
            Some(found) => {
                let device = param.lazy_device();
                let t = match (transposed, self.linear_layout) {
                    (true, LinearLayout::InOut) => self
                        .weights
                        .get_transposed::<B>(&found, file_shape, &device)?,
                    (true, LinearLayout::OutIn) => self
                        .weights
                        .get::<B, 2>(&found, file_shape, &device)?
                        .transpose(),
                    (false, _) => self.weights.get::<B, 2>(&found, file_shape, &device)?,
                };
                // The conversion keeps the view's memory order (`ember_kernels::to_half`).
                let t = cast_tensor(t, self.dtype, &found)?;
                Ok(Param::initialized(param.id, t.require_grad()))
            }
            None => {
                let param = self.keep(key, param)?;
                Caster { dtype: self.dtype }.visit2(key, param, transposed)
            }
        }
    }
}

impl Loader<'_> {
    fn keep<T: burn::module::Parameter>(&mut self, key: &str, param: Param<T>) -> Result<Param<T>> {
        if self.mismatched.last().is_some_and(|k| k == key) {
            Ok(param)
        } else if self.is_optional(key) {
            self.missing.push(key.to_owned());
            Ok(param)
        } else {
            Err(ModelError::MissingTensor {
                key: key.to_owned(),
                path: self.weights.source().to_owned(),
            })
        }
    }
}

/// A parameter's HF name and burn id (to find its gradient or optimizer state).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedParam {
    /// The HF key, e.g. `bert.encoder.layer.0.attention.self.query.weight`.
    pub name: String,
    /// The burn parameter id.
    pub id: ParamId,
    /// The tensor's shape in burn.
    pub shape: Vec<usize>,
    /// Whether burn stores the transpose of HF's layout (linear weights: `[in, out]`).
    pub transposed: bool,
}

/// Records names and ids without reading any values.
#[derive(Default)]
pub(crate) struct NameCollector {
    pub params: Vec<NamedParam>,
}

impl<B: Backend> ParamVisitor<B> for NameCollector {
    fn visit1(&mut self, key: &str, param: Param<Tensor<B, 1>>) -> Result<Param<Tensor<B, 1>>> {
        self.params.push(NamedParam {
            name: key.to_owned(),
            id: param.id,
            shape: param.lazy_shape().to_vec(),
            transposed: false,
        });
        Ok(param)
    }

    fn visit2(
        &mut self,
        key: &str,
        param: Param<Tensor<B, 2>>,
        transposed: bool,
    ) -> Result<Param<Tensor<B, 2>>> {
        self.params.push(NamedParam {
            name: key.to_owned(),
            id: param.id,
            shape: param.lazy_shape().to_vec(),
            transposed,
        });
        Ok(param)
    }
}

/// Adds up parameter bytes as PyTorch counts them (`numel × element_size`).
#[derive(Default)]
struct ByteCounter {
    bytes: usize,
}

impl<B: Backend> ParamVisitor<B> for ByteCounter {
    fn visit1(&mut self, _: &str, param: Param<Tensor<B, 1>>) -> Result<Param<Tensor<B, 1>>> {
        self.bytes += element_size(&param) * param.lazy_shape().num_elements();
        Ok(param)
    }

    fn visit2(
        &mut self,
        _: &str,
        param: Param<Tensor<B, 2>>,
        _: bool,
    ) -> Result<Param<Tensor<B, 2>>> {
        self.bytes += element_size(&param) * param.lazy_shape().num_elements();
        Ok(param)
    }

    fn projection(&mut self, key: &str, layer: Projection<B>) -> Result<Projection<B>> {
        if let Some(q) = &layer.quantized {
            // `Params4bit` is a uint8 tensor of the packed bytes, `Int8Params` an int8 one.
            self.bytes += match &q.linear().weight {
                QuantizedWeight::FourBit(p) => p.packed.len(),
                QuantizedWeight::EightBit(w) => w.codes.len(),
            };
        }
        visit_projection(self, key, layer)
    }
}

/// Bytes per value of a parameter, as torch's `element_size()`.
fn element_size<B: Backend, const D: usize>(param: &Param<Tensor<B, D>>) -> usize {
    param_dtype(param).map_or(4, FloatDtype::size)
}

/// The bytes of a model's parameters as PyTorch counts them (float32, packed weights as their
/// uint8 / int8 tensors).
pub(crate) fn parameter_bytes<B: Backend, M: VisitParams<B> + Clone>(model: &M) -> usize {
    let mut counter = ByteCounter::default();
    model
        .clone()
        .visit("", &mut counter)
        .expect("counting parameters cannot fail");
    counter.bytes
}

/// Gives each parameter an id derived from its HF key (FNV-1a), the same in every process.
pub(crate) struct StableIds;

/// A 64-bit FNV-1a hash: stable across processes and Rust versions, unlike `DefaultHasher`.
fn fnv1a(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

impl<B: Backend> ParamVisitor<B> for StableIds {
    fn visit1(&mut self, key: &str, mut param: Param<Tensor<B, 1>>) -> Result<Param<Tensor<B, 1>>> {
        param.id = ParamId::from(fnv1a(key));
        Ok(param)
    }

    fn visit2(
        &mut self,
        key: &str,
        mut param: Param<Tensor<B, 2>>,
        _: bool,
    ) -> Result<Param<Tensor<B, 2>>> {
        param.id = ParamId::from(fnv1a(key));
        Ok(param)
    }
}

/// Collects every parameter as f32 values in HF layout, for saving.
#[derive(Default)]
pub(crate) struct Collector {
    /// HF key → (shape, values).
    pub tensors: StateDict,
    /// The packed tensors of quantized layers, in bitsandbytes' serialization.
    pub packed: Vec<(String, SavedTensor)>,
    /// The dtype of each tensor that is not float32 (bfloat16 / float16 models), to write it
    /// back in its own dtype.
    pub dtypes: BTreeMap<String, FloatDtype>,
}

impl Collector {
    fn push(&mut self, key: &str, data: TensorData) -> Result<()> {
        let shape = data.shape.to_vec();
        match FloatDtype::of(data.dtype) {
            Some(FloatDtype::Float32) | None => {}
            Some(half) => {
                self.dtypes.insert(key.to_owned(), half);
            }
        }
        let values = data.convert::<f32>().into_vec::<f32>().map_err(|e| {
            ModelError::Input(format!("parameter `{key}` cannot be read as f32: {e:?}"))
        })?;
        self.tensors.insert(key.to_owned(), (shape, values));
        Ok(())
    }
}

impl<B: Backend> ParamVisitor<B> for Collector {
    fn projection(&mut self, key: &str, layer: Projection<B>) -> Result<Projection<B>> {
        if let Some(q) = &layer.quantized {
            let name = join(key, "weight");
            let tensors = match &q.linear().weight {
                QuantizedWeight::FourBit(p) => ember_quant::state_dict_4bit(&name, p),
                QuantizedWeight::EightBit(w) => ember_quant::state_dict_8bit(&name, w),
            }
            .map_err(|e| ModelError::Input(format!("saving `{name}`: {e}")))?;
            self.packed.extend(tensors);
        }
        visit_projection(self, key, layer)
    }

    fn visit1(&mut self, key: &str, param: Param<Tensor<B, 1>>) -> Result<Param<Tensor<B, 1>>> {
        self.push(key, param.val().into_data())?;
        Ok(param)
    }

    fn visit2(
        &mut self,
        key: &str,
        param: Param<Tensor<B, 2>>,
        transposed: bool,
    ) -> Result<Param<Tensor<B, 2>>> {
        let t = param.val();
        self.push(
            key,
            if transposed {
                t.transpose().into_data()
            } else {
                t.into_data()
            },
        )?;
        Ok(param)
    }
}

/// Writes `tensors` as a safetensors file with `{"format": "pt"}` metadata (which
/// `transformers` requires), atomically: a temporary file in the same folder, then a rename.
pub(crate) fn write_safetensors(
    path: &Path,
    tensors: &StateDict,
    dtypes: &BTreeMap<String, FloatDtype>,
    packed: &[(String, SavedTensor)],
) -> Result<()> {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>, safetensors::Dtype)> = tensors
        .iter()
        .map(|(k, (shape, values))| {
            // Half-precision values came from half-precision tensors: converting them back
            // is exact.
            let bytes = |encode: fn(f32) -> [u8; 2]| values.iter().flat_map(move |&v| encode(v));
            let (data, dtype) = match dtypes.get(k).copied().unwrap_or_default() {
                FloatDtype::Float32 => (
                    values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    safetensors::Dtype::F32,
                ),
                FloatDtype::BFloat16 => (
                    bytes(|v| half::bf16::from_f32(v).to_le_bytes()).collect(),
                    safetensors::Dtype::BF16,
                ),
                FloatDtype::Float16 => (
                    bytes(|v| half::f16::from_f32(v).to_le_bytes()).collect(),
                    safetensors::Dtype::F16,
                ),
            };
            (k.clone(), data, shape.clone(), dtype)
        })
        .collect();
    let mut views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(k, data, shape, dtype)| {
            let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), data)
                .map_err(|e| ModelError::Input(format!("tensor `{k}`: {e}")))?;
            Ok((k.clone(), view))
        })
        .collect::<Result<_>>()?;
    for (k, t) in packed {
        let view = safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.bytes)
            .map_err(|e| ModelError::Input(format!("tensor `{k}`: {e}")))?;
        views.push((k.clone(), view));
    }
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_owned(),
        "pt".to_owned(),
    )]));
    let out = safetensors::serialize(views, metadata).map_err(|e| ModelError::Weights {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    write_atomic(path, &out)
}

/// Writes a file atomically: a temporary name in the same folder, then a rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| ModelError::Io {
        path: path.to_owned(),
        source,
    };
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })
}

/// Hands a model's layers to an `ember-peft` [`LayerVisitor`] through the HF-key walk, so that
/// adapters find every projection and embedding under the path Python peft uses.
pub(crate) struct LayerBridge<'a, B: Backend> {
    pub inner: &'a mut dyn LayerVisitor<B>,
}

impl<B: Backend> ParamVisitor<B> for LayerBridge<'_, B> {
    fn visit1(&mut self, key: &str, mut param: Param<Tensor<B, 1>>) -> Result<Param<Tensor<B, 1>>> {
        self.inner.param(key, &mut param);
        Ok(param)
    }

    fn visit2(
        &mut self,
        _key: &str,
        param: Param<Tensor<B, 2>>,
        _transposed: bool,
    ) -> Result<Param<Tensor<B, 2>>> {
        Ok(param)
    }

    fn projection(&mut self, key: &str, mut layer: Projection<B>) -> Result<Projection<B>> {
        self.inner.projection(key, &mut layer);
        Ok(layer)
    }

    fn embedding(&mut self, key: &str, mut layer: TokenEmbedding<B>) -> Result<TokenEmbedding<B>> {
        self.inner.embedding(key, &mut layer);
        Ok(layer)
    }

    fn enter(&mut self, key: &str, kind: &str) {
        self.inner.module(key, kind);
    }
}

/// `ember_peft::AdaptableModel` for a model whose parameters are walked by [`VisitParams`]
/// from the empty prefix; `$model_type` reads the HF `model_type` from `$m`.
macro_rules! adaptable {
    ($model:ident, |$m:ident| $model_type:expr, |$d:ident| $dims:expr) => {
        impl<B: Backend> ember_peft::AdaptableModel<B> for $model<B> {
            fn visit_layers(&mut self, visitor: &mut dyn ember_peft::LayerVisitor<B>) {
                let mut bridge = $crate::params::LayerBridge { inner: visitor };
                let model = self.clone();
                *self = $crate::params::VisitParams::visit(model, "", &mut bridge)
                    .expect("the layer walk itself never fails");
            }

            fn model_type(&self) -> Option<String> {
                let $m = self;
                Some($model_type)
            }

            fn prompt_dims(&self) -> Option<ember_peft::PromptDims> {
                let $d = self;
                Some($dims)
            }
        }
    };
}
pub(crate) use adaptable;
