//! The built-in toy task: two-digit addition, with a character tokenizer
//! built with the tokenizers crate, seeded generators and disjoint
//! train/test splits, and the synthetic "pretraining" text in which the
//! `<think>`/`<answer>` format appears only sometimes.
//!
//! The base corpus mixes two kinds of completion for a prompt `a+b=`:
//!
//! - reasoning (a minority): `<think>{a0}+{b0}={u},{a1}+{b1}+{c}={t}</think><answer>{a+b}</answer>`,
//!   digit by digit with the carry written out, always right;
//! - direct (the majority): just a number, right only half of the time.
//!
//! A base model trained on it answers in both styles and is right about as
//! often as the mixture says. Reinforcement learning with accuracy and
//! format rewards then has something to find: answering in the reasoning
//! style is rewarded, gets more accurate answers and longer completions. That
//! is R1-Zero's finding in miniature; the toy makes it happen in minutes.

use aha_tensor::rng::SplitMix64;
use tokenizers::Tokenizer;

use crate::error::{Error, Result};

/// Special tokens, in id order.
pub const SPECIALS: [&str; 6] = ["<pad>", "<eos>", "<think>", "</think>", "<answer>", "</answer>"];
/// Ordinary characters, after the special tokens.
pub const CHARS: &str = "0123456789+=,- ";

/// The padding id.
pub const PAD: u32 = 0;
/// The end-of-sequence id.
pub const EOS: u32 = 1;

/// Vocabulary size of the toy tokenizer.
pub fn vocab_size() -> usize {
    SPECIALS.len() + CHARS.chars().count()
}

/// The toy tokenizer as `tokenizer.json` text: one token per character
/// (word-level model, a split-every-character pre-tokenizer, a fuse
/// decoder) plus the special tokens.
pub fn tokenizer_json() -> String {
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (i, s) in SPECIALS.iter().enumerate() {
        vocab.insert(s.to_string(), serde_json::json!(i));
        added.push(serde_json::json!({
            "id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": true
        }));
    }
    for (j, ch) in CHARS.chars().enumerate() {
        vocab.insert(ch.to_string(), serde_json::json!(SPECIALS.len() + j));
    }
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "."}, "behavior": "Isolated", "invert": false},
        "post_processor": null,
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<pad>"}
    })
    .to_string()
}

/// The toy tokenizer.
pub fn tokenizer() -> Result<Tokenizer> {
    tokenizer_json()
        .parse::<Tokenizer>()
        .map_err(|e| Error::Other(format!("toy tokenizer: {e}")))
}

/// Token ids of `text` (no special-token post-processing).
pub fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(tok
        .encode(text, false)
        .map_err(|e| Error::Other(format!("encoding {text:?}: {e}")))?
        .get_ids()
        .to_vec())
}

/// One addition problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Problem {
    /// First operand (0..100).
    pub a: u32,
    /// Second operand (0..100).
    pub b: u32,
}

impl Problem {
    /// The prompt text; operands are zero-padded to two digits so each
    /// digit sits at a fixed position.
    pub fn prompt(&self) -> String {
        format!("{:02}+{:02}=", self.a, self.b)
    }
    /// The right answer.
    pub fn answer(&self) -> u32 {
        self.a + self.b
    }
    /// The reasoning-style completion (without the end token).
    pub fn reasoning(&self) -> String {
        let (a0, a1, b0, b1) = (self.a % 10, self.a / 10, self.b % 10, self.b / 10);
        let u = a0 + b0;
        let c = u / 10;
        let t = a1 + b1 + c;
        format!(
            "<think>{a0}+{b0}={u},{a1}+{b1}+{c}={t}</think><answer>{}</answer>",
            self.answer()
        )
    }
    /// Held out from training? A fixed tenth of all problems, by a hash.
    pub fn is_test(&self) -> bool {
        (self.a.wrapping_mul(2_654_435_761) ^ self.b.wrapping_mul(40_503)).wrapping_mul(2_246_822_519) % 10 == 0
    }
}

/// The task's data generator: splitmix64 with a seed of its own.
#[derive(Debug, Clone)]
pub struct Rng(SplitMix64);

impl Rng {
    /// Seeded stream.
    pub fn new(seed: u64) -> Rng {
        Rng(SplitMix64(seed ^ 0x51_7cc1_b727_220a))
    }
    /// The generator's state, for checkpoints.
    pub fn state(&self) -> u64 {
        self.0 .0
    }
    /// A generator continuing from a saved [`Rng::state`].
    pub fn from_state(state: u64) -> Rng {
        Rng(SplitMix64(state))
    }
    /// Next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    /// Uniform below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0.below(n)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        self.0.unit()
    }
}

/// A random problem from the train or the test split.
pub fn problem(rng: &mut Rng, test: bool) -> Problem {
    loop {
        let p = Problem {
            a: rng.below(100) as u32,
            b: rng.below(100) as u32,
        };
        if p.is_test() == test {
            return p;
        }
    }
}

/// Every test problem, in a fixed order.
pub fn test_set() -> Vec<Problem> {
    (0..100)
        .flat_map(|a| (0..100).map(move |b| Problem { a, b }))
        .filter(|p| p.is_test())
        .collect()
}

/// A base-corpus completion for `p`: reasoning with probability
/// `reasoning_share`, else a direct answer that is right half of the time.
pub fn base_completion(rng: &mut Rng, p: &Problem, reasoning_share: f64) -> String {
    if rng.unit() < reasoning_share {
        p.reasoning()
    } else if rng.unit() < 0.5 {
        p.answer().to_string()
    } else {
        let off = 1 + rng.below(9) as i64;
        let wrong = p.answer() as i64 + if rng.unit() < 0.5 { off } else { -off };
        wrong.max(0).to_string()
    }
}

/// The answer a completion gives: the `<answer>` tag's content when there
/// is one (strict), else the whole text when `lenient`.
pub fn extract_answer(text: &str, lenient: bool) -> Option<u32> {
    if let (Some(s), Some(e)) = (text.find("<answer>"), text.find("</answer>")) {
        if s < e {
            return text[s + "<answer>".len()..e].trim().parse().ok();
        }
    }
    if lenient {
        text.trim().parse().ok()
    } else {
        None
    }
}

/// 1 when the completion is exactly `<think>...</think><answer>...</answer>`
/// (one of each, in order, nothing after), else 0.
pub fn format_reward(text: &str) -> f64 {
    let t = text.trim();
    let ok = t.starts_with("<think>")
        && t.ends_with("</answer>")
        && t.matches("<think>").count() == 1
        && t.matches("</think>").count() == 1
        && t.matches("<answer>").count() == 1
        && t.matches("</answer>").count() == 1
        && matches!((t.find("</think>"), t.find("<answer>")), (Some(a), Some(b)) if a < b);
    if ok {
        1.0
    } else {
        0.0
    }
}

/// 1 when the `<answer>` tag holds the right sum (strict: no tag, no reward).
pub fn accuracy_reward(text: &str, p: &Problem) -> f64 {
    if extract_answer(text, false) == Some(p.answer()) {
        1.0
    } else {
        0.0
    }
}

/// The toy task's two rewards, accuracy (strict) and format, each weight 1,
/// for a step's `problems` (indexed by prompt).
pub fn rewards(problems: &[Problem]) -> [crate::rl::RewardFn<'_>; 2] {
    [
        crate::rl::RewardFn {
            name: "accuracy".into(),
            weight: 1.0,
            score: Box::new(move |text: &str, i: usize| accuracy_reward(text, &problems[i])),
        },
        crate::rl::RewardFn {
            name: "format".into(),
            weight: 1.0,
            score: Box::new(|text: &str, _| format_reward(text)),
        },
    ]
}
