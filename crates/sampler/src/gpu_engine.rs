//! The rollout engine on a GPU: [`GpuEngine::generate`] has the contract of
//! [`Engine::generate`](crate::Engine::generate) (the same parameters,
//! per-sequence seeded streams, stop rules, log-probs and
//! [`Completion`]s) and keeps the model, the KV caches and the sampling
//! on the device.
//!
//! Each step decodes every live sequence together: one new token per
//! sequence through [`GpuModel::forward_decode`] (the layer math once for
//! the batch, attention per sequence against its own cache), then one
//! `sample_f32` launch over the `[B, V]` logits (temperature, top-k, top-p,
//! min-p, with one uniform per row from the sequence's own stream), so only
//! the sampled ids and their log-probs come back to the host. A sequence
//! admitted this step prefills its prompt into its own cache first.
//!
//! This first form gives every sequence a contiguous f32 cache of
//! `prompt + max_new_tokens` positions and prefills a prompt once per
//! sample (no paged cache, no prefix sharing, no preemption; MLA caches the
//! expanded keys and values, not the latent).

use std::collections::VecDeque;
use std::time::Instant;

use aha_cuda_kernels::cudarc::driver::CudaSlice;
use aha_cuda_kernels::launch::{sample_f32, SampleParams};
use aha_moe_model::gpu::{GpuKvCache, GpuModel};
use tokenizers::Tokenizer;

use crate::detok::Detokenizer;
use crate::engine::{check_request, completion_text, stop_rule};
use crate::error::{Error, Result};
use crate::sampling::{SamplingParams, SeqRng};
use crate::{Completion, GenerateStats, Progress};

struct Seq {
    prompt: usize,
    sample: usize,
    cache: GpuKvCache,
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    rng: SeqRng,
    detok: Detokenizer,
    text: String,
}

/// Generates completions with a model on a GPU (see the module docs).
pub struct GpuEngine<'a> {
    model: &'a GpuModel,
    tokenizer: Option<&'a Tokenizer>,
    max_batch: usize,
    eos: Vec<u32>,
}

fn device(e: aha_cuda_kernels::Error) -> Error {
    Error::Model(aha_moe_model::Error::Tensor(aha_tensor::Error::from(e)))
}

impl<'a> GpuEngine<'a> {
    /// An engine over `model` decoding at most `max_batch` sequences at
    /// once; `tokenizer` enables text and stop strings. End-of-sequence ids
    /// come from the model config plus `extra_eos`.
    pub fn new(
        model: &'a GpuModel,
        tokenizer: Option<&'a Tokenizer>,
        max_batch: usize,
        extra_eos: &[u32],
    ) -> Result<GpuEngine<'a>> {
        if max_batch == 0 {
            return Err(Error::Invalid("max_batch must be positive".into()));
        }
        let mut eos = model.config.eos_token_ids.clone();
        eos.extend_from_slice(extra_eos);
        eos.sort_unstable();
        eos.dedup();
        Ok(GpuEngine {
            model,
            tokenizer,
            max_batch,
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

    /// [`GpuEngine::generate`], calling `progress` after every step.
    pub fn generate_with_progress(
        &self,
        prompts: &[Vec<u32>],
        n: usize,
        params: &SamplingParams,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<(Vec<Completion>, GenerateStats)> {
        let cfg = &self.model.config;
        check_request(
            prompts,
            n,
            params,
            self.max_batch,
            self.tokenizer.is_some(),
            cfg.max_position_embeddings,
        )?;
        let mut eos = self.eos.clone();
        eos.extend_from_slice(&params.stop_token_ids);
        let greedy = params.greedy || params.temperature == 0.0;
        let sp = SampleParams {
            temperature: if greedy { 0.0 } else { params.temperature },
            top_k: params.top_k,
            top_p: params.top_p,
            min_p: params.min_p,
        };
        let v = cfg.vocab_size;
        let gpu = self.model.gpu();
        let t_all = Instant::now();
        let mut stats = GenerateStats::default();
        let mut waiting: VecDeque<(usize, usize)> =
            (0..prompts.len()).flat_map(|p| (0..n).map(move |s| (p, s))).collect();
        let mut live: Vec<Seq> = Vec::new();
        let mut done: Vec<Completion> = Vec::with_capacity(prompts.len() * n);

        while !waiting.is_empty() || !live.is_empty() {
            stats.steps += 1;
            let t0 = Instant::now();
            // Rows of this step's logits: the live sequences' next tokens
            // (one batched decode), then each admitted sequence's prefill.
            let mut rows: Vec<CudaSlice<f32>> = Vec::new();
            if !live.is_empty() {
                let tokens: Vec<u32> = live.iter().map(|s| s.tokens.last().copied().unwrap_or(0)).collect();
                let mut caches: Vec<&mut GpuKvCache> = live.iter_mut().map(|s| &mut s.cache).collect();
                rows.push(self.model.forward_decode(&tokens, &mut caches)?);
            }
            while live.len() < self.max_batch {
                let Some((pi, si)) = waiting.pop_front() else { break };
                let prompt = &prompts[pi];
                let mut cache = self.model.new_cache_with(prompt.len() + params.max_new_tokens)?;
                rows.push(self.model.forward_cached_on_device(prompt, &mut cache)?);
                stats.prompt_tokens += prompt.len();
                live.push(Seq {
                    prompt: pi,
                    sample: si,
                    cache,
                    tokens: Vec::new(),
                    logprobs: Vec::new(),
                    rng: SeqRng::for_sequence(params.seed, pi as u64, si as u64),
                    detok: Detokenizer::default(),
                    text: String::new(),
                });
            }
            let logits = match rows.len() {
                1 => rows.pop().ok_or_else(|| Error::Invalid("no logits".into()))?,
                _ => {
                    let mut all = gpu.zeros::<f32>(live.len() * v).map_err(device)?;
                    let mut at = 0;
                    for r in &rows {
                        gpu.copy_into(&mut all, at, r).map_err(device)?;
                        at += r.len();
                    }
                    all
                }
            };
            gpu.synchronize().map_err(device)?;
            stats.forward_s += t0.elapsed().as_secs_f64();

            // One uniform per row from the sequence's own stream (greedy
            // draws none, as on the CPU), then one launch for every row.
            let t1 = Instant::now();
            let u: Vec<f64> = live
                .iter_mut()
                .map(|s| if greedy { 0.0 } else { s.rng.uniform() })
                .collect();
            let drawn = sample_f32(gpu, &logits, live.len(), v, &u, &sp).map_err(device)?;
            for (s, d) in live.iter_mut().zip(&drawn) {
                s.tokens.push(d.token);
                s.logprobs.push(d.logprob);
            }
            stats.sample_s += t1.elapsed().as_secs_f64();
            stats.generated_tokens += live.len();

            // Stop rules; finished sequences leave and free their caches.
            let t2 = Instant::now();
            let mut keep = Vec::with_capacity(live.len());
            for mut s in live.drain(..) {
                match stop_rule(self.tokenizer, &eos, params, &s.tokens, &mut s.detok, &mut s.text)? {
                    Some(r) => {
                        let text = completion_text(self.tokenizer, r, &s.tokens, s.text)?;
                        done.push(Completion {
                            prompt_index: s.prompt,
                            sample_index: s.sample,
                            token_ids: s.tokens,
                            text,
                            logprobs: s.logprobs,
                            finish_reason: r,
                        });
                    }
                    None => keep.push(s),
                }
            }
            live = keep;
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
