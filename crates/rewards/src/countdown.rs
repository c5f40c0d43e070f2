//! Countdown (TinyZero's task): combine the given numbers with `+ - * /`
//! and parentheses to reach the target, each number used exactly once.
//!
//! The `<answer>` expression is parsed by a small exact-arithmetic parser
//! (big rationals; never an `eval`): 1.0 when it uses the numbers exactly
//! once and equals the target, 0.1 when it is a well-formed expression but
//! wrong (TinyZero's format score), 0 when there is no answer or it is not an
//! arithmetic expression.

use num_bigint::BigInt;
use num_rational::BigRational;
use num_traits::Zero;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::outcome::{Example, Outcome, Reward, Status};

/// TinyZero's score for a well-formed but wrong answer.
pub const FORMAT_SCORE: f64 = 0.1;
const MAX_EXPR_CHARS: usize = 512;
const MAX_DEPTH: usize = 64;

/// A parsed expression's value and the numbers it used.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluated {
    /// The exact value; `None` after a division by zero.
    pub value: Option<BigRational>,
    /// The integer literals, in order of appearance.
    pub numbers: Vec<i64>,
}

struct P<'a> {
    b: &'a [u8],
    i: usize,
    depth: usize,
    numbers: Vec<i64>,
}

impl P<'_> {
    fn ws(&mut self) {
        while self.i < self.b.len() && self.b[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.b.get(self.i).copied()
    }

    fn expr(&mut self) -> std::result::Result<Option<BigRational>, String> {
        let mut acc = self.term()?;
        while let Some(op @ (b'+' | b'-')) = self.peek() {
            self.i += 1;
            let r = self.term()?;
            acc = match (acc, r) {
                (Some(a), Some(b)) => Some(if op == b'+' { a + b } else { a - b }),
                _ => None,
            };
        }
        Ok(acc)
    }

    fn term(&mut self) -> std::result::Result<Option<BigRational>, String> {
        let mut acc = self.factor()?;
        while let Some(op @ (b'*' | b'/' | b'x' | b'X')) = self.peek() {
            self.i += 1;
            let r = self.factor()?;
            acc = match (acc, r) {
                (Some(a), Some(b)) => {
                    if op == b'/' {
                        if b.is_zero() {
                            None
                        } else {
                            Some(a / b)
                        }
                    } else {
                        Some(a * b)
                    }
                }
                _ => None,
            };
        }
        Ok(acc)
    }

    fn factor(&mut self) -> std::result::Result<Option<BigRational>, String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err("nesting too deep".into());
        }
        let r = match self.peek() {
            Some(b'(') => {
                self.i += 1;
                let v = self.expr()?;
                if self.peek() != Some(b')') {
                    return Err("unclosed parenthesis".into());
                }
                self.i += 1;
                v
            }
            Some(b'-') => {
                self.i += 1;
                self.factor()?.map(|v| -v)
            }
            Some(c) if c.is_ascii_digit() => {
                let st = self.i;
                while self.i < self.b.len() && self.b[self.i].is_ascii_digit() {
                    self.i += 1;
                }
                if self.b.get(self.i) == Some(&b'.') {
                    return Err("decimals are not allowed".into());
                }
                let digits = std::str::from_utf8(&self.b[st..self.i]).map_err(|e| e.to_string())?;
                let n: i64 = digits.parse().map_err(|_| "number too large".to_string())?;
                self.numbers.push(n);
                Some(BigRational::from_integer(BigInt::from(n)))
            }
            Some(c) => return Err(format!("unexpected {:?}", c as char)),
            None => return Err("unexpected end".into()),
        };
        self.depth -= 1;
        Ok(r)
    }
}

/// Parse and evaluate an arithmetic expression over integers (`+ - * /`,
/// `x` or `*` for times, parentheses, unary minus). `Err` when it is not
/// such an expression. A trailing `= value` is ignored.
pub fn evaluate(expr: &str) -> std::result::Result<Evaluated, String> {
    let expr = expr.split('=').next().unwrap_or("").trim();
    let expr = expr
        .replace('×', "*")
        .replace('÷', "/")
        .replace("\\times", "*")
        .replace("\\div", "/");
    if expr.is_empty() {
        return Err("empty expression".into());
    }
    if expr.len() > MAX_EXPR_CHARS {
        return Err("expression too long".into());
    }
    let mut p = P {
        b: expr.as_bytes(),
        i: 0,
        depth: 0,
        numbers: Vec::new(),
    };
    let value = p.expr()?;
    if p.peek().is_some() {
        return Err(format!("trailing text at byte {}", p.i));
    }
    Ok(Evaluated {
        value,
        numbers: p.numbers,
    })
}

/// The content of the last `<answer>...</answer>` of a completion.
pub fn extract_equation(completion: &str) -> Option<&str> {
    let st = completion.rfind("<answer>")? + "<answer>".len();
    let end = completion[st..].find("</answer>")? + st;
    Some(completion[st..end].trim())
}

/// Score a completion for `nums` and `target`.
pub fn score(completion: &str, nums: &[i64], target: i64) -> Outcome {
    let Some(eq) = extract_equation(completion) else {
        return Outcome::zero(Status::NoAnswer).with_detail("no <answer> tag");
    };
    let ev = match evaluate(eq) {
        Ok(ev) => ev,
        Err(e) => return Outcome::zero(Status::Wrong).with_detail(format!("not an arithmetic expression: {e}")),
    };
    let wrong = |why: String| Outcome::new(FORMAT_SCORE, Status::Wrong).with_detail(why);
    let mut used = ev.numbers.clone();
    let mut given = nums.to_vec();
    used.sort_unstable();
    given.sort_unstable();
    if used != given {
        return wrong(format!(
            "uses {:?}, must use each of {:?} exactly once",
            ev.numbers, nums
        ));
    }
    match ev.value {
        None => wrong("division by zero".into()),
        Some(v) if v == BigRational::from_integer(BigInt::from(target)) => Outcome::correct(),
        Some(v) => wrong(format!("equals {v}, target {target}")),
    }
}

/// The countdown reward: reads `nums` (array of integers) and `target`.
#[derive(Debug, Clone, Copy, Default)]
pub struct CountdownReward;

/// `nums` and `target` of an example.
pub fn task_of(example: &Example) -> Result<(Vec<i64>, i64)> {
    let nums = example
        .get("nums")
        .and_then(|v| v.as_array())
        .ok_or_else(|| Error::field("nums", "missing or not an array"))?
        .iter()
        .map(|v| v.as_i64().ok_or_else(|| Error::field("nums", "must hold integers")))
        .collect::<Result<Vec<i64>>>()?;
    let target = example
        .get("target")
        .and_then(|v| v.as_i64())
        .ok_or_else(|| Error::field("target", "missing or not an integer"))?;
    Ok((nums, target))
}

impl Reward for CountdownReward {
    fn name(&self) -> &str {
        "countdown"
    }

    fn score(&self, example: &Example, completion: &str) -> Outcome {
        match task_of(example) {
            Ok((nums, target)) => score(completion, &nums, target),
            Err(e) => Outcome::zero(Status::UnparsableGold).with_detail(e.to_string()),
        }
    }
}

/// One generated countdown problem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountdownTask {
    /// The numbers to use.
    pub nums: Vec<i64>,
    /// The value to reach.
    pub target: i64,
    /// One expression that reaches it.
    pub solution: String,
}

/// SplitMix64: a tiny generator whose sequence never changes with library
/// versions, so a seed names the same tasks forever.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Generate `count` solvable tasks with `n_nums` numbers in `1..=max_num`
/// (TinyZero: 3 or 4 numbers up to 99) and targets in `1..=max_target`,
/// reproducibly from `seed`. Each target is built by combining the numbers
/// in a random order with random operations, keeping every intermediate
/// value a positive integer.
pub fn generate(seed: u64, count: usize, n_nums: usize, max_num: i64, max_target: i64) -> Result<Vec<CountdownTask>> {
    if !(2..=6).contains(&n_nums) || max_num < 1 || max_target < 1 {
        return Err(Error::Config("countdown: need 2..=6 numbers, positive maxima".into()));
    }
    let mut rng = SplitMix(seed);
    let mut out = Vec::with_capacity(count);
    let mut attempts = 0usize;
    while out.len() < count {
        attempts += 1;
        if attempts > count.saturating_mul(10_000).max(10_000) {
            return Err(Error::Config(
                "countdown: could not generate tasks with these limits".into(),
            ));
        }
        let nums: Vec<i64> = (0..n_nums).map(|_| 1 + rng.below(max_num as u64) as i64).collect();
        let mut order: Vec<usize> = (0..n_nums).collect();
        for i in (1..n_nums).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let mut value = nums[order[0]];
        let mut expr = value.to_string();
        let mut ok = true;
        for &k in &order[1..] {
            let n = nums[k];
            let (v, e) = match rng.below(4) {
                0 => (value + n, format!("({expr} + {n})")),
                1 if value > n => (value - n, format!("({expr} - {n})")),
                1 => (n - value, format!("({n} - {expr})")),
                2 => (value * n, format!("{expr} * {n}")),
                _ if value % n == 0 => (value / n, format!("{expr} / {n}")),
                _ if n % value == 0 => (n / value, format!("{n} / ({expr})")),
                _ => (value + n, format!("({expr} + {n})")),
            };
            if v <= 0 || v > max_target.saturating_mul(100) {
                ok = false;
                break;
            }
            value = v;
            expr = e;
        }
        if ok && (1..=max_target).contains(&value) {
            out.push(CountdownTask {
                nums,
                target: value,
                solution: expr,
            });
        }
    }
    Ok(out)
}
