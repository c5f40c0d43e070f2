//! The commands of `aha`, one module each: its `#[derive(Args)]` struct and
//! its `run`. Option groups that several commands share, and the one way a
//! flag overrides a TOML config key, are in [`options`].

pub mod bench;
pub mod demo;
pub mod distill;
pub mod eval;
pub mod generate;
pub mod grpo;
pub mod info;
pub mod launch;
pub mod logprobs;
pub mod merge_lora;
pub mod nccl_check;
pub mod options;
pub mod pipeline;
pub mod plan;
pub mod progress;
pub mod rejection_sample;
pub mod rewards;
pub mod sft;
