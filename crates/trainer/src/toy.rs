//! The built-in toy tasks: multi-digit addition, multi-digit by one-digit
//! multiplication (both with carries) and countdown, with a character
//! tokenizer built with the tokenizers crate, seeded generators, disjoint
//! train/test splits, and the synthetic "pretraining" text in which the
//! `<think>`/`<answer>` format appears only sometimes.
//!
//! The base corpus mixes two kinds of completion for a prompt:
//!
//! - reasoning (a minority): the work written out step by step inside
//!   `<think>...</think>`, then `<answer>...</answer>`, always right:
//!   - addition `47+85=`: `<think>7+5=12,4+8+1=13</think><answer>132</answer>`
//!     (digit by digit, carry written out);
//!   - multiplication `47*6=`: `<think>7*6=42,4*6+4=28</think><answer>282</answer>`;
//!   - countdown `3,7,5 50=` (reach 50 with each number once):
//!     `<think>3+7=10,10*5=50</think><answer>(3+7)*5</answer>`;
//! - direct (the majority): just an answer, right only about half of the
//!   time for arithmetic, and a random expression of the numbers for
//!   countdown.
//!
//! A base model trained on it answers in both styles and is right about as
//! often as the mixture says. Reinforcement learning with accuracy and
//! format rewards then has something to find: answering in the reasoning
//! style is rewarded, gets more accurate answers and longer completions. That
//! is R1-Zero's finding in miniature; the toy makes it happen in minutes.

use std::str::FromStr;

use aha_rewards::format::{check_format, FormatConfig, FormatReward, FormatStyle};
use aha_rewards::{Example, Outcome, Reward, Status, WeightedSum};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
pub use crate::rng::Rng;

/// Special tokens, in id order.
pub const SPECIALS: [&str; 6] = ["<pad>", "<eos>", "<think>", "</think>", "<answer>", "</answer>"];
/// Ordinary characters, after the special tokens (new characters go at the
/// end so existing ids never move).
pub const CHARS: &str = "0123456789+=,- *()";

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

/// Token ids of every problem's prompt.
pub fn encode_prompts(tok: &Tokenizer, problems: &[Problem]) -> Result<Vec<Vec<u32>>> {
    problems.iter().map(|p| encode(tok, &p.prompt())).collect()
}

/// A uniform random order of three indices (Fisher-Yates).
fn shuffle3(rng: &mut Rng) -> [usize; 3] {
    let mut ix = [0usize, 1, 2];
    for i in (1..3).rev() {
        ix.swap(i, rng.below(i as u64 + 1) as usize);
    }
    ix
}

/// Which toy task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// `digits`-digit + `digits`-digit addition.
    #[default]
    Addition,
    /// `digits`-digit x one-digit multiplication.
    Multiplication,
    /// Three numbers 1..=9 and a target reachable with `+ - *`, each number
    /// used once.
    Countdown,
}

impl Task {
    /// Every task, for help texts.
    pub const ALL: [Task; 3] = [Task::Addition, Task::Multiplication, Task::Countdown];

    /// The task's name as the CLI and the config spell it.
    pub fn name(self) -> &'static str {
        match self {
            Task::Addition => "addition",
            Task::Multiplication => "multiplication",
            Task::Countdown => "countdown",
        }
    }
}

impl FromStr for Task {
    type Err = Error;
    fn from_str(s: &str) -> Result<Task> {
        Task::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| Error::Config {
                what: "toy task".into(),
                msg: format!("unknown toy task {s:?}: expected addition, multiplication or countdown"),
            })
    }
}

/// Largest operand width the arithmetic tasks accept.
pub const MAX_DIGITS: usize = 4;

/// One toy problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// `a + b`, both written with `digits` digits (zero-padded).
    Add {
        /// First operand.
        a: u32,
        /// Second operand.
        b: u32,
        /// Operand width.
        digits: u8,
    },
    /// `a * b`, `a` written with `digits` digits, `b` one digit.
    Mul {
        /// Multi-digit operand.
        a: u32,
        /// One-digit operand.
        b: u32,
        /// Width of `a`.
        digits: u8,
    },
    /// Reach `target` from `nums` (as shown, in this order).
    Countdown {
        /// The numbers, 1..=9.
        nums: [u32; 3],
        /// The target.
        target: u32,
        /// A solution: indices into `nums` and the two operators, computed
        /// as `(nums[i] op1 nums[j]) op2 nums[k]`.
        solution: ([u8; 3], [u8; 2]),
    },
}

fn digits_of(mut x: u32, n: usize) -> Vec<u32> {
    // Least significant first.
    (0..n)
        .map(|_| {
            let d = x % 10;
            x /= 10;
            d
        })
        .collect()
}

fn apply(op: u8, x: i64, y: i64) -> i64 {
    match op {
        b'+' => x + y,
        b'-' => x - y,
        _ => x * y,
    }
}

impl Problem {
    /// The task this problem belongs to.
    pub fn task(&self) -> Task {
        match self {
            Problem::Add { .. } => Task::Addition,
            Problem::Mul { .. } => Task::Multiplication,
            Problem::Countdown { .. } => Task::Countdown,
        }
    }

    /// The prompt text; arithmetic operands are zero-padded so each digit
    /// sits at a fixed position.
    pub fn prompt(&self) -> String {
        match *self {
            Problem::Add { a, b, digits } => format!("{a:0w$}+{b:0w$}=", w = digits as usize),
            Problem::Mul { a, b, digits } => format!("{a:0w$}*{b}=", w = digits as usize),
            Problem::Countdown { nums, target, .. } => format!("{},{},{} {target}=", nums[0], nums[1], nums[2]),
        }
    }

    /// The reference answer: the number, or one countdown expression that
    /// reaches the target.
    pub fn answer(&self) -> String {
        match *self {
            Problem::Add { a, b, .. } => (a + b).to_string(),
            Problem::Mul { a, b, .. } => (a * b).to_string(),
            Problem::Countdown {
                nums,
                solution: (ix, ops),
                ..
            } => format!(
                "({}{}{}){}{}",
                nums[ix[0] as usize], ops[0] as char, nums[ix[1] as usize], ops[1] as char, nums[ix[2] as usize]
            ),
        }
    }

    /// Is `answer` (the text inside `<answer>`) right? Arithmetic: the
    /// number. Countdown: an expression that uses each number exactly once
    /// and equals the target (exact rational arithmetic, aha-rewards' parser).
    pub fn is_correct(&self, answer: &str) -> bool {
        let answer = answer.trim();
        match *self {
            Problem::Add { a, b, .. } => answer.parse::<u32>().ok() == Some(a + b),
            Problem::Mul { a, b, .. } => answer.parse::<u32>().ok() == Some(a * b),
            Problem::Countdown { nums, target, .. } => {
                let Ok(ev) = aha_rewards::countdown::evaluate(answer) else {
                    return false;
                };
                let mut used = ev.numbers.clone();
                used.sort_unstable();
                let mut want: Vec<i64> = nums.iter().map(|&n| i64::from(n)).collect();
                want.sort_unstable();
                used == want
                    && ev
                        .value
                        .is_some_and(|v| v == num_rational::BigRational::from_integer(i64::from(target).into()))
            }
        }
    }

    /// The reasoning-style completion (without the end token).
    pub fn reasoning(&self) -> String {
        let work = match *self {
            Problem::Add { a, b, digits } => {
                let (da, db) = (digits_of(a, digits as usize), digits_of(b, digits as usize));
                let mut carry = 0;
                let mut steps = Vec::new();
                for i in 0..digits as usize {
                    let s = da[i] + db[i] + carry;
                    steps.push(if i == 0 {
                        format!("{}+{}={s}", da[i], db[i])
                    } else {
                        format!("{}+{}+{carry}={s}", da[i], db[i])
                    });
                    carry = s / 10;
                }
                steps.join(",")
            }
            Problem::Mul { a, b, digits } => {
                let da = digits_of(a, digits as usize);
                let mut carry = 0;
                let mut steps = Vec::new();
                for (i, &d) in da.iter().enumerate() {
                    let s = d * b + carry;
                    steps.push(if i == 0 {
                        format!("{d}*{b}={s}")
                    } else {
                        format!("{d}*{b}+{carry}={s}")
                    });
                    carry = s / 10;
                }
                steps.join(",")
            }
            Problem::Countdown {
                nums,
                target,
                solution: (ix, ops),
            } => {
                let (x, y, z) = (nums[ix[0] as usize], nums[ix[1] as usize], nums[ix[2] as usize]);
                let r = apply(ops[0], x.into(), y.into());
                format!("{x}{}{y}={r},{r}{}{z}={target}", ops[0] as char, ops[1] as char)
            }
        };
        format!("<think>{work}</think><answer>{}</answer>", self.answer())
    }

    /// Held out from training? A fixed tenth of all problems, by a hash of
    /// what the prompt shows.
    pub fn is_test(&self) -> bool {
        let (x, y, z): (u32, u32, u32) = match *self {
            Problem::Add { a, b, .. } => (a, b, 1),
            Problem::Mul { a, b, .. } => (a, b, 2),
            Problem::Countdown { nums, target, .. } => (nums[0] * 100 + nums[1] * 10 + nums[2], target, 3),
        };
        (x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503) ^ z.wrapping_mul(97_531)).wrapping_mul(2_246_822_519)
            % 10
            == 0
    }
}

/// A task with its size: what [`problem`] and [`test_set`] draw from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskSpec {
    /// The task.
    pub task: Task,
    /// Operand width of the arithmetic tasks (1..=[`MAX_DIGITS`]); ignored
    /// by countdown.
    pub digits: usize,
}

impl Default for TaskSpec {
    fn default() -> TaskSpec {
        TaskSpec {
            task: Task::Addition,
            digits: 2,
        }
    }
}

impl TaskSpec {
    /// Checks the operand width.
    pub fn validate(&self) -> Result<()> {
        if !(1..=MAX_DIGITS).contains(&self.digits) {
            return Err(Error::Config {
                what: "toy task".into(),
                msg: format!("digits must be 1..={MAX_DIGITS}, got {}", self.digits),
            });
        }
        Ok(())
    }

    /// A uniform random problem of the task (either split).
    fn draw(&self, rng: &mut Rng) -> Problem {
        let span = 10u64.pow(self.digits.clamp(1, MAX_DIGITS) as u32);
        let digits = self.digits.clamp(1, MAX_DIGITS) as u8;
        match self.task {
            Task::Addition => Problem::Add {
                a: rng.below(span) as u32,
                b: rng.below(span) as u32,
                digits,
            },
            Task::Multiplication => Problem::Mul {
                a: rng.below(span) as u32,
                b: rng.below(10) as u32,
                digits,
            },
            Task::Countdown => loop {
                let nums = [
                    1 + rng.below(9) as u32,
                    1 + rng.below(9) as u32,
                    1 + rng.below(9) as u32,
                ];
                // Which number goes where in the solution.
                let ix = shuffle3(rng).map(|i| i as u8);
                const OPS: [u8; 3] = [b'+', b'-', b'*'];
                let ops = [OPS[rng.below(3) as usize], OPS[rng.below(3) as usize]];
                let r = apply(ops[0], nums[ix[0] as usize].into(), nums[ix[1] as usize].into());
                let t = apply(ops[1], r, nums[ix[2] as usize].into());
                if r >= 0 && (1..=99).contains(&t) {
                    break Problem::Countdown {
                        nums,
                        target: t as u32,
                        solution: (ix, ops),
                    };
                }
            },
        }
    }
}

/// A random problem from the train or the test split.
pub fn problem(rng: &mut Rng, spec: TaskSpec, test: bool) -> Problem {
    loop {
        let p = spec.draw(rng);
        if p.is_test() == test {
            return p;
        }
    }
}

/// `n` distinct test problems, the same for every run (a fixed seed);
/// fewer when the task has fewer.
pub fn test_set(spec: TaskSpec, n: usize) -> Vec<Problem> {
    let mut rng = Rng::new(0x7e57);
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(n);
    let mut misses = 0;
    while out.len() < n && misses < 10_000 {
        let p = problem(&mut rng, spec, true);
        // Distinct prompts (countdown problems with different solutions
        // can show the same prompt).
        if seen.insert(p.prompt()) {
            out.push(p);
            misses = 0;
        } else {
            misses += 1;
        }
    }
    out
}

impl Problem {
    /// The answer of the "no working" habit: each digit computed on its
    /// own and the carries dropped (`47+85` gives `22`, `47*6` gives `42`).
    /// Right exactly when the problem has no carry. `None` for countdown.
    pub fn carry_dropped(&self) -> Option<u32> {
        let (digits, b_digits, mul) = match *self {
            Problem::Add { a, b, digits } => (digits_of(a, digits as usize), digits_of(b, digits as usize), false),
            Problem::Mul { a, b, digits } => (digits_of(a, digits as usize), vec![b; digits as usize], true),
            Problem::Countdown { .. } => return None,
        };
        let mut v = 0;
        for i in (0..digits.len()).rev() {
            let d = if mul {
                digits[i] * b_digits[i]
            } else {
                digits[i] + b_digits[i]
            };
            v = v * 10 + d % 10;
        }
        Some(v)
    }
}

/// A base-corpus completion for `p`: reasoning with probability
/// `reasoning_share`, else a direct answer with the habit that working
/// without writing anything down has: arithmetic drops its carries
/// ([`Problem::carry_dropped`], right only when there are none), countdown
/// writes a random expression of the numbers.
pub fn base_completion(rng: &mut Rng, p: &Problem, reasoning_share: f64) -> String {
    if rng.unit() < reasoning_share {
        return p.reasoning();
    }
    if let Some(v) = p.carry_dropped() {
        return v.to_string();
    }
    let nums = match *p {
        Problem::Countdown { nums, .. } => nums,
        _ => [0; 3],
    };
    const OPS: [char; 3] = ['+', '-', '*'];
    let ix = shuffle3(rng);
    let (o1, o2) = (OPS[rng.below(3) as usize], OPS[rng.below(3) as usize]);
    format!("({}{o1}{}){o2}{}", nums[ix[0]], nums[ix[1]], nums[ix[2]])
}

/// The answer a completion gives: the `<answer>` tag's content when there
/// is one (strict), else the whole text when `lenient`.
pub fn extract_answer(text: &str, lenient: bool) -> Option<&str> {
    if let (Some(s), Some(e)) = (text.find("<answer>"), text.find("</answer>")) {
        if s < e {
            return Some(text[s + "<answer>".len()..e].trim());
        }
    }
    if lenient {
        Some(text.trim())
    } else {
        None
    }
}

/// Is the completion's answer right? `lenient` also accepts a bare answer
/// without tags.
pub fn is_correct(text: &str, p: &Problem, lenient: bool) -> bool {
    extract_answer(text, lenient).is_some_and(|a| p.is_correct(a))
}

/// The toy format: R1-Zero's template checked by aha-rewards' format check
/// in its lenient form (the four tags once each, in order, nothing before
/// `<think>` or after `</answer>`; empty reasoning or answer and text
/// between the blocks are accepted).
pub fn format_config() -> FormatConfig {
    FormatConfig {
        style: FormatStyle::R1Zero,
        think_opened_in_prompt: false,
        strict: false,
    }
}

/// 1 when the completion is `<think>...</think>...<answer>...</answer>` (one
/// of each, in order, nothing after), else 0 ([`format_config`]).
pub fn format_reward(text: &str) -> f64 {
    f64::from(check_format(text, &format_config()).is_ok())
}

/// 1 when the `<answer>` tag holds a right answer (strict: no tag, no reward).
pub fn accuracy_reward(text: &str, p: &Problem) -> f64 {
    if is_correct(text, p, false) {
        1.0
    } else {
        0.0
    }
}

impl Problem {
    /// The problem as a dataset row: `task`, its operands (`a`, `b`,
    /// `digits`) or `nums`, `target` and the solution (`order`, `ops`), the
    /// `prompt` and the reference answer as `gold`.
    pub fn example(&self) -> Example {
        let mut e = Example::new();
        e.insert("task".into(), self.task().name().into());
        e.insert("prompt".into(), self.prompt().into());
        e.insert("gold".into(), self.answer().into());
        match *self {
            Problem::Add { a, b, digits } | Problem::Mul { a, b, digits } => {
                e.insert("a".into(), a.into());
                e.insert("b".into(), b.into());
                e.insert("digits".into(), digits.into());
            }
            Problem::Countdown {
                nums,
                target,
                solution: (order, ops),
            } => {
                e.insert("nums".into(), nums.to_vec().into());
                e.insert("target".into(), target.into());
                e.insert("order".into(), order.to_vec().into());
                e.insert("ops".into(), String::from_utf8_lossy(&ops).into_owned().into());
            }
        }
        e
    }

    /// The problem of a row written by [`Problem::example`]; `None` when the
    /// row is not one.
    pub fn from_example(e: &Example) -> Option<Problem> {
        let int = |k: &str| {
            e.get(k)
                .and_then(serde_json::Value::as_u64)
                .and_then(|x| u32::try_from(x).ok())
        };
        let ints3 = |k: &str| -> Option<[u32; 3]> {
            let v: Vec<u32> = e
                .get(k)?
                .as_array()?
                .iter()
                .map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()))
                .collect::<Option<_>>()?;
            v.try_into().ok()
        };
        let task: Task = e.get("task")?.as_str()?.parse().ok()?;
        match task {
            Task::Addition | Task::Multiplication => {
                let (a, b) = (int("a")?, int("b")?);
                let digits = u8::try_from(int("digits")?).ok()?;
                Some(if task == Task::Addition {
                    Problem::Add { a, b, digits }
                } else {
                    Problem::Mul { a, b, digits }
                })
            }
            Task::Countdown => {
                let order = ints3("order")?.map(|i| u8::try_from(i).unwrap_or(u8::MAX));
                if order.iter().any(|&i| i > 2) {
                    return None;
                }
                let ops: [u8; 2] = e.get("ops")?.as_str()?.as_bytes().try_into().ok()?;
                Some(Problem::Countdown {
                    nums: ints3("nums")?,
                    target: int("target")?,
                    solution: (order, ops),
                })
            }
        }
    }
}

/// The toy tasks' accuracy reward as a [`Reward`]: 1 when the `<answer>`
/// tag holds a right answer to the row's problem ([`Problem::example`]),
/// else 0 (strict: no tag, no reward). A row that is not a toy problem is
/// not scorable.
#[derive(Debug, Clone, Copy, Default)]
pub struct AccuracyReward;

impl Reward for AccuracyReward {
    fn name(&self) -> &str {
        "accuracy"
    }

    fn score(&self, example: &Example, completion: &str) -> Outcome {
        let Some(p) = Problem::from_example(example) else {
            return Outcome::zero(Status::UnparsableGold).with_detail("not a toy problem");
        };
        match extract_answer(completion, false) {
            None => Outcome::zero(Status::NoAnswer),
            Some(a) if p.is_correct(a) => Outcome::correct(),
            Some(_) => Outcome::zero(Status::Wrong),
        }
    }
}

/// The toy tasks' two rewards, accuracy (strict) and format, each weight 1.
pub fn rewards() -> WeightedSum {
    WeightedSum::new().add(AccuracyReward, 1.0).add(
        FormatReward {
            config: format_config(),
        },
        1.0,
    )
}

/// The rows of `problems`, for [`rewards`].
pub fn examples(problems: &[Problem]) -> Vec<Example> {
    problems.iter().map(Problem::example).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs() -> Vec<TaskSpec> {
        let mut v = Vec::new();
        for d in 1..=MAX_DIGITS {
            v.push(TaskSpec {
                task: Task::Addition,
                digits: d,
            });
            v.push(TaskSpec {
                task: Task::Multiplication,
                digits: d,
            });
        }
        v.push(TaskSpec {
            task: Task::Countdown,
            digits: 2,
        });
        v
    }

    #[test]
    fn reasoning_is_right_and_formatted_for_every_task() {
        let tok = tokenizer().unwrap();
        let mut rng = Rng::new(1);
        for spec in specs() {
            for _ in 0..500 {
                let test = rng.unit() < 0.5;
                let p = problem(&mut rng, spec, test);
                let r = p.reasoning();
                assert_eq!(format_reward(&r), 1.0, "{r}");
                assert_eq!(accuracy_reward(&r, &p), 1.0, "{} -> {r}", p.prompt());
                // Every character is in the vocabulary: round trip.
                let ids = encode(&tok, &(p.prompt() + &r)).unwrap();
                assert!(ids.iter().all(|&i| i != PAD), "{r}");
                assert_eq!(tok.decode(&ids, false).unwrap(), p.prompt() + &r);
            }
        }
    }

    #[test]
    fn reasoning_steps_carry() {
        let p = Problem::Add {
            a: 478,
            b: 965,
            digits: 3,
        };
        assert_eq!(
            p.reasoning(),
            "<think>8+5=13,7+6+1=14,4+9+1=14</think><answer>1443</answer>"
        );
        let p = Problem::Mul { a: 47, b: 6, digits: 2 };
        assert_eq!(p.prompt(), "47*6=");
        assert_eq!(p.reasoning(), "<think>7*6=42,4*6+4=28</think><answer>282</answer>");
        let p = Problem::Countdown {
            nums: [5, 3, 7],
            target: 50,
            solution: ([1, 2, 0], [b'+', b'*']),
        };
        assert_eq!(p.prompt(), "5,3,7 50=");
        assert_eq!(p.reasoning(), "<think>3+7=10,10*5=50</think><answer>(3+7)*5</answer>");
    }

    #[test]
    fn countdown_checks_numbers_and_value() {
        let p = Problem::Countdown {
            nums: [5, 3, 7],
            target: 50,
            solution: ([1, 2, 0], [b'+', b'*']),
        };
        assert!(p.is_correct("(3+7)*5"));
        assert!(p.is_correct("5*(7+3)"));
        assert!(!p.is_correct("(3+7)*5+0"), "a number not given");
        assert!(!p.is_correct("(3+7)*5*1"));
        assert!(!p.is_correct("10*5"), "numbers not used");
        assert!(!p.is_correct("(3+7)*7"), "wrong multiset");
        assert!(!p.is_correct("3+7+5"), "wrong value");
        assert!(!p.is_correct("(3+7"), "malformed");
    }

    #[test]
    fn splits_are_disjoint_and_test_sets_fixed() {
        for spec in specs() {
            let test = test_set(spec, 200);
            assert!(!test.is_empty());
            assert!(test.iter().all(Problem::is_test));
            assert_eq!(test, test_set(spec, 200));
            let mut rng = Rng::new(9);
            for _ in 0..300 {
                assert!(!problem(&mut rng, spec, false).is_test());
            }
        }
        // Two-digit addition has 1,000 test problems of 10,000.
        let all = test_set(TaskSpec::default(), 5000);
        assert!((900..=1100).contains(&all.len()), "{}", all.len());
    }

    #[test]
    fn direct_answers_drop_carries() {
        let p = Problem::Add {
            a: 47,
            b: 85,
            digits: 2,
        };
        assert_eq!(p.carry_dropped(), Some(22));
        let p = Problem::Mul { a: 47, b: 6, digits: 2 };
        assert_eq!(p.carry_dropped(), Some(42));
        let mut rng = Rng::new(3);
        for spec in specs().into_iter().filter(|s| s.task != Task::Countdown) {
            let mut right = 0;
            for _ in 0..500 {
                let p = problem(&mut rng, spec, false);
                let direct = base_completion(&mut rng, &p, 0.0);
                let no_carry = !p
                    .reasoning()
                    .split(['=', ',', '<'])
                    .any(|x| x.parse::<u32>().is_ok_and(|v| v >= 10));
                assert_eq!(is_correct(&direct, &p, true), no_carry, "{} {direct}", p.prompt());
                right += usize::from(no_carry);
            }
            // Carries are common: direct answers are mostly wrong beyond one digit.
            assert!(spec.digits == 1 || right < 350, "{spec:?}: {right}");
        }
    }

    /// The toy format check as it was written before it moved to
    /// aha-rewards' lenient format check.
    fn old_format_reward(text: &str) -> f64 {
        let t = text.trim();
        let ok = t.starts_with("<think>")
            && t.ends_with("</answer>")
            && t.matches("<think>").count() == 1
            && t.matches("</think>").count() == 1
            && t.matches("<answer>").count() == 1
            && t.matches("</answer>").count() == 1
            && matches!((t.find("</think>"), t.find("<answer>")), (Some(a), Some(b)) if a < b);
        f64::from(ok)
    }

    #[test]
    fn format_reward_is_the_old_toy_check() {
        const PIECES: [&str; 8] = ["<think>", "</think>", "<answer>", "</answer>", "1", "+", " ", "\n"];
        let mut rng = Rng::new(17);
        let mut accepted = 0;
        for _ in 0..200_000 {
            let n = rng.below(9) as usize;
            let text: String = (0..n).map(|_| PIECES[rng.below(8) as usize]).collect();
            assert_eq!(format_reward(&text), old_format_reward(&text), "{text:?}");
            accepted += format_reward(&text) as usize;
        }
        // Near-templates: the four tags in order with random filling.
        let filler = |rng: &mut Rng| -> String { (0..rng.below(3)).map(|_| PIECES[rng.below(8) as usize]).collect() };
        for _ in 0..50_000 {
            let mut text = String::new();
            for tag in ["<think>", "</think>", "<answer>", "</answer>"] {
                text += &filler(&mut rng);
                text += tag;
            }
            text += &filler(&mut rng);
            assert_eq!(format_reward(&text), old_format_reward(&text), "{text:?}");
            accepted += format_reward(&text) as usize;
        }
        assert!(accepted > 1000, "{accepted}");
        for t in [
            "<think></think><answer></answer>",
            "<think>a</think>x<answer>1</answer>",
            " <think>a</think><answer>1</answer>\n",
        ] {
            assert_eq!(format_reward(t), 1.0, "{t}");
        }
    }

    #[test]
    fn problems_round_trip_through_their_rows() {
        let mut rng = Rng::new(4);
        for spec in specs() {
            for _ in 0..50 {
                let p = problem(&mut rng, spec, false);
                let e = p.example();
                assert_eq!(Problem::from_example(&e), Some(p));
                let r = AccuracyReward;
                assert_eq!(r.score(&e, &p.reasoning()).score, 1.0);
                assert_eq!(r.score(&e, &p.answer()).score, 0.0, "strict: no tag, no reward");
            }
        }
        assert_eq!(
            AccuracyReward.score(&Example::new(), "x").status,
            Status::UnparsableGold
        );
    }

    #[test]
    fn task_names_parse_and_bad_ones_are_refused() {
        for t in Task::ALL {
            assert_eq!(t.name().parse::<Task>().unwrap(), t);
        }
        assert!("division".parse::<Task>().unwrap_err().to_string().contains("division"));
        assert!(TaskSpec {
            task: Task::Addition,
            digits: 9
        }
        .validate()
        .is_err());
    }
}
