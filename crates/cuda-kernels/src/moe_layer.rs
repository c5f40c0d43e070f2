//! A whole mixture-of-experts layer on the device: the launchers of
//! [`crate::launch_moe`] (and cuBLAS for the f32 router product) in order,
//! forward and backward, with no copy to the host anywhere: counts, offsets
//! and the tile list are produced and consumed on the device.
//!
//! Forward (`x [N, C]` f32, normed input):
//! logits = x router^T (f32) -> route -> permute (counts, offsets, stable
//! order, inverse) -> gather xe = bf16(x) in expert order -> fused gate/up +
//! SwiGLU (act bf16) -> down (ye f32) -> y = sum_j w_j ye (gather through
//! the inverse map) -> + shared expert (the same grouped kernels over one
//! segment holding every token).
//!
//! The CPU twin of the composition is `aha_tensor::cpu::moe` step by step;
//! its reference is `aha_moe_model`'s CPU MoE layer.

use cudarc::driver::CudaSlice;

use crate::blas::{matmul_f32, MatmulShape};
use crate::device::Gpu;
use crate::error::{Error, Result};
use crate::launch::cast_f32_to_bf16;
use crate::launch_moe::{
    moe_combine_backward_bf16, moe_combine_f32, moe_gather_bf16, moe_grouped_gate_up_bf16, moe_grouped_gemm_bf16,
    moe_grouped_wgrad_bf16, moe_permute, moe_route_backward_f32, moe_route_f32, moe_swiglu_backward_bf16, MoeGating,
    MoeMath, MoePermutation, MOE_TILE_ROWS,
};

/// The sizes of one MoE layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MoeDims {
    /// Tokens (N).
    pub n: usize,
    /// Hidden width (C).
    pub c: usize,
    /// Routed experts (E).
    pub e: usize,
    /// Experts per token (K).
    pub k: usize,
    /// Width of each routed expert (F).
    pub f: usize,
    /// Width of the shared expert (0: none).
    pub f_shared: usize,
    /// The routing rule.
    pub gating: MoeGating,
    /// SIMT or tensor-core kernels for the grouped products.
    pub math: MoeMath,
}

impl MoeDims {
    /// Permuted rows, N * K.
    pub fn m(&self) -> usize {
        self.n * self.k
    }
}

/// The parameters of one layer on the device. Expert weights are bf16
/// (u16 bits) in PyTorch's `[out, in]` layout, stacked over experts.
#[derive(Debug)]
pub struct MoeWeights {
    /// Router `gate.weight` [E, C], f32.
    pub router: CudaSlice<f32>,
    /// `e_score_correction_bias` [E] (sigmoid gating), f32.
    pub bias: Option<CudaSlice<f32>>,
    /// gate_proj of every expert [E, F, C].
    pub w_gate: CudaSlice<u16>,
    /// up_proj of every expert [E, F, C].
    pub w_up: CudaSlice<u16>,
    /// down_proj of every expert [E, C, F].
    pub w_down: CudaSlice<u16>,
    /// Shared expert (gate [Fs, C], up [Fs, C], down [C, Fs]), if any.
    pub shared: Option<[CudaSlice<u16>; 3]>,
}

/// A zeroed buffer of `len` elements, at least one (the driver refuses
/// empty allocations; every launcher accepts longer buffers).
fn zeros1<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    gpu: &Gpu,
    len: usize,
) -> Result<CudaSlice<T>> {
    gpu.zeros(len.max(1))
}

/// Gradients of [`MoeWeights`] (f32, accumulated by [`moe_layer_backward`]).
#[derive(Debug)]
pub struct MoeGrads {
    /// d router [E, C].
    pub router: CudaSlice<f32>,
    /// d gate_proj [E, F, C].
    pub w_gate: CudaSlice<f32>,
    /// d up_proj [E, F, C].
    pub w_up: CudaSlice<f32>,
    /// d down_proj [E, C, F].
    pub w_down: CudaSlice<f32>,
    /// d shared (gate, up, down), if any.
    pub shared: Option<[CudaSlice<f32>; 3]>,
}

impl MoeGrads {
    /// Zeroed gradients for `d`.
    pub fn zeros(gpu: &Gpu, d: &MoeDims) -> Result<MoeGrads> {
        let (c, e, f, fs) = (d.c, d.e, d.f, d.f_shared);
        Ok(MoeGrads {
            router: zeros1(gpu, e * c)?,
            w_gate: zeros1(gpu, e * f * c)?,
            w_up: zeros1(gpu, e * f * c)?,
            w_down: zeros1(gpu, e * c * f)?,
            shared: if fs > 0 {
                Some([zeros1(gpu, fs * c)?, zeros1(gpu, fs * c)?, zeros1(gpu, c * fs)?])
            } else {
                None
            },
        })
    }
}

/// Everything the forward saves and the backward works in, allocated once
/// for a layer's sizes (reused across steps, so a step allocates nothing).
#[derive(Debug)]
pub struct MoeBuffers {
    /// The sizes these buffers are for.
    pub dims: MoeDims,
    /// Router logits [N, E] (scratch of the forward).
    pub logits: CudaSlice<f32>,
    /// Softmax probabilities or sigmoid scores [N, E].
    pub probs: CudaSlice<f32>,
    /// Chosen experts [N, K].
    pub ids: CudaSlice<u32>,
    /// Routing weights [N, K].
    pub w: CudaSlice<f32>,
    /// Renormalisation denominators [N].
    pub denom: CudaSlice<f32>,
    /// The permutation and the expert-load statistics.
    pub perm: MoePermutation,
    /// Token rows in expert order [M, C], bf16.
    pub xe: CudaSlice<u16>,
    /// Gate projections [M, F].
    pub g: CudaSlice<f32>,
    /// Up projections [M, F].
    pub u: CudaSlice<f32>,
    /// SwiGLU activations [M, F], bf16.
    pub act: CudaSlice<u16>,
    /// Expert outputs [M, C].
    pub ye: CudaSlice<f32>,
    /// Backward: d routing weights [N, K].
    pub dw: CudaSlice<f32>,
    /// Backward: d expert outputs [M, C], bf16.
    pub dye: CudaSlice<u16>,
    /// Backward: d activations [M, F] (f32).
    pub dact: CudaSlice<f32>,
    /// Backward: d gate / d up [M, F], bf16.
    pub dg: CudaSlice<u16>,
    /// See `dg`.
    pub du: CudaSlice<u16>,
    /// Backward: d xe [M, C] (f32).
    pub dxe: CudaSlice<f32>,
    /// Backward: d logits [N, E].
    pub dlogits: CudaSlice<f32>,
    /// The shared expert's buffers, if any.
    pub shared: Option<SharedBuffers>,
}

/// The shared expert's saved activations and scratch (one segment: all N tokens).
#[derive(Debug)]
pub struct SharedBuffers {
    /// Offsets `[0, N]` of the single segment.
    pub offsets: CudaSlice<u32>,
    /// Tile list `[0, ceil(N / 64)]`.
    pub tile_off: CudaSlice<u32>,
    /// bf16(x) [N, C].
    pub xs: CudaSlice<u16>,
    /// Gate and up projections [N, Fs].
    pub g: CudaSlice<f32>,
    /// See `g`.
    pub u: CudaSlice<f32>,
    /// SwiGLU [N, Fs], bf16.
    pub act: CudaSlice<u16>,
    /// Backward: bf16(dy) [N, C].
    pub dys: CudaSlice<u16>,
    /// Backward: d act [N, Fs].
    pub dact: CudaSlice<f32>,
    /// Backward: d gate / d up [N, Fs], bf16.
    pub dg: CudaSlice<u16>,
    /// See `dg`.
    pub du: CudaSlice<u16>,
}

impl MoeBuffers {
    /// Zeroed buffers for `dims`.
    pub fn new(gpu: &Gpu, dims: MoeDims) -> Result<MoeBuffers> {
        let (n, c, e, k, f, fs) = (dims.n, dims.c, dims.e, dims.k, dims.f, dims.f_shared);
        let m = n.checked_mul(k).ok_or_else(|| Error::InvalidArgument {
            op: "MoeBuffers::new",
            msg: format!("{n} tokens x top-{k} overflow"),
        })?;
        let shared = if fs > 0 {
            let nu = u32::try_from(n).map_err(|_| Error::InvalidArgument {
                op: "MoeBuffers::new",
                msg: format!("{n} tokens exceed u32"),
            })?;
            Some(SharedBuffers {
                offsets: gpu.upload(&[0u32, nu])?,
                tile_off: gpu.upload(&[0u32, n.div_ceil(MOE_TILE_ROWS) as u32])?,
                xs: zeros1(gpu, n * c)?,
                g: zeros1(gpu, n * fs)?,
                u: zeros1(gpu, n * fs)?,
                act: zeros1(gpu, n * fs)?,
                dys: zeros1(gpu, n * c)?,
                dact: zeros1(gpu, n * fs)?,
                dg: zeros1(gpu, n * fs)?,
                du: zeros1(gpu, n * fs)?,
            })
        } else {
            None
        };
        Ok(MoeBuffers {
            dims,
            logits: zeros1(gpu, n * e)?,
            probs: zeros1(gpu, n * e)?,
            ids: zeros1(gpu, m)?,
            w: zeros1(gpu, m)?,
            denom: zeros1(gpu, n)?,
            perm: MoePermutation::new(gpu, n, k, e)?,
            xe: zeros1(gpu, m * c)?,
            g: zeros1(gpu, m * f)?,
            u: zeros1(gpu, m * f)?,
            act: zeros1(gpu, m * f)?,
            ye: zeros1(gpu, m * c)?,
            dw: zeros1(gpu, m)?,
            dye: zeros1(gpu, m * c)?,
            dact: zeros1(gpu, m * f)?,
            dg: zeros1(gpu, m * f)?,
            du: zeros1(gpu, m * f)?,
            dxe: zeros1(gpu, m * c)?,
            dlogits: zeros1(gpu, n * e)?,
            shared,
        })
    }
}

/// Checks what the layer slices itself (the launchers check the rest):
/// `lens` = (x, router, y or dx, d router; `usize::MAX` in the forward) against `d`, and that the
/// weights and the buffers agree on a shared expert.
pub fn plan_moe_layer(d: &MoeDims, lens: [usize; 4], has_shared: (bool, bool)) -> Result<()> {
    let op = "moe_layer";
    let want = [
        ("x", d.n.checked_mul(d.c)),
        ("router", d.e.checked_mul(d.c)),
        ("y / dx", d.n.checked_mul(d.c)),
        ("d router", d.e.checked_mul(d.c)),
    ];
    for (i, (what, w)) in want.iter().enumerate() {
        let w = w.ok_or_else(|| Error::InvalidArgument {
            op,
            msg: format!("{what}: size overflows"),
        })?;
        if lens[i] < w {
            return Err(Error::InvalidArgument {
                op,
                msg: format!("{what} holds {} elements, needs {w}", lens[i]),
            });
        }
    }
    if has_shared.0 != has_shared.1 {
        return Err(Error::InvalidArgument {
            op: "moe_layer",
            msg: "the weights and the buffers disagree on a shared expert".into(),
        });
    }
    Ok(())
}

/// The layer's forward: `y [N, C] =` (assigned) the MoE of `x [N, C]`;
/// saves what the backward needs in `b` (sized for the same dims). The
/// expert loads are in `b.perm.counts` / `b.perm.frac` afterwards.
pub fn moe_layer_forward(
    gpu: &Gpu,
    y: &mut CudaSlice<f32>,
    x: &CudaSlice<f32>,
    wt: &MoeWeights,
    b: &mut MoeBuffers,
) -> Result<()> {
    let d = b.dims;
    plan_moe_layer(
        &d,
        [x.len(), wt.router.len(), y.len(), usize::MAX],
        (wt.shared.is_some(), b.shared.is_some()),
    )?;
    let (n, c, e, k, f, m) = (d.n, d.c, d.e, d.k, d.f, d.m());
    if n == 0 {
        return Ok(());
    }
    let s = MatmulShape {
        m: n,
        k: c,
        n: e,
        trans_a: false,
        trans_b: true,
        accumulate: false,
    };
    matmul_f32(gpu, &mut b.logits, &x.slice(0..n * c), &wt.router.slice(0..e * c), s)?;
    moe_route_f32(
        gpu,
        &mut b.probs,
        &mut b.ids,
        &mut b.w,
        &mut b.denom,
        &b.logits,
        wt.bias.as_ref(),
        n,
        e,
        k,
        d.gating,
    )?;
    moe_permute(gpu, &mut b.perm, &b.ids, n, k, e)?;
    moe_gather_bf16(gpu, &mut b.xe, x, &b.perm.tok, m, n, c)?;
    let p = &b.perm;
    moe_grouped_gate_up_bf16(
        gpu,
        &mut b.g,
        &mut b.u,
        &mut b.act,
        &b.xe,
        &wt.w_gate,
        &wt.w_up,
        &p.offsets,
        &p.tile_off,
        m,
        e,
        c,
        f,
        d.math,
    )?;
    moe_grouped_gemm_bf16(
        gpu,
        &mut b.ye,
        &b.act,
        &wt.w_down,
        &p.offsets,
        &p.tile_off,
        m,
        e,
        f,
        c,
        true,
        false,
        d.math,
    )?;
    moe_combine_f32(gpu, y, &b.ye, Some(&b.w), &p.inv, n, c, k, false)?;
    if let (Some([sg, su, sd]), Some(sb)) = (&wt.shared, &mut b.shared) {
        let fs = d.f_shared;
        cast_f32_to_bf16(gpu, &mut sb.xs, x, n * c)?;
        moe_grouped_gate_up_bf16(
            gpu,
            &mut sb.g,
            &mut sb.u,
            &mut sb.act,
            &sb.xs,
            sg,
            su,
            &sb.offsets,
            &sb.tile_off,
            n,
            1,
            c,
            fs,
            d.math,
        )?;
        moe_grouped_gemm_bf16(
            gpu,
            y,
            &sb.act,
            sd,
            &sb.offsets,
            &sb.tile_off,
            n,
            1,
            fs,
            c,
            true,
            true,
            d.math,
        )?;
    }
    Ok(())
}

/// The layer's backward from `dy [N, C]`: `dx +=` (accumulated, as the CPU
/// layer) and every gradient in `gr +=`. `aux [E]` is an extra gradient on
/// each token's softmax probabilities (the Switch load-balancing loss).
/// Needs the `b` of the matching [`moe_layer_forward`].
pub fn moe_layer_backward(
    gpu: &Gpu,
    dx: &mut CudaSlice<f32>,
    gr: &mut MoeGrads,
    dy: &CudaSlice<f32>,
    x: &CudaSlice<f32>,
    wt: &MoeWeights,
    b: &mut MoeBuffers,
    aux: Option<&CudaSlice<f32>>,
) -> Result<()> {
    let d = b.dims;
    plan_moe_layer(
        &d,
        [x.len().min(dy.len()), wt.router.len(), dx.len(), gr.router.len()],
        (wt.shared.is_some(), b.shared.is_some()),
    )?;
    if wt.shared.is_some() != gr.shared.is_some() {
        return Err(Error::InvalidArgument {
            op: "moe_layer",
            msg: "the weights and the gradients disagree on a shared expert".into(),
        });
    }
    let (n, c, e, k, f, m) = (d.n, d.c, d.e, d.k, d.f, d.m());
    if n == 0 {
        return Ok(());
    }
    let p = &b.perm;
    moe_combine_backward_bf16(gpu, &mut b.dw, &mut b.dye, dy, &b.ye, &b.w, &p.inv, n, c, k)?;
    // d act = dye w_down_x ([M, C] x [C, F]); d w_down += dye^T act.
    moe_grouped_gemm_bf16(
        gpu,
        &mut b.dact,
        &b.dye,
        &wt.w_down,
        &p.offsets,
        &p.tile_off,
        m,
        e,
        c,
        f,
        false,
        false,
        d.math,
    )?;
    moe_grouped_wgrad_bf16(gpu, &mut gr.w_down, &b.dye, &b.act, &p.offsets, m, e, c, f, d.math)?;
    moe_swiglu_backward_bf16(gpu, &mut b.dg, &mut b.du, &b.dact, &b.g, &b.u, m * f)?;
    // d xe = dg w_gate_x + du w_up_x ([M, F] x [F, C]).
    moe_grouped_gemm_bf16(
        gpu,
        &mut b.dxe,
        &b.dg,
        &wt.w_gate,
        &p.offsets,
        &p.tile_off,
        m,
        e,
        f,
        c,
        false,
        false,
        d.math,
    )?;
    moe_grouped_gemm_bf16(
        gpu,
        &mut b.dxe,
        &b.du,
        &wt.w_up,
        &p.offsets,
        &p.tile_off,
        m,
        e,
        f,
        c,
        false,
        true,
        d.math,
    )?;
    moe_grouped_wgrad_bf16(gpu, &mut gr.w_gate, &b.dg, &b.xe, &p.offsets, m, e, f, c, d.math)?;
    moe_grouped_wgrad_bf16(gpu, &mut gr.w_up, &b.du, &b.xe, &p.offsets, m, e, f, c, d.math)?;
    moe_combine_f32(gpu, dx, &b.dxe, None, &p.inv, n, c, k, true)?;
    moe_route_backward_f32(
        gpu,
        &mut b.dlogits,
        &b.dw,
        &b.w,
        &b.ids,
        &b.probs,
        &b.denom,
        aux,
        n,
        e,
        k,
        d.gating,
    )?;
    let s = MatmulShape {
        m: n,
        k: e,
        n: c,
        trans_a: false,
        trans_b: false,
        accumulate: true,
    };
    matmul_f32(
        gpu,
        &mut dx.slice_mut(0..n * c),
        &b.dlogits.slice(0..n * e),
        &wt.router.slice(0..e * c),
        s,
    )?;
    let s = MatmulShape {
        m: e,
        k: n,
        n: c,
        trans_a: true,
        trans_b: false,
        accumulate: true,
    };
    matmul_f32(
        gpu,
        &mut gr.router.slice_mut(0..e * c),
        &b.dlogits.slice(0..n * e),
        &x.slice(0..n * c),
        s,
    )?;
    if let (Some([sg, su, sd]), Some(sb), Some([dsg, dsu, dsd])) = (&wt.shared, &mut b.shared, &mut gr.shared) {
        let fs = d.f_shared;
        cast_f32_to_bf16(gpu, &mut sb.dys, dy, n * c)?;
        let (o, t) = (&sb.offsets, &sb.tile_off);
        moe_grouped_gemm_bf16(gpu, &mut sb.dact, &sb.dys, sd, o, t, n, 1, c, fs, false, false, d.math)?;
        moe_grouped_wgrad_bf16(gpu, dsd, &sb.dys, &sb.act, o, n, 1, c, fs, d.math)?;
        moe_swiglu_backward_bf16(gpu, &mut sb.dg, &mut sb.du, &sb.dact, &sb.g, &sb.u, n * fs)?;
        moe_grouped_gemm_bf16(gpu, dx, &sb.dg, sg, o, t, n, 1, fs, c, false, true, d.math)?;
        moe_grouped_gemm_bf16(gpu, dx, &sb.du, su, o, t, n, 1, fs, c, false, true, d.math)?;
        moe_grouped_wgrad_bf16(gpu, dsg, &sb.dg, &sb.xs, o, n, 1, fs, c, d.math)?;
        moe_grouped_wgrad_bf16(gpu, dsu, &sb.du, &sb.xs, o, n, 1, fs, c, d.math)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn layer_plan_checks_what_the_layer_slices() {
        let d = MoeDims {
            n: 3,
            c: 4,
            e: 5,
            k: 2,
            f: 6,
            f_shared: 0,
            gating: MoeGating::Softmax { renorm: true },
            math: MoeMath::TensorCores,
        };
        assert_eq!(d.m(), 6);
        assert!(plan_moe_layer(&d, [12, 20, 12, usize::MAX], (false, false)).is_ok());
        assert!(plan_moe_layer(&d, [12, 20, 12, 20], (true, true)).is_ok());
        for (i, name) in ["x", "router", "y / dx", "d router"].iter().enumerate() {
            let mut l = [12, 20, 12, 20];
            l[i] -= 1;
            let e = plan_moe_layer(&d, l, (false, false)).unwrap_err().to_string();
            assert!(e.contains(name), "{name}: {e}");
        }
        assert!(plan_moe_layer(&d, [12, 20, 12, 20], (true, false)).is_err());
    }
}
