//! `aha`: the command line, thin over the library crates.
//!
//! Each command is a thin layer over a library crate: `demo` and `pipeline`
//! (the R1 pipeline at toy scale), `grpo`, `sft`, `rejection-sample`,
//! `distill`, `eval`, `generate`, `logprobs`, `rewards`, `plan`, `bench`,
//! `launch` (several ranks on one node), `nccl-check` and `info`. Each lives
//! in its own module under `cmd/` with its arguments and its `run`; this
//! file only parses and dispatches.

mod cmd;

use anyhow::Result;
use clap::{Parser, Subcommand};

use cmd::{
    bench, demo, distill, eval, generate, grpo, info, launch, logprobs, merge_lora, nccl_check, pipeline, plan,
    rejection_sample, rewards, sft,
};

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
    /// The main job: R1-Zero at toy scale on the CPU (pretrain a small MoE,
    /// then GRPO with accuracy and format rewards), into a run folder.
    Demo(demo::DemoArgs),
    /// Print the compute devices and whether NVRTC is available, as one JSON
    /// line; with --model, load that folder's weights and describe it too.
    Info(info::InfoArgs),
    /// Score a JSONL file of completions with one reward (a rule, a scorer
    /// process, an HTTP endpoint or a reward model); each line comes back
    /// with `reward` and `status` added.
    Rewards(rewards::RewardsArgs),
    /// Merge a PEFT LoRA adapter into its base model (W += alpha/r B A) and
    /// write a plain Hugging Face folder (each tensor in the base's dtype,
    /// the base's tokenizer and config files copied); prints one JSON line.
    MergeLora(merge_lora::MergeLoraArgs),
    /// Score token sequences: writes logits [B,T,V] and token_logprobs [B,T-1] as safetensors.
    Logprobs(logprobs::LogprobsArgs),
    /// Sample completions: one JSON line per completion (prompt and sample index,
    /// token ids, text, log-probs, finish reason).
    Generate(generate::GenerateArgs),
    /// The whole R1 recipe at toy scale: base, R1-Zero, R1 (cold start, RL,
    /// rejection sampling + SFT) and a distilled dense student, with one table.
    Pipeline(pipeline::PipelineArgs),
    /// GRPO on a Hugging Face model and a JSONL or Parquet math set, from a TOML config
    /// (see crates/trainer/README.md); flags override the file.
    Grpo(grpo::GrpoArgs),
    /// Supervised fine-tuning on JSONL prompt/completion (or messages) pairs,
    /// loss on completion tokens only; saves the result in HF layout.
    Sft(sft::SftArgs),
    /// k samples per problem; keep the correct, well-formatted, same-language,
    /// length-bounded ones as SFT JSONL.
    RejectionSample(rejection_sample::RejectionSampleArgs),
    /// Teacher writes traces, a student learns them by SFT; both evaluated.
    Distill(distill::DistillArgs),
    /// Evaluate on a math set (JSONL or Parquet: GSM8K, MATH-500, AIME, AMC field names or
    /// prompt/answer): pass@1 over k samples, pass@k, cons@k; one JSON line.
    Eval(eval::EvalArgs),
    /// A training run on paper: memory per GPU under data parallel, ZeRO-1,
    /// expert parallel, optimizer offload and LoRA; bytes and seconds of
    /// communication per step; the rollout / training split of a GRPO step.
    Plan(plan::PlanArgs),
    /// Runs N copies of an aha command on this node as the ranks of one
    /// job (data parallel on N GPUs), torchrun's way:
    /// `aha launch --nproc-per-node 8 -- grpo --config run.toml`.
    Launch(launch::LaunchArgs),
    /// Checks every NCCL collective against the CPU on every rank and
    /// times the all-reduce (under `aha launch`, torchrun or srun).
    NcclCheck(nccl_check::NcclCheckArgs),
    /// Benchmarks, each printing one JSON line.
    Bench(bench::BenchArgs),
}

fn main() -> Result<()> {
    aha_tensor::tune_allocator();
    match Cli::parse().command {
        Command::Demo(a) => demo::run(&a),
        Command::Info(a) => info::run(&a),
        Command::Rewards(a) => rewards::run(&a),
        Command::MergeLora(a) => merge_lora::run(&a),
        Command::Logprobs(a) => logprobs::run(&a),
        Command::Generate(a) => generate::run(&a),
        Command::Pipeline(a) => pipeline::run(&a),
        Command::Grpo(a) => grpo::run(&a),
        Command::Sft(a) => sft::run(&a),
        Command::RejectionSample(a) => rejection_sample::run(&a),
        Command::Distill(a) => distill::run(&a),
        Command::Eval(a) => eval::run(&a),
        Command::Plan(a) => plan::run(a),
        Command::Launch(a) => launch::run(a),
        Command::NcclCheck(a) => nccl_check::run(a),
        Command::Bench(a) => bench::run(&a),
    }
}
