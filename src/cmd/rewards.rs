//! `aha rewards`: score a JSONL file of completions with one reward (a
//! rule, a scorer process, an HTTP endpoint or a reward model); writes each
//! line back with `reward` and `status` added.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};

use aha_rewards::code::{CodeReward, SandboxConfig};
use aha_rewards::countdown::CountdownReward;
use aha_rewards::external::{CommandConfig, CommandReward, HttpConfig, HttpReward};
use aha_rewards::format::{FormatConfig, FormatReward, FormatStyle, TagCountReward};
use aha_rewards::language::LanguageReward;
use aha_rewards::math::{Extraction, MathConfig, MathReward};
use aha_rewards::{evaluate_batch, metrics, BatchConfig, Example, Item, Reward};
use aha_trainer::reward_model::{ModelParams, ModelReward};

/// Which reward to compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// Final answer against `gold` (or `answer`).
    Math,
    /// R1-Zero's `<think>...</think><answer>...</answer>` (or R1's with --format-style r1).
    Format,
    /// 0.25 per think/answer tag present exactly once.
    TagCount,
    /// Share of words of the chain of thought in `language` (en, zh, ...).
    Language,
    /// TinyZero's countdown: `nums` and `target`.
    Countdown,
    /// The last fenced code block run against `tests`.
    Code,
    /// A scorer process (`--command`): one JSON request per line on its
    /// stdin, one reward per line on its stdout; the whole file in one batch.
    Command,
    /// An HTTP endpoint (`--url`) with OpenRLHF's remote reward protocol.
    Http,
    /// A scalar reward model (`--model DIR`: an HF `*ForSequenceClassification`
    /// folder with one label) scoring `prompt` + `completion`, rendered with
    /// its chat template when it has one; `--batch-size` per forward.
    Model,
}

/// `aha rewards` arguments.
#[derive(Debug, Args)]
pub struct RewardsArgs {
    /// The reward.
    #[arg(long, value_enum)]
    kind: Kind,
    /// JSONL input: one example per line with `completion` and the kind's fields.
    #[arg(long)]
    input: PathBuf,
    /// JSONL output (stdout when absent).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Math answer extraction: boxed (strict, training) or any (lenient, evaluation).
    #[arg(long, default_value = "boxed")]
    math_extraction: String,
    /// Format template: r1-zero or r1.
    #[arg(long, default_value = "r1-zero")]
    format_style: String,
    /// Code: wall-clock seconds per test.
    #[arg(long, default_value_t = 10.0)]
    code_timeout: f64,
    /// Worker threads (default: all cores).
    #[arg(long)]
    workers: Option<usize>,
    /// Command: the scorer program and its arguments (`--command python3 score.py`).
    #[arg(long, num_args = 1..)]
    command: Vec<String>,
    /// Http: `http://host:port/path`.
    #[arg(long)]
    url: Option<String>,
    /// Command and http: time for the batch's replies (per attempt for http), in ms.
    #[arg(long, default_value_t = 30_000)]
    timeout_ms: u64,
    /// Model: the reward model's folder (config.json, safetensors with `score.weight`, tokenizer.json).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Model: where it runs, cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Model: f32, or bf16 on a GPU.
    #[arg(long, default_value = "f32")]
    precision: String,
    /// Model: completions per forward.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Model: how prompt and completion are joined: auto (the model's chat
    /// template when it has one, else plain), chat or plain (prompt + completion).
    #[arg(long, default_value = "auto")]
    template: String,
}

fn reward_of(args: &RewardsArgs) -> Result<Arc<dyn Reward>> {
    Ok(match args.kind {
        Kind::Math => {
            let extraction: Extraction = args.math_extraction.parse()?;
            Arc::new(MathReward::new(MathConfig {
                extraction,
                ..MathConfig::default()
            })?)
        }
        Kind::Format => {
            let style = match args.format_style.as_str() {
                "r1-zero" | "r1_zero" => FormatStyle::R1Zero,
                "r1" => FormatStyle::R1,
                other => bail!("--format-style must be r1-zero or r1, got {other:?}"),
            };
            Arc::new(FormatReward {
                config: FormatConfig {
                    style,
                    ..FormatConfig::default()
                },
            })
        }
        Kind::TagCount => Arc::new(TagCountReward),
        Kind::Language => Arc::new(LanguageReward::default()),
        Kind::Countdown => Arc::new(CountdownReward),
        Kind::Code => {
            let config = SandboxConfig {
                timeout_s: args.code_timeout,
                ..SandboxConfig::default()
            };
            config.validate()?;
            Arc::new(CodeReward { config })
        }
        Kind::Command => Arc::new(CommandReward::new(CommandConfig {
            name: "command".into(),
            command: args.command.clone(),
            timeout_ms: args.timeout_ms,
        })?),
        Kind::Http => {
            let Some(url) = args.url.clone() else {
                bail!("--kind http needs --url");
            };
            Arc::new(HttpReward::new(HttpConfig {
                name: "http".into(),
                url,
                timeout_ms: args.timeout_ms,
                retries: 2,
            })?)
        }
        Kind::Model => {
            let Some(model) = &args.model else {
                bail!("--kind model needs --model DIR");
            };
            Arc::new(ModelReward::load(
                "model",
                &ModelParams {
                    device: args.device.clone(),
                    precision: args.precision.clone(),
                    batch_size: args.batch_size,
                    template: args.template.parse()?,
                    ..ModelParams::new(model)
                },
            )?)
        }
    })
}

/// Check that an example has what its kind needs.
fn check_fields(kind: Kind, ex: &Example) -> Result<()> {
    match kind {
        Kind::Math => {
            aha_rewards::math::gold_of(ex)?;
        }
        Kind::Countdown => {
            aha_rewards::countdown::task_of(ex)?;
        }
        Kind::Code => {
            aha_rewards::code::task_of(ex)?;
        }
        Kind::Language => match ex.get("language") {
            Some(serde_json::Value::String(code)) => {
                aha_rewards::language::Script::of_language(code)?;
            }
            _ => bail!("field `language` (a string such as \"en\" or \"zh\") is required"),
        },
        Kind::Model => match ex.get("prompt") {
            None | Some(serde_json::Value::String(_)) => {}
            Some(_) => bail!("field `prompt` must be a string"),
        },
        Kind::Format | Kind::TagCount | Kind::Command | Kind::Http => {}
    }
    Ok(())
}

/// Run the command.
pub fn run(args: &RewardsArgs) -> Result<()> {
    let reward = reward_of(args)?;
    let text = std::fs::read_to_string(&args.input).with_context(|| format!("reading {}", args.input.display()))?;
    let name = args.input.display();
    let mut lines = Vec::new();
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let value: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{name}:{n}: not a JSON value"))?;
        let serde_json::Value::Object(example) = value else {
            bail!("{name}:{n}: not a JSON object");
        };
        let completion = match example.get("completion") {
            Some(serde_json::Value::String(s)) => s.clone(),
            _ => bail!("{name}:{n}: field `completion` (a string) is required"),
        };
        check_fields(args.kind, &example).with_context(|| format!("{name}:{n}"))?;
        lines.push(line.trim().to_string());
        items.push(Item { example, completion });
    }
    let mut batch = BatchConfig::default();
    if let Some(w) = args.workers {
        batch.workers = w;
    }
    if args.kind == Kind::Code {
        let most_tests = items
            .iter()
            .filter_map(|it| it.example.get("tests").and_then(|t| t.as_array()).map(|a| a.len()))
            .max()
            .unwrap_or(1);
        batch.item_deadline_s = 60.0 + args.code_timeout * (most_tests as f64 + 1.0);
    }
    // The scorer process, the HTTP endpoint and the reward model take the
    // file in one call (the model in forwards of --batch-size).
    let outcomes = match reward.score_many(&items) {
        Some(v) => v,
        None => evaluate_batch(reward, Arc::new(items), &batch)?,
    };
    let mut out: Box<dyn Write> = match &args.out {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    for (line, o) in lines.iter().zip(&outcomes) {
        let reward = if o.score.is_finite() {
            serde_json::json!(o.score)
        } else {
            serde_json::Value::Null
        };
        writeln!(out, "{}", with_fields(line, &reward, o.status.as_str())?)?;
    }
    out.flush()?;
    let m = metrics(&outcomes);
    let counts: serde_json::Map<String, serde_json::Value> = m
        .counts
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), serde_json::json!(v)))
        .collect();
    eprintln!(
        "{}",
        serde_json::json!({"kind": format!("{:?}", args.kind).to_lowercase(), "n": outcomes.len(),
            "mean_reward": if m.mean.is_finite() { serde_json::json!(m.mean) } else { serde_json::Value::Null },
            "status": counts})
    );
    Ok(())
}

/// The line with `"reward"` and `"status"` appended, keeping its own text
/// (and key order) as it was; re-serialised only when it already has them.
fn with_fields(line: &str, reward: &serde_json::Value, status: &str) -> Result<String> {
    let mut obj: serde_json::Map<String, serde_json::Value> = serde_json::from_str(line)?;
    if obj.contains_key("reward") || obj.contains_key("status") {
        obj.insert("reward".into(), reward.clone());
        obj.insert("status".into(), serde_json::json!(status));
        return Ok(serde_json::to_string(&obj)?);
    }
    let body = line.strip_suffix('}').unwrap_or(line).trim_end();
    let sep = if obj.is_empty() { "" } else { ", " };
    Ok(format!("{body}{sep}\"reward\": {reward}, \"status\": \"{status}\"}}"))
}
