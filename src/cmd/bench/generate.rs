//! `aha bench generate`: batched sampling on random weights, tokens per
//! second, on the CPU engine or the GPU engine.

use std::path::PathBuf;

use aha_moe_model::{Model, ModelConfig, Policy, Precision};
use aha_sampler::{EngineConfig, Sampler, SamplingParams};
use anyhow::{Context, Result};

use crate::cmd::options::Placement;

/// The arguments of `aha bench generate`.
#[derive(clap::Args, Debug)]
#[command(
    // A benchmark runs where it is told: the CPU unless a GPU is named.
    mut_arg("device", |a| a
        .default_value("cpu")
        .help("cpu (the CPU engine), cuda or cuda:N (the GPU engine), or auto")),
    mut_arg("precision", |a| a.help("f32 or bf16 (bf16 products with f32 sums)")),
)]
pub struct GenerateArgs {
    /// A Hugging Face config.json.
    #[arg(long)]
    config: PathBuf,
    /// Prompts (all decoded together).
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Prompt tokens.
    #[arg(long, default_value_t = 32)]
    prompt: usize,
    /// New tokens per prompt.
    #[arg(long, default_value_t = 64)]
    new: usize,
    /// Seed of weights, prompts and sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// GPU engine: run every step eagerly instead of replaying decode
    /// steps as CUDA graphs (to measure what the graphs save).
    #[arg(long)]
    no_cuda_graphs: bool,
    #[command(flatten)]
    place: Placement,
}

/// `aha bench generate`: random weights, `batch` prompts of `prompt` random
/// tokens, `new` sampled tokens each (T 1.0, top-p 0.95), on the CPU engine
/// or the GPU engine, one JSON line.
pub fn bench(b: &GenerateArgs) -> Result<serde_json::Value> {
    let (config, batch, prompt, new, seed) = (&b.config, b.batch, b.prompt, b.new, b.seed);
    anyhow::ensure!(
        batch > 0 && prompt > 0 && new > 0,
        "need --batch, --prompt and --new >= 1"
    );
    let cfg = ModelConfig::from_path(config).with_context(|| format!("reading {}", config.display()))?;
    let mut model = Model::random(cfg, seed, 0.02);
    model.config.eos_token_ids.clear(); // every sequence generates `new` tokens, like the peer's run
    let v = model.config.vocab_size as u64;
    let mut state = seed ^ 0xbe7c;
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|_| {
            (0..prompt)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((state >> 33) % v) as u32
                })
                .collect()
        })
        .collect();
    let (device, precision) = b.place.resolve(&model.config)?;
    let policy = Policy::new(model, device, precision)?;
    let engine = Sampler::new(
        &policy,
        None,
        EngineConfig {
            max_batch: batch.max(1),
            cuda_graphs: !b.no_cuda_graphs,
            ..EngineConfig::default()
        },
        &[],
    )?;
    let params = SamplingParams {
        temperature: 1.0,
        top_p: 0.95,
        max_new_tokens: new,
        seed,
        ..SamplingParams::default()
    };
    // Warm up once (allocator, thread pool), then time.
    engine.generate(
        &prompts[..1],
        1,
        &SamplingParams {
            max_new_tokens: 2,
            ..params.clone()
        },
    )?;
    let (out, s) = engine.generate(&prompts, 1, &params)?;
    let generated: usize = out.iter().map(|c| c.token_ids.len()).sum();
    let tokens_per_s = generated as f64 / s.total_s;
    // The memory-bandwidth bound of a decode step: every weight read once
    // (bf16 weights on a GPU in bf16; the CPU keeps f32 weights whatever
    // its products' precision) plus each sequence's keys and values at
    // the mean context (prompt + half the new tokens), over the GPU's
    // bandwidth; `bound_fraction` is the measured rate over it (prefill and
    // sampling included, so a lower bound of the decode steps' fraction).
    let params_n = aha_moe_model::Layout::new(policy.config()).size as f64;
    let gpu_bf16 = precision == Precision::Bf16 && device != aha_tensor::Device::Cpu;
    let wbytes = params_n * if gpu_bf16 { 2.0 } else { 4.0 };
    // bf16 keys and values on the GPU (the engine's default), f32 on the CPU.
    let kv_bf16 = aha_moe_model::plan::kv_bytes_per_token(policy.config()) as f64;
    let kv = kv_bf16 * if device == aha_tensor::Device::Cpu { 2.0 } else { 1.0 };
    let step_bytes = wbytes + batch as f64 * (prompt as f64 + new as f64 / 2.0) * kv;
    let bandwidth = hbm_bandwidth(device);
    let bound = bandwidth.map(|bw| batch as f64 * bw / step_bytes);
    Ok(serde_json::json!({
        "bench": "generate",
        "config": config.display().to_string(),
        "device": device.to_string(),
        "precision": precision.to_string(),
        "batch": batch,
        "prompt": prompt,
        "new": new,
        "threads": rayon::current_num_threads(),
        "tokens_per_s": tokens_per_s,
        "decode_step_bytes": step_bytes,
        "hbm_bytes_per_s": bandwidth,
        "bound_tokens_per_s": bound,
        "bound_fraction": bound.map(|b| tokens_per_s / b),
        "total_s": s.total_s,
        "forward_s": s.forward_s,
        "sample_s": s.sample_s,
        "bookkeeping_s": s.total_s - s.forward_s - s.sample_s,
        "steps": s.steps,
        "peak_kv_blocks": s.peak_blocks,
        "cuda_graphs": !b.no_cuda_graphs && device != aha_tensor::Device::Cpu,
        "graph_steps": s.graph_steps,
        "graphs_captured": s.graphs_captured,
    }))
}

/// The memory bandwidth of a known GPU from its name (the data sheets' SXM
/// numbers: H100 3.35 TB/s, H200 4.8 TB/s, A100 2.04 TB/s), else `None`.
fn hbm_bandwidth(device: aha_tensor::Device) -> Option<f64> {
    let aha_tensor::Device::Cuda(i) = device else {
        return None;
    };
    let name = aha_cuda_kernels::Gpu::get(i).ok()?.name().to_ascii_uppercase();
    ["H100", "H200", "A100"]
        .iter()
        .find(|g| name.contains(*g))
        .and_then(|g| aha_moe_model::plan::gpu_spec(g).ok())
        .map(|g| g.hbm_bandwidth)
}
