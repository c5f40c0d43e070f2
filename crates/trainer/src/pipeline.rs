//! `aha pipeline`: the whole DeepSeek-R1 recipe at toy scale, ending in one
//! evaluation table.
//!
//! 1. **Base**: pretrain a small MoE on the base corpus (as the demo does).
//! 2. **R1-Zero**: GRPO from the base with accuracy and format rewards.
//! 3. **R1**: cold-start SFT of the base on a few hundred formatted traces,
//!    reasoning RL (GRPO, accuracy + format), rejection sampling from that
//!    policy (k samples per prompt; keep those correct, in format and within
//!    the length bounds) and a final SFT on the kept samples.
//! 4. **Distillation**: a smaller *dense* student (Qwen2 layout, no experts),
//!    trained from scratch by SFT on traces the R1 teacher writes.
//! 5. **Evaluation**: pass@1 over k samples (temperature 0.6, top-p 0.95, as
//!    in the R1 report) and cons@k on the held-out problems, for each model.

use std::path::{Path, PathBuf};
use std::time::Instant;

use aha_moe_model::{Model, ModelConfig, Policy, Precision, SaveDtype, SaveOptions};
use aha_sampler::{SamplingParams, Tokenizer};
use aha_tensor::Device;
use serde::{Deserialize, Serialize};

use crate::checkpoint::TrainState;
use crate::demo::DemoConfig;
use crate::demo::{PretrainLog, ToyGrpo, ToyPretrain};
pub(crate) use crate::driver::step_metrics;
use crate::driver::{Driver, RunSpec, State, Steps};
use crate::error::{io_err, Error, Result};
use crate::eval::{evaluate_math, sample_toy, MathEval};
use crate::optim::{OptimConfig, Optimizer, Schedule, StepInfo};
use crate::rng::Rng;
use crate::run_folder::{json_value, write_atomic};
use crate::toy::{self, Problem};

/// One row of the final table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// Which model.
    pub model: String,
    /// Parameters.
    pub params: usize,
    /// Held-out scores.
    pub eval: MathEval,
}

fn optim(lr: f64, steps: usize, schedule: Schedule) -> OptimConfig {
    OptimConfig {
        lr,
        warmup_steps: (steps / 20).max(1),
        total_steps: steps,
        schedule,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        max_bad_steps: 10,
    }
}

fn encode_pair(tok: &Tokenizer, prompt: &str, completion: &str) -> Result<(Vec<u32>, Vec<u32>)> {
    let mut c = toy::encode(tok, completion)?;
    c.push(toy::EOS);
    Ok((toy::encode(tok, prompt)?, c))
}

/// The optimizer of an SFT stage: linear warmup over a twentieth of the
/// steps, then cosine decay.
pub(crate) fn sft_optimizer(lr: f64, steps: usize) -> Optimizer {
    Optimizer::new(optim(lr, steps, Schedule::Cosine))
}

/// What [`sft_loop`] hands its caller after each step: the step just done
/// (1-based), its loss and update, and the state a checkpoint needs.
pub(crate) struct SftStepDone<'a> {
    pub step: usize,
    pub loss: f64,
    pub info: StepInfo,
    pub model: &'a Policy,
    pub opt: &'a Optimizer,
    pub rng: &'a Rng,
}

/// SFT over `examples`, steps `start + 1 ..= steps` of `batch`, drawing
/// batches with `rng`; examples of similar length are batched together
/// (length buckets: each batch is drawn from a window of the length-sorted
/// list). The data order is a function of `rng` alone, so a checkpoint of
/// its state, the weights and the optimizer continues the run exactly.
/// Each step is reported to `log` as `step i/steps sft loss x` (a terminal
/// redraws these lines in place) and then to `after`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sft_loop(
    model: &mut Policy,
    opt: &mut Optimizer,
    examples: &[(Vec<u32>, Vec<u32>)],
    start: usize,
    steps: usize,
    batch: usize,
    rng: &mut Rng,
    log: &mut dyn FnMut(&str),
    after: &mut dyn FnMut(SftStepDone<'_>) -> Result<()>,
) -> Result<f64> {
    sft_loop_synced(model, opt, examples, start, steps, batch, rng, log, after, None)
}

/// [`sft_loop`] on one rank of a data-parallel run: every rank draws the
/// same global batch from the same `rng` and trains on its share of it
/// (`DataParallel::shard`), the gradients summed over the ranks.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sft_loop_synced(
    model: &mut Policy,
    opt: &mut Optimizer,
    examples: &[(Vec<u32>, Vec<u32>)],
    start: usize,
    steps: usize,
    batch: usize,
    rng: &mut Rng,
    log: &mut dyn FnMut(&str),
    after: &mut dyn FnMut(SftStepDone<'_>) -> Result<()>,
    mut dp: Option<&mut crate::dp::DataParallel>,
) -> Result<f64> {
    let share = match dp.as_deref() {
        Some(d) => d.shard(batch, "batch")?,
        None => 0..batch,
    };
    if examples.is_empty() {
        return Err(Error::Other("SFT needs at least one example".into()));
    }
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| examples[i].0.len() + examples[i].1.len());
    let window = (batch * 4).min(order.len()).max(1);
    let mut loss = f64::NAN;
    for step in start + 1..=steps {
        let first = rng.below((order.len() - window + 1) as u64) as usize;
        let b: Vec<(Vec<u32>, Vec<u32>)> = (0..batch)
            .map(|_| examples[order[first + rng.below(window as u64) as usize]].clone())
            .collect();
        let info;
        let sync = dp.as_deref_mut().map(|d| d as &mut dyn crate::rl::StepSync);
        (loss, info) = crate::optim::sft_step_synced(model, opt, &b[share.clone()], toy::PAD, sync)?;
        for note in opt.take_notes() {
            log(&format!("sft step {step}: {note}"));
        }
        log(&format!("step {step}/{steps} sft loss {loss:.4}"));
        after(SftStepDone {
            step,
            loss,
            info,
            model,
            opt,
            rng,
        })?;
    }
    Ok(loss)
}

/// The optimizer of a GRPO stage: constant after warmup.
fn grpo_optimizer(cfg: &DemoConfig, steps: usize) -> Optimizer {
    Optimizer::new(optim(cfg.grpo_lr, steps, Schedule::Constant))
}

/// Runs GRPO steps `start + 1 ..= steps` of pipeline stage `stage` on
/// `st` ([`ToyGrpo`]: accuracy and format rewards, KL to the reference,
/// the weights the stage started from), a checkpoint every `save_every`
/// steps but the last.
#[allow(clippy::too_many_arguments)]
fn grpo_stage(
    run: &mut Driver,
    st: &mut State,
    rows: &[Row],
    (cfg, tok): (&DemoConfig, &Tokenizer),
    stage: &str,
    (start, steps, save_every): (usize, usize, usize),
    seed: u64,
    log: &mut dyn FnMut(&str),
) -> Result<()> {
    let mut g = ToyGrpo::new(cfg, tok, seed, steps, rows_extra(rows)?);
    let loop_ = Steps {
        start,
        total: steps,
        save_every,
        label: "grpo step",
        ..Steps::new(stage)
    };
    run.run(&loop_, st, &mut g, log)
}

/// A checkpoint's `extra` in the pipeline: the evaluation rows so far.
fn rows_extra(rows: &[Row]) -> Result<serde_json::Map<String, serde_json::Value>> {
    let mut extra = serde_json::Map::new();
    let v = serde_json::to_value(rows).map_err(|e| Error::Other(format!("evaluation rows: {e}")))?;
    extra.insert("rows".into(), v);
    Ok(extra)
}

/// Saves the checkpoint `<stage>-<step>` of a pipeline stage.
#[allow(clippy::too_many_arguments)]
fn checkpoint(
    run: &Driver,
    stage: &str,
    step: usize,
    rng: &Rng,
    m: &Policy,
    reference: Option<&Policy>,
    opt: &Optimizer,
    rows: &[Row],
) -> Result<()> {
    run.checkpoint(
        &format!("{stage}-{step:06}"),
        stage,
        step,
        rng,
        m,
        reference,
        opt,
        rows_extra(rows)?,
    )
}

/// One SFT stage of the pipeline: steps `start + 1 ..= steps` of `batch`
/// examples from `data` (see [`sft_loop`]), a metrics line under `stage`
/// every step and a checkpoint every `save_every` steps but the last.
/// Returns the last loss.
#[allow(clippy::too_many_arguments)]
fn sft_stage(
    run: &mut Driver,
    rows: &[Row],
    stage: &str,
    (m, opt, rng): (&mut Policy, &mut Optimizer, &mut Rng),
    data: &[(Vec<u32>, Vec<u32>)],
    (start, steps, batch): (usize, usize, usize),
    save_every: usize,
    log: &mut dyn FnMut(&str),
) -> Result<f64> {
    let due = Steps {
        total: steps,
        save_every,
        ..Steps::new(stage)
    };
    sft_loop(m, opt, data, start, steps, batch, rng, log, &mut |s| {
        run.metrics(Some(stage), s.step, &step_metrics(s.loss, &s.info))?;
        if due.saves_after(s.step) {
            checkpoint(run, stage, s.step, s.rng, s.model, None, s.opt, rows)?;
        }
        Ok(())
    })
}

/// `k` samples for each problem; returns (prompt, completion text) pairs
/// that `keep` accepts.
fn rejection_sample(
    model: &Policy,
    tok: &Tokenizer,
    problems: &[Problem],
    k: usize,
    max_new: usize,
    seed: u64,
    keep: impl Fn(&str, &Problem) -> bool,
) -> Result<Vec<(String, String)>> {
    let params = SamplingParams {
        temperature: 1.0,
        max_new_tokens: max_new,
        seed,
        ..SamplingParams::default()
    };
    let out = sample_toy(model, tok, problems, k, &params)?;
    Ok(out
        .iter()
        .filter(|c| keep(&c.text, &problems[c.prompt_index]))
        .map(|c| (problems[c.prompt_index].prompt(), c.text.clone()))
        .collect())
}

/// The model's row of the table, and its first four evaluation completions
/// as `samples.jsonl` lines.
fn score(
    name: &str,
    model: &Policy,
    tok: &Tokenizer,
    test: &[Problem],
    k: usize,
    seed: u64,
    max_new: usize,
) -> Result<(Row, Vec<serde_json::Value>)> {
    let prompts = toy::encode_prompts(tok, test)?;
    let golds: Vec<String> = test.iter().map(|p| p.answer().to_string()).collect();
    let params = SamplingParams {
        temperature: 0.6,
        top_p: 0.95,
        max_new_tokens: max_new,
        stop_token_ids: vec![toy::EOS],
        seed,
        ..SamplingParams::default()
    };
    let (eval, results, completions) = evaluate_math(model, tok, &prompts, &golds, k, &params)?;
    let samples = completions
        .iter()
        .take(4)
        .map(|c| {
            let p = &test[c.prompt_index];
            let correct = results
                .get(c.prompt_index)
                .and_then(|r| r.correct.get(c.sample_index))
                .copied()
                .unwrap_or(false);
            serde_json::json!({
                "phase": name, "prompt": p.prompt(), "completion": c.text,
                "answer": p.answer(), "correct": correct,
            })
        })
        .collect();
    Ok((
        Row {
            model: name.into(),
            params: model.num_params(),
            eval,
        },
        samples,
    ))
}

/// Sizes of a pipeline run.
#[derive(Debug, Clone, Serialize)]
pub struct PipelineConfig {
    /// The base model, pretraining and GRPO settings (shared with the demo).
    pub demo: DemoConfig,
    /// Formatted traces for the cold start.
    pub cold_start_traces: usize,
    /// SFT steps of each SFT stage.
    pub sft_steps: usize,
    /// Prompts for rejection sampling and for the teacher's traces.
    pub rejection_prompts: usize,
    /// Samples per prompt when rejection sampling.
    pub rejection_k: usize,
    /// Width of the dense student.
    pub student_hidden: usize,
    /// Steps of the student's SFT.
    pub student_steps: usize,
    /// Samples per problem in the evaluation (pass@1 is their mean).
    pub eval_k: usize,
    /// Where the models train (sampling and evaluation run on the CPU engine).
    #[serde(skip)]
    pub device: Device,
    /// The precision of their products.
    #[serde(skip)]
    pub precision: Precision,
    /// The dtype each saved model is written in (`same`: f32, as trained).
    pub save_dtype: SaveDtype,
}

impl PipelineConfig {
    /// The toy-scale recipe (a few minutes on 2 cores); `quick` shortens it.
    pub fn toy(seed: u64, quick: bool) -> PipelineConfig {
        let demo = DemoConfig {
            eval_problems: 100,
            ..if quick {
                DemoConfig::quick(seed)
            } else {
                DemoConfig::full(seed)
            }
        };
        PipelineConfig {
            demo,
            cold_start_traces: 300,
            sft_steps: if quick { 150 } else { 300 },
            rejection_prompts: if quick { 200 } else { 400 },
            rejection_k: 4,
            student_hidden: 48,
            student_steps: if quick { 1500 } else { 3000 },
            eval_k: 4,
            device: Device::Cpu,
            precision: Precision::F32,
            save_dtype: SaveDtype::Source,
        }
    }

    fn student_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
            "vocab_size": toy::vocab_size(), "hidden_size": self.student_hidden,
            "intermediate_size": self.student_hidden * 3, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 96,
            "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": true,
            "eos_token_id": toy::EOS, "hidden_act": "silu",
        })
    }
}

/// How `aha pipeline` saves and resumes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PipelineOptions {
    /// Continue from the run folder's latest checkpoint, in the stage and at
    /// the step it was taken; finished stages are not redone.
    pub resume: bool,
    /// Save a checkpoint every this many steps of each stage and at the
    /// start of each stage after the first (0: none).
    pub save_every: usize,
}

/// The stages a checkpoint can be in, in order: pretraining the base,
/// R1-Zero's GRPO, R1's cold start, R1's GRPO, R1's SFT on its rejection
/// samples, the student's SFT.
pub const STAGES: [&str; 6] = ["pretrain", "r1-zero", "cold-start", "r1-rl", "r1-sft", "student"];

/// Writes (prompt, completion) pairs as `{"prompt", "completion"}` lines,
/// atomically.
fn write_pairs(path: &Path, pairs: &[(String, String)]) -> Result<()> {
    let mut text = String::new();
    for (p, c) in pairs {
        text.push_str(&serde_json::json!({"prompt": p, "completion": c}).to_string());
        text.push('\n');
    }
    write_atomic(path, &text)
}

/// Reads what [`write_pairs`] wrote, as token ids.
fn read_pairs(path: &Path, tok: &Tokenizer) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| Error::Data {
            path: path.to_path_buf(),
            line: i + 1,
            msg: e.to_string(),
        })?;
        match (v["prompt"].as_str(), v["completion"].as_str()) {
            (Some(p), Some(c)) => out.push(encode_pair(tok, p, c)?),
            _ => {
                return Err(Error::Data {
                    path: path.to_path_buf(),
                    line: i + 1,
                    msg: "no `prompt` and `completion` strings".into(),
                })
            }
        }
    }
    Ok(out)
}

/// Runs the recipe into `out` (fresh, no checkpoints); see
/// [`run_pipeline_with`].
pub fn run_pipeline(cfg: &PipelineConfig, out: &Path, log: &mut dyn FnMut(&str)) -> Result<Vec<Row>> {
    run_pipeline_with(cfg, out, PipelineOptions::default(), log)
}

/// Runs the recipe into the run folder `out`; returns the table (also
/// written as `table.json`), each model saved under `out/<name>/` in HF
/// layout. The folder also gets `config.json` (checked on resume),
/// `metrics.jsonl` (a line a step of every stage, `phase` naming the stage,
/// and a line per evaluated model with `phase` `eval`), TensorBoard events
/// (tags `<stage>/<metric>`), `samples.jsonl` (four evaluation completions
/// of each model), `plots/*.png`, the stages' data (`cold_start.jsonl`,
/// `rejection_sampled.jsonl`, `teacher_traces.jsonl`) and, with
/// `save_every`, `checkpoints/`.
pub fn run_pipeline_with(
    cfg: &PipelineConfig,
    out: &Path,
    opts: PipelineOptions,
    log: &mut dyn FnMut(&str),
) -> Result<Vec<Row>> {
    let t0 = Instant::now();
    let d = &cfg.demo;
    let spec = d.spec();
    spec.validate()?;
    if spec.task == toy::Task::Countdown {
        return Err(Error::Config {
            what: "pipeline config".into(),
            msg: "task countdown: the pipeline scores numeric answers (math verification, cons@k over numbers): use addition or multiplication"
                .into(),
        });
    }
    let mut cfg_json = serde_json::to_value(cfg).map_err(|e| Error::Other(e.to_string()))?;
    cfg_json["device"] = cfg.device.to_string().into();
    cfg_json["precision"] = cfg.precision.to_string().into();
    let cfg_text = serde_json::to_string_pretty(&cfg_json).unwrap_or_default();
    let (mut run, loaded) = Driver::open(
        &RunSpec {
            dir: out,
            config_file: "config.json",
            config_text: &cfg_text,
            parse: &json_value,
            moved: &[],
            resume: opts.resume,
            tensorboard: true,
            writer: true,
        },
        log,
    )?;
    let tok = toy::tokenizer()?;
    let test: Vec<Problem> = toy::test_set(spec, d.eval_problems);
    let teacher_json = d.model_config_json();
    let sjson = cfg.student_json();
    // Each model's own files, which its checkpoints carry.
    let model_files = |name: &str, json: &serde_json::Value| -> Result<PathBuf> {
        let dir = out.join("model-files").join(name);
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        for (f, text) in [
            ("config.json", serde_json::to_string_pretty(json).unwrap_or_default()),
            ("tokenizer.json", toy::tokenizer_json()),
        ] {
            std::fs::write(dir.join(f), text).map_err(io_err(&dir))?;
        }
        Ok(dir)
    };
    let teacher_src = model_files("teacher", &teacher_json)?;
    let student_src = model_files("student", &sjson)?;
    let save = |name: &str, m: &Policy, json: &serde_json::Value| -> Result<()> {
        let dir = out.join(name);
        m.save_as(
            &dir,
            &SaveOptions {
                dtype: cfg.save_dtype,
                max_shard_bytes: usize::MAX,
                ..SaveOptions::default()
            },
        )?;
        for (f, text) in [
            ("config.json", serde_json::to_string_pretty(json).unwrap_or_default()),
            ("tokenizer.json", toy::tokenizer_json()),
        ] {
            std::fs::write(dir.join(f), text).map_err(io_err(&dir))?;
        }
        Ok(())
    };
    let place = |mut m: Model, src: &Path| -> Result<Policy> {
        m.source_dir = Some(src.to_path_buf());
        Ok(Policy::new(m, cfg.device, cfg.precision)?)
    };
    let copy =
        |m: &Policy| -> Result<Policy> { Ok(Policy::new(m.host_model()?.into_owned(), cfg.device, cfg.precision)?) };
    let restore = |opt: &mut Optimizer, m: &Policy, moments: (Vec<f32>, Vec<f32>), st: &TrainState| {
        opt.restore(m, moments.0, moments.1, st.opt_step, st.opt_bad)
    };
    let every = opts.save_every;
    let due = |step: usize, total: usize| every > 0 && step.is_multiple_of(every) && (step < total || step == 0);
    let missing = |what: &str| Error::Checkpoint {
        path: out.join("checkpoints"),
        msg: format!("the pipeline's latest checkpoint lacks {what} (damaged checkpoint?)"),
    };

    let (mut resume, first, mut rng, mut rows) = match loaded {
        Some(l) => {
            let Some(k) = STAGES.iter().position(|s| *s == l.state.phase) else {
                return Err(Error::Checkpoint {
                    path: l.dir.clone(),
                    msg: format!("unknown pipeline stage {:?} (one of {STAGES:?})", l.state.phase),
                });
            };
            let rows: Vec<Row> = serde_json::from_value(l.state.extra.get("rows").cloned().unwrap_or_default())
                .map_err(|e| Error::Checkpoint {
                    path: l.dir.join("state.json"),
                    msg: format!("extra.rows: {e}"),
                })?;
            let rng = Rng::from_state(l.state.rng);
            (Some(l), k, rng, rows)
        }
        None => (None, 0, Rng::new(d.seed), Vec::new()),
    };
    // The checkpoint of stage `k`, when the run resumes in it.
    let mut take = |k: usize| if k == first { resume.take() } else { None };
    let evaluate = |run: &mut Driver, rows: &mut Vec<Row>, name: &str, m: &Policy| -> Result<()> {
        let (row, samples) = score(name, m, &tok, &test, cfg.eval_k, d.seed, d.max_new_tokens)?;
        for s in &samples {
            run.sample(s)?;
        }
        let e = &row.eval;
        let metrics: aha_grpo::Metrics = [
            ("pass@1", e.pass_at_1),
            ("pass@k", e.pass_at_k),
            ("cons@k", e.cons_at_k),
            ("no_answer", e.no_answer),
            ("mean_length", e.mean_length),
            ("params", row.params as f64),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        run.metrics_labelled(Some("eval"), rows.len(), &[("model", name)], &metrics)?;
        rows.push(row);
        Ok(())
    };
    let max_len = d.max_new_tokens;

    // 1. Base: fresh problems every step, as in the demo.
    let mut base: Option<Policy> = None;
    if first == 0 {
        let mut opt = Optimizer::new(optim(d.pretrain_lr, d.pretrain_steps, Schedule::Cosine));
        let (m, start) = match take(0) {
            Some(l) => {
                let m = place(l.model, &teacher_src)?;
                restore(&mut opt, &m, l.moments, &l.state)?;
                (m, l.state.step)
            }
            None => {
                let mcfg = ModelConfig::from_json_str(&teacher_json.to_string(), &teacher_src.join("config.json"))?;
                (place(Model::random(mcfg, d.seed, 0.02), &teacher_src)?, 0)
            }
        };
        let mut st = State {
            policy: m,
            reference: None,
            opt,
            rng,
        };
        let mut stage = ToyPretrain {
            cfg: d,
            tok: &tok,
            log: PretrainLog::EveryStep,
            loss: f64::NAN,
            extra: rows_extra(&rows)?,
        };
        let steps = Steps {
            start,
            total: d.pretrain_steps,
            save_every: every,
            label: "pretrain step",
            ..Steps::new("pretrain")
        };
        run.run(&steps, &mut st, &mut stage, log)?;
        rng = st.rng;
        log(&format!(
            "base: pretrained {} steps, loss {:.3}",
            d.pretrain_steps, stage.loss
        ));
        save("base", &st.policy, &teacher_json)?;
        evaluate(&mut run, &mut rows, "base", &st.policy)?;
        base = Some(st.policy);
    }

    // 2. R1-Zero: pure RL from the base (the KL reference is the base).
    if first <= 1 {
        let mut opt = grpo_optimizer(d, d.grpo_steps);
        let (zero, reference, start) = match take(1) {
            Some(l) => {
                let zero = place(l.model, &teacher_src)?;
                let reference = place(l.reference.ok_or_else(|| missing("r1-zero's reference"))?, &teacher_src)?;
                restore(&mut opt, &zero, l.moments, &l.state)?;
                (zero, reference, l.state.step)
            }
            None => {
                let b = base.take().ok_or_else(|| missing("the base"))?;
                let zero = copy(&b)?;
                if due(0, d.grpo_steps) {
                    checkpoint(&run, "r1-zero", 0, &rng, &zero, Some(&b), &opt, &rows)?;
                }
                (zero, b, 0)
            }
        };
        let mut st = State {
            policy: zero,
            reference: Some(reference),
            opt,
            rng,
        };
        grpo_stage(
            &mut run,
            &mut st,
            &rows,
            (d, &tok),
            "r1-zero",
            (start, d.grpo_steps, every),
            d.seed ^ 1,
            log,
        )?;
        let State {
            policy: zero,
            reference,
            rng: r,
            ..
        } = st;
        rng = r;
        let reference = reference.ok_or_else(|| missing("r1-zero's reference"))?;
        save("r1-zero", &zero, &teacher_json)?;
        evaluate(&mut run, &mut rows, "r1-zero", &zero)?;
        log(&format!("r1-zero: pass@1 {:.3}", rows[rows.len() - 1].eval.pass_at_1));
        // The reference is the base, which R1 starts from.
        base = Some(reference);
    }

    // 3. R1: cold start, reasoning RL, rejection sampling + SFT.
    let cold_path = out.join("cold_start.jsonl");
    let mut r1: Option<Policy> = None;
    if first <= 2 {
        let mut opt = sft_optimizer(1e-3, cfg.sft_steps);
        let (mut m, cold, start) = match take(2) {
            Some(l) => {
                let m = place(l.model, &teacher_src)?;
                restore(&mut opt, &m, l.moments, &l.state)?;
                (m, read_pairs(&cold_path, &tok)?, l.state.step)
            }
            None => {
                let texts: Vec<(String, String)> = (0..cfg.cold_start_traces)
                    .map(|_| {
                        let p = toy::problem(&mut rng, spec, false);
                        (p.prompt(), p.reasoning())
                    })
                    .collect();
                write_pairs(&cold_path, &texts)?;
                let cold = texts
                    .iter()
                    .map(|(p, c)| encode_pair(&tok, p, c))
                    .collect::<Result<Vec<_>>>()?;
                let m = copy(base.as_ref().ok_or_else(|| missing("the base"))?)?;
                if due(0, cfg.sft_steps) {
                    checkpoint(&run, "cold-start", 0, &rng, &m, None, &opt, &rows)?;
                }
                (m, cold, 0)
            }
        };
        base = None;
        let l = sft_stage(
            &mut run,
            &rows,
            "cold-start",
            (&mut m, &mut opt, &mut rng),
            &cold,
            (start, cfg.sft_steps, 32),
            every,
            log,
        )?;
        log(&format!("r1: cold-start SFT on {} traces, loss {l:.3}", cold.len()));
        r1 = Some(m);
    }
    drop(base);
    if first <= 3 {
        let rl_steps = d.grpo_steps / 2;
        let mut opt = grpo_optimizer(d, rl_steps);
        let (m, reference, start) = match take(3) {
            Some(l) => {
                let m = place(l.model, &teacher_src)?;
                let reference = place(l.reference.ok_or_else(|| missing("r1's reference"))?, &teacher_src)?;
                restore(&mut opt, &m, l.moments, &l.state)?;
                (m, reference, l.state.step)
            }
            None => {
                let m = r1.take().ok_or_else(|| missing("r1 after its cold start"))?;
                let reference = copy(&m)?;
                if due(0, rl_steps) {
                    checkpoint(&run, "r1-rl", 0, &rng, &m, Some(&reference), &opt, &rows)?;
                }
                (m, reference, 0)
            }
        };
        let mut st = State {
            policy: m,
            reference: Some(reference),
            opt,
            rng,
        };
        grpo_stage(
            &mut run,
            &mut st,
            &rows,
            (d, &tok),
            "r1-rl",
            (start, rl_steps, every),
            d.seed ^ 2,
            log,
        )?;
        rng = st.rng;
        let m = st.policy;
        r1 = Some(m);
    }
    let sft_path = out.join("rejection_sampled.jsonl");
    if first <= 4 {
        let mut opt = sft_optimizer(3e-4, cfg.sft_steps);
        let (mut m, data, start) = match take(4) {
            Some(l) => {
                let m = place(l.model, &teacher_src)?;
                restore(&mut opt, &m, l.moments, &l.state)?;
                (m, read_pairs(&sft_path, &tok)?, l.state.step)
            }
            None => {
                let m = r1.take().ok_or_else(|| missing("r1 after its RL"))?;
                let problems: Vec<Problem> = (0..cfg.rejection_prompts)
                    .map(|_| toy::problem(&mut rng, spec, false))
                    .collect();
                let kept = rejection_sample(&m, &tok, &problems, cfg.rejection_k, max_len, d.seed ^ 3, |text, p| {
                    toy::accuracy_reward(text, p) == 1.0 && toy::format_reward(text) == 1.0 && text.len() <= 4 * max_len
                })?;
                write_pairs(&sft_path, &kept)?;
                log(&format!(
                    "r1: rejection sampling kept {} of {}",
                    kept.len(),
                    problems.len() * cfg.rejection_k
                ));
                let data = kept
                    .iter()
                    .map(|(p, c)| encode_pair(&tok, p, c))
                    .collect::<Result<Vec<_>>>()?;
                if due(0, cfg.sft_steps) {
                    checkpoint(&run, "r1-sft", 0, &rng, &m, None, &opt, &rows)?;
                }
                (m, data, 0)
            }
        };
        if !data.is_empty() {
            sft_stage(
                &mut run,
                &rows,
                "r1-sft",
                (&mut m, &mut opt, &mut rng),
                &data,
                (start, cfg.sft_steps, 32),
                every,
                log,
            )?;
        }
        save("r1", &m, &teacher_json)?;
        evaluate(&mut run, &mut rows, "r1", &m)?;
        log(&format!("r1: pass@1 {:.3}", rows[rows.len() - 1].eval.pass_at_1));
        r1 = Some(m);
    }

    // 4. Distillation into a smaller dense student, from R1's traces.
    let traces_path = out.join("teacher_traces.jsonl");
    let mut opt = sft_optimizer(3e-3, cfg.student_steps);
    let (mut student, sdata, start) = match take(5) {
        Some(l) => {
            let m = place(l.model, &student_src)?;
            restore(&mut opt, &m, l.moments, &l.state)?;
            (m, read_pairs(&traces_path, &tok)?, l.state.step)
        }
        None => {
            let teacher = r1.take().ok_or_else(|| missing("the R1 teacher"))?;
            let teach_problems: Vec<Problem> = (0..cfg.rejection_prompts * 2)
                .map(|_| toy::problem(&mut rng, spec, false))
                .collect();
            let traces = rejection_sample(&teacher, &tok, &teach_problems, 2, max_len, d.seed ^ 4, |text, _| {
                toy::format_reward(text) == 1.0
            })?;
            drop(teacher);
            write_pairs(&traces_path, &traces)?;
            let scfg = ModelConfig::from_json_str(&sjson.to_string(), &student_src.join("config.json"))?;
            let m = place(Model::random(scfg, d.seed ^ 5, 0.02), &student_src)?;
            let sdata = traces
                .iter()
                .map(|(p, c)| encode_pair(&tok, p, c))
                .collect::<Result<Vec<_>>>()?;
            if due(0, cfg.student_steps) {
                checkpoint(&run, "student", 0, &rng, &m, None, &opt, &rows)?;
            }
            (m, sdata, 0)
        }
    };
    let l = sft_stage(
        &mut run,
        &rows,
        "student",
        (&mut student, &mut opt, &mut rng),
        &sdata,
        (start, cfg.student_steps, 64),
        every,
        log,
    )?;
    log(&format!(
        "student: {} parameters, SFT on {} teacher traces, loss {l:.3}",
        student.num_params(),
        sdata.len()
    ));
    save("student", &student, &sjson)?;
    evaluate(&mut run, &mut rows, "student", &student)?;

    run.plots(&[
        (
            "loss.png",
            "SFT LOSS",
            &[
                ("PRETRAIN", Some("pretrain"), "loss"),
                ("COLD START", Some("cold-start"), "loss"),
                ("R1 SFT", Some("r1-sft"), "loss"),
                ("STUDENT", Some("student"), "loss"),
            ],
        ),
        (
            "reward.png",
            "GRPO REWARD",
            &[("R1-ZERO", Some("r1-zero"), "reward"), ("R1", Some("r1-rl"), "reward")],
        ),
        (
            "kl.png",
            "KL TO THE STAGE START",
            &[("R1-ZERO", Some("r1-zero"), "kl"), ("R1", Some("r1-rl"), "kl")],
        ),
        (
            "eval.png",
            "HELD-OUT: BASE R1-ZERO R1 STUDENT",
            &[("PASS@1", Some("eval"), "pass@1"), ("CONS@K", Some("eval"), "cons@k")],
        ),
    ])?;
    let table = serde_json::json!({"rows": rows, "wall_s": t0.elapsed().as_secs_f64(), "eval_problems": test.len()});
    let tp = out.join("table.json");
    std::fs::write(&tp, serde_json::to_string_pretty(&table).unwrap_or_default()).map_err(io_err(&tp))?;
    Ok(rows)
}
