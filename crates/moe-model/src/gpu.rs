//! All four architectures on a GPU: Qwen2/Qwen3/Llama-style dense models,
//! Qwen3-MoE-style mixture-of-experts models and DeepSeek-V3 (multi-head
//! latent attention, sigmoid group-limited routing, shared experts),
//! forward, backward and KV-cache decoding, with the math of the CPU model
//! (cuBLAS products and the kernels of aha-cuda-kernels, each tested
//! against its CPU twin).
//!
//! Parameters live as on the CPU: **one flat f32 buffer** in the CPU
//! model's [`Layout`] (master weights), one flat f32 gradient buffer and,
//! in bf16 precision, one flat bf16 copy that the products read; a tensor
//! is a view at its slot. Zeroing the gradients is one memset, the update
//! one AdamW launch over the trainable prefix ([`Layout::trainable`]) that
//! also refreshes the bf16 copy, clipping one norm and one scale.
//!
//! A training step stays on the device: [`GpuModel::forward`] keeps the
//! activations there, [`GpuModel::score`] gives the tempered log-probs (and
//! entropies) of chosen positions through the fused lm head (no `[N, V]`
//! buffer), the loss reads them where they are, and [`GpuModel::backward`]
//! takes d loss / d log-prob (and d loss / d entropy) on the device and
//! accumulates every parameter's gradient into the flat buffer. Only
//! scalars come to the host (the gradient norm, the loss, metrics).
//!
//! Precision: [`GpuPrecision::F32`] computes everything in f32 (matches the
//! CPU to 1e-4); [`GpuPrecision::Bf16`] rounds every product's operands to
//! bf16 (f32 accumulation, f32 outputs) and runs attention through the
//! flash kernels; master weights, gradients, moments, norms, softmax
//! statistics and the loss stay f32. Mixture-of-experts layers run the
//! grouped expert kernels of `aha_cuda_kernels::moe_layer` on views of the
//! flat buffers: f32 storage (SIMT) in f32, bf16 storage (tensor cores) in
//! bf16.
//!
//! `tests/gpu_model.rs` compares it with the CPU model architecture by
//! architecture (on the emulated GPU in CI); where it has run is recorded in
//! `docs/gpu-verification.md`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use aha_cuda_kernels::blas::{matmul_bf16_f32out, matmul_f32, MatmulShape};
use aha_cuda_kernels::cudarc::driver::{CudaSlice, CudaView, CudaViewMut, PinnedHostSlice};
use aha_cuda_kernels::flash::{self, FlashGeometry};
use aha_cuda_kernels::launch::{self, AdamwScalars, AttnGeometry, ColsCopy, RopeGeometry, TokenIds};
use aha_cuda_kernels::launch_moe::{self, MoeGating, MoeMath, MoeStorage};
use aha_cuda_kernels::lmhead::{self, LmHeadOperands};
use aha_cuda_kernels::moe_ep::{self, MoeEpBuffers};
use aha_cuda_kernels::moe_layer::{self, MoeBuffers, MoeDims, MoeExpertViews, MoeExperts, MoeGrads, MoeWeights};
use aha_cuda_kernels::nccl::Comm;
use aha_cuda_kernels::Gpu;

use crate::config::{ModelConfig, Router};
use crate::error::{input_err, Error, Result};
use crate::lora::LoraSlots;
use crate::model::{rope_tables, Model};
use crate::params::{AttnSlots, FfnSlots, LayerSlots, Layout, Linear, MlpSlots, Slot};

mod decode_graph;
mod paged;
pub use decode_graph::{DecodeGraph, ModelIdentity};
pub use paged::{GpuPagedKvCache, KvDtype};

fn cuda(e: aha_cuda_kernels::Error) -> Error {
    Error::Tensor(aha_tensor::Error::from(e))
}

/// A part of the flat gradient buffer that a backward has just completed
/// ([`GpuModel::backward_hooked`]): its kernels are queued on `gpu`'s
/// stream, and the backward writes these ranges no more.
pub struct GradReady<'a> {
    /// The GPU whose stream the part's kernels were queued on.
    pub gpu: &'a Arc<Gpu>,
    /// The whole flat gradient buffer (the trainable prefix, CPU layout).
    pub grads: &'a mut CudaSlice<f32>,
    /// The ranges of `grads` that are complete (one part of
    /// [`Layout::grad_ready_parts`]).
    pub ranges: &'a [std::ops::Range<usize>],
}

/// The caller's side of [`GpuModel::backward_hooked`]: called once per
/// completed part; an error (its message) stops the backward.
pub type GradHook<'h> = dyn FnMut(GradReady<'_>) -> std::result::Result<(), String> + 'h;

/// Whether [`GpuModel`] takes this model: attention head widths and MoE
/// routings within the kernels' limits.
pub fn gpu_support(cfg: &ModelConfig) -> Result<()> {
    if let Some(m) = &cfg.moe {
        if m.n_experts > launch_moe::MOE_MAX_EXPERTS || m.top_k > launch_moe::MOE_MAX_TOP_K {
            return Err(input_err(
                "gpu",
                format!(
                    "{} experts, top-{}: the GPU routing kernels take at most {} and {}",
                    m.n_experts,
                    m.top_k,
                    launch_moe::MOE_MAX_EXPERTS,
                    launch_moe::MOE_MAX_TOP_K
                ),
            ));
        }
    }
    let (dk, dv, _, _) = cfg.attn_dims();
    if dk.max(dv) > launch::ATTENTION_MAX_D {
        return Err(input_err(
            "gpu",
            format!(
                "head widths {dk}/{dv} exceed the GPU attention's {}",
                launch::ATTENTION_MAX_D
            ),
        ));
    }
    Ok(())
}

/// Whether an MoE layer's shared experts carry LoRA adapters: then they
/// run outside the fused MoE kernels, as a dense MLP through
/// [`GpuModel`]'s adapted linears (the kernels read the base weights
/// directly and know no adapter).
fn adapted_shared(shared: Option<&MlpSlots>) -> Option<&MlpSlots> {
    shared.filter(|s| [&s.gate, &s.up, &s.down].iter().any(|x| x.lora.is_some()))
}

/// The tensors a bf16 [`GpuModel`] reads in f32, as `(offset, length,
/// packed offset)` sorted by offset: every 1-D tensor (norms, biases,
/// `e_score_correction_bias`), the embedding table and the MoE routers.
/// With the optimizer offloaded these are the only f32 weights on the
/// device.
pub fn f32_resident(layout: &Layout) -> Vec<(usize, usize, usize)> {
    let mut offs: Vec<(usize, usize)> = layout
        .entries
        .iter()
        .filter(|e| e.shape.len() == 1)
        .map(|e| (e.slot.off, e.slot.len))
        .collect();
    offs.push((layout.embed.off, layout.embed.len));
    for l in &layout.layers {
        if let FfnSlots::Moe { router, .. } = &l.ffn {
            offs.push((router.off, router.len));
        }
    }
    offs.sort_unstable();
    offs.dedup();
    let mut at = 0;
    offs.into_iter()
        .map(|(off, len)| {
            let r = (off, len, at);
            at += len;
            r
        })
        .collect()
}

/// The f32 tensors a bf16 [`GpuModel`] keeps on the device when it does
/// not keep every parameter in f32, packed as [`f32_resident`] packs them:
/// with the optimizer offloaded (`offloaded`), the tensors read in f32
/// only; with LoRA adapters, the trainable prefix (the adapters' master
/// weights, at packed offset 0, so the device AdamW runs over the prefix
/// of the packed buffer) and then the frozen base's tensors read in f32.
/// `None` when every parameter stays in f32 (f32 precision, or bf16
/// full-parameter training on the device).
pub fn f32_packed(layout: &Layout, precision: GpuPrecision, offloaded: bool) -> Option<Vec<(usize, usize, usize)>> {
    if precision != GpuPrecision::Bf16 {
        return None;
    }
    if offloaded {
        return Some(f32_resident(layout));
    }
    layout.lora.as_ref()?;
    let n = layout.trainable;
    let mut out = vec![(0, n, 0)];
    let mut at = n;
    for (off, len, _) in f32_resident(layout) {
        // A LoRA layout's adapters are 2-D: every 1-D tensor, the embedding
        // and the routers are frozen, after the prefix.
        if off >= n {
            out.push((off, len, at));
            at += len;
        }
    }
    Some(out)
}

/// The tensors `res` names of the flat `host`, packed.
fn pack(host: &[f32], res: &[(usize, usize, usize)]) -> Vec<f32> {
    let len: usize = res.iter().map(|r| r.1).sum();
    let mut packed = vec![0f32; len.max(1)];
    for &(off, l, at) in res {
        packed[at..at + l].copy_from_slice(&host[off..off + l]);
    }
    packed
}

/// bf16 bits of `host`, rounded to nearest even (as the device casts).
fn bf16_bits(host: &[f32]) -> Vec<u16> {
    let mut bits: Vec<u16> = host.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect();
    if bits.is_empty() {
        bits.push(0);
    }
    bits
}

/// Device bytes a [`GpuModel`] and its device AdamW moments hold for the
/// parameters (activations and workspace excluded), counted from the
/// buffers' lengths: what [`crate::memory::MemoryPlan`] plans as
/// `weights`, `weights_bf16`, `grads` and `moments`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ParamBytes {
    /// f32 weights (all of them, or the packed ones of [`f32_packed`]).
    pub weights: u64,
    /// The bf16 copy.
    pub weights_bf16: u64,
    /// The gradient buffer (the trainable prefix).
    pub grads: u64,
    /// Both AdamW moments (the trainable prefix each).
    pub moments: u64,
    /// A sharded f32 master ([`GpuModel::shard_master`]): this rank's
    /// range of the trainable prefix in f32 (0 when the master is not
    /// sharded: `weights` holds it then).
    pub master: u64,
    /// Page-locked host memory, not device memory: the offloaded f32
    /// master copy of the trainable prefix ([`GpuModel::set_offload`]) and,
    /// in [`crate::Policy::param_bytes`], the host optimizer's moments and
    /// staging buffers ([`crate::offload::HostOptimizer::pinned_bytes`]);
    /// what [`crate::memory::MemoryPlan`] plans as `host_pinned`.
    pub host_pinned: u64,
}

/// ZeRO-1's sharded f32 master ([`GpuModel::shard_master`]).
struct MasterShard {
    /// This rank's range of the trainable prefix.
    range: std::ops::Range<usize>,
    /// The f32 master weights of `range` (one unused element when empty).
    master: CudaSlice<f32>,
}

/// What ZeRO-1's update with a sharded f32 master touches on one rank
/// ([`GpuModel::zero1_parts`]).
pub struct Zero1Parts<'a> {
    /// The device.
    pub gpu: Arc<Gpu>,
    /// This rank's range of the trainable prefix.
    pub range: std::ops::Range<usize>,
    /// The f32 master weights of `range` (one unused element when empty).
    pub master: &'a mut CudaSlice<f32>,
    /// The bf16 weights of every parameter (the CPU layout).
    pub weights_bf16: &'a mut CudaSlice<u16>,
    /// The packed f32 tensors the kernels read in f32 ([`f32_resident`]).
    pub packed: &'a mut CudaSlice<f32>,
    /// Where the packed tensors come from: `(offset, length, packed
    /// offset)` sorted by offset.
    pub resident: &'a [(usize, usize, usize)],
    /// The gradients of the trainable prefix.
    pub grads: &'a mut CudaSlice<f32>,
}

/// How the GPU model multiplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuPrecision {
    /// f32 weights and products (matches the CPU to 1e-4).
    F32,
    /// bf16 operands for every product (f32 accumulation and outputs),
    /// attention through the flash kernels on bf16 q, k, v; the bf16 copy of
    /// the weights is refreshed by every AdamW update. Master weights,
    /// gradients, moments, norms, softmax statistics and the residual
    /// stream stay f32.
    Bf16,
}

/// A model's parameters and gradients on one GPU, flat.
pub struct GpuModel {
    gpu: Arc<Gpu>,
    precision: GpuPrecision,
    /// The model's config.
    pub config: ModelConfig,
    layout: Layout,
    /// Every parameter, in the CPU model's layout (f32 master weights).
    params: CudaSlice<f32>,
    /// The bf16 bits of every parameter (bf16 precision).
    params16: Option<CudaSlice<u16>>,
    /// Gradients of the trainable prefix `0..layout.trainable` (allocated
    /// by the first backward): frozen tensors have none.
    grads: Option<CudaSlice<f32>>,
    /// Counts the changes of the gradient buffer (a backward, a zeroing,
    /// a write from outside), so that a host copy can tell it is current.
    grad_version: u64,
    /// Keep only each layer's input in the forward and recompute the rest
    /// in the backward.
    recompute: bool,
    /// The f32 master copy of the trainable prefix
    /// ([`Layout::trainable`]) in page-locked host memory while the
    /// optimizer is offloaded ([`GpuModel::set_offload`]).
    host_master: Option<PinnedHostSlice<f32>>,
    /// bf16 products with the optimizer offloaded or LoRA adapters:
    /// `params` holds only the tensors of [`f32_packed`] (read in f32:
    /// norms, biases, routers, the embedding; with LoRA and no offload the
    /// adapters first), packed, as `(offset in the layout, length, offset
    /// in params)` sorted by offset.
    resident: Option<Vec<(usize, usize, usize)>>,
    /// ZeRO-1 with the f32 master sharded ([`GpuModel::shard_master`]):
    /// `params` holds the packed tensors of [`f32_resident`], `params16`
    /// every weight, and this the master of this rank's shard.
    master_shard: Option<MasterShard>,
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
    /// Expert parallelism of the training forward and backward
    /// ([`GpuModel::set_expert_parallel`]).
    ep: Option<ExpertParallel>,
    /// The largest MoE layer's stacked gradient buffers the last backward
    /// allocated, in bytes ([`GpuModel::moe_grad_workspace`]).
    moe_grad_bytes: AtomicU64,
}

/// The communicator the MoE layers exchange token rows over, and this
/// rank's place in it.
struct ExpertParallel {
    comm: std::sync::Mutex<Comm>,
    rank: usize,
    world: usize,
}

impl std::fmt::Debug for GpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GpuModel({:?}, {} parameters, {:?})",
            self.gpu, self.layout.size, self.precision
        )
    }
}

/// A training forward's saved state on the device (see [`GpuModel::forward`]).
pub struct GpuForward {
    b: usize,
    t: usize,
    ids: Vec<u32>,
    pos: CudaSlice<u32>,
    layers: Vec<Saved>,
    x_last: CudaSlice<f32>,
    rstd: CudaSlice<f32>,
    /// The final normed hidden states `[B * T, C]`.
    hidden: CudaSlice<f32>,
}

impl GpuForward {
    /// Rows (`B * T`).
    pub fn rows(&self) -> usize {
        self.b * self.t
    }

    /// Tokens routed to each expert in each layer (empty for dense layers),
    /// copied to the host.
    pub fn expert_load(&self, gpu: &GpuModel) -> Result<Vec<Vec<u32>>> {
        self.layers
            .iter()
            .map(|l| match l.counts() {
                Some(c) => gpu.gpu.download(c).map_err(cuda),
                None => Ok(vec![]),
            })
            .collect()
    }
}

/// Tempered log-probs (and entropies) of chosen positions, on the device
/// (see [`GpuModel::score`]).
pub struct GpuScores {
    /// `log softmax(logits / T)[target]` per scored row.
    pub logp: CudaSlice<f32>,
    /// The entropy of each scored row's tempered distribution.
    pub entropy: CudaSlice<f32>,
    lse: CudaSlice<f32>,
    rows: Vec<u32>,
    targets: Vec<u32>,
    temperature: f32,
    hidden: CudaSlice<f32>,
    /// `hidden` in bf16 (bf16 precision), for the head's backward.
    hidden16: Option<CudaSlice<u16>>,
}

impl GpuScores {
    /// Scored rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// True when no row was scored.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// A layer's saved state: everything, or only its input and its MoE
/// layer's expert loads (recomputation).
enum Saved {
    Full(Box<LayerActs>),
    Input {
        x: CudaSlice<f32>,
        counts: Option<CudaSlice<u32>>,
    },
}

impl Saved {
    /// The MoE layer's tokens per expert of the forward, if an MoE layer.
    fn counts(&self) -> Option<&CudaSlice<u32>> {
        match self {
            Saved::Full(a) => match &a.ffn {
                FfnActs::Moe { buf, .. } => Some(&buf.perm.counts),
                FfnActs::Dense { .. } => None,
            },
            Saved::Input { counts, .. } => counts.as_ref(),
        }
    }
}

/// What one layer's attention saves for the backward.
enum AttnActs {
    Gqa {
        /// q, k projections before Qwen3's norms (the norms' inputs).
        ql: CudaSlice<f32>,
        kl: CudaSlice<f32>,
        /// The norms' rstds (Qwen3).
        qk_rstd: Option<(CudaSlice<f32>, CudaSlice<f32>)>,
    },
    Mla {
        /// Low-rank query and its norm (q_lora_rank), or nothing.
        qa: Option<(CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>)>,
        /// Compressed kv before and after its norm, and the rstd.
        c: CudaSlice<f32>,
        c_rstd: CudaSlice<f32>,
        cn: CudaSlice<f32>,
    },
}

/// One layer's queries, keys and values (after RoPE) and what made them.
struct Qkv {
    q: CudaSlice<f32>,
    k: CudaSlice<f32>,
    v: CudaSlice<f32>,
    acts: AttnActs,
}

enum FfnActs {
    Dense {
        gate: CudaSlice<f32>,
        up: CudaSlice<f32>,
        act: CudaSlice<f32>,
    },
    Moe {
        buf: Box<MoeBuffers>,
        /// The exchange plan and local rows under expert parallelism.
        ep: Option<Box<MoeEpBuffers>>,
        /// The shared experts' activations when they carry LoRA adapters
        /// and run as a dense MLP beside the fused kernels.
        shared: Option<Box<DenseActs>>,
    },
}

/// A dense MLP's saved activations: gate and up projections and the
/// SwiGLU product.
struct DenseActs {
    gate: CudaSlice<f32>,
    up: CudaSlice<f32>,
    act: CudaSlice<f32>,
}

/// One layer's saved activations.
struct LayerActs {
    x_in: CudaSlice<f32>,
    ln1: CudaSlice<f32>,
    ln1_rstd: CudaSlice<f32>,
    qkv: Qkv,
    att: CudaSlice<f32>,
    lse: CudaSlice<f32>,
    x_mid: CudaSlice<f32>,
    ln2: CudaSlice<f32>,
    ln2_rstd: CudaSlice<f32>,
    ffn: FfnActs,
}

/// Which device buffer a product reads its weight from.
enum W<'a> {
    F32(CudaView<'a, f32>),
    Bf16(CudaView<'a, u16>),
}

impl GpuModel {
    /// Uploads `model` to GPU `ordinal` in f32.
    pub fn upload(model: &Model, ordinal: usize) -> Result<GpuModel> {
        GpuModel::upload_with(model, ordinal, GpuPrecision::F32)
    }

    /// Uploads `model`'s flat parameter buffer (one copy) and the RoPE
    /// table, with the products in `precision`.
    pub fn upload_with(model: &Model, ordinal: usize, precision: GpuPrecision) -> Result<GpuModel> {
        gpu_support(&model.config)?;
        let gpu = Gpu::get(ordinal).map_err(cuda)?;
        if model.params.len() != model.layout.size {
            return Err(input_err(
                "gpu upload",
                format!("{} values for {} parameters", model.params.len(), model.layout.size),
            ));
        }
        let packed = f32_packed(&model.layout, precision, false);
        // A bf16 LoRA model never holds the frozen base's f32 weights on
        // the device: only the packed tensors and the bf16 copy.
        let (params, params16) = match &packed {
            Some(res) => (
                gpu.upload(&pack(&model.params, res)).map_err(cuda)?,
                Some(gpu.upload(&bf16_bits(&model.params)).map_err(cuda)?),
            ),
            None => (
                gpu.upload(&model.params).map_err(cuda)?,
                if precision == GpuPrecision::Bf16 {
                    Some(gpu.zeros::<u16>(model.params.len().max(1)).map_err(cuda)?)
                } else {
                    None
                },
            ),
        };
        let (cos, sin) = rope_tables(&model.config, model.config.max_position_embeddings);
        let mut m = GpuModel {
            cos: gpu.upload(&cos).map_err(cuda)?,
            sin: gpu.upload(&sin).map_err(cuda)?,
            gpu,
            precision,
            config: model.config.clone(),
            layout: model.layout.clone(),
            params,
            params16,
            grads: None,
            grad_version: 0,
            recompute: false,
            host_master: None,
            resident: packed,
            master_shard: None,
            ep: None,
            moe_grad_bytes: AtomicU64::new(0),
        };
        m.refresh_copies()?;
        Ok(m)
    }

    /// The device.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// The precision of the products.
    pub fn precision(&self) -> GpuPrecision {
        self.precision
    }

    /// The parameter layout (the CPU model's).
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Turns the LoRA adapters on or off (see
    /// [`Layout::set_adapters_enabled`]); false when there are none.
    pub fn set_adapters_enabled(&mut self, on: bool) -> bool {
        self.layout.set_adapters_enabled(on)
    }

    /// LoRA dropout for the training forwards to come (see
    /// [`Layout::set_lora_dropout`]); whether it is now on.
    pub fn set_lora_dropout(&mut self, seed: Option<u64>) -> bool {
        self.layout.set_lora_dropout(seed)
    }

    /// The flat f32 parameters (master weights; offloaded or with LoRA in
    /// bf16, only the packed tensors of [`f32_packed`]).
    pub fn params(&self) -> &CudaSlice<f32> {
        &self.params
    }

    /// The flat parameters copied to the host (offloaded in bf16: the
    /// trainable prefix from the host master copy, the packed f32 tensors,
    /// such as `e_score_correction_bias` that the device updates itself,
    /// from the device, and any other frozen weight, a LoRA model's base,
    /// from its bf16 copy; LoRA in bf16: the packed f32 tensors, and the
    /// frozen base's other weights from their bf16 copy, exact for a bf16
    /// checkpoint).
    pub fn params_to_host(&self) -> Result<Vec<f32>> {
        match (&self.resident, &self.host_master) {
            (Some(res), master) => {
                let p16 = self
                    .params16
                    .as_ref()
                    .ok_or_else(|| input_err("gpu params_to_host", "packed f32 weights without a bf16 copy"))?;
                let bits = self.gpu.download(p16).map_err(cuda)?;
                let mut host: Vec<f32> = bits[..self.layout.size]
                    .iter()
                    .map(|&b| half::bf16::from_bits(b).to_f32())
                    .collect();
                if let Some(master) = master {
                    let tr = self.layout.trainable;
                    host[..tr].copy_from_slice(
                        &master
                            .as_slice()
                            .map_err(|e| input_err("gpu params_to_host", format!("host master weights: {e:?}")))?[..tr],
                    );
                }
                let packed = self.gpu.download(&self.params).map_err(cuda)?;
                for &(off, len, at) in res {
                    host[off..off + len].copy_from_slice(&packed[at..at + len]);
                }
                Ok(host)
            }
            _ => self.gpu.download(&self.params).map_err(cuda),
        }
    }

    /// Replaces every parameter with `host` (the CPU layout), refreshing
    /// the bf16 copy.
    pub fn set_params(&mut self, host: &[f32]) -> Result<()> {
        if host.len() != self.layout.size {
            return Err(input_err(
                "gpu set_params",
                format!("{} values for {} parameters", host.len(), self.layout.size),
            ));
        }
        if let Some(master) = &mut self.host_master {
            let tr = self.layout.trainable;
            master
                .as_mut_slice()
                .map_err(|e| input_err("gpu set_params", format!("host master weights: {e:?}")))?[..tr]
                .copy_from_slice(&host[..tr]);
        }
        if let Some(sh) = &mut self.master_shard {
            if !sh.range.is_empty() {
                sh.master = self.gpu.upload(&host[sh.range.clone()]).map_err(cuda)?;
            }
        }
        if let Some(res) = &self.resident {
            // Offloaded, LoRA or a sharded master, bf16: the packed f32
            // tensors and the bf16 copy.
            self.params = self.gpu.upload(&pack(host, res)).map_err(cuda)?;
            self.params16 = Some(self.gpu.upload(&bf16_bits(host)).map_err(cuda)?);
            return Ok(());
        }
        self.params = self.gpu.upload(host).map_err(cuda)?;
        self.refresh_copies()
    }

    /// Copies another model's parameters (same layout) on the device.
    pub fn copy_params_from(&mut self, other: &GpuModel) -> Result<()> {
        if other.layout.size != self.layout.size {
            return Err(input_err("gpu copy_params_from", "the layouts differ"));
        }
        if self.host_master.is_some() || self.resident.is_some() || other.resident.is_some() {
            return self.set_params(&other.params_to_host()?);
        }
        self.params = self.gpu.clone_dtod(&other.params).map_err(cuda)?;
        self.refresh_copies()
    }

    /// The gradient buffer copied to the host in the CPU layout: the
    /// trainable prefix, then zeros for the frozen tensors (zeros before
    /// any backward).
    pub fn grads_to_host(&self) -> Result<Vec<f32>> {
        let mut host = match &self.grads {
            Some(g) => self.gpu.download(g).map_err(cuda)?,
            None => Vec::new(),
        };
        host.truncate(self.layout.trainable);
        host.resize(self.layout.size, 0.0);
        Ok(host)
    }

    /// Replaces the gradient buffer with `host` (the CPU layout); only the
    /// trainable prefix is kept (frozen tensors have no gradient).
    pub fn set_grads(&mut self, host: &[f32]) -> Result<()> {
        self.grad_version = self.grad_version.wrapping_add(1);
        if host.len() != self.layout.size {
            return Err(input_err(
                "gpu set_grads",
                format!("{} values for {} parameters", host.len(), self.layout.size),
            ));
        }
        let n = self.layout.trainable;
        self.grads = Some(if n == 0 {
            self.zeros(0)?
        } else {
            self.gpu.upload(&host[..n]).map_err(cuda)?
        });
        Ok(())
    }

    /// The GPU and the flat gradient buffer of the trainable prefix
    /// (allocated, zeroed, the first time), for collectives over it (the
    /// data-parallel all-reduce).
    pub fn grads_mut(&mut self) -> Result<(Arc<Gpu>, &mut CudaSlice<f32>)> {
        self.grad_version = self.grad_version.wrapping_add(1);
        if self.grads.is_none() {
            self.grads = Some(self.zeros(self.layout.trainable)?);
        }
        match &mut self.grads {
            Some(g) => Ok((self.gpu.clone(), g)),
            None => Err(input_err("gpu grads_mut", "the gradient buffer could not be allocated")),
        }
    }

    /// The GPU, the flat f32 parameters and the flat gradient buffer
    /// (allocated, zeroed, the first time), for an optimizer that updates
    /// a part of the parameters itself (data parallel ZeRO-1); call
    /// [`GpuModel::refresh_param_copies`] after writing the parameters. An
    /// error when the optimizer is offloaded (the master weights are on the
    /// host).
    pub fn params_and_grads_mut(&mut self) -> Result<(Arc<Gpu>, &mut CudaSlice<f32>, &mut CudaSlice<f32>)> {
        self.grad_version = self.grad_version.wrapping_add(1);
        if self.host_master.is_some() {
            return Err(input_err(
                "gpu params_and_grads_mut",
                "the optimizer is offloaded to the host",
            ));
        }
        if self.master_shard.is_some() {
            return Err(input_err(
                "gpu params_and_grads_mut",
                "the f32 master is sharded (use zero1_parts)",
            ));
        }
        if self.grads.is_none() {
            self.grads = Some(self.zeros(self.layout.size)?);
        }
        match &mut self.grads {
            Some(g) => Ok((self.gpu.clone(), &mut self.params, g)),
            None => Err(input_err(
                "gpu params_and_grads_mut",
                "the gradient buffer could not be allocated",
            )),
        }
    }

    /// Refreshes the bf16 copy of the weights from the f32 parameters
    /// after they were written through [`GpuModel::params_and_grads_mut`]
    /// (nothing to do in f32 precision).
    pub fn refresh_param_copies(&mut self) -> Result<()> {
        self.refresh_copies()
    }

    /// Zeroes the gradient buffer (one memset), allocating it the first time.
    pub fn zero_grad(&mut self) -> Result<()> {
        self.grad_version = self.grad_version.wrapping_add(1);
        match &mut self.grads {
            Some(g) => self
                .gpu
                .stream()
                .memset_zeros(g)
                .map_err(|e| input_err("gpu zero_grad", format!("memset of the gradient buffer: {e:?}"))),
            None => {
                self.grads = Some(self.zeros(self.layout.trainable)?);
                Ok(())
            }
        }
    }

    /// Moves the f32 master weights of the trainable prefix
    /// ([`Layout::trainable`]: every parameter but the few the device
    /// updates itself, or a LoRA layout's adapters alone) to page-locked
    /// host memory (`on`) for an offloaded optimizer, or back. In bf16
    /// precision the device then keeps only the f32 tensors its kernels
    /// read in f32 (norms, biases, routers, the embedding: see
    /// [`GpuModel::f32_resident`]) besides the bf16 copy, so a LoRA model's
    /// frozen base is held once, in bf16 on the device; in f32 precision
    /// the products read the f32 weights, which stay.
    pub fn set_offload(&mut self, on: bool) -> Result<()> {
        if on == self.host_master.is_some() {
            return Ok(());
        }
        if self.layout.expert_shard.is_some() {
            // The host optimizer's clipping norm would be this rank's.
            return Err(input_err(
                "optimizer offload",
                "the experts are sharded over the expert-parallel ranks",
            ));
        }
        if self.master_shard.is_some() {
            return Err(input_err(
                "optimizer offload",
                "the f32 master is sharded over the ranks (ZeRO-1)",
            ));
        }
        if !on {
            let host = self.params_to_host()?;
            self.host_master = None;
            self.resident = f32_packed(&self.layout, self.precision, false);
            if self.resident.is_some() {
                return self.set_params(&host);
            }
            self.params = self.gpu.upload(&host).map_err(cuda)?;
            return self.refresh_copies();
        }
        let host = self.params_to_host()?;
        let ctx = self.gpu.context();
        let n = self.layout.trainable;
        // SAFETY: cuMemHostAlloc of n * 4 bytes (flags 0: cached, the host
        // reads it); every element is written just below before any read.
        let mut master = unsafe { ctx.alloc_pinned_with_flags::<f32>(n.max(1), 0) }.map_err(|e| {
            input_err(
                "optimizer offload",
                format!("page-locked host allocation of {} bytes: {e:?}", 4 * n),
            )
        })?;
        let m = master
            .as_mut_slice()
            .map_err(|e| input_err("optimizer offload", format!("page-locked host memory: {e:?}")))?;
        m[..n].copy_from_slice(&host[..n]);
        m[n..].fill(0.0);
        self.host_master = Some(master);
        if let Some(res) = f32_packed(&self.layout, self.precision, true) {
            self.params = self.gpu.upload(&pack(&host, &res)).map_err(cuda)?;
            self.resident = Some(res);
        }
        Ok(())
    }

    /// ZeRO-1 with the f32 master sharded over the ranks: this rank keeps
    /// the f32 master of `range` of the trainable prefix only (from the
    /// current weights), and of the f32 weights only the packed tensors the
    /// bf16 kernels read in f32 ([`f32_resident`]); every weight stays in
    /// the bf16 copy. Full-parameter training in bf16 precision only (in
    /// f32 the weights the kernels read are the master; a LoRA model's
    /// master is its small adapters): `Ok(false)`, nothing changed,
    /// otherwise. Calling it again with the same range does nothing;
    /// another range, or with the optimizer offloaded, is an error.
    pub fn shard_master(&mut self, range: std::ops::Range<usize>) -> Result<bool> {
        if let Some(sh) = &self.master_shard {
            if sh.range == range {
                return Ok(true);
            }
            return Err(input_err(
                "shard_master",
                format!("the master is sharded as {:?}, not {range:?}", sh.range),
            ));
        }
        if self.layout.expert_shard.is_some() {
            return Err(input_err(
                "shard_master",
                "the experts are sharded over the expert-parallel ranks",
            ));
        }
        if self.precision != GpuPrecision::Bf16 || self.layout.lora.is_some() || self.resident.is_some() {
            return Ok(false);
        }
        if self.host_master.is_some() {
            return Err(input_err("shard_master", "the optimizer is offloaded to the host"));
        }
        if range.start > range.end || range.end > self.layout.trainable {
            return Err(input_err(
                "shard_master",
                format!(
                    "range {range:?} outside the {} trainable parameters",
                    self.layout.trainable
                ),
            ));
        }
        let host = self.params_to_host()?;
        let master = if range.is_empty() {
            self.zeros(1)?
        } else {
            self.gpu.upload(&host[range.clone()]).map_err(cuda)?
        };
        let res = f32_resident(&self.layout);
        self.params = self.gpu.upload(&pack(&host, &res)).map_err(cuda)?;
        self.resident = Some(res);
        self.master_shard = Some(MasterShard { range, master });
        Ok(true)
    }

    /// This rank's range and the f32 master of it, copied to the host
    /// (`None` when the master is not sharded).
    pub fn master_shard_to_host(&self) -> Result<Option<(std::ops::Range<usize>, Vec<f32>)>> {
        match &self.master_shard {
            None => Ok(None),
            Some(sh) => {
                let mut m = self.gpu.download(&sh.master).map_err(cuda)?;
                m.truncate(sh.range.len());
                Ok(Some((sh.range.clone(), m)))
            }
        }
    }

    /// This rank's range of a sharded master (`None` when not sharded).
    pub fn master_shard_range(&self) -> Option<std::ops::Range<usize>> {
        self.master_shard.as_ref().map(|s| s.range.clone())
    }

    /// Replaces the sharded f32 master with `host` (this rank's range,
    /// e.g. from a checkpoint) and writes its bf16 weights; the packed
    /// tensors read in f32 are left as they are (a checkpoint's weights
    /// hold them exactly).
    pub fn set_master_shard(&mut self, host: &[f32]) -> Result<()> {
        let Some(sh) = &mut self.master_shard else {
            return Err(input_err("set_master_shard", "the f32 master is not sharded"));
        };
        if host.len() != sh.range.len() {
            return Err(input_err(
                "set_master_shard",
                format!("{} values for the shard {:?}", host.len(), sh.range),
            ));
        }
        if host.is_empty() {
            return Ok(());
        }
        sh.master = self.gpu.upload(host).map_err(cuda)?;
        if let Some(p16) = &mut self.params16 {
            let n = sh.range.len();
            launch::cast_f32_to_bf16(&self.gpu, &mut p16.slice_mut(sh.range.clone()), &sh.master, n).map_err(cuda)?;
        }
        Ok(())
    }

    /// The buffers ZeRO-1's update with a sharded master touches (the
    /// gradients allocated, zeroed, the first time); an error when the
    /// master is not sharded ([`GpuModel::shard_master`]).
    pub fn zero1_parts(&mut self) -> Result<Zero1Parts<'_>> {
        if self.grads.is_none() {
            self.grads = Some(self.zeros(self.layout.trainable)?);
        }
        match (
            &mut self.master_shard,
            &mut self.params16,
            &self.resident,
            &mut self.grads,
        ) {
            (Some(sh), Some(p16), Some(res), Some(grads)) => Ok(Zero1Parts {
                gpu: self.gpu.clone(),
                range: sh.range.clone(),
                master: &mut sh.master,
                weights_bf16: p16,
                packed: &mut self.params,
                resident: res,
                grads,
            }),
            _ => Err(input_err("zero1_parts", "the f32 master is not sharded")),
        }
    }

    /// Whether the optimizer is offloaded ([`GpuModel::set_offload`]).
    pub fn is_offloaded(&self) -> bool {
        self.host_master.is_some()
    }

    /// The tensors read in f32 by the bf16 model (see [`f32_resident`]).
    pub fn f32_resident(&self) -> Vec<(usize, usize, usize)> {
        f32_resident(&self.layout)
    }

    /// Where slot `s` lives in `params`: its own range, or its place in the
    /// packed f32 tensors when offloaded in bf16.
    fn f32_range(&self, s: Slot) -> Result<std::ops::Range<usize>> {
        let Some(res) = &self.resident else {
            return Ok(s.off..s.off + s.len);
        };
        let i = res.partition_point(|r| r.0 <= s.off);
        match i.checked_sub(1).map(|i| res[i]) {
            Some((off, len, at)) if s.off + s.len <= off + len => Ok(at + s.off - off..at + s.off - off + s.len),
            _ => Err(input_err(
                "gpu",
                format!(
                    "parameters {}..{} are not kept in f32 on the device (optimizer offloaded, bf16)",
                    s.off,
                    s.off + s.len
                ),
            )),
        }
    }

    /// What the offloaded optimizer's copies touch: the gradients (read),
    /// the f32 weights on the device (whole, or the packed f32 tensors),
    /// the bf16 copy (bf16), the host master and the packed ranges.
    #[allow(clippy::type_complexity)]
    pub(crate) fn offload_parts(
        &mut self,
    ) -> Result<(
        &CudaSlice<f32>,
        &mut CudaSlice<f32>,
        Option<&mut CudaSlice<u16>>,
        &mut PinnedHostSlice<f32>,
        Option<&[(usize, usize, usize)]>,
    )> {
        let grads = self
            .grads
            .as_ref()
            .ok_or_else(|| input_err("offloaded adamw", "no gradients: run a backward first"))?;
        let master = self
            .host_master
            .as_mut()
            .ok_or_else(|| input_err("offloaded adamw", "the weights are not offloaded"))?;
        let p16 = if self.resident.is_some() {
            self.params16.as_mut()
        } else {
            None
        };
        Ok((grads, &mut self.params, p16, master, self.resident.as_deref()))
    }

    /// The host master copy (offloaded only).
    pub(crate) fn host_master(&self) -> Option<&PinnedHostSlice<f32>> {
        self.host_master.as_ref()
    }

    /// The bf16 copy, from `params` (not while offloaded in bf16: the
    /// optimizer writes it then).
    fn refresh_copies(&mut self) -> Result<()> {
        if self.resident.is_some() {
            return Ok(());
        }
        if let Some(p16) = &mut self.params16 {
            launch::cast_f32_to_bf16(&self.gpu, p16, &self.params, self.layout.size).map_err(cuda)?;
        }
        Ok(())
    }

    /// An MoE layer's weights as views of the flat buffers: the router and
    /// correction bias in f32, the experts (stacked by the layout) in the
    /// model's precision.
    fn moe_weights(&self, ffn: &FfnSlots, ep: bool) -> Result<(MoeWeights<'_>, MoeStorage)> {
        let FfnSlots::Moe {
            router,
            bias,
            experts,
            shared,
        } = ffn
        else {
            return Err(input_err("gpu", "a dense layer has no experts"));
        };
        let first = experts
            .first()
            .ok_or_else(|| input_err("gpu", "an MoE layer without experts"))?;
        for (e, x) in experts.iter().enumerate() {
            let stacked = [(x.gate.w, first.gate.w), (x.up.w, first.up.w), (x.down.w, first.down.w)];
            if stacked.iter().any(|(s, f)| s.off != f.off + e * f.len) {
                return Err(input_err("gpu", "expert weights are not stacked in the layout"));
            }
        }
        let e = experts.len();
        // Under expert parallelism (`ep`: the training forward and
        // backward) only this rank's experts (all the layout holds when it
        // holds only those).
        let shard = match (&self.ep, ep) {
            (Some(x), true) if self.layout.expert_shard.is_none() => moe_ep::expert_shard(e, x.world, x.rank),
            _ => 0..e,
        };
        let span = |s: Slot| s.off + s.len * shard.start..s.off + s.len * shard.end;
        let one = |s: Slot| s.off..s.off + s.len;
        // Adapted shared experts run outside the kernels.
        let shared = if adapted_shared(shared.as_ref()).is_some() {
            &None
        } else {
            shared
        };
        let (experts, storage) = match (&self.params16, self.precision) {
            (Some(p16), GpuPrecision::Bf16) => (
                MoeExperts::Bf16(MoeExpertViews {
                    w_gate: p16.slice(span(first.gate.w)),
                    w_up: p16.slice(span(first.up.w)),
                    w_down: p16.slice(span(first.down.w)),
                    shared: shared.as_ref().map(|s| {
                        [
                            p16.slice(one(s.gate.w)),
                            p16.slice(one(s.up.w)),
                            p16.slice(one(s.down.w)),
                        ]
                    }),
                }),
                MoeStorage::Bf16,
            ),
            _ => {
                let p = &self.params;
                (
                    MoeExperts::F32(MoeExpertViews {
                        w_gate: p.slice(span(first.gate.w)),
                        w_up: p.slice(span(first.up.w)),
                        w_down: p.slice(span(first.down.w)),
                        shared: shared
                            .as_ref()
                            .map(|s| [p.slice(one(s.gate.w)), p.slice(one(s.up.w)), p.slice(one(s.down.w))]),
                    }),
                    MoeStorage::F32,
                )
            }
        };
        Ok((
            MoeWeights {
                router: self.w32(*router)?,
                bias: bias.map(|b| self.w32(b)).transpose()?,
                experts,
            },
            storage,
        ))
    }

    fn zeros(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.gpu.zeros::<f32>(n.max(1)).map_err(cuda)
    }

    fn w32(&self, s: Slot) -> Result<CudaView<'_, f32>> {
        Ok(self.params.slice(self.f32_range(s)?))
    }

    /// The weight a product reads in the model's precision.
    fn weight(&self, s: Slot) -> W<'_> {
        match (&self.params16, self.precision) {
            (Some(p16), GpuPrecision::Bf16) => W::Bf16(p16.slice(s.off..s.off + s.len)),
            _ => W::F32(self.params.slice(s.off..s.off + s.len)),
        }
    }

    fn to_bf16(&self, x: &CudaSlice<f32>, n: usize) -> Result<CudaSlice<u16>> {
        let mut o = self.gpu.zeros::<u16>(n.max(1)).map_err(cuda)?;
        launch::cast_f32_to_bf16(&self.gpu, &mut o, x, n).map_err(cuda)?;
        Ok(o)
    }

    /// `out [m, n] (+)= a [m, k] b` with `b` a weight (`trans_b`: stored
    /// `[n, k]`), in the model's precision.
    fn product(
        &self,
        out: &mut CudaViewMut<'_, f32>,
        a: &CudaSlice<f32>,
        w: W<'_>,
        s: MatmulShape,
        a16: Option<&CudaSlice<u16>>,
    ) -> Result<()> {
        let g = &self.gpu;
        match w {
            W::F32(w) => matmul_f32(g, out, a, &w, s).map_err(cuda),
            W::Bf16(w) => {
                let owned;
                let a16 = match a16 {
                    Some(x) => x,
                    None => {
                        owned = self.to_bf16(a, s.m * s.k)?;
                        &owned
                    }
                };
                matmul_bf16_f32out(g, out, a16, &w, s).map_err(cuda)
            }
        }
    }

    /// `out [n, l.out] = x [n, l.inp] W^T (+ b)`.
    fn linear(&self, x: &CudaSlice<f32>, l: &Linear, n: usize) -> Result<CudaSlice<f32>> {
        let mut out = self.zeros(n * l.out)?;
        let s = MatmulShape {
            m: n,
            k: l.inp,
            n: l.out,
            trans_a: false,
            trans_b: true,
            accumulate: false,
        };
        self.product(&mut out.slice_mut(..n * l.out), x, self.weight(l.w), s, None)?;
        if let Some(b) = l.b {
            launch::add_bias_f32(&self.gpu, &mut out, &self.w32(b)?, n, l.out).map_err(cuda)?;
        }
        if let Some(lo) = l.lora.as_ref().filter(|lo| lo.enabled) {
            // out += (s d(x) A^T) B^T, d the training forward's dropout.
            let mask = self.dropout_mask(lo, n, l.inp)?;
            let xd = self.dropped(x, mask.as_ref(), n * l.inp)?;
            let xa = self.lora_down(xd.as_ref().unwrap_or(x), l, lo, n)?;
            let sb = MatmulShape {
                m: n,
                k: lo.r,
                n: l.out,
                trans_a: false,
                trans_b: true,
                accumulate: true,
            };
            self.product(&mut out.slice_mut(..n * l.out), &xa, self.weight(lo.b), sb, None)?;
        }
        Ok(out)
    }

    /// The adapter's scaled dropout mask `[n, inp]` in a training forward
    /// (drawn on the host by [`crate::lora::dropout_mask`], the CPU's), or
    /// `None`.
    fn dropout_mask(&self, lo: &LoraSlots, n: usize, inp: usize) -> Result<Option<CudaSlice<f32>>> {
        match lo.dropout {
            Some(d) => Ok(Some(
                self.gpu
                    .upload(&crate::lora::dropout_mask(d, lo.a.off, n, inp))
                    .map_err(cuda)?,
            )),
            None => Ok(None),
        }
    }

    /// `x * mask` (a copy), or `None` without a mask.
    fn dropped(&self, x: &CudaSlice<f32>, mask: Option<&CudaSlice<f32>>, len: usize) -> Result<Option<CudaSlice<f32>>> {
        let Some(m) = mask else {
            return Ok(None);
        };
        let mut xd = self.gpu.clone_dtod(x).map_err(cuda)?;
        launch::mul_inplace_f32(&self.gpu, &mut xd, m, len).map_err(cuda)?;
        Ok(Some(xd))
    }

    /// A LoRA adapter's scaled low-rank activation `s x A^T` [n, r].
    fn lora_down(&self, x: &CudaSlice<f32>, l: &Linear, lo: &LoraSlots, n: usize) -> Result<CudaSlice<f32>> {
        let mut xa = self.zeros(n * lo.r)?;
        let s = MatmulShape {
            m: n,
            k: l.inp,
            n: lo.r,
            trans_a: false,
            trans_b: true,
            accumulate: false,
        };
        self.product(&mut xa.slice_mut(..n * lo.r), x, self.weight(lo.a), s, None)?;
        launch::scale_f32(&self.gpu, &mut xa, lo.scale, n * lo.r).map_err(cuda)?;
        Ok(xa)
    }

    fn norm_rstd(
        &self,
        x: &CudaSlice<f32>,
        w: Slot,
        rows: usize,
        c: usize,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
        let mut out = self.zeros(rows * c)?;
        let mut rstd = self.zeros(rows)?;
        let eps = self.config.rms_norm_eps;
        launch::rmsnorm_forward_f32(&self.gpu, &mut out, &mut rstd, x, &self.w32(w)?, rows, c, eps).map_err(cuda)?;
        Ok((out, rstd))
    }

    fn copy_cols(&self, out: &mut CudaSlice<f32>, inp: &CudaSlice<f32>, s: ColsCopy) -> Result<()> {
        launch::copy_cols_f32(&self.gpu, out, inp, &s).map_err(cuda)
    }

    fn rope(
        &self,
        x: &CudaSlice<f32>,
        pos: &CudaSlice<u32>,
        n: usize,
        geo: RopeGeometry,
        back: bool,
    ) -> Result<CudaSlice<f32>> {
        let mut out = self.zeros(n * geo.heads * geo.head_dim)?;
        let g = &self.gpu;
        if back {
            launch::rope_backward_f32(g, &mut out, x, &self.cos, &self.sin, pos, n, &geo).map_err(cuda)?;
        } else {
            launch::rope_forward_f32(g, &mut out, x, &self.cos, &self.sin, pos, n, &geo).map_err(cuda)?;
        }
        Ok(out)
    }

    /// RoPE geometries of the queries and the keys (MLA: the decoupled
    /// rotary part of each query head, and the one shared rotary key).
    fn rope_geometries(&self) -> (RopeGeometry, RopeGeometry) {
        let cfg = &self.config;
        match &cfg.mla {
            Some(m) => (
                RopeGeometry {
                    heads: cfg.num_heads,
                    head_dim: m.qk_nope_head_dim + m.qk_rope_head_dim,
                    rot_offset: m.qk_nope_head_dim,
                    rot_dim: m.qk_rope_head_dim,
                    interleaved: true,
                },
                RopeGeometry {
                    heads: 1,
                    head_dim: m.qk_rope_head_dim,
                    rot_offset: 0,
                    rot_dim: m.qk_rope_head_dim,
                    interleaved: true,
                },
            ),
            None => {
                let full = |heads| RopeGeometry {
                    heads,
                    head_dim: cfg.head_dim,
                    rot_offset: 0,
                    rot_dim: cfg.head_dim,
                    interleaved: false,
                };
                (full(cfg.num_heads), full(cfg.num_kv_heads))
            }
        }
    }

    /// Key/value heads of the attention proper (MLA: one per query head).
    fn kv_heads(&self) -> usize {
        if self.config.mla.is_some() {
            self.config.num_heads
        } else {
            self.config.num_kv_heads
        }
    }

    fn attn_geometry(&self, b: usize, t: usize) -> AttnGeometry {
        let cfg = &self.config;
        let (dk, dv, _, scale) = cfg.attn_dims();
        AttnGeometry {
            b,
            t,
            h: cfg.num_heads,
            hk: self.kv_heads(),
            dk,
            dv,
            scale: scale as f32,
        }
    }

    fn flash_geometry(&self, b: usize, t: usize) -> FlashGeometry {
        let a = self.attn_geometry(b, t);
        FlashGeometry {
            total: b * t,
            nseq: b,
            max_seqlen: t,
            h: a.h,
            hk: a.hk,
            dk: a.dk,
            dv: a.dv,
            scale: a.scale,
            tensor_cores: true,
        }
    }

    fn cu_seqlens(&self, b: usize, t: usize) -> Result<CudaSlice<i32>> {
        let cu: Vec<i32> = (0..=b).map(|i| (i * t) as i32).collect();
        self.gpu.upload(&cu).map_err(cuda)
    }

    /// Token embeddings `[n, C]`.
    fn embed(&self, ids: &[u32]) -> Result<CudaSlice<f32>> {
        let (c, n) = (self.config.hidden_size, ids.len());
        let mut x = self.zeros(n * c)?;
        let table = self.w32(self.layout.embed)?;
        launch::embedding_forward_f32(
            &self.gpu,
            &mut x,
            &table,
            TokenIds::Host(ids),
            n,
            self.config.vocab_size,
            c,
        )
        .map_err(cuda)?;
        Ok(x)
    }

    /// Queries, keys and values of layer `s` from its normed input `ln1 [n, C]`.
    fn qkv(&self, ln1: &CudaSlice<f32>, s: &LayerSlots, pos: &CudaSlice<u32>, n: usize) -> Result<Qkv> {
        let cfg = &self.config;
        let (gq, gk) = self.rope_geometries();
        match &s.attn {
            AttnSlots::Gqa { q, k, v, qk_norm, .. } => {
                let (h, hk, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
                let (ql, kl, vl) = (
                    self.linear(ln1, q, n)?,
                    self.linear(ln1, k, n)?,
                    self.linear(ln1, v, n)?,
                );
                let (qr, kr, qk_rstd) = match qk_norm {
                    Some((qw, kw)) => {
                        let (qn, q_rstd) = self.norm_rstd(&ql, *qw, n * h, d)?;
                        let (kn, k_rstd) = self.norm_rstd(&kl, *kw, n * hk, d)?;
                        (
                            self.rope(&qn, pos, n, gq, false)?,
                            self.rope(&kn, pos, n, gk, false)?,
                            Some((q_rstd, k_rstd)),
                        )
                    }
                    None => (
                        self.rope(&ql, pos, n, gq, false)?,
                        self.rope(&kl, pos, n, gk, false)?,
                        None,
                    ),
                };
                Ok(Qkv {
                    q: qr,
                    k: kr,
                    v: vl,
                    acts: AttnActs::Gqa { ql, kl, qk_rstd },
                })
            }
            AttnSlots::Mla {
                q_lora,
                q,
                kv_a,
                kv_norm,
                kv_b,
                ..
            } => {
                let m = cfg
                    .mla
                    .as_ref()
                    .ok_or_else(|| input_err("gpu", "MLA slots without an MLA config"))?;
                let h = cfg.num_heads;
                let (dn, dr, dv, kvl) = (m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank);
                let dk = dn + dr;
                let (q_lin, qa) = match (q_lora, q) {
                    (Some((qa_l, qa_w, qb_l)), _) => {
                        let qa = self.linear(ln1, qa_l, n)?;
                        let (qan, qa_rstd) = self.norm_rstd(&qa, *qa_w, n, qa_l.out)?;
                        (self.linear(&qan, qb_l, n)?, Some((qa, qa_rstd, qan)))
                    }
                    (None, Some(q_l)) => (self.linear(ln1, q_l, n)?, None),
                    (None, None) => return Err(input_err("gpu", "MLA without a query projection")),
                };
                let qr = self.rope(&q_lin, pos, n, gq, false)?;
                let kva = self.linear(ln1, kv_a, n)?;
                let w = kv_a.out;
                let (mut c, mut kpe) = (self.zeros(n * kvl)?, self.zeros(n * dr)?);
                self.copy_cols(&mut c, &kva, ColsCopy::plain(n, kvl, (kvl, 0), (w, 0)))?;
                self.copy_cols(&mut kpe, &kva, ColsCopy::plain(n, dr, (dr, 0), (w, kvl)))?;
                let (cn, c_rstd) = self.norm_rstd(&c, *kv_norm, n, kvl)?;
                let kvb = self.linear(&cn, kv_b, n)?;
                let kpe_r = self.rope(&kpe, pos, n, gk, false)?;
                let (mut k, mut v) = (self.zeros(n * h * dk)?, self.zeros(n * h * dv)?);
                let rows = n * h;
                self.copy_cols(&mut k, &kvb, ColsCopy::plain(rows, dn, (dk, 0), (dn + dv, 0)))?;
                self.copy_cols(
                    &mut k,
                    &kpe_r,
                    ColsCopy {
                        rep: h,
                        ..ColsCopy::plain(rows, dr, (dk, dn), (dr, 0))
                    },
                )?;
                self.copy_cols(&mut v, &kvb, ColsCopy::plain(rows, dv, (dv, 0), (dn + dv, dn)))?;
                Ok(Qkv {
                    q: qr,
                    k,
                    v,
                    acts: AttnActs::Mla { qa, c, c_rstd, cn },
                })
            }
        }
    }

    /// Causal attention of `b` sequences of `t` tokens: `(out [N, H * Dv], lse)`.
    fn attention(&self, qkv: &Qkv, b: usize, t: usize) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
        let g = &self.gpu;
        let a = self.attn_geometry(b, t);
        let n = b * t;
        let mut out = self.zeros(n * a.h * a.dv)?;
        let mut lse = self.zeros(a.h * n)?;
        match self.precision {
            GpuPrecision::F32 => {
                launch::attention_forward_f32(g, &mut out, &mut lse, &qkv.q, &qkv.k, &qkv.v, &a).map_err(cuda)?
            }
            GpuPrecision::Bf16 => {
                let q = self.to_bf16(&qkv.q, n * a.h * a.dk)?;
                let k = self.to_bf16(&qkv.k, n * a.hk * a.dk)?;
                let v = self.to_bf16(&qkv.v, n * a.hk * a.dv)?;
                let cu = self.cu_seqlens(b, t)?;
                flash::flash_forward_bf16(g, &mut out, &mut lse, &q, &k, &v, &cu, &self.flash_geometry(b, t))
                    .map_err(cuda)?;
            }
        }
        Ok((out, lse))
    }

    /// A dense SwiGLU MLP on `x [n, C]`: `down(silu(gate x) * up x)` and
    /// its activations.
    fn dense_mlp(&self, x: &CudaSlice<f32>, mlp: &MlpSlots, n: usize) -> Result<(CudaSlice<f32>, DenseActs)> {
        let (gate, up) = (self.linear(x, &mlp.gate, n)?, self.linear(x, &mlp.up, n)?);
        let mut act = self.zeros(n * mlp.gate.out)?;
        launch::swiglu_forward_f32(&self.gpu, &mut act, &gate, &up, n * mlp.gate.out).map_err(cuda)?;
        let down = self.linear(&act, &mlp.down, n)?;
        Ok((down, DenseActs { gate, up, act }))
    }

    /// The MLP of layer `s` (layer `l`) on its normed input: the output
    /// (before the residual add) and what the backward needs. `ep`: the
    /// routed experts run expert-parallel when it is set on the model (a
    /// collective: the training forward); without it they run on this
    /// rank alone, whole (the paged forward of rollouts and evaluation,
    /// which ranks do not run in lockstep).
    fn mlp(&self, ln2: &CudaSlice<f32>, s: &LayerSlots, n: usize, ep: bool) -> Result<(CudaSlice<f32>, FfnActs)> {
        let c = self.config.hidden_size;
        match &s.ffn {
            FfnSlots::Dense(mlp) => {
                let (down, DenseActs { gate, up, act }) = self.dense_mlp(ln2, mlp, n)?;
                Ok((down, FfnActs::Dense { gate, up, act }))
            }
            FfnSlots::Moe { shared, .. } => {
                let m = self
                    .config
                    .moe
                    .as_ref()
                    .ok_or_else(|| input_err("gpu", "an MoE layer without an MoE config"))?;
                let (w, storage) = self.moe_weights(&s.ffn, ep)?;
                let ep_on = if ep { self.ep.as_ref() } else { None };
                if self.layout.expert_shard.is_some() && ep_on.is_none() {
                    return Err(input_err(
                        "gpu",
                        match self.ep {
                            None => "the model holds only some experts but expert parallelism is off",
                            Some(_) => "the model holds only some experts: only the training forward runs (expert-parallel), not the paged forward of decoding",
                        },
                    ));
                }
                let dims = MoeDims {
                    n,
                    c,
                    // Every routed expert (the router's outputs), also when
                    // the layout holds only this rank's.
                    e: m.n_experts,
                    k: m.top_k,
                    f: m.expert_dim,
                    f_shared: match adapted_shared(shared.as_ref()) {
                        Some(_) => 0,
                        None => shared.as_ref().map_or(0, |s| s.gate.out),
                    },
                    gating: match m.router {
                        Router::SoftmaxTopK => MoeGating::Softmax {
                            renorm: m.norm_topk_prob,
                        },
                        Router::SigmoidGroupLimited {
                            n_group,
                            topk_group,
                            routed_scaling_factor,
                        } => MoeGating::SigmoidGroup {
                            n_group,
                            topk_group,
                            renorm: m.norm_topk_prob,
                            scaling: routed_scaling_factor,
                        },
                    },
                    math: match storage {
                        MoeStorage::Bf16 => MoeMath::TensorCores,
                        MoeStorage::F32 => MoeMath::Simt,
                    },
                    storage,
                };
                let mut buf = Box::new(MoeBuffers::new(&self.gpu, dims).map_err(cuda)?);
                let mut down = self.zeros(n * c)?;
                let ep = match ep_on {
                    Some(ep) => {
                        let mut comm = ep
                            .comm
                            .lock()
                            .map_err(|_| input_err("gpu", "expert-parallel communicator poisoned"))?;
                        let mut eb = Box::new(MoeEpBuffers::new(&self.gpu, &buf, ep.world, ep.rank).map_err(cuda)?);
                        moe_ep::moe_layer_forward_ep(&self.gpu, &mut comm, &mut down, ln2, &w, &mut buf, &mut eb)
                            .map_err(cuda)?;
                        Some(eb)
                    }
                    None => {
                        moe_layer::moe_layer_forward(&self.gpu, &mut down, ln2, &w, &mut buf).map_err(cuda)?;
                        None
                    }
                };
                // Adapted shared experts: a dense MLP added to the routed
                // experts' output.
                let shared = match adapted_shared(shared.as_ref()) {
                    Some(mlp) => {
                        let (y, acts) = self.dense_mlp(ln2, mlp, n)?;
                        launch::add_inplace_f32(&self.gpu, &mut down, &y, n * c).map_err(cuda)?;
                        Some(Box::new(acts))
                    }
                    None => None,
                };
                Ok((down, FfnActs::Moe { buf, ep, shared }))
            }
        }
    }

    /// The training forward over a right-padded batch `ids [B, T]`
    /// (positions `0..T` in every row, as `Model::forward`), keeping every
    /// activation on the device for [`GpuModel::backward`].
    pub fn forward(&self, ids: &[u32], b: usize, t: usize) -> Result<GpuForward> {
        let cfg = &self.config;
        let n = b * t;
        if ids.len() != n || n == 0 {
            return Err(input_err(
                "gpu forward",
                format!("{} ids for a [{b}, {t}] batch", ids.len()),
            ));
        }
        if t > cfg.max_position_embeddings {
            return Err(input_err(
                "gpu forward",
                format!(
                    "{t} positions exceed max_position_embeddings {}",
                    cfg.max_position_embeddings
                ),
            ));
        }
        let c = cfg.hidden_size;
        let g = &self.gpu;
        let mut x = self.embed(ids)?;
        let pos: Vec<u32> = (0..n).map(|i| (i % t) as u32).collect();
        let pos = g.upload(&pos).map_err(cuda)?;
        let mut layers = Vec::with_capacity(self.layout.layers.len());
        for s in &self.layout.layers {
            layers.push(if self.recompute {
                // Only the layer's input (and expert loads); the backward
                // runs the layer again.
                let x_in = g.clone_dtod(&x).map_err(cuda)?;
                let a = self.layer_forward(&mut x, s, &pos, b, t)?;
                let counts = match &a.ffn {
                    FfnActs::Moe { buf, .. } => Some(g.clone_dtod(&buf.perm.counts).map_err(cuda)?),
                    FfnActs::Dense { .. } => None,
                };
                Saved::Input { x: x_in, counts }
            } else {
                Saved::Full(Box::new(self.layer_forward(&mut x, s, &pos, b, t)?))
            });
        }
        let (hidden, rstd) = self.norm_rstd(&x, self.layout.norm, n, c)?;
        Ok(GpuForward {
            b,
            t,
            ids: ids.to_vec(),
            pos,
            layers,
            x_last: x,
            rstd,
            hidden,
        })
    }

    /// One decoder layer of the training forward: `x [B * T, C]` becomes the
    /// layer's output; returns what its backward needs.
    fn layer_forward(
        &self,
        x: &mut CudaSlice<f32>,
        s: &LayerSlots,
        pos: &CudaSlice<u32>,
        b: usize,
        t: usize,
    ) -> Result<LayerActs> {
        let g = &self.gpu;
        let (n, c) = (b * t, self.config.hidden_size);
        let x_in = g.clone_dtod(x).map_err(cuda)?;
        let (ln1, ln1_rstd) = self.norm_rstd(x, s.ln1, n, c)?;
        let qkv = self.qkv(&ln1, s, pos, n)?;
        let (att, lse) = self.attention(&qkv, b, t)?;
        let ao = self.linear(&att, attn_out(&s.attn), n)?;
        launch::add_inplace_f32(g, x, &ao, n * c).map_err(cuda)?;
        let x_mid = g.clone_dtod(x).map_err(cuda)?;
        let (ln2, ln2_rstd) = self.norm_rstd(x, s.ln2, n, c)?;
        let (down, ffn) = self.mlp(&ln2, s, n, true)?;
        launch::add_inplace_f32(g, x, &down, n * c).map_err(cuda)?;
        Ok(LayerActs {
            x_in,
            ln1,
            ln1_rstd,
            qkv,
            att,
            lse,
            x_mid,
            ln2,
            ln2_rstd,
            ffn,
        })
    }

    /// Per-layer activation recomputation: the forward keeps only each
    /// layer's input and the backward runs the layer again (one layer's
    /// activations alive at a time, at the cost of a second forward).
    pub fn set_recompute(&mut self, on: bool) {
        self.recompute = on;
    }

    /// Expert parallelism over `comm` (`None`: off), returning the
    /// communicator set before. With EP degree W = `comm.world()`, rank r
    /// runs the routed experts `moe_ep::expert_shard(E, W, r)` of every MoE
    /// layer for every rank's tokens routed to them
    /// (`aha_cuda_kernels::moe_ep`); the router and shared experts run
    /// locally. The parameters stay whole on every rank (unless
    /// [`GpuModel::shard_experts`] drops the other ranks' experts): the
    /// backward leaves the other ranks' experts' gradients at zero, so the
    /// data-parallel all-reduce of the flat gradient gives every expert
    /// its owner's gradient and every rank the same update (and a full
    /// checkpoint). With the experts sharded only the same rank and
    /// degree (or `None`) are taken. While set, every [`GpuModel::forward`] and
    /// [`GpuModel::backward`] (and [`GpuModel::logits`] and
    /// [`GpuModel::token_logprobs`], which run a forward) is a collective
    /// over `comm`: every rank must call them together, on batches of any
    /// sizes. W must divide the number of routed experts.
    pub fn set_expert_parallel(&mut self, comm: Option<Comm>) -> Result<Option<Comm>> {
        if let Some(shard) = &self.layout.expert_shard {
            let e = self.config.moe.as_ref().map_or(0, |m| m.n_experts);
            // Off is allowed (the forward refuses until it is back on).
            let other = comm
                .as_ref()
                .is_some_and(|c| moe_ep::expert_shard(e, c.world(), c.rank()) != *shard);
            if other {
                return Err(input_err(
                    "expert_parallel",
                    format!(
                        "the model holds only the experts {shard:?}: expert parallelism needs the same rank and degree"
                    ),
                ));
            }
        }
        if let Some(c) = &comm {
            let e = self.config.moe.as_ref().map_or(0, |m| m.n_experts);
            if e == 0 || !e.is_multiple_of(c.world()) {
                return Err(input_err(
                    "expert_parallel",
                    format!(
                        "expert_parallel = {} must divide the number of routed experts ({e})",
                        c.world()
                    ),
                ));
            }
        }
        let old = self.ep.take();
        self.ep = comm.map(|c| ExpertParallel {
            rank: c.rank(),
            world: c.world(),
            comm: std::sync::Mutex::new(c),
        });
        match old {
            Some(ep) => {
                Ok(Some(ep.comm.into_inner().map_err(|_| {
                    input_err("gpu", "expert-parallel communicator poisoned")
                })?))
            }
            None => Ok(None),
        }
    }

    /// `(rank, world)` of expert parallelism, if set.
    pub fn expert_parallel(&self) -> Option<(usize, usize)> {
        self.ep.as_ref().map(|e| (e.rank, e.world))
    }

    /// Shards the experts' memory under expert parallelism (set first with
    /// [`GpuModel::set_expert_parallel`]): the flat buffers are rebuilt
    /// with [`Layout::with_expert_shard`], keeping of every MoE layer's
    /// routed experts only this rank's `moe_ep::expert_shard(E, W, r)`, so
    /// the weights (f32 and the bf16 copy), the gradient buffer and the
    /// AdamW moments of [`GpuModel::new_moments`] hold 1/W of the routed
    /// experts. [`GpuModel::layout`] is then the sharded layout:
    /// [`Layout::local_expert_ranges`] are the rank-local parameters (the
    /// data-parallel all-reduce must skip them:
    /// [`Layout::replicated_ranges`] is what it sums), and
    /// [`GpuModel::gather_params_to_host`] gathers the whole model. The
    /// gradients are dropped. Calling it again does nothing. An error
    /// without expert parallelism, for a LoRA layout, or with the
    /// optimizer offloaded or the master sharded; afterwards
    /// [`GpuModel::set_offload`] and [`GpuModel::shard_master`] refuse
    /// (their updates would clip by this rank's norm).
    pub fn shard_experts(&mut self) -> Result<()> {
        let Some(ep) = &self.ep else {
            return Err(input_err("shard_experts", "expert parallelism is off"));
        };
        let e = self.config.moe.as_ref().map_or(0, |m| m.n_experts);
        let shard = moe_ep::expert_shard(e, ep.world, ep.rank);
        if self.layout.expert_shard.is_some() {
            // set_expert_parallel keeps the same rank and degree.
            return Ok(());
        }
        if self.layout.lora.is_some()
            || self.resident.is_some()
            || self.host_master.is_some()
            || self.master_shard.is_some()
        {
            return Err(input_err(
                "shard_experts",
                "only the plain f32 or bf16 weights of full-parameter training can be sharded (not with LoRA, the optimizer offloaded or the master sharded)",
            ));
        }
        let host = self.params_to_host()?;
        let local = Layout::with_expert_shard(&self.config, shard)?;
        let mut params = vec![0f32; local.size];
        for en in &local.entries {
            let from = self
                .layout
                .get(&en.name)
                .ok_or_else(|| input_err("shard_experts", format!("`{}` is not in the model", en.name)))?;
            en.slot.of_mut(&mut params).copy_from_slice(from.slot.of(&host));
        }
        self.params = self.gpu.upload(&params).map_err(cuda)?;
        if self.params16.is_some() {
            self.params16 = Some(self.gpu.zeros::<u16>(local.size.max(1)).map_err(cuda)?);
        }
        self.layout = local;
        self.grads = None;
        self.grad_version = self.grad_version.wrapping_add(1);
        self.refresh_copies()
    }

    /// Every parameter of the whole model, in the layout of
    /// [`Layout::new`], on the host of every rank: with the experts
    /// sharded ([`GpuModel::shard_experts`]) a collective over the
    /// expert-parallel communicator (every rank calls it together), each
    /// projection of each MoE layer's experts broadcast from its owner in
    /// turn (one such block of device memory at a time), the other tensors
    /// this rank's (every rank holds them alike); otherwise
    /// [`GpuModel::params_to_host`].
    pub fn gather_params_to_host(&self) -> Result<Vec<f32>> {
        let local_host = self.params_to_host()?;
        if self.layout.expert_shard.is_none() {
            return Ok(local_host);
        }
        let ep = self
            .ep
            .as_ref()
            .ok_or_else(|| input_err("gather_params_to_host", "sharded experts without expert parallelism"))?;
        let e = self.config.moe.as_ref().map_or(0, |m| m.n_experts);
        let full = Layout::new(&self.config);
        let mut host = vec![0f32; full.size];
        for en in &self.layout.entries {
            let to = full
                .get(&en.name)
                .ok_or_else(|| input_err("gather_params_to_host", format!("`{}` is not in the model", en.name)))?;
            to.slot.of_mut(&mut host).copy_from_slice(en.slot.of(&local_host));
        }
        let mut comm = ep
            .comm
            .lock()
            .map_err(|_| input_err("gpu", "expert-parallel communicator poisoned"))?;
        for (ll, fl) in self.layout.layers.iter().zip(&full.layers) {
            let (FfnSlots::Moe { experts: le, .. }, FfnSlots::Moe { experts: fe, .. }) = (&ll.ffn, &fl.ffn) else {
                continue;
            };
            let (Some(l0), Some(f0)) = (le.first(), fe.first()) else {
                continue;
            };
            for (ls, fs) in [(l0.gate.w, f0.gate.w), (l0.up.w, f0.up.w), (l0.down.w, f0.down.w)] {
                for r in 0..ep.world {
                    let sh = moe_ep::expert_shard(e, ep.world, r);
                    let n = ls.len * sh.len();
                    let mut buf = if r == ep.rank {
                        self.gpu.upload(&local_host[ls.off..ls.off + n]).map_err(cuda)?
                    } else {
                        self.zeros(n)?
                    };
                    comm.broadcast(&mut buf, r).map_err(cuda)?;
                    if r != ep.rank {
                        let got = self.gpu.download(&buf).map_err(cuda)?;
                        let at = fs.off + sh.start * fs.len;
                        host[at..at + n].copy_from_slice(&got[..n]);
                    }
                }
            }
        }
        Ok(host)
    }

    /// The whole model on the host of every rank, for a save
    /// ([`GpuModel::gather_params_to_host`]: a collective when the experts
    /// are sharded).
    pub fn gather_model(&self) -> Result<Model> {
        Ok(Model {
            config: self.config.clone(),
            layout: Layout::new(&self.config),
            params: self.gather_params_to_host()?,
            source_dir: None,
        })
    }

    /// The lm head's operands for hidden rows `h [n, C]`.
    fn head_operands<'a>(
        &'a self,
        h: &'a CudaSlice<f32>,
        h16: &'a Option<CudaSlice<u16>>,
    ) -> Result<LmHeadOperands<'a>> {
        let head = self.layout.lm_head;
        Ok(match (self.precision, h16, &self.params16) {
            (GpuPrecision::Bf16, Some(h16), Some(p16)) => LmHeadOperands::Bf16 {
                hidden: h16.as_view(),
                weight: p16.slice(head.off..head.off + head.len),
            },
            (GpuPrecision::Bf16, _, _) => return Err(input_err("gpu", "bf16 lm head without bf16 operands")),
            _ => LmHeadOperands::F32 {
                hidden: h.as_view(),
                weight: self.w32(head)?,
            },
        })
    }

    /// Tempered log-probs and entropies of `targets[i]` at rows `rows[i]`
    /// of a forward (row `r` is position `r % T` of sequence `r / T`):
    /// `log softmax(logits / temperature)`, through the fused lm head in
    /// vocabulary chunks. Results stay on the device.
    pub fn score(&self, fwd: &GpuForward, rows: &[u32], targets: &[u32], temperature: f32) -> Result<GpuScores> {
        let (c, v) = (self.config.hidden_size, self.config.vocab_size);
        let n = rows.len();
        if targets.len() != n {
            return Err(input_err(
                "gpu score",
                format!("{} targets for {n} rows", targets.len()),
            ));
        }
        if !(temperature.is_finite() && temperature > 0.0) {
            return Err(input_err("gpu score", format!("temperature {temperature} must be > 0")));
        }
        let g = &self.gpu;
        // The rows' hidden states (a row gather: the embedding kernel over
        // the forward's hidden states, which checks every row index).
        let mut hidden = self.zeros(n * c)?;
        launch::embedding_forward_f32(g, &mut hidden, &fwd.hidden, TokenIds::Host(rows), n, fwd.rows(), c)
            .map_err(cuda)?;
        let (mut logp, mut entropy, mut lse) = (self.zeros(n)?, self.zeros(n)?, self.zeros(n)?);
        // The rows in bf16 once, for this head and for the backward's.
        let h16 = match self.precision {
            GpuPrecision::Bf16 if n > 0 => Some(self.to_bf16(&hidden, n * c)?),
            _ => None,
        };
        if n > 0 {
            let plan = lmhead::plan_lm_head(n, c, v, temperature, lmhead::DEFAULT_BUDGET_BYTES).map_err(cuda)?;
            let x = self.head_operands(&hidden, &h16)?;
            lmhead::lm_head_logprob_forward_f32(g, &mut logp, &mut entropy, &mut lse, &x, targets, &plan)
                .map_err(cuda)?;
        }
        Ok(GpuScores {
            logp,
            entropy,
            lse,
            rows: rows.to_vec(),
            targets: targets.to_vec(),
            temperature,
            hidden,
            hidden16: h16,
        })
    }

    /// Logits `[B * T, V]` of `ids [B, T]`, copied to the host.
    pub fn logits(&self, ids: &[u32], b: usize, t: usize) -> Result<Vec<f32>> {
        let fwd = self.forward(ids, b, t)?;
        let head = Linear {
            w: self.layout.lm_head,
            b: None,
            inp: self.config.hidden_size,
            out: self.config.vocab_size,

            lora: None,
            frozen: true,
        };
        let logits = self.linear(&fwd.hidden, &head, b * t)?;
        self.gpu.download(&logits).map_err(cuda)
    }

    /// `log p(targets[i])` and the log-sum-exp at every position of `ids
    /// [B, T]` (as `Model::token_logprobs`, temperature 1), copied to the host.
    pub fn token_logprobs(&self, ids: &[u32], b: usize, t: usize, targets: &[u32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let n = b * t;
        if targets.len() != n {
            return Err(input_err(
                "gpu token_logprobs",
                format!("{} targets for {n} positions", targets.len()),
            ));
        }
        let fwd = self.forward(ids, b, t)?;
        let rows: Vec<u32> = (0..n as u32).collect();
        let s = self.score(&fwd, &rows, targets, 1.0)?;
        let g = &self.gpu;
        Ok((g.download(&s.logp).map_err(cuda)?, g.download(&s.lse).map_err(cuda)?))
    }
}

/// A layer's output projection.
fn attn_out(a: &AttnSlots) -> &Linear {
    match a {
        AttnSlots::Gqa { o, .. } | AttnSlots::Mla { o, .. } => o,
    }
}

/// The backward.
impl GpuModel {
    /// `dW += dy^T x` and `dx (+)= dy W` for `y = x W^T + b` (`db +=`);
    /// returns `dx` unless `dx_acc` receives it.
    fn linear_back(
        &self,
        grads: &mut CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        l: &Linear,
        n: usize,
        dx_acc: Option<&mut CudaSlice<f32>>,
    ) -> Result<Option<CudaSlice<f32>>> {
        let g = &self.gpu;
        let sw = MatmulShape {
            m: l.out,
            k: n,
            n: l.inp,
            trans_a: true,
            trans_b: false,
            accumulate: true,
        };
        let mut sx = MatmulShape {
            m: n,
            k: l.out,
            n: l.inp,
            trans_a: false,
            trans_b: false,
            accumulate: false,
        };
        let w = l.w;
        // dy in bf16 once, for the weight gradient and for dx.
        let dy16 = match self.precision {
            GpuPrecision::Bf16 => Some(self.to_bf16(dy, n * l.out)?),
            GpuPrecision::F32 => None,
        };
        if !l.frozen && self.trains(w) {
            self.weight_grad(grads, w, dy, x, sw, dy16.as_ref())?;
            if let Some(b) = l.b.filter(|b| self.trains(*b)) {
                launch::bias_grad_f32(g, &mut grads.slice_mut(b.off..b.off + b.len), dy, n, l.out).map_err(cuda)?;
            }
        }
        let dxa = match l.lora.as_ref().filter(|lo| lo.enabled) {
            Some(lo) => {
                let (dxa, mask) = self.lora_back(grads, dy, x, l, lo, n)?;
                Some((dxa, mask, lo.a, lo.r))
            }
            None => None,
        };
        let mut owned = None;
        let dx = match dx_acc {
            Some(acc) => {
                sx.accumulate = true;
                acc
            }
            None => owned.insert(self.zeros(n * l.inp)?),
        };
        self.product(&mut dx.slice_mut(..n * l.inp), dy, self.weight(w), sx, dy16.as_ref())?;
        if let Some((dxa, mask, a, r)) = dxa {
            // dx += (s dy B) A, times the dropout mask when there is one.
            let mut sa = MatmulShape {
                m: n,
                k: r,
                n: l.inp,
                trans_a: false,
                trans_b: false,
                accumulate: true,
            };
            match mask {
                None => self.product(&mut dx.slice_mut(..n * l.inp), &dxa, self.weight(a), sa, None)?,
                Some(m) => {
                    sa.accumulate = false;
                    let mut dxd = self.zeros(n * l.inp)?;
                    self.product(&mut dxd.slice_mut(..n * l.inp), &dxa, self.weight(a), sa, None)?;
                    launch::mul_inplace_f32(g, &mut dxd, &m, n * l.inp).map_err(cuda)?;
                    launch::add_inplace_f32(g, dx, &dxd, n * l.inp).map_err(cuda)?;
                }
            }
        }
        Ok(owned)
    }

    /// A dense SwiGLU MLP's backward from `dy [n, C]`: its parameters'
    /// gradients `+=` and `dx +=` (the MLP's input `x`).
    #[allow(clippy::too_many_arguments)]
    fn dense_mlp_back(
        &self,
        grads: &mut CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        mlp: &MlpSlots,
        (gate, up, act): (&CudaSlice<f32>, &CudaSlice<f32>, &CudaSlice<f32>),
        n: usize,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let dact = Self::some(self.linear_back(grads, dy, act, &mlp.down, n, None)?)?;
        let f = mlp.gate.out;
        let (mut dg, mut du) = (self.zeros(n * f)?, self.zeros(n * f)?);
        launch::swiglu_backward_f32(&self.gpu, &mut dg, &mut du, &dact, gate, up, n * f).map_err(cuda)?;
        self.linear_back(grads, &dg, x, &mlp.gate, n, Some(&mut *dx))?;
        self.linear_back(grads, &du, x, &mlp.up, n, Some(dx))?;
        Ok(())
    }

    /// `grads[w] (+)= op(a) op(b)` in the model's precision (bf16 operands
    /// with f32 accumulation, or f32); `a16`, when given, is `a` already in
    /// bf16.
    fn weight_grad(
        &self,
        grads: &mut CudaSlice<f32>,
        w: Slot,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        s: MatmulShape,
        a16: Option<&CudaSlice<u16>>,
    ) -> Result<()> {
        let g = &self.gpu;
        let mut out = grads.slice_mut(w.off..w.off + w.len);
        match self.precision {
            GpuPrecision::F32 => matmul_f32(g, &mut out, a, b, s).map_err(cuda),
            GpuPrecision::Bf16 => {
                let owned;
                let a16 = match a16 {
                    Some(x) => x,
                    None => {
                        owned = self.to_bf16(a, s.m * s.k)?;
                        &owned
                    }
                };
                let b16 = self.to_bf16(b, s.k * s.n)?;
                matmul_bf16_f32out(g, &mut out, a16, &b16, s).map_err(cuda)
            }
        }
    }

    /// A LoRA adapter's backward: `dB += dy^T (s xd A^T)`, `dA += dxa^T
    /// xd` with `dxa = s dy B` [n, r] and `xd` the input after the
    /// forward's dropout; returns `dxa` and the dropout mask (for `dx +=
    /// mask * (dxa A)`).
    fn lora_back(
        &self,
        grads: &mut CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        l: &Linear,
        lo: &LoraSlots,
        n: usize,
    ) -> Result<(CudaSlice<f32>, Option<CudaSlice<f32>>)> {
        let mask = self.dropout_mask(lo, n, l.inp)?;
        let xd = self.dropped(x, mask.as_ref(), n * l.inp)?;
        let x = xd.as_ref().unwrap_or(x);
        let xa = self.lora_down(x, l, lo, n)?;
        let sb = MatmulShape {
            m: l.out,
            k: n,
            n: lo.r,
            trans_a: true,
            trans_b: false,
            accumulate: true,
        };
        self.weight_grad(grads, lo.b, dy, &xa, sb, None)?;
        let mut dxa = self.zeros(n * lo.r)?;
        let sd = MatmulShape {
            m: n,
            k: l.out,
            n: lo.r,
            trans_a: false,
            trans_b: false,
            accumulate: false,
        };
        self.product(&mut dxa.slice_mut(..n * lo.r), dy, self.weight(lo.b), sd, None)?;
        launch::scale_f32(&self.gpu, &mut dxa, lo.scale, n * lo.r).map_err(cuda)?;
        let sa = MatmulShape {
            m: lo.r,
            k: n,
            n: l.inp,
            trans_a: true,
            trans_b: false,
            accumulate: true,
        };
        self.weight_grad(grads, lo.a, &dxa, x, sa, None)?;
        Ok((dxa, mask))
    }

    /// Whether slot `s` is in the trainable prefix, the part of the layout
    /// the gradient buffer covers.
    fn trains(&self, s: Slot) -> bool {
        s.off + s.len <= self.layout.trainable
    }

    /// RMSNorm backward: `dx` assigned, the weight's gradient accumulated
    /// (into a scratch buffer for a frozen weight).
    fn norm_back(
        &self,
        grads: &mut CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        rstd: &CudaSlice<f32>,
        w: Slot,
        rows: usize,
        c: usize,
    ) -> Result<CudaSlice<f32>> {
        let mut dx = self.zeros(rows * c)?;
        let mut scratch;
        let mut dw = if self.trains(w) {
            grads.slice_mut(w.off..w.off + w.len)
        } else {
            scratch = self.zeros(w.len)?;
            scratch.slice_mut(..w.len)
        };
        launch::rmsnorm_backward_f32(&self.gpu, &mut dx, &mut dw, dy, x, &self.w32(w)?, rstd, rows, c).map_err(cuda)?;
        Ok(dx)
    }

    fn some(x: Option<CudaSlice<f32>>) -> Result<CudaSlice<f32>> {
        x.ok_or_else(|| input_err("gpu backward", "a product returned no gradient"))
    }

    /// The attention's backward from `datt [N, H * Dv]` (gradient of the
    /// attention output) to `dln1 [N, C]`.
    #[allow(clippy::too_many_arguments)]
    fn attn_back(
        &self,
        grads: &mut CudaSlice<f32>,
        a: &LayerActs,
        s: &LayerSlots,
        datt: &CudaSlice<f32>,
        pos: &CudaSlice<u32>,
        b: usize,
        t: usize,
    ) -> Result<CudaSlice<f32>> {
        let g = &self.gpu;
        let cfg = &self.config;
        let n = b * t;
        let geo = self.attn_geometry(b, t);
        let (mut dq, mut dk, mut dv) = (
            self.zeros(n * geo.h * geo.dk)?,
            self.zeros(n * geo.hk * geo.dk)?,
            self.zeros(n * geo.hk * geo.dv)?,
        );
        match self.precision {
            GpuPrecision::F32 => launch::attention_backward_f32(
                g, &mut dq, &mut dk, &mut dv, datt, &a.qkv.q, &a.qkv.k, &a.qkv.v, &a.att, &a.lse, &geo,
            )
            .map_err(cuda)?,
            GpuPrecision::Bf16 => {
                let q = self.to_bf16(&a.qkv.q, n * geo.h * geo.dk)?;
                let k = self.to_bf16(&a.qkv.k, n * geo.hk * geo.dk)?;
                let v = self.to_bf16(&a.qkv.v, n * geo.hk * geo.dv)?;
                let cu = self.cu_seqlens(b, t)?;
                flash::flash_backward_bf16(
                    g,
                    &mut dq,
                    &mut dk,
                    &mut dv,
                    datt,
                    &q,
                    &k,
                    &v,
                    &a.att,
                    &a.lse,
                    &cu,
                    &self.flash_geometry(b, t),
                )
                .map_err(cuda)?;
            }
        }
        let (gq, gk) = self.rope_geometries();
        match (&s.attn, &a.qkv.acts) {
            (AttnSlots::Gqa { q, k, v, qk_norm, .. }, AttnActs::Gqa { ql, kl, qk_rstd }) => {
                let (h, hk, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
                let dqn = self.rope(&dq, pos, n, gq, true)?;
                let dkn = self.rope(&dk, pos, n, gk, true)?;
                let (dql, dkl) = match (qk_norm, qk_rstd) {
                    (Some((qw, kw)), Some((q_rstd, k_rstd))) => (
                        self.norm_back(grads, &dqn, ql, q_rstd, *qw, n * h, d)?,
                        self.norm_back(grads, &dkn, kl, k_rstd, *kw, n * hk, d)?,
                    ),
                    _ => (dqn, dkn),
                };
                let mut dln1 = Self::some(self.linear_back(grads, &dql, &a.ln1, q, n, None)?)?;
                self.linear_back(grads, &dkl, &a.ln1, k, n, Some(&mut dln1))?;
                self.linear_back(grads, &dv, &a.ln1, v, n, Some(&mut dln1))?;
                Ok(dln1)
            }
            (
                AttnSlots::Mla {
                    q_lora,
                    q,
                    kv_a,
                    kv_norm,
                    kv_b,
                    ..
                },
                AttnActs::Mla { qa, c, c_rstd, cn },
            ) => {
                let m = cfg
                    .mla
                    .as_ref()
                    .ok_or_else(|| input_err("gpu", "MLA slots without an MLA config"))?;
                let h = cfg.num_heads;
                let (dn, dr, dvw, kvl) = (m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank);
                let dkw = dn + dr;
                let rows = n * h;
                // Keys and values back to kv_b's output and the shared rotary key.
                let mut dkvb = self.zeros(n * kv_b.out)?;
                self.copy_cols(&mut dkvb, &dk, ColsCopy::plain(rows, dn, (dn + dvw, 0), (dkw, 0)))?;
                self.copy_cols(&mut dkvb, &dv, ColsCopy::plain(rows, dvw, (dn + dvw, dn), (dvw, 0)))?;
                let mut dkpe_r = self.zeros(n * dr)?;
                self.copy_cols(
                    &mut dkpe_r,
                    &dk,
                    ColsCopy {
                        group: h,
                        ..ColsCopy::plain(n, dr, (dr, 0), (dkw, dn))
                    },
                )?;
                let dkpe = self.rope(&dkpe_r, pos, n, gk, true)?;
                let dcn = Self::some(self.linear_back(grads, &dkvb, cn, kv_b, n, None)?)?;
                let dc = self.norm_back(grads, &dcn, c, c_rstd, *kv_norm, n, kvl)?;
                let mut dkva = self.zeros(n * kv_a.out)?;
                self.copy_cols(&mut dkva, &dc, ColsCopy::plain(n, kvl, (kv_a.out, 0), (kvl, 0)))?;
                self.copy_cols(&mut dkva, &dkpe, ColsCopy::plain(n, dr, (kv_a.out, kvl), (dr, 0)))?;
                let mut dln1 = Self::some(self.linear_back(grads, &dkva, &a.ln1, kv_a, n, None)?)?;
                let dq_lin = self.rope(&dq, pos, n, gq, true)?;
                match (q_lora, q, qa) {
                    (Some((qa_l, qa_w, qb_l)), _, Some((qa_x, qa_rstd, qan))) => {
                        let dqan = Self::some(self.linear_back(grads, &dq_lin, qan, qb_l, n, None)?)?;
                        let dqa = self.norm_back(grads, &dqan, qa_x, qa_rstd, *qa_w, n, qa_l.out)?;
                        self.linear_back(grads, &dqa, &a.ln1, qa_l, n, Some(&mut dln1))?;
                    }
                    (None, Some(q_l), None) => {
                        self.linear_back(grads, &dq_lin, &a.ln1, q_l, n, Some(&mut dln1))?;
                    }
                    _ => return Err(input_err("gpu backward", "MLA activations do not match the layer")),
                }
                Ok(dln1)
            }
            _ => Err(input_err("gpu backward", "activations do not match the layer kind")),
        }
    }

    /// Gradients of `sum_i dlogp[i] * logp[i] + dentropy[i] * entropy[i]`
    /// over the scored rows (both on the device, as the loss left them),
    /// accumulated (`+=`) into the flat gradient buffer; `aux_coef` adds
    /// that multiple of the Switch load-balancing loss of softmax-routed MoE
    /// layers (as `Model::backward_with_aux`). Consumes the forward.
    pub fn backward(
        &mut self,
        fwd: GpuForward,
        scores: &GpuScores,
        dlogp: &CudaSlice<f32>,
        dentropy: Option<&CudaSlice<f32>>,
        aux_coef: f32,
    ) -> Result<()> {
        self.backward_hooked(fwd, scores, dlogp, dentropy, aux_coef, None)
    }

    /// [`GpuModel::backward`], calling `hook` (when given) each time a part
    /// of the gradient buffer is complete ([`Layout::grad_ready_parts`]:
    /// the head after the final norm, each layer after its input norm,
    /// from the last layer to the first, the embedding at the end). The
    /// hook runs on the host while the part's kernels may still be queued:
    /// work on another stream must wait for the GPU's stream (an event)
    /// before reading the part. The backward writes no part again after
    /// reporting it.
    pub fn backward_hooked(
        &mut self,
        fwd: GpuForward,
        scores: &GpuScores,
        dlogp: &CudaSlice<f32>,
        dentropy: Option<&CudaSlice<f32>>,
        aux_coef: f32,
        hook: Option<&mut GradHook<'_>>,
    ) -> Result<()> {
        if self.grads.is_none() {
            self.zero_grad()?;
        }
        let mut grads = self
            .grads
            .take()
            .ok_or_else(|| input_err("gpu backward", "no gradient buffer"))?;
        self.moe_grad_bytes.store(0, Ordering::Relaxed);
        let r = self.backward_into(&mut grads, fwd, scores, dlogp, dentropy, aux_coef, hook);
        self.grads = Some(grads);
        self.grad_version = self.grad_version.wrapping_add(1);
        r
    }

    /// Workspace bytes of the stacked gradient buffers (router, routed
    /// experts, shared experts) that the last backward allocated for its
    /// largest MoE layer, counted from their lengths: one MoE layer's
    /// gradients before they are added to the flat buffer. 0 under a LoRA
    /// layout without expert parallelism (the frozen layers' backward
    /// computes the input gradient alone) and for dense models.
    pub fn moe_grad_workspace(&self) -> u64 {
        self.moe_grad_bytes.load(Ordering::Relaxed)
    }

    /// The gradient buffer's version: it changes with every backward,
    /// zeroing, scaling or write from outside ([`GpuModel::grads_mut`]).
    pub fn grad_version(&self) -> u64 {
        self.grad_version
    }

    #[allow(clippy::too_many_arguments)]
    fn backward_into(
        &self,
        grads: &mut CudaSlice<f32>,
        fwd: GpuForward,
        sc: &GpuScores,
        dlogp: &CudaSlice<f32>,
        dentropy: Option<&CudaSlice<f32>>,
        aux_coef: f32,
        mut hook: Option<&mut GradHook<'_>>,
    ) -> Result<()> {
        // The parts in the order they complete (head, last layer .. first,
        // embedding); only computed when someone listens.
        let parts = if hook.is_some() {
            self.layout.grad_ready_parts()
        } else {
            Vec::new()
        };
        let mut ready = |part: usize, grads: &mut CudaSlice<f32>| -> Result<()> {
            match (hook.as_deref_mut(), parts.get(part)) {
                (Some(h), Some(ranges)) if !ranges.is_empty() => h(GradReady {
                    gpu: &self.gpu,
                    grads,
                    ranges,
                })
                .map_err(|msg| input_err("gradient hook", msg)),
                _ => Ok(()),
            }
        };
        let cfg = &self.config;
        let g = &self.gpu;
        let (b, t) = (fwd.b, fwd.t);
        let n = b * t;
        let (c, v) = (cfg.hidden_size, cfg.vocab_size);
        let nr = sc.len();
        if dlogp.len() < nr || dentropy.is_some_and(|d| d.len() < nr) {
            return Err(input_err(
                "gpu backward",
                format!("fewer gradients than the {nr} scored rows"),
            ));
        }
        // The lm head over the scored rows, then their hidden-state
        // gradients scattered back to the batch's rows.
        let mut dh_rows = self.zeros(nr * c)?;
        if nr > 0 {
            let plan = lmhead::plan_lm_head(nr, c, v, sc.temperature, lmhead::DEFAULT_BUDGET_BYTES).map_err(cuda)?;
            let zero;
            let de = match dentropy {
                Some(d) => d,
                None => {
                    zero = self.zeros(nr)?;
                    &zero
                }
            };
            let x = self.head_operands(&sc.hidden, &sc.hidden16)?;
            let head = self.layout.lm_head;
            if self.trains(head) {
                lmhead::lm_head_logprob_backward_f32(
                    g,
                    &mut dh_rows,
                    &mut grads.slice_mut(head.off..head.off + head.len),
                    &x,
                    &sc.targets,
                    &sc.lse,
                    &sc.entropy,
                    dlogp,
                    de,
                    &plan,
                )
                .map_err(cuda)?;
            } else {
                lmhead::lm_head_logprob_backward_dhidden_f32(
                    g,
                    &mut dh_rows,
                    &x,
                    &sc.targets,
                    &sc.lse,
                    &sc.entropy,
                    dlogp,
                    de,
                    &plan,
                )
                .map_err(cuda)?;
            }
        }
        let mut dhidden = self.zeros(n * c)?;
        launch::embedding_backward_f32(g, &mut dhidden, &dh_rows, TokenIds::Host(&sc.rows), nr, n, c).map_err(cuda)?;
        let mut dx = self.norm_back(grads, &dhidden, &fwd.x_last, &fwd.rstd, self.layout.norm, n, c)?;
        drop(dhidden);
        ready(0, grads)?;
        let nl = self.layout.layers.len();
        let aux = self.aux_grad(&fwd, aux_coef)?;
        let GpuForward { ids, pos, layers, .. } = fwd;
        for (l, (s, saved)) in self.layout.layers.iter().zip(layers).enumerate().rev() {
            let mut a = match saved {
                Saved::Full(a) => *a,
                Saved::Input { mut x, .. } => self.layer_forward(&mut x, s, &pos, b, t)?,
            };
            // MLP: x_out = x_mid + ffn(ln2(x_mid)).
            let mut dln2 = self.zeros(n * c)?;
            match (&s.ffn, &mut a.ffn) {
                (FfnSlots::Dense(mlp), FfnActs::Dense { gate, up, act }) => {
                    self.dense_mlp_back(grads, &dx, &a.ln2, mlp, (gate, up, act), n, &mut dln2)?;
                }
                (
                    FfnSlots::Moe {
                        router,
                        experts,
                        shared,
                        ..
                    },
                    FfnActs::Moe {
                        buf,
                        ep: ep_buf,
                        shared: shared_acts,
                    },
                ) => {
                    let (w, _) = self.moe_weights(&s.ffn, true)?;
                    // The layer's gradients into zeroed stacked buffers,
                    // then added to the flat buffer's views; with the
                    // experts sharded only the local experts' (the layout's).
                    // A LoRA layout freezes the router and the experts:
                    // without expert parallelism the backward then gives the
                    // input gradient alone, with no stacked buffers to fill
                    // and discard.
                    let frozen = !self.trains(*router) && self.ep.is_none();
                    let mut gr = match (frozen, self.layout.expert_shard.is_some()) {
                        (true, _) => None,
                        (false, true) => {
                            let d = buf.dims;
                            let mut x = MoeGrads::zeros(g, &MoeDims { e: experts.len(), ..d }).map_err(cuda)?;
                            x.router = g.zeros::<f32>((d.e * d.c).max(1)).map_err(cuda)?;
                            Some(x)
                        }
                        (false, false) => Some(MoeGrads::zeros(g, &buf.dims).map_err(cuda)?),
                    };
                    match (&self.ep, ep_buf, gr.as_mut()) {
                        (_, _, None) => {
                            moe_layer::moe_layer_backward_dx(g, &mut dln2, &dx, &a.ln2, &w, buf, aux.as_ref())
                                .map_err(cuda)?
                        }
                        (Some(ep), Some(eb), Some(gr)) => {
                            // Only this rank's experts get gradients (the
                            // sum over every rank's tokens); the others stay
                            // zero here, so an all-reduce of the flat
                            // gradient leaves each expert its owner's.
                            let mut comm = ep
                                .comm
                                .lock()
                                .map_err(|_| input_err("gpu", "expert-parallel communicator poisoned"))?;
                            let sh = match self.layout.expert_shard {
                                // The buffers hold only the local experts.
                                Some(_) => 0..experts.len(),
                                None => moe_ep::expert_shard(buf.dims.e, ep.world, ep.rank),
                            };
                            let (fc, cf) = (buf.dims.f * c, c * buf.dims.f);
                            let mut grv = moe_layer::MoeGradsMut {
                                router: gr.router.as_view_mut(),
                                w_gate: gr.w_gate.slice_mut(sh.start * fc..sh.end * fc),
                                w_up: gr.w_up.slice_mut(sh.start * fc..sh.end * fc),
                                w_down: gr.w_down.slice_mut(sh.start * cf..sh.end * cf),
                                shared: gr
                                    .shared
                                    .as_mut()
                                    .map(|[x, y, z]| [x.as_view_mut(), y.as_view_mut(), z.as_view_mut()]),
                            };
                            moe_ep::moe_layer_backward_ep(
                                g,
                                &mut comm,
                                &mut dln2,
                                &mut grv,
                                &dx,
                                &a.ln2,
                                &w,
                                buf,
                                eb,
                                aux.as_ref(),
                            )
                            .map_err(cuda)?;
                        }
                        (_, _, Some(gr)) => moe_layer::moe_layer_backward(
                            g,
                            &mut dln2,
                            &mut gr.view_mut(),
                            &dx,
                            &a.ln2,
                            &w,
                            buf,
                            aux.as_ref(),
                        )
                        .map_err(cuda)?,
                    }
                    if let Some(gr) = &gr {
                        self.moe_grad_bytes.fetch_max(gr.bytes(), Ordering::Relaxed);
                        if self.trains(*router) {
                            self.add_moe_grads(grads, gr, *router, experts, shared.as_ref())?;
                        }
                    }
                    // Adapted shared experts: their dense MLP's backward.
                    if let (Some(mlp), Some(sa)) = (adapted_shared(shared.as_ref()), shared_acts) {
                        let DenseActs { gate, up, act } = &**sa;
                        self.dense_mlp_back(grads, &dx, &a.ln2, mlp, (gate, up, act), n, &mut dln2)?;
                    }
                }
                _ => return Err(input_err("gpu backward", "activations do not match the layer kind")),
            }
            let dmid = self.norm_back(grads, &dln2, &a.x_mid, &a.ln2_rstd, s.ln2, n, c)?;
            launch::add_inplace_f32(g, &mut dx, &dmid, n * c).map_err(cuda)?;
            // Attention: x_mid = x_in + o(attn(ln1(x_in))).
            let datt = Self::some(self.linear_back(grads, &dx, &a.att, attn_out(&s.attn), n, None)?)?;
            let dln1 = self.attn_back(grads, &a, s, &datt, &pos, b, t)?;
            let din = self.norm_back(grads, &dln1, &a.x_in, &a.ln1_rstd, s.ln1, n, c)?;
            launch::add_inplace_f32(g, &mut dx, &din, n * c).map_err(cuda)?;
            ready(nl - l, grads)?;
        }
        let e = self.layout.embed;
        if self.trains(e) {
            launch::embedding_backward_f32(
                g,
                &mut grads.slice_mut(e.off..e.off + e.len),
                &dx,
                TokenIds::Host(&ids),
                n,
                v,
                c,
            )
            .map_err(cuda)?;
        }
        ready(nl + 1, grads)?;
        Ok(())
    }

    /// The Switch loss's gradient on every token's router probabilities,
    /// `coef * E * count_e / T^2` with counts and tokens pooled over the
    /// softmax-routed MoE layers (as the CPU model); `None` when off.
    fn aux_grad(&self, fwd: &GpuForward, coef: f32) -> Result<Option<CudaSlice<f32>>> {
        let Some(m) = self.config.moe.as_ref() else {
            return Ok(None);
        };
        if coef == 0.0 || m.router != Router::SoftmaxTopK {
            return Ok(None);
        }
        // The pooled counts are E integers per layer: read back, as the
        // scalars of a step are.
        let e = m.n_experts;
        let (mut counts, mut tokens) = (vec![0u64; e], 0usize);
        for l in &fwd.layers {
            if let Some(layer_counts) = l.counts() {
                let layer = self.gpu.download(layer_counts).map_err(cuda)?;
                for (c, &x) in counts.iter_mut().zip(&layer) {
                    *c += u64::from(x);
                }
                tokens += match self.ep {
                    // The loads are every rank's: so is the token count
                    // (each token is routed to top_k experts).
                    Some(_) => (layer[..e].iter().map(|&x| x as usize).sum::<usize>()) / m.top_k.max(1),
                    None => fwd.rows(),
                };
            }
        }
        if tokens == 0 {
            return Ok(None);
        }
        let (ef, tf) = (e as f64, tokens as f64);
        let host: Vec<f32> = counts
            .iter()
            .map(|&c| (coef as f64 * ef * c as f64 / (tf * tf)) as f32)
            .collect();
        Ok(Some(self.gpu.upload(&host).map_err(cuda)?))
    }

    /// Adds an MoE layer's stacked gradients into the flat buffer.
    fn add_moe_grads(
        &self,
        grads: &mut CudaSlice<f32>,
        gr: &MoeGrads,
        router: Slot,
        experts: &[MlpSlots],
        shared: Option<&MlpSlots>,
    ) -> Result<()> {
        let g = &self.gpu;
        let mut add = |s: Slot, x: &CudaSlice<f32>, len: usize| -> Result<()> {
            launch::add_inplace_f32(g, &mut grads.slice_mut(s.off..s.off + len), x, len).map_err(cuda)
        };
        add(router, &gr.router, router.len)?;
        if let Some(first) = experts.first() {
            let e = experts.len();
            add(first.gate.w, &gr.w_gate, first.gate.w.len * e)?;
            add(first.up.w, &gr.w_up, first.up.w.len * e)?;
            add(first.down.w, &gr.w_down, first.down.w.len * e)?;
        }
        if let (Some(s), Some([dg, du, dd])) = (shared, &gr.shared) {
            add(s.gate.w, dg, s.gate.w.len)?;
            add(s.up.w, du, s.up.w.len)?;
            add(s.down.w, dd, s.down.w.len)?;
        }
        Ok(())
    }
}

/// The optimizer's device side.
impl GpuModel {
    /// Zeroed AdamW moments for this model (two flat f32 buffers over the
    /// trainable prefix).
    pub fn new_moments(&self) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
        let n = self.layout.trainable;
        Ok((self.zeros(n)?, self.zeros(n)?))
    }

    /// The device bytes the parameters, the bf16 copy and the gradient
    /// buffer hold now, counted from the buffers' lengths (`moments` 0:
    /// [`crate::Policy::param_bytes`] adds those of its moments).
    pub fn param_bytes(&self) -> ParamBytes {
        ParamBytes {
            weights: 4 * self.params.len() as u64,
            weights_bf16: 2 * self.params16.as_ref().map_or(0, |p| p.len()) as u64,
            grads: 4 * self.grads.as_ref().map_or(0, |g| g.len()) as u64,
            moments: 0,
            master: self.master_shard.as_ref().map_or(0, |s| 4 * s.range.len() as u64),
            host_pinned: self.host_master.as_ref().map_or(0, |m| 4 * m.len() as u64),
        }
    }

    /// The global L2 norm of the trainable gradients (one f64 read back).
    ///
    /// With the experts sharded ([`GpuModel::shard_experts`]) the norm is
    /// the whole model's and a collective over the expert-parallel
    /// communicator: the squares of the replicated ranges (summed over the
    /// ranks already, the same on every rank) plus every rank's squares of
    /// its local experts, summed over the ranks.
    pub fn grad_norm(&self) -> Result<f64> {
        let Some(gr) = &self.grads else {
            return Ok(0.0);
        };
        if self.layout.expert_shard.is_none() {
            return launch::grad_norm_f32(&self.gpu, gr, self.layout.trainable).map_err(cuda);
        }
        let ep = self
            .ep
            .as_ref()
            .ok_or_else(|| input_err("grad_norm", "sharded experts without expert parallelism"))?;
        let sq = |ranges: Vec<std::ops::Range<usize>>| -> Result<f64> {
            let mut acc = 0.0;
            for r in ranges {
                let n = launch::grad_norm_f32(&self.gpu, &gr.slice(r.clone()), r.len()).map_err(cuda)?;
                acc += n * n;
            }
            Ok(acc)
        };
        let replicated = sq(self.layout.replicated_ranges())?;
        let mut local = self
            .gpu
            .upload(&[sq(self.layout.local_expert_ranges())?])
            .map_err(cuda)?;
        ep.comm
            .lock()
            .map_err(|_| input_err("gpu", "expert-parallel communicator poisoned"))?
            .all_reduce_sum(&mut local, 0..1)
            .map_err(cuda)?;
        let local = self.gpu.download(&local).map_err(cuda)?;
        Ok((replicated + local.first().copied().unwrap_or(0.0)).sqrt())
    }

    /// Scales the gradients by `s` (clipping), on the trainable prefix.
    pub fn scale_grads(&mut self, s: f32) -> Result<()> {
        self.grad_version = self.grad_version.wrapping_add(1);
        if let Some(gr) = &mut self.grads {
            launch::scale_f32(&self.gpu, gr, s, self.layout.trainable).map_err(cuda)?;
        }
        Ok(())
    }

    /// One AdamW step over the trainable prefix (one launch; in bf16
    /// precision the same launch refreshes the bf16 copy), then the MoE
    /// layers' weights. Frozen tensors are not touched.
    pub fn adamw(&mut self, m: &mut CudaSlice<f32>, v: &mut CudaSlice<f32>, h: &AdamwScalars) -> Result<()> {
        let n = self.layout.trainable;
        let g = &self.gpu;
        let grads = self
            .grads
            .as_ref()
            .ok_or_else(|| input_err("gpu adamw", "no gradients: run a backward first"))?;
        if self.host_master.is_some() {
            return Err(input_err("gpu adamw", "the optimizer is offloaded to the host"));
        }
        if self.master_shard.is_some() {
            return Err(input_err(
                "gpu adamw",
                "the f32 master is sharded over the ranks (ZeRO-1 updates it)",
            ));
        }
        match &mut self.params16 {
            Some(p16) => launch::adamw_copy_bf16_f32(g, &mut self.params, m, v, p16, grads, n, h).map_err(cuda)?,
            None => launch::adamw_f32(g, &mut self.params, m, v, grads, n, h).map_err(cuda)?,
        }
        Ok(())
    }

    /// DeepSeek-V3's auxiliary-loss-free balancing after a step, on the
    /// device: each MoE layer's `e_score_correction_bias` moves by `speed`
    /// towards balance, from the expert loads of `fwd`.
    pub fn update_expert_bias(&mut self, fwd: &GpuForward, speed: f32) -> Result<()> {
        for (s, a) in self.layout.layers.iter().zip(&fwd.layers) {
            if let (FfnSlots::Moe { bias: Some(bias), .. }, Some(counts)) = (&s.ffn, a.counts()) {
                let range = bias.off..bias.off + bias.len;
                let packed = self.f32_range(*bias)?;
                launch_moe::moe_bias_update_f32(
                    &self.gpu,
                    &mut self.params.slice_mut(packed.clone()),
                    counts,
                    bias.len,
                    speed,
                )
                .map_err(cuda)?;
                // The routing reads the bias in f32; its bf16 copy is kept
                // equal anyway (a few hundred elements, not the whole model).
                if let Some(p16) = &mut self.params16 {
                    launch::cast_f32_to_bf16(
                        &self.gpu,
                        &mut p16.slice_mut(range),
                        &self.params.slice(packed),
                        bias.len,
                    )
                    .map_err(cuda)?;
                }
            }
        }
        Ok(())
    }
}

impl GpuModel {
    /// Logits `[n, V]` of residual rows `x [n, C]` (final norm, lm head).
    fn head_logits(&self, x: &CudaSlice<f32>, n: usize) -> Result<CudaSlice<f32>> {
        let c = self.config.hidden_size;
        let (hidden, _) = self.norm_rstd(x, self.layout.norm, n, c)?;
        let head = Linear {
            w: self.layout.lm_head,
            b: None,
            inp: c,
            out: self.config.vocab_size,

            lora: None,
            frozen: true,
        };
        self.linear(&hidden, &head, n)
    }
}

impl GpuModel {
    /// The final normed hidden states at rows `rows` of a forward (row `r`
    /// is position `r % T` of sequence `r / T`), gathered on the device and
    /// copied to the host, `[rows, C]`: what a head other than the lm head
    /// (a sequence-classification score) reads.
    pub fn hidden_rows(&self, fwd: &GpuForward, rows: &[u32]) -> Result<Vec<f32>> {
        let (c, n) = (self.config.hidden_size, rows.len());
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut out = self.zeros(n * c)?;
        launch::embedding_forward_f32(&self.gpu, &mut out, &fwd.hidden, TokenIds::Host(rows), n, fwd.rows(), c)
            .map_err(cuda)?;
        self.gpu.download(&out).map_err(cuda)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: &str) -> ModelConfig {
        ModelConfig::from_json_str(json, std::path::Path::new("config.json")).unwrap()
    }

    #[test]
    fn supported_models_and_refusals_with_reasons() {
        let dense = cfg(
            r#"{"model_type": "qwen2", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}"#,
        );
        assert!(gpu_support(&dense).is_ok());
        let moe = cfg(
            r#"{"model_type": "qwen3_moe", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
            "moe_intermediate_size": 8, "num_experts": 4, "num_experts_per_tok": 2,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 4}"#,
        );
        assert!(gpu_support(&moe).is_ok());
        let too_many = cfg(
            r#"{"model_type": "qwen3_moe", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
            "moe_intermediate_size": 8, "num_experts": 2048, "num_experts_per_tok": 2,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 4}"#,
        );
        assert!(gpu_support(&too_many).unwrap_err().to_string().contains("2048 experts"));
        let wide = cfg(
            r#"{"model_type": "qwen2", "vocab_size": 32, "hidden_size": 1024, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}"#,
        );
        assert!(gpu_support(&wide)
            .unwrap_err()
            .to_string()
            .contains("head widths 512/512"));
    }
}
