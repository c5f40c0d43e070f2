//! The rollout engine against the transformers fixtures and its own
//! contracts: greedy output, seeded reproducibility whatever the batch,
//! the sampled distribution, log-probs equal to the model's, completions
//! intact when sequences finish at very different lengths, incremental
//! detokenisation across multi-byte characters, paged memory.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use aha_moe_model::st::read_file;
use aha_moe_model::Model;
use aha_sampler::{
    decode, load_tokenizer, sample, Detokenizer, Engine, EngineConfig, FinishReason, SamplingParams, SeqRng,
};
use aha_tensor::CpuStorage;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

fn ref_ids(name: &str, tensor: &str) -> Vec<u32> {
    let t = read_file(&fixture(name).join("reference.safetensors"))
        .unwrap()
        .into_iter()
        .find(|t| t.name == tensor)
        .unwrap();
    match t.data {
        CpuStorage::I64(v) => v.into_iter().map(|x| x as u32).collect(),
        _ => panic!("{tensor} not i64"),
    }
}

fn prompts() -> Vec<Vec<u32>> {
    vec![
        vec![10, 20, 30],
        (5..40).collect(),
        vec![7],
        (100..117).collect(),
        vec![42, 43, 44, 45, 46, 47, 48, 49, 50],
    ]
}

#[test]
fn greedy_matches_transformers() {
    for name in ["qwen2-tiny", "qwen3-moe-tiny", "deepseek-v3-tiny"] {
        let model = Model::load(&fixture(name)).unwrap();
        let prompt = ref_ids(name, "greedy_prompt");
        let want = ref_ids(name, "greedy_output");
        // transformers' greedy ran without stopping at EOS: ignore EOS here.
        let mut m2 = model.clone();
        m2.config.eos_token_ids.clear();
        let engine = Engine::new(&m2, None, EngineConfig::default(), &[]).unwrap();
        let params = SamplingParams {
            greedy: true,
            max_new_tokens: want.len(),
            ..SamplingParams::default()
        };
        let (out, _) = engine.generate(&[prompt.clone(), prompt], 2, &params).unwrap();
        assert_eq!(out.len(), 4);
        for c in &out {
            assert_eq!(c.token_ids, want, "{name}: greedy differs from transformers");
            assert_eq!(c.finish_reason, FinishReason::Length);
        }
    }
}

#[test]
fn seeded_sampling_does_not_depend_on_the_batch() {
    let model = Model::load(&fixture("qwen3-moe-tiny")).unwrap();
    let params = SamplingParams {
        max_new_tokens: 20,
        seed: 1234,
        top_p: 0.9,
        ..SamplingParams::default()
    };
    let all = prompts();
    let big = Engine::new(
        &model,
        None,
        EngineConfig {
            max_batch: 12,
            block_size: 4,
            kv_blocks: 4096,
            ..EngineConfig::default()
        },
        &[],
    )
    .unwrap();
    let (together, _) = big.generate(&all, 3, &params).unwrap();
    let small = Engine::new(
        &model,
        None,
        EngineConfig {
            max_batch: 3,
            block_size: 16,
            kv_blocks: 4096,
            ..EngineConfig::default()
        },
        &[],
    )
    .unwrap();
    for (pi, p) in all.iter().enumerate() {
        // Alone, with the prompt index preserved through the seed derivation:
        // run the same prompt list but compare only this prompt's samples.
        let (alone, _) = small.generate(&all[..=pi], 3, &params).unwrap();
        let a: Vec<_> = alone.iter().filter(|c| c.prompt_index == pi).collect();
        let t: Vec<_> = together.iter().filter(|c| c.prompt_index == pi).collect();
        assert_eq!(a.len(), 3);
        for (x, y) in a.iter().zip(&t) {
            assert_eq!(
                x.token_ids,
                y.token_ids,
                "prompt {pi} ({} tokens) sample {}",
                p.len(),
                x.sample_index
            );
            // Other rows in the batch change the products' blocking, so the
            // log-probs agree to rounding, not bit for bit.
            for (a, b) in x.logprobs.iter().zip(&y.logprobs) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
        }
    }
    // Different samples of a prompt differ.
    assert_ne!(together[0].token_ids, together[1].token_ids);
    // A slice of the prompts generated with `prompt_offset` set to its
    // first index (a data-parallel rank's share) draws the same
    // completions as the whole list; without the offset it does not.
    let offset = SamplingParams {
        prompt_offset: 2,
        ..params.clone()
    };
    let (share, _) = small.generate(&all[2..], 3, &offset).unwrap();
    let (unshifted, _) = small.generate(&all[2..], 3, &params).unwrap();
    let mut differs = false;
    for (c, u) in share.iter().zip(&unshifted) {
        let t = together
            .iter()
            .find(|t| t.prompt_index == c.prompt_index + 2 && t.sample_index == c.sample_index)
            .unwrap();
        assert_eq!(c.token_ids, t.token_ids, "prompt {} with offset 2", c.prompt_index + 2);
        differs |= u.token_ids != t.token_ids;
    }
    assert!(differs, "the offset changed nothing: the check would prove nothing");
}

#[test]
fn sampled_distribution_matches_the_truncated_softmax() {
    // A tiny vocabulary; chi-square against the distribution computed here
    // independently (temperature, top-k, top-p, min-p in transformers' order).
    let logits = [2.0f32, 1.5, 1.0, 0.2, -0.5, -1.0, 0.9, 1.4];
    let cases = [
        SamplingParams {
            temperature: 0.7,
            ..SamplingParams::default()
        },
        SamplingParams {
            temperature: 1.0,
            top_k: 4,
            ..SamplingParams::default()
        },
        SamplingParams {
            temperature: 1.3,
            top_p: 0.8,
            ..SamplingParams::default()
        },
        SamplingParams {
            temperature: 1.0,
            min_p: 0.3,
            ..SamplingParams::default()
        },
        SamplingParams {
            temperature: 0.9,
            top_k: 6,
            top_p: 0.9,
            min_p: 0.05,
            ..SamplingParams::default()
        },
    ];
    for (ci, p) in cases.iter().enumerate() {
        let t = p.temperature as f64;
        let mut probs: Vec<(usize, f64)> = logits.iter().map(|&x| (x as f64 / t).exp()).enumerate().collect();
        let z: f64 = probs.iter().map(|x| x.1).sum();
        probs.iter_mut().for_each(|x| x.1 /= z);
        probs.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap());
        if p.top_k > 0 {
            probs.truncate(p.top_k);
        }
        if p.top_p < 1.0 {
            let mass: f64 = probs.iter().map(|x| x.1).sum();
            let (mut acc, mut keep) = (0.0, probs.len());
            for (j, x) in probs.iter().enumerate() {
                acc += x.1 / mass;
                if acc >= p.top_p as f64 {
                    keep = j + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        if p.min_p > 0.0 {
            let floor = probs[0].1 * p.min_p as f64;
            probs.retain(|x| x.1 >= floor);
        }
        let kept: f64 = probs.iter().map(|x| x.1).sum();
        let mut expected = vec![0.0; logits.len()];
        for (i, q) in &probs {
            expected[*i] = q / kept;
        }
        let draws = 40_000;
        let mut counts = vec![0usize; logits.len()];
        let mut rng = SeqRng::for_sequence(99, ci as u64, 0);
        for _ in 0..draws {
            let s = sample(&logits, p, &mut rng).unwrap();
            counts[s.token as usize] += 1;
            // The reported log-prob is the temperature-scaled one, before truncation.
            let want = (logits[s.token as usize] as f64 / t - z.ln()) as f32;
            assert!((s.logprob - want).abs() < 1e-5);
        }
        let mut chi2 = 0.0;
        let mut df = 0;
        for i in 0..logits.len() {
            if expected[i] == 0.0 {
                assert_eq!(counts[i], 0, "case {ci}: token {i} was truncated but drawn");
                continue;
            }
            let e = expected[i] * draws as f64;
            chi2 += (counts[i] as f64 - e).powi(2) / e;
            df += 1;
        }
        // 99.9th percentile of chi-square with up to 7 degrees of freedom is 24.3.
        assert!(
            chi2 < 24.3,
            "case {ci}: chi-square {chi2:.1} with {} dof; counts {counts:?}",
            df - 1
        );
    }
}

#[test]
fn logprobs_equal_the_models_on_the_same_tokens() {
    let model = Model::load(&fixture("deepseek-v3-tiny")).unwrap();
    let engine = Engine::new(&model, None, EngineConfig::default(), &[]).unwrap();
    let params = SamplingParams {
        max_new_tokens: 15,
        seed: 5,
        ..SamplingParams::default()
    };
    let ps = prompts();
    let (out, _) = engine.generate(&ps, 2, &params).unwrap();
    for c in &out {
        let mut seq = ps[c.prompt_index].clone();
        let plen = seq.len();
        seq.extend(&c.token_ids);
        let t = seq.len();
        let acts = model.forward(&seq, 1, t).unwrap();
        let mut targets = vec![0u32; t];
        targets[..t - 1].copy_from_slice(&seq[1..]);
        let (lp, _) = model.token_logprobs(&acts, &targets).unwrap();
        for (j, &got) in c.logprobs.iter().enumerate() {
            let want = lp[plen - 1 + j];
            assert!(
                (got - want).abs() < 1e-4,
                "prompt {} token {j}: engine {got} model {want}",
                c.prompt_index
            );
        }
    }
}

#[test]
fn sequences_finishing_at_different_lengths_come_back_intact() {
    let model = Model::load(&fixture("qwen2-tiny")).unwrap();
    // Treat a frequent token as end-of-sequence so completions end early and at many lengths.
    let params = SamplingParams {
        max_new_tokens: 40,
        seed: 3,
        stop_token_ids: (0..40).collect(),
        ..SamplingParams::default()
    };
    let ps = prompts();
    let batched = Engine::new(
        &model,
        None,
        EngineConfig {
            max_batch: 8,
            block_size: 8,
            kv_blocks: 64,
            ..EngineConfig::default()
        },
        &[],
    )
    .unwrap();
    let mut seen: Vec<aha_sampler::Progress> = Vec::new();
    let (out, stats) = batched
        .generate_with_progress(&ps, 4, &params, &mut |p| seen.push(*p))
        .unwrap();
    assert_eq!(out.len(), ps.len() * 4);
    // Progress: one report per engine step, finished and tokens never go
    // back, the batch never exceeds max_batch, and the last says all done.
    assert_eq!(seen.len(), stats.steps);
    assert!(seen
        .windows(2)
        .all(|w| w[0].finished <= w[1].finished && w[0].generated_tokens <= w[1].generated_tokens));
    assert!(seen.iter().all(|p| p.live <= 8 && p.total == ps.len() * 4));
    let last = seen.last().unwrap();
    assert_eq!(
        (last.finished, last.live, last.generated_tokens),
        (out.len(), 0, stats.generated_tokens)
    );
    let lens: std::collections::BTreeSet<usize> = out.iter().map(|c| c.token_ids.len()).collect();
    assert!(lens.len() >= 4, "lengths not varied enough: {lens:?}");
    let single = Engine::new(
        &model,
        None,
        EngineConfig {
            max_batch: 4,
            block_size: 8,
            kv_blocks: 64,
            ..EngineConfig::default()
        },
        &[],
    )
    .unwrap();
    for pi in 0..ps.len() {
        let (alone, _) = single.generate(&ps[..=pi], 4, &params).unwrap();
        for c in alone.iter().filter(|c| c.prompt_index == pi) {
            let b = &out[pi * 4 + c.sample_index];
            assert_eq!((b.prompt_index, b.sample_index), (pi, c.sample_index));
            assert_eq!(b.token_ids, c.token_ids);
            assert_eq!(b.finish_reason, c.finish_reason);
            match b.finish_reason {
                FinishReason::Eos => assert!(params.stop_token_ids.contains(b.token_ids.last().unwrap())),
                FinishReason::Length => assert_eq!(b.token_ids.len(), 40),
                FinishReason::Stop => panic!("no stop strings were given"),
            }
        }
    }
    // 64 blocks of 8 positions could never hold 20 sequences of up to 75 positions at once.
    assert!(stats.peak_blocks <= 64);
}

#[test]
fn paged_cache_grows_with_live_tokens_and_prompts_are_shared() {
    let model = Model::load(&fixture("qwen3-moe-tiny")).unwrap();
    let engine = Engine::new(
        &model,
        None,
        EngineConfig {
            max_batch: 16,
            block_size: 4,
            kv_blocks: 1024,
            ..EngineConfig::default()
        },
        &[],
    )
    .unwrap();
    let prompt: Vec<u32> = (1..=18).collect(); // 4 full blocks + 2 positions
    let params = SamplingParams {
        max_new_tokens: 6,
        seed: 1,
        ..SamplingParams::default()
    };
    let (_, stats) = engine.generate(&[prompt], 8, &params).unwrap();
    // Shared: 4 full prompt blocks once; per sample: positions 16..24 = 2 blocks.
    // Without sharing, 8 samples would need 8 x 6 = 48 blocks.
    assert!(stats.peak_blocks <= 4 + 8 * 2 + 1, "peak {} blocks", stats.peak_blocks);
    assert_eq!(
        stats.prompt_tokens, 18,
        "the prompt must be prefilled once for all 8 samples"
    );
}

#[test]
fn text_is_right_across_multibyte_characters_and_stop_strings_cut_it() {
    let dir = fixture("qwen2-tiny");
    let tok = load_tokenizer(&dir).unwrap();
    let s = "naïve café — 日本語 ok";
    let ids = tok.encode(s, false).unwrap().get_ids().to_vec();
    let mut d = Detokenizer::default();
    let mut text = String::new();
    let mut partial_seen = false;
    for k in 1..=ids.len() {
        let delta = d.step(&tok, &ids[..k]).unwrap();
        partial_seen |= delta.is_empty();
        text.push_str(&delta);
        assert!(
            !text.contains('\u{FFFD}'),
            "replacement character leaked at token {k}: {text:?}"
        );
    }
    assert_eq!(text, s);
    assert_eq!(decode(&tok, &ids).unwrap(), s);
    assert!(
        partial_seen,
        "no token boundary fell inside a character: the test lost its point"
    );

    // Stop strings: generate greedily, then stop at a string from that output.
    let mut model = Model::load(&dir).unwrap();
    model.config.eos_token_ids.clear();
    let engine = Engine::new(&model, Some(&tok), EngineConfig::default(), &[]).unwrap();
    let greedy = SamplingParams {
        greedy: true,
        max_new_tokens: 30,
        ..SamplingParams::default()
    };
    let (out, _) = engine.generate(&[vec![40, 41, 42]], 1, &greedy).unwrap();
    let full = out[0].text.clone();
    assert!(full.len() > 6, "{full:?}");
    let cut_at = full.char_indices().nth(full.chars().count() / 2).unwrap().0;
    let stop: String = full[cut_at..].chars().take(2).collect();
    let first = full.find(&stop).unwrap();
    let with_stop = SamplingParams {
        stop_strings: vec![stop.clone()],
        ..greedy
    };
    let (out, _) = engine.generate(&[vec![40, 41, 42]], 1, &with_stop).unwrap();
    assert_eq!(out[0].finish_reason, FinishReason::Stop);
    assert_eq!(out[0].text, full[..first], "stop string {stop:?}");
}

#[test]
fn bad_requests_are_errors() {
    let model = Model::load(&fixture("qwen2-tiny")).unwrap();
    let engine = Engine::new(&model, None, EngineConfig::default(), &[]).unwrap();
    let p = SamplingParams {
        max_new_tokens: 8,
        ..SamplingParams::default()
    };
    assert!(engine.generate(&[vec![]], 1, &p).is_err());
    let long = SamplingParams {
        max_new_tokens: 300,
        ..p.clone()
    };
    assert!(engine
        .generate(&[vec![1]], 1, &long)
        .unwrap_err()
        .to_string()
        .contains("max_position_embeddings"));
    assert!(engine.generate(&[vec![1, 2]], 0, &p).is_err());
    assert!(engine
        .generate(
            &[vec![1, 2]],
            1,
            &SamplingParams {
                top_p: 0.0,
                ..p.clone()
            }
        )
        .is_err());
    assert!(engine
        .generate(
            &[vec![1, 2]],
            1,
            &SamplingParams {
                stop_strings: vec!["x".into()],
                ..p.clone()
            }
        )
        .is_err());
    let e = engine.generate(&[vec![1, 999]], 1, &p).unwrap_err().to_string();
    assert!(e.contains("999"), "{e}");
    let tiny = Engine::new(
        &model,
        None,
        EngineConfig {
            max_batch: 4,
            block_size: 4,
            kv_blocks: 2,
            ..EngineConfig::default()
        },
        &[],
    )
    .unwrap();
    assert!(tiny.generate(&[vec![1, 2, 3, 4, 5, 6, 7, 8, 9]], 1, &p).is_err());
}
