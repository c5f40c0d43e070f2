//! Checkpoints that survive a kill: each save goes to a temporary folder,
//! every file is fsynced, the folder is renamed into place, and only then is
//! the `latest` pointer replaced (written to a temporary file, fsynced,
//! renamed over the old one). A kill at any moment leaves `latest` naming a
//! complete checkpoint.
//!
//! A checkpoint holds the weights in HF layout in f32 (`model/`), the reference
//! model when there is one (`reference/`), the optimizer moments
//! (`optimizer.safetensors`) and `state.json`: phase, step, optimizer step,
//! every RNG stream's state and the metrics cursor (lines of `metrics.jsonl`).

use std::fs::File;
use std::path::{Path, PathBuf};

use aha_moe_model::st::{read_file, write_f32};
use aha_moe_model::{Model, Policy, SaveDtype, SaveOptions};
use aha_tensor::CpuStorage;
use serde::{Deserialize, Serialize};

use crate::error::{io_err, Error, Result};
use crate::optim::Optimizer;

/// The non-tensor part of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainState {
    /// The run's phase or stage: `pretrain` or `grpo` (the demo, `aha
    /// grpo`), `sft` (`aha sft`, `aha distill`), or a stage of
    /// [`crate::pipeline::STAGES`].
    pub phase: String,
    /// Steps of `phase` completed.
    pub step: usize,
    /// The data generator's state.
    pub rng: u64,
    /// Optimizer updates applied.
    pub opt_step: u64,
    /// Consecutive non-finite updates so far.
    pub opt_bad: usize,
    /// Lines of `metrics.jsonl` written when the checkpoint was taken.
    pub metrics_lines: usize,
    /// Free-form numbers the run wants back (e.g. the base model's scores).
    pub extra: serde_json::Value,
    /// The order of the flat parameter buffer the optimizer moments follow
    /// ([`LAYOUT_VERSION`]; 0 in checkpoints written before it was recorded).
    #[serde(default)]
    pub layout: u32,
}

/// The flat buffer's order: 2 = trainable tensors first, each MoE layer's
/// experts stacked by projection, frozen tensors last. Moments saved in
/// another order cannot be resumed.
pub const LAYOUT_VERSION: u32 = 2;

fn sync_file(path: &Path) -> Result<()> {
    File::open(path).and_then(|f| f.sync_all()).map_err(io_err(path))
}

fn sync_tree(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let p = e.map_err(io_err(dir))?.path();
        if p.is_dir() {
            sync_tree(&p)?;
        } else {
            sync_file(&p)?;
        }
    }
    sync_file(dir)
}

/// Saves a checkpoint named `name` under `root` and points `root/latest` at it.
pub fn save(
    root: &Path,
    name: &str,
    state: &TrainState,
    model: &Policy,
    reference: Option<&Policy>,
    opt: &Optimizer,
) -> Result<PathBuf> {
    let state = &TrainState {
        layout: LAYOUT_VERSION,
        ..state.clone()
    };
    std::fs::create_dir_all(root).map_err(io_err(root))?;
    let tmp = root.join(format!(".tmp-{name}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    // f32 whatever the source's dtype: resuming needs the master weights
    // exactly (a run's final save writes the source's dtypes).
    let f32 = SaveOptions {
        dtype: SaveDtype::F32,
        max_shard_bytes: usize::MAX,
        ..SaveOptions::default()
    };
    model.save_as(&tmp.join("model"), &f32)?;
    if let Some(r) = reference {
        r.save_as(&tmp.join("reference"), &f32)?;
    }
    let (m, v, _, _) = opt.state(model)?;
    let n = m.len();
    write_f32(
        &tmp.join("optimizer.safetensors"),
        &[
            ("exp_avg".into(), vec![n], &m[..]),
            ("exp_avg_sq".into(), vec![n], &v[..]),
        ],
    )?;
    let sp = tmp.join("state.json");
    std::fs::write(&sp, serde_json::to_string_pretty(state).unwrap_or_default()).map_err(io_err(&sp))?;
    sync_tree(&tmp)?;
    let dst = root.join(name);
    if dst.exists() {
        std::fs::remove_dir_all(&dst).map_err(io_err(&dst))?;
    }
    std::fs::rename(&tmp, &dst).map_err(io_err(&dst))?;
    sync_file(root)?;
    let ptr_tmp = root.join(".latest.tmp");
    std::fs::write(&ptr_tmp, name).map_err(io_err(&ptr_tmp))?;
    sync_file(&ptr_tmp)?;
    std::fs::rename(&ptr_tmp, root.join("latest")).map_err(io_err(root))?;
    sync_file(root)?;
    Ok(dst)
}

/// What [`load_latest`] returns.
pub struct Loaded {
    /// The folder loaded.
    pub dir: PathBuf,
    /// The non-tensor state.
    pub state: TrainState,
    /// The weights.
    pub model: Model,
    /// The reference weights, if saved.
    pub reference: Option<Model>,
    /// Optimizer moments (exp_avg, exp_avg_sq).
    pub moments: (Vec<f32>, Vec<f32>),
}

/// Loads the checkpoint `root/latest` names, or `None` when there is none.
pub fn load_latest(root: &Path) -> Result<Option<Loaded>> {
    let ptr = root.join("latest");
    if !ptr.is_file() {
        return Ok(None);
    }
    let name = std::fs::read_to_string(&ptr).map_err(io_err(&ptr))?;
    let dir = root.join(name.trim());
    let sp = dir.join("state.json");
    let state: TrainState =
        serde_json::from_str(&std::fs::read_to_string(&sp).map_err(io_err(&sp))?).map_err(|e| Error::Checkpoint {
            path: sp.clone(),
            msg: e.to_string(),
        })?;
    if state.layout != LAYOUT_VERSION {
        return Err(Error::Checkpoint {
            path: sp,
            msg: format!(
                "written with parameter order {} (this build uses {LAYOUT_VERSION}): its optimizer state cannot be resumed; start a new run from its model/ folder",
                state.layout
            ),
        });
    }
    let model = Model::load(&dir.join("model"))?;
    let reference = if dir.join("reference").is_dir() {
        Some(Model::load(&dir.join("reference"))?)
    } else {
        None
    };
    let mut m = None;
    let mut v = None;
    for t in read_file(&dir.join("optimizer.safetensors"))? {
        if let CpuStorage::F32(x) = t.data {
            match t.name.as_str() {
                "exp_avg" => m = Some(x),
                "exp_avg_sq" => v = Some(x),
                _ => {}
            }
        }
    }
    let (Some(m), Some(v)) = (m, v) else {
        return Err(Error::Checkpoint {
            path: dir,
            msg: "optimizer.safetensors lacks exp_avg / exp_avg_sq".into(),
        });
    };
    Ok(Some(Loaded {
        dir,
        state,
        model,
        reference,
        moments: (m, v),
    }))
}
