//! aha-grpo: the math at the heart of DeepSeek-R1's training.
//!
//! - [`compute_advantages`]: rewards -> advantages relative to each prompt's
//!   group of completions (GRPO's group std, batch std, Dr. GRPO's none, RLOO,
//!   REINFORCE++-baseline), skipping unscorable (NaN) rewards.
//! - [`grpo_loss`]: the clipped surrogate with clip-higher, two-sided
//!   clipping, token or sequence (GSPO) ratios, the KL penalty (k1/k2/k3),
//!   entropy bonus and top-entropy masking, aggregated as grpo, bnpo, dr_grpo,
//!   dapo or cispo; with d loss / d log-prob for every token.
//! - [`metrics`]: the numbers TRL logs, under TRL's names.
//! - [`gpu`]: advantages and the loss on the device (kernels/grpo.cu), the
//!   gradients left there for the model's backward; the functions above are
//!   its CPU twins.
//!
//! Conventions follow TRL's `GRPOTrainer` (checked against its own outputs in
//! `tests/trl_fixture.rs`).
//!
//! ```
//! use aha_grpo::{compute_advantages, grpo_loss, AdvantageEstimator, LossConfig, LossInputs};
//!
//! // Two prompts, two completions each, three completion tokens at most.
//! let adv = compute_advantages(&[1.0, 0.0, 0.5, 0.5], 2, AdvantageEstimator::Group)?;
//! assert!(adv.values[0] > 0.0 && adv.values[1] < 0.0 && adv.values[2] == 0.0);
//! let logp = [-1.0, -2.0, -0.5, -1.5, -0.1, 0.0, -0.3, -0.3, -0.3, -2.0, -1.0, -1.0];
//! let mask = [true, true, true, true, true, false, true, true, true, true, true, true];
//! let cfg = LossConfig { beta: 0.0, ..LossConfig::default() };
//! let out = grpo_loss(
//!     &LossInputs {
//!         batch: 4,
//!         seq: 3,
//!         logp: &logp,
//!         old_logp: None,
//!         ref_logp: None,
//!         mask: &mask,
//!         advantages: &adv.values,
//!         entropy: None,
//!         num_items_in_batch: None,
//!     },
//!     &cfg,
//! )?;
//! // On-policy, the loss is minus the mean advantage and the gradient pushes
//! // the good completion's tokens up (negative d loss / d logp).
//! assert!(out.dlogp[0] < 0.0 && out.dlogp[3] > 0.0);
//! # Ok::<(), aha_grpo::Error>(())
//! ```

mod advantages;
mod error;
pub mod gpu;
mod loss;
pub mod metrics;
mod tensor;

pub use advantages::{compute_advantages, AdvantageEstimator, Advantages, STD_EPS};
pub use error::{Error, Result};
pub use loss::{grpo_loss, ImportanceSampling, KlEstimator, LossConfig, LossInputs, LossOutput, LossType};
pub use metrics::Metrics;
pub use tensor::{grpo_loss_on, TensorLossInputs, TensorLossOutput};
