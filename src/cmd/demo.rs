//! `aha demo`: R1-Zero at toy scale on the CPU (pretrain a small MoE, then
//! GRPO with accuracy and format rewards), into a run folder.

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::options::{read_text, Placement};
use super::progress::Progress;

/// The arguments of `aha demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
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
}

/// Runs the demo; prints its summary as one JSON line.
pub fn run(a: &DemoArgs) -> Result<()> {
    let spec = aha_trainer::toy::TaskSpec {
        task: a.task,
        digits: a.digits,
    };
    let cfg = match &a.config {
        Some(path) => {
            let text = read_text(path)?;
            serde_json::from_str(&text).with_context(|| format!("{}: not a demo config", path.display()))?
        }
        None if a.quick => aha_trainer::DemoConfig::quick(a.seed).with_task(spec)?,
        None => aha_trainer::DemoConfig::full(a.seed).with_task(spec)?,
    };
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("runs/demo-{}", a.seed)));
    let what = match cfg.task {
        aha_trainer::toy::Task::Countdown => "countdown".to_string(),
        t => format!("{}-digit {}", cfg.digits, t.name()),
    };
    eprintln!("aha demo: R1-Zero on {what}; run folder {}", out.display());
    let mcfg = aha_moe_model::ModelConfig::from_json_str(
        &cfg.model_config_json().to_string(),
        std::path::Path::new("<demo model config>"),
    )?;
    let (device, precision) = a.place.resolve(&mcfg)?;
    let opts = aha_trainer::RunOptions {
        resume: a.resume,
        save_every: a.save_every,
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
