//! AdamW over the flat parameter buffer with warmup and a cosine or constant
//! schedule, global-norm clipping, and the non-finite guard. The moments
//! and the update live on the policy's device ([`aha_moe_model::Moments`],
//! [`Policy::optimizer_step`]); this type keeps the schedule, the step
//! count and the guard.

use aha_moe_model::{Moments, Policy};
use aha_tensor::cpu::AdamW;
use aha_tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Learning-rate schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Constant after warmup (the R1 report's RL runs).
    Constant,
    /// Cosine decay to 10% of the peak.
    Cosine,
}

/// Optimizer settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warmup steps.
    pub warmup_steps: usize,
    /// Steps in the run (for the cosine).
    pub total_steps: usize,
    /// Schedule after warmup.
    pub schedule: Schedule,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Global gradient-norm clip (TRL's default 1.0).
    pub max_grad_norm: f64,
    /// Consecutive non-finite steps tolerated before the run aborts.
    pub max_bad_steps: usize,
}

/// Adam moments, step counter and the guard's state.
#[derive(Debug)]
pub struct Optimizer {
    /// Settings.
    pub cfg: OptimConfig,
    /// The moments, on the policy's device (created by the first update).
    moments: Option<Moments>,
    /// Updates applied.
    pub step: u64,
    bad_in_a_row: usize,
    notes: Vec<String>,
}

/// What one update did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepInfo {
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f64,
    /// True when the update was skipped (non-finite gradient).
    pub skipped: bool,
}

impl Optimizer {
    /// The backward of a step's last micro-batch in one process: with the
    /// optimizer offloaded to the host, each layer's gradients are copied
    /// there as soon as the backward completes them
    /// (`Policy::backward_offload_streamed`), overlapping the rest of the
    /// backward; otherwise a plain backward.
    pub fn backward_last(
        &mut self,
        policy: &mut Policy,
        fwd: aha_moe_model::Forward,
        scores: &aha_moe_model::Scores,
        dlogp: &Tensor,
        dentropy: Option<&Tensor>,
    ) -> Result<()> {
        if policy.offload_optimizer().is_none() {
            return Ok(policy.backward(fwd, scores, dlogp, dentropy, 0.0)?);
        }
        let moments = match &mut self.moments {
            Some(m) => m,
            None => self.moments.insert(policy.new_moments()?),
        };
        policy.backward_offload_streamed(fwd, scores, dlogp, dentropy, 0.0, moments)?;
        Ok(())
    }

    /// A fresh optimizer (zero moments, created on the policy's device by
    /// the first update).
    pub fn new(cfg: OptimConfig) -> Optimizer {
        Optimizer {
            cfg,
            moments: None,
            step: 0,
            bad_in_a_row: 0,
            notes: Vec::new(),
        }
    }

    /// The moments (host copies; zeros before the first update) and
    /// counters, for a checkpoint: (m, v, step, bad steps in a row).
    pub fn state(&self, policy: &Policy) -> Result<(Vec<f32>, Vec<f32>, u64, usize)> {
        let (m, v) = match &self.moments {
            Some(x) => x.to_host(policy)?,
            None => (vec![0.0; policy.num_params()], vec![0.0; policy.num_params()]),
        };
        Ok((m, v, self.step, self.bad_in_a_row))
    }

    /// Restores what [`Optimizer::state`] returned, onto `policy`'s device.
    pub fn restore(&mut self, policy: &Policy, m: Vec<f32>, v: Vec<f32>, step: u64, bad_in_a_row: usize) -> Result<()> {
        self.moments = Some(policy.moments_from_host(m, v)?);
        (self.step, self.bad_in_a_row) = (step, bad_in_a_row);
        Ok(())
    }

    /// Restores the step count and the guard alone (the moments live
    /// elsewhere: a ZeRO-1 shard, [`crate::dp::DataParallel`]).
    pub fn restore_counters(&mut self, step: u64, bad_in_a_row: usize) {
        (self.step, self.bad_in_a_row) = (step, bad_in_a_row);
    }

    /// Consecutive skipped updates so far.
    pub fn bad_in_a_row(&self) -> usize {
        self.bad_in_a_row
    }

    /// The learning rate at update `step` (0-based).
    pub fn lr_at(&self, step: u64) -> f64 {
        let c = &self.cfg;
        let s = step as f64;
        if (step as usize) < c.warmup_steps {
            return c.lr * (s + 1.0) / c.warmup_steps as f64;
        }
        match c.schedule {
            Schedule::Constant => c.lr,
            Schedule::Cosine => {
                let span = (c.total_steps.saturating_sub(c.warmup_steps)).max(1) as f64;
                let x = ((s - c.warmup_steps as f64) / span).clamp(0.0, 1.0);
                c.lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * x).cos()))
            }
        }
    }

    /// Clips the policy's gradients, then applies AdamW to the trainable
    /// parameters. A non-finite gradient norm skips the update; too many in
    /// a row is an error.
    pub fn update(&mut self, policy: &mut Policy) -> Result<StepInfo> {
        self.update_batch(policy, &String::new)
    }

    /// Takes the notes of skipped updates since the last call ("step 12,
    /// minibatch 2 (completions 8..16): gradient norm NaN"), for the run's log.
    pub fn take_notes(&mut self) -> Vec<String> {
        std::mem::take(&mut self.notes)
    }

    /// Records a skipped update of `batch` (a description of the batch for
    /// the log) for reason `why`; an error once more than `max_bad_steps`
    /// updates in a row were skipped.
    pub fn skip(&mut self, batch: &str, why: &str) -> Result<StepInfo> {
        self.bad_in_a_row += 1;
        let at = if batch.is_empty() {
            format!("update {}", self.step + 1)
        } else {
            format!("update {} ({batch})", self.step + 1)
        };
        self.notes.push(format!("skipped {at}: {why}"));
        if self.bad_in_a_row > self.cfg.max_bad_steps {
            return Err(Error::Diverged {
                skipped: self.bad_in_a_row,
                last: format!("{at}: {why}"),
            });
        }
        Ok(StepInfo {
            grad_norm: f64::NAN,
            lr: self.lr_at(self.step),
            skipped: true,
        })
    }

    /// [`Optimizer::update`] naming the batch in the note a skipped update
    /// leaves; `batch` describes it and is only called for a skip.
    pub fn update_batch(&mut self, policy: &mut Policy, batch: &dyn Fn() -> String) -> Result<StepInfo> {
        self.update_synced(policy, batch, None)
    }

    /// [`Optimizer::update_batch`] for one rank of a data-parallel run:
    /// when `sync` shards the optimizer state (ZeRO-1,
    /// [`crate::rl::StepSync::sharded_update`]) the update runs there, on
    /// this rank's shard, and this optimizer keeps only the schedule, the
    /// step count and the guard; otherwise on the whole buffer here.
    pub fn update_synced<'s>(
        &mut self,
        policy: &mut Policy,
        batch: &dyn Fn() -> String,
        sync: Option<&mut (dyn crate::rl::StepSync + 's)>,
    ) -> Result<StepInfo> {
        let lr = self.lr_at(self.step);
        let h = AdamW {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: self.cfg.weight_decay,
        };
        let sharded = match sync {
            Some(s) => s.sharded_update(policy, &h, self.step + 1, self.cfg.max_grad_norm)?,
            None => None,
        };
        let grad_norm = match sharded {
            Some(norm) => norm,
            None => {
                let moments = match &mut self.moments {
                    Some(m) => m,
                    None => self.moments.insert(policy.new_moments()?),
                };
                policy.optimizer_step(moments, &h, self.step + 1, self.cfg.max_grad_norm)?
            }
        };
        if !grad_norm.is_finite() {
            let info = self.skip(&batch(), &format!("gradient norm {grad_norm}"))?;
            return Ok(StepInfo { grad_norm, ..info });
        }
        self.bad_in_a_row = 0;
        self.step += 1;
        Ok(StepInfo {
            grad_norm,
            lr,
            skipped: false,
        })
    }
}

/// One supervised step on (prompt, completion) pairs: mean next-token
/// negative log-likelihood over completion tokens only (only those rows go
/// through the lm head). Returns the loss.
pub fn sft_step(
    policy: &mut Policy,
    opt: &mut Optimizer,
    batch: &[(Vec<u32>, Vec<u32>)],
    pad: u32,
) -> Result<(f64, StepInfo)> {
    sft_step_synced(policy, opt, batch, pad, None)
}

/// [`sft_step`] for one rank of a data-parallel run: `batch` is this rank's
/// share; the loss is divided by the target tokens of every rank, the
/// gradients summed over the ranks before the update, and the returned
/// loss is the global one (non-finite anywhere: every rank skips).
pub fn sft_step_synced(
    policy: &mut Policy,
    opt: &mut Optimizer,
    batch: &[(Vec<u32>, Vec<u32>)],
    pad: u32,
    mut sync: Option<&mut dyn crate::rl::StepSync>,
) -> Result<(f64, StepInfo)> {
    let t = batch.iter().map(|(p, c)| p.len() + c.len()).max().unwrap_or(0);
    let b = batch.len();
    if b == 0 || t < 2 {
        return Err(Error::Other("empty SFT batch".into()));
    }
    let mut ids = vec![pad; b * t];
    let (mut rows, mut targets) = (Vec::new(), Vec::new());
    for (r, (p, c)) in batch.iter().enumerate() {
        if p.is_empty() {
            return Err(Error::Other(format!("SFT batch row {r}: empty prompt")));
        }
        let row = &mut ids[r * t..(r + 1) * t];
        row[..p.len()].copy_from_slice(p);
        row[p.len()..p.len() + c.len()].copy_from_slice(c);
        for (j, &tokid) in c.iter().enumerate() {
            rows.push((r * t + p.len() - 1 + j) as u32);
            targets.push(tokid);
        }
    }
    let count = rows.len();
    // The target tokens of the whole (global) batch.
    let total = match sync.as_deref_mut() {
        Some(s) => {
            let mut c = [count as f64];
            s.sum(&mut c)?;
            c[0]
        }
        None => count as f64,
    };
    let describe = || format!("{b} sequences, {count} target tokens");
    // LoRA dropout in the training forward only (the backward draws the
    // same masks).
    policy.set_lora_dropout(Some(aha_moe_model::lora::dropout_seed(&ids, 0)));
    let fwd = policy.forward(&ids, b, t);
    policy.set_lora_dropout(None);
    let fwd = fwd?;
    let scores = policy.score(&fwd, &rows, &targets, 1.0)?;
    let logp = scores.logp.to_vec::<f32>()?;
    let loss = -logp.iter().map(|&l| l as f64).sum::<f64>() / total.max(1.0);
    let loss = match sync.as_deref_mut() {
        Some(s) => {
            let mut l = [loss];
            s.sum(&mut l)?;
            l[0]
        }
        None => loss,
    };
    if !loss.is_finite() {
        let info = opt.skip(&describe(), &format!("loss {loss}"))?;
        return Ok((loss, info));
    }
    let scale = -1.0 / total.max(1.0) as f32;
    let dlogp = Tensor::from_vec(vec![scale; count], count, policy.device())?;
    policy.zero_grad()?;
    match sync.as_deref_mut() {
        Some(s) => {
            // The sum over the ranks may start during the backward.
            crate::rl::backward_synced(policy, fwd, &scores, &dlogp, None, s)?;
            s.reduce_grads(policy)?;
        }
        None => opt.backward_last(policy, fwd, &scores, &dlogp, None)?,
    }
    let info = opt.update_synced(policy, &describe, sync)?;
    Ok((loss, info))
}
