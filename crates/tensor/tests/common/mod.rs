//! Helpers shared by the kernel tests: seeded random data, closeness checks
//! that print the first mismatches, a finite-difference gradient check, and
//! the device a twin test's body runs on ([`On`], [`on`], [`twin_tests!`]).
#![allow(dead_code, unused_macros, unused_imports)]

use std::sync::Arc;

use aha_cuda_kernels::Gpu;
use aha_tensor::{Device, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Where a test body computes: the CPU twins, or the launchers on a GPU.
pub enum On {
    Cpu,
    Gpu(Arc<Gpu>),
}

/// The [`On`] of a device (creates or reuses the GPU's context).
pub fn on(dev: Device) -> Result<On> {
    Ok(match dev {
        Device::Cpu => On::Cpu,
        Device::Cuda(i) => On::Gpu(Gpu::get(i)?),
    })
}

/// A `_cpu` and a `_cuda` test from one body `fn(Device) -> Result<()>`: the
/// `_cuda` one prints "skipped: no GPU" and passes where there is none, and
/// its wall time where there is one (`--nocapture`).
macro_rules! twin_tests {
    ($check:ident, $cpu:ident, $cuda:ident) => {
        #[test]
        fn $cpu() {
            $check(aha_tensor::Device::Cpu).unwrap();
        }

        #[test]
        fn $cuda() {
            if let Some(reason) = aha_cuda_kernels::no_gpu_reason() {
                eprintln!("{}: skipped: no GPU ({reason})", stringify!($cuda));
                return;
            }
            let t = std::time::Instant::now();
            $check(aha_tensor::Device::Cuda(0)).unwrap();
            eprintln!(
                "{}: passed in {:.1} ms",
                stringify!($cuda),
                t.elapsed().as_secs_f64() * 1e3
            );
        }
    };
}
pub(crate) use twin_tests;

/// `n` values uniform in [-scale, scale), reproducible from `seed`.
pub fn rand_vec(seed: u64, n: usize, scale: f64) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// `n` ids below `limit`.
pub fn rand_ids(seed: u64, n: usize, limit: usize) -> Vec<u32> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x9e37_79b9);
    (0..n).map(|_| rng.random_range(0..limit as u32)).collect()
}

pub fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// Asserts `|got - want| <= atol + rtol * |want|` everywhere, listing the
/// first mismatches when not.
pub fn assert_close<T: Into<f64> + Copy>(what: &str, got: &[T], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length {} vs {}", got.len(), want.len());
    let mut bad = Vec::new();
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let g: f64 = g.into();
        let ok = (g - w).abs() <= atol + rtol * w.abs() || (g.is_nan() && w.is_nan());
        if !ok {
            bad.push(format!("  [{i}] got {g:.9e} want {w:.9e} (diff {:.3e})", (g - w).abs()));
        }
    }
    assert!(
        bad.is_empty(),
        "{what}: {} of {} values outside atol {atol:e} + rtol {rtol:e}; first:\n{}",
        bad.len(),
        got.len(),
        bad.iter().take(8).cloned().collect::<Vec<_>>().join("\n")
    );
}

/// Central finite differences of the scalar `loss` at `x`, compared with
/// `analytic` (d loss / d x). Checks every element up to `max_checks`
/// (spread evenly) with a tolerance that suits f64 and step 1e-5.
pub fn fd_check(what: &str, x: &[f64], analytic: &[f64], loss: impl Fn(&[f64]) -> f64) {
    assert_eq!(x.len(), analytic.len(), "{what}: gradient length");
    let h = 1e-5;
    let n = x.len();
    let max_checks = 64;
    let stride = (n / max_checks).max(1);
    let mut xp = x.to_vec();
    let mut bad = Vec::new();
    for i in (0..n).step_by(stride) {
        let orig = xp[i];
        xp[i] = orig + h;
        let lp = loss(&xp);
        xp[i] = orig - h;
        let lm = loss(&xp);
        xp[i] = orig;
        let num = (lp - lm) / (2.0 * h);
        let a = analytic[i];
        if (num - a).abs() > 1e-6 + 1e-5 * a.abs().max(num.abs()) {
            bad.push(format!("  [{i}] analytic {a:.9e} numeric {num:.9e}"));
        }
    }
    assert!(
        bad.is_empty(),
        "{what}: gradient differs from finite differences:\n{}",
        bad.join("\n")
    );
}

/// `sum(out * r)`: the scalar loss whose gradient w.r.t. `out` is `r`.
pub fn dot(out: &[f64], r: &[f64]) -> f64 {
    out.iter().zip(r).map(|(a, b)| a * b).sum()
}
