//! A kill at any moment, a checkpoint save included, leaves the latest
//! checkpoint loadable; resuming then finishes the run exactly as if it had
//! never stopped.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("aha-kill-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn demo(cfg: &Path, out: &Path, resume: bool) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_aha"));
    c.arg("demo")
        .arg("--config")
        .arg(cfg)
        .arg("--out")
        .arg(out)
        .args(["--save-every", "1"]);
    if resume {
        c.arg("--resume");
    }
    c.stdout(Stdio::null()).stderr(Stdio::null());
    c
}

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

#[test]
fn killed_runs_resume_to_the_same_result() {
    let base = tmp("cfg");
    let cfg = serde_json::json!({
        "seed": 5, "hidden_size": 64, "num_layers": 2, "n_experts": 8,
        "pretrain_steps": 40, "pretrain_batch": 16, "pretrain_lr": 0.003, "reasoning_share": 0.3,
        "grpo_steps": 16, "prompts_per_step": 4, "num_generations": 4, "grpo_lr": 0.0005,
        "beta": 0.001, "temperature": 1.0, "max_new_tokens": 24, "eval_every": 4, "eval_problems": 16
    });
    let cfg_path = base.join("demo.json");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();

    let straight = base.join("straight");
    assert!(demo(&cfg_path, &straight, false).status().unwrap().success());
    let want = metrics(&straight);

    let killed = base.join("killed");
    let mut kills = 0;
    // Kill after varying delays (saves happen every step, so some kills land
    // inside a save), resuming each time, until a run gets to finish.
    let delays = [60u64, 130, 90, 200, 45, 170, 110, 260, 75, 150];
    let mut finished = false;
    for i in 0..60 {
        let mut child = demo(&cfg_path, &killed, true).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(
            delays[i % delays.len()] + 15 * (i as u64 / delays.len() as u64),
        ));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            kills += 1;
        }
        let status = child.wait().unwrap();
        // Whatever was interrupted, `latest` names a loadable checkpoint (or none yet).
        if let Some(l) = aha_trainer::checkpoint::load_latest(&killed.join("checkpoints")).unwrap() {
            assert!(l.dir.is_dir());
        }
        if status.success() {
            finished = true;
            break;
        }
    }
    assert!(finished, "the run never finished between kills");
    eprintln!("{kills} kills before the run finished");
    assert!(kills >= 3, "only {kills} kills landed");
    assert_eq!(
        metrics(&killed),
        want,
        "a killed and resumed run differs from the straight one"
    );
    let a = aha_moe_model::Model::load(&straight.join("checkpoint")).unwrap();
    let b = aha_moe_model::Model::load(&killed.join("checkpoint")).unwrap();
    assert!(a.params.iter().zip(&b.params).all(|(x, y)| x.to_bits() == y.to_bits()));
    let _ = std::fs::remove_dir_all(&base);
}
