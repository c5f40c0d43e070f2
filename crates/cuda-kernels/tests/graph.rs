//! CUDA graphs (`aha_cuda_kernels::graph`): a captured sequence of uploads
//! from staging, launches, cuBLAS products, memsets and temporaries replays
//! with new inputs to what the same calls give eagerly; what a capture
//! forbids (a copy from pageable memory, a copy to the host) fails the
//! capture and leaves the device usable; scratch taken inside a capture is
//! the graph's own, whatever the pool does afterwards.
//! Runs on the emulated GPU (`AHA_EMULATED_GPU=1`) or a GPU; without either
//! each test prints "skipped: no GPU".

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use aha_cuda_kernels::blas::{matmul_f32, MatmulShape};
use aha_cuda_kernels::cudarc::driver::CudaSlice;
use aha_cuda_kernels::graph::{capture, Staging};
use aha_cuda_kernels::launch::{add_inplace_f32, scale_f32};
use aha_cuda_kernels::Gpu;

fn gpu(test: &str) -> Option<Arc<Gpu>> {
    if aha_cuda_kernels::device_count() == 0 {
        let reason = aha_cuda_kernels::no_gpu_reason().unwrap_or_default();
        eprintln!("{test}: skipped: no GPU ({reason})");
        return None;
    }
    Some(Gpu::get(0).unwrap())
}

fn values(seed: u32, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let z = (i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(40_503));
            (z >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        })
        .collect()
}

const M: usize = 3;
const K: usize = 5;
const N: usize = 4;

/// out = 2 (x w) + x w with a temporary for the product: a staging upload,
/// a product, a launch on a temporary, a memset, an add.
fn step(gpu: &Arc<Gpu>, x: &Staging<f32>, w: &CudaSlice<f32>, out: &mut CudaSlice<f32>) {
    let shape = MatmulShape {
        m: M,
        k: K,
        n: N,
        trans_a: false,
        trans_b: false,
        accumulate: false,
    };
    let mut t = gpu.zeros::<f32>(M * N).unwrap();
    matmul_f32(gpu, &mut t, x.dev(), w, shape).unwrap();
    gpu.copy_into(out, 0, &t).unwrap();
    scale_f32(gpu, &mut t, 2.0, M * N).unwrap();
    add_inplace_f32(gpu, out, &t, M * N).unwrap();
}

#[test]
fn a_captured_step_replays_with_new_inputs_as_the_eager_step_cuda() {
    let Some(gpu) = gpu("graph") else { return };
    let w = gpu.upload(&values(7, K * N)).unwrap();
    let mut x = Staging::<f32>::new(&gpu, M * K).unwrap();
    let mut out = gpu.zeros::<f32>(M * N).unwrap();
    let (graph, ()) = capture(&gpu, || {
        x.upload()?;
        step(&gpu, &x, &w, &mut out);
        Ok(())
    })
    .unwrap();
    // Nothing ran during the capture.
    assert_eq!(gpu.download(&out).unwrap(), vec![0.0; M * N]);
    for seed in 1..4 {
        let xs = values(seed, M * K);
        x.host_mut().copy_from_slice(&xs);
        let before = aha_cuda_kernels::emulate::driver_counts();
        graph.launch().unwrap();
        let replayed = gpu.download(&out).unwrap();
        if let (Some(b), Some(a)) = (before, aha_cuda_kernels::emulate::driver_counts()) {
            let d = a.since(b);
            assert_eq!((d.graph_launches, d.launches, d.allocs, d.htod), (1, 0, 0, 0), "{d:?}");
        }
        // The same calls, eagerly.
        let mut eager_in = Staging::<f32>::new(&gpu, M * K).unwrap();
        eager_in.host_mut().copy_from_slice(&xs);
        eager_in.upload().unwrap();
        let mut eager = gpu.zeros::<f32>(M * N).unwrap();
        step(&gpu, &eager_in, &w, &mut eager);
        let eager = gpu.download(&eager).unwrap();
        assert_eq!(replayed, eager, "seed {seed}");
        // And against the host: 3 (x w).
        for i in 0..M {
            for j in 0..N {
                let p: f32 = (0..K).map(|k| xs[i * K + k] * values(7, K * N)[k * N + j]).sum();
                assert!((replayed[i * N + j] - 3.0 * p).abs() < 1e-5, "{i},{j}");
            }
        }
    }
}

#[test]
fn a_capture_refuses_pageable_uploads_and_downloads_and_the_device_stays_usable_cuda() {
    let Some(gpu) = gpu("graph") else { return };
    let host = vec![1.0f32; 8];
    let e = capture(&gpu, || gpu.upload(&host).map(|_| ()))
        .err()
        .map(|e| e.to_string());
    assert!(e.is_some(), "a pageable upload was captured");
    let buf = gpu.upload(&host).unwrap();
    let e = capture(&gpu, || gpu.download(&buf).map(|_| ()))
        .err()
        .map(|e| e.to_string());
    assert!(e.is_some(), "a download was captured");
    // Eager work still runs.
    let mut b = gpu.upload(&host).unwrap();
    scale_f32(&gpu, &mut b, 3.0, 8).unwrap();
    assert_eq!(gpu.download(&b).unwrap(), vec![3.0; 8]);
}

#[test]
fn scratch_taken_inside_a_capture_is_the_graphs_own_cuda() {
    let Some(gpu) = gpu("graph") else { return };
    let n = 1237;
    // A cached buffer of the same length, which the capture must not take.
    drop(gpu.scratch_f32(n).unwrap());
    let mut x = Staging::<f32>::new(&gpu, n).unwrap();
    let mut out = gpu.zeros::<f32>(n).unwrap();
    // out = 2 x through a scratch buffer that must start zeroed.
    let (graph, ()) = capture(&gpu, || {
        x.upload()?;
        let mut s = gpu.scratch_f32(n)?;
        add_inplace_f32(&gpu, &mut *s, x.dev(), n)?;
        scale_f32(&gpu, &mut *s, 2.0, n)?;
        gpu.copy_into(&mut out, 0, &s)?;
        Ok(())
    })
    .unwrap();
    for seed in 0..3 {
        // Eager work between replays takes and dirties the pool's buffer of
        // that length; emptying the cache frees it. Neither touches the
        // graph's scratch.
        let mut other = gpu.scratch_f32(n).unwrap();
        scale_f32(&gpu, &mut *other, 5.0, n).unwrap();
        gpu.copy_into(&mut *other, 0, &gpu.upload(&values(99, n)).unwrap())
            .unwrap();
        drop(other);
        if seed == 1 {
            gpu.empty_scratch_cache();
        }
        let xs = values(seed, n);
        x.host_mut().copy_from_slice(&xs);
        graph.launch().unwrap();
        let got = gpu.download(&out).unwrap();
        let want: Vec<f32> = xs.iter().map(|v| 2.0 * v).collect();
        assert_eq!(got, want, "replay {seed}");
    }
}
