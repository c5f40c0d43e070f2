//! One GRPO step: sample G completions per prompt with the policy itself
//! (same process, same weights), score them, turn rewards into group
//! advantages, and update the policy with the GRPO loss (aha-grpo) through
//! the model's backward.

use aha_grpo::{compute_advantages, grpo_loss, metrics, AdvantageEstimator, LossConfig, LossInputs, Metrics};
use aha_moe_model::Model;
use aha_sampler::{Completion, Engine, EngineConfig, FinishReason, SamplingParams};
use tokenizers::Tokenizer;

use crate::error::Result;
use crate::optim::Optimizer;

/// Scores a completion's text given its prompt index.
pub type Scorer<'a> = Box<dyn Fn(&str, usize) -> f64 + Sync + 'a>;

/// A reward function: a name (for the `rewards/{name}/*` metrics), a weight
/// in the total, and the scorer `(completion text, prompt index) -> reward`.
pub struct RewardFn<'a> {
    /// Metric name.
    pub name: String,
    /// Weight in the summed reward.
    pub weight: f64,
    /// The scorer; NaN means "could not score" (left out of the baseline).
    pub score: Scorer<'a>,
}

/// Settings of a GRPO step.
#[derive(Debug, Clone)]
pub struct GrpoStep {
    /// Completions per prompt (G).
    pub num_generations: usize,
    /// The loss.
    pub loss: LossConfig,
    /// How rewards become advantages.
    pub advantages: AdvantageEstimator,
    /// Rollout sampling (temperature, top-p, max new tokens).
    pub sampling: SamplingParams,
}

/// Runs one step; returns its metrics (TRL names) and the completions.
pub fn grpo_step(
    policy: &mut Model,
    reference: Option<&Model>,
    opt: &mut Optimizer,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    rewards: &[RewardFn<'_>],
    cfg: &GrpoStep,
) -> Result<(Metrics, Vec<Completion>)> {
    let g = cfg.num_generations;
    let (completions, gen_stats) = {
        let engine = Engine::new(
            policy,
            Some(tok),
            EngineConfig {
                max_batch: (prompts.len() * g).max(g),
                ..EngineConfig::default()
            },
            &[],
        )?;
        engine.generate(prompts, g, &cfg.sampling)?
    };
    let n = completions.len();
    // Rewards, per function and weighted total.
    let per_fn: Vec<Vec<f64>> = rewards
        .iter()
        .map(|r| completions.iter().map(|c| (r.score)(&c.text, c.prompt_index)).collect())
        .collect();
    let total: Vec<f64> = (0..n)
        .map(|i| rewards.iter().zip(&per_fn).map(|(r, v)| r.weight * v[i]).sum())
        .collect();
    let adv = compute_advantages(&total, g, cfg.advantages)?;

    // The training batch: prompt + completion, right-padded.
    let t = completions
        .iter()
        .map(|c| prompts[c.prompt_index].len() + c.token_ids.len())
        .max()
        .unwrap_or(1);
    let tc = completions.iter().map(|c| c.token_ids.len()).max().unwrap_or(1).max(1);
    let mut ids = vec![0u32; n * t];
    let mut targets = vec![0u32; n * t];
    let mut mask = vec![false; n * tc];
    for (i, c) in completions.iter().enumerate() {
        let p = &prompts[c.prompt_index];
        let row = &mut ids[i * t..(i + 1) * t];
        row[..p.len()].copy_from_slice(p);
        row[p.len()..p.len() + c.token_ids.len()].copy_from_slice(&c.token_ids);
        for (j, &tokid) in c.token_ids.iter().enumerate() {
            targets[i * t + p.len() - 1 + j] = tokid;
            mask[i * tc + j] = true;
        }
    }
    let gather = |full: &[f32]| -> Vec<f64> {
        let mut out = vec![0f64; n * tc];
        for (i, c) in completions.iter().enumerate() {
            let base = i * t + prompts[c.prompt_index].len() - 1;
            for j in 0..c.token_ids.len() {
                out[i * tc + j] = full[base + j] as f64;
            }
        }
        out
    };
    let acts = policy.forward(&ids, n, t)?;
    let (logp, lse) = policy.token_logprobs(&acts, &targets)?;
    let logp_c = gather(&logp);
    let ref_c = match (cfg.loss.beta > 0.0, reference) {
        (true, Some(r)) => {
            let ra = r.forward(&ids, n, t)?;
            Some(gather(&r.token_logprobs(&ra, &targets)?.0))
        }
        _ => None,
    };
    let out = grpo_loss(
        &LossInputs {
            batch: n,
            seq: tc,
            logp: &logp_c,
            old_logp: None,
            ref_logp: ref_c.as_deref(),
            mask: &mask,
            advantages: &adv.values,
            entropy: None,
            num_items_in_batch: None,
        },
        &cfg.loss,
    )?;
    let mut dlogp = vec![0f32; n * t];
    for (i, c) in completions.iter().enumerate() {
        let base = i * t + prompts[c.prompt_index].len() - 1;
        for j in 0..c.token_ids.len() {
            dlogp[base + j] = out.dlogp[i * tc + j] as f32;
        }
    }
    let mut grads = vec![0f32; policy.params.len()];
    policy.backward(&acts, &targets, &lse, &dlogp, &mut grads)?;
    drop(acts);
    let info = opt.update(policy, &mut grads)?;

    let mut m = out.metrics;
    let named: Vec<(&str, &[f64])> = rewards
        .iter()
        .zip(&per_fn)
        .map(|(r, v)| (r.name.as_str(), &v[..]))
        .collect();
    m.extend(metrics::reward_metrics(&adv, &named));
    let lens: Vec<usize> = completions.iter().map(|c| c.token_ids.len()).collect();
    let truncated: Vec<bool> = completions
        .iter()
        .map(|c| c.finish_reason == FinishReason::Length)
        .collect();
    m.extend(metrics::completion_metrics(&lens, &truncated));
    m.insert("loss".into(), out.loss);
    m.insert("grad_norm".into(), info.grad_norm);
    m.insert("learning_rate".into(), info.lr);
    m.insert("update_skipped".into(), if info.skipped { 1.0 } else { 0.0 });
    m.insert("timing/generate_s".into(), gen_stats.total_s);
    Ok((m, completions))
}
