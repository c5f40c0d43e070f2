//! Expert parallelism in the training commands (`expert_parallel = N` in
//! the `aha grpo` and `aha sft` TOML, under `aha launch`): on the tiny
//! Qwen3-MoE fixture (8 routed experts, one MoE layer), 2 ranks with
//! `expert_parallel = 2` end with the weights of the same 2 ranks without
//! it and of 1 process on the same global batch (1e-5 f32), the routed
//! experts' weights among those that moved. The GRPO run cuts its
//! completions into micro-batches under a token budget, and its two
//! prompts differ in length, so that one rank's group makes more
//! micro-batches than the other's and the step has to split the other's
//! to run them in lockstep (without it the ranks stop on a mismatched
//! collective), and takes
//! 2 updates a step (the old policy's log-probs are scored expert-parallel
//! too). The SFT run also with ZeRO-1 (`zero_stage = 1`). Bad values are
//! refused naming the key (on the CPU). The GPU
//! tests run on the emulated GPU and NCCL in CI (`AHA_EMULATED_GPU=1`);
//! without a GPU they print "skipped: no GPU".

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

mod common;
use common::{fixture, free_port, no_gpu, TempDir};

const MOE: &str = "models/qwen3-moe-tiny";

/// Every tensor of a safetensors file as f32, sorted by name.
fn tensors(file: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(file).unwrap();
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

/// The saved weights of `a` and `b` agree within `tol` (absolute) on every
/// tensor; returns how far `a`'s routed experts and all of `a`'s weights
/// moved from the fixture's.
fn assert_same_weights(a: &Path, b: &Path, tol: f32, what: &str) -> (f32, f32) {
    let (a, b) = (
        tensors(&a.join("model.safetensors")),
        tensors(&b.join("model.safetensors")),
    );
    assert_eq!(a.len(), b.len());
    let start = tensors(&fixture(MOE).join("model.safetensors"));
    let (mut experts, mut all) = (0f32, 0f32);
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert_eq!(va.len(), vb.len(), "{na}");
        for (i, (x, y)) in va.iter().zip(vb).enumerate() {
            assert!((x - y).abs() <= tol, "{what}: {na}[{i}]: {x} vs {y}");
        }
        let (_, v0) = start.iter().find(|(n, _)| n == na).unwrap();
        let d = va.iter().zip(v0).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        all = all.max(d);
        if na.contains(".mlp.experts.") {
            experts = experts.max(d);
        }
    }
    (experts, all)
}

fn launch(n: usize, args: &[&str], cfg: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_aha"))
        .args(["launch", "--nproc-per-node", &n.to_string(), "--master-port"])
        .arg(free_port().to_string())
        .arg("--")
        .args(args)
        .arg(cfg)
        .output()
        .unwrap()
}

fn single(args: &[&str], cfg: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_aha"))
        .args(args)
        .arg(cfg)
        .env_remove("WORLD_SIZE")
        .output()
        .unwrap()
}

/// A GRPO config on the MoE fixture: a short and a long prompt, both in
/// every step (one group a rank on 2 ranks), 4 completions each, 2 steps of 2 updates each, a
/// budget of 24 tokens a micro-batch, a reward that differs between
/// completions and a learning rate that moves the weights (AdamW moves
/// every weight with a gradient by about 1e-3 a step).
fn grpo_config(dir: &Path, device: &str, out: &str, extra: &str) -> PathBuf {
    let data = dir.join("train.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"7=\", \"answer\": \"7\"}\n\
         {\"prompt\": \"12+34+56+78+90+11=\", \"answer\": \"281\"}\n",
    )
    .unwrap();
    let path = dir.join(format!("{out}.toml"));
    std::fs::write(
        &path,
        format!(
            "model = {:?}\ndata = {:?}\nout = {:?}\nsteps = 2\nprompts_per_step = 2\nnum_generations = 4\n\
             num_iterations = 2\nmicro_batch_tokens = 24\nlearning_rate = 1e-3\nmax_completion_length = 8\n\
             template = \"none\"\nseed = 5\ndevice = {device:?}\nreward_workers = 1\nsave_dtype = \"f32\"\n\
             rewards = [{{ name = \"language\", weight = 1.0 }}]\nlanguage = \"en\"\n{extra}",
            fixture(MOE),
            data,
            dir.join(out),
        ),
    )
    .unwrap();
    path
}

fn sft_config(dir: &Path, device: &str, out: &str, extra: &str) -> PathBuf {
    let data = dir.join("pairs.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"07+15=\", \"completion\": \"22\"}\n{\"prompt\": \"33+48=\", \"completion\": \"81\"}\n\
         {\"prompt\": \"12+30=\", \"completion\": \"42 is the sum\"}\n{\"prompt\": \"50+21=\", \"completion\": \"71\"}\n",
    )
    .unwrap();
    let path = dir.join(format!("{out}.toml"));
    std::fs::write(
        &path,
        format!(
            "model = {:?}\ndata = {:?}\nout = {:?}\nsteps = 3\nbatch = 4\nlearning_rate = 1e-3\ntemplate = \"none\"\n\
             save_dtype = \"f32\"\nsample_prompts = 0\ndevice = {device:?}\n{extra}",
            fixture(MOE),
            data,
            dir.join(out),
        ),
    )
    .unwrap();
    path
}

fn ok(out: &Output, what: &str) -> String {
    let se = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{what}: {se}");
    se
}

const EP_LINE: &str = "routed experts split over 2 ranks (expert_parallel = 2)";

#[test]
fn grpo_expert_parallel_matches_data_parallel_and_one_rank_on_the_gpu() {
    if no_gpu("grpo_expert_parallel_matches_data_parallel_and_one_rank_on_the_gpu") {
        return;
    }
    let tmp = TempDir::new("grpo");
    let t = Instant::now();
    // Rank 0 evaluates after every step, alone: its decoding must not enter
    // the expert-parallel layer (a collective the other rank never joins).
    let eval = format!("eval_data = {:?}\neval_every = 1\n", tmp.0.join("train.jsonl"));
    let one = single(&["grpo", "--config"], &grpo_config(&tmp.0, "cuda", "one", &eval));
    ok(&one, "1 process");
    let dp = launch(2, &["grpo", "--config"], &grpo_config(&tmp.0, "cuda", "dp", &eval));
    let se = ok(&dp, "2 ranks");
    assert!(!se.contains(EP_LINE), "{se}");
    let ep = launch(
        2,
        &["grpo", "--config"],
        &grpo_config(&tmp.0, "cuda", "ep", &format!("expert_parallel = 2\n{eval}")),
    );
    let se = ok(&ep, "2 ranks, expert_parallel = 2");
    eprintln!("grpo: three runs {:.1} s", t.elapsed().as_secs_f64());
    assert!(
        se.contains("[rank 0] data parallel: 2 ranks") && se.contains(EP_LINE),
        "{se}"
    );
    assert!(se.contains("[rank 0] step 2/2"), "{se}");
    assert!(se.contains("eval pass@1"), "rank 0 did not evaluate: {se}");
    let fin = |run: &str| tmp.0.join(run).join("final");
    let (experts, all) = assert_same_weights(&fin("ep"), &fin("dp"), 1e-5, "expert parallel vs data parallel");
    assert_same_weights(&fin("ep"), &fin("one"), 1e-5, "expert parallel vs 1 process");
    assert!(
        experts > 1e-4 && all > 1e-4,
        "the routed experts did not move ({experts}, all weights {all}): the comparison would prove nothing"
    );
    // The logged metrics are the global batch's on both.
    let line = |run: &str| -> serde_json::Value {
        let text = std::fs::read_to_string(tmp.0.join(run).join("metrics.jsonl")).unwrap();
        serde_json::from_str(text.lines().last().unwrap()).unwrap()
    };
    let (m0, m1) = (line("dp"), line("ep"));
    for key in ["reward", "loss", "grad_norm", "completions/mean_length"] {
        let (x, y) = (m0[key].as_f64().unwrap(), m1[key].as_f64().unwrap());
        assert!(
            (x - y).abs() <= 1e-5 * (1.0 + x.abs()),
            "{key}: data parallel {x}, expert parallel {y}"
        );
    }
}

#[test]
fn sft_expert_parallel_matches_data_parallel_and_one_rank_on_the_gpu() {
    if no_gpu("sft_expert_parallel_matches_data_parallel_and_one_rank_on_the_gpu") {
        return;
    }
    let tmp = TempDir::new("sft");
    let t = Instant::now();
    let one = single(&["sft", "--config"], &sft_config(&tmp.0, "cuda", "one", ""));
    ok(&one, "1 process");
    let dp = launch(2, &["sft", "--config"], &sft_config(&tmp.0, "cuda", "dp", ""));
    ok(&dp, "2 ranks");
    let ep = launch(
        2,
        &["sft", "--config"],
        &sft_config(&tmp.0, "cuda", "ep", "expert_parallel = 2\n"),
    );
    let se = ok(&ep, "2 ranks, expert_parallel = 2");
    assert!(se.contains(EP_LINE), "{se}");
    // Each rank holds only its 4 of the 8 routed experts (rank 0 logs); its saved
    // model is the gathered whole (compared below).
    assert!(
        se.contains("[rank 0] sft: this rank holds routed experts 0..4 of 8"),
        "{se}"
    );
    // With the optimizer state sharded as well (ZeRO-1; the experts stay
    // whole on every rank).
    let zero = launch(
        2,
        &["sft", "--config"],
        &sft_config(&tmp.0, "cuda", "zero", "expert_parallel = 2\nzero_stage = 1\n"),
    );
    let se = ok(&zero, "2 ranks, expert_parallel = 2, zero_stage = 1");
    assert!(se.contains(EP_LINE) && se.contains("(ZeRO-1)"), "{se}");
    eprintln!("sft: four runs {:.1} s", t.elapsed().as_secs_f64());
    let dir = |run: &str| tmp.0.join(run);
    let (experts, all) = assert_same_weights(&dir("ep"), &dir("dp"), 1e-5, "expert parallel vs data parallel");
    assert_same_weights(&dir("ep"), &dir("one"), 1e-5, "expert parallel vs 1 process");
    assert_same_weights(
        &dir("zero"),
        &dir("dp"),
        1e-5,
        "expert parallel with ZeRO-1 vs data parallel",
    );
    assert!(
        experts > 1e-4 && all > 1e-4,
        "the routed experts did not move ({experts}, {all})"
    );
    let loss = |o: &Output, prefix: &str| -> f64 {
        let text = String::from_utf8_lossy(&o.stdout);
        let line = text.lines().find_map(|l| l.strip_prefix(prefix)).unwrap();
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        v["loss"].as_f64().unwrap()
    };
    let (l0, l1) = (loss(&one, ""), loss(&ep, "[rank 0] "));
    assert!(
        (l0 - l1).abs() <= 1e-5 * (1.0 + l0.abs()),
        "loss: 1 process {l0}, expert parallel {l1}"
    );
    // Every step's loss and gradient norm (AdamW's update barely depends
    // on the gradients' scale; the norm does).
    let steps = |run: &str| -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(tmp.0.join(run).join("metrics.jsonl")).unwrap();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    for (other, run) in [("one", "ep"), ("dp", "ep"), ("dp", "zero")] {
        let (a, b) = (steps(other), steps(run));
        assert_eq!(a.len(), 3, "{a:?}");
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            for key in ["loss", "grad_norm"] {
                let (x, y) = (x[key].as_f64().unwrap(), y[key].as_f64().unwrap());
                assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()), "{key}: {other} {x}, {run} {y}");
            }
        }
    }
}

/// A run that must fail with `want` in its errors.
fn refused(out: &Output, want: &str) {
    let se = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "ran: {se}");
    assert!(se.contains("expert_parallel") && se.contains(want), "{want}: {se}");
}

#[test]
fn bad_expert_parallel_values_are_refused_naming_the_key() {
    let tmp = TempDir::new("bad");
    // 0 is refused before anything runs; N > 1 needs N ranks.
    let cfg = grpo_config(&tmp.0, "cpu", "zero", "expert_parallel = 0\n");
    refused(&single(&["grpo", "--config"], &cfg), "must be at least 1");
    let cfg = sft_config(&tmp.0, "cpu", "zero-sft", "expert_parallel = 0\n");
    refused(&single(&["sft", "--config"], &cfg), "must be at least 1");
    let cfg = grpo_config(&tmp.0, "cpu", "one", "expert_parallel = 2\n");
    refused(&single(&["grpo", "--config"], &cfg), "must equal WORLD_SIZE");
    let cfg = sft_config(&tmp.0, "cpu", "one-sft", "expert_parallel = 2\n");
    refused(&single(&["sft", "--config"], &cfg), "must equal WORLD_SIZE");
    // On 2 ranks: the CPU has no expert parallelism.
    let cfg = grpo_config(&tmp.0, "cpu", "cpu", "expert_parallel = 2\n");
    refused(&launch(2, &["grpo", "--config"], &cfg), "runs on GPUs only");
    let cfg = sft_config(&tmp.0, "cpu", "cpu-sft", "expert_parallel = 2\n");
    refused(&launch(2, &["sft", "--config"], &cfg), "runs on GPUs only");
    // A dense model has no routed experts.
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("qwen3-moe-tiny", "qwen2-tiny");
    let dense = tmp.0.join("dense.toml");
    std::fs::write(&dense, text).unwrap();
    refused(&launch(2, &["sft", "--config"], &dense), "needs an MoE model");
}
