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
use aha_moe_model::{resolve_device, LoraConfig, Model, OffloadConfig, Policy, Precision, SaveDtype, SaveOptions};
use aha_rewards::format::{check_format, FormatConfig};
use aha_rewards::language::{chain_of_thought, consistency, Script};
use aha_rewards::math::{verify, MathConfig};
use aha_sampler::chat::{self, ChatTemplate};
use aha_sampler::{load_tokenizer, EngineConfig, SamplingParams, Tokenizer};
use serde::Serialize;

use crate::data::read_math_jsonl;
use crate::error::{io_err, Error, Result};
use crate::eval::{evaluate_math, MathEval};
use crate::toy::{encode, Rng};

/// How prompts are rendered: `none`, `r1-zero` or `chat`.
pub struct Templater {
    kind: String,
    chat: Option<ChatTemplate>,
    /// Extra variables of the chat template (`enable_thinking`, ...).
    kwargs: Vec<(String, chat::Value)>,
}

impl Templater {
    /// Loads the model folder's chat template when `kind` is `chat`.
    pub fn new(kind: &str, model_dir: &Path) -> Result<Templater> {
        if !["none", "r1-zero", "chat"].contains(&kind) {
            return Err(Error::Other(format!(
                "unknown template {kind:?}: none, r1-zero or chat"
            )));
        }
        let chat = if kind == "chat" {
            Some(ChatTemplate::load(model_dir)?)
        } else {
            None
        };
        Ok(Templater {
            kind: kind.into(),
            chat,
            kwargs: Vec::new(),
        })
    }

    /// Passes `kwargs` to the chat template as extra variables, as
    /// transformers' `apply_chat_template(..., **kwargs)` does (TRL's
    /// `chat_template_kwargs`, e.g. `enable_thinking = false` for Qwen3).
    /// Only a `chat` template reads them; for the others they are an error.
    pub fn with_kwargs(mut self, kwargs: &std::collections::BTreeMap<String, serde_json::Value>) -> Result<Templater> {
        if kwargs.is_empty() {
            return Ok(self);
        }
        if self.chat.is_none() {
            return Err(Error::Other(format!(
                "chat_template_kwargs need template = \"chat\" (template is {:?})",
                self.kind
            )));
        }
        for (k, v) in kwargs {
            self.kwargs.push((k.clone(), chat::json_value(&v.to_string())?));
        }
        Ok(self)
    }

    /// The prompt text for a plain question.
    pub fn prompt(&self, text: &str) -> Result<String> {
        Ok(match (self.kind.as_str(), &self.chat) {
            ("r1-zero", _) => chat::render_r1_zero(text),
            ("chat", Some(t)) if self.kwargs.is_empty() => t.render_user_prompt(text)?,
            ("chat", Some(t)) => {
                let message = chat::Value::from_pairs([
                    ("role", chat::Value::from("user")),
                    ("content", chat::Value::from(text)),
                ]);
                let extra: Vec<(&str, chat::Value)> =
                    self.kwargs.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
                t.render(&chat::Value::from(vec![message]), true, &extra)?
            }
            _ => text.to_string(),
        })
    }

    /// The prompt rendered and tokenized.
    pub fn encode(&self, tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
        encode(tok, &self.prompt(text)?)
    }

    /// The prompt text for a conversation (the last message excluded), with
    /// the generation prompt.
    pub fn conversation(&self, messages: &serde_json::Value) -> Result<String> {
        match &self.chat {
            Some(t) => {
                let extra: Vec<(&str, chat::Value)> =
                    self.kwargs.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
                Ok(t.render(&chat::json_value(&messages.to_string())?, true, &extra)?)
            }
            None => Err(Error::Other("`messages` lines need --template chat".into())),
        }
    }
}

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
    /// `f32` (default) or `bf16` (GPU only).
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
    /// AdamW offloaded to the host (GPU only): f32 master weights and
    /// moments in page-locked host memory, gradients and weights streamed
    /// in buckets (default false; see `aha_moe_model::offload`).
    pub offload_optimizer: bool,
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
            offload_optimizer: false,
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
        Ok(())
    }
}

/// Runs [`run_sft`] from a config and writes the resolved config to
/// `out/sft_config.toml`; returns the last loss. Progress goes to `log`
/// (see [`run_sft_logged`]).
pub fn run_sft_config(cfg: &SftConfig, log: &mut dyn FnMut(&str)) -> Result<f64> {
    cfg.validate()?;
    let loss = run_sft_with(
        &cfg.model,
        &cfg.data,
        &cfg.out,
        &cfg.template,
        cfg.steps,
        cfg.batch,
        cfg.learning_rate,
        cfg.seed,
        (&cfg.device, cfg.precision.parse()?),
        cfg.save_dtype,
        log,
        cfg.lora.as_ref(),
        cfg.offload_optimizer,
    )?;
    let text = toml::to_string(cfg).map_err(|e| Error::Other(e.to_string()))?;
    let p = cfg.out.join("sft_config.toml");
    std::fs::write(&p, text).map_err(io_err(&p))?;
    Ok(loss)
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
/// PEFT's format.
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
    run_sft_with(
        model_dir,
        data,
        out,
        template,
        steps,
        batch,
        lr,
        seed,
        (device, precision),
        save_dtype,
        log,
        lora,
        false,
    )
}

/// [`run_sft_logged`] with the optimizer offloaded to the host when
/// `offload` (`offload_optimizer`; GPU only).
#[allow(clippy::too_many_arguments)]
fn run_sft_with(
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
    offload: bool,
) -> Result<f64> {
    let has_weights =
        model_dir.join("model.safetensors").is_file() || model_dir.join("model.safetensors.index.json").is_file();
    let model = if has_weights {
        Model::load(model_dir)?
    } else {
        let mut m = Model::random(aha_moe_model::ModelConfig::from_path(model_dir)?, seed, 0.02);
        m.source_dir = Some(model_dir.to_path_buf());
        m
    };
    let model = match lora {
        Some(l) => model.with_lora(l, seed)?,
        None => model,
    };
    // The device first: a wrong --device fails before any data is read.
    let dev = resolve_device(device, &model.config, precision)?;
    let tok = load_tokenizer(model_dir)?;
    let t = Templater::new(template, model_dir)?;
    let examples = read_sft_jsonl(data, &tok, &t, model.config.eos_token_ids.first().copied())?;
    let max_pos = model.config.max_position_embeddings;
    if let Some((i, e)) = examples
        .iter()
        .enumerate()
        .find(|(_, e)| e.0.len() + e.1.len() > max_pos)
    {
        return Err(Error::Other(format!(
            "{}: example {} has {} tokens, more than max_position_embeddings {max_pos}",
            data.display(),
            i + 1,
            e.0.len() + e.1.len()
        )));
    }
    let mut rng = Rng::new(seed);
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
    let plan = if offload {
        plan.with_offload(&model.layout, precision, OffloadConfig::default().bucket_elems)
    } else {
        plan
    };
    log(&format!("sft: model on {dev} ({precision}); memory plan: {plan}"));
    check_device(&plan, dev)?;
    let mut policy = Policy::new(model, dev, precision)?;
    policy.set_offload_optimizer(offload.then(OffloadConfig::default))?;
    let loss = crate::pipeline::sft(&mut policy, &examples, steps, batch, lr, &mut rng, log)?;
    policy.save_as(
        out,
        &SaveOptions {
            dtype: save_dtype,
            max_shard_bytes: 4 << 30,
            ..SaveOptions::default()
        },
    )?;
    Ok(loss)
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
        Some(l) => Some(Script::of_language(l).map_err(|e| Error::Other(e.to_string()))?),
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

/// Teacher writes (rejection-sampled) traces for `train`; the student (a
/// model folder, e.g. a smaller dense one) learns them by SFT; both are
/// evaluated on `test` (pass@1 over `k_eval` samples at temperature 0.6).
/// The student is saved in `save_dtype`.
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
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let traces_path = out.join("teacher_traces.jsonl");
    log("distill: the teacher samples its traces");
    let stats = run_rejection_sampling(teacher_dir, train, template, o, &traces_path)?;
    log(&format!(
        "distill: kept {} of {} traces ({} prompts covered)",
        stats.kept, stats.sampled, stats.prompts_covered
    ));
    if stats.kept == 0 {
        return Err(Error::Other(
            "the teacher's traces were all rejected: nothing to distil".into(),
        ));
    }
    let sdir = out.join("student");
    run_sft_logged(
        student_dir,
        &traces_path,
        &sdir,
        template,
        steps,
        32,
        lr,
        o.seed,
        device,
        save_dtype,
        log,
        None,
    )?;
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
    Ok(DistillReport {
        traces: stats.kept,
        teacher: score(teacher_dir)?,
        student: score(&sdir)?,
        student_dir: sdir,
    })
}
