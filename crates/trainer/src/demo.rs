//! `aha demo`: R1-Zero at toy scale on the CPU.
//!
//! 1. Build the character tokenizer of the toy task.
//! 2. Pretrain a small DeepSeek-V3-style MoE (MLA attention, sigmoid
//!    group-limited routing, a shared expert, one dense layer) on the
//!    synthetic base corpus, where the `<think>`/`<answer>` format appears in
//!    only a minority of completions (see [`crate::toy`]).
//! 3. Run GRPO from that base with R1-Zero's rule-based rewards, accuracy
//!    and format, and a KL penalty to the base (the R1 report's beta 0.001).
//! 4. Evaluate on held-out problems throughout; write everything to the run
//!    folder: `config.json`, `metrics.jsonl`, `samples.jsonl`, `plots/*.png`,
//!    `checkpoint/` (HF layout with tokenizer).

use std::path::{Path, PathBuf};
use std::time::Instant;

use aha_grpo::{AdvantageEstimator, LossConfig};
use aha_moe_model::{Model, ModelConfig, Policy, Precision};
use aha_rewards::BatchConfig;
use aha_sampler::SamplingParams;
use aha_tensor::Device;
use serde::{Deserialize, Serialize};

use crate::driver::{step_metrics, Driver, RunSpec, Stage, State, Steps};
use crate::error::{io_err, Error, Result};
use crate::eval::{evaluate, EvalResult};
use crate::optim::{sft_step, OptimConfig, Optimizer, Schedule};
use crate::plot::line_chart;
use crate::rl::{grpo_step, GrpoStep, Scoring};
use crate::rng::Rng;
use crate::run_folder::json_value;
use crate::toy::{self, Problem, Task, TaskSpec};

/// Everything a demo run does; written to `config.json` in the run folder.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoConfig {
    /// Seed of data, initialisation and sampling.
    pub seed: u64,
    /// Model width.
    pub hidden_size: usize,
    /// Decoder layers (the first is dense, the rest MoE).
    pub num_layers: usize,
    /// Routed experts.
    pub n_experts: usize,
    /// Pretraining steps.
    pub pretrain_steps: usize,
    /// Sequences per pretraining step.
    pub pretrain_batch: usize,
    /// Pretraining peak learning rate.
    pub pretrain_lr: f64,
    /// Share of base-corpus completions written in the reasoning format.
    pub reasoning_share: f64,
    /// GRPO steps.
    pub grpo_steps: usize,
    /// Prompts per GRPO step.
    pub prompts_per_step: usize,
    /// Completions per prompt (G).
    pub num_generations: usize,
    /// GRPO learning rate (constant after warmup).
    pub grpo_lr: f64,
    /// KL coefficient (the R1 report: 0.001).
    pub beta: f64,
    /// Rollout temperature (the R1 report: 1.0).
    pub temperature: f32,
    /// Completion length limit.
    pub max_new_tokens: usize,
    /// Evaluate every this many GRPO steps.
    pub eval_every: usize,
    /// Held-out problems per evaluation.
    pub eval_problems: usize,
    /// The toy task (addition, multiplication or countdown).
    #[serde(default)]
    pub task: Task,
    /// Operand width of the arithmetic tasks.
    #[serde(default = "default_digits")]
    pub digits: usize,
}

fn default_digits() -> usize {
    2
}

impl DemoConfig {
    /// The full demo (a few minutes on 2 cores).
    pub fn full(seed: u64) -> DemoConfig {
        DemoConfig {
            seed,
            hidden_size: 64,
            num_layers: 2,
            n_experts: 8,
            pretrain_steps: 3000,
            pretrain_batch: 64,
            pretrain_lr: 3e-3,
            reasoning_share: 0.3,
            grpo_steps: 120,
            prompts_per_step: 16,
            num_generations: 8,
            grpo_lr: 5e-4,
            beta: 0.001,
            temperature: 1.0,
            max_new_tokens: 40,
            eval_every: 10,
            eval_problems: 400,
            task: Task::Addition,
            digits: 2,
        }
    }

    /// `--quick`: the same recipe, shorter (well under three minutes).
    pub fn quick(seed: u64) -> DemoConfig {
        DemoConfig {
            pretrain_steps: 1500,
            grpo_steps: 40,
            eval_every: 10,
            eval_problems: 200,
            ..DemoConfig::full(seed)
        }
    }

    /// The task and operand width.
    pub fn spec(&self) -> TaskSpec {
        TaskSpec {
            task: self.task,
            digits: self.digits,
        }
    }

    /// This config on another toy task: sets the task and its width, and
    /// raises the completion limit to fit the longest reasoning completion
    /// of the task with room to spare.
    pub fn with_task(mut self, spec: TaskSpec) -> Result<DemoConfig> {
        spec.validate()?;
        self.task = spec.task;
        self.digits = spec.digits;
        let tok = toy::tokenizer()?;
        let mut rng = Rng::new(0);
        let mut longest = 0;
        for _ in 0..500 {
            let p = toy::problem(&mut rng, spec, false);
            longest = longest.max(toy::encode(&tok, &p.reasoning())?.len());
        }
        self.max_new_tokens = self.max_new_tokens.max(longest + 12);
        Ok(self)
    }

    /// The GRPO step of the demo's RL phase: G samples at the rollout
    /// temperature, the GRPO loss with KL coefficient `beta`, group advantages.
    pub fn grpo_step_config(&self) -> GrpoStep {
        GrpoStep {
            num_generations: self.num_generations,
            loss: LossConfig {
                beta: self.beta,
                max_completion_length: self.max_new_tokens,
                ..LossConfig::default()
            },
            advantages: AdvantageEstimator::Group,
            sampling: SamplingParams {
                temperature: self.temperature,
                max_new_tokens: self.max_new_tokens,
                stop_token_ids: vec![toy::EOS],
                seed: self.seed,
                ..SamplingParams::default()
            },
            mask_truncated: false,
            num_iterations: 1,
            minibatches: 1,
            micro_batch_tokens: 0,
        }
    }

    /// The model's `config.json`.
    pub fn model_config_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            "vocab_size": toy::vocab_size(),
            "hidden_size": self.hidden_size,
            "intermediate_size": self.hidden_size * 2,
            "moe_intermediate_size": self.hidden_size / 2,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "q_lora_rank": null,
            "kv_lora_rank": 16,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8,
            "v_head_dim": 16,
            "n_routed_experts": self.n_experts,
            "num_experts_per_tok": 2,
            "n_group": 4,
            "topk_group": 2,
            "n_shared_experts": 1,
            "routed_scaling_factor": 1.0,
            "norm_topk_prob": true,
            "first_k_dense_replace": 1,
            "max_position_embeddings": (self.max_new_tokens + 32).max(96),
            "rope_theta": 10000.0,
            "rope_interleave": true,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": false,
            "bos_token_id": toy::PAD,
            "eos_token_id": toy::EOS,
            "pad_token_id": toy::PAD,
            "hidden_act": "silu",
            "initializer_range": 0.02,
        })
    }
}

/// The numbers a demo run ends with.
#[derive(Debug, Clone, Serialize)]
pub struct DemoSummary {
    /// Held-out accuracy of the pretrained base.
    pub base_accuracy: f64,
    /// Held-out accuracy after GRPO.
    pub final_accuracy: f64,
    /// Format share of the base.
    pub base_format: f64,
    /// Format share after GRPO.
    pub final_format: f64,
    /// Mean completion length of the base (tokens).
    pub base_length: f64,
    /// Mean completion length after GRPO.
    pub final_length: f64,
    /// Seconds for the whole run (this process only, when resumed).
    pub wall_s: f64,
    /// The run folder.
    pub run_dir: PathBuf,
}

/// How a run saves and resumes, and where it computes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunOptions {
    /// Continue from `checkpoints/latest` of the run folder when there is one.
    pub resume: bool,
    /// Save a checkpoint every this many steps of each phase (0: only the final one).
    pub save_every: usize,
    /// Where the policy trains (resolved by `aha_moe_model::resolve_device`).
    pub device: Device,
    /// The precision of its products.
    pub precision: Precision,
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(io_err(path))
}

fn eval_metrics(e: &EvalResult) -> aha_grpo::Metrics {
    [
        ("eval/accuracy", e.accuracy),
        ("eval/accuracy_strict", e.accuracy_strict),
        ("eval/format", e.format),
        ("eval/mean_length", e.mean_length),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn eval_json(phase: &str, step: usize, e: &EvalResult) -> serde_json::Value {
    let mut line = serde_json::Map::new();
    line.insert("phase".into(), phase.into());
    line.insert("step".into(), step.into());
    for (k, v) in eval_metrics(e) {
        line.insert(k, serde_json::json!(v));
    }
    serde_json::Value::Object(line)
}

fn eval_from_json(v: &serde_json::Value) -> Option<EvalResult> {
    Some(EvalResult {
        accuracy: v.get("eval/accuracy")?.as_f64()?,
        accuracy_strict: v.get("eval/accuracy_strict")?.as_f64()?,
        format: v.get("eval/format")?.as_f64()?,
        mean_length: v.get("eval/mean_length")?.as_f64()?,
    })
}

/// Which pretraining steps write a metrics line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PretrainLog {
    /// The demo's: every 50th step and the last, numbered from 0, with a
    /// progress line.
    Demo,
    /// The pipeline's: every step, numbered from 1.
    EveryStep,
}

/// Pretraining on the toy base corpus as a [`Stage`]: each step draws
/// fresh problems and base completions from the run's RNG (mixing both
/// completion styles in every batch matters: length-bucketed batches of the
/// base corpus separate them and the base then fails to learn the
/// reasoning).
pub(crate) struct ToyPretrain<'a> {
    /// The sizes (task, batch, reasoning share).
    pub cfg: &'a DemoConfig,
    /// The toy tokenizer.
    pub tok: &'a aha_sampler::Tokenizer,
    /// Which steps are logged.
    pub log: PretrainLog,
    /// The last step's loss.
    pub loss: f64,
    /// What its checkpoints carry besides the driver's state.
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Stage for ToyPretrain<'_> {
    fn step(&mut self, step: usize, st: &mut State, log: &mut dyn FnMut(&str)) -> Result<Option<aha_grpo::Metrics>> {
        let cfg = self.cfg;
        let rng = &mut st.rng;
        let batch: Vec<(Vec<u32>, Vec<u32>)> = (0..cfg.pretrain_batch)
            .map(|_| {
                let p = toy::problem(rng, cfg.spec(), false);
                let mut c = toy::encode(self.tok, &toy::base_completion(rng, &p, cfg.reasoning_share))?;
                c.push(toy::EOS);
                Ok((toy::encode(self.tok, &p.prompt())?, c))
            })
            .collect::<Result<_>>()?;
        let (loss, info) = sft_step(&mut st.policy, &mut st.opt, &batch, toy::PAD)?;
        self.loss = loss;
        if self.log == PretrainLog::Demo && self.logged_as(step, cfg.pretrain_steps).is_some() {
            log(&format!(
                "pretrain {:>5}/{}  loss {loss:.4}",
                step - 1,
                cfg.pretrain_steps
            ));
        }
        Ok(Some(step_metrics(loss, &info)))
    }

    fn logged_as(&self, step: usize, total: usize) -> Option<usize> {
        match self.log {
            PretrainLog::Demo => ((step - 1).is_multiple_of(50) || step == total).then_some(step - 1),
            PretrainLog::EveryStep => Some(step),
        }
    }

    fn extra(&self) -> Result<serde_json::Map<String, serde_json::Value>> {
        Ok(self.extra.clone())
    }
}

/// The demo's held-out evaluation during GRPO.
pub(crate) struct ToyEval<'a> {
    test: &'a [Problem],
    /// The latest evaluation (the base model's until the first).
    last: EvalResult,
}

/// GRPO on the toy task as a [`Stage`] (the demo's RL phase and the
/// pipeline's GRPO stages): each step's problems from the run's RNG,
/// accuracy and format rewards, the sampling seed from `seed` and the
/// step, so the weights, the optimizer and the RNG continue a run exactly.
/// With `eval` (the demo), held-out accuracy every `eval_every` steps and
/// at the last; without (the pipeline), a progress line a step.
pub(crate) struct ToyGrpo<'a> {
    cfg: &'a DemoConfig,
    tok: &'a aha_sampler::Tokenizer,
    seed: u64,
    steps: usize,
    step_cfg: GrpoStep,
    rewards: aha_rewards::WeightedSum,
    reward_batch: BatchConfig,
    eval: Option<ToyEval<'a>>,
    extra: serde_json::Map<String, serde_json::Value>,
}

impl<'a> ToyGrpo<'a> {
    /// `steps` GRPO steps of `cfg`'s recipe, sampling seeds from `seed`;
    /// checkpoints carry `extra`.
    pub(crate) fn new(
        cfg: &'a DemoConfig,
        tok: &'a aha_sampler::Tokenizer,
        seed: u64,
        steps: usize,
        extra: serde_json::Map<String, serde_json::Value>,
    ) -> ToyGrpo<'a> {
        ToyGrpo {
            cfg,
            tok,
            seed,
            steps,
            step_cfg: cfg.grpo_step_config(),
            rewards: toy::rewards(),
            reward_batch: BatchConfig::default(),
            eval: None,
            extra,
        }
    }
}

impl Stage for ToyGrpo<'_> {
    fn step(&mut self, step: usize, st: &mut State, log: &mut dyn FnMut(&str)) -> Result<Option<aha_grpo::Metrics>> {
        let cfg = self.cfg;
        let problems: Vec<Problem> = (0..cfg.prompts_per_step)
            .map(|_| toy::problem(&mut st.rng, cfg.spec(), false))
            .collect();
        let prompts = toy::encode_prompts(self.tok, &problems)?;
        let examples = toy::examples(&problems);
        let scoring = Scoring {
            rewards: &self.rewards,
            examples: &examples,
            batch: &self.reward_batch,
        };
        let mut sc = self.step_cfg.clone();
        sc.sampling.seed = self.seed.wrapping_add(step as u64 * 1_000_003);
        let (m, _) = grpo_step(
            &mut st.policy,
            st.reference.as_ref(),
            &mut st.opt,
            self.tok,
            &prompts,
            &scoring,
            &sc,
        )?;
        if self.eval.is_none() {
            let reward = m.get("reward").copied().unwrap_or(f64::NAN);
            log(&format!("step {step}/{} grpo reward {reward:.3}", self.steps));
        }
        Ok(Some(m))
    }

    fn after(
        &mut self,
        step: usize,
        st: &State,
        m: &mut aha_grpo::Metrics,
        run: &mut Driver,
        log: &mut dyn FnMut(&str),
    ) -> Result<()> {
        let cfg = self.cfg;
        let Some(ev) = &mut self.eval else {
            return Ok(());
        };
        if step.is_multiple_of(cfg.eval_every) || step == self.steps {
            let (e, samples) = evaluate(&st.policy, self.tok, ev.test, cfg.max_new_tokens)?;
            m.extend(eval_metrics(&e));
            write_samples(run, "grpo", step, ev.test, &samples)?;
            ev.last = e;
            log(&format!(
                "grpo {step:>4}/{}  reward {:.3}  accuracy(eval) {:.1}%  format(eval) {:.1}%  length {:.1}  kl {:.4}",
                self.steps,
                m.get("reward").copied().unwrap_or(f64::NAN),
                e.accuracy * 100.0,
                e.format * 100.0,
                e.mean_length,
                m.get("kl").copied().unwrap_or(0.0)
            ));
        }
        Ok(())
    }

    fn extra(&self) -> Result<serde_json::Map<String, serde_json::Value>> {
        Ok(self.extra.clone())
    }
}

/// Runs the demo into `out` (fresh), reporting progress through `log`.
pub fn run_demo(cfg: &DemoConfig, out: &Path, log: &mut dyn FnMut(&str)) -> Result<DemoSummary> {
    run_demo_with(cfg, out, RunOptions::default(), log)
}

/// Runs the demo with checkpointing and optional resume.
pub fn run_demo_with(cfg: &DemoConfig, out: &Path, opts: RunOptions, log: &mut dyn FnMut(&str)) -> Result<DemoSummary> {
    let t0 = Instant::now();
    if cfg.grpo_steps == 0 {
        return Err(Error::Config {
            what: "demo config".into(),
            msg: "grpo_steps must be at least 1".into(),
        });
    }
    if cfg.eval_every == 0 {
        return Err(Error::Config {
            what: "demo config".into(),
            msg: "eval_every must be at least 1".into(),
        });
    }
    cfg.spec().validate()?;
    let cfg_text = serde_json::to_string_pretty(cfg).unwrap_or_default();
    let (mut run, resumed) = Driver::open(
        &RunSpec {
            dir: out,
            config_file: "config.json",
            config_text: &cfg_text,
            parse: &json_value,
            moved: &[],
            resume: opts.resume,
            tensorboard: false,
            writer: true,
        },
        log,
    )?;
    std::fs::create_dir_all(out.join("plots")).map_err(io_err(out))?;
    // The model's own files, copied into every checkpoint it writes.
    let src = out.join("model-files");
    std::fs::create_dir_all(&src).map_err(io_err(&src))?;
    let model_json = cfg.model_config_json();
    write(
        &src.join("config.json"),
        &serde_json::to_string_pretty(&model_json).unwrap_or_default(),
    )?;
    write(&src.join("tokenizer.json"), &toy::tokenizer_json())?;
    write(
        &src.join("generation_config.json"),
        &serde_json::json!({"eos_token_id": toy::EOS, "pad_token_id": toy::PAD, "temperature": 0.6, "top_p": 0.95})
            .to_string(),
    )?;
    let tok = toy::tokenizer()?;
    let test: Vec<Problem> = toy::test_set(cfg.spec(), cfg.eval_problems);
    let pre_cfg = OptimConfig {
        lr: cfg.pretrain_lr,
        warmup_steps: 50,
        total_steps: cfg.pretrain_steps,
        schedule: Schedule::Cosine,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        max_bad_steps: 10,
    };
    let rl_cfg = OptimConfig {
        lr: cfg.grpo_lr,
        warmup_steps: 5,
        total_steps: cfg.grpo_steps,
        schedule: Schedule::Constant,
        ..pre_cfg
    };
    let place = |m: Model| Policy::new(m, opts.device, opts.precision);
    let (mut st, phase, start_step, base) = match resumed {
        Some(r) => {
            let mut m = r.model;
            m.source_dir = Some(src.clone());
            let policy = place(m)?;
            let grpo = r.state.phase == "grpo";
            let mut opt = Optimizer::new(if grpo { rl_cfg } else { pre_cfg });
            opt.restore(&policy, r.moments.0, r.moments.1, r.state.opt_step, r.state.opt_bad)?;
            let base = r.state.extra.get("base").and_then(eval_from_json);
            let st = State {
                policy,
                reference: r.reference.map(place).transpose()?,
                opt,
                rng: Rng::from_state(r.state.rng),
            };
            (st, r.state.phase, r.state.step, base)
        }
        None => {
            let mcfg = ModelConfig::from_json_str(&model_json.to_string(), &src.join("config.json"))?;
            let mut m = Model::random(mcfg, cfg.seed, 0.02);
            m.source_dir = Some(src.clone());
            let st = State {
                policy: place(m)?,
                reference: None,
                opt: Optimizer::new(pre_cfg),
                rng: Rng::new(cfg.seed),
            };
            (st, "pretrain".to_string(), 0, None)
        }
    };
    log(&format!(
        "model: DeepSeek-V3-style MoE, {} parameters on {} ({}); {} held-out problems",
        st.policy.num_params(),
        st.policy.device(),
        st.policy.precision(),
        test.len()
    ));

    // 1. Pretraining on the base corpus.
    if phase != "pretrain" && phase != "grpo" {
        return Err(Error::Checkpoint {
            path: out.join("checkpoints"),
            msg: format!("phase {phase:?} is not a demo phase (pretrain or grpo)"),
        });
    }
    let base = if phase == "pretrain" {
        let steps = Steps {
            start: start_step,
            total: cfg.pretrain_steps,
            save_every: opts.save_every,
            ..Steps::new("pretrain")
        };
        let mut stage = ToyPretrain {
            cfg,
            tok: &tok,
            log: PretrainLog::Demo,
            loss: f64::NAN,
            extra: serde_json::Map::new(),
        };
        run.run(&steps, &mut st, &mut stage, log)?;
        let (b, base_samples) = evaluate(&st.policy, &tok, &test, cfg.max_new_tokens)?;
        run.line(&eval_json("base", 0, &b))?;
        write_samples(&mut run, "base", 0, &test, &base_samples)?;
        st.reference = Some(place(st.policy.host_model()?.into_owned())?);
        st.opt = Optimizer::new(rl_cfg);
        b
    } else {
        let damaged = |what: &str| Error::Checkpoint {
            path: out.join("checkpoints"),
            msg: format!("the latest checkpoint of phase {phase:?} lacks {what}"),
        };
        if st.reference.is_none() {
            return Err(damaged("the reference model"));
        }
        base.ok_or_else(|| damaged("the base model's evaluation (extra.base)"))?
    };
    log(&format!(
        "base model: accuracy {:.1}%, format {:.1}%, length {:.1} tokens",
        base.accuracy * 100.0,
        base.format * 100.0,
        base.mean_length
    ));
    let grpo_start = if phase == "grpo" { start_step } else { 0 };

    // 2. GRPO with accuracy and format rewards.
    let mut extra = serde_json::Map::new();
    extra.insert("base".into(), eval_json("base", 0, &base));
    let mut stage = ToyGrpo::new(cfg, &tok, cfg.seed, cfg.grpo_steps, extra);
    stage.eval = Some(ToyEval {
        test: &test,
        last: base,
    });
    let steps = Steps {
        start: grpo_start,
        total: cfg.grpo_steps,
        save_every: opts.save_every,
        ..Steps::new("grpo")
    };
    run.run(&steps, &mut st, &mut stage, log)?;
    let mut last = stage.eval.map_or(base, |e| e.last);
    if last == base {
        // Resumed after the last evaluation: evaluate the final weights.
        last = evaluate(&st.policy, &tok, &test, cfg.max_new_tokens)?.0;
    }

    // 3. Plots (from the whole metrics file, so resumed runs plot every step),
    // final checkpoint, summary.
    plots(&out.join("plots"), &run.read_metrics()?)?;
    let ck = out.join("checkpoint");
    st.policy.save(&ck, 2 << 30)?;
    let summary = DemoSummary {
        base_accuracy: base.accuracy,
        final_accuracy: last.accuracy,
        base_format: base.format,
        final_format: last.format,
        base_length: base.mean_length,
        final_length: last.mean_length,
        wall_s: t0.elapsed().as_secs_f64(),
        run_dir: out.to_path_buf(),
    };
    run.line(&serde_json::json!({"phase": "summary", "summary": summary}))?;
    Ok(summary)
}

fn write_samples(
    run: &mut Driver,
    phase: &str,
    step: usize,
    test: &[Problem],
    out: &[aha_sampler::Completion],
) -> Result<()> {
    for c in out.iter().take(4) {
        let p = &test[c.prompt_index];
        run.sample(&serde_json::json!({
            "phase": phase, "step": step, "prompt": p.prompt(), "completion": c.text,
            "answer": p.answer(), "correct": toy::is_correct(&c.text, p, true),
        }))?;
    }
    Ok(())
}

fn plots(dir: &Path, lines: &[serde_json::Value]) -> Result<()> {
    let series = |phase: &str, key: &str| -> Vec<(f64, f64)> {
        lines
            .iter()
            .filter(|l| l["phase"] == phase)
            .filter_map(|l| Some((l.get("step")?.as_f64()?, l.get(key)?.as_f64()?)))
            .collect()
    };
    // Held-out numbers: the base (step 0) and the GRPO evaluations.
    let ev = |key: &str| -> Vec<(f64, f64)> {
        let mut v = series("base", key);
        v.extend(series("grpo", key));
        v
    };
    line_chart(
        &dir.join("reward.png"),
        "REWARD",
        &[
            ("TOTAL", series("grpo", "reward")),
            ("ACCURACY", series("grpo", "rewards/accuracy/mean")),
            ("FORMAT", series("grpo", "rewards/format/mean")),
        ],
    )?;
    line_chart(
        &dir.join("accuracy.png"),
        "HELD-OUT ACCURACY",
        &[
            ("ACCURACY", ev("eval/accuracy")),
            ("STRICT", ev("eval/accuracy_strict")),
            ("FORMAT", ev("eval/format")),
        ],
    )?;
    line_chart(
        &dir.join("length.png"),
        "COMPLETION LENGTH",
        &[
            ("TRAIN", series("grpo", "completions/mean_length")),
            ("EVAL", ev("eval/mean_length")),
        ],
    )?;
    line_chart(&dir.join("kl.png"), "KL TO BASE", &[("KL", series("grpo", "kl"))])
}
