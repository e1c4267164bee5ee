//! Between burn's generic tensors and Flex's concrete ones.
//!
//! A backend's tensor primitive is a `'static` type, so a generic `Tensor<B, D>` whose backend
//! is Flex can be taken apart with `Any` and put back together without copying: the kernels
//! then read and write the f32 buffers directly. For any other backend the downcast fails and
//! the caller falls back to burn's operations.

use burn::tensor::{backend::Backend, Bool, Tensor, TensorData, TensorPrimitive};
use burn_flex::{Flex, FlexTensor, Layout};
use std::any::{Any, TypeId};

/// Whether `B` is the Flex backend itself (not wrapped in autodiff or fusion).
pub(crate) fn is_flex<B: Backend>() -> bool {
    TypeId::of::<B>() == TypeId::of::<Flex>()
}

/// Whether `B` is Flex under burn's autodiff (training on the CPU); always false without the
/// `autodiff` feature.
pub(crate) fn is_autodiff_flex<B: Backend>() -> bool {
    #[cfg(feature = "autodiff")]
    {
        TypeId::of::<B>() == TypeId::of::<burn::backend::Autodiff<Flex>>()
    }
    #[cfg(not(feature = "autodiff"))]
    {
        false
    }
}

/// The Flex tensor behind a float tensor, when `B` is Flex and the values are f32.
pub(crate) fn flex<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Option<FlexTensor> {
    if !is_flex::<B>() {
        return None;
    }
    let f = float_primitive::<B, D, FlexTensor>(t)?;
    (f.dtype() == burn::tensor::DType::F32).then_some(f)
}

/// The float primitive of `t` as the concrete type `P`, when it is one.
pub(crate) fn float_primitive<B: Backend, const D: usize, P: Clone + 'static>(
    t: &Tensor<B, D>,
) -> Option<P> {
    match t.clone().into_primitive() {
        TensorPrimitive::Float(p) => (&p as &dyn Any).downcast_ref::<P>().cloned(),
        TensorPrimitive::QFloat(_) => None,
    }
}

/// The Flex tensor behind a float tensor, taken by value (the buffer's holders stay as many),
/// or the tensor back when `B` is not Flex or the tensor is quantized.
pub(crate) fn into_flex<B: Backend, const D: usize>(
    t: Tensor<B, D>,
) -> Result<FlexTensor, Tensor<B, D>> {
    if !is_flex::<B>() {
        return Err(t);
    }
    match t.into_primitive() {
        TensorPrimitive::Float(p) => {
            let boxed: Box<dyn Any> = Box::new(p);
            Ok(*boxed
                .downcast::<FlexTensor>()
                .unwrap_or_else(|_| unreachable!("Flex's float primitive is a FlexTensor")))
        }
        q => Err(Tensor::from_primitive(q)),
    }
}

/// The Flex tensor behind a bool tensor (stored one byte per value), with or without autodiff.
pub(crate) fn flex_bool<B: Backend, const D: usize>(t: &Tensor<B, D, Bool>) -> Option<FlexTensor> {
    // Autodiff keeps the inner backend's bool tensors as they are.
    if !(is_flex::<B>() || is_autodiff_flex::<B>()) {
        return None;
    }
    let p = t.clone().into_primitive();
    (&p as &dyn Any).downcast_ref::<FlexTensor>().cloned()
}

/// Wraps a Flex tensor as a float tensor of backend `B` (which the caller checked is Flex).
pub(crate) fn wrap<B: Backend, const D: usize>(t: FlexTensor) -> Tensor<B, D> {
    wrap_primitive(t)
}

/// Wraps `p` as a float tensor of backend `B`, whose float primitive the caller checked is `P`.
pub(crate) fn wrap_primitive<B: Backend, const D: usize, P: 'static>(p: P) -> Tensor<B, D> {
    let boxed: Box<dyn Any> = Box::new(p);
    let p = boxed
        .downcast::<B::FloatTensorPrimitive>()
        .unwrap_or_else(|_| unreachable!("the caller checked the backend's primitive"));
    Tensor::from_primitive(TensorPrimitive::Float(*p))
}

/// A new contiguous f32 tensor of `shape` holding `values`.
pub(crate) fn from_vec(values: Vec<f32>, shape: &[usize]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape.to_vec()))
}

/// A tensor of `shape` over `values`, laid out with `strides` (in elements).
pub(crate) fn from_vec_strided(values: Vec<f32>, shape: &[usize], strides: &[isize]) -> FlexTensor {
    let t = from_vec(values, &[shape.iter().product::<usize>()]);
    let layout = Layout::new(shape.to_vec().into(), strides.to_vec(), 0);
    t.with_layout(layout)
}

/// [`flex`] then [`rows`] for an optional operand (a bias, a residual): `None` when the kernel
/// does not apply, `Some(None)` when there is no operand.
pub(crate) fn optional_rows<B: Backend, const D: usize>(
    t: Option<&Tensor<B, D>>,
) -> Option<Option<FlexTensor>> {
    match t {
        Some(t) => Some(Some(rows(&flex(t)?))),
        None => Some(None),
    }
}

/// The values of a tensor whose layout is contiguous (row-major), as one slice.
pub(crate) fn contiguous(t: &FlexTensor) -> Option<&[f32]> {
    t.as_slice::<f32>()
}

/// The tensor's values with every dimension but the last flattened to rows, copied only when
/// the layout is not already contiguous.
pub(crate) fn rows(t: &FlexTensor) -> FlexTensor {
    if contiguous(t).is_some() {
        t.clone()
    } else {
        t.to_contiguous()
    }
}
