//! The dense GPU forward (`aha_moe_model::gpu::GpuModel`) against the CPU
//! forward: logits and token log-probs of the qwen2-tiny fixture (written by
//! transformers) and of a random Qwen3-style dense model with q/k norms, in
//! f32 to 1e-4 as on the CPU. Without a GPU it prints "skipped: no GPU".

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
    eprintln!("{name}: GPU forward matches the CPU");
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
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/qwen3-moe-tiny");
    let m = Model::load(&dir).unwrap();
    let err = aha_moe_model::gpu::gpu_support(&m.config).unwrap_err().to_string();
    assert!(err.contains("mixture-of-experts"), "{err}");
}
