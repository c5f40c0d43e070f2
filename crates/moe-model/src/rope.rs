//! RoPE frequency scaling as Hugging Face transformers defines it for each
//! `rope_type` of `rope_parameters` (`rope_scaling` in older configs).
//!
//! Every type changes the inverse frequencies `inv_freq [R/2]` of the
//! rotation; YaRN also multiplies `cos` and `sin` by an attention factor
//! (so q·k over the rotated part grows by its square). The tables themselves
//! are built in one place, `model::rope_tables`, for the CPU and the GPU
//! model alike.
//!
//! | type | inverse frequency of pair `i` (base `b`, rotated width `R`) |
//! |---|---|
//! | default | `f_i = b^(-2i/R)` |
//! | linear | `f_i / factor` |
//! | dynamic | default with `b' = b * (factor * L / L0 - (factor - 1))^(R / (R - 2))` once the sequence `L` exceeds `L0 = max_position_embeddings` |
//! | llama3 | wavelengths `2π / f_i` above `L_orig / low_freq_factor` divided by `factor`, below `L_orig / high_freq_factor` kept, smoothly blended between |
//! | yarn | `f_i / factor` and `f_i` blended by a linear ramp over the pair index between the dimensions where `beta_fast` and `beta_slow` rotations fit in `L_orig` |

use std::f64::consts::PI;

/// A RoPE scaling rule, parsed from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Dynamic NTK: the base grows with the sequence once it is longer than
    /// `max_position_embeddings` (transformers recomputes the frequencies
    /// from the longest position of each forward).
    Dynamic {
        /// The NTK factor.
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent interpolation.
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f64,
        /// Wavelengths above `original_max_position_embeddings / low_freq_factor` are scaled.
        low_freq_factor: f64,
        /// Wavelengths below `original_max_position_embeddings / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The pre-training context.
        original_max_position_embeddings: f64,
    },
    /// YaRN (DeepSeek-V3 / R1, Qwen long-context).
    Yarn {
        /// Divisor of the interpolated frequencies.
        factor: f64,
        /// The pre-training context.
        original_max_position_embeddings: f64,
        /// Rotations marking the end of the extrapolated (kept) dimensions.
        beta_fast: f64,
        /// Rotations marking the start of the interpolated dimensions.
        beta_slow: f64,
        /// Round the ramp's ends outwards (`truncate`, default true).
        truncate: bool,
        /// Multiplier on `cos` and `sin` (`attention_factor`, else derived
        /// from `factor`, `mscale` and `mscale_all_dim`).
        attention_factor: f64,
    },
}

/// YaRN's magnitude correction `0.1 * m * ln(s) + 1` (1 for `s <= 1`).
pub fn yarn_mscale(scale: f64, m: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * m * scale.ln() + 1.0
    }
}

impl RopeScaling {
    /// The factor `cos` and `sin` are multiplied by.
    pub fn attention_factor(&self) -> f64 {
        match self {
            RopeScaling::Yarn { attention_factor, .. } => *attention_factor,
            _ => 1.0,
        }
    }

    /// `inv_freq [rot / 2]` for base `theta` when the longest sequence is
    /// `seq_len` positions and the config's `max_position_embeddings` is
    /// `max_pos` (only dynamic scaling reads the two lengths).
    pub fn inv_freq(&self, theta: f64, rot: usize, seq_len: usize, max_pos: usize) -> Vec<f64> {
        let half = rot / 2;
        let plain = |base: f64| -> Vec<f64> {
            (0..half)
                .map(|i| 1.0 / base.powf((2 * i) as f64 / rot as f64))
                .collect()
        };
        match *self {
            RopeScaling::Default => plain(theta),
            RopeScaling::Linear { factor } => plain(theta).into_iter().map(|f| f / factor).collect(),
            RopeScaling::Dynamic { factor } => {
                let l0 = max_pos.max(1) as f64;
                let l = (seq_len as f64).max(l0);
                let r = rot as f64;
                let base = if rot > 2 {
                    theta * (factor * l / l0 - (factor - 1.0)).powf(r / (r - 2.0))
                } else {
                    theta
                };
                plain(base)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                plain(theta)
                    .into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: old,
                beta_fast,
                beta_slow,
                truncate,
                ..
            } => {
                // The (fractional) pair index at which `rotations` full turns
                // fit in the original context.
                let dim_of = |rotations: f64| (rot as f64 * (old / (rotations * 2.0 * PI)).ln()) / (2.0 * theta.ln());
                let (mut lo, mut hi) = (dim_of(beta_fast), dim_of(beta_slow));
                if truncate {
                    lo = lo.floor();
                    hi = hi.ceil();
                }
                let lo = lo.max(0.0);
                let mut hi = hi.min(rot as f64 - 1.0);
                if lo == hi {
                    hi += 0.001;
                }
                plain(theta)
                    .into_iter()
                    .enumerate()
                    .map(|(i, f)| {
                        // 0: keep the frequency (extrapolate); 1: interpolate.
                        let ramp = ((i as f64 - lo) / (hi - lo)).clamp(0.0, 1.0);
                        (f / factor) * ramp + f * (1.0 - ramp)
                    })
                    .collect()
            }
        }
    }
}

/// `cos` and `sin` tables `[max_pos, rot / 2]` for the given inverse
/// frequencies, each multiplied by `attention_factor`; computed in f64.
pub fn tables(inv_freq: &[f64], max_pos: usize, attention_factor: f64) -> (Vec<f32>, Vec<f32>) {
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(max_pos * half);
    let mut sin = Vec::with_capacity(max_pos * half);
    for p in 0..max_pos {
        for &f in inv_freq {
            let a = p as f64 * f;
            cos.push((a.cos() * attention_factor) as f32);
            sin.push((a.sin() * attention_factor) as f32);
        }
    }
    (cos, sin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_the_plain_table_and_linear_divides() {
        let f = RopeScaling::Default.inv_freq(10000.0, 8, 10, 10);
        assert_eq!(f.len(), 4);
        assert!((f[1] - 10000f64.powf(-0.25)).abs() < 1e-15);
        let l = RopeScaling::Linear { factor: 4.0 }.inv_freq(10000.0, 8, 10, 10);
        assert!(f.iter().zip(&l).all(|(a, b)| (a / 4.0 - b).abs() < 1e-15));
    }

    #[test]
    fn dynamic_only_changes_beyond_the_context() {
        let d = RopeScaling::Dynamic { factor: 2.0 };
        let plain = RopeScaling::Default.inv_freq(10000.0, 8, 0, 0);
        assert_eq!(d.inv_freq(10000.0, 8, 100, 128), plain);
        let long = d.inv_freq(10000.0, 8, 256, 128);
        // base * (2 * 2 - 1)^(8/6): the lowest frequency pair moves, the first stays 1.
        assert_eq!(long[0], 1.0);
        let want = 1.0 / (10000.0 * 3f64.powf(8.0 / 6.0)).powf(6.0 / 8.0);
        assert!((long[3] - want).abs() < 1e-15);
    }

    #[test]
    fn llama3_keeps_high_frequencies_and_scales_low_ones() {
        let s = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64.0,
        };
        let plain = RopeScaling::Default.inv_freq(500000.0, 16, 0, 0);
        let f = s.inv_freq(500000.0, 16, 0, 0);
        for (a, b) in plain.iter().zip(&f) {
            let w = 2.0 * PI / a;
            if w < 16.0 {
                assert_eq!(a, b);
            } else if w > 64.0 {
                assert!((a / 8.0 - b).abs() < 1e-18);
            } else {
                assert!(*b <= *a && *b >= a / 8.0);
            }
        }
    }

    #[test]
    fn yarn_ramps_from_kept_to_interpolated() {
        let s = RopeScaling::Yarn {
            factor: 40.0,
            original_max_position_embeddings: 64.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            truncate: true,
            attention_factor: 1.0,
        };
        let plain = RopeScaling::Default.inv_freq(10000.0, 16, 0, 0);
        let f = s.inv_freq(10000.0, 16, 0, 0);
        // Fast-rotating pairs are kept, the slowest one is divided by the factor.
        assert_eq!(f[0], plain[0]);
        assert!((f[7] - plain[7] / 40.0).abs() < 1e-18);
        assert!(f.windows(2).all(|w| w[1] < w[0]));
    }

    #[test]
    fn tables_scale_by_the_attention_factor() {
        let (c, s) = tables(&[1.0, 0.5], 3, 2.0);
        assert_eq!(c.len(), 6);
        assert!((c[2] - 2.0 * 1f64.cos() as f32).abs() < 1e-6);
        assert!((s[5] - 2.0 * 1f64.sin() as f32).abs() < 1e-6);
    }
}
