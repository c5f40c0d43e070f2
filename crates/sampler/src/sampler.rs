//! [`Sampler`]: generation from a [`Policy`] on whatever device it lives
//! on, the CPU [`Engine`] or the [`GpuEngine`], over the policy's own
//! weights (no host copy on a GPU, so a rollout after an optimizer step
//! samples from the updated weights without any synchronisation step).

use aha_moe_model::{Policy, PolicyModel};
use tokenizers::Tokenizer;

use crate::engine::{Completion, Engine, EngineConfig, GenerateStats, Progress};
use crate::error::Result;
use crate::gpu_engine::{EngineCache, GpuEngine};
use crate::sampling::SamplingParams;

/// The engine for a policy's device (see the module docs).
pub enum Sampler<'a> {
    /// The CPU engine (continuous batching over a paged cache).
    Cpu(Engine<'a>),
    /// The GPU engine (continuous batching over a paged cache in device
    /// memory, sampling on the device).
    Gpu(GpuEngine<'a>),
}

impl<'a> Sampler<'a> {
    /// The engine for `policy`'s device; `tokenizer` enables text and stop
    /// strings; end-of-sequence ids come from the model config plus
    /// `extra_eos`. Both engines take `cfg`; `cfg.kv_dtype` applies on a
    /// GPU only.
    pub fn new(
        policy: &'a Policy,
        tokenizer: Option<&'a Tokenizer>,
        cfg: EngineConfig,
        extra_eos: &[u32],
    ) -> Result<Sampler<'a>> {
        Sampler::for_model(policy.model(), tokenizer, cfg, extra_eos)
    }

    /// [`Sampler::new`] from a policy's model.
    pub fn for_model(
        model: PolicyModel<'a>,
        tokenizer: Option<&'a Tokenizer>,
        cfg: EngineConfig,
        extra_eos: &[u32],
    ) -> Result<Sampler<'a>> {
        Ok(match model {
            PolicyModel::Cpu(m) => Sampler::Cpu(Engine::new(m, tokenizer, cfg, extra_eos)?),
            PolicyModel::Gpu(g) => Sampler::Gpu(GpuEngine::new(g, tokenizer, cfg, extra_eos)?),
        })
    }

    /// [`Sampler::new`] keeping the GPU engine's KV pool and decode graphs
    /// in `cache`, which outlives the sampler: the next sampler over the
    /// same policy (after an optimizer step, say) reuses them (see
    /// [`EngineCache`]). The CPU engine keeps nothing in it.
    pub fn with_cache(
        policy: &'a Policy,
        tokenizer: Option<&'a Tokenizer>,
        cfg: EngineConfig,
        extra_eos: &[u32],
        cache: &'a mut EngineCache,
    ) -> Result<Sampler<'a>> {
        Ok(match policy.model() {
            PolicyModel::Cpu(m) => Sampler::Cpu(Engine::new(m, tokenizer, cfg, extra_eos)?),
            PolicyModel::Gpu(g) => Sampler::Gpu(GpuEngine::with_cache(g, tokenizer, cfg, extra_eos, cache)?),
        })
    }

    /// Frees the GPU engine's kept pool and graphs (nothing on the CPU).
    pub fn release_cache(&self) {
        if let Sampler::Gpu(e) = self {
            e.release_cache();
        }
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

    /// [`Sampler::generate`], calling `progress` after every engine step.
    pub fn generate_with_progress(
        &self,
        prompts: &[Vec<u32>],
        n: usize,
        params: &SamplingParams,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<(Vec<Completion>, GenerateStats)> {
        match self {
            Sampler::Cpu(e) => e.generate_with_progress(prompts, n, params, progress),
            Sampler::Gpu(e) => e.generate_with_progress(prompts, n, params, progress),
        }
    }
}
