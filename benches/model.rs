//! One full training step (forward, chunked log-probs, backward, AdamW) on
//! the benchmark configs (tests/fixtures/bench-configs, copied from
//! ../shared/bench-configs), in tokens per second: `cpu/train_step/f32/...`.
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

criterion_group!(benches, train_step);
criterion_main!(benches);
