//! Launchers of `kernels/cast.cu`: f32 <-> bf16 casts.

use cudarc::driver::PushKernelArg;

use super::plan_1d;
use crate::device::Gpu;
use crate::error::{DriverContext, Result};
use crate::registry::KernelId;
use crate::view::{DevIn, DevOut};

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
