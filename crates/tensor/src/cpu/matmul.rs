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

/// Columns `j0 .. j0 + w` of `out[m, n] (+)= a[m, k] b[n, k]^T` into `chunk`
/// (row-major [m, w]), with the portable dot product.
fn skinny_cols<F: Real>(chunk: &mut [F], a: &[F], b: &[F], j0: usize, g: Gemm) {
    let Gemm { m, k, .. } = g;
    let w = chunk.len() / m;
    for (jj, bj) in b[j0 * k..(j0 + w) * k].chunks_exact(k).enumerate() {
        for i in 0..m {
            let v = dot(&a[i * k..(i + 1) * k], bj);
            let o = &mut chunk[i * w + jj];
            *o = if g.accumulate { *o + v } else { v };
        }
    }
}

/// x86-64 kernels of the skinny product for f32, chosen at run time: rows of
/// `a` four at a time against each weight row, so every weight element is
/// loaded once per four rows and multiplied with fused multiply-adds in
/// 16 (AVX-512) or 8 (AVX2) lanes.
#[cfg(target_arch = "x86_64")]
mod skinny_x86 {
    use std::arch::x86_64::*;

    macro_rules! kernel {
        ($name:ident, $block:ident, $feat:literal, $lanes:literal, $vt:ty, $zero:ident, $load:ident, $fma:ident, $reduce:expr) => {
            /// `R` dot products of length `k` (rows at `rows[r]`) with the weight row at `bj`.
            #[target_feature(enable = $feat)]
            #[inline]
            unsafe fn $block<const R: usize>(rows: [*const f32; R], bj: *const f32, k: usize) -> [f32; R] {
                let kl = k / $lanes * $lanes;
                let mut acc: [$vt; R] = [$zero(); R];
                let mut c = 0;
                // SAFETY (all reads): the caller guarantees `k` readable
                // elements behind every row pointer and behind `bj`.
                while c < kl {
                    let wv = unsafe { $load(bj.add(c)) };
                    for r in 0..R {
                        acc[r] = $fma(unsafe { $load(rows[r].add(c)) }, wv, acc[r]);
                    }
                    c += $lanes;
                }
                let mut out = [0f32; R];
                for r in 0..R {
                    let mut s: f32 = $reduce(acc[r]);
                    for t in kl..k {
                        s += unsafe { *rows[r].add(t) * *bj.add(t) };
                    }
                    out[r] = s;
                }
                out
            }

            /// Columns `j0 .. j0 + w` of `a b^T` into `chunk [m, w]`.
            ///
            /// # Safety
            /// The CPU must have the features; `a` holds `m * k` and `b`
            /// `(j0 + w) * k` elements (`w = chunk.len() / m`).
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn $name(
                chunk: &mut [f32],
                a: &[f32],
                b: &[f32],
                j0: usize,
                m: usize,
                k: usize,
                accumulate: bool,
            ) {
                let w = chunk.len() / m;
                let ap = a.as_ptr();
                debug_assert!(a.len() >= m * k && b.len() >= (j0 + w) * k);
                for jj in 0..w {
                    // SAFETY (pointer offsets and blocks): inside `a` and `b` by the contract above.
                    let bj = unsafe { b.as_ptr().add((j0 + jj) * k) };
                    let mut i = 0;
                    let mut put = |i: usize, v: f32| {
                        let o = &mut chunk[i * w + jj];
                        *o = if accumulate { *o + v } else { v };
                    };
                    while i + 4 <= m {
                        let r = unsafe {
                            [
                                ap.add(i * k),
                                ap.add((i + 1) * k),
                                ap.add((i + 2) * k),
                                ap.add((i + 3) * k),
                            ]
                        };
                        let d = unsafe { $block(r, bj, k) };
                        for (t, v) in d.into_iter().enumerate() {
                            put(i + t, v);
                        }
                        i += 4;
                    }
                    while i < m {
                        put(i, unsafe { $block([ap.add(i * k)], bj, k)[0] });
                        i += 1;
                    }
                }
            }
        };
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum256(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    kernel!(
        cols_avx512,
        block_avx512,
        "avx512f",
        16,
        __m512,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_fmadd_ps,
        _mm512_reduce_add_ps
    );
    kernel!(
        cols_avx2,
        block_avx2,
        "avx2,fma",
        8,
        __m256,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_fmadd_ps,
        hsum256
    );
}

/// [`skinny_cols`], for f32 on x86-64 through the widest vector unit the CPU
/// has (AVX-512, else AVX2 + FMA), chosen at run time.
fn skinny_cols_best<F: Real>(chunk: &mut [F], a: &[F], b: &[F], j0: usize, g: Gemm) {
    #[cfg(target_arch = "x86_64")]
    if std::any::TypeId::of::<F>() == std::any::TypeId::of::<f32>() {
        let cast = |x: &[F]| -> &[f32] {
            // SAFETY: F is f32 (checked above): same layout.
            unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<f32>(), x.len()) }
        };
        // SAFETY: as above.
        let out = unsafe { std::slice::from_raw_parts_mut(chunk.as_mut_ptr().cast::<f32>(), chunk.len()) };
        let (a32, b32) = (cast(a), cast(b));
        let w = chunk.len() / g.m;
        debug_assert!(a.len() >= g.m * g.k && b.len() >= (j0 + w) * g.k);
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F; the lengths are the caller's (checked in `matmul`).
            unsafe { skinny_x86::cols_avx512(out, a32, b32, j0, g.m, g.k, g.accumulate) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA; lengths as above.
            unsafe { skinny_x86::cols_avx2(out, a32, b32, j0, g.m, g.k, g.accumulate) };
            return;
        }
    }
    skinny_cols(chunk, a, b, j0, g)
}

/// `out[m, n] (+)= a[m, k] b[n, k]^T` for a few rows of `a`: each output is
/// a dot product of two contiguous rows, so the weight matrix streams once
/// with no packing (the general kernel's packing dominates at m <= 8).
fn skinny_abt<F: Real>(out: &mut [F], a: &[F], b: &[F], g: Gemm, parallel: bool) {
    let Gemm { m, k, n, .. } = g;
    let cols = |j0: usize, chunk: &mut [F]| skinny_cols_best(chunk, a, b, j0, g);
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
    let Gemm { m, .. } = g;
    if m <= SKINNY_M && g.trans_b && !g.trans_a {
        skinny_abt(out, a, b, g, matches!(par, gemm::Parallelism::Rayon(_)));
        return;
    }
    if super::bf16::product_precision() == super::bf16::ProductPrecision::Bf16 {
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

#[cfg(all(test, target_arch = "x86_64"))]
mod skinny_tests {
    use super::*;

    /// Both x86 kernels (whichever this CPU has) against the portable one,
    /// on sizes around the vector width, with and without accumulation.
    #[test]
    fn x86_skinny_kernels_match_the_portable_one() {
        let mut rng = crate::rng::SplitMix64(5);
        for m in 1..=9 {
            for k in [1, 7, 8, 15, 16, 17, 33, 64, 100] {
                for (j0, w) in [(0, 1), (0, 5), (3, 9)] {
                    let g = Gemm {
                        accumulate: m % 2 == 0,
                        ..Gemm::new(m, k, j0 + w)
                    };
                    let mut f = || rng.unit() as f32 - 0.5;
                    let a: Vec<f32> = (0..m * k).map(|_| f()).collect();
                    let b: Vec<f32> = (0..(j0 + w) * k).map(|_| f()).collect();
                    let init: Vec<f32> = (0..m * w).map(|_| f()).collect();
                    let mut want = init.clone();
                    skinny_cols(&mut want, &a, &b, j0, g);
                    let check = |name: &str, got: &[f32]| {
                        for (x, y) in got.iter().zip(&want) {
                            assert!(
                                (x - y).abs() <= 1e-5 * (k as f32).sqrt() + 1e-6,
                                "{name} m {m} k {k}: {x} vs {y}"
                            );
                        }
                    };
                    if std::arch::is_x86_feature_detected!("avx512f") {
                        let mut got = init.clone();
                        // SAFETY: feature checked; lengths as the contract asks.
                        unsafe { skinny_x86::cols_avx512(&mut got, &a, &b, j0, m, k, g.accumulate) };
                        check("avx512", &got);
                    }
                    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                        let mut got = init.clone();
                        // SAFETY: as above.
                        unsafe { skinny_x86::cols_avx2(&mut got, &a, &b, j0, m, k, g.accumulate) };
                        check("avx2", &got);
                    }
                }
            }
        }
    }
}
