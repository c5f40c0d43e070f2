//! The CUDA MoE kernels (`aha_cuda_kernels::launch_moe`, `moe_layer`)
//! against their CPU twins (`aha_tensor::cpu::moe`, `moe_layer_*`), one test
//! body per op run on each device, as in `gpu_kernels.rs`. The reference is
//! always the twin; the `_cpu` test runs the twin on the other side too (so
//! it checks the test's own plumbing: shapes, edge cases, bf16 round trips),
//! the `_cuda` test runs the launchers. The twins themselves are tested
//! against the CPU MoE layer of aha-moe-model (`moe_twin_tests`) and against
//! finite differences. The grouped products run in both kernel families
//! (`MoeMath::Simt`, `MoeMath::TensorCores`); the whole-layer test also
//! checks the expert loads, the aux-loss gradient path, that a rerun gives
//! identical bits and that a frozen layer's backward
//! (`moe_layer_backward_dx`, no weight gradients) gives the same input
//! gradient bits. The storage kernels run in bf16 and in f32 (the `_f32`
//! launchers, against the same twins with `Store::F32`), and the layer in
//! f32 storage with its weights and gradients as views into one flat
//! parameter and one flat gradient buffer. Without a GPU the `_cuda` tests print "skipped: no GPU"
//! and pass (GPU status: `docs/gpu-verification.md`).
//!
//! bf16 operands are generated as f32 values that are exact bf16s and
//! uploaded as their bits, so both sides start from identical inputs.
//!
//! Routing data avoid near-ties (the choice of experts is discrete: two
//! scores closer than the f32 difference between `expf` and the CPU's `exp`,
//! ~1e-7, could be ordered differently); the data are seeded, so a tie would
//! fail deterministically and be fixed by changing the seed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::needless_range_loop)]

mod common;

use aha_cuda_kernels::cudarc::driver::CudaSlice;
use aha_cuda_kernels::launch_moe::{self as lm, MoePermutation, MoeStorage};
use aha_cuda_kernels::moe_layer::{
    self as ml, MoeBuffers, MoeExpertViews, MoeExperts, MoeGrads, MoeGradsMut, MoeWeights, MoeWeightsBf16,
};
use aha_cuda_kernels::Gpu;
use aha_tensor::cpu::{self, MoeDims, MoeGating, MoeLayerGrads, MoeLayerWeights, MoeMath, Store};
use aha_tensor::{bf16, Device, Result};
use common::{assert_close, on, twin_tests, On};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

fn close(what: &str, got: &[f32], want: &[f32], atol: f64, rtol: f64) {
    let want: Vec<f64> = want.iter().map(|&v| v as f64).collect();
    assert_close(what, got, &want, atol, rtol);
}

fn uniform(rng: &mut StdRng, n: usize, s: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-s..s)).collect()
}

/// Uniform values rounded to bf16 (exact on both sides).
fn bf16s(rng: &mut StdRng, n: usize, s: f32) -> Vec<f32> {
    (0..n).map(|_| Store::Bf16.apply(rng.random_range(-s..s))).collect()
}

/// The twins' rounding for a storage precision.
fn store_of(s: MoeStorage) -> Store {
    match s {
        MoeStorage::Bf16 => Store::Bf16,
        MoeStorage::F32 => Store::F32,
    }
}

fn bits(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| bf16::from_f32(x).to_bits()).collect()
}

fn unbits(v: &[u16]) -> Vec<f32> {
    v.iter().map(|&b| bf16::from_bits(b).to_f32()).collect()
}

fn up<T: aha_cuda_kernels::cudarc::driver::DeviceRepr>(g: &Gpu, v: &[T]) -> Result<CudaSlice<T>> {
    Ok(g.upload(v)?)
}

fn down<T: aha_cuda_kernels::cudarc::driver::DeviceRepr>(g: &Gpu, v: &CudaSlice<T>) -> Result<Vec<T>> {
    Ok(g.download(v)?)
}

/// Logits whose values per token are a shuffled ladder (step `step`) plus a
/// little noise: no two experts are closer than `step / 2`.
fn ladder_logits(rng: &mut StdRng, n: usize, e: usize, step: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(n * e);
    let mut rungs: Vec<usize> = (0..e).collect();
    for _ in 0..n {
        rungs.shuffle(rng);
        out.extend(
            rungs
                .iter()
                .map(|&r| (r as f32 - e as f32 / 2.0) * step + rng.random_range(0.0..step / 2.0)),
        );
    }
    out
}

fn sig(n_group: usize, topk_group: usize, renorm: bool, scaling: f32) -> MoeGating {
    MoeGating::SigmoidGroup {
        n_group,
        topk_group,
        renorm,
        scaling,
    }
}

fn route_cases() -> Vec<(usize, usize, usize, MoeGating, bool)> {
    let soft = |renorm| MoeGating::Softmax { renorm };
    vec![
        (1, 4, 1, soft(true), false),
        (37, 8, 2, soft(true), false),
        (100, 128, 8, soft(true), false),
        (33, 60, 4, soft(false), false),
        (5, 1024, 32, soft(true), false),
        (50, 256, 8, sig(8, 4, true, 2.5), true),
        (17, 16, 4, sig(4, 2, false, 1.0), false),
        (3, 64, 6, sig(2, 1, true, 1.5), true),
        (9, 1024, 32, sig(32, 32, true, 2.5), true),
    ]
}

fn check_moe_route(dev: Device) -> Result<()> {
    let on = on(dev)?;
    let mut rng = StdRng::seed_from_u64(10);
    for (n, e, k, gating, with_bias) in route_cases() {
        let step = if matches!(gating, MoeGating::Softmax { .. }) {
            6.0 / e as f32
        } else {
            // Keep sigmoid(logits) away from saturation: |logit| < ~6.
            12.0 / e as f32
        };
        let logits = ladder_logits(&mut rng, n, e, step);
        // Biases on a coarse grid far apart from the score steps' scale.
        let bias: Option<Vec<f32>> = with_bias.then(|| (0..e).map(|i| (i % 7) as f32 * 0.0137).collect());
        let dw = uniform(&mut rng, n * k, 1.0);
        let aux: Option<Vec<f32>> = matches!(gating, MoeGating::Softmax { .. }).then(|| uniform(&mut rng, e, 0.1));
        let (mut p, mut ids, mut w, mut d) = (vec![0f32; n * e], vec![0u32; n * k], vec![0f32; n * k], vec![0f32; n]);
        cpu::moe_route(
            &mut p,
            &mut ids,
            &mut w,
            &mut d,
            &logits,
            bias.as_deref(),
            n,
            e,
            k,
            gating,
        )?;
        let mut dl = vec![0f32; n * e];
        cpu::moe_route_backward(&mut dl, &dw, &w, &ids, &p, &d, aux.as_deref(), n, e, k, gating)?;
        let got = match &on {
            On::Cpu => {
                let (mut p2, mut i2, mut w2, mut d2) =
                    (vec![0f32; n * e], vec![0u32; n * k], vec![0f32; n * k], vec![0f32; n]);
                cpu::moe_route(
                    &mut p2,
                    &mut i2,
                    &mut w2,
                    &mut d2,
                    &logits,
                    bias.as_deref(),
                    n,
                    e,
                    k,
                    gating,
                )?;
                let mut dl2 = vec![0f32; n * e];
                cpu::moe_route_backward(&mut dl2, &dw, &w2, &i2, &p2, &d2, aux.as_deref(), n, e, k, gating)?;
                (p2, i2, w2, d2, dl2)
            }
            On::Gpu(g) => {
                let (mut pd, mut idd, mut wd, mut dd) = (
                    g.zeros::<f32>(n * e)?,
                    g.zeros::<u32>(n * k)?,
                    g.zeros::<f32>(n * k)?,
                    g.zeros::<f32>(n)?,
                );
                let ld = up(g, &logits)?;
                let bd = bias.as_deref().map(|b| up(g, b)).transpose()?;
                lm::moe_route_f32(
                    g,
                    &mut pd,
                    &mut idd,
                    &mut wd,
                    &mut dd,
                    &ld,
                    bd.as_ref(),
                    n,
                    e,
                    k,
                    gating,
                )?;
                // The backward from the twin's forward, so the comparison is of the backward alone.
                let (dwd, wt, it, pt, dt) = (up(g, &dw)?, up(g, &w)?, up(g, &ids)?, up(g, &p)?, up(g, &d)?);
                let ad = aux.as_deref().map(|a| up(g, a)).transpose()?;
                let mut dld = g.zeros::<f32>(n * e)?;
                lm::moe_route_backward_f32(g, &mut dld, &dwd, &wt, &it, &pt, &dt, ad.as_ref(), n, e, k, gating)?;
                (
                    down(g, &pd)?,
                    down(g, &idd)?,
                    down(g, &wd)?,
                    down(g, &dd)?,
                    down(g, &dld)?,
                )
            }
        };
        let tag = format!("n {n} e {e} k {k} {gating:?} bias {with_bias} on {dev}");
        assert_eq!(got.1, ids, "expert ids {tag}");
        // Probabilities: expf (fast math, ~2 ulp) and a 32-lane sum of e
        // terms vs the CPU's polynomial exp (3e-7) and 8-lane sum: the sums'
        // rounding grows like sqrt(e / lanes) ulp (bounded by e / 8 ulp,
        // 8e-6 at e = 1024); weights and denominators inherit it.
        close(&format!("probs {tag}"), &got.0, &p, 1e-7, 1e-5);
        close(&format!("w {tag}"), &got.2, &w, 1e-7, 1e-5);
        close(&format!("denom {tag}"), &got.3, &d, 1e-7, 1e-5);
        // dlogits: a dot product over e terms of O(1) in another order.
        close(&format!("dlogits {tag}"), &got.4, &dl, 1e-6, 1e-5);
    }
    Ok(())
}
twin_tests!(check_moe_route, moe_route_cpu, moe_route_cuda);

/// Distinct experts per token: uniform, or every token's first pick `hot`.
fn rand_ids(rng: &mut StdRng, n: usize, e: usize, k: usize, hot: Option<u32>) -> Vec<u32> {
    let mut ids = Vec::with_capacity(n * k);
    let mut all: Vec<u32> = (0..e as u32).collect();
    for _ in 0..n {
        all.shuffle(rng);
        if let Some(h) = hot {
            let p = all.iter().position(|&x| x == h).unwrap_or(0);
            all.swap(0, p);
        }
        ids.extend_from_slice(&all[..k]);
    }
    ids
}

type Perm = (Vec<u32>, Vec<f32>, Vec<u32>, Vec<u32>, Vec<u32>, Vec<u32>, Vec<u32>);

fn cpu_perm(ids: &[u32], e: usize, k: usize) -> Result<Perm> {
    let m = ids.len();
    let (mut c, mut fr, mut o, mut t) = (vec![0u32; e], vec![0f32; e], vec![0u32; e + 1], vec![0u32; e + 1]);
    cpu::moe_count(&mut c, &mut o, &mut t, &mut fr, ids, e)?;
    let (mut tok, mut slot, mut inv) = (vec![0u32; m], vec![0u32; m], vec![0u32; m]);
    cpu::moe_permute(&mut tok, &mut slot, &mut inv, ids, &o, k)?;
    Ok((c, fr, o, t, tok, slot, inv))
}

fn check_moe_permute(dev: Device) -> Result<()> {
    let on = on(dev)?;
    let mut rng = StdRng::seed_from_u64(20);
    // (n, e, k, hot): big, all tokens to one expert, most experts empty,
    // E = 1024, one token.
    let cases = [
        (1000, 128, 8, None),
        (300, 16, 1, Some(5)),
        (257, 64, 4, Some(0)),
        (3, 64, 2, None),
        (70, 1024, 32, None),
        (1, 8, 8, None),
    ];
    for (n, e, k, hot) in cases {
        let ids = rand_ids(&mut rng, n, e, k, hot);
        let want = cpu_perm(&ids, e, k)?;
        let got = match &on {
            On::Cpu => cpu_perm(&ids, e, k)?,
            On::Gpu(g) => {
                let mut p = MoePermutation::new(g, n, k, e)?;
                lm::moe_permute(g, &mut p, &up(g, &ids)?, n, k, e)?;
                (
                    down(g, &p.counts)?,
                    down(g, &p.frac)?,
                    down(g, &p.offsets)?,
                    down(g, &p.tile_off)?,
                    down(g, &p.tok)?,
                    down(g, &p.slot)?,
                    down(g, &p.inv)?,
                )
            }
        };
        let tag = format!("n {n} e {e} k {k} hot {hot:?} on {dev}");
        assert_eq!(got.0, want.0, "counts {tag}");
        assert_eq!(got.1, want.1, "frac {tag}");
        assert_eq!(got.2, want.2, "offsets {tag}");
        assert_eq!(got.3, want.3, "tile_off {tag}");
        assert_eq!(got.4, want.4, "tok (stable order) {tag}");
        assert_eq!(got.5, want.5, "slot {tag}");
        assert_eq!(got.6, want.6, "inv {tag}");
    }
    Ok(())
}
twin_tests!(check_moe_permute, moe_permute_cpu, moe_permute_cuda);

/// Gather, weighted combine, the gather's backward (unweighted combine,
/// accumulating), the combine's backward, SwiGLU backward, bias update.
fn check_moe_elementwise(dev: Device) -> Result<()> {
    let on = on(dev)?;
    let mut rng = StdRng::seed_from_u64(30);
    for (n, e, k, c) in [(1, 4, 1, 1), (37, 8, 2, 300), (129, 64, 8, 257), (20, 16, 16, 64)] {
        let m = n * k;
        let ids = rand_ids(&mut rng, n, e, k, None);
        let (counts, _, _, _, tok, _, inv) = cpu_perm(&ids, e, k)?;
        let x = uniform(&mut rng, n * c, 2.0);
        let w = uniform(&mut rng, m, 1.0);
        let ye = uniform(&mut rng, m * c, 1.0);
        let dy = uniform(&mut rng, n * c, 1.0);
        let acc0 = uniform(&mut rng, n * c, 1.0);
        let (da, gg, uu) = (
            uniform(&mut rng, m * c, 1.0),
            uniform(&mut rng, m * c, 4.0),
            uniform(&mut rng, m * c, 2.0),
        );
        let bias0 = uniform(&mut rng, e, 0.1);
        // Twin results.
        let mut xe = vec![0f32; m * c];
        cpu::moe_gather(&mut xe, &x, &tok, c, Store::Bf16)?;
        let mut y = vec![0f32; n * c];
        cpu::moe_combine(&mut y, &ye, Some(&w), &inv, n, c, k, false)?;
        let mut yacc = acc0.clone();
        cpu::moe_combine(&mut yacc, &ye, None, &inv, n, c, k, true)?;
        let (mut dw, mut dye) = (vec![0f32; m], vec![0f32; m * c]);
        cpu::moe_combine_backward(&mut dw, &mut dye, &dy, &ye, &w, &inv, n, c, k, Store::Bf16)?;
        let (mut dg, mut du) = (vec![0f32; m * c], vec![0f32; m * c]);
        cpu::moe_swiglu_backward(&mut dg, &mut du, &da, &gg, &uu, Store::Bf16)?;
        let mut bias = bias0.clone();
        cpu::moe_bias_update(&mut bias, &counts, 0.001)?;
        // The f32-storage kernels' twins: the same functions with Store::F32.
        let mut xe32 = vec![0f32; m * c];
        cpu::moe_gather(&mut xe32, &x, &tok, c, Store::F32)?;
        let (mut dw32, mut dye32) = (vec![0f32; m], vec![0f32; m * c]);
        cpu::moe_combine_backward(&mut dw32, &mut dye32, &dy, &ye, &w, &inv, n, c, k, Store::F32)?;
        let (mut dg32, mut du32) = (vec![0f32; m * c], vec![0f32; m * c]);
        cpu::moe_swiglu_backward(&mut dg32, &mut du32, &da, &gg, &uu, Store::F32)?;
        let want = [xe, y, yacc, dw, dye, dg, du, bias, xe32, dw32, dye32, dg32, du32];
        let got: Vec<Vec<f32>> = match &on {
            On::Cpu => want.to_vec(),
            On::Gpu(g) => {
                let (tokd, invd) = (up(g, &tok)?, up(g, &inv)?);
                let (xd, wd, yed, dyd) = (up(g, &x)?, up(g, &w)?, up(g, &ye)?, up(g, &dy)?);
                let mut xed = g.zeros::<u16>(m * c)?;
                lm::moe_gather_bf16(g, &mut xed, &xd, &tokd, m, n, c)?;
                let mut yd = g.zeros::<f32>(n * c)?;
                lm::moe_combine_f32(g, &mut yd, &yed, Some(&wd), &invd, n, c, k, false)?;
                let mut yaccd = up(g, &acc0)?;
                lm::moe_combine_f32(g, &mut yaccd, &yed, None, &invd, n, c, k, true)?;
                let (mut dwd, mut dyed) = (g.zeros::<f32>(m)?, g.zeros::<u16>(m * c)?);
                lm::moe_combine_backward_bf16(g, &mut dwd, &mut dyed, &dyd, &yed, &wd, &invd, n, c, k)?;
                let (mut dgd, mut dud) = (g.zeros::<u16>(m * c)?, g.zeros::<u16>(m * c)?);
                let (dad, gd, ud) = (up(g, &da)?, up(g, &gg)?, up(g, &uu)?);
                lm::moe_swiglu_backward_bf16(g, &mut dgd, &mut dud, &dad, &gd, &ud, m * c)?;
                let mut bd = up(g, &bias0)?;
                lm::moe_bias_update_f32(g, &mut bd, &up(g, &counts)?, e, 0.001)?;
                let mut xe32d = g.zeros::<f32>(m * c)?;
                lm::moe_gather_f32(g, &mut xe32d, &xd, &tokd, m, n, c)?;
                let (mut dw32d, mut dye32d) = (g.zeros::<f32>(m)?, g.zeros::<f32>(m * c)?);
                lm::moe_combine_backward_f32(g, &mut dw32d, &mut dye32d, &dyd, &yed, &wd, &invd, n, c, k)?;
                let (mut dg32d, mut du32d) = (g.zeros::<f32>(m * c)?, g.zeros::<f32>(m * c)?);
                lm::moe_swiglu_backward_f32(g, &mut dg32d, &mut du32d, &dad, &gd, &ud, m * c)?;
                vec![
                    unbits(&down(g, &xed)?),
                    down(g, &yd)?,
                    down(g, &yaccd)?,
                    down(g, &dwd)?,
                    unbits(&down(g, &dyed)?),
                    unbits(&down(g, &dgd)?),
                    unbits(&down(g, &dud)?),
                    down(g, &bd)?,
                    down(g, &xe32d)?,
                    down(g, &dw32d)?,
                    down(g, &dye32d)?,
                    down(g, &dg32d)?,
                    down(g, &du32d)?,
                ]
            }
        };
        let tag = format!("n {n} e {e} k {k} c {c} on {dev}");
        // Gather, bf16 of w * dy, bias update: exact (same rounding of the same f32).
        assert_eq!(got[0], want[0], "gather {tag}");
        assert_eq!(got[4], want[4], "d ye {tag}");
        assert_eq!(got[7], want[7], "bias update {tag}");
        // Combine: the same k products summed in the same slot order, but
        // the GPU may fuse multiply-adds: a few ulp of |values| <= k.
        close(&format!("combine {tag}"), &got[1], &want[1], 1e-6 * k as f64, 1e-6);
        close(&format!("combine acc {tag}"), &got[2], &want[2], 1e-6 * k as f64, 1e-6);
        // d w: a dot over c terms |term| <= 1 in a different order.
        close(&format!("d w {tag}"), &got[3], &want[3], 2e-7 * c as f64, 1e-6);
        // SwiGLU backward: expf (fast math) vs exp, then bf16: 1 bf16 ulp
        // where the f32 values straddle a rounding boundary.
        close(&format!("d gate {tag}"), &got[5], &want[5], 1e-6, 2f64.powi(-7));
        close(&format!("d up {tag}"), &got[6], &want[6], 1e-6, 2f64.powi(-7));
        // f32 storage: the gather copies and d ye is one product (exact); d w
        // as above; SwiGLU backward differs by expf against exp only (a few
        // f32 ulp of terms <= 8 in magnitude).
        assert_eq!(got[8], want[8], "gather f32 {tag}");
        close(&format!("d w (f32) {tag}"), &got[9], &want[9], 2e-7 * c as f64, 1e-6);
        assert_eq!(got[10], want[10], "d ye f32 {tag}");
        close(&format!("d gate f32 {tag}"), &got[11], &want[11], 2e-6, 2e-6);
        close(&format!("d up f32 {tag}"), &got[12], &want[12], 2e-6, 2e-6);
    }
    Ok(())
}
twin_tests!(check_moe_elementwise, moe_elementwise_cpu, moe_elementwise_cuda);

/// Offsets for `e` experts and `m` rows from a count pattern: some experts
/// empty, one large, the rest random.
fn rand_offsets(rng: &mut StdRng, e: usize, m: usize) -> (Vec<u32>, Vec<u32>) {
    let mut counts = vec![0u32; e];
    for _ in 0..m {
        // Half of the rows to expert 1 (a long segment), none to expert 0.
        let x = if rng.random_bool(0.5) || e < 3 {
            1.min(e - 1)
        } else {
            rng.random_range(2..e)
        };
        counts[x] += 1;
    }
    let (mut o, mut t) = (vec![0u32; e + 1], vec![0u32; e + 1]);
    for x in 0..e {
        o[x + 1] = o[x] + counts[x];
        t[x + 1] = t[x] + counts[x].div_ceil(64);
    }
    (o, t)
}

fn check_moe_grouped(dev: Device) -> Result<()> {
    let on = on(dev)?;
    let mut rng = StdRng::seed_from_u64(40);
    // (m, e, k, n): tile edges (not multiples of 64 / 16), tiny, one expert.
    for (m, e, k, n) in [
        (300, 8, 48, 130),
        (17, 4, 5, 3),
        (128, 2, 64, 64),
        (200, 16, 33, 200),
        (70, 1, 16, 65),
    ] {
        for storage in [MoeStorage::Bf16, MoeStorage::F32] {
            let (off, tiles) = rand_offsets(&mut rng, e, m);
            // bf16 storage: exact bf16 values; f32: any f32.
            let mut gen = |len: usize| match storage {
                MoeStorage::Bf16 => bf16s(&mut rng, len, 1.0),
                MoeStorage::F32 => uniform(&mut rng, len, 1.0),
            };
            let (a, bt, b2) = (gen(m * k), gen(e * n * k), gen(e * n * k));
            let gb = gen(m * n);
            let out0 = uniform(&mut rng, m * n, 1.0);
            let store = store_of(storage);
            // Twin: out = a B^T (trans), out0 + a B (no trans, accumulate),
            // gate/up (k = C, n = F), weight gradient dw0 + a^T gb.
            let mut o1 = vec![0f32; m * n];
            cpu::moe_grouped_matmul(&mut o1, &a, &bt, &off, k, n, true, false)?;
            let mut o2 = out0.clone();
            cpu::moe_grouped_matmul(&mut o2, &a, &b2, &off, k, n, false, true)?;
            let (mut g, mut u, mut act) = (vec![0f32; m * n], vec![0f32; m * n], vec![0f32; m * n]);
            cpu::moe_grouped_gate_up(&mut g, &mut u, &mut act, &a, &bt, &b2, &off, k, n, store)?;
            let dw0 = uniform(&mut rng, e * k * n, 1.0);
            let mut dw = dw0.clone();
            cpu::moe_grouped_wgrad(&mut dw, &a, &gb, &off, k, n)?;
            let want = [o1, o2, g, u, act, dw];
            // Both kernel families against the same twin (f32: SIMT only).
            let maths: &[MoeMath] = match storage {
                MoeStorage::Bf16 => &[MoeMath::Simt, MoeMath::TensorCores],
                MoeStorage::F32 => &[MoeMath::Simt],
            };
            for &math in maths {
                let got: Vec<Vec<f32>> = match &on {
                    On::Cpu => want.to_vec(),
                    On::Gpu(gpu) if storage == MoeStorage::F32 => {
                        let (ad, btd, b2d, gbd) = (up(gpu, &a)?, up(gpu, &bt)?, up(gpu, &b2)?, up(gpu, &gb)?);
                        let (od, td) = (up(gpu, &off)?, up(gpu, &tiles)?);
                        let mut o1d = gpu.zeros::<f32>(m * n)?;
                        lm::moe_grouped_gemm_f32(gpu, &mut o1d, &ad, &btd, &od, &td, m, e, k, n, true, false)?;
                        let mut o2d = up(gpu, &out0)?;
                        lm::moe_grouped_gemm_f32(gpu, &mut o2d, &ad, &b2d, &od, &td, m, e, k, n, false, true)?;
                        let (mut gd, mut ud, mut actd) = (
                            gpu.zeros::<f32>(m * n)?,
                            gpu.zeros::<f32>(m * n)?,
                            gpu.zeros::<f32>(m * n)?,
                        );
                        lm::moe_grouped_gate_up_f32(
                            gpu, &mut gd, &mut ud, &mut actd, &ad, &btd, &b2d, &od, &td, m, e, k, n,
                        )?;
                        let mut dwd = up(gpu, &dw0)?;
                        lm::moe_grouped_wgrad_f32(gpu, &mut dwd, &ad, &gbd, &od, m, e, k, n)?;
                        vec![
                            down(gpu, &o1d)?,
                            down(gpu, &o2d)?,
                            down(gpu, &gd)?,
                            down(gpu, &ud)?,
                            down(gpu, &actd)?,
                            down(gpu, &dwd)?,
                        ]
                    }
                    On::Gpu(gpu) => {
                        let (ad, btd, b2d, gbd) = (
                            up(gpu, &bits(&a))?,
                            up(gpu, &bits(&bt))?,
                            up(gpu, &bits(&b2))?,
                            up(gpu, &bits(&gb))?,
                        );
                        let (od, td) = (up(gpu, &off)?, up(gpu, &tiles)?);
                        let mut o1d = gpu.zeros::<f32>(m * n)?;
                        lm::moe_grouped_gemm_bf16(gpu, &mut o1d, &ad, &btd, &od, &td, m, e, k, n, true, false, math)?;
                        let mut o2d = up(gpu, &out0)?;
                        lm::moe_grouped_gemm_bf16(gpu, &mut o2d, &ad, &b2d, &od, &td, m, e, k, n, false, true, math)?;
                        let (mut gd, mut ud, mut actd) = (
                            gpu.zeros::<f32>(m * n)?,
                            gpu.zeros::<f32>(m * n)?,
                            gpu.zeros::<u16>(m * n)?,
                        );
                        lm::moe_grouped_gate_up_bf16(
                            gpu, &mut gd, &mut ud, &mut actd, &ad, &btd, &b2d, &od, &td, m, e, k, n, math,
                        )?;
                        let mut dwd = up(gpu, &dw0)?;
                        lm::moe_grouped_wgrad_bf16(gpu, &mut dwd, &ad, &gbd, &od, m, e, k, n, math)?;
                        vec![
                            down(gpu, &o1d)?,
                            down(gpu, &o2d)?,
                            down(gpu, &gd)?,
                            down(gpu, &ud)?,
                            unbits(&down(gpu, &actd)?),
                            down(gpu, &dwd)?,
                        ]
                    }
                };
                let tag = format!("m {m} e {e} k {k} n {n} {math:?} {storage:?} on {dev}");
                // Products summed in f32 in another order (exact bf16 products, or
                // f32 products rounded once, fused or not): error <= depth * 2^-24
                // * sum |a b| with |a b| <= 1.
                let atol = 1.2e-7 * k as f64;
                close(&format!("grouped a B^T {tag}"), &got[0], &want[0], atol, 1e-6);
                close(&format!("grouped out + a B {tag}"), &got[1], &want[1], atol, 1e-6);
                close(&format!("gate {tag}"), &got[2], &want[2], atol, 1e-6);
                close(&format!("up {tag}"), &got[3], &want[3], atol, 1e-6);
                // act: bf16 of silu(g) u, one bf16 ulp where g, u differ by rounding
                // across a rounding boundary (|silu(g) u| <= k^2, ulp 2^-8 relative);
                // in f32, the g and u errors above times |d act / d (g, u)| <= k,
                // plus expf against exp (a few ulp).
                let act_rtol = match storage {
                    MoeStorage::Bf16 => 2f64.powi(-7),
                    MoeStorage::F32 => 1e-5,
                };
                close(&format!("act {tag}"), &got[4], &want[4], atol * k as f64, act_rtol);
                // dw: depth = the expert's rows (<= m).
                close(&format!("wgrad {tag}"), &got[5], &want[5], 1.2e-7 * m as f64, 1e-6);
            }
        }
    }
    Ok(())
}
twin_tests!(check_moe_grouped, moe_grouped_cpu, moe_grouped_cuda);

#[derive(Clone, Copy)]
struct LayerCase {
    d: MoeDims,
    hot: Option<usize>,
    seed: u64,
    /// Run the device's forward and backward twice and require the same
    /// bits (off only where the shape makes a second run too slow).
    rerun: bool,
}

fn check_moe_layer(dev: Device) -> Result<()> {
    let on = on(dev)?;
    let cases = [
        LayerCase {
            d: MoeDims {
                n: 64,
                c: 96,
                e: 16,
                k: 4,
                f: 40,
                f_shared: 48,
                gating: MoeGating::Softmax { renorm: true },
                math: MoeMath::TensorCores,
                storage: MoeStorage::Bf16,
            },
            hot: None,
            seed: 1,
            rerun: true,
        },
        LayerCase {
            d: MoeDims {
                n: 37,
                c: 64,
                e: 16,
                k: 3,
                f: 24,
                f_shared: 0,
                gating: sig(4, 2, true, 2.5),
                math: MoeMath::TensorCores,
                storage: MoeStorage::Bf16,
            },
            hot: None,
            seed: 2,
            rerun: true,
        },
        // All tokens to expert 2 (k = 1): every other expert gets none.
        LayerCase {
            d: MoeDims {
                n: 150,
                c: 32,
                e: 8,
                k: 1,
                f: 70,
                f_shared: 16,
                gating: MoeGating::Softmax { renorm: false },
                math: MoeMath::TensorCores,
                storage: MoeStorage::Bf16,
            },
            hot: Some(2),
            seed: 3,
            rerun: true,
        },
        // Few tokens, many experts: most empty.
        LayerCase {
            d: MoeDims {
                n: 3,
                c: 40,
                e: 64,
                k: 2,
                f: 16,
                f_shared: 0,
                gating: sig(8, 2, true, 1.0),
                math: MoeMath::TensorCores,
                storage: MoeStorage::Bf16,
            },
            hot: None,
            seed: 4,
            rerun: true,
        },
    ];
    // bf16 storage on both kernel families, f32 storage (SIMT).
    let kinds = [
        (MoeMath::Simt, MoeStorage::Bf16),
        (MoeMath::TensorCores, MoeStorage::Bf16),
        (MoeMath::Simt, MoeStorage::F32),
    ];
    let cases = cases.into_iter().flat_map(|c| {
        kinds.map(|(math, storage)| LayerCase {
            d: MoeDims { math, storage, ..c.d },
            ..c
        })
    });
    for case in cases {
        check_layer_case(&on, dev, case)?;
    }
    Ok(())
}
twin_tests!(check_moe_layer, moe_layer_cpu, moe_layer_cuda);

/// The MoE layer at a realistic shape, forward and backward against the CPU
/// twins, in bf16 storage on tensor cores and in f32 storage (SIMT).
///
/// Qwen3-MoE-30B-A3B's layer is C = 2,048, E = 128, top-8, expert width
/// 768, and a GRPO micro-batch is N ~ 4,096 tokens; on the emulated GPU
/// (every CUDA thread a CPU fiber) that takes far longer than CI allows. So
/// this keeps what decides the kernels' code paths at full size -- 128
/// experts and top-8 routing (a warp scanning 128 scores per token, taken
/// masks of four words, 4,096 permuted rows, a grid of 64 + 128 row tiles
/// of which many blocks find no work, C and F several 64-wide tiles and
/// 32-deep mma stages) -- and shrinks only the sizes that scale the arithmetic:
/// N = 512 tokens (4 per expert per slot on average, so the loads are
/// uneven and some segments are partial tiles), C = 256, F = 128, no
/// shared expert (as Qwen3-MoE). On the emulated GPU this takes ~23 s on 2
/// cores for both storages (one run each: the rerun that checks determinism
/// is left to the small shapes), where N = 4,096 and C = 2,048 would take
/// hours. Measured differences from the twin in f32 storage: at most 3e-7
/// absolute, 1.4e-5 relative, well inside the bar of `check_layer_case`.
fn check_moe_layer_realistic(dev: Device) -> Result<()> {
    let on = on(dev)?;
    let base = MoeDims {
        n: 512,
        c: 256,
        e: 128,
        k: 8,
        f: 128,
        f_shared: 0,
        gating: MoeGating::Softmax { renorm: true },
        math: MoeMath::TensorCores,
        storage: MoeStorage::Bf16,
    };
    for (math, storage) in [
        (MoeMath::TensorCores, MoeStorage::Bf16),
        (MoeMath::Simt, MoeStorage::F32),
    ] {
        let d = MoeDims { math, storage, ..base };
        // Determinism is checked at the small shapes; one run here.
        let case = LayerCase {
            d,
            hot: None,
            seed: 11,
            rerun: false,
        };
        check_layer_case(&on, dev, case)?;
    }
    Ok(())
}
twin_tests!(
    check_moe_layer_realistic,
    moe_layer_realistic_cpu,
    moe_layer_realistic_cuda
);

/// One layer case: the CPU twin's forward and backward against the device's
/// (or the twin again on the CPU); with `rerun`, a second device run must
/// give the same bits.
fn check_layer_case(on: &On, dev: Device, case: LayerCase) -> Result<()> {
    let LayerCase { d, hot, seed, rerun } = case;
    let mut rng = StdRng::seed_from_u64(seed);
    let (n, c, e, f, fs) = (d.n, d.c, d.e, d.f, d.f_shared);
    let sc = 1.0 / (c as f32).sqrt();
    let mut router = uniform(&mut rng, e * c, 2.0 * sc);
    let x: Vec<f32> = match hot {
        Some(h) => {
            router[h * c..(h + 1) * c].fill(1.0);
            (0..n * c).map(|_| rng.random_range(0.1..1.0)).collect()
        }
        None => uniform(&mut rng, n * c, 1.0),
    };
    let bias = matches!(d.gating, MoeGating::SigmoidGroup { .. }).then(|| uniform(&mut rng, e, 0.05));
    let f32s = d.storage == MoeStorage::F32;
    let mut gen = |len: usize, s: f32| {
        if f32s {
            uniform(&mut rng, len, s)
        } else {
            bf16s(&mut rng, len, s)
        }
    };
    let wg = gen(e * f * c, sc);
    let wu = gen(e * f * c, sc);
    let wd = gen(e * c * f, 1.0 / (f as f32).sqrt());
    let shared = (fs > 0).then(|| [gen(fs * c, sc), gen(fs * c, sc), gen(c * fs, 1.0 / (fs as f32).sqrt())]);
    let dy = uniform(&mut rng, n * c, 1.0);
    // The Switch aux-loss gradient on the probabilities (softmax only).
    let aux: Option<Vec<f32>> = matches!(d.gating, MoeGating::Softmax { .. }).then(|| uniform(&mut rng, e, 0.05));
    let wt = MoeLayerWeights {
        router: &router,
        bias: bias.as_deref(),
        w_gate: &wg,
        w_up: &wu,
        w_down: &wd,
        shared: shared.as_ref().map(|[a, b, c]| [&a[..], &b[..], &c[..]]),
    };
    let store = store_of(d.storage);
    let (y, saved) = cpu::moe_layer_forward(&d, &wt, &x, store)?;
    let mut dx = vec![0f32; n * c];
    let mut gr = MoeLayerGrads::zeros(&d);
    cpu::moe_layer_backward(&d, &wt, &saved, &x, &dy, aux.as_deref(), store, &mut dx, &mut gr)?;
    let (gy, gcounts, gdx, ggr) = match on {
        On::Cpu => (y.clone(), saved.counts.clone(), dx.clone(), gr.clone()),
        On::Gpu(g) if f32s => {
            // Every weight a view into one flat f32 buffer and every
            // gradient a view into one flat gradient buffer (as a model
            // keeps them), with a guard band before and after.
            const PAD: usize = 5;
            let sh = shared.as_ref();
            let parts: Vec<&[f32]> = [&router[..], bias.as_deref().unwrap_or(&[]), &wg, &wu, &wd]
                .into_iter()
                .chain(sh.into_iter().flat_map(|s| s.iter().map(|v| &v[..])))
                .collect();
            let mut flat = vec![7.0f32; PAD];
            let mut at = Vec::new();
            for p in &parts {
                at.push(flat.len());
                flat.extend_from_slice(p);
            }
            flat.extend_from_slice(&[7.0; PAD]);
            let pd = up(g, &flat)?;
            let view = |i: usize| pd.slice(at[i]..at[i] + parts[i].len());
            let w = MoeWeights {
                router: view(0),
                bias: bias.as_ref().map(|_| view(1)),
                experts: MoeExperts::F32(MoeExpertViews {
                    w_gate: view(2),
                    w_up: view(3),
                    w_down: view(4),
                    shared: sh.map(|_| [view(5), view(6), view(7)]),
                }),
            };
            // Gradients: router, the three stacked expert tensors (equal
            // sizes), the three shared ones (equal sizes); prefilled with
            // g0, so `+=` is checked.
            let (ec, efc, fsc) = (e * c, e * f * c, fs * c);
            let glen = PAD + ec + 3 * efc + 3 * fsc + PAD;
            let g0 = uniform(&mut StdRng::seed_from_u64(seed + 100), glen, 0.5);
            let mut buf = MoeBuffers::new(g, d)?;
            let (xd, dyd) = (up(g, &x)?, up(g, &dy)?);
            let auxd = aux.as_deref().map(|a| up(g, a)).transpose()?;
            let run = |y: &mut CudaSlice<f32>,
                       dx: &mut CudaSlice<f32>,
                       gflat: &mut CudaSlice<f32>,
                       buf: &mut MoeBuffers|
             -> Result<()> {
                ml::moe_layer_forward(g, y, &xd, &w, buf)?;
                let (_, mut rest) = gflat.split_at_mut(PAD);
                let (router_g, mut rest) = rest.split_at_mut(ec);
                let (experts_g, mut rest) = rest.split_at_mut(3 * efc);
                let mut ex = experts_g.chunks_exact_mut(efc.max(1));
                let shared_g = if fs > 0 {
                    let mut it = rest.slice_mut(0..3 * fsc).chunks_exact_mut(fsc);
                    match (it.next(), it.next(), it.next()) {
                        (Some(a), Some(b), Some(c)) => Some([a, b, c]),
                        _ => None,
                    }
                } else {
                    None
                };
                let (Some(w_gate), Some(w_up), Some(w_down)) = (ex.next(), ex.next(), ex.next()) else {
                    panic!("three expert gradient views");
                };
                let mut grv = MoeGradsMut {
                    router: router_g,
                    w_gate,
                    w_up,
                    w_down,
                    shared: shared_g,
                };
                ml::moe_layer_backward(g, dx, &mut grv, &dyd, &xd, &w, buf, auxd.as_ref())?;
                Ok(())
            };
            let (mut yd, mut dxd, mut gd) = (g.zeros::<f32>(n * c)?, g.zeros::<f32>(n * c)?, up(g, &g0)?);
            run(&mut yd, &mut dxd, &mut gd, &mut buf)?;
            let ids = down(g, &buf.ids)?;
            assert_eq!(ids, saved.ids, "layer routing, seed {seed} on {dev}");
            let counts = down(g, &buf.perm.counts)?;
            let gflat = down(g, &gd)?;
            if rerun {
                // Determinism: a rerun gives the same bits.
                let (mut y2, mut dx2, mut gd2) = (g.zeros::<f32>(n * c)?, g.zeros::<f32>(n * c)?, up(g, &g0)?);
                run(&mut y2, &mut dx2, &mut gd2, &mut buf)?;
                let tobits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<u32>>();
                assert_eq!(tobits(down(g, &y2)?), tobits(down(g, &yd)?), "rerun y, seed {seed}");
                assert_eq!(tobits(down(g, &dx2)?), tobits(down(g, &dxd)?), "rerun dx, seed {seed}");
                assert_eq!(
                    tobits(down(g, &gd2)?),
                    tobits(gflat.clone()),
                    "rerun grads, seed {seed}"
                );
            }
            // The guard bands and the parameters are untouched.
            assert_eq!(&gflat[..PAD], &g0[..PAD], "gradient guard band before");
            assert_eq!(&gflat[glen - PAD..], &g0[glen - PAD..], "gradient guard band after");
            assert_eq!(down(g, &pd)?, flat, "parameters untouched");
            let delta = |a: usize, len: usize| -> Vec<f32> { (a..a + len).map(|i| gflat[i] - g0[i]).collect() };
            let o = PAD + ec;
            let ggr = MoeLayerGrads {
                router: delta(PAD, ec),
                w_gate: delta(o, efc),
                w_up: delta(o + efc, efc),
                w_down: delta(o + 2 * efc, efc),
                shared: (fs > 0).then(|| {
                    let s0 = o + 3 * efc;
                    [delta(s0, fsc), delta(s0 + fsc, fsc), delta(s0 + 2 * fsc, fsc)]
                }),
            };
            (down(g, &yd)?, counts, down(g, &dxd)?, ggr)
        }
        On::Gpu(g) => {
            let w = MoeWeightsBf16 {
                router: up(g, &router)?,
                bias: bias.as_deref().map(|b| up(g, b)).transpose()?,
                w_gate: up(g, &bits(&wg))?,
                w_up: up(g, &bits(&wu))?,
                w_down: up(g, &bits(&wd))?,
                shared: match &shared {
                    Some([a, b, c]) => Some([up(g, &bits(a))?, up(g, &bits(b))?, up(g, &bits(c))?]),
                    None => None,
                },
            };
            let w = w.view();
            let mut buf = MoeBuffers::new(g, d)?;
            let (xd, dyd) = (up(g, &x)?, up(g, &dy)?);
            let mut yd = g.zeros::<f32>(n * c)?;
            ml::moe_layer_forward(g, &mut yd, &xd, &w, &mut buf)?;
            let ids = down(g, &buf.ids)?;
            assert_eq!(ids, saved.ids, "layer routing, seed {seed} on {dev}");
            let auxd = aux.as_deref().map(|a| up(g, a)).transpose()?;
            let mut dxd = g.zeros::<f32>(n * c)?;
            let mut grd = MoeGrads::zeros(g, &d)?;
            ml::moe_layer_backward(g, &mut dxd, &mut grd.view_mut(), &dyd, &xd, &w, &mut buf, auxd.as_ref())?;
            if rerun {
                // Determinism: no float atomics, so a rerun gives the same bits.
                let mut y2 = g.zeros::<f32>(n * c)?;
                ml::moe_layer_forward(g, &mut y2, &xd, &w, &mut buf)?;
                let mut dx2 = g.zeros::<f32>(n * c)?;
                let mut gr2 = MoeGrads::zeros(g, &d)?;
                ml::moe_layer_backward(g, &mut dx2, &mut gr2.view_mut(), &dyd, &xd, &w, &mut buf, auxd.as_ref())?;
                let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<u32>>();
                assert_eq!(bits(down(g, &y2)?), bits(down(g, &yd)?), "rerun y, seed {seed}");
                assert_eq!(bits(down(g, &dx2)?), bits(down(g, &dxd)?), "rerun dx, seed {seed}");
                assert_eq!(
                    bits(down(g, &gr2.w_gate)?),
                    bits(down(g, &grd.w_gate)?),
                    "rerun d w_gate, seed {seed}"
                );
                assert_eq!(
                    bits(down(g, &gr2.router)?),
                    bits(down(g, &grd.router)?),
                    "rerun d router, seed {seed}"
                );
                // A frozen layer's backward (the input gradient alone, no
                // weight gradient buffers): the same dx bits.
                let mut y3 = g.zeros::<f32>(n * c)?;
                ml::moe_layer_forward(g, &mut y3, &xd, &w, &mut buf)?;
                let mut dx3 = g.zeros::<f32>(n * c)?;
                ml::moe_layer_backward_dx(g, &mut dx3, &dyd, &xd, &w, &mut buf, auxd.as_ref())?;
                assert_eq!(bits(down(g, &dx3)?), bits(down(g, &dxd)?), "frozen dx, seed {seed}");
            }
            let ggr = MoeLayerGrads {
                router: down(g, &grd.router)?,
                w_gate: down(g, &grd.w_gate)?,
                w_up: down(g, &grd.w_up)?,
                w_down: down(g, &grd.w_down)?,
                shared: match &grd.shared {
                    Some([a, b, c]) => Some([down(g, a)?, down(g, b)?, down(g, c)?]),
                    None => None,
                },
            };
            (down(g, &yd)?, down(g, &buf.perm.counts)?, down(g, &dxd)?, ggr)
        }
    };
    let tag = format!("layer seed {seed} {:?} {:?} {:?} on {dev}", d.gating, d.math, d.storage);
    assert_eq!(gcounts, saved.counts, "expert loads {tag}");
    if let Some(h) = hot {
        assert_eq!(gcounts[h] as usize, n, "{tag}: all tokens on expert {h}");
    }
    // Same rounding points on both sides, but the f32 values rounded to
    // bf16 (act, d ye, d gate, d up) differ by f32 summation order, so a
    // few of them land one bf16 ulp (2^-8 relative) apart; each such flip
    // moves an output by at most 2^-8 of one O(1) product term. Outputs
    // are O(1): 3e-3 absolute + 1e-2 relative covers a few flips and
    // is still far below a wrong segment, slot or weight (O(1) errors).
    //
    // f32 storage: nothing is rounded to bf16, so the two sides differ
    // only by f32 summation order (products over C <= 256 or F <= 128
    // terms, weight gradients over up to N = 512 rows, |terms| <= 1) and
    // expf against exp: depth * 2^-24 * sum |terms|, ~1e-5 absolute at the
    // small cases' depths in the worst case and typically far less (rounding
    // errors of random sign grow with the square root of the depth); plus the 1e-7
    // rounding of reading a gradient back as (g0 + grad) - g0. So
    // 2e-5 absolute + 1e-4 relative (the training step's bar): a
    // wrong row, slot or weight is an O(1e-2..1) error.
    let (atol, rtol) = match d.storage {
        MoeStorage::Bf16 => (3e-3, 1e-2),
        MoeStorage::F32 => (2e-5, 1e-4),
    };
    close(&format!("y {tag}"), &gy, &y, atol, rtol);
    close(&format!("dx {tag}"), &gdx, &dx, atol, rtol);
    close(&format!("d router {tag}"), &ggr.router, &gr.router, atol, rtol);
    close(&format!("d w_gate {tag}"), &ggr.w_gate, &gr.w_gate, atol, rtol);
    close(&format!("d w_up {tag}"), &ggr.w_up, &gr.w_up, atol, rtol);
    close(&format!("d w_down {tag}"), &ggr.w_down, &gr.w_down, atol, rtol);
    if let (Some(a), Some(b)) = (&ggr.shared, &gr.shared) {
        for i in 0..3 {
            close(&format!("d shared {i} {tag}"), &a[i], &b[i], atol, rtol);
        }
    }
    if d.storage == MoeStorage::F32 {
        // The largest absolute difference, and the largest relative one
        // where |twin| > 1e-2.
        let worst = |a: &[f32], b: &[f32]| {
            a.iter().zip(b).fold((0.0f32, 0.0f32), |(ab, rel), (x, y)| {
                let d = (x - y).abs();
                (ab.max(d), if y.abs() > 1e-2 { rel.max(d / y.abs()) } else { rel })
            })
        };
        let all = [
            ("y", worst(&gy, &y)),
            ("dx", worst(&gdx, &dx)),
            ("d router", worst(&ggr.router, &gr.router)),
            ("d w_gate", worst(&ggr.w_gate, &gr.w_gate)),
            ("d w_up", worst(&ggr.w_up, &gr.w_up)),
            ("d w_down", worst(&ggr.w_down, &gr.w_down)),
        ];
        let line: Vec<String> = all
            .iter()
            .map(|(w, (a, r))| format!("{w} {a:.1e} abs {r:.1e} rel"))
            .collect();
        eprintln!("{tag}: max differences: {}", line.join(", "));
    }
    Ok(())
}
