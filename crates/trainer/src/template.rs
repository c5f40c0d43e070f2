//! Prompt rendering for training and sampling commands: plain text,
//! R1-Zero's template, or the model folder's chat template.

use std::path::Path;

use aha_sampler::chat::{self, ChatTemplate};
use aha_sampler::Tokenizer;

use crate::error::{Error, Result};
use crate::toy::encode;

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
            return Err(Error::Config {
                what: "template".into(),
                msg: format!("unknown template {kind:?}: none, r1-zero or chat"),
            });
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
            return Err(Error::Config {
                what: "chat_template_kwargs".into(),
                msg: format!("need template = \"chat\" (template is {:?})", self.kind),
            });
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
            None => Err(Error::Config {
                what: "template".into(),
                msg: "`messages` lines need --template chat".into(),
            }),
        }
    }
}
