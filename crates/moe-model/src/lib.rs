//! aha-moe-model: Hugging Face Llama, Qwen2, Qwen3, Qwen3-MoE and DeepSeek-V3
//! models with hand-written forward and backward passes over one flat
//! parameter buffer, loaded from and saved to HF safetensors folders.
//!
//! ```no_run
//! use aha_moe_model::Model;
//!
//! let model = Model::load(std::path::Path::new("path/to/hf-model"))?;
//! let ids = [1u32, 2, 3, 4];
//! let mut grads = vec![0f32; model.params.len()];
//! let loss = model.next_token_loss(&ids, 1, 4, &mut grads)?;
//! println!("loss {loss}");
//! # Ok::<(), aha_moe_model::Error>(())
//! ```

mod attn;
pub mod config;
mod error;
mod ffn;
pub mod gpu;
mod linear;
pub mod lora;
pub mod memory;
mod model;
#[cfg(test)]
mod moe_twin_tests;
pub mod offload;
pub mod paged;
pub mod params;
pub mod plan;
pub mod policy;
pub mod reward_model;
pub mod rope;
pub mod save;
pub mod st;

pub use config::{Arch, Fp8Blocks, MlaConfig, ModelConfig, MoeConfig, Router};
pub use error::{Error, Result};
pub use gpu::{GradHook, GradReady};
pub use lora::LoraConfig;
pub use model::{Activations, KvCache, Model};
pub use offload::{OffloadConfig, OffloadTiming};
pub use paged::{PagedKvCache, SeqSpan};
pub use params::{Layout, ParamEntry, Slot};
pub use policy::{resolve_device, Forward, Moments, Policy, PolicyModel, Precision, Scores};
pub use reward_model::RewardModel;
pub use rope::RopeScaling;
pub use save::{SaveDtype, SaveOptions};
