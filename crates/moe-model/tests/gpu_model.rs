//! The dense GPU model (`aha_moe_model::gpu::GpuModel`) against the CPU
//! model: logits, token log-probs (to 1e-4) and every parameter's gradient
//! (to 1e-3 of the tensor's largest) of the qwen2-tiny fixture (written by
//! transformers; q/k/v biases, tied embeddings) and of a random Qwen3-style
//! dense model with q/k norms; and greedy decoding with the KV cache on the
//! device gives the CPU's tokens. Without a GPU it prints "skipped: no GPU".

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use aha_moe_model::gpu::GpuModel;
use aha_moe_model::{Model, ModelConfig};

fn compare(name: &str, model: &Model) {
    let gpu = GpuModel::upload(model, 0).unwrap();
    let (b, t) = (2, 11);
    let v = model.config.vocab_size;
    let ids: Vec<u32> = (0..b * t)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761) % v as u32)
        .collect();
    let targets: Vec<u32> = ids.iter().map(|&x| (x + 1) % v as u32).collect();
    let acts = model.forward(&ids, b, t).unwrap();
    // Token log-probs and log-sum-exps, CPU vs GPU.
    let (lp, lse) = model.token_logprobs(&acts, &targets).unwrap();
    let (glp, glse) = gpu.token_logprobs(&ids, b, t, &targets).unwrap();
    for i in 0..b * t {
        assert!(
            (lp[i] - glp[i]).abs() < 1e-4,
            "{name}: logp[{i}] {} vs gpu {}",
            lp[i],
            glp[i]
        );
        assert!(
            (lse[i] - glse[i]).abs() < 1e-4,
            "{name}: lse[{i}] {} vs gpu {}",
            lse[i],
            glse[i]
        );
    }
    // The GPU's full logits, through a log-softmax on the host, give the
    // CPU's log-probs of the same targets.
    let logits = gpu.logits(&ids, b, t).unwrap();
    assert_eq!(logits.len(), b * t * v);
    for i in 0..b * t {
        let row = &logits[i * v..(i + 1) * v];
        let m = row.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
        let l = m + row.iter().map(|&x| (x - m).exp()).sum::<f32>().ln();
        let got = row[targets[i] as usize] - l;
        assert!(
            (lp[i] - got).abs() < 1e-4,
            "{name}: logits row {i}: {got} vs cpu {}",
            lp[i]
        );
    }
    // Gradients of sum_i dlogp[i] log p(targets[i]), per tensor.
    let dlogp: Vec<f32> = (0..b * t).map(|i| ((i * 7919) % 13) as f32 / 13.0 - 0.5).collect();
    let mut want = vec![0f32; model.params.len()];
    model.backward(&acts, &targets, &lse, &dlogp, &mut want).unwrap();
    let got = gpu.backward(&ids, b, t, &targets, &dlogp).unwrap();
    for e in &model.layout.entries {
        let (g, w) = (e.slot.of(&got), e.slot.of(&want));
        let scale = w.iter().fold(0f32, |a, &x| a.max(x.abs()));
        let diff = g.iter().zip(w).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        // f32 on both sides with different summation orders.
        assert!(
            diff <= 1e-5 + 1e-3 * scale,
            "{name}: {} gradient max |diff| {diff} (scale {scale})",
            e.name
        );
    }
    // Greedy decoding with the KV cache on the device equals the CPU's.
    let prompt: Vec<u32> = ids[..5].to_vec();
    let want = model.greedy(&prompt, 12, true).unwrap();
    assert_eq!(
        gpu.greedy(&prompt, 12).unwrap(),
        want,
        "{name}: greedy with the GPU cache"
    );
    eprintln!("{name}: GPU forward, backward and cached greedy decoding match the CPU");
}

#[test]
fn gpu_forward_matches_the_cpu_cuda() {
    if let Some(reason) = aha_cuda_kernels::no_gpu_reason() {
        eprintln!("gpu_forward_matches_the_cpu_cuda: skipped: no GPU ({reason})");
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/qwen2-tiny");
    compare("qwen2-tiny", &Model::load(&dir).unwrap());
    let qwen3 = ModelConfig::from_json_str(
        r#"{"model_type": "qwen3", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
            "max_position_embeddings": 64, "tie_word_embeddings": true}"#,
        Path::new("qwen3.json"),
    )
    .unwrap();
    compare("qwen3-dense-random", &Model::random(qwen3, 5, 0.05));
}

#[test]
fn models_the_gpu_path_does_not_take_are_refused_by_name() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/deepseek-v3-tiny");
    let m = Model::load(&dir).unwrap();
    let err = aha_moe_model::gpu::gpu_support(&m.config).unwrap_err().to_string();
    assert!(err.contains("latent attention"), "{err}");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/qwen3-moe-tiny");
    assert!(aha_moe_model::gpu::gpu_support(&Model::load(&dir).unwrap().config).is_ok());
}

/// Qwen3-MoE forward on the GPU (the MoE layer of aha_cuda_kernels: device
/// routing in f32, bf16 expert products with f32 accumulation) against the
/// f32 CPU model: the router sees the same f32 inputs, so the same experts
/// are chosen; the experts' bf16 rounding (2^-8 relative per product) moves
/// the log-probs by a few hundredths of a nat. Also the cached greedy
/// decoding and the refusal of the backward (forward only for MoE).
#[test]
fn gpu_moe_forward_stays_near_the_cpu_cuda() {
    if let Some(reason) = aha_cuda_kernels::no_gpu_reason() {
        eprintln!("gpu_moe_forward_stays_near_the_cpu_cuda: skipped: no GPU ({reason})");
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/qwen3-moe-tiny");
    let model = Model::load(&dir).unwrap();
    let gpu = GpuModel::upload(&model, 0).unwrap();
    let (b, t) = (2, 11);
    let v = model.config.vocab_size as u32;
    let ids: Vec<u32> = (0..b * t).map(|i| (i as u32).wrapping_mul(2_654_435_761) % v).collect();
    let targets: Vec<u32> = ids.iter().map(|&x| (x + 1) % v).collect();
    let acts = model.forward(&ids, b, t).unwrap();
    let (lp, _) = model.token_logprobs(&acts, &targets).unwrap();
    let (glp, _) = gpu.token_logprobs(&ids, b, t, &targets).unwrap();
    let worst = lp.iter().zip(&glp).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
    eprintln!("qwen3-moe-tiny on the GPU: worst |logp - CPU logp| = {worst}");
    assert!(worst < 0.1, "MoE log-probs moved by {worst} nats");
    let logits = gpu.logits(&ids, b, t).unwrap();
    assert_eq!(logits.len(), b * t * v as usize);
    let mut cache = gpu.new_cache().unwrap();
    let step = gpu.forward_cached(&ids[..5], &mut cache).unwrap();
    assert_eq!(step.len(), v as usize);
    assert!(gpu.greedy(&ids[..5], 6).unwrap().len() >= 5);
    let err = gpu.backward(&ids, b, t, &targets, &lp).unwrap_err().to_string();
    assert!(err.contains("forward only"), "{err}");
}

/// bf16 products (weights and linear-layer inputs rounded to bf16, f32
/// accumulation, f32 everywhere else) against the f32 CPU reference. Each
/// rounding is at most 2^-8 relative; a linear layer's output then moves by
/// about 2^-8 * sqrt(k) * |x| |w| (random signs), and through 2 layers x 7
/// products and the head the fixture's log-probs (|logp| ~ 5-7 for these
/// vocabularies) move by well under 0.1 nats. Measured tolerances will
/// replace this bound once it runs on a GPU.
#[test]
fn gpu_bf16_forward_stays_near_the_f32_reference_cuda() {
    use aha_moe_model::gpu::GpuPrecision;
    if let Some(reason) = aha_cuda_kernels::no_gpu_reason() {
        eprintln!("gpu_bf16_forward_stays_near_the_f32_reference_cuda: skipped: no GPU ({reason})");
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/qwen2-tiny");
    let model = Model::load(&dir).unwrap();
    let gpu = GpuModel::upload_with(&model, 0, GpuPrecision::Bf16).unwrap();
    let (b, t) = (2, 11);
    let v = model.config.vocab_size as u32;
    let ids: Vec<u32> = (0..b * t).map(|i| (i as u32).wrapping_mul(2_654_435_761) % v).collect();
    let targets: Vec<u32> = ids.iter().map(|&x| (x + 1) % v).collect();
    let acts = model.forward(&ids, b, t).unwrap();
    let (lp, _) = model.token_logprobs(&acts, &targets).unwrap();
    let (glp, _) = gpu.token_logprobs(&ids, b, t, &targets).unwrap();
    let worst = lp.iter().zip(&glp).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
    eprintln!("qwen2-tiny bf16: worst |logp - f32 logp| = {worst}");
    assert!(worst < 0.1, "bf16 log-probs moved by {worst} nats");
    assert!(
        gpu.backward(&ids, b, t, &targets, &lp).is_err(),
        "the backward is f32 only"
    );
}
