//! A decode step captured as a CUDA graph: the layers, the head and the
//! sampling of `rows` sequences that each take one token, replayed with
//! one driver call (see `aha_cuda_kernels::graph`).
//!
//! Eagerly, a decode step issues about 70 driver calls a layer (launches,
//! allocations, frees, memsets) and a few uploads of its inputs. The graph
//! is captured once for a (rows, table width) bucket, one cache and one
//! set of sampling parameters. Each replay reads its inputs from
//! page-locked staging that the host fills first: the token ids,
//! positions, cache slots, block tables, context lengths and the rows'
//! uniforms. Only the sampled ids and log-probs come back.
//!
//! A batch smaller than its bucket is padded. Pad row `j` takes token 0 at
//! position `j % block_size` of pad block `j / block_size` (modulo the pad
//! blocks given), which no sequence uses. Pad rows that share a slot write
//! the same values (the same token at the same position over the same
//! blocks). Their samples are dropped.
//!
//! bf16 caches only: an f32 cache gathers each sequence's blocks by its
//! host table, which a replay cannot change.

use std::sync::Arc;

use aha_cuda_kernels::cudarc::driver::{CudaSlice, DevicePtr};
use aha_cuda_kernels::graph::{capture, Graph, Staging};
use aha_cuda_kernels::launch::{self, SampleParams, Sampled, SampledToken};
use aha_cuda_kernels::Gpu;

use super::paged::StepIn;
use super::{cuda, GpuModel, GpuPagedKvCache, KvDtype};
use crate::error::{input_err, Result};
use crate::paged::SeqSpan;

const OP: &str = "gpu decode graph";

/// The staged inputs of one bucket.
struct Inputs {
    ids: Staging<u32>,
    pos: Staging<u32>,
    slots: Staging<u32>,
    tables: Staging<i32>,
    ctx: Staging<i32>,
    cu: Staging<i32>,
    u: Staging<f64>,
}

impl Inputs {
    fn new(gpu: &Arc<Gpu>, rows: usize, width: usize) -> Result<Inputs> {
        Ok(Inputs {
            ids: Staging::new(gpu, rows).map_err(cuda)?,
            pos: Staging::new(gpu, rows).map_err(cuda)?,
            slots: Staging::new(gpu, rows).map_err(cuda)?,
            tables: Staging::new(gpu, rows * width).map_err(cuda)?,
            ctx: Staging::new(gpu, rows).map_err(cuda)?,
            cu: Staging::new(gpu, rows + 1).map_err(cuda)?,
            u: Staging::new(gpu, rows).map_err(cuda)?,
        })
    }

    fn upload(&mut self) -> Result<()> {
        self.ids.upload().map_err(cuda)?;
        self.pos.upload().map_err(cuda)?;
        self.slots.upload().map_err(cuda)?;
        self.tables.upload().map_err(cuda)?;
        self.ctx.upload().map_err(cuda)?;
        self.cu.upload().map_err(cuda)?;
        self.u.upload().map_err(cuda)
    }

    /// Writes a step: `spans` (one token each, `tokens[i]` for span `i`)
    /// then pad rows over the `pad` blocks.
    fn fill(&mut self, tokens: &[u32], spans: &[SeqSpan<'_>], u: &[f64], pad: &[u32], bs: usize) {
        let rows = self.ids.len();
        let width = self.tables.len() / rows;
        self.tables.host_mut().fill(0);
        for r in 0..rows {
            let (token, p, table): (u32, usize, &[u32]) = match (spans.get(r), tokens.get(r)) {
                (Some(s), Some(&t)) => (t, s.start, s.table),
                _ => {
                    let j = r.saturating_sub(spans.len());
                    (0, j % bs, std::slice::from_ref(&pad[(j / bs) % pad.len()]))
                }
            };
            let nb = (p + 1).div_ceil(bs);
            self.ids.host_mut()[r] = token;
            self.pos.host_mut()[r] = p as u32;
            self.slots.host_mut()[r] = table[p / bs] * bs as u32 + (p % bs) as u32;
            for (t, &b) in self.tables.host_mut()[r * width..].iter_mut().zip(&table[..nb]) {
                *t = b as i32;
            }
            self.ctx.host_mut()[r] = (p + 1) as i32;
            self.cu.host_mut()[r + 1] = (r + 1) as i32;
            self.u.host_mut()[r] = u.get(r).copied().unwrap_or(0.0);
        }
        self.cu.host_mut()[0] = 0;
    }
}

/// A decode step captured for one bucket (see the module docs).
pub struct DecodeGraph {
    graph: Graph,
    inputs: Inputs,
    out: Sampled,
    rows: usize,
    width: usize,
    cache_id: u64,
    params: SampleParams,
    model: ModelIdentity,
}

/// What a decode graph (and a KV pool shaped for a model) depends on in a
/// model: its config, its device and the device addresses of the buffers a
/// replay reads (the f32 and bf16 weights, the rotary tables). Weights
/// updated in place (the optimizer's step) keep it; weights reallocated
/// (`GpuModel::set_params` uploads a new buffer) change it, and a graph
/// captured before must be captured again.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelIdentity {
    ordinal: usize,
    addresses: [u64; 4],
    config: crate::config::ModelConfig,
}

impl std::fmt::Debug for DecodeGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DecodeGraph({} rows, tables of {})", self.rows, self.width)
    }
}

impl DecodeGraph {
    /// Rows of the bucket.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Block-table entries a row.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Replays the step for `spans` (at most [`DecodeGraph::rows`] of them,
    /// one new token each, `tokens[i]` for span `i`, needing at most
    /// [`DecodeGraph::width`] blocks) with their uniforms `u`, padding the
    /// rest over the `pad` blocks given at capture. Returns the sampled
    /// token of each span (synchronises).
    pub fn run(
        &mut self,
        model: &GpuModel,
        tokens: &[u32],
        spans: &[SeqSpan<'_>],
        u: &[f64],
        cache: &GpuPagedKvCache,
        pad: &[u32],
    ) -> Result<Vec<SampledToken>> {
        if cache.id != self.cache_id {
            return Err(input_err(OP, "replayed against another cache than it was captured for"));
        }
        if model.identity() != self.model {
            return Err(input_err(
                OP,
                "the model's weights moved (reallocated) or it is another model since the capture: capture again",
            ));
        }
        if spans.is_empty() || spans.len() > self.rows {
            return Err(input_err(
                OP,
                format!("{} sequences for a bucket of {} rows", spans.len(), self.rows),
            ));
        }
        launch::check_uniforms(u, spans.len()).map_err(cuda)?;
        model.check_paged(tokens, spans, cache)?;
        for (i, s) in spans.iter().enumerate() {
            if s.len != 1 || cache.blocks_for(s.start + 1) > self.width {
                return Err(input_err(
                    OP,
                    format!(
                        "sequence {i}: {} new tokens at {} do not fit a decode bucket of tables of {}",
                        s.len, s.start, self.width
                    ),
                ));
            }
        }
        check_pad(pad, cache, spans)?;
        self.inputs.fill(tokens, spans, u, pad, cache.block_size);
        self.graph.launch().map_err(cuda)?;
        self.out.read_rows(model.gpu(), spans.len()).map_err(cuda)
    }

    /// The sampling parameters the graph was captured with.
    pub fn params(&self) -> SampleParams {
        self.params
    }

    /// Whether the graph replays `model` against `cache` with `params`:
    /// captured for that pool, with those sampling parameters, over the
    /// weights at their current addresses ([`GpuModel::identity`]).
    pub fn replays(&self, model: &GpuModel, cache: &GpuPagedKvCache, params: &SampleParams) -> bool {
        self.cache_id == cache.id && self.params == *params && self.model == model.identity()
    }
}

/// Pad blocks: some, in the pool, and used by none of the spans.
fn check_pad(pad: &[u32], cache: &GpuPagedKvCache, spans: &[SeqSpan<'_>]) -> Result<()> {
    if pad.is_empty() {
        return Err(input_err(OP, "no pad blocks"));
    }
    if let Some(&b) = pad.iter().find(|&&b| b as usize >= cache.num_blocks()) {
        return Err(input_err(OP, format!("pad block {b} is not in the pool")));
    }
    for (i, s) in spans.iter().enumerate() {
        let nb = cache.blocks_for(s.start + s.len);
        if let Some(b) = s.table[..nb].iter().find(|b| pad.contains(b)) {
            return Err(input_err(OP, format!("sequence {i} uses pad block {b}")));
        }
    }
    Ok(())
}

impl GpuModel {
    /// Captures a decode step of `rows` sequences with block tables of
    /// `width` entries against `cache` (bf16 keys and values), sampling
    /// with `params`; `pad` are blocks of the pool that no sequence will
    /// use (the padding's; `ceil(rows / block_size)` of them avoid shared
    /// pad slots). Runs the step once eagerly over pad rows first (which
    /// write only the pad blocks, and upload the step's index constants,
    /// which a capture may not upload), then captures it.
    pub fn capture_decode(
        &self,
        cache: &mut GpuPagedKvCache,
        rows: usize,
        width: usize,
        params: &SampleParams,
        pad: &[u32],
    ) -> Result<DecodeGraph> {
        if cache.dtype != KvDtype::Bf16 {
            return Err(input_err(OP, "decode graphs need a bf16 cache"));
        }
        if rows == 0 || width == 0 {
            return Err(input_err(OP, format!("{rows} rows with tables of {width}")));
        }
        check_pad(pad, cache, &[])?;
        let bs = cache.block_size;
        let v = self.config.vocab_size;
        let gpu = Arc::clone(self.gpu());
        let mut inputs = Inputs::new(&gpu, rows, width)?;
        let mut out = Sampled::new(&gpu, rows).map_err(cuda)?;
        // The largest slot a replay may write (checked on the host by
        // `run` for every step).
        let max_slot =
            u32::try_from(cache.num_blocks() * bs - 1).map_err(|_| input_err(OP, "the pool's slots exceed u32"))?;
        inputs.fill(&[], &[], &[], pad, bs);
        let geo = self.paged_geometry(cache, rows, rows, width * bs, width);
        let step = |inputs: &mut Inputs, out: &mut Sampled, cache: &mut GpuPagedKvCache| -> Result<()> {
            inputs.upload()?;
            let slots = launch::KvSlots::on_device(inputs.slots.dev(), max_slot);
            let inp = StepIn {
                ids: inputs.ids.dev(),
                pos: inputs.pos.dev(),
                slots: &slots,
                paged: Some((inputs.tables.dev(), inputs.ctx.dev(), inputs.cu.dev())),
                spans: &[],
                row0: &[],
                geo,
            };
            let x = self.layers_paged(&inp, cache)?;
            let logits = self.head_logits(&x, rows)?;
            launch::sample_f32_into(&gpu, out, &logits, v, inputs.u.dev(), params).map_err(cuda)
        };
        // Once eagerly first (the index constants are uploaded then: a
        // capture may not copy from pageable memory), then captured. The
        // captured step's scratch is the graph's own (Gpu::scratch_f32),
        // so what other threads do with the shared pool cannot change it.
        step(&mut inputs, &mut out, cache)?;
        gpu.synchronize().map_err(cuda)?;
        let (graph, ()) = capture(&gpu, || {
            step(&mut inputs, &mut out, cache).map_err(|e| aha_cuda_kernels::Error::InvalidArgument {
                op: "capture_decode",
                msg: e.to_string(),
            })
        })
        .map_err(cuda)?;
        Ok(DecodeGraph {
            graph,
            inputs,
            out,
            rows,
            width,
            cache_id: cache.id,
            params: *params,
            model: self.identity(),
        })
    }

    /// What a decode graph captured over this model depends on (see
    /// [`ModelIdentity`]): equal before and after an in-place update of the
    /// weights, different after a reallocation.
    pub fn identity(&self) -> ModelIdentity {
        let stream = self.gpu.stream();
        let addr = |s: &CudaSlice<f32>| s.device_ptr(stream).0;
        let p16 = self.params16.as_ref().map_or(0, |p| p.device_ptr(stream).0);
        ModelIdentity {
            ordinal: self.gpu.ordinal(),
            addresses: [addr(&self.params), p16, addr(&self.cos), addr(&self.sin)],
            config: self.config.clone(),
        }
    }
}
