//! The GPU sampling kernel (`aha_cuda_kernels::launch::sample_f32`) against
//! its CPU twin `aha_sampler::sample_with_uniform`: the same uniform number
//! must give the same token (up to float rounding at a boundary of the
//! cumulative sum: at most 1% of rows), the same log-prob and kept mass.
//! Without a GPU the `_cuda` test prints "skipped: no GPU" and passes; the
//! `_emulated` test runs the same kernel text on the CPU everywhere.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use aha_cuda_kernels::launch::{sample_f32, SampleParams};
use aha_cuda_kernels::Gpu;
use aha_sampler::{sample_with_uniform, SamplingParams, SeqRng};

/// One sampled token as the kernel reports it: id (-1 for a bad row),
/// log-prob, log of the kept mass.
type Drawn = (i64, f32, f32);

/// Samples rows of logits: (logits, rows, v, uniforms, params) -> draws.
type Sampler<'a> = &'a dyn Fn(&[f32], usize, usize, &[f64], &SampleParams) -> Vec<Drawn>;

/// Every case through `run` (logits, rows, v, uniforms, params) against
/// `sample_with_uniform` on the same uniforms.
fn check(run: Sampler<'_>, vocabularies: &[usize], max_rows: usize) {
    let mut rng = SeqRng::for_sequence(3, 0, 0);
    let cases = [
        (1, 0, 1.0, 0.0),
        (1, 0, 0.9, 0.0),
        (1, 50, 1.0, 0.0),
        (1, 50, 0.8, 0.0),
        (1, 0, 1.0, 0.05),
        (1, 20, 0.95, 0.02),
        (0, 0, 1.0, 0.0),
    ];
    for &v in vocabularies {
        for (ci, &(t, k, top_p, min_p)) in cases.iter().enumerate() {
            let rows = if v > 10_000 { 8 } else { 64 }.min(max_rows);
            let spread = [0.5, 4.0, 12.0][ci % 3];
            let logits: Vec<f32> = (0..rows * v)
                .map(|i| {
                    let x = (rng.uniform() * spread) as f32;
                    // Exact ties in some rows.
                    if (i / v) % 3 == 0 {
                        x.round()
                    } else {
                        x
                    }
                })
                .collect();
            let u: Vec<f64> = (0..rows).map(|_| rng.uniform()).collect();
            let p = SamplingParams {
                temperature: t as f32 * 0.8,
                top_k: k,
                top_p,
                min_p,
                ..SamplingParams::default()
            };
            let gp = SampleParams {
                temperature: p.temperature,
                top_k: k,
                top_p,
                min_p,
            };
            let got = run(&logits, rows, v, &u, &gp);
            let mut mismatched = 0;
            for r in 0..rows {
                let want = sample_with_uniform(&logits[r * v..(r + 1) * v], &p, u[r]).unwrap();
                if got[r].0 != i64::from(want.token) {
                    mismatched += 1;
                    continue;
                }
                assert!(
                    (got[r].1 - want.logprob).abs() < 1e-4,
                    "v {v} case {ci} row {r}: {:?} vs {want:?}",
                    got[r]
                );
                assert!(
                    (got[r].2 - want.truncated_mass_log).abs() < 1e-4,
                    "v {v} case {ci} row {r}: kept mass {} vs {}",
                    got[r].2,
                    want.truncated_mass_log
                );
            }
            assert!(
                mismatched * 100 <= rows.max(100),
                "v {v} case {ci}: {mismatched} of {rows} rows differ"
            );
        }
    }
}

#[test]
fn gpu_sampling_matches_the_cpu_twin_cuda() {
    if let Some(reason) = aha_cuda_kernels::no_gpu_reason() {
        eprintln!("gpu_sampling_matches_the_cpu_twin_cuda: skipped: no GPU ({reason})");
        return;
    }
    let gpu = Gpu::get(0).unwrap();
    check(
        &|logits, rows, v, u, p| {
            let d = gpu.upload(logits).unwrap();
            sample_f32(&gpu, &d, rows, v, u, p)
                .unwrap()
                .iter()
                .map(|s| (i64::from(s.token), s.logprob, s.truncated_mass_log))
                .collect()
        },
        &[1, 7, 511, 513, 4096, 151_936],
        64,
    );
    // A NaN row is an error naming the row.
    let mut logits = vec![0.5f32; 3 * 10];
    logits[15] = f32::NAN;
    let d = gpu.upload(&logits).unwrap();
    let p = SampleParams {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
    };
    let err = sample_f32(&gpu, &d, 3, 10, &[0.1, 0.2, 0.3], &p).unwrap_err();
    assert!(err.to_string().contains("row 1"), "{err}");
}

/// kernels/sampling.cu as written, compiled by g++ through the CUDA shim of
/// `aha_cuda_kernels::emulate` and run on the CPU (512 fibers a block, one
/// block per row), against the twin; a NaN row reports token -1.
#[test]
fn sampling_kernel_matches_the_cpu_twin_emulated() {
    use aha_cuda_kernels::emulate::{self, numbers};
    let Some(e) = emulate::emulator_for_test("sampling_kernel_matches_the_cpu_twin_emulated", "core").unwrap() else {
        return;
    };
    let run = |logits: &[f32], rows: usize, v: usize, u: &[f64], p: &SampleParams| -> Vec<Drawn> {
        let job = format!(
            "sample {rows} {v} {:?} {} {:?} {:?}\n{}{}",
            p.temperature,
            p.top_k,
            p.top_p,
            p.min_p,
            numbers(logits),
            numbers(u)
        );
        let out = e.run(&job).unwrap();
        assert_eq!(out.len(), 3 * rows);
        out.chunks(3).map(|c| (c[0] as i64, c[1] as f32, c[2] as f32)).collect()
    };
    // Fewer rows than on the GPU: a fiber switch per barrier per thread is slow.
    check(&run, &[1, 7, 513, 4096, 20_000], 12);
    let mut logits = vec![0.5f32; 3 * 10];
    logits[15] = f32::NAN;
    let p = SampleParams {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
    };
    let got = run(&logits, 3, 10, &[0.1, 0.2, 0.3], &p);
    assert_eq!((got[0].0 >= 0, got[1].0, got[2].0 >= 0), (true, -1, true), "{got:?}");
}
