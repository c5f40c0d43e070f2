//! `aha sft`, `aha rejection-sample` and `aha distill` end to end on the toy
//! task: a teacher learns formatted traces by SFT from scratch, its samples
//! are filtered by correctness and format, and a smaller dense student is
//! distilled from it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

use aha_trainer::toy::{self, Rng, TaskSpec};

/// Runs aha; its one JSON line and its stderr (the progress lines).
fn aha(args: &[&str], paths: &[(&str, &Path)]) -> (serde_json::Value, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_aha"));
    c.args(args);
    for (flag, p) in paths {
        c.arg(flag).arg(p);
    }
    let out = c.output().expect("run aha");
    assert!(
        out.status.success(),
        "aha {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        serde_json::from_slice(&out.stdout).expect("one JSON line"),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn sft_rejection_sampling_and_distillation() {
    let base = std::env::temp_dir().join(format!("aha-sft-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let (t0, s0) = (base.join("teacher0"), base.join("student0"));
    for (dir, cfg) in [
        (&t0, aha_trainer::DemoConfig::quick(0).model_config_json()),
        (
            &s0,
            serde_json::json!({"model_type": "qwen2", "vocab_size": toy::vocab_size(), "hidden_size": 48,
                "intermediate_size": 144, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "max_position_embeddings": 96, "tie_word_embeddings": true, "eos_token_id": toy::EOS}),
        ),
    ] {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
        std::fs::write(dir.join("tokenizer.json"), toy::tokenizer_json()).unwrap();
    }
    let mut rng = Rng::new(4);
    let mut traces = String::new();
    for _ in 0..600 {
        let p = toy::problem(&mut rng, TaskSpec::default(), false);
        traces.push_str(&format!(
            "{}\n",
            serde_json::json!({"prompt": p.prompt(), "completion": p.reasoning()})
        ));
    }
    // One line in chat form too: its prompt goes through the template.
    std::fs::write(base.join("traces.jsonl"), &traces).unwrap();
    let mut probs = String::new();
    for _ in 0..40 {
        let p = toy::problem(&mut rng, TaskSpec::default(), false);
        probs.push_str(&format!(
            "{}\n",
            serde_json::json!({"prompt": p.prompt(), "answer": p.answer().to_string()})
        ));
    }
    std::fs::write(base.join("problems.jsonl"), &probs).unwrap();
    let mut many = String::new();
    for _ in 0..400 {
        let p = toy::problem(&mut rng, TaskSpec::default(), false);
        many.push_str(&format!(
            "{}\n",
            serde_json::json!({"question": p.prompt(), "answer": format!("#### {}", p.answer())})
        ));
    }
    std::fs::write(base.join("distill_train.jsonl"), &many).unwrap();
    let mut test = String::new();
    for p in toy::test_set(TaskSpec::default(), 25).iter() {
        test.push_str(&format!(
            "{}\n",
            serde_json::json!({"problem": p.prompt(), "answer": p.answer()})
        ));
    }
    std::fs::write(base.join("test.jsonl"), &test).unwrap();

    let teacher = base.join("teacher");
    // A TOML config, with a flag overriding one of its keys.
    let cfg = base.join("sft.toml");
    std::fs::write(
        &cfg,
        "template = \"none\"\nsteps = 5\nbatch = 32\nlearning_rate = 3e-3\nseed = 1\n",
    )
    .unwrap();
    let r = aha(
        &["sft", "--steps", "800"],
        &[
            ("--config", &cfg),
            ("--model", &t0),
            ("--data", &base.join("traces.jsonl")),
            ("--out", &teacher),
        ],
    );
    let (r, log) = r;
    assert!(r["loss"].as_f64().unwrap() < 0.2, "{r}");
    // Progress off a terminal: the plan, then a plain line a step.
    assert!(log.contains("sft: model on cpu"), "{log}");
    assert_eq!(log.lines().filter(|l| l.starts_with("step ")).count(), 800, "{log}");
    assert!(log.contains("step 800/800 sft loss"), "{log}");
    let resolved = std::fs::read_to_string(teacher.join("sft_config.toml")).unwrap();
    assert!(
        resolved.contains("steps = 800") && resolved.contains("seed = 1"),
        "{resolved}"
    );
    // Unknown keys are refused, naming the file.
    std::fs::write(base.join("bad.toml"), "stepz = 3\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_aha"))
        .args(["sft", "--config"])
        .arg(base.join("bad.toml"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("bad.toml") && err.contains("stepz"),
        "{err}"
    );
    let r = aha(
        &[
            "rejection-sample",
            "--template",
            "none",
            "--k",
            "2",
            "--max-new-tokens",
            "40",
        ],
        &[
            ("--model", &teacher),
            ("--data", &base.join("problems.jsonl")),
            ("--out", &base.join("rs.jsonl")),
        ],
    );
    let (r, log) = r;
    assert_eq!(r["sampled"], 80);
    // Sampling progress off a terminal: a line at each tenth, the last full.
    let bars: Vec<&str> = log.lines().filter(|l| l.starts_with("rejection-sample: [")).collect();
    assert!((1..=10).contains(&bars.len()), "{log}");
    assert!(bars.last().unwrap().contains("80/80 completions"), "{log}");
    assert!(r["kept"].as_u64().unwrap() >= 40, "{r}");
    let kept = std::fs::read_to_string(base.join("rs.jsonl")).unwrap();
    assert!(kept.lines().all(|l| l.contains("<think>") && l.contains("</answer>")));
    let r = aha(
        &[
            "distill",
            "--template",
            "none",
            "--k",
            "2",
            "--max-new-tokens",
            "40",
            "--steps",
            "1500",
            "--lr",
            "3e-3",
        ],
        &[
            ("--teacher", &teacher),
            ("--student", &s0),
            ("--train", &base.join("distill_train.jsonl")),
            ("--test", &base.join("test.jsonl")),
            ("--out", &base.join("distill")),
        ],
    );
    let (r, log) = r;
    eprintln!("{r}");
    assert!(
        log.contains("distill: kept") && log.contains("step 1500/1500 sft loss"),
        "{log}"
    );
    assert!(r["teacher"]["pass_at_1"].as_f64().unwrap() >= 0.5, "{r}");
    assert!(r["student"]["pass_at_1"].as_f64().unwrap() >= 0.3, "{r}");
    assert!(base.join("distill/student/model.safetensors").is_file());
    // A short distillation with checkpoints, stopped (rewound to its
    // step-8 checkpoint) and resumed: the same student, bit for bit, and the
    // same logs; the teacher's traces are not sampled again.
    let short = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "distill",
            "--template",
            "none",
            "--k",
            "2",
            "--max-new-tokens",
            "40",
            "--steps",
            "12",
            "--lr",
            "3e-3",
            "--save-every",
            "4",
            "--sample-every",
            "4",
        ];
        args.extend_from_slice(extra);
        let mut c = Command::new(env!("CARGO_BIN_EXE_aha"));
        c.args(&args)
            .arg("--teacher")
            .arg(&teacher)
            .arg("--student")
            .arg(&s0)
            .arg("--train")
            .arg(base.join("problems.jsonl"))
            .arg("--test")
            .arg(base.join("test.jsonl"))
            .arg("--out")
            .arg(out);
        c.output().unwrap()
    };
    let straight = base.join("distill-straight");
    let o = short(&straight, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in [
        "distill_config.json",
        "metrics.jsonl",
        "samples.jsonl",
        "plots/loss.png",
        "checkpoints/step-000008/state.json",
    ] {
        assert!(straight.join(f).is_file(), "{f} missing");
    }
    let samples = std::fs::read_to_string(straight.join("samples.jsonl")).unwrap();
    let steps: Vec<u64> = samples
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, [4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12]);
    // Traces carry answers: each sample is scored.
    assert!(samples
        .lines()
        .all(|l| l.contains("\"accuracy\"") && l.contains("\"format\"")));
    let resumed = base.join("distill-resumed");
    copy_dir(&straight, &resumed);
    std::fs::write(resumed.join("checkpoints/latest"), "step-000008").unwrap();
    std::fs::remove_dir_all(resumed.join("student")).unwrap();
    let o = short(&resumed, &["--resume"]);
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{log}");
    assert!(
        log.contains("resuming sft at step 8") && !log.contains("the teacher samples"),
        "{log}"
    );
    assert!(
        std::fs::read(resumed.join("student/model.safetensors")).unwrap()
            == std::fs::read(straight.join("student/model.safetensors")).unwrap(),
        "the resumed student differs"
    );
    for f in ["metrics.jsonl", "samples.jsonl"] {
        assert_eq!(
            std::fs::read_to_string(resumed.join(f)).unwrap(),
            std::fs::read_to_string(straight.join(f)).unwrap(),
            "{f}"
        );
    }
    let o = short(&resumed, &["--resume", "--seed", "5"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("distill_config.json") && err.contains("`seed`"),
        "{err}"
    );
    // A bad SFT line names file and line.
    std::fs::write(
        base.join("bad.jsonl"),
        "{\"prompt\": \"1+1=\", \"completion\": \"2\"}\n{\"prompt\": 3}\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_aha"))
        .args(["sft", "--template", "none", "--steps", "1"])
        .arg("--model")
        .arg(&t0)
        .arg("--data")
        .arg(base.join("bad.jsonl"))
        .arg("--out")
        .arg(base.join("x"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad.jsonl:2"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&base);
}

/// `aha sft` with a `[lora]` table: only the adapters train, the output
/// folder is a PEFT adapter (loadable on its base, which stays as it was),
/// and bad `[lora]` keys are refused by name.
#[test]
fn sft_with_a_lora_table_writes_a_peft_adapter() {
    use aha_moe_model::lora::is_adapter;
    let base = std::env::temp_dir().join(format!("aha-sft-lora-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let model_dir = base.join("base");
    let cfg = serde_json::json!({"model_type": "qwen2", "vocab_size": toy::vocab_size(), "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 96, "tie_word_embeddings": true, "eos_token_id": toy::EOS});
    let mcfg = aha_moe_model::ModelConfig::from_json_str(&cfg.to_string(), Path::new("c")).unwrap();
    let mut m = aha_moe_model::Model::random(mcfg, 3, 0.05);
    m.save(&model_dir, usize::MAX).unwrap();
    std::fs::write(model_dir.join("config.json"), cfg.to_string()).unwrap();
    std::fs::write(model_dir.join("tokenizer.json"), toy::tokenizer_json()).unwrap();
    m = aha_moe_model::Model::load(&model_dir).unwrap();
    let mut rng = Rng::new(5);
    let mut traces = String::new();
    for _ in 0..32 {
        let p = toy::problem(&mut rng, TaskSpec::default(), false);
        traces.push_str(&format!(
            "{}\n",
            serde_json::json!({"prompt": p.prompt(), "completion": p.reasoning()})
        ));
    }
    std::fs::write(base.join("traces.jsonl"), &traces).unwrap();
    let toml = base.join("lora.toml");
    std::fs::write(
        &toml,
        "template = \"none\"\nsteps = 3\nbatch = 8\nlearning_rate = 1e-2\ndevice = \"cpu\"\n\n[lora]\nr = 4\nalpha = 16\ntarget_modules = [\"q_proj\", \"v_proj\", \"down_proj\"]\n",
    )
    .unwrap();
    let out = base.join("out");
    aha(
        &["sft"],
        &[
            ("--config", &toml),
            ("--model", &model_dir),
            ("--data", &base.join("traces.jsonl")),
            ("--out", &out),
        ],
    );
    assert!(out.join("adapter_config.json").is_file() && out.join("adapter_model.safetensors").is_file());
    assert!(!out.join("model.safetensors").exists());
    let resolved = std::fs::read_to_string(out.join("sft_config.toml")).unwrap();
    assert!(resolved.contains("[lora]") && resolved.contains("r = 4"), "{resolved}");
    let adapted = aha_moe_model::Model::load(&out).unwrap();
    assert_eq!(adapted.layout.lora.as_ref().unwrap().scale(), 4.0);
    for e in &adapted.layout.entries {
        let v = e.slot.of(&adapted.params);
        match m.layout.get(&e.name) {
            Some(b) => assert_eq!(v, b.slot.of(&m.params), "{} moved", e.name),
            None => {
                assert!(is_adapter(e), "{}", e.name);
                // B starts at zero; trained, it is not.
                assert!(v.iter().any(|&x| x != 0.0), "{} did not train", e.name);
            }
        }
    }
    for (bad, needle) in [
        ("[lora]\nrank = 4\n", "rank"),
        ("[lora]\ndropout = 1.0\n", "dropout"),
        ("[lora]\ntarget_modules = [\"lm_head\"]\n", "match no linear"),
    ] {
        std::fs::write(
            &toml,
            format!("template = \"none\"\nsteps = 1\ndevice = \"cpu\"\n{bad}"),
        )
        .unwrap();
        let r = Command::new(env!("CARGO_BIN_EXE_aha"))
            .args(["sft", "--config"])
            .arg(&toml)
            .arg("--model")
            .arg(&model_dir)
            .arg("--data")
            .arg(base.join("traces.jsonl"))
            .arg("--out")
            .arg(base.join("bad"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success() && err.contains(needle), "{bad}: {err}");
    }
    let _ = std::fs::remove_dir_all(&base);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

/// `aha sft` writes a run folder (config, a metrics line a step, TensorBoard
/// events, samples with their rewards, plots, checkpoints); a run stopped at
/// a checkpoint (rewound to it) and resumed with `--resume` ends with the
/// same weights bit for bit and the same logs; a resume with another config
/// is refused naming the file and the key.
#[test]
fn sft_writes_a_run_folder_and_resumes_bit_identically() {
    let base = std::env::temp_dir().join(format!("aha-sft-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let model_dir = base.join("base");
    let cfg = serde_json::json!({"model_type": "qwen2", "vocab_size": toy::vocab_size(), "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 96, "tie_word_embeddings": true, "eos_token_id": toy::EOS});
    let mcfg = aha_moe_model::ModelConfig::from_json_str(&cfg.to_string(), Path::new("c")).unwrap();
    aha_moe_model::Model::random(mcfg, 3, 0.05)
        .save(&model_dir, usize::MAX)
        .unwrap();
    std::fs::write(model_dir.join("config.json"), cfg.to_string()).unwrap();
    std::fs::write(model_dir.join("tokenizer.json"), toy::tokenizer_json()).unwrap();
    let mut rng = Rng::new(6);
    let mut traces = String::new();
    for _ in 0..40 {
        let p = toy::problem(&mut rng, TaskSpec::default(), false);
        traces.push_str(&format!(
            "{}\n",
            serde_json::json!({"prompt": p.prompt(), "completion": p.reasoning(), "answer": p.answer()})
        ));
    }
    std::fs::write(base.join("traces.jsonl"), &traces).unwrap();
    let toml = base.join("sft.toml");
    std::fs::write(
        &toml,
        "template = \"none\"\nsteps = 12\nbatch = 8\nlearning_rate = 1e-2\ndevice = \"cpu\"\nsave_every = 4\nsample_every = 4\nsample_prompts = 3\nsample_max_tokens = 30\n",
    )
    .unwrap();
    let sft = |out: &Path, extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_aha"))
            .arg("sft")
            .args(extra)
            .arg("--config")
            .arg(&toml)
            .arg("--model")
            .arg(&model_dir)
            .arg("--data")
            .arg(base.join("traces.jsonl"))
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    let straight = base.join("straight");
    let o = sft(&straight, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let metrics = std::fs::read_to_string(straight.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 12);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["step"], i + 1);
        assert!(l["loss"].as_f64().unwrap().is_finite() && l["learning_rate"].as_f64().unwrap() > 0.0);
        assert_eq!(l["epoch"].as_f64().unwrap(), (i + 1) as f64 * 8.0 / 40.0);
        // The sampled completions' mean rewards on sampling steps.
        assert_eq!(l.get("samples/accuracy").is_some(), (i + 1) % 4 == 0, "{l}");
    }
    let samples: Vec<serde_json::Value> = std::fs::read_to_string(straight.join("samples.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(samples.len(), 9);
    for s in &samples {
        assert!(s["prompt"].as_str().unwrap().contains('+'), "{s}");
        assert!(s["completion"].is_string() && s["answer"].is_string(), "{s}");
        assert!([0.0, 1.0].contains(&s["format"].as_f64().unwrap()), "{s}");
        assert!(s["accuracy"].as_f64().is_some(), "{s}");
    }
    for f in [
        "sft_config.toml",
        "plots/loss.png",
        "plots/learning_rate.png",
        "model.safetensors",
    ] {
        assert!(straight.join(f).is_file(), "{f} missing");
    }
    assert!(std::fs::read_dir(&straight).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("events.out.tfevents.")));
    let mut ck: Vec<String> = std::fs::read_dir(straight.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    ck.sort();
    assert_eq!(ck, ["step-000004", "step-000008"]);
    for name in ["step-000004", "step-000008"] {
        let d = base.join(name);
        copy_dir(&straight, &d);
        std::fs::write(d.join("checkpoints/latest"), name).unwrap();
        std::fs::remove_file(d.join("model.safetensors")).unwrap();
        let o = sft(&d, &["--resume"]);
        let log = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{log}");
        let k: usize = name[5..].parse().unwrap();
        assert!(log.contains(&format!("resuming sft at step {k}")), "{log}");
        assert_eq!(log.lines().filter(|l| l.starts_with("step ")).count(), 12 - k, "{log}");
        assert!(
            std::fs::read(d.join("model.safetensors")).unwrap()
                == std::fs::read(straight.join("model.safetensors")).unwrap(),
            "resumed from {name}: the weights differ"
        );
        for f in ["metrics.jsonl", "samples.jsonl"] {
            assert_eq!(
                std::fs::read_to_string(d.join(f)).unwrap(),
                std::fs::read_to_string(straight.join(f)).unwrap(),
                "resumed from {name}: {f}"
            );
        }
    }
    // Another learning rate: refused, naming the file and the key.
    let o = sft(&base.join("step-000004"), &["--resume", "--lr", "0.02"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("sft_config.toml") && err.contains("learning_rate"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&base);
}

/// `offload_optimizer = true` in an `aha sft` TOML: the run's memory plan
/// reports the page-locked host memory and the saved weights equal those of
/// the same run with AdamW on the device.
#[test]
fn sft_with_an_offloaded_optimizer_on_the_gpu_matches_the_device_optimizer() {
    if aha_cuda_kernels::device_count() == 0 {
        eprintln!("sft_with_an_offloaded_optimizer_on_the_gpu_matches_the_device_optimizer: skipped: no GPU");
        return;
    }
    let base = std::env::temp_dir().join(format!("aha-sft-offload-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let model_dir = base.join("base");
    let cfg = serde_json::json!({"model_type": "qwen2", "vocab_size": toy::vocab_size(), "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 96, "tie_word_embeddings": true, "eos_token_id": toy::EOS});
    let mcfg = aha_moe_model::ModelConfig::from_json_str(&cfg.to_string(), Path::new("c")).unwrap();
    let m = aha_moe_model::Model::random(mcfg, 3, 0.05);
    m.save(&model_dir, usize::MAX).unwrap();
    std::fs::write(model_dir.join("config.json"), cfg.to_string()).unwrap();
    std::fs::write(model_dir.join("tokenizer.json"), toy::tokenizer_json()).unwrap();
    let mut rng = Rng::new(5);
    let mut traces = String::new();
    for _ in 0..8 {
        let p = toy::problem(&mut rng, TaskSpec::default(), false);
        traces.push_str(&format!(
            "{}\n",
            serde_json::json!({"prompt": p.prompt(), "completion": p.reasoning()})
        ));
    }
    std::fs::write(base.join("traces.jsonl"), &traces).unwrap();
    let run = |name: &str, offload: bool| {
        let toml = base.join(format!("{name}.toml"));
        std::fs::write(
            &toml,
            format!(
                "template = \"none\"\nsteps = 2\nbatch = 4\nlearning_rate = 1e-2\ndevice = \"cuda\"\nsave_dtype = \"f32\"\noffload_optimizer = {offload}\n"
            ),
        )
        .unwrap();
        let out = base.join(name);
        let (_, log) = aha(
            &["sft"],
            &[
                ("--config", &toml),
                ("--model", &model_dir),
                ("--data", &base.join("traces.jsonl")),
                ("--out", &out),
            ],
        );
        (aha_moe_model::Model::load(&out).unwrap().params, log)
    };
    let (dev, dev_log) = run("device", false);
    let (off, off_log) = run("offload", true);
    assert!(!dev_log.contains("page-locked"), "{dev_log}");
    assert!(off_log.contains("page-locked host memory"), "{off_log}");
    assert_ne!(dev, m.params, "the weights did not move");
    let scale = dev.iter().fold(0f32, |a, &x| a.max(x.abs()));
    let diff = dev.iter().zip(&off).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
    assert!(
        diff <= 1e-6 * scale,
        "offloaded weights differ by {diff} (scale {scale})"
    );
    let _ = std::fs::remove_dir_all(&base);
}
