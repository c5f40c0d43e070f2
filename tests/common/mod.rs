//! Set-up shared by the multi-process tests (`dist.rs`,
//! `expert_parallel_cli.rs`): fixture paths, a free port for the
//! rendezvous, the GPU skip and a temporary folder removed on drop.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};

/// `tests/fixtures/<path>`.
pub fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(path)
}

/// A TCP port free at the time of the call (for `--master-port`).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// True (after printing "skipped: no GPU" with the reason) when no GPU,
/// real or emulated, is present.
pub fn no_gpu(test: &str) -> bool {
    if aha_cuda_kernels::device_count() == 0 {
        let reason = aha_cuda_kernels::no_gpu_reason().unwrap_or_default();
        eprintln!("{test}: skipped: no GPU ({reason})");
        return true;
    }
    false
}

/// A fresh folder under the system's temporary folder, named after the
/// test target, `name` and the process; removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates it empty (removing a leftover of the same name).
    pub fn new(name: &str) -> TempDir {
        let target = env!("CARGO_CRATE_NAME").replace('_', "-");
        let d = std::env::temp_dir().join(format!("aha-{target}-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
