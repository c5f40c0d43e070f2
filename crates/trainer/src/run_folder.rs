//! The run folder of `aha sft`, `aha distill` and `aha pipeline`: the
//! resolved config (checked on `--resume`), `metrics.jsonl` with the same
//! scalars as TensorBoard events beside it ([`crate::tensorboard`]),
//! `samples.jsonl`, PNG plots ([`crate::plot`]) and checkpoints
//! ([`crate::checkpoint`]) cut back to on resume.
//!
//! A checkpoint records how many lines of `metrics.jsonl`
//! ([`checkpoint::TrainState::metrics_lines`]) and of `samples.jsonl`
//! (`extra.samples_lines`) existed when it was taken; resuming truncates both
//! files to those counts, so the lines of the resumed run follow exactly.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, Loaded, TrainState};
use crate::error::{io_err, Error, Result};
use crate::optim::Optimizer;
use crate::plot::line_chart;
use crate::rng::Rng;
use crate::tensorboard::EventWriter;
use aha_moe_model::Policy;

/// How far the logs of a run had got: the lines of `metrics.jsonl` and of
/// `samples.jsonl`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogCursor {
    /// Lines of `metrics.jsonl`.
    pub metrics_lines: usize,
    /// Lines of `samples.jsonl`.
    pub samples_lines: usize,
}

impl LogCursor {
    /// The cursor a checkpoint's state holds (`samples_lines` is 0 when the
    /// checkpoint has none).
    pub fn of(state: &TrainState) -> LogCursor {
        LogCursor {
            metrics_lines: state.metrics_lines,
            samples_lines: state
                .extra
                .get("samples_lines")
                .and_then(|v| v.as_u64())
                .map_or(0, |v| v as usize),
        }
    }
}

/// The open logs of a run folder: `metrics.jsonl`, the TensorBoard event
/// file beside it, and `samples.jsonl`.
pub struct RunLog {
    dir: PathBuf,
    metrics_path: PathBuf,
    metrics: std::fs::File,
    samples_path: PathBuf,
    samples: std::fs::File,
    tb: Option<EventWriter>,
    cursor: LogCursor,
}

/// Keeps the first `n` lines of `path` (which may not exist yet).
fn truncate_lines(path: &Path, n: usize) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io_err(path)(e)),
    };
    let have = text.lines().count();
    if have < n {
        return Err(Error::Checkpoint {
            path: path.to_path_buf(),
            msg: format!("has {have} lines, the checkpoint expects at least {n}"),
        });
    }
    let kept: String = text.lines().take(n).map(|l| format!("{l}\n")).collect();
    std::fs::write(path, kept).map_err(io_err(path))
}

impl RunLog {
    /// Opens the logs of `dir`: emptied when `resume` is `None`, cut back to
    /// the checkpoint's cursor otherwise. A new TensorBoard event file is
    /// created either way (TensorBoard reads every file of the folder).
    pub fn open(dir: &Path, resume: Option<LogCursor>) -> Result<RunLog> {
        RunLog::open_at(dir, resume.map(|c| (c.metrics_lines, Some(c.samples_lines))), true)
    }

    /// [`RunLog::open`] with the resumed cursor as (metrics lines, samples
    /// lines or `None` to keep every line of `samples.jsonl`, as for a
    /// checkpoint that did not record them), and TensorBoard events only
    /// when `tensorboard`.
    pub fn open_at(dir: &Path, resume: Option<(usize, Option<usize>)>, tensorboard: bool) -> Result<RunLog> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let metrics_path = dir.join("metrics.jsonl");
        let samples_path = dir.join("samples.jsonl");
        let (metrics_lines, samples) = resume.unwrap_or((0, Some(0)));
        truncate_lines(&metrics_path, metrics_lines)?;
        let samples_lines = match samples {
            Some(n) => {
                truncate_lines(&samples_path, n)?;
                n
            }
            None => match std::fs::read_to_string(&samples_path) {
                Ok(t) => t.lines().count(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
                Err(e) => return Err(io_err(&samples_path)(e)),
            },
        };
        let cursor = LogCursor {
            metrics_lines,
            samples_lines,
        };
        let append = |p: &Path| {
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(p)
                .map_err(io_err(p))
        };
        Ok(RunLog {
            dir: dir.to_path_buf(),
            metrics: append(&metrics_path)?,
            metrics_path,
            samples: append(&samples_path)?,
            samples_path,
            tb: if tensorboard {
                Some(EventWriter::create(dir)?)
            } else {
                None
            },
            cursor,
        })
    }

    /// The run folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Lines written so far (what a checkpoint records).
    pub fn cursor(&self) -> LogCursor {
        self.cursor
    }

    /// Appends `{"phase": phase, "step": step, ...m}` to `metrics.jsonl`
    /// (no `phase` key when `None`) and the scalars to TensorBoard, tagged
    /// `phase/key` when there is a phase (one chart per stage).
    pub fn metrics(&mut self, phase: Option<&str>, step: usize, m: &aha_grpo::Metrics) -> Result<()> {
        self.metrics_labelled(phase, step, &[], m)
    }

    /// [`RunLog::metrics`] with text fields (`labels`) in the JSON line too.
    pub fn metrics_labelled(
        &mut self,
        phase: Option<&str>,
        step: usize,
        labels: &[(&str, &str)],
        m: &aha_grpo::Metrics,
    ) -> Result<()> {
        match (phase, &mut self.tb) {
            (_, None) => {}
            (Some(p), Some(tb)) => {
                let tags: Vec<(String, f64)> = m.iter().map(|(k, v)| (format!("{p}/{k}"), *v)).collect();
                tb.scalars(step, tags.iter().map(|(k, v)| (k.as_str(), *v)))?;
            }
            (None, Some(tb)) => tb.scalars(step, m.iter().map(|(k, v)| (k.as_str(), *v)))?,
        }
        let mut line = serde_json::Map::new();
        if let Some(p) = phase {
            line.insert("phase".into(), p.into());
        }
        line.insert("step".into(), step.into());
        for (k, v) in labels {
            line.insert((*k).into(), (*v).into());
        }
        for (k, v) in m {
            line.insert(k.clone(), serde_json::json!(v));
        }
        self.line(&serde_json::Value::Object(line))
    }

    /// Appends one line as it is to `metrics.jsonl` (no TensorBoard event):
    /// for lines that are not scalars, such as a run's closing summary.
    pub fn line(&mut self, v: &serde_json::Value) -> Result<()> {
        writeln!(self.metrics, "{v}")
            .and_then(|_| self.metrics.flush())
            .map_err(io_err(&self.metrics_path))?;
        self.cursor.metrics_lines += 1;
        Ok(())
    }

    /// Appends one line to `samples.jsonl`.
    pub fn sample(&mut self, v: &serde_json::Value) -> Result<()> {
        writeln!(self.samples, "{v}")
            .and_then(|_| self.samples.flush())
            .map_err(io_err(&self.samples_path))?;
        self.cursor.samples_lines += 1;
        Ok(())
    }

    /// Every line of `metrics.jsonl` so far (resumed runs included), parsed.
    pub fn read_metrics(&self) -> Result<Vec<serde_json::Value>> {
        Ok(std::fs::read_to_string(&self.metrics_path)
            .map_err(io_err(&self.metrics_path))?
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }

    /// Draws `plots/<file>` for each chart: (file, title, series), each
    /// series (label, phase or `None` for lines without one, key) read from
    /// every line of `metrics.jsonl` as (step, value). Charts whose series
    /// are all empty are not drawn.
    pub fn plots(&self, charts: &[Chart<'_>]) -> Result<()> {
        draw_plots(&self.dir, &self.read_metrics()?, charts)
    }

    /// Saves a checkpoint `dir/checkpoints/<name>` holding `phase`, `step`,
    /// the RNG, the optimizer, this log's cursor and `extra` (an object; the
    /// samples cursor is added to it).
    pub fn checkpoint(
        &self,
        name: &str,
        phase: &str,
        step: usize,
        rng: &Rng,
        model: &Policy,
        reference: Option<&Policy>,
        opt: &Optimizer,
        extra: serde_json::Map<String, serde_json::Value>,
    ) -> Result<()> {
        self.checkpoint_ranks(name, phase, step, rng, model, reference, opt, extra, None)
    }

    /// [`RunLog::checkpoint`] on rank 0 of a data-parallel run: every rank
    /// takes part ([`checkpoint::save_ranks`]; the others call it directly).
    #[allow(clippy::too_many_arguments)]
    pub fn checkpoint_ranks(
        &self,
        name: &str,
        phase: &str,
        step: usize,
        rng: &Rng,
        model: &Policy,
        reference: Option<&Policy>,
        opt: &Optimizer,
        mut extra: serde_json::Map<String, serde_json::Value>,
        ranks: Option<&crate::dp::RankCheckpoint>,
    ) -> Result<()> {
        extra.insert("samples_lines".into(), self.cursor.samples_lines.into());
        let state = TrainState {
            phase: phase.into(),
            step,
            rng: rng.state(),
            opt_step: opt.step,
            opt_bad: opt.bad_in_a_row(),
            metrics_lines: self.cursor.metrics_lines,
            extra: serde_json::Value::Object(extra),
            layout: checkpoint::LAYOUT_VERSION,
        };
        checkpoint::save_ranks(
            &self.dir.join("checkpoints"),
            name,
            &state,
            model,
            reference,
            opt,
            ranks,
        )
        .map(|_| ())
    }
}

/// Draws `dir/plots/<file>` for each chart from the metric `lines` (see
/// [`RunLog::plots`]): each series (label, phase or `None` for lines
/// without one, key) as (step, value); charts whose series are all empty
/// are not drawn.
pub fn draw_plots(dir: &Path, lines: &[serde_json::Value], charts: &[Chart<'_>]) -> Result<()> {
    let dir = dir.join("plots");
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    for (file, title, series) in charts {
        let data: Vec<(&str, Vec<(f64, f64)>)> = series
            .iter()
            .map(|(label, phase, key)| {
                let pts = lines
                    .iter()
                    .filter(|l| l.get("phase").and_then(|p| p.as_str()) == *phase)
                    .filter_map(|l| Some((l.get("step")?.as_f64()?, l.get(*key)?.as_f64()?)))
                    .collect();
                (*label, pts)
            })
            .collect();
        if data.iter().all(|(_, p)| p.is_empty()) {
            continue;
        }
        line_chart(&dir.join(file), title, &data)?;
    }
    Ok(())
}

/// One plot: file name, title, and its series (label, phase, metric key).
pub type Chart<'a> = (&'a str, &'a str, &'a [(&'a str, Option<&'a str>, &'a str)]);

/// The first key (dotted path) whose value differs between `old` and `new`,
/// with both values; `None` when they are equal.
pub fn first_difference(old: &serde_json::Value, new: &serde_json::Value) -> Option<(String, String, String)> {
    use serde_json::Value;
    fn walk(path: &str, a: &Value, b: &Value) -> Option<(String, String, String)> {
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
                keys.sort();
                keys.dedup();
                keys.into_iter().find_map(|k| {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    match (x.get(k), y.get(k)) {
                        (Some(a), Some(b)) => walk(&p, a, b),
                        (a, b) => Some((p, show(a), show(b))),
                    }
                })
            }
            _ if a == b => None,
            _ => Some((path.to_string(), a.to_string(), b.to_string())),
        }
    }
    fn show(v: Option<&Value>) -> String {
        v.map_or_else(|| "unset".into(), |v| v.to_string())
    }
    walk("", old, new)
}

/// Opens a run folder for a run whose resolved config is `text` (written
/// to `dir/<file>`): with `resume`, loads the latest checkpoint
/// and refuses a config that differs from the one in the folder, naming the
/// file and the first differing key; without a checkpoint (or without
/// `resume`), writes the config, removes the checkpoints of any earlier run
/// in `dir` and returns `None`. `parse` reads the file's text back as a
/// JSON value for the comparison; top-level keys in `moved` (the run
/// folder's own path) may differ, so a moved folder resumes.
pub fn open_run(
    dir: &Path,
    file: &str,
    text: &str,
    parse: &dyn Fn(&str) -> Option<serde_json::Value>,
    moved: &[&str],
    resume: bool,
    log: &mut dyn FnMut(&str),
) -> Result<Option<Loaded>> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let path = dir.join(file);
    let loaded = if resume {
        checkpoint::load_latest(&dir.join("checkpoints"))?
    } else {
        None
    };
    match &loaded {
        Some(l) => {
            let old_text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
            let what = path.display().to_string();
            let (mut old, mut new) = match (parse(&old_text), parse(text)) {
                (Some(o), Some(n)) => (o, n),
                _ => {
                    return Err(Error::Config {
                        what,
                        msg: "cannot be read back to compare with this run's config".into(),
                    })
                }
            };
            for v in [&mut old, &mut new] {
                if let Some(o) = v.as_object_mut() {
                    o.retain(|k, _| !moved.contains(&k.as_str()));
                }
            }
            if let Some((key, was, now)) = first_difference(&old, &new) {
                return Err(Error::Config {
                    what,
                    msg: format!(
                        "resume needs the same config: `{key}` was {was} in the run being resumed, is {now} now"
                    ),
                });
            }
            log(&format!(
                "resuming {} at step {} from {}",
                l.state.phase,
                l.state.step,
                l.dir.display()
            ));
        }
        None => {
            if resume {
                log("no checkpoint to resume from: starting fresh");
            }
            // A fresh start: checkpoints of an earlier run in this folder
            // must not be resumed into this one.
            let ck = dir.join("checkpoints");
            if ck.is_dir() {
                std::fs::remove_dir_all(&ck).map_err(io_err(&ck))?;
            }
            std::fs::write(&path, text).map_err(io_err(&path))?;
        }
    }
    Ok(loaded)
}

/// Reads a TOML text as a JSON value (for [`open_run`]'s comparison).
pub fn toml_value(text: &str) -> Option<serde_json::Value> {
    let v: toml::Value = toml::from_str(text).ok()?;
    serde_json::to_value(v).ok()
}

/// Reads a JSON text (for [`open_run`]'s comparison).
pub fn json_value(text: &str) -> Option<serde_json::Value> {
    serde_json::from_str(text).ok()
}

/// Writes `text` to `path` through a temporary file renamed into place, so
/// a kill leaves either the old file or the whole new one.
pub fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).map_err(io_err(&tmp))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_differing_key_is_named() {
        let a = serde_json::json!({"lr": 1.0, "demo": {"seed": 1, "steps": 3}, "x": "same"});
        let b = serde_json::json!({"lr": 1.0, "demo": {"seed": 2, "steps": 3}, "x": "same"});
        assert_eq!(
            first_difference(&a, &b),
            Some(("demo.seed".into(), "1".into(), "2".into()))
        );
        assert_eq!(first_difference(&a, &a), None);
        let c = serde_json::json!({"lr": 1.0, "demo": {"seed": 1, "steps": 3}, "x": "same", "new": 4});
        assert_eq!(
            first_difference(&a, &c),
            Some(("new".into(), "unset".into(), "4".into()))
        );
    }

    #[test]
    fn logs_are_cut_back_to_a_cursor() {
        let dir = std::env::temp_dir().join(format!("aha-runlog-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut run = RunLog::open(&dir, None).unwrap_or_else(|e| panic!("{e}"));
        let m: aha_grpo::Metrics = [("loss".to_string(), 1.5)].into_iter().collect();
        for step in 1..=3 {
            run.metrics(None, step, &m).unwrap_or_else(|e| panic!("{e}"));
            run.sample(&serde_json::json!({ "step": step }))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        assert_eq!(
            run.cursor(),
            LogCursor {
                metrics_lines: 3,
                samples_lines: 3
            }
        );
        drop(run);
        let cut = LogCursor {
            metrics_lines: 1,
            samples_lines: 2,
        };
        let mut run = RunLog::open(&dir, Some(cut)).unwrap_or_else(|e| panic!("{e}"));
        run.metrics(Some("sft"), 2, &m).unwrap_or_else(|e| panic!("{e}"));
        let lines = run.read_metrics().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["phase"], "sft");
        assert_eq!(lines[1]["step"], 2);
        let samples = std::fs::read_to_string(dir.join("samples.jsonl")).unwrap_or_default();
        assert_eq!(samples.lines().count(), 2);
        // A cursor past the end of the file is a damaged folder, not silence.
        let long = LogCursor {
            metrics_lines: 9,
            samples_lines: 0,
        };
        assert!(RunLog::open(&dir, Some(long)).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
