//! `aha bench train`: full training steps (forward, backward, AdamW) on a
//! randomly initialised model, reported as one JSON line.

use std::path::Path;
use std::time::Instant;

use aha_moe_model::{Model, ModelConfig};
use aha_tensor::cpu::{adamw_step, AdamW};
use anyhow::{Context, Result};

/// Options of one training benchmark.
pub struct TrainBench<'a> {
    pub config: &'a Path,
    pub batch: usize,
    pub seq: usize,
    pub steps: usize,
    pub warmup: usize,
    pub seed: u64,
}

/// Runs the benchmark and returns its JSON line.
pub fn train(o: &TrainBench<'_>) -> Result<serde_json::Value> {
    anyhow::ensure!(
        o.batch > 0 && o.seq > 1 && o.steps > 0,
        "need --batch >= 1, --seq >= 2, --steps >= 1"
    );
    let cfg = ModelConfig::from_path(o.config).with_context(|| format!("reading {}", o.config.display()))?;
    let model_type = format!("{:?}", cfg.arch);
    let mut model = Model::random(cfg, o.seed, 0.02);
    let v = model.config.vocab_size as u64;
    let n = o.batch * o.seq;
    let mut state = o.seed ^ 0x5eed;
    let ids: Vec<u32> = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % v) as u32
        })
        .collect();
    let mut targets = vec![0u32; n];
    let mut dlogp = vec![0f32; n];
    let count = (o.batch * (o.seq - 1)) as f32;
    for r in 0..o.batch {
        for i in 0..o.seq - 1 {
            targets[r * o.seq + i] = ids[r * o.seq + i + 1];
            dlogp[r * o.seq + i] = -1.0 / count;
        }
    }
    let p = model.params.len();
    let (mut grads, mut m, mut vv) = (vec![0f32; p], vec![0f32; p], vec![0f32; p]);
    let opt = AdamW {
        lr: 1e-3,
        ..AdamW::default()
    };
    let (mut t_fwd, mut t_bwd, mut t_opt) = (0f64, 0f64, 0f64);
    let mut losses = Vec::new();
    for step in 0..o.warmup + o.steps {
        let t0 = Instant::now();
        grads.fill(0.0);
        let acts = model.forward(&ids, o.batch, o.seq)?;
        let (logp, lse) = model.token_logprobs(&acts, &targets)?;
        let t1 = Instant::now();
        model.backward(&acts, &targets, &lse, &dlogp, &mut grads)?;
        drop(acts);
        let t2 = Instant::now();
        adamw_step(&mut model.params, &grads, &mut m, &mut vv, &opt, (step + 1) as u64)?;
        let t3 = Instant::now();
        let loss: f64 = logp.iter().zip(&dlogp).map(|(&l, &d)| (l * d) as f64).sum();
        losses.push(loss);
        if step >= o.warmup {
            t_fwd += (t1 - t0).as_secs_f64();
            t_bwd += (t2 - t1).as_secs_f64();
            t_opt += (t3 - t2).as_secs_f64();
        }
    }
    let total = t_fwd + t_bwd + t_opt;
    let tokens = (n * o.steps) as f64;
    let flops = 3.0 * model.forward_flops_per_token(o.seq) * tokens;
    let ms = |s: f64| s * 1e3 / o.steps as f64;
    Ok(serde_json::json!({
        "bench": "train",
        "config": o.config.display().to_string(),
        "model_type": model_type,
        "params": p,
        "batch": o.batch,
        "seq": o.seq,
        "steps": o.steps,
        "threads": rayon::current_num_threads(),
        "tokens_per_s": tokens / total,
        "gflops": flops / total / 1e9,
        "step_ms": ms(total),
        "forward_ms": ms(t_fwd),
        "backward_ms": ms(t_bwd),
        "optimizer_ms": ms(t_opt),
        "loss_first": losses.first(),
        "loss_last": losses.last(),
    }))
}
