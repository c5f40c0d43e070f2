//! A per-phase wall-clock profile of the CPU training step (`aha bench
//! train --profile`): how long each kind of work took and how many
//! floating-point operations it did.
//!
//! The model code opens a [`scope`] around each kind of work; scopes nest and
//! time is exclusive (a scope's clock pauses while an inner scope runs), so
//! the phases add up to the profiled wall time. Every [`crate::cpu::matmul`]
//! adds its `2 M N K` flops to the innermost open scope of its thread; other
//! kernels add theirs with [`add_flops`]. The [`Pass`] (forward, backward,
//! optimizer) is set by the driver with [`set_pass`].
//!
//! Off (the default) a scope costs one relaxed atomic load and a branch: no
//! clock is read and nothing is recorded.
//!
//! ```
//! use aha_tensor::profile::{self, Pass, Phase};
//!
//! profile::enable(true);
//! profile::set_pass(Pass::Forward);
//! {
//!     let _s = profile::scope(Phase::Norm);
//!     profile::add_flops(10);
//! }
//! let rows = profile::take();
//! assert_eq!(rows[0].flops, 10);
//! profile::enable(false);
//! ```

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

/// A kind of work in the training step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Query, key, value and output projections (dense products).
    AttnProj,
    /// The attention proper: scores, softmax, weighted values.
    AttnCore,
    /// The routed experts' products (gate, up, down).
    Experts,
    /// Dense and shared-expert MLP products.
    Mlp,
    /// Router product, softmax, top-k, the permutation of token rows to
    /// experts and back, and the router's backward.
    Routing,
    /// The lm head's products with the log-softmax of each row.
    LmHead,
    /// RMSNorm (layer norms, q/k norms, the final norm).
    Norm,
    /// Rotary embeddings.
    Rope,
    /// SwiGLU and its backward.
    Activation,
    /// Residual adds and the copies between them.
    Residual,
    /// Token embedding and its scatter-add.
    Embedding,
    /// Gradient clipping and AdamW.
    Optimizer,
}

/// Every phase, in the order of the report.
pub const PHASES: [Phase; 12] = [
    Phase::AttnProj,
    Phase::AttnCore,
    Phase::Experts,
    Phase::Mlp,
    Phase::Routing,
    Phase::LmHead,
    Phase::Norm,
    Phase::Rope,
    Phase::Activation,
    Phase::Residual,
    Phase::Embedding,
    Phase::Optimizer,
];

impl Phase {
    /// Short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Phase::AttnProj => "attn projections",
            Phase::AttnCore => "attention core",
            Phase::Experts => "expert products",
            Phase::Mlp => "dense/shared MLP",
            Phase::Routing => "routing + permutation",
            Phase::LmHead => "lm head + log-softmax",
            Phase::Norm => "rmsnorm",
            Phase::Rope => "rope",
            Phase::Activation => "swiglu",
            Phase::Residual => "residual adds/copies",
            Phase::Embedding => "embedding",
            Phase::Optimizer => "clip + AdamW",
        }
    }
}

/// Which part of the step is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// The forward and the scoring of the targets.
    Forward,
    /// The backward to every parameter.
    Backward,
    /// Clipping and the optimizer step.
    Update,
}

impl Pass {
    /// Short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Pass::Forward => "fwd",
            Pass::Backward => "bwd",
            Pass::Update => "opt",
        }
    }
}

const PASSES: [Pass; 3] = [Pass::Forward, Pass::Backward, Pass::Update];
const N: usize = PHASES.len() * PASSES.len();

static ON: AtomicBool = AtomicBool::new(false);
static PASS: AtomicUsize = AtomicUsize::new(0);
static NANOS: [AtomicU64; N] = [const { AtomicU64::new(0) }; N];
static FLOPS: [AtomicU64; N] = [const { AtomicU64::new(0) }; N];

thread_local! {
    /// Open scopes of this thread: (slot, when its clock last started).
    static STACK: RefCell<Vec<(usize, Instant)>> = const { RefCell::new(Vec::new()) };
}

fn slot(phase: Phase) -> usize {
    let p = PHASES.iter().position(|&x| x == phase).unwrap_or(0);
    p * PASSES.len() + PASS.load(Ordering::Relaxed).min(PASSES.len() - 1)
}

/// Turns recording on or off (off by default).
pub fn enable(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// Whether recording is on.
#[inline]
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Sets the pass that the following scopes count towards.
pub fn set_pass(pass: Pass) {
    let i = PASSES.iter().position(|&x| x == pass).unwrap_or(0);
    PASS.store(i, Ordering::Relaxed);
}

/// An open scope; its time is recorded when it is dropped.
#[must_use = "a scope measures until it is dropped"]
pub struct Scope {
    active: bool,
}

/// Opens a scope of `phase` on this thread (a no-op when recording is off).
#[inline]
pub fn scope(phase: Phase) -> Scope {
    if !enabled() {
        return Scope { active: false };
    }
    let now = Instant::now();
    let s = slot(phase);
    STACK.with(|st| {
        let mut st = st.borrow_mut();
        if let Some((outer, since)) = st.last_mut() {
            NANOS[*outer].fetch_add((now - *since).as_nanos() as u64, Ordering::Relaxed);
            *since = now;
        }
        st.push((s, now));
    });
    Scope { active: true }
}

impl Drop for Scope {
    #[inline]
    fn drop(&mut self) {
        if !self.active {
            return;
        }
        let now = Instant::now();
        STACK.with(|st| {
            let mut st = st.borrow_mut();
            if let Some((s, since)) = st.pop() {
                NANOS[s].fetch_add((now - since).as_nanos() as u64, Ordering::Relaxed);
            }
            if let Some((_, since)) = st.last_mut() {
                *since = now;
            }
        });
    }
}

/// Adds `flops` to the innermost open scope of this thread (nothing when
/// recording is off or no scope is open).
#[inline]
pub fn add_flops(flops: u64) {
    if !enabled() {
        return;
    }
    STACK.with(|st| {
        if let Some((s, _)) = st.borrow().last() {
            FLOPS[*s].fetch_add(flops, Ordering::Relaxed);
        }
    });
}

/// One phase of one pass in a profile.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The kind of work.
    pub phase: Phase,
    /// The part of the step.
    pub pass: Pass,
    /// Exclusive wall time, seconds.
    pub secs: f64,
    /// Floating-point operations counted.
    pub flops: u64,
}

/// The rows recorded since the last call (those with time or flops), and
/// resets the counters.
pub fn take() -> Vec<Row> {
    let mut rows = Vec::new();
    for (pi, &phase) in PHASES.iter().enumerate() {
        for (si, &pass) in PASSES.iter().enumerate() {
            let i = pi * PASSES.len() + si;
            let ns = NANOS[i].swap(0, Ordering::Relaxed);
            let flops = FLOPS[i].swap(0, Ordering::Relaxed);
            if ns > 0 || flops > 0 {
                rows.push(Row {
                    phase,
                    pass,
                    secs: ns as f64 * 1e-9,
                    flops,
                });
            }
        }
    }
    rows
}
