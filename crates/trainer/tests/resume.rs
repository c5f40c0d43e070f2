//! Exact resume: a run continued from any checkpoint ends with the same
//! metrics and bit-identical weights as the run that never stopped.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use aha_moe_model::Model;
use aha_trainer::{run_demo_with, DemoConfig, RunOptions};

fn tiny() -> DemoConfig {
    DemoConfig {
        pretrain_steps: 20,
        grpo_steps: 6,
        eval_every: 2,
        eval_problems: 20,
        prompts_per_step: 4,
        num_generations: 4,
        ..DemoConfig::quick(11)
    }
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("aha-resume-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// metrics.jsonl without timings and the summary (which holds wall time).
fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["phase"] != "summary")
        .map(|mut v| {
            v.as_object_mut().unwrap().retain(|k, _| !k.starts_with("timing/"));
            v
        })
        .collect()
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

#[test]
fn resuming_from_any_checkpoint_is_bit_identical() {
    let cfg = tiny();
    let straight = tmp("straight");
    let opts = RunOptions {
        resume: false,
        save_every: 3,
        ..RunOptions::default()
    };
    run_demo_with(&cfg, &straight, opts, &mut |_| {}).unwrap();
    let want = metrics(&straight);
    let want_w = Model::load(&straight.join("checkpoint")).unwrap().params;
    let mut names: Vec<String> = std::fs::read_dir(straight.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("pretrain-") || n.starts_with("grpo-"))
        .collect();
    names.sort();
    assert!(
        names.contains(&"pretrain-000003".to_string()) && names.contains(&"grpo-000003".to_string()),
        "{names:?}"
    );
    for name in ["pretrain-000009", "grpo-000003"] {
        // A copy of the finished run, rewound to `name`, then resumed.
        let d = tmp(name);
        copy_dir(&straight, &d);
        std::fs::write(d.join("checkpoints/latest"), name).unwrap();
        std::fs::remove_dir_all(d.join("checkpoint")).unwrap();
        run_demo_with(
            &cfg,
            &d,
            RunOptions {
                resume: true,
                save_every: 3,
                ..RunOptions::default()
            },
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(metrics(&d), want, "resumed from {name}: metrics differ");
        let got = Model::load(&d.join("checkpoint")).unwrap().params;
        assert!(
            got.iter().zip(&want_w).all(|(a, b)| a.to_bits() == b.to_bits()),
            "resumed from {name}: weights differ"
        );
        let _ = std::fs::remove_dir_all(&d);
    }
    // Resuming with another config is refused.
    let other = DemoConfig { grpo_lr: 1e-2, ..cfg };
    let e = run_demo_with(
        &other,
        &straight,
        RunOptions {
            resume: true,
            save_every: 3,
            ..RunOptions::default()
        },
        &mut |_| {},
    );
    assert!(e.is_err());
    let _ = std::fs::remove_dir_all(&straight);
}

/// A model loaded from a bf16 folder trains in f32; its checkpoints keep
/// those f32 weights exactly (not rounded to the source's bf16), and the
/// reference beside them too.
#[test]
fn checkpoints_of_a_bf16_model_keep_the_f32_weights() {
    use aha_moe_model::{Policy, Precision, SaveDtype, SaveOptions};
    use aha_trainer::checkpoint::{self, TrainState};
    use aha_trainer::optim::{OptimConfig, Optimizer, Schedule};
    let dir = tmp("bf16-source");
    let cfg = aha_moe_model::ModelConfig::from_json_str(
        &tiny().model_config_json().to_string(),
        Path::new("<demo model config>"),
    )
    .unwrap();
    let bf16 = dir.join("bf16");
    let opts = SaveOptions {
        dtype: SaveDtype::Bf16,
        ..SaveOptions::default()
    };
    Model::random(cfg, 3, 0.02).save_as(&bf16, &opts).unwrap();
    std::fs::write(bf16.join("config.json"), tiny().model_config_json().to_string()).unwrap();
    let mut m = Model::load(&bf16).unwrap();
    // As after an update: values bf16 cannot hold.
    for (i, p) in m.params.iter_mut().enumerate() {
        *p += 1e-4 * ((i % 7) as f32 + 0.5);
    }
    let want = m.params.clone();
    let policy = Policy::new(m.clone(), aha_tensor::Device::Cpu, Precision::F32).unwrap();
    let reference = Policy::new(m, aha_tensor::Device::Cpu, Precision::F32).unwrap();
    let opt = Optimizer::new(OptimConfig {
        lr: 1e-3,
        warmup_steps: 0,
        total_steps: 1,
        schedule: Schedule::Constant,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        max_bad_steps: 1,
    });
    let state = TrainState {
        phase: "grpo".into(),
        step: 1,
        rng: 0,
        opt_step: 1,
        opt_bad: 0,
        metrics_lines: 0,
        extra: serde_json::Value::Null,
        layout: 0,
    };
    let root = dir.join("ck");
    checkpoint::save(&root, "step-1", &state, &policy, Some(&reference), &opt).unwrap();
    let back = checkpoint::load_latest(&root).unwrap().unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&back.model.params), bits(&want));
    assert_eq!(bits(&back.reference.unwrap().params), bits(&want));
    let _ = std::fs::remove_dir_all(&dir);
}
