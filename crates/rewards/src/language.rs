//! Language consistency (DeepSeek-R1, section 2.3.2): the share of words in
//! the chain of thought that are in the target language.
//!
//! Words are classified by script. Segmentation: a word is a maximal run of
//! letters of one alphabetic script (Latin, Cyrillic, Greek, Arabic,
//! Devanagari, ...; combining marks join the run they follow); in CJK text,
//! which has no spaces, every Han character, kana and Hangul syllable is
//! one word. Math (`$...$`, `\(...\)`, `\[...\]`) and LaTeX commands
//! (`\frac`) are removed first, and digits and punctuation are not words.

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::outcome::{Example, Outcome, Reward, Status};

/// A writing system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Script {
    /// Latin alphabet (English, French, Vietnamese, ...).
    Latin,
    /// Chinese characters, Japanese kana, Korean Hangul.
    Cjk,
    /// Cyrillic (Russian, Ukrainian, ...).
    Cyrillic,
    /// Arabic script (Arabic, Persian, Urdu).
    Arabic,
    /// Devanagari (Hindi, Marathi, Nepali).
    Devanagari,
    /// Greek.
    Greek,
    /// Hebrew.
    Hebrew,
    /// Thai.
    Thai,
    /// Any other letter.
    Other,
}

impl Script {
    /// The script of a language code (`en`, `zh`, `ru`, `ar`, `hi`, ...) or a
    /// script name (`latin`, `cjk`, ...).
    pub fn of_language(code: &str) -> Result<Script> {
        let c = code.to_ascii_lowercase();
        let base = c.split(['-', '_']).next().unwrap_or("");
        Ok(match base {
            "en" | "fr" | "de" | "es" | "it" | "pt" | "nl" | "sv" | "da" | "no" | "nb" | "fi" | "pl" | "cs" | "sk"
            | "ro" | "hu" | "tr" | "vi" | "id" | "ms" | "ca" | "hr" | "sl" | "et" | "lv" | "lt" | "sw" | "latin" => {
                Script::Latin
            }
            "zh" | "ja" | "ko" | "cjk" | "han" => Script::Cjk,
            "ru" | "uk" | "bg" | "sr" | "be" | "mk" | "kk" | "mn" | "cyrillic" => Script::Cyrillic,
            "ar" | "fa" | "ur" | "ps" | "arabic" => Script::Arabic,
            "hi" | "mr" | "ne" | "sa" | "devanagari" => Script::Devanagari,
            "el" | "greek" => Script::Greek,
            "he" | "iw" | "yi" | "hebrew" => Script::Hebrew,
            "th" | "thai" => Script::Thai,
            _ => return Err(Error::field("language", format!("unknown language {code:?}"))),
        })
    }
}

/// The script of one character, `None` for non-letters. The second value
/// is true for scripts segmented per character (CJK).
fn script_of(c: char) -> Option<(Script, bool)> {
    let u = c as u32;
    let s = match u {
        0x4E00..=0x9FFF
        | 0x3400..=0x4DBF
        | 0x20000..=0x2A6DF
        | 0xF900..=0xFAFF
        | 0x3040..=0x30FF
        | 0xAC00..=0xD7AF
        | 0x1100..=0x11FF
        | 0x3130..=0x318F
        | 0x31F0..=0x31FF => return Some((Script::Cjk, true)),
        0x0400..=0x052F | 0x2DE0..=0x2DFF | 0xA640..=0xA69F => Script::Cyrillic,
        0x0600..=0x06FF | 0x0750..=0x077F | 0x08A0..=0x08FF | 0xFB50..=0xFDFF | 0xFE70..=0xFEFF => Script::Arabic,
        0x0900..=0x097F | 0xA8E0..=0xA8FF => Script::Devanagari,
        0x0370..=0x03FF | 0x1F00..=0x1FFF => Script::Greek,
        0x0590..=0x05FF => Script::Hebrew,
        0x0E00..=0x0E7F => Script::Thai,
        _ if c.is_ascii_alphabetic() => Script::Latin,
        0x00C0..=0x024F | 0x1E00..=0x1EFF => Script::Latin,
        _ if c.is_alphabetic() => Script::Other,
        _ => return None,
    };
    Some((s, false))
}

fn is_mark(c: char) -> bool {
    let u = c as u32;
    (0x0300..=0x036F).contains(&u)
        || (0x0900..=0x0903).contains(&u)
        || (0x093A..=0x094F).contains(&u)
        || (0x0962..=0x0963).contains(&u)
        || (0x064B..=0x065F).contains(&u)
        || (0x0E31..=0x0E3A).contains(&u)
        || (0x0E47..=0x0E4E).contains(&u)
}

/// Remove math spans and LaTeX commands.
fn strip_math(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    loop {
        let next = ["$$", "$", "\\(", "\\["]
            .iter()
            .filter_map(|o| rest.find(o).map(|i| (i, *o)))
            .min_by_key(|x| (x.0, std::cmp::Reverse(x.1.len())));
        let Some((i, open)) = next else {
            out.push_str(rest);
            break;
        };
        let close = match open {
            "\\(" => "\\)",
            "\\[" => "\\]",
            o => o,
        };
        out.push_str(&rest[..i]);
        let body = &rest[i + open.len()..];
        match body.find(close) {
            Some(j) => {
                out.push(' ');
                rest = &body[j + close.len()..];
            }
            None => {
                out.push_str(body);
                break;
            }
        }
    }
    // `\command` names are not words.
    let mut cleaned = String::with_capacity(out.len());
    let mut chars = out.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            while chars.peek().is_some_and(|c| c.is_ascii_alphabetic()) {
                chars.next();
            }
            cleaned.push(' ');
        } else {
            cleaned.push(c);
        }
    }
    cleaned
}

/// The scripts of the words of `text`, in order (see the module doc for the
/// segmentation).
pub fn word_scripts(text: &str) -> Vec<Script> {
    let text = strip_math(text);
    let mut out = Vec::new();
    let mut current: Option<Script> = None;
    for c in text.chars() {
        if current.is_some() && is_mark(c) {
            continue;
        }
        match script_of(c) {
            Some((s, true)) => {
                current = None;
                out.push(s);
            }
            Some((s, false)) => {
                if current != Some(s) {
                    out.push(s);
                    current = Some(s);
                }
            }
            None => {
                // Apostrophes and hyphens inside a word keep it one word.
                if !(current.is_some() && matches!(c, '\'' | '’' | '-')) {
                    current = None;
                }
            }
        }
    }
    out
}

/// The chain of thought: the text inside `<think>...</think>`, or before
/// `</think>` when the prompt opened the tag, else the whole completion.
pub fn chain_of_thought(completion: &str) -> &str {
    match (completion.find("<think>"), completion.find("</think>")) {
        (Some(a), Some(b)) if a < b => &completion[a + "<think>".len()..b],
        (None, Some(b)) => &completion[..b],
        (Some(a), None) => &completion[a + "<think>".len()..],
        _ => completion,
    }
}

/// Share of the words of `text` written in `target`; `None` when there are no words.
pub fn consistency(text: &str, target: Script) -> Option<f64> {
    let words = word_scripts(text);
    if words.is_empty() {
        return None;
    }
    Some(words.iter().filter(|s| **s == target).count() as f64 / words.len() as f64)
}

/// The language-consistency reward: the share of target-language words in
/// the chain of thought. The example's `language` field (`en`, `zh`, ...)
/// overrides the configured target.
#[derive(Debug, Clone)]
pub struct LanguageReward {
    /// The target language's script when the example has no `language` field.
    pub default_target: Script,
    /// Share at or above which the status is `Correct` (default 0.95).
    pub correct_threshold: f64,
}

impl Default for LanguageReward {
    fn default() -> Self {
        LanguageReward {
            default_target: Script::Latin,
            correct_threshold: 0.95,
        }
    }
}

impl Reward for LanguageReward {
    fn name(&self) -> &str {
        "language"
    }

    fn score(&self, example: &Example, completion: &str) -> Outcome {
        let target = match example.get("language") {
            Some(serde_json::Value::String(code)) => match Script::of_language(code) {
                Ok(s) => s,
                Err(e) => return Outcome::zero(Status::InfraError).with_detail(e.to_string()),
            },
            Some(_) => return Outcome::zero(Status::InfraError).with_detail("language must be a string"),
            None => self.default_target,
        };
        match consistency(chain_of_thought(completion), target) {
            None => Outcome::zero(Status::NoAnswer).with_detail("no words in the chain of thought"),
            Some(share) => {
                let status = if share >= self.correct_threshold {
                    Status::Correct
                } else {
                    Status::Wrong
                };
                Outcome::new(share, status).with_detail(format!("{:.3} of words in {target:?}", share))
            }
        }
    }
}
