//! A whole mixture-of-experts layer on the device: the launchers of
//! [`crate::launch::moe`] (and cuBLAS for the f32 router product) in order,
//! forward and backward, with no copy to the host anywhere: counts, offsets
//! and the tile list are produced and consumed on the device.
//!
//! Forward (`x [N, C]` f32, normed input):
//! logits = x router^T (f32) -> route -> permute (counts, offsets, stable
//! order, inverse) -> gather xe = store(x) in expert order -> fused gate/up +
//! SwiGLU (act stored) -> down (ye f32) -> y = sum_j w_j ye (gather through
//! the inverse map) -> + shared expert (the same grouped kernels over one
//! segment holding every token).
//!
//! Two precisions with one flow ([`MoeStorage`]): all-bf16 storage (expert
//! weights, `xe`, `act`, `dye`, `dg`, `du`; SIMT or tensor-core products) or
//! all-f32 storage (SIMT products), which matches the CPU model's f32 layer
//! to f32 rounding. The router, its bias, every f32 buffer and every
//! gradient are f32 in both.
//!
//! Weights are borrowed views ([`MoeWeights`]) and gradients mutable views
//! ([`MoeGradsMut`]), so both can live at offsets of one flat parameter and
//! one flat gradient allocation.
//!
//! | name | shape |
//! |---|---|
//! | x, y, dx, dy | [N, C] f32 |
//! | router, d router | [E, C] f32; bias [E] f32 |
//! | w_gate, w_up | [E, F, C] stored; w_down [E, C, F] stored |
//! | shared gate, up | [Fs, C] stored; shared down [C, Fs] stored |
//!
//! The CPU twin of the composition is `aha_tensor::cpu::moe_layer_forward` /
//! `moe_layer_backward` (with `Store::Bf16` or `Store::F32`); its reference is
//! `aha_moe_model`'s CPU MoE layer.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtrMut, DeviceRepr, ValidAsZeroBits};

use crate::blas::{matmul_f32, MatmulShape};
use crate::device::Gpu;
use crate::error::{DriverContext, Error, Result};
use crate::launch::cast_f32_to_bf16;
use crate::launch::moe::{
    moe_combine_backward_bf16, moe_combine_backward_f32, moe_combine_f32, moe_gather_bf16, moe_gather_f32,
    moe_grouped_gate_up_bf16, moe_grouped_gate_up_f32, moe_grouped_gemm_bf16, moe_grouped_gemm_f32,
    moe_grouped_wgrad_bf16, moe_grouped_wgrad_f32, moe_permute, moe_route_backward_f32, moe_route_f32,
    moe_swiglu_backward_bf16, moe_swiglu_backward_f32, MoeGating, MoeMath, MoePermutation, MoeStorage, MOE_TILE_ROWS,
};

/// The sizes of one MoE layer and the kernels it runs.
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
    /// SIMT or tensor-core kernels for the grouped products (tensor cores
    /// need [`MoeStorage::Bf16`]).
    pub math: MoeMath,
    /// Element type of the expert weights and the stored buffers.
    pub storage: MoeStorage,
}

impl MoeDims {
    /// Permuted rows, N * K.
    pub fn m(&self) -> usize {
        self.n * self.k
    }
}

/// The expert weights of one layer in one storage type `T` (`u16` bf16
/// bits or `f32`), PyTorch's `[out, in]` layout, stacked over experts.
#[derive(Debug)]
pub struct MoeExpertViews<'a, T> {
    /// gate_proj of every expert [E, F, C].
    pub w_gate: CudaView<'a, T>,
    /// up_proj of every expert [E, F, C].
    pub w_up: CudaView<'a, T>,
    /// down_proj of every expert [E, C, F].
    pub w_down: CudaView<'a, T>,
    /// Shared expert (gate [Fs, C], up [Fs, C], down [C, Fs]), if any.
    pub shared: Option<[CudaView<'a, T>; 3]>,
}

/// The expert weights in the layer's storage precision.
#[derive(Debug)]
pub enum MoeExperts<'a> {
    /// bf16 (u16 bits).
    Bf16(MoeExpertViews<'a, u16>),
    /// f32.
    F32(MoeExpertViews<'a, f32>),
}

impl MoeExperts<'_> {
    /// The storage precision of these weights.
    pub fn storage(&self) -> MoeStorage {
        match self {
            MoeExperts::Bf16(_) => MoeStorage::Bf16,
            MoeExperts::F32(_) => MoeStorage::F32,
        }
    }

    fn has_shared(&self) -> bool {
        match self {
            MoeExperts::Bf16(x) => x.shared.is_some(),
            MoeExperts::F32(x) => x.shared.is_some(),
        }
    }
}

/// The parameters of one layer, borrowed (typically views at offsets of a
/// model's flat parameter buffer).
#[derive(Debug)]
pub struct MoeWeights<'a> {
    /// Router `gate.weight` [E, C], f32.
    pub router: CudaView<'a, f32>,
    /// `e_score_correction_bias` [E] (sigmoid gating), f32.
    pub bias: Option<CudaView<'a, f32>>,
    /// The routed (and shared) experts.
    pub experts: MoeExperts<'a>,
}

/// One layer's weights owned on the device with bf16 experts (a model's
/// bf16 inference copy); [`MoeWeightsBf16::view`] lends them to the layer.
#[derive(Debug)]
pub struct MoeWeightsBf16 {
    /// Router `gate.weight` [E, C], f32.
    pub router: CudaSlice<f32>,
    /// `e_score_correction_bias` [E] (sigmoid gating), f32.
    pub bias: Option<CudaSlice<f32>>,
    /// gate_proj of every expert [E, F, C], bf16.
    pub w_gate: CudaSlice<u16>,
    /// up_proj of every expert [E, F, C], bf16.
    pub w_up: CudaSlice<u16>,
    /// down_proj of every expert [E, C, F], bf16.
    pub w_down: CudaSlice<u16>,
    /// Shared expert (gate [Fs, C], up [Fs, C], down [C, Fs]), bf16, if any.
    pub shared: Option<[CudaSlice<u16>; 3]>,
}

impl MoeWeightsBf16 {
    /// Views of every tensor, for [`moe_layer_forward`] / [`moe_layer_backward`].
    pub fn view(&self) -> MoeWeights<'_> {
        MoeWeights {
            router: self.router.as_view(),
            bias: self.bias.as_ref().map(|b| b.as_view()),
            experts: MoeExperts::Bf16(MoeExpertViews {
                w_gate: self.w_gate.as_view(),
                w_up: self.w_up.as_view(),
                w_down: self.w_down.as_view(),
                shared: self
                    .shared
                    .as_ref()
                    .map(|[g, u, d]| [g.as_view(), u.as_view(), d.as_view()]),
            }),
        }
    }
}

/// A zeroed buffer of `len` elements, at least one (the driver refuses
/// empty allocations; every launcher accepts longer buffers).
pub(crate) fn zeros1<T: DeviceRepr + ValidAsZeroBits>(gpu: &Gpu, len: usize) -> Result<CudaSlice<T>> {
    gpu.zeros(len.max(1))
}

/// Gradients of [`MoeWeights`] as mutable views (typically at offsets of a
/// model's flat gradient buffer), f32, accumulated by [`moe_layer_backward`].
#[derive(Debug)]
pub struct MoeGradsMut<'a> {
    /// d router [E, C].
    pub router: CudaViewMut<'a, f32>,
    /// d gate_proj [E, F, C].
    pub w_gate: CudaViewMut<'a, f32>,
    /// d up_proj [E, F, C].
    pub w_up: CudaViewMut<'a, f32>,
    /// d down_proj [E, C, F].
    pub w_down: CudaViewMut<'a, f32>,
    /// d shared (gate, up, down), if any.
    pub shared: Option<[CudaViewMut<'a, f32>; 3]>,
}

/// Owned gradients of one layer (f32); [`MoeGrads::view_mut`] lends them.
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

    /// Bytes of every buffer, counted from their lengths.
    pub fn bytes(&self) -> u64 {
        let shared: usize = self.shared.as_ref().map_or(0, |s| s.iter().map(|x| x.len()).sum());
        4 * (self.router.len() + self.w_gate.len() + self.w_up.len() + self.w_down.len() + shared) as u64
    }

    /// Mutable views of every gradient, for [`moe_layer_backward`].
    pub fn view_mut(&mut self) -> MoeGradsMut<'_> {
        MoeGradsMut {
            router: self.router.as_view_mut(),
            w_gate: self.w_gate.as_view_mut(),
            w_up: self.w_up.as_view_mut(),
            w_down: self.w_down.as_view_mut(),
            shared: self
                .shared
                .as_mut()
                .map(|[g, u, d]| [g.as_view_mut(), u.as_view_mut(), d.as_view_mut()]),
        }
    }
}

/// The buffers held in the storage type `T`: for the routed experts `xe`,
/// `dye` [M, C] and `act`, `dg`, `du` [M, F]; for the shared expert the
/// stored input x and dy [N, C] in `xe` / `dye` and its [N, Fs] ones.
#[derive(Debug)]
pub struct StoredBuffers<T> {
    /// Token rows in expert order (shared: the input x), stored.
    pub xe: CudaSlice<T>,
    /// SwiGLU activations, stored.
    pub act: CudaSlice<T>,
    /// Backward: d expert outputs (shared: dy), stored.
    pub dye: CudaSlice<T>,
    /// Backward: d gate, stored.
    pub dg: CudaSlice<T>,
    /// Backward: d up, stored.
    pub du: CudaSlice<T>,
}

impl<T: DeviceRepr + ValidAsZeroBits> StoredBuffers<T> {
    pub(crate) fn new(gpu: &Gpu, rows: usize, c: usize, f: usize) -> Result<StoredBuffers<T>> {
        Ok(StoredBuffers {
            xe: zeros1(gpu, rows * c)?,
            act: zeros1(gpu, rows * f)?,
            dye: zeros1(gpu, rows * c)?,
            dg: zeros1(gpu, rows * f)?,
            du: zeros1(gpu, rows * f)?,
        })
    }
}

/// [`StoredBuffers`] in the layer's storage precision.
#[derive(Debug)]
pub enum Stored {
    /// bf16 (u16 bits).
    Bf16(StoredBuffers<u16>),
    /// f32.
    F32(StoredBuffers<f32>),
}

impl Stored {
    pub(crate) fn new(gpu: &Gpu, storage: MoeStorage, rows: usize, c: usize, f: usize) -> Result<Stored> {
        Ok(match storage {
            MoeStorage::Bf16 => Stored::Bf16(StoredBuffers::new(gpu, rows, c, f)?),
            MoeStorage::F32 => Stored::F32(StoredBuffers::new(gpu, rows, c, f)?),
        })
    }
}

/// Everything the forward saves and the backward works in, allocated once
/// for a layer's sizes and storage precision (reused across steps, so a step
/// allocates nothing).
#[derive(Debug)]
pub struct MoeBuffers {
    /// The sizes (and storage precision) these buffers are for.
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
    /// Gate projections [M, F].
    pub g: CudaSlice<f32>,
    /// Up projections [M, F].
    pub u: CudaSlice<f32>,
    /// Expert outputs [M, C].
    pub ye: CudaSlice<f32>,
    /// Backward: d routing weights [N, K].
    pub dw: CudaSlice<f32>,
    /// Backward: d activations [M, F] (f32).
    pub dact: CudaSlice<f32>,
    /// Backward: d xe [M, C] (f32).
    pub dxe: CudaSlice<f32>,
    /// Backward: d logits [N, E].
    pub dlogits: CudaSlice<f32>,
    /// `xe`, `act`, `dye`, `dg`, `du` in the storage precision.
    pub stored: Stored,
    /// The shared expert's buffers, if any.
    pub shared: Option<SharedBuffers>,
}

/// The shared expert's saved activations and scratch (one segment: all N tokens).
#[derive(Debug)]
pub struct SharedBuffers {
    /// Offsets `[0, N]` of the single segment (a device constant, shared).
    pub offsets: Arc<CudaSlice<u32>>,
    /// Tile list `[0, ceil(N / 64)]` (a device constant, shared).
    pub tile_off: Arc<CudaSlice<u32>>,
    /// Gate and up projections [N, Fs].
    pub g: CudaSlice<f32>,
    /// See `g`.
    pub u: CudaSlice<f32>,
    /// Backward: d act [N, Fs].
    pub dact: CudaSlice<f32>,
    /// Stored x and dy [N, C] (in `xe`, `dye`), act, dg, du [N, Fs].
    pub stored: Stored,
}

impl MoeBuffers {
    /// Zeroed buffers for `dims` (in `dims.storage`).
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
                offsets: gpu.constant_u32(&[0u32, nu])?,
                tile_off: gpu.constant_u32(&[0u32, n.div_ceil(MOE_TILE_ROWS) as u32])?,
                g: zeros1(gpu, n * fs)?,
                u: zeros1(gpu, n * fs)?,
                dact: zeros1(gpu, n * fs)?,
                stored: Stored::new(gpu, dims.storage, n, c, fs)?,
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
            g: zeros1(gpu, m * f)?,
            u: zeros1(gpu, m * f)?,
            ye: zeros1(gpu, m * c)?,
            dw: zeros1(gpu, m)?,
            dact: zeros1(gpu, m * f)?,
            dxe: zeros1(gpu, m * c)?,
            dlogits: zeros1(gpu, n * e)?,
            stored: Stored::new(gpu, dims.storage, m, c, f)?,
            shared,
        })
    }
}

/// Checks what the layer slices itself (the launchers check the rest):
/// `lens` = (x, router, y or dx, d router; `usize::MAX` in the forward)
/// against `d`; that the weights and the buffers agree on a shared expert
/// (`has_shared`) and that the weights' storage (`storage`) is `d.storage`,
/// which tensor cores need to be bf16.
pub fn plan_moe_layer(d: &MoeDims, lens: [usize; 4], has_shared: (bool, bool), storage: MoeStorage) -> Result<()> {
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
            op,
            msg: "the weights and the buffers disagree on a shared expert".into(),
        });
    }
    if storage != d.storage {
        return Err(Error::InvalidArgument {
            op,
            msg: format!(
                "the expert weights are {storage:?} but the layer stores {:?}",
                d.storage
            ),
        });
    }
    if d.math == MoeMath::TensorCores && d.storage == MoeStorage::F32 {
        return Err(Error::InvalidArgument {
            op,
            msg: "MoeMath::TensorCores multiplies bf16: f32 storage runs MoeMath::Simt".into(),
        });
    }
    Ok(())
}

/// The segment offsets and tile list of a grouped product.
pub(crate) type Seg<'s> = (&'s CudaSlice<u32>, &'s CudaSlice<u32>);

/// The launchers of one storage type, so the layer's flow is written once.
pub(crate) trait Elem: DeviceRepr + ValidAsZeroBits + Sized {
    fn experts<'s, 'a>(x: &'s MoeExperts<'a>) -> Option<&'s MoeExpertViews<'a, Self>>;
    fn stored(s: &mut Stored) -> Option<&mut StoredBuffers<Self>>;
    /// `dst[..len] = store(src[..len])`.
    fn store(gpu: &Gpu, dst: &mut CudaSlice<Self>, src: &CudaSlice<f32>, len: usize) -> Result<()>;
    fn gather(
        gpu: &Gpu,
        xe: &mut CudaSlice<Self>,
        x: &CudaSlice<f32>,
        tok: &CudaSlice<u32>,
        mnc: [usize; 3],
    ) -> Result<()>;
    #[allow(clippy::too_many_arguments)]
    fn gate_up(
        gpu: &Gpu,
        gu: (&mut CudaSlice<f32>, &mut CudaSlice<f32>),
        act: &mut CudaSlice<Self>,
        xe: &CudaSlice<Self>,
        w: (&CudaView<'_, Self>, &CudaView<'_, Self>),
        seg: Seg<'_>,
        mecf: [usize; 4],
        math: MoeMath,
    ) -> Result<()>;
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        gpu: &Gpu,
        out: &mut impl DevicePtrMut<f32>,
        a: &CudaSlice<Self>,
        b: &CudaView<'_, Self>,
        seg: Seg<'_>,
        mekn: [usize; 4],
        trans_acc: (bool, bool),
        math: MoeMath,
    ) -> Result<()>;
    fn wgrad(
        gpu: &Gpu,
        dw: &mut CudaViewMut<'_, f32>,
        a: &CudaSlice<Self>,
        b: &CudaSlice<Self>,
        offsets: &CudaSlice<u32>,
        men: [usize; 4],
        math: MoeMath,
    ) -> Result<()>;
    fn swiglu_backward(
        gpu: &Gpu,
        st: &mut StoredBuffers<Self>,
        da: &CudaSlice<f32>,
        gu: Seg2<'_>,
        len: usize,
    ) -> Result<()>;
    #[allow(clippy::too_many_arguments)]
    fn combine_backward(
        gpu: &Gpu,
        dw: &mut CudaSlice<f32>,
        dye: &mut CudaSlice<Self>,
        dy: &CudaSlice<f32>,
        ye: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        inv: &CudaSlice<u32>,
        nck: [usize; 3],
    ) -> Result<()>;
}

/// The saved gate and up projections.
pub(crate) type Seg2<'s> = (&'s CudaSlice<f32>, &'s CudaSlice<f32>);

macro_rules! elem_impl {
    ($t:ty, $variant:ident, $gather:ident, $gate_up:ident, $gemm:ident, $wgrad:ident, $swiglu:ident, $combine:ident,
     math: ($mp:ident $(, $math:ident)?), store: $store:expr) => {
        impl Elem for $t {
            fn experts<'s, 'a>(x: &'s MoeExperts<'a>) -> Option<&'s MoeExpertViews<'a, $t>> {
                match x {
                    MoeExperts::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn stored(s: &mut Stored) -> Option<&mut StoredBuffers<$t>> {
                match s {
                    Stored::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn store(gpu: &Gpu, dst: &mut CudaSlice<$t>, src: &CudaSlice<f32>, len: usize) -> Result<()> {
                let f: fn(&Gpu, &mut CudaSlice<$t>, &CudaSlice<f32>, usize) -> Result<()> = $store;
                f(gpu, dst, src, len)
            }
            fn gather(
                gpu: &Gpu,
                xe: &mut CudaSlice<$t>,
                x: &CudaSlice<f32>,
                tok: &CudaSlice<u32>,
                [m, n, c]: [usize; 3],
            ) -> Result<()> {
                $gather(gpu, xe, x, tok, m, n, c)
            }
            fn gate_up(
                gpu: &Gpu,
                (g, u): (&mut CudaSlice<f32>, &mut CudaSlice<f32>),
                act: &mut CudaSlice<$t>,
                xe: &CudaSlice<$t>,
                (wg, wu): (&CudaView<'_, $t>, &CudaView<'_, $t>),
                (o, t): Seg<'_>,
                [m, e, c, f]: [usize; 4],
                $mp: MoeMath,
            ) -> Result<()> {
                $gate_up(gpu, g, u, act, xe, wg, wu, o, t, m, e, c, f $(, $math)?)
            }
            fn gemm(
                gpu: &Gpu,
                out: &mut impl DevicePtrMut<f32>,
                a: &CudaSlice<$t>,
                b: &CudaView<'_, $t>,
                (o, t): Seg<'_>,
                [m, e, k, n]: [usize; 4],
                (trans, acc): (bool, bool),
                $mp: MoeMath,
            ) -> Result<()> {
                $gemm(gpu, out, a, b, o, t, m, e, k, n, trans, acc $(, $math)?)
            }
            fn wgrad(
                gpu: &Gpu,
                dw: &mut CudaViewMut<'_, f32>,
                a: &CudaSlice<$t>,
                b: &CudaSlice<$t>,
                offsets: &CudaSlice<u32>,
                [m, e, n1, n2]: [usize; 4],
                $mp: MoeMath,
            ) -> Result<()> {
                $wgrad(gpu, dw, a, b, offsets, m, e, n1, n2 $(, $math)?)
            }
            fn swiglu_backward(
                gpu: &Gpu,
                st: &mut StoredBuffers<$t>,
                da: &CudaSlice<f32>,
                (g, u): Seg2<'_>,
                len: usize,
            ) -> Result<()> {
                $swiglu(gpu, &mut st.dg, &mut st.du, da, g, u, len)
            }
            fn combine_backward(
                gpu: &Gpu,
                dw: &mut CudaSlice<f32>,
                dye: &mut CudaSlice<$t>,
                dy: &CudaSlice<f32>,
                ye: &CudaSlice<f32>,
                w: &CudaSlice<f32>,
                inv: &CudaSlice<u32>,
                [n, c, k]: [usize; 3],
            ) -> Result<()> {
                $combine(gpu, dw, dye, dy, ye, w, inv, n, c, k)
            }
        }
    };
}

elem_impl!(u16, Bf16, moe_gather_bf16, moe_grouped_gate_up_bf16, moe_grouped_gemm_bf16, moe_grouped_wgrad_bf16,
    moe_swiglu_backward_bf16, moe_combine_backward_bf16, math: (math, math), store: cast_f32_to_bf16);
elem_impl!(f32, F32, moe_gather_f32, moe_grouped_gate_up_f32, moe_grouped_gemm_f32, moe_grouped_wgrad_f32,
    moe_swiglu_backward_f32, moe_combine_backward_f32, math: (_math), store: copy_f32);

/// `dst[..len] = src[..len]` on the device (the f32 "store").
fn copy_f32(gpu: &Gpu, dst: &mut CudaSlice<f32>, src: &CudaSlice<f32>, len: usize) -> Result<()> {
    if dst.len() < len || src.len() < len {
        return Err(Error::InvalidArgument {
            op: "moe_layer copy",
            msg: format!("copy of {len} elements from {} into {}", src.len(), dst.len()),
        });
    }
    if len == 0 {
        return Ok(());
    }
    gpu.stream()
        .memcpy_dtod(&src.slice(0..len), &mut dst.slice_mut(0..len))
        .ctx("moe_layer copy")
}

pub(crate) fn mismatch(what: &str) -> Error {
    Error::InvalidArgument {
        op: "moe_layer",
        msg: format!("the {what} disagree with the layer's storage precision"),
    }
}

/// The layer's forward: `y [N, C] =` (assigned) the MoE of `x [N, C]`;
/// saves what the backward needs in `b` (sized for the same dims, whose
/// `storage` must be the weights' experts'). The expert loads are in
/// `b.perm.counts` / `b.perm.frac` afterwards (for
/// [`crate::launch::moe::moe_bias_update_f32`]).
pub fn moe_layer_forward(
    gpu: &Gpu,
    y: &mut CudaSlice<f32>,
    x: &CudaSlice<f32>,
    wt: &MoeWeights<'_>,
    b: &mut MoeBuffers,
) -> Result<()> {
    let d = b.dims;
    plan_moe_layer(
        &d,
        [x.len(), wt.router.len(), y.len(), usize::MAX],
        (wt.experts.has_shared(), b.shared.is_some()),
        wt.experts.storage(),
    )?;
    match d.storage {
        MoeStorage::Bf16 => forward::<u16>(gpu, y, x, wt, b),
        MoeStorage::F32 => forward::<f32>(gpu, y, x, wt, b),
    }
}

fn forward<T: Elem>(
    gpu: &Gpu,
    y: &mut CudaSlice<f32>,
    x: &CudaSlice<f32>,
    wt: &MoeWeights<'_>,
    b: &mut MoeBuffers,
) -> Result<()> {
    let d = b.dims;
    let (n, c, e, k, f, m) = (d.n, d.c, d.e, d.k, d.f, d.m());
    let ex = T::experts(&wt.experts).ok_or_else(|| mismatch("expert weights"))?;
    if n == 0 {
        return Ok(());
    }
    route_and_permute(gpu, x, wt, b)?;
    let st = T::stored(&mut b.stored).ok_or_else(|| mismatch("buffers"))?;
    T::gather(gpu, &mut st.xe, x, &b.perm.tok, [m, n, c])?;
    let p = &b.perm;
    let seg = (&p.offsets, &p.tile_off);
    let gu = (&mut b.g, &mut b.u);
    T::gate_up(
        gpu,
        gu,
        &mut st.act,
        &st.xe,
        (&ex.w_gate, &ex.w_up),
        seg,
        [m, e, c, f],
        d.math,
    )?;
    T::gemm(
        gpu,
        &mut b.ye,
        &st.act,
        &ex.w_down,
        seg,
        [m, e, f, c],
        (true, false),
        d.math,
    )?;
    moe_combine_f32(gpu, y, &b.ye, Some(&b.w), &p.inv, n, c, k, false)?;
    shared_forward::<T>(gpu, y, x, ex, b)
}

/// Router logits, routing and the permutation of the forward into `b`
/// (`b.dims.n > 0`).
pub(crate) fn route_and_permute(gpu: &Gpu, x: &CudaSlice<f32>, wt: &MoeWeights<'_>, b: &mut MoeBuffers) -> Result<()> {
    let d = b.dims;
    let (n, c, e, k) = (d.n, d.c, d.e, d.k);
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
    moe_permute(gpu, &mut b.perm, &b.ids, n, k, e)
}

/// `y +=` the shared expert of `x`, if the layer has one.
pub(crate) fn shared_forward<T: Elem>(
    gpu: &Gpu,
    y: &mut CudaSlice<f32>,
    x: &CudaSlice<f32>,
    ex: &MoeExpertViews<'_, T>,
    b: &mut MoeBuffers,
) -> Result<()> {
    let d = b.dims;
    let (n, c) = (d.n, d.c);
    if let (Some([sg, su, sd]), Some(sb)) = (&ex.shared, &mut b.shared) {
        let fs = d.f_shared;
        let ss = T::stored(&mut sb.stored).ok_or_else(|| mismatch("shared buffers"))?;
        T::store(gpu, &mut ss.xe, x, n * c)?;
        let seg = (&*sb.offsets, &*sb.tile_off);
        let gu = (&mut sb.g, &mut sb.u);
        T::gate_up(gpu, gu, &mut ss.act, &ss.xe, (sg, su), seg, [n, 1, c, fs], d.math)?;
        T::gemm(gpu, y, &ss.act, sd, seg, [n, 1, fs, c], (true, true), d.math)?;
    }
    Ok(())
}

/// The layer's backward from `dy [N, C]`: `dx +=` (accumulated, as the CPU
/// layer) and every gradient in `gr +=` (views, typically into a flat
/// gradient buffer). `aux [E]` is an extra gradient on each token's softmax
/// probabilities (the Switch load-balancing loss). Needs the `b` of the
/// matching [`moe_layer_forward`] with the same weights.
pub fn moe_layer_backward(
    gpu: &Gpu,
    dx: &mut CudaSlice<f32>,
    gr: &mut MoeGradsMut<'_>,
    dy: &CudaSlice<f32>,
    x: &CudaSlice<f32>,
    wt: &MoeWeights<'_>,
    b: &mut MoeBuffers,
    aux: Option<&CudaSlice<f32>>,
) -> Result<()> {
    let d = b.dims;
    plan_moe_layer(
        &d,
        [x.len().min(dy.len()), wt.router.len(), dx.len(), gr.router.len()],
        (wt.experts.has_shared(), b.shared.is_some()),
        wt.experts.storage(),
    )?;
    if wt.experts.has_shared() != gr.shared.is_some() {
        return Err(Error::InvalidArgument {
            op: "moe_layer",
            msg: "the weights and the gradients disagree on a shared expert".into(),
        });
    }
    match d.storage {
        MoeStorage::Bf16 => backward::<u16>(gpu, dx, Some(gr), dy, x, wt, b, aux),
        MoeStorage::F32 => backward::<f32>(gpu, dx, Some(gr), dy, x, wt, b, aux),
    }
}

/// [`moe_layer_backward`] for a frozen layer: `dx +=` only. The router's,
/// the experts' and the shared expert's weight gradients are neither
/// computed nor written, so a caller that discards them (a LoRA model,
/// whose router and experts are frozen) needs no gradient buffers.
pub fn moe_layer_backward_dx(
    gpu: &Gpu,
    dx: &mut CudaSlice<f32>,
    dy: &CudaSlice<f32>,
    x: &CudaSlice<f32>,
    wt: &MoeWeights<'_>,
    b: &mut MoeBuffers,
    aux: Option<&CudaSlice<f32>>,
) -> Result<()> {
    let d = b.dims;
    plan_moe_layer(
        &d,
        [x.len().min(dy.len()), wt.router.len(), dx.len(), usize::MAX],
        (wt.experts.has_shared(), b.shared.is_some()),
        wt.experts.storage(),
    )?;
    match d.storage {
        MoeStorage::Bf16 => backward::<u16>(gpu, dx, None, dy, x, wt, b, aux),
        MoeStorage::F32 => backward::<f32>(gpu, dx, None, dy, x, wt, b, aux),
    }
}

#[allow(clippy::too_many_arguments)]
fn backward<T: Elem>(
    gpu: &Gpu,
    dx: &mut CudaSlice<f32>,
    mut gr: Option<&mut MoeGradsMut<'_>>,
    dy: &CudaSlice<f32>,
    x: &CudaSlice<f32>,
    wt: &MoeWeights<'_>,
    b: &mut MoeBuffers,
    aux: Option<&CudaSlice<f32>>,
) -> Result<()> {
    let d = b.dims;
    let (n, c, e, k, f, m) = (d.n, d.c, d.e, d.k, d.f, d.m());
    let ex = T::experts(&wt.experts).ok_or_else(|| mismatch("expert weights"))?;
    if n == 0 {
        return Ok(());
    }
    let st = T::stored(&mut b.stored).ok_or_else(|| mismatch("buffers"))?;
    let p = &b.perm;
    let seg = (&p.offsets, &p.tile_off);
    T::combine_backward(gpu, &mut b.dw, &mut st.dye, dy, &b.ye, &b.w, &p.inv, [n, c, k])?;
    // d act = dye w_down_x ([M, C] x [C, F]); d w_down += dye^T act.
    T::gemm(
        gpu,
        &mut b.dact,
        &st.dye,
        &ex.w_down,
        seg,
        [m, e, c, f],
        (false, false),
        d.math,
    )?;
    if let Some(gr) = gr.as_deref_mut() {
        T::wgrad(gpu, &mut gr.w_down, &st.dye, &st.act, &p.offsets, [m, e, c, f], d.math)?;
    }
    T::swiglu_backward(gpu, st, &b.dact, (&b.g, &b.u), m * f)?;
    // d xe = dg w_gate_x + du w_up_x ([M, F] x [F, C]).
    T::gemm(
        gpu,
        &mut b.dxe,
        &st.dg,
        &ex.w_gate,
        seg,
        [m, e, f, c],
        (false, false),
        d.math,
    )?;
    T::gemm(
        gpu,
        &mut b.dxe,
        &st.du,
        &ex.w_up,
        seg,
        [m, e, f, c],
        (false, true),
        d.math,
    )?;
    if let Some(gr) = gr.as_deref_mut() {
        T::wgrad(gpu, &mut gr.w_gate, &st.dg, &st.xe, &p.offsets, [m, e, f, c], d.math)?;
        T::wgrad(gpu, &mut gr.w_up, &st.du, &st.xe, &p.offsets, [m, e, f, c], d.math)?;
    }
    moe_combine_f32(gpu, dx, &b.dxe, None, &p.inv, n, c, k, true)?;
    router_and_shared_backward::<T>(gpu, dx, gr, dy, x, wt, ex, b, aux)
}

/// The backward's routing, router and shared-expert part: `dx +=` and the
/// router and shared gradients `+=` (unless `gr` is `None`: a frozen
/// layer), from `b.dw` (set by the combine's backward).
#[allow(clippy::too_many_arguments)]
pub(crate) fn router_and_shared_backward<T: Elem>(
    gpu: &Gpu,
    dx: &mut CudaSlice<f32>,
    mut gr: Option<&mut MoeGradsMut<'_>>,
    dy: &CudaSlice<f32>,
    x: &CudaSlice<f32>,
    wt: &MoeWeights<'_>,
    ex: &MoeExpertViews<'_, T>,
    b: &mut MoeBuffers,
    aux: Option<&CudaSlice<f32>>,
) -> Result<()> {
    let d = b.dims;
    let (n, c, e, k) = (d.n, d.c, d.e, d.k);
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
    if let Some(gr) = gr.as_deref_mut() {
        matmul_f32(
            gpu,
            &mut gr.router.slice_mut(0..e * c),
            &b.dlogits.slice(0..n * e),
            &x.slice(0..n * c),
            s,
        )?;
    }
    let mut dshared = gr.and_then(|g| g.shared.as_mut());
    if let (Some([sg, su, sd]), Some(sb)) = (&ex.shared, &mut b.shared) {
        let fs = d.f_shared;
        let ss = T::stored(&mut sb.stored).ok_or_else(|| mismatch("shared buffers"))?;
        T::store(gpu, &mut ss.dye, dy, n * c)?;
        let seg = (&*sb.offsets, &*sb.tile_off);
        let o = &sb.offsets;
        T::gemm(
            gpu,
            &mut sb.dact,
            &ss.dye,
            sd,
            seg,
            [n, 1, c, fs],
            (false, false),
            d.math,
        )?;
        if let Some([_, _, dsd]) = dshared.as_deref_mut() {
            T::wgrad(gpu, dsd, &ss.dye, &ss.act, o, [n, 1, c, fs], d.math)?;
        }
        T::swiglu_backward(gpu, ss, &sb.dact, (&sb.g, &sb.u), n * fs)?;
        T::gemm(gpu, dx, &ss.dg, sg, seg, [n, 1, fs, c], (false, true), d.math)?;
        T::gemm(gpu, dx, &ss.du, su, seg, [n, 1, fs, c], (false, true), d.math)?;
        if let Some([dsg, dsu, _]) = dshared {
            T::wgrad(gpu, dsg, &ss.dg, &ss.xe, o, [n, 1, fs, c], d.math)?;
            T::wgrad(gpu, dsu, &ss.du, &ss.xe, o, [n, 1, fs, c], d.math)?;
        }
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
            storage: MoeStorage::Bf16,
        };
        assert_eq!(d.m(), 6);
        assert!(plan_moe_layer(&d, [12, 20, 12, usize::MAX], (false, false), MoeStorage::Bf16).is_ok());
        assert!(plan_moe_layer(&d, [12, 20, 12, 20], (true, true), MoeStorage::Bf16).is_ok());
        for (i, name) in ["x", "router", "y / dx", "d router"].iter().enumerate() {
            let mut l = [12, 20, 12, 20];
            l[i] -= 1;
            let e = plan_moe_layer(&d, l, (false, false), MoeStorage::Bf16)
                .unwrap_err()
                .to_string();
            assert!(e.contains(name), "{name}: {e}");
        }
        assert!(plan_moe_layer(&d, [12, 20, 12, 20], (true, false), MoeStorage::Bf16).is_err());
        // The weights' storage must be the layer's; tensor cores need bf16.
        let e = plan_moe_layer(&d, [12, 20, 12, 20], (false, false), MoeStorage::F32).unwrap_err();
        assert!(e.to_string().contains("F32"), "{e}");
        let f32_tc = MoeDims {
            storage: MoeStorage::F32,
            ..d
        };
        let e = plan_moe_layer(&f32_tc, [12, 20, 12, 20], (false, false), MoeStorage::F32).unwrap_err();
        assert!(e.to_string().contains("TensorCores"), "{e}");
        let f32_simt = MoeDims {
            math: MoeMath::Simt,
            ..f32_tc
        };
        assert!(plan_moe_layer(&f32_simt, [12, 20, 12, 20], (false, false), MoeStorage::F32).is_ok());
    }
}
