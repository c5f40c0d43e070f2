//! [`Policy`]: the one model surface the trainer and the sampler use,
//! whatever the device. It holds a [`Model`] (CPU, f32) or a [`GpuModel`]
//! (its parameters, gradients and, through [`Moments`], the AdamW state in
//! flat device buffers) and offers the same operations on both:
//!
//! - [`Policy::forward`] over a right-padded batch, keeping what the
//!   backward needs on the model's device;
//! - [`Policy::score`]: tempered log-probs and entropies of chosen
//!   positions (a [`Tensor`] on the model's device, so a loss computed on
//!   the GPU never copies them to the host);
//! - [`Policy::backward`] from d loss / d log-prob (and d loss / d entropy),
//!   accumulating into the policy's own flat gradient buffer;
//! - [`Policy::optimizer_step`]: global-norm clipping and one AdamW update
//!   over the trainable prefix, on the device or, with
//!   [`Policy::set_offload_optimizer`], on the host ([`crate::offload`]);
//! - parameter access, save, and a host copy for the CPU sampler.
//!
//! `--device` is resolved once, by [`resolve_device`]; nothing above this
//! crate branches on the device.

use std::borrow::Cow;
use std::path::Path;
use std::str::FromStr;

use aha_cuda_kernels::launch::AdamwScalars;
use aha_tensor::cpu::{self, AdamW, LmHeadShape};
use aha_tensor::profile::{self, Phase};
use aha_tensor::{Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{input_err, Error, Result};
use crate::gpu::{gpu_support, GpuForward, GpuModel, GpuPrecision, GpuScores, GradHook};
use crate::model::{Activations, Model};
use crate::offload::{HostOptimizer, OffloadConfig, OffloadTiming};
use crate::params::Layout;

/// Vocabulary rows per chunk of the CPU lm head (full-vocabulary logits
/// exist for at most this many rows x chunk at a time).
const CPU_HEAD_CHUNK: usize = 4096;

/// Scored logits (`rows x V`) up to which the CPU keeps the forward's
/// tempered logits for the backward instead of recomputing them (64 Mi
/// values, 256 MiB): 2,040 x 4,096 for the bench configs; a 150k
/// vocabulary recomputes past ~440 rows.
const CPU_KEEP_LOGITS: usize = 1 << 26;

/// The precision a policy computes in (`--precision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 everywhere.
    #[default]
    F32,
    /// bf16 products with f32 accumulation, f32 master weights, gradients,
    /// moments and reductions. On the CPU the switch is process-wide
    /// ([`aha_tensor::cpu::set_product_precision`]): the f32 weights stay,
    /// and every f32 product of the process rounds its operands to bf16
    /// (fast on CPUs with AVX512-BF16, see [`aha_tensor::cpu::bf16_hardware`]).
    Bf16,
}

impl FromStr for Precision {
    type Err = Error;

    /// Parses `f32` or `bf16`.
    fn from_str(s: &str) -> Result<Precision> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(input_err(
                "--precision",
                format!("unknown precision {s:?}: use f32 or bf16"),
            )),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        })
    }
}

/// Resolves a `--device` value (`cpu`, `cuda`, `cuda:N` or `auto`) for a
/// model once: `auto` is the first GPU when one is present and takes the
/// model ([`gpu_support`]), else the CPU; an explicit `cuda` without a GPU,
/// or for a model the GPU path refuses, is an error with the reason. Both
/// precisions run on both devices, so the precision plays no part.
pub fn resolve_device(spec: &str, cfg: &ModelConfig) -> Result<Device> {
    let asked = Device::from_str(if spec == "auto" { "cpu" } else { spec })
        .map_err(|e| input_err("--device", e.to_string()))?;
    let gpus = aha_cuda_kernels::device_count();
    let device = match (spec, asked) {
        ("auto", _) => {
            if gpus > 0 && gpu_support(cfg).is_ok() {
                Device::Cuda(0)
            } else {
                Device::Cpu
            }
        }
        (_, Device::Cuda(i)) => {
            if i >= gpus {
                let why = aha_cuda_kernels::no_gpu_reason().unwrap_or_else(|| format!("{gpus} GPU(s) present"));
                return Err(input_err("--device", format!("{spec}: no such GPU ({why})")));
            }
            gpu_support(cfg)?;
            Device::Cuda(i)
        }
        (_, d) => d,
    };
    Ok(device)
}

/// The model a [`Policy`] holds, by device: what the sampler dispatches on
/// (the one place above this crate that does).
#[derive(Debug, Clone, Copy)]
pub enum PolicyModel<'a> {
    /// The CPU model (f32).
    Cpu(&'a Model),
    /// The model on a GPU: its live weights, as the trainer updates them.
    Gpu(&'a GpuModel),
}

impl<'a> From<&'a Model> for PolicyModel<'a> {
    fn from(m: &'a Model) -> PolicyModel<'a> {
        PolicyModel::Cpu(m)
    }
}

impl<'a> From<&'a Policy> for PolicyModel<'a> {
    fn from(p: &'a Policy) -> PolicyModel<'a> {
        p.model()
    }
}

enum Inner {
    Cpu { model: Box<Model>, grads: Vec<f32> },
    Gpu(Box<GpuModel>),
}

/// A model being scored or trained, on one device (see the module docs).
pub struct Policy {
    inner: Inner,
    /// Where `save` copies the config and tokenizer files from.
    source_dir: Option<std::path::PathBuf>,
    /// AdamW on the host for a policy on a GPU (`offload_optimizer`).
    offload: Option<OffloadConfig>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Policy({}, {})", self.device(), self.precision())
    }
}

/// What a forward keeps for the backward, on the policy's device.
pub struct Forward {
    inner: FwdInner,
    /// The LoRA dropout the forward ran with (its backward uses the same).
    dropout: Option<crate::lora::LoraDropout>,
}

enum FwdInner {
    Cpu(Activations),
    Gpu(GpuForward),
}

/// Tempered log-probs and entropies of scored positions, on the policy's
/// device, with what the backward of the lm head needs.
pub struct Scores {
    /// `log softmax(logits / T)[target]`, one per scored row, f32.
    pub logp: Tensor,
    /// The tempered distribution's entropy at each scored row, f32.
    pub entropy: Tensor,
    inner: ScoresInner,
}

enum ScoresInner {
    Cpu {
        lse: Vec<f32>,
        ent: Vec<f32>,
        rows: Vec<u32>,
        targets: Vec<u32>,
        temperature: f32,
        hidden: Vec<f32>,
        /// The tempered logits, chunk after chunk (empty past
        /// `CPU_KEEP_LOGITS`). The first backward takes them and turns them
        /// into their gradient in place; a later backward of the same
        /// scores finds them empty and recomputes the logits.
        kept: std::sync::Mutex<Vec<f32>>,
    },
    Gpu(Box<GpuScores>),
}

/// AdamW's first and second moments, flat, on the policy's device.
pub enum Moments {
    /// Host buffers.
    Cpu {
        /// First moment.
        m: Vec<f32>,
        /// Second moment.
        v: Vec<f32>,
    },
    /// Device buffers.
    Gpu {
        /// First moment.
        m: aha_cuda_kernels::cudarc::driver::CudaSlice<f32>,
        /// Second moment.
        v: aha_cuda_kernels::cudarc::driver::CudaSlice<f32>,
    },
    /// A GPU policy's optimizer offloaded to the host: page-locked master
    /// weights and moments (see [`crate::offload`]).
    Offload(Box<HostOptimizer>),
}

impl std::fmt::Debug for Moments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Moments::Cpu { m, .. } => write!(f, "Moments(cpu, {})", m.len()),
            Moments::Gpu { m, .. } => write!(f, "Moments(cuda, {})", m.len()),
            Moments::Offload(h) => write!(f, "Moments(offloaded, {h:?})"),
        }
    }
}

fn tensor_err(e: aha_tensor::Error) -> Error {
    Error::Tensor(e)
}

fn cuda(e: aha_cuda_kernels::Error) -> Error {
    Error::Tensor(aha_tensor::Error::from(e))
}

impl Policy {
    /// Places `model` on `device` (from [`resolve_device`]) in `precision`.
    pub fn new(model: Model, device: Device, precision: Precision) -> Result<Policy> {
        let source_dir = model.source_dir.clone();
        let inner = match device {
            Device::Cpu => {
                // Process-wide (see Precision::Bf16): a bf16 CPU policy
                // turns bf16 products on; an f32 one leaves the setting
                // as it is, so a second policy (a reference, a reward
                // model) does not turn the first one's off.
                if precision == Precision::Bf16 {
                    aha_tensor::cpu::set_product_precision(aha_tensor::cpu::ProductPrecision::Bf16);
                }
                Inner::Cpu {
                    model: Box::new(model),
                    grads: Vec::new(),
                }
            }
            Device::Cuda(i) => {
                let p = match precision {
                    Precision::F32 => GpuPrecision::F32,
                    Precision::Bf16 => GpuPrecision::Bf16,
                };
                Inner::Gpu(Box::new(GpuModel::upload_with(&model, i, p)?))
            }
        };
        Ok(Policy {
            inner,
            source_dir,
            offload: None,
        })
    }

    /// Loads an HF folder onto `device`.
    pub fn load(dir: &Path, device: Device, precision: Precision) -> Result<Policy> {
        Policy::new(Model::load(dir)?, device, precision)
    }

    /// The device the policy lives on.
    pub fn device(&self) -> Device {
        match &self.inner {
            Inner::Cpu { .. } => Device::Cpu,
            Inner::Gpu(g) => Device::Cuda(g.gpu().ordinal()),
        }
    }

    /// The precision of its products (on the CPU, the process's product
    /// precision).
    pub fn precision(&self) -> Precision {
        match &self.inner {
            Inner::Cpu { .. } => match aha_tensor::cpu::product_precision() {
                aha_tensor::cpu::ProductPrecision::F32 => Precision::F32,
                aha_tensor::cpu::ProductPrecision::Bf16 => Precision::Bf16,
            },
            Inner::Gpu(g) => match g.precision() {
                GpuPrecision::F32 => Precision::F32,
                GpuPrecision::Bf16 => Precision::Bf16,
            },
        }
    }

    /// The model's config.
    pub fn config(&self) -> &ModelConfig {
        match &self.inner {
            Inner::Cpu { model, .. } => &model.config,
            Inner::Gpu(g) => &g.config,
        }
    }

    /// The parameter layout.
    pub fn layout(&self) -> &Layout {
        match &self.inner {
            Inner::Cpu { model, .. } => &model.layout,
            Inner::Gpu(g) => g.layout(),
        }
    }

    /// Turns the LoRA adapters on or off: off, every forward, score and
    /// backward computes the base model alone (a LoRA run's KL reference,
    /// with no second copy of the weights). False when there are none.
    pub fn set_adapters_enabled(&mut self, on: bool) -> bool {
        match &mut self.inner {
            Inner::Cpu { model, .. } => model.layout.set_adapters_enabled(on),
            Inner::Gpu(g) => g.set_adapters_enabled(on),
        }
    }

    /// LoRA dropout (`lora_dropout` of the adapters' config) for the
    /// training forwards to come: `Some(seed)` draws each adapted linear's
    /// mask from `seed` (the same on the CPU and a GPU), `None` turns it
    /// off (rollouts, scoring the old policy or the reference,
    /// evaluation). A backward uses its forward's mask whatever the
    /// setting is by then. Returns whether dropout is now on (false
    /// without adapters or with dropout 0).
    pub fn set_lora_dropout(&mut self, seed: Option<u64>) -> bool {
        match &mut self.inner {
            Inner::Cpu { model, .. } => model.layout.set_lora_dropout(seed),
            Inner::Gpu(g) => g.set_lora_dropout(seed),
        }
    }

    /// Whether the policy carries LoRA adapters (then only they train).
    pub fn has_adapters(&self) -> bool {
        self.layout().lora.is_some()
    }

    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        self.layout().size
    }

    /// The flat parameters on the host (a copy on a GPU).
    pub fn params_to_host(&self) -> Result<Vec<f32>> {
        match &self.inner {
            Inner::Cpu { model, .. } => Ok(model.params.clone()),
            Inner::Gpu(g) => g.params_to_host(),
        }
    }

    /// Replaces every parameter (CPU layout).
    pub fn set_params(&mut self, host: &[f32]) -> Result<()> {
        match &mut self.inner {
            Inner::Cpu { model, .. } => {
                if host.len() != model.params.len() {
                    return Err(input_err(
                        "set_params",
                        format!("{} values for {} parameters", host.len(), model.params.len()),
                    ));
                }
                model.params.copy_from_slice(host);
                Ok(())
            }
            Inner::Gpu(g) => g.set_params(host),
        }
    }

    /// Copies `other`'s parameters (same layout; device to device when both
    /// are on a GPU), e.g. to reset a reference model to the policy.
    pub fn copy_params_from(&mut self, other: &Policy) -> Result<()> {
        match (&mut self.inner, &other.inner) {
            (Inner::Gpu(a), Inner::Gpu(b)) => a.copy_params_from(b),
            _ => {
                let host = other.params_to_host()?;
                self.set_params(&host)
            }
        }
    }

    /// The model itself, on its device (no copy): the sampler generates
    /// from it with the CPU engine or the GPU engine.
    pub fn model(&self) -> PolicyModel<'_> {
        match &self.inner {
            Inner::Cpu { model, .. } => PolicyModel::Cpu(model),
            Inner::Gpu(g) => PolicyModel::Gpu(g),
        }
    }

    /// The model on the host: borrowed on the CPU, a copy of the weights on
    /// a GPU (what the CPU sampler runs on). An error when the experts are
    /// sharded ([`Policy::gather_host_model`] gathers them).
    pub fn host_model(&self) -> Result<Cow<'_, Model>> {
        match &self.inner {
            Inner::Cpu { model, .. } => Ok(Cow::Borrowed(&**model)),
            Inner::Gpu(g) if g.layout().expert_shard.is_some() => Err(input_err(
                "host_model",
                "the experts are sharded over the expert-parallel ranks: gather them (gather_host_model, on every rank)",
            )),
            Inner::Gpu(g) => Ok(Cow::Owned(Model {
                config: g.config.clone(),
                layout: g.layout().clone(),
                params: g.params_to_host()?,
                source_dir: self.source_dir.clone(),
            })),
        }
    }

    /// The whole model on the host: [`Policy::host_model`], or with the
    /// experts sharded ([`Policy::shard_experts`]) every rank's experts
    /// gathered (a collective over the expert-parallel communicator: every
    /// rank calls it, rank 0 saves the result; see
    /// [`crate::gpu::GpuModel::gather_model`]).
    pub fn gather_host_model(&self) -> Result<Cow<'_, Model>> {
        match &self.inner {
            Inner::Gpu(g) if g.layout().expert_shard.is_some() => {
                let mut m = g.gather_model()?;
                m.source_dir = self.source_dir.clone();
                Ok(Cow::Owned(m))
            }
            _ => self.host_model(),
        }
    }

    /// Expert parallelism with the experts' memory sharded (see
    /// [`crate::gpu::GpuModel::shard_experts`]; expert parallelism set
    /// first): `Ok(false)` on the CPU, nothing changed.
    pub fn shard_experts(&mut self) -> Result<bool> {
        match &mut self.inner {
            Inner::Cpu { .. } => Ok(false),
            Inner::Gpu(g) => g.shard_experts().map(|()| true),
        }
    }

    /// Saves in the HF layout (as [`Model::save`]).
    pub fn save(&self, dir: &Path, max_shard_bytes: usize) -> Result<()> {
        self.host_model()?.save(dir, max_shard_bytes)
    }

    /// Saves as a whole HF folder with `opts` (as [`Model::save_as`]).
    pub fn save_as(&self, dir: &Path, opts: &crate::SaveOptions) -> Result<()> {
        self.host_model()?.save_as(dir, opts)
    }

    /// The training forward over `ids [b, t]`, right-padded (as
    /// [`Model::forward`]).
    pub fn forward(&self, ids: &[u32], b: usize, t: usize) -> Result<Forward> {
        Ok(Forward {
            dropout: self.layout().lora_dropout(),
            inner: match &self.inner {
                Inner::Cpu { model, .. } => FwdInner::Cpu(model.forward(ids, b, t)?),
                Inner::Gpu(g) => FwdInner::Gpu(g.forward(ids, b, t)?),
            },
        })
    }

    /// `log softmax(logits / temperature)[targets[i]]` and the entropy of
    /// that distribution at rows `rows[i]` of `fwd` (row `r` is position
    /// `r % T` of sequence `r / T`), through the chunked lm head: `[N, V]`
    /// logits never exist. The results stay on the policy's device.
    pub fn score(&self, fwd: &Forward, rows: &[u32], targets: &[u32], temperature: f32) -> Result<Scores> {
        match (&self.inner, &fwd.inner) {
            (Inner::Cpu { model, .. }, FwdInner::Cpu(a)) => cpu_score(model, a, rows, targets, temperature),
            (Inner::Gpu(g), FwdInner::Gpu(f)) => {
                let s = g.score(f, rows, targets, temperature)?;
                let gpu = g.gpu().clone();
                let n = rows.len();
                let copy = |x| gpu.clone_dtod(x).map_err(cuda);
                let logp = Tensor::from_cuda_f32(gpu.clone(), copy(&s.logp)?, n).map_err(tensor_err)?;
                let entropy = Tensor::from_cuda_f32(gpu.clone(), copy(&s.entropy)?, n).map_err(tensor_err)?;
                Ok(Scores {
                    logp,
                    entropy,
                    inner: ScoresInner::Gpu(Box::new(s)),
                })
            }
            _ => Err(input_err("score", "the forward ran on another device")),
        }
    }

    /// Scores positions and copies the log-probs to the host (for
    /// reference and old-policy log-probs, evaluation, `aha logprobs`).
    pub fn logprobs(
        &self,
        ids: &[u32],
        b: usize,
        t: usize,
        rows: &[u32],
        targets: &[u32],
        temperature: f32,
    ) -> Result<Vec<f32>> {
        let fwd = self.forward(ids, b, t)?;
        self.score(&fwd, rows, targets, temperature)?
            .logp
            .to_vec::<f32>()
            .map_err(tensor_err)
    }

    /// The device bytes the parameters, their bf16 copy, the gradients and
    /// `moments` hold, counted from the buffers (zeros on the CPU): what
    /// [`crate::memory::MemoryPlan`] plans for them.
    pub fn param_bytes(&self, moments: &Moments) -> crate::gpu::ParamBytes {
        match &self.inner {
            Inner::Cpu { .. } => crate::gpu::ParamBytes::default(),
            Inner::Gpu(g) => {
                let b = g.param_bytes();
                crate::gpu::ParamBytes {
                    moments: moments.device_bytes(),
                    host_pinned: b.host_pinned + moments.host_pinned_bytes(),
                    ..b
                }
            }
        }
    }

    /// Zeroes the gradient buffer.
    pub fn zero_grad(&mut self) -> Result<()> {
        match &mut self.inner {
            Inner::Cpu { model, grads } => {
                grads.clear();
                grads.resize(model.params.len(), 0.0);
                Ok(())
            }
            Inner::Gpu(g) => g.zero_grad(),
        }
    }

    /// The gradients on the host (a copy on a GPU), in the CPU layout:
    /// the trainable prefix, zeros for the frozen tensors (which have no
    /// gradient: a GPU keeps none, and the CPU's are discarded).
    pub fn grads_to_host(&self) -> Result<Vec<f32>> {
        match &self.inner {
            Inner::Cpu { model, grads } => Ok(if grads.is_empty() {
                vec![0.0; model.params.len()]
            } else {
                let mut g = grads.clone();
                let tr = model.layout.trainable.min(g.len());
                g[tr..].fill(0.0);
                g
            }),
            Inner::Gpu(g) => g.grads_to_host(),
        }
    }

    /// On a GPU, the device and the flat gradient buffer itself (in the
    /// CPU layout; allocated the first time), for collectives over it
    /// without a copy to the host; `None` on the CPU.
    pub fn gpu_grads_mut(
        &mut self,
    ) -> Result<
        Option<(
            std::sync::Arc<aha_cuda_kernels::Gpu>,
            &mut aha_cuda_kernels::cudarc::driver::CudaSlice<f32>,
        )>,
    > {
        match &mut self.inner {
            Inner::Cpu { .. } => Ok(None),
            Inner::Gpu(g) => g.grads_mut().map(Some),
        }
    }

    /// On a GPU with the optimizer on the device, the device, the flat f32
    /// parameters and the flat gradients (CPU layout), for an optimizer
    /// that updates a part of the parameters itself (data parallel
    /// ZeRO-1); call [`Policy::params_updated`] after writing the
    /// parameters. `None` on the CPU; an error when the optimizer is
    /// offloaded.
    #[allow(clippy::type_complexity)]
    pub fn gpu_params_and_grads_mut(
        &mut self,
    ) -> Result<
        Option<(
            std::sync::Arc<aha_cuda_kernels::Gpu>,
            &mut aha_cuda_kernels::cudarc::driver::CudaSlice<f32>,
            &mut aha_cuda_kernels::cudarc::driver::CudaSlice<f32>,
        )>,
    > {
        match &mut self.inner {
            Inner::Cpu { .. } => Ok(None),
            Inner::Gpu(g) => g.params_and_grads_mut().map(Some),
        }
    }

    /// ZeRO-1 with the f32 master sharded: on a GPU in bf16 precision
    /// (full-parameter training, optimizer on the device) this rank keeps
    /// the f32 master of `range` of the trainable prefix only; see
    /// [`crate::gpu::GpuModel::shard_master`]. `Ok(false)` where the
    /// weights the kernels read are the master (the CPU, f32 precision, a
    /// LoRA model's adapters): nothing changes then.
    pub fn shard_master(&mut self, range: std::ops::Range<usize>) -> Result<bool> {
        match &mut self.inner {
            Inner::Cpu { .. } => Ok(false),
            Inner::Gpu(g) => g.shard_master(range),
        }
    }

    /// This rank's range and its sharded f32 master on the host (`None`
    /// when the master is not sharded: [`Policy::params_to_host`] holds it).
    pub fn master_shard_to_host(&self) -> Result<Option<(std::ops::Range<usize>, Vec<f32>)>> {
        match &self.inner {
            Inner::Cpu { .. } => Ok(None),
            Inner::Gpu(g) => g.master_shard_to_host(),
        }
    }

    /// Replaces the sharded f32 master with `host` (a checkpoint's shard).
    pub fn set_master_shard(&mut self, host: &[f32]) -> Result<()> {
        match &mut self.inner {
            Inner::Cpu { .. } => Err(input_err("set_master_shard", "the f32 master is not sharded")),
            Inner::Gpu(g) => g.set_master_shard(host),
        }
    }

    /// On a GPU with a sharded f32 master, the buffers ZeRO-1's update
    /// touches ([`crate::gpu::Zero1Parts`]); `None` otherwise.
    pub fn gpu_zero1_parts(&mut self) -> Result<Option<crate::gpu::Zero1Parts<'_>>> {
        match &mut self.inner {
            Inner::Gpu(g) if g.master_shard_range().is_some() => g.zero1_parts().map(Some),
            _ => Ok(None),
        }
    }

    /// After the f32 parameters were written through
    /// [`Policy::gpu_params_and_grads_mut`]: refreshes the copies the
    /// kernels read (the bf16 weights in bf16 precision).
    pub fn params_updated(&mut self) -> Result<()> {
        match &mut self.inner {
            Inner::Cpu { .. } => Ok(()),
            Inner::Gpu(g) => g.refresh_param_copies(),
        }
    }

    /// Replaces the gradient buffer with `host` (CPU layout): gradients
    /// computed elsewhere, or a test's.
    pub fn set_grads(&mut self, host: &[f32]) -> Result<()> {
        if host.len() != self.num_params() {
            return Err(input_err(
                "set_grads",
                format!("{} values for {} parameters", host.len(), self.num_params()),
            ));
        }
        match &mut self.inner {
            Inner::Cpu { grads, .. } => {
                grads.clear();
                grads.extend_from_slice(host);
                Ok(())
            }
            Inner::Gpu(g) => g.set_grads(host),
        }
    }

    /// Accumulates (`+=`) into the gradient buffer the gradient of
    /// `sum_i dlogp[i] logp[i] + dentropy[i] entropy[i]` over the scored
    /// rows, plus `aux_coef` times the MoE load-balancing loss (softmax
    /// routers). `dlogp` and `dentropy` are on the policy's device.
    pub fn backward(
        &mut self,
        fwd: Forward,
        scores: &Scores,
        dlogp: &Tensor,
        dentropy: Option<&Tensor>,
        aux_coef: f32,
    ) -> Result<()> {
        // The backward draws the dropout masks its forward drew.
        let now = self.layout().lora_dropout();
        if now != fwd.dropout {
            self.set_lora_dropout(fwd.dropout.map(|d| d.seed));
        }
        let r = self.backward_inner(fwd.inner, scores, dlogp, dentropy, aux_coef, None);
        if now != fwd.dropout {
            self.set_lora_dropout(now.map(|d| d.seed));
        }
        r
    }

    /// [`Policy::backward`] that reports each part of the gradient buffer
    /// as soon as the backward has completed it (on a GPU: `hook` gets the
    /// device, the flat buffer and the part's ranges, in the order of
    /// [`Policy::grad_ready_parts`]), so that the caller can start moving
    /// it (a data-parallel all-reduce, a copy to the host) while earlier
    /// layers are still being differentiated. Returns whether the hook was
    /// called; on the CPU it is not (the caller then handles the whole
    /// buffer after the backward).
    ///
    /// The backward accumulates (`+=`): with gradients summed over several
    /// micro-batches, a part is final only in the last one's backward, so
    /// pass the hook to that one only.
    pub fn backward_with_hook(
        &mut self,
        fwd: Forward,
        scores: &Scores,
        dlogp: &Tensor,
        dentropy: Option<&Tensor>,
        aux_coef: f32,
        hook: &mut GradHook<'_>,
    ) -> Result<bool> {
        let now = self.layout().lora_dropout();
        if now != fwd.dropout {
            self.set_lora_dropout(fwd.dropout.map(|d| d.seed));
        }
        let on_gpu = matches!(self.inner, Inner::Gpu(_));
        let r = self.backward_inner(fwd.inner, scores, dlogp, dentropy, aux_coef, Some(hook));
        if now != fwd.dropout {
            self.set_lora_dropout(now.map(|d| d.seed));
        }
        r.map(|()| on_gpu)
    }

    /// [`Policy::backward`] that, with the optimizer offloaded to the host
    /// (`moments` from [`Policy::new_moments`] after
    /// [`Policy::set_offload_optimizer`]), copies each part of the gradients
    /// to page-locked host memory as soon as the backward has completed it,
    /// so that the copies overlap the rest of the backward and the next
    /// [`Policy::optimizer_step`] only waits for the last ones (see
    /// `aha_moe_model::offload`). Use it for the last micro-batch of a step
    /// (the parts are final only then); any later change of the gradients
    /// (another backward, a data-parallel sum, a zeroing) makes the step
    /// copy them again instead. Returns whether the gradients were
    /// streamed; otherwise (moments on the device, the CPU) it is a plain
    /// backward.
    pub fn backward_offload_streamed(
        &mut self,
        fwd: Forward,
        scores: &Scores,
        dlogp: &Tensor,
        dentropy: Option<&Tensor>,
        aux_coef: f32,
        moments: &mut Moments,
    ) -> Result<bool> {
        let host = match (&self.inner, moments) {
            (Inner::Gpu(g), Moments::Offload(h)) => {
                h.begin_stream(g)?;
                h
            }
            _ => {
                self.backward(fwd, scores, dlogp, dentropy, aux_coef)?;
                return Ok(false);
            }
        };
        let mut failed = None;
        let mut hook = |r: crate::gpu::GradReady<'_>| {
            host.grads_ready(r).map_err(|e| {
                let msg = e.to_string();
                failed = Some(e);
                msg
            })
        };
        let r = self.backward_with_hook(fwd, scores, dlogp, dentropy, aux_coef, &mut hook);
        if let Some(e) = failed {
            return Err(e);
        }
        r?;
        if let Inner::Gpu(g) = &self.inner {
            host.end_stream(g.grad_version());
        }
        Ok(true)
    }

    /// The parts of the flat gradient buffer in the order a backward
    /// completes them ([`Layout::grad_ready_parts`]: head, last layer to
    /// first, embedding), each as ranges of the trainable prefix.
    pub fn grad_ready_parts(&self) -> Vec<Vec<std::ops::Range<usize>>> {
        self.layout().grad_ready_parts()
    }

    fn backward_inner(
        &mut self,
        fwd: FwdInner,
        scores: &Scores,
        dlogp: &Tensor,
        dentropy: Option<&Tensor>,
        aux_coef: f32,
        hook: Option<&mut GradHook<'_>>,
    ) -> Result<()> {
        match (&mut self.inner, fwd, &scores.inner) {
            (Inner::Cpu { model, grads }, FwdInner::Cpu(a), ScoresInner::Cpu { .. }) => {
                if grads.len() != model.params.len() {
                    grads.clear();
                    grads.resize(model.params.len(), 0.0);
                }
                let dl = dlogp.to_vec::<f32>().map_err(tensor_err)?;
                let de = match dentropy {
                    Some(d) => Some(d.to_vec::<f32>().map_err(tensor_err)?),
                    None => None,
                };
                cpu_backward(model, grads, &a, &scores.inner, &dl, de.as_deref(), aux_coef)
            }
            (Inner::Gpu(g), FwdInner::Gpu(f), ScoresInner::Gpu(s)) => {
                let dl = dlogp.cuda_f32().map_err(tensor_err)?;
                let de = match dentropy {
                    Some(d) => Some(d.cuda_f32().map_err(tensor_err)?),
                    None => None,
                };
                g.backward_hooked(f, s, dl, de, aux_coef, hook)
            }
            _ => Err(input_err("backward", "the forward or the scores ran on another device")),
        }
    }

    /// Expert parallelism of a policy on a GPU over `comm` (see
    /// [`crate::gpu::GpuModel::set_expert_parallel`]): every MoE layer of
    /// the training forward and backward runs only this rank's routed
    /// experts for every rank's tokens, so each [`Policy::forward`] and
    /// [`Policy::backward`] is a collective over `comm`. `None` turns it
    /// off; returns the communicator that was set. The CPU has none: an
    /// error naming `expert_parallel`.
    pub fn set_expert_parallel(
        &mut self,
        comm: Option<aha_cuda_kernels::nccl::Comm>,
    ) -> Result<Option<aha_cuda_kernels::nccl::Comm>> {
        match &mut self.inner {
            Inner::Gpu(g) => g.set_expert_parallel(comm),
            Inner::Cpu { .. } if comm.is_none() => Ok(None),
            Inner::Cpu { .. } => Err(input_err(
                "expert_parallel",
                "expert parallelism runs on GPUs only (the policy is on the CPU)",
            )),
        }
    }

    /// `(rank, world)` of expert parallelism, if set
    /// ([`Policy::set_expert_parallel`]).
    pub fn expert_parallel(&self) -> Option<(usize, usize)> {
        match &self.inner {
            Inner::Gpu(g) => g.expert_parallel(),
            Inner::Cpu { .. } => None,
        }
    }

    /// The GPU the policy lives on (`None` on the CPU).
    pub fn gpu(&self) -> Option<std::sync::Arc<aha_cuda_kernels::Gpu>> {
        match &self.inner {
            Inner::Gpu(g) => Some(g.gpu().clone()),
            Inner::Cpu { .. } => None,
        }
    }

    /// Per-layer activation recomputation on a GPU (`recompute = true`):
    /// the forward keeps only each layer's input and the backward runs the
    /// layer again, so one layer's activations are alive at a time. The CPU
    /// keeps everything (host memory is rarely the limit there).
    pub fn set_recompute(&mut self, on: bool) {
        if let Inner::Gpu(g) = &mut self.inner {
            g.set_recompute(on);
        }
    }

    /// Waits for the device's queued work (a no-op on the CPU), so a timer
    /// read after it covers the work.
    pub fn synchronize(&self) -> Result<()> {
        match &self.inner {
            Inner::Cpu { .. } => Ok(()),
            Inner::Gpu(g) => g.gpu().synchronize().map_err(cuda),
        }
    }

    /// Offloads AdamW to the host (`Some`) or keeps it on the device
    /// (`None`, the default): the f32 master weights move to page-locked
    /// host memory (in bf16 precision the device keeps the bf16 weights and
    /// only the few tensors read in f32), and the moments created from now
    /// on by [`Policy::new_moments`] and [`Policy::moments_from_host`] live
    /// there too. Moments created before belong to the old setting. On the
    /// CPU the optimizer is on the host already and this changes nothing.
    pub fn set_offload_optimizer(&mut self, cfg: Option<OffloadConfig>) -> Result<()> {
        if let Inner::Gpu(g) = &mut self.inner {
            g.set_offload(cfg.is_some())?;
        }
        self.offload = cfg;
        Ok(())
    }

    /// The offload setting (see [`Policy::set_offload_optimizer`]); `None`
    /// on the CPU.
    pub fn offload_optimizer(&self) -> Option<OffloadConfig> {
        match self.inner {
            Inner::Cpu { .. } => None,
            Inner::Gpu(_) => self.offload,
        }
    }

    /// Zeroed AdamW moments for this policy's trainable prefix
    /// ([`Layout::trainable`]: a LoRA policy's adapters), on its device (on
    /// the host when the optimizer is offloaded).
    pub fn new_moments(&self) -> Result<Moments> {
        if let (Inner::Gpu(g), Some(cfg)) = (&self.inner, self.offload) {
            return Ok(Moments::Offload(Box::new(HostOptimizer::new(g, cfg, None)?)));
        }
        let n = self.layout().trainable;
        Ok(match &self.inner {
            Inner::Cpu { .. } => Moments::Cpu {
                m: vec![0.0; n],
                v: vec![0.0; n],
            },
            Inner::Gpu(g) => {
                let (m, v) = g.new_moments()?;
                Moments::Gpu { m, v }
            }
        })
    }

    /// Moments from host copies (a checkpoint), on this policy's device:
    /// the trainable prefix's ([`Moments::to_host`]), or the whole
    /// buffer's (checkpoints that stored zeros for the frozen tensors),
    /// of which the prefix is kept.
    pub fn moments_from_host(&self, mut m: Vec<f32>, mut v: Vec<f32>) -> Result<Moments> {
        let (n, tr) = (self.num_params(), self.layout().trainable);
        let fits = |x: usize| x == tr || x == n;
        if !fits(m.len()) || m.len() != v.len() {
            return Err(input_err(
                "optimizer state",
                format!(
                    "{} / {} moments for {tr} trainable parameters (of {n})",
                    m.len(),
                    v.len()
                ),
            ));
        }
        m.truncate(tr);
        v.truncate(tr);
        if let (Inner::Gpu(g), Some(cfg)) = (&self.inner, self.offload) {
            return Ok(Moments::Offload(Box::new(HostOptimizer::new(g, cfg, Some((&m, &v)))?)));
        }
        Ok(match &self.inner {
            Inner::Cpu { .. } => Moments::Cpu { m, v },
            Inner::Gpu(g) => Moments::Gpu {
                m: g.gpu().upload(&m).map_err(cuda)?,
                v: g.gpu().upload(&v).map_err(cuda)?,
            },
        })
    }

    /// Global-norm clipping to `max_grad_norm`, then AdamW step `t`
    /// (1-based) over the trainable parameters; frozen tensors
    /// (`e_score_correction_bias`) are not touched. Returns the gradient
    /// norm before clipping; a non-finite norm leaves the parameters and
    /// moments unchanged (the caller decides whether to skip or abort).
    pub fn optimizer_step(&mut self, moments: &mut Moments, h: &AdamW, t: u64, max_grad_norm: f64) -> Result<f64> {
        match (&mut self.inner, moments) {
            (Inner::Cpu { model, grads }, Moments::Cpu { m, v }) => {
                let _prof = profile::scope(Phase::Optimizer);
                let tr = model.layout.trainable;
                if grads.len() != model.params.len() {
                    return Err(input_err("optimizer_step", "no gradients: run a backward first"));
                }
                if m.len() < tr || v.len() < tr {
                    return Err(input_err(
                        "optimizer_step",
                        format!("{} / {} moments for {tr} trainable parameters", m.len(), v.len()),
                    ));
                }
                grads[tr..].fill(0.0);
                let norm = cpu::clip_grad_norm(&mut grads[..tr], max_grad_norm);
                if !norm.is_finite() {
                    return Ok(norm);
                }
                cpu::adamw_step(&mut model.params[..tr], &grads[..tr], &mut m[..tr], &mut v[..tr], h, t)
                    .map_err(tensor_err)?;
                Ok(norm)
            }
            (Inner::Gpu(g), Moments::Gpu { m, v }) => {
                let norm = g.grad_norm()?;
                if !norm.is_finite() {
                    return Ok(norm);
                }
                let coef = max_grad_norm / (norm + 1e-6);
                if coef < 1.0 {
                    g.scale_grads(coef as f32)?;
                }
                let sc = AdamwScalars::new(h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, t).map_err(cuda)?;
                g.adamw(m, v, &sc)?;
                Ok(norm)
            }
            (Inner::Gpu(g), Moments::Offload(host)) => host.step(g, h, t, max_grad_norm),
            _ => Err(input_err("optimizer_step", "the moments live on another device")),
        }
    }

    /// DeepSeek-V3's auxiliary-loss-free bias update from `fwd`'s expert
    /// loads (`speed`: the report's 0.001).
    pub fn update_expert_bias(&mut self, fwd: &Forward, speed: f32) -> Result<()> {
        match (&mut self.inner, &fwd.inner) {
            (Inner::Cpu { model, .. }, FwdInner::Cpu(a)) => model.update_expert_bias(&a.expert_load(), speed),
            (Inner::Gpu(g), FwdInner::Gpu(f)) => g.update_expert_bias(f, speed),
            _ => Err(input_err("update_expert_bias", "the forward ran on another device")),
        }
    }
}

impl Moments {
    /// Host copies `(m, v)` of the trainable prefix (for a checkpoint).
    pub fn to_host(&self, gpu_of: &Policy) -> Result<(Vec<f32>, Vec<f32>)> {
        match (self, &gpu_of.inner) {
            (Moments::Cpu { m, v }, _) => Ok((m.clone(), v.clone())),
            (Moments::Gpu { m, v }, Inner::Gpu(g)) => {
                Ok((g.gpu().download(m).map_err(cuda)?, g.gpu().download(v).map_err(cuda)?))
            }
            (Moments::Offload(h), _) => h.moments_to_host(),
            (Moments::Gpu { .. }, Inner::Cpu { .. }) => {
                Err(input_err("optimizer state", "device moments for a policy on the CPU"))
            }
        }
    }

    /// Device bytes of the two moments (0 on the CPU and offloaded).
    pub fn device_bytes(&self) -> u64 {
        match self {
            Moments::Gpu { m, v } => 4 * (m.len() + v.len()) as u64,
            Moments::Cpu { .. } | Moments::Offload(_) => 0,
        }
    }

    /// The page-locked host bytes of an offloaded optimizer's moments and
    /// staging buffers ([`crate::offload::HostOptimizer::pinned_bytes`]);
    /// 0 for moments on the device or the CPU.
    pub fn host_pinned_bytes(&self) -> u64 {
        match self {
            Moments::Offload(h) => h.pinned_bytes(),
            Moments::Cpu { .. } | Moments::Gpu { .. } => 0,
        }
    }

    /// The offloaded optimizer's timings since the last call (`None` for
    /// moments on the device or the CPU).
    pub fn take_offload_timing(&mut self) -> Option<OffloadTiming> {
        match self {
            Moments::Offload(h) => Some(h.take_timing()),
            _ => None,
        }
    }
}

impl Policy {
    /// The final normed hidden states `[rows, C]` at rows `rows` of `fwd`
    /// (row `r` is position `r % T` of sequence `r / T`), on the host: the
    /// input of a head other than the lm head (a reward model's score).
    pub fn hidden_rows(&self, fwd: &Forward, rows: &[u32]) -> Result<Vec<f32>> {
        match (&self.inner, &fwd.inner) {
            (Inner::Cpu { model, .. }, FwdInner::Cpu(a)) => {
                let c = model.config.hidden_size;
                gather_rows(&a.hidden, rows, a.hidden.len() / c.max(1), c)
            }
            (Inner::Gpu(g), FwdInner::Gpu(f)) => g.hidden_rows(f, rows),
            _ => Err(input_err("hidden_rows", "the forward ran on another device")),
        }
    }
}

/// Host rows of `hidden` gathered at `rows`.
fn gather_rows(hidden: &[f32], rows: &[u32], n: usize, c: usize) -> Result<Vec<f32>> {
    let mut out = vec![0f32; rows.len() * c];
    for (i, &r) in rows.iter().enumerate() {
        let r = r as usize;
        if r >= n {
            return Err(input_err("score", format!("row {r} of a batch of {n} rows")));
        }
        out[i * c..(i + 1) * c].copy_from_slice(&hidden[r * c..(r + 1) * c]);
    }
    Ok(out)
}

fn cpu_score(model: &Model, a: &Activations, rows: &[u32], targets: &[u32], temperature: f32) -> Result<Scores> {
    let _prof = profile::scope(Phase::LmHead);
    let (c, v) = (model.config.hidden_size, model.config.vocab_size);
    let n = rows.len();
    if targets.len() != n {
        return Err(input_err("score", format!("{} targets for {n} rows", targets.len())));
    }
    let hidden = gather_rows(&a.hidden, rows, a.hidden.len() / c.max(1), c)?;
    let (mut lp, mut ent, mut lse) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    let mut kept = if n * v <= CPU_KEEP_LOGITS {
        vec![0f32; n * v]
    } else {
        vec![]
    };
    if n > 0 {
        let s = LmHeadShape {
            n,
            c,
            v,
            chunk: CPU_HEAD_CHUNK.min(v.max(1)),
            temperature,
        };
        let w = model.layout.lm_head.of(&model.params);
        if kept.is_empty() {
            cpu::lm_head_logprob_forward(&mut lp, &mut ent, &mut lse, &hidden, w, targets, s)
        } else {
            cpu::lm_head_logprob_forward_keep(&mut lp, &mut ent, &mut lse, &mut kept, &hidden, w, targets, s)
        }
        .map_err(tensor_err)?;
    }
    Ok(Scores {
        logp: Tensor::from_vec(lp, n, Device::Cpu).map_err(tensor_err)?,
        entropy: Tensor::from_vec(ent.clone(), n, Device::Cpu).map_err(tensor_err)?,
        inner: ScoresInner::Cpu {
            lse,
            ent,
            rows: rows.to_vec(),
            targets: targets.to_vec(),
            temperature,
            hidden,
            kept: std::sync::Mutex::new(kept),
        },
    })
}

fn cpu_backward(
    model: &Model,
    grads: &mut [f32],
    a: &Activations,
    sc: &ScoresInner,
    dlogp: &[f32],
    dentropy: Option<&[f32]>,
    aux_coef: f32,
) -> Result<()> {
    let ScoresInner::Cpu {
        lse,
        ent,
        rows,
        targets,
        temperature,
        hidden,
        kept,
    } = sc
    else {
        return Err(input_err("backward", "scores from another device"));
    };
    let (c, v) = (model.config.hidden_size, model.config.vocab_size);
    let nr = rows.len();
    if dlogp.len() != nr || dentropy.is_some_and(|d| d.len() != nr) {
        return Err(input_err(
            "backward",
            format!("gradients for {} rows, {nr} scored", dlogp.len()),
        ));
    }
    let prof = profile::scope(Phase::LmHead);
    let total = a.hidden.len() / c.max(1);
    let mut dh_rows = vec![0f32; nr * c];
    if nr > 0 {
        let zeros;
        let de = match dentropy {
            Some(d) => d,
            None => {
                zeros = vec![0f32; nr];
                &zeros
            }
        };
        let s = LmHeadShape {
            n: nr,
            c,
            v,
            chunk: CPU_HEAD_CHUNK.min(v.max(1)),
            temperature: *temperature,
        };
        let (w, dw) = (
            model.layout.lm_head.of(&model.params),
            model.layout.lm_head.of_mut(grads),
        );
        // A poisoned lock only means another backward panicked: recompute.
        let mut kept = kept.lock().map(|mut k| std::mem::take(&mut *k)).unwrap_or_default();
        if kept.is_empty() {
            cpu::lm_head_logprob_backward(&mut dh_rows, dw, hidden, w, targets, lse, ent, dlogp, de, s)
        } else {
            cpu::lm_head_logprob_backward_kept(&mut dh_rows, dw, hidden, w, &mut kept, targets, lse, ent, dlogp, de, s)
        }
        .map_err(tensor_err)?;
    }
    let mut dh = vec![0f32; total * c];
    for (i, &r) in rows.iter().enumerate() {
        let r = r as usize;
        for (d, &x) in dh[r * c..(r + 1) * c].iter_mut().zip(&dh_rows[i * c..(i + 1) * c]) {
            *d += x;
        }
    }
    drop(prof);
    model.backward_from_hidden(a, &dh, aux_coef, grads)
}
