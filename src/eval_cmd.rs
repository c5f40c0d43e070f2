//! `aha eval`: pass@1, pass@k and cons@k of a model on a math set.

use std::io::Write;
use std::path::Path;

use aha_moe_model::{Model, Policy, Precision};
use aha_sampler::{load_tokenizer, SamplingParams};
use aha_tensor::Device;
use aha_trainer::data::read_math_jsonl;
use aha_trainer::eval::evaluate_math_with_progress;
use anyhow::{bail, Context, Result};

/// Options of `aha eval`.
pub struct EvalArgs<'a> {
    pub model: &'a Path,
    pub data: &'a Path,
    pub k: usize,
    pub limit: Option<usize>,
    pub template: &'a str,
    pub params: SamplingParams,
    pub out: Option<&'a Path>,
    /// Where the model samples (resolved `--device`) and its precision.
    pub place: (Device, Precision),
}

/// Runs the evaluation; prints one JSON line, writes per-problem lines to `out`.
pub fn run(a: &EvalArgs<'_>) -> Result<()> {
    let policy = Policy::new(Model::load(a.model)?, a.place.0, a.place.1)?;
    let tok = load_tokenizer(a.model).with_context(|| format!("{}: eval needs tokenizer.json", a.model.display()))?;
    let mut examples = read_math_jsonl(a.data)?;
    if let Some(n) = a.limit {
        examples.truncate(n);
    }
    let templater = aha_trainer::sft_run::Templater::new(a.template, a.model)?;
    let prompts: Vec<Vec<u32>> = examples
        .iter()
        .map(|e| Ok(templater.encode(&tok, &e.prompt)?))
        .collect::<Result<_>>()?;
    let golds: Vec<String> = examples.iter().map(|e| e.gold.clone()).collect();
    if a.k == 0 {
        bail!("--k must be at least 1");
    }
    let mut bar = crate::generate::SamplingBar::new("eval");
    let (ev, per, completions) =
        evaluate_math_with_progress(&policy, &tok, &prompts, &golds, a.k, &a.params, &mut |p| bar.update(p))?;
    bar.finish();
    if let Some(path) = a.out {
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
    line["temperature"] = serde_json::json!(a.params.temperature);
    line["top_p"] = serde_json::json!(a.params.top_p);
    println!("{line}");
    Ok(())
}
