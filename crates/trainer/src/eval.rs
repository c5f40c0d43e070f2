//! Evaluation of the toy task: greedy answers to held-out problems.

use aha_moe_model::PolicyModel;
use aha_sampler::{Completion, EngineConfig, Sampler, SamplingParams};
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

/// `n` completions of every toy problem (the toy's end token stops them),
/// in (problem, sample) order, generated on the model's device (a
/// [`Model`](aha_moe_model::Model) or a [`Policy`](aha_moe_model::Policy)).
pub fn sample_toy<'a>(
    model: impl Into<PolicyModel<'a>>,
    tok: &'a Tokenizer,
    problems: &[Problem],
    n: usize,
    params: &SamplingParams,
) -> Result<Vec<Completion>> {
    let prompts = toy::encode_prompts(tok, problems)?;
    let engine = Sampler::for_model(
        model.into(),
        Some(tok),
        EngineConfig {
            max_batch: 256,
            ..EngineConfig::default()
        },
        &[toy::EOS],
    )?;
    Ok(engine.generate(&prompts, n, params)?.0)
}

/// Greedy completions of `problems` and their scores.
pub fn evaluate<'a>(
    model: impl Into<PolicyModel<'a>>,
    tok: &'a Tokenizer,
    problems: &[Problem],
    max_new: usize,
) -> Result<(EvalResult, Vec<Completion>)> {
    let params = SamplingParams {
        greedy: true,
        max_new_tokens: max_new,
        ..SamplingParams::default()
    };
    let out = sample_toy(model, tok, problems, 1, &params)?;
    let n = problems.len().max(1) as f64;
    let mut r = EvalResult {
        accuracy: 0.0,
        accuracy_strict: 0.0,
        format: 0.0,
        mean_length: 0.0,
    };
    for c in &out {
        let p = &problems[c.prompt_index];
        r.accuracy += f64::from(toy::is_correct(&c.text, p, true)) / n;
        r.accuracy_strict += toy::accuracy_reward(&c.text, p) / n;
        r.format += toy::format_reward(&c.text) / n;
        r.mean_length += c.token_ids.len() as f64 / n;
    }
    Ok((r, out))
}

/// Scores of a math evaluation.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MathEval {
    /// Problems evaluated.
    pub problems: usize,
    /// Samples per problem.
    pub k: usize,
    /// Mean over problems of the share of correct samples (the R1 report's pass@1).
    pub pass_at_1: f64,
    /// Unbiased pass@k.
    pub pass_at_k: f64,
    /// Unbiased pass@j for every j in 1..=k (key j; the JSON key is its
    /// decimal text).
    pub pass_at: std::collections::BTreeMap<usize, f64>,
    /// Majority vote over the extracted answers (cons@k).
    pub cons_at_k: f64,
    /// Share of samples with no extractable answer.
    pub no_answer: f64,
    /// Mean completion length (tokens).
    pub mean_length: f64,
    /// Completion tokens per second of generation.
    pub tokens_per_s: f64,
}

/// Per-problem results of [`evaluate_math`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProblemResult {
    /// Problem index.
    pub index: usize,
    /// Reference answer.
    pub gold: String,
    /// Each sample's extracted answer (None: none found).
    pub answers: Vec<Option<String>>,
    /// Each sample's verdict.
    pub correct: Vec<bool>,
    /// The majority answer.
    pub majority: Option<String>,
}

/// Samples `k` completions per problem, checks them with the math verifier
/// (lenient extraction, as for evaluation), and reports pass@1, pass@k and
/// cons@k. `prompts` are the token ids to generate from, one per example;
/// generation runs on the model's device.
pub fn evaluate_math<'a>(
    model: impl Into<PolicyModel<'a>>,
    tok: &'a Tokenizer,
    prompts: &[Vec<u32>],
    golds: &[String],
    k: usize,
    params: &SamplingParams,
) -> Result<(MathEval, Vec<ProblemResult>, Vec<Completion>)> {
    evaluate_math_with_progress(model, tok, prompts, golds, k, params, &mut |_| {})
}

/// [`evaluate_math`], reporting the sampling's progress to `progress` as
/// completions finish (a progress bar's input).
pub fn evaluate_math_with_progress<'a>(
    model: impl Into<PolicyModel<'a>>,
    tok: &'a Tokenizer,
    prompts: &[Vec<u32>],
    golds: &[String],
    k: usize,
    params: &SamplingParams,
    progress: &mut dyn FnMut(&aha_sampler::Progress),
) -> Result<(MathEval, Vec<ProblemResult>, Vec<Completion>)> {
    use aha_rewards::math::{answers_equivalent, extract_answer, verify, Extraction, MathConfig};
    if prompts.len() != golds.len() || prompts.is_empty() || k == 0 {
        return Err(crate::error::Error::Other(
            "evaluate_math: need one gold per prompt and k >= 1".into(),
        ));
    }
    let engine = Sampler::for_model(
        model.into(),
        Some(tok),
        EngineConfig {
            max_batch: (8 * k).max(64),
            ..EngineConfig::default()
        },
        &[],
    )?;
    let (out, stats) = engine.generate_with_progress(prompts, k, params, progress)?;
    let cfg = MathConfig {
        extraction: Extraction::Any,
        ..MathConfig::default()
    };
    let mut results = Vec::with_capacity(prompts.len());
    let (mut p1, mut pk, mut cons, mut none) = (0.0, 0.0, 0.0, 0usize);
    let mut pass_at = vec![0.0; k];
    for (pi, gold) in golds.iter().enumerate() {
        let samples: Vec<&Completion> = out.iter().filter(|c| c.prompt_index == pi).collect();
        let correct: Vec<bool> = samples
            .iter()
            .map(|c| verify(gold, &c.text, &cfg).status == aha_rewards::Status::Correct)
            .collect();
        let answers: Vec<Option<String>> = samples
            .iter()
            .map(|c| extract_answer(&c.text, Extraction::Any).map(|e| e.joined()))
            .collect();
        none += answers.iter().filter(|a| a.is_none()).count();
        // Majority vote: cluster equivalent answers, take the largest cluster
        // (ties: the one seen first).
        let mut clusters: Vec<(String, usize, bool)> = Vec::new();
        for (a, &ok) in answers.iter().zip(&correct) {
            let Some(a) = a else { continue };
            match clusters
                .iter_mut()
                .find(|(rep, _, _)| rep == a || answers_equivalent(rep, a))
            {
                Some(cl) => cl.1 += 1,
                None => clusters.push((a.clone(), 1, ok)),
            }
        }
        let best = clusters.iter().fold(None::<&(String, usize, bool)>, |b, c| match b {
            Some(b) if b.1 >= c.1 => Some(b),
            _ => Some(c),
        });
        let c = correct.iter().filter(|&&x| x).count();
        p1 += c as f64 / k as f64;
        pk += crate::data::pass_at_k(k, c, k);
        for (j, p) in pass_at.iter_mut().enumerate() {
            *p += crate::data::pass_at_k(k, c, j + 1);
        }
        cons += f64::from(best.is_some_and(|b| b.2));
        results.push(ProblemResult {
            index: pi,
            gold: gold.clone(),
            answers,
            correct,
            majority: best.map(|b| b.0.clone()),
        });
    }
    let n = golds.len() as f64;
    let eval = MathEval {
        problems: golds.len(),
        k,
        pass_at_1: p1 / n,
        pass_at_k: pk / n,
        pass_at: pass_at.iter().enumerate().map(|(j, p)| (j + 1, p / n)).collect(),
        cons_at_k: cons / n,
        no_answer: none as f64 / (n * k as f64),
        mean_length: out.iter().map(|c| c.token_ids.len() as f64).sum::<f64>() / out.len().max(1) as f64,
        tokens_per_s: stats.generated_tokens as f64 / stats.total_s.max(1e-9),
    };
    Ok((eval, results, out))
}
