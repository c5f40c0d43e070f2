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
//!
//! A data-parallel run saves with every rank ([`save_ranks`]): rank 0
//! writes the weights, `state.json` and `ranks.json` (the number of ranks,
//! the ZeRO stage and each rank's range of the trainable parameters); the
//! optimizer state is rank 0's `optimizer.safetensors` (plain data
//! parallel, every rank holds all of it) or one
//! `optimizer-rank-NNNNN.safetensors` a rank (ZeRO-1, each rank's shard).
//! All ranks write into the same temporary folder and meet at a barrier
//! before rank 0 renames it into place, so a crash of any rank mid-save
//! leaves `latest` naming the previous complete checkpoint. The optimizer
//! state resumes on the same number of ranks only ([`check_ranks`]); the
//! weights (`model/`, a Hugging Face folder) start a new run on any.

use std::fs::File;
use std::path::{Path, PathBuf};

use aha_moe_model::st::{read_file, write_f32};
use aha_moe_model::{Model, Policy, SaveDtype, SaveOptions};
use aha_tensor::CpuStorage;
use serde::{Deserialize, Serialize};

use crate::dp::{OptimizerShard, RankCheckpoint};
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
    let tmp = fresh_tmp(root, name)?;
    write_weights(&tmp, model, reference)?;
    write_full_optimizer(&tmp, model, opt)?;
    finish(root, name, &tmp, state)
}

/// The ranks of a data-parallel save ([`save_ranks`]): how many, the ZeRO
/// stage, and each rank's range of the trainable parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RanksInfo {
    /// Ranks that saved.
    pub world_size: usize,
    /// 0: rank 0's `optimizer.safetensors` holds the whole state; 1: each
    /// rank's `optimizer-rank-NNNNN.safetensors` holds its shard (the
    /// moments, and `master`, the f32 master of the shard, when the
    /// policy keeps only its shard of it).
    pub zero_stage: u8,
    /// Elements of the trainable prefix.
    pub trainable: usize,
    /// Each rank's `[start, end)` of it (ZeRO-1; empty at stage 0).
    pub shards: Vec<[usize; 2]>,
    /// The expert-parallel degree when each rank held only its own routed
    /// experts: each rank's `optimizer-rank-NNNNN.safetensors` then holds
    /// the moments of its whole (expert-sharded) layout, and the weights
    /// rank 0 wrote are the gathered whole model. 1 otherwise (and in
    /// checkpoints written before the key existed).
    #[serde(default = "one")]
    pub expert_parallel: usize,
}

fn one() -> usize {
    1
}

/// The expert-parallel degree of `model` when its experts are sharded
/// over the ranks (1: every expert on every rank).
fn expert_shards(model: &Policy) -> usize {
    match (&model.layout().expert_shard, model.config().moe.as_ref()) {
        (Some(sh), Some(m)) if !sh.is_empty() => m.n_experts / sh.len(),
        _ => 1,
    }
}

fn shard_file(rank: usize) -> String {
    format!("optimizer-rank-{rank:05}.safetensors")
}

/// [`save`] by every rank of a data-parallel run (`ranks`; `None` or one
/// rank: [`save`] itself). Rank 0 writes the weights, `state.json` and
/// `ranks.json`, and the whole optimizer state at ZeRO stage 0; at stage 1
/// each rank writes its own shard. Every rank calls this at the same step;
/// rank 0 marks the save complete only after every rank has written and
/// synced its files, and every rank returns only then. Returns the
/// checkpoint's folder.
#[allow(clippy::too_many_arguments)]
pub fn save_ranks(
    root: &Path,
    name: &str,
    state: &TrainState,
    model: &Policy,
    reference: Option<&Policy>,
    opt: &Optimizer,
    ranks: Option<&RankCheckpoint>,
) -> Result<PathBuf> {
    let Some(rc) = ranks.filter(|r| r.world() > 1) else {
        return save(root, name, state, model, reference, opt);
    };
    let tmp = root.join(format!(".tmp-{name}"));
    let leader = rc.rank() == 0;
    // Rank 0 makes a fresh temporary folder; the others wait for it.
    let made = if leader {
        fresh_tmp(root, name).map(|_| ())
    } else {
        Ok(())
    };
    together(rc, made, "preparing", &tmp)?;
    // Sharded experts: every rank sends its experts for rank 0's weights
    // (a collective), and writes the moments of its own layout.
    let ep = expert_shards(model);
    let whole = match ep {
        1 => Ok(None),
        _ => model.gather_host_model().map(|m| Some(m.into_owned())),
    };
    let mine = (|| -> Result<()> {
        let whole = whole?;
        if leader {
            match &whole {
                Some(m) => write_weights_of(&tmp, m, reference)?,
                None => write_weights(&tmp, model, reference)?,
            }
        }
        // This rank's own optimizer file: the moments of its layout
        // (sharded experts) or its ZeRO-1 shard, with the f32 master of the
        // shard when the policy keeps only that (the weights rank 0 writes
        // are then the bf16 ones; the exact master is in the shards).
        let own = if ep > 1 {
            let (m, v, _, _) = opt.state(model)?;
            Some((m, v, None))
        } else {
            rc.optimizer_shard(model)?.map(|sh| (sh.m, sh.v, sh.master))
        };
        match own {
            Some((m, v, master)) => {
                let path = tmp.join(shard_file(rc.rank()));
                write_moments(&path, &m, &v, master.as_deref())?;
                sync_file(&path)?;
            }
            None if leader => write_full_optimizer(&tmp, model, opt)?,
            None => {}
        }
        if leader {
            let n = model.layout().trainable;
            let info = RanksInfo {
                world_size: rc.world(),
                zero_stage: rc.zero_stage(),
                trainable: n,
                shards: if rc.zero_stage() == 1 {
                    (0..rc.world())
                        .map(|r| {
                            let x = aha_cuda_kernels::nccl::shard_range(n, rc.world(), r);
                            [x.start, x.end]
                        })
                        .collect()
                } else {
                    Vec::new()
                },
                expert_parallel: ep,
            };
            let p = tmp.join("ranks.json");
            let text = serde_json::to_string_pretty(&info).map_err(|e| Error::Other(e.to_string()))?;
            std::fs::write(&p, text).map_err(io_err(&p))?;
        }
        Ok(())
    })();
    together(rc, mine, "writing", &tmp)?;
    // Every rank's files are synced: rank 0 marks the save complete.
    let done = if leader {
        finish(root, name, &tmp, state).map(|_| ())
    } else {
        Ok(())
    };
    together(rc, done, "completing", &tmp)?;
    Ok(root.join(name))
}

/// The part of a data-parallel save `root/name` ([`save_ranks`]) made by a
/// rank that does not write the run folder (every rank but 0): its ZeRO-1
/// optimizer shard, and its share in the agreement on each phase. Rank 0
/// writes the state, the weights and the reference.
pub fn save_rank_part(root: &Path, name: &str, model: &Policy, opt: &Optimizer, rc: &RankCheckpoint) -> Result<()> {
    // Only rank 0 writes `state.json`.
    let unread = TrainState {
        phase: String::new(),
        step: 0,
        rng: 0,
        opt_step: 0,
        opt_bad: 0,
        metrics_lines: 0,
        extra: serde_json::Value::Null,
        layout: LAYOUT_VERSION,
    };
    save_ranks(root, name, &unread, model, None, opt, Some(rc)).map(|_| ())
}

/// Every rank's outcome of one phase of [`save_ranks`]: this rank's error,
/// or an error naming the ranks that failed.
fn together(rc: &RankCheckpoint, r: Result<()>, what: &str, tmp: &Path) -> Result<()> {
    let all = rc.all_ok(r.is_ok())?;
    r?;
    let bad: Vec<String> = all
        .iter()
        .enumerate()
        .filter(|(_, ok)| !**ok)
        .map(|(i, _)| i.to_string())
        .collect();
    if bad.is_empty() {
        return Ok(());
    }
    Err(Error::Checkpoint {
        path: tmp.to_path_buf(),
        msg: format!(
            "rank(s) {} failed while {what} the checkpoint; the previous checkpoint stays the latest",
            bad.join(", ")
        ),
    })
}

/// `root/.tmp-NAME`, empty.
fn fresh_tmp(root: &Path, name: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(root).map_err(io_err(root))?;
    let tmp = root.join(format!(".tmp-{name}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    Ok(tmp)
}

/// [`write_weights`] of a model on the host (the policy's, or gathered).
fn write_weights_of(tmp: &Path, model: &Model, reference: Option<&Policy>) -> Result<()> {
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
    Ok(())
}

/// The weights (and the reference's) in f32 under `tmp`.
fn write_weights(tmp: &Path, model: &Policy, reference: Option<&Policy>) -> Result<()> {
    let m = model.host_model()?;
    write_weights_of(tmp, &m, reference)
}

/// The whole optimizer state as `tmp/optimizer.safetensors`.
fn write_full_optimizer(tmp: &Path, model: &Policy, opt: &Optimizer) -> Result<()> {
    let (m, v, _, _) = opt.state(model)?;
    write_moments(&tmp.join("optimizer.safetensors"), &m, &v, None)
}

/// AdamW's moments (`exp_avg`, `exp_avg_sq`) and, when given, an f32
/// master (`master`) as the safetensors file `path`.
fn write_moments(path: &Path, m: &[f32], v: &[f32], master: Option<&[f32]>) -> Result<()> {
    let mut tensors = vec![
        ("exp_avg".into(), vec![m.len()], m),
        ("exp_avg_sq".into(), vec![v.len()], v),
    ];
    if let Some(x) = master {
        tensors.push(("master".into(), vec![x.len()], x));
    }
    write_f32(path, &tensors)?;
    Ok(())
}

/// AdamW's two moments and an optional f32 master, as one optimizer file
/// holds them ([`write_moments`]).
type Moments = (Vec<f32>, Vec<f32>, Option<Vec<f32>>);

/// What [`write_moments`] wrote to `path`: the moments (an error naming
/// the file when either is missing) and the master if present.
fn read_moments(path: &Path) -> Result<Moments> {
    let (mut m, mut v, mut master) = (None, None, None);
    for t in read_file(path)? {
        if let CpuStorage::F32(x) = t.data {
            match t.name.as_str() {
                "exp_avg" => m = Some(x),
                "exp_avg_sq" => v = Some(x),
                "master" => master = Some(x),
                _ => {}
            }
        }
    }
    match (m, v) {
        (Some(m), Some(v)) => Ok((m, v, master)),
        _ => Err(Error::Checkpoint {
            path: path.to_path_buf(),
            msg: "lacks exp_avg / exp_avg_sq".into(),
        }),
    }
}

/// Writes `state.json`, syncs `tmp`, renames it to `root/name` and points
/// `root/latest` at it.
fn finish(root: &Path, name: &str, tmp: &Path, state: &TrainState) -> Result<PathBuf> {
    let state = &TrainState {
        layout: LAYOUT_VERSION,
        ..state.clone()
    };
    let tmp = tmp.to_path_buf();
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
    if read_ranks(&dir)?.is_some_and(|r| r.zero_stage == 1 || r.expert_parallel > 1) {
        // Sharded: each rank reads its own ([`load_optimizer_shard`]).
        return Ok(Some(Loaded {
            dir,
            state,
            model,
            reference,
            moments: (Vec::new(), Vec::new()),
        }));
    }
    let (m, v, _) = read_moments(&dir.join("optimizer.safetensors"))?;
    Ok(Some(Loaded {
        dir,
        state,
        model,
        reference,
        moments: (m, v),
    }))
}

/// The checkpoint `dir`'s `ranks.json` (`None`: saved by one process).
pub fn read_ranks(dir: &Path) -> Result<Option<RanksInfo>> {
    let p = dir.join("ranks.json");
    if !p.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&p).map_err(io_err(&p))?;
    serde_json::from_str(&text).map(Some).map_err(|e| Error::Checkpoint {
        path: p,
        msg: e.to_string(),
    })
}

/// Refuses to resume the optimizer state of checkpoint `dir` on `world`
/// ranks at ZeRO stage `zero_stage` when it was saved by another number of
/// ranks or at another stage, naming both and how to resume the weights
/// alone.
pub fn check_ranks(dir: &Path, world: usize, zero_stage: u8) -> Result<()> {
    let (saved, stage) = match read_ranks(dir)? {
        Some(r) => (r.world_size, r.zero_stage),
        None => (1, 0),
    };
    let world = world.max(1);
    // One process has no ZeRO stage to speak of.
    let zero_stage = if world == 1 { 0 } else { zero_stage };
    if saved == world && stage == zero_stage {
        return Ok(());
    }
    Err(Error::Checkpoint {
        path: dir.to_path_buf(),
        msg: format!(
            "the optimizer state was saved by {saved} rank(s) at zero_stage {stage}; this run has {world} rank(s) at \
             zero_stage {zero_stage}: resume with {saved} rank(s), or resume the weights only by starting a new run \
             (without --resume, in a new output folder) with model = {:?}",
            dir.join("model").display().to_string()
        ),
    })
}

/// Rank `rank`'s ZeRO-1 optimizer shard from checkpoint `dir` (saved by
/// `world` ranks: check with [`check_ranks`] first).
pub fn load_optimizer_shard(dir: &Path, rank: usize, world: usize) -> Result<OptimizerShard> {
    let bad = |msg: String| Error::Checkpoint {
        path: dir.to_path_buf(),
        msg,
    };
    let info = read_ranks(dir)?.ok_or_else(|| bad("no ranks.json: not a sharded checkpoint".into()))?;
    let range = info
        .shards
        .get(rank)
        .filter(|_| info.world_size == world)
        .ok_or_else(|| bad(format!("no optimizer shard for rank {rank} of {world}")))?;
    let (m, v, master) = read_moments(&dir.join(shard_file(rank)))?;
    Ok(OptimizerShard {
        trainable: info.trainable,
        range: range[0]..range[1],
        m,
        v,
        master,
    })
}

/// Restores the optimizer state of the checkpoint `loaded` for this run:
/// the whole state into `opt`, or (ZeRO-1) this rank's shard into `dp`
/// and the counters into `opt`. Refused, naming both, when the checkpoint
/// was saved by another number of ranks ([`check_ranks`]).
pub fn restore_optimizer(
    loaded_dir: &Path,
    moments: (Vec<f32>, Vec<f32>),
    state: &TrainState,
    policy: &mut Policy,
    opt: &mut Optimizer,
    dp: Option<&mut crate::dp::DataParallel>,
) -> Result<()> {
    let (world, stage) = dp.as_ref().map_or((1, 0), |d| (d.world(), d.zero_stage()));
    check_ranks(loaded_dir, world, stage)?;
    let saved_ep = read_ranks(loaded_dir)?.map_or(1, |r| r.expert_parallel);
    let ep = expert_shards(policy);
    if saved_ep != ep {
        return Err(Error::Checkpoint {
            path: loaded_dir.to_path_buf(),
            msg: format!(
                "the optimizer state was saved with the routed experts sharded over {saved_ep} rank(s) \
                 (expert_parallel); this run shards them over {ep}: resume with the same expert_parallel and \
                 zero_stage, or resume the weights only by starting a new run with model = {:?}",
                loaded_dir.join("model").display().to_string()
            ),
        });
    }
    if let (Some(d), true) = (dp.as_ref(), ep > 1) {
        let (m, v, _) = read_moments(&loaded_dir.join(shard_file(d.rank())))?;
        return opt.restore(policy, m, v, state.opt_step, state.opt_bad);
    }
    match dp {
        Some(d) if world > 1 && stage == 1 => {
            let shard = load_optimizer_shard(loaded_dir, d.rank(), world)?;
            d.restore_optimizer_shard(policy, shard)?;
            opt.restore_counters(state.opt_step, state.opt_bad);
            Ok(())
        }
        _ => opt.restore(policy, moments.0, moments.1, state.opt_step, state.opt_bad),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::dist::DistEnv;
    use crate::dp::DataParallel;
    use crate::optim::{OptimConfig, Schedule};
    use aha_moe_model::Precision;
    use aha_tensor::Device;

    fn state(step: usize) -> TrainState {
        TrainState {
            phase: "sft".into(),
            step,
            rng: 7,
            opt_step: step as u64,
            opt_bad: 0,
            metrics_lines: step,
            extra: serde_json::Value::Null,
            layout: LAYOUT_VERSION,
        }
    }

    /// Two ranks (threads) of a ZeRO-1 run save together; then rank 1 is
    /// gone when the next save starts: rank 0's save fails, and `latest`
    /// still names the complete first checkpoint, with both shards.
    #[test]
    fn a_rank_lost_mid_save_leaves_the_previous_checkpoint_the_latest() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let root = std::env::temp_dir().join(format!("aha-ranks-ckpt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/qwen2-tiny");
        let handles: Vec<_> = (0..2)
            .map(|rank| {
                let (root, fixture) = (root.clone(), fixture.clone());
                std::thread::spawn(move || -> Option<String> {
                    let env = DistEnv {
                        rank,
                        world: 2,
                        local_rank: rank,
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                    };
                    let mut dp = DataParallel::join(env).unwrap();
                    dp.set_zero_stage(1).unwrap();
                    let policy = Policy::new(Model::load(&fixture).unwrap(), Device::Cpu, Precision::F32).unwrap();
                    let opt = Optimizer::new(OptimConfig {
                        lr: 1e-3,
                        warmup_steps: 0,
                        total_steps: 4,
                        schedule: Schedule::Constant,
                        weight_decay: 0.0,
                        max_grad_norm: 1.0,
                        max_bad_steps: 0,
                    });
                    let ck = dp.checkpointer();
                    save_ranks(&root, "step-000002", &state(2), &policy, None, &opt, Some(&ck)).unwrap();
                    if rank == 1 {
                        // Gone before the next save: its sockets close.
                        return None;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    let e = save_ranks(&root, "step-000004", &state(4), &policy, None, &opt, Some(&ck));
                    Some(e.unwrap_err().to_string())
                })
            })
            .collect();
        let outs: Vec<Option<String>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let e = outs[0].clone().unwrap();
        assert!(e.contains("rank"), "{e}");
        assert_eq!(std::fs::read_to_string(root.join("latest")).unwrap(), "step-000002");
        assert!(!root.join("step-000004").exists());
        let l = load_latest(&root).unwrap().unwrap();
        assert_eq!(l.state.step, 2);
        let info = read_ranks(&l.dir).unwrap().unwrap();
        assert_eq!((info.world_size, info.zero_stage), (2, 1));
        let a = load_optimizer_shard(&l.dir, 0, 2).unwrap();
        let b = load_optimizer_shard(&l.dir, 1, 2).unwrap();
        assert_eq!(a.range.end, b.range.start);
        assert_eq!(b.range.end, info.trainable);
        assert_eq!(a.m.len() + b.m.len(), info.trainable);
        // The optimizer state of 2 ranks resumes on 2 only.
        check_ranks(&l.dir, 2, 1).unwrap();
        let e = check_ranks(&l.dir, 4, 1).unwrap_err().to_string();
        assert!(
            e.contains("saved by 2 rank(s)") && e.contains("this run has 4 rank(s)"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&root);
    }
}
