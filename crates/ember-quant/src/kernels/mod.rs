//! The fast products behind [`crate::QuantizedLinear`]: SIMD kernels that read the packed weight
//! directly, chosen at run time for the CPU (AVX-512, AVX2 + FMA, or portable scalar code).
//!
//! - [`nf4`]: the 4-bit GEMV for a few rows (decoding): nibbles expanded and looked up in a
//!   16-entry table already scaled by the block's absmax, so each weight costs one table lookup
//!   and one FMA and nothing but the packed bytes is read from memory.
//! - [`tile`]: many rows (prefill, training) and the input gradient: a tile of the weight is
//!   dequantized into a per-thread float32 buffer and multiplied with the `gemm` crate.
//! - [`int8`]: LLM.int8's integer dot products (AVX-512 VNNI, AVX2 `madd_epi16`, scalar).
//! - [`scales`]: the per-block absmax of a 4-bit weight, decoded on the fly from the double
//!   quantization (no float32 absmax array outlives a call).
//!
//! Every kernel exists for each [`Isa`]; tests run all the ones the machine has and compare them.

// The kernels use `std::arch` intrinsics inside `#[target_feature]` functions, which are
// `unsafe` to call; every such call and every raw-pointer access carries its `SAFETY` comment.

pub(crate) mod int8;
pub(crate) mod nf4;
pub(crate) mod scales;
pub(crate) mod tile;

#[cfg(test)]
mod tests;

use std::sync::OnceLock;

use crate::blockwise::Packed4bit;
use crate::matrix::{ComputeDtype, QuantizedLinear};
use crate::serialize::QuantizedWeight;
use scales::Weight4;

pub(crate) use crate::matrix::round_bf16;

/// The instruction set a kernel is compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    /// Portable Rust, no intrinsics.
    Scalar,
    /// x86-64 with AVX2 and FMA.
    Avx2,
    /// x86-64 with AVX-512 F / BW / VL (plus AVX2 and FMA).
    Avx512,
}

impl Isa {
    /// The widest instruction set of this CPU, cached. `EMBER_NO_AVX512` (any value) forces the
    /// AVX2 kernels, as the rest of the project does (tests and benches of the narrower path).
    pub(crate) fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let all = Isa::available();
            let widest = *all.last().expect("scalar is always available");
            if widest == Isa::Avx512 && std::env::var_os("EMBER_NO_AVX512").is_some() {
                Isa::Avx2
            } else {
                widest
            }
        })
    }

    /// Every instruction set this CPU can run, narrowest first (what the tests compare).
    pub(crate) fn available() -> Vec<Isa> {
        let mut all = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                all.push(Isa::Avx2);
                if std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512vl")
                {
                    all.push(Isa::Avx512);
                }
            }
        }
        all
    }
}

/// Whether the CPU has AVX-512 VNNI (`vpdpbusd`), for the int8 kernel of [`Isa::Avx512`].
pub(crate) fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Work (multiply-adds) below which a product runs on the calling thread: waking rayon's
/// workers costs a few microseconds, as much as a 64K-weight GEMV.
pub(crate) const PARALLEL_MIN_WORK: usize = 1 << 17;

/// How many output rows each parallel task of a GEMV takes: about four tasks per thread (so a
/// slow thread does not hold the others up), never fewer than `min` rows.
pub(crate) fn rows_per_task(n_out: usize, work: usize, min: usize) -> usize {
    if work < PARALLEL_MIN_WORK {
        return n_out.max(1);
    }
    let tasks = rayon::current_num_threads() * 4;
    n_out.div_ceil(tasks).max(min)
}

/// A raw pointer that may cross threads: the tiled products write disjoint column ranges of one
/// output matrix from several tasks, which slices cannot express.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);

impl SendPtr {
    /// The address. A method rather than the field, so that closures capture the whole
    /// (`Send`) wrapper and not the bare pointer.
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

// SAFETY: the pointer is only dereferenced by tasks that write disjoint elements (see the
// callers in `tile`), while the borrow it came from is held by the caller of the parallel loop.
unsafe impl Send for SendPtr {}
// SAFETY: as above; shared references to the wrapper only copy the address.
unsafe impl Sync for SendPtr {}

/// Rows up to which a 4-bit forward runs the GEMV: it decodes each weight once per group of
/// four rows and feeds it to them from registers, which beats dequantize + GEMM while the rows
/// are few. Measured on SmolLM2's prefill (Zen 4, 2 threads): 16 rows 60 ms by the GEMV
/// against 78-96 ms tiled (f32: 53-63 ms); 32 rows 125-131 ms against 88-98 ms tiled.
pub(crate) const GEMV_MAX_ROWS: usize = 16;

/// `out += x · Wᵀ` ([`crate::QuantizedLinear::forward`]) with the kernels of `isa`.
pub(crate) fn forward(isa: Isa, layer: &QuantizedLinear, x: &[f32], rows: usize, out: &mut [f32]) {
    match &layer.weight {
        QuantizedWeight::EightBit(w) => int8::forward(isa, w, x, rows, layer.threshold, out),
        QuantizedWeight::FourBit(p) => {
            let w = Weight4::new(p);
            if rows == 0 || w.n_out == 0 {
                return;
            }
            let bf16 = layer.compute_dtype == ComputeDtype::Bf16;
            if rows <= GEMV_MAX_ROWS && w.rows_align_with_blocks() {
                nf4::forward(isa, &w, x, rows, bf16, out);
            } else {
                let rounded: Vec<f32>;
                let x = if bf16 {
                    rounded = x.iter().map(|&v| round_bf16(v)).collect();
                    &rounded
                } else {
                    x
                };
                tile::forward(&tile::Tiles4 { w, isa, bf16 }, x, rows, bf16, out);
            }
        }
    }
}

/// `grad_in += grad_out · W` ([`crate::QuantizedLinear::backward_input`]) with the kernels of
/// `isa`, against the float32 dequantized weight.
pub(crate) fn backward_input(
    isa: Isa,
    layer: &QuantizedLinear,
    grad_out: &[f32],
    rows: usize,
    grad_in: &mut [f32],
) {
    match &layer.weight {
        QuantizedWeight::EightBit(w) => {
            w.validate()
                .expect("the int8 weight's lengths must fit its shape");
            tile::backward(&int8::Tiles8(w), grad_out, rows, grad_in);
        }
        QuantizedWeight::FourBit(p) => {
            let w = Weight4::new(p);
            tile::backward(
                &tile::Tiles4 {
                    w,
                    isa,
                    bf16: false,
                },
                grad_out,
                rows,
                grad_in,
            );
        }
    }
}

/// The 4-bit weight in float32 ([`crate::QuantizedLinear::dequantize`]), bit-identical to
/// `dequantize_4bit`.
pub(crate) fn dequantize_4bit(isa: Isa, p: &Packed4bit) -> Vec<f32> {
    tile::dequantize(isa, &Weight4::new(p))
}
