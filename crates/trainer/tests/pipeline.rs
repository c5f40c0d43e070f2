//! The whole recipe at toy scale: base -> R1-Zero -> R1 -> distilled dense
//! student, with the evaluation table.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use aha_moe_model::{Arch, Model};
use aha_trainer::pipeline::{run_pipeline, PipelineConfig};

#[test]
fn quick_pipeline_improves_at_each_stage_and_distils() {
    let out = std::env::temp_dir().join(format!("aha-pipeline-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let rows = run_pipeline(&PipelineConfig::toy(0, true), &out, &mut |l| eprintln!("{l}")).unwrap();
    let get = |name: &str| rows.iter().find(|r| r.model == name).unwrap().eval.clone();
    let (base, zero, r1, student) = (get("base"), get("r1-zero"), get("r1"), get("student"));
    eprintln!("base {base:?}\nr1-zero {zero:?}\nr1 {r1:?}\nstudent {student:?}");
    assert!(
        zero.pass_at_1 >= base.pass_at_1 + 0.2,
        "R1-Zero {} vs base {}",
        zero.pass_at_1,
        base.pass_at_1
    );
    assert!(
        r1.pass_at_1 >= zero.pass_at_1 - 0.05,
        "R1 {} vs R1-Zero {}",
        r1.pass_at_1,
        zero.pass_at_1
    );
    assert!(student.pass_at_1 >= 0.5, "student {}", student.pass_at_1);
    assert!(zero.cons_at_k >= 0.5 && r1.cons_at_k >= 0.5);
    assert!(out.join("table.json").is_file() && out.join("rejection_sampled.jsonl").is_file());
    let s = Model::load(&out.join("student")).unwrap();
    assert_eq!(s.config.arch, Arch::Qwen2);
    assert!(s.config.moe.is_none(), "the student is dense");
    assert!(s.params.len() < Model::load(&out.join("r1")).unwrap().params.len());
    let _ = std::fs::remove_dir_all(&out);
}

fn tiny(seed: u64) -> PipelineConfig {
    let mut cfg = PipelineConfig::toy(seed, true);
    cfg.demo.pretrain_steps = 300;
    cfg.demo.grpo_steps = 4;
    cfg.demo.prompts_per_step = 4;
    cfg.demo.num_generations = 4;
    cfg.demo.eval_problems = 10;
    cfg.sft_steps = 60;
    cfg.rejection_prompts = 16;
    cfg.rejection_k = 2;
    cfg.student_steps = 8;
    cfg.eval_k = 2;
    cfg
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
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

fn bits(dir: &std::path::Path) -> Vec<u32> {
    Model::load(dir).unwrap().params.iter().map(|x| x.to_bits()).collect()
}

/// A pipeline stopped in any stage (rewound to one of its checkpoints: in
/// the middle of R1-Zero's GRPO, at the start of R1's last SFT, in the
/// student's SFT) and resumed ends with the same weights, metrics and table
/// as the run that never stopped, without redoing finished stages; a resume
/// with another config is refused naming the key.
#[test]
fn an_interrupted_pipeline_resumes_to_the_same_models() {
    use aha_trainer::pipeline::{run_pipeline_with, PipelineOptions};
    let base = std::env::temp_dir().join(format!("aha-pipeline-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let cfg = tiny(3);
    let straight = base.join("straight");
    let opts = PipelineOptions {
        resume: false,
        save_every: 2,
    };
    let rows = run_pipeline_with(&cfg, &straight, opts, &mut |_| {}).unwrap();
    assert_eq!(rows.len(), 4);
    // metrics.jsonl without timings.
    let metrics = |d: &std::path::Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(d.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v.as_object_mut().unwrap().retain(|k, _| !k.starts_with("timing/"));
                v
            })
            .collect()
    };
    let want_metrics = metrics(&straight);
    // The run folder: config, a metrics line a step of every stage and one
    // per evaluated model, TensorBoard events, samples, plots, stage data.
    let lines = &want_metrics;
    let count = |phase: &str| lines.iter().filter(|l| l["phase"] == phase).count();
    assert_eq!(count("pretrain"), 300);
    assert_eq!(count("r1-zero"), 4);
    assert_eq!(count("r1-rl"), 2);
    assert_eq!(count("student"), 8);
    assert_eq!(count("eval"), 4);
    for f in [
        "config.json",
        "samples.jsonl",
        "plots/loss.png",
        "plots/reward.png",
        "plots/eval.png",
        "cold_start.jsonl",
        "teacher_traces.jsonl",
        "table.json",
    ] {
        assert!(straight.join(f).is_file(), "{f} missing");
    }
    assert!(std::fs::read_dir(&straight).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("events.out.tfevents.")));
    let want_student = bits(&straight.join("student"));
    let want_r1 = bits(&straight.join("r1"));
    for name in ["r1-zero-000002", "r1-sft-000000", "student-000004"] {
        assert!(straight.join("checkpoints").join(name).is_dir(), "{name} not saved");
        let d = base.join(name);
        copy_dir(&straight, &d);
        std::fs::write(d.join("checkpoints/latest"), name).unwrap();
        std::fs::remove_dir_all(d.join("student")).unwrap();
        let mut log = String::new();
        let resumed = PipelineOptions {
            resume: true,
            save_every: 2,
        };
        let got = run_pipeline_with(&cfg, &d, resumed, &mut |l| {
            log.push_str(l);
            log.push('\n')
        })
        .unwrap();
        assert!(
            log.contains(&format!("resuming {}", name.rsplit_once('-').unwrap().0)),
            "{log}"
        );
        // Finished stages are not run again.
        assert!(!log.contains("base: pretrained"), "{name}: {log}");
        assert_eq!(
            bits(&d.join("student")),
            want_student,
            "resumed from {name}: student differs"
        );
        assert_eq!(bits(&d.join("r1")), want_r1, "resumed from {name}: r1 differs");
        assert!(metrics(&d) == want_metrics, "resumed from {name}: metrics differ");
        let pass = |r: &[aha_trainer::pipeline::Row]| r.iter().map(|r| r.eval.pass_at_1).collect::<Vec<_>>();
        assert_eq!(pass(&got), pass(&rows));
        let _ = std::fs::remove_dir_all(&d);
    }
    // Another config is refused, naming the file and the key.
    let mut other = cfg.clone();
    other.student_steps = 9;
    let e = run_pipeline_with(
        &other,
        &straight,
        PipelineOptions {
            resume: true,
            save_every: 2,
        },
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("config.json") && e.contains("student_steps"), "{e}");
    let _ = std::fs::remove_dir_all(&base);
}
