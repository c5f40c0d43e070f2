//! The log-probability of a chosen token under softmax(logits), without
//! materialising the log-softmax.
//!
//! | name | shape |
//! |---|---|
//! | logits, dlogits | [N, V] |
//! | targets | [N], each < V |
//! | logp, dlogp, lse | [N] |

use rayon::prelude::*;

use super::rows_per_task;
use crate::error::{check_lens, Result};
use crate::Real;

/// `logp[n] = logits[n, targets[n]] - lse[n]`, saving `lse[n] = logsumexp(logits[n])`.
pub fn token_logprob_forward<F: Real>(
    logp: &mut [F],
    lse: &mut [F],
    logits: &[F],
    targets: &[u32],
    v: usize,
) -> Result<()> {
    let n = targets.len();
    check_lens(
        "token_logprob_forward",
        &[
            ("logp", logp.len(), n),
            ("lse", lse.len(), n),
            ("logits", logits.len(), n * v),
        ],
    )?;
    super::check_indices("token_logprob_forward", targets, v)?;
    let row = |(i, (lp, ls)): (usize, (&mut F, &mut F))| {
        let x = &logits[i * v..(i + 1) * v];
        let (m, s) = super::wide(
            #[inline(always)]
            || {
                let m = super::row_max(x);
                (m, super::sum_exp_shifted(x, m))
            },
        );
        *ls = m + s.ln();
        *lp = super::softmax::nonpositive(x[targets[i] as usize] - *ls);
    };
    if n * v >= 1 << 16 {
        logp.par_iter_mut()
            .zip(lse.par_iter_mut())
            .enumerate()
            .with_min_len(rows_per_task(v))
            .for_each(row);
    } else {
        logp.iter_mut().zip(lse.iter_mut()).enumerate().for_each(row);
    }
    Ok(())
}

/// Backward of [`token_logprob_forward`] (`dlogits =`): `dlogp * (onehot - softmax)`.
pub fn token_logprob_backward<F: Real>(
    dlogits: &mut [F],
    dlogp: &[F],
    logits: &[F],
    lse: &[F],
    targets: &[u32],
    v: usize,
) -> Result<()> {
    let n = targets.len();
    check_lens(
        "token_logprob_backward",
        &[
            ("dlogits", dlogits.len(), n * v),
            ("dlogp", dlogp.len(), n),
            ("logits", logits.len(), n * v),
            ("lse", lse.len(), n),
        ],
    )?;
    super::check_indices("token_logprob_backward", targets, v)?;
    super::for_rows(dlogits, v, |i, d| {
        let x = &logits[i * v..(i + 1) * v];
        let g = dlogp[i];
        for (dj, &z) in d.iter_mut().zip(x) {
            *dj = -g * (z - lse[i]).exp_fast();
        }
        d[targets[i] as usize] += g;
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nan_logits_give_nan_log_probs_not_zero() {
        let logits = [1.0f32, f32::NAN, 0.5, 0.1, 0.2, 0.3];
        let (mut logp, mut lse) = ([0f32; 2], [0f32; 2]);
        token_logprob_forward(&mut logp, &mut lse, &logits, &[0, 2], 3).unwrap();
        assert!(logp[0].is_nan(), "{logp:?}");
        assert!(logp[1].is_finite() && logp[1] < 0.0, "{logp:?}");
        let mut out = [0f32; 6];
        crate::cpu::log_softmax_forward(&mut out, &logits, 2, 3).unwrap();
        assert!(out[..3].iter().all(|x| x.is_nan()), "{out:?}");
        assert!(out[3..].iter().all(|x| x.is_finite()), "{out:?}");
    }
}
