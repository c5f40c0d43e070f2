//! Length shaping: DAPO's soft overlong punishment and the cosine
//! length-scaled reward. Lengths are in tokens, counted by the caller.

use serde::Deserialize;

use crate::error::{Error, Result};

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
