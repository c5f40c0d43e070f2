//! The run driver on its own: exact resume at every step boundary, the
//! reference reset at its interval, the non-finite guard, the logs' cursor
//! and the config check, with a small supervised stage on the toy task.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use aha_moe_model::{Model, ModelConfig, Policy, Precision};
use aha_trainer::driver::{step_metrics, Driver, RunSpec, Stage, State, Steps};
use aha_trainer::optim::{sft_step, OptimConfig, Optimizer, Schedule};
use aha_trainer::rng::Rng;
use aha_trainer::run_folder::json_value;
use aha_trainer::toy::{self, TaskSpec};
use aha_trainer::DemoConfig;

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("aha-driver-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn optimizer(max_bad_steps: usize) -> Optimizer {
    Optimizer::new(OptimConfig {
        lr: 3e-3,
        warmup_steps: 2,
        total_steps: 8,
        schedule: Schedule::Cosine,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        max_bad_steps,
    })
}

/// A small random model whose own files (written to `src`) its saves copy.
fn model(src: &Path) -> Model {
    let cfg = DemoConfig {
        hidden_size: 32,
        ..DemoConfig::quick(3)
    };
    let json = cfg.model_config_json().to_string();
    std::fs::create_dir_all(src).unwrap();
    std::fs::write(src.join("config.json"), &json).unwrap();
    let mcfg = ModelConfig::from_json_str(&json, &src.join("config.json")).unwrap();
    let mut m = Model::random(mcfg, 3, 0.02);
    m.source_dir = Some(src.to_path_buf());
    m
}

fn policy(m: Model) -> Policy {
    Policy::new(m, aha_tensor::Device::Cpu, Precision::F32).unwrap()
}

/// SFT on fresh toy problems drawn from the run's RNG; steps in `poison`
/// get NaN gradients (the update must be refused). Records the weights
/// after each step and the reference's weights at each step.
struct Sft {
    tok: aha_sampler::Tokenizer,
    poison: Vec<usize>,
    after_step: Vec<(usize, Vec<f32>)>,
    reference_at: Vec<(usize, Vec<f32>)>,
}

impl Sft {
    fn new(poison: Vec<usize>) -> Sft {
        Sft {
            tok: toy::tokenizer().unwrap(),
            poison,
            after_step: Vec::new(),
            reference_at: Vec::new(),
        }
    }
}

impl Stage for Sft {
    fn step(
        &mut self,
        step: usize,
        st: &mut State,
        _log: &mut dyn FnMut(&str),
    ) -> aha_trainer::Result<Option<aha_grpo::Metrics>> {
        let batch: Vec<(Vec<u32>, Vec<u32>)> = (0..4)
            .map(|_| {
                let p = toy::problem(&mut st.rng, TaskSpec::default(), false);
                let mut c = toy::encode(&self.tok, &p.reasoning()).unwrap();
                c.push(toy::EOS);
                (toy::encode(&self.tok, &p.prompt()).unwrap(), c)
            })
            .collect();
        if self.poison.contains(&step) {
            st.policy.zero_grad()?;
            st.policy.set_grads(&vec![f32::NAN; st.policy.num_params()])?;
            let info = st.opt.update(&mut st.policy)?;
            return Ok(Some(step_metrics(f64::NAN, &info)));
        }
        let (loss, info) = sft_step(&mut st.policy, &mut st.opt, &batch, toy::PAD)?;
        Ok(Some(step_metrics(loss, &info)))
    }

    fn after(
        &mut self,
        step: usize,
        st: &State,
        _m: &mut aha_grpo::Metrics,
        run: &mut Driver,
        _log: &mut dyn FnMut(&str),
    ) -> aha_trainer::Result<()> {
        self.after_step.push((step, st.policy.params_to_host()?));
        if let Some(r) = &st.reference {
            self.reference_at.push((step, r.params_to_host()?));
        }
        run.sample(&serde_json::json!({ "step": step }))
    }

    fn extra(&self) -> aha_trainer::Result<serde_json::Map<String, serde_json::Value>> {
        let mut m = serde_json::Map::new();
        m.insert("steps_seen".into(), self.after_step.len().into());
        Ok(m)
    }
}

const CONFIG: &str = "{\"lr\": 0.003}";

fn spec(dir: &Path, resume: bool) -> RunSpec<'_> {
    RunSpec {
        dir,
        config_file: "config.json",
        config_text: CONFIG,
        parse: &json_value,
        moved: &[],
        resume,
        tensorboard: true,
        writer: true,
    }
}

/// Runs (or resumes) `total` steps in `dir`, saving every step; returns the
/// final weights and the log.
fn drive(dir: &Path, resume: bool, total: usize, poison: Vec<usize>) -> (Vec<f32>, Vec<String>, Sft) {
    let mut lines = Vec::new();
    let (mut run, loaded) = Driver::open(&spec(dir, resume), &mut |l| lines.push(l.to_string())).unwrap();
    let (mut st, start) = match loaded {
        Some(l) => {
            let mut m = l.model;
            m.source_dir = Some(dir.join("model-files"));
            let p = policy(m);
            let mut opt = optimizer(1);
            opt.restore(&p, l.moments.0, l.moments.1, l.state.opt_step, l.state.opt_bad)
                .unwrap();
            let st = State {
                policy: p,
                reference: l.reference.map(|mut r| {
                    r.source_dir = Some(dir.join("model-files"));
                    policy(r)
                }),
                opt,
                rng: Rng::from_state(l.state.rng),
            };
            (st, l.state.step)
        }
        None => {
            let m = model(&dir.join("model-files"));
            let st = State {
                policy: policy(m.clone()),
                reference: Some(policy(m)),
                opt: optimizer(1),
                rng: Rng::new(7),
            };
            (st, 0)
        }
    };
    let steps = Steps {
        start,
        total,
        save_every: 1,
        ..Steps::new("sft")
    };
    let mut stage = Sft::new(poison);
    run.run(&steps, &mut st, &mut stage, &mut |l| lines.push(l.to_string()))
        .unwrap();
    (st.policy.params_to_host().unwrap(), lines, stage)
}

fn read_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
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

/// A run rewound to the checkpoint of every step boundary and resumed ends
/// with the straight run's metrics, samples and weights, bit for bit.
#[test]
fn resuming_at_every_step_boundary_matches_the_straight_run() {
    let straight = tmp("straight");
    let total = 4;
    let (want_w, _, _) = drive(&straight, false, total, vec![]);
    let want_m = read_lines(&straight.join("metrics.jsonl"));
    let want_s = std::fs::read_to_string(straight.join("samples.jsonl")).unwrap();
    assert_eq!(want_m.len(), total);
    assert_eq!(want_s.lines().count(), total);
    // A checkpoint after every step but the last.
    for k in 1..total {
        let name = format!("sft-{k:06}");
        assert!(straight.join("checkpoints").join(&name).is_dir(), "{name}");
        let d = tmp(&format!("from-{k}"));
        copy_dir(&straight, &d);
        std::fs::write(d.join("checkpoints/latest"), &name).unwrap();
        let (got_w, log, stage) = drive(&d, true, total, vec![]);
        assert!(log.iter().any(|l| l.contains(&format!("at step {k}"))), "{log:?}");
        assert_eq!(
            stage.after_step.first().map(|s| s.0),
            Some(k + 1),
            "resumed at the step after {k}"
        );
        assert_eq!(
            read_lines(&d.join("metrics.jsonl")),
            want_m,
            "resumed from {name}: metrics differ"
        );
        assert_eq!(
            std::fs::read_to_string(d.join("samples.jsonl")).unwrap(),
            want_s,
            "resumed from {name}: samples differ"
        );
        assert_eq!(bits(&got_w), bits(&want_w), "resumed from {name}: weights differ");
        let state = aha_trainer::checkpoint::load_latest(&d.join("checkpoints"))
            .unwrap()
            .unwrap()
            .state;
        assert_eq!(state.extra["samples_lines"], serde_json::json!(total - 1));
        let _ = std::fs::remove_dir_all(&d);
    }
    // Resuming with another config is refused, naming the file and the key.
    let other = RunSpec {
        config_text: "{\"lr\": 0.01}",
        ..spec(&straight, true)
    };
    let e = Driver::open(&other, &mut |_| {}).err().unwrap().to_string();
    assert!(e.contains("config.json") && e.contains("lr"), "{e}");
    // A fresh start in the folder removes the earlier run's checkpoints.
    Driver::open(&spec(&straight, false), &mut |_| {}).unwrap();
    assert!(!straight.join("checkpoints").exists());
    let _ = std::fs::remove_dir_all(&straight);
}

/// With `reference_reset_every = 2` the reference is the initial model for
/// steps 1-2, the policy after step 2 for steps 3-4, the policy after step
/// 4 at step 5; each reset is logged.
#[test]
fn the_reference_is_reset_at_its_interval() {
    let dir = tmp("reset");
    let mut log = Vec::new();
    let (mut run, _) = Driver::open(&spec(&dir, false), &mut |_| {}).unwrap();
    let m = model(&dir.join("model-files"));
    let initial = m.params.clone();
    let mut st = State {
        policy: policy(m.clone()),
        reference: Some(policy(m)),
        opt: optimizer(1),
        rng: Rng::new(1),
    };
    let steps = Steps {
        total: 5,
        reference_reset_every: 2,
        ..Steps::new("sft")
    };
    let mut stage = Sft::new(vec![]);
    run.run(&steps, &mut st, &mut stage, &mut |l| log.push(l.to_string()))
        .unwrap();
    let policy_after = |k: usize| bits(&stage.after_step[k - 1].1);
    let reference_at = |k: usize| bits(&stage.reference_at[k - 1].1);
    assert_eq!(reference_at(1), bits(&initial));
    assert_eq!(reference_at(2), bits(&initial));
    assert_eq!(reference_at(3), policy_after(2));
    assert_eq!(reference_at(4), policy_after(2));
    assert_eq!(reference_at(5), policy_after(4));
    assert_ne!(policy_after(2), policy_after(4));
    let resets: Vec<&String> = log.iter().filter(|l| l.contains("reference reset")).collect();
    assert_eq!(resets.len(), 2, "{log:?}");
    assert!(
        resets[0].starts_with("step 3:") && resets[1].starts_with("step 5:"),
        "{resets:?}"
    );
    // No reset configured: the reference never moves.
    let steps = Steps {
        total: 3,
        ..Steps::new("sft")
    };
    let m = model(&dir.join("model-files"));
    let mut st = State {
        policy: policy(m.clone()),
        reference: Some(policy(m)),
        opt: optimizer(1),
        rng: Rng::new(1),
    };
    let mut stage = Sft::new(vec![]);
    run.run(&steps, &mut st, &mut stage, &mut |_| {}).unwrap();
    assert!(stage.reference_at.iter().all(|(_, r)| bits(r) == bits(&initial)));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A step with NaN gradients is refused: the weights stay those of the step
/// before, the note names the step, the run goes on and its checkpoint
/// resumes exactly; a second refusal in a row (over `max_bad_steps` = 1)
/// aborts the run with an error and leaves the latest checkpoint as it was.
#[test]
fn the_non_finite_guard_refuses_a_step_without_corrupting_the_run() {
    let dir = tmp("guard");
    let (w, log, stage) = drive(&dir, false, 4, vec![3]);
    let after = |k: usize| bits(&stage.after_step[k - 1].1);
    assert_eq!(after(3), after(2), "a refused step changed the weights");
    assert_ne!(after(4), after(3), "the run did not go on after the refused step");
    assert!(w.iter().all(|x| x.is_finite()));
    assert!(
        log.iter()
            .any(|l| l.starts_with("sft 3: skipped update 3") && l.contains("gradient norm NaN")),
        "{log:?}"
    );
    let m = read_lines(&dir.join("metrics.jsonl"));
    assert!(m[2]["loss"].is_null(), "a NaN loss is written as null: {}", m[2]);
    // The checkpoint taken after the refused step holds step 2's weights
    // and the refusal count, and resumes to the same end.
    let l = aha_trainer::checkpoint::load_latest(&dir.join("checkpoints"))
        .unwrap()
        .unwrap();
    assert_eq!(l.state.step, 3);
    assert_eq!(l.state.opt_bad, 1);
    assert_eq!(bits(&l.model.params), after(2));
    let d2 = tmp("guard-resumed");
    copy_dir(&dir, &d2);
    std::fs::write(d2.join("checkpoints/latest"), "sft-000002").unwrap();
    let (w2, _, _) = drive(&d2, true, 4, vec![3]);
    assert_eq!(bits(&w2), bits(&w));

    // Two refusals in a row: the run stops with an error naming the cause.
    let d3 = tmp("guard-abort");
    let (mut run, _) = Driver::open(&spec(&d3, false), &mut |_| {}).unwrap();
    let m0 = model(&d3.join("model-files"));
    let mut st = State {
        policy: policy(m0.clone()),
        reference: None,
        opt: optimizer(1),
        rng: Rng::new(7),
    };
    let steps = Steps {
        total: 5,
        save_every: 1,
        ..Steps::new("sft")
    };
    let mut stage = Sft::new(vec![3, 4]);
    let mut notes = Vec::new();
    let e = run
        .run(&steps, &mut st, &mut stage, &mut |l| notes.push(l.to_string()))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("consecutive updates skipped") && e.contains("update 3"),
        "{e}"
    );
    assert!(notes.iter().any(|l| l.starts_with("sft 4: skipped")), "{notes:?}");
    let l = aha_trainer::checkpoint::load_latest(&d3.join("checkpoints"))
        .unwrap()
        .unwrap();
    assert_eq!(l.state.step, 3, "the aborted step left no checkpoint");
    assert_eq!(bits(&l.model.params), bits(&stage.after_step[1].1));
    assert_eq!(read_lines(&d3.join("metrics.jsonl")).len(), 3);
    for d in [dir, d2, d3] {
        let _ = std::fs::remove_dir_all(&d);
    }
}

/// A rank that does not write opens no file and writes nothing, but loads
/// the checkpoint to resume from.
#[test]
fn a_rank_that_does_not_write_only_reads_the_checkpoint() {
    let dir = tmp("reader");
    drive(&dir, false, 2, vec![]);
    let before = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let reader = RunSpec {
        writer: false,
        config_text: "{\"lr\": 1.0}",
        ..spec(&dir, true)
    };
    let (mut run, loaded) = Driver::open(&reader, &mut |_| {}).unwrap();
    assert!(!run.is_writer());
    assert_eq!(loaded.unwrap().state.step, 1);
    let m: aha_grpo::Metrics = [("loss".to_string(), 1.0)].into_iter().collect();
    run.metrics(None, 9, &m).unwrap();
    run.sample(&serde_json::json!({})).unwrap();
    assert_eq!(std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap(), before);
    assert_eq!(std::fs::read_to_string(dir.join("config.json")).unwrap(), CONFIG);
    let _ = std::fs::remove_dir_all(&dir);
}
