//! Math answer verification: extract the final answer, normalise its LaTeX,
//! decide equivalence with the reference.
//!
//! - Extraction: [`Extraction::Boxed`] (training; strict) takes the last
//!   `\boxed{}` / `\fbox{}` (brace-matched, with adjacent boxes joined into a
//!   set: `\boxed{1} and \boxed{2}`) or the `<answer>` tag (read leniently
//!   inside); without one there
//!   is no answer, and numbers elsewhere in the text never score.
//!   [`Extraction::Any`] (evaluation; lenient, like Math-Verify's default)
//!   falls back to "the final answer is ...", then to whichever comes last of
//!   the last math environment (`$..$`, `\(..\)`, `\[..\]`) and the last
//!   number in free text.
//! - Equivalence: exact big-rational arithmetic for numbers, fractions,
//!   powers, factorials and perfect roots; decimals against fractions or
//!   radicals by correct rounding ([`DECIMAL_MIN_REL_PRECISION`]); symbolic
//!   expressions by evaluation at sample points ([`NUMERIC_REL_TOL`]);
//!   sets, tuples, intervals, unions, matrices, equations (up to a non-zero
//!   factor) and inequalities (up to a positive factor) structurally.

mod ast;
mod equiv;
mod eval;
mod extract;
mod lex;
mod parse;

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use ast::{Node, RelOp};
pub use equiv::{DECIMAL_MIN_REL_PRECISION, NUMERIC_REL_TOL};

use crate::error::{Error, Result};
use crate::outcome::{Example, Outcome, Reward, Status};

/// Where the answer is looked for in a completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Extraction {
    /// Training (strict): the last `\boxed{}` / `\fbox{}` or `<answer>` tag;
    /// no box means no answer.
    #[default]
    Boxed,
    /// Evaluation (lenient, like Math-Verify's default): boxes, then "the final
    /// answer is", then the last math environment or number.
    Any,
}

impl std::str::FromStr for Extraction {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "boxed" | "strict" => Ok(Extraction::Boxed),
            "any" | "lenient" => Ok(Extraction::Any),
            other => Err(Error::Config(format!(
                "math extraction must be boxed or any, got {other:?}"
            ))),
        }
    }
}

/// Settings of the math verifier.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MathConfig {
    /// How the completion's answer is found (default: strict, as in R1 training).
    pub extraction: Extraction,
    /// Only the last this-many bytes of a completion are searched (default
    /// 65536: answers are at the end; bounds the work on huge outputs).
    pub max_completion_bytes: usize,
    /// An extracted answer longer than this (in characters) is not parsed
    /// (default 1000).
    pub max_answer_chars: usize,
    /// Time budget per verification in milliseconds (default 1000); past it
    /// the status is `Timeout`.
    pub time_budget_ms: u64,
}

impl Default for MathConfig {
    fn default() -> Self {
        MathConfig {
            extraction: Extraction::Boxed,
            max_completion_bytes: 65_536,
            max_answer_chars: 1000,
            time_budget_ms: 1000,
        }
    }
}

impl MathConfig {
    /// Check the values.
    pub fn validate(&self) -> Result<()> {
        if self.max_completion_bytes == 0 || self.max_answer_chars == 0 || self.time_budget_ms == 0 {
            return Err(Error::Config("math limits must be positive".into()));
        }
        Ok(())
    }
}

const MAX_TOKENS: usize = 2000;

/// Parse one answer (without `$` delimiters) into a tree, as the verifier
/// sees it. `None` when it does not parse.
pub fn parse_answer(answer: &str) -> Option<Node> {
    let norm = lex::normalise(answer);
    let toks = lex::tokenize(&norm, MAX_TOKENS)?;
    parse::Parser::new(toks).parse_all().ok()
}

fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut st = s.len() - max;
    while !s.is_char_boundary(st) {
        st += 1;
    }
    &s[st..]
}

/// An extracted answer: one string, or several that belong together.
#[derive(Debug, Clone, PartialEq)]
pub struct Extracted {
    /// The answer strings (more than one for `\boxed{1} and \boxed{2}`).
    pub parts: Vec<String>,
}

impl Extracted {
    fn one(s: impl Into<String>) -> Self {
        Extracted { parts: vec![s.into()] }
    }

    /// The parts joined with `, ` (what the detail shows).
    pub fn joined(&self) -> String {
        self.parts.join(", ")
    }
}

/// Find the final answer of `text` (see [`Extraction`]).
pub fn extract_answer(text: &str, mode: Extraction) -> Option<Extracted> {
    let text = tail(text, 1 << 20);
    let mut boxes = extract::boxes(text);
    // An empty box says nothing (Math-Verify moves on to other answers).
    boxes.retain(|b| !b.content.trim().is_empty());
    if !boxes.is_empty() {
        let group = extract::last_group(&boxes, text);
        return Some(Extracted {
            parts: group.into_iter().map(|s| s.content).collect(),
        });
    }
    if let Some(tag) = extract::answer_tag(text) {
        // Inside the tag the model has committed to one final answer, so it
        // is read leniently (`<answer>The answer is 12.</answer>` -> 12) in
        // both modes: that still yields one value, never a choice among many.
        let inner = tag.content.trim();
        if inner.is_empty() {
            return None;
        }
        return extract_answer(inner, Extraction::Any).or_else(|| Some(Extracted::one(inner)));
    }
    if mode == Extraction::Boxed {
        return None;
    }
    if let Some(p) = text.rfind("####") {
        let rest = text[p + 4..].trim();
        if !rest.is_empty() {
            return Some(Extracted::one(rest.replace(',', "")));
        }
    }
    // Math-Verify's priorities: an answer stated after "final answer is",
    // "answer:" or "answer" (the candidate ending last first, the first that
    // parses wins), then the last math or number of the text.
    for level in extract::anchored(text) {
        for c in level {
            if c.parts.iter().all(|p| parse_answer(p).is_some()) {
                return Some(Extracted { parts: c.parts });
            }
        }
    }
    latest(text)
}

/// Whichever comes last: the last group of math environments or the last
/// number outside them; without environments, [`plain_or_math`].
fn latest(text: &str) -> Option<Extracted> {
    let envs = extract::math_envs(text);
    if envs.is_empty() {
        return plain_or_math(text);
    }
    let inside = |spans: &[extract::Span], p: usize| spans.iter().any(|e| e.start <= p && p < e.end);
    let fractions: Vec<extract::Span> = extract::plain_fractions(text)
        .into_iter()
        .filter(|f| !inside(&envs, f.start))
        .collect();
    let numbers: Vec<extract::Span> = extract::plain_numbers(text)
        .into_iter()
        .filter(|n| !inside(&envs, n.start) && !inside(&fractions, n.start))
        .collect();
    let env_group = extract::last_env_group(&envs, text);
    let env_end = env_group.last().map(|e| e.end).unwrap_or(0);
    // The candidate ending last wins.
    let loose = [numbers.last(), fractions.last()]
        .into_iter()
        .flatten()
        .max_by_key(|n| n.end)
        .filter(|n| n.end > env_end);
    match loose {
        Some(n) => Some(Extracted::one(n.content.clone())),
        None => Some(Extracted {
            parts: env_group.into_iter().map(|e| e.content).collect(),
        }),
    }
}

/// A short text with no math environment: one number (with decimal commas
/// and thousands separators), else the whole text if it reads as math,
/// else its last number.
fn plain_or_math(text: &str) -> Option<Extracted> {
    let cleaned = text
        .replace("\\$", "")
        .replace(",\\! ", ",")
        .replace(",\\!", ",")
        .replace("{,}", "");
    let t = cleaned.trim();
    let numbers = extract::plain_numbers(t);
    if numbers.len() == 1 {
        let n = &numbers[0];
        let rest = format!("{}{}", &t[..n.start], &t[n.end..]);
        if rest.chars().all(|c| c.is_whitespace() || c == '$' || c == '\\') {
            return Some(Extracted::one(n.content.clone()));
        }
    }
    if t.chars().count() <= 300 && !t.contains('$') && !has_prose(t) && parse_answer(t).is_some() {
        return Some(Extracted::one(t));
    }
    // The last number or plain `\frac{a}{b}`, whichever ends last.
    let fractions = extract::plain_fractions(t);
    let numbers: Vec<&extract::Span> = numbers
        .iter()
        .filter(|n| !fractions.iter().any(|f| f.start <= n.start && n.start < f.end))
        .collect();
    [numbers.last().copied(), fractions.last()]
        .into_iter()
        .flatten()
        .max_by_key(|n| n.end)
        .map(|n| Extracted::one(n.content.clone()))
}

/// Two plain words (two letters or more, not LaTeX commands) in a row.
fn has_prose(t: &str) -> bool {
    let words: Vec<&str> = t.split_whitespace().collect();
    let is_word = |w: &str| {
        let w = w.trim_matches(|c: char| matches!(c, ',' | '.' | ':' | ';' | '!' | '?'));
        w.len() >= 2 && w.chars().all(|c| c.is_alphabetic() || c == '\'') && !matches!(w, "and" | "or")
    };
    words.windows(2).any(|p| is_word(p[0]) && is_word(p[1]))
}

fn parse_extracted(e: &Extracted, max_chars: usize) -> Option<Node> {
    if e.parts.iter().map(|p| p.chars().count()).sum::<usize>() > max_chars {
        return None;
    }
    if e.parts.len() == 1 {
        return parse_answer(&e.parts[0]);
    }
    let mut items = Vec::new();
    for p in &e.parts {
        match parse_answer(p)? {
            Node::List(v) => items.extend(v),
            other => items.push(other),
        }
    }
    Some(Node::Set(items))
}

/// The math reward's verdict on a completion.
pub fn verify(gold: &str, completion: &str, config: &MathConfig) -> Outcome {
    let start = Instant::now();
    let Some(gold_ans) = extract_answer(gold, Extraction::Any) else {
        return Outcome::zero(Status::UnparsableGold).with_detail("no answer found in the gold");
    };
    let completion = tail(completion, config.max_completion_bytes);
    let Some(pred_ans) = extract_answer(completion, config.extraction) else {
        return Outcome::zero(Status::NoAnswer).with_detail(match config.extraction {
            Extraction::Boxed => "no \\boxed{} or <answer> in the completion",
            Extraction::Any => "no answer in the completion",
        });
    };
    let squash = |e: &Extracted| e.joined().chars().filter(|c| !c.is_whitespace()).collect::<String>();
    if !squash(&gold_ans).is_empty() && squash(&gold_ans) == squash(&pred_ans) {
        return Outcome::correct().with_detail(format!("answer {}", pred_ans.joined()));
    }
    let Some(gold_node) = parse_extracted(&gold_ans, config.max_answer_chars.max(4000)) else {
        return Outcome::zero(Status::UnparsableGold).with_detail(format!("cannot parse gold {:?}", gold_ans.joined()));
    };
    let Some(pred_node) = parse_extracted(&pred_ans, config.max_answer_chars) else {
        return Outcome::zero(Status::Wrong)
            .with_detail(format!("cannot parse answer {:?}", short(&pred_ans.joined())));
    };
    let mut ctx = equiv::Ctx {
        deadline: start + Duration::from_millis(config.time_budget_ms),
        timed_out: false,
    };
    let same = equiv::equivalent(&equiv::resolve(gold_node), &equiv::resolve(pred_node), &mut ctx);
    if ctx.timed_out {
        return Outcome::zero(Status::Timeout).with_detail("math verification time budget exceeded");
    }
    let detail = format!("answer {}", short(&pred_ans.joined()));
    if same {
        Outcome::correct().with_detail(detail)
    } else {
        Outcome::zero(Status::Wrong).with_detail(detail)
    }
}

fn short(s: &str) -> String {
    if s.chars().count() <= 80 {
        s.to_string()
    } else {
        format!("{}...", s.chars().take(77).collect::<String>())
    }
}

/// Whether two answers (already extracted, without `$`) are equivalent.
pub fn answers_equivalent(gold: &str, pred: &str) -> bool {
    let (Some(g), Some(p)) = (parse_answer(gold), parse_answer(pred)) else {
        return false;
    };
    let mut ctx = equiv::Ctx {
        deadline: Instant::now() + Duration::from_secs(1),
        timed_out: false,
    };
    equiv::equivalent(&equiv::resolve(g), &equiv::resolve(p), &mut ctx)
}

/// The accuracy reward for math: the example's `gold` (or `answer`, or
/// `solution`) against the completion's final answer. 1 if equivalent, else 0.
#[derive(Debug, Clone, Default)]
pub struct MathReward {
    /// Its settings.
    pub config: MathConfig,
}

impl MathReward {
    /// A math reward with these settings.
    pub fn new(config: MathConfig) -> Result<Self> {
        config.validate()?;
        Ok(MathReward { config })
    }
}

/// The gold answer of an example: `gold`, `answer` or `solution`, as text
/// (numbers are accepted too).
pub fn gold_of(example: &Example) -> Result<String> {
    for key in ["gold", "answer", "solution"] {
        match example.get(key) {
            Some(serde_json::Value::String(s)) => return Ok(s.clone()),
            Some(serde_json::Value::Number(n)) => return Ok(n.to_string()),
            Some(_) => return Err(Error::field(key, "must be a string or a number")),
            None => {}
        }
    }
    Err(Error::field("gold", "missing"))
}

impl Reward for MathReward {
    fn name(&self) -> &str {
        "math"
    }

    fn score(&self, example: &Example, completion: &str) -> Outcome {
        match gold_of(example) {
            Ok(gold) => verify(&gold, completion, &self.config),
            Err(e) => Outcome::zero(Status::UnparsableGold).with_detail(e.to_string()),
        }
    }
}
