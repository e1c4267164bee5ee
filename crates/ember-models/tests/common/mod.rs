//! Helpers shared by the parity tests: fixture paths, expected-value files, and the relative
//! comparison every parity test uses.
#![allow(dead_code)]

use burn::tensor::{Int, Tensor};
use ember_models::Weights;
use std::path::{Path, PathBuf};

/// The backend the parity tests run on.
pub type B = burn::backend::Flex;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models")
}

/// A fixture file of expected values.
pub struct Expected(pub Weights);

impl Expected {
    pub fn open(name: &str) -> Self {
        Self(Weights::open(&fixtures().join(name)).unwrap())
    }

    pub fn shape(&self, key: &str) -> Vec<usize> {
        self.0
            .shape(key)
            .unwrap_or_else(|| panic!("fixture has no `{key}`"))
            .to_vec()
    }

    pub fn float<const D: usize>(&self, key: &str) -> Tensor<B, D> {
        let shape: [usize; D] = self.shape(key).try_into().unwrap();
        self.0.get(key, shape, &Default::default()).unwrap()
    }

    pub fn int<const D: usize>(&self, key: &str) -> Tensor<B, D, Int> {
        self.float::<D>(key).int()
    }
}

impl Expected {
    /// The values of a fixture tensor of any rank, flat.
    pub fn flat(&self, key: &str) -> Vec<f32> {
        match self.shape(key).len() {
            1 => self.float::<1>(key).into_data().to_vec().unwrap(),
            2 => self.float::<2>(key).into_data().to_vec().unwrap(),
            3 => self.float::<3>(key).into_data().to_vec().unwrap(),
            4 => self.float::<4>(key).into_data().to_vec().unwrap(),
            r => panic!("rank {r}"),
        }
    }
}

/// Each value within `tolerance` relative to the larger of its own size and the tensor's root
/// mean square (so that values near zero are judged on the tensor's scale, not their own).
pub fn assert_close<const D: usize>(
    got: Tensor<impl burn::tensor::backend::Backend, D>,
    want: &[f32],
    tolerance: f32,
    what: &str,
) {
    assert_close_floor(got, want, tolerance, 1e-6, what)
}

/// [`assert_close`] with the smallest scale a value is judged on.
pub fn assert_close_floor<const D: usize>(
    got: Tensor<impl burn::tensor::backend::Backend, D>,
    want: &[f32],
    tolerance: f32,
    floor: f32,
    what: &str,
) {
    let got: Vec<f32> = got.into_data().convert::<f32>().to_vec().unwrap();
    assert_eq!(got.len(), want.len(), "{what}: length");
    // The floor is for tensors that are zero up to rounding (the key bias gradient).
    let rms = (want.iter().map(|w| w * w).sum::<f32>() / want.len() as f32)
        .sqrt()
        .max(floor);
    let mut worst = 0f32;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs() / w.abs().max(rms);
        worst = worst.max(err);
        assert!(
            err <= tolerance,
            "{what}[{i}]: ember {g} python {w} (relative {err:.1e}, rms {rms:.1e})"
        );
    }
    eprintln!(
        "{what}: worst relative error {worst:.1e} over {} values",
        got.len()
    );
}

/// Every how many values of a vector the summaries probe (`SUMMARY_STRIDE` in
/// `make_fixtures.py`).
pub const SUMMARY_STRIDE: usize = 24;

/// Compares Ember's vectors (`width` values each, flat) with Python's summary of them in the
/// fixture (`{key}.probe`, `{key}.norm`, `{key}.sum`): the real model's outputs are not stored.
/// Probes within `tolerance` of the larger of their size and the vector's RMS; norm and sum
/// (float64) within `tolerance` of the norm.
pub fn assert_summary(got: &[f32], width: usize, e: &Expected, key: &str, tolerance: f64) {
    let probes = e.flat(&format!("{key}.probe"));
    let norms = e.flat(&format!("{key}.norm"));
    let sums = e.flat(&format!("{key}.sum"));
    let per_vector = width.div_ceil(SUMMARY_STRIDE);
    assert_eq!(got.len(), norms.len() * width, "{key}: size");
    let mut worst = 0f64;
    for (i, v) in got.chunks_exact(width).enumerate() {
        let norm = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let sum = v.iter().map(|x| *x as f64).sum::<f64>();
        let want_norm = norms[i] as f64;
        let rms = want_norm / (width as f64).sqrt();
        let mut check = |got: f64, want: f64, scale: f64, what: &str| {
            let err = (got - want).abs() / scale.max(1e-12);
            worst = worst.max(err);
            assert!(
                err <= tolerance,
                "{key}[{i}] {what}: ember {got} python {want} ({err:.1e})"
            );
        };
        check(norm, want_norm, want_norm, "norm");
        check(sum, sums[i] as f64, want_norm, "sum");
        for (j, p) in v.iter().step_by(SUMMARY_STRIDE).enumerate() {
            let want = probes[i * per_vector + j] as f64;
            check(*p as f64, want, want.abs().max(rms), "probe");
        }
    }
    eprintln!(
        "{key}: worst relative error {worst:.1e} over {} vectors",
        norms.len()
    );
}
