//! The rewards of `aha grpo`'s TOML: one `[[rewards]]` table per reward,
//! with a `name` (its metrics are `rewards/{name}/mean|std`), a `kind`, a
//! `weight` and the kind's parameters. Unknown kinds and keys are errors
//! naming the reward and the key.
//!
//! ```toml
//! [[rewards]]
//! name = "accuracy"            # kind defaults to the name
//! weight = 1.0
//!
//! [[rewards]]
//! name = "tests"
//! kind = "code"
//! tests_field = "test_cases"
//! timeout_s = 5.0
//!
//! [[rewards]]
//! name = "judge"
//! kind = "command"
//! command = ["python3", "score.py"]
//! weight = 0.5
//!
//! [[rewards]]
//! name = "rm"
//! kind = "model"                # a scalar reward model (crate::reward_model)
//! model = "path/to/reward-model"
//! batch_size = 16
//! ```
//!
//! Every kind is built into an `aha_rewards` [`Reward`] and the list into a
//! [`WeightedSum`], which the trainer scores with the batch evaluator.

use std::sync::Arc;

use aha_rewards::code::{CodeReward, NetworkIsolation, ProgramLanguage, SandboxConfig};
use aha_rewards::countdown::CountdownReward;
use aha_rewards::external::{CommandConfig, CommandReward, HttpConfig, HttpReward};
use aha_rewards::format::{FormatConfig, FormatReward, FormatStyle, TagCountReward};
use aha_rewards::language::{LanguageReward, Script};
use aha_rewards::length::{CosineConfig, CosineLengthReward, OverlongConfig, SoftOverlongReward};
use aha_rewards::math::{Extraction, MathConfig, MathReward};
use aha_rewards::{Example, Item, Outcome, Reward, WeightedSum};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::reward_model::{ModelParams, ModelReward};

/// One reward of the weighted sum.
#[derive(Debug, Clone, PartialEq)]
pub struct RewardSpec {
    /// The name in metrics (`rewards/{name}/mean`); unique in a config.
    pub name: String,
    /// Weight in the sum (default 1.0, TRL's `reward_weights` default).
    pub weight: f64,
    /// What it computes, with its parameters.
    pub kind: RewardKind,
}

/// The kinds of reward and their parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum RewardKind {
    /// Math verification of the final answer against the row's `answer` /
    /// `gold`.
    Accuracy(AccuracyParams),
    /// The think/answer template (R1-Zero) or think + summary (R1).
    Format(FormatParams),
    /// open-r1's tag count: 0.25 per tag present exactly once.
    TagCount(NoParams),
    /// R1's language consistency: the share of the reasoning's words in the
    /// target language's script.
    Language(LanguageParams),
    /// The last fenced code block run against the row's test cases in the
    /// sandbox.
    Code(CodeParams),
    /// TinyZero's countdown: the row's `nums` and `target`.
    Countdown(NoParams),
    /// DAPO's soft overlong punishment (0 down to -1 with the length).
    SoftOverlong(SoftOverlongParams),
    /// Cosine length scaling by correctness (Yeo et al. 2025, open-r1).
    CosineLength(CosineLengthParams),
    /// A long-lived scorer process speaking JSON lines.
    Command(CommandParams),
    /// An HTTP endpoint with OpenRLHF's remote reward protocol.
    Http(HttpParams),
    /// A scalar reward model (`*ForSequenceClassification`, one label) on
    /// the CPU or a GPU, scoring prompt + completion in batches.
    Model(ModelParams),
}

/// The kinds, as the TOML spells them.
pub const KINDS: [&str; 11] = [
    "accuracy",
    "format",
    "tag_count",
    "language",
    "code",
    "countdown",
    "soft_overlong",
    "cosine_length",
    "command",
    "http",
    "model",
];

/// No parameters (`tag_count`, `countdown`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// Parameters of `accuracy`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccuracyParams {
    /// `boxed` (default; strict, as R1 trains: the last `\boxed{}` or
    /// `<answer>`, else no answer) or `any` (Math-Verify's lenient default,
    /// for evaluation).
    pub extraction: Extraction,
}

/// Parameters of `format`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FormatParams {
    /// `r1_zero` (default; R1-Zero's template, R1 report table 1:
    /// `<think>..</think><answer>..</answer>`) or `r1` (`<think>..</think>`
    /// then a summary).
    pub style: FormatStyle,
    /// The prompt already ends with `<think>` (R1's chat template since
    /// 2025-02; default false).
    pub think_opened_in_prompt: bool,
    /// Non-empty reasoning and answer, nothing between the blocks (default
    /// true); false checks the tags only (open-r1's soft format reward).
    pub strict: bool,
}

impl Default for FormatParams {
    fn default() -> Self {
        let c = FormatConfig::default();
        FormatParams {
            style: c.style,
            think_opened_in_prompt: c.think_opened_in_prompt,
            strict: c.strict,
        }
    }
}

/// Parameters of `language`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LanguageParams {
    /// Target language (`en`, `zh`, `ru`, ...); default: the config's
    /// top-level `language` (`en`). A row's own `language` field wins.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
}

/// Parameters of `code` (sandbox defaults from aha-rewards' `SandboxConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CodeParams {
    /// The row's field with the test cases (default `tests`): a list of
    /// `{"stdin", "stdout"}` or `{"code"}` (a Python assert), or that list
    /// as a JSON string.
    pub tests_field: String,
    /// Language when the row has no `program_language` field (default
    /// `python`; also `c`, `rust`).
    pub program_language: ProgramLanguage,
    /// Wall-clock limit per test, seconds (default 10).
    pub timeout_s: f64,
    /// Address-space limit, MiB (default 1024).
    pub memory_mib: u64,
    /// Process limit of the sandbox user (default 64).
    pub max_processes: u64,
    /// `required` (default: no network namespace, no run) or `best_effort`.
    pub network: NetworkIsolation,
}

impl Default for CodeParams {
    fn default() -> Self {
        let s = SandboxConfig::default();
        CodeParams {
            tests_field: "tests".into(),
            program_language: ProgramLanguage::Python,
            timeout_s: s.timeout_s,
            memory_mib: s.memory_mib,
            max_processes: s.max_processes,
            network: s.network,
        }
    }
}

/// Parameters of `soft_overlong` (DAPO, eq. 13).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SoftOverlongParams {
    /// L_max in tokens; default: the config's `max_completion_length` (DAPO
    /// sets it to its generation limit, 20480).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_len: Option<usize>,
    /// L_cache in tokens; default: a fifth of `max_len` (DAPO: 4096 of
    /// 20480).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_len: Option<usize>,
}

/// Parameters of `cosine_length` (defaults: open-r1's
/// `get_cosine_scaled_reward`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CosineLengthParams {
    /// Reward of a wrong answer of length 0 (default -1.0).
    pub min_value_wrong: f64,
    /// Reward of a wrong answer at `max_len` (default -0.5).
    pub max_value_wrong: f64,
    /// Reward of a right answer at `max_len` (default 0.5).
    pub min_value_correct: f64,
    /// Reward of a right answer of length 0 (default 1.0).
    pub max_value_correct: f64,
    /// Length in tokens where the cosine ends (default 1000).
    pub max_len: usize,
    /// How the answer is found for the correctness check (default `boxed`).
    pub extraction: Extraction,
}

impl Default for CosineLengthParams {
    fn default() -> Self {
        let c = CosineConfig::default();
        CosineLengthParams {
            min_value_wrong: c.min_value_wrong,
            max_value_wrong: c.max_value_wrong,
            min_value_correct: c.min_value_correct,
            max_value_correct: c.max_value_correct,
            max_len: c.max_len,
            extraction: Extraction::Boxed,
        }
    }
}

/// Parameters of `command` (aha-rewards' `CommandReward`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandParams {
    /// The program and its arguments (required): `["python3", "score.py"]`.
    pub command: Vec<String>,
    /// Time for a whole batch's replies, ms (default 30000).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

/// Parameters of `http` (aha-rewards' `HttpReward`, OpenRLHF's protocol).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpParams {
    /// `http://host:port/path` (required).
    pub url: String,
    /// Time per attempt, ms (default 30000).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Further attempts after connection errors, timeouts and 5xx (default 2).
    #[serde(default = "default_retries")]
    pub retries: u32,
}

fn default_timeout_ms() -> u64 {
    30_000
}

fn default_retries() -> u32 {
    2
}

impl RewardKind {
    /// The kind's name, as the TOML spells it.
    pub fn kind_name(&self) -> &'static str {
        match self {
            RewardKind::Accuracy(_) => "accuracy",
            RewardKind::Format(_) => "format",
            RewardKind::TagCount(_) => "tag_count",
            RewardKind::Language(_) => "language",
            RewardKind::Code(_) => "code",
            RewardKind::Countdown(_) => "countdown",
            RewardKind::SoftOverlong(_) => "soft_overlong",
            RewardKind::CosineLength(_) => "cosine_length",
            RewardKind::Command(_) => "command",
            RewardKind::Http(_) => "http",
            RewardKind::Model(_) => "model",
        }
    }

    /// Whether it needs the row's gold answer.
    pub fn needs_gold(&self) -> bool {
        matches!(self, RewardKind::Accuracy(_) | RewardKind::CosineLength(_))
    }

    /// The kind of `kind` with the parameters in `params` (a table without
    /// `name`, `kind`, `weight`); unknown kinds and keys are errors.
    pub fn parse(kind: &str, params: serde_json::Map<String, Value>) -> std::result::Result<RewardKind, String> {
        fn p<T: serde::de::DeserializeOwned>(m: serde_json::Map<String, Value>) -> std::result::Result<T, String> {
            serde_json::from_value(Value::Object(m)).map_err(|e| e.to_string())
        }
        Ok(match kind {
            "accuracy" => RewardKind::Accuracy(p(params)?),
            "format" => RewardKind::Format(p(params)?),
            "tag_count" => RewardKind::TagCount(p(params)?),
            "language" => RewardKind::Language(p(params)?),
            "code" => RewardKind::Code(p(params)?),
            "countdown" => RewardKind::Countdown(p(params)?),
            "soft_overlong" => RewardKind::SoftOverlong(p(params)?),
            "cosine_length" => RewardKind::CosineLength(p(params)?),
            "command" => RewardKind::Command(p(params)?),
            "http" => RewardKind::Http(p(params)?),
            "model" => RewardKind::Model(p(params)?),
            other => return Err(format!("unknown kind {other:?} (one of {})", KINDS.join(", "))),
        })
    }

    fn params_json(&self) -> serde_json::Result<Value> {
        match self {
            RewardKind::Accuracy(x) => serde_json::to_value(x),
            RewardKind::Format(x) => serde_json::to_value(x),
            RewardKind::TagCount(x) | RewardKind::Countdown(x) => serde_json::to_value(x),
            RewardKind::Language(x) => serde_json::to_value(x),
            RewardKind::Code(x) => serde_json::to_value(x),
            RewardKind::SoftOverlong(x) => serde_json::to_value(x),
            RewardKind::CosineLength(x) => serde_json::to_value(x),
            RewardKind::Command(x) => serde_json::to_value(x),
            RewardKind::Http(x) => serde_json::to_value(x),
            RewardKind::Model(x) => serde_json::to_value(x),
        }
    }
}

impl RewardSpec {
    /// A reward with the kind's default parameters (`kind` names one of
    /// [`KINDS`]).
    pub fn new(name: &str, kind: &str, weight: f64) -> Result<RewardSpec> {
        let kind = RewardKind::parse(kind, serde_json::Map::new()).map_err(|e| Error::Reward {
            name: name.to_string(),
            msg: e.to_string(),
        })?;
        Ok(RewardSpec {
            name: name.into(),
            weight,
            kind,
        })
    }

    /// A reward from one `[[rewards]]` table: `name` (required), `kind`
    /// (default: the name), `weight` (default 1.0) and the kind's
    /// parameters.
    pub fn from_table(mut m: serde_json::Map<String, Value>) -> std::result::Result<RewardSpec, String> {
        let name = match m.remove("name") {
            Some(Value::String(s)) if !s.is_empty() => s,
            Some(other) => return Err(format!("reward `name` must be a non-empty string, got {other}")),
            None => return Err("a reward without `name`".into()),
        };
        let weight = match m.remove("weight") {
            None => 1.0,
            Some(v) => v
                .as_f64()
                .filter(|w| w.is_finite())
                .ok_or_else(|| format!("reward {name:?}: `weight` must be a finite number, got {v}"))?,
        };
        let kind = match m.remove("kind") {
            None => name.clone(),
            Some(Value::String(s)) => s,
            Some(other) => return Err(format!("reward {name:?}: `kind` must be a string, got {other}")),
        };
        let kind = RewardKind::parse(&kind, m).map_err(|e| format!("reward {name:?}: {e}"))?;
        Ok(RewardSpec { name, weight, kind })
    }
}

impl<'de> Deserialize<'de> for RewardSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let m = serde_json::Map::<String, Value>::deserialize(d)?;
        RewardSpec::from_table(m).map_err(serde::de::Error::custom)
    }
}

impl Serialize for RewardSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::{Error as _, SerializeMap};
        let params = self.kind.params_json().map_err(S::Error::custom)?;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("name", &self.name)?;
        m.serialize_entry("kind", self.kind.kind_name())?;
        m.serialize_entry("weight", &self.weight)?;
        if let Value::Object(params) = params {
            for (k, v) in params.iter().filter(|(_, v)| !v.is_null()) {
                m.serialize_entry(k, v)?;
            }
        }
        m.end()
    }
}

/// What building the rewards needs from the rest of the config.
#[derive(Debug, Clone)]
pub struct BuildContext {
    /// The completion length limit (default `max_len` of `soft_overlong`).
    pub max_completion_length: usize,
    /// The default target language of `language` rewards.
    pub language: String,
}

/// How a reward's rows are adjusted before scoring.
#[derive(Debug, Clone)]
enum Prep {
    None,
    /// Test cases from `tests_field` into `tests` (parsed when a JSON
    /// string), and a default `program_language`.
    Code {
        tests_field: String,
        program_language: ProgramLanguage,
    },
}

/// A reward under its configured name, with its rows prepared.
struct Named {
    name: String,
    inner: Arc<dyn Reward>,
    prep: Prep,
}

impl Named {
    fn prepare<'a>(&self, example: &'a Example) -> std::borrow::Cow<'a, Example> {
        match &self.prep {
            Prep::None => std::borrow::Cow::Borrowed(example),
            Prep::Code {
                tests_field,
                program_language,
            } => {
                let mut e = example.clone();
                let tests = match example.get(tests_field.as_str()) {
                    Some(Value::String(s)) => serde_json::from_str(s).unwrap_or(Value::String(s.clone())),
                    Some(v) => v.clone(),
                    None => Value::Null,
                };
                if tests.is_null() {
                    e.remove("tests");
                } else {
                    e.insert("tests".into(), tests);
                }
                if !matches!(e.get("program_language"), Some(Value::String(_))) {
                    let lang = serde_json::to_value(program_language).unwrap_or(Value::Null);
                    e.insert("program_language".into(), lang);
                }
                std::borrow::Cow::Owned(e)
            }
        }
    }
}

impl Reward for Named {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, example: &Example, completion: &str) -> Outcome {
        self.inner.score(&self.prepare(example), completion)
    }

    fn score_many(&self, items: &[Item]) -> Option<Vec<Outcome>> {
        match self.prep {
            Prep::None => self.inner.score_many(items),
            Prep::Code { .. } => {
                let items: Vec<Item> = items
                    .iter()
                    .map(|i| Item {
                        example: self.prepare(&i.example).into_owned(),
                        completion: i.completion.clone(),
                    })
                    .collect();
                self.inner.score_many(&items)
            }
        }
    }
}

/// Checks the specs (unique names, parameters in range) and builds the
/// weighted sum; each reward is named in metrics by its spec's `name`.
pub fn build(specs: &[RewardSpec], ctx: &BuildContext) -> Result<WeightedSum> {
    if specs.is_empty() {
        return Err(Error::Config {
            what: "rewards".into(),
            msg: "no rewards".into(),
        });
    }
    let mut sum = WeightedSum::new();
    for (i, s) in specs.iter().enumerate() {
        if specs[..i].iter().any(|o| o.name == s.name) {
            return Err(Error::Reward {
                name: s.name.clone(),
                msg: "two rewards have this name".into(),
            });
        }
        let ctx_err = |e: aha_rewards::Error| Error::Reward {
            name: s.name.clone(),
            msg: e.to_string(),
        };
        let mut prep = Prep::None;
        let inner: Arc<dyn Reward> = match &s.kind {
            RewardKind::Accuracy(p) => Arc::new(
                MathReward::new(MathConfig {
                    extraction: p.extraction,
                    ..MathConfig::default()
                })
                .map_err(ctx_err)?,
            ),
            RewardKind::Format(p) => Arc::new(FormatReward {
                config: FormatConfig {
                    style: p.style,
                    think_opened_in_prompt: p.think_opened_in_prompt,
                    strict: p.strict,
                },
            }),
            RewardKind::TagCount(_) => Arc::new(TagCountReward),
            RewardKind::Language(p) => {
                let code = p.language.as_deref().unwrap_or(&ctx.language);
                Arc::new(LanguageReward {
                    default_target: Script::of_language(code).map_err(ctx_err)?,
                    ..LanguageReward::default()
                })
            }
            RewardKind::Code(p) => {
                let config = SandboxConfig {
                    timeout_s: p.timeout_s,
                    memory_mib: p.memory_mib,
                    max_processes: p.max_processes,
                    network: p.network,
                    ..SandboxConfig::default()
                };
                config.validate().map_err(ctx_err)?;
                if p.tests_field.is_empty() {
                    return Err(Error::Reward {
                        name: s.name.clone(),
                        msg: "empty tests_field".into(),
                    });
                }
                prep = Prep::Code {
                    tests_field: p.tests_field.clone(),
                    program_language: p.program_language,
                };
                Arc::new(CodeReward { config })
            }
            RewardKind::Countdown(_) => Arc::new(CountdownReward),
            RewardKind::SoftOverlong(p) => {
                let max_len = p.max_len.unwrap_or(ctx.max_completion_length);
                let config = OverlongConfig {
                    max_len,
                    cache_len: p.cache_len.unwrap_or(max_len / 5).max(1),
                };
                config.validate().map_err(ctx_err)?;
                Arc::new(SoftOverlongReward { config })
            }
            RewardKind::CosineLength(p) => {
                let config = CosineConfig {
                    min_value_wrong: p.min_value_wrong,
                    max_value_wrong: p.max_value_wrong,
                    min_value_correct: p.min_value_correct,
                    max_value_correct: p.max_value_correct,
                    max_len: p.max_len,
                };
                config.validate().map_err(ctx_err)?;
                Arc::new(CosineLengthReward {
                    config,
                    math: MathConfig {
                        extraction: p.extraction,
                        ..MathConfig::default()
                    },
                })
            }
            RewardKind::Command(p) => Arc::new(
                CommandReward::new(CommandConfig {
                    name: s.name.clone(),
                    command: p.command.clone(),
                    timeout_ms: p.timeout_ms,
                })
                .map_err(ctx_err)?,
            ),
            RewardKind::Http(p) => Arc::new(
                HttpReward::new(HttpConfig {
                    name: s.name.clone(),
                    url: p.url.clone(),
                    timeout_ms: p.timeout_ms,
                    retries: p.retries,
                })
                .map_err(ctx_err)?,
            ),
            RewardKind::Model(p) => Arc::new(ModelReward::load(&s.name, p).map_err(|e| Error::Reward {
                name: s.name.clone(),
                msg: e.to_string(),
            })?),
        };
        let named = Named {
            name: s.name.clone(),
            inner,
            prep,
        };
        sum = sum.add(named, s.weight);
    }
    Ok(sum)
}
