//! Linear layers and norms over slots of the flat parameter buffer.
//!
//! `y[N, out] = x[N, in] W^T + b` with `W [out, in]` (PyTorch's layout).

use aha_tensor::cpu::{self, Gemm};
use aha_tensor::profile::{self, Phase};

use crate::error::Result;
use crate::lora::LoraSlots;
use crate::params::{Linear, Slot};

/// `y = x W^T (+ b) (+ s (x A^T) B^T)`; `y` is overwritten.
pub(crate) fn linear_fwd(y: &mut [f32], x: &[f32], p: &[f32], l: &Linear, n: usize) -> Result<()> {
    cpu::matmul(y, x, l.w.of(p), Gemm::new(n, l.inp, l.out).tb())?;
    if let Some(b) = l.b {
        let bias = b.of(p);
        for row in y.chunks_mut(l.out) {
            for (v, &bb) in row.iter_mut().zip(bias) {
                *v += bb;
            }
        }
    }
    if let Some(lo) = l.lora.filter(|lo| lo.enabled) {
        let xa = lora_down(x, p, l, &lo, n)?;
        cpu::matmul(y, &xa, lo.b.of(p), Gemm::new(n, lo.r, l.out).tb().acc())?;
    }
    Ok(())
}

/// The adapter's scaled low-rank activation `s x A^T` [n, r].
fn lora_down(x: &[f32], p: &[f32], l: &Linear, lo: &LoraSlots, n: usize) -> Result<Vec<f32>> {
    let mut xa = vec![0f32; n * lo.r];
    cpu::matmul(&mut xa, x, lo.a.of(p), Gemm::new(n, l.inp, lo.r).tb())?;
    xa.iter_mut().for_each(|v| *v *= lo.scale);
    Ok(xa)
}

/// Backward of [`linear_fwd`]: `dx += dy W` (when given), `dW += dy^T x`,
/// `db += colsum(dy)` (unless the base is frozen); with an adapter also
/// `dB += s dy^T (x A^T)`, `dA += s (dy B)^T x` and `dx += s (dy B) A`.
pub(crate) fn linear_bwd(
    mut dx: Option<&mut [f32]>,
    g: &mut [f32],
    dy: &[f32],
    x: &[f32],
    p: &[f32],
    l: &Linear,
    n: usize,
) -> Result<()> {
    if let Some(dx) = dx.as_deref_mut() {
        cpu::matmul(dx, dy, l.w.of(p), Gemm::new(n, l.out, l.inp).acc())?;
    }
    if let Some(lo) = l.lora.filter(|lo| lo.enabled) {
        let xa = lora_down(x, p, l, &lo, n)?;
        cpu::matmul(lo.b.of_mut(g), dy, &xa, Gemm::new(l.out, n, lo.r).ta().acc())?;
        let mut dxa = vec![0f32; n * lo.r];
        cpu::matmul(&mut dxa, dy, lo.b.of(p), Gemm::new(n, l.out, lo.r))?;
        dxa.iter_mut().for_each(|v| *v *= lo.scale);
        cpu::matmul(lo.a.of_mut(g), &dxa, x, Gemm::new(lo.r, n, l.inp).ta().acc())?;
        if let Some(dx) = dx {
            cpu::matmul(dx, &dxa, lo.a.of(p), Gemm::new(n, lo.r, l.inp).acc())?;
        }
    }
    if l.frozen {
        return Ok(());
    }
    cpu::matmul(l.w.of_mut(g), dy, x, Gemm::new(l.out, n, l.inp).ta().acc())?;
    if let Some(b) = l.b {
        let db = b.of_mut(g);
        for row in dy.chunks(l.out) {
            for (d, &v) in db.iter_mut().zip(row) {
                *d += v;
            }
        }
    }
    Ok(())
}

/// RMSNorm forward over rows of `c` with weight slot `w`; returns (out, rstd).
pub(crate) fn norm_fwd(x: &[f32], p: &[f32], w: Slot, c: usize, eps: f32) -> Result<(Vec<f32>, Vec<f32>)> {
    let _prof = profile::scope(Phase::Norm);
    let rows = x.len() / c.max(1);
    let mut out = vec![0f32; x.len()];
    let mut rstd = vec![0f32; rows];
    cpu::rmsnorm_forward(&mut out, &mut rstd, x, w.of(p), rows, c, eps)?;
    Ok((out, rstd))
}

/// RMSNorm backward: returns dx (assigned), accumulates the weight gradient.
pub(crate) fn norm_bwd(
    dy: &[f32],
    x: &[f32],
    rstd: &[f32],
    p: &[f32],
    g: &mut [f32],
    w: Slot,
    c: usize,
) -> Result<Vec<f32>> {
    let _prof = profile::scope(Phase::Norm);
    let rows = x.len() / c.max(1);
    let mut dx = vec![0f32; x.len()];
    cpu::rmsnorm_backward(&mut dx, w.of_mut(g), dy, x, w.of(p), rstd, rows, c)?;
    Ok(dx)
}
