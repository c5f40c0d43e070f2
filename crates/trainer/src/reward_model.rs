//! `kind = "model"`: a scalar reward model (an HF
//! `*ForSequenceClassification` folder with one label, see
//! [`aha_moe_model::RewardModel`]) as an `aha_rewards` [`Reward`], the
//! reward of R1's all-scenario RL stage.
//!
//! Each completion is rendered with its row's `prompt` the way TRL's
//! `GRPOTrainer` feeds a reward model, tokenized with the reward model's
//! own `tokenizer.json` without added special tokens, and scored in
//! batches of `batch_size` through one forward each ([`Reward::score_many`]:
//! the trainer's batch path, never one completion at a time):
//!
//! - `template = "auto"` (default): `chat` when the reward model's folder
//!   has a chat template (`chat_template.jinja`, or `chat_template` in
//!   `tokenizer_config.json`), else `plain`;
//! - `chat`: the template over `[{user: prompt}, {assistant: completion}]`
//!   without a generation prompt (TRL's conversational case: reward models
//!   are trained on whole conversations in their own template, which need
//!   not be the policy's);
//! - `plain`: `prompt + completion`, the two strings joined as they are
//!   (TRL's standard case).
//!
//! The score is the model's raw output (status `correct` above 0, `wrong`
//! otherwise, as the scorer process and the HTTP endpoint report). A
//! completion that cannot be tokenized or is longer than the model's
//! `max_position_embeddings` is an `infra_error` (NaN, out of its group's
//! baseline), and so is every completion of a batch whose forward failed.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use aha_moe_model::{resolve_device, Precision, RewardModel};
use aha_rewards::{Example, Item, Outcome, Reward, Status};
use aha_sampler::chat::{self, ChatTemplate};
use aha_sampler::load_tokenizer;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::error::{Error, Result};

/// How prompt and completion become the reward model's input text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RmTemplate {
    /// `chat` when the reward model's folder has a chat template, else
    /// `plain`.
    #[default]
    Auto,
    /// The reward model's chat template over a user and an assistant turn.
    Chat,
    /// `prompt + completion`.
    Plain,
}

impl FromStr for RmTemplate {
    type Err = Error;
    fn from_str(s: &str) -> Result<RmTemplate> {
        match s {
            "auto" => Ok(RmTemplate::Auto),
            "chat" => Ok(RmTemplate::Chat),
            "plain" => Ok(RmTemplate::Plain),
            other => Err(Error::Config {
                what: "reward model template".into(),
                msg: format!("{other:?}: auto, chat or plain"),
            }),
        }
    }
}

/// Parameters of `kind = "model"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelParams {
    /// The reward model's HF folder (required): `config.json` naming a
    /// `*ForSequenceClassification` architecture with one label,
    /// safetensors with `score.weight`, `tokenizer.json`.
    pub model: PathBuf,
    /// `cpu`, `cuda`, `cuda:N` or `auto` (default: the GPU when one is
    /// present and takes the model).
    #[serde(default = "default_device")]
    pub device: String,
    /// `f32` (default) or `bf16` (a GPU only).
    #[serde(default = "default_precision")]
    pub precision: String,
    /// Completions per forward (default 8).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// How prompt and completion are rendered (default `auto`).
    #[serde(default)]
    pub template: RmTemplate,
}

fn default_device() -> String {
    "auto".into()
}

fn default_precision() -> String {
    "f32".into()
}

fn default_batch_size() -> usize {
    8
}

impl ModelParams {
    /// The parameters' defaults for the folder `model`.
    pub fn new(model: &Path) -> ModelParams {
        ModelParams {
            model: model.to_path_buf(),
            device: default_device(),
            precision: default_precision(),
            batch_size: default_batch_size(),
            template: RmTemplate::Auto,
        }
    }
}

/// Whether a model folder has a chat template of its own.
pub fn has_chat_template(dir: &Path) -> bool {
    if dir.join("chat_template.jinja").is_file() {
        return true;
    }
    std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v.get("chat_template").is_some_and(|t| !t.is_null()))
}

/// A reward model with its tokenizer and rendering (see the module docs).
pub struct ModelReward {
    name: String,
    rm: RewardModel,
    tok: Tokenizer,
    chat: Option<ChatTemplate>,
    batch_size: usize,
}

impl std::fmt::Debug for ModelReward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ModelReward({:?}, {:?}, {}, batch {})",
            self.name,
            self.rm,
            if self.chat.is_some() { "chat" } else { "plain" },
            self.batch_size
        )
    }
}

impl ModelReward {
    /// Loads the reward model named `name` in metrics: its folder's
    /// config, weights (on the resolved device), tokenizer and, for
    /// `chat`, chat template.
    pub fn load(name: &str, p: &ModelParams) -> Result<ModelReward> {
        if p.batch_size == 0 {
            return Err(Error::Reward {
                name: name.into(),
                msg: "batch_size must be >= 1".into(),
            });
        }
        let precision: Precision = p.precision.parse()?;
        let (cfg, _) = aha_moe_model::reward_model::read_config(&p.model)?;
        let device = resolve_device(&p.device, &cfg)?;
        let chat = match p.template {
            RmTemplate::Plain => None,
            RmTemplate::Auto if !has_chat_template(&p.model) => None,
            RmTemplate::Auto | RmTemplate::Chat => Some(ChatTemplate::load(&p.model)?),
        };
        let tok = load_tokenizer(&p.model)?;
        let rm = RewardModel::load(&p.model, device, precision)?;
        Ok(ModelReward {
            name: name.into(),
            rm,
            tok,
            chat,
            batch_size: p.batch_size,
        })
    }

    /// The reward model.
    pub fn model(&self) -> &RewardModel {
        &self.rm
    }

    /// Whether completions are rendered with the chat template.
    pub fn uses_chat_template(&self) -> bool {
        self.chat.is_some()
    }

    /// The text scored for `completion` after the row's `prompt` (absent:
    /// the completion alone, or the assistant turn alone in a chat).
    pub fn render(&self, example: &Example, completion: &str) -> Result<String> {
        let prompt = example.get("prompt").and_then(|p| p.as_str());
        Ok(match &self.chat {
            None => format!("{}{completion}", prompt.unwrap_or("")),
            Some(t) => {
                let turn = |role: &str, content: &str| {
                    chat::Value::from_pairs([
                        ("role", chat::Value::from(role)),
                        ("content", chat::Value::from(content)),
                    ])
                };
                let mut messages = Vec::with_capacity(2);
                if let Some(p) = prompt {
                    messages.push(turn("user", p));
                }
                messages.push(turn("assistant", completion));
                t.render(&chat::Value::from(messages), false, &[])?
            }
        })
    }

    /// The token ids scored for an item, or why it cannot be scored.
    fn encode(&self, item: &Item) -> std::result::Result<Vec<u32>, String> {
        let text = self
            .render(&item.example, &item.completion)
            .map_err(|e| e.to_string())?;
        let ids = self
            .tok
            .encode(text.as_str(), false)
            .map_err(|e| format!("tokenizing for the reward model: {e}"))?
            .get_ids()
            .to_vec();
        if ids.is_empty() {
            return Err("nothing to score: the rendered text has no tokens".into());
        }
        if ids.len() > self.rm.max_len() {
            return Err(format!(
                "{} tokens exceed the reward model's max_position_embeddings {}",
                ids.len(),
                self.rm.max_len()
            ));
        }
        Ok(ids)
    }

    /// One outcome per item: the scorable ones go through the model in
    /// batches of `batch_size`.
    pub fn outcomes(&self, items: &[Item]) -> Vec<Outcome> {
        let infra = |why: &str| Outcome::zero(Status::InfraError).with_detail(why);
        let mut out: Vec<Outcome> = Vec::with_capacity(items.len());
        let (mut seqs, mut at) = (Vec::new(), Vec::new());
        for (i, item) in items.iter().enumerate() {
            match self.encode(item) {
                Ok(ids) => {
                    seqs.push(ids);
                    at.push(i);
                    out.push(infra("not scored"));
                }
                Err(why) => out.push(infra(&why)),
            }
        }
        match self.rm.score(&seqs, self.batch_size) {
            Ok(scores) => {
                for (&i, s) in at.iter().zip(scores) {
                    let s = s as f64;
                    out[i] = if s.is_finite() {
                        Outcome::new(s, if s > 0.0 { Status::Correct } else { Status::Wrong })
                    } else {
                        infra("the reward model's score is not finite")
                    };
                }
            }
            Err(e) => {
                let why = format!("reward model: {e}");
                for &i in &at {
                    out[i] = infra(&why);
                }
            }
        }
        out
    }
}

impl Reward for ModelReward {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, example: &Example, completion: &str) -> Outcome {
        let item = Item {
            example: example.clone(),
            completion: completion.to_string(),
        };
        self.outcomes(std::slice::from_ref(&item))
            .pop()
            .unwrap_or_else(|| Outcome::zero(Status::InfraError))
    }

    fn score_many(&self, items: &[Item]) -> Option<Vec<Outcome>> {
        Some(self.outcomes(items))
    }
}
