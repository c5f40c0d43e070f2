//! Sampling one token from a row of logits, with a per-sequence seeded RNG.
//!
//! The distribution is built as transformers' processors and warpers build
//! it, in order: the repetition penalty (on the raw logits, over the prompt
//! and the completion so far; [`apply_repetition_penalty`]), temperature,
//! then top-k, then top-p (on the distribution renormalised over the top-k
//! set), then min-p (relative to the most likely token).
//!
//! The log-prob returned with each token is `log softmax(logits / T)` at
//! that token: the temperature-scaled distribution *before* truncation,
//! which is what a trainer recomputes from the same weights (TRL divides the
//! logits by the rollout temperature the same way). When top-k/top-p/min-p
//! removed mass `1 - kept`, the token was actually drawn with probability
//! `p / kept`; add `-ln(kept)` (returned as `truncated_mass_log`) to get that.

use aha_tensor::rng::SplitMix64;
use aha_tensor::Real;
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
    /// Divide the positive logits and multiply the negative ones of every
    /// token already in the prompt or the completion by this (1.0: off;
    /// transformers' `repetition_penalty`, default 1.0).
    pub repetition_penalty: f32,
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
    /// Added to each prompt's index in the call before its stream is
    /// derived (default 0): a data-parallel rank generating prompts
    /// `offset..` of a global batch draws the completions one process
    /// generating the whole batch would.
    pub prompt_offset: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            greedy: false,
            max_new_tokens: 256,
            stop_token_ids: vec![],
            stop_strings: vec![],
            seed: 0,
            prompt_offset: 0,
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
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
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

/// Elements per chunk of the weight pass (chunk sums guide the draw).
const CHUNK: usize = 256;

/// Largest element, or NaN when there is a NaN; in 16 lanes so it vectorizes.
fn row_max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut nan = [false; 16];
    let c = x.chunks_exact(16);
    let rest = c.remainder();
    for ch in c {
        for l in 0..16 {
            lanes[l] = if ch[l] > lanes[l] { ch[l] } else { lanes[l] };
            nan[l] |= ch[l].is_nan();
        }
    }
    if nan.iter().any(|&b| b) || rest.iter().any(|v| v.is_nan()) {
        return f32::NAN;
    }
    rest.iter().chain(&lanes).fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

/// `e = exp((x - m) * inv_t)`; returns the sum (f32 lanes, then f64).
/// Compiled for AVX-512 or AVX2 + FMA when the CPU has them (chosen at run
/// time), else for the baseline.
fn exp_shifted(e: &mut [f32], x: &[f32], m: f32, inv_t: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the features the function was compiled for.
            return unsafe { exp_shifted_avx512(e, x, m, inv_t) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { exp_shifted_avx2(e, x, m, inv_t) };
        }
    }
    exp_shifted_body(e, x, m, inv_t)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn exp_shifted_avx512(e: &mut [f32], x: &[f32], m: f32, inv_t: f32) -> f64 {
    exp_shifted_body(e, x, m, inv_t)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exp_shifted_avx2(e: &mut [f32], x: &[f32], m: f32, inv_t: f32) -> f64 {
    exp_shifted_body(e, x, m, inv_t)
}

#[inline(always)]
fn exp_shifted_body(e: &mut [f32], x: &[f32], m: f32, inv_t: f32) -> f64 {
    let mut lanes = [0f32; 16];
    let (ec, xc) = (e.chunks_exact_mut(16), x.chunks_exact(16));
    let tail_start = x.len() / 16 * 16;
    for (eo, xi) in ec.zip(xc) {
        for l in 0..16 {
            let v = ((xi[l] - m) * inv_t).exp_fast();
            eo[l] = v;
            lanes[l] += v;
        }
    }
    let mut sum: f64 = lanes.iter().map(|&v| f64::from(v)).sum();
    for (eo, &xi) in e[tail_start..].iter_mut().zip(&x[tail_start..]) {
        *eo = ((xi - m) * inv_t).exp_fast();
        sum += f64::from(*eo);
    }
    sum
}

/// Buckets of the nucleus histogram: f32 bits >> 19 keep the exponent and
/// three mantissa bits, and 1.0 (the largest weight) is bucket 2032.
const NUCLEUS_BUCKETS: usize = (0x3f80_0000 >> 19) + 1;

/// Sort key of a candidate: descending weight, ties to the lower id.
#[inline]
fn rank_key(w: f32, i: usize) -> u64 {
    (u64::from(!w.to_bits()) << 32) | i as u64
}

/// The top-p nucleus of weights `e` (each in [0, 1], summing to `z`): the
/// ids, in id order, of the smallest set of most likely tokens whose mass
/// reaches `top_p * z`, the token that crosses it included, ties broken
/// toward the lower id -- the set transformers' TopPLogitsWarper keeps,
/// found without sorting the vocabulary (see [`NucleusCut`]).
pub(crate) fn nucleus(e: &[f32], z: f64, top_p: f64) -> Vec<u32> {
    let cut = NucleusCut::new(e, z, top_p);
    (0..e.len())
        .filter(|&i| cut.contains(e[i], i))
        .map(|i| i as u32)
        .collect()
}

/// The histogram bucket of a weight (see [`NUCLEUS_BUCKETS`]).
#[inline]
fn nucleus_bucket(w: f32) -> usize {
    ((w.to_bits() >> 19) as usize).min(NUCLEUS_BUCKETS - 1)
}

/// Where the top-p nucleus ends, so that membership is a test per token:
/// one pass builds a histogram of mass by the weight's leading bits, a
/// walk from the top finds the bucket where the mass crosses `top_p * z`,
/// and only that bucket is sorted (by [`rank_key`]) and cut. The nucleus
/// is then every token whose key is at most the last kept one's (larger
/// weights have smaller keys), or, when rounding left the crossing bucket
/// empty, every token in a bucket above it.
struct NucleusCut {
    /// The bucket where the mass crosses.
    cross: usize,
    /// The rank key of the nucleus' last token in that bucket.
    last: Option<u64>,
}

impl NucleusCut {
    fn new(e: &[f32], z: f64, top_p: f64) -> NucleusCut {
        let mut mass = vec![0f64; NUCLEUS_BUCKETS];
        for &w in e {
            mass[nucleus_bucket(w)] += f64::from(w);
        }
        let target = top_p * z;
        let mut above = 0.0;
        let mut cross = 0;
        for b in (0..NUCLEUS_BUCKETS).rev() {
            if above + mass[b] >= target {
                cross = b;
                break;
            }
            above += mass[b];
        }
        let mut edge: Vec<u64> = Vec::new();
        for (i, &w) in e.iter().enumerate() {
            if nucleus_bucket(w) == cross {
                edge.push(rank_key(w, i));
            }
        }
        edge.sort_unstable();
        let mut acc = above;
        let mut last = None;
        for k in edge {
            last = Some(k);
            acc += f64::from(f32::from_bits(!((k >> 32) as u32)));
            if acc >= target {
                break;
            }
        }
        NucleusCut { cross, last }
    }

    /// Whether token `i` of weight `w` is in the nucleus.
    #[inline]
    fn contains(&self, w: f32, i: usize) -> bool {
        match self.last {
            Some(k) => rank_key(w, i) <= k,
            None => nucleus_bucket(w) > self.cross,
        }
    }
}

/// Draws from the tokens `ids` (ascending) in proportion to `e`: returns the
/// first whose cumulative weight exceeds `u` times their total mass (the
/// last with weight when rounding leaves `u` past the end) and that mass:
/// the scan in id order that the GPU sampling kernel shares.
fn draw_ids(e: &[f32], ids: impl Iterator<Item = usize> + Clone, u: f64) -> (u32, f64) {
    let kept: f64 = ids.clone().map(|i| f64::from(e[i])).sum();
    let target = u * kept;
    let (mut acc, mut last, mut last_weighted) = (0.0, None, None);
    for i in ids {
        let w = f64::from(e[i]);
        if w > 0.0 {
            last_weighted = Some(i);
        }
        last = Some(i);
        acc += w;
        if target < acc {
            return (i as u32, kept);
        }
    }
    (last_weighted.or(last).unwrap_or(0) as u32, kept)
}

/// Samples one token from `logits [V]`, drawing one uniform number from
/// `rng` (none for greedy).
///
/// Cost: one vectorized exponential pass over the vocabulary, plus for
/// top-p a histogram pass (no sort of the vocabulary, see [`nucleus`]) and
/// for top-k a selection.
pub fn sample(logits: &[f32], p: &SamplingParams, rng: &mut SeqRng) -> Result<Sampled> {
    let u = if p.is_greedy() { 0.0 } else { rng.uniform() };
    sample_with_uniform(logits, p, u)
}

/// Transformers' `RepetitionPenaltyLogitsProcessor`: every distinct token
/// of `seen` (ids outside the vocabulary ignored) has its logit divided by
/// `penalty` when positive and multiplied by it otherwise, once however
/// often it occurs. `penalty` 1.0 changes nothing.
pub fn apply_repetition_penalty<'a>(logits: &mut [f32], seen: impl IntoIterator<Item = &'a [u32]>, penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut done = vec![false; logits.len()];
    for part in seen {
        for &t in part {
            let i = t as usize;
            if i < logits.len() && !done[i] {
                done[i] = true;
                let x = logits[i];
                logits[i] = if x < 0.0 { x * penalty } else { x / penalty };
            }
        }
    }
}

/// [`sample`] in the context of the tokens so far (`context`: the prompt,
/// then the completion), which the repetition penalty reads. With a
/// penalty, the token is drawn from the penalized logits while `logprob`
/// stays `log softmax(logits / T)` of the unpenalized ones (what a trainer
/// recomputes from the weights); `truncated_mass_log` then refers to the
/// penalized distribution.
pub fn sample_in_context(logits: &[f32], p: &SamplingParams, rng: &mut SeqRng, context: &[&[u32]]) -> Result<Sampled> {
    if p.repetition_penalty == 1.0 {
        return sample(logits, p, rng);
    }
    let mut pen = logits.to_vec();
    apply_repetition_penalty(&mut pen, context.iter().copied(), p.repetition_penalty);
    let mut out = sample(&pen, p, rng)?;
    let t = if p.is_greedy() { 1.0 } else { p.temperature };
    let m = row_max(logits);
    let mut e = vec![0f32; logits.len()];
    let z = exp_shifted(&mut e, logits, m, 1.0 / t);
    out.logprob = ((f64::from(logits[out.token as usize]) - f64::from(m)) / f64::from(t) - z.ln()) as f32;
    Ok(out)
}

/// [`sample`] with the uniform number `u` in [0, 1) given: the contract the
/// GPU sampling kernel (`sample_f32` in `kernels/sampling.cu`) shares. The
/// kept tokens are scanned in id order, and the token is the first whose
/// cumulative weight exceeds `u` times the kept mass.
pub fn sample_with_uniform(logits: &[f32], p: &SamplingParams, u: f64) -> Result<Sampled> {
    if logits.is_empty() {
        return Err(Error::Invalid("empty logits".into()));
    }
    let t = if p.is_greedy() { 1.0 } else { p.temperature as f64 };
    let m32 = row_max(logits);
    if !m32.is_finite() {
        return Err(Error::Invalid("logits are not finite".into()));
    }
    let m = m32 as f64;
    // Weights e_i = exp((x_i - max) / T) in (0, 1], and their sums by
    // chunks of CHUNK (for the draw) and in all (z).
    let inv_t = (1.0 / t) as f32;
    let mut e = vec![0f32; logits.len()];
    let mut chunk_sums = Vec::with_capacity(logits.len().div_ceil(CHUNK));
    for (ec, lc) in e.chunks_mut(CHUNK).zip(logits.chunks(CHUNK)) {
        chunk_sums.push(exp_shifted(ec, lc, m32, inv_t));
    }
    let z: f64 = chunk_sums.iter().sum();
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
    // Draws from all tokens in proportion to e, skipping whole chunks by
    // their sums, then scanning one chunk.
    let draw_all = || -> u32 {
        let u = u * z;
        let mut acc = 0.0;
        let mut last_nonzero = None;
        for (c, &cs) in chunk_sums.iter().enumerate() {
            if cs > 0.0 {
                last_nonzero = Some(c);
            }
            if u < acc + cs {
                for (j, &w) in e[c * CHUNK..(c * CHUNK + CHUNK).min(e.len())].iter().enumerate() {
                    acc += f64::from(w);
                    if u < acc && w > 0.0 {
                        return (c * CHUNK + j) as u32;
                    }
                }
                break;
            }
            acc += cs;
        }
        // Rounding left u past the end: the last token with weight.
        let c = last_nonzero.unwrap_or(0);
        let end = (c * CHUNK + CHUNK).min(e.len());
        (c * CHUNK..end).rev().find(|&j| e[j] > 0.0).unwrap_or(end - 1) as u32
    };
    let truncate = p.top_k > 0 || p.top_p < 1.0 || p.min_p > 0.0;
    if !truncate {
        let token = draw_all();
        return Ok(Sampled {
            token,
            logprob: logprob(token as usize),
            truncated_mass_log: 0.0,
        });
    }
    let mut idx: Vec<u32> = if p.top_k > 0 && p.top_k < e.len() {
        // Top-k by selection, then top-p over the k in rank order.
        let mut keys: Vec<u64> = e.iter().enumerate().map(|(i, &w)| rank_key(w, i)).collect();
        keys.select_nth_unstable(p.top_k - 1);
        keys.truncate(p.top_k);
        keys.sort_unstable();
        let mut idx: Vec<u32> = keys.iter().map(|k| (*k & 0xffff_ffff) as u32).collect();
        if p.top_p < 1.0 {
            let mass: f64 = idx.iter().map(|&i| f64::from(e[i as usize])).sum();
            let mut acc = 0.0;
            let mut keep = idx.len();
            for (j, &i) in idx.iter().enumerate() {
                acc += f64::from(e[i as usize]) / mass;
                if acc >= p.top_p as f64 {
                    keep = j + 1;
                    break;
                }
            }
            idx.truncate(keep);
        }
        idx
    } else if p.top_p < 1.0 {
        if p.min_p <= 0.0 {
            // The draw over the nucleus in id order, testing membership on
            // the fly instead of collecting the ids.
            let cut = NucleusCut::new(&e, z, p.top_p as f64);
            let (token, kept) = draw_ids(&e, (0..e.len()).filter(|&i| cut.contains(e[i], i)), u);
            return Ok(Sampled {
                token,
                logprob: logprob(token as usize),
                truncated_mass_log: (kept / z).ln() as f32,
            });
        }
        nucleus(&e, z, p.top_p as f64)
    } else {
        (0..e.len() as u32).collect()
    };
    if p.min_p > 0.0 {
        // Relative to the most likely token (weight exp(0) = 1, up to rounding).
        let top = e.iter().fold(0f32, |a, &b| a.max(b));
        let floor = p.min_p * top;
        idx.retain(|&i| e[i as usize] >= floor);
        if idx.is_empty() {
            idx.push(logits.iter().position(|&x| x == m32).unwrap_or(0) as u32);
        }
    }
    // Id order, as the GPU kernel scans (a mask pass over the vocabulary
    // once the kept set is more than a 64th of it: sorting would cost more).
    if idx.len() > 256 && idx.len() * 64 > e.len() {
        let mut mask = vec![false; e.len()];
        for &i in &idx {
            mask[i as usize] = true;
        }
        idx = (0..e.len() as u32).filter(|&i| mask[i as usize]).collect();
    } else {
        idx.sort_unstable();
    }
    let (token, kept) = draw_ids(&e, idx.iter().map(|&i| i as usize), u);
    Ok(Sampled {
        token,
        logprob: logprob(token as usize),
        truncated_mass_log: (kept / z).ln() as f32,
    })
}

#[cfg(test)]
mod nucleus_tests {
    use super::*;

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
        // transformers: RepetitionPenaltyLogitsProcessor(penalty=2.0) on
        // scores [1, -1, 3, -2, 0.5] with input_ids [0, 1, 1, 3, 7] gives
        // [0.5, -2, 3, -4, 0.5] (7 is out of range here: ignored).
        let mut x = [1.0f32, -1.0, 3.0, -2.0, 0.5];
        apply_repetition_penalty(&mut x, [&[0u32, 1][..], &[1, 3, 7][..]], 2.0);
        assert_eq!(x, [0.5, -2.0, 3.0, -4.0, 0.5]);
        let mut y = [1.0f32, -1.0];
        apply_repetition_penalty(&mut y, [&[0u32, 1][..]], 1.0);
        assert_eq!(y, [1.0, -1.0]);
    }

    #[test]
    fn repetition_penalty_steers_greedy_away_from_seen_tokens() {
        let p = SamplingParams {
            greedy: true,
            repetition_penalty: 3.0,
            ..SamplingParams::default()
        };
        let logits = [2.0f32, 1.0, -1.0];
        let mut rng = SeqRng::for_sequence(0, 0, 0);
        let s = sample_in_context(&logits, &p, &mut rng, &[&[5], &[0]]).unwrap();
        // 2 / 3 < 1: token 1 wins; its log-prob is of the unpenalized row.
        assert_eq!(s.token, 1);
        let z: f64 = logits.iter().map(|&x| f64::from(x).exp()).sum();
        assert!((f64::from(s.logprob) - (1.0 - z.ln())).abs() < 1e-5);
        let plain = sample_in_context(
            &logits,
            &SamplingParams {
                repetition_penalty: 1.0,
                ..p.clone()
            },
            &mut rng,
            &[&[0]],
        )
        .unwrap();
        assert_eq!(plain.token, 0);
        assert!(SamplingParams {
            repetition_penalty: 0.0,
            ..p
        }
        .validate()
        .is_err());
    }

    /// The nucleus as transformers defines it: sort, take the prefix.
    fn by_sorting(e: &[f32], z: f64, top_p: f64) -> Vec<u32> {
        let mut keys: Vec<u64> = e.iter().enumerate().map(|(i, &w)| rank_key(w, i)).collect();
        keys.sort_unstable();
        let mut out = Vec::new();
        let mut acc = 0.0;
        for k in keys {
            let i = (k & 0xffff_ffff) as usize;
            out.push(i as u32);
            acc += f64::from(e[i]);
            if acc >= top_p * z {
                break;
            }
        }
        out
    }

    #[test]
    fn nucleus_equals_the_sorted_prefix() {
        let mut rng = SeqRng::for_sequence(7, 0, 0);
        for case in 0..400 {
            let v = 1 + (rng.next_u64() % 3000) as usize;
            let spread = [0.01, 1.0, 5.0, 20.0][case % 4];
            let logits: Vec<f32> = (0..v)
                .map(|_| {
                    let x = (rng.uniform() * spread) as f32;
                    // Many exact ties in some cases.
                    if case % 3 == 0 {
                        x.round()
                    } else {
                        x
                    }
                })
                .collect();
            let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let e: Vec<f32> = logits.iter().map(|&x| (x - m).exp()).collect();
            let z: f64 = e.iter().map(|&w| f64::from(w)).sum();
            let top_p = [0.1, 0.5, 0.9, 0.95, 0.999, 1e-6][case % 6];
            let mut got = nucleus(&e, z, top_p);
            let mut want = by_sorting(&e, z, top_p);
            got.sort_unstable();
            want.sort_unstable();
            assert_eq!(got, want, "case {case}: v {v}, top_p {top_p}");
        }
    }

    /// The draw the sampler made before membership was tested by key: the
    /// nucleus' ids collected, sorted, summed and scanned in id order.
    fn draw_over_ids(logits: &[f32], top_p: f32, u: f64) -> (u32, f32) {
        let m = row_max(logits);
        let mut e = vec![0f32; logits.len()];
        let z: f64 = e
            .chunks_mut(CHUNK)
            .zip(logits.chunks(CHUNK))
            .map(|(ec, lc)| exp_shifted(ec, lc, m, 1.0))
            .sum();
        let mut idx = nucleus(&e, z, f64::from(top_p));
        idx.sort_unstable();
        let kept: f64 = idx.iter().map(|&i| f64::from(e[i as usize])).sum();
        let (target, mut acc) = (u * kept, 0.0);
        let mut last = idx[idx.len() - 1];
        for &i in &idx {
            let w = f64::from(e[i as usize]);
            if w > 0.0 {
                last = i;
            }
            acc += w;
            if target < acc {
                return (i, (kept / z).ln() as f32);
            }
        }
        (last, (kept / z).ln() as f32)
    }

    #[test]
    fn top_p_draw_by_key_equals_the_draw_over_the_nucleus_ids() {
        let mut rng = SeqRng::for_sequence(3, 1, 4);
        for case in 0..300 {
            let v = 1 + (rng.next_u64() % 5000) as usize;
            let spread = [0.001, 0.5, 4.0, 30.0][case % 4];
            let logits: Vec<f32> = (0..v)
                .map(|_| {
                    let x = (rng.uniform() * spread) as f32;
                    if case % 5 == 0 {
                        x.round()
                    } else {
                        x
                    }
                })
                .collect();
            let top_p = [0.05, 0.5, 0.9, 0.95, 0.9999][case % 5];
            let p = SamplingParams {
                top_p,
                ..SamplingParams::default()
            };
            for u in [0.0, 1e-9, 0.25, 0.5, 0.999_999_9, rng.uniform()] {
                let got = sample_with_uniform(&logits, &p, u).unwrap();
                let (token, mass_log) = draw_over_ids(&logits, top_p, u);
                assert_eq!(got.token, token, "case {case}: v {v}, top_p {top_p}, u {u}");
                assert_eq!(got.truncated_mass_log, mass_log, "case {case}");
            }
        }
    }
}
