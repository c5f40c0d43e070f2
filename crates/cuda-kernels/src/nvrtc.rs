//! Finding NVRTC at run time and compiling kernel sources with it.
//!
//! cudarc opens `libnvrtc.so.13` by name. Where that name is not on the
//! loader's path (a machine with no CUDA install, where the library comes from
//! the `nvidia-cuda-nvrtc` Python wheel), we open the file by its full path
//! first: the dynamic loader then answers cudarc's by-name request with the
//! library already in the process.

use std::ffi::{c_char, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::nvrtc::{result, sys};

use crate::error::{Error, Result};
use crate::registry::{KernelSource, HEADERS};

/// What we found of the CUDA compiler: where its headers are, if anywhere.
#[derive(Debug, Clone)]
pub struct Nvrtc {
    /// `include/` folders with `cuda_bf16.h` and friends, passed as `-I`.
    pub include_dirs: Vec<PathBuf>,
    /// NVRTC's version, (major, minor).
    pub version: (i32, i32),
}

/// Folders that may hold a CUDA install or the unpacked pip wheels, best first:
/// `$AHA_CUDA_ROOT`, `$CUDA_HOME`, `$CUDA_PATH`, `/usr/local/cuda`.
fn candidate_roots() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    for var in ["AHA_CUDA_ROOT", "CUDA_HOME", "CUDA_PATH"] {
        if let Some(v) = std::env::var_os(var) {
            if !v.is_empty() {
                roots.push(PathBuf::from(v));
            }
        }
    }
    roots.push(PathBuf::from("/usr/local/cuda"));
    roots
}

const LIB_NAMES: &[&str] = &["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"];

fn try_preload(root: &Path, searched: &mut Vec<String>) -> bool {
    for sub in ["lib", "lib64", "."] {
        for name in LIB_NAMES {
            let path = root.join(sub).join(name);
            if !path.is_file() {
                continue;
            }
            searched.push(path.display().to_string());
            // NVRTC opens its builtins library by name when it compiles;
            // load it from the same folder first so that name resolves.
            preload_builtins(&root.join(sub));
            // SAFETY: loading NVRTC runs only its initialisers, which have no
            // preconditions. The handle is leaked on purpose: the library must
            // stay mapped for the life of the process, as cudarc expects.
            if let Ok(lib) = unsafe { libloading::Library::new(&path) } {
                std::mem::forget(lib);
                return true;
            }
        }
    }
    false
}

fn preload_builtins(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("libnvrtc-builtins.so") && !name.contains(".alt.") {
            // SAFETY: as for NVRTC itself below; leaked to stay mapped.
            if let Ok(lib) = unsafe { libloading::Library::new(e.path()) } {
                std::mem::forget(lib);
            }
        }
    }
}

fn locate() -> std::result::Result<Nvrtc, String> {
    let roots = candidate_roots();
    let mut searched = Vec::new();
    // SAFETY: only probes whether the shared library can be opened.
    let mut present = unsafe { sys::is_culib_present() };
    if !present {
        searched.push("libnvrtc.so.* on the loader path".to_string());
        for root in &roots {
            searched.push(root.display().to_string());
            if try_preload(root, &mut searched) {
                // SAFETY: as above.
                present = unsafe { sys::is_culib_present() };
                if present {
                    break;
                }
            }
        }
    }
    if !present {
        return Err(searched.join(", "));
    }
    let mut include_dirs = Vec::new();
    for root in &roots {
        let inc = root.join("include");
        if inc.join("cuda_bf16.h").is_file() && !include_dirs.contains(&inc) {
            include_dirs.push(inc);
        }
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is loaded; nvrtcVersion only writes two ints.
    let rc = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
    if rc != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(format!("nvrtcVersion failed: {rc:?}"));
    }
    Ok(Nvrtc {
        include_dirs,
        version: (major, minor),
    })
}

/// Finds and loads NVRTC once per process. Never panics.
pub fn nvrtc() -> Result<&'static Nvrtc> {
    static FOUND: OnceLock<std::result::Result<Nvrtc, String>> = OnceLock::new();
    FOUND
        .get_or_init(locate)
        .as_ref()
        .map_err(|searched| Error::NvrtcMissing {
            searched: searched.clone(),
        })
}

/// The options every kernel file is compiled with (besides the
/// architecture and the include folders); part of the disk cache's key.
pub const OPTIONS: &[&str] = &["--std=c++17", "--use_fast_math", "-default-device"];

/// What a compilation produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Machine code for one real architecture (`sm_XY`); NVRTC runs ptxas, so
    /// register and shared-memory limits are checked too.
    Cubin,
    /// PTX for a virtual architecture (`compute_XY`), JIT-compiled by the driver.
    Ptx,
}

/// Compiles one kernel file for compute capability `(major, minor)`.
///
/// Returns the cubin or PTX bytes, or [`Error::Compile`] with NVRTC's log.
pub fn compile(src: &KernelSource, cc: (u32, u32), output: Output) -> Result<Vec<u8>> {
    compile_with(src, cc, output, &[]).map(|(bytes, _)| bytes)
}

/// Compiles one kernel file to cubin with `--ptxas-options=-v` and returns
/// NVRTC's log: ptxas's registers, shared memory and spill bytes per kernel.
pub fn resource_usage(src: &KernelSource, cc: (u32, u32)) -> Result<String> {
    compile_with(src, cc, Output::Cubin, &["--ptxas-options=-v"]).map(|(_, log)| log)
}

fn compile_with(src: &KernelSource, cc: (u32, u32), output: Output, extra: &[&str]) -> Result<(Vec<u8>, String)> {
    let nv = nvrtc()?;
    let arch = match output {
        Output::Cubin => format!("sm_{}{}", cc.0, cc.1),
        Output::Ptx => format!("compute_{}{}", cc.0, cc.1),
    };
    let fail = |log: String| Error::Compile {
        file: src.file,
        arch: arch.clone(),
        log,
    };
    let mut opts = vec![format!("--gpu-architecture={arch}")];
    opts.extend(OPTIONS.iter().map(|o| o.to_string()));
    opts.extend(extra.iter().map(|o| o.to_string()));
    for inc in &nv.include_dirs {
        opts.push(format!("--include-path={}", inc.display()));
    }
    let code = std::ffi::CString::new(src.source).map_err(|e| fail(e.to_string()))?;
    let name = std::ffi::CString::new(src.file).map_err(|e| fail(e.to_string()))?;
    let prog = create_program(&code, &name).map_err(fail)?;
    // SAFETY: `prog` was just created and is destroyed exactly once below.
    let compiled = unsafe { result::compile_program(prog, &opts) };
    let out = match compiled {
        Err(e) => {
            // SAFETY: `prog` is live.
            let log = unsafe { result::get_program_log(prog) }
                .map(|l| c_chars_to_string(&l))
                .unwrap_or_default();
            Err(fail(format!("{e:?}\n{log}")))
        }
        // SAFETY: `prog` compiled successfully and is live.
        Ok(()) => unsafe { read_output(prog, output) }
            .map(|bytes| {
                // SAFETY: `prog` is live.
                let log = unsafe { result::get_program_log(prog) }
                    .map(|l| c_chars_to_string(&l))
                    .unwrap_or_default();
                (bytes, log)
            })
            .map_err(|e| fail(format!("{e:?}"))),
    };
    // SAFETY: `prog` is live and not used after this.
    let _ = unsafe { result::destroy_program(prog) };
    out
}

/// Creates an NVRTC program for `code` named `name`, with every header of
/// [`HEADERS`] available to its `#include "..."` lines.
fn create_program(code: &CStr, name: &CStr) -> std::result::Result<sys::nvrtcProgram, String> {
    let texts = HEADERS
        .iter()
        .map(|h| CString::new(h.source).map_err(|e| format!("{}: {e}", h.file)))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let names = HEADERS
        .iter()
        .map(|h| CString::new(h.file).map_err(|e| format!("{}: {e}", h.file)))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let text_ptrs: Vec<*const c_char> = texts.iter().map(|t| t.as_ptr()).collect();
    let name_ptrs: Vec<*const c_char> = names.iter().map(|n| n.as_ptr()).collect();
    let count = i32::try_from(HEADERS.len()).map_err(|e| e.to_string())?;
    let mut prog = std::mem::MaybeUninit::<sys::nvrtcProgram>::uninit();
    // SAFETY: nvrtcCreateProgram(nvrtcProgram* prog, const char* src, const
    // char* name, int numHeaders, const char* const* headers, const char*
    // const* includeNames): `code` and `name` are NUL-terminated and live
    // for the call; `text_ptrs` and `name_ptrs` hold `count` pointers each
    // to NUL-terminated strings owned by `texts` and `names`, which outlive
    // the call (NVRTC copies them). `prog` is written on success only.
    let rc = unsafe {
        sys::nvrtcCreateProgram(
            prog.as_mut_ptr(),
            code.as_ptr(),
            name.as_ptr(),
            count,
            text_ptrs.as_ptr(),
            name_ptrs.as_ptr(),
        )
    };
    if rc != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(format!("nvrtcCreateProgram: {rc:?}"));
    }
    // SAFETY: NVRTC_SUCCESS means `prog` was written.
    Ok(unsafe { prog.assume_init() })
}

fn c_chars_to_string(chars: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = chars.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// # Safety
/// `prog` must be a live, successfully compiled program.
unsafe fn read_output(prog: sys::nvrtcProgram, output: Output) -> std::result::Result<Vec<u8>, sys::nvrtcResult> {
    let mut size = 0usize;
    let check = |rc: sys::nvrtcResult| {
        if rc == sys::nvrtcResult::NVRTC_SUCCESS {
            Ok(())
        } else {
            Err(rc)
        }
    };
    match output {
        Output::Cubin => {
            // SAFETY: guaranteed by the caller; the buffer has `size` bytes.
            unsafe {
                check(sys::nvrtcGetCUBINSize(prog, &mut size))?;
                let mut buf = vec![0u8; size];
                check(sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast()))?;
                Ok(buf)
            }
        }
        Output::Ptx => {
            // SAFETY: as above.
            unsafe {
                check(sys::nvrtcGetPTXSize(prog, &mut size))?;
                let mut buf = vec![0u8; size];
                check(sys::nvrtcGetPTX(prog, buf.as_mut_ptr().cast()))?;
                Ok(buf)
            }
        }
    }
}
