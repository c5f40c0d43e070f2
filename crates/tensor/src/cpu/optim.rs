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
        super::wide(
            #[inline(always)]
            || {
                for i in 0..p.len() {
                    let gi = g[i];
                    m[i] = b1 * m[i] + ob1 * gi;
                    v[i] = b2 * v[i] + ob2 * gi * gi;
                    p[i] = p[i] * decay - step * m[i] / (v[i].sqrt() * inv_bc2_sqrt + eps);
                }
            },
        )
    };
    params
        .par_chunks_mut(CHUNK)
        .zip(grads.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .for_each(body);
    Ok(())
}

/// AdamW's per-step constants in f32, derived in f64 exactly as the GPU
/// launcher's `AdamwScalars` are (so the host update of an offloaded
/// optimizer and the device kernel compute the same expression).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamwConsts {
    /// `beta1`.
    pub b1: f32,
    /// `beta2`.
    pub b2: f32,
    /// `1 - beta1`.
    pub ob1: f32,
    /// `1 - beta2`.
    pub ob2: f32,
    /// `1 - lr * weight_decay`.
    pub decay: f32,
    /// `lr / (1 - beta1^t)`.
    pub step: f32,
    /// `1 / sqrt(1 - beta2^t)`.
    pub inv_bc2_sqrt: f32,
    /// `eps`.
    pub eps: f32,
}

impl AdamwConsts {
    /// The constants of step `t` (1-based) of `h`.
    pub fn new(h: &AdamW, t: u64) -> Result<AdamwConsts> {
        if t == 0 {
            return Err(Error::InvalidArgument {
                op: "adamw_step_f32",
                msg: "step t is 1-based".into(),
            });
        }
        let ti = t.min(i32::MAX as u64) as i32;
        let bc1 = 1.0 - h.beta1.powi(ti);
        let bc2 = 1.0 - h.beta2.powi(ti);
        Ok(AdamwConsts {
            b1: h.beta1 as f32,
            b2: h.beta2 as f32,
            ob1: (1.0 - h.beta1) as f32,
            ob2: (1.0 - h.beta2) as f32,
            decay: (1.0 - h.lr * h.weight_decay) as f32,
            step: (h.lr / bc1) as f32,
            inv_bc2_sqrt: (1.0 / bc2.sqrt()) as f32,
            eps: h.eps as f32,
        })
    }
}

/// Elements per lane group of [`adamw_step_f32`]'s inner loop (eight f32:
/// one AVX register; the loop over a fixed-size array vectorises).
const LANES: usize = 8;

/// One AdamW step over f32 buffers of equal length, with the gradient first
/// multiplied by `grad_scale` (clipping's coefficient, 1 for none): the
/// host kernel of the offloaded optimizer. Per element, in f32, the
/// expression of the device kernel `adamw_f32` after `scale_f32`:
///
/// ```text
/// g <- grad * grad_scale
/// m <- b1 m + ob1 g ;  v <- b2 v + ob2 g g
/// p <- p decay - step m / (sqrt(v) inv_bc2_sqrt + eps)
/// ```
///
/// Chunks run on rayon's pool; each chunk's loop works on groups of eight
/// lanes so that the compiler emits vector instructions. The reference it
/// is tested against is [`adamw_step`] (with the gradient pre-scaled).
pub fn adamw_step_f32(
    params: &mut [f32],
    grads: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    c: &AdamwConsts,
    grad_scale: f32,
) -> Result<()> {
    let n = params.len();
    check_lens(
        "adamw_step_f32",
        &[("grads", grads.len(), n), ("m", m.len(), n), ("v", v.len(), n)],
    )?;
    let c = *c;
    let one = move |p: &mut f32, g: f32, m: &mut f32, v: &mut f32| {
        let g = g * grad_scale;
        let mi = c.b1 * *m + c.ob1 * g;
        let vi = c.b2 * *v + c.ob2 * g * g;
        *m = mi;
        *v = vi;
        *p = *p * c.decay - c.step * mi / (vi.sqrt() * c.inv_bc2_sqrt + c.eps);
    };
    type Chunks<'a> = (((&'a mut [f32], &'a [f32]), &'a mut [f32]), &'a mut [f32]);
    let body = |(((p, g), m), v): Chunks<'_>| {
        let mut pc = p.chunks_exact_mut(LANES);
        let mut gc = g.chunks_exact(LANES);
        let mut mc = m.chunks_exact_mut(LANES);
        let mut vc = v.chunks_exact_mut(LANES);
        for (((p, g), m), v) in (&mut pc).zip(&mut gc).zip(&mut mc).zip(&mut vc) {
            let (p, g, m, v): (&mut [f32; LANES], &[f32; LANES], &mut [f32; LANES], &mut [f32; LANES]) =
                match (p.try_into(), g.try_into(), m.try_into(), v.try_into()) {
                    (Ok(p), Ok(g), Ok(m), Ok(v)) => (p, g, m, v),
                    _ => continue,
                };
            for i in 0..LANES {
                one(&mut p[i], g[i], &mut m[i], &mut v[i]);
            }
        }
        let tail = pc
            .into_remainder()
            .iter_mut()
            .zip(gc.remainder())
            .zip(mc.into_remainder().iter_mut().zip(vc.into_remainder().iter_mut()));
        for ((p, &g), (m, v)) in tail {
            one(p, g, m, v);
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

/// The L2 norm of the whole buffer, accumulated in f64 (eight lanes per
/// chunk, so the squares vectorize instead of forming one long chain).
pub fn global_norm<F: Real>(grads: &[F]) -> f64 {
    grads
        .par_chunks(CHUNK)
        .map(|c| {
            super::wide(
                #[inline(always)]
                || {
                    let mut lanes = [0f64; 8];
                    let ch = c.chunks_exact(8);
                    let rest = ch.remainder();
                    for x in ch {
                        for (l, &g) in lanes.iter_mut().zip(x) {
                            *l += g.to_f64() * g.to_f64();
                        }
                    }
                    lanes.iter().sum::<f64>() + rest.iter().map(|&g| g.to_f64() * g.to_f64()).sum::<f64>()
                },
            )
        })
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
