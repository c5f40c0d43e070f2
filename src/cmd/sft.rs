//! `aha sft`: supervised fine-tuning on JSONL prompt/completion (or
//! messages) pairs from a TOML config or flags; flags override the file's
//! keys of the same name (`--lr` sets `learning_rate`).

use std::path::PathBuf;

use anyhow::Result;

use aha_trainer::sft_run::SftConfig;

use super::options::{load_config, override_keys, Override, PlacementOverride, TrainOverrides};
use super::progress::Progress;

/// The arguments of `aha sft`.
#[derive(clap::Args, Debug)]
#[command(
    mut_arg("template", |a| a.help("none, r1-zero or chat [default: chat]")),
    mut_arg("steps", |a| a.help("Optimizer steps [default: 100]")),
    mut_arg("seed", |a| a.help("Seed [default: 0]")),
    mut_arg("save_every", |a| a.help("Save a checkpoint every N steps [default: 0, none]")),
)]
pub struct SftArgs {
    /// TOML config (keys as the flags, `learning_rate` for --lr; unknown keys are errors).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Model folder (config.json alone: start from random weights).
    #[arg(long)]
    model: Option<PathBuf>,
    /// JSONL or Parquet with `prompt` + `completion`, or `messages`.
    #[arg(long)]
    data: Option<PathBuf>,
    #[command(flatten)]
    run: TrainOverrides,
    /// Sequences per step [default: 16].
    #[arg(long)]
    batch: Option<usize>,
    /// Peak learning rate, cosine schedule [default: 1e-5].
    #[arg(long)]
    lr: Option<f64>,
    /// Sample completions into samples.jsonl every N steps [default: 0, after the last step only].
    #[arg(long)]
    sample_every: Option<usize>,
    #[command(flatten)]
    place: PlacementOverride,
}

override_keys!(SftArgs => SftConfig; {
    model => model,
    data => data,
    batch => batch,
    lr => learning_rate,
    sample_every => sample_every,
});

impl SftArgs {
    /// The run's config: the TOML file (or the defaults) with every given
    /// flag applied.
    pub fn config(&self) -> Result<SftConfig> {
        let flags: [&dyn Override<SftConfig>; 3] = [self, &self.run, &self.place];
        load_config(self.config.as_deref(), SftConfig::from_toml, &flags)
    }
}

/// Runs SFT; prints the final loss and the output folder as one JSON line.
pub fn run(a: &SftArgs) -> Result<()> {
    let cfg = a.config()?;
    let mut p = Progress::new();
    let loss = aha_trainer::sft_run::run_sft_config_with(&cfg, a.run.resume, &mut |l| p.line(l))?;
    p.finish();
    println!(
        "{}",
        serde_json::json!({"loss": loss, "out": cfg.out.display().to_string()})
    );
    Ok(())
}
