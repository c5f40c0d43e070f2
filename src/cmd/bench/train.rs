//! `aha bench train`: full training steps (forward, the lm head's log-probs
//! of every next token, backward, clipping, AdamW) on a randomly
//! initialised model, on the CPU or a GPU, reported as one JSON line; with
//! `--offload-optimizer` AdamW runs on the host and the line splits its
//! time (copies, host AdamW, exposed, overlap; the gradient copies
//! streamed during the backward and the wait for them after it, unless
//! `--no-stream-grads`); with `--lora` only LoRA adapters train.

use std::path::PathBuf;
use std::time::Instant;

use aha_moe_model::{LoraConfig, Model, ModelConfig, OffloadConfig, Policy, Precision};
use aha_tensor::cpu::AdamW;
use aha_tensor::profile::{self, Pass};
use aha_tensor::{Device, Tensor};
use anyhow::{Context, Result};

use crate::cmd::options::Placement;

/// The arguments of `aha bench train`.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// A Hugging Face config.json (e.g. ../shared/bench-configs/qwen3-moe-bench.json).
    #[arg(long)]
    config: PathBuf,
    /// Sequences per step.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Seed of the random weights and tokens.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Time each phase of the step (CPU): a table on stderr and a
    /// `profile` field in the JSON line.
    #[arg(long)]
    profile: bool,
    /// AdamW on the host (GPU): master weights and moments in
    /// page-locked host memory; reports the time split of the copies
    /// and the host update.
    #[arg(long)]
    offload_optimizer: bool,
    /// Elements per transfer bucket of --offload-optimizer.
    #[arg(long, default_value_t = 1 << 24, requires = "offload_optimizer")]
    offload_bucket: usize,
    /// With --offload-optimizer, copy the gradients to the host after the
    /// backward instead of layer by layer during it.
    #[arg(long, requires = "offload_optimizer")]
    no_stream_grads: bool,
    /// Train LoRA adapters (PEFT's default targets) instead of every
    /// parameter.
    #[arg(long)]
    lora: bool,
    /// The adapters' rank with --lora.
    #[arg(long, default_value_t = 16, requires = "lora")]
    lora_rank: usize,
    #[command(flatten)]
    place: Placement,
}

/// Dense peak of the device for MFU, FLOP/s: an H100 SXM's bf16 tensor-core
/// (989e12) or f32 (67e12) rate; `None` elsewhere (the CPU's ceiling is
/// measured by `cargo bench --bench cpu_ops`, not assumed).
fn peak_flops(device: Device, precision: Precision) -> Option<f64> {
    let Device::Cuda(i) = device else {
        return None;
    };
    let gpu = aha_cuda_kernels::Gpu::get(i).ok()?;
    if gpu.is_emulated() || !gpu.name().contains("H100") {
        return None;
    }
    Some(match precision {
        Precision::Bf16 => 989e12,
        Precision::F32 => 67e12,
    })
}

/// Runs the benchmark and returns its JSON line.
pub fn train(o: &TrainArgs) -> Result<serde_json::Value> {
    // Offload AdamW with buckets of this many elements; train LoRA adapters of this rank only.
    let offload = o.offload_optimizer.then_some(o.offload_bucket);
    let lora = o.lora.then_some(o.lora_rank);
    anyhow::ensure!(
        o.batch > 0 && o.seq > 1 && o.steps > 0,
        "need --batch >= 1, --seq >= 2, --steps >= 1"
    );
    let cfg = ModelConfig::from_path(&o.config).with_context(|| format!("reading {}", o.config.display()))?;
    let (device, precision) = o.place.resolve(&cfg)?;
    let model_type = format!("{:?}", cfg.arch);
    let model = Model::random(cfg, o.seed, 0.02);
    let flops_per_token = model.forward_flops_per_token(o.seq);
    let v = model.config.vocab_size as u64;
    let model = match lora {
        Some(r) => model.with_lora(
            &LoraConfig {
                r,
                ..LoraConfig::default()
            },
            o.seed,
        )?,
        None => model,
    };
    let trainable = model.layout.trainable;
    let mut policy = Policy::new(model, device, precision)?;
    policy.set_offload_optimizer(offload.map(|bucket_elems| OffloadConfig { bucket_elems }))?;
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
    let (mut rows, mut targets) = (Vec::new(), Vec::new());
    for r in 0..o.batch {
        for i in 0..o.seq - 1 {
            rows.push((r * o.seq + i) as u32);
            targets.push(ids[r * o.seq + i + 1]);
        }
    }
    let count = rows.len();
    let dlogp = Tensor::from_vec(vec![-1.0 / count as f32; count], count, device)?;
    let mut moments = policy.new_moments()?;
    let opt = AdamW {
        lr: 1e-3,
        ..AdamW::default()
    };
    let (mut t_fwd, mut t_bwd, mut t_opt) = (0f64, 0f64, 0f64);
    let mut losses = Vec::new();
    for step in 0..o.warmup + o.steps {
        if o.profile && step == o.warmup {
            profile::take(); // drop the warm-up's counts
            profile::enable(true);
        }
        profile::set_pass(Pass::Forward);
        let t0 = Instant::now();
        policy.zero_grad()?;
        let fwd = policy.forward(&ids, o.batch, o.seq)?;
        let scores = policy.score(&fwd, &rows, &targets, 1.0)?;
        let logp = scores.logp.to_vec::<f32>()?;
        let t1 = Instant::now();
        profile::set_pass(Pass::Backward);
        if o.offload_optimizer && !o.no_stream_grads {
            // Each layer's gradients go to the host as soon as they are
            // complete; the timer stops at the end of the work stream's
            // backward, the copy stream may still be busy.
            policy.backward_offload_streamed(fwd, &scores, &dlogp, None, 0.0, &mut moments)?;
        } else {
            policy.backward(fwd, &scores, &dlogp, None, 0.0)?;
        }
        policy.synchronize()?;
        let t2 = Instant::now();
        profile::set_pass(Pass::Update);
        policy.optimizer_step(&mut moments, &opt, (step + 1) as u64, 1.0)?;
        let t3 = Instant::now();
        if step + 1 == o.warmup {
            moments.take_offload_timing();
        }
        losses.push(-logp.iter().map(|&l| l as f64).sum::<f64>() / count as f64);
        if step >= o.warmup {
            t_fwd += (t1 - t0).as_secs_f64();
            t_bwd += (t2 - t1).as_secs_f64();
            t_opt += (t3 - t2).as_secs_f64();
        }
    }
    profile::enable(false);
    let total = t_fwd + t_bwd + t_opt;
    let phases = o.profile.then(|| profile_report(profile::take(), total, o.steps));
    // Offload: the split of the optimizer step over the timed steps (the
    // warmup's are taken and dropped at its end).
    let offload = moments.take_offload_timing().map(|t| {
        serde_json::json!({
            "bucket_elems": offload,
            "step_ms": t.total_s * 1e3 / t.steps.max(1) as f64,
            "grad_norm_ms": t.norm_s * 1e3 / t.steps.max(1) as f64,
            "copy_ms": t.copy_s * 1e3 / t.steps.max(1) as f64,
            "cpu_adamw_ms": t.adamw_s * 1e3 / t.steps.max(1) as f64,
            "exposed_ms": t.exposed_s * 1e3 / t.steps.max(1) as f64,
            "overlap_fraction": t.overlap_fraction(),
            "streamed_grads": t.streamed_steps > 0,
            "copy_during_backward_ms": t.copy_overlapped_s * 1e3 / t.steps.max(1) as f64,
            "copy_wait_after_backward_ms": t.copy_wait_s * 1e3 / t.steps.max(1) as f64,
            "upload_ms": t.upload_s * 1e3 / t.steps.max(1) as f64,
        })
    });
    let tokens = (n * o.steps) as f64;
    let flops = 3.0 * flops_per_token * tokens;
    let ms = |s: f64| s * 1e3 / o.steps as f64;
    let peak = peak_flops(device, precision);
    Ok(serde_json::json!({
        "bench": "train",
        "config": o.config.display().to_string(),
        "model_type": model_type,
        "device": device.to_string(),
        "precision": precision.to_string(),
        "params": policy.num_params(),
        "trainable_params": trainable,
        "lora_rank": lora,
        "offload": offload,
        "batch": o.batch,
        "seq": o.seq,
        "steps": o.steps,
        "threads": rayon::current_num_threads(),
        "tokens_per_s": tokens / total,
        "gflops": flops / total / 1e9,
        "mfu": peak.map(|p| flops / total / p),
        "step_ms": ms(total),
        "forward_ms": ms(t_fwd),
        "backward_ms": ms(t_bwd),
        "optimizer_ms": ms(t_opt),
        "loss_first": losses.first(),
        "loss_last": losses.last(),
        "profile": phases,
    }))
}

/// Prints the per-phase table to stderr and returns its rows as JSON:
/// per step, each phase's exclusive time, share of the step, flops and
/// achieved GFLOP/s; time in no phase is `other` (allocation, zeroing,
/// thread hand-offs, the driver).
fn profile_report(rows: Vec<profile::Row>, total: f64, steps: usize) -> serde_json::Value {
    let per = |s: f64| s / steps as f64;
    let step = per(total);
    let mut out = Vec::new();
    eprintln!("| phase | pass | ms/step | share | GFLOP/step | GFLOP/s |");
    eprintln!("| --- | --- | ---: | ---: | ---: | ---: |");
    let mut line = |name: &str, pass: &str, secs: f64, flops: f64| {
        let gf = if flops > 0.0 {
            format!("{:.0}", flops / secs / 1e9)
        } else {
            "-".into()
        };
        eprintln!(
            "| {name} | {pass} | {:.1} | {:.1}% | {:.3} | {gf} |",
            secs * 1e3,
            100.0 * secs / step,
            flops / 1e9
        );
        out.push(serde_json::json!({
            "phase": name, "pass": pass, "ms": secs * 1e3, "share": secs / step, "gflop": flops / 1e9,
        }));
    };
    let mut covered = 0.0;
    let mut all_flops = 0.0;
    for r in &rows {
        let (s, f) = (per(r.secs), r.flops as f64 / steps as f64);
        covered += s;
        all_flops += f;
        line(r.phase.name(), r.pass.name(), s, f);
    }
    line("other", "all", (step - covered).max(0.0), 0.0);
    line("step", "all", step, all_flops);
    serde_json::Value::Array(out)
}
