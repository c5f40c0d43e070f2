//! Sampling one token from a row of logits, with a per-sequence seeded RNG.
//!
//! The distribution is built as transformers' warpers build it, in order:
//! temperature, then top-k, then top-p (on the distribution renormalised
//! over the top-k set), then min-p (relative to the most likely token).
//!
//! The log-prob returned with each token is `log softmax(logits / T)` at
//! that token: the temperature-scaled distribution *before* truncation,
//! which is what a trainer recomputes from the same weights (TRL divides the
//! logits by the rollout temperature the same way). When top-k/top-p/min-p
//! removed mass `1 - kept`, the token was actually drawn with probability
//! `p / kept`; add `-ln(kept)` (returned as `truncated_mass_log`) to get that.

use aha_tensor::rng::SplitMix64;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How to pick tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingParams {
    /// Divides the logits; 0 or `greedy` means argmax. Default 1.0 (the R1 report's rollout temperature).
    pub temperature: f32,
    /// Keep the k most likely tokens (0: off).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens with this much mass (1.0: off).
    pub top_p: f32,
    /// Drop tokens below `min_p` times the top probability (0: off).
    pub min_p: f32,
    /// Always take the most likely token.
    pub greedy: bool,
    /// Completion tokens at most.
    pub max_new_tokens: usize,
    /// Extra end-of-sequence token ids (the model's EOS ids are always used).
    pub stop_token_ids: Vec<u32>,
    /// Stop when the completion text contains one of these (it is cut before it).
    pub stop_strings: Vec<String>,
    /// Base seed; a completion's stream is derived from (seed, prompt, sample).
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            greedy: false,
            max_new_tokens: 256,
            stop_token_ids: vec![],
            stop_strings: vec![],
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Checks ranges once, before generating.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(m));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(format!("temperature must be >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..1.0).contains(&self.min_p) {
            return bad(format!("min_p must be in [0, 1), got {}", self.min_p));
        }
        if self.max_new_tokens == 0 {
            return bad("max_new_tokens must be at least 1".into());
        }
        if self.stop_strings.iter().any(|s| s.is_empty()) {
            return bad("stop strings must not be empty".into());
        }
        Ok(())
    }

    fn is_greedy(&self) -> bool {
        self.greedy || self.temperature == 0.0
    }
}

/// A small, fast, seedable generator (splitmix64) with a stable stream:
/// the same seed gives the same numbers on every platform and version.
#[derive(Debug, Clone)]
pub struct SeqRng(SplitMix64);

impl SeqRng {
    /// The stream of completion `sample` of prompt `prompt` under `seed`.
    pub fn for_sequence(seed: u64, prompt: u64, sample: u64) -> SeqRng {
        let a = SplitMix64(seed ^ 0x243f_6a88_85a3_08d3).next_u64() ^ prompt.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let b = SplitMix64(a).next_u64() ^ sample.wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
        SeqRng(SplitMix64(b))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        self.0.unit()
    }
}

/// One sampled token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampled {
    /// The token id.
    pub token: u32,
    /// `log softmax(logits / T)[token]` (T = 1 for greedy).
    pub logprob: f32,
    /// `ln` of the probability mass the truncation kept (0 without truncation).
    pub truncated_mass_log: f32,
}

/// Samples one token from `logits [V]`.
pub fn sample(logits: &[f32], p: &SamplingParams, rng: &mut SeqRng) -> Result<Sampled> {
    if logits.is_empty() {
        return Err(Error::Invalid("empty logits".into()));
    }
    let t = if p.is_greedy() { 1.0 } else { p.temperature as f64 };
    // log-softmax of logits / T in f64: the numbers every later step uses.
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    if !m.is_finite() {
        return Err(Error::Invalid("logits are not finite".into()));
    }
    let z: f64 = logits.iter().map(|&x| ((x as f64 - m) / t).exp()).sum();
    let lse = z.ln();
    let logprob = |i: usize| ((logits[i] as f64 - m) / t - lse) as f32;
    if p.is_greedy() {
        let (i, _) =
            logits.iter().enumerate().fold(
                (0usize, f32::NEG_INFINITY),
                |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) },
            );
        return Ok(Sampled {
            token: i as u32,
            logprob: logprob(i),
            truncated_mass_log: 0.0,
        });
    }
    let probs_all: Vec<f64> = logits.iter().map(|&x| ((x as f64 - m) / t - lse).exp()).collect();
    let truncate = p.top_k > 0 || p.top_p < 1.0 || p.min_p > 0.0;
    if !truncate {
        let u = rng.uniform();
        let mut acc = 0.0;
        let mut last = 0;
        for (i, &q) in probs_all.iter().enumerate() {
            if q > 0.0 {
                last = i;
            }
            acc += q;
            if u < acc {
                return Ok(Sampled {
                    token: i as u32,
                    logprob: logprob(i),
                    truncated_mass_log: 0.0,
                });
            }
        }
        return Ok(Sampled {
            token: last as u32,
            logprob: logprob(last),
            truncated_mass_log: 0.0,
        });
    }
    // Candidates by descending probability, ties to the lower id: one u64
    // key per token (inverted f32 bits of the probability, then the id), so
    // the sort compares integers instead of calling back into floats.
    let key = |i: usize| (u64::from(!(probs_all[i] as f32).to_bits()) << 32) | i as u64;
    let mut keys: Vec<u64> = (0..logits.len()).map(key).collect();
    if p.top_k > 0 && p.top_k < keys.len() {
        keys.select_nth_unstable(p.top_k - 1);
        keys.truncate(p.top_k);
    }
    keys.sort_unstable();
    let mut idx: Vec<u32> = keys.iter().map(|k| (*k & 0xffff_ffff) as u32).collect();
    let mut probs: Vec<f64> = idx.iter().map(|&i| probs_all[i as usize]).collect();
    if p.top_p < 1.0 {
        let mass: f64 = probs.iter().sum();
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (j, q) in probs.iter().enumerate() {
            acc += q / mass;
            // Keep the smallest prefix whose mass reaches top_p (the token
            // that crosses it stays), as transformers' TopPLogitsWarper.
            if acc >= p.top_p as f64 {
                keep = j + 1;
                break;
            }
        }
        idx.truncate(keep);
        probs.truncate(keep);
    }
    if p.min_p > 0.0 {
        let floor = probs[0] * p.min_p as f64;
        let keep = probs.iter().take_while(|&&q| q >= floor).count().max(1);
        idx.truncate(keep);
        probs.truncate(keep);
    }
    let kept: f64 = probs.iter().sum();
    let u = rng.uniform() * kept;
    let mut acc = 0.0;
    let mut pick = idx.len() - 1;
    for (j, q) in probs.iter().enumerate() {
        acc += q;
        if u < acc {
            pick = j;
            break;
        }
    }
    let token = idx[pick];
    Ok(Sampled {
        token,
        logprob: logprob(token as usize),
        truncated_mass_log: kept.ln() as f32,
    })
}
