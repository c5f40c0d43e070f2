//! The same math on the GPU (`kernels/grpo.cu` through
//! `aha_cuda_kernels::grpo`): [`grpo_loss_device`] reads the per-token
//! log-probs where the model left them and leaves d loss / d log-prob there
//! for the backward; only the loss and the metrics come to the host.
//! [`compute_advantages_device`] is `compute_advantages` on the device.
//! The CPU functions of this crate are the twins: `tests/gpu_loss.rs`
//! compares the two on every configuration of the TRL fixture and on random
//! batches (it prints "skipped: no GPU" where there is none).

use aha_cuda_kernels::cudarc::driver::CudaSlice;
use aha_cuda_kernels::grpo::{self as k, GrpoLossInputs, GrpoParams};
use aha_cuda_kernels::Gpu;

use crate::error::{Error, Result};
use crate::loss::{ImportanceSampling, KlEstimator, LossConfig, LossType};
use crate::metrics::Metrics;
use crate::{AdvantageEstimator, Advantages};

/// The kernels' parameters for `cfg` (validated first). `has_entropy`:
/// per-token entropies will be passed; `num_items_in_batch` as in
/// [`crate::LossInputs`].
pub fn loss_params(cfg: &LossConfig, has_entropy: bool, num_items_in_batch: Option<f64>) -> Result<GrpoParams> {
    cfg.validate()?;
    let needs_entropy = cfg.entropy_coef != 0.0 || cfg.top_entropy_quantile < 1.0;
    if needs_entropy && !has_entropy {
        return Err(Error::Missing {
            op: "grpo_loss_device",
            what: "entropy",
            why: "entropy_coef != 0 or top_entropy_quantile < 1",
        });
    }
    Ok(GrpoParams {
        loss_type: match cfg.loss_type {
            LossType::Grpo => 0,
            LossType::Bnpo => 1,
            LossType::DrGrpo => 2,
            LossType::Dapo => 3,
            LossType::Cispo => 4,
        },
        kl: if cfg.beta > 0.0 {
            match cfg.kl_estimator {
                KlEstimator::K1 => 1,
                KlEstimator::K2 => 2,
                KlEstimator::K3 => 3,
            }
        } else {
            0
        },
        seq_level: i32::from(cfg.importance_sampling_level == ImportanceSampling::Sequence),
        has_delta: i32::from(cfg.delta.is_some()),
        has_entropy: i32::from(has_entropy),
        quantile_on: i32::from(cfg.top_entropy_quantile < 1.0),
        has_num_items: i32::from(num_items_in_batch.is_some()),
        pad: 0,
        beta: cfg.beta,
        eps_low: cfg.epsilon,
        eps_high: cfg.eps_high(),
        delta: cfg.delta.unwrap_or(0.0),
        max_len: cfg.max_completion_length as f64,
        entropy_coef: cfg.entropy_coef,
        quantile: cfg.top_entropy_quantile,
        num_items: num_items_in_batch.unwrap_or(0.0),
    })
}

/// The loss on the device: gradients stay there.
#[derive(Debug)]
pub struct DeviceLossOutput {
    /// The scalar loss.
    pub loss: f64,
    /// `[B, T]` d loss / d logp (0 on padding), f32 on the device.
    pub dlogp: CudaSlice<f32>,
    /// `[B, T]` d loss / d entropy, f32 on the device.
    pub dentropy: CudaSlice<f32>,
    /// The metrics under TRL's names, as [`crate::grpo_loss`] reports them.
    pub metrics: Metrics,
}

/// [`crate::grpo_loss`] on the device. `inp`'s buffers are the model's f32
/// log-probs (and entropies), a byte mask and f64 advantages; the reference
/// is read only when `cfg.beta > 0`.
pub fn grpo_loss_device(
    gpu: &Gpu,
    inp: &GrpoLossInputs<'_>,
    cfg: &LossConfig,
    num_items_in_batch: Option<f64>,
) -> Result<DeviceLossOutput> {
    let p = loss_params(cfg, inp.entropy.is_some(), num_items_in_batch)?;
    if p.kl != 0 && inp.ref_logp.is_none() {
        return Err(Error::Missing {
            op: "grpo_loss_device",
            what: "ref_logp",
            why: "beta > 0",
        });
    }
    let n = (inp.batch * inp.seq).max(1);
    let mut dlogp = gpu.zeros::<f32>(n)?;
    let mut dentropy = gpu.zeros::<f32>(n)?;
    let s = k::grpo_loss_f32(gpu, &mut dlogp, &mut dentropy, inp, &p)?;
    let mut metrics = Metrics::new();
    if p.kl != 0 {
        metrics.insert("kl".into(), s.kl);
    }
    if inp.entropy.is_some() {
        metrics.insert("entropy".into(), s.entropy);
    }
    if cfg.loss_type == LossType::Cispo {
        metrics.insert("cispo_clip_ratio".into(), s.cispo_clip_ratio);
    } else {
        metrics.insert("clip_ratio/low_mean".into(), s.low_mean);
        metrics.insert("clip_ratio/low_min".into(), s.low_min);
        metrics.insert("clip_ratio/high_mean".into(), s.high_mean);
        metrics.insert("clip_ratio/high_max".into(), s.high_max);
        metrics.insert("clip_ratio/region_mean".into(), s.region_mean);
    }
    Ok(DeviceLossOutput {
        loss: s.loss,
        dlogp,
        dentropy,
        metrics,
    })
}

/// The kernel's number for an estimator.
pub fn estimator_code(est: AdvantageEstimator) -> i32 {
    match est {
        AdvantageEstimator::Group => 0,
        AdvantageEstimator::Batch => 1,
        AdvantageEstimator::None => 2,
        AdvantageEstimator::Rloo => 3,
        AdvantageEstimator::ReinforcePlusPlusBaseline => 4,
    }
}

/// [`crate::compute_advantages`] on the device: the advantages stay there
/// (for [`grpo_loss_device`]) and a host copy of everything comes back.
pub fn compute_advantages_device(
    gpu: &Gpu,
    rewards: &[f64],
    group_size: usize,
    est: AdvantageEstimator,
) -> Result<(Advantages, CudaSlice<f64>)> {
    let d = k::grpo_advantages_f64(gpu, rewards, group_size, estimator_code(est)).map_err(|e| match e {
        aha_cuda_kernels::Error::InvalidArgument { msg, .. } => Error::Config(msg),
        other => Error::Device(other),
    })?;
    let n = rewards.len();
    let take = |v: Vec<f64>| v.into_iter().take(n).collect::<Vec<f64>>();
    let host = Advantages {
        values: take(gpu.download(&d.values)?),
        group_mean: take(gpu.download(&d.group_mean)?),
        std: take(gpu.download(&d.std)?),
        frac_reward_zero_std: d.frac_reward_zero_std,
        reward_mean: d.reward_mean,
        reward_std: d.reward_std,
    };
    Ok((host, d.values))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_map_onto_kernel_parameters() {
        let cfg = LossConfig {
            loss_type: LossType::Dapo,
            epsilon: 0.2,
            epsilon_high: Some(0.28),
            delta: Some(2.0),
            beta: 0.04,
            kl_estimator: KlEstimator::K2,
            importance_sampling_level: ImportanceSampling::Sequence,
            max_completion_length: 512,
            entropy_coef: 0.01,
            top_entropy_quantile: 0.2,
        };
        let p = loss_params(&cfg, true, Some(1000.0)).unwrap();
        assert_eq!(
            (
                p.loss_type,
                p.kl,
                p.seq_level,
                p.has_delta,
                p.has_entropy,
                p.quantile_on,
                p.has_num_items
            ),
            (3, 2, 1, 1, 1, 1, 1)
        );
        assert_eq!((p.eps_low, p.eps_high, p.delta, p.max_len), (0.2, 0.28, 2.0, 512.0));
        assert_eq!(
            (p.beta, p.entropy_coef, p.quantile, p.num_items),
            (0.04, 0.01, 0.2, 1000.0)
        );
        // beta 0: no KL term whatever the estimator.
        let p = loss_params(
            &LossConfig {
                beta: 0.0,
                ..LossConfig::default()
            },
            false,
            None,
        )
        .unwrap();
        assert_eq!((p.kl, p.loss_type, p.eps_high), (0, 0, 0.2));
        // Entropy needed but not given, and invalid configs, are errors.
        assert!(loss_params(&cfg, false, None).is_err());
        assert!(loss_params(
            &LossConfig {
                epsilon: -1.0,
                ..LossConfig::default()
            },
            false,
            None
        )
        .is_err());
        let codes: Vec<i32> = [
            AdvantageEstimator::Group,
            AdvantageEstimator::Batch,
            AdvantageEstimator::None,
            AdvantageEstimator::Rloo,
            AdvantageEstimator::ReinforcePlusPlusBaseline,
        ]
        .into_iter()
        .map(estimator_code)
        .collect();
        assert_eq!(codes, vec![0, 1, 2, 3, 4]);
    }
}
