//! Typed launchers: exactly one per kernel (a two-pass reduction's launcher
//! owns both of its kernels), owning its launch geometry and checking its
//! arguments against the kernel's contract.
//!
//! Each launcher first calls a `plan_*` function that sees only lengths and
//! sizes, so the checks are tested on machines without a GPU (see the tests at
//! the bottom). Buffers may be longer than needed (views into an arena);
//! shorter is an [`Error::InvalidArgument`] naming the buffer.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use crate::view::{DevIn, DevOut};

use crate::device::Gpu;
use crate::error::{DriverContext, Error, Result};
use crate::registry::KernelId;

/// Threads per block of the element-wise kernels.
const BLOCK: u32 = 256;
/// Grid cap of the element-wise kernels, which loop with a grid stride.
const MAX_GRID: u64 = 1 << 16;
/// Blocks (and scratch rows) of the RMSNorm backward's first pass.
const RMSNORM_BWD_MAX_BLOCKS: usize = 1024;
/// Widest row the RMSNorm backward takes: its per-block `dweight` partial
/// lives in dynamic shared memory, at most 48 KiB without an opt-in.
pub const RMSNORM_BWD_MAX_C: usize = 12032;
/// Blocks of the gradient-norm's first pass (scratch entries, f64).
const GRAD_NORM_MAX_BLOCKS: u64 = 1024;

fn check_len(op: &'static str, what: &str, got: usize, want: usize) -> Result<()> {
    if got < want {
        return Err(Error::InvalidArgument {
            op,
            msg: format!("{what} holds {got} elements, needs {want}"),
        });
    }
    Ok(())
}

/// Every `(buffer, holds, needs)` holds at least what it needs, else an
/// error naming the first that does not (shared by every launcher module).
pub(crate) fn check_lens(op: &'static str, lens: &[(&str, usize, usize)]) -> Result<()> {
    lens.iter()
        .try_for_each(|&(what, got, want)| check_len(op, what, got, want))
}

/// `v` as the kernel's `int`, or an error naming it.
pub(crate) fn to_i32(op: &'static str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::InvalidArgument {
        op,
        msg: format!("{what} = {v} does not fit the kernel's int"),
    })
}

/// `a * b`, or an error when it overflows.
pub(crate) fn mul(op: &'static str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b).ok_or_else(|| Error::InvalidArgument {
        op,
        msg: format!("{a} * {b} elements overflow"),
    })
}

/// Grid-stride geometry for `n` elements: 256 threads a block, at most 65536 blocks.
pub(crate) fn grid_1d(n: u64) -> LaunchConfig {
    let blocks = n.div_ceil(u64::from(BLOCK)).clamp(1, MAX_GRID) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// An element-wise launch over `n` elements: the count the kernel takes and
/// its geometry, or `None` when there is nothing to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Plan1d {
    n: u64,
    cfg: (u32, u32),
}

fn plan_1d(op: &'static str, n: usize, lens: &[(&str, usize)]) -> Result<Option<Plan1d>> {
    for &(what, got) in lens {
        check_len(op, what, got, n)?;
    }
    if n == 0 {
        return Ok(None);
    }
    let n = n as u64;
    let cfg = grid_1d(n);
    Ok(Some(Plan1d {
        n,
        cfg: (cfg.grid_dim.0, cfg.block_dim.0),
    }))
}

impl Plan1d {
    fn config(self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.cfg.0, 1, 1),
            block_dim: (self.cfg.1, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// RMSNorm forward over `rows` rows of `c` channels (kernel
/// `rmsnorm_forward_f32`; CPU twin `aha_tensor::cpu::rmsnorm_forward`).
///
/// `out [rows, c]`, `rstd [rows]`, `inp [rows, c]`, `weight [c]`.
pub fn rmsnorm_forward_f32(
    gpu: &Gpu,
    out: &mut impl DevOut<f32>,
    rstd: &mut impl DevOut<f32>,
    inp: &impl DevIn<f32>,
    weight: &impl DevIn<f32>,
    rows: usize,
    c: usize,
    eps: f32,
) -> Result<()> {
    let mut out = out.view_mut();
    let mut rstd = rstd.view_mut();
    let inp = inp.view();
    let weight = weight.view();
    const OP: &str = "rmsnorm_forward_f32";
    check_len(OP, "out", out.len(), rows * c)?;
    check_len(OP, "rstd", rstd.len(), rows)?;
    check_len(OP, "inp", inp.len(), rows * c)?;
    check_len(OP, "weight", weight.len(), c)?;
    if rows == 0 || c == 0 {
        return Ok(());
    }
    let rows_i = to_i32(OP, "rows", rows)?;
    let c_i = to_i32(OP, "c", c)?;
    let grid = u32::try_from(rows).map_err(|_| Error::InvalidArgument {
        op: OP,
        msg: format!("rows = {rows} exceeds the grid"),
    })?;
    let func = gpu.function(KernelId::RmsnormForwardF32)?;
    let cfg = LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = gpu.stream().launch_builder(&func);
    b.arg(&mut out)
        .arg(&mut rstd)
        .arg(&inp)
        .arg(&weight)
        .arg(&rows_i)
        .arg(&c_i)
        .arg(&eps);
    // SAFETY: the argument list matches the kernel signature
    // (float*, float*, const float*, const float*, int, int, float), and the
    // lengths were checked above against what the kernel reads and writes.
    unsafe { b.launch(cfg) }.ctx("launch rmsnorm_forward_f32")?;
    Ok(())
}

/// What the RMSNorm backward launch needs: sizes as the kernel's ints and
/// the number of first-pass blocks (= scratch rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RmsnormBwdPlan {
    rows: i32,
    c: i32,
    blocks: usize,
}

fn plan_rmsnorm_backward(lens: [usize; 6], rows: usize, c: usize) -> Result<Option<RmsnormBwdPlan>> {
    const OP: &str = "rmsnorm_backward_f32";
    let rc = mul(OP, rows, c)?;
    let [dinp, dweight, dout, inp, weight, rstd] = lens;
    check_lens(
        OP,
        &[
            ("dinp", dinp, rc),
            ("dweight", dweight, c),
            ("dout", dout, rc),
            ("inp", inp, rc),
            ("weight", weight, c),
            ("rstd", rstd, rows),
        ],
    )?;
    if c > RMSNORM_BWD_MAX_C {
        return Err(Error::InvalidArgument {
            op: OP,
            msg: format!(
                "c = {c} exceeds {RMSNORM_BWD_MAX_C} (the per-block dweight partial must fit 48 KiB of shared memory)"
            ),
        });
    }
    if rows == 0 || c == 0 {
        return Ok(None);
    }
    Ok(Some(RmsnormBwdPlan {
        rows: to_i32(OP, "rows", rows)?,
        c: to_i32(OP, "c", c)?,
        blocks: rows.min(RMSNORM_BWD_MAX_BLOCKS),
    }))
}

/// RMSNorm backward (kernels `rmsnorm_backward_f32` then
/// `rmsnorm_dweight_reduce_f32`; CPU twin `aha_tensor::cpu::rmsnorm_backward`):
/// `dinp =` (assigned), `dweight +=` (accumulated, in a fixed order, so the
/// result is the same bits on every run).
///
/// `dinp, dout, inp [rows, c]`, `dweight, weight [c]`, `rstd [rows]` from the
/// forward; `c <= RMSNORM_BWD_MAX_C`. Allocates a `[min(rows, 1024), c]`
/// scratch buffer for the per-block partial sums.
pub fn rmsnorm_backward_f32(
    gpu: &Gpu,
    dinp: &mut impl DevOut<f32>,
    dweight: &mut impl DevOut<f32>,
    dout: &impl DevIn<f32>,
    inp: &impl DevIn<f32>,
    weight: &impl DevIn<f32>,
    rstd: &impl DevIn<f32>,
    rows: usize,
    c: usize,
) -> Result<()> {
    let mut dinp = dinp.view_mut();
    let mut dweight = dweight.view_mut();
    let dout = dout.view();
    let inp = inp.view();
    let weight = weight.view();
    let rstd = rstd.view();
    let lens = [
        dinp.len(),
        dweight.len(),
        dout.len(),
        inp.len(),
        weight.len(),
        rstd.len(),
    ];
    let Some(p) = plan_rmsnorm_backward(lens, rows, c)? else {
        return Ok(());
    };
    let mut partial = gpu.scratch_f32(p.blocks * c)?;
    let f1 = gpu.function(KernelId::RmsnormBackwardF32)?;
    let cfg1 = LaunchConfig {
        grid_dim: (p.blocks as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: (c * std::mem::size_of::<f32>()) as u32,
    };
    let mut b = gpu.stream().launch_builder(&f1);
    b.arg(&mut dinp)
        .arg(&mut *partial)
        .arg(&dout)
        .arg(&inp)
        .arg(&weight)
        .arg(&rstd)
        .arg(&p.rows)
        .arg(&p.c);
    // SAFETY: the arguments match (float*, float*, const float* x4, int, int);
    // lengths were checked by the plan; `partial` holds blocks * c floats and
    // the dynamic shared memory c floats (c <= RMSNORM_BWD_MAX_C fits 48 KiB).
    unsafe { b.launch(cfg1) }.ctx("launch rmsnorm_backward_f32")?;
    let f2 = gpu.function(KernelId::RmsnormDweightReduceF32)?;
    let g = p.blocks as i32;
    let cfg2 = LaunchConfig {
        grid_dim: ((c as u32).div_ceil(256), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = gpu.stream().launch_builder(&f2);
    b.arg(&mut dweight).arg(&*partial).arg(&g).arg(&p.c);
    // SAFETY: (float*, const float*, int, int); dweight holds c floats,
    // partial g * c, and each thread touches one channel < c.
    unsafe { b.launch(cfg2) }.ctx("launch rmsnorm_dweight_reduce_f32")?;
    Ok(())
}

/// The geometry of one RoPE application, as `aha_tensor::cpu::RopeShape`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RopeGeometry {
    /// Heads per token.
    pub heads: usize,
    /// Width of each head.
    pub head_dim: usize,
    /// First rotated dim within a head.
    pub rot_offset: usize,
    /// Number of rotated dims (even).
    pub rot_dim: usize,
    /// `true`: pair `i` is dims `(2i, 2i + 1)` (DeepSeek-V3); `false`: `(i, i + R/2)`.
    pub interleaved: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RopePlan {
    n: Plan1d,
    width: i32,
    head_dim: i32,
    rot_offset: i32,
    rot_dim: i32,
    interleaved: i32,
    max_pos: u32,
}

fn plan_rope(op: &'static str, lens: [usize; 5], tokens: usize, s: &RopeGeometry) -> Result<Option<RopePlan>> {
    let [out, inp, cos, sin, pos] = lens;
    if !s.rot_dim.is_multiple_of(2) || s.rot_offset.checked_add(s.rot_dim).is_none_or(|e| e > s.head_dim) {
        return Err(Error::InvalidArgument {
            op,
            msg: format!(
                "rotated dims {}..{} must be an even count inside head_dim {}",
                s.rot_offset,
                s.rot_offset.saturating_add(s.rot_dim),
                s.head_dim
            ),
        });
    }
    let half = s.rot_dim / 2;
    if half > 0 && (cos == 0 || cos % half != 0) {
        return Err(Error::InvalidArgument {
            op,
            msg: format!("cos table of {cos} elements is not [P, {half}] with P >= 1"),
        });
    }
    let width = mul(op, s.heads, s.head_dim)?;
    let n = mul(op, tokens, width)?;
    check_lens(op, &[("pos", pos, tokens), ("sin", sin, cos)])?;
    let Some(n1) = plan_1d(op, n, &[("out", out), ("inp", inp)])? else {
        return Ok(None);
    };
    let max_pos = cos.checked_div(half).unwrap_or(0);
    Ok(Some(RopePlan {
        n: n1,
        width: to_i32(op, "heads * head_dim", width)?,
        head_dim: to_i32(op, "head_dim", s.head_dim)?,
        rot_offset: to_i32(op, "rot_offset", s.rot_offset)?,
        rot_dim: to_i32(op, "rot_dim", s.rot_dim)?,
        interleaved: i32::from(s.interleaved),
        max_pos: u32::try_from(max_pos).unwrap_or(u32::MAX),
    }))
}

fn launch_rope(
    gpu: &Gpu,
    id: KernelId,
    out: &mut CudaSlice<f32>,
    inp: &CudaSlice<f32>,
    cos: &CudaSlice<f32>,
    sin: &CudaSlice<f32>,
    pos: &CudaSlice<u32>,
    tokens: usize,
    s: &RopeGeometry,
) -> Result<()> {
    let lens = [out.len(), inp.len(), cos.len(), sin.len(), pos.len()];
    let Some(p) = plan_rope(id.symbol(), lens, tokens, s)? else {
        return Ok(());
    };
    let f = gpu.function(id)?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(out)
        .arg(inp)
        .arg(cos)
        .arg(sin)
        .arg(pos)
        .arg(&p.n.n)
        .arg(&p.width)
        .arg(&p.head_dim)
        .arg(&p.rot_offset)
        .arg(&p.rot_dim)
        .arg(&p.interleaved)
        .arg(&p.max_pos);
    // SAFETY: the arguments match (float*, const float* x3, const unsigned*,
    // unsigned long long, int x5, unsigned); out and inp hold n = tokens *
    // heads * head_dim floats, pos `tokens` ids, and table reads are guarded by
    // `pos < max_pos = cos.len() / (rot_dim / 2)` in the kernel.
    unsafe { b.launch(p.n.config()) }.ctx("launch rope")?;
    Ok(())
}

/// RoPE forward (kernel `rope_forward_f32`; CPU twin
/// `aha_tensor::cpu::rope_forward`): `out [tokens, heads, head_dim]` is `inp`
/// with each head's rotated dims turned by the angle of `pos [tokens]`, using
/// `cos, sin [P, rot_dim / 2]` from `aha_tensor::cpu::rope_table`.
///
/// Positions live on the device and are not checked here: a position `>= P`
/// makes the kernel write NaN into that token's rotated dims.
pub fn rope_forward_f32(
    gpu: &Gpu,
    out: &mut CudaSlice<f32>,
    inp: &CudaSlice<f32>,
    cos: &CudaSlice<f32>,
    sin: &CudaSlice<f32>,
    pos: &CudaSlice<u32>,
    tokens: usize,
    s: &RopeGeometry,
) -> Result<()> {
    launch_rope(gpu, KernelId::RopeForwardF32, out, inp, cos, sin, pos, tokens, s)
}

/// RoPE backward (kernel `rope_backward_f32`; CPU twin
/// `aha_tensor::cpu::rope_backward`): `dinp =` the inverse rotation of `dout`.
/// Shapes and the position contract as [`rope_forward_f32`].
pub fn rope_backward_f32(
    gpu: &Gpu,
    dinp: &mut CudaSlice<f32>,
    dout: &CudaSlice<f32>,
    cos: &CudaSlice<f32>,
    sin: &CudaSlice<f32>,
    pos: &CudaSlice<u32>,
    tokens: usize,
    s: &RopeGeometry,
) -> Result<()> {
    launch_rope(gpu, KernelId::RopeBackwardF32, dinp, dout, cos, sin, pos, tokens, s)
}

/// SiLU forward (kernel `silu_forward_f32`; CPU twin `aha_tensor::cpu::silu`):
/// `out = x * sigmoid(x)`, `n` elements.
pub fn silu_forward_f32(gpu: &Gpu, out: &mut CudaSlice<f32>, x: &CudaSlice<f32>, n: usize) -> Result<()> {
    let Some(p) = plan_1d("silu_forward_f32", n, &[("out", out.len()), ("x", x.len())])? else {
        return Ok(());
    };
    let f = gpu.function(KernelId::SiluForwardF32)?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(out).arg(x).arg(&p.n);
    // SAFETY: (float*, const float*, unsigned long long); both hold >= n floats.
    unsafe { b.launch(p.config()) }.ctx("launch silu_forward_f32")?;
    Ok(())
}

/// SiLU backward (kernel `silu_backward_f32`; CPU twin
/// `aha_tensor::cpu::silu_backward`): `dx = dout * silu'(x)` (assigned).
pub fn silu_backward_f32(
    gpu: &Gpu,
    dx: &mut CudaSlice<f32>,
    dout: &CudaSlice<f32>,
    x: &CudaSlice<f32>,
    n: usize,
) -> Result<()> {
    let lens = [("dx", dx.len()), ("dout", dout.len()), ("x", x.len())];
    let Some(p) = plan_1d("silu_backward_f32", n, &lens)? else {
        return Ok(());
    };
    let f = gpu.function(KernelId::SiluBackwardF32)?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(dx).arg(dout).arg(x).arg(&p.n);
    // SAFETY: (float*, const float*, const float*, unsigned long long); all hold >= n.
    unsafe { b.launch(p.config()) }.ctx("launch silu_backward_f32")?;
    Ok(())
}

/// SwiGLU forward (kernel `swiglu_forward_f32`; CPU twin
/// `aha_tensor::cpu::swiglu`): `out = silu(gate) * up`, `n` elements.
pub fn swiglu_forward_f32(
    gpu: &Gpu,
    out: &mut impl DevOut<f32>,
    gate: &impl DevIn<f32>,
    up: &impl DevIn<f32>,
    n: usize,
) -> Result<()> {
    let mut out = out.view_mut();
    let gate = gate.view();
    let up = up.view();
    let lens = [("out", out.len()), ("gate", gate.len()), ("up", up.len())];
    let Some(p) = plan_1d("swiglu_forward_f32", n, &lens)? else {
        return Ok(());
    };
    let f = gpu.function(KernelId::SwigluForwardF32)?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut out).arg(&gate).arg(&up).arg(&p.n);
    // SAFETY: (float*, const float*, const float*, unsigned long long); all hold >= n.
    unsafe { b.launch(p.config()) }.ctx("launch swiglu_forward_f32")?;
    Ok(())
}

/// SwiGLU backward (kernel `swiglu_backward_f32`; CPU twin
/// `aha_tensor::cpu::swiglu_backward`): `dgate = dout * up * silu'(gate)`,
/// `dup = dout * silu(gate)` (both assigned).
pub fn swiglu_backward_f32(
    gpu: &Gpu,
    dgate: &mut impl DevOut<f32>,
    dup: &mut impl DevOut<f32>,
    dout: &impl DevIn<f32>,
    gate: &impl DevIn<f32>,
    up: &impl DevIn<f32>,
    n: usize,
) -> Result<()> {
    let mut dgate = dgate.view_mut();
    let mut dup = dup.view_mut();
    let dout = dout.view();
    let gate = gate.view();
    let up = up.view();
    let lens = [
        ("dgate", dgate.len()),
        ("dup", dup.len()),
        ("dout", dout.len()),
        ("gate", gate.len()),
        ("up", up.len()),
    ];
    let Some(p) = plan_1d("swiglu_backward_f32", n, &lens)? else {
        return Ok(());
    };
    let f = gpu.function(KernelId::SwigluBackwardF32)?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut dgate).arg(&mut dup).arg(&dout).arg(&gate).arg(&up).arg(&p.n);
    // SAFETY: (float* x2, const float* x3, unsigned long long); all hold >= n.
    unsafe { b.launch(p.config()) }.ctx("launch swiglu_backward_f32")?;
    Ok(())
}

/// Token ids for the embedding launchers.
#[derive(Debug, Clone, Copy)]
pub enum TokenIds<'a> {
    /// Ids on the host: checked against the vocabulary, then copied to the device.
    Host(&'a [u32]),
    /// Ids already on the device: not checked (that would need a copy back);
    /// the kernels write a zero row for an id `>= vocab` in the forward and
    /// skip it in the backward.
    Device(&'a CudaSlice<u32>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EmbeddingPlan {
    n: Plan1d,
    vocab: u32,
    c: i32,
}

fn plan_embedding(
    op: &'static str,
    rows_len: usize,
    table_len: usize,
    ids: Option<&[u32]>,
    ids_len: usize,
    tokens: usize,
    vocab: usize,
    c: usize,
) -> Result<Option<EmbeddingPlan>> {
    let vc = mul(op, vocab, c)?;
    check_lens(op, &[("table", table_len, vc), ("ids", ids_len, tokens)])?;
    if let Some(host) = ids {
        if let Some((p, &id)) = host[..tokens].iter().enumerate().find(|(_, &i)| i as usize >= vocab) {
            return Err(Error::InvalidArgument {
                op,
                msg: format!("token id {id} at position {p} is out of range 0..{vocab}"),
            });
        }
    }
    let n = mul(op, tokens, c)?;
    let Some(n1) = plan_1d(op, n, &[("rows", rows_len)])? else {
        return Ok(None);
    };
    Ok(Some(EmbeddingPlan {
        n: n1,
        vocab: u32::try_from(vocab).unwrap_or(u32::MAX),
        c: to_i32(op, "c", c)?,
    }))
}

/// Embedding forward (kernel `embedding_forward_f32`; CPU twin
/// `aha_tensor::cpu::embedding_forward`): `out[n] = table[ids[n]]` for the
/// first `tokens` ids. `out [tokens, c]`, `table [vocab, c]`.
pub fn embedding_forward_f32(
    gpu: &Gpu,
    out: &mut impl DevOut<f32>,
    table: &impl DevIn<f32>,
    ids: TokenIds<'_>,
    tokens: usize,
    vocab: usize,
    c: usize,
) -> Result<()> {
    let mut out = out.view_mut();
    let table = table.view();
    const OP: &str = "embedding_forward_f32";
    let (host, ids_len) = match ids {
        TokenIds::Host(h) => (Some(h), h.len()),
        TokenIds::Device(d) => (None, d.len()),
    };
    let Some(p) = plan_embedding(OP, out.len(), table.len(), host, ids_len, tokens, vocab, c)? else {
        return Ok(());
    };
    let uploaded;
    let dev_ids = match ids {
        TokenIds::Host(h) => {
            uploaded = gpu.upload(&h[..tokens])?;
            &uploaded
        }
        TokenIds::Device(d) => d,
    };
    let f = gpu.function(KernelId::EmbeddingForwardF32)?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut out)
        .arg(&table)
        .arg(dev_ids)
        .arg(&p.n.n)
        .arg(&p.vocab)
        .arg(&p.c);
    // SAFETY: (float*, const float*, const unsigned*, unsigned long long,
    // unsigned, int); out holds tokens * c floats, table vocab * c, ids
    // `tokens`; the kernel reads a table row only for an id < vocab.
    unsafe { b.launch(p.n.config()) }.ctx("launch embedding_forward_f32")?;
    Ok(())
}

/// Embedding backward (kernel `embedding_backward_f32`; CPU twin
/// `aha_tensor::cpu::embedding_backward`): `dtable[ids[n]] += dout[n]` for the
/// first `tokens` ids, with atomicAdd, so a token that repeats accumulates in
/// no fixed order (f32 rounding may differ between runs).
/// `dtable [vocab, c]`, `dout [tokens, c]`.
pub fn embedding_backward_f32(
    gpu: &Gpu,
    dtable: &mut impl DevOut<f32>,
    dout: &impl DevIn<f32>,
    ids: TokenIds<'_>,
    tokens: usize,
    vocab: usize,
    c: usize,
) -> Result<()> {
    let mut dtable = dtable.view_mut();
    let dout = dout.view();
    const OP: &str = "embedding_backward_f32";
    let (host, ids_len) = match ids {
        TokenIds::Host(h) => (Some(h), h.len()),
        TokenIds::Device(d) => (None, d.len()),
    };
    let Some(p) = plan_embedding(OP, dout.len(), dtable.len(), host, ids_len, tokens, vocab, c)? else {
        return Ok(());
    };
    let uploaded;
    let dev_ids = match ids {
        TokenIds::Host(h) => {
            uploaded = gpu.upload(&h[..tokens])?;
            &uploaded
        }
        TokenIds::Device(d) => d,
    };
    let f = gpu.function(KernelId::EmbeddingBackwardF32)?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut dtable)
        .arg(&dout)
        .arg(dev_ids)
        .arg(&p.n.n)
        .arg(&p.vocab)
        .arg(&p.c);
    // SAFETY: (float*, const float*, const unsigned*, unsigned long long,
    // unsigned, int); dout holds tokens * c floats, dtable vocab * c, ids
    // `tokens`; the kernel writes a dtable row only for an id < vocab.
    unsafe { b.launch(p.n.config()) }.ctx("launch embedding_backward_f32")?;
    Ok(())
}

/// Residual add (kernel `add_f32`; CPU twin `aha_tensor::cpu::add`):
/// `out = a + b`, `n` elements.
pub fn add_f32(
    gpu: &Gpu,
    out: &mut impl DevOut<f32>,
    a: &impl DevIn<f32>,
    b: &impl DevIn<f32>,
    n: usize,
) -> Result<()> {
    let mut out = out.view_mut();
    let a = a.view();
    let b = b.view();
    let lens = [("out", out.len()), ("a", a.len()), ("b", b.len())];
    let Some(p) = plan_1d("add_f32", n, &lens)? else {
        return Ok(());
    };
    let f = gpu.function(KernelId::AddF32)?;
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(&mut out).arg(&a).arg(&b).arg(&p.n);
    // SAFETY: (float*, const float*, const float*, unsigned long long); all hold >= n.
    unsafe { l.launch(p.config()) }.ctx("launch add_f32")?;
    Ok(())
}

/// In-place add (kernel `add_inplace_f32`; CPU twin
/// `aha_tensor::cpu::add_inplace`): `acc += x`, `n` elements.
pub fn add_inplace_f32(gpu: &Gpu, acc: &mut impl DevOut<f32>, x: &impl DevIn<f32>, n: usize) -> Result<()> {
    let mut acc = acc.view_mut();
    let x = x.view();
    let Some(p) = plan_1d("add_inplace_f32", n, &[("acc", acc.len()), ("x", x.len())])? else {
        return Ok(());
    };
    let f = gpu.function(KernelId::AddInplaceF32)?;
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(&mut acc).arg(&x).arg(&p.n);
    // SAFETY: (float*, const float*, unsigned long long); both hold >= n.
    unsafe { l.launch(p.config()) }.ctx("launch add_inplace_f32")?;
    Ok(())
}

/// In-place scale (kernel `scale_f32`; CPU twin `aha_tensor::cpu::scale` with
/// `out = a`, as gradient clipping uses it): `x *= s`, `n` elements.
pub fn scale_f32(gpu: &Gpu, x: &mut impl DevOut<f32>, s: f32, n: usize) -> Result<()> {
    let mut x = x.view_mut();
    let Some(p) = plan_1d("scale_f32", n, &[("x", x.len())])? else {
        return Ok(());
    };
    let f = gpu.function(KernelId::ScaleF32)?;
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(&mut x).arg(&s).arg(&p.n);
    // SAFETY: (float*, float, unsigned long long); x holds >= n floats.
    unsafe { l.launch(p.config()) }.ctx("launch scale_f32")?;
    Ok(())
}

/// A block of columns copied between row-major matrices (kernel
/// `copy_cols_f32`; CPU twin `aha_tensor::cpu::copy_cols`):
/// `out[r * out_stride + out_off + j] (=, +=) sum_{q < group} inp[((r / rep)
/// * group + q) * in_stride + in_off + j]` for `r < rows`, `j < cols`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColsCopy {
    /// Output rows.
    pub rows: usize,
    /// Columns copied per row.
    pub cols: usize,
    /// Row length of `out`.
    pub out_stride: usize,
    /// First output column.
    pub out_off: usize,
    /// Row length of `inp`.
    pub in_stride: usize,
    /// First input column.
    pub in_off: usize,
    /// Output rows per input row group (a broadcast when > 1).
    pub rep: usize,
    /// Input rows summed into each output row (a reduction when > 1).
    pub group: usize,
    /// Add into `out` instead of assigning.
    pub accumulate: bool,
}

impl ColsCopy {
    /// A plain copy of `cols` columns: `out[r, out_off..] = inp[r, in_off..]`.
    pub fn plain(
        rows: usize,
        cols: usize,
        (out_stride, out_off): (usize, usize),
        (in_stride, in_off): (usize, usize),
    ) -> ColsCopy {
        ColsCopy {
            rows,
            cols,
            out_stride,
            out_off,
            in_stride,
            in_off,
            rep: 1,
            group: 1,
            accumulate: false,
        }
    }

    /// The elements `out` and `inp` must hold (checked, so a zero-sized copy
    /// needs nothing).
    pub fn lens(&self) -> Result<(usize, usize)> {
        const OP: &str = "copy_cols_f32";
        let bad = |msg: String| Error::InvalidArgument { op: OP, msg };
        if self.rep == 0 || self.group == 0 {
            return Err(bad("rep and group must be at least 1".into()));
        }
        if self.out_off.saturating_add(self.cols) > self.out_stride
            || self.in_off.saturating_add(self.cols) > self.in_stride
        {
            return Err(bad(format!(
                "columns {}..+{} do not fit rows of {} (out) / {}..+{} of {} (in)",
                self.out_off, self.cols, self.out_stride, self.in_off, self.cols, self.in_stride
            )));
        }
        if self.rows == 0 || self.cols == 0 {
            return Ok((0, 0));
        }
        let out = mul(OP, self.rows - 1, self.out_stride)? + self.out_off + self.cols;
        let in_rows = mul(OP, (self.rows - 1) / self.rep, self.group)? + self.group;
        let inp = mul(OP, in_rows - 1, self.in_stride)? + self.in_off + self.cols;
        Ok((out, inp))
    }
}

/// Copies the column block `s` from `inp` to `out` (kernel `copy_cols_f32`).
pub fn copy_cols_f32(gpu: &Gpu, out: &mut impl DevOut<f32>, inp: &impl DevIn<f32>, s: &ColsCopy) -> Result<()> {
    const OP: &str = "copy_cols_f32";
    let (mut out, inp) = (out.view_mut(), inp.view());
    let (need_out, need_in) = s.lens()?;
    check_lens(OP, &[("out", out.len(), need_out), ("inp", inp.len(), need_in)])?;
    let n = mul(OP, s.rows, s.cols)?;
    let Some(p) = plan_1d(OP, n, &[])? else {
        return Ok(());
    };
    let a = [
        s.rows,
        s.cols,
        s.out_stride,
        s.out_off,
        s.in_stride,
        s.in_off,
        s.rep,
        s.group,
    ]
    .map(|x| x as u64);
    let acc = i32::from(s.accumulate);
    let f = gpu.function(KernelId::CopyColsF32)?;
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(&mut out).arg(&inp);
    for x in &a {
        l.arg(x);
    }
    l.arg(&acc);
    // SAFETY: (float*, const float*, unsigned long long x8, int); the plan
    // checked that out and inp hold every element the copy touches.
    unsafe { l.launch(p.config()) }.ctx("launch copy_cols_f32")?;
    Ok(())
}

/// f32 to bf16 bits, round to nearest even, NaN kept (kernel
/// `cast_f32_to_bf16`; CPU twin `half::bf16::from_f32`), `n` elements.
pub fn cast_f32_to_bf16(gpu: &Gpu, out: &mut impl DevOut<u16>, inp: &impl DevIn<f32>, n: usize) -> Result<()> {
    let mut out = out.view_mut();
    let inp = inp.view();
    let Some(p) = plan_1d("cast_f32_to_bf16", n, &[("out", out.len()), ("inp", inp.len())])? else {
        return Ok(());
    };
    let f = gpu.function(KernelId::CastF32ToBf16)?;
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(&mut out).arg(&inp).arg(&p.n);
    // SAFETY: (unsigned short*, const float*, unsigned long long); both hold >= n.
    unsafe { l.launch(p.config()) }.ctx("launch cast_f32_to_bf16")?;
    Ok(())
}

/// bf16 bits to f32, exact (kernel `cast_bf16_to_f32`; CPU twin
/// `half::bf16::to_f32`), `n` elements.
pub fn cast_bf16_to_f32(gpu: &Gpu, out: &mut impl DevOut<f32>, inp: &impl DevIn<u16>, n: usize) -> Result<()> {
    let mut out = out.view_mut();
    let inp = inp.view();
    let Some(p) = plan_1d("cast_bf16_to_f32", n, &[("out", out.len()), ("inp", inp.len())])? else {
        return Ok(());
    };
    let f = gpu.function(KernelId::CastBf16ToF32)?;
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(&mut out).arg(&inp).arg(&p.n);
    // SAFETY: (float*, const unsigned short*, unsigned long long); both hold >= n.
    unsafe { l.launch(p.config()) }.ctx("launch cast_bf16_to_f32")?;
    Ok(())
}

/// The f32 scalars of one AdamW step, computed on the host in f64 exactly as
/// `aha_tensor::cpu::adamw_step` computes them (bias correction included).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamwScalars {
    /// `beta1`.
    pub b1: f32,
    /// `beta2`.
    pub b2: f32,
    /// `1 - beta1`.
    pub ob1: f32,
    /// `1 - beta2`.
    pub ob2: f32,
    /// `1 - lr * weight_decay` (decoupled decay).
    pub decay: f32,
    /// `lr / (1 - beta1^t)`.
    pub step: f32,
    /// `1 / sqrt(1 - beta2^t)`.
    pub inv_bc2_sqrt: f32,
    /// Added to the denominator.
    pub eps: f32,
}

impl AdamwScalars {
    /// The scalars of step `t` (1-based) for PyTorch-style AdamW.
    pub fn new(lr: f64, beta1: f64, beta2: f64, eps: f64, weight_decay: f64, t: u64) -> Result<AdamwScalars> {
        if t == 0 {
            return Err(Error::InvalidArgument {
                op: "adamw_f32",
                msg: "step t is 1-based".into(),
            });
        }
        let ti = t.min(i32::MAX as u64) as i32;
        let bc1 = 1.0 - beta1.powi(ti);
        let bc2 = 1.0 - beta2.powi(ti);
        Ok(AdamwScalars {
            b1: beta1 as f32,
            b2: beta2 as f32,
            ob1: (1.0 - beta1) as f32,
            ob2: (1.0 - beta2) as f32,
            decay: (1.0 - lr * weight_decay) as f32,
            step: (lr / bc1) as f32,
            inv_bc2_sqrt: (1.0 / bc2.sqrt()) as f32,
            eps: eps as f32,
        })
    }
}

/// One AdamW step over flat buffers (kernel `adamw_f32`; CPU twin
/// `aha_tensor::cpu::adamw_step`): updates `params`, `m`, `v` in place from
/// `grads`, `n` elements each.
pub fn adamw_f32(
    gpu: &Gpu,
    params: &mut CudaSlice<f32>,
    m: &mut CudaSlice<f32>,
    v: &mut CudaSlice<f32>,
    grads: &CudaSlice<f32>,
    n: usize,
    h: &AdamwScalars,
) -> Result<()> {
    let lens = [
        ("params", params.len()),
        ("m", m.len()),
        ("v", v.len()),
        ("grads", grads.len()),
    ];
    let Some(p) = plan_1d("adamw_f32", n, &lens)? else {
        return Ok(());
    };
    let f = gpu.function(KernelId::AdamwF32)?;
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(params)
        .arg(m)
        .arg(v)
        .arg(grads)
        .arg(&p.n)
        .arg(&h.b1)
        .arg(&h.b2)
        .arg(&h.ob1)
        .arg(&h.ob2)
        .arg(&h.decay)
        .arg(&h.step)
        .arg(&h.inv_bc2_sqrt)
        .arg(&h.eps);
    // SAFETY: (float* x3, const float*, unsigned long long, float x8); all
    // four buffers hold >= n floats.
    unsafe { l.launch(p.config()) }.ctx("launch adamw_f32")?;
    Ok(())
}

/// [`adamw_f32`] that also writes `copy [n]`, the bf16 bits of every updated
/// parameter (kernel `adamw_copy_bf16_f32`; CPU twin `aha_tensor::cpu::adamw_step`
/// then `half::bf16::from_f32`): the bf16 weights the products read are
/// refreshed by the update itself.
pub fn adamw_copy_bf16_f32(
    gpu: &Gpu,
    params: &mut impl DevOut<f32>,
    m: &mut impl DevOut<f32>,
    v: &mut impl DevOut<f32>,
    copy: &mut impl DevOut<u16>,
    grads: &impl DevIn<f32>,
    n: usize,
    h: &AdamwScalars,
) -> Result<()> {
    let (mut params, mut m, mut v, mut copy, grads) = (
        params.view_mut(),
        m.view_mut(),
        v.view_mut(),
        copy.view_mut(),
        grads.view(),
    );
    let lens = [
        ("params", params.len()),
        ("m", m.len()),
        ("v", v.len()),
        ("copy", copy.len()),
        ("grads", grads.len()),
    ];
    let Some(p) = plan_1d("adamw_copy_bf16_f32", n, &lens)? else {
        return Ok(());
    };
    let f = gpu.function(KernelId::AdamwCopyBf16F32)?;
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(&mut params)
        .arg(&mut m)
        .arg(&mut v)
        .arg(&mut copy)
        .arg(&grads)
        .arg(&p.n)
        .arg(&h.b1)
        .arg(&h.b2)
        .arg(&h.ob1)
        .arg(&h.ob2)
        .arg(&h.decay)
        .arg(&h.step)
        .arg(&h.inv_bc2_sqrt)
        .arg(&h.eps);
    // SAFETY: (float* x3, unsigned short*, const float*, unsigned long long,
    // float x8); all five buffers hold >= n elements.
    unsafe { l.launch(p.config()) }.ctx("launch adamw_copy_bf16_f32")?;
    Ok(())
}

/// Blocks of the first gradient-norm pass for `n` elements (also the
/// number of f64 partial sums).
fn grad_norm_blocks(n: u64) -> u32 {
    n.div_ceil(u64::from(BLOCK)).clamp(1, GRAD_NORM_MAX_BLOCKS) as u32
}

/// The global L2 norm of `x [n]`, summed in f64 in a fixed order (kernels
/// `grad_norm_sq_f32` then `grad_norm_sq_reduce_f64`; CPU twin
/// `aha_tensor::cpu::global_norm`). Reads one f64 back, so it synchronises
/// the stream; clip with [`scale_f32`] by `max_norm / (norm + 1e-6)` when
/// that is below 1.
pub fn grad_norm_f32(gpu: &Gpu, x: &impl DevIn<f32>, n: usize) -> Result<f64> {
    let x = x.view();
    let Some(p) = plan_1d("grad_norm_f32", n, &[("x", x.len())])? else {
        return Ok(0.0);
    };
    let blocks = grad_norm_blocks(p.n);
    let mut partial = gpu.scratch_f64(blocks as usize)?;
    let mut out = gpu.scratch_f64(1)?;
    let f1 = gpu.function(KernelId::GradNormSqF32)?;
    let cfg1 = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut l = gpu.stream().launch_builder(&f1);
    l.arg(&mut *partial).arg(&x).arg(&p.n);
    // SAFETY: (double*, const float*, unsigned long long); x holds >= n
    // floats and partial one double per block.
    unsafe { l.launch(cfg1) }.ctx("launch grad_norm_sq_f32")?;
    let f2 = gpu.function(KernelId::GradNormSqReduceF64)?;
    let g = blocks as i32;
    let cfg2 = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut l = gpu.stream().launch_builder(&f2);
    l.arg(&mut *out).arg(&*partial).arg(&g);
    // SAFETY: (double*, const double*, int); partial holds g doubles, out one.
    unsafe { l.launch(cfg2) }.ctx("launch grad_norm_sq_reduce_f64")?;
    let sum = gpu.download(&out)?;
    let sq = sum.first().copied().ok_or(Error::InvalidArgument {
        op: "grad_norm_f32",
        msg: "the device returned no sum".into(),
    })?;
    Ok(sq.sqrt())
}

/// The sizes of one attention call (as `aha_tensor::cpu::AttnShape`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnGeometry {
    /// Batch.
    pub b: usize,
    /// Sequence length.
    pub t: usize,
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
}

/// Widest head the simple attention kernels take (`ATT_MAX_D`).
pub const ATTENTION_MAX_D: usize = 256;
const ATT_WARPS: usize = 4;

/// Checks an attention call's lengths (`q`, `k`, `v`, `out`, `lse`, in that
/// order) and sizes; returns the grids for query rows and key rows, or
/// `None` when there is nothing to do.
pub fn plan_attention(g: &AttnGeometry, lens: [usize; 5]) -> Result<Option<(u32, u32)>> {
    let bad = |msg: String| Error::InvalidArgument { op: "attention", msg };
    let AttnGeometry {
        b, t, h, hk, dk, dv, ..
    } = *g;
    if hk == 0 || h % hk != 0 {
        return Err(bad(format!(
            "{h} query heads are not a multiple of {hk} key/value heads"
        )));
    }
    if dk == 0 || dv == 0 || dk > ATTENTION_MAX_D || dv > ATTENTION_MAX_D {
        return Err(bad(format!("head widths {dk}, {dv} must be in 1..={ATTENTION_MAX_D}")));
    }
    let mul = |xs: &[usize]| xs.iter().try_fold(1usize, |a, &x| a.checked_mul(x));
    let want = [
        mul(&[b, t, h, dk]),
        mul(&[b, t, hk, dk]),
        mul(&[b, t, hk, dv]),
        mul(&[b, t, h, dv]),
        mul(&[b, h, t]),
    ];
    for ((name, have), w) in ["q", "k", "v", "out", "lse"].iter().zip(lens).zip(want) {
        let w = w.ok_or_else(|| bad("sizes overflow".into()))?;
        if have != w {
            return Err(bad(format!("{name} holds {have}, the shape needs {w}")));
        }
    }
    for x in [b, t, h, hk, dk, dv] {
        i32::try_from(x).map_err(|_| bad(format!("size {x} exceeds i32")))?;
    }
    if b == 0 || t == 0 {
        return Ok(None);
    }
    let grid = |rows: usize| u32::try_from(rows.div_ceil(ATT_WARPS)).map_err(|_| bad("too many rows".into()));
    Ok(Some((grid(b * t * h)?, grid(b * t * hk)?)))
}

fn att_cfg(blocks: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (32 * ATT_WARPS as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Causal GQA attention forward: `out` and the row log-sum-exps `lse`
/// (kernel `attention_forward_f32`; CPU twin `aha_tensor::cpu::attention_forward`).
pub fn attention_forward_f32(
    gpu: &Gpu,
    out: &mut CudaSlice<f32>,
    lse: &mut CudaSlice<f32>,
    q: &CudaSlice<f32>,
    k: &CudaSlice<f32>,
    v: &CudaSlice<f32>,
    g: &AttnGeometry,
) -> Result<()> {
    let Some((rows_q, _)) = plan_attention(g, [q.len(), k.len(), v.len(), out.len(), lse.len()])? else {
        return Ok(());
    };
    let f = gpu.function(KernelId::AttentionForwardF32)?;
    let d = [g.b, g.t, g.h, g.hk, g.dk, g.dv].map(|x| x as i32);
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(out).arg(lse).arg(q).arg(k).arg(v);
    for x in &d {
        l.arg(x);
    }
    l.arg(&g.scale);
    // SAFETY: (float*, float*, const float* x3, int x6, float); the plan
    // checked every length against the shape; one warp per query row.
    unsafe { l.launch(att_cfg(rows_q)) }.ctx("launch attention_forward_f32")?;
    Ok(())
}

/// Decode attention (kernel `attention_decode_f32`): `n` new query tokens of
/// one sequence at positions `start .. start + n` against its KV cache
/// `kc [P, Hk, Dk]`, `vc [P, Hk, Dv]` (the new keys and values already
/// written at those positions). `q [n, H, Dk]`, `out [n, H, Dv]`. The CPU
/// twin is the causal attention over the whole prefix (rows `start..`).
#[allow(clippy::too_many_arguments)]
pub fn attention_decode_f32(
    gpu: &Gpu,
    out: &mut CudaSlice<f32>,
    q: &CudaSlice<f32>,
    kc: &CudaSlice<f32>,
    vc: &CudaSlice<f32>,
    start: usize,
    n: usize,
    g: &AttnGeometry,
) -> Result<()> {
    const OP: &str = "attention_decode_f32";
    let bad = |msg: String| Error::InvalidArgument { op: OP, msg };
    let AttnGeometry { h, hk, dk, dv, .. } = *g;
    if hk == 0 || h % hk != 0 || dk == 0 || dv == 0 || dk > ATTENTION_MAX_D || dv > ATTENTION_MAX_D {
        return Err(bad(format!("heads {h}/{hk} or widths {dk}/{dv} out of range")));
    }
    let end = start.checked_add(n).ok_or_else(|| bad("positions overflow".into()))?;
    check_len(OP, "q", q.len(), n * h * dk)?;
    check_len(OP, "out", out.len(), n * h * dv)?;
    check_len(OP, "kc", kc.len(), end * hk * dk)?;
    check_len(OP, "vc", vc.len(), end * hk * dv)?;
    if n == 0 {
        return Ok(());
    }
    let to_i = |x: usize| i32::try_from(x).map_err(|_| bad(format!("size {x} exceeds i32")));
    let (s0, nn, hh, kk, ddk, ddv) = (to_i(start)?, to_i(n)?, to_i(h)?, to_i(hk)?, to_i(dk)?, to_i(dv)?);
    let blocks = u32::try_from((n * h).div_ceil(ATT_WARPS)).map_err(|_| bad("too many rows".into()))?;
    let f = gpu.function(KernelId::AttentionDecodeF32)?;
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(out)
        .arg(q)
        .arg(kc)
        .arg(vc)
        .arg(&s0)
        .arg(&nn)
        .arg(&hh)
        .arg(&kk)
        .arg(&ddk)
        .arg(&ddv)
        .arg(&g.scale);
    // SAFETY: (float*, const float* x3, int x6, float); q and out hold n
    // rows, the caches start + n positions (checked); one warp per (token, head).
    unsafe { l.launch(att_cfg(blocks)) }.ctx("launch attention_decode_f32")?;
    Ok(())
}

/// Causal GQA attention backward: `dq`, `dk`, `dv` are assigned (kernels
/// `attention_dsum_f32`, `attention_backward_dq_f32`,
/// `attention_backward_dkv_f32`; no atomics, so the result is
/// deterministic; CPU twin `aha_tensor::cpu::attention_backward`).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_f32(
    gpu: &Gpu,
    dq: &mut CudaSlice<f32>,
    dk: &mut CudaSlice<f32>,
    dv: &mut CudaSlice<f32>,
    dout: &CudaSlice<f32>,
    q: &CudaSlice<f32>,
    k: &CudaSlice<f32>,
    v: &CudaSlice<f32>,
    out: &CudaSlice<f32>,
    lse: &CudaSlice<f32>,
    g: &AttnGeometry,
) -> Result<()> {
    let Some((rows_q, rows_k)) = plan_attention(g, [q.len(), k.len(), v.len(), out.len(), lse.len()])? else {
        return Ok(());
    };
    let bad = |name: &str, have: usize, want: usize| Error::InvalidArgument {
        op: "attention_backward_f32",
        msg: format!("{name} holds {have}, the shape needs {want}"),
    };
    for (name, have, want) in [
        ("dq", dq.len(), q.len()),
        ("dk", dk.len(), k.len()),
        ("dv", dv.len(), v.len()),
        ("dout", dout.len(), out.len()),
    ] {
        if have != want {
            return Err(bad(name, have, want));
        }
    }
    let d = [g.b, g.t, g.h, g.hk, g.dk, g.dv].map(|x| x as i32);
    let mut dsum = gpu.scratch_f32(lse.len())?;
    let f0 = gpu.function(KernelId::AttentionDsumF32)?;
    let mut l = gpu.stream().launch_builder(&f0);
    l.arg(&mut *dsum)
        .arg(dout)
        .arg(out)
        .arg(&d[0])
        .arg(&d[1])
        .arg(&d[2])
        .arg(&d[5]);
    // SAFETY: (float*, const float* x2, int x4); dsum holds b*h*t floats,
    // dout and out b*t*h*dv (checked).
    unsafe { l.launch(att_cfg(rows_q)) }.ctx("launch attention_dsum_f32")?;
    let f1 = gpu.function(KernelId::AttentionBackwardDqF32)?;
    let mut l = gpu.stream().launch_builder(&f1);
    l.arg(dq).arg(dout).arg(q).arg(k).arg(v).arg(lse).arg(&*dsum);
    for x in &d {
        l.arg(x);
    }
    l.arg(&g.scale);
    // SAFETY: (float*, const float* x6, int x6, float); lengths checked above.
    unsafe { l.launch(att_cfg(rows_q)) }.ctx("launch attention_backward_dq_f32")?;
    let f2 = gpu.function(KernelId::AttentionBackwardDkvF32)?;
    let mut l = gpu.stream().launch_builder(&f2);
    l.arg(dk).arg(dv).arg(dout).arg(q).arg(k).arg(v).arg(lse).arg(&*dsum);
    for x in &d {
        l.arg(x);
    }
    l.arg(&g.scale);
    // SAFETY: (float* x2, const float* x6, int x6, float); one warp per key row.
    unsafe { l.launch(att_cfg(rows_k)) }.ctx("launch attention_backward_dkv_f32")?;
    Ok(())
}

/// Checks a token log-prob call: `logits` holds `targets.len() * v`, the
/// per-row buffers one value per target, every target below `v`.
fn plan_logprob(op: &'static str, logits: usize, rows: &[(&str, usize)], targets: &[u32], v: usize) -> Result<bool> {
    let n = targets.len();
    let bad = |msg: String| Error::InvalidArgument { op, msg };
    if n.checked_mul(v) != Some(logits) {
        return Err(bad(format!("logits hold {logits}, not {n} targets x v {v}")));
    }
    for &(what, got) in rows {
        check_len(op, what, got, n)?;
    }
    if let Some((i, t)) = targets.iter().enumerate().find(|(_, &t)| t as usize >= v) {
        return Err(bad(format!("target {i} is {t}, the vocabulary has {v}")));
    }
    if n > u32::MAX as usize {
        return Err(bad(format!("{n} rows exceed one grid")));
    }
    Ok(n > 0 && v > 0)
}

/// Log-probs of `targets` under full logit rows (kernel
/// `token_logprob_forward_f32`; CPU twin
/// `aha_tensor::cpu::token_logprob_forward`): `logp [n]`, `lse [n]`.
pub fn token_logprob_forward_f32(
    gpu: &Gpu,
    logp: &mut CudaSlice<f32>,
    lse: &mut CudaSlice<f32>,
    logits: &CudaSlice<f32>,
    targets: &[u32],
    v: usize,
) -> Result<()> {
    const OP: &str = "token_logprob_forward_f32";
    if !plan_logprob(
        OP,
        logits.len(),
        &[("logp", logp.len()), ("lse", lse.len())],
        targets,
        v,
    )? {
        return Ok(());
    }
    let t = gpu.upload(targets)?;
    let f = gpu.function(KernelId::TokenLogprobForwardF32)?;
    let vv = v as u64;
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(logp).arg(lse).arg(logits).arg(&t).arg(&vv);
    let cfg = LaunchConfig {
        grid_dim: (targets.len() as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: (float*, float*, const float*, const unsigned*, unsigned long
    // long); one block per row, logits hold n * v, targets n ids < v.
    unsafe { l.launch(cfg) }.ctx("launch token_logprob_forward_f32")?;
    Ok(())
}

/// `dlogits [n, v] = dlogp (onehot(target) - softmax(logits))` (kernel
/// `token_logprob_backward_f32`; CPU twin
/// `aha_tensor::cpu::token_logprob_backward`).
pub fn token_logprob_backward_f32(
    gpu: &Gpu,
    dlogits: &mut CudaSlice<f32>,
    dlogp: &CudaSlice<f32>,
    logits: &CudaSlice<f32>,
    lse: &CudaSlice<f32>,
    targets: &[u32],
    v: usize,
) -> Result<()> {
    const OP: &str = "token_logprob_backward_f32";
    if !plan_logprob(
        OP,
        logits.len(),
        &[("dlogp", dlogp.len()), ("lse", lse.len())],
        targets,
        v,
    )? {
        return Ok(());
    }
    check_len(OP, "dlogits", dlogits.len(), logits.len())?;
    let Some(p) = plan_1d(OP, logits.len(), &[])? else {
        return Ok(());
    };
    let t = gpu.upload(targets)?;
    let f = gpu.function(KernelId::TokenLogprobBackwardF32)?;
    let (nn, vv) = (targets.len() as u64, v as u64);
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(dlogits).arg(dlogp).arg(logits).arg(lse).arg(&t).arg(&nn).arg(&vv);
    // SAFETY: (float*, const float* x3, const unsigned*, unsigned long long
    // x2); one thread per element of n * v, lengths checked.
    unsafe { l.launch(p.config()) }.ctx("launch token_logprob_backward_f32")?;
    Ok(())
}

/// `x [rows, c] += bias [c]` (kernel `add_bias_f32`).
pub fn add_bias_f32(gpu: &Gpu, x: &mut impl DevOut<f32>, bias: &impl DevIn<f32>, rows: usize, c: usize) -> Result<()> {
    let mut x = x.view_mut();
    let bias = bias.view();
    const OP: &str = "add_bias_f32";
    check_len(OP, "bias", bias.len(), c)?;
    let n = rows.checked_mul(c).ok_or_else(|| Error::InvalidArgument {
        op: OP,
        msg: "size overflows".into(),
    })?;
    let Some(p) = plan_1d(OP, n, &[("x", x.len())])? else {
        return Ok(());
    };
    let f = gpu.function(KernelId::AddBiasF32)?;
    let (r, cc) = (rows as u64, c as u64);
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(&mut x).arg(&bias).arg(&r).arg(&cc);
    // SAFETY: (float*, const float*, unsigned long long x2); x holds rows * c, bias c.
    unsafe { l.launch(p.config()) }.ctx("launch add_bias_f32")?;
    Ok(())
}

/// `dbias [c] +=` the column sums of `dy [rows, c]`, summed in row order
/// (kernel `bias_grad_f32`; deterministic).
pub fn bias_grad_f32(
    gpu: &Gpu,
    dbias: &mut impl DevOut<f32>,
    dy: &impl DevIn<f32>,
    rows: usize,
    c: usize,
) -> Result<()> {
    let mut dbias = dbias.view_mut();
    let dy = dy.view();
    const OP: &str = "bias_grad_f32";
    let n = rows.checked_mul(c).ok_or_else(|| Error::InvalidArgument {
        op: OP,
        msg: "size overflows".into(),
    })?;
    check_len(OP, "dy", dy.len(), n)?;
    let Some(p) = plan_1d(OP, c, &[("dbias", dbias.len())])? else {
        return Ok(());
    };
    let f = gpu.function(KernelId::BiasGradF32)?;
    let (r, cc) = (rows as u64, c as u64);
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(&mut dbias).arg(&dy).arg(&r).arg(&cc);
    // SAFETY: (float*, const float*, unsigned long long x2); one thread per
    // column < c, reading rows * c.
    unsafe { l.launch(p.config()) }.ctx("launch bias_grad_f32")?;
    Ok(())
}

/// What the sampling kernel draws with (as `aha_sampler::SamplingParams`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleParams {
    /// Divides the logits; <= 0 means greedy.
    pub temperature: f32,
    /// Keep the k most likely (0: off).
    pub top_k: usize,
    /// Nucleus mass (1: off).
    pub top_p: f32,
    /// Drop below `min_p` times the top weight (0: off).
    pub min_p: f32,
}

/// One sampled token: id, `log softmax(logits / T)` at it, and the log of
/// the kept mass fraction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampledToken {
    /// The token id.
    pub token: u32,
    /// Its log-prob under the temperature-scaled distribution.
    pub logprob: f32,
    /// `ln(kept / total)`.
    pub truncated_mass_log: f32,
}

/// Checks the sampling call: `logits` holds `rows * v`, one uniform per row
/// in [0, 1), parameters in range, `v` addressable by an i32 token id.
pub fn plan_sample(logits_len: usize, rows: usize, v: usize, u: &[f64], p: &SampleParams) -> Result<bool> {
    let bad = |msg: String| Error::InvalidArgument { op: "sample_f32", msg };
    if rows.checked_mul(v) != Some(logits_len) {
        return Err(bad(format!("logits hold {logits_len}, not rows {rows} x v {v}")));
    }
    if u.len() != rows {
        return Err(bad(format!("{} uniforms for {rows} rows", u.len())));
    }
    if let Some(x) = u.iter().find(|x| !(0.0..1.0).contains(*x)) {
        return Err(bad(format!("uniform {x} outside [0, 1)")));
    }
    if v > i32::MAX as usize || p.top_k > i32::MAX as usize {
        return Err(bad(format!("vocabulary {v} or top_k {} exceeds i32", p.top_k)));
    }
    if !(p.top_p > 0.0 && p.top_p <= 1.0 && (0.0..1.0).contains(&p.min_p)) || p.temperature.is_nan() {
        return Err(bad(format!(
            "top_p {} must be in (0, 1], min_p {} in [0, 1), temperature a number",
            p.top_p, p.min_p
        )));
    }
    Ok(rows > 0 && v > 0)
}

/// Samples one token per row of `logits [rows, v]` with the row's uniform
/// `u[row]` (kernel `sample_f32`; CPU twin
/// `aha_sampler::sample_with_uniform`). Reads the results back, so it
/// synchronises; a row with a NaN or no finite logit is an error naming it.
pub fn sample_f32(
    gpu: &Gpu,
    logits: &CudaSlice<f32>,
    rows: usize,
    v: usize,
    u: &[f64],
    p: &SampleParams,
) -> Result<Vec<SampledToken>> {
    if !plan_sample(logits.len(), rows, v, u, p)? {
        return Ok(Vec::new());
    }
    let mut w = gpu.scratch_f32(rows * v)?;
    let du = gpu.upload(u)?;
    let mut token = gpu.zeros::<i32>(rows)?;
    let mut lp = gpu.zeros::<f32>(rows)?;
    let mut tl = gpu.zeros::<f32>(rows)?;
    let f = gpu.function(KernelId::SampleF32)?;
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (512, 1, 1),
        shared_mem_bytes: 0,
    };
    let (vv, k) = (v as u64, p.top_k as i32);
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(&mut token)
        .arg(&mut lp)
        .arg(&mut tl)
        .arg(&mut *w)
        .arg(logits)
        .arg(&du)
        .arg(&vv)
        .arg(&p.temperature)
        .arg(&k)
        .arg(&p.top_p)
        .arg(&p.min_p);
    // SAFETY: (int*, float*, float*, float*, const float*, const double*,
    // unsigned long long, float, int, float, float); the plan checked that
    // logits and w hold rows * v floats, u and the outputs one per row; one
    // block per row.
    unsafe { l.launch(cfg) }.ctx("launch sample_f32")?;
    let (t, lp, tl) = (gpu.download(&token)?, gpu.download(&lp)?, gpu.download(&tl)?);
    t.iter()
        .zip(lp.iter().zip(&tl))
        .enumerate()
        .map(|(row, (&t, (&lp, &tl)))| {
            u32::try_from(t)
                .map(|token| SampledToken {
                    token,
                    logprob: lp,
                    truncated_mass_log: tl,
                })
                .map_err(|_| Error::InvalidArgument {
                    op: "sample_f32",
                    msg: format!("row {row}: the logits hold a NaN or no finite value"),
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    //! The launchers' checks, on lengths alone: these run without a GPU.
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn logprob_plan_checks_targets_and_lengths() {
        assert!(plan_logprob("t", 12, &[("logp", 3)], &[0, 3, 1], 4).unwrap());
        assert!(!plan_logprob("t", 0, &[("logp", 0)], &[], 4).unwrap());
        let e = plan_logprob("t", 12, &[("logp", 3)], &[0, 4, 1], 4).unwrap_err();
        assert!(e.to_string().contains("target 1 is 4"), "{e}");
        assert!(plan_logprob("t", 11, &[("logp", 3)], &[0, 1, 1], 4).is_err());
        assert!(plan_logprob("t", 12, &[("logp", 2)], &[0, 1, 1], 4).is_err());
    }

    #[test]
    fn attention_plan_checks_heads_widths_and_lengths() {
        let g = AttnGeometry {
            b: 2,
            t: 5,
            h: 4,
            hk: 2,
            dk: 8,
            dv: 6,
            scale: 0.3,
        };
        let lens = [2 * 5 * 4 * 8, 2 * 5 * 2 * 8, 2 * 5 * 2 * 6, 2 * 5 * 4 * 6, 2 * 4 * 5];
        assert_eq!(plan_attention(&g, lens).unwrap(), Some((10, 5)));
        let mut bad = lens;
        bad[2] += 1;
        assert!(plan_attention(&g, bad).unwrap_err().to_string().contains("v holds"));
        assert!(plan_attention(&AttnGeometry { hk: 3, ..g }, lens).is_err());
        assert!(plan_attention(&AttnGeometry { dk: 257, ..g }, lens).is_err());
        let empty = AttnGeometry { t: 0, ..g };
        assert_eq!(plan_attention(&empty, [0; 5]).unwrap(), None);
    }

    #[test]
    fn sample_plan_checks_lengths_uniforms_and_ranges() {
        let p = SampleParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.9,
            min_p: 0.0,
        };
        assert!(plan_sample(12, 3, 4, &[0.1, 0.5, 0.9], &p).unwrap());
        assert!(!plan_sample(0, 0, 4, &[], &p).unwrap());
        assert!(plan_sample(11, 3, 4, &[0.1, 0.5, 0.9], &p).is_err());
        assert!(plan_sample(12, 3, 4, &[0.1, 0.5], &p).is_err());
        assert!(plan_sample(12, 3, 4, &[0.1, 0.5, 1.0], &p)
            .unwrap_err()
            .to_string()
            .contains("uniform 1"));
        assert!(plan_sample(12, 3, 4, &[0.1, 0.5, 0.2], &SampleParams { top_p: 0.0, ..p }).is_err());
        assert!(plan_sample(12, 3, 4, &[0.1, 0.5, 0.2], &SampleParams { min_p: 1.0, ..p }).is_err());
    }

    fn msg(e: Error) -> String {
        e.to_string()
    }

    #[test]
    fn grid_covers_sizes_that_are_not_multiples_of_the_block() {
        for n in [1u64, 255, 256, 257, 1000, 65_537 * 256] {
            let cfg = grid_1d(n);
            let threads = u64::from(cfg.grid_dim.0) * u64::from(cfg.block_dim.0);
            assert!(cfg.grid_dim.0 >= 1 && u64::from(cfg.grid_dim.0) <= MAX_GRID);
            // Either one thread per element or the capped grid, which strides.
            assert!(threads >= n || u64::from(cfg.grid_dim.0) == MAX_GRID, "n = {n}");
        }
        assert_eq!(grad_norm_blocks(1), 1);
        assert_eq!(grad_norm_blocks(257), 2);
        assert_eq!(grad_norm_blocks(1 << 40), 1024);
    }

    #[test]
    fn element_wise_plans_reject_short_buffers() {
        let e = plan_1d("add_f32", 10, &[("out", 10), ("a", 9), ("b", 10)]).unwrap_err();
        assert!(msg(e).contains("add_f32: a holds 9 elements, needs 10"));
        assert_eq!(plan_1d("add_f32", 0, &[("out", 0)]).unwrap(), None);
        let p = plan_1d("add_f32", 1000, &[("out", 1024)]).unwrap().unwrap();
        assert_eq!((p.n, p.cfg), (1000, (4, 256)));
    }

    #[test]
    fn rmsnorm_backward_plan_checks_every_buffer_and_the_width() {
        let ok = [6, 3, 6, 6, 3, 2];
        let p = plan_rmsnorm_backward(ok, 2, 3).unwrap().unwrap();
        assert_eq!((p.rows, p.c, p.blocks), (2, 3, 2));
        let names = ["dinp", "dweight", "dout", "inp", "weight", "rstd"];
        for (i, name) in names.iter().enumerate() {
            let mut lens = ok;
            lens[i] -= 1;
            let e = msg(plan_rmsnorm_backward(lens, 2, 3).unwrap_err());
            assert!(e.contains(&format!("{name} holds")), "{e}");
        }
        let c = RMSNORM_BWD_MAX_C + 1;
        let e = msg(plan_rmsnorm_backward([c, c, c, c, c, 1], 1, c).unwrap_err());
        assert!(e.contains("shared memory"), "{e}");
        let big = plan_rmsnorm_backward([5000 * 8; 6], 5000, 8).unwrap().unwrap();
        assert_eq!(big.blocks, RMSNORM_BWD_MAX_BLOCKS);
        assert!(plan_rmsnorm_backward([usize::MAX; 6], usize::MAX, 2).is_err());
    }

    #[test]
    fn rope_plan_checks_geometry_tables_and_lengths() {
        let s = RopeGeometry {
            heads: 2,
            head_dim: 8,
            rot_offset: 2,
            rot_dim: 4,
            interleaved: true,
        };
        // 3 tokens * 2 heads * 8 dims = 48; tables [5, 2] = 10.
        let p = plan_rope("rope", [48, 48, 10, 10, 3], 3, &s).unwrap().unwrap();
        assert_eq!((p.width, p.max_pos, p.interleaved, p.n.n), (16, 5, 1, 48));
        for (i, name) in ["out", "inp", "cos", "sin", "pos"].iter().enumerate() {
            let mut lens = [48, 48, 10, 10, 3];
            lens[i] -= 1;
            let e = msg(plan_rope("rope", lens, 3, &s).unwrap_err());
            // A short cos is not a whole number of table rows.
            let want = if *name == "cos" { "cos table" } else { name };
            assert!(e.contains(want), "{name}: {e}");
        }
        let odd = RopeGeometry { rot_dim: 3, ..s };
        assert!(msg(plan_rope("rope", [48, 48, 10, 10, 3], 3, &odd).unwrap_err()).contains("even"));
        let outside = RopeGeometry { rot_offset: 6, ..s };
        assert!(plan_rope("rope", [48, 48, 10, 10, 3], 3, &outside).is_err());
        // No rotated dims: a copy, no table needed.
        let none = RopeGeometry { rot_dim: 0, ..s };
        assert_eq!(
            plan_rope("rope", [48, 48, 0, 0, 3], 3, &none).unwrap().unwrap().max_pos,
            0
        );
    }

    #[test]
    fn embedding_plan_checks_host_ids_and_lengths() {
        let ids = [0u32, 4, 2];
        let p = plan_embedding("emb", 6, 10, Some(&ids), 3, 3, 5, 2).unwrap().unwrap();
        assert_eq!((p.n.n, p.vocab, p.c), (6, 5, 2));
        let e = msg(plan_embedding("emb", 6, 10, Some(&[0, 5, 1]), 3, 3, 5, 2).unwrap_err());
        assert!(e.contains("token id 5 at position 1 is out of range 0..5"), "{e}");
        // Device ids are not checked on the host.
        assert!(plan_embedding("emb", 6, 10, None, 3, 3, 5, 2).is_ok());
        assert!(msg(plan_embedding("emb", 5, 10, None, 3, 3, 5, 2).unwrap_err()).contains("rows holds 5"));
        assert!(msg(plan_embedding("emb", 6, 9, None, 3, 3, 5, 2).unwrap_err()).contains("table holds 9"));
        assert!(msg(plan_embedding("emb", 6, 10, Some(&ids[..2]), 2, 3, 5, 2).unwrap_err()).contains("ids holds 2"));
    }

    #[test]
    fn adamw_scalars_match_the_cpu_formula() {
        assert!(AdamwScalars::new(1e-3, 0.9, 0.999, 1e-8, 0.01, 0).is_err());
        let h = AdamwScalars::new(1e-3, 0.9, 0.999, 1e-8, 0.01, 2).unwrap();
        assert_eq!(h.step, (1e-3 / (1.0 - 0.81)) as f32);
        assert_eq!(h.inv_bc2_sqrt, (1.0 / (1.0f64 - 0.999 * 0.999).sqrt()) as f32);
        assert_eq!(h.decay, (1.0 - 1e-5) as f32);
    }
}
