//! The GPU model against the CPU model, architecture by architecture,
//! through the one policy surface (`aha_moe_model::Policy`): tempered
//! log-probs and entropies of chosen rows, every parameter's gradient from
//! d loss / d log-prob and d loss / d entropy, the weights after one
//! clipped AdamW step, and greedy decoding with the KV cache on the device.
//! Fixtures: qwen2-tiny (transformers; q/k/v biases, tied embeddings), a
//! random Qwen3-style dense model (q/k norms), llama-tiny (llama3 RoPE
//! scaling), qwen3-moe-tiny (softmax routing), deepseek-v3-tiny (MLA,
//! sigmoid group-limited routing, shared expert) and deepseek-v3-yarn-tiny
//! (YaRN RoPE and its softmax scale). Without a GPU each test prints "skipped: no GPU"; CI runs
//! them on the emulated GPU.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use aha_moe_model::gpu::GpuModel;
use aha_moe_model::{Model, ModelConfig, Policy, Precision};
use aha_tensor::cpu::AdamW;
use aha_tensor::{Device, Tensor};

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

/// Largest |a - b| over the largest |b| of each tensor, worst over tensors.
fn worst_relative(model: &Model, got: &[f32], want: &[f32]) -> (f32, String) {
    let mut worst = (0f32, String::new());
    for e in &model.layout.entries {
        let (g, w) = (e.slot.of(got), e.slot.of(want));
        let scale = w.iter().fold(0f32, |a, &x| a.max(x.abs())).max(1e-6);
        let diff = g.iter().zip(w).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        if diff / scale > worst.0 {
            worst = (diff / scale, e.name.clone());
        }
    }
    worst
}

/// How far the GPU may be from the CPU, relative to each tensor's largest
/// value (f32 on both sides: only summation orders differ).
struct Bounds {
    logp: f32,
    grad: f32,
    weights: f32,
}

fn compare(name: &str, model: &Model, b: Bounds, aux: f32) {
    let cpu_model = model.clone();
    let mut cpu = Policy::new(cpu_model, Device::Cpu, Precision::F32).unwrap();
    let mut gpu = Policy::new(model.clone(), Device::Cuda(0), Precision::F32).unwrap();
    let (bs, t) = (2, 11);
    let v = model.config.vocab_size as u32;
    let ids: Vec<u32> = (0..bs * t)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761) % v)
        .collect();
    // Every position but the last of each row, its next token as target.
    let (mut rows, mut targets) = (Vec::new(), Vec::new());
    for r in 0..bs {
        for i in 0..t - 1 {
            rows.push((r * t + i) as u32);
            targets.push(ids[r * t + i + 1]);
        }
    }
    let n = rows.len();
    let temperature = 0.7;
    let (fc, fg) = (cpu.forward(&ids, bs, t).unwrap(), gpu.forward(&ids, bs, t).unwrap());
    let (sc, sg) = (
        cpu.score(&fc, &rows, &targets, temperature).unwrap(),
        gpu.score(&fg, &rows, &targets, temperature).unwrap(),
    );
    for (what, c, g) in [("logp", &sc.logp, &sg.logp), ("entropy", &sc.entropy, &sg.entropy)] {
        let (c, g) = (c.to_vec::<f32>().unwrap(), g.to_vec::<f32>().unwrap());
        let worst = c.iter().zip(&g).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        eprintln!("{name}: {what} at T = {temperature}: worst |GPU - CPU| = {worst:.3e}");
        assert!(worst <= b.logp, "{name}: {what} differs by {worst}");
    }
    // Gradients of sum_i dlogp[i] logp[i] + dent[i] entropy[i].
    let dl: Vec<f32> = (0..n).map(|i| ((i * 7919) % 13) as f32 / 13.0 - 0.5).collect();
    let de: Vec<f32> = (0..n).map(|i| ((i * 104_729) % 7) as f32 / 70.0 - 0.05).collect();
    let tensors = |d: Device| {
        (
            Tensor::from_vec(dl.clone(), n, d).unwrap(),
            Tensor::from_vec(de.clone(), n, d).unwrap(),
        )
    };
    let (dlc, dec) = tensors(Device::Cpu);
    let (dlg, deg) = tensors(Device::Cuda(0));
    cpu.zero_grad().unwrap();
    gpu.zero_grad().unwrap();
    cpu.backward(fc, &sc, &dlc, Some(&dec), aux).unwrap();
    gpu.backward(fg, &sg, &dlg, Some(&deg), aux).unwrap();
    let (gc, gg) = (cpu.grads_to_host().unwrap(), gpu.grads_to_host().unwrap());
    let (worst, at) = worst_relative(model, &gg, &gc);
    eprintln!("{name}: gradients: worst |GPU - CPU| / max |CPU| = {worst:.3e} ({at})");
    assert!(
        worst <= b.grad,
        "{name}: gradient of {at} differs by {worst} of its scale"
    );
    // One clipped AdamW step from the same gradients on each side.
    let h = AdamW {
        lr: 1e-3,
        ..AdamW::default()
    };
    gpu.set_grads(&gc).unwrap();
    let (mut mc, mut mg) = (cpu.new_moments().unwrap(), gpu.new_moments().unwrap());
    let nc = cpu.optimizer_step(&mut mc, &h, 1, 1.0).unwrap();
    let ng = gpu.optimizer_step(&mut mg, &h, 1, 1.0).unwrap();
    assert!(
        (nc - ng).abs() <= 1e-6 * nc.max(1.0),
        "{name}: gradient norm {nc} vs {ng}"
    );
    let (pc, pg) = (cpu.params_to_host().unwrap(), gpu.params_to_host().unwrap());
    let (worst, at) = worst_relative(model, &pg, &pc);
    eprintln!("{name}: weights after AdamW: worst relative difference {worst:.3e} ({at})");
    assert!(
        worst <= b.weights,
        "{name}: weights of {at} differ by {worst} after AdamW"
    );
    // Frozen tensors stay where they were.
    for e in model.layout.entries.iter().filter(|e| !e.trainable) {
        assert_eq!(e.slot.of(&pg), e.slot.of(&model.params), "{name}: {} moved", e.name);
    }
    // Greedy decoding with the KV cache on the device equals the CPU's.
    let g = GpuModel::upload(model, 0).unwrap();
    let prompt: Vec<u32> = ids[..5].to_vec();
    assert_eq!(
        g.greedy(&prompt, 8).unwrap(),
        model.greedy(&prompt, 8, true).unwrap(),
        "{name}: greedy with the GPU cache"
    );
}

const F32: Bounds = Bounds {
    logp: 1e-4,
    grad: 1e-4,
    weights: 1e-5,
};

#[test]
fn dense_models_train_on_the_gpu_as_on_the_cpu_cuda() {
    if skip("dense_models_train_on_the_gpu_as_on_the_cpu_cuda") {
        return;
    }
    compare("qwen2-tiny", &fixture("qwen2-tiny"), F32, 0.0);
    let qwen3 = ModelConfig::from_json_str(
        r#"{"model_type": "qwen3", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
            "max_position_embeddings": 64, "tie_word_embeddings": true}"#,
        Path::new("qwen3.json"),
    )
    .unwrap();
    compare("qwen3-dense-random", &Model::random(qwen3, 5, 0.05), F32, 0.0);
}

/// Llama with llama3 RoPE scaling: the GPU reads the same scaled tables.
#[test]
fn llama_with_scaled_rope_trains_on_the_gpu_cuda() {
    if skip("llama_with_scaled_rope_trains_on_the_gpu_cuda") {
        return;
    }
    compare("llama-tiny", &fixture("llama-tiny"), F32, 0.0);
}

#[test]
fn qwen3_moe_trains_on_the_gpu_cuda() {
    if skip("qwen3_moe_trains_on_the_gpu_cuda") {
        return;
    }
    compare("qwen3-moe-tiny", &fixture("qwen3-moe-tiny"), F32, 0.0);
    // With the Switch load-balancing loss's gradient (router_aux_loss_coef).
    compare("qwen3-moe-tiny + aux loss", &fixture("qwen3-moe-tiny"), F32, 0.01);
}

#[test]
fn deepseek_v3_trains_on_the_gpu_cuda() {
    if skip("deepseek_v3_trains_on_the_gpu_cuda") {
        return;
    }
    compare("deepseek-v3-tiny", &fixture("deepseek-v3-tiny"), F32, 0.0);
    // YaRN: scaled frequencies, cos/sin attention factor and the mscale^2 softmax scale.
    compare("deepseek-v3-yarn-tiny", &fixture("deepseek-v3-yarn-tiny"), F32, 0.0);
}

/// An MLA model without MoE layers: multi-head latent attention alone, in
/// f32 on both sides, so the f32 bounds hold (q_lora_rank both ways).
#[test]
fn mla_attention_matches_the_cpu_in_f32_cuda() {
    if skip("mla_attention_matches_the_cpu_in_f32_cuda") {
        return;
    }
    for q_lora in ["null", "12"] {
        let cfg = ModelConfig::from_json_str(
            &format!(
                r#"{{"model_type": "deepseek_v3", "vocab_size": 97, "hidden_size": 32, "intermediate_size": 48,
                "moe_intermediate_size": 16, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 2,
                "topk_group": 1, "first_k_dense_replace": 2, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 4, "q_lora_rank": {q_lora}, "kv_lora_rank": 8, "qk_nope_head_dim": 8,
                "qk_rope_head_dim": 4, "v_head_dim": 6, "max_position_embeddings": 32}}"#
            ),
            Path::new("mla.json"),
        )
        .unwrap();
        compare(
            &format!("mla-dense q_lora {q_lora}"),
            &Model::random(cfg, 3, 0.08),
            F32,
            0.0,
        );
    }
}

/// bf16 products (weights and every product's inputs rounded to bf16, f32
/// accumulation, flash attention) against the f32 CPU reference. Each
/// rounding is at most 2^-8 relative; through 2 layers x 7 products and the
/// head the fixture's log-probs (|logp| ~ 5-7 here) move by well under 0.1
/// nats, and gradients by a few percent of each tensor's scale.
#[test]
fn bf16_training_stays_near_the_f32_reference_cuda() {
    if skip("bf16_training_stays_near_the_f32_reference_cuda") {
        return;
    }
    bf16_against_f32("qwen2-tiny", &fixture("qwen2-tiny"), 0.1);
    // With the PEFT adapter (bf16 adapter products, f32 gradients). This
    // function is more sensitive to bf16 rounding than the base: the same
    // adapter merged into the weights, through no adapter code at all,
    // lands 10% of scale from the f32 gradients, so both get that bound.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/qwen2-tiny-lora");
    let adapted = fixture("qwen2-tiny").load_adapter(&dir).unwrap();
    bf16_against_f32("qwen2-tiny-lora merged", &adapted.merge_lora().unwrap(), 0.15);
    bf16_against_f32("qwen2-tiny + PEFT LoRA", &adapted, 0.15);
}

fn bf16_against_f32(name: &str, model: &Model, grad_bound: f32) {
    let cpu = Policy::new(model.clone(), Device::Cpu, Precision::F32).unwrap();
    let mut gpu = Policy::new(model.clone(), Device::Cuda(0), Precision::Bf16).unwrap();
    let (bs, t) = (2, 11);
    let v = model.config.vocab_size as u32;
    let ids: Vec<u32> = (0..bs * t)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761) % v)
        .collect();
    let rows: Vec<u32> = (0..(bs * t) as u32).collect();
    let targets: Vec<u32> = ids.iter().map(|&x| (x + 1) % v).collect();
    let lp = cpu.logprobs(&ids, bs, t, &rows, &targets, 1.0).unwrap();
    let fg = gpu.forward(&ids, bs, t).unwrap();
    let sg = gpu.score(&fg, &rows, &targets, 1.0).unwrap();
    let glp = sg.logp.to_vec::<f32>().unwrap();
    let worst = lp.iter().zip(&glp).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
    eprintln!("{name} bf16: worst |logp - f32 logp| = {worst:.4}");
    assert!(worst < 0.1, "bf16 log-probs moved by {worst} nats");
    // The bf16 backward against the CPU's f32 gradients.
    let n = rows.len();
    let dl: Vec<f32> = (0..n).map(|i| ((i * 7919) % 13) as f32 / 13.0 - 0.5).collect();
    let mut cpu = cpu;
    let fc = cpu.forward(&ids, bs, t).unwrap();
    let sc = cpu.score(&fc, &rows, &targets, 1.0).unwrap();
    cpu.zero_grad().unwrap();
    cpu.backward(
        fc,
        &sc,
        &Tensor::from_vec(dl.clone(), n, Device::Cpu).unwrap(),
        None,
        0.0,
    )
    .unwrap();
    gpu.zero_grad().unwrap();
    gpu.backward(fg, &sg, &Tensor::from_vec(dl, n, Device::Cuda(0)).unwrap(), None, 0.0)
        .unwrap();
    let (worst, at) = worst_relative(model, &gpu.grads_to_host().unwrap(), &cpu.grads_to_host().unwrap());
    eprintln!("{name} bf16: gradients: worst relative difference {worst:.3e} ({at})");
    assert!(
        worst < grad_bound,
        "{name}: bf16 gradient of {at} differs by {worst} of its scale"
    );
}

/// Per-layer recomputation gives the gradients of the full forward: the
/// layers run again from their inputs in the backward, with the same
/// routing (the routers are deterministic), on an MoE model with the aux
/// loss and on MLA + sigmoid routing.
#[test]
fn recomputation_gives_the_same_gradients_cuda() {
    if skip("recomputation_gives_the_same_gradients_cuda") {
        return;
    }
    for (name, aux) in [("qwen3-moe-tiny", 0.01), ("deepseek-v3-tiny", 0.0)] {
        let model = fixture(name);
        let (bs, t) = (2, 9);
        let v = model.config.vocab_size as u32;
        let ids: Vec<u32> = (0..bs * t)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761) % v)
            .collect();
        let rows: Vec<u32> = (0..(bs * t) as u32).collect();
        let targets: Vec<u32> = ids.iter().map(|&x| (x + 3) % v).collect();
        let n = rows.len();
        let dl: Vec<f32> = (0..n).map(|i| ((i * 31) % 11) as f32 / 11.0 - 0.5).collect();
        let grads = |recompute: bool| {
            let mut p = Policy::new(model.clone(), Device::Cuda(0), Precision::F32).unwrap();
            p.set_recompute(recompute);
            let f = p.forward(&ids, bs, t).unwrap();
            let s = p.score(&f, &rows, &targets, 1.0).unwrap();
            p.zero_grad().unwrap();
            let d = Tensor::from_vec(dl.clone(), n, Device::Cuda(0)).unwrap();
            p.backward(f, &s, &d, None, aux).unwrap();
            p.grads_to_host().unwrap()
        };
        let (full, again) = (grads(false), grads(true));
        let (worst, at) = worst_relative(&model, &again, &full);
        eprintln!("{name}: recomputed gradients: worst relative difference {worst:.1e} ({at})");
        assert!(
            worst <= 1e-6,
            "{name}: recomputation changed the gradient of {at} by {worst}"
        );
    }
}

/// DeepSeek-V3's auxiliary-loss-free balancing on the device: after a
/// forward, each MoE layer's `e_score_correction_bias` moves by `speed`
/// against its experts' load exactly as on the CPU (signs of load minus
/// mean; the same counts), in f32 and in bf16 (the bf16 copy follows), and
/// no other weight moves.
#[test]
fn expert_bias_updates_on_the_gpu_as_on_the_cpu_cuda() {
    if skip("expert_bias_updates_on_the_gpu_as_on_the_cpu_cuda") {
        return;
    }
    let model = fixture("deepseek-v3-tiny");
    let (bs, t) = (2, 11);
    let v = model.config.vocab_size as u32;
    let ids: Vec<u32> = (0..bs * t)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761) % v)
        .collect();
    let after = |device: Device, precision: Precision| {
        let mut p = Policy::new(model.clone(), device, precision).unwrap();
        for _ in 0..2 {
            let f = p.forward(&ids, bs, t).unwrap();
            p.update_expert_bias(&f, 0.001).unwrap();
        }
        p.host_model().unwrap().into_owned()
    };
    let cpu = after(Device::Cpu, Precision::F32);
    let biases: Vec<_> = model
        .layout
        .entries
        .iter()
        .filter(|e| e.name.ends_with("e_score_correction_bias"))
        .collect();
    assert!(!biases.is_empty(), "deepseek-v3-tiny has correction biases");
    let moved = biases
        .iter()
        .any(|e| e.slot.of(&cpu.params) != e.slot.of(&model.params));
    assert!(moved, "two updates move some bias");
    for precision in [Precision::F32, Precision::Bf16] {
        let gpu = after(Device::Cuda(0), precision);
        for e in &model.layout.entries {
            let (g, c) = (e.slot.of(&gpu.params), e.slot.of(&cpu.params));
            if e.name.ends_with("e_score_correction_bias") {
                // bf16 products may route a near-tie differently; the
                // update is +-speed per expert, so compare within one step.
                let worst = g.iter().zip(c).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
                let bound = if precision == Precision::F32 { 1e-7 } else { 0.0021 };
                assert!(worst <= bound, "{precision}: {} differs by {worst}", e.name);
            } else {
                assert_eq!(g, e.slot.of(&model.params), "{precision}: {} must not move", e.name);
            }
        }
    }
}

/// Every adapter tensor set to small deterministic values (B non-zero, so
/// the adapters change the output and every gradient path is exercised).
fn with_trained_lora(model: Model, targets: &[&str]) -> Model {
    let cfg = aha_moe_model::LoraConfig {
        r: 4,
        alpha: 16.0,
        target_modules: targets.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let mut m = model.with_lora(&cfg, 3).unwrap();
    let entries: Vec<_> = m.layout.entries.iter().filter(|e| e.trainable).cloned().collect();
    for (i, e) in entries.iter().enumerate() {
        for (j, v) in e.slot.of_mut(&mut m.params).iter_mut().enumerate() {
            *v = (((i * 131 + j * 17) % 23) as f32 - 11.0) * 0.004;
        }
    }
    m
}

/// LoRA adapters on the GPU: the PEFT fixture's logits and log-probs
/// (transformers + PEFT), and a training step (gradients of the adapters
/// only, AdamW over them, base weights unmoved, greedy decoding through the
/// adapters) equal to the CPU's, on a dense model and on MLA + MoE.
#[test]
fn lora_adapters_train_on_the_gpu_as_on_the_cpu_cuda() {
    if skip("lora_adapters_train_on_the_gpu_as_on_the_cpu_cuda") {
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/qwen2-tiny-lora");
    let adapted = fixture("qwen2-tiny").load_adapter(&dir).unwrap();
    let reference: std::collections::HashMap<String, Vec<f32>> =
        aha_moe_model::st::read_file(&dir.join("reference.safetensors"))
            .unwrap()
            .into_iter()
            .map(|t| {
                let v = match t.data {
                    aha_tensor::CpuStorage::F32(v) => v,
                    aha_tensor::CpuStorage::I64(v) => v.into_iter().map(|x| x as f32).collect(),
                    other => panic!("{}: {:?}", t.name, other.dtype()),
                };
                (t.name, v)
            })
            .collect();
    let ids: Vec<u32> = reference["input_ids"].iter().map(|&x| x as u32).collect();
    let (b, t) = (2, ids.len() / 2);
    let g = GpuModel::upload(&adapted, 0).unwrap();
    let logits = g.logits(&ids, b, t).unwrap();
    let d = logits
        .iter()
        .zip(&reference["logits"])
        .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
    eprintln!("qwen2-tiny-lora on the GPU: logits max |diff| vs PEFT = {d:.3e}");
    assert!(d <= 1e-4, "GPU logits differ from PEFT by {d}");
    let mut targets = vec![0u32; b * t];
    for r in 0..b {
        for i in 0..t - 1 {
            targets[r * t + i] = ids[r * t + i + 1];
        }
    }
    let (logp, _) = g.token_logprobs(&ids, b, t, &targets).unwrap();
    let ours: Vec<f32> = (0..b).flat_map(|r| logp[r * t..r * t + t - 1].to_vec()).collect();
    let d = ours
        .iter()
        .zip(&reference["token_logprobs"])
        .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
    eprintln!("qwen2-tiny-lora on the GPU: log-probs max |diff| vs PEFT = {d:.3e}");
    assert!(d <= 1e-4, "GPU log-probs differ from PEFT by {d}");
    drop(g);

    compare("qwen2-tiny + PEFT LoRA", &adapted, F32, 0.0);
    let ds = with_trained_lora(
        fixture("deepseek-v3-tiny"),
        &[
            "q_proj",
            "q_b_proj",
            "kv_a_proj_with_mqa",
            "kv_b_proj",
            "o_proj",
            "mlp.gate_proj",
        ],
    );
    compare("deepseek-v3-tiny + LoRA", &ds, F32, 0.0);
}

/// LoRA adapters on an MoE layer's shared experts (gate, up and down
/// projections): the GPU runs them beside the fused expert kernels and
/// gives the CPU's log-probs, adapter gradients, AdamW step and greedy
/// decoding, on a Qwen2-MoE-like model (softmax top-k routing with the
/// aux loss, plus shared experts) and on DeepSeek-V3 (sigmoid
/// group-limited routing, MLA), with and without per-layer recomputation,
/// and in bf16 near the f32 CPU.
#[test]
fn lora_on_shared_experts_trains_on_the_gpu_as_on_the_cpu_cuda() {
    if skip("lora_on_shared_experts_trains_on_the_gpu_as_on_the_cpu_cuda") {
        return;
    }
    let shared = [
        "shared_experts.gate_proj",
        "shared_experts.up_proj",
        "shared_experts.down_proj",
    ];
    // qwen3-moe-tiny's softmax routing with two shared experts.
    let mut cfg = fixture("qwen3-moe-tiny").config;
    cfg.moe.as_mut().unwrap().n_shared = 2;
    let qwen2_moe = with_trained_lora(Model::random(cfg, 11, 0.05), &[&shared[..], &["o_proj"]].concat());
    assert!(
        qwen2_moe
            .layout
            .entries
            .iter()
            .any(|e| e.name.contains("shared_experts.down_proj.lora_B")),
        "the shared experts carry adapters"
    );
    compare("qwen2-moe-like + shared-expert LoRA", &qwen2_moe, F32, 0.01);
    let ds = with_trained_lora(fixture("deepseek-v3-tiny"), &shared);
    compare("deepseek-v3-tiny + shared-expert LoRA", &ds, F32, 0.0);
    // bf16 products (the adapters read from the bf16 copy) near the f32
    // CPU (0.004 nats and 1.3% of scale on the emulated GPU).
    bf16_against_f32("qwen2-moe-like + shared-expert LoRA", &qwen2_moe, 0.1);
    // Recomputation runs the adapted shared experts again in the backward.
    for (name, model) in [("qwen2-moe-like", &qwen2_moe), ("deepseek-v3-tiny", &ds)] {
        let mut plain = Policy::new(model.clone(), Device::Cuda(0), Precision::F32).unwrap();
        let mut again = Policy::new(model.clone(), Device::Cuda(0), Precision::F32).unwrap();
        again.set_recompute(true);
        let v = model.config.vocab_size as u32;
        let ids: Vec<u32> = (0..12u32).map(|i| (i * 37 + 5) % v).collect();
        train_step(&mut plain, &ids, 2, 6);
        train_step(&mut again, &ids, 2, 6);
        let (gp, ga) = (plain.grads_to_host().unwrap(), again.grads_to_host().unwrap());
        let (worst, at) = worst_relative(model, &ga, &gp);
        eprintln!("{name}: shared-expert LoRA with recomputation: worst {worst:.3e} ({at})");
        assert!(worst <= 1e-6, "{name}: recomputed gradient of {at} differs by {worst}");
        assert!(gp.iter().any(|&g| g != 0.0), "{name}: no gradient");
    }
}

/// Under a LoRA layout the MoE layers' router and experts are frozen and
/// their backward gives the input gradient alone: the backward allocates
/// no stacked expert gradient buffers (a full-model backward allocates one
/// MoE layer's, the workspace `memory_plan` counts), the memory plan's LoRA
/// workspace drops them, and the adapters' gradients still equal the CPU's
/// (softmax routing with the aux loss through the frozen router).
#[test]
fn lora_moe_backward_allocates_no_expert_gradient_buffers_cuda() {
    if skip("lora_moe_backward_allocates_no_expert_gradient_buffers_cuda") {
        return;
    }
    use aha_moe_model::memory::{memory_plan, moe_grad_bytes, Workload};
    let targets = ["q_proj", "o_proj", "shared_experts.down_proj", "mlp.up_proj"];
    for name in ["qwen3-moe-tiny", "deepseek-v3-tiny"] {
        let base = fixture(name);
        let m = base.config.moe.clone().unwrap();
        let (c, e, f, fs) = (
            base.config.hidden_size,
            m.n_experts,
            m.expert_dim,
            m.expert_dim * m.n_shared,
        );
        // The router [E, C], gate, up, down of every expert and of the
        // shared experts, in f32.
        let stacked = 4 * (e * c + 3 * e * f * c + 3 * fs * c) as u64;
        assert_eq!(moe_grad_bytes(&base.layout), stacked, "{name}");
        let lora = with_trained_lora(base.clone(), &targets);
        let (ids, b, t) = ((0..12u32).map(|i| (i * 37 + 5) % 300).collect::<Vec<_>>(), 2, 6);
        let mut workspace = Vec::new();
        for model in [&base, &lora] {
            let mut p = Policy::new(model.clone(), Device::Cuda(0), Precision::F32).unwrap();
            train_step(&mut p, &ids, b, t);
            let aha_moe_model::PolicyModel::Gpu(g) = p.model() else {
                panic!("{name}: not on the GPU")
            };
            workspace.push(g.moe_grad_workspace());
        }
        eprintln!(
            "{name}: MoE gradient workspace of a backward: full {} bytes, LoRA {} bytes",
            workspace[0], workspace[1]
        );
        assert_eq!(workspace, [stacked, 0], "{name}: full, LoRA");
        let w = Workload {
            tokens: b * t,
            scored: b * t,
            kv_tokens: 0,
            training: true,
            recompute: false,
        };
        let full = memory_plan(&base.config, Precision::F32, &w);
        let adapted = memory_plan(&base.config, Precision::F32, &w).with_lora(&lora.layout, Precision::F32);
        assert_eq!(full.workspace - adapted.workspace, stacked, "{name}: planned workspace");
        compare(&format!("{name} + LoRA (frozen MoE backward)"), &lora, F32, 0.01);
    }
}

/// One scored forward, backward and clipped AdamW step; returns the moments.
fn train_step(p: &mut Policy, ids: &[u32], b: usize, t: usize) -> aha_moe_model::Moments {
    let v = p.config().vocab_size as u32;
    let rows: Vec<u32> = (0..(b * t) as u32).collect();
    let targets: Vec<u32> = ids.iter().map(|&x| (x + 1) % v).collect();
    let f = p.forward(ids, b, t).unwrap();
    let s = p.score(&f, &rows, &targets, 1.0).unwrap();
    let dl: Vec<f32> = (0..rows.len()).map(|i| ((i * 7919) % 13) as f32 / 13.0 - 0.5).collect();
    p.zero_grad().unwrap();
    let dl = Tensor::from_vec(dl, rows.len(), p.device()).unwrap();
    p.backward(f, &s, &dl, None, 0.0).unwrap();
    let mut m = p.new_moments().unwrap();
    let h = AdamW {
        lr: 1e-3,
        ..AdamW::default()
    };
    p.optimizer_step(&mut m, &h, 1, 1.0).unwrap();
    m
}

/// LoRA saves the memory it plans: after a training step the device
/// buffers of the weights, the bf16 copy, the gradients and the moments
/// (counted from their lengths) equal `MemoryPlan::with_lora` for the
/// layout, in f32 and bf16, and a full-parameter run's equal
/// `memory_plan`'s; the difference is the frozen base's gradients and
/// moments (12 bytes a base parameter) and, in bf16, its f32 master weights
/// but for the tensors read in f32. The gradients of frozen tensors are
/// zero (none is kept), and the base weights do not move.
#[test]
fn lora_holds_only_the_planned_device_memory_cuda() {
    if skip("lora_holds_only_the_planned_device_memory_cuda") {
        return;
    }
    use aha_moe_model::memory::{memory_plan, Workload};
    let base = fixture("qwen2-tiny");
    let lora = with_trained_lora(base.clone(), &["q_proj", "v_proj", "o_proj", "mlp.down_proj"]);
    let (b, t) = (2, 9);
    let v = base.config.vocab_size as u32;
    let ids: Vec<u32> = (0..b * t).map(|i| (i as u32).wrapping_mul(2_654_435_761) % v).collect();
    let w = Workload {
        tokens: b * t,
        scored: b * t,
        kv_tokens: 0,
        training: true,
        recompute: false,
    };
    let (p, a) = (base.layout.size as u64, lora.layout.trainable as u64);
    // The frozen base's tensors read in f32: the embedding (tied head),
    // q/k/v biases and the norms.
    let r: u64 = aha_moe_model::gpu::f32_resident(&lora.layout)
        .iter()
        .map(|x| x.1 as u64)
        .sum();
    let c = base.config.hidden_size as u64;
    let kvw = (base.config.num_kv_heads * base.config.head_dim) as u64;
    let layers = base.config.num_layers as u64;
    assert_eq!(r, v as u64 * c + layers * (2 * c + c + 2 * kvw) + c);
    for precision in [Precision::F32, Precision::Bf16] {
        let mut full = Policy::new(base.clone(), Device::Cuda(0), precision).unwrap();
        let mf = train_step(&mut full, &ids, b, t);
        let got_full = full.param_bytes(&mf);
        let plan_full = memory_plan(&base.config, precision, &w);
        let mut ad = Policy::new(lora.clone(), Device::Cuda(0), precision).unwrap();
        let ml = train_step(&mut ad, &ids, b, t);
        let got = ad.param_bytes(&ml);
        let plan = memory_plan(&lora.config, precision, &w).with_lora(&lora.layout, precision);
        eprintln!(
            "{precision}: full {got_full:?}, LoRA {got:?} ({a} of {} parameters trained)",
            p + a
        );
        let parts = |x: &aha_moe_model::memory::MemoryPlan| (x.weights, x.weights_bf16, x.grads, x.moments);
        let held = |x: &aha_moe_model::gpu::ParamBytes| (x.weights, x.weights_bf16, x.grads, x.moments);
        assert_eq!(
            held(&got_full),
            parts(&plan_full),
            "{precision}: full-parameter run vs its plan"
        );
        assert_eq!(held(&got), parts(&plan), "{precision}: LoRA run vs its plan");
        let sum = |x: &aha_moe_model::gpu::ParamBytes| x.weights + x.weights_bf16 + x.grads + x.moments;
        let saved = sum(&got_full) as i64 - sum(&got) as i64;
        let expected = match precision {
            // Full: 4 + 4 + 8 bytes a base parameter; LoRA: every f32
            // weight, and 4 + 8 more an adapter parameter.
            Precision::F32 => 16 * p as i64 - (4 * (p + a) + 12 * a) as i64,
            // Full: 4 + 2 + 4 + 8; LoRA: the bf16 copy of all, f32 of the
            // adapters and the f32-read base tensors, 4 + 8 an adapter.
            Precision::Bf16 => 18 * p as i64 - (2 * (p + a) + 4 * (a + r) + 12 * a) as i64,
        };
        eprintln!("{precision}: LoRA holds {saved} bytes fewer than the full-parameter run");
        assert_eq!(saved, expected, "{precision}");
        assert!(saved > 0);
        // No gradient past the adapters, and the base does not move.
        let g = ad.grads_to_host().unwrap();
        let tr = lora.layout.trainable;
        assert!(g[tr..].iter().all(|&x| x == 0.0));
        assert!(g[..tr].iter().any(|&x| x != 0.0));
        let after = ad.params_to_host().unwrap();
        let round = |x: f32| match precision {
            Precision::F32 => x,
            Precision::Bf16 => half::bf16::from_f32(x).to_f32(),
        };
        for e in lora.layout.entries.iter().filter(|e| !e.trainable) {
            let want: Vec<f32> = e.slot.of(&lora.params).iter().map(|&x| round(x)).collect();
            let kept_f32 = aha_moe_model::gpu::f32_resident(&lora.layout)
                .iter()
                .any(|&(off, len, _)| e.slot.off >= off && e.slot.off + e.slot.len <= off + len);
            let want = if kept_f32 {
                e.slot.of(&lora.params).to_vec()
            } else {
                want
            };
            assert_eq!(e.slot.of(&after), &want[..], "{precision}: {} moved", e.name);
        }
        assert_ne!(
            &after[..tr],
            &lora.params[..tr],
            "{precision}: the adapters did not move"
        );
        // Into offload and back: the same weights, and the same buffers
        // as before once back.
        ad.set_offload_optimizer(Some(aha_moe_model::OffloadConfig::default()))
            .unwrap();
        assert_eq!(ad.params_to_host().unwrap(), after, "{precision}: offloaded");
        ad.set_offload_optimizer(None).unwrap();
        assert_eq!(ad.params_to_host().unwrap(), after, "{precision}: back on the device");
        assert_eq!(
            held(&ad.param_bytes(&ml)),
            parts(&plan),
            "{precision}: back on the device"
        );
    }
}

/// LoRA dropout on the GPU draws the CPU's masks: with the same seed the
/// log-probs and the adapters' gradients agree within 1e-4 (f32), with and
/// without per-layer recomputation, and the backward uses its forward's
/// masks even after dropout is turned off (as the trainer does before
/// scoring anything else); off, the GPU computes as without dropout.
#[test]
fn lora_dropout_on_the_gpu_matches_the_cpu_cuda() {
    if skip("lora_dropout_on_the_gpu_matches_the_cpu_cuda") {
        return;
    }
    let base = fixture("qwen2-tiny");
    let cfg = aha_moe_model::LoraConfig {
        r: 4,
        alpha: 8.0,
        target_modules: ["q_proj", "v_proj", "o_proj", "down_proj"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        dropout: 0.25,
        ..Default::default()
    };
    let mut model = base.with_lora(&cfg, 5).unwrap();
    let tr = model.layout.trainable;
    for (i, v) in model.params[..tr].iter_mut().enumerate() {
        *v = ((i * 131 % 23) as f32 - 11.0) * 0.01;
    }
    let (b, t) = (2, 9);
    let v = model.config.vocab_size as u32;
    let ids: Vec<u32> = (0..b * t).map(|i| (i as u32).wrapping_mul(2_654_435_761) % v).collect();
    let rows: Vec<u32> = (0..(b * t) as u32).collect();
    let targets: Vec<u32> = ids.iter().map(|&x| (x + 1) % v).collect();
    let dl: Vec<f32> = (0..rows.len()).map(|i| ((i * 7919) % 13) as f32 / 13.0 - 0.5).collect();
    let run = |p: &mut Policy, seed: Option<u64>| {
        p.set_lora_dropout(seed);
        let f = p.forward(&ids, b, t).unwrap();
        p.set_lora_dropout(None);
        let s = p.score(&f, &rows, &targets, 1.0).unwrap();
        let lp = s.logp.to_vec::<f32>().unwrap();
        p.zero_grad().unwrap();
        let d = Tensor::from_vec(dl.clone(), rows.len(), p.device()).unwrap();
        p.backward(f, &s, &d, None, 0.0).unwrap();
        (lp, p.grads_to_host().unwrap())
    };
    let mut cpu = Policy::new(model.clone(), Device::Cpu, Precision::F32).unwrap();
    let mut gpu = Policy::new(model.clone(), Device::Cuda(0), Precision::F32).unwrap();
    let mut gpu_re = Policy::new(model.clone(), Device::Cuda(0), Precision::F32).unwrap();
    gpu_re.set_recompute(true);
    let (lc, gc) = run(&mut cpu, Some(21));
    let (plain, _) = run(&mut cpu, None);
    assert!(lc.iter().zip(&plain).any(|(a, b)| a != b), "dropout changed nothing");
    for (what, p) in [("GPU", &mut gpu), ("GPU, recomputed", &mut gpu_re)] {
        let (lg, gg) = run(p, Some(21));
        let worst = lc.iter().zip(&lg).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        eprintln!("LoRA dropout 0.25, {what}: worst |logp - CPU| = {worst:.3e}");
        assert!(worst <= 1e-4, "{what}: log-probs differ by {worst}");
        let (worst, at) = worst_relative(&model, &gg, &gc);
        eprintln!("LoRA dropout 0.25, {what}: gradients: worst |GPU - CPU| / max |CPU| = {worst:.3e} ({at})");
        assert!(worst <= 1e-4, "{what}: gradient of {at} differs by {worst}");
        let (lo, _) = run(p, None);
        let worst = plain.iter().zip(&lo).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        assert!(worst <= 1e-4, "{what}: without dropout, log-probs differ by {worst}");
    }
}

/// The gradient-ready hook (`Policy::backward_with_hook`) on the second of
/// two accumulated micro-batches: the parts come in the order of
/// `Policy::grad_ready_parts` (head, last layer to first, embedding), each
/// once, together covering the trainable prefix, and every value a part
/// holds when it is reported is its final value (the backward writes it no
/// more). Tied (qwen2-tiny) and untied heads, dense, MoE and MLA layers, a
/// frozen tensor (DeepSeek-V3's expert bias) and LoRA adapters.
#[test]
fn gradient_parts_are_final_when_reported_cuda() {
    if skip("gradient_parts_are_final_when_reported_cuda") {
        return;
    }
    let lora = with_trained_lora(fixture("qwen2-tiny"), &["q_proj", "v_proj", "down_proj"]);
    for (name, model) in [
        ("qwen2-tiny", fixture("qwen2-tiny")),
        ("qwen3-moe-tiny", fixture("qwen3-moe-tiny")),
        ("deepseek-v3-tiny", fixture("deepseek-v3-tiny")),
        ("qwen2-tiny + LoRA", lora),
    ] {
        let (bs, t) = (2, 7);
        let v = model.config.vocab_size as u32;
        let ids: Vec<u32> = (0..bs * t)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761) % v)
            .collect();
        let rows: Vec<u32> = (0..(bs * t) as u32).collect();
        let targets: Vec<u32> = ids.iter().map(|&x| (x + 5) % v).collect();
        let n = rows.len();
        let dl: Vec<f32> = (0..n).map(|i| ((i * 17) % 13) as f32 / 13.0 - 0.5).collect();
        let mut p = Policy::new(model.clone(), Device::Cuda(0), Precision::F32).unwrap();
        let parts = p.grad_ready_parts();
        p.zero_grad().unwrap();
        let d = Tensor::from_vec(dl.clone(), n, Device::Cuda(0)).unwrap();
        let f = p.forward(&ids, bs, t).unwrap();
        let s = p.score(&f, &rows, &targets, 1.0).unwrap();
        p.backward(f, &s, &d, None, 0.01).unwrap();
        let f = p.forward(&ids, bs, t).unwrap();
        let s = p.score(&f, &rows, &targets, 1.0).unwrap();
        let mut seen: Vec<(Vec<std::ops::Range<usize>>, Vec<f32>)> = Vec::new();
        let mut hook = |r: aha_moe_model::GradReady<'_>| -> Result<(), String> {
            r.gpu.synchronize().map_err(|e| e.to_string())?;
            let all = r.gpu.download(r.grads).map_err(|e| e.to_string())?;
            let vals = r.ranges.iter().flat_map(|x| all[x.clone()].to_vec()).collect();
            seen.push((r.ranges.to_vec(), vals));
            Ok(())
        };
        assert!(p.backward_with_hook(f, &s, &d, None, 0.01, &mut hook).unwrap());
        let fin = p.grads_to_host().unwrap();
        let want: Vec<_> = parts.iter().filter(|x| !x.is_empty()).cloned().collect();
        let got: Vec<_> = seen.iter().map(|(r, _)| r.clone()).collect();
        assert_eq!(got, want, "{name}: parts out of order");
        let mut cover: Vec<std::ops::Range<usize>> = want.iter().flatten().cloned().collect();
        cover.sort_by_key(|r| r.start);
        let mut at = 0;
        for r in &cover {
            assert_eq!(r.start, at, "{name}: a gap or an overlap at {at}");
            at = r.end;
        }
        assert_eq!(at, p.layout().trainable, "{name}");
        let mut nonzero = 0;
        for (ranges, vals) in &seen {
            let now: Vec<f32> = ranges.iter().flat_map(|x| fin[x.clone()].to_vec()).collect();
            assert!(now == *vals, "{name}: part {ranges:?} changed after it was reported");
            nonzero += vals.iter().filter(|x| **x != 0.0).count();
        }
        assert!(
            nonzero > at / 10,
            "{name}: only {nonzero} of {at} gradients are nonzero"
        );
        eprintln!("{name}: {} parts, each final when reported", seen.len());
    }
}
