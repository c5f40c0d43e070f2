//! Every file in `kernels/` compiles through NVRTC for sm_80 and sm_90 (as
//! cubin, so ptxas checks registers and shared memory too), on every machine.
//!
//! NVRTC needs no GPU. Where it cannot be found, the test fails when
//! `AHA_REQUIRE_NVRTC=1` (set by `scripts/test.sh` and CI, which install it
//! from the `nvidia-cuda-nvrtc` wheel) and otherwise says plainly that it was
//! skipped.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::needless_range_loop)]

use std::collections::BTreeSet;
use std::path::Path;

use aha_cuda_kernels::nvrtc::{compile, nvrtc, resource_usage, Output};
use aha_cuda_kernels::registry::HEADERS;
use aha_cuda_kernels::{KernelId, KernelSource, SOURCES};

const ARCHES: &[(u32, u32)] = &[(8, 0), (9, 0)];

fn nvrtc_or_skip(test: &str) -> bool {
    match nvrtc() {
        Ok(nv) => {
            eprintln!(
                "{test}: NVRTC {}.{}, include dirs {:?}",
                nv.version.0, nv.version.1, nv.include_dirs
            );
            true
        }
        Err(e) => {
            let required = std::env::var("AHA_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
            assert!(!required, "{test}: AHA_REQUIRE_NVRTC=1 but {e}");
            eprintln!("{test}: skipped: {e} (scripts/test.sh installs it)");
            false
        }
    }
}

#[test]
fn registry_lists_every_kernel_file() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../kernels");
    let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
        .expect("kernels/ exists")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".cu"))
        .collect();
    let registered: BTreeSet<String> = SOURCES.iter().map(|s| s.file.to_string()).collect();
    assert_eq!(on_disk, registered, "kernels/*.cu and registry::SOURCES disagree");
    let headers_on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
        .expect("kernels/ exists")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".cuh"))
        .collect();
    let headers: BTreeSet<String> = HEADERS.iter().map(|s| s.file.to_string()).collect();
    assert_eq!(headers_on_disk, headers, "kernels/*.cuh and registry::HEADERS disagree");
    for id in KernelId::ALL {
        let src = id.source().expect("kernel's file is registered");
        assert!(
            src.source.contains(&format!("void {}(", id.symbol())),
            "{:?}: symbol {} not found in {}",
            id,
            id.symbol(),
            id.file()
        );
    }
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    if !nvrtc_or_skip("every_kernel_compiles_for_sm80_and_sm90") {
        return;
    }
    for src in SOURCES {
        for &cc in ARCHES {
            let cubin = compile(src, cc, Output::Cubin).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                cubin.starts_with(b"\x7fELF"),
                "{} sm_{}{}: not an ELF cubin",
                src.file,
                cc.0,
                cc.1
            );
            let ptx = compile(src, cc, Output::Ptx).unwrap_or_else(|e| panic!("{e}"));
            let ptx = String::from_utf8_lossy(&ptx);
            for id in KernelId::ALL.iter().filter(|id| id.file() == src.file) {
                assert!(
                    ptx.contains(&format!(".entry {}(", id.symbol())),
                    "{}: PTX for compute_{}{} lacks entry {}",
                    src.file,
                    cc.0,
                    cc.1,
                    id.symbol()
                );
            }
            eprintln!(
                "compiled kernels/{} for sm_{}{} ({} bytes of cubin)",
                src.file,
                cc.0,
                cc.1,
                cubin.len()
            );
        }
    }
}

/// Prints ptxas's register / shared-memory / spill report for every kernel
/// (`--nocapture` to read it), and fails on any spill to local memory.
#[test]
fn every_kernel_fits_without_spills() {
    if !nvrtc_or_skip("every_kernel_fits_without_spills") {
        return;
    }
    for src in SOURCES {
        for &cc in ARCHES {
            let log = resource_usage(src, cc).unwrap_or_else(|e| panic!("{e}"));
            let mut kernel = String::new();
            for line in log.lines() {
                if let Some(rest) = line.split("entry function '").nth(1) {
                    kernel = rest.split('\'').next().unwrap_or_default().to_string();
                } else if line.contains("Used") || line.contains("spill") {
                    let text = line
                        .trim_start_matches("ptxas")
                        .trim_start_matches([' ', '.', 'i', 'n', 'f', 'o', ':']);
                    eprintln!("{} sm_{}{} {kernel}: {}", src.file, cc.0, cc.1, text.trim());
                }
            }
            for line in log.lines().filter(|l| l.contains("spill")) {
                assert!(
                    line.contains("0 bytes spill stores, 0 bytes spill loads"),
                    "{} sm_{}{}: {line}",
                    src.file,
                    cc.0,
                    cc.1
                );
            }
        }
    }
}

#[test]
fn a_broken_kernel_is_reported_with_file_and_log() {
    if !nvrtc_or_skip("a_broken_kernel_is_reported_with_file_and_log") {
        return;
    }
    let bad = KernelSource {
        file: "broken.cu",
        source: "extern \"C\" __global__ void k(float* x) { x[0] = undeclared_name; }",
    };
    let err = compile(&bad, (9, 0), Output::Cubin).expect_err("must not compile");
    let msg = err.to_string();
    assert!(msg.contains("broken.cu") && msg.contains("undeclared_name"), "{msg}");
}

#[test]
fn device_detection_never_panics() {
    let n = aha_cuda_kernels::device_count();
    match aha_cuda_kernels::no_gpu_reason() {
        Some(reason) => {
            assert_eq!(n, 0);
            eprintln!("no GPU: {reason}");
            assert!(aha_cuda_kernels::Gpu::get(0).is_err());
        }
        None => assert!(n > 0),
    }
}

#[test]
fn compiled_kernels_are_cached_on_disk_and_bad_files_are_replaced() {
    use aha_cuda_kernels::cache::{cache_path, compile_cached_in, unseal, COMPILES};
    use std::sync::atomic::Ordering;
    if !nvrtc_or_skip("compiled_kernels_are_cached_on_disk_and_bad_files_are_replaced") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("aha-kernel-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let src = SOURCES.iter().find(|s| s.file == "elementwise.cu").unwrap();
    let version = nvrtc().unwrap().version;
    for output in [Output::Cubin, Output::Ptx] {
        let path = cache_path(&dir, src, (9, 0), output, version);
        let before = COMPILES.load(Ordering::SeqCst);
        let first = compile_cached_in(&dir, src, (9, 0), output).unwrap();
        assert!(path.is_file(), "{} was not written", path.display());
        let stored = |p: &Path| -> Vec<u8> {
            let f = std::fs::read(p).unwrap();
            assert!(unseal(&f).is_some(), "bad checksum");
            f[..f.len() - 8].to_vec()
        };
        assert!(stored(&path) == first);
        let t = std::time::Instant::now();
        let second = compile_cached_in(&dir, src, (9, 0), output).unwrap();
        eprintln!("{output:?}: cached load {:?}", t.elapsed());
        assert!(first == second);
        // Other tests compile in parallel, so count only a lower bound:
        // the first call compiled; the file is what the second returned.
        assert!(COMPILES.load(Ordering::SeqCst) > before);
        // A truncated file is recompiled and replaced.
        std::fs::write(&path, &first[..first.len() / 3]).unwrap();
        let third = compile_cached_in(&dir, src, (9, 0), output).unwrap();
        assert!(third == first, "a truncated file was returned");
        assert!(stored(&path) == first, "the bad file was not replaced");
        // So is a file with one flipped byte.
        let mut f = std::fs::read(&path).unwrap();
        let mid = f.len() / 2;
        f[mid] ^= 0x40;
        std::fs::write(&path, &f).unwrap();
        assert!(compile_cached_in(&dir, src, (9, 0), output).unwrap() == first);
    }
    // The other architecture is another file.
    compile_cached_in(&dir, src, (8, 0), Output::Cubin).unwrap();
    let files = std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(files, 3, "cubin sm_90, ptx compute_90, cubin sm_80");
    // An unwritable cache folder costs a compile, not an error.
    let blocked = dir.join("not-a-dir");
    std::fs::write(&blocked, b"x").unwrap();
    assert!(!compile_cached_in(&blocked, src, (9, 0), Output::Cubin)
        .unwrap()
        .is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}
