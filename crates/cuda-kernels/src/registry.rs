//! The kernel registry: every source file under `kernels/`, embedded in the
//! binary, and the name of every kernel in it.

/// One CUDA source file of `kernels/`, embedded with `include_str!`.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    /// File name under `kernels/`.
    pub file: &'static str,
    /// The CUDA C++ text.
    pub source: &'static str,
}

macro_rules! kernel_sources {
    ($($file:literal),* $(,)?) => {
        /// Every file in `kernels/`; a test checks this list against the folder.
        pub const SOURCES: &[KernelSource] = &[
            $(KernelSource { file: $file, source: include_str!(concat!("../../../kernels/", $file)) },)*
        ];
    };
}

kernel_sources!["rmsnorm.cu"];

/// Names every kernel the launchers use: its source file and symbol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelId {
    /// `rmsnorm_forward_f32` in `rmsnorm.cu`; CPU twin `aha_tensor::cpu::rmsnorm_forward`.
    RmsnormForwardF32,
}

impl KernelId {
    /// Every kernel, for tests that check each one is present in its module.
    pub const ALL: &'static [KernelId] = &[KernelId::RmsnormForwardF32];

    /// The source file under `kernels/` that defines this kernel.
    pub fn file(self) -> &'static str {
        match self {
            KernelId::RmsnormForwardF32 => "rmsnorm.cu",
        }
    }

    /// The `extern "C"` symbol of the kernel.
    pub fn symbol(self) -> &'static str {
        match self {
            KernelId::RmsnormForwardF32 => "rmsnorm_forward_f32",
        }
    }

    /// The embedded source of this kernel's file.
    pub fn source(self) -> Option<&'static KernelSource> {
        SOURCES.iter().find(|s| s.file == self.file())
    }
}
