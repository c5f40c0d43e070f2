//! Linear layers and norms over slots of the flat parameter buffer.
//!
//! `y[N, out] = x[N, in] W^T + b` with `W [out, in]` (PyTorch's layout).

use aha_tensor::cpu::{self, Gemm};
use aha_tensor::profile::{self, Phase};

use crate::error::Result;
use crate::lora::{apply_dropout, dropout_mask, LoraSlots};
use crate::params::{Linear, Slot};

/// `y = x W^T (+ b) (+ s (d(x) A^T) B^T)` with `d` the adapter's dropout
/// (the identity outside training forwards); `y` is overwritten.
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
        let xd = apply_dropout(x, &lo, n, l.inp);
        let xa = lora_down(&xd, p, l, &lo, n)?;
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
/// `dB += s dy^T (xd A^T)`, `dA += s (dy B)^T xd` and `dx += m * (s (dy
/// B) A)`, with `xd = m * x` and `m` the dropout's scaled mask (all ones
/// without dropout).
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
        let xd = apply_dropout(x, &lo, n, l.inp);
        let xa = lora_down(&xd, p, l, &lo, n)?;
        cpu::matmul(lo.b.of_mut(g), dy, &xa, Gemm::new(l.out, n, lo.r).ta().acc())?;
        let mut dxa = vec![0f32; n * lo.r];
        cpu::matmul(&mut dxa, dy, lo.b.of(p), Gemm::new(n, l.out, lo.r))?;
        dxa.iter_mut().for_each(|v| *v *= lo.scale);
        cpu::matmul(lo.a.of_mut(g), &dxa, &xd, Gemm::new(lo.r, n, l.inp).ta().acc())?;
        if let Some(dx) = dx {
            match lo.dropout {
                None => cpu::matmul(dx, &dxa, lo.a.of(p), Gemm::new(n, lo.r, l.inp).acc())?,
                Some(d) => {
                    let mut dxd = vec![0f32; n * l.inp];
                    cpu::matmul(&mut dxd, &dxa, lo.a.of(p), Gemm::new(n, lo.r, l.inp))?;
                    let m = dropout_mask(d, lo.a.off, n, l.inp);
                    for ((o, v), k) in dx.iter_mut().zip(&dxd).zip(&m) {
                        *o += v * k;
                    }
                }
            }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::lora::LoraDropout;

    /// LoRA dropout against the formulas written out with the explicit
    /// mask `m`: `y = x W^T + s ((m x) A^T) B^T`, `dB = s dy^T ((m x)
    /// A^T)`, `dA = s (dy B)^T (m x)`, `dx = dy W + m (s (dy B) A)`.
    #[test]
    fn lora_dropout_follows_the_explicit_mask() {
        let (n, inp, out, r) = (5, 7, 3, 2);
        let scale = 1.5f32;
        let w = Slot { off: 0, len: out * inp };
        let a = Slot {
            off: w.len,
            len: r * inp,
        };
        let bs = Slot {
            off: a.off + a.len,
            len: out * r,
        };
        let p: Vec<f32> = (0..bs.off + bs.len)
            .map(|i| ((i * 37 % 17) as f32 - 8.0) * 0.05)
            .collect();
        let x: Vec<f32> = (0..n * inp).map(|i| ((i * 13 % 11) as f32 - 5.0) * 0.1).collect();
        let dy: Vec<f32> = (0..n * out).map(|i| ((i * 7 % 5) as f32 - 2.0) * 0.3).collect();
        let d = LoraDropout { p: 0.4, seed: 9 };
        let l = Linear {
            w,
            b: None,
            inp,
            out,
            lora: Some(LoraSlots {
                a,
                b: bs,
                r,
                scale,
                enabled: true,
                dropout: Some(d),
            }),
            frozen: true,
        };
        let m = crate::lora::dropout_mask(d, a.off, n, inp);
        let keep = 1.0 / (1.0 - d.p);
        assert!(m.iter().all(|&v| v == 0.0 || v == keep));
        assert!(m.contains(&0.0) && m.contains(&keep));
        let xm: Vec<f32> = x.iter().zip(&m).map(|(a, b)| a * b).collect();
        let (wv, av, bv) = (w.of(&p), a.of(&p), bs.of(&p));
        // xa = s (m x) A^T [n, r]
        let xa: Vec<f32> = (0..n * r)
            .map(|i| scale * (0..inp).map(|k| xm[i / r * inp + k] * av[i % r * inp + k]).sum::<f32>())
            .collect();
        let y_ref: Vec<f32> = (0..n * out)
            .map(|i| {
                let (row, o) = (i / out, i % out);
                (0..inp).map(|k| x[row * inp + k] * wv[o * inp + k]).sum::<f32>()
                    + (0..r).map(|j| xa[row * r + j] * bv[o * r + j]).sum::<f32>()
            })
            .collect();
        let mut y = vec![0f32; n * out];
        linear_fwd(&mut y, &x, &p, &l, n).unwrap();
        let close = |a: &[f32], b: &[f32], what: &str| {
            for (i, (u, v)) in a.iter().zip(b).enumerate() {
                assert!((u - v).abs() <= 1e-5 * (1.0 + v.abs()), "{what}[{i}]: {u} vs {v}");
            }
        };
        close(&y, &y_ref, "y");
        // dxa = s dy B [n, r]
        let dxa: Vec<f32> = (0..n * r)
            .map(|i| scale * (0..out).map(|o| dy[i / r * out + o] * bv[o * r + i % r]).sum::<f32>())
            .collect();
        let db_ref: Vec<f32> = (0..out * r)
            .map(|i| {
                (0..n)
                    .map(|row| dy[row * out + i / r] * xa[row * r + i % r])
                    .sum::<f32>()
            })
            .collect();
        let da_ref: Vec<f32> = (0..r * inp)
            .map(|i| {
                (0..n)
                    .map(|row| dxa[row * r + i / inp] * xm[row * inp + i % inp])
                    .sum::<f32>()
            })
            .collect();
        let dx_ref: Vec<f32> = (0..n * inp)
            .map(|i| {
                let (row, k) = (i / inp, i % inp);
                (0..out).map(|o| dy[row * out + o] * wv[o * inp + k]).sum::<f32>()
                    + m[i] * (0..r).map(|j| dxa[row * r + j] * av[j * inp + k]).sum::<f32>()
            })
            .collect();
        let mut g = vec![0f32; p.len()];
        let mut dx = vec![0f32; n * inp];
        linear_bwd(Some(&mut dx), &mut g, &dy, &x, &p, &l, n).unwrap();
        close(bs.of(&g), &db_ref, "dB");
        close(a.of(&g), &da_ref, "dA");
        close(&dx, &dx_ref, "dx");
        assert!(w.of(&g).iter().all(|&v| v == 0.0), "a frozen weight got a gradient");
    }
}
