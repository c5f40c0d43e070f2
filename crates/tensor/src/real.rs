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
