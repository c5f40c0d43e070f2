//! Softmax and log-softmax over the rows of an [N, C] buffer.

use super::{for_rows, row_max};
use crate::error::{check_lens, Result};
use crate::Real;

/// `out[r] = softmax(inp[r])`; a row of all -inf gives all zeros.
pub fn softmax_forward<F: Real>(out: &mut [F], inp: &[F], rows: usize, c: usize) -> Result<()> {
    check_lens(
        "softmax_forward",
        &[("out", out.len(), rows * c), ("inp", inp.len(), rows * c)],
    )?;
    for_rows(out, c, |r, y| {
        let x = &inp[r * c..(r + 1) * c];
        let m = row_max(x);
        if m == F::neg_infinity() {
            y.fill(F::zero());
            return;
        }
        for (o, &v) in y.iter_mut().zip(x) {
            *o = (v - m).exp_fast();
        }
        let sum = super::sum_lanes(y);
        let inv = F::one() / sum;
        for o in y.iter_mut() {
            *o *= inv;
        }
    });
    Ok(())
}

/// Backward of [`softmax_forward`] from its output: `dinp = p * (dout - sum(dout * p))`.
pub fn softmax_backward<F: Real>(dinp: &mut [F], dout: &[F], out: &[F], rows: usize, c: usize) -> Result<()> {
    check_lens(
        "softmax_backward",
        &[
            ("dinp", dinp.len(), rows * c),
            ("dout", dout.len(), rows * c),
            ("out", out.len(), rows * c),
        ],
    )?;
    for_rows(dinp, c, |r, dx| {
        let (g, p) = (&dout[r * c..(r + 1) * c], &out[r * c..(r + 1) * c]);
        let dot: F = g.iter().zip(p).map(|(&a, &b)| a * b).sum();
        for ((d, &gi), &pi) in dx.iter_mut().zip(g).zip(p) {
            *d = pi * (gi - dot);
        }
    });
    Ok(())
}

/// `out[r] = x - logsumexp(x)`: every value is <= 0.
pub fn log_softmax_forward<F: Real>(out: &mut [F], inp: &[F], rows: usize, c: usize) -> Result<()> {
    check_lens(
        "log_softmax_forward",
        &[("out", out.len(), rows * c), ("inp", inp.len(), rows * c)],
    )?;
    for_rows(out, c, |r, y| {
        let x = &inp[r * c..(r + 1) * c];
        let m = row_max(x);
        for (o, &v) in y.iter_mut().zip(x) {
            *o = (v - m).exp_fast();
        }
        let lse = m + super::sum_lanes(y).ln();
        for (o, &v) in y.iter_mut().zip(x) {
            *o = nonpositive(v - lse);
        }
    });
    Ok(())
}

/// Backward of [`log_softmax_forward`] from its output: `dinp = dout - exp(out) * sum(dout)`.
pub fn log_softmax_backward<F: Real>(dinp: &mut [F], dout: &[F], out: &[F], rows: usize, c: usize) -> Result<()> {
    check_lens(
        "log_softmax_backward",
        &[
            ("dinp", dinp.len(), rows * c),
            ("dout", dout.len(), rows * c),
            ("out", out.len(), rows * c),
        ],
    )?;
    for_rows(dinp, c, |r, dx| {
        let (g, lp) = (&dout[r * c..(r + 1) * c], &out[r * c..(r + 1) * c]);
        let sum: F = g.iter().copied().sum();
        for ((d, &gi), &l) in dx.iter_mut().zip(g).zip(lp) {
            *d = gi - l.exp() * sum;
        }
    });
    Ok(())
}

/// `min(x, 0)` for a log-probability that rounding pushed above zero, but
/// NaN stays NaN (`f32::min` would turn a NaN log-prob into 0 and hide a
/// broken model from the non-finite guards downstream).
#[inline]
pub(crate) fn nonpositive<F: Real>(x: F) -> F {
    if x > F::zero() {
        F::zero()
    } else {
        x
    }
}
