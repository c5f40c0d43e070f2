//! Evaluation of the toy task: greedy answers to held-out problems.

use aha_moe_model::Model;
use aha_sampler::{Completion, Engine, EngineConfig, SamplingParams};
use tokenizers::Tokenizer;

use crate::error::Result;
use crate::toy::{self, Problem};

/// Held-out scores.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalResult {
    /// Share of problems answered right (the `<answer>` tag, or the bare
    /// completion when there is no tag).
    pub accuracy: f64,
    /// Share answered right inside `<answer>` tags (what the reward pays).
    pub accuracy_strict: f64,
    /// Share of completions in the `<think>...</think><answer>...</answer>` format.
    pub format: f64,
    /// Mean completion length in tokens.
    pub mean_length: f64,
}

/// Greedy completions of `problems` and their scores.
pub fn evaluate(
    model: &Model,
    tok: &Tokenizer,
    problems: &[Problem],
    max_new: usize,
) -> Result<(EvalResult, Vec<Completion>)> {
    let prompts: Vec<Vec<u32>> = problems
        .iter()
        .map(|p| toy::encode(tok, &p.prompt()))
        .collect::<Result<_>>()?;
    let engine = Engine::new(
        model,
        Some(tok),
        EngineConfig {
            max_batch: 256,
            ..EngineConfig::default()
        },
        &[toy::EOS],
    )?;
    let params = SamplingParams {
        greedy: true,
        max_new_tokens: max_new,
        ..SamplingParams::default()
    };
    let (out, _) = engine.generate(&prompts, 1, &params)?;
    let n = problems.len().max(1) as f64;
    let mut r = EvalResult {
        accuracy: 0.0,
        accuracy_strict: 0.0,
        format: 0.0,
        mean_length: 0.0,
    };
    for c in &out {
        let p = &problems[c.prompt_index];
        r.accuracy += f64::from(toy::extract_answer(&c.text, true) == Some(p.answer())) / n;
        r.accuracy_strict += toy::accuracy_reward(&c.text, p) / n;
        r.format += toy::format_reward(&c.text) / n;
        r.mean_length += c.token_ids.len() as f64 / n;
    }
    Ok((r, out))
}
