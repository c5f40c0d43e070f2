//! The CPU twin of `aha_cuda_kernels::moe_layer`: the twins of
//! [`super::moe`] chained in the same order, forward and backward, so that
//! the GPU layer is checked against it step for step and it is checked
//! against `aha_moe_model`'s CPU MoE layer (with [`Store::F32`] the two are
//! the same math, in another summation order). `MoeDims::math` and
//! `MoeDims::storage` are ignored here: the SIMT and tensor-core kernels
//! share one contract, and the `store` argument sets the rounding (the
//! device layer's bf16 storage is `Store::Bf16`, its f32 storage `Store::F32`).

use super::moe::{
    moe_combine, moe_combine_backward, moe_count, moe_gather, moe_grouped_gate_up, moe_grouped_matmul,
    moe_grouped_wgrad, moe_permute, moe_route, moe_route_backward, moe_swiglu_backward, Store,
};
use super::{matmul, Gemm};
use crate::error::{Error, Result};

pub use aha_cuda_kernels::moe_layer::MoeDims;

/// One layer's parameters as f32 slices, in the device layout: router
/// `[E, C]`, bias `[E]`, `w_gate, w_up [E, F, C]`, `w_down [E, C, F]`, shared
/// `(gate [Fs, C], up [Fs, C], down [C, Fs])`. For a bf16 twin the expert
/// weights hold values that are exact bf16s.
#[derive(Debug, Clone, Copy)]
pub struct MoeLayerWeights<'a> {
    /// Router weight.
    pub router: &'a [f32],
    /// `e_score_correction_bias`.
    pub bias: Option<&'a [f32]>,
    /// Expert gate_proj.
    pub w_gate: &'a [f32],
    /// Expert up_proj.
    pub w_up: &'a [f32],
    /// Expert down_proj.
    pub w_down: &'a [f32],
    /// Shared expert (gate, up, down).
    pub shared: Option<[&'a [f32]; 3]>,
}

/// Gradients of [`MoeLayerWeights`], accumulated by [`moe_layer_backward`].
#[derive(Debug, Clone, PartialEq)]
pub struct MoeLayerGrads {
    /// d router [E, C].
    pub router: Vec<f32>,
    /// d gate_proj [E, F, C].
    pub w_gate: Vec<f32>,
    /// d up_proj [E, F, C].
    pub w_up: Vec<f32>,
    /// d down_proj [E, C, F].
    pub w_down: Vec<f32>,
    /// d shared (gate, up, down).
    pub shared: Option<[Vec<f32>; 3]>,
}

impl MoeLayerGrads {
    /// Zeroed gradients for `d`.
    pub fn zeros(d: &MoeDims) -> MoeLayerGrads {
        let (c, e, f, fs) = (d.c, d.e, d.f, d.f_shared);
        MoeLayerGrads {
            router: vec![0.0; e * c],
            w_gate: vec![0.0; e * f * c],
            w_up: vec![0.0; e * f * c],
            w_down: vec![0.0; e * c * f],
            shared: (fs > 0).then(|| [vec![0.0; fs * c], vec![0.0; fs * c], vec![0.0; c * fs]]),
        }
    }
}

/// What the forward saves (the fields of `aha_cuda_kernels::moe_layer::MoeBuffers`).
#[derive(Debug, Clone, PartialEq)]
pub struct MoeLayerSaved {
    /// Probabilities or scores [N, E].
    pub probs: Vec<f32>,
    /// Chosen experts [N, K].
    pub ids: Vec<u32>,
    /// Routing weights [N, K].
    pub w: Vec<f32>,
    /// Denominators [N].
    pub denom: Vec<f32>,
    /// Tokens per expert [E].
    pub counts: Vec<u32>,
    /// Load fractions [E].
    pub frac: Vec<f32>,
    /// Segment offsets [E + 1].
    pub offsets: Vec<u32>,
    /// Tile list [E + 1].
    pub tile_off: Vec<u32>,
    /// Token of each permuted row [M].
    pub tok: Vec<u32>,
    /// Slot of each permuted row [M].
    pub slot: Vec<u32>,
    /// Permuted row of each (token, slot) [N K].
    pub inv: Vec<u32>,
    /// Stored x in expert order [M, C].
    pub xe: Vec<f32>,
    /// Gate projections [M, F].
    pub g: Vec<f32>,
    /// Up projections [M, F].
    pub u: Vec<f32>,
    /// Stored SwiGLU [M, F].
    pub act: Vec<f32>,
    /// Expert outputs [M, C].
    pub ye: Vec<f32>,
    /// Shared expert: stored x [N, C], g, u [N, Fs], stored act [N, Fs].
    pub shared: Option<[Vec<f32>; 4]>,
}

fn check(d: &MoeDims, wt: &MoeLayerWeights, x: usize) -> Result<()> {
    let ok = x == d.n * d.c
        && wt.router.len() == d.e * d.c
        && wt.w_gate.len() == d.e * d.f * d.c
        && wt.w_up.len() == d.e * d.f * d.c
        && wt.w_down.len() == d.e * d.c * d.f
        && wt.shared.is_some() == (d.f_shared > 0)
        && wt.shared.is_none_or(|s| s.iter().all(|v| v.len() == d.f_shared * d.c));
    if !ok {
        return Err(Error::InvalidArgument {
            op: "moe_layer",
            msg: format!("input or weights do not match {d:?}"),
        });
    }
    Ok(())
}

/// The layer forward (twin of `aha_cuda_kernels::moe_layer::moe_layer_forward`):
/// returns `y [N, C]` and what the backward needs. `store` = [`Store::Bf16`]
/// rounds where the kernels store bf16.
pub fn moe_layer_forward(
    d: &MoeDims,
    wt: &MoeLayerWeights,
    x: &[f32],
    store: Store,
) -> Result<(Vec<f32>, MoeLayerSaved)> {
    check(d, wt, x.len())?;
    let (n, c, e, k, f, m) = (d.n, d.c, d.e, d.k, d.f, d.m());
    let mut logits = vec![0f32; n * e];
    matmul(&mut logits, x, wt.router, Gemm::new(n, c, e).tb())?;
    let (mut probs, mut ids, mut w, mut denom) = (vec![0f32; n * e], vec![0u32; m], vec![0f32; m], vec![0f32; n]);
    moe_route(
        &mut probs, &mut ids, &mut w, &mut denom, &logits, wt.bias, n, e, k, d.gating,
    )?;
    let (mut counts, mut frac) = (vec![0u32; e], vec![0f32; e]);
    let (mut offsets, mut tile_off) = (vec![0u32; e + 1], vec![0u32; e + 1]);
    moe_count(&mut counts, &mut offsets, &mut tile_off, &mut frac, &ids, e)?;
    let (mut tok, mut slot, mut inv) = (vec![0u32; m], vec![0u32; m], vec![0u32; m]);
    moe_permute(&mut tok, &mut slot, &mut inv, &ids, &offsets, k)?;
    let mut xe = vec![0f32; m * c];
    moe_gather(&mut xe, x, &tok, c, store)?;
    let (mut g, mut u, mut act) = (vec![0f32; m * f], vec![0f32; m * f], vec![0f32; m * f]);
    moe_grouped_gate_up(&mut g, &mut u, &mut act, &xe, wt.w_gate, wt.w_up, &offsets, c, f, store)?;
    let mut ye = vec![0f32; m * c];
    moe_grouped_matmul(&mut ye, &act, wt.w_down, &offsets, f, c, true, false)?;
    let mut y = vec![0f32; n * c];
    moe_combine(&mut y, &ye, Some(&w), &inv, n, c, k, false)?;
    let shared = match wt.shared {
        Some([sg, su, sd]) => {
            let fs = d.f_shared;
            let one = [0u32, n as u32];
            let xs: Vec<f32> = x.iter().map(|&v| store.apply(v)).collect();
            let (mut gs, mut us, mut acts) = (vec![0f32; n * fs], vec![0f32; n * fs], vec![0f32; n * fs]);
            moe_grouped_gate_up(&mut gs, &mut us, &mut acts, &xs, sg, su, &one, c, fs, store)?;
            moe_grouped_matmul(&mut y, &acts, sd, &one, fs, c, true, true)?;
            Some([xs, gs, us, acts])
        }
        None => None,
    };
    Ok((
        y,
        MoeLayerSaved {
            probs,
            ids,
            w,
            denom,
            counts,
            frac,
            offsets,
            tile_off,
            tok,
            slot,
            inv,
            xe,
            g,
            u,
            act,
            ye,
            shared,
        },
    ))
}

/// The layer backward (twin of `aha_cuda_kernels::moe_layer::moe_layer_backward`):
/// `dx [N, C] +=` and `gr +=`, from `dy [N, C]`; `aux [E]` as there.
pub fn moe_layer_backward(
    d: &MoeDims,
    wt: &MoeLayerWeights,
    s: &MoeLayerSaved,
    x: &[f32],
    dy: &[f32],
    aux: Option<&[f32]>,
    store: Store,
    dx: &mut [f32],
    gr: &mut MoeLayerGrads,
) -> Result<()> {
    check(d, wt, x.len())?;
    let (n, c, e, k, f, m) = (d.n, d.c, d.e, d.k, d.f, d.m());
    let (mut dw, mut dye) = (vec![0f32; m], vec![0f32; m * c]);
    moe_combine_backward(&mut dw, &mut dye, dy, &s.ye, &s.w, &s.inv, n, c, k, store)?;
    let mut dact = vec![0f32; m * f];
    moe_grouped_matmul(&mut dact, &dye, wt.w_down, &s.offsets, c, f, false, false)?;
    moe_grouped_wgrad(&mut gr.w_down, &dye, &s.act, &s.offsets, c, f)?;
    let (mut dg, mut du) = (vec![0f32; m * f], vec![0f32; m * f]);
    moe_swiglu_backward(&mut dg, &mut du, &dact, &s.g, &s.u, store)?;
    let mut dxe = vec![0f32; m * c];
    moe_grouped_matmul(&mut dxe, &dg, wt.w_gate, &s.offsets, f, c, false, false)?;
    moe_grouped_matmul(&mut dxe, &du, wt.w_up, &s.offsets, f, c, false, true)?;
    moe_grouped_wgrad(&mut gr.w_gate, &dg, &s.xe, &s.offsets, f, c)?;
    moe_grouped_wgrad(&mut gr.w_up, &du, &s.xe, &s.offsets, f, c)?;
    moe_combine(dx, &dxe, None, &s.inv, n, c, k, true)?;
    let mut dlogits = vec![0f32; n * e];
    moe_route_backward(
        &mut dlogits,
        &dw,
        &s.w,
        &s.ids,
        &s.probs,
        &s.denom,
        aux,
        n,
        e,
        k,
        d.gating,
    )?;
    matmul(dx, &dlogits, wt.router, Gemm::new(n, e, c).acc())?;
    matmul(&mut gr.router, &dlogits, x, Gemm::new(e, n, c).ta().acc())?;
    if let (Some([sg, su, sd]), Some([xs, gs, us, acts]), Some([dsg, dsu, dsd])) =
        (wt.shared, &s.shared, &mut gr.shared)
    {
        let fs = d.f_shared;
        let one = [0u32, n as u32];
        let dys: Vec<f32> = dy.iter().map(|&v| store.apply(v)).collect();
        let mut da = vec![0f32; n * fs];
        moe_grouped_matmul(&mut da, &dys, sd, &one, c, fs, false, false)?;
        moe_grouped_wgrad(dsd, &dys, acts, &one, c, fs)?;
        let (mut dgs, mut dus) = (vec![0f32; n * fs], vec![0f32; n * fs]);
        moe_swiglu_backward(&mut dgs, &mut dus, &da, gs, us, store)?;
        moe_grouped_matmul(dx, &dgs, sg, &one, fs, c, false, true)?;
        moe_grouped_matmul(dx, &dus, su, &one, fs, c, false, true)?;
        moe_grouped_wgrad(dsg, &dgs, xs, &one, fs, c)?;
        moe_grouped_wgrad(dsu, &dus, xs, &one, fs, c)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The composed twin layer's backward against central differences of its
    //! forward (f32, so the step is large and the tolerance loose; the exact
    //! agreement with the model's layer is tested in aha-moe-model).
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::needless_range_loop)]

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::cpu::{MoeGating, MoeMath, MoeStorage};

    struct Layer {
        d: MoeDims,
        x: Vec<f32>,
        /// router, bias, w_gate, w_up, w_down, shared gate, up, down.
        w: Vec<Vec<f32>>,
        r: Vec<f32>,
    }

    impl Layer {
        fn weights(&self) -> MoeLayerWeights<'_> {
            let w = &self.w;
            MoeLayerWeights {
                router: &w[0],
                bias: matches!(self.d.gating, MoeGating::SigmoidGroup { .. }).then_some(&w[1][..]),
                w_gate: &w[2],
                w_up: &w[3],
                w_down: &w[4],
                shared: (self.d.f_shared > 0).then(|| [&w[5][..], &w[6][..], &w[7][..]]),
            }
        }

        /// (loss = sum y * r in f64, the chosen experts).
        fn loss(&self) -> (f64, Vec<u32>) {
            let (y, s) = moe_layer_forward(&self.d, &self.weights(), &self.x, Store::F32).unwrap();
            (y.iter().zip(&self.r).map(|(&a, &b)| a as f64 * b as f64).sum(), s.ids)
        }
    }

    fn fd(layer: &mut Layer, which: usize, grad: &[f32], what: &str) {
        let h = 1e-2f32;
        let (_, ids0) = layer.loss();
        let len = if which == 8 {
            layer.x.len()
        } else {
            layer.w[which].len()
        };
        let (mut checked, mut bad) = (0, Vec::new());
        for i in (0..len).step_by((len / 12).max(1)) {
            let set = |l: &mut Layer, v: f32| {
                if which == 8 {
                    l.x[i] = v;
                } else {
                    l.w[which][i] = v;
                }
            };
            let orig = if which == 8 { layer.x[i] } else { layer.w[which][i] };
            set(layer, orig + h);
            let (lp, ip) = layer.loss();
            set(layer, orig - h);
            let (lm, im) = layer.loss();
            set(layer, orig);
            if ip != ids0 || im != ids0 {
                continue; // the choice changed inside the step: not differentiable here
            }
            checked += 1;
            let num = (lp - lm) / (2.0 * h as f64);
            let a = grad[i] as f64;
            // f32 forward: loss error ~1e-6 over a 2e-2 step (5e-5), plus the
            // O(h^2) term of smooth SwiGLU / sigmoid / softmax curvature.
            if (num - a).abs() > 2e-3 + 2e-2 * a.abs() {
                bad.push(format!("  [{i}] analytic {a:e} numeric {num:e}"));
            }
        }
        assert!(checked > 0, "{what}: every probe changed the routing");
        assert!(bad.is_empty(), "{what}:\n{}", bad.join("\n"));
    }

    fn check(gating: MoeGating, f_shared: usize, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let (n, c, e, k, f) = (5, 6, 4, 2, 5);
        let d = MoeDims {
            n,
            c,
            e,
            k,
            f,
            f_shared,
            gating,
            math: MoeMath::TensorCores,
            storage: MoeStorage::F32,
        };
        let mut v = |len: usize, s: f32| -> Vec<f32> { (0..len).map(|_| rng.random_range(-s..s)).collect() };
        let w = vec![
            v(e * c, 1.0),
            v(e, 0.1),
            v(e * f * c, 0.6),
            v(e * f * c, 0.6),
            v(e * c * f, 0.6),
            v(f_shared * c, 0.6),
            v(f_shared * c, 0.6),
            v(c * f_shared, 0.6),
        ];
        let mut layer = Layer {
            d,
            x: v(n * c, 1.0),
            r: v(n * c, 1.0),
            w,
        };
        let (_, s) = moe_layer_forward(&d, &layer.weights(), &layer.x, Store::F32).unwrap();
        let mut dx = vec![0f32; n * c];
        let mut gr = MoeLayerGrads::zeros(&d);
        moe_layer_backward(
            &d,
            &layer.weights(),
            &s,
            &layer.x,
            &layer.r,
            None,
            Store::F32,
            &mut dx,
            &mut gr,
        )
        .unwrap();
        fd(&mut layer, 8, &dx, "dx");
        fd(&mut layer, 0, &gr.router.clone(), "d router");
        fd(&mut layer, 2, &gr.w_gate.clone(), "d w_gate");
        fd(&mut layer, 3, &gr.w_up.clone(), "d w_up");
        fd(&mut layer, 4, &gr.w_down.clone(), "d w_down");
        if let Some([g, u, dd]) = gr.shared.clone() {
            fd(&mut layer, 5, &g, "d shared gate");
            fd(&mut layer, 6, &u, "d shared up");
            fd(&mut layer, 7, &dd, "d shared down");
        }
    }

    #[test]
    fn softmax_layer_gradients_match_finite_differences() {
        check(MoeGating::Softmax { renorm: true }, 0, 11);
        check(MoeGating::Softmax { renorm: false }, 3, 12);
    }

    #[test]
    fn sigmoid_group_layer_gradients_match_finite_differences() {
        let g = |renorm| MoeGating::SigmoidGroup {
            n_group: 2,
            topk_group: 1,
            renorm,
            scaling: 2.5,
        };
        check(g(true), 3, 13);
        check(g(false), 0, 14);
    }
}
