//! Launchers of `kernels/logprob.cu`: token log-probs over full logit rows, and the bias add / gradient of linear layers.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::{check_len, plan_1d};
use crate::device::Gpu;
use crate::error::{DriverContext, Error, Result};
use crate::registry::KernelId;
use crate::view::{DevIn, DevOut};

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

#[cfg(test)]
mod tests {
    //! The checks, on lengths alone: these run without a GPU.
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
}
