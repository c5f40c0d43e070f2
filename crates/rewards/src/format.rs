//! Format rewards: R1-Zero's `<think>...</think> <answer>...</answer>`, R1's
//! `<think>...</think>` followed by a summary, and the tag-count shaping
//! reward (0.25 per tag present exactly once, as in open-r1).

use serde::{Deserialize, Serialize};

use crate::outcome::{Example, Outcome, Reward, Status};

/// Which template the completion must follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FormatStyle {
    /// R1-Zero: `<think>reasoning</think>` then `<answer>answer</answer>`,
    /// nothing else around them but whitespace.
    #[default]
    R1Zero,
    /// R1: `<think>reasoning</think>` then a non-empty summary (no `<answer>` tag).
    R1,
}

/// Settings of the format reward.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FormatConfig {
    /// The template.
    pub style: FormatStyle,
    /// The prompt already ends with `<think>` (as in R1's chat template since
    /// 2025-02), so the completion starts inside the reasoning and must not
    /// open it again.
    pub think_opened_in_prompt: bool,
    /// Strict (default): the reasoning and the answer must be non-empty and
    /// nothing may stand between `</think>` and `<answer>`. Lenient: only the
    /// tags are checked (each once, in order, text only inside or between
    /// them), as open-r1's soft format reward does.
    pub strict: bool,
}

impl Default for FormatConfig {
    fn default() -> Self {
        FormatConfig {
            style: FormatStyle::default(),
            think_opened_in_prompt: false,
            strict: true,
        }
    }
}

const TAGS: [&str; 4] = ["<think>", "</think>", "<answer>", "</answer>"];

fn count(s: &str, pat: &str) -> usize {
    s.matches(pat).count()
}

/// Check a completion against the template; `Err` says why it fails.
pub fn check_format(completion: &str, config: &FormatConfig) -> std::result::Result<(), String> {
    let text = if config.think_opened_in_prompt {
        format!("<think>{completion}")
    } else {
        completion.to_string()
    };
    let t = text.trim();
    let want_answer = config.style == FormatStyle::R1Zero;
    for tag in TAGS {
        let n = count(t, tag);
        let expected = if tag.contains("answer") && !want_answer { 0 } else { 1 };
        if n != expected {
            return Err(format!("{tag} appears {n} times, expected {expected}"));
        }
    }
    if !t.starts_with("<think>") {
        return Err("text before <think>".into());
    }
    let Some(think_end) = t.find("</think>") else {
        return Err("no </think>".into());
    };
    let reasoning = &t["<think>".len()..think_end];
    if config.strict && reasoning.trim().is_empty() {
        return Err("empty reasoning".into());
    }
    let after = &t[think_end + "</think>".len()..];
    if !want_answer {
        return if after.trim().is_empty() {
            Err("no summary after </think>".into())
        } else {
            Ok(())
        };
    }
    let (Some(a_open), Some(a_close)) = (after.find("<answer>"), after.find("</answer>")) else {
        return Err("<answer> is not after </think>".into());
    };
    if a_close < a_open {
        return Err("</answer> before <answer>".into());
    }
    if config.strict && !after[..a_open].trim().is_empty() {
        return Err("text between </think> and <answer>".into());
    }
    if config.strict && after[a_open + "<answer>".len()..a_close].trim().is_empty() {
        return Err("empty answer".into());
    }
    if !after[a_close + "</answer>".len()..].trim().is_empty() {
        return Err("text after </answer>".into());
    }
    Ok(())
}

/// The format reward: 1 when the completion follows the template, else 0.
#[derive(Debug, Clone, Default)]
pub struct FormatReward {
    /// Its settings.
    pub config: FormatConfig,
}

impl Reward for FormatReward {
    fn name(&self) -> &str {
        "format"
    }

    fn score(&self, _example: &Example, completion: &str) -> Outcome {
        match check_format(completion, &self.config) {
            Ok(()) => Outcome::correct(),
            Err(why) => Outcome::zero(Status::Wrong).with_detail(why),
        }
    }
}

/// open-r1's tag-count reward: 0.25 for each of `<think>`, `</think>`,
/// `<answer>`, `</answer>` that appears exactly once. A dense signal that
/// helps a model find the format early in R1-Zero training.
pub fn tag_count(completion: &str) -> f64 {
    TAGS.iter().filter(|t| count(completion, t) == 1).count() as f64 * 0.25
}

/// The tag-count reward as a [`Reward`]; the status is `Correct` at 1.0.
#[derive(Debug, Clone, Copy, Default)]
pub struct TagCountReward;

impl Reward for TagCountReward {
    fn name(&self) -> &str {
        "tag_count"
    }

    fn score(&self, _example: &Example, completion: &str) -> Outcome {
        let s = tag_count(completion);
        let status = if s >= 1.0 { Status::Correct } else { Status::Wrong };
        Outcome::new(s, status)
    }
}
