//! `config.json` of the supported Hugging Face architectures, parsed into one
//! typed [`ModelConfig`].
//!
//! Keys that change the math and are not implemented (a RoPE type other than
//! `default`, `linear`, `dynamic`, `llama3` and `yarn`, an enabled sliding
//! window, a `quantization_config` other than DeepSeek-V3's block-wise FP8)
//! are errors: silently ignoring them would give a model that loads and is
//! wrong. Keys that do not change the math (dropout, `use_cache`, ...) are
//! ignored.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::rope::{yarn_mscale, RopeScaling};

/// The architecture, from `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// `qwen2`: GQA with q/k/v bias (the DeepSeek-R1-Distill-Qwen family).
    Qwen2,
    /// `qwen3`: GQA with q/k RMSNorm.
    Qwen3,
    /// `qwen3_moe`: Qwen3 attention, softmax top-k experts.
    Qwen3Moe,
    /// `deepseek_v3`: MLA attention, sigmoid-scored group-limited experts.
    DeepseekV3,
    /// `llama`: GQA, optional attention bias (the DeepSeek-R1-Distill-Llama family).
    Llama,
}

/// Block-wise FP8 weights as DeepSeek-V3 ships them (`quantization_config`
/// with `quant_method: fp8`, `fmt: e4m3`): each quantized `<name>.weight`
/// is `F8_E4M3` with a `<name>.weight_scale_inv` of one f32 per
/// `[rows, cols]` block (edge blocks partial), and the weight is
/// `q * scale_inv`. Dequantized to f32 on load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fp8Blocks {
    /// Block height (output rows).
    pub rows: usize,
    /// Block width (input columns).
    pub cols: usize,
}

/// How an MoE layer picks experts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Router {
    /// Softmax over expert logits, top-k, optional renormalisation (Qwen3-MoE).
    SoftmaxTopK,
    /// DeepSeek-V3: sigmoid scores; `e_score_correction_bias` added for the
    /// choice only; top `topk_group` of `n_group` groups (group score = sum
    /// of its two best); top-k within them; weights from the plain scores,
    /// renormalised, times `routed_scaling_factor`.
    SigmoidGroupLimited {
        /// Expert groups.
        n_group: usize,
        /// Groups kept per token.
        topk_group: usize,
        /// Multiplier on the routing weights.
        routed_scaling_factor: f32,
    },
}

/// Mixture-of-experts settings.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    /// Routed experts (E).
    pub n_experts: usize,
    /// Experts per token (K).
    pub top_k: usize,
    /// Width of each routed expert's MLP.
    pub expert_dim: usize,
    /// Renormalise the top-k weights to sum to 1.
    pub norm_topk_prob: bool,
    /// Shared experts, run on every token, as one MLP of width `n_shared * expert_dim`.
    pub n_shared: usize,
    /// The routing rule.
    pub router: Router,
    /// Switch-style auxiliary loss coefficient (`router_aux_loss_coef`).
    pub aux_loss_coef: f32,
}

/// Multi-head latent attention (DeepSeek-V2/V3) sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlaConfig {
    /// Rank of the query compression (`None`: a plain `q_proj`).
    pub q_lora_rank: Option<usize>,
    /// Rank of the key/value compression.
    pub kv_lora_rank: usize,
    /// Per-head query/key width without position.
    pub qk_nope_head_dim: usize,
    /// Per-head rotary width (shared by all heads on the key side).
    pub qk_rope_head_dim: usize,
    /// Per-head value width.
    pub v_head_dim: usize,
}

/// Everything the model code needs from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Architecture.
    pub arch: Arch,
    /// Vocabulary size (V).
    pub vocab_size: usize,
    /// Model width (C).
    pub hidden_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads (H).
    pub num_heads: usize,
    /// Key/value heads (Hk); equals H for MLA.
    pub num_kv_heads: usize,
    /// Head width for GQA (D).
    pub head_dim: usize,
    /// Width of the dense MLP.
    pub intermediate_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE frequency scaling (`rope_parameters` / `rope_scaling`).
    pub rope_scaling: RopeScaling,
    /// Multiplier on the softmax scale `1 / sqrt(Dk)`: DeepSeek-V3 with a
    /// scaled RoPE and `mscale_all_dim` multiplies it by
    /// `yarn_mscale(factor, mscale_all_dim)^2`; 1 otherwise.
    pub softmax_scale_mult: f64,
    /// FP8 block quantization of the checkpoint, if any.
    pub fp8: Option<Fp8Blocks>,
    /// Positions the RoPE table covers.
    pub max_position_embeddings: usize,
    /// lm-head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v projections have a bias.
    pub qkv_bias: bool,
    /// RMSNorm over each head of q and k (Qwen3).
    pub qk_norm: bool,
    /// MLA sizes (DeepSeek-V3), else GQA.
    pub mla: Option<MlaConfig>,
    /// MoE settings, if any layer is sparse.
    pub moe: Option<MoeConfig>,
    /// Per layer: true where the MLP is an MoE.
    pub sparse_layers: Vec<bool>,
    /// End-of-sequence ids (`eos_token_id`, int or list).
    pub eos_token_ids: Vec<u32>,
}

struct Reader<'a> {
    v: &'a Value,
    path: &'a Path,
}

impl Reader<'_> {
    fn err(&self, msg: impl Into<String>) -> Error {
        Error::Config {
            path: self.path.to_path_buf(),
            msg: msg.into(),
        }
    }
    fn get(&self, key: &str) -> Option<&Value> {
        self.v.get(key).filter(|v| !v.is_null())
    }
    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as usize))
                .ok_or_else(|| self.err(format!("`{key}` must be a non-negative integer, got {v}"))),
        }
    }
    fn usize(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?.ok_or_else(|| self.err(format!("missing `{key}`")))
    }
    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(format!("`{key}` must be a number, got {v}"))),
        }
    }
    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(format!("`{key}` must be true or false, got {v}"))),
        }
    }
    fn first_usize(&self, keys: &[&str]) -> Result<Option<usize>> {
        for k in keys {
            if let Some(v) = self.usize_opt(k)? {
                return Ok(Some(v));
            }
        }
        Ok(None)
    }
}

impl ModelConfig {
    /// Reads and parses `config.json` from a model folder (or the file itself).
    pub fn from_path(path: &Path) -> Result<ModelConfig> {
        let file: PathBuf = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file).map_err(|source| Error::Io {
            path: file.clone(),
            source,
        })?;
        ModelConfig::from_json_str(&text, &file)
    }

    /// Parses config JSON text; `path` only labels errors.
    pub fn from_json_str(text: &str, path: &Path) -> Result<ModelConfig> {
        let v: Value = serde_json::from_str(text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            msg: format!("not valid JSON: {e}"),
        })?;
        let r = Reader { v: &v, path };
        if !v.is_object() {
            return Err(r.err("expected a JSON object"));
        }
        let arch = match r.get("model_type").and_then(|m| m.as_str()) {
            Some("qwen2") => Arch::Qwen2,
            Some("qwen3") => Arch::Qwen3,
            Some("qwen3_moe") => Arch::Qwen3Moe,
            Some("deepseek_v3") => Arch::DeepseekV3,
            Some("llama") => Arch::Llama,
            Some(other) => {
                return Err(r.err(format!(
                    "model_type `{other}` is not supported (llama, qwen2, qwen3, qwen3_moe, deepseek_v3)"
                )))
            }
            None => return Err(r.err("missing `model_type`")),
        };
        reject_unsupported(&r)?;

        let hidden_size = r.usize("hidden_size")?;
        let num_heads = r.usize("num_attention_heads")?;
        let num_layers = r.usize("num_hidden_layers")?;
        let vocab_size = r.usize("vocab_size")?;
        let num_kv_heads = r.usize_opt("num_key_value_heads")?.unwrap_or(num_heads);
        if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(r.err(format!(
                "num_attention_heads ({num_heads}) must be a positive multiple of num_key_value_heads ({num_kv_heads})"
            )));
        }
        let head_dim = match r.usize_opt("head_dim")? {
            Some(d) => d,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => return Err(r.err("hidden_size is not divisible by num_attention_heads and no head_dim given")),
        };
        let rope_theta = match r.f64_opt("rope_theta")? {
            Some(t) => t,
            None => match r.get("rope_parameters").and_then(|p| p.get("rope_theta")) {
                Some(t) => t
                    .as_f64()
                    .ok_or_else(|| r.err("rope_parameters.rope_theta must be a number"))?,
                None => 10000.0,
            },
        };
        let max_position_embeddings = r.usize_opt("max_position_embeddings")?.unwrap_or(4096);
        let (rope_scaling, rope_factor) = parse_rope(&r, max_position_embeddings)?;
        let fp8 = parse_quant(&r)?;
        let eos_token_ids = match r.get("eos_token_id") {
            None => vec![],
            Some(Value::Number(n)) => vec![n.as_u64().ok_or_else(|| r.err("eos_token_id must be >= 0"))? as u32],
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_u64()
                        .map(|x| x as u32)
                        .ok_or_else(|| r.err("eos_token_id list must hold integers"))
                })
                .collect::<Result<_>>()?,
            Some(other) => return Err(r.err(format!("eos_token_id must be an integer or a list, got {other}"))),
        };

        let mla = if arch == Arch::DeepseekV3 {
            Some(MlaConfig {
                q_lora_rank: r.usize_opt("q_lora_rank")?,
                kv_lora_rank: r.usize("kv_lora_rank")?,
                qk_nope_head_dim: r.usize("qk_nope_head_dim")?,
                qk_rope_head_dim: r.usize("qk_rope_head_dim")?,
                v_head_dim: r.usize("v_head_dim")?,
            })
        } else {
            None
        };
        if let Some(m) = &mla {
            if m.qk_rope_head_dim % 2 != 0 {
                return Err(r.err("qk_rope_head_dim must be even"));
            }
        } else if head_dim % 2 != 0 {
            return Err(r.err("head_dim must be even for RoPE"));
        }

        let n_experts = r.first_usize(&["num_experts", "num_local_experts", "n_routed_experts"])?;
        let (moe, sparse_layers) = match (arch, n_experts) {
            (Arch::Qwen3Moe, Some(e)) if e > 0 => {
                let step = r.usize_opt("decoder_sparse_step")?.unwrap_or(1).max(1);
                let only: Vec<usize> = match r.get("mlp_only_layers") {
                    None => vec![],
                    Some(Value::Array(a)) => a
                        .iter()
                        .map(|x| {
                            x.as_u64()
                                .map(|x| x as usize)
                                .ok_or_else(|| r.err("mlp_only_layers must hold integers"))
                        })
                        .collect::<Result<_>>()?,
                    Some(_) => return Err(r.err("mlp_only_layers must be a list")),
                };
                let sparse = (0..num_layers)
                    .map(|l| !only.contains(&l) && (l + 1) % step == 0)
                    .collect();
                let moe = MoeConfig {
                    n_experts: e,
                    top_k: r.usize("num_experts_per_tok")?,
                    expert_dim: r.usize("moe_intermediate_size")?,
                    norm_topk_prob: r.bool_or("norm_topk_prob", false)?,
                    n_shared: 0,
                    router: Router::SoftmaxTopK,
                    aux_loss_coef: r.f64_opt("router_aux_loss_coef")?.unwrap_or(0.001) as f32,
                };
                (Some(moe), sparse)
            }
            (Arch::DeepseekV3, Some(e)) if e > 0 => {
                let first_dense = r.usize_opt("first_k_dense_replace")?.unwrap_or(0);
                let freq = r.usize_opt("moe_layer_freq")?.unwrap_or(1).max(1);
                let sparse = (0..num_layers).map(|l| l >= first_dense && l % freq == 0).collect();
                let n_group = r.usize_opt("n_group")?.unwrap_or(1).max(1);
                let topk_group = r.usize_opt("topk_group")?.unwrap_or(n_group);
                if e % n_group != 0 || topk_group == 0 || topk_group > n_group {
                    return Err(r.err(format!(
                        "n_routed_experts {e}, n_group {n_group}, topk_group {topk_group} do not form valid groups"
                    )));
                }
                let moe = MoeConfig {
                    n_experts: e,
                    top_k: r.usize("num_experts_per_tok")?,
                    expert_dim: r.usize("moe_intermediate_size")?,
                    norm_topk_prob: r.bool_or("norm_topk_prob", true)?,
                    n_shared: r.usize_opt("n_shared_experts")?.unwrap_or(0),
                    router: Router::SigmoidGroupLimited {
                        n_group,
                        topk_group,
                        routed_scaling_factor: r.f64_opt("routed_scaling_factor")?.unwrap_or(1.0) as f32,
                    },
                    aux_loss_coef: 0.0,
                };
                (Some(moe), sparse)
            }
            _ => (None, vec![false; num_layers]),
        };
        // DeepSeek-V3 scales the softmax by mscale^2 whenever its RoPE is scaled.
        let softmax_scale_mult = match (arch, rope_factor) {
            (Arch::DeepseekV3, Some((key, factor))) => {
                let m = match r.get(key).and_then(|p| p.get("mscale_all_dim")) {
                    None | Some(Value::Null) => 0.0,
                    Some(v) => v
                        .as_f64()
                        .ok_or_else(|| r.err(format!("`{key}.mscale_all_dim` must be a number, got {v}")))?,
                };
                if m != 0.0 {
                    yarn_mscale(factor, m).powi(2)
                } else {
                    1.0
                }
            }
            _ => 1.0,
        };
        if let Some(m) = &moe {
            if m.top_k == 0 || m.top_k > m.n_experts {
                return Err(r.err(format!(
                    "num_experts_per_tok {} must be in 1..={}",
                    m.top_k, m.n_experts
                )));
            }
            if let Router::SigmoidGroupLimited {
                n_group, topk_group, ..
            } = m.router
            {
                if m.n_experts / n_group < 2 || topk_group * (m.n_experts / n_group) < m.top_k {
                    return Err(r.err("the kept expert groups hold fewer experts than num_experts_per_tok"));
                }
            }
        }

        Ok(ModelConfig {
            arch,
            vocab_size,
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads: if mla.is_some() { num_heads } else { num_kv_heads },
            head_dim,
            intermediate_size: r.usize("intermediate_size")?,
            rms_norm_eps: r.f64_opt("rms_norm_eps")?.unwrap_or(1e-6) as f32,
            rope_theta,
            rope_scaling,
            softmax_scale_mult,
            fp8,
            max_position_embeddings,
            tie_word_embeddings: r.bool_or("tie_word_embeddings", false)?,
            qkv_bias: match arch {
                Arch::Qwen2 => true,
                _ => r.bool_or("attention_bias", false)?,
            },
            qk_norm: matches!(arch, Arch::Qwen3 | Arch::Qwen3Moe),
            mla,
            moe,
            sparse_layers,
            eos_token_ids,
        })
    }

    /// The attention's (query/key width, value width, rotated width, score scale).
    pub fn attn_dims(&self) -> (usize, usize, usize, f64) {
        match &self.mla {
            Some(m) => {
                let dk = m.qk_nope_head_dim + m.qk_rope_head_dim;
                (
                    dk,
                    m.v_head_dim,
                    m.qk_rope_head_dim,
                    self.softmax_scale_mult / (dk as f64).sqrt(),
                )
            }
            None => (
                self.head_dim,
                self.head_dim,
                self.head_dim,
                self.softmax_scale_mult / (self.head_dim as f64).sqrt(),
            ),
        }
    }
}

fn reject_unsupported(r: &Reader<'_>) -> Result<()> {
    if r.bool_or("use_sliding_window", false)? {
        return Err(r.err("use_sliding_window = true is not implemented"));
    }
    if let Some(act) = r.get("hidden_act").and_then(|a| a.as_str()) {
        if act != "silu" {
            return Err(r.err(format!("hidden_act `{act}` is not implemented (silu)")));
        }
    }
    for (key, v) in [
        ("partial_rotary_factor", r.get("partial_rotary_factor")),
        (
            "rope_parameters.partial_rotary_factor",
            r.get("rope_parameters").and_then(|p| p.get("partial_rotary_factor")),
        ),
    ] {
        if let Some(v) = v.filter(|v| !v.is_null()) {
            if v.as_f64() != Some(1.0) {
                return Err(r.err(format!("`{key}` = {v} is not implemented (1.0)")));
            }
        }
    }
    if r.bool_or("mlp_bias", false)? {
        return Err(r.err("mlp_bias = true is not implemented"));
    }
    Ok(())
}

/// The RoPE scaling of `rope_parameters` (transformers 5) or `rope_scaling`
/// (earlier), whichever names a non-default type, with the key it came from
/// and its `factor` (which DeepSeek-V3's softmax scale reads).
fn parse_rope(r: &Reader<'_>, max_pos: usize) -> Result<(RopeScaling, Option<(&'static str, f64)>)> {
    for key in ["rope_parameters", "rope_scaling"] {
        let Some(p) = r.get(key) else { continue };
        if !p.is_object() {
            return Err(r.err(format!("`{key}` must be an object, got {p}")));
        }
        let kind = match p.get("rope_type").or_else(|| p.get("type")) {
            None | Some(Value::Null) => "default",
            Some(t) => t
                .as_str()
                .ok_or_else(|| r.err(format!("`{key}.rope_type` must be a string, got {t}")))?,
        };
        let num = |name: &str| -> Result<Option<f64>> {
            match p.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| r.err(format!("`{key}.{name}` must be a number, got {v}"))),
            }
        };
        let need = |name: &str| -> Result<f64> {
            num(name)?.ok_or_else(|| r.err(format!("`{key}` of type `{kind}` needs `{key}.{name}`")))
        };
        let positive = |name: &str, v: f64| -> Result<f64> {
            if v > 0.0 && v.is_finite() {
                Ok(v)
            } else {
                Err(r.err(format!("`{key}.{name}` must be positive, got {v}")))
            }
        };
        let scaling = match kind {
            "default" => continue,
            "linear" => RopeScaling::Linear {
                factor: positive("factor", need("factor")?)?,
            },
            "dynamic" => RopeScaling::Dynamic {
                factor: positive("factor", need("factor")?)?,
            },
            "llama3" => {
                let low = positive("low_freq_factor", need("low_freq_factor")?)?;
                let high = positive("high_freq_factor", need("high_freq_factor")?)?;
                if high <= low {
                    return Err(r.err(format!(
                        "`{key}.high_freq_factor` ({high}) must exceed `{key}.low_freq_factor` ({low})"
                    )));
                }
                RopeScaling::Llama3 {
                    factor: positive("factor", need("factor")?)?,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: positive(
                        "original_max_position_embeddings",
                        need("original_max_position_embeddings")?,
                    )?,
                }
            }
            "yarn" => {
                let old = positive(
                    "original_max_position_embeddings",
                    num("original_max_position_embeddings")?.unwrap_or(max_pos as f64),
                )?;
                let factor = positive("factor", num("factor")?.unwrap_or(max_pos as f64 / old))?;
                let attention_factor = match num("attention_factor")? {
                    Some(a) => a,
                    None => match (num("mscale")?, num("mscale_all_dim")?) {
                        (Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                            yarn_mscale(factor, m) / yarn_mscale(factor, all)
                        }
                        _ => yarn_mscale(factor, 1.0),
                    },
                };
                let truncate = match p.get("truncate") {
                    None | Some(Value::Null) => true,
                    Some(v) => v
                        .as_bool()
                        .ok_or_else(|| r.err(format!("`{key}.truncate` must be true or false, got {v}")))?,
                };
                RopeScaling::Yarn {
                    factor,
                    original_max_position_embeddings: old,
                    beta_fast: num("beta_fast")?.filter(|&b| b != 0.0).unwrap_or(32.0),
                    beta_slow: num("beta_slow")?.filter(|&b| b != 0.0).unwrap_or(1.0),
                    truncate,
                    attention_factor,
                }
            }
            other => {
                return Err(r.err(format!(
                    "`{key}` of type `{other}` is not implemented (default, linear, dynamic, llama3, yarn)"
                )))
            }
        };
        let factor = match &scaling {
            RopeScaling::Linear { factor }
            | RopeScaling::Dynamic { factor }
            | RopeScaling::Llama3 { factor, .. }
            | RopeScaling::Yarn { factor, .. } => *factor,
            RopeScaling::Default => 1.0,
        };
        return Ok((scaling, Some((key, factor))));
    }
    Ok((RopeScaling::Default, None))
}

/// DeepSeek-V3's block-wise FP8 `quantization_config`; any other method,
/// format or a missing block size is refused by name.
fn parse_quant(r: &Reader<'_>) -> Result<Option<Fp8Blocks>> {
    let Some(q) = r.get("quantization_config") else {
        return Ok(None);
    };
    let method = q.get("quant_method").and_then(|m| m.as_str()).unwrap_or("");
    if method != "fp8" {
        return Err(r.err(format!(
            "quantization_config.quant_method `{method}` is not implemented (quantized checkpoints load only as block-wise fp8)"
        )));
    }
    match q.get("fmt").and_then(|f| f.as_str()) {
        None | Some("e4m3") => {}
        Some(other) => return Err(r.err(format!("quantization_config.fmt `{other}` is not implemented (e4m3)"))),
    }
    let block = q
        .get("weight_block_size")
        .and_then(|b| b.as_array())
        .filter(|b| b.len() == 2)
        .and_then(|b| Some((b[0].as_u64()? as usize, b[1].as_u64()? as usize)))
        .filter(|&(a, b)| a > 0 && b > 0)
        .ok_or_else(|| {
            r.err("quantization_config.weight_block_size must be two positive integers (per-tensor fp8 is not implemented)")
        })?;
    Ok(Some(Fp8Blocks {
        rows: block.0,
        cols: block.1,
    }))
}
