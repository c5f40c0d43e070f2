//! The run driver shared by `aha demo`, `aha grpo` and the GRPO and
//! pretraining stages of `aha pipeline`.
//!
//! A [`Driver`] owns what every training run does the same way:
//!
//! - the run folder: the resolved config (written on a fresh start, compared
//!   key by key on `--resume`, [`crate::run_folder::open_run`]),
//!   `metrics.jsonl`, TensorBoard events where the caller asks for them,
//!   `samples.jsonl` and `plots/`;
//! - checkpoints every `save_every` steps of a [`Steps`] loop
//!   (`checkpoints/<prefix>-<step>`), holding the weights, the reference,
//!   the optimizer, the data RNG, the logs' cursor and the caller's extra
//!   state; on resume both logs are cut back to the checkpoint's cursor, so
//!   a resumed run writes the lines of the run that never stopped and ends
//!   with bitwise equal weights on the CPU;
//! - the periodic reference reset (`reference_reset_every`: the policy is
//!   copied into the reference before steps `k * every + 1`, as the R1
//!   report resets it every 400 steps);
//! - the non-finite guard: a step whose loss or gradient norm is NaN or
//!   infinite is refused by the [`Optimizer`] (no update, the weights and
//!   moments untouched), the driver logs the optimizer's note naming the
//!   step and the batch, and more than `max_bad_steps` refusals in a row
//!   end the run with an error; checkpoints already written stay as they
//!   were.
//!
//! A caller supplies only what differs, as a [`Stage`]: how a step's batch
//! is drawn and trained on (the rewards, the data order), what it adds
//! after the update (evaluation, samples, progress), which steps are
//! logged, and what extra state its checkpoints carry.
//!
//! ```no_run
//! use aha_trainer::driver::{Driver, RunSpec, Stage, State, Steps};
//! # fn demo(stage: &mut dyn Stage, mut st: State) -> aha_trainer::Result<()> {
//! let spec = RunSpec {
//!     dir: std::path::Path::new("runs/x"),
//!     config_file: "config.json",
//!     config_text: "{}",
//!     parse: &aha_trainer::run_folder::json_value,
//!     moved: &[],
//!     resume: true,
//!     tensorboard: true,
//!     writer: true,
//! };
//! let (mut run, loaded) = Driver::open(&spec, &mut |l| println!("{l}"))?;
//! let start = loaded.map_or(0, |l| l.state.step);
//! let steps = Steps { start, total: 10, save_every: 5, ..Steps::new("grpo") };
//! run.run(&steps, &mut st, stage, &mut |l| println!("{l}"))?;
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};

use aha_moe_model::Policy;

use crate::checkpoint::{Loaded, TrainState};
use crate::error::Result;
use crate::optim::{Optimizer, StepInfo};
use crate::rng::Rng;
use crate::run_folder::{open_run, Chart, RunLog};

/// How a run folder is opened (see [`Driver::open`]).
pub struct RunSpec<'a> {
    /// The run folder.
    pub dir: &'a Path,
    /// The file the resolved config is written to (`config.json`, `config.toml`).
    pub config_file: &'a str,
    /// The resolved config's text.
    pub config_text: &'a str,
    /// Reads a config text back as JSON for the resume comparison
    /// ([`crate::run_folder::json_value`], [`crate::run_folder::toml_value`]).
    pub parse: &'a dyn Fn(&str) -> Option<serde_json::Value>,
    /// Top-level config keys that may differ on resume (the folder's own path).
    pub moved: &'a [&'a str],
    /// Continue from the folder's latest checkpoint when there is one.
    pub resume: bool,
    /// Write TensorBoard events beside `metrics.jsonl`.
    pub tensorboard: bool,
    /// This process writes the folder (rank 0 of a data-parallel run, or the
    /// only process); other ranks only read the checkpoint to resume from.
    pub writer: bool,
}

/// What a run trains: the policy, the KL reference (none without KL or
/// with LoRA, whose reference is the base with the adapters off), the
/// optimizer and the data RNG. A checkpoint holds all four.
pub struct State {
    /// The trained policy.
    pub policy: Policy,
    /// The KL reference.
    pub reference: Option<Policy>,
    /// The optimizer.
    pub opt: Optimizer,
    /// The generator of the data order (problems, batches).
    pub rng: Rng,
}

/// One loop of steps `start + 1 ..= total` (1-based) and how its steps are
/// named, checkpointed and reset.
#[derive(Debug, Clone)]
pub struct Steps<'a> {
    /// The phase written in checkpoints (`TrainState::phase`).
    pub phase: &'a str,
    /// The `phase` field of this loop's metrics lines (`None`: no field,
    /// TensorBoard tags without a prefix).
    pub log_phase: Option<&'a str>,
    /// Checkpoints are named `<prefix>-<step, 6 digits>`.
    pub checkpoint_prefix: &'a str,
    /// Notes of refused steps are logged as `<label> <step>: <note>`.
    pub label: &'a str,
    /// Steps already done (the resumed checkpoint's step, or 0).
    pub start: usize,
    /// The last step.
    pub total: usize,
    /// A checkpoint after every step that is a multiple of this, except the
    /// last (0: none).
    pub save_every: usize,
    /// Copy the policy into the reference before steps `k * every + 1`,
    /// `k >= 1` (0: never).
    pub reference_reset_every: usize,
}

impl<'a> Steps<'a> {
    /// A loop named `phase` everywhere (checkpoints `<phase>-N`, lines with
    /// `phase`, notes `<phase> N: ...`), with no steps, no saves and no
    /// reference reset.
    pub fn new(phase: &'a str) -> Steps<'a> {
        Steps {
            phase,
            log_phase: Some(phase),
            checkpoint_prefix: phase,
            label: phase,
            start: 0,
            total: 0,
            save_every: 0,
            reference_reset_every: 0,
        }
    }

    /// Whether a checkpoint is taken after `step`.
    pub fn saves_after(&self, step: usize) -> bool {
        self.save_every > 0 && step.is_multiple_of(self.save_every) && step < self.total
    }

    /// Whether the reference is reset before `step`.
    pub fn resets_before(&self, step: usize) -> bool {
        self.reference_reset_every > 0 && step > 1 && (step - 1).is_multiple_of(self.reference_reset_every)
    }
}

/// What a caller supplies to [`Driver::run`]: one step's training, and
/// what it adds around it.
pub trait Stage {
    /// Trains step `step` (1-based): draws its batch (from `st.rng` or the
    /// caller's own cursor), computes the loss and updates `st.policy`
    /// through `st.opt`. Returns the step's metrics, or `None` when the step
    /// made no update and is not logged or checkpointed (e.g. every group of
    /// a dynamic-sampling step had equal rewards).
    fn step(&mut self, step: usize, st: &mut State, log: &mut dyn FnMut(&str)) -> Result<Option<aha_grpo::Metrics>>;

    /// After the update and its notes, before the metrics line: evaluation,
    /// samples, progress lines; may add to `m`.
    fn after(
        &mut self,
        _step: usize,
        _st: &State,
        _m: &mut aha_grpo::Metrics,
        _run: &mut Driver,
        _log: &mut dyn FnMut(&str),
    ) -> Result<()> {
        Ok(())
    }

    /// The `step` field of step `step`'s metrics line, or `None` for a step
    /// that writes no line (default: every step, as itself).
    fn logged_as(&self, step: usize, _total: usize) -> Option<usize> {
        Some(step)
    }

    /// The caller's part of a checkpoint's `extra` (an object; the driver
    /// adds `samples_lines`).
    fn extra(&self) -> Result<serde_json::Map<String, serde_json::Value>> {
        Ok(serde_json::Map::new())
    }
}

/// A run folder and the loop over its steps (see the module doc).
pub struct Driver {
    dir: PathBuf,
    log: Option<RunLog>,
    /// A data-parallel run's ranks: every one takes part in a checkpoint.
    ranks: Option<crate::dp::RankCheckpoint>,
}

/// `{loss, grad_norm, learning_rate}`: the metrics of a supervised step.
pub fn step_metrics(loss: f64, info: &StepInfo) -> aha_grpo::Metrics {
    [
        ("loss".to_string(), loss),
        ("grad_norm".to_string(), info.grad_norm),
        ("learning_rate".to_string(), info.lr),
    ]
    .into_iter()
    .collect()
}

/// The cursor of a checkpoint's logs: lines of `metrics.jsonl`, and of
/// `samples.jsonl` when it recorded them (`None`: keep them all).
fn cursor_of(state: &TrainState) -> (usize, Option<usize>) {
    let samples = state
        .extra
        .get("samples_lines")
        .and_then(|v| v.as_u64())
        .map(|v| v as usize);
    (state.metrics_lines, samples)
}

impl Driver {
    /// Opens the run folder: with `resume`, loads its latest checkpoint
    /// (refusing a config that differs from the folder's, naming the first
    /// key) and cuts the logs back to it; otherwise (or with no checkpoint)
    /// writes the config, removes an earlier run's checkpoints and empties
    /// the logs. A rank that is not the writer touches no file and only
    /// loads the checkpoint. Returns the checkpoint to resume from.
    pub fn open(spec: &RunSpec<'_>, log: &mut dyn FnMut(&str)) -> Result<(Driver, Option<Loaded>)> {
        let dir = spec.dir.to_path_buf();
        if !spec.writer {
            let loaded = if spec.resume {
                crate::checkpoint::load_latest(&dir.join("checkpoints"))?
            } else {
                None
            };
            return Ok((
                Driver {
                    dir,
                    log: None,
                    ranks: None,
                },
                loaded,
            ));
        }
        let loaded = open_run(
            spec.dir,
            spec.config_file,
            spec.config_text,
            spec.parse,
            spec.moved,
            spec.resume,
            log,
        )?;
        let run = RunLog::open_at(spec.dir, loaded.as_ref().map(|l| cursor_of(&l.state)), spec.tensorboard)?;
        Ok((
            Driver {
                dir,
                log: Some(run),
                ranks: None,
            },
            loaded,
        ))
    }

    /// The run folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether this process writes the folder.
    pub fn is_writer(&self) -> bool {
        self.log.is_some()
    }

    /// Appends a metrics line (see [`RunLog::metrics`]); nothing on a rank
    /// that does not write.
    pub fn metrics(&mut self, phase: Option<&str>, step: usize, m: &aha_grpo::Metrics) -> Result<()> {
        self.metrics_labelled(phase, step, &[], m)
    }

    /// [`Driver::metrics`] with text fields (see [`RunLog::metrics_labelled`]).
    pub fn metrics_labelled(
        &mut self,
        phase: Option<&str>,
        step: usize,
        labels: &[(&str, &str)],
        m: &aha_grpo::Metrics,
    ) -> Result<()> {
        match &mut self.log {
            Some(l) => l.metrics_labelled(phase, step, labels, m),
            None => Ok(()),
        }
    }

    /// Appends a line as it is to `metrics.jsonl` (see [`RunLog::line`]).
    pub fn line(&mut self, v: &serde_json::Value) -> Result<()> {
        match &mut self.log {
            Some(l) => l.line(v),
            None => Ok(()),
        }
    }

    /// Appends a line to `samples.jsonl`.
    pub fn sample(&mut self, v: &serde_json::Value) -> Result<()> {
        match &mut self.log {
            Some(l) => l.sample(v),
            None => Ok(()),
        }
    }

    /// Every line of `metrics.jsonl`, resumed runs included (empty on a
    /// rank that does not write).
    pub fn read_metrics(&self) -> Result<Vec<serde_json::Value>> {
        match &self.log {
            Some(l) => l.read_metrics(),
            None => Ok(Vec::new()),
        }
    }

    /// Draws `plots/*.png` from `metrics.jsonl` (see [`RunLog::plots`]).
    pub fn plots(&self, charts: &[Chart<'_>]) -> Result<()> {
        match &self.log {
            Some(l) => l.plots(charts),
            None => Ok(()),
        }
    }

    /// Saves `checkpoints/<name>` (see [`RunLog::checkpoint`]); nothing on a
    /// rank that does not write.
    #[allow(clippy::too_many_arguments)]
    pub fn checkpoint(
        &self,
        name: &str,
        phase: &str,
        step: usize,
        rng: &Rng,
        policy: &Policy,
        reference: Option<&Policy>,
        opt: &Optimizer,
        extra: serde_json::Map<String, serde_json::Value>,
    ) -> Result<()> {
        match (&self.log, &self.ranks) {
            (Some(l), ranks) => {
                l.checkpoint_ranks(name, phase, step, rng, policy, reference, opt, extra, ranks.as_ref())
            }
            // A rank that does not write still saves its part (its ZeRO-1
            // shard) and takes part in the save's agreement.
            (None, Some(r)) => crate::checkpoint::save_rank_part(&self.dir.join("checkpoints"), name, policy, opt, r),
            (None, None) => Ok(()),
        }
    }

    /// Makes every checkpoint a data-parallel one over `ranks` (each rank
    /// writes its part; see [`crate::checkpoint::save_ranks`]).
    pub fn set_ranks(&mut self, ranks: Option<crate::dp::RankCheckpoint>) {
        self.ranks = ranks;
    }

    /// Runs steps `steps.start + 1 ..= steps.total` of `stage` on `st`: for
    /// each, the reference reset when due, the stage's step, the notes of a
    /// refused update (the non-finite guard), the stage's `after`, the
    /// metrics line and the checkpoint when due.
    pub fn run(
        &mut self,
        steps: &Steps<'_>,
        st: &mut State,
        stage: &mut dyn Stage,
        log: &mut dyn FnMut(&str),
    ) -> Result<()> {
        for step in steps.start + 1..=steps.total {
            if steps.resets_before(step) {
                if let Some(r) = st.reference.as_mut() {
                    r.copy_params_from(&st.policy)?;
                    log(&format!("step {step}: reference reset to the current policy"));
                }
            }
            let done = stage.step(step, st, log);
            // The notes of refused updates, also when the last one aborted the run.
            for note in st.opt.take_notes() {
                log(&format!("{} {step}: {note}", steps.label));
            }
            let Some(mut m) = done? else {
                continue;
            };
            stage.after(step, st, &mut m, self, log)?;
            if let Some(at) = stage.logged_as(step, steps.total) {
                self.metrics(steps.log_phase, at, &m)?;
            }
            if steps.saves_after(step) {
                self.checkpoint(
                    &format!("{}-{step:06}", steps.checkpoint_prefix),
                    steps.phase,
                    step,
                    &st.rng,
                    &st.policy,
                    st.reference.as_ref(),
                    &st.opt,
                    stage.extra()?,
                )?;
            }
        }
        Ok(())
    }
}
