//! Device detection and the per-device state: context, stream, compiled modules.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use cudarc::nvrtc::Ptx;

use crate::cache::compile_cached;
use crate::error::{DriverContext, Error, Result};
use crate::nvrtc::Output;
use crate::pool::{CachingPool, PoolStats, Pooled};
use crate::registry::KernelId;

/// The number of CUDA devices, or 0 where there is no driver or no device.
///
/// Never panics: the driver library is probed before any call into it.
pub fn device_count() -> usize {
    probe().map(|n| n as usize).unwrap_or(0)
}

/// Why there is no GPU, or `None` when there is one.
pub fn no_gpu_reason() -> Option<String> {
    probe().err()
}

fn probe() -> std::result::Result<i32, String> {
    static COUNT: OnceLock<std::result::Result<i32, String>> = OnceLock::new();
    COUNT
        .get_or_init(|| {
            if crate::emulate::emulated_gpu_requested() {
                crate::emulate::install_emulated_gpu()
                    .map_err(|e| format!("AHA_EMULATED_GPU=1 but the emulated GPU could not be built: {e}"))?;
            }
            // SAFETY: only tries to open the driver library.
            if !unsafe { cudarc::driver::sys::is_culib_present() } {
                return Err("the CUDA driver library (libcuda.so) is not installed".into());
            }
            // cudarc panics if a symbol is missing from an unusual driver;
            // contain that so detection itself can never take the process down.
            match std::panic::catch_unwind(CudaContext::device_count) {
                Ok(Ok(0)) => Err("the CUDA driver reports no device".into()),
                Ok(Ok(n)) => Ok(n),
                Ok(Err(e)) => Err(format!("cuInit / cuDeviceGetCount failed: {e}")),
                Err(_) => Err("the CUDA driver library could not be used".into()),
            }
        })
        .clone()
}

/// One GPU: its context, the stream all work goes on, and the kernel modules
/// compiled for it (each `kernels/` file once, on first use).
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    cc: (u32, u32),
    name: String,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    pool_f32: CachingPool<CudaSlice<f32>>,
    pool_f64: CachingPool<CudaSlice<f64>>,
    blas: OnceLock<std::result::Result<Arc<cudarc::cublas::CudaBlas>, String>>,
    /// Small constant buffers by value ([`Gpu::constant_u32`]).
    constants: Mutex<HashMap<Vec<u32>, Arc<CudaSlice<u32>>>>,
}

/// Constant buffers kept at most; past it the cache starts over.
const MAX_CONSTANTS: usize = 4096;

/// Bytes of scratch each of a device's pools keeps cached.
const POOL_CACHE_BYTES: usize = 1 << 30;

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Gpu({}, {}, sm_{}{})",
            self.ctx.ordinal(),
            self.name,
            self.cc.0,
            self.cc.1
        )
    }
}

impl Gpu {
    /// The shared handle for device `ordinal`, created on first use.
    pub fn get(ordinal: usize) -> Result<Arc<Gpu>> {
        static GPUS: OnceLock<Mutex<HashMap<usize, Arc<Gpu>>>> = OnceLock::new();
        let n = probe().map_err(|reason| Error::NoGpu { reason })? as usize;
        if ordinal >= n {
            return Err(Error::NoGpu {
                reason: format!("device {ordinal} requested, {n} present"),
            });
        }
        let map = GPUS.get_or_init(|| Mutex::new(HashMap::new()));
        let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(g) = map.get(&ordinal) {
            return Ok(g.clone());
        }
        let ctx = CudaContext::new(ordinal).ctx("CudaContext::new")?;
        let (major, minor) = ctx.compute_capability().ctx("compute_capability")?;
        let name = ctx.name().ctx("device name")?;
        // All work goes on one created stream: the legacy default stream
        // cannot be captured into a CUDA graph (crate::graph). aha orders
        // its few other streams explicitly (the optimizer offload's copy
        // stream joins this one and is joined back), so cudarc's
        // per-buffer events are off: they would cost two events an
        // allocation, and a capture cannot wait on events recorded before
        // it.
        // SAFETY: before any buffer of this context exists; see above for
        // how the streams are ordered.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().ctx("creating the work stream")?;
        let gpu = Arc::new(Gpu {
            ctx,
            stream,
            cc: (major as u32, minor as u32),
            name,
            modules: Mutex::new(HashMap::new()),
            pool_f32: CachingPool::new(4, POOL_CACHE_BYTES),
            pool_f64: CachingPool::new(8, POOL_CACHE_BYTES),
            blas: OnceLock::new(),
            constants: Mutex::new(HashMap::new()),
        });
        map.insert(ordinal, gpu.clone());
        Ok(gpu)
    }

    /// The device's ordinal.
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// Free and total device memory in bytes (`cuMemGetInfo`).
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.ctx.bind_to_thread().ctx("bind context")?;
        cudarc::driver::result::mem_get_info().ctx("cuMemGetInfo")
    }

    /// The device's context (for a second stream, events or page-locked
    /// host memory).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every launch of ours is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Compute capability, such as (9, 0) for an H100.
    pub fn compute_capability(&self) -> (u32, u32) {
        self.cc
    }

    /// The device's marketing name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this is the emulated GPU (`AHA_EMULATED_GPU=1`: the kernels
    /// run on the CPU through `emulate`), where hardware-scale tests and
    /// timings mean nothing.
    pub fn is_emulated(&self) -> bool {
        self.name == crate::emulate::EMULATED_DEVICE_NAME
    }

    /// The kernel `id`, compiling its source file for this device on first use.
    pub fn function(&self, id: KernelId) -> Result<CudaFunction> {
        let module = {
            let mut modules = self.modules.lock().unwrap_or_else(|p| p.into_inner());
            match modules.get(id.file()) {
                Some(m) => m.clone(),
                None => {
                    let src = id.source().ok_or_else(|| Error::InvalidArgument {
                        op: "Gpu::function",
                        msg: format!("{} is not in the registry", id.file()),
                    })?;
                    let cubin = compile_cached(src, self.cc, Output::Cubin)?;
                    let m = self.ctx.load_module(Ptx::from_binary(cubin)).ctx("load_module")?;
                    modules.insert(id.file(), m.clone());
                    m
                }
            }
        };
        module.load_function(id.symbol()).ctx("load_function")
    }

    /// Copies a host slice to a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream.clone_htod(host).ctx("upload")
    }

    /// Copies a device buffer back to the host (synchronises the stream).
    pub fn download<T: DeviceRepr>(&self, dev: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream.clone_dtoh(dev).ctx("download")
    }

    /// A device-side copy of a buffer.
    pub fn clone_dtod<T: DeviceRepr>(&self, src: &CudaSlice<T>) -> Result<CudaSlice<T>> {
        self.stream.clone_dtod(src).ctx("clone_dtod")
    }

    /// A new buffer holding elements `range` of `src` (copied on the device).
    pub fn clone_range<T: DeviceRepr>(
        &self,
        src: &CudaSlice<T>,
        range: std::ops::Range<usize>,
    ) -> Result<CudaSlice<T>> {
        if range.start > range.end || range.end > src.len() {
            return Err(Error::InvalidArgument {
                op: "clone_range",
                msg: format!("{range:?} outside a buffer of {}", src.len()),
            });
        }
        self.stream.clone_dtod(&src.slice(range)).ctx("clone_dtod")
    }

    /// Copies `src` into `dst` at element `offset` (on the device).
    pub fn copy_into<T: DeviceRepr>(&self, dst: &mut CudaSlice<T>, offset: usize, src: &CudaSlice<T>) -> Result<()> {
        let end = offset
            .checked_add(src.len())
            .filter(|&e| e <= dst.len())
            .ok_or(Error::InvalidArgument {
                op: "copy_into",
                msg: format!(
                    "{} elements at {offset} do not fit a buffer of {}",
                    src.len(),
                    dst.len()
                ),
            })?;
        let mut view = dst.slice_mut(offset..end);
        self.stream.memcpy_dtod(src, &mut view).ctx("memcpy_dtod")
    }

    /// Copies elements `range` of `src` into `dst` at element `offset` (on
    /// the device, one copy, no temporary).
    pub fn copy_range<T: DeviceRepr>(
        &self,
        dst: &mut CudaSlice<T>,
        offset: usize,
        src: &CudaSlice<T>,
        range: std::ops::Range<usize>,
    ) -> Result<()> {
        let n = range.end.saturating_sub(range.start);
        let end = offset.checked_add(n).filter(|&e| e <= dst.len());
        let (Some(end), true) = (end, range.start <= range.end && range.end <= src.len()) else {
            return Err(Error::InvalidArgument {
                op: "copy_range",
                msg: format!(
                    "{range:?} of a buffer of {} to {offset} of a buffer of {}",
                    src.len(),
                    dst.len()
                ),
            });
        };
        let mut view = dst.slice_mut(offset..end);
        self.stream.memcpy_dtod(&src.slice(range), &mut view).ctx("memcpy_dtod")
    }

    /// A zeroed device buffer of `len` elements.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros(len).ctx("alloc_zeros")
    }

    /// A device buffer holding `values`, uploaded once and shared by every
    /// caller asking for the same values (small index constants such as a
    /// single segment's offsets). Taken from the cache, it needs no upload,
    /// so work that runs once eagerly can then be captured into a CUDA
    /// graph (crate::graph); a value first asked for during a capture is
    /// refused (an upload from pageable memory).
    pub fn constant_u32(&self, values: &[u32]) -> Result<Arc<CudaSlice<u32>>> {
        let mut map = self.constants.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = map.get(values) {
            return Ok(Arc::clone(b));
        }
        if map.len() >= MAX_CONSTANTS && !crate::graph::capturing() {
            map.clear();
        }
        let b = Arc::new(self.upload(values)?);
        map.insert(values.to_vec(), Arc::clone(&b));
        Ok(b)
    }

    /// A zeroed f32 scratch buffer of `len` elements from the device's
    /// caching pool; it goes back to the pool when dropped. While the
    /// calling thread captures a CUDA graph (crate::graph) the buffer is
    /// a new stream-ordered allocation that the graph owns, freed inside
    /// the capture when dropped: a pooled buffer would return to the cache
    /// and could be freed or handed to other work while the graph still
    /// replays over it.
    pub fn scratch_f32(&self, len: usize) -> Result<Pooled<'_, CudaSlice<f32>>> {
        if crate::graph::capturing() {
            return self.pool_f32.take_uncached(len, |n| self.zeros(n));
        }
        self.pool_f32.take(
            len,
            |n| self.zeros(n),
            |b| self.stream.memset_zeros(b).ctx("memset_zeros"),
        )
    }

    /// [`Gpu::scratch_f32`] for f64.
    pub fn scratch_f64(&self, len: usize) -> Result<Pooled<'_, CudaSlice<f64>>> {
        if crate::graph::capturing() {
            return self.pool_f64.take_uncached(len, |n| self.zeros(n));
        }
        self.pool_f64.take(
            len,
            |n| self.zeros(n),
            |b| self.stream.memset_zeros(b).ctx("memset_zeros"),
        )
    }

    /// The device's cuBLAS handle on our stream, created on first use.
    pub fn blas(&self) -> Result<Arc<cudarc::cublas::CudaBlas>> {
        self.blas
            .get_or_init(|| {
                // cudarc panics when libcublas is missing; contain it.
                match std::panic::catch_unwind(|| cudarc::cublas::CudaBlas::new(self.stream.clone())) {
                    Ok(Ok(b)) => Ok(Arc::new(b)),
                    Ok(Err(e)) => Err(format!("cublasCreate failed: {e:?}")),
                    Err(_) => Err("the cuBLAS library (libcublas.so.13) could not be loaded".into()),
                }
            })
            .clone()
            .map_err(|msg| Error::Blas {
                op: "cublasCreate",
                msg,
            })
    }

    /// Frees the scratch the pools keep cached (buffers on loan stay
    /// valid and are cached again when given back).
    pub fn empty_scratch_cache(&self) {
        self.pool_f32.empty_cache();
        self.pool_f64.empty_cache();
    }

    /// The f32 and f64 scratch pools' counters.
    pub fn pool_stats(&self) -> (PoolStats, PoolStats) {
        (self.pool_f32.stats(), self.pool_f64.stats())
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().ctx("synchronize")
    }
}
