//! Batch evaluation on a bounded pool of worker threads with a deadline per
//! item.
//!
//! Timeouts never rely on signals: every reward bounds its own work (the math
//! verifier checks a time budget, the sandbox kills its process group), and
//! this pool adds a watchdog on top. An item still running past its deadline
//! is reported as [`Status::Timeout`]; its worker is abandoned (it exits when
//! the call returns, its late result is dropped) and a fresh worker takes its
//! place, so a stuck item never stalls the rest of the batch.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::outcome::{Combined, Example, Outcome, Reward, Status, WeightedSum};

/// How a batch is evaluated.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Worker threads (default: the machine's available parallelism).
    pub workers: usize,
    /// Wall-clock deadline per item, in seconds (default 60: above the code
    /// reward's 10 s per test for a few tests).
    pub item_deadline_s: f64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            workers: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            item_deadline_s: 60.0,
        }
    }
}

impl BatchConfig {
    /// Check the values.
    pub fn validate(&self) -> Result<()> {
        if self.workers == 0 {
            return Err(Error::Config("batch workers must be >= 1".into()));
        }
        if !(self.item_deadline_s.is_finite() && self.item_deadline_s > 0.0) {
            return Err(Error::Config(format!(
                "item_deadline_s must be positive, got {}",
                self.item_deadline_s
            )));
        }
        Ok(())
    }
}

/// One item of a batch: the example's fields and the completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// The example's fields.
    pub example: Example,
    /// The model's completion.
    pub completion: String,
}

struct Shared {
    next: AtomicUsize,
    started: Mutex<Vec<Option<Instant>>>,
    abandoned: Vec<AtomicBool>,
}

/// Score every item with `reward` on `config.workers` threads. The result has
/// one outcome per item, in order.
pub fn evaluate_batch(reward: Arc<dyn Reward>, items: Arc<Vec<Item>>, config: &BatchConfig) -> Result<Vec<Outcome>> {
    config.validate()?;
    let n = items.len();
    let deadline = Duration::from_secs_f64(config.item_deadline_s);
    let shared = Arc::new(Shared {
        next: AtomicUsize::new(0),
        started: Mutex::new(vec![None; n]),
        abandoned: (0..n).map(|_| AtomicBool::new(false)).collect(),
    });
    let (tx, rx) = mpsc::channel::<(usize, Outcome)>();
    let spawn = |tx: mpsc::Sender<(usize, Outcome)>| {
        let shared = Arc::clone(&shared);
        let items = Arc::clone(&items);
        let reward = Arc::clone(&reward);
        std::thread::Builder::new()
            .name("aha-rewards".into())
            .spawn(move || worker(&*reward, &items, &shared, &tx))
            .map_err(|e| Error::io("spawning a reward worker", e))
    };
    for _ in 0..config.workers.min(n.max(1)) {
        spawn(tx.clone())?;
    }
    let mut out: Vec<Option<Outcome>> = vec![None; n];
    let mut done = 0;
    while done < n {
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok((i, o)) => {
                if out[i].is_none() && !shared.abandoned[i].load(Ordering::SeqCst) {
                    out[i] = Some(o);
                    done += 1;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        let now = Instant::now();
        let overdue: Vec<usize> = match shared.started.lock() {
            Ok(started) => (0..n)
                .filter(|&i| out[i].is_none())
                .filter(|&i| started[i].is_some_and(|t| now.duration_since(t) > deadline))
                .collect(),
            Err(_) => Vec::new(),
        };
        for i in overdue {
            shared.abandoned[i].store(true, Ordering::SeqCst);
            out[i] = Some(
                Outcome::zero(Status::Timeout)
                    .with_detail(format!("item deadline of {} s exceeded", config.item_deadline_s)),
            );
            done += 1;
            if shared.next.load(Ordering::SeqCst) < n {
                spawn(tx.clone())?;
            }
        }
    }
    Ok(out
        .into_iter()
        .map(|o| o.unwrap_or_else(|| Outcome::zero(Status::InfraError).with_detail("worker lost")))
        .collect())
}

/// Score every item with every reward of `sum`: each reward runs over the
/// whole batch, either in one call when it has a batch path
/// ([`Reward::score_many`]: a scorer process, an HTTP endpoint) or through
/// [`evaluate_batch`] (parallel, a deadline per item). One [`Combined`] per
/// item, in order, totals as [`WeightedSum::score`] adds them.
pub fn evaluate_weighted(sum: &WeightedSum, items: Arc<Vec<Item>>, config: &BatchConfig) -> Result<Vec<Combined>> {
    config.validate()?;
    let n = items.len();
    let mut per_reward: Vec<std::vec::IntoIter<Outcome>> = Vec::with_capacity(sum.parts().len());
    for (reward, _) in sum.parts() {
        let outcomes = match reward.score_many(&items) {
            Some(v) if v.len() == n => v,
            Some(v) => {
                vec![Outcome::zero(Status::InfraError).with_detail(format!("{} outcomes for {n} items", v.len())); n]
            }
            None => evaluate_batch(Arc::clone(reward), Arc::clone(&items), config)?,
        };
        per_reward.push(outcomes.into_iter());
    }
    Ok((0..n)
        .map(|_| {
            let row = per_reward
                .iter_mut()
                .map(|it| it.next().unwrap_or_else(|| Outcome::zero(Status::InfraError)))
                .collect();
            sum.combine(row)
        })
        .collect())
}

fn worker(reward: &dyn Reward, items: &[Item], shared: &Shared, tx: &mpsc::Sender<(usize, Outcome)>) {
    loop {
        let i = shared.next.fetch_add(1, Ordering::SeqCst);
        let Some(item) = items.get(i) else { return };
        if let Ok(mut started) = shared.started.lock() {
            started[i] = Some(Instant::now());
        }
        // A reward that panics (a bug, never an input's fault by contract)
        // costs its item an InfraError, not the batch.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            reward.score(&item.example, &item.completion)
        }))
        .unwrap_or_else(|_| Outcome::zero(Status::InfraError).with_detail("the reward panicked"));
        if shared.abandoned[i].load(Ordering::SeqCst) {
            return; // replaced by a fresh worker; the late result is dropped
        }
        if tx.send((i, outcome)).is_err() {
            return;
        }
    }
}
