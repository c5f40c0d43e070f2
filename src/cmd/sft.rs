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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use clap::Parser;

    use super::SftArgs;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sft: SftArgs,
    }

    fn config(toml: &str, flags: &[&str]) -> aha_trainer::sft_run::SftConfig {
        let path = {
            // One file per call: the tests run in parallel.
            static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            std::env::temp_dir().join(format!("aha-sft-flags-{}-{call}.toml", std::process::id()))
        };
        std::fs::write(&path, toml).unwrap();
        let mut argv = vec!["sft".to_string(), "--config".into(), path.display().to_string()];
        argv.extend(flags.iter().map(|f| f.to_string()));
        let cfg = Cli::try_parse_from(argv).unwrap().sft.config().unwrap();
        std::fs::remove_file(&path).unwrap();
        cfg
    }

    const TOML: &str =
        "model = \"m\"\ndata = \"d.jsonl\"\nout = \"o\"\nlearning_rate = 2e-4\nbatch = 3\nsave_every = 5\n";

    #[test]
    fn a_flag_overrides_its_toml_key_and_the_others_stay() {
        let file = config(TOML, &[]);
        assert_eq!((file.learning_rate, file.batch, file.save_every), (2e-4, 3, 5));
        // --lr is the flag of the `learning_rate` key.
        let cfg = config(TOML, &["--lr", "0.5", "--out", "o2", "--device", "cpu"]);
        assert_eq!(cfg.learning_rate, 0.5);
        assert_eq!(cfg.out, std::path::Path::new("o2"));
        assert_eq!(cfg.device, "cpu");
        assert_eq!((cfg.batch, cfg.save_every, cfg.steps), (3, 5, file.steps));
        assert_eq!(cfg.model, std::path::Path::new("m"));
    }
}
