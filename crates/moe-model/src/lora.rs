//! LoRA adapters (Hu et al. 2021) in PEFT's format.
//!
//! An adapted linear computes `y = W x + b + s * B (A x)` with `A [r, in]`,
//! `B [out, r]` and `s = alpha / r` (`alpha / sqrt(r)` with `use_rslora`).
//! The adapters are the trainable prefix of the flat buffer (see
//! [`crate::Layout::with_lora`]); every base tensor is frozen after them.
//!
//! Files: `adapter_config.json` and `adapter_model.safetensors` as PEFT's
//! `save_pretrained` writes them, tensors named
//! `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{input_err, Error, Result};
use crate::params::{Layout, Linear, ParamEntry};
use crate::st;

/// Name of the adapter's config file in a PEFT folder.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// Name of the adapter's weights file in a PEFT folder.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// A LoRA configuration: the `[lora]` table of a training config and the
/// subset of PEFT's `LoraConfig` that aha implements. Defaults are PEFT's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank of the update (`r`; PEFT's default 8).
    #[serde(default = "default_r")]
    pub r: usize,
    /// Scaling numerator (`lora_alpha`; PEFT's default 8).
    #[serde(default = "default_alpha")]
    pub alpha: f32,
    /// Module-name suffixes to adapt (`target_modules`; PEFT's default for
    /// Llama and Qwen2 is `["q_proj", "v_proj"]`, which is ours for every
    /// architecture). A module matches a target when its name equals it or
    /// ends with `.` and the target. `["all-linear"]` adapts every linear
    /// except the lm-head. Routed experts and the MoE router are never
    /// adapted (transformers 5 fuses the experts, so PEFT does not match them
    /// either).
    #[serde(default = "default_targets")]
    pub target_modules: Vec<String>,
    /// Dropout on the adapter's input in training forwards (`lora_dropout`;
    /// PEFT's default 0): `s B (A dropout(x))` with inverted scaling, a
    /// fresh mask each step ([`Layout::set_lora_dropout`]); rollouts,
    /// scoring and evaluation apply none.
    #[serde(default)]
    pub dropout: f32,
    /// `s = alpha / sqrt(r)` instead of `alpha / r` (`use_rslora`; PEFT's
    /// default false).
    #[serde(default)]
    pub use_rslora: bool,
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f32 {
    8.0
}
fn default_targets() -> Vec<String> {
    vec!["q_proj".into(), "v_proj".into()]
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: default_r(),
            alpha: default_alpha(),
            target_modules: default_targets(),
            dropout: 0.0,
            use_rslora: false,
        }
    }
}

impl LoraConfig {
    /// The update's scale `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self) -> f32 {
        let r = self.r.max(1) as f32;
        if self.use_rslora {
            self.alpha / r.sqrt()
        } else {
            self.alpha / r
        }
    }

    /// Checks the values (`r >= 1`, finite alpha, dropout in `[0, 1)`, at
    /// least one target); `what` names the source in the error.
    pub fn validate(&self, what: &Path) -> Result<()> {
        let bad = |msg: String| {
            Err(Error::Config {
                path: what.to_path_buf(),
                msg,
            })
        };
        if self.r == 0 {
            return bad("lora r must be at least 1".into());
        }
        if !self.alpha.is_finite() {
            return bad(format!("lora alpha {} is not finite", self.alpha));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("lora dropout {} is not in [0, 1)", self.dropout));
        }
        if self.target_modules.is_empty() {
            return bad("lora target_modules is empty".into());
        }
        Ok(())
    }

    /// As [`LoraConfig::validate`], for a training config (every valid
    /// value trains, dropout included).
    pub fn validate_for_training(&self, what: &Path) -> Result<()> {
        self.validate(what)
    }

    /// Whether the module `name` (e.g. `model.layers.0.self_attn.q_proj`)
    /// is a target, by PEFT's suffix rule.
    pub fn targets(&self, name: &str) -> bool {
        self.target_modules.iter().any(|t| {
            t == "all-linear"
                || name == t
                || (name.len() > t.len() && name.ends_with(t.as_str()) && {
                    let cut = name.len() - t.len() - 1;
                    name.as_bytes().get(cut) == Some(&b'.')
                })
        })
    }

    /// Reads `adapter_config.json` of a PEFT LoRA folder. Keys aha does not
    /// implement are refused by name when set to anything but PEFT's
    /// default (DoRA, biases, per-module ranks, ...); bookkeeping keys are
    /// ignored.
    pub fn from_peft_dir(dir: &Path) -> Result<LoraConfig> {
        let path = dir.join(ADAPTER_CONFIG);
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: path.clone(),
            msg: format!("not valid JSON: {e}"),
        })?;
        let bad = |msg: String| Error::Config {
            path: path.clone(),
            msg,
        };
        let obj = v.as_object().ok_or_else(|| bad("not a JSON object".into()))?;
        match obj.get("peft_type").and_then(|t| t.as_str()) {
            Some("LORA") => {}
            other => return Err(bad(format!("peft_type {other:?}: only LORA adapters are supported"))),
        }
        // Keys whose non-default values change the computation.
        let defaults: [(&str, serde_json::Value); 11] = [
            ("use_dora", false.into()),
            ("bias", "none".into()),
            ("lora_bias", false.into()),
            ("fan_in_fan_out", false.into()),
            ("modules_to_save", serde_json::Value::Null),
            ("layers_to_transform", serde_json::Value::Null),
            ("layer_replication", serde_json::Value::Null),
            ("target_parameters", serde_json::Value::Null),
            ("trainable_token_indices", serde_json::Value::Null),
            ("use_qalora", false.into()),
            ("exclude_modules", serde_json::Value::Null),
        ];
        for (key, default) in &defaults {
            if let Some(val) = obj.get(*key) {
                let empty = val.is_null()
                    || val.as_array().is_some_and(|a| a.is_empty())
                    || val.as_object().is_some_and(|o| o.is_empty());
                if val != default && !empty {
                    return Err(bad(format!("`{key}` = {val} is not supported (only {default})")));
                }
            }
        }
        for key in ["rank_pattern", "alpha_pattern"] {
            if let Some(val) = obj.get(key) {
                let empty = val.is_null() || val.as_object().is_some_and(|o| o.is_empty());
                if !empty {
                    return Err(bad(format!("`{key}` = {val}: per-module ranks are not supported")));
                }
            }
        }
        let r = obj
            .get("r")
            .and_then(|x| x.as_u64())
            .ok_or_else(|| bad("`r` is missing or not an integer".into()))? as usize;
        let alpha = obj
            .get("lora_alpha")
            .and_then(|x| x.as_f64())
            .ok_or_else(|| bad("`lora_alpha` is missing or not a number".into()))? as f32;
        let target_modules = match obj.get("target_modules") {
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .map(|t| t.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("`target_modules` holds a non-string".into()))?,
            Some(serde_json::Value::String(s)) if s == "all-linear" => vec![s.clone()],
            Some(other) => {
                return Err(bad(format!(
                    "`target_modules` = {other}: only a list of module names or \"all-linear\" is supported (no regular expressions)"
                )))
            }
            None => default_targets(),
        };
        let dropout = obj.get("lora_dropout").and_then(|x| x.as_f64()).unwrap_or(0.0) as f32;
        let use_rslora = obj.get("use_rslora").and_then(|x| x.as_bool()).unwrap_or(false);
        let cfg = LoraConfig {
            r,
            alpha,
            target_modules,
            dropout,
            use_rslora,
        };
        cfg.validate(&path)?;
        Ok(cfg)
    }

    /// `adapter_config.json` as PEFT writes it (the keys PEFT needs to
    /// load it; `base` is `base_model_name_or_path`).
    pub fn to_peft_json(&self, base: Option<&str>) -> serde_json::Value {
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.target_modules,
            "use_rslora": self.use_rslora,
            "bias": "none",
            "fan_in_fan_out": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "modules_to_save": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "use_dora": false,
        })
    }
}

/// The base model folder an adapter folder's `adapter_config.json` names
/// (`base_model_name_or_path`; a relative path is taken from the current
/// directory, as PEFT does).
pub fn adapter_base(dir: &Path) -> Result<std::path::PathBuf> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
        path: path.clone(),
        source,
    })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.clone(),
        msg: format!("not valid JSON: {e}"),
    })?;
    match v.get("base_model_name_or_path").and_then(|b| b.as_str()) {
        Some(b) if Path::new(b).join("config.json").is_file() => Ok(b.into()),
        other => Err(Error::Config {
            path,
            msg: format!("base_model_name_or_path {other:?} is not a model folder here; load the base and apply the adapter to it"),
        }),
    }
}

/// Files of a base folder copied beside a saved adapter.
const TOKENIZER_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
];

/// One adapted linear's `A [r, in]` and `B [out, r]` slots and its scale.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraSlots {
    /// `lora_A.weight` [r, in].
    pub a: crate::params::Slot,
    /// `lora_B.weight` [out, r].
    pub b: crate::params::Slot,
    /// Rank.
    pub r: usize,
    /// `alpha / r` (or `alpha / sqrt(r)`).
    pub scale: f32,
    /// False while the adapter is disabled (the base model alone computes:
    /// the KL reference of a LoRA run, with no second copy of the weights).
    pub enabled: bool,
    /// Dropout on the adapter's input in training forwards
    /// ([`Layout::set_lora_dropout`]); `None` otherwise.
    pub dropout: Option<LoraDropout>,
}

/// LoRA dropout of one training forward: PEFT's placement, `s B (A
/// dropout(x))`, inverted scaling (kept inputs times `1 / (1 - p)`), the
/// mask drawn from `seed` by a counter-based hash so that the CPU and the
/// GPU (and a backward, or a recomputed forward) draw the same one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraDropout {
    /// Probability of dropping an input (`lora_dropout`), in `(0, 1)`.
    pub p: f32,
    /// The step's seed.
    pub seed: u64,
}

/// SplitMix64's finaliser.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A training forward's dropout seed from its token ids and `salt` (the
/// caller's counters: iteration, minibatch, micro-batch): a fresh mask for
/// every batch, the same on a rerun or a resume, and different on
/// data-parallel ranks (different data).
pub fn dropout_seed(ids: &[u32], salt: u64) -> u64 {
    ids.iter().fold(mix64(salt), |h, &x| mix64(h ^ u64::from(x)))
}

/// The scaled dropout mask `[n, inp]` of the adapter whose `lora_A` sits
/// at element `a_off` of the layout (the linear's identity), for rows of
/// `inp` inputs: element `i` is `1 / (1 - p)` when `u_i >= p` and 0
/// otherwise, with `u_i` the top 24 bits of `mix64(mix64(seed ^
/// mix64(a_off)) + i)` over 2^24 (exact in f32).
pub fn dropout_mask(d: LoraDropout, a_off: usize, n: usize, inp: usize) -> Vec<f32> {
    let key = mix64(d.seed ^ mix64(a_off as u64));
    let keep = 1.0 / (1.0 - d.p);
    (0..(n * inp) as u64)
        .map(|i| {
            let u = (mix64(key.wrapping_add(i)) >> 40) as f32 / (1u32 << 24) as f32;
            if u >= d.p {
                keep
            } else {
                0.0
            }
        })
        .collect()
}

/// `x` times the adapter's dropout mask when it has one (the CPU twin of
/// the GPU's `mul_inplace_f32` with the same mask).
pub(crate) fn apply_dropout<'a>(x: &'a [f32], lo: &LoraSlots, n: usize, inp: usize) -> std::borrow::Cow<'a, [f32]> {
    match lo.dropout {
        Some(d) => {
            let m = dropout_mask(d, lo.a.off, n, inp);
            std::borrow::Cow::Owned(x.iter().zip(&m).map(|(a, b)| a * b).collect())
        }
        None => std::borrow::Cow::Borrowed(x),
    }
}

/// PEFT's saved name of a LoRA tensor of `module` (`which` is `A` or `B`).
pub fn peft_name(module: &str, which: char) -> String {
    format!("base_model.model.{module}.lora_{which}.weight")
}

/// Whether a layout entry is a LoRA tensor.
pub fn is_adapter(e: &ParamEntry) -> bool {
    is_adapter_name(&e.name)
}

/// Whether a tensor name is a LoRA tensor's (PEFT's saved names).
pub fn is_adapter_name(name: &str) -> bool {
    name.starts_with("base_model.model.") && (name.ends_with(".lora_A.weight") || name.ends_with(".lora_B.weight"))
}

/// Initial adapter values as PEFT's default (`init_lora_weights=True`):
/// `A` uniform in `±1/sqrt(in)` (kaiming-uniform with `a = sqrt(5)`), `B`
/// zero, so the adapted model starts equal to the base.
pub(crate) fn init_adapters(layout: &Layout, params: &mut [f32], seed: u64) {
    let mut rng = aha_tensor::rng::SplitMix64(seed);
    for e in layout.entries.iter().filter(|e| is_adapter(e)) {
        let dst = e.slot.of_mut(params);
        if e.name.ends_with(".lora_A.weight") {
            let fan_in = e.shape.get(1).copied().unwrap_or(1).max(1) as f64;
            let bound = 1.0 / fan_in.sqrt();
            dst.iter_mut()
                .for_each(|x| *x = ((rng.unit() * 2.0 - 1.0) * bound) as f32);
        } else {
            dst.fill(0.0);
        }
    }
}

/// Reads `adapter_model.safetensors` into the adapter slots of `params`;
/// missing, unexpected and mis-shaped tensors are listed in one error.
pub(crate) fn load_adapter_weights(dir: &Path, layout: &Layout, params: &mut [f32]) -> Result<()> {
    let path = dir.join(ADAPTER_WEIGHTS);
    let header: BTreeMap<String, st::TensorLoc> = st::read_header(&path)?.into_iter().collect();
    let mut problems = Vec::new();
    let mut missing = Vec::new();
    for e in layout.entries.iter().filter(|e| is_adapter(e)) {
        let Some(loc) = header.get(&e.name) else {
            missing.push(e.name.clone());
            continue;
        };
        if loc.shape != e.shape {
            problems.push(format!(
                "`{}` has shape {:?}, the config implies {:?}",
                e.name, loc.shape, e.shape
            ));
            continue;
        }
        let bytes = st::read_tensor(loc)?;
        if st::decode_floats(e.slot.of_mut(params), loc.dtype, &bytes).is_none()
            || loc.dtype == safetensors::Dtype::F8_E4M3
        {
            problems.push(format!(
                "`{}` has dtype {:?}; supported: F32, BF16, F16",
                e.name, loc.dtype
            ));
        }
    }
    let unexpected: Vec<&str> = header
        .keys()
        .filter(|n| layout.get(n).is_none_or(|e| !is_adapter(e)))
        .map(|s| s.as_str())
        .collect();
    if !missing.is_empty() {
        problems.push(format!("{} missing: {}", missing.len(), missing.join(", ")));
    }
    if !unexpected.is_empty() {
        problems.push(format!("{} unexpected: {}", unexpected.len(), unexpected.join(", ")));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Checkpoint {
            path,
            msg: problems.join("; "),
        })
    }
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` (f32).
pub(crate) fn save_adapter(
    dir: &Path,
    cfg: &LoraConfig,
    layout: &Layout,
    params: &[f32],
    base: Option<&str>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let tensors: Vec<(String, Vec<usize>, &[f32])> = layout
        .entries
        .iter()
        .filter(|e| is_adapter(e))
        .map(|e| (e.name.clone(), e.shape.clone(), e.slot.of(params)))
        .collect();
    st::write_f32(&dir.join(ADAPTER_WEIGHTS), &tensors)?;
    let path = dir.join(ADAPTER_CONFIG);
    let text = serde_json::to_string_pretty(&cfg.to_peft_json(base)).map_err(|e| Error::Config {
        path: path.clone(),
        msg: format!("cannot serialise: {e}"),
    })?;
    std::fs::write(&path, text).map_err(|source| Error::Io { path, source })
}

/// Every adapted linear of a layout.
pub(crate) fn adapted_linears(layout: &Layout) -> Vec<Linear> {
    use crate::params::{AttnSlots, FfnSlots, MlpSlots};
    let mut out = Vec::new();
    let mlp = |m: &MlpSlots, out: &mut Vec<Linear>| out.extend([m.gate, m.up, m.down]);
    for l in &layout.layers {
        match &l.attn {
            AttnSlots::Gqa { q, k, v, o, .. } => out.extend([*q, *k, *v, *o]),
            AttnSlots::Mla {
                q_lora,
                q,
                kv_a,
                kv_b,
                o,
                ..
            } => {
                if let Some((qa, _, qb)) = q_lora {
                    out.extend([*qa, *qb]);
                }
                out.extend(q.iter().copied());
                out.extend([*kv_a, *kv_b, *o]);
            }
        }
        match &l.ffn {
            FfnSlots::Dense(m) => mlp(m, &mut out),
            FfnSlots::Moe { shared, .. } => {
                if let Some(s) = shared {
                    mlp(s, &mut out);
                }
            }
        }
    }
    out.retain(|l| l.lora.is_some());
    out
}

impl Layout {
    /// Turns every LoRA adapter of the layout on or off; off, the forward
    /// and backward compute the base model alone (PEFT's
    /// `disable_adapter`). Returns false when the layout has no adapters.
    pub fn set_adapters_enabled(&mut self, on: bool) -> bool {
        self.for_each_adapter(|lo| lo.enabled = on)
    }

    /// Dropout on the adapters' inputs for the training forwards to come
    /// (`Some(seed)`: each adapted linear draws its mask from `seed`, see
    /// [`dropout_mask`]), or none (`None`: rollouts, scoring, evaluation).
    /// A no-op without adapters or with `dropout` 0, whose forward is
    /// exactly the one without dropout. Returns whether dropout is now on.
    pub fn set_lora_dropout(&mut self, seed: Option<u64>) -> bool {
        let p = self.lora.as_ref().map_or(0.0, |l| l.dropout);
        let d = seed.filter(|_| p > 0.0).map(|seed| LoraDropout { p, seed });
        self.for_each_adapter(|lo| lo.dropout = d) && d.is_some()
    }

    /// The dropout the adapters apply now (see [`Layout::set_lora_dropout`]).
    pub fn lora_dropout(&self) -> Option<LoraDropout> {
        adapted_linears(self)
            .iter()
            .find_map(|l| l.lora.and_then(|lo| lo.dropout))
    }

    /// Calls `f` on every adapter; false when the layout has none.
    fn for_each_adapter(&mut self, mut f: impl FnMut(&mut LoraSlots)) -> bool {
        use crate::params::{AttnSlots, FfnSlots};
        if self.lora.is_none() {
            return false;
        }
        let mut set = |l: &mut Linear| {
            if let Some(lo) = &mut l.lora {
                f(lo);
            }
        };
        for layer in &mut self.layers {
            match &mut layer.attn {
                AttnSlots::Gqa { q, k, v, o, .. } => [q, k, v, o].into_iter().for_each(&mut set),
                AttnSlots::Mla {
                    q_lora,
                    q,
                    kv_a,
                    kv_b,
                    o,
                    ..
                } => {
                    if let Some((qa, _, qb)) = q_lora {
                        set(qa);
                        set(qb);
                    }
                    if let Some(q) = q {
                        set(q);
                    }
                    [kv_a, kv_b, o].into_iter().for_each(&mut set);
                }
            }
            let mlps = match &mut layer.ffn {
                FfnSlots::Dense(m) => Some(m),
                FfnSlots::Moe { shared, .. } => shared.as_mut(),
            };
            if let Some(m) = mlps {
                [&mut m.gate, &mut m.up, &mut m.down].into_iter().for_each(&mut set);
            }
        }
        true
    }
}

impl crate::Model {
    /// This (base) model with fresh LoRA adapters on the linears `cfg`
    /// targets, initialised as PEFT does (`A` uniform in `±1/sqrt(in)` from
    /// `seed`, `B` zero: the adapted model starts equal to the base). The
    /// base tensors move into the new layout's frozen part.
    pub fn with_lora(self, cfg: &LoraConfig, seed: u64) -> Result<crate::Model> {
        if self.layout.lora.is_some() {
            return Err(Error::Config {
                path: "[lora]".into(),
                msg: "the model already carries a LoRA adapter".into(),
            });
        }
        let layout = Layout::with_lora(&self.config, cfg)?;
        let mut params = vec![0f32; layout.size];
        for e in &self.layout.entries {
            if let Some(dst) = layout.get(&e.name) {
                dst.slot.of_mut(&mut params).copy_from_slice(e.slot.of(&self.params));
            }
        }
        init_adapters(&layout, &mut params, seed);
        Ok(crate::Model {
            config: self.config,
            layout,
            params,
            source_dir: self.source_dir,
        })
    }

    /// This (base) model with the PEFT LoRA adapter of folder `dir`
    /// (`adapter_config.json`, `adapter_model.safetensors`), unmerged.
    pub fn load_adapter(self, dir: &Path) -> Result<crate::Model> {
        let cfg = LoraConfig::from_peft_dir(dir)?;
        let mut m = self.with_lora(&cfg, 0).map_err(|e| match e {
            Error::Config { msg, .. } => Error::Config {
                path: dir.join(ADAPTER_CONFIG),
                msg,
            },
            other => other,
        })?;
        load_adapter_weights(dir, &m.layout, &mut m.params)?;
        Ok(m)
    }

    /// Writes the adapter in PEFT's format (`adapter_config.json`,
    /// `adapter_model.safetensors` in f32) to `dir`; an error when the
    /// model carries none.
    pub fn save_adapter(&self, dir: &Path) -> Result<()> {
        let cfg = self.layout.lora.as_ref().ok_or_else(|| Error::Config {
            path: dir.to_path_buf(),
            msg: "the model carries no LoRA adapter to save".into(),
        })?;
        let base = self.source_dir.as_ref().map(|d| d.display().to_string());
        save_adapter(dir, cfg, &self.layout, &self.params, base.as_deref())?;
        // The tokenizer files travel with the adapter (as TRL saves them),
        // so the folder alone can be generated from; `config.json` stays
        // out, so the folder still reads as an adapter.
        if let Some(src) = &self.source_dir {
            for f in TOKENIZER_FILES {
                let from = src.join(f);
                if from.is_file() && src.canonicalize().ok() != dir.canonicalize().ok() {
                    std::fs::copy(&from, dir.join(f)).map_err(|source| Error::Io { path: from, source })?;
                }
            }
        }
        Ok(())
    }

    /// The base model with the adapter merged into its weights
    /// (`W += s B A`): a plain model in the base layout, saved as a normal
    /// HF folder. A model without an adapter comes back as it is.
    pub fn merge_lora(&self) -> Result<crate::Model> {
        let base = Layout::new(&self.config);
        let mut params = vec![0f32; base.size];
        for e in self.layout.entries.iter().filter(|e| !is_adapter(e)) {
            if let Some(dst) = base.get(&e.name) {
                dst.slot.of_mut(&mut params).copy_from_slice(e.slot.of(&self.params));
            }
        }
        for l in adapted_linears(&self.layout) {
            let Some(lo) = l.lora else { continue };
            let name = self
                .layout
                .entries
                .iter()
                .find(|e| e.slot == l.w)
                .map(|e| e.name.clone())
                .ok_or_else(|| input_err("merge_lora", "an adapted linear without a weight entry"))?;
            let dst = base
                .get(&name)
                .ok_or_else(|| input_err("merge_lora", format!("`{name}` is not in the base layout")))?;
            // delta [out, in] = s B [out, r] A [r, in], added to W.
            let mut b = lo.b.of(&self.params).to_vec();
            b.iter_mut().for_each(|v| *v *= lo.scale);
            aha_tensor::cpu::matmul(
                dst.slot.of_mut(&mut params),
                &b,
                lo.a.of(&self.params),
                aha_tensor::cpu::Gemm::new(l.out, lo.r, l.inp).acc(),
            )?;
        }
        Ok(crate::Model {
            config: self.config.clone(),
            layout: base,
            params,
            source_dir: self.source_dir.clone(),
        })
    }
}
