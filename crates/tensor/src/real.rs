//! The float types the CPU kernels are generic over: `f32` for work, `f64`
//! for the reference checks (finite differences need the precision).

/// A floating-point element the CPU kernels compute in. Implemented for `f32`
/// and `f64` only (the matrix-product backend supports exactly these).
pub trait Real:
    num_traits::Float
    + num_traits::NumAssign
    + std::iter::Sum
    + Default
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
    + private::Sealed
{
    /// Converts from f64, rounding to nearest.
    fn from_f64(v: f64) -> Self;
    /// Widens to f64.
    fn to_f64(self) -> f64;
    /// `e^x` for softmax-style loops. For f32 a branch-free polynomial that
    /// the compiler can vectorize (relative error below 3e-7 for x > -87;
    /// 0 below, +inf above 88.7); for f64 the exact libm `exp`.
    fn exp_fast(self) -> Self;
    /// The three buffers of a product as f32 slices when `Self` is f32
    /// (the CPU's bf16 products apply to f32 products only).
    fn as_f32<'a>(out: &'a mut [Self], a: &'a [Self], b: &'a [Self]) -> Option<(&'a mut [f32], &'a [f32], &'a [f32])>;
}

impl Real for f32 {
    #[inline]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    #[inline]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn exp_fast(self) -> Self {
        exp_f32(self)
    }
    #[inline]
    fn as_f32<'a>(out: &'a mut [f32], a: &'a [f32], b: &'a [f32]) -> Option<(&'a mut [f32], &'a [f32], &'a [f32])> {
        Some((out, a, b))
    }
}

impl Real for f64 {
    #[inline]
    fn from_f64(v: f64) -> Self {
        v
    }
    #[inline]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn exp_fast(self) -> Self {
        self.exp()
    }
    #[inline]
    fn as_f32<'a>(_: &'a mut [f64], _: &'a [f64], _: &'a [f64]) -> Option<(&'a mut [f32], &'a [f32], &'a [f32])> {
        None
    }
}

mod private {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// `F` from an f64 literal.
#[inline]
pub(crate) fn c<F: Real>(v: f64) -> F {
    F::from_f64(v)
}

/// Cephes-style `expf`: `e^x = 2^n e^r` with `n = round(x log2 e)` and
/// `|r| <= ln2 / 2`, `e^r` by a degree-6 polynomial. Only SSE2 operations
/// (rounding by the 1.5 * 2^23 trick, the exponent built in the bits), so a
/// loop over it vectorizes on the baseline x86-64 target.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23
    let xc = x.clamp(-86.0, 88.7);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^(n-1) * 2: n reaches 128 just below the overflow threshold.
    let scale = f32::from_bits(((n as i32 + 126) as u32) << 23);
    let v = y * scale * 2.0;
    if x < -86.0 {
        0.0
    } else if x > 88.7 {
        f32::INFINITY
    } else {
        v
    }
}

#[cfg(test)]
mod tests {
    use super::exp_f32;

    #[test]
    fn exp_f32_matches_libm() {
        let mut worst = 0f64;
        let mut x = -86.0f32;
        while x <= 88.7 {
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(100.0), f32::INFINITY);
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(f32::NAN).is_nan());
    }
}
