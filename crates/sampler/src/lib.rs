//! aha-sampler: the rollout engine. Turns prompts x G samples into
//! completions with continuous batching over a paged KV cache, in the same
//! process and on the same weights as the trainer (no weight sync step).
//! [`Sampler`] generates from a `Policy` on its device: the CPU [`Engine`],
//! or the [`GpuEngine`] (the same continuous batching over a paged cache in
//! device memory, with preemption, and sampling on the GPU).
//!
//! ```no_run
//! use aha_moe_model::Model;
//! use aha_sampler::{Engine, EngineConfig, SamplingParams};
//!
//! let model = Model::load(std::path::Path::new("tests/fixtures/models/qwen2-tiny"))?;
//! let tok = aha_sampler::load_tokenizer(std::path::Path::new("tests/fixtures/models/qwen2-tiny"))?;
//! let engine = Engine::new(&model, Some(&tok), EngineConfig::default(), &[])?;
//! let params = SamplingParams { max_new_tokens: 16, seed: 7, ..SamplingParams::default() };
//! let (completions, stats) = engine.generate(&[vec![5, 6, 7]], 4, &params)?;
//! assert_eq!(completions.len(), 4);
//! println!("{} tokens/s", stats.generated_tokens as f64 / stats.total_s);
//! # Ok::<(), aha_sampler::Error>(())
//! ```

pub mod chat;
mod detok;
mod engine;
mod error;
mod gpu_engine;
mod sampler;
pub mod sampling;
mod stop;

pub use aha_moe_model::gpu::KvDtype;
pub use chat::ChatTemplate;
pub use detok::{decode, load_tokenizer, Detokenizer};
pub use engine::{Completion, Engine, EngineConfig, FinishReason, GenerateStats, Progress};
pub use error::{Error, Result};
pub use gpu_engine::{EngineCache, GpuEngine};
pub use sampler::Sampler;
pub use sampling::{
    apply_repetition_penalty, sample, sample_in_context, sample_with_uniform, Sampled, SamplingParams, SeqRng,
};
pub use stop::find_stop;

/// The tokenizer type the engine decodes with (from the `tokenizers` crate).
pub use tokenizers::Tokenizer;
