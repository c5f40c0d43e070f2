//! The GPU sampling kernel (`aha_cuda_kernels::launch::sample_f32`) against
//! its CPU twin `aha_sampler::sample_with_uniform`: the same uniform number
//! must give the same token (up to float rounding at a boundary of the
//! cumulative sum: at most 1% of rows), the same log-prob and kept mass.
//! Without a GPU the test prints "skipped: no GPU" and passes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use aha_cuda_kernels::launch::{sample_f32, SampleParams};
use aha_cuda_kernels::Gpu;
use aha_sampler::{sample_with_uniform, SamplingParams, SeqRng};

#[test]
fn gpu_sampling_matches_the_cpu_twin_cuda() {
    if let Some(reason) = aha_cuda_kernels::no_gpu_reason() {
        eprintln!("gpu_sampling_matches_the_cpu_twin_cuda: skipped: no GPU ({reason})");
        return;
    }
    let gpu = Gpu::get(0).unwrap();
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
    for v in [1usize, 7, 511, 513, 4096, 151_936] {
        for (ci, &(t, k, top_p, min_p)) in cases.iter().enumerate() {
            let rows = if v > 10_000 { 8 } else { 64 };
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
            let d = gpu.upload(&logits).unwrap();
            let got = sample_f32(&gpu, &d, rows, v, &u, &gp).unwrap();
            let mut mismatched = 0;
            for r in 0..rows {
                let want = sample_with_uniform(&logits[r * v..(r + 1) * v], &p, u[r]).unwrap();
                if got[r].token != want.token {
                    mismatched += 1;
                    continue;
                }
                assert!(
                    (got[r].logprob - want.logprob).abs() < 1e-4,
                    "v {v} case {ci} row {r}: {got:?} vs {want:?}",
                    got = got[r]
                );
                assert!(
                    (got[r].truncated_mass_log - want.truncated_mass_log).abs() < 1e-4,
                    "v {v} case {ci} row {r}: kept mass {} vs {}",
                    got[r].truncated_mass_log,
                    want.truncated_mass_log
                );
            }
            assert!(
                mismatched * 100 <= rows.max(100),
                "v {v} case {ci}: {mismatched} of {rows} rows differ"
            );
        }
    }
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
