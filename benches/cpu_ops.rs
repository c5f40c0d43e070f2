//! CPU hot paths, named `cpu/{op}/{dtype}/...` with criterion throughput set:
//! for matrix products and attention, "elements" are floating-point
//! operations, so criterion's `Gelem/s` reads as GFLOP/s; for RMSNorm they
//! are bytes moved (`GB/s`).
//!
//! Ceilings on the project's 2-core machine (docs/cpu-matmul.md): PyTorch's
//! f32 matrix product 150-160 GFLOP/s at 1024-2048 square (quoted for an
//! earlier machine of the same kind). Target: >= 120 GFLOP/s (80%) on the square sizes and
//! no cliff on the skinny shapes of a 256-wide model.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::needless_range_loop)]

use aha_tensor::cpu::{self, AttnShape, Gemm};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::time::Duration;

fn data(n: usize, seed: u32) -> Vec<f32> {
    // A cheap deterministic pattern in [-1, 1): no RNG needed in a benchmark.
    (0..n)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / (1u32 << 23) as f32 - 1.0)
        .collect()
}

/// (label, m, k, n, trans_a, trans_b): square sizes, then the forward and
/// backward products of a 256-wide model on 2048 tokens.
const MATMUL_SHAPES: &[(&str, usize, usize, usize, bool, bool)] = &[
    ("square512", 512, 512, 512, false, false),
    ("square1024", 1024, 1024, 1024, false, false),
    ("square2048", 2048, 2048, 2048, false, false),
    ("x2048x256_w768x256T", 2048, 256, 768, false, true),
    ("x2048x256_w4096x256T", 2048, 256, 4096, false, true),
    ("dy2048x768_w768x256", 2048, 768, 256, false, false),
    ("dyT768x2048_x2048x256", 768, 2048, 256, true, false),
];

fn matmul(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu/matmul/f32");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500));
    for &(label, m, k, n, ta, tb) in MATMUL_SHAPES {
        let (a, b) = (data(m * k, 1), data(k * n, 2));
        let mut out = vec![0f32; m * n];
        g.throughput(Throughput::Elements(2 * (m * k * n) as u64));
        let mut gm = Gemm::new(m, k, n);
        gm.trans_a = ta;
        gm.trans_b = tb;
        g.bench_function(BenchmarkId::new("gemm", label), |bch| {
            bch.iter(|| cpu::matmul(black_box(&mut out), black_box(&a), black_box(&b), gm))
        });
        // The alternative backend, kept to justify the choice.
        let (rsa, csa) = if ta { (1, m as isize) } else { (k as isize, 1) };
        let (rsb, csb) = if tb { (1, k as isize) } else { (n as isize, 1) };
        g.bench_function(BenchmarkId::new("matrixmultiply", label), |bch| {
            bch.iter(|| {
                // SAFETY: the strides address only inside a (m*k), b (k*n) and out (m*n).
                unsafe {
                    matrixmultiply::sgemm(
                        m,
                        k,
                        n,
                        1.0,
                        a.as_ptr(),
                        rsa,
                        csa,
                        b.as_ptr(),
                        rsb,
                        csb,
                        0.0,
                        out.as_mut_ptr(),
                        n as isize,
                        1,
                    )
                }
            })
        });
    }
    g.finish();
}

/// The same products with bf16 operands and f32 sums (`--precision bf16`;
/// AVX512-BF16 where the CPU has it). Target: 2x the f32 rate on the
/// model's shapes, the instruction's rate over the f32 FMA's.
fn matmul_bf16(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu/matmul/bf16");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500));
    cpu::set_product_precision(cpu::ProductPrecision::Bf16);
    for &(label, m, k, n, ta, tb) in MATMUL_SHAPES {
        let (a, b) = (data(m * k, 1), data(k * n, 2));
        let mut out = vec![0f32; m * n];
        g.throughput(Throughput::Elements(2 * (m * k * n) as u64));
        let mut gm = Gemm::new(m, k, n);
        gm.trans_a = ta;
        gm.trans_b = tb;
        g.bench_function(BenchmarkId::new("packed", label), |bch| {
            bch.iter(|| cpu::matmul(black_box(&mut out), black_box(&a), black_box(&b), gm))
        });
    }
    cpu::set_product_precision(cpu::ProductPrecision::F32);
    g.finish();
}

fn attention(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu/attention/f32");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500));
    // The bench configs' attention: 8 query heads, 4 kv heads, head dim 32.
    for &(b, t) in &[(8usize, 256usize), (1, 2048)] {
        let s = AttnShape {
            b,
            t,
            h: 8,
            hk: 4,
            dk: 32,
            dv: 32,
            scale: 1.0 / (32f64).sqrt(),
        };
        let q = data(b * t * 8 * 32, 1);
        let k = data(b * t * 4 * 32, 2);
        let v = data(b * t * 4 * 32, 3);
        let mut out = vec![0f32; q.len()];
        let mut lse = vec![0f32; b * 8 * t];
        // Causal: half of the T x T scores; QK^T and PV are 2 * D flops each per score.
        let fwd_flops = (2 * 2 * b * 8 * t * t * 32 / 2) as u64;
        g.throughput(Throughput::Elements(fwd_flops));
        let label = format!("b{b}_t{t}_h8_hk4_d32");
        g.bench_function(BenchmarkId::new("forward", &label), |bch| {
            bch.iter(|| cpu::attention_forward(&mut out, &mut lse, &q, &k, &v, s))
        });
        let dout = data(out.len(), 4);
        let (mut dq, mut dk, mut dv) = (vec![0f32; q.len()], vec![0f32; k.len()], vec![0f32; v.len()]);
        // Backward: recompute QK^T, then dV, dP, dQ, dK: 5 products.
        g.throughput(Throughput::Elements(fwd_flops * 5 / 2));
        g.bench_function(BenchmarkId::new("backward", &label), |bch| {
            bch.iter(|| cpu::attention_backward(&mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse, s))
        });
    }
    g.finish();
}

fn rmsnorm(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu/rmsnorm/f32");
    g.sample_size(20)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(300));
    for &(rows, ch) in &[(2048usize, 256usize), (2048, 4096)] {
        let x = data(rows * ch, 1);
        let w = data(ch, 2);
        let dout = data(rows * ch, 3);
        let (mut y, mut rstd) = (vec![0f32; rows * ch], vec![0f32; rows]);
        // Forward reads x and writes y.
        g.throughput(Throughput::Bytes((2 * rows * ch * 4) as u64));
        g.bench_function(BenchmarkId::new("forward", format!("{rows}x{ch}")), |bch| {
            bch.iter(|| cpu::rmsnorm_forward(&mut y, &mut rstd, &x, &w, rows, ch, 1e-6))
        });
        let (mut dx, mut dw) = (vec![0f32; rows * ch], vec![0f32; ch]);
        // Backward reads x and dout, writes dx.
        g.throughput(Throughput::Bytes((3 * rows * ch * 4) as u64));
        g.bench_function(BenchmarkId::new("backward", format!("{rows}x{ch}")), |bch| {
            bch.iter(|| cpu::rmsnorm_backward(&mut dx, &mut dw, &dout, &x, &w, &rstd, rows, ch))
        });
    }
    g.finish();
}

/// The bandwidth ceiling for the memory-bound kernels: a plain copy of the
/// same bytes (read + write counted, as for the kernels).
fn copy(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu/copy/f32");
    g.sample_size(20)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(300));
    for &n in &[2048usize * 256, 2048 * 4096] {
        let x = data(n, 1);
        let mut y = vec![0f32; n];
        g.throughput(Throughput::Bytes((2 * n * 4) as u64));
        g.bench_function(BenchmarkId::new("copy", n), |bch| {
            bch.iter(|| y.copy_from_slice(black_box(&x)))
        });
    }
    g.finish();
}

/// The chunked lm-head log-probs and entropies (the CPU twin of the fused GPU
/// path): 512 tokens, hidden 256, vocabulary 32,768 in chunks of 4,096.
/// Elements are FLOPs of the products (forward 2NCV; forward + backward 4 x,
/// the backward recomputing each chunk): GFLOP/s against the matmul rows
/// above, the ceiling; target >= 70% of it (the softmax passes are O(NV)
/// next to O(NCV)).
fn lm_head(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu/lm_head/f32");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(300));
    let (n, ch, v) = (512usize, 256usize, 32_768usize);
    let s = cpu::LmHeadShape {
        n,
        c: ch,
        v,
        chunk: 4096,
        temperature: 1.0,
    };
    let (h, w) = (data(n * ch, 1), data(v * ch, 2));
    let t: Vec<u32> = (0..n as u32).map(|i| i * 7919 % v as u32).collect();
    let (mut lp, mut ent, mut lse) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    let flops = (2 * n * ch * v) as u64;
    g.throughput(Throughput::Elements(flops));
    g.bench_function(BenchmarkId::new("forward", format!("{n}x{ch}x{v}")), |b| {
        b.iter(|| cpu::lm_head_logprob_forward(&mut lp, &mut ent, &mut lse, &h, &w, &t, s))
    });
    let (dl, de) = (data(n, 3), data(n, 4));
    let (mut dh, mut dw) = (vec![0f32; n * ch], vec![0f32; v * ch]);
    g.throughput(Throughput::Elements(4 * flops));
    g.bench_function(BenchmarkId::new("forward_backward", format!("{n}x{ch}x{v}")), |b| {
        b.iter(|| {
            cpu::lm_head_logprob_forward(&mut lp, &mut ent, &mut lse, &h, &w, &t, s).unwrap();
            cpu::lm_head_logprob_backward(&mut dh, &mut dw, &h, &w, &t, &lse, &ent, &dl, &de, s)
        })
    });
    // The training step's shape (qwen3-moe-bench, B=8, T=256: 2,040 scored
    // rows, a 4,096 vocabulary in one chunk) with the logits kept for the
    // backward, as `aha bench train` runs it: forward 2NCV flops, backward
    // 4NCV (no recomputation).
    let (n, v) = (2040usize, 4096usize);
    let s = cpu::LmHeadShape {
        n,
        c: ch,
        v,
        chunk: 4096,
        temperature: 1.0,
    };
    let (h, w) = (data(n * ch, 5), data(v * ch, 6));
    let t: Vec<u32> = (0..n as u32).map(|i| i * 7919 % v as u32).collect();
    let (mut lp, mut ent, mut lse) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    let mut kept = vec![0f32; n * v];
    let (dl, de) = (data(n, 7), data(n, 8));
    let (mut dh, mut dw) = (vec![0f32; n * ch], vec![0f32; v * ch]);
    let flops = (2 * n * ch * v) as u64;
    g.throughput(Throughput::Elements(flops));
    g.bench_function(BenchmarkId::new("forward_keep", format!("{n}x{ch}x{v}")), |b| {
        b.iter(|| cpu::lm_head_logprob_forward_keep(&mut lp, &mut ent, &mut lse, &mut kept, &h, &w, &t, s))
    });
    g.throughput(Throughput::Elements(2 * flops));
    g.bench_function(BenchmarkId::new("backward_kept", format!("{n}x{ch}x{v}")), |b| {
        // The backward overwrites the kept logits with their gradient: each
        // iteration gets a fresh copy (not timed).
        b.iter_batched_ref(
            || kept.clone(),
            |k| cpu::lm_head_logprob_backward_kept(&mut dh, &mut dw, &h, &w, k, &t, &lse, &ent, &dl, &de, s),
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

/// Decode-shaped products `x[m, 256] W^T` over 40 distinct weights
/// [1024, 256] (40 MiB of f32, more than the last-level cache), on one
/// thread as a decode group runs them: "elements" are weight bytes, so
/// criterion's `GB/s` reads against the single-thread copy above (which
/// moves 2 bytes for each one counted). `skinny` is `cpu::matmul` with the
/// weight in [out, in] layout (the skinny kernel for m <= 32); `general` is
/// the same product with the weight stored [in, out], which takes the
/// packing general kernel.
fn skinny(c: &mut Criterion) {
    const MATS: usize = 40;
    let (k, n) = (256usize, 1024usize);
    let mut g = c.benchmark_group("cpu/skinny/f32");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(300));
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let w: Vec<Vec<f32>> = (0..MATS).map(|i| data(n * k, i as u32)).collect();
    g.throughput(Throughput::Bytes((MATS * n * k * 4) as u64));
    for &m in &[1usize, 4, 8, 16, 32] {
        let x = data(m * k, 99);
        let mut out = vec![0f32; m * n];
        for (name, gm) in [("skinny", Gemm::new(m, k, n).tb()), ("general", Gemm::new(m, k, n))] {
            g.bench_function(BenchmarkId::new(name, m), |bch| {
                bch.iter(|| {
                    pool.install(|| {
                        for wi in &w {
                            cpu::matmul(black_box(&mut out), black_box(&x), wi, gm).unwrap();
                        }
                    })
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, matmul, matmul_bf16, attention, rmsnorm, copy, lm_head, skinny);
criterion_main!(benches);
