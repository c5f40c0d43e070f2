//! An expert-parallel mixture-of-experts layer: the routed experts split
//! over the ranks of a communicator, the token rows moved to their experts'
//! ranks and back with NCCL point-to-point ([`Comm::exchange_blocks`]).
//!
//! With EP degree W (the communicator's world) rank r holds the routed
//! experts [`expert_shard`]`(E, W, r)` (contiguous, as
//! [`crate::nccl::shard_range`] splits them); the router, its bias and the
//! shared expert are replicated. Each rank runs the layer on its own tokens:
//!
//! Forward: route and permute locally (the same kernels as
//! [`crate::moe_layer::moe_layer_forward`]: the permuted rows are in expert
//! order, so in destination-rank order) -> exchange the per-expert row
//! counts (one all-gather of `[E]` counts per rank; every rank then knows
//! the whole `[W, E]` table and the global expert loads) -> dispatch: one
//! block per (destination, expert) of the stored token rows, received
//! expert-major (for each local expert, the rows of rank 0, 1, ...), so the
//! grouped products run on contiguous segments -> the local experts'
//! gate/up, SwiGLU and down -> combine: the f32 expert outputs back along
//! the same blocks reversed -> the weighted sum and the shared expert as
//! without EP.
//!
//! Backward: the combine's backward locally (d routing weights, d expert
//! outputs) -> the d expert outputs to the experts' ranks (the dispatch's
//! blocks) -> the local experts' backward (their weight gradients stay on
//! this rank: each holds the sum over every rank's tokens routed to its
//! experts) -> the d expert inputs (f32) back (the combine's blocks) -> the
//! routing, router and shared-expert backward locally.
//!
//! The counts are the one host round trip of a step (NCCL needs host
//! counts); the local buffers are sized by the rows received and
//! reallocated when that grows. `b.perm.counts` / `b.perm.frac` hold the
//! global (all ranks') expert loads after the forward, so the aux-loss-free
//! bias update sees the same loads on every rank. Every rank must call
//! forward and backward together, also with no tokens.
//!
//! The rows a token row of C elements crosses: N x K rows dispatched and
//! combined per layer and direction, (W - 1) / W of them to other ranks.

use std::ops::Range;

use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};

use crate::device::Gpu;
use crate::error::{Error, Result};
use crate::launch::moe::{moe_combine_f32, MoeStorage, MOE_TILE_ROWS};
use crate::moe_layer::{
    mismatch, plan_moe_layer, route_and_permute, router_and_shared_backward, shared_forward, zeros1, Elem, MoeBuffers,
    MoeGradsMut, MoeWeights, StoredBuffers,
};
use crate::nccl::{shard_range, Block, Comm, NcclElem};

/// The routed experts rank `rank` of `world` holds: `shard_range(e, world,
/// rank)` (contiguous; `e / world` each when `world` divides `e`).
pub fn expert_shard(e: usize, world: usize, rank: usize) -> Range<usize> {
    shard_range(e, world, rank)
}

/// The rank holding routed expert `x` of `e` under [`expert_shard`].
fn owner(e: usize, world: usize, x: usize) -> usize {
    (0..world)
        .find(|&r| expert_shard(e, world, r).contains(&x))
        .unwrap_or(world.saturating_sub(1))
}

/// Checks an expert-parallel layout: at least one rank, no more ranks than
/// routed experts (every rank holds at least one).
pub fn plan_expert_parallel(e: usize, world: usize) -> Result<()> {
    if world == 0 || world > e {
        return Err(Error::InvalidArgument {
            op: "expert parallel",
            msg: format!("{e} routed experts cannot be split over {world} ranks"),
        });
    }
    Ok(())
}

/// What one rank's local experts work in, for one step: the exchange plan
/// of the last forward and the buffers of the rows received.
#[derive(Debug)]
pub struct MoeEpBuffers {
    /// `[W * E]`: rows rank s sends to expert x at `s * E + x`, from the
    /// last forward.
    pub counts: Vec<usize>,
    /// Dispatch sends (rows, in this rank's permuted order): one block per
    /// (destination rank, expert), in expert order.
    sends: Vec<Block>,
    /// Dispatch receives (rows, in the local expert-major order).
    recvs: Vec<Block>,
    /// Rows received for the local experts.
    m_loc: usize,
    /// Offsets `[E_loc + 1]` of the local experts' segments.
    offsets: CudaSlice<u32>,
    /// Tile list `[E_loc + 1]` of the local segments.
    tile_off: CudaSlice<u32>,
    /// Rows the buffers below hold.
    cap: usize,
    g: CudaSlice<f32>,
    u: CudaSlice<f32>,
    ye: CudaSlice<f32>,
    dact: CudaSlice<f32>,
    dxe: CudaSlice<f32>,
    stored: crate::moe_layer::Stored,
}

impl MoeEpBuffers {
    /// Empty buffers for a layer of `b`'s sizes on `gpu`; they grow to the
    /// rows a forward receives.
    pub fn new(gpu: &Gpu, b: &MoeBuffers, world: usize, rank: usize) -> Result<MoeEpBuffers> {
        let d = b.dims;
        plan_expert_parallel(d.e, world)?;
        let el = expert_shard(d.e, world, rank).len();
        Ok(MoeEpBuffers {
            counts: vec![0; world * d.e],
            sends: Vec::new(),
            recvs: Vec::new(),
            m_loc: 0,
            offsets: gpu.zeros(el + 1)?,
            tile_off: gpu.zeros(el + 1)?,
            cap: 0,
            g: zeros1(gpu, 0)?,
            u: zeros1(gpu, 0)?,
            ye: zeros1(gpu, 0)?,
            dact: zeros1(gpu, 0)?,
            dxe: zeros1(gpu, 0)?,
            stored: crate::moe_layer::Stored::new(gpu, d.storage, 0, d.c, d.f)?,
        })
    }

    /// Rows the local experts received in the last forward.
    pub fn rows_received(&self) -> usize {
        self.m_loc
    }

    fn grow(&mut self, gpu: &Gpu, storage: MoeStorage, rows: usize, c: usize, f: usize) -> Result<()> {
        if rows <= self.cap {
            return Ok(());
        }
        self.g = zeros1(gpu, rows * f)?;
        self.u = zeros1(gpu, rows * f)?;
        self.ye = zeros1(gpu, rows * c)?;
        self.dact = zeros1(gpu, rows * f)?;
        self.dxe = zeros1(gpu, rows * c)?;
        self.stored = crate::moe_layer::Stored::new(gpu, storage, rows, c, f)?;
        self.cap = rows;
        Ok(())
    }
}

/// Blocks in rows scaled to elements of `width`.
fn scaled(blocks: &[Block], width: usize) -> Vec<Block> {
    blocks
        .iter()
        .map(|b| Block {
            peer: b.peer,
            offset: b.offset * width,
            count: b.count * width,
        })
        .collect()
}

fn ep_err(msg: String) -> Error {
    Error::InvalidArgument {
        op: "expert-parallel moe_layer",
        msg,
    }
}

/// The expert-parallel forward on this rank's tokens: `y [N, C] =` the MoE
/// of `x [N, C]`, where `wt`'s routed experts are this rank's shard
/// ([`expert_shard`]: `[E_loc, F, C]` / `[E_loc, C, F]`) and the router and
/// shared expert the full replicated ones; `b` is sized for this rank's N
/// with the global E. Saves what the backward needs in `b` and `ep`.
pub fn moe_layer_forward_ep(
    gpu: &Gpu,
    comm: &mut Comm,
    y: &mut CudaSlice<f32>,
    x: &CudaSlice<f32>,
    wt: &MoeWeights<'_>,
    b: &mut MoeBuffers,
    ep: &mut MoeEpBuffers,
) -> Result<()> {
    let d = b.dims;
    plan_moe_layer(
        &d,
        [x.len(), wt.router.len(), y.len(), usize::MAX],
        (has_shared(wt), b.shared.is_some()),
        wt.experts.storage(),
    )?;
    match d.storage {
        MoeStorage::Bf16 => forward::<u16>(gpu, comm, y, x, wt, b, ep),
        MoeStorage::F32 => forward::<f32>(gpu, comm, y, x, wt, b, ep),
    }
}

fn has_shared(wt: &MoeWeights<'_>) -> bool {
    match &wt.experts {
        crate::moe_layer::MoeExperts::Bf16(v) => v.shared.is_some(),
        crate::moe_layer::MoeExperts::F32(v) => v.shared.is_some(),
    }
}

/// Checks the local expert shard's sizes.
fn check_shard<T>(ex: &crate::moe_layer::MoeExpertViews<'_, T>, el: usize, f: usize, c: usize) -> Result<()> {
    let want = el * f * c;
    for (what, len) in [
        ("gate_proj", ex.w_gate.len()),
        ("up_proj", ex.w_up.len()),
        ("down_proj", ex.w_down.len()),
    ] {
        if len < want {
            return Err(ep_err(format!(
                "the local {what} shard holds {len} elements, {el} experts need {want}"
            )));
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn forward<T: Elem + NcclElem>(
    gpu: &Gpu,
    comm: &mut Comm,
    y: &mut CudaSlice<f32>,
    x: &CudaSlice<f32>,
    wt: &MoeWeights<'_>,
    b: &mut MoeBuffers,
    ep: &mut MoeEpBuffers,
) -> Result<()> {
    let d = b.dims;
    let (n, c, e, k, f) = (d.n, d.c, d.e, d.k, d.f);
    let (w, rank) = (comm.world(), comm.rank());
    plan_expert_parallel(e, w)?;
    let ex = T::experts(&wt.experts).ok_or_else(|| mismatch("expert weights"))?;
    let shard = expert_shard(e, w, rank);
    let el = shard.len();
    check_shard(ex, el, f, c)?;
    // Route and permute this rank's tokens; its rows per expert.
    let mine: Vec<usize> = if n > 0 {
        route_and_permute(gpu, x, wt, b)?;
        let st = T::stored(&mut b.stored).ok_or_else(|| mismatch("buffers"))?;
        T::gather(gpu, &mut st.xe, x, &b.perm.tok, [d.m(), n, c])?;
        gpu.download(&b.perm.counts)?[..e].iter().map(|&v| v as usize).collect()
    } else {
        vec![0; e]
    };
    // Every rank's rows per expert.
    let table = gpu.upload(&mine.iter().map(|&v| v as f64).collect::<Vec<f64>>())?;
    let mut all = gpu.zeros::<f64>(w * e)?;
    comm.all_gather(&table, &mut all)?;
    let counts: Vec<usize> = gpu.download(&all)?.iter().map(|&v| v as usize).collect();
    // The global loads replace the local ones (the bias update and the
    // load-balance statistics see every rank's tokens).
    let global: Vec<u32> = (0..e)
        .map(|x| (0..w).map(|s| counts[s * e + x]).sum::<usize>())
        .map(|v| u32::try_from(v).map_err(|_| ep_err(format!("{v} rows for one expert exceed u32"))))
        .collect::<Result<_>>()?;
    let total: u64 = global.iter().map(|&v| u64::from(v)).sum();
    if n > 0 {
        let frac: Vec<f32> = global
            .iter()
            .map(|&v| if total > 0 { v as f32 / total as f32 } else { 0.0 })
            .collect();
        gpu.stream()
            .memcpy_htod(&global, &mut b.perm.counts.slice_mut(0..e))
            .map_err(|err| ep_err(format!("uploading the global expert loads: {err:?}")))?;
        gpu.stream()
            .memcpy_htod(&frac, &mut b.perm.frac.slice_mut(0..e))
            .map_err(|err| ep_err(format!("uploading the global expert loads: {err:?}")))?;
    }
    // Dispatch plan: sends in this rank's expert order; receives expert-major.
    let mut sends = Vec::with_capacity(e);
    let mut off = 0;
    for (x, &rows) in mine.iter().enumerate() {
        sends.push(Block {
            peer: owner(e, w, x),
            offset: off,
            count: rows,
        });
        off += rows;
    }
    let mut recvs = Vec::with_capacity(el * w);
    let (mut offsets, mut tiles) = (vec![0u32; el + 1], vec![0u32; el + 1]);
    let mut at = 0usize;
    for (j, x) in shard.clone().enumerate() {
        let start = at;
        for s in 0..w {
            let rows = counts[s * e + x];
            recvs.push(Block {
                peer: s,
                offset: at,
                count: rows,
            });
            at += rows;
        }
        let seg = at - start;
        offsets[j + 1] = u32::try_from(at).map_err(|_| ep_err(format!("{at} rows exceed u32")))?;
        tiles[j + 1] = tiles[j] + seg.div_ceil(MOE_TILE_ROWS) as u32;
    }
    let m_loc = at;
    ep.grow(gpu, d.storage, m_loc, c, f)?;
    gpu.stream()
        .memcpy_htod(&offsets, &mut ep.offsets)
        .map_err(|err| ep_err(format!("uploading the local segments: {err:?}")))?;
    gpu.stream()
        .memcpy_htod(&tiles, &mut ep.tile_off)
        .map_err(|err| ep_err(format!("uploading the local segments: {err:?}")))?;
    ep.counts = counts;
    ep.sends = sends;
    ep.recvs = recvs;
    ep.m_loc = m_loc;
    let st = T::stored(&mut b.stored).ok_or_else(|| mismatch("buffers"))?;
    let lst = T::stored(&mut ep.stored).ok_or_else(|| mismatch("expert-parallel buffers"))?;
    comm.exchange_blocks(&st.xe, &scaled(&ep.sends, c), &mut lst.xe, &scaled(&ep.recvs, c))?;
    if m_loc > 0 {
        let seg = (&ep.offsets, &ep.tile_off);
        T::gate_up(
            gpu,
            (&mut ep.g, &mut ep.u),
            &mut lst.act,
            &lst.xe,
            (&ex.w_gate, &ex.w_up),
            seg,
            [m_loc, el, c, f],
            d.math,
        )?;
        T::gemm(
            gpu,
            &mut ep.ye,
            &lst.act,
            &ex.w_down,
            seg,
            [m_loc, el, f, c],
            (true, false),
            d.math,
        )?;
    }
    // Combine: the expert outputs back to their tokens' ranks.
    comm.exchange_blocks(&ep.ye, &scaled(&ep.recvs, c), &mut b.ye, &scaled(&ep.sends, c))?;
    if n == 0 {
        return Ok(());
    }
    moe_combine_f32(gpu, y, &b.ye, Some(&b.w), &b.perm.inv, n, c, k, false)?;
    shared_forward::<T>(gpu, y, x, ex, b)
}

/// The expert-parallel backward from `dy [N, C]` (this rank's tokens):
/// `dx +=`, the router and shared gradients `+=` for this rank's tokens
/// (to be all-reduced like any replicated weight's), and the local experts'
/// gradients in `gr` (`[E_loc, ...]`) `+=` the sum over every rank's
/// tokens routed to them (not to be all-reduced). Needs the `b` and `ep` of
/// the matching [`moe_layer_forward_ep`].
#[allow(clippy::too_many_arguments)]
pub fn moe_layer_backward_ep(
    gpu: &Gpu,
    comm: &mut Comm,
    dx: &mut CudaSlice<f32>,
    gr: &mut MoeGradsMut<'_>,
    dy: &CudaSlice<f32>,
    x: &CudaSlice<f32>,
    wt: &MoeWeights<'_>,
    b: &mut MoeBuffers,
    ep: &mut MoeEpBuffers,
    aux: Option<&CudaSlice<f32>>,
) -> Result<()> {
    let d = b.dims;
    plan_moe_layer(
        &d,
        [x.len().min(dy.len()), wt.router.len(), dx.len(), gr.router.len()],
        (has_shared(wt), b.shared.is_some()),
        wt.experts.storage(),
    )?;
    if has_shared(wt) != gr.shared.is_some() {
        return Err(ep_err(
            "the weights and the gradients disagree on a shared expert".into(),
        ));
    }
    match d.storage {
        MoeStorage::Bf16 => backward::<u16>(gpu, comm, dx, gr, dy, x, wt, b, ep, aux),
        MoeStorage::F32 => backward::<f32>(gpu, comm, dx, gr, dy, x, wt, b, ep, aux),
    }
}

#[allow(clippy::too_many_arguments)]
fn backward<T: Elem + NcclElem + DeviceRepr + ValidAsZeroBits>(
    gpu: &Gpu,
    comm: &mut Comm,
    dx: &mut CudaSlice<f32>,
    gr: &mut MoeGradsMut<'_>,
    dy: &CudaSlice<f32>,
    x: &CudaSlice<f32>,
    wt: &MoeWeights<'_>,
    b: &mut MoeBuffers,
    ep: &mut MoeEpBuffers,
    aux: Option<&CudaSlice<f32>>,
) -> Result<()> {
    let d = b.dims;
    let (n, c, e, k, f) = (d.n, d.c, d.e, d.k, d.f);
    let (w, rank) = (comm.world(), comm.rank());
    let ex = T::experts(&wt.experts).ok_or_else(|| mismatch("expert weights"))?;
    let el = expert_shard(e, w, rank).len();
    check_shard(ex, el, f, c)?;
    let want = el * f * c;
    for (what, len) in [
        ("gate_proj", gr.w_gate.len()),
        ("up_proj", gr.w_up.len()),
        ("down_proj", gr.w_down.len()),
    ] {
        if len < want {
            return Err(ep_err(format!(
                "the local d {what} shard holds {len} elements, {el} experts need {want}"
            )));
        }
    }
    let st = T::stored(&mut b.stored).ok_or_else(|| mismatch("buffers"))?;
    if n > 0 {
        T::combine_backward(gpu, &mut b.dw, &mut st.dye, dy, &b.ye, &b.w, &b.perm.inv, [n, c, k])?;
    }
    let m_loc = ep.m_loc;
    let lst: &mut StoredBuffers<T> = T::stored(&mut ep.stored).ok_or_else(|| mismatch("expert-parallel buffers"))?;
    comm.exchange_blocks(&st.dye, &scaled(&ep.sends, c), &mut lst.dye, &scaled(&ep.recvs, c))?;
    if m_loc > 0 {
        let seg = (&ep.offsets, &ep.tile_off);
        T::gemm(
            gpu,
            &mut ep.dact,
            &lst.dye,
            &ex.w_down,
            seg,
            [m_loc, el, c, f],
            (false, false),
            d.math,
        )?;
        T::wgrad(
            gpu,
            &mut gr.w_down,
            &lst.dye,
            &lst.act,
            &ep.offsets,
            [m_loc, el, c, f],
            d.math,
        )?;
        T::swiglu_backward(gpu, lst, &ep.dact, (&ep.g, &ep.u), m_loc * f)?;
        T::gemm(
            gpu,
            &mut ep.dxe,
            &lst.dg,
            &ex.w_gate,
            seg,
            [m_loc, el, f, c],
            (false, false),
            d.math,
        )?;
        T::gemm(
            gpu,
            &mut ep.dxe,
            &lst.du,
            &ex.w_up,
            seg,
            [m_loc, el, f, c],
            (false, true),
            d.math,
        )?;
        T::wgrad(
            gpu,
            &mut gr.w_gate,
            &lst.dg,
            &lst.xe,
            &ep.offsets,
            [m_loc, el, f, c],
            d.math,
        )?;
        T::wgrad(
            gpu,
            &mut gr.w_up,
            &lst.du,
            &lst.xe,
            &ep.offsets,
            [m_loc, el, f, c],
            d.math,
        )?;
    }
    // The d expert inputs back to their tokens' ranks.
    comm.exchange_blocks(&ep.dxe, &scaled(&ep.recvs, c), &mut b.dxe, &scaled(&ep.sends, c))?;
    if n == 0 {
        return Ok(());
    }
    moe_combine_f32(gpu, dx, &b.dxe, None, &b.perm.inv, n, c, k, true)?;
    router_and_shared_backward::<T>(gpu, dx, Some(gr), dy, x, wt, ex, b, aux)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn experts_split_contiguously_and_every_expert_has_one_owner() {
        for (e, w) in [(4usize, 2usize), (6, 3), (7, 2), (8, 8)] {
            let mut seen = vec![0; e];
            for r in 0..w {
                for x in expert_shard(e, w, r) {
                    seen[x] += 1;
                    assert_eq!(owner(e, w, x), r, "e {e} w {w} expert {x}");
                }
            }
            assert!(seen.iter().all(|&s| s == 1), "e {e} w {w}: {seen:?}");
        }
        assert!(plan_expert_parallel(4, 2).is_ok());
        let err = plan_expert_parallel(2, 3).unwrap_err().to_string();
        assert!(err.contains("2 routed experts") && err.contains("3 ranks"), "{err}");
        assert!(plan_expert_parallel(4, 0).is_err());
    }
}
