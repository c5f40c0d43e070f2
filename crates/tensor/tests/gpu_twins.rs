//! GPU kernels against their CPU twins, one test body per op run on each
//! device. Without a GPU the CUDA variants say "skipped: no GPU" and pass.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::needless_range_loop)]

mod common;

use aha_tensor::{ops, Device, Tensor};
use common::{assert_close, rand_vec, to_f32};

/// RMSNorm on `dev` vs the f64 formula, on shapes that are not multiples of
/// the kernel's block (256) and a row wider than it.
fn check_rms_norm(dev: Device) -> aha_tensor::Result<()> {
    for (i, &(rows, c)) in [(1, 1), (3, 7), (17, 255), (5, 256), (9, 1000), (64, 2048), (2, 5003)]
        .iter()
        .enumerate()
    {
        let x = rand_vec(100 + i as u64, rows * c, 2.0);
        let w = rand_vec(200 + i as u64, c, 1.0);
        let xt = Tensor::from_vec(to_f32(&x), [rows, c], dev)?;
        let wt = Tensor::from_vec(to_f32(&w), [c], dev)?;
        let (y, rstd) = ops::rms_norm(&xt, &wt, 1e-6)?;
        assert_eq!(y.device(), dev);
        let mut want = Vec::new();
        let mut want_r = Vec::new();
        for r in 0..rows {
            let row = &x[r * c..(r + 1) * c];
            let s = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / c as f64 + 1e-6).sqrt();
            want_r.push(s);
            want.extend(row.iter().zip(&w).map(|(v, wi)| v * s * wi));
        }
        // f32 sums of c squares in a different order: relative error ~ c * 2^-24.
        let rtol = 1e-6 * (c as f64).sqrt().max(4.0);
        assert_close(
            &format!("rms_norm {rows}x{c} on {dev}"),
            &y.to_vec::<f32>()?,
            &want,
            1e-6,
            rtol,
        );
        assert_close(
            &format!("rstd {rows}x{c} on {dev}"),
            &rstd.to_vec::<f32>()?,
            &want_r,
            1e-6,
            rtol,
        );
    }
    Ok(())
}

#[test]
fn rms_norm_cpu() {
    check_rms_norm(Device::Cpu).unwrap();
}

#[test]
fn rms_norm_cuda() {
    if let Some(reason) = aha_cuda_kernels::no_gpu_reason() {
        eprintln!("rms_norm_cuda: skipped: no GPU ({reason})");
        return;
    }
    check_rms_norm(Device::Cuda(0)).unwrap();
}

/// The element-wise ops and the f32 <-> bf16 cast, dispatched on `dev`,
/// against f64 formulas, on sizes around the kernels' 256-thread block.
fn check_elementwise_ops(dev: Device) -> aha_tensor::Result<()> {
    for (i, &n) in [1usize, 255, 257, 4099].iter().enumerate() {
        let a = to_f32(&rand_vec(400 + i as u64, n, 6.0));
        let b = to_f32(&rand_vec(500 + i as u64, n, 2.0));
        let (at, bt) = (
            Tensor::from_vec(a.clone(), [n], dev)?,
            Tensor::from_vec(b.clone(), [n], dev)?,
        );
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let sum = ops::add(&at, &bt)?;
        let silu = ops::silu(&at)?;
        let swiglu = ops::swiglu(&at, &bt)?;
        assert_eq!((sum.device(), silu.device(), swiglu.device()), (dev, dev, dev));
        let want_sum: Vec<f64> = a.iter().zip(&b).map(|(&x, &y)| x as f64 + y as f64).collect();
        let want_silu: Vec<f64> = a.iter().map(|&x| x as f64 * sig(x as f64)).collect();
        let want_swiglu: Vec<f64> = a
            .iter()
            .zip(&b)
            .map(|(&x, &y)| x as f64 * sig(x as f64) * y as f64)
            .collect();
        // add: one f32 rounding. silu/swiglu: f32 exp (fast-math __expf on the
        // GPU) and division: a few 1e-7 relative on O(1) values.
        assert_close(
            &format!("add {n} on {dev}"),
            &sum.to_vec::<f32>()?,
            &want_sum,
            0.0,
            6e-8,
        );
        assert_close(
            &format!("silu {n} on {dev}"),
            &silu.to_vec::<f32>()?,
            &want_silu,
            2e-6,
            2e-6,
        );
        assert_close(
            &format!("swiglu {n} on {dev}"),
            &swiglu.to_vec::<f32>()?,
            &want_swiglu,
            2e-6,
            2e-6,
        );
        // The cast is specified bit for bit (round to nearest even).
        let h = at.to_dtype(aha_tensor::DType::BF16)?;
        assert_eq!(h.device(), dev);
        let bits: Vec<u16> = h.to_vec::<aha_tensor::bf16>()?.iter().map(|v| v.to_bits()).collect();
        let want: Vec<u16> = a.iter().map(|&x| aha_tensor::bf16::from_f32(x).to_bits()).collect();
        assert_eq!(bits, want, "bf16 cast {n} on {dev}");
        let back = h.to_dtype(aha_tensor::DType::F32)?.to_vec::<f32>()?;
        let want_back: Vec<f32> = want.iter().map(|&b| aha_tensor::bf16::from_bits(b).to_f32()).collect();
        assert_eq!(back, want_back, "f32 from bf16 {n} on {dev}");
    }
    Ok(())
}

#[test]
fn elementwise_ops_cpu() {
    check_elementwise_ops(Device::Cpu).unwrap();
}

#[test]
fn elementwise_ops_cuda() {
    if let Some(reason) = aha_cuda_kernels::no_gpu_reason() {
        eprintln!("elementwise_ops_cuda: skipped: no GPU ({reason})");
        return;
    }
    check_elementwise_ops(Device::Cuda(0)).unwrap();
}

#[test]
fn tensor_round_trips_and_errors() {
    let t = Tensor::from_vec(vec![1.5f32, -2.0, 3.25, 0.0], [2, 2], Device::Cpu).unwrap();
    let b = t.to_dtype(aha_tensor::DType::BF16).unwrap();
    assert_eq!(
        b.to_dtype(aha_tensor::DType::F32).unwrap().to_vec::<f32>().unwrap(),
        vec![1.5, -2.0, 3.25, 0.0]
    );
    assert!(Tensor::from_vec(vec![1.0f32; 3], [2, 2], Device::Cpu).is_err());
    assert!(t.as_slice::<u32>().is_err());
    let ids = Tensor::from_vec(vec![0u32, 1, 1], [3], Device::Cpu).unwrap();
    let e = ops::embedding(&t, &ids).unwrap();
    assert_eq!(e.dims(), &[3, 2]);
    let bad = Tensor::from_vec(vec![5u32], [1], Device::Cpu).unwrap();
    let err = ops::embedding(&t, &bad).unwrap_err().to_string();
    assert!(err.contains("out of range"), "{err}");
    let y = ops::matmul(&t, &t, false, true).unwrap();
    assert_eq!(
        y.to_vec::<f32>().unwrap(),
        vec![1.5 * 1.5 + 4.0, 1.5 * 3.25, 3.25 * 1.5, 3.25 * 3.25]
    );
    assert!("cuda:1".parse::<Device>().is_ok() && "tpu".parse::<Device>().is_err());
}
