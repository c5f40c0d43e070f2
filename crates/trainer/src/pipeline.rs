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

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use aha_moe_model::{Model, ModelConfig, Policy, Precision, SaveDtype, SaveOptions};
use aha_rewards::BatchConfig;
use aha_sampler::{SamplingParams, Tokenizer};
use aha_tensor::Device;
use serde::Serialize;

use crate::demo::DemoConfig;
use crate::error::{io_err, Error, Result};
use crate::eval::{evaluate_math, sample_toy, MathEval};
use crate::optim::{sft_step, OptimConfig, Optimizer, Schedule};
use crate::rl::{grpo_step, Scoring};
use crate::toy::{self, Problem, Rng};

/// One row of the final table.
#[derive(Debug, Clone, Serialize)]
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

/// SFT over `examples` for `steps` steps of `batch`, drawing batches with
/// `rng`; examples of similar length are batched together (length buckets:
/// each batch is drawn from a window of the length-sorted list). Each step
/// is reported to `log` as `step i/steps loss x` (a terminal redraws these
/// lines in place).
pub(crate) fn sft(
    model: &mut Policy,
    examples: &[(Vec<u32>, Vec<u32>)],
    steps: usize,
    batch: usize,
    lr: f64,
    rng: &mut Rng,
    log: &mut dyn FnMut(&str),
) -> Result<f64> {
    sft_synced(model, examples, steps, batch, lr, rng, log, None)
}

/// [`sft`] on one rank of a data-parallel run: every rank draws the same
/// global batch from the same `rng` and trains on its share of it.
pub(crate) fn sft_synced(
    model: &mut Policy,
    examples: &[(Vec<u32>, Vec<u32>)],
    steps: usize,
    batch: usize,
    lr: f64,
    rng: &mut Rng,
    log: &mut dyn FnMut(&str),
    mut dp: Option<&mut crate::dp::DataParallel>,
) -> Result<f64> {
    let share = match dp.as_deref() {
        Some(d) => d.shard(batch, "batch")?,
        None => 0..batch,
    };
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| examples[i].0.len() + examples[i].1.len());
    let mut opt = Optimizer::new(optim(lr, steps, Schedule::Cosine));
    let window = (batch * 4).min(order.len()).max(1);
    let mut loss = f64::NAN;
    for step in 1..=steps {
        let start = rng.below((order.len() - window + 1) as u64) as usize;
        let b: Vec<(Vec<u32>, Vec<u32>)> = (0..batch)
            .map(|_| examples[order[start + rng.below(window as u64) as usize]].clone())
            .collect();
        let sync = dp.as_deref_mut().map(|d| d as &mut dyn crate::rl::StepSync);
        loss = crate::optim::sft_step_synced(model, &mut opt, &b[share.clone()], toy::PAD, sync)?.0;
        log(&format!("step {step}/{steps} sft loss {loss:.4}"));
    }
    Ok(loss)
}

/// GRPO from `model` for `steps` steps (accuracy and format rewards, KL to
/// the starting weights).
fn grpo(model: &mut Policy, cfg: &DemoConfig, tok: &Tokenizer, steps: usize, rng: &mut Rng, seed: u64) -> Result<()> {
    let reference = Policy::new(model.host_model()?.into_owned(), model.device(), model.precision())?;
    let mut opt = Optimizer::new(optim(cfg.grpo_lr, steps, Schedule::Constant));
    let step_cfg = cfg.grpo_step_config();
    let rewards = toy::rewards();
    let reward_batch = BatchConfig::default();
    for step in 1..=steps {
        let problems: Vec<Problem> = (0..cfg.prompts_per_step)
            .map(|_| toy::problem(rng, cfg.spec(), false))
            .collect();
        let prompts = toy::encode_prompts(tok, &problems)?;
        let examples = toy::examples(&problems);
        let scoring = Scoring {
            rewards: &rewards,
            examples: &examples,
            batch: &reward_batch,
        };
        let mut sc = step_cfg.clone();
        sc.sampling.seed = seed.wrapping_add(step as u64 * 1_000_003);
        grpo_step(model, Some(&reference), &mut opt, tok, &prompts, &scoring, &sc)?;
    }
    Ok(())
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

fn score(
    name: &str,
    model: &Policy,
    tok: &Tokenizer,
    test: &[Problem],
    k: usize,
    seed: u64,
    max_new: usize,
) -> Result<Row> {
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
    let (eval, _, _) = evaluate_math(model, tok, &prompts, &golds, k, &params)?;
    Ok(Row {
        model: name.into(),
        params: model.num_params(),
        eval,
    })
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

/// Runs the recipe into `out`; returns the table (also written as
/// `table.json`), each model saved under `out/<name>/` in HF layout.
pub fn run_pipeline(cfg: &PipelineConfig, out: &Path, log: &mut dyn FnMut(&str)) -> Result<Vec<Row>> {
    let t0 = Instant::now();
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let d = &cfg.demo;
    let tok = toy::tokenizer()?;
    let mut rng = Rng::new(d.seed);
    let spec = d.spec();
    spec.validate()?;
    if spec.task == toy::Task::Countdown {
        return Err(Error::Other(
            "the pipeline scores numeric answers (math verification, cons@k over numbers): use addition or multiplication"
                .into(),
        ));
    }
    let test: Vec<Problem> = toy::test_set(spec, d.eval_problems);
    let teacher_json = d.model_config_json();
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
    let mut rows = Vec::new();
    let score_row = |name: &str, m: &Policy| score(name, m, &tok, &test, cfg.eval_k, d.seed, d.max_new_tokens);
    let place = |m: Model| Policy::new(m, cfg.device, cfg.precision);
    let copy = |m: &Policy| -> Result<Policy> { Ok(place(m.host_model()?.into_owned())?) };

    // 1. Base.
    let mcfg = ModelConfig::from_json_str(&teacher_json.to_string(), Path::new("<pipeline config>"))?;
    let mut base = place(Model::random(mcfg, d.seed, 0.02))?;
    // Fresh problems every step, as in the demo: mixing both completion
    // styles in every batch matters here (length-bucketed batches of the base
    // corpus separate them and the base then fails to learn the reasoning).
    let mut opt = Optimizer::new(optim(d.pretrain_lr, d.pretrain_steps, Schedule::Cosine));
    let mut loss = f64::NAN;
    for _ in 0..d.pretrain_steps {
        let batch: Vec<(Vec<u32>, Vec<u32>)> = (0..d.pretrain_batch)
            .map(|_| {
                let p = toy::problem(&mut rng, spec, false);
                encode_pair(
                    &tok,
                    &p.prompt(),
                    &toy::base_completion(&mut rng, &p, d.reasoning_share),
                )
            })
            .collect::<Result<_>>()?;
        loss = sft_step(&mut base, &mut opt, &batch, toy::PAD)?.0;
    }
    log(&format!("base: pretrained {} steps, loss {loss:.3}", d.pretrain_steps));
    save("base", &base, &teacher_json)?;
    rows.push(score_row("base", &base)?);

    // 2. R1-Zero: pure RL from the base.
    let mut zero = copy(&base)?;
    grpo(&mut zero, d, &tok, d.grpo_steps, &mut rng, d.seed ^ 1)?;
    save("r1-zero", &zero, &teacher_json)?;
    rows.push(score_row("r1-zero", &zero)?);
    log(&format!("r1-zero: pass@1 {:.3}", rows[1].eval.pass_at_1));

    // 3. R1: cold start, reasoning RL, rejection sampling + SFT.
    let cold: Vec<(Vec<u32>, Vec<u32>)> = (0..cfg.cold_start_traces)
        .map(|_| {
            let p = toy::problem(&mut rng, spec, false);
            encode_pair(&tok, &p.prompt(), &p.reasoning())
        })
        .collect::<Result<_>>()?;
    let mut r1 = copy(&base)?;
    let l = sft(&mut r1, &cold, cfg.sft_steps, 32, 1e-3, &mut rng, log)?;
    log(&format!("r1: cold-start SFT on {} traces, loss {l:.3}", cold.len()));
    grpo(&mut r1, d, &tok, d.grpo_steps / 2, &mut rng, d.seed ^ 2)?;
    let problems: Vec<Problem> = (0..cfg.rejection_prompts)
        .map(|_| toy::problem(&mut rng, spec, false))
        .collect();
    let max_len = d.max_new_tokens;
    let kept = rejection_sample(&r1, &tok, &problems, cfg.rejection_k, max_len, d.seed ^ 3, |text, p| {
        toy::accuracy_reward(text, p) == 1.0 && toy::format_reward(text) == 1.0 && text.len() <= 4 * max_len
    })?;
    let sft_path = out.join("rejection_sampled.jsonl");
    {
        let mut w = std::io::BufWriter::new(std::fs::File::create(&sft_path).map_err(io_err(&sft_path))?);
        for (p, c) in &kept {
            writeln!(w, "{}", serde_json::json!({"prompt": p, "completion": c})).map_err(io_err(&sft_path))?;
        }
        w.flush().map_err(io_err(&sft_path))?;
    }
    log(&format!(
        "r1: rejection sampling kept {} of {}",
        kept.len(),
        problems.len() * cfg.rejection_k
    ));
    let data: Vec<(Vec<u32>, Vec<u32>)> = kept
        .iter()
        .map(|(p, c)| encode_pair(&tok, p, c))
        .collect::<Result<_>>()?;
    if !data.is_empty() {
        sft(&mut r1, &data, cfg.sft_steps, 32, 3e-4, &mut rng, log)?;
    }
    save("r1", &r1, &teacher_json)?;
    rows.push(score_row("r1", &r1)?);
    log(&format!("r1: pass@1 {:.3}", rows[2].eval.pass_at_1));

    // 4. Distillation into a smaller dense student.
    let teach_problems: Vec<Problem> = (0..cfg.rejection_prompts * 2)
        .map(|_| toy::problem(&mut rng, spec, false))
        .collect();
    let traces = rejection_sample(&r1, &tok, &teach_problems, 2, max_len, d.seed ^ 4, |text, _| {
        toy::format_reward(text) == 1.0
    })?;
    let sjson = cfg.student_json();
    let scfg = ModelConfig::from_json_str(&sjson.to_string(), Path::new("<student config>"))?;
    let mut student = place(Model::random(scfg, d.seed ^ 5, 0.02))?;
    let sdata: Vec<(Vec<u32>, Vec<u32>)> = traces
        .iter()
        .map(|(p, c)| encode_pair(&tok, p, c))
        .collect::<Result<_>>()?;
    let l = sft(&mut student, &sdata, cfg.student_steps, 64, 3e-3, &mut rng, log)?;
    log(&format!(
        "student: {} parameters, SFT on {} teacher traces, loss {l:.3}",
        student.num_params(),
        sdata.len()
    ));
    save("student", &student, &sjson)?;
    rows.push(score_row("student", &student)?);

    let table = serde_json::json!({"rows": rows, "wall_s": t0.elapsed().as_secs_f64(), "eval_problems": test.len()});
    let tp = out.join("table.json");
    std::fs::write(&tp, serde_json::to_string_pretty(&table).unwrap_or_default()).map_err(io_err(&tp))?;
    Ok(rows)
}
