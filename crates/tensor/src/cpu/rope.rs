//! Rotary position embedding, in the two layouts the supported models use.
//!
//! | name | shape |
//! |---|---|
//! | inp, out, dinp, dout | [N, H, D] (N tokens, H heads of width D) |
//! | pos | [N], each token's position |
//! | cos, sin | [P, R/2] from [`rope_table`], P >= max(pos) + 1 |
//!
//! Only the `R` dims starting at `rot_offset` of each head rotate (DeepSeek-V3
//! rotates a separate 64-wide part of each head); the others pass through.
//! Pair `i` of a head is rotated by angle `pos * theta^(-2i/R)`:
//!
//! - [`RopeLayout::Half`] (Qwen, Llama; transformers' `rotate_half`): pair
//!   `i` is dims `(i, i + R/2)`.
//! - [`RopeLayout::Interleaved`] (DeepSeek-V3): pair `i` is dims `(2i, 2i+1)`.
//!   transformers de-interleaves before rotating, so its output is a fixed
//!   permutation of ours; q and k are permuted alike, so q.k is the same.

use super::for_rows;
use crate::error::{check_lens, Error, Result};
use crate::Real;

/// Which dims form a rotation pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// Pair `i` is `(i, i + R/2)`.
    Half,
    /// Pair `i` is `(2i, 2i + 1)`.
    Interleaved,
}

/// The geometry of one RoPE application.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RopeShape {
    /// Heads per token.
    pub heads: usize,
    /// Width of each head.
    pub head_dim: usize,
    /// First rotated dim within a head.
    pub rot_offset: usize,
    /// Number of rotated dims (even).
    pub rot_dim: usize,
    /// Pairing of the rotated dims.
    pub layout: RopeLayout,
}

impl RopeShape {
    /// Rotate all `head_dim` dims of each head.
    pub fn full(heads: usize, head_dim: usize, layout: RopeLayout) -> RopeShape {
        RopeShape {
            heads,
            head_dim,
            rot_offset: 0,
            rot_dim: head_dim,
            layout,
        }
    }

    #[inline]
    fn pair(&self, i: usize) -> (usize, usize) {
        match self.layout {
            RopeLayout::Half => (self.rot_offset + i, self.rot_offset + i + self.rot_dim / 2),
            RopeLayout::Interleaved => (self.rot_offset + 2 * i, self.rot_offset + 2 * i + 1),
        }
    }
}

/// `cos` and `sin` tables, each [max_pos, rot_dim / 2], computed in f64.
pub fn rope_table<F: Real>(theta: f64, rot_dim: usize, max_pos: usize) -> (Vec<F>, Vec<F>) {
    let half = rot_dim / 2;
    let mut cos = Vec::with_capacity(max_pos * half);
    let mut sin = Vec::with_capacity(max_pos * half);
    for p in 0..max_pos {
        for i in 0..half {
            let inv_freq = 1.0 / theta.powf((2 * i) as f64 / rot_dim as f64);
            let a = p as f64 * inv_freq;
            cos.push(F::from_f64(a.cos()));
            sin.push(F::from_f64(a.sin()));
        }
    }
    (cos, sin)
}

fn check(
    op: &'static str,
    out: usize,
    inp: usize,
    cos: usize,
    sin: usize,
    pos: &[u32],
    s: &RopeShape,
) -> Result<usize> {
    let n = pos.len();
    let w = s.heads * s.head_dim;
    if !s.rot_dim.is_multiple_of(2) || s.rot_offset + s.rot_dim > s.head_dim {
        return Err(Error::InvalidArgument {
            op,
            msg: format!(
                "rotated dims {}..{} must be an even count inside head_dim {}",
                s.rot_offset,
                s.rot_offset + s.rot_dim,
                s.head_dim
            ),
        });
    }
    check_lens(op, &[("out", out, n * w), ("inp", inp, n * w), ("sin", sin, cos)])?;
    let half = s.rot_dim / 2;
    let max_pos = cos.checked_div(half).unwrap_or(usize::MAX);
    if half > 0 && !cos.is_multiple_of(half) {
        return Err(Error::ShapeMismatch {
            op,
            expected: format!("cos table of [P, {half}]"),
            got: format!("{cos} elements"),
        });
    }
    for (i, &p) in pos.iter().enumerate() {
        if p as usize >= max_pos {
            return Err(Error::IndexOutOfRange {
                op,
                index: p as i64,
                position: i,
                limit: max_pos,
            });
        }
    }
    Ok(w)
}

fn apply<F: Real>(
    out: &mut [F],
    inp: &[F],
    cos: &[F],
    sin: &[F],
    pos: &[u32],
    s: RopeShape,
    sign: F,
    op: &'static str,
) -> Result<()> {
    let w = check(op, out.len(), inp.len(), cos.len(), sin.len(), pos, &s)?;
    let half = s.rot_dim / 2;
    for_rows(out, w, |t, y| {
        let x = &inp[t * w..(t + 1) * w];
        y.copy_from_slice(x);
        let p = pos[t] as usize;
        let (cs, sn) = (&cos[p * half..(p + 1) * half], &sin[p * half..(p + 1) * half]);
        for h in 0..s.heads {
            let base = h * s.head_dim;
            for i in 0..half {
                let (a, b) = s.pair(i);
                let (xa, xb) = (x[base + a], x[base + b]);
                let (co, si) = (cs[i], sign * sn[i]);
                y[base + a] = xa * co - xb * si;
                y[base + b] = xb * co + xa * si;
            }
        }
    });
    Ok(())
}

/// Rotates the `rot_dim` dims of every head of every token by its position.
pub fn rope_forward<F: Real>(out: &mut [F], inp: &[F], cos: &[F], sin: &[F], pos: &[u32], s: RopeShape) -> Result<()> {
    apply(out, inp, cos, sin, pos, s, F::one(), "rope_forward")
}

/// Backward of [`rope_forward`] (`dinp =`): the inverse rotation of `dout`.
pub fn rope_backward<F: Real>(
    dinp: &mut [F],
    dout: &[F],
    cos: &[F],
    sin: &[F],
    pos: &[u32],
    s: RopeShape,
) -> Result<()> {
    apply(dinp, dout, cos, sin, pos, s, -F::one(), "rope_backward")
}
