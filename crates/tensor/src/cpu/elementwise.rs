//! Element-wise ops: add, mul, scale, SiLU, SwiGLU. All buffers have `n` elements.

use rayon::prelude::*;

use crate::error::{check_lens, Result};
use crate::real::c;
use crate::Real;

const PAR_MIN: usize = 1 << 16;

fn zip2<F: Real>(out: &mut [F], a: &[F], b: &[F], f: impl Fn(F, F) -> F + Sync + Send) {
    if out.len() >= PAR_MIN {
        out.par_iter_mut()
            .zip(a.par_iter().zip(b.par_iter()))
            .for_each(|(o, (&x, &y))| *o = f(x, y));
    } else {
        for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
            *o = f(x, y);
        }
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

#[inline]
fn sigmoid<F: Real>(x: F) -> F {
    F::one() / (F::one() + (-x).exp())
}

#[inline]
fn silu1<F: Real>(x: F) -> F {
    x * sigmoid(x)
}

/// d silu(x) / dx = s + x s (1 - s) with s = sigmoid(x).
#[inline]
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
    type Item<'a, F> = (((&'a mut F, &'a mut F), &'a F), (&'a F, &'a F));
    let body = |(((dg, du), &g), (&u, &d)): Item<'_, F>| {
        let s = sigmoid(g);
        *du = d * g * s;
        *dg = d * u * (s + g * s * (c::<F>(1.0) - s));
    };
    if n >= PAR_MIN {
        dgate
            .par_iter_mut()
            .zip(dup.par_iter_mut())
            .zip(gate.par_iter())
            .zip(up.par_iter().zip(dout.par_iter()))
            .for_each(body);
    } else {
        dgate
            .iter_mut()
            .zip(dup.iter_mut())
            .zip(gate.iter())
            .zip(up.iter().zip(dout.iter()))
            .for_each(body);
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
