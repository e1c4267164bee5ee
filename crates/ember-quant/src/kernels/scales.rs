//! A borrowed view of a 4-bit weight for the kernels, with the per-block absmax decoded on the
//! fly: double quantization keeps one byte per block in memory, and the float32 absmax of a
//! block is two lookups, a multiply and an add away, computed once per block by the kernels.

use crate::blockwise::{Absmax, Packed4bit};

/// The absmax of every block, plain or double-quantized.
#[derive(Clone, Copy)]
pub(crate) enum Scales<'a> {
    /// One float32 per block.
    Plain(&'a [f32]),
    /// `nested_code[codes[b]] * nested_absmax[b / nested_blocksize] + offset`.
    Nested {
        codes: &'a [u8],
        nested_absmax: &'a [f32],
        offset: f32,
        nested_code: &'a [f32; 256],
        nested_blocksize: usize,
        /// `log2(nested_blocksize)` when it is a power of two (always, in bitsandbytes): a shift
        /// instead of a division per block.
        shift: Option<u32>,
    },
}

impl Scales<'_> {
    /// The float32 absmax of block `b`, computed exactly as `Packed4bit::absmax_f32` does (a
    /// float32 multiply, then a float32 add), so the dequantized weights are bit-identical.
    #[inline(always)]
    pub(crate) fn get(&self, b: usize) -> f32 {
        match *self {
            Scales::Plain(a) => a[b],
            Scales::Nested {
                codes,
                nested_absmax,
                offset,
                nested_code,
                nested_blocksize,
                shift,
            } => {
                let group = match shift {
                    Some(s) => b >> s,
                    None => b / nested_blocksize,
                };
                nested_code[codes[b] as usize] * nested_absmax[group] + offset
            }
        }
    }
}

impl Scales<'_> {
    /// The absmax of blocks `b0..b0 + out.len()` into `out`, each as [`Scales::get`] computes
    /// it, without a division or a call per block: the GEMV decodes a row's scales this way
    /// before its hot loop.
    pub(crate) fn fill(&self, b0: usize, out: &mut [f32]) {
        match *self {
            Scales::Plain(a) => out.copy_from_slice(&a[b0..b0 + out.len()]),
            Scales::Nested {
                codes,
                nested_absmax,
                offset,
                nested_code,
                nested_blocksize,
                ..
            } => {
                let codes = &codes[b0..b0 + out.len()];
                // Walk the nested groups the range crosses: one nested absmax per group.
                let (mut b, mut done) = (b0, 0);
                while done < out.len() {
                    let group = b / nested_blocksize;
                    let end = ((group + 1) * nested_blocksize - b0).min(out.len());
                    let scale = nested_absmax[group];
                    for (o, &c) in out[done..end].iter_mut().zip(&codes[done..end]) {
                        *o = nested_code[c as usize] * scale + offset;
                    }
                    b = b0 + end;
                    done = end;
                }
            }
        }
    }
}

/// What the 4-bit kernels read: the packed nibbles, the scales and the code.
#[derive(Clone, Copy)]
pub(crate) struct Weight4<'a> {
    /// Two nibbles per byte, element `2i` in the high nibble.
    pub(crate) packed: &'a [u8],
    /// The absmax of each block of the flattened weight.
    pub(crate) scales: Scales<'a>,
    /// The 16-entry code the nibbles index.
    pub(crate) code: [f32; 16],
    /// Elements per block (a power of two, 32..=4096).
    pub(crate) blocksize: usize,
    /// Rows of the weight.
    pub(crate) n_out: usize,
    /// Columns of the weight.
    pub(crate) n_in: usize,
}

impl<'a> Weight4<'a> {
    /// Views a 2-D packed weight, first checking every length the kernels rely on (the fields
    /// are public, so a weight may have changed since it was wrapped; the SIMD kernels read
    /// through raw pointers and must never go out of bounds).
    ///
    /// # Panics
    ///
    /// If the weight is not 2-D or its lengths do not fit (a caller bug).
    pub(crate) fn new(p: &'a Packed4bit) -> Self {
        p.validate()
            .expect("the 4-bit weight's lengths must fit its shape");
        let &[n_out, n_in] = p.state.shape.as_slice() else {
            panic!("a linear weight must be 2-D [out_features, in_features]");
        };
        let scales = match &p.state.absmax {
            Absmax::Plain(a) => Scales::Plain(a),
            Absmax::Nested(n) => Scales::Nested {
                codes: &n.codes,
                nested_absmax: &n.nested_absmax,
                offset: n.offset,
                nested_code: &n.nested_code,
                nested_blocksize: n.nested_blocksize,
                shift: n
                    .nested_blocksize
                    .is_power_of_two()
                    .then(|| n.nested_blocksize.trailing_zeros()),
            },
        };
        Weight4 {
            packed: &p.packed,
            scales,
            code: p.state.code,
            blocksize: p.state.blocksize,
            n_out,
            n_in,
        }
    }

    /// Whether every row starts a block (`in_features % blocksize == 0`, true of every real
    /// model): the GEMV's fast path, where a row is whole blocks of whole bytes.
    pub(crate) fn rows_align_with_blocks(&self) -> bool {
        self.n_in.is_multiple_of(self.blocksize)
    }

    /// The 16 dequantized values of block `b` (`code[i] * absmax`), optionally rounded to
    /// bfloat16: the table every nibble of the block indexes.
    #[inline(always)]
    pub(crate) fn scaled_code(&self, b: usize, bf16: bool) -> [f32; 16] {
        let a = self.scales.get(b);
        self.code.map(|c| {
            let v = c * a;
            if bf16 {
                super::round_bf16(v)
            } else {
                v
            }
        })
    }
}
