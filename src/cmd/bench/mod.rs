//! `aha bench`: benchmarks, each printing one JSON line.

mod generate;
mod train;

use anyhow::Result;

/// The arguments of `aha bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchCommand,
}

/// The benchmarks.
#[derive(clap::Subcommand, Debug)]
enum BenchCommand {
    /// Batched sampling on random weights: tokens per second.
    Generate(generate::GenerateArgs),
    /// Full training steps (forward, backward, AdamW) on random weights.
    Train(train::TrainArgs),
}

/// Runs the benchmark; prints its JSON line.
pub fn run(a: &BenchArgs) -> Result<()> {
    let line = match &a.what {
        BenchCommand::Generate(b) => generate::bench(b)?,
        BenchCommand::Train(t) => train::train(t)?,
    };
    println!("{line}");
    Ok(())
}
