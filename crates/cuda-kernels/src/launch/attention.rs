//! Launchers of `kernels/attention.cu`: the simple causal GQA attention (forward, decode, backward).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::check_len;
use crate::device::Gpu;
use crate::error::{DriverContext, Error, Result};
use crate::registry::KernelId;

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

#[cfg(test)]
mod tests {
    //! The checks, on lengths alone: these run without a GPU.
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

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
}
