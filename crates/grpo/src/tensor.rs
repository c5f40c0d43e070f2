//! The loss on tensors, wherever they live: [`grpo_loss_on`] takes the
//! per-token log-probs (and entropies) as [`Tensor`]s on the policy's
//! device and returns d loss / d log-prob on the same device. On the CPU it
//! is [`crate::grpo_loss`]; on a GPU, [`crate::gpu::grpo_loss_device`]
//! (nothing per-token crosses to the host, only the loss and the metrics).
//! This is the one place the loss dispatches on the device, so the trainer
//! never does.

use aha_cuda_kernels::grpo::GrpoLossInputs;
use aha_cuda_kernels::Gpu;
use aha_tensor::{Device, Tensor};

use crate::error::{Error, Result};
use crate::loss::{grpo_loss, LossConfig, LossInputs};
use crate::metrics::Metrics;

/// Per-token inputs of [`grpo_loss_on`]: `[B, T]` f32 tensors on one device,
/// host mask and advantages (small; uploaded when the tensors are on a GPU).
#[derive(Debug, Clone, Copy)]
pub struct TensorLossInputs<'a> {
    /// Completions (B).
    pub batch: usize,
    /// Padded completion length (T).
    pub seq: usize,
    /// Log-probs under the current policy.
    pub logp: &'a Tensor,
    /// Log-probs under the policy that sampled (`None`: ratios of 1).
    pub old_logp: Option<&'a Tensor>,
    /// Reference log-probs (needed when `beta > 0`).
    pub ref_logp: Option<&'a Tensor>,
    /// Per-token entropies (needed by the entropy bonus and mask).
    pub entropy: Option<&'a Tensor>,
    /// True on completion tokens.
    pub mask: &'a [bool],
    /// One advantage per completion.
    pub advantages: &'a [f64],
    /// DAPO / CISPO normaliser (see [`crate::LossInputs`]).
    pub num_items_in_batch: Option<f64>,
}

/// The loss and its gradients, on the inputs' device.
#[derive(Debug)]
pub struct TensorLossOutput {
    /// The scalar loss.
    pub loss: f64,
    /// `[B, T]` d loss / d logp, f32.
    pub dlogp: Tensor,
    /// `[B, T]` d loss / d entropy, f32 (when entropies were given).
    pub dentropy: Option<Tensor>,
    /// TRL's metrics.
    pub metrics: Metrics,
}

impl TensorLossOutput {
    /// Multiplies the loss and its gradients by `s` (a micro-batch's share
    /// of its minibatch's loss, for gradient accumulation).
    pub fn scale(&mut self, s: f64) -> Result<()> {
        if s != 1.0 {
            self.loss *= s;
            self.dlogp.scale_inplace(s as f32)?;
            if let Some(d) = &mut self.dentropy {
                d.scale_inplace(s as f32)?;
            }
        }
        Ok(())
    }
}

fn host(t: Option<&Tensor>) -> Result<Option<Vec<f64>>> {
    Ok(match t {
        Some(t) => Some(t.to_vec::<f32>()?.into_iter().map(f64::from).collect()),
        None => None,
    })
}

type DevSlice = aha_cuda_kernels::cudarc::driver::CudaSlice<f32>;

/// The device buffer of an optional f32 tensor.
fn dev(t: Option<&Tensor>) -> Result<Option<&DevSlice>> {
    Ok(match t {
        Some(t) => Some(t.cuda_f32()?),
        None => None,
    })
}

/// [`crate::grpo_loss`] on the device its tensors are on.
pub fn grpo_loss_on(inp: &TensorLossInputs<'_>, cfg: &LossConfig) -> Result<TensorLossOutput> {
    let n = inp.batch * inp.seq;
    let check = |what: &'static str, t: Option<&Tensor>| -> Result<()> {
        match t {
            Some(t) if t.elem_count() != n => Err(Error::Length {
                op: "grpo_loss_on",
                what,
                got: t.elem_count(),
                expected: n,
            }),
            Some(t) if t.device() != inp.logp.device() => Err(Error::Config(format!(
                "{what} is on {}, the log-probs on {}",
                t.device(),
                inp.logp.device()
            ))),
            _ => Ok(()),
        }
    };
    check("logp", Some(inp.logp))?;
    check("old_logp", inp.old_logp)?;
    check("ref_logp", inp.ref_logp)?;
    check("entropy", inp.entropy)?;
    match inp.logp.device() {
        Device::Cpu => {
            let logp = host(Some(inp.logp))?.unwrap_or_default();
            let (old, refp, ent) = (host(inp.old_logp)?, host(inp.ref_logp)?, host(inp.entropy)?);
            let out = grpo_loss(
                &LossInputs {
                    batch: inp.batch,
                    seq: inp.seq,
                    logp: &logp,
                    old_logp: old.as_deref(),
                    ref_logp: refp.as_deref(),
                    mask: inp.mask,
                    advantages: inp.advantages,
                    entropy: ent.as_deref(),
                    num_items_in_batch: inp.num_items_in_batch,
                },
                cfg,
            )?;
            let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
            Ok(TensorLossOutput {
                loss: out.loss,
                dlogp: Tensor::from_vec(f32s(&out.dlogp), n, Device::Cpu)?,
                dentropy: match inp.entropy {
                    Some(_) => Some(Tensor::from_vec(f32s(&out.dentropy), n, Device::Cpu)?),
                    None => None,
                },
                metrics: out.metrics,
            })
        }
        Device::Cuda(i) => {
            if inp.mask.len() != n || inp.advantages.len() != inp.batch {
                return Err(Error::Length {
                    op: "grpo_loss_on",
                    what: "mask or advantages",
                    got: inp.mask.len(),
                    expected: n,
                });
            }
            let gpu = Gpu::get(i)?;
            let mask: Vec<u8> = inp.mask.iter().map(|&m| u8::from(m)).collect();
            let mask = gpu.upload(&mask)?;
            let adv = gpu.upload(inp.advantages)?;
            let logp = inp.logp.cuda_f32()?;
            let d = GrpoLossInputs {
                batch: inp.batch,
                seq: inp.seq,
                logp,
                old_logp: dev(inp.old_logp)?,
                ref_logp: dev(inp.ref_logp)?,
                mask: &mask,
                advantages: &adv,
                entropy: dev(inp.entropy)?,
            };
            let out = crate::gpu::grpo_loss_device(&gpu, &d, cfg, inp.num_items_in_batch)?;
            Ok(TensorLossOutput {
                loss: out.loss,
                dlogp: Tensor::from_cuda_f32(gpu.clone(), out.dlogp, n)?,
                dentropy: match inp.entropy {
                    Some(_) => Some(Tensor::from_cuda_f32(gpu, out.dentropy, n)?),
                    None => None,
                },
                metrics: out.metrics,
            })
        }
    }
}
