//! The main job end to end: the quick demo must show R1-Zero's signature
//! (held-out accuracy up by a wide margin, format reward to ~1, longer
//! completions) and leave a complete run folder; the same seed must give the
//! same run.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use aha_moe_model::Model;
use aha_trainer::{run_demo, DemoConfig};

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("aha-demo-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn metric_lines(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn quick_demo_shows_the_aha_moment() {
    let out = tmp("quick");
    let s = run_demo(&DemoConfig::quick(0), &out, &mut |l| eprintln!("{l}")).unwrap();
    eprintln!("{s:?}");
    assert!(
        s.final_accuracy - s.base_accuracy >= 0.2,
        "accuracy {} -> {}",
        s.base_accuracy,
        s.final_accuracy
    );
    assert!(s.final_format >= 0.9, "format {}", s.final_format);
    assert!(
        s.final_length > s.base_length + 5.0,
        "length {} -> {}",
        s.base_length,
        s.final_length
    );

    // The run folder.
    for f in [
        "config.json",
        "metrics.jsonl",
        "samples.jsonl",
        "checkpoint/config.json",
        "checkpoint/tokenizer.json",
    ] {
        assert!(out.join(f).is_file(), "missing {f}");
    }
    for p in ["reward", "accuracy", "length", "kl"] {
        let bytes = std::fs::read(out.join(format!("plots/{p}.png"))).unwrap();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "{p}.png is not a PNG");
    }
    let lines = metric_lines(&out);
    let grpo: Vec<_> = lines.iter().filter(|l| l["phase"] == "grpo").collect();
    assert_eq!(grpo.len(), 40);
    for key in [
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "rewards/accuracy/mean",
        "rewards/format/mean",
        "kl",
        "completions/mean_length",
        "completions/clipped_ratio",
    ] {
        assert!(grpo[0].get(key).is_some_and(|v| v.is_number()), "metric {key} missing");
    }
    // The checkpoint is an HF folder our loader (and so the sampler) reads back,
    // and the math evaluator scores it: pass@1 at temperature 0.6 over 4 samples.
    let m = Model::load(&out.join("checkpoint")).unwrap();
    assert_eq!(m.config.arch, aha_moe_model::Arch::DeepseekV3);
    let tok = aha_sampler::load_tokenizer(&out.join("checkpoint")).unwrap();
    let problems: Vec<_> = aha_trainer::toy::test_set(aha_trainer::toy::TaskSpec::default(), 50);
    let prompts: Vec<Vec<u32>> = problems
        .iter()
        .map(|p| aha_trainer::toy::encode(&tok, &p.prompt()).unwrap())
        .collect();
    let golds: Vec<String> = problems.iter().map(|p| p.answer().to_string()).collect();
    let params = aha_sampler::SamplingParams {
        temperature: 0.6,
        top_p: 0.95,
        max_new_tokens: 40,
        stop_token_ids: vec![aha_trainer::toy::EOS],
        ..Default::default()
    };
    let (ev, per, _) = aha_trainer::eval::evaluate_math(&m, &tok, &prompts, &golds, 4, &params).unwrap();
    eprintln!("{ev:?}");
    assert_eq!(per.len(), problems.len());
    assert!(
        ev.pass_at_1 >= 0.8 && ev.pass_at_k >= ev.pass_at_1 && ev.cons_at_k >= 0.8,
        "{ev:?}"
    );
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn the_same_seed_gives_the_same_run() {
    let cfg = DemoConfig {
        pretrain_steps: 20,
        grpo_steps: 3,
        eval_every: 3,
        eval_problems: 20,
        prompts_per_step: 4,
        num_generations: 4,
        ..DemoConfig::quick(7)
    };
    let (a, b) = (tmp("seed-a"), tmp("seed-b"));
    run_demo(&cfg, &a, &mut |_| {}).unwrap();
    run_demo(&cfg, &b, &mut |_| {}).unwrap();
    let strip = |mut v: serde_json::Value| {
        if let Some(o) = v.as_object_mut() {
            o.retain(|k, _| !k.starts_with("timing/") && k != "summary");
        }
        v
    };
    let (la, lb): (Vec<_>, Vec<_>) = (
        metric_lines(&a).into_iter().map(strip).collect(),
        metric_lines(&b).into_iter().map(strip).collect(),
    );
    assert_eq!(la, lb, "two runs with the same seed differ");
    let (ma, mb) = (
        Model::load(&a.join("checkpoint")).unwrap(),
        Model::load(&b.join("checkpoint")).unwrap(),
    );
    assert!(
        ma.params
            .iter()
            .zip(&mb.params)
            .all(|(x, y)| x.to_bits() == y.to_bits()),
        "weights differ"
    );
    let _ = std::fs::remove_dir_all(&a);
    let _ = std::fs::remove_dir_all(&b);
}

#[test]
fn multiplication_and_countdown_demos_run_and_learn_the_format() {
    use aha_trainer::toy::{Task, TaskSpec};
    for task in [Task::Multiplication, Task::Countdown] {
        let cfg = DemoConfig {
            pretrain_steps: 600,
            grpo_steps: 14,
            eval_every: 7,
            eval_problems: 48,
            ..DemoConfig::quick(1)
        }
        .with_task(TaskSpec { task, digits: 3 })
        .unwrap();
        let out = tmp(task.name());
        let s = run_demo(&cfg, &out, &mut |l| eprintln!("{l}")).unwrap();
        eprintln!("{}: {s:?}", task.name());
        assert!(
            s.final_format - s.base_format >= 0.5,
            "{}: format {} -> {}",
            task.name(),
            s.base_format,
            s.final_format
        );
        let samples = std::fs::read_to_string(out.join("samples.jsonl")).unwrap();
        let first: serde_json::Value = serde_json::from_str(samples.lines().next().unwrap()).unwrap();
        let prompt = first["prompt"].as_str().unwrap();
        match task {
            Task::Multiplication => assert!(prompt.contains('*') && prompt.len() == 6, "{prompt}"),
            _ => assert!(prompt.matches(',').count() == 2, "{prompt}"),
        }
        let saved: DemoConfig =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(saved.task, task);
        let _ = std::fs::remove_dir_all(&out);
    }
}
