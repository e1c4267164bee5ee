//! Dropout masks drawn by a fast generator when training on the CPU.
//!
//! burn's `Dropout` draws a Bernoulli tensor through `rand`'s ChaCha generator, one sampler
//! call per value, then multiplies twice (by the mask, then by `1 / (1 - p)`). A BERT training
//! step at batch 32 × 128 draws about 40 million values. Here the mask is drawn with
//! SplitMix64 in parallel chunks and already holds `0` or `1 / (1 - p)`, so dropout is one
//! multiply. The seed comes from burn's own generator, so `B::seed` still makes a run, and a
//! resumed run, repeat exactly.

use crate::bridge;
use burn::tensor::{backend::Backend, Distribution, Tensor};
use rayon::prelude::*;

/// Values per parallel chunk, each chunk with its own stream.
const CHUNK: usize = 1 << 16;

/// A dropout mask of `shape`: each value is 0 with probability `prob`, else `1 / (1 - prob)`.
///
/// Only where the CPU draws it cheaper than burn: training (autodiff) on Flex, with the
/// `autodiff` feature. `None` elsewhere, and for `prob` outside `(0, 1)`; the caller then
/// runs burn's `Dropout`.
pub fn dropout_mask<B: Backend, const D: usize>(
    shape: [usize; D],
    prob: f64,
    device: &B::Device,
) -> Option<Tensor<B, D>> {
    if !(bridge::is_autodiff_flex::<B>() && prob > 0.0 && prob < 1.0) {
        return None;
    }
    // Two uniform draws from burn's generator seed this mask's streams.
    let draws = Tensor::<B, 1>::random([2], Distribution::Default, device)
        .into_data()
        .into_vec::<f32>()
        .ok()?;
    let seed = (u64::from(draws[0].to_bits()) << 32) | u64::from(draws[1].to_bits());
    let values = mask_values(seed, shape.iter().product(), prob);
    Some(Tensor::from_data(
        burn::tensor::TensorData::new(values, shape.to_vec()),
        device,
    ))
}

/// `len` mask values drawn from `seed`: each 0 with probability `prob`, else `1 / (1 - prob)`.
fn mask_values(seed: u64, len: usize, prob: f64) -> Vec<f32> {
    let scale = (1.0 / (1.0 - prob)) as f32;
    // Keep a value when its 32 random bits are at least `prob · 2^32`.
    let threshold = (prob * 4_294_967_296.0) as u64;
    let mut values = vec![0.0f32; len];
    values
        .par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(chunk, out)| {
            let mut state = seed ^ (chunk as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            for v in out {
                let bits = splitmix64(&mut state) >> 32;
                *v = if bits >= threshold { scale } else { 0.0 };
            }
        });
    values
}

/// One step of SplitMix64 (Steele, Lea and Flood), a fast generator with 64-bit output.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(all(test, feature = "autodiff"))]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};

    type B = Autodiff<Flex>;

    // That `B::seed` makes a mask repeat is tested in `tests/dropout_seed.rs`, a process of its
    // own: burn's generator is one per process, and this binary's other tests draw from it
    // while these run.
    #[test]
    fn keeps_the_right_share_scaled_and_repeats_under_the_same_seed() {
        let values = mask_values(7, 300_000, 0.1);
        let kept = values.iter().filter(|&&v| v != 0.0).count() as f64 / values.len() as f64;
        assert!((kept - 0.9).abs() < 0.003, "{kept}");
        let scale = 1.0 / 0.9f32;
        assert!(values.iter().all(|&v| v == 0.0 || v == scale));
        assert_eq!(mask_values(7, 300_000, 0.1), values);
        assert_ne!(mask_values(8, 300_000, 0.1), values);
        // Chunks draw their own streams: the second chunk is not the first again.
        assert_ne!(values[..CHUNK], values[CHUNK..2 * CHUNK]);
    }

    #[test]
    fn draws_a_new_mask_on_each_call() {
        let device = Default::default();
        let first = dropout_mask::<B, 2>([300, 1000], 0.1, &device).unwrap();
        let second = dropout_mask::<B, 2>([300, 1000], 0.1, &device).unwrap();
        let first = first.to_data().into_vec::<f32>().unwrap();
        assert_ne!(second.to_data().into_vec::<f32>().unwrap(), first);
        let kept = first.iter().filter(|&&v| v != 0.0).count() as f64 / first.len() as f64;
        assert!((kept - 0.9).abs() < 0.003, "{kept}");
    }

    #[test]
    fn only_for_training_on_flex_and_proper_probabilities() {
        let device = Default::default();
        assert!(dropout_mask::<Flex, 1>([4], 0.1, &device).is_none());
        assert!(dropout_mask::<B, 1>([4], 0.0, &device).is_none());
        assert!(dropout_mask::<B, 1>([4], 1.0, &device).is_none());
    }
}
