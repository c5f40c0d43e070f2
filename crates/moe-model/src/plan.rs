//! Training plans on paper: for a model config, a GPU and a number of GPUs,
//! the memory each GPU needs under each way of spreading the work (data
//! parallel, ZeRO-1, expert parallel, optimizer offload, LoRA), the bytes
//! each GPU sends per step and how long that takes on the interconnect, and
//! how a GRPO step splits between rollouts and training. `aha plan` prints
//! it; `docs/scale-out.md` derives the formulas and gives the numbers for
//! two models.
//!
//! The per-GPU memory comes from [`crate::memory::memory_plan`] (what
//! [`crate::gpu::GpuModel`] allocates), with the strategy's sharding and
//! offload applied to its parts. Times are lower bounds at the hardware's
//! nominal rates, scaled by the stated efficiencies: a plan, not a
//! measurement.

use crate::config::ModelConfig;
use crate::error::{input_err, Result};
use crate::lora::LoraConfig;
use crate::memory::{memory_plan, MemoryPlan, Workload};
use crate::params::Layout;
use crate::policy::Precision;

/// A GPU's capacity and nominal rates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GpuSpec {
    /// Its name, as `--gpu` takes it.
    pub name: &'static str,
    /// Memory in bytes.
    pub memory: u64,
    /// Memory bandwidth in bytes per second.
    pub hbm_bandwidth: f64,
    /// Dense bf16 tensor-core peak in FLOP/s.
    pub bf16_flops: f64,
}

/// The GPUs `aha plan` knows (SXM parts; NVIDIA's data-sheet numbers).
pub const GPUS: [GpuSpec; 3] = [
    GpuSpec {
        name: "h100",
        memory: 80_000_000_000,
        hbm_bandwidth: 3.35e12,
        bf16_flops: 989e12,
    },
    GpuSpec {
        name: "h200",
        memory: 141_000_000_000,
        hbm_bandwidth: 4.8e12,
        bf16_flops: 989e12,
    },
    GpuSpec {
        name: "a100",
        memory: 80_000_000_000,
        hbm_bandwidth: 2.04e12,
        bf16_flops: 312e12,
    },
];

/// The GPU named `name` (case-insensitive), or an error listing the known ones.
pub fn gpu_spec(name: &str) -> Result<GpuSpec> {
    GPUS.iter()
        .find(|g| g.name.eq_ignore_ascii_case(name))
        .copied()
        .ok_or_else(|| {
            let known: Vec<&str> = GPUS.iter().map(|g| g.name).collect();
            input_err("--gpu", format!("unknown GPU {name:?}; known: {}", known.join(", ")))
        })
}

/// How the GPUs talk to each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interconnect {
    /// NVLink 4 inside one node (H100/H200 SXM): 450 GB/s a GPU each way.
    NvLink,
    /// InfiniBand NDR between nodes: one 400 Gb/s adapter a GPU, 50 GB/s.
    Ib,
}

impl Interconnect {
    /// `nvlink` or `ib`.
    pub fn parse(s: &str) -> Result<Interconnect> {
        match s.to_ascii_lowercase().as_str() {
            "nvlink" => Ok(Interconnect::NvLink),
            "ib" | "infiniband" => Ok(Interconnect::Ib),
            _ => Err(input_err("--interconnect", format!("{s:?}: expected nvlink or ib"))),
        }
    }

    /// Nominal bytes per second a GPU sends (and receives) at once.
    pub fn bandwidth(self) -> f64 {
        match self {
            Interconnect::NvLink => 450e9,
            Interconnect::Ib => 50e9,
        }
    }
}

/// The share of a link's nominal bandwidth NCCL's collectives reach
/// (NCCL's own bus-bandwidth tests reach 70-85% on these links).
pub const LINK_EFFICIENCY: f64 = 0.8;
/// The share of the bf16 peak a training step reaches (model FLOPs
/// utilisation; 35-45% is typical of large-model training).
pub const TRAIN_MFU: f64 = 0.4;
/// The share of the memory bandwidth a decode step reaches.
pub const DECODE_BANDWIDTH_EFFICIENCY: f64 = 0.6;

/// One way of spreading a run over the GPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Strategy {
    /// Every GPU holds everything; gradients are all-reduced.
    DataParallel,
    /// Data parallel with AdamW's moments and the f32 master weights
    /// sharded across the GPUs, as `zero_stage = 1` runs it in bf16
    /// (`aha_trainer::dp`): gradients are reduce-scattered, each GPU
    /// updates the f32 master of its contiguous shard (the last GPU's is
    /// longer by fewer than N elements) and writes its bf16 weights, the
    /// bf16 weights are all-gathered, and each GPU broadcasts its part of
    /// the few tensors the bf16 kernels read in f32 (norms, biases,
    /// routers, the embedding), which every GPU keeps whole in f32.
    Zero1,
    /// The routed experts sharded over all GPUs (one expert-parallel group of
    /// every GPU), the rest as ZeRO-1; tokens reach their experts by
    /// all-to-all in the forward and the backward.
    ExpertParallel,
    /// AdamW and the f32 master weights in host memory (ZeRO-Offload's
    /// split, `offload_optimizer = true`): the GPU keeps the bf16 weights,
    /// the few tensors read in f32 (norms, biases, routers, the embedding)
    /// and the gradients; gradients go to the host and updated bf16 weights
    /// come back every step.
    Offload,
    /// LoRA adapters of rank `rank` on the linears the GPU model adapts
    /// ([`plan_lora_config`]); the base weights stay frozen in bf16, only
    /// the adapters train.
    Lora {
        /// The adapters' rank.
        rank: usize,
    },
}

impl Strategy {
    /// The short name in tables.
    pub fn name(&self) -> String {
        match self {
            Strategy::DataParallel => "DP".into(),
            Strategy::Zero1 => "ZeRO-1".into(),
            Strategy::ExpertParallel => "EP + ZeRO-1".into(),
            Strategy::Offload => "offload".into(),
            Strategy::Lora { rank } => format!("LoRA r{rank}"),
        }
    }
}

/// What one GRPO step does, for the time estimates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepShape {
    /// Completions per step over all GPUs (prompts x group size).
    pub completions: usize,
    /// Prompt tokens of each.
    pub prompt_len: usize,
    /// Completion tokens of each.
    pub completion_len: usize,
    /// Tokens of one micro-batch (the activations' size).
    pub micro_batch_tokens: usize,
}

/// Parameter counts the plan needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamCounts {
    /// Every parameter.
    pub total: u64,
    /// The routed experts' parameters (0 for dense models).
    pub routed_experts: u64,
    /// Parameters one token's forward touches (the routed experts of its
    /// top-k only; the embedding row is not a product and is left out).
    pub active: u64,
    /// LoRA parameters per unit of rank on the linears of
    /// [`plan_lora_config`] (in + out features summed).
    pub lora_per_rank: u64,
}

/// The adapters the LoRA row plans, at rank `rank` (alpha = rank): every
/// attention projection (GQA's q, k, v, o; MLA's q_a, q_b or q, kv_a,
/// kv_b, o) and every dense MLP's gate, up and down. Routed experts and
/// routers are never adapted; shared experts are not planned either
/// (`mlp.gate_proj` does not match `mlp.shared_experts.gate_proj`).
pub fn plan_lora_config(rank: usize) -> LoraConfig {
    let targets = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "q_a_proj",
        "q_b_proj",
        "kv_a_proj_with_mqa",
        "kv_b_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ];
    LoraConfig {
        r: rank,
        alpha: rank as f32,
        target_modules: targets.iter().map(|t| t.to_string()).collect(),
        ..LoraConfig::default()
    }
}

/// The parameter counts of `cfg`.
pub fn param_counts(cfg: &ModelConfig) -> ParamCounts {
    let layout = Layout::new(cfg);
    let total = layout.size as u64;
    let mut routed = 0u64;
    for e in &layout.entries {
        let n: u64 = e.shape.iter().map(|&d| d as u64).product();
        if e.name.contains(".experts.") {
            routed += n;
        }
    }
    let lora = Layout::with_lora(cfg, &plan_lora_config(1)).map_or(0, |l| l.trainable as u64);
    let embed = (cfg.vocab_size * cfg.hidden_size) as u64;
    let active = match &cfg.moe {
        Some(m) if m.n_experts > 0 => total - embed - routed + routed * m.top_k as u64 / m.n_experts as u64,
        _ => total - embed,
    };
    ParamCounts {
        total,
        routed_experts: routed,
        active,
        lora_per_rank: lora,
    }
}

/// One strategy's row of the plan.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanRow {
    /// The strategy.
    pub strategy: Strategy,
    /// Device memory of one GPU by part.
    pub device: MemoryPlan,
    /// Page-locked host memory per GPU (offload's master weights, moments
    /// and staging buffers).
    pub host: u64,
    /// The rollouts' KV cache on one GPU (bf16): its sequences at their full
    /// length. It lives while the training activations do not, so the peak
    /// is the weights and optimizer state plus the larger of the two.
    pub rollout_kv: u64,
    /// Peak device bytes: `device` with the larger of its activations plus
    /// workspace and `rollout_kv`.
    pub peak: u64,
    /// Whether `peak` fits the GPU.
    pub fits: bool,
    /// Bytes one GPU sends per optimizer step (gradient and weight
    /// collectives, and expert all-to-all over the step's tokens).
    pub comm_bytes: f64,
    /// `comm_bytes` over the interconnect's effective bandwidth, seconds
    /// (offload's host transfers counted at PCIe 5 x16, 55 GB/s effective).
    pub comm_seconds: f64,
    /// Seconds of the rollouts (prefill and decode) per step.
    pub rollout_seconds: f64,
    /// Seconds of the training passes (two scoring forwards and the
    /// forward and backward) per step.
    pub train_seconds: f64,
}

/// The plan of every strategy that applies to `cfg` on `gpus` GPUs.
pub fn plan(
    cfg: &ModelConfig,
    gpu: GpuSpec,
    gpus: usize,
    link: Interconnect,
    step: &StepShape,
    lora_rank: usize,
) -> Result<Vec<PlanRow>> {
    if gpus == 0 {
        return Err(input_err("--gpus", "must be at least 1"));
    }
    let counts = param_counts(cfg);
    let lora = match lora_rank {
        0 => None,
        r => Some(Layout::with_lora(cfg, &plan_lora_config(r))?),
    };
    let mut strategies = vec![Strategy::DataParallel];
    if gpus > 1 {
        strategies.push(Strategy::Zero1);
    }
    if cfg.moe.as_ref().is_some_and(|m| gpus > 1 && m.n_experts % gpus == 0) {
        strategies.push(Strategy::ExpertParallel);
    }
    strategies.push(Strategy::Offload);
    if lora_rank > 0 {
        strategies.push(Strategy::Lora { rank: lora_rank });
    }
    Ok(strategies
        .into_iter()
        .map(|s| row(cfg, &counts, lora.as_ref(), gpu, gpus, link, step, s))
        .collect())
}

#[allow(clippy::too_many_arguments)]
fn row(
    cfg: &ModelConfig,
    counts: &ParamCounts,
    lora: Option<&Layout>,
    gpu: GpuSpec,
    gpus: usize,
    link: Interconnect,
    step: &StepShape,
    strategy: Strategy,
) -> PlanRow {
    let n = gpus as u64;
    let nf = gpus as f64;
    let w = Workload {
        tokens: step.micro_batch_tokens,
        scored: step.micro_batch_tokens,
        kv_tokens: 0,
        training: true,
        recompute: true,
    };
    let full = memory_plan(cfg, Precision::Bf16, &w);
    let p = counts.total;
    let ring = (nf - 1.0) / nf;
    let bw = link.bandwidth() * LINK_EFFICIENCY;
    let tokens = (step.completions * (step.prompt_len + step.completion_len)) as f64;
    let tokens_per_gpu = tokens / nf;
    let mut device = full;
    let mut host = 0u64;
    let (comm_bytes, comm_seconds) = match &strategy {
        Strategy::DataParallel => {
            let v = 2.0 * ring * 4.0 * p as f64;
            (v, v / bw)
        }
        Strategy::Zero1 => {
            // The largest shard, the last GPU's: P / N + P mod N moments
            // and f32 master weights; the tensors read in f32 stay whole.
            let kept = zero1_f32_resident(cfg);
            device = full.with_zero1(&Layout::new(cfg), Precision::Bf16, gpus);
            // Reduce-scatter of f32 gradients, all-gather of bf16 weights,
            // and the tensors read in f32 broadcast (every GPU's part from
            // it: the whole of them once).
            let v = ring * (4.0 + 2.0) * p as f64 + 4.0 * kept as f64;
            (v, v / bw)
        }
        Strategy::ExpertParallel => {
            // Routed experts 1/N on each GPU; the rest replicated with
            // ZeRO-1 over all N.
            let dense = p - counts.routed_experts;
            let local = dense + counts.routed_experts / n;
            device.params = local as usize;
            device.weights_bf16 = 2 * local;
            device.grads = 4 * local;
            device.weights = 4 * dense.div_ceil(n) + 4 * counts.routed_experts / n;
            device.moments = 8 * dense.div_ceil(n) + 8 * counts.routed_experts / n;
            // Dense gradients reduce-scattered and bf16 weights all-gathered;
            // every MoE layer sends each token's top-k hidden states out and
            // back (dispatch and combine), in the forward, the recomputed
            // forward and the backward, over the step's three scoring and
            // training passes: 2 (out, back) x 4 passes.
            let m = cfg.moe.as_ref().map_or(0, |m| m.top_k) as f64;
            let sparse = cfg.sparse_layers.iter().filter(|&&s| s).count() as f64;
            let a2a = 8.0 * ring * tokens_per_gpu * m * cfg.hidden_size as f64 * 2.0 * sparse;
            let v = ring * 6.0 * dense as f64 + a2a;
            (v, v / bw)
        }
        Strategy::Offload => {
            // What `offload_optimizer = true` allocates (crate::offload).
            let layout = Layout::new(cfg);
            device = full.with_offload(
                &layout,
                Precision::Bf16,
                crate::offload::OffloadConfig::default().bucket_elems,
            );
            host = device.host_pinned;
            // Data parallel over the GPUs as well: gradients all-reduced;
            // then each GPU sends f32 gradients to the host and takes bf16
            // weights back over PCIe.
            let v = if gpus > 1 { 2.0 * ring * 4.0 * p as f64 } else { 0.0 };
            let pcie = 6.0 * p as f64 / 55e9;
            (v, v / bw + pcie)
        }
        Strategy::Lora { rank } => {
            // What a LoRA GpuModel allocates (MemoryPlan::with_lora).
            let a = match lora {
                Some(l) => {
                    device = full.with_lora(l, Precision::Bf16);
                    l.trainable as u64
                }
                None => counts.lora_per_rank * *rank as u64,
            };
            let v = 2.0 * ring * 4.0 * a as f64;
            (v, v / bw)
        }
    };
    // Rollouts: prefill at the training MFU, then one decode step per new
    // token, reading the GPU's weights once and each sequence's cache.
    let active = counts.active as f64;
    let local_seqs = (step.completions as f64 / nf).max(1.0);
    let prompt_tokens = local_seqs * step.prompt_len as f64;
    let peak = gpu.bf16_flops * TRAIN_MFU;
    let prefill = 2.0 * active * prompt_tokens / peak;
    let weight_bytes = 2.0 * device.params as f64;
    let kv_per_token = kv_bytes_per_token(cfg) as f64;
    let mean_context = step.prompt_len as f64 + step.completion_len as f64 / 2.0;
    let per_decode =
        (weight_bytes + local_seqs * mean_context * kv_per_token) / (gpu.hbm_bandwidth * DECODE_BANDWIDTH_EFFICIENCY);
    let decode_flops = 2.0 * active * local_seqs / peak;
    let rollout = prefill + step.completion_len as f64 * per_decode.max(decode_flops);
    // Training: two scoring forwards (old policy, reference; 2 FLOPs a
    // parameter a token each) and a forward, a recomputed forward and a
    // backward (8).
    let train = (2.0 + 2.0 + 8.0) * active * tokens_per_gpu / peak;
    let rollout_kv = (local_seqs * (step.prompt_len + step.completion_len) as f64 * kv_per_token) as u64;
    let transient = device.activations + device.workspace;
    let peak_bytes = device.total() - transient + transient.max(rollout_kv);
    PlanRow {
        strategy,
        device,
        host,
        rollout_kv,
        peak: peak_bytes,
        fits: peak_bytes <= gpu.memory,
        comm_bytes,
        comm_seconds,
        rollout_seconds: rollout,
        train_seconds: train,
    }
}

/// Parameters a bf16 model keeps in f32 besides a sharded master: the
/// tensors its kernels read in f32 ([`crate::gpu::f32_resident`]: every
/// 1-D tensor, the embedding table and the MoE routers).
pub fn zero1_f32_resident(cfg: &ModelConfig) -> u64 {
    let layout = Layout::new(cfg);
    crate::gpu::f32_resident(&layout).iter().map(|r| r.1 as u64).sum()
}

/// Bytes of KV cache per token in bf16 over all layers: the compressed
/// latent and the RoPE key for MLA, full keys and values otherwise.
pub fn kv_bytes_per_token(cfg: &ModelConfig) -> u64 {
    let per_layer = match &cfg.mla {
        Some(m) => m.kv_lora_rank + m.qk_rope_head_dim,
        None => {
            let (dk, dv, _, _) = cfg.attn_dims();
            cfg.num_kv_heads * (dk + dv)
        }
    };
    2 * per_layer as u64 * cfg.num_layers as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_unknown_names_are_refused() {
        assert_eq!(gpu_spec("H100").ok().map(|g| g.memory), Some(80_000_000_000));
        assert!(gpu_spec("v100").is_err_and(|e| e.to_string().contains("h100, h200, a100")));
        assert_eq!(Interconnect::parse("IB").ok(), Some(Interconnect::Ib));
        assert!(Interconnect::parse("ethernet").is_err());
    }
}
