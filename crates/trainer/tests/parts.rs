//! The trainer's parts: the toy task and its tokenizer, the rewards, the
//! learning-rate schedule and the non-finite guard.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::LengthMod3;

use aha_moe_model::{Model, ModelConfig, Policy, Precision};
use aha_tensor::Device;
use aha_trainer::optim::{OptimConfig, Optimizer, Schedule};
use aha_trainer::toy::{self, Problem, TaskSpec};

#[test]
fn tokenizer_round_trips_and_specials_are_single_tokens() {
    let tok = toy::tokenizer().unwrap();
    let p = Problem::Add { a: 7, b: 95, digits: 2 };
    let text = format!("{}{}", p.prompt(), p.reasoning());
    let ids = toy::encode(&tok, &text).unwrap();
    assert_eq!(aha_sampler::decode(&tok, &ids).unwrap(), text);
    assert_eq!(toy::encode(&tok, "<think>").unwrap(), vec![2]);
    assert!(ids.iter().all(|&i| (i as usize) < toy::vocab_size()));
    assert_eq!(p.prompt(), "07+95=");
    assert_eq!(p.reasoning(), "<think>7+5=12,0+9+1=10</think><answer>102</answer>");
}

#[test]
fn splits_are_disjoint_and_rewards_are_strict() {
    let test = toy::test_set(TaskSpec::default(), 10_000);
    assert!(test.len() > 800 && test.len() < 1200, "{}", test.len());
    let mut rng = toy::Rng::new(1);
    for _ in 0..2000 {
        assert!(!toy::problem(&mut rng, TaskSpec::default(), false).is_test());
    }
    let p = Problem::Add {
        a: 12,
        b: 30,
        digits: 2,
    };
    assert_eq!(toy::accuracy_reward("<think>x</think><answer>42</answer>", &p), 1.0);
    assert_eq!(toy::accuracy_reward("42", &p), 0.0, "strict: no tag, no reward");
    assert_eq!(toy::extract_answer("42", true), Some("42"));
    assert!(toy::is_correct("42", &p, true));
    assert!(!toy::is_correct("42", &p, false));
    assert_eq!(toy::format_reward("<think>a</think><answer>1</answer>"), 1.0);
    for bad in [
        "<answer>1</answer>",
        "<think>a</think>",
        "<think>a</think><answer>1</answer> trailing",
        "<think>a<think>b</think></think><answer>1</answer>",
        "<answer>1</answer><think>a</think>",
        "",
    ] {
        assert_eq!(toy::format_reward(bad), 0.0, "{bad:?}");
    }
}

fn opt(schedule: Schedule) -> Optimizer {
    Optimizer::new(OptimConfig {
        lr: 1e-3,
        warmup_steps: 10,
        total_steps: 110,
        schedule,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        max_bad_steps: 2,
    })
}

#[test]
fn learning_rate_schedules() {
    let c = opt(Schedule::Cosine);
    assert!((c.lr_at(0) - 1e-4).abs() < 1e-12);
    assert!((c.lr_at(9) - 1e-3).abs() < 1e-12);
    assert!((c.lr_at(10) - 1e-3).abs() < 1e-12);
    assert!((c.lr_at(110) - 1e-4).abs() < 1e-12);
    assert!(c.lr_at(60) < 1e-3 && c.lr_at(60) > 1e-4);
    assert!((opt(Schedule::Constant).lr_at(100) - 1e-3).abs() < 1e-12);
}

#[test]
fn non_finite_gradients_skip_then_abort() {
    let json = DemoConfigJson::tiny();
    let m = Model::random(
        ModelConfig::from_json_str(&json, std::path::Path::new("t")).unwrap(),
        0,
        0.02,
    );
    let before = m.params.clone();
    let mut g = vec![0f32; m.params.len()];
    g[3] = f32::NAN;
    let mut m = Policy::new(m, Device::Cpu, Precision::F32).unwrap();
    let mut o = Optimizer::new(opt(Schedule::Constant).cfg);
    for _ in 0..2 {
        m.set_grads(&g).unwrap();
        let info = o.update(&mut m).unwrap();
        assert!(info.skipped);
        assert_eq!(
            m.params_to_host().unwrap(),
            before,
            "a skipped update must not move the weights"
        );
    }
    m.set_grads(&g).unwrap();
    assert!(o.update(&mut m).is_err(), "the third bad step in a row aborts");
}

#[test]
fn a_nan_loss_skips_the_update_and_names_the_batch() {
    use aha_trainer::rl::{rollout, train_on};
    let cfg = aha_trainer::DemoConfig::quick(0);
    let json = cfg.model_config_json().to_string();
    let m = Model::random(
        ModelConfig::from_json_str(&json, std::path::Path::new("t")).unwrap(),
        0,
        0.02,
    );
    let tok = toy::tokenizer().unwrap();
    let mut rng = toy::Rng::new(5);
    let problems: Vec<Problem> = (0..2)
        .map(|_| toy::problem(&mut rng, TaskSpec::default(), false))
        .collect();
    let prompts: Vec<Vec<u32>> = problems
        .iter()
        .map(|p| toy::encode(&tok, &p.prompt()).unwrap())
        .collect();
    let mut step = cfg.grpo_step_config();
    step.num_generations = 2;
    step.minibatches = 2;
    step.sampling.max_new_tokens = 4;
    step.loss.beta = 0.0;
    let rewards = toy::rewards();
    let examples = toy::examples(&problems);
    let batch = aha_rewards::BatchConfig::default();
    let scoring = aha_trainer::rl::Scoring {
        rewards: &rewards,
        examples: &examples,
        batch: &batch,
    };
    let head = m
        .layout
        .entries
        .iter()
        .find(|e| e.name == "lm_head.weight")
        .unwrap()
        .slot;
    let mut m = Policy::new(m, Device::Cpu, Precision::F32).unwrap();
    let r = rollout(&m, &tok, &prompts, &scoring, &step).unwrap();
    // Poison the policy after sampling: every log-prob is NaN.
    let mut poisoned = m.params_to_host().unwrap();
    head.of_mut(&mut poisoned).fill(f32::NAN);
    m.set_params(&poisoned).unwrap();
    let before = poisoned;
    let mut o = Optimizer::new(opt(Schedule::Constant).cfg);
    let met = train_on(&mut m, None, &mut o, &r, &["accuracy", "format"], &step).unwrap();
    assert_eq!(met["update_skipped"], 1.0);
    let after = m.params_to_host().unwrap();
    assert!(after.iter().zip(&before).all(|(a, b)| a.to_bits() == b.to_bits()));
    let notes = o.take_notes();
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert!(
        notes[0].contains("minibatch 1/2") && notes[0].contains("loss NaN"),
        "{}",
        notes[0]
    );
    assert!(
        notes[1].contains("minibatch 2/2") && notes[1].contains("completions 2..4"),
        "{}",
        notes[1]
    );
    // max_bad_steps = 2: the third skip in a row aborts, naming the batch.
    let err = train_on(&mut m, None, &mut o, &r, &["accuracy", "format"], &step).unwrap_err();
    assert!(err.to_string().contains("minibatch 1/2"), "{err}");
}

struct DemoConfigJson;

impl DemoConfigJson {
    fn tiny() -> String {
        aha_trainer::DemoConfig::quick(0).model_config_json().to_string()
    }
}

#[test]
fn pass_at_k_is_the_unbiased_estimator() {
    use aha_trainer::data::pass_at_k;
    assert_eq!(pass_at_k(4, 0, 1), 0.0);
    assert_eq!(pass_at_k(4, 4, 4), 1.0);
    assert!((pass_at_k(4, 1, 1) - 0.25).abs() < 1e-12);
    assert!((pass_at_k(4, 1, 4) - 1.0).abs() < 1e-12);
    // 1 - C(3,2)/C(5,2) = 1 - 3/10.
    assert!((pass_at_k(5, 2, 2) - 0.7).abs() < 1e-12);
    assert!(pass_at_k(3, 1, 4).is_nan());
}

#[test]
fn the_public_sets_load_with_their_own_field_names() {
    use aha_trainer::data::read_math_jsonl;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/datasets");
    let gsm = read_math_jsonl(&dir.join("gsm8k_test.head5.jsonl")).unwrap();
    assert_eq!(gsm.len(), 5);
    assert_eq!(gsm[0].gold, "18");
    assert!(gsm[0].prompt.starts_with("Janet"));
    for f in ["math500_test", "aime24_test", "amc23_test"] {
        let v = read_math_jsonl(&dir.join(format!("{f}.head5.jsonl"))).unwrap();
        assert_eq!(v.len(), 5, "{f}");
        assert!(v.iter().all(|e| !e.gold.is_empty() && !e.prompt.is_empty()));
    }
    let amc = read_math_jsonl(&dir.join("amc23_test.head5.jsonl")).unwrap();
    assert_eq!(amc[0].gold, "27", "numeric answers are written without a trailing .0");
    // A bad line is an error naming file and line.
    let bad = std::env::temp_dir().join(format!("aha-bad-{}.jsonl", std::process::id()));
    std::fs::write(
        &bad,
        "{\"question\": \"q\", \"answer\": \"1\"}\n{\"question\": \"q\"}\n",
    )
    .unwrap();
    let e = read_math_jsonl(&bad).unwrap_err().to_string();
    assert!(e.contains(":2:") && e.contains("answer"), "{e}");
    let _ = std::fs::remove_file(&bad);
}

/// Parquet files as the Hugging Face hub stores datasets read like their
/// JSONL twins: snappy and uncompressed pages, several row groups, string,
/// integer and float columns; a null answer is an error naming file and
/// row; a codec aha does not read, or a file that is not Parquet, is an
/// error naming the file.
#[test]
fn parquet_sets_read_like_their_jsonl_twins() {
    use aha_trainer::data::{read_jsonl, read_math_jsonl};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/datasets");
    for f in ["gsm8k_test", "math500_test", "amc23_test"] {
        let pq = read_math_jsonl(&dir.join(format!("{f}.head5.parquet"))).unwrap();
        let js = read_math_jsonl(&dir.join(format!("{f}.head5.jsonl"))).unwrap();
        assert_eq!(pq, js, "{f}");
        // Every column comes through, not only the two that are used.
        let rows_pq = read_jsonl(&dir.join(format!("{f}.head5.parquet"))).unwrap();
        let rows_js = read_jsonl(&dir.join(format!("{f}.head5.jsonl"))).unwrap();
        assert_eq!(rows_pq.len(), rows_js.len());
        for ((n_pq, v_pq), (_, v_js)) in rows_pq.iter().zip(&rows_js) {
            let (a, b) = (v_pq.as_object().unwrap(), v_js.as_object().unwrap());
            assert_eq!(
                a.keys().collect::<Vec<_>>(),
                b.keys().collect::<Vec<_>>(),
                "{f} row {n_pq}"
            );
            for (k, x) in a {
                let y = &b[k];
                match (x.as_f64(), y.as_f64()) {
                    (Some(x), Some(y)) => assert_eq!(x, y, "{f} row {n_pq} {k}"),
                    _ => assert_eq!(x, y, "{f} row {n_pq} {k}"),
                }
            }
        }
        assert_eq!(rows_pq.iter().map(|r| r.0).collect::<Vec<_>>(), [1, 2, 3, 4, 5], "{f}");
    }
    let e = read_math_jsonl(&dir.join("missing_answer.parquet")).unwrap_err();
    assert!(
        matches!(&e, aha_trainer::Error::Data { line: 2, path, .. } if path.ends_with("missing_answer.parquet")),
        "a typed error naming file and row: {e:?}"
    );
    let e = e.to_string();
    assert!(e.contains("missing_answer.parquet:2:") && e.contains("answer"), "{e}");
    let e = read_math_jsonl(&dir.join("zstd.parquet")).unwrap_err().to_string();
    assert!(
        e.contains("zstd.parquet:1:") && e.contains("compressed with zstd") && e.contains("snappy"),
        "{e}"
    );
    let not = std::env::temp_dir().join(format!("aha-not-{}.parquet", std::process::id()));
    std::fs::write(&not, "{\"question\": \"q\", \"answer\": \"1\"}\n").unwrap();
    let e = read_math_jsonl(&not).unwrap_err().to_string();
    assert!(e.contains(&*not.display().to_string()) && e.contains("Parquet"), "{e}");
    let _ = std::fs::remove_file(&not);
}

/// Gradient accumulation over micro-batches gives the gradient of the
/// whole minibatch, for every loss aggregation (f32; only summation orders
/// differ).
#[test]
fn micro_batches_accumulate_to_the_whole_batch_gradient() {
    use aha_grpo::LossType;
    use aha_trainer::rl::{rollout, train_on, Scoring};
    let cfg = aha_trainer::DemoConfig::quick(0);
    let json = cfg.model_config_json().to_string();
    let model = Model::random(
        ModelConfig::from_json_str(&json, std::path::Path::new("t")).unwrap(),
        4,
        0.05,
    );
    let tok = toy::tokenizer().unwrap();
    let mut rng = toy::Rng::new(9);
    let problems: Vec<Problem> = (0..2)
        .map(|_| toy::problem(&mut rng, TaskSpec::default(), false))
        .collect();
    let prompts: Vec<Vec<u32>> = problems
        .iter()
        .map(|p| toy::encode(&tok, &p.prompt()).unwrap())
        .collect();
    let mut step = cfg.grpo_step_config();
    step.num_generations = 4;
    step.sampling.max_new_tokens = 10;
    step.loss.beta = 0.04;
    let sum = aha_rewards::WeightedSum::new().add(LengthMod3, 1.0);
    let examples = vec![aha_rewards::Example::new(); prompts.len()];
    let batch = aha_rewards::BatchConfig::default();
    let rewards = Scoring {
        rewards: &sum,
        examples: &examples,
        batch: &batch,
    };
    let policy = Policy::new(model.clone(), Device::Cpu, Precision::F32).unwrap();
    let r = rollout(&policy, &tok, &prompts, &rewards, &step).unwrap();
    let longest = r
        .completions
        .iter()
        .map(|c| prompts[c.prompt_index].len() + c.token_ids.len())
        .max()
        .unwrap();
    for loss_type in [LossType::Grpo, LossType::Bnpo, LossType::DrGrpo, LossType::Dapo] {
        let run = |budget: usize| {
            let mut s = step.clone();
            s.loss.loss_type = loss_type;
            s.micro_batch_tokens = budget;
            let mut p = Policy::new(model.clone(), Device::Cpu, Precision::F32).unwrap();
            let reference = Policy::new(model.clone(), Device::Cpu, Precision::F32).unwrap();
            let mut o = Optimizer::new(opt(Schedule::Constant).cfg);
            let m = train_on(&mut p, Some(&reference), &mut o, &r, &["length_mod_3"], &s).unwrap();
            (m["loss"], p.grads_to_host().unwrap())
        };
        let (l1, g1) = run(0);
        // Two completions a micro-batch: four micro-batches of the eight.
        let (l4, g4) = run(2 * longest);
        let scale = g1.iter().fold(0f32, |a, &x| a.max(x.abs()));
        let diff = g1.iter().zip(&g4).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        eprintln!(
            "{loss_type:?}: loss {l1:.6e} vs {l4:.6e}; gradients max |diff| / scale {:.2e}",
            diff / scale
        );
        assert!(scale > 0.0);
        assert!(
            diff <= 1e-6 * scale,
            "{loss_type:?}: gradients differ by {diff} (scale {scale})"
        );
        assert!(
            (l1 - l4).abs() <= 1e-6 * l1.abs().max(1e-9),
            "{loss_type:?}: loss {l1} vs {l4}"
        );
    }
}

/// A LoRA GRPO step on the CPU: only the adapters move, the base weights
/// stay bit for bit, and the KL reference the trainer uses when it has no
/// reference policy (the same weights, adapters off) gives the same loss,
/// KL and gradients as an explicit copy of the base.
#[test]
fn lora_grpo_steps_train_the_adapters_against_the_base() {
    use aha_moe_model::lora::{is_adapter, LoraConfig};
    use aha_trainer::rl::{rollout, train_on, Scoring};
    let cfg = aha_trainer::DemoConfig::quick(0);
    let json = cfg.model_config_json().to_string();
    let base = Model::random(
        ModelConfig::from_json_str(&json, std::path::Path::new("t")).unwrap(),
        4,
        0.05,
    );
    let lora = LoraConfig {
        r: 4,
        alpha: 8.0,
        target_modules: ["q_proj", "kv_b_proj", "o_proj", "mlp.up_proj"]
            .map(String::from)
            .to_vec(),
        ..LoraConfig::default()
    };
    let mut model = base.clone().with_lora(&lora, 1).unwrap();
    // B non-zero: the adapted policy differs from its base from the start.
    let entries: Vec<_> = model.layout.entries.iter().filter(|e| is_adapter(e)).cloned().collect();
    for (i, e) in entries.iter().enumerate() {
        for (j, v) in e.slot.of_mut(&mut model.params).iter_mut().enumerate() {
            *v += (((i * 13 + j * 7) % 11) as f32 - 5.0) * 0.01;
        }
    }
    let tok = toy::tokenizer().unwrap();
    let mut rng = toy::Rng::new(9);
    let problems: Vec<Problem> = (0..2)
        .map(|_| toy::problem(&mut rng, TaskSpec::default(), false))
        .collect();
    let prompts: Vec<Vec<u32>> = problems
        .iter()
        .map(|p| toy::encode(&tok, &p.prompt()).unwrap())
        .collect();
    let mut step = cfg.grpo_step_config();
    step.num_generations = 4;
    step.sampling.max_new_tokens = 10;
    step.loss.beta = 0.04;
    let sum = aha_rewards::WeightedSum::new().add(LengthMod3, 1.0);
    let examples = vec![aha_rewards::Example::new(); prompts.len()];
    let batch = aha_rewards::BatchConfig::default();
    let rewards = Scoring {
        rewards: &sum,
        examples: &examples,
        batch: &batch,
    };
    let mut p = Policy::new(model.clone(), Device::Cpu, Precision::F32).unwrap();
    let mut q = Policy::new(model.clone(), Device::Cpu, Precision::F32).unwrap();
    let explicit = Policy::new(base.clone(), Device::Cpu, Precision::F32).unwrap();
    let (mut op, mut oq) = (
        Optimizer::new(opt(Schedule::Constant).cfg),
        Optimizer::new(opt(Schedule::Constant).cfg),
    );
    for s in 0..2 {
        let r = rollout(&p, &tok, &prompts, &rewards, &step).unwrap();
        let mp = train_on(&mut p, None, &mut op, &r, &["length_mod_3"], &step).unwrap();
        let mq = train_on(&mut q, Some(&explicit), &mut oq, &r, &["length_mod_3"], &step).unwrap();
        eprintln!("step {s}: loss {:.6e} kl {:.6e}", mp["loss"], mp["kl"]);
        assert!(mp["kl"] > 0.0, "the adapted policy differs from its base");
        for key in ["loss", "kl", "grad_norm"] {
            assert_eq!(mp[key], mq[key], "step {s}: {key}");
        }
        assert_eq!(p.params_to_host().unwrap(), q.params_to_host().unwrap());
    }
    let after = p.params_to_host().unwrap();
    for e in &model.layout.entries {
        let moved = e.slot.of(&after) != e.slot.of(&model.params);
        assert_eq!(moved, is_adapter(e), "{}: moved {moved}", e.name);
    }
}

/// Bad configs are typed errors naming the file (TOML, unknown keys) or the
/// config (values out of range), so a caller can tell them from a failed run.
#[test]
fn bad_configs_are_typed_errors() {
    use aha_trainer::grpo_run::GrpoConfig;
    use aha_trainer::Error;
    let e = GrpoConfig::from_toml("stepz = 3\n", std::path::Path::new("run.toml")).unwrap_err();
    assert!(
        matches!(&e, Error::Config { what, msg } if what == "run.toml" && msg.contains("stepz")),
        "{e:?}"
    );
    let e = aha_trainer::sft_run::SftConfig::from_toml("learning_rate = \"fast\"\n", std::path::Path::new("sft.toml"))
        .unwrap_err();
    assert!(matches!(&e, Error::Config { what, .. } if what == "sft.toml"), "{e:?}");
}
