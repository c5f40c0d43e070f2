//! Configs, checkpoints and the forward modes beyond the transformers
//! fixtures: parsing and refusing configs, save -> load round trips (single
//! and sharded), checkpoint errors that name the tensors, right-padded
//! batches, the load-balancing loss gradient and the bias update, the paged
//! forward against the full one.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use aha_moe_model::{Arch, Model, ModelConfig, Router, SeqSpan};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("aha-model-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn parse(json: &str) -> aha_moe_model::Result<ModelConfig> {
    ModelConfig::from_json_str(json, Path::new("config.json"))
}

const QWEN3: &str = r#"{"model_type": "qwen3", "hidden_size": 64, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "num_hidden_layers": 2, "vocab_size": 100,
    "intermediate_size": 96, "rope_theta": 1000000.0, "eos_token_id": [7, 9]"#;

#[test]
fn configs_parse_with_aliases_and_lists() {
    let c = parse(&format!("{QWEN3}}}")).unwrap();
    assert_eq!(c.arch, Arch::Qwen3);
    assert!(c.qk_norm && !c.qkv_bias);
    assert_eq!(c.eos_token_ids, vec![7, 9]);
    assert_eq!(c.rope_theta, 1e6);
    let moe = parse(
        r#"{"model_type": "qwen3_moe", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 4,
        "vocab_size": 100, "intermediate_size": 96, "num_local_experts": 8, "num_experts_per_tok": 2,
        "moe_intermediate_size": 32, "decoder_sparse_step": 2, "mlp_only_layers": [3],
        "rope_parameters": {"rope_theta": 5000.0, "rope_type": "default"}, "eos_token_id": 3}"#,
    )
    .unwrap();
    assert_eq!(moe.sparse_layers, vec![false, true, false, false]);
    assert_eq!(moe.moe.as_ref().unwrap().n_experts, 8);
    assert_eq!(moe.rope_theta, 5000.0);
    let ds = ModelConfig::from_path(&fixture("deepseek-v3-tiny")).unwrap();
    assert_eq!(ds.sparse_layers, vec![false, true, true]);
    assert!(matches!(
        ds.moe.unwrap().router,
        Router::SigmoidGroupLimited {
            n_group: 4,
            topk_group: 2,
            ..
        }
    ));
}

#[test]
fn rope_scaling_is_read_from_either_key() {
    use aha_moe_model::RopeScaling;
    let ds = ModelConfig::from_path(&fixture("deepseek-v3-yarn-tiny")).unwrap();
    let RopeScaling::Yarn {
        factor,
        attention_factor,
        original_max_position_embeddings,
        ..
    } = ds.rope_scaling
    else {
        panic!("{:?}", ds.rope_scaling)
    };
    assert_eq!(
        (factor, attention_factor, original_max_position_embeddings),
        (40.0, 1.0, 64.0)
    );
    // DeepSeek-V3 multiplies the softmax scale by (0.1 ln 40 + 1)^2.
    let m = 0.1 * 40f64.ln() + 1.0;
    assert!((ds.softmax_scale_mult - m * m).abs() < 1e-12);
    let (.., scale) = ds.attn_dims();
    assert!((scale - m * m / 48f64.sqrt()).abs() < 1e-12);
    // The older key and `type` spelling give the same rule; a Qwen-style
    // model takes no softmax multiplier.
    let c = parse(&format!(
        r#"{QWEN3}, "rope_scaling": {{"type": "linear", "factor": 2.0}}}}"#
    ))
    .unwrap();
    assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 2.0 });
    assert_eq!(c.softmax_scale_mult, 1.0);
    let c = parse(&format!(
        r#"{QWEN3}, "rope_parameters": {{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}}}}"#
    ))
    .unwrap();
    // Without mscale and mscale_all_dim, the attention factor is 0.1 ln 4 + 1.
    assert!((c.rope_scaling.attention_factor() - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-12);
}

#[test]
fn configs_that_change_the_math_are_refused() {
    for (extra, needle) in [
        (
            r#", "rope_scaling": {"type": "longrope", "factor": 4.0}"#,
            "rope_scaling` of type `longrope",
        ),
        (
            r#", "rope_parameters": {"rope_type": "su"}"#,
            "rope_parameters` of type `su",
        ),
        (
            r#", "rope_scaling": {"type": "yarn"}, "max_position_embeddings": 0"#,
            "original_max_position_embeddings",
        ),
        (
            r#", "rope_parameters": {"rope_type": "llama3", "factor": 8.0}"#,
            "low_freq_factor",
        ),
        (r#", "partial_rotary_factor": 0.5"#, "partial_rotary_factor"),
        (r#", "use_sliding_window": true"#, "sliding"),
        (
            r#", "quantization_config": {"quant_method": "gptq"}"#,
            "quant_method `gptq`",
        ),
        (
            r#", "quantization_config": {"quant_method": "fp8"}"#,
            "weight_block_size",
        ),
        (
            r#", "quantization_config": {"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}"#,
            "e5m2",
        ),
        (r#", "hidden_act": "gelu""#, "gelu"),
    ] {
        let e = parse(&format!("{QWEN3}{extra}}}")).unwrap_err().to_string();
        assert!(e.contains(needle) && e.contains("config.json"), "{e}");
    }
    let e = parse(r#"{"model_type": "gpt2"}"#).unwrap_err().to_string();
    assert!(e.contains("gpt2"), "{e}");
    let e = parse(r#"{"model_type": "qwen2", "hidden_size": "big"}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("hidden_size"), "{e}");
    assert!(parse("not json").is_err());
}

#[test]
fn save_then_load_is_bit_identical_single_and_sharded() {
    let m = Model::load(&fixture("qwen3-moe-tiny")).unwrap();
    for (tag, shard) in [("single", usize::MAX), ("sharded", 200_000)] {
        let d = tmpdir(tag);
        m.save(&d, shard).unwrap();
        assert!(d.join("config.json").is_file() && d.join("tokenizer.json").is_file());
        assert_eq!(d.join("model.safetensors.index.json").is_file(), tag == "sharded");
        let back = Model::load(&d).unwrap();
        assert_eq!(back.params.len(), m.params.len());
        assert!(
            back.params
                .iter()
                .zip(&m.params)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{tag}: not bit-identical"
        );
        // And once more: save of the reloaded model reproduces the same bytes.
        let d2 = tmpdir(&format!("{tag}2"));
        back.save(&d2, shard).unwrap();
        let again = Model::load(&d2).unwrap();
        assert!(again
            .params
            .iter()
            .zip(&m.params)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        let _ = std::fs::remove_dir_all(&d);
        let _ = std::fs::remove_dir_all(&d2);
    }
}

#[test]
fn checkpoint_errors_name_the_tensors() {
    let src = Model::load(&fixture("qwen2-tiny")).unwrap();
    let d = tmpdir("bad");
    std::fs::copy(fixture("qwen2-tiny").join("config.json"), d.join("config.json")).unwrap();
    // Drop one tensor, rename another, mis-shape a third.
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = src
        .layout
        .entries
        .iter()
        .map(|e| (e.name.clone(), e.shape.clone(), e.slot.of(&src.params).to_vec()))
        .collect();
    tensors.retain(|t| t.0 != "model.norm.weight");
    tensors.push(("model.layers.0.mlp.extra.weight".into(), vec![2], vec![0.0, 1.0]));
    let i = tensors
        .iter()
        .position(|t| t.0 == "model.layers.1.input_layernorm.weight")
        .unwrap();
    tensors[i] = (tensors[i].0.clone(), vec![63], vec![1.0; 63]);
    let refs: Vec<(String, Vec<usize>, &[f32])> =
        tensors.iter().map(|(n, s, d)| (n.clone(), s.clone(), &d[..])).collect();
    aha_moe_model::st::write_f32(&d.join("model.safetensors"), &refs).unwrap();
    let e = Model::load(&d).unwrap_err().to_string();
    for needle in [
        "model.norm.weight",
        "model.layers.0.mlp.extra.weight",
        "model.layers.1.input_layernorm.weight",
        "[63]",
    ] {
        assert!(e.contains(needle), "error does not name {needle}: {e}");
    }
    // Garbage instead of a safetensors file.
    std::fs::write(d.join("model.safetensors"), b"not a checkpoint").unwrap();
    let e = Model::load(&d).unwrap_err().to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn bf16_checkpoints_load_single_and_sharded() {
    let src = Model::load(&fixture("qwen2-tiny")).unwrap();
    let d = tmpdir("bf16");
    std::fs::copy(fixture("qwen2-tiny").join("config.json"), d.join("config.json")).unwrap();
    let bf: Vec<(String, Vec<usize>, Vec<u8>)> = src
        .layout
        .entries
        .iter()
        .map(|e| {
            let bytes = e
                .slot
                .of(&src.params)
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes())
                .collect();
            (e.name.clone(), e.shape.clone(), bytes)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bf
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &d.join("model.safetensors")).unwrap();
    let m = Model::load(&d).unwrap();
    for (a, b) in m.params.iter().zip(&src.params) {
        assert_eq!(*a, half::bf16::from_f32(*b).to_f32());
    }
    // Sharded as the hub ships big models: every tensor streamed from its
    // shard into its slot gives the same known values, bit for bit.
    let sharded = tmpdir("bf16-sharded");
    m.save_as(
        &sharded,
        &aha_moe_model::SaveOptions {
            dtype: aha_moe_model::SaveDtype::Bf16,
            max_shard_bytes: 20_000,
            ..Default::default()
        },
    )
    .unwrap();
    let shards = aha_moe_model::params::checkpoint_files(&sharded).unwrap();
    assert!(shards.len() >= 3, "{shards:?}");
    let back = Model::load(&sharded).unwrap();
    assert!(back
        .params
        .iter()
        .zip(&src.params)
        .all(|(a, b)| a.to_bits() == half::bf16::from_f32(*b).to_f32().to_bits()));
    let _ = std::fs::remove_dir_all(&d);
    let _ = std::fs::remove_dir_all(&sharded);
}

#[test]
fn right_padding_does_not_change_real_tokens() {
    let m = Model::load(&fixture("deepseek-v3-tiny")).unwrap();
    let a: Vec<u32> = vec![5, 17, 42, 9, 250, 3];
    let b: Vec<u32> = vec![8, 1, 77];
    let t = a.len();
    let mut batch = a.clone();
    batch.extend(&b);
    batch.extend(vec![0u32; t - b.len()]);
    let both = m.forward(&batch, 2, t).unwrap();
    let alone = m.forward(&b, 1, b.len()).unwrap();
    let c = m.config.hidden_size;
    let padded_rows = &both.hidden[t * c..(t + b.len()) * c];
    let d = padded_rows
        .iter()
        .zip(&alone.hidden)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(d < 1e-5, "padding changed a real token's hidden state by {d}");
}

#[test]
fn aux_loss_gradient_matches_finite_differences() {
    let mut m = Model::load(&fixture("qwen3-moe-tiny")).unwrap();
    let ids: Vec<u32> = (0..24).map(|i| (i * 37 % 300) as u32).collect();
    let (b, t) = (2, 12);
    let acts = m.forward(&ids, b, t).unwrap();
    let aux = m.aux_loss(&acts).unwrap();
    assert!(aux > 0.9 && aux < 8.0 * 2.0, "aux loss {aux}");
    let n = b * t;
    let mut grads = vec![0f32; m.params.len()];
    let zeros = vec![0f32; n];
    let (_, lse) = m.token_logprobs(&acts, &vec![0; n]).unwrap();
    m.backward_with_aux(&acts, &vec![0; n], &lse, &zeros, 1.0, &mut grads)
        .unwrap();
    let router = m.layout.get("model.layers.1.mlp.gate.weight").unwrap().slot;
    let load0 = acts.expert_load();
    let h = 1e-2f32;
    let mut checked = 0;
    for j in (0..router.len).step_by(37) {
        let i = router.off + j;
        let orig = m.params[i];
        m.params[i] = orig + h;
        let up = m.forward(&ids, b, t).unwrap();
        m.params[i] = orig - h;
        let down = m.forward(&ids, b, t).unwrap();
        m.params[i] = orig;
        if up.expert_load() != load0 || down.expert_load() != load0 {
            continue; // the step changed a routing decision: not differentiable there
        }
        let num = (m.aux_loss(&up).unwrap() - m.aux_loss(&down).unwrap()) / (2.0 * h);
        let ana = grads[i];
        assert!(
            (num - ana).abs() <= 2e-2 * num.abs().max(ana.abs()) + 2e-5,
            "router[{j}]: analytic {ana} numeric {num}"
        );
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} points checked");
}

#[test]
fn expert_bias_moves_toward_balance() {
    let mut m = Model::load(&fixture("deepseek-v3-tiny")).unwrap();
    let ids: Vec<u32> = (0..32).map(|i| (i * 11 % 300) as u32).collect();
    let acts = m.forward(&ids, 2, 16).unwrap();
    let load = acts.expert_load();
    let slot = m
        .layout
        .get("model.layers.1.mlp.gate.e_score_correction_bias")
        .unwrap()
        .slot;
    let before = slot.of(&m.params).to_vec();
    m.update_expert_bias(&load, 0.001).unwrap();
    let after = slot.of(&m.params);
    let mean = load[1].iter().sum::<u32>() as f32 / load[1].len() as f32;
    for e in 0..load[1].len() {
        let moved = after[e] - before[e];
        let c = load[1][e] as f32;
        let want = if c > mean {
            -0.001
        } else if c < mean {
            0.001
        } else {
            0.0
        };
        assert!(
            (moved - want).abs() < 1e-7,
            "expert {e}: load {c}, mean {mean}, moved {moved}"
        );
    }
    assert!(m
        .layout
        .get("model.layers.1.mlp.gate.e_score_correction_bias")
        .is_some_and(|e| !e.trainable));
}

#[test]
fn bad_inputs_are_errors() {
    let m = Model::load(&fixture("qwen2-tiny")).unwrap();
    let e = m.forward(&[1, 2, 300], 1, 3).err().unwrap().to_string();
    assert!(e.contains("300") && e.contains("vocabulary"), "{e}");
    assert!(m.forward(&[1, 2, 3], 2, 2).is_err());
    let mut cache = m.new_cache();
    assert!(m.forward_cached(&[], &mut cache).is_err());
    assert!(Model::load(Path::new("/nonexistent/model")).is_err());
}

/// Writes `tensors` (name, dtype, shape, raw bytes) as one safetensors file.
fn write_raw(path: &Path, tensors: &[(String, safetensors::Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Block-wise FP8 as DeepSeek-V3 ships it, on llama-tiny's shapes with
/// 48x40 blocks so that edge blocks are partial both ways: every weight is
/// an e4m3 code times its block's scale, so the dequantized model must
/// equal the f32 one bit for bit. A weight without its scale is named.
#[test]
fn fp8_block_quantized_weights_dequantize_exactly() {
    let src = fixture("llama-tiny");
    let f32_model = Model::load(&src).unwrap();
    // Codes and the values they stand for: 1, 2, 0.5, -1, 3, 2^-9 (subnormal), -448.
    let codes: [(u8, f32); 7] = [
        (0x38, 1.0),
        (0x40, 2.0),
        (0x30, 0.5),
        (0xb8, -1.0),
        (0x44, 3.0),
        (0x01, 1.0 / 512.0),
        (0xfe, -448.0),
    ];
    let (bn, bk) = (48usize, 40usize);
    let mut expected = f32_model.params.clone();
    let mut tensors = Vec::new();
    for e in &f32_model.layout.entries {
        let quantize = e.name.starts_with("model.layers.") && e.shape.len() == 2;
        if !quantize {
            let bytes = e
                .slot
                .of(&f32_model.params)
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect();
            tensors.push((e.name.clone(), safetensors::Dtype::F32, e.shape.clone(), bytes));
            continue;
        }
        let (rows, cols) = (e.shape[0], e.shape[1]);
        let (sr, sc) = (rows.div_ceil(bn), cols.div_ceil(bk));
        let scale: Vec<f32> = (0..sr * sc).map(|i| 0.001 * (i + 1) as f32).collect();
        let mut q = Vec::with_capacity(rows * cols);
        let want = e.slot.of_mut(&mut expected);
        for r in 0..rows {
            for c in 0..cols {
                let (code, value) = codes[(r * 7 + c * 3) % codes.len()];
                q.push(code);
                want[r * cols + c] = value * scale[(r / bn) * sc + c / bk];
            }
        }
        tensors.push((e.name.clone(), safetensors::Dtype::F8_E4M3, e.shape.clone(), q));
        let sbytes = scale.iter().flat_map(|x| x.to_le_bytes()).collect();
        tensors.push((
            format!("{}_scale_inv", e.name),
            safetensors::Dtype::F32,
            vec![sr, sc],
            sbytes,
        ));
    }
    let d = tmpdir("fp8");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["quantization_config"] = serde_json::json!({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [bn, bk]});
    std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    write_raw(&d.join("model.safetensors"), &tensors);
    let m = Model::load(&d).unwrap();
    assert!(m.params.iter().zip(&expected).all(|(a, b)| a.to_bits() == b.to_bits()));

    // Drop one scale: the error names it.
    tensors.retain(|t| t.0 != "model.layers.1.mlp.up_proj.weight_scale_inv");
    write_raw(&d.join("model.safetensors"), &tensors);
    let e = Model::load(&d).unwrap_err().to_string();
    assert!(e.contains("model.layers.1.mlp.up_proj.weight_scale_inv"), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}

/// `Layout::grad_ready_parts` names the parts a backward completes in its
/// order: the head (final norm, untied lm head), each layer from the last
/// to the first (its norms, attention, MLP or experts, router; a LoRA
/// layout's adapters), the embedding (with a tied head); each part's
/// ranges are its tensors' slots, and the parts tile the trainable prefix.
#[test]
fn gradient_parts_follow_the_backward_order() {
    for name in ["qwen2-tiny", "qwen3-moe-tiny", "deepseek-v3-tiny"] {
        let m = Model::load(&fixture(name)).unwrap();
        let lay = &m.layout;
        let parts = lay.grad_ready_parts();
        let nl = lay.layers.len();
        assert_eq!(parts.len(), nl + 2, "{name}");
        let inside = |part: &[std::ops::Range<usize>], off: usize| part.iter().any(|r| r.contains(&off));
        assert!(
            inside(&parts[0], lay.norm.off),
            "{name}: the final norm is in the head part"
        );
        assert!(inside(&parts[nl + 1], lay.embed.off), "{name}: the embedding is last");
        assert!(inside(
            &parts[if m.config.tie_word_embeddings { nl + 1 } else { 0 }],
            lay.lm_head.off
        ));
        for (l, s) in lay.layers.iter().enumerate() {
            assert!(inside(&parts[nl - l], s.ln1.off), "{name}: layer {l}");
            assert!(inside(&parts[nl - l], s.ln2.off), "{name}: layer {l}");
        }
        let mut all: Vec<_> = parts.iter().flatten().cloned().collect();
        all.sort_by_key(|r| r.start);
        let mut at = 0;
        for r in all {
            assert_eq!(r.start, at, "{name}");
            at = r.end;
        }
        assert_eq!(at, lay.trainable, "{name}");
        // The frozen expert bias (DeepSeek-V3) is in no part.
        for e in lay.entries.iter().filter(|e| !e.trainable) {
            assert!(parts.iter().all(|p| !inside(p, e.slot.off)), "{name}: {}", e.name);
        }
    }
    // LoRA: the adapters (PEFT names) belong to their layers; head and
    // embedding are frozen.
    let m = Model::load(&fixture("qwen2-tiny")).unwrap();
    let cfg = aha_moe_model::LoraConfig {
        r: 2,
        alpha: 4.0,
        target_modules: vec!["q_proj".into(), "down_proj".into()],
        ..Default::default()
    };
    let lay = aha_moe_model::Layout::with_lora(&m.config, &cfg).unwrap();
    let parts = lay.grad_ready_parts();
    assert!(parts[0].is_empty() && parts[3].is_empty());
    for (l, part) in [(1, &parts[1]), (0, &parts[2])] {
        let names: Vec<&str> = lay
            .entries
            .iter()
            .filter(|e| part.iter().any(|r| r.contains(&e.slot.off)) && e.trainable)
            .map(|e| e.name.as_str())
            .collect();
        assert_eq!(names.len(), 4, "{names:?}");
        assert!(names.iter().all(|n| n.contains(&format!("layers.{l}."))), "{names:?}");
    }
}

/// `Layout::with_expert_shard` holds of every MoE layer's routed experts
/// only those of the shard, under their whole-model names, each tensor
/// with its whole-model shape; `local_expert_ranges` are exactly those
/// experts' slots and `replicated_ranges` the rest of the trainable
/// prefix; shards outside the experts (or a dense model) are refused.
#[test]
fn an_expert_shard_holds_only_its_experts() {
    for name in ["qwen3-moe-tiny", "deepseek-v3-tiny"] {
        let m = Model::load(&fixture(name)).unwrap();
        let e = m.config.moe.as_ref().unwrap().n_experts;
        let expert = |n: &str| {
            n.split(".mlp.experts.")
                .nth(1)
                .and_then(|r| r.split('.').next())
                .and_then(|x| x.parse::<usize>().ok())
        };
        assert!(m.layout.expert_shard.is_none() && m.layout.local_expert_ranges().is_empty());
        assert_eq!(m.layout.replicated_ranges(), vec![0..m.layout.trainable]);
        let shard = e / 4..e / 2;
        let lay = aha_moe_model::Layout::with_expert_shard(&m.config, shard.clone()).unwrap();
        assert_eq!(lay.expert_shard, Some(shard.clone()));
        let mut kept = 0;
        for en in &m.layout.entries {
            match (expert(&en.name), lay.get(&en.name)) {
                (Some(x), got) if !shard.contains(&x) => assert!(got.is_none(), "{name}: {}", en.name),
                (_, got) => {
                    let got = got.unwrap_or_else(|| panic!("{name}: {} missing", en.name));
                    assert_eq!(
                        (&got.shape, got.trainable),
                        (&en.shape, en.trainable),
                        "{name}: {}",
                        en.name
                    );
                    kept += en.slot.len;
                }
            }
        }
        assert_eq!(kept, lay.size, "{name}");
        let local = lay.local_expert_ranges();
        for en in &lay.entries {
            let inside = local
                .iter()
                .any(|r| r.start <= en.slot.off && en.slot.off + en.slot.len <= r.end);
            assert_eq!(inside, expert(&en.name).is_some(), "{name}: {}", en.name);
        }
        let mut all: Vec<_> = local.iter().chain(&lay.replicated_ranges()).cloned().collect();
        all.sort_by_key(|r| r.start);
        let mut at = 0;
        for r in all {
            assert_eq!(r.start, at, "{name}: the ranges tile the trainable prefix");
            at = r.end;
        }
        assert_eq!(at, lay.trainable, "{name}");
        for bad in [0..0, e - 1..e + 1] {
            let err = aha_moe_model::Layout::with_expert_shard(&m.config, bad.clone()).unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }
    let dense = Model::load(&fixture("qwen2-tiny")).unwrap();
    assert!(aha_moe_model::Layout::with_expert_shard(&dense.config, 0..1).is_err());
}

/// Prompts long enough for the paged forward's whole-span prefill (16
/// tokens and up) and a short one, then one decode step each: every last
/// token's logits equal the full forward's at that position.
#[test]
fn paged_prefill_and_decode_match_the_full_forward() {
    for name in ["qwen3-moe-tiny", "deepseek-v3-tiny", "qwen2-tiny"] {
        let m = Model::load(&fixture(name)).unwrap();
        let v = m.config.vocab_size;
        let prompts: Vec<Vec<u32>> = [40usize, 5, 23]
            .iter()
            .enumerate()
            .map(|(p, &len)| (0..len).map(|i| ((i * 37 + p * 11 + 3) % v) as u32).collect())
            .collect();
        let mut cache = m.new_paged_cache(8, 64);
        let tables: Vec<Vec<u32>> = prompts
            .iter()
            .map(|pr| {
                (0..cache.blocks_for(pr.len() + 1))
                    .map(|_| cache.alloc().unwrap())
                    .collect()
            })
            .collect();
        let tokens: Vec<u32> = prompts.concat();
        let spans: Vec<SeqSpan<'_>> = prompts
            .iter()
            .zip(&tables)
            .map(|(pr, t)| SeqSpan {
                table: t,
                start: 0,
                len: pr.len(),
            })
            .collect();
        let prefill = m.forward_paged(&tokens, &spans, &mut cache).unwrap();
        let next: Vec<u32> = (0..prompts.len() as u32).map(|i| (i * 5 + 1) % v as u32).collect();
        let spans: Vec<SeqSpan<'_>> = prompts
            .iter()
            .zip(&tables)
            .map(|(pr, t)| SeqSpan {
                table: t,
                start: pr.len(),
                len: 1,
            })
            .collect();
        let decode = m.forward_paged(&next, &spans, &mut cache).unwrap();
        for (i, pr) in prompts.iter().enumerate() {
            let mut ids = pr.clone();
            ids.push(next[i]);
            let t = ids.len();
            let acts = m.forward(&ids, 1, t).unwrap();
            let logits = m.logits_of(&acts.hidden).unwrap();
            for (got, pos) in [
                (&prefill[i * v..(i + 1) * v], t - 2),
                (&decode[i * v..(i + 1) * v], t - 1),
            ] {
                let want = &logits[pos * v..(pos + 1) * v];
                let d = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(d < 1e-4, "{name}: prompt {i} position {pos}: logits differ by {d}");
            }
        }
    }
}
