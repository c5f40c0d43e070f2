//! Compiles every kernel file for one architecture into a kernel cache
//! folder (`aha_cuda_kernels::cache`), so that a GPU machine given that
//! folder as `AHA_KERNEL_CACHE` compiles nothing when the NVRTC version
//! there matches the one used here (it is part of each file's key).
//!
//! Usage: `precompile DIR [SM]` (SM default 90). `scripts/gpu-bundle.sh`
//! runs it into `.gpu-bundle/kernel-cache`.

use aha_cuda_kernels::cache::compile_cached_in;
use aha_cuda_kernels::nvrtc::{self, Output};
use aha_cuda_kernels::SOURCES;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().ok_or("usage: precompile DIR [SM]")?);
    let sm: u32 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(90);
    let cc = (sm / 10, sm % 10);
    let version = nvrtc::nvrtc()?.version;
    for src in SOURCES {
        let bytes = compile_cached_in(&dir, src, cc, Output::Cubin)?;
        println!(
            "{} sm_{sm} NVRTC {}.{}: {} bytes",
            src.file,
            version.0,
            version.1,
            bytes.len()
        );
    }
    Ok(())
}
