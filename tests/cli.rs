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
    assert!(v["model"].is_null());
    // With a model folder: its weights are loaded and described.
    let out = Command::new(env!("CARGO_BIN_EXE_aha"))
        .args(["info", "--device", "cpu", "--model"])
        .arg(fixture("models/deepseek-v3-fp8-tiny"))
        .output()
        .expect("run aha");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let m = &v["model"];
    let want = aha_moe_model::Model::load(&fixture("models/deepseek-v3-fp8-tiny")).unwrap();
    assert_eq!(m["parameters"], want.params.len());
    assert_eq!(m["host_bytes"], want.params.len() * 4);
    assert_eq!(m["architecture"], "DeepseekV3");
    assert_eq!(m["dtypes_on_disk"], serde_json::json!(["F32", "F8_E4M3"]));
    // A folder that is not a model is an error naming it.
    let out = Command::new(env!("CARGO_BIN_EXE_aha"))
        .args(["info", "--device", "cpu", "--model", "/nonexistent-model"])
        .output()
        .expect("run aha");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent-model"));
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
fn bench_train_profile_rows_add_up_to_the_step() {
    let run = Command::new(env!("CARGO_BIN_EXE_aha"))
        .args([
            "bench",
            "train",
            "--batch",
            "2",
            "--seq",
            "16",
            "--steps",
            "2",
            "--device",
            "cpu",
            "--profile",
            "--config",
        ])
        .arg(fixture("models/deepseek-v3-tiny/config.json"))
        .output()
        .expect("run aha");
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let v: serde_json::Value = serde_json::from_slice(&run.stdout).expect("one JSON line");
    let rows = v["profile"].as_array().expect("profile rows");
    let ms = |r: &serde_json::Value| r["ms"].as_f64().unwrap();
    let (parts, step) = rows.split_at(rows.len() - 1);
    assert_eq!(step[0]["phase"], "step");
    let sum: f64 = parts.iter().map(ms).sum();
    assert!(
        (sum - ms(&step[0])).abs() <= 1e-6 * ms(&step[0]).max(1.0),
        "{sum} vs {}",
        ms(&step[0])
    );
    assert!(parts
        .iter()
        .any(|r| r["phase"] == "expert products" && r["gflop"].as_f64().unwrap() > 0.0));
    assert!(String::from_utf8_lossy(&run.stderr).contains("| lm head + log-softmax |"));
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
fn generate_reads_prompts_from_parquet() {
    // Two GSM8K-style rows (`question`, `answer`), as the hub stores sets.
    let prompts = fixture("datasets/missing_answer.parquet");
    let run = Command::new(env!("CARGO_BIN_EXE_aha"))
        .arg("generate")
        .arg("--model")
        .arg(fixture("models/qwen2-tiny"))
        .arg("--prompts")
        .arg(&prompts)
        .args(["--max-new-tokens", "2", "--template", "none", "--device", "cpu"])
        .output()
        .expect("run aha");
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let texts: Vec<String> = String::from_utf8(run.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["prompt_text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(texts, ["What is 2 + 3?", "What is 4 + 4?"]);
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
    // Sampling progress on stderr, the last line complete.
    let err = String::from_utf8_lossy(&run.stderr);
    let bars: Vec<&str> = err.lines().filter(|l| l.starts_with("eval: [")).collect();
    assert!(bars.last().is_some_and(|l| l.contains("6/6 completions")), "{err}");
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
fn bf16_precision_runs_on_the_cpu_and_unknown_precisions_are_named() {
    let m = fixture("models/qwen2-tiny");
    let out = std::env::temp_dir().join(format!("aha-cli-precision-{}.safetensors", std::process::id()));
    let logprobs = |precision: &str| {
        Command::new(env!("CARGO_BIN_EXE_aha"))
            .args(["logprobs", "--device", "cpu", "--precision", precision, "--model"])
            .arg(&m)
            .arg("--input")
            .arg(m.join("reference.safetensors"))
            .arg("--out")
            .arg(&out)
            .output()
            .expect("run aha")
    };
    let r = logprobs("fp8");
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("expected f32 or bf16"), "fp8: {err}");
    // bf16 products on the CPU: near transformers' f32 log-probs, and not
    // equal to aha's f32 ones (the products really ran in bf16).
    let token_logprobs = || {
        aha_moe_model::st::read_file(&out)
            .unwrap()
            .into_iter()
            .find(|t| t.name == "token_logprobs")
            .unwrap()
            .data
            .to_f64_vec()
    };
    let r = logprobs("f32");
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let f32_lp = token_logprobs();
    let r = logprobs("bf16");
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let bf16_lp = token_logprobs();
    let want = aha_moe_model::st::read_file(&m.join("reference.safetensors")).unwrap();
    let w = want
        .iter()
        .find(|t| t.name == "token_logprobs")
        .unwrap()
        .data
        .to_f64_vec();
    let worst = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    let (to_ref, to_f32) = (worst(&bf16_lp, &w), worst(&bf16_lp, &f32_lp));
    eprintln!("logprobs --device cpu --precision bf16: max |diff| to transformers {to_ref:.4}, to f32 {to_f32:.4}");
    assert!(to_ref < 0.25, "bf16 on the CPU: {to_ref} nats from transformers");
    assert!(to_f32 > 1e-6, "bf16 on the CPU gave the f32 log-probs");
    let _ = std::fs::remove_file(&out);
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
                // f32 keys and values: the CPU's tokens exactly (bf16 may
                // break a near-tie the other way).
                "--kv-dtype",
                "f32",
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
    // Unknown values are refused by name.
    for (flag, bad) in [("--device", "tpu"), ("--precision", "fp8")] {
        let r = run(&["eval", "--model", m, "--data", "x.jsonl", flag, bad]);
        assert!(!r.status.success());
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(err.contains(bad), "{flag} {bad}: {err}");
    }
}

#[test]
fn plan_prints_every_strategy_and_refuses_unknown_hardware() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_aha"))
            .args(args)
            .output()
            .expect("run aha")
    };
    let v3 = fixture("bench-configs/deepseek-v3.json");
    let v3 = v3.to_str().unwrap();
    let r = run(&[
        "plan",
        "--config",
        v3,
        "--gpus",
        "256",
        "--interconnect",
        "ib",
        "--json",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&r.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names: Vec<&str> = rows.iter().map(|r| r["strategy"].as_str().unwrap()).collect();
    assert_eq!(names, ["DP", "ZeRO-1", "EP + ZeRO-1", "offload", "LoRA r16"]);
    // 671B parameters, 37B active a token.
    assert!((rows[0]["params"].as_f64().unwrap() / 1e9 - 671.0).abs() < 0.5);
    assert!((rows[0]["active_params"].as_f64().unwrap() / 1e9 - 36.6).abs() < 0.5);
    // Expert parallelism divides the expert weights: the smallest footprint.
    let gb = |i: usize| rows[i]["device_gb"].as_f64().unwrap();
    assert!(gb(2) < gb(1) && gb(1) < gb(0));
    for (flag, bad) in [("--gpu", "v100"), ("--interconnect", "ethernet"), ("--gpus", "0")] {
        let r = run(&["plan", "--config", v3, flag, bad]);
        assert!(!r.status.success());
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(err.contains(flag), "{flag} {bad}: {err}");
    }
}

/// `aha rewards --kind model` input lines (a prompt and completions), and
/// each line's score by the library on the same tokens, one sequence per
/// forward: `prompt + completion` through the reward model's tokenizer
/// (qwen2-rm-tiny has no chat template) and `RewardModel::score_batch`,
/// whose scores are checked against transformers' in aha-moe-model's
/// `tests/reward_model.rs`.
fn reward_model_lines() -> (String, Vec<f64>) {
    let dir = fixture("models/qwen2-rm-tiny");
    let tok = aha_sampler::load_tokenizer(&dir).unwrap();
    let rm = aha_moe_model::RewardModel::load(&dir, aha_tensor::Device::Cpu, aha_moe_model::Precision::F32).unwrap();
    let pairs = [
        ("What is 7 + 5?", " <think>7 + 5 = 12</think><answer>12</answer>"),
        ("What is 7 + 5?", " 13"),
        (
            "Name a prime.",
            "<think>2 is prime.</think> <answer>2</answer><|endoftext|>",
        ),
        ("", "Just a completion, no prompt at all."),
        ("Long?", " yes, yes, yes, yes, yes, yes, yes, yes, yes, yes, yes."),
    ];
    let mut lines = String::new();
    let mut want = Vec::new();
    for (i, (prompt, completion)) in pairs.iter().enumerate() {
        let ids = tok
            .encode(format!("{prompt}{completion}"), false)
            .unwrap()
            .get_ids()
            .to_vec();
        want.push(rm.score_batch(&[&ids]).unwrap()[0] as f64);
        lines.push_str(&serde_json::json!({"id": i, "prompt": prompt, "completion": completion}).to_string());
        lines.push('\n');
    }
    // The one ending in the pad token (<|endoftext|>) is scored before it.
    assert_eq!(
        rm.score_position(tok.encode("a<|endoftext|>", false).unwrap().get_ids()),
        0
    );
    (lines, want)
}

fn rewards_model_run(device: &str, input: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_aha"))
        .args(["rewards", "--kind", "model", "--model"])
        .arg(fixture("models/qwen2-rm-tiny"))
        .args(["--device", device, "--batch-size", "2", "--input"])
        .arg(input)
        .output()
        .expect("run aha")
}

fn check_rewards_model(device: &str) {
    let (lines, want) = reward_model_lines();
    let input = std::env::temp_dir().join(format!("aha-cli-rm-{device}-{}.jsonl", std::process::id()));
    std::fs::write(&input, lines).unwrap();
    let out = rewards_model_run(device, &input);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), want.len());
    for (i, (row, w)) in rows.iter().zip(&want).enumerate() {
        assert_eq!(row["id"], i);
        let got = row["reward"].as_f64().unwrap();
        eprintln!("aha rewards --kind model on {device}: row {i}: {got} (alone on the CPU: {w})");
        assert!((got - w).abs() <= 1e-4, "row {i}: {got} vs {w} alone on the CPU");
        assert_eq!(row["status"], if *w > 0.0 { "correct" } else { "wrong" });
    }
    let _ = std::fs::remove_file(&input);
}

#[test]
fn rewards_kind_model_scores_prompt_and_completion_in_batches() {
    check_rewards_model("cpu");
    // Without --model, and with a folder that is not a reward model: clear errors.
    let input = std::env::temp_dir().join(format!("aha-cli-rm-bad-{}.jsonl", std::process::id()));
    std::fs::write(&input, "{\"prompt\": \"a\", \"completion\": \"b\"}\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_aha"))
        .args(["rewards", "--kind", "model", "--input"])
        .arg(&input)
        .output()
        .expect("run aha");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--model"));
    let out = Command::new(env!("CARGO_BIN_EXE_aha"))
        .args(["rewards", "--kind", "model", "--device", "cpu", "--model"])
        .arg(fixture("models/qwen2-tiny"))
        .arg("--input")
        .arg(&input)
        .output()
        .expect("run aha");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("config.json") && err.contains("Qwen2ForCausalLM"), "{err}");
    let _ = std::fs::remove_file(&input);
}

#[test]
fn rewards_kind_model_on_cuda_matches_the_cpu() {
    if aha_cuda_kernels::device_count() == 0 {
        eprintln!("rewards_kind_model_on_cuda: skipped: no GPU (checked that --device cuda is refused instead)");
        let input = std::env::temp_dir().join(format!("aha-cli-rm-nogpu-{}.jsonl", std::process::id()));
        std::fs::write(&input, "{\"prompt\": \"a\", \"completion\": \"b\"}\n").unwrap();
        let out = rewards_model_run("cuda", &input);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--device") && err.contains("GPU"), "{err}");
        let _ = std::fs::remove_file(&input);
        return;
    }
    check_rewards_model("cuda");
}

/// The dtype of every tensor of a saved folder's safetensors files.
fn saved_dtypes(dir: &std::path::Path) -> std::collections::BTreeSet<String> {
    aha_moe_model::params::checkpoint_index(dir)
        .unwrap()
        .values()
        .map(|l| format!("{:?}", l.dtype))
        .collect()
}

#[test]
fn sft_saves_in_the_input_dtype_unless_told_otherwise() {
    let base = std::env::temp_dir().join(format!("aha-cli-save-dtype-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    // qwen2-tiny in bf16, as a Hugging Face hub checkpoint usually is.
    let src = aha_moe_model::Model::load(&fixture("models/qwen2-tiny")).unwrap();
    let bf16 = base.join("bf16");
    src.save_as(
        &bf16,
        &aha_moe_model::SaveOptions {
            dtype: aha_moe_model::SaveDtype::Bf16,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(saved_dtypes(&bf16), ["BF16".to_string()].into());
    let data = base.join("sft.jsonl");
    std::fs::write(&data, "{\"prompt\": \"1+2=\", \"completion\": \"3\"}\n").unwrap();
    let sft = |out: &str, extra: &[&str]| {
        let r = Command::new(env!("CARGO_BIN_EXE_aha"))
            .args([
                "sft",
                "--steps",
                "1",
                "--batch",
                "1",
                "--template",
                "none",
                "--device",
                "cpu",
            ])
            .arg("--model")
            .arg(&bf16)
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(base.join(out))
            .args(extra)
            .output()
            .unwrap();
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        base.join(out)
    };
    let same = sft("same", &[]);
    assert_eq!(saved_dtypes(&same), ["BF16".to_string()].into());
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(same.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["dtype"], "bfloat16");
    let f32 = sft("f32", &["--save-dtype", "f32"]);
    assert_eq!(saved_dtypes(&f32), ["F32".to_string()].into());
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(f32.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["dtype"], "float32");
    // The f32 save holds exactly the weights the bf16 save rounds.
    let (a, b) = (
        aha_moe_model::Model::load(&same).unwrap(),
        aha_moe_model::Model::load(&f32).unwrap(),
    );
    let to_bf16 = |y: f32| {
        let u = y.to_bits();
        f32::from_bits((u + 0x7fff + ((u >> 16) & 1)) >> 16 << 16)
    };
    assert!(a.params.iter().zip(&b.params).all(|(x, y)| *x == to_bf16(*y)));
    // An unknown dtype is refused by name.
    let r = Command::new(env!("CARGO_BIN_EXE_aha"))
        .args(["sft", "--save-dtype", "fp8"])
        .output()
        .unwrap();
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("fp8"));
    let _ = std::fs::remove_dir_all(&base);
}

/// `aha bench generate`: every sequence decodes all its new tokens, and the
/// line carries the bytes a decode step reads (weights in the products'
/// precision, plus keys and values at the mean context) and, on a GPU of
/// known bandwidth, the bound and the measured fraction of it.
fn bench_generate(device: &str) -> serde_json::Value {
    let cfg = fixture("models/qwen2-tiny/config.json");
    let out = Command::new(env!("CARGO_BIN_EXE_aha"))
        .args([
            "bench", "generate", "--batch", "3", "--prompt", "5", "--new", "4", "--device", device, "--config",
        ])
        .arg(&cfg)
        .output()
        .expect("run aha");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["steps"], 4);
    assert!(v["tokens_per_s"].as_f64().unwrap() > 0.0);
    let c = aha_moe_model::ModelConfig::from_path(&cfg).unwrap();
    let params = aha_moe_model::Layout::new(&c).size as f64;
    let kv_bf16 = aha_moe_model::plan::kv_bytes_per_token(&c) as f64;
    let kv = if device == "cpu" { 2.0 * kv_bf16 } else { kv_bf16 };
    let want = 4.0 * params + 3.0 * (5.0 + 2.0) * kv;
    assert_eq!(v["decode_step_bytes"].as_f64().unwrap(), want, "{v}");
    v
}

#[test]
fn bench_generate_reports_the_bytes_of_a_decode_step() {
    let v = bench_generate("cpu");
    assert!(v["bound_fraction"].is_null(), "no bandwidth figure for a CPU: {v}");
}

#[test]
fn bench_generate_on_the_gpu() {
    if aha_cuda_kernels::device_count() == 0 {
        eprintln!("bench_generate_on_the_gpu: skipped: no GPU");
        return;
    }
    let v = bench_generate("cuda");
    // The emulated GPU has no bandwidth figure; a real H100/H200/A100 does.
    if let Some(f) = v["bound_fraction"].as_f64() {
        assert!(f > 0.0 && f < 1.5, "{v}");
    }
}

fn bench_train_cuda(extra: &[&str]) -> serde_json::Value {
    let run = Command::new(env!("CARGO_BIN_EXE_aha"))
        .args([
            "bench", "train", "--device", "cuda", "--batch", "2", "--seq", "8", "--steps", "2", "--warmup", "0",
        ])
        .args(extra)
        .arg("--config")
        .arg(fixture("models/qwen2-tiny/config.json"))
        .output()
        .expect("run aha");
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    serde_json::from_slice(&run.stdout).expect("one JSON line")
}

#[test]
fn bench_train_offloads_the_optimizer_and_trains_lora_on_the_gpu() {
    if aha_cuda_kernels::device_count() == 0 {
        eprintln!("bench_train_offloads_the_optimizer_and_trains_lora_on_the_gpu: skipped: no GPU");
        return;
    }
    let dev = bench_train_cuda(&[]);
    let off = bench_train_cuda(&["--offload-optimizer", "--offload-bucket", "4096"]);
    assert!(dev["offload"].is_null(), "{dev}");
    let o = &off["offload"];
    for k in ["copy_ms", "cpu_adamw_ms", "exposed_ms", "grad_norm_ms", "step_ms"] {
        assert!(o[k].as_f64().is_some_and(|x| x >= 0.0), "{k}: {off}");
    }
    assert!(o["cpu_adamw_ms"].as_f64().is_some_and(|x| x > 0.0), "{off}");
    assert!(
        o["overlap_fraction"].as_f64().is_some_and(|x| (0.0..=1.0).contains(&x)),
        "{off}"
    );
    // The host AdamW is the device's: the same losses step after step.
    let (a, b) = (dev["loss_last"].as_f64().unwrap(), off["loss_last"].as_f64().unwrap());
    assert!(
        (a - b).abs() <= 1e-6 * a.abs(),
        "loss {a} on the device optimizer, {b} offloaded"
    );
    assert!(off["tokens_per_s"].as_f64().is_some_and(|x| x > 0.0));
    // The gradients go to the host during the backward by default; copied
    // after it, the same losses, and the split has no streamed copies.
    assert_eq!(o["streamed_grads"].as_bool(), Some(true), "{off}");
    for k in ["copy_during_backward_ms", "copy_wait_after_backward_ms", "upload_ms"] {
        assert!(o[k].as_f64().is_some_and(|x| x >= 0.0), "{k}: {off}");
    }
    assert!(o["copy_during_backward_ms"].as_f64().is_some_and(|x| x > 0.0), "{off}");
    let after = bench_train_cuda(&["--offload-optimizer", "--offload-bucket", "4096", "--no-stream-grads"]);
    assert_eq!(after["offload"]["streamed_grads"].as_bool(), Some(false), "{after}");
    assert_eq!(
        after["offload"]["copy_during_backward_ms"].as_f64(),
        Some(0.0),
        "{after}"
    );
    assert_eq!(
        after["loss_last"], off["loss_last"],
        "streamed vs copied after the backward"
    );
    let lora = bench_train_cuda(&["--lora", "--lora-rank", "4"]);
    let (t, p) = (
        lora["trainable_params"].as_u64().unwrap(),
        lora["params"].as_u64().unwrap(),
    );
    assert!(t > 0 && t * 10 < p, "LoRA trains {t} of {p} parameters");
    assert_eq!(lora["lora_rank"].as_u64(), Some(4));
}
