//! Causal scaled-dot-product attention with grouped-query heads, on the CPU.
//!
//! | name | shape |
//! |---|---|
//! | q, dq | [B, T, H, Dk] |
//! | k, dk | [B, T, Hk, Dk] |
//! | v, dv | [B, T, Hk, Dv] |
//! | out, dout | [B, T, H, Dv] |
//! | lse | [B, H, T]: log-sum-exp of each row of scaled scores, saved for the backward |
//!
//! Query head `h` reads key/value head `h / (H / Hk)`. `Dk != Dv` covers MLA
//! (DeepSeek-V3: 192 and 128). Work is split over (batch, head) and done in
//! blocks of query rows with matrix products, so memory stays O(block x T)
//! per task; the probabilities are recomputed in the backward from `lse`.

use rayon::prelude::*;

use super::matmul::{matmul_serial, Gemm};
use crate::error::{check_lens, Error, Result};
use crate::Real;

const BLOCK: usize = 64;

/// The sizes of one attention call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnShape {
    /// Batch.
    pub b: usize,
    /// Sequence length.
    pub t: usize,
    /// Query heads.
    pub h: usize,
    /// Key/value heads (divides `h`).
    pub hk: usize,
    /// Query/key head width.
    pub dk: usize,
    /// Value head width.
    pub dv: usize,
    /// Score scale, usually 1 / sqrt(dk).
    pub scale: f64,
}

impl AttnShape {
    /// `h` a multiple of `hk` (> 0), else an error naming `op`.
    pub(crate) fn check(&self, op: &'static str) -> Result<()> {
        if self.hk == 0 || !self.h.is_multiple_of(self.hk) {
            return Err(Error::InvalidArgument {
                op,
                msg: format!(
                    "{} query heads are not a multiple of {} key/value heads",
                    self.h, self.hk
                ),
            });
        }
        Ok(())
    }
}

/// Copies head `hh` of a [B, T, NH, D] buffer for batch `b` into [T, D].
fn gather<F: Real>(dst: &mut [F], src: &[F], b: usize, t: usize, nh: usize, hh: usize, d: usize) {
    for s in 0..t {
        let o = ((b * t + s) * nh + hh) * d;
        dst[s * d..(s + 1) * d].copy_from_slice(&src[o..o + d]);
    }
}

/// Writes [T, D] back as head `hh` of a [B, T, NH, D] buffer.
fn scatter<F: Real>(dst: &mut [F], src: &[F], b: usize, t: usize, nh: usize, hh: usize, d: usize) {
    for s in 0..t {
        let o = ((b * t + s) * nh + hh) * d;
        dst[o..o + d].copy_from_slice(&src[s * d..(s + 1) * d]);
    }
}

/// Scaled, masked scores of query rows `i0..i0+rows` against keys `0..kv`,
/// turned into probabilities with the given (or computed) log-sum-exp.
fn probs<F: Real>(
    p: &mut [F],
    q: &[F],
    k: &[F],
    i0: usize,
    rows: usize,
    kv: usize,
    dk: usize,
    scale: F,
    lse: &mut [F],
    have_lse: bool,
) -> Result<()> {
    matmul_serial(
        p,
        &q[i0 * dk..(i0 + rows) * dk],
        &k[..kv * dk],
        Gemm::new(rows, dk, kv).tb(),
    )?;
    super::wide(
        #[inline(always)]
        || probs_rows(p, i0, rows, kv, scale, lse, have_lse),
    );
    Ok(())
}

/// The row passes of [`probs`] over the scores in `p`.
#[inline(always)]
fn probs_rows<F: Real>(p: &mut [F], i0: usize, rows: usize, kv: usize, scale: F, lse: &mut [F], have_lse: bool) {
    for r in 0..rows {
        let row = &mut p[r * kv..(r + 1) * kv];
        let last = i0 + r; // keys 0..=last are visible
        for x in row[..=last].iter_mut() {
            *x *= scale;
        }
        if have_lse {
            let l = lse[r];
            for x in row[..=last].iter_mut() {
                *x = (*x - l).exp_fast();
            }
        } else {
            // One exp per score: exponentiate against the row max, then normalise.
            let m = super::row_max(&row[..=last]);
            for x in row[..=last].iter_mut() {
                *x = (*x - m).exp_fast();
            }
            let s = super::sum_lanes(&row[..=last]);
            lse[r] = m + s.ln();
            let inv = F::one() / s;
            for x in row[..=last].iter_mut() {
                *x *= inv;
            }
        }
        row[last + 1..].fill(F::zero());
    }
}

/// Causal attention forward; writes `out` and `lse`.
pub fn attention_forward<F: Real>(out: &mut [F], lse: &mut [F], q: &[F], k: &[F], v: &[F], s: AttnShape) -> Result<()> {
    const OP: &str = "attention_forward";
    s.check(OP)?;
    let AttnShape {
        b, t, h, hk, dk, dv, ..
    } = s;
    check_lens(
        OP,
        &[
            ("out", out.len(), b * t * h * dv),
            ("lse", lse.len(), b * h * t),
            ("q", q.len(), b * t * h * dk),
            ("k", k.len(), b * t * hk * dk),
            ("v", v.len(), b * t * hk * dv),
        ],
    )?;
    if t == 0 {
        return Ok(());
    }
    let group = h / hk;
    let scale = F::from_f64(s.scale);
    let results: Vec<Result<(Vec<F>, Vec<F>)>> = (0..b * h)
        .into_par_iter()
        .map(|bh| {
            let (bi, hi) = (bh / h, bh % h);
            let mut qh = vec![F::zero(); t * dk];
            let mut kh = vec![F::zero(); t * dk];
            let mut vh = vec![F::zero(); t * dv];
            gather(&mut qh, q, bi, t, h, hi, dk);
            gather(&mut kh, k, bi, t, hk, hi / group, dk);
            gather(&mut vh, v, bi, t, hk, hi / group, dv);
            let mut o = vec![F::zero(); t * dv];
            let mut l = vec![F::zero(); t];
            let mut p = vec![F::zero(); BLOCK * t];
            for i0 in (0..t).step_by(BLOCK) {
                let rows = BLOCK.min(t - i0);
                let kv = i0 + rows;
                let p = &mut p[..rows * kv];
                probs(p, &qh, &kh, i0, rows, kv, dk, scale, &mut l[i0..i0 + rows], false)?;
                matmul_serial(&mut o[i0 * dv..kv * dv], p, &vh[..kv * dv], Gemm::new(rows, kv, dv))?;
            }
            Ok((o, l))
        })
        .collect();
    for (bh, r) in results.into_iter().enumerate() {
        let (o, l) = r?;
        let (bi, hi) = (bh / h, bh % h);
        scatter(out, &o, bi, t, h, hi, dv);
        lse[bh * t..(bh + 1) * t].copy_from_slice(&l);
    }
    Ok(())
}

/// Causal attention backward: `dq`, `dk`, `dv` are assigned.
pub fn attention_backward<F: Real>(
    dq: &mut [F],
    dk: &mut [F],
    dv: &mut [F],
    dout: &[F],
    q: &[F],
    k: &[F],
    v: &[F],
    out: &[F],
    lse: &[F],
    s: AttnShape,
) -> Result<()> {
    const OP: &str = "attention_backward";
    s.check(OP)?;
    let AttnShape {
        b,
        t,
        h,
        hk,
        dk: dkw,
        dv: dvw,
        ..
    } = s;
    check_lens(
        OP,
        &[
            ("dq", dq.len(), b * t * h * dkw),
            ("dk", dk.len(), b * t * hk * dkw),
            ("dv", dv.len(), b * t * hk * dvw),
            ("dout", dout.len(), b * t * h * dvw),
            ("q", q.len(), b * t * h * dkw),
            ("k", k.len(), b * t * hk * dkw),
            ("v", v.len(), b * t * hk * dvw),
            ("out", out.len(), b * t * h * dvw),
            ("lse", lse.len(), b * h * t),
        ],
    )?;
    if t == 0 {
        return Ok(());
    }
    let group = h / hk;
    let scale = F::from_f64(s.scale);
    type Grads<F> = (Vec<Vec<F>>, Vec<F>, Vec<F>);
    let results: Vec<Result<Grads<F>>> = (0..b * hk)
        .into_par_iter()
        .map(|bk| {
            let (bi, ki) = (bk / hk, bk % hk);
            let mut kh = vec![F::zero(); t * dkw];
            let mut vh = vec![F::zero(); t * dvw];
            gather(&mut kh, k, bi, t, hk, ki, dkw);
            gather(&mut vh, v, bi, t, hk, ki, dvw);
            let mut dkh = vec![F::zero(); t * dkw];
            let mut dvh = vec![F::zero(); t * dvw];
            let mut dqs = Vec::with_capacity(group);
            let mut qh = vec![F::zero(); t * dkw];
            let mut doh = vec![F::zero(); t * dvw];
            let mut oh = vec![F::zero(); t * dvw];
            let mut p = vec![F::zero(); BLOCK * t];
            let mut dp = vec![F::zero(); BLOCK * t];
            for hi in ki * group..(ki + 1) * group {
                gather(&mut qh, q, bi, t, h, hi, dkw);
                gather(&mut doh, dout, bi, t, h, hi, dvw);
                gather(&mut oh, out, bi, t, h, hi, dvw);
                let mut l = lse[(bi * h + hi) * t..(bi * h + hi + 1) * t].to_vec();
                // D_t = dO_t . O_t
                let dsum: Vec<F> = (0..t)
                    .map(|r| (0..dvw).map(|j| doh[r * dvw + j] * oh[r * dvw + j]).sum())
                    .collect();
                let mut dqh = vec![F::zero(); t * dkw];
                for i0 in (0..t).step_by(BLOCK) {
                    let rows = BLOCK.min(t - i0);
                    let kv = i0 + rows;
                    let p = &mut p[..rows * kv];
                    let dp = &mut dp[..rows * kv];
                    probs(p, &qh, &kh, i0, rows, kv, dkw, scale, &mut l[i0..i0 + rows], true)?;
                    let dob = &doh[i0 * dvw..kv * dvw];
                    // dV[0..kv] += P^T dO
                    matmul_serial(&mut dvh[..kv * dvw], p, dob, Gemm::new(kv, rows, dvw).ta().acc())?;
                    // dP = dO V^T
                    matmul_serial(dp, dob, &vh[..kv * dvw], Gemm::new(rows, dvw, kv).tb())?;
                    // dS = P (dP - D) * scale
                    super::wide(
                        #[inline(always)]
                        || {
                            for ((dpr, pr), &d) in dp.chunks_mut(kv).zip(p.chunks(kv)).zip(&dsum[i0..i0 + rows]) {
                                for (x, &pv) in dpr.iter_mut().zip(pr) {
                                    *x = pv * (*x - d) * scale;
                                }
                            }
                        },
                    );
                    // dQ_blk = dS K ; dK[0..kv] += dS^T Q_blk
                    matmul_serial(
                        &mut dqh[i0 * dkw..kv * dkw],
                        dp,
                        &kh[..kv * dkw],
                        Gemm::new(rows, kv, dkw),
                    )?;
                    matmul_serial(
                        &mut dkh[..kv * dkw],
                        dp,
                        &qh[i0 * dkw..kv * dkw],
                        Gemm::new(kv, rows, dkw).ta().acc(),
                    )?;
                }
                dqs.push(dqh);
            }
            Ok((dqs, dkh, dvh))
        })
        .collect();
    for (bk, r) in results.into_iter().enumerate() {
        let (dqs, dkh, dvh) = r?;
        let (bi, ki) = (bk / hk, bk % hk);
        for (j, dqh) in dqs.iter().enumerate() {
            scatter(dq, dqh, bi, t, h, ki * group + j, dkw);
        }
        scatter(dk, &dkh, bi, t, hk, ki, dkw);
        scatter(dv, &dvh, bi, t, hk, ki, dvw);
    }
    Ok(())
}
