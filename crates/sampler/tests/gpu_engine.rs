//! The GPU rollout engine (`aha_sampler::GpuEngine`, reached through
//! `aha_sampler::Sampler` over a `Policy` on the GPU) against the CPU
//! engine on the fixture models, in f32: greedy completions equal the CPU
//! engine's; seeded sampling is reproducible run to run, does not depend on
//! the batch size, and draws the CPU engine's tokens; each token's log-prob
//! equals a scoring pass (`Policy::score`) at the same temperature within
//! 1e-4; new weights (`Policy::set_params`) are what the next generation
//! samples from. Without a GPU each test prints "skipped: no GPU"; CI runs
//! them on the emulated GPU.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use aha_moe_model::{Model, Policy, Precision};
use aha_sampler::{Completion, EngineConfig, Sampler, SamplingParams};
use aha_tensor::Device;

fn fixture(name: &str) -> Model {
    Model::load(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models")
            .join(name),
    )
    .unwrap()
}

fn skip(test: &str) -> bool {
    match aha_cuda_kernels::no_gpu_reason() {
        Some(reason) => {
            eprintln!("{test}: skipped: no GPU ({reason})");
            true
        }
        None => false,
    }
}

fn cfg(max_batch: usize) -> EngineConfig {
    EngineConfig {
        max_batch,
        ..EngineConfig::default()
    }
}

fn run(policy: &Policy, prompts: &[Vec<u32>], n: usize, p: &SamplingParams, max_batch: usize) -> Vec<Completion> {
    Sampler::new(policy, None, cfg(max_batch), &[])
        .unwrap()
        .generate(prompts, n, p)
        .unwrap()
        .0
}

fn prompts() -> Vec<Vec<u32>> {
    vec![vec![5, 17, 42, 9], vec![101, 7, 250, 33, 64, 2]]
}

fn both(model: Model) -> (Policy, Policy) {
    let cpu = Policy::new(model.clone(), Device::Cpu, Precision::F32).unwrap();
    let gpu = Policy::new(model, Device::Cuda(0), Precision::F32).unwrap();
    (cpu, gpu)
}

#[test]
fn greedy_matches_the_cpu_engine_on_every_fixture() {
    if skip("greedy_matches_the_cpu_engine_on_every_fixture") {
        return;
    }
    let p = SamplingParams {
        greedy: true,
        max_new_tokens: 6,
        ..SamplingParams::default()
    };
    for name in ["qwen2-tiny", "qwen3-moe-tiny", "deepseek-v3-tiny", "llama-tiny"] {
        let (cpu, gpu) = both(fixture(name));
        assert!(matches!(
            Sampler::new(&gpu, None, cfg(4), &[]).unwrap(),
            Sampler::Gpu(_)
        ));
        let want = run(&cpu, &prompts(), 1, &p, 4);
        let got = run(&gpu, &prompts(), 1, &p, 4);
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(
                (g.prompt_index, &g.token_ids, g.finish_reason),
                (w.prompt_index, &w.token_ids, w.finish_reason),
                "{name}"
            );
            for (a, b) in g.logprobs.iter().zip(&w.logprobs) {
                assert!((a - b).abs() < 1e-4, "{name}: log-prob {a} vs {b}");
            }
        }
    }
}

#[test]
fn seeded_sampling_is_reproducible_and_scores_as_the_policy() {
    if skip("seeded_sampling_is_reproducible_and_scores_as_the_policy") {
        return;
    }
    let (cpu, gpu) = both(fixture("qwen3-moe-tiny"));
    let p = SamplingParams {
        temperature: 0.8,
        top_p: 0.95,
        top_k: 50,
        max_new_tokens: 8,
        seed: 11,
        ..SamplingParams::default()
    };
    let (ps, n) = (prompts(), 3);
    let a = run(&gpu, &ps, n, &p, 6);
    let b = run(&gpu, &ps, n, &p, 6);
    assert_eq!(a, b, "run to run");
    // Two sequences at a time: the same completions.
    let c = run(&gpu, &ps, n, &p, 3);
    assert_eq!(a, c, "batch size");
    // The CPU engine draws the same tokens (f32: the distributions agree to
    // rounding, so a draw differs only at a boundary of the cumulative sum).
    let want = run(&cpu, &ps, n, &p, 6);
    let same = a.iter().zip(&want).filter(|(g, w)| g.token_ids == w.token_ids).count();
    assert!(
        same + 1 >= a.len(),
        "{same} of {} completions equal the CPU engine's",
        a.len()
    );
    assert!(a.iter().any(|c| c.token_ids != a[0].token_ids), "samples differ");

    // Each sampled token's log-prob is log softmax(logits / T) at it, as a
    // scoring pass of prompt + completion at the same temperature.
    let t = ps.iter().map(Vec::len).max().unwrap() + p.max_new_tokens;
    let (mut ids, mut rows, mut targets, mut lps): (Vec<u32>, Vec<u32>, Vec<u32>, Vec<f32>) =
        (vec![], vec![], vec![], vec![]);
    for (r, c) in a.iter().enumerate() {
        let prompt = &ps[c.prompt_index];
        let mut seq = prompt.clone();
        seq.extend(&c.token_ids);
        for (i, &tok) in c.token_ids.iter().enumerate() {
            rows.push((r * t + prompt.len() - 1 + i) as u32);
            targets.push(tok);
        }
        lps.extend(&c.logprobs);
        seq.resize(t, 0);
        ids.extend(seq);
    }
    let scored = gpu.logprobs(&ids, a.len(), t, &rows, &targets, p.temperature).unwrap();
    let worst = scored.iter().zip(&lps).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    eprintln!("worst |sampled - scored| log-prob: {worst:.2e}");
    assert!(worst < 1e-4, "worst {worst}");
}

#[test]
fn new_weights_are_seen_by_the_next_generation() {
    if skip("new_weights_are_seen_by_the_next_generation") {
        return;
    }
    let (mut cpu, mut gpu) = both(fixture("llama-tiny"));
    let p = SamplingParams {
        greedy: true,
        max_new_tokens: 4,
        ..SamplingParams::default()
    };
    let before = run(&gpu, &prompts(), 1, &p, 2);
    // Flip the lm head: the most likely token changes.
    let mut w = gpu.params_to_host().unwrap();
    let head = gpu.layout().lm_head;
    for x in &mut w[head.off..head.off + head.len] {
        *x = -*x;
    }
    gpu.set_params(&w).unwrap();
    cpu.set_params(&w).unwrap();
    let after = run(&gpu, &prompts(), 1, &p, 2);
    assert_ne!(before[0].token_ids, after[0].token_ids);
    let want = run(&cpu, &prompts(), 1, &p, 2);
    for (g, c) in after.iter().zip(&want) {
        assert_eq!(g.token_ids, c.token_ids);
    }
}
