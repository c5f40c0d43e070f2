//! Element-wise ops: add, mul, scale, SiLU, SwiGLU. All buffers have `n` elements.

use rayon::prelude::*;

use crate::error::{check_lens, Result};
use crate::real::c;
use crate::Real;

const PAR_MIN: usize = 1 << 16;
/// Elements per parallel task of the element-wise passes.
const PAR_CHUNK: usize = 1 << 14;

fn zip2<F: Real>(out: &mut [F], a: &[F], b: &[F], f: impl Fn(F, F) -> F + Sync + Send) {
    let body = |o: &mut [F], a: &[F], b: &[F]| {
        super::wide(
            #[inline(always)]
            || {
                for ((o, &x), &y) in o.iter_mut().zip(a).zip(b) {
                    *o = f(x, y);
                }
            },
        )
    };
    if out.len() >= PAR_MIN {
        out.par_chunks_mut(PAR_CHUNK)
            .zip(a.par_chunks(PAR_CHUNK).zip(b.par_chunks(PAR_CHUNK)))
            .for_each(|(o, (a, b))| body(o, a, b));
    } else {
        body(out, a, b);
    }
}

/// `out = a + b`.
pub fn add<F: Real>(out: &mut [F], a: &[F], b: &[F]) -> Result<()> {
    check_lens("add", &[("a", a.len(), out.len()), ("b", b.len(), out.len())])?;
    zip2(out, a, b, |x, y| x + y);
    Ok(())
}

/// `acc += x` (residual streams, gradient accumulation).
pub fn add_inplace<F: Real>(acc: &mut [F], x: &[F]) -> Result<()> {
    check_lens("add_inplace", &[("x", x.len(), acc.len())])?;
    if acc.len() >= PAR_MIN {
        acc.par_iter_mut().zip(x.par_iter()).for_each(|(a, &v)| *a += v);
    } else {
        for (a, &v) in acc.iter_mut().zip(x) {
            *a += v;
        }
    }
    Ok(())
}

/// Backward of [`add`]: `da += dout`, `db += dout`.
pub fn add_backward<F: Real>(da: &mut [F], db: &mut [F], dout: &[F]) -> Result<()> {
    add_inplace(da, dout)?;
    add_inplace(db, dout)
}

/// `out = a * b`.
pub fn mul<F: Real>(out: &mut [F], a: &[F], b: &[F]) -> Result<()> {
    check_lens("mul", &[("a", a.len(), out.len()), ("b", b.len(), out.len())])?;
    zip2(out, a, b, |x, y| x * y);
    Ok(())
}

/// Backward of [`mul`]: `da += dout * b`, `db += dout * a`.
pub fn mul_backward<F: Real>(da: &mut [F], db: &mut [F], dout: &[F], a: &[F], b: &[F]) -> Result<()> {
    let n = dout.len();
    check_lens(
        "mul_backward",
        &[
            ("da", da.len(), n),
            ("db", db.len(), n),
            ("a", a.len(), n),
            ("b", b.len(), n),
        ],
    )?;
    for i in 0..n {
        da[i] += dout[i] * b[i];
        db[i] += dout[i] * a[i];
    }
    Ok(())
}

/// `out = s * a`.
pub fn scale<F: Real>(out: &mut [F], a: &[F], s: F) -> Result<()> {
    check_lens("scale", &[("a", a.len(), out.len())])?;
    for (o, &x) in out.iter_mut().zip(a) {
        *o = s * x;
    }
    Ok(())
}

/// Backward of [`scale`]: `da += s * dout`.
pub fn scale_backward<F: Real>(da: &mut [F], dout: &[F], s: F) -> Result<()> {
    check_lens("scale_backward", &[("dout", dout.len(), da.len())])?;
    for (d, &g) in da.iter_mut().zip(dout) {
        *d += s * g;
    }
    Ok(())
}

#[inline(always)]
fn sigmoid<F: Real>(x: F) -> F {
    F::one() / (F::one() + (-x).exp_fast())
}

#[inline(always)]
fn silu1<F: Real>(x: F) -> F {
    x * sigmoid(x)
}

/// d silu(x) / dx = s + x s (1 - s) with s = sigmoid(x).
#[inline(always)]
fn dsilu<F: Real>(x: F) -> F {
    let s = sigmoid(x);
    s + x * s * (F::one() - s)
}

/// `out = x * sigmoid(x)`.
pub fn silu<F: Real>(out: &mut [F], x: &[F]) -> Result<()> {
    check_lens("silu", &[("x", x.len(), out.len())])?;
    if out.len() >= PAR_MIN {
        out.par_iter_mut().zip(x.par_iter()).for_each(|(o, &v)| *o = silu1(v));
    } else {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = silu1(v);
        }
    }
    Ok(())
}

/// Backward of [`silu`]: `dx = dout * silu'(x)`.
pub fn silu_backward<F: Real>(dx: &mut [F], dout: &[F], x: &[F]) -> Result<()> {
    check_lens(
        "silu_backward",
        &[("dout", dout.len(), dx.len()), ("x", x.len(), dx.len())],
    )?;
    zip2(dx, dout, x, |g, v| g * dsilu(v));
    Ok(())
}

/// SwiGLU: `out = silu(gate) * up`, all `[N * F]`.
pub fn swiglu<F: Real>(out: &mut [F], gate: &[F], up: &[F]) -> Result<()> {
    check_lens(
        "swiglu",
        &[("gate", gate.len(), out.len()), ("up", up.len(), out.len())],
    )?;
    zip2(out, gate, up, |g, u| silu1(g) * u);
    Ok(())
}

/// Backward of [`swiglu`]: `dgate = dout * up * silu'(gate)`, `dup = dout * silu(gate)`.
pub fn swiglu_backward<F: Real>(dgate: &mut [F], dup: &mut [F], dout: &[F], gate: &[F], up: &[F]) -> Result<()> {
    let n = dout.len();
    check_lens(
        "swiglu_backward",
        &[
            ("dgate", dgate.len(), n),
            ("dup", dup.len(), n),
            ("gate", gate.len(), n),
            ("up", up.len(), n),
        ],
    )?;
    let body = |dg: &mut [F], du: &mut [F], d: &[F], g: &[F], u: &[F]| {
        super::wide(
            #[inline(always)]
            || {
                for i in 0..dg.len().min(du.len()).min(d.len()).min(g.len()).min(u.len()) {
                    let s = sigmoid(g[i]);
                    du[i] = d[i] * g[i] * s;
                    dg[i] = d[i] * u[i] * (s + g[i] * s * (c::<F>(1.0) - s));
                }
            },
        )
    };
    if n >= PAR_MIN {
        dgate
            .par_chunks_mut(PAR_CHUNK)
            .zip(dup.par_chunks_mut(PAR_CHUNK))
            .zip(dout.par_chunks(PAR_CHUNK))
            .zip(gate.par_chunks(PAR_CHUNK).zip(up.par_chunks(PAR_CHUNK)))
            .for_each(|(((dg, du), d), (g, u))| body(dg, du, d, g, u));
    } else {
        body(dgate, dup, dout, gate, up);
    }
    Ok(())
}

/// The block of columns `s` from `inp` into `out` (GPU twin `copy_cols_f32`):
/// `out[r * out_stride + out_off + j]` is assigned (or, with `accumulate`,
/// increased by) the sum over `q < group` of `inp[((r / rep) * group + q) *
/// in_stride + in_off + j]`, summed in `q` order.
pub fn copy_cols<F: Real>(out: &mut [F], inp: &[F], s: &aha_cuda_kernels::launch::ColsCopy) -> Result<()> {
    let (need_out, need_in) = s.lens()?;
    check_lens(
        "copy_cols",
        &[("out", out.len(), need_out), ("inp", inp.len(), need_in)],
    )?;
    for r in 0..s.rows {
        let base = (r / s.rep) * s.group;
        let o = &mut out[r * s.out_stride + s.out_off..][..s.cols];
        for (j, oj) in o.iter_mut().enumerate() {
            let mut acc = F::zero();
            for q in 0..s.group {
                acc += inp[(base + q) * s.in_stride + s.in_off + j];
            }
            *oj = if s.accumulate { *oj + acc } else { acc };
        }
    }
    Ok(())
}
