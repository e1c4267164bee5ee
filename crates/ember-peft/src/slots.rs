//! The tensors one adapter keeps in one layer, each under its key in peft's file and in
//! peft's layout: the one list that saving, loading and counting parameters all read.

use crate::config::Bias;
use crate::embedding::TokenEmbedding;
use crate::linear::Projection;
use burn::module::Param;
use burn::tensor::{backend::Backend, Tensor};

/// One tensor of an adapter, borrowed from its layer.
pub(crate) enum Slot<'a, B: Backend> {
    /// A 1-D parameter whose file shape may add unit dimensions (`ia3_l`: `[1, d_in]`).
    Vector {
        key: String,
        param: &'a mut Param<Tensor<B, 1>>,
        file_shape: Vec<usize>,
    },
    /// A matrix, stored transposed in the file when `transposed`.
    Matrix {
        key: String,
        param: &'a mut Param<Tensor<B, 2>>,
        transposed: bool,
    },
}

impl<B: Backend> Slot<'_, B> {
    pub fn key(&self) -> &str {
        match self {
            Self::Vector { key, .. } | Self::Matrix { key, .. } => key,
        }
    }

    /// The shape in the file.
    pub fn file_shape(&self) -> Vec<usize> {
        match self {
            Self::Vector { file_shape, .. } => file_shape.clone(),
            Self::Matrix {
                param, transposed, ..
            } => {
                let [a, b]: [usize; 2] = param.lazy_shape().dims();
                if *transposed {
                    vec![b, a]
                } else {
                    vec![a, b]
                }
            }
        }
    }

    /// The values in the file's layout.
    pub fn read(&self) -> Vec<f32> {
        let data = match self {
            Self::Vector { param, .. } => param.val().into_data(),
            Self::Matrix {
                param, transposed, ..
            } => {
                let v = param.val();
                if *transposed { v.transpose() } else { v }.into_data()
            }
        };
        data.convert::<f32>()
            .into_vec::<f32>()
            .expect("float parameters convert to f32")
    }

    /// Replaces the values (in the file's layout), keeping the id and the gradient flag.
    pub fn write(&mut self, values: Vec<f32>) {
        match self {
            Self::Vector { param, .. } => {
                let device = param.lazy_device();
                let n = param.lazy_shape().num_elements();
                let t =
                    Tensor::<B, 1>::from_data(burn::tensor::TensorData::new(values, [n]), &device);
                **param = crate::linear::replace_value(param, t);
            }
            Self::Matrix {
                param, transposed, ..
            } => {
                let device = param.lazy_device();
                let [a, b]: [usize; 2] = param.lazy_shape().dims();
                let t = if *transposed {
                    Tensor::<B, 2>::from_data(
                        burn::tensor::TensorData::new(values, [b, a]),
                        &device,
                    )
                    .transpose()
                    .into_data()
                } else {
                    burn::tensor::TensorData::new(values, [a, b])
                };
                let t = Tensor::<B, 2>::from_data(t, &device);
                **param = crate::linear::replace_value(param, t);
            }
        }
    }
}

/// The slots of adapter `name` in a projection at `path`, with peft's keys: LoRA's
/// `lora_A.weight` / `lora_B.weight`, IA3's `ia3_l`, a `modules_to_save` copy under the
/// module's own name (`classifier.weight`), and the biases that `bias` saves (`base_layer.bias`
/// on a wrapped layer; with `bias = "all"` a copied layer also writes
/// `modules_to_save.bias` and `original_module.bias`, as peft's state dict holds them).
pub(crate) fn projection_slots<'a, B: Backend>(
    prefix: &str,
    path: &str,
    layer: &'a mut Projection<B>,
    name: &str,
    bias: Bias,
) -> (Vec<Slot<'a, B>>, Vec<Alias>) {
    let [d_in, d_out] = layer.dims();
    let conv1d = layer.conv1d;
    let wrapped = layer
        .adapters
        .iter()
        .any(|a| a.lora.is_some() || a.ia3.is_some());
    let key = |tensor: &str| format!("{prefix}{path}.{tensor}");
    let Projection { base, adapters, .. } = layer;
    let mut slots = Vec::new();
    let mut aliases = Vec::new();
    let adapter = adapters.iter_mut().find(|a| a.name == name);
    let has_copy = adapter.as_ref().is_some_and(|a| a.copy.is_some());
    let has_own = adapter
        .as_ref()
        .is_some_and(|a| a.lora.is_some() || a.ia3.is_some());
    if let Some(adapter) = adapter {
        if let Some(lora) = adapter.lora.as_mut() {
            slots.push(Slot::Matrix {
                key: key("lora_A.weight"),
                param: &mut lora.lora_a,
                transposed: true,
            });
            slots.push(Slot::Matrix {
                key: key("lora_B.weight"),
                param: &mut lora.lora_b,
                transposed: true,
            });
        }
        if let Some(v) = adapter.ia3.as_mut() {
            let file_shape = if v.feedforward {
                vec![1, d_in]
            } else {
                vec![d_out, 1]
            };
            slots.push(Slot::Vector {
                key: key("ia3_l"),
                param: &mut v.ia3_l,
                file_shape,
            });
        }
        if let Some(copy) = adapter.copy.as_mut() {
            slots.push(Slot::Matrix {
                key: key("weight"),
                param: &mut copy.weight,
                transposed: !conv1d,
            });
            if let Some(b) = copy.bias.as_mut() {
                slots.push(Slot::Vector {
                    key: key("bias"),
                    param: b,
                    file_shape: vec![d_out],
                });
                if bias == Bias::All {
                    aliases.push(Alias {
                        key: key("modules_to_save.bias"),
                        of: key("bias"),
                    });
                }
            }
        }
    }
    let base_bias_key = match bias {
        Bias::None => None,
        Bias::All if has_copy => Some(key("original_module.bias")),
        Bias::All if wrapped => Some(key("base_layer.bias")),
        Bias::All => Some(key("bias")),
        Bias::LoraOnly if has_own => Some(key("base_layer.bias")),
        Bias::LoraOnly => None,
    };
    if let (Some(k), Some(b)) = (base_bias_key, base.bias.as_mut()) {
        slots.push(Slot::Vector {
            key: k,
            param: b,
            file_shape: vec![d_out],
        });
    }
    (slots, aliases)
}

/// A second file key holding the same tensor as the key `of` (peft's state dict has both).
pub(crate) struct Alias {
    pub key: String,
    pub of: String,
}

/// The slots of adapter `name` in an embedding table at `path`.
pub(crate) fn embedding_slots<'a, B: Backend>(
    prefix: &str,
    path: &str,
    layer: &'a mut TokenEmbedding<B>,
    name: &str,
) -> Vec<Slot<'a, B>> {
    let mut slots = Vec::new();
    let Some(adapter) = layer.adapters.iter_mut().find(|a| a.name == name) else {
        return slots;
    };
    if let Some(lora) = adapter.lora.as_mut() {
        slots.push(Slot::Matrix {
            key: format!("{prefix}{path}.lora_embedding_A"),
            param: &mut lora.lora_embedding_a,
            transposed: true,
        });
        slots.push(Slot::Matrix {
            key: format!("{prefix}{path}.lora_embedding_B"),
            param: &mut lora.lora_embedding_b,
            transposed: true,
        });
    }
    if let Some(copy) = adapter.copy.as_mut() {
        slots.push(Slot::Matrix {
            key: format!("{prefix}{path}.weight"),
            param: &mut copy.weight,
            transposed: false,
        });
    }
    slots
}
