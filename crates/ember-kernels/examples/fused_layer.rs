//! One BERT feed-forward block (`LayerNorm(gelu(x · W1 + b1) · W2 + b2 + x)`) through the
//! fused kernels and through burn's own operations, on the Flex backend: the two agree to
//! float rounding, and the kernels take a fraction of the time.
//!
//! ```sh
//! cargo run --release -p ember-kernels --example fused_layer
//! ```

use burn::backend::Flex;
use burn::tensor::{activation, Distribution, Tensor};
use std::time::Instant;

fn main() {
    let device = Default::default();
    let normal = Distribution::Normal(0.0, 0.05);
    let (rows, hidden, inner) = (1024, 768, 3072);
    let x = Tensor::<Flex, 2>::random([rows, hidden], Distribution::Normal(0.0, 1.0), &device);
    let w1 = Tensor::<Flex, 2>::random([hidden, inner], normal, &device);
    let b1 = Tensor::<Flex, 1>::random([inner], normal, &device);
    let w2 = Tensor::<Flex, 2>::random([inner, hidden], normal, &device);
    let b2 = Tensor::<Flex, 1>::random([hidden], normal, &device);
    let gamma = Tensor::<Flex, 1>::ones([hidden], &device);
    let beta = Tensor::<Flex, 1>::zeros([hidden], &device);
    let eps = 1e-12;
    assert!(ember_kernels::applies::<Flex>());

    let fused = || {
        let h = ember_kernels::linear(&x, &w1, Some(&b1)).expect("Flex, f32");
        let h = ember_kernels::gelu_erf(&h).expect("Flex, f32");
        let y = ember_kernels::linear(&h, &w2, Some(&b2)).expect("Flex, f32");
        ember_kernels::layer_norm(&y, Some(&x), &gamma, Some(&beta), eps).expect("Flex, f32")
    };
    let burn_ops = || {
        let h = activation::gelu(x.clone().matmul(w1.clone()) + b1.clone().unsqueeze_dim(0));
        let y = h.matmul(w2.clone()) + b2.clone().unsqueeze_dim(0) + x.clone();
        let mut ln = burn::nn::LayerNormConfig::new(hidden)
            .with_epsilon(eps)
            .init::<Flex>(&device);
        ln.gamma = burn::module::Param::from_tensor(gamma.clone());
        ln.beta = Some(burn::module::Param::from_tensor(beta.clone()));
        ln.forward(y)
    };
    let time = |f: &dyn Fn() -> Tensor<Flex, 2>| {
        let _ = f().into_data(); // warm-up
        let start = Instant::now();
        let out = f().into_data();
        (out, start.elapsed())
    };
    let (a, t_fused) = time(&fused);
    let (b, t_burn) = time(&burn_ops);
    let worst = a
        .iter::<f32>()
        .zip(b.iter::<f32>())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    println!("largest difference between the two: {worst:.2e}");
    println!(
        "fused kernels {:.1} ms, burn's operations {:.1} ms",
        t_fused.as_secs_f64() * 1e3,
        t_burn.as_secs_f64() * 1e3
    );
}
