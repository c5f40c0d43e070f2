//! The rollout engine: continuous batching over a paged KV cache.
//!
//! Each step runs one ragged batch through the model: the prompts admitted
//! this step (their whole prefill) and one new token of every live sequence.
//! A prompt is prefilled once; its G samples share its full cache blocks and
//! get private copies of its last partial block. A sequence that finishes
//! releases its blocks at once, and waiting prompts are admitted as soon as
//! there is room: both in batch slots and in cache blocks, reserved for the
//! worst case at admission so that a running sequence never runs out.

use std::collections::VecDeque;
use std::time::Instant;

use aha_moe_model::gpu::KvDtype;
use aha_moe_model::{Model, PagedKvCache, SeqSpan};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::sampling::{sample_in_context, SamplingParams, SeqRng};
use crate::stop::{check_config, engine_eos, Output, StopRules};

/// Engine sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Live sequences at most (the decode batch).
    pub max_batch: usize,
    /// Positions per cache block.
    pub block_size: usize,
    /// Cache blocks in the pool at most. The CPU engine reserves memory as
    /// blocks are first used; the GPU engine allocates the fewer of this
    /// and the request's worst case, and keeps the pool for the next call
    /// (see `gpu_engine`).
    pub kv_blocks: usize,
    /// Element type of the cached keys and values on a GPU (bf16 unless
    /// asked; see `gpu_engine`). The CPU engine's cache is always f32.
    pub kv_dtype: KvDtype,
    /// GPU engine: replay steps where every sequence decodes one token as
    /// CUDA graphs (one per batch and table-width bucket, bf16 caches
    /// only; see `gpu_engine`). The CPU engine ignores it.
    pub cuda_graphs: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_batch: 64,
            block_size: 16,
            kv_blocks: 16_384,
            kv_dtype: KvDtype::Bf16,
            cuda_graphs: true,
        }
    }
}

/// Why a completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token (kept as the last token id, not in the text).
    Eos,
    /// A stop string (the text is cut before it).
    Stop,
    /// `max_new_tokens` reached: the completion is truncated.
    Length,
}

/// One finished completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// Index of its prompt.
    pub prompt_index: usize,
    /// Which of the prompt's samples it is.
    pub sample_index: usize,
    /// Generated token ids (an EOS that ended it included).
    pub token_ids: Vec<u32>,
    /// Decoded text (empty without a tokenizer).
    pub text: String,
    /// `log softmax(logits / T)` at each chosen token (see `sampling`).
    pub logprobs: Vec<f32>,
    /// Why it ended.
    pub finish_reason: FinishReason,
}

/// Where the time of a `generate` call went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct GenerateStats {
    /// Model forward passes (prefill and decode), seconds.
    pub forward_s: f64,
    /// Sampling, seconds.
    pub sample_s: f64,
    /// Detokenisation and stop checks, seconds.
    pub detok_s: f64,
    /// Everything, seconds.
    pub total_s: f64,
    /// Engine steps.
    pub steps: usize,
    /// Prompt tokens prefilled (once per prompt).
    pub prompt_tokens: usize,
    /// Completion tokens generated.
    pub generated_tokens: usize,
    /// Most cache blocks in use at once.
    pub peak_blocks: usize,
    /// Sequences preempted (their blocks freed, recomputed on return; the
    /// GPU engine only: the CPU engine reserves the worst case instead).
    pub preemptions: usize,
    /// Positions recomputed for sequences back from preemption.
    pub recomputed_tokens: usize,
    /// Positions of returning sequences' prompts taken from a live sample
    /// of the same prompt (shared blocks) instead of recomputed.
    pub reshared_tokens: usize,
    /// GPU engine: steps replayed as CUDA graphs (every sequence decoding
    /// one token), and the graphs captured for them.
    pub graph_steps: usize,
    /// GPU engine: decode graphs captured (one per bucket used; none for
    /// a bucket whose graph was kept from an earlier call).
    pub graphs_captured: usize,
    /// GPU engine: device KV pools allocated by the call (0 when the pool
    /// kept from an earlier call was reused; see `gpu_engine`).
    pub pools_allocated: usize,
}

struct Seq {
    table: Vec<u32>,
    /// Positions in the cache.
    len: usize,
    /// The token to feed next (the last one sampled).
    pending: u32,
    out: Output,
    rng: SeqRng,
    reserved: usize,
}

/// Where a generation stands, after each engine step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Completions finished.
    pub finished: usize,
    /// Completions asked for (prompts x n).
    pub total: usize,
    /// Sequences decoding now.
    pub live: usize,
    /// Tokens sampled so far.
    pub generated_tokens: usize,
    /// Seconds since the call began.
    pub elapsed_s: f64,
}

/// Generates completions with one model.
pub struct Engine<'a> {
    model: &'a Model,
    tokenizer: Option<&'a Tokenizer>,
    cfg: EngineConfig,
    eos: Vec<u32>,
}

impl<'a> Engine<'a> {
    /// An engine over `model`; `tokenizer` enables text and stop strings.
    /// End-of-sequence ids come from the model config plus `extra_eos`
    /// (e.g. `generation_config.json`'s).
    pub fn new(
        model: &'a Model,
        tokenizer: Option<&'a Tokenizer>,
        cfg: EngineConfig,
        extra_eos: &[u32],
    ) -> Result<Engine<'a>> {
        check_config(&cfg)?;
        let eos = engine_eos(&model.config.eos_token_ids, extra_eos);
        Ok(Engine {
            model,
            tokenizer,
            cfg,
            eos,
        })
    }

    /// `n` completions of every prompt; returned ordered by (prompt, sample).
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        n: usize,
        params: &SamplingParams,
    ) -> Result<(Vec<Completion>, GenerateStats)> {
        self.generate_with_progress(prompts, n, params, &mut |_| {})
    }

    /// [`Engine::generate`], calling `progress` after every engine step
    /// with the completions finished so far (for a progress bar).
    pub fn generate_with_progress(
        &self,
        prompts: &[Vec<u32>],
        n: usize,
        params: &SamplingParams,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<(Vec<Completion>, GenerateStats)> {
        check_request(
            prompts,
            n,
            params,
            self.cfg.max_batch,
            self.tokenizer.is_some(),
            self.model.config.max_position_embeddings,
        )?;
        let rules = StopRules::new(self.tokenizer, &self.eos, params);
        let t_all = Instant::now();
        let mut stats = GenerateStats::default();
        let mut cache: PagedKvCache = self.model.new_paged_cache(self.cfg.block_size, self.cfg.kv_blocks);
        let bs = self.cfg.block_size;
        let mut waiting: VecDeque<usize> = (0..prompts.len()).collect();
        let mut live: Vec<Seq> = Vec::new();
        let mut done: Vec<Completion> = Vec::with_capacity(prompts.len() * n);
        let mut reserved = 0usize;
        // Per prompt: samples still live, and the full prompt blocks they
        // share (reserved until the last of them finishes).
        let mut sharing: std::collections::HashMap<usize, (usize, usize)> = std::collections::HashMap::new();

        while !waiting.is_empty() || !live.is_empty() {
            stats.steps += 1;
            // Admit prompts while batch slots and worst-case blocks allow.
            let mut admitted: Vec<(usize, Vec<u32>)> = Vec::new();
            while let Some(&pi) = waiting.front() {
                let plen = prompts[pi].len();
                let shared = plen / bs;
                // The prompt's blocks, plus each sample's private tail to its maximum length.
                let per_sample = cache.blocks_for(plen + params.max_new_tokens) - shared;
                let need = cache.blocks_for(plen) + n * per_sample;
                if live.len() + admitted.len() * n + n > self.cfg.max_batch || reserved + need > self.cfg.kv_blocks {
                    if live.is_empty() && admitted.is_empty() {
                        return Err(Error::Invalid(format!(
                            "prompt {pi} needs {need} cache blocks, the pool has {}",
                            self.cfg.kv_blocks
                        )));
                    }
                    break;
                }
                waiting.pop_front();
                reserved += need;
                let mut table = Vec::with_capacity(cache.blocks_for(plen));
                for _ in 0..cache.blocks_for(plen) {
                    table.push(cache.alloc()?);
                }
                admitted.push((pi, table));
                stats.prompt_tokens += plen;
            }
            // Make room for each live sequence's next position (copy-on-write
            // of a shared block).
            for s in live.iter_mut() {
                if cache.blocks_for(s.len + 1) > s.table.len() {
                    s.table.push(cache.alloc()?);
                } else if let Some(last) = s.table.last_mut() {
                    if cache.is_shared(*last) {
                        let copy = cache.copy_block(*last)?;
                        cache.release(&[*last]);
                        *last = copy;
                    }
                }
            }
            // One ragged batch: admitted prefills, then one token per live sequence.
            let mut tokens = Vec::new();
            for (pi, _) in &admitted {
                tokens.extend_from_slice(&prompts[*pi]);
            }
            tokens.extend(live.iter().map(|s| s.pending));
            let mut spans: Vec<SeqSpan<'_>> = admitted
                .iter()
                .map(|(pi, table)| SeqSpan {
                    table,
                    start: 0,
                    len: prompts[*pi].len(),
                })
                .collect();
            spans.extend(live.iter().map(|s| SeqSpan {
                table: &s.table,
                start: s.len,
                len: 1,
            }));
            let t0 = Instant::now();
            let logits = self.model.forward_paged(&tokens, &spans, &mut cache)?;
            drop(spans);
            stats.forward_s += t0.elapsed().as_secs_f64();
            stats.peak_blocks = stats.peak_blocks.max(cache.used_blocks());
            let v = self.model.config.vocab_size;
            let n_adm = admitted.len();

            // New sequences from the admitted prompts.
            let mut fresh: Vec<Seq> = Vec::new();
            for (pi, table) in admitted {
                let plen = prompts[pi].len();
                let full = plen / bs;
                let per_sample = cache.blocks_for(plen + params.max_new_tokens) - full;
                for si in 0..n {
                    let mut t = table[..full].to_vec();
                    cache.share(&t);
                    if full < table.len() {
                        t.push(cache.copy_block(table[full])?);
                    }
                    fresh.push(Seq {
                        table: t,
                        len: plen,
                        pending: 0,
                        out: Output::new(pi, si),
                        rng: SeqRng::for_sequence(params.seed, params.prompt_offset.wrapping_add(pi as u64), si as u64),
                        reserved: per_sample,
                    });
                }
                // The prompt's own reference goes; its samples hold theirs.
                cache.release(&table);
                reserved -= cache.blocks_for(plen) - full;
                sharing.insert(pi, (n, full));
            }
            // Advance live sequences past the token just fed.
            for s in live.iter_mut() {
                s.len += 1;
            }
            // Sample for every sequence: admitted ones use their prompt's logits row.
            let mut rows: Vec<(usize, &mut Seq)> = Vec::new();
            for (k, s) in fresh.iter_mut().enumerate() {
                rows.push((k / n, s));
            }
            for (k, s) in live.iter_mut().enumerate() {
                rows.push((n_adm + k, s));
            }
            let t1 = Instant::now();
            // Each sequence has its own RNG stream, so sampling in parallel
            // gives the same tokens as sampling in order.
            rows.par_iter_mut().try_for_each(|(row, s)| -> Result<()> {
                let out = sample_in_context(
                    &logits[*row * v..(*row + 1) * v],
                    params,
                    &mut s.rng,
                    &[&prompts[s.out.prompt], &s.out.tokens],
                )?;
                s.out.push(out.token, out.logprob);
                s.pending = out.token;
                Ok(())
            })?;
            stats.sample_s += t1.elapsed().as_secs_f64();
            drop(rows);
            live.append(&mut fresh);
            stats.generated_tokens += live.len();

            // Stop rules; finished sequences leave and free their blocks.
            let t2 = Instant::now();
            rules.retire(
                &mut live,
                &mut done,
                |s| &mut s.out,
                |s| {
                    cache.release(&s.table);
                    reserved -= s.reserved;
                    if let Some(e) = sharing.get_mut(&s.out.prompt) {
                        e.0 -= 1;
                        if e.0 == 0 {
                            reserved -= e.1;
                            sharing.remove(&s.out.prompt);
                        }
                    }
                },
            )?;
            stats.detok_s += t2.elapsed().as_secs_f64();
            progress(&Progress {
                finished: done.len(),
                total: prompts.len() * n,
                live: live.len(),
                generated_tokens: stats.generated_tokens,
                elapsed_s: t_all.elapsed().as_secs_f64(),
            });
        }
        done.sort_by_key(|c| (c.prompt_index, c.sample_index));
        stats.total_s = t_all.elapsed().as_secs_f64();
        Ok((done, stats))
    }
}

/// Checks a request as every engine does: valid parameters, `n` in
/// `1..=max_batch`, a tokenizer for stop strings, non-empty prompts that fit
/// `max_pos` positions with `max_new_tokens` more.
pub(crate) fn check_request(
    prompts: &[Vec<u32>],
    n: usize,
    params: &SamplingParams,
    max_batch: usize,
    has_tokenizer: bool,
    max_pos: usize,
) -> Result<()> {
    params.validate()?;
    if n == 0 {
        return Err(Error::Invalid("n must be at least 1".into()));
    }
    if n > max_batch {
        return Err(Error::Invalid(format!("n = {n} exceeds max_batch = {max_batch}")));
    }
    if !params.stop_strings.is_empty() && !has_tokenizer {
        return Err(Error::Invalid("stop strings need a tokenizer".into()));
    }
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(Error::Invalid(format!("prompt {i} is empty")));
        }
        if p.len() + params.max_new_tokens > max_pos {
            return Err(Error::Invalid(format!(
                "prompt {i}: {} + {} tokens exceed max_position_embeddings {max_pos}",
                p.len(),
                params.max_new_tokens
            )));
        }
    }
    Ok(())
}
