//! `aha`: the command line, thin over the library crates.
//!
//! Commands arrive with the issues that build them (the main job, `demo`,
//! comes with the trainer). Today: `info`, which reports what this machine
//! offers as one JSON line.

mod bench;
mod logprobs;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// DeepSeek-R1 training in one binary: MoE transformer, rollouts, rule-based
/// rewards, GRPO.
#[derive(Parser)]
#[command(name = "aha", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the compute devices and whether NVRTC is available, as one JSON line.
    Info {
        /// Device to resolve: cpu, cuda, cuda:N or auto.
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Score token sequences: writes logits [B,T,V] and token_logprobs [B,T-1] as safetensors.
    Logprobs {
        /// A Hugging Face model folder (config.json, *.safetensors).
        #[arg(long)]
        model: PathBuf,
        /// `input_ids` in a .safetensors file (int64 [B,T]) or a JSON list of token-id lists.
        #[arg(long)]
        input: PathBuf,
        /// Output .safetensors file.
        #[arg(long)]
        out: PathBuf,
        /// cpu, cuda, cuda:N or auto.
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Benchmarks, each printing one JSON line.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Full training steps (forward, backward, AdamW) on random weights.
    Train {
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
    },
}

fn main() -> Result<()> {
    aha_tensor::tune_allocator();
    let cli = Cli::parse();
    match cli.command {
        Command::Info { device } => info(&device),
        Command::Logprobs {
            model,
            input,
            out,
            device,
        } => logprobs::run(&model, &input, &out, device.parse()?),
        Command::Bench {
            what:
                BenchCommand::Train {
                    config,
                    batch,
                    seq,
                    steps,
                    warmup,
                    seed,
                },
        } => {
            let line = bench::train(&bench::TrainBench {
                config: &config,
                batch,
                seq,
                steps,
                warmup,
                seed,
            })?;
            println!("{line}");
            Ok(())
        }
    }
}

fn info(device: &str) -> Result<()> {
    let resolved: aha_tensor::Device = device.parse()?;
    let gpus = aha_cuda_kernels::device_count();
    let gpu_names: Vec<String> = (0..gpus)
        .filter_map(|i| aha_cuda_kernels::Gpu::get(i).ok())
        .map(|g| {
            let (ma, mi) = g.compute_capability();
            format!("{} (sm_{ma}{mi})", g.name())
        })
        .collect();
    let nvrtc = match aha_cuda_kernels::nvrtc::nvrtc() {
        Ok(nv) => serde_json::json!({"found": true, "version": format!("{}.{}", nv.version.0, nv.version.1)}),
        Err(e) => serde_json::json!({"found": false, "error": e.to_string()}),
    };
    let line = serde_json::json!({
        "aha": env!("CARGO_PKG_VERSION"),
        "device": resolved.to_string(),
        "cpu_threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "gpus": gpu_names,
        "no_gpu_reason": aha_cuda_kernels::no_gpu_reason(),
        "nvrtc": nvrtc,
        "kernel_files": aha_cuda_kernels::SOURCES.iter().map(|s| s.file).collect::<Vec<_>>(),
    });
    println!("{line}");
    Ok(())
}
