#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `aha generate --template chat`: prompts rendered with the model folder's
//! chat template (a line's `messages`, or one user turn); a folder without a
//! template is an error that says so.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(p)
}

/// qwen2-tiny copied to a temp folder, with the Qwen2.5 chat template.
fn model_with_template(name: &str, with_template: bool) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("aha-cli-chat-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
    ] {
        std::fs::copy(fixture("models/qwen2-tiny").join(f), dir.join(f)).unwrap();
    }
    if with_template {
        std::fs::copy(
            fixture("chat_templates/qwen2.5-instruct.jinja"),
            dir.join("chat_template.jinja"),
        )
        .unwrap();
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"bos_token": null, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}"#,
        )
        .unwrap();
    }
    dir
}

fn generate(model: &Path, prompts: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_aha"))
        .arg("generate")
        .arg("--model")
        .arg(model)
        .arg("--prompts")
        .arg(prompts)
        .args([
            "--max-new-tokens",
            "4",
            "--seed",
            "3",
            "--template",
            "chat",
            "--device",
            "cpu",
        ])
        .output()
        .expect("run aha")
}

#[test]
fn generate_renders_the_model_chat_template() {
    let model = model_with_template("ok", true);
    let prompts = model.join("prompts.jsonl");
    std::fs::write(
        &prompts,
        concat!(
            "{\"prompt\": \"2+3\"}\n",
            "{\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"}, {\"role\": \"user\", \"content\": \"hi\"}]}\n",
        ),
    )
    .unwrap();
    let run = generate(&model, &prompts);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8(run.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["prompt_index"], 1);

    // `messages` must be an array; the error names the file and line.
    std::fs::write(&prompts, "{\"prompt\": \"ok\"}\n{\"messages\": \"hi\"}\n").unwrap();
    let run = generate(&model, &prompts);
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains(":2:") && err.contains("messages"), "{err}");
    let _ = std::fs::remove_dir_all(&model);
}

#[test]
fn generate_chat_without_a_template_says_so() {
    let model = model_with_template("none", false);
    let prompts = model.join("prompts.jsonl");
    std::fs::write(&prompts, "{\"prompt\": \"2+3\"}\n").unwrap();
    let run = generate(&model, &prompts);
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("chat_template"), "{err}");
    let _ = std::fs::remove_dir_all(&model);
}
