//! Several ranks in several processes: `aha launch` with `aha nccl-check`
//! (every collective against the CPU, 3 ranks), data-parallel `aha grpo`
//! on 2 ranks against 1 rank on the same global batch (on the CPU through
//! the rendezvous sockets, and on the GPU through NCCL), and a rank killed
//! mid-run. The GPU tests run on the emulated GPU and NCCL in CI
//! (`AHA_EMULATED_GPU=1`); without a GPU they print "skipped: no GPU".

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{fixture, free_port, no_gpu, TempDir};

#[test]
fn nccl_check_passes_on_three_ranks_on_the_gpu() {
    if no_gpu("nccl_check_passes_on_three_ranks_on_the_gpu") {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_aha"))
        .args(["launch", "--nproc-per-node", "3", "--master-port"])
        .arg(free_port().to_string())
        .args(["--", "nccl-check", "--sizes", "1,4097,100000", "--iters", "1"])
        .output()
        .unwrap();
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{so}\n{se}");
    for r in 0..3 {
        assert!(
            se.contains(&format!("[rank {r}] rank {r}: nccl-check ok (3 sizes)")),
            "{se}"
        );
    }
    // Rank 0 reports each size; the others print nothing on stdout.
    assert_eq!(
        so.lines()
            .filter(|l| l.starts_with("[rank 0] {\"all_reduce_f32_ms\""))
            .count(),
        3,
        "{so}"
    );
    assert!(!so.contains("[rank 1]"), "{so}");
}

/// A GRPO config on the tiny Qwen2 fixture: 2 prompts a step (one group a
/// rank on 2 ranks), 4 completions each, 3 steps, a reward that differs
/// between completions (the share of Latin script), a learning rate large
/// enough to move the weights.
fn grpo_config(dir: &Path, device: &str, out: &str) -> PathBuf {
    let data = dir.join("train.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"07+15=\", \"answer\": \"22\"}\n{\"prompt\": \"33+48=\", \"answer\": \"81\"}\n\
         {\"prompt\": \"12+30=\", \"answer\": \"42\"}\n{\"prompt\": \"50+21=\", \"answer\": \"71\"}\n",
    )
    .unwrap();
    let path = dir.join(format!("{out}.toml"));
    std::fs::write(
        &path,
        format!(
            "model = {:?}\ndata = {:?}\nout = {:?}\nsteps = 3\nprompts_per_step = 2\nnum_generations = 4\n\
             learning_rate = 1e-3\nmax_completion_length = 8\ntemplate = \"none\"\nseed = 11\ndevice = {device:?}\n\
             reward_workers = 1\nsave_dtype = \"f32\"\nrewards = [{{ name = \"language\", weight = 1.0 }}]\nlanguage = \"en\"\n",
            fixture("models/qwen2-tiny"),
            data,
            dir.join(out),
        ),
    )
    .unwrap();
    path
}

fn weights(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let t = st.tensor(&n).unwrap();
            assert_eq!(t.dtype(), safetensors::Dtype::F32, "{n}");
            let v = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (n, v)
        })
        .collect()
}

fn initial_weights() -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(fixture("models/qwen2-tiny/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let t = st.tensor(&n).unwrap();
            let v = match t.dtype() {
                safetensors::Dtype::F32 => t
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                safetensors::Dtype::BF16 => t
                    .data()
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                d => panic!("{n}: {d:?}"),
            };
            (n, v)
        })
        .collect()
}

/// 2 ranks under `aha launch` and 1 process on the same global batch end
/// with the same weights (1e-5), which moved away from the start.
fn two_ranks_match_one(device: &str, name: &str) {
    two_ranks_match_one_with(device, name, "");
}

/// [`two_ranks_match_one`] with `extra` lines in both configs.
fn two_ranks_match_one_with(device: &str, name: &str, extra: &str) {
    let tmp = TempDir::new(name);
    let one = grpo_config(&tmp.0, device, "one");
    let two = grpo_config(&tmp.0, device, "two");
    for cfg in [&one, &two] {
        let text = std::fs::read_to_string(cfg).unwrap() + extra;
        std::fs::write(cfg, text).unwrap();
    }
    let t = Instant::now();
    let r1 = Command::new(env!("CARGO_BIN_EXE_aha"))
        .args(["grpo", "--config"])
        .arg(&one)
        .env_remove("WORLD_SIZE")
        .output()
        .unwrap();
    assert!(r1.status.success(), "{}", String::from_utf8_lossy(&r1.stderr));
    let t1 = t.elapsed();
    let t = Instant::now();
    let r2 = Command::new(env!("CARGO_BIN_EXE_aha"))
        .args(["launch", "--nproc-per-node", "2", "--master-port"])
        .arg(free_port().to_string())
        .args(["--", "grpo", "--config"])
        .arg(&two)
        .output()
        .unwrap();
    let se = String::from_utf8_lossy(&r2.stderr);
    assert!(r2.status.success(), "{se}");
    eprintln!(
        "{name}: 1 rank {:.1} s, 2 ranks {:.1} s",
        t1.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
    // Only rank 0 logs and writes; the GPU's gradients go through NCCL.
    assert!(se.contains("[rank 0] step 3/3"), "{se}");
    let how = if device == "cpu" {
        "data parallel: 2 ranks, gradients summed through rank 0 over TCP"
    } else {
        "data parallel: 2 ranks, gradients summed by NCCL"
    };
    assert!(se.contains(&format!("[rank 0] {how}")), "{se}");
    assert!(!se.contains("[rank 1] step"), "{se}");
    let (a, b) = (weights(&tmp.0.join("one/final")), weights(&tmp.0.join("two/final")));
    assert_eq!(a.len(), b.len());
    let mut moved = 0f32;
    let start = initial_weights();
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        for (i, (x, y)) in va.iter().zip(vb).enumerate() {
            assert!((x - y).abs() <= 1e-5, "{na}[{i}]: 1 rank {x}, 2 ranks {y}");
        }
        if let Some((_, v0)) = start.iter().find(|(n, _)| n == na) {
            moved = va.iter().zip(v0).fold(moved, |m, (x, y)| m.max((x - y).abs()));
        }
    }
    assert!(
        moved > 1e-4,
        "the weights did not move ({moved}): the comparison would prove nothing"
    );
    // The logged metrics are those of the global batch.
    let line = |run: &str| -> serde_json::Value {
        let text = std::fs::read_to_string(tmp.0.join(run).join("metrics.jsonl")).unwrap();
        serde_json::from_str(text.lines().last().unwrap()).unwrap()
    };
    let (m1, m2) = (line("one"), line("two"));
    for key in ["reward", "reward_std", "completions/mean_length", "loss"] {
        let (x, y) = (m1[key].as_f64().unwrap(), m2[key].as_f64().unwrap());
        assert!(
            (x - y).abs() <= 1e-6 * (1.0 + x.abs()),
            "{key}: 1 rank {x}, 2 ranks {y}"
        );
    }
    assert!(m2["timing/allreduce_s"].as_f64().is_some());
    assert!(!tmp.0.join("two/final-rank1").exists());
}

#[test]
fn grpo_on_two_ranks_matches_one_rank_on_the_cpu() {
    two_ranks_match_one("cpu", "grpo-cpu");
}

#[test]
fn grpo_on_two_ranks_matches_one_rank_on_the_gpu() {
    if no_gpu("grpo_on_two_ranks_matches_one_rank_on_the_gpu") {
        return;
    }
    two_ranks_match_one("cuda", "grpo-gpu");
}

/// `scale_rewards = "batch"` on 2 ranks: the advantages are scaled by the
/// reward std of the global batch (both ranks' groups), as on 1 process.
#[test]
fn grpo_batch_reward_scaling_on_two_ranks_matches_one_rank_on_the_cpu() {
    two_ranks_match_one_with("cpu", "batch-cpu", "scale_rewards = \"batch\"\n");
}

#[test]
fn grpo_batch_reward_scaling_on_two_ranks_matches_one_rank_on_the_gpu() {
    if no_gpu("grpo_batch_reward_scaling_on_two_ranks_matches_one_rank_on_the_gpu") {
        return;
    }
    two_ranks_match_one_with("cuda", "batch-gpu", "scale_rewards = \"batch\"\n");
}

/// GRPO with dynamic sampling on 2 ranks, 2 steps, on `device`: with an
/// accuracy reward the tiny random model never earns, every group is flat,
/// so each rank drops its group in rounds 0 and 1 and keeps what it draws
/// in the last round (`dynamic_sampling_max_rounds = 2`). Every step trains
/// on the full global batch (2 groups, one a rank: the run stops with an
/// error if a rank's share is short), the dropped groups are summed over
/// the ranks (2 rounds x 2 ranks), and both ranks drew the same prompts
/// from the shared data cursor: 3 rounds x 2 prompts a step, 12 of the 4
/// examples after 2 steps (epoch 3.0).
fn dynamic_sampling_on_two_ranks(device: &str, name: &str) {
    let tmp = TempDir::new(name);
    let cfg = grpo_config(&tmp.0, device, "run");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("steps = 3", "steps = 2")
        .replace("name = \"language\"", "name = \"accuracy\"")
        + "dynamic_sampling = true\ndynamic_sampling_max_rounds = 2\n";
    std::fs::write(&cfg, text).unwrap();
    let r = launch2(&["grpo", "--config"], &cfg, &[]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let lines = metric_lines(&tmp.0.join("run/metrics.jsonl"));
    assert_eq!(lines.len(), 2, "{lines:?}");
    for (i, m) in lines.iter().enumerate() {
        assert_eq!(m["dynamic_sampling/groups"].as_f64(), Some(2.0), "step {}: {m}", i + 1);
        assert_eq!(
            m["dynamic_sampling/dropped_groups"].as_f64(),
            Some(4.0),
            "step {}: {m}",
            i + 1
        );
        assert_eq!(m["reward"].as_f64(), Some(0.0), "step {}: {m}", i + 1);
    }
    assert_eq!(lines[1]["epoch"].as_f64(), Some(3.0), "{:?}", lines[1]);
}

#[test]
fn dynamic_sampling_fills_every_ranks_share_on_two_ranks_on_the_cpu() {
    dynamic_sampling_on_two_ranks("cpu", "dynamic-cpu");
}

/// Dynamic sampling on 2 CPU ranks where the ranks drop different numbers
/// of groups: one-token completions scored by the share of Latin script
/// make a group flat when its 4 tokens agree, which happens to some
/// groups only. 4 steps with up to 3 refill rounds: every step trains on
/// both ranks' full share (2 groups); some step drops an odd number of
/// groups over the ranks (so one rank refilled while the other did not);
/// and every dropped group was refilled from the shared data cursor, each
/// rank taking its part of the prompts drawn: 2 + dropped prompts a step,
/// the epoch fraction (prompts drawn / 4 examples) says so.
#[test]
fn dynamic_sampling_refills_ranks_unevenly_on_two_ranks_on_the_cpu() {
    let tmp = TempDir::new("dynamic-uneven-cpu");
    let cfg = grpo_config(&tmp.0, "cpu", "run");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("steps = 3", "steps = 4")
        .replace("max_completion_length = 8", "max_completion_length = 1")
        + "dynamic_sampling = true\ndynamic_sampling_max_rounds = 3\n";
    std::fs::write(&cfg, text).unwrap();
    let r = launch2(&["grpo", "--config"], &cfg, &[]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let lines = metric_lines(&tmp.0.join("run/metrics.jsonl"));
    assert_eq!(lines.len(), 4, "{lines:?}");
    let mut drawn = 0.0;
    let mut uneven = false;
    for (i, m) in lines.iter().enumerate() {
        assert_eq!(m["dynamic_sampling/groups"].as_f64(), Some(2.0), "step {}: {m}", i + 1);
        let dropped = m["dynamic_sampling/dropped_groups"].as_f64().unwrap();
        uneven |= dropped % 2.0 == 1.0;
        drawn += 2.0 + dropped;
        assert_eq!(m["epoch"].as_f64(), Some(drawn / 4.0), "step {}: {m}", i + 1);
    }
    assert!(
        uneven,
        "no step where the ranks dropped different numbers of groups: {lines:?}"
    );
}

#[test]
fn dynamic_sampling_fills_every_ranks_share_on_two_ranks_on_the_gpu() {
    if no_gpu("dynamic_sampling_fills_every_ranks_share_on_two_ranks_on_the_gpu") {
        return;
    }
    dynamic_sampling_on_two_ranks("cuda", "dynamic-gpu");
}

/// Kills rank 1 of a `launch`ed run once training is under way: rank 0
/// reports that rank 1 went away (within the short timeout, not after a
/// hang), and `aha launch` exits non-zero naming rank 1.
fn killed_rank(device: &str, name: &str) {
    let tmp = TempDir::new(name);
    let cfg = grpo_config(&tmp.0, device, "run");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("steps = 3", "steps = 1000");
    std::fs::write(&cfg, text).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_aha"))
        .args(["launch", "--nproc-per-node", "2", "--grace-s", "20", "--master-port"])
        .arg(free_port().to_string())
        .args(["--", "grpo", "--config"])
        .arg(&cfg)
        .env("AHA_RENDEZVOUS_TIMEOUT_S", "10")
        .env("AHA_NCCL_TIMEOUT_S", "10")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let mut pid1 = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    // Wait for the pid of rank 1 and for rank 0's first step.
    while Instant::now() < deadline {
        let Ok(l) = rx.recv_timeout(Duration::from_secs(1)) else {
            continue;
        };
        if let Some(p) = l.strip_prefix("[launch] rank 1: pid ") {
            pid1 = p.trim().parse::<i32>().ok();
        }
        let started = l.contains("[rank 0] step 1/1000");
        lines.push(l);
        if started {
            break;
        }
    }
    let pid1 = pid1.expect("launch printed rank 1's pid");
    assert!(lines.iter().any(|l| l.contains("step 1/1000")), "{lines:#?}");
    let killed = Instant::now();
    // rank 1 is a child of the `aha launch` this test started.
    let st = Command::new("kill").args(["-9", &pid1.to_string()]).status().unwrap();
    assert!(st.success());
    let status = child.wait().unwrap();
    let secs = killed.elapsed().as_secs_f64();
    lines.extend(rx.try_iter());
    let all = lines.join("\n");
    assert!(!status.success(), "{all}");
    assert!(all.contains("launch: rank 1 of 2 was killed by signal 9"), "{all}");
    // Rank 0 ended by itself, with an error naming rank 1, before the grace
    // period (20 s) ran out.
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("[rank 0] Error") && l.contains("rank 1")),
        "{all}"
    );
    assert!(!all.contains("[launch] stopping rank 0"), "{all}");
    assert!(secs < 20.0, "took {secs} s");
}

#[test]
fn a_killed_rank_stops_the_others_with_an_error_on_the_cpu() {
    killed_rank("cpu", "kill-cpu");
}

#[test]
fn a_killed_rank_stops_the_others_with_an_error_on_the_gpu() {
    if no_gpu("a_killed_rank_stops_the_others_with_an_error_on_the_gpu") {
        return;
    }
    killed_rank("cuda", "kill-gpu");
}

#[test]
fn launch_refuses_bad_arguments_and_reports_a_failing_rank() {
    // Every rank fails at once (no such config): launch names a rank and
    // exits non-zero.
    let out = Command::new(env!("CARGO_BIN_EXE_aha"))
        .args(["launch", "--nproc-per-node", "2", "--master-port"])
        .arg(free_port().to_string())
        .args(["--", "grpo", "--config", "/nonexistent/run.toml"])
        .output()
        .unwrap();
    let se = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        se.contains("launch: rank ") && se.contains("of 2 exited with code 1"),
        "{se}"
    );
    assert!(se.contains("[rank 0] ") && se.contains("/nonexistent/run.toml"), "{se}");
    let out = Command::new(env!("CARGO_BIN_EXE_aha"))
        .args(["launch", "--nproc-per-node", "0", "--", "info"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--nproc-per-node 0"));
}

/// SFT on 2 ranks (a global batch of 4, 2 rows a rank) ends 5 steps with the
/// weights of 1 process.
fn sft_two_ranks_match_one(device: &str, name: &str) {
    let tmp = TempDir::new(name);
    let data = tmp.0.join("pairs.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"07+15=\", \"completion\": \"22\"}\n{\"prompt\": \"33+48=\", \"completion\": \"81\"}\n\
         {\"prompt\": \"12+30=\", \"completion\": \"42\"}\n{\"prompt\": \"50+21=\", \"completion\": \"71\"}\n",
    )
    .unwrap();
    let args = |out: &str| -> Vec<String> {
        [
            "sft",
            "--steps",
            "5",
            "--batch",
            "4",
            "--lr",
            "1e-3",
            "--template",
            "none",
            "--save-dtype",
            "f32",
            "--device",
            device,
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(["--model".into(), fixture("models/qwen2-tiny").display().to_string()])
        .chain(["--data".into(), data.display().to_string()])
        .chain(["--out".into(), tmp.0.join(out).display().to_string()])
        .collect()
    };
    let r1 = Command::new(env!("CARGO_BIN_EXE_aha"))
        .args(args("one"))
        .output()
        .unwrap();
    assert!(r1.status.success(), "{}", String::from_utf8_lossy(&r1.stderr));
    let r2 = Command::new(env!("CARGO_BIN_EXE_aha"))
        .args(["launch", "--nproc-per-node", "2", "--master-port"])
        .arg(free_port().to_string())
        .arg("--")
        .args(args("two"))
        .output()
        .unwrap();
    let se = String::from_utf8_lossy(&r2.stderr);
    assert!(r2.status.success(), "{se}");
    assert!(se.contains("[rank 0] step 5/5 sft loss"), "{se}");
    assert!(!se.contains("[rank 1] step"), "{se}");
    assert!(se.contains("[rank 0] data parallel: 2 ranks"), "{se}");
    // The same final loss (the global one) on stdout.
    let loss = |o: &std::process::Output, prefix: &str| -> f64 {
        let text = String::from_utf8_lossy(&o.stdout);
        let line = text.lines().find_map(|l| l.strip_prefix(prefix)).unwrap();
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        v["loss"].as_f64().unwrap()
    };
    let (l1, l2) = (loss(&r1, ""), loss(&r2, "[rank 0] "));
    assert!(
        (l1 - l2).abs() <= 1e-5 * (1.0 + l1.abs()),
        "loss: 1 rank {l1}, 2 ranks {l2}"
    );
    let (a, b) = (weights(&tmp.0.join("one")), weights(&tmp.0.join("two")));
    let start = initial_weights();
    let mut moved = 0f32;
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        for (i, (x, y)) in va.iter().zip(vb).enumerate() {
            assert!((x - y).abs() <= 1e-5, "{na}[{i}]: 1 rank {x}, 2 ranks {y}");
        }
        if let Some((_, v0)) = start.iter().find(|(n, _)| n == na) {
            moved = va.iter().zip(v0).fold(moved, |m, (x, y)| m.max((x - y).abs()));
        }
    }
    assert!(moved > 1e-4, "the weights did not move ({moved})");
}

#[test]
fn sft_on_two_ranks_matches_one_rank_on_the_cpu() {
    sft_two_ranks_match_one("cpu", "sft-cpu");
}

#[test]
fn sft_on_two_ranks_matches_one_rank_on_the_gpu() {
    if no_gpu("sft_on_two_ranks_matches_one_rank_on_the_gpu") {
        return;
    }
    sft_two_ranks_match_one("cuda", "sft-gpu");
}

/// Final weights of two runs, tensor by tensor, within `rel` relative
/// (`|x - y| <= rel * (|x| + 1e-3)`); returns how far the weights moved
/// from the fixture's.
fn assert_same_weights(a: &Path, b: &Path, rel: f32) -> f32 {
    let (a, b) = (weights(a), weights(b));
    assert_eq!(a.len(), b.len());
    let start = initial_weights();
    let mut moved = 0f32;
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        for (i, (x, y)) in va.iter().zip(vb).enumerate() {
            assert!((x - y).abs() <= rel * (x.abs() + 1e-3), "{na}[{i}]: {x} vs {y}");
        }
        if let Some((_, v0)) = start.iter().find(|(n, _)| n == na) {
            moved = va.iter().zip(v0).fold(moved, |m, (x, y)| m.max((x - y).abs()));
        }
    }
    moved
}

fn launch2(args: &[&str], cfg: &Path, extra: &[String]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_aha"))
        .args(["launch", "--nproc-per-node", "2", "--master-port"])
        .arg(free_port().to_string())
        .arg("--")
        .args(args)
        .arg(cfg)
        .args(extra)
        .output()
        .unwrap()
}

/// GRPO on 2 ranks, 3 steps: ZeRO-1 (`zero_stage = 1`) ends with plain data
/// parallel's weights and metrics (1e-6 relative: the gradient norm is
/// summed shard by shard, in another order than over the whole buffer,
/// which moves the clipping coefficient in its last bits).
fn grpo_zero1_matches_plain(device: &str, name: &str) {
    let tmp = TempDir::new(name);
    let plain = grpo_config(&tmp.0, device, "plain");
    let zero = grpo_config(&tmp.0, device, "zero");
    let text = std::fs::read_to_string(&zero).unwrap() + "zero_stage = 1\n";
    std::fs::write(&zero, text).unwrap();
    let t = Instant::now();
    let r0 = launch2(&["grpo", "--config"], &plain, &[]);
    assert!(r0.status.success(), "{}", String::from_utf8_lossy(&r0.stderr));
    let r1 = launch2(&["grpo", "--config"], &zero, &[]);
    let se = String::from_utf8_lossy(&r1.stderr);
    assert!(r1.status.success(), "{se}");
    eprintln!("{name}: both runs {:.1} s", t.elapsed().as_secs_f64());
    assert!(se.contains("optimizer state sharded over the ranks (ZeRO-1)"), "{se}");
    // In f32 the weights the kernels read are the master: every rank holds
    // all of it, and the moments of its shard only.
    let held = held_bytes(&r1);
    let &[[rank, shard, trainable, master, moments]] = &held[..] else {
        panic!("one line of rank 0: {held:?}")
    };
    assert_eq!((rank, shard), (0, trainable / 2), "{held:?}");
    // The CPU counts no device bytes for its weights.
    assert!(device == "cpu" || master >= 4 * trainable, "{held:?}");
    assert_eq!(moments, 8 * shard);
    let moved = assert_same_weights(&tmp.0.join("plain/final"), &tmp.0.join("zero/final"), 1e-6);
    assert!(moved > 1e-4, "the weights did not move ({moved})");
    let line = |run: &str| -> serde_json::Value {
        let text = std::fs::read_to_string(tmp.0.join(run).join("metrics.jsonl")).unwrap();
        serde_json::from_str(text.lines().last().unwrap()).unwrap()
    };
    let (m0, m1) = (line("plain"), line("zero"));
    for key in ["reward", "loss", "grad_norm", "completions/mean_length"] {
        let (x, y) = (m0[key].as_f64().unwrap(), m1[key].as_f64().unwrap());
        assert!((x - y).abs() <= 1e-6 * (1.0 + x.abs()), "{key}: plain {x}, ZeRO-1 {y}");
    }
}

/// Each rank's `(rank, shard, trainable, master bytes, moments bytes)`
/// from the ZeRO-1 line the run logs after its first step.
fn held_bytes(out: &std::process::Output) -> Vec<[u64; 5]> {
    let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    let mut held: Vec<[u64; 5]> = text
        .lines()
        .filter_map(|l| {
            let at = l.find("(ZeRO-1): rank ")?;
            let nums: Vec<u64> = l[at + 15..]
                .split(|c: char| !c.is_ascii_digit())
                .filter(|w| !w.is_empty())
                .filter_map(|w| w.parse().ok())
                .collect();
            // rank, f32 (the word), shard, trainable, master, moments.
            match nums[..] {
                [rank, _f32, shard, trainable, master, moments, ..] => Some([rank, shard, trainable, master, moments]),
                _ => None,
            }
        })
        .collect();
    held.sort_unstable();
    held.dedup();
    held
}

/// GRPO on 2 ranks in bf16 precision, 3 steps: ZeRO-1, which keeps only
/// its shard of the f32 master on each rank and all-gathers bf16 weights,
/// against plain data parallel (every rank the whole f32 master).
///
/// Weights: plain data parallel saves its f32 master; ZeRO-1 saves the
/// all-gathered bf16 weights, except the tensors the kernels read in f32
/// (norms, biases, the embedding, routers), kept in f32. Both models
/// compute with the same bf16 weights, so each saved value is plain data
/// parallel's value or its bf16 rounding (half a bf16 step away: at most
/// 2^-8 relative). The tolerance is one bf16 step (2^-7 relative) because
/// the global norm is summed shard by shard, which moves the clipping
/// coefficient and so the master in its last bits, and a master value next
/// to a rounding boundary can then round to the neighbouring bf16 value.
/// At least 99% of the values must be exactly the f32 value or its bf16
/// rounding.
///
/// Memory, from the policy's own accounting: each rank holds the f32
/// master and moments (4 + 8 bytes a parameter) of its shard only, the
/// two shards covering the trainable parameters: half of plain data
/// parallel's 12 bytes a parameter, plus fewer than 2 parameters.
fn grpo_zero1_bf16_master_is_sharded(name: &str) {
    let tmp = TempDir::new(name);
    let cfg = |out: &str, extra: &str| {
        let p = grpo_config(&tmp.0, "cuda", out);
        let text = std::fs::read_to_string(&p).unwrap() + "precision = \"bf16\"\n" + extra;
        std::fs::write(&p, text).unwrap();
        p
    };
    let (plain, zero) = (cfg("plain", ""), cfg("zero", "zero_stage = 1\n"));
    let r0 = launch2(&["grpo", "--config"], &plain, &[]);
    assert!(r0.status.success(), "{}", String::from_utf8_lossy(&r0.stderr));
    let r1 = launch2(&["grpo", "--config"], &zero, &[]);
    assert!(r1.status.success(), "{}", String::from_utf8_lossy(&r1.stderr));
    let (a, b) = (weights(&tmp.0.join("plain/final")), weights(&tmp.0.join("zero/final")));
    assert_eq!(a.len(), b.len());
    let start = initial_weights();
    let (mut total, mut exact, mut moved, mut worst) = (0usize, 0usize, 0f32, 0f32);
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert_eq!(va.len(), vb.len(), "{na}");
        for (i, (&x, &y)) in va.iter().zip(vb).enumerate() {
            let rounded = half::bf16::from_f32(x).to_f32();
            total += 1;
            exact += usize::from(y == x || y == rounded);
            let d = (x - y).abs();
            worst = worst.max(d / (x.abs() + 1e-6));
            assert!(d <= x.abs() / 128.0 + 1e-6, "{na}[{i}]: plain {x}, ZeRO-1 {y}");
        }
        if let Some((_, v0)) = start.iter().find(|(n, _)| n == na) {
            moved = va.iter().zip(v0).fold(moved, |m, (x, y)| m.max((x - y).abs()));
        }
    }
    eprintln!(
        "{name}: {exact} of {total} values exactly plain's or its bf16 rounding; largest relative difference {worst:.2e}"
    );
    assert!(moved > 1e-4, "the weights did not move ({moved})");
    assert!(exact as f64 >= 0.99 * total as f64, "{exact} of {total}");
    // Rank 0 logs: its shard is the first half (rounded down).
    let held = held_bytes(&r1);
    let &[[rank, shard, trainable, master, moments]] = &held[..] else {
        panic!("one line of rank 0: {held:?}")
    };
    assert_eq!((rank, shard), (0, trainable / 2), "{held:?}");
    assert_eq!(master, 4 * shard, "an f32 master of its shard only");
    assert_eq!(moments, 8 * shard);
    assert!(2 * (master + moments) <= 12 * (trainable + 2), "{held:?}");
}

#[test]
fn grpo_zero1_shards_the_bf16_master_and_matches_plain_data_parallel_on_the_gpu() {
    if no_gpu("grpo_zero1_shards_the_bf16_master_and_matches_plain_data_parallel_on_the_gpu") {
        return;
    }
    grpo_zero1_bf16_master_is_sharded("zero-bf16-gpu");
}

#[test]
fn grpo_zero1_bf16_resumes_exactly_on_two_ranks_on_the_gpu() {
    if no_gpu("grpo_zero1_bf16_resumes_exactly_on_two_ranks_on_the_gpu") {
        return;
    }
    let tmp = TempDir::new("zero-resume-bf16-gpu");
    let cfg = grpo_config(&tmp.0, "cuda", "run");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("steps = 3", "steps = 4\nsave_every = 2")
        + "zero_stage = 1\nprecision = \"bf16\"\n";
    std::fs::write(&cfg, text).unwrap();
    let out = tmp.0.join("run");
    resume_on_two_ranks_is_exact("grpo", &cfg, &out, &out.join("final"), true);
    // Each rank's shard file holds its f32 master: the two cover the
    // trainable parameters.
    let ck = out.join("checkpoints/step-000002");
    let ranks: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("ranks.json")).unwrap()).unwrap();
    let mut covered = 0;
    for r in 0..2 {
        let bytes = std::fs::read(ck.join(format!("optimizer-rank-{r:05}.safetensors"))).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let master = st.tensor("master").unwrap();
        assert_eq!(master.shape(), st.tensor("exp_avg").unwrap().shape(), "rank {r}");
        covered += master.shape()[0];
    }
    assert_eq!(covered as u64, ranks["trainable"].as_u64().unwrap());
}

#[test]
fn grpo_zero1_matches_plain_data_parallel_on_the_gpu() {
    if no_gpu("grpo_zero1_matches_plain_data_parallel_on_the_gpu") {
        return;
    }
    grpo_zero1_matches_plain("cuda", "zero-grpo-gpu");
}

#[test]
fn grpo_zero1_matches_plain_data_parallel_on_the_cpu() {
    grpo_zero1_matches_plain("cpu", "zero-grpo-cpu");
}

/// An SFT config on the tiny fixture (a global batch of 4, 2 rows a rank).
fn sft_config(dir: &Path, device: &str, out: &str, extra: &str) -> PathBuf {
    let data = dir.join("pairs.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"07+15=\", \"completion\": \"22\"}\n{\"prompt\": \"33+48=\", \"completion\": \"81\"}\n\
         {\"prompt\": \"12+30=\", \"completion\": \"42\"}\n{\"prompt\": \"50+21=\", \"completion\": \"71\"}\n",
    )
    .unwrap();
    let path = dir.join(format!("{out}.toml"));
    std::fs::write(
        &path,
        format!(
            "model = {:?}\ndata = {:?}\nout = {:?}\nsteps = 3\nbatch = 4\nlearning_rate = 1e-3\ntemplate = \"none\"\n\
             save_dtype = \"f32\"\nsample_prompts = 0\ndevice = {device:?}\n{extra}",
            fixture("models/qwen2-tiny"),
            data,
            dir.join(out),
        ),
    )
    .unwrap();
    path
}

/// SFT on 2 ranks, 3 steps: ZeRO-1 ends with plain data parallel's weights
/// and loss (1e-6 relative, as for GRPO).
fn sft_zero1_matches_plain(device: &str, name: &str) {
    let tmp = TempDir::new(name);
    let plain = sft_config(&tmp.0, device, "plain", "");
    let zero = sft_config(&tmp.0, device, "zero", "zero_stage = 1\n");
    let r0 = launch2(&["sft", "--config"], &plain, &[]);
    assert!(r0.status.success(), "{}", String::from_utf8_lossy(&r0.stderr));
    let r1 = launch2(&["sft", "--config"], &zero, &[]);
    let se = String::from_utf8_lossy(&r1.stderr);
    assert!(r1.status.success(), "{se}");
    assert!(se.contains("optimizer state sharded over the ranks (ZeRO-1)"), "{se}");
    let moved = assert_same_weights(&tmp.0.join("plain"), &tmp.0.join("zero"), 1e-6);
    assert!(moved > 1e-4, "the weights did not move ({moved})");
    let loss = |o: &std::process::Output| -> f64 {
        let text = String::from_utf8_lossy(&o.stdout);
        let line = text.lines().find_map(|l| l.strip_prefix("[rank 0] ")).unwrap();
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        v["loss"].as_f64().unwrap()
    };
    let (l0, l1) = (loss(&r0), loss(&r1));
    assert!(
        (l0 - l1).abs() <= 1e-6 * (1.0 + l0.abs()),
        "loss: plain {l0}, ZeRO-1 {l1}"
    );
}

#[test]
fn sft_zero1_matches_plain_data_parallel_on_the_gpu() {
    if no_gpu("sft_zero1_matches_plain_data_parallel_on_the_gpu") {
        return;
    }
    sft_zero1_matches_plain("cuda", "zero-sft-gpu");
}

#[test]
fn sft_zero1_matches_plain_data_parallel_on_the_cpu() {
    sft_zero1_matches_plain("cpu", "zero-sft-cpu");
}

/// Metrics lines without their timings (which differ from run to run).
fn metric_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().retain(|k, _| !k.starts_with("timing/"));
            v
        })
        .collect()
}

/// A run on 2 ranks, 4 steps with a checkpoint at step 2, then `--resume`
/// of the same folder on 2 ranks (steps 3 and 4 again from the
/// checkpoint): the same final weights, bit for bit, and the same metrics.
/// Then resuming on 1 process is refused naming both sizes, and the
/// checkpoint's `model/` starts a new 1-process run (weights only).
/// `cmd` is `grpo` or `sft`; `final_dir` where the run leaves its weights.
fn resume_on_two_ranks_is_exact(cmd: &str, cfg: &Path, out: &Path, final_dir: &Path, zero: bool) {
    let args = [cmd, "--config"];
    let r = launch2(&args, cfg, &[]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let straight = weights(final_dir);
    let straight_metrics = metric_lines(&out.join("metrics.jsonl"));
    assert_eq!(straight_metrics.len(), 4);
    let ck = out.join("checkpoints/step-000002");
    let ranks: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("ranks.json")).unwrap()).unwrap();
    assert_eq!(ranks["world_size"], 2);
    for r in 0..2 {
        assert_eq!(ck.join(format!("optimizer-rank-{r:05}.safetensors")).is_file(), zero);
    }
    assert_eq!(ck.join("optimizer.safetensors").is_file(), !zero);
    assert!(!out.join("checkpoints/.tmp-step-000002").exists());
    let r = launch2(&args, cfg, &["--resume".to_string()]);
    let se = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{se}");
    assert!(se.contains("resuming") || se.contains("resum"), "{se}");
    let resumed = weights(final_dir);
    assert_eq!(straight.len(), resumed.len());
    for ((n, a), (_, b)) in straight.iter().zip(&resumed) {
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert_eq!(x.to_bits(), y.to_bits(), "{n}[{i}]: straight {x}, resumed {y}");
        }
    }
    assert_eq!(metric_lines(&out.join("metrics.jsonl")), straight_metrics);
    // The optimizer state of 2 ranks does not resume on 1 (with expert
    // parallel the config itself is refused on 1 process).
    let r = Command::new(env!("CARGO_BIN_EXE_aha"))
        .args(args)
        .arg(cfg)
        .arg("--resume")
        .env_remove("WORLD_SIZE")
        .output()
        .unwrap();
    let se = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success());
    let ep = std::fs::read_to_string(cfg).unwrap().contains("expert_parallel = 2\n");
    assert!(
        (se.contains("saved by 2 rank(s)")
            && se.contains("this run has 1 rank(s)")
            && se.contains("step-000002/model"))
            || (ep && se.contains("expert_parallel = 2") && se.contains("WORLD_SIZE")),
        "{se}"
    );
    // The weights alone start a new run on 1 process.
    let text = std::fs::read_to_string(cfg).unwrap();
    let model_line = text.lines().find(|l| l.starts_with("model = ")).unwrap();
    let out_line = text.lines().find(|l| l.starts_with("out = ")).unwrap();
    let fresh = text
        .replace(model_line, &format!("model = {:?}", ck.join("model")))
        .replace(out_line, &format!("out = {:?}", out.with_extension("weights-only")))
        .replace("zero_stage = 1\n", "")
        .replace("expert_parallel = 2\n", "");
    let fresh_cfg = cfg.with_extension("weights-only.toml");
    std::fs::write(&fresh_cfg, fresh).unwrap();
    let r = Command::new(env!("CARGO_BIN_EXE_aha"))
        .args(args)
        .arg(&fresh_cfg)
        .env_remove("WORLD_SIZE")
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
}

#[test]
fn grpo_zero1_resumes_exactly_on_two_ranks_on_the_gpu() {
    if no_gpu("grpo_zero1_resumes_exactly_on_two_ranks_on_the_gpu") {
        return;
    }
    let tmp = TempDir::new("zero-resume-grpo-gpu");
    let cfg = grpo_config(&tmp.0, "cuda", "run");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("steps = 3", "steps = 4\nsave_every = 2")
        + "zero_stage = 1\n";
    std::fs::write(&cfg, text).unwrap();
    let out = tmp.0.join("run");
    resume_on_two_ranks_is_exact("grpo", &cfg, &out, &out.join("final"), true);
}

#[test]
fn grpo_plain_data_parallel_resumes_exactly_on_two_ranks_on_the_cpu() {
    let tmp = TempDir::new("dp-resume-grpo-cpu");
    let cfg = grpo_config(&tmp.0, "cpu", "run");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("steps = 3", "steps = 4\nsave_every = 2");
    std::fs::write(&cfg, text).unwrap();
    let out = tmp.0.join("run");
    resume_on_two_ranks_is_exact("grpo", &cfg, &out, &out.join("final"), false);
}

#[test]
fn sft_zero1_resumes_exactly_on_two_ranks_on_the_gpu() {
    if no_gpu("sft_zero1_resumes_exactly_on_two_ranks_on_the_gpu") {
        return;
    }
    let tmp = TempDir::new("zero-resume-sft-gpu");
    let cfg = sft_config(&tmp.0, "cuda", "run", "save_every = 2\nzero_stage = 1\n");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("steps = 3", "steps = 4");
    std::fs::write(&cfg, text).unwrap();
    let out = tmp.0.join("run");
    resume_on_two_ranks_is_exact("sft", &cfg, &out, &out, true);
}

/// Expert parallel with the routed experts sharded over the 2 ranks (the
/// MoE fixture): each rank writes the moments of its own experts, rank 0
/// the gathered weights, and the resumed run ends bit for bit where the
/// uninterrupted one does.
#[test]
fn sft_sharded_experts_resume_exactly_on_two_ranks_on_the_gpu() {
    if no_gpu("sft_sharded_experts_resume_exactly_on_two_ranks_on_the_gpu") {
        return;
    }
    let tmp = TempDir::new("ep-resume-sft-gpu");
    let cfg = sft_config(&tmp.0, "cuda", "run", "save_every = 2\nexpert_parallel = 2\n");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("steps = 3", "steps = 4")
        .replace("models/qwen2-tiny", "models/qwen3-moe-tiny");
    std::fs::write(&cfg, text).unwrap();
    let out = tmp.0.join("run");
    resume_on_two_ranks_is_exact("sft", &cfg, &out, &out, true);
    let ranks: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("checkpoints/step-000002/ranks.json")).unwrap())
            .unwrap();
    assert_eq!(ranks["expert_parallel"], 2, "{ranks}");
}

/// `launch2` with `env` set for every rank.
fn launch2_env(args: &[&str], cfg: &Path, env: &[(&str, &str)]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_aha"))
        .args(["launch", "--nproc-per-node", "2", "--master-port"])
        .arg(free_port().to_string())
        .arg("--")
        .args(args)
        .arg(cfg)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// `[rank 0] data parallel: ...` buckets: (queued before the backward reached the embedding, all)
/// from the run's description line.
fn buckets_line(stderr: &str) -> (usize, usize) {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("[rank 0] data parallel:"))
        .unwrap_or_else(|| panic!("no data-parallel line in {stderr}"));
    let words: Vec<&str> = line.split([' ', ',']).filter(|w| !w.is_empty()).collect();
    let at = words.iter().position(|w| *w == "gradient").unwrap();
    if words[at + 3] == "after" {
        assert_eq!(words[at + 5], "backward", "{line}");
        (0, words[at - 1].parse().unwrap())
    } else {
        // "N of M gradient buckets all-reduced before the backward reached
        // the embedding"
        assert_eq!(words[at - 2], "of", "{line}");
        (words[at - 3].parse().unwrap(), words[at - 1].parse().unwrap())
    }
}

/// 2 ranks, 3 steps, small all-reduce buckets (several per layer): the
/// all-reduce overlapped with the backward (the default) ends with exactly
/// the weights of the all-reduce after the backward (`AHA_DP_OVERLAP=0`),
/// and its buckets were queued while the backward was still going through
/// the layers (all but those of the embedding, which it completes last; the
/// tied head's gradient is in it).
fn overlap_matches_after_backward(cmd: &str, cfg_of: &dyn Fn(&Path, &str) -> PathBuf, name: &str) {
    let tmp = TempDir::new(name);
    let (after, over) = (cfg_of(&tmp.0, "after"), cfg_of(&tmp.0, "over"));
    let small = ("AHA_DP_BUCKET_MB", "0.05");
    let r0 = launch2_env(&[cmd, "--config"], &after, &[small, ("AHA_DP_OVERLAP", "0")]);
    let se0 = String::from_utf8_lossy(&r0.stderr);
    assert!(r0.status.success(), "{se0}");
    let r1 = launch2_env(&[cmd, "--config"], &over, &[small]);
    let se1 = String::from_utf8_lossy(&r1.stderr);
    assert!(r1.status.success(), "{se1}");
    let (d0, n0) = buckets_line(&se0);
    let (d1, n1) = buckets_line(&se1);
    assert_eq!(d0, 0, "{se0}");
    assert!(n0 > 3, "{se0}");
    // At least the head's and the last layer's buckets went out before the
    // backward reached the embedding, whose buckets are left.
    assert!(d1 >= 2 && d1 < n1, "{d1} of {n1} buckets before the embedding: {se1}");
    eprintln!("{name}: {d1} of {n1} buckets queued before the backward reached the embedding (after: {n0} buckets)");
    let moved = assert_same_weights(&tmp.0.join("after/final"), &tmp.0.join("over/final"), 0.0);
    assert!(moved > 1e-4, "the weights did not move ({moved})");
}

#[test]
fn grpo_overlapped_all_reduce_matches_after_backward_on_the_gpu() {
    if no_gpu("grpo_overlapped_all_reduce_matches_after_backward_on_the_gpu") {
        return;
    }
    // Two micro-batches a rank: the all-reduce overlaps the last one only.
    let cfg = |dir: &Path, out: &str| {
        let p = grpo_config(dir, "cuda", out);
        let text = std::fs::read_to_string(&p).unwrap() + "micro_batch_tokens = 32\n";
        std::fs::write(&p, text).unwrap();
        p
    };
    overlap_matches_after_backward("grpo", &cfg, "overlap-grpo-gpu");
}

#[test]
fn sft_overlapped_all_reduce_matches_after_backward_on_the_gpu() {
    if no_gpu("sft_overlapped_all_reduce_matches_after_backward_on_the_gpu") {
        return;
    }
    let cfg = |dir: &Path, out: &str| {
        let p = sft_config(dir, "cuda", out, "");
        // SFT writes its final weights into `out` itself.
        let text = std::fs::read_to_string(&p).unwrap();
        let text = text.replace(
            &format!("{:?}", dir.join(out)),
            &format!("{:?}", dir.join(out).join("final")),
        );
        std::fs::write(&p, text).unwrap();
        p
    };
    overlap_matches_after_backward("sft", &cfg, "overlap-sft-gpu");
}
