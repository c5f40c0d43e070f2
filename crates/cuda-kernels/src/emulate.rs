//! Runs `kernels/*.cu` on the CPU, as written, for tests on machines without
//! a GPU: `emulate/cuda_shim.h` maps the CUDA surface the kernels use onto
//! C++ (each CUDA thread a fiber, barriers and shuffles between fibers), and
//! a driver program per kernel family (`emulate/*.cpp`) launches the kernels
//! as their Rust launchers do, reading a job on stdin and printing the
//! outputs. Tests feed the same inputs to the CPU twins and compare.
//!
//! The sources are embedded in this crate, written to a cache directory
//! named by their hash, and compiled once with `$CXX` (default `g++`).
//! This checks indexing, masking, barrier placement and arithmetic of the
//! real kernel text; it does not model the GPU's memory model, inter-block
//! races, resource limits or speed (see the shim's header).

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::registry::{HEADERS, SOURCES};

/// The shim and the driver programs, by name.
const FILES: &[(&str, &str)] = &[
    ("cuda_shim.h", include_str!("../emulate/cuda_shim.h")),
    ("lmhead_grpo.cpp", include_str!("../emulate/lmhead_grpo.cpp")),
    ("core.cpp", include_str!("../emulate/core.cpp")),
    ("flash.cpp", include_str!("../emulate/flash.cpp")),
    ("moe.cpp", include_str!("../emulate/moe.cpp")),
    ("fake_driver.cpp", include_str!("../emulate/fake_driver.cpp")),
    ("fake_cublas.cpp", include_str!("../emulate/fake_cublas.cpp")),
];

/// The name the emulated GPU reports (`cuDeviceGetName`).
pub const EMULATED_DEVICE_NAME: &str = "aha CPU emulation";

/// Why the emulator cannot be built or run.
#[derive(Debug, thiserror::Error)]
pub enum EmulateError {
    /// No C++ compiler was found.
    #[error("no C++ compiler: {0} (install g++ or set CXX)")]
    NoCompiler(String),
    /// The program is not one of the embedded drivers.
    #[error("unknown emulator program {0:?}")]
    UnknownProgram(String),
    /// Compiling failed (the compiler's output is included).
    #[error("compiling {program} failed:\n{log}")]
    Compile {
        /// The driver program.
        program: String,
        /// The compiler's stderr.
        log: String,
    },
    /// Running the program failed or printed something that is not numbers.
    #[error("running {program}: {msg}")]
    Run {
        /// The driver program.
        program: String,
        /// What went wrong.
        msg: String,
    },
    /// A file could not be written.
    #[error("emulator cache: {0}")]
    Io(#[from] std::io::Error),
}

fn cxx() -> String {
    std::env::var("CXX").unwrap_or_else(|_| "g++".into())
}

/// `None` when a C++ compiler answers `--version`, else why not.
pub fn unavailable_reason() -> Option<String> {
    let c = cxx();
    match Command::new(&c).arg("--version").output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!("{c} --version exited with {}", o.status)),
        Err(e) => Some(format!("{c}: {e}")),
    }
}

/// A compiled driver program.
#[derive(Debug, Clone)]
pub struct Emulator {
    program: String,
    exe: PathBuf,
}

fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain([0xff]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

impl Emulator {
    /// Compiles `program` (e.g. `"lmhead_grpo"`) with the shim and every
    /// kernel source, or reuses the binary compiled from the same text.
    pub fn build(program: &str) -> Result<Emulator, EmulateError> {
        Emulator::build_with(program, sanitize_requested())
    }

    /// [`Emulator::build`], sanitized (ASan + UBSan, every finding fatal)
    /// or not, whatever `AHA_EMU_SANITIZE` says.
    pub fn build_with(program: &str, sanitize: bool) -> Result<Emulator, EmulateError> {
        // One build at a time in this process: tests run in threads, and an
        // executable must not be replaced while another thread starts it.
        static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _guard = BUILD.lock().unwrap_or_else(|e| e.into_inner());
        let file = format!("{program}.cpp");
        if !FILES.iter().any(|(f, _)| *f == file) {
            return Err(EmulateError::UnknownProgram(program.into()));
        }
        if let Some(why) = unavailable_reason() {
            return Err(EmulateError::NoCompiler(why));
        }
        let dir = source_dir()?;
        let exe = dir.join(if sanitize {
            format!("{program}-asan")
        } else {
            program.to_string()
        });
        if !exe.exists() {
            let flags: &[&str] = if sanitize { SANITIZE_FLAGS } else { &[] };
            compile(&dir, &file, &exe, None, flags)?;
        }
        Ok(Emulator {
            program: program.into(),
            exe,
        })
    }

    /// Runs the program with `input` on stdin and returns what it printed;
    /// a non-zero exit is an error carrying its stdout and stderr (the
    /// self-checking programs, `flash` and `moe`, print their checks and
    /// fail this way).
    pub fn run_raw(&self, input: &str) -> Result<String, EmulateError> {
        let mut child = Command::new(&self.exe)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(EmulateError::Run {
                program: self.program.clone(),
                msg: format!(
                    "exited with {}:\n{stdout}\n{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                ),
            });
        }
        Ok(stdout)
    }

    /// Runs one job (`input` on stdin) and parses the numbers it prints.
    pub fn run(&self, input: &str) -> Result<Vec<f64>, EmulateError> {
        let err = |msg: String| EmulateError::Run {
            program: self.program.clone(),
            msg,
        };
        let out = self.run_raw(input)?;
        out.split_whitespace()
            .map(|w| match w {
                "nan" | "-nan" => Ok(f64::NAN),
                "inf" => Ok(f64::INFINITY),
                "-inf" => Ok(f64::NEG_INFINITY),
                _ => w.parse::<f64>().map_err(|e| err(format!("output {w:?}: {e}"))),
            })
            .collect()
    }
}

/// The cache directory for the current sources (named by their hash), with
/// every source written into it.
fn source_dir() -> Result<PathBuf, EmulateError> {
    let table = kernel_table();
    let mut parts: Vec<&str> = FILES.iter().flat_map(|(f, s)| [*f, *s]).collect();
    parts.extend(SOURCES.iter().chain(HEADERS).flat_map(|s| [s.file, s.source]));
    parts.push(&table);
    let dir = std::env::temp_dir().join(format!("aha-emulate-{:016x}", fnv1a(&parts)));
    if !dir.join("kernel_table.inc").exists() {
        std::fs::create_dir_all(&dir)?;
        for (f, s) in FILES {
            std::fs::write(dir.join(f), s)?;
        }
        for s in SOURCES.iter().chain(HEADERS) {
            std::fs::write(dir.join(s.file), s.source)?;
        }
        std::fs::write(dir.join("kernel_table.inc"), &table)?;
    }
    Ok(dir)
}

/// `AHA_KERNEL(symbol)` for every kernel the launchers use, for the emulated
/// driver's name lookup.
fn kernel_table() -> String {
    crate::registry::KernelId::ALL
        .iter()
        .map(|k| format!("AHA_KERNEL({})\n", k.symbol()))
        .collect()
}

/// The compiler flags of the sanitized driver programs: AddressSanitizer
/// (heap, global and stack bounds, use after free) and UndefinedBehavior
/// Sanitizer (signed overflow, shifts, misaligned or null access, float to
/// int overflow), every finding fatal. `-O1` keeps the build and the run
/// affordable; the shim tells ASan about each fiber switch.
const SANITIZE_FLAGS: &[&str] = &[
    "-O1",
    "-g",
    "-fsanitize=address,undefined,float-cast-overflow",
    "-fno-sanitize-recover=all",
    "-fno-omit-frame-pointer",
];

/// Whether `AHA_EMU_SANITIZE=1` asks for the sanitized driver programs.
/// Only the standalone programs ([`Emulator`]) are sanitized: the emulated
/// driver library is loaded into the Rust test process, which would need
/// the sanitizer runtime preloaded.
pub fn sanitize_requested() -> bool {
    std::env::var("AHA_EMU_SANITIZE").is_ok_and(|v| v == "1")
}

/// Compiles `file` in `dir` into `out` (a shared library with `soname` when
/// given), through a temporary name renamed into place; `extra` flags come
/// after the defaults (a later `-O` wins).
fn compile(
    dir: &std::path::Path,
    file: &str,
    out: &std::path::Path,
    soname: Option<&str>,
    extra: &[&str],
) -> Result<(), EmulateError> {
    let tmp = out.with_extension(format!("{}.tmp", std::process::id()));
    let mut cmd = Command::new(cxx());
    cmd.args(["-O2", "-std=c++20", "-w", "-fno-strict-aliasing"])
        .args(extra)
        .arg("-I")
        .arg(dir);
    if let Some(so) = soname {
        cmd.args(["-shared", "-fPIC", &format!("-Wl,-soname,{so}")]);
    }
    let o = cmd.arg("-o").arg(&tmp).arg(dir.join(file)).output()?;
    if !o.status.success() {
        return Err(EmulateError::Compile {
            program: file.into(),
            log: String::from_utf8_lossy(&o.stderr).into_owned(),
        });
    }
    std::fs::rename(&tmp, out)?;
    Ok(())
}

/// Makes the emulated GPU the process's CUDA driver and cuBLAS: compiles
/// `emulate/fake_driver.cpp` (every kernel file included) as `libcuda.so`
/// and `emulate/fake_cublas.cpp` as `libcublas.so`, then loads both by path,
/// so that cudarc's later lookups by name find them. Must run before
/// anything touches the driver; `aha_cuda_kernels::device_count` calls it
/// when `AHA_EMULATED_GPU=1`. The kernels then run on the CPU as written,
/// launched by the unchanged Rust launchers: slow (a fiber per CUDA thread),
/// for tests.
pub fn install_emulated_gpu() -> Result<(), EmulateError> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| install().map_err(|e| e.to_string()))
        .clone()
        .map_err(|msg| EmulateError::Run {
            program: "fake_driver".into(),
            msg,
        })
}

fn install() -> Result<(), EmulateError> {
    if let Some(why) = unavailable_reason() {
        return Err(EmulateError::NoCompiler(why));
    }
    let dir = source_dir()?;
    for (file, lib) in [("fake_driver.cpp", "libcuda.so"), ("fake_cublas.cpp", "libcublas.so")] {
        let out = dir.join(lib);
        if !out.exists() {
            compile(&dir, file, &out, Some(lib), &[])?;
        }
        // SAFETY: the library is ours, with no initialisers beyond C++
        // statics; it stays loaded for the life of the process (kept in a
        // static or forgotten), so the symbols cudarc resolves later remain
        // valid.
        let handle = unsafe { libloading::Library::new(&out) }.map_err(|e| EmulateError::Run {
            program: lib.into(),
            msg: format!("loading {}: {e}", out.display()),
        })?;
        if lib == "libcuda.so" {
            let _ = DRIVER.set(handle);
        } else {
            wire_capture(&handle)?;
            std::mem::forget(handle);
        }
    }
    match resource_table(&dir) {
        Ok(table) => {
            for (name, regs, smem) in table {
                set_kernel_resources(&name, regs, smem)?;
            }
        }
        Err(why) => eprintln!("emulated GPU: register limits not checked (no ptxas report): {why}"),
    }
    Ok(())
}

/// Gives the emulated cuBLAS the emulated driver's capture hook, so that
/// its products are recorded into a CUDA graph while a stream captures.
fn wire_capture(cublas: &libloading::Library) -> Result<(), EmulateError> {
    type Hook = unsafe extern "C" fn(
        unsafe extern "C" fn(*mut std::ffi::c_void) -> i32,
        *mut std::ffi::c_void,
        unsafe extern "C" fn(*mut std::ffi::c_void),
    ) -> i32;
    let err = |msg: String| EmulateError::Run {
        program: "libcublas.so".into(),
        msg,
    };
    let driver = DRIVER
        .get()
        .ok_or_else(|| err("the emulated driver is not loaded".into()))?;
    // SAFETY: both symbols are ours (fake_driver.cpp, fake_cublas.cpp) with
    // these signatures; the driver stays loaded for the process (DRIVER),
    // so the hook stays valid.
    unsafe {
        let hook = driver
            .get::<Hook>(b"ahaEmuCaptureHook\0")
            .map_err(|e| err(e.to_string()))?;
        let set = cublas
            .get::<unsafe extern "C" fn(Hook)>(b"ahaEmuSetCaptureHook\0")
            .map_err(|e| err(e.to_string()))?;
        set(*hook);
    }
    Ok(())
}

/// The emulated NCCL's source (kept out of [`FILES`] so that a change to it
/// does not rebuild the emulated GPU).
const NCCL_SOURCE: &str = include_str!("../emulate/fake_nccl.cpp");

/// The emulated NCCL (`emulate/fake_nccl.cpp`: collectives between
/// processes of one machine over Unix sockets, reduced in rank order)
/// compiled as `libnccl.so.2` into a cache folder named by its source's
/// hash; returns the library's path for [`crate::nccl::Nccl::load`].
pub fn emulated_nccl_path() -> Result<PathBuf, EmulateError> {
    static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(why) = unavailable_reason() {
        return Err(EmulateError::NoCompiler(why));
    }
    let dir = std::env::temp_dir().join(format!("aha-emulate-nccl-{:016x}", fnv1a(&[NCCL_SOURCE])));
    let out = dir.join("libnccl.so.2");
    if !out.exists() {
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("fake_nccl.cpp"), NCCL_SOURCE)?;
        compile(&dir, "fake_nccl.cpp", &out, Some("libnccl.so.2"), &[])?;
    }
    Ok(out)
}

/// The emulated driver, once loaded.
static DRIVER: std::sync::OnceLock<libloading::Library> = std::sync::OnceLock::new();

/// Driver calls the calling thread made on the emulated GPU, by kind: the
/// host-side cost of a piece of work, which is the same on a GPU (each call
/// is host time there; a CUDA graph replays a captured sequence for one).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DriverCounts {
    /// Kernel launches.
    pub launches: u64,
    /// Device allocations (`cuMemAlloc`, `cuMemAllocAsync`).
    pub allocs: u64,
    /// Device frees.
    pub frees: u64,
    /// Host-to-device copies.
    pub htod: u64,
    /// Device-to-host copies.
    pub dtoh: u64,
    /// Device-to-device copies.
    pub dtod: u64,
    /// Memsets.
    pub memsets: u64,
    /// CUDA graph launches (`cuGraphLaunch`: one call replays a captured
    /// step).
    pub graph_launches: u64,
}

impl DriverCounts {
    /// The calls made between `earlier` and `self`.
    pub fn since(self, earlier: DriverCounts) -> DriverCounts {
        DriverCounts {
            launches: self.launches.saturating_sub(earlier.launches),
            allocs: self.allocs.saturating_sub(earlier.allocs),
            frees: self.frees.saturating_sub(earlier.frees),
            htod: self.htod.saturating_sub(earlier.htod),
            dtoh: self.dtoh.saturating_sub(earlier.dtoh),
            dtod: self.dtod.saturating_sub(earlier.dtod),
            memsets: self.memsets.saturating_sub(earlier.memsets),
            graph_launches: self.graph_launches.saturating_sub(earlier.graph_launches),
        }
    }

    /// Every call together.
    pub fn total(&self) -> u64 {
        self.launches
            + self.allocs
            + self.frees
            + self.htod
            + self.dtoh
            + self.dtod
            + self.memsets
            + self.graph_launches
    }
}

/// The calling thread's driver calls so far on the emulated GPU; `None`
/// when the emulated GPU is not installed (a real driver does not count).
pub fn driver_counts() -> Option<DriverCounts> {
    let lib = DRIVER.get()?;
    // SAFETY: the symbol is ours (fake_driver.cpp), with this signature; it
    // writes at most `n` values.
    let f = unsafe { lib.get::<unsafe extern "C" fn(*mut u64, i32)>(b"ahaEmuDriverCounts") }.ok()?;
    let mut c = [0u64; 8];
    // SAFETY: `c` holds the 8 values asked for.
    unsafe { f(c.as_mut_ptr(), 8) };
    Some(DriverCounts {
        launches: c[0],
        allocs: c[1],
        frees: c[2],
        htod: c[3],
        dtoh: c[4],
        dtod: c[5],
        memsets: c[6],
        graph_launches: c[7],
    })
}

/// Tells the emulated driver a kernel's register count and static shared
/// memory (bytes), as ptxas reports them, so that its launches are refused
/// where a GPU would refuse them. Fails when the emulated GPU is not
/// installed.
pub fn set_kernel_resources(name: &str, regs: u32, static_smem: u32) -> Result<(), EmulateError> {
    let err = |msg: String| EmulateError::Run {
        program: "fake_driver".into(),
        msg,
    };
    let lib = DRIVER
        .get()
        .ok_or_else(|| err("the emulated GPU is not installed".into()))?;
    let name = std::ffi::CString::new(name).map_err(|e| err(e.to_string()))?;
    let clamp = |v: u32| i32::try_from(v).unwrap_or(i32::MAX);
    // SAFETY: fake_driver.cpp defines
    // `void aha_fake_set_kernel_resources(const char*, int, int)`; the name
    // is a NUL-terminated string that outlives the call, which copies it.
    unsafe {
        let f: libloading::Symbol<unsafe extern "C" fn(*const std::ffi::c_char, i32, i32)> = lib
            .get(b"aha_fake_set_kernel_resources\0")
            .map_err(|e| err(e.to_string()))?;
        f(name.as_ptr(), clamp(regs), clamp(static_smem));
    }
    Ok(())
}

/// Every kernel's (name, registers, static shared bytes) for sm_90, from
/// ptxas's report through NVRTC, kept in the emulator's cache folder (one
/// compile of every kernel file per change of the sources or of NVRTC).
fn resource_table(dir: &std::path::Path) -> Result<Vec<(String, u32, u32)>, String> {
    let nv = crate::nvrtc::nvrtc().map_err(|e| e.to_string())?;
    let file = dir.join(format!("resources-sm90-nvrtc{}.{}.txt", nv.version.0, nv.version.1));
    let parse_file = |text: &str| -> Vec<(String, u32, u32)> {
        text.lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                Some((w.next()?.to_string(), w.next()?.parse().ok()?, w.next()?.parse().ok()?))
            })
            .collect()
    };
    if let Ok(text) = std::fs::read_to_string(&file) {
        return Ok(parse_file(&text));
    }
    let mut table = Vec::new();
    for src in SOURCES {
        let log = crate::nvrtc::resource_usage(src, (9, 0)).map_err(|e| e.to_string())?;
        table.extend(parse_resource_usage(&log));
    }
    let text: String = table.iter().map(|(n, r, s)| format!("{n} {r} {s}\n")).collect();
    let tmp = file.with_extension(format!("tmp{}", std::process::id()));
    if std::fs::write(&tmp, text)
        .and_then(|_| std::fs::rename(&tmp, &file))
        .is_err()
    {
        let _ = std::fs::remove_file(&tmp);
    }
    Ok(table)
}

/// Reads ptxas's `-v` report (as [`crate::nvrtc::resource_usage`] returns
/// it) into (kernel, registers, static shared bytes), one entry per entry
/// function.
pub fn parse_resource_usage(log: &str) -> Vec<(String, u32, u32)> {
    let mut out = Vec::new();
    let mut kernel: Option<String> = None;
    for line in log.lines() {
        if let Some(rest) = line.split("entry function '").nth(1) {
            kernel = rest.split('\'').next().map(str::to_string);
        } else if let (Some(k), Some(used)) = (kernel.as_ref(), line.split("Used ").nth(1)) {
            let number_before = |unit: &str| -> Option<u32> {
                used.split(',')
                    .map(str::trim)
                    .find(|part| part.ends_with(unit))
                    .and_then(|part| part.split_whitespace().next()?.parse().ok())
            };
            if let Some(regs) = number_before("registers") {
                out.push((k.clone(), regs, number_before("bytes smem").unwrap_or(0)));
                kernel = None;
            }
        }
    }
    out
}

/// Whether the emulated GPU was asked for (`AHA_EMULATED_GPU=1`).
pub fn emulated_gpu_requested() -> bool {
    std::env::var("AHA_EMULATED_GPU").is_ok_and(|v| v == "1")
}

/// Formats numbers for a job's input, one per line, exactly (`{:?}` of f64
/// round-trips).
pub fn numbers<T: Copy + Into<f64>>(xs: &[T]) -> String {
    let mut s = String::with_capacity(xs.len() * 12);
    for &x in xs {
        let v: f64 = x.into();
        // strtod's spellings of the non-finite values.
        if v.is_nan() {
            s.push_str("nan\n");
        } else if v.is_infinite() {
            s.push_str(if v > 0.0 { "inf\n" } else { "-inf\n" });
        } else {
            s.push_str(&format!("{v:?}\n"));
        }
    }
    s
}

/// For tests: `program` compiled, or `Ok(None)` after printing
/// "`test`: skipped: ..." when no C++ compiler exists and none is
/// [`required`]; any other failure is an error.
pub fn emulator_for_test(test: &str, program: &str) -> Result<Option<Emulator>, EmulateError> {
    match Emulator::build(program) {
        Ok(e) => Ok(Some(e)),
        Err(EmulateError::NoCompiler(why)) if !required() => {
            eprintln!("{test}: skipped: {why}");
            Ok(None)
        }
        Err(other) => Err(other),
    }
}

/// Whether tests must fail instead of skipping when no compiler is found
/// (`AHA_REQUIRE_EMULATOR=1`, set by `scripts/test.sh`).
pub fn required() -> bool {
    std::env::var("AHA_REQUIRE_EMULATOR").is_ok_and(|v| v == "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_programs_are_refused_and_numbers_round_trip() {
        assert!(matches!(Emulator::build("nope"), Err(EmulateError::UnknownProgram(_))));
        let s = numbers(&[0.1f64, -2.5, f64::NAN]);
        let back: Vec<f64> = s.lines().map(|l| l.parse().unwrap()).collect();
        assert_eq!(back[..2], [0.1, -2.5]);
        assert!(back[2].is_nan());
    }

    #[test]
    fn ptxas_reports_are_parsed() {
        let log = "ptxas info    : 0 bytes gmem\n\
            ptxas info    : Compiling entry function 'add_f32' for 'sm_90'\n\
            ptxas info    : Function properties for add_f32\n\
            \x20   0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
            ptxas info    : Used 10 registers, used 0 barriers, 380 bytes cmem[0]\n\
            ptxas info    : Compiling entry function 'rmsnorm_backward_f32' for 'sm_90'\n\
            ptxas info    : Used 32 registers, used 1 barriers, 132 bytes smem, 400 bytes cmem[0]\n";
        assert_eq!(
            parse_resource_usage(log),
            vec![
                ("add_f32".to_string(), 10, 0),
                ("rmsnorm_backward_f32".to_string(), 32, 132)
            ]
        );
    }

    #[test]
    fn the_advantage_kernel_runs_on_the_cpu() {
        let Some(e) = emulator_for_test("the_advantage_kernel_runs_on_the_cpu", "lmhead_grpo").unwrap() else {
            return;
        };
        // Two groups of three: (1, 0, 1) and (0.5, 0.5, 0.5).
        let out = e.run("adv 6 3 0 1 0 1 0.5 0.5 0.5").unwrap();
        assert_eq!(out.len(), 3 * 6 + 3);
        let std = (1.0f64 / 3.0).sqrt();
        assert!((out[0] - (1.0 / 3.0) / (std + 1e-4)).abs() < 1e-12, "{out:?}");
        assert_eq!(out[3..6], [0.0, 0.0, 0.0]);
        assert!((out[18] - 0.5).abs() < 1e-15, "half the groups have zero std: {out:?}");
    }
}
