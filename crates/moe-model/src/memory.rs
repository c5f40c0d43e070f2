//! The device memory a training run needs, computed before anything is
//! allocated: weights, their bf16 copy, gradients, AdamW moments, the
//! activations the backward keeps, a KV cache, and workspace. The numbers
//! follow what [`crate::gpu::GpuModel`] allocates (f32 master weights,
//! gradients and moments, f32 saved activations, the MoE layers' buffers in
//! their storage precision, the fused lm head's chunked workspace), so a
//! run that cannot fit is refused with this plan in the error instead of
//! failing in the middle with an out-of-memory error.

use crate::config::ModelConfig;
use crate::error::{input_err, Result};
use crate::params::Layout;
use crate::policy::Precision;

/// What one step processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    /// Tokens of one forward and backward (a micro-batch: rows x padded length).
    pub tokens: usize,
    /// Rows scored by the lm head per forward (completion tokens; at most `tokens`).
    pub scored: usize,
    /// Cached positions for decoding on the device (0 while rollouts run on
    /// the CPU engine).
    pub kv_tokens: usize,
    /// True when gradients and AdamW moments are needed.
    pub training: bool,
    /// Per-layer activation recomputation: the forward keeps each layer's
    /// input only, and one layer's activations exist at a time.
    pub recompute: bool,
}

/// Bytes by purpose (see [`memory_plan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    /// Parameters.
    pub params: usize,
    /// f32 master weights: 4 bytes a parameter.
    pub weights: u64,
    /// The bf16 copy the products read (bf16 precision): 2 bytes a parameter.
    pub weights_bf16: u64,
    /// f32 gradients: 4 bytes a trainable parameter (training).
    pub grads: u64,
    /// AdamW's two f32 moments: 8 bytes a trainable parameter (training).
    pub moments: u64,
    /// What the forward keeps for the backward, for `Workload::tokens`.
    pub activations: u64,
    /// The KV cache for `Workload::kv_tokens` positions (f32).
    pub kv_cache: u64,
    /// The lm head's chunked logits and, training a full model, one MoE
    /// layer's stacked gradient buffers (a LoRA layout's frozen MoE layers
    /// need none: [`MemoryPlan::with_lora`]).
    pub workspace: u64,
    /// Page-locked host memory (not device memory): an offloaded
    /// optimizer's master weights, moments and staging buffers
    /// ([`MemoryPlan::with_offload`]); 0 otherwise.
    pub host_pinned: u64,
}

impl MemoryPlan {
    /// The plan with AdamW offloaded to the host (`offload_optimizer`,
    /// [`crate::offload`]): no moments on the device and, in bf16, no f32
    /// weights but the tensors read in f32 ([`crate::gpu::f32_resident`]);
    /// the trainable parameters' master copy and moments and the staging
    /// buffers of `bucket_elems` elements in page-locked host memory
    /// ([`crate::offload::host_bytes`]). `layout` is the trained model's (a
    /// LoRA layout trains its adapters only: the host holds 12 bytes an
    /// adapter parameter plus staging, nothing of the frozen base).
    pub fn with_offload(mut self, layout: &Layout, precision: Precision, bucket_elems: usize) -> MemoryPlan {
        let bf16 = precision == Precision::Bf16;
        if self.moments > 0 {
            self.moments = 0;
            if bf16 {
                let kept: usize = crate::gpu::f32_resident(layout).iter().map(|r| r.1).sum();
                self.weights = 4 * kept as u64;
            }
            self.host_pinned = crate::offload::host_bytes(layout.trainable, bucket_elems, bf16);
        }
        self
    }

    /// The plan of one rank of `world` under ZeRO-1 (`zero_stage = 1`), as
    /// the trainer allocates it: AdamW's moments for the largest shard of
    /// the trainable prefix (the last rank's, `n / world + n mod world`
    /// elements) and, in bf16 full-parameter training, f32 weights for
    /// that shard's master and the tensors read in f32
    /// ([`crate::gpu::f32_resident`]) only: the master is sharded
    /// ([`crate::Policy::shard_master`]). In f32, or for a LoRA layout,
    /// the f32 weights stay whole. One rank, or no training: unchanged.
    /// Apply after [`MemoryPlan::with_lora`].
    pub fn with_zero1(mut self, layout: &Layout, precision: Precision, world: usize) -> MemoryPlan {
        if world <= 1 || self.moments == 0 {
            return self;
        }
        let n = layout.trainable as u64;
        let w = world as u64;
        let shard = n / w + n % w;
        self.moments = 8 * shard;
        if precision == Precision::Bf16 && layout.lora.is_none() {
            let kept: usize = crate::gpu::f32_resident(layout).iter().map(|r| r.1).sum();
            self.weights = 4 * (shard + kept as u64);
        }
        self
    }

    /// The plan for the layout a run trains: unchanged for a full model;
    /// for a LoRA layout ([`Layout::with_lora`]) what
    /// [`crate::gpu::GpuModel`] allocates then: the bf16 copy of every
    /// parameter (base and adapters), in f32 only the adapters and the
    /// frozen base's tensors read in f32 ([`crate::gpu::f32_packed`]; in
    /// f32 precision every parameter), gradients and moments of the
    /// adapters alone, and no MoE layer's stacked gradient buffers in the
    /// workspace (the frozen layers' backward computes the input gradient
    /// alone; expert parallelism still allocates them). Apply before
    /// [`MemoryPlan::with_offload`].
    pub fn with_lora(mut self, layout: &Layout, precision: Precision) -> MemoryPlan {
        if layout.lora.is_none() {
            return self;
        }
        let (p, a) = (layout.size as u64, layout.trainable as u64);
        let gp = match precision {
            Precision::F32 => crate::gpu::GpuPrecision::F32,
            Precision::Bf16 => crate::gpu::GpuPrecision::Bf16,
        };
        self.params = layout.size;
        self.weights =
            4 * crate::gpu::f32_packed(layout, gp, false).map_or(p, |res| res.iter().map(|r| r.1 as u64).sum());
        self.weights_bf16 = if precision == Precision::Bf16 { 2 * p } else { 0 };
        if self.grads > 0 {
            self.grads = 4 * a;
            self.moments = 8 * a;
            self.workspace = self.workspace.saturating_sub(moe_grad_bytes(layout));
        }
        self
    }

    /// The plan of one expert-parallel rank holding only its routed
    /// experts (`layout` from [`Layout::with_expert_shard`], as
    /// [`crate::gpu::GpuModel::shard_experts`] allocates it): weights, the
    /// bf16 copy, gradients and moments of the sharded layout. Activations
    /// and workspace are left as planned (the backward's per-layer
    /// gradient buffers shrink too, so the workspace is an upper bound).
    /// A whole layout: unchanged. Apply before [`MemoryPlan::with_zero1`]
    /// and [`MemoryPlan::with_offload`].
    pub fn with_expert_shard(mut self, layout: &Layout, precision: Precision) -> MemoryPlan {
        if layout.expert_shard.is_none() {
            return self;
        }
        let (p, t) = (layout.size as u64, layout.trainable as u64);
        self.params = layout.size;
        self.weights = 4 * p;
        self.weights_bf16 = if precision == Precision::Bf16 { 2 * p } else { 0 };
        if self.grads > 0 {
            self.grads = 4 * t;
            self.moments = 8 * t;
        }
        self
    }

    /// Everything together (device memory; `host_pinned` is not counted).
    pub fn total(&self) -> u64 {
        self.weights + self.weights_bf16 + self.grads + self.moments + self.activations + self.kv_cache + self.workspace
    }

    /// An error naming every part when the plan exceeds `available` bytes.
    pub fn check(&self, available: u64, device: &str) -> Result<()> {
        if self.total() > available {
            return Err(input_err(
                "memory plan",
                format!(
                    "the run needs {:.2} GB but {device} has {:.2} GB available: {self}",
                    gb(self.total()),
                    gb(available)
                ),
            ));
        }
        Ok(())
    }
}

fn gb(b: u64) -> f64 {
    b as f64 / 1e9
}

impl std::fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.3}B parameters; weights {:.2} GB, bf16 copy {:.2} GB, gradients {:.2} GB, AdamW moments {:.2} GB, \
             activations {:.2} GB, KV cache {:.2} GB, workspace {:.2} GB; total {:.2} GB{}",
            self.params as f64 / 1e9,
            gb(self.weights),
            gb(self.weights_bf16),
            gb(self.grads),
            gb(self.moments),
            gb(self.activations),
            gb(self.kv_cache),
            gb(self.workspace),
            gb(self.total()),
            if self.host_pinned > 0 {
                format!(" (and {:.2} GB of page-locked host memory)", gb(self.host_pinned))
            } else {
                String::new()
            }
        )
    }
}

/// Bytes of the largest MoE layer's stacked gradient buffers that a
/// full-model backward allocates (`aha_cuda_kernels::moe_layer::MoeGrads`:
/// the router, every routed expert's gate, up and down, the shared
/// experts), from `layout`'s slots; 0 for a dense model.
pub fn moe_grad_bytes(layout: &Layout) -> u64 {
    layout
        .layers
        .iter()
        .filter_map(|l| match &l.ffn {
            crate::params::FfnSlots::Moe {
                router,
                experts,
                shared,
                ..
            } => {
                let mlp = |m: &crate::params::MlpSlots| m.gate.w.len + m.up.w.len + m.down.w.len;
                let routed: usize = experts.iter().map(mlp).sum();
                Some(4 * (router.len + routed + shared.as_ref().map_or(0, mlp)) as u64)
            }
            crate::params::FfnSlots::Dense(_) => None,
        })
        .max()
        .unwrap_or(0)
}

/// The lm head's workspace cap (`aha_cuda_kernels::lmhead::DEFAULT_BUDGET_BYTES`).
const HEAD_BUDGET: u64 = 256 << 20;

/// Bytes the GPU model keeps per token for the backward (all layers), the
/// largest single layer's, and the bytes of one MoE layer's gradient
/// buffers.
fn per_token_bytes(cfg: &ModelConfig, precision: Precision) -> (u64, u64, u64) {
    let f = 4u64;
    let st: u64 = match precision {
        Precision::F32 => 4,
        Precision::Bf16 => 2,
    };
    let (c, h, hk) = (cfg.hidden_size as u64, cfg.num_heads as u64, cfg.num_kv_heads as u64);
    let (dk, dv, _, _) = cfg.attn_dims();
    let (dk, dv) = (dk as u64, dv as u64);
    // Residual stream and norms: x_in, ln1, x_mid, ln2 and two rstds.
    let common = f * (4 * c + 2);
    let attn = match &cfg.mla {
        // q, k, v of every head, the attention output and lse; the low-rank
        // query and compressed kv with their norms.
        Some(m) => {
            let qa = m.q_lora_rank.map_or(0, |r| 2 * r as u64 + 1);
            let kvl = m.kv_lora_rank as u64;
            f * (h * dk + h * dk + h * dv + h * dv + h + qa + 2 * kvl + 1)
        }
        // q, k, v (rotated), q and k before the norms, output, lse, norms' rstds.
        None => {
            let norms = if cfg.qk_norm { h + hk } else { 0 };
            f * (2 * h * dk + 2 * hk * dk + hk * dv + h * dv + h + norms)
        }
    };
    let dense = f * 3 * cfg.intermediate_size as u64;
    let (moe, moe_grads) = match &cfg.moe {
        Some(m) => {
            let (e, k, fe) = (m.n_experts as u64, m.top_k as u64, m.expert_dim as u64);
            let fs = fe * m.n_shared as u64;
            // MoeBuffers per token: logits, probs, dlogits [E]; ids, w, dw
            // [K], denom, permutation maps [3K]; xe, dye [K C] and act, dg, du
            // [K F] in the storage type; g, u, dact [K F] and ye, dxe [K C] in f32.
            let routed = f * (3 * e + 3 * k + 1 + 3 * k) + st * (2 * k * c + 3 * k * fe) + f * (3 * k * fe + 2 * k * c);
            let shared = if fs > 0 { st * (2 * c + 3 * fs) + f * 3 * fs } else { 0 };
            let grads = f * (e * c + 3 * e * fe * c + 3 * fs * c);
            (routed + shared, grads)
        }
        None => (0, 0),
    };
    let layers = &cfg.sparse_layers;
    let (mut total, mut largest) = (0u64, 0u64);
    for l in 0..cfg.num_layers {
        let sparse = cfg.moe.is_some() && layers.get(l).copied().unwrap_or(false);
        let layer = common + attn + if sparse { moe } else { dense };
        total += layer;
        largest = largest.max(layer);
    }
    // The final norm's input and output and its rstd.
    total += f * (2 * c + 1);
    (total, largest, moe_grads)
}

/// The plan of `cfg` in `precision` for `w`.
pub fn memory_plan(cfg: &ModelConfig, precision: Precision, w: &Workload) -> MemoryPlan {
    let layout = Layout::new(cfg);
    let p = layout.size as u64;
    let (per_token, largest, moe_grads) = per_token_bytes(cfg, precision);
    // Recomputation: every layer's input (C f32) and the final norm's
    // buffers, plus the one layer being recomputed.
    let kept = if w.recompute {
        4 * cfg.num_layers as u64 * cfg.hidden_size as u64 + 4 * (2 * cfg.hidden_size as u64 + 1) + largest
    } else {
        per_token
    };
    let (dk, dv, _, _) = cfg.attn_dims();
    let hk = if cfg.mla.is_some() {
        cfg.num_heads
    } else {
        cfg.num_kv_heads
    } as u64;
    let (c, v) = (cfg.hidden_size as u64, cfg.vocab_size as u64);
    // The head's chunk of logits (capped), its state and the scored rows'
    // hidden states and their gradients.
    let head = (w.scored as u64 * v * 4).min(HEAD_BUDGET) + w.scored as u64 * (2 * c * 4 + 16);
    MemoryPlan {
        params: layout.size,
        weights: 4 * p,
        weights_bf16: if precision == Precision::Bf16 { 2 * p } else { 0 },
        // The trainable prefix only (frozen tensors have no gradient).
        grads: if w.training { 4 * layout.trainable as u64 } else { 0 },
        moments: if w.training { 8 * layout.trainable as u64 } else { 0 },
        // (Scoring keeps what the training forward keeps.)
        activations: kept * w.tokens as u64,
        kv_cache: w.kv_tokens as u64 * cfg.num_layers as u64 * hk * (dk + dv) as u64 * 4,
        workspace: head + if w.training { moe_grads } else { 0 },
        host_pinned: 0,
    }
}

/// Refuses `plan` on GPU `ordinal` when it exceeds the device's free memory
/// (with the plan in the error); a no-op for the CPU.
pub fn check_device(plan: &MemoryPlan, device: aha_tensor::Device) -> Result<()> {
    let aha_tensor::Device::Cuda(i) = device else {
        return Ok(());
    };
    let gpu = aha_cuda_kernels::Gpu::get(i).map_err(|e| crate::error::Error::Tensor(e.into()))?;
    let (free, _) = gpu.mem_info().map_err(|e| crate::error::Error::Tensor(e.into()))?;
    plan.check(free as u64, &format!("cuda:{i} ({})", gpu.name()))
}
