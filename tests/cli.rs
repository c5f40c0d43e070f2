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
