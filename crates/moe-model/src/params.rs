//! All parameters in one flat f32 buffer, with named views under the Hugging
//! Face tensor names; loading from and saving to HF safetensors folders.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use crate::config::{Arch, Fp8Blocks, ModelConfig, Router};
use crate::error::{Error, Result};
use crate::lora::{self, LoraConfig, LoraSlots};
use crate::st;

/// A view of `len` elements at `off` in the flat buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Slot {
    /// First element.
    pub off: usize,
    /// Element count.
    pub len: usize,
}

impl Slot {
    /// The slice of `buf` this slot names.
    #[inline]
    pub fn of<'a>(&self, buf: &'a [f32]) -> &'a [f32] {
        &buf[self.off..self.off + self.len]
    }
    /// The mutable slice of `buf` this slot names.
    #[inline]
    pub fn of_mut<'a>(&self, buf: &'a mut [f32]) -> &'a mut [f32] {
        &mut buf[self.off..self.off + self.len]
    }
}

/// One named parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamEntry {
    /// The HF tensor name.
    pub name: String,
    /// Its shape (PyTorch's: linear weights are [out, in]).
    pub shape: Vec<usize>,
    /// Where it lives in the flat buffer.
    pub slot: Slot,
    /// False for buffers that the optimizer must not touch
    /// (`e_score_correction_bias`, updated by load balancing instead).
    pub trainable: bool,
}

/// A linear layer's weight [out, in], optional bias [out] and optional
/// LoRA adapter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Linear {
    /// Weight slot.
    pub w: Slot,
    /// Bias slot.
    pub b: Option<Slot>,
    /// Input features.
    pub inp: usize,
    /// Output features.
    pub out: usize,
    /// The LoRA adapter on this linear, if any.
    pub lora: Option<LoraSlots>,
    /// True when the weight and bias are frozen (a LoRA layout freezes
    /// every base tensor): the backward skips their gradients.
    pub frozen: bool,
}

/// A SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MlpSlots {
    /// gate_proj.
    pub gate: Linear,
    /// up_proj.
    pub up: Linear,
    /// down_proj.
    pub down: Linear,
}

/// Attention parameters.
// One per layer, built once: the variants' size difference costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum AttnSlots {
    /// Grouped-query attention.
    Gqa {
        /// q_proj.
        q: Linear,
        /// k_proj.
        k: Linear,
        /// v_proj.
        v: Linear,
        /// o_proj.
        o: Linear,
        /// q_norm / k_norm weights (Qwen3).
        qk_norm: Option<(Slot, Slot)>,
    },
    /// Multi-head latent attention.
    Mla {
        /// q_a_proj, q_a_layernorm, q_b_proj (low-rank path), or None.
        q_lora: Option<(Linear, Slot, Linear)>,
        /// q_proj when there is no low-rank path.
        q: Option<Linear>,
        /// kv_a_proj_with_mqa.
        kv_a: Linear,
        /// kv_a_layernorm.
        kv_norm: Slot,
        /// kv_b_proj.
        kv_b: Linear,
        /// o_proj.
        o: Linear,
    },
}

/// The MLP of one layer.
#[derive(Debug, Clone, PartialEq)]
pub enum FfnSlots {
    /// Dense SwiGLU.
    Dense(MlpSlots),
    /// Mixture of experts.
    Moe {
        /// The router `gate.weight` [E, C].
        router: Slot,
        /// `gate.e_score_correction_bias` [E] (DeepSeek-V3).
        bias: Option<Slot>,
        /// Routed experts.
        experts: Vec<MlpSlots>,
        /// Shared experts, merged into one MLP.
        shared: Option<MlpSlots>,
    },
}

/// One decoder layer's parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSlots {
    /// input_layernorm.
    pub ln1: Slot,
    /// The attention.
    pub attn: AttnSlots,
    /// post_attention_layernorm.
    pub ln2: Slot,
    /// The MLP.
    pub ffn: FfnSlots,
}

/// Where every parameter of a model lives.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// Every tensor in order.
    pub entries: Vec<ParamEntry>,
    /// Total elements.
    pub size: usize,
    /// Elements of the trainable prefix `0..trainable` (the frozen tensors
    /// follow it).
    pub trainable: usize,
    /// embed_tokens [V, C].
    pub embed: Slot,
    /// Decoder layers.
    pub layers: Vec<LayerSlots>,
    /// model.norm.
    pub norm: Slot,
    /// lm_head [V, C] (the embedding when tied).
    pub lm_head: Slot,
    /// The LoRA configuration when the layout carries adapters (then the
    /// adapters are the trainable prefix and every base tensor is frozen).
    pub lora: Option<LoraConfig>,
    /// The routed experts this layout holds of every MoE layer when it
    /// holds only some (an expert-parallel rank's: see
    /// [`Layout::with_expert_shard`]); `None`: all of them.
    pub expert_shard: Option<std::ops::Range<usize>>,
    index: HashMap<String, usize>,
}

struct Builder {
    entries: Vec<ParamEntry>,
    /// Elements of the trainable tensors so far.
    size: usize,
    /// Where the frozen tensors start (after every trainable one).
    frozen_base: usize,
    /// Elements of the frozen tensors so far.
    frozen: usize,
    /// LoRA: which linears get adapters; every base tensor is frozen.
    lora: Option<LoraConfig>,
}

impl Builder {
    fn add(&mut self, name: String, shape: Vec<usize>, trainable: bool) -> Slot {
        let trainable = trainable && (self.lora.is_none() || lora::is_adapter_name(&name));
        let len = shape.iter().product();
        let slot = if trainable {
            let s = Slot { off: self.size, len };
            self.size += len;
            s
        } else {
            let s = Slot {
                off: self.frozen_base + self.frozen,
                len,
            };
            self.frozen += len;
            s
        };
        self.entries.push(ParamEntry {
            name,
            shape,
            slot,
            trainable,
        });
        slot
    }
    fn vec(&mut self, name: String, n: usize) -> Slot {
        self.add(name, vec![n], true)
    }
    fn linear(&mut self, name: &str, inp: usize, out: usize, bias: bool) -> Linear {
        let w = self.add(format!("{name}.weight"), vec![out, inp], true);
        let b = bias.then(|| self.vec(format!("{name}.bias"), out));
        let lora = match &self.lora {
            Some(cfg) if cfg.targets(name) => {
                let (r, scale) = (cfg.r, cfg.scale());
                let a = self.add(lora::peft_name(name, 'A'), vec![r, inp], true);
                let b = self.add(lora::peft_name(name, 'B'), vec![out, r], true);
                Some(LoraSlots {
                    a,
                    b,
                    r,
                    scale,
                    enabled: true,
                    dropout: None,
                })
            }
            _ => None,
        };
        Linear {
            w,
            b,
            inp,
            out,
            lora,
            frozen: self.lora.is_some(),
        }
    }
    fn mlp(&mut self, p: &str, c: usize, f: usize) -> MlpSlots {
        MlpSlots {
            gate: self.linear(&format!("{p}.gate_proj"), c, f, false),
            up: self.linear(&format!("{p}.up_proj"), c, f, false),
            down: self.linear(&format!("{p}.down_proj"), f, c, false),
        }
    }
    /// The MLPs of the experts `ids` (named by their index in the whole
    /// layer), stacked: every gate_proj, then every up_proj, then every
    /// down_proj, so each projection of these experts is one contiguous
    /// `[n, out, in]` block (what the grouped expert kernels read).
    fn experts(&mut self, p: &str, ids: std::ops::Range<usize>, c: usize, f: usize) -> Vec<MlpSlots> {
        let w = |b: &mut Builder, e: usize, proj: &str, inp: usize, out: usize| Linear {
            w: b.add(format!("{p}.{e}.{proj}.weight"), vec![out, inp], true),
            b: None,
            inp,
            out,
            lora: None,
            frozen: b.lora.is_some(),
        };
        let gate: Vec<Linear> = ids.clone().map(|e| w(self, e, "gate_proj", c, f)).collect();
        let up: Vec<Linear> = ids.clone().map(|e| w(self, e, "up_proj", c, f)).collect();
        let down: Vec<Linear> = ids.map(|e| w(self, e, "down_proj", f, c)).collect();
        gate.into_iter()
            .zip(up)
            .zip(down)
            .map(|((gate, up), down)| MlpSlots { gate, up, down })
            .collect()
    }
}

impl Layout {
    /// The layout a config implies, in a fixed order: every trainable
    /// tensor first (so the optimizer runs over one prefix of the buffer,
    /// [`Layout::trainable`] elements), then the frozen ones
    /// (`e_score_correction_bias`); each MoE layer's experts stacked by
    /// projection (see `Builder::experts`).
    pub fn new(cfg: &ModelConfig) -> Layout {
        // The first pass only counts the trainable elements.
        let trainable = Layout::build(cfg, usize::MAX / 2, None, None).trainable;
        Layout::build(cfg, trainable, None, None)
    }

    /// The layout of [`Layout::new`] holding of every MoE layer's routed
    /// experts only those of `shard` (an expert-parallel rank's,
    /// `moe_ep::expert_shard(E, W, r)`), under their names in the whole
    /// model: every other tensor (router, correction bias, shared experts,
    /// attention, dense layers) is whole, in the same order. An error when
    /// the config has no MoE layer or `shard` is empty or not within its
    /// experts.
    pub fn with_expert_shard(cfg: &ModelConfig, shard: std::ops::Range<usize>) -> Result<Layout> {
        let e = cfg.moe.as_ref().map_or(0, |m| m.n_experts);
        if e == 0 || shard.is_empty() || shard.end > e {
            return Err(Error::Config {
                path: PathBuf::from("config.json"),
                msg: format!("expert shard {shard:?} is not a non-empty part of the {e} routed experts"),
            });
        }
        let trainable = Layout::build(cfg, usize::MAX / 2, None, Some(shard.clone())).trainable;
        Ok(Layout::build(cfg, trainable, None, Some(shard)))
    }

    /// The ranges of the trainable prefix that hold routed experts of an
    /// expert shard ([`Layout::with_expert_shard`]), sorted, adjacent ones
    /// merged: the rank-local parameters, which no other rank holds
    /// (empty for a whole layout).
    pub fn local_expert_ranges(&self) -> Vec<std::ops::Range<usize>> {
        if self.expert_shard.is_none() {
            return Vec::new();
        }
        let mut out: Vec<std::ops::Range<usize>> = Vec::new();
        for l in &self.layers {
            let FfnSlots::Moe { experts, .. } = &l.ffn else {
                continue;
            };
            let (Some(first), n) = (experts.first(), experts.len()) else {
                continue;
            };
            for s in [first.gate.w, first.up.w, first.down.w] {
                out.push(s.off..s.off + s.len * n);
            }
        }
        merge_ranges(out)
    }

    /// The trainable prefix less [`Layout::local_expert_ranges`]: what
    /// every rank holds alike (all of `0..trainable` for a whole layout),
    /// sorted and merged; what a data-parallel gradient all-reduce sums.
    pub fn replicated_ranges(&self) -> Vec<std::ops::Range<usize>> {
        let mut out = Vec::new();
        let mut at = 0;
        for r in self.local_expert_ranges() {
            if r.start > at {
                out.push(at..r.start);
            }
            at = r.end;
        }
        if self.trainable > at {
            out.push(at..self.trainable);
        }
        out
    }

    /// The layout of the base model with LoRA adapters on the linears that
    /// `lora.target_modules` names: the adapters (`lora_A [r, in]`,
    /// `lora_B [out, r]`, under PEFT's names) are the trainable prefix and
    /// every base tensor is frozen. Targets that match no adaptable linear
    /// at all are an error (as in PEFT).
    pub fn with_lora(cfg: &ModelConfig, lora: &LoraConfig) -> Result<Layout> {
        let probe = Layout::build(cfg, usize::MAX / 2, Some(lora.clone()), None);
        let layout = Layout::build(cfg, probe.trainable, Some(lora.clone()), None);
        if lora::adapted_linears(&layout).is_empty() {
            return Err(Error::Config {
                path: PathBuf::from("[lora] target_modules"),
                msg: format!(
                    "{:?} match no linear of this {:?} model (adaptable: attention projections, dense MLP and shared-expert gate/up/down_proj)",
                    lora.target_modules, cfg.arch
                ),
            });
        }
        Ok(layout)
    }

    fn build(
        cfg: &ModelConfig,
        frozen_base: usize,
        lora: Option<LoraConfig>,
        expert_shard: Option<std::ops::Range<usize>>,
    ) -> Layout {
        let c = cfg.hidden_size;
        let mut b = Builder {
            entries: Vec::new(),
            size: 0,
            frozen_base,
            frozen: 0,
            lora,
        };
        let embed = b.add("model.embed_tokens.weight".into(), vec![cfg.vocab_size, c], true);
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            let ln1 = b.vec(format!("{p}.input_layernorm.weight"), c);
            let attn = match &cfg.mla {
                None => {
                    let (h, hk, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
                    let q = b.linear(&format!("{p}.self_attn.q_proj"), c, h * d, cfg.qkv_bias);
                    let k = b.linear(&format!("{p}.self_attn.k_proj"), c, hk * d, cfg.qkv_bias);
                    let v = b.linear(&format!("{p}.self_attn.v_proj"), c, hk * d, cfg.qkv_bias);
                    let o = b.linear(&format!("{p}.self_attn.o_proj"), h * d, c, false);
                    let qk_norm = cfg.qk_norm.then(|| {
                        (
                            b.vec(format!("{p}.self_attn.q_norm.weight"), d),
                            b.vec(format!("{p}.self_attn.k_norm.weight"), d),
                        )
                    });
                    AttnSlots::Gqa { q, k, v, o, qk_norm }
                }
                Some(m) => {
                    let h = cfg.num_heads;
                    let dq = m.qk_nope_head_dim + m.qk_rope_head_dim;
                    let (q_lora, q) = match m.q_lora_rank {
                        Some(r) => {
                            let qa = b.linear(&format!("{p}.self_attn.q_a_proj"), c, r, false);
                            let qn = b.vec(format!("{p}.self_attn.q_a_layernorm.weight"), r);
                            let qb = b.linear(&format!("{p}.self_attn.q_b_proj"), r, h * dq, false);
                            (Some((qa, qn, qb)), None)
                        }
                        None => (None, Some(b.linear(&format!("{p}.self_attn.q_proj"), c, h * dq, false))),
                    };
                    let kv_a = b.linear(
                        &format!("{p}.self_attn.kv_a_proj_with_mqa"),
                        c,
                        m.kv_lora_rank + m.qk_rope_head_dim,
                        false,
                    );
                    let kv_norm = b.vec(format!("{p}.self_attn.kv_a_layernorm.weight"), m.kv_lora_rank);
                    let kv_b = b.linear(
                        &format!("{p}.self_attn.kv_b_proj"),
                        m.kv_lora_rank,
                        h * (m.qk_nope_head_dim + m.v_head_dim),
                        false,
                    );
                    let o = b.linear(&format!("{p}.self_attn.o_proj"), h * m.v_head_dim, c, false);
                    AttnSlots::Mla {
                        q_lora,
                        q,
                        kv_a,
                        kv_norm,
                        kv_b,
                        o,
                    }
                }
            };
            let ln2 = b.vec(format!("{p}.post_attention_layernorm.weight"), c);
            let ffn = match (&cfg.moe, cfg.sparse_layers.get(l).copied().unwrap_or(false)) {
                (Some(moe), true) => {
                    let router = b.add(format!("{p}.mlp.gate.weight"), vec![moe.n_experts, c], true);
                    let bias = matches!(moe.router, Router::SigmoidGroupLimited { .. }).then(|| {
                        b.add(
                            format!("{p}.mlp.gate.e_score_correction_bias"),
                            vec![moe.n_experts],
                            false,
                        )
                    });
                    let ids = expert_shard.clone().unwrap_or(0..moe.n_experts);
                    let experts = b.experts(&format!("{p}.mlp.experts"), ids, c, moe.expert_dim);
                    let shared = (moe.n_shared > 0)
                        .then(|| b.mlp(&format!("{p}.mlp.shared_experts"), c, moe.expert_dim * moe.n_shared));
                    FfnSlots::Moe {
                        router,
                        bias,
                        experts,
                        shared,
                    }
                }
                _ => FfnSlots::Dense(b.mlp(&format!("{p}.mlp"), c, cfg.intermediate_size)),
            };
            layers.push(LayerSlots { ln1, attn, ln2, ffn });
        }
        let norm = b.vec("model.norm.weight".into(), c);
        let lm_head = if cfg.tie_word_embeddings {
            embed
        } else {
            b.add("lm_head.weight".into(), vec![cfg.vocab_size, c], true)
        };
        let index = b.entries.iter().enumerate().map(|(i, e)| (e.name.clone(), i)).collect();
        Layout {
            entries: b.entries,
            size: b.size + b.frozen,
            trainable: b.size,
            embed,
            layers,
            norm,
            lm_head,
            lora: b.lora,
            expert_shard,
            index,
        }
    }

    /// The entry named `name`, if any.
    pub fn get(&self, name: &str) -> Option<&ParamEntry> {
        self.index.get(name).map(|&i| &self.entries[i])
    }

    /// The trainable prefix cut into the parts a backward finishes one at
    /// a time, in the order it finishes them: the head (`model.norm` and an
    /// untied `lm_head`), then each decoder layer from the last to the
    /// first, then the embedding (which also holds a tied head's
    /// gradient). Each part is its tensors' slots, adjacent ones merged;
    /// parts without a trainable tensor (a LoRA layout's head) are empty.
    /// Together the parts cover `0..trainable` exactly once.
    pub fn grad_ready_parts(&self) -> Vec<Vec<std::ops::Range<usize>>> {
        let nl = self.layers.len();
        // 0: head, 1..=nl: layers nl-1 down to 0, nl + 1: embedding.
        let mut parts: Vec<Vec<std::ops::Range<usize>>> = vec![Vec::new(); nl + 2];
        for e in self.entries.iter().filter(|e| e.trainable && e.slot.len > 0) {
            // LoRA adapters carry PEFT's `base_model.model.` prefix.
            let name = e.name.strip_prefix("base_model.model.").unwrap_or(&e.name);
            let layer = name
                .strip_prefix("model.layers.")
                .and_then(|rest| rest.split('.').next())
                .and_then(|l| l.parse::<usize>().ok())
                .filter(|&l| l < nl);
            let part = match layer {
                Some(l) => nl - l,
                None if name.starts_with("model.embed_tokens.") => nl + 1,
                None => 0,
            };
            parts[part].push(e.slot.off..e.slot.off + e.slot.len);
        }
        for p in &mut parts {
            *p = merge_ranges(std::mem::take(p));
        }
        parts
    }
}

/// `ranges` sorted by start, adjacent ones merged.
fn merge_ranges(mut ranges: Vec<std::ops::Range<usize>>) -> Vec<std::ops::Range<usize>> {
    ranges.sort_by_key(|r| r.start);
    let mut merged: Vec<std::ops::Range<usize>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match merged.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => merged.push(r),
        }
    }
    merged
}

/// Tensors a checkpoint may carry that the model does not use.
fn ignorable(cfg: &ModelConfig, name: &str) -> bool {
    if name.ends_with("rotary_emb.inv_freq") {
        return true;
    }
    if cfg.tie_word_embeddings && name == "lm_head.weight" {
        return true;
    }
    // DeepSeek-V3's multi-token-prediction layers sit after the decoder
    // layers; transformers ignores them too.
    if cfg.arch == Arch::DeepseekV3 {
        if let Some(rest) = name.strip_prefix("model.layers.") {
            if let Some(l) = rest.split('.').next().and_then(|s| s.parse::<usize>().ok()) {
                return l >= cfg.num_layers;
            }
        }
    }
    false
}

/// The safetensors files of a model folder: the index's shards, or `model.safetensors`.
pub fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|source| Error::Io {
            path: index.clone(),
            source,
        })?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
            path: index.clone(),
            msg: format!("not valid JSON: {e}"),
        })?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::Checkpoint {
                path: index.clone(),
                msg: "no `weight_map` object".into(),
            })?;
        let mut files = BTreeSet::new();
        for (name, f) in map {
            let f = f.as_str().ok_or_else(|| Error::Checkpoint {
                path: index.clone(),
                msg: format!("weight_map[{name}] is not a file name"),
            })?;
            if f.contains('/') || f.contains("..") {
                return Err(Error::Checkpoint {
                    path: index.clone(),
                    msg: format!("weight_map[{name}] = {f:?} leaves the folder"),
                });
            }
            files.insert(dir.join(f));
        }
        return Ok(files.into_iter().collect());
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(Error::Checkpoint {
        path: dir.to_path_buf(),
        msg: "neither model.safetensors nor model.safetensors.index.json found".into(),
    })
}

/// Every tensor of a model folder's safetensors files, by name, from the
/// headers alone. A name in two shards is an error.
pub fn checkpoint_index(dir: &Path) -> Result<BTreeMap<String, st::TensorLoc>> {
    let mut all = BTreeMap::new();
    for file in checkpoint_files(dir)? {
        for (name, loc) in st::read_header(&file)? {
            if let Some(prev) = all.insert(name.clone(), loc) {
                return Err(Error::Checkpoint {
                    path: dir.to_path_buf(),
                    msg: format!("`{name}` appears in more than one shard ({})", prev.file.display()),
                });
            }
        }
    }
    Ok(all)
}

/// The block-scale tensor of a block-quantized `<name>.weight`.
pub(crate) fn scale_name(weight: &str) -> Option<String> {
    weight.strip_suffix(".weight").map(|p| format!("{p}.weight_scale_inv"))
}

/// Dequantizes an FP8 block-quantized weight `[rows, cols]` in place:
/// `w[r, c] *= scale_inv[r / bn, c / bk]` (edge blocks partial).
fn dequantize_blocks(w: &mut [f32], cols: usize, scale: &[f32], blocks: Fp8Blocks) {
    let sc = cols.div_ceil(blocks.cols);
    for (r, row) in w.chunks_exact_mut(cols.max(1)).enumerate() {
        let srow = &scale[(r / blocks.rows) * sc..(r / blocks.rows + 1) * sc];
        for (c, x) in row.iter_mut().enumerate() {
            *x *= srow[c / blocks.cols];
        }
    }
}

/// Reads one parameter into `dst` (f32, bf16, f16, or FP8 E4M3 with its
/// block scales), or says what is wrong with it.
fn load_tensor(
    dst: &mut [f32],
    name: &str,
    loc: &st::TensorLoc,
    index: &BTreeMap<String, st::TensorLoc>,
    cfg: &ModelConfig,
) -> Result<std::result::Result<(), String>> {
    if st::decode_tensor(dst, loc)?.is_none() {
        return Ok(Err(format!(
            "`{name}` has dtype {:?}; supported: F32, BF16, F16, F8_E4M3 (block-quantized)",
            loc.dtype
        )));
    }
    if loc.dtype != safetensors::Dtype::F8_E4M3 {
        return Ok(Ok(()));
    }
    let Some(blocks) = cfg.fp8 else {
        return Ok(Err(format!(
            "`{name}` is F8_E4M3 but config.json has no quantization_config"
        )));
    };
    let (Some(sname), [rows, cols]) = (scale_name(name), loc.shape.as_slice()) else {
        return Ok(Err(format!("`{name}` is F8_E4M3 but not a 2-D weight")));
    };
    let Some(sloc) = index.get(&sname) else {
        return Ok(Err(format!("`{name}` is F8_E4M3 but `{sname}` is missing")));
    };
    let want = [rows.div_ceil(blocks.rows), cols.div_ceil(blocks.cols)];
    if sloc.shape != want {
        return Ok(Err(format!(
            "`{sname}` has shape {:?}; {rows}x{cols} in {}x{} blocks needs {want:?}",
            sloc.shape, blocks.rows, blocks.cols
        )));
    }
    let mut scale = vec![0f32; want[0] * want[1]];
    let float_scale = matches!(
        sloc.dtype,
        safetensors::Dtype::F32 | safetensors::Dtype::BF16 | safetensors::Dtype::F16
    );
    if !float_scale || st::decode_tensor(&mut scale, sloc)?.is_none() {
        return Ok(Err(format!(
            "`{sname}` has dtype {:?}; supported: F32, BF16, F16",
            sloc.dtype
        )));
    }
    dequantize_blocks(dst, *cols, &scale, blocks);
    Ok(Ok(()))
}

/// Loads every parameter of `layout` from the folder's safetensors into a
/// new flat buffer, one tensor at a time and each streamed from disk
/// straight into its slot (only the headers and one 8 MiB read buffer are
/// held besides the result), converting bf16/f16 to f32 and dequantizing
/// FP8 block-quantized weights in place. Missing, unexpected and
/// mis-shaped tensors are listed in the error.
pub fn load_params(dir: &Path, cfg: &ModelConfig, layout: &Layout) -> Result<Vec<f32>> {
    load_params_except(dir, cfg, layout, &[])
}

/// [`load_params`], leaving the tensors named in `others` to the caller (a
/// sequence-classification model's `score.weight`): they are neither
/// loaded nor reported as unexpected.
pub fn load_params_except(dir: &Path, cfg: &ModelConfig, layout: &Layout, others: &[&str]) -> Result<Vec<f32>> {
    let index = checkpoint_index(dir)?;
    let mut data = vec![0f32; layout.size];
    let mut problems = Vec::new();
    let mut missing = Vec::new();
    for e in layout.entries.iter().filter(|e| !lora::is_adapter(e)) {
        let Some(loc) = index.get(&e.name) else {
            missing.push(e.name.as_str());
            continue;
        };
        if loc.shape != e.shape {
            problems.push(format!(
                "`{}` has shape {:?}, config implies {:?}",
                e.name, loc.shape, e.shape
            ));
            continue;
        }
        if let Err(p) = load_tensor(e.slot.of_mut(&mut data), &e.name, loc, &index, cfg)? {
            problems.push(p);
        }
    }
    let unexpected: Vec<&str> = index
        .keys()
        .filter(|name| {
            if layout.get(name).is_some() || ignorable(cfg, name) || others.contains(&name.as_str()) {
                return false;
            }
            // A block scale belongs to the quantized weight beside it.
            match name.strip_suffix("_scale_inv") {
                Some(w) if cfg.fp8.is_some() => layout.get(w).is_none() && !ignorable(cfg, w),
                _ => true,
            }
        })
        .map(|s| s.as_str())
        .collect();
    if !missing.is_empty() {
        problems.push(format!("{} missing: {}", missing.len(), list(&missing)));
    }
    if !unexpected.is_empty() {
        problems.push(format!("{} unexpected: {}", unexpected.len(), list(&unexpected)));
    }
    if !problems.is_empty() {
        return Err(Error::Checkpoint {
            path: dir.to_path_buf(),
            msg: problems.join("; "),
        });
    }
    Ok(data)
}

fn list(names: &[&str]) -> String {
    let mut s = names.iter().take(12).copied().collect::<Vec<_>>().join(", ");
    if names.len() > 12 {
        s.push_str(&format!(", ... ({} more)", names.len() - 12));
    }
    s
}

/// Writes the parameters in HF layout: f32 tensors, `format: pt`, sharded
/// with `model.safetensors.index.json` when larger than `max_shard_bytes`.
pub fn save_params(dir: &Path, layout: &Layout, data: &[f32], max_shard_bytes: usize) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut shards: Vec<Vec<&ParamEntry>> = vec![vec![]];
    let mut bytes = 0usize;
    for e in layout.entries.iter().filter(|e| !lora::is_adapter(e)) {
        let sz = e.slot.len * 4;
        if bytes > 0 && bytes + sz > max_shard_bytes {
            shards.push(vec![]);
            bytes = 0;
        }
        bytes += sz;
        if let Some(last) = shards.last_mut() {
            last.push(e);
        }
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let fname = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
        };
        let tensors: Vec<(String, Vec<usize>, &[f32])> = shard
            .iter()
            .map(|e| (e.name.clone(), e.shape.clone(), e.slot.of(data)))
            .collect();
        st::write_f32(&dir.join(&fname), &tensors)?;
        for e in shard {
            weight_map.insert(e.name.clone(), serde_json::Value::String(fname.clone()));
        }
    }
    let index_path = dir.join("model.safetensors.index.json");
    if n > 1 {
        let idx = serde_json::json!({
            "metadata": {"total_size": layout.size * 4},
            "weight_map": weight_map,
        });
        std::fs::write(&index_path, serde_json::to_string_pretty(&idx).unwrap_or_default()).map_err(|source| {
            Error::Io {
                path: index_path.clone(),
                source,
            }
        })?;
    } else if index_path.exists() {
        // A stale index from an earlier sharded save would shadow the new file.
        std::fs::remove_file(&index_path).map_err(|source| Error::Io {
            path: index_path.clone(),
            source,
        })?;
    }
    Ok(())
}
