//! bf16 products with f32 accumulation for the CPU's f32 matrix products,
//! the CPU's `--precision bf16` (what `torch.autocast("cpu",
//! dtype=torch.bfloat16)` does to PyTorch's products).
//!
//! Off by default. [`set_product_precision`] switches every f32 product
//! of the process that goes through [`crate::cpu::matmul`] (and the
//! kernels built on it: linear layers, experts, attention, the lm head)
//! to bf16 operands: each operand is rounded to bf16 (nearest, ties to
//! even) while it is packed, the products of pairs are exact in f32, and
//! the sums are f32. Process-wide like PyTorch's
//! `torch.set_float32_matmul_precision`, because the products run on pool
//! threads that a thread-local setting would not reach. Products of at most
//! eight rows (decode steps' dot products) and f64 products stay as they
//! are.
//!
//! On CPUs with AVX512-BF16 the kernel is `vdpbf16ps` (32 multiply-adds
//! an instruction, twice the f32 FMA rate) over operands packed in pairs
//! along the contracted dimension, an 8 x 32 register tile per call; a
//! CPU without it gets the portable twin: the operands rounded to bf16
//! into f32 buffers and the f32 product, which computes the same sums in
//! another order (the tests compare the two).

use std::sync::atomic::{AtomicU8, Ordering};

use super::matmul::Gemm;

/// The precision of the CPU's f32 matrix products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProductPrecision {
    /// f32 operands (the default).
    #[default]
    F32,
    /// bf16 operands, f32 accumulation.
    Bf16,
}

static PRECISION: AtomicU8 = AtomicU8::new(0);

/// Sets the precision of every f32 product of the process (see the module
/// docs).
pub fn set_product_precision(p: ProductPrecision) {
    PRECISION.store(u8::from(p == ProductPrecision::Bf16), Ordering::Relaxed);
}

/// The precision f32 products run in now.
pub fn product_precision() -> ProductPrecision {
    if PRECISION.load(Ordering::Relaxed) == 1 {
        ProductPrecision::Bf16
    } else {
        ProductPrecision::F32
    }
}

/// Whether this CPU runs bf16 products in hardware (AVX512-BF16); without
/// it bf16 products take the portable path, slower than f32.
pub fn bf16_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x` rounded to the nearest bf16 (ties to even), as its 16 bits; a NaN
/// stays a NaN.
#[inline]
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// `x` rounded to the nearest bf16 (ties to even), as an f32.
#[inline]
pub fn round_bf16(x: f32) -> f32 {
    f32::from_bits(u32::from(bf16_bits(x)) << 16)
}

/// Rows of the register tile.
const MR: usize = 8;
/// Columns of the register tile (two vectors of 16).
const NR: usize = 32;
/// Contracted elements per packed block (128 pairs: a 16 KiB panel of
/// the right operand, which stays in L1 while a block of rows passes).
const KC: usize = 256;
/// Rows a task packs and runs against every panel.
const MC: usize = 64;

/// `out (+)= op(a) op(b)` with bf16 operands and f32 sums; `parallel`
/// spreads blocks of rows over the pool. The caller checked the lengths
/// (`crate::cpu::matmul`'s contract).
pub(crate) fn gemm_bf16(out: &mut [f32], a: &[f32], b: &[f32], g: Gemm, parallel: bool) {
    #[cfg(target_arch = "x86_64")]
    if bf16_hardware() {
        packed_gemm(out, a, b, g, parallel);
        return;
    }
    portable_gemm(out, a, b, g, parallel);
}

/// The twin: operands rounded into f32 buffers, then the f32 product.
pub(crate) fn portable_gemm(out: &mut [f32], a: &[f32], b: &[f32], g: Gemm, parallel: bool) {
    let ra: Vec<f32> = a.iter().map(|&x| round_bf16(x)).collect();
    let rb: Vec<f32> = b.iter().map(|&x| round_bf16(x)).collect();
    super::matmul::gemm_f32_only(out, &ra, &rb, g, parallel);
}

/// Element strides of op(x): element (i, p) at `i * rs + p * cs`.
#[derive(Clone, Copy)]
struct Strides {
    rs: usize,
    cs: usize,
}

/// Packs rows `r0..r0 + rows` of op(a), contracted elements `p0..p0 + kc`,
/// as `[row block][pair][MR]` words (low half the even element), zeros
/// past the ends.
fn pack_a(dst: &mut Vec<u32>, a: &[f32], s: Strides, r0: usize, rows: usize, p0: usize, kc: usize) {
    let kp = kc.div_ceil(2);
    let blocks = rows.div_ceil(MR);
    dst.clear();
    dst.resize(blocks * kp * MR, 0);
    for rb in 0..blocks {
        let blk = &mut dst[rb * kp * MR..(rb + 1) * kp * MR];
        for i in 0..MR.min(rows - rb * MR) {
            let row = r0 + rb * MR + i;
            for q in 0..kp {
                let p = p0 + 2 * q;
                let lo = bf16_bits(a[row * s.rs + p * s.cs]);
                let hi = if 2 * q + 1 < kc {
                    bf16_bits(a[row * s.rs + (p + 1) * s.cs])
                } else {
                    0
                };
                blk[q * MR + i] = u32::from(lo) | (u32::from(hi) << 16);
            }
        }
    }
}

/// Packs op(b)'s contracted elements `p0..p0 + kc` over all `n` columns
/// as `[panel of NR columns][pair][NR]` words.
fn pack_b(dst: &mut Vec<u32>, b: &[f32], s: Strides, n: usize, p0: usize, kc: usize) {
    let kp = kc.div_ceil(2);
    let panels = n.div_ceil(NR);
    dst.clear();
    dst.resize(panels * kp * NR, 0);
    for pn in 0..panels {
        let blk = &mut dst[pn * kp * NR..(pn + 1) * kp * NR];
        for j in 0..NR.min(n - pn * NR) {
            let col = pn * NR + j;
            for q in 0..kp {
                let p = p0 + 2 * q;
                let lo = bf16_bits(b[p * s.rs + col * s.cs]);
                let hi = if 2 * q + 1 < kc {
                    bf16_bits(b[(p + 1) * s.rs + col * s.cs])
                } else {
                    0
                };
                blk[q * NR + j] = u32::from(lo) | (u32::from(hi) << 16);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn packed_gemm(out: &mut [f32], a: &[f32], b: &[f32], g: Gemm, parallel: bool) {
    use rayon::prelude::*;
    let Gemm { m, k, n, .. } = g;
    let sa = if g.trans_a {
        Strides { rs: 1, cs: m }
    } else {
        Strides { rs: k, cs: 1 }
    };
    let sb = if g.trans_b {
        Strides { rs: 1, cs: k }
    } else {
        Strides { rs: n, cs: 1 }
    };
    let mut pb = Vec::new();
    for p0 in (0..k).step_by(KC) {
        let kc = KC.min(k - p0);
        pack_b(&mut pb, b, sb, n, p0, kc);
        let assign = p0 == 0 && !g.accumulate;
        let pb = &pb;
        let run = |(ci, rows_out): (usize, &mut [f32])| {
            let r0 = ci * MC;
            let rows = rows_out.len() / n;
            let mut pa = Vec::new();
            pack_a(&mut pa, a, sa, r0, rows, p0, kc);
            block(rows_out, &pa, pb, rows, n, kc, assign);
        };
        if parallel && m > MC {
            out.par_chunks_mut(MC * n).enumerate().for_each(run);
        } else {
            out.chunks_mut(MC * n).enumerate().for_each(run);
        }
    }
}

/// `rows` rows of the output against every panel, one contracted block.
#[cfg(target_arch = "x86_64")]
fn block(out: &mut [f32], pa: &[u32], pb: &[u32], rows: usize, n: usize, kc: usize, assign: bool) {
    let kp = kc.div_ceil(2);
    let mut tile = [0f32; MR * NR];
    for pn in 0..n.div_ceil(NR) {
        let bp = &pb[pn * kp * NR..(pn + 1) * kp * NR];
        let cols = NR.min(n - pn * NR);
        for rb in 0..rows.div_ceil(MR) {
            let ap = &pa[rb * kp * MR..(rb + 1) * kp * MR];
            // SAFETY: the caller saw AVX512-F and AVX512-BF16
            // (bf16_hardware); `ap` holds kp * MR words and `bp` kp * NR.
            unsafe { kernel(kp, ap, bp, &mut tile) };
            for i in 0..MR.min(rows - rb * MR) {
                let o = &mut out[(rb * MR + i) * n + pn * NR..][..cols];
                let t = &tile[i * NR..i * NR + cols];
                if assign {
                    o.copy_from_slice(t);
                } else {
                    for (o, t) in o.iter_mut().zip(t) {
                        *o += t;
                    }
                }
            }
        }
    }
}

/// The 8 x 32 tile over `kp` pairs: 16 accumulators, two loads of the
/// right operand and eight broadcasts of the left a pair.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel(kp: usize, ap: &[u32], bp: &[u32], tile: &mut [f32; MR * NR]) {
    use std::arch::x86_64::*;
    debug_assert!(ap.len() >= kp * MR && bp.len() >= kp * NR);
    let mut acc = [_mm512_setzero_ps(); 2 * MR];
    let (ap, bp) = (ap.as_ptr(), bp.as_ptr());
    for q in 0..kp {
        // SAFETY: q < kp and the lengths checked above keep every read in
        // bounds; the casts reinterpret 512 bits as 32 bf16 values.
        unsafe {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(q * NR).cast()));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(q * NR + 16).cast()));
            for i in 0..MR {
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(q * MR + i) as i32));
                acc[2 * i] = _mm512_dpbf16_ps(acc[2 * i], av, b0);
                acc[2 * i + 1] = _mm512_dpbf16_ps(acc[2 * i + 1], av, b1);
            }
        }
    }
    for (i, v) in acc.iter().enumerate() {
        // SAFETY: 16 floats at 16 * i < MR * NR.
        unsafe { _mm512_storeu_ps(tile.as_mut_ptr().add(16 * i), *v) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(seed: u64, n: usize) -> Vec<f32> {
        let mut r = crate::rng::SplitMix64(seed);
        (0..n).map(|_| (r.unit() * 2.0 - 1.0) as f32).collect()
    }

    #[test]
    fn rounding_is_to_nearest_with_ties_to_even() {
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1).
        assert_eq!(round_bf16(1.0 + 2f32.powi(-8)), 1.0);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: to the even one.
        assert_eq!(round_bf16(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2f32.powi(-6));
        assert_eq!(round_bf16(1.0 + 2f32.powi(-8) + 2f32.powi(-20)), 1.0 + 2f32.powi(-7));
        assert_eq!(round_bf16(-2.5), -2.5);
        assert!(round_bf16(f32::NAN).is_nan());
        assert_eq!(round_bf16(f32::INFINITY), f32::INFINITY);
        for x in values(3, 1000) {
            let r = round_bf16(x);
            // Half a unit in the last of bf16's 8 significant bits.
            assert!((r - x).abs() <= x.abs() * 2f32.powi(-8), "{x} -> {r}");
            assert_eq!(r.to_bits() & 0xffff, 0);
        }
    }

    type Kernel = fn(&mut [f32], &[f32], &[f32], Gemm, bool);

    /// op(a) op(b) in f64 over the operands rounded to bf16.
    fn reference(a: &[f32], b: &[f32], g: Gemm, init: &[f32]) -> Vec<f64> {
        let Gemm { m, k, n, .. } = g;
        let at = |i: usize, p: usize| f64::from(round_bf16(if g.trans_a { a[p * m + i] } else { a[i * k + p] }));
        let bt = |p: usize, j: usize| f64::from(round_bf16(if g.trans_b { b[j * k + p] } else { b[p * n + j] }));
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k).map(|p| at(i, p) * bt(p, j)).sum();
                out[i * n + j] = s + if g.accumulate { f64::from(init[i * n + j]) } else { 0.0 };
            }
        }
        out
    }

    #[test]
    fn both_kernels_compute_bf16_products_with_f32_sums() {
        // Sizes around the tile (8 x 32), the contracted block (256) and
        // odd contracted lengths, every transpose, with and without
        // accumulation, serial and parallel.
        let shapes = [
            (1, 1, 1),
            (9, 3, 33),
            (8, 256, 32),
            (70, 257, 31),
            (13, 513, 65),
            (130, 40, 100),
        ];
        for (s, &(m, k, n)) in shapes.iter().enumerate() {
            for (ta, tb, acc) in [
                (false, true, false),
                (false, false, true),
                (true, false, false),
                (true, true, true),
            ] {
                let g = Gemm {
                    m,
                    k,
                    n,
                    trans_a: ta,
                    trans_b: tb,
                    accumulate: acc,
                };
                let a = values(10 + s as u64, m * k);
                let b = values(20 + s as u64, k * n);
                let init = values(30 + s as u64, m * n);
                let want = reference(&a, &b, g, &init);
                let mut kernels: Vec<(&str, Kernel)> = vec![("portable", portable_gemm)];
                if bf16_hardware() {
                    kernels.push(("avx512-bf16", gemm_bf16));
                } else {
                    eprintln!("bf16 kernels: no AVX512-BF16 on this CPU; the portable one only");
                }
                for (name, f) in kernels {
                    for parallel in [false, true] {
                        let mut out = init.clone();
                        f(&mut out, &a, &b, g, parallel);
                        for (i, (&o, &w)) in out.iter().zip(&want).enumerate() {
                            // f32 sums of k terms of magnitude <= 1.
                            let tol = 1e-6 * (k as f64).sqrt().max(1.0) * 4.0;
                            assert!(
                                (f64::from(o) - w).abs() <= tol,
                                "{name} {m}x{k}x{n} ta={ta} tb={tb} acc={acc} par={parallel} [{i}]: {o} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_products_differ_from_f32_products_by_the_operand_rounding() {
        // The switch changes the numbers (so a model run under it really
        // runs in bf16), by about bf16's 2^-9 relative per operand.
        let (m, k, n) = (16, 64, 48);
        let g = Gemm::new(m, k, n);
        let (a, b) = (values(1, m * k), values(2, k * n));
        let mut f = vec![0f32; m * n];
        super::super::matmul::gemm_f32_only(&mut f, &a, &b, g, false);
        let mut h = vec![0f32; m * n];
        gemm_bf16(&mut h, &a, &b, g, false);
        let worst = f.iter().zip(&h).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(worst > 1e-5 && worst < 0.05, "worst |f32 - bf16| {worst}");
    }
}
