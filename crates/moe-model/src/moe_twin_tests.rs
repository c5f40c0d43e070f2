//! The CPU twins of the CUDA MoE kernels (`aha_tensor::cpu::moe`), composed
//! into a whole layer (`aha_tensor::cpu::moe_layer_forward` / `_backward`
//! with `Store::F32`), against this crate's CPU MoE layer (`ffn::moe_fwd` /
//! `moe_bwd`), forward and backward, on random configs of both routing
//! rules, with and without renormalisation and shared experts, including
//! experts that get no tokens and all tokens routed to one expert.
//!
//! Tolerance: the two compute the same f32 math in different summation
//! orders (per-slot combine vs per-row scatter, different matmul blocking);
//! inputs and weights are O(1) with widths <= 40, so values agree to a few
//! hundred f32 ulps: |a - b| <= 2e-5 + 2e-4 |b|. The routing choices and the
//! expert loads must agree exactly.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::needless_range_loop)]

use aha_tensor::cpu::{self, MoeDims, MoeGating, MoeLayerGrads, MoeLayerWeights, MoeMath, MoeStorage, Store};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::config::{MoeConfig, Router};
use crate::ffn::{moe_bwd, moe_fwd};
use crate::params::{Linear, MlpSlots, Slot};

struct Case {
    cfg: MoeConfig,
    n: usize,
    c: usize,
    /// Force every token to pick expert `hot` first (the others get the rest).
    hot: Option<usize>,
    seed: u64,
}

struct Params {
    p: Vec<f32>,
    router: Slot,
    bias: Option<Slot>,
    experts: Vec<MlpSlots>,
    shared: Option<MlpSlots>,
}

fn linear(off: &mut usize, inp: usize, out: usize) -> Linear {
    let w = Slot {
        off: *off,
        len: inp * out,
    };
    *off += inp * out;
    Linear {
        w,
        b: None,
        inp,
        out,
        lora: None,
        frozen: false,
    }
}

fn mlp(off: &mut usize, c: usize, f: usize) -> MlpSlots {
    MlpSlots {
        gate: linear(off, c, f),
        up: linear(off, c, f),
        down: linear(off, f, c),
    }
}

fn params(case: &Case, rng: &mut StdRng) -> Params {
    let (c, e, f) = (case.c, case.cfg.n_experts, case.cfg.expert_dim);
    let mut off = 0;
    let router = Slot { off, len: e * c };
    off += e * c;
    let bias = matches!(case.cfg.router, Router::SigmoidGroupLimited { .. }).then(|| {
        let s = Slot { off, len: e };
        off += e;
        s
    });
    let experts: Vec<MlpSlots> = (0..e).map(|_| mlp(&mut off, c, f)).collect();
    let shared = (case.cfg.n_shared > 0).then(|| mlp(&mut off, c, case.cfg.n_shared * f));
    let scale = 1.0 / (c as f32).sqrt();
    let mut p: Vec<f32> = (0..off).map(|_| rng.random_range(-1.0..1.0) * scale).collect();
    if let Some(b) = bias {
        for v in b.of_mut(&mut p) {
            *v = rng.random_range(-0.1..0.1);
        }
    }
    if let Some(h) = case.hot {
        // Inputs are positive (see `check`): a router row of +1 gives the
        // hot expert the largest logit for every token; for the sigmoid rule
        // a large bias does it.
        for v in &mut p[router.off + h * c..router.off + (h + 1) * c] {
            *v = 1.0;
        }
        if let Some(b) = bias {
            b.of_mut(&mut p)[h] = 10.0;
        }
    }
    Params {
        p,
        router,
        bias,
        experts,
        shared,
    }
}

fn gather(p: &[f32], slots: impl Iterator<Item = Slot>) -> Vec<f32> {
    slots.flat_map(|s| s.of(p).iter().copied()).collect()
}

fn dims(case: &Case) -> MoeDims {
    let m = &case.cfg;
    let gating = match m.router {
        Router::SoftmaxTopK => MoeGating::Softmax {
            renorm: m.norm_topk_prob,
        },
        Router::SigmoidGroupLimited {
            n_group,
            topk_group,
            routed_scaling_factor,
        } => MoeGating::SigmoidGroup {
            n_group,
            topk_group,
            renorm: m.norm_topk_prob,
            scaling: routed_scaling_factor,
        },
    };
    MoeDims {
        n: case.n,
        c: case.c,
        e: m.n_experts,
        k: m.top_k,
        f: m.expert_dim,
        f_shared: m.n_shared * m.expert_dim,
        gating,
        math: MoeMath::Simt,
        storage: MoeStorage::F32,
    }
}

fn close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let bad: Vec<String> = got
        .iter()
        .zip(want)
        .enumerate()
        .filter(|(_, (g, w))| (*g - *w).abs() > 2e-5 + 2e-4 * w.abs())
        .take(6)
        .map(|(i, (g, w))| format!("  [{i}] twin {g:e} layer {w:e}"))
        .collect();
    assert!(bad.is_empty(), "{what}: twin and CPU layer differ:\n{}", bad.join("\n"));
}

fn check(case: &Case) {
    let mut rng = StdRng::seed_from_u64(case.seed);
    let pr = params(case, &mut rng);
    let (n, c) = (case.n, case.c);
    let x: Vec<f32> = (0..n * c)
        .map(|_| {
            if case.hot.is_some() {
                rng.random_range(0.1..1.0)
            } else {
                rng.random_range(-1.0..1.0)
            }
        })
        .collect();
    let dy: Vec<f32> = (0..n * c).map(|_| rng.random_range(-1.0..1.0)).collect();
    let cfg = &case.cfg;
    let e = cfg.n_experts;
    let p = &pr.p;

    let (y, acts) = moe_fwd(cfg, p, pr.router, pr.bias, &pr.experts, pr.shared.as_ref(), &x, n, c).unwrap();
    let mut gr = vec![0f32; p.len()];
    let mut dx = vec![0f32; n * c];
    let aux: Option<Vec<f32>> =
        matches!(cfg.router, Router::SoftmaxTopK).then(|| (0..e).map(|_| rng.random_range(-0.1..0.1)).collect());
    moe_bwd(
        cfg,
        p,
        &mut gr,
        pr.router,
        &pr.experts,
        pr.shared.as_ref(),
        &acts,
        aux.as_deref(),
        &x,
        &dy,
        n,
        c,
        &mut dx,
    )
    .unwrap();

    let d = dims(case);
    let (wg, wu, wd) = (
        gather(p, pr.experts.iter().map(|s| s.gate.w)),
        gather(p, pr.experts.iter().map(|s| s.up.w)),
        gather(p, pr.experts.iter().map(|s| s.down.w)),
    );
    let shared_w = pr.shared.map(|s| [s.gate.w.of(p), s.up.w.of(p), s.down.w.of(p)]);
    let wt = MoeLayerWeights {
        router: pr.router.of(p),
        bias: pr.bias.map(|b| b.of(p)),
        w_gate: &wg,
        w_up: &wu,
        w_down: &wd,
        shared: shared_w,
    };
    let (ty, saved) = cpu::moe_layer_forward(&d, &wt, &x, Store::F32).unwrap();
    let tag = format!(
        "seed {} ({:?}, n {n}, c {c}, hot {:?})",
        case.seed, cfg.router, case.hot
    );
    close(&format!("y {tag}"), &ty, &y);
    assert_eq!(saved.counts, acts.load, "expert loads {tag}");
    if let Some(h) = case.hot {
        assert_eq!(saved.counts[h] as usize, n, "{tag}: every token picks the hot expert");
        if cfg.top_k == 1 {
            assert!(saved.counts.iter().enumerate().all(|(i, &l)| i == h || l == 0));
        }
    }
    let mut tdx = vec![0f32; n * c];
    let mut tg = MoeLayerGrads::zeros(&d);
    cpu::moe_layer_backward(&d, &wt, &saved, &x, &dy, aux.as_deref(), Store::F32, &mut tdx, &mut tg).unwrap();
    close(&format!("dx {tag}"), &tdx, &dx);
    close(&format!("d router {tag}"), &tg.router, pr.router.of(&gr));
    close(
        &format!("d w_gate {tag}"),
        &tg.w_gate,
        &gather(&gr, pr.experts.iter().map(|s| s.gate.w)),
    );
    close(
        &format!("d w_up {tag}"),
        &tg.w_up,
        &gather(&gr, pr.experts.iter().map(|s| s.up.w)),
    );
    close(
        &format!("d w_down {tag}"),
        &tg.w_down,
        &gather(&gr, pr.experts.iter().map(|s| s.down.w)),
    );
    if let (Some(s), Some([g, u, dd])) = (pr.shared, &tg.shared) {
        close(&format!("d shared gate {tag}"), g, s.gate.w.of(&gr));
        close(&format!("d shared up {tag}"), u, s.up.w.of(&gr));
        close(&format!("d shared down {tag}"), dd, s.down.w.of(&gr));
    }
}

fn softmax_cfg(e: usize, k: usize, f: usize, renorm: bool, n_shared: usize) -> MoeConfig {
    MoeConfig {
        n_experts: e,
        top_k: k,
        expert_dim: f,
        norm_topk_prob: renorm,
        n_shared,
        router: Router::SoftmaxTopK,
        aux_loss_coef: 0.0,
    }
}

fn sigmoid_cfg(e: usize, k: usize, f: usize, g: usize, tg: usize, renorm: bool, n_shared: usize) -> MoeConfig {
    MoeConfig {
        router: Router::SigmoidGroupLimited {
            n_group: g,
            topk_group: tg,
            routed_scaling_factor: 2.5,
        },
        ..softmax_cfg(e, k, f, renorm, n_shared)
    }
}

#[test]
fn softmax_twin_layer_matches_the_cpu_layer() {
    let cases = [
        (softmax_cfg(8, 2, 12, true, 0), 13, 16, None),
        (softmax_cfg(8, 2, 12, false, 1), 5, 24, None),
        // More experts than token slots: most experts get no tokens.
        (softmax_cfg(16, 3, 8, true, 0), 3, 20, None),
        (softmax_cfg(6, 1, 10, false, 0), 9, 16, Some(4)),
        (softmax_cfg(6, 2, 10, true, 1), 11, 16, Some(0)),
        (softmax_cfg(4, 4, 6, true, 0), 7, 12, None),
    ];
    for (i, (cfg, n, c, hot)) in cases.into_iter().enumerate() {
        check(&Case {
            cfg,
            n,
            c,
            hot,
            seed: 100 + i as u64,
        });
    }
}

#[test]
fn sigmoid_group_twin_layer_matches_the_cpu_layer() {
    let cases = [
        (sigmoid_cfg(8, 2, 12, 4, 2, true, 1), 13, 16, None),
        (sigmoid_cfg(8, 3, 12, 2, 1, false, 0), 6, 24, None),
        (sigmoid_cfg(16, 4, 8, 4, 2, true, 2), 2, 20, None),
        (sigmoid_cfg(8, 1, 10, 4, 1, true, 0), 9, 16, Some(5)),
        (sigmoid_cfg(12, 2, 6, 3, 3, true, 1), 10, 12, Some(0)),
    ];
    for (i, (cfg, n, c, hot)) in cases.into_iter().enumerate() {
        check(&Case {
            cfg,
            n,
            c,
            hot,
            seed: 200 + i as u64,
        });
    }
}

#[test]
fn random_configs_twin_layer_matches_the_cpu_layer() {
    let mut rng = StdRng::seed_from_u64(77);
    for i in 0..12 {
        let g = rng.random_range(1..4usize);
        let e = g * rng.random_range(2..6usize);
        let k = rng.random_range(1..=e.min(4));
        let f = rng.random_range(1..20);
        let renorm = rng.random_bool(0.5);
        let shared = rng.random_range(0..2);
        let cfg = if rng.random_bool(0.5) {
            softmax_cfg(e, k, f, renorm, shared)
        } else {
            sigmoid_cfg(e, k, f, g, rng.random_range(1..=g), renorm, shared)
        };
        let hot = rng.random_bool(0.25).then(|| rng.random_range(0..e));
        check(&Case {
            cfg,
            n: rng.random_range(1..30),
            c: rng.random_range(1..40),
            hot,
            seed: 300 + i,
        });
    }
}
