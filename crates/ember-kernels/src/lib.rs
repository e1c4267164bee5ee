//! Fused CPU kernels for Ember's models on burn's Flex backend.
//!
//! burn's CPU backend (Flex) runs each tensor operation on its own: a bias add after a GEMM is
//! a second pass over the output through its strided broadcast path, LayerNorm is half a dozen
//! passes, the erf GELU calls a scalar `erff` per element, and attention wants its heads copied
//! into contiguous tensors first. At BERT shapes that costs as much as the GEMMs themselves.
//! This crate does each of those in one pass over contiguous memory:
//!
//! - [`linear`]: `x · W + b` as one GEMM that starts from the bias rows;
//! - [`layer_norm`]: residual add and LayerNorm in one pass per row; [`rms_norm`] likewise;
//! - [`gelu_erf`] and [`silu_mul`]: vectorised GELU and SwiGLU gating;
//! - [`rotary`]: rotary position embeddings read from the strided head view;
//! - [`cross_entropy`]: the mean loss over rows of logits from one `log Σ exp` per row;
//! - [`attention`]: scaled dot-product attention over strided `[batch, heads, seq, head_dim]`
//!   views (head split and merge cost nothing), with a key padding mask, a causal mask (run in
//!   blocks of queries against only the keys they see) and grouped key / value heads.
//!
//! For training on the CPU (feature `autodiff`), [`linear`], [`layer_norm`], [`rms_norm`],
//! [`gelu_erf`], [`silu_mul`], [`rotary`], [`attention`] and [`cross_entropy`] also run on `Autodiff<Flex>`, each as one recorded operation with its own
//! backward pass, and [`dropout_mask`] draws dropout masks with a fast generator.
//!
//! [`frozen_linear`] multiplies by a weight that is not a burn tensor ([`FrozenWeight`]: a packed
//! 4-bit or int8 base that computes its own products), with only the input's gradient in training.
//!
//! [`autocast`] opens a mixed-precision region (torch's `autocast`): the models round the
//! operands and results of their linear layers and attention with [`autocast_round`], and
//! gradients on their way back.
//!
//! bf16 products (inside a bf16 [`autocast`] region, forward and backward, and with a
//! `.bfloat16()` model's weights) run on the CPU's bf16 dot-product instructions where it has
//! AVX512_BF16 ([`bf16_gemm_available`]): both operands packed as bf16 pairs, the sums in f32,
//! 1.6-1.8x the f32 GEMM's rate on the 2-core Zen 4 bench machine.
//!
//! For decoding, [`linear`] reads a weight whose values are all bf16 (a checkpoint published in
//! bf16, loaded in f32) from a bf16 copy: half the bytes, the same results.
//!
//! Every function is generic over the burn backend and returns `None` when it does not apply:
//! another backend (CUDA), another dtype than f32, or a layout it does not read. The caller then runs burn's own operations, so results never depend on
//! whether a kernel ran beyond float rounding (the models' parity tests run through both).

#![warn(unsafe_op_in_unsafe_fn)]

mod alloc;
mod assign;
mod attention;
mod autocast;
mod bf16_gemm;
mod bridge;
mod custom;
mod dropout;
mod dtype;
mod frozen;
mod linear;
mod loss;
mod math;
mod norm;
mod packed;
mod ptr;
mod rotary;
mod team;
#[cfg(feature = "autodiff")]
mod tracked;

pub use alloc::{keep_freed_memory, HugePageAlloc};
pub use assign::assign_along;
pub use attention::{attention, AttentionMask};
pub use autocast::{autocast, autocast_dtype, autocast_round, round_to, AutocastGuard};
pub use bf16_gemm::{bf16_gemm_available, BF16_GEMM_VAR};
pub use custom::{map_values, GradientMap, ValuesFn};
pub use dropout::dropout_mask;
pub use dtype::{float32, to_half};
pub use frozen::{frozen_linear, FrozenWeight};
pub use linear::{autocast_linear, linear};
pub use loss::{cross_entropy, IGNORE_INDEX};
pub use norm::{gelu_erf, layer_norm, rms_norm, silu_mul};
pub use rotary::rotary;

/// Whether the kernels of this crate run for backend `B` (Flex, f32 tensors).
pub fn applies<B: burn::tensor::backend::Backend>() -> bool {
    bridge::is_flex::<B>()
}

/// Runs `f` on one of rayon's worker threads when `B` is Flex, else on the calling thread.
///
/// Flex and these kernels run their parallel loops in rayon's pool, one worker per core.
/// Called from outside the pool, every parallel loop hands its work to the workers while the
/// calling thread waits, and between loops the idle workers spin for work: one more thread
/// than cores, which on a 2-core machine cost about a fifth of a decoding step in scheduler
/// time. From inside the pool the calling worker takes part in the loops itself.
///
/// The caller's [`autocast`] state goes along to the worker.
pub fn on_worker<B: burn::tensor::backend::Backend, R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if !applies::<B>() || rayon::current_thread_index().is_some() {
        f()
    } else {
        let dtype = autocast_dtype();
        rayon::scope(|_| {
            let _state = autocast::enter(dtype);
            f()
        })
    }
}
