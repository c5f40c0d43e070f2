//! [`Model`]: a config, a parameter layout and one flat f32 buffer; the
//! training forward over a right-padded batch, the cached forward for
//! decoding, chunked log-probs and the backward to every parameter.

use std::path::{Path, PathBuf};

use aha_tensor::cpu::{self, Gemm};
use aha_tensor::profile::{self, Phase};
use rayon::prelude::*;

use crate::attn::{attn_bwd, attn_fwd, AttnActs, AttnMode, Rope};
use crate::config::ModelConfig;
use crate::error::{input_err, Result};
use crate::ffn::{mlp_bwd, mlp_fwd, moe_bwd, moe_fwd, MlpActs, MoeActs};
use crate::linear::{norm_bwd, norm_fwd};
use crate::paged::{check_spans, PagedKvCache, SeqSpan};
use crate::params::{load_params, FfnSlots, Layout};
use crate::save::{copy_folder, save_params_as, SaveOptions};

/// Rows of logits computed at a time by the chunked log-prob path: the full
/// [N, V] matrix never exists at once.
const LOGIT_CHUNK: usize = 256;

/// `x += y`, profiled as a residual add.
fn residual(x: &mut [f32], y: &[f32]) -> Result<()> {
    let _prof = profile::scope(Phase::Residual);
    Ok(cpu::add_inplace(x, y)?)
}

/// The RoPE tables `cos, sin [max_pos, rot / 2]` of a config, with its
/// RoPE scaling and attention factor applied (the CPU and the GPU model use
/// the same ones). `max_pos` is also the sequence length dynamic scaling
/// reads, as transformers reads the longest position of a forward.
pub(crate) fn rope_tables(cfg: &ModelConfig, max_pos: usize) -> (Vec<f32>, Vec<f32>) {
    let (_, _, rot, _) = cfg.attn_dims();
    let s = &cfg.rope_scaling;
    let inv_freq = s.inv_freq(cfg.rope_theta, rot, max_pos, cfg.max_position_embeddings);
    crate::rope::tables(&inv_freq, max_pos, s.attention_factor())
}

/// A loaded model. `params` is the one flat buffer; `layout` names its views.
#[derive(Debug, Clone)]
pub struct Model {
    /// The parsed config.
    pub config: ModelConfig,
    /// Where each parameter lives in `params`.
    pub layout: Layout,
    /// All parameters.
    pub params: Vec<f32>,
    /// The folder it was loaded from (tokenizer and config are copied from it on save).
    pub source_dir: Option<PathBuf>,
}

enum FfnActs {
    Dense(MlpActs),
    Moe(Box<MoeActs>),
}

struct LayerActs {
    x: Vec<f32>,
    ln1: Vec<f32>,
    ln1_rstd: Vec<f32>,
    attn: AttnActs,
    x2: Vec<f32>,
    ln2: Vec<f32>,
    ln2_rstd: Vec<f32>,
    ffn: FfnActs,
}

/// What a training forward saves for the backward.
pub struct Activations {
    b: usize,
    t: usize,
    ids: Vec<u32>,
    pos: Vec<u32>,
    layers: Vec<LayerActs>,
    x_final: Vec<f32>,
    norm_rstd: Vec<f32>,
    /// The final normed hidden state [N, C] (input of the lm-head).
    pub hidden: Vec<f32>,
}

impl Activations {
    /// Tokens routed to each expert in each MoE layer (empty for dense layers).
    pub fn expert_load(&self) -> Vec<Vec<u32>> {
        self.layers
            .iter()
            .map(|l| match &l.ffn {
                FfnActs::Moe(m) => m.load.clone(),
                FfnActs::Dense(_) => vec![],
            })
            .collect()
    }
}

/// Key/value cache of one sequence for incremental decoding: a paged cache
/// holding a single block table.
#[derive(Debug, Clone)]
pub struct KvCache {
    paged: PagedKvCache,
    table: Vec<u32>,
    len: usize,
}

impl KvCache {
    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True before the prefill.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Model {
    /// Loads `config.json` and the safetensors (single or sharded) of an HF
    /// folder. A PEFT LoRA folder (`adapter_config.json` and no
    /// `config.json`) loads the base its `base_model_name_or_path` names
    /// and the adapter on it, unmerged.
    pub fn load(dir: &Path) -> Result<Model> {
        if dir.join(crate::lora::ADAPTER_CONFIG).is_file() && !dir.join("config.json").is_file() {
            let base = crate::lora::adapter_base(dir)?;
            return Model::load(&base)?.load_adapter(dir);
        }
        let config = ModelConfig::from_path(dir)?;
        let layout = Layout::new(&config);
        let params = load_params(dir, &config, &layout)?;
        Ok(Model {
            config,
            layout,
            params,
            source_dir: Some(dir.to_path_buf()),
        })
    }

    /// A model with zero parameters (fill `params` yourself, e.g. randomly).
    pub fn zeros(config: ModelConfig) -> Model {
        let layout = Layout::new(&config);
        let params = vec![0f32; layout.size];
        Model {
            config,
            layout,
            params,
            source_dir: None,
        }
    }

    /// Saves in the HF layout, sharded above `max_shard_bytes`, each tensor
    /// in the dtype it had in the source folder (see [`SaveOptions`]), with
    /// the source folder's other files; as [`Model::save_as`] with the
    /// default options.
    pub fn save(&self, dir: &Path, max_shard_bytes: usize) -> Result<()> {
        self.save_as(
            dir,
            &SaveOptions {
                max_shard_bytes,
                ..SaveOptions::default()
            },
        )
    }

    /// Saves as a whole HF folder (a model carrying a LoRA adapter saves
    /// the adapter alone, in PEFT's format: see [`Model::save_adapter`]): the parameters in `opts.dtype`, the
    /// source's extra layers (multi-token prediction) unless dropped,
    /// `config.json` without `quantization_config`, and every other file of
    /// the source folder (tokenizer, chat template, generation config, ...).
    pub fn save_as(&self, dir: &Path, opts: &SaveOptions) -> Result<()> {
        if self.layout.lora.is_some() {
            return self.save_adapter(dir);
        }
        let src = self.source_dir.as_deref();
        let dtype = save_params_as(dir, &self.config, &self.layout, &self.params, src, opts)?;
        if let Some(src) = src {
            copy_folder(src, dir, dtype)?;
        }
        Ok(())
    }

    fn check_ids(&self, op: &'static str, ids: &[u32]) -> Result<()> {
        let v = self.config.vocab_size;
        match ids.iter().position(|&i| i as usize >= v) {
            Some(p) => Err(input_err(
                op,
                format!("token id {} at position {p} is outside the vocabulary of {v}", ids[p]),
            )),
            None => Ok(()),
        }
    }

    fn rope_table(&self, max_pos: usize) -> (Vec<f32>, Vec<f32>) {
        rope_tables(&self.config, max_pos)
    }

    fn layer_fwd(
        &self,
        l: usize,
        x: Vec<f32>,
        b: usize,
        t: usize,
        rope: &Rope<'_>,
        mode: &mut AttnMode<'_, '_>,
    ) -> Result<(Vec<f32>, LayerActs)> {
        let cfg = &self.config;
        let (c, eps, p) = (cfg.hidden_size, cfg.rms_norm_eps, &self.params[..]);
        let s = &self.layout.layers[l];
        let n = b * t;
        let (ln1, ln1_rstd) = norm_fwd(&x, p, s.ln1, c, eps)?;
        let (ao, attn) = attn_fwd(cfg, &s.attn, p, &ln1, b, t, rope, mode)?;
        let mut x2 = x.clone();
        residual(&mut x2, &ao)?;
        let (ln2, ln2_rstd) = norm_fwd(&x2, p, s.ln2, c, eps)?;
        let (fo, ffn) = match (&s.ffn, &cfg.moe) {
            (FfnSlots::Dense(m), _) => {
                let (y, a) = mlp_fwd(p, m, &ln2, n)?;
                (y, FfnActs::Dense(a))
            }
            (
                FfnSlots::Moe {
                    router,
                    bias,
                    experts,
                    shared,
                },
                Some(moe),
            ) => {
                let (y, a) = moe_fwd(moe, p, *router, *bias, experts, shared.as_ref(), &ln2, n, c)?;
                (y, FfnActs::Moe(Box::new(a)))
            }
            (FfnSlots::Moe { .. }, None) => return Err(input_err("layer_fwd", "MoE layer without MoE config")),
        };
        let mut x3 = {
            let _prof = profile::scope(Phase::Residual);
            x2.clone()
        };
        residual(&mut x3, &fo)?;
        Ok((
            x3,
            LayerActs {
                x,
                ln1,
                ln1_rstd,
                attn,
                x2,
                ln2,
                ln2_rstd,
                ffn,
            },
        ))
    }

    fn embed(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let _prof = profile::scope(Phase::Embedding);
        let c = self.config.hidden_size;
        let mut x = vec![0f32; ids.len() * c];
        cpu::embedding_forward(
            &mut x,
            self.layout.embed.of(&self.params),
            ids,
            self.config.vocab_size,
            c,
        )?;
        Ok(x)
    }

    /// Training forward over `ids [b, t]`, row-major, right-padded: causal
    /// attention means real tokens never see the padding after them, so the
    /// padding needs no mask here; give it zero weight in the loss.
    pub fn forward(&self, ids: &[u32], b: usize, t: usize) -> Result<Activations> {
        if ids.len() != b * t {
            return Err(input_err("forward", format!("{} ids for batch {b} x {t}", ids.len())));
        }
        self.check_ids("forward", ids)?;
        let (cos, sin) = self.rope_table(t);
        let pos: Vec<u32> = (0..b * t).map(|i| (i % t.max(1)) as u32).collect();
        let rope = Rope {
            cos: &cos,
            sin: &sin,
            pos: &pos,
        };
        let mut x = self.embed(ids)?;
        let mut layers = Vec::with_capacity(self.config.num_layers);
        for l in 0..self.config.num_layers {
            let (nx, acts) = self.layer_fwd(l, x, b, t, &rope, &mut AttnMode::Train)?;
            layers.push(acts);
            x = nx;
        }
        let c = self.config.hidden_size;
        let (hidden, norm_rstd) = norm_fwd(&x, &self.params, self.layout.norm, c, self.config.rms_norm_eps)?;
        Ok(Activations {
            b,
            t,
            ids: ids.to_vec(),
            pos,
            layers,
            x_final: x,
            norm_rstd,
            hidden,
        })
    }

    /// Full logits [rows, V] for `hidden [rows, C]`.
    pub fn logits_of(&self, hidden: &[f32]) -> Result<Vec<f32>> {
        let (c, v) = (self.config.hidden_size, self.config.vocab_size);
        let rows = hidden.len() / c.max(1);
        let mut out = vec![0f32; rows * v];
        cpu::matmul(
            &mut out,
            hidden,
            self.layout.lm_head.of(&self.params),
            Gemm::new(rows, c, v).tb(),
        )?;
        Ok(out)
    }

    /// log p(targets[i] | position i) and the log-sum-exp per position,
    /// computed over row chunks so that full-vocabulary logits never exist
    /// for the whole batch.
    pub fn token_logprobs(&self, acts: &Activations, targets: &[u32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let (c, v) = (self.config.hidden_size, self.config.vocab_size);
        let n = acts.b * acts.t;
        if targets.len() != n {
            return Err(input_err(
                "token_logprobs",
                format!("{} targets for {n} positions", targets.len()),
            ));
        }
        self.check_ids("token_logprobs", targets)?;
        let mut logp = vec![0f32; n];
        let mut lse = vec![0f32; n];
        for r0 in (0..n).step_by(LOGIT_CHUNK) {
            let r1 = (r0 + LOGIT_CHUNK).min(n);
            let logits = self.logits_of(&acts.hidden[r0 * c..r1 * c])?;
            cpu::token_logprob_forward(&mut logp[r0..r1], &mut lse[r0..r1], &logits, &targets[r0..r1], v)?;
        }
        Ok((logp, lse))
    }

    /// Backward from `dlogp` (d loss / d log p(targets[i])) to every
    /// parameter; gradients accumulate into `grads` (same layout as `params`).
    pub fn backward(
        &self,
        acts: &Activations,
        targets: &[u32],
        lse: &[f32],
        dlogp: &[f32],
        grads: &mut [f32],
    ) -> Result<()> {
        self.backward_with_aux(acts, targets, lse, dlogp, 0.0, grads)
    }

    /// The Switch-Transformer load-balancing loss of a softmax-routed MoE, as
    /// transformers computes it (`load_balancing_loss_func`, the tokens of
    /// all MoE layers pooled): `E * sum_e (count_e / T) * (sum_t p[t, e] / T)`,
    /// with `count_e` the (token, slot) choices of expert `e`. Padding tokens
    /// count like the others. `None` without softmax-routed MoE layers.
    pub fn aux_loss(&self, acts: &Activations) -> Option<f32> {
        let (counts, probs, tokens) = self.aux_stats(acts)?;
        let e = counts.len() as f64;
        let t = tokens as f64;
        Some(
            (e * counts
                .iter()
                .zip(&probs)
                .map(|(&c, &p)| (c as f64 / t) * (p / t))
                .sum::<f64>()) as f32,
        )
    }

    /// Pooled expert counts, probability sums and token count of the
    /// softmax-routed MoE layers.
    fn aux_stats(&self, acts: &Activations) -> Option<(Vec<u64>, Vec<f64>, usize)> {
        let moe = self
            .config
            .moe
            .as_ref()
            .filter(|m| m.router == crate::config::Router::SoftmaxTopK)?;
        let e = moe.n_experts;
        let (mut counts, mut probs, mut tokens) = (vec![0u64; e], vec![0f64; e], 0usize);
        for l in &acts.layers {
            if let FfnActs::Moe(m) = &l.ffn {
                for (c, &x) in counts.iter_mut().zip(&m.load) {
                    *c += x as u64;
                }
                for (p, x) in probs.iter_mut().zip(m.prob_sums(e)) {
                    *p += x;
                }
                tokens += acts.b * acts.t;
            }
        }
        (tokens > 0).then_some((counts, probs, tokens))
    }

    /// [`Model::backward`] plus `aux_coef` times [`Model::aux_loss`]'s gradient.
    pub fn backward_with_aux(
        &self,
        acts: &Activations,
        targets: &[u32],
        lse: &[f32],
        dlogp: &[f32],
        aux_coef: f32,
        grads: &mut [f32],
    ) -> Result<()> {
        let cfg = &self.config;
        let (c, v) = (cfg.hidden_size, cfg.vocab_size);
        let (b, t) = (acts.b, acts.t);
        let n = b * t;
        if grads.len() != self.params.len() || dlogp.len() != n || targets.len() != n || lse.len() != n {
            return Err(input_err(
                "backward",
                "grads, dlogp, targets or lse have the wrong length",
            ));
        }
        let p = &self.params[..];
        // lm-head, chunk by chunk: dlogits = dlogp (onehot - softmax).
        let mut dh = vec![0f32; n * c];
        for r0 in (0..n).step_by(LOGIT_CHUNK) {
            let r1 = (r0 + LOGIT_CHUNK).min(n);
            let rows = r1 - r0;
            if dlogp[r0..r1].iter().all(|&d| d == 0.0) {
                continue;
            }
            let h = &acts.hidden[r0 * c..r1 * c];
            let logits = self.logits_of(h)?;
            let mut dl = vec![0f32; rows * v];
            cpu::token_logprob_backward(&mut dl, &dlogp[r0..r1], &logits, &lse[r0..r1], &targets[r0..r1], v)?;
            cpu::matmul(
                &mut dh[r0 * c..r1 * c],
                &dl,
                self.layout.lm_head.of(p),
                Gemm::new(rows, v, c),
            )?;
            cpu::matmul(
                self.layout.lm_head.of_mut(grads),
                &dl,
                h,
                Gemm::new(v, rows, c).ta().acc(),
            )?;
        }
        self.backward_from_hidden(acts, &dh, aux_coef, grads)
    }

    /// The backward from `dh [N, C]`, the gradient of the final normed
    /// hidden states (what the lm head's backward produces), through every
    /// layer to the embedding: gradients accumulate into `grads`;
    /// `aux_coef` adds that multiple of [`Model::aux_loss`]'s gradient.
    pub fn backward_from_hidden(&self, acts: &Activations, dh: &[f32], aux_coef: f32, grads: &mut [f32]) -> Result<()> {
        // d aux / d p[t, e] = coef * E * count_e / T^2, the same for every token.
        let aux_dprob: Option<Vec<f32>> = if aux_coef != 0.0 {
            self.aux_stats(acts).map(|(counts, _, tokens)| {
                let (e, t) = (counts.len() as f64, tokens as f64);
                counts
                    .iter()
                    .map(|&c| (aux_coef as f64 * e * c as f64 / (t * t)) as f32)
                    .collect()
            })
        } else {
            None
        };
        let cfg = &self.config;
        let (c, v) = (cfg.hidden_size, cfg.vocab_size);
        let (b, t) = (acts.b, acts.t);
        let n = b * t;
        if grads.len() != self.params.len() || dh.len() != n * c {
            return Err(input_err("backward", "grads or dh have the wrong length"));
        }
        let p = &self.params[..];
        let mut dx = norm_bwd(dh, &acts.x_final, &acts.norm_rstd, p, grads, self.layout.norm, c)?;
        let (cos, sin) = self.rope_table(t);
        let rope = Rope {
            cos: &cos,
            sin: &sin,
            pos: &acts.pos,
        };
        for l in (0..cfg.num_layers).rev() {
            let a = &acts.layers[l];
            let s = &self.layout.layers[l];
            // x3 = x2 + ffn(ln2(x2)): dx2 = dx + ln2_bwd(ffn_bwd(dx)).
            let mut dln2 = vec![0f32; n * c];
            match (&s.ffn, &a.ffn, &cfg.moe) {
                (FfnSlots::Dense(m), FfnActs::Dense(fa), _) => mlp_bwd(p, grads, m, fa, &a.ln2, &dx, n, &mut dln2)?,
                (
                    FfnSlots::Moe {
                        router,
                        experts,
                        shared,
                        ..
                    },
                    FfnActs::Moe(ma),
                    Some(moe),
                ) => moe_bwd(
                    moe,
                    p,
                    grads,
                    *router,
                    experts,
                    shared.as_ref(),
                    ma,
                    aux_dprob.as_deref(),
                    &a.ln2,
                    &dx,
                    n,
                    c,
                    &mut dln2,
                )?,
                _ => return Err(input_err("backward", "activations do not match the layer kind")),
            }
            let dx2_part = norm_bwd(&dln2, &a.x2, &a.ln2_rstd, p, grads, s.ln2, c)?;
            residual(&mut dx, &dx2_part)?;
            // x2 = x + attn(ln1(x)).
            let dln1 = attn_bwd(cfg, &s.attn, p, grads, &a.attn, &a.ln1, &dx, b, t, &rope)?;
            let dx_part = norm_bwd(&dln1, &a.x, &a.ln1_rstd, p, grads, s.ln1, c)?;
            residual(&mut dx, &dx_part)?;
        }
        let _prof = profile::scope(Phase::Embedding);
        let e = self.layout.embed;
        // A frozen embedding (a LoRA layout) needs no gradient.
        if e.off + e.len <= self.layout.trainable {
            cpu::embedding_backward(e.of_mut(grads), &dx, &acts.ids, v, c)?;
        }
        Ok(())
    }

    /// Mean next-token negative log-likelihood over `ids [b, t]` and its
    /// gradient, accumulated into `grads` (the fixtures' loss).
    pub fn next_token_loss(&self, ids: &[u32], b: usize, t: usize, grads: &mut [f32]) -> Result<f32> {
        let acts = self.forward(ids, b, t)?;
        let n = b * t;
        let mut targets = vec![0u32; n];
        let mut dlogp = vec![0f32; n];
        let count = (b * t.saturating_sub(1)).max(1) as f32;
        for r in 0..b {
            for i in 0..t.saturating_sub(1) {
                targets[r * t + i] = ids[r * t + i + 1];
                dlogp[r * t + i] = -1.0 / count;
            }
        }
        let (logp, lse) = self.token_logprobs(&acts, &targets)?;
        let loss = -logp
            .iter()
            .zip(&dlogp)
            .filter(|(_, &d)| d != 0.0)
            .map(|(&l, _)| l as f64)
            .sum::<f64>()
            / count as f64;
        self.backward(&acts, &targets, &lse, &dlogp, grads)?;
        Ok(loss as f32)
    }

    /// DeepSeek-V3's auxiliary-loss-free balancing: after a step, move each
    /// MoE layer's `e_score_correction_bias` by `speed` towards balance
    /// (down for experts above the mean load, up for those below; the
    /// report's speed is 0.001). `load` comes from [`Activations::expert_load`].
    pub fn update_expert_bias(&mut self, load: &[Vec<u32>], speed: f32) -> Result<()> {
        if load.len() != self.layout.layers.len() {
            return Err(input_err("update_expert_bias", "one load vector per layer expected"));
        }
        for (l, counts) in self.layout.layers.iter().zip(load) {
            let FfnSlots::Moe { bias: Some(bias), .. } = &l.ffn else {
                continue;
            };
            if counts.len() != bias.len {
                return Err(input_err(
                    "update_expert_bias",
                    format!("{} loads for {} experts", counts.len(), bias.len),
                ));
            }
            let mean = counts.iter().map(|&c| c as f64).sum::<f64>() / counts.len().max(1) as f64;
            for (b, &c) in bias.of_mut(&mut self.params).iter_mut().zip(counts) {
                let c = c as f64;
                if c > mean {
                    *b -= speed;
                } else if c < mean {
                    *b += speed;
                }
            }
        }
        Ok(())
    }

    /// An empty paged cache for this model: `blocks` blocks of `block_size`
    /// positions (storage is reserved as blocks are first used).
    pub fn new_paged_cache(&self, block_size: usize, blocks: usize) -> PagedKvCache {
        let (dk, dv, _, _) = self.config.attn_dims();
        let hk = if self.config.mla.is_some() {
            self.config.num_heads
        } else {
            self.config.num_kv_heads
        };
        PagedKvCache::new(self.config.num_layers, hk * dk, hk * dv, block_size, blocks)
    }

    /// Runs a ragged batch: the new `tokens` of several sequences, laid out
    /// sequence after sequence as `spans` describes, writing their keys and
    /// values into `cache` and attending to each sequence's cached positions.
    /// Returns the logits of each sequence's last new token, [spans, V].
    pub fn forward_paged(&self, tokens: &[u32], spans: &[SeqSpan<'_>], cache: &mut PagedKvCache) -> Result<Vec<f32>> {
        self.check_ids("forward_paged", tokens)?;
        check_spans(cache, spans, tokens.len())?;
        let (kw, vw) = cache.widths();
        let (dk, dv, _, _) = self.config.attn_dims();
        let hk = if self.config.mla.is_some() {
            self.config.num_heads
        } else {
            self.config.num_kv_heads
        };
        if kw != hk * dk || vw != hk * dv || cache.layers.len() != self.config.num_layers {
            return Err(input_err("forward_paged", "the cache was made for another model"));
        }
        let n = tokens.len();
        let groups = paged_groups(spans, n, rayon::current_num_threads());
        let bs = cache.block_size();
        let mut logits = Vec::with_capacity(spans.len() * self.config.vocab_size);
        if groups.len() == 1 {
            let (l, kv) = self.forward_group(tokens, spans, cache)?;
            write_new_kv(cache, spans, &kv, bs);
            return Ok(l);
        }
        // Small ragged batches (decode): whole-forward data parallelism over
        // groups of sequences, each group on a single-thread pool with serial
        // kernels. One fork-join per step instead of one per kernel; the
        // cache is read-only until every group is done.
        let pools = serial_pools(groups.len());
        let shared: &PagedKvCache = cache;
        let results: Vec<Result<(Vec<f32>, Vec<LayerKv>)>> = std::thread::scope(|sc| {
            let handles: Vec<_> = groups[1..]
                .iter()
                .zip(&pools[1..])
                .map(|(&(s0, s1, t0, t1), pool)| {
                    sc.spawn(move || pool.install(|| self.forward_group(&tokens[t0..t1], &spans[s0..s1], shared)))
                })
                .collect();
            let (s0, s1, t0, t1) = groups[0];
            let mut out = vec![pools[0].install(|| self.forward_group(&tokens[t0..t1], &spans[s0..s1], shared))];
            for h in handles {
                out.push(
                    h.join()
                        .unwrap_or_else(|_| Err(input_err("forward_paged", "a worker thread panicked"))),
                );
            }
            out
        });
        for (&(s0, s1, _, _), r) in groups.iter().zip(results) {
            let (l, kv) = r?;
            write_new_kv(cache, &spans[s0..s1], &kv, bs);
            logits.extend_from_slice(&l);
        }
        Ok(logits)
    }

    /// The forward of one group of spans over a read-only cache: the logits
    /// of each span's last token, and every layer's new keys and values.
    fn forward_group(
        &self,
        tokens: &[u32],
        spans: &[SeqSpan<'_>],
        cache: &PagedKvCache,
    ) -> Result<(Vec<f32>, Vec<LayerKv>)> {
        let n = tokens.len();
        let max_pos = spans.iter().map(|s| s.start + s.len).max().unwrap_or(0);
        let (cos, sin) = self.rope_table(max_pos);
        let pos: Vec<u32> = spans
            .iter()
            .flat_map(|s| (s.start..s.start + s.len).map(|p| p as u32))
            .collect();
        let rope = Rope {
            cos: &cos,
            sin: &sin,
            pos: &pos,
        };
        let bs = cache.block_size();
        let mut new_kv = Vec::with_capacity(self.config.num_layers);
        let mut x = self.embed(tokens)?;
        for l in 0..self.config.num_layers {
            let mut mode = AttnMode::Paged {
                layer: &cache.layers[l],
                spans,
                block_size: bs,
                new_kv: &mut new_kv,
            };
            let (nx, _) = self.layer_fwd(l, x, 1, n, &rope, &mut mode)?;
            x = nx;
        }
        let c = self.config.hidden_size;
        let mut last = Vec::with_capacity(spans.len() * c);
        let mut end = 0;
        for s in spans {
            end += s.len;
            last.extend_from_slice(&x[(end - 1) * c..end * c]);
        }
        let (h, _) = norm_fwd(&last, &self.params, self.layout.norm, c, self.config.rms_norm_eps)?;
        Ok((self.logits_of(&h)?, new_kv))
    }

    /// A fresh cache for one sequence (up to `max_position_embeddings`).
    pub fn new_cache(&self) -> KvCache {
        let bs = 16;
        KvCache {
            paged: self.new_paged_cache(bs, self.config.max_position_embeddings.div_ceil(bs).max(1)),
            table: Vec::new(),
            len: 0,
        }
    }

    /// Runs `ids` (the next tokens of one sequence) through the model using
    /// and extending `cache`; returns the logits of the last of them [V].
    pub fn forward_cached(&self, ids: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        if ids.is_empty() {
            return Err(input_err("forward_cached", "no tokens"));
        }
        while cache.paged.blocks_for(cache.len + ids.len()) > cache.table.len() {
            let b = cache.paged.alloc()?;
            cache.table.push(b);
        }
        let span = SeqSpan {
            table: &cache.table,
            start: cache.len,
            len: ids.len(),
        };
        let logits = self.forward_paged(ids, &[span], &mut cache.paged)?;
        cache.len += ids.len();
        Ok(logits)
    }

    /// Greedy decoding of `max_new` tokens after `prompt`, with the KV cache
    /// (`cached`) or by re-running the whole prefix each step.
    pub fn greedy(&self, prompt: &[u32], max_new: usize, cached: bool) -> Result<Vec<u32>> {
        let argmax = |l: &[f32]| {
            l.iter()
                .enumerate()
                .fold(
                    (0usize, f32::NEG_INFINITY),
                    |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) },
                )
                .0 as u32
        };
        let mut out = Vec::with_capacity(max_new);
        if cached {
            let mut cache = self.new_cache();
            let mut logits = self.forward_cached(prompt, &mut cache)?;
            for _ in 0..max_new {
                let tok = argmax(&logits);
                out.push(tok);
                logits = self.forward_cached(&[tok], &mut cache)?;
            }
        } else {
            let mut seq = prompt.to_vec();
            for _ in 0..max_new {
                let acts = self.forward(&seq, 1, seq.len())?;
                let c = self.config.hidden_size;
                let logits = self.logits_of(&acts.hidden[(seq.len() - 1) * c..])?;
                let tok = argmax(&logits);
                out.push(tok);
                seq.push(tok);
            }
        }
        Ok(out)
    }

    /// The norm of every parameter's gradient, by name (for diagnostics).
    pub fn grad_norms(&self, grads: &[f32]) -> Vec<(String, f64)> {
        self.layout
            .entries
            .par_iter()
            .map(|e| {
                (
                    e.name.clone(),
                    e.slot
                        .of(grads)
                        .iter()
                        .map(|&g| (g as f64) * (g as f64))
                        .sum::<f64>()
                        .sqrt(),
                )
            })
            .collect()
    }
}

impl Model {
    /// A model with transformers-style random initialisation: weights
    /// N(0, `std`) (HF's `initializer_range`, usually 0.02), norm weights 1,
    /// biases and the expert correction bias 0. Deterministic in `seed`.
    pub fn random(config: ModelConfig, seed: u64, std: f32) -> Model {
        let mut m = Model::zeros(config);
        let mut rng = aha_tensor::rng::SplitMix64(seed);
        for e in &m.layout.entries {
            let dst = e.slot.of_mut(&mut m.params);
            let is_norm = e.name.ends_with("norm.weight") || e.name.ends_with("layernorm.weight");
            if is_norm {
                dst.fill(1.0);
            } else if e.shape.len() >= 2 {
                dst.iter_mut().for_each(|x| *x = (rng.normal() * std as f64) as f32);
            }
        }
        m
    }

    /// Forward FLOPs per token for sequences of length `t`: every matrix
    /// product a token passes through (2 x in x out each; top-k experts
    /// only), plus causal attention over (t + 1) / 2 keys on average.
    /// A training step costs about three times this.
    pub fn forward_flops_per_token(&self, t: usize) -> f64 {
        use crate::params::{AttnSlots, FfnSlots, Linear, MlpSlots};
        let lin = |l: &Linear| 2.0 * (l.inp * l.out) as f64;
        let mlp = |m: &MlpSlots| lin(&m.gate) + lin(&m.up) + lin(&m.down);
        let cfg = &self.config;
        let (dk, dv, _, _) = cfg.attn_dims();
        let mut f = 0.0;
        for l in &self.layout.layers {
            f += match &l.attn {
                AttnSlots::Gqa { q, k, v, o, .. } => lin(q) + lin(k) + lin(v) + lin(o),
                AttnSlots::Mla {
                    q_lora,
                    q,
                    kv_a,
                    kv_b,
                    o,
                    ..
                } => {
                    q_lora.as_ref().map_or(0.0, |(a, _, b)| lin(a) + lin(b))
                        + q.as_ref().map_or(0.0, lin)
                        + lin(kv_a)
                        + lin(kv_b)
                        + lin(o)
                }
            };
            f += 2.0 * (cfg.num_heads * (dk + dv)) as f64 * (t as f64 + 1.0) / 2.0;
            f += match (&l.ffn, &cfg.moe) {
                (FfnSlots::Dense(m), _) => mlp(m),
                (FfnSlots::Moe { experts, shared, .. }, Some(moe)) => {
                    2.0 * (cfg.hidden_size * moe.n_experts) as f64
                        + moe.top_k as f64 * experts.first().map_or(0.0, mlp)
                        + shared.as_ref().map_or(0.0, mlp)
                }
                (FfnSlots::Moe { .. }, None) => 0.0,
            };
        }
        f + 2.0 * (cfg.hidden_size * cfg.vocab_size) as f64
    }
}

/// One layer's new keys and values [N, Hk * Dk], [N, Hk * Dv].
type LayerKv = (Vec<f32>, Vec<f32>);

/// Splits a ragged batch into contiguous groups of whole spans with about
/// equal token counts, one per thread, as (span range, token range). Large
/// batches (prefill) stay one group: their kernels are big enough to
/// parallelise inside.
fn paged_groups(spans: &[SeqSpan<'_>], n: usize, threads: usize) -> Vec<(usize, usize, usize, usize)> {
    const MAX_SPLIT_TOKENS: usize = 256;
    let g = threads.min(spans.len()).max(1);
    if g == 1 || n > MAX_SPLIT_TOKENS {
        return vec![(0, spans.len(), 0, n)];
    }
    let mut out = Vec::with_capacity(g);
    let (mut s0, mut t0, mut t) = (0, 0, 0);
    for (i, sp) in spans.iter().enumerate() {
        t += sp.len;
        let left_groups = g - out.len() - 1;
        let left_spans = spans.len() - i - 1;
        // Close the group at its share of tokens, keeping a span for each group left.
        if left_groups > 0 && (t * g >= n * (out.len() + 1) || left_spans == left_groups) {
            out.push((s0, i + 1, t0, t));
            (s0, t0) = (i + 1, t);
        }
    }
    out.push((s0, spans.len(), t0, n));
    out
}

/// Single-thread pools, one per group: inside one, every kernel's rayon
/// loop runs inline on that thread.
fn serial_pools(n: usize) -> &'static [rayon::ThreadPool] {
    static POOLS: std::sync::OnceLock<Vec<rayon::ThreadPool>> = std::sync::OnceLock::new();
    let all = POOLS.get_or_init(|| {
        (0..rayon::current_num_threads().max(1))
            .filter_map(|_| rayon::ThreadPoolBuilder::new().num_threads(1).build().ok())
            .collect()
    });
    &all[..n.min(all.len())]
}

/// Writes a group's new keys and values into its spans' cache slots.
fn write_new_kv(cache: &mut PagedKvCache, spans: &[SeqSpan<'_>], kv: &[LayerKv], bs: usize) {
    let (kw, vw) = cache.widths();
    for (layer, (k, v)) in cache.layers.iter_mut().zip(kv) {
        let mut tok = 0;
        for sp in spans {
            for i in 0..sp.len {
                let p = sp.start + i;
                let slot = sp.table[p / bs] as usize * bs + p % bs;
                layer.k[slot * kw..(slot + 1) * kw].copy_from_slice(&k[tok * kw..(tok + 1) * kw]);
                layer.v[slot * vw..(slot + 1) * vw].copy_from_slice(&v[tok * vw..(tok + 1) * vw]);
                tok += 1;
            }
        }
    }
}

#[cfg(test)]
mod group_tests {
    use super::*;

    #[test]
    fn groups_cover_every_span_once_with_balanced_tokens() {
        let table = [0u32];
        for lens in [
            vec![1usize; 16],
            vec![5, 1, 1, 1, 1, 9, 1],
            vec![3, 3],
            vec![1],
            vec![300, 1],
        ] {
            let spans: Vec<SeqSpan<'_>> = lens
                .iter()
                .map(|&len| SeqSpan {
                    table: &table,
                    start: 0,
                    len,
                })
                .collect();
            let n: usize = lens.iter().sum();
            for threads in 1..5 {
                let g = paged_groups(&spans, n, threads);
                assert!(!g.is_empty() && g.len() <= threads.max(1), "{lens:?} {threads}: {g:?}");
                assert_eq!((g[0].0, g[0].2), (0, 0));
                assert_eq!((g[g.len() - 1].1, g[g.len() - 1].3), (spans.len(), n));
                for w in g.windows(2) {
                    assert_eq!((w[0].1, w[0].3), (w[1].0, w[1].2));
                }
                for &(s0, s1, t0, t1) in &g {
                    assert!(s1 > s0, "{g:?}");
                    assert_eq!(lens[s0..s1].iter().sum::<usize>(), t1 - t0);
                }
                if n > 256 {
                    assert_eq!(g.len(), 1);
                }
            }
        }
    }
}
