//! The binary runs on a machine without a GPU and says so in its JSON.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::needless_range_loop)]

use std::process::Command;

#[test]
fn info_prints_one_json_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_aha"))
        .args(["info", "--device", "cpu"])
        .output()
        .expect("run aha");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).expect("utf-8");
    assert_eq!(text.lines().count(), 1, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert_eq!(v["device"], "cpu");
    assert!(v["kernel_files"].as_array().is_some_and(|a| !a.is_empty()));
    if v["gpus"].as_array().is_some_and(|a| a.is_empty()) {
        assert!(v["no_gpu_reason"].is_string());
    }
}

#[test]
fn a_bad_device_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_aha"))
        .args(["info", "--device", "tpu"])
        .output()
        .expect("run aha");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown device \"tpu\""), "{err}");
}

fn fixture(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path)
}

#[test]
fn logprobs_reproduces_transformers() {
    let out = std::env::temp_dir().join(format!("aha-cli-logprobs-{}.safetensors", std::process::id()));
    let model = fixture("models/qwen3-moe-tiny");
    let run = Command::new(env!("CARGO_BIN_EXE_aha"))
        .arg("logprobs")
        .arg("--model")
        .arg(&model)
        .arg("--input")
        .arg(model.join("reference.safetensors"))
        .arg("--out")
        .arg(&out)
        .args(["--device", "cpu"])
        .output()
        .expect("run aha");
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let got = aha_moe_model::st::read_file(&out).unwrap();
    let want = aha_moe_model::st::read_file(&model.join("reference.safetensors")).unwrap();
    for name in ["logits", "token_logprobs"] {
        let g = got.iter().find(|t| t.name == name).unwrap();
        let w = want.iter().find(|t| t.name == name).unwrap();
        assert_eq!(g.shape, w.shape, "{name}");
        let (g, w) = (g.data.to_f64_vec(), w.data.to_f64_vec());
        let d = g.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(d < 1e-4, "{name}: max |diff| {d}");
    }
    let _ = std::fs::remove_file(&out);

    // A JSON list input with ragged rows is refused with the row named.
    let bad = std::env::temp_dir().join(format!("aha-cli-ragged-{}.json", std::process::id()));
    std::fs::write(&bad, "[[1, 2, 3], [4, 5]]").unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_aha"))
        .arg("logprobs")
        .arg("--model")
        .arg(&model)
        .arg("--input")
        .arg(&bad)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run aha");
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("row 1 has 2 tokens"));
    let _ = std::fs::remove_file(&bad);
}

/// `aha merge-lora` folds the PEFT fixture's adapter into its base; the
/// merged folder, scored by `aha logprobs`, gives PEFT's logits.
#[test]
fn merge_lora_writes_a_model_that_scores_as_peft() {
    let dir = std::env::temp_dir().join(format!("aha-cli-merge-lora-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let adapter = fixture("models/qwen2-tiny-lora");
    let run = Command::new(env!("CARGO_BIN_EXE_aha"))
        .arg("merge-lora")
        .arg("--model")
        .arg(fixture("models/qwen2-tiny"))
        .arg("--adapter")
        .arg(&adapter)
        .arg("--out")
        .arg(dir.join("merged"))
        .output()
        .expect("run aha");
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let line: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(line["adapted_linears"], 4);
    assert_eq!(line["scale"], 2.0);
    assert!(dir.join("merged/config.json").is_file() && dir.join("merged/tokenizer.json").is_file());
    assert!(!dir.join("merged/adapter_config.json").exists());
    let out = dir.join("logprobs.safetensors");
    let run = Command::new(env!("CARGO_BIN_EXE_aha"))
        .arg("logprobs")
        .arg("--model")
        .arg(dir.join("merged"))
        .arg("--input")
        .arg(adapter.join("reference.safetensors"))
        .arg("--out")
        .arg(&out)
        .args(["--device", "cpu"])
        .output()
        .expect("run aha");
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let got = aha_moe_model::st::read_file(&out).unwrap();
    let want = aha_moe_model::st::read_file(&adapter.join("reference.safetensors")).unwrap();
    for name in ["logits", "token_logprobs"] {
        let g = got.iter().find(|t| t.name == name).unwrap().data.to_f64_vec();
        let w = want.iter().find(|t| t.name == name).unwrap().data.to_f64_vec();
        let d = g.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(d < 1e-4, "{name}: max |diff| {d}");
    }
    // An adapter whose targets the base lacks (MLA has no q_proj or v_proj
    // here) is an error naming the adapter's config.
    let run = Command::new(env!("CARGO_BIN_EXE_aha"))
        .arg("merge-lora")
        .arg("--model")
        .arg(fixture("models/deepseek-v3-yarn-tiny"))
        .arg("--adapter")
        .arg(&adapter)
        .arg("--out")
        .arg(dir.join("bad"))
        .output()
        .expect("run aha");
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("adapter_config.json") && err.contains("match no linear"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bench_train_prints_one_json_line() {
    let run = Command::new(env!("CARGO_BIN_EXE_aha"))
        .args([
            "bench", "train", "--batch", "2", "--seq", "16", "--steps", "2", "--config",
        ])
        .arg(fixture("models/deepseek-v3-tiny/config.json"))
        .output()
        .expect("run aha");
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let v: serde_json::Value = serde_json::from_slice(&run.stdout).expect("one JSON line");
    assert!(v["tokens_per_s"].as_f64().is_some_and(|x| x > 0.0));
    assert!(v["gflops"].as_f64().is_some_and(|x| x > 0.0));
    // Two AdamW steps at lr 1e-3 lower the loss on a fixed batch.
    assert!(v["loss_last"].as_f64().unwrap() < v["loss_first"].as_f64().unwrap());
}

#[test]
fn generate_writes_one_json_line_per_completion() {
    let model = fixture("models/qwen2-tiny");
    let prompts = std::env::temp_dir().join(format!("aha-cli-prompts-{}.jsonl", std::process::id()));
    std::fs::write(&prompts, "{\"prompt\": \"2+3\"}\n{\"question\": \"why?\"}\n").unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_aha"))
        .arg("generate")
        .arg("--model")
        .arg(&model)
        .arg("--prompts")
        .arg(&prompts)
        .args([
            "--n",
            "3",
            "--max-new-tokens",
            "6",
            "--seed",
            "9",
            "--template",
            "none",
            "--device",
            "cpu",
        ])
        .output()
        .expect("run aha");
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8(run.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["prompt_index"], i / 3);
        assert_eq!(l["sample_index"], i % 3);
        let n = l["token_ids"].as_array().unwrap().len();
        assert!((1..=6).contains(&n));
        assert_eq!(l["logprobs"].as_array().unwrap().len(), n);
        assert!(l["text"].is_string() && l["finish_reason"].is_string());
        // The prompt as rendered (template none: as written) and its ids.
        assert_eq!(l["prompt_text"], ["2+3", "why?"][i / 3]);
        assert!(!l["prompt_ids"].as_array().unwrap().is_empty());
    }
    // A malformed prompt line is an error naming the file and line.
    std::fs::write(&prompts, "{\"prompt\": \"ok\"}\n{\"prompt\": 5}\n").unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_aha"))
        .arg("generate")
        .arg("--model")
        .arg(&model)
        .arg("--prompts")
        .arg(&prompts)
        .output()
        .expect("run aha");
    assert!(!run.status.success());
    assert!(
        String::from_utf8_lossy(&run.stderr).contains(":2:"),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let _ = std::fs::remove_file(&prompts);
}

#[test]
fn eval_reports_pass_at_k_on_a_public_set() {
    // GSM8K's field names, with questions short enough for the tiny model's
    // 256 positions (its byte-level tokenizer has only 300 tokens).
    let data = std::env::temp_dir().join(format!("aha-cli-eval-{}.jsonl", std::process::id()));
    std::fs::write(
        &data,
        "{\"question\": \"1+1?\", \"answer\": \"so 2\\n#### 2\"}\n{\"question\": \"2*3?\", \"answer\": \"#### 6\"}\n{\"question\": \"9-4?\", \"answer\": \"#### 5\"}\n",
    )
    .unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_aha"))
        .arg("eval")
        .arg("--model")
        .arg(fixture("models/qwen2-tiny"))
        .arg("--data")
        .arg(&data)
        .args([
            "--k",
            "2",
            "--limit",
            "3",
            "--max-new-tokens",
            "4",
            "--template",
            "none",
        ])
        .output()
        .expect("run aha");
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let v: serde_json::Value = serde_json::from_slice(&run.stdout).expect("one JSON line");
    assert_eq!(v["problems"], 3);
    assert_eq!(v["k"], 2);
    for key in ["pass_at_1", "pass_at_k", "cons_at_k", "no_answer", "mean_length"] {
        let x = v[key].as_f64().unwrap_or(-1.0);
        assert!((0.0..=4.0).contains(&x), "{key} = {x}");
    }
    // pass@j for every j <= k: pass@1 and pass@k as above, never falling.
    let at = |j: &str| v["pass_at"][j].as_f64().unwrap_or(-1.0);
    assert!((at("1") - v["pass_at_1"].as_f64().unwrap_or(9.0)).abs() < 1e-9);
    assert!((at("2") - v["pass_at_k"].as_f64().unwrap_or(9.0)).abs() < 1e-9);
    assert!(at("1") <= at("2") + 1e-12);
    let _ = std::fs::remove_file(&data);
}

#[test]
fn logprobs_on_cuda_runs_every_architecture() {
    let run = |model: &str, out: &std::path::Path| {
        let m = fixture(model);
        Command::new(env!("CARGO_BIN_EXE_aha"))
            .arg("logprobs")
            .arg("--model")
            .arg(&m)
            .arg("--input")
            .arg(m.join("reference.safetensors"))
            .arg("--out")
            .arg(out)
            .args(["--device", "cuda"])
            .output()
            .expect("run aha")
    };
    let out = std::env::temp_dir().join(format!("aha-cli-logprobs-cuda-{}.safetensors", std::process::id()));
    // A dense model: on a GPU it reproduces transformers; without one, a clear error.
    let r = run("models/qwen2-tiny", &out);
    if aha_cuda_kernels::device_count() == 0 {
        eprintln!("logprobs_on_cuda: skipped the GPU run: no GPU");
        assert!(!r.status.success());
        assert!(String::from_utf8_lossy(&r.stderr).contains("no GPU"));
        return;
    }
    // Qwen3-MoE (the GPU MoE layer, f32 experts) and DeepSeek-V3 (MLA,
    // sigmoid routing, shared expert) reproduce transformers' log-probs.
    for model in ["models/qwen3-moe-tiny", "models/deepseek-v3-tiny"] {
        let r = run(model, &out);
        assert!(r.status.success(), "{model}: {}", String::from_utf8_lossy(&r.stderr));
        let got = aha_moe_model::st::read_file(&out).unwrap();
        let want = aha_moe_model::st::read_file(&fixture(model).join("reference.safetensors")).unwrap();
        let lp = |ts: &[aha_moe_model::st::NamedTensor]| {
            ts.iter()
                .find(|t| t.name == "token_logprobs")
                .unwrap()
                .data
                .to_f64_vec()
        };
        let d = lp(&got)
            .iter()
            .zip(&lp(&want))
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        eprintln!("logprobs {model} on cuda: max |diff| to transformers {d:.2e} nats");
        assert!(d < 1e-4, "{model}: token_logprobs on the GPU: max |diff| {d}");
    }
    let r = run("models/qwen2-tiny", &out);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let got = aha_moe_model::st::read_file(&out).unwrap();
    let want = aha_moe_model::st::read_file(&fixture("models/qwen2-tiny").join("reference.safetensors")).unwrap();
    for name in ["logits", "token_logprobs"] {
        let g = got.iter().find(|t| t.name == name).unwrap();
        let w = want.iter().find(|t| t.name == name).unwrap();
        let (g, w) = (g.data.to_f64_vec(), w.data.to_f64_vec());
        let d = g.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(d < 1e-4, "{name} on the GPU: max |diff| {d}");
    }
    // --precision bf16: bf16 products, flash attention and lm head, within
    // 0.1 nats of transformers' log-probs.
    let m = fixture("models/qwen2-tiny");
    let r = Command::new(env!("CARGO_BIN_EXE_aha"))
        .args(["logprobs", "--device", "cuda", "--precision", "bf16", "--model"])
        .arg(&m)
        .arg("--input")
        .arg(m.join("reference.safetensors"))
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run aha");
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let got = aha_moe_model::st::read_file(&out).unwrap();
    let g = got
        .iter()
        .find(|t| t.name == "token_logprobs")
        .unwrap()
        .data
        .to_f64_vec();
    let w = want
        .iter()
        .find(|t| t.name == "token_logprobs")
        .unwrap()
        .data
        .to_f64_vec();
    let d = g.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    let mean = g.iter().zip(&w).map(|(a, b)| (a - b).abs()).sum::<f64>() / w.len().max(1) as f64;
    eprintln!("logprobs --precision bf16: |diff| to transformers max {d:.4}, mean {mean:.4} nats");
    // bf16 rounding of every weight and activation product of this random
    // tiny model: measured max 0.113, on the emulated GPU; the bounds leave
    // 2x, and a wrong attention or head would be off by nats.
    assert!(
        d < 0.25 && mean < 0.05,
        "bf16 token_logprobs: max |diff| {d}, mean {mean}"
    );
    let _ = std::fs::remove_file(&out);
}

#[test]
fn bf16_precision_is_refused_on_the_cpu_and_unknown_precisions_named() {
    let m = fixture("models/qwen2-tiny");
    let out = std::env::temp_dir().join(format!("aha-cli-precision-{}.safetensors", std::process::id()));
    for (precision, why) in [("bf16", "GPU only"), ("fp8", "expected f32 or bf16")] {
        let r = Command::new(env!("CARGO_BIN_EXE_aha"))
            .args(["logprobs", "--device", "cpu", "--precision", precision, "--model"])
            .arg(&m)
            .arg("--input")
            .arg(m.join("reference.safetensors"))
            .arg("--out")
            .arg(&out)
            .output()
            .expect("run aha");
        assert!(!r.status.success());
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(err.contains(why), "{precision}: {err}");
    }
}

#[test]
fn generate_on_cuda_matches_the_cpu_greedy_or_says_no_gpu() {
    let run = |model: &str, device: &str| {
        Command::new(env!("CARGO_BIN_EXE_aha"))
            .arg("generate")
            .arg("--model")
            .arg(fixture(model))
            .args([
                "--prompt-ids",
                "[[5, 6, 7, 8], [9, 10]]",
                "--greedy",
                "--max-new-tokens",
                "8",
            ])
            .args(["--device", device])
            .output()
            .expect("run aha")
    };
    let gpu = run("models/qwen2-tiny", "cuda");
    if aha_cuda_kernels::device_count() == 0 {
        eprintln!("generate_on_cuda: skipped the GPU run: no GPU");
        assert!(!gpu.status.success());
        assert!(String::from_utf8_lossy(&gpu.stderr).contains("no GPU"));
        return;
    }
    let ids = |o: &std::process::Output| -> Vec<serde_json::Value> {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["token_ids"].clone())
            .collect()
    };
    for model in ["models/qwen2-tiny", "models/deepseek-v3-tiny"] {
        let gpu = run(model, "cuda");
        let cpu = run(model, "cpu");
        assert!(
            gpu.status.success(),
            "{model}: {}",
            String::from_utf8_lossy(&gpu.stderr)
        );
        assert!(cpu.status.success());
        assert_eq!(ids(&gpu), ids(&cpu), "{model}: greedy tokens on the GPU and the CPU");
    }
}

#[test]
fn training_commands_resolve_device_and_precision_once_with_clear_errors() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_aha"))
            .args(args)
            .output()
            .expect("run aha")
    };
    let model = fixture("models/qwen2-tiny");
    let m = model.to_str().unwrap();
    // No such GPU: the error names the device.
    let r = run(&[
        "sft",
        "--model",
        m,
        "--data",
        "x.jsonl",
        "--out",
        "/tmp/never",
        "--device",
        "cuda:7",
    ]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("cuda:7"), "{err}");
    // bf16 is a GPU precision.
    let r = run(&["demo", "--quick", "--device", "cpu", "--precision", "bf16"]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("bf16 runs on a GPU only"), "{err}");
    // Unknown values are refused by name.
    for (flag, bad) in [("--device", "tpu"), ("--precision", "fp8")] {
        let r = run(&["eval", "--model", m, "--data", "x.jsonl", flag, bad]);
        assert!(!r.status.success());
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(err.contains(bad), "{flag} {bad}: {err}");
    }
}
