//! `aha grpo`: GRPO on a Hugging Face model and a JSONL math set, from a TOML
//! config (unknown keys rejected; command-line flags override it), with
//! checkpoints and exact resume, dynamic sampling and reference resets.

use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use aha_grpo::{AdvantageEstimator, ImportanceSampling, KlEstimator, LossConfig, LossType};
use aha_moe_model::memory::{check_device, memory_plan, Workload};
use aha_moe_model::{
    resolve_device, Layout, LoraConfig, Model, ModelConfig, OffloadConfig, Policy, Precision, SaveDtype, SaveOptions,
};
use aha_rewards::language::Script;
use aha_rewards::{BatchConfig, Example};
use aha_sampler::{load_tokenizer, SamplingParams};
use serde::{Deserialize, Serialize};

use crate::data::{read_math_jsonl_fields, read_rows_jsonl_fields, Cursor, Fields};
use crate::driver::{Driver, RunSpec, Stage, State, Steps};
use crate::error::{io_err, Error, Result};
use crate::eval::evaluate_math;
use crate::optim::{OptimConfig, Optimizer, Schedule};
use crate::rewards::{build, BuildContext, RewardKind, RewardSpec};
use crate::rl::{rollout_kept, train_on_synced, GrpoStep, Rollouts, Scoring};
use crate::rng::Rng;
use crate::run_folder::toml_value;
use crate::template::Templater;

/// A GRPO run. Defaults follow the DeepSeek-R1 report where it states them
/// (learning rate 3e-6, KL coefficient 0.001, 16 samples per prompt,
/// temperature 1.0, reference reset every 400 steps) and TRL's `GRPOConfig`
/// otherwise; each key's comment names its default's source. The crate
/// README maps TRL's keys to these.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoConfig {
    /// The policy's Hugging Face folder.
    pub model: PathBuf,
    /// JSONL prompts (`prompt`, `question` or `problem`) with the fields
    /// the rewards read (`answer`/`gold`, `tests`, `nums`, `target`,
    /// `language`, ...; GSM8K, MATH and AIME field names work as they are).
    pub data: PathBuf,
    /// The field holding the question in `data` and `eval_data` (default
    /// unset: `prompt`, `question` or `problem`; TRL reads `prompt`).
    pub prompt_field: Option<String>,
    /// The field holding the reference answer (default unset: `answer` or
    /// `gold`).
    pub answer_field: Option<String>,
    /// JSONL math problems evaluated during training (default unset: no
    /// evaluation; TRL's `eval_dataset`).
    pub eval_data: Option<PathBuf>,
    /// Evaluate every N steps (default 0 = never; TRL's `eval_steps`).
    pub eval_every: usize,
    /// Evaluate once before the first step (default false; TRL's `eval_on_start`).
    pub eval_before_training: bool,
    /// Samples per evaluation problem, k: pass@1 is averaged over them and
    /// cons@k votes among them (default 4; the R1 report uses 64).
    pub eval_samples: usize,
    /// Evaluation temperature (default 0.6, the R1 report).
    pub eval_temperature: f32,
    /// Evaluation nucleus mass (default 0.95, the R1 report).
    pub eval_top_p: f32,
    /// The run folder.
    pub out: PathBuf,
    /// Optimizer steps.
    pub steps: usize,
    /// Prompts (groups) per step.
    pub prompts_per_step: usize,
    /// Completions per prompt, G (R1: 16).
    pub num_generations: usize,
    /// Peak learning rate (R1: 3e-6).
    pub learning_rate: f64,
    /// Linear warmup steps.
    pub warmup_steps: usize,
    /// `constant` (R1) or `cosine`.
    pub schedule: Schedule,
    /// KL coefficient (default 0.001, the R1 report; TRL's default is 0.0;
    /// 0 loads no reference).
    pub beta: f64,
    /// KL estimator `k1`, `k2` or `k3` (default k3, as DeepSeekMath and TRL,
    /// which has no key for it).
    pub kl_estimator: KlEstimator,
    /// Lower clip (default 0.2, TRL).
    pub epsilon: f64,
    /// Upper clip (DAPO's clip-higher); default unset = `epsilon` (TRL).
    pub epsilon_high: Option<f64>,
    /// Two-sided clipping: cap on the unclipped ratio, must exceed
    /// `1 + epsilon_high` (default unset = off, TRL's `delta`).
    pub delta: Option<f64>,
    /// `token` (GRPO) or `sequence` (GSPO) importance ratios (default
    /// `token`, TRL's `importance_sampling_level`).
    pub importance_sampling_level: ImportanceSampling,
    /// grpo, bnpo, dr_grpo, dapo or cispo (default grpo: DeepSeekMath and
    /// the R1 report; TRL's default is dapo).
    pub loss_type: LossType,
    /// group (GRPO), batch, none (Dr. GRPO), rloo, reinforce_plus_plus_baseline
    /// (default group, TRL's `scale_rewards = "group"`).
    pub scale_rewards: AdvantageEstimator,
    /// Coefficient of an entropy bonus subtracted from the loss (default
    /// 0.0 = off; TRL has no such key, verl's `entropy_coeff` defaults to 0).
    pub entropy_coef: f64,
    /// Train only on tokens whose entropy is in this top fraction of the
    /// batch (default 1.0 = all tokens, TRL's `top_entropy_quantile`).
    pub top_entropy_quantile: f64,
    /// Rollout temperature (default 1.0: the R1 report and TRL).
    pub temperature: f32,
    /// Rollout nucleus mass (default 1.0 = off, TRL).
    pub top_p: f32,
    /// Rollout top-k (default 0 = off; TRL's `top_k` default None).
    pub top_k: usize,
    /// Rollout min-p (default 0.0 = off; TRL's `min_p` default None).
    pub min_p: f32,
    /// Rollout repetition penalty over prompt and completion so far
    /// (default 1.0 = off, TRL and transformers).
    pub repetition_penalty: f32,
    /// Variables passed to the chat template (`template = "chat"` only),
    /// e.g. `{ enable_thinking = false }` (default empty; TRL's
    /// `chat_template_kwargs`).
    pub chat_template_kwargs: BTreeMap<String, serde_json::Value>,
    /// Prompts longer than this many tokens (after the template) are
    /// skipped and counted in the log (default 512, TRL; TRL truncates them
    /// on the left instead, which cuts the question).
    pub max_prompt_length: usize,
    /// Completion length limit.
    pub max_completion_length: usize,
    /// Leave completions cut at the length limit out of the loss.
    pub mask_truncated_completions: bool,
    /// Passes over each generation batch (mu; TRL's default 1).
    pub num_iterations: usize,
    /// Updates per pass (the generation batch split into minibatches).
    pub minibatches: usize,
    /// Tokens (rows x padded length) per forward and backward: minibatches
    /// are split into micro-batches of similar-length completions under
    /// this budget and their gradients accumulated (default 0: no split;
    /// TRL's `per_device_train_batch_size` x `gradient_accumulation_steps`
    /// in tokens).
    pub micro_batch_tokens: usize,
    /// Per-layer activation recomputation on the GPU: the forward keeps each
    /// layer's input only and the backward runs the layer again (default
    /// false; TRL's `gradient_checkpointing`).
    pub recompute: bool,
    /// AdamW offloaded to the host (ZeRO-Offload style, GPU only): f32
    /// master weights and moments in page-locked host memory, gradients
    /// streamed out and updated weights streamed back in buckets (default
    /// false; see `aha_moe_model::offload`). No effect on the CPU.
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
    /// routed experts for every rank's tokens in the training forwards and
    /// backwards (weights stay whole on every rank; docs/scale-out.md).
    /// Not combined with `offload_optimizer` or `[lora]`.
    pub expert_parallel: usize,
    /// DAPO's dynamic sampling: drop groups whose rewards all agree and sample
    /// more prompts until the step has `prompts_per_step` groups (with
    /// several ranks, each rank refills its own share).
    pub dynamic_sampling: bool,
    /// At most this many extra rollout rounds per step for dynamic sampling.
    pub dynamic_sampling_max_rounds: usize,
    /// Copy the policy into the reference every N steps (R1: 400; 0: never).
    pub reference_reset_every: usize,
    /// `none`, `r1-zero` or `chat` (the model folder's template).
    pub template: String,
    /// The rewards (`[[rewards]]` tables: `name`, `kind`, `weight` and the
    /// kind's parameters; see [`crate::rewards`]). Default: `accuracy` and
    /// `format`, weight 1 each (R1-Zero's rule-based rewards).
    pub rewards: Vec<RewardSpec>,
    /// Default target language of `language` rewards (`en`, `zh`, `ru`, ...).
    pub language: String,
    /// Threads scoring completions (0, the default: one per core).
    pub reward_workers: usize,
    /// Wall-clock deadline per completion and reward, in seconds (default
    /// 60, aha-rewards' batch default: above the code reward's 10 s per
    /// test for a few tests); past it the completion scores 0 (`Timeout`).
    pub reward_deadline_s: f64,
    /// Global gradient-norm clip.
    pub max_grad_norm: f64,
    /// Updates skipped in a row for a NaN/Inf loss or gradient norm before
    /// the run aborts (each skip is logged with the batch it came from).
    pub max_skipped_steps: usize,
    /// Save a checkpoint every N steps (0: only the final model).
    pub save_every: usize,
    /// Write the completions of the step's first prompt group (all
    /// `num_generations` of them, with their rewards) to `samples.jsonl`
    /// every N steps (default 1; 0: never; TRL's `log_completions`).
    pub samples_every: usize,
    /// The final model's dtype on disk: `same` (default: each tensor as the
    /// input folder had it; FP8 weights as bf16), `f32`, `bf16` or `f16`.
    /// Resume checkpoints are unaffected.
    pub save_dtype: SaveDtype,
    /// Seed of data order and sampling.
    pub seed: u64,
    /// Where the policy and the reference train and score: `cpu`, `cuda`,
    /// `cuda:N` or `auto` (default: the GPU when one is present and takes
    /// the model). Rollouts run on the CPU engine over the same weights.
    pub device: String,
    /// `f32` (default) or `bf16` (GPU: bf16 products, f32 master weights,
    /// moments and reductions).
    pub precision: String,
    /// LoRA (`[lora]` table: `r`, `alpha`, `target_modules`, `dropout`,
    /// `use_rslora`, defaults PEFT's `LoraConfig`'s; see
    /// [`aha_moe_model::LoraConfig`]). Default unset: full fine-tuning. Set,
    /// only the adapters train, saves write the adapter in PEFT's format,
    /// and the KL reference is the base with the adapter disabled (no
    /// second copy of the weights; `reference_reset_every` then has nothing
    /// to reset).
    pub lora: Option<LoraConfig>,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        GrpoConfig {
            model: PathBuf::new(),
            data: PathBuf::new(),
            prompt_field: None,
            answer_field: None,
            eval_data: None,
            eval_every: 0,
            eval_before_training: false,
            eval_samples: 4,
            eval_temperature: 0.6,
            eval_top_p: 0.95,
            out: PathBuf::from("runs/grpo"),
            steps: 100,
            prompts_per_step: 4,
            num_generations: 16,
            learning_rate: 3e-6,
            warmup_steps: 0,
            schedule: Schedule::Constant,
            beta: 0.001,
            kl_estimator: KlEstimator::K3,
            epsilon: 0.2,
            epsilon_high: None,
            delta: None,
            importance_sampling_level: ImportanceSampling::Token,
            loss_type: LossType::Grpo,
            scale_rewards: AdvantageEstimator::Group,
            entropy_coef: 0.0,
            top_entropy_quantile: 1.0,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            chat_template_kwargs: BTreeMap::new(),
            device: "auto".into(),
            precision: "f32".into(),
            lora: None,
            micro_batch_tokens: 0,
            recompute: false,
            offload_optimizer: false,
            zero_stage: 0,
            expert_parallel: 1,
            max_prompt_length: 512,
            max_completion_length: 1024,
            mask_truncated_completions: false,
            num_iterations: 1,
            minibatches: 1,
            dynamic_sampling: false,
            dynamic_sampling_max_rounds: 4,
            reference_reset_every: 400,
            template: "r1-zero".into(),
            rewards: vec![
                default_reward("accuracy", RewardKind::Accuracy(Default::default())),
                default_reward("format", RewardKind::Format(Default::default())),
            ],
            language: "en".into(),
            reward_workers: 0,
            reward_deadline_s: BatchConfig::default().item_deadline_s,
            max_grad_norm: 1.0,
            max_skipped_steps: 10,
            save_every: 0,
            samples_every: 1,
            save_dtype: SaveDtype::Source,
            seed: 0,
        }
    }
}

/// A reward named after its kind, weight 1, default parameters.
fn default_reward(name: &str, kind: RewardKind) -> RewardSpec {
    RewardSpec {
        name: name.into(),
        weight: 1.0,
        kind,
    }
}

impl GrpoConfig {
    /// Parses TOML; unknown keys are errors naming the file.
    pub fn from_toml(text: &str, path: &Path) -> Result<GrpoConfig> {
        toml::from_str(text).map_err(|e| Error::Config {
            what: path.display().to_string(),
            msg: e.to_string(),
        })
    }

    fn validate(&self) -> Result<()> {
        let bad = |msg: String| {
            Err(Error::Config {
                what: "grpo config".into(),
                msg,
            })
        };
        if let Some(l) = &self.lora {
            l.validate_for_training(Path::new("grpo config [lora]"))?;
        }
        if self.steps == 0 || self.prompts_per_step == 0 || self.num_generations < 2 {
            return bad("steps and prompts_per_step must be >= 1 and num_generations >= 2".into());
        }
        if self.rewards.is_empty() {
            return bad("no rewards".into());
        }
        if (self.eval_every > 0 || self.eval_before_training) && self.eval_data.is_none() {
            return bad("eval_every and eval_before_training need eval_data".into());
        }
        if self.eval_samples == 0 {
            return bad("eval_samples must be at least 1".into());
        }
        if let Err(e) = self.eval_sampling().validate() {
            return bad(format!("eval: {e}"));
        }
        if let Err(e) = Script::of_language(&self.language) {
            return bad(format!("language {:?}: {e}", self.language));
        }
        if let Err(e) = self.reward_batch().validate() {
            return bad(e.to_string());
        }
        if let Err(e) = self.loss_config().validate() {
            return bad(e.to_string());
        }
        if let Err(e) = self.sampling().validate() {
            return bad(e.to_string());
        }
        if let Err(e) = crate::dp::check_zero_stage(self.zero_stage, self.offload_optimizer) {
            return bad(e.to_string());
        }
        if self.expert_parallel == 0 {
            return bad("expert_parallel = 0: must be at least 1 (1: off)".into());
        }
        Ok(())
    }

    /// The loss settings.
    pub fn loss_config(&self) -> LossConfig {
        LossConfig {
            loss_type: self.loss_type,
            epsilon: self.epsilon,
            epsilon_high: self.epsilon_high,
            delta: self.delta,
            beta: self.beta,
            kl_estimator: self.kl_estimator,
            importance_sampling_level: self.importance_sampling_level,
            max_completion_length: self.max_completion_length,
            entropy_coef: self.entropy_coef,
            top_entropy_quantile: self.top_entropy_quantile,
        }
    }

    /// The question and answer fields of the data sets.
    pub fn fields(&self) -> Fields {
        Fields {
            prompt: self.prompt_field.clone(),
            answer: self.answer_field.clone(),
        }
    }

    /// The evaluation's sampling settings (the same seed at every
    /// evaluation, so that they compare).
    pub fn eval_sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.eval_temperature,
            top_p: self.eval_top_p,
            max_new_tokens: self.max_completion_length,
            seed: self.seed,
            ..SamplingParams::default()
        }
    }

    /// The rollout sampling settings (the seed is set per step).
    pub fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            max_new_tokens: self.max_completion_length,
            ..SamplingParams::default()
        }
    }

    /// The batch evaluator's settings.
    pub fn reward_batch(&self) -> BatchConfig {
        let mut b = BatchConfig {
            item_deadline_s: self.reward_deadline_s,
            ..BatchConfig::default()
        };
        if self.reward_workers > 0 {
            b.workers = self.reward_workers;
        }
        b
    }
}

/// Runs GRPO as configured; `resume` continues from the run folder's latest
/// checkpoint. Returns the final step's metrics.
pub fn run_grpo(cfg: &GrpoConfig, resume: bool, log: &mut dyn FnMut(&str)) -> Result<aha_grpo::Metrics> {
    cfg.validate()?;
    // Data parallel when launched as one of several ranks (crate::dp): only
    // rank 0 logs and writes files.
    let dist_env = crate::dist::DistEnv::from_env()?;
    if let Some(e) = &dist_env {
        crate::dp::check_grpo(cfg, e.world)?;
    }
    let mut dp = dist_env.map(crate::dp::DataParallel::join).transpose()?;
    if let Some(d) = dp.as_mut() {
        d.set_zero_stage(cfg.zero_stage)?;
    }
    let writer = dp.as_ref().is_none_or(|d| d.is_writer());
    let mut quiet = |_: &str| {};
    let log: &mut dyn FnMut(&str) = if writer { log } else { &mut quiet };
    let out = &cfg.out;
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let tok = load_tokenizer(&cfg.model)?;
    let templater = Templater::new(&cfg.template, &cfg.model)?.with_kwargs(&cfg.chat_template_kwargs)?;
    let reward_sum = build(
        &cfg.rewards,
        &BuildContext {
            max_completion_length: cfg.max_completion_length,
            language: cfg.language.clone(),
        },
    )
    .map_err(|e| Error::Config {
        what: "grpo config".into(),
        msg: e.to_string(),
    })?;
    let reward_batch = cfg.reward_batch();
    let need_gold = cfg.rewards.iter().any(|r| r.kind.needs_gold());
    let rows = read_rows_jsonl_fields(&cfg.data, need_gold, &cfg.fields())?;
    let mut data: Vec<(Vec<u32>, Example)> = Vec::new();
    let mut skipped = 0;
    for row in rows {
        let ids = templater.encode(&tok, &row.prompt)?;
        if ids.len() > cfg.max_prompt_length {
            skipped += 1;
        } else {
            data.push((ids, row.example));
        }
    }
    log(&format!(
        "{} prompts ({skipped} longer than max_prompt_length {} skipped)",
        data.len(),
        cfg.max_prompt_length
    ));
    if data.is_empty() {
        return Err(Error::DataFile {
            path: cfg.data.clone(),
            msg: "no usable prompts".into(),
        });
    }
    let eval_set = match &cfg.eval_data {
        Some(p) => {
            let ex = read_math_jsonl_fields(p, &cfg.fields())?;
            let mut prompts = Vec::with_capacity(ex.len());
            for e in &ex {
                prompts.push(templater.encode(&tok, &e.prompt)?);
            }
            log(&format!("{}: {} evaluation problems", p.display(), ex.len()));
            Some(EvalSet {
                prompts,
                golds: ex.into_iter().map(|e| e.gold).collect(),
            })
        }
        None => None,
    };
    let cfg_text = toml::to_string(cfg).map_err(|e| Error::Config {
        what: "grpo config".into(),
        msg: format!("cannot be written as TOML: {e}"),
    })?;
    let (mut run, loaded) = Driver::open(
        &RunSpec {
            dir: out,
            config_file: "config.toml",
            config_text: &cfg_text,
            parse: &toml_value,
            moved: &["out"],
            resume,
            tensorboard: true,
            writer,
        },
        log,
    )?;
    // Every rank takes part in a data-parallel checkpoint (its optimizer
    // shard under ZeRO-1; crate::checkpoint::save_ranks).
    run.set_ranks(dp.as_ref().map(|d| d.checkpointer()));
    let optc = OptimConfig {
        lr: cfg.learning_rate,
        warmup_steps: cfg.warmup_steps,
        total_steps: cfg.steps,
        schedule: cfg.schedule,
        weight_decay: 0.0,
        max_grad_norm: cfg.max_grad_norm,
        max_bad_steps: cfg.max_skipped_steps,
    };
    let precision: Precision = cfg.precision.parse()?;
    let mcfg = ModelConfig::from_path(&cfg.model)?;
    let device_spec = dp
        .as_ref()
        .map_or_else(|| cfg.device.clone(), |d| d.device_spec(&cfg.device));
    let device = resolve_device(&device_spec, &mcfg)?;
    crate::dp::check_expert_parallel(
        cfg.expert_parallel,
        dp.as_ref().map_or(1, |d| d.world()),
        mcfg.moe.as_ref().map_or(0, |m| m.n_experts),
        matches!(device, aha_tensor::Device::Cuda(_)),
        cfg.offload_optimizer,
        cfg.lora.is_some(),
    )
    .map_err(|msg| Error::Config {
        what: "grpo config".into(),
        msg,
    })?;
    // The device memory of the policy (trained) and the reference (scored),
    // refused before anything is allocated when it cannot fit.
    let rows = (cfg.prompts_per_step * cfg.num_generations).div_ceil(cfg.minibatches.max(1));
    let seq = cfg.max_prompt_length + cfg.max_completion_length;
    let rows = match cfg.micro_batch_tokens {
        0 => rows,
        b => rows.min((b / seq.max(1)).max(1)),
    };
    let work = Workload {
        tokens: rows * seq,
        scored: rows * cfg.max_completion_length,
        kv_tokens: 0,
        training: true,
        recompute: cfg.recompute,
    };
    // A LoRA run trains the adapters only and its reference is the same
    // weights with the adapters off.
    let layout = match &cfg.lora {
        Some(l) => Layout::with_lora(&mcfg, l)?,
        None => Layout::new(&mcfg),
    };
    let zero1 = dp.as_ref().and_then(|d| d.zero1_place());
    let mut plan = memory_plan(&mcfg, precision, &work)
        .with_lora(&layout, precision)
        .with_zero1(&layout, precision, zero1.map_or(1, |z| z.1));
    if cfg.beta > 0.0 && cfg.lora.is_none() {
        let r = memory_plan(
            &mcfg,
            precision,
            &Workload {
                training: false,
                ..work
            },
        );
        plan.weights += r.weights;
        plan.weights_bf16 += r.weights_bf16;
    }
    if cfg.offload_optimizer {
        plan = plan.with_offload(&layout, precision, OffloadConfig::default().bucket_elems);
    }
    log(&format!("policy on {device} ({precision}); memory plan: {plan}"));
    check_device(&plan, device)?;
    let rollout_spare = crate::rl::spare_device_memory(&plan, device)?;
    let place = |m: Model| -> Result<Policy> {
        let mut p = Policy::new(m, device, precision)?;
        p.set_recompute(cfg.recompute);
        Ok(p)
    };
    // The trained policy: with its optimizer offloaded when asked, before
    // any moments exist (a resume restores them onto the host).
    let place_policy = |m: Model| -> Result<Policy> {
        let mut p = place(m)?;
        p.set_offload_optimizer(cfg.offload_optimizer.then(OffloadConfig::default))?;
        if let Some((rank, world)) = zero1 {
            crate::dp::shard_master(&mut p, rank, world)?;
        }
        Ok(p)
    };
    let (st, start, cursor) = match loaded {
        Some(l) => {
            let mut m = l.model;
            m.source_dir = Some(cfg.model.clone());
            let mut policy = place_policy(m)?;
            let mut opt = Optimizer::new(optc);
            crate::checkpoint::restore_optimizer(&l.dir, l.moments, &l.state, &mut policy, &mut opt, dp.as_mut())?;
            let reference = match (l.reference, &cfg.lora) {
                (_, Some(_)) => None,
                (Some(r), None) => Some(place(r)?),
                (None, None) => Some(place(policy.host_model()?.into_owned())?),
            };
            let cursor = match l.state.extra.get("data_cursor") {
                Some(c) => serde_json::from_value(c.clone()).map_err(|e| Error::Checkpoint {
                    path: l.dir.join("state.json"),
                    msg: format!("extra.data_cursor: {e}"),
                })?,
                None => {
                    log("checkpoint without a data cursor: the data order restarts");
                    Cursor::default()
                }
            };
            let st = State {
                policy,
                reference,
                opt,
                rng: Rng::from_state(l.state.rng),
            };
            (st, l.state.step, cursor)
        }
        None => {
            let (policy, reference) = match &cfg.lora {
                Some(l) => (place_policy(Model::load(&cfg.model)?.with_lora(l, cfg.seed)?)?, None),
                None => (
                    place_policy(Model::load(&cfg.model)?)?,
                    Some(place(Model::load(&cfg.model)?)?),
                ),
            };
            let st = State {
                policy,
                reference,
                opt: Optimizer::new(optc),
                rng: Rng::new(cfg.seed),
            };
            (st, 0, Cursor::default())
        }
    };
    let mut st = st;
    // Expert parallel: the policy's training forwards and backwards (the
    // reference is another model, scored whole on each rank; rollouts
    // and evaluation run in the sampler engine, whole as well).
    if let Some(d) = dp.as_mut() {
        d.set_expert_parallel(&mut st.policy, cfg.expert_parallel)?;
    }
    if let (Some(set), true, 0, true) = (&eval_set, cfg.eval_before_training, start, writer) {
        let e = evaluate(&st.policy, &tok, set, cfg)?;
        log(&format!("step 0: eval pass@1 {:.3}", e["eval/pass@1"]));
        run.metrics(None, 0, &e)?;
    }
    let mut stage = GrpoStage {
        cfg,
        tok: &tok,
        data: &data,
        eval_set: eval_set.as_ref(),
        reward_sum: &reward_sum,
        reward_batch: &reward_batch,
        step_cfg: GrpoStep {
            num_generations: cfg.num_generations,
            loss: cfg.loss_config(),
            advantages: cfg.scale_rewards,
            sampling: cfg.sampling(),
            mask_truncated: cfg.mask_truncated_completions,
            num_iterations: cfg.num_iterations,
            minibatches: cfg.minibatches,
            micro_batch_tokens: cfg.micro_batch_tokens,
        },
        names: cfg.rewards.iter().map(|r| r.name.as_str()).collect(),
        cursor,
        dp: dp.as_mut(),
        first: start + 1,
        writer,
        batch: None,
        last: aha_grpo::Metrics::new(),
        rollout_cache: aha_sampler::EngineCache::new(),
        rollout_spare,
    };
    let steps = Steps {
        start,
        total: cfg.steps,
        save_every: cfg.save_every,
        reference_reset_every: cfg.reference_reset_every,
        log_phase: None,
        checkpoint_prefix: "step",
        label: "step",
        ..Steps::new("grpo")
    };
    run.run(&steps, &mut st, &mut stage, log)?;
    let last = stage.last;
    if !writer {
        return Ok(last);
    }
    run.plots(&[
        ("reward.png", "REWARD", &[("REWARD", None, "reward")]),
        ("kl.png", "KL TO THE REFERENCE", &[("KL", None, "kl")]),
        ("loss.png", "GRPO LOSS", &[("LOSS", None, "loss")]),
        (
            "length.png",
            "COMPLETION LENGTH",
            &[("MEAN TOKENS", None, "completions/mean_length")],
        ),
        ("eval.png", "EVALUATION", &[("PASS@1", None, "eval/pass@1")]),
    ])?;
    st.policy.save_as(
        &out.join("final"),
        &SaveOptions {
            dtype: cfg.save_dtype,
            max_shard_bytes: 4 << 30,
            ..SaveOptions::default()
        },
    )?;
    Ok(last)
}

/// `aha grpo`'s steps as a [`Stage`]: prompts drawn by the data cursor
/// (epochs without replacement), DAPO's dynamic sampling, a rank's share
/// of each step's groups, evaluation every `eval_every` steps and the
/// first group's completions in `samples.jsonl`.
struct GrpoStage<'a> {
    cfg: &'a GrpoConfig,
    tok: &'a aha_sampler::Tokenizer,
    data: &'a [(Vec<u32>, Example)],
    eval_set: Option<&'a EvalSet>,
    reward_sum: &'a aha_rewards::WeightedSum,
    reward_batch: &'a BatchConfig,
    step_cfg: GrpoStep,
    names: Vec<&'a str>,
    cursor: Cursor,
    dp: Option<&'a mut crate::dp::DataParallel>,
    /// The first step this process runs (where the data-parallel layout is logged).
    first: usize,
    writer: bool,
    /// The last step's rollouts (for `samples.jsonl`).
    batch: Option<Rollouts>,
    /// The last step's metrics.
    last: aha_grpo::Metrics,
    /// The GPU rollout engine's KV pool and decode graphs, kept from one
    /// step's rollout to the next.
    rollout_cache: aha_sampler::EngineCache,
    /// Device bytes the memory plan leaves beside training (`None` on the
    /// CPU): a kept pool larger than this is released before the training
    /// step.
    rollout_spare: Option<u64>,
}

impl Stage for GrpoStage<'_> {
    fn step(&mut self, step: usize, st: &mut State, log: &mut dyn FnMut(&str)) -> Result<Option<aha_grpo::Metrics>> {
        let cfg = self.cfg;
        let g = cfg.num_generations;
        let mut sc = self.step_cfg.clone();
        let mut batch: Option<Rollouts> = None;
        let mut dropped = 0usize;
        // Data parallel: this rank's share of the step's groups.
        let share = match &self.dp {
            Some(d) => d.shard(cfg.prompts_per_step, "prompts_per_step")?.len(),
            None => cfg.prompts_per_step,
        };
        for round in 0..=cfg.dynamic_sampling_max_rounds {
            if round > 0 && !cfg.dynamic_sampling {
                break;
            }
            let have = batch.as_ref().map_or(0, |b| b.prompts.len());
            let need = share.saturating_sub(have);
            // How many prompts every rank draws from the (shared) cursor,
            // and where this rank's `need` of them start: the first round
            // splits the step's prompts evenly; a refill round sums what
            // each rank still needs (its dynamic sampling dropped groups
            // of its own), so the cursors stay the same on every rank and
            // each rank fills its share with whole groups.
            let (total, before) = match &self.dp {
                Some(d) if round == 0 => (cfg.prompts_per_step, d.rank() * share),
                Some(d) => {
                    let needs = d.group()?.all_gather_f64(&[need as f64])?.concat();
                    let total = needs.iter().map(|&x| x as usize).sum::<usize>();
                    (total, needs.iter().take(d.rank()).map(|&x| x as usize).sum())
                }
                None => (need, 0),
            };
            if total == 0 {
                break;
            }
            let picks = self.cursor.take(self.data.len(), total, cfg.seed);
            // A rank's share: whole groups, sampled from their global index.
            let (picks, first) = match picks.get(before..before + need) {
                Some(p) if self.dp.is_some() => (p.to_vec(), before),
                _ if self.dp.is_some() => {
                    return Err(Error::Other(format!(
                        "step {step}: {total} prompts drawn, this rank's {need} from {before} are not among them"
                    )))
                }
                _ => (picks, 0),
            };
            if picks.is_empty() {
                // This rank is full; the others refill.
                continue;
            }
            sc.sampling.prompt_offset = first as u64;
            let prompts: Vec<Vec<u32>> = picks.iter().map(|&i| self.data[i].0.clone()).collect();
            let examples: Vec<Example> = picks.iter().map(|&i| self.data[i].1.clone()).collect();
            sc.sampling.seed = cfg.seed.wrapping_add((step * 1_000_003 + round * 7919) as u64);
            let scoring = Scoring {
                rewards: self.reward_sum,
                examples: &examples,
                batch: self.reward_batch,
            };
            let r = rollout_kept(&st.policy, self.tok, &prompts, &scoring, &sc, &mut self.rollout_cache)?;
            let keep: Vec<usize> = if cfg.dynamic_sampling && round < cfg.dynamic_sampling_max_rounds {
                (0..prompts.len()).filter(|&k| !r.group_is_flat(k, g)).collect()
            } else {
                (0..prompts.len()).collect()
            };
            dropped += prompts.len() - keep.len();
            let r = r.select(&keep, g);
            match &mut batch {
                Some(b) => b.extend(r),
                None => batch = Some(r),
            }
        }
        let Some(batch) = batch.filter(|b| !b.prompts.is_empty()) else {
            log(&format!(
                "step {step}: every sampled group had equal rewards; no update"
            ));
            return Ok(None);
        };
        // Dynamic sampling on several ranks: the step's groups and dropped
        // groups over every rank; each rank must hold its full share (the
        // last round keeps every group it samples).
        let mut groups = None;
        if let Some(d) = self.dp.as_deref_mut().filter(|_| cfg.dynamic_sampling) {
            let all = d.group()?.all_gather_f64(&[batch.prompts.len() as f64])?.concat();
            if all.iter().any(|&x| x as usize != share) {
                return Err(Error::Other(format!(
                    "step {step}: dynamic sampling left the ranks with {all:?} groups, not {share} each"
                )));
            }
            let mut x = [dropped as f64];
            d.group()?.sum_f64(&mut x)?;
            dropped = x[0] as usize;
            groups = Some(all.iter().sum::<f64>());
        }
        let kv = self.rollout_cache.bytes() as u64;
        if self.rollout_spare.is_some_and(|spare| kv > spare) {
            if step == self.first {
                log(&format!(
                    "the rollout KV pool ({:.2} GB) does not fit beside training: released after each rollout",
                    kv as f64 / 1e9
                ));
            }
            self.rollout_cache.release();
        }
        let sync = self.dp.as_deref_mut().map(|d| d as &mut dyn crate::rl::StepSync);
        let mut m = train_on_synced(
            &mut st.policy,
            st.reference.as_ref(),
            &mut st.opt,
            &batch,
            &self.names,
            &sc,
            sync,
        )?;
        if let Some(d) = self.dp.as_deref_mut() {
            m.insert("timing/allreduce_s".into(), d.take_allreduce_s());
            if step == self.first {
                log(&d.describe());
            }
        }
        if let Some(groups) = groups {
            m.insert("dynamic_sampling/groups".into(), groups);
        }
        m.insert("dynamic_sampling/dropped_groups".into(), dropped as f64);
        m.insert("epoch".into(), self.cursor.fraction(self.data.len()));
        self.batch = Some(batch);
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
        if let (Some(set), true) = (
            self.eval_set,
            self.writer && cfg.eval_every > 0 && step.is_multiple_of(cfg.eval_every),
        ) {
            let e = evaluate(&st.policy, self.tok, set, cfg)?;
            log(&format!("step {step}: eval pass@1 {:.3}", e["eval/pass@1"]));
            m.extend(e);
        }
        if let (Some(batch), true) = (
            &self.batch,
            cfg.samples_every > 0 && step.is_multiple_of(cfg.samples_every),
        ) {
            write_samples(run, self.tok, step, batch, &self.names)?;
        }
        log(&format!(
            "step {step}/{}  reward {:.3}  kl {:.4}  length {:.1}",
            cfg.steps,
            m.get("reward").copied().unwrap_or(f64::NAN),
            m.get("kl").copied().unwrap_or(0.0),
            m.get("completions/mean_length").copied().unwrap_or(0.0)
        ));
        self.last = m.clone();
        Ok(())
    }

    fn extra(&self) -> Result<serde_json::Map<String, serde_json::Value>> {
        let mut extra = serde_json::Map::new();
        extra.insert(
            "data_cursor".into(),
            serde_json::to_value(self.cursor).map_err(|e| Error::Other(format!("data cursor: {e}")))?,
        );
        Ok(extra)
    }
}

/// Evaluation problems, rendered and tokenized, with their answers.
struct EvalSet {
    prompts: Vec<Vec<u32>>,
    golds: Vec<String>,
}

/// pass@1 (over `eval_samples` samples), pass@k, cons@k, the share without
/// an answer and the mean length of the policy on the evaluation set,
/// under `eval/`.
fn evaluate(
    policy: &Policy,
    tok: &aha_sampler::Tokenizer,
    set: &EvalSet,
    cfg: &GrpoConfig,
) -> Result<aha_grpo::Metrics> {
    // The policy's own device: the GPU engine when it is on a GPU.
    let (e, _, _) = evaluate_math(
        policy,
        tok,
        &set.prompts,
        &set.golds,
        cfg.eval_samples,
        &cfg.eval_sampling(),
    )?;
    Ok([
        ("eval/pass@1", e.pass_at_1),
        ("eval/pass@k", e.pass_at_k),
        ("eval/cons@k", e.cons_at_k),
        ("eval/k", e.k as f64),
        ("eval/no_answer", e.no_answer),
        ("eval/mean_length", e.mean_length),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect())
}

/// Appends the completions of `batch`'s first prompt group to
/// `samples.jsonl`, a line each: `step`, `prompt`, `completion`, `tokens`,
/// `finish_reason`, the weighted `reward` and each reward function's score
/// under `rewards`.
fn write_samples(
    run: &mut Driver,
    tok: &aha_sampler::Tokenizer,
    step: usize,
    batch: &Rollouts,
    names: &[&str],
) -> Result<()> {
    let Some(first) = batch.prompts.first() else {
        return Ok(());
    };
    let prompt = aha_sampler::decode(tok, first)?;
    for (i, c) in batch
        .completions
        .iter()
        .enumerate()
        .filter(|(_, c)| c.prompt_index == 0)
    {
        let rewards: serde_json::Map<String, serde_json::Value> = names
            .iter()
            .zip(&batch.per_fn)
            .map(|(name, v)| {
                (
                    (*name).to_string(),
                    serde_json::json!(v.get(i).copied().unwrap_or(f64::NAN)),
                )
            })
            .collect();
        run.sample(&serde_json::json!({
            "step": step,
            "prompt": prompt,
            "completion": c.text,
            "tokens": c.token_ids.len(),
            "finish_reason": format!("{:?}", c.finish_reason).to_lowercase(),
            "reward": batch.total.get(i).copied().unwrap_or(f64::NAN),
            "rewards": rewards,
        }))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<GrpoConfig> {
        GrpoConfig::from_toml(text, Path::new("g.toml"))
    }

    #[test]
    fn every_loss_and_sampling_key_reaches_its_config() {
        let cfg = parse(
            "importance_sampling_level = \"sequence\"\ndelta = 1.5\nkl_estimator = \"k1\"\nentropy_coef = 0.01\n\
             top_entropy_quantile = 0.2\ntop_k = 20\nmin_p = 0.05\nrepetition_penalty = 1.1\nmax_prompt_length = 64\n\
             [chat_template_kwargs]\nenable_thinking = false\n",
        )
        .unwrap();
        cfg.validate().unwrap();
        let l = cfg.loss_config();
        assert_eq!(l.importance_sampling_level, ImportanceSampling::Sequence);
        assert_eq!(l.delta, Some(1.5));
        assert_eq!(l.kl_estimator, KlEstimator::K1);
        assert_eq!((l.entropy_coef, l.top_entropy_quantile), (0.01, 0.2));
        let s = cfg.sampling();
        assert_eq!((s.top_k, s.min_p, s.repetition_penalty), (20, 0.05, 1.1));
        assert_eq!(cfg.chat_template_kwargs["enable_thinking"], serde_json::json!(false));
        // The resolved config written to the run folder parses back the same.
        let text = toml::to_string(&cfg).unwrap();
        assert_eq!(parse(&text).unwrap(), cfg);
    }

    #[test]
    fn bad_values_and_unknown_keys_are_errors_naming_them() {
        let e = parse("repetition_penaltyy = 1.1\n").unwrap_err().to_string();
        assert!(e.contains("g.toml") && e.contains("repetition_penaltyy"), "{e}");
        let e = parse("delta = 1.1\n").unwrap().validate().unwrap_err().to_string();
        assert!(e.contains("delta"), "{e}");
        let e = parse("repetition_penalty = 0.0\n")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("repetition_penalty"), "{e}");
        let e = parse("top_entropy_quantile = 0.0\n")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("top_entropy_quantile"), "{e}");
    }

    #[test]
    fn chat_template_kwargs_reach_the_template() {
        let dir = std::env::temp_dir().join(format!("aha-grpo-kwargs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/chat_templates/qwen3.jinja"),
        )
        .unwrap();
        std::fs::write(
            dir.join("tokenizer_config.json"),
            serde_json::json!({ "chat_template": src }).to_string(),
        )
        .unwrap();
        let plain = Templater::new("chat", &dir).unwrap().prompt("hi").unwrap();
        let kw: BTreeMap<String, serde_json::Value> =
            [("enable_thinking".to_string(), serde_json::json!(false))].into();
        let off = Templater::new("chat", &dir)
            .unwrap()
            .with_kwargs(&kw)
            .unwrap()
            .prompt("hi")
            .unwrap();
        assert!(!plain.contains("<think>"), "{plain}");
        assert!(off.ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"), "{off}");
        assert!(Templater::new("none", &dir).unwrap().with_kwargs(&kw).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
