//! `aha sft`, `aha rejection-sample` and `aha distill` on a user's model and
//! data.
//!
//! SFT data is JSONL: `{"prompt": ..., "completion": ...}` or
//! `{"messages": [...]}` whose last message is the assistant's. The prompt
//! side goes through the template; the completion is appended as written, so
//! a chat template that strips reasoning before `</think>` from assistant
//! turns (DeepSeek-R1's does) cannot delete the reasoning from the targets.
//! The loss covers completion tokens only; batches are drawn from
//! length-sorted windows (bucketing).

use std::io::Write;
use std::path::{Path, PathBuf};

use aha_moe_model::memory::{check_device, memory_plan, Workload};
use aha_moe_model::{
    resolve_device, Layout, LoraConfig, Model, OffloadConfig, Policy, Precision, SaveDtype, SaveOptions,
};
use aha_rewards::format::{check_format, FormatConfig};
use aha_rewards::language::{chain_of_thought, consistency, Script};
use aha_rewards::math::{verify, MathConfig};
use aha_sampler::{load_tokenizer, EngineConfig, SamplingParams, Tokenizer};
use serde::Serialize;

use crate::checkpoint::Loaded;
use crate::data::read_math_jsonl;
use crate::error::{io_err, Error, Result};
use crate::eval::{evaluate_math, MathEval};
use crate::pipeline::{sft_loop_synced, sft_optimizer, step_metrics};
use crate::rng::Rng;
use crate::run_folder::{json_value, open_run, toml_value, LogCursor, RunLog};
pub use crate::template::Templater;
use crate::toy::encode;

/// Reads SFT pairs as token ids (prompt, completion + EOS).
pub fn read_sft_jsonl(
    path: &Path,
    tok: &Tokenizer,
    t: &Templater,
    eos: Option<u32>,
) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
    let mut out = Vec::new();
    for (n, v) in crate::data::read_jsonl(path)? {
        let bad = |m: &str| Error::Data {
            path: path.to_path_buf(),
            line: n,
            msg: m.into(),
        };
        let (prompt, completion) = if let Some(msgs) = v.get("messages").and_then(|m| m.as_array()) {
            let (last, rest) = msgs.split_last().ok_or_else(|| bad("empty `messages`"))?;
            if last.get("role").and_then(|r| r.as_str()) != Some("assistant") {
                return Err(bad("the last message must be the assistant's"));
            }
            let content = last
                .get("content")
                .and_then(|c| c.as_str())
                .ok_or_else(|| bad("assistant `content` must be a string"))?;
            (
                t.conversation(&serde_json::Value::Array(rest.to_vec()))?,
                content.to_string(),
            )
        } else {
            let p = v
                .get("prompt")
                .and_then(|x| x.as_str())
                .ok_or_else(|| bad("no `prompt` string (or `messages`)"))?;
            let c = v
                .get("completion")
                .and_then(|x| x.as_str())
                .ok_or_else(|| bad("no `completion` string"))?;
            (t.prompt(p)?, c.to_string())
        };
        let mut c = encode(tok, &completion)?;
        if let Some(e) = eos {
            c.push(e);
        }
        let p = encode(tok, &prompt)?;
        if p.is_empty() || c.is_empty() {
            return Err(bad("empty prompt or completion after tokenizing"));
        }
        out.push((p, c));
    }
    if out.is_empty() {
        return Err(Error::DataFile {
            path: path.to_path_buf(),
            msg: "no examples".into(),
        });
    }
    Ok(out)
}

/// An SFT run (cold start, rejection-sampling SFT, distillation): the
/// `aha sft` TOML config. Unknown keys are errors; every CLI flag overrides
/// its key; the resolved config is written to `out/sft_config.toml`.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SftConfig {
    /// Model folder (config.json alone: start from random weights).
    pub model: PathBuf,
    /// JSONL with `prompt` + `completion`, or `messages`.
    pub data: PathBuf,
    /// Output folder (the fine-tuned model in HF layout).
    pub out: PathBuf,
    /// `none`, `r1-zero` or `chat` (the model folder's template, without the
    /// DeepSeek-R1 template's stripping of the reasoning from targets).
    pub template: String,
    /// Optimizer steps.
    pub steps: usize,
    /// Sequences per step (length-bucketed).
    pub batch: usize,
    /// Peak learning rate (warmup then cosine).
    pub learning_rate: f64,
    /// Seed of the data order (and of the initialisation without weights).
    pub seed: u64,
    /// `cpu`, `cuda`, `cuda:N` or `auto` (default: the GPU when one is
    /// present and takes the model).
    pub device: String,
    /// `f32` (default) or `bf16` (bf16 products with f32 sums).
    pub precision: String,
    /// The saved model's dtype: `same` (default: each tensor as the input
    /// folder had it, f32 without weights), `f32`, `bf16` or `f16`.
    pub save_dtype: SaveDtype,
    /// LoRA (`[lora]` table: `r`, `alpha`, `target_modules`, `dropout`,
    /// `use_rslora`, defaults PEFT's `LoraConfig`'s; see
    /// [`aha_moe_model::LoraConfig`]). Default unset: full fine-tuning.
    /// Set, only the adapters train and `out` receives the adapter in
    /// PEFT's format (`adapter_config.json`, `adapter_model.safetensors`).
    pub lora: Option<LoraConfig>,
    /// Save a checkpoint (`out/checkpoints/`) every N steps for `--resume`
    /// (default 0: none; TRL's `save_steps`).
    pub save_every: usize,
    /// Sample completions every N steps into `out/samples.jsonl` (default
    /// 0: only after the last step).
    pub sample_every: usize,
    /// Prompts sampled each time: the first N examples of `data`, one
    /// completion each at temperature 0.6, top-p 0.95 (the R1 report's
    /// evaluation setting); default 4, 0 = no samples.
    pub sample_prompts: usize,
    /// Token limit of each sample (default 256; never past the model's
    /// `max_position_embeddings`).
    pub sample_max_tokens: usize,
    /// AdamW offloaded to the host (GPU only): f32 master weights and
    /// moments in page-locked host memory, gradients and weights streamed
    /// in buckets (default false; see `aha_moe_model::offload`).
    pub offload_optimizer: bool,
    /// ZeRO stage of a data-parallel run (`aha launch`): 0 (default) keeps
    /// AdamW's moments for every parameter on every rank; 1 shards them
    /// (each rank updates its contiguous slice of the trainable parameters
    /// and the weights are all-gathered), dividing the optimizer's memory
    /// by the number of ranks with the same updates (docs/scale-out.md).
    /// No effect on one process; not combined with `offload_optimizer`.
    pub zero_stage: u8,
    /// Expert parallelism of a data-parallel run on GPUs (`aha launch`): 1
    /// (default) is off; N, which must equal the number of ranks and
    /// divide the model's routed experts, makes every rank compute E / N
    /// routed experts for every rank's tokens in the training forward and
    /// backward (weights stay whole on every rank; docs/scale-out.md).
    /// Not combined with `offload_optimizer` or `[lora]`.
    pub expert_parallel: usize,
}

impl Default for SftConfig {
    fn default() -> SftConfig {
        SftConfig {
            model: PathBuf::new(),
            data: PathBuf::new(),
            out: PathBuf::new(),
            template: "chat".into(),
            steps: 100,
            batch: 16,
            learning_rate: 1e-5,
            seed: 0,
            device: "auto".into(),
            precision: "f32".into(),
            save_dtype: SaveDtype::Source,
            lora: None,
            save_every: 0,
            sample_every: 0,
            sample_prompts: 4,
            sample_max_tokens: 256,
            offload_optimizer: false,
            zero_stage: 0,
            expert_parallel: 1,
        }
    }
}

impl SftConfig {
    /// Parses a TOML config; `path` names the file in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<SftConfig> {
        toml::from_str(text).map_err(|e| Error::Config {
            what: path.display().to_string(),
            msg: e.to_string(),
        })
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: &str| {
            Err(Error::Config {
                what: "sft config".into(),
                msg: m.into(),
            })
        };
        if self.model.as_os_str().is_empty() || self.data.as_os_str().is_empty() || self.out.as_os_str().is_empty() {
            return bad("model, data and out are required");
        }
        if self.steps == 0 || self.batch == 0 {
            return bad("steps and batch must be >= 1");
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad("learning_rate must be a positive number");
        }
        if let Some(l) = &self.lora {
            l.validate_for_training(Path::new("sft config [lora]"))?;
        }
        if let Err(e) = crate::dp::check_zero_stage(self.zero_stage, self.offload_optimizer) {
            return bad(&e.to_string());
        }
        if self.expert_parallel == 0 {
            return bad("expert_parallel = 0: must be at least 1 (1: off)");
        }
        Ok(())
    }
}

/// Runs [`run_sft`] from a config into the run folder `out` (see
/// [`run_sft_config_with`]); returns the last loss.
pub fn run_sft_config(cfg: &SftConfig, log: &mut dyn FnMut(&str)) -> Result<f64> {
    run_sft_config_with(cfg, false, log)
}

/// Runs SFT from a config; `out` is both the fine-tuned model (HF layout)
/// and the run folder: `sft_config.toml` (the resolved config; a resume
/// with another one is refused naming the first key that differs),
/// `metrics.jsonl` (`step`, `loss`, `grad_norm`, `learning_rate`, `epoch`
/// a step), TensorBoard events beside it, `samples.jsonl`, `plots/*.png`
/// and, with `save_every`, `checkpoints/`. With `resume`, continues from
/// the latest checkpoint bit for bit (weights, optimizer moments, the data
/// RNG, the step). Progress goes to `log` (see [`run_sft_logged`]).
pub fn run_sft_config_with(cfg: &SftConfig, resume: bool, log: &mut dyn FnMut(&str)) -> Result<f64> {
    cfg.validate()?;
    let text = toml::to_string(cfg).map_err(|e| Error::Other(e.to_string()))?;
    // Data parallel when launched as one of several ranks (crate::dp):
    // rank 0 alone writes the run folder; the others read its checkpoint
    // on resume (a folder every rank sees).
    let mut dp = crate::dp::DataParallel::from_env()?;
    if let Some(d) = dp.as_mut() {
        d.set_zero_stage(cfg.zero_stage)?;
    }
    let loaded = if dp.as_ref().is_none_or(|d| d.is_writer()) {
        open_run(&cfg.out, "sft_config.toml", &text, &toml_value, &["out"], resume, log)?
    } else if resume {
        crate::checkpoint::load_latest(&cfg.out.join("checkpoints"))?
    } else {
        None
    };
    Ok(sft_in_folder(cfg, &cfg.out, &cfg.out, loaded, log, dp.as_mut())?.0)
}

/// Fine-tunes `model_dir` on `data` and saves to `out`; returns the last loss.
///
/// A folder with a `config.json` and a tokenizer but no weights starts from a
/// random initialisation (a student trained from scratch). `device` is a
/// `--device` value (`cpu`, `cuda`, `cuda:N`, `auto`) with the precision;
/// the result is saved in `save_dtype`.
#[allow(clippy::too_many_arguments)]
pub fn run_sft(
    model_dir: &Path,
    data: &Path,
    out: &Path,
    template: &str,
    steps: usize,
    batch: usize,
    lr: f64,
    seed: u64,
    device: (&str, Precision),
    save_dtype: SaveDtype,
) -> Result<f64> {
    run_sft_logged(
        model_dir,
        data,
        out,
        template,
        steps,
        batch,
        lr,
        seed,
        device,
        save_dtype,
        &mut |_| {},
        None,
    )
}

/// [`run_sft`], reporting to `log`: the device and memory plan first, then
/// one `step i/n sft loss x` line a step. With `lora`, adapters are added
/// (seeded by `seed`), only they train and `out` receives the adapter in
/// PEFT's format. `out` also gets the run folder's logs (metrics, events,
/// samples, plots; no checkpoints).
#[allow(clippy::too_many_arguments)]
pub fn run_sft_logged(
    model_dir: &Path,
    data: &Path,
    out: &Path,
    template: &str,
    steps: usize,
    batch: usize,
    lr: f64,
    seed: u64,
    (device, precision): (&str, Precision),
    save_dtype: SaveDtype,
    log: &mut dyn FnMut(&str),
    lora: Option<&LoraConfig>,
) -> Result<f64> {
    let cfg = SftConfig {
        model: model_dir.to_path_buf(),
        data: data.to_path_buf(),
        out: out.to_path_buf(),
        template: template.into(),
        steps,
        batch,
        learning_rate: lr,
        seed,
        device: device.into(),
        precision: precision.to_string(),
        save_dtype,
        lora: lora.cloned(),
        ..SftConfig::default()
    };
    Ok(sft_in_folder(&cfg, out, out, None, log, None)?.0)
}

/// The reference answer of each SFT line that has one (`answer` or `gold`,
/// a string or a number), in the order [`read_sft_jsonl`] returns them.
fn sft_golds(path: &Path, n: usize) -> Result<Vec<Option<String>>> {
    Ok(crate::data::read_jsonl(path)?
        .into_iter()
        .take(n)
        .map(|(_, v)| {
            ["answer", "gold"].iter().find_map(|k| match v.get(*k)? {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Number(x) => Some(x.to_string()),
                _ => None,
            })
        })
        .collect())
}

/// What an SFT run samples: the first examples' prompts, their reference
/// answers where the data has them, and the token limit.
struct SamplePlan {
    prompts: Vec<Vec<u32>>,
    golds: Vec<Option<String>>,
    max_new: usize,
    seed: u64,
}

impl SamplePlan {
    /// One completion per prompt from `policy`, written to `run`'s
    /// `samples.jsonl` with `step`; where a reference answer exists, each
    /// line gets the R1 rule rewards `accuracy` (math verification) and
    /// `format` (`<think>...</think> <answer>...</answer>`), whose means go
    /// into `m` as `samples/accuracy` and `samples/format`.
    fn write(
        &self,
        policy: &Policy,
        tok: &Tokenizer,
        step: usize,
        run: &mut RunLog,
        m: &mut aha_grpo::Metrics,
    ) -> Result<()> {
        if self.prompts.is_empty() || self.max_new == 0 {
            return Ok(());
        }
        let engine = aha_sampler::Sampler::new(policy, Some(tok), EngineConfig::default(), &[])?;
        let params = SamplingParams {
            temperature: 0.6,
            top_p: 0.95,
            max_new_tokens: self.max_new,
            seed: self.seed,
            ..SamplingParams::default()
        };
        let (completions, _) = engine.generate(&self.prompts, 1, &params)?;
        let (mut acc, mut fmt, mut scored) = (0.0, 0.0, 0usize);
        for c in &completions {
            let prompt = aha_sampler::decode(tok, &self.prompts[c.prompt_index])?;
            let mut line = serde_json::json!({
                "step": step, "prompt": prompt, "completion": c.text,
                "tokens": c.token_ids.len(),
            });
            if let Some(Some(gold)) = self.golds.get(c.prompt_index) {
                let a = verify(gold, &c.text, &MathConfig::default()).score;
                let f = f64::from(u8::from(check_format(&c.text, &FormatConfig::default()).is_ok()));
                line["answer"] = gold.as_str().into();
                line["accuracy"] = a.into();
                line["format"] = f.into();
                (acc, fmt, scored) = (acc + a, fmt + f, scored + 1);
            }
            run.sample(&line)?;
        }
        if scored > 0 {
            m.insert("samples/accuracy".into(), acc / scored as f64);
            m.insert("samples/format".into(), fmt / scored as f64);
        }
        Ok(())
    }
}

/// SFT as `cfg` says, saving the model to `model_out` and the logs and
/// checkpoints to the run folder `dir`; continues from `loaded` when given.
/// With `dp`, one rank of a data-parallel run: only rank 0 logs, samples,
/// checkpoints and saves. Returns the last loss and the open logs (`None`
/// on the other ranks).
fn sft_in_folder(
    cfg: &SftConfig,
    model_out: &Path,
    dir: &Path,
    loaded: Option<Loaded>,
    log: &mut dyn FnMut(&str),
    mut dp: Option<&mut crate::dp::DataParallel>,
) -> Result<(f64, Option<RunLog>)> {
    let writer = dp.as_ref().is_none_or(|d| d.is_writer());
    let mut quiet = |_: &str| {};
    let log: &mut dyn FnMut(&str) = if writer { log } else { &mut quiet };
    let device = dp
        .as_ref()
        .map_or_else(|| cfg.device.clone(), |d| d.device_spec(&cfg.device));
    let precision: Precision = cfg.precision.parse()?;
    let (model_dir, data, seed, batch) = (&cfg.model, &cfg.data, cfg.seed, cfg.batch);
    let (model, resumed) = match loaded {
        Some(l) => {
            let mut m = l.model;
            m.source_dir = Some(model_dir.clone());
            (m, Some((l.state, l.moments, l.dir)))
        }
        None => {
            let has_weights = model_dir.join("model.safetensors").is_file()
                || model_dir.join("model.safetensors.index.json").is_file();
            let model = if has_weights {
                Model::load(model_dir)?
            } else {
                let mut m = Model::random(aha_moe_model::ModelConfig::from_path(model_dir)?, seed, 0.02);
                m.source_dir = Some(model_dir.to_path_buf());
                m
            };
            let model = match &cfg.lora {
                Some(l) => model.with_lora(l, seed)?,
                None => model,
            };
            (model, None)
        }
    };
    // The device first: a wrong --device fails before any data is read.
    let dev = resolve_device(&device, &model.config)?;
    crate::dp::check_expert_parallel(
        cfg.expert_parallel,
        dp.as_ref().map_or(1, |d| d.world()),
        model.config.moe.as_ref().map_or(0, |m| m.n_experts),
        matches!(dev, aha_tensor::Device::Cuda(_)),
        cfg.offload_optimizer,
        cfg.lora.is_some(),
    )
    .map_err(|msg| Error::Config {
        what: "sft config".into(),
        msg,
    })?;
    let tok = load_tokenizer(model_dir)?;
    let t = Templater::new(&cfg.template, model_dir)?;
    let examples = read_sft_jsonl(data, &tok, &t, model.config.eos_token_ids.first().copied())?;
    let max_pos = model.config.max_position_embeddings;
    if let Some((i, e)) = examples
        .iter()
        .enumerate()
        .find(|(_, e)| e.0.len() + e.1.len() > max_pos)
    {
        return Err(Error::DataFile {
            path: data.to_path_buf(),
            msg: format!(
                "example {} has {} tokens, more than max_position_embeddings {max_pos}",
                i + 1,
                e.0.len() + e.1.len()
            ),
        });
    }
    // Expert parallel without ZeRO-1: each rank holds only its routed
    // experts (weights, gradients, moments). Decoding needs every expert,
    // so such a run draws no samples.
    let ep_shard = match dp.as_ref() {
        Some(d) if cfg.expert_parallel > 1 && cfg.zero_stage == 0 => {
            let e = model.config.moe.as_ref().map_or(0, |m| m.n_experts);
            Some(aha_cuda_kernels::moe_ep::expert_shard(e, d.world(), d.rank()))
        }
        _ => None,
    };
    if ep_shard.is_some() && cfg.sample_prompts > 0 {
        log("sft: no samples: the routed experts are sharded over the expert-parallel ranks and decoding needs all of them");
    }
    let n_samples = match ep_shard {
        Some(_) => 0,
        None => cfg.sample_prompts.min(examples.len()),
    };
    let prompts: Vec<Vec<u32>> = examples[..n_samples].iter().map(|e| e.0.clone()).collect();
    let longest_prompt = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let samples = SamplePlan {
        golds: sft_golds(data, n_samples)?,
        prompts,
        max_new: cfg.sample_max_tokens.min(max_pos.saturating_sub(longest_prompt)),
        seed,
    };
    let longest = examples.iter().map(|e| e.0.len() + e.1.len()).max().unwrap_or(0);
    let plan = memory_plan(
        &model.config,
        precision,
        &Workload {
            tokens: batch * longest,
            scored: batch * longest,
            kv_tokens: 0,
            training: true,
            recompute: false,
        },
    );
    let zero1 = dp.as_ref().and_then(|d| d.zero1_place());
    let plan = plan
        .with_lora(&model.layout, precision)
        .with_zero1(&model.layout, precision, zero1.map_or(1, |z| z.1));
    let plan = if cfg.offload_optimizer {
        plan.with_offload(&model.layout, precision, OffloadConfig::default().bucket_elems)
    } else {
        plan
    };
    let plan = match &ep_shard {
        Some(sh) => plan.with_expert_shard(&Layout::with_expert_shard(&model.config, sh.clone())?, precision),
        None => plan,
    };
    log(&format!("sft: model on {dev} ({precision}); memory plan: {plan}"));
    check_device(&plan, dev)?;
    let mut policy = Policy::new(model, dev, precision)?;
    policy.set_offload_optimizer(cfg.offload_optimizer.then(OffloadConfig::default))?;
    if let Some((rank, world)) = zero1 {
        crate::dp::shard_master(&mut policy, rank, world)?;
    }
    // Expert parallel: the training forward and backward (samples run in
    // the sampler engine, the whole model on rank 0).
    if let Some(d) = dp.as_deref_mut() {
        d.set_expert_parallel(&mut policy, cfg.expert_parallel)?;
    }
    if let Some(sh) = &ep_shard {
        policy.shard_experts()?;
        log(&format!(
            "sft: this rank holds routed experts {}..{} of {}",
            sh.start,
            sh.end,
            model_experts(&policy)
        ));
    }
    let mut opt = sft_optimizer(cfg.learning_rate, cfg.steps);
    let (mut rng, start, cursor) = match resumed {
        Some((st, moments, ckdir)) => {
            crate::checkpoint::restore_optimizer(&ckdir, moments, &st, &mut policy, &mut opt, dp.as_deref_mut())?;
            (Rng::from_state(st.rng), st.step, Some(LogCursor::of(&st)))
        }
        None => (Rng::new(seed), 0, None),
    };
    let mut run = if writer { Some(RunLog::open(dir, cursor)?) } else { None };
    let n = examples.len();
    // Every rank takes part in a checkpoint (crate::checkpoint::save_ranks).
    let ranks = dp.as_ref().map(|d| d.checkpointer());
    let loss = sft_loop_synced(
        &mut policy,
        &mut opt,
        &examples,
        start,
        cfg.steps,
        batch,
        &mut rng,
        log,
        &mut |s| {
            let save = cfg.save_every > 0 && s.step.is_multiple_of(cfg.save_every) && s.step < cfg.steps;
            let Some(run) = run.as_mut() else {
                if let (true, Some(rc)) = (save, ranks.as_ref()) {
                    // This rank's part of rank 0's checkpoint.
                    let name = format!("step-{:06}", s.step);
                    crate::checkpoint::save_rank_part(&dir.join("checkpoints"), &name, s.model, s.opt, rc)?;
                }
                return Ok(());
            };
            let mut m = step_metrics(s.loss, &s.info);
            // Examples drawn so far over the set's size (TRL's `epoch`).
            m.insert("epoch".into(), (s.step * batch) as f64 / n as f64);
            if (cfg.sample_every > 0 && s.step.is_multiple_of(cfg.sample_every)) || s.step == cfg.steps {
                samples.write(s.model, &tok, s.step, run, &mut m)?;
            }
            run.metrics(None, s.step, &m)?;
            if save {
                run.checkpoint_ranks(
                    &format!("step-{:06}", s.step),
                    "sft",
                    s.step,
                    s.rng,
                    s.model,
                    None,
                    s.opt,
                    serde_json::Map::new(),
                    ranks.as_ref(),
                )?;
            }
            Ok(())
        },
        dp.as_deref_mut(),
    )?;
    if let Some(d) = &dp {
        log(&d.describe());
    }
    // Sharded experts: every rank sends its experts for rank 0's save.
    let whole = match ep_shard {
        Some(_) => Some(policy.gather_host_model()?.into_owned()),
        None => None,
    };
    let Some(run) = run else {
        return Ok((loss, None));
    };
    run.plots(&[
        ("loss.png", "SFT LOSS", &[("LOSS", None, "loss")]),
        ("grad_norm.png", "GRADIENT NORM", &[("GRAD NORM", None, "grad_norm")]),
        ("learning_rate.png", "LEARNING RATE", &[("LR", None, "learning_rate")]),
        (
            "samples.png",
            "SAMPLED COMPLETIONS",
            &[
                ("ACCURACY", None, "samples/accuracy"),
                ("FORMAT", None, "samples/format"),
            ],
        ),
    ])?;
    let opts = SaveOptions {
        dtype: cfg.save_dtype,
        max_shard_bytes: 4 << 30,
        ..SaveOptions::default()
    };
    match &whole {
        Some(m) => m.save_as(model_out, &opts)?,
        None => policy.save_as(model_out, &opts)?,
    }
    Ok((loss, Some(run)))
}

/// The routed experts of the policy's model (0: not an MoE model).
fn model_experts(policy: &Policy) -> usize {
    policy.config().moe.as_ref().map_or(0, |m| m.n_experts)
}

/// Options of rejection sampling.
pub struct RejectionOptions {
    /// Samples per prompt.
    pub k: usize,
    /// Completion length limit (tokens).
    pub max_new_tokens: usize,
    /// Shortest kept completion (characters).
    pub min_chars: usize,
    /// Longest kept completion (characters).
    pub max_chars: usize,
    /// Language the reasoning must be in (`en`, `zh`, ...); `None`: not checked.
    pub language: Option<String>,
    /// Least share of words in that language's script.
    pub min_language_share: f64,
    /// Sampling temperature.
    pub temperature: f32,
    /// Seed.
    pub seed: u64,
    /// Where the model samples (a resolved `--device`; the GPU engine on a
    /// GPU) and its precision.
    pub place: (aha_tensor::Device, Precision),
}

/// What rejection sampling kept.
#[derive(Debug, Clone, Serialize)]
pub struct RejectionStats {
    /// Completions sampled.
    pub sampled: usize,
    /// Completions kept.
    pub kept: usize,
    /// Prompts with at least one kept completion.
    pub prompts_covered: usize,
}

/// k samples per prompt of a math set; keeps those that are correct (math
/// verification), in R1-Zero's format, in the target language and within the
/// length bounds; writes `{"prompt", "completion"}` lines to `out`.
pub fn run_rejection_sampling(
    model_dir: &Path,
    data: &Path,
    template: &str,
    o: &RejectionOptions,
    out: &Path,
) -> Result<RejectionStats> {
    run_rejection_sampling_with_progress(model_dir, data, template, o, out, &mut |_| {})
}

/// [`run_rejection_sampling`], reporting the sampling's progress to
/// `progress` as completions finish (a progress bar's input).
pub fn run_rejection_sampling_with_progress(
    model_dir: &Path,
    data: &Path,
    template: &str,
    o: &RejectionOptions,
    out: &Path,
    progress: &mut dyn FnMut(&aha_sampler::Progress),
) -> Result<RejectionStats> {
    let policy = Policy::new(Model::load(model_dir)?, o.place.0, o.place.1)?;
    let tok = load_tokenizer(model_dir)?;
    let t = Templater::new(template, model_dir)?;
    let ex = read_math_jsonl(data)?;
    let prompts: Vec<Vec<u32>> = ex
        .iter()
        .map(|e| encode(&tok, &t.prompt(&e.prompt)?))
        .collect::<Result<_>>()?;
    let script = match &o.language {
        Some(l) => Some(Script::of_language(l).map_err(|e| Error::Config {
            what: "rejection sampling".into(),
            msg: format!("language {l:?}: {e}"),
        })?),
        None => None,
    };
    let engine = aha_sampler::Sampler::new(
        &policy,
        Some(&tok),
        EngineConfig {
            max_batch: (o.k * 16).max(64),
            ..EngineConfig::default()
        },
        &[],
    )?;
    let params = SamplingParams {
        temperature: o.temperature,
        max_new_tokens: o.max_new_tokens,
        seed: o.seed,
        ..SamplingParams::default()
    };
    let (completions, _) = engine.generate_with_progress(&prompts, o.k, &params, progress)?;
    let mut w = std::io::BufWriter::new(std::fs::File::create(out).map_err(io_err(out))?);
    let mut covered = vec![false; ex.len()];
    let mut kept = 0;
    for c in &completions {
        let e = &ex[c.prompt_index];
        let ok = verify(&e.gold, &c.text, &MathConfig::default()).score == 1.0
            && check_format(&c.text, &FormatConfig::default()).is_ok()
            && (o.min_chars..=o.max_chars).contains(&c.text.chars().count())
            && script
                .is_none_or(|s| consistency(chain_of_thought(&c.text), s).is_some_and(|x| x >= o.min_language_share));
        if ok {
            kept += 1;
            covered[c.prompt_index] = true;
            writeln!(
                w,
                "{}",
                serde_json::json!({"prompt": e.prompt, "completion": c.text, "answer": e.gold})
            )
            .map_err(io_err(out))?;
        }
    }
    w.flush().map_err(io_err(out))?;
    Ok(RejectionStats {
        sampled: completions.len(),
        kept,
        prompts_covered: covered.iter().filter(|&&x| x).count(),
    })
}

/// The result of a distillation.
#[derive(Debug, Clone, Serialize)]
pub struct DistillReport {
    /// Traces the teacher wrote that were kept.
    pub traces: usize,
    /// Teacher's held-out scores.
    pub teacher: MathEval,
    /// Student's held-out scores after SFT.
    pub student: MathEval,
    /// Where the student was saved.
    pub student_dir: PathBuf,
}

/// How `aha distill` saves, resumes and samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DistillRun {
    /// Continue from `out/checkpoints/latest` (the student's SFT step); the
    /// teacher's traces of the interrupted run are kept, not sampled again.
    pub resume: bool,
    /// Save a checkpoint every N steps of the student's SFT (0: none).
    pub save_every: usize,
    /// Sample the student every N steps into `samples.jsonl` (0: only after
    /// the last step).
    pub sample_every: usize,
    /// Prompts sampled each time (the first traces' prompts; 0: none).
    pub sample_prompts: usize,
}

impl Default for DistillRun {
    fn default() -> DistillRun {
        DistillRun {
            resume: false,
            save_every: 0,
            sample_every: 0,
            sample_prompts: 4,
        }
    }
}

/// Teacher writes (rejection-sampled) traces for `train`; the student (a
/// model folder, e.g. a smaller dense one) learns them by SFT; both are
/// evaluated on `test` (pass@1 over `k_eval` samples at temperature 0.6).
/// The student is saved in `save_dtype`. See [`run_distill_with`].
#[allow(clippy::too_many_arguments)]
pub fn run_distill(
    teacher_dir: &Path,
    student_dir: &Path,
    train: &Path,
    test: &Path,
    template: &str,
    o: &RejectionOptions,
    steps: usize,
    lr: f64,
    k_eval: usize,
    out: &Path,
    device: (&str, Precision),
    save_dtype: SaveDtype,
    log: &mut dyn FnMut(&str),
) -> Result<DistillReport> {
    run_distill_with(
        teacher_dir,
        student_dir,
        train,
        test,
        template,
        o,
        steps,
        lr,
        k_eval,
        out,
        device,
        save_dtype,
        DistillRun::default(),
        log,
    )
}

/// [`run_distill`] into the run folder `out`: `distill_config.json` (every
/// setting; a resume with another is refused naming the first key that
/// differs), `teacher_traces.jsonl`, the student's SFT logs as `aha sft`
/// writes them (`metrics.jsonl`, TensorBoard events, `samples.jsonl` with
/// the R1 rule rewards of each sample against the trace's answer,
/// `plots/`), a `phase` `eval` line per model in `metrics.jsonl`,
/// `student/` and, with `run.save_every`, `checkpoints/`.
#[allow(clippy::too_many_arguments)]
pub fn run_distill_with(
    teacher_dir: &Path,
    student_dir: &Path,
    train: &Path,
    test: &Path,
    template: &str,
    o: &RejectionOptions,
    steps: usize,
    lr: f64,
    k_eval: usize,
    out: &Path,
    device: (&str, Precision),
    save_dtype: SaveDtype,
    run: DistillRun,
    log: &mut dyn FnMut(&str),
) -> Result<DistillReport> {
    let settings = serde_json::json!({
        "teacher": teacher_dir, "student": student_dir, "train": train, "test": test,
        "template": template, "k": o.k, "max_new_tokens": o.max_new_tokens,
        "min_chars": o.min_chars, "max_chars": o.max_chars, "language": o.language,
        "min_language_share": o.min_language_share, "temperature": o.temperature, "seed": o.seed,
        "steps": steps, "batch": 32, "lr": lr, "k_eval": k_eval,
        "device": device.0, "precision": device.1.to_string(), "save_dtype": save_dtype,
        "save_every": run.save_every, "sample_every": run.sample_every, "sample_prompts": run.sample_prompts,
    });
    let text = serde_json::to_string_pretty(&settings).map_err(|e| Error::Other(e.to_string()))?;
    let loaded = open_run(out, "distill_config.json", &text, &json_value, &[], run.resume, log)?;
    let traces_path = out.join("teacher_traces.jsonl");
    let traces = match &loaded {
        // Written whole before the first checkpoint was taken.
        Some(_) => {
            let n = std::fs::read_to_string(&traces_path)
                .map_err(io_err(&traces_path))?
                .lines()
                .filter(|l| !l.trim().is_empty())
                .count();
            log(&format!("distill: {n} teacher traces from {}", traces_path.display()));
            n
        }
        None => {
            log("distill: the teacher samples its traces");
            let stats = run_rejection_sampling(teacher_dir, train, template, o, &traces_path)?;
            log(&format!(
                "distill: kept {} of {} traces ({} prompts covered)",
                stats.kept, stats.sampled, stats.prompts_covered
            ));
            stats.kept
        }
    };
    if traces == 0 {
        return Err(Error::Other(
            "the teacher's traces were all rejected: nothing to distil".into(),
        ));
    }
    let sdir = out.join("student");
    let cfg = SftConfig {
        model: student_dir.to_path_buf(),
        data: traces_path.clone(),
        out: sdir.clone(),
        template: template.into(),
        steps,
        batch: 32,
        learning_rate: lr,
        seed: o.seed,
        device: device.0.into(),
        precision: device.1.to_string(),
        save_dtype,
        lora: None,
        save_every: run.save_every,
        sample_every: run.sample_every,
        sample_prompts: run.sample_prompts,
        ..SftConfig::default()
    };
    let (_, logs) = sft_in_folder(&cfg, &sdir, out, loaded, log, None)?;
    let mut logs = logs.ok_or_else(|| Error::Other("distill: the student's SFT kept no logs".into()))?;
    log("distill: evaluating the teacher and the student");
    let score = |dir: &Path| -> Result<MathEval> {
        let m = Model::load(dir)?;
        let tok = load_tokenizer(dir).or_else(|_| load_tokenizer(student_dir))?;
        let t = Templater::new(template, dir).or_else(|_| Templater::new(template, student_dir))?;
        let ex = read_math_jsonl(test)?;
        let prompts: Vec<Vec<u32>> = ex
            .iter()
            .map(|e| encode(&tok, &t.prompt(&e.prompt)?))
            .collect::<Result<_>>()?;
        let golds: Vec<String> = ex.iter().map(|e| e.gold.clone()).collect();
        let params = SamplingParams {
            temperature: 0.6,
            top_p: 0.95,
            max_new_tokens: o.max_new_tokens,
            seed: o.seed,
            ..SamplingParams::default()
        };
        Ok(evaluate_math(&m, &tok, &prompts, &golds, k_eval, &params)?.0)
    };
    let report = DistillReport {
        traces,
        teacher: score(teacher_dir)?,
        student: score(&sdir)?,
        student_dir: sdir,
    };
    for (i, (name, e)) in [("teacher", &report.teacher), ("student", &report.student)]
        .into_iter()
        .enumerate()
    {
        let m: aha_grpo::Metrics = [
            ("pass@1", e.pass_at_1),
            ("pass@k", e.pass_at_k),
            ("cons@k", e.cons_at_k),
            ("no_answer", e.no_answer),
            ("mean_length", e.mean_length),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        logs.metrics_labelled(Some("eval"), i, &[("model", name)], &m)?;
    }
    Ok(report)
}
