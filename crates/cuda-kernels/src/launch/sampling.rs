//! Launchers of `kernels/sampling.cu`: one sampled token per row (temperature, top-k, top-p, min-p).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use crate::device::Gpu;
use crate::error::{DriverContext, Error, Result};
use crate::registry::KernelId;

/// What the sampling kernel draws with (as `aha_sampler::SamplingParams`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleParams {
    /// Divides the logits; <= 0 means greedy.
    pub temperature: f32,
    /// Keep the k most likely (0: off).
    pub top_k: usize,
    /// Nucleus mass (1: off).
    pub top_p: f32,
    /// Drop below `min_p` times the top weight (0: off).
    pub min_p: f32,
}

/// One sampled token: id, `log softmax(logits / T)` at it, and the log of
/// the kept mass fraction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampledToken {
    /// The token id.
    pub token: u32,
    /// Its log-prob under the temperature-scaled distribution.
    pub logprob: f32,
    /// `ln(kept / total)`.
    pub truncated_mass_log: f32,
}

/// Checks the sampling call: `logits` holds `rows * v`, one uniform per row
/// in [0, 1), parameters in range, `v` addressable by an i32 token id.
pub fn plan_sample(logits_len: usize, rows: usize, v: usize, u: &[f64], p: &SampleParams) -> Result<bool> {
    check_uniforms(u, rows)?;
    plan_sample_shape(logits_len, rows, v, p)
}

/// Checks one uniform in [0, 1) for each of `rows` rows.
pub fn check_uniforms(u: &[f64], rows: usize) -> Result<()> {
    let bad = |msg: String| Error::InvalidArgument { op: "sample_f32", msg };
    if u.len() != rows {
        return Err(bad(format!("{} uniforms for {rows} rows", u.len())));
    }
    if let Some(x) = u.iter().find(|x| !(0.0..1.0).contains(*x)) {
        return Err(bad(format!("uniform {x} outside [0, 1)")));
    }
    Ok(())
}

/// [`plan_sample`] without the uniforms: the lengths and the parameters.
fn plan_sample_shape(logits_len: usize, rows: usize, v: usize, p: &SampleParams) -> Result<bool> {
    let bad = |msg: String| Error::InvalidArgument { op: "sample_f32", msg };
    if rows.checked_mul(v) != Some(logits_len) {
        return Err(bad(format!("logits hold {logits_len}, not rows {rows} x v {v}")));
    }
    if v > i32::MAX as usize || p.top_k > i32::MAX as usize {
        return Err(bad(format!("vocabulary {v} or top_k {} exceeds i32", p.top_k)));
    }
    if !(p.top_p > 0.0 && p.top_p <= 1.0 && (0.0..1.0).contains(&p.min_p)) || p.temperature.is_nan() {
        return Err(bad(format!(
            "top_p {} must be in (0, 1], min_p {} in [0, 1), temperature a number",
            p.top_p, p.min_p
        )));
    }
    Ok(rows > 0 && v > 0)
}

/// Samples one token per row of `logits [rows, v]` with the row's uniform
/// `u[row]` (kernel `sample_f32`; CPU twin
/// `aha_sampler::sample_with_uniform`). Reads the results back, so it
/// synchronises; a row with a NaN or no finite logit is an error naming it.
pub fn sample_f32(
    gpu: &Gpu,
    logits: &CudaSlice<f32>,
    rows: usize,
    v: usize,
    u: &[f64],
    p: &SampleParams,
) -> Result<Vec<SampledToken>> {
    if !plan_sample(logits.len(), rows, v, u, p)? {
        return Ok(Vec::new());
    }
    let du = gpu.upload(u)?;
    let mut out = Sampled::new(gpu, rows)?;
    sample_f32_into(gpu, &mut out, logits, v, &du, p)?;
    out.read(gpu)
}

/// The sampling kernel's outputs on the device, one per row: token ids,
/// their log-probs and the truncated mass.
#[derive(Debug)]
pub struct Sampled {
    token: CudaSlice<i32>,
    lp: CudaSlice<f32>,
    tl: CudaSlice<f32>,
}

impl Sampled {
    /// Zeroed outputs for `rows` rows.
    pub fn new(gpu: &Gpu, rows: usize) -> Result<Sampled> {
        Ok(Sampled {
            token: gpu.zeros(rows)?,
            lp: gpu.zeros(rows)?,
            tl: gpu.zeros(rows)?,
        })
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.token.len()
    }

    /// Reads the first `rows` results back (synchronises); a row whose
    /// logits held a NaN or no finite value is an error naming it.
    pub fn read_rows(&self, gpu: &Gpu, rows: usize) -> Result<Vec<SampledToken>> {
        let (t, lp, tl) = (
            gpu.download(&self.token)?,
            gpu.download(&self.lp)?,
            gpu.download(&self.tl)?,
        );
        t.iter()
            .zip(lp.iter().zip(&tl))
            .take(rows)
            .enumerate()
            .map(|(row, (&t, (&lp, &tl)))| {
                u32::try_from(t)
                    .map(|token| SampledToken {
                        token,
                        logprob: lp,
                        truncated_mass_log: tl,
                    })
                    .map_err(|_| Error::InvalidArgument {
                        op: "sample_f32",
                        msg: format!("row {row}: the logits hold a NaN or no finite value"),
                    })
            })
            .collect()
    }

    /// Reads every row back ([`Sampled::read_rows`]).
    pub fn read(&self, gpu: &Gpu) -> Result<Vec<SampledToken>> {
        self.read_rows(gpu, self.rows())
    }
}

/// The launch of [`sample_f32`] alone, with the uniforms already on the
/// device and the results left there (no synchronisation: capturable into
/// a CUDA graph). `logits` holds `out.rows() * v` values and `u` one
/// uniform in [0, 1) per row; the uniforms' range is the caller's to check
/// (on the host, before they are uploaded).
pub fn sample_f32_into(
    gpu: &Gpu,
    out: &mut Sampled,
    logits: &CudaSlice<f32>,
    v: usize,
    u: &CudaSlice<f64>,
    p: &SampleParams,
) -> Result<()> {
    let rows = out.rows();
    if u.len() != rows {
        return Err(Error::InvalidArgument {
            op: "sample_f32",
            msg: format!("{} uniforms on the device for {rows} rows", u.len()),
        });
    }
    if !plan_sample_shape(logits.len(), rows, v, p)? {
        return Ok(());
    }
    let mut w = gpu.scratch_f32(rows * v)?;
    let f = gpu.function(KernelId::SampleF32)?;
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (512, 1, 1),
        shared_mem_bytes: 0,
    };
    let (vv, k) = (v as u64, p.top_k as i32);
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(&mut out.token)
        .arg(&mut out.lp)
        .arg(&mut out.tl)
        .arg(&mut *w)
        .arg(logits)
        .arg(u)
        .arg(&vv)
        .arg(&p.temperature)
        .arg(&k)
        .arg(&p.top_p)
        .arg(&p.min_p);
    // SAFETY: (int*, float*, float*, float*, const float*, const double*,
    // unsigned long long, float, int, float, float); the plan checked that
    // logits and w hold rows * v floats, u and the outputs one per row; one
    // block per row.
    unsafe { l.launch(cfg) }.ctx("launch sample_f32")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The checks, on lengths alone: these run without a GPU.
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn sample_plan_checks_lengths_uniforms_and_ranges() {
        let p = SampleParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.9,
            min_p: 0.0,
        };
        assert!(plan_sample(12, 3, 4, &[0.1, 0.5, 0.9], &p).unwrap());
        assert!(!plan_sample(0, 0, 4, &[], &p).unwrap());
        assert!(plan_sample(11, 3, 4, &[0.1, 0.5, 0.9], &p).is_err());
        assert!(plan_sample(12, 3, 4, &[0.1, 0.5], &p).is_err());
        assert!(plan_sample(12, 3, 4, &[0.1, 0.5, 1.0], &p)
            .unwrap_err()
            .to_string()
            .contains("uniform 1"));
        assert!(plan_sample(12, 3, 4, &[0.1, 0.5, 0.2], &SampleParams { top_p: 0.0, ..p }).is_err());
        assert!(plan_sample(12, 3, 4, &[0.1, 0.5, 0.2], &SampleParams { min_p: 1.0, ..p }).is_err());
    }
}
