//! A linear layer as one GEMM that starts from the bias.

use crate::bf16_gemm::{self, Matrix};
use crate::ptr::{Shared, SharedMut};
use crate::team::{for_each_claimed_span, for_each_part};
use crate::{bridge, math, packed};
use burn::tensor::{backend::Backend, DType, Tensor};
use burn_flex::FlexTensor;

/// Below this many multiply-adds a GEMM runs on the calling thread (Flex's own threshold).
const PARALLEL_WORK: usize = 192 * 192 * 192;

/// `x · weight + bias` for `x: [rows, d_in]` and `weight: [d_in, d_out]` (burn's layout).
///
/// The output buffer is filled with the bias rows and the GEMM accumulates into it, so the bias
/// costs one write instead of Flex's strided broadcast add (about 6x a contiguous add). Any
/// strides are read in place, so a transposed view (a tied output matrix) is not copied.
/// `None` when `B` is not Flex or the tensors are not f32.
pub fn linear<B: Backend>(
    x: &Tensor<B, 2>,
    weight: &Tensor<B, 2>,
    bias: Option<&Tensor<B, 1>>,
) -> Option<Tensor<B, 2>> {
    #[cfg(feature = "autodiff")]
    if bridge::is_autodiff_flex::<B>() {
        return crate::tracked::linear(x, weight, bias);
    }
    let xf = bridge::flex(x)?;
    let bf = bridge::optional_rows(bias)?;
    let wf = match weight.dtype() {
        DType::F32 => bridge::flex(weight)?,
        // A half-precision model's weight: read in place for a few rows (decoding: half the
        // bytes of float32) and by the bf16 GEMM, widened to float32 elsewhere.
        DType::BF16 | DType::F16 => {
            let wh = bridge::float_primitive::<B, 2, FlexTensor>(weight)?;
            if wh.dtype() == DType::BF16 {
                if let Some(out) = linear_bf16_few_rows(&xf, &wh, bf.as_ref()) {
                    return Some(bridge::wrap(out));
                }
                if let Some(out) = linear_bf16_weight(&xf, &wh, bf.as_ref()) {
                    return Some(bridge::wrap(out));
                }
            }
            bridge::flex(&crate::float32(weight.clone()))?
        }
        _ => return None,
    };
    Some(bridge::wrap(linear_flex(
        &xf,
        &wf,
        bf.as_ref(),
        Weights::Bf16Copies,
        Products::of_autocast(),
    )?))
}

/// What a product adds into: `m` copies of the bias row, or zeros. `None` for a bias that is
/// not contiguous.
fn starting_rows(bf: Option<&FlexTensor>, m: usize, n: usize) -> Option<Vec<f32>> {
    Some(match bf {
        Some(b) => bridge::contiguous(b)?.repeat(m),
        None => vec![0.0; m * n],
    })
}

/// [`linear`] for a bfloat16 weight through the bf16 GEMM, read where it lies: the input
/// rounded to bf16 as a `.bfloat16()` model's activations are in torch, the sums and the bias
/// in f32. `None` for up to [`FEW_ROWS`] rows (read as they are, by the few-rows product or
/// widened), where the CPU has no bf16 dot products, or where the shapes disagree.
fn linear_bf16_weight(
    xf: &FlexTensor,
    wh: &FlexTensor,
    bf: Option<&FlexTensor>,
) -> Option<FlexTensor> {
    let [m, k] = dims2(xf);
    let [k2, n] = dims2(wh);
    let shapes_agree = k == k2 && bf.is_none_or(|b| b.layout().num_elements() == n);
    if !bf16_gemm::available() || m <= FEW_ROWS || !shapes_agree {
        return None;
    }
    let mut out = starting_rows(bf, m, n)?;
    let lhs = Matrix {
        ptr: xf.storage::<f32>()[xf.layout().start_offset()..].as_ptr(),
        strides: [xf.layout().strides()[0], xf.layout().strides()[1]],
    };
    let rhs = Matrix {
        ptr: bytemuck::cast_slice::<_, u16>(
            &wh.storage::<burn::tensor::bf16>()[wh.layout().start_offset()..],
        )
        .as_ptr(),
        strides: [wh.layout().strides()[0], wh.layout().strides()[1]],
    };
    // SAFETY: the bf16 GEMM is available; the operands address the tensors' own buffers at
    // their start offsets, whose layouts reach `[m, k]` and `[k, n]` elements; `out` holds
    // m rows of n initialised values.
    unsafe { bf16_gemm::gemm(SharedMut::new(out.as_mut_ptr()), n, lhs, rhs, [m, k, n]) };
    Some(bridge::from_vec(out, &[m, n]))
}

/// [`linear`] for up to [`FEW_ROWS`] rows of `x` with a bfloat16 weight read where it lies
/// (row- or column-major, any start offset); `None` for other shapes, which the caller
/// widens.
fn linear_bf16_few_rows(
    xf: &FlexTensor,
    wh: &FlexTensor,
    bf: Option<&FlexTensor>,
) -> Option<FlexTensor> {
    let [m, k] = dims2(xf);
    let [k2, n] = dims2(wh);
    let (ls, rs) = (xf.layout().strides(), wh.layout().strides());
    if k != k2 || m > FEW_ROWS || m * k * n == 0 || !few_rows_layout(ls, rs, k) {
        return None;
    }
    if bf.is_some_and(|b| b.layout().num_elements() != n) {
        return None;
    }
    let mut out = starting_rows(bf, m, n)?;
    let extent = if rs[1] == 1 {
        (k - 1) * rs[0] as usize + n
    } else {
        (n - 1) * rs[1] as usize + k
    };
    let start = wh.layout().start_offset();
    let bits: &[u16] =
        bytemuck::cast_slice(&wh.storage::<burn::tensor::bf16>()[start..start + extent]);
    let lhs = Shared::new(xf.storage::<f32>()[xf.layout().start_offset()..].as_ptr());
    // SAFETY: `out` holds m · n initialised values; each `lhs` row's k values are contiguous
    // within x's buffer; `bits` covers every weight element the strides reach; the f32
    // weight pointer is never read when the bf16 bits are given.
    unsafe {
        few_rows(
            SharedMut::new(out.as_mut_ptr()),
            lhs,
            ls[0],
            (Shared::new(std::ptr::null()), Some(bits)),
            rs,
            [m, k, n],
            rayon::current_num_threads(),
        )
    };
    Some(bridge::from_vec(out, &[m, n]))
}

/// How a product with few rows may read its weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Weights {
    /// From its bf16 copy where its values are all bf16 ([`packed`]): inference.
    Bf16Copies,
    /// As it is: training, whose weights change every step.
    AsTheyAre,
}

/// The precision of a GEMM's products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Products {
    /// f32 operands as they are.
    F32,
    /// Operands rounded to bf16, products summed in f32 (torch's bf16 matmul): the bf16
    /// GEMM where the CPU has bf16 dot products, an f32 GEMM elsewhere (where a bf16
    /// [`crate::autocast`] region has rounded the operands already).
    Bf16,
}

impl Products {
    /// [`Products::Bf16`] inside a bf16 [`crate::autocast`] region, else f32.
    pub(crate) fn of_autocast() -> Self {
        if crate::autocast_dtype() == Some(DType::BF16) {
            Self::Bf16
        } else {
            Self::F32
        }
    }
}

/// One linear layer of a bf16 [`crate::autocast`] region, `round(x · W + b)` with bf16
/// products, as torch's autocast `addmm`: the operands rounded to bf16 as the bf16 GEMM packs
/// them, the bias rounded, the f32 sums rounded to bf16 in place; under autodiff the
/// gradients of `x`, `W` and `b` rounded as a bf16 op's are, in the backward pass's own
/// GEMMs. The same values as rounding each operand and the result with
/// [`crate::autocast_round`] around [`linear`], without those passes over memory.
///
/// `None` outside a bf16 region, where the CPU has no bf16 dot products
/// ([`crate::bf16_gemm_available`]), for another backend than Flex, or for tensors that are
/// not f32 (the caller then rounds around [`linear`] or burn's operations).
pub fn autocast_linear<B: Backend>(
    x: &Tensor<B, 2>,
    weight: &Tensor<B, 2>,
    bias: Option<&Tensor<B, 1>>,
) -> Option<Tensor<B, 2>> {
    if crate::autocast_dtype() != Some(DType::BF16) || !bf16_gemm::available() {
        return None;
    }
    #[cfg(feature = "autodiff")]
    if bridge::is_autodiff_flex::<B>() {
        return crate::tracked::autocast_linear(x, weight, bias);
    }
    let (xf, wf) = (bridge::flex(x)?, bridge::flex(weight)?);
    let bias = bridge::optional_rows(bias)?.map(|b| crate::autocast::round_flex(&b, DType::BF16));
    Some(bridge::wrap(rounded_linear_flex(&xf, &wf, bias.as_ref())?))
}

/// `round_bf16(x · w + b)` on Flex tensors with bf16 products (see [`autocast_linear`]);
/// `None` when the shapes disagree.
pub(crate) fn rounded_linear_flex(
    xf: &FlexTensor,
    wf: &FlexTensor,
    bf: Option<&FlexTensor>,
) -> Option<FlexTensor> {
    let (mut values, shape) = linear_values(xf, wf, bf, Weights::AsTheyAre, Products::Bf16)?;
    round_in_place(&mut values);
    Some(bridge::from_vec(values, &shape))
}

/// Every value rounded to the nearest bf16 (kept in f32), in parallel chunks.
pub(crate) fn round_in_place(values: &mut [f32]) {
    use rayon::prelude::*;
    values.par_chunks_mut(1 << 16).for_each(|chunk| {
        for v in chunk {
            *v = f32::from_bits(u32::from(bf16_gemm::round(*v)) << 16);
        }
    });
}

/// [`linear`] on Flex tensors: `x: [rows, d_in]` and `weight: [d_in, d_out]` of any strides,
/// `bias` contiguous. `None` when the shapes disagree.
pub(crate) fn linear_flex(
    xf: &FlexTensor,
    wf: &FlexTensor,
    bf: Option<&FlexTensor>,
    weights: Weights,
    products: Products,
) -> Option<FlexTensor> {
    let (values, shape) = linear_values(xf, wf, bf, weights, products)?;
    Some(bridge::from_vec(values, &shape))
}

/// The row-major values and shape of [`linear_flex`]'s result.
fn linear_values(
    xf: &FlexTensor,
    wf: &FlexTensor,
    bf: Option<&FlexTensor>,
    weights: Weights,
    products: Products,
) -> Option<(Vec<f32>, [usize; 2])> {
    let [m, k] = dims2(xf);
    let [k2, n] = dims2(wf);
    if k != k2 || bf.is_some_and(|b| b.layout().num_elements() != n) {
        return None;
    }
    let plan = Plan::of(xf, wf, [m, k, n], products);
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    if let Some(b) = bf.filter(|_| n > 0) {
        let b = bridge::contiguous(b)?;
        for _ in 0..m {
            out.extend_from_slice(b);
        }
    } else if plan.reads_output() {
        out.resize(m * n, 0.0);
    }
    // SAFETY: `out` has room for m · n values; it holds them already (bias rows or zeros)
    // unless the plan is a GEMM that does not read its output, which then writes every one.
    unsafe {
        gemm_into(
            out.as_mut_ptr(),
            xf,
            wf,
            [m, k, n],
            bf.is_some(),
            weights,
            plan,
        );
        out.set_len(m * n);
    }
    Some((out, [m, n]))
}

/// How [`gemm_into`] computes a product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// Nothing to multiply (an empty dimension): the output keeps its bias rows or zeros.
    Nothing,
    /// [`few_rows`]: the weight read once for a few rows, added into the output.
    FewRows,
    /// One `gemm` call split by `gemm` itself over the threads.
    Parallel,
    /// The weight's columns split over the threads, one `gemm` call each.
    SplitColumns,
    /// One `gemm` call on the calling thread.
    Single,
    /// A column-major weight: `gemm` on blocks of at most [`COLUMN_BLOCK`] columns, over the
    /// threads when the product is large, each into a column-major temporary then added into
    /// the output (see [`gemm_into`]).
    WeightColumns,
    /// The bf16 GEMM ([`bf16_gemm::gemm`]) over the threads, added into the output.
    Bf16,
}

impl Plan {
    /// The plan for `lhs [m, k] · rhs [k, n]` over the tensors' strides.
    ///
    /// Large products let `gemm` split the work over the threads. A product with few rows and
    /// a large weight (decoding: one row per sequence) is below `gemm`'s threshold yet reads
    /// the whole weight from memory, which one core cannot do at the memory's rate:
    /// [`few_rows`] splits the weight over the threads instead. Other products below the
    /// threshold with a large weight split its columns over the threads. A column-major weight
    /// (HF's `[out, in]` read as `[in, out]`) with more rows has its own plan,
    /// [`Plan::WeightColumns`].
    ///
    /// Products in bf16 run the bf16 GEMM whenever the CPU has it.
    fn of(lhs: &FlexTensor, rhs: &FlexTensor, [m, k, n]: [usize; 3], products: Products) -> Self {
        let (ls, rs) = (lhs.layout().strides(), rhs.layout().strides());
        let threads = rayon::current_num_threads();
        if m * k * n == 0 {
            Self::Nothing
        } else if products == Products::Bf16 && bf16_gemm::available() {
            // Before the few-rows product, which reads its operands as they are: a bf16
            // product rounds them however few rows there are (a classifier on `[CLS]` rows).
            Self::Bf16
        } else if m <= FEW_ROWS && few_rows_layout(ls, rs, k) {
            Self::FewRows
        } else if rs[0] == 1 && rs[1] != 1 && m <= WEIGHT_COLUMNS_ROWS {
            Self::WeightColumns
        } else if m * n * k >= PARALLEL_WORK {
            Self::Parallel
        } else if threads > 1 && k * n >= SPLIT_WEIGHT && n >= 2 * threads {
            Self::SplitColumns
        } else {
            Self::Single
        }
    }

    /// Whether the output must hold its starting values (zeros) before [`gemm_into`] runs:
    /// `gemm` without a bias overwrites every output value; the other plans add into it or
    /// leave it as it is.
    fn reads_output(self) -> bool {
        matches!(self, Self::Nothing | Self::FewRows | Self::Bf16)
    }
}

/// `lhs · rhs` for 2-D tensors of any strides whose inner dimensions the caller checked agree.
pub(crate) fn matmul_flex(lhs: &FlexTensor, rhs: &FlexTensor, products: Products) -> FlexTensor {
    linear_flex(lhs, rhs, None, Weights::AsTheyAre, products)
        .expect("the caller checked the inner dimensions")
}

/// Sums of the columns of `[rows, cols]` values, `bias`'s gradient: each thread adds up a
/// block of rows, then the partial sums are added in block order (the same result on every
/// run, whatever thread ran which block).
pub(crate) fn column_sums(values: &[f32], cols: usize) -> Vec<f32> {
    use rayon::prelude::*;
    if cols == 0 {
        return Vec::new();
    }
    let rows = values.len() / cols;
    let block = rows.div_ceil(rayon::current_num_threads().max(1)).max(1) * cols;
    values
        .par_chunks(block)
        .map(|chunk| {
            let mut acc = vec![0.0f32; cols];
            math::add_rows(&mut acc, chunk);
            acc
        })
        .collect::<Vec<_>>()
        .into_iter()
        .reduce(|mut a, b| {
            math::add_rows(&mut a, &b);
            a
        })
        .unwrap_or_else(|| vec![0.0; cols])
}

/// `[rows, cols]` of a 2-D tensor.
fn dims2(t: &FlexTensor) -> [usize; 2] {
    let s = t.layout().shape();
    [s[0], s[1]]
}

/// `out (+)= lhs · rhs` over the tensors' own strides, computed as `plan` says (see [`Plan`]).
/// `accumulate` says `out` holds a bias, which `gemm` must then read.
///
/// # Safety
/// `out` has room for `m · n` values, written row-major; it must hold initialised values
/// when `accumulate` or `plan.reads_output()`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_into(
    out: *mut f32,
    lhs: &FlexTensor,
    rhs: &FlexTensor,
    [m, k, n]: [usize; 3],
    accumulate: bool,
    weights: Weights,
    plan: Plan,
) {
    let (ls, rs) = (lhs.layout().strides(), rhs.layout().strides());
    let lhs_ptr = Shared::new(lhs.storage::<f32>()[lhs.layout().start_offset()..].as_ptr());
    let rhs_ptr = Shared::new(rhs.storage::<f32>()[rhs.layout().start_offset()..].as_ptr());
    let out_ptr = SharedMut::new(out);
    // SAFETY (all calls): the pointers address the tensors' own buffers at their layouts'
    // start offsets, and every element the strides reach over `[m, k]` / `[k, n]` lies inside
    // them (burn checked the layouts when it built the views); `out` has room for m · n values
    // written row-major, and each task writes only its own columns `cols` of it.
    // `lhs · rhs[.., cols]` into `dst` at strides `[dst_cs, dst_rs]`, added to it when
    // `read_dst`.
    let gemm_columns = |cols: std::ops::Range<usize>,
                        dst: *mut f32,
                        [dst_cs, dst_rs]: [isize; 2],
                        read_dst: bool,
                        parallelism| unsafe {
        gemm::gemm(
            m,
            cols.len(),
            k,
            dst,
            dst_cs,
            dst_rs,
            read_dst,
            lhs_ptr.at(0),
            ls[1],
            ls[0],
            rhs_ptr.at(cols.start as isize * rs[1]),
            rs[1],
            rs[0],
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    };
    let run = |cols: std::ops::Range<usize>, parallelism| {
        // SAFETY: as above.
        let dst = unsafe { out_ptr.at(cols.start as isize) };
        gemm_columns(cols, dst, [1, n as isize], accumulate, parallelism);
    };
    // `gemm` transposes a product whose output is row-major and then needs the weight's
    // columns contiguous: a column-major weight is packed on every call (SmolLM2's prefill of
    // 16 rows took 105 ms against 76 ms for a row-major weight). Into a column-major
    // temporary it runs untransposed and reads the weight where it lies (63 ms); the
    // temporary's columns are then added into the output's rows.
    let run_into_columns = |cols: std::ops::Range<usize>| unsafe {
        let width = cols.len();
        let mut t = vec![0.0f32; m * width];
        gemm_columns(
            cols.clone(),
            t.as_mut_ptr(),
            [m as isize, 1],
            false,
            gemm::Parallelism::None,
        );
        // Written through pointers: without a bias, `out` is not initialised yet.
        let out = out_ptr.at(cols.start as isize);
        for i in 0..m {
            let row = out.add(i * n);
            for (j, v) in t[i..].iter().step_by(m).enumerate() {
                let o = row.add(j);
                *o = if accumulate { *o + v } else { *v };
            }
        }
    };
    let threads = rayon::current_num_threads();
    // Column chunks of a multiple of 16 (two AVX-512 vectors), about two per thread.
    let chunk = n.div_ceil(2 * threads).next_multiple_of(16);
    match plan {
        // Nothing to multiply: `out` already holds the bias rows or zeros.
        Plan::Nothing => {}
        Plan::FewRows => {
            // The region of the weight's buffer the view covers, and its bf16 copy if it has
            // one.
            let extent = if rs[1] == 1 {
                (k - 1) * rs[0] as usize + n
            } else {
                (n - 1) * rs[1] as usize + k
            };
            let packed = (weights == Weights::Bf16Copies && k * n >= SPLIT_WEIGHT)
                .then(|| packed::bf16_copy(rhs, extent))
                .flatten();
            // SAFETY: as above; the plan checked that each `lhs` row's values are contiguous
            // and `rhs` is row- or column-major, which is what `few_rows` reads;
            // `packed` covers the same region; `out` holds initialised values.
            unsafe {
                few_rows(
                    out_ptr,
                    lhs_ptr,
                    ls[0],
                    (rhs_ptr, packed.as_deref()),
                    rs,
                    [m, k, n],
                    threads,
                )
            };
        }
        Plan::Bf16 => {
            let operand = |t: &FlexTensor, ptr: Shared| Matrix {
                // SAFETY: offset 0 is the tensor's first element.
                ptr: unsafe { ptr.at(0) },
                strides: [t.layout().strides()[0], t.layout().strides()[1]],
            };
            // SAFETY: the plan chose the bf16 GEMM only where it is available; the operands
            // are as above; `out` holds m · n initialised values (the plan reads its output).
            unsafe {
                bf16_gemm::gemm(
                    out_ptr,
                    n,
                    operand(lhs, lhs_ptr),
                    operand(rhs, rhs_ptr),
                    [m, k, n],
                )
            }
        }
        Plan::Parallel => run(0..n, gemm::Parallelism::Rayon(0)),
        Plan::SplitColumns => {
            use rayon::prelude::*;
            (0..n.div_ceil(chunk))
                .into_par_iter()
                .for_each(|c| run(c * chunk..((c + 1) * chunk).min(n), gemm::Parallelism::None));
        }
        Plan::Single => run(0..n, gemm::Parallelism::None),
        Plan::WeightColumns => {
            use rayon::prelude::*;
            let width = COLUMN_BLOCK.min(chunk);
            let blocks = n.div_ceil(width);
            let block = |b: usize| run_into_columns(b * width..((b + 1) * width).min(n));
            if threads > 1 && (m * n * k >= PARALLEL_WORK || k * n >= SPLIT_WEIGHT) {
                (0..blocks).into_par_iter().for_each(block);
            } else {
                (0..blocks).for_each(block);
            }
        }
    }
}

/// Up to this many rows, [`few_rows`] reads the weight once for all of them.
const FEW_ROWS: usize = 8;

/// Whether [`few_rows`] reads operands of these strides: input rows of contiguous values (a
/// single row too: a column of a matrix seen as a row is not) and a row- or column-major
/// weight.
fn few_rows_layout(ls: &[isize], rs: &[isize], k: usize) -> bool {
    (ls[1] == 1 || k == 1) && (rs[1] == 1 || rs[0] == 1)
}

/// Up to this many rows a column-major weight runs [`Plan::WeightColumns`]. With more, the
/// weight that `gemm` packs on every call is reused by enough rows that its own plan is faster:
/// a training step's products at 2,048 and 4,096 rows (LoRA on SmolLM2, rbt3's backward pass)
/// took 8-14 % longer in column blocks.
const WEIGHT_COLUMNS_ROWS: usize = 256;

/// The widest block of columns [`Plan::WeightColumns`] gives one `gemm` call. Wider blocks
/// (a 49,152-column output matrix cut in two) spill the temporary out of the caches: at 128
/// rows, SmolLM2's prefill took 150 ms with blocks of 512 or 1,024 columns against 165 ms in
/// halves.
const COLUMN_BLOCK: usize = 512;

/// `out += lhs · rhs` for a few rows (decoding), reading the weight from memory once, at the
/// memory's rate, on every thread.
///
/// `gemm`'s path for one row reads a weight that does not fit in the caches at 11-17 GB/s on
/// this machine, on one thread, against about 33 GB/s for both cores. Here a row-major weight
/// (`[d_in, d_out]`, burn's `Linear`) is cut into one block of rows per thread, each streamed
/// front to back into the thread's own accumulators, which are summed at the end; a
/// column-major one (a tied embedding table read as its transpose) is cut into blocks of
/// columns, each column one dot product per input row.
///
/// With a bf16 copy of the weight (`rhs.1`, the same region as `rhs.0`), the copy is read
/// instead: half the bytes, the same products.
///
/// # Safety
/// `out` holds `m · n` values; `lhs` holds `m` rows of `k` contiguous values `lhs_row_stride`
/// apart; `rhs` holds `[k, n]` values at strides `rs`, one of which is 1.
unsafe fn few_rows(
    out: SharedMut,
    lhs: Shared,
    lhs_row_stride: isize,
    (rhs, packed): (Shared, Option<&[u16]>),
    rs: &[isize],
    [m, k, n]: [usize; 3],
    threads: usize,
) {
    let parts = if k * n >= SPLIT_WEIGHT {
        threads.max(1)
    } else {
        1
    };
    // The input rows, contiguous: one row as it lies, more gathered (they are few and small).
    let xs: std::borrow::Cow<[f32]> = if m == 1 {
        // SAFETY: row 0 of `lhs` holds k contiguous values.
        std::borrow::Cow::Borrowed(unsafe { std::slice::from_raw_parts(lhs.at(0), k) })
    } else {
        (0..m)
            .flat_map(|r| {
                // SAFETY: row r of `lhs` holds k contiguous values.
                unsafe { std::slice::from_raw_parts(lhs.at(r as isize * lhs_row_stride), k) }
            })
            .copied()
            .collect()
    };
    if rs[1] == 1 {
        // Row-major weight: the threads take contiguous blocks of its rows, so each streams
        // its memory front to back, and their partial sums are added at the end.
        let w_stride = rs[0] as usize;
        let w: Weight = match packed {
            Some(p) => Weight::Bf16(p),
            // SAFETY: rows 0..k of the weight, n values each, `w_stride` apart.
            None => Weight::F32(unsafe {
                std::slice::from_raw_parts(rhs.at(0), (k - 1) * w_stride + n)
            }),
        };
        let block = k.div_ceil(parts);
        let blocks = k.div_ceil(block);
        // One partial sum of `m · n` values per block, added at the end.
        let mut partials = vec![0.0f32; blocks * m * n];
        let partial = SharedMut::new(partials.as_mut_ptr());
        for_each_part(blocks, &|p| {
            // SAFETY: block p alone writes values p · m · n .. (p + 1) · m · n of `partials`.
            let ys =
                unsafe { std::slice::from_raw_parts_mut(partial.at((p * m * n) as isize), m * n) };
            let k_rows = p * block..((p + 1) * block).min(k);
            match w {
                Weight::F32(w) => math::few_rows_axpy(ys, &xs, k, k_rows, w, w_stride),
                Weight::Bf16(w) => math::few_rows_axpy_bf16(ys, &xs, k, k_rows, w, w_stride),
            }
        });
        // SAFETY: `out` holds m · n values; no task runs any more.
        let out = unsafe { std::slice::from_raw_parts_mut(out.at(0), m * n) };
        for ys in partials.chunks_exact(m * n) {
            for (o, y) in out.iter_mut().zip(ys) {
                *o += y;
            }
        }
        return;
    }
    // Column-major weight (HF's `[out, in]` weights, a transposed table): each thread streams
    // its block of columns front to back, each column one dot product per input row; with up
    // to BALANCED_ROWS rows, one that is done takes over the rest of a late one's. Blocks of
    // 16 columns keep threads off each other's cache lines of `out`.
    let w_stride = rs[1] as usize;
    for_each_claimed_span(n, parts, 16, m <= BALANCED_ROWS, &|claims| {
        let mut ys = Vec::new();
        for cols in claims {
            let width = cols.len();
            let (at, len) = (cols.start * w_stride, (width - 1) * w_stride + k);
            // One row: the dot products add straight into the output's columns. More: into
            // a `[m, width]` block, then into each row's columns.
            let dst = if m == 1 {
                // SAFETY: columns `cols` are claimed by this task alone, which alone writes
                // them in `out`.
                unsafe { std::slice::from_raw_parts_mut(out.at(cols.start as isize), width) }
            } else {
                ys.clear();
                ys.resize(m * width, 0.0f32);
                &mut ys[..]
            };
            match packed {
                Some(p) => math::few_rows_dots_bf16(dst, &xs, &p[at..at + len], k, w_stride),
                None => {
                    // SAFETY: columns `cols` of the weight, k contiguous values each.
                    let w = unsafe { std::slice::from_raw_parts(rhs.at(at as isize), len) };
                    math::few_rows_dots(dst, &xs, w, k, w_stride)
                }
            }
            if m == 1 {
                continue;
            }
            for r in 0..m {
                // SAFETY: as above.
                let row = unsafe {
                    std::slice::from_raw_parts_mut(out.at((r * n + cols.start) as isize), width)
                };
                for (o, y) in row.iter_mut().zip(&ys[r * width..(r + 1) * width]) {
                    *o += y;
                }
            }
        }
    });
}

/// A weight as [`few_rows`] reads it.
#[derive(Clone, Copy)]
enum Weight<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

/// Up to this many rows, [`few_rows`] balances a column-major weight's columns over the threads
/// as they go ([`for_each_claimed_span`]) instead of in fixed halves. SmolLM2's batch-1
/// generation row took 1.46-1.48 s balanced against 1.47-1.53 s in halves (five alternated
/// pairs, median 1.466 against 1.495 s); at batch 8, where each column feeds eight dot
/// products, the balanced split took 3.64-3.77 s against 3.60-3.65 s and is not used.
const BALANCED_ROWS: usize = 2;

/// Weights of at least this many values are read by all threads even for a single row.
const SPLIT_WEIGHT: usize = 1 << 16;

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{Distribution, Tolerance};

    /// Sums of a few hundred products of N(0, 1) values are of order 10-20: 1e-5 relative to
    /// that scale, for outputs that cancel to near zero.
    fn tolerance() -> Tolerance<f32> {
        Tolerance::rel_abs(1e-5, 1e-4)
    }

    #[test]
    fn bfloat16_weights_give_the_products_of_their_float32_values() {
        let device = Default::default();
        // A weight large enough to be split over the threads, and a small one.
        for (k, n) in [(300, 520), (24, 40)] {
            let w = crate::to_half(
                Tensor::<Flex, 2>::random([k, n], Distribution::Normal(0.0, 1.0), &device),
                DType::BF16,
            );
            let b = Tensor::<Flex, 1>::random([n], Distribution::Normal(0.0, 1.0), &device);
            // Row-major, and a transposed (column-major) view as a tied table is read.
            let wt = crate::to_half(
                Tensor::<Flex, 2>::random([n, k], Distribution::Normal(0.0, 1.0), &device),
                DType::BF16,
            )
            .transpose();
            for rows in [1, 2, 3, 8, 9] {
                let x =
                    Tensor::<Flex, 2>::random([rows, k], Distribution::Normal(0.0, 1.0), &device);
                // Beyond the few rows, where the bf16 GEMM runs, the input is rounded to bf16
                // as a bf16 model's activations are.
                let x_read = if rows > FEW_ROWS && bf16_gemm::available() {
                    crate::round_to(x.clone(), DType::BF16)
                } else {
                    x.clone()
                };
                for (w, bias) in [(&w, Some(&b)), (&w, None), (&wt, None)] {
                    let got = linear(&x, w, bias).unwrap();
                    let want = linear(&x_read, &crate::float32(w.clone()), bias).unwrap();
                    // The same products in the same order where the few-rows path runs.
                    got.into_data()
                        .assert_approx_eq(&want.into_data(), tolerance());
                }
            }
        }
    }

    #[test]
    fn equals_matmul_plus_bias_for_plain_and_transposed_weights() {
        let device = Default::default();
        let x = Tensor::<Flex, 2>::random([37, 50], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<Flex, 2>::random([50, 70], Distribution::Normal(0.0, 1.0), &device);
        let b = Tensor::<Flex, 1>::random([70], Distribution::Normal(0.0, 1.0), &device);
        let want = x.clone().matmul(w.clone()) + b.clone().unsqueeze_dim(0);
        let got = linear(&x, &w, Some(&b)).unwrap();
        got.into_data()
            .assert_approx_eq::<f32>(&want.into_data(), tolerance());
        // A tied output matrix: the embedding `[vocab, d]` read as `[d, vocab]`.
        let table = Tensor::<Flex, 2>::random([70, 50], Distribution::Normal(0.0, 1.0), &device);
        let want = x.clone().matmul(table.clone().transpose());
        let got = linear(&x, &table.transpose(), None).unwrap();
        got.into_data()
            .assert_approx_eq::<f32>(&want.into_data(), tolerance());
    }

    /// A linear weight as HF stores it (`[out, in]`), read as `[in, out]` through a transposed
    /// view: the few-rows dot products up to [`FEW_ROWS`] rows, then `gemm` into column-major
    /// blocks (several blocks, a ragged last one, over the threads for the large weight), then
    /// `gemm`'s own plan.
    #[test]
    fn out_in_weights_give_the_products_of_contiguous_ones() {
        let device = Default::default();
        for (k, n) in [(40, 24), (192, 1100)] {
            let stored = Tensor::<Flex, 2>::random([n, k], Distribution::Normal(0.0, 1.0), &device);
            let view = stored.clone().transpose();
            let contiguous = Tensor::<Flex, 2>::from_data(view.clone().into_data(), &device);
            let b = Tensor::<Flex, 1>::random([n], Distribution::Normal(0.0, 1.0), &device);
            for rows in [1, 2, 3, 8, 9, 16, 130, 300] {
                let x =
                    Tensor::<Flex, 2>::random([rows, k], Distribution::Normal(0.0, 1.0), &device);
                let (xf, wf) = (bridge::flex(&x).unwrap(), bridge::flex(&view).unwrap());
                let plan = Plan::of(&xf, &wf, [rows, k, n], Products::F32);
                if rows <= FEW_ROWS {
                    assert_eq!(plan, Plan::FewRows, "{rows} rows");
                } else if rows <= WEIGHT_COLUMNS_ROWS {
                    assert_eq!(plan, Plan::WeightColumns, "{rows} rows");
                } else {
                    assert!(!matches!(plan, Plan::FewRows | Plan::WeightColumns));
                }
                for bias in [Some(&b), None] {
                    let got = linear(&x, &view, bias).unwrap();
                    let want = linear(&x, &contiguous, bias).unwrap();
                    got.into_data()
                        .assert_approx_eq::<f32>(&want.into_data(), tolerance());
                }
            }
        }
    }

    /// One input row that is a strided view (a column of a matrix, transposed): its values
    /// are not contiguous, so the few-rows products must not read it as they read a row.
    #[test]
    fn a_strided_single_row_gives_the_product_of_its_values() {
        let device = Default::default();
        let (k, n) = (300, 520);
        let columns = Tensor::<Flex, 2>::random([k, 2], Distribution::Normal(0.0, 1.0), &device);
        let x = columns.slice([0..k, 1..2]).transpose();
        let contiguous = Tensor::<Flex, 2>::from_data(x.clone().into_data(), &device);
        let stored = Tensor::<Flex, 2>::random([n, k], Distribution::Normal(0.0, 1.0), &device);
        let row_major =
            Tensor::<Flex, 2>::from_data(stored.clone().transpose().into_data(), &device);
        let half = crate::to_half(stored.clone(), DType::BF16).transpose();
        for w in [stored.transpose(), row_major, half] {
            let got = linear(&x, &w, None).unwrap();
            let want = linear(&contiguous, &w, None).unwrap();
            got.into_data()
                .assert_approx_eq::<f32>(&want.into_data(), tolerance());
        }
    }

    #[test]
    fn large_products_run_in_parallel_with_the_same_result() {
        let device = Default::default();
        let x = Tensor::<Flex, 2>::random([256, 192], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<Flex, 2>::random([192, 256], Distribution::Normal(0.0, 1.0), &device);
        let want = x.clone().matmul(w.clone());
        let got = linear(&x, &w, None).unwrap();
        got.into_data()
            .assert_approx_eq::<f32>(&want.into_data(), tolerance());
    }

    #[test]
    fn single_rows_split_over_threads_with_the_same_result() {
        let device = Default::default();
        let x = Tensor::<Flex, 2>::random([2, 300], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<Flex, 2>::random([300, 1000], Distribution::Normal(0.0, 1.0), &device);
        let b = Tensor::<Flex, 1>::random([1000], Distribution::Normal(0.0, 1.0), &device);
        let want = x.clone().matmul(w.clone()) + b.clone().unsqueeze_dim(0);
        let got = linear(&x, &w, Some(&b)).unwrap();
        got.into_data()
            .assert_approx_eq::<f32>(&want.into_data(), tolerance());
        let table = Tensor::<Flex, 2>::random([1000, 300], Distribution::Normal(0.0, 1.0), &device);
        let want = x.clone().matmul(table.clone().transpose());
        let got = linear(&x, &table.transpose(), None).unwrap();
        got.into_data()
            .assert_approx_eq::<f32>(&want.into_data(), tolerance());
    }

    #[test]
    fn bf16_weights_are_read_from_their_copy_with_identical_results() {
        let device = Default::default();
        let round = |t: Tensor<Flex, 2>| {
            let [r, c] = t.dims();
            let values: Vec<f32> = t.into_data().to_vec::<f32>().unwrap();
            let values: Vec<f32> = values
                .iter()
                .map(|v| f32::from_bits(v.to_bits() & 0xFFFF_0000))
                .collect();
            Tensor::<Flex, 2>::from_data(burn::tensor::TensorData::new(values, [r, c]), &device)
        };
        let x = Tensor::<Flex, 2>::random([3, 300], Distribution::Normal(0.0, 1.0), &device);
        let w = round(Tensor::random(
            [300, 1000],
            Distribution::Normal(0.0, 1.0),
            &device,
        ));
        let table = round(Tensor::random(
            [1000, 300],
            Distribution::Normal(0.0, 1.0),
            &device,
        ));
        for (weight, extent) in [(w, 300 * 1000), (table.transpose(), 1000 * 300)] {
            let (xf, wf) = (bridge::flex(&x).unwrap(), bridge::flex(&weight).unwrap());
            let copied = linear_flex(&xf, &wf, None, Weights::Bf16Copies, Products::F32).unwrap();
            let plain = linear_flex(&xf, &wf, None, Weights::AsTheyAre, Products::F32).unwrap();
            assert!(
                packed::bf16_copy(&wf, extent).is_some(),
                "the copy was made"
            );
            assert_eq!(
                copied.into_data().to_vec::<f32>().unwrap(),
                plain.into_data().to_vec::<f32>().unwrap()
            );
        }
    }

    /// Inference under bf16 autocast (evaluation): the fused layer gives the bits of the
    /// rounding ops around [`linear`].
    #[test]
    fn autocast_linear_equals_rounding_around_linear() {
        if !bf16_gemm::available() {
            eprintln!("skipped: this CPU has no AVX512_BF16");
            return;
        }
        let device = Default::default();
        let w = Tensor::<Flex, 2>::random([60, 50], Distribution::Normal(0.0, 1.0), &device);
        let b = Tensor::<Flex, 1>::random([50], Distribution::Normal(0.0, 1.0), &device);
        let _region = crate::autocast(DType::BF16);
        let round = crate::autocast_round::<Flex, 2>;
        // Many rows, and few (a classifier on `[CLS]` rows), which round all the same.
        for rows in [40, 3] {
            let x = Tensor::<Flex, 2>::random([rows, 60], Distribution::Normal(0.0, 1.0), &device);
            let fused = autocast_linear(&x, &w, Some(&b)).unwrap();
            let composed = round(
                linear(
                    &round(x.clone()),
                    &round(w.clone()),
                    Some(&crate::autocast_round(b.clone())),
                )
                .unwrap(),
            );
            assert_eq!(
                fused.into_data().to_vec::<f32>().unwrap(),
                composed.into_data().to_vec::<f32>().unwrap()
            );
        }
    }

    #[test]
    fn empty_products_are_the_bias() {
        let device = Default::default();
        let x = Tensor::<Flex, 2>::zeros([3, 0], &device);
        let w = Tensor::<Flex, 2>::zeros([0, 4], &device);
        let b = Tensor::<Flex, 1>::from_floats([1.0, 2.0, 3.0, 4.0], &device);
        let got = linear(&x, &w, Some(&b)).unwrap();
        assert_eq!(
            got.to_data().to_vec::<f32>().unwrap(),
            [1.0, 2.0, 3.0, 4.0].repeat(3)
        );
        let x = Tensor::<Flex, 2>::zeros([0, 5], &device);
        let w = Tensor::<Flex, 2>::zeros([5, 4], &device);
        assert_eq!(linear(&x, &w, None).unwrap().dims(), [0, 4]);
    }

    #[test]
    fn mismatched_shapes_are_left_to_burn() {
        let device = Default::default();
        let x = Tensor::<Flex, 2>::zeros([2, 3], &device);
        let w = Tensor::<Flex, 2>::zeros([4, 5], &device);
        assert!(linear(&x, &w, None).is_none());
        let w = Tensor::<Flex, 2>::zeros([3, 5], &device);
        let b = Tensor::<Flex, 1>::zeros([4], &device);
        assert!(linear(&x, &w, Some(&b)).is_none());
    }
}
