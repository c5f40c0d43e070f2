//! Data parallelism for the training runs: every rank holds the whole
//! policy, takes its share of each global batch as whole prompt groups,
//! and sums its gradients with the other ranks before the identical AdamW
//! update on every rank ([`crate::rl::StepSync`]).
//!
//! On GPUs the gradients are summed by NCCL ([`aha_cuda_kernels::nccl`])
//! in place in the policy's flat gradient buffer, in buckets of
//! `AHA_DP_BUCKET_MB` megabytes (default 25, PyTorch DDP's), after the
//! backward: the backward is one call over all layers
//! (`Policy::backward`), so there is no per-layer hook to start a bucket's
//! all-reduce while earlier layers are still being differentiated. On the
//! CPU they go through rank 0 over the rendezvous sockets ([`Group`]),
//! which is correct but slow, for tests and small models. Batch
//! statistics and metrics always go through the rendezvous sockets.

use std::ops::Range;
use std::time::Instant;

use aha_cuda_kernels::nccl::{Comm, Nccl, UniqueId};
use aha_moe_model::Policy;

use crate::dist::{rendezvous_timeout, DistEnv, Group};
use crate::error::{Error, Result};
use crate::rl::StepSync;

fn err(msg: impl Into<String>) -> Error {
    Error::Dist(msg.into())
}

/// One rank of a data-parallel run.
#[derive(Debug)]
pub struct DataParallel {
    env: DistEnv,
    group: Group,
    comm: Option<Comm>,
    bucket_elems: usize,
    /// Seconds spent in gradient all-reduces since the last
    /// [`DataParallel::take_allreduce_s`].
    allreduce_s: f64,
}

/// Gradient bucket size in f32 elements: `AHA_DP_BUCKET_MB` (default 25).
fn bucket_elems() -> usize {
    let mb = std::env::var("AHA_DP_BUCKET_MB")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| *v > 0.0)
        .unwrap_or(25.0);
    ((mb * 1024.0 * 1024.0 / 4.0) as usize).max(1)
}

impl DataParallel {
    /// Joins the other ranks when the launch variables say there are any
    /// ([`DistEnv::from_env`]); `None` for a single process.
    pub fn from_env() -> Result<Option<DataParallel>> {
        match DistEnv::from_env()? {
            None => Ok(None),
            Some(env) => DataParallel::join(env).map(Some),
        }
    }

    /// Joins the rendezvous of `env` (see [`crate::dist`]).
    pub fn join(env: DistEnv) -> Result<DataParallel> {
        let group = Group::join(&env, rendezvous_timeout())?;
        Ok(DataParallel {
            env,
            group,
            comm: None,
            bucket_elems: bucket_elems(),
            allreduce_s: 0.0,
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.env.rank
    }

    /// The number of ranks.
    pub fn world(&self) -> usize {
        self.env.world
    }

    /// Whether this rank writes logs, metrics, plots and checkpoints (rank 0).
    pub fn is_writer(&self) -> bool {
        self.env.rank == 0
    }

    /// The device this rank trains on for a configured `spec`: `cuda` and
    /// `auto` become `cuda:LOCAL_RANK` (device 0 on the emulated GPU, which
    /// has one device per process); anything else is kept.
    pub fn device_spec(&self, spec: &str) -> String {
        match spec {
            "cuda" | "auto" if aha_cuda_kernels::device_count() > 0 => {
                let ordinal = if aha_cuda_kernels::emulate::emulated_gpu_requested() {
                    0
                } else {
                    self.env.local_rank
                };
                format!("cuda:{ordinal}")
            }
            other => other.to_string(),
        }
    }

    /// This rank's slice of `n` items (whole prompt groups): an equal share
    /// each, so `n` must divide by the number of ranks.
    pub fn shard(&self, n: usize, what: &str) -> Result<Range<usize>> {
        let w = self.env.world;
        if !n.is_multiple_of(w) {
            return Err(err(format!(
                "{what} = {n} does not divide by WORLD_SIZE = {w}: each rank takes an equal share of whole groups"
            )));
        }
        let k = n / w;
        Ok(self.env.rank * k..(self.env.rank + 1) * k)
    }

    /// Refuses GRPO settings that data parallelism does not support yet:
    /// dynamic sampling (ranks would refill at different rates), batch-wide
    /// reward scaling (advantages stay local to a rank's groups), and a
    /// number of prompts per step (or minibatches) that does not split
    /// evenly.
    pub fn check_grpo(&self, cfg: &crate::grpo_run::GrpoConfig) -> Result<()> {
        check_grpo(cfg, self.env.world)
    }

    /// The rendezvous group (host-side messages).
    pub fn group(&mut self) -> &mut Group {
        &mut self.group
    }

    /// `data parallel: N ranks, gradients summed by NCCL 2.x.y (path)`, or
    /// `... through rank 0 over TCP` on the CPU.
    pub fn describe(&self) -> String {
        let how = match &self.comm {
            Some(c) => format!("by NCCL {} ({})", c.nccl().version_string(), c.nccl().path().display()),
            None => "through rank 0 over TCP".into(),
        };
        format!("data parallel: {} ranks, gradients summed {how}", self.env.world)
    }

    /// Seconds spent summing gradients since the last call.
    pub fn take_allreduce_s(&mut self) -> f64 {
        std::mem::take(&mut self.allreduce_s)
    }

    /// The NCCL communicator on `gpu`, created on first use: rank 0 makes
    /// the unique id and sends it over the rendezvous group (or its reason
    /// for not having one, so that every rank fails with it).
    fn comm(&mut self, gpu: &std::sync::Arc<aha_cuda_kernels::Gpu>) -> Result<&mut Comm> {
        if self.comm.is_none() {
            let mine = if self.env.rank == 0 {
                match Nccl::get().and_then(|n| n.unique_id()) {
                    Ok(id) => [&[1u8][..], &id.0[..]].concat(),
                    Err(e) => [&[0u8][..], e.to_string().as_bytes()].concat(),
                }
            } else {
                Vec::new()
            };
            let got = self.group.broadcast_bytes(&mine)?;
            let id = match got.split_first() {
                Some((1, rest)) if rest.len() == 128 => {
                    let mut id = UniqueId([0; 128]);
                    id.0.copy_from_slice(rest);
                    id
                }
                Some((_, msg)) => {
                    return Err(err(format!(
                        "rank {}: rank 0 has no NCCL: {}",
                        self.env.rank,
                        String::from_utf8_lossy(msg)
                    )))
                }
                None => return Err(err("rank 0 sent an empty NCCL id")),
            };
            let nccl = Nccl::get().map_err(|e| err(format!("rank {}: {e}", self.env.rank)))?;
            let comm =
                Comm::init(nccl, gpu.clone(), &id, self.env.world, self.env.rank).map_err(|e| err(e.to_string()))?;
            self.comm = Some(comm);
        }
        self.comm.as_mut().ok_or_else(|| err("no NCCL communicator"))
    }
}

/// Refuses GRPO settings that data parallelism over `world` ranks does not
/// support yet: dynamic sampling (ranks would refill at different rates),
/// batch-wide reward scaling (advantages stay local to a rank's groups), and
/// a number of prompts per step (or minibatches) that does not split evenly.
pub fn check_grpo(cfg: &crate::grpo_run::GrpoConfig, world: usize) -> Result<()> {
    let w = world;
    if cfg.dynamic_sampling {
        return Err(err(format!(
            "dynamic_sampling is not supported with WORLD_SIZE = {w} yet"
        )));
    }
    if cfg.scale_rewards == aha_grpo::AdvantageEstimator::Batch {
        return Err(err(format!(
            "scale_rewards = \"batch\" needs batch-wide statistics; not supported with WORLD_SIZE = {w} yet"
        )));
    }
    if !cfg.prompts_per_step.is_multiple_of(w) {
        return Err(err(format!(
            "prompts_per_step = {} does not divide by WORLD_SIZE = {w}: each rank takes an equal share of whole groups",
            cfg.prompts_per_step
        )));
    }
    let rows = cfg.prompts_per_step / w * cfg.num_generations;
    if cfg.minibatches > 1 && !rows.is_multiple_of(cfg.minibatches) {
        return Err(err(format!(
            "minibatches = {} must divide each rank's {rows} completions (prompts_per_step / WORLD_SIZE x \
             num_generations) so that every rank makes the same updates",
            cfg.minibatches
        )));
    }
    Ok(())
}

impl StepSync for DataParallel {
    fn world(&self) -> usize {
        self.env.world
    }

    fn sum(&mut self, xs: &mut [f64]) -> Result<()> {
        self.group.sum_f64(xs)
    }

    fn gather(&mut self, xs: &[f64]) -> Result<Vec<f64>> {
        Ok(self.group.all_gather_f64(xs)?.concat())
    }

    fn reduce_grads(&mut self, policy: &mut Policy) -> Result<()> {
        let t = Instant::now();
        let bucket = self.bucket_elems;
        match policy.gpu_grads_mut()? {
            Some((gpu, grads)) => {
                let n = grads.len();
                let comm = self.comm(&gpu)?;
                let mut at = 0;
                while at < n {
                    let end = (at + bucket).min(n);
                    comm.all_reduce_sum(grads, at..end).map_err(|e| err(e.to_string()))?;
                    at = end;
                }
            }
            None => {
                let mut g = policy.grads_to_host()?;
                self.group.sum_f32(&mut g)?;
                policy.set_grads(&g)?;
            }
        }
        self.allreduce_s += t.elapsed().as_secs_f64();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpo_run::GrpoConfig;

    #[test]
    fn unsupported_grpo_settings_are_refused_by_name() {
        let ok = GrpoConfig {
            prompts_per_step: 4,
            num_generations: 4,
            dynamic_sampling: false,
            ..GrpoConfig::default()
        };
        check_grpo(&ok, 2).unwrap();
        check_grpo(&ok, 4).unwrap();
        let e = check_grpo(&ok, 3).unwrap_err().to_string();
        assert!(
            e.contains("prompts_per_step = 4") && e.contains("WORLD_SIZE = 3"),
            "{e}"
        );
        let ds = GrpoConfig {
            dynamic_sampling: true,
            ..ok.clone()
        };
        assert!(check_grpo(&ds, 2).unwrap_err().to_string().contains("dynamic_sampling"));
        let batch = GrpoConfig {
            scale_rewards: aha_grpo::AdvantageEstimator::Batch,
            ..ok.clone()
        };
        assert!(check_grpo(&batch, 2).unwrap_err().to_string().contains("scale_rewards"));
        // 2 prompts x 4 completions a rank do not split into 3 minibatches.
        let mb = GrpoConfig {
            minibatches: 3,
            ..ok.clone()
        };
        assert!(check_grpo(&mb, 2).unwrap_err().to_string().contains("minibatches = 3"));
        check_grpo(&GrpoConfig { minibatches: 4, ..ok }, 2).unwrap();
    }
}
