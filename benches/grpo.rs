//! The GRPO math on the CPU: advantages and the loss with its gradient, in
//! completion tokens per second (`cpu/grpo_loss/f64/...`). The limit it is
//! compared with is memory traffic: the loss reads five [B, T] buffers and
//! writes two, about 56 bytes a token, so at the ~47 GB/s a copy reaches
//! from memory here (`cpu/copy`) a few hundred million tokens a second
//! would be the bound; the model's forward over the same tokens costs
//! orders of magnitude more.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use aha_grpo::{compute_advantages, grpo_loss, AdvantageEstimator, ImportanceSampling, LossConfig, LossInputs};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::time::Duration;

fn grpo(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu/grpo_loss/f64");
    g.sample_size(20)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(300));
    // 64 prompts x 16 completions (R1's G) x 1024 tokens.
    let (b, t) = (1024usize, 1024usize);
    let n = b * t;
    let logp: Vec<f64> = (0..n).map(|i| -((i % 97) as f64) / 50.0).collect();
    let old: Vec<f64> = logp
        .iter()
        .enumerate()
        .map(|(i, x)| x + ((i % 13) as f64 - 6.0) / 100.0)
        .collect();
    let refp: Vec<f64> = logp
        .iter()
        .enumerate()
        .map(|(i, x)| x + ((i % 7) as f64 - 3.0) / 50.0)
        .collect();
    let mask: Vec<bool> = (0..n).map(|i| i % t < t - (i / t) % 300).collect();
    let rewards: Vec<f64> = (0..b).map(|i| (i % 3) as f64 / 2.0).collect();
    let adv = compute_advantages(&rewards, 16, AdvantageEstimator::Group)
        .unwrap()
        .values;
    g.throughput(Throughput::Elements(n as u64));
    for (label, level) in [
        ("token", ImportanceSampling::Token),
        ("sequence", ImportanceSampling::Sequence),
    ] {
        let cfg = LossConfig {
            beta: 0.001,
            importance_sampling_level: level,
            ..LossConfig::default()
        };
        let inp = LossInputs {
            batch: b,
            seq: t,
            logp: &logp,
            old_logp: Some(&old),
            ref_logp: Some(&refp),
            mask: &mask,
            advantages: &adv,
            entropy: None,
            num_items_in_batch: None,
        };
        g.bench_function(BenchmarkId::new("loss_and_grad", format!("{label}_b{b}_t{t}")), |bch| {
            bch.iter(|| grpo_loss(black_box(&inp), &cfg).unwrap().loss)
        });
    }
    g.finish();
}

criterion_group!(benches, grpo);
criterion_main!(benches);
