//! LoRA adapters: the PEFT fixture (`qwen2-tiny-lora`, transformers 5.25 +
//! PEFT 0.21 in float32: logits, log-probs, loss and the gradient of every
//! LoRA tensor with the base frozen), PEFT-format save/load, merging,
//! target matching and refusals.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use aha_moe_model::lora::{is_adapter, LoraConfig};
use aha_moe_model::st::{read_file, NamedTensor};
use aha_moe_model::{Model, ModelConfig};
use aha_tensor::CpuStorage;

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

fn reference() -> HashMap<String, NamedTensor> {
    read_file(&dir("qwen2-tiny-lora").join("reference.safetensors"))
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

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn adapted() -> Model {
    Model::load(&dir("qwen2-tiny"))
        .unwrap()
        .load_adapter(&dir("qwen2-tiny-lora"))
        .unwrap()
}

fn next_targets(tokens: &[u32], b: usize, t: usize) -> Vec<u32> {
    let mut targets = vec![0u32; b * t];
    for row in 0..b {
        for i in 0..t - 1 {
            targets[row * t + i] = tokens[row * t + i + 1];
        }
    }
    targets
}

#[test]
fn peft_adapter_matches_transformers_and_peft() {
    let model = adapted();
    let r = reference();
    let input = &r["input_ids"];
    let (b, t) = (input.shape[0], input.shape[1]);
    let tokens = ids(input);

    // The adapter changes the output, so the fixture tests it.
    let base = Model::load(&dir("qwen2-tiny")).unwrap();
    let base_logits = base.logits_of(&base.forward(&tokens, b, t).unwrap().hidden).unwrap();
    let acts = model.forward(&tokens, b, t).unwrap();
    let logits = model.logits_of(&acts.hidden).unwrap();
    assert!(max_abs_diff(&base_logits, &logits) > 1e-3);
    let d = max_abs_diff(&logits, &f32s(&r["logits"]));
    eprintln!("qwen2-tiny-lora: logits max |diff| = {d:.3e}");
    assert!(d <= 1e-4, "logits differ from PEFT by {d:e}");

    let (logp, _) = model.token_logprobs(&acts, &next_targets(&tokens, b, t)).unwrap();
    let ours: Vec<f32> = (0..b).flat_map(|row| logp[row * t..row * t + t - 1].to_vec()).collect();
    let d = max_abs_diff(&ours, &f32s(&r["token_logprobs"]));
    eprintln!("qwen2-tiny-lora: token_logprobs max |diff| = {d:.3e}");
    assert!(d <= 1e-4, "log-probs differ from PEFT by {d:e}");

    let mut grads = vec![0f32; model.params.len()];
    let loss = model.next_token_loss(&tokens, b, t, &mut grads).unwrap();
    let want = f32s(&r["loss"])[0];
    assert!(((loss - want) / want).abs() <= 1e-5, "loss {loss} vs PEFT {want}");
    let mut checked = 0;
    let mut worst = 0f32;
    for e in model.layout.entries.iter().filter(|e| e.trainable) {
        assert!(is_adapter(e), "{} is trainable but not an adapter", e.name);
        // PEFT names parameters with the adapter name `default`.
        let key = format!("grad.{}", e.name.replace(".weight", ".default.weight"));
        let want = f32s(&r[&key]);
        let d = max_abs_diff(e.slot.of(&grads), &want);
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        worst = worst.max(d / scale);
        assert!(d <= 1e-4 * scale.max(1.0), "{}: gradient off by {d:e}", e.name);
        checked += 1;
    }
    eprintln!("qwen2-tiny-lora: {checked} adapter gradients, worst {worst:.3e} of the tensor's largest");
    assert_eq!(checked, 8);
    // Frozen base weights get no gradient through the adapted linears.
    let q = model.layout.get("model.layers.0.self_attn.q_proj.weight").unwrap();
    assert!(!q.trainable && q.slot.of(&grads).iter().all(|&g| g == 0.0));
}

#[test]
fn cached_decoding_and_merging_agree_with_the_unmerged_forward() {
    let model = adapted();
    let prompt = [3u32, 17, 42, 7, 99];
    let cached = model.greedy(&prompt, 8, true).unwrap();
    assert_eq!(cached, model.greedy(&prompt, 8, false).unwrap());

    // Disabled, the adapters leave the base model alone.
    let base = Model::load(&dir("qwen2-tiny")).unwrap();
    let mut off = model.clone();
    assert!(off.layout.set_adapters_enabled(false));
    let tokens: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % 300).collect();
    let want = base.logits_of(&base.forward(&tokens, 2, 6).unwrap().hidden).unwrap();
    assert_eq!(
        off.logits_of(&off.forward(&tokens, 2, 6).unwrap().hidden).unwrap(),
        want
    );
    let mut g = vec![0f32; off.params.len()];
    off.next_token_loss(&tokens, 2, 6, &mut g).unwrap();
    assert!(off
        .layout
        .entries
        .iter()
        .filter(|e| is_adapter(e))
        .all(|e| e.slot.of(&g).iter().all(|&x| x == 0.0)));
    assert!(!base.clone().layout.set_adapters_enabled(false));

    let merged = model.merge_lora().unwrap();
    assert!(merged.layout.lora.is_none());
    assert!(merged.layout.entries.iter().all(|e| !is_adapter(e)));
    let tokens: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % 300).collect();
    let a = model.logits_of(&model.forward(&tokens, 2, 6).unwrap().hidden).unwrap();
    let b = merged
        .logits_of(&merged.forward(&tokens, 2, 6).unwrap().hidden)
        .unwrap();
    let d = max_abs_diff(&a, &b);
    assert!(d <= 1e-5, "merged logits differ by {d:e}");
    assert_eq!(merged.greedy(&prompt, 8, true).unwrap(), cached);

    // The merged folder is a normal HF model.
    let out = tempdir("merged");
    merged.save(&out, usize::MAX).unwrap();
    let back = Model::load(&out).unwrap();
    assert_eq!(back.params, merged.params);
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("aha-lora-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn save_then_load_of_an_adapter_is_exact() {
    let mut model = Model::load(&dir("qwen2-tiny"))
        .unwrap()
        .with_lora(
            &LoraConfig {
                r: 3,
                alpha: 5.0,
                target_modules: vec!["o_proj".into(), "mlp.down_proj".into(), "k_proj".into()],
                dropout: 0.0,
                use_rslora: true,
            },
            7,
        )
        .unwrap();
    // Trained-looking adapters: B non-zero.
    for (i, e) in model
        .layout
        .entries
        .clone()
        .iter()
        .filter(|e| is_adapter(e))
        .enumerate()
    {
        for (j, v) in e.slot.of_mut(&mut model.params).iter_mut().enumerate() {
            *v = ((i * 31 + j * 7) % 13) as f32 * 0.01 - 0.06;
        }
    }
    let out = tempdir("save");
    model.save(&out, usize::MAX).unwrap();
    assert!(out.join("adapter_config.json").is_file() && out.join("adapter_model.safetensors").is_file());
    assert!(!out.join("model.safetensors").exists() && !out.join("config.json").exists());
    assert!(out.join("tokenizer.json").is_file());
    let back = Model::load(&dir("qwen2-tiny")).unwrap().load_adapter(&out).unwrap();
    assert_eq!(back.layout, model.layout);
    assert_eq!(back.params, model.params);
    // An adapter folder alone loads its base from base_model_name_or_path.
    let auto = Model::load(&out).unwrap();
    assert_eq!(auto.params, model.params);
    let fixture_base = std::fs::read_to_string(dir("qwen2-tiny-lora").join("adapter_config.json")).unwrap();
    assert!(fixture_base.contains("shared/fixtures/models/qwen2-tiny"));
    let err = Model::load(&dir("qwen2-tiny-lora")).unwrap_err().to_string();
    assert!(err.contains("base_model_name_or_path"), "{err}");
    let cfg = back.layout.lora.clone().unwrap();
    assert!(cfg.use_rslora && cfg.r == 3 && cfg.alpha == 5.0);
    assert!((cfg.scale() - 5.0 / 3f32.sqrt()).abs() < 1e-6);
}

#[test]
fn a_fresh_adapter_starts_equal_to_the_base_and_freezes_it() {
    let base = Model::load(&dir("qwen2-tiny")).unwrap();
    let model = base.clone().with_lora(&LoraConfig::default(), 1).unwrap();
    let tokens: Vec<u32> = (0..10).map(|i| (i * 11 + 2) % 300).collect();
    let a = base.logits_of(&base.forward(&tokens, 1, 10).unwrap().hidden).unwrap();
    let b = model.logits_of(&model.forward(&tokens, 1, 10).unwrap().hidden).unwrap();
    assert_eq!(a, b);
    // Only the adapters train: q and v of two layers, A and B each.
    let trainable: Vec<&str> = model
        .layout
        .entries
        .iter()
        .filter(|e| e.trainable)
        .map(|e| e.name.as_str())
        .collect();
    assert_eq!(trainable.len(), 8);
    assert!(trainable
        .iter()
        .all(|n| n.contains("q_proj.lora_") || n.contains("v_proj.lora_")));
    let q_a = model
        .layout
        .get("base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight")
        .unwrap();
    assert_eq!(q_a.shape, vec![8, 64]);
    assert!(q_a.slot.of(&model.params).iter().any(|&v| v != 0.0));
    assert!(q_a.slot.of(&model.params).iter().all(|&v| v.abs() <= 1.0 / 8.0));
    let total_adapter: usize = model
        .layout
        .entries
        .iter()
        .filter(|e| e.trainable)
        .map(|e| e.slot.len)
        .sum();
    assert_eq!(model.layout.trainable, total_adapter);
}

fn cfg_of(name: &str) -> ModelConfig {
    ModelConfig::from_path(&dir(name)).unwrap()
}

#[test]
fn targets_follow_peft_suffix_matching_on_every_architecture() {
    let lora = |t: &[&str]| LoraConfig {
        target_modules: t.iter().map(|s| s.to_string()).collect(),
        ..LoraConfig::default()
    };
    let count = |name: &str, t: &[&str]| {
        aha_moe_model::Layout::with_lora(&cfg_of(name), &lora(t))
            .map(|l| l.entries.iter().filter(|e| is_adapter(e)).count() / 2)
    };
    let c = lora(&["q_proj"]);
    assert!(c.targets("model.layers.0.self_attn.q_proj"));
    assert!(!c.targets("model.layers.0.self_attn.kq_proj"));
    assert!(lora(&["self_attn.q_proj"]).targets("model.layers.3.self_attn.q_proj"));
    // Two layers each.
    assert_eq!(count("qwen2-tiny", &["q_proj", "v_proj"]).unwrap(), 4);
    assert_eq!(
        count("llama-tiny", &["all-linear"]).unwrap(),
        7 * cfg_of("llama-tiny").num_layers
    );
    // MLA: no v_proj; the low-rank projections are adaptable.
    let ds = cfg_of("deepseek-v3-tiny");
    let n = count("deepseek-v3-tiny", &["kv_a_proj_with_mqa", "kv_b_proj", "v_proj"]).unwrap();
    assert_eq!(n, 2 * ds.num_layers);
    // Qwen3-MoE: gate_proj adapts dense layers' MLPs only, never routed experts.
    let moe = adapter_names("qwen3-moe-tiny", &lora(&["gate_proj", "o_proj"]));
    assert!(!moe.is_empty() && moe.iter().all(|n| !n.contains(".experts.")));
    // Nothing matched: an error naming the targets.
    let err = count("qwen2-tiny", &["lm_head", "nope"]).unwrap_err().to_string();
    assert!(err.contains("lm_head") && err.contains("match no linear"), "{err}");
}

fn adapter_names(name: &str, lora: &LoraConfig) -> Vec<String> {
    aha_moe_model::Layout::with_lora(&cfg_of(name), lora)
        .unwrap()
        .entries
        .into_iter()
        .filter(is_adapter)
        .map(|e| e.name)
        .collect()
}

#[test]
fn refusals_name_the_file_and_the_key() {
    let out = tempdir("refuse");
    std::fs::create_dir_all(&out).unwrap();
    let base = std::fs::read_to_string(dir("qwen2-tiny-lora").join("adapter_config.json")).unwrap();
    let cases = [
        ("\"use_dora\": false", "\"use_dora\": true", "use_dora"),
        ("\"bias\": \"none\"", "\"bias\": \"all\"", "bias"),
        (
            "\"rank_pattern\": {}",
            "\"rank_pattern\": {\"q_proj\": 2}",
            "rank_pattern",
        ),
        ("\"peft_type\": \"LORA\"", "\"peft_type\": \"IA3\"", "LORA"),
        ("\"r\": 4", "\"r\": 0", "r must be"),
    ];
    for (from, to, needle) in cases {
        assert!(base.contains(from), "{from}");
        std::fs::write(out.join("adapter_config.json"), base.replace(from, to)).unwrap();
        let err = LoraConfig::from_peft_dir(&out).unwrap_err().to_string();
        assert!(err.contains(needle) && err.contains("adapter_config.json"), "{err}");
    }
    // Shapes that disagree with the config, and missing tensors.
    std::fs::write(out.join("adapter_config.json"), base.replace("\"r\": 4", "\"r\": 2")).unwrap();
    std::fs::copy(
        dir("qwen2-tiny-lora").join("adapter_model.safetensors"),
        out.join("adapter_model.safetensors"),
    )
    .unwrap();
    let err = Model::load(&dir("qwen2-tiny"))
        .unwrap()
        .load_adapter(&out)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("has shape [4, 64]") && err.contains("adapter_model.safetensors"),
        "{err}"
    );
    std::fs::write(
        out.join("adapter_config.json"),
        base.replace("\"v_proj\",", "\"v_proj\", \"k_proj\","),
    )
    .unwrap();
    let err = Model::load(&dir("qwen2-tiny"))
        .unwrap()
        .load_adapter(&out)
        .unwrap_err()
        .to_string();
    assert!(err.contains("4 missing") && err.contains("k_proj.lora_A"), "{err}");
    // Dropout in [0, 1) loads and trains; 1 is refused naming the file.
    let c = LoraConfig {
        dropout: 0.05,
        ..LoraConfig::default()
    };
    assert!(c.validate(Path::new("x.toml")).is_ok());
    assert!(c.validate_for_training(Path::new("x.toml")).is_ok());
    let c = LoraConfig { dropout: 1.0, ..c };
    let err = c.validate_for_training(Path::new("x.toml")).unwrap_err().to_string();
    assert!(err.contains("dropout") && err.contains("x.toml"), "{err}");
}

/// qwen2-tiny with adapters on q, v, o and down_proj (dropout `p`), every
/// adapter value small and non-zero (so every gradient path is exercised).
fn adapted_with_dropout(p: f32) -> Model {
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        target_modules: ["q_proj", "v_proj", "o_proj", "down_proj"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        dropout: p,
        ..LoraConfig::default()
    };
    let mut m = Model::load(&dir("qwen2-tiny")).unwrap().with_lora(&cfg, 5).unwrap();
    let tr = m.layout.trainable;
    for (i, v) in m.params[..tr].iter_mut().enumerate() {
        *v = ((i * 131 % 23) as f32 - 11.0) * 0.01;
    }
    m
}

/// LoRA dropout: 0 is the path without dropout exactly; above 0 a training
/// forward draws its masks from the seed (the same seed twice gives the
/// same loss, another seed another), and with dropout off again (rollouts,
/// scoring, evaluation) the model computes as if it had none.
#[test]
fn lora_dropout_is_seeded_in_training_and_absent_otherwise() {
    let ids: Vec<u32> = (0..24u32).map(|i| (i * 37 + 5) % 200).collect();
    let (b, t) = (2, 12);
    let loss = |m: &Model| {
        let mut g = vec![0f32; m.params.len()];
        let l = m.next_token_loss(&ids, b, t, &mut g).unwrap();
        (l, g)
    };
    let mut zero = adapted_with_dropout(0.0);
    let plain = loss(&zero);
    assert!(!zero.layout.set_lora_dropout(Some(3)), "dropout 0 turns nothing on");
    assert_eq!(loss(&zero), plain, "dropout 0 changes nothing");
    let mut m = adapted_with_dropout(0.3);
    assert_eq!(m.params, zero.params);
    assert_eq!(loss(&m), plain, "no dropout outside training forwards");
    assert!(m.layout.set_lora_dropout(Some(3)));
    let a = loss(&m);
    assert_ne!(a.0, plain.0, "dropout 0.3 changed nothing");
    assert_eq!(loss(&m), a, "the same seed draws the same masks");
    m.layout.set_lora_dropout(Some(4));
    assert_ne!(loss(&m).0, a.0, "another seed, the same masks");
    assert!(!m.layout.set_lora_dropout(None));
    assert_eq!(loss(&m), plain, "dropout off again: evaluation is unaffected");
}

/// With a seed fixed, the masks are fixed and the loss is a smooth function
/// of the adapters: its gradient (through the masked inputs) matches
/// central finite differences.
#[test]
fn lora_dropout_gradients_match_finite_differences() {
    let ids: Vec<u32> = (0..24u32).map(|i| (i * 37 + 5) % 200).collect();
    let (b, t) = (2, 12);
    let mut m = adapted_with_dropout(0.3);
    assert!(m.layout.set_lora_dropout(Some(17)));
    let mut g = vec![0f32; m.params.len()];
    m.next_token_loss(&ids, b, t, &mut g).unwrap();
    let tr = m.layout.trainable;
    // The 12 largest adapter gradients, A and B alike.
    let mut order: Vec<usize> = (0..tr).collect();
    order.sort_by(|&i, &j| g[j].abs().total_cmp(&g[i].abs()));
    let eps = 1e-2f32;
    let mut scratch = vec![0f32; m.params.len()];
    for &i in &order[..12] {
        let x0 = m.params[i];
        m.params[i] = x0 + eps;
        let up = m.next_token_loss(&ids, b, t, &mut scratch).unwrap() as f64;
        m.params[i] = x0 - eps;
        let down = m.next_token_loss(&ids, b, t, &mut scratch).unwrap() as f64;
        m.params[i] = x0;
        let fd = (up - down) / (2.0 * eps as f64);
        let name = &m
            .layout
            .entries
            .iter()
            .find(|e| e.slot.off <= i && i < e.slot.off + e.slot.len)
            .unwrap()
            .name;
        assert!(
            (fd - g[i] as f64).abs() <= 2e-2 * (g[i] as f64).abs() + 1e-4,
            "{name}[{i}]: gradient {} vs finite difference {fd}",
            g[i]
        );
    }
}
