//! Training on the GPU against the same training on the CPU (same seed,
//! f32): the demo end to end (pretraining, the reference copy, GRPO with
//! the loss on the device, evaluation, the final checkpoint), and GRPO
//! updates with rewards that differ within every group, several iterations
//! and minibatches, KL and an entropy bonus. Per-step GRPO losses must stay
//! within 1e-3 relative of the CPU's and the weights close (the two differ
//! only in f32 summation order). Without a GPU each test prints "skipped:
//! no GPU".
//!
//! Size: the emulated GPU (CI) runs every CUDA thread as a CPU fiber; the
//! warp-per-row f32 attention kernels dominate (`AHA_EMU_PROFILE=1`: 70% of
//! the time), about 4 s per step of 8 sequences, so `--quick` (1,500
//! pretraining steps of 64 sequences, 40 GRPO steps of 128 completions)
//! would take hours there. This test runs the same recipe at 24
//! pretraining steps of 4 sequences and 6 GRPO steps of 2 prompts x 4
//! completions (about a minute on 2 cores); on a real GPU,
//! `scripts/gpu-check.sh` runs the whole `aha demo --quick --device cuda`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::LengthMod3;

use std::path::{Path, PathBuf};

use aha_moe_model::Precision;
use aha_tensor::Device;
use aha_trainer::{run_demo_with, DemoConfig, RunOptions};

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("aha-gpu-demo-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Largest |a - b| over the largest |b|.
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, &x| m.max(x.abs())).max(1e-12);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn grpo_losses(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l["phase"] == "grpo")
        .map(|l| l["loss"].as_f64().unwrap())
        .collect()
}

#[test]
fn demo_on_the_gpu_follows_the_cpu_run_cuda() {
    if let Some(reason) = aha_cuda_kernels::no_gpu_reason() {
        eprintln!("demo_on_the_gpu_follows_the_cpu_run_cuda: skipped: no GPU ({reason})");
        return;
    }
    let cfg = DemoConfig {
        pretrain_steps: 24,
        pretrain_batch: 4,
        grpo_steps: 6,
        prompts_per_step: 2,
        num_generations: 4,
        eval_every: 3,
        eval_problems: 40,
        ..DemoConfig::quick(0)
    };
    let run = |device: Device, tag: &str| {
        let out = tmp(tag);
        let opts = RunOptions {
            device,
            precision: Precision::F32,
            ..RunOptions::default()
        };
        let t0 = std::time::Instant::now();
        let s = run_demo_with(&cfg, &out, opts, &mut |_| {}).unwrap();
        eprintln!(
            "{tag}: {:.1} s, accuracy {:.3} -> {:.3}",
            t0.elapsed().as_secs_f64(),
            s.base_accuracy,
            s.final_accuracy
        );
        (s, grpo_losses(&out), out)
    };
    let (cs, cl, cdir) = run(Device::Cpu, "cpu");
    let (gs, gl, gdir) = run(Device::Cuda(0), "gpu");
    assert_eq!(cl.len(), 6);
    assert_eq!(gl.len(), 6);
    for (i, (c, g)) in cl.iter().zip(&gl).enumerate() {
        let rel = (c - g).abs() / c.abs().max(1e-6);
        eprintln!("grpo step {}: loss cpu {c:.6e} gpu {g:.6e} (relative {rel:.2e})", i + 1);
        assert!(
            rel <= 1e-3,
            "grpo step {}: loss {g} on the GPU vs {c} on the CPU",
            i + 1
        );
    }
    assert!(
        (cs.final_accuracy - gs.final_accuracy).abs() <= 0.03,
        "final accuracy {} on the GPU vs {} on the CPU",
        gs.final_accuracy,
        cs.final_accuracy
    );
    // The final weights (24 pretraining and 6 GRPO updates on each side).
    let w = |d: &Path| aha_moe_model::Model::load(&d.join("checkpoint")).unwrap().params;
    let rel = rel_diff(&w(&gdir), &w(&cdir));
    eprintln!("final weights: relative difference {rel:.2e}");
    assert!(rel <= 1e-3, "final weights differ by {rel} of their scale");
    let _ = std::fs::remove_dir_all(cdir);
    let _ = std::fs::remove_dir_all(gdir);
}

#[test]
fn grpo_updates_on_the_gpu_match_the_cpu_cuda() {
    use aha_moe_model::{Model, ModelConfig, Policy};
    use aha_trainer::optim::{OptimConfig, Optimizer, Schedule};
    use aha_trainer::rl::{rollout, train_on, Scoring};
    use aha_trainer::toy;
    if let Some(reason) = aha_cuda_kernels::no_gpu_reason() {
        eprintln!("grpo_updates_on_the_gpu_match_the_cpu_cuda: skipped: no GPU ({reason})");
        return;
    }
    let demo = DemoConfig::quick(0);
    let mcfg = ModelConfig::from_json_str(&demo.model_config_json().to_string(), Path::new("demo")).unwrap();
    let model = Model::random(mcfg, 7, 0.05);
    let tok = toy::tokenizer().unwrap();
    let mut rng = toy::Rng::new(3);
    let problems: Vec<toy::Problem> = (0..3).map(|_| toy::problem(&mut rng, demo.spec(), false)).collect();
    let prompts = toy::encode_prompts(&tok, &problems).unwrap();
    let mut step = demo.grpo_step_config();
    step.num_generations = 4;
    step.sampling.max_new_tokens = 12;
    step.sampling.temperature = 0.8;
    step.num_iterations = 2;
    step.minibatches = 2;
    step.loss.beta = 0.04;
    step.loss.entropy_coef = 0.01;
    let sum = aha_rewards::WeightedSum::new().add(LengthMod3, 1.0);
    let examples = vec![aha_rewards::Example::new(); prompts.len()];
    let batch = aha_rewards::BatchConfig::default();
    let rewards = Scoring {
        rewards: &sum,
        examples: &examples,
        batch: &batch,
    };
    let cfg = OptimConfig {
        lr: 1e-3,
        warmup_steps: 0,
        total_steps: 10,
        schedule: Schedule::Constant,
        weight_decay: 0.01,
        max_grad_norm: 1.0,
        max_bad_steps: 2,
    };
    let place = |d| Policy::new(model.clone(), d, Precision::F32).unwrap();
    let (mut cpu, mut gpu) = (place(Device::Cpu), place(Device::Cuda(0)));
    let (rc, rg) = (place(Device::Cpu), place(Device::Cuda(0)));
    let (mut oc, mut og) = (Optimizer::new(cfg), Optimizer::new(cfg));
    for s in 0..3 {
        // The same rollouts for both sides (sampled from the CPU policy).
        step.sampling.seed = 11 + s;
        let r = rollout(&cpu, &tok, &prompts, &rewards, &step).unwrap();
        let mc = train_on(&mut cpu, Some(&rc), &mut oc, &r, &["length_mod_3"], &step).unwrap();
        let mg = train_on(&mut gpu, Some(&rg), &mut og, &r, &["length_mod_3"], &step).unwrap();
        for key in ["loss", "kl", "entropy", "grad_norm"] {
            let (c, g) = (mc[key], mg[key]);
            let rel = (c - g).abs() / c.abs().max(1e-9);
            eprintln!("step {s}: {key} cpu {c:.6e} gpu {g:.6e} (relative {rel:.1e})");
            assert!(rel <= 1e-3, "step {s}: {key} {g} on the GPU vs {c} on the CPU");
        }
        assert!(mc["loss"] != 0.0, "the rewards must give the step something to learn");
        let rel = rel_diff(&gpu.params_to_host().unwrap(), &cpu.params_to_host().unwrap());
        eprintln!("step {s}: weights relative difference {rel:.2e}");
        assert!(rel <= 1e-5, "step {s}: weights differ by {rel} of their scale");
    }
}

/// LoRA GRPO updates on the GPU against the CPU: the adapters' gradients
/// and AdamW, the KL against the base (adapters switched off on the
/// device), and the base weights unmoved on the device.
#[test]
fn lora_grpo_updates_on_the_gpu_match_the_cpu_cuda() {
    lora_grpo_on_both("lora_grpo_updates_on_the_gpu_match_the_cpu_cuda", 0.0);
}

/// The same with LoRA dropout 0.1: the training forwards draw the same
/// masks on both devices, the scoring forwards none.
#[test]
fn lora_dropout_grpo_updates_on_the_gpu_match_the_cpu_cuda() {
    lora_grpo_on_both("lora_dropout_grpo_updates_on_the_gpu_match_the_cpu_cuda", 0.1);
}

fn lora_grpo_on_both(name: &str, dropout: f32) {
    use aha_moe_model::lora::{is_adapter, LoraConfig};
    use aha_moe_model::{Model, ModelConfig, Policy};
    use aha_trainer::optim::{OptimConfig, Optimizer, Schedule};
    use aha_trainer::rl::{rollout, train_on, Scoring};
    use aha_trainer::toy;
    if let Some(reason) = aha_cuda_kernels::no_gpu_reason() {
        eprintln!("{name}: skipped: no GPU ({reason})");
        return;
    }
    let demo = DemoConfig::quick(0);
    let mcfg = ModelConfig::from_json_str(&demo.model_config_json().to_string(), Path::new("demo")).unwrap();
    let lora = LoraConfig {
        r: 4,
        alpha: 8.0,
        target_modules: ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "mlp.down_proj"]
            .map(String::from)
            .to_vec(),
        dropout,
        ..LoraConfig::default()
    };
    let mut model = Model::random(mcfg, 7, 0.05).with_lora(&lora, 2).unwrap();
    let entries: Vec<_> = model.layout.entries.iter().filter(|e| is_adapter(e)).cloned().collect();
    for (i, e) in entries.iter().enumerate() {
        for (j, v) in e.slot.of_mut(&mut model.params).iter_mut().enumerate() {
            *v += (((i * 13 + j * 7) % 11) as f32 - 5.0) * 0.01;
        }
    }
    let tok = toy::tokenizer().unwrap();
    let mut rng = toy::Rng::new(3);
    let problems: Vec<toy::Problem> = (0..2).map(|_| toy::problem(&mut rng, demo.spec(), false)).collect();
    let prompts = toy::encode_prompts(&tok, &problems).unwrap();
    let mut step = demo.grpo_step_config();
    step.num_generations = 4;
    step.sampling.max_new_tokens = 10;
    step.sampling.temperature = 0.8;
    step.loss.beta = 0.04;
    let sum = aha_rewards::WeightedSum::new().add(LengthMod3, 1.0);
    let examples = vec![aha_rewards::Example::new(); prompts.len()];
    let batch = aha_rewards::BatchConfig::default();
    let rewards = Scoring {
        rewards: &sum,
        examples: &examples,
        batch: &batch,
    };
    let cfg = OptimConfig {
        lr: 1e-3,
        warmup_steps: 0,
        total_steps: 10,
        schedule: Schedule::Constant,
        weight_decay: 0.01,
        max_grad_norm: 1.0,
        max_bad_steps: 2,
    };
    let place = |d| Policy::new(model.clone(), d, Precision::F32).unwrap();
    let (mut cpu, mut gpu) = (place(Device::Cpu), place(Device::Cuda(0)));
    let (mut oc, mut og) = (Optimizer::new(cfg), Optimizer::new(cfg));
    for s in 0..2 {
        step.sampling.seed = 5 + s;
        let r = rollout(&cpu, &tok, &prompts, &rewards, &step).unwrap();
        let mc = train_on(&mut cpu, None, &mut oc, &r, &["length_mod_3"], &step).unwrap();
        let mg = train_on(&mut gpu, None, &mut og, &r, &["length_mod_3"], &step).unwrap();
        for key in ["loss", "kl", "grad_norm"] {
            let (c, g) = (mc[key], mg[key]);
            let rel = (c - g).abs() / c.abs().max(1e-9);
            eprintln!("LoRA step {s}: {key} cpu {c:.6e} gpu {g:.6e} (relative {rel:.1e})");
            assert!(rel <= 1e-3, "step {s}: {key} {g} on the GPU vs {c} on the CPU");
        }
        assert!(mc["kl"] > 0.0);
        let rel = rel_diff(&gpu.params_to_host().unwrap(), &cpu.params_to_host().unwrap());
        eprintln!("LoRA step {s}: weights relative difference {rel:.2e}");
        assert!(rel <= 1e-5, "step {s}: weights differ by {rel} of their scale");
    }
    let after = gpu.params_to_host().unwrap();
    for e in model.layout.entries.iter().filter(|e| !is_adapter(e)) {
        assert_eq!(
            e.slot.of(&after),
            e.slot.of(&model.params),
            "{} moved on the GPU",
            e.name
        );
    }
}

/// Three GRPO steps on the GPU, each sampling its rollouts twice from the
/// same weights: with a fresh engine (`rl::rollout`: a new KV pool and
/// new decode graphs every step) and with the engine state kept across
/// steps (`rl::rollout_kept`, as `aha grpo` runs). The kept state gives
/// the fresh engine's completions after every optimizer step (the graphs
/// replay over the weights updated in place), allocates one pool for the
/// run and captures fewer graphs; the driver calls of both are printed.
#[test]
fn grpo_steps_reuse_the_rollout_pool_and_graphs_cuda() {
    use aha_moe_model::{Model, ModelConfig, Policy, PolicyModel};
    use aha_trainer::optim::{OptimConfig, Optimizer, Schedule};
    use aha_trainer::rl::{rollout, rollout_kept, train_on, Rollouts, Scoring};
    use aha_trainer::toy;
    if let Some(reason) = aha_cuda_kernels::no_gpu_reason() {
        eprintln!("grpo_steps_reuse_the_rollout_pool_and_graphs_cuda: skipped: no GPU ({reason})");
        return;
    }
    let demo = DemoConfig::quick(0);
    let mcfg = ModelConfig::from_json_str(&demo.model_config_json().to_string(), Path::new("demo")).unwrap();
    let tok = toy::tokenizer().unwrap();
    let mut rng = toy::Rng::new(3);
    let problems: Vec<toy::Problem> = (0..2).map(|_| toy::problem(&mut rng, demo.spec(), false)).collect();
    let prompts = toy::encode_prompts(&tok, &problems).unwrap();
    let mut step = demo.grpo_step_config();
    step.num_generations = 4;
    step.sampling.max_new_tokens = 10;
    step.sampling.temperature = 0.8;
    step.loss.beta = 0.0;
    let sum = aha_rewards::WeightedSum::new().add(LengthMod3, 1.0);
    let examples = vec![aha_rewards::Example::new(); prompts.len()];
    let batch = aha_rewards::BatchConfig::default();
    let rewards = Scoring {
        rewards: &sum,
        examples: &examples,
        batch: &batch,
    };
    let mut opt = Optimizer::new(OptimConfig {
        lr: 1e-3,
        warmup_steps: 0,
        total_steps: 10,
        schedule: Schedule::Constant,
        weight_decay: 0.01,
        max_grad_norm: 1.0,
        max_bad_steps: 2,
    });
    let mut policy = Policy::new(Model::random(mcfg, 7, 0.05), Device::Cuda(0), Precision::F32).unwrap();
    let identity = |p: &Policy| match p.model() {
        PolicyModel::Gpu(g) => g.identity(),
        PolicyModel::Cpu(_) => panic!("not on the GPU"),
    };
    let mut cache = aha_sampler::EngineCache::new();
    let counted = |f: &mut dyn FnMut() -> Rollouts| {
        let before = aha_cuda_kernels::emulate::driver_counts();
        let r = f();
        let calls = aha_cuda_kernels::emulate::driver_counts()
            .zip(before)
            .map(|(a, b)| a.since(b));
        (r, calls)
    };
    let (mut fresh_work, mut kept_work) = (Vec::new(), Vec::new());
    for s in 0..3u64 {
        step.sampling.seed = 11 + s;
        let (fresh, cf) = counted(&mut || rollout(&policy, &tok, &prompts, &rewards, &step).unwrap());
        let (kept, ck) = counted(&mut || rollout_kept(&policy, &tok, &prompts, &rewards, &step, &mut cache).unwrap());
        eprintln!("step {}: fresh engine {:?}\n  {cf:?}", s + 1, fresh.engine);
        eprintln!("step {}: kept engine {:?}\n  {ck:?}", s + 1, kept.engine);
        assert_eq!(fresh.completions.len(), kept.completions.len());
        for (f, k) in fresh.completions.iter().zip(&kept.completions) {
            assert_eq!(f.token_ids, k.token_ids, "step {}", s + 1);
            for (a, b) in f.logprobs.iter().zip(&k.logprobs) {
                assert!((a - b).abs() < 1e-4, "step {}: log-prob {a} vs {b}", s + 1);
            }
        }
        fresh_work.push(fresh.engine);
        kept_work.push(kept.engine);
        let id = identity(&policy);
        let m = train_on(&mut policy, None, &mut opt, &kept, &["length_mod_3"], &step).unwrap();
        assert!(m["grad_norm"] > 0.0, "step {}: nothing learned", s + 1);
        assert_eq!(identity(&policy), id, "the optimizer step moved the weights");
    }
    let pools = |w: &[aha_trainer::rl::EngineWork]| w.iter().map(|e| e.pools_allocated).collect::<Vec<_>>();
    assert_eq!(pools(&fresh_work), [1, 1, 1]);
    assert_eq!(pools(&kept_work), [1, 0, 0]);
    let captured = |w: &[aha_trainer::rl::EngineWork]| w[1..].iter().map(|e| e.graphs_captured).sum::<usize>();
    assert!(
        captured(&kept_work) < captured(&fresh_work),
        "graphs captured in steps 2 and 3: kept {kept_work:?}, fresh {fresh_work:?}"
    );
    assert!(kept_work[1].graph_steps >= fresh_work[1].graph_steps);
}
