//! The rollout engine on a GPU: [`GpuEngine::generate`] has the contract of
//! [`Engine::generate`](crate::Engine::generate) (the same parameters,
//! per-sequence seeded streams, stop rules, log-probs and
//! [`Completion`]s) and keeps the model, the KV cache and the sampling on
//! the device.
//!
//! Continuous batching over a paged KV cache in device memory
//! ([`GpuPagedKvCache`](aha_moe_model::gpu::GpuPagedKvCache): one block
//! pool per layer, block tables, reference counts, copy-on-write). Each step runs one ragged batch through
//! [`GpuModel::forward_paged`]: one new token of every live sequence, the
//! recomputation of sequences coming back from preemption, and the prefill
//! of newly admitted prompts; then one `sample_f32` launch over the
//! `[B, V]` logits (temperature, top-k, top-p, min-p, with one uniform per
//! row from the sequence's own stream), so only the sampled ids and their
//! log-probs come back to the host.
//!
//! - **Pool**: `min(EngineConfig::kv_blocks, the request's worst case)`
//!   blocks of `EngineConfig::block_size` positions (the worst case: every
//!   prompt's blocks once plus each sample's private tail to
//!   `max_new_tokens`, so a pool of that size never preempts). Keys and
//!   values in `EngineConfig::kv_dtype`: bf16 (default; attention by the
//!   paged flash-decoding kernels) or f32 (exact; the f32 decode kernel
//!   over gathered blocks).
//! - **Kept across calls** ([`EngineCache`]): the pool and the decode
//!   graphs captured against it stay from one `generate` call to the next.
//!   Each call starts with every block free. The pool is kept while the
//!   model's device and config, the block size and the dtype are the same
//!   and it is large enough (a larger one replaces it, with a quarter more
//!   than asked, so that requests of varying size settle on one pool). The
//!   graphs are kept while the pool is, the sampling parameters baked into
//!   them (temperature, top-k, top-p, min-p) are the same, and the model's
//!   weights are at the addresses they were captured over
//!   ([`GpuModel::identity`](aha_moe_model::gpu::GpuModel::identity)):
//!   weights the optimizer updates in place are what the next replay
//!   reads; weights reallocated (`set_params`) make the graphs captured
//!   again. [`EngineCache::release`] frees it all.
//! - **Admission by free blocks**: a prompt joins when batch slots allow
//!   and the pool has free blocks for its prompt (its samples then grow
//!   block by block); nothing is reserved for the future.
//! - **Preemption by recomputation**: when a live sequence needs a block
//!   and none is free, the most recently admitted sequence is preempted:
//!   its blocks are released and it waits at the front of the queue with
//!   its tokens; when it returns, prompt + tokens are prefilled again (its
//!   stream and tokens are kept, so the completion is the one it would have
//!   had). The oldest live sequence is never preempted while others are
//!   live, so every step makes progress. No prompt is admitted in a step
//!   that preempted.
//! - **Prefix sharing**: the G samples of a prompt admitted together share
//!   every block of its prefill (one prefill, reference counts); a sample
//!   about to write into a shared partial block copies it first
//!   (copy-on-write; the last holder writes in place). A sequence coming
//!   back from preemption shares its prompt's full blocks again with a
//!   live sample of the same prompt, where there is one, and recomputes
//!   only the positions after them.
//!
//! - **MLA**: DeepSeek-V3-style models cache the compressed latent and the
//!   rotary key (weight-absorbed attention) where the widths fit the
//!   kernels, else the expanded keys and values (see
//!   [`GpuPagedKvCache`](aha_moe_model::gpu::GpuPagedKvCache)).
//!
//! - **CUDA graphs**: a step where every live sequence decodes one token
//!   replays the graph of its (batch, table width) bucket, captured the
//!   second time the bucket is seen (`EngineConfig::cuda_graphs`; bf16
//!   caches only).

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::time::Instant;

use aha_cuda_kernels::cudarc::driver::CudaSlice;

use aha_cuda_kernels::launch::{embedding_forward_f32, sample_f32, SampleParams, SampledToken, TokenIds};
use aha_moe_model::gpu::{DecodeGraph, GpuModel, GpuPagedKvCache, KvDtype};
use aha_moe_model::{ModelConfig, SeqSpan};
use tokenizers::Tokenizer;

use crate::engine::{check_request, EngineConfig};
use crate::error::{Error, Result};
use crate::sampling::{SamplingParams, SeqRng};
use crate::stop::{check_config, engine_eos, Output, StopRules};
use crate::{Completion, GenerateStats, Progress};

struct Seq {
    /// Block table (empty while preempted).
    table: Vec<u32>,
    /// Positions in the cache.
    len: usize,
    out: Output,
    rng: SeqRng,
}

/// A queue entry: samples of a prompt not started yet, or a preempted
/// sequence.
enum Waiting {
    Fresh { prompt: usize, samples: Range<usize> },
    Resume(Box<Seq>),
}

/// Generates completions with a model on a GPU (see the module docs).
pub struct GpuEngine<'a> {
    model: &'a GpuModel,
    tokenizer: Option<&'a Tokenizer>,
    cfg: EngineConfig,
    eos: Vec<u32>,
    /// The pool and the decode graphs kept between calls: the engine's
    /// own, or a caller's that outlives the engine.
    cache: RefCell<CacheSlot<'a>>,
}

enum CacheSlot<'a> {
    Owned(Box<EngineCache>),
    Borrowed(&'a mut EngineCache),
}

impl CacheSlot<'_> {
    fn get(&mut self) -> &mut EngineCache {
        match self {
            CacheSlot::Owned(c) => c,
            CacheSlot::Borrowed(c) => c,
        }
    }
}

/// What the GPU engine keeps from one `generate` call to the next: the
/// device KV pool and the decode graphs captured against it (by bucket),
/// with the buckets seen so far. Owned by a [`GpuEngine`], or by a caller
/// that makes an engine per call over a model it updates in between (the
/// trainer: [`GpuEngine::with_cache`], [`crate::Sampler::with_cache`]).
/// Holds no borrow of the model: what it was built for is checked at every
/// call, and what no longer fits is dropped and built again (see the
/// module docs). The CPU engine keeps nothing.
#[derive(Default)]
pub struct EngineCache {
    kept: Option<Kept>,
}

impl std::fmt::Debug for EngineCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kept {
            Some(k) => write!(f, "EngineCache({:?}, {} graphs)", k.cache, k.graphs.len()),
            None => f.write_str("EngineCache(empty)"),
        }
    }
}

impl EngineCache {
    /// An empty cache (the first call allocates).
    pub fn new() -> EngineCache {
        EngineCache::default()
    }

    /// Frees the pool's device memory and the graphs (their scratch and
    /// staging); the next call allocates and captures again.
    pub fn release(&mut self) {
        self.kept = None;
    }

    /// Device bytes of the kept pool (0 when none is kept).
    pub fn bytes(&self) -> usize {
        self.kept.as_ref().map_or(0, |k| k.cache.bytes())
    }

    /// Blocks of the kept pool, pad blocks included (0 when none is kept).
    pub fn blocks(&self) -> usize {
        self.kept.as_ref().map_or(0, |k| k.cache.num_blocks())
    }

    /// Decode graphs kept.
    pub fn graphs(&self) -> usize {
        self.kept.as_ref().map_or(0, |k| k.graphs.len())
    }
}

/// The kept pool, and the graphs over it.
struct Kept {
    /// What the pool was shaped for: the model's device and config, the
    /// block size and dtype.
    ordinal: usize,
    config: ModelConfig,
    block_size: usize,
    dtype: KvDtype,
    cache: GpuPagedKvCache,
    /// Captured decode graphs by (rows, table width) bucket; all for
    /// `params` and the model's weights at their addresses then.
    graphs: HashMap<(usize, usize), DecodeGraph>,
    /// Decode steps seen per bucket (a bucket is captured when seen again).
    seen: HashMap<(usize, usize), usize>,
    params: Option<SampleParams>,
    /// A capture failed: decode steps run eagerly until the pool is rebuilt.
    no_graphs: bool,
}

impl Kept {
    /// Drops the graphs and bucket counts unless they replay `model` with
    /// `sp` against this pool.
    fn keep_graphs_for(&mut self, model: &GpuModel, sp: &SampleParams) {
        let cache = &self.cache;
        let valid = self.params == Some(*sp) && self.graphs.values().all(|g| g.replays(model, cache, sp));
        if !valid {
            self.graphs.clear();
            self.seen.clear();
            self.params = Some(*sp);
        }
    }
}

fn device(e: aha_cuda_kernels::Error) -> Error {
    Error::Model(aha_moe_model::Error::Tensor(aha_tensor::Error::from(e)))
}

impl<'a> GpuEngine<'a> {
    /// An engine over `model` with `cfg`'s batch, block size, pool bound
    /// and key/value dtype; `tokenizer` enables text and stop strings.
    /// End-of-sequence ids come from the model config plus `extra_eos`.
    pub fn new(
        model: &'a GpuModel,
        tokenizer: Option<&'a Tokenizer>,
        cfg: EngineConfig,
        extra_eos: &[u32],
    ) -> Result<GpuEngine<'a>> {
        check_config(&cfg)?;
        let eos = engine_eos(&model.config.eos_token_ids, extra_eos);
        Ok(GpuEngine {
            model,
            tokenizer,
            cfg,
            eos,
            cache: RefCell::new(CacheSlot::Owned(Box::default())),
        })
    }

    /// [`GpuEngine::new`] keeping its pool and graphs in `cache`, which
    /// outlives the engine: an engine made for each call over a model
    /// updated in between reuses what the previous one left (the trainer
    /// makes one per rollout).
    pub fn with_cache(
        model: &'a GpuModel,
        tokenizer: Option<&'a Tokenizer>,
        cfg: EngineConfig,
        extra_eos: &[u32],
        cache: &'a mut EngineCache,
    ) -> Result<GpuEngine<'a>> {
        let mut e = GpuEngine::new(model, tokenizer, cfg, extra_eos)?;
        e.cache = RefCell::new(CacheSlot::Borrowed(cache));
        Ok(e)
    }

    /// Frees the kept pool and graphs now (see [`EngineCache::release`]),
    /// e.g. before a training step that needs the memory.
    pub fn release_cache(&self) {
        self.cache.borrow_mut().get().release();
    }

    /// Device bytes of the kept pool (see [`EngineCache::bytes`]).
    pub fn cache_bytes(&self) -> usize {
        self.cache.borrow_mut().get().bytes()
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

    /// The pool's size for a request: the fewer of `kv_blocks` and the
    /// blocks that let every sequence of it run at once to its last token.
    fn pool_blocks(&self, prompts: &[Vec<u32>], n: usize, max_new: usize) -> usize {
        let bs = self.cfg.block_size;
        let worst: usize = prompts
            .iter()
            .map(|p| p.len().div_ceil(bs) + n * ((p.len() + max_new).div_ceil(bs) - p.len() / bs))
            .sum();
        worst.clamp(1, self.cfg.kv_blocks)
    }

    /// The kept pool for a call that needs `need` blocks besides `pad_n`
    /// pad blocks, emptied, with its graphs if they still replay with
    /// `sp` over the model's weights. A pool is kept while the model's
    /// device and config, the block size and dtype are the same and it
    /// holds `need + pad_n` blocks within `kv_blocks + pad_n`; otherwise a
    /// new one is allocated (`stats.pools_allocated`), of `need` blocks,
    /// or of `need` and a quarter (within `kv_blocks`) when it replaces a
    /// kept pool that was too small, so that requests varying in size do
    /// not reallocate at every call.
    fn kept_pool<'c>(
        &self,
        slot: &'c mut EngineCache,
        need: usize,
        pad_n: usize,
        sp: &SampleParams,
        stats: &mut GenerateStats,
    ) -> Result<&'c mut Kept> {
        let (bs, dtype) = (self.cfg.block_size, self.cfg.kv_dtype);
        let ordinal = self.model.gpu().ordinal();
        let same_shape =
            |k: &Kept| k.ordinal == ordinal && k.config == self.model.config && k.block_size == bs && k.dtype == dtype;
        let mut blocks = need;
        if let Some(k) = &slot.kept {
            let total = k.cache.num_blocks();
            if same_shape(k) && total >= need + pad_n && total <= self.cfg.kv_blocks + pad_n {
                // Reused below.
            } else {
                if same_shape(k) && total < need + pad_n {
                    blocks = (need + need / 4).min(self.cfg.kv_blocks);
                }
                // Frees the old pool before the new one is allocated.
                slot.kept = None;
            }
        }
        let kept = match &mut slot.kept {
            Some(k) => k,
            empty => {
                let cache = self.model.new_paged_cache(bs, blocks + pad_n, dtype).map_err(|e| {
                    Error::Invalid(format!(
                        "the KV-cache pool of {blocks} blocks of {bs} positions ({dtype:?}): {e} (lower kv_blocks)"
                    ))
                })?;
                stats.pools_allocated += 1;
                empty.insert(Kept {
                    ordinal,
                    config: self.model.config.clone(),
                    block_size: bs,
                    dtype,
                    cache,
                    graphs: HashMap::new(),
                    seen: HashMap::new(),
                    params: None,
                    no_graphs: false,
                })
            }
        };
        kept.cache.reset();
        kept.keep_graphs_for(self.model, sp);
        Ok(kept)
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
            self.cfg.max_batch,
            self.tokenizer.is_some(),
            cfg.max_position_embeddings,
        )?;
        let need = self.pool_blocks(prompts, n, params.max_new_tokens);
        let (bs, dtype) = (self.cfg.block_size, self.cfg.kv_dtype);
        // Decode graphs pad a batch to its bucket (a power of two) with
        // rows over blocks of their own, outside the request's.
        let graphs_wanted = self.cfg.cuda_graphs && dtype == KvDtype::Bf16;
        let max_rows = self.cfg.max_batch.next_power_of_two();
        let pad_n = if graphs_wanted { max_rows.div_ceil(bs) } else { 0 };
        let rules = StopRules::new(self.tokenizer, &self.eos, params);
        let greedy = params.greedy || params.temperature == 0.0;
        let sp = SampleParams {
            temperature: if greedy { 0.0 } else { params.temperature },
            top_k: params.top_k,
            top_p: params.top_p,
            min_p: params.min_p,
        };
        let mut stats = GenerateStats::default();
        let mut slot = self.cache.borrow_mut();
        let kept = self.kept_pool(slot.get(), need, pad_n, &sp, &mut stats)?;
        let Kept {
            cache,
            graphs,
            seen: seen_buckets,
            no_graphs,
            ..
        } = kept;
        let mut graphs_on = graphs_wanted && !*no_graphs;
        let blocks = cache.num_blocks() - pad_n;
        let mut pad = Vec::with_capacity(pad_n);
        for _ in 0..pad_n {
            pad.push(cache.alloc()?);
        }
        // One sequence alone must fit the pool, so that the oldest live
        // sequence can always grow.
        for (i, p) in prompts.iter().enumerate() {
            let need = cache.blocks_for(p.len() + params.max_new_tokens);
            if need > blocks {
                return Err(Error::Invalid(format!(
                    "prompt {i} needs {need} cache blocks for {} + {} tokens, the pool has {blocks} (kv_blocks)",
                    p.len(),
                    params.max_new_tokens,
                )));
            }
        }
        let t_all = Instant::now();
        let mut waiting: VecDeque<Waiting> = (0..prompts.len())
            .map(|p| Waiting::Fresh {
                prompt: p,
                samples: 0..n,
            })
            .collect();
        let mut live: Vec<Seq> = Vec::new();
        let mut done: Vec<Completion> = Vec::with_capacity(prompts.len() * n);

        while !waiting.is_empty() || !live.is_empty() {
            stats.steps += 1;
            // Room for each live sequence's next position: a new block, or
            // a private copy of a shared last block; when the pool is full
            // the newest sequence is preempted (perhaps the one asking).
            let mut preempted = false;
            let mut i = 0;
            while i < live.len() {
                let s = &live[i];
                let grow = cache.blocks_for(s.len + 1) > s.table.len();
                let shared = !grow && s.table.last().is_some_and(|&b| cache.is_shared(b));
                if !grow && !shared {
                    i += 1;
                    continue;
                }
                if cache.free_blocks() == 0 {
                    if live.len() == 1 {
                        return Err(Error::Invalid("the KV-cache pool cannot hold one sequence".into()));
                    }
                    if let Some(mut victim) = live.pop() {
                        cache.release(&victim.table);
                        victim.table.clear();
                        victim.len = 0;
                        waiting.push_front(Waiting::Resume(Box::new(victim)));
                        stats.preemptions += 1;
                        preempted = true;
                    }
                    continue;
                }
                let s = &mut live[i];
                if grow {
                    s.table.push(cache.alloc()?);
                } else if let Some(last) = s.table.last_mut() {
                    let copy = cache.copy_block(*last)?;
                    cache.release(&[*last]);
                    *last = copy;
                }
                i += 1;
            }

            // Admission by batch slots and free blocks: preempted sequences
            // first (prompt + tokens recomputed), then new prompts (one
            // prefill for the samples admitted together).
            let mut resumed: Vec<Seq> = Vec::new();
            let mut fresh: Vec<(usize, Range<usize>, Vec<u32>)> = Vec::new();
            let mut slots = self.cfg.max_batch - live.len();
            while !preempted && slots > 0 {
                let Some(w) = waiting.pop_front() else { break };
                match w {
                    Waiting::Resume(mut s) => {
                        let plen = prompts[s.out.prompt].len();
                        let total = plen + s.out.tokens.len();
                        // The prompt's full blocks, from a live sample of
                        // the same prompt (never written after its prefill).
                        let full = plen / bs;
                        let donor: Vec<u32> = live
                            .iter()
                            .find(|o| o.out.prompt == s.out.prompt && o.table.len() >= full)
                            .map(|o| o.table[..full].to_vec())
                            .unwrap_or_default();
                        let need = cache.blocks_for(total) - donor.len();
                        if need > cache.free_blocks() {
                            waiting.push_front(Waiting::Resume(s));
                            break;
                        }
                        cache.share(&donor);
                        s.len = donor.len() * bs;
                        s.table = donor;
                        for _ in 0..need {
                            s.table.push(cache.alloc()?);
                        }
                        stats.reshared_tokens += s.len;
                        stats.recomputed_tokens += total - s.len;
                        resumed.push(*s);
                        slots -= 1;
                    }
                    Waiting::Fresh { prompt, samples } => {
                        let plen = prompts[prompt].len();
                        let need = cache.blocks_for(plen);
                        if need > cache.free_blocks() {
                            waiting.push_front(Waiting::Fresh { prompt, samples });
                            break;
                        }
                        let k = samples.len().min(slots);
                        let mut table = Vec::with_capacity(need);
                        for _ in 0..need {
                            table.push(cache.alloc()?);
                        }
                        let (now, rest) = (samples.start..samples.start + k, samples.start + k..samples.end);
                        if !rest.is_empty() {
                            waiting.push_front(Waiting::Fresh { prompt, samples: rest });
                        }
                        stats.prompt_tokens += plen;
                        fresh.push((prompt, now, table));
                        slots -= k;
                    }
                }
            }

            // A step where every sequence decodes one token replays its
            // bucket's graph (captured on first use); any other step, or a
            // bucket whose capture failed, runs eagerly.
            let mut drawn = None;
            if graphs_on && resumed.is_empty() && fresh.is_empty() && !live.is_empty() {
                let rows = live.len().next_power_of_two();
                let width = live
                    .iter()
                    .map(|s| cache.blocks_for(s.len + 1))
                    .max()
                    .unwrap_or(1)
                    .next_power_of_two();
                let key = (rows, width);
                // A bucket's first step runs eagerly: only a bucket seen
                // again is captured (a capture costs about an eager step).
                let seen = seen_buckets.entry(key).or_insert(0);
                *seen += 1;
                if *seen >= 2 && !graphs.contains_key(&key) {
                    match self.model.capture_decode(cache, rows, width, &sp, &pad) {
                        Ok(g) => {
                            graphs.insert(key, g);
                            stats.graphs_captured += 1;
                        }
                        Err(err) => {
                            eprintln!("aha: decode steps run without CUDA graphs: {err}");
                            graphs_on = false;
                            *no_graphs = true;
                        }
                    }
                }
                if let Some(g) = graphs.get_mut(&key) {
                    let t0 = Instant::now();
                    let tokens: Vec<u32> = live.iter().map(|s| s.out.tokens.last().copied().unwrap_or(0)).collect();
                    let u: Vec<f64> = live
                        .iter_mut()
                        .map(|s| if greedy { 0.0 } else { s.rng.uniform() })
                        .collect();
                    let spans: Vec<SeqSpan<'_>> = live
                        .iter()
                        .map(|s| SeqSpan {
                            table: &s.table,
                            start: s.len,
                            len: 1,
                        })
                        .collect();
                    drawn = Some(g.run(self.model, &tokens, &spans, &u, cache, &pad)?);
                    drop(spans);
                    for s in live.iter_mut() {
                        s.len += 1;
                    }
                    stats.graph_steps += 1;
                    stats.forward_s += t0.elapsed().as_secs_f64();
                }
            }
            let drawn = match drawn {
                Some(d) => d,
                None => self.eager_step(
                    prompts, params, greedy, &sp, cache, &mut live, resumed, fresh, &mut stats,
                )?,
            };
            stats.peak_blocks = cache.peak_blocks() - pad_n;
            for (s, d) in live.iter_mut().zip(&drawn) {
                s.out.push(d.token, d.logprob);
            }
            stats.generated_tokens += live.len();

            // Stop rules; finished sequences leave and free their blocks.
            let t2 = Instant::now();
            rules.retire(&mut live, &mut done, |s| &mut s.out, |s| cache.release(&s.table))?;
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

    /// One eager step: a ragged batch of every live sequence's next token,
    /// the recomputations of `resumed` and the prefills of `fresh` (whose
    /// samples join `live`), then one sampled token per live sequence.
    #[allow(clippy::too_many_arguments)]
    fn eager_step(
        &self,
        prompts: &[Vec<u32>],
        params: &SamplingParams,
        greedy: bool,
        sp: &SampleParams,
        cache: &mut GpuPagedKvCache,
        live: &mut Vec<Seq>,
        mut resumed: Vec<Seq>,
        fresh: Vec<(usize, Range<usize>, Vec<u32>)>,
        stats: &mut GenerateStats,
    ) -> Result<Vec<SampledToken>> {
        let t0 = Instant::now();
        let v = self.model.config.vocab_size;
        let gpu = self.model.gpu();
        // One ragged batch: a token of every live sequence, then the
        // recomputations, then the prefills.
        let mut tokens: Vec<u32> = live.iter().map(|s| s.out.tokens.last().copied().unwrap_or(0)).collect();
        for s in &resumed {
            tokens.extend(prompts[s.out.prompt].iter().chain(&s.out.tokens).skip(s.len));
        }
        for (p, _, _) in &fresh {
            tokens.extend_from_slice(&prompts[*p]);
        }
        let mut spans: Vec<SeqSpan<'_>> = live
            .iter()
            .map(|s| SeqSpan {
                table: &s.table,
                start: s.len,
                len: 1,
            })
            .collect();
        spans.extend(resumed.iter().map(|s| SeqSpan {
            table: &s.table,
            start: s.len,
            len: prompts[s.out.prompt].len() + s.out.tokens.len() - s.len,
        }));
        spans.extend(fresh.iter().map(|(p, _, table)| SeqSpan {
            table,
            start: 0,
            len: prompts[*p].len(),
        }));
        let logits = self.model.forward_paged(&tokens, &spans, cache)?;
        drop(spans);
        for s in live.iter_mut() {
            s.len += 1;
        }
        for s in resumed.iter_mut() {
            s.len = prompts[s.out.prompt].len() + s.out.tokens.len();
        }
        // The samples of a prefilled prompt share its blocks; the
        // prompt's own reference goes.
        let mut rows: Vec<u32> = (0..(live.len() + resumed.len()) as u32).collect();
        let mut started: Vec<Seq> = Vec::new();
        for (j, (p, samples, table)) in fresh.into_iter().enumerate() {
            let row = (live.len() + resumed.len() + j) as u32;
            for si in samples {
                cache.share(&table);
                rows.push(row);
                started.push(Seq {
                    table: table.clone(),
                    len: prompts[p].len(),
                    out: Output::new(p, si),
                    rng: SeqRng::for_sequence(params.seed, params.prompt_offset.wrapping_add(p as u64), si as u64),
                });
            }
            cache.release(&table);
        }
        live.append(&mut resumed);
        live.append(&mut started);
        let logits = self.rows(logits, &rows)?;
        gpu.synchronize().map_err(device)?;
        stats.forward_s += t0.elapsed().as_secs_f64();

        // One uniform per row from the sequence's own stream (greedy
        // draws none, as on the CPU), then one launch for every row.
        let t1 = Instant::now();
        let u: Vec<f64> = live
            .iter_mut()
            .map(|s| if greedy { 0.0 } else { s.rng.uniform() })
            .collect();
        let drawn = sample_f32(gpu, &logits, live.len(), v, &u, sp).map_err(device)?;
        stats.sample_s += t1.elapsed().as_secs_f64();
        Ok(drawn)
    }

    /// Rows `rows` of `logits [*, V]` as a new `[rows, V]` buffer (one row
    /// gather); `logits` itself when `rows` is `0, 1, 2, ..` of all of it.
    fn rows(&self, logits: CudaSlice<f32>, rows: &[u32]) -> Result<CudaSlice<f32>> {
        let v = self.model.config.vocab_size;
        let have = logits.len() / v;
        if rows.len() == have && rows.iter().enumerate().all(|(i, &r)| r as usize == i) {
            return Ok(logits);
        }
        let gpu = self.model.gpu();
        let mut out = gpu.zeros::<f32>(rows.len() * v).map_err(device)?;
        embedding_forward_f32(gpu, &mut out, &logits, TokenIds::Host(rows), rows.len(), have, v).map_err(device)?;
        Ok(out)
    }
}
