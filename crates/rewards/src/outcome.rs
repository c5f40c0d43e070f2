//! The reward interface: a typed outcome per completion, weighted sums of
//! several rewards, and per-reward metrics.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::batch::Item;

/// One example's fields (`gold`, `nums`, `target`, `tests`, `language`, ...),
/// as read from a JSONL line.
pub type Example = serde_json::Map<String, serde_json::Value>;

/// How a completion was judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The answer is right (or the format is met).
    Correct,
    /// An answer was found and it is wrong (or the format is not met).
    Wrong,
    /// No answer could be found in the completion.
    NoAnswer,
    /// The reference answer itself cannot be parsed: the completion is
    /// excluded from its group's baseline (its score is NaN).
    UnparsableGold,
    /// The evaluation ran past its deadline (scored 0: an answer that does not
    /// finish is not an answer).
    Timeout,
    /// The evaluation could not run (missing compiler, sandbox failure): never
    /// counted as a wrong answer (its score is NaN).
    InfraError,
}

impl Status {
    /// Whether completions with this status take part in the advantage
    /// baseline. `UnparsableGold` and `InfraError` do not: they say nothing
    /// about the completion.
    pub fn is_scorable(self) -> bool {
        !matches!(self, Status::UnparsableGold | Status::InfraError)
    }

    /// The snake_case name used in JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Correct => "correct",
            Status::Wrong => "wrong",
            Status::NoAnswer => "no_answer",
            Status::UnparsableGold => "unparsable_gold",
            Status::Timeout => "timeout",
            Status::InfraError => "infra_error",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The result of one reward on one completion.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outcome {
    /// The reward. NaN exactly when the status is not scorable
    /// ([`Status::is_scorable`]), which `aha-grpo` skips in the baseline.
    pub score: f64,
    /// How the completion was judged.
    pub status: Status,
    /// A short human-readable reason (what was extracted, what failed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Outcome {
    /// An outcome with a score; the score is replaced by NaN when the status
    /// is not scorable.
    pub fn new(score: f64, status: Status) -> Self {
        let score = if status.is_scorable() { score } else { f64::NAN };
        Outcome {
            score,
            status,
            detail: None,
        }
    }

    /// Score 1, [`Status::Correct`].
    pub fn correct() -> Self {
        Outcome::new(1.0, Status::Correct)
    }

    /// Score 0 with the given status.
    pub fn zero(status: Status) -> Self {
        Outcome::new(0.0, status)
    }

    /// The same outcome with a reason attached.
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
}

/// A rule-based reward: a pure function of an example and a completion.
///
/// Implementations never panic on any input and bound their own running time
/// (the batch evaluator adds a deadline on top).
pub trait Reward: Send + Sync {
    /// The name used in metrics (`math`, `format`, ...).
    fn name(&self) -> &str;
    /// Judge one completion.
    fn score(&self, example: &Example, completion: &str) -> Outcome;

    /// Judge many completions in one call, for rewards that have a cheaper
    /// way than one call per item (one round trip to a scorer process or a
    /// server). `None` (the default): score item by item with
    /// [`Reward::score`]. A reward that answers bounds its own time and
    /// returns one outcome per item, in order.
    fn score_many(&self, _items: &[Item]) -> Option<Vec<Outcome>> {
        None
    }
}

/// Several rewards with weights: R1 adds accuracy, format and language
/// consistency rewards.
pub struct WeightedSum {
    parts: Vec<(Arc<dyn Reward>, f64)>,
}

/// One completion scored by a [`WeightedSum`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Combined {
    /// `sum(weight * score)`; NaN when any weighted part is not scorable.
    pub total: f64,
    /// Each reward's name and outcome, in the order they were added.
    pub parts: Vec<(String, Outcome)>,
}

impl WeightedSum {
    /// An empty sum.
    pub fn new() -> Self {
        WeightedSum { parts: Vec::new() }
    }

    /// Add a reward with its weight.
    pub fn add(self, reward: impl Reward + 'static, weight: f64) -> Self {
        self.add_shared(Arc::new(reward), weight)
    }

    /// Add a shared reward with its weight.
    pub fn add_shared(mut self, reward: Arc<dyn Reward>, weight: f64) -> Self {
        self.parts.push((reward, weight));
        self
    }

    /// The rewards' names, in order.
    pub fn names(&self) -> Vec<String> {
        self.parts.iter().map(|(r, _)| r.name().to_string()).collect()
    }

    /// The rewards and their weights, in order.
    pub fn parts(&self) -> &[(Arc<dyn Reward>, f64)] {
        &self.parts
    }

    /// Score one completion with every reward.
    pub fn score(&self, example: &Example, completion: &str) -> Combined {
        let outcomes = self.parts.iter().map(|(r, _)| r.score(example, completion)).collect();
        self.combine(outcomes)
    }

    /// The weighted total of one completion's outcomes, one per reward in
    /// order (a weight of 0 leaves its part out of the total, so an
    /// unscorable part with weight 0 does not make the total NaN).
    pub fn combine(&self, outcomes: Vec<Outcome>) -> Combined {
        let mut total = 0.0;
        let mut parts = Vec::with_capacity(self.parts.len());
        for ((reward, weight), out) in self.parts.iter().zip(outcomes) {
            if *weight != 0.0 {
                total += weight * out.score;
            }
            parts.push((reward.name().to_string(), out));
        }
        Combined { total, parts }
    }
}

impl Default for WeightedSum {
    fn default() -> Self {
        WeightedSum::new()
    }
}

/// Summary of one reward over a batch, as logged per step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RewardMetrics {
    /// Mean score over scorable outcomes (NaN when there are none).
    pub mean: f64,
    /// Population standard deviation over scorable outcomes.
    pub std: f64,
    /// How many outcomes had each status.
    pub counts: BTreeMap<Status, usize>,
}

/// Mean, standard deviation and status counts of a batch of outcomes.
pub fn metrics(outcomes: &[Outcome]) -> RewardMetrics {
    let mut counts = BTreeMap::new();
    let mut scores = Vec::new();
    for o in outcomes {
        *counts.entry(o.status).or_insert(0) += 1;
        if o.status.is_scorable() {
            scores.push(o.score);
        }
    }
    let n = scores.len() as f64;
    let mean = if scores.is_empty() {
        f64::NAN
    } else {
        scores.iter().sum::<f64>() / n
    };
    let std = if scores.is_empty() {
        f64::NAN
    } else {
        (scores.iter().map(|s| (s - mean) * (s - mean)).sum::<f64>() / n).sqrt()
    };
    RewardMetrics { mean, std, counts }
}

/// Per-reward metrics of a batch scored by a [`WeightedSum`], keyed by name.
pub fn combined_metrics(rows: &[Combined]) -> BTreeMap<String, RewardMetrics> {
    let mut by_name: BTreeMap<String, Vec<Outcome>> = BTreeMap::new();
    for row in rows {
        for (name, out) in &row.parts {
            by_name.entry(name.clone()).or_default().push(out.clone());
        }
    }
    by_name.into_iter().map(|(k, v)| (k, metrics(&v))).collect()
}
