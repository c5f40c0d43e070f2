//! `aha grpo` from a TOML config on a model folder and a JSONL set:
//! metrics under TRL's names, checkpoints, resume, unknown keys refused.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

#[test]
fn grpo_runs_from_toml_and_resumes() {
    let base = std::env::temp_dir().join(format!("aha-grpo-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    // A small policy: the toy demo's model after a short pretraining.
    let demo_cfg = aha_trainer::DemoConfig {
        pretrain_steps: 30,
        grpo_steps: 1,
        eval_problems: 8,
        prompts_per_step: 2,
        num_generations: 2,
        ..aha_trainer::DemoConfig::quick(3)
    };
    aha_trainer::run_demo(&demo_cfg, &base.join("demo"), &mut |_| {}).unwrap();
    let data = base.join("train.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"07+15=\", \"answer\": \"22\"}\n{\"question\": \"33+48=\", \"answer\": \"#### 81\"}\n{\"prompt\": \"12+30=\", \"answer\": \"42\"}\n",
    )
    .unwrap();
    let toml_path = base.join("grpo.toml");
    let toml = format!(
        "model = {:?}\ndata = {:?}\nout = {:?}\nsteps = 4\nprompts_per_step = 2\nnum_generations = 4\nlearning_rate = 1e-4\n\
         max_completion_length = 30\ntemplate = \"none\"\nsave_every = 2\ndynamic_sampling = true\nreference_reset_every = 3\nnum_iterations = 2\nminibatches = 2\n\
         eval_data = {:?}\neval_every = 2\neval_before_training = true\neval_samples = 2\n\
         rewards = [{{ name = \"accuracy\", weight = 1.0 }}, {{ name = \"format\", weight = 0.5 }}, {{ name = \"language\", weight = 0.1 }}]\n",
        base.join("demo/checkpoint"),
        data,
        base.join("run"),
        data
    );
    std::fs::write(&toml_path, &toml).unwrap();
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_aha"))
            .arg("grpo")
            .arg("--config")
            .arg(&toml_path)
            .args(extra)
            .output()
            .expect("run aha")
    };
    let out = run(&[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(base.join("run/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // The evaluation before training, then one line a step.
    assert_eq!(lines.len(), 5);
    assert_eq!(lines[0]["step"], 0);
    for (i, l) in lines.iter().enumerate() {
        let has = l.get("eval/pass@1").is_some();
        assert_eq!(has, i % 2 == 0, "line {i}: eval at steps 0, 2, 4 only");
        if has {
            for key in ["eval/pass@1", "eval/pass@k", "eval/cons@k"] {
                assert!(l[key].as_f64().is_some_and(|x| (0.0..=1.0).contains(&x)), "{key}");
            }
            assert_eq!(l["eval/k"], 2.0);
        }
    }
    // Epochs without replacement over the 3 prompts: the epoch count grows
    // with the prompts drawn (2 or more a step).
    let epochs: Vec<f64> = lines[1..].iter().map(|l| l["epoch"].as_f64().unwrap()).collect();
    assert!(
        epochs.windows(2).all(|w| w[0] < w[1]) && epochs[0] >= 2.0 / 3.0,
        "{epochs:?}"
    );
    for key in [
        "reward",
        "rewards/accuracy/mean",
        "rewards/format/mean",
        "kl",
        "completions/mean_length",
        "clip_ratio/region_mean",
    ] {
        assert!(lines[4].get(key).is_some_and(|v| v.is_number()), "{key} missing");
    }
    assert!(base.join("run/final/config.json").is_file());
    // samples.jsonl: the first group's 4 completions every step, with the
    // weighted reward and each function's score; plots of the metrics.
    let samples_text = std::fs::read_to_string(base.join("run/samples.jsonl")).unwrap();
    let samples: Vec<serde_json::Value> = samples_text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(samples.len(), 4 * 4);
    for (i, s) in samples.iter().enumerate() {
        assert_eq!(s["step"], (i / 4 + 1) as u64, "sample {i}");
        assert!(s["prompt"].as_str().is_some_and(|p| p.ends_with('=')), "{s}");
        assert!(s["completion"].is_string() && s["tokens"].as_u64().is_some(), "{s}");
        let (acc, fmt, lang) = (
            s["rewards"]["accuracy"].as_f64().unwrap(),
            s["rewards"]["format"].as_f64().unwrap(),
            s["rewards"]["language"].as_f64().unwrap(),
        );
        let total = s["reward"].as_f64().unwrap();
        assert!((total - (acc + 0.5 * fmt + 0.1 * lang)).abs() < 1e-9, "{s}");
    }
    for plot in ["reward.png", "kl.png", "length.png", "eval.png"] {
        assert!(base.join("run/plots").join(plot).is_file(), "{plot}");
    }
    // TensorBoard events beside metrics.jsonl.
    let events: Vec<_> = std::fs::read_dir(base.join("run"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("events.out.tfevents."))
        .collect();
    assert_eq!(events.len(), 1);
    let bytes = std::fs::read(events[0].path()).unwrap();
    assert!(bytes.windows(b"eval/pass@1".len()).any(|w| w == b"eval/pass@1"));
    assert!(base.join("run/checkpoints/latest").is_file());
    // Rewind to the step-2 checkpoint and resume: the last two lines come back the same.
    std::fs::write(base.join("run/checkpoints/latest"), "step-000002").unwrap();
    let out = run(&["--resume"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let again: Vec<serde_json::Value> = std::fs::read_to_string(base.join("run/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let strip = |v: &serde_json::Value| {
        let mut v = v.clone();
        v.as_object_mut().unwrap().retain(|k, _| !k.starts_with("timing/"));
        v
    };
    assert_eq!(
        again.iter().map(strip).collect::<Vec<_>>(),
        lines.iter().map(strip).collect::<Vec<_>>()
    );
    // The samples of steps 3 and 4 come back the same too.
    assert_eq!(
        std::fs::read_to_string(base.join("run/samples.jsonl")).unwrap(),
        samples_text
    );
    // An unknown key is an error naming the file.
    std::fs::write(&toml_path, format!("{toml}learning_rat = 1.0\n")).unwrap();
    let out = run(&[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("grpo.toml") && err.contains("learning_rat"), "{err}");
    let _ = std::fs::remove_dir_all(&base);
}

/// `aha grpo` with a `[lora]` table: the saves are PEFT adapters on the
/// base (which stays as it was), the KL runs against the base, and a
/// resume from an adapter checkpoint reproduces the run.
#[test]
fn grpo_with_lora_saves_adapters_and_resumes() {
    let base = std::env::temp_dir().join(format!("aha-grpo-lora-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let demo_cfg = aha_trainer::DemoConfig {
        pretrain_steps: 30,
        grpo_steps: 1,
        eval_problems: 4,
        prompts_per_step: 2,
        num_generations: 2,
        ..aha_trainer::DemoConfig::quick(5)
    };
    aha_trainer::run_demo(&demo_cfg, &base.join("demo"), &mut |_| {}).unwrap();
    let data = base.join("train.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"07+15=\", \"answer\": \"22\"}\n{\"prompt\": \"33+48=\", \"answer\": \"81\"}\n",
    )
    .unwrap();
    let toml_path = base.join("grpo.toml");
    let toml = format!(
        "model = {:?}\ndata = {:?}\nout = {:?}\nsteps = 3\nprompts_per_step = 2\nnum_generations = 4\nlearning_rate = 1e-2\n\
         beta = 0.04\nmax_completion_length = 20\ntemplate = \"none\"\nsave_every = 2\ndevice = \"cpu\"\n\
         rewards = [{{ name = \"cosine_length\", weight = 1.0 }}, {{ name = \"format\", weight = 1.0 }}]\n\n\
         [lora]\nr = 2\nalpha = 4\ntarget_modules = [\"q_proj\", \"o_proj\"]\nuse_rslora = true\n",
        base.join("demo/checkpoint"),
        data,
        base.join("run"),
    );
    std::fs::write(&toml_path, &toml).unwrap();
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_aha"))
            .arg("grpo")
            .arg("--config")
            .arg(&toml_path)
            .args(extra)
            .output()
            .expect("run aha")
    };
    let out = run(&[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let read = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(base.join("run/metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let lines = read();
    assert_eq!(lines.len(), 3);
    assert!(lines.iter().all(|l| l["kl"].as_f64().is_some_and(|k| k.is_finite())));
    let fin = base.join("run/final");
    assert!(fin.join("adapter_config.json").is_file() && !fin.join("model.safetensors").exists());
    assert!(!base.join("run/checkpoints/step-000002/reference").exists());
    let policy = aha_moe_model::Model::load(&fin).unwrap();
    let original = aha_moe_model::Model::load(&base.join("demo/checkpoint")).unwrap();
    let cfg = policy.layout.lora.clone().unwrap();
    assert!(cfg.use_rslora && cfg.r == 2);
    let mut moved = 0;
    for e in &policy.layout.entries {
        match original.layout.get(&e.name) {
            Some(o) => assert_eq!(e.slot.of(&policy.params), o.slot.of(&original.params), "{}", e.name),
            // B starts at zero: trained, it is not.
            None if e.name.ends_with("lora_B.weight") => {
                moved += e.slot.of(&policy.params).iter().any(|&x| x != 0.0) as usize
            }
            None => {}
        }
    }
    assert!(moved > 0);
    // The adapter folder alone generates (base from adapter_config.json,
    // tokenizer copied beside the adapter).
    let gen = Command::new(env!("CARGO_BIN_EXE_aha"))
        .arg("generate")
        .arg("--model")
        .arg(&fin)
        .arg("--prompts")
        .arg(&data)
        .args([
            "--n",
            "1",
            "--max-new-tokens",
            "4",
            "--template",
            "none",
            "--device",
            "cpu",
        ])
        .output()
        .expect("run aha");
    assert!(gen.status.success(), "{}", String::from_utf8_lossy(&gen.stderr));
    assert_eq!(String::from_utf8_lossy(&gen.stdout).lines().count(), 2);
    std::fs::write(base.join("run/checkpoints/latest"), "step-000002").unwrap();
    let out = run(&["--resume"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let strip = |v: &serde_json::Value| {
        let mut v = v.clone();
        v.as_object_mut().unwrap().retain(|k, _| !k.starts_with("timing/"));
        v
    };
    assert_eq!(
        read().iter().map(strip).collect::<Vec<_>>(),
        lines.iter().map(strip).collect::<Vec<_>>()
    );
    let _ = std::fs::remove_dir_all(&base);
}

/// A DeepSeek-V3 folder laid out as the real checkpoint is, at tiny size:
/// the FP8 fixture (e4m3 weights with 128x128 `weight_scale_inv` blocks,
/// YaRN `rope_parameters`, `num_nextn_predict_layers: 1`) as shard 1 of 2,
/// and shard 2 holding the multi-token-prediction layer (layer 2 of 2
/// decoder layers) in DeepSeek-V3's names and dtypes: bf16 norms,
/// embedding and head, FP8 projections with their scales, an f32 bias.
/// Returns the folder and the MTP tensors (name, dtype, shape, bytes).
type Raw = (String, safetensors::Dtype, Vec<usize>, Vec<u8>);
fn deepseek_v3_layout(dir: &std::path::Path) -> Vec<Raw> {
    use safetensors::Dtype;
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/deepseek-v3-fp8-tiny");
    std::fs::create_dir_all(dir).unwrap();
    for f in ["config.json", "tokenizer.json", "generation_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let shard1 = "model-00001-of-00002.safetensors";
    let shard2 = "model-00002-of-00002.safetensors";
    std::fs::copy(src.join("model.safetensors"), dir.join(shard1)).unwrap();
    // Deterministic bytes; e4m3 ones avoid the NaN codes (S.1111.111).
    let bytes = |n: usize, salt: usize, fp8: bool| -> Vec<u8> {
        (0..n)
            .map(|i| {
                let b = ((i * 131 + salt * 17) % 251) as u8;
                if fp8 && b & 0x7f == 0x7f {
                    b - 1
                } else {
                    b
                }
            })
            .collect()
    };
    let (c, v) = (128usize, 300usize);
    let p = "model.layers.2.";
    let mut mtp: Vec<Raw> = Vec::new();
    for (i, (name, dtype, shape)) in [
        ("enorm.weight", Dtype::BF16, vec![c]),
        ("hnorm.weight", Dtype::BF16, vec![c]),
        ("eh_proj.weight", Dtype::F8_E4M3, vec![c, 2 * c]),
        ("embed_tokens.weight", Dtype::BF16, vec![v, c]),
        ("shared_head.norm.weight", Dtype::BF16, vec![c]),
        ("shared_head.head.weight", Dtype::BF16, vec![v, c]),
        ("input_layernorm.weight", Dtype::BF16, vec![c]),
        ("self_attn.kv_a_proj_with_mqa.weight", Dtype::F8_E4M3, vec![80, c]),
        ("mlp.gate.e_score_correction_bias", Dtype::F32, vec![8]),
    ]
    .into_iter()
    .enumerate()
    {
        let n: usize = shape.iter().product::<usize>() * dtype.bitsize() / 8;
        mtp.push((
            format!("{p}{name}"),
            dtype,
            shape.clone(),
            bytes(n, i, dtype == Dtype::F8_E4M3),
        ));
        if dtype == Dtype::F8_E4M3 {
            let blocks = vec![shape[0].div_ceil(128), shape[1].div_ceil(128)];
            let scales: Vec<u8> = (0..blocks[0] * blocks[1])
                .flat_map(|k| (1e-3f32 * (k + 1) as f32).to_le_bytes())
                .collect();
            mtp.push((format!("{p}{name}_scale_inv"), Dtype::F32, blocks, scales));
        }
    }
    let views: Vec<_> = mtp
        .iter()
        .map(|(n, dt, sh, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*dt, sh.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join(shard2)).unwrap();
    let mut map = serde_json::Map::new();
    for (name, _) in aha_moe_model::st::read_header(&dir.join(shard1)).unwrap() {
        map.insert(name, shard1.into());
    }
    for (name, ..) in &mtp {
        map.insert(name.clone(), shard2.into());
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    mtp
}

/// One GRPO step on the DeepSeek-V3 layout, saved in f32: the trained
/// weights move, the MTP layer comes back unchanged (bf16 and f32 tensors
/// byte for byte, FP8 ones as exactly q x scale_inv since the saved
/// config has no quantization), `quantization_config` is gone and the
/// YaRN and MTP keys stay; the result loads again.
#[test]
fn grpo_step_on_the_deepseek_v3_layout_keeps_the_mtp_layer() {
    use safetensors::Dtype;
    let base = std::env::temp_dir().join(format!("aha-grpo-dsv3-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let model = base.join("model");
    let mtp = deepseek_v3_layout(&model);
    let before = aha_moe_model::Model::load(&model).unwrap();
    assert_eq!(before.config.num_layers, 2);
    let data = base.join("train.jsonl");
    std::fs::write(&data, "{\"prompt\": \"What is 2+3?\", \"answer\": \"5\"}\n").unwrap();
    // A scorer that rewards the length of each request line (so of each
    // completion): the group's advantages are not all zero and the step
    // moves the weights.
    let toml = format!(
        "model = {:?}\ndata = {:?}\nout = {:?}\nsteps = 1\nprompts_per_step = 1\nnum_generations = 4\n\
         max_completion_length = 8\ntemplate = \"none\"\nlearning_rate = 1e-2\ndevice = \"cpu\"\n\
         rewards = [{{ name = \"judge\", kind = \"command\", command = [\"sh\", \"-c\", \"while IFS= read -r l; do echo ${{#l}}; done\"] }}]\n",
        model,
        data,
        base.join("run")
    );
    std::fs::write(base.join("grpo.toml"), toml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_aha"))
        .arg("grpo")
        .arg("--config")
        .arg(base.join("grpo.toml"))
        .args(["--save-dtype", "f32"])
        .output()
        .expect("run aha");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let metrics: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(metrics["loss"].as_f64().is_some_and(f64::is_finite), "{metrics}");
    assert!(metrics["reward_std"].as_f64().is_some_and(|s| s > 0.0), "{metrics}");
    let fin = base.join("run/final");
    // config.json: no quantization, f32 named, YaRN and MTP kept.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fin.join("config.json")).unwrap()).unwrap();
    assert!(cfg.get("quantization_config").is_none(), "{cfg}");
    assert_eq!(cfg["dtype"], "float32");
    assert_eq!(cfg["num_nextn_predict_layers"], 1);
    assert_eq!(cfg["rope_parameters"]["rope_type"], "yarn");
    assert_eq!(cfg["rope_parameters"]["factor"], 40.0);
    // The MTP layer.
    let saved = aha_moe_model::params::checkpoint_index(&fin).unwrap();
    assert!(saved.keys().all(|k| !k.ends_with("_scale_inv")), "scales left behind");
    for (name, dtype, shape, bytes) in &mtp {
        if name.ends_with("_scale_inv") {
            continue;
        }
        let loc = &saved[name];
        assert_eq!(&loc.shape, shape, "{name}");
        let got = aha_moe_model::st::read_tensor(loc).unwrap();
        if *dtype == Dtype::F8_E4M3 {
            assert_eq!(loc.dtype, Dtype::F32, "{name}");
            let (_, _, _, sb) = mtp.iter().find(|t| t.0 == format!("{name}_scale_inv")).unwrap();
            let scales: Vec<f32> = sb
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            let sc = shape[1].div_ceil(128);
            for (i, (&q, w)) in bytes.iter().zip(got.chunks_exact(4)).enumerate() {
                let (r, c) = (i / shape[1], i % shape[1]);
                let want = aha_moe_model::st::f8_e4m3_to_f32(q) * scales[(r / 128) * sc + c / 128];
                assert_eq!(
                    f32::from_le_bytes(w.try_into().unwrap()).to_bits(),
                    want.to_bits(),
                    "{name}[{r}, {c}]"
                );
            }
        } else {
            assert_eq!(loc.dtype, *dtype, "{name}");
            assert_eq!(&got, bytes, "{name}: bytes changed");
        }
    }
    // The trained model: every parameter in f32, some moved, none of the
    // frozen correction biases; it loads again with the MTP layer skipped.
    let after = aha_moe_model::Model::load(&fin).unwrap();
    let mut moved = 0;
    for e in &before.layout.entries {
        let (a, b) = (e.slot.of(&before.params), e.slot.of(&after.params));
        assert_eq!(saved[&e.name].dtype, Dtype::F32, "{}", e.name);
        if e.trainable {
            moved += usize::from(a != b);
        } else {
            assert_eq!(a, b, "{} is frozen", e.name);
        }
    }
    assert!(moved > 0, "the GRPO step changed no weight");
    let _ = std::fs::remove_dir_all(&base);
}
