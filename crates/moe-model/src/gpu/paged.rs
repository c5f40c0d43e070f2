//! A paged key/value cache in device memory: the design of the CPU's
//! [`PagedKvCache`](crate::PagedKvCache) (fixed-size blocks from one pool
//! per layer, block tables, reference counts, copy-on-write of a shared
//! block) with the blocks on the GPU.
//!
//! | name | shape | type |
//! |---|---|---|
//! | k of a layer | [blocks, block_size, Hk, Dk] | bf16 bits (`u16`) or f32 |
//! | v of a layer | [blocks, block_size, Hk, Dv] | bf16 bits or f32 |
//! | MLA latent entries of a layer (instead of k and v) | [blocks, block_size, kv_lora_rank + qk_rope_head_dim] | bf16 bits or f32 |
//!
//! **MLA's latent cache** (DeepSeek-V3, where `kv_lora_rank +
//! qk_rope_head_dim` fits the kernels' 256 columns): a position caches the
//! normed compressed latent `c` and the rotated shared key `k_rope`, not
//! every head's key and value. Attention runs in the weight-absorbed form
//! as multi-query attention with one key/value head: each head's query
//! becomes `[W_UK^T q_nope ; q_rope]` (so its product with the entry
//! `[c ; k_rope]` is `q . k` of the expanded form; the softmax scale stays
//! the expanded one), the values are the entries themselves (the same
//! buffer; the output's first `kv_lora_rank` columns are `sum p c`), and
//! `W_UV` maps that back to each head's value before `o_proj`. Wider models
//! (DeepSeek-V3's 512 + 64) keep the expanded keys and values: the latent
//! form needs a decode kernel for those widths.
//!
//! Position `p` of a sequence lives in block `table[p / block_size]`, slot
//! `p % block_size`. The bookkeeping (reference counts, the free list, the
//! high-water mark) stays on the host; only keys and values live on the
//! device. The pool is allocated whole when made: size it for the request
//! (the GPU engine does).
//!
//! [`GpuModel::forward_paged`] runs a ragged batch (prefills and single
//! decode tokens together) against the pool. Attention by dtype:
//!
//! - [`KvDtype::Bf16`] (the default): the paged flash-decoding kernels
//!   (`flash_decode_*_bf16` and their combine; queries rounded to bf16,
//!   f32 accumulation) over every sequence of the batch in one launch per
//!   layer, reading the blocks in place.
//! - [`KvDtype::F32`]: the flash-decoding kernels take bf16 only, so f32
//!   keeps the f32 decode kernel of the contiguous path
//!   (`attention_decode_f32`): each sequence's blocks are first gathered
//!   into a contiguous buffer (one `embedding_forward_f32` launch, a block
//!   per row), then attended per sequence. Exact (it matches the CPU model
//!   to rounding) and slower: the choice for checks, not for speed.

use std::sync::Arc;

use aha_cuda_kernels::blas::MatmulShape;
use aha_cuda_kernels::cudarc::driver::CudaSlice;
use aha_cuda_kernels::flash::{self, PagedGeometry, FLASH_LATENT_MAX_D, FLASH_MAX_D};
use aha_cuda_kernels::launch::{self, AttnGeometry, ColsCopy, TokenIds};
use aha_cuda_kernels::Gpu;
use serde::{Deserialize, Serialize};

use super::{attn_out, cuda, AttnActs, GpuModel, Qkv};
use crate::config::MlaConfig;
use crate::error::{input_err, Result};
use crate::paged::SeqSpan;
use crate::params::{AttnSlots, LayerSlots, Linear, Slot};

/// Element type of the keys and values in a [`GpuPagedKvCache`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvDtype {
    /// bf16 (half the memory of f32); attention by the paged
    /// flash-decoding kernels.
    #[default]
    Bf16,
    /// f32; attention by the f32 decode kernel over gathered blocks (see
    /// the module docs).
    F32,
}

impl std::str::FromStr for KvDtype {
    type Err = crate::Error;

    /// `bf16` or `f32`.
    fn from_str(s: &str) -> Result<KvDtype> {
        match s {
            "bf16" => Ok(KvDtype::Bf16),
            "f32" => Ok(KvDtype::F32),
            _ => Err(input_err("kv dtype", format!("{s:?}: expected bf16 or f32"))),
        }
    }
}

impl std::fmt::Display for KvDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KvDtype::Bf16 => "bf16",
            KvDtype::F32 => "f32",
        })
    }
}

impl KvDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            KvDtype::Bf16 => 2,
            KvDtype::F32 => 4,
        }
    }
}

/// One layer's keys or values for every block.
enum Store {
    Bf16(CudaSlice<u16>),
    F32(CudaSlice<f32>),
}

/// One paged step's inputs on the device, however they got there
/// (uploaded for an eager step, staged for a graph's replay).
pub(super) struct StepIn<'a> {
    pub(super) ids: &'a CudaSlice<u32>,
    pub(super) pos: &'a CudaSlice<u32>,
    pub(super) slots: &'a launch::KvSlots<'a>,
    /// bf16 caches: the block tables `[nseq, max_blocks]`, context lengths
    /// and cumulative query rows of the flash-decoding launch.
    pub(super) paged: Option<(&'a CudaSlice<i32>, &'a CudaSlice<i32>, &'a CudaSlice<i32>)>,
    /// f32 caches: the spans and each one's first row (gathered per
    /// sequence by their host tables).
    pub(super) spans: &'a [SeqSpan<'a>],
    pub(super) row0: &'a [usize],
    pub(super) geo: PagedGeometry,
}

/// The block pool of all layers on one GPU (see the module docs).
pub struct GpuPagedKvCache {
    gpu: Arc<Gpu>,
    /// Tells caches apart (a decode graph replays against its own).
    pub(super) id: u64,
    pub(super) dtype: KvDtype,
    pub(super) block_size: usize,
    /// Per-position widths: Hk * Dk and Hk * Dv.
    kw: usize,
    vw: usize,
    /// Keys (or MLA's latent entries) per layer.
    k: Vec<Store>,
    /// Values per layer; empty for MLA's latent cache (the values are read
    /// from the latent entries).
    v: Vec<Store>,
    /// MLA's latent cache: one `[c ; k_rope]` entry a position.
    latent: bool,
    refs: Vec<u32>,
    free: Vec<u32>,
    peak: usize,
}

impl std::fmt::Debug for GpuPagedKvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GpuPagedKvCache({} blocks of {}, {:?}, {} in use)",
            self.refs.len(),
            self.block_size,
            self.dtype,
            self.used_blocks()
        )
    }
}

impl GpuPagedKvCache {
    /// Positions per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.refs.len()
    }

    /// Blocks not in use.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Blocks in use.
    pub fn used_blocks(&self) -> usize {
        self.refs.len() - self.free.len()
    }

    /// The most blocks in use at once since the pool was made.
    pub fn peak_blocks(&self) -> usize {
        self.peak
    }

    /// Blocks needed to hold `positions` positions.
    pub fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_size)
    }

    /// The element type of the keys and values.
    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }

    /// Whether the pool holds MLA's latent entries (see the module docs).
    pub fn is_latent(&self) -> bool {
        self.latent
    }

    /// Bytes of keys and values one position takes over all layers (for
    /// MLA's latent cache: `(kv_lora_rank + qk_rope_head_dim) x dtype size
    /// x layers`).
    pub fn bytes_per_token(&self) -> usize {
        self.k.len() * (self.kw + self.vw) * self.dtype.size()
    }

    /// Bytes of device memory the pool holds.
    pub fn bytes(&self) -> usize {
        self.bytes_per_token() * self.block_size * self.refs.len()
    }

    /// Frees every block at once (reference counts to zero, the free list
    /// in a new pool's order, the high-water mark back to zero), keeping
    /// the device memory, its addresses and the pool's identity: a pool
    /// kept across generations starts each one empty, and decode graphs
    /// captured against it stay valid. No device work.
    pub fn reset(&mut self) {
        let n = self.refs.len();
        self.refs.iter_mut().for_each(|r| *r = 0);
        self.free.clear();
        self.free.extend((0..n as u32).rev());
        self.peak = 0;
    }

    /// Takes a free block (reference count 1).
    pub fn alloc(&mut self) -> Result<u32> {
        let b = self
            .free
            .pop()
            .ok_or_else(|| input_err("GpuPagedKvCache::alloc", "out of KV-cache blocks"))?;
        self.refs[b as usize] = 1;
        self.peak = self.peak.max(self.used_blocks());
        Ok(b)
    }

    /// Adds a reference to every block of `table` (sharing a prefix).
    pub fn share(&mut self, table: &[u32]) {
        for &b in table {
            if let Some(r) = self.refs.get_mut(b as usize) {
                *r += 1;
            }
        }
    }

    /// Drops a reference to every block of `table`, freeing unreferenced ones.
    pub fn release(&mut self, table: &[u32]) {
        for &b in table {
            if let Some(r) = self.refs.get_mut(b as usize) {
                if *r > 0 {
                    *r -= 1;
                    if *r == 0 {
                        self.free.push(b);
                    }
                }
            }
        }
    }

    /// Is block `b` shared with another sequence?
    pub fn is_shared(&self, b: u32) -> bool {
        self.refs.get(b as usize).is_some_and(|&r| r > 1)
    }

    /// A private copy of block `src` (all layers, on the device), for
    /// copy-on-write; `src` keeps its references.
    pub fn copy_block(&mut self, src: u32) -> Result<u32> {
        if src as usize >= self.refs.len() {
            return Err(input_err(
                "GpuPagedKvCache::copy_block",
                format!("block {src} is not in the pool of {}", self.refs.len()),
            ));
        }
        let dst = self.alloc()?;
        let (s, d, bs) = (src as usize, dst as usize, self.block_size);
        let g = &self.gpu;
        for (stores, w) in [(&mut self.k, self.kw), (&mut self.v, self.vw)] {
            let (from, to) = (s * bs * w..(s + 1) * bs * w, d * bs * w);
            for st in stores.iter_mut() {
                match st {
                    Store::Bf16(x) => {
                        let tmp = g.clone_range(x, from.clone()).map_err(cuda)?;
                        g.copy_into(x, to, &tmp).map_err(cuda)?;
                    }
                    Store::F32(x) => {
                        let tmp = g.clone_range(x, from.clone()).map_err(cuda)?;
                        g.copy_into(x, to, &tmp).map_err(cuda)?;
                    }
                }
            }
        }
        Ok(dst)
    }
}

impl GpuModel {
    /// A device pool of `blocks` blocks of `block_size` positions for this
    /// model's layers, keys and values in `dtype` (allocated now, zeroed).
    /// An MLA model gets the latent cache where its widths allow
    /// ([`GpuModel::mla_latent_fits`]), else the expanded keys and values of
    /// every head.
    pub fn new_paged_cache(&self, block_size: usize, blocks: usize, dtype: KvDtype) -> Result<GpuPagedKvCache> {
        self.new_paged_cache_with(block_size, blocks, dtype, self.mla_latent_fits(dtype))
    }

    /// Whether MLA's latent cache can serve this model with keys in
    /// `dtype`: an MLA model whose entry `kv_lora_rank + qk_rope_head_dim`
    /// fits the decode kernels: up to 576 in bf16 (the latent kernel, so
    /// DeepSeek-V3's 512 + 64), up to 256 in f32.
    pub fn mla_latent_fits(&self, dtype: KvDtype) -> bool {
        let max = match dtype {
            KvDtype::Bf16 => FLASH_LATENT_MAX_D,
            KvDtype::F32 => FLASH_MAX_D.min(launch::ATTENTION_MAX_D),
        };
        self.config
            .mla
            .as_ref()
            .is_some_and(|m| m.kv_lora_rank + m.qk_rope_head_dim <= max)
    }

    /// [`GpuModel::new_paged_cache`] choosing the layout: `latent` asks for
    /// MLA's latent cache (an error for a model without MLA or too wide),
    /// otherwise the expanded keys and values.
    pub fn new_paged_cache_with(
        &self,
        block_size: usize,
        blocks: usize,
        dtype: KvDtype,
        latent: bool,
    ) -> Result<GpuPagedKvCache> {
        if block_size == 0 || blocks == 0 || blocks > i32::MAX as usize {
            return Err(input_err(
                "gpu new_paged_cache",
                format!("{blocks} blocks of {block_size} positions: both must be positive"),
            ));
        }
        if latent && !self.mla_latent_fits(dtype) {
            return Err(input_err(
                "gpu new_paged_cache",
                format!(
                    "the latent cache needs an MLA model with kv_lora_rank + qk_rope_head_dim <= {} in {dtype}",
                    if dtype == KvDtype::Bf16 {
                        FLASH_LATENT_MAX_D
                    } else {
                        FLASH_MAX_D.min(launch::ATTENTION_MAX_D)
                    }
                ),
            ));
        }
        let (dk, dv, _, _) = self.config.attn_dims();
        let hk = self.kv_heads();
        let (kw, vw) = match (&self.config.mla, latent) {
            (Some(m), true) => (m.kv_lora_rank + m.qk_rope_head_dim, 0),
            _ => (hk * dk, hk * dv),
        };
        let g = &self.gpu;
        let store = |w: usize| -> Result<Store> {
            let n = blocks
                .checked_mul(block_size)
                .and_then(|x| x.checked_mul(w))
                .ok_or_else(|| {
                    input_err(
                        "gpu new_paged_cache",
                        format!("{blocks} blocks of {block_size} overflow"),
                    )
                })?;
            Ok(match dtype {
                KvDtype::Bf16 => Store::Bf16(g.zeros::<u16>(n).map_err(cuda)?),
                KvDtype::F32 => Store::F32(g.zeros::<f32>(n).map_err(cuda)?),
            })
        };
        let layers = self.config.num_layers;
        let mut k = Vec::with_capacity(layers);
        let mut v = Vec::with_capacity(layers);
        for _ in 0..layers {
            k.push(store(kw)?);
            if !latent {
                v.push(store(vw)?);
            }
        }
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Ok(GpuPagedKvCache {
            gpu: Arc::clone(g),
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            dtype,
            block_size,
            kw,
            vw,
            k,
            v,
            latent,
            refs: vec![0; blocks],
            free: (0..blocks as u32).rev().collect(),
            peak: 0,
        })
    }

    /// Runs one ragged batch against the paged cache: `tokens` are the new
    /// tokens of every span, packed in span order (a prompt's prefill, a
    /// recomputation, or one decode token); span `i` writes its keys and
    /// values at positions `start .. start + len` of its table and attends
    /// over positions `0 ..= p` (as `Model::forward_paged`). The layer math
    /// runs once over all the tokens. Returns the logits `[spans, V]` of
    /// each span's last token, on the device.
    pub fn forward_paged(
        &self,
        tokens: &[u32],
        spans: &[SeqSpan<'_>],
        cache: &mut GpuPagedKvCache,
    ) -> Result<CudaSlice<f32>> {
        self.check_paged(tokens, spans, cache)?;
        let cfg = &self.config;
        let n = tokens.len();
        let c = cfg.hidden_size;
        let bs = cache.block_size;
        let g = &self.gpu;
        let mut pos = Vec::with_capacity(n);
        for s in spans {
            pos.extend((s.start..s.start + s.len).map(|p| p as u32));
        }
        let pos = g.upload(&pos).map_err(cuda)?;
        // Where each span's rows start in the packed batch.
        let row0: Vec<usize> = spans
            .iter()
            .scan(0, |at, s| {
                let r = *at;
                *at += s.len;
                Some(r)
            })
            .collect();
        // Each packed row's cache slot (block * block_size + offset), the
        // same for every layer: checked and copied to the device once, then
        // one scatter launch per layer stores the step's keys (and values)
        // whatever the batch.
        let slots: Vec<u32> = spans
            .iter()
            .flat_map(|s| (s.start..s.start + s.len).map(move |p| s.table[p / bs] * bs as u32 + (p % bs) as u32))
            .collect();
        let kv_slots = launch::KvSlots::new(g, &slots).map_err(cuda)?;
        // The flash-decoding launch's tables (bf16): padded with block 0,
        // which the kernel never reads past a sequence's context.
        let max_ctx = spans.iter().map(|s| s.start + s.len).max().unwrap_or(0);
        let max_blocks = cache.blocks_for(max_ctx).max(1);
        let paged = match cache.dtype {
            KvDtype::Bf16 => {
                let mut tables = vec![0i32; spans.len() * max_blocks];
                for (i, s) in spans.iter().enumerate() {
                    let nb = cache.blocks_for(s.start + s.len);
                    for (t, &b) in tables[i * max_blocks..].iter_mut().zip(&s.table[..nb]) {
                        *t = b as i32;
                    }
                }
                let ctx: Vec<i32> = spans.iter().map(|s| (s.start + s.len) as i32).collect();
                let mut cu = vec![0i32];
                cu.extend(row0.iter().zip(spans).map(|(r, s)| (r + s.len) as i32));
                Some((
                    g.upload(&tables).map_err(cuda)?,
                    g.upload(&ctx).map_err(cuda)?,
                    g.upload(&cu).map_err(cuda)?,
                ))
            }
            KvDtype::F32 => None,
        };
        let ids = g.upload(tokens).map_err(cuda)?;
        let inp = StepIn {
            ids: &ids,
            pos: &pos,
            slots: &kv_slots,
            paged: paged.as_ref().map(|(t, x, u)| (t, x, u)),
            spans,
            row0: &row0,
            geo: self.paged_geometry(cache, n, spans.len(), max_ctx, max_blocks),
        };
        let x = self.layers_paged(&inp, cache)?;
        // Each span's last row (a row gather), then the head.
        let last: Vec<u32> = row0.iter().zip(spans).map(|(r, s)| (r + s.len - 1) as u32).collect();
        let mut xl = self.zeros(spans.len() * c)?;
        launch::embedding_forward_f32(g, &mut xl, &x, TokenIds::Host(&last), spans.len(), n, c).map_err(cuda)?;
        self.head_logits(&xl, spans.len())
    }

    /// The flash-decoding geometry of a step of `n` query rows in `nseq`
    /// sequences against `cache`: per head, or MLA's latent form (one
    /// key/value head of `[c ; k_rope]` entries, values = the entries).
    pub(super) fn paged_geometry(
        &self,
        cache: &GpuPagedKvCache,
        n: usize,
        nseq: usize,
        max_ctx: usize,
        max_blocks: usize,
    ) -> PagedGeometry {
        let (dk, dv, _, scale) = self.config.attn_dims();
        let (ahk, adk, adv) = if cache.latent {
            (1, cache.kw, cache.kw)
        } else {
            (self.kv_heads(), dk, dv)
        };
        PagedGeometry {
            total_q: n,
            nseq,
            max_ctx,
            block_size: cache.block_size,
            num_blocks: cache.num_blocks(),
            max_blocks,
            h: self.config.num_heads,
            hk: ahk,
            dk: adk,
            dv: adv,
            scale: scale as f32,
            splits: 0,
            shared_kv: cache.latent,
        }
    }

    /// The layers of a paged step over its inputs on the device: the
    /// embeddings of `inp.ids`, then per layer the keys and values stored
    /// at the step's slots and attention over each sequence's blocks.
    /// Returns the residual stream `[n, C]` before the final norm. Only
    /// launches and products (capturable) for bf16 caches; f32 caches
    /// gather each sequence's blocks by its host table.
    pub(super) fn layers_paged(&self, inp: &StepIn<'_>, cache: &mut GpuPagedKvCache) -> Result<CudaSlice<f32>> {
        let cfg = &self.config;
        let geo = &inp.geo;
        let n = geo.total_q;
        let c = cfg.hidden_size;
        let (_, _, _, scale) = cfg.attn_dims();
        let h = cfg.num_heads;
        let (ahk, adk, adv) = (geo.hk, geo.dk, geo.dv);
        let bs = cache.block_size;
        let g = &self.gpu;
        let mut x = self.zeros(n * c)?;
        let table = self.w32(self.layout.embed)?;
        launch::embedding_forward_f32(g, &mut x, &table, TokenIds::Device(inp.ids), n, cfg.vocab_size, c)
            .map_err(cuda)?;
        for (l, s) in self.layout.layers.iter().enumerate() {
            let (ln1, _) = self.norm_rstd(&x, s.ln1, n, c)?;
            let qkv = self.qkv(&ln1, s, inp.pos, n)?;
            let (q, k, v) = if cache.latent {
                let (q, entry) = self.mla_absorb(&qkv, s, n, cache.kw)?;
                (q, entry, None)
            } else {
                (qkv.q, qkv.k, Some(qkv.v))
            };
            let mut out = self.zeros(n * h * adv)?;
            let v_store = cache.v.get_mut(l);
            match (&mut cache.k[l], v_store, inp.paged) {
                (Store::Bf16(kc), vs, Some((tables, ctx, cu))) => {
                    launch::kv_write_bf16(g, kc, &k, inp.slots, ahk * adk).map_err(cuda)?;
                    let vc = match (vs, &v) {
                        (Some(Store::Bf16(vc)), Some(v)) => {
                            launch::kv_write_bf16(g, vc, v, inp.slots, ahk * adv).map_err(cuda)?;
                            Some(vc)
                        }
                        (None, None) => None,
                        _ => return Err(input_err("gpu forward_paged", "the cache's value blocks do not match")),
                    };
                    let q16 = self.to_bf16(&q, n * h * adk)?;
                    let mut lse = self.zeros(h * n)?;
                    let kc: &CudaSlice<u16> = kc;
                    let vc: &CudaSlice<u16> = vc.map_or(kc, |v| v);
                    flash::flash_decode_bf16(g, &mut out, &mut lse, &q16, kc, vc, tables, ctx, cu, geo)
                        .map_err(cuda)?;
                }
                (Store::F32(kc), vs, None) => {
                    launch::kv_write_f32(g, kc, &k, inp.slots, ahk * adk).map_err(cuda)?;
                    let vc = match (vs, &v) {
                        (Some(Store::F32(vc)), Some(v)) => {
                            launch::kv_write_f32(g, vc, v, inp.slots, ahk * adv).map_err(cuda)?;
                            Some(vc)
                        }
                        (None, None) => None,
                        _ => return Err(input_err("gpu forward_paged", "the cache's value blocks do not match")),
                    };
                    let kc: &CudaSlice<f32> = kc;
                    let vc: &CudaSlice<f32> = vc.map_or(kc, |v| v);
                    for (sp, &r) in inp.spans.iter().zip(inp.row0) {
                        let end = sp.start + sp.len;
                        let nb = end.div_ceil(bs);
                        let kg = self.gather_blocks(kc, &sp.table[..nb], bs * ahk * adk, geo)?;
                        let vg = self.gather_blocks(vc, &sp.table[..nb], bs * ahk * adv, geo)?;
                        let qi = g.clone_range(&q, r * h * adk..(r + sp.len) * h * adk).map_err(cuda)?;
                        let mut oi = self.zeros(sp.len * h * adv)?;
                        let ageo = AttnGeometry {
                            b: 1,
                            t: end,
                            h,
                            hk: ahk,
                            dk: adk,
                            dv: adv,
                            scale: scale as f32,
                        };
                        launch::attention_decode_f32(g, &mut oi, &qi, &kg, &vg, sp.start, sp.len, &ageo)
                            .map_err(cuda)?;
                        g.copy_into(&mut out, r * h * adv, &oi).map_err(cuda)?;
                    }
                }
                _ => {
                    return Err(input_err(
                        "gpu forward_paged",
                        "the cache's blocks do not match its dtype",
                    ))
                }
            }
            let att = if cache.latent {
                self.mla_unabsorb(&out, s, n, cache.kw)?
            } else {
                out
            };
            let ao = self.linear(&att, attn_out(&s.attn), n)?;
            launch::add_inplace_f32(g, &mut x, &ao, n * c).map_err(cuda)?;
            let (ln2, _) = self.norm_rstd(&x, s.ln2, n, c)?;
            // Never expert-parallel: ranks decode on their own.
            let (down, _) = self.mlp(&ln2, s, n, false)?;
            launch::add_inplace_f32(g, &mut x, &down, n * c).map_err(cuda)?;
        }
        Ok(x)
    }

    /// MLA's weight-absorbed queries and latent entries of `n` tokens:
    /// per head `q~ = [W_UK^T q_nope ; q_rope]` `[n, H, w]` and per token
    /// `[c ; k_rope]` `[n, w]` (`w = kv_lora_rank + qk_rope_head_dim`), so
    /// that `q~ . entry = q . k` of the expanded form.
    fn mla_absorb(&self, qkv: &Qkv, s: &LayerSlots, n: usize, w: usize) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
        let (m, kv_b, cn) = self.mla_parts(qkv, s)?;
        let h = self.config.num_heads;
        let (dn, dr, dv, kvl) = (m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank);
        let dk = dn + dr;
        // Entries: the normed latent, then the rotated key (head 0's copy).
        let mut entry = self.zeros(n * w)?;
        self.copy_cols(&mut entry, cn, ColsCopy::plain(n, kvl, (w, 0), (kvl, 0)))?;
        self.copy_cols(&mut entry, &qkv.k, ColsCopy::plain(n, dr, (w, kvl), (h * dk, dn)))?;
        // Queries: W_UK_h^T q_nope_h per head (W_UK_h: rows h (dn + dv) ..
        // + dn of kv_b's weight, [dn, kvl]), then the rotated part.
        let mut qt = self.zeros(n * h * w)?;
        let mut qn = self.zeros(n * dn)?;
        let mut qa = self.zeros(n * kvl)?;
        for hh in 0..h {
            self.copy_cols(&mut qn, &qkv.q, ColsCopy::plain(n, dn, (dn, 0), (h * dk, hh * dk)))?;
            let uk = Slot {
                off: kv_b.w.off + hh * (dn + dv) * kvl,
                len: dn * kvl,
            };
            let shape = MatmulShape {
                m: n,
                k: dn,
                n: kvl,
                trans_a: false,
                trans_b: false,
                accumulate: false,
            };
            self.product(&mut qa.slice_mut(..n * kvl), &qn, self.weight(uk), shape, None)?;
            self.copy_cols(&mut qt, &qa, ColsCopy::plain(n, kvl, (h * w, hh * w), (kvl, 0)))?;
        }
        self.copy_cols(&mut qt, &qkv.q, ColsCopy::plain(n * h, dr, (w, kvl), (dk, dn)))?;
        Ok((qt, entry))
    }

    /// MLA's attention output from the latent form: per head `W_UV o_lat`
    /// (`o_lat` the first `kv_lora_rank` columns of each head's row of
    /// `out [n, H, w]`; W_UV_h: rows h (dn + dv) + dn .. + dv of kv_b's
    /// weight, `[dv, kvl]`), as `[n, H * dv]`.
    fn mla_unabsorb(&self, out: &CudaSlice<f32>, s: &LayerSlots, n: usize, w: usize) -> Result<CudaSlice<f32>> {
        let AttnSlots::Mla { kv_b, .. } = &s.attn else {
            return Err(input_err("gpu forward_paged", "a latent cache for a layer without MLA"));
        };
        let m = self
            .config
            .mla
            .as_ref()
            .ok_or_else(|| input_err("gpu", "MLA slots without an MLA config"))?;
        let h = self.config.num_heads;
        let (dn, dv, kvl) = (m.qk_nope_head_dim, m.v_head_dim, m.kv_lora_rank);
        let mut att = self.zeros(n * h * dv)?;
        let mut ol = self.zeros(n * kvl)?;
        let mut vh = self.zeros(n * dv)?;
        for hh in 0..h {
            self.copy_cols(&mut ol, out, ColsCopy::plain(n, kvl, (kvl, 0), (h * w, hh * w)))?;
            let uv = Slot {
                off: kv_b.w.off + (hh * (dn + dv) + dn) * kvl,
                len: dv * kvl,
            };
            let shape = MatmulShape {
                m: n,
                k: kvl,
                n: dv,
                trans_a: false,
                trans_b: true,
                accumulate: false,
            };
            self.product(&mut vh.slice_mut(..n * dv), &ol, self.weight(uv), shape, None)?;
            self.copy_cols(&mut att, &vh, ColsCopy::plain(n, dv, (h * dv, hh * dv), (dv, 0)))?;
        }
        Ok(att)
    }

    /// An MLA layer's config, `kv_b` projection and normed latent.
    fn mla_parts<'q>(&self, qkv: &'q Qkv, s: &'q LayerSlots) -> Result<(&MlaConfig, &'q Linear, &'q CudaSlice<f32>)> {
        let (AttnSlots::Mla { kv_b, .. }, AttnActs::Mla { cn, .. }) = (&s.attn, &qkv.acts) else {
            return Err(input_err("gpu forward_paged", "a latent cache for a layer without MLA"));
        };
        let m = self
            .config
            .mla
            .as_ref()
            .ok_or_else(|| input_err("gpu", "MLA slots without an MLA config"))?;
        Ok((m, kv_b, cn))
    }

    /// The blocks `table` of one layer's f32 pool side by side: `[blocks,
    /// width]` (width = block_size x the per-position width).
    fn gather_blocks(
        &self,
        pool: &CudaSlice<f32>,
        table: &[u32],
        width: usize,
        geo: &PagedGeometry,
    ) -> Result<CudaSlice<f32>> {
        let mut out = self.zeros(table.len() * width)?;
        launch::embedding_forward_f32(
            &self.gpu,
            &mut out,
            pool,
            TokenIds::Host(table),
            table.len(),
            geo.num_blocks,
            width,
        )
        .map_err(cuda)?;
        Ok(out)
    }

    /// A ragged batch's spans against the pool: they cover the tokens, each
    /// table covers its positions with blocks of the pool, positions stay
    /// within `max_position_embeddings`, and no span writes a shared block.
    pub(super) fn check_paged(&self, tokens: &[u32], spans: &[SeqSpan<'_>], cache: &GpuPagedKvCache) -> Result<()> {
        const OP: &str = "gpu forward_paged";
        let total: usize = spans.iter().map(|s| s.len).sum();
        if total != tokens.len() || spans.is_empty() {
            return Err(input_err(
                OP,
                format!("{} spans cover {total} tokens, {} given", spans.len(), tokens.len()),
            ));
        }
        let vocab = self.config.vocab_size;
        if let Some((i, t)) = tokens.iter().enumerate().find(|(_, &t)| t as usize >= vocab) {
            return Err(input_err(
                OP,
                format!("token {i} is id {t}, outside the vocabulary of {vocab}"),
            ));
        }
        let max_pos = self.config.max_position_embeddings;
        for (i, s) in spans.iter().enumerate() {
            let end = s.start + s.len;
            if s.len == 0 {
                return Err(input_err(OP, format!("sequence {i} has no new tokens")));
            }
            if end > max_pos {
                return Err(input_err(
                    OP,
                    format!("sequence {i}: {end} positions exceed max_position_embeddings {max_pos}"),
                ));
            }
            let nb = cache.blocks_for(end);
            if nb > s.table.len() {
                return Err(input_err(
                    OP,
                    format!("sequence {i}: {} blocks cannot hold {end} positions", s.table.len()),
                ));
            }
            if let Some(&b) = s.table[..nb].iter().find(|&&b| b as usize >= cache.num_blocks()) {
                return Err(input_err(OP, format!("sequence {i}: block {b} is not in the pool")));
            }
            let first = s.start / cache.block_size;
            if let Some(&b) = s.table[first..nb].iter().find(|&&b| cache.is_shared(b)) {
                return Err(input_err(
                    OP,
                    format!("sequence {i} would write into block {b}, which is shared (copy it first)"),
                ));
            }
        }
        Ok(())
    }

    /// Greedy decoding of `max_new` tokens after `prompt` with an f32 paged
    /// cache on the device (as `Model::greedy(prompt, max_new, true)`).
    pub fn greedy(&self, prompt: &[u32], max_new: usize) -> Result<Vec<u32>> {
        const BS: usize = 16;
        let blocks = (prompt.len() + max_new).div_ceil(BS).max(1);
        let mut cache = self.new_paged_cache(BS, blocks, KvDtype::F32)?;
        let mut table = Vec::with_capacity(blocks);
        for _ in 0..blocks {
            table.push(cache.alloc()?);
        }
        let mut out = Vec::with_capacity(max_new);
        let (mut ids, mut start) = (prompt.to_vec(), 0);
        for _ in 0..max_new {
            let span = SeqSpan {
                table: &table,
                start,
                len: ids.len(),
            };
            let logits = self
                .gpu
                .download(&self.forward_paged(&ids, &[span], &mut cache)?)
                .map_err(cuda)?;
            let next = logits
                .iter()
                .enumerate()
                .fold(
                    (0usize, f32::NEG_INFINITY),
                    |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) },
                )
                .0 as u32;
            out.push(next);
            start += ids.len();
            ids = vec![next];
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::KvDtype;

    #[test]
    fn kv_dtypes_parse_by_name_and_size_their_elements() {
        for (name, d, size) in [("bf16", KvDtype::Bf16, 2), ("f32", KvDtype::F32, 4)] {
            let parsed: KvDtype = name.parse().unwrap_or(KvDtype::Bf16);
            assert_eq!((parsed, parsed.size(), parsed.to_string()), (d, size, name.to_string()));
        }
        let e = "fp16"
            .parse::<KvDtype>()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("\"fp16\": expected bf16 or f32"), "{e}");
        assert_eq!(KvDtype::default(), KvDtype::Bf16);
    }
}
