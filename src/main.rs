//! `aha`: the command line, thin over the library crates.
//!
//! Each command is a thin layer over a library crate: `demo` and `pipeline`
//! (the R1 pipeline at toy scale), `grpo`, `sft`, `rejection-sample`,
//! `distill`, `eval`, `generate`, `logprobs`, `rewards`, `plan`, `bench`,
//! `launch` (several ranks on one node), `nccl-check` and `info`.

mod bench;
mod eval_cmd;
mod generate;
mod launch_cmd;
mod logprobs;
mod plan_cmd;
mod rewards_cmd;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

/// DeepSeek-R1 training in one binary: MoE transformer, rollouts, rule-based
/// rewards, GRPO.
#[derive(Parser)]
#[command(name = "aha", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where a command computes: `--device` and `--precision`, resolved once
/// per run by `aha_moe_model::resolve_device`.
#[derive(clap::Args, Clone)]
struct Placement {
    /// cpu, cuda, cuda:N or auto (the GPU when one is present and takes the model).
    #[arg(long, default_value = "auto")]
    device: String,
    /// f32, or bf16 on a GPU (bf16 products; f32 master weights, moments and reductions).
    #[arg(long, default_value = "f32")]
    precision: String,
}

impl Placement {
    fn resolve(&self, cfg: &aha_moe_model::ModelConfig) -> Result<(aha_tensor::Device, aha_moe_model::Precision)> {
        let precision: aha_moe_model::Precision = self.precision.parse()?;
        Ok((aha_moe_model::resolve_device(&self.device, cfg, precision)?, precision))
    }
}

/// `--device` / `--precision` that override a TOML config's keys.
#[derive(clap::Args, Clone)]
struct PlacementOverride {
    /// cpu, cuda, cuda:N or auto [default: the config's, else auto].
    #[arg(long)]
    device: Option<String>,
    /// f32 or bf16 [default: the config's, else f32].
    #[arg(long)]
    precision: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// The main job: R1-Zero at toy scale on the CPU (pretrain a small MoE,
    /// then GRPO with accuracy and format rewards), into a run folder.
    Demo {
        /// A shorter run (under three minutes on 2 cores).
        #[arg(long)]
        quick: bool,
        /// Run folder (default: runs/demo-<seed>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Seed of everything.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// A JSON file with the whole demo config (see runs/*/config.json); overrides --quick.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Continue from the run folder's latest checkpoint.
        #[arg(long)]
        resume: bool,
        /// Save a checkpoint every N steps of each phase (0: only the final one).
        #[arg(long, default_value_t = 0)]
        save_every: usize,
        /// Toy task: addition, multiplication or countdown.
        #[arg(long, default_value = "addition")]
        task: aha_trainer::toy::Task,
        /// Operand width of addition and multiplication (1-4).
        #[arg(long, default_value_t = 2)]
        digits: usize,
        #[command(flatten)]
        place: Placement,
    },
    /// Print the compute devices and whether NVRTC is available, as one JSON
    /// line; with --model, load that folder's weights and describe it too.
    Info {
        /// Device to resolve: cpu, cuda, cuda:N or auto.
        #[arg(long, default_value = "auto")]
        device: String,
        /// A Hugging Face model folder to load (into host memory, f32).
        #[arg(long)]
        model: Option<PathBuf>,
    },
    /// Score a JSONL file of completions with one reward (a rule, a scorer
    /// process, an HTTP endpoint or a reward model); each line comes back
    /// with `reward` and `status` added.
    Rewards(rewards_cmd::RewardsArgs),
    /// Merge a PEFT LoRA adapter into its base model (W += alpha/r B A) and
    /// write a plain Hugging Face folder (each tensor in the base's dtype,
    /// the base's tokenizer and config files copied); prints one JSON line.
    MergeLora {
        /// The base model folder.
        #[arg(long)]
        model: PathBuf,
        /// The adapter folder (adapter_config.json, adapter_model.safetensors).
        #[arg(long)]
        adapter: PathBuf,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
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
        /// On the GPU: f32 (matches the CPU to 1e-4) or bf16 (bf16 weight
        /// products, flash attention and lm head; within ~0.1 nats).
        #[arg(long, default_value = "f32")]
        precision: String,
    },
    /// Sample completions: one JSON line per completion (prompt and sample index,
    /// token ids, text, log-probs, finish reason).
    Generate {
        /// A Hugging Face model folder.
        #[arg(long)]
        model: PathBuf,
        /// JSONL or Parquet prompts (`prompt`, `question` or `problem` field; with
        /// `--template chat`, a `messages` array is used when a line has one).
        #[arg(long)]
        prompts: Option<PathBuf>,
        /// Prompts as a JSON list of token-id lists.
        #[arg(long)]
        prompt_ids: Option<String>,
        /// How text prompts are wrapped: none, r1-zero (the R1-Zero plain
        /// template) or chat (the model folder's chat template, with the
        /// generation prompt).
        #[arg(long, default_value = "none")]
        template: String,
        /// Completions per prompt.
        #[arg(long, default_value_t = 1)]
        n: usize,
        /// Maximum new tokens per completion.
        #[arg(long, default_value_t = 256)]
        max_new_tokens: usize,
        /// Sampling temperature.
        #[arg(long, default_value_t = 1.0)]
        temperature: f32,
        /// Nucleus sampling mass.
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// Keep the k most likely tokens (0: off).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// Drop tokens below min_p times the top probability.
        #[arg(long, default_value_t = 0.0)]
        min_p: f32,
        /// Base seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Argmax decoding.
        #[arg(long)]
        greedy: bool,
        /// cpu, cuda, cuda:N or auto.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Cached keys and values on a GPU: bf16 or f32 (exact, slower).
        #[arg(long, default_value = "bf16")]
        kv_dtype: String,
        /// Output JSONL (stdout when absent).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The whole R1 recipe at toy scale: base, R1-Zero, R1 (cold start, RL,
    /// rejection sampling + SFT) and a distilled dense student, with one table.
    Pipeline {
        /// A shorter run.
        #[arg(long)]
        quick: bool,
        /// Run folder (default: runs/pipeline-<seed>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Seed of everything.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Toy task: addition or multiplication (numeric answers).
        #[arg(long, default_value = "addition")]
        task: aha_trainer::toy::Task,
        /// Operand width (1-4).
        #[arg(long, default_value_t = 2)]
        digits: usize,
        /// Saved models' dtype: same (f32, as trained), f32, bf16 or f16.
        #[arg(long, default_value = "same")]
        save_dtype: aha_moe_model::SaveDtype,
        /// Continue from the run folder's latest checkpoint, in the stage and at the step it was taken.
        #[arg(long)]
        resume: bool,
        /// Save a checkpoint every N steps of each stage and at each stage's start (0: none).
        #[arg(long, default_value_t = 0)]
        save_every: usize,
        #[command(flatten)]
        place: Placement,
    },
    /// GRPO on a Hugging Face model and a JSONL or Parquet math set, from a TOML config
    /// (see crates/trainer/README.md); flags override the file.
    Grpo {
        /// The TOML config (unknown keys are errors).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Policy model folder.
        #[arg(long)]
        model: Option<PathBuf>,
        /// JSONL or Parquet prompts with answers.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Run folder.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Optimizer steps.
        #[arg(long)]
        steps: Option<usize>,
        /// Completions per prompt.
        #[arg(long)]
        num_generations: Option<usize>,
        /// Prompts per step.
        #[arg(long)]
        prompts_per_step: Option<usize>,
        /// Learning rate.
        #[arg(long)]
        learning_rate: Option<f64>,
        /// Completion length limit.
        #[arg(long)]
        max_completion_length: Option<usize>,
        /// none, r1-zero or chat.
        #[arg(long)]
        template: Option<String>,
        /// Save every N steps.
        #[arg(long)]
        save_every: Option<usize>,
        /// Seed.
        #[arg(long)]
        seed: Option<u64>,
        /// DAPO dynamic sampling.
        #[arg(long)]
        dynamic_sampling: bool,
        /// Continue from the run folder's latest checkpoint.
        #[arg(long)]
        resume: bool,
        /// Saved model's dtype: same (as the input folder), f32, bf16 or f16.
        #[arg(long)]
        save_dtype: Option<aha_moe_model::SaveDtype>,
        #[command(flatten)]
        place: PlacementOverride,
    },
    /// Supervised fine-tuning on JSONL prompt/completion (or messages) pairs,
    /// loss on completion tokens only; saves the result in HF layout.
    Sft {
        /// TOML config (keys as the flags, `learning_rate` for --lr; unknown keys are errors).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Model folder (config.json alone: start from random weights).
        #[arg(long)]
        model: Option<PathBuf>,
        /// JSONL or Parquet with `prompt` + `completion`, or `messages`.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Output folder.
        #[arg(long)]
        out: Option<PathBuf>,
        /// none, r1-zero or chat [default: chat].
        #[arg(long)]
        template: Option<String>,
        /// Optimizer steps [default: 100].
        #[arg(long)]
        steps: Option<usize>,
        /// Sequences per step [default: 16].
        #[arg(long)]
        batch: Option<usize>,
        /// Peak learning rate, cosine schedule [default: 1e-5].
        #[arg(long)]
        lr: Option<f64>,
        /// Seed [default: 0].
        #[arg(long)]
        seed: Option<u64>,
        /// Saved model's dtype: same (as the input folder), f32, bf16 or f16.
        #[arg(long)]
        save_dtype: Option<aha_moe_model::SaveDtype>,
        /// Save a checkpoint every N steps [default: 0, none].
        #[arg(long)]
        save_every: Option<usize>,
        /// Sample completions into samples.jsonl every N steps [default: 0, after the last step only].
        #[arg(long)]
        sample_every: Option<usize>,
        /// Continue from the output folder's latest checkpoint (the same config is required).
        #[arg(long)]
        resume: bool,
        #[command(flatten)]
        place: PlacementOverride,
    },
    /// k samples per problem; keep the correct, well-formatted, same-language,
    /// length-bounded ones as SFT JSONL.
    RejectionSample {
        /// Model folder.
        #[arg(long)]
        model: PathBuf,
        /// JSONL or Parquet problems with answers.
        #[arg(long)]
        data: PathBuf,
        /// Output JSONL (prompt, completion, answer).
        #[arg(long)]
        out: PathBuf,
        /// none, r1-zero or chat.
        #[arg(long, default_value = "r1-zero")]
        template: String,
        /// Samples per problem.
        #[arg(long, default_value_t = 4)]
        k: usize,
        /// Completion length limit in tokens.
        #[arg(long, default_value_t = 1024)]
        max_new_tokens: usize,
        /// Reasoning language to require (en, zh, ...).
        #[arg(long)]
        language: Option<String>,
        /// Seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Where the model samples (the GPU engine on a GPU).
        #[command(flatten)]
        place: Placement,
    },
    /// Teacher writes traces, a student learns them by SFT; both evaluated.
    Distill {
        /// Teacher model folder.
        #[arg(long)]
        teacher: PathBuf,
        /// Student folder (config.json + tokenizer; weights optional).
        #[arg(long)]
        student: PathBuf,
        /// Problems for the teacher's traces.
        #[arg(long)]
        train: PathBuf,
        /// Held-out problems.
        #[arg(long)]
        test: PathBuf,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// none, r1-zero or chat.
        #[arg(long, default_value = "r1-zero")]
        template: String,
        /// Traces per problem.
        #[arg(long, default_value_t = 2)]
        k: usize,
        /// Completion length limit.
        #[arg(long, default_value_t = 1024)]
        max_new_tokens: usize,
        /// Student SFT steps.
        #[arg(long, default_value_t = 500)]
        steps: usize,
        /// Student learning rate.
        #[arg(long, default_value_t = 1e-3)]
        lr: f64,
        /// Seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Saved student's dtype: same (as the input folder), f32, bf16 or f16.
        #[arg(long, default_value = "same")]
        save_dtype: aha_moe_model::SaveDtype,
        /// Save a checkpoint every N steps of the student's SFT (0: none).
        #[arg(long, default_value_t = 0)]
        save_every: usize,
        /// Sample the student into samples.jsonl every N steps (0: after the last step only).
        #[arg(long, default_value_t = 0)]
        sample_every: usize,
        /// Continue from the output folder's latest checkpoint (the same settings are required).
        #[arg(long)]
        resume: bool,
        /// Where the teacher samples and the student trains.
        #[command(flatten)]
        place: Placement,
    },
    /// Evaluate on a math set (JSONL or Parquet: GSM8K, MATH-500, AIME, AMC field names or
    /// prompt/answer): pass@1 over k samples, pass@k, cons@k; one JSON line.
    Eval {
        /// A Hugging Face model folder with tokenizer.json.
        #[arg(long)]
        model: PathBuf,
        /// The JSONL or Parquet set.
        #[arg(long)]
        data: PathBuf,
        /// Samples per problem (pass@1 is their mean; the R1 report uses 4 to 64).
        #[arg(long, default_value_t = 4)]
        k: usize,
        /// Only the first N problems.
        #[arg(long)]
        limit: Option<usize>,
        /// none, r1-zero or chat.
        #[arg(long, default_value = "chat")]
        template: String,
        /// Sampling temperature (the R1 report: 0.6).
        #[arg(long, default_value_t = 0.6)]
        temperature: f32,
        /// Nucleus mass (the R1 report: 0.95).
        #[arg(long, default_value_t = 0.95)]
        top_p: f32,
        /// Completion length limit.
        #[arg(long, default_value_t = 1024)]
        max_new_tokens: usize,
        /// Base seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Per-problem results as JSONL.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Where the model samples (the GPU engine on a GPU).
        #[command(flatten)]
        place: Placement,
    },
    /// A training run on paper: memory per GPU under data parallel, ZeRO-1,
    /// expert parallel, optimizer offload and LoRA; bytes and seconds of
    /// communication per step; the rollout / training split of a GRPO step.
    Plan(plan_cmd::PlanArgs),
    /// Runs N copies of an aha command on this node as the ranks of one
    /// job (data parallel on N GPUs), torchrun's way:
    /// `aha launch --nproc-per-node 8 -- grpo --config run.toml`.
    Launch(launch_cmd::LaunchArgs),
    /// Checks every NCCL collective against the CPU on every rank and
    /// times the all-reduce (under `aha launch`, torchrun or srun).
    NcclCheck(launch_cmd::NcclCheckArgs),
    /// Benchmarks, each printing one JSON line.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Batched sampling on random weights: tokens per second.
    Generate {
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
        /// cpu (the CPU engine), cuda or cuda:N (the GPU engine), or auto.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// f32, or bf16 on a GPU.
        #[arg(long, default_value = "f32")]
        precision: String,
    },
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
        #[arg(long, default_value_t = 1 << 24)]
        offload_bucket: usize,
        /// Train LoRA adapters (PEFT's default targets) instead of every
        /// parameter.
        #[arg(long)]
        lora: bool,
        /// The adapters' rank with --lora.
        #[arg(long, default_value_t = 16)]
        lora_rank: usize,
        #[command(flatten)]
        place: Placement,
    },
}

/// Log lines of long runs: on a terminal, step lines (`pretrain ...`,
/// `grpo ...`, `step ...`) overwrite each other as a live status line and
/// other lines scroll above it; elsewhere (files, CI) every line is printed.
struct Progress {
    tty: bool,
    live: bool,
}

impl Progress {
    fn new() -> Progress {
        use std::io::IsTerminal;
        Progress {
            tty: std::io::stderr().is_terminal(),
            live: false,
        }
    }

    fn line(&mut self, l: &str) {
        let step = ["pretrain ", "grpo ", "step "].iter().any(|p| l.starts_with(p));
        if self.tty && step {
            eprint!("\r{l}\x1b[K");
            self.live = true;
        } else {
            if self.live {
                eprintln!();
                self.live = false;
            }
            eprintln!("{l}");
        }
    }

    /// Ends a live status line, if one is showing.
    fn finish(&mut self) {
        if self.live {
            eprintln!();
            self.live = false;
        }
    }
}

fn main() -> Result<()> {
    aha_tensor::tune_allocator();
    let cli = Cli::parse();
    match cli.command {
        Command::Info { device, model } => info(&device, model.as_deref()),
        Command::Plan(a) => plan_cmd::run(a),
        Command::Launch(a) => launch_cmd::run(a),
        Command::NcclCheck(a) => launch_cmd::nccl_check(a),
        Command::Demo {
            quick,
            out,
            seed,
            config,
            resume,
            save_every,
            task,
            digits,
            place,
        } => {
            let spec = aha_trainer::toy::TaskSpec { task, digits };
            let cfg = match config {
                Some(path) => {
                    let text = read_text(&path)?;
                    serde_json::from_str(&text).with_context(|| format!("{}: not a demo config", path.display()))?
                }
                None if quick => aha_trainer::DemoConfig::quick(seed).with_task(spec)?,
                None => aha_trainer::DemoConfig::full(seed).with_task(spec)?,
            };
            let out = out.unwrap_or_else(|| PathBuf::from(format!("runs/demo-{seed}")));
            let what = match cfg.task {
                aha_trainer::toy::Task::Countdown => "countdown".to_string(),
                t => format!("{}-digit {}", cfg.digits, t.name()),
            };
            eprintln!("aha demo: R1-Zero on {what}; run folder {}", out.display());
            let mcfg = aha_moe_model::ModelConfig::from_json_str(
                &cfg.model_config_json().to_string(),
                std::path::Path::new("<demo model config>"),
            )?;
            let (device, precision) = place.resolve(&mcfg)?;
            let opts = aha_trainer::RunOptions {
                resume,
                save_every,
                device,
                precision,
            };
            let mut p = Progress::new();
            let s = aha_trainer::run_demo_with(&cfg, &out, opts, &mut |line| p.line(line))?;
            p.finish();
            eprintln!(
                "held-out accuracy {:.1}% -> {:.1}%, format {:.1}% -> {:.1}%, length {:.1} -> {:.1} tokens, {:.0} s",
                s.base_accuracy * 100.0,
                s.final_accuracy * 100.0,
                s.base_format * 100.0,
                s.final_format * 100.0,
                s.base_length,
                s.final_length,
                s.wall_s
            );
            println!("{}", serde_json::to_string(&s)?);
            Ok(())
        }
        Command::Rewards(args) => rewards_cmd::run(&args),
        Command::MergeLora { model, adapter, out } => {
            let adapted = aha_moe_model::Model::load(&model)?.load_adapter(&adapter)?;
            let cfg = adapted.layout.lora.clone();
            let merged = adapted.merge_lora()?;
            merged.save(&out, 4 << 30)?;
            let line = serde_json::json!({
                "out": out.display().to_string(),
                "adapted_linears": adapted.layout.entries.iter().filter(|e| aha_moe_model::lora::is_adapter(e)).count() / 2,
                "r": cfg.as_ref().map(|c| c.r),
                "scale": cfg.as_ref().map(|c| c.scale()),
            });
            println!("{line}");
            Ok(())
        }
        Command::Logprobs {
            model,
            input,
            out,
            device,
            precision,
        } => logprobs::run(&model, &input, &out, &device, &precision),
        Command::Grpo {
            config,
            model,
            data,
            out,
            steps,
            num_generations,
            prompts_per_step,
            learning_rate,
            max_completion_length,
            template,
            save_every,
            seed,
            dynamic_sampling,
            resume,
            save_dtype,
            place,
        } => {
            let mut cfg = match &config {
                Some(p) => {
                    let text = read_text(p)?;
                    aha_trainer::grpo_run::GrpoConfig::from_toml(&text, p)?
                }
                None => aha_trainer::grpo_run::GrpoConfig::default(),
            };
            cfg.model = model.unwrap_or(cfg.model);
            cfg.data = data.unwrap_or(cfg.data);
            cfg.out = out.unwrap_or(cfg.out);
            cfg.steps = steps.unwrap_or(cfg.steps);
            cfg.num_generations = num_generations.unwrap_or(cfg.num_generations);
            cfg.prompts_per_step = prompts_per_step.unwrap_or(cfg.prompts_per_step);
            cfg.learning_rate = learning_rate.unwrap_or(cfg.learning_rate);
            cfg.max_completion_length = max_completion_length.unwrap_or(cfg.max_completion_length);
            cfg.template = template.unwrap_or(cfg.template);
            cfg.save_every = save_every.unwrap_or(cfg.save_every);
            cfg.seed = seed.unwrap_or(cfg.seed);
            cfg.dynamic_sampling |= dynamic_sampling;
            cfg.save_dtype = save_dtype.unwrap_or(cfg.save_dtype);
            cfg.device = place.device.unwrap_or(cfg.device);
            cfg.precision = place.precision.unwrap_or(cfg.precision);
            let mut p = Progress::new();
            let m = aha_trainer::grpo_run::run_grpo(&cfg, resume, &mut |l| p.line(l))?;
            p.finish();
            println!("{}", serde_json::to_string(&m)?);
            Ok(())
        }
        Command::Sft {
            config,
            model,
            data,
            out,
            template,
            steps,
            batch,
            lr,
            seed,
            save_dtype,
            save_every,
            sample_every,
            resume,
            place,
        } => {
            let mut cfg = match &config {
                Some(p) => {
                    let text = read_text(p)?;
                    aha_trainer::sft_run::SftConfig::from_toml(&text, p)?
                }
                None => aha_trainer::sft_run::SftConfig::default(),
            };
            cfg.model = model.unwrap_or(cfg.model);
            cfg.data = data.unwrap_or(cfg.data);
            cfg.out = out.unwrap_or(cfg.out);
            cfg.template = template.unwrap_or(cfg.template);
            cfg.steps = steps.unwrap_or(cfg.steps);
            cfg.batch = batch.unwrap_or(cfg.batch);
            cfg.learning_rate = lr.unwrap_or(cfg.learning_rate);
            cfg.seed = seed.unwrap_or(cfg.seed);
            cfg.save_dtype = save_dtype.unwrap_or(cfg.save_dtype);
            cfg.save_every = save_every.unwrap_or(cfg.save_every);
            cfg.sample_every = sample_every.unwrap_or(cfg.sample_every);
            cfg.device = place.device.unwrap_or(cfg.device);
            cfg.precision = place.precision.unwrap_or(cfg.precision);
            let mut p = Progress::new();
            let loss = aha_trainer::sft_run::run_sft_config_with(&cfg, resume, &mut |l| p.line(l))?;
            p.finish();
            println!(
                "{}",
                serde_json::json!({"loss": loss, "out": cfg.out.display().to_string()})
            );
            Ok(())
        }
        Command::RejectionSample {
            model,
            data,
            out,
            template,
            k,
            max_new_tokens,
            language,
            seed,
            place,
        } => {
            let place = place.resolve(&aha_moe_model::ModelConfig::from_path(&model)?)?;
            let o = aha_trainer::sft_run::RejectionOptions {
                place,
                k,
                max_new_tokens,
                min_chars: 1,
                max_chars: usize::MAX,
                language,
                min_language_share: 0.95,
                temperature: 1.0,
                seed,
            };
            let mut bar = generate::SamplingBar::new("rejection-sample");
            let s = aha_trainer::sft_run::run_rejection_sampling_with_progress(
                &model,
                &data,
                &template,
                &o,
                &out,
                &mut |p| bar.update(p),
            )?;
            bar.finish();
            println!("{}", serde_json::to_string(&s)?);
            Ok(())
        }
        Command::Distill {
            teacher,
            student,
            train,
            test,
            out,
            template,
            k,
            max_new_tokens,
            steps,
            lr,
            seed,
            save_dtype,
            save_every,
            sample_every,
            resume,
            place,
        } => {
            // The teacher samples on the device too.
            let teacher_place = place.resolve(&aha_moe_model::ModelConfig::from_path(&teacher)?)?;
            place.resolve(&aha_moe_model::ModelConfig::from_path(&student)?)?;
            let precision: aha_moe_model::Precision = place.precision.parse()?;
            let o = aha_trainer::sft_run::RejectionOptions {
                place: teacher_place,
                k,
                max_new_tokens,
                min_chars: 1,
                max_chars: usize::MAX,
                language: None,
                min_language_share: 0.0,
                temperature: 1.0,
                seed,
            };
            let mut p = Progress::new();
            let r = aha_trainer::sft_run::run_distill_with(
                &teacher,
                &student,
                &train,
                &test,
                &template,
                &o,
                steps,
                lr,
                4,
                &out,
                (&place.device, precision),
                save_dtype,
                aha_trainer::sft_run::DistillRun {
                    resume,
                    save_every,
                    sample_every,
                    ..aha_trainer::sft_run::DistillRun::default()
                },
                &mut |l| p.line(l),
            )?;
            p.finish();
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Command::Pipeline {
            quick,
            out,
            seed,
            task,
            digits,
            save_dtype,
            resume,
            save_every,
            place,
        } => {
            let mut cfg = aha_trainer::pipeline::PipelineConfig::toy(seed, quick);
            cfg.save_dtype = save_dtype;
            cfg.demo = cfg.demo.with_task(aha_trainer::toy::TaskSpec { task, digits })?;
            let mcfg = aha_moe_model::ModelConfig::from_json_str(
                &cfg.demo.model_config_json().to_string(),
                std::path::Path::new("<pipeline model config>"),
            )?;
            (cfg.device, cfg.precision) = place.resolve(&mcfg)?;
            let out = out.unwrap_or_else(|| PathBuf::from(format!("runs/pipeline-{seed}")));
            let mut p = Progress::new();
            let opts = aha_trainer::pipeline::PipelineOptions { resume, save_every };
            let rows = aha_trainer::pipeline::run_pipeline_with(&cfg, &out, opts, &mut |l| p.line(l))?;
            eprintln!(
                "{:<10} {:>8} {:>8} {:>8} {:>8}",
                "model", "params", "pass@1", "cons@k", "length"
            );
            for r in &rows {
                eprintln!(
                    "{:<10} {:>8} {:>8.3} {:>8.3} {:>8.1}",
                    r.model, r.params, r.eval.pass_at_1, r.eval.cons_at_k, r.eval.mean_length
                );
            }
            println!("{}", serde_json::to_string(&rows)?);
            Ok(())
        }
        Command::Eval {
            model,
            data,
            k,
            limit,
            template,
            temperature,
            top_p,
            max_new_tokens,
            seed,
            out,
            place,
        } => {
            let place = place.resolve(&aha_moe_model::ModelConfig::from_path(&model)?)?;
            eval_cmd::run(&eval_cmd::EvalArgs {
                place,
                model: &model,
                data: &data,
                k,
                limit,
                template: &template,
                params: aha_sampler::SamplingParams {
                    temperature,
                    top_p,
                    max_new_tokens,
                    seed,
                    ..aha_sampler::SamplingParams::default()
                },
                out: out.as_deref(),
            })
        }
        Command::Generate {
            model,
            prompts,
            prompt_ids,
            template,
            n,
            max_new_tokens,
            temperature,
            top_p,
            top_k,
            min_p,
            seed,
            greedy,
            device,
            kv_dtype,
            out,
        } => generate::run(&generate::GenerateArgs {
            model: &model,
            prompts: prompts.as_deref(),
            prompt_ids: prompt_ids.as_deref(),
            template: &template,
            n,
            params: aha_sampler::SamplingParams {
                temperature,
                top_p,
                top_k,
                min_p,
                greedy,
                max_new_tokens,
                seed,
                ..aha_sampler::SamplingParams::default()
            },
            device: &device,
            kv_dtype: &kv_dtype,
            out: out.as_deref(),
        }),
        Command::Bench {
            what:
                BenchCommand::Generate {
                    config,
                    batch,
                    prompt,
                    new,
                    seed,
                    device,
                    precision,
                },
        } => {
            let b = generate::GenerateBench {
                config: &config,
                batch,
                prompt,
                new,
                seed,
                device: &device,
                precision: &precision,
            };
            println!("{}", generate::bench(&b)?);
            Ok(())
        }
        Command::Bench {
            what:
                BenchCommand::Train {
                    config,
                    batch,
                    seq,
                    steps,
                    warmup,
                    seed,
                    profile,
                    offload_optimizer,
                    offload_bucket,
                    lora,
                    lora_rank,
                    place,
                },
        } => {
            let line = bench::train(&bench::TrainBench {
                place: &place,
                config: &config,
                batch,
                seq,
                steps,
                warmup,
                seed,
                profile,
                offload: offload_optimizer.then_some(offload_bucket),
                lora: lora.then_some(lora_rank),
            })?;
            println!("{line}");
            Ok(())
        }
    }
}

/// A config file's text; the error names the file.
fn read_text(path: &std::path::Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn info(device: &str, model: Option<&std::path::Path>) -> Result<()> {
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
    let model = match model {
        Some(dir) => {
            let t0 = std::time::Instant::now();
            let m = aha_moe_model::Model::load(dir)?;
            let load_s = t0.elapsed().as_secs_f64();
            let dtypes: std::collections::BTreeSet<String> = aha_moe_model::params::checkpoint_index(dir)?
                .values()
                .map(|l| format!("{:?}", l.dtype))
                .collect();
            serde_json::json!({
                "dir": dir.display().to_string(),
                "architecture": format!("{:?}", m.config.arch),
                "parameters": m.params.len(),
                "layers": m.config.num_layers,
                "dtypes_on_disk": dtypes,
                "host_bytes": m.params.len() * 4,
                "load_s": load_s,
            })
        }
        None => serde_json::Value::Null,
    };
    let line = serde_json::json!({
        "aha": env!("CARGO_PKG_VERSION"),
        "model": model,
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
