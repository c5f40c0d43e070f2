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
    crate::profile::add_flops(2 * (flops * batch) as u64);
    // Inside a pool task the caller already spreads work over the cores:
    // the product runs on this thread.
    let threads = match rayon::current_thread_index() {
        Some(_) => 1,
        None => rayon::current_num_threads(),
    };
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

/// One product; the caller checked every length.
fn gemm_one<F: Real>(out: &mut [F], a: &[F], b: &[F], g: Gemm, par: gemm::Parallelism) {
    let Gemm { m, k, n, .. } = g;
    let bf16 = super::bf16::product_precision() == super::bf16::ProductPrecision::Bf16;
    // Under bf16 products only products of at most SKINNY_M_BF16 rows (the
    // decode groups' dot products) stay f32; larger ones round to bf16.
    let skinny_max = if bf16 {
        super::skinny::SKINNY_M_BF16
    } else {
        super::skinny::SKINNY_M
    };
    if m <= skinny_max && g.trans_b && !g.trans_a {
        let parallel = matches!(par, gemm::Parallelism::Rayon(_));
        super::skinny::skinny_abt(out, a, b, m, k, n, g.accumulate, parallel);
        return;
    }
    if bf16 {
        if let Some((o, a, b)) = F::as_f32(out, a, b) {
            super::bf16::gemm_bf16(o, a, b, g, matches!(par, gemm::Parallelism::Rayon(_)));
            return;
        }
    }
    gemm_crate(out, a, b, g, par);
}

/// An f32 product through the `gemm` crate whatever the product precision
/// (the bf16 twin's second half, and the tests' f32 side).
pub(crate) fn gemm_f32_only(out: &mut [f32], a: &[f32], b: &[f32], g: Gemm, parallel: bool) {
    let par = match (parallel, rayon::current_num_threads()) {
        (true, t) if t > 1 => gemm::Parallelism::Rayon(t),
        _ => gemm::Parallelism::None,
    };
    gemm_crate(out, a, b, g, par);
}

/// The product through the `gemm` crate; the caller checked every length.
fn gemm_crate<F: Real>(out: &mut [F], a: &[F], b: &[F], g: Gemm, par: gemm::Parallelism) {
    let Gemm { m, k, n, .. } = g;
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
