//! The on-disk cache of compiled kernels: NVRTC output keyed by everything
//! that decides it, so that a process compiles a kernel file once per
//! machine, not once per run.
//!
//! The key hashes (FNV-1a, 64 bits) the source text and the headers it may
//! include (`registry::HEADERS`), the target architecture, the output kind,
//! the compile options and NVRTC's version;
//! the file is `<dir>/<file>-<arch>-<key>.{cubin,ptx}`. Writes go to a
//! temporary name and are renamed into place, so a reader never sees a
//! partial file and two processes racing write the same bytes. Each file
//! ends with an FNV-1a checksum of its contents; a file whose checksum does
//! not match (truncated, corrupted) or that does not look like the output
//! kind (an ELF header for a cubin, a `.version` directive for PTX) is
//! compiled again and replaced.
//! Any failure to read or write the cache only costs a compilation.
//!
//! The folder: `$AHA_KERNEL_CACHE`, else `$XDG_CACHE_HOME/aha/kernels`, else
//! `$HOME/.cache/aha/kernels`; `AHA_KERNEL_CACHE=off` turns caching off.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::Result;
use crate::nvrtc::{self, Output};
use crate::registry::{KernelSource, HEADERS};

/// Compilations done by this process through [`compile_cached`] (cache
/// misses), for tests and logs.
pub static COMPILES: AtomicUsize = AtomicUsize::new(0);

/// The cache folder, or `None` when caching is off or no folder is known.
pub fn cache_dir() -> Option<PathBuf> {
    match std::env::var_os("AHA_KERNEL_CACHE") {
        Some(v) if v == "off" || v.is_empty() => None,
        Some(v) => Some(PathBuf::from(v)),
        None => std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|c| c.join("aha").join("kernels")),
    }
}

/// FNV-1a over the parts, with a separator byte between them.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in p.iter().chain(std::iter::once(&0xffu8)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// The cache file for `src` compiled for `cc` as `output` with NVRTC `version`.
pub fn cache_path(dir: &Path, src: &KernelSource, cc: (u32, u32), output: Output, version: (i32, i32)) -> PathBuf {
    let (arch, ext) = match output {
        Output::Cubin => (format!("sm_{}{}", cc.0, cc.1), "cubin"),
        Output::Ptx => (format!("compute_{}{}", cc.0, cc.1), "ptx"),
    };
    let ver = format!("{}.{}", version.0, version.1);
    let options = nvrtc::OPTIONS.join(" ");
    let mut parts: Vec<&[u8]> = vec![
        src.source.as_bytes(),
        arch.as_bytes(),
        ext.as_bytes(),
        options.as_bytes(),
        ver.as_bytes(),
    ];
    // The headers every file may include are part of what it compiles from.
    parts.extend(HEADERS.iter().flat_map(|h| [h.file.as_bytes(), h.source.as_bytes()]));
    let key = fnv1a(&parts);
    let stem = src.file.trim_end_matches(".cu");
    dir.join(format!("{stem}-{arch}-{key:016x}.{ext}"))
}

/// The bytes followed by their checksum, as the cache stores them.
pub fn seal(bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    out.extend_from_slice(&fnv1a(&[bytes]).to_le_bytes());
    out
}

/// The contents of a cache file whose checksum matches, else `None`.
pub fn unseal(file: &[u8]) -> Option<&[u8]> {
    let (body, sum) = file.split_at_checked(file.len().checked_sub(8)?)?;
    (fnv1a(&[body]).to_le_bytes() == sum).then_some(body)
}

/// Does `bytes` look like a complete output of kind `output`?
pub fn looks_valid(bytes: &[u8], output: Output) -> bool {
    match output {
        Output::Cubin => bytes.len() > 64 && bytes.starts_with(b"\x7fELF"),
        Output::Ptx => {
            // NVRTC's PTX ends with a NUL; the text must declare its version.
            let text = bytes.strip_suffix(&[0]).unwrap_or(bytes);
            std::str::from_utf8(text).is_ok_and(|t| t.contains(".version") && t.contains(".target"))
        }
    }
}

/// [`nvrtc::compile`] through the on-disk cache in [`cache_dir`].
pub fn compile_cached(src: &KernelSource, cc: (u32, u32), output: Output) -> Result<Vec<u8>> {
    match cache_dir() {
        Some(dir) => compile_cached_in(&dir, src, cc, output),
        None => {
            COMPILES.fetch_add(1, Ordering::Relaxed);
            nvrtc::compile(src, cc, output)
        }
    }
}

/// [`compile_cached`] with an explicit cache folder (created when missing).
pub fn compile_cached_in(dir: &Path, src: &KernelSource, cc: (u32, u32), output: Output) -> Result<Vec<u8>> {
    let version = nvrtc::nvrtc()?.version;
    let path = cache_path(dir, src, cc, output, version);
    if let Ok(file) = std::fs::read(&path) {
        if let Some(bytes) = unseal(&file) {
            if looks_valid(bytes, output) {
                return Ok(bytes.to_vec());
            }
        }
    }
    COMPILES.fetch_add(1, Ordering::Relaxed);
    let bytes = nvrtc::compile(src, cc, output)?;
    // Best effort: a cache we cannot write only costs the next run a compile.
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let written = std::fs::create_dir_all(dir)
        .and_then(|_| std::fs::write(&tmp, seal(&bytes)))
        .and_then(|_| std::fs::rename(&tmp, &path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_change_with_source_arch_output_and_version() {
        let a = KernelSource {
            file: "x.cu",
            source: "extern \"C\" __global__ void k() {}",
        };
        let b = KernelSource {
            file: "x.cu",
            source: "extern \"C\" __global__ void k() { }",
        };
        let d = Path::new("/c");
        let p = |s: &KernelSource, cc, o, v| cache_path(d, s, cc, o, v);
        let base = p(&a, (9, 0), Output::Cubin, (13, 0));
        assert!(base.to_string_lossy().starts_with("/c/x-sm_90-") && base.to_string_lossy().ends_with(".cubin"));
        assert_eq!(base, p(&a, (9, 0), Output::Cubin, (13, 0)), "stable");
        for other in [
            p(&b, (9, 0), Output::Cubin, (13, 0)),
            p(&a, (8, 0), Output::Cubin, (13, 0)),
            p(&a, (9, 0), Output::Ptx, (13, 0)),
            p(&a, (9, 0), Output::Cubin, (13, 1)),
        ] {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn sealed_files_detect_truncation_and_corruption() {
        let data = b"some cubin bytes".to_vec();
        let file = seal(&data);
        assert_eq!(unseal(&file), Some(&data[..]));
        assert_eq!(unseal(&file[..file.len() - 1]), None);
        assert_eq!(unseal(&file[..5]), None);
        let mut bad = file.clone();
        bad[3] ^= 1;
        assert_eq!(unseal(&bad), None);
    }

    #[test]
    fn validity_checks_the_kind() {
        let mut elf = b"\x7fELF".to_vec();
        elf.resize(100, 0);
        assert!(looks_valid(&elf, Output::Cubin));
        assert!(!looks_valid(&elf[..10], Output::Cubin), "truncated");
        assert!(!looks_valid(b"", Output::Cubin));
        assert!(looks_valid(b"//\n.version 9.0\n.target sm_90\n\0", Output::Ptx));
        assert!(!looks_valid(b".version 9.0\n", Output::Ptx), "truncated");
        assert!(!looks_valid(&elf, Output::Ptx));
    }
}
