//! The lm head's token log-probabilities and entropies straight from hidden
//! states, one vocabulary chunk at a time, and their backward: logits for
//! the whole vocabulary never exist, only `[N, chunk]` of them. CPU twin of
//! the GPU path `aha_cuda_kernels::lmhead` (kernels/lmhead.cu), with the same
//! chunking and the same merge rule.
//!
//! | name | shape |
//! |---|---|
//! | hidden, dhidden | [N, C] |
//! | weight, dweight | [V, C] (a linear layer's layout) |
//! | targets | [N], each < V |
//! | logp, entropy, lse, dlogp, dentropy | [N] |
//!
//! With `x = hidden weightᵀ / temperature`: `lse = logsumexp(x)`,
//! `logp = x[target] - lse` (at most 0; NaN stays NaN), `entropy = lse - Σ p x`.
//! A row's running state over the chunks is `(m, s, u, xt)`: the max so far,
//! `Σ exp(x - m)`, `Σ exp(x - m) x`, and the target's `x`.

use rayon::prelude::*;

use super::{matmul, rows_per_task, Gemm};
use crate::error::{check_lens, Error, Result};
use crate::Real;

/// Sizes of one lm-head log-prob computation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LmHeadShape {
    /// Rows (tokens).
    pub n: usize,
    /// Hidden size.
    pub c: usize,
    /// Vocabulary size.
    pub v: usize,
    /// Vocabulary rows per chunk (the last chunk may be shorter).
    pub chunk: usize,
    /// Logits are divided by this before the softmax (TRL divides by the
    /// sampling temperature); must be finite and > 0.
    pub temperature: f32,
}

impl LmHeadShape {
    fn check(&self, op: &'static str) -> Result<()> {
        if self.chunk == 0 {
            return Err(Error::InvalidArgument {
                op,
                msg: "chunk must be at least 1".into(),
            });
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(Error::InvalidArgument {
                op,
                msg: format!("temperature must be finite and > 0, got {}", self.temperature),
            });
        }
        Ok(())
    }

    /// The chunks `(v0, vc)` in order.
    pub fn chunks(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.v)
            .step_by(self.chunk.max(1))
            .map(|v0| (v0, self.chunk.min(self.v - v0)))
    }
}

/// `logits [N, vc] = hidden · weight[v0 .. v0 + vc]ᵀ`.
fn chunk_logits<F: Real>(
    out: &mut [F],
    hidden: &[F],
    weight: &[F],
    s: &LmHeadShape,
    v0: usize,
    vc: usize,
) -> Result<()> {
    matmul(
        &mut out[..s.n * vc],
        hidden,
        &weight[v0 * s.c..(v0 + vc) * s.c],
        Gemm {
            m: s.n,
            k: s.c,
            n: vc,
            trans_a: false,
            trans_b: true,
            accumulate: false,
        },
    )
}

/// One row of one chunk, tempered in place: its max, `Σ exp(x - m)` and
/// `Σ exp(x - m) x`, summed in eight f64 lanes (a left fold of 150k f32
/// terms loses ~3 digits; the lanes keep the loop vectorized).
#[inline(always)]
fn row_stats<F: Real>(x: &mut [F], inv_t: F) -> (F, F, F) {
    for xj in x.iter_mut() {
        *xj *= inv_t;
    }
    let mc = super::row_max(x);
    let (mut sa, mut sb) = ([0f64; 8], [0f64; 8]);
    // The exponentials of a block first (a plain map, which vectorizes),
    // then the lane sums: the same terms in the same lanes and order as one
    // loop doing both, which the compiler left scalar.
    let mut e = [F::zero(); 64];
    let blocks = x.chunks_exact(64);
    let rest = blocks.remainder();
    for xb in blocks {
        for (o, &v) in e.iter_mut().zip(xb) {
            *o = (v - mc).exp_fast();
        }
        for (ec, ch) in e.chunks_exact(8).zip(xb.chunks_exact(8)) {
            for i in 0..8 {
                sa[i] += ec[i].to_f64();
                sb[i] += (ec[i] * ch[i]).to_f64();
            }
        }
    }
    let chunks = rest.chunks_exact(8);
    let rest = chunks.remainder();
    for ch in chunks {
        for i in 0..8 {
            let e = (ch[i] - mc).exp_fast();
            sa[i] += e.to_f64();
            sb[i] += (e * ch[i]).to_f64();
        }
    }
    let (mut a, mut b) = (sa.iter().sum::<f64>(), sb.iter().sum::<f64>());
    for &xj in rest {
        let e = (xj - mc).exp_fast();
        a += e.to_f64();
        b += (e * xj).to_f64();
    }
    (mc, F::from_f64(a), F::from_f64(b))
}

/// Log-probs of `targets`, entropies and log-sum-exps of the tempered
/// softmax over `hidden weightᵀ`, chunk by chunk.
#[allow(clippy::too_many_arguments)]
pub fn lm_head_logprob_forward<F: Real>(
    logp: &mut [F],
    entropy: &mut [F],
    lse: &mut [F],
    hidden: &[F],
    weight: &[F],
    targets: &[u32],
    s: LmHeadShape,
) -> Result<()> {
    forward_impl(logp, entropy, lse, None, hidden, weight, targets, s)
}

/// [`lm_head_logprob_forward`] that also keeps the tempered logits in
/// `kept [V * N]`, chunk after chunk (chunk `(v0, vc)` is the `[N, vc]`
/// block at `N * v0`), for [`lm_head_logprob_backward_kept`]: the backward
/// then reads them instead of recomputing the product.
#[allow(clippy::too_many_arguments)]
pub fn lm_head_logprob_forward_keep<F: Real>(
    logp: &mut [F],
    entropy: &mut [F],
    lse: &mut [F],
    kept: &mut [F],
    hidden: &[F],
    weight: &[F],
    targets: &[u32],
    s: LmHeadShape,
) -> Result<()> {
    check_lens("lm_head_logprob_forward_keep", &[("kept", kept.len(), s.n * s.v)])?;
    forward_impl(logp, entropy, lse, Some(kept), hidden, weight, targets, s)
}

#[allow(clippy::too_many_arguments)]
fn forward_impl<F: Real>(
    logp: &mut [F],
    entropy: &mut [F],
    lse: &mut [F],
    mut kept: Option<&mut [F]>,
    hidden: &[F],
    weight: &[F],
    targets: &[u32],
    s: LmHeadShape,
) -> Result<()> {
    const OP: &str = "lm_head_logprob_forward";
    s.check(OP)?;
    let n = s.n;
    check_lens(
        OP,
        &[
            ("logp", logp.len(), n),
            ("entropy", entropy.len(), n),
            ("lse", lse.len(), n),
            ("hidden", hidden.len(), n * s.c),
            ("weight", weight.len(), s.v * s.c),
            ("targets", targets.len(), n),
        ],
    )?;
    super::check_indices(OP, &targets[..n], s.v)?;
    let inv_t = F::from_f64(1.0 / s.temperature as f64);
    let mut state = vec![(F::zero(), F::zero(), F::zero(), F::zero()); n];
    let mut own = if kept.is_some() {
        vec![]
    } else {
        vec![F::zero(); n * s.chunk.min(s.v)]
    };
    for (ci, (v0, vc)) in s.chunks().enumerate() {
        let buf = match kept.as_deref_mut() {
            Some(k) => &mut k[n * v0..n * (v0 + vc)],
            None => &mut own[..n * vc],
        };
        chunk_logits(buf, hidden, weight, &s, v0, vc)?;
        let first = ci == 0;
        let rows = buf.par_chunks_mut(vc).zip(state.par_iter_mut()).enumerate();
        rows.with_min_len(rows_per_task(vc)).for_each(|(r, (x, st))| {
            let (mc, sa, sb) = super::wide(
                #[inline(always)]
                || row_stats(x, inv_t),
            );
            let t = targets[r] as usize;
            let has_t = (v0..v0 + vc).contains(&t);
            let xt = if has_t { x[t - v0] } else { F::zero() };
            if first {
                *st = (mc, sa, sb, xt);
            } else {
                let mn = if mc > st.0 || mc.is_nan() { mc } else { st.0 };
                let (co, cc) = ((st.0 - mn).exp_fast(), (mc - mn).exp_fast());
                *st = (
                    mn,
                    st.1 * co + sa * cc,
                    st.2 * co + sb * cc,
                    if has_t { xt } else { st.3 },
                );
            }
        });
    }
    for (r, &(m, sa, sb, xt)) in state.iter().enumerate() {
        let l = m + sa.ln();
        lse[r] = l;
        logp[r] = super::softmax::nonpositive(xt - l);
        entropy[r] = l - sb / sa;
    }
    Ok(())
}

/// Backward of [`lm_head_logprob_forward`] from `dlogp` and `dentropy`:
/// accumulates `dhidden +=` and `dweight +=`, recomputing each chunk's
/// logits from `lse` and `entropy` (the forward's outputs).
#[allow(clippy::too_many_arguments)]
pub fn lm_head_logprob_backward<F: Real>(
    dhidden: &mut [F],
    dweight: &mut [F],
    hidden: &[F],
    weight: &[F],
    targets: &[u32],
    lse: &[F],
    entropy: &[F],
    dlogp: &[F],
    dentropy: &[F],
    s: LmHeadShape,
) -> Result<()> {
    backward_impl(
        dhidden, dweight, hidden, weight, None, targets, lse, entropy, dlogp, dentropy, s,
    )
}

/// [`lm_head_logprob_backward`] over the tempered logits that
/// [`lm_head_logprob_forward_keep`] kept: no product recomputes them, and
/// each chunk's gradient is written over its logits in `kept` (no second
/// `[N, V]` buffer), so `kept` holds the logits' gradient afterwards.
#[allow(clippy::too_many_arguments)]
pub fn lm_head_logprob_backward_kept<F: Real>(
    dhidden: &mut [F],
    dweight: &mut [F],
    hidden: &[F],
    weight: &[F],
    kept: &mut [F],
    targets: &[u32],
    lse: &[F],
    entropy: &[F],
    dlogp: &[F],
    dentropy: &[F],
    s: LmHeadShape,
) -> Result<()> {
    check_lens("lm_head_logprob_backward_kept", &[("kept", kept.len(), s.n * s.v)])?;
    backward_impl(
        dhidden,
        dweight,
        hidden,
        weight,
        Some(kept),
        targets,
        lse,
        entropy,
        dlogp,
        dentropy,
        s,
    )
}

#[allow(clippy::too_many_arguments)]
fn backward_impl<F: Real>(
    dhidden: &mut [F],
    dweight: &mut [F],
    hidden: &[F],
    weight: &[F],
    mut kept: Option<&mut [F]>,
    targets: &[u32],
    lse: &[F],
    entropy: &[F],
    dlogp: &[F],
    dentropy: &[F],
    s: LmHeadShape,
) -> Result<()> {
    const OP: &str = "lm_head_logprob_backward";
    s.check(OP)?;
    let (n, c) = (s.n, s.c);
    check_lens(
        OP,
        &[
            ("dhidden", dhidden.len(), n * c),
            ("dweight", dweight.len(), s.v * c),
            ("hidden", hidden.len(), n * c),
            ("weight", weight.len(), s.v * c),
            ("targets", targets.len(), n),
            ("lse", lse.len(), n),
            ("entropy", entropy.len(), n),
            ("dlogp", dlogp.len(), n),
            ("dentropy", dentropy.len(), n),
        ],
    )?;
    super::check_indices(OP, &targets[..n], s.v)?;
    let inv_t = F::from_f64(1.0 / s.temperature as f64);
    // Kept logits are tempered already and their chunks become the
    // gradient in place; recomputed ones go through `own` the same way.
    let pre = if kept.is_some() { F::one() } else { inv_t };
    let mut own = if kept.is_some() {
        vec![]
    } else {
        vec![F::zero(); n * s.chunk.min(s.v)]
    };
    for (v0, vc) in s.chunks() {
        let buf: &mut [F] = match kept.as_deref_mut() {
            Some(k) => &mut k[n * v0..n * (v0 + vc)],
            None => {
                chunk_logits(&mut own, hidden, weight, &s, v0, vc)?;
                &mut own[..n * vc]
            }
        };
        let rows = buf.par_chunks_mut(vc).enumerate();
        rows.with_min_len(rows_per_task(vc)).for_each(|(r, g)| {
            let (l, dl, de) = (lse[r], dlogp[r], dentropy[r]);
            let mean = l - entropy[r];
            super::wide(
                #[inline(always)]
                || {
                    for gj in g.iter_mut() {
                        let x = *gj * pre;
                        let p = (x - l).exp_fast();
                        *gj = (-dl * p - de * p * (x - mean)) * inv_t;
                    }
                },
            );
            let t = targets[r] as usize;
            if (v0..v0 + vc).contains(&t) {
                g[t - v0] += dl * inv_t;
            }
        });
        let g: &[F] = buf;
        // dhidden [N, C] += g [N, vc] · W_chunk [vc, C]
        matmul(
            &mut dhidden[..n * c],
            g,
            &weight[v0 * c..(v0 + vc) * c],
            Gemm {
                m: n,
                k: vc,
                n: c,
                trans_a: false,
                trans_b: false,
                accumulate: true,
            },
        )?;
        // dW_chunk [vc, C] += gᵀ [vc, N] · hidden [N, C]
        matmul(
            &mut dweight[v0 * c..(v0 + vc) * c],
            g,
            &hidden[..n * c],
            Gemm {
                m: vc,
                k: n,
                n: c,
                trans_a: true,
                trans_b: false,
                accumulate: true,
            },
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: u64, n: usize, scale: f64) -> Vec<f64> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    /// The definition on full logits, in f64.
    fn reference(
        h: &[f64],
        w: &[f64],
        t: &[u32],
        s: &LmHeadShape,
        dl: &[f64],
        de: &[f64],
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let (n, c, v) = (s.n, s.c, s.v);
        let tau = s.temperature as f64;
        let (mut lp, mut ent, mut dh, mut dw) = (vec![0.0; n], vec![0.0; n], vec![0.0; n * c], vec![0.0; v * c]);
        for r in 0..n {
            let x: Vec<f64> = (0..v)
                .map(|j| (0..c).map(|k| h[r * c + k] * w[j * c + k]).sum::<f64>() / tau)
                .collect();
            let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let l = m + x.iter().map(|&xj| (xj - m).exp()).sum::<f64>().ln();
            let p: Vec<f64> = x.iter().map(|&xj| (xj - l).exp()).collect();
            lp[r] = x[t[r] as usize] - l;
            ent[r] = -p
                .iter()
                .map(|&pj| if pj > 0.0 { pj * pj.ln() } else { 0.0 })
                .sum::<f64>();
            let mu: f64 = p.iter().zip(&x).map(|(a, b)| a * b).sum();
            for j in 0..v {
                let mut d = -dl[r] * p[j] - de[r] * p[j] * (x[j] - mu);
                if j == t[r] as usize {
                    d += dl[r];
                }
                d /= tau;
                for k in 0..c {
                    dh[r * c + k] += d * w[j * c + k];
                    dw[j * c + k] += d * h[r * c + k];
                }
            }
        }
        (lp, ent, dh, dw)
    }

    #[test]
    fn chunked_matches_full_logits_in_f32_and_f64() {
        for (seed, n, c, v, chunk, temp) in [
            (1u64, 5usize, 8usize, 37usize, 10usize, 1.0f32),
            (2, 1, 3, 1, 1, 0.7),
            (3, 9, 16, 100, 100, 1.3),
            (4, 7, 5, 64, 7, 0.5),
            (5, 3, 12, 50, 64, 2.0),
        ] {
            let s = LmHeadShape {
                n,
                c,
                v,
                chunk,
                temperature: temp,
            };
            let h = lcg(seed, n * c, 1.0);
            let w = lcg(seed + 100, v * c, 1.5);
            let t: Vec<u32> = (0..n).map(|i| ((i * 7 + seed as usize) % v) as u32).collect();
            let dl = lcg(seed + 200, n, 1.0);
            let de = lcg(seed + 300, n, 1.0);
            let (rlp, rent, rdh, rdw) = reference(&h, &w, &t, &s, &dl, &de);

            let (mut lp, mut ent, mut lse) = (vec![0.0f64; n], vec![0.0f64; n], vec![0.0f64; n]);
            lm_head_logprob_forward(&mut lp, &mut ent, &mut lse, &h, &w, &t, s).unwrap();
            let (mut dh, mut dw) = (vec![0.0f64; n * c], vec![0.0f64; v * c]);
            lm_head_logprob_backward(&mut dh, &mut dw, &h, &w, &t, &lse, &ent, &dl, &de, s).unwrap();
            let close = |a: &[f64], b: &[f64], tol: f64, what: &str| {
                for (i, (x, y)) in a.iter().zip(b).enumerate() {
                    assert!(
                        (x - y).abs() <= tol * (1.0 + y.abs()),
                        "{what}[{i}] {x} vs {y} (case {seed})"
                    );
                }
            };
            close(&lp, &rlp, 1e-12, "logp");
            close(&ent, &rent, 1e-12, "entropy");
            close(&dh, &rdh, 1e-12, "dhidden");
            close(&dw, &rdw, 1e-12, "dweight");

            // Keeping the logits gives the same results without the recompute.
            let (mut lpk, mut entk, mut lsek, mut kept) =
                (vec![0.0f64; n], vec![0.0f64; n], vec![0.0f64; n], vec![0.0f64; n * v]);
            lm_head_logprob_forward_keep(&mut lpk, &mut entk, &mut lsek, &mut kept, &h, &w, &t, s).unwrap();
            let (mut dhk, mut dwk) = (vec![0.0f64; n * c], vec![0.0f64; v * c]);
            lm_head_logprob_backward_kept(
                &mut dhk,
                &mut dwk,
                &h,
                &w,
                &mut kept.clone(),
                &t,
                &lsek,
                &entk,
                &dl,
                &de,
                s,
            )
            .unwrap();
            close(&lpk, &lp, 1e-14, "logp kept");
            close(&entk, &ent, 1e-14, "entropy kept");
            close(&dhk, &dh, 1e-12, "dhidden kept");
            close(&dwk, &dw, 1e-12, "dweight kept");
            assert!(lm_head_logprob_backward_kept(
                &mut dhk,
                &mut dwk,
                &h,
                &w,
                &mut kept[1..],
                &t,
                &lsek,
                &entk,
                &dl,
                &de,
                s
            )
            .is_err());

            let f = |x: &[f64]| x.iter().map(|&y| y as f32).collect::<Vec<f32>>();
            let (mut lp32, mut ent32, mut lse32) = (vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n]);
            lm_head_logprob_forward(&mut lp32, &mut ent32, &mut lse32, &f(&h), &f(&w), &t, s).unwrap();
            let (mut dh32, mut dw32) = (vec![0.0f32; n * c], vec![0.0f32; v * c]);
            lm_head_logprob_backward(
                &mut dh32,
                &mut dw32,
                &f(&h),
                &f(&w),
                &t,
                &lse32,
                &ent32,
                &f(&dl),
                &f(&de),
                s,
            )
            .unwrap();
            let up = |x: &[f32]| x.iter().map(|&y| y as f64).collect::<Vec<f64>>();
            close(&up(&lp32), &rlp, 1e-4, "logp f32");
            close(&up(&ent32), &rent, 1e-4, "entropy f32");
            close(&up(&dh32), &rdh, 1e-4, "dhidden f32");
            close(&up(&dw32), &rdw, 1e-4, "dweight f32");
        }
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let s = LmHeadShape {
            n: 2,
            c: 2,
            v: 3,
            chunk: 2,
            temperature: 1.0,
        };
        let (h, w) = (vec![0.0f32; 4], vec![0.0f32; 6]);
        let (mut a, mut b, mut l) = (vec![0.0f32; 2], vec![0.0f32; 2], vec![0.0f32; 2]);
        let e = lm_head_logprob_forward(&mut a, &mut b, &mut l, &h, &w, &[0, 3], s).unwrap_err();
        assert!(e.to_string().contains('3'), "{e}");
        let e = lm_head_logprob_forward(&mut a, &mut b, &mut l, &h, &w[..5], &[0, 1], s).unwrap_err();
        assert!(e.to_string().contains("weight"), "{e}");
        for bad in [0.0f32, -1.0, f32::NAN, f32::INFINITY] {
            let s2 = LmHeadShape { temperature: bad, ..s };
            assert!(lm_head_logprob_forward(&mut a, &mut b, &mut l, &h, &w, &[0, 1], s2).is_err());
        }
        let s3 = LmHeadShape { chunk: 0, ..s };
        assert!(lm_head_logprob_forward(&mut a, &mut b, &mut l, &h, &w, &[0, 1], s3).is_err());
    }
}
