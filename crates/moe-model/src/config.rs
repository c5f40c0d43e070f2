//! `config.json` of the supported Hugging Face architectures, parsed into one
//! typed [`ModelConfig`].
//!
//! Keys that change the math and are not implemented (a `rope_scaling` type
//! other than `default`, an enabled sliding window, a `quantization_config`)
//! are errors: silently ignoring them would give a model that loads and is
//! wrong. Keys that do not change the math (dropout, `use_cache`, ...) are
//! ignored.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

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
            Some(other) => {
                return Err(r.err(format!(
                    "model_type `{other}` is not supported (qwen2, qwen3, qwen3_moe, deepseek_v3)"
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
            max_position_embeddings: r.usize_opt("max_position_embeddings")?.unwrap_or(4096),
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
                (dk, m.v_head_dim, m.qk_rope_head_dim, 1.0 / (dk as f64).sqrt())
            }
            None => (
                self.head_dim,
                self.head_dim,
                self.head_dim,
                1.0 / (self.head_dim as f64).sqrt(),
            ),
        }
    }
}

fn reject_unsupported(r: &Reader<'_>) -> Result<()> {
    for key in ["rope_scaling", "rope_parameters"] {
        if let Some(p) = r.get(key) {
            let kind = p
                .get("rope_type")
                .or_else(|| p.get("type"))
                .and_then(|t| t.as_str())
                .unwrap_or("default");
            if kind != "default" {
                return Err(r.err(format!(
                    "`{key}` of type `{kind}` is not implemented (only default RoPE)"
                )));
            }
            if key == "rope_scaling" && p.get("factor").is_some() {
                return Err(r.err("`rope_scaling.factor` is not implemented (only default RoPE)"));
            }
        }
    }
    if r.bool_or("use_sliding_window", false)? {
        return Err(r.err("use_sliding_window = true is not implemented"));
    }
    if let Some(q) = r.get("quantization_config") {
        return Err(r.err(format!(
            "quantized checkpoints are not implemented (quantization_config = {q})"
        )));
    }
    if let Some(act) = r.get("hidden_act").and_then(|a| a.as_str()) {
        if act != "silu" {
            return Err(r.err(format!("hidden_act `{act}` is not implemented (silu)")));
        }
    }
    Ok(())
}
