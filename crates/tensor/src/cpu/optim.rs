//! AdamW over one flat parameter buffer, and global gradient-norm clipping.

use rayon::prelude::*;

use crate::error::{check_lens, Error, Result};
use crate::Real;

const CHUNK: usize = 1 << 15;

/// AdamW hyper-parameters (PyTorch's `torch.optim.AdamW` semantics).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay (PyTorch default 0.9).
    pub beta1: f64,
    /// Second-moment decay (PyTorch default 0.999).
    pub beta2: f64,
    /// Added to the denominator (PyTorch default 1e-8).
    pub eps: f64,
    /// Decoupled weight decay (PyTorch's AdamW default 0.01).
    pub weight_decay: f64,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// One AdamW step `t` (1-based) over flat buffers of equal length:
///
/// ```text
/// p <- p - lr * wd * p                    (decoupled weight decay)
/// m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
/// p <- p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
/// ```
pub fn adamw_step<F: Real>(params: &mut [F], grads: &[F], m: &mut [F], v: &mut [F], h: &AdamW, t: u64) -> Result<()> {
    let n = params.len();
    check_lens(
        "adamw_step",
        &[("grads", grads.len(), n), ("m", m.len(), n), ("v", v.len(), n)],
    )?;
    if t == 0 {
        return Err(Error::InvalidArgument {
            op: "adamw_step",
            msg: "step t is 1-based".into(),
        });
    }
    let bc1 = 1.0 - h.beta1.powi(t.min(i32::MAX as u64) as i32);
    let bc2 = 1.0 - h.beta2.powi(t.min(i32::MAX as u64) as i32);
    let (b1, b2) = (F::from_f64(h.beta1), F::from_f64(h.beta2));
    let (ob1, ob2) = (F::from_f64(1.0 - h.beta1), F::from_f64(1.0 - h.beta2));
    let decay = F::from_f64(1.0 - h.lr * h.weight_decay);
    let step = F::from_f64(h.lr / bc1);
    let inv_bc2_sqrt = F::from_f64(1.0 / bc2.sqrt());
    let eps = F::from_f64(h.eps);
    type Chunks<'a, F> = (((&'a mut [F], &'a [F]), &'a mut [F]), &'a mut [F]);
    let body = |(((p, g), m), v): Chunks<'_, F>| {
        for i in 0..p.len() {
            let gi = g[i];
            m[i] = b1 * m[i] + ob1 * gi;
            v[i] = b2 * v[i] + ob2 * gi * gi;
            p[i] = p[i] * decay - step * m[i] / (v[i].sqrt() * inv_bc2_sqrt + eps);
        }
    };
    params
        .par_chunks_mut(CHUNK)
        .zip(grads.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .for_each(body);
    Ok(())
}

/// The L2 norm of the whole buffer, accumulated in f64.
pub fn global_norm<F: Real>(grads: &[F]) -> f64 {
    grads
        .par_chunks(CHUNK)
        .map(|c| c.iter().map(|&g| g.to_f64() * g.to_f64()).sum::<f64>())
        .sum::<f64>()
        .sqrt()
}

/// Scales `grads` so that their global norm is at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_` does (coefficient `max_norm / (norm + 1e-6)`,
/// applied only when below 1). Returns the norm before clipping; a non-finite
/// norm is returned as is and the gradients are left untouched, so the
/// caller can skip the step.
pub fn clip_grad_norm<F: Real>(grads: &mut [F], max_norm: f64) -> f64 {
    let norm = global_norm(grads);
    if !norm.is_finite() {
        return norm;
    }
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        let s = F::from_f64(coef);
        grads
            .par_chunks_mut(CHUNK)
            .for_each(|c| c.iter_mut().for_each(|g| *g *= s));
    }
    norm
}
