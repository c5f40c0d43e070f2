//! Launchers of `kernels/moe.cu`: the mixture-of-experts layer on the device
//! (routing, permutation, grouped bf16 expert products, combine, their
//! backward and the expert-load statistics); [`crate::moe_layer`] chains
//! them into a whole layer with no copy to the host.
//!
//! | name | shape |
//! |---|---|
//! | x, y, dx, dy | [N, C] f32 |
//! | logits, probs, dlogits | [N, E] f32 |
//! | ids, w, dw | [N, K] (u32, f32) |
//! | xe, act, dye, dg, du | [M = N K, C or F] stored: bf16 (u16 bits) or f32 |
//! | g, u, ye, dact, dxe | [M, F or C] f32 |
//! | w_gate, w_up | [E, F, C] stored; w_down [E, C, F] stored |
//!
//! Each kernel that stores or reads the "stored" buffers has a `_bf16` and an
//! `_f32` launcher ([`MoeStorage`]); the f32 ones run the SIMT kernels only
//! (the tensor-core kernels multiply bf16). Buffer arguments are anything
//! that points at device memory ([`DevicePtr`] / [`DevicePtrMut`]): a
//! `CudaSlice`, or a `CudaView` / `CudaViewMut` into a larger flat buffer
//! (the model's parameters and gradients).
//!
//! As in [`crate::launch`], every launcher first calls a `plan_moe_*`
//! function that sees only lengths and sizes (tested without a GPU); buffers
//! may be longer than needed, a shorter one is an [`Error::InvalidArgument`]
//! naming it. Values that live on the device (expert ids, counts) are not
//! checked on the host: the routing kernels only produce ids below E.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};

use crate::device::Gpu;
use crate::error::{DriverContext, Error, Result};
use crate::launch::{check_lens, grid_1d, mul, to_i32};
use crate::registry::KernelId;

/// Most experts the routing and counting kernels take (shared-memory bitmasks).
pub const MOE_MAX_EXPERTS: usize = 1024;
/// Most experts per token (and groups kept) the routing kernels take.
pub const MOE_MAX_TOP_K: usize = 32;
/// Rows per tile of the grouped products (`MOE_TM` in `kernels/moe.cu`).
pub const MOE_TILE_ROWS: usize = 64;
/// Columns per tile of the grouped products (`MOE_TN`).
const MOE_TILE_COLS: usize = 64;
/// The largest grid.y of a launch.
const MAX_GRID_Y: usize = 65535;

/// How a router picks experts (the kernels' `aha_moe_model::Router` and
/// `norm_topk_prob`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MoeGating {
    /// Softmax over the logits, top-k, optionally renormalised (Qwen3-MoE).
    Softmax {
        /// Renormalise the k weights to sum to 1 (`norm_topk_prob`).
        renorm: bool,
    },
    /// DeepSeek-V3: sigmoid scores, correction bias for the choice,
    /// group-limited top-k, renormalisation, routed scaling.
    SigmoidGroup {
        /// Expert groups (divides E; at least 2 experts a group).
        n_group: usize,
        /// Groups kept per token.
        topk_group: usize,
        /// Renormalise the weights (`norm_topk_prob`).
        renorm: bool,
        /// `routed_scaling_factor`.
        scaling: f32,
    },
}

/// Which kernels run the grouped expert products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoeMath {
    /// Portable f32 FMA tiles (256 threads a block).
    Simt,
    /// `mma.sync` m16n8k16 bf16 tensor cores (128 threads a block; sm_80+).
    TensorCores,
}

impl MoeMath {
    fn pick(self, simt: KernelId, mma: KernelId) -> (KernelId, u32) {
        match self {
            MoeMath::Simt => (simt, 256),
            MoeMath::TensorCores => (mma, 128),
        }
    }
}

/// The element type of the stored buffers (permuted rows `xe`, activations
/// `act`, the gradients `dye`, `dg`, `du`) and of the expert weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoeStorage {
    /// bf16 (u16 bits), rounded to nearest even where stored: the mixed-precision mode.
    Bf16,
    /// f32 throughout: matches the CPU model's f32 layer to f32 rounding
    /// (SIMT kernels only).
    F32,
}

impl MoeGating {
    fn renorm(self) -> bool {
        match self {
            MoeGating::Softmax { renorm } | MoeGating::SigmoidGroup { renorm, .. } => renorm,
        }
    }
}

fn bad(op: &'static str, msg: String) -> Error {
    Error::InvalidArgument { op, msg }
}

fn check_experts(op: &'static str, e: usize, k: usize) -> Result<()> {
    if e == 0 || e > MOE_MAX_EXPERTS {
        return Err(bad(op, format!("E = {e} experts must be in 1..={MOE_MAX_EXPERTS}")));
    }
    if k == 0 || k > e.min(MOE_MAX_TOP_K) {
        return Err(bad(
            op,
            format!("top-k = {k} must be in 1..={} (E = {e})", e.min(MOE_MAX_TOP_K)),
        ));
    }
    Ok(())
}

/// A routing launch: sizes as the kernels' ints, dynamic shared memory bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeRoutePlan {
    /// Tokens (= blocks).
    pub n: i32,
    /// Experts.
    pub e: i32,
    /// Experts per token.
    pub k: i32,
    /// Dynamic shared memory of the launch, bytes.
    pub shared_bytes: u32,
}

/// Checks a routing launch: `lens` = (probs, ids, w, denom, logits)
/// lengths and `bias` the correction bias's length (if any) for `n` tokens,
/// `e` experts, top-`k`. `None` when there are no tokens.
pub fn plan_moe_route(
    lens: [usize; 5],
    bias: Option<usize>,
    n: usize,
    e: usize,
    k: usize,
    gating: MoeGating,
) -> Result<Option<MoeRoutePlan>> {
    const OP: &str = "moe_route";
    check_experts(OP, e, k)?;
    let ne = mul(OP, n, e)?;
    let nk = mul(OP, n, k)?;
    let [probs, ids, w, denom, logits] = lens;
    check_lens(
        OP,
        &[
            ("probs", probs, ne),
            ("ids", ids, nk),
            ("w", w, nk),
            ("denom", denom, n),
            ("logits", logits, ne),
        ],
    )?;
    let mut shared = e;
    if let MoeGating::SigmoidGroup {
        n_group, topk_group, ..
    } = gating
    {
        if n_group == 0 || !e.is_multiple_of(n_group) || e / n_group < 2 {
            return Err(bad(
                OP,
                format!("n_group = {n_group} must divide E = {e} into groups of at least 2"),
            ));
        }
        if topk_group == 0 || topk_group > n_group.min(MOE_MAX_TOP_K) {
            return Err(bad(
                OP,
                format!(
                    "topk_group = {topk_group} must be in 1..={}",
                    n_group.min(MOE_MAX_TOP_K)
                ),
            ));
        }
        if let Some(bias) = bias {
            check_lens(OP, &[("bias", bias, e)])?;
        }
        shared += n_group;
    } else if bias.is_some() {
        return Err(bad(OP, "a correction bias needs the sigmoid-group gating".into()));
    }
    if n == 0 {
        return Ok(None);
    }
    Ok(Some(MoeRoutePlan {
        n: to_i32(OP, "tokens", n)?,
        e: e as i32,
        k: k as i32,
        shared_bytes: (shared * 4) as u32,
    }))
}

fn route_cfg(p: &MoeRoutePlan) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (p.n as u32, 1, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: p.shared_bytes,
    }
}

/// Routes `n` tokens (kernel `moe_route_softmax_f32` or
/// `moe_route_sigmoid_group_f32`; CPU twins `aha_tensor::cpu::moe_route_softmax`
/// and `moe_route_sigmoid_group`): writes `probs [n, e]` (softmax
/// probabilities or sigmoid scores, saved for the backward), `ids, w [n, k]`
/// and `denom [n]` from `logits [n, e]`. `bias [e]` is DeepSeek-V3's
/// `e_score_correction_bias` (sigmoid gating only).
pub fn moe_route_f32(
    gpu: &Gpu,
    probs: &mut CudaSlice<f32>,
    ids: &mut CudaSlice<u32>,
    w: &mut CudaSlice<f32>,
    denom: &mut CudaSlice<f32>,
    logits: &CudaSlice<f32>,
    bias: Option<&impl DevicePtr<f32>>,
    n: usize,
    e: usize,
    k: usize,
    gating: MoeGating,
) -> Result<()> {
    let lens = [probs.len(), ids.len(), w.len(), denom.len(), logits.len()];
    let Some(p) = plan_moe_route(lens, bias.map(|b| b.len()), n, e, k, gating)? else {
        return Ok(());
    };
    let renorm = i32::from(gating.renorm());
    match gating {
        MoeGating::Softmax { .. } => {
            let f = gpu.function(KernelId::MoeRouteSoftmaxF32)?;
            let mut b = gpu.stream().launch_builder(&f);
            b.arg(probs)
                .arg(ids)
                .arg(w)
                .arg(denom)
                .arg(logits)
                .arg(&p.n)
                .arg(&p.e)
                .arg(&p.k)
                .arg(&renorm);
            // SAFETY: (float*, unsigned*, float*, float*, const float*, int x4);
            // the plan checked probs/logits hold n * e, ids/w n * k, denom n,
            // e <= 1024 and k <= min(e, 32); one warp per token with e floats
            // of dynamic shared memory.
            unsafe { b.launch(route_cfg(&p)) }.ctx("launch moe_route_softmax_f32")?;
        }
        MoeGating::SigmoidGroup {
            n_group,
            topk_group,
            scaling,
            ..
        } => {
            let (g, tg) = (n_group as i32, topk_group as i32);
            // A null pointer stands for "no bias" (the kernel tests it).
            let (bias_ptr, _bias_sync) = match bias {
                Some(bb) => {
                    let (ptr, sync) = bb.device_ptr(gpu.stream());
                    (ptr, Some(sync))
                }
                None => (0u64, None),
            };
            let f = gpu.function(KernelId::MoeRouteSigmoidGroupF32)?;
            let mut b = gpu.stream().launch_builder(&f);
            b.arg(probs).arg(ids).arg(w).arg(denom).arg(logits).arg(&bias_ptr);
            b.arg(&p.n)
                .arg(&p.e)
                .arg(&p.k)
                .arg(&g)
                .arg(&tg)
                .arg(&renorm)
                .arg(&scaling);
            // SAFETY: (float*, unsigned*, float*, float*, const float*,
            // const float* or null, int x6, float); lengths and the group
            // geometry were checked by the plan; e + n_group floats of
            // dynamic shared memory.
            unsafe { b.launch(route_cfg(&p)) }.ctx("launch moe_route_sigmoid_group_f32")?;
        }
    }
    Ok(())
}

/// Checks the routing backward: `lens` = (dlogits, dw, w, ids, probs, denom)
/// lengths and `aux` the aux gradient's length (if any).
pub fn plan_moe_route_backward(
    lens: [usize; 6],
    aux: Option<usize>,
    n: usize,
    e: usize,
    k: usize,
) -> Result<Option<MoeRoutePlan>> {
    const OP: &str = "moe_route_backward_f32";
    check_experts(OP, e, k)?;
    let ne = mul(OP, n, e)?;
    let nk = mul(OP, n, k)?;
    let [dlogits, dw, w, ids, probs, denom] = lens;
    check_lens(
        OP,
        &[
            ("dlogits", dlogits, ne),
            ("dw", dw, nk),
            ("w", w, nk),
            ("ids", ids, nk),
            ("probs", probs, ne),
            ("denom", denom, n),
        ],
    )?;
    if let Some(aux) = aux {
        check_lens(OP, &[("aux", aux, e)])?;
    }
    if n == 0 {
        return Ok(None);
    }
    Ok(Some(MoeRoutePlan {
        n: to_i32(OP, "tokens", n)?,
        e: e as i32,
        k: k as i32,
        shared_bytes: (e * 4) as u32,
    }))
}

/// Routing backward to the logits (kernel `moe_route_backward_f32`; CPU twin
/// `aha_tensor::cpu::moe_route_backward`): `dlogits [n, e] =` (assigned) from
/// `dw [n, k]` (d loss / d routing weights) and what [`moe_route_f32`] saved.
/// `aux [e]` is an extra gradient on every token's softmax probabilities
/// (the Switch load-balancing loss), ignored by the sigmoid gating.
pub fn moe_route_backward_f32(
    gpu: &Gpu,
    dlogits: &mut CudaSlice<f32>,
    dw: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    ids: &CudaSlice<u32>,
    probs: &CudaSlice<f32>,
    denom: &CudaSlice<f32>,
    aux: Option<&CudaSlice<f32>>,
    n: usize,
    e: usize,
    k: usize,
    gating: MoeGating,
) -> Result<()> {
    let lens = [dlogits.len(), dw.len(), w.len(), ids.len(), probs.len(), denom.len()];
    let Some(p) = plan_moe_route_backward(lens, aux.map(|a| a.len()), n, e, k)? else {
        return Ok(());
    };
    let (sigmoid, rsf) = match gating {
        MoeGating::Softmax { .. } => (0i32, 1.0f32),
        MoeGating::SigmoidGroup { scaling, .. } => (1, scaling),
    };
    let renorm = i32::from(gating.renorm());
    let null: u64 = 0;
    let f = gpu.function(KernelId::MoeRouteBackwardF32)?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(dlogits).arg(dw).arg(w).arg(ids).arg(probs).arg(denom);
    match aux {
        Some(a) => b.arg(a),
        None => b.arg(&null),
    };
    b.arg(&p.n).arg(&p.e).arg(&p.k).arg(&sigmoid).arg(&renorm).arg(&rsf);
    // SAFETY: (float*, const float* x2, const unsigned*, const float* x2,
    // const float* or null, int x5, float); lengths checked by the plan; one
    // warp per token with e floats of dynamic shared memory.
    unsafe { b.launch(route_cfg(&p)) }.ctx("launch moe_route_backward_f32")?;
    Ok(())
}

/// The permutation of one layer's (token, slot) pairs into expert-contiguous
/// rows, and the expert-load statistics, all on the device.
#[derive(Debug)]
pub struct MoePermutation {
    /// Tokens routed to each expert [E] (the load for the aux-loss-free bias).
    pub counts: CudaSlice<u32>,
    /// Load fractions `counts / M` [E].
    pub frac: CudaSlice<f32>,
    /// Exclusive scan of `counts` [E + 1]: expert x owns rows `offsets[x]..offsets[x + 1]`.
    pub offsets: CudaSlice<u32>,
    /// Tile list of the grouped products [E + 1] (64-row tiles per expert, scanned).
    pub tile_off: CudaSlice<u32>,
    /// Token of each permuted row [M].
    pub tok: CudaSlice<u32>,
    /// Slot (0..K) of each permuted row [M].
    pub slot: CudaSlice<u32>,
    /// Permuted row of each (token, slot) [N * K].
    pub inv: CudaSlice<u32>,
}

impl MoePermutation {
    /// Zeroed buffers for `n` tokens, top-`k`, `e` experts (empty ones hold
    /// one element).
    pub fn new(gpu: &Gpu, n: usize, k: usize, e: usize) -> Result<MoePermutation> {
        let m = mul("MoePermutation::new", n, k)?;
        // At least one element each: the driver refuses empty allocations.
        Ok(MoePermutation {
            counts: gpu.zeros(e.max(1))?,
            frac: gpu.zeros(e.max(1))?,
            offsets: gpu.zeros(e + 1)?,
            tile_off: gpu.zeros(e + 1)?,
            tok: gpu.zeros(m.max(1))?,
            slot: gpu.zeros(m.max(1))?,
            inv: gpu.zeros(m.max(1))?,
        })
    }
}

/// Checks a permutation: `lens` = (counts, frac, offsets, tile_off, tok,
/// slot, inv, ids) lengths. Returns M = n * k, or `None` when it is 0.
pub fn plan_moe_permute(lens: [usize; 8], n: usize, k: usize, e: usize) -> Result<Option<u64>> {
    const OP: &str = "moe_permute";
    check_experts(OP, e, k)?;
    let m = mul(OP, n, k)?;
    if u32::try_from(m).is_err() {
        return Err(bad(OP, format!("M = {m} rows do not fit the kernels' u32 row indices")));
    }
    let [counts, frac, offsets, tile_off, tok, slot, inv, ids] = lens;
    check_lens(
        OP,
        &[
            ("counts", counts, e),
            ("frac", frac, e),
            ("offsets", offsets, e + 1),
            ("tile_off", tile_off, e + 1),
            ("tok", tok, m),
            ("slot", slot, m),
            ("inv", inv, m),
            ("ids", ids, m),
        ],
    )?;
    Ok(if m == 0 { None } else { Some(m as u64) })
}

/// Counts, offsets, tile list, load fractions and the stable permutation
/// with its inverse (kernels `moe_count_u32` then `moe_scatter_u32`; CPU
/// twins `aha_tensor::cpu::moe_count` and `moe_permute`) from `ids [n, k]`.
/// With no tokens the counts and offsets are set to zero.
pub fn moe_permute(
    gpu: &Gpu,
    p: &mut MoePermutation,
    ids: &CudaSlice<u32>,
    n: usize,
    k: usize,
    e: usize,
) -> Result<()> {
    let lens = [
        p.counts.len(),
        p.frac.len(),
        p.offsets.len(),
        p.tile_off.len(),
        p.tok.len(),
        p.slot.len(),
        p.inv.len(),
        ids.len(),
    ];
    let m = plan_moe_permute(lens, n, k, e)?.unwrap_or(0);
    let (e_i, k_i) = (e as i32, k as i32);
    let f = gpu.function(KernelId::MoeCountU32)?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut p.counts)
        .arg(&mut p.offsets)
        .arg(&mut p.tile_off)
        .arg(&mut p.frac)
        .arg(ids)
        .arg(&m)
        .arg(&e_i);
    let one_block = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: (unsigned* x3, float*, const unsigned*, unsigned long long,
    // int); counts/frac hold e, offsets/tile_off e + 1, ids m (checked); one
    // block of 1024 threads with e <= 1024 shared counters.
    unsafe { b.launch(one_block) }.ctx("launch moe_count_u32")?;
    if m == 0 {
        return Ok(());
    }
    let f = gpu.function(KernelId::MoeScatterU32)?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut p.tok)
        .arg(&mut p.slot)
        .arg(&mut p.inv)
        .arg(ids)
        .arg(&p.offsets)
        .arg(&m)
        .arg(&k_i);
    let cfg = LaunchConfig {
        grid_dim: (e as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: (unsigned* x3, const unsigned* x2, unsigned long long, int);
    // tok/slot/inv/ids hold m (checked); positions are offsets[x] + rank <
    // offsets[E] = m as the counts came from the same ids.
    unsafe { b.launch(cfg) }.ctx("launch moe_scatter_u32")?;
    Ok(())
}

fn gather<T: DeviceRepr>(
    gpu: &Gpu,
    (op, id): (&'static str, KernelId),
    xe: &mut impl DevicePtrMut<T>,
    x: &impl DevicePtr<f32>,
    tok: &impl DevicePtr<u32>,
    (m, n, c): (usize, usize, usize),
) -> Result<()> {
    let mc = mul(op, m, c)?;
    check_lens(
        op,
        &[
            ("xe", xe.len(), mc),
            ("x", x.len(), mul(op, n, c)?),
            ("tok", tok.len(), m),
        ],
    )?;
    if mc == 0 {
        return Ok(());
    }
    let (mm, cc) = (m as u64, c as u64);
    let st = gpu.stream();
    let (pxe, _sxe) = xe.device_ptr_mut(st);
    let (px, _sx) = x.device_ptr(st);
    let (ptok, _stok) = tok.device_ptr(st);
    let f = gpu.function(id)?;
    let mut b = st.launch_builder(&f);
    b.arg(&pxe).arg(&px).arg(&ptok).arg(&mm).arg(&cc);
    // SAFETY: (T*, const float*, const unsigned*, unsigned long long x2) with
    // T the launcher's storage type; xe holds m * c, tok m (checked); token
    // ids come from moe_permute (< n); the guards outlive the launch.
    unsafe { b.launch(grid_1d(mc as u64)) }.ctx(op)?;
    Ok(())
}

/// Gathers token rows into expert order as bf16 (kernel `moe_gather_bf16`;
/// CPU twin `aha_tensor::cpu::moe_gather` with `Store::Bf16`):
/// `xe[p] = bf16(x[tok[p]])`, `xe [m, c]`, `x [n, c]`, `tok [m]` (token ids
/// < n, from [`moe_permute`]).
pub fn moe_gather_bf16(
    gpu: &Gpu,
    xe: &mut impl DevicePtrMut<u16>,
    x: &impl DevicePtr<f32>,
    tok: &impl DevicePtr<u32>,
    m: usize,
    n: usize,
    c: usize,
) -> Result<()> {
    gather(gpu, ("moe_gather_bf16", KernelId::MoeGatherBf16), xe, x, tok, (m, n, c))
}

/// [`moe_gather_bf16`] with f32 storage (kernel `moe_gather_f32`; CPU twin
/// `aha_tensor::cpu::moe_gather` with `Store::F32`): `xe[p] = x[tok[p]]`.
pub fn moe_gather_f32(
    gpu: &Gpu,
    xe: &mut impl DevicePtrMut<f32>,
    x: &impl DevicePtr<f32>,
    tok: &impl DevicePtr<u32>,
    m: usize,
    n: usize,
    c: usize,
) -> Result<()> {
    gather(gpu, ("moe_gather_f32", KernelId::MoeGatherF32), xe, x, tok, (m, n, c))
}

/// Checks a combine: `lens` = (out, src, inv) lengths and `w` the weights'
/// length (if any).
pub fn plan_moe_combine(lens: [usize; 3], w: Option<usize>, n: usize, c: usize, k: usize) -> Result<Option<u64>> {
    const OP: &str = "moe_combine_f32";
    let nc = mul(OP, n, c)?;
    let nk = mul(OP, n, k)?;
    let [out, src, inv] = lens;
    check_lens(OP, &[("out", out, nc), ("src", src, mul(OP, nk, c)?), ("inv", inv, nk)])?;
    if let Some(w) = w {
        check_lens(OP, &[("w", w, nk)])?;
    }
    to_i32(OP, "k", k)?;
    Ok(if nc == 0 { None } else { Some(nc as u64) })
}

/// Weighted un-permute (kernel `moe_combine_f32`; CPU twin
/// `aha_tensor::cpu::moe_combine`): `out[t] (= or +=) sum_j w[t, j]
/// src[inv[t, j]]`, summed in slot order (deterministic, no atomics). With
/// `w = None` every weight is 1: the backward of [`moe_gather_bf16`]
/// (`dx += sum_j dxe[inv[t, j]]`). `out [n, c]`, `src [n k, c]`.
pub fn moe_combine_f32(
    gpu: &Gpu,
    out: &mut CudaSlice<f32>,
    src: &CudaSlice<f32>,
    w: Option<&CudaSlice<f32>>,
    inv: &CudaSlice<u32>,
    n: usize,
    c: usize,
    k: usize,
    accumulate: bool,
) -> Result<()> {
    let lens = [out.len(), src.len(), inv.len()];
    let Some(nc) = plan_moe_combine(lens, w.map(|w| w.len()), n, c, k)? else {
        return Ok(());
    };
    let (nn, cc, kk, acc) = (n as u64, c as u64, k as i32, i32::from(accumulate));
    let null: u64 = 0;
    let f = gpu.function(KernelId::MoeCombineF32)?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(out).arg(src);
    match w {
        Some(w) => b.arg(w),
        None => b.arg(&null),
    };
    b.arg(inv).arg(&nn).arg(&cc).arg(&kk).arg(&acc);
    // SAFETY: (float*, const float* x2 (w may be null), const unsigned*,
    // unsigned long long x2, int x2); lengths checked; inv holds rows < n k
    // written by moe_permute.
    unsafe { b.launch(grid_1d(nc)) }.ctx("launch moe_combine_f32")?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn combine_backward<T: DeviceRepr>(
    gpu: &Gpu,
    (op, id): (&'static str, KernelId),
    dw: &mut CudaSlice<f32>,
    dye: &mut impl DevicePtrMut<T>,
    dy: &impl DevicePtr<f32>,
    ye: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    inv: &CudaSlice<u32>,
    (n, c, k): (usize, usize, usize),
) -> Result<()> {
    let nk = mul(op, n, k)?;
    let mc = mul(op, nk, c)?;
    check_lens(
        op,
        &[
            ("dw", dw.len(), nk),
            ("dye", dye.len(), mc),
            ("dy", dy.len(), mul(op, n, c)?),
            ("ye", ye.len(), mc),
            ("w", w.len(), nk),
            ("inv", inv.len(), nk),
        ],
    )?;
    if nk == 0 {
        return Ok(());
    }
    let (nn, cc, kk) = (to_i32(op, "n", n)?, to_i32(op, "c", c)?, to_i32(op, "k", k)?);
    let st = gpu.stream();
    let (pdye, _sdye) = dye.device_ptr_mut(st);
    let (pdy, _sdy) = dy.device_ptr(st);
    let f = gpu.function(id)?;
    let mut b = st.launch_builder(&f);
    b.arg(dw)
        .arg(&pdye)
        .arg(&pdy)
        .arg(ye)
        .arg(w)
        .arg(inv)
        .arg(&nn)
        .arg(&cc)
        .arg(&kk);
    let cfg = LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: (float*, T*, const float* x3, const unsigned*, int x3) with T
    // the launcher's storage type; lengths checked; one block per token, inv
    // rows < n k; the guards outlive the launch.
    unsafe { b.launch(cfg) }.ctx(op)?;
    Ok(())
}

/// Backward of the weighted combine (kernel `moe_combine_backward_bf16`;
/// CPU twin `aha_tensor::cpu::moe_combine_backward` with `Store::Bf16`):
/// `dw[t, j] = dy[t] . ye[inv[t, j]]` and `dye[inv[t, j]] = bf16(w[t, j]
/// dy[t])` (both assigned). `dw, w, inv [n, k]`, `dye [n k, c]` bf16,
/// `dy [n, c]`, `ye [n k, c]`.
pub fn moe_combine_backward_bf16(
    gpu: &Gpu,
    dw: &mut CudaSlice<f32>,
    dye: &mut impl DevicePtrMut<u16>,
    dy: &impl DevicePtr<f32>,
    ye: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    inv: &CudaSlice<u32>,
    n: usize,
    c: usize,
    k: usize,
) -> Result<()> {
    let id = ("moe_combine_backward_bf16", KernelId::MoeCombineBackwardBf16);
    combine_backward(gpu, id, dw, dye, dy, ye, w, inv, (n, c, k))
}

/// [`moe_combine_backward_bf16`] with f32 storage of `dye` (kernel
/// `moe_combine_backward_f32`; CPU twin `aha_tensor::cpu::moe_combine_backward`
/// with `Store::F32`).
pub fn moe_combine_backward_f32(
    gpu: &Gpu,
    dw: &mut CudaSlice<f32>,
    dye: &mut impl DevicePtrMut<f32>,
    dy: &impl DevicePtr<f32>,
    ye: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    inv: &CudaSlice<u32>,
    n: usize,
    c: usize,
    k: usize,
) -> Result<()> {
    let id = ("moe_combine_backward_f32", KernelId::MoeCombineBackwardF32);
    combine_backward(gpu, id, dw, dye, dy, ye, w, inv, (n, c, k))
}

fn swiglu_backward<T: DeviceRepr>(
    gpu: &Gpu,
    (op, id): (&'static str, KernelId),
    (dg, du): (&mut impl DevicePtrMut<T>, &mut impl DevicePtrMut<T>),
    da: &CudaSlice<f32>,
    g: &CudaSlice<f32>,
    u: &CudaSlice<f32>,
    len: usize,
) -> Result<()> {
    check_lens(
        op,
        &[
            ("dg", dg.len(), len),
            ("du", du.len(), len),
            ("da", da.len(), len),
            ("g", g.len(), len),
            ("u", u.len(), len),
        ],
    )?;
    if len == 0 {
        return Ok(());
    }
    let nn = len as u64;
    let st = gpu.stream();
    let (pdg, _sdg) = dg.device_ptr_mut(st);
    let (pdu, _sdu) = du.device_ptr_mut(st);
    let f = gpu.function(id)?;
    let mut b = st.launch_builder(&f);
    b.arg(&pdg).arg(&pdu).arg(da).arg(g).arg(u).arg(&nn);
    // SAFETY: (T* x2, const float* x3, unsigned long long) with T the
    // launcher's storage type; every buffer holds len elements (checked).
    unsafe { b.launch(grid_1d(nn)) }.ctx(op)?;
    Ok(())
}

/// SwiGLU backward with bf16 outputs (kernel `moe_swiglu_backward_bf16`; CPU
/// twin `aha_tensor::cpu::moe_swiglu_backward` with `Store::Bf16`):
/// `dg, du [len]` (bf16, assigned) from `da, g, u [len]`.
pub fn moe_swiglu_backward_bf16(
    gpu: &Gpu,
    dg: &mut impl DevicePtrMut<u16>,
    du: &mut impl DevicePtrMut<u16>,
    da: &CudaSlice<f32>,
    g: &CudaSlice<f32>,
    u: &CudaSlice<f32>,
    len: usize,
) -> Result<()> {
    let id = ("moe_swiglu_backward_bf16", KernelId::MoeSwigluBackwardBf16);
    swiglu_backward(gpu, id, (dg, du), da, g, u, len)
}

/// [`moe_swiglu_backward_bf16`] with f32 outputs (kernel
/// `moe_swiglu_backward_f32`; CPU twin `aha_tensor::cpu::moe_swiglu_backward`
/// with `Store::F32`).
pub fn moe_swiglu_backward_f32(
    gpu: &Gpu,
    dg: &mut impl DevicePtrMut<f32>,
    du: &mut impl DevicePtrMut<f32>,
    da: &CudaSlice<f32>,
    g: &CudaSlice<f32>,
    u: &CudaSlice<f32>,
    len: usize,
) -> Result<()> {
    let id = ("moe_swiglu_backward_f32", KernelId::MoeSwigluBackwardF32);
    swiglu_backward(gpu, id, (dg, du), da, g, u, len)
}

/// DeepSeek-V3's aux-loss-free balancing step on the device (kernel
/// `moe_bias_update_f32`; CPU twin `aha_tensor::cpu::moe_bias_update`):
/// `bias[x] -= speed` where `counts[x]` is above the mean, `+= speed` where
/// below. `bias, counts [e]`.
pub fn moe_bias_update_f32(
    gpu: &Gpu,
    bias: &mut impl DevicePtrMut<f32>,
    counts: &CudaSlice<u32>,
    e: usize,
    speed: f32,
) -> Result<()> {
    const OP: &str = "moe_bias_update_f32";
    check_lens(OP, &[("bias", bias.len(), e), ("counts", counts.len(), e)])?;
    if e == 0 {
        return Ok(());
    }
    let e_i = to_i32(OP, "e", e)?;
    let (pbias, _sbias) = bias.device_ptr_mut(gpu.stream());
    let f = gpu.function(KernelId::MoeBiasUpdateF32)?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&pbias).arg(counts).arg(&e_i).arg(&speed);
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: (float*, const unsigned*, int, float); both hold e (checked).
    unsafe { b.launch(cfg) }.ctx("launch moe_bias_update_f32")?;
    Ok(())
}

/// A grouped-product launch: sizes as the kernel's ints and the grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeGroupedPlan {
    /// Experts.
    pub e: i32,
    /// Contracted dimension.
    pub k: i32,
    /// Output columns.
    pub n: i32,
    /// Grid (x, y, z).
    pub grid: (u32, u32, u32),
}

impl MoeGroupedPlan {
    fn config(&self, threads: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: self.grid,
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// Checks a grouped product over `m` permuted rows and `e` experts:
/// `out [m, n]`, `a [m, k]`, `b [e, n, k]` (or `[e, k, n]`), segment
/// offsets and tile list `[e + 1]`. The grid's y covers the most tiles any
/// routing can need, `ceil(m / 64) + e`, so the host needs no counts.
/// `lens` = (out, a, b, offsets, tile_off).
pub fn plan_moe_grouped(lens: [usize; 5], m: usize, e: usize, k: usize, n: usize) -> Result<Option<MoeGroupedPlan>> {
    const OP: &str = "moe_grouped_gemm_bf16";
    if e == 0 || e > MAX_GRID_Y {
        return Err(bad(OP, format!("E = {e} experts must be in 1..={MAX_GRID_Y}")));
    }
    let [out, a, b, offsets, tile_off] = lens;
    check_lens(
        OP,
        &[
            ("out", out, mul(OP, m, n)?),
            ("a", a, mul(OP, m, k)?),
            ("b", b, mul(OP, e, mul(OP, n, k)?)?),
            ("offsets", offsets, e + 1),
            ("tile_off", tile_off, e + 1),
        ],
    )?;
    if u32::try_from(m).is_err() {
        return Err(bad(OP, format!("M = {m} rows do not fit u32 offsets")));
    }
    let tiles = m.div_ceil(MOE_TILE_ROWS) + e;
    if tiles > MAX_GRID_Y {
        return Err(bad(
            OP,
            format!("ceil(M / {MOE_TILE_ROWS}) + E = {tiles} tiles exceed the grid's {MAX_GRID_Y}"),
        ));
    }
    if m == 0 || n == 0 {
        return Ok(None);
    }
    let nt = n.div_ceil(MOE_TILE_COLS);
    Ok(Some(MoeGroupedPlan {
        e: e as i32,
        k: to_i32(OP, "k", k)?,
        n: to_i32(OP, "n", n)?,
        grid: (
            u32::try_from(nt).map_err(|_| bad(OP, format!("n = {n} too wide")))?,
            tiles as u32,
            1,
        ),
    }))
}

/// The segment offsets and tile list of a grouped product (from [`moe_permute`]).
type Segments<'s> = (&'s CudaSlice<u32>, &'s CudaSlice<u32>);

#[allow(clippy::too_many_arguments)]
fn grouped_gemm<T: DeviceRepr>(
    gpu: &Gpu,
    (op, id, threads): (&'static str, KernelId, u32),
    out: &mut impl DevicePtrMut<f32>,
    a: &impl DevicePtr<T>,
    b: &impl DevicePtr<T>,
    (offsets, tile_off): Segments<'_>,
    (m, e, k, n): (usize, usize, usize, usize),
    trans_b: bool,
    accumulate: bool,
) -> Result<()> {
    let lens = [out.len(), a.len(), b.len(), offsets.len(), tile_off.len()];
    let Some(p) = plan_moe_grouped(lens, m, e, k, n)? else {
        return Ok(());
    };
    let (tb, acc) = (i32::from(trans_b), i32::from(accumulate));
    let st = gpu.stream();
    let (pout, _sout) = out.device_ptr_mut(st);
    let (pa, _sa) = a.device_ptr(st);
    let (pb, _sb) = b.device_ptr(st);
    let f = gpu.function(id)?;
    let mut l = st.launch_builder(&f);
    l.arg(&pout)
        .arg(&pa)
        .arg(&pb)
        .arg(offsets)
        .arg(tile_off)
        .arg(&p.e)
        .arg(&p.k)
        .arg(&p.n)
        .arg(&tb)
        .arg(&acc);
    // SAFETY: every kernel of `id` takes (float*, const T* x2, const
    // unsigned* x2, int x5) with T the launcher's storage type; lengths
    // checked by the plan; offsets/tile_off come from moe_permute (offsets[e]
    // <= m, tile_off[e] <= grid.y), so every row read or written is < m and
    // every weight index < e * n * k; the guards outlive the launch.
    unsafe { l.launch(p.config(threads)) }.ctx(op)?;
    Ok(())
}

/// Grouped product over expert segments (kernel `moe_grouped_gemm_bf16`; CPU
/// twin `aha_tensor::cpu::moe_grouped_matmul`): for the rows of expert x,
/// `out (= or +=) a B_x` with `B_x` the x-th `[n, k]` matrix of `b` used
/// transposed (`trans_b`, a linear layer's weight) or the x-th `[k, n]`.
/// bf16 operands, f32 accumulation and output. `out [m, n]` f32, `a [m, k]`.
/// With `k = 0` and no accumulation the rows are zeroed. `math` picks the
/// SIMT kernel or its tensor-core twin `moe_grouped_gemm_mma_bf16`.
pub fn moe_grouped_gemm_bf16(
    gpu: &Gpu,
    out: &mut impl DevicePtrMut<f32>,
    a: &impl DevicePtr<u16>,
    b: &impl DevicePtr<u16>,
    offsets: &CudaSlice<u32>,
    tile_off: &CudaSlice<u32>,
    m: usize,
    e: usize,
    k: usize,
    n: usize,
    trans_b: bool,
    accumulate: bool,
    math: MoeMath,
) -> Result<()> {
    let (id, threads) = math.pick(KernelId::MoeGroupedGemmBf16, KernelId::MoeGroupedGemmMmaBf16);
    let kernel = ("moe_grouped_gemm_bf16", id, threads);
    grouped_gemm(
        gpu,
        kernel,
        out,
        a,
        b,
        (offsets, tile_off),
        (m, e, k, n),
        trans_b,
        accumulate,
    )
}

/// [`moe_grouped_gemm_bf16`] with f32 operands (kernel `moe_grouped_gemm_f32`,
/// SIMT only; CPU twin `aha_tensor::cpu::moe_grouped_matmul`).
pub fn moe_grouped_gemm_f32(
    gpu: &Gpu,
    out: &mut impl DevicePtrMut<f32>,
    a: &impl DevicePtr<f32>,
    b: &impl DevicePtr<f32>,
    offsets: &CudaSlice<u32>,
    tile_off: &CudaSlice<u32>,
    m: usize,
    e: usize,
    k: usize,
    n: usize,
    trans_b: bool,
    accumulate: bool,
) -> Result<()> {
    let kernel = ("moe_grouped_gemm_f32", KernelId::MoeGroupedGemmF32, 256);
    grouped_gemm(
        gpu,
        kernel,
        out,
        a,
        b,
        (offsets, tile_off),
        (m, e, k, n),
        trans_b,
        accumulate,
    )
}

#[allow(clippy::too_many_arguments)]
fn grouped_gate_up<T: DeviceRepr>(
    gpu: &Gpu,
    (op, id, threads): (&'static str, KernelId, u32),
    (g, u): (&mut CudaSlice<f32>, &mut CudaSlice<f32>),
    act: &mut impl DevicePtrMut<T>,
    xe: &impl DevicePtr<T>,
    (w_gate, w_up): (&impl DevicePtr<T>, &impl DevicePtr<T>),
    (offsets, tile_off): Segments<'_>,
    (m, e, c, f): (usize, usize, usize, usize),
) -> Result<()> {
    let lens = [g.len(), xe.len(), w_gate.len(), offsets.len(), tile_off.len()];
    let Some(p) = plan_moe_grouped(lens, m, e, c, f)? else {
        return Ok(());
    };
    let mf = m * f;
    check_lens(
        op,
        &[
            ("u", u.len(), mf),
            ("act", act.len(), mf),
            ("w_up", w_up.len(), e * f * c),
        ],
    )?;
    let st = gpu.stream();
    let (pact, _sact) = act.device_ptr_mut(st);
    let (pxe, _sxe) = xe.device_ptr(st);
    let (pwg, _swg) = w_gate.device_ptr(st);
    let (pwu, _swu) = w_up.device_ptr(st);
    let func = gpu.function(id)?;
    let mut l = st.launch_builder(&func);
    l.arg(g)
        .arg(u)
        .arg(&pact)
        .arg(&pxe)
        .arg(&pwg)
        .arg(&pwu)
        .arg(offsets)
        .arg(tile_off)
        .arg(&p.e)
        .arg(&p.k)
        .arg(&p.n);
    // SAFETY: every kernel of `id` takes (float* x2, T*, const T* x3, const
    // unsigned* x2, int x3) with T the launcher's storage type; lengths
    // checked (g, u, act m * f; xe m * c; weights e * f * c); rows and
    // experts bounded as in grouped_gemm; the guards outlive the launch.
    unsafe { l.launch(p.config(threads)) }.ctx(op)?;
    Ok(())
}

/// Fused gate and up projections with SwiGLU over expert segments (kernel
/// `moe_grouped_gate_up_bf16`; CPU twin `aha_tensor::cpu::moe_grouped_gate_up`):
/// `g = xe w_gate_x^T`, `u = xe w_up_x^T` (f32, saved for the backward) and
/// `act = bf16(silu(g) u)`. `g, u, act [m, f]`, `xe [m, c]`, `w_gate, w_up [e, f, c]`.
/// `math` picks the SIMT kernel or `moe_grouped_gate_up_mma_bf16`.
pub fn moe_grouped_gate_up_bf16(
    gpu: &Gpu,
    g: &mut CudaSlice<f32>,
    u: &mut CudaSlice<f32>,
    act: &mut impl DevicePtrMut<u16>,
    xe: &impl DevicePtr<u16>,
    w_gate: &impl DevicePtr<u16>,
    w_up: &impl DevicePtr<u16>,
    offsets: &CudaSlice<u32>,
    tile_off: &CudaSlice<u32>,
    m: usize,
    e: usize,
    c: usize,
    f: usize,
    math: MoeMath,
) -> Result<()> {
    let (id, threads) = math.pick(KernelId::MoeGroupedGateUpBf16, KernelId::MoeGroupedGateUpMmaBf16);
    let kernel = ("moe_grouped_gate_up_bf16", id, threads);
    grouped_gate_up(
        gpu,
        kernel,
        (g, u),
        act,
        xe,
        (w_gate, w_up),
        (offsets, tile_off),
        (m, e, c, f),
    )
}

/// [`moe_grouped_gate_up_bf16`] with f32 operands and `act` (kernel
/// `moe_grouped_gate_up_f32`, SIMT only; CPU twin
/// `aha_tensor::cpu::moe_grouped_gate_up` with `Store::F32`).
pub fn moe_grouped_gate_up_f32(
    gpu: &Gpu,
    g: &mut CudaSlice<f32>,
    u: &mut CudaSlice<f32>,
    act: &mut impl DevicePtrMut<f32>,
    xe: &impl DevicePtr<f32>,
    w_gate: &impl DevicePtr<f32>,
    w_up: &impl DevicePtr<f32>,
    offsets: &CudaSlice<u32>,
    tile_off: &CudaSlice<u32>,
    m: usize,
    e: usize,
    c: usize,
    f: usize,
) -> Result<()> {
    let kernel = ("moe_grouped_gate_up_f32", KernelId::MoeGroupedGateUpF32, 256);
    grouped_gate_up(
        gpu,
        kernel,
        (g, u),
        act,
        xe,
        (w_gate, w_up),
        (offsets, tile_off),
        (m, e, c, f),
    )
}

/// Checks a grouped weight gradient: `dw [e, n1, n2]`, `a [m, n1]`,
/// `b [m, n2]`, `offsets [e + 1]`; `lens` = (dw, a, b, offsets).
pub fn plan_moe_wgrad(lens: [usize; 4], m: usize, e: usize, n1: usize, n2: usize) -> Result<Option<MoeGroupedPlan>> {
    const OP: &str = "moe_grouped_wgrad_bf16";
    if e == 0 || e > MAX_GRID_Y {
        return Err(bad(OP, format!("E = {e} experts must be in 1..={MAX_GRID_Y}")));
    }
    let [dw, a, b, offsets] = lens;
    check_lens(
        OP,
        &[
            ("dw", dw, mul(OP, e, mul(OP, n1, n2)?)?),
            ("a", a, mul(OP, m, n1)?),
            ("b", b, mul(OP, m, n2)?),
            ("offsets", offsets, e + 1),
        ],
    )?;
    let ty = n1.div_ceil(MOE_TILE_ROWS);
    if ty > MAX_GRID_Y {
        return Err(bad(OP, format!("n1 = {n1} needs {ty} row tiles, over {MAX_GRID_Y}")));
    }
    if m == 0 || n1 == 0 || n2 == 0 {
        return Ok(None);
    }
    Ok(Some(MoeGroupedPlan {
        e: e as i32,
        k: to_i32(OP, "n1", n1)?,
        n: to_i32(OP, "n2", n2)?,
        grid: (
            u32::try_from(n2.div_ceil(MOE_TILE_COLS)).map_err(|_| bad(OP, format!("n2 = {n2} too wide")))?,
            ty as u32,
            e as u32,
        ),
    }))
}

fn grouped_wgrad<T: DeviceRepr>(
    gpu: &Gpu,
    (op, id, threads): (&'static str, KernelId, u32),
    dw: &mut impl DevicePtrMut<f32>,
    a: &impl DevicePtr<T>,
    b: &impl DevicePtr<T>,
    offsets: &CudaSlice<u32>,
    (m, e, n1, n2): (usize, usize, usize, usize),
) -> Result<()> {
    let lens = [dw.len(), a.len(), b.len(), offsets.len()];
    let Some(p) = plan_moe_wgrad(lens, m, e, n1, n2)? else {
        return Ok(());
    };
    let st = gpu.stream();
    let (pdw, _sdw) = dw.device_ptr_mut(st);
    let (pa, _sa) = a.device_ptr(st);
    let (pb, _sb) = b.device_ptr(st);
    let f = gpu.function(id)?;
    let mut l = st.launch_builder(&f);
    l.arg(&pdw).arg(&pa).arg(&pb).arg(offsets).arg(&p.k).arg(&p.n);
    // SAFETY: every kernel of `id` takes (float*, const T* x2, const
    // unsigned*, int x2) with T the launcher's storage type; lengths checked;
    // offsets from moe_permute are <= m; the guards outlive the launch.
    unsafe { l.launch(p.config(threads)) }.ctx(op)?;
    Ok(())
}

/// Grouped weight gradient (kernel `moe_grouped_wgrad_bf16`; CPU twin
/// `aha_tensor::cpu::moe_grouped_wgrad`): `dw[x] += a_x^T b_x` over the rows
/// of expert x (accumulated; experts with no rows are left as they are).
/// `math` picks the SIMT kernel or `moe_grouped_wgrad_mma_bf16`.
pub fn moe_grouped_wgrad_bf16(
    gpu: &Gpu,
    dw: &mut impl DevicePtrMut<f32>,
    a: &impl DevicePtr<u16>,
    b: &impl DevicePtr<u16>,
    offsets: &CudaSlice<u32>,
    m: usize,
    e: usize,
    n1: usize,
    n2: usize,
    math: MoeMath,
) -> Result<()> {
    let (id, threads) = math.pick(KernelId::MoeGroupedWgradBf16, KernelId::MoeGroupedWgradMmaBf16);
    grouped_wgrad(
        gpu,
        ("moe_grouped_wgrad_bf16", id, threads),
        dw,
        a,
        b,
        offsets,
        (m, e, n1, n2),
    )
}

/// [`moe_grouped_wgrad_bf16`] with f32 operands (kernel
/// `moe_grouped_wgrad_f32`, SIMT only; CPU twin `aha_tensor::cpu::moe_grouped_wgrad`).
pub fn moe_grouped_wgrad_f32(
    gpu: &Gpu,
    dw: &mut impl DevicePtrMut<f32>,
    a: &impl DevicePtr<f32>,
    b: &impl DevicePtr<f32>,
    offsets: &CudaSlice<u32>,
    m: usize,
    e: usize,
    n1: usize,
    n2: usize,
) -> Result<()> {
    let kernel = ("moe_grouped_wgrad_f32", KernelId::MoeGroupedWgradF32, 256);
    grouped_wgrad(gpu, kernel, dw, a, b, offsets, (m, e, n1, n2))
}

#[cfg(test)]
mod tests {
    //! The launchers' checks, on lengths alone: these run without a GPU.
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn msg(e: Error) -> String {
        e.to_string()
    }

    const SOFT: MoeGating = MoeGating::Softmax { renorm: true };
    const SIG: MoeGating = MoeGating::SigmoidGroup {
        n_group: 4,
        topk_group: 2,
        renorm: true,
        scaling: 2.5,
    };

    #[test]
    fn route_plan_checks_buffers_experts_and_groups() {
        // n 3, e 8, k 2: probs/logits 24, ids/w 6, denom 3.
        let ok = [24, 6, 6, 3, 24];
        let p = plan_moe_route(ok, None, 3, 8, 2, SOFT).unwrap().unwrap();
        assert_eq!((p.n, p.e, p.k, p.shared_bytes), (3, 8, 2, 32));
        for (i, name) in ["probs", "ids", "w", "denom", "logits"].iter().enumerate() {
            let mut l = ok;
            l[i] -= 1;
            assert!(
                msg(plan_moe_route(l, None, 3, 8, 2, SOFT).unwrap_err()).contains(name),
                "{name}"
            );
        }
        assert!(msg(plan_moe_route(ok, Some(8), 3, 8, 2, SOFT).unwrap_err()).contains("bias"));
        let p = plan_moe_route(ok, Some(8), 3, 8, 2, SIG).unwrap().unwrap();
        assert_eq!(p.shared_bytes, (8 + 4) * 4);
        assert!(plan_moe_route(ok, None, 3, 8, 2, SIG).is_ok());
        // A bias buffer that is present but short (even empty) is an error.
        assert!(msg(plan_moe_route(ok, Some(7), 3, 8, 2, SIG).unwrap_err()).contains("bias"));
        assert!(msg(plan_moe_route(ok, Some(0), 3, 8, 2, SIG).unwrap_err()).contains("bias"));
        // Groups: 8 experts into 3 groups, groups of 1, too many kept groups.
        let g = |n_group, topk_group| MoeGating::SigmoidGroup {
            n_group,
            topk_group,
            renorm: false,
            scaling: 1.0,
        };
        assert!(plan_moe_route(ok, None, 3, 8, 2, g(3, 1)).is_err());
        assert!(plan_moe_route(ok, None, 3, 8, 2, g(8, 1)).is_err());
        assert!(plan_moe_route(ok, None, 3, 8, 2, g(4, 5)).is_err());
        assert!(plan_moe_route(ok, None, 3, 8, 2, g(4, 0)).is_err());
        // k and E limits.
        assert!(msg(plan_moe_route(ok, None, 3, 8, 9, SOFT).unwrap_err()).contains("top-k"));
        assert!(plan_moe_route(ok, None, 3, 8, 0, SOFT).is_err());
        let big = MOE_MAX_EXPERTS + 1;
        assert!(plan_moe_route([big; 5], None, 1, big, 1, SOFT).is_err());
        assert!(plan_moe_route([64 * 33, 33, 33, 1, 64 * 33], None, 1, 64, 33, SOFT).is_err());
        assert_eq!(plan_moe_route([0; 5], None, 0, 8, 2, SOFT).unwrap(), None);
        assert!(plan_moe_route([usize::MAX; 5], None, usize::MAX, 8, 2, SOFT).is_err());
    }

    #[test]
    fn route_backward_plan_checks_every_buffer() {
        let ok = [24, 6, 6, 6, 24, 3];
        assert!(plan_moe_route_backward(ok, None, 3, 8, 2).unwrap().is_some());
        for (i, name) in ["dlogits", "dw", "w", "ids", "probs", "denom"].iter().enumerate() {
            let mut l = ok;
            l[i] -= 1;
            assert!(
                msg(plan_moe_route_backward(l, None, 3, 8, 2).unwrap_err()).contains(name),
                "{name}"
            );
        }
        assert!(msg(plan_moe_route_backward(ok, Some(7), 3, 8, 2).unwrap_err()).contains("aux"));
        assert!(msg(plan_moe_route_backward(ok, Some(0), 3, 8, 2).unwrap_err()).contains("aux"));
        assert!(plan_moe_route_backward(ok, Some(8), 3, 8, 2).is_ok());
    }

    #[test]
    fn permute_plan_checks_lengths_and_row_range() {
        // n 5, k 2, e 4: m 10.
        let ok = [4, 4, 5, 5, 10, 10, 10, 10];
        assert_eq!(plan_moe_permute(ok, 5, 2, 4).unwrap(), Some(10));
        let names = ["counts", "frac", "offsets", "tile_off", "tok", "slot", "inv", "ids"];
        for (i, name) in names.iter().enumerate() {
            let mut l = ok;
            l[i] -= 1;
            assert!(msg(plan_moe_permute(l, 5, 2, 4).unwrap_err()).contains(name), "{name}");
        }
        assert_eq!(plan_moe_permute([4, 4, 5, 5, 0, 0, 0, 0], 0, 2, 4).unwrap(), None);
        let huge = 1usize << 31;
        assert!(msg(plan_moe_permute([usize::MAX; 8], huge, 2, 4).unwrap_err()).contains("u32"));
    }

    #[test]
    fn combine_plan_checks_lengths() {
        // n 3, c 4, k 2: out 12, src 24, w/inv 6.
        let ok = [12, 24, 6];
        assert_eq!(plan_moe_combine(ok, Some(6), 3, 4, 2).unwrap(), Some(12));
        assert_eq!(plan_moe_combine(ok, None, 3, 4, 2).unwrap(), Some(12));
        assert!(msg(plan_moe_combine([12, 23, 6], None, 3, 4, 2).unwrap_err()).contains("src"));
        assert!(msg(plan_moe_combine(ok, Some(5), 3, 4, 2).unwrap_err()).contains("w holds"));
        assert!(msg(plan_moe_combine(ok, Some(0), 3, 4, 2).unwrap_err()).contains("w holds"));
        assert!(msg(plan_moe_combine([11, 24, 6], None, 3, 4, 2).unwrap_err()).contains("out"));
        assert!(msg(plan_moe_combine([12, 24, 5], None, 3, 4, 2).unwrap_err()).contains("inv"));
        assert_eq!(plan_moe_combine([0; 3], None, 0, 4, 2).unwrap(), None);
    }

    #[test]
    fn grouped_plan_sizes_the_tile_grid_without_the_counts() {
        // m 100 rows, e 8 experts, k 48, n 130: out 13000, a 4800, b 8*130*48.
        let ok = [13000, 4800, 8 * 130 * 48, 9, 9];
        let p = plan_moe_grouped(ok, 100, 8, 48, 130).unwrap().unwrap();
        // ceil(130 / 64) = 3 column tiles; ceil(100 / 64) + 8 = 10 row tiles:
        // every routing has sum_x ceil(count_x / 64) <= ceil(m / 64) + e.
        assert_eq!(p.grid, (3, 10, 1));
        assert_eq!((p.e, p.k, p.n), (8, 48, 130));
        for (i, name) in ["out", "a", "b", "offsets", "tile_off"].iter().enumerate() {
            let mut l = ok;
            l[i] -= 1;
            assert!(
                msg(plan_moe_grouped(l, 100, 8, 48, 130).unwrap_err()).contains(name),
                "{name}"
            );
        }
        assert_eq!(
            plan_moe_grouped([0, 0, 8 * 130 * 48, 9, 9], 0, 8, 48, 130).unwrap(),
            None
        );
        assert!(plan_moe_grouped(ok, 100, 0, 48, 130).is_err());
        let m = 65535 * 64;
        assert!(msg(plan_moe_grouped([usize::MAX; 5], m, 8, 1, 1).unwrap_err()).contains("tiles"));
    }

    #[test]
    fn wgrad_plan_checks_lengths_and_grid() {
        // m 40, e 4, n1 70, n2 20: dw 4*70*20, a 40*70, b 40*20.
        let ok = [5600, 2800, 800, 5];
        let p = plan_moe_wgrad(ok, 40, 4, 70, 20).unwrap().unwrap();
        assert_eq!(p.grid, (1, 2, 4));
        for (i, name) in ["dw", "a", "b", "offsets"].iter().enumerate() {
            let mut l = ok;
            l[i] -= 1;
            assert!(
                msg(plan_moe_wgrad(l, 40, 4, 70, 20).unwrap_err()).contains(name),
                "{name}"
            );
        }
        assert_eq!(plan_moe_wgrad([5600, 0, 0, 5], 0, 4, 70, 20).unwrap(), None);
    }
}
