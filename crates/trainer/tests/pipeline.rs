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
