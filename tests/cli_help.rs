//! Every command of the binary answers `--help`, and `aha --help` lists
//! exactly the commands checked here.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

const COMMANDS: &[&str] = &[
    "demo",
    "info",
    "rewards",
    "merge-lora",
    "logprobs",
    "generate",
    "pipeline",
    "grpo",
    "sft",
    "rejection-sample",
    "distill",
    "eval",
    "plan",
    "launch",
    "nccl-check",
    "bench",
    "bench generate",
    "bench train",
];

fn help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_aha"))
        .args(args)
        .arg("--help")
        .output()
        .expect("run aha");
    assert!(
        out.status.success(),
        "aha {} --help: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// The command names in the `Commands:` section of a help text.
fn listed(text: &str) -> Vec<String> {
    text.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| c != "help")
        .collect()
}

#[test]
fn every_command_answers_help() {
    for c in COMMANDS {
        let args: Vec<&str> = c.split(' ').collect();
        let text = help(&args);
        assert!(text.contains(&format!("Usage: aha {c}")), "aha {c} --help:\n{text}");
        assert!(text.contains("--help"), "aha {c} --help:\n{text}");
    }
}

#[test]
fn the_top_level_help_lists_exactly_the_checked_commands() {
    let top: Vec<String> = COMMANDS
        .iter()
        .filter(|c| !c.contains(' '))
        .map(|c| c.to_string())
        .collect();
    assert_eq!(listed(&help(&[])), top);
    let bench: Vec<String> = COMMANDS
        .iter()
        .filter_map(|c| c.strip_prefix("bench "))
        .map(str::to_string)
        .collect();
    assert_eq!(listed(&help(&["bench"])), bench);
}

#[test]
fn grpo_and_sft_flags_keep_their_names() {
    // The flags that override TOML keys, by command (tests/sft_cli.rs and
    // tests/dist.rs run them).
    let grpo = help(&["grpo"]);
    for f in [
        "--config",
        "--model",
        "--data",
        "--out",
        "--steps",
        "--num-generations",
        "--prompts-per-step",
        "--learning-rate",
        "--max-completion-length",
        "--template",
        "--save-every",
        "--seed",
        "--dynamic-sampling",
        "--resume",
        "--save-dtype",
        "--device",
        "--precision",
    ] {
        assert!(grpo.contains(f), "aha grpo --help lacks {f}");
    }
    let sft = help(&["sft"]);
    for f in [
        "--config",
        "--model",
        "--data",
        "--out",
        "--template",
        "--steps",
        "--batch",
        "--lr",
        "--seed",
        "--save-dtype",
        "--save-every",
        "--sample-every",
        "--resume",
        "--device",
        "--precision",
    ] {
        assert!(sft.contains(f), "aha sft --help lacks {f}");
    }
}

fn refused(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_aha"))
        .args(args)
        .output()
        .expect("run aha");
    assert!(!out.status.success(), "aha {} succeeded", args.join(" "));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_flag_combinations_are_refused_before_any_work() {
    // The config does not exist: the refusal comes before it is read.
    let err = refused(&["bench", "train", "--config", "/nonexistent.json", "--lora-rank", "8"]);
    assert!(err.contains("--lora") && !err.contains("nonexistent"), "{err}");
    let err = refused(&[
        "bench",
        "train",
        "--config",
        "/nonexistent.json",
        "--offload-bucket",
        "8",
    ]);
    assert!(
        err.contains("--offload-optimizer") && !err.contains("nonexistent"),
        "{err}"
    );
    let err = refused(&[
        "generate",
        "--model",
        "/nonexistent",
        "--prompts",
        "p.jsonl",
        "--prompt-ids",
        "[[1]]",
    ]);
    assert!(err.contains("--prompt-ids") && !err.contains("No such file"), "{err}");
    // Without them, the same commands get as far as the missing file.
    let err = refused(&[
        "bench",
        "train",
        "--config",
        "/nonexistent.json",
        "--lora",
        "--lora-rank",
        "8",
    ]);
    assert!(err.contains("/nonexistent.json"), "{err}");
}
