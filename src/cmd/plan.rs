//! `aha plan`: a training run on paper (see `aha_moe_model::plan` and
//! docs/scale-out.md).

use std::path::PathBuf;

use aha_moe_model::plan::{self, Interconnect, StepShape};
use aha_moe_model::ModelConfig;
use anyhow::Result;

/// The arguments of `aha plan`.
#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// A model's config.json, or the folder holding it.
    #[arg(long)]
    config: PathBuf,
    /// GPUs in the job.
    #[arg(long, default_value_t = 8)]
    gpus: usize,
    /// The GPU: h100, h200 or a100.
    #[arg(long, default_value = "h100")]
    gpu: String,
    /// What the collectives run over: nvlink (one node) or ib (between nodes).
    #[arg(long, default_value = "nvlink")]
    interconnect: String,
    /// Completions per GRPO step over all GPUs (prompts x group size).
    #[arg(long, default_value_t = 512)]
    completions: usize,
    /// Prompt tokens of each completion.
    #[arg(long, default_value_t = 512)]
    prompt_len: usize,
    /// New tokens of each completion.
    #[arg(long, default_value_t = 4096)]
    completion_len: usize,
    /// Tokens of one training micro-batch (activations, with per-layer recomputation).
    #[arg(long, default_value_t = 8192)]
    micro_batch_tokens: usize,
    /// The LoRA row's rank (0: no LoRA row).
    #[arg(long, default_value_t = 16)]
    lora_rank: usize,
    /// One JSON line per strategy instead of the table.
    #[arg(long)]
    json: bool,
}

fn gb(b: u64) -> f64 {
    b as f64 / 1e9
}

/// Prints the plan.
pub fn run(a: PlanArgs) -> Result<()> {
    let path = if a.config.is_dir() {
        a.config.join("config.json")
    } else {
        a.config.clone()
    };
    let cfg = ModelConfig::from_path(&path)?;
    let gpu = plan::gpu_spec(&a.gpu)?;
    let link = Interconnect::parse(&a.interconnect)?;
    let step = StepShape {
        completions: a.completions,
        prompt_len: a.prompt_len,
        completion_len: a.completion_len,
        micro_batch_tokens: a.micro_batch_tokens,
    };
    let counts = plan::param_counts(&cfg);
    let rows = plan::plan(&cfg, gpu, a.gpus, link, &step, a.lora_rank)?;
    if a.json {
        for r in &rows {
            let d = &r.device;
            println!(
                "{}",
                serde_json::json!({
                    "strategy": r.strategy.name(),
                    "gpus": a.gpus,
                    "gpu": gpu.name,
                    "params": counts.total,
                    "active_params": counts.active,
                    "device_gb": gb(d.total()),
                    "rollout_kv_gb": gb(r.rollout_kv),
                    "peak_gb": gb(r.peak),
                    "weights_gb": gb(d.weights),
                    "weights_bf16_gb": gb(d.weights_bf16),
                    "grads_gb": gb(d.grads),
                    "moments_gb": gb(d.moments),
                    "activations_gb": gb(d.activations),
                    "workspace_gb": gb(d.workspace),
                    "host_gb": gb(r.host),
                    "fits": r.fits,
                    "comm_gb": r.comm_bytes / 1e9,
                    "comm_s": r.comm_seconds,
                    "rollout_s": r.rollout_seconds,
                    "train_s": r.train_seconds,
                })
            );
        }
        return Ok(());
    }
    println!(
        "{}: {:.2}B parameters ({:.2}B active a token, {:.2}B in routed experts); {} x {} ({:.0} GB), {}",
        path.display(),
        counts.total as f64 / 1e9,
        counts.active as f64 / 1e9,
        counts.routed_experts as f64 / 1e9,
        a.gpus,
        gpu.name,
        gb(gpu.memory),
        a.interconnect
    );
    println!(
        "step: {} completions of {} + {} tokens, micro-batches of {} tokens with per-layer recomputation, bf16 products",
        a.completions, a.prompt_len, a.completion_len, a.micro_batch_tokens
    );
    println!(
        "{:<12} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>5} {:>9} {:>8} {:>10} {:>8}",
        "strategy",
        "peak GB",
        "f32 w",
        "bf16 w",
        "grads",
        "AdamW",
        "activ",
        "KV",
        "host",
        "fits",
        "comm GB",
        "comm s",
        "rollout s",
        "train s"
    );
    for r in &rows {
        let d = &r.device;
        println!(
            "{:<12} {:>9.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>5} {:>9.1} {:>8.2} {:>10.1} {:>8.1}",
            r.strategy.name(),
            gb(r.peak),
            gb(d.weights),
            gb(d.weights_bf16),
            gb(d.grads),
            gb(d.moments),
            gb(d.activations),
            gb(r.rollout_kv),
            gb(r.host),
            if r.fits { "yes" } else { "NO" },
            r.comm_bytes / 1e9,
            r.comm_seconds,
            r.rollout_seconds,
            r.train_seconds
        );
    }
    println!(
        "peak: weights and optimizer state plus the larger of the training activations and the rollouts' bf16 KV cache\ntimes: lower bounds at {:.0}% of the link, {:.0}% MFU for products, {:.0}% of HBM bandwidth for decoding (docs/scale-out.md)",
        plan::LINK_EFFICIENCY * 100.0,
        plan::TRAIN_MFU * 100.0,
        plan::DECODE_BANDWIDTH_EFFICIENCY * 100.0
    );
    Ok(())
}
