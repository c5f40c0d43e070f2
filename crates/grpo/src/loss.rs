//! The GRPO loss family and its gradient with respect to every per-token
//! log-probability of the policy, following TRL's `GRPOTrainer._compute_loss`.
//!
//! Per-token buffers are `[B, T]` row-major: B completions padded to T tokens,
//! `mask` true on completion tokens. With `r = exp(logp - old_logp)` (token
//! level) or `r_i = exp(masked mean of (logp - old_logp) over sequence i)`
//! (GSPO's sequence level), `A` the completion's advantage:
//!
//! ```text
//! grpo, bnpo, dr_grpo, dapo:  l_t = -min(min(r, delta) A, clip(r, 1 - eps_low, 1 + eps_high) A)
//! cispo:                      l_t = -sg(min(r, eps_high)) A logp_t          (sg: no gradient)
//! then                        l_t *= entropy_mask_t ;  l_t += beta KL_t
//! ```
//!
//! and the loss aggregates `l_t` over completion tokens:
//!
//! | loss_type | aggregation |
//! |---|---|
//! | grpo | mean over tokens of each sequence, then over sequences (DeepSeekMath) |
//! | bnpo | mean over all tokens of the batch |
//! | dr_grpo | sum / (B x max_completion_length) (Dr. GRPO) |
//! | dapo, cispo | sum / num_items_in_batch (tokens of the whole generation batch) |

use serde::{Deserialize, Serialize};

use crate::error::{check_len, Error, Result};
use crate::metrics::Metrics;

/// How per-token losses are aggregated (see the module table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// Sequence mean, then batch mean (DeepSeekMath; what R1 used).
    #[default]
    Grpo,
    /// Token mean over the batch.
    Bnpo,
    /// Sum over tokens / (B x max completion length).
    DrGrpo,
    /// Token-level over the whole generation batch (DAPO).
    Dapo,
    /// Clipped importance-sampling weights on the log-prob (MiniMax-M1).
    Cispo,
}

/// Which estimator of KL(policy || reference) is penalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    /// `logp - ref` (unbiased, high variance).
    K1,
    /// `(logp - ref)^2 / 2`.
    K2,
    /// `exp(ref - logp) - (ref - logp) - 1` (unbiased, >= 0; DeepSeekMath and TRL).
    #[default]
    K3,
}

/// The level at which importance ratios are taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ImportanceSampling {
    /// One ratio per token (GRPO).
    #[default]
    Token,
    /// One ratio per sequence from the mean log-ratio (GSPO).
    Sequence,
}

/// Loss settings. Defaults: TRL's `GRPOConfig` unless noted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossConfig {
    /// Aggregation; default `grpo` (DeepSeekMath, the R1 report).
    pub loss_type: LossType,
    /// Lower clip range `eps_low` (TRL `epsilon`, default 0.2).
    pub epsilon: f64,
    /// Upper clip range (DAPO's clip-higher); `None` means `epsilon`. For
    /// cispo it is the cap on the ratio (TRL uses 5.0 there).
    pub epsilon_high: Option<f64>,
    /// Two-sided clipping: cap on the unclipped ratio (TRL `delta`, off).
    pub delta: Option<f64>,
    /// KL coefficient; 0 skips the reference. Default 0.001 (the R1 report).
    pub beta: f64,
    /// KL estimator (default k3, as DeepSeekMath and TRL).
    pub kl_estimator: KlEstimator,
    /// Token (GRPO) or sequence (GSPO) importance ratios.
    pub importance_sampling_level: ImportanceSampling,
    /// The rollout's maximum completion length (used by `dr_grpo`).
    pub max_completion_length: usize,
    /// Coefficient of the entropy bonus (subtracted from the loss); default 0.
    pub entropy_coef: f64,
    /// Train only on the tokens whose entropy is in this top fraction
    /// (TRL `top_entropy_quantile`); 1.0 keeps all tokens.
    pub top_entropy_quantile: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig {
            loss_type: LossType::Grpo,
            epsilon: 0.2,
            epsilon_high: None,
            delta: None,
            beta: 0.001,
            kl_estimator: KlEstimator::K3,
            importance_sampling_level: ImportanceSampling::Token,
            max_completion_length: 256,
            entropy_coef: 0.0,
            top_entropy_quantile: 1.0,
        }
    }
}

impl LossConfig {
    /// The upper clip bound in use.
    pub fn eps_high(&self) -> f64 {
        self.epsilon_high.unwrap_or(self.epsilon)
    }

    /// Checks ranges once, so the loss itself never meets a bad value.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if !(self.epsilon >= 0.0 && self.epsilon.is_finite()) {
            return bad(format!("epsilon must be >= 0, got {}", self.epsilon));
        }
        if !(self.eps_high() >= 0.0 && self.eps_high().is_finite()) {
            return bad(format!("epsilon_high must be >= 0, got {}", self.eps_high()));
        }
        if let Some(d) = self.delta {
            if d.is_nan() || d <= 1.0 + self.eps_high() {
                return bad(format!("delta must exceed 1 + epsilon_high (TRL requires it), got {d}"));
            }
        }
        if !(self.beta >= 0.0 && self.beta.is_finite()) {
            return bad(format!("beta must be >= 0, got {}", self.beta));
        }
        if !self.entropy_coef.is_finite() {
            return bad("entropy_coef must be finite".into());
        }
        if !(self.top_entropy_quantile > 0.0 && self.top_entropy_quantile <= 1.0) {
            return bad(format!(
                "top_entropy_quantile must be in (0, 1], got {}",
                self.top_entropy_quantile
            ));
        }
        if self.loss_type == LossType::DrGrpo && self.max_completion_length == 0 {
            return bad("dr_grpo needs max_completion_length > 0".into());
        }
        Ok(())
    }
}

/// The per-token inputs of one loss computation.
#[derive(Debug, Clone, Copy)]
pub struct LossInputs<'a> {
    /// Completions (B).
    pub batch: usize,
    /// Padded completion length (T).
    pub seq: usize,
    /// `[B, T]` log-probs of the sampled tokens under the current policy.
    pub logp: &'a [f64],
    /// `[B, T]` log-probs under the policy that sampled; `None` = `logp`
    /// detached (the first inner iteration), so every ratio is 1.
    pub old_logp: Option<&'a [f64]>,
    /// `[B, T]` log-probs under the reference; needed when `beta > 0`.
    pub ref_logp: Option<&'a [f64]>,
    /// `[B, T]` true on completion tokens.
    pub mask: &'a [bool],
    /// `[B]` advantages.
    pub advantages: &'a [f64],
    /// `[B, T]` per-token entropies; needed for the entropy bonus and mask,
    /// and reported as the `entropy` metric when given.
    pub entropy: Option<&'a [f64]>,
    /// DAPO / CISPO normaliser: completion tokens in the whole generation
    /// batch (TRL `num_items_in_batch`); `None` = this batch's token count.
    pub num_items_in_batch: Option<f64>,
}

/// The loss, its gradients and TRL's metrics.
#[derive(Debug, Clone)]
pub struct LossOutput {
    /// The scalar loss.
    pub loss: f64,
    /// `[B, T]` d loss / d logp (0 on padding).
    pub dlogp: Vec<f64>,
    /// `[B, T]` d loss / d entropy (non-zero only with an entropy bonus).
    pub dentropy: Vec<f64>,
    /// `kl`, `entropy`, `clip_ratio/*` or `cispo_clip_ratio`, under TRL's names.
    pub metrics: Metrics,
}

/// `torch.quantile(x, q)` with linear interpolation, on a non-empty slice.
fn quantile(mut xs: Vec<f64>, q: f64) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    let pos = q * (xs.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    xs[lo] + (xs[hi] - xs[lo]) * (pos - lo as f64)
}

/// The KL estimate of one token.
pub(crate) fn kl_value(est: KlEstimator, logp: f64, refp: f64) -> f64 {
    kl(est, logp, refp).0
}

fn kl(est: KlEstimator, logp: f64, refp: f64) -> (f64, f64) {
    let d = refp - logp;
    match est {
        KlEstimator::K1 => (-d, 1.0),
        KlEstimator::K2 => (0.5 * d * d, -d),
        KlEstimator::K3 => (d.exp() - d - 1.0, 1.0 - d.exp()),
    }
}

/// Gradient of `-min(a, b)` split as torch does: ties share it half and half.
fn neg_min_grad(a: f64, b: f64) -> (f64, f64) {
    if a < b {
        (-1.0, 0.0)
    } else if b < a {
        (0.0, -1.0)
    } else {
        (-0.5, -0.5)
    }
}

/// 1 where `lo <= x <= hi` (torch's clamp backward), else 0.
fn clamp_grad(x: f64, lo: f64, hi: f64) -> f64 {
    if x >= lo && x <= hi {
        1.0
    } else {
        0.0
    }
}

/// The loss of `cfg` on `inp`, with d loss / d logp and the metrics.
pub fn grpo_loss(inp: &LossInputs<'_>, cfg: &LossConfig) -> Result<LossOutput> {
    const OP: &str = "grpo_loss";
    cfg.validate()?;
    let (b, t) = (inp.batch, inp.seq);
    let n = b * t;
    check_len(OP, "logp", inp.logp.len(), n)?;
    check_len(OP, "mask", inp.mask.len(), n)?;
    check_len(OP, "advantages", inp.advantages.len(), b)?;
    if let Some(o) = inp.old_logp {
        check_len(OP, "old_logp", o.len(), n)?;
    }
    if let Some(r) = inp.ref_logp {
        check_len(OP, "ref_logp", r.len(), n)?;
    }
    if let Some(e) = inp.entropy {
        check_len(OP, "entropy", e.len(), n)?;
    }
    let refp = match (cfg.beta > 0.0, inp.ref_logp) {
        (true, None) => {
            return Err(Error::Missing {
                op: OP,
                what: "ref_logp",
                why: "beta > 0",
            })
        }
        (true, Some(r)) => Some(r),
        (false, _) => None,
    };
    let needs_entropy = cfg.entropy_coef != 0.0 || cfg.top_entropy_quantile < 1.0;
    if needs_entropy && inp.entropy.is_none() {
        return Err(Error::Missing {
            op: OP,
            what: "entropy",
            why: "entropy_coef != 0 or top_entropy_quantile < 1",
        });
    }
    let m: Vec<f64> = inp.mask.iter().map(|&x| if x { 1.0 } else { 0.0 }).collect();
    let lens: Vec<f64> = (0..b).map(|i| m[i * t..(i + 1) * t].iter().sum()).collect();
    let total: f64 = lens.iter().sum();
    let old = inp.old_logp.unwrap_or(inp.logp);

    // Entropy mask: keep tokens at or above the (1 - q) quantile of the
    // completion tokens' entropies.
    let emask: Vec<f64> = match (cfg.top_entropy_quantile < 1.0, inp.entropy) {
        (true, Some(h)) => {
            let vals: Vec<f64> = (0..n).filter(|&i| inp.mask[i]).map(|i| h[i]).collect();
            if vals.is_empty() {
                vec![0.0; n]
            } else {
                let thr = quantile(vals, 1.0 - cfg.top_entropy_quantile);
                (0..n)
                    .map(|i| if inp.mask[i] && h[i] * m[i] >= thr { 1.0 } else { 0.0 })
                    .collect()
            }
        }
        _ => vec![1.0; n],
    };

    // Aggregation weight of each token.
    let w: Vec<f64> = match cfg.loss_type {
        LossType::Grpo => (0..n)
            .map(|i| m[i] / lens[i / t.max(1)].max(1.0) / b.max(1) as f64)
            .collect(),
        LossType::Bnpo => (0..n).map(|i| m[i] / total.max(1.0)).collect(),
        LossType::DrGrpo => (0..n)
            .map(|i| m[i] / (b.max(1) * cfg.max_completion_length) as f64)
            .collect(),
        LossType::Dapo | LossType::Cispo => {
            let norm = inp.num_items_in_batch.unwrap_or(total).max(1.0);
            (0..n).map(|i| m[i] / norm).collect()
        }
    };

    // Importance ratios: per token, or one per sequence broadcast over its tokens.
    let log_iw: Vec<f64> = match cfg.importance_sampling_level {
        ImportanceSampling::Token => (0..n).map(|i| inp.logp[i] - old[i]).collect(),
        ImportanceSampling::Sequence => {
            let mut v = vec![0.0; n];
            for row in 0..b {
                let s: f64 = (row * t..(row + 1) * t).map(|i| (inp.logp[i] - old[i]) * m[i]).sum();
                let l = s / lens[row].max(1.0);
                v[row * t..(row + 1) * t].fill(l);
            }
            v
        }
    };
    let coef1: Vec<f64> = log_iw.iter().map(|x| x.exp()).collect();
    let (lo, hi) = (1.0 - cfg.epsilon, 1.0 + cfg.eps_high());

    // Per-token loss, and its derivative with respect to the ratio (`dr`,
    // policy part) and to logp directly (`dl`, cispo and KL).
    let mut loss = 0.0;
    let mut dr = vec![0.0; n];
    let mut dl = vec![0.0; n];
    let mut ratio_used = coef1.clone(); // the ratio after the delta cap, for the metrics
    for i in 0..n {
        let a = inp.advantages[i / t.max(1)];
        let (pl, dpr, dpl) = if cfg.loss_type == LossType::Cispo {
            let c = coef1[i].min(cfg.eps_high());
            (-c * a * inp.logp[i], 0.0, -c * a)
        } else {
            let c2 = coef1[i].clamp(lo, hi);
            let (c1, dc1) = match cfg.delta {
                Some(d) => (coef1[i].min(d), clamp_grad(coef1[i], f64::NEG_INFINITY, d)),
                None => (coef1[i], 1.0),
            };
            ratio_used[i] = c1;
            let (l1, l2) = (c1 * a, c2 * a);
            let (g1, g2) = neg_min_grad(l1, l2);
            let dc2 = clamp_grad(coef1[i], lo, hi);
            (-(l1.min(l2)), (g1 * dc1 + g2 * dc2) * a, 0.0)
        };
        let (mut ptl, dpr, mut dpl) = (pl * emask[i], dpr * emask[i], dpl * emask[i]);
        if let Some(r) = refp {
            let (k, dk) = kl(cfg.kl_estimator, inp.logp[i], r[i]);
            ptl += cfg.beta * k;
            dpl += cfg.beta * dk;
        }
        loss += w[i] * ptl;
        dr[i] = w[i] * dpr;
        dl[i] = w[i] * dpl;
    }

    // Chain the ratio part through d ratio / d logp.
    let mut dlogp = dl;
    match cfg.importance_sampling_level {
        ImportanceSampling::Token => {
            for i in 0..n {
                dlogp[i] += dr[i] * coef1[i];
            }
        }
        ImportanceSampling::Sequence => {
            for row in 0..b {
                let rows = row * t..(row + 1) * t;
                if t == 0 {
                    continue;
                }
                let g: f64 = dr[rows.clone()].iter().sum();
                let c = coef1[row * t];
                for i in rows {
                    dlogp[i] += g * c * m[i] / lens[row].max(1.0);
                }
            }
        }
    }

    let mut dentropy = vec![0.0; n];
    if let (true, Some(h)) = (cfg.entropy_coef != 0.0, inp.entropy) {
        for i in 0..n {
            loss -= cfg.entropy_coef * w[i] * h[i];
            dentropy[i] = -cfg.entropy_coef * w[i];
        }
    }
    for (d, &keep) in dlogp.iter_mut().zip(inp.mask) {
        if !keep {
            *d = 0.0;
        }
    }

    let metrics = crate::metrics::loss_metrics(inp, cfg, &m, &lens, &ratio_used, refp);
    Ok(LossOutput {
        loss,
        dlogp,
        dentropy,
        metrics,
    })
}
