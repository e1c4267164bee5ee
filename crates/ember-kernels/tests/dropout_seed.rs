//! `B::seed` makes a dropout mask repeat, as it makes burn's own `Dropout` repeat.
//!
//! A test binary of its own with this one test: burn's CPU generator is one per process, and a
//! test drawing from it on another thread between the seed and the mask would change the mask.
#![cfg(feature = "autodiff")]

use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use ember_kernels::dropout_mask;

type B = Autodiff<Flex>;

fn mask_after_seed(seed: u64) -> Vec<f32> {
    let device = Default::default();
    B::seed(&device, seed);
    dropout_mask::<B, 2>([300, 1000], 0.1, &device)
        .expect("Flex under autodiff draws its own masks")
        .to_data()
        .into_vec::<f32>()
        .unwrap()
}

#[test]
fn the_same_seed_gives_the_same_mask_and_another_seed_another() {
    let first = mask_after_seed(7);
    assert_eq!(mask_after_seed(7), first);
    assert_ne!(mask_after_seed(8), first);
}
