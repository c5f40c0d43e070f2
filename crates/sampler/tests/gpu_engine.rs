//! The GPU rollout engine (`aha_sampler::GpuEngine`, reached through
//! `aha_sampler::Sampler` over a `Policy` on the GPU) against the CPU
//! engine on the fixture models. With f32 keys and values: greedy
//! completions equal the CPU engine's; seeded sampling is reproducible run
//! to run, does not depend on the batch size, and draws the CPU engine's
//! tokens; each token's log-prob equals a scoring pass (`Policy::score`) at
//! the same temperature within 1e-4; new weights (`Policy::set_params`) are
//! what the next generation samples from; a pool too small for every
//! sequence at once preempts and recomputes, and the completions are those
//! of each prompt run alone. With bf16 keys and values (the default): each
//! greedy token is the CPU model's choice or a near-tie, at the CPU's
//! log-prob within 0.05; seeded sampling is reproducible; the G samples of
//! a prompt share its blocks (the pool's high-water mark is below that of
//! G separate prompts). Without a GPU each test prints "skipped: no GPU";
//! CI runs them on the emulated GPU (their names end in `_cuda`, which
//! `scripts/test.sh`'s emulated pass selects).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use aha_moe_model::{Model, Policy, PolicyModel, Precision, SeqSpan};
use aha_sampler::{Completion, EngineCache, EngineConfig, KvDtype, Sampler, SamplingParams};
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

fn cfg_with(max_batch: usize, block_size: usize, kv_blocks: usize, kv_dtype: KvDtype) -> EngineConfig {
    EngineConfig {
        max_batch,
        block_size,
        kv_blocks,
        kv_dtype,
        cuda_graphs: true,
    }
}

fn cfg(max_batch: usize) -> EngineConfig {
    EngineConfig {
        max_batch,
        kv_dtype: KvDtype::F32,
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
fn greedy_matches_the_cpu_engine_on_every_fixture_cuda() {
    if skip("greedy_matches_the_cpu_engine_on_every_fixture_cuda") {
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
fn seeded_sampling_is_reproducible_and_scores_as_the_policy_cuda() {
    if skip("seeded_sampling_is_reproducible_and_scores_as_the_policy_cuda") {
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
    // bf16 keys and values: reproducible too.
    let bf16 = Sampler::new(&gpu, None, cfg_with(6, 16, 64, KvDtype::Bf16), &[]).unwrap();
    let (b1, b2) = (
        bf16.generate(&ps, n, &p).unwrap().0,
        bf16.generate(&ps, n, &p).unwrap().0,
    );
    assert_eq!(b1, b2, "bf16 run to run");
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
fn new_weights_are_seen_by_the_next_generation_cuda() {
    if skip("new_weights_are_seen_by_the_next_generation_cuda") {
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

fn log_softmax(x: &[f32]) -> Vec<f32> {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let lse = m + x.iter().map(|&v| (v - m).exp()).sum::<f32>().ln();
    x.iter().map(|&v| v - lse).collect()
}

#[test]
fn bf16_kv_greedy_follows_the_cpu_model_on_every_fixture_cuda() {
    if skip("bf16_kv_greedy_follows_the_cpu_model_on_every_fixture_cuda") {
        return;
    }
    // bf16 keys, values and queries (relative rounding 2^-9 each) move
    // these fixtures' log-probs by 0.01 to 0.024 (measured); a wrong
    // position, block or head would move them by O(1). So a near-tie may
    // go the other way: each token must be the CPU model's argmax after the
    // same prefix or within 0.05 of it, at the CPU's log-prob within 0.05.
    let p = SamplingParams {
        greedy: true,
        max_new_tokens: 6,
        ..SamplingParams::default()
    };
    for name in ["qwen2-tiny", "qwen3-moe-tiny", "deepseek-v3-tiny", "llama-tiny"] {
        let model = fixture(name);
        let gpu = Policy::new(model.clone(), Device::Cuda(0), Precision::F32).unwrap();
        let sampler = Sampler::new(&gpu, None, cfg_with(4, 16, 64, KvDtype::Bf16), &[]).unwrap();
        let (got, _) = sampler.generate(&prompts(), 1, &p).unwrap();
        let (mut worst, mut argmax) = (0f32, 0);
        for c in &got {
            let mut seq = prompts()[c.prompt_index].clone();
            for (&tok, &lp) in c.token_ids.iter().zip(&c.logprobs) {
                let mut cache = model.new_cache();
                let want = log_softmax(&model.forward_cached(&seq, &mut cache).unwrap());
                let best = want.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let mine = want[tok as usize];
                assert!(
                    best - mine <= 0.05,
                    "{name}: token {tok} at {mine}, the CPU's best {best}"
                );
                argmax += usize::from(mine == best);
                worst = worst.max((lp - mine).abs());
                seq.push(tok);
            }
        }
        let total: usize = got.iter().map(|c| c.token_ids.len()).sum();
        eprintln!("{name}: bf16 KV: {argmax} of {total} tokens the CPU's argmax, worst |log-prob - CPU| {worst:.2e}");
        assert!(worst <= 0.05, "{name}: log-prob off by {worst}");
    }
}

#[test]
fn preemption_gives_the_completions_of_running_alone_cuda() {
    if skip("preemption_gives_the_completions_of_running_alone_cuda") {
        return;
    }
    let (_, gpu) = both(fixture("qwen3-moe-tiny"));
    let ps = vec![
        vec![5, 17, 42, 9, 3],
        vec![101, 7, 250, 33, 64, 2],
        vec![8, 9, 10, 11, 12, 13, 14],
    ];
    // Blocks of 4 positions, f32 keys and values (exact): a sequence needs
    // up to 5 blocks, the six sequences ~24; a pool of 8 must preempt.
    let small = Sampler::new(&gpu, None, cfg_with(6, 4, 8, KvDtype::F32), &[]).unwrap();
    let ample = Sampler::new(&gpu, None, cfg_with(6, 4, 1024, KvDtype::F32), &[]).unwrap();

    // Greedy: each prompt's completions are those of the prompt alone.
    let greedy = SamplingParams {
        greedy: true,
        max_new_tokens: 10,
        ..SamplingParams::default()
    };
    let (got, stats) = small.generate(&ps, 2, &greedy).unwrap();
    eprintln!(
        "greedy, pool of 8 blocks: {} preemptions, {} steps, peak {} blocks",
        stats.preemptions, stats.steps, stats.peak_blocks
    );
    assert!(stats.preemptions > 0, "no preemption");
    assert!(stats.peak_blocks <= 8);
    for (i, prompt) in ps.iter().enumerate() {
        let (alone, st) = ample.generate(std::slice::from_ref(prompt), 2, &greedy).unwrap();
        assert_eq!(st.preemptions, 0);
        for (g, a) in got.iter().filter(|c| c.prompt_index == i).zip(&alone) {
            assert_eq!(
                (&g.token_ids, g.finish_reason),
                (&a.token_ids, a.finish_reason),
                "prompt {i}"
            );
        }
    }

    // Sampled: the two samples of a prompt differ after sharing its
    // blocks, so a write into a shared block would show; the completions
    // equal the same request's with a pool that never preempts.
    let sampled = SamplingParams {
        temperature: 1.0,
        max_new_tokens: 10,
        seed: 5,
        ..SamplingParams::default()
    };
    let (got, stats) = small.generate(&ps, 2, &sampled).unwrap();
    assert!(stats.preemptions > 0, "no preemption");
    eprintln!(
        "sampled, pool of 8 blocks: {} preemptions, {} positions recomputed, {} re-shared",
        stats.preemptions, stats.recomputed_tokens, stats.reshared_tokens
    );
    // A returning sample takes its prompt's full block from its live
    // sibling: those positions are shared, not recomputed.
    assert!(stats.reshared_tokens > 0, "no prompt block re-shared");
    let (want, st) = ample.generate(&ps, 2, &sampled).unwrap();
    assert_eq!(st.preemptions, 0);
    assert_eq!(got, want, "preempted vs never preempted");
    assert!(
        got.chunks(2).any(|pair| pair[0].token_ids != pair[1].token_ids),
        "the samples of a prompt differ"
    );
}

#[test]
fn the_samples_of_a_prompt_share_its_blocks_cuda() {
    if skip("the_samples_of_a_prompt_share_its_blocks_cuda") {
        return;
    }
    let (_, gpu) = both(fixture("llama-tiny"));
    let p = SamplingParams {
        greedy: true,
        max_new_tokens: 4,
        ..SamplingParams::default()
    };
    let prompt: Vec<u32> = (0..20).map(|i| 3 + 7 * i).collect();
    let engine = Sampler::new(&gpu, None, cfg_with(4, 16, 64, KvDtype::Bf16), &[]).unwrap();
    // Four samples of one prompt: one prefill; the full block is shared,
    // the partial one copied by three samples and written in place by the
    // last: 2 + 3 blocks at the peak.
    let (shared, s1) = engine.generate(std::slice::from_ref(&prompt), 4, &p).unwrap();
    // Four copies of the prompt: 4 x 2 blocks.
    let (separate, s2) = engine.generate(&vec![prompt.clone(); 4], 1, &p).unwrap();
    eprintln!(
        "peak blocks: {} shared, {} separate; prompt tokens prefilled {} vs {}",
        s1.peak_blocks, s2.peak_blocks, s1.prompt_tokens, s2.prompt_tokens
    );
    assert_eq!((s1.peak_blocks, s2.peak_blocks), (5, 8));
    assert_eq!((s1.prompt_tokens, s2.prompt_tokens), (20, 80));
    for (a, b) in shared.iter().zip(&separate) {
        assert_eq!(a.token_ids, b.token_ids);
    }
}

#[test]
fn a_pool_too_small_for_one_sequence_is_an_error_cuda() {
    if skip("a_pool_too_small_for_one_sequence_is_an_error_cuda") {
        return;
    }
    let (_, gpu) = both(fixture("qwen2-tiny"));
    let p = SamplingParams {
        greedy: true,
        max_new_tokens: 8,
        ..SamplingParams::default()
    };
    let engine = Sampler::new(&gpu, None, cfg_with(4, 4, 2, KvDtype::Bf16), &[]).unwrap();
    let e = engine.generate(&prompts(), 1, &p).unwrap_err().to_string();
    assert!(e.contains("prompt 0 needs 3 cache blocks"), "{e}");
}

#[test]
fn mla_caches_the_latent_and_decodes_as_the_expanded_form_cuda() {
    if skip("mla_caches_the_latent_and_decodes_as_the_expanded_form_cuda") {
        return;
    }
    let (_, gpu) = both(fixture("deepseek-v3-tiny"));
    let PolicyModel::Gpu(g) = gpu.model() else {
        panic!("not on the GPU")
    };
    let m = g.config.mla.unwrap();
    let layers = g.config.num_layers;
    assert!(g.mla_latent_fits(KvDtype::F32) && g.mla_latent_fits(KvDtype::Bf16));
    // Bytes per cached position: the latent plus the rotary key, per layer.
    for dtype in [KvDtype::F32, KvDtype::Bf16] {
        let c = g.new_paged_cache(16, 4, dtype).unwrap();
        assert!(c.is_latent());
        assert_eq!(
            c.bytes_per_token(),
            (m.kv_lora_rank + m.qk_rope_head_dim) * dtype.size() * layers,
            "{dtype:?}"
        );
    }
    let expanded_bytes = g.config.num_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim) * 4 * layers;
    assert_eq!(
        g.new_paged_cache_with(16, 4, KvDtype::F32, false)
            .unwrap()
            .bytes_per_token(),
        expanded_bytes
    );
    // The weight-absorbed decode gives the expanded form's logits: a
    // prefill across a block boundary, then two decode tokens.
    let mut logits = Vec::new();
    for latent in [true, false] {
        let mut cache = g.new_paged_cache_with(4, 8, KvDtype::F32, latent).unwrap();
        let table: Vec<u32> = (0..8).map(|_| cache.alloc().unwrap()).collect();
        let mut out = Vec::new();
        let prompt = [5u32, 17, 42, 9, 3, 77];
        let steps: [(&[u32], usize); 3] = [(&prompt, 0), (&[11], 6), (&[250], 7)];
        for (ids, start) in steps {
            let span = SeqSpan {
                table: &table,
                start,
                len: ids.len(),
            };
            let l = g.forward_paged(ids, &[span], &mut cache).unwrap();
            out.extend(g.gpu().download(&l).unwrap());
        }
        logits.push(out);
    }
    let worst = logits[0]
        .iter()
        .zip(&logits[1])
        .fold(0f32, |w, (a, b)| w.max((a - b).abs()));
    eprintln!("latent vs expanded MLA cache: worst |logit difference| {worst:.2e}");
    assert!(worst < 1e-4, "worst {worst}");
    // Asking for the latent cache of a model without MLA is an error.
    let (_, dense) = both(fixture("qwen2-tiny"));
    let PolicyModel::Gpu(d) = dense.model() else {
        panic!("not on the GPU")
    };
    assert!(!d.mla_latent_fits(KvDtype::F32) && !d.mla_latent_fits(KvDtype::Bf16));
    assert!(d.new_paged_cache_with(16, 4, KvDtype::F32, true).is_err());
}

#[test]
fn mla_latent_cache_wider_than_256_decodes_as_the_expanded_form_cuda() {
    if skip("mla_latent_cache_wider_than_256_decodes_as_the_expanded_form_cuda") {
        return;
    }
    // deepseek-v3-tiny's shape with a latent entry of 280 + 8 = 288, past
    // the 256 of the ordinary decode kernels: the latent kernel's case
    // (DeepSeek-V3's own entry is 512 + 64), with seeded random weights.
    let mut cfg = fixture("deepseek-v3-tiny").config;
    if let Some(m) = cfg.mla.as_mut() {
        m.kv_lora_rank = 280;
    }
    let policy = Policy::new(Model::random(cfg, 21, 0.05), Device::Cuda(0), Precision::F32).unwrap();
    let PolicyModel::Gpu(g) = policy.model() else {
        panic!("not on the GPU")
    };
    let m = g.config.mla.unwrap();
    let layers = g.config.num_layers;
    assert!(g.mla_latent_fits(KvDtype::Bf16));
    assert!(!g.mla_latent_fits(KvDtype::F32));
    let c = g.new_paged_cache(16, 4, KvDtype::Bf16).unwrap();
    assert!(c.is_latent());
    assert_eq!(c.bytes_per_token(), (m.kv_lora_rank + m.qk_rope_head_dim) * 2 * layers);
    assert!(!g.new_paged_cache(16, 4, KvDtype::F32).unwrap().is_latent());
    // A prefill across a block boundary, then two decode tokens, with the
    // latent bf16 cache, the expanded bf16 cache and the expanded f32 one.
    let mut logits = Vec::new();
    for (latent, dtype) in [(true, KvDtype::Bf16), (false, KvDtype::Bf16), (false, KvDtype::F32)] {
        let mut cache = g.new_paged_cache_with(4, 8, dtype, latent).unwrap();
        let table: Vec<u32> = (0..8).map(|_| cache.alloc().unwrap()).collect();
        let mut out = Vec::new();
        let prompt = [5u32, 17, 42, 9, 3, 77];
        let steps: [(&[u32], usize); 3] = [(&prompt, 0), (&[11], 6), (&[250], 7)];
        for (ids, start) in steps {
            let span = SeqSpan {
                table: &table,
                start,
                len: ids.len(),
            };
            let l = g.forward_paged(ids, &[span], &mut cache).unwrap();
            out.extend(g.gpu().download(&l).unwrap());
        }
        logits.push(out);
    }
    let worst = |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0f32, |w, (x, y)| w.max((x - y).abs()));
    let scale = logits[2].iter().fold(0f32, |w, x| w.max(x.abs()));
    let (latent, expanded) = (worst(&logits[0], &logits[2]), worst(&logits[1], &logits[2]));
    eprintln!(
        "bf16 caches against the f32 expanded one (|logit| <= {scale:.3}): latent {latent:.2e}, expanded {expanded:.2e}"
    );
    assert!(
        latent <= 2.0 * expanded.max(1e-4),
        "latent {latent}, expanded {expanded}"
    );
}

/// The driver calls (emulated GPU) of one greedy generation: `samples`
/// samples of a 6-token prompt, `max_new` tokens each, on `policy`.
fn driver_calls(
    policy: &Policy,
    samples: usize,
    max_new: usize,
    cfg: EngineConfig,
) -> aha_cuda_kernels::emulate::DriverCounts {
    let engine = Sampler::new(policy, None, cfg, &[]).unwrap();
    let p = SamplingParams {
        greedy: true,
        max_new_tokens: max_new,
        ..SamplingParams::default()
    };
    let before = aha_cuda_kernels::emulate::driver_counts().unwrap();
    let (got, _) = engine.generate(&[vec![5, 17, 42, 9, 3, 77]], samples, &p).unwrap();
    let calls = aha_cuda_kernels::emulate::driver_counts().unwrap().since(before);
    assert!(
        got.iter().all(|c| c.token_ids.len() == max_new),
        "a sequence stopped early"
    );
    calls
}

#[test]
fn a_decode_step_makes_the_same_driver_calls_at_any_batch_size_cuda() {
    if skip("a_decode_step_makes_the_same_driver_calls_at_any_batch_size_cuda") {
        return;
    }
    if aha_cuda_kernels::emulate::driver_counts().is_none() {
        eprintln!("driver calls are counted by the emulated driver only: not counted on this GPU");
        return;
    }
    // qwen2-tiny's shape with random weights at 2 and 4 layers, so that
    // the calls per layer show; no end-of-sequence token, so every
    // sequence runs to max_new.
    let policy = |layers: usize| {
        let mut cfg = fixture("qwen2-tiny").config;
        cfg.num_layers = layers;
        cfg.eos_token_ids.clear();
        Policy::new(Model::random(cfg, 3, 0.05), Device::Cuda(0), Precision::F32).unwrap()
    };
    // Eager steps (no CUDA graphs).
    let eager = EngineConfig {
        cuda_graphs: false,
        ..cfg_with(8, 4, 64, KvDtype::Bf16)
    };
    let per_step = |p: &Policy, samples: usize| {
        let (short, long) = (driver_calls(p, samples, 3, eager), driver_calls(p, samples, 6, eager));
        let d = long.since(short);
        [d.launches, d.allocs, d.frees, d.htod, d.dtoh, d.dtod, d.memsets].map(|x| x / 3)
    };
    let (two, four) = (policy(2), policy(4));
    let [one_2, batch_2, batch_4] = [per_step(&two, 1), per_step(&two, 4), per_step(&four, 4)];
    let per_layer: Vec<u64> = batch_4.iter().zip(&batch_2).map(|(a, b)| (a - b) / 2).collect();
    let fixed: Vec<u64> = batch_2.iter().zip(&per_layer).map(|(t, l)| t - 2 * l).collect();
    eprintln!(
        "driver calls per decode step [launches, allocs, frees, htod, dtoh, dtod, memsets]: per layer {per_layer:?}, \
         per step outside the layers {fixed:?}"
    );
    // The keys and values of every sequence go into the pool in one
    // scatter per layer: a step of 4 sequences makes the launches and
    // copies of 1 (allocations may differ by the one-off growth of the
    // decode's scratch buffer to a longer context, and by the scratch pool,
    // which the tests running beside this one share).
    let no_allocs = |c: &[u64; 7]| [c[0], c[3], c[4], c[5], c[6]];
    assert_eq!(
        no_allocs(&one_2),
        no_allocs(&batch_2),
        "batch 1 vs batch 4: {one_2:?} vs {batch_2:?}"
    );
    assert!(
        one_2[1].abs_diff(batch_2[1]) <= 3,
        "allocations: {one_2:?} vs {batch_2:?}"
    );
    assert!(per_layer[0] > 0);
}

#[test]
fn a_decode_step_replayed_as_a_graph_makes_one_launch_and_reads_the_samples_back_cuda() {
    if skip("a_decode_step_replayed_as_a_graph_makes_one_launch_and_reads_the_samples_back_cuda") {
        return;
    }
    if aha_cuda_kernels::emulate::driver_counts().is_none() {
        eprintln!("driver calls are counted by the emulated driver only: not counted on this GPU");
        return;
    }
    let policy = |layers: usize| {
        let mut cfg = fixture("qwen2-tiny").config;
        cfg.num_layers = layers;
        cfg.eos_token_ids.clear();
        Policy::new(Model::random(cfg, 3, 0.05), Device::Cuda(0), Precision::F32).unwrap()
    };
    // Blocks of 16: every decode step of a 6-token prompt and up to 6 new
    // tokens is in the same bucket, captured once in both runs; the longer
    // run replays it 3 times more.
    let graphs = cfg_with(8, 16, 64, KvDtype::Bf16);
    let per_step = |p: &Policy, samples: usize| {
        let short = driver_calls(p, samples, 3, graphs);
        let d = driver_calls(p, samples, 6, graphs).since(short);
        [
            d.graph_launches,
            d.launches,
            d.allocs,
            d.frees,
            d.htod,
            d.dtoh,
            d.dtod,
            d.memsets,
        ]
        .map(|x| x / 3)
    };
    let (two, four) = (policy(2), policy(4));
    let want = [1, 0, 0, 0, 0, 3, 0, 0];
    for (what, got) in [
        ("1 sequence, 2 layers", per_step(&two, 1)),
        ("4 sequences, 2 layers", per_step(&two, 4)),
        ("4 sequences, 4 layers", per_step(&four, 4)),
    ] {
        assert_eq!(
            got, want,
            "{what}: [graph launches, launches, allocs, frees, htod, dtoh, dtod, memsets] per step"
        );
    }
}

#[test]
fn decode_graphs_give_the_eager_completions_cuda() {
    if skip("decode_graphs_give_the_eager_completions_cuda") {
        return;
    }
    let prompts: Vec<Vec<u32>> = vec![
        vec![5, 17, 42, 9],
        vec![101, 7, 250, 33, 64, 2],
        vec![11, 3],
        vec![77, 78, 79, 80, 81, 82, 83, 84, 85],
        vec![200],
    ];
    let greedy = SamplingParams {
        greedy: true,
        max_new_tokens: 10,
        ..SamplingParams::default()
    };
    let sampled = SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        seed: 7,
        max_new_tokens: 10,
        ..SamplingParams::default()
    };
    // Dense GQA and MoE with MLA's latent cache; a batch larger than the
    // requests and one that admits in turns, with a pool small enough to
    // preempt (decode steps then alternate with recomputations).
    for name in ["qwen2-tiny", "deepseek-v3-tiny"] {
        let policy = Policy::new(fixture(name), Device::Cuda(0), Precision::F32).unwrap();
        for p in [&greedy, &sampled] {
            for (max_batch, kv_blocks) in [(16, 4096), (3, 9)] {
                let run = |cuda_graphs: bool| {
                    let cfg = EngineConfig {
                        cuda_graphs,
                        ..cfg_with(max_batch, 4, kv_blocks, KvDtype::Bf16)
                    };
                    Sampler::new(&policy, None, cfg, &[])
                        .unwrap()
                        .generate(&prompts, 2, p)
                        .unwrap()
                };
                let ((eager, se), (graphed, sg)) = (run(false), run(true));
                let what = format!("{name}, greedy {}, batch {max_batch}, {kv_blocks} blocks", p.greedy);
                assert_eq!((se.graph_steps, se.graphs_captured), (0, 0), "{what}");
                assert!(sg.graph_steps > 0 && sg.graphs_captured >= 2, "{what}: {sg:?}");
                if kv_blocks < 100 {
                    assert!(sg.preemptions > 0, "{what}: no preemption");
                }
                assert_eq!(eager.len(), graphed.len(), "{what}");
                for (e, g) in eager.iter().zip(&graphed) {
                    assert_eq!(
                        (e.prompt_index, e.sample_index, &e.token_ids, e.finish_reason),
                        (g.prompt_index, g.sample_index, &g.token_ids, g.finish_reason),
                        "{what}"
                    );
                    // The padded batch may split the keys differently.
                    for (a, b) in e.logprobs.iter().zip(&g.logprobs) {
                        assert!((a - b).abs() < 1e-4, "{what}: log-prob {a} vs {b}");
                    }
                }
            }
        }
    }
}

/// qwen2-tiny's shape with random weights (`seed`) and no end-of-sequence
/// token, so that every sequence runs to its `max_new_tokens`.
fn random_qwen(seed: u64) -> Model {
    let mut cfg = fixture("qwen2-tiny").config;
    cfg.eos_token_ids.clear();
    Model::random(cfg, seed, 0.05)
}

fn same_completions(got: &[Completion], want: &[Completion], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(want) {
        assert_eq!(
            (g.prompt_index, g.sample_index, &g.token_ids, g.finish_reason),
            (w.prompt_index, w.sample_index, &w.token_ids, w.finish_reason),
            "{what}"
        );
        // An eager step and a replayed one may split the keys differently.
        for (a, b) in g.logprobs.iter().zip(&w.logprobs) {
            assert!((a - b).abs() < 1e-4, "{what}: log-prob {a} vs {b}");
        }
    }
}

/// A fresh engine's completions (nothing kept from an earlier call).
fn fresh(policy: &Policy, cfg: EngineConfig, prompts: &[Vec<u32>], n: usize, p: &SamplingParams) -> Vec<Completion> {
    Sampler::new(policy, None, cfg, &[])
        .unwrap()
        .generate(prompts, n, p)
        .unwrap()
        .0
}

#[test]
fn a_second_call_reuses_the_pool_and_replays_the_kept_graphs_cuda() {
    if skip("a_second_call_reuses_the_pool_and_replays_the_kept_graphs_cuda") {
        return;
    }
    let policy = Policy::new(random_qwen(3), Device::Cuda(0), Precision::F32).unwrap();
    let cfg = cfg_with(4, 16, 64, KvDtype::Bf16);
    let p = SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        seed: 5,
        max_new_tokens: 6,
        ..SamplingParams::default()
    };
    let ps = prompts();
    let engine = Sampler::new(&policy, None, cfg, &[]).unwrap();
    let counted = |f: &mut dyn FnMut() -> (Vec<Completion>, aha_sampler::GenerateStats)| {
        let before = aha_cuda_kernels::emulate::driver_counts();
        let out = f();
        let calls = aha_cuda_kernels::emulate::driver_counts()
            .zip(before)
            .map(|(a, b)| a.since(b));
        (out, calls)
    };
    let ((first, s1), c1) = counted(&mut || engine.generate(&ps, 2, &p).unwrap());
    let ((second, s2), c2) = counted(&mut || engine.generate(&ps, 2, &p).unwrap());
    eprintln!("first call: {s1:?}\n  {c1:?}\nsecond call: {s2:?}\n  {c2:?}");
    assert_eq!((s1.pools_allocated, s2.pools_allocated), (1, 0));
    assert!(s1.graphs_captured >= 1, "{s1:?}");
    assert_eq!(s2.graphs_captured, 0, "a kept bucket was captured again");
    // Every decode step of the second call replays (the first call ran a
    // bucket eagerly the first time it saw it).
    assert!(s2.graph_steps > s1.graph_steps, "{s1:?} vs {s2:?}");
    assert_eq!(s1.peak_blocks, s2.peak_blocks, "the pool starts each call empty");
    if let (Some(c1), Some(c2)) = (c1, c2) {
        assert_eq!(c2.graph_launches as usize, s2.graph_steps);
        // The pool (a buffer per layer for keys and one for values) and
        // the captures' buffers are not allocated again.
        assert!(
            c2.allocs + 2 * policy.config().num_layers as u64 <= c1.allocs,
            "allocations: {} then {}",
            c1.allocs,
            c2.allocs
        );
    }
    same_completions(&second, &first, "second call vs first");
    same_completions(
        &second,
        &fresh(&policy, cfg, &ps, 2, &p),
        "second call vs a fresh engine",
    );
    // A smaller request fits the kept pool (its batch of 1 is a new
    // bucket, captured once); its completions are those of a fresh engine.
    let (small, s3) = engine.generate(&ps[..1], 1, &p).unwrap();
    assert_eq!((s3.pools_allocated, s3.graphs_captured), (0, 1), "{s3:?}");
    same_completions(&small, &fresh(&policy, cfg, &ps[..1], 1, &p), "smaller request");
    let (again, s4) = engine.generate(&ps, 2, &p).unwrap();
    assert_eq!((s4.pools_allocated, s4.graphs_captured), (0, 0), "{s4:?}");
    same_completions(&again, &first, "after the smaller request");
}

#[test]
fn a_changed_configuration_rebuilds_what_depends_on_it_cuda() {
    if skip("a_changed_configuration_rebuilds_what_depends_on_it_cuda") {
        return;
    }
    let policy = Policy::new(random_qwen(4), Device::Cuda(0), Precision::F32).unwrap();
    let ps = prompts();
    let bf16 = cfg_with(4, 16, 64, KvDtype::Bf16);
    let hot = SamplingParams {
        temperature: 0.9,
        seed: 9,
        max_new_tokens: 6,
        ..SamplingParams::default()
    };
    let cold = SamplingParams {
        temperature: 0.5,
        ..hot.clone()
    };
    let mut cache = EngineCache::new();
    // An engine per call over one cache, as the trainer makes them.
    let mut call = |cfg: EngineConfig, p: &SamplingParams, ps: &[Vec<u32>]| {
        let out = Sampler::with_cache(&policy, None, cfg, &[], &mut cache)
            .unwrap()
            .generate(ps, 2, p)
            .unwrap();
        same_completions(&out.0, &fresh(&policy, cfg, ps, 2, p), "against a fresh engine");
        out.1
    };
    let s = call(bf16, &hot, &ps);
    assert_eq!(s.pools_allocated, 1);
    assert!(s.graphs_captured >= 1);
    let s = call(bf16, &hot, &ps);
    assert_eq!(
        (s.pools_allocated, s.graphs_captured),
        (0, 0),
        "same configuration: {s:?}"
    );
    // Another temperature is baked into new graphs; the pool stays.
    let s = call(bf16, &cold, &ps);
    assert_eq!(s.pools_allocated, 0, "{s:?}");
    assert!(s.graphs_captured >= 1, "graphs of another temperature replayed: {s:?}");
    // Another dtype or block size: a new pool (and no graph in f32).
    let s = call(cfg_with(4, 16, 64, KvDtype::F32), &cold, &ps);
    assert_eq!((s.pools_allocated, s.graph_steps), (1, 0), "f32: {s:?}");
    let s = call(cfg_with(4, 8, 64, KvDtype::Bf16), &cold, &ps);
    assert_eq!(s.pools_allocated, 1, "blocks of 8: {s:?}");
    assert!(s.graphs_captured >= 1, "{s:?}");
    // A larger request outgrows the pool: a new one, with room to spare.
    let more: Vec<Vec<u32>> = ps.iter().chain(&ps).chain(&ps).cloned().collect();
    let s = call(cfg_with(8, 8, 64, KvDtype::Bf16), &cold, &more);
    assert_eq!(s.pools_allocated, 1, "larger request: {s:?}");
    // The request's worst case: each of the 6 prompts (4 or 6 tokens)
    // takes 1 prompt block and 2 samples x 2 blocks to 6 new tokens, 30 in
    // all; a pool replacing a smaller one takes a quarter more, plus the
    // pad block of a batch of 8.
    assert_eq!(cache.blocks(), 30 + 30 / 4 + 1);
    assert!(cache.bytes() > 0);
    // Released: the memory goes, and the next call allocates again.
    cache.release();
    assert_eq!((cache.blocks(), cache.bytes(), cache.graphs()), (0, 0, 0));
    let s = Sampler::with_cache(&policy, None, bf16, &[], &mut cache)
        .unwrap()
        .generate(&ps, 2, &hot)
        .unwrap()
        .1;
    assert_eq!(s.pools_allocated, 1);
}

#[test]
fn weights_updated_in_place_are_read_by_graphs_kept_from_the_previous_call_cuda() {
    if skip("weights_updated_in_place_are_read_by_graphs_kept_from_the_previous_call_cuda") {
        return;
    }
    let mut policy = Policy::new(random_qwen(5), Device::Cuda(0), Precision::F32).unwrap();
    let identity = |policy: &Policy| match policy.model() {
        PolicyModel::Gpu(g) => g.identity(),
        PolicyModel::Cpu(_) => panic!("not on the GPU"),
    };
    let cfg = cfg_with(4, 16, 64, KvDtype::Bf16);
    let p = SamplingParams {
        greedy: true,
        max_new_tokens: 6,
        ..SamplingParams::default()
    };
    let ps = prompts();
    let mut cache = EngineCache::new();
    let mut call = |policy: &Policy| {
        Sampler::with_cache(policy, None, cfg, &[], &mut cache)
            .unwrap()
            .generate(&ps, 1, &p)
            .unwrap()
    };
    let (before, s) = call(&policy);
    assert!(s.graphs_captured >= 1, "{s:?}");
    // New weights written into the weight buffer in place, as the
    // optimizer does: same addresses.
    let id = identity(&policy);
    let new = random_qwen(6).params;
    {
        let (gpu, params, _) = policy.gpu_params_and_grads_mut().unwrap().unwrap();
        let up = gpu.upload(&new).unwrap();
        gpu.copy_into(params, 0, &up).unwrap();
    }
    policy.params_updated().unwrap();
    assert_eq!(identity(&policy), id, "an in-place update moved the weights");
    let (after, s) = call(&policy);
    assert_eq!((s.pools_allocated, s.graphs_captured), (0, 0), "{s:?}");
    assert!(s.graph_steps > 0, "{s:?}");
    assert_ne!(
        before.iter().map(|c| &c.token_ids).collect::<Vec<_>>(),
        after.iter().map(|c| &c.token_ids).collect::<Vec<_>>(),
        "the new weights changed nothing"
    );
    same_completions(&after, &fresh(&policy, cfg, &ps, 1, &p), "in place, replayed graphs");
    // Reallocated weights (set_params uploads a new buffer): the kept
    // graphs would read the old buffer, so they are captured again.
    policy.set_params(&random_qwen(7).params).unwrap();
    assert_ne!(identity(&policy), id, "set_params kept the buffer");
    let (moved, s) = call(&policy);
    assert_eq!(s.pools_allocated, 0, "{s:?}");
    assert!(s.graphs_captured >= 1, "graphs over the old buffer replayed: {s:?}");
    same_completions(&moved, &fresh(&policy, cfg, &ps, 1, &p), "reallocated weights");
}
