//! Skinny products `out[M, N] (+)= a[M, K] b[N, K]^T` for few rows of `a`
//! (decode batches, per-expert row groups: M up to [`SKINNY_M`]), with `b`
//! a weight in PyTorch's [out, in] layout.
//!
//! Each output is a dot product of two contiguous rows, so the weight
//! streams once with no packing (the general kernel packs the weight for
//! every call, which dominates at these row counts). The x86-64 kernels
//! register-block four weight rows against up to four rows of `a`
//! (AVX-512: 16 accumulators; AVX2 + FMA: two rows, 8 accumulators), so a
//! weight vector is loaded once per block of rows and each `a` vector once
//! per four weight rows; the four sums of a row reduce together (one
//! transposing reduction of four vectors instead of four horizontal ones),
//! and the weight is prefetched ahead in memory order. One or two rows
//! (an expert's rows in a decode step) stream one weight row at a time
//! instead: four interleaved rows stream more slowly from memory, and there
//! is little reuse of `a` to gain. The portable twin does one dot product
//! at a time. Measurements: docs/cpu-speed.md ("The decode step's kernels").

use rayon::prelude::*;

use crate::Real;

/// Rows of `a` at or below which `a b^T` runs here rather than in the
/// packing general kernel.
pub(crate) const SKINNY_M: usize = 32;

/// [`SKINNY_M`] under bf16 products (`set_product_precision`): products of
/// more rows take the bf16 kernel, so the rows a product rounds to bf16 are
/// the same as when this kernel stopped at eight rows.
pub(crate) const SKINNY_M_BF16: usize = 8;

/// Weight elements (`N * K`) from which a product splits its columns across
/// the pool.
const PARALLEL_MIN_WEIGHTS: usize = 1 << 16;

/// The output as a raw base pointer with a row stride, shared by the tasks
/// of a column-parallel product (each writes its own columns).
#[derive(Clone, Copy)]
struct OutPtr<F>(*mut F);
// SAFETY: tasks write disjoint column ranges of the same buffer, and the
// buffer outlives the parallel loop (it is borrowed mutably by the caller).
unsafe impl<F> Send for OutPtr<F> {}
// SAFETY: as above.
unsafe impl<F> Sync for OutPtr<F> {}

/// `out[m, n] (+)= a[m, k] b[n, k]^T`; `out`, `a` and `b` hold exactly
/// `m n`, `m k` and `n k` elements (the caller checked). With `parallel`,
/// large weights are split into column blocks over the pool.
#[allow(clippy::too_many_arguments)]
pub(crate) fn skinny_abt<F: Real>(
    out: &mut [F],
    a: &[F],
    b: &[F],
    m: usize,
    k: usize,
    n: usize,
    acc: bool,
    parallel: bool,
) {
    debug_assert!(out.len() == m * n && a.len() == m * k && b.len() == n * k);
    let threads = rayon::current_num_threads();
    let base = OutPtr(out.as_mut_ptr());
    if parallel && threads > 1 && n * k >= PARALLEL_MIN_WEIGHTS {
        // Column blocks of a multiple of 4 (the kernels' block), about four per thread.
        let per = (n.div_ceil(4 * threads)).next_multiple_of(4).max(16);
        (0..n.div_ceil(per)).into_par_iter().for_each(|blk| {
            let j0 = blk * per;
            let w = per.min(n - j0);
            let o = base;
            // SAFETY: columns j0 .. j0 + w of rows 0 .. m lie inside `out`
            // (m * n elements, row stride n); blocks are disjoint.
            unsafe { cols_best(o.0.add(j0), n, a, b, j0, w, m, k, acc) };
        });
    } else {
        // SAFETY: all n columns of the m rows of `out`, row stride n.
        unsafe { cols_best(base.0, n, a, b, 0, n, m, k, acc) };
    }
}

/// Columns `j0 .. j0 + w` of `a b^T` into `out` (element (i, jj) at
/// `out + i * ldo + jj`), through the widest vector unit the CPU has for f32.
///
/// # Safety
/// `out` must address `m` rows of stride `ldo` with `w` writable columns
/// each; `a` holds `m k` and `b` at least `(j0 + w) k` elements.
#[allow(clippy::too_many_arguments)]
unsafe fn cols_best<F: Real>(
    out: *mut F,
    ldo: usize,
    a: &[F],
    b: &[F],
    j0: usize,
    w: usize,
    m: usize,
    k: usize,
    acc: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if std::any::TypeId::of::<F>() == std::any::TypeId::of::<f32>() {
        let cast = |x: &[F]| -> &[f32] {
            // SAFETY: F is f32 (checked above): same layout.
            unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<f32>(), x.len()) }
        };
        let (o, a32, b32) = (out.cast::<f32>(), cast(a), cast(b));
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F; the caller's contract covers the rest.
            unsafe { x86::cols_avx512(o, ldo, a32, b32, j0, w, m, k, acc) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA; as above.
            unsafe { x86::cols_avx2(o, ldo, a32, b32, j0, w, m, k, acc) };
            return;
        }
    }
    // SAFETY: the caller's contract.
    unsafe { cols_portable(out, ldo, a, b, j0, w, m, k, acc) }
}

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

/// The portable twin of the x86 kernels: one dot product per output.
///
/// # Safety
/// As [`cols_best`].
#[allow(clippy::too_many_arguments)]
unsafe fn cols_portable<F: Real>(
    out: *mut F,
    ldo: usize,
    a: &[F],
    b: &[F],
    j0: usize,
    w: usize,
    m: usize,
    k: usize,
    acc: bool,
) {
    for (jj, bj) in b[j0 * k..(j0 + w) * k].chunks_exact(k).enumerate() {
        for i in 0..m {
            let v = dot(&a[i * k..(i + 1) * k], bj);
            // SAFETY: (i, jj) is inside the caller's m x w window.
            let o = unsafe { &mut *out.add(i * ldo + jj) };
            *o = if acc { *o + v } else { v };
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    /// How far ahead (in weight rows) the kernels prefetch the weight.
    const PREFETCH_ROWS: usize = 8;

    /// Prefetches the four cache lines of the weight `PREFETCH_ROWS` rows
    /// past the block at `w0` that the step at offset `p` (of 16 per four
    /// rows) stands for, in memory order. Reading four rows side by side
    /// halves the rate at which the hardware streams them from memory
    /// (measured: docs/cpu-speed.md); prefetching the rows ahead as one
    /// sequential run restores it. Prefetches never fault, so addresses
    /// past the weight's end are harmless.
    #[inline(always)]
    fn prefetch_ahead(w0: *const f32, k: usize, p: usize) {
        let base = w0.wrapping_add(PREFETCH_ROWS * k + p * 4);
        for t in 0..4 {
            // SAFETY: a prefetch is a hint: it reads nothing and never faults.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(t * 16).cast::<i8>()) };
        }
    }

    /// Writes (or adds) the first `c` of four sums to `out`.
    ///
    /// # Safety
    /// `out .. out + c` writable.
    #[inline(always)]
    unsafe fn put(out: *mut f32, s: __m128, c: usize, acc: bool) {
        let mut v = [0f32; 4];
        // SAFETY: `v` holds four floats; `out` as the contract says.
        unsafe {
            _mm_storeu_ps(v.as_mut_ptr(), s);
            for (x, &vx) in v.iter().enumerate().take(c) {
                let o = out.add(x);
                *o = if acc { *o + vx } else { vx };
            }
        }
    }

    /// The four total sums of `a0 .. a3` (16 lanes each), in order: one
    /// transposing reduction instead of four horizontal ones.
    ///
    /// # Safety
    /// The CPU must have AVX-512F (safe to call from code compiled with it).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub fn reduce4_512(a: [__m512; 4]) -> __m128 {
        // Per 128-bit lane: [a0 02, a1 02, a0 13, a1 13] and the same for a2, a3.
        let t01 = _mm512_add_ps(_mm512_unpacklo_ps(a[0], a[1]), _mm512_unpackhi_ps(a[0], a[1]));
        let t23 = _mm512_add_ps(_mm512_unpacklo_ps(a[2], a[3]), _mm512_unpackhi_ps(a[2], a[3]));
        // Per lane: [a0, a1, a2, a3] partial sums.
        let (p01, p23) = (_mm512_castps_pd(t01), _mm512_castps_pd(t23));
        let u = _mm512_add_ps(
            _mm512_castpd_ps(_mm512_unpacklo_pd(p01, p23)),
            _mm512_castpd_ps(_mm512_unpackhi_pd(p01, p23)),
        );
        // Fold the four 128-bit lanes.
        let v = _mm512_add_ps(u, _mm512_shuffle_f32x4(u, u, 0b01_00_11_10));
        let v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0b10_11_00_01));
        _mm512_castps512_ps128(v)
    }

    /// The four total sums of `a0 .. a3` (8 lanes each), in order.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn reduce4_256(a: [__m256; 4]) -> __m128 {
        let h = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1))
    }

    /// `R` rows of `a` (at `ar`, stride `k`) against the four weight rows
    /// `wp`, written to the first `c` columns of `R` rows at `out` (stride
    /// `ldo`). Weight rows past `c` repeat a valid one; their sums are dropped.
    ///
    /// # Safety
    /// AVX-512F; `k` readable elements behind each row; the output window writable.
    #[inline]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block_avx512<const R: usize>(
        out: *mut f32,
        ldo: usize,
        ar: *const f32,
        wp: [*const f32; 4],
        k: usize,
        c: usize,
        acc: bool,
    ) {
        let mut s = [[_mm512_setzero_ps(); 4]; R];
        let kl = k / 16 * 16;
        let mut p = 0;
        // SAFETY (all loads): inside the rows by the contract; the tail's
        // masked loads touch only the k - kl elements left.
        unsafe {
            while p < kl {
                prefetch_ahead(wp[0], k, p);
                let (w0, w1, w2, w3) = (
                    _mm512_loadu_ps(wp[0].add(p)),
                    _mm512_loadu_ps(wp[1].add(p)),
                    _mm512_loadu_ps(wp[2].add(p)),
                    _mm512_loadu_ps(wp[3].add(p)),
                );
                for (r, sr) in s.iter_mut().enumerate() {
                    let x = _mm512_loadu_ps(ar.add(r * k + p));
                    sr[0] = _mm512_fmadd_ps(x, w0, sr[0]);
                    sr[1] = _mm512_fmadd_ps(x, w1, sr[1]);
                    sr[2] = _mm512_fmadd_ps(x, w2, sr[2]);
                    sr[3] = _mm512_fmadd_ps(x, w3, sr[3]);
                }
                p += 16;
            }
            if kl < k {
                let mask: __mmask16 = ((1u32 << (k - kl)) - 1) as u16;
                let w = [
                    _mm512_maskz_loadu_ps(mask, wp[0].add(p)),
                    _mm512_maskz_loadu_ps(mask, wp[1].add(p)),
                    _mm512_maskz_loadu_ps(mask, wp[2].add(p)),
                    _mm512_maskz_loadu_ps(mask, wp[3].add(p)),
                ];
                for (r, sr) in s.iter_mut().enumerate() {
                    let x = _mm512_maskz_loadu_ps(mask, ar.add(r * k + p));
                    for (sx, &wx) in sr.iter_mut().zip(&w) {
                        *sx = _mm512_fmadd_ps(x, wx, *sx);
                    }
                }
            }
            for (r, &sr) in s.iter().enumerate() {
                put(out.add(r * ldo), reduce4_512(sr), c, acc);
            }
        }
    }

    /// [`block_avx512`] in 8 lanes, for AVX2 + FMA (R at most 2: 8
    /// accumulators of 16 registers).
    ///
    /// # Safety
    /// AVX2 and FMA; as [`block_avx512`].
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block_avx2<const R: usize>(
        out: *mut f32,
        ldo: usize,
        ar: *const f32,
        wp: [*const f32; 4],
        k: usize,
        c: usize,
        acc: bool,
    ) {
        let mut s = [[_mm256_setzero_ps(); 4]; R];
        let kl = k / 8 * 8;
        let mut p = 0;
        // SAFETY (all loads): as in `block_avx512`; the tail's masked loads
        // read only lanes below k - kl.
        unsafe {
            while p < kl {
                if p % 16 == 0 {
                    prefetch_ahead(wp[0], k, p);
                }
                let (w0, w1, w2, w3) = (
                    _mm256_loadu_ps(wp[0].add(p)),
                    _mm256_loadu_ps(wp[1].add(p)),
                    _mm256_loadu_ps(wp[2].add(p)),
                    _mm256_loadu_ps(wp[3].add(p)),
                );
                for (r, sr) in s.iter_mut().enumerate() {
                    let x = _mm256_loadu_ps(ar.add(r * k + p));
                    sr[0] = _mm256_fmadd_ps(x, w0, sr[0]);
                    sr[1] = _mm256_fmadd_ps(x, w1, sr[1]);
                    sr[2] = _mm256_fmadd_ps(x, w2, sr[2]);
                    sr[3] = _mm256_fmadd_ps(x, w3, sr[3]);
                }
                p += 8;
            }
            if kl < k {
                let mask = _mm256_cmpgt_epi32(
                    _mm256_set1_epi32((k - kl) as i32),
                    _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                );
                let w = [
                    _mm256_maskload_ps(wp[0].add(p), mask),
                    _mm256_maskload_ps(wp[1].add(p), mask),
                    _mm256_maskload_ps(wp[2].add(p), mask),
                    _mm256_maskload_ps(wp[3].add(p), mask),
                ];
                for (r, sr) in s.iter_mut().enumerate() {
                    let x = _mm256_maskload_ps(ar.add(r * k + p), mask);
                    for (sx, &wx) in sr.iter_mut().zip(&w) {
                        *sx = _mm256_fmadd_ps(x, wx, *sx);
                    }
                }
            }
            for (r, &sr) in s.iter().enumerate() {
                put(out.add(r * ldo), reduce4_256(sr), c, acc);
            }
        }
    }

    /// Writes (or adds) one sum to `out`.
    ///
    /// # Safety
    /// `out` writable.
    #[inline(always)]
    unsafe fn put1(out: *mut f32, v: f32, acc: bool) {
        // SAFETY: as the contract says.
        unsafe { *out = if acc { *out + v } else { v } };
    }

    /// `R` (one or two) rows of `a` against the one weight row at `wr`,
    /// written to column 0 of `R` rows at `out`: the weight streams as one
    /// sequential run (the block kernels' four interleaved rows stream more
    /// slowly from memory, and at one or two rows there is little reuse of
    /// `a` to gain).
    ///
    /// # Safety
    /// AVX-512F; `k` readable elements behind each row; the outputs writable.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn row_avx512<const R: usize>(
        out: *mut f32,
        ldo: usize,
        ar: *const f32,
        wr: *const f32,
        k: usize,
        acc: bool,
    ) {
        let mut s = [_mm512_setzero_ps(); R];
        let kl = k / 16 * 16;
        let mut p = 0;
        // SAFETY (all loads): inside the rows; the tail's masked loads
        // touch only the k - kl elements left.
        unsafe {
            while p < kl {
                let w = _mm512_loadu_ps(wr.add(p));
                for (r, sr) in s.iter_mut().enumerate() {
                    *sr = _mm512_fmadd_ps(_mm512_loadu_ps(ar.add(r * k + p)), w, *sr);
                }
                p += 16;
            }
            if kl < k {
                let mask: __mmask16 = ((1u32 << (k - kl)) - 1) as u16;
                let w = _mm512_maskz_loadu_ps(mask, wr.add(p));
                for (r, sr) in s.iter_mut().enumerate() {
                    *sr = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, ar.add(r * k + p)), w, *sr);
                }
            }
            for (r, &sr) in s.iter().enumerate() {
                put1(out.add(r * ldo), _mm512_reduce_add_ps(sr), acc);
            }
        }
    }

    /// [`row_avx512`] in 8 lanes, for AVX2 + FMA.
    ///
    /// # Safety
    /// AVX2 and FMA; as [`row_avx512`].
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn row_avx2<const R: usize>(out: *mut f32, ldo: usize, ar: *const f32, wr: *const f32, k: usize, acc: bool) {
        let mut s = [_mm256_setzero_ps(); R];
        let kl = k / 8 * 8;
        let mut p = 0;
        // SAFETY (all loads): as in `row_avx512`.
        unsafe {
            while p < kl {
                let w = _mm256_loadu_ps(wr.add(p));
                for (r, sr) in s.iter_mut().enumerate() {
                    *sr = _mm256_fmadd_ps(_mm256_loadu_ps(ar.add(r * k + p)), w, *sr);
                }
                p += 8;
            }
            if kl < k {
                let mask = _mm256_cmpgt_epi32(
                    _mm256_set1_epi32((k - kl) as i32),
                    _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                );
                let w = _mm256_maskload_ps(wr.add(p), mask);
                for (r, sr) in s.iter_mut().enumerate() {
                    *sr = _mm256_fmadd_ps(_mm256_maskload_ps(ar.add(r * k + p), mask), w, *sr);
                }
            }
            for (r, &sr) in s.iter().enumerate() {
                let h = _mm_add_ps(_mm256_castps256_ps128(sr), _mm256_extractf128_ps(sr, 1));
                let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
                let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
                put1(out.add(r * ldo), _mm_cvtss_f32(h), acc);
            }
        }
    }

    macro_rules! cols {
        ($name:ident, $feat:literal, $row:ident, $block:ident, $($rows:literal),+) => {
            /// Columns `j0 .. j0 + w` of `a b^T` into `out` (element (i, jj)
            /// at `out + i * ldo + jj`): four weight rows at a time against
            /// blocks of rows of `a`, or one weight row at a time for one
            /// or two rows.
            ///
            /// # Safety
            /// The CPU has the features; otherwise as `cols_best`.
            #[target_feature(enable = $feat)]
            #[allow(clippy::too_many_arguments)]
            pub(super) unsafe fn $name(
                out: *mut f32,
                ldo: usize,
                a: &[f32],
                b: &[f32],
                j0: usize,
                w: usize,
                m: usize,
                k: usize,
                acc: bool,
            ) {
                debug_assert!(a.len() >= m * k && b.len() >= (j0 + w) * k);
                let (ap, bp) = (a.as_ptr(), b.as_ptr());
                if m <= 2 {
                    for jj in 0..w {
                        // SAFETY: weight row j0 + jj is inside `b`; rows
                        // 0 .. m of column jj inside the output window.
                        unsafe {
                            let wr = bp.add((j0 + jj) * k);
                            if m == 2 {
                                $row::<2>(out.add(jj), ldo, ap, wr, k, acc);
                            } else {
                                $row::<1>(out.add(jj), ldo, ap, wr, k, acc);
                            }
                        }
                    }
                    return;
                }
                let mut jb = 0;
                while jb < w {
                    let c = 4.min(w - jb);
                    // SAFETY: weight rows j0 + jb + x for x < c are inside `b`;
                    // rows past `c` repeat the block's first one.
                    let wp = unsafe {
                        let row = |x: usize| bp.add((j0 + jb + if x < c { x } else { 0 }) * k);
                        [row(0), row(1), row(2), row(3)]
                    };
                    let mut i = 0;
                    // SAFETY (blocks): rows i .. i + R of `a` and of the
                    // output window, columns jb .. jb + c.
                    $(
                        while m - i >= $rows {
                            unsafe { $block::<$rows>(out.add(i * ldo + jb), ldo, ap.add(i * k), wp, k, c, acc) };
                            i += $rows;
                        }
                    )+
                    jb += 4;
                }
            }
        };
    }

    cols!(cols_avx512, "avx512f", row_avx512, block_avx512, 4, 3, 2, 1);
    cols!(cols_avx2, "avx2,fma", row_avx2, block_avx2, 2, 1);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `a b^T` in f64 from the definition.
    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|p| a[i * k + p] as f64 * b[j * k + p] as f64).sum();
            }
        }
        out
    }

    fn random(rng: &mut crate::rng::SplitMix64, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.unit() as f32 - 0.5).collect()
    }

    /// Runs one window (j0, w) of a product with every kernel this CPU has,
    /// writing into a wider output (stride `ldo > w`) that starts from
    /// `init`, and checks each against the f64 definition; cells outside the
    /// window must be untouched.
    fn check_window(m: usize, k: usize, n: usize, j0: usize, w: usize, acc: bool, seed: u64) {
        let mut rng = crate::rng::SplitMix64(seed);
        let (a, b) = (random(&mut rng, m * k), random(&mut rng, n * k));
        let ldo = w + 3;
        let init = random(&mut rng, m * ldo);
        let full = naive(&a, &b, m, k, n);
        let tol = 1e-5 * (k as f64).sqrt() + 1e-6;
        type Kernel = unsafe fn(*mut f32, usize, &[f32], &[f32], usize, usize, usize, usize, bool);
        let mut kernels: Vec<(&str, Kernel)> = vec![("portable", cols_portable::<f32>)];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                kernels.push(("avx512", x86::cols_avx512));
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                kernels.push(("avx2", x86::cols_avx2));
            }
        }
        for (name, kern) in kernels {
            let mut got = init.clone();
            // SAFETY: got holds m rows of stride ldo >= w; a and b hold m k and n k >= (j0 + w) k.
            unsafe { kern(got.as_mut_ptr(), ldo, &a, &b, j0, w, m, k, acc) };
            for i in 0..m {
                for jj in 0..ldo {
                    let (g, s) = (got[i * ldo + jj] as f64, init[i * ldo + jj] as f64);
                    if jj >= w {
                        assert_eq!(
                            g, s,
                            "{name}: m {m} k {k} n {n} wrote outside the window at ({i}, {jj})"
                        );
                        continue;
                    }
                    let want = full[i * n + j0 + jj] + if acc { s } else { 0.0 };
                    assert!(
                        (g - want).abs() <= tol,
                        "{name}: m {m} k {k} n {n} j0 {j0} w {w} acc {acc} at ({i}, {jj}): {g} vs {want}"
                    );
                }
            }
        }
    }

    /// Every row count up to the limit, contracted lengths around both
    /// vector widths (odd ones included), windows that are not multiples of
    /// the four-column block, with and without accumulation.
    #[test]
    fn kernels_match_the_definition_on_edge_sizes() {
        let mut seed = 1;
        for m in 1..=SKINNY_M {
            for k in [1, 7, 8, 9, 15, 16, 17, 31, 33, 100, 256] {
                for (n, j0, w) in [(1, 0, 1), (5, 0, 5), (13, 3, 9), (8, 4, 4)] {
                    seed += 1;
                    check_window(m, k, n, j0, w, seed % 2 == 0, seed);
                }
            }
        }
    }

    /// The dispatching entry, serial and column-parallel (a weight large
    /// enough to split, N not a multiple of the block), against the
    /// definition and with accumulation into existing values.
    #[test]
    fn whole_products_match_serial_and_parallel() {
        let mut rng = crate::rng::SplitMix64(77);
        for (m, k, n) in [(1, 256, 4099), (16, 255, 1030), (32, 129, 517), (3, 256, 256)] {
            let (a, b) = (random(&mut rng, m * k), random(&mut rng, n * k));
            let init = random(&mut rng, m * n);
            let want = naive(&a, &b, m, k, n);
            for parallel in [false, true] {
                for acc in [false, true] {
                    let mut got = init.clone();
                    skinny_abt(&mut got, &a, &b, m, k, n, acc, parallel);
                    for (idx, (&g, &w)) in got.iter().zip(&want).enumerate() {
                        let w = w + if acc { init[idx] as f64 } else { 0.0 };
                        assert!(
                            (g as f64 - w).abs() <= 1e-4,
                            "m {m} k {k} n {n} parallel {parallel} acc {acc} at {idx}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    /// f64 takes the portable path and stays exact to f64 rounding.
    #[test]
    fn f64_products_use_the_portable_path() {
        let (m, k, n) = (5, 19, 7);
        let a: Vec<f64> = (0..m * k).map(|i| (i % 7) as f64 - 3.0).collect();
        let b: Vec<f64> = (0..n * k).map(|i| (i % 5) as f64 - 2.0).collect();
        let mut got = vec![0f64; m * n];
        skinny_abt(&mut got, &a, &b, m, k, n, false, false);
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k).map(|p| a[i * k + p] * b[j * k + p]).sum();
                assert_eq!(got[i * n + j], want);
            }
        }
    }
}
