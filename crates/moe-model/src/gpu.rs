//! Grouped-query models on a GPU: the dense ones (Qwen2, Qwen3, Llama-style)
//! forward and backward, Qwen3-MoE-style mixture-of-experts models forward
//! (the MoE layer of `aha_cuda_kernels::moe_layer`, bf16 experts). Weights
//! are uploaded once, every activation stays on the device, the math is the
//! CPU forward's (cuBLAS products and the kernels of aha-cuda-kernels, each
//! tested against its CPU twin). Gives logits and token log-probs for a
//! right-padded batch `[B, T]`, as `Model::forward` + `Model::token_logprobs`
//! do on the CPU, the backward ([`GpuModel::backward`], dense models) in the
//! CPU model's flat layout, and KV-cache decoding. MLA layers (DeepSeek-V3)
//! are not here; [`gpu_support`] says which models this path takes.
//!
//! **Not run on a GPU yet**: written and compiled on a machine without one;
//! `tests/gpu_model.rs` compares it with the CPU forward on the fixture models,
//! prints "skipped: no GPU" where there is none, and passes on the emulated
//! GPU (`AHA_EMULATED_GPU=1`).

use std::collections::HashMap;
use std::sync::Arc;

use aha_cuda_kernels::blas::{matmul_f32, MatmulShape};
use aha_cuda_kernels::cudarc::driver::CudaSlice;
use aha_cuda_kernels::flash::{self, FlashGeometry};
use aha_cuda_kernels::launch::{self, AttnGeometry, RopeGeometry, TokenIds};
use aha_cuda_kernels::launch_moe::{self, MoeGating, MoeMath, MoeStorage};
use aha_cuda_kernels::lmhead::{self, LmHeadOperands};
use aha_cuda_kernels::moe_layer::{self, MoeBuffers, MoeDims, MoeWeightsBf16};
use aha_cuda_kernels::Gpu;
use aha_tensor::cpu;

use crate::config::{ModelConfig, Router};
use crate::error::{input_err, Error, Result};
use crate::model::Model;
use crate::params::{AttnSlots, FfnSlots, LayerSlots, Layout, Linear, MlpSlots, Slot};

fn cuda(e: aha_cuda_kernels::Error) -> Error {
    Error::Tensor(aha_tensor::Error::from(e))
}

/// Whether [`GpuModel`] takes this model: grouped-query attention with full
/// rotary embeddings, dense MLPs or MoE layers within the routing kernels'
/// limits (MoE: forward only).
pub fn gpu_support(cfg: &ModelConfig) -> Result<()> {
    if cfg.mla.is_some() {
        return Err(input_err(
            "gpu",
            "multi-head latent attention (DeepSeek-V3) does not run on the GPU yet",
        ));
    }
    if let Some(m) = &cfg.moe {
        if m.n_experts > launch_moe::MOE_MAX_EXPERTS || m.top_k > launch_moe::MOE_MAX_TOP_K {
            return Err(input_err(
                "gpu",
                format!(
                    "{} experts, top-{}: the GPU routing kernels take at most {} and {}",
                    m.n_experts,
                    m.top_k,
                    launch_moe::MOE_MAX_EXPERTS,
                    launch_moe::MOE_MAX_TOP_K
                ),
            ));
        }
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

/// How the GPU model multiplies by its weight matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuPrecision {
    /// f32 weights and products (matches the CPU to 1e-4).
    F32,
    /// bf16 copies of the weight matrices; every linear layer casts its
    /// input to bf16, multiplies with f32 accumulation (cuBLAS) and casts the
    /// output back to f32; attention runs the flash kernels on bf16 q, k, v
    /// (tensor cores for head widths 64 and 128); the lm head's log-probs
    /// take bf16 operands with f32 logits. Norms, softmax statistics and the
    /// residual stream stay f32. Forward only: the backward always runs in
    /// f32, and the KV-cache decode uses the f32 attention kernels.
    Bf16,
}

/// A dense model's weights on one GPU.
pub struct GpuModel {
    gpu: Arc<Gpu>,
    precision: GpuPrecision,
    /// bf16 copies of the 2-D weights, by offset (bf16 precision only).
    weights_bf16: HashMap<usize, CudaSlice<u16>>,
    /// Each mixture-of-experts layer's weights (experts stacked, bf16), by
    /// the offset of its router.
    moe: HashMap<usize, MoeWeightsBf16>,
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
    /// RoPE table up to `max_position_embeddings`), in f32.
    pub fn upload(model: &Model, ordinal: usize) -> Result<GpuModel> {
        GpuModel::upload_with(model, ordinal, GpuPrecision::F32)
    }

    /// [`GpuModel::upload`] with the products in `precision`.
    pub fn upload_with(model: &Model, ordinal: usize, precision: GpuPrecision) -> Result<GpuModel> {
        gpu_support(&model.config)?;
        let gpu = Gpu::get(ordinal).map_err(cuda)?;
        let mut weights = HashMap::new();
        let mut weights_bf16 = HashMap::new();
        for e in &model.layout.entries {
            let host = e.slot.of(&model.params);
            weights.insert(e.slot.off, gpu.upload(host).map_err(cuda)?);
            if precision == GpuPrecision::Bf16 && e.shape.len() == 2 {
                let bits: Vec<u16> = host.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect();
                weights_bf16.insert(e.slot.off, gpu.upload(&bits).map_err(cuda)?);
            }
        }
        let mut moe = HashMap::new();
        for l in &model.layout.layers {
            if let FfnSlots::Moe {
                router,
                bias,
                experts,
                shared,
            } = &l.ffn
            {
                moe.insert(
                    router.off,
                    upload_moe(&gpu, model, *router, *bias, experts, shared.as_ref())?,
                );
            }
        }
        // Tied embeddings: the lm head slot is the embedding's, already uploaded.
        let rot = model.config.head_dim;
        let (cos, sin) = cpu::rope_table::<f32>(model.config.rope_theta, rot, model.config.max_position_embeddings);
        Ok(GpuModel {
            cos: gpu.upload(&cos).map_err(cuda)?,
            sin: gpu.upload(&sin).map_err(cuda)?,
            gpu,
            precision,
            weights_bf16,
            moe,
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

    /// The lm head as a linear layer `[C] -> [V]`.
    fn head(&self) -> Linear {
        Linear {
            w: self.layout.lm_head,
            b: None,
            inp: self.config.hidden_size,
            out: self.config.vocab_size,
        }
    }

    fn zeros(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.gpu.zeros::<f32>(n).map_err(cuda)
    }

    /// `out [n, l.out] = x [n, l.inp] W^T (+ b)`, in the model's precision.
    fn linear(&self, x: &CudaSlice<f32>, l: &Linear, n: usize) -> Result<CudaSlice<f32>> {
        let g = &self.gpu;
        let mut out = self.zeros(n * l.out)?;
        let s = MatmulShape {
            m: n,
            k: l.inp,
            n: l.out,
            trans_a: false,
            trans_b: true,
            accumulate: false,
        };
        match self.precision {
            GpuPrecision::F32 => matmul_f32(g, &mut out, x, self.w(l.w)?, s).map_err(cuda)?,
            GpuPrecision::Bf16 => {
                let w16 = self
                    .weights_bf16
                    .get(&l.w.off)
                    .ok_or_else(|| input_err("gpu", format!("no bf16 weight at offset {}", l.w.off)))?;
                let mut x16 = g.zeros::<u16>(n * l.inp).map_err(cuda)?;
                launch::cast_f32_to_bf16(g, &mut x16, x, n * l.inp).map_err(cuda)?;
                let mut o16 = g.zeros::<u16>(n * l.out).map_err(cuda)?;
                aha_cuda_kernels::blas::matmul_bf16(g, &mut o16, &x16, w16, s).map_err(cuda)?;
                launch::cast_bf16_to_f32(g, &mut out, &o16, n * l.out).map_err(cuda)?;
            }
        }
        if let Some(b) = l.b {
            launch::add_bias_f32(&self.gpu, &mut out, self.w(b)?, n, l.out).map_err(cuda)?;
        }
        Ok(out)
    }

    fn norm(&self, x: &CudaSlice<f32>, w: Slot, rows: usize, c: usize) -> Result<CudaSlice<f32>> {
        Ok(self.norm_rstd(x, w, rows, c)?.0)
    }

    fn norm_rstd(
        &self,
        x: &CudaSlice<f32>,
        w: Slot,
        rows: usize,
        c: usize,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
        let mut out = self.zeros(rows * c)?;
        let mut rstd = self.zeros(rows)?;
        let eps = self.config.rms_norm_eps;
        launch::rmsnorm_forward_f32(&self.gpu, &mut out, &mut rstd, x, self.w(w)?, rows, c, eps).map_err(cuda)?;
        Ok((out, rstd))
    }

    /// The final normed hidden states `[B * T, C]` of `ids [B, T]`.
    pub fn forward_hidden(&self, ids: &[u32], b: usize, t: usize) -> Result<CudaSlice<f32>> {
        Ok(self.forward_acts(ids, b, t, false)?.hidden)
    }

    fn rope_geometry(&self, heads: usize) -> RopeGeometry {
        RopeGeometry {
            heads,
            head_dim: self.config.head_dim,
            rot_offset: 0,
            rot_dim: self.config.head_dim,
            interleaved: false,
        }
    }

    fn attn_geometry(&self, b: usize, t: usize) -> AttnGeometry {
        let cfg = &self.config;
        AttnGeometry {
            b,
            t,
            h: cfg.num_heads,
            hk: cfg.num_kv_heads,
            dk: cfg.head_dim,
            dv: cfg.head_dim,
            scale: cfg.attn_dims().3 as f32,
        }
    }

    /// Causal attention of `b` sequences of `t` tokens with the flash
    /// kernels (`aha_cuda_kernels::flash`): q, k, v rounded to bf16, the
    /// batch packed as `b` sequences of equal length (the `[B, T, H, D]`
    /// layout is the packed `[B * T, H, D]` one), tensor cores where the
    /// head width has them; `att [B * T, H, D]` in f32.
    fn flash_attention(&self, att: &mut CudaSlice<f32>, qkv: &QkvOut, b: usize, t: usize) -> Result<()> {
        let g = &self.gpu;
        let cfg = &self.config;
        let (n, h, hk, d) = (b * t, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let to_bf16 = |x: &CudaSlice<f32>, len: usize| -> Result<CudaSlice<u16>> {
            let mut o = g.zeros::<u16>(len).map_err(cuda)?;
            launch::cast_f32_to_bf16(g, &mut o, x, len).map_err(cuda)?;
            Ok(o)
        };
        let (q, k, v) = (
            to_bf16(&qkv.qr, n * h * d)?,
            to_bf16(&qkv.kr, n * hk * d)?,
            to_bf16(&qkv.vl, n * hk * d)?,
        );
        let cu: Vec<i32> = (0..=b).map(|i| (i * t) as i32).collect();
        let cu = g.upload(&cu).map_err(cuda)?;
        let mut lse = self.zeros(h * n)?;
        let geom = FlashGeometry {
            total: n,
            nseq: b,
            max_seqlen: t,
            h,
            hk,
            dk: d,
            dv: d,
            scale: self.attn_geometry(b, t).scale,
            tensor_cores: true,
        };
        flash::flash_forward_bf16(g, att, &mut lse, &q, &k, &v, &cu, &geom).map_err(cuda)
    }

    /// The forward, keeping what the backward needs when `keep`.
    fn forward_acts(&self, ids: &[u32], b: usize, t: usize, keep: bool) -> Result<GpuActs> {
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
        let (c, h, d) = (cfg.hidden_size, cfg.num_heads, cfg.head_dim);
        let g = &self.gpu;
        let mut x = self.embed(ids)?;
        let pos: Vec<u32> = (0..n).map(|i| (i % t) as u32).collect();
        let pos = g.upload(&pos).map_err(cuda)?;
        let mut layers = Vec::new();
        for s in &self.layout.layers {
            let (qkv, o) = self.layer_qkv(&x, s, &pos, n)?;
            let (mut att, mut lse) = (self.zeros(n * h * d)?, self.zeros(b * h * t)?);
            if self.precision == GpuPrecision::Bf16 && !keep {
                // bf16 mode (forward only): flash attention on bf16 q, k, v.
                self.flash_attention(&mut att, &qkv, b, t)?;
            } else {
                launch::attention_forward_f32(
                    g,
                    &mut att,
                    &mut lse,
                    &qkv.qr,
                    &qkv.kr,
                    &qkv.vl,
                    &self.attn_geometry(b, t),
                )
                .map_err(cuda)?;
            }
            let ao = self.linear(&att, o, n)?;
            let x_in = if keep {
                Some(g.clone_dtod(&x).map_err(cuda)?)
            } else {
                None
            };
            launch::add_inplace_f32(g, &mut x, &ao, n * c).map_err(cuda)?;
            let mlp = self.layer_mlp(&x, s, n)?;
            let x_mid = if keep {
                Some(g.clone_dtod(&x).map_err(cuda)?)
            } else {
                None
            };
            launch::add_inplace_f32(g, &mut x, &mlp.down, n * c).map_err(cuda)?;
            if let (Some(x_in), Some(x_mid)) = (x_in, x_mid) {
                layers.push(GpuLayerActs {
                    x_in,
                    ln1: qkv.ln1,
                    ln1_rstd: qkv.ln1_rstd,
                    ql: qkv.ql,
                    kl: qkv.kl,
                    vl: qkv.vl,
                    qk_rstd: qkv.qk,
                    qr: qkv.qr,
                    kr: qkv.kr,
                    att,
                    lse,
                    x_mid,
                    ln2: mlp.ln2,
                    ln2_rstd: mlp.ln2_rstd,
                    gate: mlp.gate,
                    up: mlp.up,
                    act: mlp.act,
                });
            }
        }
        let (hidden, rstd) = self.norm_rstd(&x, self.layout.norm, n, c)?;
        Ok(GpuActs {
            hidden,
            x_last: x,
            rstd,
            pos,
            layers,
        })
    }

    /// Logits `[B * T, V]` of `ids [B, T]`, copied to the host.
    pub fn logits(&self, ids: &[u32], b: usize, t: usize) -> Result<Vec<f32>> {
        let hidden = self.forward_hidden(ids, b, t)?;
        let logits = self.linear(&hidden, &self.head(), b * t)?;
        self.gpu.download(&logits).map_err(cuda)
    }

    /// `log p(targets[i])` and the log-sum-exp at every position of `ids
    /// [B, T]` (as `Model::token_logprobs`), computed on the device in row
    /// chunks so that full-vocabulary logits for the whole batch never exist;
    /// only the two result vectors come back to the host.
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
        // Vocabulary chunks straight from the hidden states
        // (`aha_cuda_kernels::lmhead`): at most 256 MiB of logits; the
        // operands in the model's precision (bf16: the hidden states rounded,
        // the head's bf16 copy, f32 logits).
        let g = &self.gpu;
        let plan = lmhead::plan_lm_head(n, c, v, 1.0, lmhead::DEFAULT_BUDGET_BYTES).map_err(cuda)?;
        let (mut lp, mut ent, mut ls) = (self.zeros(n)?, self.zeros(n)?, self.zeros(n)?);
        let head = self.head();
        let h16;
        let x = match self.precision {
            GpuPrecision::F32 => LmHeadOperands::F32 {
                hidden: &hidden,
                weight: self.w(head.w)?,
            },
            GpuPrecision::Bf16 => {
                let mut h = g.zeros::<u16>(n * c).map_err(cuda)?;
                launch::cast_f32_to_bf16(g, &mut h, &hidden, n * c).map_err(cuda)?;
                h16 = h;
                LmHeadOperands::Bf16 {
                    hidden: &h16,
                    weight: self
                        .weights_bf16
                        .get(&head.w.off)
                        .ok_or_else(|| input_err("gpu", "no bf16 copy of the lm head"))?,
                }
            }
        };
        lmhead::lm_head_logprob_forward_f32(g, &mut lp, &mut ent, &mut ls, x, targets, &plan).map_err(cuda)?;
        Ok((g.download(&lp).map_err(cuda)?, g.download(&ls).map_err(cuda)?))
    }
}

/// One sequence's keys and values on the device, per layer
/// `[max_position_embeddings, Hk, D]`, filled up to `len`.
pub struct GpuKvCache {
    k: Vec<CudaSlice<f32>>,
    v: Vec<CudaSlice<f32>>,
    /// Positions held.
    pub len: usize,
    cap: usize,
}

impl GpuModel {
    /// An empty cache for one sequence of up to `max_position_embeddings`.
    pub fn new_cache(&self) -> Result<GpuKvCache> {
        let cfg = &self.config;
        let cap = cfg.max_position_embeddings;
        let w = cap * cfg.num_kv_heads * cfg.head_dim;
        let mut k = Vec::with_capacity(cfg.num_layers);
        let mut v = Vec::with_capacity(cfg.num_layers);
        for _ in 0..cfg.num_layers {
            k.push(self.zeros(w)?);
            v.push(self.zeros(w)?);
        }
        Ok(GpuKvCache { k, v, len: 0, cap })
    }

    /// Runs `ids` (the next tokens of one sequence) through the model,
    /// writing their keys and values into `cache` and attending over it;
    /// returns the logits of the last of them `[V]` (as `Model::forward_cached`).
    pub fn forward_cached(&self, ids: &[u32], cache: &mut GpuKvCache) -> Result<Vec<f32>> {
        let cfg = &self.config;
        let n = ids.len();
        let start = cache.len;
        if n == 0 || start + n > cache.cap {
            return Err(input_err(
                "gpu forward_cached",
                format!("{n} new tokens after {start} do not fit {} positions", cache.cap),
            ));
        }
        let (c, h, hk, d) = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let g = &self.gpu;
        let mut x = self.embed(ids)?;
        let pos: Vec<u32> = (start..start + n).map(|p| p as u32).collect();
        let pos = g.upload(&pos).map_err(cuda)?;
        for (l, s) in self.layout.layers.iter().enumerate() {
            let (qkv, o) = self.layer_qkv(&x, s, &pos, n)?;
            g.copy_into(&mut cache.k[l], start * hk * d, &qkv.kr).map_err(cuda)?;
            g.copy_into(&mut cache.v[l], start * hk * d, &qkv.vl).map_err(cuda)?;
            let mut att = self.zeros(n * h * d)?;
            let geo = self.attn_geometry(1, start + n);
            launch::attention_decode_f32(g, &mut att, &qkv.qr, &cache.k[l], &cache.v[l], start, n, &geo)
                .map_err(cuda)?;
            let ao = self.linear(&att, o, n)?;
            launch::add_inplace_f32(g, &mut x, &ao, n * c).map_err(cuda)?;
            let mlp = self.layer_mlp(&x, s, n)?;
            launch::add_inplace_f32(g, &mut x, &mlp.down, n * c).map_err(cuda)?;
        }
        cache.len = start + n;
        // Only the last token's logits.
        let last = g.clone_range(&x, (n - 1) * c..n * c).map_err(cuda)?;
        let hidden = self.norm(&last, self.layout.norm, 1, c)?;
        let logits = self.linear(&hidden, &self.head(), 1)?;
        g.download(&logits).map_err(cuda)
    }

    /// Greedy decoding of `max_new` tokens after `prompt` with the KV cache
    /// on the device (as `Model::greedy(prompt, max_new, true)`).
    pub fn greedy(&self, prompt: &[u32], max_new: usize) -> Result<Vec<u32>> {
        let mut cache = self.new_cache()?;
        let mut logits = self.forward_cached(prompt, &mut cache)?;
        let mut out = Vec::with_capacity(max_new);
        for step in 0..max_new {
            let next = logits
                .iter()
                .enumerate()
                .fold(
                    (0usize, f32::NEG_INFINITY),
                    |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) },
                )
                .0 as u32;
            out.push(next);
            if step + 1 < max_new {
                logits = self.forward_cached(&[next], &mut cache)?;
            }
        }
        Ok(out)
    }
}

/// A layer's attention inputs: the normed input, the projections, Qwen3's
/// q/k norms, and the rotated queries and keys.
struct QkvOut {
    ln1: CudaSlice<f32>,
    ln1_rstd: CudaSlice<f32>,
    ql: CudaSlice<f32>,
    kl: CudaSlice<f32>,
    vl: CudaSlice<f32>,
    qk: Option<QkNormActs>,
    qr: CudaSlice<f32>,
    kr: CudaSlice<f32>,
}

/// A layer's MLP activations and output (before the residual add).
struct MlpOut {
    ln2: CudaSlice<f32>,
    ln2_rstd: CudaSlice<f32>,
    gate: CudaSlice<f32>,
    up: CudaSlice<f32>,
    act: CudaSlice<f32>,
    down: CudaSlice<f32>,
}

impl GpuModel {
    /// Token embeddings `[n, C]`.
    fn embed(&self, ids: &[u32]) -> Result<CudaSlice<f32>> {
        let (c, n) = (self.config.hidden_size, ids.len());
        let mut x = self.zeros(n * c)?;
        let table = self.w(self.layout.embed)?;
        launch::embedding_forward_f32(
            &self.gpu,
            &mut x,
            table,
            TokenIds::Host(ids),
            n,
            self.config.vocab_size,
            c,
        )
        .map_err(cuda)?;
        Ok(x)
    }

    /// The attention inputs of layer `s` for `x [n, C]` at positions `pos`,
    /// and its output projection.
    fn layer_qkv<'s>(
        &self,
        x: &CudaSlice<f32>,
        s: &'s LayerSlots,
        pos: &CudaSlice<u32>,
        n: usize,
    ) -> Result<(QkvOut, &'s Linear)> {
        let AttnSlots::Gqa { q, k, v, o, qk_norm } = &s.attn else {
            return Err(input_err("gpu", "only grouped-query attention runs on the GPU"));
        };
        let cfg = &self.config;
        let (c, h, hk, d) = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let g = &self.gpu;
        let (ln1, ln1_rstd) = self.norm_rstd(x, s.ln1, n, c)?;
        let (ql, kl, vl) = (
            self.linear(&ln1, q, n)?,
            self.linear(&ln1, k, n)?,
            self.linear(&ln1, v, n)?,
        );
        let qk = match qk_norm {
            Some((qw, kw)) => {
                let (qn, q_rstd) = self.norm_rstd(&ql, *qw, n * h, d)?;
                let (kn, k_rstd) = self.norm_rstd(&kl, *kw, n * hk, d)?;
                Some((qn, q_rstd, kn, k_rstd))
            }
            None => None,
        };
        let (qn, kn) = match &qk {
            Some((qn, _, kn, _)) => (qn, kn),
            None => (&ql, &kl),
        };
        let (mut qr, mut kr) = (self.zeros(n * h * d)?, self.zeros(n * hk * d)?);
        launch::rope_forward_f32(g, &mut qr, qn, &self.cos, &self.sin, pos, n, &self.rope_geometry(h)).map_err(cuda)?;
        launch::rope_forward_f32(g, &mut kr, kn, &self.cos, &self.sin, pos, n, &self.rope_geometry(hk))
            .map_err(cuda)?;
        let out = QkvOut {
            ln1,
            ln1_rstd,
            ql,
            kl,
            vl,
            qk,
            qr,
            kr,
        };
        Ok((out, o))
    }

    /// Layer `s`'s MLP on `x [n, C]` (the output before the residual add).
    fn layer_mlp(&self, x: &CudaSlice<f32>, s: &LayerSlots, n: usize) -> Result<MlpOut> {
        let c = self.config.hidden_size;
        let mlp = match &s.ffn {
            FfnSlots::Dense(mlp) => mlp,
            FfnSlots::Moe { router, .. } => {
                // The MoE layer (aha_cuda_kernels::moe_layer): routing and
                // permutation on the device, bf16 grouped expert products.
                let (ln2, ln2_rstd) = self.norm_rstd(x, s.ln2, n, c)?;
                let (Some(m), Some(w)) = (&self.config.moe, self.moe.get(&router.off)) else {
                    return Err(input_err("gpu", "a mixture-of-experts layer without its weights"));
                };
                let dims = MoeDims {
                    n,
                    c,
                    e: m.n_experts,
                    k: m.top_k,
                    f: m.expert_dim,
                    f_shared: m.n_shared * m.expert_dim,
                    gating: match m.router {
                        Router::SoftmaxTopK => MoeGating::Softmax {
                            renorm: m.norm_topk_prob,
                        },
                        Router::SigmoidGroupLimited {
                            n_group,
                            topk_group,
                            routed_scaling_factor,
                        } => MoeGating::SigmoidGroup {
                            n_group,
                            topk_group,
                            renorm: m.norm_topk_prob,
                            scaling: routed_scaling_factor,
                        },
                    },
                    math: MoeMath::TensorCores,
                    storage: MoeStorage::Bf16,
                };
                let mut buf = MoeBuffers::new(&self.gpu, dims).map_err(cuda)?;
                let mut down = self.zeros(n * c)?;
                moe_layer::moe_layer_forward(&self.gpu, &mut down, &ln2, &w.view(), &mut buf).map_err(cuda)?;
                let empty = || self.zeros(1);
                return Ok(MlpOut {
                    ln2,
                    ln2_rstd,
                    gate: empty()?,
                    up: empty()?,
                    act: empty()?,
                    down,
                });
            }
        };
        let (ln2, ln2_rstd) = self.norm_rstd(x, s.ln2, n, c)?;
        let (gate, up) = (self.linear(&ln2, &mlp.gate, n)?, self.linear(&ln2, &mlp.up, n)?);
        let mut act = self.zeros(n * mlp.gate.out)?;
        launch::swiglu_forward_f32(&self.gpu, &mut act, &gate, &up, n * mlp.gate.out).map_err(cuda)?;
        let down = self.linear(&act, &mlp.down, n)?;
        Ok(MlpOut {
            ln2,
            ln2_rstd,
            gate,
            up,
            act,
            down,
        })
    }
}

/// Qwen3's q/k norms' outputs and rstds: (q, q rstd, k, k rstd).
type QkNormActs = (CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>);

/// One layer's saved activations on the device.
struct GpuLayerActs {
    x_in: CudaSlice<f32>,
    ln1: CudaSlice<f32>,
    ln1_rstd: CudaSlice<f32>,
    ql: CudaSlice<f32>,
    kl: CudaSlice<f32>,
    vl: CudaSlice<f32>,
    /// Normed q and its rstd, normed k and its rstd (Qwen3).
    qk_rstd: Option<QkNormActs>,
    qr: CudaSlice<f32>,
    kr: CudaSlice<f32>,
    att: CudaSlice<f32>,
    lse: CudaSlice<f32>,
    x_mid: CudaSlice<f32>,
    ln2: CudaSlice<f32>,
    ln2_rstd: CudaSlice<f32>,
    gate: CudaSlice<f32>,
    up: CudaSlice<f32>,
    act: CudaSlice<f32>,
}

/// A forward's outputs and, for the backward, its activations.
struct GpuActs {
    hidden: CudaSlice<f32>,
    x_last: CudaSlice<f32>,
    rstd: CudaSlice<f32>,
    pos: CudaSlice<u32>,
    layers: Vec<GpuLayerActs>,
}

impl GpuModel {
    /// Zeroed gradient buffers, one per parameter tensor.
    fn zero_grads(&self) -> Result<HashMap<usize, CudaSlice<f32>>> {
        self.layout
            .entries
            .iter()
            .map(|e| Ok((e.slot.off, self.zeros(e.slot.len)?)))
            .collect()
    }

    fn grad(grads: &mut HashMap<usize, CudaSlice<f32>>, s: Slot) -> Result<&mut CudaSlice<f32>> {
        grads
            .get_mut(&s.off)
            .ok_or_else(|| input_err("gpu backward", format!("no gradient buffer at offset {}", s.off)))
    }

    /// Backward of `y = x W^T + b`: returns `dx` (assigned unless `dx_acc`
    /// is given, then added into it); `dW +=`, `db +=`.
    fn linear_back(
        &self,
        grads: &mut HashMap<usize, CudaSlice<f32>>,
        dy: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        l: &Linear,
        n: usize,
        dx_acc: Option<&mut CudaSlice<f32>>,
    ) -> Result<Option<CudaSlice<f32>>> {
        let g = &self.gpu;
        // dW [out, inp] += dy^T [out, n] x [n, inp]
        let sw = MatmulShape {
            m: l.out,
            k: n,
            n: l.inp,
            trans_a: true,
            trans_b: false,
            accumulate: true,
        };
        matmul_f32(g, Self::grad(grads, l.w)?, dy, x, sw).map_err(cuda)?;
        if let Some(b) = l.b {
            launch::bias_grad_f32(g, Self::grad(grads, b)?, dy, n, l.out).map_err(cuda)?;
        }
        // dx [n, inp] (+)= dy [n, out] W [out, inp]
        let mut sx = MatmulShape {
            m: n,
            k: l.out,
            n: l.inp,
            trans_a: false,
            trans_b: false,
            accumulate: false,
        };
        match dx_acc {
            Some(acc) => {
                sx.accumulate = true;
                matmul_f32(g, acc, dy, self.w(l.w)?, sx).map_err(cuda)?;
                Ok(None)
            }
            None => {
                let mut dx = self.zeros(n * l.inp)?;
                matmul_f32(g, &mut dx, dy, self.w(l.w)?, sx).map_err(cuda)?;
                Ok(Some(dx))
            }
        }
    }

    /// RMSNorm backward: `dx` assigned, the weight's gradient accumulated.
    #[allow(clippy::too_many_arguments)]
    fn norm_back(
        &self,
        grads: &mut HashMap<usize, CudaSlice<f32>>,
        dy: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        rstd: &CudaSlice<f32>,
        w: Slot,
        rows: usize,
        c: usize,
    ) -> Result<CudaSlice<f32>> {
        let mut dx = self.zeros(rows * c)?;
        let weight = self.w(w)?;
        launch::rmsnorm_backward_f32(&self.gpu, &mut dx, Self::grad(grads, w)?, dy, x, weight, rstd, rows, c)
            .map_err(cuda)?;
        Ok(dx)
    }

    /// Gradients of `sum_i dlogp[i] * log p(targets[i])` with respect to
    /// every parameter, in the CPU model's flat layout (as `Model::backward`
    /// into a zeroed buffer): forward with saved activations, lm head and
    /// log-softmax backward, then the layers in reverse, all on the device.
    pub fn backward(&self, ids: &[u32], b: usize, t: usize, targets: &[u32], dlogp: &[f32]) -> Result<Vec<f32>> {
        let cfg = &self.config;
        let n = b * t;
        if targets.len() != n || dlogp.len() != n {
            return Err(input_err(
                "gpu backward",
                format!("{} targets and {} dlogp for {n} positions", targets.len(), dlogp.len()),
            ));
        }
        let (c, h, hk, d, v) = (
            cfg.hidden_size,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.vocab_size,
        );
        let g = &self.gpu;
        if self.precision != GpuPrecision::F32 {
            return Err(input_err(
                "gpu backward",
                "the backward runs in f32: upload the model with GpuPrecision::F32",
            ));
        }
        if cfg.moe.is_some() {
            return Err(input_err(
                "gpu backward",
                "mixture-of-experts layers run forward only on the GPU (the MoE layer's backward kernels exist, aha_cuda_kernels::moe_layer, but the model does not chain them yet)",
            ));
        }
        let acts = self.forward_acts(ids, b, t, true)?;
        let mut grads = self.zero_grads()?;
        // The head in vocabulary chunks (`aha_cuda_kernels::lmhead`): the
        // forward for lse, then the backward recomputing each chunk's
        // logits; [N, V] logits never exist.
        let head = self.head();
        let plan = lmhead::plan_lm_head(n, c, v, 1.0, lmhead::DEFAULT_BUDGET_BYTES).map_err(cuda)?;
        let (mut lp, mut ent, mut lse) = (self.zeros(n)?, self.zeros(n)?, self.zeros(n)?);
        let head_x = LmHeadOperands::F32 {
            hidden: &acts.hidden,
            weight: self.w(head.w)?,
        };
        lmhead::lm_head_logprob_forward_f32(g, &mut lp, &mut ent, &mut lse, head_x, targets, &plan).map_err(cuda)?;
        let dl = g.upload(dlogp).map_err(cuda)?;
        let de = self.zeros(n)?;
        let mut dhidden = self.zeros(n * c)?;
        lmhead::lm_head_logprob_backward_f32(
            g,
            &mut dhidden,
            Self::grad(&mut grads, head.w)?,
            head_x,
            targets,
            &lse,
            &ent,
            &dl,
            &de,
            &plan,
        )
        .map_err(cuda)?;
        let mut dx = self.norm_back(&mut grads, &dhidden, &acts.x_last, &acts.rstd, self.layout.norm, n, c)?;
        for (s, a) in self.layout.layers.iter().zip(&acts.layers).rev() {
            let (AttnSlots::Gqa { q, k, v, o, qk_norm }, FfnSlots::Dense(mlp)) = (&s.attn, &s.ffn) else {
                return Err(input_err(
                    "gpu backward",
                    "only dense grouped-query layers run on the GPU",
                ));
            };
            // MLP: x_out = x_mid + down(swiglu(gate(ln2), up(ln2))).
            let dact = self
                .linear_back(&mut grads, &dx, &a.act, &mlp.down, n, None)?
                .ok_or_else(|| input_err("gpu backward", "no MLP gradient"))?;
            let i = mlp.gate.out;
            let (mut dgate, mut dup) = (self.zeros(n * i)?, self.zeros(n * i)?);
            launch::swiglu_backward_f32(g, &mut dgate, &mut dup, &dact, &a.gate, &a.up, n * i).map_err(cuda)?;
            let mut dln2 = self
                .linear_back(&mut grads, &dgate, &a.ln2, &mlp.gate, n, None)?
                .ok_or_else(|| input_err("gpu backward", "no MLP gradient"))?;
            self.linear_back(&mut grads, &dup, &a.ln2, &mlp.up, n, Some(&mut dln2))?;
            let dmid = self.norm_back(&mut grads, &dln2, &a.x_mid, &a.ln2_rstd, s.ln2, n, c)?;
            launch::add_inplace_f32(g, &mut dx, &dmid, n * c).map_err(cuda)?;
            // Attention: x_mid = x_in + o(attn(rope(norm?(q)), rope(norm?(k)), v)).
            let datt = self
                .linear_back(&mut grads, &dx, &a.att, o, n, None)?
                .ok_or_else(|| input_err("gpu backward", "no attention gradient"))?;
            let (mut dqr, mut dkr, mut dvl) =
                (self.zeros(n * h * d)?, self.zeros(n * hk * d)?, self.zeros(n * hk * d)?);
            launch::attention_backward_f32(
                g,
                &mut dqr,
                &mut dkr,
                &mut dvl,
                &datt,
                &a.qr,
                &a.kr,
                &a.vl,
                &a.att,
                &a.lse,
                &self.attn_geometry(b, t),
            )
            .map_err(cuda)?;
            let (mut dqn, mut dkn) = (self.zeros(n * h * d)?, self.zeros(n * hk * d)?);
            launch::rope_backward_f32(
                g,
                &mut dqn,
                &dqr,
                &self.cos,
                &self.sin,
                &acts.pos,
                n,
                &self.rope_geometry(h),
            )
            .map_err(cuda)?;
            launch::rope_backward_f32(
                g,
                &mut dkn,
                &dkr,
                &self.cos,
                &self.sin,
                &acts.pos,
                n,
                &self.rope_geometry(hk),
            )
            .map_err(cuda)?;
            let (dql, dkl) = match (qk_norm, &a.qk_rstd) {
                (Some((qw, kw)), Some((_, q_rstd, _, k_rstd))) => (
                    self.norm_back(&mut grads, &dqn, &a.ql, q_rstd, *qw, n * h, d)?,
                    self.norm_back(&mut grads, &dkn, &a.kl, k_rstd, *kw, n * hk, d)?,
                ),
                _ => (dqn, dkn),
            };
            let mut dln1 = self
                .linear_back(&mut grads, &dql, &a.ln1, q, n, None)?
                .ok_or_else(|| input_err("gpu backward", "no attention gradient"))?;
            self.linear_back(&mut grads, &dkl, &a.ln1, k, n, Some(&mut dln1))?;
            self.linear_back(&mut grads, &dvl, &a.ln1, v, n, Some(&mut dln1))?;
            let din = self.norm_back(&mut grads, &dln1, &a.x_in, &a.ln1_rstd, s.ln1, n, c)?;
            launch::add_inplace_f32(g, &mut dx, &din, n * c).map_err(cuda)?;
        }
        launch::embedding_backward_f32(
            g,
            Self::grad(&mut grads, self.layout.embed)?,
            &dx,
            TokenIds::Host(ids),
            n,
            v,
            c,
        )
        .map_err(cuda)?;
        let mut flat = vec![0f32; self.layout.size];
        for e in &self.layout.entries {
            let host = g.download(Self::grad(&mut grads, e.slot)?).map_err(cuda)?;
            e.slot.of_mut(&mut flat).copy_from_slice(&host);
        }
        Ok(flat)
    }
}

/// One MoE layer's weights on the device: the router (and DeepSeek-V3's
/// correction bias) in f32, every expert's gate/up/down stacked `[E, F, C]`,
/// `[E, F, C]`, `[E, C, F]` and the shared expert, in bf16.
fn upload_moe(
    gpu: &Gpu,
    model: &Model,
    router: Slot,
    bias: Option<Slot>,
    experts: &[MlpSlots],
    shared: Option<&MlpSlots>,
) -> Result<MoeWeightsBf16> {
    let p = &model.params;
    let bf16 = |parts: &mut dyn Iterator<Item = &[f32]>| -> Result<CudaSlice<u16>> {
        let bits: Vec<u16> = parts.flatten().map(|&x| half::bf16::from_f32(x).to_bits()).collect();
        gpu.upload(&bits).map_err(cuda)
    };
    let stack = |pick: fn(&MlpSlots) -> Slot| bf16(&mut experts.iter().map(|e| pick(e).of(p)));
    Ok(MoeWeightsBf16 {
        router: gpu.upload(router.of(p)).map_err(cuda)?,
        bias: match bias {
            Some(b) => Some(gpu.upload(b.of(p)).map_err(cuda)?),
            None => None,
        },
        w_gate: stack(|e| e.gate.w)?,
        w_up: stack(|e| e.up.w)?,
        w_down: stack(|e| e.down.w)?,
        shared: match shared {
            Some(s) => Some([
                bf16(&mut std::iter::once(s.gate.w.of(p)))?,
                bf16(&mut std::iter::once(s.up.w.of(p)))?,
                bf16(&mut std::iter::once(s.down.w.of(p)))?,
            ]),
            None => None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: &str) -> ModelConfig {
        ModelConfig::from_json_str(json, std::path::Path::new("config.json")).unwrap()
    }

    #[test]
    fn gqa_models_are_supported_and_others_refused_with_reasons() {
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
        assert!(gpu_support(&moe).is_ok());
        let too_many = cfg(
            r#"{"model_type": "qwen3_moe", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
            "moe_intermediate_size": 8, "num_experts": 2048, "num_experts_per_tok": 2,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 4}"#,
        );
        assert!(gpu_support(&too_many).unwrap_err().to_string().contains("2048 experts"));
    }
}
