//! Launchers of `kernels/activation.cu`: SiLU and SwiGLU, forward and backward.

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::plan_1d;
use crate::device::Gpu;
use crate::error::{DriverContext, Result};
use crate::registry::KernelId;
use crate::view::{DevIn, DevOut};

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
