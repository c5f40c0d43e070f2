//! Varlen causal attention with grouped-query heads, on the CPU: the twins of
//! `kernels/flash_attention.cu` (launchers in `aha_cuda_kernels::flash`).
//!
//! | name | shape |
//! |---|---|
//! | q, dq | [total, H, Dk] |
//! | k, dk | [total, Hk, Dk] |
//! | v, dv | [total, Hk, Dv] |
//! | out, dout | [total, H, Dv] |
//! | lse | [H, total]: log-sum-exp of each row's scaled scores |
//! | cu_seqlens | [nseq + 1]: sequence s holds rows `cu[s] .. cu[s + 1]`, `cu[0] = 0`, `cu[nseq] = total` |
//!
//! Each sequence is causal on its own. [`flash_forward`] and
//! [`flash_backward`] run [`attention_forward`] / [`attention_backward`] per
//! sequence (matrix products over query blocks); [`flash_forward_tiled`] is
//! the flash algorithm itself (key tiles, running max and sum, memory linear
//! in the sequence length), used as the f64 blockwise reference for long
//! sequences; [`flash_decode_paged`] is decode against a paged KV cache with
//! the key range split and the partial results merged by their
//! log-sum-exps, as the GPU does it.

use rayon::prelude::*;

use super::attention::{attention_backward, attention_forward, AttnShape};
use crate::error::{check_lens, Error, Result};
use crate::Real;

/// The heads, widths and scale of a flash-attention call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlashShape {
    /// Query heads.
    pub h: usize,
    /// Key/value heads (divides `h`).
    pub hk: usize,
    /// Query/key head width.
    pub dk: usize,
    /// Value head width.
    pub dv: usize,
    /// Score scale, usually `1 / sqrt(dk)`.
    pub scale: f64,
}

impl FlashShape {
    fn check(&self, op: &'static str) -> Result<()> {
        self.attn(1).check(op)
    }

    fn attn(&self, t: usize) -> AttnShape {
        AttnShape {
            b: 1,
            t,
            h: self.h,
            hk: self.hk,
            dk: self.dk,
            dv: self.dv,
            scale: self.scale,
        }
    }
}

/// Checks sequence offsets: `cu[0] = 0`, non-decreasing; returns the total
/// (`cu[nseq]`).
pub fn check_cu_seqlens(op: &'static str, cu: &[usize]) -> Result<usize> {
    let bad = |msg: String| Error::InvalidArgument { op, msg };
    match cu.first() {
        Some(0) => {}
        Some(&x) => return Err(bad(format!("cu_seqlens[0] is {x}, not 0"))),
        None => return Err(bad("cu_seqlens is empty (it holds nseq + 1 offsets)".into())),
    }
    if let Some(w) = cu.windows(2).position(|w| w[1] < w[0]) {
        return Err(bad(format!(
            "cu_seqlens decreases at {}: {} after {}",
            w + 1,
            cu[w + 1],
            cu[w]
        )));
    }
    Ok(cu[cu.len() - 1])
}

/// Varlen causal attention forward; writes `out` and `lse`.
pub fn flash_forward<F: Real>(
    out: &mut [F],
    lse: &mut [F],
    q: &[F],
    k: &[F],
    v: &[F],
    cu_seqlens: &[usize],
    s: FlashShape,
) -> Result<()> {
    const OP: &str = "flash_forward";
    s.check(OP)?;
    let total = check_cu_seqlens(OP, cu_seqlens)?;
    let FlashShape { h, hk, dk, dv, .. } = s;
    check_lens(
        OP,
        &[
            ("out", out.len(), total * h * dv),
            ("lse", lse.len(), h * total),
            ("q", q.len(), total * h * dk),
            ("k", k.len(), total * hk * dk),
            ("v", v.len(), total * hk * dv),
        ],
    )?;
    for w in cu_seqlens.windows(2) {
        let (a, t) = (w[0], w[1] - w[0]);
        if t == 0 {
            continue;
        }
        let mut l = vec![F::zero(); h * t];
        attention_forward(
            &mut out[a * h * dv..(a + t) * h * dv],
            &mut l,
            &q[a * h * dk..(a + t) * h * dk],
            &k[a * hk * dk..(a + t) * hk * dk],
            &v[a * hk * dv..(a + t) * hk * dv],
            s.attn(t),
        )?;
        for hh in 0..h {
            lse[hh * total + a..hh * total + a + t].copy_from_slice(&l[hh * t..(hh + 1) * t]);
        }
    }
    Ok(())
}

/// Varlen causal attention backward: `dq`, `dk`, `dv` are assigned.
#[allow(clippy::too_many_arguments)]
pub fn flash_backward<F: Real>(
    dq: &mut [F],
    dk: &mut [F],
    dv: &mut [F],
    dout: &[F],
    q: &[F],
    k: &[F],
    v: &[F],
    out: &[F],
    lse: &[F],
    cu_seqlens: &[usize],
    s: FlashShape,
) -> Result<()> {
    const OP: &str = "flash_backward";
    s.check(OP)?;
    let total = check_cu_seqlens(OP, cu_seqlens)?;
    let FlashShape {
        h,
        hk,
        dk: dkw,
        dv: dvw,
        ..
    } = s;
    check_lens(
        OP,
        &[
            ("dq", dq.len(), total * h * dkw),
            ("dk", dk.len(), total * hk * dkw),
            ("dv", dv.len(), total * hk * dvw),
            ("dout", dout.len(), total * h * dvw),
            ("q", q.len(), total * h * dkw),
            ("k", k.len(), total * hk * dkw),
            ("v", v.len(), total * hk * dvw),
            ("out", out.len(), total * h * dvw),
            ("lse", lse.len(), h * total),
        ],
    )?;
    for w in cu_seqlens.windows(2) {
        let (a, t) = (w[0], w[1] - w[0]);
        if t == 0 {
            continue;
        }
        let l: Vec<F> = (0..h)
            .flat_map(|hh| lse[hh * total + a..hh * total + a + t].iter().copied())
            .collect();
        let qr = a * h * dkw..(a + t) * h * dkw;
        let kr = a * hk * dkw..(a + t) * hk * dkw;
        let vr = a * hk * dvw..(a + t) * hk * dvw;
        let or = a * h * dvw..(a + t) * h * dvw;
        attention_backward(
            &mut dq[qr.clone()],
            &mut dk[kr.clone()],
            &mut dv[vr.clone()],
            &dout[or.clone()],
            &q[qr],
            &k[kr],
            &v[vr],
            &out[or],
            &l,
            s.attn(t),
        )?;
    }
    Ok(())
}

/// Online softmax of one query row over keys `keys` (positions in a
/// sequence's own numbering), `tile` at a time: returns the unnormalised
/// output sum, the running max and the sum of exponentials (`max = -inf`,
/// `sum = 0` when `keys` is empty). `key(j)` is the row of `k` and `v`
/// (in units of Dk and Dv) holding key `j`.
#[allow(clippy::too_many_arguments)]
fn online_row<F: Real>(
    acc: &mut [F],
    qr: &[F],
    keys: std::ops::Range<usize>,
    tile: usize,
    key: impl Fn(usize) -> usize,
    k: &[F],
    v: &[F],
    scale: F,
) -> (F, F) {
    let (dk, dv) = (qr.len(), acc.len());
    acc.fill(F::zero());
    let (mut m, mut l) = (F::neg_infinity(), F::zero());
    let mut sc = vec![F::zero(); tile];
    let mut j0 = keys.start;
    while j0 < keys.end {
        let n = tile.min(keys.end - j0);
        for (jj, x) in sc[..n].iter_mut().enumerate() {
            let ko = key(j0 + jj);
            let kr = &k[ko * dk..(ko + 1) * dk];
            *x = qr.iter().zip(kr).fold(F::zero(), |a, (&x, &y)| a + x * y) * scale;
        }
        let mt = sc[..n].iter().fold(F::neg_infinity(), |a, &x| a.max(x));
        let mn = m.max(mt);
        let corr = (m - mn).exp();
        l *= corr;
        for a in acc.iter_mut() {
            *a *= corr;
        }
        for (jj, &x) in sc[..n].iter().enumerate() {
            let p = (x - mn).exp();
            l += p;
            let vo = key(j0 + jj);
            for (a, &y) in acc.iter_mut().zip(&v[vo * dv..(vo + 1) * dv]) {
                *a += p * y;
            }
        }
        m = mn;
        j0 += n;
    }
    (m, l)
}

/// The flash forward as the GPU tiles it: each row's keys `tile` at a time
/// with a running max and sum (no `T x T` buffer, memory linear in the
/// sequence length); same contract as [`flash_forward`]. In f64 this is the
/// blockwise reference for long sequences.
#[allow(clippy::too_many_arguments)]
pub fn flash_forward_tiled<F: Real>(
    out: &mut [F],
    lse: &mut [F],
    q: &[F],
    k: &[F],
    v: &[F],
    cu_seqlens: &[usize],
    s: FlashShape,
    tile: usize,
) -> Result<()> {
    const OP: &str = "flash_forward_tiled";
    s.check(OP)?;
    let total = check_cu_seqlens(OP, cu_seqlens)?;
    let FlashShape { h, hk, dk, dv, .. } = s;
    check_lens(
        OP,
        &[
            ("out", out.len(), total * h * dv),
            ("lse", lse.len(), h * total),
            ("q", q.len(), total * h * dk),
            ("k", k.len(), total * hk * dk),
            ("v", v.len(), total * hk * dv),
        ],
    )?;
    if tile == 0 {
        return Err(Error::InvalidArgument {
            op: OP,
            msg: "tile is 0".into(),
        });
    }
    let group = h / hk;
    let scale = F::from_f64(s.scale);
    let seq_of = |row: usize| cu_seqlens.partition_point(|&c| c <= row) - 1;
    let rows: Vec<Vec<F>> = out
        .par_chunks_mut(h * dv)
        .enumerate()
        .map(|(row, o)| {
            let a = cu_seqlens[seq_of(row)];
            let mut lrow = vec![F::zero(); h];
            for hh in 0..h {
                let kh = hh / group;
                let qr = &q[(row * h + hh) * dk..(row * h + hh + 1) * dk];
                let acc = &mut o[hh * dv..(hh + 1) * dv];
                let key = |j: usize| (a + j) * hk + kh;
                let (m, l) = online_row(acc, qr, 0..row - a + 1, tile, key, k, v, scale);
                let inv = F::one() / l;
                for x in acc.iter_mut() {
                    *x *= inv;
                }
                lrow[hh] = m + l.ln();
            }
            lrow
        })
        .collect();
    for (row, l) in rows.iter().enumerate() {
        for (hh, &x) in l.iter().enumerate() {
            lse[hh * total + row] = x;
        }
    }
    Ok(())
}

/// The cache geometry of [`flash_decode_paged`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedShape {
    /// Positions per cache block.
    pub block_size: usize,
    /// Entries per block-table row.
    pub max_blocks: usize,
    /// Keys per split of the key range (0: one split).
    pub split_len: usize,
}

/// Decode against a paged KV cache, split as the GPU splits it.
///
/// | name | shape |
/// |---|---|
/// | out | [total_q, H, Dv] |
/// | lse | [H, total_q] |
/// | q | [total_q, H, Dk]: sequence s's new tokens are rows `q_cu[s] .. q_cu[s + 1]` |
/// | k_cache | [blocks, block_size, Hk, Dk] |
/// | v_cache | [blocks, block_size, Hk, Dv] |
/// | block_tables | [nseq, max_blocks]: position p in block `table[p / block_size]`, slot `p % block_size` |
/// | ctx_lens | `[nseq]`: cached positions, the new tokens' included |
///
/// The `n` new tokens of a sequence are its last `n` positions; each sees
/// the positions up to its own. Each split of `split_len` keys gives a
/// partial output and log-sum-exp per row; the splits are merged by their
/// log-sum-exps.
#[allow(clippy::too_many_arguments)]
pub fn flash_decode_paged<F: Real>(
    out: &mut [F],
    lse: &mut [F],
    q: &[F],
    k_cache: &[F],
    v_cache: &[F],
    block_tables: &[u32],
    ctx_lens: &[usize],
    q_cu: &[usize],
    p: PagedShape,
    s: FlashShape,
) -> Result<()> {
    const OP: &str = "flash_decode_paged";
    s.check(OP)?;
    let bad = |msg: String| Error::InvalidArgument { op: OP, msg };
    let total_q = check_cu_seqlens(OP, q_cu)?;
    let nseq = q_cu.len() - 1;
    let FlashShape { h, hk, dk, dv, .. } = s;
    let PagedShape {
        block_size,
        max_blocks,
        split_len,
    } = p;
    if block_size == 0 {
        return Err(bad("block_size is 0".into()));
    }
    let blocks = k_cache.len() / (block_size * hk * dk).max(1);
    check_lens(
        OP,
        &[
            ("out", out.len(), total_q * h * dv),
            ("lse", lse.len(), h * total_q),
            ("q", q.len(), total_q * h * dk),
            ("k_cache", k_cache.len(), blocks * block_size * hk * dk),
            ("v_cache", v_cache.len(), blocks * block_size * hk * dv),
            ("block_tables", block_tables.len(), nseq * max_blocks),
            ("ctx_lens", ctx_lens.len(), nseq),
        ],
    )?;
    for (si, &ctx) in ctx_lens.iter().enumerate() {
        let n = q_cu[si + 1] - q_cu[si];
        if n > ctx || ctx > max_blocks * block_size {
            return Err(bad(format!(
                "sequence {si}: {n} new tokens, context {ctx}, table room {}",
                max_blocks * block_size
            )));
        }
        let used = &block_tables[si * max_blocks..si * max_blocks + ctx.div_ceil(block_size)];
        if let Some(&b) = used.iter().find(|&&b| b as usize >= blocks) {
            return Err(bad(format!("sequence {si}: block {b} outside the {blocks} cached")));
        }
    }
    let group = h / hk;
    let scale = F::from_f64(s.scale);
    for si in 0..nseq {
        let (ctx, n) = (ctx_lens[si], q_cu[si + 1] - q_cu[si]);
        let table = &block_tables[si * max_blocks..(si + 1) * max_blocks];
        let split = if split_len == 0 { ctx.max(1) } else { split_len };
        for t in 0..n {
            let row = q_cu[si] + t;
            let pos = ctx - n + t;
            for hh in 0..h {
                let kh = hh / group;
                let slot = |j: usize| (table[j / block_size] as usize * block_size + j % block_size) * hk + kh;
                let qr = &q[(row * h + hh) * dk..(row * h + hh + 1) * dk];
                // Partials per split, then the merge (the combine kernel).
                let mut parts = Vec::new();
                let mut acc = vec![F::zero(); dv];
                for k0 in (0..ctx).step_by(split) {
                    let end = (k0 + split).min(pos + 1);
                    if end <= k0 {
                        continue; // the split lies after this token: lse -inf
                    }
                    let (m, l) = online_row(&mut acc, qr, k0..end, 32, slot, k_cache, v_cache, scale);
                    let inv = F::one() / l;
                    parts.push((m + l.ln(), acc.iter().map(|&x| x * inv).collect::<Vec<F>>()));
                }
                let mx = parts.iter().fold(F::neg_infinity(), |a, (l, _)| a.max(*l));
                let sum = parts.iter().fold(F::zero(), |a, (l, _)| a + (*l - mx).exp());
                let o = &mut out[(row * h + hh) * dv..(row * h + hh + 1) * dv];
                o.fill(F::zero());
                for (l, part) in &parts {
                    let w = (*l - mx).exp() / sum;
                    for (x, &y) in o.iter_mut().zip(part) {
                        *x += w * y;
                    }
                }
                lse[hh * total_q + row] = mx + sum.ln();
            }
        }
    }
    Ok(())
}

/// Stores packed rows into a paged KV cache: `pool[slots[r] * w ..][..w] =
/// cast(src[r * w ..][..w])` for every row `r < slots.len()`, where a slot
/// is `block * block_size + position % block_size`. The CPU twin of the
/// `kv_write_bf16` / `kv_write_f32` kernels (`cast` is the store's rounding:
/// `half::bf16::from_f32` bits, or the identity). Every slot must be inside
/// the pool and no two rows may share one.
pub fn kv_write<T: Copy>(pool: &mut [T], src: &[f32], slots: &[u32], w: usize, cast: impl Fn(f32) -> T) -> Result<()> {
    const OP: &str = "kv_write";
    check_lens(OP, &[("src", src.len(), slots.len() * w)])?;
    if w == 0 {
        return Ok(());
    }
    let rows = pool.len() / w;
    let mut seen = vec![false; rows];
    for (r, &s) in slots.iter().enumerate() {
        let s = s as usize;
        if s >= rows {
            return Err(Error::InvalidArgument {
                op: OP,
                msg: format!("slot {s} of row {r} is outside the pool's {rows} slots"),
            });
        }
        if std::mem::replace(&mut seen[s], true) {
            return Err(Error::InvalidArgument {
                op: OP,
                msg: format!("slot {s} is written by two rows (row {r} and an earlier one)"),
            });
        }
        for (d, &x) in pool[s * w..(s + 1) * w].iter_mut().zip(&src[r * w..(r + 1) * w]) {
            *d = cast(x);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn cu_seqlens_must_start_at_zero_and_not_decrease() {
        assert_eq!(check_cu_seqlens("t", &[0, 3, 3, 7]).unwrap(), 7);
        assert_eq!(check_cu_seqlens("t", &[0]).unwrap(), 0);
        assert!(check_cu_seqlens("t", &[]).is_err());
        assert!(check_cu_seqlens("t", &[1, 3]).is_err());
        let e = check_cu_seqlens("t", &[0, 4, 2]).unwrap_err().to_string();
        assert!(e.contains("decreases at 2"), "{e}");
    }

    #[test]
    fn a_single_key_row_copies_its_value() {
        // Row 0 of each sequence sees only its own key: out = v, lse = score.
        let s = FlashShape {
            h: 2,
            hk: 1,
            dk: 2,
            dv: 3,
            scale: 0.5,
        };
        let cu = [0, 1, 3];
        let q: Vec<f64> = (0..3 * 2 * 2).map(|i| i as f64 * 0.1).collect();
        let k: Vec<f64> = (0..3 * 2).map(|i| 1.0 - i as f64 * 0.2).collect();
        let v: Vec<f64> = (0..3 * 3).map(|i| i as f64).collect();
        let (mut out, mut lse) = (vec![0.0; 3 * 2 * 3], vec![0.0; 2 * 3]);
        flash_forward(&mut out, &mut lse, &q, &k, &v, &cu, s).unwrap();
        for (row, hh) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            let o = &out[(row * 2 + hh) * 3..(row * 2 + hh + 1) * 3];
            assert_eq!(o, &v[row * 3..row * 3 + 3]);
            let qr = &q[(row * 2 + hh) * 2..(row * 2 + hh) * 2 + 2];
            let score = 0.5 * (qr[0] * k[row * 2] + qr[1] * k[row * 2 + 1]);
            assert!((lse[hh * 3 + row] - score).abs() < 1e-12);
        }
        let (mut o2, mut l2) = (vec![0.0; out.len()], vec![0.0; lse.len()]);
        flash_forward_tiled(&mut o2, &mut l2, &q, &k, &v, &cu, s, 1).unwrap();
        for (a, b) in o2.iter().zip(&out).chain(l2.iter().zip(&lse)) {
            assert!((a - b).abs() < 1e-12);
        }
    }
}
