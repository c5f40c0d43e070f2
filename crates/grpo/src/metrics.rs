//! Training metrics under TRL's names, so that dashboards carry over.

use std::collections::BTreeMap;

use crate::advantages::Advantages;
use crate::loss::{ImportanceSampling, LossConfig, LossInputs, LossType};

/// Metric name -> value, in name order (`reward`, `kl`, `clip_ratio/low_mean`, ...).
pub type Metrics = BTreeMap<String, f64>;

fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        f64::NAN
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

/// Mean and Bessel-corrected std of the finite values (TRL's nanmean / nanstd).
fn nan_mean_std(xs: &[f64]) -> (f64, f64) {
    let v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    let m = mean(&v);
    let s = if v.len() < 2 {
        0.0
    } else {
        (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
    };
    (m, s)
}

/// `reward`, `reward_std`, `frac_reward_zero_std`, and `rewards/{name}/mean|std`
/// for each reward function's raw (unweighted) scores.
pub fn reward_metrics(adv: &Advantages, per_function: &[(&str, &[f64])]) -> Metrics {
    let mut out = Metrics::new();
    out.insert("reward".into(), adv.reward_mean);
    out.insert("reward_std".into(), adv.reward_std);
    out.insert("frac_reward_zero_std".into(), adv.frac_reward_zero_std);
    for (name, scores) in per_function {
        let (m, s) = nan_mean_std(scores);
        out.insert(format!("rewards/{name}/mean"), m);
        out.insert(format!("rewards/{name}/std"), s);
    }
    out
}

/// `completions/{mean,min,max}_length` (tokens) and `completions/clipped_ratio`
/// (the share that hit the length limit without an end-of-sequence).
pub fn completion_metrics(lengths: &[usize], truncated: &[bool]) -> Metrics {
    let mut out = Metrics::new();
    let l: Vec<f64> = lengths.iter().map(|&x| x as f64).collect();
    out.insert("completions/mean_length".into(), mean(&l));
    out.insert(
        "completions/min_length".into(),
        l.iter().copied().fold(f64::NAN, f64::min),
    );
    out.insert(
        "completions/max_length".into(),
        l.iter().copied().fold(f64::NAN, f64::max),
    );
    let clipped = truncated.iter().filter(|&&x| x).count() as f64;
    out.insert(
        "completions/clipped_ratio".into(),
        if truncated.is_empty() {
            0.0
        } else {
            clipped / truncated.len() as f64
        },
    );
    out
}

/// The loss-side metrics: `kl`, `entropy`, and `clip_ratio/*` (or
/// `cispo_clip_ratio`). Means are over completion tokens (over sequences for
/// sequence-level ratios); `low_min` / `high_max` are the extremes of the
/// per-sequence clipped fractions.
pub(crate) fn loss_metrics(
    inp: &LossInputs<'_>,
    cfg: &LossConfig,
    m: &[f64],
    lens: &[f64],
    ratio: &[f64],
    refp: Option<&[f64]>,
) -> Metrics {
    let (b, t) = (inp.batch, inp.seq);
    let n = b * t;
    let total: f64 = lens.iter().sum::<f64>().max(1.0);
    let token_mean = |f: &dyn Fn(usize) -> f64| (0..n).map(|i| f(i) * m[i]).sum::<f64>() / total;
    let mut out = Metrics::new();
    if let Some(r) = refp {
        out.insert(
            "kl".into(),
            token_mean(&|i| crate::loss::kl_value(cfg.kl_estimator, inp.logp[i], r[i])),
        );
    }
    if let Some(h) = inp.entropy {
        out.insert("entropy".into(), token_mean(&|i| h[i]));
    }
    let adv = |i: usize| inp.advantages[i / t.max(1)];
    let (lo, hi) = (1.0 - cfg.epsilon, 1.0 + cfg.eps_high());
    let seq_level = cfg.importance_sampling_level == ImportanceSampling::Sequence;
    // Batch mean of an indicator, and its per-sequence fractions.
    let summarise = |ind: &dyn Fn(usize) -> bool| -> (f64, Vec<f64>) {
        let per_seq: Vec<f64> = (0..b)
            .filter(|&row| seq_level || lens[row] > 0.0)
            .map(|row| {
                if seq_level {
                    if t > 0 && ind(row * t) {
                        1.0
                    } else {
                        0.0
                    }
                } else {
                    (row * t..(row + 1) * t).filter(|&i| ind(i)).map(|i| m[i]).sum::<f64>() / lens[row]
                }
            })
            .collect();
        let batch = if seq_level {
            mean(&per_seq)
        } else {
            token_mean(&|i| if ind(i) { 1.0 } else { 0.0 })
        };
        (batch, per_seq)
    };
    if cfg.loss_type == LossType::Cispo {
        let eh = cfg.eps_high();
        let (v, _) = summarise(&|i| ratio[i] > eh && adv(i) > 0.0);
        out.insert("cispo_clip_ratio".into(), v);
    } else {
        let low = |i: usize| ratio[i] < lo && adv(i) < 0.0;
        let high = |i: usize| ratio[i] > hi && adv(i) > 0.0;
        let (low_mean, low_seq) = summarise(&low);
        let (high_mean, high_seq) = summarise(&high);
        let (region_mean, _) = summarise(&|i| low(i) || high(i));
        out.insert("clip_ratio/low_mean".into(), low_mean);
        out.insert(
            "clip_ratio/low_min".into(),
            low_seq.iter().copied().fold(f64::NAN, f64::min),
        );
        out.insert("clip_ratio/high_mean".into(), high_mean);
        out.insert(
            "clip_ratio/high_max".into(),
            high_seq.iter().copied().fold(f64::NAN, f64::max),
        );
        out.insert("clip_ratio/region_mean".into(), region_mean);
    }
    out
}
