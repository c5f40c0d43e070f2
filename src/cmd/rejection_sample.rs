//! `aha rejection-sample`: k samples per problem; the correct,
//! well-formatted, same-language, length-bounded ones kept as SFT JSONL.

use std::path::PathBuf;

use anyhow::Result;

use super::options::{Placement, TraceSampling};
use super::progress::SamplingBar;

/// The arguments of `aha rejection-sample`.
#[derive(clap::Args, Debug)]
pub struct RejectionSampleArgs {
    /// Model folder.
    #[arg(long)]
    model: PathBuf,
    /// JSONL or Parquet problems with answers.
    #[arg(long)]
    data: PathBuf,
    /// Output JSONL (prompt, completion, answer).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    sampling: TraceSampling,
    /// Samples per problem.
    #[arg(long, default_value_t = 4)]
    k: usize,
    /// Reasoning language to require (en, zh, ...).
    #[arg(long)]
    language: Option<String>,
    /// Where the model samples (the GPU engine on a GPU).
    #[command(flatten)]
    place: Placement,
}

/// Samples and filters; prints the counts as one JSON line.
pub fn run(a: &RejectionSampleArgs) -> Result<()> {
    let place = a.place.resolve_for(&a.model)?;
    let o = a.sampling.options(place, a.k, a.language.clone(), 0.95);
    let mut bar = SamplingBar::new("rejection-sample");
    let s = aha_trainer::sft_run::run_rejection_sampling_with_progress(
        &a.model,
        &a.data,
        &a.sampling.template,
        &o,
        &a.out,
        &mut |p| bar.update(p),
    )?;
    bar.finish();
    println!("{}", serde_json::to_string(&s)?);
    Ok(())
}
