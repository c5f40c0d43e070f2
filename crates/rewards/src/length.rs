//! Length shaping: DAPO's soft overlong punishment and the cosine
//! length-scaled reward. Lengths are in tokens, counted by the caller.

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::math::{gold_of, verify, MathConfig};
use crate::outcome::{Example, Outcome, Reward, Status};

/// DAPO (Yu et al. 2025, eq. 13): no penalty up to `max_len - cache_len`,
/// then a linear penalty down to -1 at `max_len`, and -1 beyond. Added to
/// the task reward.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OverlongConfig {
    /// L_max: the generation limit (DAPO: 20480 tokens).
    pub max_len: usize,
    /// L_cache: the soft punishment interval (DAPO: 4096 tokens).
    pub cache_len: usize,
}

impl Default for OverlongConfig {
    fn default() -> Self {
        OverlongConfig {
            max_len: 20_480,
            cache_len: 4096,
        }
    }
}

impl OverlongConfig {
    /// Check the values.
    pub fn validate(&self) -> Result<()> {
        if self.cache_len == 0 || self.cache_len > self.max_len {
            return Err(Error::Config(format!(
                "overlong: need 0 < cache_len ({}) <= max_len ({})",
                self.cache_len, self.max_len
            )));
        }
        Ok(())
    }
}

/// The soft overlong penalty for a completion of `len` tokens (in [-1, 0]).
pub fn soft_overlong_penalty(len: usize, cfg: &OverlongConfig) -> f64 {
    let free = cfg.max_len.saturating_sub(cfg.cache_len);
    if len <= free {
        0.0
    } else if len <= cfg.max_len {
        (free as f64 - len as f64) / cfg.cache_len.max(1) as f64
    } else {
        -1.0
    }
}

/// The cosine length-scaled reward (Yeo et al. 2025, "Demystifying Long
/// Chain-of-Thought Reasoning"; open-r1's `get_cosine_scaled_reward`,
/// whose defaults these are): short correct answers earn more than long
/// ones, long wrong answers are punished less than short ones.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CosineConfig {
    /// Reward of a wrong answer of length 0.
    pub min_value_wrong: f64,
    /// Reward of a wrong answer of length `max_len`.
    pub max_value_wrong: f64,
    /// Reward of a correct answer of length `max_len`.
    pub min_value_correct: f64,
    /// Reward of a correct answer of length 0.
    pub max_value_correct: f64,
    /// Length at which the cosine reaches its end.
    pub max_len: usize,
}

impl Default for CosineConfig {
    fn default() -> Self {
        CosineConfig {
            min_value_wrong: -1.0,
            max_value_wrong: -0.5,
            min_value_correct: 0.5,
            max_value_correct: 1.0,
            max_len: 1000,
        }
    }
}

impl CosineConfig {
    /// Check the values.
    pub fn validate(&self) -> Result<()> {
        if self.max_len == 0 {
            return Err(Error::Config("cosine: max_len must be positive".into()));
        }
        Ok(())
    }
}

/// The cosine-scaled reward of a completion of `len` tokens that is
/// `correct` or not. Lengths past `max_len` are clamped to it.
pub fn cosine_scaled(correct: bool, len: usize, cfg: &CosineConfig) -> f64 {
    let progress = (len as f64 / cfg.max_len.max(1) as f64).min(1.0);
    let cosine = (progress * std::f64::consts::PI).cos();
    let (lo, hi) = if correct {
        (cfg.min_value_correct, cfg.max_value_correct)
    } else {
        // Swapped, so that longer wrong answers are punished less.
        (cfg.max_value_wrong, cfg.min_value_wrong)
    };
    lo + 0.5 * (hi - lo) * (1.0 + cosine)
}

/// The example field holding the completion's length in tokens, which the
/// caller (the trainer, or a JSONL line given to `aha rewards`) fills in:
/// lengths are counted by the tokenizer, which rewards do not have.
pub const LENGTH_FIELD: &str = "completion_tokens";

/// The completion's length in tokens from [`LENGTH_FIELD`].
fn length_of(example: &Example) -> std::result::Result<usize, Outcome> {
    match example.get(LENGTH_FIELD).and_then(serde_json::Value::as_u64) {
        Some(n) => Ok(usize::try_from(n).unwrap_or(usize::MAX)),
        None => Err(Outcome::zero(Status::InfraError)
            .with_detail(format!("no token count in the example's `{LENGTH_FIELD}` field"))),
    }
}

/// DAPO's soft overlong punishment as a [`Reward`]: 0 up to `max_len -
/// cache_len` tokens, then down to -1 at `max_len` (status `Correct` while
/// unpunished, else `Wrong`). Reads the length from [`LENGTH_FIELD`].
#[derive(Debug, Clone, Default)]
pub struct SoftOverlongReward {
    /// Its settings.
    pub config: OverlongConfig,
}

impl Reward for SoftOverlongReward {
    fn name(&self) -> &str {
        "soft_overlong"
    }

    fn score(&self, example: &Example, _completion: &str) -> Outcome {
        match length_of(example) {
            Ok(len) => {
                let p = soft_overlong_penalty(len, &self.config);
                let status = if p == 0.0 { Status::Correct } else { Status::Wrong };
                Outcome::new(p, status).with_detail(format!("{len} tokens"))
            }
            Err(o) => o,
        }
    }
}

/// The cosine length-scaled reward as a [`Reward`]: the completion is judged
/// by the math verifier against the example's gold answer, then scaled by
/// its length ([`LENGTH_FIELD`]) with [`cosine_scaled`]. An unparsable gold
/// answer or a missing length is not scorable (NaN).
#[derive(Debug, Clone, Default)]
pub struct CosineLengthReward {
    /// The length scaling.
    pub config: CosineConfig,
    /// How correctness is decided.
    pub math: MathConfig,
}

impl Reward for CosineLengthReward {
    fn name(&self) -> &str {
        "cosine_length"
    }

    fn score(&self, example: &Example, completion: &str) -> Outcome {
        let len = match length_of(example) {
            Ok(len) => len,
            Err(o) => return o,
        };
        let judged = match gold_of(example) {
            Ok(gold) => verify(&gold, completion, &self.math),
            Err(e) => return Outcome::zero(Status::UnparsableGold).with_detail(e.to_string()),
        };
        if !judged.status.is_scorable() {
            return judged;
        }
        let correct = judged.status == Status::Correct;
        Outcome::new(cosine_scaled(correct, len, &self.config), judged.status)
            .with_detail(format!("{} at {len} tokens", judged.status))
    }
}
