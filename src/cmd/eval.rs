//! `aha eval`: pass@1, pass@k and cons@k of a model on a math set.

use std::io::Write;
use std::path::PathBuf;

use aha_moe_model::{Model, Policy};
use aha_sampler::{load_tokenizer, SamplingParams};
use aha_trainer::data::read_math_jsonl;
use aha_trainer::eval::evaluate_math_with_progress;
use anyhow::{bail, Context, Result};

use super::options::Placement;
use super::progress::SamplingBar;

/// The arguments of `aha eval`. Its sampling flags are its own, not
/// `aha generate`'s group: their defaults are the R1 report's evaluation
/// settings, not the sampler's.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
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
}

impl EvalArgs {
    /// The sampling parameters of the evaluation.
    fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            max_new_tokens: self.max_new_tokens,
            seed: self.seed,
            ..SamplingParams::default()
        }
    }
}

/// Runs the evaluation; prints one JSON line, writes per-problem lines to `out`.
pub fn run(a: &EvalArgs) -> Result<()> {
    let (device, precision) = a.place.resolve_for(&a.model)?;
    let params = a.params();
    let policy = Policy::new(Model::load(&a.model)?, device, precision)?;
    let tok = load_tokenizer(&a.model).with_context(|| format!("{}: eval needs tokenizer.json", a.model.display()))?;
    let mut examples = read_math_jsonl(&a.data)?;
    if let Some(n) = a.limit {
        examples.truncate(n);
    }
    let templater = aha_trainer::sft_run::Templater::new(&a.template, &a.model)?;
    let prompts: Vec<Vec<u32>> = examples
        .iter()
        .map(|e| Ok(templater.encode(&tok, &e.prompt)?))
        .collect::<Result<_>>()?;
    let golds: Vec<String> = examples.iter().map(|e| e.gold.clone()).collect();
    if a.k == 0 {
        bail!("--k must be at least 1");
    }
    let mut bar = SamplingBar::new("eval");
    let (ev, per, completions) =
        evaluate_math_with_progress(&policy, &tok, &prompts, &golds, a.k, &params, &mut |p| bar.update(p))?;
    bar.finish();
    if let Some(path) = &a.out {
        let mut w = std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        );
        for p in &per {
            let texts: Vec<&str> = completions
                .iter()
                .filter(|c| c.prompt_index == p.index)
                .map(|c| c.text.as_str())
                .collect();
            let mut v = serde_json::to_value(p)?;
            v["completions"] = serde_json::json!(texts);
            writeln!(w, "{v}")?;
        }
        w.flush()?;
    }
    let mut line = serde_json::to_value(&ev)?;
    line["data"] = serde_json::json!(a.data.display().to_string());
    line["temperature"] = serde_json::json!(params.temperature);
    line["top_p"] = serde_json::json!(params.top_p);
    println!("{line}");
    Ok(())
}
