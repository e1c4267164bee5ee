//! Scaled dot-product attention that reads its heads in place.
//!
//! The projections of a transformer layer come out as `[batch · seq, heads · head_dim]` rows;
//! viewing them as `[batch, heads, seq, head_dim]` is a permutation, which Flex's fused
//! attention first copies into contiguous tensors, and whose output must be copied back. Here
//! each (batch, head) pair is one task: two small GEMMs read the operands through their
//! strides, and the context is written straight into `[batch, seq, heads, head_dim]` rows, so
//! merging the heads afterwards is a free reshape.

use crate::bridge;
use crate::math;
use crate::ptr::{Shared, SharedMut};
use burn::tensor::{backend::Backend, Bool, BoolStore, DType, Tensor};
use burn_flex::FlexTensor;
use rayon::prelude::*;

/// Which keys each query may attend to.
pub struct AttentionMask<'a, B: Backend> {
    /// `[batch, seq_k]`, true where a key is padding: no query attends to it. A query whose
    /// every key is masked attends uniformly, as `softmax(scores.masked_fill(mask, f32::MIN))`
    /// does.
    pub key_padding: Option<&'a Tensor<B, 2, Bool>>,
    /// Query `i` sees keys `0 ..= i + seq_k - seq_q` (a decoder's mask, with cached keys
    /// before the queries).
    pub causal: bool,
}

impl<B: Backend> Default for AttentionMask<'_, B> {
    fn default() -> Self {
        Self {
            key_padding: None,
            causal: false,
        }
    }
}

/// `softmax(q · kᵀ / √head_dim + mask) · v` for `q: [batch, heads, seq_q, head_dim]`,
/// `k: [batch, kv_heads, seq_k, head_dim]` and `v: [batch, kv_heads, seq_k, v_dim]`, where
/// `heads` is a multiple of `kv_heads` (grouped-query attention: query head `h` reads key /
/// value head `h / (heads / kv_heads)`).
///
/// The operands may be any strided views whose last dimension is contiguous. The result has
/// shape `[batch, heads, seq_q, v_dim]` and is laid out as `[batch, seq_q, heads, v_dim]`, so
/// `.swap_dims(1, 2).reshape([batch, seq_q, heads · v_dim])` does not copy. `None` when the
/// kernel does not apply (see the crate docs) or the shapes disagree.
pub fn attention<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    mask: AttentionMask<'_, B>,
) -> Option<Tensor<B, 4>> {
    let (qf, kf, vf) = (bridge::flex(q)?, bridge::flex(k)?, bridge::flex(v)?);
    let [batch, heads, seq_q, d] = dims4(&qf);
    let [kb, kv_heads, seq_k, kd] = dims4(&kf);
    let [vb, vh, vs, dv] = dims4(&vf);
    let shapes_agree = kb == batch
        && vb == batch
        && vh == kv_heads
        && vs == seq_k
        && kd == d
        && kv_heads > 0
        && heads % kv_heads == 0
        && seq_k > 0;
    if !shapes_agree || [&qf, &kf, &vf].iter().any(|t| t.layout().strides()[3] != 1) {
        return None;
    }
    let padding = match mask.key_padding {
        Some(m) => {
            let p = key_padding(&bridge::flex_bool(m)?)?;
            (p.len() == batch * seq_k).then_some(p)?
        }
        None => Vec::new(),
    };
    let group = heads / kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let causal = mask.causal;
    let no_padding = vec![false; seq_k];
    let causal_offset = seq_k as isize - seq_q as isize;
    let mut out = vec![0.0f32; batch * seq_q * heads * dv];
    let out_ptr = SharedMut::new(out.as_mut_ptr());
    let (qs, ks, vs_) = (
        qf.layout().strides(),
        kf.layout().strides(),
        vf.layout().strides(),
    );
    let (q_data, k_data, v_data) = (base(&qf), base(&kf), base(&vf));
    let tasks = if seq_q == 0 { 0 } else { batch * heads };
    (0..tasks).into_par_iter().for_each(|task| {
        let (bi, hi) = (task / heads, task % heads);
        let kh = hi / group;
        let mut scores = vec![0.0f32; seq_q * seq_k];
        // SAFETY: the offsets stay inside each tensor's buffer (its layout's own strides over
        // its own shape); this task writes only rows `bi` and head `hi` of `out`, which no
        // other task writes.
        unsafe {
            gemm::gemm(
                seq_q,
                seq_k,
                d,
                scores.as_mut_ptr(),
                1,
                seq_k as isize,
                false,
                q_data.at(bi as isize * qs[0] + hi as isize * qs[1]),
                1,
                qs[2],
                k_data.at(bi as isize * ks[0] + kh as isize * ks[1]),
                ks[2],
                1,
                0.0,
                scale,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        let pad = if padding.is_empty() {
            &no_padding[..]
        } else {
            &padding[bi * seq_k..(bi + 1) * seq_k]
        };
        math::masked_softmax_rows(&mut scores, pad, causal.then_some(causal_offset));
        let row_stride = (heads * dv) as isize;
        unsafe {
            gemm::gemm(
                seq_q,
                dv,
                seq_k,
                out_ptr.at(bi as isize * seq_q as isize * row_stride + (hi * dv) as isize),
                1,
                row_stride,
                false,
                scores.as_ptr(),
                1,
                seq_k as isize,
                v_data.at(bi as isize * vs_[0] + kh as isize * vs_[1]),
                1,
                vs_[2],
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    });
    let strides = [
        (seq_q * heads * dv) as isize,
        dv as isize,
        (heads * dv) as isize,
        1,
    ];
    let t = bridge::from_vec_strided(out, &[batch, heads, seq_q, dv], &strides);
    Some(bridge::wrap(t))
}

/// The four sizes of a 4-D tensor.
fn dims4(t: &FlexTensor) -> [usize; 4] {
    let s = t.layout().shape();
    [s[0], s[1], s[2], s[3]]
}

/// A tensor's first element, as a pointer the tasks may share (the buffers are read only).
fn base(t: &FlexTensor) -> Shared {
    // SAFETY: the start offset lies inside the buffer.
    Shared::new(unsafe { t.storage::<f32>().as_ptr().add(t.layout().start_offset()) })
}

/// The padding flags of a `[batch, seq_k]` bool tensor, row-major.
fn key_padding(m: &FlexTensor) -> Option<Vec<bool>> {
    if !matches!(m.dtype(), DType::Bool(BoolStore::Native | BoolStore::U8)) {
        return None;
    }
    let c = m.to_contiguous();
    let (start, end) = c.layout().contiguous_offsets()?;
    Some(
        c.storage::<u8>()[start..end]
            .iter()
            .map(|&b| b != 0)
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::module::attention as burn_attention;
    use burn::tensor::ops::AttentionModuleOptions;
    use burn::tensor::{Distribution, Tolerance};

    type T4 = Tensor<Flex, 4>;

    fn random(shape: [usize; 4]) -> T4 {
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
    }

    /// Heads viewed out of `[batch, seq, heads · d]` rows, as the models produce them.
    fn heads_view(batch: usize, seq: usize, heads: usize, d: usize) -> T4 {
        random([batch, seq, heads, d]).swap_dims(1, 2)
    }

    fn reference(
        q: &T4,
        k: &T4,
        v: &T4,
        padding: Option<&Tensor<Flex, 2, Bool>>,
        causal: bool,
    ) -> T4 {
        let [b, h, sq, _] = q.dims();
        let [_, kvh, sk, _] = k.dims();
        let (k, v) = if kvh == h {
            (k.clone(), v.clone())
        } else {
            let rep = |t: &T4| {
                let [b, kvh, s, d] = t.dims();
                t.clone()
                    .unsqueeze_dim::<5>(2)
                    .expand([b, kvh, h / kvh, s, d])
                    .reshape([b, h, s, d])
            };
            (rep(k), rep(v))
        };
        let mask = padding.map(|p| p.clone().reshape([b, 1, 1, sk]).expand([b, h, sq, sk]));
        let options = AttentionModuleOptions {
            is_causal: causal,
            ..Default::default()
        };
        burn_attention(q.clone(), k, v, mask, None, options)
    }

    fn close(got: T4, want: T4) {
        got.into_data()
            .assert_approx_eq::<f32>(&want.into_data(), Tolerance::rel_abs(1e-5, 1e-6));
    }

    #[test]
    fn equals_burns_attention_on_head_views_with_padding() {
        let (b, s, h, d) = (3, 17, 4, 8);
        let (q, k, v) = (
            heads_view(b, s, h, d),
            heads_view(b, s, h, d),
            heads_view(b, s, h, d),
        );
        let device = Default::default();
        let lengths = [17usize, 9, 1];
        let flags: Vec<bool> = lengths
            .iter()
            .flat_map(|&l| (0..s).map(move |j| j >= l))
            .collect();
        let padding = Tensor::<Flex, 2, Bool>::from_data(
            burn::tensor::TensorData::new(flags, [b, s]),
            &device,
        );
        let mask = AttentionMask {
            key_padding: Some(&padding),
            causal: false,
        };
        let got = attention(&q, &k, &v, mask).unwrap();
        close(got.clone(), reference(&q, &k, &v, Some(&padding), false));
        // The heads come back laid out as rows: merging them is a view.
        let merged = got.swap_dims(1, 2).reshape([b, s, h * d]);
        assert_eq!(merged.dims(), [b, s, h * d]);
    }

    #[test]
    fn causal_grouped_query_attention_with_cached_keys() {
        // 6 query heads over 2 key / value heads; 3 new queries after 5 cached keys.
        let q = random([2, 6, 3, 16]);
        let (k, v) = (random([2, 2, 8, 16]), random([2, 2, 8, 16]));
        let mask = AttentionMask {
            key_padding: None,
            causal: true,
        };
        close(
            attention(&q, &k, &v, mask).unwrap(),
            reference(&q, &k, &v, None, true),
        );
    }

    #[test]
    fn disagreeing_shapes_are_left_to_burn() {
        let q = random([1, 3, 4, 8]);
        let k = random([1, 2, 4, 8]);
        assert!(attention(&q, &k, &k, AttentionMask::default()).is_none());
        let k = random([1, 3, 4, 7]);
        assert!(attention(&q, &k, &k, AttentionMask::default()).is_none());
    }
}
