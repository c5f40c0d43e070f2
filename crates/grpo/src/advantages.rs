//! Advantages relative to a group of completions of the same prompt.
//!
//! Rewards come in `[num_groups * group_size]`, the completions of one prompt
//! consecutive (TRL's layout). A reward that is NaN marks a completion that
//! could not be scored (an unparsable gold answer, a sandbox failure): it is
//! left out of its group's mean and standard deviation and gets advantage 0.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The epsilon TRL adds to the standard deviation before dividing.
pub const STD_EPS: f64 = 1e-4;

/// How rewards become advantages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AdvantageEstimator {
    /// GRPO (DeepSeekMath): `(r - group mean) / (group std + 1e-4)`, TRL's
    /// `scale_rewards="group"` (Bessel-corrected std).
    #[default]
    Group,
    /// `(r - group mean) / (batch std + 1e-4)`: TRL's `scale_rewards="batch"`.
    Batch,
    /// `r - group mean`, no scaling: Dr. GRPO, TRL's `scale_rewards="none"`.
    None,
    /// RLOO: `r - mean of the other completions of the group`
    /// (= `G / (G - 1) * (r - group mean)` for G valid completions).
    Rloo,
    /// REINFORCE++-baseline (OpenRLHF): `r - group mean`, then divided by the
    /// standard deviation of those differences over the whole batch (+1e-4).
    ReinforcePlusPlusBaseline,
}

/// Advantages and the statistics TRL logs with them.
#[derive(Debug, Clone, PartialEq)]
pub struct Advantages {
    /// One advantage per completion (0 for unscored ones).
    pub values: Vec<f64>,
    /// Each completion's group mean reward (NaN for a group with no valid reward).
    pub group_mean: Vec<f64>,
    /// The standard deviation each completion was scaled by (group or batch),
    /// before the epsilon; for `None`/`Rloo`, the group std (reported only).
    pub std: Vec<f64>,
    /// Fraction of groups whose valid rewards all agree (zero std): such
    /// groups give no learning signal.
    pub frac_reward_zero_std: f64,
    /// Mean reward over valid completions (TRL's `reward`).
    pub reward_mean: f64,
    /// Mean of `std` over valid completions (TRL's `reward_std`).
    pub reward_std: f64,
}

/// Mean and Bessel-corrected std of the finite values (NaN mean if none; std 0 if fewer than 2).
fn stats(xs: impl Iterator<Item = f64> + Clone) -> (f64, f64, usize) {
    let valid = xs.filter(|x| x.is_finite());
    let n = valid.clone().count();
    if n == 0 {
        return (f64::NAN, 0.0, 0);
    }
    let mean = valid.clone().sum::<f64>() / n as f64;
    let std = if n < 2 {
        0.0
    } else {
        (valid.map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1) as f64).sqrt()
    };
    (mean, std, n)
}

/// Computes advantages for `rewards` in groups of `group_size`.
pub fn compute_advantages(rewards: &[f64], group_size: usize, est: AdvantageEstimator) -> Result<Advantages> {
    if group_size == 0 || !rewards.len().is_multiple_of(group_size) {
        return Err(Error::Config(format!(
            "{} rewards do not split into groups of {group_size}",
            rewards.len()
        )));
    }
    if rewards.iter().any(|r| r.is_infinite()) {
        return Err(Error::Config(
            "a reward is infinite (use NaN to mark an unscored completion)".into(),
        ));
    }
    let n = rewards.len();
    let groups = n / group_size.max(1);
    let mut group_mean = vec![f64::NAN; n];
    let mut group_std = vec![0.0; n];
    let mut group_valid = vec![0usize; n];
    let mut zero_std_groups = 0usize;
    for g in 0..groups {
        let r = &rewards[g * group_size..(g + 1) * group_size];
        let (mean, std, valid) = stats(r.iter().copied());
        // TRL tests isclose(std, 0) with torch's defaults (atol 1e-8).
        if std.abs() <= 1e-8 {
            zero_std_groups += 1;
        }
        for i in g * group_size..(g + 1) * group_size {
            group_mean[i] = mean;
            group_std[i] = std;
            group_valid[i] = valid;
        }
    }
    let centred: Vec<f64> = (0..n)
        .map(|i| {
            if rewards[i].is_finite() {
                rewards[i] - group_mean[i]
            } else {
                f64::NAN
            }
        })
        .collect();
    let (values, std): (Vec<f64>, Vec<f64>) = match est {
        AdvantageEstimator::Group => (
            (0..n).map(|i| centred[i] / (group_std[i] + STD_EPS)).collect(),
            group_std.clone(),
        ),
        AdvantageEstimator::Batch => {
            let (_, batch_std, _) = stats(rewards.iter().copied());
            (
                centred.iter().map(|c| c / (batch_std + STD_EPS)).collect(),
                vec![batch_std; n],
            )
        }
        AdvantageEstimator::None => (centred.clone(), group_std.clone()),
        AdvantageEstimator::Rloo => (
            (0..n)
                .map(|i| {
                    let g = group_valid[i] as f64;
                    if g < 2.0 {
                        0.0
                    } else {
                        centred[i] * g / (g - 1.0)
                    }
                })
                .collect(),
            group_std.clone(),
        ),
        AdvantageEstimator::ReinforcePlusPlusBaseline => {
            let (_, s, _) = stats(centred.iter().copied());
            (centred.iter().map(|c| c / (s + STD_EPS)).collect(), vec![s; n])
        }
    };
    let values: Vec<f64> = values
        .into_iter()
        .map(|a| if a.is_finite() { a } else { 0.0 })
        .collect();
    let valid: Vec<usize> = (0..n).filter(|&i| rewards[i].is_finite()).collect();
    let mean_over = |xs: &[f64]| {
        if valid.is_empty() {
            f64::NAN
        } else {
            valid.iter().map(|&i| xs[i]).sum::<f64>() / valid.len() as f64
        }
    };
    Ok(Advantages {
        reward_mean: mean_over(rewards),
        reward_std: mean_over(&std),
        values,
        group_mean,
        std,
        frac_reward_zero_std: if groups == 0 {
            0.0
        } else {
            zero_std_groups as f64 / groups as f64
        },
    })
}
