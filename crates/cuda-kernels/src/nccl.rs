//! NCCL, loaded at run time: the collectives aha's data parallelism uses
//! (all-reduce, reduce-scatter, all-gather, broadcast) and the all-to-all
//! of expert parallelism (grouped ncclSend/ncclRecv) on flat device
//! buffers, with errors that name the rank and the operation, and a
//! watchdog so that a dead peer gives an error instead of a hang.
//!
//! The library is bound here with `libloading` rather than through cudarc's
//! `nccl` feature: cudarc 0.19.10 looks NCCL up only by names
//! (`libnccl.so`, `libnccl.so.13`, `.12`, ... `.1`) and never
//! `libnccl.so.2`, the name every NCCL 2 release and the pip wheel
//! (`nvidia/nccl/lib/libnccl.so.2`) ship under, and it has no way to be
//! given a path. [`find_library`] searches, in order: `AHA_NCCL_LIB` (a
//! file), the emulated NCCL when `AHA_EMULATED_GPU=1`
//! ([`crate::emulate::emulated_nccl_path`]), the loader's own search
//! (`LD_LIBRARY_PATH`, the ldconfig cache), the CUDA installs
//! (`$CUDA_HOME`, `$CUDA_PATH`, `/usr/local/cuda`, `$AHA_CUDA_ROOT`) and
//! Python environments' `nvidia/nccl/lib` (`$VIRTUAL_ENV`, `$CONDA_PREFIX`,
//! `~/.local`, `/usr/local/lib`, `/usr/lib`). Nothing is loaded until a
//! communicator is wanted, so the binary builds and runs without NCCL.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use crate::{Error, Gpu, Result};

/// NCCL's opaque rendezvous token (`ncclUniqueId`, 128 bytes): rank 0
/// creates it and every rank passes the same bytes to [`Comm::init`].
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct UniqueId(pub [u8; 128]);

impl std::fmt::Debug for UniqueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UniqueId(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "..)")
    }
}

/// NCCL's data types, as its header numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    /// `ncclFloat32`.
    F32 = 7,
    /// `ncclFloat64`.
    F64 = 8,
    /// `ncclBfloat16` (aha keeps bf16 bits in `u16` buffers).
    Bf16 = 9,
}

impl DataType {
    fn size(self) -> usize {
        match self {
            DataType::F32 => 4,
            DataType::F64 => 8,
            DataType::Bf16 => 2,
        }
    }
}

/// Element types a collective can move: the buffer's Rust type and its
/// NCCL type.
pub trait NcclElem: cudarc::driver::DeviceRepr {
    /// The NCCL type of the elements.
    const TYPE: DataType;
}
impl NcclElem for f32 {
    const TYPE: DataType = DataType::F32;
}
impl NcclElem for f64 {
    const TYPE: DataType = DataType::F64;
}
/// `u16` buffers hold bf16 bits (as `GpuModel`'s bf16 weights do).
impl NcclElem for u16 {
    const TYPE: DataType = DataType::Bf16;
}

type Res = c_int;
type RawComm = *mut c_void;

/// The NCCL entry points aha calls.
struct Fns {
    get_version: unsafe extern "C" fn(*mut c_int) -> Res,
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> Res,
    comm_init_rank: unsafe extern "C" fn(*mut RawComm, c_int, UniqueId, c_int) -> Res,
    comm_destroy: unsafe extern "C" fn(RawComm) -> Res,
    comm_abort: unsafe extern "C" fn(RawComm) -> Res,
    comm_get_async_error: unsafe extern "C" fn(RawComm, *mut Res) -> Res,
    get_error_string: unsafe extern "C" fn(Res) -> *const c_char,
    get_last_error: Option<unsafe extern "C" fn(RawComm) -> *const c_char>,
    all_reduce: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, RawComm, *mut c_void) -> Res,
    reduce_scatter: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, RawComm, *mut c_void) -> Res,
    all_gather: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, RawComm, *mut c_void) -> Res,
    broadcast: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, RawComm, *mut c_void) -> Res,
    send: unsafe extern "C" fn(*const c_void, usize, c_int, c_int, RawComm, *mut c_void) -> Res,
    recv: unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, RawComm, *mut c_void) -> Res,
    group_start: unsafe extern "C" fn() -> Res,
    group_end: unsafe extern "C" fn() -> Res,
}

/// A loaded NCCL library.
pub struct Nccl {
    fns: Fns,
    path: PathBuf,
    version: i32,
    emulated: bool,
    _lib: libloading::Library,
}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Nccl({}, {})", self.version_string(), self.path.display())
    }
}

fn nccl_err(op: &str, msg: impl Into<String>) -> Error {
    Error::Nccl {
        op: op.to_string(),
        msg: msg.into(),
    }
}

/// Where [`find_library`] looks, in order (files that may not exist; the
/// bare name `libnccl.so.2` stands for the loader's own search).
pub fn library_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os("AHA_NCCL_LIB") {
        out.push(PathBuf::from(p));
    }
    out.push(PathBuf::from("libnccl.so.2"));
    let mut roots: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH", "AHA_CUDA_ROOT"]
        .iter()
        .filter_map(std::env::var_os)
        .map(PathBuf::from)
        .collect();
    roots.push(PathBuf::from("/usr/local/cuda"));
    for r in roots {
        out.push(r.join("lib64/libnccl.so.2"));
        out.push(r.join("lib/libnccl.so.2"));
    }
    out.push(PathBuf::from("/usr/lib/x86_64-linux-gnu/libnccl.so.2"));
    // Python environments: <prefix>/lib/python3.*/{site,dist}-packages/nvidia/nccl/lib.
    let mut prefixes: Vec<PathBuf> = ["VIRTUAL_ENV", "CONDA_PREFIX"]
        .iter()
        .filter_map(std::env::var_os)
        .map(PathBuf::from)
        .collect();
    if let Some(h) = std::env::var_os("HOME") {
        prefixes.push(PathBuf::from(h).join(".local"));
    }
    prefixes.extend(["/usr/local", "/usr"].map(PathBuf::from));
    for p in prefixes {
        let Ok(dir) = std::fs::read_dir(p.join("lib")) else {
            continue;
        };
        let mut pys: Vec<PathBuf> = dir
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|d| {
                d.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("python3"))
            })
            .collect();
        pys.sort();
        for py in pys {
            for sp in ["site-packages", "dist-packages"] {
                out.push(py.join(sp).join("nvidia/nccl/lib/libnccl.so.2"));
            }
        }
    }
    out
}

/// The NCCL library this process should load: the emulated one when
/// `AHA_EMULATED_GPU=1` (unless `AHA_NCCL_LIB` names a file), else the first
/// of [`library_candidates`] that exists or that the loader finds.
pub fn find_library() -> Result<PathBuf> {
    if std::env::var_os("AHA_NCCL_LIB").is_none() && crate::emulate::emulated_gpu_requested() {
        return crate::emulate::emulated_nccl_path()
            .map_err(|e| nccl_err("emulated NCCL", format!("could not be built: {e}")));
    }
    let cands = library_candidates();
    for c in &cands {
        if c.is_absolute() {
            if c.is_file() {
                return Ok(c.clone());
            }
        } else {
            // SAFETY: only asks the loader whether it can open the name;
            // NCCL's initialisers run nothing beyond library setup.
            if unsafe { libloading::Library::new(c) }.is_ok() {
                return Ok(c.clone());
            }
        }
    }
    Err(nccl_err(
        "loading NCCL",
        format!(
            "libnccl.so.2 not found (searched: {}); install NCCL (`pip install nvidia-nccl-cu12` or the CUDA \
             repository's libnccl2) or set AHA_NCCL_LIB to the file",
            cands
                .iter()
                .map(|c| c.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ))
}

impl Nccl {
    /// The process's NCCL ([`find_library`]), loaded once.
    pub fn get() -> Result<Arc<Nccl>> {
        static LIB: OnceLock<std::result::Result<Arc<Nccl>, String>> = OnceLock::new();
        LIB.get_or_init(|| {
            find_library()
                .and_then(|p| Nccl::load(&p))
                .map(Arc::new)
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|msg| nccl_err("loading NCCL", msg))
    }

    /// Loads the NCCL library at `path` (a file, or a bare name for the
    /// loader to find) and resolves every entry point aha calls.
    pub fn load(path: &Path) -> Result<Nccl> {
        let at = |e: String| nccl_err("loading NCCL", format!("{}: {e}", path.display()));
        // SAFETY: loading runs the library's initialisers, which for NCCL
        // (and the emulated library) only set up internal state.
        let lib = unsafe { libloading::Library::new(path) }.map_err(|e| at(e.to_string()))?;
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: the symbol's type is NCCL's C signature from
                // nccl.h (ncclResult_t and enums are C ints, ncclComm_t and
                // cudaStream_t pointers, ncclUniqueId 128 bytes by value);
                // the pointer stays valid while `lib`, kept in the struct,
                // is loaded.
                *unsafe { lib.get(concat!($name, "\0").as_bytes()) }
                    .map_err(|e| at(format!("missing {}: {e}", $name)))?
            };
        }
        let fns = Fns {
            get_version: sym!("ncclGetVersion"),
            get_unique_id: sym!("ncclGetUniqueId"),
            comm_init_rank: sym!("ncclCommInitRank"),
            comm_destroy: sym!("ncclCommDestroy"),
            comm_abort: sym!("ncclCommAbort"),
            comm_get_async_error: sym!("ncclCommGetAsyncError"),
            get_error_string: sym!("ncclGetErrorString"),
            // SAFETY: as above; absent before NCCL 2.13, hence optional.
            get_last_error: unsafe { lib.get(b"ncclGetLastError\0") }.ok().map(|s| *s),
            all_reduce: sym!("ncclAllReduce"),
            reduce_scatter: sym!("ncclReduceScatter"),
            all_gather: sym!("ncclAllGather"),
            broadcast: sym!("ncclBroadcast"),
            send: sym!("ncclSend"),
            recv: sym!("ncclRecv"),
            group_start: sym!("ncclGroupStart"),
            group_end: sym!("ncclGroupEnd"),
        };
        // SAFETY: `aha_fake_nccl` exists only in the emulated library; its
        // presence is all that is read.
        let emulated = unsafe { lib.get::<unsafe extern "C" fn() -> c_int>(b"aha_fake_nccl\0") }.is_ok();
        let mut version: c_int = 0;
        // SAFETY: ncclGetVersion(int*) writes one int.
        let r = unsafe { (fns.get_version)(&mut version) };
        if r != 0 {
            return Err(at(format!("ncclGetVersion returned {r}")));
        }
        Ok(Nccl {
            fns,
            path: path.to_path_buf(),
            version,
            emulated,
            _lib: lib,
        })
    }

    /// The file (or name) it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// NCCL's version code (`major * 10000 + minor * 100 + patch`).
    pub fn version(&self) -> i32 {
        self.version
    }

    /// `2.28.5`, with ` (emulated)` for the emulated library.
    pub fn version_string(&self) -> String {
        let v = self.version;
        format!(
            "{}.{}.{}{}",
            v / 10000,
            (v / 100) % 100,
            v % 100,
            if self.emulated { " (emulated)" } else { "" }
        )
    }

    /// Whether this is aha's emulated NCCL (`emulate/fake_nccl.cpp`).
    pub fn is_emulated(&self) -> bool {
        self.emulated
    }

    /// A fresh unique id (rank 0 makes it and sends it to the others).
    pub fn unique_id(&self) -> Result<UniqueId> {
        let mut id = UniqueId([0; 128]);
        // SAFETY: ncclGetUniqueId(ncclUniqueId*) fills the 128 bytes.
        let r = unsafe { (self.fns.get_unique_id)(&mut id) };
        self.check(r, std::ptr::null_mut(), "ncclGetUniqueId")?;
        Ok(id)
    }

    fn describe(&self, r: Res, comm: RawComm) -> String {
        // SAFETY: ncclGetErrorString returns a static NUL-terminated string.
        let s = unsafe { CStr::from_ptr((self.fns.get_error_string)(r)) }
            .to_string_lossy()
            .into_owned();
        let last = match self.fns.get_last_error {
            // SAFETY: ncclGetLastError(comm) returns a NUL-terminated string
            // owned by the library (a null comm is allowed).
            Some(f) => unsafe {
                let p = f(comm);
                if p.is_null() {
                    String::new()
                } else {
                    CStr::from_ptr(p).to_string_lossy().into_owned()
                }
            },
            None => String::new(),
        };
        if last.is_empty() {
            format!("{s} (code {r})")
        } else {
            format!("{s} (code {r}): {last}")
        }
    }

    fn check(&self, r: Res, comm: RawComm, op: &str) -> Result<()> {
        if r == 0 {
            Ok(())
        } else {
            Err(nccl_err(op, self.describe(r, comm)))
        }
    }
}

/// How long a collective may wait for its peers before the communicator is
/// aborted and an error returned: `AHA_NCCL_TIMEOUT_S` seconds (default
/// 600, torch.distributed's default for NCCL).
pub fn collective_timeout() -> Duration {
    let s = std::env::var("AHA_NCCL_TIMEOUT_S")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(600.0);
    Duration::from_secs_f64(s)
}

/// One rank's communicator over the GPU it was created on; collectives go
/// on that GPU's stream and are waited for (under [`collective_timeout`])
/// before returning.
pub struct Comm {
    nccl: Arc<Nccl>,
    gpu: Arc<Gpu>,
    raw: RawComm,
    rank: usize,
    world: usize,
    failed: bool,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls
// on it are not concurrent; `Comm` takes `&mut self` for every collective.
unsafe impl Send for Comm {}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Comm(rank {} of {}, {:?})", self.rank, self.world, self.nccl)
    }
}

impl Comm {
    /// Joins the communicator `id` as `rank` of `world` on `gpu` (blocks
    /// until every rank has joined; NCCL's own timeout applies, and the
    /// emulated NCCL's `AHA_NCCL_TIMEOUT_S`).
    pub fn init(nccl: Arc<Nccl>, gpu: Arc<Gpu>, id: &UniqueId, world: usize, rank: usize) -> Result<Comm> {
        if world == 0 || rank >= world {
            return Err(nccl_err("ncclCommInitRank", format!("rank {rank} of {world}")));
        }
        let (w, r) = (
            c_int::try_from(world).map_err(|_| nccl_err("ncclCommInitRank", "world too large"))?,
            c_int::try_from(rank).map_err(|_| nccl_err("ncclCommInitRank", "rank too large"))?,
        );
        gpu.stream()
            .context()
            .bind_to_thread()
            .map_err(|e| nccl_err("ncclCommInitRank", format!("binding device {}: {e:?}", gpu.ordinal())))?;
        let mut raw: RawComm = std::ptr::null_mut();
        // SAFETY: ncclCommInitRank(ncclComm_t*, int, ncclUniqueId, int)
        // writes the communicator; the id is passed by value.
        let res = unsafe { (nccl.fns.comm_init_rank)(&mut raw, w, *id, r) };
        if res != 0 || raw.is_null() {
            return Err(nccl_err(
                "ncclCommInitRank",
                format!("rank {rank} of {world}: {}", nccl.describe(res, raw)),
            ));
        }
        Ok(Comm {
            nccl,
            gpu,
            raw,
            rank,
            world,
            failed: false,
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// The library behind it.
    pub fn nccl(&self) -> &Arc<Nccl> {
        &self.nccl
    }

    /// The GPU it runs on.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    fn after(&mut self, r: Res, op: &str, count: usize) -> Result<()> {
        let what = format!("{op} of {count} elements on rank {} of {}", self.rank, self.world);
        if r != 0 {
            self.failed = true;
            return Err(nccl_err(&what, self.nccl.describe(r, self.raw)));
        }
        self.wait(&what)
    }

    /// Waits for the stream (the collective just queued), polling the
    /// communicator's asynchronous error; past [`collective_timeout`] the
    /// communicator is aborted.
    fn wait(&mut self, what: &str) -> Result<()> {
        let stream = self.gpu.stream().clone();
        self.wait_for(&stream, what)
    }

    /// Waits for `stream` (collectives queued there by
    /// [`Comm::all_reduce_sum_queued`]) as [`Comm`]'s own collectives wait
    /// for the GPU's stream: polling the communicator's asynchronous error,
    /// aborting past [`collective_timeout`].
    pub fn wait_stream(&mut self, stream: &Arc<CudaStream>, what: &str) -> Result<()> {
        let what = format!("{what} on rank {} of {}", self.rank, self.world);
        self.wait_for(stream, &what)
    }

    fn wait_for(&mut self, stream: &Arc<CudaStream>, what: &str) -> Result<()> {
        if self.nccl.is_emulated() || self.gpu.is_emulated() {
            // The emulated library and driver finish every call before
            // returning; a failure was returned by the call itself.
            return Ok(());
        }
        let start = Instant::now();
        let limit = collective_timeout();
        let stream = stream.cu_stream();
        loop {
            // SAFETY: cuStreamQuery(CUstream) on the GPU's live stream.
            let q = unsafe { cudarc::driver::sys::cuStreamQuery(stream) };
            match q {
                cudarc::driver::sys::CUresult::CUDA_SUCCESS => return Ok(()),
                cudarc::driver::sys::CUresult::CUDA_ERROR_NOT_READY => {}
                other => {
                    self.failed = true;
                    return Err(nccl_err(what, format!("the stream failed: {other:?}")));
                }
            }
            let mut async_err: Res = 0;
            // SAFETY: ncclCommGetAsyncError(ncclComm_t, ncclResult_t*) on our communicator.
            let r = unsafe { (self.nccl.fns.comm_get_async_error)(self.raw, &mut async_err) };
            if r != 0 || async_err != 0 {
                self.failed = true;
                let code = if r != 0 { r } else { async_err };
                return Err(nccl_err(what, self.nccl.describe(code, self.raw)));
            }
            if start.elapsed() > limit {
                self.failed = true;
                return Err(nccl_err(
                    what,
                    format!(
                        "no progress after {:.0} s (AHA_NCCL_TIMEOUT_S): a peer is gone or stuck",
                        limit.as_secs_f64()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Sums `buf[range]` over every rank, in place.
    pub fn all_reduce_sum<T: NcclElem>(&mut self, buf: &mut CudaSlice<T>, range: Range<usize>) -> Result<()> {
        let n = range.len();
        let stream = self.gpu.stream().clone();
        self.all_reduce_sum_queued(&stream, buf, range)?;
        let what = format!("ncclAllReduce of {n} elements on rank {} of {}", self.rank, self.world);
        self.wait(&what)
    }

    /// Queues the in-place sum of `buf[range]` over every rank on `stream`
    /// (another stream of this communicator's GPU, such as a communication
    /// stream beside the work stream) and returns without waiting: the
    /// caller orders `stream` after the writes of `range` (an event) and
    /// waits for it with [`Comm::wait_stream`] before reading the sums.
    pub fn all_reduce_sum_queued<T: NcclElem>(
        &mut self,
        stream: &Arc<CudaStream>,
        buf: &mut CudaSlice<T>,
        range: Range<usize>,
    ) -> Result<()> {
        let n = range.len();
        check_range("ncclAllReduce", range.end, buf.len())?;
        let (ptr, guard) = buf.device_ptr_mut(stream);
        let p = (ptr + (range.start * T::TYPE.size()) as u64) as *mut c_void;
        // SAFETY: ncclAllReduce(const void*, void*, size_t, ncclDataType_t,
        // ncclRedOp_t, ncclComm_t, cudaStream_t): in place on `n` elements
        // of the buffer from `range.start`, inside it (checked above), on a
        // live stream of the same context; ncclSum is 0.
        let r = unsafe {
            (self.nccl.fns.all_reduce)(
                p,
                p,
                n,
                T::TYPE as c_int,
                0,
                self.raw,
                stream.cu_stream() as *mut c_void,
            )
        };
        drop(guard);
        if r != 0 {
            self.failed = true;
            let what = format!("ncclAllReduce of {n} elements on rank {} of {}", self.rank, self.world);
            return Err(nccl_err(&what, self.nccl.describe(r, self.raw)));
        }
        Ok(())
    }

    /// Sums `send` (world x `recv.len()` elements) over every rank and
    /// leaves this rank's block (`rank * recv.len()..`) in `recv`.
    pub fn reduce_scatter_sum<T: NcclElem>(&mut self, send: &CudaSlice<T>, recv: &mut CudaSlice<T>) -> Result<()> {
        let n = recv.len();
        if send.len() != n * self.world {
            return Err(nccl_err(
                "ncclReduceScatter",
                format!("send has {} elements, want {} x {n}", send.len(), self.world),
            ));
        }
        let stream = self.gpu.stream().clone();
        let (sp, g1) = send.device_ptr(&stream);
        let (rp, g2) = recv.device_ptr_mut(&stream);
        // SAFETY: ncclReduceScatter(const void*, void*, size_t recvcount,
        // type, op, comm, stream): send holds world x n elements, recv n
        // (checked above).
        let r = unsafe {
            (self.nccl.fns.reduce_scatter)(
                sp as *const c_void,
                rp as *mut c_void,
                n,
                T::TYPE as c_int,
                0,
                self.raw,
                stream.cu_stream() as *mut c_void,
            )
        };
        drop((g1, g2));
        self.after(r, "ncclReduceScatter", n)
    }

    /// Concatenates every rank's `send` in rank order into `recv` (world x
    /// `send.len()` elements).
    pub fn all_gather<T: NcclElem>(&mut self, send: &CudaSlice<T>, recv: &mut CudaSlice<T>) -> Result<()> {
        let n = send.len();
        if recv.len() != n * self.world {
            return Err(nccl_err(
                "ncclAllGather",
                format!("recv has {} elements, want {} x {n}", recv.len(), self.world),
            ));
        }
        let stream = self.gpu.stream().clone();
        let (sp, g1) = send.device_ptr(&stream);
        let (rp, g2) = recv.device_ptr_mut(&stream);
        // SAFETY: ncclAllGather(const void*, void*, size_t sendcount, type,
        // comm, stream): send holds n elements, recv world x n (checked).
        let r = unsafe {
            (self.nccl.fns.all_gather)(
                sp as *const c_void,
                rp as *mut c_void,
                n,
                T::TYPE as c_int,
                self.raw,
                stream.cu_stream() as *mut c_void,
            )
        };
        drop((g1, g2));
        self.after(r, "ncclAllGather", n)
    }

    /// Copies `root`'s `buf` into every rank's `buf`, in place.
    pub fn broadcast<T: NcclElem>(&mut self, buf: &mut CudaSlice<T>, root: usize) -> Result<()> {
        let n = buf.len();
        if root >= self.world {
            return Err(nccl_err(
                "ncclBroadcast",
                format!("root {root} of {} ranks", self.world),
            ));
        }
        let stream = self.gpu.stream().clone();
        let (p, g) = buf.device_ptr_mut(&stream);
        // SAFETY: ncclBroadcast(const void*, void*, size_t, type, int root,
        // comm, stream), in place on the whole buffer; root < world.
        let r = unsafe {
            (self.nccl.fns.broadcast)(
                p as *const c_void,
                p as *mut c_void,
                n,
                T::TYPE as c_int,
                root as c_int,
                self.raw,
                stream.cu_stream() as *mut c_void,
            )
        };
        drop(g);
        self.after(r, "ncclBroadcast", n)
    }

    /// Copies `root`'s `buf[range]` into every rank's `buf[range]`, in
    /// place (every rank passes the same range).
    pub fn broadcast_range<T: NcclElem>(
        &mut self,
        buf: &mut CudaSlice<T>,
        range: Range<usize>,
        root: usize,
    ) -> Result<()> {
        let n = range.len();
        check_range("ncclBroadcast", range.end, buf.len())?;
        if root >= self.world {
            return Err(nccl_err(
                "ncclBroadcast",
                format!("root {root} of {} ranks", self.world),
            ));
        }
        let stream = self.gpu.stream().clone();
        let (ptr, guard) = buf.device_ptr_mut(&stream);
        let p = (ptr + (range.start * T::TYPE.size()) as u64) as *mut c_void;
        // SAFETY: ncclBroadcast(const void*, void*, size_t, type, int root,
        // comm, stream), in place on `n` elements of the buffer from
        // `range.start`, inside it (checked above); root < world.
        let r = unsafe {
            (self.nccl.fns.broadcast)(
                p as *const c_void,
                p,
                n,
                T::TYPE as c_int,
                root as c_int,
                self.raw,
                stream.cu_stream() as *mut c_void,
            )
        };
        drop(guard);
        self.after(r, "ncclBroadcast", n)
    }
}

/// One block of a point-to-point exchange ([`Comm::exchange_blocks`]):
/// `count` elements at `offset` of the buffer, to or from rank `peer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    /// The other rank.
    pub peer: usize,
    /// First element in this rank's buffer.
    pub offset: usize,
    /// Elements.
    pub count: usize,
}

/// Rank `rank`'s contiguous shard of a flat buffer of `n` elements split
/// over `world` ranks, as [`Comm::reduce_scatter_sum_shards`] and
/// [`Comm::all_gather_shards`] split it: rank r holds
/// `r * q .. (r + 1) * q` with `q = n / world` (rounded down), and the last
/// rank also the remainder (fewer than `world` elements), so the shards
/// cover `0..n` in rank order with no padding.
pub fn shard_range(n: usize, world: usize, rank: usize) -> Range<usize> {
    let w = world.max(1);
    let q = n / w;
    let end = if rank + 1 >= w { n } else { (rank + 1) * q };
    (rank * q).min(n)..end
}

impl Comm {
    /// Sums `buf[..n]` over every rank and leaves this rank's shard
    /// ([`shard_range`]) summed in place; returns that range. The first
    /// `world x (n / world)` elements go through one in-place
    /// ncclReduceScatter (rank r's block is its shard); the remainder, fewer
    /// than `world` elements that the last rank owns, through an
    /// ncclAllReduce. The rest of `buf` is left in an unspecified state
    /// (other ranks' blocks are not summed). No staging buffer: a size that
    /// does not divide by the world costs a second, tiny collective instead
    /// of a padded copy of the buffer.
    pub fn reduce_scatter_sum_shards<T: NcclElem>(&mut self, buf: &mut CudaSlice<T>, n: usize) -> Result<Range<usize>> {
        check_range("ncclReduceScatter", n, buf.len())?;
        let w = self.world;
        let q = n / w;
        if q > 0 {
            let stream = self.gpu.stream().clone();
            let (ptr, guard) = buf.device_ptr_mut(&stream);
            let send = ptr as *const c_void;
            let recv = (ptr + (self.rank * q * T::TYPE.size()) as u64) as *mut c_void;
            // SAFETY: ncclReduceScatter(const void*, void*, size_t recvcount,
            // type, op, comm, stream) in place: send is the buffer's first
            // world x q elements (inside it, n <= len checked above), recv
            // is this rank's block of it (NCCL's in-place form,
            // recvbuff == sendbuff + rank * recvcount); ncclSum is 0.
            let r = unsafe {
                (self.nccl.fns.reduce_scatter)(
                    send,
                    recv,
                    q,
                    T::TYPE as c_int,
                    0,
                    self.raw,
                    stream.cu_stream() as *mut c_void,
                )
            };
            drop(guard);
            self.after(r, "ncclReduceScatter", q)?;
        }
        if n > w * q {
            self.all_reduce_sum(buf, w * q..n)?;
        }
        Ok(shard_range(n, w, self.rank))
    }

    /// Gives every rank every rank's shard of `buf[..n]` ([`shard_range`]),
    /// in place: one in-place ncclAllGather of the first `world x (n /
    /// world)` elements, then an ncclBroadcast of the remainder from the
    /// last rank, which owns it.
    pub fn all_gather_shards<T: NcclElem>(&mut self, buf: &mut CudaSlice<T>, n: usize) -> Result<()> {
        check_range("ncclAllGather", n, buf.len())?;
        let w = self.world;
        let q = n / w;
        let stream = self.gpu.stream().clone();
        if q > 0 {
            let (ptr, guard) = buf.device_ptr_mut(&stream);
            let recv = ptr as *mut c_void;
            let send = (ptr + (self.rank * q * T::TYPE.size()) as u64) as *const c_void;
            // SAFETY: ncclAllGather(const void*, void*, size_t sendcount,
            // type, comm, stream) in place: recv is the buffer's first
            // world x q elements (n <= len checked above), send this rank's
            // block of it (sendbuff == recvbuff + rank * sendcount).
            let r = unsafe {
                (self.nccl.fns.all_gather)(
                    send,
                    recv,
                    q,
                    T::TYPE as c_int,
                    self.raw,
                    stream.cu_stream() as *mut c_void,
                )
            };
            drop(guard);
            self.after(r, "ncclAllGather", q)?;
        }
        let tail = n - w * q;
        if tail > 0 {
            let (ptr, guard) = buf.device_ptr_mut(&stream);
            let p = (ptr + (w * q * T::TYPE.size()) as u64) as *mut c_void;
            // SAFETY: ncclBroadcast(const void*, void*, size_t, type, int
            // root, comm, stream) in place on the `tail` elements from
            // w x q, inside the buffer (n <= len); root w - 1 < world.
            let r = unsafe {
                (self.nccl.fns.broadcast)(
                    p as *const c_void,
                    p,
                    tail,
                    T::TYPE as c_int,
                    (w - 1) as c_int,
                    self.raw,
                    stream.cu_stream() as *mut c_void,
                )
            };
            drop(guard);
            self.after(r, "ncclBroadcast", tail)?;
        }
        Ok(())
    }
}

impl Comm {
    /// How many elements this rank receives from each rank, given how many
    /// it sends to each (`send_counts[p]` to rank p): one all-gather of
    /// every rank's send counts (as f64, exact below 2^53), of which this
    /// rank keeps column `rank`.
    pub fn exchange_counts(&mut self, send_counts: &[usize]) -> Result<Vec<usize>> {
        let w = self.world;
        if send_counts.len() != w {
            return Err(nccl_err(
                "all-to-all counts",
                format!("{} send counts for {w} ranks", send_counts.len()),
            ));
        }
        let mine: Vec<f64> = send_counts.iter().map(|&c| c as f64).collect();
        let send = self.gpu.upload(&mine)?;
        let mut all = self.gpu.zeros::<f64>(w * w)?;
        self.all_gather(&send, &mut all)?;
        let all = self.gpu.download(&all)?;
        Ok((0..w).map(|from| all[from * w + self.rank] as usize).collect())
    }

    /// All-to-all with per-rank counts: sends `send[send_offsets[p]..][..send_counts[p]]`
    /// to every rank p and receives rank p's block for this rank into
    /// `recv[recv_offsets[p]..][..recv_counts[p]]` (counts and offsets in
    /// elements, one per rank; zero counts allowed). `recv_counts[p]` must
    /// equal what rank p sends here ([`Comm::exchange_counts`] gives it).
    /// One ncclGroupStart/ncclGroupEnd of an ncclSend and an ncclRecv per
    /// rank (itself included); every rank of the communicator must call it.
    #[allow(clippy::too_many_arguments)]
    pub fn all_to_all_v<T: NcclElem>(
        &mut self,
        send: &CudaSlice<T>,
        send_counts: &[usize],
        send_offsets: &[usize],
        recv: &mut CudaSlice<T>,
        recv_counts: &[usize],
        recv_offsets: &[usize],
    ) -> Result<()> {
        const OP: &str = "all-to-all (ncclSend/ncclRecv)";
        let w = self.world;
        for (name, v) in [
            ("send counts", send_counts),
            ("send offsets", send_offsets),
            ("receive counts", recv_counts),
            ("receive offsets", recv_offsets),
        ] {
            if v.len() != w {
                return Err(nccl_err(OP, format!("{} {name} for {w} ranks", v.len())));
            }
        }
        let block = |p: usize, o: &[usize], c: &[usize]| Block {
            peer: p,
            offset: o[p],
            count: c[p],
        };
        let sends: Vec<Block> = (0..w).map(|p| block(p, send_offsets, send_counts)).collect();
        let recvs: Vec<Block> = (0..w).map(|p| block(p, recv_offsets, recv_counts)).collect();
        self.exchange_blocks(send, &sends, recv, &recvs)
    }

    /// Point-to-point exchange of blocks in one ncclGroupStart/End: an
    /// ncclSend of `send[b.offset..][..b.count]` to `b.peer` for each of
    /// `sends`, and an ncclRecv from `r.peer` into `recv[r.offset..][..r.count]`
    /// for each of `recvs` (offsets and counts in elements). Several blocks
    /// between the same two ranks are matched in the order they are listed
    /// on each side, with equal counts. Every rank of the communicator must
    /// call it (with empty lists if it has nothing to move: a rank with
    /// nothing queues an empty send and receive to itself, so that the
    /// group still names the communicator).
    pub fn exchange_blocks<T: NcclElem>(
        &mut self,
        send: &CudaSlice<T>,
        sends: &[Block],
        recv: &mut CudaSlice<T>,
        recvs: &[Block],
    ) -> Result<()> {
        const OP: &str = "all-to-all (ncclSend/ncclRecv)";
        let w = self.world;
        let nothing = [Block {
            peer: self.rank,
            offset: 0,
            count: 0,
        }];
        let (sends, recvs) = if sends.is_empty() && recvs.is_empty() {
            (&nothing[..], &nothing[..])
        } else {
            (sends, recvs)
        };
        for (what, list, len) in [("send", sends, send.len()), ("receive", recvs, recv.len())] {
            for b in list {
                if b.peer >= w {
                    return Err(nccl_err(OP, format!("{what} block for rank {} of {w}", b.peer)));
                }
                check_range(OP, b.offset + b.count, len)?;
            }
        }
        let es = T::TYPE.size() as u64;
        let dt = T::TYPE as c_int;
        let stream = self.gpu.stream().clone();
        let cu = stream.cu_stream() as *mut c_void;
        let (sp, g1) = send.device_ptr(&stream);
        let (rp, g2) = recv.device_ptr_mut(&stream);
        // SAFETY: ncclGroupStart(void); every call queued after it is run by
        // the ncclGroupEnd below, which is reached on every path.
        let r = unsafe { (self.nccl.fns.group_start)() };
        if r != 0 {
            drop((g1, g2));
            return self.after(r, "ncclGroupStart", 0);
        }
        let mut first = 0;
        for b in sends {
            // SAFETY: ncclSend(const void*, size_t, type, int peer, comm,
            // stream) on a block inside the buffer (checked above); the
            // buffer stays borrowed until the group has ended.
            let r = unsafe {
                (self.nccl.fns.send)(
                    (sp + b.offset as u64 * es) as *const c_void,
                    b.count,
                    dt,
                    b.peer as c_int,
                    self.raw,
                    cu,
                )
            };
            if first == 0 {
                first = r;
            }
        }
        for b in recvs {
            // SAFETY: ncclRecv(void*, size_t, type, int peer, comm, stream)
            // into a block inside the buffer (checked above), borrowed
            // until the group has ended.
            let r = unsafe {
                (self.nccl.fns.recv)(
                    (rp + b.offset as u64 * es) as *mut c_void,
                    b.count,
                    dt,
                    b.peer as c_int,
                    self.raw,
                    cu,
                )
            };
            if first == 0 {
                first = r;
            }
        }
        // SAFETY: ncclGroupEnd(void) runs the calls queued above.
        let end = unsafe { (self.nccl.fns.group_end)() };
        drop((g1, g2));
        let total: usize = sends.iter().map(|b| b.count).sum();
        self.after(if first != 0 { first } else { end }, OP, total)
    }

    /// All-to-all of packed blocks: `send` holds, in rank order, the
    /// `send_counts[p]` elements for each rank p; returns what every rank
    /// sent here, packed in rank order, and how many came from each rank
    /// (exchanged first with [`Comm::exchange_counts`]).
    pub fn all_to_all_packed<T: NcclElem + cudarc::driver::ValidAsZeroBits>(
        &mut self,
        send: &CudaSlice<T>,
        send_counts: &[usize],
    ) -> Result<(CudaSlice<T>, Vec<usize>)> {
        let recv_counts = self.exchange_counts(send_counts)?;
        let offsets = |c: &[usize]| {
            c.iter()
                .scan(0usize, |acc, &n| {
                    let o = *acc;
                    *acc += n;
                    Some(o)
                })
                .collect::<Vec<usize>>()
        };
        let (so, ro) = (offsets(send_counts), offsets(&recv_counts));
        let total: usize = recv_counts.iter().sum();
        let mut recv = self.gpu.zeros::<T>(total.max(1))?;
        self.all_to_all_v(send, send_counts, &so, &mut recv, &recv_counts, &ro)?;
        Ok((recv, recv_counts))
    }
}

fn check_range(op: &str, end: usize, len: usize) -> Result<()> {
    if end > len {
        return Err(nccl_err(
            op,
            format!("range ends at {end}, the buffer has {len} elements"),
        ));
    }
    Ok(())
}

impl Drop for Comm {
    fn drop(&mut self) {
        // SAFETY: the communicator is ours and used by no one else; after a
        // failure it is aborted (destroy would wait for the dead peers).
        unsafe {
            if self.failed {
                (self.nccl.fns.comm_abort)(self.raw);
            } else {
                (self.nccl.fns.comm_destroy)(self.raw);
            }
        }
    }
}
