//! One full training step (forward, chunked log-probs, backward, AdamW) on
//! the benchmark configs (tests/fixtures/bench-configs, copied from
//! ../shared/bench-configs), in tokens per second: `cpu/train_step/f32/...`.
//!
//! Also batched generation (`cpu/generate/...`) and one sampling step over
//! a Qwen-sized vocabulary (`cpu/sample/...`).
//!
//! Peer on this 2-core machine (../shared/bench-configs/README.md, PyTorch +
//! transformers, B=8, T=256): qwen3-moe-bench 2,350-3,100 tokens/s,
//! qwen2-dense-bench ~3,340. Target: >= 2x.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use aha_moe_model::{Model, ModelConfig};
use aha_tensor::cpu::{adamw_step, AdamW};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn train_step(c: &mut Criterion) {
    aha_tensor::tune_allocator();
    let mut g = c.benchmark_group("cpu/train_step/f32");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(6))
        .warm_up_time(Duration::from_secs(1));
    let (b, t) = (8usize, 256usize);
    for name in ["qwen3-moe-bench", "qwen2-dense-bench"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/bench-configs")
            .join(format!("{name}.json"));
        let mut model = Model::random(ModelConfig::from_path(&path).unwrap(), 0, 0.02);
        let v = model.config.vocab_size as u32;
        let ids: Vec<u32> = (0..b * t).map(|i| (i as u32).wrapping_mul(2_654_435_761) % v).collect();
        let mut grads = vec![0f32; model.params.len()];
        let (mut m, mut vv) = (grads.clone(), grads.clone());
        let opt = AdamW::default();
        let mut step = 0u64;
        g.throughput(Throughput::Elements((b * t) as u64));
        g.bench_function(BenchmarkId::new(name, format!("b{b}_t{t}")), |bch| {
            bch.iter(|| {
                grads.fill(0.0);
                let loss = model.next_token_loss(&ids, b, t, &mut grads).unwrap();
                step += 1;
                adamw_step(&mut model.params, &grads, &mut m, &mut vv, &opt, step).unwrap();
                loss
            })
        });
    }
    g.finish();
}

/// Batched generation through the engine (paged cache, continuous
/// batching, T 1.0, top-p 0.95), prompt 32, 64 new tokens:
/// `cpu/generate/qwen3-moe-bench/b{1,16,64}`. Peer: transformers' `generate`
/// at batch 16 on this machine, ~1,050 tokens/s; goal 10x.
fn generate(c: &mut Criterion) {
    use aha_sampler::{Engine, EngineConfig, SamplingParams};
    aha_tensor::tune_allocator();
    let mut g = c.benchmark_group("cpu/generate");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1));
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bench-configs/qwen3-moe-bench.json");
    let mut model = Model::random(ModelConfig::from_path(&path).unwrap(), 0, 0.02);
    model.config.eos_token_ids.clear();
    let v = model.config.vocab_size as u32;
    let new = 64;
    for batch in [1usize, 16, 64] {
        let prompts: Vec<Vec<u32>> = (0..batch)
            .map(|b| {
                (0..32)
                    .map(|i| ((b * 32 + i) as u32).wrapping_mul(2_654_435_761) % v)
                    .collect()
            })
            .collect();
        let engine = Engine::new(
            &model,
            None,
            EngineConfig {
                max_batch: batch,
                ..EngineConfig::default()
            },
            &[],
        )
        .unwrap();
        let params = SamplingParams {
            top_p: 0.95,
            max_new_tokens: new,
            ..SamplingParams::default()
        };
        g.throughput(Throughput::Elements((batch * new) as u64));
        g.bench_function(BenchmarkId::new("qwen3-moe-bench", format!("b{batch}")), |bch| {
            bch.iter(|| engine.generate(&prompts, 1, &params).unwrap().0.len())
        });
    }
    g.finish();
}

/// One token from a 151,936-wide row (Qwen's vocabulary) with top-p 0.95:
/// `cpu/sample/top_p/151936`. Limit: one exponential per logit.
fn sample(c: &mut Criterion) {
    use aha_sampler::{sample, SamplingParams, SeqRng};
    let mut g = c.benchmark_group("cpu/sample");
    g.sample_size(20);
    let v = 151_936usize;
    let logits: Vec<f32> = (0..v)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761) >> 8) as f32 / (1u32 << 24) as f32 * 8.0)
        .collect();
    for (name, p) in [
        (
            "top_p",
            SamplingParams {
                top_p: 0.95,
                ..SamplingParams::default()
            },
        ),
        ("plain", SamplingParams::default()),
    ] {
        let mut rng = SeqRng::for_sequence(0, 0, 0);
        g.throughput(Throughput::Elements(v as u64));
        g.bench_function(BenchmarkId::new(name, v), |bch| {
            bch.iter(|| sample(&logits, &p, &mut rng).unwrap().token)
        });
    }
    g.finish();
}

criterion_group!(benches, train_step, generate, sample);
criterion_main!(benches);
