//! The dense models (Qwen2, Qwen3 and other grouped-query models with dense
//! MLPs) on a GPU, forward only: weights uploaded once, every activation on
//! the device, the same math as the CPU forward (cuBLAS f32 products and the
//! kernels of aha-cuda-kernels, each tested against its CPU twin). Gives
//! logits and token log-probs for a right-padded batch `[B, T]`, as
//! `Model::forward` + `Model::token_logprobs` do on the CPU.
//!
//! Not here yet (CUDA backend issue): the backward, KV-cache decode, bf16
//! weights, MoE and MLA layers on the GPU. [`gpu_support`] says which models
//! this path takes.
//!
//! **Not run on a GPU yet**: written and compiled on a machine without one;
//! `tests/gpu_model.rs` compares it with the CPU forward on the fixture models
//! and prints "skipped: no GPU" where there is none.

use std::collections::HashMap;
use std::sync::Arc;

use aha_cuda_kernels::blas::{matmul_f32, MatmulShape};
use aha_cuda_kernels::cudarc::driver::CudaSlice;
use aha_cuda_kernels::launch::{self, AttnGeometry, RopeGeometry, TokenIds};
use aha_cuda_kernels::Gpu;
use aha_tensor::cpu;

use crate::config::ModelConfig;
use crate::error::{input_err, Error, Result};
use crate::model::Model;
use crate::params::{AttnSlots, FfnSlots, Layout, Linear, Slot};

fn cuda(e: aha_cuda_kernels::Error) -> Error {
    Error::Tensor(aha_tensor::Error::from(e))
}

/// Whether [`GpuModel`] takes this model: grouped-query attention with full
/// rotary embeddings and dense MLPs in every layer.
pub fn gpu_support(cfg: &ModelConfig) -> Result<()> {
    if cfg.mla.is_some() {
        return Err(input_err(
            "gpu",
            "multi-head latent attention (DeepSeek-V3) does not run on the GPU yet",
        ));
    }
    if cfg.moe.is_some() {
        return Err(input_err("gpu", "mixture-of-experts layers do not run on the GPU yet"));
    }
    if cfg.head_dim > launch::ATTENTION_MAX_D {
        return Err(input_err(
            "gpu",
            format!(
                "head_dim {} exceeds the GPU attention's {}",
                cfg.head_dim,
                launch::ATTENTION_MAX_D
            ),
        ));
    }
    Ok(())
}

/// A dense model's weights on one GPU.
pub struct GpuModel {
    gpu: Arc<Gpu>,
    /// The model's config.
    pub config: ModelConfig,
    layout: Layout,
    /// Each parameter tensor, by its offset in the CPU model's flat buffer.
    weights: HashMap<usize, CudaSlice<f32>>,
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
}

impl std::fmt::Debug for GpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuModel({:?}, {} tensors)", self.gpu, self.weights.len())
    }
}

impl GpuModel {
    /// Uploads `model` to GPU `ordinal` (each parameter tensor once, and the
    /// RoPE table up to `max_position_embeddings`).
    pub fn upload(model: &Model, ordinal: usize) -> Result<GpuModel> {
        gpu_support(&model.config)?;
        let gpu = Gpu::get(ordinal).map_err(cuda)?;
        let mut weights = HashMap::new();
        for e in &model.layout.entries {
            let t = gpu.upload(e.slot.of(&model.params)).map_err(cuda)?;
            weights.insert(e.slot.off, t);
        }
        // Tied embeddings: the lm head slot is the embedding's, already uploaded.
        let rot = model.config.head_dim;
        let (cos, sin) = cpu::rope_table::<f32>(model.config.rope_theta, rot, model.config.max_position_embeddings);
        Ok(GpuModel {
            cos: gpu.upload(&cos).map_err(cuda)?,
            sin: gpu.upload(&sin).map_err(cuda)?,
            gpu,
            config: model.config.clone(),
            layout: model.layout.clone(),
            weights,
        })
    }

    fn w(&self, s: Slot) -> Result<&CudaSlice<f32>> {
        self.weights
            .get(&s.off)
            .ok_or_else(|| input_err("gpu", format!("no uploaded tensor at offset {}", s.off)))
    }

    fn zeros(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.gpu.zeros::<f32>(n).map_err(cuda)
    }

    /// `out [n, l.out] = x [n, l.inp] W^T (+ b)`.
    fn linear(&self, x: &CudaSlice<f32>, l: &Linear, n: usize) -> Result<CudaSlice<f32>> {
        let mut out = self.zeros(n * l.out)?;
        let s = MatmulShape {
            m: n,
            k: l.inp,
            n: l.out,
            trans_a: false,
            trans_b: true,
            accumulate: false,
        };
        matmul_f32(&self.gpu, &mut out, x, self.w(l.w)?, s).map_err(cuda)?;
        if let Some(b) = l.b {
            launch::add_bias_f32(&self.gpu, &mut out, self.w(b)?, n, l.out).map_err(cuda)?;
        }
        Ok(out)
    }

    fn norm(&self, x: &CudaSlice<f32>, w: Slot, rows: usize, c: usize) -> Result<CudaSlice<f32>> {
        let mut out = self.zeros(rows * c)?;
        let mut rstd = self.zeros(rows)?;
        let eps = self.config.rms_norm_eps;
        launch::rmsnorm_forward_f32(&self.gpu, &mut out, &mut rstd, x, self.w(w)?, rows, c, eps).map_err(cuda)?;
        Ok(out)
    }

    /// The final normed hidden states `[B * T, C]` of `ids [B, T]`.
    pub fn forward_hidden(&self, ids: &[u32], b: usize, t: usize) -> Result<CudaSlice<f32>> {
        let cfg = &self.config;
        let n = b * t;
        if ids.len() != n || n == 0 {
            return Err(input_err(
                "gpu forward",
                format!("{} ids for a [{b}, {t}] batch", ids.len()),
            ));
        }
        if t > cfg.max_position_embeddings {
            return Err(input_err(
                "gpu forward",
                format!(
                    "{t} positions exceed max_position_embeddings {}",
                    cfg.max_position_embeddings
                ),
            ));
        }
        let (c, h, hk, d) = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let g = &self.gpu;
        let mut x = self.zeros(n * c)?;
        launch::embedding_forward_f32(
            g,
            &mut x,
            self.w(self.layout.embed)?,
            TokenIds::Host(ids),
            n,
            cfg.vocab_size,
            c,
        )
        .map_err(cuda)?;
        let pos: Vec<u32> = (0..n).map(|i| (i % t) as u32).collect();
        let pos = g.upload(&pos).map_err(cuda)?;
        let rope = |heads: usize| RopeGeometry {
            heads,
            head_dim: d,
            rot_offset: 0,
            rot_dim: d,
            interleaved: false,
        };
        for s in &self.layout.layers {
            let AttnSlots::Gqa { q, k, v, o, qk_norm } = &s.attn else {
                return Err(input_err("gpu forward", "only grouped-query attention runs on the GPU"));
            };
            let FfnSlots::Dense(mlp) = &s.ffn else {
                return Err(input_err("gpu forward", "only dense MLPs run on the GPU"));
            };
            let ln1 = self.norm(&x, s.ln1, n, c)?;
            let (mut ql, mut kl) = (self.linear(&ln1, q, n)?, self.linear(&ln1, k, n)?);
            let vl = self.linear(&ln1, v, n)?;
            if let Some((qw, kw)) = qk_norm {
                ql = self.norm(&ql, *qw, n * h, d)?;
                kl = self.norm(&kl, *kw, n * hk, d)?;
            }
            let (mut qr, mut kr) = (self.zeros(n * h * d)?, self.zeros(n * hk * d)?);
            launch::rope_forward_f32(g, &mut qr, &ql, &self.cos, &self.sin, &pos, n, &rope(h)).map_err(cuda)?;
            launch::rope_forward_f32(g, &mut kr, &kl, &self.cos, &self.sin, &pos, n, &rope(hk)).map_err(cuda)?;
            let (mut att, mut lse) = (self.zeros(n * h * d)?, self.zeros(b * h * t)?);
            let geo = AttnGeometry {
                b,
                t,
                h,
                hk,
                dk: d,
                dv: d,
                scale: cfg.attn_dims().3 as f32,
            };
            launch::attention_forward_f32(g, &mut att, &mut lse, &qr, &kr, &vl, &geo).map_err(cuda)?;
            let ao = self.linear(&att, o, n)?;
            launch::add_inplace_f32(g, &mut x, &ao, n * c).map_err(cuda)?;
            let ln2 = self.norm(&x, s.ln2, n, c)?;
            let (gate, up) = (self.linear(&ln2, &mlp.gate, n)?, self.linear(&ln2, &mlp.up, n)?);
            let mut act = self.zeros(n * mlp.gate.out)?;
            launch::swiglu_forward_f32(g, &mut act, &gate, &up, n * mlp.gate.out).map_err(cuda)?;
            let down = self.linear(&act, &mlp.down, n)?;
            launch::add_inplace_f32(g, &mut x, &down, n * c).map_err(cuda)?;
        }
        self.norm(&x, self.layout.norm, n, c)
    }

    /// Logits `[B * T, V]` of `ids [B, T]`, copied to the host.
    pub fn logits(&self, ids: &[u32], b: usize, t: usize) -> Result<Vec<f32>> {
        let hidden = self.forward_hidden(ids, b, t)?;
        let head = Linear {
            w: self.layout.lm_head,
            b: None,
            inp: self.config.hidden_size,
            out: self.config.vocab_size,
        };
        let logits = self.linear(&hidden, &head, b * t)?;
        self.gpu.download(&logits).map_err(cuda)
    }

    /// `log p(targets[i])` and the log-sum-exp at every position of `ids
    /// [B, T]` (as `Model::token_logprobs`), computed on the device in row
    /// chunks so that full-vocabulary logits for the whole batch never exist.
    pub fn token_logprobs(&self, ids: &[u32], b: usize, t: usize, targets: &[u32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let n = b * t;
        if targets.len() != n {
            return Err(input_err(
                "gpu token_logprobs",
                format!("{} targets for {n} positions", targets.len()),
            ));
        }
        let hidden = self.forward_hidden(ids, b, t)?;
        let (c, v) = (self.config.hidden_size, self.config.vocab_size);
        let hidden = self.gpu.download(&hidden).map_err(cuda)?;
        // Rows per chunk: at most ~256 MiB of logits at a time.
        let chunk = ((64usize << 20) / v.max(1)).clamp(1, n);
        let (mut logp, mut lse) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for r0 in (0..n).step_by(chunk) {
            let r1 = (r0 + chunk).min(n);
            let hc = self.gpu.upload(&hidden[r0 * c..r1 * c]).map_err(cuda)?;
            let head = Linear {
                w: self.layout.lm_head,
                b: None,
                inp: c,
                out: v,
            };
            let logits = self.linear(&hc, &head, r1 - r0)?;
            let (mut lp, mut ls) = (self.zeros(r1 - r0)?, self.zeros(r1 - r0)?);
            launch::token_logprob_forward_f32(&self.gpu, &mut lp, &mut ls, &logits, &targets[r0..r1], v)
                .map_err(cuda)?;
            logp.extend(self.gpu.download(&lp).map_err(cuda)?);
            lse.extend(self.gpu.download(&ls).map_err(cuda)?);
        }
        Ok((logp, lse))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: &str) -> ModelConfig {
        ModelConfig::from_json_str(json, std::path::Path::new("config.json")).unwrap()
    }

    #[test]
    fn dense_gqa_models_are_supported_and_others_refused_with_reasons() {
        let dense = cfg(
            r#"{"model_type": "qwen2", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}"#,
        );
        assert!(gpu_support(&dense).is_ok());
        let moe = cfg(
            r#"{"model_type": "qwen3_moe", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
            "moe_intermediate_size": 8, "num_experts": 4, "num_experts_per_tok": 2,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 4}"#,
        );
        assert!(gpu_support(&moe)
            .unwrap_err()
            .to_string()
            .contains("mixture-of-experts"));
    }
}
