//! Writing into part of a tensor in place.
//!
//! burn's `slice_assign` on Flex copies the whole tensor before it writes (it keeps a second
//! handle on the buffer while it asks for a writable one, so the copy-on-write always copies).
//! For a growing key / value cache that is a copy of the whole cache per decoding step, as
//! concatenation was.

use crate::bridge;
use burn::tensor::{backend::Backend, bf16, f16, DType, Tensor};
use burn_flex::FlexTensor;

/// `tensor` with positions `at .. at + value.dims()[dim]` of dimension `dim` replaced by
/// `value`, whose other dimensions equal the tensor's: `slice_assign` over those positions.
///
/// A contiguous Flex tensor that nothing else holds (no clone, no view) is written in place,
/// in f32, bf16 or f16; any other tensor goes through burn's `slice_assign`, which copies it.
///
/// # Panics
/// As `slice_assign`: when `dim` is out of range, the positions run past the dimension, or the
/// other dimensions differ.
pub fn assign_along<B: Backend, const D: usize>(
    tensor: Tensor<B, D>,
    dim: usize,
    at: usize,
    value: Tensor<B, D>,
) -> Tensor<B, D> {
    let dims = tensor.dims();
    let len = value.dims()[dim];
    let fits = at + len <= dims[dim]
        && (0..D).all(|d| d == dim || dims[d] == value.dims()[d])
        && tensor.dtype() == value.dtype();
    let tensor = if fits {
        match bridge::into_flex(tensor) {
            Ok(flex) => match write_in_place(flex, dim, at, &value) {
                Ok(written) => return bridge::wrap(written),
                Err(flex) => bridge::wrap(flex),
            },
            Err(tensor) => tensor,
        }
    } else {
        tensor
    };
    let ranges: [std::ops::Range<usize>; D] =
        std::array::from_fn(|d| if d == dim { at..at + len } else { 0..dims[d] });
    tensor.slice_assign(ranges, value)
}

/// Writes `value` into `dst` in place, or gives `dst` back untouched when it is shared, not
/// contiguous from its buffer's start, or of a dtype not handled here.
fn write_in_place<B: Backend, const D: usize>(
    mut dst: FlexTensor,
    dim: usize,
    at: usize,
    value: &Tensor<B, D>,
) -> Result<FlexTensor, FlexTensor> {
    let layout = dst.layout();
    if !(dst.is_unique() && layout.is_contiguous() && layout.start_offset() == 0) {
        return Err(dst);
    }
    let Some(src) = bridge::float_primitive::<B, D, FlexTensor>(value) else {
        return Err(dst);
    };
    let src = src.to_contiguous();
    let dims = dst.layout().shape().to_vec();
    // The tensor is `outer` blocks of `dims[dim] · inner` values; `value` is `outer` blocks of
    // `len · inner`, each going to positions `at ..` of its block.
    let outer: usize = dims[..dim].iter().product();
    let inner: usize = dims[dim + 1..].iter().product();
    let (stride, len) = (dims[dim] * inner, src.layout().shape()[dim] * inner);
    match dst.dtype() {
        DType::F32 => copy_blocks::<f32>(&mut dst, &src, [outer, stride, at * inner, len]),
        DType::BF16 => copy_blocks::<bf16>(&mut dst, &src, [outer, stride, at * inner, len]),
        DType::F16 => copy_blocks::<f16>(&mut dst, &src, [outer, stride, at * inner, len]),
        _ => return Err(dst),
    }
    Ok(dst)
}

/// `dst[o · stride + offset ..][.. len] = src[o · len ..][.. len]` for each of `outer` blocks.
fn copy_blocks<E: burn::tensor::Element + bytemuck::Pod>(
    dst: &mut FlexTensor,
    src: &FlexTensor,
    [outer, stride, offset, len]: [usize; 4],
) {
    let src = src.storage::<E>();
    let dst = dst
        .try_storage_mut::<E>()
        .expect("the caller checked that the buffer is not shared");
    for (o, block) in src[..outer * len].chunks_exact(len.max(1)).enumerate() {
        let start = o * stride + offset;
        dst[start..start + len].copy_from_slice(block);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::TensorData;

    fn tensor(values: Vec<f32>, shape: [usize; 3]) -> Tensor<Flex, 3> {
        Tensor::from_data(TensorData::new(values, shape), &Default::default())
    }

    /// The buffer's address, to tell a write in place from a copy.
    fn address(t: &Tensor<Flex, 3>) -> usize {
        let flex = bridge::flex(t).expect("a Flex f32 tensor");
        flex.bytes().as_ptr() as usize
    }

    #[test]
    fn writes_the_positions_in_place_and_equals_slice_assign() {
        let base: Vec<f32> = (0..2 * 5 * 3).map(|v| v as f32).collect();
        let value = tensor((100..112).map(|v| v as f32).collect(), [2, 2, 3]);
        let want = tensor(base.clone(), [2, 5, 3])
            .slice_assign([0..2, 1..3, 0..3], value.clone())
            .into_data();
        let buffer = tensor(base.clone(), [2, 5, 3]);
        let before = address(&buffer);
        let got = assign_along(buffer, 1, 1, value.clone());
        assert_eq!(address(&got), before, "written in place");
        assert_eq!(got.into_data(), want);
        // A non-contiguous value (a transposed view) is read in its logical order.
        let transposed = tensor((100..112).map(|v| v as f32).collect(), [2, 3, 2]).swap_dims(1, 2);
        let want = tensor(base.clone(), [2, 5, 3])
            .slice_assign([0..2, 3..5, 0..3], transposed.clone())
            .into_data();
        assert_eq!(
            assign_along(tensor(base, [2, 5, 3]), 1, 3, transposed).into_data(),
            want
        );
    }

    #[test]
    fn a_shared_buffer_is_copied_and_its_other_holder_keeps_its_values() {
        let base: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let buffer = tensor(base.clone(), [1, 4, 3]);
        let kept = buffer.clone();
        let view = buffer.clone().slice([0..1, 0..2, 0..3]);
        let got = assign_along(buffer, 1, 2, tensor(vec![-1.0; 6], [1, 2, 3]));
        assert_ne!(address(&got), address(&kept));
        assert_eq!(kept.into_data(), TensorData::new(base.clone(), [1, 4, 3]));
        assert_eq!(
            view.into_data(),
            TensorData::new(base[..6].to_vec(), [1, 2, 3])
        );
        let mut want = base[..6].to_vec();
        want.extend([-1.0; 6]);
        assert_eq!(got.into_data(), TensorData::new(want, [1, 4, 3]));
    }

    #[test]
    fn half_precision_buffers_are_written_in_place_too() {
        for dtype in [DType::BF16, DType::F16] {
            let buffer = tensor((0..8).map(|v| v as f32).collect(), [1, 4, 2]).cast(dtype);
            let value = tensor(vec![9.0, 10.0], [1, 1, 2]).cast(dtype);
            let flex = |t: &Tensor<Flex, 3>| {
                bridge::float_primitive::<Flex, 3, FlexTensor>(t)
                    .expect("a Flex tensor")
                    .bytes()
                    .as_ptr() as usize
            };
            let before = flex(&buffer);
            let got = assign_along(buffer, 1, 3, value);
            assert_eq!(flex(&got), before, "{dtype:?} written in place");
            let values = got.cast(DType::F32).into_data().to_vec::<f32>().unwrap();
            assert_eq!(
                values,
                [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 9.0, 10.0],
                "{dtype:?}"
            );
        }
    }
}
