//! A quantized base for [`crate::Projection`]: the packed weight of a bitsandbytes `Linear4bit`
//! or `Linear8bitLt`, so that a quantized model with LoRA adapters is QLoRA with no model code
//! changed.
//!
//! The packed bytes live in an [`ember_quant::QuantizedLinear`] behind an `Arc` (cloning a model
//! shares them); the burn `Linear` of the layer then keeps only its bias and an empty weight.
//! Products run through [`ember_kernels::frozen_linear`] on the CPU (the weight read packed,
//! dequantized in registers; only the input's gradient in training) and dequantize the weight
//! into a tensor on other backends.

use burn::module::Param;
use burn::tensor::{backend::Backend, Tensor, TensorData};
use ember_kernels::FrozenWeight;
use ember_quant::{
    quantize_4bit, Absmax, ComputeDtype, Int8Weight, QuantizedLinear, QuantizedWeight,
};
use std::sync::Arc;

/// The packed weight of a quantized layer, shared by clones of the model.
#[derive(Debug, Clone)]
pub struct QuantizedBase {
    linear: Arc<Frozen>,
}

/// [`QuantizedLinear`] seen by the kernels as a `[d_in, d_out]` weight.
#[derive(Debug)]
struct Frozen(QuantizedLinear);

impl FrozenWeight for Frozen {
    fn dims(&self) -> [usize; 2] {
        [self.0.in_features(), self.0.out_features()]
    }

    fn forward_rows(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        self.0.forward(x, rows, out);
    }

    fn backward_rows(&self, grad_out: &[f32], rows: usize, grad_in: &mut [f32]) {
        self.0.backward_input(grad_out, rows, grad_in);
    }
}

impl QuantizedBase {
    /// Wraps a packed weight.
    pub fn new(linear: QuantizedLinear) -> Self {
        Self {
            linear: Arc::new(Frozen(linear)),
        }
    }

    /// The packed weight.
    pub fn linear(&self) -> &QuantizedLinear {
        &self.linear.0
    }

    /// `[d_in, d_out]`.
    pub fn dims(&self) -> [usize; 2] {
        self.linear.dims()
    }

    /// Bytes of packed codes and scales held in memory.
    pub fn storage_bytes(&self) -> usize {
        self.linear.0.storage_bytes()
    }

    /// `x · W` for rows `x: [n, d_in]`: the packed kernels where they apply (Flex, with or
    /// without autodiff), else the dequantized weight in a matmul (a constant: no gradient).
    pub fn forward_rows<B: Backend>(&self, x: &Tensor<B, 2>) -> Tensor<B, 2> {
        let frozen: Arc<dyn FrozenWeight> = self.linear.clone();
        ember_kernels::frozen_linear(x, &frozen)
            .unwrap_or_else(|| x.clone().matmul(self.weight_tensor(&x.device())))
    }

    /// The weight dequantized to float32 in burn's `[d_in, d_out]` layout.
    pub fn weight_tensor<B: Backend>(&self, device: &B::Device) -> Tensor<B, 2> {
        let [d_in, d_out] = self.dims();
        let hf = self.linear.0.dequantize();
        Tensor::from_data(
            TensorData::new(transpose(&hf, d_out, d_in), [d_in, d_out]),
            device,
        )
    }

    /// The same format (quant type, blocksize, double quantization; or LLM.int8) applied to new
    /// float32 values in burn's `[d_in, d_out]` layout: merging an adapter into a quantized
    /// base re-quantizes it, as peft does for `Linear4bit` / `Linear8bitLt`.
    pub fn requantize(&self, weight: &[f32]) -> Self {
        let [d_in, d_out] = self.dims();
        let hf = transpose(weight, d_in, d_out);
        let old = self.linear();
        let weight = match &old.weight {
            QuantizedWeight::FourBit(p) => QuantizedWeight::FourBit(
                quantize_4bit(
                    &hf,
                    &[d_out, d_in],
                    p.state.blocksize,
                    p.state.quant_type,
                    matches!(p.state.absmax, Absmax::Nested(_)),
                )
                .expect("the format came from a valid weight of this shape"),
            ),
            QuantizedWeight::EightBit(_) => QuantizedWeight::EightBit(
                Int8Weight::quantize(d_out, d_in, &hf).expect("lengths fit the shape"),
            ),
        };
        Self::new(
            QuantizedLinear::new(weight, old.compute_dtype, old.threshold)
                .expect("a freshly quantized 2-D weight is valid"),
        )
    }

    /// The compute dtype of 4-bit products.
    pub fn compute_dtype(&self) -> ComputeDtype {
        self.linear.0.compute_dtype
    }
}

/// `[rows, cols]` row-major to `[cols, rows]`.
pub(crate) fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; values.len()];
    for (r, row) in values.chunks_exact(cols.max(1)).enumerate() {
        for (c, v) in row.iter().enumerate() {
            out[c * rows + r] = *v;
        }
    }
    out
}

/// The stand-in for the float weight of a quantized layer: an empty `[0, 0]` tensor under the
/// old parameter id, frozen, so that nothing holds (or trains) a float copy.
pub(crate) fn empty_weight<B: Backend>(param: &Param<Tensor<B, 2>>) -> Param<Tensor<B, 2>> {
    let empty = Tensor::<B, 2>::empty([0, 0], &param.lazy_device());
    Param::initialized(param.id, empty).set_require_grad(false)
}

/// peft's `prepare_model_for_kbit_training`: freezes every parameter of a quantized model
/// before adapters are added, so that only the adapters train.
///
/// peft also casts float16 / bfloat16 parameters (norms, heads) to float32 and makes the input
/// embeddings' output require a gradient (so that gradient checkpointing sees one); Ember's
/// models keep those parameters in float32 already, and burn's autodiff gives the adapters
/// their gradients whatever the embeddings require, so freezing is what is left to do.
pub fn prepare_model_for_kbit_training<B: Backend, M: burn::module::Module<B>>(model: M) -> M {
    model.no_grad()
}
