//! Launchers of `kernels/flash_attention.cu`: varlen causal GQA flash
//! attention (forward, deterministic backward) over bf16 inputs, and decode
//! against a paged KV cache with the key range split across blocks.
//!
//! | name | shape | type |
//! |---|---|---|
//! | q | [total, H, Dk] | bf16 bits (`u16`) |
//! | k | [total, Hk, Dk] | bf16 bits |
//! | v | [total, Hk, Dv] | bf16 bits |
//! | cu_seqlens | [nseq + 1], `0 = cu[0] <= cu[1] <= .. <= cu[nseq] <= total` | i32 |
//! | out, dout | [total, H, Dv] | f32 |
//! | lse | [H, total] | f32 |
//! | dq, dk, dv | as q, k, v | f32 |
//!
//! The output is f32 (the models' activations are f32; `launch::cast_f32_to_bf16`
//! rounds it where bf16 is wanted), accumulation is f32 throughout. Every
//! kernel has a CUDA-core version (f32 FMAs, any width up to 256); forward
//! and backward also have tensor-core versions (`mma.sync`, widths 64/64,
//! 128/128, 192/128) chosen by [`FlashGeometry::tensor_cores`]. Besides the
//! twin tests, `tests/flash_emulation.rs` runs the kernel file on the CPU
//! (fibers for threads) against a naive attention.
//! Every sequence is causal on its own (row `i` of a sequence sees its keys
//! `0..=i`). `cu_seqlens` lives on the device and is not read by the host: its
//! contract (above, and every length `<= max_seqlen`) is the caller's; the
//! kernels clamp to `total`, and rows past `max_seqlen` of a longer sequence
//! are not computed. CPU twins: `aha_tensor::cpu::flash_forward`,
//! `flash_backward`, `flash_decode_paged`.
//!
//! Each launcher calls a `plan_flash*` function that checks every length and
//! size on the host and is unit-tested without a GPU.

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};

use crate::device::Gpu;
use crate::error::{DriverContext, Error, Result};
use crate::launch::{check_lens, to_i32};
use crate::registry::KernelId;

/// Widest query/key and value head the flash kernels take.
pub const FLASH_MAX_D: usize = 256;
/// Widest entry of a shared key/value cache (MLA's latent: DeepSeek-V3's
/// `kv_lora_rank + qk_rope_head_dim = 512 + 64`) the paged decode takes.
pub const FLASH_LATENT_MAX_D: usize = 576;
/// Threads per block of every flash kernel (4 warps).
const THREADS: u32 = 128;
const WARPS: usize = 4;
/// Keys (or queries) per tile: one per lane.
const TILE: usize = 32;
/// Dynamic shared memory above this needs the per-function opt-in.
const DEFAULT_SMEM: usize = 48 * 1024;
/// The largest plan's shared memory stays under the smallest opt-in limit of
/// sm_80 and later (99 KiB on sm_86 / sm_89; 163 KiB on sm_80, 227 KiB on sm_90).
pub const FLASH_MAX_SMEM: usize = 99 * 1024;
/// Keys per decode split when the split count is chosen automatically, at least.
const MIN_SPLIT_KEYS: usize = 256;
/// Decode blocks the automatic split count aims for (about 2 per SM of an H100).
const DECODE_TARGET_BLOCKS: usize = 264;
/// Most decode splits.
pub const FLASH_MAX_SPLITS: usize = 128;
/// Query rows per block of the tensor-core forward (16 per warp).
const MMA_ROWS: usize = 64;

/// A head-width specialisation of the kernels (the symbol suffix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlashVariant {
    /// `_d64`: Dk = Dv = 64, 8 rows per warp.
    D64,
    /// `_d128`: Dk = Dv = 128, 8 rows per warp.
    D128,
    /// `_d192v128`: Dk = 192, Dv = 128 (DeepSeek-V3 MLA), 8 rows per warp.
    D192v128,
    /// `_any`: any Dk, Dv in 1..=256 (padded to 256), 4 rows per warp.
    Any,
    /// `_latent576`: paged decode only, keys = values (one buffer, MLA's
    /// latent cache), any width in 1..=576, 2 rows per warp.
    Latent576,
}

impl FlashVariant {
    /// The specialisation for head widths `dk`, `dv`, or `None` past 256.
    pub fn for_widths(dk: usize, dv: usize) -> Option<FlashVariant> {
        match (dk, dv) {
            (64, 64) => Some(FlashVariant::D64),
            (128, 128) => Some(FlashVariant::D128),
            (192, 128) => Some(FlashVariant::D192v128),
            (1..=FLASH_MAX_D, 1..=FLASH_MAX_D) => Some(FlashVariant::Any),
            _ => None,
        }
    }

    /// The kernel template's (DK, DV, rows per warp).
    fn caps(self) -> (usize, usize, usize) {
        match self {
            FlashVariant::D64 => (64, 64, 8),
            FlashVariant::D128 => (128, 128, 8),
            FlashVariant::D192v128 => (192, 128, 8),
            FlashVariant::Any => (256, 256, 4),
            FlashVariant::Latent576 => (FLASH_LATENT_MAX_D, FLASH_LATENT_MAX_D, 2),
        }
    }

    /// Rows (queries, or keys for dK/dV) one block owns.
    fn rows_per_block(self) -> usize {
        WARPS * self.caps().2
    }

    /// Forward and decode: Q rows, a padded K tile, a V tile (f32; none
    /// where the K tile serves as the values).
    fn smem_fwd(self) -> usize {
        let (dk, dv, r) = self.caps();
        let v_tile = if self == FlashVariant::Latent576 { 0 } else { TILE * dv };
        4 * (WARPS * r * dk + TILE * (dk + 1) + v_tile)
    }

    /// dQ: Q and dO rows, padded K and V tiles.
    fn smem_dq(self) -> usize {
        let (dk, dv, r) = self.caps();
        4 * (WARPS * r * (dk + dv) + TILE * (dk + 1) + TILE * (dv + 1))
    }

    /// dK/dV: K and V rows, padded Q and dO tiles, lse and dsum of a tile.
    fn smem_dkv(self) -> usize {
        self.smem_dq() + 4 * 2 * TILE
    }

    /// The tensor-core forward of these widths, if there is one.
    fn mma_id(self) -> Option<KernelId> {
        match self {
            FlashVariant::D64 => Some(KernelId::FlashFwdMmaD64Bf16),
            FlashVariant::D128 => Some(KernelId::FlashFwdMmaD128Bf16),
            FlashVariant::D192v128 => Some(KernelId::FlashFwdMmaD192v128Bf16),
            FlashVariant::Any | FlashVariant::Latent576 => None,
        }
    }

    /// Tensor-core forward: bf16 Q [64][DK + 8], K [32][DK + 8], V^T [DV][40].
    fn smem_mma(self) -> usize {
        let (dk, dv, _) = self.caps();
        2 * (MMA_ROWS * (dk + 8) + TILE * (dk + 8) + dv * (TILE + 8))
    }

    /// Tensor-core dQ: bf16 Q, dO [64][D + 8], K, V [32][D + 8], K^T [DK][40].
    fn smem_mma_dq(self) -> usize {
        let (dk, dv, _) = self.caps();
        2 * ((MMA_ROWS + TILE) * (dk + 8 + dv + 8) + dk * (TILE + 8))
    }

    /// Tensor-core dK/dV: bf16 K, V [64][D + 8], Q, dO [32][D + 8] and
    /// transposed [D][40], lse and dsum of a tile (f32).
    fn smem_mma_dkv(self) -> usize {
        let (dk, dv, _) = self.caps();
        2 * ((MMA_ROWS + TILE) * (dk + 8 + dv + 8) + (dk + dv) * (TILE + 8)) + 4 * 2 * TILE
    }

    /// The tensor-core dQ and dK/dV kernels of these widths, if there are.
    fn mma_bwd_ids(self) -> Option<(KernelId, KernelId)> {
        use KernelId::*;
        match self {
            FlashVariant::D64 => Some((FlashBwdDqMmaD64Bf16, FlashBwdDkvMmaD64Bf16)),
            FlashVariant::D128 => Some((FlashBwdDqMmaD128Bf16, FlashBwdDkvMmaD128Bf16)),
            FlashVariant::D192v128 => Some((FlashBwdDqMmaD192v128Bf16, FlashBwdDkvMmaD192v128Bf16)),
            FlashVariant::Any | FlashVariant::Latent576 => None,
        }
    }

    /// The CUDA-core varlen forward, dQ and dK/dV kernels (none for the
    /// decode-only latent variant).
    fn varlen_ids(self) -> Option<[KernelId; 3]> {
        use KernelId::*;
        match self {
            FlashVariant::D64 => Some([FlashFwdD64Bf16, FlashBwdDqD64Bf16, FlashBwdDkvD64Bf16]),
            FlashVariant::D128 => Some([FlashFwdD128Bf16, FlashBwdDqD128Bf16, FlashBwdDkvD128Bf16]),
            FlashVariant::D192v128 => Some([FlashFwdD192v128Bf16, FlashBwdDqD192v128Bf16, FlashBwdDkvD192v128Bf16]),
            FlashVariant::Any => Some([FlashFwdAnyBf16, FlashBwdDqAnyBf16, FlashBwdDkvAnyBf16]),
            FlashVariant::Latent576 => None,
        }
    }

    /// The paged decode kernel.
    fn decode_id(self) -> KernelId {
        use KernelId::*;
        match self {
            FlashVariant::D64 => FlashDecodeD64Bf16,
            FlashVariant::D128 => FlashDecodeD128Bf16,
            FlashVariant::D192v128 => FlashDecodeD192v128Bf16,
            FlashVariant::Any => FlashDecodeAnyBf16,
            FlashVariant::Latent576 => FlashDecodeLatent576Bf16,
        }
    }
}

/// The sizes of one varlen flash-attention call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlashGeometry {
    /// Tokens of all sequences together (rows of q, k, v).
    pub total: usize,
    /// Sequences (`cu_seqlens` holds `nseq + 1` offsets).
    pub nseq: usize,
    /// The longest sequence (sizes the grid).
    pub max_seqlen: usize,
    /// Query heads.
    pub h: usize,
    /// Key/value heads (divides `h`).
    pub hk: usize,
    /// Query/key head width.
    pub dk: usize,
    /// Value head width.
    pub dv: usize,
    /// Score scale, usually `1 / sqrt(dk)`.
    pub scale: f32,
    /// Run the tensor-core kernels (`flash_fwd_mma_*`, `flash_bwd_*_mma_*`:
    /// mma.sync m16n8k16; P, dS and dO rounded to bf16 before their
    /// products, as FlashAttention-2 does) where the widths have them
    /// (64/64, 128/128, 192/128); other widths, and decode, use the CUDA
    /// cores whatever this says. Both are deterministic.
    pub tensor_cores: bool,
}

/// What a checked varlen call launches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlashPlan {
    /// The head-width specialisation.
    pub variant: FlashVariant,
    /// Grid of the forward and the dQ pass: (query tiles, H, nseq).
    pub grid_q: (u32, u32, u32),
    /// Grid of the dK/dV pass: (key tiles, Hk, nseq).
    pub grid_kv: (u32, u32, u32),
    /// Blocks of the one-warp-per-(row, head) dsum pass.
    pub dsum_blocks: u32,
    /// Dynamic shared memory of the forward, dQ and dK/dV kernels, bytes.
    pub smem: (u32, u32, u32),
    /// The forward's kernel: the tensor-core one when asked for and present.
    pub fwd_kernel: KernelId,
    /// The forward's grid (64 query rows a block on tensor cores).
    pub grid_fwd: (u32, u32, u32),
    /// The backward's dQ and dK/dV kernels when on tensor cores, else `None`
    /// (the CUDA-core ones of `variant`, on `grid_q` / `grid_kv`).
    pub mma_bwd: Option<MmaBackward>,
}

/// The tensor-core backward's kernels, grids and shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmaBackward {
    /// `flash_bwd_dq_mma_*`.
    pub dq: KernelId,
    /// `flash_bwd_dkv_mma_*`.
    pub dkv: KernelId,
    /// dQ grid: (ceil(max_seqlen / 64), H, nseq).
    pub grid_q: (u32, u32, u32),
    /// dK/dV grid: (ceil(max_seqlen / 64), Hk, nseq).
    pub grid_kv: (u32, u32, u32),
    /// Dynamic shared memory of the dQ and dK/dV kernels, bytes.
    pub smem: (u32, u32),
}

fn bad(op: &'static str, msg: String) -> Error {
    Error::InvalidArgument { op, msg }
}

fn prod(op: &'static str, xs: &[usize]) -> Result<usize> {
    xs.iter()
        .try_fold(1usize, |a, &x| a.checked_mul(x))
        .ok_or_else(|| bad(op, format!("sizes {xs:?} overflow")))
}

fn to_u32(op: &'static str, what: &str, x: usize) -> Result<u32> {
    u32::try_from(x).map_err(|_| bad(op, format!("{what} = {x} exceeds the grid")))
}

fn check_heads(op: &'static str, h: usize, hk: usize, dk: usize, dv: usize) -> Result<FlashVariant> {
    if hk == 0 || h == 0 || !h.is_multiple_of(hk) {
        return Err(bad(
            op,
            format!("{h} query heads are not a positive multiple of {hk} key/value heads"),
        ));
    }
    if h > 65_535 {
        return Err(bad(op, format!("{h} heads exceed the grid's y dimension")));
    }
    FlashVariant::for_widths(dk, dv)
        .ok_or_else(|| bad(op, format!("head widths {dk}, {dv} must be in 1..={FLASH_MAX_D}")))
}

/// Checks `(name, have, want)`: every buffer must hold at least `want`.
/// Checks a varlen call's sizes and buffer lengths (`q`, `k`, `v`,
/// `cu_seqlens`, `out`, `lse`, in that order; longer buffers are fine) and
/// returns its launch plan, or `None` when there is nothing to do.
pub fn plan_flash(g: &FlashGeometry, lens: [usize; 6]) -> Result<Option<FlashPlan>> {
    const OP: &str = "flash_attention";
    let FlashGeometry {
        total,
        nseq,
        max_seqlen,
        h,
        hk,
        dk,
        dv,
        scale,
        tensor_cores,
    } = *g;
    let variant = check_heads(OP, h, hk, dk, dv)?;
    let cuda_core = variant
        .varlen_ids()
        .ok_or_else(|| bad(OP, format!("no varlen kernels for head widths {dk}, {dv}")))?;
    if !scale.is_finite() {
        return Err(bad(OP, format!("scale {scale} is not finite")));
    }
    if max_seqlen > total {
        return Err(bad(OP, format!("max_seqlen {max_seqlen} exceeds the {total} tokens")));
    }
    if nseq > 65_535 {
        return Err(bad(OP, format!("{nseq} sequences exceed the grid's z dimension")));
    }
    let want = [
        prod(OP, &[total, h, dk])?,
        prod(OP, &[total, hk, dk])?,
        prod(OP, &[total, hk, dv])?,
        nseq + 1,
        prod(OP, &[total, h, dv])?,
        prod(OP, &[h, total])?,
    ];
    let names = ["q", "k", "v", "cu_seqlens", "out", "lse"];
    let checks: Vec<(&str, usize, usize)> = names.iter().zip(lens).zip(want).map(|((n, l), w)| (*n, l, w)).collect();
    check_lens(OP, &checks)?;
    // Every index the kernels form fits an i32 row count times a width.
    for (what, x) in [("total", total), ("h * total", h * total)] {
        to_i32(OP, what, x)?;
    }
    if nseq == 0 || max_seqlen == 0 {
        return Ok(None);
    }
    let tiles = to_u32(OP, "query tiles", max_seqlen.div_ceil(variant.rows_per_block()))?;
    let dsum_blocks = to_u32(OP, "dsum blocks", (total * h).div_ceil(WARPS))?;
    let (fwd_kernel, fwd_smem, grid_fwd) = match variant.mma_id().filter(|_| tensor_cores) {
        Some(id) => {
            let t = to_u32(OP, "query tiles", max_seqlen.div_ceil(MMA_ROWS))?;
            (id, variant.smem_mma(), (t, h as u32, nseq as u32))
        }
        None => (cuda_core[0], variant.smem_fwd(), (tiles, h as u32, nseq as u32)),
    };
    let smem = (fwd_smem, variant.smem_dq(), variant.smem_dkv());
    debug_assert!(smem.0.max(smem.1).max(smem.2) <= FLASH_MAX_SMEM);
    let mma_bwd = match variant.mma_bwd_ids().filter(|_| tensor_cores) {
        Some((dq, dkv)) => {
            let t = to_u32(OP, "query tiles", max_seqlen.div_ceil(MMA_ROWS))?;
            Some(MmaBackward {
                dq,
                dkv,
                grid_q: (t, h as u32, nseq as u32),
                grid_kv: (t, hk as u32, nseq as u32),
                smem: (variant.smem_mma_dq() as u32, variant.smem_mma_dkv() as u32),
            })
        }
        None => None,
    };
    Ok(Some(FlashPlan {
        variant,
        grid_q: (tiles, h as u32, nseq as u32),
        grid_kv: (tiles, hk as u32, nseq as u32),
        dsum_blocks,
        smem: (smem.0 as u32, smem.1 as u32, smem.2 as u32),
        fwd_kernel,
        grid_fwd,
        mma_bwd,
    }))
}

/// The kernel `id` with its dynamic shared memory opted in above 48 KiB
/// (after checking the device allows `bytes`).
fn function_with_smem(gpu: &Gpu, id: KernelId, bytes: u32) -> Result<CudaFunction> {
    let f = gpu.function(id)?;
    if bytes as usize > DEFAULT_SMEM {
        let limit = gpu
            .stream()
            .context()
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .ctx("max shared memory per block (opt-in)")?;
        if i64::from(limit) < i64::from(bytes) {
            return Err(bad(
                "flash_attention",
                format!("{id:?} needs {bytes} bytes of shared memory, the device allows {limit}"),
            ));
        }
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as i32,
        )
        .ctx("set max dynamic shared memory")?;
    }
    Ok(f)
}

fn cfg(grid: (u32, u32, u32), smem: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem,
    }
}

/// Varlen causal GQA flash-attention forward (kernels `flash_fwd_*_bf16`,
/// or `flash_fwd_mma_*_bf16` with [`FlashGeometry::tensor_cores`]): writes
/// `out` and the row log-sum-exps `lse` of every row of every sequence.
/// CPU twin `aha_tensor::cpu::flash_forward`.
#[allow(clippy::too_many_arguments)]
pub fn flash_forward_bf16(
    gpu: &Gpu,
    out: &mut CudaSlice<f32>,
    lse: &mut CudaSlice<f32>,
    q: &CudaSlice<u16>,
    k: &CudaSlice<u16>,
    v: &CudaSlice<u16>,
    cu_seqlens: &CudaSlice<i32>,
    g: &FlashGeometry,
) -> Result<()> {
    let lens = [q.len(), k.len(), v.len(), cu_seqlens.len(), out.len(), lse.len()];
    let Some(p) = plan_flash(g, lens)? else {
        return Ok(());
    };
    let f = function_with_smem(gpu, p.fwd_kernel, p.smem.0)?;
    let d = [g.total, g.h, g.hk, g.dk, g.dv].map(|x| x as i32);
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(out).arg(lse).arg(q).arg(k).arg(v).arg(cu_seqlens);
    if p.variant.mma_id() != Some(p.fwd_kernel) {
        for x in &d {
            l.arg(x);
        }
        l.arg(&g.scale);
        // SAFETY: (float* x2, const u16* x3, const int*, int x5, float); the
        // plan checked every length against the geometry; the kernel clamps
        // the device offsets to `total`; shared memory as planned (opted in
        // above).
        unsafe { l.launch(cfg(p.grid_fwd, p.smem.0)) }.ctx("launch flash_fwd")?;
    } else {
        l.arg(&d[0]).arg(&d[1]).arg(&d[2]).arg(&g.scale);
        // SAFETY: (float* x2, const u16* x3, const int*, int x3, float): the
        // widths are the kernel's own (the plan chose it for them); lengths
        // checked as above; q, k, v rows are read as 32-bit pairs, aligned
        // because the widths are even and device allocations are aligned.
        unsafe { l.launch(cfg(p.grid_fwd, p.smem.0)) }.ctx("launch flash_fwd_mma")?;
    }
    Ok(())
}

/// Varlen causal GQA flash-attention backward: `dq`, `dk`, `dv` are assigned
/// for every row of every sequence (kernels `flash_bwd_dsum_f32`, then
/// `flash_bwd_dq_*_bf16` over key tiles and `flash_bwd_dkv_*_bf16` over
/// query tiles, or their `_mma_` tensor-core versions with
/// [`FlashGeometry::tensor_cores`]; no atomics, so the result is
/// deterministic). `out` and `lse` are the forward's. CPU twin
/// `aha_tensor::cpu::flash_backward`.
#[allow(clippy::too_many_arguments)]
pub fn flash_backward_bf16(
    gpu: &Gpu,
    dq: &mut CudaSlice<f32>,
    dk: &mut CudaSlice<f32>,
    dv: &mut CudaSlice<f32>,
    dout: &CudaSlice<f32>,
    q: &CudaSlice<u16>,
    k: &CudaSlice<u16>,
    v: &CudaSlice<u16>,
    out: &CudaSlice<f32>,
    lse: &CudaSlice<f32>,
    cu_seqlens: &CudaSlice<i32>,
    g: &FlashGeometry,
) -> Result<()> {
    const OP: &str = "flash_backward_bf16";
    let lens = [q.len(), k.len(), v.len(), cu_seqlens.len(), out.len(), lse.len()];
    let Some(p) = plan_flash(g, lens)? else {
        return Ok(());
    };
    check_lens(
        OP,
        &[
            ("dq", dq.len(), g.total * g.h * g.dk),
            ("dk", dk.len(), g.total * g.hk * g.dk),
            ("dv", dv.len(), g.total * g.hk * g.dv),
            ("dout", dout.len(), g.total * g.h * g.dv),
        ],
    )?;
    let d = [g.total, g.h, g.hk, g.dk, g.dv].map(|x| x as i32);
    let mut dsum = gpu.scratch_f32(g.h * g.total)?;
    let f0 = gpu.function(KernelId::FlashBwdDsumF32)?;
    let mut l = gpu.stream().launch_builder(&f0);
    l.arg(&mut *dsum).arg(dout).arg(out).arg(&d[0]).arg(&d[1]).arg(&d[4]);
    // SAFETY: (float*, const float* x2, int x3); dsum holds h * total floats,
    // dout and out total * h * dv (checked); one warp per (row, head).
    unsafe { l.launch(cfg((p.dsum_blocks, 1, 1), 0)) }.ctx("launch flash_bwd_dsum_f32")?;
    if let Some(m) = p.mma_bwd {
        let f1 = function_with_smem(gpu, m.dq, m.smem.0)?;
        let mut l = gpu.stream().launch_builder(&f1);
        l.arg(&mut *dq)
            .arg(dout)
            .arg(q)
            .arg(k)
            .arg(v)
            .arg(lse)
            .arg(&*dsum)
            .arg(cu_seqlens);
        l.arg(&d[0]).arg(&d[1]).arg(&d[2]).arg(&g.scale);
        // SAFETY: (float*, const float*, const u16* x3, const float* x2,
        // const int*, int x3, float); the widths are the kernel's own;
        // lengths checked above; rows read as aligned 32-bit pairs.
        unsafe { l.launch(cfg(m.grid_q, m.smem.0)) }.ctx("launch flash_bwd_dq_mma")?;
        let f2 = function_with_smem(gpu, m.dkv, m.smem.1)?;
        let mut l = gpu.stream().launch_builder(&f2);
        l.arg(&mut *dk)
            .arg(&mut *dv)
            .arg(dout)
            .arg(q)
            .arg(k)
            .arg(v)
            .arg(lse)
            .arg(&*dsum)
            .arg(cu_seqlens);
        l.arg(&d[0]).arg(&d[1]).arg(&d[2]).arg(&g.scale);
        // SAFETY: (float* x2, const float*, const u16* x3, const float* x2,
        // const int*, int x3, float); as above; one block per 64 keys of one
        // key/value head, each output element written once.
        unsafe { l.launch(cfg(m.grid_kv, m.smem.1)) }.ctx("launch flash_bwd_dkv_mma")?;
        return Ok(());
    }
    let Some([_, dq_id, dkv_id]) = p.variant.varlen_ids() else {
        return Err(bad(
            "flash_attention backward",
            "no varlen kernels for these head widths".into(),
        ));
    };
    let f1 = function_with_smem(gpu, dq_id, p.smem.1)?;
    let mut l = gpu.stream().launch_builder(&f1);
    l.arg(dq)
        .arg(dout)
        .arg(q)
        .arg(k)
        .arg(v)
        .arg(lse)
        .arg(&*dsum)
        .arg(cu_seqlens);
    for x in &d {
        l.arg(x);
    }
    l.arg(&g.scale);
    // SAFETY: (float*, const float*, const u16* x3, const float* x2, const
    // int*, int x5, float); lengths checked above; shared memory as planned.
    unsafe { l.launch(cfg(p.grid_q, p.smem.1)) }.ctx("launch flash_bwd_dq")?;
    let f2 = function_with_smem(gpu, dkv_id, p.smem.2)?;
    let mut l = gpu.stream().launch_builder(&f2);
    l.arg(dk)
        .arg(dv)
        .arg(dout)
        .arg(q)
        .arg(k)
        .arg(v)
        .arg(lse)
        .arg(&*dsum)
        .arg(cu_seqlens);
    for x in &d {
        l.arg(x);
    }
    l.arg(&g.scale);
    // SAFETY: (float* x2, const float*, const u16* x3, const float* x2,
    // const int*, int x5, float); lengths checked above; one block per key
    // tile of one key/value head, each output element written once.
    unsafe { l.launch(cfg(p.grid_kv, p.smem.2)) }.ctx("launch flash_bwd_dkv")?;
    Ok(())
}

/// The sizes of one paged decode call.
///
/// | name | shape | type |
/// |---|---|---|
/// | q | [total_q, H, Dk]: the new tokens of all sequences, packed | bf16 bits |
/// | k_cache | [num_blocks, block_size, Hk, Dk] | bf16 bits |
/// | v_cache | [num_blocks, block_size, Hk, Dv] | bf16 bits |
/// | block_tables | [nseq, max_blocks]: position p of sequence s is in block `table[s][p / block_size]`, slot `p % block_size` | i32 |
/// | ctx_lens | `[nseq]`: positions in the cache, the new tokens included (`<= max_ctx`) | i32 |
/// | q_cu | [nseq + 1]: sequence s's new tokens are rows `q_cu[s] .. q_cu[s + 1]` of q | i32 |
/// | out | [total_q, H, Dv] | f32 |
/// | lse | [H, total_q] | f32 |
///
/// The new tokens' keys and values are already in the cache: the `n` new
/// tokens of a sequence are its last `n` positions and each sees the
/// positions up to its own. Table entries must be below `num_blocks` (the
/// device tables are not read by the host).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PagedGeometry {
    /// New query tokens of all sequences.
    pub total_q: usize,
    /// Sequences.
    pub nseq: usize,
    /// Upper bound of every sequence's context length (sizes the splits).
    pub max_ctx: usize,
    /// Positions per cache block.
    pub block_size: usize,
    /// Blocks in the cache pool.
    pub num_blocks: usize,
    /// Entries per block-table row.
    pub max_blocks: usize,
    /// Query heads.
    pub h: usize,
    /// Key/value heads (divides `h`).
    pub hk: usize,
    /// Query/key head width.
    pub dk: usize,
    /// Value head width.
    pub dv: usize,
    /// Score scale.
    pub scale: f32,
    /// Key splits per sequence; 0 chooses: about 264 blocks over the device
    /// (nseq x Hk x splits), at least 256 keys a split.
    pub splits: usize,
    /// The keys are the values: `k_cache` and `v_cache` are one buffer and
    /// `dk == dv` (MLA's latent cache). Widths past 256, up to
    /// [`FLASH_LATENT_MAX_D`], need it.
    pub shared_kv: bool,
}

/// What a checked decode call launches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodePlan {
    /// The head-width specialisation.
    pub variant: FlashVariant,
    /// Key splits per sequence.
    pub splits: usize,
    /// Keys per split (a multiple of 32).
    pub split_len: usize,
    /// Grid of the split kernel: (splits, Hk, nseq).
    pub grid: (u32, u32, u32),
    /// Its dynamic shared memory, bytes.
    pub smem: u32,
    /// Blocks of the one-warp-per-(token, head) combine kernel.
    pub combine_blocks: u32,
}

/// Checks a paged decode call's sizes and buffer lengths (`q`, `k_cache`,
/// `v_cache`, `block_tables`, `ctx_lens`, `q_cu`, `out`, `lse`, in that
/// order) and chooses the split of the key range; `None` when there is
/// nothing to do.
pub fn plan_flash_decode(g: &PagedGeometry, lens: [usize; 8]) -> Result<Option<DecodePlan>> {
    const OP: &str = "flash_decode";
    let PagedGeometry {
        total_q,
        nseq,
        max_ctx,
        block_size,
        num_blocks,
        max_blocks,
        h,
        hk,
        dk,
        dv,
        scale,
        splits,
        shared_kv,
    } = *g;
    let variant = if shared_kv && (dk > FLASH_MAX_D || dv > FLASH_MAX_D) {
        check_heads(OP, h, hk, 1, 1)?;
        if dk != dv || dk > FLASH_LATENT_MAX_D {
            return Err(bad(
                OP,
                format!("a shared key/value cache needs one width in 1..={FLASH_LATENT_MAX_D}, not {dk}, {dv}"),
            ));
        }
        FlashVariant::Latent576
    } else {
        check_heads(OP, h, hk, dk, dv)?
    };
    if !scale.is_finite() {
        return Err(bad(OP, format!("scale {scale} is not finite")));
    }
    if block_size == 0 {
        return Err(bad(OP, "block_size is 0".into()));
    }
    if max_ctx > prod(OP, &[max_blocks, block_size])? {
        return Err(bad(
            OP,
            format!("max_ctx {max_ctx} exceeds a table row of {max_blocks} blocks of {block_size}"),
        ));
    }
    if nseq > 65_535 {
        return Err(bad(OP, format!("{nseq} sequences exceed the grid's z dimension")));
    }
    if splits > FLASH_MAX_SPLITS {
        return Err(bad(OP, format!("{splits} splits exceed {FLASH_MAX_SPLITS}")));
    }
    let want = [
        prod(OP, &[total_q, h, dk])?,
        prod(OP, &[num_blocks, block_size, hk, dk])?,
        prod(OP, &[num_blocks, block_size, hk, dv])?,
        prod(OP, &[nseq, max_blocks])?,
        nseq,
        nseq + 1,
        prod(OP, &[total_q, h, dv])?,
        prod(OP, &[h, total_q])?,
    ];
    let names = [
        "q",
        "k_cache",
        "v_cache",
        "block_tables",
        "ctx_lens",
        "q_cu",
        "out",
        "lse",
    ];
    let checks: Vec<(&str, usize, usize)> = names.iter().zip(lens).zip(want).map(|((n, l), w)| (*n, l, w)).collect();
    check_lens(OP, &checks)?;
    for (what, x) in [
        ("num_blocks * block_size", num_blocks * block_size),
        ("max_blocks", max_blocks),
        ("nseq * max_blocks", nseq * max_blocks),
    ] {
        to_i32(OP, what, x)?;
    }
    if nseq == 0 || total_q == 0 {
        return Ok(None);
    }
    let ctx = max_ctx.max(1);
    let splits = if splits == 0 {
        let want = DECODE_TARGET_BLOCKS.div_ceil(nseq * hk);
        want.min(ctx.div_ceil(MIN_SPLIT_KEYS)).clamp(1, FLASH_MAX_SPLITS)
    } else {
        splits
    };
    let split_len = ctx.div_ceil(splits).div_ceil(TILE) * TILE;
    let splits = ctx.div_ceil(split_len);
    // The partials [splits, total_q, H, Dv] are indexed with the kernel's ints.
    to_i32(OP, "partial outputs", prod(OP, &[splits, total_q, h, dv])?)?;
    to_i32(OP, "split_len", split_len)?;
    let smem = variant.smem_fwd();
    Ok(Some(DecodePlan {
        variant,
        splits,
        split_len,
        grid: (splits as u32, hk as u32, nseq as u32),
        smem: smem as u32,
        combine_blocks: to_u32(OP, "combine blocks", (total_q * h).div_ceil(WARPS))?,
    }))
}

/// Flash-decoding against a paged KV cache (kernels `flash_decode_*_bf16`,
/// one block per (split, key/value head, sequence), then
/// `flash_decode_combine_f32`): writes `out` and `lse` of every new token.
/// See [`PagedGeometry`] for the layouts. CPU twin
/// `aha_tensor::cpu::flash_decode_paged`.
#[allow(clippy::too_many_arguments)]
pub fn flash_decode_bf16(
    gpu: &Gpu,
    out: &mut CudaSlice<f32>,
    lse: &mut CudaSlice<f32>,
    q: &CudaSlice<u16>,
    k_cache: &CudaSlice<u16>,
    v_cache: &CudaSlice<u16>,
    block_tables: &CudaSlice<i32>,
    ctx_lens: &CudaSlice<i32>,
    q_cu: &CudaSlice<i32>,
    g: &PagedGeometry,
) -> Result<()> {
    let lens = [
        q.len(),
        k_cache.len(),
        v_cache.len(),
        block_tables.len(),
        ctx_lens.len(),
        q_cu.len(),
        out.len(),
        lse.len(),
    ];
    let Some(p) = plan_flash_decode(g, lens)? else {
        return Ok(());
    };
    let rows = g.total_q * g.h;
    let mut opart = gpu.scratch_f32(p.splits * rows * g.dv)?;
    let mut lpart = gpu.scratch_f32(p.splits * rows)?;
    if g.shared_kv && !std::ptr::eq(k_cache, v_cache) {
        return Err(bad(
            "flash_decode",
            "shared_kv needs the one cache buffer as keys and values".into(),
        ));
    }
    let f = function_with_smem(gpu, p.variant.decode_id(), p.smem)?;
    let ints = [
        g.max_blocks,
        g.total_q,
        g.h,
        g.hk,
        g.dk,
        g.dv,
        g.block_size,
        p.split_len,
    ]
    .map(|x| x as i32);
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(&mut *opart)
        .arg(&mut *lpart)
        .arg(q)
        .arg(k_cache)
        .arg(v_cache)
        .arg(block_tables)
        .arg(&ints[0])
        .arg(ctx_lens)
        .arg(q_cu);
    for x in &ints[1..] {
        l.arg(x);
    }
    l.arg(&g.scale);
    // SAFETY: (float* x2, const u16* x3, const int*, int, const int* x2, int
    // x7, float); the partials hold splits * total_q * h (* dv) floats, the
    // other lengths were checked by the plan; the kernel clamps q_cu to
    // total_q; table entries < num_blocks is the caller's contract.
    unsafe { l.launch(cfg(p.grid, p.smem)) }.ctx("launch flash_decode")?;
    let f2 = gpu.function(KernelId::FlashDecodeCombineF32)?;
    let c = [p.splits, g.total_q, g.h, g.dv].map(|x| x as i32);
    let mut l = gpu.stream().launch_builder(&f2);
    l.arg(out).arg(lse).arg(&*opart).arg(&*lpart);
    for x in &c {
        l.arg(x);
    }
    // SAFETY: (float* x2, const float* x2, int x4); out holds total_q * h *
    // dv floats and lse h * total_q (checked); one warp per (token, head).
    unsafe { l.launch(cfg((p.combine_blocks, 1, 1), 0)) }.ctx("launch flash_decode_combine_f32")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The plans' checks, on lengths alone: these run without a GPU.
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn geometry() -> FlashGeometry {
        FlashGeometry {
            total: 100,
            nseq: 3,
            max_seqlen: 70,
            h: 8,
            hk: 2,
            dk: 128,
            dv: 128,
            scale: 0.088,
            tensor_cores: false,
        }
    }

    fn lens(g: &FlashGeometry) -> [usize; 6] {
        [
            g.total * g.h * g.dk,
            g.total * g.hk * g.dk,
            g.total * g.hk * g.dv,
            g.nseq + 1,
            g.total * g.h * g.dv,
            g.h * g.total,
        ]
    }

    #[test]
    fn variants_follow_the_head_widths() {
        assert_eq!(FlashVariant::for_widths(64, 64), Some(FlashVariant::D64));
        assert_eq!(FlashVariant::for_widths(128, 128), Some(FlashVariant::D128));
        assert_eq!(FlashVariant::for_widths(192, 128), Some(FlashVariant::D192v128));
        assert_eq!(FlashVariant::for_widths(128, 64), Some(FlashVariant::Any));
        assert_eq!(FlashVariant::for_widths(24, 16), Some(FlashVariant::Any));
        assert_eq!(FlashVariant::for_widths(256, 256), Some(FlashVariant::Any));
        assert_eq!(FlashVariant::for_widths(257, 64), None);
        assert_eq!(FlashVariant::for_widths(0, 64), None);
    }

    #[test]
    fn shared_memory_fits_every_sm80_plus_device() {
        for v in [
            FlashVariant::D64,
            FlashVariant::D128,
            FlashVariant::D192v128,
            FlashVariant::Any,
            FlashVariant::Latent576,
        ] {
            let mut sizes = vec![v.smem_fwd()];
            if v.varlen_ids().is_some() {
                sizes.extend([v.smem_dq(), v.smem_dkv()]);
            }
            if v.mma_id().is_some() {
                sizes.extend([v.smem_mma(), v.smem_mma_dq(), v.smem_mma_dkv()]);
            }
            for s in sizes {
                assert!(s <= FLASH_MAX_SMEM, "{v:?}: {s} bytes");
            }
        }
        assert_eq!(FlashVariant::Any.mma_bwd_ids(), None);
        // The 64-wide forward needs no opt-in; the MLA one does.
        assert!(FlashVariant::D64.smem_fwd() <= DEFAULT_SMEM);
        assert_eq!(FlashVariant::D192v128.smem_fwd(), 4 * (32 * 192 + 32 * 193 + 32 * 128));
    }

    #[test]
    fn flash_plan_checks_heads_widths_and_every_buffer() {
        let g = geometry();
        let p = plan_flash(&g, lens(&g)).unwrap().unwrap();
        assert_eq!(p.variant, FlashVariant::D128);
        assert_eq!(p.grid_q, (3, 8, 3));
        assert_eq!(p.grid_kv, (3, 2, 3));
        assert_eq!(p.dsum_blocks, 200);
        assert_eq!((p.fwd_kernel, p.grid_fwd), (KernelId::FlashFwdD128Bf16, (3, 8, 3)));
        let tc = FlashGeometry {
            tensor_cores: true,
            ..g
        };
        let p = plan_flash(&tc, lens(&tc)).unwrap().unwrap();
        assert_eq!((p.fwd_kernel, p.grid_fwd), (KernelId::FlashFwdMmaD128Bf16, (2, 8, 3)));
        assert_eq!(p.smem.0, 2 * (64 * 136 + 32 * 136 + 128 * 40));
        let m = p.mma_bwd.unwrap();
        assert_eq!(
            (m.dq, m.grid_q, m.grid_kv),
            (KernelId::FlashBwdDqMmaD128Bf16, (2, 8, 3), (2, 2, 3))
        );
        assert_eq!(plan_flash(&g, lens(&g)).unwrap().unwrap().mma_bwd, None);
        // No tensor-core kernel for odd widths: the CUDA-core one runs.
        let tc_odd = FlashGeometry { dk: 40, dv: 40, ..tc };
        let p = plan_flash(&tc_odd, lens(&tc_odd)).unwrap().unwrap();
        assert_eq!((p.fwd_kernel, p.mma_bwd), (KernelId::FlashFwdAnyBf16, None));
        let names = ["q", "k", "v", "cu_seqlens", "out", "lse"];
        for (i, name) in names.iter().enumerate() {
            let mut l = lens(&g);
            l[i] -= 1;
            let e = plan_flash(&g, l).unwrap_err().to_string();
            assert!(e.contains(&format!("{name} holds")), "{e}");
        }
        // Longer buffers (arena views) are accepted.
        assert!(plan_flash(&g, lens(&g).map(|x| x + 5)).is_ok());
        assert!(plan_flash(&FlashGeometry { hk: 3, ..g }, lens(&g)).is_err());
        assert!(plan_flash(&FlashGeometry { hk: 0, ..g }, lens(&g)).is_err());
        let wide = FlashGeometry { dk: 257, ..g };
        assert!(plan_flash(&wide, lens(&wide))
            .unwrap_err()
            .to_string()
            .contains("1..=256"));
        let long = FlashGeometry { max_seqlen: 101, ..g };
        assert!(plan_flash(&long, lens(&long)).is_err());
        let nan = FlashGeometry { scale: f32::NAN, ..g };
        assert!(plan_flash(&nan, lens(&nan)).is_err());
        let mla = FlashGeometry { dk: 192, dv: 128, ..g };
        assert_eq!(
            plan_flash(&mla, lens(&mla)).unwrap().unwrap().variant,
            FlashVariant::D192v128
        );
        let odd = FlashGeometry { dk: 24, dv: 16, ..g };
        let p = plan_flash(&odd, lens(&odd)).unwrap().unwrap();
        assert_eq!((p.variant, p.grid_q.0), (FlashVariant::Any, 5));
        let empty = FlashGeometry {
            total: 0,
            nseq: 0,
            max_seqlen: 0,
            ..g
        };
        assert_eq!(plan_flash(&empty, lens(&empty)).unwrap(), None);
        let huge = FlashGeometry {
            total: usize::MAX / 2,
            ..g
        };
        assert!(plan_flash(&huge, [usize::MAX; 6]).is_err());
    }

    fn paged() -> PagedGeometry {
        PagedGeometry {
            total_q: 6,
            nseq: 3,
            max_ctx: 1000,
            block_size: 16,
            num_blocks: 200,
            max_blocks: 64,
            h: 4,
            hk: 2,
            dk: 64,
            dv: 64,
            scale: 0.125,
            splits: 0,
            shared_kv: false,
        }
    }

    fn paged_lens(g: &PagedGeometry) -> [usize; 8] {
        [
            g.total_q * g.h * g.dk,
            g.num_blocks * g.block_size * g.hk * g.dk,
            g.num_blocks * g.block_size * g.hk * g.dv,
            g.nseq * g.max_blocks,
            g.nseq,
            g.nseq + 1,
            g.total_q * g.h * g.dv,
            g.h * g.total_q,
        ]
    }

    #[test]
    fn decode_plan_checks_buffers_and_chooses_splits() {
        let g = paged();
        let p = plan_flash_decode(&g, paged_lens(&g)).unwrap().unwrap();
        // 6 blocks without splitting; 1000 keys allow at most 4 splits of >= 256.
        assert_eq!((p.variant, p.splits, p.split_len), (FlashVariant::D64, 4, 256));
        assert_eq!(p.grid, (4, 2, 3));
        assert_eq!(p.combine_blocks, 6);
        let names = [
            "q",
            "k_cache",
            "v_cache",
            "block_tables",
            "ctx_lens",
            "q_cu",
            "out",
            "lse",
        ];
        for (i, name) in names.iter().enumerate() {
            let mut l = paged_lens(&g);
            l[i] -= 1;
            let e = plan_flash_decode(&g, l).unwrap_err().to_string();
            assert!(e.contains(&format!("{name} holds")), "{e}");
        }
        // Explicit splits: 7 requested over 1000 keys -> 143 rounded to 160 -> 7.
        let s = PagedGeometry { splits: 7, ..g };
        let p = plan_flash_decode(&s, paged_lens(&s)).unwrap().unwrap();
        assert_eq!((p.splits, p.split_len), (7, 160));
        // Every split starts inside the context.
        assert!((p.splits - 1) * p.split_len < g.max_ctx);
        let one = PagedGeometry { splits: 1, ..g };
        assert_eq!(
            plan_flash_decode(&one, paged_lens(&one)).unwrap().unwrap().split_len,
            1024
        );
        let many = PagedGeometry {
            splits: FLASH_MAX_SPLITS + 1,
            ..g
        };
        assert!(plan_flash_decode(&many, paged_lens(&many)).is_err());
        let short_table = PagedGeometry { max_blocks: 62, ..g };
        assert!(plan_flash_decode(&short_table, paged_lens(&short_table))
            .unwrap_err()
            .to_string()
            .contains("max_ctx"));
        let no_bs = PagedGeometry { block_size: 0, ..g };
        assert!(plan_flash_decode(&no_bs, paged_lens(&g)).is_err());
        let gqa = PagedGeometry { hk: 3, ..g };
        assert!(plan_flash_decode(&gqa, paged_lens(&gqa)).is_err());
        let none = PagedGeometry { total_q: 0, ..g };
        assert_eq!(plan_flash_decode(&none, paged_lens(&none)).unwrap(), None);
        // Many sequences: no split needed.
        let busy = PagedGeometry {
            nseq: 200,
            total_q: 200,
            max_blocks: 64,
            ..g
        };
        assert_eq!(plan_flash_decode(&busy, paged_lens(&busy)).unwrap().unwrap().splits, 1);
        // MLA's latent cache at DeepSeek-V3's width: one key/value head of
        // 576, keys = values; refused without the shared buffer, past 576
        // and with two widths.
        let v3 = PagedGeometry {
            h: 128,
            hk: 1,
            dk: 576,
            dv: 576,
            shared_kv: true,
            ..g
        };
        let p = plan_flash_decode(&v3, paged_lens(&v3)).unwrap().unwrap();
        assert_eq!(p.variant, FlashVariant::Latent576);
        assert_eq!(p.smem as usize, 4 * (4 * 2 * 576 + 32 * 577));
        assert!(plan_flash_decode(&PagedGeometry { shared_kv: false, ..v3 }, paged_lens(&v3)).is_err());
        let wide = PagedGeometry { dk: 577, dv: 577, ..v3 };
        assert!(plan_flash_decode(&wide, paged_lens(&wide)).is_err());
        let two = PagedGeometry { dv: 512, ..v3 };
        assert!(plan_flash_decode(&two, paged_lens(&two)).is_err());
        // Narrow shared caches keep the ordinary kernels.
        let narrow = PagedGeometry {
            dk: 24,
            dv: 24,
            hk: 1,
            shared_kv: true,
            ..g
        };
        assert_eq!(
            plan_flash_decode(&narrow, paged_lens(&narrow))
                .unwrap()
                .unwrap()
                .variant,
            FlashVariant::Any
        );
    }
}
