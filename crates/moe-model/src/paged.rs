//! A paged key/value cache: fixed-size blocks from one pool per layer, so
//! memory grows with the tokens actually live, and blocks can be shared
//! between sequences (the G samples of one prompt share its prefill).
//!
//! | name | shape |
//! |---|---|
//! | k of a layer | [blocks, block_size, Hk, Dk] |
//! | v of a layer | [blocks, block_size, Hk, Dv] |
//!
//! A sequence owns a block table: position `p` lives in block
//! `table[p / block_size]`, slot `p % block_size`. Blocks are reference
//! counted; a block is written only while its count is 1 (the engine copies
//! a shared partial block before appending to it).

use crate::error::{input_err, Result};

/// Keys and values of one layer, for every block of the pool.
#[derive(Debug, Clone)]
pub struct PagedLayer {
    pub(crate) k: Vec<f32>,
    pub(crate) v: Vec<f32>,
}

/// The block pool of all layers.
#[derive(Debug, Clone)]
pub struct PagedKvCache {
    block_size: usize,
    /// Per-position widths: Hk * Dk and Hk * Dv.
    kw: usize,
    vw: usize,
    pub(crate) layers: Vec<PagedLayer>,
    refs: Vec<u32>,
    free: Vec<u32>,
}

impl PagedKvCache {
    /// A pool of `blocks` blocks of `block_size` positions, for a model with
    /// `layers` layers and per-position key/value widths `kw`, `vw`. Memory is
    /// reserved lazily: the pool grows as blocks are first handed out.
    pub fn new(layers: usize, kw: usize, vw: usize, block_size: usize, blocks: usize) -> PagedKvCache {
        PagedKvCache {
            block_size: block_size.max(1),
            kw,
            vw,
            layers: vec![
                PagedLayer {
                    k: Vec::new(),
                    v: Vec::new()
                };
                layers
            ],
            refs: vec![0; blocks],
            free: (0..blocks as u32).rev().collect(),
        }
    }

    /// Positions per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks not in use.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Blocks in use (live tokens / block size, rounded up per sequence).
    pub fn used_blocks(&self) -> usize {
        self.refs.len() - self.free.len()
    }

    /// Blocks needed to hold `positions` positions.
    pub fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_size)
    }

    /// Bytes of f32 storage currently reserved.
    pub fn reserved_bytes(&self) -> usize {
        self.layers.iter().map(|l| (l.k.len() + l.v.len()) * 4).sum()
    }

    /// Takes a free block (reference count 1), growing storage if needed.
    pub fn alloc(&mut self) -> Result<u32> {
        let b = self
            .free
            .pop()
            .ok_or_else(|| input_err("PagedKvCache::alloc", "out of KV-cache blocks"))?;
        self.refs[b as usize] = 1;
        let need_k = (b as usize + 1) * self.block_size * self.kw;
        let need_v = (b as usize + 1) * self.block_size * self.vw;
        for l in &mut self.layers {
            if l.k.len() < need_k {
                l.k.resize(need_k, 0.0);
            }
            if l.v.len() < need_v {
                l.v.resize(need_v, 0.0);
            }
        }
        Ok(b)
    }

    /// Adds a reference to every block of `table` (sharing a prefix).
    pub fn share(&mut self, table: &[u32]) {
        for &b in table {
            self.refs[b as usize] += 1;
        }
    }

    /// Drops a reference to every block of `table`, freeing unreferenced ones.
    pub fn release(&mut self, table: &[u32]) {
        for &b in table {
            let r = &mut self.refs[b as usize];
            *r = r.saturating_sub(1);
            if *r == 0 {
                self.free.push(b);
            }
        }
    }

    /// A private copy of block `src` (all layers), for copy-on-write.
    pub fn copy_block(&mut self, src: u32) -> Result<u32> {
        let dst = self.alloc()?;
        let (s, d) = (src as usize, dst as usize);
        let (bs, kw, vw) = (self.block_size, self.kw, self.vw);
        for l in &mut self.layers {
            l.k.copy_within(s * bs * kw..(s + 1) * bs * kw, d * bs * kw);
            l.v.copy_within(s * bs * vw..(s + 1) * bs * vw, d * bs * vw);
        }
        Ok(dst)
    }

    /// Is block `b` shared with another sequence?
    pub fn is_shared(&self, b: u32) -> bool {
        self.refs.get(b as usize).is_some_and(|&r| r > 1)
    }

    pub(crate) fn widths(&self) -> (usize, usize) {
        (self.kw, self.vw)
    }
}

/// The new tokens of one sequence in a ragged batch.
#[derive(Debug, Clone, Copy)]
pub struct SeqSpan<'a> {
    /// The sequence's block table (must cover `start + len` positions).
    pub table: &'a [u32],
    /// Position of the first new token.
    pub start: usize,
    /// Number of new tokens.
    pub len: usize,
}

/// Checks that every span's table covers its positions.
pub(crate) fn check_spans(cache: &PagedKvCache, spans: &[SeqSpan<'_>], tokens: usize) -> Result<()> {
    let total: usize = spans.iter().map(|s| s.len).sum();
    if total != tokens {
        return Err(input_err(
            "forward_paged",
            format!("spans cover {total} tokens, {tokens} given"),
        ));
    }
    for (i, s) in spans.iter().enumerate() {
        if s.len == 0 {
            return Err(input_err("forward_paged", format!("sequence {i} has no new tokens")));
        }
        if cache.blocks_for(s.start + s.len) > s.table.len() {
            return Err(input_err(
                "forward_paged",
                format!(
                    "sequence {i}: {} blocks cannot hold {} positions",
                    s.table.len(),
                    s.start + s.len
                ),
            ));
        }
        if let Some(&b) = s.table.iter().find(|&&b| b as usize >= cache.refs.len()) {
            return Err(input_err(
                "forward_paged",
                format!("sequence {i}: block {b} is not in the pool"),
            ));
        }
    }
    Ok(())
}
