//! What the TRL fixture does not pin down: every configuration's gradient
//! against finite differences, the advantage estimators' definitions,
//! NaN-aware groups, clipping invariants, and errors on bad input.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::needless_range_loop)]

use aha_grpo::{
    compute_advantages, grpo_loss, AdvantageEstimator, ImportanceSampling, KlEstimator, LossConfig, LossInputs,
    LossType,
};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

struct Batch {
    b: usize,
    t: usize,
    logp: Vec<f64>,
    old: Vec<f64>,
    refp: Vec<f64>,
    mask: Vec<bool>,
    adv: Vec<f64>,
    ent: Vec<f64>,
}

fn batch(seed: u64, b: usize, t: usize) -> Batch {
    let mut r = StdRng::seed_from_u64(seed);
    let n = b * t;
    let logp: Vec<f64> = (0..n).map(|_| r.random_range(-3.0..-0.01)).collect();
    let old = logp.iter().map(|x| x + r.random_range(-0.4..0.4)).collect();
    let refp = logp.iter().map(|x| x + r.random_range(-0.5..0.5)).collect();
    let mut mask = vec![false; n];
    for i in 0..b {
        let len = r.random_range(0..=t);
        for j in 0..len {
            mask[i * t + j] = true;
        }
    }
    let adv = (0..b).map(|_| r.random_range(-2.0..2.0)).collect();
    let ent = (0..n).map(|_| r.random_range(0.0..3.0)).collect();
    Batch {
        b,
        t,
        logp,
        old,
        refp,
        mask,
        adv,
        ent,
    }
}

fn inputs<'a>(x: &'a Batch, logp: &'a [f64], ent: &'a [f64]) -> LossInputs<'a> {
    LossInputs {
        batch: x.b,
        seq: x.t,
        logp,
        old_logp: Some(&x.old),
        ref_logp: Some(&x.refp),
        mask: &x.mask,
        advantages: &x.adv,
        entropy: Some(ent),
        num_items_in_batch: None,
    }
}

fn loss_types() -> impl Strategy<Value = LossType> {
    prop_oneof![
        Just(LossType::Grpo),
        Just(LossType::Bnpo),
        Just(LossType::DrGrpo),
        Just(LossType::Dapo),
        Just(LossType::Cispo)
    ]
}

fn kls() -> impl Strategy<Value = KlEstimator> {
    prop_oneof![Just(KlEstimator::K1), Just(KlEstimator::K2), Just(KlEstimator::K3)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// d loss / d logp and d loss / d entropy against central differences,
    /// for every loss type, estimator, ratio level, delta and entropy setting.
    #[test]
    fn gradients_match_finite_differences(seed: u64, b in 1usize..6, t in 1usize..7, lt in loss_types(), kl in kls(),
                                          seq_level: bool, use_delta: bool, beta in 0.0f64..0.5,
                                          entropy_coef in -0.1f64..0.1, quantile in prop_oneof![Just(1.0), 0.2f64..1.0]) {
        let x = batch(seed, b, t);
        let cfg = LossConfig {
            loss_type: lt,
            epsilon: 0.2,
            epsilon_high: Some(if lt == LossType::Cispo { 1.3 } else { 0.28 }),
            delta: if use_delta && lt != LossType::Cispo { Some(1.4) } else { None },
            beta,
            kl_estimator: kl,
            importance_sampling_level: if seq_level { ImportanceSampling::Sequence } else { ImportanceSampling::Token },
            max_completion_length: t + 3,
            entropy_coef,
            top_entropy_quantile: quantile,
        };
        let out = grpo_loss(&inputs(&x, &x.logp, &x.ent), &cfg).unwrap();
        prop_assert!(out.loss.is_finite());
        let h = 1e-6;
        for i in 0..b * t {
            let mut lp = x.logp.clone();
            lp[i] += h;
            let up = grpo_loss(&inputs(&x, &lp, &x.ent), &cfg).unwrap().loss;
            lp[i] -= 2.0 * h;
            let down = grpo_loss(&inputs(&x, &lp, &x.ent), &cfg).unwrap().loss;
            let num = (up - down) / (2.0 * h);
            // A step may cross a clipping kink; then one side's slope is
            // exact and the difference quotient is not: skip those points.
            let kink = {
                let mut lp2 = x.logp.clone();
                lp2[i] += h;
                let g_up = grpo_loss(&inputs(&x, &lp2, &x.ent), &cfg).unwrap().dlogp[i];
                (g_up - out.dlogp[i]).abs() > 1e-6 * (1.0 + g_up.abs())
            };
            if lt == LossType::Cispo {
                // CISPO stops the gradient through its clipped ratio, so the
                // loss value's slope is not its gradient: check the formula
                // d/dlogp [-sg(min(r, eps_high)) A logp] + beta dKL instead.
                let d = x.refp[i] - x.logp[i];
                let dkl = match kl { KlEstimator::K1 => 1.0, KlEstimator::K2 => -d, KlEstimator::K3 => 1.0 - d.exp() };
                let row = i / t;
                let lr = if seq_level {
                    let idx = row * t..(row + 1) * t;
                    let len = x.mask[idx.clone()].iter().filter(|&&m| m).count().max(1) as f64;
                    idx.filter(|&j| x.mask[j]).map(|j| x.logp[j] - x.old[j]).sum::<f64>() / len
                } else {
                    x.logp[i] - x.old[i]
                };
                let r = lr.exp().min(1.3);
                let w_pol = -r * x.adv[i / t];
                // Recover the aggregation weight from a pure-KL run.
                let wcfg = LossConfig { beta: 1.0, kl_estimator: KlEstimator::K1, entropy_coef: 0.0, ..cfg.clone() };
                let wx = Batch { adv: vec![0.0; b], ..batch(seed, b, t) };
                let w = grpo_loss(&inputs(&wx, &wx.logp, &wx.ent), &wcfg).unwrap().dlogp[i];
                let emasked = quantile < 1.0;
                if !emasked {
                    prop_assert!((out.dlogp[i] - w * (w_pol + beta * dkl)).abs() < 1e-9,
                        "cispo dlogp[{}]: {} vs {}", i, out.dlogp[i], w * (w_pol + beta * dkl));
                }
            } else if !kink {
                prop_assert!((num - out.dlogp[i]).abs() <= 1e-6 * (1.0 + num.abs()),
                    "dlogp[{}]: analytic {} numeric {}", i, out.dlogp[i], num);
            }
            if x.mask[i] && quantile == 1.0 {
                let mut e = x.ent.clone();
                e[i] += h;
                let up = grpo_loss(&inputs(&x, &x.logp, &e), &cfg).unwrap().loss;
                let num = (up - out.loss) / h;
                prop_assert!((num - out.dentropy[i]).abs() <= 1e-6, "dentropy[{}]: {} vs {}", i, out.dentropy[i], num);
            }
            if !x.mask[i] {
                prop_assert_eq!(out.dlogp[i], 0.0);
            }
        }
    }

    /// Group advantages have zero mean in every group with a spread; RLOO
    /// is r minus the mean of the others; the zero-std fraction is right.
    #[test]
    fn advantage_estimators(seed: u64, groups in 1usize..6, g in 2usize..7) {
        let mut r = StdRng::seed_from_u64(seed);
        let rewards: Vec<f64> = (0..groups * g).map(|_| (r.random_range(0..3) as f64) / 2.0).collect();
        let grp = compute_advantages(&rewards, g, AdvantageEstimator::Group).unwrap();
        let rloo = compute_advantages(&rewards, g, AdvantageEstimator::Rloo).unwrap();
        let rpp = compute_advantages(&rewards, g, AdvantageEstimator::ReinforcePlusPlusBaseline).unwrap();
        let mut zero = 0;
        for k in 0..groups {
            let rs = &rewards[k * g..(k + 1) * g];
            let s: f64 = grp.values[k * g..(k + 1) * g].iter().sum();
            prop_assert!(s.abs() < 1e-9, "group {} advantages sum to {}", k, s);
            if rs.iter().all(|&v| v == rs[0]) {
                zero += 1;
                prop_assert!(grp.values[k * g..(k + 1) * g].iter().all(|&a| a == 0.0));
            }
            for i in 0..g {
                let others: f64 = (0..g).filter(|&j| j != i).map(|j| rs[j]).sum::<f64>() / (g - 1) as f64;
                prop_assert!((rloo.values[k * g + i] - (rs[i] - others)).abs() < 1e-12);
            }
        }
        prop_assert!((grp.frac_reward_zero_std - zero as f64 / groups as f64).abs() < 1e-12);
        // REINFORCE++-baseline: centred per group, unit std over the batch.
        let n = rpp.values.len() as f64;
        let m = rpp.values.iter().sum::<f64>() / n;
        let sd = (rpp.values.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / (n - 1.0)).sqrt();
        prop_assert!(sd < 1.0 + 1e-6 && (zero == groups || sd > 0.99), "batch std {}", sd);
    }

    /// Off the clip range in the direction the advantage favours, the policy
    /// gradient of a token is zero: the ratio is held inside [1-eps_low, 1+eps_high].
    #[test]
    fn clipped_tokens_get_no_policy_gradient(seed: u64, b in 1usize..5, t in 1usize..6) {
        let x = batch(seed, b, t);
        let cfg = LossConfig { beta: 0.0, epsilon: 0.1, epsilon_high: Some(0.15), ..LossConfig::default() };
        let out = grpo_loss(&inputs(&x, &x.logp, &x.ent), &cfg).unwrap();
        for i in 0..b * t {
            let ratio = (x.logp[i] - x.old[i]).exp();
            let a = x.adv[i / t];
            if x.mask[i] && ((ratio > 1.15 && a > 0.0) || (ratio < 0.9 && a < 0.0)) {
                prop_assert_eq!(out.dlogp[i], 0.0);
            }
        }
    }
}

#[test]
fn unscored_completions_leave_the_baseline() {
    let rewards = [1.0, f64::NAN, 0.0, 0.0];
    let a = compute_advantages(&rewards, 4, AdvantageEstimator::Group).unwrap();
    // Mean and std over {1, 0, 0}: mean 1/3, std sqrt(1/3).
    let (m, s) = (1.0 / 3.0, (1.0f64 / 3.0).sqrt());
    assert!((a.values[0] - (1.0 - m) / (s + 1e-4)).abs() < 1e-12);
    assert_eq!(a.values[1], 0.0);
    assert!((a.group_mean[0] - m).abs() < 1e-12);
    let all_nan = compute_advantages(&[f64::NAN; 3], 3, AdvantageEstimator::Group).unwrap();
    assert!(all_nan.values.iter().all(|&v| v == 0.0));
}

#[test]
fn bad_inputs_are_errors() {
    assert!(compute_advantages(&[1.0, 2.0, 3.0], 2, AdvantageEstimator::Group).is_err());
    assert!(compute_advantages(&[1.0, f64::INFINITY], 2, AdvantageEstimator::Group).is_err());
    let x = batch(1, 2, 3);
    let cfg = LossConfig::default();
    let mut bad = inputs(&x, &x.logp, &x.ent);
    bad.ref_logp = None;
    let e = grpo_loss(&bad, &cfg).unwrap_err().to_string();
    assert!(e.contains("ref_logp") && e.contains("beta"), "{e}");
    let short = &x.logp[..5];
    let e = grpo_loss(&inputs(&x, short, &x.ent), &cfg).unwrap_err().to_string();
    assert!(e.contains("logp has 5 elements, expected 6"), "{e}");
    for bad_cfg in [
        LossConfig {
            epsilon: -0.1,
            ..LossConfig::default()
        },
        LossConfig {
            delta: Some(1.1),
            ..LossConfig::default()
        },
        LossConfig {
            top_entropy_quantile: 0.0,
            ..LossConfig::default()
        },
    ] {
        assert!(grpo_loss(&inputs(&x, &x.logp, &x.ent), &bad_cfg).is_err());
    }
    // A TOML/JSON config with an unknown key is refused.
    assert!(serde_json::from_str::<LossConfig>(r#"{"loss_type": "dapo", "epsilon_hi": 0.3}"#).is_err());
    let ok: LossConfig = serde_json::from_str(r#"{"loss_type": "dr_grpo", "beta": 0.0}"#).unwrap();
    assert_eq!(ok.loss_type, LossType::DrGrpo);
}

#[test]
fn empty_completions_do_not_divide_by_zero() {
    let x = Batch {
        b: 2,
        t: 3,
        logp: vec![-1.0; 6],
        old: vec![-1.0; 6],
        refp: vec![-1.0; 6],
        mask: vec![false; 6],
        adv: vec![1.0, -1.0],
        ent: vec![0.5; 6],
    };
    for lt in [
        LossType::Grpo,
        LossType::Bnpo,
        LossType::DrGrpo,
        LossType::Dapo,
        LossType::Cispo,
    ] {
        for level in [ImportanceSampling::Token, ImportanceSampling::Sequence] {
            let cfg = LossConfig {
                loss_type: lt,
                importance_sampling_level: level,
                top_entropy_quantile: 0.5,
                ..LossConfig::default()
            };
            let out = grpo_loss(&inputs(&x, &x.logp, &x.ent), &cfg).unwrap();
            assert_eq!(out.loss, 0.0, "{lt:?} {level:?}");
            assert!(out.dlogp.iter().all(|&g| g == 0.0));
        }
    }
}
