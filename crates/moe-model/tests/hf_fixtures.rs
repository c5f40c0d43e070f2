//! The tests of truth: tiny models written by transformers 5.23 / 5.25 in
//! float32 (tests/fixtures/models/*: Qwen2, Qwen3-MoE, DeepSeek-V3, Llama
//! with llama3 RoPE scaling, DeepSeek-V3 with YaRN, DeepSeek-V3 in FP8), with transformers' logits, next-token
//! log-probs, mean-NLL loss, the gradient of that loss for every parameter,
//! and a 12-token greedy continuation. Tolerances: logits and
//! log-probs within 1e-4 (max abs), loss within 1e-5 (relative), every
//! gradient within 1e-3 (norm of the difference over the norm), greedy tokens
//! identical with and without the KV cache.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use aha_moe_model::st::{read_file, NamedTensor};
use aha_moe_model::Model;
use aha_tensor::CpuStorage;

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

fn reference(name: &str) -> HashMap<String, NamedTensor> {
    read_file(&dir(name).join("reference.safetensors"))
        .unwrap()
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect()
}

fn f32s(t: &NamedTensor) -> Vec<f32> {
    match &t.data {
        CpuStorage::F32(v) => v.clone(),
        other => panic!("{}: expected f32, got {:?}", t.name, other.dtype()),
    }
}

fn ids(t: &NamedTensor) -> Vec<u32> {
    match &t.data {
        CpuStorage::I64(v) => v.iter().map(|&x| x as u32).collect(),
        other => panic!("{}: expected i64, got {:?}", t.name, other.dtype()),
    }
}

/// transformers 5 keeps experts fused (`experts.gate_up_proj [E, 2F, C]`,
/// gate rows first; `experts.down_proj [E, C, F]`): split its gradients into
/// the per-expert HF names our layout uses.
fn expected_grads(r: &HashMap<String, NamedTensor>) -> HashMap<String, Vec<f32>> {
    let mut out = HashMap::new();
    for (k, t) in r {
        let Some(name) = k.strip_prefix("grad.") else { continue };
        let v = f32s(t);
        if let Some(prefix) = name.strip_suffix("experts.gate_up_proj") {
            let (e, f2, c) = (t.shape[0], t.shape[1], t.shape[2]);
            let f = f2 / 2;
            for ex in 0..e {
                let base = ex * f2 * c;
                out.insert(
                    format!("{prefix}experts.{ex}.gate_proj.weight"),
                    v[base..base + f * c].to_vec(),
                );
                out.insert(
                    format!("{prefix}experts.{ex}.up_proj.weight"),
                    v[base + f * c..base + f2 * c].to_vec(),
                );
            }
        } else if let Some(prefix) = name.strip_suffix("experts.down_proj") {
            let per = t.shape[1] * t.shape[2];
            for ex in 0..t.shape[0] {
                out.insert(
                    format!("{prefix}experts.{ex}.down_proj.weight"),
                    v[ex * per..(ex + 1) * per].to_vec(),
                );
            }
        } else {
            out.insert(name.to_string(), v);
        }
    }
    out
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn check_model(name: &str) {
    let model = Model::load(&dir(name)).unwrap();
    let r = reference(name);
    let input = &r["input_ids"];
    let (b, t) = (input.shape[0], input.shape[1]);
    let tokens = ids(input);

    // Logits.
    let acts = model.forward(&tokens, b, t).unwrap();
    let logits = model.logits_of(&acts.hidden).unwrap();
    let d = max_abs_diff(&logits, &f32s(&r["logits"]));
    eprintln!("{name}: logits max |diff| = {d:.3e}");
    assert!(d <= 1e-4, "{name}: logits differ from transformers by {d:e}");

    // Next-token log-probs through the chunked path.
    let mut targets = vec![0u32; b * t];
    for row in 0..b {
        for i in 0..t - 1 {
            targets[row * t + i] = tokens[row * t + i + 1];
        }
    }
    let (logp, _) = model.token_logprobs(&acts, &targets).unwrap();
    let ours: Vec<f32> = (0..b).flat_map(|row| logp[row * t..row * t + t - 1].to_vec()).collect();
    let d = max_abs_diff(&ours, &f32s(&r["token_logprobs"]));
    eprintln!("{name}: token_logprobs max |diff| = {d:.3e}");
    assert!(d <= 1e-4, "{name}: log-probs differ by {d:e}");

    // Loss and every parameter's gradient.
    let mut grads = vec![0f32; model.params.len()];
    let loss = model.next_token_loss(&tokens, b, t, &mut grads).unwrap();
    let want_loss = f32s(&r["loss"])[0];
    let rel = ((loss - want_loss) / want_loss).abs();
    eprintln!("{name}: loss {loss} vs {want_loss} (rel {rel:.2e})");
    assert!(rel <= 1e-5, "{name}: loss {loss} vs transformers {want_loss}");
    let want_grads = expected_grads(&r);
    let mut worst = (0f64, String::new());
    let mut checked = 0;
    for e in &model.layout.entries {
        let Some(want) = want_grads.get(&e.name) else {
            assert!(
                !e.trainable,
                "{name}: transformers wrote no gradient for trainable {}",
                e.name
            );
            continue;
        };
        let got = e.slot.of(&grads);
        let num: f64 = got
            .iter()
            .zip(want)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let den: f64 = want.iter().map(|&b| (b as f64).powi(2)).sum::<f64>().sqrt();
        let rel = if den == 0.0 { num } else { num / den };
        if rel > worst.0 {
            worst = (rel, e.name.clone());
        }
        assert!(
            rel <= 1e-3,
            "{name}: gradient of {} off by {rel:.3e} (relative norm)",
            e.name
        );
        checked += 1;
    }
    eprintln!("{name}: {checked} gradients, worst {:.3e} ({})", worst.0, worst.1);
    assert!(checked > 0);

    // Greedy continuation, with and without the KV cache.
    let prompt = ids(&r["greedy_prompt"]);
    let want = ids(&r["greedy_output"]);
    let cached = model.greedy(&prompt, want.len(), true).unwrap();
    let plain = model.greedy(&prompt, want.len(), false).unwrap();
    assert_eq!(
        cached, plain,
        "{name}: KV-cache decoding differs from full recomputation"
    );
    assert_eq!(cached, want, "{name}: greedy output differs from transformers");
}

#[test]
fn qwen2_tiny_matches_transformers() {
    check_model("qwen2-tiny");
}

#[test]
fn qwen3_moe_tiny_matches_transformers() {
    check_model("qwen3-moe-tiny");
}

#[test]
fn deepseek_v3_tiny_matches_transformers() {
    check_model("deepseek-v3-tiny");
}

#[test]
fn llama_tiny_with_llama3_rope_matches_transformers() {
    check_model("llama-tiny");
}

#[test]
fn deepseek_v3_yarn_tiny_matches_transformers() {
    check_model("deepseek-v3-yarn-tiny");
}

/// FP8 e4m3 weights with 128x128 block scales (partial edge blocks),
/// dequantized at load.
///
/// This fixture's transformers reference was not computed from the weights
/// its `model.safetensors` holds: it is self-consistent (its logits, loss,
/// lm-head and final-norm gradients agree with each other to 2.5e-7), but an
/// independent float64 numpy forward (`scripts/deepseek_v3_numpy.py`, which
/// matches the unquantized deepseek-v3-tiny and deepseek-v3-yarn-tiny
/// references, same architecture and RoPE, to 1.5e-5 and 1.8e-5) on the
/// file's dequantized weights lands exactly where aha does, 0.23 from it.
/// The gap is not the e4m3 rounding of weights before quantization (moving
/// every FP8 weight randomly within its rounding interval moves logits by
/// std 0.40-0.46 and the loss by 1e-2 to 1e-1; the reference is std 0.047
/// off with the loss 1.6e-5 off), nor dynamic FP8 activation quantization
/// (3.5 off), bf16 dequantization or bf16/TF32 products (0.23-0.29 off),
/// a zero correction bias (5.0) or un-scaled RoPE (6.1).
///
/// So what is held to the usual 1e-4 is the numpy reference on the
/// dequantized weights (`dequantized_logits.safetensors`, written by that
/// script); against transformers' reference the greedy tokens are
/// identical and the loss within 1e-5, and logits and gradients are held to
/// the gap measured above (0.23 and 3-7%), so that a regression still shows.
/// The exact dequantization (partial blocks, bit for bit) is tested in
/// `tests/model.rs`.
#[test]
fn deepseek_v3_fp8_tiny_matches_transformers() {
    let name = "deepseek-v3-fp8-tiny";
    let model = Model::load(&dir(name)).unwrap();
    let r = reference(name);
    let input = &r["input_ids"];
    let (b, t) = (input.shape[0], input.shape[1]);
    let tokens = ids(input);
    let acts = model.forward(&tokens, b, t).unwrap();
    let logits = model.logits_of(&acts.hidden).unwrap();
    let numpy = read_file(&dir(name).join("dequantized_logits.safetensors")).unwrap();
    let d = max_abs_diff(&logits, &f32s(&numpy[0]));
    eprintln!("{name}: logits max |diff| from float64 numpy on the dequantized weights = {d:.3e}");
    assert!(d <= 1e-4, "{name}: logits differ from the dequantized model's by {d:e}");
    let d = max_abs_diff(&logits, &f32s(&r["logits"]));
    eprintln!("{name}: logits max |diff| from the transformers reference = {d:.3e}");
    assert!(d <= 0.3, "{name}: logits differ from transformers by {d:e}");
    let mut grads = vec![0f32; model.params.len()];
    let loss = model.next_token_loss(&tokens, b, t, &mut grads).unwrap();
    let want_loss = f32s(&r["loss"])[0];
    let rel = ((loss - want_loss) / want_loss).abs();
    eprintln!("{name}: loss {loss} vs {want_loss} (rel {rel:.2e})");
    assert!(rel <= 1e-5, "{name}: loss {loss} vs transformers {want_loss}");
    let want_grads = expected_grads(&r);
    let mut worst = 0f64;
    for e in model.layout.entries.iter().filter(|e| e.trainable) {
        let want = &want_grads[&e.name];
        let got = e.slot.of(&grads);
        let num: f64 = got
            .iter()
            .zip(want)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let den: f64 = want.iter().map(|&b| (b as f64).powi(2)).sum::<f64>().sqrt();
        worst = worst.max(num / den);
    }
    eprintln!("{name}: worst gradient relative error {worst:.3e}");
    assert!(worst <= 0.1, "{name}: a gradient is off by {worst:e}");
    let prompt = ids(&r["greedy_prompt"]);
    let want = ids(&r["greedy_output"]);
    assert_eq!(model.greedy(&prompt, want.len(), true).unwrap(), want);
    assert_eq!(model.greedy(&prompt, want.len(), false).unwrap(), want);
}
