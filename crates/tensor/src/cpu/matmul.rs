//! Matrix products over row-major buffers, through the `gemm` crate
//! (chosen over `matrixmultiply` by benchmark: see docs/cpu-matmul.md).
//!
//! | name | shape |
//! |---|---|
//! | out | [M, N] |
//! | a   | [M, K], or [K, M] when `trans_a` |
//! | b   | [K, N], or [N, K] when `trans_b` |
//!
//! Linear layers store the weight as [out, in] (PyTorch's convention), so the
//! forward is `matmul(y, x, w, T, IN, OUT, false, true, false)`; its backward
//! is `dx = dy w` (`false, false`) and `dw += dy^T x` (`true, false`, accumulate).

use crate::error::{check_lens, Result};
use crate::Real;

/// Below this many multiply-adds a product runs on one thread.
const PARALLEL_MIN_FLOPS: usize = 1 << 18;

/// The layout of one product: `out[M, N] (+)= op(a)[M, K] op(b)[K, N]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gemm {
    /// Rows of `out`.
    pub m: usize,
    /// The contracted dimension.
    pub k: usize,
    /// Columns of `out`.
    pub n: usize,
    /// `a` is stored [K, M].
    pub trans_a: bool,
    /// `b` is stored [N, K].
    pub trans_b: bool,
    /// Add to `out` instead of overwriting it.
    pub accumulate: bool,
}

impl Gemm {
    /// `out[m, n] = a[m, k] b[k, n]`, no transposes, overwrite.
    pub fn new(m: usize, k: usize, n: usize) -> Gemm {
        Gemm {
            m,
            k,
            n,
            trans_a: false,
            trans_b: false,
            accumulate: false,
        }
    }
    /// With `a` stored transposed.
    pub fn ta(mut self) -> Gemm {
        self.trans_a = true;
        self
    }
    /// With `b` stored transposed.
    pub fn tb(mut self) -> Gemm {
        self.trans_b = true;
        self
    }
    /// Accumulating into `out`.
    pub fn acc(mut self) -> Gemm {
        self.accumulate = true;
        self
    }
}

/// `out (+)= op(a) op(b)` for one matrix (see the module table).
pub fn matmul<F: Real>(out: &mut [F], a: &[F], b: &[F], g: Gemm) -> Result<()> {
    matmul_batched(out, a, b, 1, g)
}

/// `batch` independent products over consecutive matrices of each buffer.
pub fn matmul_batched<F: Real>(out: &mut [F], a: &[F], b: &[F], batch: usize, g: Gemm) -> Result<()> {
    if !prelude(out, a, b, batch, g)? {
        return Ok(());
    }
    let Gemm { m, k, n, .. } = g;
    let flops = m * n * k;
    let threads = rayon::current_num_threads();
    if batch > 1 && flops < PARALLEL_MIN_FLOPS * 4 && threads > 1 {
        // Many small products: one per task, each single-threaded.
        use rayon::prelude::*;
        out.par_chunks_mut(m * n)
            .zip(a.par_chunks(m * k))
            .zip(b.par_chunks(k * n))
            .for_each(|((o, a), b)| gemm_one(o, a, b, g, gemm::Parallelism::None));
        return Ok(());
    }
    let par = if flops >= PARALLEL_MIN_FLOPS && threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    for i in 0..batch {
        gemm_one(
            &mut out[i * m * n..(i + 1) * m * n],
            &a[i * m * k..(i + 1) * m * k],
            &b[i * k * n..(i + 1) * k * n],
            g,
            par,
        );
    }
    Ok(())
}

/// Rows of `a` at or below which `a b^T` runs as dot products (decode batches).
const SKINNY_M: usize = 8;

/// Dot product in eight lanes (vectorizable).
#[inline]
fn dot<F: Real>(x: &[F], y: &[F]) -> F {
    let mut lanes = [F::zero(); 8];
    let (cx, cy) = (x.chunks_exact(8), y.chunks_exact(8));
    let tail = cx
        .remainder()
        .iter()
        .zip(cy.remainder())
        .fold(F::zero(), |s, (&a, &b)| s + a * b);
    for (a, b) in cx.zip(cy) {
        for i in 0..8 {
            lanes[i] += a[i] * b[i];
        }
    }
    lanes.iter().fold(tail, |s, &v| s + v)
}

/// `out[m, n] (+)= a[m, k] b[n, k]^T` for a few rows of `a`: each output is
/// a dot product of two contiguous rows, so the weight matrix streams once
/// with no packing (the general kernel's packing dominates at m <= 8).
fn skinny_abt<F: Real>(out: &mut [F], a: &[F], b: &[F], g: Gemm, parallel: bool) {
    let Gemm { m, k, n, .. } = g;
    let cols = |j0: usize, chunk: &mut [F]| {
        // chunk holds out[.., j0 .. j0 + w] for every row, row-major in (row, j).
        let w = chunk.len() / m;
        for (jj, bj) in b[j0 * k..(j0 + w) * k].chunks_exact(k).enumerate() {
            for i in 0..m {
                let v = dot(&a[i * k..(i + 1) * k], bj);
                let o = &mut chunk[i * w + jj];
                *o = if g.accumulate { *o + v } else { v };
            }
        }
    };
    if parallel && n * k >= 1 << 16 {
        use rayon::prelude::*;
        let per = (n / (4 * rayon::current_num_threads())).max(16);
        // Compute column blocks into scratch, then scatter into the rows.
        let blocks: Vec<(usize, Vec<F>)> = (0..n)
            .step_by(per)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|j0| {
                let w = per.min(n - j0);
                let mut chunk = vec![F::zero(); m * w];
                if g.accumulate {
                    for i in 0..m {
                        chunk[i * w..(i + 1) * w].copy_from_slice(&out[i * n + j0..i * n + j0 + w]);
                    }
                }
                cols(j0, &mut chunk);
                (j0, chunk)
            })
            .collect();
        for (j0, chunk) in blocks {
            let w = chunk.len() / m;
            for i in 0..m {
                out[i * n + j0..i * n + j0 + w].copy_from_slice(&chunk[i * w..(i + 1) * w]);
            }
        }
    } else if m == 1 {
        cols(0, out);
    } else {
        let mut chunk = vec![F::zero(); m * n];
        if g.accumulate {
            chunk.copy_from_slice(out);
        }
        cols(0, &mut chunk);
        out.copy_from_slice(&chunk);
    }
}

/// One product; the caller checked every length.
fn gemm_one<F: Real>(out: &mut [F], a: &[F], b: &[F], g: Gemm, par: gemm::Parallelism) {
    let Gemm { m, k, n, .. } = g;
    if m <= SKINNY_M && g.trans_b && !g.trans_a {
        skinny_abt(out, a, b, g, matches!(par, gemm::Parallelism::Rayon(_)));
        return;
    }
    debug_assert!(out.len() == m * n && a.len() == m * k && b.len() == k * n);
    let (m_i, k_i, n_i) = (m as isize, k as isize, n as isize);
    // Element (i, p) of op(a) is at i * rs + p * cs.
    let (a_rs, a_cs) = if g.trans_a { (1, m_i) } else { (k_i, 1) };
    let (b_rs, b_cs) = if g.trans_b { (1, k_i) } else { (n_i, 1) };
    // SAFETY: the buffers hold exactly m*n, m*k and k*n elements (checked by
    // the caller), and the strides above address only inside them. `F` is
    // f32 or f64 (sealed trait), both supported by `gemm`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n_i,
            g.accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            F::one(),
            F::one(),
            false,
            false,
            false,
            par,
        );
    }
}

/// One product on the calling thread, for kernels that already run inside a
/// parallel loop. Same contract as [`matmul`].
pub(crate) fn matmul_serial<F: Real>(out: &mut [F], a: &[F], b: &[F], g: Gemm) -> Result<()> {
    if prelude(out, a, b, 1, g)? {
        gemm_one(out, a, b, g, gemm::Parallelism::None);
    }
    Ok(())
}

/// Checks lengths and handles the empty cases; true when a product remains.
fn prelude<F: Real>(out: &mut [F], a: &[F], b: &[F], batch: usize, g: Gemm) -> Result<bool> {
    let Gemm { m, k, n, .. } = g;
    check_lens(
        "matmul",
        &[
            ("out", out.len(), batch * m * n),
            ("a", a.len(), batch * m * k),
            ("b", b.len(), batch * k * n),
        ],
    )?;
    if m == 0 || n == 0 {
        return Ok(false);
    }
    if k == 0 {
        if !g.accumulate {
            out.fill(F::zero());
        }
        return Ok(false);
    }
    Ok(true)
}
