//! `aha pipeline`: the whole R1 recipe at toy scale (base, R1-Zero, R1 with
//! cold start, RL, rejection sampling + SFT, and a distilled dense
//! student), with one table.

use std::path::PathBuf;

use anyhow::Result;

use super::options::Placement;
use super::progress::Progress;

/// The arguments of `aha pipeline`.
#[derive(clap::Args, Debug)]
pub struct PipelineArgs {
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
}

/// Runs the pipeline; prints the table on stderr and its rows as one JSON line.
pub fn run(a: &PipelineArgs) -> Result<()> {
    let mut cfg = aha_trainer::pipeline::PipelineConfig::toy(a.seed, a.quick);
    cfg.save_dtype = a.save_dtype;
    cfg.demo = cfg.demo.with_task(aha_trainer::toy::TaskSpec {
        task: a.task,
        digits: a.digits,
    })?;
    let mcfg = aha_moe_model::ModelConfig::from_json_str(
        &cfg.demo.model_config_json().to_string(),
        std::path::Path::new("<pipeline model config>"),
    )?;
    (cfg.device, cfg.precision) = a.place.resolve(&mcfg)?;
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("runs/pipeline-{}", a.seed)));
    let mut p = Progress::new();
    let opts = aha_trainer::pipeline::PipelineOptions {
        resume: a.resume,
        save_every: a.save_every,
    };
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
