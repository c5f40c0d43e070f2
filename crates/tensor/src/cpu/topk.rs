//! Top-k over the rows of an [N, C] buffer.
//!
//! Values come out in descending order; among equal values the lower index
//! comes first (as `torch.topk` on the CPU in practice, and deterministic).
//! NaN sorts below every number.

use crate::error::{check_lens, Error, Result};
use crate::Real;

/// `values[n] / indices[n]`: the `k` largest of row `n` ([N, K] each).
pub fn topk<F: Real>(values: &mut [F], indices: &mut [u32], inp: &[F], rows: usize, c: usize, k: usize) -> Result<()> {
    if k > c {
        return Err(Error::InvalidArgument {
            op: "topk",
            msg: format!("k = {k} is larger than the row length {c}"),
        });
    }
    if c > u32::MAX as usize {
        return Err(Error::InvalidArgument {
            op: "topk",
            msg: format!("row length {c} does not fit u32 indices"),
        });
    }
    check_lens(
        "topk",
        &[
            ("values", values.len(), rows * k),
            ("indices", indices.len(), rows * k),
            ("inp", inp.len(), rows * c),
        ],
    )?;
    let mut order: Vec<u32> = Vec::with_capacity(c);
    for r in 0..rows {
        let x = &inp[r * c..(r + 1) * c];
        order.clear();
        order.extend(0..c as u32);
        let key = |i: &u32| {
            let v = x[*i as usize];
            if v.is_nan() {
                F::neg_infinity()
            } else {
                v
            }
        };
        let cmp = |a: &u32, b: &u32| {
            key(b)
                .partial_cmp(&key(a))
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.cmp(b))
        };
        if k < c && k > 0 {
            order.select_nth_unstable_by(k - 1, cmp);
        }
        let top = &mut order[..k];
        top.sort_unstable_by(cmp);
        for (j, &i) in top.iter().enumerate() {
            values[r * k + j] = x[i as usize];
            indices[r * k + j] = i;
        }
    }
    Ok(())
}

/// Backward of [`topk`]'s values: `dinp = 0` except `dinp[n, indices[n, j]] = dvalues[n, j]`.
pub fn topk_backward<F: Real>(
    dinp: &mut [F],
    dvalues: &[F],
    indices: &[u32],
    rows: usize,
    c: usize,
    k: usize,
) -> Result<()> {
    check_lens(
        "topk_backward",
        &[
            ("dinp", dinp.len(), rows * c),
            ("dvalues", dvalues.len(), rows * k),
            ("indices", indices.len(), rows * k),
        ],
    )?;
    dinp.fill(F::zero());
    for r in 0..rows {
        for j in 0..k {
            let i = indices[r * k + j] as usize;
            if i >= c {
                return Err(Error::IndexOutOfRange {
                    op: "topk_backward",
                    index: i as i64,
                    position: r * k + j,
                    limit: c,
                });
            }
            dinp[r * c + i] += dvalues[r * k + j];
        }
    }
    Ok(())
}
