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
