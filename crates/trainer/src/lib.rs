//! aha-trainer: the layer that composes the model, the sampler, the rewards
//! and the GRPO math into training runs.
//!
//! Built so far: the optimizer (AdamW with warmup and cosine/constant
//! schedules, clipping, a non-finite guard), supervised steps on completion
//! tokens, the GRPO step, the toy task with its tokenizer, held-out
//! evaluation, PNG plots, one run driver (`driver`: run folder,
//! checkpoints and exact resume, reference reset, non-finite guard) under
//! `aha demo`, `aha grpo` and the pipeline, the `aha demo` run (R1-Zero at
//! toy scale), and
//! the reward layer of `aha grpo` with every reward kind, a scalar reward
//! model among them ([`reward_model`]).

pub mod checkpoint;
pub mod data;
pub mod demo;
pub mod dist;
pub mod dp;
pub mod driver;
mod error;
pub mod eval;
pub mod grpo_run;
pub mod optim;
pub mod pipeline;
pub mod plot;
pub mod reward_model;
pub mod rewards;
pub mod rl;
pub mod rng;
pub mod run_folder;
pub mod sft_run;
pub mod template;
pub mod tensorboard;
pub mod toy;

pub use demo::{run_demo, run_demo_with, DemoConfig, DemoSummary, RunOptions};
pub use error::{Error, Result};
