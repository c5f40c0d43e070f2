//! One GRPO step: sample G completions per prompt with the policy itself
//! (same process, same weights), score them, turn rewards into group
//! advantages, and update the policy with the GRPO loss (aha-grpo) through
//! the model's backward.

use std::sync::Arc;

use aha_grpo::{
    compute_advantages, grpo_loss_on, metrics, AdvantageEstimator, LossConfig, LossType, Metrics, TensorLossInputs,
};
use aha_moe_model::Policy;
use aha_rewards::length::LENGTH_FIELD;
use aha_rewards::{evaluate_weighted, BatchConfig, Example, Item, WeightedSum};
use aha_sampler::{Completion, EngineCache, EngineConfig, FinishReason, Sampler, SamplingParams};
use aha_tensor::Tensor;
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::optim::Optimizer;

/// What scores a step's completions: the weighted rewards (each reward's
/// `name()` labels its `rewards/{name}/*` metrics), the dataset row of each
/// prompt, and the batch evaluator's workers and per-completion deadline.
pub struct Scoring<'a> {
    /// The rewards and their weights.
    pub rewards: &'a WeightedSum,
    /// The dataset row of each prompt, in prompt order (gold answer, tests,
    /// `nums`/`target`, ...).
    pub examples: &'a [Example],
    /// Worker threads and the deadline per completion.
    pub batch: &'a BatchConfig,
}

/// Scores completions with every reward, in parallel with a deadline per
/// completion. Each completion is judged against its prompt's row, with the
/// completion's length in tokens added under
/// [`aha_rewards::length::LENGTH_FIELD`]. Returns one score per completion
/// per reward (NaN: could not be scored) and the weighted totals (NaN when
/// a weighted part is NaN, so the completion stays out of its group's
/// baseline).
pub fn score_completions(completions: &[Completion], scoring: &Scoring<'_>) -> Result<(Vec<Vec<f64>>, Vec<f64>)> {
    let mut items = Vec::with_capacity(completions.len());
    for c in completions {
        let mut example = scoring.examples.get(c.prompt_index).cloned().ok_or_else(|| {
            Error::Other(format!(
                "completion of prompt {} but only {} examples",
                c.prompt_index,
                scoring.examples.len()
            ))
        })?;
        example.insert(LENGTH_FIELD.into(), c.token_ids.len().into());
        items.push(Item {
            example,
            completion: c.text.clone(),
        });
    }
    let combined = evaluate_weighted(scoring.rewards, Arc::new(items), scoring.batch)?;
    let per_fn = (0..scoring.rewards.parts().len())
        .map(|k| {
            combined
                .iter()
                .map(|row| row.parts.get(k).map_or(f64::NAN, |p| p.1.score))
                .collect()
        })
        .collect();
    let total = combined.iter().map(|row| row.total).collect();
    Ok((per_fn, total))
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
    /// Leave completions cut by the length limit out of the loss (TRL's
    /// `mask_truncated_completions`; DAPO).
    pub mask_truncated: bool,
    /// Passes over each generation batch (mu in DeepSeekMath; TRL's
    /// `num_iterations`, default 1).
    pub num_iterations: usize,
    /// Optimizer updates per pass: the generation batch is split into this
    /// many minibatches of whole completions (1: one update per pass).
    pub minibatches: usize,
    /// Tokens (rows x padded length) of one forward and backward: each
    /// minibatch is split into micro-batches of completions of similar
    /// length under this budget, their gradients accumulated before the
    /// update (0: the whole minibatch at once).
    pub micro_batch_tokens: usize,
}

/// Scored completions of a set of prompts, G each, grouped by prompt.
pub struct Rollouts {
    /// Prompt token ids, one per group.
    pub prompts: Vec<Vec<u32>>,
    /// Completions; `prompt_index` points into `prompts`.
    pub completions: Vec<Completion>,
    /// Per reward function, one score per completion.
    pub per_fn: Vec<Vec<f64>>,
    /// Weighted total per completion.
    pub total: Vec<f64>,
    /// Seconds spent generating.
    pub generate_s: f64,
    /// What the rollout engine did: KV pools allocated (0 when a kept one
    /// was reused), decode graphs captured and decode steps replayed from
    /// them (see [`rollout_kept`]).
    pub engine: EngineWork,
}

/// The rollout engine's allocations, captures and replays over one or
/// more `generate` calls (from `aha_sampler::GenerateStats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineWork {
    /// KV pools allocated.
    pub pools_allocated: usize,
    /// Decode graphs captured.
    pub graphs_captured: usize,
    /// Decode steps replayed as graphs.
    pub graph_steps: usize,
    /// Engine steps.
    pub steps: usize,
}

impl EngineWork {
    fn add(&mut self, o: EngineWork) {
        self.pools_allocated += o.pools_allocated;
        self.graphs_captured += o.graphs_captured;
        self.graph_steps += o.graph_steps;
        self.steps += o.steps;
    }
}

impl Rollouts {
    /// True when every valid reward of group `g` is the same (no signal).
    pub fn group_is_flat(&self, g: usize, size: usize) -> bool {
        let r: Vec<f64> = self.total[g * size..(g + 1) * size]
            .iter()
            .copied()
            .filter(|x| x.is_finite())
            .collect();
        r.windows(2).all(|w| (w[0] - w[1]).abs() <= 1e-12)
    }

    /// Keeps the groups `keep` names (in order), renumbering prompts.
    pub fn select(self, keep: &[usize], size: usize) -> Rollouts {
        let mut out = Rollouts {
            prompts: Vec::new(),
            completions: Vec::new(),
            per_fn: vec![Vec::new(); self.per_fn.len()],
            total: Vec::new(),
            generate_s: self.generate_s,
            engine: self.engine,
        };
        for (new, &g) in keep.iter().enumerate() {
            out.prompts.push(self.prompts[g].clone());
            for i in g * size..(g + 1) * size {
                let mut c = self.completions[i].clone();
                c.prompt_index = new;
                out.completions.push(c);
                out.total.push(self.total[i]);
                for (f, v) in out.per_fn.iter_mut().zip(&self.per_fn) {
                    f.push(v[i]);
                }
            }
        }
        out
    }

    /// Appends another set of groups.
    pub fn extend(&mut self, other: Rollouts) {
        let base = self.prompts.len();
        self.prompts.extend(other.prompts);
        self.completions.extend(other.completions.into_iter().map(|mut c| {
            c.prompt_index += base;
            c
        }));
        self.total.extend(other.total);
        for (f, v) in self.per_fn.iter_mut().zip(other.per_fn) {
            f.extend(v);
        }
        self.generate_s += other.generate_s;
        self.engine.add(other.engine);
    }
}

/// Device bytes that a memory `plan` leaves free on `device` now (`None`
/// on the CPU): how large a rollout's kept KV pool may be and still stay
/// through the training step (`aha grpo` releases a larger one after each
/// rollout; see [`rollout_kept`]).
pub fn spare_device_memory(
    plan: &aha_moe_model::memory::MemoryPlan,
    device: aha_tensor::Device,
) -> Result<Option<u64>> {
    let aha_tensor::Device::Cuda(i) = device else {
        return Ok(None);
    };
    let device_err = |e: aha_cuda_kernels::Error| Error::Other(format!("cuda:{i}: {e}"));
    let gpu = aha_cuda_kernels::Gpu::get(i).map_err(device_err)?;
    let (free, _) = gpu.mem_info().map_err(device_err)?;
    Ok(Some((free as u64).saturating_sub(plan.total())))
}

/// Samples G completions per prompt with the policy and scores them. The
/// sampler runs on the policy's device over its live weights (the CPU
/// engine, or the GPU engine with no copy of the weights).
pub fn rollout(
    policy: &Policy,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    scoring: &Scoring<'_>,
    cfg: &GrpoStep,
) -> Result<Rollouts> {
    rollout_kept(policy, tok, prompts, scoring, cfg, &mut EngineCache::new())
}

/// [`rollout`] keeping the GPU engine's KV pool and decode graphs in
/// `cache` for the next rollout (`aha grpo` keeps one for the run): the
/// next step's rollout reuses the pool and replays the graphs, which read
/// the weights the optimizer updated in place (see
/// [`aha_sampler::EngineCache`]).
pub fn rollout_kept(
    policy: &Policy,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    scoring: &Scoring<'_>,
    cfg: &GrpoStep,
    cache: &mut EngineCache,
) -> Result<Rollouts> {
    let g = cfg.num_generations;
    let engine = Sampler::with_cache(
        policy,
        Some(tok),
        EngineConfig {
            max_batch: (prompts.len() * g).max(g),
            ..EngineConfig::default()
        },
        &[],
        cache,
    )?;
    let (completions, stats) = engine.generate(prompts, g, &cfg.sampling)?;
    let (per_fn, total) = score_completions(&completions, scoring)?;
    Ok(Rollouts {
        prompts: prompts.to_vec(),
        completions,
        per_fn,
        total,
        generate_s: stats.total_s,
        engine: EngineWork {
            pools_allocated: stats.pools_allocated,
            graphs_captured: stats.graphs_captured,
            graph_steps: stats.graph_steps,
            steps: stats.steps,
        },
    })
}

/// Runs one step; returns its metrics (TRL names) and the completions.
pub fn grpo_step(
    policy: &mut Policy,
    reference: Option<&Policy>,
    opt: &mut Optimizer,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    scoring: &Scoring<'_>,
    cfg: &GrpoStep,
) -> Result<(Metrics, Vec<Completion>)> {
    let r = rollout(policy, tok, prompts, scoring, cfg)?;
    let names = scoring.rewards.names();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let m = train_on(policy, reference, opt, &r, &names, cfg)?;
    Ok((m, r.completions))
}

/// One update of the policy on scored rollouts: group advantages, the GRPO
/// loss, backward, optimizer. `names` label the reward functions' metrics.
/// Log-probs are those of the sampling distribution, `log softmax(logits /
/// T)` at the rollout temperature (as TRL, and as the sampler reports them),
/// computed for completion tokens only; the loss runs on the policy's
/// device and its per-token gradient goes straight into the backward.
pub fn train_on(
    policy: &mut Policy,
    reference: Option<&Policy>,
    opt: &mut Optimizer,
    r: &Rollouts,
    names: &[&str],
    cfg: &GrpoStep,
) -> Result<Metrics> {
    train_on_synced(policy, reference, opt, r, names, cfg, None)
}

/// What [`train_on_synced`] needs from the other ranks of a data-parallel
/// run ([`crate::dp::DataParallel`]): sums of batch statistics, gathers of
/// per-completion values, and the gradient all-reduce. Every rank makes the
/// same calls in the same order.
pub trait StepSync {
    /// The number of ranks.
    fn world(&self) -> usize;
    /// This rank (0 for one process).
    fn rank(&self) -> usize {
        0
    }
    /// Sums `xs` over the ranks, in place (the same on every rank).
    fn sum(&mut self, xs: &mut [f64]) -> Result<()>;
    /// Every rank's `xs`, concatenated in rank order.
    fn gather(&mut self, xs: &[f64]) -> Result<Vec<f64>>;
    /// Sums the policy's gradient buffer over the ranks, in place (with a
    /// sharded optimizer, at least this rank's shard of it).
    fn reduce_grads(&mut self, policy: &mut Policy) -> Result<()>;
    /// Whether every forward and backward of the policy is a collective
    /// over the ranks (expert parallelism): the step then gives every rank
    /// the same number of micro-batches and agrees on a non-finite loss
    /// before each backward, so that all ranks run them together. `false`
    /// by default.
    fn lockstep(&self) -> bool {
        false
    }
    /// Called before the backward of a step's last micro-batch (when every
    /// rank will call [`StepSync::reduce_grads`] after it): whether
    /// [`StepSync::grads_ready`] should hear of the parts that backward
    /// completes (`Policy::backward_with_hook`), so that the sum starts
    /// during the backward. `false` by default.
    fn overlap_backward(&mut self, _policy: &Policy) -> Result<bool> {
        Ok(false)
    }
    /// A part of the gradient buffer the last micro-batch's backward has
    /// completed (see [`StepSync::overlap_backward`]).
    fn grads_ready(&mut self, _ready: aha_moe_model::GradReady<'_>) -> Result<()> {
        Ok(())
    }
    /// With the optimizer state sharded over the ranks (ZeRO-1): clips by
    /// the global gradient norm, runs AdamW step `t` (1-based) on this
    /// rank's shard and gives every rank the updated weights; returns the
    /// norm before clipping (non-finite: nothing updated on any rank).
    /// `None` when the optimizer is not sharded, and the caller runs its
    /// own update.
    fn sharded_update(
        &mut self,
        _policy: &mut Policy,
        _h: &aha_tensor::cpu::AdamW,
        _t: u64,
        _max_grad_norm: f64,
    ) -> Result<Option<f64>> {
        Ok(None)
    }
}

/// Sums over the ranks whether one had a non-finite loss (`bad`); when
/// another rank had, `bad` becomes NaN here too, so every rank skips.
fn agree_finite(s: &mut dyn StepSync, bad: &mut Option<f64>) -> Result<()> {
    let mut any = [if bad.is_some() { 1.0 } else { 0.0 }];
    s.sum(&mut any)?;
    if any[0] > 0.0 && bad.is_none() {
        *bad = Some(f64::NAN);
    }
    Ok(())
}

/// The backward of a step's last micro-batch on a data-parallel rank:
/// with the gradients' sum overlapping it ([`StepSync::overlap_backward`]),
/// each part it completes goes to [`StepSync::grads_ready`].
pub(crate) fn backward_synced(
    policy: &mut Policy,
    fwd: aha_moe_model::Forward,
    scores: &aha_moe_model::Scores,
    dlogp: &Tensor,
    dentropy: Option<&Tensor>,
    s: &mut dyn StepSync,
) -> Result<()> {
    if !s.overlap_backward(policy)? {
        return Ok(policy.backward(fwd, scores, dlogp, dentropy, 0.0)?);
    }
    let mut failed = None;
    let mut hook = |r: aha_moe_model::GradReady<'_>| {
        s.grads_ready(r).map_err(|e| {
            let msg = e.to_string();
            failed = Some(e);
            msg
        })
    };
    let r = policy.backward_with_hook(fwd, scores, dlogp, dentropy, 0.0, &mut hook);
    match (r, failed) {
        (_, Some(e)) => Err(e),
        (r, None) => r.map(|_| ()).map_err(Into::into),
    }
}

/// [`train_on`] for one rank of a data-parallel run: `r` holds this rank's
/// whole groups. Each rank scales its loss by its share of the global
/// minibatch (rows, or tokens for bnpo; dapo and cispo divide by the global
/// token count), so that summing the gradients over the ranks gives the
/// gradient one process would compute on the global batch; a non-finite
/// loss on any rank skips the update on every rank. Reward and completion
/// metrics are computed on the gathered global batch (exactly one process's
/// values); the loss family's metrics, weighted by each rank's share, are
/// summed over the ranks.
pub fn train_on_synced(
    policy: &mut Policy,
    reference: Option<&Policy>,
    opt: &mut Optimizer,
    r: &Rollouts,
    names: &[&str],
    cfg: &GrpoStep,
    mut sync: Option<&mut dyn StepSync>,
) -> Result<Metrics> {
    let g = cfg.num_generations;
    let prompts = &r.prompts;
    let completions = &r.completions;
    let n = completions.len();
    let mut adv = compute_advantages(&r.total, g, cfg.advantages)?;
    if let Some(s) = sync.as_deref_mut() {
        // The advantages of the global batch, this rank's slice of them:
        // batch-wide scaling (`scale_rewards = "batch"`, REINFORCE++'s
        // baseline) needs every rank's rewards; group-wise ones come out
        // the same as from this rank's groups alone.
        let all = s.gather(&r.total)?;
        let counts = s.gather(&[n as f64])?;
        let at = counts.iter().take(s.rank()).map(|&c| c as usize).sum::<usize>();
        let global = compute_advantages(&all, g, cfg.advantages)?;
        adv.values = global
            .values
            .get(at..at + n)
            .ok_or_else(|| Error::Other(format!("rank {}: no advantages at {at}..{}", s.rank(), at + n)))?
            .to_vec();
    }
    let temperature = if cfg.sampling.temperature > 0.0 {
        cfg.sampling.temperature
    } else {
        1.0
    };

    let lens: Vec<usize> = completions
        .iter()
        .map(|c| prompts[c.prompt_index].len() + c.token_ids.len())
        .collect();
    let clens: Vec<usize> = completions.iter().map(|c| c.token_ids.len()).collect();
    if let Some(i) = completions.iter().position(|c| prompts[c.prompt_index].is_empty()) {
        return Err(crate::error::Error::Other(format!("completion {i}: empty prompt")));
    }
    let train_mask = |c: &Completion| !(cfg.mask_truncated && c.finish_reason == FinishReason::Length);
    let total_tokens = completions
        .iter()
        .filter(|c| train_mask(c))
        .map(|c| c.token_ids.len())
        .sum::<usize>() as f64;
    let total_tokens = match sync.as_deref_mut() {
        Some(s) => {
            let mut t = [total_tokens];
            s.sum(&mut t)?;
            t[0]
        }
        None => total_tokens,
    };
    // Minibatches of whole completions (one optimizer update each), each
    // split into micro-batches that fit the token budget (one forward and
    // backward each, gradients accumulated).
    let mu = cfg.num_iterations.max(1);
    let nmb = cfg.minibatches.clamp(1, n.max(1));
    let rows_per = n.div_ceil(nmb).max(1);
    let mut minibatches: Vec<Vec<Micro>> = (0..n)
        .step_by(rows_per)
        .map(|r0| micro_batches(r0..(r0 + rows_per).min(n), &lens, &clens, cfg.micro_batch_tokens))
        .collect();
    let lockstep = sync.as_deref().is_some_and(|s| s.lockstep());
    if let Some(s) = sync.as_deref_mut().filter(|_| lockstep) {
        // Every forward and backward is a collective: each rank runs as
        // many micro-batches as the rank with the most (the budget may
        // cut ranks' completions into different numbers of them).
        let counts: Vec<f64> = minibatches.iter().map(|mb| mb.len() as f64).collect();
        let all = s.gather(&counts)?;
        if all.len() != counts.len() * s.world() {
            return Err(Error::Dist(format!(
                "rank {}: the ranks have different numbers of minibatches ({} counts for {} ranks of {})",
                s.rank(),
                all.len(),
                s.world(),
                counts.len()
            )));
        }
        for (b, mb) in minibatches.iter_mut().enumerate() {
            let want = all.iter().skip(b).step_by(counts.len()).fold(0.0f64, |m, &x| m.max(x)) as usize;
            split_micro_batches(mb, want, &lens, &clens).map_err(|e| Error::Dist(format!("rank {}: {e}", s.rank())))?;
        }
    }
    // One micro-batch's training rows: prompt + completion right-padded to
    // its longest, the scored rows (token j of completion k is predicted at
    // row k * t + len(prompt) - 1 + j; padding slots point at the
    // completion's first row and are masked out), mask and advantages.
    let batch_of = |m: &Micro| -> MicroData {
        let (t, tc) = (m.t, m.tc);
        let nb = m.idx.len();
        let mut d = MicroData {
            ids: vec![0u32; nb * t],
            rows: Vec::with_capacity(nb * tc),
            targets: Vec::with_capacity(nb * tc),
            mask: vec![false; nb * tc],
            adv: Vec::with_capacity(nb),
        };
        for (k, &i) in m.idx.iter().enumerate() {
            let c = &completions[i];
            let p = &prompts[c.prompt_index];
            let row = &mut d.ids[k * t..(k + 1) * t];
            row[..p.len()].copy_from_slice(p);
            row[p.len()..p.len() + c.token_ids.len()].copy_from_slice(&c.token_ids);
            let base = k * t + p.len() - 1;
            for j in 0..tc {
                match c.token_ids.get(j) {
                    Some(&tok) => {
                        d.rows.push((base + j) as u32);
                        d.targets.push(tok);
                        d.mask[k * tc + j] = train_mask(c);
                    }
                    None => {
                        d.rows.push(base as u32);
                        d.targets.push(0);
                    }
                }
            }
            d.adv.push(adv.values[i]);
        }
        d
    };
    let data: Vec<Vec<MicroData>> = minibatches.iter().map(|mb| mb.iter().map(batch_of).collect()).collect();
    // Per-token log-probs of a micro-batch under `p`, on its device.
    let score = |p: &Policy, m: &Micro, d: &MicroData| -> Result<Tensor> {
        let fwd = p.forward(&d.ids, m.idx.len(), m.t)?;
        Ok(p.score(&fwd, &d.rows, &d.targets, temperature)?.logp)
    };
    let all = |p: &Policy| -> Result<Vec<Vec<Tensor>>> {
        minibatches
            .iter()
            .zip(&data)
            .map(|(mb, ds)| mb.iter().zip(ds).map(|(m, d)| score(p, m, d)).collect())
            .collect()
    };
    // With more than one update per generation batch, the policy that
    // sampled ("old") differs from the one being trained: keep its log-probs.
    let old = if mu > 1 || nmb > 1 { Some(all(policy)?) } else { None };
    let refs = match (cfg.loss.beta > 0.0, reference) {
        (true, Some(rf)) => Some(all(rf)?),
        // A LoRA policy's reference is its base: the adapters switched off.
        (true, None) if policy.has_adapters() => {
            policy.set_adapters_enabled(false);
            let r = all(policy);
            policy.set_adapters_enabled(true);
            Some(r?)
        }
        _ => None,
    };
    let mut last = None;
    for it in 0..mu {
        for (b, (mb, ds)) in minibatches.iter().zip(&data).enumerate() {
            let (r0, r1) = (b * rows_per, (b * rows_per + rows_per).min(n));
            let describe = || {
                let mut ps: Vec<usize> = completions[r0..r1].iter().map(|c| c.prompt_index).collect();
                ps.dedup();
                format!(
                    "iteration {}/{mu}, minibatch {}/{nmb}: completions {r0}..{r1} of prompts {ps:?}",
                    it + 1,
                    b + 1
                )
            };
            let rows_mb = (r1 - r0) as f64;
            let tokens_mb: f64 = ds.iter().map(|d| d.mask.iter().filter(|&&x| x).count() as f64).sum();
            // Over every rank: the shares below are of the global minibatch.
            let (rows_mb, tokens_mb) = match sync.as_deref_mut() {
                Some(s) => {
                    let mut t = [rows_mb, tokens_mb];
                    s.sum(&mut t)?;
                    (t[0], t[1])
                }
                None => (rows_mb, tokens_mb),
            };
            let mut acc: Option<(f64, Metrics)> = None;
            let mut bad = None;
            policy.zero_grad()?;
            // The ranks agree that every loss is finite before the last
            // micro-batch's backward, whose all-reduce may start during it.
            let last_u = mb.len().saturating_sub(1);
            let mut agreed = false;
            for (u, (m, d)) in mb.iter().zip(ds).enumerate() {
                if bad.is_some() {
                    // A non-finite loss skips the rest of the minibatch.
                    if let (true, Some(s)) = (u == last_u, sync.as_deref_mut()) {
                        agree_finite(s, &mut bad)?;
                        agreed = true;
                    }
                    continue;
                }
                // LoRA dropout in this training forward only (its backward
                // draws the same masks; scoring runs without).
                let salt = ((it as u64) << 40) ^ ((b as u64) << 20) ^ u as u64;
                policy.set_lora_dropout(Some(aha_moe_model::lora::dropout_seed(&d.ids, salt)));
                let fwd = policy.forward(&d.ids, m.idx.len(), m.t);
                policy.set_lora_dropout(None);
                let fwd = fwd?;
                let scores = policy.score(&fwd, &d.rows, &d.targets, temperature)?;
                let mut out = grpo_loss_on(
                    &TensorLossInputs {
                        batch: m.idx.len(),
                        seq: m.tc,
                        logp: &scores.logp,
                        old_logp: old.as_ref().map(|o| &o[b][u]),
                        ref_logp: refs.as_ref().map(|x| &x[b][u]),
                        entropy: Some(&scores.entropy),
                        mask: &d.mask,
                        advantages: &d.adv,
                        num_items_in_batch: Some(total_tokens),
                    },
                    &cfg.loss,
                )?;
                if !out.loss.is_finite() {
                    bad = Some(out.loss);
                    acc = Some((out.loss, out.metrics));
                    if let (true, Some(s)) = (u == last_u || lockstep, sync.as_deref_mut()) {
                        agree_finite(s, &mut bad)?;
                        agreed = u == last_u;
                    }
                    continue;
                }
                // This micro-batch's share of the minibatch's loss.
                let share = match cfg.loss.loss_type {
                    LossType::Grpo | LossType::DrGrpo => m.idx.len() as f64 / rows_mb,
                    LossType::Bnpo if tokens_mb > 0.0 => d.mask.iter().filter(|&&x| x).count() as f64 / tokens_mb,
                    LossType::Bnpo => m.idx.len() as f64 / rows_mb,
                    LossType::Dapo | LossType::Cispo => 1.0,
                };
                out.scale(share)?;
                let (dlogp, dentropy) = (out.dlogp, out.dentropy);
                acc = Some(merge_metrics(acc, out.loss, out.metrics, m.idx.len() as f64 / rows_mb));
                match sync.as_deref_mut() {
                    Some(s) if u == last_u => {
                        agree_finite(s, &mut bad)?;
                        agreed = true;
                        if bad.is_none() {
                            backward_synced(policy, fwd, &scores, &dlogp, dentropy.as_ref(), s)?;
                        }
                    }
                    // In lockstep every rank agrees before each backward,
                    // so that all of them run it or none does.
                    Some(s) if lockstep => {
                        agree_finite(s, &mut bad)?;
                        if bad.is_none() {
                            policy.backward(fwd, &scores, &dlogp, dentropy.as_ref(), 0.0)?;
                        }
                    }
                    None if u == last_u => opt.backward_last(policy, fwd, &scores, &dlogp, dentropy.as_ref())?,
                    _ => policy.backward(fwd, &scores, &dlogp, dentropy.as_ref(), 0.0)?,
                }
            }
            if let Some(s) = sync.as_deref_mut() {
                // Every rank skips when one has a non-finite loss, and
                // otherwise sums the gradients before the update.
                if !agreed {
                    agree_finite(s, &mut bad)?;
                }
                if bad.is_none() && acc.is_some() {
                    s.reduce_grads(policy)?;
                }
            }
            let Some((loss, metrics)) = acc else {
                continue;
            };
            let info = match bad {
                Some(l) if l.is_nan() && loss.is_finite() => {
                    opt.skip(&describe(), "a non-finite loss on another rank")?
                }
                Some(l) => opt.skip(&describe(), &format!("loss {l}"))?,
                None => opt.update_synced(policy, &describe, sync.as_deref_mut())?,
            };
            last = Some((loss, metrics, info));
        }
    }
    let Some((loss, metrics, info)) = last else {
        return Err(Error::Other("train_on: empty batch".into()));
    };

    let mut m = metrics;
    let mut loss = loss;
    let lens: Vec<usize> = completions.iter().map(|c| c.token_ids.len()).collect();
    let truncated: Vec<bool> = completions
        .iter()
        .map(|c| c.finish_reason == FinishReason::Length)
        .collect();
    match sync {
        None => {
            let named: Vec<(&str, &[f64])> = names.iter().zip(&r.per_fn).map(|(nm, v)| (*nm, &v[..])).collect();
            m.extend(metrics::reward_metrics(&adv, &named));
            m.extend(metrics::completion_metrics(&lens, &truncated));
        }
        Some(s) => {
            // The loss family: each rank weighted its micro-batches by their
            // share of the global minibatch, so the ranks' values add up to
            // one process's (minima and maxima taken as such).
            let keys: Vec<String> = m.keys().cloned().collect();
            let mut vals: Vec<f64> = m.values().copied().collect();
            vals.push(loss);
            let all = s.gather(&vals)?;
            let world = s.world();
            if all.len() != vals.len() * world {
                return Err(Error::Dist(format!(
                    "the ranks logged different metrics ({} values for {world} ranks of {})",
                    all.len(),
                    vals.len()
                )));
            }
            let per = vals.len();
            let all = &all;
            let col = |i: usize| (0..world).map(move |w| all[w * per + i]);
            for (i, k) in keys.iter().enumerate() {
                let v = if k.ends_with("_min") {
                    col(i).fold(f64::INFINITY, f64::min)
                } else if k.ends_with("_max") {
                    col(i).fold(f64::NEG_INFINITY, f64::max)
                } else {
                    col(i).sum::<f64>()
                };
                m.insert(k.clone(), v);
            }
            loss = col(per - 1).sum::<f64>();
            // Rewards and completions: the global batch, gathered.
            let total = s.gather(&r.total)?;
            let per_fn: Vec<Vec<f64>> = r.per_fn.iter().map(|v| s.gather(v)).collect::<Result<_>>()?;
            let glens = s.gather(&lens.iter().map(|&x| x as f64).collect::<Vec<_>>())?;
            let gtrunc = s.gather(&truncated.iter().map(|&x| f64::from(u8::from(x))).collect::<Vec<_>>())?;
            let gadv = compute_advantages(&total, g, cfg.advantages)?;
            let named: Vec<(&str, &[f64])> = names.iter().zip(&per_fn).map(|(nm, v)| (*nm, &v[..])).collect();
            m.extend(metrics::reward_metrics(&gadv, &named));
            let glens: Vec<usize> = glens.iter().map(|&x| x as usize).collect();
            let gtrunc: Vec<bool> = gtrunc.iter().map(|&x| x > 0.5).collect();
            m.extend(metrics::completion_metrics(&glens, &gtrunc));
        }
    }
    m.insert("loss".into(), loss);
    m.insert("grad_norm".into(), info.grad_norm);
    m.insert("learning_rate".into(), info.lr);
    m.insert("update_skipped".into(), if info.skipped { 1.0 } else { 0.0 });
    m.insert("timing/generate_s".into(), r.generate_s);
    m.insert("timing/rollout_kv_pools".into(), r.engine.pools_allocated as f64);
    m.insert("timing/rollout_graphs_captured".into(), r.engine.graphs_captured as f64);
    m.insert("timing/rollout_graph_steps".into(), r.engine.graph_steps as f64);
    Ok(m)
}

/// A micro-batch: completions (indices, in training order) and the padded
/// lengths of its forward.
struct Micro {
    idx: Vec<usize>,
    /// Longest prompt + completion.
    t: usize,
    /// Longest completion (at least 1).
    tc: usize,
}

/// Splits the micro-batches `mb` of one minibatch until there are `want`
/// (ranks in lockstep run the same number): the one with the most
/// completions is cut in two halves (in its order: by length), each
/// padded to its own longest. The gradient they accumulate is the same.
fn split_micro_batches(mb: &mut Vec<Micro>, want: usize, lens: &[usize], clens: &[usize]) -> Result<()> {
    while mb.len() < want {
        let Some((at, _)) = mb
            .iter()
            .enumerate()
            .filter(|(_, m)| m.idx.len() > 1)
            .max_by_key(|(i, m)| (m.idx.len(), usize::MAX - i))
        else {
            return Err(Error::Other(format!(
                "{} completions cannot make {want} micro-batches",
                mb.iter().map(|m| m.idx.len()).sum::<usize>()
            )));
        };
        let mut idx = std::mem::take(&mut mb[at].idx);
        let tail = idx.split_off(idx.len() / 2);
        let micro = |idx: Vec<usize>| {
            let t = idx.iter().map(|&i| lens[i]).max().unwrap_or(1).max(1);
            let tc = idx.iter().map(|&i| clens[i]).max().unwrap_or(1).max(1);
            Micro { idx, t, tc }
        };
        mb[at] = micro(idx);
        mb.insert(at + 1, micro(tail));
    }
    Ok(())
}

/// A micro-batch's tensors on the host.
struct MicroData {
    ids: Vec<u32>,
    rows: Vec<u32>,
    targets: Vec<u32>,
    mask: Vec<bool>,
    adv: Vec<f64>,
}

/// Splits the completions `range` (whole lengths `lens`, completion lengths
/// `clens`) into micro-batches of at most `budget` tokens each (rows x padded length; a single longer completion is a
/// micro-batch of its own), grouping completions of similar length so that
/// little padding is computed. `budget` 0: the whole range, in order.
fn micro_batches(range: std::ops::Range<usize>, lens: &[usize], clens: &[usize], budget: usize) -> Vec<Micro> {
    let micro = |idx: Vec<usize>| {
        let t = idx.iter().map(|&i| lens[i]).max().unwrap_or(1).max(1);
        let tc = idx.iter().map(|&i| clens[i]).max().unwrap_or(1).max(1);
        Micro { idx, t, tc }
    };
    let mut out = Vec::new();
    if budget == 0 {
        out.push(micro(range.collect()));
    } else {
        let mut order: Vec<usize> = range.collect();
        order.sort_by_key(|&i| (lens[i], i));
        let mut cur: Vec<usize> = Vec::new();
        for i in order {
            // Sorted by length: `i` is the longest so far.
            if !cur.is_empty() && (cur.len() + 1) * lens[i] > budget {
                out.push(micro(std::mem::take(&mut cur)));
            }
            cur.push(i);
        }
        if !cur.is_empty() {
            out.push(micro(cur));
        }
    }
    out
}

/// Adds a micro-batch's (already scaled) loss and its metrics, weighted by
/// its share of the minibatch's completions (minima and maxima kept as such).
fn merge_metrics(acc: Option<(f64, Metrics)>, loss: f64, m: Metrics, w: f64) -> (f64, Metrics) {
    match acc {
        None => (
            loss,
            m.into_iter()
                .map(|(k, v)| {
                    let v = if k.ends_with("_min") || k.ends_with("_max") {
                        v
                    } else {
                        v * w
                    };
                    (k, v)
                })
                .collect(),
        ),
        Some((l, mut a)) => {
            for (k, v) in m {
                let e = a.entry(k.clone()).or_insert(if k.ends_with("_min") {
                    f64::INFINITY
                } else if k.ends_with("_max") {
                    f64::NEG_INFINITY
                } else {
                    0.0
                });
                if k.ends_with("_min") {
                    *e = e.min(v);
                } else if k.ends_with("_max") {
                    *e = e.max(v);
                } else {
                    *e += v * w;
                }
            }
            (l + loss, a)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Splitting micro-batches to a count keeps every completion once, in
    /// the same order, each part padded to its own longest; a minibatch
    /// with fewer completions than the count is an error.
    #[test]
    fn micro_batches_split_to_the_count_of_the_busiest_rank() {
        let lens = [5, 9, 7, 12, 6];
        let clens = [2, 6, 4, 8, 3];
        let mut mb = micro_batches(0..5, &lens, &clens, 0);
        assert_eq!(mb.len(), 1);
        split_micro_batches(&mut mb, 3, &lens, &clens).unwrap();
        let idx: Vec<Vec<usize>> = mb.iter().map(|m| m.idx.clone()).collect();
        assert_eq!(idx, vec![vec![0, 1], vec![2], vec![3, 4]]);
        let t: Vec<(usize, usize)> = mb.iter().map(|m| (m.t, m.tc)).collect();
        assert_eq!(t, vec![(9, 6), (7, 4), (12, 8)]);
        // Already there: unchanged.
        split_micro_batches(&mut mb, 2, &lens, &clens).unwrap();
        assert_eq!(mb.len(), 3);
        split_micro_batches(&mut mb, 5, &lens, &clens).unwrap();
        assert!(mb.iter().all(|m| m.idx.len() == 1));
        let e = split_micro_batches(&mut mb, 6, &lens, &clens).unwrap_err().to_string();
        assert!(e.contains("5 completions cannot make 6 micro-batches"), "{e}");
    }
}
