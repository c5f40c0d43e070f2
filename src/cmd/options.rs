//! Option groups shared by several commands (flattened into each command's
//! arguments with `#[command(flatten)]`), and the one way a flag overrides a
//! TOML config: [`Override`].
//!
//! `aha grpo` and `aha sft` read a TOML config; each of their flags that is
//! given replaces the config key of the same name (`--lr` is the one flag
//! named otherwise: it sets `learning_rate`). The flag-to-key lists are the
//! [`override_keys!`] calls: [`PlacementOverride`] and [`TrainOverrides`]
//! below, the command's own flags in `grpo.rs` and `sft.rs`. A new key that
//! gets a flag gets one line there. The one switch, `aha grpo
//! --dynamic-sampling`, can only turn its key on, so it is set beside them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use aha_trainer::grpo_run::GrpoConfig;
use aha_trainer::sft_run::SftConfig;

/// Flags that override keys of a config of type `C`.
pub trait Override<C> {
    /// Replaces each key of `cfg` whose flag was given by the flag's value.
    fn apply(&self, cfg: &mut C);
}

/// `key` becomes the flag's value when the flag was given.
pub fn set<T: Clone>(key: &mut T, flag: &Option<T>) {
    if let Some(v) = flag {
        *key = v.clone();
    }
}

/// Implements [`Override`] for a flag group over one or more config types:
/// `override_keys!(Flags => ConfigA, ConfigB; { flag => key, ... })`, where
/// each `flag` is an `Option` field of `Flags` and `key` the field of the
/// config it replaces.
macro_rules! override_keys {
    ($flags:ty => $($cfg:ty),+; $keys:tt) => {
        $( override_keys!(@one $flags, $cfg, $keys); )+
    };
    (@one $flags:ty, $cfg:ty, { $($flag:ident => $key:ident),* $(,)? }) => {
        impl $crate::cmd::options::Override<$cfg> for $flags {
            fn apply(&self, cfg: &mut $cfg) {
                $( $crate::cmd::options::set(&mut cfg.$key, &self.$flag); )*
            }
        }
    };
}
pub(crate) use override_keys;

/// Reads a TOML config with `parse`, or takes `C::default()` without one,
/// then applies each group of `flags` in turn.
pub fn load_config<C: Default>(
    path: Option<&Path>,
    parse: impl Fn(&str, &Path) -> aha_trainer::Result<C>,
    flags: &[&dyn Override<C>],
) -> Result<C> {
    let mut cfg = match path {
        Some(p) => parse(&read_text(p)?, p)?,
        None => C::default(),
    };
    for f in flags {
        f.apply(&mut cfg);
    }
    Ok(cfg)
}

/// A config file's text; the error names the file.
pub fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Where a command computes: `--device` and `--precision`, resolved once
/// per run by `aha_moe_model::resolve_device`.
#[derive(clap::Args, Clone, Debug)]
pub struct Placement {
    /// cpu, cuda, cuda:N or auto (the GPU when one is present and takes the model).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// f32, or bf16 (bf16 products, f32 sums, master weights, moments and reductions; on the CPU fast with AVX512-BF16).
    #[arg(long, default_value = "f32")]
    pub precision: String,
}

impl Placement {
    /// The device and precision for a model of config `cfg`.
    pub fn resolve(&self, cfg: &aha_moe_model::ModelConfig) -> Result<(aha_tensor::Device, aha_moe_model::Precision)> {
        let precision: aha_moe_model::Precision = self.precision.parse()?;
        Ok((aha_moe_model::resolve_device(&self.device, cfg)?, precision))
    }

    /// The device and precision for the model folder (or config.json) `model`.
    pub fn resolve_for(&self, model: &Path) -> Result<(aha_tensor::Device, aha_moe_model::Precision)> {
        self.resolve(&aha_moe_model::ModelConfig::from_path(model)?)
    }
}

/// `--device` / `--precision` that override a TOML config's keys.
#[derive(clap::Args, Clone, Debug)]
pub struct PlacementOverride {
    /// cpu, cuda, cuda:N or auto [default: the config's, else auto].
    #[arg(long)]
    pub device: Option<String>,
    /// f32 or bf16 [default: the config's, else f32].
    #[arg(long)]
    pub precision: Option<String>,
}

override_keys!(PlacementOverride => GrpoConfig, SftConfig; {
    device => device,
    precision => precision,
});

/// The flags that `aha grpo` and `aha sft` share: the run folder, the
/// length of the run and its checkpoints. Each, when given, overrides the
/// TOML key of the same name (`--resume` is no key: it picks how the run
/// starts).
#[derive(clap::Args, Clone, Debug)]
pub struct TrainOverrides {
    /// Run folder (checkpoints, metrics, the saved model).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// none, r1-zero or chat.
    #[arg(long)]
    pub template: Option<String>,
    /// Optimizer steps.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Saved model's dtype: same (as the input folder), f32, bf16 or f16.
    #[arg(long)]
    pub save_dtype: Option<aha_moe_model::SaveDtype>,
    /// Save a checkpoint every N steps.
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Continue from the run folder's latest checkpoint (the same config is required).
    #[arg(long)]
    pub resume: bool,
}

override_keys!(TrainOverrides => GrpoConfig, SftConfig; {
    out => out,
    template => template,
    steps => steps,
    seed => seed,
    save_dtype => save_dtype,
    save_every => save_every,
});

/// How `aha rejection-sample` and `aha distill` sample their traces: the
/// prompt template, the length limit and the seed (temperature 1).
#[derive(clap::Args, Clone, Debug)]
pub struct TraceSampling {
    /// none, r1-zero or chat.
    #[arg(long, default_value = "r1-zero")]
    pub template: String,
    /// Completion length limit in tokens.
    #[arg(long, default_value_t = 1024)]
    pub max_new_tokens: usize,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl TraceSampling {
    /// Rejection-sampling options: `k` samples per problem on `place`, at
    /// temperature 1, completions of any length, in `language` when given
    /// (at least `min_language_share` of the words).
    pub fn options(
        &self,
        place: (aha_tensor::Device, aha_moe_model::Precision),
        k: usize,
        language: Option<String>,
        min_language_share: f64,
    ) -> aha_trainer::sft_run::RejectionOptions {
        aha_trainer::sft_run::RejectionOptions {
            place,
            k,
            max_new_tokens: self.max_new_tokens,
            min_chars: 1,
            max_chars: usize::MAX,
            language,
            min_language_share,
            temperature: 1.0,
            seed: self.seed,
        }
    }
}
