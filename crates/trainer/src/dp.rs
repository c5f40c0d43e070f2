//! Data parallelism for the training runs: every rank holds the whole
//! policy, takes its share of each global batch as whole prompt groups,
//! and sums its gradients with the other ranks before the identical AdamW
//! update on every rank ([`crate::rl::StepSync`]).
//!
//! On GPUs the gradients are summed by NCCL ([`aha_cuda_kernels::nccl`])
//! in place in the policy's flat gradient buffer, in buckets of
//! `AHA_DP_BUCKET_MB` megabytes (default 25, PyTorch DDP's), overlapped
//! with the backward as in PyTorch DDP: the buckets follow the order in
//! which the backward completes the gradients (head, last layer to first,
//! embedding: `Policy::grad_ready_parts`), the backward of a step's last
//! micro-batch reports each completed part (`Policy::backward_with_hook`),
//! and a bucket's all-reduce is queued on a communication stream (after an
//! event on the work stream) as soon as all of its elements are complete.
//! [`StepSync::reduce_grads`] queues what is left, and the work stream
//! (the optimizer step) waits for the communication stream. Each element is
//! summed by the same NCCL all-reduce as after the backward, so the sums
//! are bit-identical; `AHA_DP_OVERLAP=0` all-reduces the whole buffer
//! after the backward instead. On the
//! CPU they go through rank 0 over the rendezvous sockets ([`Group`]),
//! which is correct but slow, for tests and small models. Batch
//! statistics and metrics always go through the rendezvous sockets.

use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use aha_cuda_kernels::cudarc::driver::{CudaSlice, CudaStream};
use aha_cuda_kernels::launch::{self, AdamwScalars};
use aha_cuda_kernels::nccl::{shard_range, Comm, Nccl, UniqueId};
use aha_moe_model::{GradReady, Policy};
use aha_tensor::cpu::AdamW;

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
    /// Shared with [`RankCheckpoint`] handles (used between steps only).
    group: Arc<Mutex<Group>>,
    comm: Option<Comm>,
    bucket_elems: usize,
    /// Seconds spent in gradient all-reduces since the last
    /// [`DataParallel::take_allreduce_s`].
    allreduce_s: f64,
    /// ZeRO stage: 0 (every rank runs AdamW on the whole buffer) or 1
    /// (optimizer state sharded, [`DataParallel::set_zero_stage`]).
    zero_stage: u8,
    /// This rank's ZeRO-1 moments (created by the first update or a
    /// resume), shared with [`RankCheckpoint`] handles.
    shard: Arc<Mutex<Option<ShardState>>>,
    /// ZeRO-1: the device bytes of f32 master and moments this rank held
    /// after its last update ([`DataParallel::held_bytes`]).
    held: Option<HeldBytes>,
    /// Whether the all-reduce overlaps the backward (`AHA_DP_OVERLAP`,
    /// default on).
    overlap: bool,
    /// The overlapped all-reduce of the backward in flight.
    pending: Option<Overlap>,
    /// The communication stream (created by the first overlapped step).
    comm_stream: Option<Arc<CudaStream>>,
    /// The buckets of the last step: queued before its backward reached
    /// the embedding, in all.
    last_buckets: (usize, usize),
    /// Expert-parallel degree of the policy (1: off;
    /// [`DataParallel::set_expert_parallel`]).
    expert_parallel: usize,
}

/// The overlapped all-reduce of one backward: its buckets in the order the
/// backward completes them, the elements each still waits for, and the
/// next one to queue (every rank queues them in the same order).
#[derive(Debug)]
struct Overlap {
    buckets: Vec<Range<usize>>,
    left: Vec<usize>,
    next: usize,
    /// Buckets queued before the backward reported its last part (the
    /// embedding): sums that ran while layers were being differentiated.
    early: usize,
}

/// Whether `AHA_DP_OVERLAP` leaves the overlapped all-reduce on (anything
/// but `0`, `false`, `off` or `no`; default on).
fn overlap_enabled() -> bool {
    !matches!(
        std::env::var("AHA_DP_OVERLAP")
            .map(|v| v.trim().to_ascii_lowercase())
            .as_deref(),
        Ok("0" | "false" | "off" | "no")
    )
}

/// The all-reduce buckets of a gradient buffer of `n` elements whose parts
/// complete in the order of `parts` ([`Policy::grad_ready_parts`]): each
/// part's ranges cut into pieces of at most `bucket` elements, adjacent
/// pieces merged while they fit in one bucket, in completion order (as
/// DDP's buckets follow the reverse order of the parameters); elements no
/// part names (none for a policy's own parts) follow, in buckets from 0.
pub fn overlap_buckets(parts: &[Vec<Range<usize>>], n: usize, bucket: usize) -> Vec<Range<usize>> {
    let bucket = bucket.max(1);
    let mut out: Vec<Range<usize>> = Vec::new();
    let mut cur: Option<Range<usize>> = None;
    let mut covered: Vec<Range<usize>> = Vec::new();
    for r in parts.iter().flat_map(|p| p.iter().rev()) {
        let r = r.start.min(n)..r.end.min(n);
        // From the top down, as the layers complete.
        let mut end = r.end;
        while end > r.start {
            let piece = end.saturating_sub(bucket).max(r.start)..end;
            end = piece.start;
            covered.push(piece.clone());
            cur = match cur.take() {
                Some(c) if piece.end == c.start && c.len() + piece.len() <= bucket => Some(piece.start..c.end),
                Some(c) if piece.start == c.end && c.len() + piece.len() <= bucket => Some(c.start..piece.end),
                Some(c) => {
                    out.push(c);
                    Some(piece)
                }
                None => Some(piece),
            };
        }
    }
    out.extend(cur);
    covered.sort_by_key(|r| r.start);
    let mut gaps = Vec::new();
    let mut at = 0;
    for r in covered.iter().chain(std::iter::once(&(n..n))) {
        if r.start > at {
            gaps.push(at..r.start);
        }
        at = at.max(r.end);
    }
    for g in gaps {
        let mut s = g.start;
        while s < g.end {
            let e = (s + bucket).min(g.end);
            out.push(s..e);
            s = e;
        }
    }
    out
}

/// The parts of `buckets` inside `keep` (sorted, disjoint ranges), in
/// the buckets' order: a bucket cut where it leaves `keep`, one wholly
/// outside dropped. With the experts sharded over expert-parallel ranks
/// `keep` is [`aha_moe_model::Layout::replicated_ranges`]: the rank-local
/// experts are not summed with another rank's.
pub fn keep_within(buckets: Vec<Range<usize>>, keep: &[Range<usize>]) -> Vec<Range<usize>> {
    let mut out = Vec::with_capacity(buckets.len());
    for b in buckets {
        for k in keep {
            let (lo, hi) = (b.start.max(k.start), b.end.min(k.end));
            if lo < hi {
                out.push(lo..hi);
            }
        }
    }
    out
}

/// The optimizer state one ZeRO-1 rank holds on its GPU, from the
/// policy's own accounting ([`aha_moe_model::Policy::param_bytes`]) and
/// the shard's moments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldBytes {
    /// Elements of the trainable prefix.
    pub trainable: usize,
    /// This rank's share of them.
    pub shard: usize,
    /// Bytes of f32 master weights this rank updates: its shard when the
    /// master is sharded (bf16 precision), else the whole f32 weights
    /// (the weights the f32 kernels read are the master).
    pub master: u64,
    /// Bytes of AdamW's two moments (the shard's).
    pub moments: u64,
}

fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| err("a data-parallel lock was poisoned by a panic"))
}

/// AdamW's moments for this rank's shard of the trainable prefix (ZeRO-1).
#[derive(Debug)]
enum ShardMoments {
    /// On the host (a policy on the CPU).
    Host { m: Vec<f32>, v: Vec<f32> },
    /// On this rank's GPU.
    Gpu {
        gpu: Arc<aha_cuda_kernels::Gpu>,
        m: CudaSlice<f32>,
        v: CudaSlice<f32>,
    },
}

/// One rank's ZeRO-1 optimizer state.
#[derive(Debug)]
struct ShardState {
    /// The trainable prefix's length the shard was cut from.
    n: usize,
    /// This rank's shard of `0..n` ([`shard_range`]).
    own: std::ops::Range<usize>,
    moments: ShardMoments,
}

/// A ZeRO-1 optimizer shard on the host, for a checkpoint: this rank's
/// range of the trainable prefix and AdamW's moments over it.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerShard {
    /// Elements of the trainable prefix the shards split.
    pub trainable: usize,
    /// This rank's range of it.
    pub range: std::ops::Range<usize>,
    /// First moment over `range`.
    pub m: Vec<f32>,
    /// Second moment over `range`.
    pub v: Vec<f32>,
    /// The f32 master weights over `range` when the policy keeps only its
    /// shard of them (bf16 precision on a GPU,
    /// [`aha_moe_model::Policy::shard_master`]); `None` when the saved
    /// weights are the master.
    pub master: Option<Vec<f32>>,
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

/// One rank's part in a checkpoint written by every rank
/// ([`DataParallel::checkpointer`]).
#[derive(Debug, Clone)]
pub struct RankCheckpoint {
    rank: usize,
    world: usize,
    zero_stage: u8,
    group: Arc<Mutex<Group>>,
    shard: Arc<Mutex<Option<ShardState>>>,
}

impl RankCheckpoint {
    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// The ZeRO stage of the run (see [`DataParallel::set_zero_stage`]).
    pub fn zero_stage(&self) -> u8 {
        self.zero_stage
    }

    /// Waits until every rank gets here.
    pub fn barrier(&self) -> Result<()> {
        lock(&self.group)?.barrier()
    }

    /// Every rank's `flag` (true when it succeeded at something), so that
    /// all ranks fail together when one did.
    pub fn all_ok(&self, ok: bool) -> Result<Vec<bool>> {
        let all = lock(&self.group)?.all_gather_bytes(&[u8::from(ok)])?;
        Ok(all.iter().map(|b| b.first() == Some(&1)).collect())
    }

    /// This rank's ZeRO-1 optimizer shard on the host (zero moments before
    /// the first update); `None` at stage 0.
    pub fn optimizer_shard(&self, policy: &Policy) -> Result<Option<OptimizerShard>> {
        if self.zero_stage == 0 {
            return Ok(None);
        }
        let n = policy.layout().trainable;
        let range = shard_range(n, self.world, self.rank);
        let len = range.len();
        let (mut m, mut v) = match &*lock(&self.shard)? {
            None => (vec![0.0; len], vec![0.0; len]),
            Some(s) => match &s.moments {
                ShardMoments::Host { m, v } => (m.clone(), v.clone()),
                ShardMoments::Gpu { gpu, m, v } => (
                    gpu.download(m).map_err(|e| err(e.to_string()))?,
                    gpu.download(v).map_err(|e| err(e.to_string()))?,
                ),
            },
        };
        // Device buffers of an empty shard hold one unused element.
        m.truncate(len);
        v.truncate(len);
        let master = match policy.master_shard_to_host()? {
            Some((r, x)) if r == range => Some(x),
            Some((r, _)) => {
                return Err(err(format!(
                    "rank {}: the f32 master is sharded as {r:?}, the optimizer shard is {range:?}",
                    self.rank
                )))
            }
            None => None,
        };
        Ok(Some(OptimizerShard {
            trainable: n,
            range,
            m,
            v,
            master,
        }))
    }
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
            group: Arc::new(Mutex::new(group)),
            comm: None,
            bucket_elems: bucket_elems(),
            allreduce_s: 0.0,
            zero_stage: 0,
            shard: Arc::new(Mutex::new(None)),
            held: None,
            overlap: overlap_enabled(),
            pending: None,
            comm_stream: None,
            last_buckets: (0, 0),
            expert_parallel: 1,
        })
    }

    /// Sets the ZeRO stage (the `zero_stage` config key): 0, every rank
    /// keeps AdamW's moments for the whole buffer and runs the same update;
    /// 1, gradients are reduce-scattered so that each rank holds the sum
    /// over its contiguous shard of the trainable prefix
    /// ([`aha_cuda_kernels::nccl::shard_range`]), keeps the moments for that
    /// shard only, clips by the global norm, updates its shard, and the
    /// weights are all-gathered into every rank's parameter buffer. A
    /// policy in bf16 on a GPU (full-parameter training) keeps the f32
    /// master of its shard only ([`Policy::shard_master`], from
    /// [`shard_master`] when the run places the policy, else from the
    /// first update): the rank updates its shard of the master,
    /// writes its bf16 weights, and the ranks all-gather the bf16 weights
    /// (half the bytes of f32) and broadcast the few tensors the bf16
    /// kernels read in f32 (norms, biases, routers, the embedding). In f32
    /// the weights the kernels read are the master and the all-gather
    /// stays f32.
    pub fn set_zero_stage(&mut self, stage: u8) -> Result<()> {
        check_zero_stage(stage, false)?;
        self.zero_stage = stage;
        Ok(())
    }

    /// The ZeRO stage ([`DataParallel::set_zero_stage`]).
    pub fn zero_stage(&self) -> u8 {
        self.zero_stage
    }

    /// A handle for checkpoints written by every rank
    /// ([`crate::checkpoint::save_ranks`]): this rank's place, barriers
    /// over the rendezvous group and this rank's ZeRO-1 optimizer shard.
    /// It shares the group with this `DataParallel`: use it between steps.
    pub fn checkpointer(&self) -> RankCheckpoint {
        RankCheckpoint {
            rank: self.env.rank,
            world: self.env.world,
            zero_stage: self.zero_stage,
            group: self.group.clone(),
            shard: self.shard.clone(),
        }
    }

    /// Restores this rank's ZeRO-1 moments from a checkpoint's shard (it
    /// must be this rank's shard of the same trainable prefix).
    pub fn restore_optimizer_shard(&mut self, policy: &mut Policy, shard: OptimizerShard) -> Result<()> {
        let n = policy.layout().trainable;
        let own = shard_range(n, self.env.world, self.env.rank);
        if shard.trainable != n || shard.range != own || shard.m.len() != own.len() || shard.v.len() != own.len() {
            return Err(err(format!(
                "rank {}: the optimizer shard covers {:?} of {} trainable elements ({} / {} moments); this rank's shard is {own:?} of {n}",
                self.env.rank,
                shard.range,
                shard.trainable,
                shard.m.len(),
                shard.v.len()
            )));
        }
        if policy.shard_master(own.clone())? {
            if let Some(master) = &shard.master {
                policy.set_master_shard(master)?;
            }
        }
        let moments = match policy.gpu_grads_mut()? {
            Some((gpu, _)) => {
                let up = |x: &[f32]| -> Result<CudaSlice<f32>> {
                    if x.is_empty() {
                        gpu.zeros::<f32>(1).map_err(|e| err(e.to_string()))
                    } else {
                        gpu.upload(x).map_err(|e| err(e.to_string()))
                    }
                };
                ShardMoments::Gpu {
                    m: up(&shard.m)?,
                    v: up(&shard.v)?,
                    gpu,
                }
            }
            None => ShardMoments::Host { m: shard.m, v: shard.v },
        };
        *lock(&self.shard)? = Some(ShardState { n, own, moments });
        Ok(())
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

    /// Refuses GRPO settings that data parallelism does not support yet
    /// (see [`check_grpo`]).
    pub fn check_grpo(&self, cfg: &crate::grpo_run::GrpoConfig) -> Result<()> {
        check_grpo(cfg, self.env.world)
    }

    /// The rendezvous group (host-side messages).
    pub fn group(&self) -> Result<MutexGuard<'_, Group>> {
        lock(&self.group)
    }

    /// `data parallel: N ranks, gradients summed by NCCL 2.x.y (path)`, or
    /// `... through rank 0 over TCP` on the CPU, and `, optimizer state
    /// sharded over the ranks (ZeRO-1)` at ZeRO stage 1.
    pub fn describe(&self) -> String {
        let how = match &self.comm {
            Some(c) => format!("by NCCL {} ({})", c.nccl().version_string(), c.nccl().path().display()),
            None => "through rank 0 over TCP".into(),
        };
        let zero = match (self.zero_stage, self.held) {
            (1, Some(h)) => format!(
                ", optimizer state sharded over the ranks (ZeRO-1): rank {} holds the f32 master and moments of \
                 {} of {} trainable parameters, master {} bytes, moments {} bytes",
                self.env.rank, h.shard, h.trainable, h.master, h.moments
            ),
            (1, None) => ", optimizer state sharded over the ranks (ZeRO-1)".into(),
            _ => String::new(),
        };
        let when = match self.last_buckets {
            (_, 0) => String::new(),
            (0, all) => format!(", {all} gradient buckets all-reduced after the backward"),
            (early, all) => {
                format!(", {early} of {all} gradient buckets all-reduced before the backward reached the embedding")
            }
        };
        let ep = match self.expert_parallel {
            1 => String::new(),
            n => format!(", routed experts split over {n} ranks (expert_parallel = {n})"),
        };
        format!(
            "data parallel: {} ranks, gradients summed {how}{zero}{when}{ep}",
            self.env.world
        )
    }

    /// The gradient buckets of the last step: how many were queued while
    /// its backward was still differentiating layers (before it reported
    /// its last part, the embedding), and how many there were.
    pub fn last_buckets(&self) -> (usize, usize) {
        self.last_buckets
    }

    /// `(rank, world)` when this run shards the optimizer state (ZeRO
    /// stage 1 on several ranks): what [`shard_master`] takes.
    pub fn zero1_place(&self) -> Option<(usize, usize)> {
        (self.zero_stage == 1 && self.env.world > 1).then_some((self.env.rank, self.env.world))
    }

    /// ZeRO-1: the optimizer state this rank held after its last update
    /// (`None` at stage 0 or before the first update).
    pub fn held_bytes(&self) -> Option<HeldBytes> {
        self.held
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
            let comm = self.new_comm(gpu)?;
            self.comm = Some(comm);
        }
        self.comm.as_mut().ok_or_else(|| err("no NCCL communicator"))
    }

    /// A new NCCL communicator over every rank on `gpu`: rank 0 makes the
    /// unique id and sends it over the rendezvous group (or its reason for
    /// not having one, so that every rank fails with it). Every rank must
    /// call it at the same point.
    fn new_comm(&mut self, gpu: &std::sync::Arc<aha_cuda_kernels::Gpu>) -> Result<Comm> {
        {
            let mine = if self.env.rank == 0 {
                match Nccl::get().and_then(|n| n.unique_id()) {
                    Ok(id) => [&[1u8][..], &id.0[..]].concat(),
                    Err(e) => [&[0u8][..], e.to_string().as_bytes()].concat(),
                }
            } else {
                Vec::new()
            };
            let got = self.group()?.broadcast_bytes(&mine)?;
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
            Comm::init(nccl, gpu.clone(), &id, self.env.world, self.env.rank).map_err(|e| err(e.to_string()))
        }
    }

    /// Expert parallelism of degree `degree` (the `expert_parallel` config
    /// key; 1 leaves it off): the policy gets a second NCCL communicator
    /// over every rank (the first one sums the gradients), through which
    /// every MoE layer of its training forward and backward sends each
    /// token row to the rank that owns its expert
    /// ([`Policy::set_expert_parallel`]). The degree must be the number of
    /// ranks ([`check_expert_parallel`]); every rank must call this at the
    /// same point, with the policy on its GPU. From then on every forward
    /// and backward of the policy is a collective: the training step runs
    /// them in lockstep ([`StepSync::lockstep`]) and the gradients' sum no
    /// longer overlaps the backward (two communicators' kernels at once on
    /// a GPU can block each other). Rollouts and evaluation go through the
    /// sampler engine, which runs the whole model on each rank.
    pub fn set_expert_parallel(&mut self, policy: &mut Policy, degree: usize) -> Result<()> {
        if degree <= 1 {
            return Ok(());
        }
        if degree != self.env.world {
            return Err(err(format!(
                "expert_parallel = {degree} must equal WORLD_SIZE = {}",
                self.env.world
            )));
        }
        let gpu = policy
            .gpu()
            .ok_or_else(|| err("expert_parallel needs the policy on a GPU (device = \"cuda\")"))?;
        let comm = self.new_comm(&gpu)?;
        policy.set_expert_parallel(Some(comm))?;
        self.expert_parallel = degree;
        Ok(())
    }

    /// The expert-parallel degree (1: off).
    pub fn expert_parallel(&self) -> usize {
        self.expert_parallel
    }
}

/// Checks the `expert_parallel` config key of a run on `world` ranks: 1
/// (off) or the number of ranks (each rank computes `E / world` routed
/// experts for every rank's tokens), which must divide the model's
/// `routed_experts` (0: not an MoE model); a GPU run (`on_gpu`); neither
/// `offload_optimizer` nor LoRA. The error names the key and says what is
/// wrong.
pub fn check_expert_parallel(
    degree: usize,
    world: usize,
    routed_experts: usize,
    on_gpu: bool,
    offload_optimizer: bool,
    lora: bool,
) -> std::result::Result<(), String> {
    let bad = |msg: String| Err(format!("expert_parallel = {degree}: {msg}"));
    if degree == 0 {
        return bad("must be at least 1 (1: off)".into());
    }
    if degree == 1 {
        return Ok(());
    }
    if degree != world {
        return bad(format!(
            "must equal WORLD_SIZE, the number of ranks (this run has {world}; start it with \
             `aha launch --nproc-per-node {degree} -- ...`)"
        ));
    }
    if routed_experts == 0 {
        return bad("needs an MoE model with routed experts (this model has none)".into());
    }
    if !routed_experts.is_multiple_of(degree) {
        return bad(format!(
            "must divide the number of routed experts ({routed_experts}): each rank computes an equal share"
        ));
    }
    if !on_gpu {
        return bad("runs on GPUs only: set device = \"cuda\"".into());
    }
    if offload_optimizer {
        return bad("cannot be combined with offload_optimizer = true".into());
    }
    if lora {
        return bad("cannot be combined with [lora] (the routed experts take no adapters)".into());
    }
    Ok(())
}

/// ZeRO-1 on rank `rank` of `world`: makes `policy` keep only its shard
/// of the f32 master ([`Policy::shard_master`]; bf16 full-parameter
/// training on a GPU, nothing otherwise). The runs call it right after
/// placing the policy, so that a rank never holds the whole f32 master
/// and the gradients at once (the first update would shard it too).
pub fn shard_master(policy: &mut Policy, rank: usize, world: usize) -> Result<bool> {
    let n = policy.layout().trainable;
    Ok(policy.shard_master(shard_range(n, world, rank))?)
}

/// Checks the `zero_stage` config key: 0 or 1, and 1 not with
/// `offload_optimizer` (the offloaded optimizer keeps the whole state on
/// the host).
pub fn check_zero_stage(stage: u8, offload_optimizer: bool) -> Result<()> {
    if stage > 1 {
        return Err(err(format!("zero_stage = {stage}: only 0 and 1 are supported")));
    }
    if stage == 1 && offload_optimizer {
        return Err(err(
            "zero_stage = 1 and offload_optimizer = true cannot be combined: the offloaded optimizer keeps the whole state on the host",
        ));
    }
    Ok(())
}

/// Refuses GRPO settings that data parallelism over `world` ranks does not
/// support: a number of prompts per step (or minibatches) that does not
/// split evenly. Batch-wide reward scaling works: the advantages are
/// computed on the gathered global batch (`rl::train_on_synced`); so does
/// dynamic sampling: each rank refills its own share of whole groups, the
/// ranks summing what each still needs so that every rank draws the same
/// prompts from the data cursor (`grpo_run`).
pub fn check_grpo(cfg: &crate::grpo_run::GrpoConfig, world: usize) -> Result<()> {
    let w = world;
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

    fn rank(&self) -> usize {
        self.env.rank
    }

    fn sum(&mut self, xs: &mut [f64]) -> Result<()> {
        self.group()?.sum_f64(xs)
    }

    fn gather(&mut self, xs: &[f64]) -> Result<Vec<f64>> {
        Ok(self.group()?.all_gather_f64(xs)?.concat())
    }

    fn lockstep(&self) -> bool {
        self.expert_parallel > 1
    }

    fn overlap_backward(&mut self, policy: &Policy) -> Result<bool> {
        self.pending = None;
        if !self.overlap || self.zero_stage != 0 || self.env.world < 2 || self.expert_parallel > 1 {
            return Ok(false);
        }
        let n = policy.layout().trainable;
        let mut buckets = overlap_buckets(&policy.grad_ready_parts(), n, self.bucket_elems);
        if policy.layout().expert_shard.is_some() {
            buckets = keep_within(buckets, &policy.layout().replicated_ranges());
        }
        let left = buckets.iter().map(|b| b.len()).collect();
        self.pending = Some(Overlap {
            buckets,
            left,
            next: 0,
            early: 0,
        });
        Ok(true)
    }

    fn grads_ready(&mut self, ready: GradReady<'_>) -> Result<()> {
        let Some(mut ov) = self.pending.take() else {
            return Ok(());
        };
        for r in ready.ranges {
            for (b, left) in ov.buckets.iter().zip(ov.left.iter_mut()) {
                let (lo, hi) = (r.start.max(b.start), r.end.min(b.end));
                if lo < hi {
                    *left = left.saturating_sub(hi - lo);
                }
            }
        }
        // Queued by the reports before this one: after the last report
        // (the embedding), the buckets sent while layers were left.
        ov.early = ov.next;
        let r = self.queue_ready(&mut ov, ready.gpu, ready.grads, false);
        self.pending = Some(ov);
        r
    }

    fn reduce_grads(&mut self, policy: &mut Policy) -> Result<()> {
        let t = Instant::now();
        let bucket = self.bucket_elems;
        let trainable = policy.layout().trainable;
        let zero = self.zero_stage;
        let pending = self.pending.take();
        // Sharded experts: each rank's are its own (expert parallel degree
        // = the world), summed with no other rank's.
        let sharded = policy.layout().expert_shard.is_some();
        let replicated = policy.layout().replicated_ranges();
        if sharded && zero == 1 {
            return Err(err("ZeRO-1 with the experts sharded over the ranks is not supported"));
        }
        match policy.gpu_grads_mut()? {
            Some((gpu, grads)) if pending.is_some() => {
                if let Some(mut ov) = pending {
                    // What the backward did not report, then the work
                    // stream (the optimizer) waits for the sums.
                    self.queue_ready(&mut ov, &gpu, grads, true)?;
                    let stream = self.comm_stream(&gpu)?;
                    gpu.stream()
                        .join(&stream)
                        .map_err(|e| err(format!("ordering the work stream after the all-reduce: {e:?}")))?;
                    self.comm(&gpu)?
                        .wait_stream(&stream, "the overlapped gradient all-reduce")
                        .map_err(|e| err(e.to_string()))?;
                    self.last_buckets = (ov.early, ov.buckets.len());
                }
            }
            Some((gpu, grads)) if zero == 1 => {
                // ZeRO-1: each rank needs the sum over its shard only.
                let comm = self.comm(&gpu)?;
                comm.reduce_scatter_sum_shards(grads, trainable)
                    .map_err(|e| err(e.to_string()))?;
            }
            Some((gpu, grads)) => {
                let n = grads.len();
                let ranges = if sharded {
                    replicated
                } else {
                    std::iter::once(0..n).collect()
                };
                let comm = self.comm(&gpu)?;
                let mut count = 0;
                for r in ranges {
                    let mut at = r.start;
                    while at < r.end {
                        let end = (at + bucket).min(r.end);
                        comm.all_reduce_sum(grads, at..end).map_err(|e| err(e.to_string()))?;
                        at = end;
                        count += 1;
                    }
                }
                self.last_buckets = (0, count);
            }
            None => {
                let mut g = policy.grads_to_host()?;
                self.group()?.sum_f32(&mut g)?;
                policy.set_grads(&g)?;
            }
        }
        self.allreduce_s += t.elapsed().as_secs_f64();
        Ok(())
    }

    fn sharded_update(&mut self, policy: &mut Policy, h: &AdamW, t: u64, max_grad_norm: f64) -> Result<Option<f64>> {
        if self.zero_stage == 0 {
            return Ok(None);
        }
        zero1_update(self, policy, h, t, max_grad_norm).map(Some)
    }
}

impl DataParallel {
    /// The communication stream on `gpu`, created on first use.
    fn comm_stream(&mut self, gpu: &Arc<aha_cuda_kernels::Gpu>) -> Result<Arc<CudaStream>> {
        if let Some(s) = &self.comm_stream {
            return Ok(s.clone());
        }
        let s = gpu
            .context()
            .new_stream()
            .map_err(|e| err(format!("creating the communication stream: {e:?}")))?;
        self.comm_stream = Some(s.clone());
        Ok(s)
    }

    /// Queues, in order, the buckets of `ov` whose elements are all
    /// complete (every remaining one when `all`), on the communication
    /// stream after the work queued so far on `gpu`'s stream.
    fn queue_ready(
        &mut self,
        ov: &mut Overlap,
        gpu: &Arc<aha_cuda_kernels::Gpu>,
        grads: &mut CudaSlice<f32>,
        all: bool,
    ) -> Result<()> {
        let ready = |ov: &Overlap| ov.next < ov.buckets.len() && (all || ov.left[ov.next] == 0);
        if !ready(ov) {
            return Ok(());
        }
        let stream = self.comm_stream(gpu)?;
        stream
            .join(gpu.stream())
            .map_err(|e| err(format!("ordering the communication stream after the backward: {e:?}")))?;
        let comm = self.comm(gpu)?;
        while ready(ov) {
            comm.all_reduce_sum_queued(&stream, grads, ov.buckets[ov.next].clone())
                .map_err(|e| err(e.to_string()))?;
            ov.next += 1;
        }
        Ok(())
    }
}

/// ZeRO-1's update on one rank (see [`DataParallel::set_zero_stage`]);
/// the gradients' shard was summed by [`StepSync::reduce_grads`].
fn zero1_update(dp: &mut DataParallel, policy: &mut Policy, h: &AdamW, t: u64, max_grad_norm: f64) -> Result<f64> {
    let n = policy.layout().trainable;
    let (rank, world) = (dp.env.rank, dp.env.world);
    let own = shard_range(n, world, rank);
    let shard = dp.shard.clone();
    let mut shard = lock(&shard)?;
    if let Some(s) = &*shard {
        if s.n != n || s.own != own {
            return Err(err(format!(
                "rank {rank}: ZeRO-1 moments for {:?} of {}, the policy's shard is {own:?} of {n}",
                s.own, s.n
            )));
        }
    }
    let dev = |e: aha_cuda_kernels::Error| err(format!("rank {rank}: ZeRO-1 update: {e}"));
    if policy.shard_master(own.clone())? {
        let norm = sharded_master_update(dp, policy, &mut shard, h, t, max_grad_norm)?;
        if norm.is_finite() {
            policy.params_updated()?;
        }
        dp.held = Some(held_bytes(policy, &shard, n, own.len()));
        return Ok(norm);
    }
    let norm = match policy.gpu_params_and_grads_mut()? {
        Some((gpu, params, grads)) => {
            let len = own.len();
            let (norm, moments) = clip_shard(dp, &gpu, grads, &own, n, &mut shard, max_grad_norm)?;
            let Some((m, v)) = moments else {
                return Ok(norm);
            };
            let sc = AdamwScalars::new(h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, t).map_err(dev)?;
            if len > 0 {
                launch::adamw_f32(
                    &gpu,
                    &mut params.slice_mut(own.clone()),
                    m,
                    v,
                    &grads.slice(own.clone()),
                    len,
                    &sc,
                )
                .map_err(dev)?;
            }
            let started = Instant::now();
            dp.comm(&gpu)?.all_gather_shards(params, n).map_err(dev)?;
            dp.allreduce_s += started.elapsed().as_secs_f64();
            norm
        }
        None => {
            // The CPU: the gradients were all-reduced through rank 0; each
            // rank updates its shard and the shards go round the group.
            let mut g = policy.grads_to_host()?;
            let mut p = policy.params_to_host()?;
            let gs = &mut g[own.clone()];
            let mut sq = [gs.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>()];
            dp.group()?.sum_f64(&mut sq)?;
            let norm = sq[0].sqrt();
            if !norm.is_finite() {
                return Ok(norm);
            }
            let coef = max_grad_norm / (norm + 1e-6);
            if coef < 1.0 {
                let c = coef as f32;
                gs.iter_mut().for_each(|x| *x *= c);
            }
            let ShardState { moments, .. } = shard.get_or_insert_with(|| ShardState {
                n,
                own: own.clone(),
                moments: ShardMoments::Host {
                    m: vec![0.0; own.len()],
                    v: vec![0.0; own.len()],
                },
            });
            let ShardMoments::Host { m, v } = moments else {
                return Err(err(format!(
                    "rank {rank}: ZeRO-1 moments on a GPU for a policy on the CPU"
                )));
            };
            aha_tensor::cpu::adamw_step(&mut p[own.clone()], gs, m, v, h, t).map_err(|e| err(e.to_string()))?;
            let mine: Vec<u8> = p[own.clone()].iter().flat_map(|x| x.to_le_bytes()).collect();
            let all = dp.group()?.all_gather_bytes(&mine)?;
            for (r, bytes) in all.iter().enumerate() {
                let range = shard_range(n, world, r);
                if bytes.len() != 4 * range.len() {
                    return Err(err(format!(
                        "ZeRO-1 all-gather: rank {r} sent {} bytes for its {} weights",
                        bytes.len(),
                        range.len()
                    )));
                }
                for (x, c) in p[range].iter_mut().zip(bytes.chunks_exact(4)) {
                    *x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            policy.set_params(&p)?;
            norm
        }
    };
    policy.params_updated()?;
    dp.held = Some(held_bytes(policy, &shard, n, own.len()));
    Ok(norm)
}

/// The optimizer state this rank holds now (see [`HeldBytes`]).
fn held_bytes(policy: &Policy, shard: &Option<ShardState>, trainable: usize, len: usize) -> HeldBytes {
    let empty = aha_moe_model::Moments::Cpu {
        m: Vec::new(),
        v: Vec::new(),
    };
    let b = policy.param_bytes(&empty);
    let moments = match shard {
        Some(ShardState {
            moments: ShardMoments::Gpu { m, v, .. },
            ..
        }) => 4 * (m.len() + v.len()) as u64,
        Some(ShardState {
            moments: ShardMoments::Host { m, v },
            ..
        }) => 4 * (m.len() + v.len()) as u64,
        None => 0,
    };
    HeldBytes {
        trainable,
        shard: len,
        master: if b.master > 0 { b.master } else { b.weights },
        moments,
    }
}

/// The range of the packed f32 tensors (`resident`: `(offset, length,
/// packed offset)` sorted by offset, packed in that order) that holds the
/// elements of `range` of the flat layout: one contiguous span.
fn packed_span(resident: &[(usize, usize, usize)], range: &Range<usize>) -> Range<usize> {
    let mut span: Option<Range<usize>> = None;
    for &(off, len, at) in resident {
        let (a, b) = (off.max(range.start), (off + len).min(range.end));
        if a < b {
            let (lo, hi) = (at + a - off, at + b - off);
            span = Some(span.map_or(lo..hi, |s| s.start..hi));
        }
    }
    span.unwrap_or(0..0)
}

/// AdamW's two moments of a shard on a GPU.
type Moments2<'s> = (&'s mut CudaSlice<f32>, &'s mut CudaSlice<f32>);

/// ZeRO-1 on a GPU, before the update of this rank's shard `own` of the
/// trainable prefix (`n` elements): the global gradient norm (each
/// shard's sum of squares, summed over the ranks), the shard's gradients
/// clipped to `max_grad_norm`, and this rank's moments (zeros at the first
/// update). Returns the norm, and the moments unless the norm is not
/// finite (then nothing was changed).
fn clip_shard<'s>(
    dp: &mut DataParallel,
    gpu: &Arc<aha_cuda_kernels::Gpu>,
    grads: &mut CudaSlice<f32>,
    own: &Range<usize>,
    n: usize,
    shard: &'s mut Option<ShardState>,
    max_grad_norm: f64,
) -> Result<(f64, Option<Moments2<'s>>)> {
    let rank = dp.env.rank;
    let dev = |e: aha_cuda_kernels::Error| err(format!("rank {rank}: ZeRO-1 update: {e}"));
    let len = own.len();
    let local = if len == 0 {
        0.0
    } else {
        launch::grad_norm_f32(gpu, &grads.slice(own.clone()), len).map_err(dev)?
    };
    let mut sq = [local * local];
    dp.group()?.sum_f64(&mut sq)?;
    let norm = sq[0].sqrt();
    if !norm.is_finite() {
        return Ok((norm, None));
    }
    let coef = max_grad_norm / (norm + 1e-6);
    if coef < 1.0 && len > 0 {
        launch::scale_f32(gpu, &mut grads.slice_mut(own.clone()), coef as f32, len).map_err(dev)?;
    }
    if shard.is_none() {
        *shard = Some(ShardState {
            n,
            own: own.clone(),
            moments: ShardMoments::Gpu {
                m: gpu.zeros::<f32>(len.max(1)).map_err(dev)?,
                v: gpu.zeros::<f32>(len.max(1)).map_err(dev)?,
                gpu: gpu.clone(),
            },
        });
    }
    match shard.as_mut() {
        Some(ShardState {
            moments: ShardMoments::Gpu { m, v, .. },
            ..
        }) => Ok((norm, Some((m, v)))),
        _ => Err(err(format!(
            "rank {rank}: ZeRO-1 moments on the host for a policy on a GPU"
        ))),
    }
}

/// ZeRO-1's update on a GPU with the f32 master sharded
/// ([`Policy::shard_master`]): the global norm over the shards, clipping,
/// AdamW on this rank's master shard writing its bf16 weights in the same
/// launch, its part of the packed f32 tensors refreshed from the master,
/// then the bf16 weights all-gathered and each rank's part of the packed
/// f32 tensors broadcast. Returns the norm (a non-finite norm changes
/// nothing).
fn sharded_master_update(
    dp: &mut DataParallel,
    policy: &mut Policy,
    shard: &mut Option<ShardState>,
    h: &AdamW,
    t: u64,
    max_grad_norm: f64,
) -> Result<f64> {
    let (rank, world) = (dp.env.rank, dp.env.world);
    let n = policy.layout().trainable;
    let dev = |e: aha_cuda_kernels::Error| err(format!("rank {rank}: ZeRO-1 update: {e}"));
    let Some(parts) = policy.gpu_zero1_parts()? else {
        return Err(err(format!("rank {rank}: ZeRO-1: the f32 master is not sharded")));
    };
    let aha_moe_model::gpu::Zero1Parts {
        gpu,
        range: own,
        master,
        weights_bf16,
        packed,
        resident,
        grads,
    } = parts;
    if own != shard_range(n, world, rank) {
        return Err(err(format!(
            "rank {rank}: the f32 master is sharded as {own:?}, this rank's shard is {:?} of {n}",
            shard_range(n, world, rank)
        )));
    }
    let len = own.len();
    let (norm, moments) = clip_shard(dp, &gpu, grads, &own, n, shard, max_grad_norm)?;
    let Some((m, v)) = moments else {
        return Ok(norm);
    };
    let sc = AdamwScalars::new(h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, t).map_err(dev)?;
    if len > 0 {
        // The kernel plain data parallel runs over the whole buffer: the
        // same master and bf16 weights element by element.
        launch::adamw_copy_bf16_f32(
            &gpu,
            master,
            m,
            v,
            &mut weights_bf16.slice_mut(own.clone()),
            &grads.slice(own.clone()),
            len,
            &sc,
        )
        .map_err(dev)?;
        // This rank's part of the tensors the kernels read in f32.
        for &(off, l, at) in resident {
            let (a, b) = (off.max(own.start), (off + l).min(own.end));
            if a < b {
                gpu.stream()
                    .memcpy_dtod(
                        &master.slice(a - own.start..b - own.start),
                        &mut packed.slice_mut(at + a - off..at + b - off),
                    )
                    .map_err(|e| err(format!("rank {rank}: ZeRO-1 update: device copy: {e:?}")))?;
            }
        }
    }
    let started = Instant::now();
    let comm = dp.comm(&gpu)?;
    comm.all_gather_shards(weights_bf16, n).map_err(dev)?;
    for r in 0..world {
        let span = packed_span(resident, &shard_range(n, world, r));
        if !span.is_empty() {
            comm.broadcast_range(packed, span, r).map_err(dev)?;
        }
    }
    dp.allreduce_s += started.elapsed().as_secs_f64();
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpo_run::GrpoConfig;

    /// `expert_parallel`: 1 is off whatever else; N > 1 needs N ranks, an
    /// MoE model whose routed experts divide by N, a GPU, and neither the
    /// offloaded optimizer nor LoRA; each refusal names the key and why.
    #[test]
    fn expert_parallel_checks_name_the_key_and_the_reason() {
        assert_eq!(check_expert_parallel(1, 3, 0, false, true, true), Ok(()));
        assert_eq!(check_expert_parallel(2, 2, 8, true, false, false), Ok(()));
        assert_eq!(check_expert_parallel(4, 4, 8, true, false, false), Ok(()));
        for (args, why) in [
            ((0, 2, 8, true, false, false), "at least 1"),
            ((2, 1, 8, true, false, false), "must equal WORLD_SIZE"),
            ((2, 4, 8, true, false, false), "must equal WORLD_SIZE"),
            ((2, 2, 0, true, false, false), "needs an MoE model"),
            ((3, 3, 8, true, false, false), "divide the number of routed experts (8)"),
            ((2, 2, 8, false, false, false), "GPUs only"),
            ((2, 2, 8, true, true, false), "offload_optimizer"),
            ((2, 2, 8, true, false, true), "[lora]"),
        ] {
            let (d, w, e, g, o, l) = args;
            let msg = check_expert_parallel(d, w, e, g, o, l).unwrap_err();
            assert!(
                msg.starts_with(&format!("expert_parallel = {d}: ")) && msg.contains(why),
                "{args:?}: {msg}"
            );
        }
    }

    /// The buckets follow the completion order (the head's range first,
    /// the embedding's last), cover the buffer exactly once, hold at most
    /// a bucket's elements each and merge adjacent parts that fit.
    #[test]
    fn overlap_buckets_follow_the_backward_and_cover_the_buffer() {
        // Embedding 0..10, layers 10..30 and 30..50, head 50..56.
        let parts = vec![vec![50..56], vec![30..50], vec![10..30], vec![0..10]];
        let b = overlap_buckets(&parts, 56, 16);
        assert_eq!(b, vec![50..56, 34..50, 30..34, 14..30, 0..14]);
        let b = overlap_buckets(&parts, 56, 100);
        assert_eq!(b, vec![0..56]);
        // A part in two pieces, an element no part names (56..60).
        let parts = vec![vec![50..52, 54..56], vec![0..50], vec![52..54]];
        let b = overlap_buckets(&parts, 60, 30);
        assert_eq!(b, vec![54..56, 50..52, 20..50, 0..20, 52..54, 56..60]);
        for (parts, n, size) in [(vec![vec![0..7]], 7, 3), (vec![], 5, 2)] {
            let b = overlap_buckets(&parts, n, size);
            let mut c: Vec<_> = b.iter().flat_map(|r| r.clone()).collect();
            c.sort_unstable();
            assert_eq!(c, (0..n).collect::<Vec<_>>());
            assert!(b.iter().all(|r| !r.is_empty() && r.len() <= size));
        }
    }

    /// Cutting the buckets to the replicated ranges keeps their order,
    /// drops what lies in the rank-local experts and covers exactly the
    /// kept elements.
    #[test]
    fn buckets_skip_the_rank_local_experts() {
        let parts = vec![vec![50..56], vec![30..50], vec![10..30], vec![0..10]];
        let buckets = overlap_buckets(&parts, 56, 16);
        // Local experts at 20..28 and 36..50.
        let keep = vec![0..20, 28..36, 50..56];
        let cut = keep_within(buckets, &keep);
        assert_eq!(cut, vec![50..56, 34..36, 30..34, 14..20, 28..30, 0..14]);
        let mut c: Vec<_> = cut.iter().flat_map(|r| r.clone()).collect();
        c.sort_unstable();
        let want: Vec<_> = keep.iter().flat_map(|r| r.clone()).collect();
        assert_eq!(c, want);
        let whole: Vec<Range<usize>> = std::iter::once(0..9).collect();
        assert!(keep_within(whole.clone(), &[]).is_empty());
        assert_eq!(keep_within(vec![0..5, 5..9], &whole), vec![0..5, 5..9]);
    }

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
        // Dynamic sampling: each rank refills its own share.
        let ds = GrpoConfig {
            dynamic_sampling: true,
            ..ok.clone()
        };
        check_grpo(&ds, 2).unwrap();
        // Batch-wide reward scaling gathers every rank's rewards.
        let batch = GrpoConfig {
            scale_rewards: aha_grpo::AdvantageEstimator::Batch,
            ..ok.clone()
        };
        check_grpo(&batch, 2).unwrap();
        // 2 prompts x 4 completions a rank do not split into 3 minibatches.
        let mb = GrpoConfig {
            minibatches: 3,
            ..ok.clone()
        };
        assert!(check_grpo(&mb, 2).unwrap_err().to_string().contains("minibatches = 3"));
        check_grpo(&GrpoConfig { minibatches: 4, ..ok }, 2).unwrap();
    }
}
