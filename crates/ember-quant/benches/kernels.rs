//! `QuantizedLinear`'s CPU products on SmolLM2-135M shapes, against float32 of the same shape.
//!
//! - `nf4_gemv_{1536x576,576x1536}_b1`: decoding (batch 1) through an NF4 + double-quant
//!   weight (blocksize 64); throughput is the packed bytes read (weights + absmax codes).
//! - `f32_gemv_*_b1`: the same product with a float32 weight through `gemm` (threaded).
//! - `int8_gemv_1536x576_b1`: LLM.int8 (threshold 6, no outliers in this input) at batch 1.
//! - `nf4_forward_1536x576_rows256` / `f32_gemm_1536x576_rows256`: prefill-sized products.
//! - `nf4_backward_input_1536x576_rows256`: the input gradient of a training step.
//!
//! `EMBER_NO_AVX512=1` measures the AVX2 kernels.

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ember_quant::{
    quantize_4bit, ComputeDtype, Int8Weight, QuantType, QuantizedLinear, QuantizedWeight,
};
use std::hint::black_box;

fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32 - 0.5) * 0.1
        })
        .collect()
}

fn nf4(n_out: usize, n_in: usize) -> QuantizedLinear {
    let w = values(n_out * n_in, 1);
    let p = quantize_4bit(&w, &[n_out, n_in], 64, QuantType::Nf4, true).unwrap();
    QuantizedLinear::new(QuantizedWeight::FourBit(p), ComputeDtype::F32, 0.0).unwrap()
}

/// `out = x · Wᵀ` with a float32 weight, through gemm on all threads.
fn f32_linear(w: &[f32], x: &[f32], rows: usize, n_out: usize, n_in: usize, out: &mut [f32]) {
    // SAFETY: `out` is rows x n_out, `x` rows x n_in, `w` n_out x n_in (read transposed).
    unsafe {
        gemm::gemm(
            rows,
            n_out,
            n_in,
            out.as_mut_ptr(),
            1,
            n_out as isize,
            false,
            x.as_ptr(),
            1,
            n_in as isize,
            w.as_ptr(),
            n_in as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }
}

fn gemv(c: &mut Criterion) {
    let mut g = c.benchmark_group("quant_kernels");
    for (n_out, n_in) in [(1536, 576), (576, 1536)] {
        let l = nf4(n_out, n_in);
        let x = values(n_in, 2);
        let mut out = vec![0.0; n_out];
        g.throughput(Throughput::Bytes(l.storage_bytes() as u64));
        g.bench_function(format!("nf4_gemv_{n_out}x{n_in}_b1"), |b| {
            b.iter(|| l.forward(black_box(&x), 1, &mut out))
        });
        let w = l.dequantize();
        g.throughput(Throughput::Bytes((w.len() * 4) as u64));
        g.bench_function(format!("f32_gemv_{n_out}x{n_in}_b1"), |b| {
            b.iter(|| f32_linear(black_box(&w), &x, 1, n_out, n_in, &mut out))
        });
    }

    let (n_out, n_in) = (1536, 576);
    let q = Int8Weight::quantize(n_out, n_in, &values(n_out * n_in, 3)).unwrap();
    let l8 = QuantizedLinear::new(QuantizedWeight::EightBit(q), ComputeDtype::F32, 6.0).unwrap();
    let x = values(n_in, 4);
    let mut out = vec![0.0; n_out];
    g.throughput(Throughput::Bytes(l8.storage_bytes() as u64));
    g.bench_function("int8_gemv_1536x576_b1", |b| {
        b.iter(|| l8.forward(black_box(&x), 1, &mut out))
    });

    let rows = 256;
    let l = nf4(n_out, n_in);
    let w = l.dequantize();
    let x = values(rows * n_in, 5);
    let mut out = vec![0.0; rows * n_out];
    g.throughput(Throughput::Elements((2 * rows * n_out * n_in) as u64));
    g.bench_function("nf4_forward_1536x576_rows256", |b| {
        b.iter(|| l.forward(black_box(&x), rows, &mut out))
    });
    g.bench_function("f32_gemm_1536x576_rows256", |b| {
        b.iter(|| f32_linear(black_box(&w), &x, rows, n_out, n_in, &mut out))
    });
    let grad = values(rows * n_out, 6);
    let mut grad_in = vec![0.0; rows * n_in];
    g.bench_function("nf4_backward_input_1536x576_rows256", |b| {
        b.iter(|| l.backward_input(black_box(&grad), rows, &mut grad_in))
    });
    g.finish();
}

criterion_group!(benches, gemv);
criterion_main!(benches);
