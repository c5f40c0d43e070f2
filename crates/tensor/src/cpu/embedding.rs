//! Embedding lookup and its scatter-add backward.
//!
//! | name | shape |
//! |---|---|
//! | ids | [N], each < V |
//! | table, dtable | [V, C] |
//! | out, dout | [N, C] |

use super::for_rows;
use crate::error::{check_lens, Result};
use crate::Real;

/// `out[n] = table[ids[n]]`.
pub fn embedding_forward<F: Real>(out: &mut [F], table: &[F], ids: &[u32], vocab: usize, c: usize) -> Result<()> {
    check_lens(
        "embedding_forward",
        &[("out", out.len(), ids.len() * c), ("table", table.len(), vocab * c)],
    )?;
    super::check_indices("embedding_forward", ids, vocab)?;
    for_rows(out, c, |n, y| {
        let i = ids[n] as usize;
        y.copy_from_slice(&table[i * c..(i + 1) * c]);
    });
    Ok(())
}

/// `dtable[ids[n]] += dout[n]` (a token seen twice accumulates twice).
pub fn embedding_backward<F: Real>(dtable: &mut [F], dout: &[F], ids: &[u32], vocab: usize, c: usize) -> Result<()> {
    check_lens(
        "embedding_backward",
        &[("dout", dout.len(), ids.len() * c), ("dtable", dtable.len(), vocab * c)],
    )?;
    super::check_indices("embedding_backward", ids, vocab)?;
    for (n, &i) in ids.iter().enumerate() {
        let i = i as usize;
        for (d, &g) in dtable[i * c..(i + 1) * c].iter_mut().zip(&dout[n * c..(n + 1) * c]) {
            *d += g;
        }
    }
    Ok(())
}
