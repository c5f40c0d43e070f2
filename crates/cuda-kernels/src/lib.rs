//! aha-cuda-kernels: the GPU side of aha at the level of raw device buffers.
//!
//! - [`device_count`] / [`no_gpu_reason`]: detection that never panics; with
//!   no driver or no device everything runs on the CPU.
//! - [`registry`]: every file of `kernels/` embedded in the binary, and a
//!   [`KernelId`] naming each kernel.
//! - [`nvrtc`]: NVRTC found at run time and used to compile a file once per
//!   device (as cubin, so ptxas checks resources too).
//! - [`launch`]: one typed launcher per kernel.
//!
//! ```
//! // Works on every machine: on one without a GPU the count is 0.
//! let n = aha_cuda_kernels::device_count();
//! if n == 0 {
//!     println!("no GPU: {}", aha_cuda_kernels::no_gpu_reason().unwrap_or_default());
//! }
//! ```

pub mod device;
pub mod error;
pub mod launch;
pub mod nvrtc;
pub mod registry;

pub use cudarc;
pub use device::{device_count, no_gpu_reason, Gpu};
pub use error::{Error, Result};
pub use registry::{KernelId, KernelSource, SOURCES};
