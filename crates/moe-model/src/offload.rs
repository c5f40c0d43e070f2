//! AdamW offloaded to the host (ZeRO-Offload's split of the optimizer):
//! the f32 master copy of the trainable parameters and AdamW's two moments
//! live in page-locked host memory, the GPU keeps the weights its products
//! read and the gradients.
//!
//! [`GpuModel::set_offload`] moves the f32 master copy of the trainable
//! parameters (the trainable prefix of the layout: a LoRA model's adapters
//! alone) to page-locked host memory. In bf16 precision the device then keeps the
//! bf16 weights the products read and only the tensors its kernels read in
//! f32 (norms, biases, routers, the embedding: [`GpuModel::f32_resident`]),
//! packed; in f32 precision the products read the f32 weights, which stay.
//! The moments and the staging buffers live in [`HostOptimizer`].
//!
//! One step ([`HostOptimizer::step`]):
//!
//! ```text
//! device:      grad norm (one f64 read back) -> clip coefficient s
//! copy stream: grads[0] -> host   grads[1] -> host   weights[0] -> device   grads[2] -> host ...
//! host:                           AdamW(0, g * s)    AdamW(1, g * s) ...
//! ```
//!
//! The flat trainable prefix is cut into buckets of `bucket_elems`
//! elements. The copy of bucket `b + 1`'s gradients is queued before the
//! host updates bucket `b` (rayon, eight-lane groups:
//! [`aha_tensor::cpu::adamw_step_f32`]), so the transfer overlaps the
//! arithmetic; each updated bucket goes back as soon as it is done: bf16
//! bits (rounded to nearest even, as the device kernels round) into the
//! bf16 weights and the packed f32 tensors it contains, or f32 into the f32
//! weights. Staging is double-buffered (two bucket-sized page-locked
//! buffers each way, a third for a shorter last bucket).
//!
//! Streamed gradients ([`crate::Policy::backward_offload_streamed`], the
//! backward of a step's last micro-batch): the backward reports each part
//! of the gradient buffer as soon as it is complete (head, last layer to
//! first, embedding: [`crate::Layout::grad_ready_parts`]), and the part is
//! queued to a page-locked host copy of the whole trainable gradient on
//! the copy stream (after an event on the work stream), so the copies run
//! while the backward differentiates the earlier layers:
//!
//! ```text
//! work stream: head + layer L-1 bwd   layer L-2 bwd   ...   embedding bwd   grad norm
//! copy stream:                  grads[head, L-1]   grads[L-2]   ...   grads[embed]
//! host:                                                                wait, AdamW(0), AdamW(1) ...
//! ```
//!
//! The step then only waits for the copies still in flight, computes the
//! same norm on the device, runs the same host AdamW over the host copy
//! bucket by bucket and streams the weights back as above. The host copy
//! is used only when it is of the current gradients (the buffer's version,
//! [`GpuModel::grad_version`], has not changed since the backward that
//! streamed it); otherwise the step copies bucket by bucket. The copy
//! holds `4 x trainable` more bytes of page-locked memory (allocated by
//! the first streamed backward).
//!
//! Semantics are the device optimizer's exactly: the same global norm
//! (computed on the device over the trainable prefix), the same clipping
//! coefficient `max_norm / (norm + 1e-6)` applied in f32 when below 1 (here
//! folded into the update instead of a pass over the gradient buffer), the
//! same f32 constants of the bias correction and decoupled weight decay
//! ([`aha_tensor::cpu::AdamwConsts`] derives them as the kernel's launcher
//! does), and the same skip on a non-finite norm.

use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use aha_cuda_kernels::cudarc::driver::sys::CUevent_flags;
use aha_cuda_kernels::cudarc::driver::{
    CudaEvent, CudaStream, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr, PinnedHostSlice, ValidAsZeroBits,
};
use aha_tensor::cpu::{self, AdamW, AdamwConsts};
use rayon::prelude::*;

use crate::error::{input_err, Error, Result};
use crate::gpu::{GpuModel, GpuPrecision, GradReady};

/// Settings of the offloaded optimizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffloadConfig {
    /// Elements per transfer bucket (default 16M: 64 MB of f32 gradients,
    /// large enough that a copy runs at PCIe speed, small enough that the
    /// first bucket's host update starts early).
    pub bucket_elems: usize,
}

impl Default for OffloadConfig {
    fn default() -> OffloadConfig {
        OffloadConfig { bucket_elems: 1 << 24 }
    }
}

/// Where the time of the offloaded steps went, summed over steps.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OffloadTiming {
    /// Steps measured.
    pub steps: u64,
    /// Wall time of the whole optimizer step (norm, copies, host AdamW).
    pub total_s: f64,
    /// The gradient norm on the device (the device optimizer pays it too).
    pub norm_s: f64,
    /// The host AdamW over all buckets.
    pub adamw_s: f64,
    /// Time the copies took: the copy stream's event timings on a GPU; on
    /// a driver that reports none (the emulated GPU, which copies while the
    /// copy is issued) the host time spent issuing them.
    pub copy_s: f64,
    /// Host time neither in the norm nor in AdamW: waiting for a gradient
    /// bucket, issuing copies, the final wait and the bf16 refresh. The
    /// part of the copies that did not overlap the host's arithmetic.
    pub exposed_s: f64,
    /// Steps whose gradients were streamed to the host during the backward.
    pub streamed_steps: u64,
    /// The copies queued during those backwards (device event timings, or
    /// the host time issuing them on a driver that reports none): time
    /// overlapped with the backward.
    pub copy_overlapped_s: f64,
    /// Host time the optimizer step waited for streamed copies still in
    /// flight after the backward: the copy time the backward did not hide.
    pub copy_wait_s: f64,
    /// Host time issuing the updated weights' copies back to the device.
    pub upload_s: f64,
}

impl OffloadTiming {
    /// The share of the copy time hidden behind the host AdamW,
    /// `1 - exposed / copy` clamped to `[0, 1]` (0 when nothing was copied).
    pub fn overlap_fraction(&self) -> f64 {
        if self.copy_s <= 0.0 {
            return 0.0;
        }
        (1.0 - self.exposed_s / self.copy_s).clamp(0.0, 1.0)
    }
}

/// The host side of an offloaded AdamW: per-bucket page-locked moments,
/// gradient (and in bf16, weight) staging buffers and a copy stream. The
/// master weights are the model's ([`GpuModel::set_offload`]).
pub struct HostOptimizer {
    buckets: Vec<Range<usize>>,
    m: Vec<PinnedHostSlice<f32>>,
    v: Vec<PinnedHostSlice<f32>>,
    /// Two bucket-sized gradient staging buffers, and a third of the last
    /// bucket's length when that is shorter (a copy fills its whole
    /// destination).
    stage: Vec<PinnedHostSlice<f32>>,
    /// The same for the bf16 weights going back (bf16 precision only).
    stage16: Vec<PinnedHostSlice<u16>>,
    copy: Arc<CudaStream>,
    /// The gradients streamed to the host by the last streamed backward.
    streamed: Option<Streamed>,
    /// Elements of the trainable prefix.
    trainable: usize,
    /// Elements of the whole parameter buffer (to check the model).
    size: usize,
    timing: OffloadTiming,
}

impl std::fmt::Debug for HostOptimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HostOptimizer({} trainable parameters in {} buckets)",
            self.trainable,
            self.buckets.len()
        )
    }
}

/// A page-locked host copy of the whole trainable gradient, filled part by
/// part during a backward ([`HostOptimizer::grads_ready`]).
struct Streamed {
    host: PinnedHostSlice<f32>,
    /// Elements queued since [`HostOptimizer::begin_stream`].
    queued: usize,
    /// The gradient version the copy holds, once complete.
    version: Option<u64>,
    /// Copy events (start, end) of the parts, and the host time issuing them.
    events: Vec<(CudaEvent, CudaEvent)>,
    issue_s: f64,
}

fn driver(what: &str, e: aha_cuda_kernels::cudarc::driver::DriverError) -> Error {
    input_err("offloaded adamw", format!("{what}: {e:?}"))
}

/// The buckets of `0..n`, `size` elements each (the last one shorter).
pub fn buckets(n: usize, size: usize) -> Vec<Range<usize>> {
    let size = size.max(1);
    (0..n.div_ceil(size))
        .map(|b| b * size..((b + 1) * size).min(n))
        .collect()
}

/// The host view of a page-locked buffer, after its pending copies.
fn read_pinned(p: &PinnedHostSlice<f32>) -> Result<&[f32]> {
    p.as_slice().map_err(|e| driver("reading page-locked host memory", e))
}

/// `len` elements of page-locked host memory, filled with `fill` or zeros.
fn pinned<T: DeviceRepr + ValidAsZeroBits + Copy + Default>(
    gpu: &GpuModel,
    len: usize,
    fill: Option<&[T]>,
) -> Result<PinnedHostSlice<T>> {
    let ctx = gpu.gpu().context();
    let bytes = len * std::mem::size_of::<T>();
    // SAFETY: cuMemHostAlloc of len elements (flags 0: cached, since the
    // host reads these buffers); the memory is uninitialised until the
    // writes just below, and nothing reads it before them.
    let mut p = unsafe { ctx.alloc_pinned_with_flags::<T>(len.max(1), 0) }
        .map_err(|e| driver(&format!("page-locked host allocation of {bytes} bytes"), e))?;
    let s = p.as_mut_slice().map_err(|e| driver("page-locked host memory", e))?;
    match fill {
        Some(x) => {
            s[..len].copy_from_slice(x);
            s[len..].fill(T::default());
        }
        None => s.fill(T::default()),
    }
    Ok(p)
}

/// Two staging buffers of `first` elements, and a third for a shorter
/// last bucket.
fn stages<T: DeviceRepr + ValidAsZeroBits + Copy + Default>(
    gpu: &GpuModel,
    buckets: &[Range<usize>],
) -> Result<Vec<PinnedHostSlice<T>>> {
    let first = buckets.first().map_or(1, |b| b.len());
    let mut s = vec![pinned(gpu, first, None)?, pinned(gpu, first, None)?];
    if let Some(last) = buckets.last().filter(|r| r.len() != first) {
        s.push(pinned(gpu, last.len(), None)?);
    }
    Ok(s)
}

/// The page-locked host bytes an offloaded optimizer holds for a model
/// with `trainable` trainable parameters (the layout's trainable prefix; a
/// LoRA layout's adapters): the f32 master copy and the two moments of
/// each, and the staging buffers of the gradients (f32) and, in bf16, the
/// weights going back (`bf16`). What [`GpuModel::set_offload`] and
/// [`HostOptimizer::new`] allocate; frozen parameters take none.
pub fn host_bytes(trainable: usize, bucket_elems: usize, bf16: bool) -> u64 {
    let b = buckets(trainable, bucket_elems);
    let first = b.first().map_or(1, |r| r.len()) as u64;
    let ragged = b
        .last()
        .filter(|r| r.len() as u64 != first)
        .map_or(0, |r| r.len() as u64);
    let stage = 2 * first + ragged;
    12 * trainable as u64 + 4 * stage + if bf16 { 2 * stage } else { 0 }
}

impl HostOptimizer {
    /// Host state for `gpu`'s trainable prefix (the model must be
    /// offloaded: [`GpuModel::set_offload`]), the moments from `moments`
    /// (host copies covering at least the trainable prefix, as a checkpoint
    /// holds them) or zeros.
    pub fn new(gpu: &GpuModel, cfg: OffloadConfig, moments: Option<(&[f32], &[f32])>) -> Result<HostOptimizer> {
        if cfg.bucket_elems == 0 {
            return Err(input_err("offload bucket_elems", "must be at least 1"));
        }
        if gpu.host_master().is_none() {
            return Err(input_err("offloaded adamw", "the model's weights are not offloaded"));
        }
        let layout = gpu.layout();
        let (trainable, size) = (layout.trainable, layout.size);
        if let Some((m, v)) = moments {
            if m.len() < trainable || v.len() < trainable {
                return Err(input_err(
                    "optimizer state",
                    format!("{} / {} moments for {trainable} trainable parameters", m.len(), v.len()),
                ));
            }
        }
        let buckets = buckets(trainable, cfg.bucket_elems);
        let copy = gpu
            .gpu()
            .context()
            .new_stream()
            .map_err(|e| driver("creating the copy stream", e))?;
        let (mut ms, mut vs) = (Vec::new(), Vec::new());
        for r in &buckets {
            ms.push(pinned(gpu, r.len(), moments.map(|(m, _)| &m[r.clone()]))?);
            vs.push(pinned(gpu, r.len(), moments.map(|(_, v)| &v[r.clone()]))?);
        }
        let stage = stages(gpu, &buckets)?;
        let stage16 = if gpu.precision() == GpuPrecision::Bf16 {
            stages(gpu, &buckets)?
        } else {
            Vec::new()
        };
        Ok(HostOptimizer {
            buckets,
            m: ms,
            v: vs,
            stage,
            stage16,
            copy,
            streamed: None,
            trainable,
            size,
            timing: OffloadTiming::default(),
        })
    }

    /// Before a backward that streams its gradients to the host: allocates
    /// the page-locked copy the first time and forgets the last one.
    pub fn begin_stream(&mut self, gpu: &GpuModel) -> Result<()> {
        if gpu.layout().trainable != self.trainable {
            return Err(input_err(
                "offloaded adamw",
                "the optimizer state belongs to another model",
            ));
        }
        match &mut self.streamed {
            Some(s) => {
                s.queued = 0;
                s.version = None;
                s.events.clear();
                s.issue_s = 0.0;
            }
            None => {
                self.streamed = Some(Streamed {
                    host: pinned(gpu, self.trainable, None)?,
                    queued: 0,
                    version: None,
                    events: Vec::new(),
                    issue_s: 0.0,
                })
            }
        }
        Ok(())
    }

    /// A part of the gradients the backward has completed: queued to the
    /// host copy on the copy stream, after the work queued so far on the
    /// GPU's stream (the part's kernels).
    pub fn grads_ready(&mut self, ready: GradReady<'_>) -> Result<()> {
        let Some(st) = self.streamed.as_mut() else {
            return Err(input_err("offloaded adamw", "gradients streamed without begin_stream"));
        };
        let ti = Instant::now();
        let copy = &self.copy;
        copy.join(ready.gpu.stream())
            .map_err(|e| driver("ordering the copy stream after the backward", e))?;
        let host = st
            .host
            .as_mut_slice()
            .map_err(|e| driver("the streamed gradients", e))?;
        for r in ready.ranges {
            if r.end > self.trainable || r.end > ready.grads.len() {
                return Err(input_err(
                    "offloaded adamw",
                    format!("gradient part {r:?} outside the {} trainable elements", self.trainable),
                ));
            }
            let a = copy
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| driver("recording a copy event", e))?;
            let src = ready.grads.slice(r.clone());
            let (ptr, _record) = src.device_ptr(copy);
            // SAFETY: cuMemcpyDtoHAsync of r.len() f32 from the gradient
            // buffer's range r (inside it: checked above) into the same
            // range of the page-locked host copy (trainable elements long);
            // the backward writes this range no more, and the host reads
            // the copy only after synchronising the copy stream.
            unsafe {
                aha_cuda_kernels::cudarc::driver::result::memcpy_dtoh_async(&mut host[r.clone()], ptr, copy.cu_stream())
            }
            .map_err(|e| driver("copying gradients to the host", e))?;
            let b = copy
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| driver("recording a copy event", e))?;
            st.events.push((a, b));
            st.queued += r.len();
        }
        st.issue_s += ti.elapsed().as_secs_f64();
        Ok(())
    }

    /// After the streaming backward: the host copy holds gradient version
    /// `version` ([`GpuModel::grad_version`]) when every trainable element
    /// was queued.
    pub fn end_stream(&mut self, version: u64) {
        if let Some(st) = self.streamed.as_mut() {
            st.version = (st.queued == self.trainable).then_some(version);
        }
    }

    /// The page-locked host bytes of the moments and the staging buffers,
    /// counted from their lengths (the host gradient copy of a streamed
    /// backward, `4 x trainable` more once allocated, is not counted: it is
    /// allocated on first use only).
    pub fn pinned_bytes(&self) -> u64 {
        let f32s: usize = self.m.iter().chain(&self.v).chain(&self.stage).map(|p| p.len()).sum();
        let bf16s: usize = self.stage16.iter().map(|p| p.len()).sum();
        4 * f32s as u64 + 2 * bf16s as u64
    }

    /// The timings summed since the last [`HostOptimizer::take_timing`].
    pub fn take_timing(&mut self) -> OffloadTiming {
        std::mem::take(&mut self.timing)
    }

    /// Host copies `(m, v)` of the trainable prefix (as the device
    /// optimizer's moments cover it).
    pub fn moments_to_host(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        let (mut m, mut v) = (vec![0f32; self.trainable], vec![0f32; self.trainable]);
        for (i, r) in self.buckets.iter().enumerate() {
            m[r.clone()].copy_from_slice(&read_pinned(&self.m[i])?[..r.len()]);
            v[r.clone()].copy_from_slice(&read_pinned(&self.v[i])?[..r.len()]);
        }
        Ok((m, v))
    }

    /// Global-norm clipping to `max_norm` and AdamW step `t` of `gpu`'s
    /// trainable prefix on the host (see the module docs). Returns the
    /// gradient norm before clipping; a non-finite norm changes nothing.
    pub fn step(&mut self, gpu: &mut GpuModel, h: &AdamW, t: u64, max_norm: f64) -> Result<f64> {
        if gpu.layout().trainable != self.trainable || gpu.layout().size != self.size {
            return Err(input_err(
                "offloaded adamw",
                "the optimizer state belongs to another model",
            ));
        }
        let c = AdamwConsts::new(h, t).map_err(Error::Tensor)?;
        let t0 = Instant::now();
        let norm = gpu.grad_norm()?;
        let t_norm = t0.elapsed().as_secs_f64();
        if !norm.is_finite() {
            return Ok(norm);
        }
        let coef = max_norm / (norm + 1e-6);
        let scale = if coef < 1.0 { coef as f32 } else { 1.0 };
        let main = gpu.gpu().stream().clone();
        let copy = self.copy.clone();
        // The copy stream starts after everything queued so far (the
        // backward that wrote the gradients).
        copy.join(&main).map_err(|e| driver("ordering the copy stream", e))?;
        let (mut adamw_s, mut issue_s, mut upload_s) = (0f64, 0f64, 0f64);
        let mut events: Vec<(CudaEvent, CudaEvent)> = Vec::new();
        // The gradients streamed during the backward, when they are the
        // current ones: wait for the copies still in flight.
        let version = gpu.grad_version();
        let mut streamed = self.streamed.take();
        let use_streamed = streamed.as_ref().is_some_and(|s| s.version == Some(version));
        let mut copy_wait_s = 0f64;
        if use_streamed {
            let tw = Instant::now();
            copy.synchronize()
                .map_err(|e| driver("finishing the streamed gradient copies", e))?;
            copy_wait_s = tw.elapsed().as_secs_f64();
        }
        let timed = |s: &Arc<CudaStream>| {
            s.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| driver("recording a copy event", e))
        };
        {
            let (grads, params, mut p16, master, resident) = gpu.offload_parts()?;
            // The master copy's one event covers the whole buffer; the
            // copies below read disjoint ranges of it through raw pointers
            // and the step ends with both streams synchronised, so the
            // host's writes of the next step cannot race them.
            let master = master.as_mut_slice().map_err(|e| driver("master weights", e))?;
            let nb = self.buckets.len();
            let buckets = &self.buckets;
            let fetch =
                |b: usize, stage: &mut PinnedHostSlice<f32>, ev: &mut Vec<(CudaEvent, CudaEvent)>| -> Result<f64> {
                    let ti = Instant::now();
                    let a = timed(&copy)?;
                    copy.memcpy_dtoh(&grads.slice(buckets[b].clone()), stage)
                        .map_err(|e| driver("copying gradients to the host", e))?;
                    ev.push((a, timed(&copy)?));
                    Ok(ti.elapsed().as_secs_f64())
                };
            // The staging buffer of bucket b: alternating, the ragged last
            // bucket in its own.
            let ragged = self.stage.len() == 3;
            let slot = |b: usize| if b + 1 == nb && ragged { 2 } else { b % 2 };
            let host_grads = match streamed.as_ref().filter(|_| use_streamed) {
                Some(st) => Some(st.host.as_slice().map_err(|e| driver("the streamed gradients", e))?),
                None => None,
            };
            if nb > 0 && host_grads.is_none() {
                issue_s += fetch(0, &mut self.stage[slot(0)], &mut events)?;
            }
            for b in 0..nb {
                if b + 1 < nb && host_grads.is_none() {
                    issue_s += fetch(b + 1, &mut self.stage[slot(b + 1)], &mut events)?;
                }
                let r = self.buckets[b].clone();
                let g = match host_grads {
                    Some(h) => &h[r.clone()],
                    None => self.stage[slot(b)]
                        .as_slice()
                        .map_err(|e| driver("waiting for a gradient bucket", e))?,
                };
                let ta = Instant::now();
                let m = self.m[b].as_mut_slice().map_err(|e| driver("first moment", e))?;
                let v = self.v[b].as_mut_slice().map_err(|e| driver("second moment", e))?;
                let n = r.len();
                let p = &mut master[r.clone()];
                cpu::adamw_step_f32(p, &g[..n], &mut m[..n], &mut v[..n], &c, scale).map_err(Error::Tensor)?;
                // bf16: the bits the products read, rounded as the device
                // kernels round (nearest even).
                let bits = match (&mut p16, self.stage16.get_mut(slot(b))) {
                    (Some(_), Some(st)) => {
                        let out = st.as_mut_slice().map_err(|e| driver("bf16 staging", e))?;
                        out[..n]
                            .par_chunks_mut(1 << 15)
                            .zip(p.par_chunks(1 << 15))
                            .for_each(|(o, x)| {
                                for (o, &x) in o.iter_mut().zip(x) {
                                    *o = half::bf16::from_f32(x).to_bits();
                                }
                            });
                        Some(st)
                    }
                    _ => None,
                };
                adamw_s += ta.elapsed().as_secs_f64();
                let ti = Instant::now();
                let a = timed(&copy)?;
                match (bits, p16.as_deref_mut(), resident) {
                    (Some(st), Some(p16), Some(res)) => {
                        copy.memcpy_htod(&*st, &mut p16.slice_mut(r.clone()))
                            .map_err(|e| driver("copying bf16 weights to the device", e))?;
                        // The packed f32 tensors inside this bucket.
                        for &(off, len, at) in res {
                            let (lo, hi) = (off.max(r.start), (off + len).min(r.end));
                            if lo < hi {
                                let dst = at + lo - off..at + hi - off;
                                htod_raw(&copy, &master[lo..hi], &mut params.slice_mut(dst))?;
                            }
                        }
                    }
                    _ => htod_raw(&copy, &master[r.clone()], &mut params.slice_mut(r))?,
                }
                events.push((a, timed(&copy)?));
                issue_s += ti.elapsed().as_secs_f64();
                upload_s += ti.elapsed().as_secs_f64();
            }
        }
        // Later work on the main stream (the next forward, the next
        // zero_grad) waits for the copies; the host waits for both.
        main.join(&copy).map_err(|e| driver("joining the copy stream", e))?;
        copy.synchronize().map_err(|e| driver("finishing the copies", e))?;
        main.synchronize().map_err(|e| driver("finishing the step", e))?;
        let total = t0.elapsed().as_secs_f64();
        let mut device_copy = 0f64;
        for (a, b) in &events {
            device_copy += f64::from(a.elapsed_ms(b).map_err(|e| driver("reading copy timings", e))?) / 1e3;
        }
        let tm = &mut self.timing;
        if let Some(st) = streamed.as_mut().filter(|_| use_streamed) {
            let mut overlapped = 0f64;
            for (a, b) in &st.events {
                overlapped += f64::from(a.elapsed_ms(b).map_err(|e| driver("reading copy timings", e))?) / 1e3;
            }
            tm.streamed_steps += 1;
            tm.copy_overlapped_s += if overlapped > 0.0 { overlapped } else { st.issue_s };
            tm.copy_wait_s += copy_wait_s;
            // The copy is spent: the next step streams or fetches anew.
            st.version = None;
        }
        self.streamed = streamed;
        tm.upload_s += upload_s;
        tm.steps += 1;
        tm.total_s += total;
        tm.norm_s += t_norm;
        tm.adamw_s += adamw_s;
        tm.copy_s += if device_copy > 0.0 { device_copy } else { issue_s };
        tm.exposed_s += (total - t_norm - adamw_s).max(0.0);
        Ok(norm)
    }
}

/// Queues `src` (page-locked host memory) into `dst` on `stream`.
fn htod_raw(stream: &Arc<CudaStream>, src: &[f32], dst: &mut CudaViewMut<'_, f32>) -> Result<()> {
    if dst.len() != src.len() {
        return Err(input_err(
            "offloaded adamw",
            format!("copying {} values into {}", src.len(), dst.len()),
        ));
    }
    let (ptr, _record) = dst.device_ptr_mut(stream);
    // SAFETY: cuMemcpyHtoDAsync of src.len() f32 into a device range of the
    // same length; src is page-locked memory owned by the model's host
    // master copy, which is neither written nor freed before the stream is
    // synchronised at the end of the step.
    unsafe { aha_cuda_kernels::cudarc::driver::result::memcpy_htod_async(ptr, src, stream.cu_stream()) }
        .map_err(|e| driver("copying weights to the device", e))
}
