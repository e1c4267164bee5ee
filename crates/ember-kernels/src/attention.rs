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
use crate::team::for_each_part;
use burn::tensor::{backend::Backend, Bool, BoolStore, DType, Tensor};
use burn_flex::FlexTensor;
use rayon::prelude::*;

/// Which keys each query may attend to, and the dropout on the attention weights.
pub struct AttentionMask<'a, B: Backend> {
    /// `[batch, seq_k]`, true where a key is padding: no query attends to it. A query whose
    /// every key is masked attends uniformly, as `softmax(scores.masked_fill(mask, f32::MIN))`
    /// does.
    pub key_padding: Option<&'a Tensor<B, 2, Bool>>,
    /// Query `i` sees keys `0 ..= i + seq_k - seq_q` (a decoder's mask, with cached keys
    /// before the queries).
    pub causal: bool,
    /// `[batch, heads, seq_q, seq_k]`, multiplied into the attention weights after the softmax:
    /// dropout during training (a mask of 0 and `1 / (1 - p)`, as from
    /// [`dropout_mask`](crate::dropout_mask)).
    pub dropout: Option<&'a Tensor<B, 4>>,
}

impl<B: Backend> Default for AttentionMask<'_, B> {
    fn default() -> Self {
        Self {
            key_padding: None,
            causal: false,
            dropout: None,
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
/// `.swap_dims(1, 2).reshape([batch, seq_q, heads · v_dim])` does not copy. Under autodiff
/// (feature `autodiff`) it is one recorded operation whose backward pass runs per head too.
/// `None` when the kernel does not apply (see the crate docs) or the shapes disagree.
pub fn attention<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    mask: AttentionMask<'_, B>,
) -> Option<Tensor<B, 4>> {
    #[cfg(feature = "autodiff")]
    if bridge::is_autodiff_flex::<B>() {
        return crate::tracked::attention(q, k, v, mask);
    }
    let (qf, kf, vf) = (bridge::flex(q)?, bridge::flex(k)?, bridge::flex(v)?);
    let padding = match mask.key_padding {
        Some(m) => Some(key_padding(&bridge::flex_bool(m)?)?),
        None => None,
    };
    let dropout = match mask.dropout {
        Some(m) => Some(bridge::rows(&bridge::flex(m)?)),
        None => None,
    };
    let masks = Masks {
        padding: padding.unwrap_or_default(),
        causal: mask.causal,
        dropout,
    };
    let (out, _) = attention_flex(&qf, &kf, &vf, &masks, false)?;
    Some(bridge::wrap(out))
}

/// A matrix operand of [`product`]: its first element and its row and column strides.
#[derive(Debug, Clone, Copy)]
struct Strided {
    at: *const f32,
    row: isize,
    col: isize,
}

impl Strided {
    fn new(at: *const f32, row: isize, col: isize) -> Self {
        Self { at, row, col }
    }
}

/// `dst = scale · lhs · rhs`, or `dst += scale · lhs · rhs` when `accumulate`, for
/// `lhs: [m, k]` and `rhs: [k, n]` read through their strides, into `dst` rows `dst.1` apart
/// with contiguous columns; one `gemm` call on the calling thread (each attention task is one
/// head, and the tasks already fill the threads).
///
/// # Safety
/// Every element the strides reach over `[m, k]` and `[k, n]` lies inside its buffer, and the
/// `m × n` elements of `dst` lie inside its buffer and belong to the calling task alone.
unsafe fn product(
    [m, n, k]: [usize; 3],
    dst: (*mut f32, isize),
    accumulate: bool,
    lhs: Strided,
    rhs: Strided,
    scale: f32,
) {
    // SAFETY: as the caller guarantees; `gemm` does not read `dst` unless `accumulate`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.0,
            1,
            dst.1,
            accumulate,
            lhs.at,
            lhs.col,
            lhs.row,
            rhs.at,
            rhs.col,
            rhs.row,
            if accumulate { 1.0 } else { 0.0 },
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Query rows per block of a causal attention (see `Masks::query_blocks`): large enough for
/// `gemm`'s microkernels (which take 64 rows at a time with AVX-512), small enough that the
/// blocks skip most of the hidden keys.
const QUERY_BLOCK: usize = 64;

/// The masks of one attention call, read by the forward and backward passes.
#[derive(Debug, Clone)]
pub(crate) struct Masks {
    /// `[batch, seq_k]` key padding flags, or empty for none.
    pub(crate) padding: Vec<bool>,
    /// Whether query `i` sees only keys up to `i + seq_k - seq_q`.
    pub(crate) causal: bool,
    /// A contiguous `[batch, heads, seq_q, seq_k]` factor on the weights (dropout).
    pub(crate) dropout: Option<FlexTensor>,
}

/// The shapes of one attention call, checked.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shapes {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    seq_q: usize,
    seq_k: usize,
    d: usize,
    dv: usize,
}

impl Shapes {
    /// The shapes of `q`, `k`, `v` and the masks, when they agree and the kernel reads them.
    pub(crate) fn of(
        qf: &FlexTensor,
        kf: &FlexTensor,
        vf: &FlexTensor,
        masks: &Masks,
    ) -> Option<Self> {
        let [batch, heads, seq_q, d] = dims4(qf);
        let [kb, kv_heads, seq_k, kd] = dims4(kf);
        let [vb, vh, vs, dv] = dims4(vf);
        let agree = kb == batch
            && vb == batch
            && vh == kv_heads
            && vs == seq_k
            && kd == d
            && kv_heads > 0
            && heads % kv_heads == 0
            && seq_k > 0
            && (masks.padding.is_empty() || masks.padding.len() == batch * seq_k)
            && masks
                .dropout
                .as_ref()
                .is_none_or(|m| m.layout().shape().to_vec() == [batch, heads, seq_q, seq_k]);
        let inner_contiguous = [qf, kf, vf].iter().all(|t| t.layout().strides()[3] == 1);
        (agree && inner_contiguous).then_some(Self {
            batch,
            heads,
            kv_heads,
            seq_q,
            seq_k,
            d,
            dv,
        })
    }

    /// The scores' scale, `1 / √head_dim`.
    pub(crate) fn scale(&self) -> f32 {
        1.0 / (self.d as f32).sqrt()
    }

    /// Query heads per key / value head.
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// Values in one head's `[seq_q, seq_k]` weights.
    fn block(&self) -> usize {
        self.seq_q * self.seq_k
    }

    /// The `[batch, heads, seq, dim]` strides of a buffer laid out as `[batch, seq, heads, dim]`.
    fn rows_layout(batch_heads: [usize; 2], seq: usize, dim: usize) -> [isize; 4] {
        let heads = batch_heads[1];
        [
            (seq * heads * dim) as isize,
            dim as isize,
            (heads * dim) as isize,
            1,
        ]
    }
}

impl Masks {
    /// The key padding flags of batch row `bi` (`none`, all false, without padding) and the
    /// causal offset, as [`math::masked_softmax_rows`] and [`math::mask_rows`] read them.
    fn of_row<'a>(
        &'a self,
        bi: usize,
        sh: &Shapes,
        none: &'a [bool],
    ) -> (&'a [bool], Option<isize>) {
        let seq_k = sh.seq_k;
        let padding = if self.padding.is_empty() {
            none
        } else {
            &self.padding[bi * seq_k..(bi + 1) * seq_k]
        };
        let offset = seq_k as isize - sh.seq_q as isize;
        (padding, self.causal.then_some(offset))
    }

    /// The blocks of query rows and how many keys each block sees (a prefix of the keys).
    ///
    /// A causal mask without padding hides from query `i` every key after `i + seq_k - seq_q`,
    /// so a block of queries needs scores, and a gradient, only against the keys its last row
    /// sees: blocks of [`QUERY_BLOCK`] rows skip about half of the products at seq 256. Every
    /// row still sees key 0, so its hidden keys get weight exactly 0 whether they were scored
    /// or not. Otherwise (padding, no causal mask, more queries than keys, short sequences)
    /// there is one block of all queries against all keys.
    fn query_blocks(&self, sh: &Shapes) -> Vec<(std::ops::Range<usize>, usize)> {
        let (seq_q, seq_k) = (sh.seq_q, sh.seq_k);
        if !self.causal || !self.padding.is_empty() || seq_k < seq_q || seq_q < 2 * QUERY_BLOCK {
            return vec![(0..seq_q, seq_k)];
        }
        let offset = seq_k - seq_q;
        (0..seq_q)
            .step_by(QUERY_BLOCK)
            .map(|r0| {
                let r1 = (r0 + QUERY_BLOCK).min(seq_q);
                (r0..r1, (r1 + offset).min(seq_k))
            })
            .collect()
    }

    /// The dropout factors of task `task` (one batch row and head), `[seq_q, seq_k]`.
    fn dropout_of(&self, task: usize, len: usize) -> Option<&[f32]> {
        let m = bridge::contiguous(self.dropout.as_ref()?)?;
        Some(&m[task * len..(task + 1) * len])
    }
}

/// The forward pass on Flex tensors: the output (see [`attention`]) and, when `keep_probs`,
/// the attention weights before dropout, `[batch, heads, seq_q, seq_k]` contiguous.
pub(crate) fn attention_flex(
    qf: &FlexTensor,
    kf: &FlexTensor,
    vf: &FlexTensor,
    masks: &Masks,
    keep_probs: bool,
) -> Option<(FlexTensor, Option<FlexTensor>)> {
    let sh = Shapes::of(qf, kf, vf, masks)?;
    let Shapes {
        batch,
        heads,
        seq_q,
        seq_k,
        d,
        dv,
        ..
    } = sh;
    let (group, scale, block) = (sh.group(), sh.scale(), sh.block());
    let few = seq_q * group <= FEW_QUERY_ROWS && seq_q > 0 && d > 0 && dv > 0;
    if few && !keep_probs && masks.dropout.is_none() {
        if let Some(out) = few_queries(qf, kf, vf, masks, &sh) {
            return Some((out, None));
        }
    }
    let no_padding = vec![false; seq_k];
    let mut out = vec![0.0f32; batch * seq_q * heads * dv];
    let out_ptr = SharedMut::new(out.as_mut_ptr());
    let mut probs = if keep_probs {
        vec![0.0f32; batch * heads * block]
    } else {
        Vec::new()
    };
    let probs_ptr = SharedMut::new(probs.as_mut_ptr());
    let (qs, ks, vs_) = (
        qf.layout().strides(),
        kf.layout().strides(),
        vf.layout().strides(),
    );
    let (q_data, k_data, v_data) = (base(qf), base(kf), base(vf));
    let tasks = if seq_q == 0 { 0 } else { batch * heads };
    let blocks = masks.query_blocks(&sh);
    (0..tasks).into_par_iter().for_each(|task| {
        let (bi, hi) = (task / heads, task % heads);
        let kh = hi / group;
        let mut scratch = Vec::new();
        let dropped: Vec<f32>;
        let scores: &mut [f32] = if keep_probs {
            // SAFETY: block `task` of `probs` belongs to this task alone.
            unsafe { std::slice::from_raw_parts_mut(probs_ptr.at((task * block) as isize), block) }
        } else {
            scratch.resize(block, 0.0);
            &mut scratch
        };
        // Scores against the keys each block of queries sees; the rest of each row is hidden
        // and set by the masked softmax.
        for (rows, keys) in &blocks {
            // SAFETY: the offsets stay inside each tensor's buffer (its layout's own strides
            // over its own shape); the scores of rows `rows` lie inside this task's block.
            unsafe {
                product(
                    [rows.len(), *keys, d],
                    (scores.as_mut_ptr().add(rows.start * seq_k), seq_k as isize),
                    false,
                    Strided::new(
                        q_data.at(bi as isize * qs[0]
                            + hi as isize * qs[1]
                            + rows.start as isize * qs[2]),
                        qs[2],
                        1,
                    ),
                    Strided::new(
                        k_data.at(bi as isize * ks[0] + kh as isize * ks[1]),
                        1,
                        ks[2],
                    ),
                    scale,
                );
            }
        }
        let (pad, causal) = masks.of_row(bi, &sh, &no_padding);
        math::masked_softmax_rows(scores, pad, causal);
        let weights: &[f32] = match masks.dropout_of(task, block) {
            Some(m) if keep_probs => {
                dropped = scores.iter().zip(m).map(|(p, m)| p * m).collect();
                &dropped
            }
            Some(m) => {
                math::mul_in_place(scores, m);
                scores
            }
            None => scores,
        };
        let row_stride = (heads * dv) as isize;
        for (rows, keys) in &blocks {
            // SAFETY: as above; this task writes only batch row `bi` and head `hi` of `out`,
            // which no other task writes.
            unsafe {
                product(
                    [rows.len(), dv, *keys],
                    (
                        out_ptr
                            .at((bi * seq_q + rows.start) as isize * row_stride
                                + (hi * dv) as isize),
                        row_stride,
                    ),
                    false,
                    Strided::new(weights.as_ptr().add(rows.start * seq_k), seq_k as isize, 1),
                    Strided::new(
                        v_data.at(bi as isize * vs_[0] + kh as isize * vs_[1]),
                        vs_[2],
                        1,
                    ),
                    1.0,
                );
            }
        }
    });
    let shape = [batch, heads, seq_q, dv];
    let out =
        bridge::from_vec_strided(out, &shape, &Shapes::rows_layout([batch, heads], seq_q, dv));
    let probs = keep_probs.then(|| bridge::from_vec(probs, &[batch, heads, seq_q, seq_k]));
    Some((out, probs))
}

/// Query rows per key / value head (its query heads times the queries) up to which
/// [`few_queries`] runs: decoding's one query per head, grouped.
const FEW_QUERY_ROWS: usize = 8;

/// Key and value elements per call from which [`few_queries`] splits its tasks over the
/// threads (below, waking a helper costs more than the reading it shares).
const SPLIT_KEYS: usize = 1 << 15;

/// [`attention_flex`] for few queries (decoding), without dropout: each batch row and key /
/// value head is one task whose query rows, those of all the query heads sharing the head,
/// read each cached key and value once, as dot products against the keys and a weighted sum
/// of the values rows, the same products a few-rows [`linear`](crate::linear) runs. The
/// general path's two `gemm` calls per query head read the cache once per query head and pay
/// `gemm`'s set-up for products of one row. The tasks go to the spinning team, whose helpers
/// are awake between a decoding step's products. `None` when a stride is negative.
fn few_queries(
    qf: &FlexTensor,
    kf: &FlexTensor,
    vf: &FlexTensor,
    masks: &Masks,
    sh: &Shapes,
) -> Option<FlexTensor> {
    let Shapes {
        batch,
        heads,
        kv_heads,
        seq_q,
        seq_k,
        d,
        dv,
    } = *sh;
    let (qs, ks, vs) = (
        qf.layout().strides(),
        kf.layout().strides(),
        vf.layout().strides(),
    );
    if [qs, ks, vs].iter().any(|s| s.iter().any(|&v| v < 0)) {
        return None;
    }
    let (group, scale) = (sh.group(), sh.scale());
    let rows = group * seq_q;
    let (q_data, k_data, v_data) = (base(qf), base(kf), base(vf));
    let mut out = vec![0.0f32; batch * seq_q * heads * dv];
    let out_ptr = SharedMut::new(out.as_mut_ptr());
    let no_padding = vec![false; seq_k];
    let tasks = batch * kv_heads;
    let task = |task: usize| {
        let (bi, kh) = (task / kv_heads, task % kv_heads);
        // The query rows, head by head: row g · seq_q + i is query i of head kh · group + g.
        let mut xs = Vec::with_capacity(rows * d);
        for g in 0..group {
            for i in 0..seq_q {
                let at =
                    bi as isize * qs[0] + (kh * group + g) as isize * qs[1] + i as isize * qs[2];
                // SAFETY: query (bi, head, i) holds d contiguous values inside the buffer.
                xs.extend_from_slice(unsafe { std::slice::from_raw_parts(q_data.at(at), d) });
            }
        }
        // SAFETY: key / value rows 0..seq_k of (bi, kh), `ks[2]` / `vs[2]` apart, each with
        // d / dv contiguous values, lie inside their buffers.
        let (keys, values) = unsafe {
            (
                std::slice::from_raw_parts(
                    k_data.at(bi as isize * ks[0] + kh as isize * ks[1]),
                    (seq_k - 1) * ks[2] as usize + d,
                ),
                std::slice::from_raw_parts(
                    v_data.at(bi as isize * vs[0] + kh as isize * vs[1]),
                    (seq_k - 1) * vs[2] as usize + dv,
                ),
            )
        };
        let mut scores = vec![0.0f32; rows * seq_k];
        math::few_rows_dots(&mut scores, &xs, keys, d, ks[2] as usize);
        scores.iter_mut().for_each(|s| *s *= scale);
        let (pad, causal) = masks.of_row(bi, sh, &no_padding);
        for head in scores.chunks_exact_mut(seq_q * seq_k) {
            math::masked_softmax_rows(head, pad, causal);
        }
        let mut context = vec![0.0f32; rows * dv];
        math::few_rows_axpy(
            &mut context,
            &scores,
            seq_k,
            0..seq_k,
            values,
            vs[2] as usize,
        );
        for (r, row) in context.chunks_exact(dv).enumerate() {
            let (g, i) = (r / seq_q, r % seq_q);
            let at = ((bi * seq_q + i) * heads + kh * group + g) * dv;
            // SAFETY: this task alone writes the heads of key / value head kh in batch row bi.
            let dst = unsafe { std::slice::from_raw_parts_mut(out_ptr.at(at as isize), dv) };
            dst.copy_from_slice(row);
        }
    };
    let threads = rayon::current_num_threads().max(1);
    if threads > 1 && tasks > 1 && tasks * seq_k * (d + dv) >= SPLIT_KEYS {
        for_each_part(threads, &|p| (p..tasks).step_by(threads).for_each(task));
    } else {
        (0..tasks).for_each(task);
    }
    let shape = [batch, heads, seq_q, dv];
    Some(bridge::from_vec_strided(
        out,
        &shape,
        &Shapes::rows_layout([batch, heads], seq_q, dv),
    ))
}

/// The gradients of [`attention_flex`]'s inputs `(dq, dk, dv)` from the output's `d_out`, the
/// kept attention weights `probs` and the same masks. Each task takes one batch row and one
/// key / value head, and the query heads that share it, so no two tasks write the same
/// gradient. The gradients are laid out as `[batch, seq, heads, dim]` rows.
pub(crate) fn attention_backward(
    qf: &FlexTensor,
    kf: &FlexTensor,
    vf: &FlexTensor,
    masks: &Masks,
    probs: &FlexTensor,
    d_out: &FlexTensor,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let sh = Shapes::of(qf, kf, vf, masks).expect("checked in the forward pass");
    let Shapes {
        batch,
        heads,
        kv_heads,
        seq_q,
        seq_k,
        d,
        dv,
    } = sh;
    let (group, scale, block) = (sh.group(), sh.scale(), sh.block());
    let no_padding = vec![false; seq_k];
    let probs = bridge::contiguous(probs).expect("kept contiguous");
    let mut dq = vec![0.0f32; batch * seq_q * heads * d];
    let mut dk = vec![0.0f32; batch * seq_k * kv_heads * d];
    let mut dvs = vec![0.0f32; batch * seq_k * kv_heads * dv];
    let (dq_ptr, dk_ptr, dv_ptr) = (
        SharedMut::new(dq.as_mut_ptr()),
        SharedMut::new(dk.as_mut_ptr()),
        SharedMut::new(dvs.as_mut_ptr()),
    );
    let (qs, ks, vs_, os) = (
        qf.layout().strides(),
        kf.layout().strides(),
        vf.layout().strides(),
        d_out.layout().strides(),
    );
    let (q_data, k_data, v_data, o_data) = (base(qf), base(kf), base(vf), base(d_out));
    let tasks = if seq_q == 0 { 0 } else { batch * kv_heads };
    let blocks = masks.query_blocks(&sh);
    (0..tasks).into_par_iter().for_each(|task| {
        let (bi, kh) = (task / kv_heads, task % kv_heads);
        let (pad, causal) = masks.of_row(bi, &sh, &no_padding);
        let mut weights = vec![0.0f32; block];
        let mut grad = vec![0.0f32; block];
        let (k_at, v_at) = (
            bi as isize * ks[0] + kh as isize * ks[1],
            bi as isize * vs_[0] + kh as isize * vs_[1],
        );
        // `[batch, seq_k, kv_heads, dim]` rows of the key / value gradients.
        let kv_row = (kv_heads * d) as isize;
        let dk_at = bi as isize * seq_k as isize * kv_row + (kh * d) as isize;
        let vv_row = (kv_heads * dv) as isize;
        let dv_at = bi as isize * seq_k as isize * vv_row + (kh * dv) as isize;
        for hi in kh * group..(kh + 1) * group {
            let head = bi * heads + hi;
            let p = &probs[head * block..(head + 1) * block];
            let drop = masks.dropout_of(head, block);
            let used: &[f32] = match drop {
                Some(m) => {
                    for ((w, p), m) in weights.iter_mut().zip(p).zip(m) {
                        *w = p * m;
                    }
                    &weights
                }
                None => p,
            };
            let o_at = bi as isize * os[0] + hi as isize * os[1];
            let q_at = bi as isize * qs[0] + hi as isize * qs[1];
            let q_row = (heads * d) as isize;
            let dq_at = bi as isize * seq_q as isize * q_row + (hi * d) as isize;
            for (rows, keys) in &blocks {
                let (r0, keys) = (rows.start, *keys);
                let grad_rows = &mut grad[r0 * seq_k..rows.end * seq_k];
                // SAFETY: every operand is read through its own layout's strides over its own
                // shape, from row `r0` on; this task writes only batch row `bi` and key /
                // value head `kh` of `dk` and `dv`, and query heads `kh · group ..` of `dq`,
                // which no other task writes (`dk` and `dv` start as zeros and add up).
                unsafe {
                    // dV[..keys] += weights[rows, ..keys]ᵀ · dO[rows]
                    product(
                        [keys, dv, rows.len()],
                        (dv_ptr.at(dv_at), vv_row),
                        true,
                        Strided::new(used.as_ptr().add(r0 * seq_k), 1, seq_k as isize),
                        Strided::new(o_data.at(o_at + r0 as isize * os[2]), os[2], os[3]),
                        1.0,
                    );
                    // dWeights[rows, ..keys] = dO[rows] · V[..keys]ᵀ
                    product(
                        [rows.len(), keys, dv],
                        (grad_rows.as_mut_ptr(), seq_k as isize),
                        false,
                        Strided::new(o_data.at(o_at + r0 as isize * os[2]), os[2], os[3]),
                        Strided::new(v_data.at(v_at), 1, vs_[2]),
                        1.0,
                    );
                }
                // The hidden keys' weights are 0; their gradient is too.
                for row in grad_rows.chunks_exact_mut(seq_k) {
                    row[keys..].fill(0.0);
                }
                let p_rows = &p[r0 * seq_k..rows.end * seq_k];
                let drop_rows = drop.map(|m| &m[r0 * seq_k..rows.end * seq_k]);
                math::softmax_backward_rows(p_rows, drop_rows, grad_rows, seq_k);
                // Row `i` of the block is query `r0 + i`.
                math::mask_rows(grad_rows, pad, causal.map(|c| c + r0 as isize));
                // SAFETY: as above.
                unsafe {
                    // dQ[rows] = scale · dScores[rows, ..keys] · K[..keys]
                    product(
                        [rows.len(), d, keys],
                        (dq_ptr.at(dq_at + r0 as isize * q_row), q_row),
                        false,
                        Strided::new(grad_rows.as_ptr(), seq_k as isize, 1),
                        Strided::new(k_data.at(k_at), ks[2], 1),
                        scale,
                    );
                    // dK[..keys] += scale · dScores[rows, ..keys]ᵀ · Q[rows]
                    product(
                        [keys, d, rows.len()],
                        (dk_ptr.at(dk_at), kv_row),
                        true,
                        Strided::new(grad_rows.as_ptr(), 1, seq_k as isize),
                        Strided::new(q_data.at(q_at + r0 as isize * qs[2]), qs[2], 1),
                        scale,
                    );
                }
            }
        }
    });
    let dq = bridge::from_vec_strided(
        dq,
        &[batch, heads, seq_q, d],
        &Shapes::rows_layout([batch, heads], seq_q, d),
    );
    let dk = bridge::from_vec_strided(
        dk,
        &[batch, kv_heads, seq_k, d],
        &Shapes::rows_layout([batch, kv_heads], seq_k, d),
    );
    let dvs = bridge::from_vec_strided(
        dvs,
        &[batch, kv_heads, seq_k, dv],
        &Shapes::rows_layout([batch, kv_heads], seq_k, dv),
    );
    (dq, dk, dvs)
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
pub(crate) fn key_padding(m: &FlexTensor) -> Option<Vec<bool>> {
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
            ..Default::default()
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
            causal: true,
            ..Default::default()
        };
        close(
            attention(&q, &k, &v, mask).unwrap(),
            reference(&q, &k, &v, None, true),
        );
    }

    #[test]
    fn few_queries_over_a_cache_view_equal_burns_attention() {
        // Decoding: 1 or 2 new queries, 3 query heads per key / value head, keys and values
        // that are the first positions of larger cache buffers, the second row left-padded.
        // 700 keys split the tasks over the threads.
        let device = Default::default();
        let (b, h, kvh, d) = (2, 6, 2, 16);
        for (seq_q, seq_k) in [(1, 9), (2, 9), (1, 700)] {
            let q = heads_view(b, seq_q, h, d);
            let cached = || random([b, kvh, seq_k + 5, d]).slice([0..b, 0..kvh, 0..seq_k, 0..d]);
            let (k, v) = (cached(), cached());
            let flags: Vec<bool> = [0, 3]
                .iter()
                .flat_map(|&pad| (0..seq_k).map(move |j| j < pad))
                .collect();
            let padding = Tensor::<Flex, 2, Bool>::from_data(
                burn::tensor::TensorData::new(flags, [b, seq_k]),
                &device,
            );
            for causal in [false, true] {
                let want = reference(&q, &k, &v, Some(&padding), causal);
                let masks = Masks {
                    padding: key_padding(&bridge::flex_bool(&padding).unwrap()).unwrap(),
                    causal,
                    dropout: None,
                };
                let (qf, kf, vf) = (
                    bridge::flex(&q).unwrap(),
                    bridge::flex(&k).unwrap(),
                    bridge::flex(&v).unwrap(),
                );
                let shapes = Shapes::of(&qf, &kf, &vf, &masks).unwrap();
                let few = few_queries(&qf, &kf, &vf, &masks, &shapes).unwrap();
                close(bridge::wrap(few), want.clone());
                let mask = AttentionMask {
                    key_padding: Some(&padding),
                    causal,
                    ..Default::default()
                };
                close(attention(&q, &k, &v, mask).unwrap(), want);
            }
        }
    }

    #[test]
    fn no_queries_give_an_empty_context() {
        let q = random([1, 3, 0, 8]);
        let k = random([1, 1, 4, 8]);
        let mask = AttentionMask {
            causal: true,
            ..Default::default()
        };
        let out = attention(&q, &k, &k, mask).unwrap();
        assert_eq!(out.dims(), [1, 3, 0, 8]);
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
