//! Launchers of `kernels/optim.cu`: AdamW and the global gradient norm.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{plan_1d, BLOCK};
use crate::device::Gpu;
use crate::error::{DriverContext, Error, Result};
use crate::registry::KernelId;
use crate::view::{DevIn, DevOut};

/// Blocks of the gradient-norm's first pass (scratch entries, f64).
const GRAD_NORM_MAX_BLOCKS: u64 = 1024;

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
    params: &mut impl DevOut<f32>,
    m: &mut impl DevOut<f32>,
    v: &mut impl DevOut<f32>,
    grads: &impl DevIn<f32>,
    n: usize,
    h: &AdamwScalars,
) -> Result<()> {
    let (mut params, mut m, mut v, grads) = (params.view_mut(), m.view_mut(), v.view_mut(), grads.view());
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
    l.arg(&mut params)
        .arg(&mut m)
        .arg(&mut v)
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
/// the stream; clip with [`super::scale_f32`] by `max_norm / (norm + 1e-6)` when
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

#[cfg(test)]
mod tests {
    //! The checks, on lengths alone: these run without a GPU.
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn grad_norm_blocks_cover_and_cap() {
        assert_eq!(grad_norm_blocks(1), 1);
        assert_eq!(grad_norm_blocks(257), 2);
        assert_eq!(grad_norm_blocks(1 << 40), 1024);
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
