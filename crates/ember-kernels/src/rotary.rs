//! Rotary position embeddings in one pass over the strided head view.
//!
//! HF's `apply_rotary_pos_emb` is `x · cos + rotate_half(x) · sin`: two slices, a negation, a
//! concatenation, two broadcast products and an add, each its own pass (and under autodiff
//! its own recorded operation) over the query and key heads, which are strided views of the
//! projections' rows. Here each head row is read once in place and written once.

use crate::bridge;
use crate::ptr::SharedMut;
use burn::tensor::{backend::Backend, Tensor};
use burn_flex::FlexTensor;
use rayon::prelude::*;

/// `x · cos + rotate_half(x) · sin` for `x: [batch, heads, seq, dim]` (any strides whose last
/// one is 1) and `cos`, `sin`: `[batch or 1, 1, seq, dim]`, as HF's `apply_rotary_pos_emb`
/// (`rotate_half(x) = cat(-x[dim/2..], x[..dim/2])`). The result is contiguous.
///
/// `None` when the kernel does not apply (see the crate docs) or the shapes do not fit.
pub fn rotary<B: Backend>(
    x: &Tensor<B, 4>,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
) -> Option<Tensor<B, 4>> {
    #[cfg(feature = "autodiff")]
    if bridge::is_autodiff_flex::<B>() {
        return crate::tracked::rotary(x, cos, sin);
    }
    let table = Table::new(&bridge::flex(cos)?, &bridge::flex(sin)?)?;
    Some(bridge::wrap(rotate(&bridge::flex(x)?, &table, false)?))
}

/// The cosines and sines, contiguous `[batch or 1, seq, dim]` rows.
#[derive(Debug, Clone)]
pub(crate) struct Table {
    cos: FlexTensor,
    sin: FlexTensor,
    /// 1 when the rows are shared by every batch row.
    batch: usize,
    seq: usize,
    dim: usize,
}

impl Table {
    /// The table of `cos` and `sin` (`[batch or 1, 1, seq, dim]` each, any layout).
    pub(crate) fn new(cos: &FlexTensor, sin: &FlexTensor) -> Option<Self> {
        let shape = cos.layout().shape().to_vec();
        if shape.len() != 4 || shape[1] != 1 || sin.layout().shape().to_vec() != shape {
            return None;
        }
        Some(Self {
            cos: bridge::rows(cos),
            sin: bridge::rows(sin),
            batch: shape[0],
            seq: shape[2],
            dim: shape[3],
        })
    }

    /// The cosine and sine rows of position `s` in batch row `b`.
    fn rows(&self, b: usize, s: usize) -> (&[f32], &[f32]) {
        let row = (if self.batch == 1 { 0 } else { b }) * self.seq + s;
        let at = row * self.dim..(row + 1) * self.dim;
        let cos = bridge::contiguous(&self.cos).expect("made contiguous");
        let sin = bridge::contiguous(&self.sin).expect("made contiguous");
        (&cos[at.clone()], &sin[at])
    }
}

/// The rotation of every head row of `x` by `table` into a new tensor; with `transpose`, the
/// transposed map (the backward pass: `dx = dy · cos + rotate_halfᵀ(dy · sin)`).
///
/// The forward pass writes a contiguous `[batch, heads, seq, dim]` result. The backward pass
/// writes its result in `x`'s own memory order: the attention's gradient arrives as a head view
/// of `[batch, seq, heads, dim]` rows, and a gradient in that order goes back through the head
/// split (`swap_dims`, `reshape`) to the projection's rows without a copy.
/// `None` when the shapes do not fit or the rows are not contiguous.
pub(crate) fn rotate(x: &FlexTensor, table: &Table, transpose: bool) -> Option<FlexTensor> {
    let shape = x.layout().shape().to_vec();
    let strides = x.layout().strides().to_vec();
    let [batch, heads, seq, dim] = <[usize; 4]>::try_from(shape.as_slice()).ok()?;
    let fits = (table.batch == 1 || table.batch == batch)
        && table.seq == seq
        && table.dim == dim
        && dim % 2 == 0
        && (strides[3] == 1 || dim <= 1);
    if !fits {
        return None;
    }
    let storage = x.storage::<f32>();
    let start = x.layout().start_offset() as isize;
    let half = dim / 2;
    let out_strides = if transpose {
        dense_strides_in_order_of(&shape, &strides)
    } else {
        dense_strides_in_order_of(&shape, &[0, 0, 0, 0])
    };
    let mut out = vec![0.0f32; batch * heads * seq * dim];
    if out.is_empty() {
        return Some(bridge::from_vec(out, &shape));
    }
    let out_ptr = SharedMut::new(out.as_mut_ptr());
    (0..batch * heads).into_par_iter().for_each(|bh| {
        let (b, h) = (bh / heads, bh % heads);
        for s in 0..seq {
            let at =
                start + b as isize * strides[0] + h as isize * strides[1] + s as isize * strides[2];
            let v = &storage[at as usize..at as usize + dim];
            let to = b as isize * out_strides[0]
                + h as isize * out_strides[1]
                + s as isize * out_strides[2];
            // SAFETY: `out_strides` lay the `[batch, heads, seq, dim]` shape densely over `out`
            // with the last stride 1, so this row lies inside `out`, and only this task
            // (batch row `b`, head `h`) writes it.
            let y = unsafe { std::slice::from_raw_parts_mut(out_ptr.at(to), dim) };
            let (c, sn) = table.rows(b, s);
            for i in 0..half {
                let (lo, hi) = (v[i], v[i + half]);
                if transpose {
                    y[i] = lo * c[i] + hi * sn[i + half];
                    y[i + half] = hi * c[i + half] - lo * sn[i];
                } else {
                    y[i] = lo * c[i] - hi * sn[i];
                    y[i + half] = hi * c[i + half] + lo * sn[i + half];
                }
            }
        }
    });
    Some(bridge::from_vec_strided(out, &shape, &out_strides))
}

/// Strides that lay `shape` densely over a new buffer with the axes in the memory order that
/// `strides` give them (outermost: the largest stride; ties keep the axes' own order, so the
/// last axis stays innermost with stride 1). All-equal strides give the row-major layout.
fn dense_strides_in_order_of(shape: &[usize], strides: &[isize]) -> Vec<isize> {
    let mut order: Vec<usize> = (0..shape.len()).collect();
    order.sort_by_key(|&a| (std::cmp::Reverse(strides[a].unsigned_abs()), a));
    let mut out = vec![0isize; shape.len()];
    let mut size = 1isize;
    for &a in order.iter().rev() {
        out[a] = size;
        size *= shape[a] as isize;
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{Distribution, Tolerance};

    type B = Flex;

    /// HF's formula through burn's operations.
    pub(crate) fn reference<B2: Backend>(
        x: Tensor<B2, 4>,
        cos: &Tensor<B2, 4>,
        sin: &Tensor<B2, 4>,
    ) -> Tensor<B2, 4> {
        let [b, h, s, d] = x.dims();
        let x1 = x.clone().slice([0..b, 0..h, 0..s, 0..d / 2]);
        let x2 = x.clone().slice([0..b, 0..h, 0..s, d / 2..d]);
        x * cos.clone() + Tensor::cat(vec![x2.neg(), x1], 3) * sin.clone()
    }

    #[test]
    fn rotary_equals_hfs_formula_on_a_head_view() {
        let device = Default::default();
        let rows = Tensor::<B, 3>::random([2, 5, 3 * 8], Distribution::Default, &device);
        let x = rows.reshape([2, 5, 3, 8]).swap_dims(1, 2);
        for table_batch in [1, 2] {
            let cos =
                Tensor::<B, 4>::random([table_batch, 1, 5, 8], Distribution::Default, &device);
            let sin =
                Tensor::<B, 4>::random([table_batch, 1, 5, 8], Distribution::Default, &device);
            let got = rotary(&x, &cos, &sin).unwrap();
            let want = reference(x.clone(), &cos, &sin);
            got.into_data()
                .assert_approx_eq::<f32>(&want.into_data(), Tolerance::rel_abs(1e-6, 1e-6));
        }
        let cos = Tensor::<B, 4>::ones([1, 1, 4, 8], &device);
        assert!(
            rotary(&x, &cos, &cos).is_none(),
            "the table has 4 positions, x 5"
        );
    }

    #[test]
    fn the_transposed_rotation_keeps_the_memory_order_of_its_input() {
        let device = Default::default();
        // A head view of `[batch, seq, heads, dim]` rows, as the attention's gradient arrives.
        let rows = Tensor::<B, 3>::random([2, 5, 3 * 8], Distribution::Default, &device);
        let view = rows.reshape([2, 5, 3, 8]).swap_dims(1, 2);
        let cos = Tensor::<B, 4>::random([1, 1, 5, 8], Distribution::Default, &device);
        let sin = Tensor::<B, 4>::random([1, 1, 5, 8], Distribution::Default, &device);
        let table = Table::new(&bridge::flex(&cos).unwrap(), &bridge::flex(&sin).unwrap()).unwrap();
        let x = bridge::flex(&view).unwrap();
        let in_place = rotate(&x, &table, true).unwrap();
        assert_eq!(in_place.layout().strides(), x.layout().strides());
        let copied = rotate(&bridge::rows(&x), &table, true).unwrap();
        assert_eq!(copied.layout().strides(), &[120, 40, 8, 1]);
        let (got, want) = (bridge::wrap::<B, 4>(in_place), bridge::wrap::<B, 4>(copied));
        got.into_data()
            .assert_approx_eq::<f32>(&want.into_data(), Tolerance::rel_abs(1e-7, 1e-7));
        // The forward rotation is contiguous whatever the input's order.
        let forward = rotate(&x, &table, false).unwrap();
        assert_eq!(forward.layout().strides(), &[120, 40, 8, 1]);
    }

    #[test]
    fn dense_strides_follow_the_given_order() {
        assert_eq!(
            dense_strides_in_order_of(&[2, 3, 5, 8], &[0, 0, 0, 0]),
            [120, 40, 8, 1]
        );
        assert_eq!(
            dense_strides_in_order_of(&[2, 3, 5, 8], &[120, 8, 24, 1]),
            [120, 8, 24, 1]
        );
        // A size-1 axis with stride 1 stays outside the last axis.
        assert_eq!(
            dense_strides_in_order_of(&[2, 1, 5, 8], &[40, 1, 8, 1]),
            [40, 8, 8, 1]
        );
    }
}
