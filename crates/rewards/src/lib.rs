//! aha-rewards: DeepSeek-R1's rule-based rewards.
//!
//! - [`math`]: final-answer extraction and equivalence (strict boxed mode for
//!   training, lenient mode for evaluation), exact where possible.
//! - [`format`]: R1-Zero's `<think>...</think> <answer>...</answer>` and R1's
//!   `<think>` + summary, and the tag-count shaping reward.
//! - [`language`]: language consistency (share of target-language words in
//!   the chain of thought).
//! - [`countdown`]: TinyZero's countdown task with an exact-arithmetic parser
//!   and a seeded generator.
//! - [`code`]: programs run against test cases in a sandbox (process group,
//!   rlimits, no network, capped output, deadline).
//! - [`external`]: user rewards outside Rust: a JSON-lines scorer process
//!   ([`external::CommandReward`]) or an HTTP endpoint
//!   ([`external::HttpReward`]).
//! - [`length`]: DAPO's soft overlong punishment and the cosine length-scaled
//!   reward.
//!
//! Every reward returns an [`Outcome`]: a score and a [`Status`];
//! [`WeightedSum`] combines several and [`evaluate_batch`] runs a batch on a
//! bounded worker pool with a deadline per item.
//!
//! ```
//! use aha_rewards::math::{verify, Extraction, MathConfig};
//! use aha_rewards::Status;
//!
//! let strict = MathConfig::default();
//! let out = verify("\\frac{1}{2}", "so x = 0.5, i.e. \\boxed{\\dfrac12}", &strict);
//! assert_eq!(out.status, Status::Correct);
//! // Strict mode: without a box there is no answer, whatever numbers appear.
//! let out = verify("42", "the answer is 42", &strict);
//! assert_eq!(out.status, Status::NoAnswer);
//! let lenient = MathConfig { extraction: Extraction::Any, ..MathConfig::default() };
//! assert_eq!(verify("42", "the answer is 42", &lenient).status, Status::Correct);
//! ```

mod batch;
pub mod code;
pub mod countdown;
mod error;
pub mod external;
pub mod format;
pub mod language;
pub mod length;
pub mod math;
mod outcome;

pub use batch::{evaluate_batch, evaluate_weighted, BatchConfig, Item};
pub use error::{Error, Result};
pub use outcome::{combined_metrics, metrics, Combined, Example, Outcome, Reward, RewardMetrics, Status, WeightedSum};
