//! Launchers of `kernels/grpo.cu`: group-relative advantages and the GRPO
//! loss family on the device, with d loss / d log-prob left on the device
//! for the model's backward. CPU twins: `aha_grpo::compute_advantages` and
//! `aha_grpo::grpo_loss` (aha-grpo's `gpu` module maps its `LossConfig`
//! onto [`GrpoParams`] and compares the two in its tests).
//!
//! Per-token buffers are `[B, T]` row-major; the mask is bytes (1 on
//! completion tokens). Arithmetic is f64 throughout; per-token inputs are
//! the model's f32 log-probs and the gradients come back as f32.

use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};

use crate::device::Gpu;
use crate::error::{DriverContext, Error, Result};
use crate::registry::KernelId;

/// Threads per block of every kernel in `grpo.cu` (`GR_BLOCK`).
const GR_BLOCK: u32 = 256;
/// Partial sums per completion (`GR_ACC`).
const GR_ACC: usize = 9;

/// The loss configuration as the kernels read it (`struct GrpoParams` of
/// `grpo.cu`; field order and types must match).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GrpoParams {
    /// 0 grpo, 1 bnpo, 2 dr_grpo, 3 dapo, 4 cispo.
    pub loss_type: i32,
    /// KL estimator 1, 2, 3 (k1, k2, k3); 0 = no KL term (beta 0).
    pub kl: i32,
    /// 1 = sequence-level (GSPO) ratios.
    pub seq_level: i32,
    /// 1 = two-sided clipping with `delta`.
    pub has_delta: i32,
    /// 1 = per-token entropies are given.
    pub has_entropy: i32,
    /// 1 = train on the top-`quantile` entropy tokens only.
    pub quantile_on: i32,
    /// 1 = `num_items` is given (dapo, cispo).
    pub has_num_items: i32,
    /// Padding to the doubles' alignment.
    pub pad: i32,
    /// KL coefficient.
    pub beta: f64,
    /// Lower clip range.
    pub eps_low: f64,
    /// Upper clip range (cispo: the ratio cap).
    pub eps_high: f64,
    /// Cap on the unclipped ratio when `has_delta`.
    pub delta: f64,
    /// The rollout's maximum completion length (dr_grpo).
    pub max_len: f64,
    /// Entropy bonus coefficient.
    pub entropy_coef: f64,
    /// The top-entropy fraction kept when `quantile_on`.
    pub quantile: f64,
    /// Completion tokens of the whole generation batch when `has_num_items`.
    pub num_items: f64,
}

// SAFETY: `#[repr(C)]` plain old data, laid out as the CUDA struct (eight
// 4-byte ints, then eight 8-byte doubles, no interior padding).
unsafe impl DeviceRepr for GrpoParams {}

/// The per-token inputs of [`grpo_loss_f32`], all on the device.
#[derive(Debug, Clone, Copy)]
pub struct GrpoLossInputs<'a> {
    /// Completions (B).
    pub batch: usize,
    /// Padded completion length (T).
    pub seq: usize,
    /// `[B, T]` log-probs under the current policy.
    pub logp: &'a CudaSlice<f32>,
    /// `[B, T]` log-probs under the sampling policy; `None` = `logp`.
    pub old_logp: Option<&'a CudaSlice<f32>>,
    /// `[B, T]` reference log-probs; required when `kl != 0`.
    pub ref_logp: Option<&'a CudaSlice<f32>>,
    /// `[B, T]` 1 on completion tokens.
    pub mask: &'a CudaSlice<u8>,
    /// `[B]` advantages.
    pub advantages: &'a CudaSlice<f64>,
    /// `[B, T]` entropies; required by `has_entropy`.
    pub entropy: Option<&'a CudaSlice<f32>>,
}

/// The scalars [`grpo_loss_f32`] returns, in the kernel's order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GrpoScalars {
    /// The loss.
    pub loss: f64,
    /// Mean KL over completion tokens (0 without a reference).
    pub kl: f64,
    /// Mean entropy over completion tokens (0 without entropies).
    pub entropy: f64,
    /// `clip_ratio/low_mean`.
    pub low_mean: f64,
    /// `clip_ratio/low_min`.
    pub low_min: f64,
    /// `clip_ratio/high_mean`.
    pub high_mean: f64,
    /// `clip_ratio/high_max`.
    pub high_max: f64,
    /// `clip_ratio/region_mean`.
    pub region_mean: f64,
    /// `cispo_clip_ratio`.
    pub cispo_clip_ratio: f64,
}

fn bad(op: &'static str, msg: String) -> Error {
    Error::InvalidArgument { op, msg }
}

/// Checks a loss launch: ranges of the parameters, inputs the parameters
/// need, and every buffer's length. Returns `(B, T)` as kernel ints.
pub fn plan_grpo_loss(
    batch: usize,
    seq: usize,
    lens: &[(&str, Option<usize>, usize)],
    p: &GrpoParams,
) -> Result<(i32, i32)> {
    const OP: &str = "grpo_loss_f32";
    if !(0..=4).contains(&p.loss_type) {
        return Err(bad(OP, format!("loss_type {} is not 0..=4", p.loss_type)));
    }
    if !(0..=3).contains(&p.kl) {
        return Err(bad(OP, format!("kl estimator {} is not 0..=3", p.kl)));
    }
    if p.loss_type == 2 && (p.max_len.is_nan() || p.max_len < 1.0) {
        return Err(bad(OP, "dr_grpo needs max_len >= 1".into()));
    }
    for &(what, got, want) in lens {
        match got {
            Some(g) if g < want => return Err(bad(OP, format!("{what} holds {g} elements, needs {want}"))),
            None if want > 0 => return Err(bad(OP, format!("{what} is required by these parameters"))),
            _ => {}
        }
    }
    let b = i32::try_from(batch).map_err(|_| bad(OP, format!("batch {batch} exceeds int")))?;
    let t = i32::try_from(seq).map_err(|_| bad(OP, format!("seq {seq} exceeds int")))?;
    if batch.checked_mul(seq).is_none_or(|n| i64::try_from(n).is_err()) {
        return Err(bad(OP, format!("{batch} x {seq} overflows")));
    }
    Ok((b, t))
}

/// The loss of `p` on `inp`: writes `dlogp [B, T]` and `dentropy [B, T]`
/// (f32, on the device) and returns the loss and metrics (kernels
/// `grpo_seq_stats_f32`, `grpo_batch_stats_f32`, `grpo_token_loss_f32`,
/// `grpo_finalize_f64`; only the nine scalars come to the host).
pub fn grpo_loss_f32(
    gpu: &Gpu,
    dlogp: &mut CudaSlice<f32>,
    dentropy: &mut CudaSlice<f32>,
    inp: &GrpoLossInputs<'_>,
    p: &GrpoParams,
) -> Result<GrpoScalars> {
    let n = inp.batch.saturating_mul(inp.seq);
    let need_ent = p.has_entropy != 0 || p.quantile_on != 0;
    let (b, t) = plan_grpo_loss(
        inp.batch,
        inp.seq,
        &[
            ("dlogp", Some(dlogp.len()), n),
            ("dentropy", Some(dentropy.len()), n),
            ("logp", Some(inp.logp.len()), n),
            ("old_logp", Some(inp.old_logp.map_or(n, |x| x.len())), n),
            ("ref_logp", inp.ref_logp.map(|x| x.len()), if p.kl != 0 { n } else { 0 }),
            ("mask", Some(inp.mask.len()), n),
            ("advantages", Some(inp.advantages.len()), inp.batch),
            ("entropy", inp.entropy.map(|x| x.len()), if need_ent { n } else { 0 }),
        ],
        p,
    )?;
    if inp.batch == 0 {
        return Ok(GrpoScalars {
            loss: 0.0,
            kl: 0.0,
            entropy: 0.0,
            low_mean: f64::NAN,
            low_min: f64::NAN,
            high_mean: f64::NAN,
            high_max: f64::NAN,
            region_mean: f64::NAN,
            cispo_clip_ratio: f64::NAN,
        });
    }
    let old = inp.old_logp.unwrap_or(inp.logp);
    // Unused pointers still need a valid buffer to pass: logp stands in.
    let refp = inp.ref_logp.unwrap_or(inp.logp);
    let ent = inp.entropy.unwrap_or(inp.logp);
    let mut pp = *p;
    pp.has_entropy = i32::from(inp.entropy.is_some());
    // Scratch from the pool: every element is written by a kernel before it
    // is read.
    let mut seq = gpu.scratch_f64(2 * inp.batch)?;
    let mut scal = gpu.scratch_f64(2)?;
    let mut acc = gpu.scratch_f64(GR_ACC * inp.batch)?;
    let mut out = gpu.scratch_f64(9)?;
    let rows = LaunchConfig {
        grid_dim: (inp.batch as u32, 1, 1),
        block_dim: (GR_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    let one = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (GR_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };

    let f = gpu.function(KernelId::GrpoSeqStatsF32)?;
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(&mut *seq).arg(inp.logp).arg(old).arg(inp.mask).arg(&t);
    // SAFETY: (double*, const float* x 2, const u8*, int): one block per
    // row, every per-token buffer holds B * T (checked), seq 2 B.
    unsafe { l.launch(rows) }.ctx("launch grpo_seq_stats_f32")?;

    let f = gpu.function(KernelId::GrpoBatchStatsF32)?;
    let (qon, q) = (pp.quantile_on, pp.quantile);
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(&mut *scal)
        .arg(&*seq)
        .arg(ent)
        .arg(inp.mask)
        .arg(&b)
        .arg(&t)
        .arg(&qon)
        .arg(&q);
    // SAFETY: (double*, const double*, const float*, const u8*, int x 3,
    // double); one block of GR_BLOCK threads, as the kernel requires; the
    // entropy buffer holds B * T whenever quantile_on (checked).
    unsafe { l.launch(one) }.ctx("launch grpo_batch_stats_f32")?;

    let f = gpu.function(KernelId::GrpoTokenLossF32)?;
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(&mut *dlogp)
        .arg(&mut *dentropy)
        .arg(&mut *acc)
        .arg(&*seq)
        .arg(&*scal)
        .arg(inp.advantages)
        .arg(inp.logp)
        .arg(old)
        .arg(refp)
        .arg(inp.mask)
        .arg(ent)
        .arg(&b)
        .arg(&t)
        .arg(&pp);
    // SAFETY: matches grpo_token_loss_f32's parameters (GrpoParams by value,
    // layout-checked in the tests); one block per row; buffers checked above;
    // ref/entropy stand-ins are read only when kl / has_entropy say so.
    unsafe { l.launch(rows) }.ctx("launch grpo_token_loss_f32")?;

    let f = gpu.function(KernelId::GrpoFinalizeF64)?;
    let sl = pp.seq_level;
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(&mut *out)
        .arg(&*acc)
        .arg(&*seq)
        .arg(&*scal)
        .arg(&b)
        .arg(&t)
        .arg(&sl);
    // SAFETY: (double*, const double* x 3, int x 3); its thread 0 reads B
    // rows of acc and seq and writes 9 doubles.
    unsafe { l.launch(one) }.ctx("launch grpo_finalize_f64")?;

    let o = gpu.download(&*out)?;
    Ok(GrpoScalars {
        loss: o[0],
        kl: o[1],
        entropy: o[2],
        low_mean: o[3],
        low_min: o[4],
        high_mean: o[5],
        high_max: o[6],
        region_mean: o[7],
        cispo_clip_ratio: o[8],
    })
}

/// Group-relative advantages on the device, as `aha_grpo::compute_advantages`.
#[derive(Debug)]
pub struct DeviceAdvantages {
    /// `[n]` advantages (0 for unscored completions).
    pub values: CudaSlice<f64>,
    /// `[n]` each completion's group mean.
    pub group_mean: CudaSlice<f64>,
    /// `[n]` the std each advantage was divided by.
    pub std: CudaSlice<f64>,
    /// Fraction of groups whose rewards are all equal.
    pub frac_reward_zero_std: f64,
    /// Mean of the scored rewards.
    pub reward_mean: f64,
    /// Mean of `std` over scored completions.
    pub reward_std: f64,
}

/// Checks an advantage launch: groups, estimator, and that no reward is
/// infinite (NaN marks an unscored completion).
pub fn plan_grpo_advantages(rewards: &[f64], group_size: usize, estimator: i32) -> Result<(i32, i32)> {
    const OP: &str = "grpo_advantages_f64";
    if group_size == 0 || !rewards.len().is_multiple_of(group_size) {
        return Err(bad(
            OP,
            format!("{} rewards do not split into groups of {group_size}", rewards.len()),
        ));
    }
    if !(0..=4).contains(&estimator) {
        return Err(bad(OP, format!("estimator {estimator} is not 0..=4")));
    }
    if let Some(i) = rewards.iter().position(|r| r.is_infinite()) {
        return Err(bad(
            OP,
            format!("reward {i} is infinite (use NaN to mark an unscored completion)"),
        ));
    }
    let n = i32::try_from(rewards.len()).map_err(|_| bad(OP, format!("{} rewards exceed int", rewards.len())))?;
    Ok((n, group_size as i32))
}

/// Advantages of `rewards` (groups of `group_size` consecutive completions)
/// with `estimator` 0 group, 1 batch, 2 none, 3 rloo, 4 reinforce++
/// baseline (kernel `grpo_advantages_f64`).
pub fn grpo_advantages_f64(gpu: &Gpu, rewards: &[f64], group_size: usize, estimator: i32) -> Result<DeviceAdvantages> {
    let (n, g) = plan_grpo_advantages(rewards, group_size, estimator)?;
    let len = rewards.len().max(1);
    let r = gpu.upload(rewards)?;
    let (mut values, mut mean, mut std) = (gpu.zeros::<f64>(len)?, gpu.zeros::<f64>(len)?, gpu.zeros::<f64>(len)?);
    let mut summary = gpu.zeros::<f64>(3)?;
    if !rewards.is_empty() {
        let f = gpu.function(KernelId::GrpoAdvantagesF64)?;
        let mut l = gpu.stream().launch_builder(&f);
        l.arg(&mut values)
            .arg(&mut mean)
            .arg(&mut std)
            .arg(&mut summary)
            .arg(&r)
            .arg(&n)
            .arg(&g)
            .arg(&estimator);
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (GR_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: (double* x 4, const double*, int x 3); one block; every
        // [n] buffer holds n (at least 1), summary 3; n % g == 0 (checked).
        unsafe { l.launch(cfg) }.ctx("launch grpo_advantages_f64")?;
    }
    let s = gpu.download(&summary)?;
    let (frac, mean_r, std_r) = if rewards.is_empty() {
        (0.0, f64::NAN, f64::NAN)
    } else {
        (s[0], s[1], s[2])
    };
    Ok(DeviceAdvantages {
        values,
        group_mean: mean,
        std,
        frac_reward_zero_std: frac,
        reward_mean: mean_r,
        reward_std: std_r,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_have_the_cuda_struct_layout() {
        assert_eq!(std::mem::size_of::<GrpoParams>(), 8 * 4 + 8 * 8);
        assert_eq!(std::mem::align_of::<GrpoParams>(), 8);
        let p = GrpoParams::default();
        let base = &p as *const GrpoParams as usize;
        assert_eq!(&p.beta as *const f64 as usize - base, 32);
        assert_eq!(&p.num_items as *const f64 as usize - base, 88);
        // The CUDA struct declares the same fields in the same order.
        let src = crate::registry::SOURCES
            .iter()
            .find(|s| s.file == "grpo.cu")
            .map(|s| s.source)
            .unwrap_or_default();
        assert!(src.contains("double beta, eps_low, eps_high, delta, max_len, entropy_coef, quantile, num_items;"));
    }

    #[test]
    fn loss_plans_check_ranges_inputs_and_lengths() {
        let p = GrpoParams {
            kl: 3,
            ..GrpoParams::default()
        };
        let e = plan_grpo_loss(2, 3, &[("ref_logp", None, 6)], &p).unwrap_err();
        assert!(e.to_string().contains("ref_logp is required"), "{e}");
        let e = plan_grpo_loss(2, 3, &[("logp", Some(5), 6)], &p).unwrap_err();
        assert!(e.to_string().contains("logp holds 5 elements, needs 6"), "{e}");
        assert_eq!(
            plan_grpo_loss(2, 3, &[("logp", Some(6), 6), ("ref_logp", None, 0)], &p).unwrap(),
            (2, 3)
        );
        for bad in [
            GrpoParams { loss_type: 5, ..p },
            GrpoParams { kl: 4, ..p },
            GrpoParams {
                loss_type: 2,
                max_len: 0.0,
                ..p
            },
        ] {
            assert!(plan_grpo_loss(1, 1, &[], &bad).is_err(), "{bad:?}");
        }
        assert!(plan_grpo_loss(1 << 31, 1, &[], &p).is_err());
    }

    #[test]
    fn advantage_plans_refuse_bad_groups_estimators_and_infinities() {
        assert_eq!(plan_grpo_advantages(&[1.0, 0.0, f64::NAN, 1.0], 2, 0).unwrap(), (4, 2));
        assert!(plan_grpo_advantages(&[1.0, 0.0, 1.0], 2, 0).is_err());
        assert!(plan_grpo_advantages(&[1.0, 0.0], 0, 0).is_err());
        assert!(plan_grpo_advantages(&[1.0, 0.0], 2, 5).is_err());
        let e = plan_grpo_advantages(&[1.0, f64::INFINITY], 2, 0).unwrap_err();
        assert!(e.to_string().contains("reward 1 is infinite"), "{e}");
    }
}
