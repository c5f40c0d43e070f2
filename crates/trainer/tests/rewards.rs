//! The reward layer: every kind parsed from `aha grpo`'s TOML (and unknown
//! kinds and keys refused by name), NaN rewards kept out of the baseline
//! and the metrics, a hostile code completion contained inside a GRPO
//! step, a scorer process reached through `aha grpo`'s config, and a
//! reward model (`kind = "model"`) scoring a GRPO step in batches.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aha_moe_model::{Model, ModelConfig, Policy, Precision};
use aha_rewards::{BatchConfig, Example, Outcome, Reward, Status, WeightedSum};
use aha_tensor::Device;
use aha_trainer::grpo_run::{run_grpo, GrpoConfig};
use aha_trainer::optim::{OptimConfig, Optimizer, Schedule};
use aha_trainer::reward_model::{ModelParams, ModelReward, RmTemplate};
use aha_trainer::rewards::{build, BuildContext, RewardKind, KINDS};
use aha_trainer::rl::{rollout, score_completions, train_on, Scoring};
use aha_trainer::toy::{self, Problem, TaskSpec};

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("aha-rewards-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const EVERY_KIND: &str = r#"
model = "m"
data = "d.jsonl"
[[rewards]]
name = "accuracy"
extraction = "any"
[[rewards]]
name = "fmt"
kind = "format"
style = "r1"
strict = false
think_opened_in_prompt = true
weight = 0.5
[[rewards]]
name = "tag_count"
weight = 0.25
[[rewards]]
name = "lang"
kind = "language"
language = "zh"
[[rewards]]
name = "tests"
kind = "code"
tests_field = "test_cases"
program_language = "c"
timeout_s = 2
memory_mib = 512
max_processes = 16
network = "best_effort"
[[rewards]]
name = "countdown"
[[rewards]]
name = "overlong"
kind = "soft_overlong"
max_len = 100
cache_len = 20
[[rewards]]
name = "cosine"
kind = "cosine_length"
max_len = 500
min_value_wrong = -2.0
[[rewards]]
name = "judge"
kind = "command"
command = ["python3", "score.py"]
timeout_ms = 5000
[[rewards]]
name = "remote"
kind = "http"
url = "http://127.0.0.1:5000/get_reward"
retries = 0
"#;

fn rm_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/qwen2-rm-tiny")
}

/// Every kind, the reward model's folder being the qwen2-rm-tiny fixture.
fn every_kind() -> String {
    format!(
        "{EVERY_KIND}[[rewards]]\nname = \"rm\"\nkind = \"model\"\nmodel = {:?}\ndevice = \"cpu\"\nbatch_size = 4\ntemplate = \"plain\"\n",
        rm_fixture()
    )
}

#[test]
fn every_kind_parses_from_toml_and_round_trips() {
    let cfg = GrpoConfig::from_toml(&every_kind(), Path::new("grpo.toml")).unwrap();
    let kinds: Vec<&str> = cfg.rewards.iter().map(|r| r.kind.kind_name()).collect();
    assert_eq!(kinds, KINDS.to_vec());
    let names: Vec<&str> = cfg.rewards.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "accuracy",
            "fmt",
            "tag_count",
            "lang",
            "tests",
            "countdown",
            "overlong",
            "cosine",
            "judge",
            "remote",
            "rm"
        ]
    );
    assert_eq!(cfg.rewards[0].weight, 1.0, "weight defaults to 1");
    assert_eq!(cfg.rewards[1].weight, 0.5);
    match &cfg.rewards[4].kind {
        RewardKind::Code(p) => {
            assert_eq!(p.tests_field, "test_cases");
            assert_eq!(p.timeout_s, 2.0);
            assert_eq!(p.max_processes, 16);
        }
        other => panic!("{other:?}"),
    }
    match &cfg.rewards[7].kind {
        RewardKind::CosineLength(p) => {
            assert_eq!((p.max_len, p.min_value_wrong, p.max_value_correct), (500, -2.0, 1.0));
        }
        other => panic!("{other:?}"),
    }
    match &cfg.rewards[10].kind {
        RewardKind::Model(p) => {
            assert_eq!(
                (p.device.as_str(), p.precision.as_str(), p.batch_size),
                ("cpu", "f32", 4)
            );
            assert_eq!(p.template, RmTemplate::Plain);
        }
        other => panic!("{other:?}"),
    }
    // Written into the run folder and read back: the same config.
    let text = toml::to_string(&cfg).unwrap();
    let again = GrpoConfig::from_toml(&text, Path::new("config.toml")).unwrap();
    assert_eq!(again, cfg, "{text}");
    // Every kind builds (the scorer process starts on the first batch).
    let sum = build(
        &cfg.rewards,
        &BuildContext {
            max_completion_length: 1024,
            language: "en".into(),
        },
    )
    .unwrap();
    assert_eq!(sum.names(), names);
    // The old form, `name` only, still reads.
    let old = "rewards = [{ name = \"accuracy\", weight = 1.0 }, { name = \"language\", weight = 0.1 }]\n";
    let cfg = GrpoConfig::from_toml(old, Path::new("old.toml")).unwrap();
    assert!(matches!(cfg.rewards[1].kind, RewardKind::Language(_)));
}

#[test]
fn unknown_kinds_and_keys_are_refused_by_name() {
    let bad = |extra: &str| {
        let text = format!("[[rewards]]\n{extra}\n");
        GrpoConfig::from_toml(&text, Path::new("bad.toml"))
            .unwrap_err()
            .to_string()
    };
    let e = bad("name = \"r\"\nkind = \"neural\"");
    assert!(
        e.contains("bad.toml") && e.contains("neural") && e.contains("accuracy"),
        "{e}"
    );
    let e = bad("name = \"mystery\"");
    assert!(e.contains("mystery"), "{e}");
    let e = bad("name = \"tests\"\nkind = \"code\"\ntimeout = 3");
    assert!(
        e.contains("tests") && e.contains("`timeout`") && e.contains("timeout_s"),
        "{e}"
    );
    let e = bad("name = \"judge\"\nkind = \"command\"");
    assert!(e.contains("judge") && e.contains("`command`"), "{e}");
    let e = bad("name = \"accuracy\"\nextraction = \"sometimes\"");
    assert!(e.contains("sometimes"), "{e}");
    let e = bad("name = \"format\"\nweight = \"heavy\"");
    assert!(e.contains("weight"), "{e}");
    let e = bad("kind = \"format\"");
    assert!(e.contains("name"), "{e}");
    // Values out of range are refused when the rewards are built.
    let ctx = BuildContext {
        max_completion_length: 64,
        language: "en".into(),
    };
    for (toml, want) in [
        ("name = \"o\"\nkind = \"soft_overlong\"\ncache_len = 100", "cache_len"),
        ("name = \"l\"\nkind = \"language\"\nlanguage = \"klingon\"", "klingon"),
        ("name = \"h\"\nkind = \"http\"\nurl = \"https://x\"", "http://"),
        ("name = \"c\"\nkind = \"command\"\ncommand = []", "empty command"),
    ] {
        let cfg = GrpoConfig::from_toml(&format!("[[rewards]]\n{toml}\n"), Path::new("x.toml")).unwrap();
        let e = build(&cfg.rewards, &ctx).err().unwrap().to_string();
        assert!(e.contains(want), "{toml}: {e}");
    }
    let cfg = GrpoConfig::from_toml(
        "[[rewards]]\nname = \"a\"\nkind = \"format\"\n[[rewards]]\nname = \"a\"\nkind = \"tag_count\"\n",
        Path::new("x.toml"),
    )
    .unwrap();
    let e = build(&cfg.rewards, &ctx).err().unwrap();
    assert!(
        matches!(&e, aha_trainer::Error::Reward { name, .. } if name == "a"),
        "a typed error naming the reward: {e:?}"
    );
    assert!(e.to_string().contains("two rewards have this name"), "{e}");
}

fn tiny_policy() -> Policy {
    let json = aha_trainer::DemoConfig::quick(0).model_config_json().to_string();
    let m = Model::random(ModelConfig::from_json_str(&json, Path::new("t")).unwrap(), 0, 0.02);
    Policy::new(m, Device::Cpu, Precision::F32).unwrap()
}

fn optimizer() -> Optimizer {
    Optimizer::new(OptimConfig {
        lr: 1e-3,
        warmup_steps: 0,
        total_steps: 10,
        schedule: Schedule::Constant,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        max_bad_steps: 3,
    })
}

/// Unscorable (NaN) for rows marked `broken`, else 1 for a longer
/// completion and 0 for a shorter one.
struct Flaky;

impl Reward for Flaky {
    fn name(&self) -> &str {
        "flaky"
    }
    fn score(&self, example: &Example, completion: &str) -> Outcome {
        if example.get("broken").is_some() {
            Outcome::zero(Status::InfraError)
        } else {
            Outcome::new((completion.len() % 2) as f64, Status::Wrong)
        }
    }
}

#[test]
fn nan_rewards_stay_out_of_the_baseline_and_the_metrics() {
    let tok = toy::tokenizer().unwrap();
    let mut rng = toy::Rng::new(5);
    let problems: Vec<Problem> = (0..2)
        .map(|_| toy::problem(&mut rng, TaskSpec::default(), false))
        .collect();
    let prompts = toy::encode_prompts(&tok, &problems).unwrap();
    let mut examples = toy::examples(&problems);
    examples[1].insert("broken".into(), true.into());
    let sum = WeightedSum::new()
        .add(Flaky, 1.0)
        .add(aha_rewards::format::TagCountReward, 0.0);
    let batch = BatchConfig::default();
    let scoring = Scoring {
        rewards: &sum,
        examples: &examples,
        batch: &batch,
    };
    let mut step = aha_trainer::DemoConfig::quick(0).grpo_step_config();
    step.num_generations = 4;
    step.sampling.max_new_tokens = 6;
    step.loss.beta = 0.0;
    let mut policy = tiny_policy();
    let r = rollout(&policy, &tok, &prompts, &scoring, &step).unwrap();
    assert!(r.per_fn[0][..4].iter().all(|x| x.is_finite()));
    assert!(r.per_fn[0][4..].iter().all(|x| x.is_nan()), "{:?}", r.per_fn[0]);
    assert!(r.total[4..].iter().all(|x| x.is_nan()));
    assert!(r.per_fn[1].iter().all(|x| x.is_finite()), "weight 0 still scored");
    let mut opt = optimizer();
    let m = train_on(&mut policy, None, &mut opt, &r, &["flaky", "tag_count"], &step).unwrap();
    let good: Vec<f64> = r.per_fn[0][..4].to_vec();
    let mean = good.iter().sum::<f64>() / 4.0;
    assert_eq!(m["rewards/flaky/mean"], mean);
    assert!(m["rewards/flaky/std"].is_finite());
    assert_eq!(m["reward"], mean, "the broken group is left out of the reward mean");
    assert!(m["loss"].is_finite() && m["update_skipped"] == 0.0, "{m:?}");
}

#[test]
fn a_hostile_code_completion_is_contained_in_a_grpo_step() {
    let tok = toy::tokenizer().unwrap();
    let mut rng = toy::Rng::new(9);
    let problems: Vec<Problem> = (0..2)
        .map(|_| toy::problem(&mut rng, TaskSpec::default(), false))
        .collect();
    let prompts = toy::encode_prompts(&tok, &problems).unwrap();
    let cfg = GrpoConfig::from_toml(
        "[[rewards]]\nname = \"code\"\ntests_field = \"cases\"\ntimeout_s = 1.0\nmax_processes = 16\nnetwork = \"best_effort\"\n",
        Path::new("code.toml"),
    )
    .unwrap();
    let sum = build(
        &cfg.rewards,
        &BuildContext {
            max_completion_length: 8,
            language: "en".into(),
        },
    )
    .unwrap();
    // The tests as a JSON string, as many code sets store them.
    let cases = r#"[{"stdin": "3\n", "stdout": "3\n"}]"#;
    let examples: Vec<Example> = toy::examples(&problems)
        .into_iter()
        .map(|mut e| {
            e.insert("cases".into(), cases.into());
            e
        })
        .collect();
    let batch = BatchConfig {
        workers: 2,
        item_deadline_s: 20.0,
    };
    let scoring = Scoring {
        rewards: &sum,
        examples: &examples,
        batch: &batch,
    };
    let mut step = aha_trainer::DemoConfig::quick(0).grpo_step_config();
    step.num_generations = 2;
    step.sampling.max_new_tokens = 6;
    step.loss.beta = 0.0;
    let mut policy = tiny_policy();
    let mut r = rollout(&policy, &tok, &prompts, &scoring, &step).unwrap();
    let hostile = [
        "<think>fork</think>\n```python\nimport os\nwhile True:\n    os.fork()\n```",
        "<think>spin</think>\n```python\nwhile True:\n    pass\n```",
        "<think>eat</think>\n```python\nx = bytearray(10 * 1024**3)\nprint(3)\n```",
        "<think>echo</think>\n```python\nprint(input())\n```",
    ];
    for (c, h) in r.completions.iter_mut().zip(hostile) {
        c.text = h.to_string();
    }
    let t0 = Instant::now();
    let (per_fn, total) = score_completions(&r.completions, &scoring).unwrap();
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(15), "scoring took {took:?}");
    let scores = &per_fn[0];
    if scores.iter().all(|x| x.is_nan()) {
        eprintln!("skipped the sandbox checks: no sandbox on this machine (every run an infra error)");
    } else {
        assert_eq!(&scores[..3], &[0.0, 0.0, 0.0], "hostile programs fail their test");
        assert_eq!(scores[3], 1.0, "the sandbox still works after them");
    }
    r.per_fn = per_fn;
    r.total = total;
    let mut opt = optimizer();
    let m = train_on(&mut policy, None, &mut opt, &r, &["code"], &step).unwrap();
    assert!(m["loss"].is_finite(), "{m:?}");
    assert!(m.contains_key("rewards/code/mean"));
}

#[test]
fn a_scorer_process_is_reached_through_the_grpo_config() {
    let base = tmp("command");
    let model = base.join("model");
    std::fs::create_dir_all(&model).unwrap();
    let demo = aha_trainer::DemoConfig::quick(0);
    std::fs::write(model.join("config.json"), demo.model_config_json().to_string()).unwrap();
    std::fs::write(model.join("tokenizer.json"), toy::tokenizer_json()).unwrap();
    let json = demo.model_config_json().to_string();
    Model::random(ModelConfig::from_json_str(&json, &model).unwrap(), 1, 0.02)
        .save(&model, 1 << 30)
        .unwrap();
    // Rows without an answer: only the scorer reads them, through `bonus`.
    std::fs::write(
        base.join("train.jsonl"),
        "{\"prompt\": \"07+15=\", \"bonus\": 0.25}\n{\"prompt\": \"33+48=\", \"bonus\": 0.25}\n",
    )
    .unwrap();
    let script = base.join("score.py");
    std::fs::write(
        &script,
        "import json, sys\nfor line in sys.stdin:\n    req = json.loads(line)\n    \
         print(json.dumps({\"reward\": req[\"example\"][\"bonus\"] + len(req[\"completion\"]) * 0.0}), flush=True)\n",
    )
    .unwrap();
    let toml = format!(
        "model = {:?}\ndata = {:?}\nout = {:?}\nsteps = 2\nprompts_per_step = 2\nnum_generations = 2\n\
         max_completion_length = 6\ntemplate = \"none\"\ndevice = \"cpu\"\nreward_workers = 2\n\
         [[rewards]]\nname = \"judge\"\nkind = \"command\"\ncommand = [\"python3\", {:?}]\ntimeout_ms = 20000\n\
         [[rewards]]\nname = \"tag_count\"\nweight = 0.5\n",
        model,
        base.join("train.jsonl"),
        base.join("run"),
        script
    );
    let cfg = GrpoConfig::from_toml(&toml, &base.join("grpo.toml")).unwrap();
    let m = run_grpo(&cfg, false, &mut |_| {}).unwrap();
    assert_eq!(m["rewards/judge/mean"], 0.25, "{m:?}");
    assert_eq!(m["rewards/judge/std"], 0.0);
    assert!(m.contains_key("rewards/tag_count/mean"));
    let written = std::fs::read_to_string(base.join("run/config.toml")).unwrap();
    assert!(written.contains("kind = \"command\""), "{written}");
    // An accuracy reward needs an answer on every line: the error names it.
    let cfg = GrpoConfig {
        rewards: GrpoConfig::default().rewards,
        ..cfg
    };
    let e = run_grpo(&cfg, false, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("train.jsonl:1") && e.contains("answer"), "{e}");
    let _ = std::fs::remove_dir_all(&base);
}

/// The reward model's own scores of `prompt + completion`, one sequence
/// per forward: what the batched reward layer must reproduce.
fn rm_scores_one_by_one(texts: &[String]) -> Vec<f64> {
    let dir = rm_fixture();
    let tok = aha_sampler::load_tokenizer(&dir).unwrap();
    let rm = aha_moe_model::RewardModel::load(&dir, Device::Cpu, Precision::F32).unwrap();
    texts
        .iter()
        .map(|t| {
            let ids = tok.encode(t.as_str(), false).unwrap().get_ids().to_vec();
            rm.score_batch(&[&ids]).unwrap()[0] as f64
        })
        .collect()
}

#[test]
fn a_reward_model_scores_a_grpo_step_in_batches() {
    let tok = toy::tokenizer().unwrap();
    let mut rng = toy::Rng::new(3);
    let problems: Vec<Problem> = (0..2)
        .map(|_| toy::problem(&mut rng, TaskSpec::default(), false))
        .collect();
    let prompts = toy::encode_prompts(&tok, &problems).unwrap();
    let examples = toy::examples(&problems);
    let toml = format!(
        "[[rewards]]\nname = \"rm\"\nkind = \"model\"\nmodel = {:?}\ndevice = \"cpu\"\nbatch_size = 3\n\
         [[rewards]]\nname = \"tag_count\"\nweight = 0.5\n",
        rm_fixture()
    );
    let cfg = GrpoConfig::from_toml(&toml, Path::new("rm.toml")).unwrap();
    let ctx = BuildContext {
        max_completion_length: 8,
        language: "en".into(),
    };
    let sum = build(&cfg.rewards, &ctx).unwrap();
    let batch = BatchConfig::default();
    let scoring = Scoring {
        rewards: &sum,
        examples: &examples,
        batch: &batch,
    };
    let mut step = aha_trainer::DemoConfig::quick(0).grpo_step_config();
    step.num_generations = 4;
    step.sampling.max_new_tokens = 6;
    step.loss.beta = 0.0;
    let mut policy = tiny_policy();
    let r = rollout(&policy, &tok, &prompts, &scoring, &step).unwrap();
    // No chat template in the fixture: `auto` renders prompt + completion.
    let texts: Vec<String> = r
        .completions
        .iter()
        .map(|c| format!("{}{}", problems[c.prompt_index].prompt(), c.text))
        .collect();
    let want = rm_scores_one_by_one(&texts);
    assert_eq!(r.per_fn[0].len(), 8);
    for (g, w) in r.per_fn[0].iter().zip(&want) {
        assert!((g - w).abs() <= 1e-5, "batched {g} vs alone {w}");
    }
    for (i, t) in r.total.iter().enumerate() {
        assert!((t - (r.per_fn[0][i] + 0.5 * r.per_fn[1][i])).abs() <= 1e-9);
    }
    let mut opt = optimizer();
    let m = train_on(&mut policy, None, &mut opt, &r, &["rm", "tag_count"], &step).unwrap();
    assert!(m["loss"].is_finite() && m["update_skipped"] == 0.0, "{m:?}");
    let mean = r.per_fn[0].iter().sum::<f64>() / 8.0;
    assert!((m["rewards/rm/mean"] - mean).abs() <= 1e-6, "{m:?}");
}

#[test]
fn a_reward_model_runs_from_aha_grpo_toml() {
    let base = tmp("rm-grpo");
    let model = base.join("model");
    std::fs::create_dir_all(&model).unwrap();
    let demo = aha_trainer::DemoConfig::quick(0);
    std::fs::write(model.join("config.json"), demo.model_config_json().to_string()).unwrap();
    std::fs::write(model.join("tokenizer.json"), toy::tokenizer_json()).unwrap();
    let json = demo.model_config_json().to_string();
    Model::random(ModelConfig::from_json_str(&json, &model).unwrap(), 1, 0.02)
        .save(&model, 1 << 30)
        .unwrap();
    std::fs::write(
        base.join("train.jsonl"),
        "{\"prompt\": \"07+15=\"}\n{\"prompt\": \"33+48=\"}\n",
    )
    .unwrap();
    let toml = format!(
        "model = {:?}\ndata = {:?}\nout = {:?}\nsteps = 1\nprompts_per_step = 2\nnum_generations = 2\n\
         max_completion_length = 6\ntemplate = \"none\"\ndevice = \"cpu\"\n\
         [[rewards]]\nname = \"rm\"\nkind = \"model\"\nmodel = {:?}\nbatch_size = 2\n",
        model,
        base.join("train.jsonl"),
        base.join("run"),
        rm_fixture()
    );
    let cfg = GrpoConfig::from_toml(&toml, &base.join("grpo.toml")).unwrap();
    let m = run_grpo(&cfg, false, &mut |_| {}).unwrap();
    assert!(m["rewards/rm/mean"].is_finite() && m["loss"].is_finite(), "{m:?}");
    let written = std::fs::read_to_string(base.join("run/config.toml")).unwrap();
    assert!(
        written.contains("kind = \"model\"") && written.contains("qwen2-rm-tiny"),
        "{written}"
    );
    // A reward model folder that is not one: refused when the rewards are built.
    let bad = format!("[[rewards]]\nname = \"rm\"\nkind = \"model\"\nmodel = {model:?}\n");
    let cfg = GrpoConfig::from_toml(&bad, Path::new("bad.toml")).unwrap();
    let e = build(
        &cfg.rewards,
        &BuildContext {
            max_completion_length: 8,
            language: "en".into(),
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("reward \"rm\"") && e.contains("config.json"), "{e}");
    let e = GrpoConfig::from_toml("[[rewards]]\nname = \"rm\"\nkind = \"model\"\n", Path::new("x.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("model"), "{e}");
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn reward_model_text_is_its_chat_template_when_it_has_one() {
    // The fixture with a chat template beside it.
    let dir = tmp("rm-chat");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(rm_fixture().join(f), dir.join(f)).unwrap();
    }
    let plain = ModelReward::load("rm", &ModelParams::new(&dir)).unwrap();
    assert!(!plain.uses_chat_template());
    std::fs::write(
        dir.join("chat_template.jinja"),
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}",
    )
    .unwrap();
    let mut ex = Example::new();
    ex.insert("prompt".into(), "1+1=".into());
    let chat = ModelReward::load("rm", &ModelParams::new(&dir)).unwrap();
    assert!(chat.uses_chat_template());
    assert_eq!(
        chat.render(&ex, "2").unwrap(),
        "<user>1+1=</user><assistant>2</assistant>"
    );
    let forced_plain = ModelReward::load(
        "rm",
        &ModelParams {
            template: RmTemplate::Plain,
            ..ModelParams::new(&dir)
        },
    )
    .unwrap();
    assert_eq!(forced_plain.render(&ex, "2").unwrap(), "1+1=2");
    // The score is of the rendered text, and batching does not change it.
    let items: Vec<aha_rewards::Item> = ["2", "3", "<think>so</think>2"]
        .iter()
        .map(|c| aha_rewards::Item {
            example: ex.clone(),
            completion: c.to_string(),
        })
        .collect();
    let batched = chat.score_many(&items).unwrap();
    let texts: Vec<String> = items.iter().map(|i| chat.render(&ex, &i.completion).unwrap()).collect();
    for (o, w) in batched.iter().zip(rm_scores_one_by_one(&texts)) {
        assert!((o.score - w).abs() <= 1e-5, "{} vs {w}", o.score);
        assert_eq!(o.status, if w > 0.0 { Status::Correct } else { Status::Wrong });
    }
    assert_eq!(chat.score(&ex, "3").score, batched[1].score);
    // `chat` without a template is an error naming the folder.
    std::fs::remove_file(dir.join("chat_template.jinja")).unwrap();
    let e = ModelReward::load(
        "rm",
        &ModelParams {
            template: RmTemplate::Chat,
            ..ModelParams::new(&dir)
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("chat"), "{e}");
    // Too long for the model: that completion alone is unscorable.
    let long = "x ".repeat(400);
    let out = plain
        .score_many(&[
            items[0].clone(),
            aha_rewards::Item {
                example: ex.clone(),
                completion: long,
            },
        ])
        .unwrap();
    assert!(out[0].score.is_finite());
    assert_eq!(out[1].status, Status::InfraError);
    assert!(
        out[1]
            .detail
            .as_deref()
            .unwrap_or("")
            .contains("max_position_embeddings"),
        "{:?}",
        out[1]
    );
    let _ = std::fs::remove_dir_all(&dir);
}
