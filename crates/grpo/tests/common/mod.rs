//! The TRL fixture (tests/fixtures/grpo/trl_grpo_cases.json, written by TRL
//! 1.16 in float64), parsed once for the tests that compare against it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use aha_grpo::{ImportanceSampling, LossConfig, LossType};
use serde_json::Value;

/// The fixture's JSON.
pub fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/grpo/trl_grpo_cases.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json")
}

/// A JSON array of numbers.
pub fn f64s(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

/// A JSON array of number arrays, flattened row by row.
pub fn flat(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().flat_map(f64s).collect()
}

/// The shared inputs of every case.
pub struct Inputs {
    /// Completions.
    pub b: usize,
    /// Padded completion length.
    pub t: usize,
    /// `[B, T]` completion mask.
    pub mask: Vec<bool>,
    /// `[B, T]` policy, old and reference log-probs.
    pub logp: Vec<f64>,
    /// See `logp`.
    pub old: Vec<f64>,
    /// See `logp`.
    pub refp: Vec<f64>,
}

/// The fixture's per-token inputs.
pub fn inputs(f: &Value) -> Inputs {
    let b = f["rewards"].as_array().unwrap().len();
    let t = f["max_completion_length"].as_u64().unwrap() as usize;
    let mask = f["completion_mask"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap() != 0)
                .collect::<Vec<_>>()
        })
        .collect();
    Inputs {
        b,
        t,
        mask,
        logp: flat(&f["per_token_logps"]),
        old: flat(&f["old_per_token_logps"]),
        refp: flat(&f["ref_per_token_logps"]),
    }
}

/// A case's loss configuration (completion length `t`).
pub fn config(case: &Value, t: usize) -> LossConfig {
    let c = &case["config"];
    LossConfig {
        loss_type: match c["loss_type"].as_str().unwrap() {
            "grpo" => LossType::Grpo,
            "bnpo" => LossType::Bnpo,
            "dr_grpo" => LossType::DrGrpo,
            "dapo" => LossType::Dapo,
            "cispo" => LossType::Cispo,
            other => panic!("unknown loss type {other}"),
        },
        epsilon: c["epsilon"].as_f64().unwrap(),
        epsilon_high: c["epsilon_high"].as_f64(),
        delta: c["delta"].as_f64(),
        beta: c["beta"].as_f64().unwrap(),
        importance_sampling_level: match c["importance_sampling_level"].as_str().unwrap() {
            "sequence" => ImportanceSampling::Sequence,
            _ => ImportanceSampling::Token,
        },
        max_completion_length: t,
        ..LossConfig::default()
    }
}
