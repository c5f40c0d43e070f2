//! Launchers of `kernels/rope.cu`: rotary position embeddings, forward and backward.

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::{check_lens, mul, plan_1d, to_i32, Plan1d};
use crate::device::Gpu;
use crate::error::{DriverContext, Error, Result};
use crate::registry::KernelId;

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

#[cfg(test)]
mod tests {
    //! The checks, on lengths alone: these run without a GPU.
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn msg(e: Error) -> String {
        e.to_string()
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
}
