//! Conversions between float32 and the half-precision dtypes (bfloat16, float16).
//!
//! A half-precision model keeps its weights in two bytes and computes in float32: every weight
//! is widened where it is used ([`float32`], exact). Flex's own `cast` goes through a float64
//! buffer one value at a time and rounds some ties away from even, unlike torch; these run in
//! parallel over contiguous buffers and round to nearest even as torch's `.to()` does.

use burn::tensor::{backend::Backend, bf16, f16, DType, Tensor, TensorData};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use crate::bridge;

/// Values per parallel task of a conversion.
const CHUNK: usize = 1 << 16;

/// `t` in float32: a bfloat16 / float16 tensor (a half-precision model's weights) is widened,
/// which is exact; any other tensor is returned as it is.
pub fn float32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    match t.dtype() {
        DType::BF16 | DType::F16 => {}
        _ => return t,
    }
    if bridge::is_flex::<B>() {
        return in_memory_order(t, |t| {
            match bridge::float_primitive::<B, D, FlexTensor>(&t) {
                Some(f) => bridge::wrap(widen_flex(&f)),
                None => t.cast(DType::F32),
            }
        });
    }
    t.cast(DType::F32)
}

/// `t` rounded to `dtype` (bfloat16 or float16) to nearest even, as torch's `.to(dtype)`;
/// float32 values beyond float16's range become infinite. Other dtypes are burn's `cast`.
pub fn to_half<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if t.dtype() == dtype {
        return t;
    }
    if bridge::is_flex::<B>() && matches!(dtype, DType::BF16 | DType::F16) {
        return in_memory_order(t, |t| match bridge::flex(&t) {
            Some(f) => bridge::wrap(narrow_flex(&f, dtype)),
            None => t.cast(dtype),
        });
    }
    t.cast(dtype)
}

/// `convert(t)` in `t`'s own memory order. A tensor whose last two dimensions are swapped from
/// a contiguous one (a linear weight kept in HF's `[out, in]` order and read as `[in, out]`)
/// is converted as that contiguous tensor and swapped back: the conversions write row-major
/// order, and the order decides which product kernels read the weight (a `.bfloat16()`
/// causal LM keeps decoding's dot products).
fn in_memory_order<B: Backend, const D: usize>(
    t: Tensor<B, D>,
    convert: impl FnOnce(Tensor<B, D>) -> Tensor<B, D>,
) -> Tensor<B, D> {
    let contiguous = |x: &Tensor<B, D>| {
        bridge::float_primitive::<B, D, FlexTensor>(x).is_some_and(|f| f.layout().is_contiguous())
    };
    if D >= 2 && !contiguous(&t) {
        let swapped = t.clone().swap_dims(D - 2, D - 1);
        if contiguous(&swapped) {
            return convert(swapped).swap_dims(D - 2, D - 1);
        }
    }
    convert(t)
}

/// A float32 Flex tensor holding the values of a bfloat16 / float16 one.
fn widen_flex(t: &FlexTensor) -> FlexTensor {
    let shape = t.layout().shape().to_vec();
    let values = match t.dtype() {
        DType::BF16 => map_values(&contiguous::<bf16>(t), |v: bf16| v.to_f32()),
        DType::F16 => map_values(&contiguous::<f16>(t), |v: f16| v.to_f32()),
        other => unreachable!("widen_flex called on {other:?}"),
    };
    bridge::from_vec(values, &shape)
}

/// A bfloat16 / float16 Flex tensor of a float32 one's values, rounded to nearest even.
fn narrow_flex(t: &FlexTensor, dtype: DType) -> FlexTensor {
    let t = bridge::rows(t);
    let shape = t.layout().shape().to_vec();
    let data = match dtype {
        DType::BF16 => TensorData::new(map_values(&t, bf16::from_f32), shape),
        DType::F16 => TensorData::new(map_values(&t, f16::from_f32), shape),
        other => unreachable!("narrow_flex called for {other:?}"),
    };
    FlexTensor::from_data(data)
}

/// `t` itself when its values are one contiguous run of `E`, else a contiguous copy.
fn contiguous<E: burn::tensor::Element + bytemuck::Pod>(t: &FlexTensor) -> FlexTensor {
    if t.as_slice::<E>().is_some() {
        t.clone()
    } else {
        t.to_contiguous()
    }
}

/// `f` of every value of a contiguous tensor of `E`s, in parallel chunks.
pub(crate) fn map_values<E, T>(t: &FlexTensor, f: impl Fn(E) -> T + Sync) -> Vec<T>
where
    E: burn::tensor::Element + bytemuck::Pod + Sync,
    T: Copy + Send,
{
    let src = t.as_slice::<E>().expect("a contiguous tensor of E");
    // Written once into uninitialised memory: zeroing it first would be a second pass over
    // as many bytes (a bf16 model widens its weights this way on every forward pass).
    let mut out: Vec<T> = Vec::with_capacity(src.len());
    out.spare_capacity_mut()[..src.len()]
        .par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(o, s)| {
            o.iter_mut().zip(s).for_each(|(o, &s)| {
                o.write(f(s));
            })
        });
    // SAFETY: every one of the `src.len()` values was written just above.
    unsafe { out.set_len(src.len()) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn rounds_ties_to_even_and_widens_exactly() {
        let device = Default::default();
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: torch rounds it to 1.0 (the even
        // one); 1 + 3 * 2^-8 lies halfway between 1 + 2^-7 and 1 + 2^-6: it goes to the latter.
        let values = vec![
            1.0 + 2f32.powi(-8),
            1.0 + 3.0 * 2f32.powi(-8),
            -3.3,
            65519.0,
            7e4,
        ];
        let t = Tensor::<Flex, 1>::from_data(TensorData::new(values.clone(), [5]), &device);
        let b = to_half(t.clone(), DType::BF16);
        assert_eq!(b.dtype(), DType::BF16);
        let got: Vec<f32> = float32(b).into_data().to_vec().unwrap();
        let want: Vec<f32> = values.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
        assert_eq!(got, want);
        assert_eq!(got[0], 1.0);
        assert_eq!(got[1], 1.0 + 2f32.powi(-6));
        let h: Vec<f32> = float32(to_half(t, DType::F16))
            .into_data()
            .to_vec()
            .unwrap();
        assert_eq!(h[3], 65504.0);
        assert!(h[4].is_infinite());
    }

    #[test]
    fn strided_views_convert_in_logical_order() {
        let device = Default::default();
        let t = Tensor::<Flex, 2>::from_data(
            TensorData::new((0..6).map(|v| v as f32).collect::<Vec<_>>(), [2, 3]),
            &device,
        )
        .transpose();
        let got: Vec<f32> = float32(to_half(t, DType::BF16))
            .into_data()
            .to_vec()
            .unwrap();
        assert_eq!(got, vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
    }

    #[test]
    fn a_transposed_tensor_keeps_its_memory_order() {
        let device = Default::default();
        let stored = Tensor::<Flex, 2>::from_data(
            TensorData::new((0..6).map(|v| v as f32).collect::<Vec<_>>(), [2, 3]),
            &device,
        );
        let strides = |t: &Tensor<Flex, 2>| {
            bridge::float_primitive::<Flex, 2, FlexTensor>(t)
                .unwrap()
                .layout()
                .strides()
                .to_vec()
        };
        let half = to_half(stored.transpose(), DType::BF16);
        assert_eq!(
            strides(&half),
            vec![1, 3],
            "still the transpose of a [2, 3] buffer"
        );
        let back = float32(half);
        assert_eq!(strides(&back), vec![1, 3]);
        let got: Vec<f32> = back.into_data().to_vec().unwrap();
        assert_eq!(got, vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
    }
}
