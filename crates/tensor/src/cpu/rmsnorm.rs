//! RMSNorm over the last dimension.
//!
//! | name | shape |
//! |---|---|
//! | inp, out, dinp, dout | [N, C] |
//! | weight, dweight | [C] |
//! | rstd | [N], saved by the forward: 1 / sqrt(mean(x^2) + eps) |

use rayon::prelude::*;

use super::rows_per_task;
use crate::error::{check_lens, Error, Result};
use crate::Real;

/// `out = x * rstd * weight`, row by row, saving `rstd`.
pub fn rmsnorm_forward<F: Real>(
    out: &mut [F],
    rstd: &mut [F],
    inp: &[F],
    weight: &[F],
    rows: usize,
    c: usize,
    eps: F,
) -> Result<()> {
    check_lens(
        "rmsnorm_forward",
        &[
            ("out", out.len(), rows * c),
            ("rstd", rstd.len(), rows),
            ("inp", inp.len(), rows * c),
            ("weight", weight.len(), c),
        ],
    )?;
    if eps.is_sign_negative() || !eps.is_finite() {
        return Err(Error::InvalidArgument {
            op: "rmsnorm_forward",
            msg: format!("eps must be finite and >= 0, got {eps:?}"),
        });
    }
    if c == 0 {
        return Ok(());
    }
    let cf = F::from_f64(c as f64);
    let per = rows_per_task(c);
    let chunk = |(y, s): (&mut [F], &mut [F]), x: &[F]| {
        super::wide(
            #[inline(always)]
            || {
                for ((y, s), x) in y.chunks_mut(c).zip(s.iter_mut()).zip(x.chunks(c)) {
                    let ss = super::sum_sq_lanes(x);
                    *s = F::one() / (ss / cf + eps).sqrt();
                    for ((o, &v), &w) in y.iter_mut().zip(x).zip(weight) {
                        *o = v * *s * w;
                    }
                }
            },
        )
    };
    if rows > per {
        out.par_chunks_mut(per * c)
            .zip(rstd.par_chunks_mut(per))
            .zip(inp.par_chunks(per * c))
            .for_each(|(ys, x)| chunk(ys, x));
    } else {
        chunk((out, rstd), inp);
    }
    Ok(())
}

/// Backward of [`rmsnorm_forward`]: `dinp = ...` (assign), `dweight += ...`.
pub fn rmsnorm_backward<F: Real>(
    dinp: &mut [F],
    dweight: &mut [F],
    dout: &[F],
    inp: &[F],
    weight: &[F],
    rstd: &[F],
    rows: usize,
    c: usize,
) -> Result<()> {
    check_lens(
        "rmsnorm_backward",
        &[
            ("dinp", dinp.len(), rows * c),
            ("dweight", dweight.len(), c),
            ("dout", dout.len(), rows * c),
            ("inp", inp.len(), rows * c),
            ("weight", weight.len(), c),
            ("rstd", rstd.len(), rows),
        ],
    )?;
    if c == 0 || rows == 0 {
        return Ok(());
    }
    let cf = F::from_f64(c as f64);
    let per = rows_per_task(c);
    let chunk = |(i, dchunk): (usize, &mut [F])| -> Vec<F> {
        let mut dw = vec![F::zero(); c];
        super::wide(
            #[inline(always)]
            || rows_backward(&mut dw, dchunk, i * per, inp, dout, weight, rstd, c, cf),
        );
        dw
    };
    let partials: Vec<Vec<F>> = if rows > per {
        dinp.par_chunks_mut(per * c).enumerate().map(chunk).collect()
    } else {
        dinp.chunks_mut(per * c).enumerate().map(chunk).collect()
    };
    for p in partials {
        for (d, v) in dweight.iter_mut().zip(p) {
            *d += v;
        }
    }
    Ok(())
}

/// [`rmsnorm_backward`] over the rows `r0..` of `dchunk`, adding the weight
/// gradient to `dw`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn rows_backward<F: Real>(
    dw: &mut [F],
    dchunk: &mut [F],
    r0: usize,
    inp: &[F],
    dout: &[F],
    weight: &[F],
    rstd: &[F],
    c: usize,
    cf: F,
) {
    for (j, dx) in dchunk.chunks_mut(c).enumerate() {
        let r = r0 + j;
        let x = &inp[r * c..(r + 1) * c];
        let g = &dout[r * c..(r + 1) * c];
        let s = rstd[r];
        // dot = mean_j (g_j w_j xhat_j)
        let mut lanes = [F::zero(); 8];
        let (gc, wc, xc) = (g.chunks_exact(8), weight.chunks_exact(8), x.chunks_exact(8));
        let tail = gc.remainder().len();
        for ((gg, ww), xx) in gc.zip(wc).zip(xc) {
            for i in 0..8 {
                lanes[i] += gg[i] * ww[i] * xx[i] * s;
            }
        }
        let mut dot = lanes.iter().fold(F::zero(), |a, &b| a + b);
        for k in c - tail..c {
            dot += g[k] * weight[k] * x[k] * s;
        }
        dot /= cf;
        for ((((d, &xk), &gk), &wk), dwk) in dx.iter_mut().zip(x).zip(g).zip(weight).zip(dw.iter_mut()) {
            let xhat = xk * s;
            *d = s * (gk * wk - xhat * dot);
            *dwk += gk * xhat;
        }
    }
}
