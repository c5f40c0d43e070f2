//! CUDA graphs: a stream's work captured once and replayed with one driver
//! call.
//!
//! A decode step issues a few thousand driver calls (launches, allocations,
//! memsets, copies); each costs host time that a GPU step of a few
//! milliseconds cannot hide. [`capture`] records the work a closure issues
//! on the device's stream into a [`Graph`]; [`Graph::launch`] replays it.
//!
//! What a captured closure may do is what CUDA allows during a capture:
//! launches, cuBLAS products, memsets, device copies, stream-ordered
//! allocations (they belong to the graph and keep their address at every
//! replay; the closure's temporaries are freed inside it) and copies from
//! page-locked host memory ([`Staging`]: the replay reads the host buffer
//! as it is at the replay, which is how a step gets new inputs). It may not
//! synchronise, copy to the host, copy from pageable memory, or free a
//! buffer made outside the capture: the capture fails with the driver's
//! error and nothing is recorded. Buffers the closure reads or writes that
//! outlive it (weights, the KV cache, the step's inputs and outputs) must
//! stay at the same address for as long as the graph is replayed.
//!
//! Caching-pool scratch ([`Gpu::scratch_f32`]) taken during a capture is
//! not the pool's: it is a stream-ordered allocation the graph owns, freed
//! inside the graph when the closure drops it, so the graph's scratch
//! stays its own for as long as it lives (a pooled buffer would go back to
//! the cache, where other work could take it or an emptied cache free it
//! under the graph). Scratch must therefore not outlive the closure.
//!
//! The emulated GPU implements capture and replay with the same rules (it
//! refuses what a GPU refuses), so the paths that use graphs are tested on
//! every machine. `AHA_CUDA_SYNC=1` (a synchronise after every launch)
//! skips the launches being captured; a fault in a replay shows at the
//! next synchronise after it.

use std::cell::Cell;
use std::sync::Arc;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaSlice, DevicePtrMut, DeviceRepr};

use crate::error::{DriverContext, Error, Result};
use crate::Gpu;

/// A captured piece of work (see the module docs).
pub struct Graph {
    graph: CudaGraph,
    /// Keeps the device (and its stream) alive as long as the graph.
    _gpu: Arc<Gpu>,
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Graph")
    }
}

impl Graph {
    /// Replays the captured work on the device's stream (one driver call;
    /// asynchronous like a launch).
    pub fn launch(&self) -> Result<()> {
        self.graph.launch().ctx("cuGraphLaunch")
    }
}

thread_local! {
    static CAPTURING: Cell<bool> = const { Cell::new(false) };
}

/// Whether the calling thread is capturing (scratch is then the graph's,
/// not the pool's).
pub(crate) fn capturing() -> bool {
    CAPTURING.with(|c| c.get())
}

/// Captures the work `f` issues on `gpu`'s stream (without running it) and
/// returns it as a [`Graph`] with `f`'s result. When `f` fails, or does
/// something a capture forbids, the capture is ended and discarded and the
/// error returned.
pub fn capture<R>(gpu: &Arc<Gpu>, f: impl FnOnce() -> Result<R>) -> Result<(Graph, R)> {
    let stream = gpu.stream();
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .ctx("cuStreamBeginCapture")?;
    CAPTURING.with(|c| c.set(true));
    let out = f();
    CAPTURING.with(|c| c.set(false));
    let ended = stream.end_capture(CUgraphInstantiate_flags(0));
    let r = out?;
    let graph = ended.ctx("cuStreamEndCapture")?.ok_or(Error::InvalidArgument {
        op: "capture",
        msg: "the capture recorded nothing".into(),
    })?;
    Ok((
        Graph {
            graph,
            _gpu: Arc::clone(gpu),
        },
        r,
    ))
}

/// A page-locked host buffer and its device twin: the host writes
/// [`Staging::host_mut`], and [`Staging::upload`] (also inside a capture,
/// where the replay copies whatever the host buffer holds then) brings it
/// to [`Staging::dev`].
pub struct Staging<T: DeviceRepr> {
    host: *mut T,
    len: usize,
    dev: CudaSlice<T>,
    gpu: Arc<Gpu>,
}

// SAFETY: the host pointer is page-locked memory owned by this value alone
// (allocated in `new`, freed in `drop`); it is only reached through `&self`
// / `&mut self`.
unsafe impl<T: DeviceRepr + Send> Send for Staging<T> {}
// SAFETY: as above; shared access only reads.
unsafe impl<T: DeviceRepr + Sync> Sync for Staging<T> {}

impl<T: DeviceRepr + Default + Copy> Staging<T> {
    /// `len` elements (at least one), zeroed on the host and the device.
    pub fn new(gpu: &Arc<Gpu>, len: usize) -> Result<Staging<T>> {
        let len = len.max(1);
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or(Error::InvalidArgument {
                op: "Staging::new",
                msg: format!("{len} elements overflow"),
            })?;
        gpu.context().bind_to_thread().ctx("bind_to_thread")?;
        // SAFETY: a plain page-locked allocation of `bytes`, freed in drop.
        let host = unsafe { cudarc::driver::result::malloc_host(bytes, 0) }.ctx("cuMemHostAlloc")? as *mut T;
        // SAFETY: `host` holds `len` elements of T, which is plain data.
        unsafe { std::slice::from_raw_parts_mut(host, len) }.fill(T::default());
        let dev = match gpu.upload(&vec![T::default(); len]) {
            Ok(d) => d,
            Err(e) => {
                // SAFETY: allocated above, not yet shared.
                let _ = unsafe { cudarc::driver::result::free_host(host as _) };
                return Err(e);
            }
        };
        Ok(Staging {
            host,
            len,
            dev,
            gpu: Arc::clone(gpu),
        })
    }

    /// The host side, to fill before an upload or a replay. The caller
    /// must not write it while a queued copy may still read it (a step
    /// that ends in a download has synchronised the stream).
    pub fn host_mut(&mut self) -> &mut [T] {
        // SAFETY: `host` holds `len` elements, exclusively borrowed here.
        unsafe { std::slice::from_raw_parts_mut(self.host, self.len) }
    }

    /// The device side.
    pub fn dev(&self) -> &CudaSlice<T> {
        &self.dev
    }

    /// Elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false (a staging buffer holds at least one element).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queues the copy of the host side to the device side on the
    /// device's stream (from page-locked memory: capturable).
    pub fn upload(&mut self) -> Result<()> {
        let stream = self.gpu.stream().clone();
        let (dst, _guard) = self.dev.device_ptr_mut(&stream);
        // SAFETY: `host` holds `len` elements and lives as long as self;
        // `dst` is the device buffer of the same length.
        unsafe {
            let src = std::slice::from_raw_parts(self.host, self.len);
            cudarc::driver::result::memcpy_htod_async(dst, src, stream.cu_stream())
        }
        .ctx("memcpy_htod_async (staging)")
    }
}

impl<T: DeviceRepr> Drop for Staging<T> {
    fn drop(&mut self) {
        // The stream may still read the host side.
        let _ = self.gpu.synchronize();
        // SAFETY: allocated by malloc_host in `new`, freed once.
        let _ = unsafe { cudarc::driver::result::free_host(self.host as _) };
    }
}
