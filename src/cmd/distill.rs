//! `aha distill`: a teacher writes traces, a student learns them by SFT;
//! both are evaluated.

use std::path::PathBuf;

use anyhow::Result;

use super::options::{Placement, TraceSampling};
use super::progress::Progress;

/// The arguments of `aha distill`.
#[derive(clap::Args, Debug)]
pub struct DistillArgs {
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
    #[command(flatten)]
    sampling: TraceSampling,
    /// Traces per problem.
    #[arg(long, default_value_t = 2)]
    k: usize,
    /// Student SFT steps.
    #[arg(long, default_value_t = 500)]
    steps: usize,
    /// Student learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
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
}

/// Distils; prints the report as one JSON line.
pub fn run(a: &DistillArgs) -> Result<()> {
    // The teacher samples on the device too; the student must fit it as well.
    let teacher_place = a.place.resolve_for(&a.teacher)?;
    a.place.resolve_for(&a.student)?;
    let precision: aha_moe_model::Precision = a.place.precision.parse()?;
    let o = a.sampling.options(teacher_place, a.k, None, 0.0);
    let mut p = Progress::new();
    let r = aha_trainer::sft_run::run_distill_with(
        &a.teacher,
        &a.student,
        &a.train,
        &a.test,
        &a.sampling.template,
        &o,
        a.steps,
        a.lr,
        4,
        &a.out,
        (&a.place.device, precision),
        a.save_dtype,
        aha_trainer::sft_run::DistillRun {
            resume: a.resume,
            save_every: a.save_every,
            sample_every: a.sample_every,
            ..aha_trainer::sft_run::DistillRun::default()
        },
        &mut |l| p.line(l),
    )?;
    p.finish();
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}
