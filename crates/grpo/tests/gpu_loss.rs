//! The GRPO math on the GPU against its CPU twins (`compute_advantages`,
//! `grpo_loss`) and against TRL's own outputs: every configuration of the
//! TRL fixture, then random batches over the whole configuration space
//! (loss types, token / sequence ratios, delta, KL estimators, entropy bonus
//! and top-entropy mask, padding, NaN rewards). Without a GPU each `_gpu`
//! test prints "skipped: no GPU" and passes; each check also runs as an
//! `_emulated` test everywhere: the same kernel text compiled by g++ through
//! `aha_cuda_kernels::emulate` and run on the CPU.
//!
//! Tolerances: the device reads f32 log-probs and computes in f64, so the
//! CPU twin is fed the same f32-rounded values; the two then differ only by
//! summation order and `exp` (1e-9 relative). Against TRL (float64 inputs
//! rounded to f32 here) the bound is f32's: 1e-5.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::needless_range_loop)]

use std::sync::Arc;

use aha_cuda_kernels::emulate::{self, numbers, Emulator};
use aha_cuda_kernels::grpo::GrpoLossInputs;
use aha_cuda_kernels::Gpu;
use aha_grpo::gpu::{compute_advantages_device, estimator_code, grpo_loss_device, loss_params};
use aha_grpo::{
    compute_advantages, grpo_loss, AdvantageEstimator, Advantages, ImportanceSampling, KlEstimator, LossConfig,
    LossInputs, LossOutput, LossType, Metrics,
};
mod common;

use common::{f64s, fixture, flat};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn gpu_or_skip(test: &str) -> Option<Arc<Gpu>> {
    if let Some(reason) = aha_cuda_kernels::no_gpu_reason() {
        eprintln!("{test}: skipped: no GPU ({reason})");
        return None;
    }
    Some(Gpu::get(0).expect("GPU 0"))
}

fn close(what: &str, got: f64, want: f64, tol: f64) {
    let both_nan = got.is_nan() && want.is_nan();
    assert!(
        both_nan || (got - want).abs() <= tol * (1.0 + want.abs()),
        "{what}: GPU {got:.12e}, want {want:.12e}"
    );
}

fn r32(v: &[f64]) -> Vec<f64> {
    v.iter().map(|&x| x as f32 as f64).collect()
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// One batch of host inputs.
struct Batch {
    b: usize,
    t: usize,
    logp: Vec<f64>,
    old: Option<Vec<f64>>,
    refp: Vec<f64>,
    mask: Vec<bool>,
    adv: Vec<f64>,
    entropy: Option<Vec<f64>>,
    num_items: Option<f64>,
}

/// The CPU twin on the f32-rounded inputs the device sees.
fn cpu_twin(x: &Batch, cfg: &LossConfig) -> LossOutput {
    let (logp, refp) = (r32(&x.logp), r32(&x.refp));
    let old = x.old.as_deref().map(r32);
    let ent = x.entropy.as_deref().map(r32);
    grpo_loss(
        &LossInputs {
            batch: x.b,
            seq: x.t,
            logp: &logp,
            old_logp: old.as_deref(),
            ref_logp: Some(&refp),
            mask: &x.mask,
            advantages: &x.adv,
            entropy: ent.as_deref(),
            num_items_in_batch: x.num_items,
        },
        cfg,
    )
    .unwrap()
}

/// Runs `cfg` on the GPU; gradients come back to the host.
fn on_gpu(g: &Gpu, x: &Batch, cfg: &LossConfig) -> LossOutput {
    let d_logp = g.upload(&f32s(&x.logp)).unwrap();
    let d_old = x.old.as_deref().map(|o| g.upload(&f32s(o)).unwrap());
    let d_ref = g.upload(&f32s(&x.refp)).unwrap();
    let mask: Vec<u8> = x.mask.iter().map(|&m| u8::from(m)).collect();
    let d_mask = g.upload(&mask).unwrap();
    let d_adv = g.upload(&x.adv).unwrap();
    let d_ent = x.entropy.as_deref().map(|e| g.upload(&f32s(e)).unwrap());
    let out = grpo_loss_device(
        g,
        &GrpoLossInputs {
            batch: x.b,
            seq: x.t,
            logp: &d_logp,
            old_logp: d_old.as_ref(),
            ref_logp: Some(&d_ref),
            mask: &d_mask,
            advantages: &d_adv,
            entropy: d_ent.as_ref(),
        },
        cfg,
        x.num_items,
    )
    .unwrap();
    let n = x.b * x.t;
    let dl: Vec<f64> = g.download(&out.dlogp).unwrap()[..n].iter().map(|&v| v as f64).collect();
    let de: Vec<f64> = g.download(&out.dentropy).unwrap()[..n]
        .iter()
        .map(|&v| v as f64)
        .collect();
    LossOutput {
        loss: out.loss,
        dlogp: dl,
        dentropy: de,
        metrics: out.metrics,
    }
}

/// Runs `cfg` through kernels/grpo.cu emulated on the CPU (the same kernel
/// text, launched as `grpo_loss_f32` launches it); metrics named as
/// `grpo_loss_device` names them.
fn on_emulator(e: &Emulator, x: &Batch, cfg: &LossConfig) -> LossOutput {
    let p = loss_params(cfg, x.entropy.is_some(), x.num_items).unwrap();
    let n = x.b * x.t;
    let mut job = format!(
        "grpo {} {} {} {} {} {} {} {} {} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {}\n",
        x.b,
        x.t,
        p.loss_type,
        p.kl,
        p.seq_level,
        p.has_delta,
        p.has_entropy,
        p.quantile_on,
        p.has_num_items,
        p.beta,
        p.eps_low,
        p.eps_high,
        p.delta,
        p.max_len,
        p.entropy_coef,
        p.quantile,
        p.num_items,
        u8::from(x.old.is_some())
    );
    job += &numbers(&f32s(&x.logp));
    if let Some(o) = &x.old {
        job += &numbers(&f32s(o));
    }
    job += &numbers(&f32s(&x.refp));
    job += &numbers(&x.mask.iter().map(|&m| u8::from(m)).collect::<Vec<u8>>());
    job += &numbers(&x.adv);
    if let Some(h) = &x.entropy {
        job += &numbers(&f32s(h));
    }
    let out = e.run(&job).unwrap();
    assert_eq!(out.len(), 9 + 2 * n);
    let mut metrics = Metrics::new();
    if p.kl != 0 {
        metrics.insert("kl".into(), out[1]);
    }
    if x.entropy.is_some() {
        metrics.insert("entropy".into(), out[2]);
    }
    if cfg.loss_type == LossType::Cispo {
        metrics.insert("cispo_clip_ratio".into(), out[8]);
    } else {
        for (i, k) in ["low_mean", "low_min", "high_mean", "high_max", "region_mean"]
            .iter()
            .enumerate()
        {
            metrics.insert(format!("clip_ratio/{k}"), out[3 + i]);
        }
    }
    LossOutput {
        loss: out[0],
        dlogp: out[9..9 + n].to_vec(),
        dentropy: out[9 + n..].to_vec(),
        metrics,
    }
}

/// The emulator, or `None` (test skipped) where no C++ compiler exists and
/// none is required.
fn emulator_or_skip(test: &str) -> Option<Emulator> {
    emulate::emulator_for_test(test, "lmhead_grpo").unwrap_or_else(|e| panic!("{test}: {e}"))
}

fn compare(tag: &str, gpu: &LossOutput, want: &LossOutput, tol: f64) {
    close(&format!("{tag}: loss"), gpu.loss, want.loss, tol);
    // The device's gradients are f32.
    for i in 0..want.dlogp.len() {
        close(
            &format!("{tag}: dlogp[{i}]"),
            gpu.dlogp[i],
            want.dlogp[i],
            tol.max(1e-6),
        );
        close(
            &format!("{tag}: dentropy[{i}]"),
            gpu.dentropy[i],
            want.dentropy[i],
            tol.max(1e-6),
        );
    }
    assert_eq!(
        gpu.metrics.keys().collect::<Vec<_>>(),
        want.metrics.keys().collect::<Vec<_>>(),
        "{tag}: metric names"
    );
    for (k, v) in &want.metrics {
        close(&format!("{tag}: metric {k}"), gpu.metrics[k], *v, tol);
    }
}

/// Every TRL fixture configuration through `run`, against the CPU twin and
/// TRL; advantages through `adv` (rewards, group size, estimator).
fn check_trl_fixture(
    run: &dyn Fn(&Batch, &LossConfig) -> LossOutput,
    adv: &dyn Fn(&[f64], usize, AdvantageEstimator) -> Advantages,
) {
    let f = fixture();
    let common::Inputs {
        b,
        t,
        mask,
        logp,
        old,
        refp,
    } = common::inputs(&f);
    let gsize = f["num_generations"].as_u64().unwrap() as usize;
    let rewards = f64s(&f["rewards"]);
    for (name, est) in [
        ("group", AdvantageEstimator::Group),
        ("batch", AdvantageEstimator::Batch),
        ("none", AdvantageEstimator::None),
    ] {
        let got = adv(&rewards, gsize, est);
        let want = f64s(&f["advantages"][name]);
        for i in 0..want.len() {
            close(&format!("advantage {name}[{i}]"), got.values[i], want[i], 1e-6);
        }
    }
    for (ci, case) in f["cases"].as_array().unwrap().iter().enumerate() {
        let c = &case["config"];
        let cfg = common::config(case, t);
        let x = Batch {
            b,
            t,
            logp: logp.clone(),
            old: Some(old.clone()),
            refp: refp.clone(),
            mask: mask.clone(),
            adv: f64s(&f["advantages"][case["advantages"].as_str().unwrap()]),
            entropy: Some(vec![0.0; b * t]),
            num_items: None,
        };
        let (gpu, cpu) = (run(&x, &cfg), cpu_twin(&x, &cfg));
        let tag = format!("case {ci} {c}");
        compare(&format!("{tag} (CPU twin)"), &gpu, &cpu, 1e-9);
        close(
            &format!("{tag}: loss vs TRL"),
            gpu.loss,
            case["loss"].as_f64().unwrap(),
            1e-5,
        );
        let want = flat(&case["grad_per_token_logps"]);
        for i in 0..want.len() {
            close(&format!("{tag}: dlogp[{i}] vs TRL"), gpu.dlogp[i], want[i], 1e-5);
        }
    }
}

#[test]
fn trl_fixture_cases_on_the_gpu() {
    let Some(g) = gpu_or_skip("trl_fixture_cases_on_the_gpu") else {
        return;
    };
    check_trl_fixture(&|x, c| on_gpu(&g, x, c), &|r, gs, est| {
        compute_advantages_device(&g, r, gs, est).unwrap().0
    });
    eprintln!("trl_fixture_cases_on_the_gpu: 12 cases and 3 advantage estimators agree");
}

#[test]
fn trl_fixture_cases_emulated() {
    let Some(e) = emulator_or_skip("trl_fixture_cases_emulated") else {
        return;
    };
    check_trl_fixture(&|x, c| on_emulator(&e, x, c), &|r, gs, est| {
        emulated_advantages(&e, r, gs, est)
    });
}

/// Random batches over the whole configuration space through `run`, against
/// the CPU twin; `max_t` bounds the completion length. Returns the count.
fn check_random(run: &dyn Fn(&Batch, &LossConfig) -> LossOutput, max_t: usize) -> usize {
    let mut rng = StdRng::seed_from_u64(11);
    let mut cases = 0;
    for loss_type in [
        LossType::Grpo,
        LossType::Bnpo,
        LossType::DrGrpo,
        LossType::Dapo,
        LossType::Cispo,
    ] {
        for seq_level in [false, true] {
            for round in 0..6 {
                let (b, t) = (rng.random_range(1..40), rng.random_range(1..max_t));
                let n = b * t;
                let logp: Vec<f64> = (0..n).map(|_| -rng.random_range(0.0..4.0)).collect();
                let old = (round % 3 != 0).then(|| logp.iter().map(|l| l + rng.random_range(-0.4..0.4)).collect());
                let refp = logp.iter().map(|l| l + rng.random_range(-0.5..0.5)).collect();
                // Some completions empty, some full, the rest partly padded.
                let mask = (0..n)
                    .map(|i| match (i / t) % 5 {
                        0 => false,
                        1 => true,
                        _ => (i % t) < t / 2 + 1,
                    })
                    .collect();
                let adv = (0..b).map(|_| rng.random_range(-2.0..2.0)).collect();
                let with_entropy = round % 2 == 0;
                let x = Batch {
                    b,
                    t,
                    logp,
                    old,
                    refp,
                    mask,
                    adv,
                    entropy: with_entropy.then(|| (0..n).map(|_| rng.random_range(0.0..3.0)).collect()),
                    num_items: (round == 4).then_some(3.0 * n as f64),
                };
                let cfg = LossConfig {
                    loss_type,
                    epsilon: 0.2,
                    epsilon_high: (round % 2 == 1).then_some(if loss_type == LossType::Cispo { 5.0 } else { 0.28 }),
                    delta: (round == 3 && loss_type != LossType::Cispo).then_some(1.5),
                    beta: [0.0, 0.04, 0.001][round % 3],
                    kl_estimator: [KlEstimator::K1, KlEstimator::K2, KlEstimator::K3][round % 3],
                    importance_sampling_level: if seq_level {
                        ImportanceSampling::Sequence
                    } else {
                        ImportanceSampling::Token
                    },
                    max_completion_length: t,
                    entropy_coef: if with_entropy { 0.01 } else { 0.0 },
                    top_entropy_quantile: if with_entropy && round == 2 { 0.3 } else { 1.0 },
                };
                let tag = format!("{loss_type:?} seq {seq_level} round {round} (B {b}, T {t})");
                compare(&tag, &run(&x, &cfg), &cpu_twin(&x, &cfg), 1e-9);
                cases += 1;
            }
        }
    }
    cases
}

#[test]
fn random_batches_match_the_cpu_twin_on_the_gpu() {
    let Some(g) = gpu_or_skip("random_batches_match_the_cpu_twin_on_the_gpu") else {
        return;
    };
    let cases = check_random(&|x, c| on_gpu(&g, x, c), 700);
    eprintln!("random_batches_match_the_cpu_twin_on_the_gpu: {cases} configurations agree");
}

#[test]
fn random_batches_match_the_cpu_twin_emulated() {
    let Some(e) = emulator_or_skip("random_batches_match_the_cpu_twin_emulated") else {
        return;
    };
    check_random(&|x, c| on_emulator(&e, x, c), 300);
}

/// `compute_advantages` through the emulated kernel.
fn emulated_advantages(e: &Emulator, rewards: &[f64], size: usize, est: AdvantageEstimator) -> Advantages {
    let n = rewards.len();
    let out = e
        .run(&format!("adv {n} {size} {}\n{}", estimator_code(est), numbers(rewards)))
        .unwrap();
    assert_eq!(out.len(), 3 * n + 3);
    Advantages {
        values: out[..n].to_vec(),
        group_mean: out[n..2 * n].to_vec(),
        std: out[2 * n..3 * n].to_vec(),
        frac_reward_zero_std: out[3 * n],
        reward_mean: out[3 * n + 1],
        reward_std: out[3 * n + 2],
    }
}

/// Every estimator on groups with NaN rewards, ties and single members,
/// through `adv`, against `compute_advantages`.
fn check_advantages(adv: &dyn Fn(&[f64], usize, AdvantageEstimator) -> Advantages) {
    let mut rng = StdRng::seed_from_u64(5);
    for est in [
        AdvantageEstimator::Group,
        AdvantageEstimator::Batch,
        AdvantageEstimator::None,
        AdvantageEstimator::Rloo,
        AdvantageEstimator::ReinforcePlusPlusBaseline,
    ] {
        for (groups, size) in [(1, 1), (3, 4), (300, 16), (200, 8), (7, 1)] {
            let rewards: Vec<f64> = (0..groups * size)
                .map(|i| match i % 11 {
                    0 => f64::NAN,
                    1 | 2 => 1.0,
                    _ => rng.random_range(0.0..1.0f64).round(),
                })
                .collect();
            let want = compute_advantages(&rewards, size, est).unwrap();
            let got = adv(&rewards, size, est);
            let tag = format!("{est:?} {groups}x{size}");
            for i in 0..rewards.len() {
                close(&format!("{tag}: values[{i}]"), got.values[i], want.values[i], 1e-12);
                close(
                    &format!("{tag}: group_mean[{i}]"),
                    got.group_mean[i],
                    want.group_mean[i],
                    1e-12,
                );
                close(&format!("{tag}: std[{i}]"), got.std[i], want.std[i], 1e-12);
            }
            close(
                &format!("{tag}: frac"),
                got.frac_reward_zero_std,
                want.frac_reward_zero_std,
                1e-12,
            );
            close(&format!("{tag}: mean"), got.reward_mean, want.reward_mean, 1e-12);
            close(&format!("{tag}: std"), got.reward_std, want.reward_std, 1e-12);
        }
    }
}

#[test]
fn advantages_match_the_cpu_twin_on_the_gpu() {
    let Some(g) = gpu_or_skip("advantages_match_the_cpu_twin_on_the_gpu") else {
        return;
    };
    check_advantages(&|r, size, est| compute_advantages_device(&g, r, size, est).unwrap().0);
    // Bad input is an error naming the problem, on the GPU path too.
    let e = compute_advantages_device(&g, &[1.0, f64::INFINITY], 2, AdvantageEstimator::Group).unwrap_err();
    assert!(e.to_string().contains("infinite"), "{e}");
}

#[test]
fn advantages_match_the_cpu_twin_emulated() {
    let Some(e) = emulator_or_skip("advantages_match_the_cpu_twin_emulated") else {
        return;
    };
    check_advantages(&|r, size, est| emulated_advantages(&e, r, size, est));
}
