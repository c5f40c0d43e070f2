//! `aha grpo`: GRPO on a Hugging Face model and a JSONL or Parquet math set,
//! from a TOML config (see crates/trainer/README.md); flags override the
//! file's keys of the same name.

use std::path::PathBuf;

use anyhow::{ensure, Result};

use aha_trainer::grpo_run::GrpoConfig;

use super::options::{load_config, override_keys, Override, PlacementOverride, TrainOverrides};
use super::progress::Progress;

/// The arguments of `aha grpo`.
#[derive(clap::Args, Debug)]
pub struct GrpoArgs {
    /// The TOML config (unknown keys are errors).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Policy model folder.
    #[arg(long)]
    model: Option<PathBuf>,
    /// JSONL or Parquet prompts with answers.
    #[arg(long)]
    data: Option<PathBuf>,
    #[command(flatten)]
    run: TrainOverrides,
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
    /// DAPO dynamic sampling.
    #[arg(long)]
    dynamic_sampling: bool,
    #[command(flatten)]
    place: PlacementOverride,
}

override_keys!(GrpoArgs => GrpoConfig; {
    model => model,
    data => data,
    num_generations => num_generations,
    prompts_per_step => prompts_per_step,
    learning_rate => learning_rate,
    max_completion_length => max_completion_length,
});

impl GrpoArgs {
    /// The run's config: the TOML file (or the defaults) with every given
    /// flag applied; `--dynamic-sampling` turns the key on, never off.
    pub fn config(&self) -> Result<GrpoConfig> {
        let flags: [&dyn Override<GrpoConfig>; 3] = [self, &self.run, &self.place];
        let mut cfg = load_config(self.config.as_deref(), GrpoConfig::from_toml, &flags)?;
        cfg.dynamic_sampling |= self.dynamic_sampling;
        ensure!(
            !cfg.model.as_os_str().is_empty(),
            "aha grpo: no model: give --model or `model` in the --config file"
        );
        ensure!(
            !cfg.data.as_os_str().is_empty(),
            "aha grpo: no data: give --data or `data` in the --config file"
        );
        Ok(cfg)
    }
}

/// Runs GRPO; prints the last step's metrics as one JSON line.
pub fn run(a: &GrpoArgs) -> Result<()> {
    let cfg = a.config()?;
    let mut p = Progress::new();
    let m = aha_trainer::grpo_run::run_grpo(&cfg, a.run.resume, &mut |l| p.line(l))?;
    p.finish();
    println!("{}", serde_json::to_string(&m)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use clap::Parser;

    use super::GrpoArgs;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        grpo: GrpoArgs,
    }

    fn config(toml: &str, flags: &[&str]) -> anyhow::Result<aha_trainer::grpo_run::GrpoConfig> {
        let path = {
            // One file per call: the tests run in parallel.
            static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            std::env::temp_dir().join(format!("aha-grpo-flags-{}-{call}.toml", std::process::id()))
        };
        std::fs::write(&path, toml).unwrap();
        let mut argv = vec!["grpo".to_string(), "--config".into(), path.display().to_string()];
        argv.extend(flags.iter().map(|f| f.to_string()));
        let cfg = Cli::try_parse_from(argv)?.grpo.config();
        std::fs::remove_file(&path).unwrap();
        cfg
    }

    const TOML: &str = "model = \"m\"\ndata = \"d.jsonl\"\nsteps = 7\nlearning_rate = 2e-6\ndevice = \"cpu\"\n";

    #[test]
    fn a_flag_overrides_its_toml_key_and_the_others_stay() {
        let file = config(TOML, &[]).unwrap();
        assert_eq!((file.steps, file.learning_rate, file.device.as_str()), (7, 2e-6, "cpu"));
        let cfg = config(
            TOML,
            &[
                "--steps",
                "3",
                "--learning-rate",
                "1e-3",
                "--precision",
                "bf16",
                "--dynamic-sampling",
            ],
        )
        .unwrap();
        assert_eq!(cfg.steps, 3);
        assert_eq!(cfg.learning_rate, 1e-3);
        assert_eq!(cfg.precision, "bf16");
        assert!(cfg.dynamic_sampling);
        // Keys without a flag keep the file's value.
        assert_eq!(cfg.device, "cpu");
        assert_eq!(cfg.model, std::path::Path::new("m"));
        assert_eq!(cfg.num_generations, file.num_generations);
        assert!(!file.dynamic_sampling);
    }

    #[test]
    fn a_run_without_a_model_is_a_clear_error() {
        let err = config("data = \"d.jsonl\"\n", &[]).unwrap_err().to_string();
        assert!(err.contains("no model") && err.contains("--model"), "{err}");
        let cfg = config("data = \"d.jsonl\"\n", &["--model", "m2"]).unwrap();
        assert_eq!(cfg.model, std::path::Path::new("m2"));
    }
}
